//! A raw-bytes NBD client for the integration tests: every byte it sends and expects is
//! spelled out, so the tests assert the wire format, not a library's view of it.
#![allow(dead_code)]

use nbd_protocol::consts::*;
use nbd_protocol::{
    serve_connection, serve_transmission, Export, Exports, MemoryBackend, ProtocolError,
    ServerOptions,
};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub const T: Duration = Duration::from_secs(10);

/// Generic over the stream so the TLS tests can carry on over an upgraded connection.
pub struct Client<S = DuplexStream> {
    pub s: S,
}

pub struct Server {
    pub task: JoinHandle<Result<(), ProtocolError>>,
    pub shutdown: watch::Sender<bool>,
}

impl Server {
    pub async fn finish(self) -> Result<(), ProtocolError> {
        tokio::time::timeout(T, self.task)
            .await
            .expect("server did not finish in time")
            .expect("server task panicked")
    }
}

pub fn exports(backends: Vec<(&str, Arc<MemoryBackend>)>) -> Arc<Exports<MemoryBackend>> {
    Arc::new(Exports {
        exports: backends
            .into_iter()
            .map(|(name, backend)| Export {
                name: name.to_string(),
                description: format!("export {name}"),
                backend,
            })
            .collect(),
    })
}

pub fn start(
    exports: Arc<Exports<MemoryBackend>>,
    opts: ServerOptions,
    buf: usize,
) -> (Client, Server) {
    let (a, b) = tokio::io::duplex(buf);
    let (tx, rx) = watch::channel(false);
    let task = tokio::spawn(serve_connection(b, exports, opts, rx));
    (Client { s: a }, Server { task, shutdown: tx })
}

/// Transmission only, as the kernel driver talks: no handshake, simple replies.
pub fn start_transmission(backend: Arc<MemoryBackend>) -> (Client, Server) {
    let (a, b) = tokio::io::duplex(1 << 20);
    let (tx, rx) = watch::channel(false);
    let task = tokio::spawn(serve_transmission(b, backend, ServerOptions::default(), rx));
    (Client { s: a }, Server { task, shutdown: tx })
}

#[derive(Debug, PartialEq, Eq)]
pub struct OptReply {
    pub option: u32,
    pub kind: u32,
    pub data: Vec<u8>,
}

