use super::pieces::{split, Piece};
use super::test_store::MemImage;
use super::*;
use crate::store::dir::{DirImage, DirStore};
use crate::store::{
    CreateOptions, OpenMode, Store, DEFAULT_FEATURES, RBD_FEATURE_LAYERING,
    RBD_FLAG_FAST_DIFF_INVALID, RBD_FLAG_OBJECT_MAP_INVALID,
};
use bytes::Bytes;
use nbd_protocol::backend::{STATE_HOLE, STATE_ZERO};
use nbd_protocol::{Backend, Errno, Extent, ReadChunk, ZeroFlags};
use objmap::ObjectState;
use std::path::{Path, PathBuf};

const OBJ: u64 = 4 << 20;

const NO_HOLE: ZeroFlags = ZeroFlags {
    no_hole: true,
    fast_zero: false,
    fua: false,
};
const FAST_ZERO: ZeroFlags = ZeroFlags {
    no_hole: false,
    fast_zero: true,
    fua: false,
};

fn spec(s: &str) -> ImageSpec {
    s.parse().unwrap()
}

async fn store_with(size: u64, features: u64) -> (tempfile::TempDir, DirStore) {
    let d = tempfile::tempdir().unwrap();
    let s = DirStore::new(d.path());
    let o = CreateOptions {
        size,
        order: 22,
        features,
    };
    create_image(&s, &spec("vm1"), &o).await.unwrap();
    (d, s)
}

/// A new image (default features) in a directory store, open for writing.
async fn writable(size: u64) -> (tempfile::TempDir, DirStore, Image<DirImage>) {
    let (d, s) = store_with(size, DEFAULT_FEATURES).await;
    let img = open(&s, false).await;
    (d, s, img)
}

async fn open(s: &DirStore, read_only: bool) -> Image<DirImage> {
    let o = OpenOptions {
        read_only,
        shared_default: false,
        checkpoint_idle: None,
    };
    Image::open(s, &spec("vm1"), &o).await.unwrap()
}

fn pool(d: &Path) -> PathBuf {
    d.join("rbd")
}

/// A read-only handle of the stored image: what the store holds now, through its own
/// trait (it takes no lock, so an open writer does not stand in the way).
async fn stored(s: &DirStore) -> DirImage {
    s.open_image(&spec("vm1"), OpenMode::ReadOnly)
        .await
        .unwrap()
}

async fn stored_header(s: &DirStore) -> ImageHeader {
    let h = stored(s).await;
    let header = h.header();
    h.close().await.unwrap();
    header
}

async fn header_flags(s: &DirStore) -> u64 {
    stored_header(s).await.flags
}

async fn header_size(s: &DirStore) -> u64 {
    stored_header(s).await.size
}

async fn disk_map(s: &DirStore) -> ObjectMap {
    let h = stored(s).await;
    let b = h.read_object_map(None).await.unwrap().unwrap();
    h.close().await.unwrap();
    ObjectMap::decode(&b).unwrap()
}

/// An exclusive handle, for changing the stored image while nobody has it open.
async fn exclusive(s: &DirStore) -> DirImage {
    s.open_image(&spec("vm1"), OpenMode::ReadWrite)
        .await
        .unwrap()
}

/// Replaces the stored object map of the (closed) image.
async fn write_disk_map(s: &DirStore, m: &ObjectMap) {
    let h = exclusive(s).await;
    h.write_object_map(m.encode()).await.unwrap();
    h.close().await.unwrap();
}

/// Sets the image's `shared` metadata (the image closed).
async fn set_shared(s: &DirStore, value: &str) {
    let h = exclusive(s).await;
    h.set_meta(META_SHARED, value).await.unwrap();
    h.close().await.unwrap();
}

async fn objects_on_disk(s: &DirStore) -> Vec<u64> {
    let h = stored(s).await;
    let mut v = h.list_objects(None).await.unwrap();
    h.close().await.unwrap();
    v.sort();
    v
}

fn existing(m: impl std::ops::Deref<Target = ObjectMap>) -> Vec<u64> {
    (0..m.len())
        .filter(|&i| m.get(i) != ObjectState::Nonexistent)
        .collect()
}

async fn read_all<S: ImageStore>(img: &Image<S>, off: u64, len: u32) -> Vec<u8> {
    let mut out = Vec::new();
    for c in img.read(off, len).await.unwrap() {
        match c {
            ReadChunk::Data(b) => out.extend_from_slice(&b),
            ReadChunk::Hole(n) => out.extend(std::iter::repeat_n(0u8, n as usize)),
        }
    }
    assert_eq!(out.len(), len as usize, "chunks cover the request exactly");
    out
}

