//! One opened image: its state, the checks before each I/O, and the [`ImageStore`] impl
//! (data objects, header fields, metadata, object maps, close).

use super::header::{header_oid, object_map_oid, refresh, refresh_locked};
use super::lock::{lock_name, LockState};
use super::rados::errno_of;
use super::rados::{IoCtx, WriteOp};
use super::store::{for_each_parallel, open_by_id_at};
use super::{cls, luks, snaps, LOCK, NOTIFY_TIMEOUT_MS, RBD};

/// How long a write waits for a lost watch to be re-registered (`Inner::writable`).
const REACQUIRE_WAIT: std::time::Duration = std::time::Duration::from_secs(20);
use crate::error::{Error, ErrorKind, Result};
use crate::spec::ImageSpec;
use crate::store::{
    ImageHeader, ImageStore, ObjectWrite, OpenMode, OwnerRequest, ParentInfo,
    RBD_FEATURE_DEEP_FLATTEN, RBD_FEATURE_FAST_DIFF,
};
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use tokio::sync::mpsc;

pub(super) struct Inner {
    pub(super) meta: Arc<IoCtx>,
    /// Data objects, with the snapshot context writes carry (or reading at the opened
    /// snapshot).
    pub(super) data: Arc<IoCtx>,
    /// The pool (and namespace) of the data objects, with no snapshot context: `meta`'s,
    /// or the image's data pool (`rbd create --data-pool`, e.g. an erasure-coded pool,
    /// librbd's `data_ctx`).
    pub(super) data_home: Arc<IoCtx>,
    /// The data objects' name prefix from the header: `rbd_data.<id>`, or with a data
    /// pool `rbd_data.<metadata pool id>.<id>` (librbd's CreateRequest).
    pub(super) object_prefix: String,
    pub(super) spec: ImageSpec,
    pub(super) id: String,
    pub(super) hdr_oid: String,
    pub(super) snap_id: Option<u64>,
    pub(super) mode: OpenMode,
    /// Serve an image encrypted by librbd as its raw LUKS volume (`--allow-encrypted`).
    pub(super) allow_encrypted: bool,
    pub(super) luks_noted: Arc<Mutex<std::collections::HashSet<String>>>,
    pub(super) header: RwLock<ImageHeader>,
    pub(super) snap_ios: Mutex<HashMap<u64, Arc<IoCtx>>>,
    pub(super) lock: tokio::sync::Mutex<Option<LockState>>,
    /// Set when the watch was lost and the lock could not be re-asserted: writes stop.
    pub(super) lost_lock: AtomicBool,
    /// Set while a lost watch is being re-registered and the lock moved to its cookie
    /// (e.g. after the OSD holding the header restarted). New writes wait for it
    /// (`writable`, bounded by `REACQUIRE_WAIT`): with our watch gone another client may
    /// take us for dead and break the lock. (librbd lets writes go meanwhile, relying on
    /// the breaker blocklisting us first, which its default `rbd_blocklist_on_break_lock`
    /// does; waiting costs nothing when it does and keeps us safe when it does not.)
    pub(super) reacquiring: AtomicBool,
    /// Woken when `reacquiring` is cleared.
    pub(super) reacquired: tokio::sync::Notify,
    /// Cooperative hand-over is on (`enable_handover`: not `--exclusive`): a request for
    /// the lock is passed to the image layer instead of refused.
    pub(super) hands_over: AtomicBool,
    /// The lock was handed to another client and not taken back yet: nothing is written,
    /// and requests for the owner are not ours to answer.
    pub(super) released: AtomicBool,
    /// Woken when another client's ReleasedLock arrives (a take-back waits for it).
    pub(super) lock_freed: tokio::sync::Notify,
    /// Where requests for the lock owner go once the image layer takes them
    /// (`owner_requests`); until then they are refused, as before.
    pub(super) owner_tx: Mutex<Option<mpsc::UnboundedSender<OwnerRequest>>>,
    /// Requests being carried out: librbd may send one again while it waits.
    pub(super) owner_pending: Mutex<std::collections::HashSet<cls::AsyncRequestId>>,
    /// Results of requests carried out, newest last (bounded): a client that sends one
    /// again (it missed our AsyncComplete) is answered with it, not served twice.
    /// (request, result, when done).
    pub(super) owner_done:
        Mutex<std::collections::VecDeque<(cls::AsyncRequestId, i32, std::time::Instant)>>,
    /// `--quiesce`: the hook and the quiesce requests seen on the header watch.
    pub(super) quiesce: super::quiesce::Quiesce,
    /// Bumped after each header update another client announced was read into `header`
    /// (`ImageStore::header_updates`).
    pub(super) header_updates: tokio::sync::watch::Sender<u64>,
    /// Header updates announced on the watch, counted on librados' thread before the ack
    /// goes back, and how many of them `fresh` has read in (see there).
    pub(super) updates_announced: AtomicU64,
    pub(super) updates_applied: AtomicU64,
    /// One header refresh at a time.
    pub(super) refreshing: tokio::sync::Mutex<()>,
    pub(super) closed: AtomicBool,
    /// Writes held behind the one in flight on their object (merge.rs).
    pub(super) merge: Arc<super::merge::Merger>,
    /// The header's access and modify timestamps, moved by I/O as librbd moves them.
    pub(super) timestamps: Arc<super::timestamps::Timestamps>,
}

/// A data object's name: `<prefix>.<objno as 16 hex digits>`.
pub(super) fn data_object_name(prefix: &str, objno: u64) -> String {
    format!("{prefix}.{objno:016x}")
}

/// One opened image in the cluster.
pub struct CephImage {
    pub(super) inner: Arc<Inner>,
}

impl Inner {
    fn object_name(&self, objno: u64) -> String {
        data_object_name(&self.object_prefix, objno)
    }

    fn object_size(&self) -> u64 {
        self.header
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .object_size()
    }

    fn check_readable(&self) -> Result<()> {
        if self.is_fenced() {
            return Err(self.fenced_error());
        }
        Ok(())
    }

    /// librbd's refresh before I/O. A header update another client announces (a
    /// snapshot, a resize of an image without exclusive-lock, which no owner is asked
    /// for) is acknowledged at once, so the announcer's operation may return before our
    /// refresh is done; a write sent after that must not go out with the old snapshot
    /// context, or the OSD makes no clone for the new snapshot and it silently holds the
    /// later data. So every write checks the count first, and the first to find it behind
    /// reads the header (and the snapshot context with it) before it goes on.
    pub(super) async fn fresh(&self) -> Result<()> {
        let behind = || {
            let want = self.updates_announced.load(Ordering::Acquire);
            (self.updates_applied.load(Ordering::Acquire) < want).then_some(want)
        };
        if behind().is_none() {
            return Ok(());
        }
        let _g = self.refreshing.lock().await;
        let Some(want) = behind() else {
            return Ok(());
        };
        refresh_locked(self).await.map_err(|e| {
            e.context(format!(
                "reading the header of {} after another client's update",
                self.spec
            ))
        })?;
        self.updates_applied.store(want, Ordering::Release);
        self.header_updates.send_modify(|n| *n += 1);
        Ok(())
    }

