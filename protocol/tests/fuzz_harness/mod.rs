//! The fuzz harnesses, shared by the fuzz targets (`fuzz/fuzz_targets/*.rs`, built with
//! coverage instrumentation) and by `tests/fuzz_regressions.rs`, which replays the
//! checked-in corpus on a plain stable `cargo test`. Each harness panics (and so makes the
//! fuzzer report a crash) on a server panic, a hang, or a broken invariant.
#![allow(dead_code)]

use nbd_protocol::consts::*;
use nbd_protocol::request::{validate, Command, RequestHeader, Session};
use nbd_protocol::{
    serve_connection, serve_transmission, Export, Exports, MemoryBackend, ServerOptions, TlsConfig,
    TlsSetting,
};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

/// Small, so a fuzzed READ or WRITE of the whole export is cheap.
const EXPORT_SIZE: u64 = 256 * 1024;
/// No input may keep the server busy this long: the input is finite and then EOF.
const LIMIT: Duration = Duration::from_secs(10);

thread_local! {
    // One per thread: the regression test replays files from parallel test threads.
    static RT: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
}

fn exports() -> Arc<Exports<MemoryBackend>> {
    Arc::new(Exports {
        exports: vec![
            Export {
                name: "a".into(),
                description: "first".into(),
                backend: Arc::new(MemoryBackend::new(EXPORT_SIZE)),
            },
            Export {
                name: "ro".into(),
                description: String::new(),
                backend: Arc::new(MemoryBackend::new(EXPORT_SIZE).read_only(true)),
            },
        ],
    })
}

/// Feed `client` to the server as everything a client sends, then EOF; drain the
/// server's output concurrently so backpressure never stalls it. Returns what the server
/// sent.
async fn drive<F, Fut>(client: &[u8], serve: F) -> Vec<u8>
where
    F: FnOnce(tokio::io::DuplexStream) -> Fut,
    Fut: std::future::Future<Output = Result<(), nbd_protocol::ProtocolError>> + Send + 'static,
{
    let (mut c, s) = tokio::io::duplex(64 * 1024);
    let server = tokio::spawn(serve(s));
    let (mut cr, mut cw) = tokio::io::split(&mut c);
    let input = client.to_vec();
    let write = async move {
        // The server may close early (bad magic): a failed write is expected then.
        let _ = cw.write_all(&input).await;
        let _ = cw.shutdown().await;
    };
    let read = async move {
        let mut out = Vec::new();
        let _ = cr.read_to_end(&mut out).await;
        out
    };
    let ((), out) = tokio::join!(write, read);
    // Errors are legitimate answers to garbage; only a panic or a hang is a bug.
    match server.await {
        Ok(_) => {}
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => panic!("server task failed: {e}"),
    }
    out
}

fn run_bounded<Fut: std::future::Future<Output = Vec<u8>>>(what: &str, f: Fut) -> Vec<u8> {
    RT.with(|rt| {
        rt.block_on(async {
            match tokio::time::timeout(LIMIT, f).await {
                Ok(v) => v,
                Err(_) => panic!("{what}: server did not finish within {LIMIT:?} of EOF"),
            }
        })
    })
}

/// A throwaway self-signed certificate, made once per process, so the TLS modes' option
/// rules (ERR_TLS_REQD, STARTTLS, plain bytes pipelined behind it, a garbage ClientHello)
/// are fuzzed too.
fn tls_config() -> TlsConfig {
    static CONFIG: OnceLock<TlsConfig> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])
                .expect("self-signed certificate");
            let dir = std::env::temp_dir().join(format!("nbd-fuzz-tls-{}", std::process::id()));
            std::fs::create_dir_all(&dir).expect("temp dir");
            let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
            std::fs::write(&cert, ck.cert.pem()).expect("write cert");
            std::fs::write(&key, ck.key_pair.serialize_pem()).expect("write key");
            let c = TlsConfig::from_pem_files(&cert, &key).expect("TLS config");
            let _ = std::fs::remove_dir_all(&dir);
            c
        })
        .clone()
}