#[test]
fn split_at_object_boundaries() {
    let p = split(22, OBJ - 1, 2);
    assert_eq!(
        p,
        [
            Piece {
                objno: 0,
                off: OBJ - 1,
                len: 1,
                req_off: 0
            },
            Piece {
                objno: 1,
                off: 0,
                len: 1,
                req_off: 1
            },
        ]
    );
    let p = split(22, OBJ, 2 * OBJ);
    assert_eq!(p.len(), 2);
    assert!(p.iter().all(|p| p.off == 0 && p.len == OBJ));
    assert_eq!((p[0].objno, p[1].objno, p[1].req_off), (1, 2, OBJ));
    let p = split(22, 100, 3 * OBJ);
    assert_eq!(p.len(), 4);
    assert_eq!(p.iter().map(|p| p.len).sum::<u64>(), 3 * OBJ);
    assert_eq!(
        p[3],
        Piece {
            objno: 3,
            off: 0,
            len: 100,
            req_off: 3 * OBJ - 100
        }
    );
    assert!(split(22, 5, 0).is_empty());
}

#[tokio::test]
async fn fresh_image_reads_holes_without_store_calls() {
    let (_d, s, img) = writable(64 << 20).await;
    assert_eq!(img.map_source(), Some(&MapSource::Loaded));
    let c = img.read(OBJ - 512, 8192).await.unwrap();
    assert_eq!(c, [ReadChunk::Hole(8192)], "adjacent holes merge");
    let st = img.stats();
    assert_eq!((st.map_reads, st.store_reads), (2, 0));
    let e = img.block_status(0, 64 << 20).await.unwrap();
    assert_eq!(
        e,
        [Extent {
            length: 64 << 20,
            flags: STATE_HOLE | STATE_ZERO
        }]
    );
    img.close().await.unwrap();
    assert!(objects_on_disk(&s).await.is_empty());
}

#[tokio::test]
async fn exists_clean_objects_are_read_and_become_exists_when_written() {
    // EXISTS_CLEAN: unchanged since the latest snapshot (what fast-diff reports).
    let (_d, s, img) = writable(16 << 20).await;
    img.write(0, Bytes::from_static(b"zero"), false)
        .await
        .unwrap();
    img.write(OBJ, Bytes::from_static(b"one"), false)
        .await
        .unwrap();
    img.close().await.unwrap();
    let m = disk_map(&s).await;
    m.set(0, ObjectState::ExistsClean);
    m.set(1, ObjectState::ExistsClean);
    write_disk_map(&s, &m).await;
    let img = open(&s, false).await;
    assert!(matches!(img.map_source(), Some(MapSource::Loaded)));
    // Clean objects exist: their data is read from the store, not taken for holes.
    assert_eq!(&read_all(&img, OBJ, 3).await, b"one");
    assert_eq!(img.stats().store_reads, 1);
    // The first write to a clean object marks it EXISTS (it now differs from the
    // snapshot); the untouched one stays clean.
    img.write(2, Bytes::from_static(b"ro"), false)
        .await
        .unwrap();
    let mem = img.object_map().unwrap();
    assert_eq!(mem.get(0), ObjectState::Exists);
    assert_eq!(mem.get(1), ObjectState::ExistsClean);
    assert_eq!(&read_all(&img, 0, 4).await, b"zero");
    img.close().await.unwrap();
    let m = disk_map(&s).await;
    assert_eq!(
        (m.get(0), m.get(1), m.get(2)),
        (
            ObjectState::Exists,
            ObjectState::ExistsClean,
            ObjectState::Nonexistent
        )
    );
}

/// Marks every existing object EXISTS_CLEAN in the on-disk map of a closed image, as
/// a snapshot taken by Ceph's tools leaves them (fast-diff: unchanged since it).
async fn make_all_clean(s: &DirStore) {
    let m = disk_map(s).await;
    for o in 0..m.len() {
        if m.get(o) != ObjectState::Nonexistent {
            m.set(o, ObjectState::ExistsClean);
        }
    }
    write_disk_map(s, &m).await;
}

#[tokio::test]
async fn partial_discards_of_clean_objects_mark_them_changed() {
    // Zeroing part of an EXISTS_CLEAN object changes its bytes, so fast-diff must see
    // it (EXISTS), whatever the request: TRIM, WRITE_ZEROES with and without NO_HOLE.
    // Whole-object discards remove (NONEXISTENT).
    let (_d, s, img) = writable(24 << 20).await;
    img.write(0, Bytes::from(vec![7u8; 6 * OBJ as usize]), false)
        .await
        .unwrap();
    img.close().await.unwrap();
    make_all_clean(&s).await;
    let img = open(&s, false).await;
    img.trim(100, 4096, false).await.unwrap();
    img.write_zeroes(OBJ + 5, 10, ZeroFlags::default())
        .await
        .unwrap();
    img.write_zeroes(2 * OBJ + 4096, 4096, NO_HOLE)
        .await
        .unwrap();
    img.trim(3 * OBJ, OBJ as u32, false).await.unwrap();
    use ObjectState::*;
    let want = [
        Exists,
        Exists,
        Exists,
        Nonexistent,
        ExistsClean,
        ExistsClean,
    ];
    assert_eq!(img.object_map().unwrap().to_vec(), want);
    img.close().await.unwrap();
    assert_eq!(disk_map(&s).await.to_vec(), want);
}

