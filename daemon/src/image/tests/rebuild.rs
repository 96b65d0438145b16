//! The object map rebuilt in the background after a crash, on the memory store with its
//! listing held: the image is served before the listing ends, unknown objects are asked
//! of the store, what requests do meanwhile survives the listing's merge, and the map
//! is written (and the flag cleared) only whole.

use super::test_store::ListingHold;
use super::*;
use std::sync::Arc;

const N: u64 = 16;

/// A crashed image of `N` objects in memory: `objs` written (byte `o` repeated, at
/// the start of each), the flag set over a map on disk that says nothing exists.
async fn crashed(objs: &[u64]) -> MemImage {
    let mem = MemImage::new(N * OBJ, DEFAULT_FEATURES);
    for &o in objs {
        mem.write(o, 0, Bytes::from(vec![o as u8 + 1; 4096]), false)
            .await
            .unwrap();
    }
    let f = invalid_flags(DEFAULT_FEATURES);
    mem.set_flags(f, f).await.unwrap();
    mem.take_log();
    mem
}

/// Image `name` of `mem` opened for writing with `o`, its listings held by the hold
/// returned (nothing started yet).
async fn open_held(
    mem: &MemImage,
    name: &str,
    o: &OpenOptions,
) -> (Image<MemImage>, Arc<ListingHold>) {
    let hold = ListingHold::new();
    let h = mem.clone().holding_listings(hold.clone());
    let img = Image::from_store_image(h, &spec(name), o).await.unwrap();
    (img, hold)
}

/// Opened for writing with its listings held, the rebuild started in the background
/// and its listing under way.
async fn serving(mem: &MemImage) -> (Arc<Image<MemImage>>, Arc<ListingHold>) {
    let (img, hold) = open_held(mem, "vm1", &OpenOptions::default()).await;
    let img = Arc::new(img);
    assert!(matches!(img.map_source(), Some(MapSource::Rebuilt(_))));
    assert!(img.rebuild_pending());
    assert!(img.spawn_map_rebuild().is_some());
    hold.wait_started(1).await;
    (img, hold)
}

fn disk_existing(mem: &MemImage) -> Vec<u64> {
    existing(&mem.stored_map())
}

fn store_existing(mem: &MemImage) -> Vec<u64> {
    (0..N).filter(|&o| mem.object(o).is_some()).collect()
}

#[tokio::test]
async fn served_before_the_listing_ends_reads_ask_the_store() {
    let mem = crashed(&[1, 3]).await;
    let (img, hold) = serving(&mem).await;
    // The map on disk says nothing exists; the store has objects 1 and 3.
    assert_eq!(read_all(&img, OBJ, 4).await, [2; 4]);
    assert_eq!(
        read_all(&img, 3 * OBJ + 4092, 8).await,
        [4, 4, 4, 4, 0, 0, 0, 0]
    );
    assert_eq!(read_all(&img, 0, 4).await, [0; 4]);
    assert_eq!(img.stats().map_reads, 0, "no hole answered from the map");
    // Block status never claims a hole it does not know of.
    let ext = img.block_status(0, (4 * OBJ) as u32).await.unwrap();
    assert!(ext.iter().all(|e| e.flags & STATE_HOLE == 0), "{ext:?}");
    // Nothing that writes the map: the flag stays set.
    assert_ne!(mem.flags() & RBD_FLAG_OBJECT_MAP_INVALID, 0);
    assert_eq!(hold.started(), 1);
    hold.release();
    img.finish_rebuild().await.unwrap();
    assert!(!img.rebuild_pending());
    assert_eq!(existing(img.object_map().unwrap()), [1, 3]);
    let ext = img.block_status(0, OBJ as u32).await.unwrap();
    assert_eq!(
        ext,
        [Extent {
            length: OBJ,
            flags: STATE_HOLE | STATE_ZERO
        }]
    );
    img.close().await.unwrap();
    assert_eq!(mem.flags(), 0);
    assert_eq!(disk_existing(&mem), [1, 3]);
}

