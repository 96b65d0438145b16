//! Opening and closing: the map loaded, trusted or rebuilt, the flag set at open and
//! cleared at close, shared images, snapshots.

use super::*;

#[tokio::test]
async fn open_sets_flag_close_writes_map_then_clears() {
    let (_d, s) = store_with(64 << 20, DEFAULT_FEATURES).await;
    assert_eq!(header_flags(&s).await, 0);
    let img = open(&s, false).await;
    let both = RBD_FLAG_OBJECT_MAP_INVALID | RBD_FLAG_FAST_DIFF_INVALID;
    assert_eq!(header_flags(&s).await, both, "dirty flag set at open");
    img.write(3 * OBJ, Bytes::from_static(b"x"), false)
        .await
        .unwrap();
    img.write(9 * OBJ, Bytes::from_static(b"y"), false)
        .await
        .unwrap();
    img.trim(9 * OBJ, OBJ as u32, false).await.unwrap();
    assert!(
        existing(&disk_map(&s).await).is_empty(),
        "map on disk untouched while open"
    );
    img.close().await.unwrap();
    assert_eq!(header_flags(&s).await, 0);
    assert_eq!(existing(&disk_map(&s).await), objects_on_disk(&s).await);
    assert_eq!(objects_on_disk(&s).await, [3]);
    // After close: refused.
    assert_eq!(img.read(0, 1).await.unwrap_err().errno, Errno::Shutdown);
    img.close().await.unwrap();
}

#[tokio::test]
async fn image_without_object_map_feature_keeps_no_map() {
    let (_d, s) = store_with(16 << 20, RBD_FEATURE_LAYERING).await;
    let img = open(&s, false).await;
    assert!(img.object_map().is_none());
    assert_eq!(header_flags(&s).await, 0, "no flag dance without a map");
    img.read(0, 4096).await.unwrap();
    assert_eq!(img.stats().store_reads, 1);
    img.write(OBJ, Bytes::from_static(b"z"), false)
        .await
        .unwrap();
    let e = img.block_status(0, 16 << 20).await.unwrap();
    assert_eq!(
        e,
        [Extent {
            length: 16 << 20,
            flags: 0
        }]
    );
    img.trim(OBJ, OBJ as u32, false).await.unwrap();
    assert!(objects_on_disk(&s).await.is_empty());
    img.close().await.unwrap();
    assert_eq!(header_flags(&s).await, 0);
}

#[tokio::test]
async fn shared_images_go_to_the_store() {
    let (_d, s) = store_with(16 << 20, DEFAULT_FEATURES).await;
    set_shared(&s, "true").await;
    let img = open(&s, false).await;
    assert!(img.is_shared() && img.object_map().is_none());
    // Several writers of a shared image coexist; each sees the other's writes.
    let img2 = open(&s, false).await;
    img2.write(0, Bytes::from_static(b"two"), true)
        .await
        .unwrap();
    assert_eq!(&read_all(&img, 0, 3).await, b"two");
    img2.close().await.unwrap();
    // An exclusive writer (e.g. `config`) is refused meanwhile.
    let e = s
        .open_image(&spec("vm1"), OpenMode::ReadWrite)
        .await
        .err()
        .unwrap();
    assert_eq!(e.kind, ErrorKind::Busy);
    // Nobody keeps the on-disk map current while shared writers write: it is
    // flagged invalid from the first shared open on, and stays so after they close.
    let invalid = invalid_flags(DEFAULT_FEATURES);
    assert_eq!(header_flags(&s).await, invalid);
    img.read(8 << 20, 4096).await.unwrap();
    assert_eq!((img.stats().store_reads, img.stats().map_reads), (2, 0));
    img.close().await.unwrap();
    assert_eq!(header_flags(&s).await, invalid);
    // Back to exclusive use: the stale map (it never saw object 0) is not trusted;
    // the open rebuilds it and the shared writer's data reads back.
    set_shared(&s, "false").await;
    assert_eq!(disk_map(&s).await.get(0), ObjectState::Nonexistent);
    let img = open(&s, false).await;
    assert!(!img.is_shared());
    assert!(matches!(img.map_source(), Some(MapSource::Rebuilt(_))));
    assert_eq!(img.object_map().unwrap().get(0), ObjectState::Exists);
    assert_eq!(&read_all(&img, 0, 3).await, b"two");
    img.close().await.unwrap();
    assert_eq!(header_flags(&s).await, 0);
    assert_eq!(disk_map(&s).await.get(0), ObjectState::Exists);
    // The config default applies only without metadata.
    let (_d2, s2) = store_with(16 << 20, DEFAULT_FEATURES).await;
    let o = OpenOptions {
        read_only: false,
        shared_default: true,
        checkpoint_idle: None,
    };
    let img = Image::open(&s2, &spec("vm1"), &o).await.unwrap();
    assert!(img.is_shared());
    img.close().await.unwrap();
    // A bad value is an error naming the key, not a silent default.
    set_shared(&s2, "perhaps").await;
    let e = Image::open(&s2, &spec("vm1"), &OpenOptions::default())
        .await
        .err()
        .unwrap();
    assert!(e.message.contains(META_SHARED), "{e}");
    // ... and the failed open released the lock.
    s2.open_image(&spec("vm1"), OpenMode::ReadWrite)
        .await
        .unwrap();
}