#[tokio::test]
async fn objects_emptied_by_partial_zeroes_are_removed() {
    let (_d, s, img) = writable(16 << 20).await;
    img.write(0, Bytes::from(vec![3u8; 2 * OBJ as usize]), false)
        .await
        .unwrap();
    // Object 0 zeroed in three block-aligned pieces: every byte punched out, so it
    // goes, as a whole-object discard would have removed it.
    img.trim(0, (OBJ / 2) as u32, false).await.unwrap();
    assert_eq!(objects_on_disk(&s).await, [0, 1]);
    img.write_zeroes(OBJ / 2, (OBJ / 4) as u32, ZeroFlags::default())
        .await
        .unwrap();
    img.trim(3 * OBJ / 4, (OBJ / 4) as u32, false)
        .await
        .unwrap();
    assert_eq!(objects_on_disk(&s).await, [1]);
    assert_eq!(img.object_map().unwrap().get(0), ObjectState::Nonexistent);
    assert_eq!(read_all(&img, 0, 4096).await, vec![0; 4096]);
    // Object 1: zeros written with NO_HOLE are data, and so is an unaligned edge.
    img.write_zeroes(OBJ, (OBJ / 2) as u32, NO_HOLE)
        .await
        .unwrap();
    img.trim(OBJ + OBJ / 2, (OBJ / 2) as u32, false)
        .await
        .unwrap();
    assert_eq!(objects_on_disk(&s).await, [1]);
    img.close().await.unwrap();
    assert_eq!(existing(&disk_map(&s).await), [1]);
}

#[tokio::test]
async fn an_object_emptied_after_a_checkpoint_sets_the_flag_before_it_goes() {
    // A partial zero of an EXISTS object changes no map state and may run under a
    // clear flag; the removal it leads to does change it.
    let (_d, s, img) = writable(16 << 20).await;
    img.write(4096, Bytes::from(vec![5u8; 4096]), false)
        .await
        .unwrap();
    img.checkpoint().await.unwrap();
    assert_eq!(header_flags(&s).await & RBD_FLAG_OBJECT_MAP_INVALID, 0);
    img.trim(0, 4096, false).await.unwrap();
    assert_eq!(header_flags(&s).await & RBD_FLAG_OBJECT_MAP_INVALID, 0);
    img.trim(4096, 4096, false).await.unwrap();
    assert!(objects_on_disk(&s).await.is_empty());
    assert_ne!(
        header_flags(&s).await & RBD_FLAG_OBJECT_MAP_INVALID,
        0,
        "object 0 removed under a clear flag: the map on disk says it exists"
    );
    img.close().await.unwrap();
    assert!(existing(&disk_map(&s).await).is_empty());
}

#[tokio::test]
async fn read_only_head_sees_writes_made_after_it_opened() {
    // A read-only server of the head while another client writes it.
    let (_d, s) = store_with(16 << 20, DEFAULT_FEATURES).await;
    let ro = open(&s, true).await;
    let rw = open(&s, false).await;
    rw.write(2 * OBJ + 1, Bytes::from_static(b"later"), false)
        .await
        .unwrap();
    rw.flush().await.unwrap();
    assert_eq!(&read_all(&ro, 2 * OBJ + 1, 5).await, b"later");
    // The writer removes the object the reader has open, and creates it anew.
    rw.trim(2 * OBJ, OBJ as u32, false).await.unwrap();
    assert_eq!(read_all(&ro, 2 * OBJ + 1, 5).await, vec![0; 5]);
    rw.write(2 * OBJ + 1, Bytes::from_static(b"again"), false)
        .await
        .unwrap();
    assert_eq!(&read_all(&ro, 2 * OBJ + 1, 5).await, b"again");
    // No map: block status cannot claim a hole where the writer put data.
    let e = ro.block_status(2 * OBJ, 4096).await.unwrap();
    assert!(e.iter().all(|x| x.flags & STATE_HOLE == 0), "{e:?}");
    rw.close().await.unwrap();
    ro.close().await.unwrap();
}

