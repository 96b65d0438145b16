//! The directory store's tests.

use super::object::FD_CACHE_SIZE;
use super::*;
use crate::store::{DEFAULT_FEATURES, RBD_FEATURE_DEEP_FLATTEN};
use std::os::unix::fs::MetadataExt;

/// What `children` lists of `parent` (specs only: the directory store has no trash).
async fn kids(s: &DirStore, parent: &str, descendants: bool) -> Vec<ImageSpec> {
    let v = s.children(&spec(parent), None, descendants).await.unwrap();
    assert!(v.iter().all(|c| !c.trash && !c.id.is_empty()));
    v.into_iter().map(|c| c.spec).collect()
}

fn spec(s: &str) -> ImageSpec {
    s.parse().unwrap()
}

fn opts(size: u64) -> CreateOptions {
    CreateOptions {
        size,
        order: 22,
        features: DEFAULT_FEATURES,
        data_pool: None,
        stripe_unit: None,
    }
}

/// Opens image `name` of `s`, which must succeed.
async fn open(s: &DirStore, name: &str, mode: OpenMode) -> DirImage {
    s.open_image(&spec(name), mode).await.unwrap()
}

/// The error opening image `name` of `s`, which must fail.
async fn open_err(s: &DirStore, name: &str, mode: OpenMode) -> Error {
    s.open_image(&spec(name), mode).await.err().unwrap()
}

async fn setup() -> (tempfile::TempDir, DirStore) {
    let d = tempfile::tempdir().unwrap();
    let s = DirStore::new(d.path());
    s.create_image(&spec("vm1"), &opts(64 << 20)).await.unwrap();
    (d, s)
}

#[tokio::test]
async fn create_list_open_remove() {
    let (d, s) = setup().await;
    let e = s
        .create_image(&spec("vm1"), &opts(1 << 20))
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::AlreadyExists);
    assert!(e.message.contains("rbd/vm1 already exists"), "{e}");
    s.create_image(&spec("p2/b"), &opts(1 << 20)).await.unwrap();
    s.create_image(&spec("a"), &opts(1 << 20)).await.unwrap();
    assert_eq!(s.list_images("rbd").await.unwrap(), ["a", "vm1"]);
    assert_eq!(s.list_images("p2").await.unwrap(), ["b"]);
    assert!(s.list_images("none").await.unwrap().is_empty());

    let img = open(&s, "vm1", OpenMode::ReadOnly).await;
    let h = img.header();
    assert_eq!(h.id.len(), 12);
    assert!(h.id.chars().all(|c| c.is_ascii_hexdigit()));
    assert_eq!((h.size, h.order, h.flags), (64 << 20, 22, 0));
    assert_eq!(h.object_prefix, format!("rbd_data.{}", h.id));
    let pool = d.path().join("rbd");
    assert!(pool.join(format!("rbd_header.{}", h.id)).is_file());
    assert_eq!(
        std::fs::read_to_string(pool.join("rbd_id.vm1")).unwrap(),
        h.id
    );
    img.close().await.unwrap();

    let rw = open(&s, "vm1", OpenMode::ReadWrite).await;
    rw.write(0, 0, Bytes::from_static(b"x"), false)
        .await
        .unwrap();
    rw.write_object_map(vec![1, 2, 3]).await.unwrap();
    rw.close().await.unwrap();
    s.remove_image(&spec("vm1")).await.unwrap();
    assert_eq!(s.list_images("rbd").await.unwrap(), ["a"]);
    let left: Vec<String> = std::fs::read_dir(&pool)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.contains(&h.id))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    let e = open_err(&s, "vm1", OpenMode::ReadOnly).await;
    assert_eq!(e.kind, ErrorKind::NotFound);
    assert_eq!(
        e.message,
        format!("image rbd/vm1 not found in dir:{}", d.path().display())
    );
    assert_eq!(
        s.remove_image(&spec("vm1")).await.unwrap_err().kind,
        ErrorKind::NotFound
    );
}

#[tokio::test]
async fn bad_create_options_change_nothing() {
    let d = tempfile::tempdir().unwrap();
    let s = DirStore::new(d.path());
    let mut o = opts(1 << 20);
    o.order = 30;
    let e = s.create_image(&spec("x"), &o).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidInput);
    assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
}

#[tokio::test]
async fn sparse_writes_reads_and_short_reads() {
    let (d, s) = setup().await;
    let img = open(&s, "vm1", OpenMode::ReadWrite).await;
    assert_eq!(img.read(3, 0, 4096, None).await.unwrap(), None);
    let data = Bytes::from(vec![0xabu8; 8192]);
    img.write(3, 1 << 20, data.clone(), false).await.unwrap();
    let p = d.path().join("rbd").join(img.header().object_name(3));
    let md = std::fs::metadata(&p).unwrap();
    assert_eq!(md.len(), (1 << 20) + 8192);
    // Sparse: far fewer blocks than the file length.
    assert!(md.blocks() * 512 < 256 * 1024, "{} blocks", md.blocks());
    let r = img.read(3, (1 << 20) - 4, 8, None).await.unwrap().unwrap();
    assert_eq!(&r[..], &[0, 0, 0, 0, 0xab, 0xab, 0xab, 0xab]);
    // Past the end of the object: short.
    let r = img
        .read(3, (1 << 20) + 8000, 4096, None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.len(), 192);
    let r = img.read(3, 2 << 20, 4096, None).await.unwrap().unwrap();
    assert!(r.is_empty());
    assert_eq!(img.list_objects(None).await.unwrap(), [3]);
    img.close().await.unwrap();
}

#[tokio::test]
async fn zero_punches_holes_and_missing_stays_missing() {
    let (d, s) = setup().await;
    let img = open(&s, "vm1", OpenMode::ReadWrite).await;
    img.write(0, 0, Bytes::from(vec![7u8; 1 << 20]), true)
        .await
        .unwrap();
    let p = d.path().join("rbd").join(img.header().object_name(0));
    let before = std::fs::metadata(&p).unwrap().blocks();
    img.zero(0, 256 << 10, 512 << 10, false).await.unwrap();
    let after = std::fs::metadata(&p).unwrap().blocks();
    assert!(after < before, "blocks {before} -> {after}");
    assert_eq!(std::fs::metadata(&p).unwrap().len(), 1 << 20);
    let r = img.read(0, 0, 1 << 20, None).await.unwrap().unwrap();
    assert!(r[..256 << 10].iter().all(|&b| b == 7));
    assert!(r[256 << 10..768 << 10].iter().all(|&b| b == 0));
    assert!(r[768 << 10..].iter().all(|&b| b == 7));
    img.zero(5, 0, 4096, true).await.unwrap();
    assert_eq!(img.read(5, 0, 10, None).await.unwrap(), None);
    assert_eq!(img.list_objects(None).await.unwrap(), [0]);
    img.remove(0, false).await.unwrap();
    img.remove(0, false).await.unwrap();
    assert!(img.list_objects(None).await.unwrap().is_empty());
    img.close().await.unwrap();
}

#[tokio::test]
// Holding the sync lock across the wait is the point: it stands for a sync in progress.
#[allow(clippy::await_holding_lock)]
async fn a_flush_waits_for_the_sync_already_running() {
    // A sync in progress has taken the dirty set; a second one must not find it
    // empty and return before those objects are durable.
    let (_d, s) = setup().await;
    let img = Arc::new(open(&s, "vm1", OpenMode::ReadWrite).await);
    img.write(1, 0, Bytes::from_static(b"a"), false)
        .await
        .unwrap();
    let i = img.inner.clone();
    let running = lock(&i.sync_lock);
    let objs: Vec<u64> = lock(&i.dirty).drain().collect();
    assert_eq!(objs, [1]);
    let second = tokio::spawn({
        let img = img.clone();
        async move { img.sync().await }
    });
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert!(
        !second.is_finished(),
        "the second FLUSH returned while the first was still syncing"
    );
    drop(running);
    second.await.unwrap().unwrap();
    img.close().await.unwrap();
}

/// A sync running beside a write (a FLUSH from another request) must not take the
/// write's mark before the data is in the file: the next FLUSH, which the client sends
/// after the write was acknowledged, would find nothing to make durable. Here the sync
/// runs at the worst moment, just before the data goes to the file, on both write paths
/// (a cached descriptor's inline write, the blocking one).
#[tokio::test]
async fn a_sync_beside_a_write_leaves_its_mark_for_the_next() {
    let (_d, s) = setup().await;
    let img = open(&s, "vm1", OpenMode::ReadWrite).await;
    let i = img.inner.clone();
    img.write(1, 0, Bytes::from_static(b"a"), false)
        .await
        .unwrap();
    img.sync().await.unwrap();
    let syncs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let n = syncs.clone();
    *lock(&i.test_hook) = Some(Arc::new(move |i: &Inner| {
        i.sync().unwrap();
        n.fetch_add(1, Ordering::AcqRel);
    }));
    // Inline (the descriptor is cached), then blocking (a new object: no descriptor yet).
    img.write(1, 10, Bytes::from_static(b"b"), false)
        .await
        .unwrap();
    assert!(
        lock(&i.dirty).contains(&1),
        "object 1's mark survived the sync beside it"
    );
    img.write(2, 0, Bytes::from_static(b"c"), false)
        .await
        .unwrap();
    *lock(&i.test_hook) = None;
    assert_eq!(syncs.load(Ordering::Acquire), 2, "both writes met a sync");
    assert!(
        lock(&i.dirty).contains(&2),
        "object 2's mark survived the sync beside it"
    );
    img.sync().await.unwrap();
    assert!(lock(&i.dirty).is_empty());
}

