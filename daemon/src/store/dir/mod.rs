//! The embedded directory store: a directory laid out like a RADOS pool holding RBD
//! format-2 images, so the daemon runs with no cluster.
//!
//! ```text
//! <root>/<pool>/rbd_directory              name -> id (JSON)
//! <root>/<pool>/rbd_id.<name>              the image id
//! <root>/<pool>/rbd_header.<id>            size, order, prefix, features, flags, snaps,
//!                                          metadata, parent, children (JSON)
//! <root>/<pool>/rbd_header.<id>.lock       flock()ed by the one read-write opener
//! <root>/<pool>/rbd_data.<id>.<%016x>      data objects (heads), sparse files
//! <root>/<pool>/rbd_data.<id>.<%016x>@<snapid %016x>[.none]
//!                                          what an object was up to a snapshot (see `snap`)
//! <root>/<pool>/rbd_object_map.<id>        object map in Ceph's BitVector<2> encoding
//! <root>/<pool>/rbd_object_map.<id>.<snapid %016x>  a snapshot's object map
//! ```
//!
//! Durability contract (what FLUSH and FUA rely on): a write returns once it is in the
//! page cache and its object is recorded as dirty; `sync` fdatasyncs every dirty object
//! file and fsyncs the pool directory when objects were created or removed since the
//! last sync; a `durable` (FUA) write fdatasyncs its own file (and the directory when
//! the write created the object). Headers, id files, the directory and object maps are
//! always replaced atomically: temporary file, fsync, rename, directory fsync.
//!
//! Here: the `Store` and `ImageStore` impls and an opened image's state (`Inner`).
//! `header`: the metadata files and their atomic replacement; `lock`: the flocks;
//! `object`: object-file I/O; `snap`: snapshots (copy-on-write object versions);
//! `clone`: parents, children and copy-up; `control`: the lock holder's control socket.

mod clone;
mod control;
mod header;
mod lock;
mod object;
mod snap;
#[cfg(test)]
mod tests;

use super::{
    ChildImage, CloneOptions, CreateOptions, ImageHeader, ImageStore, ObjectWrite, OpenMode,
    ParentInfo, Store,
};
use crate::error::{Error, ErrorKind, Result};
use crate::spec::ImageSpec;
use bytes::Bytes;
use control::ControlSocket;
use header::{
    checked_id, fsync_dir, parse_header, random_id, read_directory, read_file_opt, read_image_id,
    replace_file, write_atomic, write_directory, HeaderFile,
};
use lock::{lock_image, lock_pool};
use object::{list_data_objects, punch_hole};
use objmap::ObjectState;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

pub use header::{MAX_ORDER, MIN_ORDER};

pub struct DirStore {
    root: PathBuf,
}

impl DirStore {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        DirStore { root: root.into() }
    }

    fn pool_dir(&self, pool: &str) -> PathBuf {
        self.root.join(pool)
    }

    /// RBD namespaces are a Ceph thing (RADOS object namespaces); this store has none, and
    /// one is refused by name rather than folded into the pool or reported as a bad name.
    fn no_namespace(&self, what: &dyn std::fmt::Display, namespace: &str) -> Result<()> {
        if namespace.is_empty() {
            return Ok(());
        }
        Err(Error::new(
            ErrorKind::Unsupported,
            format!(
                "{what}: RBD namespace {namespace}: namespaces exist on the Ceph store only, \
                 not in {}",
                self.describe()
            ),
        ))
    }

    fn not_found(&self, spec: &ImageSpec) -> Error {
        Error::new(
            ErrorKind::NotFound,
            format!(
                "image {}/{} not found in {}",
                spec.pool,
                spec.name,
                self.describe()
            ),
        )
    }
}

/// Runs blocking file work off the async threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::new(ErrorKind::Io, format!("store worker failed: {e}")))?
}

impl DirStore {
    /// The pool directory and image id under which the holder of `spec`'s lock listens
    /// (its control socket): what `ask_holder` needs first.
    fn holder_address(&self, spec: &ImageSpec) -> Result<(PathBuf, String)> {
        self.no_namespace(spec, &spec.namespace)?;
        let pool_dir = self.pool_dir(&spec.pool);
        let Some(id) = read_image_id(&pool_dir, &spec.name)? else {
            return Err(self.not_found(spec));
        };
        Ok((pool_dir, id))
    }
}

impl Store for DirStore {
    type Image = DirImage;

    fn describe(&self) -> String {
        format!("dir:{}", self.root.display())
    }

