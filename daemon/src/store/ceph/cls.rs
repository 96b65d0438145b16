//! Inputs and outputs of the Ceph object-class methods we call (cls_rbd, cls_lock) and of
//! librbd's header watch/notify messages, in Ceph's encoding: little-endian integers,
//! strings and buffers as u32 length + bytes, maps as u32 count + pairs, versioned structs
//! behind an `ENCODE_START(v, compat, len)` header (u8 v, u8 compat, u32 length).
//!
//! Sources (Ceph 16.2): src/cls/rbd/cls_rbd_client.cc and cls_rbd.cc (argument order of
//! each method), src/cls/lock/cls_lock_ops.h and cls_lock_types.h, src/librbd/
//! WatchNotifyTypes.cc, src/msg/msg_types.h (entity_name_t = u8 type + i64 num;
//! entity_addr_t, see [`entity_addr`]).

use crate::error::{Error, ErrorKind, Result};

/// `CEPH_NOSNAP`: "the head" in cls_rbd snapshot arguments.
pub const NOSNAP: u64 = u64::MAX - 1;

/// librbd's exclusive lock: name, tag, cookie prefix (src/librbd/ExclusiveLock.cc,
/// ManagedLock.cc, Utils: `RBD_LOCK_NAME`, `WATCHER_LOCK_TAG`, `"auto " + handle`).
pub const RBD_LOCK_NAME: &str = "rbd_lock";
pub const RBD_LOCK_TAG: &str = "internal";
/// Our tag for `rbd_lock` taken shared by writers of a `shared` image (not librbd's).
pub const SHARED_LOCK_TAG: &str = "rados-nbd shared";
pub const LOCK_EXCLUSIVE: u8 = 1;
pub const LOCK_SHARED: u8 = 2;
/// `CEPH_ENTITY_TYPE_CLIENT`
pub const ENTITY_TYPE_CLIENT: u8 = 0x08;

pub fn lock_cookie(watch_handle: u64) -> String {
    format!("auto {watch_handle}")
}

/// The watch handle in a librbd lock cookie (`auto <handle>`), if it is one.
pub fn parse_lock_cookie(cookie: &str) -> Option<u64> {
    cookie.strip_prefix("auto ")?.parse().ok()
}

// ---------------------------------------------------------------------------------------
// Encoder / decoder
// ---------------------------------------------------------------------------------------

#[derive(Default)]
pub struct Enc(pub Vec<u8>);

impl Enc {
    pub fn new() -> Self {
        Enc(Vec::new())
    }
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    pub fn bool(&mut self, v: bool) -> &mut Self {
        self.u8(v as u8)
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn i32(&mut self, v: i32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn i64(&mut self, v: i64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// A string or a bufferlist: u32 length + bytes. Inputs here are names and small
    /// values, far below 4 GiB.
    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.u32(v.len() as u32);
        self.0.extend_from_slice(v);
        self
    }
    pub fn str(&mut self, v: &str) -> &mut Self {
        self.bytes(v.as_bytes())
    }
    /// `ENCODE_START(v, compat)`: returns the position of the length to patch in `finish`.
    pub fn start(&mut self, v: u8, compat: u8) -> usize {
        self.u8(v).u8(compat);
        let at = self.0.len();
        self.u32(0);
        at
    }
    /// `ENCODE_FINISH`: the length counts the bytes after the length field.
    pub fn finish(&mut self, at: usize) -> &mut Self {
        let len = (self.0.len() - at - 4) as u32;
        self.0[at..at + 4].copy_from_slice(&len.to_le_bytes());
        self
    }
    pub fn done(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.0)
    }
}

/// Decoder over a reply; every error names what was being decoded and where.
pub struct Dec<'a> {
    buf: &'a [u8],
    pos: usize,
    what: &'a str,
}

impl<'a> Dec<'a> {
    pub fn new(buf: &'a [u8], what: &'a str) -> Self {
        Dec { buf, pos: 0, what }
    }
    pub fn bad(&self, msg: &str) -> Error {
        Error::new(
            ErrorKind::Corrupt,
            format!(
                "decoding {}: {msg} at byte {} of {}",
                self.what,
                self.pos,
                self.buf.len()
            ),
        )
    }
    pub fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| self.bad(&format!("truncated (need {n} more bytes)")))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N]> {
        let s = self.take(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
    pub fn u8(&mut self) -> Result<u8> {
        Ok(self.arr::<1>()?[0])
    }
    pub fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.arr()?))
    }
    pub fn i32(&mut self) -> Result<i32> {
        Ok(i32::from_le_bytes(self.arr()?))
    }
    pub fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.arr()?))
    }
    pub fn i64(&mut self) -> Result<i64> {
        Ok(i64::from_le_bytes(self.arr()?))
    }
    pub fn bytes(&mut self) -> Result<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    pub fn string(&mut self) -> Result<String> {
        let b = self.bytes()?;
        String::from_utf8(b.to_vec()).map_err(|_| self.bad("string is not UTF-8"))
    }
    /// `DECODE_START`: returns (struct_v, end position). Refuses a struct whose compat
    /// version is newer than what we understand.
    pub fn start(&mut self, understood: u8) -> Result<(u8, usize)> {
        let v = self.u8()?;
        let compat = self.u8()?;
        let len = self.u32()? as usize;
        if compat > understood {
            return Err(self.bad(&format!(
                "struct version {v} needs a decoder of version {compat}, we have {understood}"
            )));
        }
        let end = self
            .pos
            .checked_add(len)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| self.bad(&format!("struct length {len} runs past the end")))?;
        Ok((v, end))
    }
    /// `DECODE_FINISH`: skips fields newer than we know.
    pub fn finish(&mut self, end: usize) -> Result<()> {
        if self.pos > end {
            return Err(self.bad("struct longer than its length"));
        }
        self.pos = end;
        Ok(())
    }
    pub fn at_end(&self) -> bool {
        self.pos == self.buf.len()
    }
    /// Where the decoder is (for `since`).
    pub fn pos(&self) -> usize {
        self.pos
    }
    /// The bytes decoded since position `at`.
    pub fn since(&self, at: usize) -> &'a [u8] {
        &self.buf[at.min(self.pos)..self.pos]
    }
}

// ---------------------------------------------------------------------------------------
// cls_rbd
// ---------------------------------------------------------------------------------------

/// `create`: size, order, features, object_prefix, data_pool_id (-1 = none).
pub fn create_in(
    size: u64,
    order: u8,
    features: u64,
    object_prefix: &str,
    data_pool: i64,
) -> Vec<u8> {
    Enc::new()
        .u64(size)
        .u8(order)
        .u64(features)
        .str(object_prefix)
        .i64(data_pool)
        .done()
}

/// Methods that take just a snapshot id: get_size, get_flags, get_parent, snapshot_get,
/// get_snapshot_name.
pub fn snap_in(snap: u64) -> Vec<u8> {
    Enc::new().u64(snap).done()
}

/// `get_size` → (order, size).
pub fn get_size_out(b: &[u8]) -> Result<(u8, u64)> {
    let mut d = Dec::new(b, "rbd.get_size reply");
    Ok((d.u8()?, d.u64()?))
}

/// `get_features`: snap id, read_only.
pub fn get_features_in(snap: u64, read_only: bool) -> Vec<u8> {
    Enc::new().u64(snap).bool(read_only).done()
}

/// `get_features` → (features, incompatible features).
pub fn get_features_out(b: &[u8]) -> Result<(u64, u64)> {
    let mut d = Dec::new(b, "rbd.get_features reply");
    Ok((d.u64()?, d.u64()?))
}

pub fn string_out(b: &[u8], what: &str) -> Result<String> {
    Dec::new(b, what).string()
}

pub fn u64_out(b: &[u8], what: &str) -> Result<u64> {
    Dec::new(b, what).u64()
}

/// `set_flags`: flags, mask, snap id.
pub fn set_flags_in(flags: u64, mask: u64, snap: u64) -> Vec<u8> {
    Enc::new().u64(flags).u64(mask).u64(snap).done()
}

