//! Clones on the memory store: reads through chains of depth 1, 2 and 8 going straight
//! to the level that has the data, copy-up on the first change, discards that never let
//! the parent show through, the overlap under resizes, copy-on-read and flatten, checked
//! against a model of the bytes the child should show.

use super::*;
use crate::store::ObjectWrite;

/// Objects in the images of these tests.
const N: u64 = 8;

/// A chain: `levels[0]` the child's parent .. `levels[depth-1]` the base, each with
/// its snapshot 1 (flagged invalid for the levels in `invalid`), and the child (id
/// "child", no objects of its own). The base holds objects `o % 3 != 2` (3 MiB of a
/// pattern each: short objects); level `k` < depth-1 holds object `k + 1` (1 MiB at
/// 512 KiB of its own byte), shadowing what lies below.
fn build(depth: usize, invalid: &[usize]) -> (Vec<MemImage>, MemImage) {
    let base = MemImage::new(N * OBJ, DEFAULT_FEATURES);
    for o in (0..N).filter(|o| o % 3 != 2) {
        let data: Vec<u8> = (0..3 << 20)
            .map(|i: u64| (o * 31 + i % 251) as u8)
            .collect();
        futures_util::FutureExt::now_or_never(base.write(o, 0, Bytes::from(data), false))
            .unwrap()
            .unwrap();
    }
    let mut levels = vec![base];
    for k in (0..depth).rev() {
        let lvl = levels.last().unwrap();
        if invalid.contains(&k) {
            // The snapshot's own map says nothing exists: wrong, and flagged so.
            let m = ObjectMap::try_new(N).unwrap().encode();
            lvl.add_snapshot(1, "s", invalid_flags(DEFAULT_FEATURES), m, &[]);
        } else {
            lvl.snapshot_now(1, "s");
        }
        let next = lvl.clone_of(1, &format!("c{k}"));
        if k > 0 {
            let o = k as u64;
            let data = Bytes::from(vec![0xA0 + k as u8; 1 << 20]);
            futures_util::FutureExt::now_or_never(next.write(o % N, 512 << 10, data, false))
                .unwrap()
                .unwrap();
        }
        levels.push(next);
    }
    let child = levels.pop().unwrap();
    levels.reverse();
    (levels, child)
}

/// The nearest level holding object `o`, if any.
fn holder(levels: &[MemImage], o: u64) -> Option<usize> {
    levels.iter().position(|l| l.object(o).is_some())
}

/// What the child shows before any change: each object as its nearest holder has it,
/// zeros past the child's overlap.
fn model_of(levels: &[MemImage], overlap: u64) -> Vec<u8> {
    let mut m = vec![0u8; (N * OBJ) as usize];
    for o in 0..N {
        if let Some(k) = holder(levels, o) {
            let d = levels[k].object(o).unwrap();
            let at = (o * OBJ) as usize;
            m[at..at + d.len()].copy_from_slice(&d);
        }
    }
    m[overlap as usize..].fill(0);
    m
}

async fn open_mem(mem: &MemImage) -> Image<MemImage> {
    let o = OpenOptions {
        read_only: false,
        shared_default: false,
        checkpoint_idle: None,
    };
    Image::from_store_image(mem.clone(), &spec("child"), &o)
        .await
        .unwrap()
}

fn count(log: &[String], what: &str) -> usize {
    log.iter().filter(|s| *s == what).count()
}

async fn read_image(img: &Image<MemImage>) -> Vec<u8> {
    let size = img.size();
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < size {
        let n = (size - pos).min(16 << 20);
        out.extend(read_all(img, pos, n as u32).await);
        pos += n;
    }
    out
}

#[tokio::test]
async fn reads_go_straight_to_the_level_that_has_the_object() {
    for depth in [1, 2, 8] {
        let (levels, child) = build(depth, &[]);
        let model = model_of(&levels, N * OBJ);
        let img = open_mem(&child).await;
        assert_eq!(img.clone_depth(), depth);
        assert_eq!(img.parent_overlap(), Some(N * OBJ));
        child.take_log();
        for l in &levels {
            l.take_log();
        }
        for o in 0..N {
            let got = read_all(&img, o * OBJ, OBJ as u32).await;
            let at = (o * OBJ) as usize;
            assert!(
                got == model[at..at + OBJ as usize],
                "depth {depth} object {o}"
            );
            assert_eq!(
                count(&child.take_log(), "read"),
                0,
                "the child's map says absent"
            );
            let reads: Vec<usize> = levels
                .iter()
                .map(|l| count(&l.take_log(), "read"))
                .collect();
            let mut want = vec![0; depth];
            if let Some(k) = holder(&levels, o) {
                want[k] = 1;
            }
            assert_eq!(
                reads, want,
                "depth {depth} object {o}: one read, at the holder"
            );
        }
        let held = (0..N).filter(|&o| holder(&levels, o).is_some()).count() as u64;
        assert_eq!(img.stats().parent_reads, held);
        assert_eq!(img.stats().store_reads, 0);
        img.close().await.unwrap();
    }
}

