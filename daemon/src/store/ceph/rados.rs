//! Our own binding to the librados C API (Ceph 16.2 `librados.h`) with a small safe,
//! asynchronous wrapper.
//!
//! Why our own: the crates.io `librados` 0.2 binding only reads and bundles its own copy of
//! the shared library, and `ceph` 3.2 is synchronous (one blocked thread per I/O). We need
//! the `rados_aio_*` calls, write/read operations, class method calls (`exec`) and
//! watch/notify, driven from tokio without a thread per request: every asynchronous call
//! gets a librados completion whose callback hands the result to a tokio oneshot channel.
//!
//! Memory safety of asynchronous calls: everything librados may touch until the completion
//! fires (read buffers, return-value slots, output pointers, the operation handle) lives in
//! a heap "slot" whose ownership passes to the completion callback. Dropping the Rust future
//! early therefore never frees memory librados still writes to; the callback frees it.

#![allow(non_camel_case_types)]

use crate::error::{Error, ErrorKind, Result};
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::ptr::{null, null_mut};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

type rados_t = *mut c_void;
type rados_ioctx_t = *mut c_void;
type rados_completion_t = *mut c_void;
type rados_write_op_t = *mut c_void;
type rados_read_op_t = *mut c_void;
type rados_list_ctx_t = *mut c_void;
type rados_omap_iter_t = *mut c_void;
type rados_callback_t = Option<unsafe extern "C" fn(rados_completion_t, *mut c_void)>;
type rados_watchcb2_t =
    Option<unsafe extern "C" fn(*mut c_void, u64, u64, u64, *mut c_void, usize)>;
type rados_watcherrcb_t = Option<unsafe extern "C" fn(*mut c_void, u64, c_int)>;
/// `time_t` on every 64-bit Linux target we build for.
type time_t = i64;

/// `LIBRADOS_SNAP_HEAD` (also Ceph's `CEPH_NOSNAP`).
pub const SNAP_HEAD: u64 = u64::MAX - 1;

#[link(name = "rados")]
extern "C" {
    fn rados_create(cluster: *mut rados_t, id: *const c_char) -> c_int;
    fn rados_conf_read_file(cluster: rados_t, path: *const c_char) -> c_int;
    fn rados_conf_parse_env(cluster: rados_t, var: *const c_char) -> c_int;
    fn rados_conf_set(cluster: rados_t, option: *const c_char, value: *const c_char) -> c_int;
    fn rados_conf_get(
        cluster: rados_t,
        option: *const c_char,
        buf: *mut c_char,
        len: usize,
    ) -> c_int;
    fn rados_connect(cluster: rados_t) -> c_int;
    fn rados_shutdown(cluster: rados_t);
    fn rados_watch_flush(cluster: rados_t) -> c_int;
    fn rados_get_instance_id(cluster: rados_t) -> u64;
    fn rados_blocklist_add(
        cluster: rados_t,
        client_address: *mut c_char,
        expire_seconds: u32,
    ) -> c_int;
    fn rados_ioctx_create(cluster: rados_t, pool: *const c_char, io: *mut rados_ioctx_t) -> c_int;
    fn rados_ioctx_destroy(io: rados_ioctx_t);
    fn rados_ioctx_set_namespace(io: rados_ioctx_t, nspace: *const c_char);
    fn rados_ioctx_snap_set_read(io: rados_ioctx_t, snap: u64);
    fn rados_ioctx_selfmanaged_snap_set_write_ctx(
        io: rados_ioctx_t,
        seq: u64,
        snaps: *mut u64,
        num_snaps: c_int,
    ) -> c_int;
    fn rados_nobjects_list_open(io: rados_ioctx_t, ctx: *mut rados_list_ctx_t) -> c_int;
    fn rados_nobjects_list_next2(
        ctx: rados_list_ctx_t,
        entry: *mut *const c_char,
        key: *mut *const c_char,
        nspace: *mut *const c_char,
        entry_size: *mut usize,
        key_size: *mut usize,
        nspace_size: *mut usize,
    ) -> c_int;
    fn rados_nobjects_list_close(ctx: rados_list_ctx_t);

    fn rados_aio_create_completion2(
        arg: *mut c_void,
        cb_complete: rados_callback_t,
        pc: *mut rados_completion_t,
    ) -> c_int;
    fn rados_aio_get_return_value(c: rados_completion_t) -> c_int;
    fn rados_aio_release(c: rados_completion_t);
    fn rados_aio_read(
        io: rados_ioctx_t,
        oid: *const c_char,
        c: rados_completion_t,
        buf: *mut c_char,
        len: usize,
        off: u64,
    ) -> c_int;
    fn rados_aio_remove(io: rados_ioctx_t, oid: *const c_char, c: rados_completion_t) -> c_int;
    fn rados_aio_stat(
        io: rados_ioctx_t,
        oid: *const c_char,
        c: rados_completion_t,
        psize: *mut u64,
        pmtime: *mut time_t,
    ) -> c_int;
    fn rados_aio_exec(
        io: rados_ioctx_t,
        oid: *const c_char,
        c: rados_completion_t,
        cls: *const c_char,
        method: *const c_char,
        in_buf: *const c_char,
        in_len: usize,
        buf: *mut c_char,
        out_len: usize,
    ) -> c_int;

    fn rados_create_write_op() -> rados_write_op_t;
    fn rados_release_write_op(op: rados_write_op_t);
    fn rados_write_op_assert_exists(op: rados_write_op_t);
    fn rados_write_op_create(op: rados_write_op_t, exclusive: c_int, category: *const c_char);
    fn rados_write_op_write(op: rados_write_op_t, buf: *const c_char, len: usize, off: u64);
    fn rados_write_op_write_full(op: rados_write_op_t, buf: *const c_char, len: usize);
    fn rados_write_op_remove(op: rados_write_op_t);
    fn rados_write_op_truncate(op: rados_write_op_t, off: u64);
    fn rados_write_op_zero(op: rados_write_op_t, off: u64, len: u64);
    fn rados_write_op_exec(
        op: rados_write_op_t,
        cls: *const c_char,
        method: *const c_char,
        in_buf: *const c_char,
        in_len: usize,
        prval: *mut c_int,
    );
    fn rados_write_op_omap_set(
        op: rados_write_op_t,
        keys: *const *const c_char,
        vals: *const *const c_char,
        lens: *const usize,
        num: usize,
    );
    fn rados_write_op_set_alloc_hint2(
        op: rados_write_op_t,
        expected_object_size: u64,
        expected_write_size: u64,
        flags: u32,
    );
    fn rados_aio_write_op_operate(
        op: rados_write_op_t,
        io: rados_ioctx_t,
        c: rados_completion_t,
        oid: *const c_char,
        mtime: *mut time_t,
        flags: c_int,
    ) -> c_int;

    fn rados_create_read_op() -> rados_read_op_t;
    fn rados_release_read_op(op: rados_read_op_t);
    fn rados_read_op_exec(
        op: rados_read_op_t,
        cls: *const c_char,
        method: *const c_char,
        in_buf: *const c_char,
        in_len: usize,
        out_buf: *mut *mut c_char,
        out_len: *mut usize,
        prval: *mut c_int,
    );
    fn rados_read_op_omap_get_vals2(
        op: rados_read_op_t,
        start_after: *const c_char,
        filter_prefix: *const c_char,
        max_return: u64,
        iter: *mut rados_omap_iter_t,
        pmore: *mut u8,
        prval: *mut c_int,
    );
    fn rados_omap_get_next2(
        iter: rados_omap_iter_t,
        key: *mut *mut c_char,
        val: *mut *mut c_char,
        key_len: *mut usize,
        val_len: *mut usize,
    ) -> c_int;
    fn rados_omap_get_end(iter: rados_omap_iter_t);
    fn rados_aio_read_op_operate(
        op: rados_read_op_t,
        io: rados_ioctx_t,
        c: rados_completion_t,
        oid: *const c_char,
        flags: c_int,
    ) -> c_int;
    fn rados_buffer_free(buf: *mut c_char);

    fn rados_aio_watch2(
        io: rados_ioctx_t,
        oid: *const c_char,
        c: rados_completion_t,
        handle: *mut u64,
        watchcb: rados_watchcb2_t,
        watcherrcb: rados_watcherrcb_t,
        timeout: u32,
        arg: *mut c_void,
    ) -> c_int;
    fn rados_aio_unwatch(io: rados_ioctx_t, cookie: u64, c: rados_completion_t) -> c_int;
    fn rados_aio_watch_flush(cluster: rados_t, c: rados_completion_t) -> c_int;
    fn rados_aio_notify(
        io: rados_ioctx_t,
        oid: *const c_char,
        c: rados_completion_t,
        buf: *const c_char,
        buf_len: c_int,
        timeout_ms: u64,
        reply_buffer: *mut *mut c_char,
        reply_buffer_len: *mut usize,
    ) -> c_int;
    fn rados_notify_ack(
        io: rados_ioctx_t,
        oid: *const c_char,
        notify_id: u64,
        cookie: u64,
        buf: *const c_char,
        buf_len: c_int,
    ) -> c_int;
}