/// A failed sync fails every later one until the image is reopened: Linux reports a
/// failed writeback once and marks the pages clean, so a retry would succeed over lost
/// data, and a FLUSH (or a close clearing the dirty flag) be acknowledged wrongly.
#[tokio::test]
async fn a_failed_sync_keeps_failing() {
    let (_d, s) = setup().await;
    let img = open(&s, "vm1", OpenMode::ReadWrite).await;
    let i = img.inner.clone();
    img.write(1, 0, Bytes::from_static(b"a"), false)
        .await
        .unwrap();
    i.test_fail_sync.store(true, Ordering::Release);
    assert!(img.sync().await.is_err());
    let again = img.sync().await.unwrap_err();
    assert!(again.to_string().contains("reopen the image"), "{again}");
    assert!(img.sync().await.is_err(), "still failing");
}

/// A header change whose directory fsync failed is in the file all the same: the
/// handle's copy must follow it, or its next change would undo this one on disk, and
/// so must the caller's next steps. Its durability is in doubt: every later sync fails.
#[tokio::test]
async fn a_header_change_that_may_not_be_durable_is_not_undone() {
    let (_d, s) = setup().await;
    let img = open(&s, "vm1", OpenMode::ReadWrite).await;
    img.inner
        .test_fail_header_sync
        .store(true, Ordering::Release);
    img.set_flags(1, 1).await.unwrap();
    img.set_meta("k", "v").await.unwrap();
    let e = img.sync().await.unwrap_err();
    assert!(e.to_string().contains("injected"), "{e}");
    assert!(img.sync().await.is_err(), "still failing");
    img.close().await.unwrap();
    let r = open(&s, "vm1", OpenMode::ReadOnly).await;
    assert_eq!(r.header().flags, 1, "the flag set before the failure stays");
    assert_eq!(r.get_meta("k").await.unwrap().as_deref(), Some("v"));
    r.close().await.unwrap();
}

#[tokio::test]
async fn durability_bookkeeping() {
    let (_d, s) = setup().await;
    let img = open(&s, "vm1", OpenMode::ReadWrite).await;
    let i = img.inner.clone();
    img.write(1, 0, Bytes::from_static(b"a"), false)
        .await
        .unwrap();
    img.write(2, 0, Bytes::from_static(b"b"), false)
        .await
        .unwrap();
    assert_eq!(lock(&i.dirty).len(), 2);
    assert!(
        i.dir_dirty.load(Ordering::Acquire),
        "creation dirties the dir"
    );
    img.sync().await.unwrap();
    assert!(lock(&i.dirty).is_empty());
    assert!(!i.dir_dirty.load(Ordering::Acquire));
    // Rewriting an existing object dirties it but not the directory.
    img.write(1, 10, Bytes::from_static(b"c"), false)
        .await
        .unwrap();
    assert!(lock(&i.dirty).contains(&1));
    assert!(!i.dir_dirty.load(Ordering::Acquire));
    img.remove(2, false).await.unwrap();
    assert!(
        i.dir_dirty.load(Ordering::Acquire),
        "removal dirties the dir"
    );
    img.sync().await.unwrap();
    assert!(lock(&i.dirty).is_empty() && !i.dir_dirty.load(Ordering::Acquire));
    // A durable removal syncs the directory itself.
    img.write(3, 0, Bytes::from_static(b"d"), false)
        .await
        .unwrap();
    img.remove(3, true).await.unwrap();
    assert!(!i.dir_dirty.load(Ordering::Acquire));
    // A dirty object whose fd was evicted is still synced (reopened by path).
    img.write(4, 0, Bytes::from_static(b"e"), false)
        .await
        .unwrap();
    lock(&i.fds).clear();
    img.sync().await.unwrap();
    assert!(lock(&i.dirty).is_empty());
    img.close().await.unwrap();
    assert!(img.sync().await.is_err(), "closed handle refuses work");
}

#[tokio::test]
async fn reads_racing_removals_never_strand_a_later_write() {
    let (_d, s) = setup().await;
    let img = open(&s, "vm1", OpenMode::ReadWrite).await;
    let i = img.inner.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (i, stop) = (i.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let _ = i.read(0, 0, 16);
                }
            })
        })
        .collect();
    for n in 0..2000u32 {
        i.remove(0, false).unwrap();
        i.write(0, 0, &n.to_le_bytes(), false).unwrap();
        // What is on disk under the object's name must be the write just acked.
        let on_disk = std::fs::read(i.object_path(0)).unwrap();
        assert_eq!(
            on_disk,
            n.to_le_bytes(),
            "write {n} went to an unlinked file"
        );
    }
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.join().unwrap();
    }
    img.close().await.unwrap();
}

#[tokio::test]
async fn fd_cache_is_bounded() {
    let (_d, s) = setup().await;
    let img = open(&s, "vm1", OpenMode::ReadWrite).await;
    for o in 0..(FD_CACHE_SIZE as u64 + 20) {
        img.write(o, 0, Bytes::from_static(b"z"), false)
            .await
            .unwrap();
    }
    assert!(lock(&img.inner.fds).len() <= FD_CACHE_SIZE);
    img.sync().await.unwrap();
    for o in 0..(FD_CACHE_SIZE as u64 + 20) {
        assert_eq!(&img.read(o, 0, 1, None).await.unwrap().unwrap()[..], b"z");
    }
    img.close().await.unwrap();
}

#[tokio::test]
async fn second_writer_is_busy() {
    let (_d, s) = setup().await;
    let a = open(&s, "vm1", OpenMode::ReadWrite).await;
    let e = open_err(&s, "vm1", OpenMode::ReadWrite).await;
    assert_eq!(e.kind, ErrorKind::Busy);
    assert!(e.message.contains("rbd/vm1 is in use"), "{e}");
    assert_eq!(
        s.remove_image(&spec("vm1")).await.unwrap_err().kind,
        ErrorKind::Busy
    );
    // Readers are not locked out.
    let r = open(&s, "vm1", OpenMode::ReadOnly).await;
    assert_eq!(
        r.write(0, 0, Bytes::from_static(b"x"), false)
            .await
            .unwrap_err()
            .kind,
        ErrorKind::ReadOnly
    );
    assert_eq!(
        r.set_flags(1, 1).await.unwrap_err().kind,
        ErrorKind::ReadOnly
    );
    a.close().await.unwrap();
    let b = open(&s, "vm1", OpenMode::ReadWrite).await;
    drop(b); // dropping without close releases the lock too (a crash does)
    open(&s, "vm1", OpenMode::ReadWrite)
        .await
        .close()
        .await
        .unwrap();
}

#[tokio::test]
async fn shared_writers_coexist_but_exclude_an_exclusive_one() {
    let (_d, s) = setup().await;
    let a = open(&s, "vm1", OpenMode::SharedWrite).await;
    let b = open(&s, "vm1", OpenMode::SharedWrite).await;
    a.write(0, 0, Bytes::from_static(b"a"), false)
        .await
        .unwrap();
    b.write(0, 1, Bytes::from_static(b"b"), true).await.unwrap();
    assert_eq!(&a.read(0, 0, 2, None).await.unwrap().unwrap()[..], b"ab");
    let e = open_err(&s, "vm1", OpenMode::ReadWrite).await;
    assert_eq!(e.kind, ErrorKind::Busy);
    a.close().await.unwrap();
    b.close().await.unwrap();
    let x = open(&s, "vm1", OpenMode::ReadWrite).await;
    let e = open_err(&s, "vm1", OpenMode::SharedWrite).await;
    assert_eq!(e.kind, ErrorKind::Busy);
    assert!(e.message.contains("not as a shared image"), "{e}");
    x.close().await.unwrap();
}

/// A shared writer's cached descriptor of an object another writer removed (a
/// whole-object discard unlinks the file) must not take later writes: they would go
/// into the unlinked inode and be lost.
#[tokio::test]
async fn a_shared_writer_does_not_write_into_an_object_another_removed() {
    let (_d, s) = setup().await;
    let a = open(&s, "vm1", OpenMode::SharedWrite).await;
    let b = open(&s, "vm1", OpenMode::SharedWrite).await;
    b.write(0, 0, Bytes::from_static(b"old"), false)
        .await
        .unwrap();
    a.remove(0, false).await.unwrap();
    assert!(a.read(0, 0, 3, None).await.unwrap().is_none());
    // Both the small inline path and the blocking path use the cache.
    b.write(0, 0, Bytes::from_static(b"new"), false)
        .await
        .unwrap();
    assert_eq!(&a.read(0, 0, 3, None).await.unwrap().unwrap()[..], b"new");
    a.remove(0, false).await.unwrap();
    b.write(0, 8, Bytes::from(vec![7u8; 128 << 10]), true)
        .await
        .unwrap();
    let got = a.read(0, 8, 128 << 10, None).await.unwrap().unwrap();
    assert!(got.iter().all(|&x| x == 7));
    a.close().await.unwrap();
    b.close().await.unwrap();
}

