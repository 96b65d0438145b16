//! `diff`: what changed between two versions of an image, like `rbd diff`. Also the
//! per-version maps and extents `du` needs.
//!
//! Two ways, librbd's (src/librbd/api/DiffIterate.cc), chosen as librbd chooses:
//! - `--whole-object` on an image with fast-diff: from the object maps alone, whole
//!   objects, no data object touched.
//! - Otherwise (exact extents, or no fast-diff): from each data object's snap set
//!   (RADOS `list_snaps`: its clones, their sizes and what each shares with the next),
//!   `snapset::snap_set_diff` per object, as librados' calc_snap_set_diff. Only the objects
//!   that exist in some version between the two ends are asked (the maps say which):
//!   a clone or head serves only versions in which its object existed.
//!
//! A version's map is trusted only when the version's flags say it is valid (neither
//! OBJECT_MAP_INVALID nor FAST_DIFF_INVALID) and it decodes to the right size; otherwise
//! it is rebuilt from the store (`ImageStore::list_object_states` at that version, the
//! states librbd would give), which is always right but lists objects. Comparing two
//! versions needs fast-diff (EXISTS_CLEAN says "not written since the snapshot before");
//! without it only a diff from the beginning of time is possible.

use super::table::text_table;
use super::with_image;
use crate::cli::Format;
use crate::error::{Error, ErrorKind, Result};
use crate::image::{load_object_map, rebuild_map, trusted_object_map};
use crate::spec::ImageSpec;
use crate::store::snapset::{object_delta, Ranges, SNAP_HEAD};
use crate::store::{
    ImageHeader, ImageStore, OpenMode, Store, RBD_FEATURE_FAST_DIFF, RBD_FEATURE_OBJECT_MAP,
    RBD_FLAG_FAST_DIFF_INVALID, RBD_FLAG_OBJECT_MAP_INVALID,
};
use objmap::diff::{diff_maps, DiffState};
use objmap::{ObjectMap, ObjectState};
use std::collections::HashMap;
use std::sync::Mutex;

/// What one command has read of each version (by image id and snapshot): its flags,
/// whether its stored map is usable, its map. `du` compares each version with the one
/// before it, so without this each map would be read up to four times.
#[derive(Default)]
pub(super) struct Memo {
    flags: Mutex<HashMap<VersionKey, u64>>,
    usable: Mutex<HashMap<VersionKey, bool>>,
    maps: Mutex<HashMap<VersionKey, ObjectMap>>,
}

type VersionKey = (String, Option<u64>);

fn key<I: ImageStore>(img: &I, v: &Version) -> VersionKey {
    (img.header().id, v.snap)
}

fn memo_get<T: Clone>(m: &Mutex<HashMap<VersionKey, T>>, k: &VersionKey) -> Option<T> {
    m.lock().unwrap_or_else(|p| p.into_inner()).get(k).cloned()
}

fn memo_put<T>(m: &Mutex<HashMap<VersionKey, T>>, k: VersionKey, v: T) {
    m.lock().unwrap_or_else(|p| p.into_inner()).insert(k, v);
}

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
pub(super) async fn version_flags<S: Store>(
    store: &S,
    img: &S::Image,
    spec: &ImageSpec,
    v: &Version,
    memo: &Memo,
) -> Result<u64> {
    let Some(id) = v.snap else {
        return Ok(img.header().flags);
    };
    let k = key(img, v);
    if let Some(f) = memo_get(&memo.flags, &k) {
        return Ok(f);
    }
    let r = match img.snap_flags(id).await {
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
    };
    if let Ok(f) = &r {
        memo_put(&memo.flags, k, *f);
    }
    r
}

/// The object map of version `v` of the image open (at its head) as `img`: the stored
/// one when its flags and contents can be trusted, else rebuilt from the store.
pub(super) async fn version_map<S: Store>(
    store: &S,
    img: &S::Image,
    spec: &ImageSpec,
    v: &Version,
    memo: &Memo,
) -> Result<ObjectMap> {
    let k = key(img, v);
    if let Some(m) = memo_get(&memo.maps, &k) {
        return Ok(m);
    }
    let m = read_version_map(store, img, spec, v, memo).await?;
    memo_put(&memo.maps, k, m.clone());
    Ok(m)
}

