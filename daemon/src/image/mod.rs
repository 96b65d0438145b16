//! The image layer: byte ranges to objects, the in-memory object map and its dirty-flag
//! lifecycle, served to NBD through [`nbd_protocol::Backend`].
//!
//! Invariant kept while an image is open for writing with its map in memory: every
//! object that exists in the store is not NONEXISTENT in the map. Writes mark EXISTS
//! before the store write; removals mark NONEXISTENT only after the store removed the
//! object; a per-object lock keeps a removal from interleaving with a write. The header
//! carries OBJECT_MAP_INVALID while the on-disk map may be stale (from open until a
//! clean close or checkpoint, and again from the first map-changing request after a
//! checkpoint, set before that request touches the store), so a crash never leaves a
//! trusted stale map. After an unclean close the map is rebuilt in the background while
//! the image is served (`rebuild`): objects not reached yet are EXISTS in memory, which
//! keeps the invariant, and are asked of the store where EXISTS would be wrong.
//!
//! One room a concern: `open` (open, close, create; the shared setting), `dirty` (the
//! dirty flag and checkpoints), `map` (load, trust, rebuild), `pieces` (requests split
//! into object pieces; extents), `clone` (a clone's ancestors, copy-up, copy-on-read,
//! flatten), `resize` (resize and the lock owner's requests), `handover` (the lock given to another
//! client and taken back), `rebuild` (the map rebuilt
//! while serving: unknown objects, the merge, waits for the whole map),
//! `backend` (the NBD data plane). Their tests are in `tests/`, by plane, on a directory
//! store or on `test_store`'s memory image.

use crate::error::{Error, ErrorKind, Result};
use crate::spec::ImageSpec;
use crate::store::{ImageHeader, ImageStore};
use futures_util::stream::{self, StreamExt};
use objmap::ObjectMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Mutex, RwLock};

mod backend;
mod clone;
mod dirty;
mod features;
mod handover;
mod map;
mod open;
mod pieces;
mod quiesce;
mod rebuild;
mod resize;
mod snap;
mod sparsify;
#[cfg(test)]
mod test_store;
#[cfg(test)]
mod tests;

pub use clone::{release_parent, MAX_CHAIN_DEPTH};
pub use features::UPDATABLE_FEATURES;
pub use map::{
    describe_rebuilt, invalid_flags, load_object_map, new_map, rebuild_map, trusted_object_map,
    MapSource,
};
pub use open::{create_image, shared_setting, write_empty_object_map, OpenOptions};
pub use rebuild::{rebuild_before_serving, REBUILD_BEFORE_SERVING_ENV, REBUILD_WAIT};
pub use snap::{mark_clean_after_snapshot, merge_removed_snapshot};

/// Image metadata key of the per-image `shared` setting.
pub const META_SHARED: &str = "rados-nbd.shared";

/// Largest request the server accepts (NBD_INFO_BLOCK_SIZE maximum).
pub const MAX_BLOCK: u32 = 32 << 20;

const LOCK_SHARDS: usize = 1024;

/// Objects a whole-image operation (flatten, sparsify) works on at a time: librbd's
/// `rbd_concurrent_management_ops` (default 10).
const MANAGEMENT_CONCURRENCY: usize = 10;

/// Keeps every byte offset and object arithmetic far from u64 overflow.
pub const MAX_IMAGE_SIZE: u64 = 1 << 60;
/// cls_rbd's MAX_OBJECT_MAP_OBJECT_COUNT: librbd refuses to create, clone, grow or
/// enable object-map on an image with more objects ("image size not compatible with
/// object map"), and cls_rbd to resize a map past it. 256 000 000 objects: a 61 MiB map
/// (976 TiB at 4 MiB objects).
pub const MAX_MAP_OBJECTS: u64 = 256_000_000;