/// Copy-on-write for a snapshot cannot be coordinated between processes (a writer's
/// open descriptor would follow the old file into the snapshot), so an image with
/// snapshots has no shared writers.
#[tokio::test]
async fn an_image_with_snapshots_refuses_shared_writers() {
    let (_d, s) = setup().await;
    let img = open(&s, "vm1", OpenMode::ReadWrite).await;
    let id = img.snap_create("s1").await.unwrap();
    img.close().await.unwrap();
    let e = open_err(&s, "vm1", OpenMode::SharedWrite).await;
    assert_eq!(e.kind, ErrorKind::Unsupported);
    assert!(e.message.contains("has snapshots"), "{e}");
    // Readers and the exclusive writer are unaffected; without snapshots it opens.
    open(&s, "vm1", OpenMode::ReadOnly)
        .await
        .close()
        .await
        .unwrap();
    let img = open(&s, "vm1", OpenMode::ReadWrite).await;
    img.snap_remove(id).await.unwrap();
    img.close().await.unwrap();
    open(&s, "vm1", OpenMode::SharedWrite)
        .await
        .close()
        .await
        .unwrap();
}

#[tokio::test]
async fn flags_meta_and_object_map_persist_atomically() {
    let (d, s) = setup().await;
    let img = open(&s, "vm1", OpenMode::ReadWrite).await;
    img.set_flags(3, 3).await.unwrap();
    img.set_flags(0, 2).await.unwrap();
    img.set_meta("rados-nbd.shared", "true").await.unwrap();
    assert_eq!(img.read_object_map(None).await.unwrap(), None);
    img.write_object_map(vec![9; 10]).await.unwrap();
    let id = img.header().id;
    img.close().await.unwrap();
    let pool = d.path().join("rbd");
    let tmp: Vec<_> = std::fs::read_dir(&pool)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains(".tmp")
        })
        .collect();
    assert!(tmp.is_empty());
    let raw: serde_json::Value =
        serde_json::from_slice(&std::fs::read(pool.join(format!("rbd_header.{id}"))).unwrap())
            .unwrap();
    assert_eq!(raw["flags"], 1);
    assert_eq!(raw["metadata"]["rados-nbd.shared"], "true");
    let r = open(&s, "vm1", OpenMode::ReadOnly).await;
    assert_eq!(r.header().flags, 1);
    assert_eq!(
        r.get_meta("rados-nbd.shared").await.unwrap().as_deref(),
        Some("true")
    );
    assert_eq!(r.get_meta("nope").await.unwrap(), None);
    assert_eq!(r.read_object_map(None).await.unwrap(), Some(vec![9; 10]));
    assert_eq!(r.refresh_header().await.unwrap().flags, 1);
    r.close().await.unwrap();
}

#[tokio::test]
async fn corrupt_or_missing_header_is_named() {
    let (d, s) = setup().await;
    let pool = d.path().join("rbd");
    let id = std::fs::read_to_string(pool.join("rbd_id.vm1")).unwrap();
    let hp = pool.join(format!("rbd_header.{id}"));
    let good = std::fs::read(&hp).unwrap();
    std::fs::write(&hp, b"{not json").unwrap();
    let e = open_err(&s, "vm1", OpenMode::ReadOnly).await;
    assert_eq!(e.kind, ErrorKind::Corrupt);
    assert!(e.message.contains(&hp.display().to_string()), "{e}");
    let mut h: serde_json::Value = serde_json::from_slice(&good).unwrap();
    h["order"] = 40.into();
    std::fs::write(&hp, serde_json::to_vec(&h).unwrap()).unwrap();
    let e = open_err(&s, "vm1", OpenMode::ReadWrite).await;
    assert_eq!(e.kind, ErrorKind::Corrupt);
    assert!(e.message.contains("order 40"), "{e}");
    std::fs::remove_file(&hp).unwrap();
    let e = open_err(&s, "vm1", OpenMode::ReadOnly).await;
    assert_eq!(e.kind, ErrorKind::NotFound);
    assert!(e.message.contains(&hp.display().to_string()), "{e}");
    // A broken image can still be removed.
    s.remove_image(&spec("vm1")).await.unwrap();
    assert!(s.list_images("rbd").await.unwrap().is_empty());
}

#[tokio::test]
async fn snapshots_are_read_only_and_named() {
    let (_d, s) = setup().await;
    let e = open_err(&s, "vm1@s1", OpenMode::ReadWrite).await;
    assert_eq!(e.kind, ErrorKind::ReadOnly);
    let e = open_err(&s, "vm1@s1", OpenMode::ReadOnly).await;
    assert_eq!(e.kind, ErrorKind::NotFound);
    assert!(e.message.contains("rbd/vm1@s1"), "{e}");
}

#[test]
fn os_errors_map_to_kinds() {
    let k = |n| Error::io("x", std::io::Error::from_raw_os_error(n)).kind;
    assert_eq!(k(libc::ENOSPC), ErrorKind::NoSpace);
    assert_eq!(k(libc::EDQUOT), ErrorKind::NoSpace);
    assert_eq!(k(libc::EIO), ErrorKind::Io);
    assert_eq!(k(libc::ENOENT), ErrorKind::NotFound);
}

// --- Snapshots and clones.

/// A small-object image (4 KiB objects) for the snapshot tests.
async fn small(s: &DirStore, name: &str, objects: u64) -> DirImage {
    let o = CreateOptions {
        size: objects << 12,
        order: 12,
        features: DEFAULT_FEATURES,
        data_pool: None,
        stripe_unit: None,
    };
    s.create_image(&spec(name), &o).await.unwrap();
    open(s, name, OpenMode::ReadWrite).await
}

async fn get(img: &DirImage, objno: u64, snap: Option<u64>) -> Option<Vec<u8>> {
    img.read(objno, 0, 1 << 12, snap)
        .await
        .unwrap()
        .map(|b| b.to_vec())
}

fn b(s: &'static [u8]) -> Bytes {
    Bytes::from_static(s)
}

#[tokio::test]
async fn snapshots_keep_what_objects_had() {
    use ObjectState::{Exists, ExistsClean};
    let d = tempfile::tempdir().unwrap();
    let s = DirStore::new(d.path());
    let img = small(&s, "vm1", 4).await;
    img.write(0, 0, b(b"aaaa"), false).await.unwrap();
    img.write(2, 0, b(b"cc"), false).await.unwrap();
    img.write(3, 0, b(b"dd"), false).await.unwrap();
    let s1 = img.snap_create("s1").await.unwrap();
    assert_eq!(s1, 1);
    // Overwrite, create, remove, zero: each first change after s1 keeps the old data.
    img.write(0, 1, b(b"B"), false).await.unwrap();
    img.write(0, 2, b(b"C"), false).await.unwrap();
    img.write(1, 0, b(b"new"), false).await.unwrap();
    img.remove(2, false).await.unwrap();
    let s2 = img.snap_create("s2").await.unwrap();
    img.zero(3, 0, 2, false).await.unwrap();
    assert_eq!(get(&img, 0, Some(s1)).await.unwrap(), b"aaaa");
    assert_eq!(get(&img, 0, Some(s2)).await.unwrap(), b"aBCa");
    assert_eq!(get(&img, 0, None).await.unwrap(), b"aBCa");
    assert_eq!(get(&img, 1, Some(s1)).await, None);
    assert_eq!(get(&img, 1, Some(s2)).await.unwrap(), b"new");
    assert_eq!(get(&img, 2, Some(s1)).await.unwrap(), b"cc");
    assert_eq!(get(&img, 2, Some(s2)).await, None);
    assert_eq!(get(&img, 2, None).await, None);
    assert_eq!(get(&img, 3, Some(s2)).await.unwrap(), b"dd");
    assert_eq!(get(&img, 3, None).await.unwrap(), [0, 0]);
    assert_eq!(img.list_objects(None).await.unwrap(), [0, 1, 3]);
    assert_eq!(img.list_objects(Some(s1)).await.unwrap(), [0, 2, 3]);
    assert_eq!(img.list_objects(Some(s2)).await.unwrap(), [0, 1, 3]);
    // librbd's states: written since the snapshot before = EXISTS, else EXISTS_CLEAN.
    assert_eq!(
        img.list_object_states(Some(s2)).await.unwrap(),
        [(0, Exists), (1, Exists), (3, ExistsClean)]
    );
    assert_eq!(
        img.list_object_states(None).await.unwrap(),
        [(0, ExistsClean), (1, ExistsClean), (3, Exists)]
    );
    // IMAGE@SNAP opens read-only at that point in time, with its own map and flags.
    img.write_snap_object_map(s1, vec![7, 7]).await.unwrap();
    let ro = open(&s, "vm1@s1", OpenMode::ReadOnly).await;
    assert_eq!(ro.read(0, 0, 4, None).await.unwrap().unwrap(), &b"aaaa"[..]);
    assert_eq!(ro.read_object_map(None).await.unwrap().unwrap(), [7, 7]);
    assert_eq!(ro.snap_flags(s1).await.unwrap(), 0);
    assert_eq!(ro.list_objects(None).await.unwrap(), [0, 2, 3]);
    let h = img.header();
    assert_eq!(h.snap_seq, 2);
    assert_eq!(
        h.snaps.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
        ["s2", "s1"]
    );
    assert!(h.snaps[0].timestamp.is_some());
    // Removing s1 drops what only it kept, its map and its record; s2 still reads right.
    img.snap_remove(s1).await.unwrap();
    assert!(img.read_object_map(Some(s1)).await.unwrap().is_none());
    assert_eq!(
        super::snap::versions_of(img.pool_dir(), &h.object_prefix, 2),
        []
    );
    assert_eq!(get(&img, 0, Some(s2)).await.unwrap(), b"aBCa");
    assert_eq!(get(&img, 3, Some(s2)).await.unwrap(), b"dd");
    img.snap_remove(s2).await.unwrap();
    let pool = d.path().join("rbd");
    let left: Vec<String> = std::fs::read_dir(&pool)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.contains('@') || n.contains("tmp"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    assert_eq!(get(&img, 3, None).await.unwrap(), [0, 0]);
    img.close().await.unwrap();
}

/// `rename`: the id file under the new name, the directory entry moved, the old id file
/// gone; the data, kept by id, untouched; a name taken or a name the directory lacks
/// refused with nothing changed.
#[tokio::test]
async fn rename_moves_the_name_only() {
    let d = tempfile::tempdir().unwrap();
    let s = DirStore::new(d.path());
    let img = small(&s, "vm1", 2).await;
    img.write(0, 0, Bytes::from(vec![7u8; 4096]), false)
        .await
        .unwrap();
    img.rename("vm2").await.unwrap();
    let pool = d.path().join("rbd");
    assert!(pool.join("rbd_id.vm2").exists() && !pool.join("rbd_id.vm1").exists());
    assert_eq!(s.list_images("rbd").await.unwrap(), vec!["vm2".to_string()]);
    // Still writable under the handle opened by the old name, from the name it has now.
    img.write(1, 0, Bytes::from(vec![8u8; 4096]), false)
        .await
        .unwrap();
    small(&s, "other", 1).await.close().await.unwrap();
    let e = img.rename("other").await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::AlreadyExists);
    assert!(
        e.message.contains("rbd/vm2") && e.message.contains("rbd/other"),
        "{e}"
    );
    img.rename("vm3").await.unwrap();
    img.close().await.unwrap();
    let img = open(&s, "vm3", OpenMode::ReadOnly).await;
    assert_eq!(
        &img.read(0, 0, 4096, None).await.unwrap().unwrap()[..],
        &[7u8; 4096][..]
    );
    assert_eq!(
        &img.read(1, 0, 4096, None).await.unwrap().unwrap()[..],
        &[8u8; 4096][..]
    );
    let mut names = s.list_images("rbd").await.unwrap();
    names.sort();
    assert_eq!(names, vec!["other".to_string(), "vm3".to_string()]);
    // A read-only handle renames nothing.
    assert!(img.rename("vm4").await.is_err());
    assert!(!pool.join("rbd_id.vm4").exists());
}

