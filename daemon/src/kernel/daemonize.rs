//! Starting the serving daemon: paths made absolute before it leaves the working
//! directory, its log file, its pid file, and the background start (re-exec in a new
//! session, readiness reported on a pipe).

use super::cli::{KernelCommand, ServeOpts};
use crate::error::{Error, ErrorKind, Result};
use crate::store::StoreUri;
use std::io::{BufRead, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

/// `p` as an absolute path naming the same file from any working directory. Leading `..`
/// are resolved against the working directory, which getcwd() names without symlinks, so
/// the result does not go through the directory `map` ran in (`dir:../images` must still
/// work once that directory's file system is unmounted); later `..` are kept, as they may
/// follow a symlink.
pub(super) fn absolute(p: &Path) -> Result<PathBuf> {
    use std::path::Component;
    if p.is_absolute() {
        return Ok(p.to_path_buf());
    }
    let mut base = std::env::current_dir()
        .map_err(|e| Error::io(format!("making {} absolute", p.display()), e))?;
    let mut rest = p.components().peekable();
    while let Some(c) = rest.peek() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                base.pop();
            }
            _ => break,
        }
        rest.next();
    }
    let rest: PathBuf = rest.collect();
    if rest.as_os_str().is_empty() {
        return Ok(base);
    }
    Ok(base.join(rest))
}

pub(super) fn absolute_store(store: &StoreUri) -> Result<StoreUri> {
    Ok(match store {
        StoreUri::Dir(p) => StoreUri::Dir(absolute(p)?),
        StoreUri::Ceph { conf } => StoreUri::Ceph {
            conf: conf.as_deref().map(absolute).transpose()?,
        },
    })
}

/// Environment variables holding paths the daemon (or librados) reads after startup.
const PATH_VARIABLES: [&str; 4] = [
    "RADOS_NBD_CONFIG",
    "RADOS_NBD_RUN_DIR",
    "RADOS_NBD_MODULES_ROOT",
    "CEPH_CONF",
];

/// The background daemon moves to `/` like any daemon: left in the directory `map` ran in,
/// it would keep that file system busy (its umount would fail for as long as the device is
/// mapped). Every relative path it still needs is made absolute first. Runs before any
/// thread exists (the environment is changed).
pub(super) fn leave_working_dir(opts: &mut ServeOpts) -> Result<()> {
    for p in [
        &mut opts.pid_file,
        &mut opts.log_file,
        &mut opts.quiesce_hook,
    ]
    .into_iter()
    .flatten()
    {
        *p = absolute(p)?;
    }
    for var in PATH_VARIABLES {
        if let Some(v) = std::env::var_os(var).filter(|v| !v.is_empty()) {
            let p = PathBuf::from(&v);
            if p.is_relative() {
                std::env::set_var(var, absolute(&p)?);
            }
        }
    }
    std::env::set_current_dir("/").map_err(|e| Error::io("changing directory to /", e))
}

/// The terminal's stderr while a foreground daemon logs to its --log-file.
static TERMINAL_STDERR: std::sync::OnceLock<OwnedFd> = std::sync::OnceLock::new();

/// `map --foreground --log-file PATH` (and `attach`): the log goes to PATH, as it does in the
/// background. Called before the logger is set up, so it sees a file and writes no colours.
/// Only stderr moves: stdout still gets the device name, and the final error line goes to the
/// terminal again ([`restore_terminal_stderr`]).
pub fn log_to_file(cmd: &KernelCommand) -> Result<()> {
    let Some(opts) = cmd.serve_opts() else {
        return Ok(());
    };
    // Without --foreground the re-executed daemon gets the file as stdout and stderr from
    // `map` itself; the parent keeps the terminal for its own messages.
    let (true, None, Some(path)) = (opts.foreground, opts.ready_fd, &opts.log_file) else {
        return Ok(());
    };
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| Error::io(format!("opening log file {}", path.display()), e))?;
    // SAFETY: dup/dup2 on descriptors we own or that are standard ones; no memory is passed.
    unsafe {
        let saved = libc::fcntl(2, libc::F_DUPFD_CLOEXEC, 3);
        if saved >= 0 {
            let _ = TERMINAL_STDERR.set(OwnedFd::from_raw_fd(saved));
        }
        if libc::dup2(f.as_raw_fd(), 2) < 0 {
            return Err(Error::io(
                format!("redirecting stderr to {}", path.display()),
                std::io::Error::last_os_error(),
            ));
        }
    }
    Ok(())
}

