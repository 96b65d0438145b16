//! Cooperative hand-over of the exclusive lock (librbd's default; `--exclusive` keeps
//! it): another client asks for the lock, we hold new requests, let those in flight end,
//! write the object map and clear the dirty flag, and release. The other owner then finds
//! a clean map and loads it, with no rebuild. The next request of our own clients takes
//! the lock back (asking the other owner, as librbd does), reloads the map that owner
//! left (or rebuilds it, when that owner did not close cleanly) and goes on.
//!
//! Why no acknowledged write can be lost or reordered across a hand-over: the release
//! holds `gate` exclusively, so every request that was acknowledged is complete and
//! synced before the lock goes, and no request runs while `released` is set (each
//! checks it under `gate` in `enter` and takes the lock back first); the other owner's
//! writes are all acknowledged to its clients before it releases in turn.

use super::map::{invalid_flags, load_object_map, MapSource};
use super::{FlagState, Image};
use crate::error::{Error, ErrorKind, Result};
use crate::store::{
    ImageHeader, ImageStore, RBD_FEATURE_EXCLUSIVE_LOCK, RBD_FEATURE_OBJECT_MAP,
    RBD_FLAG_OBJECT_MAP_INVALID,
};
use std::sync::atomic::Ordering;
use std::sync::Arc;

impl<S: ImageStore> Image<S> {
    /// Not `--exclusive`: requests for the lock from other clients are handed to us
    /// (`OwnerAction::ReleaseLock`). Read-only and shared opens hold no exclusive lock.
    pub fn enable_handover(&self) {
        if !self.read_only && !self.shared {
            self.store.enable_handover();
        }
    }

    /// Whether the lock is another client's now (handed over, not taken back yet).
    pub fn lock_released(&self) -> bool {
        self.released.load(Ordering::Acquire)
    }

    /// Hands the lock over: every request held and drained, the map (whole: a rebuild
    /// under way ends first) written and the flag cleared, then the store releases.
    pub(super) async fn hand_over(&self) -> Result<()> {
        let spec = &self.spec;
        let _h = self.handover.lock().await;
        if self.released.load(Ordering::Acquire) {
            return Ok(());
        }
        let ctx = |e: Error| e.context(format!("handing the lock of {spec} over"));
        self.whole_map("handing the lock over").await.map_err(ctx)?;
        let t0 = std::time::Instant::now();
        let g = self.gate.write().await;
        if *g {
            return Err(Error::new(
                ErrorKind::Io,
                format!("{spec} is closing; the lock goes with the close"),
            ));
        }
        // A fenced handle (its lock already broken) must not write its map.
        self.store.check_usable().map_err(ctx)?;
        self.mark_clean().await.map_err(ctx)?;
        self.store.release_lock().await.map_err(ctx)?;
        self.released.store(true, Ordering::Release);
        drop(g);
        tracing::info!(
            "{spec}: lock handed over after {:.1} ms (object map written, flag cleared)",
            t0.elapsed().as_secs_f64() * 1e3
        );
        Ok(())
    }

    /// Takes the lock back for a request of our own clients: asks the owner (bounded),
    /// then adopts what the other owner may have changed meanwhile (see `adopt`). On any
    /// failure after the lock is ours again it is released again, so this layer and the
    /// store never disagree on who holds it; the request fails and the next one asks.
    pub(super) async fn take_lock_back(&self) -> Result<()> {
        let spec = &self.spec;
        let _h = self.handover.lock().await;
        if !self.released.load(Ordering::Acquire) {
            return Ok(());
        }
        let ctx = |e: Error| e.context(format!("taking the lock of {spec} back"));
        let g = self.gate.write().await;
        if *g {
            return Err(Error::new(ErrorKind::Io, format!("{spec} is closing")));
        }
        let t0 = std::time::Instant::now();
        self.store.reacquire_lock().await.map_err(ctx)?;
        if let Err(e) = self.adopt(t0).await {
            if !self.takeback_failing.swap(true, Ordering::AcqRel) {
                tracing::warn!(
                    "{spec}: cannot take the lock back: {e}; requests that need it fail \
                     until that changes (each asks again)"
                );
            }
            if let Err(e2) = self.store.release_lock().await {
                tracing::warn!("{spec}: giving the lock up again after a failed take-back: {e2}");
            }
            return Err(ctx(e));
        }
        if self.takeback_failing.swap(false, Ordering::AcqRel) {
            tracing::info!("{spec}: the lock taken back again; requests go on");
        }
        self.released.store(false, Ordering::Release);
        drop(g);
        Ok(())
    }

    /// After a take-back: the header re-read (the snapshot context with it), and what
    /// the other owner may have changed adopted (`adopt_header`).
    async fn adopt(&self, t0: std::time::Instant) -> Result<()> {
        let spec = &self.spec;
        let header = self.store.refresh_header().await?;
        let had = self.features();
        let source = self.adopt_header(&header).await?;
        let features = header.features;
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        match source {
            Some(MapSource::Loaded) => tracing::info!(
                "{spec}: lock taken back after {ms:.1} ms; object map loaded (left clean by the other owner)"
            ),
            Some(MapSource::Rebuilt(why)) => tracing::info!(
                "{spec}: lock taken back after {ms:.1} ms; object map rebuilt ({why})"
            ),
            None => tracing::info!("{spec}: lock taken back after {ms:.1} ms"),
        }
        if had != features {
            tracing::info!(
                "{spec}: features changed by the other owner: {had:#x} -> {features:#x}"
            );
        }
        Ok(())
    }

