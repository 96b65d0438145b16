//! Clones: a child's header names its parent (pool, image id, snapshot id, overlap)
//! and the parent's header lists its children, as cls_rbd keeps them; copy-up builds
//! an object in a temporary file and links it into place only if none exists.

use super::header::{
    parse_header, read_directory, read_file_opt, read_image_id, write_atomic, ChildRecord,
    HeaderFile, ParentRecord,
};
use super::lock::lock_pool;
use super::snap::Change;
use super::{blocking, create_locked, lock, open_by_id, DirImage, DirStore, Inner, SnapSel};
use crate::error::{Error, ErrorKind, Result};
use crate::spec::ImageSpec;
use crate::store::{
    ChildImage, CloneOptions, ObjectWrite, OpenMode, ParentInfo, Store, RBD_FEATURE_DEEP_FLATTEN,
    RBD_FEATURE_LAYERING,
};
use std::fs::File;
use std::path::Path;
use std::sync::atomic::Ordering;

/// The parent's names from the ids in `rec`. Never fails: a parent that cannot be
/// found keeps its ids as names, and opening it says what is missing.
pub(super) fn resolve_parent(root: &Path, rec: &ParentRecord) -> ParentInfo {
    let pool_dir = root.join(&rec.pool);
    let name = read_directory(&pool_dir)
        .ok()
        .and_then(|d| d.into_iter().find(|(_, id)| *id == rec.image_id))
        .map_or_else(|| rec.image_id.clone(), |(n, _)| n);
    let snap = read_header(&pool_dir, &rec.image_id)
        .ok()
        .and_then(|h| h.snapshots.into_iter().find(|s| s.id == rec.snap_id))
        .map_or_else(|| rec.snap_id.to_string(), |s| s.name);
    ParentInfo {
        spec: ImageSpec {
            pool: rec.pool.clone(),
            namespace: rec.namespace.clone(),
            name,
            snap: Some(snap),
        },
        image_id: rec.image_id.clone(),
        snap_id: rec.snap_id,
        overlap: rec.overlap,
        // The directory store has no image trash.
        in_trash: false,
    }
}

fn read_header(pool_dir: &Path, id: &str) -> Result<HeaderFile> {
    let path = pool_dir.join(format!("rbd_header.{id}"));
    let b = read_file_opt(&path)?.ok_or_else(|| {
        Error::new(
            ErrorKind::NotFound,
            format!("image header {} not found", path.display()),
        )
    })?;
    parse_header(&path, id, &b)
}

/// Read-modify-write of header `id` in `pool_dir`; the caller holds the pool lock.
fn edit_header(
    pool_dir: &Path,
    id: &str,
    f: impl FnOnce(&mut HeaderFile) -> Result<()>,
) -> Result<()> {
    let mut h = read_header(pool_dir, id)?;
    f(&mut h)?;
    let data = serde_json::to_vec_pretty(&h)
        .map_err(|e| Error::new(ErrorKind::Io, format!("encoding header: {e}")))?;
    write_atomic(pool_dir, &format!("rbd_header.{id}"), &data)
}

/// Takes the locks of both pools (once when they are the same), in name order.
fn lock_pools(a: &Path, b: &Path) -> Result<Vec<File>> {
    let (first, second) = if a <= b { (a, b) } else { (b, a) };
    let mut v = vec![lock_pool(first)?];
    if first != second {
        v.push(lock_pool(second)?);
    }
    Ok(v)
}