const ENOENT: i32 = 2;
const EEXIST: i32 = 17;
const EBUSY: i32 = 16;
const ENOSPC: i32 = 28;
const EROFS: i32 = 30;
const EDQUOT: i32 = 122;
const ETIMEDOUT: i32 = 110;
const EINVAL: i32 = 22;
const EPERM: i32 = 1;
const EIO: i32 = 5;
const EACCES: i32 = 13;
/// librados reports a blocklisted client as ESHUTDOWN.
pub const EBLOCKLISTED: i32 = 108;

/// An error from librados: names the operation and the object, carries the errno.
pub fn rados_error(op: &str, object: &str, r: i32) -> Error {
    let errno = r.checked_neg().unwrap_or(i32::MAX);
    let kind = match errno {
        ENOENT => ErrorKind::NotFound,
        EEXIST => ErrorKind::AlreadyExists,
        ENOSPC | EDQUOT => ErrorKind::NoSpace,
        EBUSY => ErrorKind::Busy,
        ETIMEDOUT => ErrorKind::TimedOut,
        EROFS => ErrorKind::ReadOnly,
        EINVAL => ErrorKind::InvalidInput,
        _ => ErrorKind::Io,
    };
    let text = if errno == EBLOCKLISTED {
        "client is blocklisted by the cluster".to_string()
    } else {
        let t = std::io::Error::from_raw_os_error(errno).to_string();
        // Display appends " (os error N)"; we print the errno ourselves.
        t.split(" (os error").next().unwrap_or(&t).to_string()
    };
    let what = if object.is_empty() {
        op.to_string()
    } else {
        format!("{op} {object}")
    };
    Error::new(kind, format!("rados {what}: {text} (errno {errno})"))
}

/// The errno of an error built by [`rados_error`], if it was one (for callers that react to
/// one specific errno, e.g. -EBUSY from cls_lock).
pub fn errno_of(e: &Error) -> Option<i32> {
    let tail = e.message.rsplit_once("(errno ")?.1;
    tail.strip_suffix(')')?.parse().ok()
}

/// Whether an error says this client is blocklisted (fenced off by another client).
pub fn is_blocklisted(e: &Error) -> bool {
    errno_of(e) == Some(EBLOCKLISTED)
}

fn cstring(what: &str, s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| {
        Error::new(
            ErrorKind::InvalidInput,
            format!("{what} {s:?} contains a NUL byte"),
        )
    })
}

// ---------------------------------------------------------------------------------------
// Completions turned into futures
// ---------------------------------------------------------------------------------------

struct Slot<K> {
    keep: K,
    tx: oneshot::Sender<(i32, K)>,
}

/// Asynchronous librados operations submitted and not yet called back, process-wide.
/// `Rados::drop` waits (bounded) for them to come back before `rados_shutdown`: shutting
/// the cluster handle down with an operation still out lets its reply reach a torn-down
/// dispatcher, a SIGSEGV in a messenger thread (seen after `rados-nbd resize` returned
/// while the lock-acquired notify it had sent was still waiting for its acks).
static IN_FLIGHT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// The longest `Rados::drop` waits for operations still out (a notify lasts at most its
/// own timeout, 5 s for ours).
const SHUTDOWN_DRAIN: std::time::Duration = std::time::Duration::from_secs(10);

fn in_flight() -> usize {
    IN_FLIGHT.load(std::sync::atomic::Ordering::Acquire)
}

unsafe extern "C" fn on_complete<K: Send + 'static>(c: rados_completion_t, arg: *mut c_void) {
    // SAFETY: `arg` is the Box<Slot<K>> leaked by `aio` for exactly this completion; the
    // callback runs once, so we are its only owner now.
    let slot = unsafe { Box::from_raw(arg as *mut Slot<K>) };
    IN_FLIGHT.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    let r = unsafe { rados_aio_get_return_value(c) };
    // The callback holds its own reference on the completion, so releasing ours here is
    // allowed (librados' CB_AioComplete takes a reference for the duration of the call).
    unsafe { rados_aio_release(c) };
    let Slot { keep, tx } = *slot;
    // When the future was dropped, `keep` is dropped here, after librados is done with it.
    let _ = tx.send((r, keep));
}

/// Runs one asynchronous librados call. `keep` holds everything librados may touch until
/// completion; `start` gets a pointer to it (stable: it lives in a heap slot) and the
/// completion, and returns the librados submit result.
async fn aio<K, F>(keep: K, start: F) -> (i32, Option<K>)
where
    K: Send + 'static,
    F: FnOnce(*mut K, rados_completion_t) -> c_int,
{
    // Submission is synchronous and keeps its raw pointers out of the future's state.
    let rx = match submit(keep, start) {
        Ok(rx) => rx,
        Err((r, keep)) => return (r, Some(keep)),
    };
    match rx.await {
        Ok((r, keep)) => (r, Some(keep)),
        // The sender is only dropped without sending if librados drops the completion
        // without calling back (cluster shut down under us).
        Err(_) => (-ETIMEDOUT, None),
    }
}

