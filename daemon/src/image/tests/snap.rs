//! Snapshots on a memory image: the object-map steps librbd takes around them.

use super::*;
use crate::store::DEFAULT_FEATURES;
use objmap::ObjectMap;
use ObjectState::{Exists, ExistsClean, Nonexistent};

async fn writable_mem(size: u64) -> (Image<MemImage>, MemImage) {
    let mem = MemImage::new(size, DEFAULT_FEATURES).audited();
    let img = Image::from_store_image(mem.clone(), &spec("vm1"), &OpenOptions::default())
        .await
        .unwrap();
    (img, mem)
}

fn states(m: &ObjectMap) -> Vec<ObjectState> {
    m.to_vec()
}

#[test]
fn map_steps_are_cls_rbds() {
    // object_map_snap_add: EXISTS → EXISTS_CLEAN, nothing else.
    let m = ObjectMap::from_states([Exists, Nonexistent, ExistsClean, Exists]);
    assert!(mark_clean_after_snapshot(&m));
    assert_eq!(
        states(&m),
        [ExistsClean, Nonexistent, ExistsClean, ExistsClean]
    );
    assert!(
        !mark_clean_after_snapshot(&m),
        "a second time changes nothing"
    );
    // object_map_snap_remove: clean where the removed map had EXISTS (or did not
    // reach) becomes EXISTS; clean where it had EXISTS_CLEAN or nothing stays clean.
    let removed = ObjectMap::from_states([Exists, ExistsClean, Nonexistent, Exists]);
    let next = ObjectMap::from_states([ExistsClean, ExistsClean, ExistsClean, Exists, ExistsClean]);
    assert!(merge_removed_snapshot(Some(&removed), &next));
    assert_eq!(
        states(&next),
        [Exists, ExistsClean, ExistsClean, Exists, Exists]
    );
    // A removed map nobody may trust: every clean entry becomes EXISTS.
    let next = ObjectMap::from_states([ExistsClean, Nonexistent]);
    assert!(merge_removed_snapshot(None, &next));
    assert_eq!(states(&next), [Exists, Nonexistent]);
}

#[tokio::test]
async fn create_keeps_the_map_and_cleans_the_head() {
    let (img, mem) = writable_mem(16 << 20).await;
    img.write(0, Bytes::from_static(b"one"), false)
        .await
        .unwrap();
    img.write(2 * OBJ, Bytes::from_static(b"two"), false)
        .await
        .unwrap();
    assert!(mem.flagged_invalid(), "dirty while written");
    mem.take_log();
    let id = img.snap_create("s1").await.unwrap();
    let log = mem.take_log();
    // The head's map was saved with the flag cleared before the snapshot was taken, so
    // the snapshot's copy of the flags says its map is valid.
    let at = |s: &str| log.iter().position(|l| l == s).unwrap();
    assert!(at("write_object_map") < at("snap_create(s1)"), "{log:?}");
    assert_eq!(mem.snapshot_flags(id), 0);
    assert_eq!(
        states(&mem.stored_snap_map(id)),
        [Exists, Nonexistent, Exists, Nonexistent]
    );
    // Fast-diff: the head's objects are unchanged since the snapshot, on disk and in
    // memory, with the flag clear again.
    assert_eq!(
        states(&mem.stored_map()),
        [ExistsClean, Nonexistent, ExistsClean, Nonexistent]
    );
    assert_eq!(
        states(&img.object_map().unwrap()),
        states(&mem.stored_map())
    );
    assert!(!mem.flagged_invalid());
    // A write after it: EXISTS again (under the flag), and the snapshot keeps the old data.
    img.write(0, Bytes::from_static(b"ONE"), false)
        .await
        .unwrap();
    assert!(mem.flagged_invalid());
    assert_eq!(img.object_map().unwrap().get(0), Exists);
    let at_snap = mem.read(0, 0, 3, Some(id)).await.unwrap().unwrap();
    assert_eq!(&at_snap[..], b"one");
    // Names are unique.
    let e = img.snap_create("s1").await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::AlreadyExists, "{e}");
    img.close().await.unwrap();
}

