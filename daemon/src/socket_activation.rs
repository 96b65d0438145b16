//! Listening sockets inherited from systemd socket activation (`sd_listen_fds` without
//! libsystemd): `LISTEN_PID` names the process the sockets are meant for, `LISTEN_FDS` how many
//! there are, starting at fd 3. `rados-nbd serve` uses them when it is given neither `--socket`
//! nor `--listen` (rados-nbd-serve@.socket).
//!
//! Why not a crate: `listenfd` removes the `LISTEN_*` variables (not thread-safe, and `serve`
//! runs inside the multi-threaded runtime), takes sockets without `LISTEN_PID` (catflap's
//! variant of the protocol), ignores malformed values instead of refusing them, and does not
//! check that a socket listens; `sd-notify`'s `listen_fds` hands back bare fd numbers, so the
//! checks and the unix-or-TCP choice below would stay, and its errors would replace the ones
//! that name the variable and its value. What remains here is that parsing and these checks,
//! with socket2 asking the socket what it is.

use socket2::{Domain, SockRef, Type};
use std::io;
use std::net::TcpListener;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;

/// The first inherited fd (`SD_LISTEN_FDS_START`).
pub const LISTEN_FDS_START: RawFd = 3;

/// One inherited listening socket.
#[derive(Debug)]
pub enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl Listener {
    /// For `tokio::net::{UnixListener,TcpListener}::from_std`, which needs non-blocking sockets.
    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            Listener::Unix(l) => l.set_nonblocking(on),
            Listener::Tcp(l) => l.set_nonblocking(on),
        }
    }

    /// Where it listens, for the log.
    pub fn describe(&self) -> String {
        match self {
            Listener::Unix(l) => match l.local_addr() {
                Ok(a) => match a.as_pathname() {
                    Some(p) => format!("unix:{}", p.display()),
                    None => "unix:(unnamed or abstract)".to_string(),
                },
                Err(e) => format!("unix:(unknown: {e})"),
            },
            Listener::Tcp(l) => match l.local_addr() {
                Ok(a) => format!("tcp:{a}"),
                Err(e) => format!("tcp:(unknown: {e})"),
            },
        }
    }
}

/// How many sockets systemd passed to *this* process: `None` when not socket-activated (no
/// variables, or `LISTEN_PID` names another process: the variables were inherited from a
/// parent). Malformed values are an error rather than a silent fallback to no socket.
pub fn listen_fds_count(
    listen_pid: Option<&str>,
    listen_fds: Option<&str>,
    my_pid: u32,
) -> Result<Option<usize>, String> {
    let (Some(pid), Some(fds)) = (listen_pid, listen_fds) else {
        return Ok(None);
    };
    let pid: u32 = pid
        .trim()
        .parse()
        .map_err(|_| format!("LISTEN_PID={pid:?} is not a process id"))?;
    if pid != my_pid {
        return Ok(None);
    }
    let n: usize = fds
        .trim()
        .parse()
        .map_err(|_| format!("LISTEN_FDS={fds:?} is not a count of file descriptors"))?;
    // fds are ints starting at 3; anything near that bound is a broken environment.
    if n > 4096 {
        return Err(format!("LISTEN_FDS={n} is implausibly large"));
    }
    Ok((n > 0).then_some(n))
}

/// The listening sockets systemd passed, or `Ok(None)` when not socket-activated. Call it once:
/// it takes ownership of fds 3... The `LISTEN_*` variables stay (removing them is not
/// thread-safe); a child process ignores them anyway, since `LISTEN_PID` is not its pid, and
/// the fds are made close-on-exec.
pub fn from_env() -> Result<Option<Vec<Listener>>, String> {
    let pid = std::env::var("LISTEN_PID").ok();
    let fds = std::env::var("LISTEN_FDS").ok();
    let Some(n) = listen_fds_count(pid.as_deref(), fds.as_deref(), std::process::id())? else {
        return Ok(None);
    };
    // SAFETY: systemd hands these fds to this process (LISTEN_PID matched) and nothing else
    // in the process owns them; this is the only place that takes them, once.
    unsafe { take_fds(LISTEN_FDS_START, n) }.map(Some)
}

/// Wraps fds `first..first+n` as listeners, checking that each is a listening stream socket of
/// the unix or inet family, and marks them close-on-exec (systemd passes them without).
///
/// # Safety
/// The caller must own these fds and not use or close them afterwards.
pub unsafe fn take_fds(first: RawFd, n: usize) -> Result<Vec<Listener>, String> {
    let mut owned = Vec::with_capacity(n);
    for i in 0..n {
        let fd = first + i as RawFd;
        if libc::fcntl(fd, libc::F_GETFD) < 0 {
            return Err(format!(
                "inherited fd {fd} (LISTEN_FDS={n}) is not open: {}",
                io::Error::last_os_error()
            ));
        }
        owned.push(OwnedFd::from_raw_fd(fd));
    }
    owned.into_iter().map(classify).collect()
}

