//! The serving daemon of `map` and `attach`: sets up the device (netlink CONNECT or
//! RECONFIGURE, ioctls as the fallback), serves the kernel's sockets, follows resizes, and
//! on the way out closes the image and records how that close ended.

use super::cli::{AttachArgs, MapArgs, ServeOpts};
use super::daemonize::{
    forward_output_to_syslog, leave_working_dir, restore_terminal_stderr, spawn_background,
    PidFileGuard, ReadyPipe,
};
use super::device::{self, DevKey, DeviceState};
use super::export::Export;
use super::{ioctl, netlink, open_netlink};
use crate::error::{Error, ErrorKind, Result};
use crate::spec::ImageSpec;
use crate::store::CephAccess;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

/// Block size given to the kernel: 512 like rbd-nbd, so any file system or partition
/// table made elsewhere on the image still works.
const BLOCK_SIZE: u64 = 512;
const MAX_CONNECTIONS: u32 = 16;

enum Mode {
    Map {
        index: Option<u32>,
        nbds_max: Option<u32>,
        max_part: Option<u32>,
    },
    Attach {
        index: u32,
    },
    /// `--transport ublk` (map), or attach of a /dev/ublkbN.
    #[cfg_attr(not(feature = "ublk"), allow(dead_code))]
    Ublk(UblkMode),
}

#[cfg(feature = "ublk")]
use super::ublk::Mode as UblkMode;
#[cfg(not(feature = "ublk"))]
#[derive(Debug, Clone, Copy)]
pub(super) enum UblkMode {}

#[cfg(not(feature = "ublk"))]
fn no_ublk() -> Error {
    Error::new(
        ErrorKind::Unsupported,
        "this rados-nbd was built without the ublk transport (cargo feature `ublk`); use the NBD transport (the default)",
    )
}

/// Identifies a mapping to the kernel (NBD_ATTR_BACKEND_IDENTIFIER, rbd-nbd's "cookie")
/// unless `--cookie` names another; RECONFIGURE must present the same string, so the
/// kernel itself refuses to re-attach another image. `rados-nbd:STORE:SPEC`, one word (it
/// is a column of list-mapped: white space in the store becomes `_`), and the image spec
/// after the last `:` (`%`, `:`, white space and control characters in it percent-encoded,
/// byte by byte), where udev's helper (packaging/rados-nbd-udev) reads it to name
/// /dev/rados-nbd/POOL/IMAGE.
fn backend_id(store: &str, spec: &ImageSpec) -> String {
    let store: String = store
        .chars()
        .map(|c| if c.is_whitespace() { '_' } else { c })
        .collect();
    let enc = crate::spec::one_word(&spec.to_string(), &[':']);
    format!("rados-nbd:{store}:{enc}")
}

/// The identifier of mappings made before it lost its spaces (so `attach` still takes
/// over a device an older daemon mapped, as in an upgrade).
fn legacy_backend_id(store: &str, spec: &ImageSpec) -> String {
    format!("rados-nbd {store} {spec}")
}

/// Whether a state file records a mapping of `spec` from `store`.
fn state_names(st: &DeviceState, store: &str, spec: &ImageSpec) -> bool {
    st.store == store
        && st.pool == spec.pool
        && st.namespace == spec.namespace
        && st.image == spec.name
        && st.snap == spec.snap
}

/// An attach takes over a device only when no daemon serves it any more and its state
/// file names the image asked for (`same`), or, when it records the image's id (the name
/// may have changed since: `rename`), once the image opened proves to be that one
/// ([`same_image_as_mapped`]).
fn may_take_over(
    path: &str,
    st: &DeviceState,
    same: bool,
    store: &str,
    spec: &ImageSpec,
) -> Result<()> {
    if !st.detached && device::daemon_alive(st.pid) {
        return Err(Error::new(
            ErrorKind::Busy,
            format!("{path} is still served by pid {}; detach it first", st.pid),
        ));
    }
    // Another name is left to the id check only within the same store, pool and namespace
    // (where a rename keeps an image, and its id names it alone).
    let renamed_here = !st.image_id.is_empty()
        && st.store == store
        && st.pool == spec.pool
        && st.namespace == spec.namespace;
    if !same && !renamed_here {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!(
                "{path} was mapped from {} in {}, not {spec} in {store}",
                st.spec_string(),
                st.store
            ),
        ));
    }
    Ok(())
}