#[tokio::test]
async fn crash_leaves_flag_and_reopen_rebuilds() {
    let (_d, s, img) = writable(64 << 20).await;
    img.write(2 * OBJ, Bytes::from_static(b"acked"), false)
        .await
        .unwrap();
    img.write(7 * OBJ + 1, Bytes::from_static(b"fua"), true)
        .await
        .unwrap();
    drop(img); // a crash: no close
    assert_ne!(header_flags(&s).await & RBD_FLAG_OBJECT_MAP_INVALID, 0);
    assert!(
        existing(&disk_map(&s).await).is_empty(),
        "stale map on disk"
    );

    // A read-only open of the head keeps no map (another client may write the
    // image), reads from the store, and never touches the flag.
    let ro = open(&s, true).await;
    assert!(ro.map_source().is_none() && ro.object_map().is_none());
    assert_eq!(&read_all(&ro, 2 * OBJ, 5).await, b"acked");
    assert!(ro.write(0, Bytes::from_static(b"no"), false).await.is_err());
    ro.close().await.unwrap();
    assert_ne!(header_flags(&s).await & RBD_FLAG_OBJECT_MAP_INVALID, 0);
    assert!(existing(&disk_map(&s).await).is_empty());

    let img = open(&s, false).await;
    match img.map_source() {
        Some(MapSource::Rebuilt(why)) => assert!(why.contains("flags"), "{why}"),
        o => panic!("expected a rebuild, got {o:?}"),
    }
    // Rebuilt in the background while serving: the whole map once it ends.
    img.finish_rebuild().await.unwrap();
    assert_eq!(existing(img.object_map().unwrap()), [2, 7]);
    assert_eq!(&read_all(&img, 2 * OBJ, 5).await, b"acked");
    assert_eq!(&read_all(&img, 7 * OBJ + 1, 3).await, b"fua");
    img.close().await.unwrap();
    assert_eq!(header_flags(&s).await, 0);
    assert_eq!(existing(&disk_map(&s).await), [2, 7]);
}

#[tokio::test]
async fn corrupt_or_wrong_length_map_is_rebuilt() {
    let (d, s, img) = writable(64 << 20).await;
    img.write(OBJ, Bytes::from_static(b"x"), false)
        .await
        .unwrap();
    img.close().await.unwrap();
    let mut b = disk_map_bytes(&s).await;
    let n = b.len();
    b[n / 2] ^= 0xff;
    write_disk_map(&s, b).await;
    let img = open(&s, false).await;
    match img.map_source() {
        Some(MapSource::Rebuilt(why)) => assert!(why.contains("corrupt"), "{why}"),
        o => panic!("expected a rebuild, got {o:?}"),
    }
    img.finish_rebuild().await.unwrap();
    assert_eq!(existing(img.object_map().unwrap()), [1]);
    img.close().await.unwrap();
    write_disk_map(&s, ObjectMap::new(3).encode()).await;
    let img = open(&s, false).await;
    match img.map_source() {
        Some(MapSource::Rebuilt(why)) => assert!(why.contains("3 entries"), "{why}"),
        o => panic!("expected a rebuild, got {o:?}"),
    }
    img.close().await.unwrap();
    // The store has no call that removes a map: the file goes.
    let mp = pool(d.path()).join(format!("rbd_object_map.{}", stored_header(&s).await.id));
    std::fs::remove_file(&mp).unwrap();
    let img = open(&s, false).await;
    assert!(matches!(img.map_source(), Some(MapSource::Rebuilt(w)) if w.contains("missing")));
    img.close().await.unwrap();
    assert_eq!(existing(&disk_map(&s).await), [1]);
}

