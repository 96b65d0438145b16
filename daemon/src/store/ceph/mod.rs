//! The Ceph store: RBD format-2 images in a real cluster, through librados (feature `ceph`).
//!
//! Layout, as librbd writes it: `rbd_id.<name>` (cls get_id/set_id) → image id;
//! `rbd_directory` (dir_add_image / dir_list); `rbd_header.<id>` (cls_rbd methods, the
//! `rbd_lock` cls_lock and the header watch); data objects `rbd_data.<id>.<objno %016x>`;
//! object maps `rbd_object_map.<id>[.<snapid %016x>]`.
//!
//! Two pool handles per image: metadata objects (header, object map, directory) are
//! written without a snapshot context, as librbd's `md_ctx` does, so snapshots never clone
//! them; data objects are written with the image's self-managed snapshot context, so
//! snapshots taken by Ceph's tools keep their data.
//!
//! Not supported (refused at open rather than served wrong): journaling, a separate data
//! pool, fancy striping (stripe count > 1 or unit != object size), migration, a parent
//! (clones), non-primary mirrored images for writing, unknown feature bits. Pacific's
//! client-side encryption (`rbd encryption format`) leaves no mark in the header: it is
//! recognised from the LUKS header librbd writes at the start of object 0 (see `luks`) and
//! refused before serving (`ImageStore::check_servable`), unless `--allow-encrypted` asks
//! for the raw LUKS volume. Where librbd's layout is the same as cryptsetup's (LUKS2 on
//! objects up to 16 MiB) the two cannot be told apart, so any LUKS volume at offset 0 is
//! refused until `--allow-encrypted` says it is to be served raw.
//!
//! The exclusive lock (`take_lock`) is broken only when its owner is dead, and the owner is
//! fenced first, as librbd's managed_lock::BreakRequest does: an owner that answers a
//! notify on the header is alive (the open is refused, "in use"); one whose watch is still
//! registered but silent (killed, stopped) is waited for, bounded ([`LOCK_WAIT_SECS`]),
//! until the OSD drops its watch; then its address is blocklisted and only then is the
//! lock broken, so that requests it still has queued cannot land after ours. The fenced
//! side (`Inner::fence`): a handle that finds itself blocklisted (ESHUTDOWN from any op,
//! or its watch) or its lock broken sends nothing more, fails every read and write with
//! EIO and leaves the image flagged invalid for the next owner.

pub mod cls;
pub mod luks;
pub mod rados;
pub mod snaps;

#[cfg(test)]
mod live_tests;

use crate::error::{Error, ErrorKind, Result};
use crate::spec::{parse_pool_spec, ImageSpec};
use crate::store::{
    CreateOptions, ImageHeader, ImageStore, OpenMode, OwnerRequest, SnapInfo, Store,
    RBD_FEATURE_DATA_POOL, RBD_FEATURE_DEEP_FLATTEN, RBD_FEATURE_EXCLUSIVE_LOCK,
    RBD_FEATURE_FAST_DIFF, RBD_FEATURE_JOURNALING, RBD_FEATURE_LAYERING, RBD_FEATURE_MIGRATING,
    RBD_FEATURE_NON_PRIMARY, RBD_FEATURE_OBJECT_MAP, RBD_FEATURE_OPERATIONS,
    RBD_FEATURE_STRIPINGV2,
};
use bytes::Bytes;
use rados::{errno_of, is_blocklisted, ConnectOptions, IoCtx, Rados, Watch, WatchEvent, WriteOp};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use tokio::sync::mpsc;

const RBD: &str = "rbd";
const LOCK: &str = "lock";
const RBD_DIRECTORY: &str = "rbd_directory";
/// cls::rbd::DIRECTORY_STATE_READY, encoded as the u8 it is.
const DIRECTORY_STATE_READY: u8 = 0;
const EBUSY: i32 = 16;
const EROFS: i32 = 30;
/// How long to wait for watchers to answer when checking whether a lock owner is alive.
const NOTIFY_TIMEOUT_MS: u64 = 5000;
/// How long an open waits for the watch of a lock owner that does not answer (a killed or
/// stopped client) to be dropped by the OSD, which takes `osd_client_watch_timeout` (30 s
/// by default) after its last ping, before giving up with "in use". The environment
/// variable `RADOS_NBD_LOCK_WAIT_SECS` overrides it (tests, clusters with a longer timeout).
const LOCK_WAIT_SECS: u64 = 45;
/// While waiting: how long each re-check gives the owner to answer, and the pause between.
const LOCK_RECHECK_NOTIFY_MS: u64 = 1000;
const LOCK_RECHECK_PAUSE: std::time::Duration = std::time::Duration::from_millis(500);
/// Concurrent RADOS calls when removing or stat-ing many objects.
const PARALLEL: usize = 32;

/// Features we serve. Anything else set on an image is refused.
const SUPPORTED_FEATURES: u64 = RBD_FEATURE_LAYERING
    | RBD_FEATURE_STRIPINGV2
    | RBD_FEATURE_EXCLUSIVE_LOCK
    | RBD_FEATURE_OBJECT_MAP
    | RBD_FEATURE_FAST_DIFF
    | RBD_FEATURE_DEEP_FLATTEN
    | RBD_FEATURE_OPERATIONS
    | RBD_FEATURE_NON_PRIMARY;

/// Where the cluster is and who we are, parsed from `--store ceph:[CONF]`, `--id`,
/// `--keyring`.
pub type CephOptions = ConnectOptions;

pub struct CephStore {
    rados: Arc<Rados>,
    desc: String,
    /// Handles by (pool, RBD namespace).
    pools: Mutex<HashMap<(String, String), Arc<IoCtx>>>,
    allow_encrypted: bool,
    /// Images (`pool/name[@snap]`) whose LUKS header was already logged: a read-write open
    /// checks twice (before and after taking the lock) and logs once.
    luks_noted: Arc<Mutex<std::collections::HashSet<String>>>,
}

impl CephStore {
    /// Connects to the cluster (`opts.conf` = None: librados' default config search).
    pub async fn connect(opts: CephOptions) -> Result<CephStore> {
        let desc = format!("ceph:{}", opts.conf.as_deref().unwrap_or(""));
        let rados = Rados::connect(opts)
            .await
            .map_err(|e| e.context(format!("opening store {desc}")))?;
        Ok(CephStore {
            rados,
            desc,
            pools: Mutex::new(HashMap::new()),
            allow_encrypted: false,
            luks_noted: Arc::default(),
        })
    }

    /// `--allow-encrypted` for the images this store opens (off by default).
    pub fn with_allow_encrypted(mut self, allow: bool) -> Self {
        self.allow_encrypted = allow;
        self
    }

    /// The handle on `pool`'s RBD namespace `namespace` ("" is the default one), after
    /// checking that the namespace exists: objects written into a namespace that `rbd
    /// namespace create` never made would be invisible to `rbd namespace ls`.
    async fn pool(&self, pool: &str, namespace: &str) -> Result<Arc<IoCtx>> {
        let key = (pool.to_string(), namespace.to_string());
        if let Some(io) = self
            .pools
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
        {
            return Ok(io.clone());
        }
        let io = self.rados.ioctx_in(pool, namespace).map_err(|e| {
            if e.kind == ErrorKind::NotFound {
                Error::new(e.kind, format!("pool {pool} not found in {}", self.desc))
            } else {
                e.context(format!("in {}", self.desc))
            }
        })?;
        if !namespace.is_empty() {
            // librbd's Namespace::exists: the namespace's image directory is there, READY.
            match io
                .exec_read(
                    RBD_DIRECTORY,
                    RBD,
                    "dir_state_assert",
                    &[DIRECTORY_STATE_READY],
                )
                .await
            {
                Ok(_) => {}
                Err(e) if e.kind == ErrorKind::NotFound => {
                    return Err(Error::new(
                        ErrorKind::NotFound,
                        format!(
                            "namespace {namespace} not found in pool {pool} of {} \
                             (create it with `rbd namespace create {pool}/{namespace}`)",
                            self.desc
                        ),
                    ))
                }
                Err(e) => return Err(e.context(format!("checking namespace {pool}/{namespace}"))),
            }
        }
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        Ok(pools.entry(key).or_insert(io).clone())
    }