/// The whole connection: greeting, option haggling, transmission. The first byte picks
/// the server's limits so backpressure paths are reached too, and the TLS mode. Returns
/// what the server sent.
pub fn handshake(data: &[u8]) -> Vec<u8> {
    let (knob, client) = match data.split_first() {
        Some((k, rest)) => (*k, rest),
        None => (0, data),
    };
    let tls = match (knob >> 4) & 3 {
        1 => TlsSetting::Allow(tls_config()),
        2 => TlsSetting::Require(tls_config()),
        _ => TlsSetting::Off,
    };
    let opts = ServerOptions {
        max_in_flight: 1 + (knob as usize & 7),
        max_buffered_bytes: if knob & 8 != 0 { 4096 } else { 1 << 20 },
        tls,
    };
    let ex = exports();
    let out = run_bounded(
        "handshake",
        drive(client, move |s| {
            let (_tx, rx) = watch::channel(false);
            async move { serve_connection(s, ex, opts, rx).await }
        }),
    );
    // Whatever the client sent, the server greets first.
    assert!(out.len() >= 18, "no greeting: {} bytes", out.len());
    assert_eq!(&out[..8], &NBDMAGIC.to_be_bytes());
    out
}

/// Transmission only (the kernel's way in): every byte is a request stream.
pub fn transmission(data: &[u8]) -> Vec<u8> {
    let backend = Arc::new(MemoryBackend::new(EXPORT_SIZE));
    let out = run_bounded(
        "transmission",
        drive(data, move |s| {
            let (_tx, rx) = watch::channel(false);
            async move { serve_transmission(s, backend, ServerOptions::default(), rx).await }
        }),
    );
    // Simple replies only: every reply starts with the simple magic, in step.
    if out.len() >= 4 {
        assert_eq!(&out[..4], &SIMPLE_REPLY_MAGIC.to_be_bytes());
    }
    out
}

/// `RequestHeader::parse` and `validate` on their own, with the session drawn from the
/// input too, checking what a backend relies on: a validated request is inside the export
/// and within the limits. Returns the validated command, if any.
pub fn request(data: &[u8]) -> Option<Command> {
    if data.len() < REQUEST_HEADER_LEN + 15 {
        return None;
    }
    let (hb, rest) = data.split_at(REQUEST_HEADER_LEN);
    let mut hdr = [0u8; REQUEST_HEADER_LEN];
    hdr.copy_from_slice(hb);
    // Let most inputs past the magic check.
    if rest[0] & 1 == 0 {
        hdr[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    }
    let Ok(h) = RequestHeader::parse(&hdr) else {
        return None;
    };
    assert_eq!(
        RequestHeader::parse(&h.encode()),
        Ok(h),
        "encode/parse round trip"
    );
    let size = u64::from_be_bytes(rest[1..9].try_into().unwrap_or([0; 8]));
    let s = Session {
        size,
        transmission_flags: u16::from_be_bytes([rest[9], rest[10]]),
        structured_replies: rest[11] & 1 != 0,
        base_allocation: (rest[11] & 2 != 0).then_some(1),
        max_block: u32::from_be_bytes([rest[12], rest[13], rest[14], 0]).max(1),
        size_follows_backend: false,
    };
    let Ok(cmd) = validate(&h, &s) else {
        return None;
    };
    let in_range = |offset: u64, length: u32| {
        offset
            .checked_add(u64::from(length))
            .is_some_and(|end| end <= s.size)
    };
    let read_only = s.transmission_flags & FLAG_READ_ONLY != 0;
    match cmd {
        Command::Read { offset, length, df } => {
            assert!(in_range(offset, length), "{h:?} {s:?}");
            assert!(length <= s.max_block, "{h:?} {s:?}");
            assert!(!df || s.structured_replies);
        }
        Command::Write { offset, length, .. } => {
            assert!(!read_only, "write on a read-only export: {h:?}");
            assert!(in_range(offset, length), "{h:?} {s:?}");
            assert!(length <= s.max_block, "{h:?} {s:?}");
        }
        Command::Trim { offset, length, .. } | Command::WriteZeroes { offset, length, .. } => {
            assert!(!read_only, "write on a read-only export: {h:?}");
            assert!(in_range(offset, length), "{h:?} {s:?}");
        }
        Command::Cache { offset, length } => assert!(in_range(offset, length)),
        Command::BlockStatus { offset, length, .. } => {
            assert!(in_range(offset, length));
            assert!(
                s.base_allocation.is_some(),
                "block status without a context"
            );
        }
        Command::Flush | Command::Disconnect => {}
    }
    Some(cmd)
}
