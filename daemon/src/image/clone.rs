//! Clones: the chain of ancestors a clone reads through, each opened at its snapshot
//! with its object map in memory when that map can be trusted, so a read of an object
//! the clone lacks goes straight to the nearest ancestor that has it (no failed read on
//! the way), and to zeros when none has it; copy-up of a parent-backed object on its
//! first change (librbd's CopyupRequest), copy-on-read, and flatten.

use super::map::trusted_object_map;
use super::pieces::{split, Piece};
use super::{bump, Image, Stats};
use crate::error::{Error, ErrorKind, Result};
use crate::spec::ImageSpec;
use crate::store::{
    one_extent, ImageHeader, ImageStore, ObjectWrite, OpenMode, ParentInfo, SnapNamespace,
    RBD_FEATURE_FAST_DIFF, RBD_FEATURE_OBJECT_MAP,
};
use bytes::Bytes;
use nbd_protocol::ReadChunk;
use objmap::{ObjectMap, ObjectState};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// Deeper chains than this are refused at open: Ceph has no hard limit, but ceph-csi
/// flattens past 8, and a longer chain is a loop in the metadata or a mistake.
pub const MAX_CHAIN_DEPTH: usize = 64;

/// One ancestor: a read-only handle at the snapshot its child was cloned from.
pub(crate) struct Level<S> {
    store: S,
    snap: u64,
    order: u8,
    /// How far this level backs the clone, from the overlaps along the chain down to
    /// it and the sizes (the clone's own overlap, which a resize lowers, is in `Chain`).
    limit: u64,
    /// Its object map at the snapshot, when the snapshot's flags say it is valid: None
    /// means "ask the store" (a read that finds nothing goes on to the next level).
    map: Option<ObjectMap>,
}

impl<S> Level<S> {
    /// Whether this level's map says it lacks object `objno` (false without a map: the
    /// store is asked then).
    fn lacks(&self, objno: u64) -> bool {
        self.map
            .as_ref()
            .is_some_and(|m| objno >= m.len() || m.get(objno) == ObjectState::Nonexistent)
    }

    /// Whether this level's map says it has object `objno` (false without a map).
    fn has(&self, objno: u64) -> bool {
        self.map.as_ref().is_some_and(|m| map_says_exists(m, objno))
    }
}

/// Whether map `m` says object `objno` exists (any state but NONEXISTENT).
pub(crate) fn map_says_exists(m: &ObjectMap, objno: u64) -> bool {
    objno < m.len() && m.get(objno) != ObjectState::Nonexistent
}

impl<S: ImageStore> Level<S> {
    /// A read of an object this level's map says it has found nothing. That happens
    /// (librbd leaves EXISTS behind a copy-up that failed; the next level then has the
    /// bytes), but it is also what a snapshot removed since the chain was opened looks
    /// like (RADOS answers ENOENT at a removed snapshot), when the levels below would
    /// hand out other bytes than the snapshot had, and a copy-up would keep them. So the
    /// store is asked whether the snapshot is still there: an error if not.
    async fn check_snapshot(&self, objno: u64) -> Result<()> {
        if !self.has(objno) {
            return Ok(());
        }
        check_snapshot(&self.store, self.snap).await
    }
}

/// An error unless `store`'s image (its header read again) still has snapshot `snap`.
pub(crate) async fn check_snapshot<S: ImageStore>(store: &S, snap: u64) -> Result<()> {
    let h = store.refresh_header().await?;
    if h.snaps.iter().any(|s| s.id == snap) {
        return Ok(());
    }
    Err(Error::new(
        ErrorKind::NotFound,
        format!(
            "snapshot id {snap} of image {} was removed while it was read (reads of it \
             fail rather than return other bytes)",
            h.id
        ),
    ))
}

/// The ancestors of a clone, nearest first.
pub(crate) struct Chain<S> {
    levels: Vec<Level<S>>,
    /// The clone's parent overlap now: a shrinking resize lowers it, growing never
    /// raises it (as cls_rbd's set_size does).
    overlap: AtomicU64,
}

type BoxFut<'a, T> = Pin<Box<dyn Future<Output = Result<T>> + Send + 'a>>;

impl<S: ImageStore> Chain<S> {
    /// Opens the ancestors of `img` (whose header is `header`, served at `size` bytes),
    /// any depth; `None` when it is not a clone. Each level's handle is closed again
    /// when this fails.
    pub(crate) async fn open(
        img: &S,
        spec: &ImageSpec,
        header: &ImageHeader,
        size: u64,
    ) -> Result<Option<Self>> {
        let Some(first) = &header.parent else {
            return Ok(None);
        };
        let mut chain = Chain {
            levels: Vec::new(),
            overlap: AtomicU64::new(first.overlap.min(size)),
        };
        match chain.open_levels(img, spec, header).await {
            Ok(()) => Ok(Some(chain)),
            Err(e) => {
                chain.close().await;
                Err(e.context(format!("opening the parents of clone {spec}")))
            }
        }
    }

