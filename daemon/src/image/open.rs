//! Opening and closing an image: the shared setting, the lock to take, the map loaded
//! or rebuilt and the dirty flag set before the first request; creating one with its
//! empty map.

use super::map::{load_object_map, new_map, trusted_object_map, MapSource};
use super::rebuild::{rebuild_before_serving, Rebuild};
use super::{FlagState, Image, Stats, LOCK_SHARDS, MAX_IMAGE_SIZE, META_SHARED};
use crate::error::{Error, ErrorKind, Result};
use crate::spec::ImageSpec;
use crate::store::{ImageStore, OpenMode, Store, RBD_FEATURE_OBJECT_MAP};
use objmap::ObjectState;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Mutex, RwLock};

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

/// The image's effective `shared` setting.
pub async fn shared_setting<S: ImageStore>(
    img: &S,
    spec: &ImageSpec,
    default: bool,
) -> Result<bool> {
    match img.get_meta(META_SHARED).await? {
        None => Ok(default),
        Some(v) => crate::parse::parse_bool(&format!("image metadata {META_SHARED} of {spec}"), &v),
    }
}

/// Creates an image and, with the object-map feature, its empty object map, so a fresh
/// image opens without a rebuild.
pub async fn create_image<St: Store>(
    store: &St,
    spec: &ImageSpec,
    opts: &crate::store::CreateOptions,
) -> Result<()> {
    if opts.size > MAX_IMAGE_SIZE {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!("image size {} too large (at most 2^60 bytes)", opts.size),
        ));
    }
    super::check_map_size(opts.features, opts.size, opts.order)?;
    store.create_image(spec, opts).await?;
    write_empty_object_map(store, spec).await
}