    async fn image_id(&self, io: &IoCtx, spec: &ImageSpec) -> Result<String> {
        let oid = format!("rbd_id.{}", spec.name);
        match io.exec_read(&oid, RBD, "get_id", &[]).await {
            Ok(b) => cls::string_out(&b, "rbd.get_id reply"),
            Err(e) if e.kind == ErrorKind::NotFound => Err(Error::new(
                ErrorKind::NotFound,
                format!(
                    "image {}/{} not found in {}",
                    spec.pool_spec(),
                    spec.name,
                    self.desc
                ),
            )),
            Err(e) => Err(e.context(format!("opening image {spec}"))),
        }
    }
}

fn header_oid(id: &str) -> String {
    format!("rbd_header.{id}")
}

fn object_map_oid(id: &str, snap: Option<u64>) -> String {
    match snap {
        Some(s) => format!("rbd_object_map.{id}.{s:016x}"),
        None => format!("rbd_object_map.{id}"),
    }
}

/// A fresh image id like librbd's: our client gid in hex followed by random hex, at most
/// 14 characters (RBD_MAX_IMAGE_ID_LENGTH).
fn generate_image_id(gid: u64) -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(gid);
    if let Ok(t) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        h.write_u128(t.as_nanos());
    }
    let id = format!("{gid:x}{:08x}", h.finish() as u32);
    let cut = id.len().saturating_sub(14);
    id[cut..].to_string()
}

/// Reads and checks an image header. `snap_name` selects a snapshot (its size and flags).
async fn load_header(
    io: &IoCtx,
    spec: &ImageSpec,
    id: &str,
    mode: OpenMode,
) -> Result<(ImageHeader, Option<u64>)> {
    let hdr = header_oid(id);
    let ctx = |e: Error| e.context(format!("reading header of image {spec}"));
    let read_only = mode == OpenMode::ReadOnly;
    let b = io
        .exec_read(
            &hdr,
            RBD,
            "get_features",
            &cls::get_features_in(cls::NOSNAP, read_only),
        )
        .await
        .map_err(ctx)?;
    let (features, incompatible) = cls::get_features_out(&b).map_err(ctx)?;
    check_features(spec, features, incompatible, mode)?;

    let b = io
        .exec_read(&hdr, RBD, "get_size", &cls::snap_in(cls::NOSNAP))
        .await
        .map_err(ctx)?;
    let (order, mut size) = cls::get_size_out(&b).map_err(ctx)?;
    if !(12..=25).contains(&order) {
        return Err(Error::new(
            ErrorKind::Unsupported,
            format!("image {spec}: object order {order} is outside 12..=25"),
        ));
    }
    let b = io
        .exec_read(&hdr, RBD, "get_object_prefix", &[])
        .await
        .map_err(ctx)?;
    let object_prefix = cls::string_out(&b, "rbd.get_object_prefix reply").map_err(ctx)?;

    if features & RBD_FEATURE_STRIPINGV2 != 0 {
        let b = io
            .exec_read(&hdr, RBD, "get_stripe_unit_count", &[])
            .await
            .map_err(ctx)?;
        let (unit, count) = cls::stripe_out(&b).map_err(ctx)?;
        if count > 1 || unit != 1u64 << order {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "image {spec} uses fancy striping (stripe unit {unit}, count {count}); \
                     only stripe unit = object size and count 1 are supported"
                ),
            ));
        }
    }

    let b = io
        .exec_read(&hdr, RBD, "get_parent", &cls::snap_in(cls::NOSNAP))
        .await
        .map_err(ctx)?;
    if let Some((pool, image, snap, _)) = cls::get_parent_out(&b).map_err(ctx)? {
        return Err(Error::new(
            ErrorKind::Unsupported,
            format!(
                "image {spec} is a clone (parent: pool {pool} image {image} snap {snap}); \
                 clones are not supported yet (flatten it with `rbd flatten`)"
            ),
        ));
    }

    let b = io
        .exec_read(&hdr, RBD, "get_snapcontext", &[])
        .await
        .map_err(ctx)?;
    let (snap_seq, snap_ids) = cls::get_snapcontext_out(&b).map_err(ctx)?;
    let mut snaps = Vec::with_capacity(snap_ids.len());
    for &sid in &snap_ids {
        let b = io
            .exec_read(&hdr, RBD, "snapshot_get", &cls::snap_in(sid))
            .await
            .map_err(ctx)?;
        let info = cls::snapshot_get_out(&b).map_err(ctx)?;
        snaps.push(SnapInfo {
            id: sid,
            name: info.name,
            size: info.size,
        });
    }

    let snap_id = match &spec.snap {
        None => None,
        Some(name) => {
            let s = snaps.iter().find(|s| &s.name == name).ok_or_else(|| {
                Error::new(
                    ErrorKind::NotFound,
                    format!(
                        "snapshot {name} of image {}/{} not found",
                        spec.pool_spec(),
                        spec.name
                    ),
                )
            })?;
            size = s.size;
            Some(s.id)
        }
    };
    let b = io
        .exec_read(
            &hdr,
            RBD,
            "get_flags",
            &cls::snap_in(snap_id.unwrap_or(cls::NOSNAP)),
        )
        .await
        .map_err(ctx)?;
    let flags = cls::u64_out(&b, "rbd.get_flags reply").map_err(ctx)?;

    Ok((
        ImageHeader {
            id: id.to_string(),
            size,
            order,
            object_prefix,
            features,
            flags,
            snap_seq,
            snaps,
        },
        snap_id,
    ))
}

fn check_features(
    spec: &ImageSpec,
    features: u64,
    incompatible: u64,
    mode: OpenMode,
) -> Result<()> {
    let refuse = |what: &str| {
        Err(Error::new(
            ErrorKind::Unsupported,
            format!("image {spec} uses {what}, which rados-nbd does not support yet"),
        ))
    };
    if features & RBD_FEATURE_JOURNALING != 0 {
        return refuse("journaling");
    }
    if features & RBD_FEATURE_DATA_POOL != 0 {
        return refuse("a separate data pool");
    }
    if features & RBD_FEATURE_MIGRATING != 0 {
        return refuse("live migration (it is being migrated)");
    }
    if features & RBD_FEATURE_NON_PRIMARY != 0 && mode != OpenMode::ReadOnly {
        return Err(Error::new(
            ErrorKind::ReadOnly,
            format!("image {spec} is a non-primary mirror image; it can only be opened read-only"),
        ));
    }
    let unknown = (features | incompatible) & !SUPPORTED_FEATURES;
    if unknown != 0 {
        return refuse(&format!("unknown feature bits {unknown:#x}"));
    }
    Ok(())
}

impl Store for CephStore {
    type Image = CephImage;

    fn describe(&self) -> String {
        self.desc.clone()
    }