#[allow(clippy::type_complexity)]
fn submit<K, F>(keep: K, start: F) -> std::result::Result<oneshot::Receiver<(i32, K)>, (i32, K)>
where
    K: Send + 'static,
    F: FnOnce(*mut K, rados_completion_t) -> c_int,
{
    let (tx, rx) = oneshot::channel();
    let raw = Box::into_raw(Box::new(Slot { keep, tx }));
    let mut c: rados_completion_t = null_mut();
    // SAFETY: plain constructor; `raw` stays valid until the callback runs.
    let r =
        unsafe { rados_aio_create_completion2(raw as *mut c_void, Some(on_complete::<K>), &mut c) };
    if r < 0 {
        // SAFETY: no completion exists, so nobody else owns the slot.
        let slot = unsafe { Box::from_raw(raw) };
        return Err((r, slot.keep));
    }
    // SAFETY: `raw` points to a live slot; only the field address is taken.
    let keep_ptr = unsafe { std::ptr::addr_of_mut!((*raw).keep) };
    // Counted before submission: the callback may run (and count down) before `start`
    // returns.
    IN_FLIGHT.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    let r = start(keep_ptr, c);
    if r < 0 {
        IN_FLIGHT.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        // Submission failed synchronously: the callback will never run.
        unsafe { rados_aio_release(c) };
        let slot = unsafe { Box::from_raw(raw) };
        return Err((r, slot.keep));
    }
    Ok(rx)
}

// ---------------------------------------------------------------------------------------
// Cluster and pool handles
// ---------------------------------------------------------------------------------------

/// How to connect, like the `rbd` tool's `-c`, `--id`, `--keyring`.
///
/// Holds no secret, so `Debug` is safe to print: the cephx key is never read by this
/// process's own code. librados reads it from the keyring file (the `keyring` option) and
/// keeps it inside; it never passes through a Rust value, a log line or an error message.
#[derive(Debug, Clone, Default)]
pub struct ConnectOptions {
    /// Config file; `None` = librados' default search ($CEPH_CONF, /etc/ceph/ceph.conf, ...).
    pub conf: Option<String>,
    /// Client id without `client.` (`admin`); `None` = librados' default.
    pub id: Option<String>,
    /// Keyring file (or librados' comma-separated search list); `None` = the config's
    /// `keyring` option.
    pub keyring: Option<String>,
    /// More config options, e.g. `("rados_osd_op_timeout", "30")`.
    pub options: Vec<(String, String)>,
}

/// A connected cluster handle (`rados_t`).
pub struct Rados {
    h: rados_t,
    /// rados_connect succeeded: only then are there watch/notify callbacks to flush (and
    /// rados_watch_flush on a handle that never connected crashes).
    connected: bool,
}

// SAFETY: librados handles are thread-safe (the C API is used from many threads by design).
unsafe impl Send for Rados {}
unsafe impl Sync for Rados {}

impl Drop for Rados {
    fn drop(&mut self) {
        // Operations whose futures were dropped (a fire-and-forget notify, a command that
        // failed part way) still have replies coming: let them arrive first (see
        // IN_FLIGHT). Callbacks run on librados' own threads, so waiting here cannot
        // hold them up, whichever thread drops the handle.
        let start = std::time::Instant::now();
        while in_flight() > 0 && start.elapsed() < SHUTDOWN_DRAIN {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        if in_flight() > 0 {
            tracing::warn!(
                "shutting down the cluster connection with {} operations still out",
                in_flight()
            );
        }
        // Watch and notify callbacks still running or queued (a header update we sent to
        // our own watch, a notify completing) must be done before the handle goes:
        // librados' own advice before shutting down.
        if self.connected {
            // SAFETY: the handle is live and connected until rados_shutdown below.
            unsafe { rados_watch_flush(self.h) };
        }
        // SAFETY: the handle was created by rados_create and is dropped once.
        unsafe { rados_shutdown(self.h) }
    }
}

struct RawCluster(rados_t);
unsafe impl Send for RawCluster {}

impl Rados {
    /// Reads the config and connects. Connecting blocks (monitor round trips), so it runs
    /// on tokio's blocking pool.
    pub async fn connect(opts: ConnectOptions) -> Result<Arc<Rados>> {
        tokio::task::spawn_blocking(move || Self::connect_blocking(&opts))
            .await
            .map_err(|e| Error::new(ErrorKind::Io, format!("connecting to ceph: {e}")))?
    }

    fn connect_blocking(opts: &ConnectOptions) -> Result<Arc<Rados>> {
        let id = opts
            .id
            .as_deref()
            .map(|i| cstring("client id", i))
            .transpose()?;
        let mut h: rados_t = null_mut();
        // SAFETY: out-pointer to a local; id is a valid C string or NULL.
        let r = unsafe { rados_create(&mut h, id.as_ref().map_or(null(), |c| c.as_ptr())) };
        if r < 0 {
            return Err(rados_error("create cluster handle for", "client", r));
        }
        let mut cluster = Rados {
            h,
            connected: false,
        };
        let conf = opts
            .conf
            .as_deref()
            .map(|c| cstring("config path", c))
            .transpose()?;
        let r = unsafe {
            rados_conf_read_file(cluster.h, conf.as_ref().map_or(null(), |c| c.as_ptr()))
        };
        if r < 0 {
            if opts.conf.is_none() && r == -ENOENT {
                return Err(Error::new(
                    ErrorKind::NotFound,
                    "no Ceph config found ($CEPH_CONF, /etc/ceph/ceph.conf, ~/.ceph/config, \
                     ./ceph.conf): name one with --store ceph:/path/to/ceph.conf",
                ));
            }
            let what = opts.conf.as_deref().unwrap_or("");
            return Err(rados_error("read config", what, r));
        }
        // CEPH_ARGS, like the ceph tools.
        let _ = unsafe { rados_conf_parse_env(cluster.h, null()) };
        let set = |k: &str, v: &str| -> Result<()> {
            let (ck, cv) = (cstring("config option", k)?, cstring("config value", v)?);
            let r = unsafe { rados_conf_set(cluster.h, ck.as_ptr(), cv.as_ptr()) };
            if r < 0 {
                return Err(rados_error(
                    "set config option",
                    &option_for_message(k, v),
                    r,
                ));
            }
            Ok(())
        };
        if let Some(k) = &opts.keyring {
            check_keyring_readable(k)?;
            set("keyring", k)?;
        }
        for (k, v) in &opts.options {
            set(k, v)?;
        }
        let r = unsafe { rados_connect(cluster.h) };
        if r < 0 {
            return Err(connect_error(&cluster, opts, r));
        }
        cluster.connected = true;
        Ok(Arc::new(cluster))
    }

    /// A config value as librados resolved it (`$name` etc. expanded). Only for options
    /// that name things (`name`, `keyring`, `log_file`): never a secret (`key`).
    fn conf_get(&self, option: &str) -> Option<String> {
        debug_assert!(!matches!(option, "key" | "keyfile"));
        let copt = CString::new(option).ok()?;
        let mut buf = vec![0u8; 4096];
        // SAFETY: buf is writable for its length; librados NUL-terminates within it.
        let r = unsafe {
            rados_conf_get(
                self.h,
                copt.as_ptr(),
                buf.as_mut_ptr().cast::<c_char>(),
                buf.len(),
            )
        };
        if r < 0 {
            return None;
        }
        let s = CStr::from_bytes_until_nul(&buf).ok()?;
        Some(s.to_string_lossy().into_owned())
    }