#[tokio::test]
async fn an_untrusted_ancestor_map_is_asked_not_believed() {
    // Level 0's snapshot map is flagged invalid (and wrong: it says nothing exists).
    let (levels, child) = build(2, &[0]);
    let model = model_of(&levels, N * OBJ);
    let img = open_mem(&child).await;
    for l in &levels {
        l.take_log();
    }
    // Object 1 is level 0's own: found there although its map says absent.
    assert!(read_all(&img, OBJ, OBJ as u32).await == model[OBJ as usize..2 * OBJ as usize]);
    assert_eq!(count(&levels[0].take_log(), "read"), 1);
    assert_eq!(count(&levels[1].take_log(), "read"), 0);
    // Object 0 lives in the base only: level 0 is asked (nothing), then the base.
    assert!(read_all(&img, 0, OBJ as u32).await == model[..OBJ as usize]);
    assert_eq!(count(&levels[0].take_log(), "read"), 1);
    assert_eq!(count(&levels[1].take_log(), "read"), 1);
    // Object 2 nobody has: level 0 asked, the base's valid map answers.
    assert!(read_all(&img, 2 * OBJ, 4096).await.iter().all(|&b| b == 0));
    assert_eq!(count(&levels[0].take_log(), "read"), 1);
    assert_eq!(count(&levels[1].take_log(), "read"), 0);
    img.close().await.unwrap();
}

#[tokio::test]
async fn first_writes_copy_up_once_keeping_the_parents_bytes_around_them() {
    let (levels, child) = build(2, &[]);
    let mut model = model_of(&levels, N * OBJ);
    let img = open_mem(&child).await;
    child.take_log();
    // Two writes racing into object 0 (base data): one copy-up, both writes, the
    // parent's bytes around them.
    let (a, b) = (OBJ / 4, OBJ / 2 + 3);
    let (r1, r2) = tokio::join!(
        img.write(a, Bytes::from_static(b"first"), false),
        img.write(b, Bytes::from_static(b"second"), true)
    );
    r1.unwrap();
    r2.unwrap();
    model[a as usize..a as usize + 5].copy_from_slice(b"first");
    model[b as usize..b as usize + 6].copy_from_slice(b"second");
    let log = child.take_log();
    assert_eq!(count(&log, "copyup(0)"), 1, "{log:?}");
    assert_eq!(img.object_map().unwrap().get(0), ObjectState::Exists);
    assert!(read_all(&img, 0, OBJ as u32).await == model[..OBJ as usize]);
    // A whole-object write needs none of the parent's bytes: the copy-up brings none.
    let full = Bytes::from(vec![9u8; OBJ as usize]);
    img.write(3 * OBJ, full, false).await.unwrap();
    assert_eq!(child.object(3).unwrap(), vec![9u8; OBJ as usize]);
    assert_eq!(count(&child.take_log(), "copyup(3)"), 1);
    // An object no ancestor has, inside the overlap: a copy-up of nothing that carries
    // the write, as librbd's (it copies up wherever the overlap reaches), no read of it.
    img.write(2 * OBJ + 7, Bytes::from_static(b"z"), false)
        .await
        .unwrap();
    let log = child.take_log();
    assert_eq!(
        (count(&log, "copyup(2)"), count(&log, "write(2)")),
        (1, 0),
        "{log:?}"
    );
    assert_eq!(&child.object(2).unwrap()[..], b"\0\0\0\0\0\0\0z");
    assert_eq!(img.stats().copyups, 3);
    img.close().await.unwrap();
}