    async fn create_image(&self, spec: &ImageSpec, opts: &CreateOptions) -> Result<()> {
        if spec.snap.is_some() {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("cannot create {spec}: a snapshot name is not allowed here"),
            ));
        }
        if !(12..=25).contains(&opts.order) {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("object size 2^{} is outside 4 KiB..32 MiB", opts.order),
            ));
        }
        let f = opts.features;
        let creatable = RBD_FEATURE_LAYERING
            | RBD_FEATURE_EXCLUSIVE_LOCK
            | RBD_FEATURE_OBJECT_MAP
            | RBD_FEATURE_FAST_DIFF
            | RBD_FEATURE_DEEP_FLATTEN;
        if f & !creatable != 0 {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!("cannot create {spec} with features {:#x}", f & !creatable),
            ));
        }
        if f & RBD_FEATURE_OBJECT_MAP != 0 && f & RBD_FEATURE_EXCLUSIVE_LOCK == 0 {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "the object-map feature needs exclusive-lock",
            ));
        }
        if f & RBD_FEATURE_FAST_DIFF != 0 && f & RBD_FEATURE_OBJECT_MAP == 0 {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "the fast-diff feature needs object-map",
            ));
        }
        let io = self.pool(&spec.pool, &spec.namespace).await?;
        let id = generate_image_id(self.rados.instance_id());
        let id_oid = format!("rbd_id.{}", spec.name);
        let ctx = |e: Error| e.context(format!("creating image {spec} in {}", self.desc));

        // The id object first, created exclusively: it is what makes the name taken.
        let mut op = WriteOp::new();
        op.create(true)
            .exec(c"rbd", c"set_id", &cls::string_in(&id));
        match io.operate(&id_oid, op, "create").await {
            Ok(()) => {}
            Err(e) if e.kind == ErrorKind::AlreadyExists => {
                return Err(Error::new(
                    ErrorKind::AlreadyExists,
                    format!("image {spec} already exists in {}", self.desc),
                ))
            }
            Err(e) => return Err(ctx(e)),
        }
        let result = async {
            io.exec_write(
                RBD_DIRECTORY,
                RBD,
                "dir_add_image",
                &cls::dir_image_in(&spec.name, &id),
            )
            .await?;
            let prefix = format!("rbd_data.{id}");
            let mut op = WriteOp::new();
            op.create(true).exec(
                c"rbd",
                c"create",
                &cls::create_in(opts.size, opts.order, f, &prefix, -1),
            );
            io.operate(&header_oid(&id), op, "cls rbd.create on")
                .await?;
            if f & RBD_FEATURE_OBJECT_MAP != 0 {
                let count = opts.size.div_ceil(1u64 << opts.order);
                io.exec_write(
                    &object_map_oid(&id, None),
                    RBD,
                    "object_map_resize",
                    &cls::object_map_resize_in(count, 0),
                )
                .await?;
            }
            Ok::<(), Error>(())
        }
        .await;
        if let Err(e) = result {
            // Undo in reverse order, best effort, so a failed create leaves no half image.
            let _ = io.remove(&object_map_oid(&id, None)).await;
            let _ = io.remove(&header_oid(&id)).await;
            let _ = io
                .exec_write(
                    RBD_DIRECTORY,
                    RBD,
                    "dir_remove_image",
                    &cls::dir_image_in(&spec.name, &id),
                )
                .await;
            let _ = io.remove(&id_oid).await;
            return Err(ctx(e));
        }
        tracing::info!(image = %spec, id = %id, "created image");
        Ok(())
    }

    async fn remove_image(&self, spec: &ImageSpec) -> Result<()> {
        let io = self.pool(&spec.pool, &spec.namespace).await?;
        let id = self.image_id(&io, spec).await?;
        let hdr = header_oid(&id);
        let ctx = |e: Error| e.context(format!("removing image {spec}"));
        match io.exec_read(&hdr, RBD, "get_snapcontext", &[]).await {
            Ok(b) => {
                let (_, snaps) = cls::get_snapcontext_out(&b).map_err(ctx)?;
                if !snaps.is_empty() {
                    return Err(Error::new(
                        ErrorKind::Busy,
                        format!(
                            "image {spec} has {} snapshot(s); remove them first (rbd snap purge)",
                            snaps.len()
                        ),
                    ));
                }
                let watchers = io
                    .notify(&hdr, &cls::header_update_notify(), NOTIFY_TIMEOUT_MS)
                    .await
                    .map_err(ctx)?;
                if let Some((gid, cookie, _)) = watchers.acks.first() {
                    return Err(Error::new(
                        ErrorKind::Busy,
                        format!("image {spec} is open by client.{gid} (watch {cookie})"),
                    ));
                }
                if let Some((gid, cookie)) = watchers.timeouts.first() {
                    return Err(Error::new(
                        ErrorKind::Busy,
                        format!(
                            "image {spec} still has a watch by client.{gid} (watch {cookie}); \
                             if that client died, retry after the OSD expires it (~30 s)"
                        ),
                    ));
                }
            }
            Err(e) if e.kind == ErrorKind::NotFound => {}
            Err(e) => return Err(ctx(e)),
        }
        let names = io
            .list_objects(&format!("rbd_data.{id}."))
            .await
            .map_err(ctx)?;
        for_each_parallel(names, |name| {
            let io = io.clone();
            async move { io.remove(&name).await.map(|_| ()) }
        })
        .await
        .map_err(ctx)?;
        io.remove(&object_map_oid(&id, None)).await.map_err(ctx)?;
        io.remove(&hdr).await.map_err(ctx)?;
        match io
            .exec_write(
                RBD_DIRECTORY,
                RBD,
                "dir_remove_image",
                &cls::dir_image_in(&spec.name, &id),
            )
            .await
        {
            Ok(()) => {}
            Err(e) if e.kind == ErrorKind::NotFound => {}
            Err(e) => return Err(ctx(e)),
        }
        io.remove(&format!("rbd_id.{}", spec.name))
            .await
            .map_err(ctx)?;
        Ok(())
    }

    async fn list_images(&self, pool: &str) -> Result<Vec<String>> {
        let (pool_name, namespace) = parse_pool_spec(pool)?;
        let io = self.pool(&pool_name, &namespace).await?;
        let mut out = Vec::new();
        let mut start = String::new();
        loop {
            let b = match io
                .exec_read(RBD_DIRECTORY, RBD, "dir_list", &cls::list_in(&start, 1024))
                .await
            {
                Ok(b) => b,
                Err(e) if e.kind == ErrorKind::NotFound => break,
                Err(e) => return Err(e.context(format!("listing pool {pool}"))),
            };
            let page = cls::dir_list_out(&b)?;
            let n = page.len();
            if let Some((last, _)) = page.last() {
                start = last.clone();
            }
            out.extend(page.into_iter().map(|(name, _)| name));
            if n < 1024 {
                break;
            }
        }
        out.sort();
        Ok(out)
    }

    async fn open_image(&self, spec: &ImageSpec, mode: OpenMode) -> Result<CephImage> {
        if spec.snap.is_some() && mode != OpenMode::ReadOnly {
            return Err(Error::new(
                ErrorKind::ReadOnly,
                format!("{spec} is a snapshot: it can only be opened read-only"),
            ));
        }
        let meta = self.pool(&spec.pool, &spec.namespace).await?;
        let id = self.image_id(&meta, spec).await?;
        let (header, snap_id) = load_header(&meta, spec, &id, mode).await?;
        // Data objects get their own handle: it carries the snapshot context (writes) or
        // reads at the mapped snapshot.
        let data = match snap_id {
            Some(s) => meta.at_snap(s)?,
            None => self.rados.ioctx_in(&spec.pool, &spec.namespace)?,
        };
        if snap_id.is_none() {
            let ids: Vec<u64> = header.snaps.iter().map(|s| s.id).collect();
            data.set_snap_write_ctx(header.snap_seq, &ids)?;
        }
        let inner = Arc::new(Inner {
            meta,
            data,
            spec: spec.clone(),
            hdr_oid: header_oid(&id),
            id,
            snap_id,
            mode,
            allow_encrypted: self.allow_encrypted,
            luks_noted: self.luks_noted.clone(),
            header: RwLock::new(header),
            snap_ios: Mutex::new(HashMap::new()),
            lock: tokio::sync::Mutex::new(None),
            lost_lock: AtomicBool::new(false),
            reacquiring: AtomicBool::new(false),
            owner_tx: Mutex::new(None),
            owner_pending: Mutex::new(std::collections::HashSet::new()),
            closed: AtomicBool::new(false),
        });
        if mode != OpenMode::ReadOnly {
            acquire_lock(&inner).await?;
        }
        Ok(CephImage { inner })
    }
}

/// Runs `f` over `items` with at most PARALLEL calls in flight; the first error wins.
async fn for_each_parallel<T, F, Fut>(items: Vec<T>, f: F) -> Result<()>
where
    F: Fn(T) -> Fut,
    Fut: std::future::Future<Output = Result<()>> + Send + 'static,
{
    let mut set = tokio::task::JoinSet::new();
    let mut first_err = None;
    for item in items {
        while set.len() >= PARALLEL {
            if let Some(r) = set.join_next().await {
                note_result(r, &mut first_err);
            }
        }
        set.spawn(f(item));
    }
    while let Some(r) = set.join_next().await {
        note_result(r, &mut first_err);
    }
    first_err.map_or(Ok(()), Err)
}

fn note_result(
    r: std::result::Result<Result<()>, tokio::task::JoinError>,
    first: &mut Option<Error>,
) {
    let e = match r {
        Ok(Ok(())) => return,
        Ok(Err(e)) => e,
        Err(e) => Error::new(ErrorKind::Io, format!("task failed: {e}")),
    };
    first.get_or_insert(e);
}

