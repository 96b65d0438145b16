//! The embedded directory store: a directory laid out like a RADOS pool holding RBD
//! format-2 images, so the daemon runs with no cluster.
//!
//! ```text
//! <root>/<pool>/rbd_directory              name -> id (JSON)
//! <root>/<pool>/rbd_id.<name>              the image id
//! <root>/<pool>/rbd_header.<id>            size, order, prefix, features, flags, snaps, metadata (JSON)
//! <root>/<pool>/rbd_header.<id>.lock       flock()ed by the one read-write opener
//! <root>/<pool>/rbd_data.<id>.<%016x>      data objects, sparse files
//! <root>/<pool>/rbd_object_map.<id>        object map in Ceph's BitVector<2> encoding
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
//! `object`: object-file I/O; `control`: the lock holder's control socket.

mod control;
mod header;
mod lock;
mod object;
#[cfg(test)]
mod tests;

use super::{CreateOptions, ImageHeader, ImageStore, OpenMode, Store};
use crate::error::{Error, ErrorKind, Result};
use crate::spec::ImageSpec;
use bytes::Bytes;
use control::ControlSocket;
use header::{
    checked_id, fsync_dir, parse_header, random_id, read_directory, read_file_opt, read_image_id,
    write_atomic, write_directory, HeaderFile,
};
use lock::{lock_image, lock_pool};
use object::{list_data_objects, punch_hole};
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

impl Store for DirStore {
    type Image = DirImage;

    fn describe(&self) -> String {
        format!("dir:{}", self.root.display())
    }

    async fn create_image(&self, spec: &ImageSpec, opts: &CreateOptions) -> Result<()> {
        self.no_namespace(spec, &spec.namespace)?;
        if !(MIN_ORDER..=MAX_ORDER).contains(&opts.order) {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "object size 2^{} out of range (4K to 32M, a power of two)",
                    opts.order
                ),
            ));
        }
        let pool_dir = self.pool_dir(&spec.pool);
        let spec = spec.clone();
        let opts = opts.clone();
        let desc = self.describe();
        blocking(move || {
            std::fs::create_dir_all(&pool_dir)
                .map_err(|e| Error::io(format!("creating {}", pool_dir.display()), e))?;
            let _pool_lock = lock_pool(&pool_dir)?;
            let mut dir = read_directory(&pool_dir)?;
            let id_path = pool_dir.join(format!("rbd_id.{}", spec.name));
            if dir.contains_key(&spec.name) || id_path.exists() {
                return Err(Error::new(
                    ErrorKind::AlreadyExists,
                    format!("image {}/{} already exists in {desc}", spec.pool, spec.name),
                ));
            }
            let mut id = random_id()?;
            while pool_dir.join(format!("rbd_header.{id}")).exists() {
                id = random_id()?;
            }
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
            };
            let data = serde_json::to_vec_pretty(&h)
                .map_err(|e| Error::new(ErrorKind::Io, format!("encoding header: {e}")))?;
            // Header first, directory last: the directory entry is what makes the
            // image exist, so a crash in between leaves only an orphan header.
            write_atomic(&pool_dir, &format!("rbd_header.{id}"), &data)?;
            write_atomic(&pool_dir, &format!("rbd_id.{}", spec.name), id.as_bytes())?;
            dir.insert(spec.name.clone(), id);
            write_directory(&pool_dir, &dir)
        })
        .await
    }

    async fn remove_image(&self, spec: &ImageSpec) -> Result<()> {
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
            let prefix = read_file_opt(&header_path)?
                .and_then(|b| parse_header(&header_path, &id, &b).ok())
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
                .map_err(|e| Error::io(format!("syncing {}", pool_dir.display()), e))
        })
        .await
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

    async fn ask_holder_to_resize(
        &self,
        spec: &ImageSpec,
        size: u64,
        allow_shrink: bool,
    ) -> Result<()> {
        self.no_namespace(spec, &spec.namespace)?;
        let pool_dir = self.pool_dir(&spec.pool);
        let Some(id) = read_image_id(&pool_dir, &spec.name)? else {
            return Err(self.not_found(spec));
        };
        control::ask_holder_to_resize(&pool_dir, &id, spec, size, allow_shrink).await
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
            // Lock before reading the header, so the header read is the latest.
            let lock = match mode {
                OpenMode::ReadWrite => Some(lock_image(&pool_dir, &id, &spec, true)?),
                OpenMode::SharedWrite => Some(lock_image(&pool_dir, &id, &spec, false)?),
                OpenMode::ReadOnly => None,
            };
            // Punching a hole past the end of the (empty) lock file changes nothing and
            // tells whether this file system can do it at all.
            let punches_holes = match &lock {
                None => true,
                Some(f) => {
                    punch_hole(f, 0, 4096).err().and_then(|e| e.raw_os_error())
                        != Some(libc::EOPNOTSUPP)
                }
            };
            let header_path = pool_dir.join(format!("rbd_header.{id}"));
            let bytes = read_file_opt(&header_path)?.ok_or_else(|| {
                Error::new(
                    ErrorKind::NotFound,
                    format!(
                        "image {}/{} has no header {} in {desc}",
                        spec.pool,
                        spec.name,
                        header_path.display()
                    ),
                )
            })?;
            let h = parse_header(&header_path, &id, &bytes)?;
            let snap = match &spec.snap {
                None => None,
                Some(name) => match h.snapshots.iter().find(|s| &s.name == name) {
                    Some(s) => Some(s.id),
                    None => {
                        return Err(Error::new(
                            ErrorKind::NotFound,
                            format!("snapshot {spec} not found in {desc}"),
                        ))
                    }
                },
            };
            Ok(DirImage {
                inner: Arc::new(Inner {
                    pool_dir,
                    header_path,
                    id,
                    read_only: mode == OpenMode::ReadOnly,
                    snap,
                    object_prefix: h.object_prefix.clone(),
                    header: Mutex::new(h),
                    lock: Mutex::new(lock),
                    fds: Mutex::new(HashMap::new()),
                    dirty: Mutex::new(HashSet::new()),
                    dir_dirty: AtomicBool::new(false),
                    sync_lock: Mutex::new(()),
                    exclusive: mode == OpenMode::ReadWrite,
                    punches_holes: AtomicBool::new(punches_holes),
                    ctl: Mutex::new(None),
                    closed: AtomicBool::new(false),
                }),
            })
        })
        .await
    }
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

