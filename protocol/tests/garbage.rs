//! Random bytes thrown at every phase: the server must answer or close, never panic or
//! hang. A cheap stand-in for the fuzzer, run on every `cargo test`.
mod common;

use common::*;
use nbd_protocol::consts::*;
use nbd_protocol::{serve_transmission, MemoryBackend, ServerOptions};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A seeded generator (fastrand's wyrand): deterministic, so a failure reproduces from its
/// seed.
type Rng = fastrand::Rng;

fn bytes(r: &mut Rng, n: usize) -> Vec<u8> {
    (0..n).map(|_| r.u8(..)).collect()
}

/// Mostly-plausible junk: valid magics with random fields, so it gets past the first check.
fn junk_options(r: &mut Rng) -> Vec<u8> {
    let mut v = Vec::new();
    for _ in 0..(r.u64(..) % 20) {
        v.extend_from_slice(&IHAVEOPT.to_be_bytes());
        v.extend_from_slice(&((r.u64(..) % 14) as u32).to_be_bytes());
        let len = (r.u64(..) % 64) as u32;
        v.extend_from_slice(&len.to_be_bytes());
        v.extend(bytes(r, len as usize));
    }
    if r.u64(..).is_multiple_of(2) {
        let n = (r.u64(..) % 64) as usize;
        v.extend(bytes(r, n));
    }
    v
}

fn junk_requests(r: &mut Rng) -> Vec<u8> {
    let mut v = Vec::new();
    for _ in 0..(r.u64(..) % 40) {
        let cmd = (r.u64(..) % 10) as u16;
        if cmd == CMD_DISC {
            continue;
        }
        let len = (r.u64(..) % 70_000) as u32;
        let h = nbd_protocol::request::RequestHeader {
            flags: (r.u64(..) % 64) as u16,
            command: cmd,
            handle: r.u64(..),
            offset: if r.u64(..).is_multiple_of(4) {
                r.u64(..)
            } else {
                r.u64(..) % (1 << 20)
            },
            length: len,
        };
        v.extend_from_slice(&h.encode());
        if cmd == CMD_WRITE {
            v.extend(bytes(r, len as usize));
        }
    }
    if r.u64(..).is_multiple_of(2) {
        let n = (r.u64(..) % 64) as usize;
        v.extend(bytes(r, n));
    }
    v
}

async fn drain(c: &mut Client) {
    let mut sink = vec![0u8; 1 << 16];
    loop {
        match tokio::time::timeout(T, c.s.read(&mut sink)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(_)) => {}
            Err(_) => panic!("server neither answered nor closed"),
        }
    }
}

#[tokio::test]
async fn handshake_garbage() {
    let mut r = Rng::with_seed(0x1234_5678_9abc_def1);
    for _ in 0..300 {
        let ex = exports(vec![("x", Arc::new(MemoryBackend::new(1 << 20)))]);
        let (mut c, srv) = start(ex, ServerOptions::default(), 1 << 20);
        c.greet(FLAG_C_FIXED_NEWSTYLE | (r.u64(..) % 4) as u32)
            .await;
        let junk = junk_options(&mut r);
        c.s.write_all(&junk).await.unwrap();
        // Half the time leave; half the time close our write side and read to the end.
        if r.u64(..).is_multiple_of(2) {
            drop(c);
        } else {
            c.s.shutdown().await.unwrap();
            drain(&mut c).await;
        }
        let _ = srv.finish().await;
    }
}

#[tokio::test]
async fn transmission_garbage() {
    let mut r = Rng::with_seed(0x0bad_cafe_f00d_0001);
    let mut replied = 0usize;
    for i in 0..200 {
        let b = Arc::new(MemoryBackend::new(1 << 20));
        let (a, s) = tokio::io::duplex(1 << 20);
        let (_tx, rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(serve_transmission(s, b, ServerOptions::default(), rx));
        let junk = junk_requests(&mut r);
        let (mut rd, mut wr) = tokio::io::split(a);
        // Write and read at once: the replies could otherwise fill the pipe.
        let reader = tokio::spawn(async move {
            let mut sink = vec![0u8; 1 << 16];
            let mut total = 0usize;
            while let Ok(n) = rd.read(&mut sink).await {
                if n == 0 {
                    break;
                }
                total += n;
            }
            total
        });
        let _ = wr.write_all(&junk).await;
        let _ = wr.shutdown().await;
        tokio::time::timeout(T, task)
            .await
            .unwrap_or_else(|_| panic!("iteration {i}: server hung"))
            .expect("server panicked")
            .ok();
        replied += tokio::time::timeout(T, reader).await.unwrap().unwrap();
    }
    // The junk is plausible enough that the server answered much of it.
    assert!(replied > 100_000, "only {replied} reply bytes");
}
