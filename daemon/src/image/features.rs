//! `rbd feature enable|disable` asked of the lock owner, for the features that concern the
//! map we keep: object-map, fast-diff, and deep-flatten and exclusive-lock (disable only,
//! as librbd). Every request is held off meanwhile. Enabling object-map builds the map from
//! the objects that exist and writes it (librbd leaves it flagged invalid until `rbd
//! object-map rebuild`); disabling it removes every object map and stops keeping one.
//! Disabling fast-diff disables object-map too, as librbd's owner does. Disabling
//! exclusive-lock (object-map and journaling off first, as librbd's owner insists) leaves
//! the image served lock-less, as librbd's owner goes on: other clients may then write
//! beside us, and their header updates (resize, flatten) are followed as they come
//! (`follow_header_updates`); the lock itself is kept until close, as librbd 16 keeps it.
//! The other features change what this daemon is (journaling, ...) and are refused by the
//! store.

use super::map::{invalid_flags, rebuild_map};
use super::Image;
use crate::error::{Error, ErrorKind, Result};
use crate::store::{
    ImageStore, RBD_FEATURE_DEEP_FLATTEN, RBD_FEATURE_EXCLUSIVE_LOCK, RBD_FEATURE_FAST_DIFF,
    RBD_FEATURE_JOURNALING, RBD_FEATURE_OBJECT_MAP, RBD_FLAG_FAST_DIFF_INVALID,
    RBD_FLAG_OBJECT_MAP_INVALID,
};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// What `update_features` changes.
pub const UPDATABLE_FEATURES: u64 = RBD_FEATURE_OBJECT_MAP
    | RBD_FEATURE_FAST_DIFF
    | RBD_FEATURE_DEEP_FLATTEN
    | RBD_FEATURE_EXCLUSIVE_LOCK;