/// For a takeover (attach, or a map that re-attaches an orphaned device): refuses when the
/// device's state file records another image id than the image opened has. Names change
/// (`rename`, or a removal and a new image of the old name, after which `map` of that name
/// would otherwise find the old image's orphaned device and put the new image under its
/// file system); ids do not.
fn same_image_as_mapped(mode: &Mode, export: &Export, spec: &ImageSpec) -> Result<()> {
    match taken_over(mode)? {
        Some((path, st)) => check_same_id(&st, &export.image_id(), spec, &path),
        None => Ok(()),
    }
}

/// The device a takeover mode takes over, and its state file (when it has one).
fn taken_over(mode: &Mode) -> Result<Option<(String, DeviceState)>> {
    let key = match mode {
        Mode::Attach { index } => DevKey::Nbd(*index),
        #[cfg(feature = "ublk")]
        Mode::Ublk(UblkMode::Attach(i)) => DevKey::Ublk(*i),
        _ => return Ok(None),
    };
    Ok(device::read_state(key)?.map(|st| (key.path(), st)))
}

fn check_same_id(st: &DeviceState, id: &str, spec: &ImageSpec, path: &str) -> Result<()> {
    if st.image_id.is_empty() || st.image_id == id {
        return Ok(());
    }
    Err(Error::new(
        ErrorKind::InvalidInput,
        format!(
            "{path} was mapped from image id {} (then named {}), but {spec} is image id {id}: \
             renamed or made anew since; not taking the device over (attach it by the name \
             its image has now, or unmap it)",
            st.image_id,
            st.spec_string()
        ),
    ))
}

/// Whether a device's cookie says it was mapped from `spec` in `store` without the user
/// naming the cookie: our own identifiers, or the one recorded when it was mapped.
fn cookie_is_ours(have: &str, store: &str, spec: &ImageSpec, st: Option<&DeviceState>) -> bool {
    have == backend_id(store, spec)
        || have == legacy_backend_id(store, spec)
        || st.is_some_and(|st| st.backend.as_deref() == Some(have) && state_names(st, store, spec))
}

/// What rbd-nbd's map and attach take that rados-nbd cannot do, refused before anything
/// starts; options that only the NBD transport has.
fn check_rbd_nbd_options(opts: &ServeOpts, ublk: bool) -> Result<()> {
    if opts.encryption_format.is_some() || opts.encryption_passphrase_file.is_some() {
        return Err(Error::new(
            ErrorKind::Unsupported,
            "--encryption-format/--encryption-passphrase-file: rados-nbd has no client-side \
             encryption (librbd's LUKS); map the image with rbd-nbd, or serve its raw LUKS \
             volume with --allow-encrypted and open it with cryptsetup",
        ));
    }
    if ublk && (opts.cookie.is_some() || opts.show_cookie) {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            "--cookie and --show-cookie are the nbd driver's (NBD_ATTR_BACKEND_IDENTIFIER); a ublk device has none",
        ));
    }
    Ok(())
}

pub(super) fn map(a: MapArgs, store: &str, ceph: &CephAccess) -> Result<()> {
    let mode = match a.opts.transport {
        device::Transport::Nbd => Mode::Map {
            index: a.device.as_deref().map(device::parse_device).transpose()?,
            nbds_max: a.nbds_max,
            max_part: a.max_part,
        },
        device::Transport::Ublk => {
            let id = match a.device.as_deref().map(DevKey::parse).transpose()? {
                None => None,
                Some(DevKey::Ublk(i)) => Some(i),
                Some(DevKey::Nbd(_)) => {
                    return Err(Error::new(
                        ErrorKind::InvalidInput,
                        "--transport ublk takes a /dev/ublkbN --device",
                    ))
                }
            };
            if a.nbds_max.is_some() || a.max_part.is_some() {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    "--nbds-max and --max-part are nbd module parameters; --transport ublk has none",
                ));
            }
            ublk_mode(false, id)?
        }
    };
    start(mode, &a.image, a.opts, store, ceph)
}