struct LockState {
    watch: Watch,
    cookie: String,
    stop: tokio::sync::watch::Sender<bool>,
    /// The AcquiredLock notify sent after taking the lock: `close` waits for it, so no
    /// notify of ours is still out when the handle (and maybe the cluster) goes.
    acquired_notify: Option<tokio::task::JoinHandle<()>>,
    /// The `watch_events` task: `close` stops it and waits for it, so it holds no
    /// reference to the handle (a header refresh still out, say) once close returns. A
    /// task dropped at runtime shutdown with the last reference would shut the cluster
    /// connection down under that operation (a SIGSEGV in librados' messenger thread).
    events: Option<tokio::task::JoinHandle<()>>,
}

struct Inner {
    meta: Arc<IoCtx>,
    data: Arc<IoCtx>,
    spec: ImageSpec,
    id: String,
    hdr_oid: String,
    snap_id: Option<u64>,
    mode: OpenMode,
    /// Serve an image encrypted by librbd as its raw LUKS volume (`--allow-encrypted`).
    allow_encrypted: bool,
    luks_noted: Arc<Mutex<std::collections::HashSet<String>>>,
    header: RwLock<ImageHeader>,
    snap_ios: Mutex<HashMap<u64, Arc<IoCtx>>>,
    lock: tokio::sync::Mutex<Option<LockState>>,
    /// Set when the watch was lost and the lock could not be re-asserted: writes stop.
    lost_lock: AtomicBool,
    /// Set while a lost watch is being re-registered and the lock moved to its cookie
    /// (e.g. while the OSD holding the header is unreachable). Writes fail with EIO
    /// meanwhile: with our watch gone another client may break the lock, so writing
    /// before it is re-asserted could write underneath a new owner.
    reacquiring: AtomicBool,
    /// Where requests for the lock owner go once the image layer takes them
    /// (`owner_requests`); until then they are refused, as before.
    owner_tx: Mutex<Option<mpsc::UnboundedSender<OwnerRequest>>>,
    /// Requests being carried out: librbd may send one again while it waits.
    owner_pending: Mutex<std::collections::HashSet<cls::AsyncRequestId>>,
    closed: AtomicBool,
}

impl Inner {
    /// Whether requests addressed to the lock owner are taken (ours is an exclusive,
    /// read-write open whose image layer serves them).
    fn takes_owner_requests(&self) -> bool {
        self.mode == OpenMode::ReadWrite
            && !self.closed.load(Ordering::SeqCst)
            && self
                .owner_tx
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_some()
    }
}

/// One opened image in the cluster.
pub struct CephImage {
    inner: Arc<Inner>,
}

/// Takes the image's exclusive lock the way librbd does: a watch on the header, then
/// cls_lock `rbd_lock` (exclusive, tag `internal`, cookie `auto <watch handle>`); for
/// SharedWrite the same lock taken shared with our own tag (see `lock_kind`).
async fn acquire_lock(inner: &Arc<Inner>) -> Result<()> {
    let spec = &inner.spec;
    let (tx, rx) = mpsc::unbounded_channel();
    let watch = inner
        .meta
        .watch(&inner.hdr_oid, replier(inner), tx.clone())
        .await
        .map_err(|e| e.context(format!("opening image {spec}")))?;
    let cookie = cls::lock_cookie(watch.cookie);
    if let Err(e) = take_lock(inner, &cookie).await {
        let _ = inner.meta.unwatch(watch).await;
        return Err(e);
    }
    let gid = inner.meta.cluster().instance_id();
    tracing::info!(image = %spec, locker = %format!("client.{gid}"), %cookie, "acquired {}", lock_name(inner.mode));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let handle = watch.cookie;
    let mut state = inner.lock.lock().await;
    *state = Some(LockState {
        watch,
        cookie,
        stop: stop_tx,
        acquired_notify: None,
        events: None,
    });
    let events = tokio::spawn(watch_events(Arc::downgrade(inner), rx, tx, stop_rx));
    // Tell waiting librbd clients, as librbd does; nobody has to answer.
    let meta = inner.meta.clone();
    let oid = inner.hdr_oid.clone();
    let acquired_notify = tokio::spawn(async move {
        let msg = cls::lock_notify(cls::NOTIFY_OP_ACQUIRED_LOCK, gid, handle);
        let _ = meta.notify(&oid, &msg, NOTIFY_TIMEOUT_MS).await;
    });
    if let Some(st) = state.as_mut() {
        st.acquired_notify = Some(acquired_notify);
        st.events = Some(events);
    }
    Ok(())
}

/// The watch's replier for this image: whether resizes are taken can change after the
/// watch is registered (the image layer starts taking them once it is serving).
fn replier(inner: &Arc<Inner>) -> rados::NotifyReplier {
    let inner = Arc::downgrade(inner);
    Box::new(move |notifier, payload| {
        let takes = inner.upgrade().is_some_and(|i| i.takes_owner_requests());
        reply_to_notify(notifier, payload, takes)
    })
}

/// Runs on librados' callback thread. A resize is accepted (0) when `takes_resize`, and
/// carried out by `watch_events`, which then sends AsyncComplete, as librbd's owner does.
/// Other requests addressed to the lock owner get -EROFS (we do not hand the lock over,
/// like `rbd-nbd --exclusive`; snapshots and the like are not done by us); the rest are
/// acked empty.
fn reply_to_notify(_notifier: u64, payload: &[u8], takes_resize: bool) -> Vec<u8> {
    match cls::notify_op(payload) {
        Ok(cls::NOTIFY_OP_RESIZE) if takes_resize && cls::resize_request(payload).is_ok() => {
            cls::response_message(0)
        }
        Ok(op) if cls::notify_wants_owner_reply(op) => cls::response_message(-EROFS),
        _ => Vec::new(),
    }
}

/// Carries out a resize librbd asked for (accepted in `reply_to_notify`), then tells the
/// asker with AsyncComplete, as librbd's lock owner does.
fn start_resize(inner: &Arc<Inner>, req: cls::ResizeRequest, notifier_id: u64) {
    let tx = inner
        .owner_tx
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let Some(tx) = tx else {
        tracing::info!(image = %inner.spec, "refused resize from client.{notifier_id}: not serving requests");
        return;
    };
    if !inner
        .owner_pending
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(req.id)
    {
        return; // Sent again while we are at it: one answer will come.
    }
    tracing::info!(image = %inner.spec, "resize to {} bytes asked by client.{notifier_id}", req.size);
    let inner = inner.clone();
    tokio::spawn(async move {
        let (done, rx) = tokio::sync::oneshot::channel();
        let r = match tx.send(OwnerRequest::Resize {
            size: req.size,
            allow_shrink: req.allow_shrink,
            done,
        }) {
            Err(_) => Err(Error::new(ErrorKind::Io, "the image is closing")),
            Ok(()) => rx
                .await
                .unwrap_or_else(|_| Err(Error::new(ErrorKind::Io, "the image closed first"))),
        };
        let result = match &r {
            Ok(()) => 0,
            Err(e) => -errno_for_librbd(e),
        };
        let msg = cls::async_complete_notify(req.id, result);
        if let Err(e) = inner
            .meta
            .notify(&inner.hdr_oid, &msg, NOTIFY_TIMEOUT_MS)
            .await
        {
            tracing::warn!(image = %inner.spec, "telling client.{notifier_id} its resize is done: {e}");
        }
        inner
            .owner_pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&req.id);
    });
}

/// The errno librbd gets for an error of ours: librados' own when it came from there.
fn errno_for_librbd(e: &Error) -> i32 {
    if let Some(n) = errno_of(e) {
        return n.abs();
    }
    match e.kind {
        ErrorKind::InvalidInput => 22, // EINVAL
        ErrorKind::ReadOnly => EROFS,
        ErrorKind::Unsupported => 95, // EOPNOTSUPP
        ErrorKind::NoSpace => 28,     // ENOSPC
        ErrorKind::Busy => 16,        // EBUSY
        _ => 5,                       // EIO
    }
}

fn lock_name(mode: OpenMode) -> &'static str {
    if mode == OpenMode::SharedWrite {
        "shared-write lock"
    } else {
        "exclusive lock"
    }
}

/// The kind and tag of the lock a mode takes on `rbd_lock`. Shared writers take it shared
/// with their own tag: they coexist with each other, and a librbd client (which wants it
/// exclusive with tag `internal`) or a ReadWrite opener is kept out, and vice versa.
fn lock_kind(mode: OpenMode) -> (u8, &'static str) {
    if mode == OpenMode::SharedWrite {
        (cls::LOCK_SHARED, cls::SHARED_LOCK_TAG)
    } else {
        (cls::LOCK_EXCLUSIVE, cls::RBD_LOCK_TAG)
    }
}

