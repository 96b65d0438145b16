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

use super::{CreateOptions, ImageHeader, ImageStore, OpenMode, SnapInfo, Store};
use crate::error::{Error, ErrorKind, Result};
use crate::spec::ImageSpec;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// Open object files kept around; beyond this the least useful is closed. A closed
/// dirty file is reopened by `sync`: fdatasync works on the inode, not the descriptor.
const FD_CACHE_SIZE: usize = 256;

/// Page-cache hits up to this size are read on the async worker (RWF_NOWAIT guarantees
/// they never wait for the disk; copying 1 MiB takes tens of microseconds).
const INLINE_READ_MAX: usize = 1 << 20;
/// Buffered writes up to this size to open files run on the async worker: they copy into
/// the page cache, but may be throttled by dirty-page writeback, so large ones, syncs and
/// anything that opens or creates a file go to the blocking pool.
const INLINE_WRITE_MAX: usize = 64 * 1024;

/// Writes reach the page cache in pieces no larger than this, each ending on a multiple of
/// it. The kernel sizes a new page-cache folio by the length of the write that creates it,
/// and on ext4 (buffer heads, large folios since Linux 6.16) every later small write into
/// a folio walks the buffer heads of the whole folio: a 4 KiB rewrite of data first
/// written as one 1 MiB pwrite cost 15-18 us here, against 5 us after 128 KiB pieces, and
/// allocating the 1 MiB folios made the first write itself several times slower
/// (`bench/folio.py` measures both). Filesystems without buffer heads lose only a few
/// syscalls per MiB.
const WRITE_PIECE: u64 = 128 * 1024;

/// Cleared the first time the kernel refuses RWF_NOWAIT reads, so we stop trying.
static NOWAIT_READS: AtomicBool = AtomicBool::new(true);

/// How much of `len` bytes at `off` goes in the first piece: up to the next multiple of
/// `WRITE_PIECE`.
fn piece_len(off: u64, len: usize) -> usize {
    let room = WRITE_PIECE - off % WRITE_PIECE;
    (len as u64).min(room) as usize
}

/// `write_all_at` in pieces of at most `WRITE_PIECE` bytes aligned to it (see there).
fn write_in_pieces(f: &File, mut data: &[u8], mut off: u64) -> std::io::Result<()> {
    while !data.is_empty() {
        let n = piece_len(off, data.len());
        f.write_all_at(&data[..n], off)?;
        data = &data[n..];
        off += n as u64;
    }
    Ok(())
}

pub const MIN_ORDER: u8 = 12;
pub const MAX_ORDER: u8 = 25;

