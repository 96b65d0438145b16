//! The requests librbd clients address to the lock owner through the header watch, and
//! the owner's progress notifications, in librbd 16.2's encoding
//! (src/librbd/WatchNotifyTypes.cc): a NotifyMessage is ENCODE_START(7, 1) { u32 op,
//! the op's payload }; the ack is a ResponseMessage (see `cls::response_message`).
//!
//! Payloads (struct v7; older versions lack the later fields):
//! - Flatten (6), RebuildObjectMap (10): AsyncRequestId.
//! - Resize (7): u64 size, AsyncRequestId, bool allow_shrink (v4).
//! - SnapCreate (8): string name, SnapshotNamespace (v6; at the end in v5),
//!   AsyncRequestId and u64 flags (v7).
//! - SnapRemove (9), SnapProtect (12), SnapUnprotect (13): string name,
//!   SnapshotNamespace (v6), AsyncRequestId (v7).
//! - SnapRename (11): u64 source snap id, then as SnapRemove with the new name.
//! - Rename (14): string new image name, AsyncRequestId (v7; seen from `rbd rename`
//!   16.2.15: librbd 16.2 sends it to the owner whether or not the image journals).
//! - UpdateFeatures (15): u64 features, bool enabled, AsyncRequestId (v7).
//! - Sparsify (17): AsyncRequestId, u64 sparse_size.
//! - AsyncProgress (4): AsyncRequestId, u64 offset, u64 total.
//!
//! AsyncRequestId = ClientId { u64 gid, u64 handle } + u64 request_id. A request without
//! one (librbd before v7 for the snapshot ops) expects its answer in the ack, after the
//! work: we cannot hold an ack back, so those are refused.

use super::cls::{self, AsyncRequestId, Dec, Enc};
use crate::error::Result;
use crate::store::{OwnerAction, QuiesceMode};

pub const NOTIFY_OP_FLATTEN: u32 = 6;
pub use super::cls::NOTIFY_OP_SNAP_CREATE;
pub const NOTIFY_OP_SNAP_REMOVE: u32 = 9;
pub const NOTIFY_OP_REBUILD_OBJECT_MAP: u32 = 10;
pub const NOTIFY_OP_SNAP_RENAME: u32 = 11;
pub const NOTIFY_OP_SNAP_PROTECT: u32 = 12;
pub const NOTIFY_OP_SNAP_UNPROTECT: u32 = 13;
/// `rbd rename`: the owner renames the image itself and keeps its lock.
pub const NOTIFY_OP_RENAME: u32 = 14;
pub const NOTIFY_OP_UPDATE_FEATURES: u32 = 15;
pub const NOTIFY_OP_SPARSIFY: u32 = 17;
/// `rbd image-meta set|remove` and `rbd config image set|rm` of a locked image.
pub const NOTIFY_OP_METADATA_UPDATE: u32 = 20;

/// A snapshot namespace type of a request (cls::rbd::SnapshotNamespaceType): 0 user,
/// 1 group, 2 trash, 3 mirror.
pub const SNAP_NS_USER: u32 = 0;
pub const SNAP_NS_GROUP: u32 = 1;
pub const SNAP_NS_TRASH: u32 = 2;
pub const SNAP_NS_MIRROR: u32 = 3;

/// What a client asks the lock owner to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OwnerOp {
    Flatten,
    Resize {
        size: u64,
        allow_shrink: bool,
    },
    /// `ns_raw`: the whole encoded SnapshotNamespace (a group's carries the group).
    SnapCreate {
        ns: u32,
        ns_raw: Vec<u8>,
        name: String,
        flags: u64,
    },
    SnapRemove {
        ns: u32,
        name: String,
    },
    SnapRename {
        snap_id: u64,
        name: String,
    },
    SnapProtect {
        ns: u32,
        name: String,
    },
    SnapUnprotect {
        ns: u32,
        name: String,
    },
    RebuildObjectMap,
    /// `rbd rename`: the image's new name.
    Rename {
        name: String,
    },
    UpdateFeatures {
        features: u64,
        enabled: bool,
    },
    Sparsify {
        sparse_size: u64,
    },
    /// Sets (`Some`) or removes (`None`) an image metadata key.
    MetadataUpdate {
        key: String,
        value: Option<Vec<u8>>,
    },
}

