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

/// A backend whose reads finish on threads of their own, as librados completes reads on
/// its own threads: each read's data is handed over by a fresh thread after a random
/// pause, under `inline::completing`, so a read that came alone finishes on that thread
/// and writes its own reply (inline.rs, transmission.rs `Direct`).
struct ForeignCompletions {
    inner: MemoryBackend,
    seed: std::sync::atomic::AtomicU64,
}

impl nbd_protocol::Backend for ForeignCompletions {
    fn info(&self) -> nbd_protocol::ExportInfo {
        self.inner.info()
    }

    async fn read(
        &self,
        offset: u64,
        length: u32,
    ) -> Result<Vec<nbd_protocol::ReadChunk>, nbd_protocol::BackendError> {
        let data = self.inner.read(offset, length).await;
        let pause = self
            .seed
            .fetch_add(0x9e37_79b9_7f4a_7c15, std::sync::atomic::Ordering::Relaxed)
            % 300;
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_micros(pause));
            let mut tx = Some(tx);
            let mut data = Some(data);
            nbd_protocol::inline::completing(&mut || {
                let _ = tx.take().unwrap().send(data.take().unwrap());
            });
        });
        rx.await.expect("completion thread gone")
    }

    async fn write(
        &self,
        offset: u64,
        data: bytes::Bytes,
        fua: bool,
    ) -> Result<(), nbd_protocol::BackendError> {
        self.inner.write(offset, data, fua).await
    }

    async fn flush(&self) -> Result<(), nbd_protocol::BackendError> {
        self.inner.flush().await
    }

    async fn trim(
        &self,
        offset: u64,
        length: u32,
        fua: bool,
    ) -> Result<(), nbd_protocol::BackendError> {
        self.inner.trim(offset, length, fua).await
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        length: u32,
        flags: nbd_protocol::ZeroFlags,
    ) -> Result<(), nbd_protocol::BackendError> {
        self.inner.write_zeroes(offset, length, flags).await
    }

    async fn cache(&self, offset: u64, length: u32) -> Result<(), nbd_protocol::BackendError> {
        self.inner.cache(offset, length).await
    }

    async fn block_status(
        &self,
        offset: u64,
        length: u32,
    ) -> Result<Vec<nbd_protocol::Extent>, nbd_protocol::BackendError> {
        self.inner.block_status(offset, length).await
    }
}

