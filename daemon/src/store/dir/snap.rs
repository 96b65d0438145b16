//! Snapshots, modelled on RADOS self-managed snapshots so that the image layer works
//! here as on Ceph.
//!
//! An object's versions live beside its head file:
//!
//! ```text
//! rbd_data.<id>.<objno %016x>                    the head
//! rbd_data.<id>.<objno %016x>@<hi %016x>         the data the object had up to snapshot hi
//! rbd_data.<id>.<objno %016x>@<hi %016x>.none    a whiteout: the object did not exist then
//! ```
//!
//! A version covers the image's snapshots from just after the version before it (or
//! from the first) up to `hi`; the head covers the snapshots after the newest version.
//! This is RADOS's SnapSet told by file names: a data version is a clone whose snaps
//! are the snapshots it covers, the head's `seq` is the newest `hi`, and a whiteout
//! stands for the interval in which RADOS has no clone because the object was absent.
//! Invariant: every `hi` is the id of an existing snapshot (or of one listed in the
//! header's `removing`), so a read at snapshot `s` finds its version by probing the
//! ids `>= s` in order, without listing the directory.
//!
//! Copy-on-write, on the first change of an object after a snapshot whose head has
//! no version at the newest snapshot: copy the head to a temporary file (a reflink
//! where the file system has one), fsync it, hard-link the head as the version, rename
//! the copy over the head, fsync the directory. Then the head changes. So the old
//! inode, which readers of the snapshot may have open, is never written again, and
//! the version is durable before the head changes. A crash between link and rename
//! leaves head and version sharing one inode (both views right); the next change sees
//! the link count of 2 and makes the copy again before writing, first linking the head
//! as the newest snapshot's version too when a snapshot was taken since (the old link
//! covers only the snapshots up to its own). Removal renames the
//! head to the version (no copy). Creation after a snapshot first makes a whiteout.

use super::header::{fsync_dir, parse_header, SnapRecord};
use super::object::{punch_hole, read_into, write_in_pieces};
use super::{lock, Inner};
use crate::error::{Error, ErrorKind, Result};
use crate::store::snapset::{object_state, CloneInfo, SnapSet, SNAP_HEAD};
use crate::store::RBD_FEATURE_FAST_DIFF;
use bytes::Bytes;
use objmap::ObjectState;
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

const WHITEOUT: &str = ".none";

/// The versions of one object found in a listing.
#[derive(Debug, Default)]
struct Versions {
    head: bool,
    /// `(hi, is_data)`, ascending.
    kept: Vec<(u64, bool)>,
}

/// `(objno, hi, whiteout)` of a version file name.
fn parse_version(prefix_dot: &str, name: &str) -> Option<(u64, u64, bool)> {
    let rest = name.strip_prefix(prefix_dot)?;
    let (rest, whiteout) = match rest.strip_suffix(WHITEOUT) {
        Some(r) => (r, true),
        None => (rest, false),
    };
    let (obj, hi) = rest.split_once('@')?;
    let hex = |s: &str| {
        (s.len() == 16 && s.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| u64::from_str_radix(s, 16).ok())
            .flatten()
    };
    Some((hex(obj)?, hex(hi)?, whiteout))
}

fn head_number(prefix_dot: &str, name: &str) -> Option<u64> {
    let rest = name.strip_prefix(prefix_dot)?;
    (rest.len() == 16 && rest.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| u64::from_str_radix(rest, 16).ok())
        .flatten()
}

/// Every head and version of the image's objects: one directory listing.
fn scan(pool_dir: &Path, prefix: &str) -> Result<BTreeMap<u64, Versions>> {
    let prefix_dot = format!("{prefix}.");
    let rd = std::fs::read_dir(pool_dir)
        .map_err(|e| Error::io(format!("listing {}", pool_dir.display()), e))?;
    let mut out: BTreeMap<u64, Versions> = BTreeMap::new();
    for ent in rd {
        let ent = ent.map_err(|e| Error::io(format!("listing {}", pool_dir.display()), e))?;
        let Some(name) = ent.file_name().to_str().map(str::to_string) else {
            continue;
        };
        if let Some(n) = head_number(&prefix_dot, &name) {
            out.entry(n).or_default().head = true;
        } else if let Some((n, hi, whiteout)) = parse_version(&prefix_dot, &name) {
            out.entry(n).or_default().kept.push((hi, !whiteout));
        }
    }
    for v in out.values_mut() {
        v.kept.sort_unstable();
    }
    Ok(out)
}

