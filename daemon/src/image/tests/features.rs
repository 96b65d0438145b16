//! `rbd feature enable|disable` of the map's features, asked of the lock owner while the
//! image is served.

use super::*;

#[tokio::test]
async fn object_map_turned_off_and_on_while_served() {
    use crate::store::{RBD_FEATURE_FAST_DIFF, RBD_FEATURE_OBJECT_MAP};
    let (img, mem) = recorded(64 << 20, None).await;
    img.write(0, Bytes::from(vec![1u8; 4096]), false)
        .await
        .unwrap();
    // Dependencies as librbd has them.
    assert!(img
        .update_features(RBD_FEATURE_OBJECT_MAP, false)
        .await
        .is_err());
    img.update_features(RBD_FEATURE_FAST_DIFF | RBD_FEATURE_OBJECT_MAP, false)
        .await
        .unwrap();
    assert_eq!(
        mem.features() & (RBD_FEATURE_FAST_DIFF | RBD_FEATURE_OBJECT_MAP),
        0
    );
    assert!(!mem.has_map(), "the maps go with the feature");
    assert_eq!(mem.flags(), 0, "no flag left about a map nobody keeps");
    // Without a map: writes go on, nothing is flagged.
    img.write(2 * OBJ, Bytes::from(vec![2u8; 4096]), false)
        .await
        .unwrap();
    assert_eq!(mem.flags(), 0);
    img.update_features(RBD_FEATURE_FAST_DIFF | RBD_FEATURE_OBJECT_MAP, true)
        .await
        .unwrap();
    assert_ne!(mem.features() & RBD_FEATURE_OBJECT_MAP, 0);
    assert!(mem.has_map());
    assert_eq!(
        existing(&mem.stored_map()),
        [0, 2],
        "built from the objects, and written"
    );
    assert!(!mem.flagged_invalid());
    img.write(3 * OBJ, Bytes::from(vec![3u8; 4096]), false)
        .await
        .unwrap();
    assert!(mem.flagged_invalid(), "kept as usual again");
    img.close().await.unwrap();
    assert_eq!(existing(&mem.stored_map()), [0, 2, 3]);
    assert!(!mem.flagged_invalid());
}

#[tokio::test]
async fn fast_diff_turned_off_takes_object_map_with_it() {
    use crate::store::{RBD_FEATURE_FAST_DIFF, RBD_FEATURE_OBJECT_MAP};
    // `rbd feature disable IMG fast-diff` asks the owner for fast-diff alone; librbd's owner
    // turns object-map off too.
    let (img, mem) = recorded(64 << 20, None).await;
    img.write(0, Bytes::from(vec![1u8; 4096]), false)
        .await
        .unwrap();
    img.update_features(RBD_FEATURE_FAST_DIFF, false)
        .await
        .unwrap();
    assert_eq!(
        mem.features() & (RBD_FEATURE_FAST_DIFF | RBD_FEATURE_OBJECT_MAP),
        0
    );
    assert!(!mem.has_map());
    assert_eq!(mem.flags(), 0);
    img.close().await.unwrap();
}

#[tokio::test]
async fn a_fast_diff_flag_left_behind_goes_at_the_next_clean_close() {
    use crate::store::{RBD_FEATURE_FAST_DIFF, RBD_FLAG_FAST_DIFF_INVALID};
    // fast-diff turned off by an owner killed before it cleared the flag.
    let mem = MemImage::new(64 << 20, DEFAULT_FEATURES & !RBD_FEATURE_FAST_DIFF).audited();
    mem.set_flags(RBD_FLAG_FAST_DIFF_INVALID, RBD_FLAG_FAST_DIFF_INVALID)
        .await
        .unwrap();
    let img = Image::from_store_image(mem.clone(), &spec("vm1"), &OpenOptions::default())
        .await
        .unwrap();
    img.write(0, Bytes::from(vec![1u8; 4096]), false)
        .await
        .unwrap();
    img.close().await.unwrap();
    assert_eq!(mem.flags(), 0);
}

#[tokio::test]
async fn exclusive_lock_turned_off_after_the_map_as_librbd() {
    use crate::store::{RBD_FEATURE_EXCLUSIVE_LOCK, RBD_FEATURE_FAST_DIFF, RBD_FEATURE_OBJECT_MAP};
    let (img, mem) = recorded(64 << 20, None).await;
    img.write(0, Bytes::from(vec![1u8; 4096]), false)
        .await
        .unwrap();
    // librbd's owner answers EINVAL while object-map is on.
    let e = img
        .update_features(RBD_FEATURE_EXCLUSIVE_LOCK, false)
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidInput, "{e}");
    assert_ne!(mem.features() & RBD_FEATURE_EXCLUSIVE_LOCK, 0);
    assert!(mem.flagged_invalid(), "nothing changed: the map still kept");
    // All three in one request (`rbd feature disable IMG exclusive-lock object-map
    // fast-diff`): the maps and flags go, and the lock feature.
    img.update_features(
        RBD_FEATURE_EXCLUSIVE_LOCK | RBD_FEATURE_OBJECT_MAP | RBD_FEATURE_FAST_DIFF,
        false,
    )
    .await
    .unwrap();
    let lockish = RBD_FEATURE_EXCLUSIVE_LOCK | RBD_FEATURE_OBJECT_MAP | RBD_FEATURE_FAST_DIFF;
    assert_eq!(mem.features() & lockish, 0);
    assert_eq!(img.features() & lockish, 0);
    assert!(!mem.has_map());
    assert_eq!(mem.flags(), 0);
    // Served on, lock-less.
    img.write(OBJ, Bytes::from(vec![2u8; 4096]), false)
        .await
        .unwrap();
    assert_eq!(mem.flags(), 0);
    let got = img.read(OBJ, 4096).await.unwrap();
    assert!(
        matches!(&got[..], [ReadChunk::Data(d)] if d[..] == [2u8; 4096][..]),
        "{got:?}"
    );
    // Never turned on by its owner (there is none without it).
    assert!(img
        .update_features(RBD_FEATURE_EXCLUSIVE_LOCK, true)
        .await
        .is_err());
    img.close().await.unwrap();
    assert_eq!(mem.flags(), 0);
}