    /// This client's global id (`client.<gid>`).
    pub fn instance_id(&self) -> u64 {
        unsafe { rados_get_instance_id(self.h) }
    }

    /// Blocklists a client address (`ip:port/nonce`) on every OSD for `expire_seconds` (0:
    /// the cluster's `mon_osd_blocklist_default_expire`, one hour by default), as librbd
    /// does before breaking a dead owner's lock. librados returns once the monitors
    /// committed it and this client has the osdmap that holds it, so whatever we send
    /// afterwards is ordered after the fence at every OSD. A mon command: blocking, run on
    /// tokio's blocking pool.
    pub async fn blocklist_add(self: &Arc<Self>, addr: &str, expire_seconds: u32) -> Result<()> {
        let caddr = cstring("client address", addr)?;
        let me = self.clone();
        let r = tokio::task::spawn_blocking(move || {
            // SAFETY: librados only reads the string (the C prototype lacks const).
            unsafe { rados_blocklist_add(me.h, caddr.as_ptr() as *mut c_char, expire_seconds) }
        })
        .await
        .map_err(|e| Error::new(ErrorKind::Io, format!("blocklisting {addr}: {e}")))?;
        if r < 0 {
            return Err(rados_error("blocklist add", addr, r));
        }
        Ok(())
    }

    pub fn ioctx(self: &Arc<Self>, pool: &str) -> Result<Arc<IoCtx>> {
        self.ioctx_in(pool, "")
    }

    /// A handle on `pool` whose every object name (watches, locks, listings too) lies in
    /// RADOS namespace `namespace` ("" is the default one), where librbd keeps the images
    /// of an RBD namespace.
    pub fn ioctx_in(self: &Arc<Self>, pool: &str, namespace: &str) -> Result<Arc<IoCtx>> {
        let cpool = cstring("pool name", pool)?;
        let cns = cstring("namespace", namespace)?;
        let mut io: rados_ioctx_t = null_mut();
        let r = unsafe { rados_ioctx_create(self.h, cpool.as_ptr(), &mut io) };
        if r < 0 {
            return Err(rados_error("open pool", pool, r));
        }
        // Before the handle is shared: librados copies the string.
        unsafe { rados_ioctx_set_namespace(io, cns.as_ptr()) };
        Ok(Arc::new(IoCtx {
            h: io,
            cluster: self.clone(),
            pool: pool.to_string(),
            namespace: namespace.to_string(),
        }))
    }

    /// Waits until every watch callback already queued has run (needed before freeing a
    /// watch's context).
    pub async fn watch_flush(&self) -> Result<()> {
        let h = RawCluster(self.h);
        let (r, _) = aio(h, |k, c| unsafe { rados_aio_watch_flush((*k).0, c) }).await;
        if r < 0 {
            return Err(rados_error("watch flush", "", r));
        }
        Ok(())
    }
}

/// `k=v` for an error message; the value of an option that holds a secret is left out.
fn option_for_message(k: &str, v: &str) -> String {
    if matches!(k, "key" | "keyfile") {
        format!("{k}=<redacted>")
    } else {
        format!("{k}={v}")
    }
}

/// An explicit `--keyring` that cannot be read is named as such, before librados turns it
/// into a bare errno from `rados_connect`. Only opened, not read: the key stays librados'.
/// A comma-separated list is librados' search path (the first that exists wins): left to it.
fn check_keyring_readable(path: &str) -> Result<()> {
    if path.contains(',') {
        return Ok(());
    }
    let what = format!("cannot read keyring {path} (--keyring)");
    let f = std::fs::File::open(path).map_err(|e| Error::io(&what, e))?;
    match f.metadata() {
        Ok(m) if m.is_dir() => Err(Error::new(
            ErrorKind::InvalidInput,
            format!("{what}: it is a directory"),
        )),
        _ => Ok(()),
    }
}

/// Why `rados_connect` failed, with who we tried to be and which keyring was used, so a
/// wrong `--id` or `--keyring` is recognisable from the one line the CLI prints.
fn connect_error(cluster: &Rados, opts: &ConnectOptions, r: i32) -> Error {
    let conf = opts.conf.as_deref().unwrap_or("(default config)");
    let name = cluster
        .conf_get("name")
        .or_else(|| opts.id.as_ref().map(|i| format!("client.{i}")))
        .unwrap_or_else(|| "client.admin".into());
    let keyring = opts
        .keyring
        .clone()
        .or_else(|| cluster.conf_get("keyring"))
        .unwrap_or_default();
    let mut e = rados_error(
        "connect to cluster of",
        &format!("{conf} as {name} with keyring {keyring}"),
        r,
    );
    let hint = match r.checked_neg() {
        Some(EACCES) | Some(EPERM) => Some(format!(
            "authentication refused: check that --id names a user the cluster knows ({name}) \
             and that the keyring holds its current key"
        )),
        Some(EIO) => Some(format!(
            "the keyring may be unparsable or hold no key for {name}"
        )),
        Some(ENOENT) => Some(format!(
            "no keyring found for {name}: name one with --keyring"
        )),
        _ => None,
    };
    let mut extra = hint.map(|h| format!("; {h}")).unwrap_or_default();
    if let Some(log) = cluster.conf_get("log_file").filter(|l| !l.is_empty()) {
        extra.push_str(&format!("; librados log: {log}"));
    }
    // The errno stays last, where `errno_of` looks for it.
    if let Some((head, tail)) = e.message.rsplit_once(" (errno ") {
        e.message = format!("{head}{extra} (errno {tail}");
    }
    e
}

/// A pool handle (`rados_ioctx_t`).
pub struct IoCtx {
    h: rados_ioctx_t,
    cluster: Arc<Rados>,
    pool: String,
    namespace: String,
}

unsafe impl Send for IoCtx {}
unsafe impl Sync for IoCtx {}

impl Drop for IoCtx {
    fn drop(&mut self) {
        // In-flight operations hold their own reference inside librados.
        unsafe { rados_ioctx_destroy(self.h) }
    }
}

/// Object size and modification time (seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    pub size: u64,
    pub mtime: i64,
}

/// The answer to a notify: who acknowledged (with their reply payloads) and who did not.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NotifyReply {
    /// (client gid, watch cookie, reply payload)
    pub acks: Vec<(u64, u64, Vec<u8>)>,
    /// (client gid, watch cookie) of watchers that did not answer in time.
    pub timeouts: Vec<(u64, u64)>,
}

impl NotifyReply {
    /// Parses librados' notify reply buffer:
    /// `le32 n, n × {le64 gid, le64 cookie, le32 len, bytes}, le32 m, m × {le64 gid, le64 cookie}`.
    pub fn parse(buf: &[u8]) -> Result<NotifyReply> {
        let mut d = super::cls::Dec::new(buf, "notify reply");
        let mut out = NotifyReply::default();
        let n = d.u32()?;
        for _ in 0..n {
            let gid = d.u64()?;
            let cookie = d.u64()?;
            let payload = d.bytes()?.to_vec();
            out.acks.push((gid, cookie, payload));
        }
        let m = d.u32()?;
        for _ in 0..m {
            out.timeouts.push((d.u64()?, d.u64()?));
        }
        Ok(out)
    }

