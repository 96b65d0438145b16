//! The ublk transport (`map --transport ublk`): the image as /dev/ublkbN, served through
//! the kernel's ublk driver (drivers/block/ublk_drv.c) instead of the nbd client.
//!
//! Why: NBD copies every request into a socket and out again, with a context switch each
//! way; ublk hands requests over io_uring with the data in buffers the kernel copies into
//! once. And with UBLK_F_USER_RECOVERY the device outlives its daemon: when the daemon dies
//! (kill -9, a crash) the driver quiesces the device, holds new I/O, and a new daemon
//! (`attach`) takes its queues over, the requests the old one never answered included
//! (UBLK_F_USER_RECOVERY_REISSUE). A mounted file system sees a pause, not an error.
//!
//! Built on libublk (crates.io, the ublk maintainers' Rust library): its queue threads,
//! io_uring setup and control commands; our part is the bridge to the tokio image layer
//! (`queue`) and the request checks (`request`).
//!
//! The life of a device, as with NBD: `map` adds and starts it, writes the state file and
//! reports the device; `unmap` (SIGTERM) stops it, which makes the driver finish every
//! request in flight before it aborts the queues, so the image's clean close that follows
//! is the last word; then the device is deleted. `detach` (SIGUSR1) answers what is in
//! flight, holds back what comes after, closes the image cleanly and exits without
//! deleting: the driver keeps the device for `attach`.

mod queue;
pub mod request;

use super::cli::ServeOpts;
use super::daemonize::ReadyPipe;
use super::device::{self, DevKey, DeviceState, Transport};
use crate::error::{Error, ErrorKind, Result};
use crate::spec::ImageSpec;
use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::io::UblkDev;
use libublk::{UblkError, UblkFlags};
use nbd_protocol::Backend;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Requests in flight, and whether new ones may start (no, once detaching).
#[derive(Default)]
pub struct Gate {
    state: Mutex<(bool, usize)>,
    idle: Condvar,
}

/// A request that passed the gate; leaves it when dropped.
pub struct Pass<'a>(&'a Gate);

impl Gate {
    /// None when closed: the request must be held, not run.
    pub fn enter(&self) -> Option<Pass<'_>> {
        let mut g = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if g.0 {
            return None;
        }
        g.1 += 1;
        Some(Pass(self))
    }
    /// Closes the gate and waits (at most `timeout`) for the requests inside to finish.
    fn close_and_drain(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut g = self.state.lock().unwrap_or_else(|e| e.into_inner());
        g.0 = true;
        while g.1 > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            g = self
                .idle
                .wait_timeout(g, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }
}

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        let mut g = self.0.state.lock().unwrap_or_else(|e| e.into_inner());
        g.1 -= 1;
        if g.1 == 0 {
            self.0.idle.notify_all();
        }
    }
}

/// Queues: one per CPU, at most 4 (each is a thread with its own ring); depth 128.
pub fn default_queues() -> u16 {
    std::thread::available_parallelism()
        .map(|n| n.get().min(4) as u16)
        .unwrap_or(1)
}
pub const DEFAULT_DEPTH: u16 = 128;
/// Largest request (the queue's max_sectors): 512 KiB, libublk's default.
const IO_BUF_BYTES: u32 = 512 << 10;

/// libublk reports a failed control command as `OtherError(-errno)`.
fn uerr(what: impl Into<String>, e: UblkError) -> Error {
    match e {
        UblkError::OtherError(n) if n < 0 => {
            Error::io(what.into(), std::io::Error::from_raw_os_error(-n))
        }
        UblkError::IOError(io) => Error::io(what.into(), io),
        e => Error::new(ErrorKind::Io, format!("{}: {e} ({e:?})", what.into())),
    }
}

const USE_NBD: &str = "use the NBD transport (the default: leave out --transport ublk)";

/// The ublk driver is there (loading ublk_drv if need be) and io_uring works; otherwise one
/// line that says which is missing.
pub fn check_available() -> Result<()> {
    let ctl = std::path::Path::new("/dev/ublk-control");
    if !ctl.exists() {
        // As for nbd: RADOS_NBD_MODULES_ROOT names a module tree (`modprobe -d`).
        let mut cmd = std::process::Command::new("modprobe");
        if let Some(root) = std::env::var_os("RADOS_NBD_MODULES_ROOT") {
            cmd.arg("-d").arg(root);
        }
        let out = cmd.arg("ublk_drv").output();
        if !ctl.exists() {
            let why = match out {
                Ok(o) if o.status.success() => "modprobe ublk_drv made no /dev/ublk-control".into(),
                Ok(o) => format!(
                    "modprobe ublk_drv: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                ),
                Err(e) => format!("modprobe: {e}"),
            };
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "this kernel has no ublk driver ({why}; it needs CONFIG_BLK_DEV_UBLK, Linux 6.0 or later); {USE_NBD}"
                ),
            ));
        }
    }
    if let Err(e) = io_uring::IoUring::new(2) {
        return Err(Error::new(
            ErrorKind::Unsupported,
            format!("io_uring is not available here ({e}; see sysctl kernel.io_uring_disabled); {USE_NBD}"),
        ));
    }
    Ok(())
}

