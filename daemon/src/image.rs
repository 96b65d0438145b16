//! The image layer: byte ranges to objects, the in-memory object map and its dirty-flag
//! lifecycle (issue 3), served to NBD through [`nbd_protocol::Backend`].
//!
//! Invariant kept while an image is open for writing with its map in memory: every
//! object that exists in the store is not NONEXISTENT in the map. Writes mark EXISTS
//! before the store write; removals mark NONEXISTENT only after the store removed the
//! object; a per-object lock keeps a removal from interleaving with a write. The header
//! carries OBJECT_MAP_INVALID while the on-disk map may be stale (from open until a
//! clean close or checkpoint, and again from the first map-changing request after a
//! checkpoint, set before that request touches the store), so a crash never leaves a
//! trusted stale map.

use crate::error::{Error, ErrorKind, Result};
use crate::spec::ImageSpec;
use crate::store::{
    ImageHeader, ImageStore, OpenMode, OwnerRequest, Store, RBD_FEATURE_FAST_DIFF,
    RBD_FEATURE_OBJECT_MAP, RBD_FLAG_FAST_DIFF_INVALID, RBD_FLAG_OBJECT_MAP_INVALID,
};
use bytes::Bytes;
use futures_util::future::try_join_all;
use nbd_protocol::backend::{STATE_HOLE, STATE_ZERO};
use nbd_protocol::{Backend, BackendError, Errno, ExportInfo, Extent, ReadChunk, ZeroFlags};
use objmap::{ObjectMap, ObjectState};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Mutex, RwLock};

/// Image metadata key of the per-image `shared` setting.
pub const META_SHARED: &str = "rados-nbd.shared";

/// Largest request the server accepts (NBD_INFO_BLOCK_SIZE maximum).
pub const MAX_BLOCK: u32 = 32 << 20;

const LOCK_SHARDS: usize = 1024;

/// Keeps every byte offset and object arithmetic far from u64 overflow.
pub const MAX_IMAGE_SIZE: u64 = 1 << 60;
/// 2^30 objects: a 256 MiB map in memory (4 PiB at 4 MiB objects).
pub const MAX_MAP_OBJECTS: u64 = 1 << 30;

#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Open read-only (also implied by a snapshot spec).
    pub read_only: bool,
    /// `shared` when the image has no `rados-nbd.shared` metadata (config `shared_default`).
    pub shared_default: bool,
    /// Checkpoint (write the map, clear the dirty flag) after this long without a
    /// map-changing request, so Ceph's tools can trust the map while the image is served
    /// (`--checkpoint-idle`). None: the flag stays set from open to close.
    pub checkpoint_idle: Option<Duration>,
}

/// `--checkpoint-idle SECONDS`: a positive number of seconds, fractions allowed.
pub fn parse_checkpoint_idle(s: &str) -> std::result::Result<Duration, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v > 0.0 && v <= 1e9 => Ok(Duration::from_secs_f64(v)),
        _ => Err(format!(
            "{s:?} is not a number of seconds above 0 (e.g. 30 or 0.5)"
        )),
    }
}

/// Why the in-memory map was rebuilt instead of loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MapSource {
    Loaded,
    Rebuilt(String),
}

/// Counters proving where answers came from (logged at close).
#[derive(Debug, Default)]
pub struct Stats {
    /// Read pieces answered as holes from the map, with no store call.
    pub map_reads: AtomicU64,
    pub store_reads: AtomicU64,
    pub store_writes: AtomicU64,
    pub store_zeroes: AtomicU64,
    pub store_removes: AtomicU64,
    /// Discard pieces that cost nothing: the object was already NONEXISTENT.
    pub skipped_removes: AtomicU64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct StatsSnapshot {
    pub map_reads: u64,
    pub store_reads: u64,
    pub store_writes: u64,
    pub store_zeroes: u64,
    pub store_removes: u64,
    pub skipped_removes: u64,
}

impl Stats {
    pub fn snapshot(&self) -> StatsSnapshot {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            map_reads: g(&self.map_reads),
            store_reads: g(&self.store_reads),
            store_writes: g(&self.store_writes),
            store_zeroes: g(&self.store_zeroes),
            store_removes: g(&self.store_removes),
            skipped_removes: g(&self.skipped_removes),
        }
    }
}

fn bump(a: &AtomicU64) {
    a.fetch_add(1, Ordering::Relaxed);
}

/// Parses the `shared` metadata value.
pub fn parse_bool(what: &str, v: &str) -> Result<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "true" | "yes" | "1" | "on" => Ok(true),
        "false" | "no" | "0" | "off" => Ok(false),
        _ => Err(Error::new(
            ErrorKind::InvalidInput,
            format!("{what} is {v:?}, expected true or false"),
        )),
    }
}

/// The image's effective `shared` setting.
pub async fn shared_setting<S: ImageStore>(
    img: &S,
    spec: &ImageSpec,
    default: bool,
) -> Result<bool> {
    match img.get_meta(META_SHARED).await? {
        None => Ok(default),
        Some(v) => parse_bool(&format!("image metadata {META_SHARED} of {spec}"), &v),
    }
}

/// Loads the object map of an open image, or rebuilds it from the objects that exist
/// when it cannot be trusted. Never writes anything.
pub async fn load_object_map<S: ImageStore>(
    img: &S,
    spec: &ImageSpec,
    header: &ImageHeader,
    snap: Option<u64>,
    size: u64,
) -> Result<(ObjectMap, MapSource)> {
    let count = size.div_ceil(header.object_size());
    let reason = match trusted_object_map(img, header, snap, size).await? {
        Ok(m) => return Ok((m, MapSource::Loaded)),
        Err(reason) => reason,
    };
    tracing::info!("rebuilding object map of {spec} ({count} objects): {reason}");
    let map = rebuild_map(img, spec, count, snap).await?;
    tracing::info!(
        "object map of {spec} rebuilt: {}",
        describe_rebuilt(&map, count)
    );
    Ok((map, MapSource::Rebuilt(reason)))
}

/// The stored object map (of the head, or of snapshot `snap`) if it can be trusted,
/// else why not. `header.flags` are the flags of what is opened: Ceph copies the head's
/// flags into a snapshot when it is taken, so a snapshot taken while the map was
/// invalid (a writer had crashed) carries the flag and a map that must not be believed.
pub async fn trusted_object_map<S: ImageStore>(
    img: &S,
    header: &ImageHeader,
    snap: Option<u64>,
    size: u64,
) -> Result<std::result::Result<ObjectMap, String>> {
    let count = size.div_ceil(header.object_size());
    if header.flags & RBD_FLAG_OBJECT_MAP_INVALID != 0 {
        return Ok(Err(
            "the header flags it invalid (a writer did not close cleanly)".to_string(),
        ));
    }
    Ok(match img.read_object_map(snap).await? {
        None => Err("it is missing".to_string()),
        Some(bytes) => match ObjectMap::decode(&bytes) {
            Err(e) => Err(format!("it is corrupt ({e})")),
            Ok(m) if m.len() != count => {
                Err(format!("it has {} entries for {count} objects", m.len()))
            }
            Ok(m) => Ok(m),
        },
    })
}

/// An all-NONEXISTENT map, without aborting on an absurd size from a bad header.
pub fn new_map(count: u64, spec: &ImageSpec) -> Result<ObjectMap> {
    ObjectMap::try_new(count).map_err(|e| {
        Error::new(
            ErrorKind::Io,
            format!("cannot hold the object map of {spec} ({count} objects) in memory: {e}"),
        )
    })
}

/// Creates an image and, with the object-map feature, its empty object map, so a fresh
/// image opens without a rebuild.
pub async fn create_image<St: Store>(
    store: &St,
    spec: &ImageSpec,
    opts: &crate::store::CreateOptions,
) -> Result<()> {
    let count = opts.size.div_ceil(1u64 << opts.order);
    if opts.size > MAX_IMAGE_SIZE {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!("image size {} too large (at most 2^60 bytes)", opts.size),
        ));
    }
    if opts.features & RBD_FEATURE_OBJECT_MAP != 0 && count > MAX_MAP_OBJECTS {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!(
                "{count} objects is too many for an object map (at most {MAX_MAP_OBJECTS}); use a larger --object-size"
            ),
        ));
    }
    store.create_image(spec, opts).await?;
    if opts.features & RBD_FEATURE_OBJECT_MAP != 0 {
        let img = store.open_image(spec, OpenMode::ReadWrite).await?;
        let r = match new_map(count, spec) {
            Ok(m) => img.write_object_map(m.encode()).await,
            Err(e) => Err(e),
        };
        let c = img.close().await;
        r.and(c)
            .map_err(|e| e.context(format!("writing the object map of new image {spec}")))?;
    }
    Ok(())
}

/// A map built from the data objects that exist, in the states librbd gives them
/// (`ImageStore::list_object_states`): with snapshots and fast-diff, an object not
/// written since the newest snapshot is EXISTS_CLEAN, so diffs stay exact.
pub async fn rebuild_map<S: ImageStore>(
    img: &S,
    spec: &ImageSpec,
    count: u64,
    snap: Option<u64>,
) -> Result<ObjectMap> {
    let objs = img.list_object_states(snap).await?;
    let map = new_map(count, spec)?;
    let mut beyond = 0u64;
    for (n, state) in objs {
        if n < count {
            map.set(n, state);
        } else {
            beyond += 1;
        }
    }
    if beyond > 0 {
        tracing::warn!("{spec}: {beyond} data objects lie beyond the image size; ignored");
    }
    Ok(map)
}

/// `N of M objects exist`, and how many of them are clean, for a rebuilt map.
pub fn describe_rebuilt(map: &ObjectMap, count: u64) -> String {
    let c = map.count(0..count);
    let clean = c[ObjectState::ExistsClean as usize];
    let exist = c[ObjectState::Exists as usize] + clean;
    if clean == 0 {
        format!("{exist} of {count} objects exist")
    } else {
        format!("{exist} of {count} objects exist ({clean} of them clean: unchanged since the last snapshot)")
    }
}

/// The header flags that mark the on-disk map stale for an image with `features`.
pub fn invalid_flags(features: u64) -> u64 {
    let mut f = RBD_FLAG_OBJECT_MAP_INVALID;
    if features & RBD_FEATURE_FAST_DIFF != 0 {
        f |= RBD_FLAG_FAST_DIFF_INVALID;
    }
    f
}

/// One piece of a request inside one object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Piece {
    pub objno: u64,
    /// Offset inside the object.
    pub off: u64,
    pub len: u64,
    /// Offset of this piece inside the request.
    pub req_off: u64,
}

/// Splits `[offset, offset+length)` at object boundaries.
pub(crate) fn split(order: u8, offset: u64, length: u64) -> Vec<Piece> {
    let osize = 1u64 << order;
    let mut v = Vec::new();
    let mut pos = offset;
    let end = offset + length;
    while pos < end {
        let objno = pos >> order;
        let off = pos & (osize - 1);
        let len = (osize - off).min(end - pos);
        v.push(Piece {
            objno,
            off,
            len,
            req_off: pos - offset,
        });
        pos += len;
    }
    v
}

pub struct Image<S: ImageStore> {
    store: S,
    spec: ImageSpec,
    header: ImageHeader,
    /// Changes only in `resize`, with every request held off by `gate`.
    size: AtomicU64,
    size_tx: tokio::sync::watch::Sender<u64>,
    snap: Option<u64>,
    read_only: bool,
    shared: bool,
    /// Replaced only in `resize`, with every request held off by `gate`; a request
    /// takes its own reference and never holds this lock across an await.
    map: std::sync::RwLock<Option<Arc<ObjectMap>>>,
    map_source: Option<MapSource>,
    locks: Vec<RwLock<()>>,
    /// Held shared by every request, exclusively by close/checkpoint; `true` once closed.
    gate: RwLock<bool>,
    /// Whether the header's OBJECT_MAP_INVALID flag is currently set by us.
    dirty_flag: AtomicBool,
    flag_lock: Mutex<()>,
    /// What the idle checkpointer waits on: the flag set, cleared, or the image closed.
    flag_tx: watch::Sender<FlagState>,
    checkpoint_idle: Option<Duration>,
    /// When the latest map-changing request came, in nanoseconds since `opened`: the
    /// idle checkpoint waits for `checkpoint_idle` after it.
    last_change: AtomicU64,
    opened: tokio::time::Instant,
    stats: Stats,
}

/// The dirty flag as the idle checkpointer sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FlagState {
    Clean,
    Dirty,
    Closed,
}

fn shutdown() -> BackendError {
    BackendError::new(Errno::Shutdown, "the image is closing")
}

