mod common;

use common::*;
use nbd_protocol::consts::*;
use nbd_protocol::{serve_transmission, transmission_flags, Backend, MemoryBackend, ServerOptions};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;

const MIB: u64 = 1 << 20;

fn one(
    b: MemoryBackend,
) -> (
    Arc<MemoryBackend>,
    Arc<nbd_protocol::Exports<MemoryBackend>>,
) {
    let b = Arc::new(b);
    (b.clone(), exports(vec![("disk", b)]))
}

async fn read_ok(c: &mut Client, handle: u64, offset: u64, len: u32) -> Vec<u8> {
    c.request(0, CMD_READ, handle, offset, len).await;
    assert_eq!(c.simple().await, (0, handle));
    c.bytes(len as usize).await
}

#[tokio::test]
async fn write_read_roundtrip_and_errors_keep_connection() {
    let (b, ex) = one(MemoryBackend::new(MIB));
    let (mut c, srv) = start(ex, ServerOptions::default(), 1 << 16);
    let (size, flags) = c.connect_simple().await;
    assert_eq!(size, MIB);
    for bit in [
        FLAG_SEND_FLUSH,
        FLAG_SEND_FUA,
        FLAG_SEND_TRIM,
        FLAG_SEND_WRITE_ZEROES,
        FLAG_SEND_CACHE,
        FLAG_SEND_FAST_ZERO,
        FLAG_CAN_MULTI_CONN,
    ] {
        assert_ne!(flags & bit, 0, "flag {bit:#x}");
    }

    let data = pattern(10_000, 3);
    c.write(CMD_FLAG_FUA, 1, 4000, &data).await;
    assert_eq!(c.simple().await, (0, 1));
    assert_eq!(read_ok(&mut c, 2, 4000, 10_000).await, data);
    assert_eq!(b.snapshot(4000, 10_000), data);

    // Out-of-range read: EINVAL, and no payload follows.
    c.request(0, CMD_READ, 3, MIB - 10, 11).await;
    assert_eq!(c.simple().await, (EINVAL, 3));
    // Offset+length overflowing u64.
    c.request(0, CMD_READ, 4, u64::MAX - 1, 4).await;
    assert_eq!(c.simple().await, (EINVAL, 4));
    // Write past the end: ENOSPC; its payload is skipped, so the next request parses.
    c.write(0, 5, MIB - 100, &pattern(200, 1)).await;
    assert_eq!(c.simple().await, (ENOSPC, 5));
    // Illegal flags: unknown bit, DF without structured replies, NO_HOLE on WRITE.
    c.request(1 << 12, CMD_READ, 6, 0, 1).await;
    assert_eq!(c.simple().await, (EINVAL, 6));
    c.request(CMD_FLAG_DF, CMD_READ, 7, 0, 1).await;
    assert_eq!(c.simple().await, (EINVAL, 7));
    c.write(CMD_FLAG_NO_HOLE, 8, 0, b"abcd").await;
    assert_eq!(c.simple().await, (EINVAL, 8));
    assert_eq!(
        b.snapshot(0, 4),
        vec![0; 4],
        "a rejected write must not be applied"
    );
    // Unknown command, then a good read still works.
    c.request(0, 42, 9, 0, 0).await;
    assert_eq!(c.simple().await, (EINVAL, 9));
    // BLOCK_STATUS without a negotiated context.
    c.request(0, CMD_BLOCK_STATUS, 10, 0, 512).await;
    assert_eq!(c.simple().await, (EINVAL, 10));
    // After all those errors the connection is still in step.
    assert_eq!(read_ok(&mut c, 11, 4000, 4).await, data[..4]);

    // Flush, trim, zeroes, cache.
    c.request(0, CMD_FLUSH, 12, 0, 0).await;
    assert_eq!(c.simple().await, (0, 12));
    assert_eq!(b.flushes.load(Ordering::SeqCst), 1);
    c.request(0, CMD_FLUSH, 13, 1, 0).await;
    assert_eq!(c.simple().await, (EINVAL, 13));
    c.request(
        CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        CMD_WRITE_ZEROES,
        14,
        4000,
        100,
    )
    .await;
    assert_eq!(c.simple().await, (0, 14));
    assert_eq!(b.snapshot(4000, 100), vec![0; 100]);
    c.request(0, CMD_TRIM, 15, 0, MIB as u32).await;
    assert_eq!(c.simple().await, (0, 15));
    assert_eq!(b.allocated_pages(), 0);
    c.request(0, CMD_CACHE, 16, 0, 4096).await;
    assert_eq!(c.simple().await, (0, 16));

    c.request(0, CMD_DISC, 0, 0, 0).await;
    assert!(c.at_eof().await);
    srv.finish().await.unwrap();
}