/// Map: a new device (this number, or any free); attach: take over a device whose
/// daemon is gone.
#[derive(Debug, Clone, Copy)]
pub enum Mode {
    Map(Option<u32>),
    Attach(u32),
}

/// How the serving ended.
pub enum Ending {
    /// Stopped (`unmap`, SIGTERM) or deleted by someone else: the device is gone.
    Gone,
    /// `detach`: the device stays, quiesced, for `attach`.
    Detached,
}

/// What `serve` needs besides the image.
pub struct Setup<'a> {
    pub rt: &'a tokio::runtime::Runtime,
    pub spec: &'a ImageSpec,
    pub store: &'a str,
    pub opts: &'a ServeOpts,
    pub read_only: bool,
    /// The image's id, recorded in the state file (see `DeviceState::image_id`).
    pub image_id: String,
}

/// Messages from the control thread.
enum Ctl {
    Started(u32),
    Failed(Error),
    /// The queues are down (stopped or deleted); the device was deleted if we own it.
    Ended,
}

fn ublk_state(id: u32, s: &Setup<'_>) -> DeviceState {
    DeviceState {
        pid: std::process::id(),
        pool: s.spec.pool.clone(),
        namespace: s.spec.namespace.clone(),
        image: s.spec.name.clone(),
        snap: s.spec.snap.clone(),
        device: DevKey::Ublk(id).path(),
        store: s.store.to_string(),
        read_only: s.read_only,
        connections: u32::from(s.opts.queues.unwrap_or_else(default_queues)),
        netlink: false,
        detached: false,
        backend: None,
        close_result: true,
        transport: Transport::Ublk,
        image_id: s.image_id.clone(),
    }
}