/// `get_snapcontext` → (seq, snap ids newest first).
pub fn get_snapcontext_out(b: &[u8]) -> Result<(u64, Vec<u64>)> {
    let mut d = Dec::new(b, "rbd.get_snapcontext reply");
    let seq = d.u64()?;
    let n = d.u32()?;
    let mut snaps = Vec::with_capacity(n.min(4096) as usize);
    for _ in 0..n {
        snaps.push(d.u64()?);
    }
    Ok((seq, snaps))
}

/// What `snapshot_get` returns that we use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub id: u64,
    pub name: String,
    pub size: u64,
    /// utime_t seconds.
    pub timestamp: u64,
    /// Clones (format 2) of this snapshot.
    pub child_count: u32,
    pub namespace: crate::store::SnapNamespace,
}

/// `snapshot_get` → cls::rbd::SnapshotInfo: ENCODE_START(1,1) { u64 id,
/// SnapshotNamespace (its own ENCODE_START block: skipped), string name, u64 image_size,
/// utime_t timestamp (u32 sec, u32 nsec), u32 child_count }.
pub fn snapshot_get_out(b: &[u8]) -> Result<SnapshotInfo> {
    let mut d = Dec::new(b, "rbd.snapshot_get reply");
    let (_, end) = d.start(1)?;
    let id = d.u64()?;
    // SnapshotNamespace: ENCODE_START(1,1) { u32 type, then the type's fields }; the
    // trash's begin with the original name (cls/rbd/cls_rbd_types.h).
    let (_, ns_end) = d.start(1)?;
    let namespace = match d.u32()? {
        0 => crate::store::SnapNamespace::User,
        1 => crate::store::SnapNamespace::Group {
            pool: d.i64()?,
            group_id: d.string()?,
            snap_id: d.string()?,
        },
        2 => crate::store::SnapNamespace::Trash {
            original: d.string()?,
            original_type: d.u32()?,
        },
        // MirrorSnapshotNamespace: u8 state, bool complete, set<string> peer uuids,
        // string primary mirror uuid, u64 primary snap id, u64 last copied object
        // number, then the snap seqs (skipped with the rest of the block).
        3 => crate::store::SnapNamespace::Mirror(crate::store::MirrorSnap {
            state: d.u8()?,
            complete: d.u8()? != 0,
            peer_uuids: {
                let n = d.u32()?;
                (0..n).map(|_| d.string()).collect::<Result<_>>()?
            },
            primary_mirror_uuid: d.string()?,
            primary_snap_id: d.u64()?,
            last_copied_object_number: d.u64()?,
        }),
        t => crate::store::SnapNamespace::Other(t),
    };
    d.finish(ns_end)?;
    let name = d.string()?;
    let size = d.u64()?;
    let timestamp = u64::from(d.u32()?);
    let _nsec = d.u32()?;
    let child_count = d.u32()?;
    d.finish(end)?;
    Ok(SnapshotInfo {
        id,
        name,
        size,
        timestamp,
        child_count,
        namespace,
    })
}

/// `snapshot_add`: name, snap id, SnapshotNamespace (ENCODE_START(1,1) { u32 type }, the
/// user namespace (type 0) having no fields), as `rbd snap create` sends it.
pub fn snapshot_add_in(id: u64, name: &str) -> Vec<u8> {
    let mut e = Enc::new();
    e.str(name).u64(id);
    let at = e.start(1, 1);
    e.u32(0);
    e.finish(at);
    e.done()
}

/// `snapshot_add` in another namespace: `namespace` is a whole encoded SnapshotNamespace
/// (as a client's SnapCreate request carries it).
pub fn snapshot_add_ns_in(id: u64, name: &str, namespace: &[u8]) -> Vec<u8> {
    let mut e = Enc::new();
    e.str(name).u64(id);
    e.0.extend_from_slice(namespace);
    e.done()
}

/// `snapshot_rename`: snap id, new name.
pub fn snapshot_rename_in(id: u64, new_name: &str) -> Vec<u8> {
    Enc::new().u64(id).str(new_name).done()
}

/// `RBD_PROTECTION_STATUS_*` (cls_rbd_types.h).
pub const PROTECTION_UNPROTECTED: u8 = 0;
pub const PROTECTION_UNPROTECTING: u8 = 1;
pub const PROTECTION_PROTECTED: u8 = 2;

/// `set_protection_status`: snap id, status (u8).
pub fn set_protection_status_in(id: u64, status: u8) -> Vec<u8> {
    Enc::new().u64(id).u8(status).done()
}

/// `get_protection_status` → status (u8).
pub fn protection_status_out(b: &[u8]) -> Result<u8> {
    Dec::new(b, "rbd.get_protection_status reply").u8()
}

/// `get_parent` (legacy form) → None when the image has no parent (pool id -1).
pub fn get_parent_out(b: &[u8]) -> Result<Option<(i64, String, u64, u64)>> {
    let mut d = Dec::new(b, "rbd.get_parent reply");
    let pool = d.i64()?;
    let image = d.string()?;
    let snap = d.u64()?;
    let overlap = d.u64()?;
    Ok((pool >= 0).then_some((pool, image, snap, overlap)))
}

/// cls::rbd::ParentImageSpec: where a clone's data comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentSpec {
    pub pool_id: i64,
    pub namespace: String,
    pub image_id: String,
    pub snap_id: u64,
}

/// ParentImageSpec: ENCODE_START(1,1) { i64 pool_id, string pool_namespace, string
/// image_id, u64 snap_id }.
fn parent_spec_enc(e: &mut Enc, p: &ParentSpec) {
    let at = e.start(1, 1);
    e.i64(p.pool_id)
        .str(&p.namespace)
        .str(&p.image_id)
        .u64(p.snap_id);
    e.finish(at);
}

/// `parent_get` (no input) → ParentImageSpec; None when the image has no parent (pool -1).
pub fn parent_get_out(b: &[u8]) -> Result<Option<ParentSpec>> {
    let mut d = Dec::new(b, "rbd.parent_get reply");
    let (_, end) = d.start(1)?;
    let p = ParentSpec {
        pool_id: d.i64()?,
        namespace: d.string()?,
        image_id: d.string()?,
        snap_id: d.u64()?,
    };
    d.finish(end)?;
    Ok((p.pool_id >= 0 && !p.image_id.is_empty()).then_some(p))
}

/// `parent_overlap_get` (u64 snap id) → std::optional<u64>: u8 present + u64. None: that
/// snapshot (or the head) has no parent, e.g. a flattened head whose snapshots still do.
pub fn parent_overlap_get_out(b: &[u8]) -> Result<Option<u64>> {
    let mut d = Dec::new(b, "rbd.parent_overlap_get reply");
    if d.u8()? == 0 {
        return Ok(None);
    }
    Ok(Some(d.u64()?))
}

/// `parent_attach`: ParentImageSpec, u64 overlap, bool reattach.
pub fn parent_attach_in(p: &ParentSpec, overlap: u64, reattach: bool) -> Vec<u8> {
    let mut e = Enc::new();
    parent_spec_enc(&mut e, p);
    e.u64(overlap).bool(reattach);
    e.done()
}

/// Legacy `set_parent`: i64 pool, string image id, u64 snap id, u64 overlap.
pub fn set_parent_in(p: &ParentSpec, overlap: u64) -> Vec<u8> {
    Enc::new()
        .i64(p.pool_id)
        .str(&p.image_id)
        .u64(p.snap_id)
        .u64(overlap)
        .done()
}

/// cls::rbd::ChildImageSpec: a clone as its parent records it (clone format 2).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ChildSpec {
    pub pool_id: i64,
    pub namespace: String,
    pub image_id: String,
}

/// `child_attach` / `child_detach` (on the parent's header): u64 snap id, ChildImageSpec
/// ENCODE_START(2,1) { i64 pool_id, string image_id, string pool_namespace }.
pub fn child_attach_in(snap: u64, c: &ChildSpec) -> Vec<u8> {
    let mut e = Enc::new();
    e.u64(snap);
    let at = e.start(2, 1);
    e.i64(c.pool_id).str(&c.image_id).str(&c.namespace);
    e.finish(at).done()
}

/// `children_list` (u64 snap id) → std::set<ChildImageSpec>.
pub fn children_list_out(b: &[u8]) -> Result<Vec<ChildSpec>> {
    let mut d = Dec::new(b, "rbd.children_list reply");
    let n = d.u32()?;
    let mut v = Vec::new();
    for _ in 0..n {
        let (sv, end) = d.start(2)?;
        let pool_id = d.i64()?;
        let image_id = d.string()?;
        let namespace = if sv >= 2 { d.string()? } else { String::new() };
        d.finish(end)?;
        v.push(ChildSpec {
            pool_id,
            namespace,
            image_id,
        });
    }
    Ok(v)
}

