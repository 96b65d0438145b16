//! The metadata files, JSON so that a human (or a test) can read them: an image's header,
//! the `rbd_id.<name>` files and the pool's image directory; and `write_atomic`, which
//! replaces them and the object maps: temporary file, fsync, rename, directory fsync.

use crate::error::{Error, ErrorKind, Result};
use crate::store::{ImageHeader, ParentInfo, SnapInfo};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::Path;

pub const MIN_ORDER: u8 = 12;
pub const MAX_ORDER: u8 = 25;

const DIRECTORY: &str = "rbd_directory";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(super) struct SnapRecord {
    pub(super) id: u64,
    pub(super) name: String,
    pub(super) size: u64,
    #[serde(default)]
    pub(super) protected: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) timestamp: Option<u64>,
    /// The head's flags when it was taken (its OBJECT_MAP_INVALID says whether the
    /// snapshot's map is trusted), as librbd copies them.
    #[serde(default)]
    pub(super) flags: u64,
    /// The parent the image had when the snapshot was taken (a clone's snapshot reads
    /// through it even after a flatten of the head).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) parent: Option<ParentRecord>,
}

/// A clone's link to its parent, by ids as cls_rbd keeps it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(super) struct ParentRecord {
    pub(super) pool: String,
    #[serde(default)]
    pub(super) namespace: String,
    pub(super) image_id: String,
    pub(super) snap_id: u64,
    pub(super) overlap: u64,
}

/// A parent's record of one clone of one of its snapshots (what `children` lists and
/// what keeps the snapshot from being removed or unprotected).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(super) struct ChildRecord {
    pub(super) snap_id: u64,
    pub(super) pool: String,
    pub(super) image_id: String,
}

/// The on-disk header. JSON so that a human (or a test) can read it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(super) struct HeaderFile {
    pub(super) format: u32,
    pub(super) id: String,
    pub(super) size: u64,
    pub(super) order: u8,
    pub(super) object_prefix: String,
    pub(super) features: u64,
    pub(super) flags: u64,
    pub(super) snap_seq: u64,
    #[serde(default)]
    pub(super) snapshots: Vec<SnapRecord>,
    #[serde(default)]
    pub(super) metadata: BTreeMap<String, String>,
    /// `Some` for a clone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) parent: Option<ParentRecord>,
    /// Clones of this image's snapshots. Written by other images' `clone`/`flatten`/
    /// removal under the pool lock, so `Inner::update_header` takes it from the file,
    /// never from its own copy.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(super) children: Vec<ChildRecord>,
    /// Snapshots removed from `snapshots` whose object versions are not yet renamed or
    /// deleted (see `snap::Inner::finish_snap_removals`): readers still look under these
    /// ids, so a crash in the middle of a removal loses no version.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(super) removing: Vec<u64>,
}

impl HeaderFile {
    /// The parent link of the head (`snap` None) or of snapshot `snap` (the one it had
    /// when taken).
    pub(super) fn parent_at(&self, snap: Option<u64>) -> Option<ParentRecord> {
        match snap {
            None => self.parent.clone(),
            Some(s) => self
                .snapshots
                .iter()
                .find(|r| r.id == s)
                .and_then(|r| r.parent.clone()),
        }
    }

    /// `parent`: the resolved parent (names), which only the caller can look up.
    /// The header as a handle opened at `snap` sees it: the snapshot's size and flags
    /// there (as cls_rbd's get_size and get_flags answer for a snapshot, and the Ceph
    /// store's handles have them), the head's otherwise. `parent` is the one at `snap`.
    pub(super) fn to_header(&self, snap: Option<u64>, parent: Option<ParentInfo>) -> ImageHeader {
        let at = snap.and_then(|id| self.snapshots.iter().find(|s| s.id == id));
        ImageHeader {
            id: self.id.clone(),
            size: at.map_or(self.size, |s| s.size),
            order: self.order,
            object_prefix: self.object_prefix.clone(),
            features: self.features,
            flags: at.map_or(self.flags, |s| s.flags),
            snap_seq: self.snap_seq,
            snaps: self
                .snapshots
                .iter()
                .map(|s| SnapInfo {
                    id: s.id,
                    name: s.name.clone(),
                    size: s.size,
                    protected: s.protected,
                    timestamp: s.timestamp,
                    namespace: Default::default(),
                })
                .collect(),
            parent,
        }
    }
}

pub(super) fn parse_header(path: &Path, id: &str, bytes: &[u8]) -> Result<HeaderFile> {
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
pub(super) fn read_image_id(pool_dir: &Path, name: &str) -> Result<Option<String>> {
    let id_path = pool_dir.join(format!("rbd_id.{name}"));
    let Some(b) = read_file_opt(&id_path)? else {
        return Ok(None);
    };
    checked_id(String::from_utf8_lossy(&b).trim().to_string(), &id_path).map(Some)
}

/// `id`, read from `id_path` (or the directory entry beside it), when it is an id.
pub(super) fn checked_id(id: String, id_path: &Path) -> Result<String> {
    if !valid_id(&id) {
        return Err(Error::new(
            ErrorKind::Corrupt,
            format!("corrupt image id file {}", id_path.display()),
        ));
    }
    Ok(id)
}

fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.chars().all(|c| c.is_ascii_alphanumeric())
}

/// 12 hex digits like Ceph's image ids.
pub(super) fn random_id() -> Result<String> {
    let mut b = [0u8; 6];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(|e| Error::io("reading /dev/urandom", e))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

pub(super) fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Replaces `dir/name` atomically and durably.
pub(super) fn write_atomic(dir: &Path, name: &str, data: &[u8]) -> Result<()> {
    replace_file(dir, name, data)?
}

/// Replaces `dir/name` atomically, then makes the replacement durable. The outer error:
/// nothing changed. The inner one: the new content is in place (every reader sees it)
/// but may not survive a crash, because the directory fsync failed. A caller that keeps
/// a copy of the file in memory must take the new content in either case, or its next
/// change would be made from a copy that no longer matches the file.
pub(super) fn replace_file(dir: &Path, name: &str, data: &[u8]) -> Result<Result<()>> {
    let path = dir.join(name);
    let what = |e| Error::io(format!("writing {}", path.display()), e);
    let tmp = dir.join(tmp_name(name));
    let res = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(what(e));
    }
    Ok(fsync_dir(dir).map_err(what))
}

/// The temporary file `replace_file` writes `name` through: `.NAME.tmp.PID.N`, with NAME cut
/// to 200 bytes so that it fits where `name` fits (255 bytes: an image name of 248 bytes
/// has an id file of 255), and N numbering this process's files so that cut names stay apart.
fn tmp_name(name: &str) -> String {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut cut = name.len().min(200);
    while !name.is_char_boundary(cut) {
        cut -= 1;
    }
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!(".{}.tmp.{}.{n}", &name[..cut], std::process::id())
}

pub(super) fn read_file_opt(path: &Path) -> Result<Option<Vec<u8>>> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(format!("reading {}", path.display()), e)),
    }
}

pub(super) fn read_directory(pool_dir: &Path) -> Result<BTreeMap<String, String>> {
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

pub(super) fn write_directory(pool_dir: &Path, d: &BTreeMap<String, String>) -> Result<()> {
    let data = serde_json::to_vec_pretty(d)
        .map_err(|e| Error::new(ErrorKind::Io, format!("encoding image directory: {e}")))?;
    write_atomic(pool_dir, DIRECTORY, &data)
}
