//! Kernel attach: `map`, `unmap`, `list-mapped`, `attach`, `detach` (Linux only).
//!
//! How a mapping works: the daemon opens the image, makes one socketpair per connection,
//! serves one end of each with the transmission-phase server (no handshake) and hands the
//! other ends to the nbd driver with a netlink CONNECT (ioctls when the kernel lacks the
//! netlink family). `map` without `--foreground` re-executes this binary as
//! `map ... --foreground --ready-fd N` in a new session and waits for the child to report
//! "ready /dev/nbdX" on that pipe: no process with a tokio runtime is ever forked.
//!
//! Ending a mapping: `unmap` (or SIGTERM/SIGINT to the daemon, or a kernel-side disconnect
//! such as `nbd-client -d`) makes the kernel send NBD_CMD_DISC on every socket; the server
//! drains, the daemon closes the image cleanly (flush, object map, dirty flag, lock),
//! records how that close ended next to its state file and exits; `unmap` returns when that
//! pid is gone, and fails when the recorded close failed. Disconnect first, close second is
//! the safe order (rbd-nbd's too): only once the kernel sends nothing more can the flush and
//! the object map be the last word on the image. `detach` (SIGUSR1 to the daemon) does the
//! same drain and clean close but leaves the device configured; `attach` serves it again
//! through netlink RECONFIGURE within the kernel's dead-connection timeout.

pub mod cli;
pub mod device;
pub mod export;
pub mod ioctl;
pub mod netlink;

