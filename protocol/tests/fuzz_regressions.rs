//! Replays the fuzz corpus checked in under `tests/fuzz-corpus/<target>/` through the same
//! harnesses the fuzz targets use (`fuzz/`, run by `fuzz/run.sh`): seeds (`seed-*`), a
//! minimized corpus from a 15-minute campaign (`cov-*`, libFuzzer `-merge=1`), and every
//! input that once crashed or hung the server (`crash-*`, `timeout-*`), so a fixed bug
//! stays fixed on a plain stable `cargo test`.

mod fuzz_harness;

use nbd_protocol::consts::*;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Once;

/// Panics in spawned request tasks are caught by tokio (the fuzzer's hook aborts on them
/// instead); count them so the replay fails the same way the fuzzer would.
static PANICS: AtomicUsize = AtomicUsize::new(0);

fn count_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            default(info);
        }));
    });
}

fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    count_panics();
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fuzz-corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} is empty", dir.display());
    files
        .into_iter()
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            let data = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (name, data)
        })
        .collect()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn handshake_corpus() {
    for (name, data) in corpus("handshake") {
        println!("replaying handshake/{name}");
        let out = fuzz_harness::handshake(&data);
        // The seeds must reach what they were written for, or the fuzzer starts shallow.
        if name == "seed-structured.bin" {
            assert!(
                contains(&out, &STRUCTURED_REPLY_MAGIC.to_be_bytes()),
                "{name}"
            );
        }
        if name == "seed-tls-require.bin" {
            assert!(contains(&out, &REP_ERR_TLS_REQD.to_be_bytes()), "{name}");
        }
        if name == "seed-simple-go.bin" {
            assert!(contains(&out, &SIMPLE_REPLY_MAGIC.to_be_bytes()), "{name}");
        }
    }
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "a server task panicked");
}

#[test]
fn transmission_corpus() {
    for (name, data) in corpus("transmission") {
        println!("replaying transmission/{name}");
        let out = fuzz_harness::transmission(&data);
        if name == "seed-workload.bin" {
            // 12 requests, DISC unanswered: 11 replies, bad ones (past the end, unknown
            // command or flag) answered with an error rather than a closed connection.
            let n = out
                .windows(4)
                .filter(|w| *w == SIMPLE_REPLY_MAGIC.to_be_bytes())
                .count();
            assert_eq!(n, 11, "{name}: replies");
        }
    }
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "a server task panicked");
}

#[test]
fn request_corpus() {
    let mut valid = 0;
    for (name, data) in corpus("request") {
        println!("replaying request/{name}");
        valid += usize::from(fuzz_harness::request(&data).is_some());
    }
    assert!(valid > 0, "no seed passes validation");
}
