//! systemd readiness notification (the `sd_notify` protocol) without libsystemd.
//!
//! Under `Type=notify` systemd passes `NOTIFY_SOCKET`: a unix datagram socket, either a path or,
//! when it starts with '@', a name in the abstract namespace. Each datagram holds newline
//! separated `KEY=VALUE` assignments (`READY=1`, `STOPPING=1`, `STATUS=...`). Outside systemd
//! the variable is unset and every call is a no-op, so callers need not care where they run.
//!
//! Why not the `sd-notify` crate: it connects to `NOTIFY_SOCKET` as a path only, so an
//! abstract-namespace socket (`@...`, as containers and test harnesses pass) fails; an empty
//! variable is an error there rather than "not under systemd"; and its errors do not name
//! the socket, which the log line of a failed notification needs. The protocol is one
//! datagram, so the few lines below cost less than working around those.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// Sends `state` to the socket named by `NOTIFY_SOCKET`. `Ok(false)`: not started by systemd
/// (or an empty variable), nothing sent. An error names the socket; the caller should log it
/// and go on, since a failed notification must not take the device down.
pub fn notify(state: &str) -> io::Result<bool> {
    match std::env::var_os("NOTIFY_SOCKET") {
        Some(s) if !s.is_empty() => send_to(&s, state).map(|()| true),
        _ => Ok(false),
    }
}

/// `READY=1`: the device is mapped and usable. Call once, after the kernel accepted the
/// connection and the device answers I/O, never before.
pub fn ready(status: &str) -> io::Result<bool> {
    notify(&format!("READY=1\nSTATUS={}", one_line(status)))
}

/// `STOPPING=1`: a clean shutdown (unmap / SIGTERM) has begun.
pub fn stopping(status: &str) -> io::Result<bool> {
    notify(&format!("STOPPING=1\nSTATUS={}", one_line(status)))
}

/// Free-form status line shown by `systemctl status`.
pub fn status(status: &str) -> io::Result<bool> {
    notify(&format!("STATUS={}", one_line(status)))
}

/// A newline would start a new assignment in the datagram.
fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

fn socket_addr(socket: &OsStr) -> io::Result<SocketAddr> {
    let bytes = socket.as_bytes();
    match bytes.first() {
        Some(b'@') => abstract_addr(&bytes[1..]),
        Some(b'/') => SocketAddr::from_pathname(socket),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "NOTIFY_SOCKET={} is neither an absolute path nor an abstract name (@...)",
                socket.to_string_lossy()
            ),
        )),
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn abstract_addr(name: &[u8]) -> io::Result<SocketAddr> {
    #[cfg(target_os = "android")]
    use std::os::android::net::SocketAddrExt;
    #[cfg(target_os = "linux")]
    use std::os::linux::net::SocketAddrExt;
    SocketAddr::from_abstract_name(name)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn abstract_addr(_name: &[u8]) -> io::Result<SocketAddr> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "abstract unix sockets exist only on Linux",
    ))
}

/// Sends one datagram holding `state` to `socket` (a `NOTIFY_SOCKET` value).
pub fn send_to(socket: &OsStr, state: &str) -> io::Result<()> {
    let name = socket.to_string_lossy();
    let addr = socket_addr(socket)?;
    let sock = UnixDatagram::unbound()
        .map_err(|e| io::Error::new(e.kind(), format!("notify socket {name}: {e}")))?;
    let sent = sock
        .send_to_addr(state.as_bytes(), &addr)
        .map_err(|e| io::Error::new(e.kind(), format!("notifying systemd at {name}: {e}")))?;
    if sent != state.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            format!(
                "notifying systemd at {name}: short datagram ({sent} of {} bytes)",
                state.len()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;
    use std::time::Duration;

    fn recv(sock: &UnixDatagram) -> String {
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 4096];
        let n = sock.recv(&mut buf).expect("no datagram arrived");
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn sends_to_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let server = UnixDatagram::bind(&path).unwrap();
        send_to(
            path.as_os_str(),
            "READY=1\nSTATUS=mapped rbd/vm1 at /dev/nbd0",
        )
        .unwrap();
        assert_eq!(recv(&server), "READY=1\nSTATUS=mapped rbd/vm1 at /dev/nbd0");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn sends_to_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("rados-nbd-notify-test-{}", std::process::id());
        let server =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
                .unwrap();
        send_to(&OsString::from(format!("@{name}")), "STOPPING=1").unwrap();
        assert_eq!(recv(&server), "STOPPING=1");
    }

    #[test]
    fn rejects_relative_and_empty_names() {
        for bad in ["relative/notify.sock", ""] {
            let err = send_to(OsStr::new(bad), "READY=1").unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{bad:?}");
            assert!(err.to_string().contains("NOTIFY_SOCKET"), "{err}");
        }
    }

    #[test]
    fn a_missing_socket_is_an_error_naming_it() {
        let err = send_to(OsStr::new("/nonexistent/rados-nbd/notify"), "READY=1").unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/rados-nbd/notify"),
            "{err}"
        );
    }

    #[test]
    fn status_text_cannot_inject_assignments() {
        assert_eq!(one_line("a\nREADY=1\r"), "a READY=1 ");
    }
}