    async fn create_image(&self, spec: &ImageSpec, opts: &CreateOptions) -> Result<()> {
        self.no_namespace(spec, &spec.namespace)?;
        if let Some(p) = &opts.data_pool {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "cannot create {spec} with --data-pool {p}: a separate data pool is a \
                     Ceph store feature ({} keeps every object in the pool's directory)",
                    self.describe()
                ),
            ));
        }
        if let Some(unit) = opts.stripe_unit.filter(|&u| u != 1u64 << opts.order) {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "cannot create {spec} with stripe unit {unit}: striping is a Ceph store \
                     feature ({} stores each object whole)",
                    self.describe()
                ),
            ));
        }
        // Before the pool directory is made: bad input changes nothing on disk.
        check_order(opts.order)?;
        let pool_dir = self.pool_dir(&spec.pool);
        let spec = spec.clone();
        let opts = opts.clone();
        let desc = self.describe();
        blocking(move || {
            std::fs::create_dir_all(&pool_dir)
                .map_err(|e| Error::io(format!("creating {}", pool_dir.display()), e))?;
            let _pool_lock = lock_pool(&pool_dir)?;
            create_locked(&pool_dir, &spec, &opts, None, &desc, |_| Ok(())).map(|_| ())
        })
        .await
    }

    async fn remove_image(&self, spec: &ImageSpec) -> Result<crate::store::Removal> {
        self.no_namespace(spec, &spec.namespace)?;
        let pool_dir = self.pool_dir(&spec.pool);
        let not_found = self.not_found(spec);
        let spec = spec.clone();
        blocking(move || {
            if !pool_dir.is_dir() {
                return Err(not_found);
            }
            let _pool_lock = lock_pool(&pool_dir)?;
            let mut dir = read_directory(&pool_dir)?;
            let id_path = pool_dir.join(format!("rbd_id.{}", spec.name));
            let id = match read_file_opt(&id_path)? {
                Some(b) => String::from_utf8_lossy(&b).trim().to_string(),
                None => match dir.get(&spec.name) {
                    Some(id) => id.clone(),
                    None => return Err(not_found),
                },
            };
            let id = checked_id(id, &id_path)?;
            let lock = lock_image(&pool_dir, &id, &spec, true)?;
            // A corrupt header must not block removal: fall back to the default prefix.
            let header_path = pool_dir.join(format!("rbd_header.{id}"));
            let parsed =
                read_file_opt(&header_path)?.and_then(|b| parse_header(&header_path, &id, &b).ok());
            if let Some(h) = &parsed {
                if !h.snapshots.is_empty() {
                    return Err(Error::new(
                        ErrorKind::Busy,
                        format!(
                            "image {spec} has {} snapshot(s); remove them first (rbd snap purge)",
                            h.snapshots.len()
                        ),
                    ));
                }
            }
            let parent = parsed.as_ref().and_then(|h| h.parent.clone());
            let prefix = parsed
                .map(|h| h.object_prefix)
                .unwrap_or_else(|| format!("rbd_data.{id}"));
            let rm = |p: PathBuf| match std::fs::remove_file(&p) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(Error::io(format!("removing {}", p.display()), e)),
            };
            for n in list_data_objects(&pool_dir, &prefix)? {
                rm(pool_dir.join(format!("{prefix}.{n:016x}")))?;
            }
            // Object versions kept for snapshots since removed (a crash in a removal).
            for name in snap::list_version_files(&pool_dir, &prefix)? {
                rm(pool_dir.join(name))?;
            }
            let map_prefix = format!("rbd_object_map.{id}");
            let rd = std::fs::read_dir(&pool_dir)
                .map_err(|e| Error::io(format!("listing {}", pool_dir.display()), e))?;
            for ent in rd.flatten() {
                if let Some(name) = ent.file_name().to_str() {
                    if name == map_prefix || name.starts_with(&format!("{map_prefix}.")) {
                        rm(ent.path())?;
                    }
                }
            }
            rm(header_path)?;
            rm(id_path)?;
            dir.remove(&spec.name);
            write_directory(&pool_dir, &dir)?;
            rm(pool_dir.join(format!("rbd_header.{id}.lock")))?;
            drop(lock);
            fsync_dir(&pool_dir)
                .map_err(|e| Error::io(format!("syncing {}", pool_dir.display()), e))?;
            drop(_pool_lock);
            // Last: until the image is gone its parent's record keeps the parent
            // snapshot from being removed.
            if let Some(p) = parent {
                clone::drop_child_record(&pool_dir, &p, &spec.pool, &id)?;
            }
            Ok(crate::store::Removal::Removed)
        })
        .await
    }

    async fn image_id_of(&self, spec: &ImageSpec) -> Result<String> {
        self.holder_address(spec).map(|(_, id)| id)
    }

    async fn list_images(&self, pool: &str) -> Result<Vec<String>> {
        let (pool, namespace) = crate::spec::parse_pool_spec(pool)?;
        self.no_namespace(&format!("{pool}/{namespace}"), &namespace)?;
        let pool_dir = self.pool_dir(&pool);
        blocking(move || {
            if !pool_dir.is_dir() {
                return Ok(vec![]);
            }
            Ok(read_directory(&pool_dir)?.into_keys().collect())
        })
        .await
    }

    async fn ask_holder(
        &self,
        spec: &ImageSpec,
        action: &crate::store::OwnerAction,
        _progress: &mut (dyn FnMut(u64, u64) + Send),
    ) -> Result<()> {
        let (pool_dir, id) = self.holder_address(spec)?;
        control::ask_holder(&pool_dir, &id, spec, action).await
    }

    async fn open_image(&self, spec: &ImageSpec, mode: OpenMode) -> Result<DirImage> {
        self.no_namespace(spec, &spec.namespace)?;
        let pool_dir = self.pool_dir(&spec.pool);
        let not_found = self.not_found(spec);
        let desc = self.describe();
        let spec = spec.clone();
        blocking(move || {
            if spec.snap.is_some() && mode != OpenMode::ReadOnly {
                return Err(Error::new(
                    ErrorKind::ReadOnly,
                    format!("snapshot {spec} can only be opened read-only"),
                ));
            }
            let Some(id) = read_image_id(&pool_dir, &spec.name)? else {
                return Err(not_found);
            };
            let snap = spec.snap.clone().map(SnapSel::Name);
            open_by_id(pool_dir, id, mode, snap, &spec, &desc)
        })
        .await
    }

    async fn clone_image(
        &self,
        parent: &ImageSpec,
        child: &ImageSpec,
        opts: &CloneOptions,
    ) -> Result<()> {
        self.no_namespace(parent, &parent.namespace)?;
        self.no_namespace(child, &child.namespace)?;
        clone::clone_image(self, parent, child, opts).await
    }

    async fn children(
        &self,
        parent: &ImageSpec,
        snap_id: Option<u64>,
        descendants: bool,
    ) -> Result<Vec<ChildImage>> {
        self.no_namespace(parent, &parent.namespace)?;
        clone::children(self, parent, snap_id, descendants).await
    }
}

