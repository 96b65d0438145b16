//! Serves one sparse in-memory export on a unix socket, so real NBD clients (nbdinfo,
//! nbdsh, qemu-img, fio) can be pointed at this crate's server:
//!
//!     cargo run -p nbd-protocol --example memserver -- /tmp/mem.sock 64M
//!     nbdinfo 'nbd+unix:///?socket=/tmp/mem.sock'
//!
//! Prints "listening on PATH" once ready; SIGTERM/SIGINT finish in-flight requests and exit.

use nbd_protocol::{serve_connection, Export, Exports, MemoryBackend, ServerOptions};
use std::sync::Arc;
use tokio::net::UnixListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        Some('T' | 't') => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("invalid size {s:?} (expected e.g. 64M)"))
}

#[tokio::main]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("memserver: {e}");
        std::process::exit(1);
    }
}

async fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 3 {
        return Err("usage: memserver SOCKET SIZE".into());
    }
    let path = &args[1];
    let size = parse_size(&args[2])?;
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).map_err(|e| format!("cannot listen on {path}: {e}"))?;
    let exports = Arc::new(Exports {
        exports: vec![Export {
            name: "mem".into(),
            description: format!("{size}-byte in-memory export"),
            backend: Arc::new(MemoryBackend::new(size)),
        }],
    });
    let (tx, rx) = watch::channel(false);
    let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    println!("listening on {path}");
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            a = listener.accept() => match a {
                Ok((stream, _)) => {
                    let (ex, rx) = (exports.clone(), rx.clone());
                    conns.spawn(async move {
                        if let Err(e) = serve_connection(stream, ex, ServerOptions::default(), rx).await {
                            eprintln!("memserver: connection: {e}");
                        }
                    });
                }
                Err(e) => eprintln!("memserver: accept: {e}"),
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    let _ = tx.send(true);
    while conns.join_next().await.is_some() {}
    let _ = std::fs::remove_file(path);
    Ok(())
}