#[tokio::test]
async fn resize_grows_and_shrinks_like_librbd() {
    let (_d, s, img) = writable(16 << 20).await;
    let full = Bytes::from(vec![7u8; OBJ as usize]);
    for o in 0..4 {
        img.write(o * OBJ, full.clone(), false).await.unwrap();
    }
    // Growing: new size in the header and for new clients, the map extended.
    img.resize(40 << 20, false).await.unwrap();
    assert_eq!((img.size(), img.info().size), (40 << 20, 40 << 20));
    assert_eq!(header_size(&s).await, 40 << 20);
    let m = img.object_map().unwrap();
    assert_eq!(m.len(), 10);
    assert_eq!(m.get(3), ObjectState::Exists);
    assert_eq!(m.get(9), ObjectState::Nonexistent);
    img.write(38 << 20, Bytes::from_static(b"end"), false)
        .await
        .unwrap();
    assert_eq!(&read_all(&img, 38 << 20, 3).await, b"end");
    // Shrinking discards data: refused unless allowed, and then nothing changed.
    let e = img.resize(6 << 20, false).await.unwrap_err();
    assert!(e.message.contains("allow-shrink"), "{e}");
    assert_eq!((img.size(), header_size(&s).await), (40 << 20, 40 << 20));
    // Allowed: objects past the end removed, the tail of the last one zeroed.
    img.resize(6 << 20, true).await.unwrap();
    assert_eq!((img.size(), header_size(&s).await), (6 << 20, 6 << 20));
    assert_eq!(objects_on_disk(&s).await, [0, 1]);
    assert_eq!(img.object_map().unwrap().len(), 2);
    // A client still holding the old size is refused past the new end.
    let e = img
        .write(7 << 20, Bytes::from_static(b"x"), false)
        .await
        .unwrap_err();
    assert_eq!(e.errno, Errno::NoSpc, "{}", e.message);
    assert_eq!(
        img.read(6 << 20, 512).await.unwrap_err().errno,
        Errno::Inval
    );
    // Same errors as the protocol layer's: TRIM past the end EINVAL, WRITE_ZEROES ENOSPC.
    assert_eq!(
        img.trim(6 << 20, 512, false).await.unwrap_err().errno,
        Errno::Inval
    );
    assert_eq!(
        img.write_zeroes(6 << 20, 512, ZeroFlags::default())
            .await
            .unwrap_err()
            .errno,
        Errno::NoSpc
    );
    // Grown again: what was cut off reads as zeros, what was kept is intact.
    img.resize(16 << 20, false).await.unwrap();
    assert_eq!(read_all(&img, (6 << 20) - 4, 4).await, [7u8; 4]);
    assert!(read_all(&img, 6 << 20, (2 << 20) as u32)
        .await
        .iter()
        .all(|&b| b == 0));
    assert!(read_all(&img, 8 << 20, OBJ as u32)
        .await
        .iter()
        .all(|&b| b == 0));
    img.close().await.unwrap();
    // The map written at close has the new length and matches the objects.
    assert_eq!(header_flags(&s).await, 0);
    let m = disk_map(&s).await;
    assert_eq!(m.len(), 4);
    assert_eq!(
        m.to_vec(),
        [
            ObjectState::Exists,
            ObjectState::Exists,
            ObjectState::Nonexistent,
            ObjectState::Nonexistent
        ]
    );
    // Read-only opens cannot resize.
    let ro = open(&s, true).await;
    assert_eq!(
        ro.resize(32 << 20, false).await.unwrap_err().kind,
        ErrorKind::ReadOnly
    );
    ro.close().await.unwrap();
}

#[tokio::test]
async fn writes_mark_objects_and_block_status_merges() {
    let (_d, s, img) = writable(64 << 20).await;
    // Across the 0/1 boundary, and one write in object 5.
    let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
    img.write(OBJ - 4096, Bytes::from(data.clone()), false)
        .await
        .unwrap();
    img.write(5 * OBJ + 10, Bytes::from_static(b"hello"), true)
        .await
        .unwrap();
    let m = img.object_map().unwrap();
    assert_eq!(existing(m), [0, 1, 5]);
    assert_eq!(objects_on_disk(&s).await, [0, 1, 5]);
    assert_eq!(read_all(&img, OBJ - 4096, 8192).await, data);
    let r = img.read(5 * OBJ, 4096).await.unwrap();
    assert!(matches!(r[0], ReadChunk::Data(_)), "{r:?}");
    assert_eq!(&read_all(&img, 5 * OBJ + 8, 9).await, b"\0\0hello\0\0");
    let e = img.block_status(0, 64 << 20).await.unwrap();
    let hz = STATE_HOLE | STATE_ZERO;
    assert_eq!(
        e,
        [
            Extent {
                length: 2 * OBJ,
                flags: 0
            },
            Extent {
                length: 3 * OBJ,
                flags: hz
            },
            Extent {
                length: OBJ,
                flags: 0
            },
            Extent {
                length: 10 * OBJ,
                flags: hz
            },
        ]
    );
    // A range starting and ending inside objects is answered from its start.
    let e = img.block_status(OBJ + 5, (2 * OBJ) as u32).await.unwrap();
    assert_eq!(
        e[0],
        Extent {
            length: OBJ - 5,
            flags: 0
        }
    );
    assert_eq!(e[1].flags, hz);
    img.close().await.unwrap();
}

