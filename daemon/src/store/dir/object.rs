//! Object-file I/O: data objects as sparse files, written in aligned pieces, read without
//! blocking when the page cache has them, zeroed by punching holes; the open-descriptor
//! cache and its stale-descriptor check; the dirty sets that `sync` makes durable.

use super::header::fsync_dir;
use super::snap::Change;
use super::{lock, Inner};
use crate::error::{Error, ErrorKind, Result};
use bytes::Bytes;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Open object files kept around; beyond this the least useful is closed. A closed
/// dirty file is reopened by `sync`: fdatasync works on the inode, not the descriptor.
pub(super) const FD_CACHE_SIZE: usize = 256;

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
/// a folio walks the buffer heads of the whole folio: small rewrites of data first written
/// in large writes are slow, and so is the large write itself, which allocates the large
/// folios. Filesystems without buffer heads lose only a few syscalls per MiB. The figures
/// are in bench/README.md ("4 KiB writes into large page-cache folios"); `bench/folio.py`
/// measures them.
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
pub(super) fn write_in_pieces(f: &File, mut data: &[u8], mut off: u64) -> std::io::Result<()> {
    while !data.is_empty() {
        let n = piece_len(off, data.len());
        f.write_all_at(&data[..n], off)?;
        data = &data[n..];
        off += n as u64;
    }
    Ok(())
}