/// Legacy `add_child` / `remove_child` (on `rbd_children`): i64 parent pool, string parent
/// image id, u64 snap id, string child image id. Without the child: `get_children`.
pub fn v1_child_in(p: &ParentSpec, child_id: Option<&str>) -> Vec<u8> {
    let mut e = Enc::new();
    e.i64(p.pool_id).str(&p.image_id).u64(p.snap_id);
    if let Some(c) = child_id {
        e.str(c);
    }
    e.done()
}

/// `get_children` → std::set<string> (child image ids).
pub fn string_set_out(b: &[u8], what: &str) -> Result<Vec<String>> {
    let mut d = Dec::new(b, what);
    let n = d.u32()?;
    let mut v = Vec::new();
    for _ in 0..n {
        v.push(d.string()?);
    }
    Ok(v)
}

/// RBD_OPERATION_FEATURE_*: op features a clone format 2 sets in the headers.
pub const OP_FEATURE_CLONE_PARENT: u64 = 1 << 0;
pub const OP_FEATURE_CLONE_CHILD: u64 = 1 << 1;

/// `get_create_timestamp`, `get_access_timestamp`, `get_modify_timestamp` → a utime_t
/// (u32 seconds, u32 nanoseconds), in nanoseconds since the epoch.
pub fn utime_out(b: &[u8], what: &str) -> Result<u64> {
    let mut d = Dec::new(b, what);
    let (sec, nsec) = (d.u32()?, d.u32()?);
    Ok(u64::from(sec) * 1_000_000_000 + u64::from(nsec))
}

/// `op_features_set`: u64 op features, u64 mask.
pub fn op_features_set_in(value: u64, mask: u64) -> Vec<u8> {
    Enc::new().u64(value).u64(mask).done()
}

/// RBD_PROTECTION_STATUS_PROTECTED, as `get_protection_status` returns it (a u8).
pub const PROTECTION_STATUS_PROTECTED: u8 = 2;

/// `get_stripe_unit_count` → (stripe unit, stripe count).
pub fn stripe_out(b: &[u8]) -> Result<(u64, u64)> {
    let mut d = Dec::new(b, "rbd.get_stripe_unit_count reply");
    Ok((d.u64()?, d.u64()?))
}

/// `set_stripe_unit_count`: u64 stripe unit, u64 stripe count.
pub fn stripe_in(unit: u64, count: u64) -> Vec<u8> {
    Enc::new().u64(unit).u64(count).done()
}

/// `get_data_pool` → pool id (-1 = none).
pub fn data_pool_out(b: &[u8]) -> Result<i64> {
    Dec::new(b, "rbd.get_data_pool reply").i64()
}

/// `set_id` (on rbd_id.<name>), `metadata_get`, `metadata_remove`, `dir_get_id`: one string.
pub fn string_in(s: &str) -> Vec<u8> {
    Enc::new().str(s).done()
}

/// `dir_add_image` / `dir_remove_image`: name, id.
pub fn dir_image_in(name: &str, id: &str) -> Vec<u8> {
    Enc::new().str(name).str(id).done()
}

/// `dir_rename_image`: old name, new name, id (-ESTALE when the old name is not that id's).
pub fn dir_rename_image_in(src: &str, dest: &str, id: &str) -> Vec<u8> {
    Enc::new().str(src).str(dest).str(id).done()
}

/// `dir_list` and `metadata_list`: start after, max return.
pub fn list_in(start: &str, max: u64) -> Vec<u8> {
    Enc::new().str(start).u64(max).done()
}

/// `dir_list` → map<name, id>.
pub fn dir_list_out(b: &[u8]) -> Result<Vec<(String, String)>> {
    let mut d = Dec::new(b, "rbd.dir_list reply");
    let n = d.u32()?;
    let mut v = Vec::new();
    for _ in 0..n {
        v.push((d.string()?, d.string()?));
    }
    Ok(v)
}

/// `metadata_set`: map<string key, bufferlist value>.
pub fn metadata_set_in(pairs: &[(&str, &str)]) -> Vec<u8> {
    let mut e = Enc::new();
    e.u32(pairs.len() as u32);
    for (k, v) in pairs {
        e.str(k).str(v);
    }
    e.done()
}

/// `metadata_set` of one key to a value of any bytes.
pub fn metadata_set_one_in(key: &str, value: &[u8]) -> Vec<u8> {
    Enc::new().u32(1).str(key).bytes(value).done()
}

/// `metadata_list` → map<string, bufferlist>.
pub fn metadata_list_out(b: &[u8]) -> Result<Vec<(String, Vec<u8>)>> {
    let mut d = Dec::new(b, "rbd.metadata_list reply");
    let n = d.u32()?;
    let mut v = Vec::new();
    for _ in 0..n {
        v.push((d.string()?, d.bytes()?.to_vec()));
    }
    Ok(v)
}

/// cls_rbd's TrashImageSpec (the value of an `rbd_trash` entry, keyed `id_<image id>`):
/// ENCODE_START(2,1) { u8 source, string name, utime_t deletion_time, utime_t
/// deferment_end_time (each u32 sec, u32 nsec), v2: u8 state }.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrashSpec {
    pub source: u8,
    pub name: String,
    /// Seconds since the epoch (the nanoseconds are kept for a round trip).
    pub deletion: (u32, u32),
    pub deferment_end: (u32, u32),
    pub state: u8,
}

/// TRASH_IMAGE_SOURCE_REMOVING: put there by `rbd rm` on its way to removal.
pub const TRASH_SOURCE_REMOVING: u8 = 3;
/// TRASH_IMAGE_SOURCE_USER_PARENT: moved there by `rbd rm` with
/// `rbd_move_parent_to_trash_on_remove`, to go with its last clone.
pub const TRASH_SOURCE_USER_PARENT: u8 = 4;
/// TRASH_IMAGE_STATE_NORMAL / _MOVING / _REMOVING.
pub const TRASH_STATE_NORMAL: u8 = 0;
pub const TRASH_STATE_MOVING: u8 = 1;
pub const TRASH_STATE_REMOVING: u8 = 2;

/// `trash_add`: string id, TrashImageSpec.
pub fn trash_add_in(id: &str, t: &TrashSpec) -> Vec<u8> {
    let mut e = Enc::new();
    e.str(id);
    let at = e.start(2, 1);
    e.u8(t.source)
        .str(&t.name)
        .u32(t.deletion.0)
        .u32(t.deletion.1)
        .u32(t.deferment_end.0)
        .u32(t.deferment_end.1)
        .u8(t.state);
    e.finish(at).done()
}

/// `trash_get` → TrashImageSpec (a v1 entry has no state: NORMAL).
pub fn trash_get_out(b: &[u8]) -> Result<TrashSpec> {
    let mut d = Dec::new(b, "rbd.trash_get reply");
    let (v, end) = d.start(2)?;
    let source = d.u8()?;
    let name = d.string()?;
    let deletion = (d.u32()?, d.u32()?);
    let deferment_end = (d.u32()?, d.u32()?);
    let state = if v >= 2 { d.u8()? } else { TRASH_STATE_NORMAL };
    d.finish(end)?;
    Ok(TrashSpec {
        source,
        name,
        deletion,
        deferment_end,
        state,
    })
}

/// `group_snap_get_by_id` → cls::rbd::GroupSnapshot: ENCODE_START(1,1) { string id,
/// string name, ... }: the name.
pub fn group_snap_name_out(b: &[u8]) -> Result<String> {
    let mut d = Dec::new(b, "rbd.group_snap_get_by_id reply");
    let (_, end) = d.start(1)?;
    let _id = d.string()?;
    let name = d.string()?;
    if d.pos() > end {
        return Err(d.bad("struct longer than its length"));
    }
    Ok(name)
}

/// `trash_state_set`: string id, u8 state, u8 expected current state.
pub fn trash_state_set_in(id: &str, state: u8, expect: u8) -> Vec<u8> {
    Enc::new().str(id).u8(state).u8(expect).done()
}