/// Names of the version files of the image with data prefix `prefix` (removal).
pub(super) fn list_version_files(pool_dir: &Path, prefix: &str) -> Result<Vec<String>> {
    Ok(scan(pool_dir, prefix)?
        .into_iter()
        .flat_map(|(n, v)| {
            v.kept
                .into_iter()
                .map(move |(hi, data)| version_name(prefix, n, hi, !data))
        })
        .collect())
}

fn version_name(prefix: &str, objno: u64, hi: u64, whiteout: bool) -> String {
    let w = if whiteout { WHITEOUT } else { "" };
    format!("{prefix}.{objno:016x}@{hi:016x}{w}")
}

/// The snapshot set RADOS would report for these versions.
fn snap_set(v: &Versions, image_snaps: &[u64]) -> SnapSet {
    let mut clones = Vec::new();
    let mut prev = 0;
    for &(hi, data) in &v.kept {
        if data {
            let snaps = image_snaps
                .iter()
                .copied()
                .filter(|&s| s > prev && s <= hi)
                .collect();
            clones.push(CloneInfo {
                id: hi,
                snaps,
                size: 0,
                overlap: vec![],
            });
        }
        prev = hi;
    }
    if v.head {
        clones.push(CloneInfo {
            id: SNAP_HEAD,
            snaps: vec![],
            size: 0,
            overlap: vec![],
        });
    }
    SnapSet { seq: prev, clones }
}

/// The ranges in which files `a` and `b` hold the same bytes, up to the shorter one's
/// end, in 512-byte blocks (a sector, what a block device writes); all of it when they
/// are one inode.
fn same_ranges(a: &File, b: &File) -> std::io::Result<Vec<(u64, u64)>> {
    const BLOCK: usize = 512;
    let (ma, mb) = (a.metadata()?, b.metadata()?);
    let len = ma.len().min(mb.len());
    let mut out = crate::store::snapset::Ranges::default();
    if (ma.dev(), ma.ino()) == (mb.dev(), mb.ino()) {
        out.insert(0, len);
        return Ok(out.0);
    }
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut pos = 0u64;
    while pos < len {
        let n = ((len - pos) as usize).min(ba.len());
        a.read_exact_at(&mut ba[..n], pos)?;
        b.read_exact_at(&mut bb[..n], pos)?;
        for (k, (x, y)) in ba[..n].chunks(BLOCK).zip(bb[..n].chunks(BLOCK)).enumerate() {
            if x == y {
                out.insert(pos + (k * BLOCK) as u64, x.len() as u64);
            }
        }
        pos += n as u64;
    }
    Ok(out.0)
}

fn exists(p: &Path) -> Result<bool> {
    match std::fs::symlink_metadata(p) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(Error::io(format!("looking up {}", p.display()), e)),
    }
}

fn open_opt(p: &Path) -> Result<Option<File>> {
    match File::open(p) {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(format!("opening {}", p.display()), e)),
    }
}

/// Linux's FICLONE ioctl: `dst` shares `src`'s extents (btrfs, xfs, bcachefs).
const FICLONE: libc::c_ulong = 0x4004_9409;