#[tokio::test]
async fn oversized_requests() {
    let (b, ex) = one(MemoryBackend::new(64 * MIB));
    let (mut c, srv) = start(ex, ServerOptions::default(), 1 << 16);
    c.connect_simple().await;
    c.request(0, CMD_READ, 1, 0, 40 << 20).await;
    assert_eq!(c.simple().await, (EINVAL, 1));
    // An oversized write: rejected, its 40 MiB payload drained, connection in step.
    let big = vec![0x5au8; 40 << 20];
    let writer = async {
        c.write(0, 2, 0, &big).await;
        c.simple().await
    };
    assert_eq!(writer.await, (EINVAL, 2));
    assert_eq!(b.allocated_pages(), 0);
    assert_eq!(b.writes_done.load(Ordering::SeqCst), 0);
    // A large but legal TRIM is fine: only READ/WRITE are bounded by the payload limit.
    c.request(0, CMD_TRIM, 3, 0, 64 << 20).await;
    assert_eq!(c.simple().await, (0, 3));
    assert_eq!(read_ok(&mut c, 4, 0, 8).await, vec![0; 8]);
    c.request(0, CMD_DISC, 0, 0, 0).await;
    srv.finish().await.unwrap();
}

#[tokio::test]
async fn read_only_export_refuses_writes() {
    let (_b, ex) = one(MemoryBackend::new(MIB).read_only(true));
    let (mut c, srv) = start(ex, ServerOptions::default(), 1 << 16);
    let (_, flags) = c.connect_simple().await;
    assert_ne!(flags & FLAG_READ_ONLY, 0);
    assert_eq!(flags & (FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES), 0);
    c.write(0, 1, 0, b"hello").await;
    assert_eq!(c.simple().await, (EPERM, 1));
    c.request(0, CMD_TRIM, 2, 0, 512).await;
    assert_eq!(c.simple().await, (EPERM, 2));
    c.request(0, CMD_WRITE_ZEROES, 3, 0, 512).await;
    assert_eq!(c.simple().await, (EPERM, 3));
    assert_eq!(read_ok(&mut c, 4, 0, 5).await, vec![0; 5]);
    c.request(0, CMD_DISC, 0, 0, 0).await;
    srv.finish().await.unwrap();
}