    async fn open_levels(&mut self, img: &S, spec: &ImageSpec, header: &ImageHeader) -> Result<()> {
        let mut seen = vec![(header.id.clone(), None::<u64>)];
        let mut info = header.parent.clone();
        let mut limit = u64::MAX;
        while let Some(p) = info {
            if self.levels.len() >= MAX_CHAIN_DEPTH {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    format!("{spec}: the clone chain is deeper than {MAX_CHAIN_DEPTH} images; flatten it"),
                ));
            }
            if seen.contains(&(p.image_id.clone(), Some(p.snap_id))) {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    format!(
                        "{spec}: the clone chain loops back to {} (image id {} snapshot {})",
                        p.spec, p.image_id, p.snap_id
                    ),
                ));
            }
            seen.push((p.image_id.clone(), Some(p.snap_id)));
            let opened = match self.levels.last() {
                None => img.open_parent().await?,
                Some(l) => l.store.open_parent().await?,
            };
            let Some(store) = opened else {
                return Err(Error::new(
                    ErrorKind::NotFound,
                    format!(
                        "parent {} (level {}) could not be opened",
                        p.spec,
                        self.levels.len() + 1
                    ),
                ));
            };
            let h = store.header();
            limit = limit.min(p.overlap).min(h.size);
            let map = level_map(&store, &h, p.snap_id).await;
            let map = match map {
                Ok(m) => m,
                Err(e) => {
                    let _ = store.close().await;
                    return Err(e.context(format!("loading the object map of parent {}", p.spec)));
                }
            };
            tracing::debug!(
                "{spec}: ancestor {} {} at level {}, backing {limit} bytes",
                p.spec,
                if map.is_some() {
                    "with its object map"
                } else {
                    "without a map (asked)"
                },
                self.levels.len() + 1
            );
            info = h.parent.clone();
            self.levels.push(Level {
                store,
                snap: p.snap_id,
                order: h.order,
                limit,
                map,
            });
        }
        Ok(())
    }

    pub(crate) async fn close(&self) {
        for l in &self.levels {
            let _ = l.store.close().await;
        }
    }

    pub(crate) fn depth(&self) -> usize {
        self.levels.len()
    }

    pub(crate) fn overlap(&self) -> u64 {
        self.overlap.load(Ordering::Acquire)
    }

    /// The overlap as the header says it now (after another owner's shrink, grow or
    /// rollback: up or down).
    pub(crate) fn set_overlap(&self, overlap: u64) {
        self.overlap.store(overlap, Ordering::Release);
    }

    /// A shrink of the clone to `size` bytes lowers the overlap; growing never raises it.
    pub(crate) fn shrink_overlap(&self, size: u64) {
        self.overlap.fetch_min(size, Ordering::AcqRel);
    }

    /// How far level `k` backs the clone now.
    fn backs(&self, k: usize) -> u64 {
        self.overlap().min(self.levels[k].limit)
    }

    /// Whether some ancestor may hold data in `[off, off+len)` of the image: known from
    /// the maps, assumed where a level has none.
    pub(crate) fn may_have(&self, off: u64, len: u64) -> bool {
        for (k, l) in self.levels.iter().enumerate() {
            let end = (off + len).min(self.backs(k));
            if end <= off {
                // Deeper levels back no more than this one.
                return false;
            }
            let Some(m) = &l.map else {
                return true;
            };
            let (first, last) = (off >> l.order, (end - 1) >> l.order);
            let last = last.min(m.len().saturating_sub(1));
            if first <= last
                && m.runs(first..last + 1)
                    .any(|r| r.state != ObjectState::Nonexistent)
            {
                return true;
            }
        }
        false
    }

    /// Reads `[off, off+len)` of the image from level `k` down: each piece from the
    /// nearest level whose map says it exists (or, without a map, that has it), zeros
    /// past the overlap and where no level has it.
    pub(crate) fn read<'a>(
        &'a self,
        k: usize,
        off: u64,
        len: u64,
        stats: &'a Stats,
    ) -> BoxFut<'a, Vec<ReadChunk>> {
        Box::pin(async move {
            let end = off + len;
            let within = if k < self.levels.len() {
                end.min(self.backs(k)).max(off)
            } else {
                off
            };
            let mut out: Vec<ReadChunk> = Vec::new();
            if within > off {
                let l = &self.levels[k];
                // Each ancestor a read reaches is read (librbd: an image read of it,
                // which notes its access timestamp), whether it has the object or not.
                l.store.note_io(false);
                for p in split(l.order, off, within - off) {
                    let at = off + p.req_off;
                    let chunks = if l.lacks(p.objno) {
                        self.read(k + 1, at, p.len, stats).await?
                    } else {
                        bump(&stats.parent_reads);
                        match l.store.read(p.objno, p.off, p.len, Some(l.snap)).await? {
                            None => {
                                l.check_snapshot(p.objno).await?;
                                self.read(k + 1, at, p.len, stats).await?
                            }
                            Some(b) => chunks_of(b, p.len),
                        }
                    };
                    for c in chunks {
                        push(&mut out, c);
                    }
                }
            }
            if within < end {
                push(&mut out, ReadChunk::Hole((end - within) as u32));
            }
            Ok(out)
        })
    }

    /// The ancestors' bytes of `[off, off+len)` for a copy-up, as librbd's CopyupRequest
    /// gets them: an image read of the nearest ancestor (level 0). Where level 0 has the
    /// object, the extents it has allocated there when the piece is at least
    /// `SPARSE_READ_THRESHOLD` long (librbd's sparse read: seen with `rados stat` against
    /// librbd twins, the child's object ends with the last of them, not at the object's
    /// end), its bytes up to its end otherwise. Where it lacks it, level 0 reads its own parent
    /// for the part inside its parent overlap, and in librbd 16 that read comes back dense
    /// (io::util::read_parent into one buffer): zeros included up to where that overlap
    /// ends, so the child's object is as long as librbd's (seen with `rados stat` against
    /// librbd twins; a depth-1 clone, whose level 0 has no parent, gets nothing there).
    /// Trailing holes dropped; all zeros is nothing at all (librbd's m_copyup_is_zero:
    /// no parent data is copied). The extents say which bytes were read, the rest being
    /// holes (librbd copies up only those, with rbd.sparse_copyup).
    pub(crate) async fn read_bytes(&self, off: u64, len: u64, stats: &Stats) -> Result<ParentData> {
        let mut out = Dense::default();
        let l = &self.levels[0];
        let end = (off + len).min(self.backs(0));
        if end > off {
            l.store.note_io(false);
            for p in split(l.order, off, end - off) {
                let at = off + p.req_off;
                let got = if l.lacks(p.objno) {
                    None
                } else {
                    bump(&stats.parent_reads);
                    let got = if p.len >= SPARSE_READ_THRESHOLD {
                        l.store
                            .read_extents(p.objno, p.off, p.len, Some(l.snap))
                            .await?
                    } else {
                        l.store
                            .read(p.objno, p.off, p.len, Some(l.snap))
                            .await?
                            .map(|b| one_extent(p.off, b))
                    };
                    if got.is_none() {
                        l.check_snapshot(p.objno).await?;
                    }
                    got
                };
                match got {
                    // Sparse, as librbd's: the gaps (and what follows the last extent)
                    // are holes, so the copy-up ends with the last extent.
                    Some(extents) => {
                        let mut pos = p.off;
                        for (eo, b) in extents {
                            if eo > pos {
                                out.extend([ReadChunk::Hole((eo - pos) as u32)], false);
                            }
                            pos = eo + b.len() as u64;
                            out.extend([ReadChunk::Data(b)], false);
                        }
                        let end = p.off + p.len;
                        if end > pos {
                            out.extend([ReadChunk::Hole((end - pos) as u32)], false);
                        }
                    }
                    None => {
                        let dense_end = if self.levels.len() > 1 {
                            (at + p.len).min(self.backs(1)).max(at)
                        } else {
                            at
                        };
                        if dense_end > at {
                            out.extend(self.read(1, at, dense_end - at, stats).await?, true);
                        }
                        out.extend([ReadChunk::Hole((at + p.len - dense_end) as u32)], false);
                    }
                }
            }
        }
        if out.bytes.iter().all(|&b| b == 0) {
            return Ok(ParentData::default());
        }
        Ok(ParentData {
            bytes: Bytes::from(out.bytes),
            extents: out.extents,
        })
    }
}

