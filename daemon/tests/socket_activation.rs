//! `rados-nbd serve` on a listening socket inherited the way systemd passes it
//! (rados-nbd-serve@.socket): LISTEN_PID = the server's pid, LISTEN_FDS = 1, the socket at fd 3.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_rados-nbd");

fn rados_nbd(dir: &Path) -> Command {
    let mut c = Command::new(BIN);
    c.arg("--store")
        .arg(format!("dir:{}", dir.join("store").display()))
        .env("RADOS_NBD_CONFIG", dir.join("no-such.conf"))
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDS");
    c
}

fn create(dir: &Path) {
    let o = rados_nbd(dir)
        .args(["create", "--size", "4M", "rbd/sa"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn serve_answers_on_the_socket_systemd_passes() {
    let dir = tempfile::tempdir().unwrap();
    create(dir.path());
    let sock = dir.path().join("serve.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let fd = listener.as_raw_fd();

    // LISTEN_PID must be the server's own pid, known only once it runs: let a shell export
    // its pid ($$) and exec the server in its place, as systemd does after fork.
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(r#"export LISTEN_PID=$$ LISTEN_FDS=1; exec "$0" "$@""#)
        .arg(BIN)
        .arg("--store")
        .arg(format!("dir:{}", dir.path().join("store").display()))
        .args(["serve", "rbd/sa"])
        .env("RADOS_NBD_CONFIG", dir.path().join("no-such.conf"))
        .stderr(Stdio::piped());
    // SAFETY: dup2/fcntl are async-signal-safe; fd is a valid listening socket of ours.
    unsafe {
        cmd.pre_exec(move || {
            if fd != 3 && libc::dup2(fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Inherited across exec: clear close-on-exec (dup2 onto itself would not).
            if libc::fcntl(3, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().unwrap();
    drop(listener); // the server holds its own copy now

    let mut c = UnixStream::connect(&sock).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut hello = [0u8; 16];
    let got = c.read_exact(&mut hello);
    // Stop it before asserting, so a failure leaves nothing running.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    got.unwrap_or_else(|e| panic!("no NBD greeting on the inherited socket: {e}; log: {log}"));
    assert_eq!(&hello, b"NBDMAGICIHAVEOPT", "newstyle greeting; log: {log}");
    assert!(out.status.success(), "clean exit on SIGTERM: {log}");
    assert!(log.contains("from systemd"), "{log}");
    assert!(
        sock.exists(),
        "the socket belongs to systemd and must not be removed"
    );
}

/// `serve` without --socket or --listen, given these socket activation variables and no
/// inherited socket; it must fail: its stderr.
fn serve_failing_with(listen_pid: &str, listen_fds: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    create(dir.path());
    let o = rados_nbd(dir.path())
        .args(["serve", "rbd/sa"])
        .env("LISTEN_PID", listen_pid)
        .env("LISTEN_FDS", listen_fds)
        .output()
        .unwrap();
    assert!(!o.status.success());
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn sockets_meant_for_another_process_are_not_taken() {
    // pid 1 is never us: the variables were inherited from a parent.
    let err = serve_failing_with("1", "1");
    assert!(err.contains("--socket PATH or --listen"), "{err}");
}

#[test]
fn malformed_socket_activation_variables_are_an_error() {
    let err = serve_failing_with("not-a-pid", "1");
    assert!(err.contains("LISTEN_PID"), "{err}");
}