    /// After `fresh`: an object past the end is not written. Another client may have
    /// shrunk an image without exclusive-lock a moment ago, before the image layer heard
    /// of it; writing there would leave an object past the end that `rbd rm` never
    /// removes (librbd clips its I/O to the refreshed size the same way).
    /// `end`: where in the object the bytes written end (0 for none).
    fn check_inside(&self, objno: u64, end: u64) -> Result<()> {
        let size = self.header.read().unwrap_or_else(|p| p.into_inner()).size;
        let start = objno.saturating_mul(self.object_size());
        if start >= size || start.saturating_add(end) > size {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "object {objno} (up to byte {end} of it) lies past the end of image {} \
                     ({size} bytes, resized by another client)",
                    self.spec
                ),
            ));
        }
        Ok(())
    }

    /// `check_writable`, after waiting (at most `REACQUIRE_WAIT`) for a lost watch to be
    /// re-registered and the lock re-asserted: a write then goes on instead of failing,
    /// which a file system on the device would take as a disk error.
    pub(super) async fn writable(&self) -> Result<()> {
        self.rewatched().await;
        self.check_writable()
    }

    /// Waits (at most `REACQUIRE_WAIT`) while a lost watch is being re-registered.
    pub(super) async fn rewatched(&self) {
        if !self.reacquiring.load(Ordering::SeqCst) {
            return;
        }
        let deadline = tokio::time::Instant::now() + REACQUIRE_WAIT;
        loop {
            // Registered before the flag is read again: no wake-up is missed.
            let woken = self.reacquired.notified();
            if !self.reacquiring.load(Ordering::SeqCst)
                || self.closed.load(Ordering::SeqCst)
                || tokio::time::timeout_at(deadline, woken).await.is_err()
            {
                return;
            }
        }
    }

    /// Whether a write may go: the image is open for writing and the lock ours (not
    /// handed over, not lost or broken). A lost watch being re-registered is not
    /// checked here (`check_writable` adds it): a write held behind another, admitted
    /// before, goes on when it is handed to librados (as all writes do in librbd).
    pub(super) fn check_kept(&self) -> Result<()> {
        if self.mode == OpenMode::ReadOnly {
            return Err(Error::new(
                ErrorKind::ReadOnly,
                format!("image {} is open read-only", self.spec),
            ));
        }
        if self.closed.load(Ordering::SeqCst) {
            return Err(Error::new(
                ErrorKind::Io,
                format!("image {} is closed", self.spec),
            ));
        }
        if self.released.load(Ordering::SeqCst) {
            return Err(Error::new(
                ErrorKind::Io,
                format!(
                    "image {}: the exclusive lock was handed to another client; not written",
                    self.spec
                ),
            ));
        }
        if self.is_fenced() {
            return Err(self.fenced_error());
        }
        Ok(())
    }

    pub(super) fn check_writable(&self) -> Result<()> {
        self.check_kept()?;
        if self.reacquiring.load(Ordering::SeqCst) {
            return Err(Error::new(
                ErrorKind::Io,
                format!(
                    "image {}: the exclusive lock is not re-asserted yet after a lost watch \
                     ({} s); not written",
                    self.spec,
                    REACQUIRE_WAIT.as_secs()
                ),
            ));
        }
        Ok(())
    }

    /// Tells other watchers (librbd clients, `rbd info --watch`...) to re-read the header,
    /// as librbd does after changing it; nobody has to answer.
    fn notify_header_update(&self) {
        let (meta, oid) = (self.meta.clone(), self.hdr_oid.clone());
        tokio::spawn(async move {
            let _ = meta
                .notify(&oid, &cls::header_update_notify(), NOTIFY_TIMEOUT_MS)
                .await;
        });
    }

    /// A header change through cls_rbd, then our copy of the header re-read (and with
    /// it the snapshot context writes carry), then the other watchers told.
    async fn change_header(&self, method: &str, input: &[u8]) -> Result<()> {
        self.writable().await?;
        let r = self
            .meta
            .exec_write(&self.hdr_oid, RBD, method, input)
            .await;
        self.noting_fence(r)?;
        refresh(self).await?;
        self.notify_header_update();
        Ok(())
    }

    /// Sets (`Some`) or removes an image metadata key, for another client (`rbd
    /// image-meta set|remove`, `rbd config image set|rm` send it to the lock owner).
    /// Removing a key that is not there is an error, as for librbd (ENOENT).
    pub(super) async fn metadata_update(&self, key: &str, value: Option<&[u8]>) -> Result<()> {
        let r = match value {
            Some(v) => {
                self.change_header("metadata_set", &cls::metadata_set_one_in(key, v))
                    .await
            }
            None => {
                self.change_header("metadata_remove", &cls::string_in(key))
                    .await
            }
        };
        r.map_err(|e| e.context(format!("image-meta of {} (key {key})", self.spec)))
    }

    /// The format-1 clones of snapshot `id` (pool, child image id), looked for as librbd's
    /// SnapshotUnprotectRequest does before it unprotects: in `rbd_children` of every pool
    /// (in this image's namespace: format 1 does not cross namespaces). A pool that is gone
    /// is skipped; any other failure fails the unprotect, as librbd's, since a clone not
    /// seen would lose its parent. Format-2 clones do not need the snapshot protected (its
    /// removal moves it to the trash until the last of them is gone), so librbd does not
    /// count them, and neither do we.
    async fn v1_children(&self, id: u64) -> Result<Vec<(String, String)>> {
        let rados = self.meta.cluster();
        let pspec = cls::ParentSpec {
            pool_id: self.meta.pool_id(),
            namespace: String::new(),
            image_id: self.id.clone(),
            snap_id: id,
        };
        let input = cls::v1_child_in(&pspec, None);
        // A pool made since our last map (a long-lived daemon) is scanned too.
        rados.wait_for_latest_osdmap().await?;
        let mut out = Vec::new();
        for pool in rados.pool_names()? {
            let io = match rados.ioctx_in(&pool, self.meta.namespace()) {
                Ok(io) => io,
                Err(e) if e.kind == ErrorKind::NotFound => continue,
                Err(e) => return Err(e.context(format!("pool {pool}"))),
            };
            match rados.is_cache_tier(io.pool_id()) {
                Ok(false) => {}
                Ok(true) => continue,
                Err(e) if e.kind == ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            }
            match io
                .exec_read("rbd_children", RBD, "get_children", &input)
                .await
            {
                Ok(b) => out.extend(
                    cls::string_set_out(&b, "rbd.get_children reply")?
                        .into_iter()
                        .map(|c| (pool.clone(), c)),
                ),
                Err(e) if e.kind == ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(e.context(format!("looking for format-1 clones in pool {pool}")))
                }
            }
        }
        Ok(out)
    }

    /// The handle that reads at `snap` (None: the opened snapshot, or the head).
    fn reader(&self, snap: Option<u64>) -> Result<Arc<IoCtx>> {
        match snap {
            None => Ok(self.data.clone()),
            Some(s) if Some(s) == self.snap_id => Ok(self.data.clone()),
            Some(s) => {
                let mut m = self.snap_ios.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(io) = m.get(&s) {
                    return Ok(io.clone());
                }
                let io = self.data_home.at_snap(s)?;
                m.insert(s, io.clone());
                Ok(io)
            }
        }
    }
}