    /// Is the watch (gid, cookie) registered (answered or timed out)?
    pub fn has_watcher(&self, gid: u64, cookie: u64) -> bool {
        self.acks.iter().any(|a| a.0 == gid && a.1 == cookie)
            || self.timeouts.iter().any(|t| t.0 == gid && t.1 == cookie)
    }
}

/// What a watch reports.
#[derive(Debug)]
pub enum WatchEvent {
    /// A notification (already acknowledged with the reply the handler chose).
    Notify { notifier_id: u64, data: Vec<u8> },
    /// The watch was lost (e.g. -ENOTCONN after an OSD connection reset); re-watch.
    Error { cookie: u64, err: i32 },
}

/// Chooses the ack payload for a notification: called on librados' callback thread, so it
/// must be quick and must not block.
pub type NotifyReplier = Box<dyn Fn(u64, &[u8]) -> Vec<u8> + Send + Sync>;

struct WatchCtx {
    /// Keeps the pool handle alive as long as a callback may use it, even if the owner of
    /// the watch forgets to unwatch.
    io: Arc<IoCtx>,
    oid: CString,
    reply: NotifyReplier,
    tx: mpsc::UnboundedSender<WatchEvent>,
}

unsafe extern "C" fn on_watch_notify(
    arg: *mut c_void,
    notify_id: u64,
    handle: u64,
    notifier_id: u64,
    data: *mut c_void,
    data_len: usize,
) {
    // SAFETY: `arg` is the WatchCtx owned by the Watch, which outlives the watch (it is only
    // freed after unwatch and a watch flush).
    let ctx = unsafe { &*(arg as *const WatchCtx) };
    let payload = if data.is_null() || data_len == 0 {
        Vec::new()
    } else {
        unsafe { std::slice::from_raw_parts(data as *const u8, data_len) }.to_vec()
    };
    let reply = (ctx.reply)(notifier_id, &payload);
    // Every notify must be acknowledged, or the notifier waits for its timeout.
    // rados_notify_ack only queues a message; it does not wait for the OSD.
    let len = c_int::try_from(reply.len()).unwrap_or(0);
    unsafe {
        rados_notify_ack(
            ctx.io.h,
            ctx.oid.as_ptr(),
            notify_id,
            handle,
            reply.as_ptr() as *const c_char,
            len,
        )
    };
    let _ = ctx.tx.send(WatchEvent::Notify {
        notifier_id,
        data: payload,
    });
}

unsafe extern "C" fn on_watch_error(arg: *mut c_void, cookie: u64, err: c_int) {
    let ctx = unsafe { &*(arg as *const WatchCtx) };
    let _ = ctx.tx.send(WatchEvent::Error { cookie, err });
}

/// A registered watch. Call [`IoCtx::unwatch`] to end it; dropping it without unwatching
/// leaks its context on purpose (librados may still call back into it).
pub struct Watch {
    pub cookie: u64,
    ctx: *mut WatchCtx,
}

unsafe impl Send for Watch {}
unsafe impl Sync for Watch {}

/// A write operation: several actions applied atomically to one object.
pub struct WriteOp {
    h: rados_write_op_t,
    /// Return-value slots of exec actions (librados writes them at completion).
    #[allow(clippy::vec_box)] // boxed: librados keeps pointers to them while the Vec grows
    prvals: Vec<Box<c_int>>,
}

unsafe impl Send for WriteOp {}

impl Drop for WriteOp {
    fn drop(&mut self) {
        unsafe { rados_release_write_op(self.h) }
    }
}

impl Default for WriteOp {
    fn default() -> Self {
        Self::new()
    }
}

// The C API copies data, names and inputs into its own buffers when an action is added,
// so only the return-value slots have to outlive the call.
impl WriteOp {
    pub fn new() -> Self {
        WriteOp {
            h: unsafe { rados_create_write_op() },
            prvals: Vec::new(),
        }
    }
    pub fn assert_exists(&mut self) -> &mut Self {
        unsafe { rados_write_op_assert_exists(self.h) };
        self
    }
    pub fn create(&mut self, exclusive: bool) -> &mut Self {
        unsafe { rados_write_op_create(self.h, exclusive as c_int, null()) };
        self
    }
    pub fn write(&mut self, off: u64, data: &[u8]) -> &mut Self {
        unsafe { rados_write_op_write(self.h, data.as_ptr() as *const c_char, data.len(), off) };
        self
    }
    pub fn write_full(&mut self, data: &[u8]) -> &mut Self {
        unsafe { rados_write_op_write_full(self.h, data.as_ptr() as *const c_char, data.len()) };
        self
    }
    pub fn zero(&mut self, off: u64, len: u64) -> &mut Self {
        unsafe { rados_write_op_zero(self.h, off, len) };
        self
    }
    pub fn truncate(&mut self, off: u64) -> &mut Self {
        unsafe { rados_write_op_truncate(self.h, off) };
        self
    }
    pub fn remove(&mut self) -> &mut Self {
        unsafe { rados_write_op_remove(self.h) };
        self
    }
    /// Like librbd: tell the OSD the object's expected size so BlueStore allocates well.
    pub fn set_alloc_hint(&mut self, object_size: u64, write_size: u64) -> &mut Self {
        unsafe { rados_write_op_set_alloc_hint2(self.h, object_size, write_size, 0) };
        self
    }
    pub fn exec(&mut self, cls: &CStr, method: &CStr, input: &[u8]) -> &mut Self {
        let mut slot = Box::new(0 as c_int);
        let p: *mut c_int = &mut *slot;
        unsafe {
            rados_write_op_exec(
                self.h,
                cls.as_ptr(),
                method.as_ptr(),
                input.as_ptr() as *const c_char,
                input.len(),
                p,
            )
        };
        self.prvals.push(slot);
        self
    }
    pub fn omap_set(&mut self, pairs: &[(&str, &[u8])]) -> Result<&mut Self> {
        let keys = pairs
            .iter()
            .map(|(k, _)| cstring("omap key", k))
            .collect::<Result<Vec<_>>>()?;
        let kp: Vec<*const c_char> = keys.iter().map(|k| k.as_ptr()).collect();
        let vp: Vec<*const c_char> = pairs
            .iter()
            .map(|p| p.1.as_ptr() as *const c_char)
            .collect();
        let lens: Vec<usize> = pairs.iter().map(|p| p.1.len()).collect();
        unsafe {
            rados_write_op_omap_set(self.h, kp.as_ptr(), vp.as_ptr(), lens.as_ptr(), pairs.len())
        };
        Ok(self)
    }
}

struct ExecOut {
    op: rados_read_op_t,
    buf: *mut c_char,
    len: usize,
    prval: c_int,
}
unsafe impl Send for ExecOut {}
impl Drop for ExecOut {
    fn drop(&mut self) {
        unsafe {
            if !self.buf.is_null() {
                rados_buffer_free(self.buf);
            }
            rados_release_read_op(self.op);
        }
    }
}