impl OwnerOp {
    /// The name `rbd` users know the operation by (logs).
    pub fn describe(&self) -> String {
        match self {
            OwnerOp::Flatten => "flatten".into(),
            OwnerOp::Resize { size, .. } => format!("resize to {size} bytes"),
            OwnerOp::SnapCreate { name, .. } => format!("snap create {name}"),
            OwnerOp::SnapRemove { name, .. } => format!("snap rm {name}"),
            OwnerOp::SnapRename { snap_id, name } => {
                format!("snap rename (snapshot id {snap_id}) to {name}")
            }
            OwnerOp::SnapProtect { name, .. } => format!("snap protect {name}"),
            OwnerOp::SnapUnprotect { name, .. } => format!("snap unprotect {name}"),
            OwnerOp::RebuildObjectMap => "object-map rebuild".into(),
            OwnerOp::Rename { name } => format!("rename to {name}"),
            OwnerOp::UpdateFeatures { features, enabled } => format!(
                "feature {} {features:#x}",
                if *enabled { "enable" } else { "disable" }
            ),
            OwnerOp::Sparsify { .. } => "sparsify".into(),
            OwnerOp::MetadataUpdate { key, value } => format!(
                "image-meta {} {key}",
                if value.is_some() { "set" } else { "remove" }
            ),
        }
    }
}

/// A decoded request: the op and, when the client sent one, its AsyncRequestId.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnerMsg {
    pub op: OwnerOp,
    pub id: Option<AsyncRequestId>,
}

fn async_id(d: &mut Dec) -> Result<AsyncRequestId> {
    Ok(AsyncRequestId {
        gid: d.u64()?,
        handle: d.u64()?,
        request_id: d.u64()?,
    })
}

/// SnapshotNamespace: ENCODE_START(1,1) { u32 type, the type's fields (skipped) }.
fn snap_ns(d: &mut Dec) -> Result<u32> {
    Ok(snap_ns_raw(d)?.0)
}

/// The namespace's type and its whole encoding (a group's fields: i64 pool, string
/// group id, string group snapshot id).
fn snap_ns_raw(d: &mut Dec) -> Result<(u32, Vec<u8>)> {
    let at = d.pos();
    let (_, end) = d.start(1)?;
    let t = d.u32()?;
    d.finish(end)?;
    Ok((t, d.since(at).to_vec()))
}

/// SnapPayloadBase: name, namespace (v6), AsyncRequestId (v7).
fn snap_base(d: &mut Dec, v: u8) -> Result<(String, u32, Option<AsyncRequestId>)> {
    let name = d.string()?;
    let ns = if v >= 6 { snap_ns(d)? } else { SNAP_NS_USER };
    let id = if v >= 7 { Some(async_id(d)?) } else { None };
    Ok((name, ns, id))
}

