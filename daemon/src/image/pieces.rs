//! Requests split into pieces of one object each, served against the map and the
//! store; block status extents from the map.

use super::clone::{CopyupOp, Shadow};
use super::{bump, Image};
use crate::error::{Error, ErrorKind, Result};
use crate::store::ImageStore;
use bytes::Bytes;
use futures_util::future::join_all;
use nbd_protocol::backend::{STATE_HOLE, STATE_ZERO};
use nbd_protocol::{Extent, ReadChunk};
use objmap::ObjectState;
use std::sync::atomic::Ordering;

/// Runs the pieces of one change together and waits for every one of them, failed or
/// not: the first error, once none is left in flight (`try_join_all` would drop the
/// others at the first error, leaving their store calls running after the answer).
pub(super) async fn all_pieces<F>(pieces: impl IntoIterator<Item = F>) -> Result<()>
where
    F: std::future::Future<Output = Result<()>>,
{
    join_all(pieces).await.into_iter().collect()
}

/// How many times a change starts over after a copy-up it waited for failed (each
/// time another request's copy-up of the same object failed) before it fails too.
const COPYUP_TRIES: usize = 4;

/// The error of a change that started over `COPYUP_TRIES` times.
fn copyups_failed(objno: u64) -> Error {
    Error::new(
        ErrorKind::Io,
        format!(
            "object {objno}: the copy-up from the parent failed {COPYUP_TRIES} times under \
             this change (other requests' copy-ups of it); retry"
        ),
    )
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

impl<S: ImageStore> Image<S> {
    pub(super) fn is_nonexistent(&self, objno: u64) -> bool {
        // While the lock is another client's (handed over, reads served without it)
        // the map in memory is stale: never trusted for a hole.
        if self.released.load(Ordering::Acquire) {
            return false;
        }
        self.map_now()
            .as_deref()
            .is_some_and(|m| m.get(objno) == ObjectState::Nonexistent)
    }

    /// Whether the map in memory says object `objno` exists (false without one).
    fn map_has(&self, objno: u64) -> bool {
        self.map_now()
            .as_deref()
            .is_some_and(|m| super::clone::map_says_exists(m, objno))
    }

    /// Like `mark_exists` for a change to an object that is known to exist (a partial
    /// zero): NONEXISTENT stays so (a removal won the race; the store's zero of a
    /// missing object does nothing), anything else becomes EXISTS.
    pub(super) fn mark_changed(&self, objno: u64) {
        self.touch(objno);
        if let Some(m) = self.map_now().as_deref() {
            let st = m.get(objno);
            if st != ObjectState::Exists && st != ObjectState::Nonexistent {
                m.set(objno, ObjectState::Exists);
            }
        }
    }

    pub(super) fn mark_exists(&self, objno: u64) {
        self.touch(objno);
        if let Some(m) = self.map_now().as_deref() {
            if m.get(objno) != ObjectState::Exists {
                m.set(objno, ObjectState::Exists);
            }
        }
    }

    pub(super) async fn read_piece(&self, p: Piece) -> Result<Vec<ReadChunk>> {
        let len = p.len as u32;
        if self.is_nonexistent(p.objno) {
            self.store.check_usable()?;
            if self.has_parent.load(Ordering::Acquire) {
                return self.read_parent_piece(p).await;
            }
            bump(&self.stats.map_reads);
            return Ok(vec![ReadChunk::Hole(len)]);
        }
        bump(&self.stats.store_reads);
        Ok(
            match self.store.read(p.objno, p.off, p.len, self.snap).await? {
                // At a snapshot whose map says the object exists: the snapshot may
                // have been removed since it was opened (see Level::check_snapshot).
                None if let Some(id) = self.snap
                    && self.map_has(p.objno) =>
                {
                    super::clone::check_snapshot(&self.store, id).await?;
                    if self.has_parent.load(Ordering::Acquire) {
                        return self.read_parent_piece(p).await;
                    }
                    vec![ReadChunk::Hole(len)]
                }
                // A clone's object not there (no map, or a copy-up not done yet):
                // the parent's data is what it holds.
                None if self.has_parent.load(Ordering::Acquire) => {
                    return self.read_parent_piece(p).await
                }
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

    pub(super) async fn write_piece(&self, p: Piece, data: Bytes, fua: bool) -> Result<()> {
        for _ in 0..COPYUP_TRIES {
            if let Some(c) = self.parent_backed(p.objno) {
                let op = CopyupOp::Write(data.clone());
                if self.copyup(&c, p.objno, p.off, p.len, op, fua).await? {
                    return Ok(());
                }
            }
            let _g = self.lock_for(p.objno).read().await;
            if self.copyup_undone(p.objno) {
                continue;
            }
            self.mark_exists(p.objno);
            bump(&self.stats.store_writes);
            return self.store.write(p.objno, p.off, data, fua).await;
        }
        Err(copyups_failed(p.objno))
    }

    async fn discard_piece(&self, p: Piece, fua: bool, no_hole: bool) -> Result<()> {
        if no_hole {
            let zeros = Bytes::from(vec![0u8; p.len as usize]);
            return self.write_piece(p, zeros, fua).await;
        }
        // Whole means the whole object, as librbd's m_full_object: the last object of an
        // image whose size is not a multiple of the object size is never whole, and a
        // discard of all of its bytes zeroes them (librbd's DISCARD_ACTION_ZERO), leaving
        // the object there, as `rbd diff` and `rbd du` then show.
        let whole = p.off == 0 && p.len == self.header.object_size();
        for _ in 0..COPYUP_TRIES {
            if self.discard_piece_once(p, fua, whole).await? {
                return Ok(());
            }
        }
        Err(copyups_failed(p.objno))
    }

    /// One try of `discard_piece`: false when a copy-up it waited for failed and took
    /// its mark back (`copyup_undone`), so that it must start over.
    async fn discard_piece_once(&self, p: Piece, fua: bool, whole: bool) -> Result<bool> {
        if let Some(c) = self.parent_backed(p.objno) {
            // The child lacks it and an ancestor has it: copied up with the discard
            // applied (an empty object for a whole one), never left to show the parent.
            let op = if whole {
                CopyupOp::Discard
            } else {
                CopyupOp::Zero
            };
            if self.copyup(&c, p.objno, p.off, p.len, op, fua).await? {
                return Ok(true);
            }
            if self.copyup_undone(p.objno) {
                return Ok(false);
            }
            if whole {
                match self.discard_shadowing(&c, p.objno, fua).await? {
                    Shadow::Done => return Ok(true),
                    Shadow::Restart => return Ok(false),
                    Shadow::PastOverlap => {}
                }
            }
        }
        if self.is_nonexistent(p.objno) {
            self.store.check_usable()?;
            bump(&self.stats.skipped_removes);
            return Ok(true);
        }
        if whole {
            let _g = self.lock_for(p.objno).write().await;
            // Known from here: the listing of a rebuild may have seen it still there.
            self.touch(p.objno);
            bump(&self.stats.store_removes);
            self.store.remove(p.objno, fua).await?;
            if let Some(m) = self.map_now().as_deref() {
                m.set(p.objno, ObjectState::Nonexistent);
            }
            Ok(true)
        } else {
            self.learn_if_unknown(p.objno).await?;
            {
                let _g = self.lock_for(p.objno).read().await;
                if self.copyup_undone(p.objno) {
                    return Ok(false);
                }
                // Zeroing part of an object changes its bytes: an EXISTS_CLEAN object
                // (unchanged since the newest snapshot) becomes EXISTS, as librbd marks
                // it, or fast-diff (`rbd diff --whole-object --from-snap`, incremental
                // backups) would miss the change. Marked before the store call, like a
                // write, so the map never claims "unchanged" for changed bytes.
                self.mark_changed(p.objno);
                bump(&self.stats.store_zeroes);
                self.store.zero(p.objno, p.off, p.len, fua).await?;
            }
            self.remove_if_emptied(p.objno, fua).await?;
            Ok(true)
        }
    }

    /// While the map is rebuilt, an object a partial zero is about to change learns its
    /// state from the store first: a zero neither creates nor removes it, so marking it
    /// EXISTS unasked would leave a map that claims an object the store lacks. Under
    /// the object's write lock, so no write creates it between the look and the mark.
    async fn learn_if_unknown(&self, objno: u64) -> Result<()> {
        if self.known(objno) {
            return Ok(());
        }
        let _g = self.lock_for(objno).write().await;
        if self.known(objno) {
            return Ok(());
        }
        let exists = self.store_has(objno).await?;
        self.touch(objno);
        if let Some(m) = self.map_now().as_deref() {
            m.set(
                objno,
                if exists {
                    ObjectState::Exists
                } else {
                    ObjectState::Nonexistent
                },
            );
        }
        Ok(())
    }

    /// An object that partial zeroes have left without any data (every byte punched
    /// out) is removed, as a whole-object discard would have removed it: the file
    /// servers punch such ranges too, and a removed object reads as zeros for free.
    /// Only where the store can tell cheaply (the directory store: SEEK_DATA finds
    /// nothing), and only for an exclusive writer: a shared image's other writers
    /// could write the object between the check and the removal.
    async fn remove_if_emptied(&self, objno: u64, fua: bool) -> Result<()> {
        // Inside a clone's overlap an empty object hides the parent's data: kept.
        if self.shared || self.shadows_parent(objno) || !self.store.holds_no_data(objno).await? {
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
        self.touch(objno);
        bump(&self.stats.store_removes);
        self.store.remove(objno, fua).await?;
        if let Some(m) = self.map_now().as_deref() {
            m.set(objno, ObjectState::Nonexistent);
        }
        Ok(())
    }

    pub(super) async fn discard(
        &self,
        offset: u64,
        length: u32,
        fua: bool,
        no_hole: bool,
    ) -> Result<()> {
        self.check_writable()?;
        let length = length as u64;
        self.dirty_before(|| {
            if no_hole {
                // Zeros are written: every object touched ends EXISTS.
                split(self.order(), offset, length)
                    .iter()
                    .any(|p| self.needs_map_change(p.objno, ObjectState::Exists))
            } else {
                // A clone's discard inside the overlap may copy objects up.
                self.discard_changes_map(offset, length)
                    || self.parent_backed(offset >> self.order()).is_some()
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
            if run.state == ObjectState::Nonexistent && self.parent_backed(run.start).is_none() {
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
        all_pieces(
            pieces
                .into_iter()
                .map(|p| self.discard_piece(p, fua, no_hole)),
        )
        .await
    }

    pub(super) fn extents(&self, offset: u64, length: u64) -> Vec<Extent> {
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
        let push = |out: &mut Vec<Extent>, len: u64, flags: u32| match out.last_mut() {
            Some(l) if l.flags == flags => l.length += len,
            _ => out.push(Extent { length: len, flags }),
        };
        let chain = if self.has_parent.load(Ordering::Acquire) {
            self.chain()
        } else {
            None
        };
        let mut pos = offset;
        for run in map.runs(first..last + 1) {
            let run_end = ((run.start + run.len) << order).min(end);
            if run_end <= pos {
                continue;
            }
            if let (Some(c), ObjectState::Nonexistent) = (&chain, run.state) {
                // A clone's objects it lacks: data where an ancestor may have some
                // (inside the overlap), holes elsewhere.
                let overlap = c.overlap();
                for objno in run.start..run.end() {
                    let lo = (objno << order).max(pos);
                    let hi = ((objno + 1) << order).min(run_end);
                    if hi <= lo {
                        continue;
                    }
                    let backed = hi.min(overlap).max(lo);
                    if backed > lo && c.may_have(objno << order, backed - (objno << order)) {
                        push(&mut out, backed - lo, 0);
                        if hi > backed {
                            push(&mut out, hi - backed, STATE_HOLE | STATE_ZERO);
                        }
                    } else {
                        push(&mut out, hi - lo, STATE_HOLE | STATE_ZERO);
                    }
                }
                pos = run_end;
                continue;
            }
            let flags = if run.state == ObjectState::Nonexistent {
                STATE_HOLE | STATE_ZERO
            } else {
                0
            };
            push(&mut out, run_end - pos, flags);
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