#[tokio::test]
async fn a_discard_during_the_rebuild_is_kept() {
    let mem = crashed(&[1, 2, 5]).await;
    let (img, hold) = serving(&mem).await;
    // The listing saw object 1 and 2; both go now: a whole and a partial discard
    // (which a store that punches would not remove, so 2 stays).
    img.trim(OBJ, OBJ as u32, false).await.unwrap();
    img.trim(2 * OBJ, 100, false).await.unwrap();
    assert_eq!(mem.object(1), None);
    hold.release();
    img.finish_rebuild().await.unwrap();
    assert_eq!(existing(img.object_map().unwrap()), [2, 5]);
    assert_eq!(read_all(&img, OBJ, 4).await, [0; 4]);
    assert_eq!(read_all(&img, 2 * OBJ + 98, 4).await, [0, 0, 3, 3]);
    img.close().await.unwrap();
    assert_eq!(mem.flags(), 0);
    assert_eq!(disk_existing(&mem), [2, 5]);
    assert_eq!(store_existing(&mem), [2, 5]);
}

#[tokio::test]
async fn a_write_during_the_rebuild_is_kept() {
    let mem = crashed(&[1]).await;
    let (img, hold) = serving(&mem).await;
    // The listing took its look before: it misses object 9.
    img.write(9 * OBJ + 7, Bytes::from_static(b"late"), false)
        .await
        .unwrap();
    hold.release();
    img.finish_rebuild().await.unwrap();
    assert_eq!(existing(img.object_map().unwrap()), [1, 9]);
    assert_eq!(&read_all(&img, 9 * OBJ + 7, 4).await, b"late");
    img.close().await.unwrap();
    assert_eq!(disk_existing(&mem), [1, 9]);
    assert_eq!(mem.flags(), 0);
}

#[tokio::test]
async fn close_finishes_the_rebuild_then_writes_the_whole_map() {
    let mem = crashed(&[0, 4, 15]).await;
    let (img, hold) = serving(&mem).await;
    img.write(6 * OBJ, Bytes::from_static(b"x"), false)
        .await
        .unwrap();
    let closing = {
        let img = img.clone();
        tokio::spawn(async move { img.close().await })
    };
    // Close cannot end while the listing is held (nothing but the listing to wait
    // for): the map is still unwritten, the flag set.
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
    assert!(!closing.is_finished());
    assert_ne!(mem.flags() & RBD_FLAG_OBJECT_MAP_INVALID, 0);
    assert!(!mem.take_log().iter().any(|c| c == "write_object_map"));
    hold.release();
    closing.await.unwrap().unwrap();
    assert_eq!(mem.flags(), 0);
    assert_eq!(disk_existing(&mem), [0, 4, 6, 15]);
}

#[tokio::test]
async fn close_runs_a_rebuild_nobody_started() {
    let mem = crashed(&[2]).await;
    let img = Image::from_store_image(mem.clone(), &spec("vm1"), &OpenOptions::default())
        .await
        .unwrap();
    assert!(img.rebuild_pending());
    img.close().await.unwrap();
    assert_eq!(mem.flags(), 0);
    assert_eq!(disk_existing(&mem), [2]);
}

#[tokio::test]
async fn a_failed_rebuild_leaves_the_flag_set() {
    let mem = crashed(&[1, 3]).await;
    let (img, hold) = serving(&mem).await;
    hold.fail();
    let e = img.finish_rebuild().await.unwrap_err();
    assert!(e.message.contains("listing the objects failed"), "{e}");
    // Serving goes on, every object still asked of the store.
    assert_eq!(read_all(&img, 3 * OBJ, 2).await, [4, 4]);
    img.write(5 * OBJ, Bytes::from_static(b"y"), false)
        .await
        .unwrap();
    // Nothing may write the partial map.
    let e = img.checkpoint().await.unwrap_err();
    assert!(e.message.contains("could not be rebuilt"), "{e}");
    assert!(img.snap_create("s1").await.is_err());
    assert!(img.resize(32 * OBJ, false).await.is_err());
    img.close().await.unwrap();
    assert_ne!(mem.flags() & RBD_FLAG_OBJECT_MAP_INVALID, 0);
    assert!(
        disk_existing(&mem).is_empty(),
        "the stale map stays, untrusted"
    );
    // The next open rebuilds it.
    let img = Image::from_store_image(mem.clone(), &spec("vm1"), &OpenOptions::default())
        .await
        .unwrap();
    img.finish_rebuild().await.unwrap();
    img.close().await.unwrap();
    assert_eq!(mem.flags(), 0);
    assert_eq!(disk_existing(&mem), [1, 3, 5]);
}

