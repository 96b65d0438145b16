//! `rados-nbd serve`: one image, opened once and shared by every connection, served on a
//! unix socket or TCP until SIGTERM/SIGINT, then closed cleanly (map written, dirty
//! flag cleared). Clients may come and go meanwhile; the image stays open until the
//! server stops, and each time the last client leaves the map is checkpointed (written,
//! flag cleared) exactly as at a clean close.

use crate::config::Config;
use crate::error::{Error, ErrorKind, Result};
use crate::image::{Image, OpenOptions};
use crate::spec::ImageSpec;
use crate::store::{ImageStore, Store};
use nbd_protocol::{
    serve_connection, Export, Exports, ServerOptions, TlsConfig, TlsMode, TlsSetting,
};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::net::{TcpListener, UnixListener};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// [POOL/]NAME[@SNAP] (a snapshot is served read-only)
    pub image: String,
    /// Listen on this unix socket (created with mode 0600). With neither --socket nor --listen,
    /// serve on the listening socket systemd passes (socket activation, LISTEN_FDS).
    #[arg(long, value_name = "PATH", conflicts_with = "listen")]
    pub socket: Option<PathBuf>,
    /// Listen on TCP HOST:PORT (or PORT alone: 127.0.0.1).
    #[arg(long, value_name = "HOST:PORT")]
    pub listen: Option<String>,
    /// Serve read-only: writes are refused and the image's flags are never touched.
    #[arg(long)]
    pub read_only: bool,
    /// The export name (default: the image name; "" also selects it).
    #[arg(long, value_name = "NAME")]
    pub export_name: Option<String>,
    /// Exit after the first client disconnects.
    #[arg(long)]
    pub once: bool,
    /// TLS (NBD_OPT_STARTTLS): off, allow (plain clients too) or require (plain clients
    /// are refused). allow and require need --tls-cert and --tls-key.
    #[arg(long, value_name = "MODE", default_value_t = TlsMode::Off)]
    pub tls: TlsMode,
    /// The server's certificate chain (PEM, leaf first).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The server's private key (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_ca: Option<PathBuf>,
}

/// The connection options from the TLS flags. Runs before the image is opened, so a bad
/// certificate changes nothing on disk.
pub fn server_options(args: &ServeArgs) -> Result<ServerOptions> {
    let bad = |m: String| Error::new(ErrorKind::InvalidInput, m);
    let config = match (&args.tls_cert, &args.tls_key) {
        (Some(c), Some(k)) => {
            if args.tls == TlsMode::Off {
                return Err(bad(
                    "--tls-cert/--tls-key given but --tls is off (use --tls=allow or --tls=require)"
                        .into(),
                ));
            }
            let r = match &args.tls_ca {
                None => TlsConfig::from_pem_files(c, k),
                Some(ca) => TlsConfig::from_pem_files_with_client_ca(c, k, ca),
            };
            Some(r.map_err(|e| bad(e.to_string()))?)
        }
        (None, None) => None,
        _ => return Err(bad("--tls-cert and --tls-key go together".into())),
    };
    let tls = TlsSetting::new(args.tls, config).map_err(|e| {
        bad(format!(
            "{e}: give --tls-cert FILE --tls-key FILE with --tls={}",
            args.tls
        ))
    })?;
    Ok(ServerOptions {
        tls,
        ..ServerOptions::default()
    })
}

/// Where a server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Unix(PathBuf),
    Tcp(String, u16),
    /// Passed in by systemd (socket activation); systemd owns and removes it.
    Inherited(String),
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            ListenAddr::Tcp(h, p) if h.contains(':') => write!(f, "tcp:[{h}]:{p}"),
            ListenAddr::Tcp(h, p) => write!(f, "tcp:{h}:{p}"),
            ListenAddr::Inherited(d) => write!(f, "{d} (from systemd)"),
        }
    }
}