/// Deallocates `len` bytes at `off` of `f`, keeping its size.
pub(super) fn punch_hole(f: &File, off: u64, len: u64) -> std::io::Result<()> {
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

/// Reads up to `len` bytes at `off` into a fresh buffer, without zero-filling it first
/// (the kernel writes every byte we keep). Stops early only at end of file.
pub(super) fn read_into(
    f: &File,
    off: u64,
    len: usize,
    flags: libc::c_int,
) -> std::io::Result<Bytes> {
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

pub(super) fn list_data_objects(pool_dir: &Path, object_prefix: &str) -> Result<Vec<u64>> {
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

impl Inner {
    pub(super) fn object_path(&self, objno: u64) -> PathBuf {
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

    pub(super) fn write(&self, objno: u64, off: u64, data: &[u8], durable: bool) -> Result<()> {
        self.prepare_change(objno, Change::Create)?;
        let Some((f, created)) = self.file(objno, true)? else {
            return Err(Error::new(
                ErrorKind::Io,
                format!("{} could not be created", self.object_path(objno).display()),
            ));
        };
        if created {
            // Even if the write below fails: the file exists.
            self.dir_dirty.store(true, Ordering::Release);
        }
        let what = || format!("writing {}", self.object_path(objno).display());
        #[cfg(test)]
        self.before_data_write();
        let r = write_in_pieces(&f, data, off);
        self.written(objno);
        r.map_err(|e| Error::io(what(), e))?;
        if durable {
            self.sync_file(&f).map_err(|e| Error::io(what(), e))?;
            self.sync_dir_if_changed(created)?;
        }
        Ok(())
    }

    /// For a durable change: the directory fsynced when this change created the object,
    /// or when any creation (a copy-up's link, another write's) is not durable yet, which
    /// may be this object's own: its data on disk is no use without its directory entry.
    pub(super) fn sync_dir_if_changed(&self, created: bool) -> Result<()> {
        if created || self.dir_dirty.load(Ordering::Acquire) {
            self.sync_dir()?;
        }
        Ok(())
    }

    pub(super) fn read(&self, objno: u64, off: u64, len: u64) -> Result<Option<Bytes>> {
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

    /// Whether a cached descriptor may point at a file another client has removed. The
    /// exclusive lock holder is the only one that removes, so only a read-only handle
    /// and a shared writer must look: another client may remove an object (a
    /// whole-object discard unlinks it) and create it anew. Reads through the old
    /// descriptor would return the removed file's bytes, and a shared writer's writes
    /// would go into the unlinked inode and be lost. One fstat per use of the cache.
    /// (A removal between this look and the write is one racing with the write, which
    /// may then count as the earlier of the two.)
    fn is_stale(&self, f: &File) -> bool {
        use std::os::unix::fs::MetadataExt;
        !self.exclusive && f.metadata().map_or(true, |m| m.nlink() == 0)
    }

    /// A read answered from the page cache on the calling thread, or `None` when that
    /// would block (data not cached, file not open, or no RWF_NOWAIT here): the caller
    /// then takes the blocking path, which repeats the read from the start.
    pub(super) fn read_cached(&self, objno: u64, off: u64, len: u64) -> Option<Result<Bytes>> {
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
    pub(super) fn write_inline(
        &self,
        objno: u64,
        off: u64,
        data: &[u8],
        durable: bool,
    ) -> Option<Result<()>> {
        if durable || data.len() > INLINE_WRITE_MAX {
            return None;
        }
        // With snapshots, the first change of an object may have to preserve it first.
        if self.has_snaps.load(Ordering::Acquire) && !lock(&self.cow_clean).contains(&objno) {
            return None;
        }
        let f = self.cached_file(objno)?;
        #[cfg(test)]
        self.before_data_write();
        let r = write_in_pieces(&f, data, off)
            .map_err(|e| Error::io(format!("writing {}", self.object_path(objno).display()), e));
        self.written(objno);
        Some(r)
    }

    /// Marks object `objno` for the next `sync`, once a change's data is in the page
    /// cache. Marked before, a sync running beside the change (a FLUSH from another
    /// request) could take the mark, make the file durable before the data got there,
    /// and leave nothing for the next FLUSH, which the client sends after the change
    /// was acknowledged: that FLUSH would be acknowledged with the data not on disk.
    /// Marked after, a sync that takes the mark covers the data; one that ran before
    /// leaves the mark for the next.
    fn written(&self, objno: u64) {
        lock(&self.dirty).insert(objno);
    }

    /// fdatasync of one object's file for a durable (FUA) change. A failure is kept as a
    /// failed `sync` is (see there): the failed writeback may have been another, already
    /// acknowledged write's, and a later FLUSH must not succeed over it.
    pub(super) fn sync_file(&self, f: &File) -> std::io::Result<()> {
        let r = f.sync_data();
        if let Err(e) = &r {
            lock(&self.sync_failed).get_or_insert_with(|| format!("fdatasync of an object: {e}"));
        }
        r
    }

    /// A hook run just before a write's data goes to the file (tests: a sync there).
    #[cfg(test)]
    fn before_data_write(&self) {
        let hook = lock(&self.test_hook).clone();
        if let Some(h) = hook {
            h(self);
        }
    }

    pub(super) fn zero(&self, objno: u64, off: u64, len: u64, durable: bool) -> Result<()> {
        self.prepare_change(objno, Change::Modify)?;
        let Some((f, _)) = self.file(objno, false)? else {
            return Ok(());
        };
        let r = self.zero_in(&f, objno, off, len);
        self.written(objno);
        r?;
        if durable {
            self.sync_file(&f).map_err(|e| {
                Error::io(
                    format!("zeroing in {}", self.object_path(objno).display()),
                    e,
                )
            })?;
            self.sync_dir_if_changed(false)?;
        }
        Ok(())
    }

    /// `zero`'s change to the file: a hole punched, or zeros written where holes cannot
    /// be punched.
    fn zero_in(&self, f: &File, objno: u64, off: u64, len: u64) -> Result<()> {
        let what = || format!("zeroing in {}", self.object_path(objno).display());
        match punch_hole(f, off, len) {
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
                    write_in_pieces(f, &zeros[..n], pos).map_err(|e| Error::io(what(), e))?;
                    pos += n as u64;
                }
            }
            Err(e) => return Err(Error::io(what(), e)),
        }
        Ok(())
    }

    /// No data extent anywhere in the object's file (SEEK_DATA from 0 finds none): a
    /// file that partial zeroes punched out completely, or an empty one. Where holes
    /// cannot be punched the zeros were written as data, so this stays false there.
    pub(super) fn holds_no_data(&self, objno: u64) -> Result<bool> {
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

    pub(super) fn remove(&self, objno: u64, durable: bool) -> Result<()> {
        // Kept for a snapshot: moved aside, and durably (the move fsyncs the directory).
        if self.remove_kept(objno)? {
            return Ok(());
        }
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

    pub(super) fn sync(&self) -> Result<()> {
        let _one_at_a_time = lock(&self.sync_lock);
        // A sync that failed once fails from then on: Linux reports a failed writeback
        // once, then marks the pages clean, so a retry would succeed with the data lost
        // ("fsyncgate"); a FLUSH acknowledged then, or a close that writes the map and
        // clears the flag, would claim data the disk never got.
        if let Some(e) = lock(&self.sync_failed).as_ref() {
            return Err(Error::new(
                ErrorKind::Io,
                format!("{e} (earlier; data written since the last good sync may be lost: reopen the image)"),
            ));
        }
        let r = self.sync_once();
        if let Err(e) = &r {
            *lock(&self.sync_failed) = Some(e.to_string());
        }
        r
    }

    fn sync_once(&self) -> Result<()> {
        #[cfg(test)]
        if self.test_fail_sync.swap(false, Ordering::AcqRel) {
            return Err(Error::new(ErrorKind::Io, "syncing: injected EIO (test)"));
        }
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