struct OmapOut {
    op: rados_read_op_t,
    iter: rados_omap_iter_t,
    more: u8,
    prval: c_int,
}
unsafe impl Send for OmapOut {}
impl Drop for OmapOut {
    fn drop(&mut self) {
        unsafe {
            if !self.iter.is_null() {
                rados_omap_get_end(self.iter);
            }
            rados_release_read_op(self.op);
        }
    }
}

struct Keep<T>(T);
unsafe impl<T> Send for Keep<T> {}

impl IoCtx {
    pub fn pool(&self) -> &str {
        &self.pool
    }
    pub fn namespace(&self) -> &str {
        &self.namespace
    }
    pub fn cluster(&self) -> &Arc<Rados> {
        &self.cluster
    }
    /// The raw handle, for our C++ shim (snaps.rs); valid while `self` lives.
    pub(super) fn raw(&self) -> rados_ioctx_t {
        self.h
    }

    /// A second handle on the same pool reading at `snap` (reads are per handle in librados).
    pub fn at_snap(&self, snap: u64) -> Result<Arc<IoCtx>> {
        let io = self.cluster.ioctx_in(&self.pool, &self.namespace)?;
        unsafe { rados_ioctx_snap_set_read(io.h, snap) };
        Ok(io)
    }

    /// The snapshot context carried by every write from this handle (newest snap first).
    pub fn set_snap_write_ctx(&self, seq: u64, snaps: &[u64]) -> Result<()> {
        let mut v = snaps.to_vec();
        let n = c_int::try_from(v.len()).map_err(|_| {
            Error::new(
                ErrorKind::InvalidInput,
                "snapshot context too large".to_string(),
            )
        })?;
        let r =
            unsafe { rados_ioctx_selfmanaged_snap_set_write_ctx(self.h, seq, v.as_mut_ptr(), n) };
        if r < 0 {
            return Err(rados_error(
                "set snapshot write context in pool",
                &self.pool,
                r,
            ));
        }
        Ok(())
    }

    /// Reads up to `len` bytes at `off`; `None` when the object does not exist.
    pub async fn read(&self, oid: &str, off: u64, len: usize) -> Result<Option<Vec<u8>>> {
        let coid = cstring("object name", oid)?;
        let io = self.h as usize;
        let keep = Keep((coid, vec![0u8; len]));
        let (r, keep) = aio(keep, |k, c| unsafe {
            let k = &mut *k;
            rados_aio_read(
                io as rados_ioctx_t,
                k.0 .0.as_ptr(),
                c,
                k.0 .1.as_mut_ptr() as *mut c_char,
                len,
                off,
            )
        })
        .await;
        if r == -ENOENT {
            return Ok(None);
        }
        if r < 0 {
            return Err(rados_error("read", oid, r));
        }
        let mut buf = keep.map(|k| k.0 .1).unwrap_or_default();
        buf.truncate(r as usize);
        Ok(Some(buf))
    }

    pub async fn stat(&self, oid: &str) -> Result<Option<Stat>> {
        let coid = cstring("object name", oid)?;
        let io = self.h as usize;
        let keep = Keep((coid, 0u64, 0 as time_t));
        let (r, keep) = aio(keep, |k, c| unsafe {
            let k = &mut *k;
            rados_aio_stat(
                io as rados_ioctx_t,
                k.0 .0.as_ptr(),
                c,
                &mut k.0 .1,
                &mut k.0 .2,
            )
        })
        .await;
        if r == -ENOENT {
            return Ok(None);
        }
        if r < 0 {
            return Err(rados_error("stat", oid, r));
        }
        let k = keep.ok_or_else(|| rados_error("stat", oid, -ETIMEDOUT))?;
        Ok(Some(Stat {
            size: k.0 .1,
            mtime: k.0 .2,
        }))
    }

    /// Removes an object; `Ok(false)` when it did not exist.
    pub async fn remove(&self, oid: &str) -> Result<bool> {
        let coid = cstring("object name", oid)?;
        let io = self.h as usize;
        let (r, _) = aio(Keep(coid), |k, c| unsafe {
            rados_aio_remove(io as rados_ioctx_t, (*k).0.as_ptr(), c)
        })
        .await;
        if r == -ENOENT {
            return Ok(false);
        }
        if r < 0 {
            return Err(rados_error("remove", oid, r));
        }
        Ok(true)
    }

    /// Applies a write operation atomically. `what` names it in errors ("write", "cls rbd.create").
    pub async fn operate(&self, oid: &str, op: WriteOp, what: &str) -> Result<()> {
        let coid = cstring("object name", oid)?;
        let io = self.h as usize;
        let (r, _) = aio(Keep((coid, op)), |k, c| unsafe {
            let k = &mut *k;
            rados_aio_write_op_operate(
                k.0 .1.h,
                io as rados_ioctx_t,
                c,
                k.0 .0.as_ptr(),
                null_mut(),
                0,
            )
        })
        .await;
        if r < 0 {
            return Err(rados_error(what, oid, r));
        }
        Ok(())
    }

    /// Calls a class method that only reads (`get_size`, `dir_list`, ...), returning its output.
    pub async fn exec_read(
        &self,
        oid: &str,
        cls: &str,
        method: &str,
        input: &[u8],
    ) -> Result<Vec<u8>> {
        let what = format!("cls {cls}.{method} on");
        let coid = cstring("object name", oid)?;
        let ccls = cstring("class", cls)?;
        let cmethod = cstring("method", method)?;
        let io = self.h as usize;
        let out = ExecOut {
            op: unsafe { rados_create_read_op() },
            buf: null_mut(),
            len: 0,
            prval: 0,
        };
        let input = input.to_vec();
        let (r, keep) = aio(Keep((coid, out)), |k, c| unsafe {
            let k = &mut *k;
            let o = &mut k.0 .1;
            rados_read_op_exec(
                o.op,
                ccls.as_ptr(),
                cmethod.as_ptr(),
                input.as_ptr() as *const c_char,
                input.len(),
                &mut o.buf,
                &mut o.len,
                &mut o.prval,
            );
            rados_aio_read_op_operate(o.op, io as rados_ioctx_t, c, k.0 .0.as_ptr(), 0)
        })
        .await;
        if r < 0 {
            return Err(rados_error(&what, oid, r));
        }
        let k = keep.ok_or_else(|| rados_error(&what, oid, -ETIMEDOUT))?;
        let o = &k.0 .1;
        if o.prval < 0 {
            return Err(rados_error(&what, oid, o.prval));
        }
        if o.buf.is_null() || o.len == 0 {
            return Ok(Vec::new());
        }
        Ok(unsafe { std::slice::from_raw_parts(o.buf as *const u8, o.len) }.to_vec())
    }

    /// Calls a class method that writes, through `rados_aio_exec` (its output is ignored).
    pub async fn exec_write(&self, oid: &str, cls: &str, method: &str, input: &[u8]) -> Result<()> {
        let mut op = WriteOp::new();
        op.exec(&cstring("class", cls)?, &cstring("method", method)?, input);
        self.operate(oid, op, &format!("cls {cls}.{method} on"))
            .await
    }