fn check_order(order: u8) -> Result<()> {
    if !(MIN_ORDER..=MAX_ORDER).contains(&order) {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!("object size 2^{order} out of range (4K to 32M, a power of two)"),
        ));
    }
    Ok(())
}

/// Renames image `id` of `pool_dir` to `dest`, as the Ceph store does (see
/// `ImageStore::rename`), under the pool lock as create and remove: its current name from
/// the directory, refused when `dest` is taken; then the new id file, the directory, the
/// old id file. A crash in between leaves a second id file that no directory entry names.
fn rename_image(pool_dir: &Path, pool: &str, id: &str, dest: &str) -> Result<()> {
    let _pool_lock = lock_pool(pool_dir)?;
    let mut dir = read_directory(pool_dir)?;
    let Some(name) = dir
        .iter()
        .find(|(_, v)| v.as_str() == id)
        .map(|(k, _)| k.clone())
    else {
        return Err(Error::new(
            ErrorKind::NotFound,
            format!(
                "cannot rename image {id} of {}: the pool's image directory does not name it",
                pool_dir.display()
            ),
        ));
    };
    check_id_file_name(dest)?;
    if dir.contains_key(dest) || pool_dir.join(format!("rbd_id.{dest}")).exists() {
        return Err(Error::new(
            ErrorKind::AlreadyExists,
            format!("cannot rename {pool}/{name}: image {pool}/{dest} already exists"),
        ));
    }
    write_atomic(pool_dir, &format!("rbd_id.{dest}"), id.as_bytes())?;
    dir.remove(&name);
    dir.insert(dest.to_string(), id.to_string());
    if let Err(e) = write_directory(pool_dir, &dir) {
        // The directory may be replaced already (its sync failed): the new id file goes
        // only when it still names the old name.
        if read_directory(pool_dir).is_ok_and(|d| d.get(&name).map(String::as_str) == Some(id)) {
            let _ = std::fs::remove_file(pool_dir.join(format!("rbd_id.{dest}")));
        }
        return Err(e);
    }
    let old = pool_dir.join(format!("rbd_id.{name}"));
    match std::fs::remove_file(&old) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(format!("removing {}", old.display()), e)),
    }
    fsync_dir(pool_dir).map_err(|e| Error::io(format!("syncing {}", pool_dir.display()), e))?;
    tracing::info!(id = %id, "renamed {pool}/{name} to {dest}");
    Ok(())
}