#[tokio::test]
async fn structured_reads_with_holes_and_df() {
    let (b, ex) = one(MemoryBackend::new(MIB));
    let (mut c, srv) = start(ex, ServerOptions::default(), 1 << 16);
    c.connect_structured().await;
    // Data in page 1 only (64 KiB pages): reading pages 0..3 gives hole, data, hole.
    let data = pattern(65536, 9);
    c.write(0, 1, 65536, &data).await;
    assert_eq!(c.any_reply().await, (1, 0));
    assert_eq!(b.allocated_pages(), 1);

    c.request(0, CMD_READ, 2, 0, 3 * 65536).await;
    let h1 = c.chunk().await;
    assert_eq!(
        (h1.kind, h1.flags, h1.handle),
        (REPLY_TYPE_OFFSET_HOLE, 0, 2)
    );
    assert_eq!(u64::from_be_bytes(h1.data[..8].try_into().unwrap()), 0);
    assert_eq!(
        u32::from_be_bytes(h1.data[8..12].try_into().unwrap()),
        65536
    );
    let d = c.chunk().await;
    assert_eq!((d.kind, d.flags), (REPLY_TYPE_OFFSET_DATA, 0));
    assert_eq!(u64::from_be_bytes(d.data[..8].try_into().unwrap()), 65536);
    assert_eq!(&d.data[8..], &data[..]);
    let h2 = c.chunk().await;
    assert_eq!(
        (h2.kind, h2.flags),
        (REPLY_TYPE_OFFSET_HOLE, REPLY_FLAG_DONE)
    );
    assert_eq!(u64::from_be_bytes(h2.data[..8].try_into().unwrap()), 131072);

    // DF: a single OFFSET_DATA chunk with the holes as zeros.
    c.request(CMD_FLAG_DF, CMD_READ, 3, 65536 - 10, 20).await;
    let one = c.chunk().await;
    assert_eq!(
        (one.kind, one.flags),
        (REPLY_TYPE_OFFSET_DATA, REPLY_FLAG_DONE)
    );
    assert_eq!(&one.data[8..18], &[0u8; 10]);
    assert_eq!(&one.data[18..], &data[..10]);

    // Errors are structured, with a message, for reads and others alike.
    c.request(0, CMD_READ, 4, MIB, 1).await;
    let e = c.chunk().await;
    assert_eq!(
        (e.kind, e.flags, e.handle),
        (REPLY_TYPE_ERROR, REPLY_FLAG_DONE, 4)
    );
    assert_eq!(u32::from_be_bytes(e.data[..4].try_into().unwrap()), EINVAL);
    let mlen = u16::from_be_bytes(e.data[4..6].try_into().unwrap()) as usize;
    assert!(mlen > 0 && e.data.len() == 6 + mlen);
    c.write(0, 5, MIB, b"x").await;
    let e = c.chunk().await;
    assert_eq!(u32::from_be_bytes(e.data[..4].try_into().unwrap()), ENOSPC);
    c.request(CMD_FLAG_REQ_ONE, CMD_READ, 6, 0, 1).await;
    let e = c.chunk().await;
    assert_eq!(u32::from_be_bytes(e.data[..4].try_into().unwrap()), EINVAL);
    c.request(0, CMD_DISC, 0, 0, 0).await;
    srv.finish().await.unwrap();
}

fn descriptors(ch: &Chunk) -> Vec<(u32, u32)> {
    assert_eq!(ch.kind, REPLY_TYPE_BLOCK_STATUS);
    assert_ne!(ch.flags & REPLY_FLAG_DONE, 0);
    ch.data[4..]
        .chunks(8)
        .map(|d| {
            (
                u32::from_be_bytes(d[..4].try_into().unwrap()),
                u32::from_be_bytes(d[4..].try_into().unwrap()),
            )
        })
        .collect()
}

#[tokio::test]
async fn block_status_merges_trims_and_req_one() {
    let (_b, ex) = one(MemoryBackend::new(MIB));
    let (mut c, srv) = start(ex, ServerOptions::default(), 1 << 16);
    c.connect_structured().await;
    // Allocate pages 2 and 3 (adjacent: the backend reports two extents, we merge them).
    c.write(0, 1, 2 * 65536, &pattern(2 * 65536, 1)).await;
    assert_eq!(c.any_reply().await, (1, 0));
    const HZ: u32 = STATE_HOLE | STATE_ZERO;

    c.request(0, CMD_BLOCK_STATUS, 2, 0, MIB as u32).await;
    let d = descriptors(&c.chunk().await);
    assert_eq!(
        d,
        vec![(131072, HZ), (131072, 0), (MIB as u32 - 262144, HZ)]
    );

    // Unaligned start and end: clipped to the request.
    c.request(0, CMD_BLOCK_STATUS, 3, 100, 131072).await;
    let d = descriptors(&c.chunk().await);
    assert_eq!(d, vec![(131072 - 100, HZ), (100, 0)]);

    c.request(CMD_FLAG_REQ_ONE, CMD_BLOCK_STATUS, 4, 0, MIB as u32)
        .await;
    let d = descriptors(&c.chunk().await);
    assert_eq!(d, vec![(131072, HZ)]);

    // Beyond the end: EINVAL.
    c.request(0, CMD_BLOCK_STATUS, 5, MIB - 1, 2).await;
    let e = c.chunk().await;
    assert_eq!(e.kind, REPLY_TYPE_ERROR);
    assert_eq!(u32::from_be_bytes(e.data[..4].try_into().unwrap()), EINVAL);
    c.request(0, CMD_DISC, 0, 0, 0).await;
    srv.finish().await.unwrap();
}