    /// `rados_aio_exec` with a caller-sized output buffer; kept for small fixed outputs.
    pub async fn exec_small(
        &self,
        oid: &str,
        cls: &str,
        method: &str,
        input: &[u8],
        out_max: usize,
    ) -> Result<Vec<u8>> {
        let what = format!("cls {cls}.{method} on");
        let coid = cstring("object name", oid)?;
        let ccls = cstring("class", cls)?;
        let cmethod = cstring("method", method)?;
        let io = self.h as usize;
        let keep = Keep((coid, input.to_vec(), vec![0u8; out_max]));
        let (r, keep) = aio(keep, |k, c| unsafe {
            let k = &mut *k;
            rados_aio_exec(
                io as rados_ioctx_t,
                k.0 .0.as_ptr(),
                c,
                ccls.as_ptr(),
                cmethod.as_ptr(),
                k.0 .1.as_ptr() as *const c_char,
                k.0 .1.len(),
                k.0 .2.as_mut_ptr() as *mut c_char,
                out_max,
            )
        })
        .await;
        if r < 0 {
            return Err(rados_error(&what, oid, r));
        }
        let mut out = keep.map(|k| k.0 .2).unwrap_or_default();
        out.truncate((r as usize).min(out_max));
        Ok(out)
    }

    /// One page of omap key/values after `start_after` with `prefix`; the bool says whether
    /// more remain.
    pub async fn omap_get_vals(
        &self,
        oid: &str,
        start_after: &str,
        prefix: &str,
        max: u64,
    ) -> Result<(Vec<(String, Vec<u8>)>, bool)> {
        let coid = cstring("object name", oid)?;
        let cstart = cstring("omap key", start_after)?;
        let cprefix = cstring("omap prefix", prefix)?;
        let io = self.h as usize;
        let out = OmapOut {
            op: unsafe { rados_create_read_op() },
            iter: null_mut(),
            more: 0,
            prval: 0,
        };
        let (r, keep) = aio(Keep((coid, out)), |k, c| unsafe {
            let k = &mut *k;
            let o = &mut k.0 .1;
            rados_read_op_omap_get_vals2(
                o.op,
                cstart.as_ptr(),
                cprefix.as_ptr(),
                max,
                &mut o.iter,
                &mut o.more,
                &mut o.prval,
            );
            rados_aio_read_op_operate(o.op, io as rados_ioctx_t, c, k.0 .0.as_ptr(), 0)
        })
        .await;
        if r < 0 {
            return Err(rados_error("omap get vals", oid, r));
        }
        let k = keep.ok_or_else(|| rados_error("omap get vals", oid, -ETIMEDOUT))?;
        let o = &k.0 .1;
        if o.prval < 0 {
            return Err(rados_error("omap get vals", oid, o.prval));
        }
        let mut pairs = Vec::new();
        loop {
            let (mut kp, mut vp, mut kl, mut vl) = (null_mut(), null_mut(), 0usize, 0usize);
            let r = unsafe { rados_omap_get_next2(o.iter, &mut kp, &mut vp, &mut kl, &mut vl) };
            if r < 0 {
                return Err(rados_error("omap iterate", oid, r));
            }
            if kp.is_null() {
                break;
            }
            let key = unsafe { std::slice::from_raw_parts(kp as *const u8, kl) };
            let val = if vp.is_null() {
                Vec::new()
            } else {
                unsafe { std::slice::from_raw_parts(vp as *const u8, vl) }.to_vec()
            };
            pairs.push((String::from_utf8_lossy(key).into_owned(), val));
        }
        Ok((pairs, o.more != 0))
    }

    /// Names of the objects in the pool (default namespace) starting with `prefix`.
    /// librados' listing calls block on the network, so this runs on the blocking pool.
    pub async fn list_objects(self: &Arc<Self>, prefix: &str) -> Result<Vec<String>> {
        let io = self.clone();
        let prefix = prefix.to_string();
        tokio::task::spawn_blocking(move || io.list_objects_blocking(&prefix))
            .await
            .map_err(|e| Error::new(ErrorKind::Io, format!("listing pool objects: {e}")))?
    }

    fn list_objects_blocking(&self, prefix: &str) -> Result<Vec<String>> {
        let mut ctx: rados_list_ctx_t = null_mut();
        let r = unsafe { rados_nobjects_list_open(self.h, &mut ctx) };
        if r < 0 {
            return Err(rados_error("list objects of pool", &self.pool, r));
        }
        struct Close(rados_list_ctx_t);
        impl Drop for Close {
            fn drop(&mut self) {
                unsafe { rados_nobjects_list_close(self.0) }
            }
        }
        let _close = Close(ctx);
        let mut out = Vec::new();
        let mut progress = crate::progress::Progress::new(format!(
            "listing objects {prefix}* of pool {}: pool objects read",
            self.pool
        ));
        loop {
            progress.tick();
            let (mut entry, mut es) = (null(), 0usize);
            let r = unsafe {
                rados_nobjects_list_next2(
                    ctx,
                    &mut entry,
                    null_mut(),
                    null_mut(),
                    &mut es,
                    null_mut(),
                    null_mut(),
                )
            };
            if r == -ENOENT {
                break;
            }
            if r < 0 {
                return Err(rados_error("list objects of pool", &self.pool, r));
            }
            let name = unsafe { std::slice::from_raw_parts(entry as *const u8, es) };
            if name.starts_with(prefix.as_bytes()) {
                out.push(String::from_utf8_lossy(name).into_owned());
            }
        }
        Ok(out)
    }

    /// Registers a watch on `oid`. `reply` picks the ack payload of each notification (on
    /// librados' thread); events are also sent to `tx` for slower follow-up work.
    pub async fn watch(
        self: &Arc<Self>,
        oid: &str,
        reply: NotifyReplier,
        tx: mpsc::UnboundedSender<WatchEvent>,
    ) -> Result<Watch> {
        let ctxp = Box::into_raw(Box::new(WatchCtx {
            io: self.clone(),
            oid: cstring("object name", oid)?,
            reply,
            tx,
        })) as usize;
        let io = self.h as usize;
        let (r, keep) = aio(Keep(0u64), |k, c| unsafe {
            rados_aio_watch2(
                io as rados_ioctx_t,
                (*(ctxp as *const WatchCtx)).oid.as_ptr(),
                c,
                &mut (*k).0,
                Some(on_watch_notify),
                Some(on_watch_error),
                0,
                ctxp as *mut c_void,
            )
        })
        .await;
        if r < 0 {
            // A failed watch registers nothing that could call back; free the context.
            drop(unsafe { Box::from_raw(ctxp as *mut WatchCtx) });
            return Err(rados_error("watch", oid, r));
        }
        let cookie = keep.map(|k| k.0).unwrap_or(0);
        Ok(Watch {
            cookie,
            ctx: ctxp as *mut WatchCtx,
        })
    }

