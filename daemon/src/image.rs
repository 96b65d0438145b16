//! The image layer: byte ranges to objects, the in-memory object map and its dirty-flag
//! lifecycle (issue 3), served to NBD through [`nbd_protocol::Backend`].
//!
//! Invariant kept while an image is open for writing with its map in memory: every
//! object that exists in the store is not NONEXISTENT in the map. Writes mark EXISTS
//! before the store write; removals mark NONEXISTENT only after the store removed the
//! object; a per-object lock keeps a removal from interleaving with a write. The header
//! carries OBJECT_MAP_INVALID while the on-disk map may be stale (from open until a
//! clean close or checkpoint), so a crash never leaves a trusted stale map.

use crate::error::{Error, ErrorKind, Result};
use crate::spec::ImageSpec;
use crate::store::{
    ImageHeader, ImageStore, OpenMode, Store, RBD_FEATURE_FAST_DIFF, RBD_FEATURE_OBJECT_MAP,
    RBD_FLAG_FAST_DIFF_INVALID, RBD_FLAG_OBJECT_MAP_INVALID,
};
use bytes::Bytes;
use futures_util::future::try_join_all;
use nbd_protocol::backend::{STATE_HOLE, STATE_ZERO};
use nbd_protocol::{Backend, BackendError, Errno, ExportInfo, Extent, ReadChunk, ZeroFlags};
use objmap::{ObjectMap, ObjectState};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use tokio::sync::{Mutex, RwLock};

/// Image metadata key of the per-image `shared` setting.
pub const META_SHARED: &str = "rados-nbd.shared";

/// Largest request the server accepts (NBD_INFO_BLOCK_SIZE maximum).
pub const MAX_BLOCK: u32 = 32 << 20;

const LOCK_SHARDS: usize = 1024;

#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Open read-only (also implied by a snapshot spec).
    pub read_only: bool,
    /// `shared` when the image has no `rados-nbd.shared` metadata (config `shared_default`).
    pub shared_default: bool,
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
    let reason = if snap.is_none() && header.flags & RBD_FLAG_OBJECT_MAP_INVALID != 0 {
        Some("the header flags it invalid (the last writer did not close cleanly)".to_string())
    } else {
        match img.read_object_map(snap).await? {
            None => Some("it is missing".to_string()),
            Some(bytes) => match ObjectMap::decode(&bytes) {
                Err(e) => Some(format!("it is corrupt ({e})")),
                Ok(m) if m.len() != count => {
                    Some(format!("it has {} entries for {count} objects", m.len()))
                }
                Ok(m) => return Ok((m, MapSource::Loaded)),
            },
        }
    };
    let reason = reason.unwrap_or_default();
    tracing::info!("rebuilding object map of {spec} ({count} objects): {reason}");
    let map = rebuild_map(img, spec, count, snap).await?;
    let exist = map.count(0..count)[ObjectState::Exists as usize];
    tracing::info!("object map of {spec} rebuilt: {exist} of {count} objects exist");
    Ok((map, MapSource::Rebuilt(reason)))
}

