//! The lock handed to another client and taken back (cooperative hand-over): nothing is
//! written while it is away, the map and flag are right when it goes, and the map the
//! other owner left is loaded (or rebuilt) when it comes back.

use super::*;

/// A write while the lock is away: the first thing the store sees is `reacquire_lock`, and
/// the lock is ours after it.
async fn write_takes_the_lock_back(img: &Image<MemImage>, mem: &MemImage, off: u64, byte: u8) {
    img.write(off, Bytes::from(vec![byte; 4096]), false)
        .await
        .unwrap();
    assert!(!img.lock_released());
    assert_eq!(
        mem.take_log().first().map(String::as_str),
        Some("reacquire_lock")
    );
}

#[tokio::test]
async fn handed_over_clean_then_taken_back_with_the_other_owners_map() {
    let (img, mem) = recorded(64 << 20, None).await;
    let img = Arc::new(img);
    img.write(0, Bytes::from(vec![1u8; 4096]), false)
        .await
        .unwrap();
    assert!(mem.flagged_invalid());
    img.hand_over().await.unwrap();
    assert!(img.lock_released());
    assert!(
        !mem.flagged_invalid(),
        "the map is written and the flag cleared before the lock goes"
    );
    assert_eq!(existing(&mem.stored_map()), [0]);
    let log = mem.take_log();
    let at = |what: &str| log.iter().position(|l| l == what).unwrap();
    assert!(at("write_object_map") < at("release_lock"), "{log:?}");

    // The other owner writes object 3 (and keeps its map right, as librbd does).
    mem.other_owner_writes(3, vec![7u8; 4096], true);
    // A flush has nothing of ours to sync: answered without taking the lock back.
    img.flush().await.unwrap();
    assert!(img.lock_released());
    // A read runs without the lock, as librbd's do, and sees the other owner's object:
    // the stale map in memory (object 3 NONEXISTENT) would have answered zeros.
    assert_eq!(read_all(&img, 3 * OBJ, 4096).await, vec![7u8; 4096]);
    assert!(img.lock_released(), "a read leaves the lock where it is");
    // Block status cannot come from the stale map either: all data, never a hole.
    let ext = img.block_status(0, 8 * OBJ as u32).await.unwrap();
    assert_eq!(
        ext,
        vec![Extent {
            length: 8 * OBJ,
            flags: 0
        }]
    );
    assert!(img.lock_released());
    assert!(
        !mem.take_log().iter().any(|l| l == "reacquire_lock"),
        "reads do not take the lock back"
    );
    // A write takes the lock back (and loads the map the other owner left).
    write_takes_the_lock_back(&img, &mem, 5 * OBJ, 2).await;
    // Now the map is the other owner's, trusted again: object 3 exists there.
    let ext = img.block_status(3 * OBJ, OBJ as u32).await.unwrap();
    assert_eq!(
        ext,
        vec![Extent {
            length: OBJ,
            flags: 0
        }]
    );
    img.close().await.unwrap();
    assert_eq!(existing(&mem.stored_map()), [0, 3, 5]);
    assert!(!mem.flagged_invalid());
}

#[tokio::test]
async fn a_map_the_other_owner_left_flagged_is_rebuilt() {
    let (img, mem) = recorded(64 << 20, None).await;
    let img = Arc::new(img);
    img.write(0, Bytes::from(vec![1u8; 4096]), false)
        .await
        .unwrap();
    img.hand_over().await.unwrap();
    // It crashed: object 4 written, the flag set, the map not updated.
    mem.other_owner_writes(4, vec![9u8; 4096], false);
    assert_eq!(read_all(&img, 4 * OBJ, 4096).await, vec![9u8; 4096]);
    // A write takes the lock back, under a set flag: the map is rebuilt (object 4 in
    // it), and the flag is ours to clear at close, once our map is written.
    img.write(8 * OBJ, Bytes::from(vec![2u8; 4096]), false)
        .await
        .unwrap();
    assert!(mem.flagged_invalid());
    assert_eq!(
        ObjectState::Exists,
        img.object_map().unwrap().get(4),
        "the rebuilt map has the crashed owner's object"
    );
    img.close().await.unwrap();
    assert_eq!(existing(&mem.stored_map()), [0, 4, 8]);
    assert!(!mem.flagged_invalid());
}

