//! The cluster handle: connecting (config, id, keyring), the instance id, blocklisting,
//! opening pool handles, and shutting down once every operation is back.

use super::completion::{aio, in_flight, SHUTDOWN_DRAIN};
use super::error::{cstring, rados_error};
use super::ffi::*;
use super::ioctx::IoCtx;
use crate::error::{Error, ErrorKind, Result};
use libc::{EACCES, EIO, ENOENT, EPERM};
use std::ffi::{c_char, CStr, CString};
use std::ptr::{null, null_mut};
use std::sync::Arc;

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
    pub(super) h: rados_t,
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

    /// A config value as librados resolved it (`$name` etc. expanded; ceph.conf,
    /// CEPH_ARGS, the monitors' config database; librbd's own options included). Only for
    /// options that are not secrets (`name`, `keyring`, `rbd_io_scheduler`; never `key`).
    pub fn conf_get(&self, option: &str) -> Option<String> {
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

    /// A boolean option as this client resolved it (ceph.conf, CEPH_ARGS, the monitors'
    /// config database): librbd's own options included (`rbd_...`). `None`: unknown.
    pub fn conf_bool(&self, option: &str) -> Option<bool> {
        match self.conf_get(option)?.as_str() {
            "true" => Some(true),
            "false" => Some(false),
            _ => None,
        }
    }

    /// The oldest client release the cluster lets in (Ceph release numbers: 12 luminous,
    /// 13 mimic, ...): the larger of what the OSD map's features need and its
    /// `require_min_compat_client`, as librbd weighs them to pick clone format 2.
    pub fn min_compatible_client(&self) -> Result<i8> {
        let (mut min, mut required) = (0i8, 0i8);
        // SAFETY: both out-parameters are valid for the call; the handle is connected.
        let r = unsafe { rados_get_min_compatible_client(self.h, &mut min, &mut required) };
        if r < 0 {
            return Err(rados_error(
                "get min compatible client of",
                "the cluster",
                r,
            ));
        }
        Ok(min.max(required))
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

    /// Waits until this client has the cluster's newest OSD map (pools made since our
    /// last one included), as librbd does before it scans every pool. Asks the monitors:
    /// blocking, run on tokio's blocking pool.
    pub async fn wait_for_latest_osdmap(self: &Arc<Self>) -> Result<()> {
        let me = self.clone();
        // SAFETY: the handle is connected and outlives the call (`me` holds it).
        let r = tokio::task::spawn_blocking(move || unsafe { rados_wait_for_latest_osdmap(me.h) })
            .await
            .map_err(|e| Error::new(ErrorKind::Io, format!("waiting for the osdmap: {e}")))?;
        if r < 0 {
            return Err(rados_error(
                "wait for the latest osdmap of",
                "the cluster",
                r,
            ));
        }
        Ok(())
    }

    /// Whether pool `id` is a cache tier in front of another pool (librbd skips those
    /// when it scans every pool: the base pool holds the objects).
    pub fn is_cache_tier(&self, id: i64) -> Result<bool> {
        let mut base = id;
        // SAFETY: `base` is valid for the call.
        let r = unsafe { rados_pool_get_base_tier(self.h, id, &mut base) };
        if r < 0 {
            return Err(rados_error("get the base tier of pool", &id.to_string(), r));
        }
        Ok(base != id)
    }

    /// The name of pool `id` (clone headers name their parent's pool by id).
    pub fn pool_name(&self, id: i64) -> Result<String> {
        let mut buf = vec![0u8; 256];
        loop {
            let r = unsafe {
                rados_pool_reverse_lookup(self.h, id, buf.as_mut_ptr() as *mut c_char, buf.len())
            };
            if r == -libc::ERANGE && buf.len() < 1 << 16 {
                buf.resize(buf.len() * 4, 0);
                continue;
            }
            if r < 0 {
                return Err(rados_error("look up pool id", &id.to_string(), r));
            }
            let s = CStr::from_bytes_until_nul(&buf)
                .map_err(|_| Error::new(ErrorKind::Corrupt, format!("name of pool {id}")))?;
            return Ok(s.to_string_lossy().into_owned());
        }
    }

    /// The names of every pool (where `rbd children` looks for format-1 clones).
    pub fn pool_names(&self) -> Result<Vec<String>> {
        let mut buf = vec![0u8; 4096];
        loop {
            let r = unsafe { rados_pool_list(self.h, buf.as_mut_ptr() as *mut c_char, buf.len()) };
            if r < 0 {
                return Err(rados_error("list pools", "", r));
            }
            if r as usize > buf.len() {
                buf.resize(r as usize, 0);
                continue;
            }
            return Ok(buf[..r as usize]
                .split(|&b| b == 0)
                .filter(|n| !n.is_empty())
                .map(|n| String::from_utf8_lossy(n).into_owned())
                .collect());
        }
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
            snapc: Default::default(),
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

#[cfg(test)]
mod tests {
    use super::*;

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
        // Far below rados_connect's own wait (client_mount_timeout, 300 s by default),
        // and generous: a busy machine must not fail this.
        assert!(t.elapsed() < std::time::Duration::from_secs(120));
        assert!(e.message.contains("cannot read keyring"), "{e}");
        assert!(e.message.contains(keyring.to_str().unwrap()), "{e}");
        let _ = std::fs::remove_dir_all(&d);
    }
}