async fn try_lock(inner: &Inner, cookie: &str) -> Result<()> {
    let (kind, tag) = lock_kind(inner.mode);
    let input = cls::lock_in(cls::RBD_LOCK_NAME, kind, cookie, tag, "");
    inner
        .meta
        .exec_write(&inner.hdr_oid, LOCK, "lock", &input)
        .await
}

/// Up to how long `take_lock` waits for a silent owner's watch to expire.
fn lock_wait() -> std::time::Duration {
    let secs = std::env::var("RADOS_NBD_LOCK_WAIT_SECS")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(LOCK_WAIT_SECS);
    std::time::Duration::from_secs(secs)
}

async fn get_lock_info(inner: &Inner) -> Result<cls::LockInfo> {
    let b = inner
        .meta
        .exec_read(
            &inner.hdr_oid,
            LOCK,
            "get_info",
            &cls::get_info_in(cls::RBD_LOCK_NAME),
        )
        .await?;
    cls::get_info_out(&b)
}

/// Takes `rbd_lock`; a lock whose owner is dead is broken the way librbd's
/// managed_lock::BreakRequest does it: the owner must have no watch left on the header
/// (a watch that does not answer is waited for, up to [`lock_wait`], until the OSD drops
/// it), then its address is blocklisted, so that nothing it still sends (requests queued
/// in a stopped process) can land after ours, and only then is the lock broken. An owner
/// that answers is alive: the open is refused ("in use"), as we do not ask it to hand the
/// lock over.
async fn take_lock(inner: &Inner, cookie: &str) -> Result<()> {
    let spec = &inner.spec;
    let busy_errno = |e: &Error| matches!(errno_of(e), Some(EBUSY) | Some(17));
    let ctx = |e: Error| e.context(format!("locking image {spec}"));
    // Rounds: each after breaking a stale lock (or after a racing release).
    for _round in 0..3 {
        match try_lock(inner, cookie).await {
            Ok(()) => return Ok(()),
            Err(e) if busy_errno(&e) => {}
            Err(e) => return Err(ctx(e)),
        }
        let info = get_lock_info(inner).await.map_err(ctx)?;
        if info.lockers.is_empty() {
            continue;
        }
        let known = (info.kind == cls::LOCK_EXCLUSIVE && info.tag == cls::RBD_LOCK_TAG)
            || (info.kind == cls::LOCK_SHARED && info.tag == cls::SHARED_LOCK_TAG);
        if !known {
            return Err(Error::new(
                ErrorKind::Busy,
                format!(
                    "image {spec} is locked by {} (tag {:?}): not a lock of librbd or rados-nbd, refusing",
                    info.lockers[0], info.tag
                ),
            ));
        }
        let held = if info.kind == cls::LOCK_SHARED {
            "shared-write (rados-nbd)"
        } else {
            "exclusive"
        };
        let mut handles = Vec::new();
        for locker in &info.lockers {
            let handle = cls::parse_lock_cookie(&locker.cookie).ok_or_else(|| {
                Error::new(
                    ErrorKind::Busy,
                    format!(
                        "image {spec} is locked by {locker}, which is not a librbd lock cookie"
                    ),
                )
            })?;
            handles.push((u64::try_from(locker.entity_num).unwrap_or(u64::MAX), handle));
        }
        // Who still watches the header? A notify reaches every registered watch: an owner
        // that acks is alive; one listed as timed out still has a watch but is silent
        // (killed, stopped, cut off): wait for the OSD to drop it, re-checking.
        let mut waited: Option<(std::time::Instant, std::time::Duration)> = None;
        let mut notify_ms = NOTIFY_TIMEOUT_MS;
        loop {
            let watchers = inner
                .meta
                .notify(&inner.hdr_oid, &cls::header_update_notify(), notify_ms)
                .await
                .map_err(ctx)?;
            let mut silent = None;
            for (locker, &(gid, handle)) in info.lockers.iter().zip(&handles) {
                if watchers.acks.iter().any(|a| a.0 == gid && a.1 == handle) {
                    return Err(Error::new(
                        ErrorKind::Busy,
                        format!(
                            "image {spec} is in use: {held} lock held by {locker}, which is alive"
                        ),
                    ));
                }
                if watchers
                    .timeouts
                    .iter()
                    .any(|t| t.0 == gid && t.1 == handle)
                {
                    silent = Some(locker);
                }
            }
            let Some(locker) = silent else { break };
            let addr = locker.address.as_deref().unwrap_or("unknown address");
            match waited {
                None => {
                    let wait = lock_wait();
                    tracing::info!(image = %spec, %locker, address = addr,
                        "{held} lock held by a client whose watch is still registered but does not answer \
                         (killed or stopped); waiting up to {} s for the OSD to drop its watch \
                         (osd_client_watch_timeout), then fencing it", wait.as_secs());
                    waited = Some((std::time::Instant::now(), wait));
                }
                Some((t0, wait)) if t0.elapsed() >= wait => {
                    return Err(Error::new(
                        ErrorKind::Busy,
                        format!(
                            "image {spec} is in use: {held} lock held by {locker} at {addr}, whose watch is \
                             still registered after {} s but does not answer (a dead client whose \
                             watch outlives osd_client_watch_timeout, or a stopped one); retry later \
                             (RADOS_NBD_LOCK_WAIT_SECS sets the wait)",
                            wait.as_secs()
                        ),
                    ));
                }
                Some(_) => {}
            }
            tokio::time::sleep(LOCK_RECHECK_PAUSE).await;
            notify_ms = LOCK_RECHECK_NOTIFY_MS;
        }
        if let Some((t0, _)) = waited {
            tracing::info!(image = %spec, "the silent owner's watch is gone after {:.1} s", t0.elapsed().as_secs_f64());
            // The lock may have changed hands meanwhile: only break what was checked.
            let now = get_lock_info(inner).await.map_err(ctx)?;
            if now.lockers != info.lockers {
                continue;
            }
        }
        for locker in &info.lockers {
            fence_and_break(inner, locker, held).await?;
        }
    }
    Err(Error::new(
        ErrorKind::Busy,
        format!("image {spec}: could not take the exclusive lock (another client keeps taking it)"),
    ))
}

/// Blocklists a dead lock owner's address, then breaks its lock (librbd's BreakRequest
/// with `rbd_blocklist_on_break_lock`, expiry `rbd_blocklist_expire_seconds` = 0: the
/// cluster's default).
async fn fence_and_break(inner: &Inner, locker: &cls::Locker, held: &str) -> Result<()> {
    let spec = &inner.spec;
    let Some(addr) = locker.address.as_deref() else {
        return Err(Error::new(
            ErrorKind::Busy,
            format!(
                "image {spec}: the {held} lock of {locker} records no address, so its owner cannot be \
                 fenced; if it is surely dead, remove the lock with `rbd lock rm`"
            ),
        ));
    };
    let me = inner.meta.cluster().instance_id();
    if u64::try_from(locker.entity_num) == Ok(me) {
        return Err(Error::new(
            ErrorKind::Busy,
            format!("image {spec}: the {held} lock is held by this very client ({locker}); refusing to blocklist ourselves"),
        ));
    }
    tracing::warn!(image = %spec, %locker, address = addr,
        "breaking the stale {held} lock of a dead owner: blocklisting {addr} first (fencing it off)");
    if let Err(e) = inner.meta.cluster().blocklist_add(addr, 0).await {
        let denied = matches!(errno_of(&e), Some(1) | Some(13));
        return Err(if denied {
            Error::new(
                ErrorKind::Busy,
                format!(
                    "image {spec}: may not blocklist the dead lock owner {locker} at {addr} before \
                     breaking its lock: the client needs the mon cap 'profile rbd' (or \
                     'allow command \"osd blocklist\" with blocklistop=add'): {e}"
                ),
            )
        } else {
            e.context(format!(
                "image {spec}: blocklisting the dead lock owner {locker} at {addr}"
            ))
        });
    }
    match inner
        .meta
        .exec_write(
            &inner.hdr_oid,
            LOCK,
            "break_lock",
            &cls::break_lock_in(cls::RBD_LOCK_NAME, locker),
        )
        .await
    {
        Ok(())
        | Err(Error {
            kind: ErrorKind::NotFound,
            ..
        }) => Ok(()),
        Err(e) => Err(e.context(format!("breaking the stale lock of image {spec}"))),
    }
}