impl<S: ImageStore> Image<S> {
    /// Opens an image for serving. Read-write (unless `read_only` or a snapshot) takes
    /// the store's exclusive lock, loads or rebuilds the map and sets the dirty flag
    /// before returning, so no write can be acknowledged under a clean flag.
    pub async fn open<St: Store<Image = S>>(
        store: &St,
        spec: &ImageSpec,
        opts: &OpenOptions,
    ) -> Result<Self> {
        let read_only = opts.read_only || spec.snap.is_some();
        let mode = if read_only {
            OpenMode::ReadOnly
        } else {
            // The lock to take depends on the image's `shared` setting: peek at it.
            let peek = store.open_image(spec, OpenMode::ReadOnly).await?;
            let shared = shared_setting(&peek, spec, opts.shared_default).await;
            // Refused before any lock is taken (`init` checks again for every caller).
            let servable = peek.check_servable().await;
            let _ = peek.close().await;
            servable?;
            if shared? {
                OpenMode::SharedWrite
            } else {
                OpenMode::ReadWrite
            }
        };
        let img = store.open_image(spec, mode).await?;
        if mode == OpenMode::SharedWrite
            && !shared_setting(&img, spec, opts.shared_default)
                .await
                .unwrap_or(false)
        {
            let _ = img.close().await;
            return Err(Error::new(
                ErrorKind::Busy,
                format!("the shared setting of {spec} changed while opening it; try again"),
            ));
        }
        Self::from_store_image(
            img,
            spec,
            &OpenOptions {
                read_only,
                ..opts.clone()
            },
        )
        .await
    }

    /// Like [`Image::open`] for a handle the caller opened itself (read-only exactly when
    /// `opts.read_only`). The handle is closed when this fails.
    pub async fn from_store_image(img: S, spec: &ImageSpec, opts: &OpenOptions) -> Result<Self> {
        let read_only = opts.read_only || spec.snap.is_some();
        match Self::init(img, spec, opts, read_only).await {
            Ok(i) => Ok(i),
            Err((img, e)) => {
                let _ = img.close().await;
                Err(e)
            }
        }
    }

    async fn init(
        img: S,
        spec: &ImageSpec,
        opts: &OpenOptions,
        read_only: bool,
    ) -> std::result::Result<Self, (S, Error)> {
        let header = img.header();
        let (snap, size) = match &spec.snap {
            None => (None, header.size),
            Some(name) => match header.snaps.iter().find(|s| &s.name == name) {
                Some(s) => (Some(s.id), s.size),
                None => {
                    let e = Error::new(ErrorKind::NotFound, format!("snapshot {spec} not found"));
                    return Err((img, e));
                }
            },
        };
        if let Err(e) = img.check_servable().await {
            return Err((img, e));
        }
        let shared = match shared_setting(&img, spec, opts.shared_default).await {
            Ok(s) => s,
            Err(e) => return Err((img, e)),
        };
        let use_map = header.features & RBD_FEATURE_OBJECT_MAP != 0 && !shared;
        let (map, map_source) = if use_map && snap.is_some() {
            // A snapshot's map cannot be rebuilt from a listing: an object removed from
            // the head since the snapshot was taken lives on only as a clone, which the
            // listing does not show, and a rebuilt map would read its data as zeros.
            // Without a trustworthy map every read asks the store, which is always right.
            match trusted_object_map(&img, &header, snap, size).await {
                Ok(Ok(m)) => (Some(m), Some(MapSource::Loaded)),
                Ok(Err(reason)) => {
                    tracing::info!(
                        "serving {spec} without an object map (every read asks the store): \
                         the snapshot's map cannot be used: {reason}"
                    );
                    (None, None)
                }
                Err(e) => return Err((img, e.context(format!("loading object map of {spec}")))),
            }
        } else if use_map && read_only {
            // A read-only handle of the head holds no lock: another client may write the
            // image while we serve it, and a map loaded now would answer "hole" for every
            // object created after this open (librbd's read-only handles do not trust
            // the map either). Only a snapshot, which nobody changes, or an exclusive
            // writer, whom nobody else can change under, keeps a map in memory.
            tracing::info!(
                "serving {spec} read-only without an object map (every read asks the \
                 store): another client may be writing it"
            );
            (None, None)
        } else if use_map {
            match load_object_map(&img, spec, &header, snap, size).await {
                Ok((m, src)) => (Some(m), Some(src)),
                Err(e) => return Err((img, e.context(format!("loading object map of {spec}")))),
            }
        } else {
            (None, None)
        };
        let image = Image {
            store: img,
            spec: spec.clone(),
            size: AtomicU64::new(size),
            size_tx: tokio::sync::watch::Sender::new(size),
            snap,
            read_only,
            shared,
            map: std::sync::RwLock::new(map.map(Arc::new)),
            map_source,
            locks: (0..LOCK_SHARDS).map(|_| RwLock::new(())).collect(),
            gate: RwLock::new(false),
            dirty_flag: AtomicBool::new(false),
            flag_lock: Mutex::new(()),
            flag_tx: watch::Sender::new(FlagState::Clean),
            checkpoint_idle: opts.checkpoint_idle,
            last_change: AtomicU64::new(0),
            opened: tokio::time::Instant::now(),
            stats: Stats::default(),
            header,
        };
        if let Err(e) = image.ensure_dirty().await {
            return Err((image.store, e.context(format!("marking {spec} in use"))));
        }
        tracing::debug!(
            "opened {spec}: size {size}, object map {}, {}",
            if image.map().is_some() {
                "in memory"
            } else {
                "off"
            },
            if read_only { "read-only" } else { "read-write" }
        );
        Ok(image)
    }