/// Names as rbd takes them fit this store up to 248 bytes (the id file `rbd_id.NAME` is a
/// file name of at most 255): longer ones are refused, by create and by rename, with
/// nothing written (a create once left its header behind when the id file failed).
#[tokio::test]
async fn long_names_fit_or_are_refused_with_nothing_written() {
    let d = tempfile::tempdir().unwrap();
    let s = DirStore::new(d.path());
    let pool = d.path().join("rbd");
    let files = || -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&pool)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    };
    // 248 bytes, multi-byte characters and white space among them.
    let longest = format!("ü 名{}", "x".repeat(248 - "ü 名".len()));
    assert_eq!(longest.len(), 248);
    let img = small(&s, &longest, 2).await;
    img.write(0, 0, Bytes::from(vec![5u8; 4096]), false)
        .await
        .unwrap();
    let before = files();
    let too_long = format!("{longest}y");
    let e = img.rename(&too_long).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidInput, "{e}");
    assert!(e.message.contains("at most 248"), "{e}");
    assert_eq!(files(), before);
    let o = CreateOptions {
        size: 1 << 20,
        order: 12,
        features: DEFAULT_FEATURES,
        data_pool: None,
        stripe_unit: None,
    };
    let e = s.create_image(&spec(&too_long), &o).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidInput, "{e}");
    assert_eq!(files(), before);
    let other = format!("{}z", &longest[..longest.len() - 1]);
    img.rename(&other).await.unwrap();
    img.close().await.unwrap();
    assert_eq!(s.list_images("rbd").await.unwrap(), vec![other.clone()]);
    let img = open(&s, &other, OpenMode::ReadOnly).await;
    assert_eq!(
        &img.read(0, 0, 4096, None).await.unwrap().unwrap()[..],
        &[5u8; 4096][..]
    );
    img.close().await.unwrap();
    assert!(
        files().iter().all(|f| !f.contains(".tmp.")),
        "{:?}",
        files()
    );
}

#[tokio::test]
async fn snapshot_management_errors_are_named() {
    let d = tempfile::tempdir().unwrap();
    let s = DirStore::new(d.path());
    let img = small(&s, "vm1", 2).await;
    let id = img.snap_create("s1").await.unwrap();
    let e = img.snap_create("s1").await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::AlreadyExists);
    img.snap_rename(id, "t1").await.unwrap();
    assert_eq!(img.header().snaps[0].name, "t1");
    img.snap_set_protected(id, true).await.unwrap();
    assert!(img.header().snaps[0].protected);
    let e = img.snap_remove(id).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Busy);
    assert!(
        e.message.contains("t1") && e.message.contains("protected"),
        "{e}"
    );
    img.close().await.unwrap();
    let e = s.remove_image(&spec("vm1")).await.unwrap_err();
    assert!(e.message.contains("has 1 snapshot"), "{e}");
    let img = open(&s, "vm1", OpenMode::ReadWrite).await;
    img.snap_set_protected(id, false).await.unwrap();
    img.snap_remove(id).await.unwrap();
    assert_eq!(
        img.snap_remove(id).await.unwrap_err().kind,
        ErrorKind::NotFound
    );
    // A read-only handle makes none.
    let ro = open(&s, "vm1", OpenMode::ReadOnly).await;
    assert_eq!(
        ro.snap_create("x").await.unwrap_err().kind,
        ErrorKind::ReadOnly
    );
    img.close().await.unwrap();
    // Nor does a shared writer: other shared writers would not preserve for it.
    let sh = open(&s, "vm1", OpenMode::SharedWrite).await;
    let e = sh.snap_create("x").await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Busy);
    assert!(e.message.contains("exclusive lock"), "{e}");
    sh.close().await.unwrap();
    s.remove_image(&spec("vm1")).await.unwrap();
}

/// A tiny deterministic generator (xorshift64*), so failures reproduce from the seed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// What the image should hold: the head and every snapshot, and when each object was
/// changed (as the snapshot sequence at the time), for the map states.
#[derive(Default)]
struct Model {
    head: BTreeMap<u64, Vec<u8>>,
    snaps: BTreeMap<u64, BTreeMap<u64, Vec<u8>>>,
    changed: BTreeMap<u64, Vec<u64>>,
    seq: u64,
}

impl Model {
    fn changed_in(&self, objno: u64, from: u64, to: u64) -> bool {
        self.changed
            .get(&objno)
            .is_some_and(|v| v.iter().any(|&q| q >= from && q < to))
    }

    /// librbd's state of `objno` at `at` (None: the head), fast-diff on.
    fn state(&self, objno: u64, at: Option<u64>) -> Option<ObjectState> {
        let ids: Vec<u64> = self.snaps.keys().copied().collect();
        let (content, prev, upto) = match at {
            None => (&self.head, ids.last().copied(), u64::MAX),
            Some(s) => (
                &self.snaps[&s],
                ids.iter().rev().find(|&&i| i < s).copied(),
                s,
            ),
        };
        content.get(&objno)?;
        Some(match prev {
            None => ObjectState::Exists,
            Some(p) if self.changed_in(objno, p, upto) => ObjectState::Exists,
            Some(_) => ObjectState::ExistsClean,
        })
    }
}

async fn check_model(img: &DirImage, m: &Model, objects: u64, what: &str) {
    let views: Vec<Option<u64>> = std::iter::once(None)
        .chain(m.snaps.keys().map(|&s| Some(s)))
        .collect();
    for at in views {
        let content = at.map_or(&m.head, |s| &m.snaps[&s]);
        let mut want_states = vec![];
        for o in 0..objects {
            let got = get(img, o, at).await;
            assert_eq!(
                got.as_ref(),
                content.get(&o),
                "{what}: object {o} at {at:?}"
            );
            if let Some(st) = m.state(o, at) {
                want_states.push((o, st));
            }
        }
        let got = img.list_object_states(at).await.unwrap();
        assert_eq!(got, want_states, "{what}: states at {at:?}");
    }
    check_deltas(img, m, objects, what).await;
}

/// The exact diffs (`diff` without --whole-object) between every two versions, from the
/// snap sets with sizes and overlaps: every byte that differs is listed, what is listed
/// as "zero" reads as zeros at the end, "data" only where the object exists there.
async fn check_deltas(img: &DirImage, m: &Model, objects: u64, what: &str) {
    use crate::store::snapset::{object_delta, SNAP_HEAD};
    let sets = img.object_snap_sets((0..objects).collect()).await.unwrap();
    let ends: Vec<u64> = m.snaps.keys().copied().chain([SNAP_HEAD]).collect();
    let content = |at: u64| {
        if at == SNAP_HEAD {
            &m.head
        } else {
            &m.snaps[&at]
        }
    };
    let byte = |v: Option<&Vec<u8>>, i: usize| v.and_then(|v| v.get(i)).copied().unwrap_or(0);
    for &end in &ends {
        for from in std::iter::once(0).chain(ends.iter().copied().filter(|&f| f < end)) {
            for (o, set) in &sets {
                let delta = match set {
                    Some(set) => object_delta(set, from, end, 4096, 4096, false),
                    None => vec![],
                };
                let (a, b) = (
                    (from > 0).then(|| content(from).get(o)).flatten(),
                    content(end).get(o),
                );
                let listed = |i: u64| delta.iter().find(|e| e.0 <= i && i < e.0 + e.1);
                for i in 0..4096u64 {
                    let (x, y) = (byte(a, i as usize), byte(b, i as usize));
                    let e = listed(i);
                    assert!(
                        x == y || e.is_some(),
                        "{what}: object {o} byte {i} differs from {from} to {end} but is not listed: {delta:?}"
                    );
                    if let Some(&(_, _, data)) = e {
                        assert!(
                            data || y == 0,
                            "{what}: object {o} byte {i} listed as zero from {from} to {end} reads {y}"
                        );
                        assert!(
                            !data || b.is_some(),
                            "{what}: object {o} listed as data from {from} to {end} but gone there"
                        );
                    }
                }
            }
        }
    }
}