#[cfg(feature = "ublk")]
fn ublk_mode(attach: bool, id: Option<u32>) -> Result<Mode> {
    Ok(Mode::Ublk(match (attach, id) {
        (true, Some(i)) => UblkMode::Attach(i),
        (_, id) => UblkMode::Map(id),
    }))
}
#[cfg(not(feature = "ublk"))]
fn ublk_mode(_attach: bool, _id: Option<u32>) -> Result<Mode> {
    Err(no_ublk())
}

pub(super) fn attach(a: AttachArgs, store: &str, ceph: &CephAccess) -> Result<()> {
    let mode = match DevKey::parse(&a.device)? {
        DevKey::Ublk(i) => ublk_mode(true, Some(i))?,
        DevKey::Nbd(_) if a.opts.transport == device::Transport::Ublk => {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "--transport ublk takes a /dev/ublkbN --device",
            ))
        }
        DevKey::Nbd(index) => Mode::Attach { index },
    };
    start(mode, &a.image, a.opts, store, ceph)
}

fn start(
    mode: Mode,
    image: &str,
    mut opts: ServeOpts,
    store: &str,
    ceph: &CephAccess,
) -> Result<()> {
    let spec: ImageSpec = image.parse()?;
    check_rbd_nbd_options(&opts, matches!(mode, Mode::Ublk(_)))?;
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
pub(super) enum Ending {
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
    let (mode, nl, backend) = match mode {
        Mode::Ublk(m) => (
            prepare_ublk(m, &spec, store, &mut read_only)?,
            None,
            String::new(),
        ),
        m => prepare_nbd(m, &spec, store, opts, &mut read_only, &mut connections)?,
    };
    for w in device::harden_process() {
        tracing::warn!("{w}");
    }
    // Every page a thread touches stays locked (mlockall), so the blocking pool (tokio's
    // default allows 512 threads of 2 MiB stacks) is bounded to keep locked memory modest.
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
    let ceph = &CephAccess {
        lock_at_open: crate::store::LockAtOpen::for_serving(opts.wait_for_lock, opts.exclusive),
        ..ceph.clone()
    };
    // A device taken over serves what is mounted from it: the image must be the one it
    // was mapped from, whatever name it has now; checked before anything is opened (an
    // open of another image would take its lock), and again once it is open.
    if let Some((path, st)) = taken_over(&mode)? {
        if !st.image_id.is_empty() {
            let id = rt.block_on(Export::image_id_of(store, ceph, &spec))?;
            check_same_id(&st, &id, &spec, &path)?;
        }
    }
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
    if let Err(e) = same_image_as_mapped(&mode, &export, &spec) {
        if let Err(c) = rt.block_on(export.close()) {
            tracing::error!("{c}");
        }
        return Err(e);
    }
    // The copy-on-read worker is a task of this runtime.
    if opts.copy_on_read && !rt.block_on(async { export.enable_copy_on_read() }) {
        tracing::info!("--copy-on-read: {spec} is not a writable clone; nothing to copy");
    }
    let outcome = match mode {
        Mode::Ublk(m) => serve_ublk(
            &rt, &export, m, &spec, opts, store, read_only, signals, ready,
        )
        .map(|(i, e)| (DevKey::Ublk(i), e)),
        mode => {
            let setup = Setup {
                rt: &rt,
                export: export.clone(),
                spec: &spec,
                opts,
                store,
                read_only,
                connections,
                backend,
            };
            setup
                .run(mode, nl, signals, ready)
                .map(|(i, e)| (DevKey::Nbd(i), e))
        }
    };
    // Whatever happened, close the image cleanly: flush, object map, dirty flag, lock. The
    // error names the image and the step that failed.
    let closed = rt.block_on(export.close());
    let (dev, ending) = match outcome {
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
            let marked = device::read_state(dev).and_then(|st| match st {
                Some(mut st) => {
                    st.pid = 0;
                    st.detached = true;
                    device::write_state(dev, &st)
                }
                None => Ok(()),
            });
            if closed.is_ok() {
                tracing::info!(
                    "{spec}: detached from {}; the kernel keeps the device",
                    dev.path()
                );
            }
            closed.and(marked)
        }
        Ending::Disconnected => {
            device::remove_state(dev);
            if closed.is_ok() {
                tracing::info!("{spec}: {} disconnected, image closed", dev.path());
            }
            closed
        }
    };
    // The `unmap` or `detach` waiting for this process to exit learns the outcome here;
    // written before the exit, so it is there once the pid is gone.
    let result = device::CloseResult {
        pid: std::process::id(),
        device: dev.path(),
        image: spec.to_string(),
        error: finished
            .as_ref()
            .err()
            .map(|e| e.to_string().replace('\n', " ")),
    };
    if let Err(e) = device::write_close_result(dev, &result) {
        tracing::error!("recording the outcome of the close: {e}");
    }
    finished
}