/// A new image's (or clone's) object map, every object NONEXISTENT, as librbd's
/// CreateRequest writes it: without it the image would open with a rebuild and
/// `object-map check` would fail on a missing map. Nothing without the object-map feature.
pub async fn write_empty_object_map<St: Store>(store: &St, spec: &ImageSpec) -> Result<()> {
    let img = store.open_image(spec, OpenMode::ReadWrite).await?;
    let h = img.header();
    if h.features & RBD_FEATURE_OBJECT_MAP == 0 {
        return img.close().await;
    }
    let count = h.size.div_ceil(h.object_size());
    let r = match new_map(count, spec) {
        Ok(m) => img.write_object_map(m.encode()).await,
        Err(e) => Err(e),
    };
    let c = img.close().await;
    r.and(c)
        .map_err(|e| e.context(format!("writing the object map of new image {spec}")))
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
            Some(name) => match header.user_snap(name) {
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
        // Another client holds the lock (librbd's way of opening an image in use): the
        // map is that owner's to keep, ours is loaded when the first write takes the lock
        // (`take_lock_back`); until then every read asks the store and nothing is written.
        let lock_elsewhere = !read_only && img.opened_without_lock();
        let mut rebuild = None;
        let (map, map_source) = if lock_elsewhere {
            tracing::info!(
                "serving {spec} without its exclusive lock, which another client holds: \
                 reads ask the store, the first write takes the lock"
            );
            (None, None)
        } else if use_map && snap.is_some() {
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
        } else if use_map && !rebuild_before_serving() {
            // A map that cannot be trusted is rebuilt in the background while serving
            // (see `rebuild`): until then every object no request touched is unknown,
            // EXISTS in memory, so every read of it asks the store.
            match trusted_object_map(&img, &header, snap, size).await {
                Ok(Ok(m)) => (Some(m), Some(MapSource::Loaded)),
                Ok(Err(reason)) => {
                    let count = size.div_ceil(header.object_size());
                    let m = match new_map(count, spec) {
                        Ok(m) => m,
                        Err(e) => return Err((img, e)),
                    };
                    m.set_range(0..count, ObjectState::Exists);
                    match Rebuild::new(count, reason.clone()) {
                        Ok(r) => rebuild = Some(r),
                        Err(e) => {
                            let e = Error::new(
                                ErrorKind::Io,
                                format!("cannot track the rebuild of {spec}'s object map ({count} objects): {e}"),
                            );
                            return Err((img, e));
                        }
                    }
                    // Logged before the first request: scripts read it as "rebuilt".
                    tracing::info!(
                        "rebuilding object map of {spec} ({count} objects) in the background, \
                         serving meanwhile: {reason}"
                    );
                    (Some(m), Some(MapSource::Rebuilt(reason)))
                }
                Err(e) => return Err((img, e.context(format!("loading object map of {spec}")))),
            }
        } else if use_map {
            match load_object_map(&img, spec, &header, snap, size).await {
                Ok((m, src)) => (Some(m), Some(src)),
                Err(e) => return Err((img, e.context(format!("loading object map of {spec}")))),
            }
        } else {
            (None, None)
        };
        let chain = match super::clone::Chain::open(&img, spec, &header, size).await {
            Ok(c) => c.map(Arc::new),
            Err(e) => return Err((img, e)),
        };
        let features = header.features;
        let unverified = if chain.is_some() && !read_only && use_map {
            let count = size.div_ceil(header.object_size());
            match objmap::BitSet::try_new(count) {
                Ok(b) => Some(b),
                Err(e) => {
                    if let Some(c) = &chain {
                        c.close().await;
                    }
                    let e = Error::new(
                        ErrorKind::Io,
                        format!("cannot track which objects of {spec} to check ({count}): {e}"),
                    );
                    return Err((img, e));
                }
            }
        } else {
            None
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
            rebuild,
            rebuild_wait: super::REBUILD_WAIT,
            rebuild_retry: super::rebuild::REBUILD_RETRY_FIRST,
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
            has_parent: AtomicBool::new(chain.is_some()),
            chain: std::sync::RwLock::new(chain),
            unverified,
            cor: std::sync::OnceLock::new(),
            interrupt_long: Default::default(),
            quiesce: std::sync::OnceLock::new(),
            released: AtomicBool::new(lock_elsewhere),
            takeback_failing: AtomicBool::new(false),
            handover: Mutex::new(()),
            features: AtomicU64::new(features),
        };
        if matches!(image.map_source, Some(MapSource::Loaded)) {
            image.suspect_claims();
        }
        // Without the lock nothing is marked: the flag is the owner's until the take-back.
        let marked = if lock_elsewhere {
            Ok(())
        } else {
            image.ensure_dirty().await
        };
        if let Err(e) = marked {
            if let Some(c) = image.chain() {
                c.close().await;
            }
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

    /// Clean close: waits for in-flight requests, syncs, writes the map, clears the
    /// flag, releases the store handle. Requests after this fail with ESHUTDOWN.
    /// On error the flag stays set (the map is rebuilt at the next open).
    pub async fn close(&self) -> Result<()> {
        // The map is written only whole: a rebuild under way is finished first (one
        // nobody started is run here). A failed one was logged; the flag then stays set.
        let rebuilt = if self.read_only {
            Ok(())
        } else {
            if tokio::time::timeout(std::time::Duration::from_secs(30), self.wait_copy_on_read())
                .await
                .is_err()
            {
                tracing::warn!(
                    "closing {}: copy-on-read copy-ups not done after 30 s; their objects \
                     are read from the parent until a read copies them up",
                    self.spec
                );
            }
            self.finish_rebuild().await
        };
        let mut g = self.gate.write().await;
        if *g {
            return Ok(());
        }
        *g = true;
        let res = match rebuilt {
            Ok(()) => self.mark_clean().await,
            Err(e) => {
                tracing::warn!(
                    "closing {}: its object map is not written and the dirty flag stays set: {e}",
                    self.spec
                );
                self.store.sync().await
            }
        }
        .map_err(|e| e.context(format!("closing {}", self.spec)));
        let s = self.stats();
        tracing::info!(
            "closed {}: map_reads={} store_reads={} store_writes={} store_zeroes={} store_removes={} skipped_removes={} parent_reads={} copyups={}",
            self.spec, s.map_reads, s.store_reads, s.store_writes, s.store_zeroes,
            s.store_removes, s.skipped_removes, s.parent_reads, s.copyups
        );
        if let Some(c) = self.chain() {
            c.close().await;
        }
        let res2 = self.store.close().await;
        self.flag_tx.send_replace(FlagState::Closed);
        res.and(res2)
    }
}