    pub fn spec(&self) -> &ImageSpec {
        &self.spec
    }
    pub fn header(&self) -> &ImageHeader {
        &self.header
    }
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }
    pub fn is_shared(&self) -> bool {
        self.shared
    }
    pub fn object_map(&self) -> Option<Arc<ObjectMap>> {
        self.map()
    }

    /// The map, kept across awaits (a reference of its own).
    fn map(&self) -> Option<Arc<ObjectMap>> {
        self.map_now().clone()
    }

    /// The map for a look or a change that does not wait: every request's per-object
    /// check goes through here, so it borrows under the read lock instead of paying an
    /// Arc clone and drop (two more atomic operations on a shared line) each time.
    fn map_now(&self) -> std::sync::RwLockReadGuard<'_, Option<Arc<ObjectMap>>> {
        self.map.read().unwrap_or_else(|p| p.into_inner())
    }
    pub fn map_source(&self) -> Option<&MapSource> {
        self.map_source.as_ref()
    }
    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }
    pub fn store(&self) -> &S {
        &self.store
    }

    fn order(&self) -> u8 {
        self.header.order
    }

    /// Bytes of object `objno` that lie inside the image.
    fn object_len(&self, objno: u64) -> u64 {
        let osize = self.header.object_size();
        osize.min(self.size().saturating_sub(objno * osize))
    }

    fn lock_for(&self, objno: u64) -> &RwLock<()> {
        &self.locks[(objno % LOCK_SHARDS as u64) as usize]
    }

    fn flag_mask(&self) -> u64 {
        invalid_flags(self.header.features)
    }

    /// Whether writes through this handle make the on-disk map stale: the image has an
    /// object map. With our own map in memory that is the usual dirty flag; without one
    /// (a shared image) nothing keeps the on-disk map up to date, so it must be flagged
    /// invalid before the first write and stay so after close: otherwise the next
    /// non-shared open (or librbd) would trust a map that misses every object the shared
    /// writers created, and read those as zeros.
    fn writes_stale_map(&self) -> bool {
        self.header.features & RBD_FEATURE_OBJECT_MAP != 0
    }

    /// Sets the dirty flag in the header if it is not set yet (at open, and at the first
    /// map-changing request after a checkpoint). Cheap when already set.
    async fn ensure_dirty(&self) -> Result<()> {
        if self.read_only || !self.writes_stale_map() || self.dirty_flag.load(Ordering::Acquire) {
            return Ok(());
        }
        let _g = self.flag_lock.lock().await;
        if self.dirty_flag.load(Ordering::Acquire) {
            return Ok(());
        }
        let mask = self.flag_mask();
        self.store.set_flags(mask, mask).await?;
        self.dirty_flag.store(true, Ordering::Release);
        self.flag_tx.send_replace(FlagState::Dirty);
        Ok(())
    }

    /// Whether setting object `objno` to `new` changes the map (also: whether the map on
    /// disk would go stale). Without a map in memory nothing is known, so yes.
    fn needs_map_change(&self, objno: u64, new: ObjectState) -> bool {
        !self
            .map_now()
            .as_deref()
            .is_some_and(|m| m.get(objno) == new)
    }

    /// Sets the dirty flag before a request that `changes` the map (asked lazily) does
    /// anything to the store.
    ///
    /// Why a request that changes nothing may go on under a clear flag: the flag is
    /// cleared only by a checkpoint, which holds `gate` exclusively, so no request is in
    /// flight then and the map on disk equals the one in memory. After it, an object's
    /// state in memory differs from the one on disk only once some request changed it,
    /// and that request set the flag first; the flag then stays set until the next
    /// checkpoint, which waits for every request holding `gate`, this one included. So a
    /// request that finds every object it touches already in the state it would leave
    /// it in (a write to EXISTS objects) either keeps the map on disk right or runs
    /// under a set flag, even if a concurrent request changes the same objects. This is
    /// what librbd does too: it updates the object map only when a state changes. For
    /// fast-diff a write to an EXISTS object is fine: EXISTS already says "changed since
    /// the latest snapshot"; EXISTS_CLEAN objects do change (to EXISTS).
    async fn dirty_before(&self, changes: impl FnOnce() -> bool) -> Result<()> {
        if self.read_only || !self.writes_stale_map() {
            return Ok(());
        }
        let idle = self.checkpoint_idle.is_some();
        // Without idle checkpoints only the flag matters: once set, nothing to look at.
        if !idle && self.dirty_flag.load(Ordering::Acquire) {
            return Ok(());
        }
        if !changes() {
            return Ok(());
        }
        if idle {
            let ns = self.opened.elapsed().as_nanos().min(u64::MAX as u128) as u64;
            self.last_change.fetch_max(ns, Ordering::Relaxed);
        }
        self.ensure_dirty().await
    }

    /// Whether discarding `[offset, offset+length)` (no NO_HOLE) changes the map: it
    /// removes a whole object that exists, or zeroes part of one that is not EXISTS (an
    /// EXISTS_CLEAN one becomes EXISTS). NONEXISTENT objects are skipped.
    fn discard_changes_map(&self, offset: u64, length: u64) -> bool {
        let Some(map) = self.map() else {
            return true;
        };
        if length == 0 {
            return false;
        }
        let order = self.order();
        let end = offset + length;
        let (first, last) = (offset >> order, (end - 1) >> order);
        let whole = |objno: u64| {
            let (o_lo, o_len) = (objno << order, self.object_len(objno));
            offset <= o_lo && o_lo + o_len <= end
        };
        map.runs(first..last + 1).any(|run| match run.state {
            ObjectState::Nonexistent => false,
            ObjectState::Exists => {
                let (lo, hi) = (run.start.max(first), run.end().min(last + 1));
                // Only the first and last objects of the range can be partly covered.
                hi - lo > 2 || whole(lo) || whole(hi - 1)
            }
            _ => true,
        })
    }

    /// Everything durable, then the map, then the flag cleared: in that order, so that
    /// a crash at any point leaves either a valid map or the flag set. Without a map in
    /// memory (a shared image) there is nothing valid to write, so the flag stays set
    /// and the next non-shared open rebuilds the map.
    async fn mark_clean(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.store.sync().await?;
        if let Some(map) = self.map() {
            let _g = self.flag_lock.lock().await;
            if self.dirty_flag.load(Ordering::Acquire) {
                self.store.write_object_map(map.encode()).await?;
                self.store.set_flags(0, self.flag_mask()).await?;
                self.dirty_flag.store(false, Ordering::Release);
                self.flag_tx.send_replace(FlagState::Clean);
            }
        }
        Ok(())
    }

    /// Writes the map and clears the flag while staying open (the last client left, or
    /// idle for `checkpoint_idle`). Waits for in-flight requests; the next map-changing
    /// request sets the flag again (see `dirty_before`).
    pub async fn checkpoint(&self) -> Result<()> {
        let g = self.gate.write().await;
        if *g {
            return Ok(());
        }
        self.mark_clean()
            .await
            .map_err(|e| e.context(format!("checkpointing {}", self.spec)))
    }

    /// Changes the image's size, as `rbd resize` does: asked by another client through
    /// the lock we hold (Ceph), or by `rados-nbd resize`. Waits for in-flight requests
    /// and holds new ones off meanwhile. Shrinking needs `allow_shrink`; it removes the
    /// objects past the new end and zeroes the tail of the last one, as librbd does, so
    /// that growing again later reads zeros there, then writes the new size. Growing
    /// writes the new size and extends the map with NONEXISTENT objects. The dirty flag
    /// is set first, so a crash part way leaves a map that will be rebuilt.
    ///
    /// Clients connected before a resize keep the size they were told at the handshake
    /// (NBD cannot tell them otherwise); requests past the new end of a smaller image get
    /// an error, and new connections see the new size.
    pub async fn resize(&self, new_size: u64, allow_shrink: bool) -> Result<()> {
        self.check_writable()?;
        let spec = &self.spec;
        if self.shared {
            // Its other writers would go on with the old size (and, shrinking, write
            // objects we just removed).
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!("{spec} is a shared image: resizing one is not supported; set shared=false and stop its other writers first"),
            ));
        }
        let g = self.gate.write().await;
        if *g {
            return Err(Error::new(
                ErrorKind::Io,
                format!("{spec} is closing; not resized"),
            ));
        }
        let old = self.size();
        if new_size == old {
            return Ok(());
        }
        if new_size < old && !allow_shrink {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "shrinking {spec} from {old} to {new_size} bytes discards data; it needs allow-shrink (--allow-shrink)"
                ),
            ));
        }
        if new_size > MAX_IMAGE_SIZE {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("size {new_size} too large (at most 2^60 bytes)"),
            ));
        }
        let osize = self.header.object_size();
        let (old_count, new_count) = (old.div_ceil(osize), new_size.div_ceil(osize));
        let map = self.map();
        let new_map = match &map {
            Some(m) => {
                if new_count > MAX_MAP_OBJECTS {
                    return Err(Error::new(
                        ErrorKind::InvalidInput,
                        format!(
                            "{new_count} objects is too many for an object map (at most {MAX_MAP_OBJECTS})"
                        ),
                    ));
                }
                let n = new_map(new_count, spec)?;
                for run in m.runs(0..old_count.min(new_count)) {
                    if run.state != ObjectState::Nonexistent {
                        n.set_range(run.start..run.end(), run.state);
                    }
                }
                Some(Arc::new(n))
            }
            None => None,
        };
        let ctx = |e: Error| e.context(format!("resizing {spec} from {old} to {new_size} bytes"));
        self.dirty_before(|| true).await.map_err(ctx)?;
        if new_size < old {
            let doomed: Vec<u64> = match &map {
                Some(m) => m
                    .runs(new_count..old_count)
                    .filter(|r| r.state != ObjectState::Nonexistent)
                    .flat_map(|r| r.start..r.end())
                    .collect(),
                // Without a map (a shared image) ask the store what exists.
                None => self
                    .store
                    .list_objects(None)
                    .await
                    .map_err(ctx)?
                    .into_iter()
                    .filter(|&o| o >= new_count)
                    .collect(),
            };
            for objno in doomed {
                self.store.remove(objno, false).await.map_err(ctx)?;
            }
            let tail = new_size % osize;
            let last = new_count.saturating_sub(1);
            if tail != 0
                && !map
                    .as_ref()
                    .is_some_and(|m| m.get(last) == ObjectState::Nonexistent)
            {
                self.store
                    .zero(last, tail, osize - tail, false)
                    .await
                    .map_err(ctx)?;
            }
            self.store.sync().await.map_err(ctx)?;
        }
        self.store.set_size(new_size).await.map_err(ctx)?;
        *self.map.write().unwrap_or_else(|p| p.into_inner()) = new_map;
        self.size.store(new_size, Ordering::Release);
        self.size_tx.send_replace(new_size);
        tracing::info!("resized {spec} from {old} to {new_size} bytes");
        drop(g);
        Ok(())
    }

    /// Serves the requests other clients address to the lock holder (a resize), if the
    /// store takes any for this handle: each runs here, one at a time, and its result
    /// goes back to the asker. Ends when the store stops sending (closed) or the image
    /// is dropped.
    pub fn serve_owner_requests(self: &Arc<Self>) {
        let Some(mut rx) = self.store.owner_requests() else {
            return;
        };
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            while let Some(req) = rx.recv().await {
                let Some(img) = me.upgrade() else { break };
                match req {
                    OwnerRequest::Resize {
                        size,
                        allow_shrink,
                        done,
                    } => {
                        tracing::info!(
                            "resize of {} to {size} bytes asked by another client{}",
                            img.spec,
                            if allow_shrink {
                                " (shrinking allowed)"
                            } else {
                                ""
                            }
                        );
                        let r = img.resize(size, allow_shrink).await;
                        if let Err(e) = &r {
                            tracing::warn!("{e}");
                        }
                        let _ = done.send(r);
                    }
                }
            }
        });
    }

    /// With `checkpoint_idle` set, checkpoints the image each time that long has passed
    /// since the latest map-changing request while the flag is set: the map on disk is
    /// then valid (and fast-diff usable by Ceph's tools) while the image stays served,
    /// until the next map-changing request sets the flag again, before it touches the
    /// store. Nothing to do read-only, or without a map in memory (a shared image keeps
    /// the flag set, see `writes_stale_map`). Ends at close or when the image is dropped.
    pub fn spawn_idle_checkpoints(self: &Arc<Self>) -> Option<tokio::task::JoinHandle<()>> {
        let idle = self.checkpoint_idle?;
        if self.read_only || !self.writes_stale_map() || self.map().is_none() {
            return None;
        }
        let me = Arc::downgrade(self);
        let mut rx = self.flag_tx.subscribe();
        Some(tokio::spawn(async move {
            loop {
                let state = *rx.borrow_and_update();
                match state {
                    FlagState::Closed => return,
                    FlagState::Clean => {
                        if rx.changed().await.is_err() {
                            return;
                        }
                        continue;
                    }
                    FlagState::Dirty => {}
                }
                // Only a weak reference is kept while waiting: the image may be dropped.
                let due = {
                    let Some(img) = me.upgrade() else { return };
                    let ns = img.last_change.load(Ordering::Relaxed);
                    img.opened + Duration::from_nanos(ns) + idle
                };
                if tokio::time::Instant::now() < due {
                    tokio::select! {
                        _ = tokio::time::sleep_until(due) => {}
                        r = rx.changed() => if r.is_err() { return },
                    }
                    continue;
                }
                let Some(img) = me.upgrade() else { return };
                match img.checkpoint().await {
                    Ok(()) => tracing::debug!(
                        "{}: idle for {idle:?}: object map written, flags cleared",
                        img.spec
                    ),
                    Err(e) => {
                        tracing::warn!("{e} (the dirty flag stays set; retried when idle)");
                        // Not in a tight loop: wait another idle period.
                        let ns = img.opened.elapsed().as_nanos().min(u64::MAX as u128) as u64;
                        img.last_change.fetch_max(ns, Ordering::Relaxed);
                    }
                }
            }
        }))
    }

    /// The image's size now, and every later change (a resize while attached): the
    /// kernel attach code passes changes on to /dev/nbdX.
    pub fn size_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.size_tx.subscribe()
    }

    /// Clean close: waits for in-flight requests, syncs, writes the map, clears the
    /// flag, releases the store handle. Requests after this fail with ESHUTDOWN.
    /// On error the flag stays set (the map is rebuilt at the next open).
    pub async fn close(&self) -> Result<()> {
        let mut g = self.gate.write().await;
        if *g {
            return Ok(());
        }
        *g = true;
        let res = self
            .mark_clean()
            .await
            .map_err(|e| e.context(format!("closing {}", self.spec)));
        let s = self.stats();
        tracing::info!(
            "closed {}: map_reads={} store_reads={} store_writes={} store_zeroes={} store_removes={} skipped_removes={}",
            self.spec, s.map_reads, s.store_reads, s.store_writes, s.store_zeroes,
            s.store_removes, s.skipped_removes
        );
        let res2 = self.store.close().await;
        self.flag_tx.send_replace(FlagState::Closed);
        res.and(res2)
    }

    fn is_nonexistent(&self, objno: u64) -> bool {
        self.map_now()
            .as_deref()
            .is_some_and(|m| m.get(objno) == ObjectState::Nonexistent)
    }

    /// Like `mark_exists` for a change to an object that is known to exist (a partial
    /// zero): NONEXISTENT stays so (a removal won the race; the store's zero of a
    /// missing object does nothing), anything else becomes EXISTS.
    fn mark_changed(&self, objno: u64) {
        if let Some(m) = self.map_now().as_deref() {
            let st = m.get(objno);
            if st != ObjectState::Exists && st != ObjectState::Nonexistent {
                m.set(objno, ObjectState::Exists);
            }
        }
    }

    fn mark_exists(&self, objno: u64) {
        if let Some(m) = self.map_now().as_deref() {
            if m.get(objno) != ObjectState::Exists {
                m.set(objno, ObjectState::Exists);
            }
        }
    }

    async fn read_piece(&self, p: Piece) -> Result<Vec<ReadChunk>> {
        let len = p.len as u32;
        if self.is_nonexistent(p.objno) {
            bump(&self.stats.map_reads);
            return Ok(vec![ReadChunk::Hole(len)]);
        }
        bump(&self.stats.store_reads);
        Ok(
            match self.store.read(p.objno, p.off, p.len, self.snap).await? {
                None => vec![ReadChunk::Hole(len)],
                Some(b) if b.is_empty() => vec![ReadChunk::Hole(len)],
                Some(b) if b.len() as u64 >= p.len => {
                    vec![ReadChunk::Data(b.slice(..p.len as usize))]
                }
                Some(b) => {
                    let rest = len - b.len() as u32;
                    vec![ReadChunk::Data(b), ReadChunk::Hole(rest)]
                }
            },
        )
    }

    async fn write_piece(&self, p: Piece, data: Bytes, fua: bool) -> Result<()> {
        let _g = self.lock_for(p.objno).read().await;
        self.mark_exists(p.objno);
        bump(&self.stats.store_writes);
        self.store.write(p.objno, p.off, data, fua).await
    }

    async fn discard_piece(&self, p: Piece, fua: bool, no_hole: bool) -> Result<()> {
        if no_hole {
            let zeros = Bytes::from(vec![0u8; p.len as usize]);
            return self.write_piece(p, zeros, fua).await;
        }
        if self.is_nonexistent(p.objno) {
            bump(&self.stats.skipped_removes);
            return Ok(());
        }
        if p.off == 0 && p.len == self.object_len(p.objno) {
            let _g = self.lock_for(p.objno).write().await;
            bump(&self.stats.store_removes);
            self.store.remove(p.objno, fua).await?;
            if let Some(m) = self.map_now().as_deref() {
                m.set(p.objno, ObjectState::Nonexistent);
            }
            Ok(())
        } else {
            {
                let _g = self.lock_for(p.objno).read().await;
                // Zeroing part of an object changes its bytes: an EXISTS_CLEAN object
                // (unchanged since the newest snapshot) becomes EXISTS, as librbd marks
                // it, or fast-diff (`rbd diff --whole-object --from-snap`, incremental
                // backups) would miss the change. Marked before the store call, like a
                // write, so the map never claims "unchanged" for changed bytes.
                self.mark_changed(p.objno);
                bump(&self.stats.store_zeroes);
                self.store.zero(p.objno, p.off, p.len, fua).await?;
            }
            self.remove_if_emptied(p.objno, fua).await
        }
    }

    /// An object that partial zeroes have left without any data (every byte punched
    /// out) is removed, as a whole-object discard would have removed it: the file
    /// servers punch such ranges too, and a removed object reads as zeros for free.
    /// Only where the store can tell cheaply (the directory store: SEEK_DATA finds
    /// nothing), and only for an exclusive writer: a shared image's other writers
    /// could write the object between the check and the removal.
    async fn remove_if_emptied(&self, objno: u64, fua: bool) -> Result<()> {
        if self.shared || !self.store.holds_no_data(objno).await? {
            return Ok(());
        }
        let _g = self.lock_for(objno).write().await;
        // Again under the object's write lock: a write may have landed since.
        if !self.store.holds_no_data(objno).await? {
            return Ok(());
        }
        // A removal changes the map: after an idle checkpoint the partial zero that led
        // here did not need the flag, this does, before the store is touched.
        self.dirty_before(|| true).await?;
        bump(&self.stats.store_removes);
        self.store.remove(objno, fua).await?;
        if let Some(m) = self.map_now().as_deref() {
            m.set(objno, ObjectState::Nonexistent);
        }
        Ok(())
    }

    async fn discard(&self, offset: u64, length: u32, fua: bool, no_hole: bool) -> Result<()> {
        self.check_writable()?;
        let length = length as u64;
        self.dirty_before(|| {
            if no_hole {
                // Zeros are written: every object touched ends EXISTS.
                split(self.order(), offset, length)
                    .iter()
                    .any(|p| self.needs_map_change(p.objno, ObjectState::Exists))
            } else {
                self.discard_changes_map(offset, length)
            }
        })
        .await?;
        // NO_HOLE writes zeros, so it cannot skip anything; without a map nothing is known.
        let map = match (self.map(), no_hole) {
            (Some(m), false) => m,
            _ => return self.discard_pieces(offset, length, fua, no_hole).await,
        };
        if length == 0 {
            return Ok(());
        }
        // Runs of NONEXISTENT objects cost nothing, whatever their length: skipping them
        // a run at a time makes discarding a fresh terabyte a handful of word compares
        // instead of a future per object.
        let order = self.order();
        let end = offset + length;
        let (first, last) = (offset >> order, (end - 1) >> order);
        for run in map.runs(first..last + 1) {
            let lo = (run.start << order).max(offset);
            let hi = (run.end() << order).min(end);
            if run.state == ObjectState::Nonexistent {
                self.stats
                    .skipped_removes
                    .fetch_add(run.len, Ordering::Relaxed);
                continue;
            }
            self.discard_pieces(lo, hi - lo, fua, no_hole).await?;
        }
        Ok(())
    }

    async fn discard_pieces(
        &self,
        offset: u64,
        length: u64,
        fua: bool,
        no_hole: bool,
    ) -> Result<()> {
        let pieces = split(self.order(), offset, length);
        try_join_all(
            pieces
                .into_iter()
                .map(|p| self.discard_piece(p, fua, no_hole)),
        )
        .await?;
        Ok(())
    }

    /// The protocol checked the request against the size its client was told; the image
    /// may have shrunk since (a resize while connected), so check again against now.
    fn in_range(&self, offset: u64, length: u64, errno: Errno) -> Result<(), BackendError> {
        let size = self.size();
        match offset.checked_add(length) {
            Some(end) if end <= size => Ok(()),
            _ => Err(BackendError::new(
                errno,
                format!(
                    "{offset}+{length} lies beyond the end of {} ({size} bytes since a resize)",
                    self.spec
                ),
            )),
        }
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::new(
                ErrorKind::ReadOnly,
                format!("{} is open read-only", self.spec),
            ));
        }
        Ok(())
    }

    fn extents(&self, offset: u64, length: u64) -> Vec<Extent> {
        let Some(map) = self.map() else {
            return vec![Extent { length, flags: 0 }];
        };
        let order = self.order();
        let end = (offset + length).min(self.size());
        if end <= offset {
            return vec![];
        }
        let first = offset >> order;
        let last = (end - 1) >> order;
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        for run in map.runs(first..last + 1) {
            let run_end = ((run.start + run.len) << order).min(end);
            if run_end <= pos {
                continue;
            }
            let flags = if run.state == ObjectState::Nonexistent {
                STATE_HOLE | STATE_ZERO
            } else {
                0
            };
            let len = run_end - pos;
            match out.last_mut() {
                Some(l) if l.flags == flags => l.length += len,
                _ => out.push(Extent { length: len, flags }),
            }
            pos = run_end;
        }
        if pos < end {
            // The map answered short (cannot happen with a consistent map): the rest is data.
            match out.last_mut() {
                Some(l) if l.flags == 0 => l.length += end - pos,
                _ => out.push(Extent {
                    length: end - pos,
                    flags: 0,
                }),
            }
        }
        out
    }
}