const DIRECTORY: &str = "rbd_directory";
const POOL_LOCK: &str = "rbd_directory.lock";

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
    fn no_namespace(&self, pool: &str, namespace: &str) -> Result<()> {
        if namespace.is_empty() {
            return Ok(());
        }
        Err(Error::new(
            ErrorKind::Unsupported,
            format!(
                "RBD namespace {namespace} (in {pool}/{namespace}): namespaces exist on the \
                 Ceph store only, not in {}",
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

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct SnapRecord {
    id: u64,
    name: String,
    size: u64,
}

/// The on-disk header. JSON so that a human (or a test) can read it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct HeaderFile {
    format: u32,
    id: String,
    size: u64,
    order: u8,
    object_prefix: String,
    features: u64,
    flags: u64,
    snap_seq: u64,
    #[serde(default)]
    snapshots: Vec<SnapRecord>,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
}

impl HeaderFile {
    fn to_header(&self) -> ImageHeader {
        ImageHeader {
            id: self.id.clone(),
            size: self.size,
            order: self.order,
            object_prefix: self.object_prefix.clone(),
            features: self.features,
            flags: self.flags,
            snap_seq: self.snap_seq,
            snaps: self
                .snapshots
                .iter()
                .map(|s| SnapInfo {
                    id: s.id,
                    name: s.name.clone(),
                    size: s.size,
                })
                .collect(),
        }
    }
}

fn parse_header(path: &Path, id: &str, bytes: &[u8]) -> Result<HeaderFile> {
    let corrupt = |why: String| {
        Error::new(
            ErrorKind::Corrupt,
            format!("corrupt image header {}: {why}", path.display()),
        )
    };
    let h: HeaderFile = serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
    if h.format != 1 {
        return Err(corrupt(format!("unknown header format {}", h.format)));
    }
    if h.id != id {
        return Err(corrupt(format!(
            "header names id {:?}, expected {id:?}",
            h.id
        )));
    }
    if !(MIN_ORDER..=MAX_ORDER).contains(&h.order) {
        return Err(corrupt(format!(
            "order {} out of range {MIN_ORDER}..={MAX_ORDER}",
            h.order
        )));
    }
    if h.object_prefix.is_empty() || h.object_prefix.contains('/') {
        return Err(corrupt(format!("bad object prefix {:?}", h.object_prefix)));
    }
    Ok(h)
}

/// The id of image `name` from its `rbd_id.<name>` file: `None` when there is none, an
/// error when what it holds is not an id.
fn read_image_id(pool_dir: &Path, name: &str) -> Result<Option<String>> {
    let id_path = pool_dir.join(format!("rbd_id.{name}"));
    let Some(b) = read_file_opt(&id_path)? else {
        return Ok(None);
    };
    let id = String::from_utf8_lossy(&b).trim().to_string();
    if !valid_id(&id) {
        return Err(Error::new(
            ErrorKind::Corrupt,
            format!("corrupt image id file {}", id_path.display()),
        ));
    }
    Ok(Some(id))
}

/// Deallocates `len` bytes at `off` of `f`, keeping its size.
fn punch_hole(f: &File, off: u64, len: u64) -> std::io::Result<()> {
    // SAFETY: fallocate on a descriptor we own; no memory is passed.
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off as libc::off_t,
            len as libc::off_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.chars().all(|c| c.is_ascii_alphanumeric())
}

/// 12 hex digits like Ceph's image ids.
fn random_id() -> Result<String> {
    let mut b = [0u8; 6];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(|e| Error::io("reading /dev/urandom", e))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Replaces `dir/name` atomically and durably.
fn write_atomic(dir: &Path, name: &str, data: &[u8]) -> Result<()> {
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let res = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        fsync_dir(dir)
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res.map_err(|e| Error::io(format!("writing {}", path.display()), e))
}

fn read_file_opt(path: &Path) -> Result<Option<Vec<u8>>> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(format!("reading {}", path.display()), e)),
    }
}

fn flock(f: &File, op: libc::c_int) -> std::io::Result<()> {
    loop {
        // SAFETY: flock on a descriptor we own; no memory is passed.
        let r = unsafe { libc::flock(f.as_raw_fd(), op) };
        if r == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Serializes directory changes (create/remove) between processes.
fn lock_pool(pool_dir: &Path) -> Result<File> {
    let path = pool_dir.join(POOL_LOCK);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    flock(&f, libc::LOCK_EX).map_err(|e| Error::io(format!("locking {}", path.display()), e))?;
    Ok(f)
}

/// Takes an image's lock without waiting: exclusive for a writer (a second writer is
/// refused), shared for the writers of a shared image (they exclude only exclusive ones).
fn lock_image(pool_dir: &Path, id: &str, spec: &ImageSpec, exclusive: bool) -> Result<File> {
    let path = pool_dir.join(format!("rbd_header.{id}.lock"));
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    let op = if exclusive {
        libc::LOCK_EX
    } else {
        libc::LOCK_SH
    };
    match flock(&f, op | libc::LOCK_NB) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => {
            let how = if exclusive {
                "opened for writing by another client"
            } else {
                "opened for exclusive writing by another client (not as a shared image)"
            };
            return Err(Error::new(
                ErrorKind::Busy,
                format!(
                    "image {}/{} is in use: {how} (lock {})",
                    spec.pool,
                    spec.name,
                    path.display()
                ),
            ));
        }
        Err(e) => return Err(Error::io(format!("locking {}", path.display()), e)),
    }
    Ok(f)
}

fn read_directory(pool_dir: &Path) -> Result<BTreeMap<String, String>> {
    let path = pool_dir.join(DIRECTORY);
    match read_file_opt(&path)? {
        None => Ok(BTreeMap::new()),
        Some(b) => serde_json::from_slice(&b).map_err(|e| {
            Error::new(
                ErrorKind::Corrupt,
                format!("corrupt image directory {}: {e}", path.display()),
            )
        }),
    }
}

fn write_directory(pool_dir: &Path, d: &BTreeMap<String, String>) -> Result<()> {
    let data = serde_json::to_vec_pretty(d)
        .map_err(|e| Error::new(ErrorKind::Io, format!("encoding image directory: {e}")))?;
    write_atomic(pool_dir, DIRECTORY, &data)
}

/// Runs blocking file work off the async threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::new(ErrorKind::Io, format!("store worker failed: {e}")))?
}

/// Reads up to `len` bytes at `off` into a fresh buffer, without zero-filling it first
/// (the kernel writes every byte we keep). Stops early only at end of file.
fn read_into(f: &File, off: u64, len: usize, flags: libc::c_int) -> std::io::Result<Bytes> {
    let mut buf: Vec<u8> = Vec::with_capacity(len);
    while buf.len() < len {
        let done = buf.len();
        let iov = libc::iovec {
            // SAFETY: points into the vector's spare capacity, `len - done` bytes long.
            iov_base: unsafe { buf.as_mut_ptr().add(done) } as *mut libc::c_void,
            iov_len: len - done,
        };
        // SAFETY: the kernel writes at most iov_len bytes into memory we own.
        let n = unsafe {
            libc::preadv2(
                f.as_raw_fd(),
                &iov,
                1,
                (off + done as u64) as libc::off_t,
                flags,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            break;
        }
        // SAFETY: the kernel initialised these n bytes.
        unsafe { buf.set_len(done + n as usize) };
    }
    Ok(Bytes::from(buf))
}

fn object_number(prefix_dot: &str, file_name: &str) -> Option<u64> {
    let rest = file_name.strip_prefix(prefix_dot)?;
    if rest.len() != 16 || !rest.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(rest, 16).ok()
}

fn list_data_objects(pool_dir: &Path, object_prefix: &str) -> Result<Vec<u64>> {
    let prefix_dot = format!("{object_prefix}.");
    let rd = std::fs::read_dir(pool_dir)
        .map_err(|e| Error::io(format!("listing {}", pool_dir.display()), e))?;
    let mut v = Vec::new();
    let mut progress = crate::progress::Progress::new(format!(
        "listing {}/{prefix_dot}*: entries read",
        pool_dir.display()
    ));
    for ent in rd {
        let ent = ent.map_err(|e| Error::io(format!("listing {}", pool_dir.display()), e))?;
        progress.tick();
        if let Some(n) = ent
            .file_name()
            .to_str()
            .and_then(|s| object_number(&prefix_dot, s))
        {
            v.push(n);
        }
    }
    v.sort_unstable();
    Ok(v)
}

impl Store for DirStore {
    type Image = DirImage;

    fn describe(&self) -> String {
        format!("dir:{}", self.root.display())
    }

    async fn create_image(&self, spec: &ImageSpec, opts: &CreateOptions) -> Result<()> {
        self.no_namespace(&spec.pool, &spec.namespace)?;
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
        self.no_namespace(&spec.pool, &spec.namespace)?;
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
            if !valid_id(&id) {
                return Err(Error::new(
                    ErrorKind::Corrupt,
                    format!("corrupt image id file {}", id_path.display()),
                ));
            }
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
        self.no_namespace(&pool, &namespace)?;
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
        ask_holder_to_resize(self, spec, size, allow_shrink).await
    }

    async fn open_image(&self, spec: &ImageSpec, mode: OpenMode) -> Result<DirImage> {
        self.no_namespace(&spec.pool, &spec.namespace)?;
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

struct ControlSocket {
    path: PathBuf,
    task: tokio::task::AbortHandle,
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

    fn object_path(&self, objno: u64) -> PathBuf {
        self.pool_dir
            .join(format!("{}.{objno:016x}", self.object_prefix))
    }

    /// The object's file, opened (and cached); `None` when it does not exist and
    /// `create` is false. The bool says whether this call created the file.
    ///
    /// The cache lock is held across the open so that an open and a `remove` (evict +
    /// unlink, also under the lock) cannot interleave: otherwise a reader could cache the
    /// descriptor of a file being unlinked, and a later write through it would vanish.
    fn file(&self, objno: u64, create: bool) -> Result<Option<(Arc<File>, bool)>> {
        let mut fds = lock(&self.fds);
        if let Some(f) = fds.get(&objno) {
            if !self.is_stale(f) {
                return Ok(Some((f.clone(), false)));
            }
            fds.remove(&objno);
        }
        let path = self.object_path(objno);
        let mut oo = OpenOptions::new();
        oo.read(true).write(!self.read_only);
        let (f, created) = match oo.open(&path) {
            Ok(f) => (f, false),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if !create {
                    return Ok(None);
                }
                match OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(&path)
                {
                    Ok(f) => (f, true),
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => (
                        oo.open(&path)
                            .map_err(|e| Error::io(format!("opening {}", path.display()), e))?,
                        false,
                    ),
                    Err(e) => return Err(Error::io(format!("creating {}", path.display()), e)),
                }
            }
            Err(e) => return Err(Error::io(format!("opening {}", path.display()), e)),
        };
        let f = Arc::new(f);
        if fds.len() >= FD_CACHE_SIZE {
            if let Some(k) = fds.keys().next().copied() {
                fds.remove(&k);
            }
        }
        fds.insert(objno, f.clone());
        Ok(Some((f, created)))
    }

    fn sync_dir(&self) -> Result<()> {
        fsync_dir(&self.pool_dir)
            .map_err(|e| Error::io(format!("syncing {}", self.pool_dir.display()), e))
    }

    fn write(&self, objno: u64, off: u64, data: &[u8], durable: bool) -> Result<()> {
        // Dirty before the write: a sync that starts after this write is acked must see it.
        lock(&self.dirty).insert(objno);
        let Some((f, created)) = self.file(objno, true)? else {
            return Err(Error::new(
                ErrorKind::Io,
                format!("{} could not be created", self.object_path(objno).display()),
            ));
        };
        let what = || format!("writing {}", self.object_path(objno).display());
        write_in_pieces(&f, data, off).map_err(|e| Error::io(what(), e))?;
        if created {
            self.dir_dirty.store(true, Ordering::Release);
        }
        if durable {
            f.sync_data().map_err(|e| Error::io(what(), e))?;
            if created {
                self.sync_dir()?;
            }
        }
        Ok(())
    }

    fn read(&self, objno: u64, off: u64, len: u64) -> Result<Option<Bytes>> {
        let Some((f, _)) = self.file(objno, false)? else {
            return Ok(None);
        };
        match read_into(&f, off, len as usize, 0) {
            Ok(b) => Ok(Some(b)),
            Err(e) => Err(Error::io(
                format!("reading {}", self.object_path(objno).display()),
                e,
            )),
        }
    }

    /// The descriptor of an object whose file is already open, without touching the
    /// filesystem: the fast paths below must never block on a directory lookup.
    fn cached_file(&self, objno: u64) -> Option<Arc<File>> {
        lock(&self.fds)
            .get(&objno)
            .filter(|f| !self.is_stale(f))
            .cloned()
    }

    /// Whether a cached descriptor may point at a file another process has removed. A
    /// writable handle holds the image's lock (or is a shared writer, whose removals
    /// evict its own cache), so only a read-only handle of the head must look: another
    /// client may remove an object it has open and create it anew, and reads through the
    /// old descriptor would return the removed file's bytes. One fstat per read.
    fn is_stale(&self, f: &File) -> bool {
        use std::os::unix::fs::MetadataExt;
        self.read_only && f.metadata().map_or(true, |m| m.nlink() == 0)
    }

    /// A read answered from the page cache on the calling thread, or `None` when that
    /// would block (data not cached, file not open, or no RWF_NOWAIT here): the caller
    /// then takes the blocking path, which repeats the read from the start.
    fn read_cached(&self, objno: u64, off: u64, len: u64) -> Option<Result<Bytes>> {
        if len > INLINE_READ_MAX as u64 || !NOWAIT_READS.load(Ordering::Relaxed) {
            return None;
        }
        let f = self.cached_file(objno)?;
        match read_into(&f, off, len as usize, libc::RWF_NOWAIT) {
            Ok(b) => Some(Ok(b)),
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => None,
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                NOWAIT_READS.store(false, Ordering::Relaxed);
                None
            }
            Err(e) => Some(Err(Error::io(
                format!("reading {}", self.object_path(objno).display()),
                e,
            ))),
        }
    }

    /// A small non-durable write to an object whose file is already open, done on the
    /// calling thread: it only copies into the page cache, which costs less than handing
    /// it to another thread and back. `None` means: take the blocking path.
    fn write_inline(&self, objno: u64, off: u64, data: &[u8], durable: bool) -> Option<Result<()>> {
        if durable || data.len() > INLINE_WRITE_MAX {
            return None;
        }
        let f = self.cached_file(objno)?;
        // Dirty before the write, exactly as in `write`.
        lock(&self.dirty).insert(objno);
        Some(
            write_in_pieces(&f, data, off).map_err(|e| {
                Error::io(format!("writing {}", self.object_path(objno).display()), e)
            }),
        )
    }

    fn zero(&self, objno: u64, off: u64, len: u64, durable: bool) -> Result<()> {
        let Some((f, _)) = self.file(objno, false)? else {
            return Ok(());
        };
        lock(&self.dirty).insert(objno);
        let what = || format!("zeroing in {}", self.object_path(objno).display());
        match punch_hole(&f, off, len) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                // No hole punching here: write zeros over the part that exists.
                self.punches_holes.store(false, Ordering::Relaxed);
                let size = f.metadata().map_err(|e| Error::io(what(), e))?.len();
                let end = (off + len).min(size);
                let mut pos = off;
                let zeros = vec![0u8; (1 << 20).min(len as usize)];
                while pos < end {
                    let n = ((end - pos) as usize).min(zeros.len());
                    write_in_pieces(&f, &zeros[..n], pos).map_err(|e| Error::io(what(), e))?;
                    pos += n as u64;
                }
            }
            Err(e) => return Err(Error::io(what(), e)),
        }
        if durable {
            f.sync_data().map_err(|e| Error::io(what(), e))?;
        }
        Ok(())
    }

    /// No data extent anywhere in the object's file (SEEK_DATA from 0 finds none): a
    /// file that partial zeroes punched out completely, or an empty one. Where holes
    /// cannot be punched the zeros were written as data, so this stays false there.
    fn holds_no_data(&self, objno: u64) -> Result<bool> {
        let Some((f, _)) = self.file(objno, false)? else {
            return Ok(false);
        };
        // SAFETY: lseek on a descriptor we own.
        let r = unsafe { libc::lseek(f.as_raw_fd(), 0, libc::SEEK_DATA) };
        if r >= 0 {
            return Ok(false);
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(true),
            // A file system without SEEK_DATA: not cheaply known.
            Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => Ok(false),
            _ => Err(Error::io(
                format!("looking for data in {}", self.object_path(objno).display()),
                e,
            )),
        }
    }

    fn remove(&self, objno: u64, durable: bool) -> Result<()> {
        let path = self.object_path(objno);
        {
            let mut fds = lock(&self.fds);
            fds.remove(&objno);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(Error::io(format!("removing {}", path.display()), e)),
            }
        }
        lock(&self.dirty).remove(&objno);
        if durable {
            self.dir_dirty.store(false, Ordering::Release);
            if let Err(e) = self.sync_dir() {
                self.dir_dirty.store(true, Ordering::Release);
                return Err(e);
            }
        } else {
            self.dir_dirty.store(true, Ordering::Release);
        }
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        let _one_at_a_time = lock(&self.sync_lock);
        let objs: Vec<u64> = lock(&self.dirty).drain().collect();
        for (i, &objno) in objs.iter().enumerate() {
            let res = match self.file(objno, false) {
                Ok(Some((f, _))) => f.sync_data().map_err(|e| {
                    Error::io(format!("syncing {}", self.object_path(objno).display()), e)
                }),
                // Removed since: nothing left to make durable but the directory.
                Ok(None) => Ok(()),
                Err(e) => Err(e),
            };
            if let Err(e) = res {
                lock(&self.dirty).extend(&objs[i..]);
                return Err(e);
            }
        }
        if self.dir_dirty.swap(false, Ordering::AcqRel) {
            if let Err(e) = self.sync_dir() {
                self.dir_dirty.store(true, Ordering::Release);
                return Err(e);
            }
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

/// Where the holder of image `id`'s exclusive lock listens for requests.
fn control_path(pool_dir: &Path, id: &str) -> PathBuf {
    pool_dir.join(format!("rbd_header.{id}.ctl"))
}

/// The control socket's protocol: one request line, one answer line.
/// `resize SIZE 0|1` (1: shrinking allowed) → `ok` or `error MESSAGE`.
fn parse_control_request(line: &str) -> std::result::Result<(u64, bool), String> {
    let w: Vec<&str> = line.split_whitespace().collect();
    match w[..] {
        ["resize", size, shrink] => {
            let size = size
                .parse::<u64>()
                .map_err(|_| format!("bad size {size:?}"))?;
            let shrink = match shrink {
                "0" => false,
                "1" => true,
                _ => return Err(format!("bad allow-shrink {shrink:?}")),
            };
            Ok((size, shrink))
        }
        _ => Err(format!("unknown request {:?}", line.trim_end())),
    }
}

async fn serve_control(
    listener: tokio::net::UnixListener,
    tx: tokio::sync::mpsc::UnboundedSender<crate::store::OwnerRequest>,
) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    loop {
        let Ok((conn, _)) = listener.accept().await else {
            continue;
        };
        let tx = tx.clone();
        tokio::spawn(async move {
            let (rd, mut wr) = conn.into_split();
            let mut line = String::new();
            // A request line is short; a client that sends more is not a client of ours.
            let mut rd = BufReader::new(tokio::io::AsyncReadExt::take(rd, 256));
            if rd.read_line(&mut line).await.is_err() {
                return;
            }
            let answer = match parse_control_request(&line) {
                Err(e) => format!("error {e}\n"),
                Ok((size, allow_shrink)) => {
                    let (done, rx) = tokio::sync::oneshot::channel();
                    let req = crate::store::OwnerRequest::Resize {
                        size,
                        allow_shrink,
                        done,
                    };
                    match tx.send(req) {
                        Err(_) => "error the image is closing\n".to_string(),
                        Ok(()) => match rx.await {
                            Ok(Ok(())) => "ok\n".to_string(),
                            Ok(Err(e)) => format!("error {}\n", e.to_string().replace('\n', " ")),
                            Err(_) => "error the image closed first\n".to_string(),
                        },
                    }
                }
            };
            let _ = wr.write_all(answer.as_bytes()).await;
        });
    }
}

/// Asks the process holding `spec`'s exclusive lock (a `serve` or `map` daemon) to
/// resize it, through its control socket, and waits for the outcome.
pub async fn ask_holder_to_resize(
    store: &DirStore,
    spec: &ImageSpec,
    size: u64,
    allow_shrink: bool,
) -> Result<()> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    store.no_namespace(&spec.pool, &spec.namespace)?;
    let pool_dir = store.pool_dir(&spec.pool);
    let Some(id) = read_image_id(&pool_dir, &spec.name)? else {
        return Err(store.not_found(spec));
    };
    let path = control_path(&pool_dir, &id);
    let busy = |why: String| {
        Error::new(
            ErrorKind::Busy,
            format!("image {spec} is in use and its holder takes no requests ({why}); stop it and resize again"),
        )
    };
    let conn = tokio::net::UnixStream::connect(&path)
        .await
        .map_err(|e| busy(format!("{}: {e}", path.display())))?;
    let (rd, mut wr) = conn.into_split();
    wr.write_all(format!("resize {size} {}\n", u8::from(allow_shrink)).as_bytes())
        .await
        .map_err(|e| busy(format!("{}: {e}", path.display())))?;
    let mut line = String::new();
    BufReader::new(rd)
        .read_line(&mut line)
        .await
        .map_err(|e| Error::io(format!("reading the answer on {}", path.display()), e))?;
    match line.trim_end().split_once(' ') {
        _ if line.trim_end() == "ok" => Ok(()),
        Some(("error", msg)) => Err(Error::new(ErrorKind::Io, msg.to_string())),
        _ => Err(Error::new(
            ErrorKind::Io,
            format!(
                "the holder of {spec} ended without an answer (it may have exited); check `rados-nbd info {spec}`"
            ),
        )),
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
        let i = &self.inner;
        if !i.exclusive || i.closed.load(Ordering::Acquire) {
            return None;
        }
        let mut ctl = lock(&i.ctl);
        if ctl.is_some() {
            return None;
        }
        let path = control_path(&i.pool_dir, &i.id);
        // We hold the exclusive lock: a socket file left here is a dead holder's.
        let _ = std::fs::remove_file(&path);
        let bound = std::os::unix::net::UnixListener::bind(&path).and_then(|l| {
            // Whoever may resize the image may also write it: the owner only.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
            l.set_nonblocking(true)?;
            tokio::net::UnixListener::from_std(l)
        });
        let listener = match bound {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(
                    "{}: no control socket, so `rados-nbd resize` cannot reach this process: {e}",
                    path.display()
                );
                return None;
            }
        };
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(serve_control(listener, tx)).abort_handle();
        *ctl = Some(ControlSocket { path, task });
        Some(rx)
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
            c.task.abort();
            let _ = std::fs::remove_file(&c.path);
        }
        // Dropping the file releases the flock.
        drop(lock(&self.inner.lock).take());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::DEFAULT_FEATURES;
    use std::os::unix::fs::MetadataExt;

    fn spec(s: &str) -> ImageSpec {
        s.parse().unwrap()
    }

    fn opts(size: u64) -> CreateOptions {
        CreateOptions {
            size,
            order: 22,
            features: DEFAULT_FEATURES,
        }
    }

    async fn setup() -> (tempfile::TempDir, DirStore) {
        let d = tempfile::tempdir().unwrap();
        let s = DirStore::new(d.path());
        s.create_image(&spec("vm1"), &opts(64 << 20)).await.unwrap();
        (d, s)
    }

    #[tokio::test]
    async fn create_list_open_remove() {
        let (d, s) = setup().await;
        let e = s
            .create_image(&spec("vm1"), &opts(1 << 20))
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::AlreadyExists);
        assert!(e.message.contains("rbd/vm1 already exists"), "{e}");
        s.create_image(&spec("p2/b"), &opts(1 << 20)).await.unwrap();
        s.create_image(&spec("a"), &opts(1 << 20)).await.unwrap();
        assert_eq!(s.list_images("rbd").await.unwrap(), ["a", "vm1"]);
        assert_eq!(s.list_images("p2").await.unwrap(), ["b"]);
        assert!(s.list_images("none").await.unwrap().is_empty());

        let img = s
            .open_image(&spec("vm1"), OpenMode::ReadOnly)
            .await
            .unwrap();
        let h = img.header();
        assert_eq!(h.id.len(), 12);
        assert!(h.id.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!((h.size, h.order, h.flags), (64 << 20, 22, 0));
        assert_eq!(h.object_prefix, format!("rbd_data.{}", h.id));
        let pool = d.path().join("rbd");
        assert!(pool.join(format!("rbd_header.{}", h.id)).is_file());
        assert_eq!(
            std::fs::read_to_string(pool.join("rbd_id.vm1")).unwrap(),
            h.id
        );
        img.close().await.unwrap();

        let rw = s
            .open_image(&spec("vm1"), OpenMode::ReadWrite)
            .await
            .unwrap();
        rw.write(0, 0, Bytes::from_static(b"x"), false)
            .await
            .unwrap();
        rw.write_object_map(vec![1, 2, 3]).await.unwrap();
        rw.close().await.unwrap();
        s.remove_image(&spec("vm1")).await.unwrap();
        assert_eq!(s.list_images("rbd").await.unwrap(), ["a"]);
        let left: Vec<String> = std::fs::read_dir(&pool)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.contains(&h.id))
            .collect();
        assert!(left.is_empty(), "{left:?}");
        let e = s
            .open_image(&spec("vm1"), OpenMode::ReadOnly)
            .await
            .err()
            .unwrap();
        assert_eq!(e.kind, ErrorKind::NotFound);
        assert_eq!(
            e.message,
            format!("image rbd/vm1 not found in dir:{}", d.path().display())
        );
        assert_eq!(
            s.remove_image(&spec("vm1")).await.unwrap_err().kind,
            ErrorKind::NotFound
        );
    }

    #[tokio::test]
    async fn bad_create_options_change_nothing() {
        let d = tempfile::tempdir().unwrap();
        let s = DirStore::new(d.path());
        let mut o = opts(1 << 20);
        o.order = 30;
        let e = s.create_image(&spec("x"), &o).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidInput);
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn sparse_writes_reads_and_short_reads() {
        let (d, s) = setup().await;
        let img = s
            .open_image(&spec("vm1"), OpenMode::ReadWrite)
            .await
            .unwrap();
        assert_eq!(img.read(3, 0, 4096, None).await.unwrap(), None);
        let data = Bytes::from(vec![0xabu8; 8192]);
        img.write(3, 1 << 20, data.clone(), false).await.unwrap();
        let p = d.path().join("rbd").join(img.header().object_name(3));
        let md = std::fs::metadata(&p).unwrap();
        assert_eq!(md.len(), (1 << 20) + 8192);
        // Sparse: far fewer blocks than the file length.
        assert!(md.blocks() * 512 < 256 * 1024, "{} blocks", md.blocks());
        let r = img.read(3, (1 << 20) - 4, 8, None).await.unwrap().unwrap();
        assert_eq!(&r[..], &[0, 0, 0, 0, 0xab, 0xab, 0xab, 0xab]);
        // Past the end of the object: short.
        let r = img
            .read(3, (1 << 20) + 8000, 4096, None)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(r.len(), 192);
        let r = img.read(3, 2 << 20, 4096, None).await.unwrap().unwrap();
        assert!(r.is_empty());
        assert_eq!(img.list_objects(None).await.unwrap(), [3]);
        img.close().await.unwrap();
    }

    #[test]
    fn writes_are_cut_at_piece_boundaries() {
        let p = WRITE_PIECE as usize;
        assert_eq!(piece_len(0, 4096), 4096);
        assert_eq!(piece_len(0, 1 << 20), p);
        assert_eq!(piece_len(WRITE_PIECE - 512, 4096), 512);
        assert_eq!(piece_len(WRITE_PIECE, 3 * p), p);
        assert_eq!(piece_len(3 * WRITE_PIECE + 1, p), p - 1);
        // Every byte lands where it belongs, across unaligned starts and many pieces.
        let dir = tempfile::tempdir().unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("obj"))
            .unwrap();
        let data: Vec<u8> = (0..(3 * p + 777)).map(|i| (i % 251) as u8).collect();
        let off = WRITE_PIECE - 300;
        write_in_pieces(&f, &data, off).unwrap();
        let mut back = vec![0u8; data.len()];
        f.read_exact_at(&mut back, off).unwrap();
        assert_eq!(back, data);
        assert_eq!(f.metadata().unwrap().len(), off + data.len() as u64);
    }

    #[tokio::test]
    async fn zero_punches_holes_and_missing_stays_missing() {
        let (d, s) = setup().await;
        let img = s
            .open_image(&spec("vm1"), OpenMode::ReadWrite)
            .await
            .unwrap();
        img.write(0, 0, Bytes::from(vec![7u8; 1 << 20]), true)
            .await
            .unwrap();
        let p = d.path().join("rbd").join(img.header().object_name(0));
        let before = std::fs::metadata(&p).unwrap().blocks();
        img.zero(0, 256 << 10, 512 << 10, false).await.unwrap();
        let after = std::fs::metadata(&p).unwrap().blocks();
        assert!(after < before, "blocks {before} -> {after}");
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 1 << 20);
        let r = img.read(0, 0, 1 << 20, None).await.unwrap().unwrap();
        assert!(r[..256 << 10].iter().all(|&b| b == 7));
        assert!(r[256 << 10..768 << 10].iter().all(|&b| b == 0));
        assert!(r[768 << 10..].iter().all(|&b| b == 7));
        img.zero(5, 0, 4096, true).await.unwrap();
        assert_eq!(img.read(5, 0, 10, None).await.unwrap(), None);
        assert_eq!(img.list_objects(None).await.unwrap(), [0]);
        img.remove(0, false).await.unwrap();
        img.remove(0, false).await.unwrap();
        assert!(img.list_objects(None).await.unwrap().is_empty());
        img.close().await.unwrap();
    }

    #[tokio::test]
    // Holding the sync lock across the wait is the point: it stands for a sync in progress.
    #[allow(clippy::await_holding_lock)]
    async fn a_flush_waits_for_the_sync_already_running() {
        // A sync in progress has taken the dirty set; a second one must not find it
        // empty and return before those objects are durable.
        let (_d, s) = setup().await;
        let img = Arc::new(
            s.open_image(&spec("vm1"), OpenMode::ReadWrite)
                .await
                .unwrap(),
        );
        img.write(1, 0, Bytes::from_static(b"a"), false)
            .await
            .unwrap();
        let i = img.inner.clone();
        let running = lock(&i.sync_lock);
        let objs: Vec<u64> = lock(&i.dirty).drain().collect();
        assert_eq!(objs, [1]);
        let second = tokio::spawn({
            let img = img.clone();
            async move { img.sync().await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(
            !second.is_finished(),
            "the second FLUSH returned while the first was still syncing"
        );
        drop(running);
        second.await.unwrap().unwrap();
        img.close().await.unwrap();
    }

    #[tokio::test]
    async fn durability_bookkeeping() {
        let (_d, s) = setup().await;
        let img = s
            .open_image(&spec("vm1"), OpenMode::ReadWrite)
            .await
            .unwrap();
        let i = img.inner.clone();
        img.write(1, 0, Bytes::from_static(b"a"), false)
            .await
            .unwrap();
        img.write(2, 0, Bytes::from_static(b"b"), false)
            .await
            .unwrap();
        assert_eq!(lock(&i.dirty).len(), 2);
        assert!(
            i.dir_dirty.load(Ordering::Acquire),
            "creation dirties the dir"
        );
        img.sync().await.unwrap();
        assert!(lock(&i.dirty).is_empty());
        assert!(!i.dir_dirty.load(Ordering::Acquire));
        // Rewriting an existing object dirties it but not the directory.
        img.write(1, 10, Bytes::from_static(b"c"), false)
            .await
            .unwrap();
        assert!(lock(&i.dirty).contains(&1));
        assert!(!i.dir_dirty.load(Ordering::Acquire));
        img.remove(2, false).await.unwrap();
        assert!(
            i.dir_dirty.load(Ordering::Acquire),
            "removal dirties the dir"
        );
        img.sync().await.unwrap();
        assert!(lock(&i.dirty).is_empty() && !i.dir_dirty.load(Ordering::Acquire));
        // A durable removal syncs the directory itself.
        img.write(3, 0, Bytes::from_static(b"d"), false)
            .await
            .unwrap();
        img.remove(3, true).await.unwrap();
        assert!(!i.dir_dirty.load(Ordering::Acquire));
        // A dirty object whose fd was evicted is still synced (reopened by path).
        img.write(4, 0, Bytes::from_static(b"e"), false)
            .await
            .unwrap();
        lock(&i.fds).clear();
        img.sync().await.unwrap();
        assert!(lock(&i.dirty).is_empty());
        img.close().await.unwrap();
        assert!(img.sync().await.is_err(), "closed handle refuses work");
    }

    #[tokio::test]
    async fn reads_racing_removals_never_strand_a_later_write() {
        let (_d, s) = setup().await;
        let img = s
            .open_image(&spec("vm1"), OpenMode::ReadWrite)
            .await
            .unwrap();
        let i = img.inner.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let (i, stop) = (i.clone(), stop.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let _ = i.read(0, 0, 16);
                    }
                })
            })
            .collect();
        for n in 0..2000u32 {
            i.remove(0, false).unwrap();
            i.write(0, 0, &n.to_le_bytes(), false).unwrap();
            // What is on disk under the object's name must be the write just acked.
            let on_disk = std::fs::read(i.object_path(0)).unwrap();
            assert_eq!(
                on_disk,
                n.to_le_bytes(),
                "write {n} went to an unlinked file"
            );
        }
        stop.store(true, Ordering::Relaxed);
        for r in readers {
            r.join().unwrap();
        }
        img.close().await.unwrap();
    }

    #[tokio::test]
    async fn fd_cache_is_bounded() {
        let (_d, s) = setup().await;
        let img = s
            .open_image(&spec("vm1"), OpenMode::ReadWrite)
            .await
            .unwrap();
        for o in 0..(FD_CACHE_SIZE as u64 + 20) {
            img.write(o, 0, Bytes::from_static(b"z"), false)
                .await
                .unwrap();
        }
        assert!(lock(&img.inner.fds).len() <= FD_CACHE_SIZE);
        img.sync().await.unwrap();
        for o in 0..(FD_CACHE_SIZE as u64 + 20) {
            assert_eq!(&img.read(o, 0, 1, None).await.unwrap().unwrap()[..], b"z");
        }
        img.close().await.unwrap();
    }

    #[tokio::test]
    async fn second_writer_is_busy() {
        let (_d, s) = setup().await;
        let a = s
            .open_image(&spec("vm1"), OpenMode::ReadWrite)
            .await
            .unwrap();
        let e = s
            .open_image(&spec("vm1"), OpenMode::ReadWrite)
            .await
            .err()
            .unwrap();
        assert_eq!(e.kind, ErrorKind::Busy);
        assert!(e.message.contains("rbd/vm1 is in use"), "{e}");
        assert_eq!(
            s.remove_image(&spec("vm1")).await.unwrap_err().kind,
            ErrorKind::Busy
        );
        // Readers are not locked out.
        let r = s
            .open_image(&spec("vm1"), OpenMode::ReadOnly)
            .await
            .unwrap();
        assert_eq!(
            r.write(0, 0, Bytes::from_static(b"x"), false)
                .await
                .unwrap_err()
                .kind,
            ErrorKind::ReadOnly
        );
        assert_eq!(
            r.set_flags(1, 1).await.unwrap_err().kind,
            ErrorKind::ReadOnly
        );
        a.close().await.unwrap();
        let b = s
            .open_image(&spec("vm1"), OpenMode::ReadWrite)
            .await
            .unwrap();
        drop(b); // dropping without close releases the lock too (a crash does)
        s.open_image(&spec("vm1"), OpenMode::ReadWrite)
            .await
            .unwrap()
            .close()
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn shared_writers_coexist_but_exclude_an_exclusive_one() {
        let (_d, s) = setup().await;
        let a = s
            .open_image(&spec("vm1"), OpenMode::SharedWrite)
            .await
            .unwrap();
        let b = s
            .open_image(&spec("vm1"), OpenMode::SharedWrite)
            .await
            .unwrap();
        a.write(0, 0, Bytes::from_static(b"a"), false)
            .await
            .unwrap();
        b.write(0, 1, Bytes::from_static(b"b"), true).await.unwrap();
        assert_eq!(&a.read(0, 0, 2, None).await.unwrap().unwrap()[..], b"ab");
        let e = s
            .open_image(&spec("vm1"), OpenMode::ReadWrite)
            .await
            .err()
            .unwrap();
        assert_eq!(e.kind, ErrorKind::Busy);
        a.close().await.unwrap();
        b.close().await.unwrap();
        let x = s
            .open_image(&spec("vm1"), OpenMode::ReadWrite)
            .await
            .unwrap();
        let e = s
            .open_image(&spec("vm1"), OpenMode::SharedWrite)
            .await
            .err()
            .unwrap();
        assert_eq!(e.kind, ErrorKind::Busy);
        assert!(e.message.contains("not as a shared image"), "{e}");
        x.close().await.unwrap();
    }

    #[tokio::test]
    async fn flags_meta_and_object_map_persist_atomically() {
        let (d, s) = setup().await;
        let img = s
            .open_image(&spec("vm1"), OpenMode::ReadWrite)
            .await
            .unwrap();
        img.set_flags(3, 3).await.unwrap();
        img.set_flags(0, 2).await.unwrap();
        img.set_meta("rados-nbd.shared", "true").await.unwrap();
        assert_eq!(img.read_object_map(None).await.unwrap(), None);
        img.write_object_map(vec![9; 10]).await.unwrap();
        let id = img.header().id;
        img.close().await.unwrap();
        let pool = d.path().join("rbd");
        let tmp: Vec<_> = std::fs::read_dir(&pool)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .contains(".tmp")
            })
            .collect();
        assert!(tmp.is_empty());
        let raw: serde_json::Value =
            serde_json::from_slice(&std::fs::read(pool.join(format!("rbd_header.{id}"))).unwrap())
                .unwrap();
        assert_eq!(raw["flags"], 1);
        assert_eq!(raw["metadata"]["rados-nbd.shared"], "true");
        let r = s
            .open_image(&spec("vm1"), OpenMode::ReadOnly)
            .await
            .unwrap();
        assert_eq!(r.header().flags, 1);
        assert_eq!(
            r.get_meta("rados-nbd.shared").await.unwrap().as_deref(),
            Some("true")
        );
        assert_eq!(r.get_meta("nope").await.unwrap(), None);
        assert_eq!(r.read_object_map(None).await.unwrap(), Some(vec![9; 10]));
        assert_eq!(r.refresh_header().await.unwrap().flags, 1);
        r.close().await.unwrap();
    }

    #[tokio::test]
    async fn corrupt_or_missing_header_is_named() {
        let (d, s) = setup().await;
        let pool = d.path().join("rbd");
        let id = std::fs::read_to_string(pool.join("rbd_id.vm1")).unwrap();
        let hp = pool.join(format!("rbd_header.{id}"));
        let good = std::fs::read(&hp).unwrap();
        std::fs::write(&hp, b"{not json").unwrap();
        let e = s
            .open_image(&spec("vm1"), OpenMode::ReadOnly)
            .await
            .err()
            .unwrap();
        assert_eq!(e.kind, ErrorKind::Corrupt);
        assert!(e.message.contains(&hp.display().to_string()), "{e}");
        let mut h: serde_json::Value = serde_json::from_slice(&good).unwrap();
        h["order"] = 40.into();
        std::fs::write(&hp, serde_json::to_vec(&h).unwrap()).unwrap();
        let e = s
            .open_image(&spec("vm1"), OpenMode::ReadWrite)
            .await
            .err()
            .unwrap();
        assert_eq!(e.kind, ErrorKind::Corrupt);
        assert!(e.message.contains("order 40"), "{e}");
        std::fs::remove_file(&hp).unwrap();
        let e = s
            .open_image(&spec("vm1"), OpenMode::ReadOnly)
            .await
            .err()
            .unwrap();
        assert_eq!(e.kind, ErrorKind::NotFound);
        assert!(e.message.contains(&hp.display().to_string()), "{e}");
        // A broken image can still be removed.
        s.remove_image(&spec("vm1")).await.unwrap();
        assert!(s.list_images("rbd").await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn snapshots_are_read_only_and_named() {
        let (_d, s) = setup().await;
        let e = s
            .open_image(&spec("vm1@s1"), OpenMode::ReadWrite)
            .await
            .err()
            .unwrap();
        assert_eq!(e.kind, ErrorKind::ReadOnly);
        let e = s
            .open_image(&spec("vm1@s1"), OpenMode::ReadOnly)
            .await
            .err()
            .unwrap();
        assert_eq!(e.kind, ErrorKind::NotFound);
        assert!(e.message.contains("rbd/vm1@s1"), "{e}");
    }

    #[test]
    fn object_names_parse_strictly() {
        assert_eq!(
            object_number("rbd_data.ab.", "rbd_data.ab.000000000000000f"),
            Some(15)
        );
        assert_eq!(object_number("rbd_data.ab.", "rbd_data.ab.0f"), None);
        assert_eq!(
            object_number("rbd_data.ab.", "rbd_data.abc.000000000000000f"),
            None
        );
        assert_eq!(
            object_number("rbd_data.ab.", "rbd_data.ab.00000000000000zz"),
            None
        );
    }

    #[test]
    fn os_errors_map_to_kinds() {
        let k = |n| Error::io("x", std::io::Error::from_raw_os_error(n)).kind;
        assert_eq!(k(libc::ENOSPC), ErrorKind::NoSpace);
        assert_eq!(k(libc::EDQUOT), ErrorKind::NoSpace);
        assert_eq!(k(libc::EIO), ErrorKind::Io);
        assert_eq!(k(libc::ENOENT), ErrorKind::NotFound);
    }
}
