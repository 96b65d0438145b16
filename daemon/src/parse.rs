//! The small parsers behind the command line's and the config file's values: sizes, object
//! sizes, socket modes and groups, listen addresses, booleans, checkpoint periods. Each gives
//! one line naming the value that is wrong.

use crate::error::{Error, ErrorKind, Result};
use std::path::PathBuf;
use std::time::Duration;

/// Parse `1073741824`, `512K`, `4M`, `10G`, `1T`, `1P` (binary units; `KiB`/`MB` forms too).
pub fn parse_size(s: &str) -> Result<u64> {
    let bad = || {
        Error::new(
            ErrorKind::InvalidInput,
            format!("invalid size {s:?} (expected a number with an optional K/M/G/T/P suffix)"),
        )
    };
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| bad())?;
    let shift = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        "P" | "PB" | "PIB" => 50,
        _ => return Err(bad()),
    };
    n.checked_mul(1u64 << shift).ok_or_else(bad)
}

/// `create --size` and `resize --size`: as `rbd` reads them, a number without a unit is
/// MiB (`--size 10240` is 10 GiB, not 10 KiB), so a script written for `rbd create` makes
/// the same image; `B` gives bytes (`1048576B`), K/M/G/T/P the binary units.
pub fn parse_image_size(s: &str) -> Result<u64> {
    let t = s.trim();
    if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
        return parse_size(&format!("{t}M"));
    }
    parse_size(t)
}

/// `--object-size`: a power of two from 4K to 32M, returned as its log2 (the order).
pub fn parse_object_size(s: &str) -> Result<u8> {
    let n = parse_size(s).map_err(|e| e.context("--object-size"))?;
    if !n.is_power_of_two() || !(4096..=(32 << 20)).contains(&n) {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!("invalid object size {s:?} (a power of two from 4K to 32M)"),
        ));
    }
    Ok(n.trailing_zeros() as u8)
}

/// `--socket-mode`: octal permission bits, at most 0777 (no setuid/setgid/sticky: they
/// mean nothing on a socket). An optional `0o` prefix is accepted.
pub fn parse_socket_mode(s: &str) -> std::result::Result<u32, String> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    if digits.is_empty() || !digits.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
        return Err(format!(
            "{s:?} is not an octal mode (expected e.g. 0600 or 0660)"
        ));
    }
    match u32::from_str_radix(digits, 8) {
        Ok(m) if m <= 0o777 => Ok(m),
        _ => Err(format!("{s:?} is above 0777")),
    }
}

/// A group by name (looked up in the group database) or by numeric gid (taken as is).
pub fn resolve_group(s: &str) -> Result<u32> {
    let unknown = |why: String| {
        Error::new(
            ErrorKind::InvalidInput,
            format!("--socket-group {s:?}: {why}"),
        )
    };
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s
            .parse::<u32>()
            .ok()
            .filter(|&g| g != u32::MAX)
            .ok_or_else(|| unknown("not a valid gid".into()));
    }
    let name = std::ffi::CString::new(s).map_err(|_| unknown("contains a NUL byte".into()))?;
    let mut buf = vec![0 as libc::c_char; 1024];
    loop {
        // SAFETY: getgrnam_r writes only into `grp` and `buf` (whose length it is given)
        // and sets `res` to null or to `grp`; all outlive the call.
        let mut grp: libc::group = unsafe { std::mem::zeroed() };
        let mut res: *mut libc::group = std::ptr::null_mut();
        let rc = unsafe {
            libc::getgrnam_r(
                name.as_ptr(),
                &mut grp,
                buf.as_mut_ptr(),
                buf.len(),
                &mut res,
            )
        };
        if rc == libc::ERANGE && buf.len() < (1 << 20) {
            let n = buf.len() * 4;
            buf.resize(n, 0);
            continue;
        }
        if rc != 0 {
            return Err(Error::io(
                format!("looking up --socket-group {s:?}"),
                std::io::Error::from_raw_os_error(rc),
            ));
        }
        if res.is_null() {
            return Err(unknown("no such group".into()));
        }
        return Ok(grp.gr_gid);
    }
}

/// Where a server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Unix(PathBuf),
    Tcp(String, u16),
    /// Passed in by systemd (socket activation); systemd owns and removes it.
    Inherited(String),
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            ListenAddr::Tcp(h, p) if h.contains(':') => write!(f, "tcp:[{h}]:{p}"),
            ListenAddr::Tcp(h, p) => write!(f, "tcp:{h}:{p}"),
            ListenAddr::Inherited(d) => write!(f, "{d} (from systemd)"),
        }
    }
}

/// `HOST:PORT`, `[V6]:PORT`, `:PORT` or `PORT`; the host defaults to 127.0.0.1.
pub fn parse_listen(s: &str) -> Result<ListenAddr> {
    let bad = |why: &str| {
        Error::new(
            ErrorKind::InvalidInput,
            format!("invalid --listen {s:?}: {why} (expected HOST:PORT)"),
        )
    };
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, p) = rest.split_once("]:").ok_or_else(|| bad("unclosed ["))?;
        (h.to_string(), p)
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') => (h.to_string(), p),
            Some(_) => return Err(bad("write an IPv6 host as [ADDR]:PORT")),
            None => (String::new(), s),
        }
    };
    let port: u16 = port.parse().map_err(|_| bad("bad port"))?;
    let host = if host.is_empty() {
        "127.0.0.1".to_string()
    } else {
        host
    };
    Ok(ListenAddr::Tcp(host, port))
}