/// `--copy-on-read`'s queue: objects to copy up, handled in order by one worker task.
/// `queued`/`finished` count requests, so that a flush waits for exactly those asked
/// before it (FIFO), never for later ones.
pub(super) struct CopyOnRead {
    tx: tokio::sync::mpsc::UnboundedSender<u64>,
    /// Queued and not done yet: asked again, an object is not queued twice.
    pending: std::sync::Mutex<std::collections::HashSet<u64>>,
    queued: AtomicU64,
    finished: AtomicU64,
    /// The worker ended: nothing queued will be done.
    stopped: AtomicBool,
    done: tokio::sync::Notify,
}

impl CopyOnRead {
    fn new(tx: tokio::sync::mpsc::UnboundedSender<u64>) -> Self {
        CopyOnRead {
            tx,
            pending: Default::default(),
            queued: AtomicU64::new(0),
            finished: AtomicU64::new(0),
            stopped: AtomicBool::new(false),
            done: tokio::sync::Notify::new(),
        }
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<u64>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues object `objno` unless it is queued already.
    fn ask(&self, objno: u64) {
        let mut p = self.pending();
        if !p.insert(objno) {
            return;
        }
        self.queued.fetch_add(1, Ordering::AcqRel);
        if self.tx.send(objno).is_err() {
            // The worker is gone: counted done at once.
            p.remove(&objno);
            self.finished.fetch_add(1, Ordering::AcqRel);
        }
    }

    fn finish(&self, objno: u64) {
        self.pending().remove(&objno);
        self.finished.fetch_add(1, Ordering::AcqRel);
        self.done.notify_waiters();
    }

    fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        self.pending().clear();
        self.done.notify_waiters();
    }

    async fn wait(&self) {
        let target = self.queued.load(Ordering::Acquire);
        loop {
            let done = self.done.notified();
            tokio::pin!(done);
            done.as_mut().enable();
            if self.stopped.load(Ordering::Acquire)
                || self.finished.load(Ordering::Acquire) >= target
            {
                return;
            }
            done.await;
        }
    }
}

/// The ancestors' data for a copy-up: bytes from the object's start, and the extents of
/// them that were read (offset, length), the rest holes; empty when all zeros.
#[derive(Default)]
pub(crate) struct ParentData {
    pub bytes: Bytes,
    pub extents: Vec<(u64, u64)>,
}

/// librbd's `rbd_sparse_read_threshold_bytes` (default 64 KiB): an object read at least
/// this long is a sparse read (ObjectReadRequest::read_object), a shorter one a plain read.
const SPARSE_READ_THRESHOLD: u64 = 64 << 10;

/// Whether `data` holds only zeros outside `[off, off+len)`.
fn zero_outside(data: &[u8], off: u64, len: u64) -> bool {
    let n = data.len() as u64;
    let (a, b) = (off.min(n) as usize, off.saturating_add(len).min(n) as usize);
    data[..a].iter().all(|&x| x == 0) && data[b..].iter().all(|&x| x == 0)
}

/// Copy-up bytes being gathered: data, and holes kept pending until data follows them
/// (trailing holes are not part of the copy-up) unless they are read densely. `extents`:
/// where the bytes came from a read (data, or zeros read densely), as librbd's copy-up
/// extent map; the rest of `bytes` is holes filled in.
#[derive(Default)]
struct Dense {
    bytes: Vec<u8>,
    pending: usize,
    extents: Vec<(u64, u64)>,
}

impl Dense {
    fn extend(&mut self, chunks: impl IntoIterator<Item = ReadChunk>, dense: bool) {
        for c in chunks {
            match c {
                ReadChunk::Hole(n) => {
                    if dense {
                        self.fill_pending();
                        self.push(&vec![0; n as usize]);
                    } else {
                        self.pending += n as usize;
                    }
                }
                ReadChunk::Data(b) => {
                    self.fill_pending();
                    self.push(&b);
                }
            }
        }
    }

    /// The holes pending before more bytes: zeros, outside every extent.
    fn fill_pending(&mut self) {
        self.bytes.resize(self.bytes.len() + self.pending, 0);
        self.pending = 0;
    }

    /// Bytes read: appended, and in the extents (merged with the last one when they touch).
    fn push(&mut self, b: &[u8]) {
        if b.is_empty() {
            return;
        }
        let at = self.bytes.len() as u64;
        self.bytes.extend_from_slice(b);
        match self.extents.last_mut() {
            Some((o, l)) if *o + *l == at => *l += b.len() as u64,
            _ => self.extents.push((at, b.len() as u64)),
        }
    }
}