/// A copy-up that fails (the OSD's error, a lock being re-asserted) leaves no mark a
/// later change trusts: the request that asked for it fails, the retry copies up again,
/// and changes that waited for it (a write, a partial discard) start over and copy up
/// themselves, so the parent's bytes stay around every acknowledged change. (Before, the
/// map kept the EXISTS set before the failed call, and the retry wrote the object
/// without them: zeros where the parent's data was.)
#[tokio::test]
async fn a_failed_copyup_leaves_no_mark_that_later_changes_trust() {
    let (levels, child) = build(1, &[]);
    let mut model = model_of(&levels, N * OBJ);
    let slow = child.clone().slowed(std::time::Duration::from_millis(50));
    let img = open_mem(&slow).await;
    child.take_log();
    // Alone: the write fails, the object is still the parent's, the map says so.
    child.fail_copyups(1);
    assert!(img
        .write(10, Bytes::from_static(b"lost"), false)
        .await
        .is_err());
    assert_eq!(img.object_map().unwrap().get(0), ObjectState::Nonexistent);
    assert!(child.object(0).is_none());
    assert!(read_all(&img, 0, OBJ as u32).await == model[..OBJ as usize]);
    // The retry copies up.
    img.write(10, Bytes::from_static(b"kept"), false)
        .await
        .unwrap();
    model[10..14].copy_from_slice(b"kept");
    assert_eq!(count(&child.take_log(), "copyup(0)"), 1);
    assert!(child.object(0).unwrap()[..] == model[..3 << 20]);
    // Racing: the first write's copy-up of object 1 fails while a second write and a
    // partial discard of the same object wait for it; both then copy up themselves.
    child.fail_copyups(1);
    let (a, b, z) = (OBJ + 100, OBJ + OBJ / 2, OBJ + 4096);
    let (r1, r2, r3) = tokio::join!(
        img.write(a, Bytes::from_static(b"first"), false),
        async {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            img.write(b, Bytes::from_static(b"second"), false).await
        },
        async {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            img.trim(z, 8192, false).await
        }
    );
    assert!(r1.is_err());
    r2.unwrap();
    r3.unwrap();
    model[b as usize..b as usize + 6].copy_from_slice(b"second");
    model[z as usize..z as usize + 8192].fill(0);
    let log = child.take_log();
    assert_eq!(
        (count(&log, "copyup_failed(1)"), count(&log, "copyup(1)")),
        (1, 1),
        "{log:?}"
    );
    assert_eq!(img.object_map().unwrap().get(1), ObjectState::Exists);
    let got = read_all(&img, OBJ, OBJ as u32).await;
    let want = &model[OBJ as usize..2 * OBJ as usize];
    // The failed write's bytes are undefined (the client was told it failed).
    let undefined = (a - OBJ) as usize..(a - OBJ) as usize + 5;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(undefined.contains(&i) || g == w, "object 1 differs at +{i}");
    }
    img.close().await.unwrap();
}

/// A map written by librbd may claim an object its copy-up never created (librbd marks
/// EXISTS first and takes nothing back when the copy-up fails or its client dies; it
/// reads the mark as "may exist": its writes assert that the object exists and copy up
/// on ENOENT). Such a claim is checked in the store at the first change: a partial write
/// copies up the parent's bytes around it, a partial discard zeroes them instead of
/// doing nothing while the parent shows through. (Before, the claim was trusted: zeros
/// around the write, the parent's data after an acknowledged discard.)
#[tokio::test]
async fn a_loaded_maps_claim_is_checked_before_a_copyup_is_skipped() {
    let (levels, child) = build(1, &[]);
    let mut model = model_of(&levels, N * OBJ);
    for o in [0, 1, 3] {
        child.claim_in_map(o);
    }
    // Object 4 the child has (written before this open): its claim holds.
    let own = Bytes::from(vec![0x44u8; 1 << 20]);
    futures_util::FutureExt::now_or_never(child.write(4, 0, own.clone(), false))
        .unwrap()
        .unwrap();
    child.claim_in_map(4);
    // (All of it is the child's: nothing of the parent's shows past its end.)
    model[(4 * OBJ) as usize..(5 * OBJ) as usize].fill(0);
    model[(4 * OBJ) as usize..(4 * OBJ) as usize + (1 << 20)].copy_from_slice(&own);
    let img = open_mem(&child).await;
    child.take_log();
    assert_eq!(img.object_map().unwrap().get(0), ObjectState::Exists);
    // Reads find no object and go to the parent, as before.
    assert!(read_all(&img, 0, OBJ as u32).await == model[..OBJ as usize]);
    // A partial write: copied up, the parent's bytes around it.
    img.write(10, Bytes::from_static(b"kept"), false)
        .await
        .unwrap();
    model[10..14].copy_from_slice(b"kept");
    // A partial discard: copied up with the zeroes.
    let z = OBJ + 4096;
    img.trim(z, 8192, false).await.unwrap();
    model[z as usize..z as usize + 8192].fill(0);
    // A whole-object discard: cut to nothing, still shadowing the parent.
    img.trim(3 * OBJ, OBJ as u32, false).await.unwrap();
    model[(3 * OBJ) as usize..(4 * OBJ) as usize].fill(0);
    // Object 4's claim is true: written in place, no copy-up.
    img.write(4 * OBJ + 7, Bytes::from_static(b"x"), false)
        .await
        .unwrap();
    model[(4 * OBJ + 7) as usize] = b'x';
    // Checked once: the next write to object 0 is a plain write.
    img.write(20, Bytes::from_static(b"more"), false)
        .await
        .unwrap();
    model[20..24].copy_from_slice(b"more");
    let log = child.take_log();
    for (o, n) in [(0, 1), (1, 1), (3, 1), (4, 0)] {
        assert_eq!(
            count(&log, &format!("copyup({o})")),
            n,
            "object {o}: {log:?}"
        );
    }
    assert_eq!(count(&log, "write(0)"), 1, "{log:?}");
    assert!(child.object(0).unwrap()[..] == model[..3 << 20]);
    let same = |got: Vec<u8>, when: &str| {
        if let Some(i) = got.iter().zip(&model).position(|(g, w)| g != w) {
            panic!(
                "{when}: byte {i} (object {}) is {} where the model has {}",
                i as u64 / OBJ,
                got[i],
                model[i]
            );
        }
    };
    same(read_all(&img, 0, (N * OBJ) as u32).await, "served");
    img.close().await.unwrap();
    let img = open_mem(&child).await;
    same(read_all(&img, 0, (N * OBJ) as u32).await, "reopened");
    img.close().await.unwrap();
}