/// The ublk side's checks before the image is opened: the driver and io_uring are there; a
/// map of an image whose ublk device outlived its daemon (a crash, then a restart by
/// systemd) takes that device over, so its mounts survive; attach only takes over a device
/// of ours whose daemon is gone.
#[cfg(feature = "ublk")]
fn prepare_ublk(
    mode: UblkMode,
    spec: &ImageSpec,
    store: &str,
    read_only: &mut bool,
) -> Result<Mode> {
    super::ublk::check_available()?;
    let same =
        |st: &DeviceState| st.transport == device::Transport::Ublk && state_names(st, store, spec);
    let mode = match mode {
        UblkMode::Map(want) => {
            let orphan = device::all_states().into_iter().find(|st| {
                same(st)
                    && !device::daemon_alive(st.pid)
                    && st.key().is_ok_and(|k| {
                        matches!(k, DevKey::Ublk(i) if want.is_none_or(|w| w == i))
                            && std::path::Path::new(&k.path()).exists()
                    })
            });
            match orphan.and_then(|st| st.key().ok()) {
                Some(DevKey::Ublk(i)) => {
                    tracing::warn!(
                        "{spec}: /dev/ublkb{i} is still kept by the kernel for a daemon that is gone; taking it over"
                    );
                    UblkMode::Attach(i)
                }
                _ => UblkMode::Map(want),
            }
        }
        m => m,
    };
    if let UblkMode::Attach(i) = mode {
        let path = DevKey::Ublk(i).path();
        let Some(st) = device::read_state(DevKey::Ublk(i))? else {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!(
                    "{path} is not mapped by rados-nbd (no {})",
                    device::state_path(DevKey::Ublk(i)).display()
                ),
            ));
        };
        may_take_over(&path, &st, same(&st), store, spec)?;
        *read_only |= st.read_only;
    }
    Ok(Mode::Ublk(mode))
}
#[cfg(not(feature = "ublk"))]
fn prepare_ublk(m: UblkMode, _: &ImageSpec, _: &str, _: &mut bool) -> Result<Mode> {
    match m {}
}