/// `HOST:PORT`, `[V6]:PORT`, `:PORT` or `PORT`; the host defaults to 127.0.0.1.
pub fn parse_listen(s: &str) -> Result<ListenAddr> {
    let bad = |why: &str| {
        Error::new(
            ErrorKind::InvalidInput,
            format!("invalid --listen {s:?}: {why} (expected HOST:PORT)"),
        )
    };
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, p) = rest.split_once("]:").ok_or_else(|| bad("unclosed ["))?;
        (h.to_string(), p)
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') => (h.to_string(), p),
            Some(_) => return Err(bad("write an IPv6 host as [ADDR]:PORT")),
            None => (String::new(), s),
        }
    };
    let port: u16 = port.parse().map_err(|_| bad("bad port"))?;
    let host = if host.is_empty() {
        "127.0.0.1".to_string()
    } else {
        host
    };
    Ok(ListenAddr::Tcp(host, port))
}

enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

/// Binds a unix socket with mode 0600. A leftover socket file is removed only when
/// nothing answers on it; any other file is left alone.
fn bind_unix(path: &Path) -> Result<UnixListener> {
    if let Ok(md) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !md.file_type().is_socket() {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(Error::new(
                ErrorKind::Busy,
                format!("socket {} is in use by another server", path.display()),
            ));
        }
        std::fs::remove_file(path)
            .map_err(|e| Error::io(format!("removing stale socket {}", path.display()), e))?;
    }
    // The umask makes the socket 0600 from the moment it exists: no window where
    // another user could connect.
    // SAFETY: umask only swaps the process's file mode mask.
    let old = unsafe { libc::umask(0o177) };
    let r = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let l = r.map_err(|e| Error::io(format!("listening on {}", path.display()), e))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| Error::io(format!("setting mode of {}", path.display()), e))?;
    Ok(l)
}

impl Listener {
    async fn bind(addr: &ListenAddr) -> Result<Listener> {
        match addr {
            ListenAddr::Unix(p) => Ok(Listener::Unix(bind_unix(p)?)),
            ListenAddr::Tcp(h, port) => TcpListener::bind((h.as_str(), *port))
                .await
                .map(Listener::Tcp)
                .map_err(|e| Error::io(format!("listening on {addr}"), e)),
            ListenAddr::Inherited(_) => Err(Error::new(
                ErrorKind::InvalidInput,
                format!("{addr} cannot be bound again"),
            )),
        }
    }

    /// The one listening socket systemd passed (rados-nbd-serve@.socket), if any.
    fn inherited() -> Result<Option<(Listener, String)>> {
        use crate::socket_activation as sa;
        let Some(mut all) = sa::from_env().map_err(|e| Error::new(ErrorKind::InvalidInput, e))?
        else {
            return Ok(None);
        };
        if all.len() != 1 {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "systemd passed {} listening sockets; serve takes exactly one \
                     (one ListenStream= in the .socket unit)",
                    all.len()
                ),
            ));
        }
        let l = all.remove(0);
        let desc = l.describe();
        let err = |e| Error::io(format!("using the inherited socket {desc}"), e);
        l.set_nonblocking(true).map_err(err)?;
        let l = match l {
            sa::Listener::Unix(u) => Listener::Unix(UnixListener::from_std(u).map_err(err)?),
            sa::Listener::Tcp(t) => Listener::Tcp(TcpListener::from_std(t).map_err(err)?),
        };
        Ok(Some((l, desc)))
    }
}

/// What a finished connection task reports.
struct Done;

