//! The object map state of one data object, computed from its snapshot set the way librbd
//! does when it rebuilds or checks a map (`C_VerifyObjectCallback::get_object_state` in
//! src/librbd/operation/ObjectMapIterate.cc).
//!
//! Why it matters: with fast-diff, an object not written since the image's newest snapshot
//! is EXISTS_CLEAN in the head's map, and `rbd diff --from-snap` / `rbd export-diff` skip
//! it. A rebuilt map that says EXISTS for every object makes `rbd object-map check` flag
//! the map and every diff include the whole image.
//!
//! Store-neutral: the Ceph store fills a [`SnapSet`] from librados' `list_snaps`; a store
//! with its own snapshots describes its objects the same way.

use objmap::ObjectState;

/// librados' SNAP_HEAD (= CEPH_NOSNAP): the head "clone" of a snap set, and the snapshot id
/// of the head when computing its map.
pub const SNAP_HEAD: u64 = u64::MAX - 1;

/// One version of an object: a clone kept for snapshots, or the head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloneInfo {
    /// The snapshot id the clone was made for, or [`SNAP_HEAD`].
    pub id: u64,
    /// The snapshots this clone is the content of, ascending (empty for the head).
    pub snaps: Vec<u64>,
    /// The object's size in this version.
    pub size: u64,
    /// The ranges `(offset, length)` this version shares with the next newer one (not
    /// written in between), ascending; RADOS's clone_overlap. Empty for the head.
    pub overlap: Vec<(u64, u64)>,
}

/// What librados' `list_snaps` says of an object.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SnapSet {
    /// The newest snapshot id in the snapshot context of the object's last write.
    pub seq: u64,
    /// Oldest first, the head (if it exists) last.
    pub clones: Vec<CloneInfo>,
}

/// The state of the object described by `set` in the map of snapshot `at` ([`SNAP_HEAD`]
/// for the head's map). `image_snaps`: ids of the image's snapshots, ascending (librbd's
/// `snap_info` keys; a deleted snapshot is no longer among them). `fast_diff`: whether the
/// image has the fast-diff feature (without it there is no EXISTS_CLEAN).
///
/// A version of the object covers the snapshots from `from` to `to`: a clone from the
/// first image snapshot at or after its oldest snapshot to its newest; the head from the
/// first image snapshot taken after its last write (`seq + 1`) on, or only the head itself
/// when no snapshot was taken since. The version covering `at` decides: EXISTS when `at`
/// is where it starts (written in that interval), EXISTS_CLEAN when it started earlier.
pub fn object_state(set: &SnapSet, at: u64, image_snaps: &[u64], fast_diff: bool) -> ObjectState {
    for c in &set.clones {
        let (from, to) = if c.id == SNAP_HEAD {
            (
                next_valid_snap_id(image_snaps, set.seq.saturating_add(1)),
                SNAP_HEAD,
            )
        } else {
            // librbd indexes snaps[0] unchecked; a clone in no snapshot covers none.
            let (Some(&first), Some(&last)) = (c.snaps.first(), c.snaps.last()) else {
                continue;
            };
            (next_valid_snap_id(image_snaps, first), last)
        };
        if to < at {
            continue;
        }
        if at < from {
            break;
        }
        return if fast_diff && from != at {
            ObjectState::ExistsClean
        } else {
            ObjectState::Exists
        };
    }
    ObjectState::Nonexistent
}

/// The first of the image's snapshots with an id `>= id`, else [`SNAP_HEAD`] (librbd:
/// `snap_info.lower_bound(id)`, CEPH_NOSNAP past the end).
fn next_valid_snap_id(image_snaps: &[u64], id: u64) -> u64 {
    let i = image_snaps.partition_point(|&s| s < id);
    image_snaps.get(i).copied().unwrap_or(SNAP_HEAD)
}

/// What changed in one object between two snapshots, from its snap set
/// ([`snap_set_diff`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ObjectDiff {
    /// Changed byte ranges inside the object, ascending and disjoint.
    pub changed: Vec<(u64, u64)>,
    /// Whether the object exists at the end snapshot.
    pub end_exists: bool,
    /// Its size there (0 when it does not exist).
    pub end_size: u64,
    /// The snap set cannot say (a clone in no snapshot): the whole object counts as
    /// changed.
    pub whole_object: bool,
}

