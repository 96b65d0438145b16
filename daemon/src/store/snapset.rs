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

#[cfg(test)]
mod tests {
    use super::*;
    use ObjectState::{Exists, ExistsClean, Nonexistent};

    fn head() -> CloneInfo {
        CloneInfo {
            id: SNAP_HEAD,
            snaps: vec![],
        }
    }
    fn clone(id: u64, snaps: &[u64]) -> CloneInfo {
        CloneInfo {
            id,
            snaps: snaps.to_vec(),
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
}