#[tokio::test]
async fn remove_gives_the_next_map_back_its_changes() {
    let (img, mem) = writable_mem(16 << 20).await;
    img.write(0, Bytes::from_static(b"a"), false).await.unwrap();
    img.snap_create("s1").await.unwrap();
    img.write(OBJ, Bytes::from_static(b"b"), false)
        .await
        .unwrap();
    let s2 = img.snap_create("s2").await.unwrap();
    img.write(2 * OBJ, Bytes::from_static(b"c"), false)
        .await
        .unwrap();
    // s2 says object 0 unchanged since s1, object 1 new.
    assert_eq!(
        states(&mem.stored_snap_map(s2)),
        [ExistsClean, Exists, Nonexistent, Nonexistent]
    );
    // Removing s1: s2's object 0 was unchanged relative to s1 only; s1 had it as
    // EXISTS, so it becomes EXISTS in s2.
    img.snap_remove("s1").await.unwrap();
    assert_eq!(
        states(&mem.stored_snap_map(s2)),
        [Exists, Exists, Nonexistent, Nonexistent]
    );
    assert!(img.find_snap("s1").is_err());
    // Removing s2 (the newest): the head's clean objects 0 and 1 become EXISTS, stored
    // with the flag clear.
    assert_eq!(
        states(&img.object_map().unwrap()),
        [ExistsClean, ExistsClean, Exists, Nonexistent]
    );
    img.snap_remove("s2").await.unwrap();
    assert_eq!(
        states(&img.object_map().unwrap()),
        [Exists, Exists, Exists, Nonexistent]
    );
    assert_eq!(
        states(&mem.stored_map()),
        states(&img.object_map().unwrap())
    );
    assert!(!mem.flagged_invalid());
    img.close().await.unwrap();
}

#[tokio::test]
async fn protect_rename_and_errors_like_rbd() {
    let (img, _mem) = writable_mem(8 << 20).await;
    img.snap_create("s").await.unwrap();
    img.snap_set_protected("s", true).await.unwrap();
    assert!(img.find_snap("s").unwrap().protected);
    let e = img.snap_remove("s").await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Busy);
    assert!(e.message.contains("protected"), "{e}");
    let e = img.snap_set_protected("s", true).await.unwrap_err();
    assert!(e.message.contains("already protected"), "{e}");
    img.snap_rename("s", "t").await.unwrap();
    assert!(img.find_snap("s").is_err());
    img.snap_set_protected("t", false).await.unwrap();
    img.snap_remove("t").await.unwrap();
    assert!(img.snap_create("").await.is_err());
    assert!(img.snap_create("a@b").await.is_err());
    assert_eq!(
        img.snap_remove("nope").await.unwrap_err().kind,
        ErrorKind::NotFound
    );
    img.close().await.unwrap();
}