#[tokio::test]
async fn a_failed_rebuild_is_tried_again_in_the_background() {
    let mem = crashed(&[1, 3]).await;
    let (mut img, hold) = open_held(&mem, "vm1", &OpenOptions::default()).await;
    img.rebuild_retry = Duration::from_millis(10);
    let img = Arc::new(img);
    let task = img.spawn_map_rebuild().unwrap();
    hold.wait_started(1).await;
    // The store fails every listing for a while: the task keeps trying, with pauses.
    hold.fail();
    hold.wait_started(3).await;
    assert!(img.rebuild_pending());
    img.write(5 * OBJ, Bytes::from_static(b"y"), false)
        .await
        .unwrap();
    assert_ne!(mem.flags() & RBD_FLAG_OBJECT_MAP_INVALID, 0);
    // Back: the next attempt makes the map whole while the image is served.
    hold.release();
    tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("the background rebuild ends once the store answers")
        .unwrap();
    assert!(img.map_is_whole());
    assert_eq!(read_all(&img, OBJ, 1).await, [2]);
    img.close().await.unwrap();
    assert_eq!(mem.flags(), 0);
    assert_eq!(disk_existing(&mem), [1, 3, 5]);
}

#[tokio::test]
async fn close_tries_a_failed_rebuild_again() {
    let mem = crashed(&[2]).await;
    let (img, hold) = open_held(&mem, "vm1", &OpenOptions::default()).await;
    hold.fail();
    assert!(img.finish_rebuild().await.is_err());
    assert!(img.checkpoint().await.is_err());
    hold.release();
    img.close().await.unwrap();
    assert_eq!(mem.flags(), 0);
    assert_eq!(disk_existing(&mem), [2]);
    assert_eq!(
        hold.started(),
        3,
        "one listing each: the failed one, the checkpoint's, close's"
    );
}

#[tokio::test]
async fn the_background_rebuild_stops_when_the_image_is_closed() {
    let mem = crashed(&[1]).await;
    let (mut img, hold) = open_held(&mem, "vm1", &OpenOptions::default()).await;
    img.rebuild_retry = Duration::from_millis(10);
    let img = Arc::new(img);
    hold.fail();
    let task = img.spawn_map_rebuild().unwrap();
    hold.wait_started(2).await;
    // Close tries once more, fails, and closes with the flag set (the data is synced).
    img.close().await.unwrap();
    assert_ne!(
        mem.flags() & RBD_FLAG_OBJECT_MAP_INVALID,
        0,
        "no whole map: the flag stays"
    );
    let tried = hold.started();
    tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("the retries end with the image's close")
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(hold.started() <= tried + 1, "no attempts after close");
}