/// Serves `backend` as a ublk device until it is stopped (`unmap`, SIGTERM/SIGINT) or
/// detached (SIGUSR1). Returns the device number and how it ended; the caller closes the
/// image and records the close.
pub(super) fn serve<B: Backend>(
    backend: Arc<B>,
    s: &Setup<'_>,
    mode: Mode,
    sig: &mut super::daemon::Signals,
    mut sizes: tokio::sync::watch::Receiver<u64>,
    ready: &mut Option<ReadyPipe>,
    on_started: impl FnOnce(&str),
) -> Result<(u32, Ending)> {
    let info = backend.info();
    let queues = s.opts.queues.unwrap_or_else(default_queues);
    let depth = s.opts.queue_depth.unwrap_or(DEFAULT_DEPTH);
    if queues == 0 || queues > 64 || depth == 0 || depth > 4096 {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!(
                "--queues must be 1..=64 and --queue-depth 1..=4096 (got {queues} and {depth})"
            ),
        ));
    }
    let features = UblkCtrl::get_features().unwrap_or(0);
    let can_resize = features & u64::from(libublk::sys::UBLK_F_UPDATE_SIZE) != 0;
    let gate = Arc::new(Gate::default());
    let shared = queue::Shared {
        backend: backend.clone(),
        rt: s.rt.handle().clone(),
        gate: gate.clone(),
        read_only: s.read_only,
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Ctl>();
    let size = info.size - info.size % 512;
    let read_only = s.read_only;
    let name = format!("rados-nbd {}", s.spec);
    let ctl_thread = std::thread::Builder::new()
        .name("ublk-ctrl".into())
        .spawn(move || {
            let tx2 = tx.clone();
            let r = control(
                mode,
                &name,
                queues,
                depth,
                can_resize,
                size,
                read_only,
                shared,
                move |id| {
                    let _ = tx2.send(Ctl::Started(id));
                },
            );
            let _ = tx.send(match r {
                Ok(()) => Ctl::Ended,
                Err(e) => Ctl::Failed(e),
            });
        })
        .map_err(|e| Error::io("starting the ublk control thread", e))?;
    // Until it started: its number, or why not.
    let id = match s.rt.block_on(rx.recv()) {
        Some(Ctl::Started(id)) => id,
        Some(Ctl::Failed(e)) => {
            let _ = ctl_thread.join();
            return Err(e);
        }
        _ => {
            let _ = ctl_thread.join();
            return Err(Error::new(
                ErrorKind::Io,
                "the ublk device ended before it started",
            ));
        }
    };
    let dev = DevKey::Ublk(id);
    let path = dev.path();
    let stop = |why: &str| {
        tracing::info!("{path}: {why}, stopping the device");
        if let Err(e) = UblkCtrl::new_simple(id as i32).and_then(|c| c.stop_dev()) {
            tracing::error!("{}", uerr(format!("stopping {path}"), e));
        }
    };
    // devtmpfs makes the node (udev may rename or chmod it later); wait for it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::path::Path::new(&path).exists() {
        if Instant::now() > deadline {
            stop("its node never appeared");
            let _ = ctl_thread.join();
            return Err(Error::new(
                ErrorKind::TimedOut,
                format!("{path} did not appear within 10 s"),
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    on_started(&path);
    let state = ublk_state(id, s);
    if let Err(e) = device::write_state(dev, &state) {
        stop("its state file could not be written");
        let _ = ctl_thread.join();
        return Err(e);
    }
    if let Some(p) = &s.opts.pid_file {
        if let Err(e) = std::fs::write(p, format!("{}\n", std::process::id())) {
            tracing::warn!("writing pid file {}: {e}", p.display());
        }
    }
    tracing::info!(
        "{} {} {path} ({size} bytes, ublk, {queues} queue(s) of depth {depth})",
        s.spec,
        if matches!(mode, Mode::Attach(_)) {
            "re-attached to"
        } else {
            "mapped to"
        },
    );
    super::daemon::report_ready(ready, &format!("{} mapped at {path}", s.spec), &path);

    sizes.mark_unchanged();
    let mut resizable = true;
    let ending = s.rt.block_on(async {
        let mut stopping = false;
        loop {
            tokio::select! {
                m = rx.recv() => match m {
                    Some(Ctl::Failed(e)) => {
                        tracing::error!("{path}: {e}");
                        return Ending::Gone;
                    }
                    _ => return Ending::Gone,
                },
                name = super::daemon::term_or_int(&mut sig.term, &mut sig.int), if !stopping => {
                    stopping = true;
                    let _ = crate::notify::stopping(&format!("unmapping {path}"));
                    let p = path.clone();
                    let r = tokio::task::spawn_blocking(move || {
                        UblkCtrl::new_simple(id as i32).and_then(|c| c.stop_dev())
                            .map_err(|e| uerr(format!("stopping {p}"), e))
                    }).await;
                    tracing::info!("{path}: {name}, stopping the device");
                    match r {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => tracing::error!("{e}"),
                        Err(e) => tracing::error!("{path}: {e}"),
                    }
                }
                _ = sig.usr1.recv(), if !stopping => {
                    tracing::info!("{path}: detaching (the device stays, quiesced, for attach)");
                    let _ = crate::notify::stopping(&format!("detaching from {path}"));
                    let g = gate.clone();
                    let drained = tokio::task::spawn_blocking(move || g.close_and_drain(Duration::from_secs(120)))
                        .await
                        .unwrap_or(false);
                    if !drained {
                        tracing::error!("{path}: requests still running after 120 s; detaching anyway");
                    }
                    return Ending::Detached;
                }
                r = sizes.changed(), if resizable && !stopping => {
                    if r.is_err() {
                        resizable = false;
                        continue;
                    }
                    let new = *sizes.borrow_and_update();
                    let blocks = new - new % 512;
                    if !can_resize {
                        tracing::error!(
                            "{path}: the image is now {new} bytes but the device stays at {size}: this kernel's ublk cannot resize a live device (UBLK_F_UPDATE_SIZE, Linux 6.16); remap to see the new size"
                        );
                        continue;
                    }
                    let r = tokio::task::spawn_blocking(move || {
                        UblkCtrl::new_simple(id as i32).and_then(|c| c.update_size(blocks))
                    }).await;
                    match r {
                        Ok(Ok(_)) => tracing::info!("{path}: size now {blocks} bytes"),
                        Ok(Err(e)) => tracing::error!("{}", uerr(format!("{path}: resizing to {blocks} bytes"), e)),
                        Err(e) => tracing::error!("{path}: {e}"),
                    }
                }
            }
        }
    });
    if let Ending::Gone = ending {
        let _ = ctl_thread.join();
    }
    // Detached: the control thread stays blocked on queues that hold requests back; the
    // process exits after the close, and the driver quiesces the device for `attach`.
    Ok((id, ending))
}

/// The control thread: adds (or recovers) the device, runs its queues until they go down,
/// then deletes a device this process added or recovered.
#[allow(clippy::too_many_arguments)]
fn control<B: Backend>(
    mode: Mode,
    name: &str,
    queues: u16,
    depth: u16,
    can_resize: bool,
    size: u64,
    read_only: bool,
    shared: queue::Shared<B>,
    started: impl FnOnce(u32) + Send + Sync + 'static,
) -> Result<()> {
    let mut ctrl_flags =
        u64::from(libublk::sys::UBLK_F_USER_RECOVERY | libublk::sys::UBLK_F_USER_RECOVERY_REISSUE);
    if can_resize {
        ctrl_flags |= u64::from(libublk::sys::UBLK_F_UPDATE_SIZE);
    }
    let (id, dev_flags) = match mode {
        Mode::Map(id) => (id.map_or(-1, |i| i as i32), UblkFlags::UBLK_DEV_F_ADD_DEV),
        Mode::Attach(id) => {
            let old = UblkCtrl::new_simple(id as i32)
                .map_err(|e| uerr(format!("opening /dev/ublkc{id}"), e))?;
            old.start_user_recover().map_err(|e| {
                uerr(
                    format!("taking over /dev/ublkb{id} (START_USER_RECOVERY: is its old daemon gone, and was it mapped by rados-nbd with --transport ublk?)"),
                    e,
                )
            })?;
            (id as i32, UblkFlags::UBLK_DEV_F_RECOVER_DEV)
        }
    };
    if let Mode::Map(Some(i)) = mode {
        // Refuse a taken number before asking for it: when an ADD fails, libublk's control
        // deletes the device of the number it asked for on its way out, which would be the
        // device another daemon serves.
        let exists = std::path::Path::new(&format!("/dev/ublkc{i}")).exists()
            || UblkCtrl::new_simple(i as i32).is_ok();
        if exists {
            return Err(Error::new(
                ErrorKind::Busy,
                format!("/dev/ublkb{i} is taken (ublk device {i} exists); leave out --device to get a free one"),
            ));
        }
    }
    let ctrl = UblkCtrlBuilder::default()
        .name(name)
        .id(id)
        .nr_queues(queues)
        .depth(depth)
        .io_buf_bytes(IO_BUF_BYTES)
        .ctrl_flags(ctrl_flags)
        .dev_flags(dev_flags)
        .build()
        .map_err(|e| match mode {
            Mode::Map(Some(i)) => uerr(
                format!("adding ublk device {i} (is /dev/ublkb{i} taken?)"),
                e,
            ),
            Mode::Map(None) => uerr("adding a ublk device", e),
            Mode::Attach(i) => uerr(format!("recovering /dev/ublkb{i}"), e),
        })?;
    let id = ctrl.dev_info().dev_id;
    let tgt_init = move |dev: &mut UblkDev| {
        dev.set_default_params(size);
        // One more operation per queue than tags: the eventfd read that wakes the thread.
        dev.tgt.sq_depth = depth.saturating_mul(2);
        dev.tgt.cq_depth = depth.saturating_mul(2);
        let p = &mut dev.tgt.params;
        p.basic.attrs = libublk::sys::UBLK_ATTR_VOLATILE_CACHE | libublk::sys::UBLK_ATTR_FUA;
        if read_only {
            p.basic.attrs |= libublk::sys::UBLK_ATTR_READ_ONLY;
        } else {
            p.types |= libublk::sys::UBLK_PARAM_TYPE_DISCARD;
            p.discard = libublk::sys::ublk_param_discard {
                discard_granularity: 4096,
                max_discard_sectors: request::MAX_DISCARD_SECTORS,
                max_write_zeroes_sectors: request::MAX_DISCARD_SECTORS,
                max_discard_segments: 1,
                ..Default::default()
            };
        }
        Ok(())
    };
    let q_fn = move |qid: u16, dev: &UblkDev| queue::serve_queue(qid, dev, shared.clone());
    let r = ctrl.run_target(tgt_init, q_fn, move |c: &UblkCtrl| {
        started(c.dev_info().dev_id)
    });
    // Recovered devices are not deleted when their control drops (libublk deletes only
    // those it added): delete it ourselves; the queues are down, so it is being removed.
    let _ = ctrl.del_dev();
    r.map(|_| ())
        .map_err(|e| uerr(format!("serving /dev/ublkb{id}"), e))
}

/// Deletes ublk device `dev` (`unmap` of a device whose daemon died).
pub fn delete(dev: DevKey) -> Result<()> {
    let DevKey::Ublk(id) = dev else {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!("{} is not a ublk device", dev.path()),
        ));
    };
    UblkCtrl::new_simple(id as i32)
        .and_then(|c| c.del_dev())
        .map(|_| ())
        .map_err(|e| uerr(format!("deleting {}", dev.path()), e))
}