#[tokio::test]
async fn rollback_makes_the_head_the_snapshot() {
    let (img, mem) = writable_mem(16 << 20).await;
    img.write(0, Bytes::from(vec![1u8; 8192]), false)
        .await
        .unwrap();
    img.write(OBJ, Bytes::from_static(b"kept"), false)
        .await
        .unwrap();
    let s1 = img.snap_create("s1").await.unwrap();
    img.write(0, Bytes::from(vec![2u8; 4096]), false)
        .await
        .unwrap();
    img.write(3 * OBJ, Bytes::from_static(b"new"), false)
        .await
        .unwrap();
    img.trim(OBJ, OBJ as u32, false).await.unwrap();
    img.snap_create("s2").await.unwrap();
    img.write(2 * OBJ, Bytes::from_static(b"later"), false)
        .await
        .unwrap();
    mem.take_log();
    img.snap_rollback("s1").await.unwrap();
    assert_eq!(read_all(&img, 0, 8192).await, vec![1u8; 8192]);
    assert_eq!(&read_all(&img, OBJ, 4).await, b"kept");
    assert_eq!(mem.objects(), [0, 1], "what s1 lacked is gone");
    assert_eq!(
        states(&img.object_map().unwrap()),
        [Exists, Exists, Nonexistent, Nonexistent]
    );
    assert_eq!(
        states(&mem.stored_map()),
        states(&img.object_map().unwrap())
    );
    assert!(!mem.flagged_invalid());
    // The snapshots are untouched.
    assert_eq!(
        &mem.read(0, 0, 2, Some(s1)).await.unwrap().unwrap()[..],
        [1, 1]
    );
    img.close().await.unwrap();

    // Rolling back to the newest snapshot rolls back every object, even those the maps
    // say are unchanged since it (EXISTS_CLEAN in both): as librbd, since after librbd's
    // own rollback the head's EXISTS_CLEAN is a copy of an older snapshot's map, not
    // proof of its bytes (tests/ceph/snaps.sh). Each ends EXISTS, as the OSD's rollback
    // counts as a write.
    let (img, mem) = writable_mem(16 << 20).await;
    img.write(0, Bytes::from_static(b"x"), false).await.unwrap();
    img.write(OBJ, Bytes::from_static(b"y"), false)
        .await
        .unwrap();
    img.snap_create("s0").await.unwrap();
    img.snap_create("s").await.unwrap();
    img.write(OBJ, Bytes::from_static(b"z"), false)
        .await
        .unwrap();
    mem.take_log();
    img.snap_rollback("s").await.unwrap();
    let log = mem.take_log();
    assert!(log.iter().any(|l| l == "write(0)"), "{log:?}");
    assert!(log.iter().any(|l| l == "write(1)"), "{log:?}");
    assert_eq!(&read_all(&img, OBJ, 1).await, b"y");
    assert_eq!(
        states(&img.object_map().unwrap()),
        [Exists, Exists, Nonexistent, Nonexistent]
    );
    img.close().await.unwrap();

    // With one snapshot its map says EXISTS for both objects: both are rolled back and
    // end EXISTS (`rbd diff --from-snap s` lists them, as after librbd's rollback).
    let (img, mem) = writable_mem(16 << 20).await;
    img.write(0, Bytes::from_static(b"x"), false).await.unwrap();
    img.snap_create("s").await.unwrap();
    mem.take_log();
    img.snap_rollback("s").await.unwrap();
    assert!(mem.take_log().iter().any(|l| l == "write(0)"));
    assert_eq!(&read_all(&img, 0, 1).await, b"x");
    assert_eq!(
        states(&img.object_map().unwrap()),
        [Exists, Nonexistent, Nonexistent, Nonexistent]
    );
    img.close().await.unwrap();
}

/// Without object maps a rollback works from the listings and looks only at the objects
/// they name: a huge sparse image is neither walked nor given a table object by object
/// (2^33 objects here; one byte each was 8 GiB, twice).
#[tokio::test]
async fn rollback_without_maps_looks_only_at_listed_objects() {
    use crate::store::{RBD_FEATURE_FAST_DIFF, RBD_FEATURE_OBJECT_MAP};
    let features = DEFAULT_FEATURES & !(RBD_FEATURE_OBJECT_MAP | RBD_FEATURE_FAST_DIFF);
    let mem = MemImage::new(1 << 55, features).audited();
    let img = Image::from_store_image(mem.clone(), &spec("vm1"), &OpenOptions::default())
        .await
        .unwrap();
    assert!(img.object_map().is_none());
    let far = (1u64 << 54) / OBJ;
    img.write(0, Bytes::from_static(b"a"), false).await.unwrap();
    img.write(5 * OBJ, Bytes::from_static(b"b"), false)
        .await
        .unwrap();
    img.snap_create("s").await.unwrap();
    img.write(0, Bytes::from_static(b"c"), false).await.unwrap();
    img.write(far * OBJ, Bytes::from_static(b"d"), false)
        .await
        .unwrap();
    img.trim(5 * OBJ, OBJ as u32, false).await.unwrap();
    assert_eq!(mem.objects(), [0, far]);
    img.snap_rollback("s").await.unwrap();
    assert_eq!(mem.objects(), [0, 5], "what the snapshot lacked is gone");
    assert_eq!(&read_all(&img, 0, 1).await, b"a");
    assert_eq!(&read_all(&img, 5 * OBJ, 1).await, b"b");
    assert_eq!(read_all(&img, far * OBJ, 1).await, [0]);
    img.close().await.unwrap();
}