/// Removes the record of child `child_pool`/`child_id` from the parent `p` names.
/// A parent already gone is not an error.
pub(super) fn drop_child_record(
    child_pool_dir: &Path,
    p: &ParentRecord,
    child_pool: &str,
    child_id: &str,
) -> Result<()> {
    let root = child_pool_dir.parent().unwrap_or(Path::new("/"));
    let pool_dir = root.join(&p.pool);
    if !pool_dir.is_dir() {
        return Ok(());
    }
    let _l = lock_pool(&pool_dir)?;
    match edit_header(&pool_dir, &p.image_id, |h| {
        h.children.retain(|c| {
            !(c.pool == child_pool && c.image_id == child_id && c.snap_id == p.snap_id)
        });
        Ok(())
    }) {
        Err(e) if e.kind == ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

pub(super) async fn clone_image(
    store: &DirStore,
    parent: &ImageSpec,
    child: &ImageSpec,
    opts: &CloneOptions,
) -> Result<()> {
    let Some(snap_name) = parent.snap.clone() else {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!("cloning {parent}: name the parent snapshot (PARENT@SNAP)"),
        ));
    };
    if let Some(unit) = opts.stripe_unit.filter(|&u| u != 1u64 << opts.order) {
        return Err(Error::new(
            ErrorKind::Unsupported,
            format!(
                "cannot clone {parent} into {child} with stripe unit {unit}: striping is a \
                 Ceph store feature ({} stores each object whole)",
                store.describe()
            ),
        ));
    }
    if child.snap.is_some() {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!("cloning into {child}: the clone cannot be a snapshot"),
        ));
    }
    if !matches!(opts.clone_format, 0..=2) {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!("clone format {} (1, 2, or 0: auto)", opts.clone_format),
        ));
    }
    if let Some(p) = &opts.data_pool {
        return Err(Error::new(
            ErrorKind::Unsupported,
            format!(
                "cannot clone into {child} with --data-pool {p}: a separate data pool is a \
                 Ceph store feature ({} keeps every object in the pool's directory)",
                store.describe()
            ),
        ));
    }
    let ppool = store.pool_dir(&parent.pool);
    let cpool = store.pool_dir(&child.pool);
    let desc = store.describe();
    let (parent, child, mut opts) = (parent.clone(), child.clone(), opts.clone());
    // No old clients to keep out here: auto is format 2.
    if opts.clone_format == 0 {
        opts.clone_format = 2;
    }
    blocking(move || {
        let not_found = || {
            Error::new(
                ErrorKind::NotFound,
                format!("image {parent} not found in {desc}"),
            )
        };
        if !ppool.is_dir() {
            return Err(not_found());
        }
        std::fs::create_dir_all(&cpool)
            .map_err(|e| Error::io(format!("creating {}", cpool.display()), e))?;
        let _locks = lock_pools(&ppool, &cpool)?;
        let pid = read_image_id(&ppool, &parent.name)?.ok_or_else(not_found)?;
        let ph = read_header(&ppool, &pid)?;
        let snap = ph
            .snapshots
            .iter()
            .find(|s| s.name == snap_name)
            .cloned()
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::NotFound,
                    format!("snapshot {parent} not found in {desc}"),
                )
            })?;
        if ph.features & RBD_FEATURE_LAYERING == 0 {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("cloning {parent}: the parent image does not have the layering feature"),
            ));
        }
        if opts.clone_format == 1 && !snap.protected {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "cloning {parent}: the snapshot is not protected (protect it, or use clone format 2)"
                ),
            ));
        }
        let create = crate::store::CreateOptions {
            size: snap.size,
            order: opts.order,
            features: opts.features,
            data_pool: None,
            stripe_unit: None,
        };
        let rec = ParentRecord {
            pool: parent.pool.clone(),
            namespace: String::new(),
            image_id: pid.clone(),
            snap_id: snap.id,
            overlap: snap.size,
        };
        // The parent records the child first: a crash before the child is whole
        // leaves a record `children` skips (it lists only images that exist), never
        // a clone its parent does not know of, whose snapshot could then be removed.
        create_locked(&cpool, &child, &create, Some(rec), &desc, |cid| {
            edit_header(&ppool, &pid, |h| {
                h.children.push(ChildRecord {
                    snap_id: snap.id,
                    pool: child.pool.clone(),
                    image_id: cid.to_string(),
                });
                Ok(())
            })
        })
        .map(|_| ())
    })
    .await
}

/// `rbd children`: the clones of `parent@snap` (or of its snapshot `snap_id`), or of every
/// snapshot of `parent` when neither is given; with `descendants`, theirs too. The
/// directory store has no image trash.
pub(super) async fn children(
    store: &DirStore,
    parent: &ImageSpec,
    snap_id: Option<u64>,
    descendants: bool,
) -> Result<Vec<ChildImage>> {
    let ppool = store.pool_dir(&parent.pool);
    let root = store.root.clone();
    let desc = store.describe();
    let parent = parent.clone();
    blocking(move || {
        let pid = read_image_id(&ppool, &parent.name)?.ok_or_else(|| {
            Error::new(
                ErrorKind::NotFound,
                format!("image {parent} not found in {desc}"),
            )
        })?;
        let h = read_header(&ppool, &pid)?;
        let snap_id = match (&parent.snap, snap_id) {
            (_, Some(want)) => {
                if !h.snapshots.iter().any(|s| s.id == want) {
                    return Err(Error::new(
                        ErrorKind::NotFound,
                        format!("snapshot id {want} of {parent} not found in {desc}"),
                    ));
                }
                Some(want)
            }
            (None, None) => None,
            (Some(name), None) => Some(
                h.snapshots
                    .iter()
                    .find(|s| &s.name == name)
                    .ok_or_else(|| {
                        Error::new(
                            ErrorKind::NotFound,
                            format!("snapshot {parent} not found in {desc}"),
                        )
                    })?
                    .id,
            ),
        };
        let mut out = Vec::new();
        // (pool, header) of each image whose children are still to list, and which of
        // its snapshots: a clone's own clones follow it, as librbd's list_descendants.
        let mut todo = vec![(h, snap_id)];
        let mut seen = std::collections::HashSet::new();
        while let Some((h, snap_id)) = todo.pop() {
            for c in h
                .children
                .iter()
                .filter(|c| snap_id.is_none_or(|s| c.snap_id == s))
            {
                if !seen.insert((c.pool.clone(), c.image_id.clone())) {
                    continue;
                }
                let pool_dir = root.join(&c.pool);
                let dir = read_directory(&pool_dir)?;
                let Some((name, _)) = dir.into_iter().find(|(_, id)| *id == c.image_id) else {
                    continue;
                };
                out.push(ChildImage {
                    spec: ImageSpec {
                        pool: c.pool.clone(),
                        namespace: String::new(),
                        name,
                        snap: None,
                    },
                    id: c.image_id.clone(),
                    trash: false,
                });
                if descendants {
                    todo.push((read_header(&pool_dir, &c.image_id)?, None));
                }
            }
        }
        ChildImage::sort_dedup(&mut out);
        Ok(out)
    })
    .await
}