/// Follows the header watch: refreshes on header updates, re-registers a lost watch and
/// moves the lock to the new cookie (librbd's ReacquireRequest).
async fn watch_events(
    inner: Weak<Inner>,
    mut rx: mpsc::UnboundedReceiver<WatchEvent>,
    tx: mpsc::UnboundedSender<WatchEvent>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let ev = tokio::select! {
            ev = rx.recv() => ev,
            _ = stop.changed() => None,
        };
        let Some(ev) = ev else { return };
        let Some(inner) = inner.upgrade() else { return };
        match ev {
            WatchEvent::Notify { notifier_id, data } => match cls::notify_op(&data) {
                Ok(cls::NOTIFY_OP_RESIZE) if inner.takes_owner_requests() => {
                    match cls::resize_request(&data) {
                        Ok(req) => start_resize(&inner, req, notifier_id),
                        Err(e) => {
                            tracing::warn!(image = %inner.spec, "resize request from client.{notifier_id}: {e}")
                        }
                    }
                }
                Ok(cls::NOTIFY_OP_HEADER_UPDATE) => {
                    if let Err(e) = refresh(&inner).await {
                        tracing::warn!(image = %inner.spec, "refreshing header after an update notification: {e}");
                    }
                }
                Ok(op) if cls::notify_wants_owner_reply(op) => {
                    tracing::info!(image = %inner.spec, "refused request (op {op}) from client.{notifier_id}: the lock is held exclusively");
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(image = %inner.spec, "undecodable header notification: {e}")
                }
            },
            WatchEvent::Error { cookie, err } => {
                if inner.is_fenced() {
                    return;
                }
                if -err == rados::EBLOCKLISTED {
                    inner.fence("blocklisted by the cluster");
                    return;
                }
                tracing::warn!(image = %inner.spec, "header watch {cookie} lost (errno {}); re-registering", -err);
                inner.reacquiring.store(true, Ordering::SeqCst);
                let mut delay = std::time::Duration::from_millis(500);
                loop {
                    match rewatch(&inner, tx.clone()).await {
                        Ok(()) => {
                            tracing::info!(image = %inner.spec, "header watch re-registered; exclusive lock re-asserted");
                            break;
                        }
                        Err(e) if is_blocklisted(&e) => {
                            inner.fence("blocklisted by the cluster");
                            inner.reacquiring.store(false, Ordering::SeqCst);
                            return;
                        }
                        // The lock is no longer ours (broken by another client, or the
                        // image is gone): never send anything again through this handle.
                        Err(e) if lock_definitely_lost(&e) => {
                            let why = match get_lock_info(&inner).await {
                                Ok(i) if !i.lockers.is_empty() => {
                                    let l = &i.lockers[0];
                                    format!("lock broken, now held by {l}")
                                }
                                Ok(_) => format!("lock broken by another client ({e})"),
                                Err(_) => e.to_string(),
                            };
                            inner.fence(&why);
                            inner.reacquiring.store(false, Ordering::SeqCst);
                            return;
                        }
                        // Unreachable OSD, timeouts: keep trying, writes wait with EIO.
                        Err(e) => {
                            tracing::warn!(image = %inner.spec, "re-registering the header watch: {e}; retrying in {delay:?}");
                            tokio::select! {
                                _ = tokio::time::sleep(delay) => {}
                                _ = stop.changed() => return,
                            }
                            delay = (delay * 2).min(std::time::Duration::from_secs(5));
                        }
                    }
                }
                inner.reacquiring.store(false, Ordering::SeqCst);
            }
        }
    }
}

/// Errors after which the lock is not ours any more: cls_lock's set_cookie answers ENOENT
/// when no lock with our old cookie exists (someone broke it) and EBUSY when it cannot be
/// moved; a missing header means the image was removed.
fn lock_definitely_lost(e: &Error) -> bool {
    matches!(
        e.kind,
        ErrorKind::NotFound | ErrorKind::Busy | ErrorKind::AlreadyExists
    )
}

async fn rewatch(inner: &Arc<Inner>, tx: mpsc::UnboundedSender<WatchEvent>) -> Result<()> {
    let mut guard = inner.lock.lock().await;
    let Some(state) = guard.as_mut() else {
        return Ok(());
    };
    let new = inner.meta.watch(&inner.hdr_oid, replier(inner), tx).await?;
    let new_cookie = cls::lock_cookie(new.cookie);
    let (kind, tag) = lock_kind(inner.mode);
    let input = cls::set_cookie_in(cls::RBD_LOCK_NAME, kind, &state.cookie, tag, &new_cookie);
    let old = std::mem::replace(&mut state.watch, new);
    let _ = inner.meta.unwatch(old).await;
    inner
        .meta
        .exec_write(&inner.hdr_oid, LOCK, "set_cookie", &input)
        .await?;
    state.cookie = new_cookie;
    Ok(())
}

async fn refresh(inner: &Inner) -> Result<ImageHeader> {
    let (h, _) = load_header(&inner.meta, &inner.spec, &inner.id, inner.mode).await?;
    if inner.snap_id.is_none() {
        let ids: Vec<u64> = h.snaps.iter().map(|s| s.id).collect();
        inner.data.set_snap_write_ctx(h.snap_seq, &ids)?;
    }
    let mut cur = inner.header.write().unwrap_or_else(|p| p.into_inner());
    if cur.size != h.size {
        tracing::info!(image = %inner.spec, "size changed from {} to {}", cur.size, h.size);
    }
    *cur = h.clone();
    Ok(h)
}

impl Inner {
    fn object_name(&self, objno: u64) -> String {
        format!("rbd_data.{}.{objno:016x}", self.id)
    }

    fn object_size(&self) -> u64 {
        self.header
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .object_size()
    }

    fn is_fenced(&self) -> bool {
        self.lost_lock.load(Ordering::SeqCst)
    }

    /// The lock is not ours any more (broken by another client, which blocklisted us or
    /// not): from now on nothing is sent to the cluster through this handle and every read
    /// and write fails with EIO, so that nothing lands over the new owner's writes and no
    /// client reads data the new owner is changing. Logged once, whoever notices first.
    fn fence(&self, why: &str) {
        if !self.lost_lock.swap(true, Ordering::SeqCst) {
            tracing::error!(image = %self.spec, "lost the {} ({why}): nothing more is sent to the cluster; \
                reads and writes now fail with EIO", lock_name(self.mode));
        }
    }

    /// Passes `r` on, fencing the handle first when it says we are blocklisted (librados
    /// fails every operation of a blocklisted client with ESHUTDOWN).
    fn noting_fence<T>(&self, r: Result<T>) -> Result<T> {
        if let Err(e) = &r {
            if is_blocklisted(e) {
                self.fence("blocklisted by the cluster");
            }
        }
        r
    }

    fn fenced_error(&self) -> Error {
        Error::new(
            ErrorKind::Io,
            format!(
                "image {}: the {} was lost (fenced by another client); I/O refused",
                self.spec,
                lock_name(self.mode)
            ),
        )
    }

    fn check_readable(&self) -> Result<()> {
        if self.is_fenced() {
            return Err(self.fenced_error());
        }
        Ok(())
    }

    fn check_writable(&self) -> Result<()> {
        if self.mode == OpenMode::ReadOnly {
            return Err(Error::new(
                ErrorKind::ReadOnly,
                format!("image {} is open read-only", self.spec),
            ));
        }
        if self.closed.load(Ordering::SeqCst) {
            return Err(Error::new(
                ErrorKind::Io,
                format!("image {} is closed", self.spec),
            ));
        }
        if self.reacquiring.load(Ordering::SeqCst) {
            return Err(Error::new(
                ErrorKind::Io,
                format!(
                    "image {}: re-asserting the exclusive lock after a lost watch; retry",
                    self.spec
                ),
            ));
        }
        if self.is_fenced() {
            return Err(self.fenced_error());
        }
        Ok(())
    }

    /// The handle that reads at `snap` (None: the opened snapshot, or the head).
    fn reader(&self, snap: Option<u64>) -> Result<Arc<IoCtx>> {
        match snap {
            None => Ok(self.data.clone()),
            Some(s) if Some(s) == self.snap_id => Ok(self.data.clone()),
            Some(s) => {
                let mut m = self.snap_ios.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(io) = m.get(&s) {
                    return Ok(io.clone());
                }
                let io = self.meta.at_snap(s)?;
                m.insert(s, io.clone());
                Ok(io)
            }
        }
    }
}