#[tokio::test]
async fn disc_waits_for_in_flight_writes() {
    let (b, ex) = one(MemoryBackend::new(MIB).write_delay(Duration::from_millis(200)));
    let (mut c, srv) = start(ex, ServerOptions::default(), 1 << 20);
    c.connect_simple().await;
    for i in 0..20u64 {
        c.write(0, i, i * 4096, &pattern(4096, i as u8)).await;
    }
    c.request(0, CMD_DISC, 99, 0, 0).await;
    // Every write is answered after DISC, in whatever order they completed.
    let mut seen: Vec<u64> = Vec::new();
    for _ in 0..20 {
        let (e, h) = c.simple().await;
        assert_eq!(e, 0);
        seen.push(h);
    }
    seen.sort();
    assert_eq!(seen, (0..20).collect::<Vec<_>>());
    assert!(c.at_eof().await);
    srv.finish().await.unwrap();
    assert_eq!(b.writes_done.load(Ordering::SeqCst), 20);
    for i in 0..20u64 {
        assert_eq!(b.snapshot(i * 4096, 4096), pattern(4096, i as u8));
    }
}

#[tokio::test]
async fn many_requests_run_concurrently() {
    // 32 writes of 200 ms each: sequential would take 6.4 s.
    let (b, ex) = one(MemoryBackend::new(MIB).write_delay(Duration::from_millis(200)));
    let (mut c, srv) = start(ex, ServerOptions::default(), 1 << 20);
    c.connect_simple().await;
    let t0 = std::time::Instant::now();
    for i in 0..32u64 {
        c.write(0, i, i * 512, &[i as u8; 512]).await;
    }
    for _ in 0..32 {
        assert_eq!(c.simple().await.0, 0);
    }
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "took {:?}",
        t0.elapsed()
    );
    assert_eq!(b.writes_done.load(Ordering::SeqCst), 32);
    c.request(0, CMD_DISC, 0, 0, 0).await;
    srv.finish().await.unwrap();
}