use crate::error::{Error, ErrorKind, Result};
use crate::spec::ImageSpec;
use crate::store::{CephAccess, StoreUri};
use cli::{
    AttachArgs, DetachArgs, KernelCommand, ListFormat, ListMappedArgs, MapArgs, ServeOpts,
    UnmapArgs,
};
use device::DeviceState;
use export::Export;
use std::io::{BufRead, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Block size given to the kernel: 512 like rbd-nbd, so any file system or partition
/// table made elsewhere on the image still works.
const BLOCK_SIZE: u64 = 512;
const MAX_CONNECTIONS: u32 = 16;

/// Runs one kernel command. Synchronous on purpose: the serving daemon builds its own tokio
/// runtime after the (single-threaded) setup, so call this outside any runtime.
/// `store` is the resolved `--store` (recorded as `dir:/var/lib/rados-nbd`, ...).
pub fn run(cmd: KernelCommand, store: &StoreUri, mut ceph: CephAccess) -> Result<()> {
    // Paths as given are relative to the directory `map` ran in, which the background daemon
    // leaves (it must not pin that file system); recorded absolute, the store also reads the
    // same in list-mapped and in the backend identifier whatever directory a command ran in.
    ceph.keyring = ceph.keyring.map(|p| absolute(&p)).transpose()?;
    let store = &absolute_store(store)?.to_string();
    match cmd {
        KernelCommand::Map(a) => map(a, store, &ceph),
        KernelCommand::Unmap(a) => unmap(a),
        KernelCommand::ListMapped(a) => list_mapped(a),
        KernelCommand::Attach(a) => attach(a, store, &ceph),
        KernelCommand::Detach(a) => detach(a),
    }
}

// ---------------------------------------------------------------------------------------
// Paths, working directory, log file

/// `p` as an absolute path naming the same file from any working directory. Leading `..`
/// are resolved against the working directory, which getcwd() names without symlinks, so
/// the result does not go through the directory `map` ran in (`dir:../images` must still
/// work once that directory's file system is unmounted); later `..` are kept, as they may
/// follow a symlink.
fn absolute(p: &Path) -> Result<PathBuf> {
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

fn absolute_store(store: &StoreUri) -> Result<StoreUri> {
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
fn leave_working_dir(opts: &mut ServeOpts) -> Result<()> {
    for p in [&mut opts.pid_file, &mut opts.log_file]
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
fn restore_terminal_stderr() {
    if let Some(fd) = TERMINAL_STDERR.get() {
        // SAFETY: dup2 of a descriptor we own onto stderr.
        unsafe { libc::dup2(fd.as_raw_fd(), 2) };
    }
}

/// Removes the pid file when serving ends, however it ends, but only while it still holds
/// our pid: a failed second `map` given the same --pid-file must not delete the running
/// daemon's.
struct PidFileGuard<'a>(Option<&'a Path>);

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

// ---------------------------------------------------------------------------------------
// Background start: re-exec and readiness pipe

/// The child's end of the readiness pipe.
struct ReadyPipe(std::fs::File);

impl ReadyPipe {
    fn from_fd(fd: i32) -> Result<Self> {
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
    fn send(mut self, line: &str) {
        let one_line = line.replace('\n', " ");
        let _ = writeln!(self.0, "{one_line}");
    }
}

/// Starts `argv + --foreground --ready-fd N` in a new session and relays its verdict.
fn spawn_background(opts: &ServeOpts) -> Result<()> {
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
fn forward_output_to_syslog() {
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

// ---------------------------------------------------------------------------------------
// The serving daemon

enum Mode {
    Map {
        index: Option<u32>,
        nbds_max: Option<u32>,
        max_part: Option<u32>,
    },
    Attach {
        index: u32,
    },
}

/// Identifies a mapping to the kernel (NBD_ATTR_BACKEND_IDENTIFIER); RECONFIGURE must
/// present the same string, so the kernel itself refuses to re-attach another image.
fn backend_id(store: &str, spec: &ImageSpec) -> String {
    format!("rados-nbd {store} {spec}")
}

fn map(a: MapArgs, store: &str, ceph: &CephAccess) -> Result<()> {
    let index = a.device.as_deref().map(device::parse_device).transpose()?;
    let mode = Mode::Map {
        index,
        nbds_max: a.nbds_max,
        max_part: a.max_part,
    };
    start(mode, &a.image, a.opts, store, ceph)
}

fn attach(a: AttachArgs, store: &str, ceph: &CephAccess) -> Result<()> {
    let index = device::parse_device(&a.device)?;
    start(Mode::Attach { index }, &a.image, a.opts, store, ceph)
}

fn start(
    mode: Mode,
    image: &str,
    mut opts: ServeOpts,
    store: &str,
    ceph: &CephAccess,
) -> Result<()> {
    let spec: ImageSpec = image.parse()?;
    if opts.connections == 0 || opts.connections > MAX_CONNECTIONS {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!(
                "--connections must be 1..={MAX_CONNECTIONS}, not {}",
                opts.connections
            ),
        ));
    }
    if !opts.foreground {
        return spawn_background(&opts);
    }
    let mut ready = opts.ready_fd.map(ReadyPipe::from_fd).transpose()?;
    let background = ready.is_some();
    let res = if background {
        leave_working_dir(&mut opts)
    } else {
        Ok(())
    }
    .and_then(|()| {
        if background && opts.log_file.is_none() {
            forward_output_to_syslog();
        }
        serve(mode, spec, &opts, store, ceph, &mut ready)
    });
    if let Err(e) = &res {
        tracing::error!("{e}");
        if let Some(r) = ready.take() {
            r.send(&format!("error {e}"));
        }
    }
    restore_terminal_stderr();
    res
}

/// How the serving ended.
enum Ending {
    /// The kernel disconnected (unmap, SIGTERM, nbd-client -d, or the sockets died).
    Disconnected,
    /// `detach`: the device stays configured for `attach`.
    Detached,
}

fn set_process_name() {
    // The kernel names us after the exec'd path; `unmap` recognises its daemon by this name.
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
    unsafe {
        libc::prctl(
            libc::PR_SET_NAME,
            c"rados-nbd".as_ptr() as libc::c_ulong,
            0,
            0,
            0,
        )
    };
}

/// Sets up the device and serves it until it ends. Errors before readiness are reported to
/// the waiting `map` through `ready` by the caller.
fn serve(
    mode: Mode,
    spec: ImageSpec,
    opts: &ServeOpts,
    store: &str,
    ceph: &CephAccess,
    ready: &mut Option<ReadyPipe>,
) -> Result<()> {
    set_process_name();
    let _pid_file = PidFileGuard(opts.pid_file.as_deref());
    let mut read_only = opts.read_only || spec.snap.is_some();
    let mut connections = opts.connections;
    match &mode {
        Mode::Map {
            nbds_max, max_part, ..
        } => device::load_module(*nbds_max, *max_part)?,
        Mode::Attach { .. } if !device::module_loaded() => {
            return Err(Error::new(
                ErrorKind::NotFound,
                "the nbd module is not loaded, so there is no device to attach to",
            ))
        }
        Mode::Attach { .. } => {}
    }
    let nl = open_netlink()?;
    // A map of an image whose device the kernel still holds for a daemon that died (a
    // crash, then a restart by systemd) re-attaches that device: its mounts survive.
    let mode = match mode {
        Mode::Map { index, .. } if nl.is_some() => match orphaned_device(store, &spec, index)? {
            Some(i) => {
                tracing::warn!(
                    "{spec}: /dev/nbd{i} is still held by the kernel for a daemon that is gone; re-attaching it"
                );
                Mode::Attach { index: i }
            }
            None => mode,
        },
        m => m,
    };
    if let Mode::Attach { index } = mode {
        let path = device::device_path(index);
        if nl.is_none() {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "attach needs the kernel's nbd netlink interface, which this kernel lacks",
            ));
        }
        if device::device_pid(index).is_none() {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("{path} is not connected, so there is nothing to attach to (use map)"),
            ));
        }
        if let Some(st) = device::read_state(index)? {
            if !st.detached && device::daemon_alive(st.pid) {
                return Err(Error::new(
                    ErrorKind::Busy,
                    format!("{path} is still served by pid {}; detach it first", st.pid),
                ));
            }
            connections = st.connections;
            read_only |= st.read_only;
        }
        let want = backend_id(store, &spec);
        if let Some(have) = device::device_backend(index) {
            if have != want {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    format!("{path} was mapped from \"{have}\", not \"{want}\""),
                ));
            }
        }
    }
    for w in device::harden_process() {
        tracing::warn!("{w}");
    }
    // Under mlockall(MCL_FUTURE) every thread stack is resident, so the blocking pool
    // (tokio's default allows 512 threads of 2 MiB) is bounded to keep locked memory modest.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("rados-nbd-io")
        .max_blocking_threads(64)
        .build()
        .map_err(|e| Error::io("starting the async runtime", e))?;
    // Signals before the image is opened: a SIGTERM from now on ends in a clean close.
    let signals = {
        let _g = rt.enter();
        Signals {
            term: signal(tokio::signal::unix::SignalKind::terminate())?,
            int: signal(tokio::signal::unix::SignalKind::interrupt())?,
            usr1: signal(tokio::signal::unix::SignalKind::user_defined1())?,
        }
    };
    let export = Arc::new(
        rt.block_on(Export::open(
            store,
            ceph,
            &spec,
            read_only,
            opts.exclusive,
            opts.checkpoint_idle,
        ))
        .map_err(|e| e.context(format!("opening {spec}")))?,
    );
    let setup = Setup {
        rt: &rt,
        export: export.clone(),
        spec: &spec,
        opts,
        store,
        read_only,
        connections,
    };
    let outcome = setup.run(mode, nl, signals, ready);
    // Whatever happened, close the image cleanly: flush, object map, dirty flag, lock. The
    // error names the image and the step that failed.
    let closed = rt.block_on(export.close());
    let (index, ending) = match outcome {
        Ok(o) => o,
        Err(e) => {
            // Serving failed (reported by the caller); a failed close must not go unsaid.
            if let Err(c) = &closed {
                tracing::error!("{c}");
            }
            return Err(e);
        }
    };
    let finished = match ending {
        Ending::Detached => {
            // Only now (the lock is released) may `attach` start.
            let marked = device::read_state(index).and_then(|st| match st {
                Some(mut st) => {
                    st.pid = 0;
                    st.detached = true;
                    device::write_state(index, &st)
                }
                None => Ok(()),
            });
            if closed.is_ok() {
                tracing::info!(
                    "{spec}: detached from /dev/nbd{index}; the kernel keeps the device"
                );
            }
            closed.and(marked)
        }
        Ending::Disconnected => {
            device::remove_state(index);
            if closed.is_ok() {
                tracing::info!("{spec}: /dev/nbd{index} disconnected, image closed");
            }
            closed
        }
    };
    // The `unmap` or `detach` waiting for this process to exit learns the outcome here;
    // written before the exit, so it is there once the pid is gone.
    let result = device::CloseResult {
        pid: std::process::id(),
        device: device::device_path(index),
        image: spec.to_string(),
        error: finished
            .as_ref()
            .err()
            .map(|e| e.to_string().replace('\n', " ")),
    };
    if let Err(e) = device::write_close_result(index, &result) {
        tracing::error!("recording the outcome of the close: {e}");
    }
    finished
}