/// Refuses an image of `size` bytes in objects of 2^`order` with the object-map feature
/// (in `features`) that has more objects than an object map may, as librbd does.
pub fn check_map_size(features: u64, size: u64, order: u8) -> Result<()> {
    let count = size.div_ceil(1u64 << order);
    if features & crate::store::RBD_FEATURE_OBJECT_MAP == 0 || count <= MAX_MAP_OBJECTS {
        return Ok(());
    }
    Err(Error::new(
        ErrorKind::InvalidInput,
        format!(
            "image size not compatible with object map: {size} bytes is {count} objects of \
             {} bytes, and an object map has at most {MAX_MAP_OBJECTS} (as librbd's); use \
             larger objects (--object-size)",
            1u64 << order
        ),
    ))
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
    /// Reads sent to an ancestor of a clone (each at the level that has the data).
    pub parent_reads: AtomicU64,
    /// Copy-ups: objects a clone lacked, created with their ancestor's data.
    pub copyups: AtomicU64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct StatsSnapshot {
    pub map_reads: u64,
    pub store_reads: u64,
    pub store_writes: u64,
    pub store_zeroes: u64,
    pub store_removes: u64,
    pub skipped_removes: u64,
    pub parent_reads: u64,
    pub copyups: u64,
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
            parent_reads: g(&self.parent_reads),
            copyups: g(&self.copyups),
        }
    }
}

fn bump(a: &AtomicU64) {
    a.fetch_add(1, Ordering::Relaxed);
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
    /// Replaced only in `resize` and `rebuild_object_map`, with every request held off
    /// by `gate`; a request
    /// takes its own reference and never holds this lock across an await.
    map: std::sync::RwLock<Option<Arc<ObjectMap>>>,
    map_source: Option<MapSource>,
    /// The map's rebuild after an unclean close, while serving (see `rebuild`): None
    /// when the map was loaded, or rebuilt before serving.
    rebuild: Option<rebuild::Rebuild>,
    /// How long a change needing the whole map waits for a rebuild run elsewhere.
    rebuild_wait: Duration,
    /// The first pause before a failed background rebuild is tried again.
    rebuild_retry: Duration,
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
    /// A clone's ancestors (dropped by flatten); `has_parent` says so without a lock,
    /// so an image that is no clone pays one load for it.
    chain: std::sync::RwLock<Option<Arc<clone::Chain<S>>>>,
    has_parent: AtomicBool,
    /// A clone's objects that a map loaded from the store says the child has, and that
    /// no request has seen in the store since: a map written by librbd may claim an
    /// object its copy-up never created (see `verify_claim`). None for images that are
    /// no clone at open (or read-only ones).
    unverified: Option<objmap::BitSet>,
    /// `--copy-on-read`: objects to copy up in the background, and those queued.
    cor: std::sync::OnceLock<clone::CopyOnRead>,
    /// Set while another client waits for the lock and a long request (a flatten or
    /// sparsify asked by a client) runs: it stops at the next object, as librbd's owner
    /// cancels its async requests before a release; its asker sends it again to the new
    /// owner (ERESTART), which finds the objects done so far done.
    interrupt_long: std::sync::atomic::AtomicBool,
    /// `--quiesce`: the hook run around snapshots taken for other clients.
    quiesce: std::sync::OnceLock<Arc<crate::quiesce::QuiesceHook>>,
    /// The exclusive lock was handed to another client (`handover`): set and cleared
    /// with `gate` held exclusively; every request checks it under `gate`.
    released: AtomicBool,
    /// The last take-back failed adopting what the other owner left (journaling switched
    /// on, say): warned once, not at every refused request.
    takeback_failing: AtomicBool,
    /// One hand-over or take-back at a time.
    handover: Mutex<()>,
    /// The image's features: the header's at open, changed by `update_features` (with
    /// every request held off by `gate`).
    features: AtomicU64,
}

/// The dirty flag as the idle checkpointer sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FlagState {
    Clean,
    Dirty,
    Closed,
}