/// A level's map at its snapshot, if it is trusted: the image has the feature, the
/// snapshot's flags do not say it is invalid, and it decodes with the right size.
async fn level_map<S: ImageStore>(
    store: &S,
    h: &ImageHeader,
    snap: u64,
) -> Result<Option<ObjectMap>> {
    if h.features & RBD_FEATURE_OBJECT_MAP == 0 {
        return Ok(None);
    }
    let mut h = h.clone();
    // The handle's header carries the snapshot's flags; a store that also answers
    // snap_flags is asked too (either saying invalid is enough).
    if let Ok(f) = store.snap_flags(snap).await {
        h.flags |= f;
    }
    Ok(
        match trusted_object_map(store, &h, Some(snap), h.size).await? {
            Ok(m) => Some(m),
            Err(reason) => {
                tracing::info!("a parent's map at snapshot {snap} is not used (its reads ask the store): {reason}");
                None
            }
        },
    )
}

fn push(out: &mut Vec<ReadChunk>, c: ReadChunk) {
    match (out.last_mut(), c) {
        (Some(ReadChunk::Hole(a)), ReadChunk::Hole(b)) => *a += b,
        (_, c) => out.push(c),
    }
}

/// What a store read of `len` bytes returned, as chunks covering exactly `len`.
pub(crate) fn chunks_of(b: Bytes, len: u64) -> Vec<ReadChunk> {
    let n = len as u32;
    if b.is_empty() {
        vec![ReadChunk::Hole(n)]
    } else if b.len() as u64 >= len {
        vec![ReadChunk::Data(b.slice(..len as usize))]
    } else {
        let rest = n - b.len() as u32;
        vec![ReadChunk::Data(b), ReadChunk::Hole(rest)]
    }
}

/// What `discard_shadowing` did.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Shadow {
    /// The object is cut to nothing, kept.
    Done,
    /// Past the parent overlap: removed as usual by the caller.
    PastOverlap,
    /// The child lacks the object after all (a copy-up waited for failed): start over.
    Restart,
}

/// What a copy-up does to the child's object, besides bringing the parent's data.
pub(crate) enum CopyupOp {
    Write(Bytes),
    Zero,
    /// A whole-object discard: an empty object hides the parent's data.
    Discard,
    /// Copy-on-read: the parent's data alone.
    None,
    /// Flatten: the parent's data and an empty write on top, as librbd's flatten
    /// (io::util::trigger_copyup): with the child's snapshot context, so that after a
    /// deep copy-up the OSD clones the object for the snapshots and the head counts as
    /// written since them (EXISTS, where copy-on-read leaves EXISTS_CLEAN). Nothing at all
    /// when the parent's data is all zeros (librbd: no copy-up required).
    Flatten,
}