struct Setup<'a> {
    rt: &'a tokio::runtime::Runtime,
    export: Arc<Export>,
    spec: &'a ImageSpec,
    opts: &'a ServeOpts,
    store: &'a str,
    read_only: bool,
    connections: u32,
}

struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    /// `detach`.
    usr1: tokio::signal::unix::Signal,
}

/// How the kernel was told about the device, and how to tell it to let go.
enum Control {
    Netlink(netlink::NbdNetlink),
    Ioctl(Arc<ioctl::IoctlDevice>, std::thread::JoinHandle<Result<()>>),
}

const NBD_FLAG_CAN_MULTI_CONN: u64 = 1 << 8;

impl Setup<'_> {
    fn run(
        &self,
        mode: Mode,
        nl: Option<netlink::NbdNetlink>,
        mut sig: Signals,
        ready: &mut Option<ReadyPipe>,
    ) -> Result<(u32, Ending)> {
        let attaching = matches!(mode, Mode::Attach { .. });
        let info = self.export.info();
        let flags = u64::from(self.export.transmission_flags());
        if self.connections > 1 && flags & NBD_FLAG_CAN_MULTI_CONN == 0 {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "--connections {} needs an image that is safe to serve on several connections, and {} is not",
                    self.connections, self.spec
                ),
            ));
        }
        #[allow(clippy::manual_is_multiple_of)] // MSRV 1.80
        if info.size % BLOCK_SIZE != 0 {
            tracing::warn!(
                "{}: size {} is not a multiple of {BLOCK_SIZE}; the device ignores the last {} bytes",
                self.spec,
                info.size,
                info.size % BLOCK_SIZE
            );
        }
        let _enter = self.rt.enter();
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut tasks = tokio::task::JoinSet::new();
        let mut kernel_ends = Vec::new();
        for i in 0..self.connections {
            let (k, s) = std::os::unix::net::UnixStream::pair()
                .map_err(|e| Error::io("creating a socket pair for the kernel", e))?;
            s.set_nonblocking(true)
                .map_err(|e| Error::io("setting a socket non-blocking", e))?;
            let s = tokio::net::UnixStream::from_std(s)
                .map_err(|e| Error::io("registering a socket with the runtime", e))?;
            let ex = self.export.clone();
            let rx = stop_rx.clone();
            tasks.spawn(async move { (i, ex.serve(s, rx).await) });
            kernel_ends.push(k);
        }

        let fds: Vec<i32> = kernel_ends.iter().map(|k| k.as_raw_fd()).collect();
        let backend = backend_id(self.store, self.spec);
        let (index, mut control) = match (mode, nl) {
            (Mode::Map { index, .. }, Some(mut nl)) => {
                let cfg = netlink::DeviceConfig {
                    index,
                    size_bytes: Some(info.size),
                    block_size: Some(BLOCK_SIZE),
                    server_flags: Some(flags),
                    client_flags: None,
                    timeout: self.opts.io_timeout,
                    dead_conn_timeout: Some(self.opts.reattach_timeout),
                    backend: Some(backend.clone()),
                    sockets: fds,
                };
                let idx = nl.connect(&cfg)?;
                (idx, Control::Netlink(nl))
            }
            (Mode::Attach { index }, Some(mut nl)) => {
                // RECONFIGURE only replaces sockets the kernel has seen die; give it a moment
                // to notice the old daemon's sockets closing.
                std::thread::sleep(Duration::from_millis(200));
                let cfg = netlink::DeviceConfig {
                    index: Some(index),
                    size_bytes: Some(info.size),
                    timeout: self.opts.io_timeout,
                    dead_conn_timeout: Some(self.opts.reattach_timeout),
                    backend: Some(backend.clone()),
                    sockets: fds,
                    ..Default::default()
                };
                nl.reconfigure(&cfg)?;
                (index, Control::Netlink(nl))
            }
            (Mode::Map { index, .. }, None) => {
                let cfg = ioctl::IoctlConfig {
                    size_bytes: info.size,
                    block_size: BLOCK_SIZE,
                    server_flags: flags,
                    timeout: self.opts.io_timeout,
                    sockets: fds,
                };
                let (idx, dev) = ioctl_configure(index, &cfg)?;
                let dev = Arc::new(dev);
                let d2 = dev.clone();
                let th = std::thread::Builder::new()
                    .name(format!("nbd{idx}-do-it"))
                    .spawn(move || d2.do_it())
                    .map_err(|e| Error::io("starting the NBD_DO_IT thread", e))?;
                (idx, Control::Ioctl(dev, th))
            }
            (Mode::Attach { .. }, None) => {
                return Err(Error::new(ErrorKind::Unsupported, "attach needs netlink"))
            }
        };
        // The kernel holds its own references to its ends now.
        drop(kernel_ends);
        let path = device::device_path(index);
        let expected = info.size - info.size % BLOCK_SIZE;
        let attached =
            device::wait_ready(index, expected, Duration::from_secs(10)).and_then(|_| {
                // RECONFIGURE may silently ignore our sockets; a read proves they serve.
                if attaching {
                    probe_read(index, Duration::from_secs(10))
                } else {
                    Ok(())
                }
            });
        if let Err(e) = attached {
            let _ = request_disconnect(&mut control, index);
            let _ = stop_tx.send(true);
            self.rt
                .block_on(async { while tasks.join_next().await.is_some() {} });
            if let Control::Ioctl(_, th) = control {
                let _ = th.join();
            }
            return Err(e);
        }
        let state = DeviceState {
            pid: std::process::id(),
            pool: self.spec.pool.clone(),
            namespace: self.spec.namespace.clone(),
            image: self.spec.name.clone(),
            snap: self.spec.snap.clone(),
            device: path.clone(),
            store: self.store.to_string(),
            read_only: self.read_only,
            connections: self.connections,
            netlink: matches!(control, Control::Netlink(_)),
            detached: false,
            backend: matches!(control, Control::Netlink(_)).then_some(backend),
            close_result: true,
        };
        if let Err(e) = device::write_state(index, &state) {
            let _ = request_disconnect(&mut control, index);
            return Err(e);
        }
        if let Some(p) = &self.opts.pid_file {
            if let Err(e) = std::fs::write(p, format!("{}\n", std::process::id())) {
                tracing::warn!("writing pid file {}: {e}", p.display());
            }
        }
        tracing::info!(
            "{} {} {path} ({} bytes, {} connection(s), {})",
            self.spec,
            if attaching {
                "re-attached to"
            } else {
                "mapped to"
            },
            info.size,
            self.connections,
            if state.netlink { "netlink" } else { "ioctl" }
        );
        match ready.take() {
            Some(r) => r.send(&format!("ready {path}")),
            None => {
                println!("{path}");
                let _ = std::io::stdout().flush();
                // Under systemd (Type=notify) this is the moment the device is usable.
                if let Err(e) = crate::notify::ready(&format!("{} mapped at {path}", self.spec)) {
                    tracing::warn!("systemd notification: {e}");
                }
            }
        }

        let mut disconnecting = false;
        let mut detaching = false;
        let netlink = state.netlink;
        let mut sizes = self.export.size_changes();
        sizes.mark_unchanged();
        let mut resizable = true;
        self.rt.block_on(async {
            loop {
                tokio::select! {
                    // The image was resized (`rbd resize`, `rados-nbd resize`): the device
                    // follows, as with rbd-nbd, so the file system on it can be grown.
                    r = sizes.changed(), if resizable && !disconnecting && !detaching => {
                        if r.is_err() {
                            resizable = false;
                            continue;
                        }
                        let size = *sizes.borrow_and_update();
                        let blocks = size - size % BLOCK_SIZE;
                        match resize_device(&mut control, index, blocks, state.backend.as_deref()) {
                            Ok(()) => tracing::info!("{path}: size now {blocks} bytes"),
                            Err(e) => tracing::error!(
                                "{path}: the image is now {size} bytes but the device did not follow: {e}"
                            ),
                        }
                    }
                    r = tasks.join_next() => match r {
                        None => break,
                        Some(Ok((i, Ok(())))) => tracing::info!("{path}: connection {i} ended"),
                        Some(Ok((i, Err(e)))) => tracing::error!("{path}: connection {i} failed: {e}"),
                        Some(Err(e)) => tracing::error!("{path}: a connection task failed: {e}"),
                    },
                    _ = sig.term.recv(), if !disconnecting && !detaching => {
                        disconnecting = true;
                        tracing::info!("{path}: SIGTERM, disconnecting");
                        let _ = crate::notify::stopping(&format!("unmapping {path}"));
                        if let Err(e) = request_disconnect(&mut control, index) {
                            tracing::error!("{e}");
                            let _ = stop_tx.send(true);
                        }
                    }
                    _ = sig.int.recv(), if !disconnecting && !detaching => {
                        disconnecting = true;
                        tracing::info!("{path}: SIGINT, disconnecting");
                        let _ = crate::notify::stopping(&format!("unmapping {path}"));
                        if let Err(e) = request_disconnect(&mut control, index) {
                            tracing::error!("{e}");
                            let _ = stop_tx.send(true);
                        }
                    }
                    _ = sig.usr1.recv(), if !disconnecting && !detaching && netlink => {
                        detaching = true;
                        tracing::info!("{path}: detaching (the device stays configured)");
                        let _ = crate::notify::stopping(&format!("detaching from {path}"));
                        let _ = stop_tx.send(true);
                    }
                }
            }
        });
        match control {
            Control::Ioctl(_, th) => match th.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!("{e}"),
                Err(_) => tracing::error!("{path}: the NBD_DO_IT thread panicked"),
            },
            Control::Netlink(mut nl) if !detaching => {
                // The sockets are gone. If that was not a disconnect (the kernel is still
                // configured after a grace period), let go of the device rather than leave
                // it hanging on a daemon that no longer exists.
                let mut still = device::device_pid(index).is_some();
                for _ in 0..100 {
                    if !still {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                    still = device::device_pid(index).is_some();
                }
                if still {
                    tracing::warn!("{path}: connections ended without a disconnect; disconnecting");
                    if let Err(e) = nl.disconnect(index) {
                        tracing::error!("{e}");
                    }
                }
            }
            Control::Netlink(_) => {}
        }
        Ok((
            index,
            if detaching {
                Ending::Detached
            } else {
                Ending::Disconnected
            },
        ))
    }
}