#[cfg(feature = "ublk")]
#[allow(clippy::too_many_arguments)]
fn serve_ublk(
    rt: &tokio::runtime::Runtime,
    export: &Arc<Export>,
    mode: UblkMode,
    spec: &ImageSpec,
    opts: &ServeOpts,
    store: &str,
    read_only: bool,
    mut sig: Signals,
    ready: &mut Option<ReadyPipe>,
) -> Result<(u32, Ending)> {
    let setup = super::ublk::Setup {
        rt,
        spec,
        store,
        opts,
        read_only,
        image_id: export.image_id(),
    };
    let quiesce = |path: &str| {
        if opts.quiesce && !read_only {
            let hook =
                crate::quiesce::QuiesceHook::new(opts.quiesce_hook.clone(), path.to_string());
            tracing::info!(
                "{spec}: --quiesce: snapshots run {} around them",
                hook.path.display()
            );
            export.enable_quiesce(hook);
        }
    };
    let (id, end) = export.serve_ublk(&setup, mode, &mut sig, ready, quiesce)?;
    Ok((
        id,
        match end {
            super::ublk::Ending::Gone => Ending::Disconnected,
            super::ublk::Ending::Detached => Ending::Detached,
        },
    ))
}
#[cfg(not(feature = "ublk"))]
#[allow(clippy::too_many_arguments)]
fn serve_ublk(
    _: &tokio::runtime::Runtime,
    _: &Arc<Export>,
    m: UblkMode,
    _: &ImageSpec,
    _: &ServeOpts,
    _: &str,
    _: bool,
    _: Signals,
    _: &mut Option<ReadyPipe>,
) -> Result<(u32, Ending)> {
    match m {}
}

/// The nbd side's checks before the image is opened: the module, netlink, a device the
/// kernel kept for a daemon that died (re-attached), and for attach that the device is ours.
/// Also returns the device's cookie (backend identifier): for a map, `--cookie` or our
/// own; for an attach, the one the device has.
fn prepare_nbd(
    mode: Mode,
    spec: &ImageSpec,
    store: &str,
    opts: &ServeOpts,
    read_only: &mut bool,
    connections: &mut u32,
) -> Result<(Mode, Option<netlink::NbdNetlink>, String)> {
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
        Mode::Ublk(_) => {}
    }
    let nl = open_netlink()?;
    // A map of an image whose device the kernel still holds for a daemon that died (a
    // crash, then a restart by systemd) re-attaches that device: its mounts survive.
    let mode = match mode {
        Mode::Map { index, .. } if nl.is_some() => {
            match orphaned_device(store, spec, index, opts.cookie.as_deref())? {
                Some(i) => {
                    tracing::warn!(
                    "{spec}: /dev/nbd{i} is still held by the kernel for a daemon that is gone; re-attaching it"
                );
                    Mode::Attach { index: i }
                }
                None => mode,
            }
        }
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
        let st = device::read_state(index)?;
        if let Some(st) = &st {
            // Whatever the cookie says: the device keeps serving what is mounted from it,
            // so another image must never come under it (rbd-nbd checks the cookie only).
            may_take_over(&path, st, state_names(st, store, spec), store, spec)?;
            *connections = st.connections;
            *read_only |= st.read_only;
        }
        // rbd-nbd's rules: a named cookie must be the device's; without one, ours must be.
        let backend = match (device::device_backend(index), &opts.cookie) {
            (Some(have), Some(c)) if have != *c => {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    format!("{path} has cookie {have:?}, not {c:?} (cookie mismatch)"),
                ))
            }
            (Some(have), None) if !cookie_is_ours(&have, store, spec, st.as_ref()) => {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    format!(
                        "{path} was mapped with cookie {have:?}, not as {spec} in {store}; \
                         if it is that image, attach with --cookie {have}"
                    ),
                ))
            }
            (Some(have), _) => have,
            (None, Some(_)) => {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    format!("{path} has no cookie (mapped through the ioctl interface, or the kernel has none): attach without --cookie"),
                ))
            }
            (None, None) => backend_id(store, spec),
        };
        return Ok((mode, nl, backend));
    }
    let backend = opts
        .cookie
        .clone()
        .unwrap_or_else(|| backend_id(store, spec));
    Ok((mode, nl, backend))
}