#[tokio::test]
async fn in_flight_writes_finish_before_the_lock_goes_and_none_run_while_it_is_away() {
    let mem = MemImage::new(64 << 20, DEFAULT_FEATURES)
        .audited()
        .slowed(Duration::from_millis(20));
    let img = Arc::new(
        Image::from_store_image(mem.clone(), &spec("vm1"), &OpenOptions::default())
            .await
            .unwrap(),
    );
    // Writers and hand-overs interleaved: the store asserts nothing is written while the
    // lock is away; every acknowledged write must read back at the end.
    let mut tasks = Vec::new();
    for w in 0..8u64 {
        let img = img.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..10u64 {
                let off = ((w * 10 + i) % 16) * OBJ + w * 4096;
                img.write(off, Bytes::from(vec![(w * 10 + i) as u8; 4096]), false)
                    .await
                    .unwrap();
                tokio::task::yield_now().await;
            }
        }));
    }
    for _ in 0..5 {
        img.hand_over().await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for t in tasks {
        t.await.unwrap();
    }
    for w in 0..8u64 {
        let i = 9;
        let off = ((w * 10 + i) % 16) * OBJ + w * 4096;
        assert_eq!(
            read_all(&img, off, 4096).await,
            vec![(w * 10 + i) as u8; 4096]
        );
    }
    img.close().await.unwrap();
    assert!(!mem.flagged_invalid());
    assert!(
        mem.take_log()
            .iter()
            .filter(|l| *l == "release_lock")
            .count()
            >= 1
    );
}

#[tokio::test]
async fn features_the_other_owner_changed_are_adopted_at_take_back() {
    use crate::store::{RBD_FEATURE_FAST_DIFF, RBD_FEATURE_OBJECT_MAP};
    let (img, mem) = recorded(64 << 20, None).await;
    let img = Arc::new(img);
    img.write(0, Bytes::from(vec![1u8; 4096]), false)
        .await
        .unwrap();
    img.hand_over().await.unwrap();
    // `rbd feature disable object-map`, then a write, by the other owner.
    mem.other_owner_disables(RBD_FEATURE_OBJECT_MAP | RBD_FEATURE_FAST_DIFF);
    mem.other_owner_writes(3, vec![7u8; 4096], false);
    // Our stale map (object 3 NONEXISTENT) must not answer (a read without the lock).
    assert_eq!(read_all(&img, 3 * OBJ, 4096).await, vec![7u8; 4096]);
    // The write takes the lock back: there is no map any more.
    img.write(5 * OBJ, Bytes::from(vec![2u8; 4096]), false)
        .await
        .unwrap();
    assert_eq!(img.features() & RBD_FEATURE_OBJECT_MAP, 0);
    assert!(img.object_map().is_none());
    img.close().await.unwrap();
    assert!(
        !mem.has_map(),
        "no map written for an image without object-map"
    );
    assert_eq!(mem.objects(), [0, 3, 5]);
}

#[tokio::test]
async fn opened_while_another_client_holds_the_lock_serves_reads_and_takes_it_at_the_first_write() {
    // The image as a librbd owner keeps it: object 2 written, its map right, flag clear.
    let mem = MemImage::new(64 << 20, DEFAULT_FEATURES)
        .audited()
        .held_elsewhere();
    mem.other_owner_writes(2, vec![5u8; 4096], true);
    let img = Image::from_store_image(mem.clone(), &spec("vm1"), &OpenOptions::default())
        .await
        .unwrap();
    assert!(img.lock_released(), "opened without the lock");
    assert!(
        !mem.flagged_invalid(),
        "the flag is the owner's: not set at open"
    );
    // The owner goes on writing: reads see it all, the lock stays where it is.
    mem.other_owner_writes(6, vec![8u8; 4096], true);
    assert_eq!(read_all(&img, 2 * OBJ, 4096).await, vec![5u8; 4096]);
    assert_eq!(read_all(&img, 6 * OBJ, 4096).await, vec![8u8; 4096]);
    assert_eq!(read_all(&img, 7 * OBJ, 4096).await, vec![0u8; 4096]);
    let ext = img.block_status(0, 16 * OBJ as u32).await.unwrap();
    assert_eq!(
        ext,
        vec![Extent {
            length: 16 * OBJ,
            flags: 0
        }]
    );
    img.flush().await.unwrap();
    assert!(img.lock_released());
    assert!(!mem.take_log().iter().any(|l| l == "reacquire_lock"));
    // The first write takes the lock (asking the owner) and loads its map.
    write_takes_the_lock_back(&img, &mem, 9 * OBJ, 3).await;
    assert!(mem.flagged_invalid(), "ours now: flagged before the write");
    // The map in memory is the owner's plus ours: holes answered from it again.
    let ext = img.block_status(7 * OBJ, OBJ as u32).await.unwrap();
    assert_eq!(
        ext,
        vec![Extent {
            length: OBJ,
            flags: STATE_HOLE | STATE_ZERO
        }]
    );
    img.close().await.unwrap();
    assert_eq!(existing(&mem.stored_map()), [2, 6, 9]);
    assert!(!mem.flagged_invalid());
}