/// How long a copy-up makes the child's object, as librbd 16 does (checked on Ceph
/// against librbd twins with `rados stat`): the nearest ancestor's own object when it has
/// it (a depth-1 clone: the base's bytes, no trailing zeros); when it lacks it, its read
/// of its own parent comes back dense, up to where its overlap ends; all zeros: nothing.
#[tokio::test]
async fn copyup_lengths_are_librbds() {
    let x = || Bytes::from_static(b"x");
    let (_levels, child) = build(1, &[]);
    let img = open_mem(&child).await;
    img.write(7, x(), false).await.unwrap();
    assert_eq!(child.object(0).map(|o| o.len()), Some(3 << 20));
    img.close().await.unwrap();

    let (levels, child) = build(2, &[]);
    // c1 keeps 3.5 MiB of the base's object 3 and nothing past it.
    let overlap = 3 * OBJ + (7 << 19);
    levels[0].set_overlap(overlap);
    let mut model = model_of(&levels, N * OBJ);
    model[overlap as usize..].fill(0);
    let img = open_mem(&child).await;
    for o in [0, 1, 2, 3, 4] {
        img.write(o * OBJ + 7, x(), false).await.unwrap();
        model[(o * OBJ + 7) as usize] = b'x';
    }
    let len = |o| child.object(o).map(|d| d.len() as u64);
    // c1 lacks object 0: the base's 3 MiB and zeros to the object's end.
    assert_eq!(len(0), Some(OBJ));
    // c1 has object 1 (1 MiB at 512 KiB): its bytes.
    assert_eq!(len(1), Some(3 << 19));
    // No ancestor has object 2: the write alone.
    assert_eq!(len(2), Some(8));
    // c1 lacks object 3 and its overlap ends inside it: dense to there.
    assert_eq!(len(3), Some(7 << 19));
    // Object 4 lies past c1's overlap: nothing of the base's comes through.
    assert_eq!(len(4), Some(8));
    assert!(read_image(&img).await == model);
    img.close().await.unwrap();

    // Without snapshots, what the change overwrites is left out of the copy-up, and
    // when the rest is all zeros nothing is copied up (librbd 16, measured with `rados
    // stat`: a depth-2 write over all of the base's data leaves an object as long as the
    // write, a zero over it an empty one; with a snapshot the copy-up is whole).
    for (snap, zero) in [(false, false), (false, true), (true, false)] {
        let (levels, child) = build(2, &[]);
        let mut model = model_of(&levels, N * OBJ);
        if snap {
            child.snapshot_now(2, "keep");
        }
        let img = open_mem(&child).await;
        // Object 0 (base data [0, 3 MiB)): a change of [1 MiB, 3 MiB + 5) leaves [0, 1 MiB)
        // of it. Object 6 (the same): all of it under the change.
        for (off, n, byte) in [
            (1u64 << 20, (2u64 << 20) + 5, b'w'),
            (6 * OBJ, (3u64 << 20) + 9, b'v'),
        ] {
            if zero {
                img.write_zeroes(off, n as u32, ZeroFlags::default())
                    .await
                    .unwrap();
            } else {
                img.write(off, Bytes::from(vec![byte; n as usize]), false)
                    .await
                    .unwrap();
            }
            model[off as usize..(off + n) as usize].fill(if zero { 0 } else { byte });
        }
        assert_eq!(
            len_of(&child, 0),
            Some(OBJ),
            "snap {snap} zero {zero}: partly covered"
        );
        let want = match (snap, zero) {
            (true, _) => Some(OBJ),
            (false, false) => Some((3u64 << 20) + 9),
            (false, true) => Some(0),
        };
        assert_eq!(
            len_of(&child, 6),
            want,
            "snap {snap} zero {zero}: all covered"
        );
        assert!(read_image(&img).await == model, "snap {snap} zero {zero}");
        img.close().await.unwrap();
    }
}