/// `object_map_resize`: object count, default state.
pub fn object_map_resize_in(count: u64, default_state: u8) -> Vec<u8> {
    Enc::new().u64(count).u8(default_state).done()
}

/// `object_map_update`: start object, end object (exclusive), new state, and an
/// optional current state the update is limited to (a bool, then the u8 when set).
pub fn object_map_update_in(start: u64, end: u64, new_state: u8, current: Option<u8>) -> Vec<u8> {
    let mut e = Enc::new();
    e.u64(start).u64(end).u8(new_state);
    match current {
        Some(c) => e.u8(1).u8(c),
        None => e.u8(0),
    };
    e.done()
}

// ---------------------------------------------------------------------------------------
// cls_lock
// ---------------------------------------------------------------------------------------

/// `lock`: cls_lock_lock_op ENCODE_START(1,1) { name, u8 type, cookie, tag, description,
/// utime_t duration (u32 sec, u32 nsec), u8 flags }.
pub fn lock_in(name: &str, kind: u8, cookie: &str, tag: &str, description: &str) -> Vec<u8> {
    let mut e = Enc::new();
    let at = e.start(1, 1);
    e.str(name).u8(kind).str(cookie).str(tag).str(description);
    e.u32(0).u32(0); // no expiry, like librbd
    e.u8(0);
    e.finish(at).done()
}

/// `unlock`: ENCODE_START(1,1) { name, cookie }.
pub fn unlock_in(name: &str, cookie: &str) -> Vec<u8> {
    let mut e = Enc::new();
    let at = e.start(1, 1);
    e.str(name).str(cookie);
    e.finish(at).done()
}

/// `break_lock`: ENCODE_START(1,1) { name, entity_name_t locker, cookie }.
pub fn break_lock_in(name: &str, locker: &Locker) -> Vec<u8> {
    let mut e = Enc::new();
    let at = e.start(1, 1);
    e.str(name)
        .u8(locker.entity_type)
        .i64(locker.entity_num)
        .str(&locker.cookie);
    e.finish(at).done()
}

/// `get_info`: ENCODE_START(1,1) { name }.
pub fn get_info_in(name: &str) -> Vec<u8> {
    let mut e = Enc::new();
    let at = e.start(1, 1);
    e.str(name);
    e.finish(at).done()
}

/// `set_cookie`: ENCODE_START(1,1) { name, u8 type, cookie, tag, new_cookie }.
pub fn set_cookie_in(name: &str, kind: u8, cookie: &str, tag: &str, new_cookie: &str) -> Vec<u8> {
    let mut e = Enc::new();
    let at = e.start(1, 1);
    e.str(name).u8(kind).str(cookie).str(tag).str(new_cookie);
    e.finish(at).done()
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Locker {
    pub entity_type: u8,
    pub entity_num: i64,
    pub cookie: String,
    /// The locker's address as `ceph osd blocklist` takes and shows it (`ip:port/nonce`,
    /// librbd's `Locker::address`); None when the lock carries none.
    pub address: Option<String>,
}

impl std::fmt::Display for Locker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let t = if self.entity_type == ENTITY_TYPE_CLIENT {
            "client".to_string()
        } else {
            format!("entity-type-{}", self.entity_type)
        };
        write!(f, "{t}.{} (cookie {:?})", self.entity_num, self.cookie)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockInfo {
    pub lockers: Vec<Locker>,
    pub kind: u8,
    pub tag: String,
}

/// `get_info` → cls_lock_get_info_reply ENCODE_START(1,1) { map<locker_id_t,
/// locker_info_t>, u8 type, tag }; locker_id_t = ENCODE_START(1,1) { entity_name_t,
/// cookie }; locker_info_t = ENCODE_START(1,1) { utime_t expiration (u32 sec, u32 nsec),
/// entity_addr_t addr, description }.
pub fn get_info_out(b: &[u8]) -> Result<LockInfo> {
    let mut d = Dec::new(b, "lock.get_info reply");
    let (_, end) = d.start(1)?;
    let n = d.u32()?;
    let mut lockers = Vec::new();
    for _ in 0..n {
        let (_, id_end) = d.start(1)?;
        let entity_type = d.u8()?;
        let entity_num = d.i64()?;
        let cookie = d.string()?;
        d.finish(id_end)?;
        let (_, info_end) = d.start(1)?;
        d.u32()?;
        d.u32()?;
        let address = entity_addr(&mut d)?;
        d.string()?;
        d.finish(info_end)?;
        lockers.push(Locker {
            entity_type,
            entity_num,
            cookie,
            address,
        });
    }
    let kind = d.u8()?;
    let tag = d.string()?;
    d.finish(end)?;
    Ok(LockInfo { lockers, kind, tag })
}

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

/// Decodes an `entity_addr_t` (src/msg/msg_types.h) into librbd's `Locker::address` form,
/// `entity_addr_t::get_legacy_str()`: `ip:port/nonce` (`[ip6]:port/nonce`), no type prefix,
/// which is what `rados_blocklist_add` parses and `ceph osd blocklist ls` shows. None for
/// an empty address (AF_UNSPEC). Two encodings, picked by the first byte:
/// - 1: u8 marker, ENCODE_START(1,1) { u32 type, u32 nonce, u32 len, sockaddr (len bytes,
///   family little-endian, port and address in network order) } (MSG_ADDR2 peers);
/// - 0: legacy, u32 0 (marker included), u32 nonce, 128-byte sockaddr_storage with the
///   family in network order.
pub fn entity_addr(d: &mut Dec) -> Result<Option<String>> {
    let (nonce, family, sa) = match d.u8()? {
        1 => {
            let (_, end) = d.start(1)?;
            let _type = d.u32()?;
            let nonce = d.u32()?;
            let len = d.u32()? as usize;
            let sa = d.take(len)?;
            d.finish(end)?;
            if sa.len() < 2 {
                return Ok(None);
            }
            (nonce, u16::from_le_bytes([sa[0], sa[1]]), sa)
        }
        0 => {
            d.take(3)?;
            let nonce = d.u32()?;
            let sa = d.take(128)?;
            (nonce, u16::from_be_bytes([sa[0], sa[1]]), sa)
        }
        m => return Err(d.bad(&format!("entity_addr_t marker {m} (want 0 or 1)"))),
    };
    let port = |sa: &[u8]| u16::from_be_bytes([sa[2], sa[3]]);
    let ip = match family {
        AF_INET if sa.len() >= 8 => {
            let a: [u8; 4] = sa[4..8].try_into().unwrap_or_default();
            format!("{}:{}", std::net::Ipv4Addr::from(a), port(sa))
        }
        AF_INET6 if sa.len() >= 24 => {
            let a: [u8; 16] = sa[8..24].try_into().unwrap_or_default();
            format!("[{}]:{}", std::net::Ipv6Addr::from(a), port(sa))
        }
        0 => return Ok(None),
        f => return Err(d.bad(&format!("address family {f} is neither IPv4 nor IPv6"))),
    };
    Ok(Some(format!("{ip}/{nonce}")))
}

// ---------------------------------------------------------------------------------------
// librbd header watch/notify (src/librbd/WatchNotifyTypes.*)
// ---------------------------------------------------------------------------------------

pub const NOTIFY_OP_ACQUIRED_LOCK: u32 = 0;
pub const NOTIFY_OP_RELEASED_LOCK: u32 = 1;
pub const NOTIFY_OP_REQUEST_LOCK: u32 = 2;
pub const NOTIFY_OP_HEADER_UPDATE: u32 = 3;
pub const NOTIFY_OP_ASYNC_PROGRESS: u32 = 4;
pub const NOTIFY_OP_ASYNC_COMPLETE: u32 = 5;

pub const NOTIFY_OP_RESIZE: u32 = 7;
pub const NOTIFY_OP_SNAP_CREATE: u32 = 8;
pub const NOTIFY_OP_QUIESCE: u32 = 18;
pub const NOTIFY_OP_UNQUIESCE: u32 = 19;

/// librbd's SnapCreateFlag (src/librbd/Types.h), carried by a SnapCreate request.
pub const SNAP_CREATE_FLAG_SKIP_NOTIFY_QUIESCE: u64 = 1 << 1;
pub const SNAP_CREATE_FLAG_IGNORE_NOTIFY_QUIESCE_ERROR: u64 = 1 << 2;

/// librbd's id of an asynchronous maintenance request: the asking client (ClientId
/// { u64 gid, u64 handle }) and its request number. The owner echoes it in AsyncComplete.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AsyncRequestId {
    pub gid: u64,
    pub handle: u64,
    pub request_id: u64,
}