/// A boolean setting (`shared` metadata, `shared_default` in the config file).
pub fn parse_bool(what: &str, v: &str) -> Result<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "true" | "yes" | "1" | "on" => Ok(true),
        "false" | "no" | "0" | "off" => Ok(false),
        _ => Err(Error::new(
            ErrorKind::InvalidInput,
            format!("{what} is {v:?}, expected true or false"),
        )),
    }
}

/// `--checkpoint-idle SECONDS`: a positive number of seconds, fractions allowed.
pub fn parse_checkpoint_idle(s: &str) -> std::result::Result<Duration, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v > 0.0 && v <= 1e9 => Ok(Duration::from_secs_f64(v)),
        _ => Err(format!(
            "{s:?} is not a number of seconds above 0 (e.g. 30 or 0.5)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4M").unwrap(), 4 << 20);
        assert_eq!(parse_size("10g").unwrap(), 10 << 30);
        assert_eq!(parse_size("123").unwrap(), 123);
        assert_eq!(parse_size("1TiB").unwrap(), 1 << 40);
        assert!(parse_size("-1").is_err());
        assert!(parse_size("4X").is_err());
        assert!(parse_size("99999999999P").is_err());
        // Image sizes as rbd reads them: MiB unless a unit says otherwise.
        assert_eq!(parse_image_size("10").unwrap(), 10 << 20);
        assert_eq!(parse_image_size(" 10240 ").unwrap(), 10 << 30);
        assert_eq!(parse_image_size("4096B").unwrap(), 4096);
        assert_eq!(parse_image_size("3G").unwrap(), 3 << 30);
        assert_eq!(parse_image_size("0").unwrap(), 0);
        assert!(parse_image_size("").is_err());
        assert!(
            parse_image_size("99999999999999").is_err(),
            "overflows as MiB"
        );
    }

    #[test]
    fn object_sizes() {
        assert_eq!(parse_object_size("4M").unwrap(), 22);
        assert_eq!(parse_object_size("4K").unwrap(), 12);
        assert!(parse_object_size("3M").is_err());
        assert!(parse_object_size("64M").is_err());
        assert!(parse_object_size("2K").is_err());
    }

    #[test]
    fn socket_modes() {
        assert_eq!(parse_socket_mode("0600"), Ok(0o600));
        assert_eq!(parse_socket_mode("660"), Ok(0o660));
        assert_eq!(parse_socket_mode("0o777"), Ok(0o777));
        assert_eq!(parse_socket_mode("0"), Ok(0));
        for bad in [
            "",
            "0o",
            "0800",
            "rw-rw----",
            "1777",
            "0x1ff",
            "-600",
            " 600",
            "u+rw",
        ] {
            let e = parse_socket_mode(bad).unwrap_err();
            assert!(
                e.contains(&format!("{bad:?}")) && !e.contains('\n'),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn groups() {
        assert_eq!(resolve_group("0").unwrap(), 0);
        assert_eq!(resolve_group("4242").unwrap(), 4242);
        assert_eq!(resolve_group("root").unwrap(), 0);
        let e = resolve_group("no-such-group-rados-nbd").unwrap_err();
        assert!(e.message.contains("\"no-such-group-rados-nbd\""), "{e}");
        assert!(e.message.contains("no such group"), "{e}");
        assert!(resolve_group("4294967295").is_err());
        assert!(resolve_group("99999999999").is_err());
    }

    #[test]
    fn listen_addresses() {
        assert_eq!(
            parse_listen("10809").unwrap(),
            ListenAddr::Tcp("127.0.0.1".into(), 10809)
        );
        assert_eq!(
            parse_listen(":10809").unwrap(),
            ListenAddr::Tcp("127.0.0.1".into(), 10809)
        );
        assert_eq!(
            parse_listen("[::1]:5").unwrap(),
            ListenAddr::Tcp("::1".into(), 5)
        );
        assert_eq!(
            parse_listen("localhost:7").unwrap(),
            ListenAddr::Tcp("localhost".into(), 7)
        );
        assert!(parse_listen("::1:5").is_err());
        assert!(parse_listen("h:99999").is_err());
        assert!(parse_listen("h:").is_err());
    }

    #[test]
    fn checkpoint_idle_parses_seconds() {
        assert_eq!(parse_checkpoint_idle("30"), Ok(Duration::from_secs(30)));
        assert_eq!(
            parse_checkpoint_idle("0.25"),
            Ok(Duration::from_millis(250))
        );
        for bad in ["0", "-1", "x", "", "nan", "inf"] {
            assert!(parse_checkpoint_idle(bad).is_err(), "{bad}");
        }
    }
}