/// Creates image `spec` in `pool_dir`, whose pool lock the caller holds, with parent
/// `parent` (a clone); `before` runs once the id is chosen, before anything is written
/// (a clone's parent records it there). Returns the new id.
fn create_locked(
    pool_dir: &Path,
    spec: &ImageSpec,
    opts: &CreateOptions,
    parent: Option<header::ParentRecord>,
    desc: &str,
    before: impl FnOnce(&str) -> Result<()>,
) -> Result<String> {
    check_order(opts.order)?;
    let mut dir = read_directory(pool_dir)?;
    let id_path = pool_dir.join(format!("rbd_id.{}", spec.name));
    if dir.contains_key(&spec.name) || id_path.exists() {
        return Err(Error::new(
            ErrorKind::AlreadyExists,
            format!("image {}/{} already exists in {desc}", spec.pool, spec.name),
        ));
    }
    check_id_file_name(&spec.name)?;
    let mut id = random_id()?;
    while pool_dir.join(format!("rbd_header.{id}")).exists() {
        id = random_id()?;
    }
    before(&id)?;
    let h = HeaderFile {
        format: 1,
        id: id.clone(),
        size: opts.size,
        order: opts.order,
        object_prefix: format!("rbd_data.{id}"),
        features: opts.features,
        flags: 0,
        snap_seq: 0,
        snapshots: vec![],
        metadata: BTreeMap::new(),
        parent,
        children: vec![],
        removing: vec![],
    };
    let data = serde_json::to_vec_pretty(&h)
        .map_err(|e| Error::new(ErrorKind::Io, format!("encoding header: {e}")))?;
    // Header first, directory last: the directory entry is what makes the
    // image exist, so a crash in between leaves only an orphan header. A failure
    // takes back what it wrote (unless the directory names the image after all: its
    // replacement can be in place with only the sync failed).
    let header = pool_dir.join(format!("rbd_header.{id}"));
    let id_file = pool_dir.join(format!("rbd_id.{}", spec.name));
    write_atomic(pool_dir, &format!("rbd_header.{id}"), &data)?;
    let written =
        write_atomic(pool_dir, &format!("rbd_id.{}", spec.name), id.as_bytes()).and_then(|()| {
            dir.insert(spec.name.clone(), id.clone());
            write_directory(pool_dir, &dir)
        });
    if let Err(e) = written {
        if !read_directory(pool_dir).is_ok_and(|d| d.get(&spec.name) == Some(&id)) {
            let _ = std::fs::remove_file(&id_file);
            let _ = std::fs::remove_file(&header);
        }
        return Err(e);
    }
    Ok(id)
}

/// An image's id file is `rbd_id.NAME`, and a file name has at most 255 bytes: longer
/// names (which a spec takes, as rbd does) are refused here before anything is written.
fn check_id_file_name(name: &str) -> Result<()> {
    const MAX: usize = 255 - "rbd_id.".len();
    if name.len() > MAX {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!(
                "image name {name:?} is {} bytes long; the directory store takes at most {MAX} \
                 (its id file is rbd_id.NAME)",
                name.len()
            ),
        ));
    }
    Ok(())
}

/// Which snapshot `open_by_id` opens: by name (a user's `IMAGE@SNAP`) or by id (a
/// clone's parent).
enum SnapSel {
    Name(String),
    Id(u64),
}