fn len_of(m: &MemImage, o: u64) -> Option<u64> {
    m.object(o).map(|d| d.len() as u64)
}

#[tokio::test]
async fn discards_never_let_the_parent_show_through() {
    let (levels, child) = build(1, &[]);
    let img = open_mem(&child).await;
    child.take_log();
    // Object 0 the child lacks, the base has: discarded whole, it becomes an empty
    // object (not skipped, which would show the base's data).
    img.trim(0, OBJ as u32, false).await.unwrap();
    assert_eq!(child.object(0), Some(vec![]));
    assert!(read_all(&img, 0, OBJ as u32).await.iter().all(|&b| b == 0));
    // Object 1: written (copied up), then discarded whole: cut, never removed.
    img.write(OBJ, Bytes::from_static(b"w"), false)
        .await
        .unwrap();
    img.trim(OBJ, OBJ as u32, false).await.unwrap();
    assert_eq!(child.object(1), Some(vec![]));
    assert!(read_all(&img, OBJ, OBJ as u32)
        .await
        .iter()
        .all(|&b| b == 0));
    // Partly zeroed, object 3 is copied up with the zeroes applied.
    let model = model_of(&levels, N * OBJ);
    img.write_zeroes(3 * OBJ + 100, 1000, ZeroFlags::default())
        .await
        .unwrap();
    let got = read_all(&img, 3 * OBJ, OBJ as u32).await;
    let at = (3 * OBJ) as usize;
    assert!(
        got[..100] == model[at..at + 100] && got[1100..] == model[at + 1100..at + OBJ as usize]
    );
    assert!(got[100..1100].iter().all(|&b| b == 0));
    // Object 2, which no ancestor has, inside the overlap: librbd creates it empty all
    // the same (its discard copies up wherever the overlap reaches), and so do we, so the
    // maps agree. Never removed.
    img.trim(2 * OBJ, OBJ as u32, false).await.unwrap();
    assert_eq!(child.object(2), Some(vec![]));
    let log = child.take_log();
    assert_eq!(
        (count(&log, "remove(2)"), count(&log, "copyup(2)")),
        (0, 1),
        "{log:?}"
    );
    assert_eq!(count(&log, "remove(1)"), 0, "{log:?}");
    img.close().await.unwrap();
    // The map on disk agrees with the store (object-map check).
    assert_eq!(existing(&child.stored_map()), child.objects());
}

/// A tiny seeded generator (splitmix64).
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
        self.next() % n.max(1)
    }
}

#[tokio::test]
async fn generated_sequences_match_a_byte_model() {
    for depth in [1, 2, 8] {
        for seed in 0..3u64 {
            let (levels, child) = build(depth, if seed == 2 { &[0] } else { &[] });
            // The child keeps 6.5 objects of its parent: past that, zeros.
            let overlap = 6 * OBJ + OBJ / 2;
            child.set_overlap(overlap);
            let before: Vec<Vec<Option<Vec<u8>>>> = levels
                .iter()
                .map(|l| (0..N).map(|o| l.object(o)).collect())
                .collect();
            let mut model = model_of(&levels, overlap);
            let img = open_mem(&child).await;
            let mut rng = Rng(seed * 1000 + depth as u64);
            let ctx = |i: usize, what: &str| format!("depth {depth} seed {seed} op {i}: {what}");
            for i in 0..100 {
                let size = img.size();
                let off = rng.below(size);
                let len = rng.below((OBJ * 3 / 2).min(size - off)) + 1;
                let kind = rng.below(20);
                let what = match kind {
                    0..=6 => {
                        let v = (rng.next() as u8) | 1;
                        let data = vec![v; len as usize];
                        img.write(off, Bytes::from(data), rng.below(2) == 0)
                            .await
                            .unwrap();
                        model[off as usize..(off + len) as usize].fill(v);
                        "write"
                    }
                    7..=9 => {
                        img.trim(off, len as u32, false).await.unwrap();
                        model[off as usize..(off + len) as usize].fill(0);
                        "trim"
                    }
                    10..=11 => {
                        // Whole objects, the discard that would remove them.
                        let o = rng.below(size.div_ceil(OBJ));
                        let n = OBJ.min(size - o * OBJ);
                        img.trim(o * OBJ, n as u32, false).await.unwrap();
                        model[(o * OBJ) as usize..(o * OBJ + n) as usize].fill(0);
                        "whole trim"
                    }
                    12 => {
                        let flags = if rng.below(2) == 0 {
                            NO_HOLE
                        } else {
                            ZeroFlags::default()
                        };
                        img.write_zeroes(off, len as u32, flags).await.unwrap();
                        model[off as usize..(off + len) as usize].fill(0);
                        "write_zeroes"
                    }
                    13 => {
                        // Never below 2 objects, so later operations still find objects.
                        let new = 2 * OBJ + rng.below((N - 2) * OBJ / 4096 + 1) * 4096;
                        img.resize(new, true).await.unwrap();
                        model.resize(new as usize, 0);
                        "resize"
                    }
                    _ => {
                        let got = read_all(&img, off, len as u32).await;
                        assert!(
                            got == model[off as usize..(off + len) as usize],
                            "{}",
                            ctx(i, "read")
                        );
                        "read"
                    }
                };
                if i % 50 == 49 {
                    assert!(read_image(&img).await == model, "{}", ctx(i, what));
                }
            }
            assert!(read_image(&img).await == model, "depth {depth} seed {seed}");
            let log = child.take_log();
            for o in 0..N {
                assert!(
                    count(&log, &format!("copyup({o})")) <= 1,
                    "object {o}: {log:?}"
                );
            }
            assert!(img.parent_overlap().unwrap() <= img.size().min(overlap));
            // Flatten: every byte kept, the ancestors never read again.
            let mut calls = 0;
            img.flatten(|_, _| calls += 1).await.unwrap();
            assert_eq!(img.clone_depth(), 0);
            assert_eq!(child.parent_overlap(), None);
            for l in &levels {
                l.take_log();
            }
            assert!(
                read_image(&img).await == model,
                "depth {depth} seed {seed} flattened"
            );
            assert!(levels.iter().all(|l| count(&l.take_log(), "read") == 0));
            img.close().await.unwrap();
            assert_eq!(existing(&child.stored_map()), child.objects());
            // The parents' snapshots are unchanged.
            for (l, b) in levels.iter().zip(before) {
                assert_eq!((0..N).map(|o| l.object(o)).collect::<Vec<_>>(), b);
            }
            assert!(calls > 0);
        }
    }
}

