//! Serves one sparse in-memory export on a unix socket, so real NBD clients (nbdinfo,
//! nbdsh, qemu-img, fio) can be pointed at this crate's server:
//!
//!     cargo run -p nbd-protocol --example memserver -- /tmp/mem.sock 64M
//!     nbdinfo 'nbd+unix:///?socket=/tmp/mem.sock'
//!
//! TLS: `--tls=allow|require --tls-cert FILE --tls-key FILE [--tls-ca FILE]` (PEM files;
//! with `--tls-ca` clients must present a certificate signed by that CA), then e.g.
//! `nbdinfo 'nbds+unix:///?socket=/tmp/mem.sock&tls-certificates=DIR'`.
//!
//! Prints "listening on PATH" once ready; SIGTERM/SIGINT finish in-flight requests and exit.

use nbd_protocol::{
    serve_connection, Export, Exports, MemoryBackend, ServerOptions, TlsConfig, TlsMode, TlsSetting,
};
use std::path::PathBuf;
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
    let usage = "usage: memserver SOCKET SIZE [--tls=off|allow|require --tls-cert FILE --tls-key FILE [--tls-ca FILE]]";
    let mut positional = Vec::new();
    let (mut mode, mut cert, mut key, mut ca) = (TlsMode::Off, None, None, None);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| args.next().ok_or_else(|| format!("{name} needs a value"));
        match a.as_str() {
            "--tls-cert" => cert = Some(PathBuf::from(value("--tls-cert")?)),
            "--tls-key" => key = Some(PathBuf::from(value("--tls-key")?)),
            "--tls-ca" => ca = Some(PathBuf::from(value("--tls-ca")?)),
            "--tls" => mode = value("--tls")?.parse()?,
            _ if a.starts_with("--tls=") => mode = a["--tls=".len()..].parse()?,
            _ if a.starts_with("--") => return Err(format!("unknown flag {a}; {usage}")),
            _ => positional.push(a),
        }
    }
    if positional.len() != 2 {
        return Err(usage.into());
    }
    let path = &positional[0];
    let size = parse_size(&positional[1])?;
    let config = match (cert, key) {
        (Some(c), Some(k)) => Some(
            match ca {
                None => TlsConfig::from_pem_files(&c, &k),
                Some(ca) => TlsConfig::from_pem_files_with_client_ca(&c, &k, &ca),
            }
            .map_err(|e| e.to_string())?,
        ),
        (None, None) => None,
        _ => return Err("--tls-cert and --tls-key go together".into()),
    };
    let opts = ServerOptions {
        tls: TlsSetting::new(mode, config).map_err(|e| e.to_string())?,
        ..Default::default()
    };
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
                    let (ex, rx, opts) = (exports.clone(), rx.clone(), opts.clone());
                    conns.spawn(async move {
                        if let Err(e) = serve_connection(stream, ex, opts, rx).await {
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