#[tokio::test]
async fn idle_checkpoints_go_on_after_a_failed_rebuild() {
    let mem = crashed(&[1]).await;
    let o = OpenOptions {
        checkpoint_idle: Some(Duration::from_millis(20)),
        ..OpenOptions::default()
    };
    let (img, hold) = open_held(&mem, "vm1", &o).await;
    hold.fail();
    let img = Arc::new(img);
    let task = img
        .spawn_idle_checkpoints()
        .expect("a task for a writable image");
    // Each idle period tries the rebuild; both attempts fail, the flag stays set.
    hold.wait_started(2).await;
    assert_ne!(mem.flags() & RBD_FLAG_OBJECT_MAP_INVALID, 0);
    hold.release();
    tokio::time::timeout(Duration::from_secs(30), async {
        while mem.flags() != 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("an idle checkpoint once the rebuild succeeds");
    assert!(img.map_is_whole());
    assert_eq!(disk_existing(&mem), [1]);
    img.close().await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the idle task ends at close")
        .unwrap();
}

#[tokio::test]
async fn changes_that_need_the_whole_map_wait_a_bounded_time() {
    let mem = crashed(&[1]).await;
    let (mut img, hold) = open_held(&mem, "vm1", &OpenOptions::default()).await;
    img.rebuild_wait = Duration::from_millis(50);
    let img = Arc::new(img);
    img.spawn_map_rebuild().unwrap();
    hold.wait_started(1).await;
    let e = img.checkpoint().await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Busy);
    assert!(e.message.contains("still being rebuilt"), "{e}");
    let e = img.snap_create("s1").await.unwrap_err();
    assert!(e.message.contains("still being rebuilt"), "{e}");
    assert!(img.header().snaps.is_empty() && mem.header().snaps.is_empty());
    let e = img.resize(32 * OBJ, false).await.unwrap_err();
    assert!(e.message.contains("still being rebuilt"), "{e}");
    assert_ne!(mem.flags() & RBD_FLAG_OBJECT_MAP_INVALID, 0);
    hold.release();
    img.snap_create("s1").await.unwrap();
    // The snapshot's map is the whole head map.
    let h = mem.header();
    let id = h.snaps[0].id;
    let snap_map =
        ObjectMap::decode(&mem.read_object_map(Some(id)).await.unwrap().unwrap()).unwrap();
    assert_eq!(existing(&snap_map), [1]);
    img.close().await.unwrap();
    assert_eq!(mem.flags(), 0);
}

#[tokio::test]
async fn a_clone_copies_up_an_unknown_object() {
    let base = MemImage::new(N * OBJ, DEFAULT_FEATURES);
    base.write(0, 0, Bytes::from(vec![7u8; 8192]), false)
        .await
        .unwrap();
    base.snapshot_now(1, "s");
    let child = base.clone_of(1, "c");
    let f = invalid_flags(DEFAULT_FEATURES);
    child.set_flags(f, f).await.unwrap();
    let (img, hold) = open_held(&child, "child", &OpenOptions::default()).await;
    let img = Arc::new(img);
    img.spawn_map_rebuild().unwrap();
    hold.wait_started(1).await;
    // Unknown, absent from the child: the parent's bytes, and a write copies them up.
    assert_eq!(read_all(&img, 4094, 4).await, [7; 4]);
    img.write(100, Bytes::from_static(b"mine"), false)
        .await
        .unwrap();
    let obj = child.object(0).expect("copied up");
    assert_eq!(&obj[96..108], b"\x07\x07\x07\x07mine\x07\x07\x07\x07");
    hold.release();
    img.finish_rebuild().await.unwrap();
    assert_eq!(&read_all(&img, 98, 8).await, b"\x07\x07mine\x07\x07");
    img.close().await.unwrap();
    assert_eq!(child.flags(), 0);
    assert_eq!(existing(&child.stored_map()), [0]);
}

/// A small generator (splitmix64): the same seed, the same sequence.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The bytes of each object this model looks at (its first `SPAN`), None when absent.
const SPAN: u64 = 4096;

/// Seeded sequences of reads, writes and discards (whole and partial) with the
/// rebuild's listing released at a random point (and the map whole, or not yet, when
/// the next requests come), each checked against a model of the bytes; then the map
/// written at close must say exactly which objects exist.
#[tokio::test]
async fn generated_requests_around_the_rebuild_match_a_model() {
    for seed in 0..64u64 {
        let mut rng = Rng(seed.wrapping_mul(0x1234_5678_9ABC_DEF1) ^ 0x5EED);
        let pre: Vec<u64> = (0..N).filter(|_| rng.below(2) == 0).collect();
        let mem = crashed(&pre).await;
        let mem = if seed % 2 == 0 { mem.punching() } else { mem };
        let mut model: Vec<Option<Vec<u8>>> = (0..N)
            .map(|o| pre.contains(&o).then(|| vec![o as u8 + 1; SPAN as usize]))
            .collect();
        let (img, hold) = serving(&mem).await;
        let ops = 40;
        let release_at = rng.below(ops + 1);
        let await_it = rng.below(2) == 0;
        for i in 0..ops {
            if i == release_at {
                hold.release();
                if await_it {
                    img.finish_rebuild().await.unwrap();
                }
            }
            let o = rng.below(N);
            let what = rng.below(5);
            let ctx = format!("seed {seed} op {i}: kind {what} on object {o}");
            match what {
                0 | 1 => {
                    let off = rng.below(SPAN - 1);
                    let len = 1 + rng.below((SPAN - off).min(512));
                    let b = (rng.next() as u8) | 1;
                    img.write(o * OBJ + off, Bytes::from(vec![b; len as usize]), false)
                        .await
                        .unwrap();
                    let m = model[o as usize].get_or_insert_with(|| vec![0; SPAN as usize]);
                    m[off as usize..(off + len) as usize].fill(b);
                }
                2 => {
                    img.trim(o * OBJ, OBJ as u32, false).await.unwrap();
                    model[o as usize] = None;
                }
                3 => {
                    let off = rng.below(SPAN - 1);
                    let len = 1 + rng.below(SPAN - off);
                    img.trim(o * OBJ + off, len as u32, false).await.unwrap();
                    if let Some(m) = model[o as usize].as_mut() {
                        m[off as usize..(off + len) as usize].fill(0);
                    }
                }
                _ => {
                    let want = model[o as usize]
                        .clone()
                        .unwrap_or_else(|| vec![0; SPAN as usize]);
                    assert_eq!(read_all(&img, o * OBJ, SPAN as u32).await, want, "{ctx}");
                    let ext = img.block_status(o * OBJ, SPAN as u32).await.unwrap();
                    if mem.object(o).is_some() {
                        assert!(
                            ext.iter().all(|e| e.flags & STATE_HOLE == 0),
                            "{ctx}: {ext:?}"
                        );
                    }
                }
            }
        }
        if release_at == ops {
            hold.release();
        }
        img.close().await.unwrap();
        assert_eq!(mem.flags(), 0, "seed {seed}");
        // The map written is exact: an object is in it iff the store has it.
        assert_eq!(disk_existing(&mem), store_existing(&mem), "seed {seed}");
        // And the data matches the model, read back through a fresh open.
        let img = Image::from_store_image(mem.clone(), &spec("vm1"), &OpenOptions::default())
            .await
            .unwrap();
        assert!(!img.rebuild_pending(), "seed {seed}: a clean close");
        for o in 0..N {
            let want = model[o as usize]
                .clone()
                .unwrap_or_else(|| vec![0; SPAN as usize]);
            assert_eq!(
                read_all(&img, o * OBJ, SPAN as u32).await,
                want,
                "seed {seed} object {o}"
            );
        }
        img.close().await.unwrap();
    }
}

#[tokio::test]
async fn the_escape_hatch_rebuilds_before_serving() {
    // RADOS_NBD_REBUILD_BEFORE_SERVING=1, for this test's thread only.
    let mem = crashed(&[3]).await;
    crate::image::rebuild::FORCE_BEFORE_SERVING.with(|f| f.set(true));
    let img = Image::from_store_image(mem.clone(), &spec("vm1"), &OpenOptions::default()).await;
    crate::image::rebuild::FORCE_BEFORE_SERVING.with(|f| f.set(false));
    let img = img.unwrap();
    assert!(!img.rebuild_pending());
    assert_eq!(existing(img.object_map().unwrap()), [3]);
    img.close().await.unwrap();
    assert_eq!(mem.flags(), 0);
}
