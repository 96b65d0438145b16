//! `diff`: the objects changed between two versions of an image, like `rbd diff
//! --whole-object`, from the object maps alone (no data object is read). Also the
//! per-version maps `du` needs.
//!
//! A version's map is trusted only when the version's flags say it is valid (neither
//! OBJECT_MAP_INVALID nor FAST_DIFF_INVALID) and it decodes to the right size; otherwise
//! it is rebuilt from the store (`ImageStore::list_object_states` at that version, the
//! states librbd would give), which is always right but lists objects. Comparing two
//! versions needs fast-diff (EXISTS_CLEAN says "not written since the snapshot before");
//! without it only a diff from the beginning of time is possible.

use super::du::text_table;
use super::with_image;
use crate::cli::Format;
use crate::error::{Error, ErrorKind, Result};
use crate::image::{load_object_map, rebuild_map};
use crate::spec::ImageSpec;
use crate::store::{
    ImageHeader, ImageStore, OpenMode, Store, RBD_FEATURE_FAST_DIFF, RBD_FEATURE_OBJECT_MAP,
    RBD_FLAG_FAST_DIFF_INVALID, RBD_FLAG_OBJECT_MAP_INVALID,
};
use objmap::diff::{diff_maps, DiffState};
use objmap::ObjectMap;

/// One version of an image: a snapshot or the head.
#[derive(Debug, Clone)]
pub(super) struct Version {
    pub snap: Option<u64>,
    pub name: Option<String>,
    pub size: u64,
    /// A user snapshot or the head: what users name and `du` lists. Others (in the
    /// trash) still count as steps of the history a diff goes through.
    pub user: bool,
}

/// The image's versions, oldest first: its snapshots by id, then the head.
pub(super) fn versions(h: &ImageHeader) -> Vec<Version> {
    let mut v: Vec<Version> = h
        .snaps
        .iter()
        .map(|s| Version {
            snap: Some(s.id),
            name: Some(s.name.clone()),
            size: s.size,
            user: s.is_user(),
        })
        .collect();
    v.sort_by_key(|v| v.snap);
    v.push(Version {
        snap: None,
        name: None,
        size: h.size,
        user: true,
    });
    v
}

/// `spec` (the head) at version `v`.
pub(super) fn spec_at(spec: &ImageSpec, v: &Version) -> ImageSpec {
    ImageSpec {
        snap: v.name.clone(),
        ..spec.clone()
    }
}

/// The position of `spec.snap` (the head when None) in `vs`.
pub(super) fn find_version(vs: &[Version], spec: &ImageSpec, snap: Option<&str>) -> Result<usize> {
    match snap {
        None => Ok(vs.len() - 1),
        Some(n) => vs
            .iter()
            .position(|v| v.user && v.name.as_deref() == Some(n))
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::NotFound,
                    format!("snapshot {}@{n} not found", spec),
                )
            }),
    }
}

/// The flags of version `v`: the head's from the header of the head handle `img`; a
/// snapshot's from the store, or from a handle opened at it when the store cannot say.
async fn version_flags<S: Store>(
    store: &S,
    img: &S::Image,
    spec: &ImageSpec,
    v: &Version,
) -> Result<u64> {
    let Some(id) = v.snap else {
        return Ok(img.header().flags);
    };
    match img.snap_flags(id).await {
        Err(e) if e.kind == ErrorKind::Unsupported => {
            with_image(
                store,
                &spec_at(spec, v),
                OpenMode::ReadOnly,
                async |s: &S::Image| Ok(s.header().flags),
            )
            .await
        }
        r => r,
    }
}

/// The object map of version `v` of the image open (at its head) as `img`: the stored
/// one when its flags and contents can be trusted, else rebuilt from the store.
pub(super) async fn version_map<S: Store>(
    store: &S,
    img: &S::Image,
    spec: &ImageSpec,
    v: &Version,
) -> Result<ObjectMap> {
    let h = img.header();
    let at = spec_at(spec, v);
    if h.features & RBD_FEATURE_OBJECT_MAP == 0 {
        return rebuild_map(img, &at, v.size.div_ceil(h.object_size()), v.snap).await;
    }
    let flags = version_flags(store, img, spec, v).await?;
    let mut trust = h.clone();
    // load_object_map rebuilds when OBJECT_MAP_INVALID is set; a diff needs the clean
    // states too, which FAST_DIFF_INVALID disowns.
    trust.flags = if flags & (RBD_FLAG_OBJECT_MAP_INVALID | RBD_FLAG_FAST_DIFF_INVALID) != 0 {
        RBD_FLAG_OBJECT_MAP_INVALID
    } else {
        0
    };
    Ok(load_object_map(img, &at, &trust, v.snap, v.size).await?.0)
}