/// Makes `dst` (empty) a copy of `src`: a reflink where the file system has them,
/// else a copy of the data extents only, so holes stay holes.
fn copy_file(src: &File, dst: &File) -> std::io::Result<()> {
    // SAFETY: an ioctl on two descriptors we own; no memory is passed.
    if unsafe { libc::ioctl(dst.as_raw_fd(), FICLONE as _, src.as_raw_fd()) } == 0 {
        return Ok(());
    }
    let size = src.metadata()?.len();
    let mut pos = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    while pos < size {
        // SAFETY: lseek on a descriptor we own.
        let data = unsafe { libc::lseek(src.as_raw_fd(), pos as libc::off_t, libc::SEEK_DATA) };
        let (start, end) = if data < 0 {
            match std::io::Error::last_os_error().raw_os_error() {
                Some(libc::ENXIO) => break,
                // No SEEK_DATA here: copy everything.
                _ => (pos, size),
            }
        } else {
            // SAFETY: as above.
            let hole =
                unsafe { libc::lseek(src.as_raw_fd(), data as libc::off_t, libc::SEEK_HOLE) };
            let hole = if hole < 0 { size } else { hole as u64 };
            (data as u64, hole.min(size))
        };
        let mut p = start;
        while p < end {
            let n = ((end - p) as usize).min(buf.len());
            src.read_exact_at(&mut buf[..n], p)?;
            dst.write_all_at(&buf[..n], p)?;
            p += n as u64;
        }
        pos = end;
    }
    dst.set_len(size)
}

/// What a change does to a missing object: a write creates it, a zero leaves it missing.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Change {
    Create,
    Modify,
}

impl Inner {
    fn version_path(&self, objno: u64, hi: u64, whiteout: bool) -> PathBuf {
        self.pool_dir
            .join(version_name(&self.object_prefix, objno, hi, whiteout))
    }

    fn newest_snap(&self) -> Option<u64> {
        lock(&self.header).snapshots.iter().map(|s| s.id).max()
    }

    /// The `hi` of object `objno`'s newest version (data or whiteout), if it has one.
    fn newest_version(&self, objno: u64) -> Result<Option<u64>> {
        for t in self.current_probe_ids()?.into_iter().rev() {
            if exists(&self.version_path(objno, t, false))?
                || exists(&self.version_path(objno, t, true))?
            {
                return Ok(Some(t));
            }
        }
        Ok(None)
    }

    /// The snapshots (oldest first) a deep copy-up of object `objno`, whose head does not
    /// exist, gives the parent's data: those after its newest version (RADOS's: the
    /// copy-up creates the object under an empty snapshot context, and the write on top
    /// clones it for the snapshots newer than the object's snapset seq), and large
    /// enough to hold the object. None when the data is all zeros (librbd copies
    /// nothing up then) or there is no snapshot.
    pub(super) fn deep_copyup_snaps(&self, objno: u64, parent_data: &[u8]) -> Result<Vec<u64>> {
        if parent_data.iter().all(|&b| b == 0) || !self.has_snaps.load(Ordering::Acquire) {
            return Ok(Vec::new());
        }
        let after = self.newest_version(objno)?.unwrap_or(0);
        Ok(self.snaps_holding(objno, after))
    }

    /// The snapshots newer than `after` large enough to hold object `objno`, oldest first.
    pub(super) fn snaps_holding(&self, objno: u64, after: u64) -> Vec<u64> {
        let h = lock(&self.header);
        let start = objno.saturating_mul(1u64 << h.order);
        let mut snaps: Vec<u64> = h
            .snapshots
            .iter()
            .filter(|s| s.id > after && s.size > start)
            .map(|s| s.id)
            .collect();
        snaps.sort_unstable();
        snaps
    }