#[tokio::test]
async fn snapshot_maps_are_used_only_when_valid() {
    let good = {
        let m = ObjectMap::try_new(4).unwrap();
        m.set(0, ObjectState::Exists);
        m.encode()
    };
    let stale = ObjectMap::try_new(4).unwrap().encode();
    // Snapshot `s1` (id 7) with the given snapshot flags and map bytes. Its object 0
    // was removed from the head since: it lives on only as a clone, which a listing
    // does not show, so a map rebuilt from the listing would be wrong.
    let at = |flags: u64, map: Vec<u8>| async move {
        let mem = MemImage::new(16 << 20, DEFAULT_FEATURES);
        mem.add_snapshot(7, "s1", flags, map, &[(0, b"snapdata")]);
        let o = OpenOptions {
            read_only: true,
            shared_default: false,
            checkpoint_idle: None,
        };
        Image::from_store_image(mem.at_snapshot(7), &spec("vm1@s1"), &o)
            .await
            .unwrap()
    };
    // A valid snapshot map is loaded and answers holes without the store.
    let snap = at(0, good).await;
    assert!(matches!(snap.map_source(), Some(MapSource::Loaded)));
    assert_eq!(&read_all(&snap, 0, 8).await, b"snapdata");
    read_all(&snap, OBJ, 512).await;
    assert_eq!((snap.stats().map_reads, snap.stats().store_reads), (1, 1));
    snap.close().await.unwrap();
    // Flagged invalid (taken after a writer crashed): neither that map, which says
    // object 0 does not exist, nor a rebuild from the listing, which misses it, is
    // used; every read asks the store and the data is there.
    for flags in [RBD_FLAG_OBJECT_MAP_INVALID, invalid_flags(DEFAULT_FEATURES)] {
        let snap = at(flags, stale.clone()).await;
        assert!(snap.object_map().is_none() && snap.map_source().is_none());
        assert_eq!(&read_all(&snap, 0, 8).await, b"snapdata");
        assert_eq!(snap.stats().map_reads, 0);
        snap.close().await.unwrap();
    }
    // A corrupt snapshot map is not used either.
    let snap = at(0, b"garbage".to_vec()).await;
    assert!(snap.object_map().is_none());
    assert_eq!(&read_all(&snap, 0, 8).await, b"snapdata");
    snap.close().await.unwrap();
}

#[tokio::test]
async fn close_order_is_sync_map_flag_close() {
    let mem = MemImage::new(16 << 20, DEFAULT_FEATURES);
    let img = Image::from_store_image(mem.clone(), &spec("vm1"), &OpenOptions::default())
        .await
        .unwrap();
    img.read(0, 512).await.unwrap();
    img.write(OBJ, Bytes::from_static(b"w"), false)
        .await
        .unwrap();
    img.trim(2 * OBJ, OBJ as u32, false).await.unwrap();
    img.close().await.unwrap();
    let l = mem.take_log();
    assert_eq!(
        l,
        [
            "set_flags(3)",
            "write(1)",
            "sync",
            "write_object_map",
            "set_flags(0)",
            "close"
        ],
        "no store read of a nonexistent object, no removal of one, flag set before the write"
    );
}

/// librbd's limit on an image with an object map (cls_rbd's MAX_OBJECT_MAP_OBJECT_COUNT,
/// 256 000 000 objects), which `rbd create --size 1P` (268 435 456 objects of 4 MiB)
/// runs into; none without the feature.
#[test]
fn object_map_size_limit_is_librbds() {
    use crate::image::{check_map_size, MAX_MAP_OBJECTS};
    use crate::store::RBD_FEATURE_OBJECT_MAP as OM;
    assert_eq!(MAX_MAP_OBJECTS, 256_000_000);
    assert!(check_map_size(OM, MAX_MAP_OBJECTS << 22, 22).is_ok());
    let e = check_map_size(OM, (MAX_MAP_OBJECTS << 22) + 1, 22).unwrap_err();
    assert!(e.message.contains("not compatible with object map"), "{e}");
    assert!(check_map_size(OM, 1 << 50, 22).is_err());
    assert!(check_map_size(OM, 1 << 50, 23).is_ok());
    assert!(check_map_size(0, 1 << 50, 22).is_ok());
}