/// As the logs name a request: `client.GID/HANDLE#N`.
impl std::fmt::Display for AsyncRequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "client.{}/{}#{}", self.gid, self.handle, self.request_id)
    }
}

/// What `rbd resize` asks the lock owner to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResizeRequest {
    pub size: u64,
    pub id: AsyncRequestId,
    pub allow_shrink: bool,
}

/// A Resize NotifyMessage: ENCODE_START(7,1) { u32 7, u64 size, AsyncRequestId,
/// bool allow_shrink (from struct v4 on; older librbd always allowed shrinking) }.
pub fn resize_request(payload: &[u8]) -> Result<ResizeRequest> {
    let mut d = Dec::new(payload, "rbd resize request");
    let (v, end) = d.start(7)?;
    let op = d.u32()?;
    if op != NOTIFY_OP_RESIZE {
        return Err(d.bad(&format!("notify op {op} is not a resize")));
    }
    let size = d.u64()?;
    let id = AsyncRequestId {
        gid: d.u64()?,
        handle: d.u64()?,
        request_id: d.u64()?,
    };
    let allow_shrink = if v >= 4 { d.u8()? != 0 } else { true };
    d.finish(end)?;
    Ok(ResizeRequest {
        size,
        id,
        allow_shrink,
    })
}

/// A Resize NotifyMessage as librbd 16.2 sends it (tests: we only ever decode these).
#[cfg(test)]
pub fn resize_notify(size: u64, id: AsyncRequestId, allow_shrink: bool) -> Vec<u8> {
    let mut e = Enc::new();
    let at = e.start(7, 1);
    e.u32(NOTIFY_OP_RESIZE)
        .u64(size)
        .u64(id.gid)
        .u64(id.handle)
        .u64(id.request_id)
        .u8(u8::from(allow_shrink));
    e.finish(at).done()
}

/// Quiesce / Unquiesce NotifyMessage: ENCODE_START(7,1) { u32 18|19, AsyncRequestId }:
/// how the taker of a snapshot asks every watcher of the header to quiesce, then to
/// resume.
pub fn quiesce_notify(op: u32, id: AsyncRequestId) -> Vec<u8> {
    let mut e = Enc::new();
    let at = e.start(7, 1);
    e.u32(op).u64(id.gid).u64(id.handle).u64(id.request_id);
    e.finish(at).done()
}

/// The request id of a Quiesce or Unquiesce NotifyMessage.
pub fn quiesce_request(payload: &[u8]) -> Result<(u32, AsyncRequestId)> {
    let mut d = Dec::new(payload, "rbd quiesce notification");
    let (_, end) = d.start(7)?;
    let op = d.u32()?;
    if op != NOTIFY_OP_QUIESCE && op != NOTIFY_OP_UNQUIESCE {
        return Err(d.bad(&format!("notify op {op} is not a quiesce")));
    }
    let id = AsyncRequestId {
        gid: d.u64()?,
        handle: d.u64()?,
        request_id: d.u64()?,
    };
    d.finish(end)?;
    Ok((op, id))
}

/// The result in a ResponseMessage ack (ENCODE_START(1,1) { i32 }); an empty ack (a
/// watcher with nothing to say) is None.
pub fn response_result(ack: &[u8]) -> Result<Option<i32>> {
    if ack.is_empty() {
        return Ok(None);
    }
    let mut d = Dec::new(ack, "rbd notify response");
    let (_, end) = d.start(1)?;
    let r = d.i32()?;
    d.finish(end)?;
    Ok(Some(r))
}

/// AsyncComplete NotifyMessage: ENCODE_START(7,1) { u32 5, AsyncRequestId, i32 result }:
/// how the owner tells the asker its request is done.
pub fn async_complete_notify(id: AsyncRequestId, result: i32) -> Vec<u8> {
    let mut e = Enc::new();
    let at = e.start(7, 1);
    e.u32(NOTIFY_OP_ASYNC_COMPLETE)
        .u64(id.gid)
        .u64(id.handle)
        .u64(id.request_id)
        .i32(result);
    e.finish(at).done()
}

/// The op of a header notification. An empty payload is the legacy header update.
pub fn notify_op(payload: &[u8]) -> Result<u32> {
    if payload.is_empty() {
        return Ok(NOTIFY_OP_HEADER_UPDATE);
    }
    let mut d = Dec::new(payload, "rbd header notification");
    let _ = d.start(7)?;
    d.u32()
}

/// Ops addressed to the lock owner that expect a ResponseMessage (requests to release the
/// lock or to run a maintenance operation). Everything else is informational.
pub fn notify_wants_owner_reply(op: u32) -> bool {
    !matches!(
        op,
        NOTIFY_OP_ACQUIRED_LOCK
            | NOTIFY_OP_RELEASED_LOCK
            | NOTIFY_OP_HEADER_UPDATE
            | NOTIFY_OP_ASYNC_PROGRESS
            | NOTIFY_OP_ASYNC_COMPLETE
            | NOTIFY_OP_QUIESCE
            | NOTIFY_OP_UNQUIESCE
    )
}

/// ResponseMessage: ENCODE_START(1,1) { i32 result }.
pub fn response_message(result: i32) -> Vec<u8> {
    let mut e = Enc::new();
    let at = e.start(1, 1);
    e.i32(result);
    e.finish(at).done()
}

/// NotifyMessage for AcquiredLock / ReleasedLock: ENCODE_START(7,1) { u32 op,
/// ClientId { u64 gid, u64 handle } }.
pub fn lock_notify(op: u32, gid: u64, handle: u64) -> Vec<u8> {
    let mut e = Enc::new();
    let at = e.start(7, 1);
    e.u32(op).u64(gid).u64(handle);
    e.finish(at).done()
}

/// Who asks the lock owner for the lock (RequestLock): its ClientId and whether it asks
/// with `force` (librbd sets it when the asker will break the lock if refused, e.g.
/// `rbd mirror image promote --force`). The lock hand-over answers on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockRequest {
    pub gid: u64,
    pub handle: u64,
    pub force: bool,
}

/// A RequestLock NotifyMessage: ENCODE_START(7,1) { u32 2, ClientId { u64 gid, u64
/// handle } (from struct v2 on), bool force (from v3 on) }. A message without the force
/// byte (older senders, which still say v7) is read as not forced.
pub fn lock_request(payload: &[u8]) -> Result<LockRequest> {
    let mut d = Dec::new(payload, "rbd lock request");
    let (v, end) = d.start(7)?;
    let op = d.u32()?;
    if op != NOTIFY_OP_REQUEST_LOCK {
        return Err(d.bad(&format!("notify op {op} is not a lock request")));
    }
    let (gid, handle) = if v >= 2 { (d.u64()?, d.u64()?) } else { (0, 0) };
    let force = v >= 3 && d.pos < end && d.u8()? != 0;
    d.finish(end)?;
    Ok(LockRequest { gid, handle, force })
}

/// A RequestLock NotifyMessage as librbd 16.2 sends it: how we ask for the lock back.
pub fn lock_request_notify(gid: u64, handle: u64, force: bool) -> Vec<u8> {
    let mut e = Enc::new();
    let at = e.start(7, 1);
    e.u32(NOTIFY_OP_REQUEST_LOCK)
        .u64(gid)
        .u64(handle)
        .u8(force as u8);
    e.finish(at).done()
}