impl<S: ImageStore> Image<S> {
    pub async fn update_features(&self, features: u64, enabled: bool) -> Result<()> {
        self.check_writable()?;
        let spec = &self.spec;
        let what = if enabled { "enabling" } else { "disabling" };
        let invalid = |why: String| Error::new(ErrorKind::InvalidInput, format!("{spec}: {why}"));
        if features & !UPDATABLE_FEATURES != 0 || features == 0 {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "{spec}: rados-nbd changes only object-map, fast-diff, deep-flatten and \
                     exclusive-lock of an image it serves (asked: {features:#x})"
                ),
            ));
        }
        if self.shared {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!("{spec} is a shared image: its features are not changed while served"),
            ));
        }
        let cur = self.features();
        // librbd as the owner (16.2) turns object-map off with fast-diff: `rbd feature
        // disable IMG fast-diff` leaves neither on (the client asks for fast-diff alone).
        // Enabling either, the client asks for both itself.
        let features = if !enabled && features & RBD_FEATURE_FAST_DIFF != 0 {
            features | (cur & RBD_FEATURE_OBJECT_MAP)
        } else {
            features
        };
        let new = if enabled {
            cur | features
        } else {
            cur & !features
        };
        // librbd's rules: fast-diff needs object-map; deep-flatten is never enabled;
        // exclusive-lock goes only after object-map and journaling (librbd's owner answers
        // EINVAL), and is never enabled by its owner (an image without it has none).
        if enabled && features & RBD_FEATURE_DEEP_FLATTEN != 0 {
            return Err(invalid("deep-flatten can only be disabled".into()));
        }
        if enabled
            && features & RBD_FEATURE_EXCLUSIVE_LOCK != 0
            && cur & RBD_FEATURE_EXCLUSIVE_LOCK == 0
        {
            return Err(invalid(
                "exclusive-lock is enabled by the client itself".into(),
            ));
        }
        if new & RBD_FEATURE_EXCLUSIVE_LOCK == 0
            && new & (RBD_FEATURE_OBJECT_MAP | RBD_FEATURE_JOURNALING) != 0
        {
            return Err(invalid(
                "exclusive-lock cannot be disabled while object-map or journaling is on: \
                 disable them first (or together)"
                    .into(),
            ));
        }
        if new & RBD_FEATURE_FAST_DIFF != 0 && new & RBD_FEATURE_OBJECT_MAP == 0 {
            return Err(invalid(if enabled {
                "fast-diff needs object-map: enable both".into()
            } else {
                "object-map cannot be disabled while fast-diff is on: disable fast-diff too".into()
            }));
        }
        if new == cur {
            return Err(invalid(format!(
                "the features are already so ({what} {features:#x})"
            )));
        }
        let adds_map = new & RBD_FEATURE_OBJECT_MAP != 0 && cur & RBD_FEATURE_OBJECT_MAP == 0;
        if adds_map {
            super::check_map_size(new, self.size(), self.header.order)?;
        }
        if adds_map && !self.store.header().snaps.is_empty() {
            return Err(Error::new(
                ErrorKind::Busy,
                format!(
                    "{spec} has snapshots, whose object maps would have to be built too: enable \
                     object-map with the image not in use"
                ),
            ));
        }
        // cls_rbd's set_features takes only the bits that change (the others may be
        // immutable, as deep-flatten is once on).
        let changed = cur ^ new;
        let ctx = |e: Error| e.context(format!("{what} features {features:#x} of {spec}"));
        self.whole_map("changing features").await.map_err(ctx)?;
        let g = self.gate.write().await;
        if *g {
            return Err(Error::new(
                ErrorKind::Interrupted,
                format!("{spec} is closing"),
            ));
        }
        if adds_map {
            // Flagged invalid first (a crash before the map is written leaves it to be
            // rebuilt), then the feature, then the map written and the flag cleared.
            let flags = invalid_flags(new);
            self.store.set_flags(flags, flags).await.map_err(ctx)?;
            self.store
                .set_features(new & changed, changed)
                .await
                .map_err(ctx)?;
            self.features.store(new, Ordering::Release);
            self.dirty_flag.store(true, Ordering::Release);
            let count = self.size().div_ceil(self.header.object_size());
            let map = rebuild_map(&self.store, spec, count, None)
                .await
                .map_err(ctx)?;
            *self.map.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(map));
            self.mark_clean().await.map_err(ctx)?;
        } else if new & RBD_FEATURE_OBJECT_MAP == 0 {
            // Object-map off: the feature first (nobody trusts a map any more), then the
            // maps and the flags go, and none is kept in memory.
            self.store
                .set_features(new & changed, changed)
                .await
                .map_err(ctx)?;
            self.features.store(new, Ordering::Release);
            self.store.remove_object_maps().await.map_err(ctx)?;
            let all = RBD_FLAG_OBJECT_MAP_INVALID | RBD_FLAG_FAST_DIFF_INVALID;
            self.store.set_flags(0, all).await.map_err(ctx)?;
            self.dirty_flag.store(false, Ordering::Release);
            // The idle checkpointer waits for the next change again (it would spin on a
            // flag state nobody clears).
            self.flag_tx.send_replace(super::FlagState::Clean);
            *self.map.write().unwrap_or_else(|p| p.into_inner()) = None;
        } else if new & RBD_FEATURE_FAST_DIFF != 0 && cur & RBD_FEATURE_FAST_DIFF == 0 {
            // fast-diff on: both flags set first (a crash before the map is written leaves
            // it to be rebuilt, never trusted for diffs), then the feature, then the map
            // (its states are librbd's) written and the flags cleared.
            let all = RBD_FLAG_OBJECT_MAP_INVALID | RBD_FLAG_FAST_DIFF_INVALID;
            self.store.set_flags(all, all).await.map_err(ctx)?;
            self.dirty_flag.store(true, Ordering::Release);
            self.store
                .set_features(new & changed, changed)
                .await
                .map_err(ctx)?;
            self.features.store(new, Ordering::Release);
            self.mark_clean().await.map_err(ctx)?;
        } else {
            // fast-diff or deep-flatten off: the map written and the flags cleared first,
            // then the feature, so a crash in between leaves a valid map either way (and no
            // fast-diff flag on an image without fast-diff, which `rbd object-map check`
            // rejects).
            if self.map().is_some() {
                self.mark_clean().await.map_err(ctx)?;
            }
            self.store
                .set_features(new & changed, changed)
                .await
                .map_err(ctx)?;
            self.features.store(new, Ordering::Release);
        }
        drop(g);
        tracing::info!("{spec}: features now {new:#x} ({what} {features:#x})");
        if changed & RBD_FEATURE_EXCLUSIVE_LOCK != 0 {
            tracing::info!(
                "{spec}: served on without exclusive-lock: other clients may write beside \
                 this one; their resizes and flattens are followed as announced"
            );
        }
        Ok(())
    }
}