/// Random writes, zeros and removals interleaved with snapshot creation and removal
/// (and reopening, and read-only handles held at snapshots while the head changes):
/// every view reads what the model says, and rebuilt map states are librbd's.
#[tokio::test]
async fn generated_sequences_match_the_model() {
    const OBJECTS: u64 = 5;
    for seed in [1u64, 7, 42, 1234] {
        let d = tempfile::tempdir().unwrap();
        let s = DirStore::new(d.path());
        let mut img = small(&s, "vm1", OBJECTS).await;
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let mut m = Model::default();
        let mut held: Vec<(DirImage, u64)> = vec![];
        for step in 0..160 {
            let what = format!("seed {seed} step {step}");
            let o = rng.below(OBJECTS);
            match rng.below(20) {
                0..=8 => {
                    let off = rng.below(4096);
                    let len = 1 + rng.below((4096 - off).min(600));
                    let byte = 1 + rng.below(255) as u8;
                    img.write(
                        o,
                        off,
                        Bytes::from(vec![byte; len as usize]),
                        rng.below(4) == 0,
                    )
                    .await
                    .unwrap();
                    let v = m.head.entry(o).or_default();
                    if v.len() < (off + len) as usize {
                        v.resize((off + len) as usize, 0);
                    }
                    v[off as usize..(off + len) as usize].fill(byte);
                    m.changed.entry(o).or_default().push(m.seq);
                }
                9..=11 => {
                    let off = rng.below(4096);
                    let len = 1 + rng.below(4096 - off);
                    img.zero(o, off, len, false).await.unwrap();
                    if let Some(v) = m.head.get_mut(&o) {
                        let end = ((off + len) as usize).min(v.len());
                        if (off as usize) < end {
                            v[off as usize..end].fill(0);
                        }
                        m.changed.entry(o).or_default().push(m.seq);
                    }
                }
                12..=13 => {
                    img.remove(o, false).await.unwrap();
                    if m.head.remove(&o).is_some() {
                        m.changed.entry(o).or_default().push(m.seq);
                    }
                }
                14..=15 => {
                    let id = img.snap_create(&format!("s{step}")).await.unwrap();
                    assert_eq!(id, m.seq + 1, "{what}");
                    m.seq = id;
                    m.snaps.insert(id, m.head.clone());
                    if rng.below(2) == 0 {
                        let ro = open(&s, &format!("vm1@s{step}"), OpenMode::ReadOnly).await;
                        held.push((ro, id));
                    }
                }
                16..=17 => {
                    let ids: Vec<u64> = m.snaps.keys().copied().collect();
                    if !ids.is_empty() {
                        let id = ids[rng.below(ids.len() as u64) as usize];
                        img.snap_remove(id).await.unwrap();
                        m.snaps.remove(&id);
                        held.retain(|(_, s)| *s != id);
                    }
                }
                18 => {
                    img.close().await.unwrap();
                    img = open(&s, "vm1", OpenMode::ReadWrite).await;
                }
                _ => {
                    // Read-only handles opened before later snapshots and writes still
                    // read their point in time.
                    for (ro, id) in &held {
                        for o in 0..OBJECTS {
                            assert_eq!(
                                get(ro, o, None).await.as_ref(),
                                m.snaps[id].get(&o),
                                "{what}: held handle at {id}, object {o}"
                            );
                        }
                    }
                }
            }
            if step % 8 == 7 {
                check_model(&img, &m, OBJECTS, &what).await;
            }
        }
        check_model(&img, &m, OBJECTS, &format!("seed {seed} end")).await;
        // Reopened, the same.
        img.close().await.unwrap();
        let img = open(&s, "vm1", OpenMode::ReadWrite).await;
        check_model(&img, &m, OBJECTS, &format!("seed {seed} reopened")).await;
    }
}

/// A crash inside copy-on-write: after the head was linked as the version but before
/// the copy replaced the head (head and version share an inode), and after the version
/// was in place but before the head write. After reopening, both views are right and
/// the version is never written through the head.
#[tokio::test]
async fn copy_on_write_survives_a_crash_at_each_step() {
    let d = tempfile::tempdir().unwrap();
    let s = DirStore::new(d.path());
    let img = small(&s, "vm1", 2).await;
    img.write(0, 0, b(b"old0"), true).await.unwrap();
    img.write(1, 0, b(b"old1"), true).await.unwrap();
    let s1 = img.snap_create("s1").await.unwrap();
    let pool = img.pool_dir().to_path_buf();
    let prefix = img.header().object_prefix;
    img.close().await.unwrap();
    // Object 0: crashed between link and rename.
    let head0 = pool.join(format!("{prefix}.{:016x}", 0));
    let v0 = pool.join(format!("{prefix}.{:016x}@{s1:016x}", 0));
    std::fs::hard_link(&head0, &v0).unwrap();
    // Object 1: crashed after the version was in place, before the head write.
    let head1 = pool.join(format!("{prefix}.{:016x}", 1));
    let v1 = pool.join(format!("{prefix}.{:016x}@{s1:016x}", 1));
    std::fs::copy(&head1, &v1).unwrap();

    let img = open(&s, "vm1", OpenMode::ReadWrite).await;
    for o in 0..2 {
        assert_eq!(
            get(&img, o, Some(s1)).await.unwrap(),
            format!("old{o}").as_bytes()
        );
    }
    img.write(0, 0, b(b"NEW0"), false).await.unwrap();
    img.write(1, 0, b(b"NEW1"), false).await.unwrap();
    for o in 0..2 {
        assert_eq!(
            get(&img, o, Some(s1)).await.unwrap(),
            format!("old{o}").as_bytes()
        );
        assert_eq!(
            get(&img, o, None).await.unwrap(),
            format!("NEW{o}").as_bytes()
        );
    }
    assert_eq!(std::fs::metadata(&v0).unwrap().nlink(), 1);
    assert_eq!(std::fs::metadata(&head0).unwrap().nlink(), 1);
    // One version each: the interrupted one was reused, not made twice.
    assert_eq!(super::snap::versions_of(&pool, &prefix, 0), [(s1, true)]);
    assert_eq!(super::snap::versions_of(&pool, &prefix, 1), [(s1, true)]);
    img.close().await.unwrap();
}

/// A crash between link and rename left the head sharing its inode with an older
/// snapshot's version, and a snapshot was taken since: the next write or removal must
/// still keep the data for the new snapshot (before: the link count alone was taken to
/// mean "already kept", and the new snapshot read the new data, or nothing).
#[tokio::test]
async fn an_interrupted_copy_on_write_under_a_newer_snapshot_keeps_it() {
    let d = tempfile::tempdir().unwrap();
    let s = DirStore::new(d.path());
    let img = small(&s, "vm1", 2).await;
    img.write(0, 0, b(b"old0"), true).await.unwrap();
    img.write(1, 0, b(b"old1"), true).await.unwrap();
    let s1 = img.snap_create("s1").await.unwrap();
    let pool = img.pool_dir().to_path_buf();
    let prefix = img.header().object_prefix;
    img.close().await.unwrap();
    for o in 0..2u64 {
        let head = pool.join(format!("{prefix}.{o:016x}"));
        let v = pool.join(format!("{prefix}.{o:016x}@{s1:016x}"));
        std::fs::hard_link(&head, &v).unwrap();
    }
    let img = open(&s, "vm1", OpenMode::ReadWrite).await;
    let s2 = img.snap_create("s2").await.unwrap();
    img.write(0, 0, b(b"NEW0"), false).await.unwrap();
    img.remove(1, false).await.unwrap();
    for o in 0..2u64 {
        for snap in [s1, s2] {
            assert_eq!(
                get(&img, o, Some(snap)).await.as_deref(),
                Some(format!("old{o}").as_bytes()),
                "object {o} at snapshot {snap}"
            );
        }
    }
    assert_eq!(get(&img, 0, None).await.unwrap(), b"NEW0");
    assert_eq!(get(&img, 1, None).await, None);
    img.close().await.unwrap();
    // The same after s1 goes: s2 keeps the data.
    let img = open(&s, "vm1", OpenMode::ReadWrite).await;
    img.snap_remove(s1).await.unwrap();
    for o in 0..2u64 {
        assert_eq!(
            get(&img, o, Some(s2)).await.as_deref(),
            Some(format!("old{o}").as_bytes()),
            "object {o} at snapshot {s2} after {s1} was removed"
        );
    }
    img.close().await.unwrap();
}