/// Opens image `id` of `pool_dir`; `spec` names it in errors.
fn open_by_id(
    pool_dir: PathBuf,
    id: String,
    mode: OpenMode,
    snap: Option<SnapSel>,
    spec: &ImageSpec,
    desc: &str,
) -> Result<DirImage> {
    // Lock before reading the header, so the header read is the latest.
    let lock = match mode {
        OpenMode::ReadWrite => Some(lock_image(&pool_dir, &id, spec, true)?),
        OpenMode::SharedWrite => Some(lock_image(&pool_dir, &id, spec, false)?),
        OpenMode::ReadOnly => None,
    };
    // Punching a hole past the end of the (empty) lock file changes nothing and
    // tells whether this file system can do it at all.
    let punches_holes = match &lock {
        None => true,
        Some(f) => {
            punch_hole(f, 0, 4096).err().and_then(|e| e.raw_os_error()) != Some(libc::EOPNOTSUPP)
        }
    };
    let header_path = pool_dir.join(format!("rbd_header.{id}"));
    let bytes = read_file_opt(&header_path)?.ok_or_else(|| {
        Error::new(
            ErrorKind::NotFound,
            format!(
                "image {spec} has no header {} in {desc}",
                header_path.display()
            ),
        )
    })?;
    let h = parse_header(&header_path, &id, &bytes)?;
    if mode == OpenMode::SharedWrite && !h.snapshots.is_empty() {
        // Copy-on-write for a snapshot swaps the object's file for a copy; a writer in
        // another process keeps the old file open and would write into the snapshot's
        // version. Only one process may write an image that has snapshots. (Snapshots
        // are made under the exclusive lock, which no shared writer can hold beside.)
        return Err(Error::new(
            ErrorKind::Unsupported,
            format!(
                "image {spec} has snapshots ({}), and shared writers of an image with \
                 snapshots are not supported: remove the snapshots, or set \
                 rados-nbd.shared=false and serve it from one client",
                h.snapshots.len()
            ),
        ));
    }
    let snap = match snap {
        None => None,
        Some(sel) => {
            let found = h.snapshots.iter().find(|s| match &sel {
                SnapSel::Name(n) => &s.name == n,
                SnapSel::Id(i) => s.id == *i,
            });
            match found {
                Some(s) => Some(s.id),
                None => {
                    return Err(Error::new(
                        ErrorKind::NotFound,
                        format!("snapshot {spec} not found in {desc}"),
                    ))
                }
            }
        }
    };
    let root = pool_dir.parent().map(Path::to_path_buf).unwrap_or_default();
    let parent_rec = h.parent_at(snap);
    let parent_info = parent_rec.map(|p| clone::resolve_parent(&root, &p));
    // Held open: when the writer replaces the header, this inode's link count drops to
    // 0 (and, held, its number cannot be reused), which tells a snapshot reader to
    // re-read it. A missing one just means "re-read at the next look".
    let header_file = File::open(&header_path).ok();
    let img = DirImage {
        inner: Arc::new(Inner {
            root,
            pool_dir,
            header_path,
            id,
            read_only: mode == OpenMode::ReadOnly,
            snap,
            object_prefix: h.object_prefix.clone(),
            has_snaps: AtomicBool::new(!h.snapshots.is_empty()),
            header: Mutex::new(h),
            header_file: Mutex::new(header_file),
            parent_info: Mutex::new(parent_info),
            lock: Mutex::new(lock),
            fds: Mutex::new(HashMap::new()),
            dirty: Mutex::new(HashSet::new()),
            dir_dirty: AtomicBool::new(false),
            sync_lock: Mutex::new(()),
            sync_failed: Mutex::new(None),
            #[cfg(test)]
            test_hook: Mutex::new(None),
            #[cfg(test)]
            test_fail_sync: AtomicBool::new(false),
            #[cfg(test)]
            test_fail_header_sync: AtomicBool::new(false),
            cow_clean: Mutex::new(HashSet::new()),
            cow_lock: Mutex::new(()),
            snap_map_lock: Mutex::new(()),
            exclusive: mode == OpenMode::ReadWrite,
            punches_holes: AtomicBool::new(punches_holes),
            ctl: Mutex::new(None),
            closed: AtomicBool::new(false),
        }),
    };
    // A snapshot removal a crash interrupted is finished before anything changes (the
    // copy-on-write checks assume every version is filed under a live snapshot).
    if mode == OpenMode::ReadWrite {
        img.inner.finish_snap_removals()?;
    }
    Ok(img)
}

/// One opened image of the directory store.
pub struct DirImage {
    inner: Arc<Inner>,
}

impl DirImage {
    /// Tests: behave as on a file system that cannot punch holes.
    #[cfg(test)]
    pub(crate) fn pretend_no_hole_punching(&self) {
        self.inner.punches_holes.store(false, Ordering::Relaxed);
    }
}

/// Tests: a hook `Inner` runs at a chosen point (see `test_hook`).
#[cfg(test)]
type TestHook = std::sync::Arc<dyn Fn(&Inner) + Send + Sync>;