impl<S: ImageStore> Image<S> {
    pub fn spec(&self) -> &ImageSpec {
        &self.spec
    }
    pub fn header(&self) -> &ImageHeader {
        &self.header
    }
    /// The features now (`rbd feature enable|disable` may have changed them since open).
    pub fn features(&self) -> u64 {
        self.features.load(Ordering::Acquire)
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
    /// The map in memory. While a rebuild is under way (`rebuild_pending`) it holds
    /// EXISTS for the objects not known yet: await `finish_rebuild` for the whole map.
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

    /// Renames the image within its pool (`rbd rename`): a name change in the store's
    /// directory only, so what is being served is untouched. Names as rbd takes them
    /// (anything but empty, `/` or `@`; rbd's `SPEC_VALIDATION_FULL`), so a rename another
    /// client asks for is refused only where librbd's owner would refuse it too. This
    /// handle keeps calling the image by the name it was opened with, in its logs and in
    /// `list-mapped`, as rbd-nbd does.
    pub async fn rename(&self, dest: &str) -> Result<()> {
        self.check_writable()?;
        if dest.is_empty() || dest.contains(['/', '@']) {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("cannot rename {} to {dest:?}: not an image name", self.spec),
            ));
        }
        self.store.rename(dest).await
    }

    fn order(&self) -> u8 {
        self.header.order
    }

    fn lock_for(&self, objno: u64) -> &RwLock<()> {
        &self.locks[(objno % LOCK_SHARDS as u64) as usize]
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

    /// Runs `one` on every object `0..total`, [`MANAGEMENT_CONCURRENCY`] at a time, each
    /// under `gate` (refused once the image is closing), with `progress(done, total)`
    /// after each; the first error ends it (see [`all_concurrently`]).
    async fn for_each_object<F, Fut>(
        &self,
        total: u64,
        one: F,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<()>
    where
        F: Fn(u64) -> Fut,
        Fut: Future<Output = Result<()>>,
    {
        let one = &one;
        let mut done = 0;
        all_concurrently(
            0..total,
            |objno| async move {
                let g = self.gate.read().await;
                if *g {
                    return Err(Error::new(ErrorKind::Interrupted, "the image is closing"));
                }
                if self.interrupt_long.load(Ordering::Acquire) {
                    return Err(Error::new(
                        ErrorKind::Busy,
                        "interrupted: the exclusive lock goes to another client",
                    ));
                }
                let r = one(objno).await;
                drop(g);
                r
            },
            || {
                done += 1;
                progress(done, total);
            },
        )
        .await
    }
}

/// Runs `one` on every item, [`MANAGEMENT_CONCURRENCY`] at a time, calling `done()`
/// after each that succeeds, and returns the first error. After it no new item starts,
/// but those under way run to their end: dropping one would not stop what it already
/// asked of the store (a removal or a copy-up runs on in a blocking thread or in the
/// OSD), and it would land behind the object map's back, after the caller gave up the
/// gate or the lock.
async fn all_concurrently<T, F, Fut>(
    items: impl IntoIterator<Item = T>,
    one: F,
    mut done: impl FnMut(),
) -> Result<()>
where
    F: Fn(T) -> Fut,
    Fut: Future<Output = Result<()>>,
{
    let failed = AtomicBool::new(false);
    let (one, failed) = (&one, &failed);
    let mut each = stream::iter(items)
        .map(|item| async move {
            if failed.load(Ordering::Acquire) {
                return None;
            }
            Some(one(item).await)
        })
        .buffer_unordered(MANAGEMENT_CONCURRENCY);
    let mut first = None;
    while let Some(r) = each.next().await {
        match r {
            Some(Ok(())) => done(),
            Some(Err(e)) => {
                failed.store(true, Ordering::Release);
                first.get_or_insert(e);
            }
            None => {}
        }
    }
    first.map_or(Ok(()), Err)
}