/// A snapshot removed while another handle (a `serve IMAGE@SNAP`) reads it: its reads
/// fail, as soon as the removal began, rather than find a later state (they once found
/// the head's bytes); the other snapshots and the head read as before.
#[tokio::test]
async fn reads_of_a_snapshot_removed_meanwhile_fail() {
    let d = tempfile::tempdir().unwrap();
    let s = DirStore::new(d.path());
    let img = small(&s, "vm1", 2).await;
    img.write(0, 0, b(b"one"), false).await.unwrap();
    let s1 = img.snap_create("s1").await.unwrap();
    img.write(0, 0, b(b"two"), false).await.unwrap();
    let s2 = img.snap_create("s2").await.unwrap();
    img.write(0, 0, b(b"six"), false).await.unwrap();
    let r1 = open(&s, "vm1@s1", OpenMode::ReadOnly).await;
    let r2 = open(&s, "vm1@s2", OpenMode::ReadOnly).await;
    assert_eq!(get(&r1, 0, None).await.unwrap(), b"one");
    assert_eq!(get(&r2, 0, None).await.unwrap(), b"two");
    img.snap_remove(s1).await.unwrap();
    let e = r1.read(0, 0, 3, None).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotFound, "{e}");
    assert!(e.message.contains("no longer exists"), "{e}");
    // Also an object the snapshot never had a version of (the head's inode).
    assert!(r1.read(1, 0, 3, None).await.is_err());
    assert_eq!(get(&r2, 0, None).await.unwrap(), b"two");
    assert_eq!(get(&img, 0, Some(s2)).await.unwrap(), b"two");
    assert_eq!(get(&img, 0, None).await.unwrap(), b"six");
    // Mid-removal (the header dropped it, its versions not yet moved on): failing too.
    img.inner
        .update_header(|h| {
            h.snapshots.retain(|x| x.id != s2);
            h.removing.push(s2);
            Ok(())
        })
        .unwrap();
    assert!(r2.read(0, 0, 3, None).await.is_err());
    for h in [r1, r2, img] {
        h.close().await.unwrap();
    }
}

/// A snapshot removal interrupted after the header dropped the snapshot but before its
/// versions were renamed: readers still find them, and the next writer finishes it.
#[tokio::test]
async fn an_interrupted_snapshot_removal_is_finished() {
    let d = tempfile::tempdir().unwrap();
    let s = DirStore::new(d.path());
    let img = small(&s, "vm1", 1).await;
    img.write(0, 0, b(b"one"), false).await.unwrap();
    let s1 = img.snap_create("s1").await.unwrap();
    let s2 = img.snap_create("s2").await.unwrap();
    img.write(0, 0, b(b"two"), false).await.unwrap();
    // The version of s1 and s2 is filed under s2; "remove" s2 in the header only.
    img.inner
        .update_header(|h| {
            h.snapshots.retain(|x| x.id != s2);
            h.removing.push(s2);
            Ok(())
        })
        .unwrap();
    assert_eq!(get(&img, 0, Some(s1)).await.unwrap(), b"one");
    img.close().await.unwrap();
    let img = open(&s, "vm1", OpenMode::ReadWrite).await;
    let prefix = img.header().object_prefix;
    assert_eq!(
        super::snap::versions_of(img.pool_dir(), &prefix, 0),
        [(s1, true)]
    );
    img.write(0, 0, b(b"six"), false).await.unwrap();
    assert_eq!(get(&img, 0, Some(s1)).await.unwrap(), b"one");
    assert_eq!(get(&img, 0, None).await.unwrap(), b"six");
    img.close().await.unwrap();
}

fn clone_opts(format: u8) -> CloneOptions {
    CloneOptions {
        clone_format: format,
        features: DEFAULT_FEATURES,
        order: 12,
        data_pool: None,
        stripe_unit: None,
    }
}

#[tokio::test]
async fn clones_link_to_their_parent_snapshot() {
    let d = tempfile::tempdir().unwrap();
    let s = DirStore::new(d.path());
    let p = small(&s, "base", 4).await;
    p.write(0, 0, b(b"gold"), false).await.unwrap();
    let snap = p.snap_create("s1").await.unwrap();
    p.write(0, 0, b(b"GOLD"), false).await.unwrap();
    // Format 1 needs a protected snapshot; format 2 does not.
    let e = s
        .clone_image(&spec("base@s1"), &spec("c1"), &clone_opts(1))
        .await
        .unwrap_err();
    assert!(e.message.contains("not protected"), "{e}");
    assert!(s.list_images("rbd").await.unwrap() == ["base"]);
    let e = s
        .clone_image(&spec("base@nope"), &spec("c1"), &clone_opts(2))
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotFound);
    // c1 without deep-flatten: its snapshot keeps the parent after a detach (below).
    let shallow = CloneOptions {
        features: DEFAULT_FEATURES & !RBD_FEATURE_DEEP_FLATTEN,
        ..clone_opts(2)
    };
    s.clone_image(&spec("base@s1"), &spec("c1"), &shallow)
        .await
        .unwrap();
    p.snap_set_protected(snap, true).await.unwrap();
    s.clone_image(&spec("base@s1"), &spec("p2/c2"), &clone_opts(1))
        .await
        .unwrap();
    assert_eq!(
        kids(&s, "base@s1", false).await,
        [spec("p2/c2"), spec("c1")]
    );
    let c = open(&s, "c1", OpenMode::ReadWrite).await;
    let h = c.header();
    let par = h.parent.clone().unwrap();
    assert_eq!(par.spec, spec("base@s1"));
    assert_eq!(
        (par.image_id, par.snap_id, par.overlap),
        (p.header().id, snap, 4 << 12)
    );
    assert_eq!(h.size, 4 << 12);
    // The parent opens at its snapshot, read-only; it is the end of the chain.
    let pp = c.open_parent().await.unwrap().unwrap();
    assert_eq!(get(&pp, 0, None).await.unwrap(), b"gold");
    assert!(pp.header().parent.is_none());
    assert!(pp.open_parent().await.unwrap().is_none());
    assert_eq!(
        pp.write(0, 0, b(b"x"), false).await.unwrap_err().kind,
        ErrorKind::ReadOnly
    );
    // A snapshot with clones can neither go nor be unprotected.
    let e = p.snap_remove(snap).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Busy);
    p.snap_set_protected(snap, false).await.unwrap_err();
    // Shrinking lowers the overlap for good.
    c.set_size(1 << 12).await.unwrap();
    c.set_size(4 << 12).await.unwrap();
    assert_eq!(c.header().parent.unwrap().overlap, 1 << 12);
    // A clone of a clone: the chain goes on.
    let cs = c.snap_create("cs").await.unwrap();
    s.clone_image(&spec("c1@cs"), &spec("c3"), &clone_opts(2))
        .await
        .unwrap();
    // `children IMAGE`: every snapshot's clones; --descendants: theirs too.
    assert_eq!(kids(&s, "base", false).await, [spec("p2/c2"), spec("c1")]);
    assert_eq!(
        kids(&s, "base@s1", true).await,
        [spec("p2/c2"), spec("c1"), spec("c3")]
    );
    assert_eq!(kids(&s, "c1", false).await, [spec("c3")]);
    assert!(kids(&s, "c3", true).await.is_empty());
    // `children --snap-id`: one snapshot by its id, not the image's others (base gets a
    // second snapshot with a clone of its own); an id the image lacks is NotFound.
    let s2 = p.snap_create("s2").await.unwrap();
    s.clone_image(&spec("base@s2"), &spec("c4"), &clone_opts(2))
        .await
        .unwrap();
    let by_id = async |image: &str, id: u64, descendants: bool| -> Vec<ImageSpec> {
        let v = s.children(&spec(image), Some(id), descendants).await;
        v.unwrap().into_iter().map(|c| c.spec).collect()
    };
    assert_eq!(
        by_id("base", snap, false).await,
        [spec("p2/c2"), spec("c1")]
    );
    assert_eq!(by_id("base", s2, false).await, [spec("c4")]);
    assert_eq!(
        by_id("base", snap, true).await,
        [spec("p2/c2"), spec("c1"), spec("c3")]
    );
    assert_eq!(by_id("c1", cs, false).await, [spec("c3")]);
    let e = s
        .children(&spec("c1"), Some(snap + s2 + cs + 7), false)
        .await;
    assert_eq!(e.unwrap_err().kind, ErrorKind::NotFound);
    s.remove_image(&spec("c4")).await.unwrap();
    p.snap_remove(s2).await.unwrap();
    let c3 = open(&s, "c3", OpenMode::ReadOnly).await;
    let l1 = c3.open_parent().await.unwrap().unwrap();
    assert_eq!(l1.header().parent.unwrap().spec, spec("base@s1"));
    assert!(l1.open_parent().await.unwrap().is_some());
    // Flatten's last step, and removal, drop the records in the parent.
    c.detach_parent().await.unwrap();
    assert!(c.header().parent.is_none());
    // c1's snapshot still has its parent.
    let at = open(&s, "c1@cs", OpenMode::ReadOnly).await;
    assert_eq!(at.header().parent.unwrap().spec, spec("base@s1"));
    // ... so c1 stays a child until that snapshot goes (no deep-flatten here).
    assert_eq!(
        kids(&s, "base@s1", false).await,
        [spec("p2/c2"), spec("c1")]
    );
    s.remove_image(&spec("c3")).await.unwrap();
    c.snap_remove(cs).await.unwrap();
    assert_eq!(kids(&s, "base@s1", false).await, [spec("p2/c2")]);
    s.remove_image(&spec("p2/c2")).await.unwrap();
    assert!(kids(&s, "base@s1", false).await.is_empty());
    p.snap_set_protected(snap, false).await.unwrap();
    p.snap_remove(snap).await.unwrap();
    // Reopened, the header still says so.
    c.close().await.unwrap();
    let c = open(&s, "c1", OpenMode::ReadOnly).await;
    assert!(c.header().parent.is_none());
    assert!(c.header().snaps.is_empty());
}