struct Inner {
    /// The store's root (the pools' parent), where a clone finds its parent.
    root: PathBuf,
    pool_dir: PathBuf,
    header_path: PathBuf,
    id: String,
    read_only: bool,
    /// The snapshot this handle was opened at: reads without a snapshot read this one.
    snap: Option<u64>,
    object_prefix: String,
    /// The header has snapshots: writes must look whether an object needs copying
    /// first (see `snap`). False keeps the write path of an image without snapshots
    /// free of any extra syscall.
    has_snaps: AtomicBool,
    header: Mutex<HeaderFile>,
    /// The header file as last read, held open: a read-only handle re-reads the header
    /// once this one was replaced (a snapshot taken by the writer since), see
    /// `snap::Inner::current_probe_ids`.
    header_file: Mutex<Option<File>>,
    /// The parent named by the header (or by the snapshot this handle is at), resolved
    /// to names.
    parent_info: Mutex<Option<ParentInfo>>,
    lock: Mutex<Option<File>>,
    fds: Mutex<HashMap<u64, Arc<File>>>,
    /// Objects written since the last `sync`.
    dirty: Mutex<HashSet<u64>>,
    /// Objects were created or removed since the last `sync`.
    dir_dirty: AtomicBool,
    /// Held for a whole `sync`. A sync takes the dirty set before it makes those objects
    /// durable; without this, a second FLUSH (from another connection, or pipelined)
    /// arriving meanwhile would find the set empty and be acknowledged while the first
    /// one's objects were still on their way to disk, breaking the promise behind
    /// CAN_MULTI_CONN (every write acked before a FLUSH, on any connection, is durable).
    sync_lock: Mutex<()>,
    /// The error of a sync that failed: every later sync fails too (see `sync`).
    sync_failed: Mutex<Option<String>>,
    /// Tests: run just before a write's data goes to its file.
    #[cfg(test)]
    test_hook: Mutex<Option<TestHook>>,
    /// Tests: the next sync fails (as an fdatasync reporting a failed writeback).
    #[cfg(test)]
    test_fail_sync: AtomicBool,
    /// Tests: the next header replacement reports its directory fsync failed.
    #[cfg(test)]
    test_fail_header_sync: AtomicBool,
    /// Objects whose head needs no copy-on-write before the next change (already
    /// preserved for, or written after, the newest snapshot). Cleared by snapshot
    /// operations.
    cow_clean: Mutex<HashSet<u64>>,
    /// Serializes copy-on-write preparation, so two writers of one object cannot both
    /// preserve it.
    cow_lock: Mutex<()>,
    /// Serializes in-place updates of snapshots' object maps (deep copy-ups), each a
    /// read, change and rewrite of the map's file.
    snap_map_lock: Mutex<()>,
    /// Opened ReadWrite: the exclusive lock holder, the one that takes requests.
    exclusive: bool,
    /// Whether this file system deallocates a range (FALLOC_FL_PUNCH_HOLE). Without it,
    /// zeroing part of an object writes zeros: not "fast" in the NBD FAST_ZERO sense.
    punches_holes: AtomicBool,
    /// The holder's control socket, once it takes requests (see `owner_requests`).
    ctl: Mutex<Option<ControlSocket>>,
    closed: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere cannot leave these maps inconsistent (single inserts/removes).
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Inner {
    fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::new(
                ErrorKind::Io,
                format!("image {} is closed", self.id),
            ));
        }
        Ok(())
    }

    fn check_writable(&self) -> Result<()> {
        self.check_open()?;
        if self.read_only {
            return Err(Error::new(
                ErrorKind::ReadOnly,
                format!("image {} is open read-only", self.id),
            ));
        }
        Ok(())
    }

    /// The snapshot a read addresses: the one asked for, else the handle's.
    fn snap_of(&self, snap: Option<u64>) -> Option<u64> {
        snap.or(self.snap)
    }

    fn update_header(&self, f: impl FnOnce(&mut HeaderFile) -> Result<()>) -> Result<()> {
        self.check_writable()?;
        // Other images' clone/flatten/removal change `children` in this file under the
        // pool lock: take it, and take `children` from the file, not from our copy.
        let _pool = lock_pool(&self.pool_dir)?;
        let mut cur = lock(&self.header);
        let mut h = cur.clone();
        if let Some(b) = read_file_opt(&self.header_path)? {
            if let Ok(disk) = parse_header(&self.header_path, &self.id, &b) {
                h.children = disk.children;
            }
        }
        f(&mut h)?;
        let data = serde_json::to_vec_pretty(&h)
            .map_err(|e| Error::new(ErrorKind::Io, format!("encoding header: {e}")))?;
        // Once the file is replaced, the change is made: every reader sees it, and our
        // copy follows it (built on the old copy, the next change would silently undo
        // this one on disk), as do the caller's next steps (a snapshot's copy-on-write
        // bookkeeping, a shrink's parent overlap), so it succeeds. Only its durability
        // is in doubt when the directory fsync failed: that failure is kept as a failed
        // sync is, so every later FLUSH fails, and the close leaves the dirty flag set.
        let durable = replace_file(&self.pool_dir, &format!("rbd_header.{}", self.id), &data)?;
        #[cfg(test)]
        let durable = match self.test_fail_header_sync.swap(false, Ordering::AcqRel) {
            true => Err(Error::new(
                ErrorKind::Io,
                "syncing the pool: injected EIO (test)",
            )),
            false => durable,
        };
        self.has_snaps
            .store(!h.snapshots.is_empty(), Ordering::Release);
        *cur = h;
        if let Err(e) = durable {
            tracing::warn!(
                "image {}: a header change is in place but may not be durable: {e}",
                self.id
            );
            lock(&self.sync_failed).get_or_insert_with(|| e.to_string());
        }
        Ok(())
    }

    fn object_map_name(&self, snap: Option<u64>) -> String {
        match snap {
            None => format!("rbd_object_map.{}", self.id),
            Some(s) => format!("rbd_object_map.{}.{s:016x}", self.id),
        }
    }
}