/// The device (if any) this host mapped `spec` from `store` on, whose daemon is gone while
/// the kernel still keeps it configured with our backend identifier. With `want` set, only
/// that device qualifies.
fn orphaned_device(store: &str, spec: &ImageSpec, want: Option<u32>) -> Result<Option<u32>> {
    let id = backend_id(store, spec);
    for st in device::all_states() {
        let Ok(i) = st.index() else { continue };
        let same = st.store == store
            && st.pool == spec.pool
            && st.namespace == spec.namespace
            && st.image == spec.name
            && st.snap == spec.snap
            && st.netlink;
        if same
            && (want.is_none() || want == Some(i))
            && !device::daemon_alive(st.pid)
            && device::device_pid(i).is_some()
            && device::device_backend(i).as_deref() == Some(id.as_str())
        {
            return Ok(Some(i));
        }
    }
    Ok(None)
}

/// The netlink control socket, or None for the ioctl fallback: when the kernel has no `nbd`
/// family, or when `RADOS_NBD_FORCE_IOCTL=1` asks for it (to test the fallback).
fn open_netlink() -> Result<Option<netlink::NbdNetlink>> {
    if std::env::var_os("RADOS_NBD_FORCE_IOCTL").is_some_and(|v| v == "1") {
        return Ok(None);
    }
    netlink::NbdNetlink::open()
}