/// Decodes a request addressed to the lock owner; `Ok(None)` for any other notification
/// (lock notices, header updates, progress) and for ops we do not know.
pub fn owner_msg(payload: &[u8]) -> Result<Option<OwnerMsg>> {
    if payload.is_empty() {
        return Ok(None);
    }
    let mut d = Dec::new(payload, "rbd request to the lock owner");
    let (v, end) = d.start(7)?;
    let op = d.u32()?;
    let (op, id) = match op {
        NOTIFY_OP_FLATTEN => (OwnerOp::Flatten, Some(async_id(&mut d)?)),
        NOTIFY_OP_REBUILD_OBJECT_MAP => (OwnerOp::RebuildObjectMap, Some(async_id(&mut d)?)),
        cls::NOTIFY_OP_RESIZE => {
            let size = d.u64()?;
            let id = async_id(&mut d)?;
            let allow_shrink = if v >= 4 { d.u8()? != 0 } else { true };
            (OwnerOp::Resize { size, allow_shrink }, Some(id))
        }
        NOTIFY_OP_SNAP_CREATE => {
            let name = d.string()?;
            let user = || (SNAP_NS_USER, Vec::new());
            let mut ns = if v >= 6 { snap_ns_raw(&mut d)? } else { user() };
            if v == 5 {
                ns = snap_ns_raw(&mut d)?;
            }
            let (ns, ns_raw) = ns;
            let (id, flags) = if v >= 7 {
                (Some(async_id(&mut d)?), d.u64()?)
            } else {
                (None, 0)
            };
            (
                OwnerOp::SnapCreate {
                    ns,
                    ns_raw,
                    name,
                    flags,
                },
                id,
            )
        }
        NOTIFY_OP_SNAP_REMOVE | NOTIFY_OP_SNAP_PROTECT | NOTIFY_OP_SNAP_UNPROTECT => {
            let (name, ns, id) = snap_base(&mut d, v)?;
            let op = match op {
                NOTIFY_OP_SNAP_REMOVE => OwnerOp::SnapRemove { ns, name },
                NOTIFY_OP_SNAP_PROTECT => OwnerOp::SnapProtect { ns, name },
                _ => OwnerOp::SnapUnprotect { ns, name },
            };
            (op, id)
        }
        NOTIFY_OP_SNAP_RENAME => {
            let snap_id = d.u64()?;
            let (name, _ns, id) = snap_base(&mut d, v)?;
            (OwnerOp::SnapRename { snap_id, name }, id)
        }
        NOTIFY_OP_RENAME => {
            let name = d.string()?;
            let id = if v >= 7 {
                Some(async_id(&mut d)?)
            } else {
                None
            };
            (OwnerOp::Rename { name }, id)
        }
        NOTIFY_OP_UPDATE_FEATURES => {
            let features = d.u64()?;
            let enabled = d.u8()? != 0;
            let id = if v >= 7 {
                Some(async_id(&mut d)?)
            } else {
                None
            };
            (OwnerOp::UpdateFeatures { features, enabled }, id)
        }
        NOTIFY_OP_SPARSIFY => {
            let id = async_id(&mut d)?;
            let sparse_size = d.u64()?;
            (OwnerOp::Sparsify { sparse_size }, Some(id))
        }
        NOTIFY_OP_METADATA_UPDATE => {
            // MetadataUpdatePayload: string key, optional<string> value (a bool, then
            // the string when set), AsyncRequestId (v7).
            let key = d.string()?;
            let value = match d.u8()? {
                0 => None,
                _ => Some(d.bytes()?.to_vec()),
            };
            let id = if v >= 7 {
                Some(async_id(&mut d)?)
            } else {
                None
            };
            (OwnerOp::MetadataUpdate { key, value }, id)
        }
        _ => return Ok(None),
    };
    d.finish(end)?;
    Ok(Some(OwnerMsg { op, id }))
}

/// AsyncProgress NotifyMessage: ENCODE_START(7,1) { u32 4, AsyncRequestId, u64 offset,
/// u64 total }: how the owner keeps a waiting client from timing out.
pub fn async_progress_notify(id: AsyncRequestId, offset: u64, total: u64) -> Vec<u8> {
    let mut e = Enc::new();
    let at = e.start(7, 1);
    e.u32(cls::NOTIFY_OP_ASYNC_PROGRESS)
        .u64(id.gid)
        .u64(id.handle)
        .u64(id.request_id)
        .u64(offset)
        .u64(total);
    e.finish(at).done()
}

/// A request to the owner as librbd 16.2 encodes it (what `rados-nbd` sends when the image
/// is served elsewhere): ENCODE_START(7,1) { u32 op, the op's fields }.
fn request(op: u32, body: impl FnOnce(&mut Enc)) -> Vec<u8> {
    let mut e = Enc::new();
    let at = e.start(7, 1);
    e.u32(op);
    body(&mut e);
    e.finish(at).done()
}

fn put_id(e: &mut Enc, id: AsyncRequestId) {
    e.u64(id.gid).u64(id.handle).u64(id.request_id);
}

/// A user SnapshotNamespace: ENCODE_START(1,1) { u32 0 }.
fn put_user_ns(e: &mut Enc) {
    let at = e.start(1, 1);
    e.u32(SNAP_NS_USER).finish(at);
}

