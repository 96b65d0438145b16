//! An image header: reading it through cls_rbd, checking the features we serve, and
//! refreshing an opened image's copy of it; the names of the header and object-map objects.

use super::image::Inner;
use super::rados::IoCtx;
use super::{cls, RBD};
use crate::error::{Error, ErrorKind, Result};
use crate::spec::ImageSpec;
use crate::store::{
    ImageHeader, OpenMode, ParentInfo, SnapInfo, RBD_FEATURE_DATA_POOL, RBD_FEATURE_DEEP_FLATTEN,
    RBD_FEATURE_EXCLUSIVE_LOCK, RBD_FEATURE_FAST_DIFF, RBD_FEATURE_JOURNALING,
    RBD_FEATURE_LAYERING, RBD_FEATURE_MIGRATING, RBD_FEATURE_NON_PRIMARY, RBD_FEATURE_OBJECT_MAP,
    RBD_FEATURE_OPERATIONS, RBD_FEATURE_STRIPINGV2,
};

/// Features we serve. Anything else set on an image is refused.
const SUPPORTED_FEATURES: u64 = RBD_FEATURE_LAYERING
    | RBD_FEATURE_STRIPINGV2
    | RBD_FEATURE_EXCLUSIVE_LOCK
    | RBD_FEATURE_OBJECT_MAP
    | RBD_FEATURE_FAST_DIFF
    | RBD_FEATURE_DEEP_FLATTEN
    | RBD_FEATURE_OPERATIONS
    | RBD_FEATURE_NON_PRIMARY
    | RBD_FEATURE_DATA_POOL;

pub(super) fn header_oid(id: &str) -> String {
    format!("rbd_header.{id}")
}

pub(super) fn object_map_oid(id: &str, snap: Option<u64>) -> String {
    match snap {
        Some(s) => format!("rbd_object_map.{id}.{s:016x}"),
        None => format!("rbd_object_map.{id}"),
    }
}

/// A fresh image id like librbd's: our client gid in hex followed by random hex, at most
/// 14 characters (RBD_MAX_IMAGE_ID_LENGTH).
pub(super) fn generate_image_id(gid: u64) -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(gid);
    if let Ok(t) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        h.write_u128(t.as_nanos());
    }
    let id = format!("{gid:x}{:08x}", h.finish() as u32);
    let cut = id.len().saturating_sub(14);
    id[cut..].to_string()
}

/// Reads and checks an image header. `snap_name` selects a snapshot (its size and flags).
pub(super) async fn load_header(
    io: &IoCtx,
    spec: &ImageSpec,
    id: &str,
    mode: OpenMode,
) -> Result<(ImageHeader, Option<u64>)> {
    load_header_at(io, spec, id, mode, None).await
}

/// Whether striping (stripe unit, count) lays an image of objects 2^order out as with
/// no striping: one object per stripe, and a unit that divides the object size.
pub(super) fn plain_layout(unit: u64, count: u64, order: u8) -> bool {
    count == 1 && unit != 0 && (1u64 << order).is_multiple_of(unit)
}