/// The byte ranges of the object described by `set` that differ between snapshot
/// `start` (0: the beginning of time) and snapshot `end` ([`SNAP_HEAD`] for the head),
/// as librados' `calc_snap_set_diff` (src/librados/snap_set_diff.cc, which `rbd diff`
/// without --whole-object and `rbd du --exact` use) computes them: each version from the
/// one at `start` to the one at `end` adds what it did not share with the next (up to
/// the larger of their sizes, less its overlap). An object absent at `end` lists what
/// it had at `start` (nothing when it was created after `start`), as "zero".
pub fn snap_set_diff(set: &SnapSet, start: u64, end: u64) -> ObjectDiff {
    let mut out = ObjectDiff::default();
    let mut diff = Ranges::default();
    let mut saw_start = false;
    let mut start_size = 0;
    let mut i = 0;
    while i < set.clones.len() {
        let c = &set.clones[i];
        // The snapshots the version covers; the head counts from just after `seq`.
        let (a, b) = if c.id == SNAP_HEAD {
            (set.seq.saturating_add(1), SNAP_HEAD)
        } else {
            let (Some(&a), Some(&b)) = (c.snaps.first(), c.snaps.last()) else {
                return ObjectDiff {
                    whole_object: true,
                    ..ObjectDiff::default()
                };
            };
            (a, b)
        };
        if b < start {
            i += 1;
            continue;
        }
        if !saw_start {
            if start < a {
                // Not there at `start`: all of it is new.
                diff.insert(0, c.size);
                start_size = 0;
            } else {
                start_size = c.size;
            }
            saw_start = true;
        }
        if end < a {
            break;
        }
        if end <= b {
            out.end_exists = true;
            out.end_size = c.size;
            out.changed = diff.0;
            return out;
        }
        // What this version did not share with the next: up to the larger of the two
        // sizes (Ceph 16 -- later releases stop at the start's size after a shrink;
        // `rbd diff` 16.2.11 lists [new size, old size) of a truncated object as data).
        let prev_size = c.size;
        i += 1;
        if let Some(n) = set.clones.get(i) {
            let mut to_next = Ranges::default();
            to_next.insert(0, n.size.max(prev_size));
            for &(o, l) in &c.overlap {
                to_next.erase(o, l);
            }
            diff.union(&to_next);
        }
    }
    // Ran out of versions before `end` (or `end` is before the next one): the object is
    // gone at `end`, with what it had at `start`.
    diff = Ranges::default();
    diff.insert(0, start_size);
    out.changed = diff.0;
    out
}

/// What `rbd diff` lists for one object between snapshots `from` (0: the beginning) and
/// `end` ([`SNAP_HEAD`]: the head): `(offset, length, data)` inside `[0, len)` (the part of
/// the object inside the image), ascending, adjacent ranges of one kind joined; "data"
/// ranges hold what the object has at `end`, the others read as zeros. Empty when the
/// object brings nothing, which for a diff from the beginning of a clone means that
/// its parent's data shows there. `whole`: a changed object counts whole
/// (--whole-object without usable object maps).
///
/// librbd's list-snaps request (ObjectListSnapsRequest::handle_list_snaps with the snap
/// ids {from, end}) over [`snap_set_diff`]: the changed ranges, data where the object
/// exists at `end`; where it shrank since `from` (a truncate), what lies past its new
/// size is zeros instead.
pub fn object_delta(
    set: &SnapSet,
    from: u64,
    end: u64,
    len: u64,
    object_size: u64,
    whole: bool,
) -> Vec<(u64, u64, bool)> {
    let mut whole_range = Ranges::default();
    whole_range.insert(0, object_size);
    let prev_end_size = if from > 0 {
        let d = snap_set_diff(set, 0, from);
        if d.whole_object {
            object_size
        } else {
            d.end_size
        }
    } else {
        0
    };
    let d = snap_set_diff(set, from, end);
    let (diff, exists, end_size) = if d.whole_object {
        (whole_range, true, object_size)
    } else if whole && !d.changed.is_empty() {
        (whole_range, d.end_exists, d.end_size)
    } else {
        (Ranges(d.changed), d.end_exists, d.end_size)
    };
    let mut changed = Ranges(diff.within(0, len));
    let mut zero = Ranges::default();
    if end_size < prev_end_size {
        for (o, l) in Ranges(vec![(end_size, prev_end_size - end_size)]).within(0, len) {
            zero.insert(o, l);
            changed.erase(o, l);
        }
    }
    if !exists {
        zero.union(&changed);
        changed = Ranges::default();
    }
    let mut out: Vec<(u64, u64, bool)> = changed
        .0
        .into_iter()
        .map(|(o, l)| (o, l, true))
        .chain(zero.0.into_iter().map(|(o, l)| (o, l, false)))
        .collect();
    out.sort_unstable();
    out
}