/// `action` as librbd 16.2's asker encodes it, naming the asker's request `id`; `None` for
/// `ReleaseLock`, which is not an async request (RequestLock has no id).
pub fn request_for(id: AsyncRequestId, action: &OwnerAction) -> Option<Vec<u8>> {
    Some(match action {
        OwnerAction::SnapCreate { name, quiesce } => {
            // librbd's SNAP_CREATE_FLAG_*: skip the quiesce, or ignore its failure.
            let flags = match quiesce {
                QuiesceMode::Run => 0,
                QuiesceMode::Skip => cls::SNAP_CREATE_FLAG_SKIP_NOTIFY_QUIESCE,
                QuiesceMode::IgnoreError => cls::SNAP_CREATE_FLAG_IGNORE_NOTIFY_QUIESCE_ERROR,
            };
            request(NOTIFY_OP_SNAP_CREATE, |e| {
                e.str(name);
                put_user_ns(e);
                put_id(e, id);
                e.u64(flags);
            })
        }
        OwnerAction::SnapRemove { name } => request(NOTIFY_OP_SNAP_REMOVE, |e| {
            e.str(name);
            put_user_ns(e);
            put_id(e, id);
        }),
        OwnerAction::SnapProtect { name, protected } => {
            let op = if *protected {
                NOTIFY_OP_SNAP_PROTECT
            } else {
                NOTIFY_OP_SNAP_UNPROTECT
            };
            request(op, |e| {
                e.str(name);
                put_user_ns(e);
                put_id(e, id);
            })
        }
        OwnerAction::SnapRename { snap_id, new_name } => request(NOTIFY_OP_SNAP_RENAME, |e| {
            e.u64(*snap_id);
            e.str(new_name);
            put_user_ns(e);
            put_id(e, id);
        }),
        OwnerAction::Rename { new_name } => request(NOTIFY_OP_RENAME, |e| {
            e.str(new_name);
            put_id(e, id);
        }),
        OwnerAction::Flatten => request(NOTIFY_OP_FLATTEN, |e| put_id(e, id)),
        OwnerAction::RebuildObjectMap => request(NOTIFY_OP_REBUILD_OBJECT_MAP, |e| put_id(e, id)),
        OwnerAction::Resize { size, allow_shrink } => request(cls::NOTIFY_OP_RESIZE, |e| {
            e.u64(*size);
            put_id(e, id);
            e.bool(*allow_shrink);
        }),
        OwnerAction::UpdateFeatures { features, enabled } => {
            request(NOTIFY_OP_UPDATE_FEATURES, |e| {
                e.u64(*features);
                e.bool(*enabled);
                put_id(e, id);
            })
        }
        OwnerAction::Sparsify { sparse_size } => request(NOTIFY_OP_SPARSIFY, |e| {
            put_id(e, id);
            e.u64(*sparse_size);
        }),
        // TrashSnapshotNamespace: the original name, then the original type.
        OwnerAction::TrashSnapRemove {
            name,
            original,
            original_type,
        } => request(NOTIFY_OP_SNAP_REMOVE, |e| {
            e.str(name);
            let at = e.start(1, 1);
            e.u32(SNAP_NS_TRASH)
                .str(original)
                .u32(*original_type)
                .finish(at);
            put_id(e, id);
        }),
        // Never asked by us: a group snapshot is `rbd group snap`'s.
        OwnerAction::ReleaseLock
        | OwnerAction::NsSnapCreate { .. }
        | OwnerAction::NsSnapRemove { .. } => return None,
    })
}

/// What the owner tells the asker while and after it works.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OwnerNews {
    Progress {
        id: AsyncRequestId,
        offset: u64,
        total: u64,
    },
    Complete {
        id: AsyncRequestId,
        result: i32,
    },
}

/// AsyncProgress / AsyncComplete, `None` for any other notification.
pub fn owner_news(payload: &[u8]) -> Option<OwnerNews> {
    let mut d = Dec::new(payload, "rbd notification");
    let (_, end) = d.start(7).ok()?;
    let news = match d.u32().ok()? {
        cls::NOTIFY_OP_ASYNC_PROGRESS => OwnerNews::Progress {
            id: async_id(&mut d).ok()?,
            offset: d.u64().ok()?,
            total: d.u64().ok()?,
        },
        cls::NOTIFY_OP_ASYNC_COMPLETE => OwnerNews::Complete {
            id: async_id(&mut d).ok()?,
            result: d.i32().ok()?,
        },
        _ => return None,
    };
    d.finish(end).ok()?;
    Some(news)
}