/// A map built from `list_objects`: EXISTS for each data object present.
pub async fn rebuild_map<S: ImageStore>(
    img: &S,
    spec: &ImageSpec,
    count: u64,
    snap: Option<u64>,
) -> Result<ObjectMap> {
    let objs = img.list_objects(snap).await?;
    let map = ObjectMap::new(count);
    let mut beyond = 0u64;
    for n in objs {
        if n < count {
            map.set(n, ObjectState::Exists);
        } else {
            beyond += 1;
        }
    }
    if beyond > 0 {
        tracing::warn!("{spec}: {beyond} data objects lie beyond the image size; ignored");
    }
    Ok(map)
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
    size: u64,
    snap: Option<u64>,
    read_only: bool,
    shared: bool,
    map: Option<ObjectMap>,
    map_source: Option<MapSource>,
    locks: Vec<RwLock<()>>,
    /// Held shared by every request, exclusively by close/checkpoint; `true` once closed.
    gate: RwLock<bool>,
    /// Whether the header's OBJECT_MAP_INVALID flag is currently set by us.
    dirty_flag: AtomicBool,
    flag_lock: Mutex<()>,
    stats: Stats,
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
            OpenMode::ReadWrite
        };
        let img = store.open_image(spec, mode).await?;
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
        let shared = match shared_setting(&img, spec, opts.shared_default).await {
            Ok(s) => s,
            Err(e) => return Err((img, e)),
        };
        let use_map = header.features & RBD_FEATURE_OBJECT_MAP != 0 && !shared;
        let (map, map_source) = if use_map {
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
            size,
            snap,
            read_only,
            shared,
            map,
            map_source,
            locks: (0..LOCK_SHARDS).map(|_| RwLock::new(())).collect(),
            gate: RwLock::new(false),
            dirty_flag: AtomicBool::new(false),
            flag_lock: Mutex::new(()),
            stats: Stats::default(),
            header,
        };
        if let Err(e) = image.ensure_dirty().await {
            return Err((image.store, e.context(format!("marking {spec} in use"))));
        }
        tracing::debug!(
            "opened {spec}: size {size}, object map {}, {}",
            if image.map.is_some() {
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
        self.size
    }
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }
    pub fn is_shared(&self) -> bool {
        self.shared
    }
    pub fn object_map(&self) -> Option<&ObjectMap> {
        self.map.as_ref()
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
        osize.min(self.size.saturating_sub(objno * osize))
    }

    fn lock_for(&self, objno: u64) -> &RwLock<()> {
        &self.locks[(objno % LOCK_SHARDS as u64) as usize]
    }

    fn flag_mask(&self) -> u64 {
        invalid_flags(self.header.features)
    }

    /// Sets the dirty flag in the header if it is not set yet (first write after open
    /// or after a checkpoint). Cheap when already set.
    async fn ensure_dirty(&self) -> Result<()> {
        if self.map.is_none() || self.read_only || self.dirty_flag.load(Ordering::Acquire) {
            return Ok(());
        }
        let _g = self.flag_lock.lock().await;
        if self.dirty_flag.load(Ordering::Acquire) {
            return Ok(());
        }
        let mask = self.flag_mask();
        self.store.set_flags(mask, mask).await?;
        self.dirty_flag.store(true, Ordering::Release);
        Ok(())
    }

    /// Everything durable, then the map, then the flag cleared: in that order, so that
    /// a crash at any point leaves either a valid map or the flag set.
    async fn mark_clean(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.store.sync().await?;
        if let Some(map) = &self.map {
            let _g = self.flag_lock.lock().await;
            if self.dirty_flag.load(Ordering::Acquire) {
                self.store.write_object_map(map.encode()).await?;
                self.store.set_flags(0, self.flag_mask()).await?;
                self.dirty_flag.store(false, Ordering::Release);
            }
        }
        Ok(())
    }

    /// Writes the map and clears the flag while staying open (the last client left).
    /// Waits for in-flight requests; the next write sets the flag again.
    pub async fn checkpoint(&self) -> Result<()> {
        let g = self.gate.write().await;
        if *g {
            return Ok(());
        }
        self.mark_clean()
            .await
            .map_err(|e| e.context(format!("checkpointing {}", self.spec)))
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
        res.and(res2)
    }

    fn is_nonexistent(&self, objno: u64) -> bool {
        self.map
            .as_ref()
            .is_some_and(|m| m.get(objno) == ObjectState::Nonexistent)
    }

    fn mark_exists(&self, objno: u64) {
        if let Some(m) = &self.map {
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
            if let Some(m) = &self.map {
                m.set(p.objno, ObjectState::Nonexistent);
            }
            Ok(())
        } else {
            let _g = self.lock_for(p.objno).read().await;
            bump(&self.stats.store_zeroes);
            self.store.zero(p.objno, p.off, p.len, fua).await
        }
    }

    async fn discard(&self, offset: u64, length: u32, fua: bool, no_hole: bool) -> Result<()> {
        self.check_writable()?;
        self.ensure_dirty().await?;
        let pieces = split(self.order(), offset, length as u64);
        try_join_all(
            pieces
                .into_iter()
                .map(|p| self.discard_piece(p, fua, no_hole)),
        )
        .await?;
        Ok(())
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
        let Some(map) = &self.map else {
            return vec![Extent { length, flags: 0 }];
        };
        let order = self.order();
        let end = (offset + length).min(self.size);
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
    fn info(&self) -> ExportInfo {
        let rw = !self.read_only;
        ExportInfo {
            size: self.size,
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
        let pieces = split(self.order(), offset, length as u64);
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
        self.ensure_dirty().await?;
        let pieces = split(self.order(), offset, data.len() as u64);
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
