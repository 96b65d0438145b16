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

use super::map::load_object_map;
use super::{FlagState, Image};
use crate::error::{Error, ErrorKind, Result};
use crate::store::{ImageStore, RBD_FLAG_OBJECT_MAP_INVALID};
use std::sync::atomic::Ordering;
use std::sync::Arc;

impl<S: ImageStore> Image<S> {
    /// Not `--exclusive`: requests for the lock from other clients are handed to us
    /// (`OwnerRequest::ReleaseLock`). Read-only and shared opens hold no exclusive lock.
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
    /// re-reads the header (the other owner may have resized, taken snapshots), loads
    /// the map it left or rebuilds it, and lets requests in again.
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
        let header = self.store.refresh_header().await.map_err(ctx)?;
        let size = header.size;
        if self.map().is_some() {
            let (map, source) = load_object_map(&self.store, spec, &header, None, size)
                .await
                .map_err(ctx)?;
            *self.map.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(map));
            tracing::info!(
                "{spec}: lock taken back after {:.1} ms; object map {}",
                t0.elapsed().as_secs_f64() * 1e3,
                match source {
                    super::MapSource::Loaded =>
                        "loaded (left clean by the other owner)".to_string(),
                    super::MapSource::Rebuilt(why) => format!("rebuilt ({why})"),
                }
            );
        } else {
            tracing::info!(
                "{spec}: lock taken back after {:.1} ms",
                t0.elapsed().as_secs_f64() * 1e3
            );
        }
        // A flag the other owner left set (it crashed, or it keeps no map) is ours to
        // clear at close, once our map is written; clear ones are set again by the next
        // map-changing request, as after a checkpoint.
        let flagged = header.flags & RBD_FLAG_OBJECT_MAP_INVALID != 0;
        self.dirty_flag.store(flagged, Ordering::Release);
        self.flag_tx.send_replace(if flagged {
            FlagState::Dirty
        } else {
            FlagState::Clean
        });
        if size != self.size() {
            tracing::info!(
                "{spec}: resized from {} to {size} bytes by the other owner",
                self.size()
            );
            if let Some(c) = self.chain() {
                c.shrink_overlap(size);
            }
            self.size.store(size, Ordering::Release);
            self.size_tx.send_replace(size);
        }
        self.released.store(false, Ordering::Release);
        drop(g);
        Ok(())
    }
}