/// Points stderr back at the terminal once serving is over.
pub(super) fn restore_terminal_stderr() {
    if let Some(fd) = TERMINAL_STDERR.get() {
        // SAFETY: dup2 of a descriptor we own onto stderr.
        unsafe { libc::dup2(fd.as_raw_fd(), 2) };
    }
}

/// Removes the pid file when serving ends, however it ends, but only while it still holds
/// our pid: a failed second `map` given the same --pid-file must not delete the running
/// daemon's.
pub(super) struct PidFileGuard<'a>(pub(super) Option<&'a Path>);

impl Drop for PidFileGuard<'_> {
    fn drop(&mut self) {
        let Some(p) = self.0 else { return };
        let ours = std::fs::read_to_string(p)
            .is_ok_and(|s| s.trim().parse::<u32>().ok() == Some(std::process::id()));
        if ours {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// The child's end of the readiness pipe.
pub(super) struct ReadyPipe(std::fs::File);

impl ReadyPipe {
    pub(super) fn from_fd(fd: i32) -> Result<Self> {
        // SAFETY: F_GETFD only inspects the descriptor number.
        if fd < 3 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("--ready-fd {fd} is not an open descriptor"),
            ));
        }
        // SAFETY: the parent passed us this descriptor to own; nothing else uses it.
        let f = unsafe { std::fs::File::from_raw_fd(fd) };
        // SAFETY: setting FD_CLOEXEC on a descriptor we own.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        Ok(ReadyPipe(f))
    }
    pub(super) fn send(mut self, line: &str) {
        let one_line = line.replace('\n', " ");
        let _ = writeln!(self.0, "{one_line}");
    }
}

/// Starts `argv + --foreground --ready-fd N` in a new session and relays its verdict.
pub(super) fn spawn_background(opts: &ServeOpts) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 writes two descriptors into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(Error::io(
            "creating the readiness pipe",
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: both descriptors are fresh and owned here.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let wr_fd = wr.as_raw_fd();

    // Our own binary by path (not /proc/self/exe) so the child's name is "rados-nbd".
    let exe = std::env::current_exe()
        .ok()
        .filter(|p| p.exists())
        .unwrap_or_else(|| "/proc/self/exe".into());
    let mut cmd = std::process::Command::new(&exe);
    cmd.args(std::env::args_os().skip(1))
        .arg("--foreground")
        .arg("--ready-fd")
        .arg(wr_fd.to_string())
        .stdin(std::process::Stdio::null());
    // The child's stdout/stderr must not be ours: `dev=$(rados-nbd map x)` would wait for
    // the daemon to exit. The log file (or syslog, set up by the child) gets them.
    match &opts.log_file {
        Some(p) => {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| Error::io(format!("opening log file {}", p.display()), e))?;
            let f2 = f
                .try_clone()
                .map_err(|e| Error::io(format!("duplicating log file {}", p.display()), e))?;
            cmd.stdout(f).stderr(f2);
        }
        None => {
            cmd.stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null());
        }
    }
    // SAFETY: between fork and exec we only call async-signal-safe functions (setsid, fcntl).
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::fcntl(wr_fd, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| Error::io(format!("starting the daemon {}", exe.display()), e))?;
    drop(wr); // EOF for us once the child closes (or dies)

    let mut line = String::new();
    let mut r = std::io::BufReader::new(std::fs::File::from(rd));
    let _ = r.read_line(&mut line);
    let line = line.trim_end();
    if let Some(dev) = line.strip_prefix("ready ") {
        println!("{dev}");
        return Ok(());
    }
    if let Some(msg) = line.strip_prefix("error ") {
        let _ = child.wait();
        return Err(Error::new(ErrorKind::Io, msg.to_string()));
    }
    let status = child
        .wait()
        .map(|s| s.to_string())
        .unwrap_or_else(|e| e.to_string());
    Err(Error::new(
        ErrorKind::Io,
        format!(
            "the daemon exited during startup ({status}){}",
            match &opts.log_file {
                Some(p) => format!("; see {}", p.display()),
                None => "; see syslog".to_string(),
            }
        ),
    ))
}