fn signal(kind: tokio::signal::unix::SignalKind) -> Result<tokio::signal::unix::Signal> {
    tokio::signal::unix::signal(kind).map_err(|e| Error::io("installing a signal handler", e))
}

fn resize_device(
    control: &mut Control,
    index: u32,
    size_bytes: u64,
    backend: Option<&str>,
) -> Result<()> {
    match control {
        // RECONFIGURE with a size (Linux 5.3 and later) resizes a running device. A device
        // connected with a backend identifier is only reconfigured by one who names it.
        Control::Netlink(nl) => nl.reconfigure(&netlink::DeviceConfig {
            index: Some(index),
            size_bytes: Some(size_bytes),
            backend: backend.map(str::to_string),
            ..Default::default()
        }),
        Control::Ioctl(dev, _) => dev.set_size(size_bytes),
    }
}

fn request_disconnect(control: &mut Control, index: u32) -> Result<()> {
    match control {
        Control::Netlink(nl) => nl.disconnect(index),
        Control::Ioctl(dev, _) => dev.disconnect(),
    }
}

/// The ioctl path: the named device, or the first free one that accepts our sockets.
fn ioctl_configure(
    index: Option<u32>,
    cfg: &ioctl::IoctlConfig,
) -> Result<(u32, ioctl::IoctlDevice)> {
    let candidates = match index {
        Some(i) => vec![i],
        None => device::free_devices(),
    };
    let mut last = None;
    for i in candidates {
        let dev = ioctl::IoctlDevice::open(&device::device_path(i))?;
        match dev.configure(cfg) {
            Ok(()) => return Ok((i, dev)),
            Err(e) if e.kind == ErrorKind::Busy && index.is_none() => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        Error::new(
            ErrorKind::Busy,
            "no free nbd device (load the module with a larger nbds_max)",
        )
    }))
}