    /// A deep copy-up's first step: `parent_data` linked, durably, as object `objno`'s
    /// version at the newest snapshot, so it covers the snapshots after its newest
    /// version (see `deep_copyup_snaps`), before the head is created. Nothing when
    /// there is no such snapshot or the version exists already.
    pub(super) fn link_snapshot_version(&self, objno: u64, parent_data: &[u8]) -> Result<bool> {
        let Some(newest) = self.newest_snap() else {
            return Ok(false);
        };
        if self.newest_version(objno)? == Some(newest) {
            return Ok(false);
        }
        let (tmp, _f) = self.build_object(objno, parent_data, &crate::store::ObjectWrite::None)?;
        let v = self.version_path(objno, newest, false);
        let linked = std::fs::hard_link(&tmp, &v);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(false),
            Err(e) => return Err(Error::io(format!("linking {} into place", v.display()), e)),
        }
        // Durable before the head appears: a head without it would cover the snapshots.
        self.sync_dir_now()?;
        Ok(true)
    }

    pub(super) fn snap_record(&self, id: u64) -> Result<SnapRecord> {
        lock(&self.header)
            .snapshots
            .iter()
            .find(|s| s.id == id)
            .cloned()
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::NotFound,
                    format!("snapshot id {id} of image {} not found", self.id),
                )
            })
    }

    /// Re-reads the header file.
    pub(super) fn reload_header(&self) -> Result<()> {
        use std::io::Read;
        let what = |e| Error::io(format!("reading {}", self.header_path.display()), e);
        let mut f = File::open(&self.header_path).map_err(what)?;
        let mut b = Vec::new();
        f.read_to_end(&mut b).map_err(what)?;
        let h = parse_header(&self.header_path, &self.id, &b)?;
        self.has_snaps
            .store(!h.snapshots.is_empty(), Ordering::Release);
        *lock(&self.header) = h;
        *lock(&self.header_file) = Some(f);
        self.refresh_parent_info();
        Ok(())
    }

    /// The ids under which versions may be filed, ascending. A read-only handle first
    /// re-reads the header if the writer replaced it since (a new snapshot: its
    /// copy-on-write versions are filed under an id this handle did not know).
    fn current_probe_ids(&self) -> Result<Vec<u64>> {
        if self.read_only {
            let replaced = lock(&self.header_file)
                .as_ref()
                .is_none_or(|f| f.metadata().map_or(true, |m| m.nlink() == 0));
            if replaced {
                self.reload_header()?;
            }
        }
        let h = lock(&self.header);
        let mut ids: Vec<u64> = h.snapshots.iter().map(|s| s.id).collect();
        ids.extend(&h.removing);
        ids.sort_unstable();
        ids.dedup();
        Ok(ids)
    }

    /// Reads object `objno` as it was at snapshot `snap`.
    pub(super) fn read_snap(
        &self,
        objno: u64,
        off: u64,
        len: u64,
        snap: u64,
    ) -> Result<Option<Bytes>> {
        let read = |f: &File, p: &Path| {
            read_into(f, off, len as usize, 0)
                .map(Some)
                .map_err(|e| Error::io(format!("reading {}", p.display()), e))
        };
        // The head is opened before looking for versions: if a copy-on-write moved
        // it aside in between, the version is found below; if not, this descriptor is
        // the inode that covers `snap`, which copy-on-write never writes again.
        let head_path = self.object_path(objno);
        let head = open_opt(&head_path)?;
        // A snapshot removed (by the writer, while this handle serves it): its versions
        // go or move on, and what the probe would find is a later state, the head's at
        // worst. Never that: an error, looked for before the probe and, since a removal
        // may run meanwhile, again after it (the header is re-read once replaced).
        let gone = |this: &Self| -> Result<()> {
            if lock(&this.header).snapshots.iter().any(|s| s.id == snap) {
                return Ok(());
            }
            Err(Error::new(
                ErrorKind::NotFound,
                format!(
                    "snapshot id {snap} of image {} no longer exists (removed while read)",
                    this.id
                ),
            ))
        };
        let ids = self.current_probe_ids()?;
        gone(self)?;
        let probe = || {
            for &t in ids.iter().filter(|&&t| t >= snap) {
                let p = self.version_path(objno, t, false);
                if let Some(f) = open_opt(&p)? {
                    return read(&f, &p);
                }
                if exists(&self.version_path(objno, t, true))? {
                    return Ok(None);
                }
            }
            match &head {
                Some(f) => read(f, &head_path),
                None => Ok(None),
            }
        };
        let r = probe()?;
        if self.read_only {
            self.current_probe_ids()?;
            gone(self)?;
        }
        Ok(r)
    }

    /// The objects that exist at `snap` (None: the head) with the state librbd gives
    /// them in a rebuilt map.
    pub(super) fn object_states(&self, snap: Option<u64>) -> Result<Vec<(u64, ObjectState)>> {
        let (mut image_snaps, fast_diff) = {
            let h = lock(&self.header);
            let s: Vec<u64> = h.snapshots.iter().map(|s| s.id).collect();
            (s, h.features & RBD_FEATURE_FAST_DIFF != 0)
        };
        image_snaps.sort_unstable();
        let at = snap.unwrap_or(SNAP_HEAD);
        let mut out = Vec::new();
        for (objno, v) in scan(&self.pool_dir, &self.object_prefix)? {
            let st = object_state(&snap_set(&v, &image_snaps), at, &image_snaps, fast_diff);
            if st != ObjectState::Nonexistent {
                out.push((objno, st));
            }
        }
        Ok(out)
    }

    /// The snap sets of objects `objs` as [`snap_set`], with each version's size (its
    /// file's) and its overlap with the next newer version: where the two files hold the
    /// same bytes (RADOS tracks what was written instead; a rewrite with the same bytes
    /// counts as unchanged here), nothing across a removal (a whiteout between them).
    /// `None` for an object with no file at all.
    pub(super) fn snap_sets(&self, objs: &[u64]) -> Result<Vec<(u64, Option<SnapSet>)>> {
        let mut image_snaps: Vec<u64> = lock(&self.header).snapshots.iter().map(|s| s.id).collect();
        image_snaps.sort_unstable();
        let mut all = scan(&self.pool_dir, &self.object_prefix)?;
        let mut out = Vec::with_capacity(objs.len());
        for &objno in objs {
            let Some(v) = all.remove(&objno) else {
                out.push((objno, None));
                continue;
            };
            let mut set = snap_set(&v, &image_snaps);
            // The files in the order of `set.clones` (one per data version, then the
            // head), and whether a removal lies between each and the next.
            let mut files = Vec::new();
            let mut removed_after = Vec::new();
            for (k, &(hi, data)) in v.kept.iter().enumerate() {
                if data {
                    files.push(self.version_path(objno, hi, false));
                    removed_after.push(v.kept.get(k + 1).is_some_and(|&(_, d)| !d));
                }
            }
            if v.head {
                files.push(self.object_path(objno));
                removed_after.push(false);
            }
            let opened: Vec<Option<File>> =
                files.iter().map(|p| open_opt(p)).collect::<Result<_>>()?;
            for (k, c) in set.clones.iter_mut().enumerate() {
                let Some(Some(f)) = opened.get(k) else {
                    continue;
                };
                let md = f
                    .metadata()
                    .map_err(|e| Error::io(format!("reading {}", files[k].display()), e))?;
                c.size = md.len();
                if removed_after[k] {
                    continue;
                }
                if let Some(Some(next)) = opened.get(k + 1) {
                    c.overlap = same_ranges(f, next)
                        .map_err(|e| Error::io(format!("comparing {}", files[k].display()), e))?;
                }
            }
            out.push((objno, Some(set)));
        }
        Ok(out)
    }

    /// Before object `objno`'s head changes: preserves it for the newest snapshot if
    /// it has not been yet (see the module comment). Nothing at all without snapshots.
    pub(super) fn prepare_change(&self, objno: u64, change: Change) -> Result<()> {
        if !self.has_snaps.load(Ordering::Acquire) || lock(&self.cow_clean).contains(&objno) {
            return Ok(());
        }
        let _one = lock(&self.cow_lock);
        if lock(&self.cow_clean).contains(&objno) {
            return Ok(());
        }
        let Some(newest) = self.newest_snap() else {
            return Ok(());
        };
        let head = self.object_path(objno);
        let meta = match std::fs::symlink_metadata(&head) {
            Ok(m) => Some(m),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(Error::io(format!("looking up {}", head.display()), e)),
        };
        let kept = exists(&self.version_path(objno, newest, false))?
            || exists(&self.version_path(objno, newest, true))?;
        match meta {
            // Not kept for the newest snapshot: link the head as its version, then copy.
            // The head may still share its inode with an older version (a copy-on-write
            // interrupted between link and rename, then a snapshot taken): that version
            // covers only the snapshots up to it, so the newest needs its own link.
            Some(_) if !kept => self.copy_on_write(objno, Some(newest))?,
            // A copy-on-write for the newest snapshot interrupted between link and
            // rename: the head is still the version's inode. Copy again, without a link.
            Some(m) if m.nlink() > 1 => self.copy_on_write(objno, None)?,
            Some(_) => {}
            None if kept => {}
            None if change == Change::Modify => return Ok(()),
            None => {
                // Created after the newest snapshot: a whiteout says it was absent
                // then, durably before the head appears.
                let w = self.version_path(objno, newest, true);
                OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(&w)
                    .map_err(|e| Error::io(format!("creating {}", w.display()), e))?;
                self.sync_dir_now()?;
            }
        }
        lock(&self.cow_clean).insert(objno);
        Ok(())
    }

    /// Replaces the head by a copy of itself, first linking the old inode as the
    /// version of snapshot `link_as` (None: it already is one).
    fn copy_on_write(&self, objno: u64, link_as: Option<u64>) -> Result<()> {
        let head = self.object_path(objno);
        let tmp = self
            .pool_dir
            .join(format!(".{}.{objno:016x}.cow.tmp", self.object_prefix));
        let what =
            |e: std::io::Error| Error::io(format!("copying {} for a snapshot", head.display()), e);
        let _ = std::fs::remove_file(&tmp);
        let res = (|| {
            let src = File::open(&head)?;
            let dst = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&tmp)?;
            copy_file(&src, &dst)?;
            dst.sync_all()?;
            if let Some(hi) = link_as {
                std::fs::hard_link(&head, self.version_path(objno, hi, false))?;
            }
            // The old inode leaves our descriptor cache before the head is renamed
            // over: no later write may reach the version.
            let mut fds = lock(&self.fds);
            fds.remove(&objno);
            std::fs::rename(&tmp, &head)?;
            drop(fds);
            fsync_dir(&self.pool_dir)
        })();
        if res.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        res.map_err(what)
    }

    pub(super) fn sync_dir_now(&self) -> Result<()> {
        fsync_dir(&self.pool_dir)
            .map_err(|e| Error::io(format!("syncing {}", self.pool_dir.display()), e))
    }

    /// A removal with snapshots: the head becomes the newest snapshot's version when
    /// it is not preserved yet. `Ok(false)`: nothing to keep, remove as usual.
    pub(super) fn remove_kept(&self, objno: u64) -> Result<bool> {
        if !self.has_snaps.load(Ordering::Acquire) || lock(&self.cow_clean).contains(&objno) {
            return Ok(false);
        }
        let _one = lock(&self.cow_lock);
        let Some(newest) = self.newest_snap() else {
            return Ok(false);
        };
        let head = self.object_path(objno);
        match std::fs::symlink_metadata(&head) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(Error::io(format!("looking up {}", head.display()), e)),
        };
        let kept = exists(&self.version_path(objno, newest, false))?
            || exists(&self.version_path(objno, newest, true))?;
        // Kept already: remove as usual. A head that shares its inode with an older
        // version (an interrupted copy-on-write) is not kept for the newest snapshot:
        // the rename below gives it that name too.
        if kept {
            return Ok(false);
        }
        let v = self.version_path(objno, newest, false);
        {
            let mut fds = lock(&self.fds);
            fds.remove(&objno);
            std::fs::rename(&head, &v)
                .map_err(|e| Error::io(format!("keeping {} for a snapshot", head.display()), e))?;
        }
        lock(&self.dirty).remove(&objno);
        self.sync_dir_now()?;
        lock(&self.cow_clean).insert(objno);
        Ok(true)
    }

    /// Cuts object `objno` to `len` bytes (a missing object stays missing).
    pub(super) fn truncate(&self, objno: u64, len: u64, durable: bool) -> Result<()> {
        self.prepare_change(objno, Change::Modify)?;
        let head = self.object_path(objno);
        let Some(f) = (match OpenOptions::new().write(true).open(&head) {
            Ok(f) => Some(f),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(Error::io(format!("opening {}", head.display()), e)),
        }) else {
            return Ok(());
        };
        let what = |e| Error::io(format!("truncating {}", head.display()), e);
        let r = f.set_len(len).map_err(what);
        // After the change, as every change marks its object (`Inner::written`).
        lock(&self.dirty).insert(objno);
        r?;
        if durable {
            self.sync_file(&f).map_err(what)?;
            self.sync_dir_if_changed(false)?;
        }
        Ok(())
    }

    /// Renames or deletes the versions filed under removed snapshots (the header's
    /// `removing`), keeping the invariant that every version is filed under an existing
    /// snapshot: a version still covering some snapshot moves to the newest one it
    /// covers; one covering none is deleted. Then clears `removing`.
    pub(super) fn finish_snap_removals(&self) -> Result<()> {
        let (removing, mut snaps) = {
            let h = lock(&self.header);
            let s: Vec<u64> = h.snapshots.iter().map(|s| s.id).collect();
            (h.removing.clone(), s)
        };
        if removing.is_empty() {
            return Ok(());
        }
        snaps.sort_unstable();
        for (objno, v) in scan(&self.pool_dir, &self.object_prefix)? {
            let mut prev = 0;
            for (hi, data) in v.kept {
                if !removing.contains(&hi) {
                    prev = hi;
                    continue;
                }
                let from = self.version_path(objno, hi, !data);
                let to = snaps.iter().rev().find(|&&s| s > prev && s < hi).copied();
                let res = match to {
                    Some(t) => {
                        prev = t;
                        std::fs::rename(&from, self.version_path(objno, t, !data))
                    }
                    None => std::fs::remove_file(&from),
                };
                res.map_err(|e| Error::io(format!("trimming {}", from.display()), e))?;
            }
        }
        self.sync_dir_now()?;
        self.update_header(|h| {
            h.removing.retain(|r| !removing.contains(r));
            Ok(())
        })?;
        lock(&self.cow_clean).clear();
        Ok(())
    }

    fn check_name(&self, name: &str) -> Result<()> {
        if name.is_empty() || name.contains(['/', '@']) || name.len() > 255 {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("bad snapshot name {name:?}"),
            ));
        }
        if lock(&self.header).snapshots.iter().any(|s| s.name == name) {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                format!("snapshot {name} of image {} already exists", self.id),
            ));
        }
        Ok(())
    }

    /// Snapshots are made and removed by the exclusive lock holder only: a shared
    /// writer elsewhere would go on writing with the snapshots it knew when it opened
    /// (no copy-on-write for a new one).
    fn check_exclusive(&self, what: &str) -> Result<()> {
        self.check_writable()?;
        if !self.exclusive {
            return Err(Error::new(
                ErrorKind::Busy,
                format!(
                    "{what} of image {}: needs the exclusive lock, not a shared writer",
                    self.id
                ),
            ));
        }
        Ok(())
    }

    pub(super) fn snap_create(&self, name: &str) -> Result<u64> {
        self.check_exclusive(&format!("creating snapshot {name}"))?;
        self.check_name(name)?;
        self.finish_snap_removals()?;
        // Every write acknowledged before the snapshot is in it, also after a crash.
        self.sync()?;
        let timestamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .ok();
        let mut id = 0;
        self.update_header(|h| {
            id = h.snap_seq + 1;
            h.snap_seq = id;
            h.snapshots.insert(
                0,
                SnapRecord {
                    id,
                    name: name.to_string(),
                    size: h.size,
                    protected: false,
                    timestamp,
                    flags: h.flags,
                    parent: h.parent.clone(),
                },
            );
            Ok(())
        })?;
        lock(&self.cow_clean).clear();
        Ok(id)
    }

    /// Refuses when clones of snapshot `id` exist (they read from it).
    pub(super) fn check_no_clones(&self, id: u64) -> Result<()> {
        let n = lock(&self.header)
            .children
            .iter()
            .filter(|c| c.snap_id == id)
            .count();
        if n > 0 {
            let name = self.snap_record(id)?.name;
            return Err(Error::new(
                ErrorKind::Busy,
                format!(
                    "snapshot {name} of image {} has {n} clone(s); flatten or remove them first",
                    self.id
                ),
            ));
        }
        Ok(())
    }

    pub(super) fn snap_remove(&self, id: u64) -> Result<()> {
        self.check_exclusive(&format!("removing snapshot {id}"))?;
        let rec = self.snap_record(id)?;
        let name = &rec.name;
        if rec.protected {
            return Err(Error::new(
                ErrorKind::Busy,
                format!(
                    "snapshot {name} of image {} is protected; unprotect it first",
                    self.id
                ),
            ));
        }
        let image = self.id.clone();
        self.update_header(|h| {
            let n = h.children.iter().filter(|c| c.snap_id == id).count();
            if n > 0 {
                return Err(Error::new(
                    ErrorKind::Busy,
                    format!(
                        "snapshot {name} of image {image} has {n} clone(s); flatten or remove them first"
                    ),
                ));
            }
            h.snapshots.retain(|s| s.id != id);
            h.removing.push(id);
            Ok(())
        })?;
        let map = self.pool_dir.join(self.object_map_name(Some(id)));
        match std::fs::remove_file(&map) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(format!("removing {}", map.display()), e)),
        }
        self.finish_snap_removals()?;
        // The last snapshot of a flattened clone that still read through the parent.
        match rec.parent {
            Some(p) => self.drop_parent_link_if_unused(&p),
            None => Ok(()),
        }
    }

    pub(super) fn snap_rename(&self, id: u64, new_name: &str) -> Result<()> {
        self.check_writable()?;
        self.snap_record(id)?;
        self.check_name(new_name)?;
        self.update_header(|h| {
            for s in h.snapshots.iter_mut().filter(|s| s.id == id) {
                s.name = new_name.to_string();
            }
            Ok(())
        })
    }

    pub(super) fn snap_set_protected(&self, id: u64, protected: bool) -> Result<()> {
        self.check_writable()?;
        let name = self.snap_record(id)?.name;
        let image = self.id.clone();
        self.update_header(|h| {
            let n = h.children.iter().filter(|c| c.snap_id == id).count();
            if !protected && n > 0 {
                return Err(Error::new(
                    ErrorKind::Busy,
                    format!(
                        "snapshot {name} of image {image} has {n} clone(s); cannot unprotect it"
                    ),
                ));
            }
            for s in h.snapshots.iter_mut().filter(|s| s.id == id) {
                s.protected = protected;
            }
            Ok(())
        })
    }

    /// A fresh temporary file for building object `objno` (copy-up).
    pub(super) fn build_object(
        &self,
        objno: u64,
        parent_data: &[u8],
        op: &crate::store::ObjectWrite,
    ) -> Result<(PathBuf, File)> {
        use crate::store::ObjectWrite;
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let tmp = self.pool_dir.join(format!(
            ".{}.{objno:016x}.copyup.{}.{}",
            self.object_prefix,
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let res = (|| {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&tmp)?;
            write_in_pieces(&f, parent_data, 0)?;
            match op {
                ObjectWrite::None => {}
                ObjectWrite::Write { off, data } => write_in_pieces(&f, data, *off)?,
                ObjectWrite::Zero { off, len } => {
                    let size = f.metadata()?.len();
                    if let Err(e) = punch_hole(&f, *off, *len) {
                        if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
                            return Err(e);
                        }
                        let end = (off + len).min(size);
                        if end > *off {
                            write_in_pieces(&f, &vec![0u8; (end - off) as usize], *off)?;
                        }
                    }
                }
                ObjectWrite::Truncate { len } => f.set_len(*len)?,
            }
            // Always durable before it is linked in: a copy-up whose parent data a
            // crash lost would hide the parent's bytes behind holes.
            f.sync_data()?;
            Ok(f)
        })();
        match res {
            Ok(f) => Ok((tmp, f)),
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(Error::io(
                    format!(
                        "building {} for a copy-up",
                        self.object_path(objno).display()
                    ),
                    e,
                ))
            }
        }
    }
}

/// For tests: the file names of an object's versions.
#[cfg(test)]
pub(super) fn versions_of(pool_dir: &Path, prefix: &str, objno: u64) -> Vec<(u64, bool)> {
    scan(pool_dir, prefix)
        .unwrap()
        .remove(&objno)
        .map(|v| v.kept)
        .unwrap_or_default()
}