/// [`load_header`], with the snapshot `spec.snap` names given by its id when `snap_id`
/// is set: a clone's parent snapshot may be in the trash, where no user can name it (its
/// name is a UUID; `IMAGE@SNAP` means a user snapshot, as for librbd).
pub(super) async fn load_header_at(
    io: &IoCtx,
    spec: &ImageSpec,
    id: &str,
    mode: OpenMode,
    snap_id: Option<u64>,
) -> Result<(ImageHeader, Option<u64>)> {
    let by_id = snap_id;
    let hdr = header_oid(id);
    let ctx = |e: Error| e.context(format!("reading header of image {spec}"));
    let read_only = mode == OpenMode::ReadOnly;
    let b = io
        .exec_read(
            &hdr,
            RBD,
            "get_features",
            &cls::get_features_in(cls::NOSNAP, read_only),
        )
        .await
        .map_err(ctx)?;
    let (features, incompatible) = cls::get_features_out(&b).map_err(ctx)?;
    check_features(spec, features, incompatible, mode)?;

    let b = io
        .exec_read(&hdr, RBD, "get_size", &cls::snap_in(cls::NOSNAP))
        .await
        .map_err(ctx)?;
    let (order, mut size) = cls::get_size_out(&b).map_err(ctx)?;
    if !(12..=25).contains(&order) {
        return Err(Error::new(
            ErrorKind::Unsupported,
            format!("image {spec}: object order {order} is outside 12..=25"),
        ));
    }
    let b = io
        .exec_read(&hdr, RBD, "get_object_prefix", &[])
        .await
        .map_err(ctx)?;
    let object_prefix = cls::string_out(&b, "rbd.get_object_prefix reply").map_err(ctx)?;

    if features & RBD_FEATURE_STRIPINGV2 != 0 {
        let b = io
            .exec_read(&hdr, RBD, "get_stripe_unit_count", &[])
            .await
            .map_err(ctx)?;
        let (unit, count) = cls::stripe_out(&b).map_err(ctx)?;
        // With one object per stripe, stripe units follow each other in the same object
        // until it is full: the layout is the plain one, whatever the unit (what `rbd
        // clone --object-size` makes of a parent with smaller objects). Trims and
        // shrinks are the same too: librbd's stripe period is then the object size.
        if !plain_layout(unit, count, order) {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "image {spec} uses fancy striping (stripe unit {unit}, count {count}); \
                     only stripe count 1 with a stripe unit that divides the object size \
                     (the plain layout) is supported"
                ),
            ));
        }
    }

    let b = io
        .exec_read(&hdr, RBD, "get_snapcontext", &[])
        .await
        .map_err(ctx)?;
    let (snap_seq, snap_ids) = cls::get_snapcontext_out(&b).map_err(ctx)?;
    let mut snaps = Vec::with_capacity(snap_ids.len());
    for &sid in &snap_ids {
        let b = io
            .exec_read(&hdr, RBD, "snapshot_get", &cls::snap_in(sid))
            .await
            .map_err(ctx)?;
        let info = cls::snapshot_get_out(&b).map_err(ctx)?;
        let b = io
            .exec_read(&hdr, RBD, "get_protection_status", &cls::snap_in(sid))
            .await
            .map_err(ctx)?;
        // UNPROTECTING (an unprotect in progress, or one that died) still counts as
        // protected, as librbd's is_snap_protected says.
        let protected = cls::protection_status_out(&b).map_err(ctx)? != cls::PROTECTION_UNPROTECTED;
        snaps.push(SnapInfo {
            id: sid,
            name: info.name,
            size: info.size,
            protected,
            timestamp: Some(info.timestamp),
            namespace: info.namespace,
        });
    }

    let snap_id = match &spec.snap {
        None => None,
        Some(name) => {
            let found = match by_id {
                Some(sid) => snaps.iter().find(|s| s.id == sid),
                None => snaps.iter().find(|s| s.is_user() && &s.name == name),
            };
            let s = found.ok_or_else(|| {
                Error::new(
                    ErrorKind::NotFound,
                    format!(
                        "snapshot {name} of image {}/{} not found",
                        spec.pool_spec(),
                        spec.name
                    ),
                )
            })?;
            size = s.size;
            Some(s.id)
        }
    };
    let b = io
        .exec_read(
            &hdr,
            RBD,
            "get_flags",
            &cls::snap_in(snap_id.unwrap_or(cls::NOSNAP)),
        )
        .await
        .map_err(ctx)?;
    let flags = cls::u64_out(&b, "rbd.get_flags reply").map_err(ctx)?;
    let parent = read_parent(io, &hdr, snap_id.unwrap_or(cls::NOSNAP))
        .await
        .map_err(ctx)?;
    let parent = match parent {
        Some((p, overlap)) => Some(
            resolve_parent(io, &p, overlap)
                .await
                .map_err(|e| e.context(format!("resolving the parent of image {spec}")))?,
        ),
        None => None,
    };

    Ok((
        ImageHeader {
            id: id.to_string(),
            size,
            order,
            object_prefix,
            features,
            flags,
            snap_seq,
            snaps,
            parent,
        },
        snap_id,
    ))
}

/// The parent of the head (`snap` = NOSNAP) or of a snapshot, with its overlap, as
/// librbd's RefreshRequest reads it: `parent_get` (the one parent spec an image has) and
/// `parent_overlap_get` at the snapshot (absent once that point was flattened), or the
/// legacy `get_parent` where the OSD has neither (-EOPNOTSUPP).
async fn read_parent(io: &IoCtx, hdr: &str, snap: u64) -> Result<Option<(cls::ParentSpec, u64)>> {
    match io.exec_read(hdr, RBD, "parent_get", &[]).await {
        Ok(b) => {
            let Some(p) = cls::parent_get_out(&b)? else {
                return Ok(None);
            };
            let b = io
                .exec_read(hdr, RBD, "parent_overlap_get", &cls::snap_in(snap))
                .await?;
            Ok(cls::parent_overlap_get_out(&b)?.map(|o| (p, o)))
        }
        Err(e) if e.kind == ErrorKind::NotFound => Ok(None),
        Err(e) if super::rados::errno_of(&e) == Some(libc::EOPNOTSUPP) => {
            let b = io
                .exec_read(hdr, RBD, "get_parent", &cls::snap_in(snap))
                .await?;
            Ok(
                cls::get_parent_out(&b)?.map(|(pool_id, image_id, snap_id, overlap)| {
                    (
                        cls::ParentSpec {
                            pool_id,
                            namespace: String::new(),
                            image_id,
                            snap_id,
                        },
                        overlap,
                    )
                }),
            )
        }
        Err(e) => Err(e),
    }
}