/// Background daemon without a log file: stdout/stderr lines go to syslog.
pub(super) fn forward_output_to_syslog() {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 writes two descriptors into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return;
    }
    // SAFETY: dup2 onto stdout/stderr, then close the spare write end.
    unsafe {
        libc::dup2(fds[1], 1);
        libc::dup2(fds[1], 2);
        libc::close(fds[1]);
        libc::openlog(c"rados-nbd".as_ptr(), libc::LOG_PID, libc::LOG_DAEMON);
    }
    // SAFETY: fds[0] is ours.
    let rd = unsafe { std::fs::File::from_raw_fd(fds[0]) };
    std::thread::Builder::new()
        .name("syslog".into())
        .spawn(move || {
            for line in std::io::BufReader::new(rd).lines() {
                let Ok(line) = line else { break };
                let level = if line.contains("ERROR") {
                    libc::LOG_ERR
                } else if line.contains("WARN") {
                    libc::LOG_WARNING
                } else {
                    libc::LOG_INFO
                };
                if let Ok(c) = std::ffi::CString::new(line.replace('\0', " ")) {
                    // SAFETY: constant format string and a valid C string argument.
                    unsafe { libc::syslog(level, c"%s".as_ptr(), c.as_ptr()) };
                }
            }
        })
        .ok();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_paths_are_made_absolute() {
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(
            absolute_store(&StoreUri::Dir("images/a".into())).unwrap(),
            StoreUri::Dir(cwd.join("images/a"))
        );
        assert_eq!(
            absolute_store(&StoreUri::Dir("/srv/x".into())).unwrap(),
            StoreUri::Dir("/srv/x".into())
        );
        assert_eq!(
            absolute_store(&StoreUri::Ceph {
                conf: Some("c.conf".into())
            })
            .unwrap(),
            StoreUri::Ceph {
                conf: Some(cwd.join("c.conf"))
            }
        );
        assert_eq!(
            absolute_store(&StoreUri::Ceph { conf: None }).unwrap(),
            StoreUri::Ceph { conf: None }
        );
        let up = cwd.parent().unwrap_or(&cwd);
        assert_eq!(absolute(Path::new("../x")).unwrap(), up.join("x"));
        assert_eq!(absolute(Path::new("./../x/y")).unwrap(), up.join("x/y"));
        assert_eq!(absolute(Path::new("..")).unwrap(), up);
        assert_eq!(absolute(Path::new(".")).unwrap(), cwd);
        // A `..` after a name may follow a symlink: kept for the kernel to resolve.
        assert_eq!(absolute(Path::new("a/../b")).unwrap(), cwd.join("a/../b"));
        assert_eq!(
            absolute(Path::new("/r/../s")).unwrap(),
            Path::new("/r/../s")
        );
        // Recorded as `dir:/abs/path` in state files and the backend identifier.
        let s = absolute_store(&StoreUri::Dir("st".into()))
            .unwrap()
            .to_string();
        assert_eq!(s, format!("dir:{}", cwd.join("st").display()));
    }

    #[test]
    fn pid_file_is_removed_only_while_it_is_ours() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pid");
        std::fs::write(&p, format!("{}\n", std::process::id())).unwrap();
        drop(PidFileGuard(Some(&p)));
        assert!(!p.exists());
        // Another daemon's pid file (a second map given the same path failed) stays.
        std::fs::write(&p, "1\n").unwrap();
        drop(PidFileGuard(Some(&p)));
        assert!(p.exists());
        // Never written (serving failed before readiness): nothing to do, no panic.
        drop(PidFileGuard(Some(&dir.path().join("none"))));
        drop(PidFileGuard(None));
    }
}