impl ImageStore for CephImage {
    fn header(&self) -> ImageHeader {
        self.inner
            .header
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    async fn refresh_header(&self) -> Result<ImageHeader> {
        refresh(&self.inner).await
    }

    fn check_usable(&self) -> Result<()> {
        self.inner.check_readable()
    }

    /// Refuses an image that starts with a LUKS header (object 0, read at the opened
    /// snapshot) unless `--allow-encrypted`: encrypted by librbd (`rbd encryption format`)
    /// when the data lies exactly one object in, else made by librbd or by cryptsetup on
    /// the device, which cannot be told apart; either way serving it would hand out
    /// ciphertext to a client that may not expect it.
    async fn check_servable(&self) -> Result<()> {
        let i = &self.inner;
        let spec = &i.spec;
        let oid = i.object_name(0);
        let ctx = |e: Error| e.context(format!("checking image {spec} for encryption"));
        let Some(mut head) = i.data.read(&oid, 0, luks::PROBE_LEN).await.map_err(ctx)? else {
            return Ok(());
        };
        if let Some(size) = luks::luks2_header_size(&head) {
            if size > head.len() as u64 {
                head = i
                    .data
                    .read(&oid, 0, size as usize)
                    .await
                    .map_err(ctx)?
                    .unwrap_or_default();
            }
        }
        let Some(h) = luks::parse(&head) else {
            return Ok(());
        };
        let v = h.version;
        let librbd = h.is_librbd_layout(i.object_size());
        let first_note = || {
            i.luks_noted
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(spec.to_string())
        };
        if i.allow_encrypted {
            if first_note() {
                tracing::warn!(
                    "image {spec} starts with a LUKS{v} header (data offset {}); serving the \
                     raw LUKS volume (--allow-encrypted): clients see the header and ciphertext",
                    h.data_offset
                );
            }
            return Ok(());
        }
        // librbd's own layouts are not always distinguishable from cryptsetup's (LUKS2 on
        // objects of 16 MiB or less, the default 4 MiB included, puts its data at 16 MiB
        // exactly as `cryptsetup luksFormat` does), so every LUKS volume at offset 0 is
        // refused until the user says it is theirs to serve raw.
        let who = if librbd {
            format!("it is encrypted by librbd (rbd encryption format, LUKS{v})")
        } else {
            format!(
                "it starts with a LUKS{v} header (data at {} bytes), made by `rbd encryption \
                 format` or by cryptsetup on the device, which cannot be told apart",
                h.data_offset
            )
        };
        Err(Error::new(
            ErrorKind::Unsupported,
            format!(
                "image {spec} not served: {who}; rados-nbd has no client-side encryption and \
                 would serve ciphertext; pass --allow-encrypted to serve the raw LUKS volume \
                 (right for a volume cryptsetup made on the device)"
            ),
        ))
    }

    fn owner_requests(&self) -> Option<mpsc::UnboundedReceiver<OwnerRequest>> {
        let i = &self.inner;
        if i.mode != OpenMode::ReadWrite || i.closed.load(Ordering::SeqCst) {
            return None;
        }
        let mut slot = i.owner_tx.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_some() {
            return None;
        }
        let (tx, rx) = mpsc::unbounded_channel();
        *slot = Some(tx);
        Some(rx)
    }

    async fn set_size(&self, size: u64) -> Result<()> {
        let i = &self.inner;
        i.check_writable()?;
        let r = i
            .meta
            .exec_write(
                &i.hdr_oid,
                RBD,
                "set_size",
                &cls::Enc::new().u64(size).done(),
            )
            .await;
        i.noting_fence(r)
            .map_err(|e| e.context(format!("setting the size of image {}", i.spec)))?;
        i.header.write().unwrap_or_else(|p| p.into_inner()).size = size;
        // Other watchers (librbd clients, `rbd info --watch`...) re-read the header, as
        // after librbd's own resize; nobody has to answer.
        let (meta, oid) = (i.meta.clone(), i.hdr_oid.clone());
        tokio::spawn(async move {
            let _ = meta
                .notify(&oid, &cls::header_update_notify(), NOTIFY_TIMEOUT_MS)
                .await;
        });
        Ok(())
    }

    async fn set_flags(&self, value: u64, mask: u64) -> Result<()> {
        let i = &self.inner;
        // A fenced handle must not clear the invalid flag the new owner relies on.
        i.check_readable()?;
        let snap = i.snap_id.unwrap_or(cls::NOSNAP);
        let r = i
            .meta
            .exec_write(
                &i.hdr_oid,
                RBD,
                "set_flags",
                &cls::set_flags_in(value, mask, snap),
            )
            .await;
        i.noting_fence(r)
            .map_err(|e| e.context(format!("setting flags of image {}", i.spec)))?;
        let mut h = i.header.write().unwrap_or_else(|p| p.into_inner());
        h.flags = (h.flags & !mask) | (value & mask);
        Ok(())
    }

    async fn get_meta(&self, key: &str) -> Result<Option<String>> {
        let i = &self.inner;
        match i
            .meta
            .exec_read(&i.hdr_oid, RBD, "metadata_get", &cls::string_in(key))
            .await
        {
            Ok(b) => Ok(Some(cls::string_out(&b, "rbd.metadata_get reply")?)),
            Err(e) if e.kind == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.context(format!("reading metadata {key} of image {}", i.spec))),
        }
    }

    async fn set_meta(&self, key: &str, value: &str) -> Result<()> {
        let i = &self.inner;
        i.meta
            .exec_write(
                &i.hdr_oid,
                RBD,
                "metadata_set",
                &cls::metadata_set_in(&[(key, value)]),
            )
            .await
            .map_err(|e| e.context(format!("setting metadata {key} of image {}", i.spec)))
    }

    async fn read(
        &self,
        objno: u64,
        off: u64,
        len: u64,
        snap: Option<u64>,
    ) -> Result<Option<Bytes>> {
        let i = &self.inner;
        let len = usize::try_from(len).map_err(|_| {
            Error::new(
                ErrorKind::InvalidInput,
                format!("read length {len} too large"),
            )
        })?;
        i.check_readable()?;
        let io = i.reader(snap)?;
        let r = io.read(&i.object_name(objno), off, len).await;
        Ok(i.noting_fence(r)?.map(Bytes::from))
    }

    async fn write(&self, objno: u64, off: u64, data: Bytes, _durable: bool) -> Result<()> {
        // RADOS acknowledges a write once it is durable on every replica, so FUA is free.
        let i = &self.inner;
        i.check_writable()?;
        let osize = i.object_size();
        let mut op = WriteOp::new();
        op.set_alloc_hint(osize, osize).write(off, &data);
        let r = i.data.operate(&i.object_name(objno), op, "write").await;
        i.noting_fence(r)
    }

    async fn zero(&self, objno: u64, off: u64, len: u64, _durable: bool) -> Result<()> {
        let i = &self.inner;
        i.check_writable()?;
        let osize = i.object_size();
        let mut op = WriteOp::new();
        // assert_exists: truncate would otherwise create a missing object.
        op.assert_exists();
        if off.saturating_add(len) >= osize {
            op.truncate(off);
        } else {
            op.zero(off, len);
        }
        match i.data.operate(&i.object_name(objno), op, "zero").await {
            Err(e) if e.kind == ErrorKind::NotFound => Ok(()),
            r => i.noting_fence(r),
        }
    }

    async fn remove(&self, objno: u64, _durable: bool) -> Result<()> {
        let i = &self.inner;
        i.check_writable()?;
        let r = i.data.remove(&i.object_name(objno)).await;
        i.noting_fence(r).map(|_| ())
    }

    async fn sync(&self) -> Result<()> {
        // Nothing is acknowledged before it is durable in RADOS.
        Ok(())
    }