impl DirImage {
    /// Where this image's files live (tests and `object-map check` messages).
    pub fn pool_dir(&self) -> &Path {
        &self.inner.pool_dir
    }

    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let inner = self.inner.clone();
        blocking(move || f(&inner)).await
    }
}

impl ImageStore for DirImage {
    fn header(&self) -> ImageHeader {
        let parent = lock(&self.inner.parent_info).clone();
        lock(&self.inner.header).to_header(self.inner.snap, parent)
    }

    async fn refresh_header(&self) -> Result<ImageHeader> {
        self.run(|i| {
            i.check_open()?;
            i.reload_header()?;
            let parent = lock(&i.parent_info).clone();
            Ok(lock(&i.header).to_header(i.snap, parent))
        })
        .await
    }

    async fn set_size(&self, size: u64) -> Result<()> {
        self.run(move |i| {
            i.update_header(|h| {
                h.size = size;
                // Like cls_rbd's set_size: a shrink lowers the parent overlap for good
                // (growing back does not bring the parent's data back).
                if let Some(p) = &mut h.parent {
                    p.overlap = p.overlap.min(size);
                }
                Ok(())
            })?;
            i.refresh_parent_info();
            Ok(())
        })
        .await
    }

    fn zeroes_are_fast(&self) -> bool {
        self.inner.punches_holes.load(Ordering::Relaxed)
    }

    fn owner_requests(
        &self,
    ) -> Option<tokio::sync::mpsc::UnboundedReceiver<crate::store::OwnerRequest>> {
        self.inner.take_requests()
    }

    async fn set_flags(&self, value: u64, mask: u64) -> Result<()> {
        self.run(move |i| {
            i.update_header(|h| {
                h.flags = (h.flags & !mask) | (value & mask);
                Ok(())
            })
        })
        .await
    }

    async fn get_meta(&self, key: &str) -> Result<Option<String>> {
        self.inner.check_open()?;
        Ok(lock(&self.inner.header).metadata.get(key).cloned())
    }

    async fn set_meta(&self, key: &str, value: &str) -> Result<()> {
        let (k, v) = (key.to_string(), value.to_string());
        self.run(move |i| {
            i.update_header(|h| {
                h.metadata.insert(k, v);
                Ok(())
            })
        })
        .await
    }

    async fn read(
        &self,
        objno: u64,
        off: u64,
        len: u64,
        snap: Option<u64>,
    ) -> Result<Option<Bytes>> {
        self.inner.check_open()?;
        if let Some(s) = self.inner.snap_of(snap) {
            return self.run(move |i| i.read_snap(objno, off, len, s)).await;
        }
        if let Some(r) = self.inner.read_cached(objno, off, len) {
            return r.map(Some);
        }
        self.run(move |i| i.read(objno, off, len)).await
    }

    async fn write(&self, objno: u64, off: u64, data: Bytes, durable: bool) -> Result<()> {
        self.inner.check_writable()?;
        if let Some(r) = self.inner.write_inline(objno, off, &data, durable) {
            return r;
        }
        self.run(move |i| i.write(objno, off, &data, durable)).await
    }

    async fn zero(&self, objno: u64, off: u64, len: u64, durable: bool) -> Result<()> {
        self.inner.check_writable()?;
        self.run(move |i| i.zero(objno, off, len, durable)).await
    }

    async fn holds_no_data(&self, objno: u64) -> Result<bool> {
        self.inner.check_writable()?;
        self.run(move |i| i.holds_no_data(objno)).await
    }

    async fn remove(&self, objno: u64, durable: bool) -> Result<()> {
        self.inner.check_writable()?;
        self.run(move |i| i.remove(objno, durable)).await
    }

    async fn sync(&self) -> Result<()> {
        self.inner.check_open()?;
        if self.inner.read_only {
            return Ok(());
        }
        self.run(|i| i.sync()).await
    }

    async fn list_objects(&self, snap: Option<u64>) -> Result<Vec<u64>> {
        self.inner.check_open()?;
        match self.inner.snap_of(snap) {
            None => {
                self.run(|i| list_data_objects(&i.pool_dir, &i.object_prefix))
                    .await
            }
            Some(s) => {
                let states = self.run(move |i| i.object_states(Some(s))).await?;
                Ok(states.into_iter().map(|(o, _)| o).collect())
            }
        }
    }

    async fn list_object_states(&self, snap: Option<u64>) -> Result<Vec<(u64, ObjectState)>> {
        self.inner.check_open()?;
        let snap = self.inner.snap_of(snap);
        self.run(move |i| i.object_states(snap)).await
    }

    async fn object_snap_sets(
        &self,
        objs: Vec<u64>,
    ) -> Result<Vec<(u64, Option<crate::store::snapset::SnapSet>)>> {
        self.inner.check_open()?;
        self.run(move |i| i.snap_sets(&objs)).await
    }