impl<S: ImageStore> Image<S> {
    /// The ancestors, when the image is (still) a clone.
    pub(super) fn chain(&self) -> Option<Arc<Chain<S>>> {
        self.chain.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The clone's parent overlap now; None when it is not a clone.
    pub fn parent_overlap(&self) -> Option<u64> {
        self.chain().map(|c| c.overlap())
    }

    /// How many ancestors the image reads through (0: not a clone).
    pub fn clone_depth(&self) -> usize {
        self.chain().map_or(0, |c| c.depth())
    }

    /// Whether object `objno` starts inside the parent overlap (cheap: a flag first).
    pub(super) fn parent_backed(&self, objno: u64) -> Option<Arc<Chain<S>>> {
        if !self.has_parent.load(Ordering::Acquire) {
            return None;
        }
        let c = self.chain()?;
        (objno << self.order() < c.overlap()).then_some(c)
    }

    /// A read piece of an object the child lacks: from the ancestors.
    pub(super) async fn read_parent_piece(&self, p: Piece) -> Result<Vec<ReadChunk>> {
        let Some(c) = self.parent_backed(p.objno) else {
            if self.chain().is_none() {
                // Flattened since the caller looked: the child has every object now.
                bump(&self.stats.store_reads);
                let r = self.store.read(p.objno, p.off, p.len, self.snap).await?;
                return Ok(chunks_of(r.unwrap_or_default(), p.len));
            }
            // Past the overlap: zeros.
            bump(&self.stats.map_reads);
            return Ok(vec![ReadChunk::Hole(p.len as u32)]);
        };
        let at = (p.objno << self.order()) + p.off;
        let chunks = c.read(0, at, p.len, &self.stats).await?;
        if let Some(tx) = self.cor.get() {
            // As librbd's ObjectReadRequest::copyup: every read of an object the child
            // lacks that reaches into the overlap copies it up, data or not (where no
            // ancestor has any, the copy-up creates an empty object: seen with `rados
            // stat` against librbd twins); a read wholly past the overlap does not.
            if at < c.overlap() {
                tx.ask(p.objno);
            }
        }
        Ok(chunks)
    }

    /// Marks every object inside the parent overlap that the map in memory, just
    /// loaded from the store, says the child has as not yet seen (`verify_claim`).
    pub(super) fn suspect_claims(&self) {
        let (Some(u), Some(c)) = (&self.unverified, self.parent_backed(0)) else {
            return;
        };
        let Some(m) = self.map_now().clone() else {
            return;
        };
        let end = c
            .overlap()
            .div_ceil(self.header.object_size())
            .min(u.len())
            .min(m.len());
        let mut n = 0u64;
        for objno in 0..end {
            if m.get(objno) != ObjectState::Nonexistent {
                u.insert(objno);
                n += 1;
            }
        }
        if n > 0 {
            tracing::debug!(
                "{}: {n} objects the loaded object map says the clone has are checked in \
                 the store at their first change",
                self.spec
            );
        }
    }

    /// Checks, once, that object `objno` exists in the store when a map loaded from the
    /// store claims it (`unverified`), before that claim lets a change skip the
    /// copy-up. librbd marks an object EXISTS before its copy-up is sent and never takes
    /// the mark back when the copy-up fails or its client dies: it reads EXISTS as "may
    /// exist" (its writes assert that the object exists and copy up on ENOENT). Trusted
    /// as it stands, such a mark would let a partial write create the object without
    /// the parent's bytes, and a partial discard of the missing object do nothing while
    /// the parent's data shows through. Called under the object's write lock.
    async fn verify_claim(&self, objno: u64) -> Result<()> {
        let Some(u) = &self.unverified else {
            return Ok(());
        };
        if !u.contains(objno) {
            return Ok(());
        }
        let missing = !self.store_has(objno).await?;
        u.remove(objno);
        if missing
            && self
                .known_state(objno)
                .is_some_and(|st| st != ObjectState::Nonexistent)
        {
            tracing::info!(
                "{}: object {objno} is marked in the object map but is not in the store \
                 (a copy-up another client never finished): copied up now",
                self.spec
            );
            self.touch(objno);
            if let Some(m) = self.map_now().as_deref() {
                m.set(objno, ObjectState::Nonexistent);
            }
        }
        Ok(())
    }

    /// Whether the child lacks object `objno` (its map says so; without a map, or
    /// while the map does not know it yet, the store). Called under the object's write lock.
    async fn child_lacks(&self, objno: u64) -> Result<bool> {
        // Unknown while the map is rebuilt: the store knows.
        if let Some(st) = self.known_state(objno) {
            return Ok(st == ObjectState::Nonexistent);
        }
        Ok(!self.store_has(objno).await?)
    }

    /// Whether object `objno` of the head is in the store (asked with a one-byte read).
    pub(super) async fn store_has(&self, objno: u64) -> Result<bool> {
        Ok(self.store.read(objno, 0, 1, None).await?.is_some())
    }

    /// Copy-up for a change to object `objno` (piece `off..off+len` of it) that the
    /// child lacks and an ancestor may have: the ancestors' bytes within the overlap
    /// plus the change, created in one atomic store step. `Ok(false)`: nothing to copy
    /// up (the child has the object, or it lies past the parent overlap), do the change as usual.
    ///
    /// Held under the object's write lock, and the map marked EXISTS before the store
    /// call: a write that sees EXISTS takes the read lock and so waits for the copy-up,
    /// never creating the object without its parent data. A read that sees EXISTS but
    /// finds no object goes to the parent (see `read_piece`), whose data is right.
    pub(super) async fn copyup(
        &self,
        chain: &Chain<S>,
        objno: u64,
        off: u64,
        len: u64,
        op: CopyupOp,
        fua: bool,
    ) -> Result<bool> {
        // EXISTS in a map still being rebuilt may be an object the child lacks: asked
        // under the lock (`child_lacks`), never taken for the child's data; nor is a
        // claim of a loaded map not seen in the store yet (`verify_claim`).
        if self
            .known_state(objno)
            .is_some_and(|st| st != ObjectState::Nonexistent)
            && !self.unverified.as_ref().is_some_and(|u| u.contains(objno))
        {
            return Ok(false);
        }
        let _g = self.lock_for(objno).write().await;
        self.verify_claim(objno).await?;
        if !self.child_lacks(objno).await? {
            return Ok(false);
        }
        let Some(plen) = self.parent_extent(chain, objno) else {
            return Ok(false);
        };
        let start = objno << self.order();
        // A change covering all of the parent's bytes of the object needs none of them,
        // unless a copy-up also sets the child's snapshots (Ceph's deep copy-up, asked
        // with a non-zero probe): they must keep the parent's bytes under the change,
        // as librbd copies up before a full-object write when the child has snapshots.
        let covered = match op {
            CopyupOp::Discard => true,
            CopyupOp::Write(_) | CopyupOp::Zero => off == 0 && len >= plen,
            CopyupOp::None | CopyupOp::Flatten => false,
        } && self.store.copyup_snapshots(objno, &[1]).is_empty();
        let ParentData {
            bytes: data,
            mut extents,
        } = if covered {
            ParentData::default()
        } else {
            chain.read_bytes(start, plen, &self.stats).await?
        };
        // A copy-up under a write or zero, with no snapshot to keep the parent's data
        // for: librbd 16 (CopyupRequest::prepare_copyup_data) leaves out the part the
        // change overwrites, and when what is left is all zeros copies nothing up, so
        // the object is the change alone (as long as it, not the parent's data: seen
        // with `rados stat` against librbd twins).
        let data = if matches!(op, CopyupOp::Write(_) | CopyupOp::Zero)
            && !data.is_empty()
            && self.store.header().snaps.is_empty()
            && zero_outside(&data, off, len)
        {
            extents.clear();
            Bytes::new()
        } else {
            data
        };
        // (`read_bytes` gives all-zero parent data as nothing.)
        if matches!(op, CopyupOp::Flatten) && data.is_empty() {
            // Nothing to copy and nothing on top (flatten): librbd's CopyupRequest finds
            // no copy-up required and creates no object either.
            return Ok(false);
        }
        let op = match op {
            CopyupOp::Write(d) => ObjectWrite::Write { off, data: d },
            CopyupOp::Zero => ObjectWrite::Zero { off, len },
            CopyupOp::Discard => ObjectWrite::Truncate { len: 0 },
            CopyupOp::None => ObjectWrite::None,
            CopyupOp::Flatten => ObjectWrite::Write {
                off: 0,
                data: Bytes::new(),
            },
        };
        let fast_diff = self.features() & RBD_FEATURE_FAST_DIFF != 0;
        let deep = self.mark_snapshots_exist(objno, &data, fast_diff).await?;
        match op {
            // Nothing on top (copy-on-read) of data the snapshots hold too: the
            // head is unchanged since the newest of them, EXISTS_CLEAN with fast-diff
            // (librbd's CopyupRequest: "HEAD is non-dirty since data is tied to first
            // snapshot"; `rbd object-map check` expects it).
            ObjectWrite::None if deep && fast_diff => {
                self.touch(objno);
                if let Some(m) = self.map_now().as_deref() {
                    m.set(objno, ObjectState::ExistsClean);
                }
            }
            _ => self.mark_exists(objno),
        }
        bump(&self.stats.copyups);
        if let Err(e) = self
            .store
            .copyup_extents(objno, data, extents, op, fua)
            .await
        {
            self.undo_copyup_mark(objno, true).await;
            return Err(e);
        }
        Ok(true)
    }

    /// After a copy-up's store call failed, still under the object's write lock: the
    /// map was marked EXISTS before the call (so that changes wait for it), and a later
    /// change that trusted that mark would skip the copy-up and create the object
    /// without its parent's bytes (librbd guards such writes with assert_exists; we
    /// trust the map). So the mark goes back to NONEXISTENT unless the store shows the
    /// object (the operation landed and only its reply was lost): the next change copies
    /// up again, which the store makes a no-op where the object exists (`rbd.copyup`;
    /// the directory store links its object only if absent), and a change that waited
    /// for this copy-up finds the mark gone and starts over (`copyup_undone`). Reads go
    /// to the ancestors meanwhile, which hold the same bytes outside the failed change.
    /// `lacked`: the child lacked the object before the call, so that when the store
    /// cannot tell either, NONEXISTENT is what it was (otherwise EXISTS stays: the
    /// object may hold the child's own data, which the ancestors' must not hide).
    async fn undo_copyup_mark(&self, objno: u64, lacked: bool) {
        match self.store_has(objno).await {
            Ok(true) => return,
            Ok(false) => {}
            Err(_) if lacked => {}
            Err(_) => return,
        }
        if let Some(m) = self.map_now().as_deref() {
            m.set(objno, ObjectState::Nonexistent);
        }
    }

    /// Whether a change that found object `objno` marked EXISTS, and so copied nothing
    /// up, must start over: the copy-up it waited for failed and took the mark back
    /// (`undo_copyup_mark`). Asked under the object's lock.
    pub(super) fn copyup_undone(&self, objno: u64) -> bool {
        self.is_nonexistent(objno) && self.parent_backed(objno).is_some()
    }

    /// A copy-up that also sets the child's snapshots (the store says which) makes the
    /// object exist in their maps too, before the data, as librbd's CopyupRequest
    /// (update_object_maps, then copyup): the oldest EXISTS, the later ones
    /// EXISTS_CLEAN with fast-diff (they inherit its data). Left NONEXISTENT, librbd
    /// would read such a snapshot's object as the parent's, or as zeros once the
    /// snapshot has no parent (deep-flatten). Returns whether there were any.
    async fn mark_snapshots_exist(&self, objno: u64, data: &[u8], fast_diff: bool) -> Result<bool> {
        let snaps = self.store.copyup_snapshots(objno, data);
        let any = !snaps.is_empty();
        for (n, snap) in snaps.into_iter().enumerate() {
            let st = if fast_diff && n > 0 {
                ObjectState::ExistsClean
            } else {
                ObjectState::Exists
            };
            self.store.update_snap_object_map(snap, objno, st).await?;
        }
        Ok(any)
    }

    /// Before a clone shrinks from `old` to `new_size` bytes, what librbd's TrimRequest
    /// does first while the overlap still reaches past the new end: the object the new
    /// end cuts is copied up with the cut zeroed on top (send_clean_boundary: a partial
    /// discard of a parent-backed object copies it up), and, when a copy-up reaches the
    /// child's snapshots, every object past the new end inside the overlap that the child
    /// lacks is copied up with a discard on top (send_copyup_objects), so the snapshots
    /// hold the parent's bytes themselves. Skipped, a deep flatten (which detaches the
    /// snapshots from the parent) would leave those snapshots reading zeros there. The
    /// heads of the copied-up objects are then removed with the others past the end.
    /// Returns whether the boundary object was copied up (the cut done with it: `resize`
    /// has nothing left to cut there).
    pub(super) async fn copyup_before_shrink(&self, new_size: u64, old: u64) -> Result<bool> {
        let Some(chain) = self.chain() else {
            return Ok(false);
        };
        let osize = self.header.object_size();
        let mut cut = false;
        if let Some((last, tail, len)) = super::resize::boundary_cut(new_size, old, osize) {
            cut = self
                .copyup(&chain, last, tail, len, CopyupOp::Zero, false)
                .await?;
        }
        let end = chain.overlap().min(old).div_ceil(osize);
        for objno in new_size.div_ceil(osize)..end {
            if self.store.copyup_snapshots(objno, &[1]).is_empty() {
                // No snapshot for a copy-up of this object to keep it for: none large
                // enough to hold it (Ceph), or it has its own version already for
                // every snapshot (directory store). Later objects may still need one.
                continue;
            }
            self.copyup(&chain, objno, 0, osize, CopyupOp::Discard, false)
                .await?;
        }
        Ok(cut)
    }

    /// A whole-object discard of an object the child has, inside the overlap where an
    /// ancestor may have data: cut to nothing instead of removed, so the parent's data
    /// cannot show through (librbd truncates instead of removing there too).
    pub(super) async fn discard_shadowing(
        &self,
        chain: &Chain<S>,
        objno: u64,
        fua: bool,
    ) -> Result<Shadow> {
        if self.parent_extent(chain, objno).is_none() {
            return Ok(Shadow::PastOverlap);
        }
        let _g = self.lock_for(objno).write().await;
        if self.copyup_undone(objno) {
            // A copy-up this waited for failed and took its mark back: the child lacks
            // the object after all, which only a copy-up (with its snapshots) creates.
            return Ok(Shadow::Restart);
        }
        self.mark_changed(objno);
        self.mark_exists(objno);
        bump(&self.stats.store_zeroes);
        if let Err(e) = self
            .store
            .copyup(objno, Bytes::new(), ObjectWrite::Truncate { len: 0 }, fua)
            .await
        {
            self.undo_copyup_mark(objno, false).await;
            return Err(e);
        }
        Ok(Shadow::Done)
    }

    /// Whether an object inside the overlap must be kept even when it holds no data:
    /// removing it would let an ancestor's data show through.
    pub(super) fn shadows_parent(&self, objno: u64) -> bool {
        self.parent_backed(objno)
            .is_some_and(|c| self.parent_extent(&c, objno).is_some())
    }

    /// How many bytes of object `objno` the parent overlap covers (it may end inside the
    /// object); None past it. The overlap alone decides, as librbd's has_parent: inside
    /// it librbd copies up for every change of an object the child lacks, discards and
    /// zeroes included, even where no ancestor holds data (it copies up nothing then, but
    /// the object is created), so the child's objects and maps are what librbd's would
    /// be. The ancestors' maps still spare the reads (`Chain::read_bytes`).
    fn parent_extent(&self, chain: &Chain<S>, objno: u64) -> Option<u64> {
        let start = objno << self.order();
        let plen = self
            .header
            .object_size()
            .min(chain.overlap().saturating_sub(start));
        (plen > 0).then_some(plen)
    }

    /// Copies object `objno` up if the child lacks it and it starts inside the overlap
    /// (for a flatten: and an ancestor may have data in it), with nothing changed on
    /// top: `op` is `CopyupOp::Flatten` or `CopyupOp::None` (copy-on-read).
    async fn copyup_whole(&self, objno: u64, op: CopyupOp) -> Result<bool> {
        let Some(c) = self.parent_backed(objno) else {
            return Ok(false);
        };
        // Where no ancestor's map says it has data, a flatten has nothing to copy (the
        // maps spare a flatten of a clone of a sparse parent a read per object).
        // Copy-on-read copies up all the same, as librbd's (its CopyupRequest "always
        // force[s] a copyup if CoR enabled"): the object is created, empty.
        let start = objno << self.order();
        if matches!(op, CopyupOp::Flatten)
            && !c.may_have(
                start,
                self.header
                    .object_size()
                    .min(c.overlap().saturating_sub(start)),
            )
        {
            return Ok(false);
        }
        self.dirty_before(|| self.needs_map_change(objno, ObjectState::Exists))
            .await?;
        self.copyup(&c, objno, 0, 0, op, false).await
    }

    /// `--copy-on-read` (librbd's rbd_clone_copy_on_read): from now on the first read of
    /// a parent-backed object the child lacks copies it up in the background, after the
    /// read is answered. Only for a writable clone; false otherwise (or when already on).
    pub fn enable_copy_on_read(self: &Arc<Self>) -> bool {
        if self.read_only || self.chain().is_none() {
            return false;
        }
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
        if self.cor.set(CopyOnRead::new(tx)).is_err() {
            return false;
        }
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            // However the worker ends (closed, image gone, a panic), nobody waits for
            // it any more.
            struct Stopped<T: ImageStore>(std::sync::Weak<Image<T>>);
            impl<T: ImageStore> Drop for Stopped<T> {
                fn drop(&mut self) {
                    if let Some(img) = self.0.upgrade() {
                        if let Some(c) = img.cor.get() {
                            c.stop();
                        }
                    }
                }
            }
            let _stopped = Stopped(me.clone());
            while let Some(objno) = rx.recv().await {
                let Some(img) = me.upgrade() else { break };
                let Some(cor) = img.cor.get() else { break };
                let g = img.gate.read().await;
                if *g {
                    // Closed: nothing more to copy.
                    break;
                }
                // The lock is another client's: the copy-up waits for the next read.
                let r = if img.lock_released() {
                    Ok(Default::default())
                } else {
                    img.copyup_whole(objno, CopyupOp::None).await
                };
                drop(g);
                if let Err(e) = r {
                    tracing::warn!("copy-on-read of object {objno} of {}: {e}", img.spec);
                }
                cor.finish(objno);
            }
        });
        true
    }

    /// Waits for the copy-on-read copy-ups asked so far, as librbd's flush and close
    /// wait for its in-flight copy-ups (AsyncOperation::flush). Only those: reads
    /// meanwhile may ask for more. Called outside `gate` (the copy-ups take it).
    pub(super) async fn wait_copy_on_read(&self) {
        if let Some(c) = self.cor.get() {
            c.wait().await;
        }
    }

    /// Flatten (`rbd flatten`): copies up every object inside the overlap that the
    /// child lacks and an ancestor has, then detaches the image from its parent and
    /// stops reading through the chain. `progress(done, total)` after each object.
    pub async fn flatten(&self, progress: impl FnMut(u64, u64)) -> Result<()> {
        self.check_writable()?;
        let spec = &self.spec;
        if self.shared {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!("{spec} is a shared image: flattening one is not supported; set shared=false and stop its other writers first"),
            ));
        }
        let Some(chain) = self.chain() else {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("{spec} is not a clone: nothing to flatten"),
            ));
        };
        let ctx = |e: Error| e.context(format!("flattening {spec}"));
        let total = chain.overlap().div_ceil(self.header.object_size());
        let chain = &chain;
        let one = |objno: u64| async move {
            // A shrink may have lowered the overlap meanwhile.
            if objno << self.order() < chain.overlap() {
                self.copyup_whole(objno, CopyupOp::Flatten).await?;
            }
            Ok(())
        };
        self.for_each_object(total, one, progress)
            .await
            .map_err(ctx)?;
        // The whole gate: no request is reading through the ancestors' handles when they
        // are closed (a read past them would fail on the directory store).
        let g = self.gate.write().await;
        if *g {
            return Err(Error::new(
                ErrorKind::Interrupted,
                format!("{spec} is closing; not flattened (its objects are copied up)"),
            ));
        }
        self.store.sync().await.map_err(ctx)?;
        let parent = self.store.header().parent;
        self.store.detach_parent().await.map_err(ctx)?;
        self.has_parent.store(false, Ordering::Release);
        let old = self.chain.write().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(c) = old {
            c.close().await;
        }
        drop(g);
        tracing::info!("flattened {spec}");
        if let Some(p) = parent {
            release_parent(&self.store, p).await;
        }
        Ok(())
    }
}