/// Replies written straight to the socket by the threads completing reads and replies
/// queued for the writer task never interleave, and none is lost: a client sends seeded
/// random reads and writes, sometimes waiting for each reply (reads that come alone,
/// answered from the completing thread), sometimes in bursts with random gaps (a direct
/// reply racing queued ones), reads of 4 KiB to 2 MiB (the big ones never direct) through
/// a 16 KiB send buffer and a client that sometimes reads slowly (so direct writes stop
/// part-way, about one in two here, and the writer sends the rest), and checks every
/// reply's handle and bytes against a model. Fails on a direct write allowed while
/// replies are queued, and on a writer that sends the rest of a cut-off direct write after
/// other replies (interleaved frames: a bad magic or wrong bytes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_and_queued_replies_never_interleave() {
    use std::collections::HashMap;
    use tokio::io::AsyncReadExt;
    const SIZE: u64 = 8 << 20;
    for seed in [1u64, 2, 3] {
        let backend = Arc::new(ForeignCompletions {
            inner: MemoryBackend::new(SIZE),
            seed: std::sync::atomic::AtomicU64::new(seed),
        });
        let (a, b) = UnixStream::pair().unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&b);
        let sock = own_socket(b);
        // A send buffer smaller than a big read's reply, whatever net.core.wmem_max
        // allows here, so direct writes stop part-way.
        let small: libc::c_int = 16 << 10;
        // SAFETY: setsockopt on a live descriptor, now owned by `sock`, with an int.
        let r = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                (&small as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(r, 0);
        let (_tx, rx) = watch::channel(false);
        let server = tokio::spawn(serve_transmission(
            sock,
            backend,
            ServerOptions::default(),
            rx,
        ));
        let (mut rd, mut wr) = a.into_split();
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut model = vec![0u8; SIZE as usize];
        // Expected replies by handle: the bytes a read must return (empty for writes).
        let pending: Arc<tokio::sync::Mutex<HashMap<u64, Vec<u8>>>> = Default::default();
        let (count_tx, mut count_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let reader_pending = pending.clone();
        let reader = tokio::spawn(async move {
            let mut hdr = [0u8; 16];
            loop {
                if rd.read_exact(&mut hdr).await.is_err() {
                    return;
                }
                let magic = u32::from_be_bytes(hdr[0..4].try_into().unwrap());
                assert_eq!(magic, SIMPLE_REPLY_MAGIC, "reply frames interleaved");
                assert_eq!(u32::from_be_bytes(hdr[4..8].try_into().unwrap()), 0);
                let handle = u64::from_be_bytes(hdr[8..16].try_into().unwrap());
                let want = reader_pending
                    .lock()
                    .await
                    .remove(&handle)
                    .unwrap_or_else(|| panic!("reply for unknown handle {handle}"));
                let mut got = vec![0u8; want.len()];
                rd.read_exact(&mut got).await.unwrap();
                assert!(got == want, "read {handle}: wrong bytes");
                let _ = count_tx.send(());
                // Now and then a slow reader: the socket fills, direct writes stop
                // part-way and replies queue up behind them.
                if handle % 8 == 0 {
                    tokio::time::sleep(Duration::from_micros(300)).await;
                }
            }
        });
        let mut handle = 0u64;
        let mut outstanding = 0usize;
        for _ in 0..400 {
            handle += 1;
            let len = match rng.u8(0..10) {
                0 => 2 << 20,
                1 | 2 => rng.u32(1..=32) << 12,
                3..=5 => 128 << 10,
                _ => 4096,
            };
            let offset = rng.u64(0..(SIZE - u64::from(len)) >> 12) << 12;
            let range = offset as usize..offset as usize + len as usize;
            let h = |command| nbd_protocol::request::RequestHeader {
                flags: 0,
                command,
                handle,
                offset,
                length: len,
            };
            if rng.u8(0..4) == 0 {
                let data = pattern(len as usize, rng.u8(..));
                // The reply must not depend on reads still in flight over this range:
                // wait for everything first.
                while outstanding > 0 {
                    tokio::time::timeout(T, count_rx.recv())
                        .await
                        .expect("a reply never came")
                        .unwrap();
                    outstanding -= 1;
                }
                model[range].copy_from_slice(&data);
                pending.lock().await.insert(handle, Vec::new());
                wr.write_all(&h(CMD_WRITE).encode()).await.unwrap();
                wr.write_all(&data).await.unwrap();
                // Nor may a read sent before its reply: requests in flight together run
                // in any order.
                tokio::time::timeout(T, count_rx.recv())
                    .await
                    .expect("a reply never came")
                    .unwrap();
                continue;
            } else {
                pending.lock().await.insert(handle, model[range].to_vec());
                wr.write_all(&h(CMD_READ).encode()).await.unwrap();
            }
            outstanding += 1;
            match rng.u8(0..4) {
                // Wait for this reply: the next read comes alone.
                0 => {
                    while outstanding > 0 {
                        tokio::time::timeout(T, count_rx.recv())
                            .await
                            .expect("a reply never came")
                            .unwrap();
                        outstanding -= 1;
                    }
                }
                // Long enough for the server to take the read alone, not for its reply.
                1 | 2 => tokio::time::sleep(Duration::from_micros(rng.u64(0..100))).await,
                _ => {}
            }
        }
        while outstanding > 0 {
            tokio::time::timeout(T, count_rx.recv())
                .await
                .expect("a reply never came")
                .unwrap();
            outstanding -= 1;
        }
        let disc = nbd_protocol::request::RequestHeader {
            flags: 0,
            command: CMD_DISC,
            handle: 0,
            offset: 0,
            length: 0,
        };
        wr.write_all(&disc.encode()).await.unwrap();
        tokio::time::timeout(T, server)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        reader.await.unwrap();
        assert!(pending.lock().await.is_empty());
    }
}