#[tokio::test]
async fn trim_whole_objects_removes_partial_zeroes() {
    // 6 MiB: the last object is 2 MiB long inside the image.
    let (_d, s, img) = writable(6 << 20).await;
    img.write(0, Bytes::from(vec![1u8; 6 << 20]), false)
        .await
        .unwrap();
    assert_eq!(objects_on_disk(&s).await, [0, 1]);
    // Partial: zeros inside object 0, object stays.
    img.trim(4096, 4096, false).await.unwrap();
    assert_eq!(objects_on_disk(&s).await, [0, 1]);
    let r = read_all(&img, 0, 3 * 4096).await;
    assert!(r[..4096].iter().all(|&b| b == 1));
    assert!(r[4096..8192].iter().all(|&b| b == 0));
    assert!(r[8192..].iter().all(|&b| b == 1));
    // The whole (short) last object: removed.
    img.trim(OBJ, 2 << 20, false).await.unwrap();
    assert_eq!(objects_on_disk(&s).await, [0]);
    assert_eq!(img.object_map().unwrap().get(1), ObjectState::Nonexistent);
    assert_eq!(read_all(&img, OBJ, 4096).await, vec![0; 4096]);
    let st = img.stats();
    assert_eq!((st.store_removes, st.store_zeroes), (1, 1));
    img.close().await.unwrap();
    assert_eq!(existing(&disk_map(&s).await), [0]);
}

#[tokio::test]
async fn discarding_a_fresh_terabyte_is_free() {
    let tib = 1u64 << 40;
    let (_d, s, img) = writable(tib).await;
    let t = std::time::Instant::now();
    let step = 2u64 << 30;
    for i in 0..tib / step {
        img.trim(i * step, step as u32, false).await.unwrap();
    }
    let st = img.stats();
    assert_eq!(st.store_removes, 0);
    assert_eq!(st.skipped_removes, tib / OBJ);
    assert!(t.elapsed().as_secs() < 20, "took {:?}", t.elapsed());
    img.close().await.unwrap();
    assert!(objects_on_disk(&s).await.is_empty());
}

#[tokio::test]
async fn discard_skips_nonexistent_runs_and_removes_the_rest() {
    let (_d, s, img) = writable(64 << 20).await;
    for at in [OBJ + 100, 2 * OBJ, 7 * OBJ + 5, 15 * OBJ + (3 << 20)] {
        img.write(at, Bytes::from_static(b"x"), false)
            .await
            .unwrap();
    }
    // From the middle of object 0 to the middle of object 15: 0 and 15 are partial
    // (15 exists: zeroed in place), 1, 2 and 7 go, the other 11 are skipped.
    img.trim(OBJ / 2, (15 * OBJ) as u32, false).await.unwrap();
    let st = img.stats();
    assert_eq!(st.store_removes, 3);
    assert_eq!(st.store_zeroes, 1);
    assert_eq!(st.skipped_removes, 12, "objects 0, 3-6, 8-14");
    assert_eq!(objects_on_disk(&s).await, [15]);
    assert_eq!(existing(img.object_map().unwrap()), [15]);
    // Object 15 still holds its byte past the zeroed half.
    assert_eq!(&read_all(&img, 15 * OBJ + (3 << 20), 1).await, b"x");
    img.close().await.unwrap();
    assert_eq!(existing(&disk_map(&s).await), [15]);
}

#[tokio::test]
async fn write_zeroes_flags() {
    let (_d, s, img) = writable(16 << 20).await;
    // NO_HOLE keeps the range allocated: object 0 now exists, full of zeros.
    img.write_zeroes(0, OBJ as u32, NO_HOLE).await.unwrap();
    assert_eq!(objects_on_disk(&s).await, [0]);
    assert_eq!(read_all(&img, 0, 4096).await, vec![0; 4096]);
    // FAST_ZERO with NO_HOLE would write data: refused, nothing done.
    let e = img
        .write_zeroes(
            OBJ,
            OBJ as u32,
            ZeroFlags {
                no_hole: true,
                fast_zero: true,
                fua: false,
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.errno, Errno::NotSup);
    assert_eq!(objects_on_disk(&s).await, [0]);
    // FAST_ZERO alone maps to a removal: fast, done.
    img.write_zeroes(0, OBJ as u32, FAST_ZERO).await.unwrap();
    assert!(objects_on_disk(&s).await.is_empty());
    // Where holes cannot be punched, FAST_ZERO of part of an object would be a write
    // of zeros: refused, the data untouched; whole objects are still removed.
    img.write(OBJ, Bytes::from(vec![9u8; 8192]), false)
        .await
        .unwrap();
    img.store().pretend_no_hole_punching();
    let e = img.write_zeroes(OBJ, 4096, FAST_ZERO).await.unwrap_err();
    assert_eq!(e.errno, Errno::NotSup, "{}", e.message);
    assert_eq!(read_all(&img, OBJ, 8192).await, vec![9u8; 8192]);
    img.write_zeroes(OBJ, 4096, ZeroFlags::default())
        .await
        .unwrap();
    assert_eq!(read_all(&img, OBJ, 4096).await, vec![0u8; 4096]);
    img.write_zeroes(OBJ, OBJ as u32, FAST_ZERO).await.unwrap();
    assert!(objects_on_disk(&s).await.is_empty());
    img.close().await.unwrap();
}

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
    let mp = pool(d.path()).join(format!("rbd_object_map.{}", stored_header(&s).await.id));
    let mut b = std::fs::read(&mp).unwrap();
    let n = b.len();
    b[n / 2] ^= 0xff;
    std::fs::write(&mp, &b).unwrap();
    let img = open(&s, false).await;
    match img.map_source() {
        Some(MapSource::Rebuilt(why)) => assert!(why.contains("corrupt"), "{why}"),
        o => panic!("expected a rebuild, got {o:?}"),
    }
    assert_eq!(existing(img.object_map().unwrap()), [1]);
    img.close().await.unwrap();
    std::fs::write(&mp, ObjectMap::new(3).encode()).unwrap();
    let img = open(&s, false).await;
    match img.map_source() {
        Some(MapSource::Rebuilt(why)) => assert!(why.contains("3 entries"), "{why}"),
        o => panic!("expected a rebuild, got {o:?}"),
    }
    img.close().await.unwrap();
    std::fs::remove_file(&mp).unwrap();
    let img = open(&s, false).await;
    assert!(matches!(img.map_source(), Some(MapSource::Rebuilt(w)) if w.contains("missing")));
    img.close().await.unwrap();
    assert_eq!(existing(&disk_map(&s).await), [1]);
}