    async fn list_objects(&self, snap: Option<u64>) -> Result<Vec<u64>> {
        let i = &self.inner;
        let prefix = format!("rbd_data.{}.", i.id);
        let names = i.meta.list_objects(&prefix).await?;
        let mut objs: Vec<u64> = names
            .iter()
            .filter_map(|n| n.strip_prefix(&prefix))
            .filter(|hex| hex.len() == 16)
            .filter_map(|hex| u64::from_str_radix(hex, 16).ok())
            .collect();
        objs.sort_unstable();
        let snap = snap.or(i.snap_id);
        let Some(s) = snap else { return Ok(objs) };
        // At a snapshot an object listed now may not have existed yet: ask the snapshot.
        let io = i.reader(Some(s))?;
        let found = Arc::new(Mutex::new(Vec::new()));
        let id = i.id.clone();
        for_each_parallel(objs, |objno| {
            let (io, found, id) = (io.clone(), found.clone(), id.clone());
            async move {
                let name = format!("rbd_data.{id}.{objno:016x}");
                if io.stat(&name).await?.is_some() {
                    found.lock().unwrap_or_else(|p| p.into_inner()).push(objno);
                }
                Ok(())
            }
        })
        .await?;
        let mut v = std::mem::take(&mut *found.lock().unwrap_or_else(|p| p.into_inner()));
        v.sort_unstable();
        Ok(v)
    }

    /// Without snapshots every listed object is EXISTS (librbd computes the same), so the
    /// pool listing is enough. With snapshots, librbd's computation needs each object's
    /// snap set (`list_snaps`): which objects were written since the newest snapshot, and
    /// which listed objects only clones keep (removed from the head since a snapshot).
    async fn list_object_states(
        &self,
        snap: Option<u64>,
    ) -> Result<Vec<(u64, objmap::ObjectState)>> {
        let i = &self.inner;
        let h = self.header();
        if h.snaps.is_empty() {
            let objs = self.list_objects(snap).await?;
            return Ok(objs
                .into_iter()
                .map(|o| (o, objmap::ObjectState::Exists))
                .collect());
        }
        let objs = self.list_objects(None).await?;
        let ids: Vec<u64> = h.snaps.iter().map(|s| s.id).collect();
        let at = snap
            .or(i.snap_id)
            .unwrap_or(crate::store::snapset::SNAP_HEAD);
        snaps::object_states(
            &i.meta,
            &h.object_prefix,
            objs,
            at,
            &ids,
            h.features & RBD_FEATURE_FAST_DIFF != 0,
            &i.spec.to_string(),
        )
        .await
    }

    async fn read_object_map(&self, snap: Option<u64>) -> Result<Option<Vec<u8>>> {
        let i = &self.inner;
        i.check_readable()?;
        let oid = object_map_oid(&i.id, snap.or(i.snap_id));
        let st = i.meta.stat(&oid).await;
        let Some(st) = i.noting_fence(st)? else {
            return Ok(None);
        };
        let len = usize::try_from(st.size).map_err(|_| {
            Error::new(ErrorKind::Corrupt, format!("object map {oid} is too large"))
        })?;
        let data = i.meta.read(&oid, 0, len).await?.unwrap_or_default();
        if data.len() != len {
            return Err(Error::new(
                ErrorKind::Io,
                format!("object map {oid}: read {} of {len} bytes", data.len()),
            ));
        }
        Ok(Some(data))
    }

    /// cls_rbd's `object_map_save` decodes the map and writes it back with crcs using
    /// `write_full`; our bytes are already that encoding (objmap is checked byte for byte
    /// against maps written by Ceph), so a plain `write_full` stores the same object.
    async fn write_object_map(&self, data: Vec<u8>) -> Result<()> {
        let i = &self.inner;
        i.check_writable()?;
        let oid = object_map_oid(&i.id, None);
        let mut op = WriteOp::new();
        op.write_full(&data);
        let r = i.meta.operate(&oid, op, "write_full").await;
        i.noting_fence(r)
    }

    async fn close(&self) -> Result<()> {
        let i = &self.inner;
        if i.closed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        // No more requests for the owner: the image layer's loop ends.
        i.owner_tx.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some(state) = i.lock.lock().await.take() else {
            return Ok(());
        };
        let _ = state.stop.send(true);
        // Our AcquiredLock notify may still be waiting for acks (ours among them: the
        // watch still answers it); it ends within its own timeout.
        if let Some(n) = state.acquired_notify {
            let _ = n.await;
        }
        // The event task sees `stop` once what it is doing (a header refresh) is done;
        // a re-registration in progress may take longer, so the wait is bounded.
        if let Some(ev) = state.events {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(10), ev).await;
        }
        if i.is_fenced() {
            // The lock is someone else's now: no unlock, no notify. Only our watch is
            // ended (librados would otherwise keep re-registering it), bounded, since a
            // blocklisted client may wait on the OSD for nothing.
            let _ = tokio::time::timeout(
                std::time::Duration::from_secs(5),
                i.meta.unwatch(state.watch),
            )
            .await;
            return Err(i.fenced_error());
        }
        let unlocked = i
            .meta
            .exec_write(
                &i.hdr_oid,
                LOCK,
                "unlock",
                &cls::unlock_in(cls::RBD_LOCK_NAME, &state.cookie),
            )
            .await;
        // Waiting librbd clients retry on ReleasedLock instead of after their timeout.
        let gid = i.meta.cluster().instance_id();
        let msg = cls::lock_notify(cls::NOTIFY_OP_RELEASED_LOCK, gid, state.watch.cookie);
        let _ = i.meta.notify(&i.hdr_oid, &msg, 1000).await;
        let unwatched = i.meta.unwatch(state.watch).await;
        unlocked.map_err(|e| e.context(format!("unlocking image {}", i.spec)))?;
        unwatched.map_err(|e| e.context(format!("closing image {}", i.spec)))?;
        tracing::info!(image = %i.spec, "released {}", lock_name(i.mode));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_ids_look_like_librbds() {
        let a = generate_image_id(0x101b);
        let b = generate_image_id(0x101b);
        assert!(a.starts_with("101b") && a.len() == 12, "{a}");
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
        assert!(generate_image_id(u64::MAX).len() <= 14);
    }

    #[test]
    fn feature_checks() {
        let spec: ImageSpec = "rbd/x".parse().unwrap();
        assert!(check_features(&spec, 0x1d, 0x1d, OpenMode::ReadWrite).is_ok());
        assert!(check_features(&spec, 0x3d, 0x3d, OpenMode::ReadWrite).is_ok());
        let e = check_features(&spec, 0x1d | RBD_FEATURE_JOURNALING, 0, OpenMode::ReadOnly)
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::Unsupported);
        assert!(e.message.contains("journaling"));
        assert!(check_features(&spec, RBD_FEATURE_DATA_POOL, 0, OpenMode::ReadOnly).is_err());
        assert!(check_features(&spec, 1 << 20, 0, OpenMode::ReadOnly).is_err());
        assert_eq!(
            check_features(&spec, RBD_FEATURE_NON_PRIMARY, 0, OpenMode::ReadWrite)
                .unwrap_err()
                .kind,
            ErrorKind::ReadOnly
        );
        assert!(check_features(&spec, RBD_FEATURE_NON_PRIMARY, 0, OpenMode::ReadOnly).is_ok());
    }

    #[test]
    fn notify_replies() {
        for takes in [false, true] {
            assert_eq!(
                reply_to_notify(
                    1,
                    &cls::lock_notify(cls::NOTIFY_OP_REQUEST_LOCK, 1, 2),
                    takes
                ),
                cls::response_message(-30),
                "the lock is never handed over"
            );
            assert!(reply_to_notify(1, &cls::header_update_notify(), takes).is_empty());
            assert!(reply_to_notify(1, &[], takes).is_empty());
        }
        let id = cls::AsyncRequestId {
            gid: 1,
            handle: 2,
            request_id: 3,
        };
        let resize = cls::resize_notify(1 << 30, id, false);
        assert_eq!(
            reply_to_notify(1, &resize, true),
            cls::response_message(0),
            "accepted; AsyncComplete follows"
        );
        assert_eq!(
            reply_to_notify(1, &resize, false),
            cls::response_message(-30)
        );
        assert_ne!(
            reply_to_notify(1, &resize[..resize.len() - 3], true),
            cls::response_message(0),
            "an undecodable resize is never accepted"
        );
    }

    #[test]
    fn object_map_names() {
        assert_eq!(object_map_oid("10ab", None), "rbd_object_map.10ab");
        assert_eq!(
            object_map_oid("10ab", Some(4)),
            "rbd_object_map.10ab.0000000000000004"
        );
    }
}
