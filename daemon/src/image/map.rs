//! The object map helpers: load it when it can be trusted, rebuild it from the objects
//! that exist when not; the header flags that mark it stale.

use crate::error::{Error, ErrorKind, Result};
use crate::spec::ImageSpec;
use crate::store::{
    ImageHeader, ImageStore, RBD_FEATURE_FAST_DIFF, RBD_FLAG_FAST_DIFF_INVALID,
    RBD_FLAG_OBJECT_MAP_INVALID,
};
use objmap::{ObjectMap, ObjectState};
use std::sync::Arc;

/// Why the in-memory map was rebuilt instead of loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MapSource {
    Loaded,
    Rebuilt(String),
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
    // A warning, as rbd's "fast-diff map is invalid ... operation may be slow": shown by
    // one-shot commands too (du, diff of an image in use or left by a crash).
    tracing::warn!("rebuilding object map of {spec} ({count} objects): {reason}");
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

impl<S: ImageStore> super::Image<S> {
    /// `rbd object-map rebuild` asked of the lock owner: the head's map built again from
    /// the data objects that exist (librbd's states, so fast-diff stays exact), with every
    /// request held off (`gate`) so no write lands between the listing and the swap; then
    /// written with the flag cleared, as a checkpoint does. `progress(done, total)` in
    /// objects, for the asker.
    pub async fn rebuild_object_map(&self, mut progress: impl FnMut(u64, u64)) -> Result<String> {
        self.check_writable()?;
        let spec = &self.spec;
        // librbd's owner answers EINVAL here ("image must support object-map feature");
        // an error the asker reads as EOPNOTSUPP would make it take the lock instead.
        if self.header.features & crate::store::RBD_FEATURE_OBJECT_MAP == 0 {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("{spec} has no object-map feature: no object map to rebuild"),
            ));
        }
        if self.shared || self.map().is_none() {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "{spec} is served without an object map in memory (a shared image, or no \
                     object-map feature): nothing to rebuild while it is in use"
                ),
            ));
        }
        let ctx = |e: Error| e.context(format!("rebuilding the object map of {spec}"));
        // A background rebuild after a crash ends first: its merge would otherwise land
        // on the map made here.
        self.whole_map("rebuilding the object map")
            .await
            .map_err(ctx)?;
        let g = self.gate.write().await;
        if *g {
            return Err(Error::new(
                ErrorKind::Interrupted,
                format!("{spec} is closing; object map not rebuilt"),
            ));
        }
        let count = self.size().div_ceil(self.header.object_size());
        progress(0, count);
        let map = rebuild_map(&self.store, spec, count, None)
            .await
            .map_err(ctx)?;
        let summary = describe_rebuilt(&map, count);
        // Flag set before the map on disk changes, cleared once it is written.
        self.ensure_dirty().await.map_err(ctx)?;
        *self.map.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(map));
        self.mark_clean().await.map_err(ctx)?;
        progress(count, count);
        drop(g);
        tracing::info!("object map of {spec} rebuilt: {summary}");
        Ok(summary)
    }
}