/// Disjoint, ascending, non-touching `(offset, length)` ranges (Ceph's interval_set).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ranges(pub Vec<(u64, u64)>);

impl Ranges {
    /// Adds `[off, off + len)`, joining what it touches.
    pub fn insert(&mut self, off: u64, len: u64) {
        if len == 0 {
            return;
        }
        let (mut s, mut e) = (off, off + len);
        let mut out = Vec::with_capacity(self.0.len() + 1);
        let mut placed = false;
        for &(o, l) in &self.0 {
            let (ro, re) = (o, o + l);
            if re < s {
                out.push((o, l));
            } else if e < ro {
                if !placed {
                    out.push((s, e - s));
                    placed = true;
                }
                out.push((o, l));
            } else {
                s = s.min(ro);
                e = e.max(re);
            }
        }
        if !placed {
            out.push((s, e - s));
        }
        self.0 = out;
    }

    /// Removes `[off, off + len)` (what of it is there).
    pub fn erase(&mut self, off: u64, len: u64) {
        let (s, e) = (off, off.saturating_add(len));
        let mut out = Vec::with_capacity(self.0.len() + 1);
        for &(o, l) in &self.0 {
            let (ro, re) = (o, o + l);
            if re <= s || e <= ro {
                out.push((o, l));
                continue;
            }
            if ro < s {
                out.push((ro, s - ro));
            }
            if e < re {
                out.push((e, re - e));
            }
        }
        self.0 = out;
    }

    pub fn union(&mut self, other: &Ranges) {
        for &(o, l) in &other.0 {
            self.insert(o, l);
        }
    }