#[tokio::test]
async fn abrupt_disconnect_mid_payload() {
    let (b, ex) = one(MemoryBackend::new(MIB).write_delay(Duration::from_millis(300)));
    let (mut c, srv) = start(ex, ServerOptions::default(), 1 << 20);
    c.connect_simple().await;
    // A complete write, still running when the client vanishes: it must be applied.
    c.write(0, 1, 0, &pattern(8192, 5)).await;
    // Then a write whose payload is cut short.
    c.request(0, CMD_WRITE, 2, 65536, 65536).await;
    c.s.write_all(&[1u8; 1000]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(c);
    srv.finish().await.unwrap();
    assert_eq!(b.writes_done.load(Ordering::SeqCst), 1);
    assert_eq!(b.snapshot(0, 8192), pattern(8192, 5));
    assert_eq!(b.snapshot(65536, 1000), vec![0; 1000]);
}

#[tokio::test]
async fn abrupt_disconnect_mid_header() {
    let (_b, ex) = one(MemoryBackend::new(MIB));
    let (mut c, srv) = start(ex, ServerOptions::default(), 1 << 20);
    c.connect_simple().await;
    c.s.write_all(&REQUEST_MAGIC.to_be_bytes()).await.unwrap();
    drop(c);
    srv.finish().await.unwrap();
}

#[tokio::test]
async fn bad_request_magic_closes() {
    let (_b, ex) = one(MemoryBackend::new(MIB));
    let (mut c, srv) = start(ex, ServerOptions::default(), 1 << 20);
    c.connect_simple().await;
    c.s.write_all(&[0x77; 28]).await.unwrap();
    assert!(c.at_eof().await);
    assert!(srv.finish().await.is_err());
}

#[tokio::test]
async fn client_that_never_reads_replies_is_throttled() {
    let (b, ex) = one(MemoryBackend::new(64 * MIB));
    let opts = ServerOptions {
        max_in_flight: 128,
        max_buffered_bytes: 4 << 20,
        ..Default::default()
    };
    let (mut c, srv) = start(ex, opts, 64 * 1024);
    c.connect_simple().await;
    // Ask for 1 MiB reads forever and read nothing back. The server may only hold 4 MiB
    // of replies, so it must stop reading and our writes must eventually block.
    let mut sent = 0u64;
    loop {
        let h = nbd_protocol::request::RequestHeader {
            flags: 0,
            command: CMD_READ,
            handle: sent,
            offset: 0,
            length: 1 << 20,
        };
        match tokio::time::timeout(Duration::from_millis(500), c.s.write_all(&h.encode())).await {
            Ok(r) => r.unwrap(),
            Err(_) => break,
        }
        sent += 1;
        assert!(
            sent < 100_000,
            "server kept reading requests it cannot answer"
        );
    }
    let started = b.reads_started.load(Ordering::SeqCst);
    // 4 MiB budget / 1 MiB reads, plus the one the writer is part-way through sending.
    assert!(started <= 6, "{started} reads ran with a 4 MiB budget");
    eprintln!("sent {sent} requests, {started} reads started");
    assert!(sent > started, "sent {sent}, started {started}");
    drop(c);
    srv.finish().await.unwrap();
}

#[tokio::test]
async fn shutdown_drains_in_flight_requests() {
    let (b, ex) = one(MemoryBackend::new(MIB).write_delay(Duration::from_millis(300)));
    let (mut c, srv) = start(ex, ServerOptions::default(), 1 << 20);
    c.connect_simple().await;
    for i in 0..10u64 {
        c.write(0, i, i * 512, &[7u8; 512]).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    srv.shutdown.send(true).unwrap();
    for _ in 0..10 {
        assert_eq!(c.simple().await.0, 0);
    }
    assert!(c.at_eof().await, "server closes after draining");
    srv.finish().await.unwrap();
    assert_eq!(b.writes_done.load(Ordering::SeqCst), 10);
}

#[tokio::test]
async fn transmission_only_for_the_kernel() {
    let b = Arc::new(MemoryBackend::new(MIB));
    let flags = transmission_flags(&b.info());
    assert_ne!(flags & FLAG_HAS_FLAGS, 0);
    assert_eq!(flags & FLAG_SEND_DF, 0);
    let (mut c, srv) = start_transmission(b.clone());
    // No greeting: the first bytes are ours.
    c.write(CMD_FLAG_FUA, 1, 512, b"kernel").await;
    assert_eq!(c.simple().await, (0, 1));
    assert_eq!(read_ok(&mut c, 2, 512, 6).await, b"kernel");
    c.request(0, CMD_BLOCK_STATUS, 3, 0, 512).await;
    assert_eq!(c.simple().await, (EINVAL, 3));
    c.request(CMD_FLAG_DF, CMD_READ, 4, 0, 512).await;
    assert_eq!(c.simple().await, (EINVAL, 4));
    c.request(0, CMD_DISC, 5, 0, 0).await;
    assert!(c.at_eof().await);
    srv.finish().await.unwrap();
    assert_eq!(b.snapshot(512, 6), b"kernel");
}

#[tokio::test]
async fn the_kernel_follows_a_resized_export_and_negotiating_clients_do_not() {
    // Transmission-only (the kernel: its device is resized along with the export).
    let b = Arc::new(MemoryBackend::new(MIB));
    let (mut c, srv) = start_transmission(b.clone());
    c.write(0, 1, MIB, b"past the end").await;
    assert_eq!(c.simple().await, (ENOSPC, 1), "beyond the size at connect");
    b.set_size(2 * MIB);
    c.write(0, 2, MIB, b"grown").await;
    assert_eq!(
        c.simple().await,
        (0, 2),
        "the export grew: the new space is usable"
    );
    assert_eq!(read_ok(&mut c, 3, MIB, 5).await, b"grown");
    b.set_size(MIB / 2);
    c.request(0, CMD_READ, 4, MIB / 2, 512).await;
    assert_eq!(c.simple().await, (EINVAL, 4), "and it shrank");
    c.request(0, CMD_DISC, 5, 0, 0).await;
    srv.finish().await.unwrap();

    // A client that negotiated a size keeps it: NBD has no way to tell it otherwise.
    let b = Arc::new(MemoryBackend::new(MIB));
    let (mut c, srv) = start(
        exports(vec![("", b.clone())]),
        ServerOptions::default(),
        1 << 20,
    );
    let (size, _) = c.connect_simple().await;
    assert_eq!(size, MIB);
    b.set_size(2 * MIB);
    c.write(0, 1, MIB, b"past what it was told").await;
    assert_eq!(c.simple().await, (ENOSPC, 1));
    c.request(0, CMD_DISC, 2, 0, 0).await;
    srv.finish().await.unwrap();
}

#[tokio::test]
async fn dropped_shutdown_sender_is_not_a_signal() {
    let b = Arc::new(MemoryBackend::new(MIB));
    let (a, s) = tokio::io::duplex(1 << 20);
    let (tx, rx) = watch::channel(false);
    drop(tx);
    let task = tokio::spawn(serve_transmission(
        s,
        b.clone(),
        ServerOptions::default(),
        rx,
    ));
    let mut c = Client { s: a };
    tokio::time::sleep(Duration::from_millis(50)).await;
    c.write(0, 1, 0, b"still here").await;
    assert_eq!(c.simple().await, (0, 1));
    c.request(0, CMD_DISC, 2, 0, 0).await;
    tokio::time::timeout(T, task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(b.snapshot(0, 10), b"still here");
}

#[tokio::test]
async fn shutdown_stops_reading_pipelined_requests() {
    // Requests already in the server's read buffer when shutdown is raised are not
    // started: only what was in flight is finished.
    let (b, ex) = one(MemoryBackend::new(MIB).write_delay(Duration::from_millis(300)));
    let opts = ServerOptions {
        max_in_flight: 1,
        max_buffered_bytes: 1 << 20,
        ..Default::default()
    };
    let (mut c, srv) = start(ex, opts, 1 << 20);
    c.connect_simple().await;
    for i in 0..50u64 {
        c.write(0, i, i * 512, &[1u8; 512]).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    srv.shutdown.send(true).unwrap();
    let mut answered = 0;
    while !c.at_eof_or_reply().await {
        answered += 1;
    }
    srv.finish().await.unwrap();
    let done = b.writes_done.load(Ordering::SeqCst);
    assert_eq!(done, answered, "every write that ran was answered");
    assert!(
        (1..=2).contains(&done),
        "{done} writes ran after shutdown with one slot"
    );
}

#[tokio::test]
async fn absurd_options_are_clamped_not_fatal() {
    let (_b, ex) = one(MemoryBackend::new(MIB));
    let opts = ServerOptions {
        max_in_flight: usize::MAX,
        max_buffered_bytes: 0,
        ..Default::default()
    };
    let (mut c, srv) = start(ex, opts, 1 << 16);
    c.connect_simple().await;
    c.write(0, 1, 0, b"ok").await;
    assert_eq!(c.simple().await, (0, 1));
    assert_eq!(read_ok(&mut c, 2, 0, 2).await, b"ok");
    c.request(0, CMD_DISC, 0, 0, 0).await;
    srv.finish().await.unwrap();
}