/// Reads the first block of the device bypassing the page cache, with a deadline.
fn probe_read(index: u32, timeout: Duration) -> Result<()> {
    let path = device::device_path(index);
    let (tx, rx) = std::sync::mpsc::channel();
    let p2 = path.clone();
    std::thread::spawn(move || {
        let r = (|| -> std::io::Result<()> {
            use std::os::unix::fs::{FileExt, OpenOptionsExt};
            let f = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_DIRECT)
                .open(&p2)?;
            let mut buf = vec![0u8; 8192];
            let off = buf.as_ptr().align_offset(4096);
            f.read_exact_at(&mut buf[off..off + 4096], 0)
        })();
        let _ = tx.send(r);
    });
    match rx.recv_timeout(timeout) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(Error::io(format!("test read from {path}"), e)),
        Err(_) => Err(Error::new(
            ErrorKind::TimedOut,
            format!(
                "{path} did not answer a test read within {}s: the kernel did not take the new connections",
                timeout.as_secs()
            ),
        )),
    }
}
// ---------------------------------------------------------------------------------------
// unmap / detach / list-mapped

fn resolve(target: &str) -> Result<(u32, Option<DeviceState>)> {
    if device::looks_like_device(target) {
        let idx = device::parse_device(target)?;
        return Ok((idx, device::read_state(idx)?));
    }
    let spec: ImageSpec = target.parse().map_err(|e: Error| {
        e.context(format!(
            "{target:?} is neither a device (/dev/nbdN) nor an image spec"
        ))
    })?;
    let found: Vec<DeviceState> = device::all_states()
        .into_iter()
        .filter(|s| {
            s.pool == spec.pool
                && s.namespace == spec.namespace
                && s.image == spec.name
                && s.snap == spec.snap
        })
        .collect();
    match found.len() {
        0 => Err(Error::new(
            ErrorKind::NotFound,
            format!("image {spec} is not mapped"),
        )),
        1 => {
            let st = found.into_iter().next();
            let idx = st.as_ref().map(|s| s.index()).transpose()?.unwrap_or(0);
            Ok((idx, st))
        }
        _ => Err(Error::new(
            ErrorKind::InvalidInput,
            format!(
                "image {spec} is mapped more than once ({}); name the device",
                found
                    .iter()
                    .map(|s| s.device.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
}

fn kernel_disconnect(index: u32) -> Result<()> {
    match open_netlink()? {
        Some(mut nl) => nl.disconnect(index),
        None => {
            let dev = ioctl::IoctlDevice::open(&device::device_path(index))?;
            dev.disconnect()
        }
    }
}

fn unmap(a: UnmapArgs) -> Result<()> {
    let (index, st) = resolve(&a.target)?;
    let path = device::device_path(index);
    let configured = device::device_pid(index).is_some();
    let pid = st
        .as_ref()
        .map(|s| s.pid)
        .filter(|p| device::daemon_alive(*p));
    if st.is_none() && !configured {
        return Err(Error::new(
            ErrorKind::NotFound,
            format!("{path} is not mapped"),
        ));
    }
    if st.is_none() {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!(
                "{path} is not mapped by rados-nbd (no {})",
                device::state_path(index).display()
            ),
        ));
    }
    if !a.force {
        if let Some(why) = device::busy_reason(index) {
            return Err(Error::new(
                ErrorKind::Busy,
                format!("cannot unmap {path}: {why} (unmount it first, or use --force)"),
            ));
        }
    }
    // Disconnect first: the kernel sends NBD_CMD_DISC after the requests it has in flight,
    // so once the daemon has drained them nothing can reach the image after its close.
    if configured {
        kernel_disconnect(index)?;
    }
    let closed = match (pid, &st) {
        (Some(pid), Some(st)) => {
            if !device::wait_exit(pid, Duration::from_secs(a.wait_timeout)) {
                return Err(Error::new(
                    ErrorKind::TimedOut,
                    format!(
                        "{path} is disconnected but its daemon (pid {pid}) has not finished closing the image after {}s",
                        a.wait_timeout
                    ),
                ));
            }
            close_outcome(index, pid, st)
        }
        _ => Ok(()),
    };
    // The device is gone either way; a failed close is reported, not retried.
    device::remove_state(index);
    closed.map_err(|why| {
        Error::new(
            ErrorKind::Io,
            format!(
                "{path} ({}) is unmapped, but {why}",
                st.as_ref().map(|s| s.spec_string()).unwrap_or_default()
            ),
        )
    })
}

/// What daemon `pid` of device `index` recorded about its close once it exited: Ok for a
/// clean close, otherwise what went wrong, as the end of a sentence.
fn close_outcome(index: u32, pid: u32, st: &DeviceState) -> std::result::Result<(), String> {
    match device::take_close_result(index, pid) {
        Ok(Some(device::CloseResult { error: None, .. })) => Ok(()),
        Ok(Some(device::CloseResult { error: Some(e), .. })) => {
            Err(format!("the image was not closed cleanly: {e}"))
        }
        // A daemon that records its close and left nothing died before the end of it (a
        // kill, a crash): the image may be left flagged dirty.
        Ok(None) if st.close_result => Err(format!(
            "its daemon (pid {pid}) exited without recording a clean close of the image (killed or crashed?); the next map repairs a dirty object map"
        )),
        Ok(None) => Ok(()),
        Err(e) => Err(format!("its close cannot be confirmed: {e}")),
    }
}

fn detach(a: DetachArgs) -> Result<()> {
    let (index, st) = resolve(&a.target)?;
    let path = device::device_path(index);
    let st = st.ok_or_else(|| {
        Error::new(
            ErrorKind::NotFound,
            format!("{path} is not mapped by rados-nbd"),
        )
    })?;
    if !st.netlink {
        return Err(Error::new(
            ErrorKind::Unsupported,
            format!("{path} was set up with ioctls (the kernel has no nbd netlink family), so it could not be re-attached; not detaching"),
        ));
    }
    if st.detached || !device::daemon_alive(st.pid) {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!("{path} has no running daemon to detach"),
        ));
    }
    // SAFETY: kill(2) with a pid we checked is our daemon.
    if unsafe { libc::kill(st.pid as libc::pid_t, libc::SIGUSR1) } != 0 {
        return Err(Error::io(
            format!("signalling daemon pid {} of {path}", st.pid),
            std::io::Error::last_os_error(),
        ));
    }
    if !device::wait_exit(st.pid, Duration::from_secs(a.wait_timeout)) {
        return Err(Error::new(
            ErrorKind::TimedOut,
            format!(
                "the daemon of {path} ({}, pid {}) did not detach within {}s",
                st.spec_string(),
                st.pid,
                a.wait_timeout
            ),
        ));
    }
    close_outcome(index, st.pid, &st).map_err(|why| {
        Error::new(
            ErrorKind::Io,
            format!("{path} ({}) is detached, but {why}", st.spec_string()),
        )
    })
}

fn list_mapped(a: ListMappedArgs) -> Result<()> {
    let rows: Vec<DeviceState> = device::all_states()
        .into_iter()
        .filter(|s| {
            let idx = s.index().ok();
            device::daemon_alive(s.pid)
                || idx
                    .map(|i| device::device_pid(i).is_some())
                    .unwrap_or(false)
        })
        .collect();
    let mut out = std::io::stdout().lock();
    let res = match a.format {
        ListFormat::Json => {
            let v: Vec<serde_json::Value> = rows
                .iter()
                .map(|s| {
                    serde_json::json!({
                        "pid": if s.detached { serde_json::Value::Null } else { s.pid.into() },
                        "pool": s.pool,
                        "namespace": s.namespace,
                        "image": s.image,
                        "snap": s.snap,
                        "device": s.device,
                        "store": s.store,
                        "read_only": s.read_only,
                        "state": if s.detached { "detached" } else { "attached" },
                    })
                })
                .collect();
            writeln!(out, "{}", serde_json::Value::Array(v))
        }
        ListFormat::Plain => {
            let mut lines = vec![[
                "pid",
                "pool",
                "namespace",
                "image",
                "snap",
                "device",
                "store",
            ]
            .map(String::from)];
            for s in &rows {
                lines.push([
                    if s.detached {
                        "detached".into()
                    } else {
                        s.pid.to_string()
                    },
                    s.pool.clone(),
                    if s.namespace.is_empty() {
                        "-".into()
                    } else {
                        s.namespace.clone()
                    },
                    s.image.clone(),
                    s.snap.clone().unwrap_or_else(|| "-".into()),
                    s.device.clone(),
                    s.store.clone(),
                ]);
            }
            let mut w = [0usize; 7];
            for l in &lines {
                for (i, c) in l.iter().enumerate() {
                    w[i] = w[i].max(c.len());
                }
            }
            let mut r = Ok(());
            if !rows.is_empty() {
                for l in &lines {
                    let row: Vec<String> = l
                        .iter()
                        .enumerate()
                        .map(|(i, c)| format!("{c:<w$}", w = w[i]))
                        .collect();
                    r = r.and(writeln!(out, "{}", row.join("  ").trim_end()));
                }
            }
            r
        }
    };
    res.map_err(|e| Error::io("writing to stdout", e))
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

    fn state(close_result: bool) -> DeviceState {
        DeviceState {
            pid: 42,
            pool: "rbd".into(),
            namespace: String::new(),
            image: "vm1".into(),
            snap: None,
            device: "/dev/nbd3".into(),
            store: "dir:/x".into(),
            read_only: false,
            connections: 1,
            netlink: true,
            detached: false,
            backend: None,
            close_result,
        }
    }

    #[test]
    fn unmap_by_spec_tells_namespaces_apart() {
        let dir = tempfile::tempdir().unwrap();
        device::TEST_RUN_DIR.with(|c| *c.borrow_mut() = Some(dir.path().to_path_buf()));
        // The same image name in the default namespace (nbd3) and in ns1 (nbd5).
        device::write_state(3, &state(true)).unwrap();
        let mut ns = state(true);
        ns.namespace = "ns1".into();
        ns.device = "/dev/nbd5".into();
        device::write_state(5, &ns).unwrap();
        let (idx, st) = resolve("rbd/ns1/vm1").unwrap();
        assert_eq!((idx, st.unwrap().namespace.as_str()), (5, "ns1"));
        let (idx, st) = resolve("rbd/vm1").unwrap();
        assert_eq!((idx, st.unwrap().namespace.as_str()), (3, ""));
        let e = resolve("rbd/ns2/vm1").unwrap_err();
        assert!(e.message.contains("rbd/ns2/vm1 is not mapped"), "{e}");
    }

    #[test]
    fn unmap_learns_how_the_close_ended() {
        let dir = tempfile::tempdir().unwrap();
        device::TEST_RUN_DIR.with(|c| *c.borrow_mut() = Some(dir.path().to_path_buf()));
        let result = |error: Option<&str>| device::CloseResult {
            pid: 42,
            device: "/dev/nbd3".into(),
            image: "rbd/vm1".into(),
            error: error.map(String::from),
        };
        device::write_close_result(3, &result(None)).unwrap();
        assert_eq!(close_outcome(3, 42, &state(true)), Ok(()));
        let failed = "closing rbd/vm1: writing rbd_object_map.abc: No space left on device";
        device::write_close_result(3, &result(Some(failed))).unwrap();
        let why = close_outcome(3, 42, &state(true)).unwrap_err();
        assert!(why.contains(failed), "{why}");
        // Read once: the result does not linger in the run directory.
        assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none());
        // A daemon that records its close but left nothing was killed mid-close.
        let why = close_outcome(3, 42, &state(true)).unwrap_err();
        assert!(
            why.contains("pid 42") && why.contains("exited without"),
            "{why}"
        );
        // An older daemon records nothing: its silence proves nothing.
        assert_eq!(close_outcome(3, 42, &state(false)), Ok(()));
        // Another daemon's result is not ours.
        device::write_close_result(
            3,
            &device::CloseResult {
                pid: 7,
                ..result(Some(failed))
            },
        )
        .unwrap();
        assert!(close_outcome(3, 42, &state(true)).is_err());
        assert!(close_outcome(3, 7, &state(true)).is_err());
    }
}