#[tokio::test]
async fn checkpoint_clears_and_next_write_sets_again() {
    let (_d, s, img) = writable(16 << 20).await;
    img.write(0, Bytes::from_static(b"a"), false).await.unwrap();
    img.checkpoint().await.unwrap();
    assert_eq!(header_flags(&s).await, 0);
    assert_eq!(existing(&disk_map(&s).await), [0]);
    // Reads do not dirty the image.
    img.read(0, 10).await.unwrap();
    assert_eq!(header_flags(&s).await, 0);
    img.write(OBJ, Bytes::from_static(b"b"), false)
        .await
        .unwrap();
    assert_ne!(header_flags(&s).await & RBD_FLAG_OBJECT_MAP_INVALID, 0);
    img.close().await.unwrap();
    assert_eq!(existing(&disk_map(&s).await), [0, 1]);
    assert_eq!(header_flags(&s).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writes_and_trims_keep_map_and_store_agreeing() {
    let (_d, s) = store_with(32 << 20, DEFAULT_FEATURES).await;
    let img = Arc::new(open(&s, false).await);
    let mut tasks = Vec::new();
    for t in 0..8u64 {
        let img = img.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..40u64 {
                let obj = (t + i) % 8;
                if (t + i) % 3 == 0 {
                    img.trim(obj * OBJ, OBJ as u32, false).await.unwrap();
                } else {
                    img.write(obj * OBJ + i * 512, Bytes::from(vec![t as u8; 512]), false)
                        .await
                        .unwrap();
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let in_mem = existing(img.object_map().unwrap());
    assert_eq!(in_mem, objects_on_disk(&s).await);
    img.close().await.unwrap();
    assert_eq!(existing(&disk_map(&s).await), objects_on_disk(&s).await);
}

#[tokio::test]
async fn info_is_truthful() {
    let (_d, s) = store_with(16 << 20, DEFAULT_FEATURES).await;
    let img = open(&s, true).await;
    let i = img.info();
    assert!(i.read_only && !i.can_trim && !i.can_flush);
    assert!(i.can_multi_conn);
    assert_eq!(i.size, 16 << 20);
    assert!(i.max_block >= 32 << 20);
    let e = img
        .write(0, Bytes::from_static(b"x"), false)
        .await
        .unwrap_err();
    assert_eq!(e.errno, Errno::Perm);
    img.close().await.unwrap();
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

/// An image in memory, its calls recorded and audited, and a handle to look at it.
async fn recorded(size: u64, checkpoint_idle: Option<Duration>) -> (Image<MemImage>, MemImage) {
    let mem = MemImage::new(size, DEFAULT_FEATURES).audited();
    let o = OpenOptions {
        checkpoint_idle,
        ..OpenOptions::default()
    };
    let img = Image::from_store_image(mem.clone(), &spec("vm1"), &o)
        .await
        .unwrap();
    (img, mem)
}

#[tokio::test]
async fn after_a_checkpoint_only_map_changing_requests_set_the_flag() {
    let (img, mem) = recorded(32 << 20, None).await;
    let full = Bytes::from(vec![5u8; OBJ as usize]);
    for o in [0, 1, 2, 4] {
        img.write(o * OBJ, full.clone(), false).await.unwrap();
    }
    // Object 4 is unchanged since a (pretend) snapshot: EXISTS_CLEAN, also on disk.
    img.object_map().unwrap().set(4, ObjectState::ExistsClean);
    img.checkpoint().await.unwrap();
    assert_eq!(mem.flags(), 0);
    assert_eq!(
        mem.stored_map().to_vec(),
        img.object_map().unwrap().to_vec()
    );
    mem.take_log();
    let flag_set = || mem.flagged_invalid();

    // Changing nothing in the map: writes to EXISTS objects (one spanning two of them),
    // a partial trim and a partial zero of one, a trim of NONEXISTENT objects, reads.
    img.write(10, Bytes::from_static(b"again"), true)
        .await
        .unwrap();
    img.write(OBJ - 2, Bytes::from_static(b"span"), false)
        .await
        .unwrap();
    img.trim(100, 4096, false).await.unwrap();
    img.write_zeroes(2 * OBJ + 7, 9, ZeroFlags::default())
        .await
        .unwrap();
    img.trim(5 * OBJ, (3 * OBJ) as u32, false).await.unwrap();
    img.read(0, 4096).await.unwrap();
    assert!(
        !flag_set(),
        "requests that change no map state leave the flag clear"
    );
    assert!(
        !mem.take_log().iter().any(|c| c.starts_with("set_flags")),
        "no flag round trip for them"
    );

    // A first write: the flag is set before the object is written.
    img.write(6 * OBJ + 3, Bytes::from_static(b"new"), false)
        .await
        .unwrap();
    assert!(flag_set());
    assert_eq!(mem.take_log(), ["set_flags(3)", "write(6)"]);
    img.checkpoint().await.unwrap();
    mem.take_log();
    // A removal: set before the object is removed.
    img.trim(2 * OBJ, OBJ as u32, false).await.unwrap();
    assert_eq!(mem.take_log(), ["set_flags(3)", "remove(2)"]);
    img.checkpoint().await.unwrap();
    mem.take_log();
    // Part of an EXISTS_CLEAN object zeroed: it now differs from the snapshot.
    img.trim(4 * OBJ + 512, 512, false).await.unwrap();
    assert_eq!(mem.take_log(), ["set_flags(3)", "zero(4)"]);
    img.checkpoint().await.unwrap();
    mem.take_log();
    // NO_HOLE zeroes of a NONEXISTENT object write it.
    img.write_zeroes(7 * OBJ, 512, NO_HOLE).await.unwrap();
    assert_eq!(mem.take_log(), ["set_flags(3)", "write(7)"]);
    img.checkpoint().await.unwrap();
    mem.take_log();
    // A close after a checkpoint with no change since: nothing to write.
    img.write(0, Bytes::from_static(b"last"), false)
        .await
        .unwrap();
    img.close().await.unwrap();
    assert_eq!(mem.take_log(), ["write(0)", "sync", "close"]);
    assert_eq!(mem.flags(), 0);
    let m = mem.stored_map();
    assert_eq!(existing(&m), mem.objects());
    assert_eq!(existing(&m), [0, 1, 4, 6, 7]);
    // (Object 4 becoming EXISTS after its partial zero is `discard_piece`'s business;
    // here only that the flag was set before the zero.)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn checkpoints_racing_writes_and_trims_never_leave_a_stale_trusted_map() {
    let (img, mem) = recorded(32 << 20, None).await;
    let img = Arc::new(img);
    let stop = Arc::new(AtomicBool::new(false));
    let ckpt = {
        let (img, stop) = (img.clone(), stop.clone());
        tokio::spawn(async move {
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) {
                img.checkpoint().await.unwrap();
                n += 1;
                tokio::task::yield_now().await;
            }
            n
        })
    };
    let mut tasks = Vec::new();
    for t in 0..6u64 {
        let img = img.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..60u64 {
                let obj = (t * 7 + i * 3) % 8;
                match (t + i) % 5 {
                    0 => img.trim(obj * OBJ, OBJ as u32, false).await.unwrap(),
                    1 => img.trim(obj * OBJ + 512, 1024, false).await.unwrap(),
                    _ => img
                        .write(obj * OBJ + i * 512, Bytes::from(vec![t as u8; 512]), false)
                        .await
                        .unwrap(),
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let n = ckpt.await.unwrap();
    assert!(n > 1, "checkpoints ran among the requests ({n})");
    img.close().await.unwrap();
    assert_eq!(mem.flags(), 0);
    assert_eq!(existing(&mem.stored_map()), mem.objects());
}

#[tokio::test(start_paused = true)]
async fn idle_checkpoint_after_a_quiet_period_of_no_map_changes() {
    let (img, mem) = recorded(32 << 20, Some(Duration::from_secs(1))).await;
    let img = Arc::new(img);
    let task = img
        .spawn_idle_checkpoints()
        .expect("a task for a writable image");
    let flag_set = || mem.flagged_invalid();
    let ms = |n| tokio::time::sleep(Duration::from_millis(n));
    img.write(0, Bytes::from_static(b"a"), false).await.unwrap();
    ms(700).await;
    // A map change 0.7 s in moves the deadline to 1.7 s.
    img.write(OBJ, Bytes::from_static(b"b"), false)
        .await
        .unwrap();
    ms(700).await;
    assert!(flag_set(), "1.4 s: 0.7 s since the latest map change");
    ms(600).await;
    assert!(!flag_set(), "2 s: idle for 1.3 s, checkpointed");
    assert_eq!(
        mem.stored_map().to_vec(),
        img.object_map().unwrap().to_vec()
    );
    assert_eq!(existing(&mem.stored_map()), [0, 1]);
    mem.take_log();
    // Writes to EXISTS objects for longer than the idle period: the flag stays clear
    // and no checkpoint is repeated.
    for i in 0..30 {
        img.write(i * 100, Bytes::from_static(b"x"), false)
            .await
            .unwrap();
        ms(100).await;
    }
    assert!(!flag_set());
    assert_eq!(mem.take_log(), vec!["write(0)".to_string(); 30]);
    // A first write sets it again before it returns, and is checkpointed when idle.
    img.write(3 * OBJ, Bytes::from_static(b"c"), false)
        .await
        .unwrap();
    assert!(flag_set());
    assert_eq!(mem.take_log(), ["set_flags(3)", "write(3)"]);
    ms(1500).await;
    assert!(!flag_set());
    assert_eq!(existing(&mem.stored_map()), [0, 1, 3]);
    assert_eq!(
        mem.take_log(),
        ["sync", "write_object_map", "set_flags(0)"],
        "the idle checkpoint writes the map, then clears the flag"
    );
    // Close stops the task.
    img.close().await.unwrap();
    assert_eq!(mem.take_log(), ["sync", "close"]);
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the idle task ends at close")
        .unwrap();
    assert_eq!(mem.flags(), 0);
}

#[tokio::test]
async fn no_idle_checkpoints_read_only_shared_or_off() {
    let (_d, s) = store_with(16 << 20, DEFAULT_FEATURES).await;
    let idle = Some(Duration::from_millis(10));
    let ro = OpenOptions {
        read_only: true,
        checkpoint_idle: idle,
        ..OpenOptions::default()
    };
    let img = Arc::new(Image::open(&s, &spec("vm1"), &ro).await.unwrap());
    assert!(img.spawn_idle_checkpoints().is_none());
    img.close().await.unwrap();
    let shared = OpenOptions {
        shared_default: true,
        checkpoint_idle: idle,
        ..OpenOptions::default()
    };
    let img = Arc::new(Image::open(&s, &spec("vm1"), &shared).await.unwrap());
    assert!(img.is_shared() && img.spawn_idle_checkpoints().is_none());
    img.close().await.unwrap();
    let img = Arc::new(open(&s, false).await);
    assert!(img.spawn_idle_checkpoints().is_none(), "off by default");
    img.close().await.unwrap();
}

#[test]
fn checkpoint_idle_parses_seconds() {
    assert_eq!(parse_checkpoint_idle("30"), Ok(Duration::from_secs(30)));
    assert_eq!(
        parse_checkpoint_idle("0.25"),
        Ok(Duration::from_millis(250))
    );
    for bad in ["0", "-1", "x", "", "nan", "inf"] {
        assert!(parse_checkpoint_idle(bad).is_err(), "{bad}");
    }
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

#[tokio::test]
async fn store_full_is_enospc_naming_the_object() {
    let (d, s) = store_with(16 << 20, DEFAULT_FEATURES).await;
    // An object file that is /dev/full: every write to it fails with ENOSPC.
    let obj = pool(d.path()).join(stored_header(&s).await.object_name(1));
    std::os::unix::fs::symlink("/dev/full", &obj).unwrap();
    let img = open(&s, false).await;
    let e = img
        .write(OBJ + 10, Bytes::from_static(b"data"), false)
        .await
        .unwrap_err();
    assert_eq!(e.errno, Errno::NoSpc);
    assert!(
        e.message.contains(&obj.display().to_string()),
        "{}",
        e.message
    );
    // Other objects still work.
    img.write(0, Bytes::from_static(b"ok"), false)
        .await
        .unwrap();
    // The failed object cannot be synced: close reports it and leaves the flag set,
    // so the map on disk is never trusted.
    let e = img.close().await.unwrap_err();
    assert!(e.message.contains("syncing"), "{}", e.message);
    assert_ne!(header_flags(&s).await & RBD_FLAG_OBJECT_MAP_INVALID, 0);
    std::fs::remove_file(&obj).unwrap();
    let img = open(&s, false).await;
    assert!(matches!(img.map_source(), Some(MapSource::Rebuilt(_))));
    assert_eq!(existing(img.object_map().unwrap()), [0]);
    img.close().await.unwrap();
    assert_eq!(header_flags(&s).await, 0);
}