/// Refuses a comparison of two versions of an image without fast-diff: its maps cannot
/// tell a written object from one unchanged since the snapshot before.
pub(super) fn need_fast_diff(h: &ImageHeader, spec: &ImageSpec, what: &str) -> Result<()> {
    if h.features & RBD_FEATURE_FAST_DIFF == 0 {
        return Err(Error::new(
            ErrorKind::Unsupported,
            format!(
                "{what} of {spec} needs the fast-diff feature: rados-nbd computes it from object maps, which without fast-diff do not say what changed since a snapshot (`rbd {what}` reads the data objects' snapshot sets instead)"
            ),
        ));
    }
    Ok(())
}

/// The per-object diff of versions `vs[from..=end]` (`from` None: since the beginning).
pub(super) async fn diff_versions<S: Store>(
    store: &S,
    img: &S::Image,
    spec: &ImageSpec,
    vs: &[Version],
    from: Option<usize>,
    end: usize,
) -> Result<Vec<DiffState>> {
    let first = from.unwrap_or(end);
    let mut maps = Vec::with_capacity(end + 1 - first);
    for v in &vs[first..=end] {
        maps.push(version_map(store, img, spec, v).await?);
    }
    Ok(diff_maps(&maps, from.is_some()))
}

/// Whole-object extents `(offset, length, exists)` of a diff of an image version of
/// `size` bytes with objects of `object_size`, in object order.
pub(super) fn extents(diff: &[DiffState], object_size: u64, size: u64) -> Vec<(u64, u64, bool)> {
    diff.iter()
        .enumerate()
        .filter_map(|(o, d)| {
            let off = o as u64 * object_size;
            d.listed()
                .map(|exists| (off, object_size.min(size.saturating_sub(off)), exists))
        })
        .collect()
}

/// Like [`extents`], but an object the image does not hold (a hole from the beginning)
/// lists the parts of it that `under` (its ancestors' data, sorted, merged) covers: what
/// librbd reports for a clone ("no data in child object -- report parent diff instead").
pub(super) fn clone_extents(
    diff: &[DiffState],
    object_size: u64,
    size: u64,
    under: &[(u64, u64)],
) -> Vec<(u64, u64, bool)> {
    if under.is_empty() {
        return extents(diff, object_size, size);
    }
    let mut out = Vec::new();
    for (o, d) in diff.iter().enumerate() {
        let off = o as u64 * object_size;
        let end = (off + object_size).min(size);
        if off >= end {
            break;
        }
        match (d, d.listed()) {
            (_, Some(exists)) => out.push((off, end - off, exists)),
            (DiffState::Hole, None) => {
                for &(u, l) in under {
                    let (a, b) = (u.max(off), (u + l).min(end));
                    if a < b {
                        out.push((a, b - a, true));
                    }
                }
            }
            _ => {}
        }
    }
    out
}

/// The data of the ancestors of `img` as its reads see them: sorted, merged extents below
/// the overlap, each ancestor's own objects first and the holes in them filled from the
/// ancestor above (librbd's recursive parent diff, whole objects). Empty for a non-clone.
async fn ancestors_extents<S: Store>(store: &S, img: &S::Image) -> Result<Vec<(u64, u64)>> {
    // The chain, nearest first: each ancestor's handle (at its snapshot), the spec it
    // was opened as and the overlap its child sees of it.
    let mut chain: Vec<(S::Image, crate::store::ParentInfo)> = Vec::new();
    let mut info = img.header().parent;
    let mut opened = img.open_parent().await;
    let r = async {
        while let Some(p) = info.take() {
            let Some(h) = opened? else { break };
            info = h.header().parent;
            opened = h.open_parent().await;
            chain.push((h, p));
            if chain.len() > crate::image::MAX_CHAIN_DEPTH {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    format!(
                        "the clone chain of image id {} is deeper than {} images",
                        img.header().id,
                        crate::image::MAX_CHAIN_DEPTH
                    ),
                ));
            }
        }
        let mut under: Vec<(u64, u64)> = Vec::new();
        for (h, p) in chain.iter().rev() {
            let hd = h.header();
            let v = Version {
                snap: Some(p.snap_id),
                name: p.spec.snap.clone(),
                size: hd.size,
                user: true,
            };
            let head = ImageSpec {
                snap: None,
                ..p.spec.clone()
            };
            let map = version_map(store, h, &head, &v).await?;
            let d = diff_maps(&[map], false);
            let limit = p.overlap.min(hd.size);
            under = merge(
                clone_extents(&d, hd.object_size(), limit, &under)
                    .into_iter()
                    .filter(|e| e.2)
                    .map(|(o, l, _)| (o, l)),
            );
        }
        Ok(under)
    }
    .await;
    for (h, _) in chain {
        let _ = h.close().await;
    }
    r
}