/// What goes with a clone's last link to its parent, as librbd's DetachChildRequest
/// does after a flatten or a removal: the parent's snapshot, if it is in the trash
/// namespace (`rbd snap rm` of a snapshot that format-2 clones use moves it there) and no
/// clone uses it any more; then, once that parent has no snapshot left, the parent image
/// itself if `rbd rm` with `rbd_move_parent_to_trash_on_remove` put it in the trash to
/// wait for its clones (`ImageStore::remove_trashed_parent`); and so on up the chain,
/// since a parent removed so was itself maybe the last clone of its own parent.
/// `via` is any handle of the store the parent lives in (the child's, even after the
/// child was removed). Best effort, as librbd's: the flatten or removal is done whatever
/// happens here. A parent that a live client holds is asked to remove the snapshot
/// itself (librbd's owner, or ours, does); if it cannot, the snapshot stays, with a
/// warning saying so.
pub async fn release_parent<S: ImageStore>(via: &S, parent: ParentInfo) {
    let mut next = Some(parent);
    while let Some(parent) = next.take() {
        let what = format!("snapshot {} (id {})", parent.spec, parent.snap_id);
        // A look first, without the lock: most parents' snapshots are not in the trash,
        // and a read-write open would take the parent's lock and flag its map.
        let peek = match via.open_parent_head(&parent, OpenMode::ReadOnly).await {
            Ok(p) => p,
            Err(e) if e.kind == ErrorKind::Unsupported => return,
            Err(e) => {
                tracing::warn!("{what} may stay in the trash: {e}");
                return;
            }
        };
        let h = peek.header();
        let _ = peek.close().await;
        if !is_trashed(&h, parent.snap_id) {
            return;
        }
        let r = async {
            let head = match via.open_parent_head(&parent, OpenMode::ReadWrite).await {
                Ok(head) => head,
                // A live client holds the parent: ask it, as librbd's DetachChildRequest
                // does. Its owner answers EBUSY while other clones use the snapshot, and
                // ENOENT when another client removed it first (done, as librbd counts it).
                Err(e) if e.kind == ErrorKind::Busy => {
                    let Some(action) = trash_removal(&h, parent.snap_id) else {
                        return Ok(false);
                    };
                    return match via.ask_parent_holder(&parent, &action).await {
                        Ok(()) => Ok(true),
                        Err(e) if e.kind == ErrorKind::NotFound => Ok(true),
                        // Still used, or no owner to ask (shared writers): the message
                        // says which.
                        Err(e) if e.kind == ErrorKind::Busy => {
                            tracing::info!("{what} stays in the trash: {e}");
                            Ok(false)
                        }
                        Err(e) => Err(e),
                    };
                }
                Err(e) => return Err(e),
            };
            let spec = ImageSpec {
                snap: None,
                ..parent.spec.clone()
            };
            let opts = super::OpenOptions {
                read_only: false,
                shared_default: false,
                checkpoint_idle: None,
            };
            let head = Image::from_store_image(head, &spec, &opts).await?;
            remove_trashed_snap(head, parent.snap_id).await
        }
        .await;
        match r {
            Ok(true) => tracing::info!("{what} left the trash with its last clone"),
            // Other clones still use it: it and its image stay.
            Ok(false) => return,
            Err(e) => {
                tracing::warn!("{what} stays in the trash: {e}");
                return;
            }
        }
        let image = ImageSpec {
            snap: None,
            ..parent.spec.clone()
        };
        match via.remove_trashed_parent(&parent).await {
            Ok(true) => {
                tracing::info!(
                    "{image} (id {}) left the trash with its last clone",
                    parent.image_id
                );
                // It may have been the last clone of a parent of its own.
                next = h.parent;
            }
            Ok(false) => {}
            Err(e) => tracing::warn!("{image} (id {}) stays in the trash: {e}", parent.image_id),
        }
    }
}

