//! Resizing an open image.

use super::*;

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
    // Block status: EINVAL from the new end on, as a read; across it, up to it.
    assert_eq!(
        img.block_status(6 << 20, 512).await.unwrap_err().errno,
        Errno::Inval
    );
    let ext = img.block_status(5 << 20, 4 << 20).await.unwrap();
    assert_eq!(
        ext.iter().map(|e| e.length).sum::<u64>(),
        1 << 20,
        "{ext:?}"
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

/// A shrink removes the objects past the new end MANAGEMENT_CONCURRENCY at a time, as
/// librbd's trim does: requests wait for the whole shrink, so removing them one round
/// trip after another would hold them off for as many round trips as there are objects.
#[tokio::test(start_paused = true)]
async fn a_shrink_removes_objects_several_at_a_time() {
    let rtt = Duration::from_millis(10);
    let mem = MemImage::new(64 * OBJ, DEFAULT_FEATURES)
        .audited()
        .slow_removes(rtt);
    let img = Image::from_store_image(mem.clone(), &spec("vm1"), &OpenOptions::default())
        .await
        .unwrap();
    for o in 0..64 {
        img.write(o * OBJ + 512, Bytes::from_static(b"data"), false)
            .await
            .unwrap();
    }
    let start = tokio::time::Instant::now();
    img.resize(4 * OBJ, true).await.unwrap();
    let took = start.elapsed();
    assert_eq!(mem.objects(), [0, 1, 2, 3]);
    assert_eq!(img.object_map().unwrap().len(), 4);
    assert_eq!(mem.max_removes_at_once(), MANAGEMENT_CONCURRENCY);
    // 60 removals: 6 round trips, not 60.
    assert!(took < rtt * 10, "the shrink took {took:?}");
    assert_eq!(&read_all(&img, 3 * OBJ + 512, 4).await, b"data");
}

/// The first failure of a whole-image operation stops it, but what it already asked of
/// the store runs to its end and is counted, so nothing lands behind the map's back
/// after the operation returned: the old loop dropped the 9 steps under way.
#[tokio::test(start_paused = true)]
async fn after_a_failure_the_steps_under_way_end_and_no_new_one_starts() {
    let started = std::sync::Mutex::new(Vec::new());
    let finished = std::sync::Mutex::new(Vec::new());
    let mut counted = 0;
    let r = all_concurrently(
        0..30u64,
        |i| {
            let (started, finished) = (&started, &finished);
            async move {
                started.lock().unwrap().push(i);
                let ms = if i == 2 { 5 } else { 10 };
                tokio::time::sleep(Duration::from_millis(ms)).await;
                if i == 2 {
                    return Err(Error::new(ErrorKind::Io, "object 2: an OSD error"));
                }
                finished.lock().unwrap().push(i);
                Ok(())
            }
        },
        || counted += 1,
    )
    .await;
    assert_eq!(r.unwrap_err().message, "object 2: an OSD error");
    let mut started = started.into_inner().unwrap();
    started.sort();
    assert_eq!(
        started,
        (0..MANAGEMENT_CONCURRENCY as u64).collect::<Vec<_>>()
    );
    let mut finished = finished.into_inner().unwrap();
    finished.sort();
    let expect: Vec<u64> = (0..MANAGEMENT_CONCURRENCY as u64)
        .filter(|&i| i != 2)
        .collect();
    assert_eq!(finished, expect);
    assert_eq!(counted, expect.len());
}