#[tokio::test]
async fn a_shrink_lowers_the_overlap_and_growing_shows_zeros() {
    let (levels, child) = build(1, &[]);
    let model = model_of(&levels, N * OBJ);
    let img = open_mem(&child).await;
    // Cut in the middle of object 1 (the base has it), then grown back.
    let cut = OBJ + 4096;
    img.resize(cut, true).await.unwrap();
    assert_eq!(
        (img.parent_overlap(), child.parent_overlap()),
        (Some(cut), Some(cut))
    );
    img.resize(N * OBJ, false).await.unwrap();
    assert_eq!(img.parent_overlap(), Some(cut), "growing never raises it");
    let got = read_image(&img).await;
    assert!(got[..cut as usize] == model[..cut as usize]);
    assert!(
        got[cut as usize..].iter().all(|&b| b == 0),
        "zeros past the old overlap"
    );
    // A write past the overlap into an object the base has copies nothing up.
    child.take_log();
    img.write(4 * OBJ + 1, Bytes::from_static(b"q"), false)
        .await
        .unwrap();
    let log = child.take_log();
    assert_eq!((count(&log, "copyup(4)"), count(&log, "write(4)")), (0, 1));
    img.close().await.unwrap();
}

#[tokio::test]
async fn copy_on_read_copies_up_once_in_the_background() {
    let (levels, child) = build(2, &[]);
    let model = model_of(&levels, N * OBJ);
    let img = Arc::new(open_mem(&child).await);
    assert!(img.enable_copy_on_read());
    assert!(!img.enable_copy_on_read(), "once");
    child.take_log();
    for _ in 0..3 {
        assert!(read_all(&img, 10, 100).await == model[10..110]);
    }
    for _ in 0..100 {
        if child.object(0).is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    // The nearest ancestor (c1) lacks object 0, so its read of the base comes back
    // dense, as librbd 16's: the base's bytes and zeros to the object's end.
    assert!(levels[0].object(0).is_none());
    let mut want = levels[1].object(0).unwrap();
    assert!(want.len() < OBJ as usize);
    want.resize(OBJ as usize, 0);
    let got = child.object(0).unwrap_or_default();
    assert!(
        got == want,
        "the parent's object copied up densely: {} bytes",
        got.len()
    );
    assert_eq!(count(&child.take_log(), "copyup(0)"), 1);
    // Later reads are the child's own.
    for l in &levels {
        l.take_log();
    }
    assert!(read_all(&img, 10, 100).await == model[10..110]);
    assert_eq!(count(&levels[1].take_log(), "read"), 0);
    img.close().await.unwrap();
}

/// librbd's copy-on-read copies up every object a read reaches inside the overlap,
/// even one no ancestor has data in (an empty object: seen with `rados stat` against
/// librbd twins), none for a read wholly past the overlap; its flush waits for the
/// copy-ups asked before it, and so does ours.
#[tokio::test]
async fn copy_on_read_is_librbds_for_holes_and_flush_waits_for_it() {
    let (levels, child) = build(1, &[]);
    let img = Arc::new(open_mem(&child).await);
    // Overlap: objects 0..6 (a cut at an object boundary copies nothing up).
    img.resize(6 * OBJ, true).await.unwrap();
    img.resize(N * OBJ, false).await.unwrap();
    assert!(img.enable_copy_on_read());
    assert!(holder(&levels, 5).is_none() && holder(&levels, 3).is_some());
    assert!(
        holder(&levels, 6).is_some(),
        "the base has it, past the overlap"
    );
    child.take_log();
    assert!(read_all(&img, 5 * OBJ + 100, 100).await == vec![0; 100]);
    assert!(read_all(&img, 3 * OBJ, 100).await.len() == 100);
    assert!(read_all(&img, 6 * OBJ, 100).await == vec![0; 100]);
    // No polling: the flush waits for the copy-ups the reads asked for.
    img.flush().await.unwrap();
    assert_eq!(child.object(5).map(|d| d.len()), Some(0), "an empty object");
    assert_eq!(child.object(3), levels[0].object(3), "the parent's object");
    assert!(
        child.object(6).is_none(),
        "a read past the overlap copies nothing"
    );
    let log = child.take_log();
    assert_eq!(
        (
            count(&log, "copyup(5)"),
            count(&log, "copyup(3)"),
            count(&log, "copyup(6)")
        ),
        (1, 1, 0)
    );
    // And the map says so.
    assert_eq!(img.map().unwrap().get(5), ObjectState::Exists);
    // A read queued right before the close: the close waits for its copy-up, and a
    // flush after it fails at once instead of waiting for a worker that has ended.
    read_all(&img, 4 * OBJ, 100).await;
    img.close().await.unwrap();
    assert_eq!(child.object(4), levels[0].object(4));
    let late = tokio::time::timeout(std::time::Duration::from_secs(5), img.flush()).await;
    assert!(
        matches!(late, Ok(Err(_))),
        "a flush after the close fails, no wait"
    );
}

#[tokio::test]
async fn loops_and_absurd_depths_are_refused() {
    // A clone of a clone of ... 65 deep.
    let (_levels, child) = build(MAX_CHAIN_DEPTH + 1, &[]);
    let o = OpenOptions::default();
    let e = Image::from_store_image(child, &spec("child"), &o)
        .await
        .err()
        .unwrap();
    assert!(e.message.contains("deeper than 64"), "{e}");
    // A loop: the parent's parent is the child.
    let (levels, child) = build(1, &[]);
    child.snapshot_now(1, "s");
    levels[0].set_parent(&child, 1);
    let e = Image::from_store_image(child, &spec("child"), &o)
        .await
        .err()
        .unwrap();
    assert!(e.message.contains("loops back"), "{e}");
}

#[tokio::test]
async fn copyup_in_the_store_only_creates_once() {
    // The memory store's copy-up itself, as the image layer relies on it: data plus op
    // when absent, only the op when present.
    let m = MemImage::new(N * OBJ, DEFAULT_FEATURES);
    let op = |off, d: &'static [u8]| ObjectWrite::Write {
        off,
        data: Bytes::from_static(d),
    };
    m.copyup(0, Bytes::from_static(b"parent"), op(1, b"X"), false)
        .await
        .unwrap();
    m.copyup(0, Bytes::from_static(b"other!"), op(2, b"Y"), false)
        .await
        .unwrap();
    assert_eq!(m.object(0).unwrap(), b"pXYent");
}

