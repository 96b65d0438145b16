//! The dirty-flag lifecycle: OBJECT_MAP_INVALID set before the first map-changing
//! request, cleared by a checkpoint (the last client left, or idle) and at close.

use super::map::invalid_flags;
use super::{FlagState, Image};
use crate::error::{Error, ErrorKind, Result};
use crate::store::{
    ImageStore, RBD_FEATURE_OBJECT_MAP, RBD_FLAG_FAST_DIFF_INVALID, RBD_FLAG_OBJECT_MAP_INVALID,
};
use objmap::ObjectState;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

impl<S: ImageStore> Image<S> {
    fn flag_mask(&self) -> u64 {
        invalid_flags(self.features())
    }

    /// Whether writes through this handle make the on-disk map stale: the image has an
    /// object map. With our own map in memory that is the usual dirty flag; without one
    /// (a shared image) nothing keeps the on-disk map up to date, so it must be flagged
    /// invalid before the first write and stay so after close: otherwise the next
    /// non-shared open (or librbd) would trust a map that misses every object the shared
    /// writers created, and read those as zeros.
    fn writes_stale_map(&self) -> bool {
        self.features() & RBD_FEATURE_OBJECT_MAP != 0
    }

    /// Sets the dirty flag in the header if it is not set yet (at open, and at the first
    /// map-changing request after a checkpoint). Cheap when already set.
    pub(super) async fn ensure_dirty(&self) -> Result<()> {
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
    pub(super) fn needs_map_change(&self, objno: u64, new: ObjectState) -> bool {
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
    pub(super) async fn dirty_before(&self, changes: impl FnOnce() -> bool) -> Result<()> {
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
    pub(super) fn discard_changes_map(&self, offset: u64, length: u64) -> bool {
        let Some(map) = self.map() else {
            return true;
        };
        if length == 0 {
            return false;
        }
        let order = self.order();
        let end = offset + length;
        let (first, last) = (offset >> order, (end - 1) >> order);
        // Whole as `discard_piece` means it: the whole object (the image's last object,
        // when partial, is zeroed, never removed).
        let whole = |objno: u64| {
            let (o_lo, o_len) = (objno << order, 1u64 << order);
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
    pub(super) async fn mark_clean(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.store.sync().await?;
        if let Some(map) = self.map() {
            // Callers wait for the rebuild first (`whole_map`); a partial map is never
            // written, nor the flag cleared over it.
            if !self.map_is_whole() {
                return Err(Error::new(
                    ErrorKind::Busy,
                    format!(
                        "the object map of {} is still being rebuilt: not written, the dirty flag stays set",
                        self.spec
                    ),
                ));
            }
            let _g = self.flag_lock.lock().await;
            if self.dirty_flag.load(Ordering::Acquire) {
                self.store.write_object_map(map.encode()).await?;
                // Both flags go, whatever the features: a valid map was just written, and
                // a fast-diff flag left by a feature change cut short (fast-diff turned off,
                // the owner killed before clearing it) would otherwise stay for good.
                let all = RBD_FLAG_OBJECT_MAP_INVALID | RBD_FLAG_FAST_DIFF_INVALID;
                self.store.set_flags(0, self.flag_mask() | all).await?;
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
        if !self.read_only {
            self.whole_map(&format!("checkpointing {}", self.spec))
                .await?;
        }
        let g = self.gate.write().await;
        // A fenced handle (its lock broken: logged once by the store) must not clear the
        // flag, and each client leaving need not say so again.
        if *g || self.store.check_usable().is_err() {
            return Ok(());
        }
        self.mark_clean()
            .await
            .map_err(|e| e.context(format!("checkpointing {}", self.spec)))
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
                // Not in a tight loop after a failure: wait another idle period.
                let postpone = |img: &Self| {
                    let ns = img.opened.elapsed().as_nanos().min(u64::MAX as u128) as u64;
                    img.last_change.fetch_max(ns, Ordering::Relaxed);
                };
                // A rebuild under way ends first; one that fails (it logs why) keeps the
                // flag set and is tried again after another idle period (and by the
                // background task, and at close).
                if img.rebuild_pending() && img.finish_rebuild().await.is_err() {
                    postpone(&img);
                    continue;
                }
                match img.checkpoint().await {
                    Ok(()) => tracing::debug!(
                        "{}: idle for {idle:?}: object map written, flags cleared",
                        img.spec
                    ),
                    Err(e) => {
                        tracing::warn!("{e} (the dirty flag stays set; retried when idle)");
                        postpone(&img);
                    }
                }
            }
        }))
    }
}