impl<S: ImageStore> Backend for Image<S> {
    fn current_size(&self) -> Option<u64> {
        Some(self.size())
    }

    fn info(&self) -> ExportInfo {
        let rw = !self.read_only;
        ExportInfo {
            size: self.size(),
            read_only: self.read_only,
            can_flush: rw,
            can_fua: rw,
            can_trim: rw,
            can_write_zeroes: rw,
            can_fast_zero: rw,
            can_cache: true,
            can_df: true,
            // One Image is shared by every connection and FLUSH syncs the whole store.
            can_multi_conn: true,
            min_block: 1,
            preferred_block: 4096,
            max_block: MAX_BLOCK,
            description: format!("rbd image {}", self.spec),
        }
    }

    async fn read(&self, offset: u64, length: u32) -> Result<Vec<ReadChunk>, BackendError> {
        let g = self.gate.read().await;
        if *g {
            return Err(shutdown());
        }
        self.in_range(offset, length as u64, Errno::Inval)?;
        let pieces = split(self.order(), offset, length as u64);
        if let [p] = pieces[..] {
            // Most requests lie in one object: no join machinery, no merging.
            return Ok(self.read_piece(p).await?);
        }
        let parts = try_join_all(pieces.into_iter().map(|p| self.read_piece(p))).await?;
        let mut out: Vec<ReadChunk> = Vec::new();
        for c in parts.into_iter().flatten() {
            match (out.last_mut(), c) {
                (Some(ReadChunk::Hole(a)), ReadChunk::Hole(b)) => *a += b,
                (_, c) => out.push(c),
            }
        }
        Ok(out)
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), BackendError> {
        let g = self.gate.read().await;
        if *g {
            return Err(shutdown());
        }
        self.check_writable()?;
        self.in_range(offset, data.len() as u64, Errno::NoSpc)?;
        let pieces = split(self.order(), offset, data.len() as u64);
        self.dirty_before(|| {
            pieces
                .iter()
                .any(|p| self.needs_map_change(p.objno, ObjectState::Exists))
        })
        .await?;
        if let [p] = pieces[..] {
            self.write_piece(p, data, fua).await?;
            return Ok(());
        }
        try_join_all(pieces.into_iter().map(|p| {
            let d = data.slice(p.req_off as usize..(p.req_off + p.len) as usize);
            self.write_piece(p, d, fua)
        }))
        .await?;
        Ok(())
    }

    async fn flush(&self) -> Result<(), BackendError> {
        let g = self.gate.read().await;
        if *g {
            return Err(shutdown());
        }
        self.store.sync().await?;
        Ok(())
    }

    async fn trim(&self, offset: u64, length: u32, fua: bool) -> Result<(), BackendError> {
        let g = self.gate.read().await;
        if *g {
            return Err(shutdown());
        }
        self.in_range(offset, length as u64, Errno::Inval)?;
        self.discard(offset, length, fua, false).await?;
        Ok(())
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        length: u32,
        flags: ZeroFlags,
    ) -> Result<(), BackendError> {
        let g = self.gate.read().await;
        if *g {
            return Err(shutdown());
        }
        if flags.fast_zero && flags.no_hole {
            // Keeping the range allocated means writing zeros: not fast.
            return Err(BackendError::new(
                Errno::NotSup,
                "zeroing with NO_HOLE writes data and is not fast",
            ));
        }
        if flags.fast_zero && !self.store.zeroes_are_fast() {
            // Whole objects are removed (fast); part of one would be written with zeros.
            let partial = split(self.order(), offset, length as u64)
                .iter()
                .any(|p| p.off != 0 || p.len != self.object_len(p.objno));
            if partial {
                return Err(BackendError::new(
                    Errno::NotSup,
                    "the store cannot punch holes here: zeroing part of an object writes zeros, not fast",
                ));
            }
        }
        self.in_range(offset, length as u64, Errno::NoSpc)?;
        self.discard(offset, length, flags.fua, flags.no_hole)
            .await?;
        Ok(())
    }

    async fn cache(&self, _offset: u64, _length: u32) -> Result<(), BackendError> {
        // Advisory; the store has no cache of its own to warm.
        Ok(())
    }

