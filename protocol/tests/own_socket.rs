//! Connections over our own socket type (NbdSocket), as `rados-nbd serve` and the kernel
//! attach run them: split into lock-free halves for transmission, and polling while a
//! large write payload arrives.
mod common;

use common::*;
use nbd_protocol::consts::*;
use nbd_protocol::{
    serve_connection, serve_transmission, MemoryBackend, NbdSocket, PollHint, ServerOptions,
};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio::sync::watch;

fn own_socket(s: UnixStream) -> NbdSocket {
    NbdSocket::from_unix(s)
        .unwrap()
        .with_polling(Duration::from_micros(64))
}

async fn read_back(c: &mut Client<UnixStream>, handle: u64, offset: u64, len: u32) -> Vec<u8> {
    c.request(0, CMD_READ, handle, offset, len).await;
    assert_eq!(c.simple().await, (0, handle));
    c.bytes(len as usize).await
}

/// A client that sends its first request right behind NBD_OPT_GO, before the reply:
/// the handshake's buffered reader may hold that request, and the transmission halves
/// must get those bytes first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_pipelined_behind_go_survives_the_split() {
    let backend = Arc::new(MemoryBackend::new(1 << 20));
    let (a, b) = UnixStream::pair().unwrap();
    let (_tx, rx) = watch::channel(false);
    let server = tokio::spawn(serve_connection(
        own_socket(b),
        exports(vec![("", backend)]),
        ServerOptions::default(),
        rx,
    ));
    let mut c = Client { s: a };
    c.greet(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;
    let data = pattern(4096, 7);
    // One write: GO and the WRITE arrive together.
    let mut wire = Vec::new();
    let go = go_data("", &[]);
    wire.extend_from_slice(&IHAVEOPT.to_be_bytes());
    wire.extend_from_slice(&OPT_GO.to_be_bytes());
    wire.extend_from_slice(&(go.len() as u32).to_be_bytes());
    wire.extend_from_slice(&go);
    let h = nbd_protocol::request::RequestHeader {
        flags: 0,
        command: CMD_WRITE,
        handle: 5,
        offset: 8192,
        length: 4096,
    };
    wire.extend_from_slice(&h.encode());
    wire.extend_from_slice(&data);
    c.s.write_all(&wire).await.unwrap();
    loop {
        let r = c.opt_reply().await;
        if r.kind == REP_ACK {
            break;
        }
        assert_eq!(r.kind, REP_INFO, "GO failed: {r:?}");
    }
    assert_eq!(c.simple().await, (0, 5));
    assert_eq!(read_back(&mut c, 6, 8192, 4096).await, data);
    c.request(0, CMD_DISC, 7, 0, 0).await;
    server.await.unwrap().unwrap();
}

/// Waits up to `within` for the hint to read `want`.
async fn hint_becomes(hint: &PollHint, want: bool, within: Duration) -> bool {
    let end = Instant::now() + within;
    while Instant::now() < end {
        if hint.is_set() == want {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    hint.is_set() == want
}

/// A write payload of 128 KiB or more that is still arriving is received polling; a
/// smaller one, or a client that sends one request at a time before its third, is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_write_payload_is_received_polling() {
    let backend = Arc::new(MemoryBackend::new(4 << 20));
    let (a, b) = UnixStream::pair().unwrap();
    let sock = own_socket(b);
    let hint = sock.poll_hint().expect("polling configured");
    let (_tx, rx) = watch::channel(false);
    let server = tokio::spawn(serve_transmission(
        sock,
        backend,
        ServerOptions::default(),
        rx,
    ));
    let mut c = Client { s: a };

    // 64 KiB, half of it sent: not polled for.
    let small = pattern(64 << 10, 1);
    c.request(0, CMD_WRITE, 1, 0, small.len() as u32).await;
    c.s.write_all(&small[..32 << 10]).await.unwrap();
    assert!(
        hint_becomes(&hint, false, Duration::from_millis(200)).await
            && !hint_becomes(&hint, true, Duration::from_millis(200)).await,
        "polled for the rest of a 64 KiB payload"
    );
    c.s.write_all(&small[32 << 10..]).await.unwrap();
    assert_eq!(c.simple().await, (0, 1));

    // 1 MiB, a quarter sent: polled for.
    let big = pattern(1 << 20, 2);
    c.request(0, CMD_WRITE, 2, 1 << 20, big.len() as u32).await;
    c.s.write_all(&big[..256 << 10]).await.unwrap();
    assert!(
        hint_becomes(&hint, true, Duration::from_secs(5)).await,
        "did not poll for the rest of a 1 MiB payload"
    );
    c.s.write_all(&big[256 << 10..]).await.unwrap();
    assert_eq!(c.simple().await, (0, 2));

    // Both landed whole.
    assert_eq!(read_back(&mut c, 3, 0, small.len() as u32).await, small);
    assert_eq!(read_back(&mut c, 4, 1 << 20, big.len() as u32).await, big);
    c.request(0, CMD_DISC, 5, 0, 0).await;
    server.await.unwrap().unwrap();
}