    /// The parts inside `[off, off + len)`.
    pub fn within(&self, off: u64, len: u64) -> Vec<(u64, u64)> {
        let end = off.saturating_add(len);
        self.0
            .iter()
            .filter_map(|&(o, l)| {
                let (a, b) = (o.max(off), (o + l).min(end));
                (a < b).then(|| (a, b - a))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ObjectState::{Exists, ExistsClean, Nonexistent};

    fn head() -> CloneInfo {
        CloneInfo {
            id: SNAP_HEAD,
            snaps: vec![],
            size: 0,
            overlap: vec![],
        }
    }
    fn clone(id: u64, snaps: &[u64]) -> CloneInfo {
        CloneInfo {
            id,
            snaps: snaps.to_vec(),
            size: 0,
            overlap: vec![],
        }
    }
    fn set(seq: u64, clones: Vec<CloneInfo>) -> SnapSet {
        SnapSet { seq, clones }
    }
    fn at_head(s: &SnapSet, snaps: &[u64]) -> ObjectState {
        object_state(s, SNAP_HEAD, snaps, true)
    }

    #[test]
    fn without_snapshots_every_object_is_exists() {
        assert_eq!(at_head(&set(0, vec![head()]), &[]), Exists);
        // A seq left over from a deleted snapshot changes nothing.
        assert_eq!(at_head(&set(9, vec![head()]), &[]), Exists);
        assert_eq!(at_head(&set(0, vec![]), &[]), Nonexistent);
    }

    #[test]
    fn head_map_with_snapshots() {
        let snaps = [4, 7];
        // Written before snapshot 4 and never since: clean.
        assert_eq!(at_head(&set(0, vec![head()]), &snaps), ExistsClean);
        // Written between 4 and 7 (seq 4, a clone for 4): clean, 7 came after.
        let s = set(4, vec![clone(4, &[4]), head()]);
        assert_eq!(at_head(&s, &snaps), ExistsClean);
        // Written after the newest snapshot (seq 7, a clone for 7): dirty.
        let s = set(7, vec![clone(4, &[4]), clone(7, &[7]), head()]);
        assert_eq!(at_head(&s, &snaps), Exists);
        // Created after the newest snapshot: only a head, seq 7.
        assert_eq!(at_head(&set(7, vec![head()]), &snaps), Exists);
        // Removed from the head after snapshot 7: only clones remain (a whiteout head
        // is still listed by a pool listing, so this case does occur).
        let s = set(7, vec![clone(4, &[4, 7])]);
        assert_eq!(at_head(&s, &snaps), Nonexistent);
        // Without fast-diff there is no clean state.
        assert_eq!(
            object_state(&set(0, vec![head()]), SNAP_HEAD, &snaps, false),
            Exists
        );
    }

    #[test]
    fn deleted_snapshots_are_skipped() {
        // Written after snapshot 5, which was then deleted; 4 remains: the write came
        // after every remaining snapshot, so the object is dirty.
        assert_eq!(at_head(&set(5, vec![head()]), &[4]), Exists);
        // Written after 3 (deleted); 6 was taken after the write: clean.
        assert_eq!(at_head(&set(3, vec![head()]), &[4, 6]), ExistsClean);
        // The head's seq names a deleted snapshot and a newer one exists: clean.
        assert_eq!(at_head(&set(5, vec![head()]), &[4, 8]), ExistsClean);
    }

    #[test]
    fn snapshot_maps() {
        let snaps = [4, 7, 9];
        // Written before 4, then overwritten after 9: clone 4 serves 4, 7 and 9.
        let s = set(9, vec![clone(4, &[4, 7, 9]), head()]);
        assert_eq!(object_state(&s, 4, &snaps, true), Exists);
        assert_eq!(object_state(&s, 7, &snaps, true), ExistsClean);
        assert_eq!(object_state(&s, 9, &snaps, true), ExistsClean);
        assert_eq!(object_state(&s, SNAP_HEAD, &snaps, true), Exists);
        // Created between 4 and 7, never written again.
        let s = set(4, vec![head()]);
        assert_eq!(object_state(&s, 4, &snaps, true), Nonexistent);
        assert_eq!(object_state(&s, 7, &snaps, true), Exists);
        assert_eq!(object_state(&s, 9, &snaps, true), ExistsClean);
        assert_eq!(object_state(&s, SNAP_HEAD, &snaps, true), ExistsClean);
        // Created between 4 and 7, rewritten between 7 and 9, removed after 9.
        let s = set(9, vec![clone(7, &[7]), clone(9, &[9])]);
        assert_eq!(object_state(&s, 4, &snaps, true), Nonexistent);
        assert_eq!(object_state(&s, 7, &snaps, true), Exists);
        assert_eq!(object_state(&s, 9, &snaps, true), Exists);
        assert_eq!(object_state(&s, SNAP_HEAD, &snaps, true), Nonexistent);
        // A clone's oldest snapshot was deleted (its snaps still name it until trimmed):
        // the clone starts at the next remaining snapshot.
        let s = set(9, vec![clone(5, &[5, 7]), head()]);
        assert_eq!(object_state(&s, 7, &snaps, true), Exists);
        // A clone in no snapshot any more covers nothing.
        let s = set(9, vec![clone(5, &[]), head()]);
        assert_eq!(object_state(&s, 7, &snaps, true), Nonexistent);
        assert_eq!(object_state(&s, SNAP_HEAD, &snaps, true), Exists);
    }

    fn sized(mut c: CloneInfo, size: u64, overlap: &[(u64, u64)]) -> CloneInfo {
        c.size = size;
        c.overlap = overlap.to_vec();
        c
    }
    fn diff(changed: &[(u64, u64)], end_exists: bool) -> ObjectDiff {
        ObjectDiff {
            changed: changed.to_vec(),
            end_exists,
            end_size: 0,
            whole_object: false,
        }
    }
    /// `snap_set_diff` without the end size (checked on its own).
    fn sdiff(s: &SnapSet, start: u64, end: u64) -> ObjectDiff {
        ObjectDiff {
            end_size: 0,
            ..snap_set_diff(s, start, end)
        }
    }

    #[test]
    fn snap_set_diff_of_an_object_without_snapshots() {
        // Written once up to 8 KiB: from the beginning, all of it.
        let s = set(0, vec![sized(head(), 8192, &[])]);
        assert_eq!(sdiff(&s, 0, SNAP_HEAD), diff(&[(0, 8192)], true));
        // A head of size 0 (truncated): exists, nothing changed.
        let s = set(0, vec![sized(head(), 0, &[])]);
        assert_eq!(sdiff(&s, 0, SNAP_HEAD), diff(&[], true));
        // No versions at all.
        assert_eq!(sdiff(&set(0, vec![]), 0, SNAP_HEAD), diff(&[], false));
    }

    #[test]
    fn snap_set_diff_across_snapshots() {
        // Written (16 KiB) before snapshot 4; after it 4 KiB at 8 KiB rewritten and the
        // object grown to 20 KiB: the clone for 4 shares [0, 8K) and [12K, 16K).
        let s = set(
            4,
            vec![
                sized(clone(4, &[4]), 16384, &[(0, 8192), (12288, 4096)]),
                sized(head(), 20480, &[]),
            ],
        );
        // 4 -> head: the rewritten block and the growth.
        assert_eq!(
            sdiff(&s, 4, SNAP_HEAD),
            diff(&[(8192, 4096), (16384, 4096)], true)
        );
        // Beginning -> 4: the clone's size; beginning -> head: the head's size and the
        // ranges the clone did not share.
        assert_eq!(sdiff(&s, 0, 4), diff(&[(0, 16384)], true));
        assert_eq!(sdiff(&s, 0, SNAP_HEAD), diff(&[(0, 20480)], true));
        // Nothing between 4 and a later snapshot 6 taken before the write? seq 4 says
        // the head starts at 5: 4 -> 6 crosses the write.
        assert_eq!(sdiff(&s, 4, 6), diff(&[(8192, 4096), (16384, 4096)], true));
        // Unchanged since 4 (no clone; the head written before 4): nothing.
        let s = set(0, vec![sized(head(), 4096, &[])]);
        assert_eq!(sdiff(&s, 4, SNAP_HEAD), diff(&[], true));
    }

    #[test]
    fn snap_set_diff_of_removed_and_created_objects() {
        // 8 KiB before 4, removed after it: 4 -> head lists what 4 had, gone.
        let s = set(4, vec![sized(clone(4, &[4]), 8192, &[])]);
        assert_eq!(sdiff(&s, 4, SNAP_HEAD), diff(&[(0, 8192)], false));
        // Created after 4: absent at 4, so 0 -> 4 lists nothing.
        let s = set(4, vec![sized(head(), 4096, &[])]);
        assert_eq!(sdiff(&s, 0, 4), diff(&[], false));
        assert_eq!(sdiff(&s, 4, SNAP_HEAD), diff(&[(0, 4096)], true));
        // Created after 4, kept for 7, removed after 7: 4 -> head runs out of versions:
        // nothing was there at 4, nothing is at the head (`rbd diff` 16.2.11 agrees).
        let s = set(7, vec![sized(clone(7, &[7]), 4096, &[])]);
        assert_eq!(sdiff(&s, 4, SNAP_HEAD), diff(&[], false));
        assert_eq!(sdiff(&s, 0, 7), diff(&[(0, 4096)], true));
        // 16 KiB at 4, truncated to 4 KiB after 4 and then written at [8K, 12K): from 4,
        // what changed lies below 16 KiB; from the beginning too (Ceph 16 keeps the
        // truncated [12K, 16K) of the clone).
        let s = set(
            4,
            vec![
                sized(clone(4, &[4]), 16384, &[(0, 4096)]),
                sized(head(), 12288, &[]),
            ],
        );
        assert_eq!(sdiff(&s, 4, SNAP_HEAD), diff(&[(4096, 12288)], true));
        assert_eq!(sdiff(&s, 0, SNAP_HEAD), diff(&[(0, 16384)], true));
        // A clone in no snapshot: the whole object.
        let s = set(
            7,
            vec![sized(clone(5, &[]), 4096, &[]), sized(head(), 4096, &[])],
        );
        assert!(sdiff(&s, 0, SNAP_HEAD).whole_object);
    }

    #[test]
    fn end_sizes() {
        let s = set(
            4,
            vec![
                sized(clone(4, &[4]), 16384, &[(0, 4096)]),
                sized(head(), 12288, &[]),
            ],
        );
        assert_eq!(snap_set_diff(&s, 0, 4).end_size, 16384);
        assert_eq!(snap_set_diff(&s, 4, SNAP_HEAD).end_size, 12288);
        assert_eq!(snap_set_diff(&s, 0, 3).end_size, 0);
    }

    #[test]
    fn object_deltas() {
        const OS: u64 = 1 << 20;
        // 16 KiB at 4, truncated to 4 KiB after it, then [8K, 12K) written: from 4 the
        // bytes up to 12 KiB are data, [12K, 16K) (past the new size) zeros.
        let s = set(
            4,
            vec![
                sized(clone(4, &[4]), 16384, &[(0, 4096)]),
                sized(head(), 12288, &[]),
            ],
        );
        assert_eq!(
            object_delta(&s, 4, SNAP_HEAD, OS, OS, false),
            [(4096, 8192, true), (12288, 4096, false)]
        );
        // Whole objects: what is not past the new size.
        assert_eq!(
            object_delta(&s, 4, SNAP_HEAD, OS, OS, true),
            [
                (0, 12288, true),
                (12288, 4096, false),
                (16384, OS - 16384, true)
            ]
        );
        // Cut to the part of the object inside the image.
        assert_eq!(
            object_delta(&s, 4, SNAP_HEAD, 6000, OS, false),
            [(4096, 1904, true)]
        );
        // From the beginning: the clone's truncated bytes too, as data (Ceph 16).
        assert_eq!(
            object_delta(&s, 0, SNAP_HEAD, OS, OS, false),
            [(0, 16384, true)]
        );
        // Removed after 4: what 4 had reads as zeros.
        let s = set(4, vec![sized(clone(4, &[4]), 8192, &[])]);
        assert_eq!(
            object_delta(&s, 4, SNAP_HEAD, OS, OS, false),
            [(0, 8192, false)]
        );
        // Unchanged: nothing.
        let s = set(0, vec![sized(head(), 8192, &[])]);
        assert_eq!(object_delta(&s, 4, SNAP_HEAD, OS, OS, false), []);
        // A clone in no snapshot: the whole object, as data.
        let s = set(
            7,
            vec![sized(clone(5, &[]), 4096, &[]), sized(head(), 4096, &[])],
        );
        assert_eq!(
            object_delta(&s, 0, SNAP_HEAD, OS, OS, false),
            [(0, OS, true)]
        );
    }

    #[test]
    fn ranges_insert_erase_within() {
        let mut r = Ranges::default();
        r.insert(10, 5);
        r.insert(0, 5);
        r.insert(5, 5); // touches both: one range
        assert_eq!(r.0, [(0, 15)]);
        r.insert(20, 5);
        r.erase(3, 19); // [3, 22)
        assert_eq!(r.0, [(0, 3), (22, 3)]);
        assert_eq!(r.within(2, 21), [(2, 1), (22, 1)]);
        r.insert(0, 0);
        assert_eq!(r.0, [(0, 3), (22, 3)]);
    }
}