/// Sorted extents with touching ones joined.
fn merge(ext: impl Iterator<Item = (u64, u64)>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (o, l) in ext {
        match out.last_mut() {
            Some((lo, ll)) if *lo + *ll == o => *ll += l,
            _ => out.push((o, l)),
        }
    }
    out
}

/// `rbd diff --format json`'s array, keys in rbd's order (offset, length, exists) and
/// `exists` a string, as rbd prints them.
fn json_extents(ext: &[(u64, u64, bool)]) -> String {
    let items: Vec<String> = ext
        .iter()
        .map(|(o, l, e)| format!(r#"{{"offset":{o},"length":{l},"exists":"{e}"}}"#))
        .collect();
    format!("[{}]", items.join(","))
}

pub async fn diff<S: Store>(
    store: &S,
    spec: &ImageSpec,
    from_snap: Option<&str>,
    format: Format,
) -> Result<()> {
    let head = ImageSpec {
        snap: None,
        ..spec.clone()
    };
    let ext = with_image(store, &head, OpenMode::ReadOnly, async |img: &S::Image| {
        let h = img.header();
        let vs = versions(&h);
        let end = find_version(&vs, &head, spec.snap.as_deref())?;
        let from = match from_snap {
            None => None,
            Some(f) => Some(find_version(&vs, &head, Some(f))?),
        };
        if let Some(f) = from {
            if f > end {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    format!(
                        "--from-snap {f_name} is newer than {spec}",
                        f_name = from_snap.unwrap_or_default()
                    ),
                ));
            }
            if f == end {
                return Ok(Vec::new());
            }
            need_fast_diff(&h, spec, "diff --from-snap")?;
        }
        let d = diff_versions(store, img, &head, &vs, from, end).await?;
        // From the beginning, a clone's objects it does not hold show its ancestors' data,
        // as librbd's DiffIterate reports it (with fast-diff: include_parent).
        let under = match (from, h.features & RBD_FEATURE_FAST_DIFF != 0) {
            (None, true) if vs[end].snap.is_none() => ancestors_extents(store, img).await?,
            (None, true) => {
                with_image(
                    store,
                    &spec_at(&head, &vs[end]),
                    OpenMode::ReadOnly,
                    async |at: &S::Image| ancestors_extents(store, at).await,
                )
                .await?
            }
            _ => Vec::new(),
        };
        Ok(clone_extents(&d, h.object_size(), vs[end].size, &under))
    })
    .await?;
    match format {
        Format::Json => println!("{}", json_extents(&ext)),
        Format::Plain => {
            let rows: Vec<Vec<String>> = ext
                .iter()
                .map(|&(o, l, e)| {
                    vec![
                        o.to_string(),
                        l.to_string(),
                        if e { "data" } else { "zero" }.to_string(),
                    ]
                })
                .collect();
            print!(
                "{}",
                text_table(
                    &[("Offset", false), ("Length", false), ("Type", false)],
                    &rows
                )
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_is_rbds_byte_for_byte() {
        // `rbd diff --whole-object --format json` of a 20 MiB image (16.2.15).
        assert_eq!(
            json_extents(&[(0, 4194304, true), (12582912, 4194304, false)]),
            r#"[{"offset":0,"length":4194304,"exists":"true"},{"offset":12582912,"length":4194304,"exists":"false"}]"#
        );
        assert_eq!(json_extents(&[]), "[]");
    }

    #[test]
    fn a_clones_holes_show_the_ancestors_data_cut_to_its_objects() {
        use DiffState::*;
        // 1 KiB objects over ancestors' data [500, 2600) and [3000, 3100).
        let d = [Hole, DataUpdated, Hole, Hole, Hole];
        assert_eq!(
            clone_extents(&d, 1024, 4500, &[(500, 2100), (3000, 100)]),
            [
                (500, 524, true),
                (1024, 1024, true),
                (2048, 552, true),
                (3000, 72, true),
                (3072, 28, true)
            ]
        );
        assert_eq!(
            merge([(0, 4), (4, 4), (9, 1)].into_iter()),
            [(0, 8), (9, 1)]
        );
    }

    #[test]
    fn extents_are_whole_objects_cut_at_the_versions_end() {
        use DiffState::*;
        let d = [DataUpdated, Hole, HoleUpdated, Data, DataUpdated];
        assert_eq!(
            extents(&d, 4096, 4 * 4096 + 100),
            [(0, 4096, true), (8192, 4096, false), (16384, 100, true)]
        );
    }
}