#[tokio::test]
async fn copyup_creates_atomically_or_applies_only_the_op() {
    let d = tempfile::tempdir().unwrap();
    let s = DirStore::new(d.path());
    let c = small(&s, "c", 4).await;
    let parent = Bytes::from(vec![b'p'; 4096]);
    c.copyup(
        0,
        parent.clone(),
        ObjectWrite::Write {
            off: 1,
            data: b(b"AB"),
        },
        false,
    )
    .await
    .unwrap();
    let mut want = vec![b'p'; 4096];
    want[1..3].copy_from_slice(b"AB");
    assert_eq!(get(&c, 0, None).await.unwrap(), want);
    // Already there: the parent data is not applied again, only the op.
    c.copyup(
        0,
        Bytes::from(vec![b'q'; 4096]),
        ObjectWrite::Zero { off: 0, len: 1 },
        false,
    )
    .await
    .unwrap();
    want[0] = 0;
    assert_eq!(get(&c, 0, None).await.unwrap(), want);
    // A truncate to 0 keeps an empty object that hides the parent.
    c.copyup(1, parent.clone(), ObjectWrite::Truncate { len: 0 }, true)
        .await
        .unwrap();
    assert_eq!(get(&c, 1, None).await.unwrap(), b"");
    // Racing copy-ups of one object: the parent data lands once, both ops apply.
    for round in 0..20u64 {
        let o = 2 + round % 2;
        c.remove(o, false).await.unwrap();
        let (a, bb) = tokio::join!(
            c.copyup(
                o,
                parent.clone(),
                ObjectWrite::Write {
                    off: 0,
                    data: b(b"X")
                },
                false
            ),
            c.copyup(
                o,
                parent.clone(),
                ObjectWrite::Write {
                    off: 9,
                    data: b(b"Y")
                },
                false
            ),
        );
        a.unwrap();
        bb.unwrap();
        let got = get(&c, o, None).await.unwrap();
        assert_eq!(
            (got[0], got[9], got.len()),
            (b'X', b'Y', 4096),
            "round {round}"
        );
        assert!(got[1..9].iter().all(|&x| x == b'p'));
    }
    // With snapshots of the child: the object did not exist in them.
    let cs = c.snap_create("cs").await.unwrap();
    c.remove(2, false).await.unwrap();
    c.copyup(3, parent.clone(), ObjectWrite::None, false)
        .await
        .unwrap();
    c.copyup(2, parent.clone(), ObjectWrite::None, false)
        .await
        .unwrap();
    assert_eq!(get(&c, 2, None).await.unwrap(), parent.to_vec());
    assert_eq!(get(&c, 2, Some(cs)).await.unwrap()[0], b'X');
    let left: Vec<String> = std::fs::read_dir(c.pool_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    c.close().await.unwrap();
}

/// Headers written before snapshots and clones existed here still open.
#[tokio::test]
async fn old_headers_without_the_new_fields_load() {
    let d = tempfile::tempdir().unwrap();
    let s = DirStore::new(d.path());
    s.create_image(&spec("vm1"), &opts(1 << 22)).await.unwrap();
    let img = open(&s, "vm1", OpenMode::ReadOnly).await;
    let id = img.header().id;
    img.close().await.unwrap();
    let old = format!(
        r#"{{"format":1,"id":"{id}","size":4194304,"order":22,"object_prefix":"rbd_data.{id}",
        "features":29,"flags":0,"snap_seq":3,"snapshots":[{{"id":3,"name":"old","size":4096}}],
        "metadata":{{}}}}"#
    );
    std::fs::write(d.path().join(format!("rbd/rbd_header.{id}")), old).unwrap();
    let img = open(&s, "vm1", OpenMode::ReadWrite).await;
    let h = img.header();
    assert!(h.parent.is_none());
    assert_eq!(h.snaps.len(), 1);
    assert_eq!((h.snaps[0].protected, h.snaps[0].timestamp), (false, None));
    assert_eq!(img.snap_flags(3).await.unwrap(), 0);
    // And what is written now round-trips.
    img.snap_set_protected(3, true).await.unwrap();
    img.close().await.unwrap();
    let img = open(&s, "vm1@old", OpenMode::ReadOnly).await;
    assert!(img.header().snaps[0].protected);
}

/// The image layer's clone reads, copy-up and flatten on this store, end to end: the
/// child reads its parent's snapshot (not the parent's head), a partial first write
/// keeps the parent's bytes around it, the maps check clean, flatten detaches.
/// Image `name` of `s` opened through the image layer, as a client's daemon would.
async fn layer_image(s: &DirStore, name: &str, read_only: bool) -> crate::image::Image<DirImage> {
    let o = crate::image::OpenOptions {
        read_only,
        shared_default: false,
        checkpoint_idle: None,
    };
    crate::image::Image::open(s, &spec(name), &o).await.unwrap()
}

/// `[off, off+len)` of `img` read through the image layer, holes as zeros.
async fn layer_bytes(img: &crate::image::Image<DirImage>, off: u64, len: u32) -> Vec<u8> {
    use nbd_protocol::{Backend, ReadChunk};
    let mut out = Vec::new();
    for c in img.read(off, len).await.unwrap() {
        match c {
            ReadChunk::Data(b) => out.extend_from_slice(&b),
            ReadChunk::Hole(n) => out.extend(std::iter::repeat_n(0u8, n as usize)),
        }
    }
    out
}

#[tokio::test]
async fn the_image_layer_serves_a_clone_of_this_store() {
    use nbd_protocol::Backend;
    const OBJ: u64 = 1 << 12;
    async fn map_problems(s: &DirStore, name: &str) -> Vec<String> {
        let h = open(s, name, OpenMode::ReadOnly).await;
        crate::cmd::object_map::check_object_map(&h, &spec(name))
            .await
            .unwrap()
    }
    let d = tempfile::tempdir().unwrap();
    let s = DirStore::new(d.path());
    let base = small(&s, "base", 4).await;
    base.write(0, 0, b(b"gold"), false).await.unwrap();
    base.write(2, 0, b(b"two"), false).await.unwrap();
    base.snap_create("s1").await.unwrap();
    base.write(0, 0, b(b"GOLD"), false).await.unwrap();
    base.close().await.unwrap();
    s.clone_image(&spec("base@s1"), &spec("c1"), &clone_opts(2))
        .await
        .unwrap();
    let c = layer_image(&s, "c1", false).await;
    assert_eq!(layer_bytes(&c, 0, 4).await, b"gold");
    c.write(1, b(b"x"), false).await.unwrap();
    c.write(3 * OBJ, b(b"new"), false).await.unwrap();
    assert_eq!(layer_bytes(&c, 0, 4).await, b"gxld");
    assert_eq!(layer_bytes(&c, 2 * OBJ, 3).await, b"two");
    c.close().await.unwrap();
    assert!(map_problems(&s, "c1").await.is_empty());
    let c = layer_image(&s, "c1", false).await;
    c.flatten(|_, _| {}).await.unwrap();
    c.close().await.unwrap();
    assert!(map_problems(&s, "c1").await.is_empty());
    assert!(kids(&s, "base@s1", false).await.is_empty());
    let c = layer_image(&s, "c1", true).await;
    assert!(c.header().parent.is_none());
    assert_eq!(layer_bytes(&c, 0, 4).await, b"gxld");
    assert_eq!(layer_bytes(&c, 2 * OBJ, 3).await, b"two");
    assert_eq!(layer_bytes(&c, 3 * OBJ, 3).await, b"new");
}

