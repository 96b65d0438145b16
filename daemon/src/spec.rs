//! Image specs (`[POOL/]NAME[@SNAP]`) and sizes with K/M/G/T suffixes.

use crate::error::{Error, ErrorKind, Result};

pub const DEFAULT_POOL: &str = "rbd";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSpec {
    pub pool: String,
    pub name: String,
    pub snap: Option<String>,
}

impl std::fmt::Display for ImageSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.pool, self.name)?;
        if let Some(s) = &self.snap {
            write!(f, "@{s}")?;
        }
        Ok(())
    }
}

fn check_name(what: &str, s: &str, spec: &str) -> Result<()> {
    let ok = !s.is_empty()
        && s.len() <= 255
        && s != "."
        && s != ".."
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '+' | ':'));
    if ok {
        Ok(())
    } else {
        Err(Error::new(
            ErrorKind::InvalidInput,
            format!("invalid {what} {s:?} in image spec {spec:?} (use letters, digits, - _ . + :)"),
        ))
    }
}

impl std::str::FromStr for ImageSpec {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let (rest, snap) = match s.split_once('@') {
            Some((r, sn)) => (r, Some(sn)),
            None => (s, None),
        };
        let (pool, name) = match rest.split_once('/') {
            Some((p, n)) => (p, n),
            None => (DEFAULT_POOL, rest),
        };
        check_name("pool", pool, s)?;
        check_name("image name", name, s)?;
        if let Some(sn) = snap {
            check_name("snapshot name", sn, s)?;
        }
        Ok(ImageSpec {
            pool: pool.to_string(),
            name: name.to_string(),
            snap: snap.map(str::to_string),
        })
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs() {
        let s: ImageSpec = "vm1".parse().unwrap();
        assert_eq!(
            (s.pool.as_str(), s.name.as_str(), s.snap),
            ("rbd", "vm1", None)
        );
        let s: ImageSpec = "p/vm1@snap1".parse().unwrap();
        assert_eq!(s.to_string(), "p/vm1@snap1");
        assert!("a/b/c".parse::<ImageSpec>().is_err());
        assert!("".parse::<ImageSpec>().is_err());
        assert!("p/".parse::<ImageSpec>().is_err());
        assert!("../x".parse::<ImageSpec>().is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4M").unwrap(), 4 << 20);
        assert_eq!(parse_size("10g").unwrap(), 10 << 30);
        assert_eq!(parse_size("123").unwrap(), 123);
        assert_eq!(parse_size("1TiB").unwrap(), 1 << 40);
        assert!(parse_size("-1").is_err());
        assert!(parse_size("4X").is_err());
        assert!(parse_size("99999999999P").is_err());
    }
}