/// HeaderUpdate NotifyMessage: ENCODE_START(7,1) { u32 3 }.
pub fn header_update_notify() -> Vec<u8> {
    let mut e = Enc::new();
    let at = e.start(7, 1);
    e.u32(NOTIFY_OP_HEADER_UPDATE);
    e.finish(at).done()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(x: &str) -> Vec<u8> {
        let mut v = (x.len() as u32).to_le_bytes().to_vec();
        v.extend_from_slice(x.as_bytes());
        v
    }

    #[test]
    fn create_bytes() {
        // size 64 MiB, order 22, features 0x1d, prefix "rbd_data.abc", no data pool.
        let got = create_in(64 << 20, 22, 0x1d, "rbd_data.abc", -1);
        let mut want = vec![0, 0, 0, 4, 0, 0, 0, 0, 22, 0x1d, 0, 0, 0, 0, 0, 0, 0];
        want.extend(s("rbd_data.abc"));
        want.extend([0xff; 8]);
        assert_eq!(got, want);
    }

    #[test]
    fn snap_args() {
        assert_eq!(
            snap_in(NOSNAP),
            vec![0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]
        );
        assert_eq!(get_features_in(4, true), vec![4, 0, 0, 0, 0, 0, 0, 0, 1]);
        let f = set_flags_in(3, 1, NOSNAP);
        assert_eq!(&f[..8], &[3, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&f[8..16], &[1, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&f[16..], &[0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
    }

    #[test]
    fn size_and_features_replies() {
        let b = [22u8, 0, 0, 0, 0x40, 0, 0, 0, 0];
        assert_eq!(get_size_out(&b).unwrap(), (22, 1 << 30));
        assert!(get_size_out(&b[..5]).is_err());
        let mut f = 0x1du64.to_le_bytes().to_vec();
        f.extend(0x1u64.to_le_bytes());
        assert_eq!(get_features_out(&f).unwrap(), (0x1d, 1));
    }

    #[test]
    fn snapcontext_reply() {
        let mut b = 9u64.to_le_bytes().to_vec();
        b.extend(2u32.to_le_bytes());
        b.extend(9u64.to_le_bytes());
        b.extend(4u64.to_le_bytes());
        assert_eq!(get_snapcontext_out(&b).unwrap(), (9, vec![9, 4]));
        // Claims three snaps, holds two.
        b[8] = 3;
        assert!(get_snapcontext_out(&b).is_err());
    }

    /// A SnapshotInfo v1 reply of a 64 MiB snapshot with a zero timestamp, its namespace
    /// block holding `ns` (the type, then its fields).
    fn snapshot_info_reply(id: u64, ns: &[u8], name: &str, child_count: u32) -> Vec<u8> {
        let mut body = id.to_le_bytes().to_vec();
        body.extend([1, 1]);
        body.extend((ns.len() as u32).to_le_bytes());
        body.extend(ns);
        body.extend(s(name));
        body.extend((64u64 << 20).to_le_bytes());
        body.extend([0; 8]);
        body.extend(child_count.to_le_bytes());
        let mut b = vec![1, 1];
        b.extend((body.len() as u32).to_le_bytes());
        b.extend(body);
        b
    }

    #[test]
    fn snapshot_info_and_its_namespace() {
        // SnapshotInfo v1: id 4, user namespace {ENCODE_START(1,1) u32 type 0}, name "s1",
        // size 64 MiB, timestamp, child_count 0.
        let mut body = 4u64.to_le_bytes().to_vec();
        body.extend([1, 1, 4, 0, 0, 0, 0, 0, 0, 0]);
        body.extend(s("s1"));
        body.extend((64u64 << 20).to_le_bytes());
        body.extend(0x6000_0001u32.to_le_bytes());
        body.extend(0x11u32.to_le_bytes());
        body.extend(3u32.to_le_bytes());
        let mut b = vec![1, 1];
        b.extend((body.len() as u32).to_le_bytes());
        b.extend(body);
        let i = snapshot_get_out(&b).unwrap();
        assert_eq!(
            i,
            SnapshotInfo {
                id: 4,
                name: "s1".into(),
                size: 64 << 20,
                timestamp: 0x6000_0001,
                child_count: 3,
                namespace: crate::store::SnapNamespace::User,
            }
        );
        // A compat version newer than ours is refused rather than misread.
        let mut newer = b.clone();
        newer[1] = 2;
        assert!(snapshot_get_out(&newer).is_err());

        // In the trash (type 2): the original name, then its original namespace type
        // (u32), the UUID as the snapshot's name.
        let mut ns = 2u32.to_le_bytes().to_vec();
        ns.extend(s("s1"));
        ns.extend(0u32.to_le_bytes());
        let i = snapshot_get_out(&snapshot_info_reply(4, &ns, "0b9f6c2e-uuid", 1)).unwrap();
        assert_eq!(
            (i.name.as_str(), i.child_count, i.namespace),
            (
                "0b9f6c2e-uuid",
                1,
                crate::store::SnapNamespace::Trash {
                    original: "s1".into(),
                    original_type: 0,
                }
            )
        );

        // A non-primary mirror snapshot (type 3): u8 state 2, bool complete false, the
        // peer set, the primary's mirror uuid and snap id, the last copied object, then
        // snap_seqs (a map, skipped with the block).
        let mut ns = 3u32.to_le_bytes().to_vec();
        ns.extend([2, 0]);
        ns.extend(2u32.to_le_bytes());
        ns.extend(s("peer-a"));
        ns.extend(s("peer-b"));
        ns.extend(s("prim-uuid"));
        ns.extend(77u64.to_le_bytes());
        ns.extend(5u64.to_le_bytes());
        ns.extend(1u32.to_le_bytes());
        ns.extend(77u64.to_le_bytes());
        ns.extend(4u64.to_le_bytes());
        let i = snapshot_get_out(&snapshot_info_reply(9, &ns, ".mirror.non_primary.x", 0)).unwrap();
        assert_eq!(
            i.namespace,
            crate::store::SnapNamespace::Mirror(crate::store::MirrorSnap {
                state: 2,
                complete: false,
                peer_uuids: vec!["peer-a".into(), "peer-b".into()],
                primary_mirror_uuid: "prim-uuid".into(),
                primary_snap_id: 77,
                last_copied_object_number: 5,
            })
        );
    }

    #[test]
    fn snapshot_inputs() {
        // As cls_rbd's snapshot_add decodes a user snapshot: name, id, namespace.
        assert_eq!(
            snapshot_add_in(5, "s"),
            [
                vec![1, 0, 0, 0, b's', 5, 0, 0, 0, 0, 0, 0, 0],
                vec![1, 1, 4, 0, 0, 0, 0, 0, 0, 0]
            ]
            .concat()
        );
        assert_eq!(
            snapshot_rename_in(5, "t"),
            vec![5, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, b't']
        );
        assert_eq!(
            set_protection_status_in(5, PROTECTION_PROTECTED),
            vec![5, 0, 0, 0, 0, 0, 0, 0, 2]
        );
        assert_eq!(protection_status_out(&[2]).unwrap(), PROTECTION_PROTECTED);
        assert!(protection_status_out(&[]).is_err());
        let mut b = 2u32.to_le_bytes().to_vec();
        b.extend(s("ab"));
        b.extend(s("c"));
        assert_eq!(string_set_out(&b, "x").unwrap(), vec!["ab", "c"]);
    }

    #[test]
    fn parent_reply() {
        let mut b = (-1i64).to_le_bytes().to_vec();
        b.extend(s(""));
        b.extend(NOSNAP.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        assert_eq!(get_parent_out(&b).unwrap(), None);
        let mut p = 2i64.to_le_bytes().to_vec();
        p.extend(s("10ab"));
        p.extend(5u64.to_le_bytes());
        p.extend(100u64.to_le_bytes());
        assert_eq!(
            get_parent_out(&p).unwrap(),
            Some((2, "10ab".into(), 5, 100))
        );
    }

    #[test]
    fn clone_encodings() {
        let p = ParentSpec {
            pool_id: 2,
            namespace: "ns".into(),
            image_id: "10ab".into(),
            snap_id: 4,
        };
        let mut body = 2i64.to_le_bytes().to_vec();
        body.extend(s("ns"));
        body.extend(s("10ab"));
        body.extend(4u64.to_le_bytes());
        let mut spec = vec![1, 1];
        spec.extend((body.len() as u32).to_le_bytes());
        spec.extend(&body);
        assert_eq!(parent_get_out(&spec).unwrap(), Some(p.clone()));
        let mut attach = spec.clone();
        attach.extend((1u64 << 30).to_le_bytes());
        attach.push(0);
        assert_eq!(parent_attach_in(&p, 1 << 30, false), attach);
        // No parent: pool -1, empty strings.
        let mut none = vec![1, 1, 24, 0, 0, 0];
        none.extend((-1i64).to_le_bytes());
        none.extend(s(""));
        none.extend(s(""));
        none.extend(NOSNAP.to_le_bytes());
        assert_eq!(parent_get_out(&none).unwrap(), None);
        assert_eq!(parent_overlap_get_out(&[0]).unwrap(), None);
        let mut ov = vec![1];
        ov.extend(77u64.to_le_bytes());
        assert_eq!(parent_overlap_get_out(&ov).unwrap(), Some(77));
        assert!(parent_overlap_get_out(&[1, 2]).is_err());

        let c = ChildSpec {
            pool_id: 3,
            namespace: "".into(),
            image_id: "abc".into(),
        };
        let mut cb = 3i64.to_le_bytes().to_vec();
        cb.extend(s("abc"));
        cb.extend(s(""));
        let mut want = 4u64.to_le_bytes().to_vec();
        want.extend([2, 1]);
        want.extend((cb.len() as u32).to_le_bytes());
        want.extend(&cb);
        assert_eq!(child_attach_in(4, &c), want);
        let mut list = 1u32.to_le_bytes().to_vec();
        list.extend(&want[8..]);
        assert_eq!(children_list_out(&list).unwrap(), vec![c]);
        let mut v1 = 2i64.to_le_bytes().to_vec();
        v1.extend(s("10ab"));
        v1.extend(4u64.to_le_bytes());
        assert_eq!(v1_child_in(&p, None), v1);
        v1.extend(s("abc"));
        assert_eq!(v1_child_in(&p, Some("abc")), v1);
    }

    #[test]
    fn layout_replies() {
        let mut b = 65536u64.to_le_bytes().to_vec();
        b.extend(4u64.to_le_bytes());
        assert_eq!(stripe_out(&b).unwrap(), (65536, 4));
        assert_eq!(data_pool_out(&(-1i64).to_le_bytes()).unwrap(), -1);
        assert_eq!(data_pool_out(&7i64.to_le_bytes()).unwrap(), 7);
        assert!(data_pool_out(&[1, 2, 3]).is_err());
        assert_eq!(
            string_out(&s("rbd_data.10ab"), "x").unwrap(),
            "rbd_data.10ab"
        );
        assert!(string_out(&[5, 0, 0, 0, b'a'], "x").is_err());
        assert!(string_out(&[1, 0, 0, 0, 0xff], "x").is_err());
    }

    #[test]
    fn directory_and_metadata() {
        let mut want = s("vm1");
        want.extend(s("10ab"));
        assert_eq!(dir_image_in("vm1", "10ab"), want);
        let mut l = s("");
        l.extend(1024u64.to_le_bytes());
        assert_eq!(list_in("", 1024), l);
        let mut reply = 2u32.to_le_bytes().to_vec();
        reply.extend(s("a"));
        reply.extend(s("1"));
        reply.extend(s("b"));
        reply.extend(s("2"));
        assert_eq!(
            dir_list_out(&reply).unwrap(),
            vec![("a".into(), "1".into()), ("b".into(), "2".into())]
        );
        let mut m = 1u32.to_le_bytes().to_vec();
        m.extend(s("rados-nbd.shared"));
        m.extend(s("true"));
        assert_eq!(metadata_set_in(&[("rados-nbd.shared", "true")]), m);
        assert_eq!(
            metadata_list_out(&m).unwrap(),
            vec![("rados-nbd.shared".into(), b"true".to_vec())]
        );
        assert_eq!(
            object_map_resize_in(16, 0),
            vec![16, 0, 0, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(
            object_map_update_in(5, 6, 3, None),
            vec![5, 0, 0, 0, 0, 0, 0, 0, 6, 0, 0, 0, 0, 0, 0, 0, 3, 0]
        );
        assert_eq!(object_map_update_in(0, 1, 1, Some(0))[16..], [1, 1, 0]);
    }

    #[test]
    fn trash_spec_as_cls_rbd_writes_it() {
        // An `rbd_trash` value written by `rbd rm --rbd_move_parent_to_trash_on_remove=true`
        // (Ceph 16.2.15, `rados listomapvals rbd_trash`).
        let real = [
            0x02, 0x01, 0x18, 0x00, 0x00, 0x00, 0x04, 0x02, 0x00, 0x00, 0x00, 0x70, 0x31, 0x19,
            0x19, 0x13, 0x6b, 0x28, 0x44, 0x6e, 0x17, 0x19, 0x19, 0x13, 0x6b, 0x28, 0x44, 0x6e,
            0x17, 0x00,
        ];
        let t = trash_get_out(&real).unwrap();
        assert_eq!(t.source, TRASH_SOURCE_USER_PARENT);
        assert_eq!(t.name, "p1");
        assert_eq!(t.deletion, (0x6b13_1919, 0x176e_4428));
        assert_eq!(t.deferment_end, t.deletion);
        assert_eq!(t.state, TRASH_STATE_NORMAL);
        let enc = trash_add_in("102cf4dad5b2", &t);
        assert_eq!(&enc[4 + 12..], &real[..]);
        assert!(trash_get_out(&real[..real.len() - 1]).is_err());
    }

    #[test]
    fn lock_ops() {
        let got = lock_in("rbd_lock", LOCK_EXCLUSIVE, "auto 140", "internal", "");
        let mut body = s("rbd_lock");
        body.push(1);
        body.extend(s("auto 140"));
        body.extend(s("internal"));
        body.extend(s(""));
        body.extend([0; 8]);
        body.push(0);
        let mut want = vec![1, 1];
        want.extend((body.len() as u32).to_le_bytes());
        want.extend(body);
        assert_eq!(got, want);

        let mut body = s("rbd_lock");
        body.extend(s("auto 140"));
        let mut want = vec![1, 1];
        want.extend((body.len() as u32).to_le_bytes());
        want.extend(body);
        assert_eq!(unlock_in("rbd_lock", "auto 140"), want);

        let locker = Locker {
            entity_type: ENTITY_TYPE_CLIENT,
            entity_num: 4123,
            cookie: "auto 7".into(),
            address: None,
        };
        let mut body = s("rbd_lock");
        body.push(8);
        body.extend(4123i64.to_le_bytes());
        body.extend(s("auto 7"));
        let mut want = vec![1, 1];
        want.extend((body.len() as u32).to_le_bytes());
        want.extend(body);
        assert_eq!(break_lock_in("rbd_lock", &locker), want);

        let mut body = s("rbd_lock");
        body.push(1);
        body.extend(s("auto 7"));
        body.extend(s("internal"));
        body.extend(s("auto 9"));
        let mut want = vec![1, 1];
        want.extend((body.len() as u32).to_le_bytes());
        want.extend(body);
        assert_eq!(
            set_cookie_in("rbd_lock", 1, "auto 7", "internal", "auto 9"),
            want
        );
        assert_eq!(get_info_in("rbd_lock"), {
            let mut w = vec![1, 1, 12, 0, 0, 0];
            w.extend(s("rbd_lock"));
            w
        });
    }

    #[test]
    fn lock_info_reply() {
        // Captured from Ceph 16.2: `lock.get_info` of rbd_lock held exclusively by
        // client.4115 (librados via python3-rados), cookie "auto 7", empty tag; its
        // address is an MSG_ADDR2 entity_addr_t, type legacy, 127.0.0.1:0, nonce 0xf37d0930
        // (`ceph osd blocklist ls` would show it as 127.0.0.1:0/4085057840).
        let hex = "01015700000001000000010113000000081310000000000000060000006175746f203701012f\
                   00000000000000000000000101011c0000000100000030097df310000000020000007f00\
                   00010000000000000000000000000100000000";
        let b: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        let got = get_info_out(&b).unwrap();
        assert_eq!(got.kind, LOCK_EXCLUSIVE);
        assert_eq!(got.tag, "");
        assert_eq!(
            got.lockers,
            vec![Locker {
                entity_type: 8,
                entity_num: 4115,
                cookie: "auto 7".into(),
                address: Some("127.0.0.1:0/4085057840".into()),
            }]
        );
        assert_eq!(parse_lock_cookie(&got.lockers[0].cookie), Some(7));
        assert_eq!(parse_lock_cookie("manual"), None);
        assert!(get_info_out(&b[..b.len() - 2]).is_err());
    }

    #[test]
    fn entity_addrs() {
        let dec = |b: &[u8]| entity_addr(&mut Dec::new(b, "addr"));
        // MSG_ADDR2, IPv6 [::1]:6800 nonce 5, type any (3).
        let mut sa = 10u16.to_le_bytes().to_vec();
        sa.extend(6800u16.to_be_bytes());
        sa.extend([0; 4]);
        sa.extend(std::net::Ipv6Addr::LOCALHOST.octets());
        sa.extend([0; 4]);
        let mut b = vec![1, 1, 1];
        b.extend((12 + sa.len() as u32).to_le_bytes());
        b.extend(3u32.to_le_bytes());
        b.extend(5u32.to_le_bytes());
        b.extend((sa.len() as u32).to_le_bytes());
        b.extend(&sa);
        assert_eq!(dec(&b).unwrap().as_deref(), Some("[::1]:6800/5"));
        // Legacy: u32 0, nonce, sockaddr_storage with the family big-endian.
        let mut b = vec![0, 0, 0, 0];
        b.extend(77u32.to_le_bytes());
        let mut ss = [0u8; 128];
        ss[..2].copy_from_slice(&2u16.to_be_bytes());
        ss[2..4].copy_from_slice(&0u16.to_be_bytes());
        ss[4..8].copy_from_slice(&[10, 1, 2, 3]);
        b.extend(ss);
        assert_eq!(dec(&b).unwrap().as_deref(), Some("10.1.2.3:0/77"));
        // No address (entity_addr_t() encoded by a new peer), a bad marker, truncation.
        let b = [1, 1, 1, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(dec(&b).unwrap(), None);
        assert!(dec(&[2]).is_err());
        assert!(dec(&[0, 0, 0, 0, 1, 0, 0, 0, 2]).is_err());
    }

    #[test]
    fn lock_requests() {
        for force in [false, true] {
            let m = lock_request_notify(4123, 7, force);
            assert_eq!(notify_op(&m).unwrap(), NOTIFY_OP_REQUEST_LOCK);
            let r = lock_request(&m).unwrap();
            assert_eq!((r.gid, r.handle, r.force), (4123, 7, force));
        }
        // Without the force byte (an older sender): not forced.
        let old = lock_notify(NOTIFY_OP_REQUEST_LOCK, 9, 3);
        assert_eq!(
            lock_request(&old).unwrap(),
            LockRequest {
                gid: 9,
                handle: 3,
                force: false
            }
        );
        // Another op, or a cut message, is not a lock request.
        assert!(lock_request(&header_update_notify()).is_err());
        let m = lock_request_notify(1, 2, true);
        assert!(lock_request(&m[..m.len() - 4]).is_err());
    }

    #[test]
    fn notify_messages() {
        assert_eq!(notify_op(&[]).unwrap(), NOTIFY_OP_HEADER_UPDATE);
        let req = lock_notify(NOTIFY_OP_REQUEST_LOCK, 4123, 7);
        let mut want = vec![7, 1, 20, 0, 0, 0, 2, 0, 0, 0];
        want.extend(4123u64.to_le_bytes());
        want.extend(7u64.to_le_bytes());
        assert_eq!(req, want);
        assert_eq!(notify_op(&req).unwrap(), NOTIFY_OP_REQUEST_LOCK);
        assert!(notify_wants_owner_reply(NOTIFY_OP_REQUEST_LOCK));
        assert!(notify_wants_owner_reply(7)); // resize
        assert!(!notify_wants_owner_reply(NOTIFY_OP_HEADER_UPDATE));
        assert_eq!(header_update_notify(), vec![7, 1, 4, 0, 0, 0, 3, 0, 0, 0]);
        assert_eq!(
            response_message(-30),
            vec![1, 1, 4, 0, 0, 0, 0xe2, 0xff, 0xff, 0xff]
        );
        assert!(notify_op(&[7, 1, 4]).is_err());
    }

    #[test]
    fn snap_create_and_quiesce_messages() {
        let id = AsyncRequestId {
            gid: 4150,
            handle: 9,
            request_id: 12,
        };
        let flags = SNAP_CREATE_FLAG_SKIP_NOTIFY_QUIESCE;
        let m = super::super::owner_msgs::request_for(
            id,
            &crate::store::OwnerAction::SnapCreate {
                name: "daily".into(),
                quiesce: crate::store::QuiesceMode::Skip,
            },
        )
        .unwrap();
        let mut want = vec![7, 1];
        let body_len = 4 + 4 + 5 + 6 + 4 + 24 + 8;
        want.extend((body_len as u32).to_le_bytes());
        want.extend(8u32.to_le_bytes());
        want.extend(s("daily"));
        want.extend([1, 1, 4, 0, 0, 0, 0, 0, 0, 0]);
        want.extend(4150u64.to_le_bytes());
        want.extend(9u64.to_le_bytes());
        want.extend(12u64.to_le_bytes());
        want.extend(flags.to_le_bytes());
        assert_eq!(m, want);
        assert_eq!(notify_op(&m).unwrap(), NOTIFY_OP_SNAP_CREATE);
        let got = super::super::owner_msgs::owner_msg(&m).unwrap().unwrap();
        assert_eq!(got.id, Some(id));
        assert!(matches!(
            got.op,
            super::super::owner_msgs::OwnerOp::SnapCreate { ns: 0, ref name, flags: f, .. }
                if name == "daily" && f == flags
        ));
        assert!(super::super::owner_msgs::owner_msg(&m[..m.len() - 1]).is_err());
        let q = quiesce_notify(NOTIFY_OP_QUIESCE, id);
        assert_eq!(q.len(), 6 + 4 + 24);
        assert_eq!(quiesce_request(&q).unwrap(), (NOTIFY_OP_QUIESCE, id));
        let u = quiesce_notify(NOTIFY_OP_UNQUIESCE, id);
        assert_eq!(quiesce_request(&u).unwrap(), (NOTIFY_OP_UNQUIESCE, id));
        assert!(quiesce_request(&m).is_err());
        assert!(!notify_wants_owner_reply(NOTIFY_OP_QUIESCE));
        assert!(!notify_wants_owner_reply(NOTIFY_OP_UNQUIESCE));
        assert!(notify_wants_owner_reply(NOTIFY_OP_SNAP_CREATE));
        assert_eq!(response_result(&[]).unwrap(), None);
        assert_eq!(response_result(&response_message(-5)).unwrap(), Some(-5));
        assert!(response_result(&[1]).is_err());
    }

    #[test]
    fn resize_requests_and_completions() {
        // As librbd 16.2 encodes `rbd resize --size 128M --allow-shrink` (struct v7).
        let id = AsyncRequestId {
            gid: 4161,
            handle: 94_000_001,
            request_id: 3,
        };
        let req = resize_notify(128 << 20, id, true);
        assert_eq!(&req[..6], &[7, 1, 37, 0, 0, 0], "v7, compat 1, 37 bytes");
        assert_eq!(notify_op(&req).unwrap(), NOTIFY_OP_RESIZE);
        assert!(notify_wants_owner_reply(NOTIFY_OP_RESIZE));
        assert_eq!(
            resize_request(&req).unwrap(),
            ResizeRequest {
                size: 128 << 20,
                id,
                allow_shrink: true
            }
        );
        // Before v4 there was no allow_shrink byte (and shrinking was allowed).
        let mut e = Enc::new();
        let at = e.start(3, 1);
        e.u32(NOTIFY_OP_RESIZE).u64(1 << 30).u64(1).u64(2).u64(3);
        let old = e.finish(at).done();
        let r = resize_request(&old).unwrap();
        assert_eq!((r.size, r.allow_shrink), (1 << 30, true));
        // Truncated, or another op: an error, never a guess.
        assert!(resize_request(&req[..req.len() - 2]).is_err());
        assert!(resize_request(&header_update_notify()).is_err());
        // AsyncComplete: v7 compat 1, length 32, op 5, the id, the result.
        let done = async_complete_notify(id, -22);
        assert_eq!(&done[..6], &[7, 1, 32, 0, 0, 0]);
        assert_eq!(notify_op(&done).unwrap(), NOTIFY_OP_ASYNC_COMPLETE);
        assert_eq!(&done[10..18], &4161u64.to_le_bytes());
        assert_eq!(&done[34..], &(-22i32).to_le_bytes());
    }
}