/// Names for the ids a clone's header holds: the pool (by id), the image (its pool's
/// `rbd_directory`), the snapshot (the parent's header). The parent may live in another
/// pool or RBD namespace.
async fn resolve_parent(io: &IoCtx, p: &cls::ParentSpec, overlap: u64) -> Result<ParentInfo> {
    let cluster = io.cluster();
    let pool = cluster.pool_name(p.pool_id)?;
    let pio = cluster.ioctx_in(&pool, &p.namespace)?;
    // A parent in the trash is named as its trash entry names it (as rbd info does); it
    // is opened by id anyway.
    let (name, trash) = super::store::name_by_id(&pio, &p.image_id).await?;
    let in_trash = trash.is_some();
    let b = pio
        .exec_read(
            &header_oid(&p.image_id),
            RBD,
            "snapshot_get",
            &cls::snap_in(p.snap_id),
        )
        .await?;
    let snap = cls::snapshot_get_out(&b)?.name;
    Ok(ParentInfo {
        spec: ImageSpec {
            pool,
            namespace: p.namespace.clone(),
            name,
            snap: Some(snap),
        },
        image_id: p.image_id.clone(),
        snap_id: p.snap_id,
        overlap,
        in_trash,
    })
}

fn check_features(
    spec: &ImageSpec,
    features: u64,
    incompatible: u64,
    mode: OpenMode,
) -> Result<()> {
    let refuse = |what: &str| {
        Err(Error::new(
            ErrorKind::Unsupported,
            format!("image {spec} uses {what}, which rados-nbd does not support yet"),
        ))
    };
    if features & RBD_FEATURE_JOURNALING != 0 {
        return refuse("journaling");
    }
    if features & RBD_FEATURE_MIGRATING != 0 {
        return refuse("live migration (it is being migrated)");
    }
    if features & RBD_FEATURE_NON_PRIMARY != 0 && mode != OpenMode::ReadOnly {
        return Err(Error::new(
            ErrorKind::ReadOnly,
            format!("image {spec} is a non-primary mirror image; it can only be opened read-only"),
        ));
    }
    let unknown = (features | incompatible) & !SUPPORTED_FEATURES;
    if unknown != 0 {
        return refuse(&format!("unknown feature bits {unknown:#x}"));
    }
    Ok(())
}

/// Reads the header in and installs it (with the snapshot context writes carry). One
/// refresh at a time (`Inner::refreshing`): two overlapping ones could install their reads
/// in the other order, and a header read before our own `snapshot_add` installed after
/// the refresh that followed it would put the old snapshot context back.
pub(super) async fn refresh(inner: &Inner) -> Result<ImageHeader> {
    let _g = inner.refreshing.lock().await;
    refresh_locked(inner).await
}

/// `refresh`, for a caller that holds `Inner::refreshing`.
pub(super) async fn refresh_locked(inner: &Inner) -> Result<ImageHeader> {
    let (h, _) = load_header(&inner.meta, &inner.spec, &inner.id, inner.mode).await?;
    if inner.snap_id.is_none() {
        let ids: Vec<u64> = h.snaps.iter().map(|s| s.id).collect();
        inner.data.set_snap_write_ctx(h.snap_seq, &ids)?;
    }
    let mut cur = inner.header.write().unwrap_or_else(|p| p.into_inner());
    if cur.size != h.size {
        tracing::info!(image = %inner.spec, "size changed from {} to {}", cur.size, h.size);
    }
    *cur = h.clone();
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_ids_look_like_librbds() {
        let a = generate_image_id(0x101b);
        let b = generate_image_id(0x101b);
        assert!(a.starts_with("101b") && a.len() == 12, "{a}");
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
        assert!(generate_image_id(u64::MAX).len() <= 14);
    }

    #[test]
    fn feature_checks() {
        let spec: ImageSpec = "rbd/x".parse().unwrap();
        assert!(check_features(&spec, 0x1d, 0x1d, OpenMode::ReadWrite).is_ok());
        assert!(check_features(&spec, 0x3d, 0x3d, OpenMode::ReadWrite).is_ok());
        let e = check_features(&spec, 0x1d | RBD_FEATURE_JOURNALING, 0, OpenMode::ReadOnly)
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::Unsupported);
        assert!(e.message.contains("journaling"));
        assert!(check_features(&spec, RBD_FEATURE_DATA_POOL, 0, OpenMode::ReadOnly).is_ok());
        assert!(check_features(&spec, 1 << 20, 0, OpenMode::ReadOnly).is_err());
        assert_eq!(
            check_features(&spec, RBD_FEATURE_NON_PRIMARY, 0, OpenMode::ReadWrite)
                .unwrap_err()
                .kind,
            ErrorKind::ReadOnly
        );
        assert!(check_features(&spec, RBD_FEATURE_NON_PRIMARY, 0, OpenMode::ReadOnly).is_ok());
    }

    #[test]
    fn object_map_names() {
        assert_eq!(object_map_oid("10ab", None), "rbd_object_map.10ab");
        assert_eq!(
            object_map_oid("10ab", Some(4)),
            "rbd_object_map.10ab.0000000000000004"
        );
    }
}