    async fn block_status(&self, offset: u64, length: u32) -> Result<Vec<Extent>, BackendError> {
        let g = self.gate.read().await;
        if *g {
            return Err(shutdown());
        }
        Ok(self.extents(offset, length as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::dir::{DirImage, DirStore};
    use crate::store::{CreateOptions, DEFAULT_FEATURES, RBD_FEATURE_LAYERING};
    use std::path::{Path, PathBuf};

    const OBJ: u64 = 4 << 20;

    fn spec(s: &str) -> ImageSpec {
        s.parse().unwrap()
    }

    async fn store_with(size: u64, features: u64) -> (tempfile::TempDir, DirStore) {
        let d = tempfile::tempdir().unwrap();
        let s = DirStore::new(d.path());
        let o = CreateOptions {
            size,
            order: 22,
            features,
        };
        create_image(&s, &spec("vm1"), &o).await.unwrap();
        (d, s)
    }

    async fn open(s: &DirStore, read_only: bool) -> Image<DirImage> {
        let o = OpenOptions {
            read_only,
            shared_default: false,
            checkpoint_idle: None,
        };
        Image::open(s, &spec("vm1"), &o).await.unwrap()
    }

    fn pool(d: &Path) -> PathBuf {
        d.join("rbd")
    }

    fn id(d: &Path) -> String {
        std::fs::read_to_string(pool(d).join("rbd_id.vm1")).unwrap()
    }

    fn header_flags(d: &Path) -> u64 {
        let b = std::fs::read(pool(d).join(format!("rbd_header.{}", id(d)))).unwrap();
        serde_json::from_slice::<serde_json::Value>(&b).unwrap()["flags"]
            .as_u64()
            .unwrap()
    }

    fn disk_map(d: &Path) -> ObjectMap {
        let b = std::fs::read(pool(d).join(format!("rbd_object_map.{}", id(d)))).unwrap();
        ObjectMap::decode(&b).unwrap()
    }

    fn objects_on_disk(d: &Path) -> Vec<u64> {
        let prefix = format!("rbd_data.{}.", id(d));
        let mut v: Vec<u64> = std::fs::read_dir(pool(d))
            .unwrap()
            .filter_map(|e| {
                let n = e.unwrap().file_name().into_string().unwrap();
                n.strip_prefix(&prefix)
                    .map(|h| u64::from_str_radix(h, 16).unwrap())
            })
            .collect();
        v.sort();
        v
    }

    fn existing(m: impl std::ops::Deref<Target = ObjectMap>) -> Vec<u64> {
        (0..m.len())
            .filter(|&i| m.get(i) != ObjectState::Nonexistent)
            .collect()
    }

    async fn read_all<S: ImageStore>(img: &Image<S>, off: u64, len: u32) -> Vec<u8> {
        let mut out = Vec::new();
        for c in img.read(off, len).await.unwrap() {
            match c {
                ReadChunk::Data(b) => out.extend_from_slice(&b),
                ReadChunk::Hole(n) => out.extend(std::iter::repeat_n(0u8, n as usize)),
            }
        }
        assert_eq!(out.len(), len as usize, "chunks cover the request exactly");
        out
    }

    #[test]
    fn split_at_object_boundaries() {
        let p = split(22, OBJ - 1, 2);
        assert_eq!(
            p,
            [
                Piece {
                    objno: 0,
                    off: OBJ - 1,
                    len: 1,
                    req_off: 0
                },
                Piece {
                    objno: 1,
                    off: 0,
                    len: 1,
                    req_off: 1
                },
            ]
        );
        let p = split(22, OBJ, 2 * OBJ);
        assert_eq!(p.len(), 2);
        assert!(p.iter().all(|p| p.off == 0 && p.len == OBJ));
        assert_eq!((p[0].objno, p[1].objno, p[1].req_off), (1, 2, OBJ));
        let p = split(22, 100, 3 * OBJ);
        assert_eq!(p.len(), 4);
        assert_eq!(p.iter().map(|p| p.len).sum::<u64>(), 3 * OBJ);
        assert_eq!(
            p[3],
            Piece {
                objno: 3,
                off: 0,
                len: 100,
                req_off: 3 * OBJ - 100
            }
        );
        assert!(split(22, 5, 0).is_empty());
    }

    #[tokio::test]
    async fn fresh_image_reads_holes_without_store_calls() {
        let (d, s) = store_with(64 << 20, DEFAULT_FEATURES).await;
        let img = open(&s, false).await;
        assert_eq!(img.map_source(), Some(&MapSource::Loaded));
        let c = img.read(OBJ - 512, 8192).await.unwrap();
        assert_eq!(c, [ReadChunk::Hole(8192)], "adjacent holes merge");
        let st = img.stats();
        assert_eq!((st.map_reads, st.store_reads), (2, 0));
        let e = img.block_status(0, 64 << 20).await.unwrap();
        assert_eq!(
            e,
            [Extent {
                length: 64 << 20,
                flags: STATE_HOLE | STATE_ZERO
            }]
        );
        img.close().await.unwrap();
        assert!(objects_on_disk(d.path()).is_empty());
    }

    #[tokio::test]
    async fn exists_clean_objects_are_read_and_become_exists_when_written() {
        // EXISTS_CLEAN: unchanged since the latest snapshot (what fast-diff reports).
        let (d, s) = store_with(16 << 20, DEFAULT_FEATURES).await;
        let img = open(&s, false).await;
        img.write(0, Bytes::from_static(b"zero"), false)
            .await
            .unwrap();
        img.write(OBJ, Bytes::from_static(b"one"), false)
            .await
            .unwrap();
        img.close().await.unwrap();
        let m = disk_map(d.path());
        m.set(0, ObjectState::ExistsClean);
        m.set(1, ObjectState::ExistsClean);
        std::fs::write(
            pool(d.path()).join(format!("rbd_object_map.{}", id(d.path()))),
            m.encode(),
        )
        .unwrap();
        let img = open(&s, false).await;
        assert!(matches!(img.map_source(), Some(MapSource::Loaded)));
        // Clean objects exist: their data is read from the store, not taken for holes.
        assert_eq!(&read_all(&img, OBJ, 3).await, b"one");
        assert_eq!(img.stats().store_reads, 1);
        // The first write to a clean object marks it EXISTS (it now differs from the
        // snapshot); the untouched one stays clean.
        img.write(2, Bytes::from_static(b"ro"), false)
            .await
            .unwrap();
        let mem = img.object_map().unwrap();
        assert_eq!(mem.get(0), ObjectState::Exists);
        assert_eq!(mem.get(1), ObjectState::ExistsClean);
        assert_eq!(&read_all(&img, 0, 4).await, b"zero");
        img.close().await.unwrap();
        let m = disk_map(d.path());
        assert_eq!(
            (m.get(0), m.get(1), m.get(2)),
            (
                ObjectState::Exists,
                ObjectState::ExistsClean,
                ObjectState::Nonexistent
            )
        );
    }

    /// Marks every existing object EXISTS_CLEAN in the on-disk map of a closed image, as
    /// a snapshot taken by Ceph's tools leaves them (fast-diff: unchanged since it).
    fn make_all_clean(d: &Path) {
        let m = disk_map(d);
        for o in 0..m.len() {
            if m.get(o) != ObjectState::Nonexistent {
                m.set(o, ObjectState::ExistsClean);
            }
        }
        std::fs::write(
            pool(d).join(format!("rbd_object_map.{}", id(d))),
            m.encode(),
        )
        .unwrap();
    }

    #[tokio::test]
    async fn partial_discards_of_clean_objects_mark_them_changed() {
        // Issue 14.1: zeroing part of an EXISTS_CLEAN object changes its bytes, so
        // fast-diff must see it (EXISTS), whatever the request: TRIM, WRITE_ZEROES with
        // and without NO_HOLE. Whole-object discards remove (NONEXISTENT).
        let (d, s) = store_with(24 << 20, DEFAULT_FEATURES).await;
        let img = open(&s, false).await;
        img.write(0, Bytes::from(vec![7u8; 6 * OBJ as usize]), false)
            .await
            .unwrap();
        img.close().await.unwrap();
        make_all_clean(d.path());
        let img = open(&s, false).await;
        img.trim(100, 4096, false).await.unwrap();
        img.write_zeroes(OBJ + 5, 10, ZeroFlags::default())
            .await
            .unwrap();
        let no_hole = ZeroFlags {
            no_hole: true,
            ..Default::default()
        };
        img.write_zeroes(2 * OBJ + 4096, 4096, no_hole)
            .await
            .unwrap();
        img.trim(3 * OBJ, OBJ as u32, false).await.unwrap();
        let mem = img.object_map().unwrap();
        use ObjectState::*;
        assert_eq!(
            mem.to_vec(),
            [
                Exists,
                Exists,
                Exists,
                Nonexistent,
                ExistsClean,
                ExistsClean
            ]
        );
        img.close().await.unwrap();
        assert_eq!(
            disk_map(d.path()).to_vec(),
            [
                Exists,
                Exists,
                Exists,
                Nonexistent,
                ExistsClean,
                ExistsClean
            ]
        );
    }

    #[tokio::test]
    async fn objects_emptied_by_partial_zeroes_are_removed() {
        let (d, s) = store_with(16 << 20, DEFAULT_FEATURES).await;
        let img = open(&s, false).await;
        img.write(0, Bytes::from(vec![3u8; 2 * OBJ as usize]), false)
            .await
            .unwrap();
        // Object 0 zeroed in three block-aligned pieces: every byte punched out, so it
        // goes, as a whole-object discard would have removed it.
        img.trim(0, (OBJ / 2) as u32, false).await.unwrap();
        assert_eq!(objects_on_disk(d.path()), [0, 1]);
        img.write_zeroes(OBJ / 2, (OBJ / 4) as u32, ZeroFlags::default())
            .await
            .unwrap();
        img.trim(3 * OBJ / 4, (OBJ / 4) as u32, false)
            .await
            .unwrap();
        assert_eq!(objects_on_disk(d.path()), [1]);
        assert_eq!(img.object_map().unwrap().get(0), ObjectState::Nonexistent);
        assert_eq!(read_all(&img, 0, 4096).await, vec![0; 4096]);
        // Object 1: zeros written with NO_HOLE are data, and so is an unaligned edge.
        let no_hole = ZeroFlags {
            no_hole: true,
            ..Default::default()
        };
        img.write_zeroes(OBJ, (OBJ / 2) as u32, no_hole)
            .await
            .unwrap();
        img.trim(OBJ + OBJ / 2, (OBJ / 2) as u32, false)
            .await
            .unwrap();
        assert_eq!(objects_on_disk(d.path()), [1]);
        img.close().await.unwrap();
        assert_eq!(existing(&disk_map(d.path())), [1]);
    }

    #[tokio::test]
    async fn an_object_emptied_after_a_checkpoint_sets_the_flag_before_it_goes() {
        // A partial zero of an EXISTS object changes no map state and may run under a
        // clear flag; the removal it leads to does change it.
        let (d, s) = store_with(16 << 20, DEFAULT_FEATURES).await;
        let img = open(&s, false).await;
        img.write(4096, Bytes::from(vec![5u8; 4096]), false)
            .await
            .unwrap();
        img.checkpoint().await.unwrap();
        assert_eq!(header_flags(d.path()) & RBD_FLAG_OBJECT_MAP_INVALID, 0);
        img.trim(0, 4096, false).await.unwrap();
        assert_eq!(header_flags(d.path()) & RBD_FLAG_OBJECT_MAP_INVALID, 0);
        img.trim(4096, 4096, false).await.unwrap();
        assert!(objects_on_disk(d.path()).is_empty());
        assert_ne!(
            header_flags(d.path()) & RBD_FLAG_OBJECT_MAP_INVALID,
            0,
            "object 0 removed under a clear flag: the map on disk says it exists"
        );
        img.close().await.unwrap();
        assert!(existing(&disk_map(d.path())).is_empty());
    }

    #[tokio::test]
    async fn read_only_head_sees_writes_made_after_it_opened() {
        // Issue 14.2: a read-only server of the head while another client writes it.
        let (_d, s) = store_with(16 << 20, DEFAULT_FEATURES).await;
        let ro = open(&s, true).await;
        let rw = open(&s, false).await;
        rw.write(2 * OBJ + 1, Bytes::from_static(b"later"), false)
            .await
            .unwrap();
        rw.flush().await.unwrap();
        assert_eq!(&read_all(&ro, 2 * OBJ + 1, 5).await, b"later");
        // The writer removes the object the reader has open, and creates it anew.
        rw.trim(2 * OBJ, OBJ as u32, false).await.unwrap();
        assert_eq!(read_all(&ro, 2 * OBJ + 1, 5).await, vec![0; 5]);
        rw.write(2 * OBJ + 1, Bytes::from_static(b"again"), false)
            .await
            .unwrap();
        assert_eq!(&read_all(&ro, 2 * OBJ + 1, 5).await, b"again");
        // No map: block status cannot claim a hole where the writer put data.
        let e = ro.block_status(2 * OBJ, 4096).await.unwrap();
        assert!(e.iter().all(|x| x.flags & STATE_HOLE == 0), "{e:?}");
        rw.close().await.unwrap();
        ro.close().await.unwrap();
    }

    fn header_size(d: &Path) -> u64 {
        let b = std::fs::read(pool(d).join(format!("rbd_header.{}", id(d)))).unwrap();
        serde_json::from_slice::<serde_json::Value>(&b).unwrap()["size"]
            .as_u64()
            .unwrap()
    }

    #[tokio::test]
    async fn resize_grows_and_shrinks_like_librbd() {
        let (d, s) = store_with(16 << 20, DEFAULT_FEATURES).await;
        let img = open(&s, false).await;
        let full = Bytes::from(vec![7u8; OBJ as usize]);
        for o in 0..4 {
            img.write(o * OBJ, full.clone(), false).await.unwrap();
        }
        // Growing: new size in the header and for new clients, the map extended.
        img.resize(40 << 20, false).await.unwrap();
        assert_eq!((img.size(), img.info().size), (40 << 20, 40 << 20));
        assert_eq!(header_size(d.path()), 40 << 20);
        let m = img.object_map().unwrap();
        assert_eq!(m.len(), 10);
        assert_eq!(m.get(3), ObjectState::Exists);
        assert_eq!(m.get(9), ObjectState::Nonexistent);
        img.write(38 << 20, Bytes::from_static(b"end"), false)
            .await
            .unwrap();
        assert_eq!(&read_all(&img, 38 << 20, 3).await, b"end");
        // Shrinking discards data: refused unless allowed, and then nothing changed.
        let e = img.resize(6 << 20, false).await.unwrap_err();
        assert!(e.message.contains("allow-shrink"), "{e}");
        assert_eq!((img.size(), header_size(d.path())), (40 << 20, 40 << 20));
        // Allowed: objects past the end removed, the tail of the last one zeroed.
        img.resize(6 << 20, true).await.unwrap();
        assert_eq!((img.size(), header_size(d.path())), (6 << 20, 6 << 20));
        assert_eq!(objects_on_disk(d.path()), [0, 1]);
        assert_eq!(img.object_map().unwrap().len(), 2);
        // A client still holding the old size is refused past the new end.
        let e = img
            .write(7 << 20, Bytes::from_static(b"x"), false)
            .await
            .unwrap_err();
        assert_eq!(e.errno, Errno::NoSpc, "{}", e.message);
        assert_eq!(
            img.read(6 << 20, 512).await.unwrap_err().errno,
            Errno::Inval
        );
        // Same errors as the protocol layer's: TRIM past the end EINVAL, WRITE_ZEROES ENOSPC.
        assert_eq!(
            img.trim(6 << 20, 512, false).await.unwrap_err().errno,
            Errno::Inval
        );
        assert_eq!(
            img.write_zeroes(6 << 20, 512, ZeroFlags::default())
                .await
                .unwrap_err()
                .errno,
            Errno::NoSpc
        );
        // Grown again: what was cut off reads as zeros, what was kept is intact.
        img.resize(16 << 20, false).await.unwrap();
        assert_eq!(read_all(&img, (6 << 20) - 4, 4).await, [7u8; 4]);
        assert!(read_all(&img, 6 << 20, (2 << 20) as u32)
            .await
            .iter()
            .all(|&b| b == 0));
        assert!(read_all(&img, 8 << 20, OBJ as u32)
            .await
            .iter()
            .all(|&b| b == 0));
        img.close().await.unwrap();
        // The map written at close has the new length and matches the objects.
        assert_eq!(header_flags(d.path()), 0);
        let m = disk_map(d.path());
        assert_eq!(m.len(), 4);
        assert_eq!(
            m.to_vec(),
            [
                ObjectState::Exists,
                ObjectState::Exists,
                ObjectState::Nonexistent,
                ObjectState::Nonexistent
            ]
        );
        // Read-only opens cannot resize.
        let ro = open(&s, true).await;
        assert_eq!(
            ro.resize(32 << 20, false).await.unwrap_err().kind,
            ErrorKind::ReadOnly
        );
        ro.close().await.unwrap();
    }

    #[tokio::test]
    async fn writes_mark_objects_and_block_status_merges() {
        let (d, s) = store_with(64 << 20, DEFAULT_FEATURES).await;
        let img = open(&s, false).await;
        // Across the 0/1 boundary, and one write in object 5.
        let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        img.write(OBJ - 4096, Bytes::from(data.clone()), false)
            .await
            .unwrap();
        img.write(5 * OBJ + 10, Bytes::from_static(b"hello"), true)
            .await
            .unwrap();
        let m = img.object_map().unwrap();
        assert_eq!(existing(m), [0, 1, 5]);
        assert_eq!(objects_on_disk(d.path()), [0, 1, 5]);
        assert_eq!(read_all(&img, OBJ - 4096, 8192).await, data);
        let r = img.read(5 * OBJ, 4096).await.unwrap();
        assert!(matches!(r[0], ReadChunk::Data(_)), "{r:?}");
        assert_eq!(&read_all(&img, 5 * OBJ + 8, 9).await, b"\0\0hello\0\0");
        let e = img.block_status(0, 64 << 20).await.unwrap();
        let hz = STATE_HOLE | STATE_ZERO;
        assert_eq!(
            e,
            [
                Extent {
                    length: 2 * OBJ,
                    flags: 0
                },
                Extent {
                    length: 3 * OBJ,
                    flags: hz
                },
                Extent {
                    length: OBJ,
                    flags: 0
                },
                Extent {
                    length: 10 * OBJ,
                    flags: hz
                },
            ]
        );
        // A range starting and ending inside objects is answered from its start.
        let e = img.block_status(OBJ + 5, (2 * OBJ) as u32).await.unwrap();
        assert_eq!(
            e[0],
            Extent {
                length: OBJ - 5,
                flags: 0
            }
        );
        assert_eq!(e[1].flags, hz);
        img.close().await.unwrap();
    }

    #[tokio::test]
    async fn trim_whole_objects_removes_partial_zeroes() {
        // 6 MiB: the last object is 2 MiB long inside the image.
        let (d, s) = store_with(6 << 20, DEFAULT_FEATURES).await;
        let img = open(&s, false).await;
        img.write(0, Bytes::from(vec![1u8; 6 << 20]), false)
            .await
            .unwrap();
        assert_eq!(objects_on_disk(d.path()), [0, 1]);
        // Partial: zeros inside object 0, object stays.
        img.trim(4096, 4096, false).await.unwrap();
        assert_eq!(objects_on_disk(d.path()), [0, 1]);
        let r = read_all(&img, 0, 3 * 4096).await;
        assert!(r[..4096].iter().all(|&b| b == 1));
        assert!(r[4096..8192].iter().all(|&b| b == 0));
        assert!(r[8192..].iter().all(|&b| b == 1));
        // The whole (short) last object: removed.
        img.trim(OBJ, 2 << 20, false).await.unwrap();
        assert_eq!(objects_on_disk(d.path()), [0]);
        assert_eq!(img.object_map().unwrap().get(1), ObjectState::Nonexistent);
        assert_eq!(read_all(&img, OBJ, 4096).await, vec![0; 4096]);
        let st = img.stats();
        assert_eq!((st.store_removes, st.store_zeroes), (1, 1));
        img.close().await.unwrap();
        assert_eq!(existing(&disk_map(d.path())), [0]);
    }

    #[tokio::test]
    async fn discarding_a_fresh_terabyte_is_free() {
        let tib = 1u64 << 40;
        let (d, s) = store_with(tib, DEFAULT_FEATURES).await;
        let img = open(&s, false).await;
        let t = std::time::Instant::now();
        let step = 2u64 << 30;
        for i in 0..tib / step {
            img.trim(i * step, step as u32, false).await.unwrap();
        }
        let st = img.stats();
        assert_eq!(st.store_removes, 0);
        assert_eq!(st.skipped_removes, tib / OBJ);
        assert!(t.elapsed().as_secs() < 20, "took {:?}", t.elapsed());
        img.close().await.unwrap();
        assert!(objects_on_disk(d.path()).is_empty());
    }

    #[tokio::test]
    async fn discard_skips_nonexistent_runs_and_removes_the_rest() {
        let (d, s) = store_with(64 << 20, DEFAULT_FEATURES).await;
        let img = open(&s, false).await;
        for at in [OBJ + 100, 2 * OBJ, 7 * OBJ + 5, 15 * OBJ + (3 << 20)] {
            img.write(at, Bytes::from_static(b"x"), false)
                .await
                .unwrap();
        }
        // From the middle of object 0 to the middle of object 15: 0 and 15 are partial
        // (15 exists: zeroed in place), 1, 2 and 7 go, the other 11 are skipped.
        img.trim(OBJ / 2, (15 * OBJ) as u32, false).await.unwrap();
        let st = img.stats();
        assert_eq!(st.store_removes, 3);
        assert_eq!(st.store_zeroes, 1);
        assert_eq!(st.skipped_removes, 12, "objects 0, 3-6, 8-14");
        assert_eq!(objects_on_disk(d.path()), [15]);
        assert_eq!(existing(img.object_map().unwrap()), [15]);
        // Object 15 still holds its byte past the zeroed half.
        assert_eq!(&read_all(&img, 15 * OBJ + (3 << 20), 1).await, b"x");
        img.close().await.unwrap();
        assert_eq!(existing(&disk_map(d.path())), [15]);
    }

    #[tokio::test]
    async fn write_zeroes_flags() {
        let (d, s) = store_with(16 << 20, DEFAULT_FEATURES).await;
        let img = open(&s, false).await;
        let no_hole = ZeroFlags {
            no_hole: true,
            ..Default::default()
        };
        let fast = ZeroFlags {
            fast_zero: true,
            ..Default::default()
        };
        // NO_HOLE keeps the range allocated: object 0 now exists, full of zeros.
        img.write_zeroes(0, OBJ as u32, no_hole).await.unwrap();
        assert_eq!(objects_on_disk(d.path()), [0]);
        assert_eq!(read_all(&img, 0, 4096).await, vec![0; 4096]);
        // FAST_ZERO with NO_HOLE would write data: refused, nothing done.
        let e = img
            .write_zeroes(
                OBJ,
                OBJ as u32,
                ZeroFlags {
                    no_hole: true,
                    fast_zero: true,
                    fua: false,
                },
            )
            .await
            .unwrap_err();
        assert_eq!(e.errno, Errno::NotSup);
        assert_eq!(objects_on_disk(d.path()), [0]);
        // FAST_ZERO alone maps to a removal: fast, done.
        img.write_zeroes(0, OBJ as u32, fast).await.unwrap();
        assert!(objects_on_disk(d.path()).is_empty());
        // Where holes cannot be punched, FAST_ZERO of part of an object would be a write
        // of zeros: refused, the data untouched; whole objects are still removed.
        img.write(OBJ, Bytes::from(vec![9u8; 8192]), false)
            .await
            .unwrap();
        img.store().pretend_no_hole_punching();
        let e = img.write_zeroes(OBJ, 4096, fast).await.unwrap_err();
        assert_eq!(e.errno, Errno::NotSup, "{}", e.message);
        assert_eq!(read_all(&img, OBJ, 8192).await, vec![9u8; 8192]);
        img.write_zeroes(OBJ, 4096, ZeroFlags::default())
            .await
            .unwrap();
        assert_eq!(read_all(&img, OBJ, 4096).await, vec![0u8; 4096]);
        img.write_zeroes(OBJ, OBJ as u32, fast).await.unwrap();
        assert!(objects_on_disk(d.path()).is_empty());
        img.close().await.unwrap();
    }

    #[tokio::test]
    async fn open_sets_flag_close_writes_map_then_clears() {
        let (d, s) = store_with(64 << 20, DEFAULT_FEATURES).await;
        assert_eq!(header_flags(d.path()), 0);
        let img = open(&s, false).await;
        let both = RBD_FLAG_OBJECT_MAP_INVALID | RBD_FLAG_FAST_DIFF_INVALID;
        assert_eq!(header_flags(d.path()), both, "dirty flag set at open");
        img.write(3 * OBJ, Bytes::from_static(b"x"), false)
            .await
            .unwrap();
        img.write(9 * OBJ, Bytes::from_static(b"y"), false)
            .await
            .unwrap();
        img.trim(9 * OBJ, OBJ as u32, false).await.unwrap();
        assert!(
            existing(&disk_map(d.path())).is_empty(),
            "map on disk untouched while open"
        );
        img.close().await.unwrap();
        assert_eq!(header_flags(d.path()), 0);
        assert_eq!(existing(&disk_map(d.path())), objects_on_disk(d.path()));
        assert_eq!(objects_on_disk(d.path()), [3]);
        // After close: refused.
        assert_eq!(img.read(0, 1).await.unwrap_err().errno, Errno::Shutdown);
        img.close().await.unwrap();
    }

    #[tokio::test]
    async fn image_without_object_map_feature_keeps_no_map() {
        let (d, s) = store_with(16 << 20, RBD_FEATURE_LAYERING).await;
        let img = open(&s, false).await;
        assert!(img.object_map().is_none());
        assert_eq!(header_flags(d.path()), 0, "no flag dance without a map");
        img.read(0, 4096).await.unwrap();
        assert_eq!(img.stats().store_reads, 1);
        img.write(OBJ, Bytes::from_static(b"z"), false)
            .await
            .unwrap();
        let e = img.block_status(0, 16 << 20).await.unwrap();
        assert_eq!(
            e,
            [Extent {
                length: 16 << 20,
                flags: 0
            }]
        );
        img.trim(OBJ, OBJ as u32, false).await.unwrap();
        assert!(objects_on_disk(d.path()).is_empty());
        img.close().await.unwrap();
        assert_eq!(header_flags(d.path()), 0);
    }

    #[tokio::test]
    async fn shared_images_go_to_the_store() {
        let (d, s) = store_with(16 << 20, DEFAULT_FEATURES).await;
        {
            let h = s
                .open_image(&spec("vm1"), OpenMode::ReadWrite)
                .await
                .unwrap();
            h.set_meta(META_SHARED, "true").await.unwrap();
            h.close().await.unwrap();
        }
        let img = open(&s, false).await;
        assert!(img.is_shared() && img.object_map().is_none());
        // Several writers of a shared image coexist; each sees the other's writes.
        let img2 = open(&s, false).await;
        img2.write(0, Bytes::from_static(b"two"), true)
            .await
            .unwrap();
        assert_eq!(&read_all(&img, 0, 3).await, b"two");
        img2.close().await.unwrap();
        // An exclusive writer (e.g. `config`) is refused meanwhile.
        let e = s
            .open_image(&spec("vm1"), OpenMode::ReadWrite)
            .await
            .err()
            .unwrap();
        assert_eq!(e.kind, ErrorKind::Busy);
        // Nobody keeps the on-disk map current while shared writers write: it is
        // flagged invalid from the first shared open on, and stays so after they close.
        let invalid = invalid_flags(DEFAULT_FEATURES);
        assert_eq!(header_flags(d.path()), invalid);
        img.read(8 << 20, 4096).await.unwrap();
        assert_eq!((img.stats().store_reads, img.stats().map_reads), (2, 0));
        img.close().await.unwrap();
        assert_eq!(header_flags(d.path()), invalid);
        // Back to exclusive use: the stale map (it never saw object 0) is not trusted;
        // the open rebuilds it and the shared writer's data reads back.
        {
            let h = s
                .open_image(&spec("vm1"), OpenMode::ReadWrite)
                .await
                .unwrap();
            h.set_meta(META_SHARED, "false").await.unwrap();
            h.close().await.unwrap();
        }
        assert_eq!(disk_map(d.path()).get(0), ObjectState::Nonexistent);
        let img = open(&s, false).await;
        assert!(!img.is_shared());
        assert!(matches!(img.map_source(), Some(MapSource::Rebuilt(_))));
        assert_eq!(img.object_map().unwrap().get(0), ObjectState::Exists);
        assert_eq!(&read_all(&img, 0, 3).await, b"two");
        img.close().await.unwrap();
        assert_eq!(header_flags(d.path()), 0);
        assert_eq!(disk_map(d.path()).get(0), ObjectState::Exists);
        // The config default applies only without metadata.
        let (_d2, s2) = store_with(16 << 20, DEFAULT_FEATURES).await;
        let o = OpenOptions {
            read_only: false,
            shared_default: true,
            checkpoint_idle: None,
        };
        let img = Image::open(&s2, &spec("vm1"), &o).await.unwrap();
        assert!(img.is_shared());
        img.close().await.unwrap();
        // A bad value is an error naming the key, not a silent default.
        let h = s2
            .open_image(&spec("vm1"), OpenMode::ReadWrite)
            .await
            .unwrap();
        h.set_meta(META_SHARED, "perhaps").await.unwrap();
        h.close().await.unwrap();
        let e = Image::open(&s2, &spec("vm1"), &OpenOptions::default())
            .await
            .err()
            .unwrap();
        assert!(e.message.contains(META_SHARED), "{e}");
        // ... and the failed open released the lock.
        s2.open_image(&spec("vm1"), OpenMode::ReadWrite)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn crash_leaves_flag_and_reopen_rebuilds() {
        let (d, s) = store_with(64 << 20, DEFAULT_FEATURES).await;
        let img = open(&s, false).await;
        img.write(2 * OBJ, Bytes::from_static(b"acked"), false)
            .await
            .unwrap();
        img.write(7 * OBJ + 1, Bytes::from_static(b"fua"), true)
            .await
            .unwrap();
        drop(img); // a crash: no close
        assert_ne!(header_flags(d.path()) & RBD_FLAG_OBJECT_MAP_INVALID, 0);
        assert!(
            existing(&disk_map(d.path())).is_empty(),
            "stale map on disk"
        );

        // A read-only open of the head keeps no map (another client may write the
        // image), reads from the store, and never touches the flag.
        let ro = open(&s, true).await;
        assert!(ro.map_source().is_none() && ro.object_map().is_none());
        assert_eq!(&read_all(&ro, 2 * OBJ, 5).await, b"acked");
        assert!(ro.write(0, Bytes::from_static(b"no"), false).await.is_err());
        ro.close().await.unwrap();
        assert_ne!(header_flags(d.path()) & RBD_FLAG_OBJECT_MAP_INVALID, 0);
        assert!(existing(&disk_map(d.path())).is_empty());

        let img = open(&s, false).await;
        match img.map_source() {
            Some(MapSource::Rebuilt(why)) => assert!(why.contains("flags"), "{why}"),
            o => panic!("expected a rebuild, got {o:?}"),
        }
        assert_eq!(existing(img.object_map().unwrap()), [2, 7]);
        assert_eq!(&read_all(&img, 2 * OBJ, 5).await, b"acked");
        assert_eq!(&read_all(&img, 7 * OBJ + 1, 3).await, b"fua");
        img.close().await.unwrap();
        assert_eq!(header_flags(d.path()), 0);
        assert_eq!(existing(&disk_map(d.path())), [2, 7]);
    }

    #[tokio::test]
    async fn corrupt_or_wrong_length_map_is_rebuilt() {
        let (d, s) = store_with(64 << 20, DEFAULT_FEATURES).await;
        let img = open(&s, false).await;
        img.write(OBJ, Bytes::from_static(b"x"), false)
            .await
            .unwrap();
        img.close().await.unwrap();
        let mp = pool(d.path()).join(format!("rbd_object_map.{}", id(d.path())));
        let mut b = std::fs::read(&mp).unwrap();
        let n = b.len();
        b[n / 2] ^= 0xff;
        std::fs::write(&mp, &b).unwrap();
        let img = open(&s, false).await;
        match img.map_source() {
            Some(MapSource::Rebuilt(why)) => assert!(why.contains("corrupt"), "{why}"),
            o => panic!("expected a rebuild, got {o:?}"),
        }
        assert_eq!(existing(img.object_map().unwrap()), [1]);
        img.close().await.unwrap();
        std::fs::write(&mp, ObjectMap::new(3).encode()).unwrap();
        let img = open(&s, false).await;
        match img.map_source() {
            Some(MapSource::Rebuilt(why)) => assert!(why.contains("3 entries"), "{why}"),
            o => panic!("expected a rebuild, got {o:?}"),
        }
        img.close().await.unwrap();
        std::fs::remove_file(&mp).unwrap();
        let img = open(&s, false).await;
        assert!(matches!(img.map_source(), Some(MapSource::Rebuilt(w)) if w.contains("missing")));
        img.close().await.unwrap();
        assert_eq!(existing(&disk_map(d.path())), [1]);
    }

    #[tokio::test]
    async fn checkpoint_clears_and_next_write_sets_again() {
        let (d, s) = store_with(16 << 20, DEFAULT_FEATURES).await;
        let img = open(&s, false).await;
        img.write(0, Bytes::from_static(b"a"), false).await.unwrap();
        img.checkpoint().await.unwrap();
        assert_eq!(header_flags(d.path()), 0);
        assert_eq!(existing(&disk_map(d.path())), [0]);
        // Reads do not dirty the image.
        img.read(0, 10).await.unwrap();
        assert_eq!(header_flags(d.path()), 0);
        img.write(OBJ, Bytes::from_static(b"b"), false)
            .await
            .unwrap();
        assert_ne!(header_flags(d.path()) & RBD_FLAG_OBJECT_MAP_INVALID, 0);
        img.close().await.unwrap();
        assert_eq!(existing(&disk_map(d.path())), [0, 1]);
        assert_eq!(header_flags(d.path()), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_writes_and_trims_keep_map_and_store_agreeing() {
        let (d, s) = store_with(32 << 20, DEFAULT_FEATURES).await;
        let img = Arc::new(open(&s, false).await);
        let mut tasks = Vec::new();
        for t in 0..8u64 {
            let img = img.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..40u64 {
                    let obj = (t + i) % 8;
                    if (t + i) % 3 == 0 {
                        img.trim(obj * OBJ, OBJ as u32, false).await.unwrap();
                    } else {
                        img.write(obj * OBJ + i * 512, Bytes::from(vec![t as u8; 512]), false)
                            .await
                            .unwrap();
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let in_mem = existing(img.object_map().unwrap());
        assert_eq!(in_mem, objects_on_disk(d.path()));
        img.close().await.unwrap();
        assert_eq!(existing(&disk_map(d.path())), objects_on_disk(d.path()));
    }

    #[tokio::test]
    async fn info_is_truthful() {
        let (_d, s) = store_with(16 << 20, DEFAULT_FEATURES).await;
        let img = open(&s, true).await;
        let i = img.info();
        assert!(i.read_only && !i.can_trim && !i.can_flush);
        assert!(i.can_multi_conn);
        assert_eq!(i.size, 16 << 20);
        assert!(i.max_block >= 32 << 20);
        let e = img
            .write(0, Bytes::from_static(b"x"), false)
            .await
            .unwrap_err();
        assert_eq!(e.errno, Errno::Perm);
        img.close().await.unwrap();
    }

    /// Records the calls that matter for the close order, delegating to a real handle.
    struct Recorder {
        inner: DirImage,
        log: Arc<std::sync::Mutex<Vec<String>>>,
        /// The store's directory: audit every data operation (see `audit`).
        audit: Option<PathBuf>,
    }

    impl Recorder {
        fn note(&self, s: impl Into<String>) {
            self.log.lock().unwrap().push(s.into());
        }

        /// Under a clear flag the map on disk is trusted, so a data operation may only
        /// touch what it says is EXISTS, and leave it so: a removal, or anything on an
        /// object not EXISTS there, must come after the flag was set. (Sound under
        /// concurrency: only a checkpoint clears the flag or writes the map, and none runs
        /// while a request is in its store call.)
        fn audit(&self, op: &str, objno: u64) {
            let Some(d) = &self.audit else { return };
            if header_flags(d) & RBD_FLAG_OBJECT_MAP_INVALID != 0 {
                return;
            }
            let on_disk = disk_map(d).get(objno);
            assert!(
                op != "remove" && on_disk == ObjectState::Exists,
                "{op}({objno}) under a clear flag, the map on disk saying {on_disk:?}"
            );
        }
    }

    impl ImageStore for Recorder {
        fn header(&self) -> ImageHeader {
            self.inner.header()
        }
        async fn refresh_header(&self) -> Result<ImageHeader> {
            self.inner.refresh_header().await
        }
        async fn set_size(&self, size: u64) -> Result<()> {
            self.note(format!("set_size({size})"));
            self.inner.set_size(size).await
        }
        async fn set_flags(&self, value: u64, mask: u64) -> Result<()> {
            self.note(format!("set_flags({value})"));
            self.inner.set_flags(value, mask).await
        }
        async fn get_meta(&self, key: &str) -> Result<Option<String>> {
            self.inner.get_meta(key).await
        }
        async fn set_meta(&self, key: &str, value: &str) -> Result<()> {
            self.inner.set_meta(key, value).await
        }
        async fn read(
            &self,
            o: u64,
            off: u64,
            len: u64,
            snap: Option<u64>,
        ) -> Result<Option<Bytes>> {
            self.note("read");
            self.inner.read(o, off, len, snap).await
        }
        async fn write(&self, o: u64, off: u64, data: Bytes, durable: bool) -> Result<()> {
            self.audit("write", o);
            self.note(format!("write({o})"));
            self.inner.write(o, off, data, durable).await
        }
        async fn zero(&self, o: u64, off: u64, len: u64, durable: bool) -> Result<()> {
            self.audit("zero", o);
            self.note(format!("zero({o})"));
            self.inner.zero(o, off, len, durable).await
        }
        async fn remove(&self, o: u64, durable: bool) -> Result<()> {
            self.audit("remove", o);
            self.note(format!("remove({o})"));
            self.inner.remove(o, durable).await
        }
        async fn sync(&self) -> Result<()> {
            self.note("sync");
            self.inner.sync().await
        }
        async fn list_objects(&self, snap: Option<u64>) -> Result<Vec<u64>> {
            self.inner.list_objects(snap).await
        }
        async fn read_object_map(&self, snap: Option<u64>) -> Result<Option<Vec<u8>>> {
            self.inner.read_object_map(snap).await
        }
        async fn write_object_map(&self, data: Vec<u8>) -> Result<()> {
            self.note("write_object_map");
            self.inner.write_object_map(data).await
        }
        async fn close(&self) -> Result<()> {
            self.note("close");
            self.inner.close().await
        }
    }

    /// A head image dressed up as its snapshot `s1` (id 7) with the given snapshot flags
    /// and snapshot map bytes; reads go to the head's objects.
    struct AtSnapshot {
        inner: DirImage,
        flags: u64,
        map: Vec<u8>,
    }

    impl ImageStore for AtSnapshot {
        fn header(&self) -> ImageHeader {
            let mut h = self.inner.header();
            h.snaps = vec![crate::store::SnapInfo {
                id: 7,
                name: "s1".into(),
                size: h.size,
            }];
            h.flags = self.flags;
            h
        }
        async fn refresh_header(&self) -> Result<ImageHeader> {
            Ok(self.header())
        }
        async fn set_flags(&self, _: u64, _: u64) -> Result<()> {
            panic!("a snapshot's flags are never set");
        }
        async fn set_size(&self, _: u64) -> Result<()> {
            panic!("a snapshot is never resized");
        }
        async fn get_meta(&self, key: &str) -> Result<Option<String>> {
            self.inner.get_meta(key).await
        }
        async fn set_meta(&self, key: &str, value: &str) -> Result<()> {
            self.inner.set_meta(key, value).await
        }
        async fn read(
            &self,
            o: u64,
            off: u64,
            len: u64,
            snap: Option<u64>,
        ) -> Result<Option<Bytes>> {
            assert_eq!(snap, Some(7), "reads go to the snapshot");
            self.inner.read(o, off, len, None).await
        }
        async fn write(&self, _: u64, _: u64, _: Bytes, _: bool) -> Result<()> {
            panic!("a snapshot is never written");
        }
        async fn zero(&self, _: u64, _: u64, _: u64, _: bool) -> Result<()> {
            panic!("a snapshot is never written");
        }
        async fn remove(&self, _: u64, _: bool) -> Result<()> {
            panic!("a snapshot is never written");
        }
        async fn sync(&self) -> Result<()> {
            Ok(())
        }
        async fn list_objects(&self, _: Option<u64>) -> Result<Vec<u64>> {
            // What a listing shows: none of the snapshot's objects (say they were all
            // removed from the head since), so a rebuild would be wrong.
            Ok(vec![])
        }
        async fn read_object_map(&self, snap: Option<u64>) -> Result<Option<Vec<u8>>> {
            assert_eq!(snap, Some(7), "the snapshot's own map");
            Ok(Some(self.map.clone()))
        }
        async fn write_object_map(&self, _: Vec<u8>) -> Result<()> {
            panic!("a snapshot's map is never written");
        }
        async fn close(&self) -> Result<()> {
            self.inner.close().await
        }
    }

    #[tokio::test]
    async fn snapshot_maps_are_used_only_when_valid() {
        let (_d, s) = store_with(16 << 20, DEFAULT_FEATURES).await;
        let img = open(&s, false).await;
        img.write(0, Bytes::from_static(b"snapdata"), false)
            .await
            .unwrap();
        img.close().await.unwrap();
        let good = {
            let m = ObjectMap::try_new(4).unwrap();
            m.set(0, ObjectState::Exists);
            m.encode()
        };
        let stale = ObjectMap::try_new(4).unwrap().encode();
        let at = |flags: u64, map: Vec<u8>| {
            let s = &s;
            async move {
                let inner = s
                    .open_image(&spec("vm1"), OpenMode::ReadOnly)
                    .await
                    .unwrap();
                let store = AtSnapshot { inner, flags, map };
                let o = OpenOptions {
                    read_only: true,
                    shared_default: false,
                    checkpoint_idle: None,
                };
                Image::from_store_image(store, &spec("vm1@s1"), &o)
                    .await
                    .unwrap()
            }
        };
        // A valid snapshot map is loaded and answers holes without the store.
        let snap = at(0, good).await;
        assert!(matches!(snap.map_source(), Some(MapSource::Loaded)));
        assert_eq!(&read_all(&snap, 0, 8).await, b"snapdata");
        read_all(&snap, OBJ, 512).await;
        assert_eq!((snap.stats().map_reads, snap.stats().store_reads), (1, 1));
        snap.close().await.unwrap();
        // Flagged invalid (taken after a writer crashed): neither that map, which says
        // object 0 does not exist, nor a rebuild from the listing, which misses it, is
        // used; every read asks the store and the data is there.
        for flags in [RBD_FLAG_OBJECT_MAP_INVALID, invalid_flags(DEFAULT_FEATURES)] {
            let snap = at(flags, stale.clone()).await;
            assert!(snap.object_map().is_none() && snap.map_source().is_none());
            assert_eq!(&read_all(&snap, 0, 8).await, b"snapdata");
            assert_eq!(snap.stats().map_reads, 0);
            snap.close().await.unwrap();
        }
        // A corrupt snapshot map is not used either.
        let snap = at(0, b"garbage".to_vec()).await;
        assert!(snap.object_map().is_none());
        assert_eq!(&read_all(&snap, 0, 8).await, b"snapdata");
        snap.close().await.unwrap();
    }

    /// An image on a recording (and auditing) handle.
    async fn recorded(
        d: &Path,
        s: &DirStore,
        checkpoint_idle: Option<Duration>,
    ) -> (Image<Recorder>, Arc<std::sync::Mutex<Vec<String>>>) {
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        let h = s
            .open_image(&spec("vm1"), OpenMode::ReadWrite)
            .await
            .unwrap();
        let rec = Recorder {
            inner: h,
            log: log.clone(),
            audit: Some(d.to_path_buf()),
        };
        let o = OpenOptions {
            checkpoint_idle,
            ..OpenOptions::default()
        };
        let img = Image::from_store_image(rec, &spec("vm1"), &o)
            .await
            .unwrap();
        (img, log)
    }

    fn take(log: &std::sync::Mutex<Vec<String>>) -> Vec<String> {
        std::mem::take(&mut *log.lock().unwrap())
    }

    #[tokio::test]
    async fn after_a_checkpoint_only_map_changing_requests_set_the_flag() {
        let (d, s) = store_with(32 << 20, DEFAULT_FEATURES).await;
        let (img, log) = recorded(d.path(), &s, None).await;
        let full = Bytes::from(vec![5u8; OBJ as usize]);
        for o in [0, 1, 2, 4] {
            img.write(o * OBJ, full.clone(), false).await.unwrap();
        }
        // Object 4 is unchanged since a (pretend) snapshot: EXISTS_CLEAN, also on disk.
        img.object_map().unwrap().set(4, ObjectState::ExistsClean);
        img.checkpoint().await.unwrap();
        assert_eq!(header_flags(d.path()), 0);
        assert_eq!(
            disk_map(d.path()).to_vec(),
            img.object_map().unwrap().to_vec()
        );
        take(&log);
        let flag_set = || header_flags(d.path()) & RBD_FLAG_OBJECT_MAP_INVALID != 0;

        // Changing nothing in the map: writes to EXISTS objects (one spanning two of them),
        // a partial trim and a partial zero of one, a trim of NONEXISTENT objects, reads.
        img.write(10, Bytes::from_static(b"again"), true)
            .await
            .unwrap();
        img.write(OBJ - 2, Bytes::from_static(b"span"), false)
            .await
            .unwrap();
        img.trim(100, 4096, false).await.unwrap();
        img.write_zeroes(2 * OBJ + 7, 9, ZeroFlags::default())
            .await
            .unwrap();
        img.trim(5 * OBJ, (3 * OBJ) as u32, false).await.unwrap();
        img.read(0, 4096).await.unwrap();
        assert!(
            !flag_set(),
            "requests that change no map state leave the flag clear"
        );
        assert!(
            !take(&log).iter().any(|c| c.starts_with("set_flags")),
            "no flag round trip for them"
        );

        // A first write: the flag is set before the object is written.
        img.write(6 * OBJ + 3, Bytes::from_static(b"new"), false)
            .await
            .unwrap();
        assert!(flag_set());
        assert_eq!(take(&log), ["set_flags(3)", "write(6)"]);
        img.checkpoint().await.unwrap();
        take(&log);
        // A removal: set before the object is removed.
        img.trim(2 * OBJ, OBJ as u32, false).await.unwrap();
        assert_eq!(take(&log), ["set_flags(3)", "remove(2)"]);
        img.checkpoint().await.unwrap();
        take(&log);
        // Part of an EXISTS_CLEAN object zeroed: it now differs from the snapshot.
        img.trim(4 * OBJ + 512, 512, false).await.unwrap();
        assert_eq!(take(&log), ["set_flags(3)", "zero(4)"]);
        img.checkpoint().await.unwrap();
        take(&log);
        // NO_HOLE zeroes of a NONEXISTENT object write it.
        let no_hole = ZeroFlags {
            no_hole: true,
            ..ZeroFlags::default()
        };
        img.write_zeroes(7 * OBJ, 512, no_hole).await.unwrap();
        assert_eq!(take(&log), ["set_flags(3)", "write(7)"]);
        img.checkpoint().await.unwrap();
        take(&log);
        // A close after a checkpoint with no change since: nothing to write.
        img.write(0, Bytes::from_static(b"last"), false)
            .await
            .unwrap();
        img.close().await.unwrap();
        assert_eq!(take(&log), ["write(0)", "sync", "close"]);
        assert_eq!(header_flags(d.path()), 0);
        let m = disk_map(d.path());
        assert_eq!(existing(&m), objects_on_disk(d.path()));
        assert_eq!(existing(&m), [0, 1, 4, 6, 7]);
        // (Object 4 becoming EXISTS after its partial zero is `discard_piece`'s business;
        // here only that the flag was set before the zero.)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn checkpoints_racing_writes_and_trims_never_leave_a_stale_trusted_map() {
        let (d, s) = store_with(32 << 20, DEFAULT_FEATURES).await;
        let (img, _log) = recorded(d.path(), &s, None).await;
        let img = Arc::new(img);
        let stop = Arc::new(AtomicBool::new(false));
        let ckpt = {
            let (img, stop) = (img.clone(), stop.clone());
            tokio::spawn(async move {
                let mut n = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    img.checkpoint().await.unwrap();
                    n += 1;
                    tokio::task::yield_now().await;
                }
                n
            })
        };
        let mut tasks = Vec::new();
        for t in 0..6u64 {
            let img = img.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..60u64 {
                    let obj = (t * 7 + i * 3) % 8;
                    match (t + i) % 5 {
                        0 => img.trim(obj * OBJ, OBJ as u32, false).await.unwrap(),
                        1 => img.trim(obj * OBJ + 512, 1024, false).await.unwrap(),
                        _ => img
                            .write(obj * OBJ + i * 512, Bytes::from(vec![t as u8; 512]), false)
                            .await
                            .unwrap(),
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        let n = ckpt.await.unwrap();
        assert!(n > 1, "checkpoints ran among the requests ({n})");
        img.close().await.unwrap();
        assert_eq!(header_flags(d.path()), 0);
        assert_eq!(existing(&disk_map(d.path())), objects_on_disk(d.path()));
    }

    #[tokio::test(start_paused = true)]
    async fn idle_checkpoint_after_a_quiet_period_of_no_map_changes() {
        let (d, s) = store_with(32 << 20, DEFAULT_FEATURES).await;
        let (img, log) = recorded(d.path(), &s, Some(Duration::from_secs(1))).await;
        let img = Arc::new(img);
        let task = img
            .spawn_idle_checkpoints()
            .expect("a task for a writable image");
        let flag_set = || header_flags(d.path()) & RBD_FLAG_OBJECT_MAP_INVALID != 0;
        let ms = |n| tokio::time::sleep(Duration::from_millis(n));
        img.write(0, Bytes::from_static(b"a"), false).await.unwrap();
        ms(700).await;
        // A map change 0.7 s in moves the deadline to 1.7 s.
        img.write(OBJ, Bytes::from_static(b"b"), false)
            .await
            .unwrap();
        ms(700).await;
        assert!(flag_set(), "1.4 s: 0.7 s since the latest map change");
        ms(600).await;
        assert!(!flag_set(), "2 s: idle for 1.3 s, checkpointed");
        assert_eq!(
            disk_map(d.path()).to_vec(),
            img.object_map().unwrap().to_vec()
        );
        assert_eq!(existing(&disk_map(d.path())), [0, 1]);
        take(&log);
        // Writes to EXISTS objects for longer than the idle period: the flag stays clear
        // and no checkpoint is repeated.
        for i in 0..30 {
            img.write(i * 100, Bytes::from_static(b"x"), false)
                .await
                .unwrap();
            ms(100).await;
        }
        assert!(!flag_set());
        assert_eq!(take(&log), vec!["write(0)".to_string(); 30]);
        // A first write sets it again before it returns, and is checkpointed when idle.
        img.write(3 * OBJ, Bytes::from_static(b"c"), false)
            .await
            .unwrap();
        assert!(flag_set());
        assert_eq!(take(&log), ["set_flags(3)", "write(3)"]);
        ms(1500).await;
        assert!(!flag_set());
        assert_eq!(existing(&disk_map(d.path())), [0, 1, 3]);
        assert_eq!(
            take(&log),
            ["sync", "write_object_map", "set_flags(0)"],
            "the idle checkpoint writes the map, then clears the flag"
        );
        // Close stops the task.
        img.close().await.unwrap();
        assert_eq!(take(&log), ["sync", "close"]);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the idle task ends at close")
            .unwrap();
        assert_eq!(header_flags(d.path()), 0);
    }

    #[tokio::test]
    async fn no_idle_checkpoints_read_only_shared_or_off() {
        let (_d, s) = store_with(16 << 20, DEFAULT_FEATURES).await;
        let idle = Some(Duration::from_millis(10));
        let ro = OpenOptions {
            read_only: true,
            checkpoint_idle: idle,
            ..OpenOptions::default()
        };
        let img = Arc::new(Image::open(&s, &spec("vm1"), &ro).await.unwrap());
        assert!(img.spawn_idle_checkpoints().is_none());
        img.close().await.unwrap();
        let shared = OpenOptions {
            shared_default: true,
            checkpoint_idle: idle,
            ..OpenOptions::default()
        };
        let img = Arc::new(Image::open(&s, &spec("vm1"), &shared).await.unwrap());
        assert!(img.is_shared() && img.spawn_idle_checkpoints().is_none());
        img.close().await.unwrap();
        let img = Arc::new(open(&s, false).await);
        assert!(img.spawn_idle_checkpoints().is_none(), "off by default");
        img.close().await.unwrap();
    }

    #[test]
    fn checkpoint_idle_parses_seconds() {
        assert_eq!(parse_checkpoint_idle("30"), Ok(Duration::from_secs(30)));
        assert_eq!(
            parse_checkpoint_idle("0.25"),
            Ok(Duration::from_millis(250))
        );
        for bad in ["0", "-1", "x", "", "nan", "inf"] {
            assert!(parse_checkpoint_idle(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn close_order_is_sync_map_flag_close() {
        let (_d, s) = store_with(16 << 20, DEFAULT_FEATURES).await;
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        let h = s
            .open_image(&spec("vm1"), OpenMode::ReadWrite)
            .await
            .unwrap();
        let rec = Recorder {
            inner: h,
            log: log.clone(),
            audit: None,
        };
        let img = Image::from_store_image(rec, &spec("vm1"), &OpenOptions::default())
            .await
            .unwrap();
        img.read(0, 512).await.unwrap();
        img.write(OBJ, Bytes::from_static(b"w"), false)
            .await
            .unwrap();
        img.trim(2 * OBJ, OBJ as u32, false).await.unwrap();
        img.close().await.unwrap();
        let l = log.lock().unwrap().clone();
        assert_eq!(
            l,
            [
                "set_flags(3)",
                "write(1)",
                "sync",
                "write_object_map",
                "set_flags(0)",
                "close"
            ],
            "no store read of a nonexistent object, no removal of one, flag set before the write"
        );
    }

    #[tokio::test]
    async fn store_full_is_enospc_naming_the_object() {
        let (d, s) = store_with(16 << 20, DEFAULT_FEATURES).await;
        // An object file that is /dev/full: every write to it fails with ENOSPC.
        let obj = pool(d.path()).join(format!("rbd_data.{}.{:016x}", id(d.path()), 1));
        std::os::unix::fs::symlink("/dev/full", &obj).unwrap();
        let img = open(&s, false).await;
        let e = img
            .write(OBJ + 10, Bytes::from_static(b"data"), false)
            .await
            .unwrap_err();
        assert_eq!(e.errno, Errno::NoSpc);
        assert!(
            e.message.contains(&obj.display().to_string()),
            "{}",
            e.message
        );
        // Other objects still work.
        img.write(0, Bytes::from_static(b"ok"), false)
            .await
            .unwrap();
        // The failed object cannot be synced: close reports it and leaves the flag set,
        // so the map on disk is never trusted.
        let e = img.close().await.unwrap_err();
        assert!(e.message.contains("syncing"), "{}", e.message);
        assert_ne!(header_flags(d.path()) & RBD_FLAG_OBJECT_MAP_INVALID, 0);
        std::fs::remove_file(&obj).unwrap();
        let img = open(&s, false).await;
        assert!(matches!(img.map_source(), Some(MapSource::Rebuilt(_))));
        assert_eq!(existing(img.object_map().unwrap()), [0]);
        img.close().await.unwrap();
        assert_eq!(header_flags(d.path()), 0);
    }
}
