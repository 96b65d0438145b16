//! Resizing an image, and the requests other clients address to the lock holder.

use super::map::new_map;
use super::{all_concurrently, Image, MAX_IMAGE_SIZE};
use crate::error::{Error, ErrorKind, Result};
use crate::store::{ImageStore, OwnerAction, OwnerRequest, SnapNamespace};
use objmap::ObjectState;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// What a shrink from `old` to `new_size` bytes zeroes of the object it now ends in, as
/// (object, offset, length): librbd's TrimRequest "clean boundary", from the new end to the
/// object's end or the old end, whichever comes first. Only to the old end: zeroing to
/// the object's end would be a truncate there, which lengthens an object shorter than
/// that (seen against librbd twins: an object librbd leaves at 12 KiB grew to 1 MiB, and
/// with a snapshot got a clone, so `rbd diff --from-snap` listed zeros). None when the new
/// size is on an object boundary.
pub(super) fn boundary_cut(new_size: u64, old: u64, osize: u64) -> Option<(u64, u64, u64)> {
    let tail = new_size % osize;
    if tail == 0 || old <= new_size {
        return None;
    }
    let last = new_size / osize;
    let end = old.min((last + 1) * osize);
    Some((last, tail, end - new_size))
}

impl<S: ImageStore> Image<S> {
    /// Changes the image's size, as `rbd resize` does: asked by another client through
    /// the lock we hold (Ceph), or by `rados-nbd resize`. Waits for in-flight requests
    /// and holds new ones off meanwhile. Shrinking needs `allow_shrink`; it removes the
    /// objects past the new end and zeroes the tail of the last one, as librbd does, so
    /// that growing again later reads zeros there, then writes the new size. Growing
    /// writes the new size and extends the map with NONEXISTENT objects. The dirty flag
    /// is set first, so a crash part way leaves a map that will be rebuilt.
    ///
    /// Clients connected before a resize keep the size they were told at the handshake
    /// (NBD cannot tell them otherwise); requests past the new end of a smaller image get
    /// an error, and new connections see the new size.
    pub async fn resize(&self, new_size: u64, allow_shrink: bool) -> Result<()> {
        self.check_writable()?;
        let spec = &self.spec;
        if self.shared {
            // Its other writers would go on with the old size (and, shrinking, write
            // objects we just removed).
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!("{spec} is a shared image: resizing one is not supported; set shared=false and stop its other writers first"),
            ));
        }
        // The map is resized (and, shrinking, says which objects to remove): whole only.
        self.whole_map(&format!("resizing {spec}")).await?;
        let g = self.gate.write().await;
        if *g {
            return Err(Error::new(
                ErrorKind::Interrupted,
                format!("{spec} is closing; not resized"),
            ));
        }
        let old = self.size();
        if new_size == old {
            return Ok(());
        }
        if new_size < old && !allow_shrink {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "shrinking {spec} from {old} to {new_size} bytes discards data; it needs allow-shrink (--allow-shrink)"
                ),
            ));
        }
        if new_size > MAX_IMAGE_SIZE {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("size {new_size} too large (at most 2^60 bytes)"),
            ));
        }
        let ctx = |e: Error| e.context(format!("resizing {spec} from {old} to {new_size} bytes"));
        // Whether the boundary object was copied up with the cut already made.
        let mut copied_cut = false;
        if new_size < old && self.chain().is_some() {
            // Copy-ups change the map: before the new one is made from it.
            self.dirty_before(|| true).await.map_err(ctx)?;
            copied_cut = self
                .copyup_before_shrink(new_size, old)
                .await
                .map_err(ctx)?;
        }
        let osize = self.header.object_size();
        let (old_count, new_count) = (old.div_ceil(osize), new_size.div_ceil(osize));
        let map = self.map();
        let new_map = match &map {
            Some(m) => {
                super::check_map_size(self.header.features, new_size, self.header.order)?;
                let n = new_map(new_count, spec)?;
                for run in m.runs(0..old_count.min(new_count)) {
                    if run.state != ObjectState::Nonexistent {
                        n.set_range(run.start..run.end(), run.state);
                    }
                }
                Some(Arc::new(n))
            }
            None => None,
        };
        self.dirty_before(|| true).await.map_err(ctx)?;
        if new_size < old {
            let doomed: Vec<u64> = match &map {
                Some(m) => m
                    .runs(new_count..old_count)
                    .filter(|r| r.state != ObjectState::Nonexistent)
                    .flat_map(|r| r.start..r.end())
                    .collect(),
                // Without a map (a shared image) ask the store what exists.
                None => self
                    .store
                    .list_objects(None)
                    .await
                    .map_err(ctx)?
                    .into_iter()
                    .filter(|&o| o >= new_count)
                    .collect(),
            };
            // Requests wait meanwhile (the gate is held), so the objects go
            // MANAGEMENT_CONCURRENCY at a time, as librbd's trim removes them
            // (`rbd_concurrent_management_ops`), not one round trip after another.
            let map = &map;
            all_concurrently(
                doomed,
                |objno| async move {
                    self.store.remove(objno, false).await?;
                    // Gone: should a later step fail, the image keeps its old size and
                    // map, which must not claim an object that is not there (inside a
                    // parent overlap, a claim lets a change skip its copy-up). So a
                    // failure lets the removals under way end and be marked.
                    if let Some(m) = map {
                        m.set(objno, ObjectState::Nonexistent);
                    }
                    Ok(())
                },
                || {},
            )
            .await
            .map_err(ctx)?;
            let cut = boundary_cut(new_size, old, osize).filter(|&(last, _, _)| {
                !copied_cut
                    && !map
                        .as_ref()
                        .is_some_and(|m| m.get(last) == ObjectState::Nonexistent)
            });
            if let Some((last, tail, len)) = cut {
                // The cut changes the object's bytes: EXISTS_CLEAN (unchanged since the
                // newest snapshot) becomes EXISTS, as librbd's discard of the boundary
                // marks it, or `rbd diff --from-snap` (incremental backups) would miss it.
                if let Some(n) = &new_map {
                    if n.get(last) == ObjectState::ExistsClean {
                        n.set(last, ObjectState::Exists);
                    }
                }
                self.store.zero(last, tail, len, false).await.map_err(ctx)?;
            }
            self.store.sync().await.map_err(ctx)?;
        }
        self.store.set_size(new_size).await.map_err(ctx)?;
        // The store lowered the overlap with the size (as cls_rbd's set_size does).
        if let Some(c) = self.chain() {
            c.shrink_overlap(new_size);
        }
        *self.map.write().unwrap_or_else(|p| p.into_inner()) = new_map;
        self.size.store(new_size, Ordering::Release);
        self.size_tx.send_replace(new_size);
        tracing::info!("resized {spec} from {old} to {new_size} bytes");
        drop(g);
        Ok(())
    }

    /// Serves the requests other clients address to the lock holder (resize, snapshot
    /// create/remove/rename/protect, flatten, object map rebuild, sparsify, features, the
    /// lock itself), if the store takes any for this handle, and sends each result back
    /// to its asker. A flatten or a sparsify (long: object by object, each under the
    /// gate as a client write is) runs beside the other requests, as librbd's owner runs
    /// operations of different kinds side by side, so that a backup's `rbd snap create`
    /// or an `rbd resize` does not wait for a flatten of a large clone; the others run
    /// one at a time, and one long request at a time (a second waits for the first, as
    /// librbd queues an operation of the kind already running; nothing else waits for
    /// them). A hand-over stops the long requests first. Ends when the store stops
    /// sending (closed) or the image is dropped. The header updates of the other
    /// owner, while the lock is its, are followed too (`follow_header_updates`).
    pub fn serve_owner_requests(self: &Arc<Self>) {
        self.follow_header_updates();
        let Some(mut rx) = self.store.owner_requests() else {
            return;
        };
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            // The long request running, and those queued behind it: what a hand-over
            // stopped comes back, to be answered once the lock is gone.
            let mut long: Option<tokio::task::JoinHandle<Vec<Interrupted>>> = None;
            while let Some(req) = rx.recv().await {
                let Some(img) = me.upgrade() else { break };
                match req.action {
                    OwnerAction::Flatten | OwnerAction::Sparsify { .. } => {
                        // One long request at a time: this one starts when the one before
                        // ends (librbd queues an operation of the kind already running),
                        // and nothing after it waits for either.
                        let before = long.take();
                        let img = img.clone();
                        long = Some(tokio::spawn(async move {
                            let mut stopped = match before {
                                Some(h) => h.await.unwrap_or_default(),
                                None => Vec::new(),
                            };
                            let (r, done) = run_owner_action(&img, req).await;
                            if r.is_err() && img.interrupt_long.load(Ordering::Acquire) {
                                stopped.push((r, done));
                            } else {
                                finish_owner_request(r, done);
                            }
                            stopped
                        }));
                    }
                    OwnerAction::ReleaseLock => {
                        // Another client wants the lock: the long requests stop at the next
                        // object (librbd's owner cancels its requests before it releases);
                        // their askers hear of it once the lock is gone, so that they send
                        // them again to the new owner (ERESTART).
                        let mut stopped = Vec::new();
                        if let Some(h) = long.take() {
                            img.interrupt_long.store(true, Ordering::Release);
                            stopped = h.await.unwrap_or_default();
                            img.interrupt_long.store(false, Ordering::Release);
                        }
                        let (r, done) = run_owner_action(&img, req).await;
                        finish_owner_request(r, done);
                        for (r, done) in stopped {
                            finish_owner_request(r, done);
                        }
                    }
                    // Beside the long ones: each step of those holds the gate as a client
                    // write does, so a request that takes the whole gate (resize, rebuild,
                    // features, a snapshot) comes between two steps, and the steps after
                    // it see the image as it left it (its size, overlap, map, features).
                    _ => {
                        let (r, done) = run_owner_action(&img, req).await;
                        finish_owner_request(r, done);
                    }
                }
            }
        });
    }

    /// The image's size now, and every later change (a resize while attached): the
    /// kernel attach code passes changes on to /dev/nbdX.
    pub fn size_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.size_tx.subscribe()
    }
}