/// The request that asks the owner of the image `h` describes to remove its trashed
/// snapshot `snap_id`, named as librbd's DetachChildRequest names it: its UUID name and
/// its whole namespace (librbd's owner looks it up by the namespace's type and the name);
/// `None` if it is not in the trash.
fn trash_removal(h: &ImageHeader, snap_id: u64) -> Option<crate::store::OwnerAction> {
    h.snaps
        .iter()
        .find(|s| s.id == snap_id)
        .and_then(|s| match &s.namespace {
            SnapNamespace::Trash {
                original,
                original_type,
            } => Some(crate::store::OwnerAction::TrashSnapRemove {
                name: s.name.clone(),
                original: original.clone(),
                original_type: *original_type,
            }),
            _ => None,
        })
}

/// Whether snapshot `snap_id` is in the trash namespace of the image `h` describes.
fn is_trashed(h: &ImageHeader, snap_id: u64) -> bool {
    h.snaps
        .iter()
        .any(|s| s.id == snap_id && matches!(s.namespace, SnapNamespace::Trash { .. }))
}

/// Removes `head`'s snapshot `snap_id` if it is in the trash and no clone uses it any
/// more (the store keeps it while one does: `false`), then closes `head`.
pub(crate) async fn remove_trashed_snap<S: ImageStore>(
    head: Image<S>,
    snap_id: u64,
) -> Result<bool> {
    let r = if is_trashed(head.header(), snap_id) {
        head.snap_remove_id(snap_id).await
    } else {
        Ok(false)
    };
    let c = head.close().await;
    let removed = r?;
    c.map(|()| removed)
}