/// A clone reads its parent at the parent's snapshot, whatever the parent's head does
/// after: shrunk, rolled back to a smaller snapshot, rewritten. (A handle at a snapshot
/// once had the head's size and flags here, so the clone's reads stopped at the head's
/// new end: zeros, made permanent by a flatten or a copy-up.) Such a handle's header has
/// the snapshot's size and flags, as a Ceph handle's has.
#[tokio::test]
async fn a_clone_reads_its_parents_snapshot_whatever_the_head_does() {
    use nbd_protocol::Backend;
    const OBJ: u64 = 1 << 12;
    for how in ["shrink", "rollback"] {
        let d = tempfile::tempdir().unwrap();
        let s = DirStore::new(d.path());
        let o = CreateOptions {
            size: 4 * OBJ,
            order: 12,
            features: DEFAULT_FEATURES,
            data_pool: None,
            stripe_unit: None,
        };
        s.create_image(&spec("m"), &o).await.unwrap();
        let m = layer_image(&s, "m", false).await;
        if how == "rollback" {
            m.snap_create("small").await.unwrap();
        }
        m.resize(16 * OBJ, false).await.unwrap();
        let parent: Vec<u8> = (0..16 * OBJ).map(|i| (i % 251) as u8 + 1).collect();
        m.write(0, Bytes::from(parent.clone()), false)
            .await
            .unwrap();
        m.snap_create("m").await.unwrap();
        m.close().await.unwrap();
        let opts = CloneOptions {
            clone_format: 2,
            features: DEFAULT_FEATURES,
            order: 12,
            data_pool: None,
            stripe_unit: None,
        };
        for c in ["g", "g2", "g3"] {
            s.clone_image(&spec("m@m"), &spec(c), &opts).await.unwrap();
        }
        // The parent's head changes under its clones.
        let m = layer_image(&s, "m", false).await;
        if how == "rollback" {
            m.snap_rollback("small").await.unwrap();
            m.close().await.unwrap();
            let m = layer_image(&s, "m", false).await;
            m.write(0, Bytes::from(vec![0xeeu8; 100]), false)
                .await
                .unwrap();
            m.close().await.unwrap();
        } else {
            m.resize(2 * OBJ, true).await.unwrap();
            m.write(0, Bytes::from(vec![0xeeu8; 100]), false)
                .await
                .unwrap();
            m.close().await.unwrap();
        }
        let h = open(&s, "m@m", OpenMode::ReadOnly).await;
        assert_eq!(h.header().size, 16 * OBJ, "{how}: the snapshot's size");
        assert_eq!(h.header().flags, 0, "{how}: the snapshot's flags");
        let g = layer_image(&s, "g", true).await;
        assert!(
            layer_bytes(&g, 0, (16 * OBJ) as u32).await == parent,
            "{how}: g reads other bytes"
        );
        g.close().await.unwrap();
        // A copy-up past the head's new end keeps the snapshot's bytes around the write.
        let g2 = layer_image(&s, "g2", false).await;
        g2.write(9 * OBJ + 10, Bytes::from(vec![7u8; 10]), false)
            .await
            .unwrap();
        g2.close().await.unwrap();
        let mut want = parent.clone();
        want[(9 * OBJ + 10) as usize..(9 * OBJ + 20) as usize].fill(7);
        let g2 = layer_image(&s, "g2", true).await;
        assert!(
            layer_bytes(&g2, 0, (16 * OBJ) as u32).await == want,
            "{how}: g2 after a copy-up"
        );
        g2.close().await.unwrap();
        // And a flatten copies the snapshot's bytes, all of them.
        let g3 = layer_image(&s, "g3", false).await;
        g3.flatten(|_, _| {}).await.unwrap();
        g3.close().await.unwrap();
        let g3 = layer_image(&s, "g3", true).await;
        assert!(
            layer_bytes(&g3, 0, (16 * OBJ) as u32).await == parent,
            "{how}: g3 after a flatten"
        );
        g3.close().await.unwrap();
    }
}

/// Deep-flatten here as librbd's: a clone (parent and child objects of 4 or 8 KiB) with
/// snapshots taken and removed among writes, discards, zeros, resizes and reads (with
/// copy-on-read or not), generated and seeded, served and flattened part way. Every snapshot keeps
/// its bytes and its map checks; with deep-flatten the snapshots no longer read through
/// the parent, which can then go entirely (its snapshot and the image itself), and
/// every view still reads the same; without it they keep the parent as before.
#[tokio::test]
async fn deep_flatten_frees_the_snapshots_from_the_parent() {
    use nbd_protocol::{Backend, ZeroFlags};
    const PARENT: u64 = 6 << 12;
    async fn check_views(s: &DirStore, head: &[u8], snaps: &[(String, Vec<u8>)], what: &str) {
        for (name, want) in std::iter::once(("c".to_string(), head.to_vec()))
            .chain(snaps.iter().map(|(n, b)| (format!("c@{n}"), b.clone())))
        {
            let img = layer_image(s, &name, true).await;
            let got = layer_bytes(&img, 0, img.size() as u32).await;
            assert!(got == want, "{what}: {name} reads other bytes");
            img.close().await.unwrap();
            let h = open(s, &name, OpenMode::ReadOnly).await;
            let problems = crate::cmd::object_map::check_object_map(&h, &spec(&name))
                .await
                .unwrap();
            assert!(problems.is_empty(), "{what}: {name}: {problems:?}");
        }
    }
    for seed in 1..=24u64 {
        for deep in [true, false] {
            let what = format!("seed {seed} deep {deep}");
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
            let d = tempfile::tempdir().unwrap();
            let s = DirStore::new(d.path());
            // Parent and child objects of 4 or 8 KiB: a child object may cover two of
            // the parent's, or half of one.
            let porder = 12 + rng.below(2) as u8;
            let popts = CreateOptions {
                size: PARENT,
                order: porder,
                features: DEFAULT_FEATURES,
                data_pool: None,
                stripe_unit: None,
            };
            s.create_image(&spec("base"), &popts).await.unwrap();
            let base = open(&s, "base", OpenMode::ReadWrite).await;
            let mut parent = vec![0u8; PARENT as usize];
            for o in 0..PARENT >> porder {
                if rng.below(3) == 0 {
                    continue; // absent in the parent
                }
                let len = 1 + rng.below(1 << porder) as usize;
                let data: Vec<u8> = (0..len).map(|_| 1 + rng.below(255) as u8).collect();
                let at = (o << porder) as usize;
                parent[at..at + len].copy_from_slice(&data);
                base.write(o, 0, Bytes::from(data), false).await.unwrap();
            }
            let psnap = base.snap_create("s1").await.unwrap();
            base.close().await.unwrap();
            let mut features = DEFAULT_FEATURES;
            if !deep {
                features &= !RBD_FEATURE_DEEP_FLATTEN;
            }
            let order = 12 + rng.below(2) as u8;
            let opts = CloneOptions {
                clone_format: 2,
                features,
                order,
                data_pool: None,
                stripe_unit: None,
            };
            s.clone_image(&spec("base@s1"), &spec("c"), &opts)
                .await
                .unwrap();
            let mut head = parent.clone();
            let mut snaps: Vec<(String, Vec<u8>)> = Vec::new();
            // The snapshots taken before the flatten (without deep-flatten they keep the
            // parent while they last).
            let mut before_flatten: Vec<String> = Vec::new();
            let flatten_at = 2 + rng.below(10);
            let cor = rng.below(2) == 0;
            let serve = || async {
                let img = std::sync::Arc::new(layer_image(&s, "c", false).await);
                if cor {
                    img.enable_copy_on_read();
                }
                img
            };
            let mut img = serve().await;
            for step in 0..14u64 {
                let size = head.len() as u64;
                if step == flatten_at {
                    img.flatten(|_, _| {}).await.unwrap();
                    before_flatten = snaps.iter().map(|(n, _)| n.clone()).collect();
                    continue;
                }
                match rng.below(15) {
                    14 if !snaps.is_empty() => {
                        // A snapshot removed: the versions kept for it go or move on.
                        let (name, _) = snaps.remove(rng.below(snaps.len() as u64) as usize);
                        img.snap_remove(&name).await.unwrap();
                    }
                    12..=14 => {
                        // A read (with copy-on-read, a copy-up in the background).
                        let off = rng.below(size);
                        let len = 1 + rng.below((size - off).min(9000));
                        let got = layer_bytes(&img, off, len as u32).await;
                        assert_eq!(got.len() as u64, len);
                        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    }
                    0..=4 => {
                        let off = rng.below(size);
                        let len = 1 + rng.below((size - off).min(5000));
                        let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                        head[off as usize..(off + len) as usize].copy_from_slice(&data);
                        img.write(off, Bytes::from(data), false).await.unwrap();
                    }
                    5 | 6 => {
                        let off = rng.below(size);
                        let len = 1 + rng.below((size - off).min(9000));
                        head[off as usize..(off + len) as usize].fill(0);
                        if rng.below(2) == 0 {
                            img.trim(off, len as u32, false).await.unwrap();
                        } else {
                            img.write_zeroes(off, len as u32, ZeroFlags::default())
                                .await
                                .unwrap();
                        }
                    }
                    7..=9 => {
                        let name = format!("n{step}");
                        img.snap_create(&name).await.unwrap();
                        snaps.push((name, head.clone()));
                    }
                    _ => {
                        // A shrink lowers the overlap for good; a grow adds zeros.
                        let new = (1 + rng.below(8)) << 12;
                        img.resize(new, true).await.unwrap();
                        head.resize(new as usize, 0);
                        // Serve at the new size (a reopen, as a new client would).
                        img.close().await.unwrap();
                        img = serve().await;
                    }
                }
            }
            if flatten_at >= 14 {
                img.flatten(|_, _| {}).await.unwrap();
                before_flatten = snaps.iter().map(|(n, _)| n.clone()).collect();
            }
            img.close().await.unwrap();
            check_views(&s, &head, &snaps, &what).await;
            let children = kids(&s, "base@s1", false).await;
            if deep || !snaps.iter().any(|(n, _)| before_flatten.contains(n)) {
                assert!(children.is_empty(), "{what}: {children:?}");
                for (n, _) in &snaps {
                    let h = open(&s, &format!("c@{n}"), OpenMode::ReadOnly).await;
                    assert!(h.header().parent.is_none(), "{what}: c@{n} has a parent");
                }
                // The parent is not needed any more: it goes, and nothing changes.
                let base = open(&s, "base", OpenMode::ReadWrite).await;
                base.snap_remove(psnap).await.unwrap();
                base.close().await.unwrap();
                s.remove_image(&spec("base")).await.unwrap();
                check_views(&s, &head, &snaps, &format!("{what}, parent removed")).await;
            } else {
                assert_eq!(children, [spec("c")], "{what}");
            }
        }
    }
}