fn is_zero(data: &[u8]) -> bool {
    data.iter().all(|&b| b == 0)
}

impl CephImage {
    async fn snap_add(&self, name: &str, namespace: Option<&[u8]>) -> Result<u64> {
        let i = &self.inner;
        let ctx = |e: Error| e.context(format!("creating snapshot {name} of image {}", i.spec));
        i.writable().await.map_err(ctx)?;
        let id = i.data.selfmanaged_snap_create().await.map_err(ctx)?;
        let r = i
            .meta
            .exec_write(
                &i.hdr_oid,
                RBD,
                "snapshot_add",
                &match namespace {
                    None => cls::snapshot_add_in(id, name),
                    Some(ns) => cls::snapshot_add_ns_in(id, name, ns),
                },
            )
            .await;
        if let Err(e) = i.noting_fence(r) {
            // The id is nobody's: give it back, as librbd's release_snap_id does.
            let _ = i.data.selfmanaged_snap_remove(id).await;
            return Err(ctx(e));
        }
        refresh(i).await.map_err(ctx)?;
        i.notify_header_update();
        Ok(id)
    }

    /// librbd's rule for a copy-up that reaches the child's snapshots: the child has
    /// some and the parent's data is not all zeros. The one place `copyup` (how it
    /// writes) and `copyup_snapshots` (whose maps then change) ask.
    fn deep_copyup(&self, parent_data: &[u8]) -> bool {
        !is_zero(parent_data) && !self.header().snaps.is_empty()
    }
}

impl CephImage {
    /// The numbers of the data objects the pool lists for this image, sorted: heads, and
    /// also objects whose head was removed while snapshots kept clones of them (listed
    /// until the OSD's snap trimming drops the clones).
    async fn pool_listing(&self) -> Result<Vec<u64>> {
        let prefix = format!("{}.", self.inner.object_prefix);
        let names = self.inner.data_home.list_objects(&prefix).await?;
        let mut objs: Vec<u64> = names
            .iter()
            .filter_map(|n| n.strip_prefix(&prefix))
            .filter(|hex| hex.len() == 16)
            .filter_map(|hex| u64::from_str_radix(hex, 16).ok())
            .collect();
        objs.sort_unstable();
        Ok(objs)
    }
}

impl ImageStore for CephImage {
    fn data_pool(&self) -> Option<String> {
        let i = &self.inner;
        (i.data_home.pool() != i.meta.pool()).then(|| i.data_home.pool().to_string())
    }

    async fn details(&self) -> Result<crate::store::ImageDetails> {
        let i = &self.inner;
        let striped = self.header().features & crate::store::RBD_FEATURE_STRIPINGV2 != 0;
        let ctx = |e: Error| {
            e.context(format!(
                "reading op features, timestamps, striping and lockers of {}",
                i.spec
            ))
        };
        let mut d = super::timestamps::details(&i.meta, &i.hdr_oid, striped)
            .await
            .map_err(ctx)?;
        d.locked = match super::lock::get_lock_info(i).await {
            Ok(l) if l.lockers.is_empty() => None,
            Ok(l) => Some(l.kind == super::cls::LOCK_EXCLUSIVE),
            Err(e) if e.kind == ErrorKind::NotFound => None,
            Err(e) => return Err(ctx(e)),
        };
        Ok(d)
    }

    fn note_io(&self, modify: bool) {
        self.inner.timestamps.note(modify);
    }

    fn header(&self) -> ImageHeader {
        self.inner
            .header
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    async fn refresh_header(&self) -> Result<ImageHeader> {
        refresh(&self.inner).await
    }

    fn check_usable(&self) -> Result<()> {
        self.inner.check_readable()
    }

    /// Refuses an image that starts with a LUKS header (object 0, read at the opened
    /// snapshot) unless `--allow-encrypted`: encrypted by librbd (`rbd encryption format`)
    /// when the data lies exactly one object in, else made by librbd or by cryptsetup on
    /// the device, which cannot be told apart; either way serving it would hand out
    /// ciphertext to a client that may not expect it.
    async fn check_servable(&self) -> Result<()> {
        let i = &self.inner;
        let spec = &i.spec;
        let oid = i.object_name(0);
        let ctx = |e: Error| e.context(format!("checking image {spec} for encryption"));
        let Some(mut head) = i.data.read(&oid, 0, luks::PROBE_LEN).await.map_err(ctx)? else {
            return Ok(());
        };
        if let Some(size) = luks::luks2_header_size(&head) {
            if size > head.len() as u64 {
                head = i
                    .data
                    .read(&oid, 0, size as usize)
                    .await
                    .map_err(ctx)?
                    .unwrap_or_default();
            }
        }
        let Some(h) = luks::parse(&head) else {
            return Ok(());
        };
        let v = h.version;
        let librbd = h.is_librbd_layout(i.object_size());
        let first_note = || {
            i.luks_noted
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(spec.to_string())
        };
        if i.allow_encrypted {
            if first_note() {
                tracing::warn!(
                    "image {spec} starts with a LUKS{v} header (data offset {}); serving the \
                     raw LUKS volume (--allow-encrypted): clients see the header and ciphertext",
                    h.data_offset
                );
            }
            return Ok(());
        }
        // librbd's own layouts are not always distinguishable from cryptsetup's (LUKS2 on
        // objects of 16 MiB or less, the default 4 MiB included, puts its data at 16 MiB
        // exactly as `cryptsetup luksFormat` does), so every LUKS volume at offset 0 is
        // refused until the user says it is theirs to serve raw.
        let who = if librbd {
            format!("it is encrypted by librbd (rbd encryption format, LUKS{v})")
        } else {
            format!(
                "it starts with a LUKS{v} header (data at {} bytes), made by `rbd encryption \
                 format` or by cryptsetup on the device, which cannot be told apart",
                h.data_offset
            )
        };
        Err(Error::new(
            ErrorKind::Unsupported,
            format!(
                "image {spec} not served: {who}; rados-nbd has no client-side encryption and \
                 would serve ciphertext; pass --allow-encrypted to serve the raw LUKS volume \
                 (right for a volume cryptsetup made on the device)"
            ),
        ))
    }

    fn enable_quiesce(&self, hook: Arc<crate::quiesce::QuiesceHook>) {
        self.inner.quiesce.set_hook(hook);
    }

    fn enable_handover(&self) {
        if self.inner.mode == OpenMode::ReadWrite {
            self.inner.hands_over.store(true, Ordering::SeqCst);
        }
    }

    fn opened_without_lock(&self) -> bool {
        self.inner.mode == OpenMode::ReadWrite && self.inner.released.load(Ordering::SeqCst)
    }

    async fn release_lock(&self) -> Result<()> {
        super::lock::release_lock(&self.inner).await
    }

    async fn reacquire_lock(&self) -> Result<()> {
        super::lock::reacquire_lock(&self.inner).await
    }

    fn owner_requests(&self) -> Option<mpsc::UnboundedReceiver<OwnerRequest>> {
        let i = &self.inner;
        if i.mode != OpenMode::ReadWrite || i.closed.load(Ordering::SeqCst) {
            return None;
        }
        let mut slot = i.owner_tx.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_some() {
            return None;
        }
        let (tx, rx) = mpsc::unbounded_channel();
        *slot = Some(tx);
        Some(rx)
    }

    async fn set_size(&self, size: u64) -> Result<()> {
        let i = &self.inner;
        i.writable().await?;
        // No refresh may read the old size before this and install it after.
        let g = i.refreshing.lock().await;
        let r = i
            .meta
            .exec_write(
                &i.hdr_oid,
                RBD,
                "set_size",
                &cls::Enc::new().u64(size).done(),
            )
            .await;
        i.noting_fence(r)
            .map_err(|e| e.context(format!("setting the size of image {}", i.spec)))?;
        i.header.write().unwrap_or_else(|p| p.into_inner()).size = size;
        drop(g);
        // As after librbd's own resize.
        i.notify_header_update();
        Ok(())
    }

    async fn set_flags(&self, value: u64, mask: u64) -> Result<()> {
        let i = &self.inner;
        // A fenced handle must not clear the invalid flag the new owner relies on.
        i.check_readable()?;
        let snap = i.snap_id.unwrap_or(cls::NOSNAP);
        // No refresh may read the old flags before this and install them after.
        let _g = i.refreshing.lock().await;
        let r = i
            .meta
            .exec_write(
                &i.hdr_oid,
                RBD,
                "set_flags",
                &cls::set_flags_in(value, mask, snap),
            )
            .await;
        i.noting_fence(r)
            .map_err(|e| e.context(format!("setting flags of image {}", i.spec)))?;
        let mut h = i.header.write().unwrap_or_else(|p| p.into_inner());
        h.flags = (h.flags & !mask) | (value & mask);
        Ok(())
    }

    async fn get_meta(&self, key: &str) -> Result<Option<String>> {
        let i = &self.inner;
        match i
            .meta
            .exec_read(&i.hdr_oid, RBD, "metadata_get", &cls::string_in(key))
            .await
        {
            Ok(b) => Ok(Some(cls::string_out(&b, "rbd.metadata_get reply")?)),
            Err(e) if e.kind == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.context(format!("reading metadata {key} of image {}", i.spec))),
        }
    }