    /// What another client changed of the image adopted from `header` (under `gate`):
    /// the features (object-map switched on or off; exclusive-lock switched off leaves
    /// the image served lock-less, as librbd goes on), the size, the clone's parent and
    /// overlap (a flatten, a shrink and a grow, a rollback), and the map it left (loaded
    /// when valid, else rebuilt). Returns where the map came from, if one is kept.
    async fn adopt_header(&self, header: &ImageHeader) -> Result<Option<MapSource>> {
        let spec = &self.spec;
        let features = header.features;
        let size = header.size;
        self.features.store(features, Ordering::Release);
        let keeps_map = features & RBD_FEATURE_OBJECT_MAP != 0 && !self.shared;
        let mut dirty = false;
        let source = if keeps_map {
            let (map, source) = load_object_map(&self.store, spec, header, None, size).await?;
            *self.map.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(map));
            let flagged = header.flags & RBD_FLAG_OBJECT_MAP_INVALID != 0;
            if !flagged && matches!(source, MapSource::Rebuilt(_)) {
                // Rebuilt with the flag clear (the map missing, corrupt, the wrong size):
                // flagged now, so a crash before ours is written never trusts that one.
                let mask = invalid_flags(features);
                self.store.set_flags(mask, mask).await?;
            }
            dirty = flagged || matches!(source, MapSource::Rebuilt(_));
            if matches!(source, MapSource::Loaded) {
                // The other owner's map (librbd's may claim what it never copied up).
                self.suspect_claims();
            }
            Some(source)
        } else {
            *self.map.write().unwrap_or_else(|p| p.into_inner()) = None;
            None
        };
        // A flag set (by us, or left by an owner that crashed) is ours to clear at close,
        // once our map is written; clear ones are set again by the next map-changing
        // request, as after a checkpoint.
        self.dirty_flag.store(dirty, Ordering::Release);
        self.flag_tx.send_replace(if dirty {
            FlagState::Dirty
        } else {
            FlagState::Clean
        });
        self.follow_shape(header).await?;
        Ok(source)
    }

    /// What the other owner changed of the image's shape, followed: the size (so
    /// /dev/nbdX follows a resize), the clone's overlap, a flatten. At a take-back, and
    /// while the lock is elsewhere (`follow_header_updates`).
    async fn follow_shape(&self, header: &ImageHeader) -> Result<()> {
        let spec = &self.spec;
        let size = header.size;
        match (&header.parent, self.chain()) {
            (Some(p), Some(c)) => c.set_overlap(p.overlap.min(size)),
            (None, Some(_)) => {
                // Flattened by the other owner: nothing is read through the parent any more.
                self.has_parent.store(false, Ordering::Release);
                let old = self.chain.write().unwrap_or_else(|p| p.into_inner()).take();
                if let Some(c) = old {
                    c.close().await;
                }
                tracing::info!("{spec}: flattened by another client");
            }
            (Some(_), None) => {
                return Err(Error::new(
                    ErrorKind::Unsupported,
                    format!("{spec} became a clone while another client held its lock"),
                ))
            }
            (None, None) => {}
        }
        if size != self.size() {
            tracing::info!(
                "{spec}: resized from {} to {size} bytes by another client",
                self.size()
            );
            self.size.store(size, Ordering::Release);
            self.size_tx.send_replace(size);
        }
        Ok(())
    }

    /// Follows the header updates other clients announce, as librbd refreshes an image
    /// on them: while the lock is another client's, a resize or a flatten by the owner
    /// shows at once (the device's size follows), not at our next write; the rest
    /// (features, the map, the snapshot context) is adopted when the lock comes back. An
    /// image without exclusive-lock has no owner to ask: other clients resize, flatten
    /// and change features themselves while we serve it, and all of it is adopted as
    /// announced (the store's snapshot context follows in the store itself). Ends with
    /// the image.
    pub fn follow_header_updates(self: &Arc<Self>) {
        let Some(mut rx) = self.store.header_updates() else {
            return;
        };
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let Some(img) = me.upgrade() else { break };
                img.follow_header_update().await;
            }
        });
    }

    async fn follow_header_update(&self) {
        // Not while the lock is taken back or handed over (they adopt the header too).
        let _h = self.handover.lock().await;
        // Ours and lock-less (before or after this update: exclusive-lock switched off by
        // us or on again by another client), else the changes were ours. Looked at once
        // before draining the requests (an owner's own updates need no drain), and again
        // after: a resize or feature change of ours (they hold `gate`, not `handover`)
        // may have ended in between, and the header read before it is stale.
        let lockless = |header: &ImageHeader| {
            let f = self.features();
            (f | header.features) & RBD_FEATURE_EXCLUSIVE_LOCK == 0
                || (f ^ header.features) & RBD_FEATURE_EXCLUSIVE_LOCK != 0
        };
        let released = self.released.load(Ordering::Acquire);
        if !released && !lockless(&self.store.header()) {
            return;
        }
        let g = self.gate.write().await;
        if *g {
            return;
        }
        let header = self.store.header();
        if !released && !lockless(&header) {
            return;
        }
        let r = if released {
            self.follow_shape(&header).await
        } else {
            let had = self.features();
            let r = self.adopt_header(&header).await.map(|_| ());
            if had != header.features {
                tracing::info!(
                    "{}: features changed by another client: {had:#x} -> {:#x}",
                    self.spec,
                    header.features
                );
            }
            r
        };
        if let Err(e) = r {
            tracing::warn!(
                "{}: following another client's header update: {e}",
                self.spec
            );
        }
        drop(g);
    }
}
