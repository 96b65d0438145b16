//! Backend failures and misbehaviour reach the client as NBD errors, and the connection
//! survives them.
mod common;

use bytes::Bytes;
use common::*;
use nbd_protocol::consts::*;
use nbd_protocol::*;
use std::sync::Arc;

/// Fails in a different way depending on the offset asked for.
struct Faulty {
    inner: MemoryBackend,
}

const EIO_AT: u64 = 4096;
const PANIC_AT: u64 = 8192;
const SHORT_AT: u64 = 12288;
const NOSPC_AT: u64 = 16384;

impl Backend for Faulty {
    fn info(&self) -> ExportInfo {
        self.inner.info()
    }
    async fn read(&self, offset: u64, length: u32) -> Result<Vec<ReadChunk>, BackendError> {
        match offset {
            EIO_AT => Err(BackendError::new(Errno::Io, "disk on fire")),
            PANIC_AT => panic!("backend bug"),
            SHORT_AT => Ok(vec![ReadChunk::Data(Bytes::from_static(b"short"))]),
            _ => self.inner.read(offset, length).await,
        }
    }
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), BackendError> {
        match offset {
            NOSPC_AT => Err(BackendError::new(Errno::NoSpc, "pool full")),
            PANIC_AT => panic!("backend bug"),
            _ => self.inner.write(offset, data, fua).await,
        }
    }
    async fn flush(&self) -> Result<(), BackendError> {
        self.inner.flush().await
    }
    async fn trim(&self, offset: u64, length: u32, fua: bool) -> Result<(), BackendError> {
        self.inner.trim(offset, length, fua).await
    }
    async fn write_zeroes(&self, o: u64, l: u32, f: ZeroFlags) -> Result<(), BackendError> {
        if f.fast_zero {
            return Err(BackendError::new(Errno::NotSup, "zeroing would be slow"));
        }
        self.inner.write_zeroes(o, l, f).await
    }
    async fn cache(&self, offset: u64, length: u32) -> Result<(), BackendError> {
        self.inner.cache(offset, length).await
    }
    async fn block_status(&self, offset: u64, length: u32) -> Result<Vec<Extent>, BackendError> {
        if offset == EIO_AT {
            return Err(BackendError::new(Errno::Io, "map unreadable"));
        }
        self.inner.block_status(offset, length).await
    }
}

type Task = tokio::task::JoinHandle<Result<(), ProtocolError>>;

/// NBD_CMD_DISC, then the server's task must end cleanly within `T`.
async fn disconnect(c: &mut Client, task: Task) {
    c.request(0, CMD_DISC, 0, 0, 0).await;
    tokio::time::timeout(T, task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

fn start_faulty() -> (Client, Task, tokio::sync::watch::Sender<bool>) {
    let b = Arc::new(Faulty {
        inner: MemoryBackend::new(1 << 20),
    });
    let ex = Arc::new(Exports {
        exports: vec![Export {
            name: "f".into(),
            description: String::new(),
            backend: b,
        }],
    });
    let (a, s) = tokio::io::duplex(1 << 20);
    let (tx, rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(serve_connection(s, ex, ServerOptions::default(), rx));
    (Client { s: a }, task, tx)
}

#[tokio::test]
async fn backend_errors_simple_replies() {
    let (mut c, task, _stop) = start_faulty();
    c.connect_simple().await;
    c.request(0, CMD_READ, 1, EIO_AT, 512).await;
    assert_eq!(c.simple().await, (EIO, 1));
    c.request(0, CMD_READ, 2, PANIC_AT, 512).await;
    assert_eq!(
        c.simple().await,
        (EIO, 2),
        "a backend panic still gets a reply"
    );
    c.request(0, CMD_READ, 3, SHORT_AT, 512).await;
    assert_eq!(
        c.simple().await,
        (EIO, 3),
        "a short backend read is not sent as data"
    );
    c.write(0, 4, NOSPC_AT, &[1; 512]).await;
    assert_eq!(c.simple().await, (ENOSPC, 4));
    c.write(0, 5, PANIC_AT, &[1; 512]).await;
    assert_eq!(c.simple().await, (EIO, 5));
    c.request(CMD_FLAG_FAST_ZERO, CMD_WRITE_ZEROES, 6, 0, 512)
        .await;
    assert_eq!(c.simple().await, (ENOTSUP, 6));
    // Still serving.
    c.write(0, 7, 0, b"alive").await;
    assert_eq!(c.simple().await, (0, 7));
    c.request(0, CMD_READ, 8, 0, 5).await;
    assert_eq!(c.simple().await, (0, 8));
    assert_eq!(c.bytes(5).await, b"alive");
    disconnect(&mut c, task).await;
}

#[tokio::test]
async fn backend_errors_structured_replies_carry_messages() {
    let (mut c, task, _stop) = start_faulty();
    c.connect_structured().await;
    c.request(0, CMD_READ, 1, EIO_AT, 512).await;
    let e = c.chunk().await;
    assert_eq!(
        (e.kind, e.flags, e.handle),
        (REPLY_TYPE_ERROR, REPLY_FLAG_DONE, 1)
    );
    assert_eq!(u32::from_be_bytes(e.data[..4].try_into().unwrap()), EIO);
    assert_eq!(&e.data[6..], b"disk on fire");
    c.request(0, CMD_BLOCK_STATUS, 2, EIO_AT, 512).await;
    let e = c.chunk().await;
    assert_eq!(e.kind, REPLY_TYPE_ERROR);
    assert_eq!(&e.data[6..], b"map unreadable");
    c.write(0, 3, NOSPC_AT, &[1; 16]).await;
    let e = c.chunk().await;
    assert_eq!(u32::from_be_bytes(e.data[..4].try_into().unwrap()), ENOSPC);
    disconnect(&mut c, task).await;
}

#[tokio::test]
async fn several_connections_share_an_export() {
    let b = Arc::new(MemoryBackend::new(1 << 20));
    let ex = exports(vec![("m", b.clone())]);
    let mut handles = Vec::new();
    for i in 0..8u64 {
        let ex = ex.clone();
        handles.push(tokio::spawn(async move {
            let (mut c, srv) = start(ex, ServerOptions::default(), 1 << 16);
            c.connect_simple().await;
            let data = pattern(4096, i as u8);
            c.write(0, i, i * 4096, &data).await;
            assert_eq!(c.simple().await, (0, i));
            c.request(0, CMD_FLUSH, 100 + i, 0, 0).await;
            assert_eq!(c.simple().await, (0, 100 + i));
            c.request(0, CMD_DISC, 0, 0, 0).await;
            srv.finish().await.unwrap();
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    for i in 0..8u64 {
        assert_eq!(b.snapshot(i * 4096, 4096), pattern(4096, i as u8));
    }
}
