//! The data plane: reads, writes, trims and zeroes split into object pieces, against
//! the map and the store; block status; what `info` promises.

use super::*;

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
    write_disk_map(&s, m.encode()).await;
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
    write_disk_map(s, m.encode()).await;
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
    // All of the (short) last object: zeroed, as librbd zeroes it (it is not a whole
    // object), then removed for holding no data (the directory store can tell).
    img.trim(OBJ, 2 << 20, false).await.unwrap();
    assert_eq!(objects_on_disk(&s).await, [0]);
    assert_eq!(img.object_map().unwrap().get(1), ObjectState::Nonexistent);
    assert_eq!(read_all(&img, OBJ, 4096).await, vec![0; 4096]);
    let st = img.stats();
    assert_eq!((st.store_removes, st.store_zeroes), (1, 2));
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
    img.finish_rebuild().await.unwrap();
    assert_eq!(existing(img.object_map().unwrap()), [0]);
    img.close().await.unwrap();
    assert_eq!(header_flags(&s).await, 0);
}