#[derive(Debug, PartialEq, Eq)]
pub struct Chunk {
    pub flags: u16,
    pub kind: u16,
    pub handle: u64,
    pub data: Vec<u8>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    pub async fn u16(&mut self) -> u16 {
        tokio::time::timeout(T, self.s.read_u16())
            .await
            .expect("timeout")
            .expect("read")
    }
    pub async fn u32(&mut self) -> u32 {
        tokio::time::timeout(T, self.s.read_u32())
            .await
            .expect("timeout")
            .expect("read")
    }
    pub async fn u64(&mut self) -> u64 {
        tokio::time::timeout(T, self.s.read_u64())
            .await
            .expect("timeout")
            .expect("read")
    }
    pub async fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        tokio::time::timeout(T, self.s.read_exact(&mut v))
            .await
            .expect("timeout")
            .expect("read");
        v
    }
    /// True when the server has closed its side (EOF) within the timeout.
    pub async fn at_eof(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(
            tokio::time::timeout(T, self.s.read(&mut b)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }

    /// Reads one simple reply (true) or sees the server close (false); errors in the reply fail.
    pub async fn at_eof_or_reply(&mut self) -> bool {
        let mut m = [0u8; 4];
        match tokio::time::timeout(T, self.s.read_exact(&mut m))
            .await
            .expect("timeout")
        {
            Err(_) => true,
            Ok(_) => {
                assert_eq!(u32::from_be_bytes(m), SIMPLE_REPLY_MAGIC);
                assert_eq!(self.u32().await, 0);
                self.u64().await;
                false
            }
        }
    }

    /// Reads the greeting and sends client flags.
    pub async fn greet(&mut self, client_flags: u32) -> u16 {
        assert_eq!(self.u64().await, NBDMAGIC);
        assert_eq!(self.u64().await, IHAVEOPT);
        let f = self.u16().await;
        self.s.write_u32(client_flags).await.unwrap();
        f
    }

    pub async fn send_opt(&mut self, option: u32, data: &[u8]) {
        let mut b = Vec::new();
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b).await.unwrap();
    }

    pub async fn opt_reply(&mut self) -> OptReply {
        assert_eq!(self.u64().await, OPTION_REPLY_MAGIC);
        let option = self.u32().await;
        let kind = self.u32().await;
        let len = self.u32().await as usize;
        let data = self.bytes(len).await;
        OptReply { option, kind, data }
    }

    /// Sends an option and collects replies up to and including the ACK or an error.
    pub async fn opt(&mut self, option: u32, data: &[u8]) -> Vec<OptReply> {
        self.send_opt(option, data).await;
        let mut out = Vec::new();
        loop {
            let r = self.opt_reply().await;
            assert_eq!(r.option, option);
            let end = r.kind == REP_ACK || r.kind & (1 << 31) != 0;
            out.push(r);
            if end {
                return out;
            }
        }
    }

    pub async fn structured(&mut self) {
        let r = self.opt(OPT_STRUCTURED_REPLY, &[]).await;
        assert_eq!(r.last().unwrap().kind, REP_ACK);
    }

    pub async fn set_meta(&mut self, export: &str, queries: &[&str]) -> Vec<OptReply> {
        self.opt(OPT_SET_META_CONTEXT, &meta_data(export, queries))
            .await
    }

    /// GO; returns (size, transmission flags, all replies).
    pub async fn go(&mut self, name: &str, infos: &[u16]) -> (u64, u16, Vec<OptReply>) {
        let r = self.opt(OPT_GO, &go_data(name, infos)).await;
        assert_eq!(r.last().unwrap().kind, REP_ACK, "GO failed: {r:?}");
        let ex = r
            .iter()
            .find(|x| x.kind == REP_INFO && x.data[..2] == INFO_EXPORT.to_be_bytes())
            .expect("NBD_INFO_EXPORT");
        let size = u64::from_be_bytes(ex.data[2..10].try_into().unwrap());
        let flags = u16::from_be_bytes(ex.data[10..12].try_into().unwrap());
        (size, flags, r)
    }

    pub async fn request(&mut self, flags: u16, cmd: u16, handle: u64, offset: u64, length: u32) {
        let h = nbd_protocol::request::RequestHeader {
            flags,
            command: cmd,
            handle,
            offset,
            length,
        };
        self.s.write_all(&h.encode()).await.unwrap();
    }

    pub async fn write(&mut self, flags: u16, handle: u64, offset: u64, data: &[u8]) {
        self.request(flags, CMD_WRITE, handle, offset, data.len() as u32)
            .await;
        self.s.write_all(data).await.unwrap();
    }

    /// A simple reply header: (error, handle).
    pub async fn simple(&mut self) -> (u32, u64) {
        assert_eq!(self.u32().await, SIMPLE_REPLY_MAGIC);
        let e = self.u32().await;
        let h = self.u64().await;
        (e, h)
    }

    pub async fn chunk(&mut self) -> Chunk {
        assert_eq!(self.u32().await, STRUCTURED_REPLY_MAGIC);
        let flags = self.u16().await;
        let kind = self.u16().await;
        let handle = self.u64().await;
        let len = self.u32().await as usize;
        let data = self.bytes(len).await;
        Chunk {
            flags,
            kind,
            handle,
            data,
        }
    }

    /// Reads the next reply of either kind, whichever magic comes: (handle, error, chunks).
    pub async fn any_reply(&mut self) -> (u64, u32) {
        let magic = self.u32().await;
        if magic == SIMPLE_REPLY_MAGIC {
            let e = self.u32().await;
            let h = self.u64().await;
            return (h, e);
        }
        assert_eq!(magic, STRUCTURED_REPLY_MAGIC);
        let flags = self.u16().await;
        let kind = self.u16().await;
        let handle = self.u64().await;
        let len = self.u32().await as usize;
        let data = self.bytes(len).await;
        assert_ne!(
            flags & REPLY_FLAG_DONE,
            0,
            "multi-chunk replies not expected here"
        );
        let err = if kind & (1 << 15) != 0 {
            u32::from_be_bytes(data[..4].try_into().unwrap())
        } else {
            0
        };
        (handle, err)
    }

    /// Handshake straight to transmission with the default export.
    pub async fn connect_simple(&mut self) -> (u64, u16) {
        self.greet(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;
        let (s, f, _) = self.go("", &[]).await;
        (s, f)
    }

    pub async fn connect_structured(&mut self) -> (u64, u16) {
        self.greet(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;
        self.structured().await;
        let r = self.set_meta("", &[META_BASE_ALLOCATION]).await;
        assert_eq!(r[0].kind, REP_META_CONTEXT);
        let (s, f, _) = self.go("", &[]).await;
        (s, f)
    }
}

pub fn go_data(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

pub fn meta_data(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(export.len() as u32).to_be_bytes());
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}