/// Serves `args.image` until SIGTERM/SIGINT (or, with `--once`, the first client's end).
pub async fn serve<S: Store>(store: S, args: ServeArgs, config: &Config) -> Result<()> {
    let spec: ImageSpec = args.image.parse()?;
    let (addr, inherited) = match (&args.socket, &args.listen) {
        (Some(p), None) => (ListenAddr::Unix(p.clone()), None),
        (None, Some(l)) => (parse_listen(l)?, None),
        (None, None) => match Listener::inherited()? {
            Some((l, desc)) => (ListenAddr::Inherited(desc), Some(l)),
            None => {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    "serve needs --socket PATH or --listen HOST:PORT \
                     (or a listening socket from systemd socket activation)",
                ))
            }
        },
        _ => {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "serve needs exactly one of --socket PATH or --listen HOST:PORT",
            ))
        }
    };
    let server_opts = server_options(&args)?;
    // Signals first: a SIGTERM during open must still close cleanly.
    let mut sigterm = signal(SignalKind::terminate())
        .map_err(|e| Error::io("installing the SIGTERM handler", e))?;
    let mut sigint = signal(SignalKind::interrupt())
        .map_err(|e| Error::io("installing the SIGINT handler", e))?;

    let opts = OpenOptions {
        read_only: args.read_only,
        shared_default: config.shared_default,
    };
    // Store errors already name the image, the store and the file that failed.
    let image = Arc::new(Image::open(&store, &spec, &opts).await?);
    let bound = match inherited {
        Some(l) => Ok(l),
        None => Listener::bind(&addr).await,
    };
    let listener = match bound {
        Ok(l) => l,
        Err(e) => {
            let _ = image.close().await;
            return Err(e);
        }
    };
    let r = accept_loop(
        &image,
        &spec,
        &addr,
        listener,
        &args,
        &server_opts,
        &mut sigterm,
        &mut sigint,
    )
    .await;
    let c = image.close().await;
    if let ListenAddr::Unix(p) = &addr {
        let _ = std::fs::remove_file(p);
    }
    r?;
    c?;
    tracing::info!("{spec} closed cleanly");
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn accept_loop<I: ImageStore>(
    image: &Arc<Image<I>>,
    spec: &ImageSpec,
    addr: &ListenAddr,
    listener: Listener,
    args: &ServeArgs,
    server_opts: &ServerOptions,
    sigterm: &mut tokio::signal::unix::Signal,
    sigint: &mut tokio::signal::unix::Signal,
) -> Result<()> {
    let name = args
        .export_name
        .clone()
        .unwrap_or_else(|| spec.name.clone());
    let exports = Arc::new(Exports {
        exports: vec![Export {
            name: name.clone(),
            description: format!("rbd image {spec}"),
            backend: image.clone(),
        }],
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Done>();
    let mut conns: JoinSet<()> = JoinSet::new();
    let mut active = 0usize;
    let mut served = 0usize;
    let ro = if image.is_read_only() {
        " read-only"
    } else {
        ""
    };
    let tls = match server_opts.tls.mode() {
        TlsMode::Off => String::new(),
        m => format!(" (TLS {m})"),
    };
    eprintln!("rados-nbd: serving {spec} on {addr} as export {name:?}{ro}{tls}");

    let spawn_conn = |conns: &mut JoinSet<()>, peer: String, fut: ConnFuture| {
        let done = done_tx.clone();
        conns.spawn(async move {
            match fut.await {
                Ok(()) => tracing::debug!("connection from {peer} ended"),
                Err(e) => tracing::warn!("connection from {peer}: {e}"),
            }
            let _ = done.send(Done);
        });
    };

    loop {
        tokio::select! {
            _ = sigterm.recv() => { tracing::info!("SIGTERM: shutting down"); break; }
            _ = sigint.recv() => { tracing::info!("SIGINT: shutting down"); break; }
            Some(Done) = done_rx.recv() => {
                active -= 1;
                if active == 0 && args.once && served > 0 {
                    break;
                }
                // Persistent by default (like qemu-nbd --persistent), but the last client
                // leaving is a disconnect: write the map and clear the dirty flag now, so
                // a crash while idle costs no rebuild. The next write sets the flag again
                // before it is acknowledged.
                if active == 0 && !image.is_read_only() {
                    if let Err(e) = image.checkpoint().await {
                        tracing::warn!("{e} (the dirty flag stays set)");
                    }
                }
            }
            r = accept(&listener) => {
                let (fut, peer) = match r {
                    Ok(Conn::Unix(s)) => (conn_future(s, &exports, server_opts, &stop_rx), "unix socket".to_string()),
                    Ok(Conn::Tcp(s, a)) => {
                        let _ = s.set_nodelay(true);
                        (conn_future(s, &exports, server_opts, &stop_rx), a.to_string())
                    }
                    Err(e) => {
                        // Out of fds and the like: log and keep serving the others.
                        tracing::warn!("accepting on {addr}: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                };
                tracing::debug!("connection from {peer}");
                active += 1;
                served += 1;
                spawn_conn(&mut conns, peer, fut);
            }
        }
    }
    drop(listener);
    // Connections finish the requests they have read, then end.
    let _ = stop_tx.send(true);
    while conns.join_next().await.is_some() {}
    Ok(())
}

type ConnFuture = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<(), nbd_protocol::ProtocolError>> + Send>,
>;

fn conn_future<I: ImageStore, T>(
    stream: T,
    exports: &Arc<Exports<Image<I>>>,
    opts: &ServerOptions,
    stop: &watch::Receiver<bool>,
) -> ConnFuture
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    Box::pin(serve_connection(
        stream,
        exports.clone(),
        opts.clone(),
        stop.clone(),
    ))
}

enum Conn {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream, std::net::SocketAddr),
}

async fn accept(l: &Listener) -> std::io::Result<Conn> {
    match l {
        Listener::Unix(l) => l.accept().await.map(|(s, _)| Conn::Unix(s)),
        Listener::Tcp(l) => l.accept().await.map(|(s, a)| Conn::Tcp(s, a)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses() {
        assert_eq!(
            parse_listen("10809").unwrap(),
            ListenAddr::Tcp("127.0.0.1".into(), 10809)
        );
        assert_eq!(
            parse_listen(":10809").unwrap(),
            ListenAddr::Tcp("127.0.0.1".into(), 10809)
        );
        assert_eq!(
            parse_listen("[::1]:5").unwrap(),
            ListenAddr::Tcp("::1".into(), 5)
        );
        assert_eq!(
            parse_listen("localhost:7").unwrap(),
            ListenAddr::Tcp("localhost".into(), 7)
        );
        assert!(parse_listen("::1:5").is_err());
        assert!(parse_listen("h:99999").is_err());
        assert!(parse_listen("h:").is_err());
    }

    fn serve_args(extra: &[&str]) -> std::result::Result<ServeArgs, clap::Error> {
        use clap::Parser;
        let mut argv = vec!["rados-nbd", "serve", "img", "--socket", "/tmp/x.sock"];
        argv.extend_from_slice(extra);
        match crate::cli::Cli::try_parse_from(argv)?.command {
            crate::cli::Command::Serve(a) => Ok(a),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn tls_flags() {
        let a = serve_args(&[]).unwrap();
        assert_eq!(a.tls, TlsMode::Off);
        assert_eq!(server_options(&a).unwrap().tls.mode(), TlsMode::Off);
        assert!(serve_args(&["--tls=sometimes"]).is_err());
        // --tls-cert without --tls-key (and the other way) is refused by the parser.
        assert!(serve_args(&["--tls=allow", "--tls-cert", "/c"]).is_err());
        assert!(serve_args(&["--tls=allow", "--tls-key", "/k"]).is_err());
        // A mode without certificates, certificates without a mode: one clear error each.
        let e = server_options(&serve_args(&["--tls=require"]).unwrap()).unwrap_err();
        assert!(e.message.contains("--tls-cert"), "{e}");
        let a = serve_args(&["--tls-cert", "/c", "--tls-key", "/k"]).unwrap();
        let e = server_options(&a).unwrap_err();
        assert!(e.message.contains("--tls is off"), "{e}");
        // Unreadable files are named.
        let a = serve_args(&[
            "--tls=allow",
            "--tls-cert",
            "/nonexistent/cert.pem",
            "--tls-key",
            "/k",
        ])
        .unwrap();
        let e = server_options(&a).unwrap_err();
        assert!(e.message.contains("/nonexistent/cert.pem"), "{e}");
        assert_eq!(e.kind, ErrorKind::InvalidInput);
    }
}