#[cfg(test)]
mod dense_tests {
    use super::*;

    fn data(n: usize, b: u8) -> ReadChunk {
        ReadChunk::Data(Bytes::from(vec![b; n]))
    }

    /// The copy-up's extent map: bytes read (data, zeros read densely) are extents,
    /// holes filled in between are not, trailing holes are dropped.
    #[test]
    fn extents_are_what_was_read() {
        let mut d = Dense::default();
        d.extend([ReadChunk::Hole(10), data(5, 1)], false);
        d.extend([ReadChunk::Hole(3), data(2, 2)], true);
        d.extend([ReadChunk::Hole(4), data(1, 3), ReadChunk::Hole(7)], false);
        assert_eq!(d.extents, vec![(10, 10), (24, 1)]);
        assert_eq!(d.bytes.len(), 25, "the trailing hole is not copied up");
        assert_eq!(&d.bytes[10..15], &[1; 5]);
        assert_eq!(
            &d.bytes[15..18],
            &[0; 3],
            "read densely: part of the extent"
        );
        assert_eq!(&d.bytes[20..24], &[0; 4], "a hole between extents: zeros");
        // A hole pending before a dense one stays a hole.
        let mut d = Dense::default();
        d.extend([ReadChunk::Hole(8)], false);
        d.extend([ReadChunk::Hole(4)], true);
        assert_eq!((d.extents, d.bytes.len()), (vec![(8, 4)], 12));
    }
}