fn classify(fd: OwnedFd) -> Result<Listener, String> {
    let raw = fd.as_raw_fd();
    let what = |e: io::Error| format!("inherited fd {raw} is not a socket: {e}");
    let sock = SockRef::from(&fd);
    let ty = sock.r#type().map_err(what)?;
    let domain = sock.domain().map_err(what)?;
    let listening = sock.is_listener().map_err(what)?;
    if ty != Type::STREAM || !listening {
        return Err(format!(
            "inherited fd {raw} is not a listening stream socket (ListenStream= in the .socket \
             unit, Accept=no)"
        ));
    }
    // SAFETY: raw is a valid fd we own (it is inside `fd`).
    if unsafe { libc::fcntl(raw, libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
        return Err(format!(
            "inherited fd {raw}: setting close-on-exec: {}",
            io::Error::last_os_error()
        ));
    }
    match domain {
        Domain::UNIX => Ok(Listener::Unix(UnixListener::from(fd))),
        Domain::IPV4 | Domain::IPV6 => Ok(Listener::Tcp(TcpListener::from(fd))),
        other => Err(format!(
            "inherited fd {raw} is a socket of address family {}, not unix or inet",
            libc::c_int::from(other)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::{UnixDatagram, UnixStream};

    #[test]
    fn count_only_for_this_process() {
        assert_eq!(listen_fds_count(None, None, 42), Ok(None));
        assert_eq!(listen_fds_count(Some("42"), None, 42), Ok(None));
        assert_eq!(listen_fds_count(Some("41"), Some("1"), 42), Ok(None));
        assert_eq!(listen_fds_count(Some("42"), Some("2"), 42), Ok(Some(2)));
        assert_eq!(listen_fds_count(Some("42"), Some("0"), 42), Ok(None));
        let e = listen_fds_count(Some("x"), Some("1"), 42).unwrap_err();
        assert!(e.contains("LISTEN_PID"), "{e}");
        let e = listen_fds_count(Some("42"), Some("-1"), 42).unwrap_err();
        assert!(e.contains("LISTEN_FDS"), "{e}");
        assert!(listen_fds_count(Some("42"), Some("100000"), 42).is_err());
    }

    /// Hands a duplicate of a real listener over by fd number, as systemd does.
    fn pass_fd(fd: RawFd) -> RawFd {
        // SAFETY: dup of a valid fd; the copy is handed to take_fds which owns it from then.
        let d = unsafe { libc::dup(fd) };
        assert!(d >= 0);
        // dup'd fds do not inherit FD_CLOEXEC: like systemd's.
        d
    }

    #[test]
    fn takes_an_inherited_unix_listener_and_serves_on_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("serve.sock");
        let orig = UnixListener::bind(&path).unwrap();
        let fd = pass_fd(orig.as_raw_fd());
        drop(orig);

        let mut got = unsafe { take_fds(fd, 1) }.unwrap();
        assert_eq!(got.len(), 1);
        let Listener::Unix(l) = got.remove(0) else {
            panic!("expected a unix listener")
        };
        let flags = unsafe { libc::fcntl(l.as_raw_fd(), libc::F_GETFD) };
        assert_ne!(
            flags & libc::FD_CLOEXEC,
            0,
            "inherited fd must become close-on-exec"
        );

        let mut client = UnixStream::connect(&path).unwrap();
        client.write_all(b"NBDMAGIC").unwrap();
        let (mut conn, _) = l.accept().unwrap();
        let mut buf = [0u8; 8];
        conn.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"NBDMAGIC");
    }

    #[test]
    fn takes_an_inherited_tcp_listener() {
        let orig = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = orig.local_addr().unwrap();
        let fd = pass_fd(orig.as_raw_fd());
        drop(orig);
        let mut got = unsafe { take_fds(fd, 1) }.unwrap();
        let Listener::Tcp(l) = got.remove(0) else {
            panic!("expected a tcp listener")
        };
        assert_eq!(l.local_addr().unwrap(), addr);
        let _c = std::net::TcpStream::connect(addr).unwrap();
        l.accept().unwrap();
    }

    #[test]
    fn refuses_what_is_not_a_listening_stream_socket() {
        let (a, _b) = UnixDatagram::pair().unwrap();
        let e = unsafe { take_fds(pass_fd(a.as_raw_fd()), 1) }.unwrap_err();
        assert!(e.contains("not a listening stream socket"), "{e}");

        let (s, _t) = UnixStream::pair().unwrap();
        let e = unsafe { take_fds(pass_fd(s.as_raw_fd()), 1) }.unwrap_err();
        assert!(e.contains("not a listening stream socket"), "{e}");

        let f = std::fs::File::open("/proc/self/status").unwrap();
        let e = unsafe { take_fds(pass_fd(f.as_raw_fd()), 1) }.unwrap_err();
        assert!(e.contains("not a socket"), "{e}");
    }
}