    /// Ends a watch and frees its context once no callback can still be running.
    pub async fn unwatch(&self, w: Watch) -> Result<()> {
        let io = self.h as usize;
        let cookie = w.cookie;
        let (r, _) = aio(Keep(()), |_, c| unsafe {
            rados_aio_unwatch(io as rados_ioctx_t, cookie, c)
        })
        .await;
        let flushed = self.cluster.watch_flush().await;
        // After the flush no callback holds the context any more.
        drop(unsafe { Box::from_raw(w.ctx) });
        if r < 0 && r != -ENOENT && r != -107 {
            return Err(rados_error("unwatch", &format!("cookie {cookie}"), r));
        }
        flushed
    }

    /// Sends a notification to every watcher of `oid` and collects the answers. A watcher
    /// that does not ack within `timeout_ms` is listed in `timeouts` (the call then
    /// returns -ETIMEDOUT in librados; that is not an error here).
    pub async fn notify(&self, oid: &str, payload: &[u8], timeout_ms: u64) -> Result<NotifyReply> {
        let coid = cstring("object name", oid)?;
        let io = self.h as usize;
        struct Out {
            oid: CString,
            payload: Vec<u8>,
            buf: *mut c_char,
            len: usize,
        }
        impl Drop for Out {
            fn drop(&mut self) {
                if !self.buf.is_null() {
                    unsafe { rados_buffer_free(self.buf) }
                }
            }
        }
        let plen = c_int::try_from(payload.len())
            .map_err(|_| Error::new(ErrorKind::InvalidInput, "notify payload too large"))?;
        let keep = Keep(Out {
            oid: coid,
            payload: payload.to_vec(),
            buf: null_mut(),
            len: 0,
        });
        let (r, keep) = aio(keep, |k, c| unsafe {
            let o = &mut (*k).0;
            rados_aio_notify(
                io as rados_ioctx_t,
                o.oid.as_ptr(),
                c,
                o.payload.as_ptr() as *const c_char,
                plen,
                timeout_ms,
                &mut o.buf,
                &mut o.len,
            )
        })
        .await;
        if r < 0 && r != -ETIMEDOUT {
            return Err(rados_error("notify", oid, r));
        }
        let k = keep.ok_or_else(|| rados_error("notify", oid, -ETIMEDOUT))?;
        if k.0.buf.is_null() {
            return Ok(NotifyReply::default());
        }
        let buf = unsafe { std::slice::from_raw_parts(k.0.buf as *const u8, k.0.len) };
        NotifyReply::parse(buf).map_err(|e| e.context(format!("notify {oid}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_op_object_and_errno() {
        let e = rados_error("read", "rbd_data.abc.0000000000000001", -2);
        assert_eq!(e.kind, ErrorKind::NotFound);
        assert!(
            e.message.contains("read rbd_data.abc.0000000000000001"),
            "{}",
            e.message
        );
        assert_eq!(errno_of(&e), Some(2));
        assert_eq!(rados_error("w", "o", -28).kind, ErrorKind::NoSpace);
        assert_eq!(rados_error("w", "o", -122).kind, ErrorKind::NoSpace);
        assert_eq!(rados_error("w", "o", -16).kind, ErrorKind::Busy);
        assert_eq!(rados_error("w", "o", -17).kind, ErrorKind::AlreadyExists);
        assert_eq!(rados_error("w", "o", -110).kind, ErrorKind::TimedOut);
        assert_eq!(rados_error("w", "o", -30).kind, ErrorKind::ReadOnly);
        assert_eq!(rados_error("w", "o", -5).kind, ErrorKind::Io);
        assert!(rados_error("w", "o", -108).message.contains("blocklisted"));
    }

    #[test]
    fn notify_reply_parses_acks_and_timeouts() {
        let mut b = Vec::new();
        b.extend_from_slice(&2u32.to_le_bytes());
        b.extend_from_slice(&4100u64.to_le_bytes());
        b.extend_from_slice(&77u64.to_le_bytes());
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(b"abc");
        b.extend_from_slice(&4101u64.to_le_bytes());
        b.extend_from_slice(&78u64.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&1u32.to_le_bytes());
        b.extend_from_slice(&4102u64.to_le_bytes());
        b.extend_from_slice(&79u64.to_le_bytes());
        let r = NotifyReply::parse(&b).unwrap();
        assert_eq!(
            r.acks,
            vec![(4100, 77, b"abc".to_vec()), (4101, 78, Vec::new())]
        );
        assert_eq!(r.timeouts, vec![(4102, 79)]);
        assert!(r.has_watcher(4102, 79));
        assert!(r.has_watcher(4100, 77));
        assert!(!r.has_watcher(4100, 79));
        assert!(NotifyReply::parse(&b[..b.len() - 1]).is_err());
    }

    #[test]
    fn secret_options_are_redacted_in_messages() {
        assert_eq!(option_for_message("key", "AQBsecret=="), "key=<redacted>");
        assert_eq!(option_for_message("keyfile", "/k"), "keyfile=<redacted>");
        assert_eq!(
            option_for_message("rados_osd_op_timeout", "30"),
            "rados_osd_op_timeout=30"
        );
    }

    fn scratch(name: &str) -> std::path::PathBuf {
        let d =
            std::env::temp_dir().join(format!("rados-nbd-keyring-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn unreadable_keyring_is_named() {
        let d = scratch("check");
        let missing = d.join("none.keyring");
        let e = check_keyring_readable(missing.to_str().unwrap()).unwrap_err();
        assert_eq!(e.kind, ErrorKind::NotFound);
        assert!(e.message.contains(missing.to_str().unwrap()), "{e}");
        let e = check_keyring_readable(d.to_str().unwrap()).unwrap_err();
        assert!(e.message.contains("directory"), "{e}");
        assert!(e.message.contains(d.to_str().unwrap()), "{e}");
        let f = d.join("client.x.keyring");
        std::fs::write(&f, "[client.x]\n\tkey = AQBzZXhyZXQ=\n").unwrap();
        check_keyring_readable(f.to_str().unwrap()).unwrap();
        // A search list is librados' to resolve: the first existing entry wins.
        check_keyring_readable(&format!("{},{}", missing.display(), f.display())).unwrap();
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn connect_with_missing_keyring_fails_before_contacting_a_cluster() {
        let d = scratch("connect");
        let conf = d.join("ceph.conf");
        // A monitor address nothing listens on: reaching rados_connect would time out.
        std::fs::write(&conf, "[global]\nmon host = v2:127.0.0.1:1\n").unwrap();
        let keyring = d.join("missing.keyring");
        let opts = ConnectOptions {
            conf: Some(conf.to_string_lossy().into_owned()),
            id: Some("nbd".into()),
            keyring: Some(keyring.to_string_lossy().into_owned()),
            options: vec![],
        };
        let t = std::time::Instant::now();
        let e = match Rados::connect_blocking(&opts) {
            Err(e) => e,
            Ok(_) => panic!("connected with a missing keyring"),
        };
        assert!(t.elapsed() < std::time::Duration::from_secs(5));
        assert!(e.message.contains("cannot read keyring"), "{e}");
        assert!(e.message.contains(keyring.to_str().unwrap()), "{e}");
        let _ = std::fs::remove_dir_all(&d);
    }
}