/// A long request stopped for a hand-over: its result, sent once the lock is gone.
type Interrupted = (Result<()>, tokio::sync::oneshot::Sender<Result<()>>);

/// Sends a request's result back to its asker; the failure is logged here (the asker
/// gets its errno only).
fn finish_owner_request(r: Result<()>, done: tokio::sync::oneshot::Sender<Result<()>>) {
    if let Err(e) = &r {
        tracing::warn!("{e}");
    }
    let _ = done.send(r);
}

/// The removal of a snapshot outside the user namespace, asked by another client.
async fn ns_snap_remove_asked<S: ImageStore>(
    img: &Arc<Image<S>>,
    name: &str,
    namespace_type: u32,
) -> Result<()> {
    tracing::info!(
        "removal of snapshot {}@{name} (a group, mirror or trashed one) asked by another client",
        img.spec
    );
    img.ns_snap_remove(name, namespace_type).await
}

/// Performs one request another client addressed to the lock holder (see
/// `Image::serve_owner_requests`); the caller sends the result back.
async fn run_owner_action<S: ImageStore>(
    img: &Arc<Image<S>>,
    req: OwnerRequest,
) -> (Result<()>, tokio::sync::oneshot::Sender<Result<()>>) {
    let OwnerRequest {
        action,
        progress,
        done,
    } = req;
    let report = |d, t| {
        progress.send_replace((d, t));
    };
    let spec = &img.spec;
    let r = match action {
        OwnerAction::Resize { size, allow_shrink } => {
            tracing::info!(
                "resize of {spec} to {size} bytes asked by another client{}",
                if allow_shrink {
                    " (shrinking allowed)"
                } else {
                    ""
                }
            );
            img.resize(size, allow_shrink).await
        }
        OwnerAction::Rename { new_name } => {
            tracing::info!("rename to {new_name} asked by another client (image opened as {spec})");
            img.rename(&new_name).await
        }
        OwnerAction::SnapRemove { name } => {
            tracing::info!("removal of snapshot {spec}@{name} asked by another client");
            img.snap_remove(&name).await
        }
        OwnerAction::SnapRename { snap_id, new_name } => {
            match img
                .store
                .header()
                .snaps
                .iter()
                .find(|s| s.id == snap_id && s.is_user())
            {
                Some(s) => {
                    tracing::info!(
                        "rename of snapshot {spec}@{} to {new_name} asked by another client",
                        s.name
                    );
                    img.snap_rename(&s.name.clone(), &new_name).await
                }
                None => Err(Error::new(
                    ErrorKind::NotFound,
                    format!("{spec}: no snapshot with id {snap_id} to rename"),
                )),
            }
        }
        OwnerAction::SnapProtect { name, protected } => {
            tracing::info!(
                "{} of snapshot {spec}@{name} asked by another client",
                if protected {
                    "protection"
                } else {
                    "unprotection"
                }
            );
            img.snap_set_protected(&name, protected).await
        }
        OwnerAction::Flatten => {
            tracing::info!("flatten of {spec} asked by another client");
            img.flatten(report).await
        }
        OwnerAction::RebuildObjectMap => {
            tracing::info!("object map rebuild of {spec} asked by another client");
            img.rebuild_object_map(report).await.map(|_| ())
        }
        OwnerAction::Sparsify { sparse_size } => {
            tracing::info!(
                "sparsify of {spec} (runs of {sparse_size} zero bytes) asked by another client"
            );
            img.sparsify(sparse_size, report).await
        }
        OwnerAction::UpdateFeatures { features, enabled } => {
            tracing::info!(
                "{} of features {features:#x} of {spec} asked by another client",
                if enabled { "enabling" } else { "disabling" }
            );
            img.update_features(features, enabled).await
        }
        OwnerAction::ReleaseLock => img.hand_over().await,
        OwnerAction::NsSnapCreate { name, namespace } => {
            tracing::info!(
                "snapshot {spec}@{name} (a group or mirror one) asked by another client"
            );
            img.ns_snap_create(&name, &namespace).await.map(|_| ())
        }
        OwnerAction::NsSnapRemove {
            name,
            namespace_type,
        } => ns_snap_remove_asked(img, &name, namespace_type).await,
        OwnerAction::TrashSnapRemove { name, .. } => {
            ns_snap_remove_asked(img, &name, SnapNamespace::TRASH_TYPE).await
        }
        OwnerAction::SnapCreate { name, quiesce } => {
            tracing::info!("snapshot {spec}@{name} asked by another client");
            // snap_create holds every request off (the gate) while it syncs
            // and takes the snapshot: every acknowledged write is in it; with
            // --quiesce the hook runs around it.
            img.snap_create_quiesced(&name, quiesce).await
        }
    };
    (r, done)
}

#[cfg(test)]
mod boundary_tests {
    use super::boundary_cut;
    const M: u64 = 1 << 20;

    #[test]
    fn the_cut_ends_at_the_old_end_or_the_objects_end() {
        // Old end inside the same object: zero to the old end only.
        assert_eq!(boundary_cut(5 * M, 6 * M, 4 * M), Some((1, M, M)));
        // Old end past the object: to the object's end.
        assert_eq!(boundary_cut(5 * M, 12 * M, 4 * M), Some((1, M, 3 * M)));
        // On an object boundary, or no shrink: nothing to cut.
        assert_eq!(boundary_cut(8 * M, 12 * M, 4 * M), None);
        assert_eq!(boundary_cut(5 * M, 5 * M, 4 * M), None);
    }
}