    async fn set_meta(&self, key: &str, value: &str) -> Result<()> {
        let i = &self.inner;
        i.meta
            .exec_write(
                &i.hdr_oid,
                RBD,
                "metadata_set",
                &cls::metadata_set_in(&[(key, value)]),
            )
            .await
            .map_err(|e| e.context(format!("setting metadata {key} of image {}", i.spec)))
    }

    async fn read(
        &self,
        objno: u64,
        off: u64,
        len: u64,
        snap: Option<u64>,
    ) -> Result<Option<Bytes>> {
        let i = &self.inner;
        if usize::try_from(len).is_err() {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("read length {len} too large"),
            ));
        }
        i.check_readable()?;
        let io = i.reader(snap)?;
        if snap.is_none() {
            // As librbd: held writes go out before a read of their object.
            i.merge.release(objno);
        }
        let r = super::read::read(&io, &i.object_name(objno), off, len).await;
        i.noting_fence(r)
    }

    async fn read_extents(
        &self,
        objno: u64,
        off: u64,
        len: u64,
        snap: Option<u64>,
    ) -> Result<Option<Vec<(u64, Bytes)>>> {
        let i = &self.inner;
        i.check_readable()?;
        let io = i.reader(snap)?;
        if snap.is_none() {
            i.merge.release(objno);
        }
        let r = super::sparse::sparse_read(&io, &i.object_name(objno), off, len).await;
        i.noting_fence(r)
    }

    async fn write(&self, objno: u64, off: u64, data: Bytes, _durable: bool) -> Result<()> {
        // RADOS acknowledges a write once it is durable on every replica, so FUA is free.
        let i = &self.inner;
        i.writable().await?;
        i.fresh().await?;
        i.check_inside(objno, off + data.len() as u64)?;
        let r = i.merge.write(objno, off, data).await;
        i.noting_fence(r)
    }

    async fn zero(&self, objno: u64, off: u64, len: u64, _durable: bool) -> Result<()> {
        let i = &self.inner;
        i.writable().await?;
        i.fresh().await?;
        let osize = i.object_size();
        let mut op = WriteOp::new();
        // assert_exists: truncate would otherwise create a missing object.
        op.assert_exists();
        if off.saturating_add(len) >= osize {
            op.truncate(off);
        } else {
            op.zero(off, len);
        }
        // Writes held on the object were asked for first: they go first (merge.rs).
        i.merge.release(objno);
        match i.data.operate(&i.object_name(objno), op, "zero").await {
            Err(e) if e.kind == ErrorKind::NotFound => Ok(()),
            r => i.noting_fence(r),
        }
    }

    async fn remove(&self, objno: u64, _durable: bool) -> Result<()> {
        let i = &self.inner;
        i.writable().await?;
        i.fresh().await?;
        i.merge.release(objno);
        let r = i.data.remove(&i.object_name(objno)).await;
        i.noting_fence(r).map(|_| ())
    }

    async fn set_features(&self, value: u64, mask: u64) -> Result<()> {
        let i = &self.inner;
        let input = cls::Enc::new().u64(value).u64(mask).done();
        i.change_header("set_features", &input)
            .await
            .map_err(|e| e.context(format!("changing the features of image {}", i.spec)))
    }

    async fn remove_object_maps(&self) -> Result<()> {
        let i = &self.inner;
        i.writable().await?;
        let snaps: Vec<u64> = self.header().snaps.iter().map(|s| s.id).collect();
        for snap in std::iter::once(None).chain(snaps.into_iter().map(Some)) {
            let oid = object_map_oid(&i.id, snap);
            let r = i.meta.remove(&oid).await;
            i.noting_fence(r)
                .map_err(|e| e.context(format!("removing object map {oid}")))?;
        }
        Ok(())
    }

    async fn sparsify_object(
        &self,
        objno: u64,
        sparse_size: u64,
        remove_empty: bool,
    ) -> Result<bool> {
        let i = &self.inner;
        i.writable().await?;
        i.fresh().await?;
        let oid = i.object_name(objno);
        // cls_rbd's sparsify input: size_t sparse_size (as u64), bool remove_empty.
        let input = cls::Enc::new().u64(sparse_size).bool(remove_empty).done();
        i.merge.release(objno);
        match i.noting_fence(i.data.exec_write(&oid, RBD, "sparsify", &input).await) {
            Ok(()) => {}
            Err(e) if e.kind == ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e.context(format!("sparsifying object {oid}"))),
        }
        Ok(i.noting_fence(i.data.stat(&oid).await)?.is_some())
    }

    async fn sync(&self) -> Result<()> {
        // Nothing is acknowledged before it is durable in RADOS. Held writes are not
        // acknowledged yet; sending them now is librbd's flush (and saves them the wait).
        self.inner.merge.release_all();
        Ok(())
    }

    async fn list_objects(&self, snap: Option<u64>) -> Result<Vec<u64>> {
        let i = &self.inner;
        let objs = self.pool_listing().await?;
        let snap = snap.or(i.snap_id);
        let io = match snap {
            // At a snapshot an object listed now may not have existed yet: ask the snapshot.
            Some(s) => i.reader(Some(s))?,
            // The listing also names objects whose head was removed while snapshots kept
            // clones of them, until the OSD's snap trimming (asynchronous, seconds after the
            // snapshots are gone) drops the clones. An image that never had a snapshot
            // (seq 0) has no clones: its listing is exact.
            None if self.header().snap_seq == 0 => return Ok(objs),
            None => i.reader(None)?,
        };
        let found = Arc::new(Mutex::new(Vec::new()));
        let prefix = i.object_prefix.clone();
        for_each_parallel(objs, |objno| {
            let (io, found, prefix) = (io.clone(), found.clone(), prefix.clone());
            async move {
                let name = format!("{prefix}.{objno:016x}");
                if io.stat(&name).await?.is_some() {
                    found.lock().unwrap_or_else(|p| p.into_inner()).push(objno);
                }
                Ok(())
            }
        })
        .await?;
        let mut v = std::mem::take(&mut *found.lock().unwrap_or_else(|p| p.into_inner()));
        v.sort_unstable();
        Ok(v)
    }

    /// Without snapshots every listed object is EXISTS (librbd computes the same), so the
    /// pool listing is enough. With snapshots, librbd's computation needs each object's
    /// snap set (`list_snaps`): which objects were written since the newest snapshot, and
    /// which listed objects only clones keep (removed from the head since a snapshot).
    async fn object_snap_sets(
        &self,
        objs: Vec<u64>,
    ) -> Result<Vec<(u64, Option<crate::store::snapset::SnapSet>)>> {
        let i = &self.inner;
        snaps::snap_sets(&i.data, &self.header().object_prefix, objs).await
    }

    async fn list_object_states(
        &self,
        snap: Option<u64>,
    ) -> Result<Vec<(u64, objmap::ObjectState)>> {
        let i = &self.inner;
        let h = self.header();
        if h.snaps.is_empty() {
            let objs = self.list_objects(snap).await?;
            return Ok(objs
                .into_iter()
                .map(|o| (o, objmap::ObjectState::Exists))
                .collect());
        }
        // Every listed object, also those only clones keep: their snap sets say.
        let objs = self.pool_listing().await?;
        let ids: Vec<u64> = h.snaps.iter().map(|s| s.id).collect();
        let at = snap
            .or(i.snap_id)
            .unwrap_or(crate::store::snapset::SNAP_HEAD);
        snaps::object_states(
            &i.data_home,
            &h.object_prefix,
            objs,
            at,
            &ids,
            h.features & RBD_FEATURE_FAST_DIFF != 0,
            &i.spec.to_string(),
        )
        .await
    }

    async fn read_object_map(&self, snap: Option<u64>) -> Result<Option<Vec<u8>>> {
        let i = &self.inner;
        i.check_readable()?;
        let oid = object_map_oid(&i.id, snap.or(i.snap_id));
        let st = i.meta.stat(&oid).await;
        let Some(st) = i.noting_fence(st)? else {
            return Ok(None);
        };
        let len = usize::try_from(st.size).map_err(|_| {
            Error::new(ErrorKind::Corrupt, format!("object map {oid} is too large"))
        })?;
        let data = i.meta.read(&oid, 0, len).await?.unwrap_or_default();
        if data.len() != len {
            return Err(Error::new(
                ErrorKind::Io,
                format!("object map {oid}: read {} of {len} bytes", data.len()),
            ));
        }
        Ok(Some(data))
    }

    /// cls_rbd's `object_map_save` decodes the map and writes it back with crcs using
    /// `write_full`; our bytes are already that encoding (objmap is checked byte for byte
    /// against maps written by Ceph), so a plain `write_full` stores the same object.
    async fn write_object_map(&self, data: Vec<u8>) -> Result<()> {
        let i = &self.inner;
        i.writable().await?;
        let oid = object_map_oid(&i.id, None);
        let mut op = WriteOp::new();
        op.write_full(&data);
        let r = i.meta.operate(&oid, op, "write_full").await;
        i.noting_fence(r)
    }

    async fn open_parent(&self) -> Result<Option<Self>> {
        let i = &self.inner;
        let Some(p) = self.header().parent else {
            return Ok(None);
        };
        let ctx = |e: Error| e.context(format!("opening {}, the parent of {}", p.spec, i.spec));
        let meta = i
            .meta
            .cluster()
            .ioctx_in(&p.spec.pool, &p.spec.namespace)
            .map_err(ctx)?;
        let img = open_by_id_at(
            meta,
            &p.spec,
            p.image_id.clone(),
            Some(p.snap_id),
            OpenMode::ReadOnly,
            super::store::OpenKnobs {
                allow_encrypted: i.allow_encrypted,
                lock_at_open: crate::store::LockAtOpen::Refuse,
            },
            i.luks_noted.clone(),
        )
        .await
        .map_err(ctx)?;
        Ok(Some(img))
    }

    fn header_updates(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        Some(self.inner.header_updates.subscribe())
    }

    async fn open_parent_head(&self, p: &ParentInfo, mode: OpenMode) -> Result<Self> {
        let i = &self.inner;
        let head = ImageSpec {
            snap: None,
            ..p.spec.clone()
        };
        let ctx = |e: Error| e.context(format!("opening {head}, the parent of {}", i.spec));
        let meta = i
            .meta
            .cluster()
            .ioctx_in(&p.spec.pool, &p.spec.namespace)
            .map_err(ctx)?;
        open_by_id_at(
            meta,
            &head,
            p.image_id.clone(),
            None,
            mode,
            super::store::OpenKnobs {
                allow_encrypted: i.allow_encrypted,
                // Maintenance of somebody else's image: never take its lock from a
                // live owner, nor wait for it.
                lock_at_open: crate::store::LockAtOpen::Refuse,
            },
            i.luks_noted.clone(),
        )
        .await
        .map_err(ctx)
    }

    async fn ask_parent_holder(
        &self,
        p: &ParentInfo,
        action: &crate::store::OwnerAction,
    ) -> Result<()> {
        let head = ImageSpec {
            snap: None,
            ..p.spec.clone()
        };
        let build = super::ask_owner::request_builder(&head, action)?;
        let io = self
            .inner
            .meta
            .cluster()
            .ioctx_in(&p.spec.pool, &p.spec.namespace)?;
        // By id: a parent in the image trash has no name that leads to it.
        let what = action.describe();
        super::ask_owner::ask_owner_of(&io, &p.image_id, &head, &what, build, |_, _| {}).await
    }

    async fn remove_trashed_parent(&self, p: &ParentInfo) -> Result<bool> {
        let i = &self.inner;
        super::store::remove_trashed_parent(
            i.meta.cluster(),
            p,
            i.allow_encrypted,
            i.luks_noted.clone(),
        )
        .await
        .map_err(|e| {
            e.context(format!(
                "removing {} (id {}) from the trash with its last clone",
                p.spec, p.image_id
            ))
        })
    }

    /// librbd's CopyupRequest::copyup: `rbd.copyup` (a no-op when the object exists)
    /// and the request's own op in one write operation with the image's snapshot
    /// context. Two cases send the copy-up alone first, with an EMPTY snapshot context,
    /// exactly as librbd does: a copy-up with no op on top (copy-on-read, flatten), and a
    /// "deep" copy-up (the child has snapshots and the parent's data is not all zeros) —
    /// written without a snapshot context, the copied-up data is what every existing
    /// snapshot of the child sees at that object (as if the child had always held it:
    /// deep-flatten), and the op that follows, with the real context, clones it for them.
    async fn copyup(
        &self,
        objno: u64,
        parent_data: Bytes,
        op: ObjectWrite,
        durable: bool,
    ) -> Result<()> {
        let extents = if parent_data.is_empty() {
            Vec::new()
        } else {
            vec![(0, parent_data.len() as u64)]
        };
        self.copyup_extents(objno, parent_data, extents, op, durable)
            .await
    }

    async fn copyup_extents(
        &self,
        objno: u64,
        parent_data: Bytes,
        extents: Vec<(u64, u64)>,
        op: ObjectWrite,
        _durable: bool,
    ) -> Result<()> {
        let i = &self.inner;
        i.writable().await?;
        i.fresh().await?;
        let end = match &op {
            ObjectWrite::Write { off, data } => off + data.len() as u64,
            _ => 0,
        };
        i.check_inside(objno, end)?;
        let oid = i.object_name(objno);
        let osize = i.object_size();
        // librbd's m_copyup_is_zero: all-zero parent data is not copied at all. Else,
        // as librbd with an OSD of Octopus or later (enable_sparse_copyup): only the
        // extents the ancestors had, rbd.sparse_copyup(extent map, their bytes).
        let zero = is_zero(&parent_data);
        let input = {
            let mut e = cls::Enc::new();
            let mut bytes = Vec::new();
            let ext: Vec<(u64, u64)> = if zero { Vec::new() } else { extents };
            e.u32(ext.len() as u32);
            for &(o, l) in &ext {
                let slice = usize::try_from(o)
                    .ok()
                    .zip(usize::try_from(o + l).ok())
                    .and_then(|(a, b)| parent_data.get(a..b))
                    .ok_or_else(|| {
                        Error::new(
                            ErrorKind::InvalidInput,
                            format!(
                                "copy-up of object {objno}: extent {o}+{l} past the {} bytes \
                                 read",
                                parent_data.len()
                            ),
                        )
                    })?;
                e.u64(o).u64(l);
                bytes.extend_from_slice(slice);
            }
            e.bytes(&bytes);
            e.done()
        };
        // (`zero` covers empty parent data too.)
        i.merge.release(objno);
        let copy_on_read = op == ObjectWrite::None;
        let deep = self.deep_copyup(&parent_data);
        if copy_on_read || deep {
            let mut cop = WriteOp::new();
            if zero {
                // Copy-on-read of an object no ancestor has data for: librbd still
                // copies up (rbd.sparse_copyup of no extents), and the object is
                // created, empty (sparse_copyup does; the create says so here too).
                cop.create(false);
            }
            cop.exec(c"rbd", c"sparse_copyup", &input)
                .set_alloc_hint(osize, osize);
            // `data_home` carries no snapshot context (librbd passes an empty one here).
            let r = i
                .data_home
                .operate(&oid, cop, "cls rbd.sparse_copyup on")
                .await;
            i.noting_fence(r)?;
        }
        if copy_on_read {
            return Ok(());
        }
        let mut wop = WriteOp::new();
        if !deep {
            if zero {
                // As librbd's sparse copy-up of nothing (cls rbd.sparse_copyup with no
                // extents creates the object): the change on top of it may be a zero or
                // a truncate, which would not create it, and inside the overlap the
                // object must exist afterwards, hiding the parent.
                wop.create(false);
            }
            wop.exec(c"rbd", c"sparse_copyup", &input);
            wop.set_alloc_hint(osize, osize);
        }
        // After a deep copy-up the change goes alone, without the hint, as librbd sends
        // it: a hint is a change to the OSD, which would clone the object for the
        // snapshots even when the change itself alters nothing (a zero past the end of
        // the copied-up data), and the head would count as written since them.
        match &op {
            ObjectWrite::None => {}
            ObjectWrite::Write { off, data } => {
                wop.write(*off, data);
            }
            // As `zero` (and librbd's discard): to the object's end, a truncate.
            ObjectWrite::Zero { off, len } if off.saturating_add(*len) >= osize => {
                wop.truncate(*off);
            }
            ObjectWrite::Zero { off, len } => {
                wop.zero(*off, *len);
            }
            ObjectWrite::Truncate { len } => {
                wop.truncate(*len);
            }
        }
        let r = i.data.operate(&oid, wop, "copy-up write").await;
        i.noting_fence(r)
    }

    /// Every snapshot a deep copy-up reaches, oldest first as librbd's m_snap_ids, but
    /// only those large enough to hold the object (cls_rbd refuses an update past the
    /// end of a map, and no read of a smaller snapshot reaches this object).
    fn copyup_snapshots(&self, objno: u64, parent_data: &[u8]) -> Vec<u64> {
        if !self.deep_copyup(parent_data) {
            return Vec::new();
        }
        let start = objno.saturating_mul(self.inner.object_size());
        let h = self.header();
        h.snaps
            .iter()
            .rev()
            .filter(|s| s.size > start)
            .map(|s| s.id)
            .collect()
    }

    /// cls `rbd.object_map_update` on the snapshot's map object, as librbd's
    /// object_map::UpdateRequest (no lock assertion for a snapshot's map, and a
    /// missing map is not an error: ignore_enoent).
    async fn update_snap_object_map(
        &self,
        snap: u64,
        objno: u64,
        state: objmap::ObjectState,
    ) -> Result<()> {
        let i = &self.inner;
        i.writable().await?;
        let oid = object_map_oid(&i.id, Some(snap));
        let input = cls::object_map_update_in(objno, objno + 1, state as u8, None);
        let r = i
            .meta
            .exec_write(&oid, RBD, "object_map_update", &input)
            .await;
        match i.noting_fence(r) {
            Ok(_) => Ok(()),
            Err(e) if e.kind == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e.context(format!(
                "updating object {objno} in the object map of snapshot {snap} of {}",
                i.spec
            ))),
        }
    }

    /// Flatten's last step, as librbd's FlattenRequest ends: DetachChildRequest (the
    /// parent forgets this child: `child_detach` on the parent's header for a format-2
    /// clone, known by its CLONE_CHILD op feature, else `remove_child` in `rbd_children`),
    /// then DetachParentRequest (`parent_detach`, legacy `remove_parent` on an OSD
    /// without it). cls_rbd clears the op features: CLONE_CHILD here once no snapshot
    /// keeps the parent (with deep-flatten, snapshots let go too), CLONE_PARENT on the
    /// parent once its last child is gone.
    async fn detach_parent(&self) -> Result<()> {
        let i = &self.inner;
        i.writable().await?;
        let Some(p) = self.header().parent else {
            return Ok(());
        };
        let ctx = |e: Error| e.context(format!("detaching {} from its parent {}", i.spec, p.spec));
        let op_features = match i
            .meta
            .exec_read(&i.hdr_oid, RBD, "op_features_get", &[])
            .await
        {
            Ok(b) => cls::u64_out(&b, "rbd.op_features_get reply").map_err(ctx)?,
            Err(e) if e.kind == ErrorKind::NotFound => 0,
            Err(e) if errno_of(&e) == Some(libc::EOPNOTSUPP) => 0,
            Err(e) => return Err(ctx(e)),
        };
        let pspec = cls::ParentSpec {
            pool_id: i
                .meta
                .cluster()
                .ioctx_in(&p.spec.pool, &p.spec.namespace)
                .map_err(ctx)?
                .pool_id(),
            namespace: p.spec.namespace.clone(),
            image_id: p.image_id.clone(),
            snap_id: p.snap_id,
        };
        // Without deep-flatten the child's snapshots keep reading from the parent: the
        // parent keeps its record of the child until the last of them goes (librbd's
        // FlattenRequest skips DetachChildRequest then).
        let h = self.header();
        let r = if !h.snaps.is_empty() && h.features & RBD_FEATURE_DEEP_FLATTEN == 0 {
            Ok(())
        } else if op_features & cls::OP_FEATURE_CLONE_CHILD != 0 {
            let pio = i
                .meta
                .cluster()
                .ioctx_in(&p.spec.pool, &p.spec.namespace)
                .map_err(ctx)?;
            let child = cls::ChildSpec {
                pool_id: i.meta.pool_id(),
                namespace: i.spec.namespace.clone(),
                image_id: i.id.clone(),
            };
            pio.exec_write(
                &header_oid(&p.image_id),
                RBD,
                "child_detach",
                &cls::child_attach_in(p.snap_id, &child),
            )
            .await
        } else {
            i.meta
                .exec_write(
                    "rbd_children",
                    RBD,
                    "remove_child",
                    &cls::v1_child_in(
                        &cls::ParentSpec {
                            namespace: String::new(),
                            ..pspec.clone()
                        },
                        Some(&i.id),
                    ),
                )
                .await
        };
        match r {
            Ok(()) => {}
            // Already forgotten (a detach interrupted after this step).
            Err(e) if e.kind == ErrorKind::NotFound => {}
            Err(e) => return Err(ctx(e)),
        }
        let r = match i
            .meta
            .exec_write(&i.hdr_oid, RBD, "parent_detach", &[])
            .await
        {
            Err(e) if errno_of(&e) == Some(libc::EOPNOTSUPP) => {
                i.meta
                    .exec_write(&i.hdr_oid, RBD, "remove_parent", &[])
                    .await
            }
            r => r,
        };
        match i.noting_fence(r) {
            Ok(()) => {}
            Err(e) if e.kind == ErrorKind::NotFound => {}
            Err(e) => return Err(ctx(e)),
        }
        refresh(i).await.map_err(ctx)?;
        let (meta, oid) = (i.meta.clone(), i.hdr_oid.clone());
        tokio::spawn(async move {
            let _ = meta
                .notify(&oid, &cls::header_update_notify(), NOTIFY_TIMEOUT_MS)
                .await;
        });
        Ok(())
    }

    /// librbd's SnapshotCreateRequest on the store side: a self-managed snapshot id from
    /// the pool, `snapshot_add` in the header (which copies the head's flags into the
    /// snapshot), then the header re-read so that writes carry the new snapshot context.
    async fn snap_create(&self, name: &str) -> Result<u64> {
        self.snap_add(name, None).await
    }

    /// As librbd's snap_get_group_namespace: the pool by id, the group's name from the
    /// group directory of the image's namespace in that pool, the group snapshot's from
    /// the group's header.
    async fn group_snap_names(
        &self,
        pool: i64,
        group_id: &str,
        snap_id: &str,
    ) -> Result<crate::store::GroupSnapNames> {
        let i = &self.inner;
        let ctx = |e: Error| {
            e.context(format!(
                "naming group {group_id} of a snapshot of {}",
                i.spec
            ))
        };
        let cluster = i.meta.cluster();
        let pool_name = cluster.pool_name(pool).map_err(ctx)?;
        let io = cluster
            .ioctx_in(&pool_name, &i.spec.namespace)
            .map_err(ctx)?;
        let b = io
            .exec_read(
                "rbd_group_directory",
                RBD,
                "dir_get_name",
                &cls::string_in(group_id),
            )
            .await
            .map_err(ctx)?;
        let group = cls::string_out(&b, "rbd.dir_get_name reply").map_err(ctx)?;
        let b = io
            .exec_read(
                &format!("rbd_group_header.{group_id}"),
                RBD,
                "group_snap_get_by_id",
                &cls::string_in(snap_id),
            )
            .await
            .map_err(ctx)?;
        let snap = cls::group_snap_name_out(&b).map_err(ctx)?;
        Ok(crate::store::GroupSnapNames {
            pool: pool_name,
            group,
            snap,
        })
    }

    async fn snap_create_in(&self, name: &str, namespace: &[u8]) -> Result<u64> {
        self.snap_add(name, Some(namespace)).await
    }

    /// librbd's SnapshotRemoveRequest after the object maps were merged by the caller:
    /// the snapshot's map object, the snapshot id (the OSDs then trim what only it kept),
    /// the header record.
    /// librbd's SnapshotRemoveRequest starts so: a snapshot that format-2 clones still
    /// use (its child_count) goes to the trash namespace (`snapshot_trash_add`, which
    /// renames it to a UUID) and stays, data and map untouched.
    async fn snap_trash_if_used(&self, id: u64) -> Result<bool> {
        let i = &self.inner;
        let ctx = |e: Error| e.context(format!("removing snapshot {id} of image {}", i.spec));
        i.writable().await.map_err(ctx)?;
        let b = i
            .meta
            .exec_read(&i.hdr_oid, RBD, "snapshot_get", &cls::snap_in(id))
            .await;
        let info = cls::snapshot_get_out(&i.noting_fence(b).map_err(ctx)?).map_err(ctx)?;
        if info.child_count == 0 {
            return Ok(false);
        }
        if matches!(info.namespace, crate::store::SnapNamespace::Trash { .. }) {
            return Ok(true); // in the trash already, still used
        }
        i.change_header("snapshot_trash_add", &cls::snap_in(id))
            .await
            .map_err(ctx)?;
        Ok(true)
    }

    /// In librbd's order: the map, the header's record (cls refuses while clones are
    /// attached: checked again atomically), and only then the RADOS snapshot itself,
    /// whose data the OSD then trims — never while the header or a clone still needs it.
    async fn snap_remove(&self, id: u64) -> Result<()> {
        let i = &self.inner;
        let ctx = |e: Error| e.context(format!("removing snapshot {id} of image {}", i.spec));
        i.writable().await.map_err(ctx)?;
        let r = i.meta.remove(&object_map_oid(&i.id, Some(id))).await;
        i.noting_fence(r).map_err(ctx)?;
        i.change_header("snapshot_remove", &cls::snap_in(id))
            .await
            .map_err(ctx)?;
        i.data.selfmanaged_snap_remove(id).await.map_err(ctx)?;
        i.snap_ios
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        Ok(())
    }

    async fn rename(&self, dest: &str) -> Result<()> {
        let i = &self.inner;
        i.check_writable()?;
        super::store::rename_image(&i.meta, &i.id, dest).await
    }

    async fn snap_rename(&self, id: u64, new_name: &str) -> Result<()> {
        let i = &self.inner;
        i.change_header("snapshot_rename", &cls::snapshot_rename_in(id, new_name))
            .await
            .map_err(|e| {
                e.context(format!(
                    "renaming snapshot {id} of image {} to {new_name}",
                    i.spec
                ))
            })
    }

    /// Unprotecting goes through UNPROTECTING, as librbd's SnapshotUnprotectRequest:
    /// a clone made meanwhile by librbd sees the snapshot no longer protected and fails;
    /// if clones exist, the snapshot goes back to PROTECTED and the unprotect fails.
    async fn snap_set_protected(&self, id: u64, protected: bool) -> Result<()> {
        let i = &self.inner;
        let what = if protected {
            "protecting"
        } else {
            "unprotecting"
        };
        let ctx = |e: Error| e.context(format!("{what} snapshot {id} of image {}", i.spec));
        let set = |status: u8| cls::set_protection_status_in(id, status);
        if protected {
            return i
                .change_header("set_protection_status", &set(cls::PROTECTION_PROTECTED))
                .await
                .map_err(ctx);
        }
        i.change_header("set_protection_status", &set(cls::PROTECTION_UNPROTECTING))
            .await
            .map_err(ctx)?;
        let children = match i.v1_children(id).await {
            Ok(c) => c,
            Err(e) => {
                let _ = i
                    .change_header("set_protection_status", &set(cls::PROTECTION_PROTECTED))
                    .await;
                return Err(ctx(e));
            }
        };
        if !children.is_empty() {
            i.change_header("set_protection_status", &set(cls::PROTECTION_PROTECTED))
                .await
                .map_err(ctx)?;
            let mut pools: Vec<&str> = children.iter().map(|(p, _)| p.as_str()).collect();
            pools.dedup();
            return Err(ctx(Error::new(
                ErrorKind::Busy,
                format!(
                    "it has {} format-1 clone(s), in pool(s) {} (see `rbd children`); flatten or remove them first",
                    children.len(),
                    pools.join(", ")
                ),
            )));
        }
        i.change_header("set_protection_status", &set(cls::PROTECTION_UNPROTECTED))
            .await
            .map_err(ctx)
    }

    /// librados' rollback, as librbd's SnapshotRollbackRequest does per object: the
    /// OSD makes the head a copy of the snapshot's clone, so the snap set (what `rbd
    /// diff` and `object-map check` read) says the head is unchanged since then.
    async fn rollback_object(&self, objno: u64, snap: u64) -> Result<bool> {
        let i = &self.inner;
        i.writable().await?;
        i.fresh().await?;
        i.merge.release(objno);
        let r = i
            .data
            .selfmanaged_snap_rollback(&i.object_name(objno), snap)
            .await;
        i.noting_fence(r)?;
        Ok(true)
    }

    /// As `write_object_map`: our encoding is cls_rbd's.
    async fn write_snap_object_map(&self, snap: u64, data: Vec<u8>) -> Result<()> {
        let i = &self.inner;
        i.writable().await?;
        let oid = object_map_oid(&i.id, Some(snap));
        let mut op = WriteOp::new();
        op.write_full(&data);
        let r = i.meta.operate(&oid, op, "write_full").await;
        i.noting_fence(r)
    }

    async fn snap_flags(&self, snap: u64) -> Result<u64> {
        let i = &self.inner;
        let b = i
            .meta
            .exec_read(&i.hdr_oid, RBD, "get_flags", &cls::snap_in(snap))
            .await
            .map_err(|e| {
                e.context(format!(
                    "reading the flags of snapshot {snap} of image {}",
                    i.spec
                ))
            })?;
        cls::u64_out(&b, "rbd.get_flags reply")
    }

    async fn close(&self) -> Result<()> {
        let i = &self.inner;
        if i.closed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        // Before the lock goes: an update still in flight then would land after an
        // unmap returned.
        i.timestamps.settle().await;
        let (held, ops) = i.merge.counts();
        if held > 0 {
            tracing::debug!(
                image = %i.spec,
                "{held} writes waited behind another to their object and went out in {ops} operations"
            );
        }
        // No more requests for the owner: the image layer's loop ends.
        i.owner_tx.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some(state) = i.lock.lock().await.take() else {
            return Ok(());
        };
        let _ = state.stop.send(true);
        // Our AcquiredLock notify may still be waiting for acks (ours among them: the
        // watch still answers it); it ends within its own timeout.
        if let Some(n) = state.acquired_notify {
            let _ = n.await;
        }
        // The event task sees `stop` once what it is doing (a header refresh) is done;
        // a re-registration in progress may take longer, so the wait is bounded.
        if let Some(ev) = state.events {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(10), ev).await;
        }
        // No quiesce task of ours outlives the handle; a quiesced file system is thawed.
        i.quiesce.stop(&i.spec).await;
        if i.released.load(Ordering::SeqCst) && !i.is_fenced() {
            // Handed over and not taken back: the lock is another client's; only our
            // watch ends.
            let unwatched = i.meta.unwatch(state.watch).await;
            unwatched.map_err(|e| e.context(format!("closing image {}", i.spec)))?;
            tracing::info!(image = %i.spec, "closed (the lock was with another client)");
            return Ok(());
        }
        if i.is_fenced() {
            // The lock is someone else's now: no unlock, no notify. Only our watch is
            // ended (librados would otherwise keep re-registering it), bounded, since a
            // blocklisted client may wait on the OSD for nothing.
            let _ = tokio::time::timeout(
                std::time::Duration::from_secs(5),
                i.meta.unwatch(state.watch),
            )
            .await;
            return Err(i.fenced_error());
        }
        let unlocked = i
            .meta
            .exec_write(
                &i.hdr_oid,
                LOCK,
                "unlock",
                &cls::unlock_in(cls::RBD_LOCK_NAME, &state.cookie),
            )
            .await;
        // Waiting librbd clients retry on ReleasedLock instead of after their timeout.
        let gid = i.meta.cluster().instance_id();
        let msg = cls::lock_notify(cls::NOTIFY_OP_RELEASED_LOCK, gid, state.watch.cookie);
        let _ = i.meta.notify(&i.hdr_oid, &msg, 1000).await;
        let unwatched = i.meta.unwatch(state.watch).await;
        unlocked.map_err(|e| e.context(format!("unlocking image {}", i.spec)))?;
        unwatched.map_err(|e| e.context(format!("closing image {}", i.spec)))?;
        tracing::info!(image = %i.spec, "released {}", lock_name(i.mode));
        Ok(())
    }
}