struct Inner {
    pool_dir: PathBuf,
    header_path: PathBuf,
    id: String,
    read_only: bool,
    /// The snapshot this handle was opened at. The directory store keeps no snapshot
    /// clones, so snapshot reads are refused rather than silently served from the head.
    snap: Option<u64>,
    object_prefix: String,
    header: Mutex<HeaderFile>,
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

    fn check_snap(&self, snap: Option<u64>) -> Result<()> {
        if snap.is_some() || self.snap.is_some() {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "the directory store keeps no snapshot data",
            ));
        }
        Ok(())
    }

    fn update_header(&self, f: impl FnOnce(&mut HeaderFile)) -> Result<()> {
        self.check_writable()?;
        let mut cur = lock(&self.header);
        let mut h = cur.clone();
        f(&mut h);
        let data = serde_json::to_vec_pretty(&h)
            .map_err(|e| Error::new(ErrorKind::Io, format!("encoding header: {e}")))?;
        write_atomic(&self.pool_dir, &format!("rbd_header.{}", self.id), &data)?;
        *cur = h;
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
        lock(&self.inner.header).to_header()
    }

    async fn refresh_header(&self) -> Result<ImageHeader> {
        self.run(|i| {
            i.check_open()?;
            let b = std::fs::read(&i.header_path)
                .map_err(|e| Error::io(format!("reading {}", i.header_path.display()), e))?;
            let h = parse_header(&i.header_path, &i.id, &b)?;
            let out = h.to_header();
            *lock(&i.header) = h;
            Ok(out)
        })
        .await
    }

    async fn set_size(&self, size: u64) -> Result<()> {
        self.run(move |i| i.update_header(|h| h.size = size)).await
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
        self.run(move |i| i.update_header(|h| h.flags = (h.flags & !mask) | (value & mask)))
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
        self.inner.check_snap(snap)?;
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
        self.inner.check_snap(snap)?;
        self.run(|i| list_data_objects(&i.pool_dir, &i.object_prefix))
            .await
    }

    async fn read_object_map(&self, snap: Option<u64>) -> Result<Option<Vec<u8>>> {
        self.inner.check_open()?;
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
}