async fn read_version_map<S: Store>(
    store: &S,
    img: &S::Image,
    spec: &ImageSpec,
    v: &Version,
    memo: &Memo,
) -> Result<ObjectMap> {
    let h = img.header();
    let at = spec_at(spec, v);
    if h.features & RBD_FEATURE_OBJECT_MAP == 0 {
        return rebuild_map(img, &at, v.size.div_ceil(h.object_size()), v.snap).await;
    }
    let flags = version_flags(store, img, spec, v, memo).await?;
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

/// Whether librbd would answer a whole-object diff of `vs[end]` since `vs[lo]` from the
/// object maps (its object_map::DiffRequest): the image has fast-diff and every map
/// from `lo` to `end` loads, is large enough and is not flagged invalid. Otherwise
/// librbd falls back to the objects' snap sets, and so do we: its answer then differs
/// (a truncated object's tail is "zero", not "data"), and ours must be librbd's.
pub(super) async fn maps_usable<S: Store>(
    store: &S,
    img: &S::Image,
    spec: &ImageSpec,
    vs: &[Version],
    lo: usize,
    end: usize,
    memo: &Memo,
) -> Result<bool> {
    let h = img.header();
    if h.features & RBD_FEATURE_FAST_DIFF == 0 {
        return Ok(false);
    }
    for v in &vs[lo..=end] {
        // Only FAST_DIFF_INVALID, as librbd: a map flagged OBJECT_MAP_INVALID alone is
        // still read (we rebuild it, see `version_map`; the states agree unless the map
        // is wrong, where ours are right).
        let flags = version_flags(store, img, spec, v, memo).await?;
        if flags & RBD_FLAG_FAST_DIFF_INVALID != 0 {
            return Ok(false);
        }
        let k = key(img, v);
        let usable = match memo_get(&memo.usable, &k) {
            Some(u) => u,
            None => {
                let mut at = h.clone();
                at.flags = 0;
                let u = match trusted_object_map(img, &at, v.snap, v.size).await? {
                    Ok(m) => {
                        // Trusted as stored: what version_map would load (its flags
                        // allow it), so keep it for that.
                        if flags & (RBD_FLAG_OBJECT_MAP_INVALID | RBD_FLAG_FAST_DIFF_INVALID) == 0
                            && h.features & RBD_FEATURE_OBJECT_MAP != 0
                        {
                            memo_put(&memo.maps, k.clone(), m);
                        }
                        true
                    }
                    Err(_) => false,
                };
                memo_put(&memo.usable, k, u);
                u
            }
        };
        if !usable {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The per-object diff of versions `vs[from..=end]` (`from` None: since the beginning).
pub(super) async fn diff_versions<S: Store>(
    store: &S,
    img: &S::Image,
    spec: &ImageSpec,
    vs: &[Version],
    from: Option<usize>,
    end: usize,
    memo: &Memo,
) -> Result<Vec<DiffState>> {
    let first = from.unwrap_or(end);
    let mut maps = Vec::with_capacity(end + 1 - first);
    for v in &vs[first..=end] {
        maps.push(version_map(store, img, spec, v, memo).await?);
    }
    Ok(diff_maps(&maps, from.is_some()))
}

/// The extents `(offset, length, exists)` of version `vs[end]` of an image (`img`, any
/// handle of it; `spec` its head) changed since `vs[from]` (None: since the beginning),
/// up to `limit` bytes, from the data objects' snap sets (see the module comment and
/// `snapset::object_delta`): whole objects when `whole`, else the changed ranges inside
/// them. From the beginning, an object that brings nothing shows `under` (its ancestors'
/// data, sorted, merged), as librbd's list-snaps request lists from the parent there.
#[allow(clippy::too_many_arguments)]
pub(super) async fn snapset_extents<S: Store>(
    store: &S,
    img: &S::Image,
    spec: &ImageSpec,
    vs: &[Version],
    from: Option<usize>,
    end: usize,
    limit: u64,
    whole: bool,
    under: &[(u64, u64)],
    memo: &Memo,
) -> Result<Vec<(u64, u64, bool)>> {
    let osize = img.header().object_size();
    let limit = limit.min(vs[end].size);
    let n = limit.div_ceil(osize);
    // The objects that exist in some version between the ends (from the beginning: in
    // any version up to the end).
    let mut touched = vec![false; n as usize];
    for v in &vs[from.unwrap_or(0)..=end] {
        let m = version_map(store, img, spec, v, memo).await?;
        for (o, t) in touched.iter_mut().enumerate().take(m.len() as usize) {
            *t |= m.get(o as u64) != ObjectState::Nonexistent;
        }
    }
    let asked: Vec<u64> = (0..n).filter(|&o| touched[o as usize]).collect();
    let sets: HashMap<u64, _> = img.object_snap_sets(asked).await?.into_iter().collect();
    let from_id = from.and_then(|f| vs[f].snap).unwrap_or(0);
    let end_id = vs[end].snap.unwrap_or(SNAP_HEAD);
    let under = Ranges(under.to_vec());
    let mut out = Vec::new();
    for o in 0..n {
        let off = o * osize;
        let len = osize.min(limit - off);
        let delta = match sets.get(&o) {
            Some(Some(set)) => object_delta(set, from_id, end_id, len, osize, whole),
            _ => Vec::new(),
        };
        if delta.is_empty() {
            if from.is_none() {
                out.extend(
                    under
                        .within(off, len)
                        .into_iter()
                        .map(|(a, l)| (a, l, true)),
                );
            }
        } else {
            out.extend(delta.into_iter().map(|(a, l, d)| (off + a, l, d)));
        }
    }
    Ok(out)
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
/// the overlap, each ancestor's own data first and the holes in it filled from the
/// ancestor above (librbd's recursive parent diff). Each ancestor answers as librbd
/// would: when the child's diff is read from snap sets (`slow`), so are all ancestors'
/// (its list-snaps request asks the parent's list-snaps); else each from its maps in
/// whole objects where they are usable (a DiffIterate of its own), from snap sets
/// from the first one where not. Empty for a non-clone.
async fn ancestors_extents<S: Store>(
    store: &S,
    img: &S::Image,
    whole: bool,
    slow: bool,
    memo: &Memo,
) -> Result<Vec<(u64, u64)>> {
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
        // Nearest first: whether each ancestor answers from snap sets.
        let mut slow_at = Vec::with_capacity(chain.len());
        let mut slow = slow || !whole;
        for (h, p) in &chain {
            if !slow {
                let (vs, end) = parent_version(h, p)?;
                slow = !maps_usable(store, h, &head_of(p), &vs, 0, end, memo).await?;
            }
            slow_at.push(slow);
        }
        let mut under: Vec<(u64, u64)> = Vec::new();
        for ((h, p), slow) in chain.iter().zip(slow_at).rev() {
            let hd = h.header();
            let head = head_of(p);
            let limit = p.overlap.min(hd.size);
            let (vs, end) = parent_version(h, p)?;
            let ext = if slow {
                snapset_extents(store, h, &head, &vs, None, end, limit, whole, &under, memo).await?
            } else {
                let map = version_map(store, h, &head, &vs[end], memo).await?;
                let d = diff_maps(&[map], false);
                clone_extents(&d, hd.object_size(), limit, &under)
            };
            under = merge(ext.into_iter().filter(|e| e.2).map(|(o, l, _)| (o, l)));
        }
        Ok(under)
    }
    .await;
    for (h, _) in chain {
        let _ = h.close().await;
    }
    r
}

/// The head spec of the parent `p` names.
fn head_of(p: &crate::store::ParentInfo) -> ImageSpec {
    ImageSpec {
        snap: None,
        ..p.spec.clone()
    }
}

/// The versions of ancestor `h` (opened at the snapshot `p` names) and the position of
/// that snapshot among them.
fn parent_version<I: ImageStore>(
    h: &I,
    p: &crate::store::ParentInfo,
) -> Result<(Vec<Version>, usize)> {
    let vs = versions(&h.header());
    let end = vs
        .iter()
        .position(|v| v.snap == Some(p.snap_id))
        .ok_or_else(|| {
            Error::new(
                ErrorKind::NotFound,
                format!("the parent snapshot {} (id {}) is gone", p.spec, p.snap_id),
            )
        })?;
    Ok((vs, end))
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
    whole_object: bool,
    format: Format,
) -> Result<()> {
    let head = ImageSpec {
        snap: None,
        ..spec.clone()
    };
    let memo = &Memo::default();
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
        }
        // librbd's choice: maps (whole objects, every map from the start usable; from
        // the beginning, every snapshot's up to the end) or snap sets.
        let slow = !(whole_object
            && maps_usable(store, img, &head, &vs, from.unwrap_or(0), end, memo).await?);
        // From the beginning, a clone's objects it does not hold show its ancestors'
        // data (of the ancestors the end version has), as librbd's DiffIterate reports
        // it (include_parent).
        let under = match (from, vs[end].snap) {
            (Some(_), _) => Vec::new(),
            (None, None) => ancestors_extents(store, img, whole_object, slow, memo).await?,
            (None, Some(_)) => {
                with_image(
                    store,
                    &spec_at(&head, &vs[end]),
                    OpenMode::ReadOnly,
                    async |at: &S::Image| {
                        ancestors_extents(store, at, whole_object, slow, memo).await
                    },
                )
                .await?
            }
        };
        if slow {
            let size = vs[end].size;
            return snapset_extents(
                store,
                img,
                &head,
                &vs,
                from,
                end,
                size,
                whole_object,
                &under,
                memo,
            )
            .await;
        }
        let d = diff_versions(store, img, &head, &vs, from, end, memo).await?;
        Ok(clone_extents(&d, h.object_size(), vs[end].size, &under))
    })
    .await?;
    match format {
        Format::Json => println!("{}", super::json_text(&json_extents(&ext))),
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