struct Setup<'a> {
    rt: &'a tokio::runtime::Runtime,
    export: Arc<Export>,
    spec: &'a ImageSpec,
    opts: &'a ServeOpts,
    store: &'a str,
    read_only: bool,
    connections: u32,
    /// The device's cookie (NBD_ATTR_BACKEND_IDENTIFIER).
    backend: String,
}

pub(super) struct Signals {
    pub(super) term: tokio::signal::unix::Signal,
    pub(super) int: tokio::signal::unix::Signal,
    /// `detach`.
    pub(super) usr1: tokio::signal::unix::Signal,
}

/// The device is usable: tell the waiting `map` (background), or print it and tell systemd
/// (foreground, Type=notify).
pub(super) fn report_ready(ready: &mut Option<ReadyPipe>, status: &str, path: &str) {
    match ready.take() {
        Some(r) => r.send(&format!("ready {path}")),
        None => {
            println!("{path}");
            let _ = std::io::stdout().flush();
            if let Err(e) = crate::notify::ready(status) {
                tracing::warn!("systemd notification: {e}");
            }
        }
    }
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
        let backend = self.backend.clone();
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
                if self.opts.cookie.is_some() {
                    tracing::warn!(
                        "--cookie: the nbd ioctl interface has none; the device gets no cookie"
                    );
                }
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
            (Mode::Ublk(_), _) => {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    "a ublk device is not served over NBD",
                ))
            }
        };
        // The kernel holds its own references to its ends now.
        drop(kernel_ends);
        let path = device::device_path(index);
        if self.opts.quiesce && !self.read_only {
            // Now that the device is known: the hook's first argument.
            let hook =
                crate::quiesce::QuiesceHook::new(self.opts.quiesce_hook.clone(), path.clone());
            tracing::info!(
                "{}: --quiesce: snapshots run {} around them",
                self.spec,
                hook.path.display()
            );
            self.export.enable_quiesce(hook);
        }
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
            // What the kernel took (a kernel before 5.14 keeps no cookie, and then shows
            // none, as rbd-nbd reads it back from sysfs too).
            backend: match control {
                Control::Netlink(_) => device::device_backend(index),
                Control::Ioctl(..) => None,
            },
            close_result: true,
            transport: device::Transport::Nbd,
            image_id: self.export.image_id(),
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
        // Under systemd (Type=notify) this is the moment the device is usable.
        let shown = match (&state.backend, self.opts.show_cookie) {
            (Some(c), true) => format!("{path} {c}"),
            _ => path.clone(),
        };
        report_ready(ready, &format!("{} mapped at {path}", self.spec), &shown);

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
                    name = term_or_int(&mut sig.term, &mut sig.int), if !disconnecting && !detaching => {
                        disconnecting = true;
                        tracing::info!("{path}: {name}, disconnecting");
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
/// With `cookie` (`map --cookie`), only a device with that cookie.
fn orphaned_device(
    store: &str,
    spec: &ImageSpec,
    want: Option<u32>,
    cookie: Option<&str>,
) -> Result<Option<u32>> {
    for st in device::all_states() {
        let Ok(i) = st.index() else { continue };
        let ours = |have: String| match cookie {
            Some(c) => have == c,
            None => cookie_is_ours(&have, store, spec, Some(&st)),
        };
        if state_names(&st, store, spec)
            && st.netlink
            && (want.is_none() || want == Some(i))
            && !device::daemon_alive(st.pid)
            && device::device_pid(i).is_some()
            && device::device_backend(i).is_some_and(ours)
        {
            return Ok(Some(i));
        }
    }
    Ok(None)
}

/// Waits for SIGTERM or SIGINT, which end a mapping alike, and names the one that came.
pub(super) async fn term_or_int(
    term: &mut tokio::signal::unix::Signal,
    int: &mut tokio::signal::unix::Signal,
) -> &'static str {
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A takeover goes by the image's id where the state file has one: by another name
    /// (renamed since) only once the opened image is that id; never of another image that
    /// now has the name.
    #[test]
    fn takeovers_go_by_image_id() {
        let vm1: ImageSpec = "rbd/vm1".parse().unwrap();
        let renamed: ImageSpec = "rbd/vm2".parse().unwrap();
        let mut st = device::test_state(true);
        st.pid = 0;
        st.detached = true;
        st.store = "dir:/x".into();
        // The names agree: taken over, and the id then checked.
        assert!(may_take_over("/dev/nbd3", &st, true, "dir:/x", &vm1).is_ok());
        assert!(check_same_id(&st, "10ab", &vm1, "/dev/nbd3").is_ok());
        let e = check_same_id(&st, "99ff", &vm1, "/dev/nbd3").unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidInput);
        assert!(
            e.message.contains("image id 10ab") && e.message.contains("image id 99ff"),
            "{e}"
        );
        // Another name: left to the id check, in the same store and pool only.
        assert!(may_take_over("/dev/nbd3", &st, false, "dir:/x", &renamed).is_ok());
        assert!(check_same_id(&st, "10ab", &renamed, "/dev/nbd3").is_ok());
        assert!(may_take_over("/dev/nbd3", &st, false, "dir:/y", &renamed).is_err());
        let other_pool: ImageSpec = "p2/vm1".parse().unwrap();
        assert!(may_take_over("/dev/nbd3", &st, false, "dir:/x", &other_pool).is_err());
        // An older daemon's state file has no id: the name alone decides, as before.
        st.image_id.clear();
        assert!(may_take_over("/dev/nbd3", &st, false, "dir:/x", &renamed).is_err());
        assert!(check_same_id(&st, "99ff", &vm1, "/dev/nbd3").is_ok());
    }

    #[test]
    fn cookies() {
        let spec: ImageSpec = "rbd/vm1".parse().unwrap();
        // Ours is one word (a list-mapped column), also for a store path with spaces.
        assert_eq!(backend_id("dir:/x", &spec), "rados-nbd:dir:/x:rbd/vm1");
        assert_eq!(
            backend_id("dir:/my store", &spec),
            "rados-nbd:dir:/my_store:rbd/vm1"
        );
        // The spec comes last, with no raw ':' (udev's helper splits at the last one).
        let odd: ImageSpec = "p/ns/a:b@s:1".parse().unwrap();
        assert_eq!(
            backend_id("ceph:", &odd),
            "rados-nbd:ceph::p/ns/a%3Ab@s%3A1"
        );
        // White space and control characters byte by byte (UTF-8), other Unicode as it is:
        // still one word, one line.
        let odd: ImageSpec = "p/a b\u{3000}c\nd\u{1}é%".parse().unwrap();
        assert_eq!(
            backend_id("ceph:", &odd),
            "rados-nbd:ceph::p/a%20b%E3%80%80c%0Ad%01é%25"
        );
        let mut st = device::test_state(true);
        // Without --cookie, attach takes ours, the one of older versions, or the one
        // recorded for this image when it was mapped; nothing else.
        assert!(cookie_is_ours(
            "rados-nbd:dir:/x:rbd/vm1",
            "dir:/x",
            &spec,
            None
        ));
        assert!(cookie_is_ours(
            "rados-nbd dir:/x rbd/vm1",
            "dir:/x",
            &spec,
            None
        ));
        assert!(!cookie_is_ours(
            "rados-nbd:dir:/y:rbd/vm1",
            "dir:/x",
            &spec,
            None
        ));
        assert!(!cookie_is_ours("mine", "dir:/x", &spec, Some(&st)));
        st.backend = Some("mine".into());
        assert!(cookie_is_ours("mine", "dir:/x", &spec, Some(&st)));
        assert!(!cookie_is_ours("theirs", "dir:/x", &spec, Some(&st)));
        let other: ImageSpec = "rbd/vm2".parse().unwrap();
        assert!(
            !cookie_is_ours("mine", "dir:/x", &other, Some(&st)),
            "recorded for another image"
        );
        assert!(
            !cookie_is_ours("mine", "dir:/y", &spec, Some(&st)),
            "another store"
        );
    }
}