impl Inner {
    /// The parent record this handle reads through: the snapshot's for a handle at a
    /// snapshot, else the head's.
    fn parent_record(&self) -> Option<ParentRecord> {
        lock(&self.header).parent_at(self.snap)
    }

    pub(super) fn refresh_parent_info(&self) {
        let info = self.parent_record().map(|p| resolve_parent(&self.root, &p));
        *lock(&self.parent_info) = info;
    }

    pub(super) fn open_parent(&self) -> Result<Option<DirImage>> {
        let Some(rec) = self.parent_record() else {
            return Ok(None);
        };
        let info = resolve_parent(&self.root, &rec);
        let desc = format!("dir:{}", self.root.display());
        open_by_id(
            self.root.join(&rec.pool),
            rec.image_id.clone(),
            OpenMode::ReadOnly,
            Some(SnapSel::Id(rec.snap_id)),
            &info.spec,
            &desc,
        )
        .map(Some)
        .map_err(|e| e.context(format!("opening the parent of image {}", self.id)))
    }

    pub(super) fn copyup(
        &self,
        objno: u64,
        parent_data: &[u8],
        op: &ObjectWrite,
        durable: bool,
    ) -> Result<()> {
        let head = self.object_path(objno);
        let exists = match std::fs::symlink_metadata(&head) {
            Ok(_) => true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => return Err(Error::io(format!("looking up {}", head.display()), e)),
        };
        if !exists {
            // When the child has snapshots, a deep copy-up (as librbd's): the parent's
            // data becomes the snapshots' version of the object first. Otherwise (all
            // zeros, or a version already kept) a whiteout says the object did not
            // exist in them (their reads go to the parent).
            let deep = !self.deep_copyup_snaps(objno, parent_data)?.is_empty();
            if deep && matches!(op, ObjectWrite::None) {
                // Copy-on-read: the head alone covers those snapshots until its next
                // change (RADOS: the copy-up, under an empty snapshot context, has no
                // write on top for the OSD to clone it), so the head is unchanged since
                // them, EXISTS_CLEAN with fast-diff as the image layer marks it.
                lock(&self.cow_clean).remove(&objno);
            } else {
                if deep {
                    self.link_snapshot_version(objno, parent_data)?;
                }
                self.prepare_change(objno, Change::Create)?;
            }
            let (tmp, _f) = self.build_object(objno, parent_data, op)?;
            // link() fails rather than replace: an object created meanwhile (a racing
            // copy-up or write) wins, and gets only the op below.
            let linked = std::fs::hard_link(&tmp, &head);
            let _ = std::fs::remove_file(&tmp);
            match linked {
                Ok(()) => {
                    if durable {
                        self.sync_dir_now()?;
                    } else {
                        self.dir_dirty.store(true, Ordering::Release);
                    }
                    return Ok(());
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    return Err(Error::io(
                        format!("linking {} into place", head.display()),
                        e,
                    ))
                }
            }
        }
        match op {
            ObjectWrite::None => Ok(()),
            ObjectWrite::Write { off, data } => self.write(objno, *off, data, durable),
            ObjectWrite::Zero { off, len } => self.zero(objno, *off, *len, durable),
            ObjectWrite::Truncate { len } => self.truncate(objno, *len, durable),
        }
    }

    pub(super) fn detach_parent(&self) -> Result<()> {
        let Some(rec) = lock(&self.header).parent.clone() else {
            return Ok(());
        };
        self.update_header(|h| {
            h.parent = None;
            // With deep-flatten, as cls_rbd's remove_parent: the snapshots too (every
            // copy-up gave them the parent's data, see `deep_copyup_snaps`).
            if h.features & RBD_FEATURE_DEEP_FLATTEN != 0 {
                for s in &mut h.snapshots {
                    s.parent = None;
                }
            }
            Ok(())
        })?;
        self.refresh_parent_info();
        self.drop_parent_link_if_unused(&rec)
    }

    /// Drops this image's record in the parent `rec` names once neither the head nor
    /// any snapshot reads through that parent snapshot any more. Without deep-flatten,
    /// snapshots taken before a flatten still read through it, so until they go the
    /// record keeps the parent snapshot from being removed.
    pub(super) fn drop_parent_link_if_unused(&self, rec: &ParentRecord) -> Result<()> {
        let same = |p: &ParentRecord| {
            p.pool == rec.pool && p.image_id == rec.image_id && p.snap_id == rec.snap_id
        };
        {
            let h = lock(&self.header);
            if h.parent.as_ref().is_some_and(same)
                || h.snapshots
                    .iter()
                    .any(|s| s.parent.as_ref().is_some_and(same))
            {
                return Ok(());
            }
        }
        let pool = self
            .pool_dir
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        drop_child_record(&self.pool_dir, rec, &pool, &self.id)
    }
}