    async fn read_object_map(&self, snap: Option<u64>) -> Result<Option<Vec<u8>>> {
        self.inner.check_open()?;
        let snap = self.inner.snap_of(snap);
        self.run(move |i| read_file_opt(&i.pool_dir.join(i.object_map_name(snap))))
            .await
    }

    async fn write_object_map(&self, data: Vec<u8>) -> Result<()> {
        self.inner.check_writable()?;
        self.run(move |i| write_atomic(&i.pool_dir, &i.object_map_name(None), &data))
            .await
    }

    async fn close(&self) -> Result<()> {
        if self.inner.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        lock(&self.inner.fds).clear();
        // Requests stop before the lock goes, so none is taken by a handle that no longer
        // holds it.
        if let Some(c) = lock(&self.inner.ctl).take() {
            c.stop();
        }
        // Dropping the file releases the flock.
        drop(lock(&self.inner.lock).take());
        Ok(())
    }

    async fn open_parent(&self) -> Result<Option<DirImage>> {
        self.inner.check_open()?;
        self.run(|i| i.open_parent()).await
    }

    async fn copyup(
        &self,
        objno: u64,
        parent_data: Bytes,
        op: ObjectWrite,
        durable: bool,
    ) -> Result<()> {
        self.inner.check_writable()?;
        self.run(move |i| i.copyup(objno, &parent_data, &op, durable))
            .await
    }

    async fn detach_parent(&self) -> Result<()> {
        self.inner.check_writable()?;
        self.run(|i| i.detach_parent()).await
    }

    async fn snap_create(&self, name: &str) -> Result<u64> {
        let name = name.to_string();
        self.run(move |i| i.snap_create(&name)).await
    }

    async fn snap_trash_if_used(&self, id: u64) -> Result<bool> {
        // No trash here: a snapshot with clones is not removed (snap_remove checks again
        // under the header's lock).
        self.run(move |i| i.check_no_clones(id))
            .await
            .map(|()| false)
    }

    async fn snap_remove(&self, id: u64) -> Result<()> {
        self.run(move |i| i.snap_remove(id)).await
    }

    async fn rename(&self, dest: &str) -> Result<()> {
        self.inner.check_writable()?;
        let i = self.inner.clone();
        let dest = dest.to_string();
        blocking(move || {
            let pool = i
                .pool_dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            rename_image(&i.pool_dir, &pool, &i.id, &dest)
        })
        .await
    }

    async fn snap_rename(&self, id: u64, new_name: &str) -> Result<()> {
        let new_name = new_name.to_string();
        self.run(move |i| i.snap_rename(id, &new_name)).await
    }

    async fn snap_set_protected(&self, id: u64, protected: bool) -> Result<()> {
        self.run(move |i| i.snap_set_protected(id, protected)).await
    }

    async fn write_snap_object_map(&self, snap: u64, data: Vec<u8>) -> Result<()> {
        self.inner.check_writable()?;
        self.run(move |i| {
            i.snap_record(snap)?;
            write_atomic(&i.pool_dir, &i.object_map_name(Some(snap)), &data)
        })
        .await
    }

    fn copyup_snapshots(&self, objno: u64, parent_data: &[u8]) -> Vec<u64> {
        match self.inner.deep_copyup_snaps(objno, parent_data) {
            Ok(v) => v,
            Err(e) => {
                // The copy-up that follows fails the same way; until then, claim more
                // (a map may say an object exists that does not, never the reverse).
                tracing::warn!("object {objno}: {e}");
                self.inner.snaps_holding(objno, 0)
            }
        }
    }

    async fn update_snap_object_map(
        &self,
        snap: u64,
        objno: u64,
        state: ObjectState,
    ) -> Result<()> {
        self.inner.check_writable()?;
        self.run(move |i| {
            let _one = lock(&i.snap_map_lock);
            let name = i.object_map_name(Some(snap));
            let path = i.pool_dir.join(&name);
            let Some(bytes) = read_file_opt(&path)? else {
                return Ok(());
            };
            // A map that does not decode is never trusted by its readers (they ask the
            // store): left as it is rather than failing the copy-up.
            let map = match objmap::ObjectMap::decode(&bytes) {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!("object map {} not updated: {e}", path.display());
                    return Ok(());
                }
            };
            if objno < map.len() && map.get(objno) != state {
                map.set(objno, state);
                write_atomic(&i.pool_dir, &name, &map.encode())?;
            }
            Ok(())
        })
        .await
    }

    async fn snap_flags(&self, snap: u64) -> Result<u64> {
        self.inner.check_open()?;
        Ok(self.inner.snap_record(snap)?.flags)
    }
}