#[tokio::test]
async fn block_status_shows_the_parents_data_not_holes() {
    let (levels, child) = build(2, &[]);
    // Overlap 5.5 objects: object 5 is half backed.
    child.set_overlap(5 * OBJ + OBJ / 2);
    let img = open_mem(&child).await;
    let ext = img.block_status(0, (N * OBJ) as u32).await.unwrap();
    // Expand to a per-half-object picture: true = data.
    let mut got = Vec::new();
    for e in ext {
        for _ in 0..e.length / (OBJ / 2) {
            got.push(e.flags == 0);
        }
    }
    let want: Vec<bool> = (0..2 * N)
        .map(|h| h < 11 && holder(&levels, h / 2).is_some())
        .collect();
    assert_eq!(got, want);
    img.close().await.unwrap();
}

#[tokio::test]
async fn an_emptied_object_that_hides_the_parent_is_kept() {
    let (_levels, child) = build(1, &[]);
    // Objects 0 and 1 inside the overlap, 2 and 3 past it.
    child.set_overlap(2 * OBJ);
    let img = Image::from_store_image(
        child.clone().punching(),
        &spec("child"),
        &OpenOptions::default(),
    )
    .await
    .unwrap();
    // Object 0 (the base has 3 MiB of it) copied up by a write, then zeroed in two
    // halves: every byte zero, but removing it would show the base's data again.
    img.write(5, Bytes::from_static(b"w"), false).await.unwrap();
    let half = (OBJ / 2) as u32;
    img.write_zeroes(0, half, ZeroFlags::default())
        .await
        .unwrap();
    img.write_zeroes(OBJ / 2, half, ZeroFlags::default())
        .await
        .unwrap();
    assert!(child.object(0).is_some(), "kept");
    assert!(read_all(&img, 0, OBJ as u32).await.iter().all(|&b| b == 0));
    // Object 2, past the overlap, is removed when emptied, as in a flat image.
    img.write(2 * OBJ, Bytes::from_static(b"w"), false)
        .await
        .unwrap();
    img.write_zeroes(2 * OBJ, 1, ZeroFlags::default())
        .await
        .unwrap();
    assert_eq!(child.object(2), None, "removed");
    img.close().await.unwrap();
}