/// ResponseMessage: ENCODE_START(1,1) { i32 result }.
pub fn response_result(payload: &[u8]) -> Result<i32> {
    let mut d = Dec::new(payload, "the lock owner's answer");
    let (_, end) = d.start(1)?;
    let r = d.i32()?;
    d.finish(end)?;
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    const ID: AsyncRequestId = AsyncRequestId {
        gid: 0x1234,
        handle: 0x5678,
        request_id: 3,
    };

    #[test]
    fn progress_encoding() {
        let p = async_progress_notify(ID, 5, 9);
        assert_eq!(&p[..10], &[7, 1, 44, 0, 0, 0, 4, 0, 0, 0]);
        assert_eq!(&p[10..18], &0x1234u64.to_le_bytes());
        assert_eq!(&p[34..42], &5u64.to_le_bytes());
        assert_eq!(&p[42..], &9u64.to_le_bytes());
    }

    /// `rbd image-meta set cap1 k2 "v two"` and `rbd image-meta remove cap1 k1` of a
    /// served image, as librbd 16.2.15 sent them to us (the daemon's debug log).
    #[test]
    fn metadata_updates_from_librbd() {
        let set = hex("07012c00000014000000020000006b320105000000762074776f\
                       1910000000000000501500d4487f00000100000000000000");
        let m = owner_msg(&set).unwrap().unwrap();
        assert_eq!(
            m.op,
            OwnerOp::MetadataUpdate {
                key: "k2".into(),
                value: Some(b"v two".to_vec())
            }
        );
        assert_eq!(
            m.id,
            Some(AsyncRequestId {
                gid: 4121,
                handle: 0x7f48d4001550,
                request_id: 1
            })
        );
        let rm = hex(
            "07012300000014000000020000006b31001b1000000000000090160060847f0000\
                      0100000000000000",
        );
        let m = owner_msg(&rm).unwrap().unwrap();
        assert_eq!(
            m.op,
            OwnerOp::MetadataUpdate {
                key: "k1".into(),
                value: None
            }
        );
        assert_eq!(m.id.map(|i| (i.gid, i.request_id)), Some((4123, 1)));
        assert!(owner_msg(&set[..set.len() - 4]).is_err(), "cut short");
    }

    /// `rbd rename rn6 rn7xyz` of a served image, as librbd 16.2.15 sent it to us (the
    /// daemon's debug log): the new name, then the AsyncRequestId (v7); and ours, the same.
    #[test]
    fn rename_from_librbd() {
        let got = hex("0701260000000e00000006000000726e3778797a\
                       2d1400000000000070150098fd7e00000100000000000000");
        let m = owner_msg(&got).unwrap().unwrap();
        assert_eq!(
            m.op,
            OwnerOp::Rename {
                name: "rn7xyz".into()
            }
        );
        let id = AsyncRequestId {
            gid: 5165,
            handle: 0x7efd98001570,
            request_id: 1,
        };
        assert_eq!(m.id, Some(id));
        let ours = request_for(
            id,
            &OwnerAction::Rename {
                new_name: "rn7xyz".into(),
            },
        )
        .unwrap();
        assert_eq!(ours, got);
        assert!(owner_msg(&got[..got.len() - 8]).is_err(), "cut short");
    }

    #[test]
    fn other_notifications_are_not_requests() {
        assert_eq!(owner_msg(&[]).unwrap(), None);
        assert_eq!(owner_msg(&cls::header_update_notify()).unwrap(), None);
        assert_eq!(owner_msg(&cls::async_complete_notify(ID, 0)).unwrap(), None);
        assert!(owner_msg(&[7, 1, 4]).is_err());
    }

    #[test]
    fn resize_as_before() {
        let m = owner_msg(&cls::resize_notify(1 << 30, ID, false))
            .unwrap()
            .unwrap();
        assert_eq!(
            m,
            OwnerMsg {
                op: OwnerOp::Resize {
                    size: 1 << 30,
                    allow_shrink: false
                },
                id: Some(ID)
            }
        );
    }

    /// What `rbd` (librbd 16.2.x) sent a rados-nbd lock owner, captured from the wire.
    fn captured(h: &str) -> OwnerMsg {
        owner_msg(&hex(h)).unwrap().unwrap()
    }

    fn id(gid: u64, handle: u64, request_id: u64) -> Option<AsyncRequestId> {
        Some(AsyncRequestId {
            gid,
            handle,
            request_id,
        })
    }

    #[test]
    fn a_group_snapshot_request_keeps_its_namespace_whole() {
        // SnapCreate of `rbd group snap create` (if asked of the owner): the group
        // namespace (type 1: i64 pool, group id, group snapshot id) goes to snapshot_add
        // exactly as it came.
        let mut ns = Enc::new();
        let at = ns.start(1, 1);
        ns.u32(SNAP_NS_GROUP)
            .i64(1)
            .str("189a6b8b4567")
            .str("18a06b8b4567");
        let ns = ns.finish(at).done();
        let msg = request(NOTIFY_OP_SNAP_CREATE, |e| {
            e.str(".group.1_189a6b8b4567_18a06b8b4567");
            e.0.extend_from_slice(&ns);
            put_id(
                e,
                AsyncRequestId {
                    gid: 7,
                    handle: 8,
                    request_id: 9,
                },
            );
            e.u64(cls::SNAP_CREATE_FLAG_SKIP_NOTIFY_QUIESCE);
        });
        let m = owner_msg(&msg).unwrap().unwrap();
        let OwnerOp::SnapCreate {
            ns: kind, ns_raw, ..
        } = m.op
        else {
            panic!("{m:?}")
        };
        assert_eq!((kind, &ns_raw), (SNAP_NS_GROUP, &ns));
        let add = cls::snapshot_add_ns_in(5, "n", &ns_raw);
        let mut want = Enc::new();
        want.str("n").u64(5);
        want.0.extend_from_slice(&ns);
        assert_eq!(add, want.done());
        // The user namespace's add is the same shape with the user namespace.
        let user = hex("0101 04000000 00000000");
        assert_eq!(
            cls::snapshot_add_ns_in(5, "n", &user),
            cls::snapshot_add_in(5, "n")
        );
    }

    #[test]
    fn requests_as_rbd_16_2_sends_them() {
        // rbd snap create ow1@s1: name, user namespace, id, flags 0.
        assert_eq!(
            captured(
                "0701340000000800000002000000733101010400000000000000\
                 1310000000000000c0660164d97f00000100000000000000 0000000000000000"
            ),
            OwnerMsg {
                op: OwnerOp::SnapCreate {
                    ns: SNAP_NS_USER,
                    ns_raw: hex("0101 04000000 00000000"),
                    name: "s1".into(),
                    flags: 0
                },
                id: id(0x1013, 0x7fd9_6401_66c0, 1)
            }
        );
        // rbd snap rm ow1@s2: name, user namespace, id.
        assert_eq!(
            captured(
                "07012c00000009000000020000007332010104000000000000002510000000000000\
                 c0480158ad7f00000100000000000000"
            ),
            OwnerMsg {
                op: OwnerOp::SnapRemove {
                    ns: SNAP_NS_USER,
                    name: "s2".into()
                },
                id: id(0x1025, 0x7fad_5801_48c0, 1)
            }
        );
        // rbd object-map rebuild, rbd flatten: the id alone.
        assert_eq!(
            captured("07011c0000000a0000001710000000000000d0100018207f00000100000000000000"),
            OwnerMsg {
                op: OwnerOp::RebuildObjectMap,
                id: id(0x1017, 0x7f20_1800_10d0, 1)
            }
        );
        assert_eq!(
            captured("07011c000000060000003b1000000000000070d8013cb67f00000100000000000000"),
            OwnerMsg {
                op: OwnerOp::Flatten,
                id: id(0x103b, 0x7fb6_3c01_d870, 1)
            }
        );
        // rbd feature disable IMG fast-diff: features 0x10, enabled false, id.
        assert_eq!(
            captured(
                "0701250000000f00000010000000000000000027100000000000000015000c167f0000\
                 0100000000000000"
            ),
            OwnerMsg {
                op: OwnerOp::UpdateFeatures {
                    features: 0x10,
                    enabled: false
                },
                id: id(0x1027, 0x7f16_0c00_1500, 1)
            }
        );
        // rbd sparsify: id, sparse size 4096.
        assert_eq!(
            captured(
                "070124000000110000001910000000000000401d01f0817f0000\
                 01000000000000000010000000000000"
            ),
            OwnerMsg {
                op: OwnerOp::Sparsify { sparse_size: 4096 },
                id: id(0x1019, 0x7f81_f001_1d40, 1)
            }
        );
        // The lock request that follows an -EOPNOTSUPP: not an operation.
        assert_eq!(
            owner_msg(&hex(
                "070115000000020000001910000000000000401d01f0817f000000"
            ))
            .unwrap(),
            None
        );
    }

    #[test]
    fn older_and_other_layouts() {
        // SnapRename (journaling images only): source id first, then as SnapRemove.
        let mut e = Enc::new();
        let at = e.start(7, 1);
        e.u32(NOTIFY_OP_SNAP_RENAME).u64(4).str("new");
        let ns = e.start(1, 1);
        e.u32(0).finish(ns);
        e.u64(1).u64(2).u64(3);
        let m = owner_msg(&e.finish(at).done()).unwrap().unwrap();
        assert_eq!(
            m,
            OwnerMsg {
                op: OwnerOp::SnapRename {
                    snap_id: 4,
                    name: "new".into()
                },
                id: id(1, 2, 3)
            }
        );
        // A group snapshot (namespace type 1 with its fields), v7.
        let mut e = Enc::new();
        let at = e.start(7, 1);
        e.u32(NOTIFY_OP_SNAP_PROTECT).str("g");
        let ns = e.start(1, 1);
        e.u32(1).i64(2).str("gid").str("gsnap").finish(ns);
        e.u64(1).u64(2).u64(3);
        let m = owner_msg(&e.finish(at).done()).unwrap().unwrap();
        assert_eq!(
            m.op,
            OwnerOp::SnapProtect {
                ns: 1,
                name: "g".into()
            }
        );
        // v6 (librbd before 16.2): no request id, the owner must answer in the ack.
        let mut e = Enc::new();
        let at = e.start(6, 1);
        e.u32(NOTIFY_OP_SNAP_REMOVE).str("s");
        let ns = e.start(1, 1);
        e.u32(0).finish(ns);
        let m = owner_msg(&e.finish(at).done()).unwrap().unwrap();
        assert_eq!(m.id, None);
        // Truncated: an error, never a guess.
        let full = hex("07011c000000060000003b1000000000000070d8013cb67f00000100000000000000");
        assert!(owner_msg(&full[..full.len() - 1]).is_err());
    }

    fn req(id: AsyncRequestId, a: OwnerAction) -> Vec<u8> {
        request_for(id, &a).expect("an async request")
    }

    #[test]
    fn every_request_we_ask_decodes_as_the_owner_reads_it() {
        use OwnerAction as A;
        let user = SNAP_NS_USER;
        let cases = [
            (A::Flatten, OwnerOp::Flatten),
            (A::RebuildObjectMap, OwnerOp::RebuildObjectMap),
            (
                A::Resize {
                    size: 9,
                    allow_shrink: false,
                },
                OwnerOp::Resize {
                    size: 9,
                    allow_shrink: false,
                },
            ),
            (
                A::SnapCreate {
                    name: "a".into(),
                    quiesce: QuiesceMode::IgnoreError,
                },
                OwnerOp::SnapCreate {
                    ns: user,
                    ns_raw: hex("0101 04000000 00000000"),
                    name: "a".into(),
                    flags: cls::SNAP_CREATE_FLAG_IGNORE_NOTIFY_QUIESCE_ERROR,
                },
            ),
            (
                A::SnapRemove { name: "b".into() },
                OwnerOp::SnapRemove {
                    ns: user,
                    name: "b".into(),
                },
            ),
            (
                A::SnapRename {
                    snap_id: 3,
                    new_name: "c".into(),
                },
                OwnerOp::SnapRename {
                    snap_id: 3,
                    name: "c".into(),
                },
            ),
            (
                A::SnapProtect {
                    name: "d".into(),
                    protected: false,
                },
                OwnerOp::SnapUnprotect {
                    ns: user,
                    name: "d".into(),
                },
            ),
            (
                A::UpdateFeatures {
                    features: 0x18,
                    enabled: true,
                },
                OwnerOp::UpdateFeatures {
                    features: 0x18,
                    enabled: true,
                },
            ),
            (
                A::Sparsify { sparse_size: 4096 },
                OwnerOp::Sparsify { sparse_size: 4096 },
            ),
        ];
        for (action, op) in cases {
            let m = owner_msg(&req(ID, action.clone())).unwrap().unwrap();
            assert_eq!(m, OwnerMsg { op, id: Some(ID) }, "{action:?}");
        }
        assert_eq!(request_for(ID, &A::ReleaseLock), None);
    }

    /// A trashed snapshot's removal names it as librbd's DetachChildRequest does: its UUID
    /// name and its whole TrashSnapshotNamespace (librbd's owner looks the snapshot up by
    /// the namespace's type and the name), laid out as cls_rbd stores it in the header
    /// (the bytes `snapshot_get` returns, decoded by cls.rs).
    #[test]
    fn a_trashed_snapshot_removal_names_the_whole_namespace() {
        let action = OwnerAction::TrashSnapRemove {
            name: "0b9f6c2e-uuid".into(),
            original: "s1".into(),
            original_type: 0,
        };
        let b = req(ID, action);
        let m = owner_msg(&b).unwrap().unwrap();
        assert_eq!(
            m,
            OwnerMsg {
                op: OwnerOp::SnapRemove {
                    ns: SNAP_NS_TRASH,
                    name: "0b9f6c2e-uuid".into()
                },
                id: Some(ID)
            }
        );
        // ENCODE_START(1,1), length, type 2, "s1", original type 0.
        let ns = hex("0101 0e000000 02000000 02000000 7331 00000000");
        assert!(
            b.windows(ns.len()).any(|w| w == ns),
            "namespace bytes in {b:02x?}"
        );
    }

    #[test]
    fn our_requests_decode_as_librbd_would() {
        // Same bytes as rbd's own (captured above), but for the ids.
        let id = AsyncRequestId {
            gid: 0x1025,
            handle: 0x7fad_5801_48c0,
            request_id: 1,
        };
        assert_eq!(
            req(id, OwnerAction::SnapRemove { name: "s2".into() }),
            hex(
                "07012c00000009000000020000007332010104000000000000002510000000000000\
                 c0480158ad7f00000100000000000000"
            )
        );
        let id = AsyncRequestId {
            gid: 0x1013,
            handle: 0x7fd9_6401_66c0,
            request_id: 1,
        };
        assert_eq!(
            req(
                id,
                OwnerAction::SnapCreate {
                    name: "s1".into(),
                    quiesce: QuiesceMode::Run
                }
            ),
            hex("0701340000000800000002000000733101010400000000000000\
                 1310000000000000c0660164d97f00000100000000000000 0000000000000000")
        );
        let id = AsyncRequestId {
            gid: 0x103b,
            handle: 0x7fb6_3c01_d870,
            request_id: 1,
        };
        assert_eq!(
            req(id, OwnerAction::Flatten),
            hex("07011c000000060000003b1000000000000070d8013cb67f00000100000000000000")
        );
        // rbd snap rm's layout with another op (captured rbd snap rm above): protect,
        // unprotect; rename puts the source id first.
        let mut protect = req(id, OwnerAction::SnapRemove { name: "s2".into() });
        protect[6] = NOTIFY_OP_SNAP_PROTECT as u8;
        assert_eq!(
            req(
                id,
                OwnerAction::SnapProtect {
                    name: "s2".into(),
                    protected: true
                }
            ),
            protect
        );
        for (req, protect) in [
            (
                req(
                    ID,
                    OwnerAction::SnapProtect {
                        name: "p".into(),
                        protected: true,
                    },
                ),
                true,
            ),
            (
                req(
                    ID,
                    OwnerAction::SnapProtect {
                        name: "p".into(),
                        protected: false,
                    },
                ),
                false,
            ),
        ] {
            let m = owner_msg(&req).unwrap().unwrap();
            let want = if protect {
                OwnerOp::SnapProtect {
                    ns: SNAP_NS_USER,
                    name: "p".into(),
                }
            } else {
                OwnerOp::SnapUnprotect {
                    ns: SNAP_NS_USER,
                    name: "p".into(),
                }
            };
            assert_eq!(
                m,
                OwnerMsg {
                    op: want,
                    id: Some(ID)
                }
            );
        }
        assert_eq!(
            owner_msg(&req(
                ID,
                OwnerAction::SnapRename {
                    snap_id: 4,
                    new_name: "new".into()
                }
            ))
            .unwrap()
            .unwrap(),
            OwnerMsg {
                op: OwnerOp::SnapRename {
                    snap_id: 4,
                    name: "new".into()
                },
                id: Some(ID)
            }
        );
        assert_eq!(
            owner_msg(&req(
                ID,
                OwnerAction::Resize {
                    size: 5 << 20,
                    allow_shrink: true
                }
            ))
            .unwrap()
            .unwrap(),
            OwnerMsg {
                op: OwnerOp::Resize {
                    size: 5 << 20,
                    allow_shrink: true
                },
                id: Some(ID)
            }
        );
        assert_eq!(
            owner_news(&async_progress_notify(ID, 1, 2)),
            Some(OwnerNews::Progress {
                id: ID,
                offset: 1,
                total: 2
            })
        );
        assert_eq!(
            owner_news(&cls::async_complete_notify(ID, -17)),
            Some(OwnerNews::Complete {
                id: ID,
                result: -17
            })
        );
        assert_eq!(owner_news(&cls::header_update_notify()), None);
        assert_eq!(response_result(&cls::response_message(-16)).unwrap(), -16);
        assert!(response_result(&[]).is_err());
    }
}