#[tokio::test]
async fn a_write_racing_a_slow_copy_up_waits_for_it() {
    let (levels, child) = build(1, &[]);
    let mut model = model_of(&levels, N * OBJ);
    let slow = child.clone().slowed(std::time::Duration::from_millis(200));
    let img = Image::from_store_image(slow, &spec("child"), &OpenOptions::default())
        .await
        .unwrap();
    // The first write copies object 0 up (slowly); the second, to another part of the
    // same object, finds it EXISTS in the map meanwhile: it must wait for the copy-up,
    // not create the object without the parent's data.
    let second = async {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        img.write(OBJ / 2, Bytes::from_static(b"second"), false)
            .await
    };
    // A read meanwhile finds EXISTS in the map but no object yet: the parent's bytes.
    let read = async {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        read_all(&img, 100, 10).await
    };
    let parent = model[100..110].to_vec();
    let (r1, r2, r3) = tokio::join!(
        img.write(10, Bytes::from_static(b"first"), false),
        second,
        read
    );
    r1.unwrap();
    r2.unwrap();
    assert_eq!(r3, parent, "read during the copy-up");
    model[10..15].copy_from_slice(b"first");
    let h = (OBJ / 2) as usize;
    model[h..h + 6].copy_from_slice(b"second");
    assert!(read_all(&img, 0, OBJ as u32).await == model[..OBJ as usize]);
    assert_eq!(count(&child.take_log(), "copyup(0)"), 1);
    img.close().await.unwrap();
}

#[tokio::test]
async fn flatten_copies_up_what_the_ancestors_hold_then_detaches() {
    let (levels, child) = build(8, &[]);
    let overlap = 5 * OBJ + 10;
    child.set_overlap(overlap);
    let model = model_of(&levels, overlap);
    let img = open_mem(&child).await;
    child.take_log();
    let mut seen = Vec::new();
    img.flatten(|done, total| seen.push((done, total)))
        .await
        .unwrap();
    assert_eq!(
        seen.last(),
        Some(&(6, 6)),
        "objects 0..=5 are in the overlap"
    );
    // Copied up: the objects with data inside the overlap (object 5 only if its first
    // 10 bytes are not all zeros: librbd copies no zeros up in a flatten either).
    let held: Vec<u64> = (0..6)
        .filter(|&o| {
            let (a, b) = ((o * OBJ) as usize, ((o + 1) * OBJ).min(overlap) as usize);
            model[a..b].iter().any(|&x| x != 0)
        })
        .collect();
    let log = child.take_log();
    let copied: Vec<u64> = (0..N)
        .filter(|o| count(&log, &format!("copyup({o})")) == 1)
        .collect();
    assert_eq!(copied, held, "{log:?}");
    assert_eq!(log.last().map(String::as_str), Some("detach_parent"));
    assert_eq!((img.clone_depth(), img.parent_overlap()), (0, None));
    assert!(read_image(&img).await == model);
    // Past the overlap nothing was copied: object 5 holds only the 10 bytes inside it.
    assert!(child.object(5).is_none_or(|v| v.len() <= 10));
    assert_eq!(child.object(5).is_some(), held.contains(&5));
    let e = img.flatten(|_, _| {}).await.unwrap_err();
    assert!(e.message.contains("not a clone"), "{e}");
    img.close().await.unwrap();
    // Reopened: no parent, the same bytes, from the child alone.
    let img = open_mem(&child).await;
    assert_eq!(img.clone_depth(), 0);
    assert!(read_image(&img).await == model);
    img.close().await.unwrap();
}
