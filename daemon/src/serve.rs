//! `rados-nbd serve`: one image, opened once and shared by every connection, served on a
//! unix socket or TCP until SIGTERM/SIGINT/SIGHUP, then closed cleanly (map written, dirty
//! flag cleared). Clients may come and go meanwhile; the image stays open until the
//! server stops, and each time the last client leaves the map is checkpointed (written,
//! flag cleared) exactly as at a clean close.

use crate::config::Config;
use crate::error::{Error, ErrorKind, Result};
use crate::image::{Image, OpenOptions};
pub use crate::parse::{parse_listen, parse_socket_mode, resolve_group, ListenAddr};
use crate::spec::ImageSpec;
use crate::store::{ImageStore, Store};
use nbd_protocol::{
    serve_connection, Export, Exports, NbdSocket, ServerOptions, TlsConfig, TlsMode, TlsSetting,
};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::net::{TcpListener, UnixListener};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// [POOL/]NAME[@SNAP] (a snapshot is served read-only)
    pub image: String,
    /// Listen on this unix socket (created with mode 0600 unless --socket-mode says
    /// otherwise). With neither --socket nor --listen, serve on the listening socket systemd
    /// passes (socket activation, LISTEN_FDS).
    #[arg(long, value_name = "PATH", conflicts_with = "listen")]
    pub socket: Option<PathBuf>,
    /// The --socket's permission bits, in octal up to 0777 (default 0600: only this user
    /// may connect; connecting needs write permission). Set before the socket listens.
    #[arg(long, value_name = "MODE", requires = "socket", value_parser = parse_socket_mode)]
    pub socket_mode: Option<u32>,
    /// The --socket's group, by name or numeric gid (with e.g. --socket-mode 0660, that
    /// group's members may connect). Set before the socket listens.
    #[arg(long, value_name = "GROUP", requires = "socket")]
    pub socket_group: Option<String>,
    /// Listen on TCP HOST:PORT (or PORT alone: 127.0.0.1). Port 0: the kernel picks a free
    /// port, named in the "serving ... on tcp:HOST:PORT" line.
    #[arg(long, value_name = "HOST:PORT")]
    pub listen: Option<String>,
    /// Serve read-only: writes are refused and the image's flags are never touched.
    #[arg(long)]
    pub read_only: bool,
    /// Keep the image's exclusive lock while served, as rbd-nbd --exclusive: a librbd
    /// client (rbd bench, qemu) asking for it is refused instead of handed the lock (by
    /// default it gets it, and the next request here takes it back), and the exclusive
    /// lock is taken even when the image is marked shared.
    #[arg(long, conflicts_with = "read_only")]
    pub exclusive: bool,
    /// Ceph: when another client (a rados-nbd on the source host of a live migration,
    /// librbd) holds the image's lock, ask it to hand the lock over and wait for it (at
    /// most RADOS_NBD_LOCK_WAIT_SECS, 45 s), instead of failing with "in use". The source
    /// writes its object map and clears the flag first, so this open loads the map.
    #[arg(long, conflicts_with = "read_only")]
    pub wait_for_lock: bool,
    /// The export name (default: the image name; "" also selects it).
    #[arg(long, value_name = "NAME")]
    pub export_name: Option<String>,
    /// The most clients connected at once; a client beyond it is closed right after
    /// accept, before the handshake (like nbdkit's limit filter), and logged. Each
    /// connection may hold up to 64 MiB of requests and replies in memory.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_CONNECTIONS,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// Poll a connection's socket for up to this many microseconds before its reads sleep,
    /// adaptively (QEMU's poll-max-ns rule: the window grows while requests arrive within
    /// it and shrinks to nothing when they do not). A client that waits for each reply
    /// (queue depth 1) is then answered without a sleep and a wake-up in between, for some
    /// CPU time while polling. 0 turns it off.
    #[arg(long, value_name = "US", default_value_t = DEFAULT_POLL_MAX_US,
          value_parser = clap::value_parser!(u32).range(0..=10_000))]
    pub poll_max_us: u32,
    /// Exit after the first client disconnects.
    #[arg(long)]
    pub once: bool,
    /// After this many seconds with no map-changing write (a write that creates an
    /// object, a discard that removes one), write the object map and clear the dirty
    /// flag while still serving, so `rbd du`/`rbd diff` can use fast-diff and a crash
    /// needs no rebuild; the next such write sets the flag again first (one more round
    /// trip). Off by default: the flag stays set while served.
    #[arg(long, value_name = "SECONDS", value_parser = crate::parse::parse_checkpoint_idle)]
    pub checkpoint_idle: Option<std::time::Duration>,
    /// For a clone: the first read of an object it still reads from its parent copies
    /// the object into the clone in the background (librbd's rbd_clone_copy_on_read),
    /// so later reads are the clone's own. No effect on other images or read-only.
    #[arg(long)]
    pub copy_on_read: bool,
    /// Run a quiesce hook around snapshots of the image taken while it is served (Ceph:
    /// `rbd snap create`; the directory store: `rados-nbd snap create`): `HOOK POOL/NAME
    /// quiesce` before, `HOOK POOL/NAME unquiesce` after (serve has no device: the hook
    /// gets the image). A failing hook fails the snapshot.
    #[arg(long)]
    pub quiesce: bool,
    /// The hook for --quiesce (default /usr/libexec/rados-nbd/rados-nbd_quiesce).
    #[arg(long, value_name = "PATH", requires = "quiesce")]
    pub quiesce_hook: Option<PathBuf>,
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

pub const DEFAULT_MAX_CONNECTIONS: u32 = 128;
/// Long enough to cover a client's turnaround between a reply and its next request (how
/// it was chosen: bench/README.md, adaptive polling).
pub const DEFAULT_POLL_MAX_US: u32 = 64;
pub const DEFAULT_SOCKET_MODE: u32 = 0o600;

/// Who may connect to a `--socket`: its permission bits and, if given, its group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketPerms {
    pub mode: u32,
    pub gid: Option<u32>,
}

/// The socket permissions from `--socket-mode`/`--socket-group`, checked (the group looked
/// up) before the image is opened, so a bad flag changes nothing on disk.
pub fn socket_perms(args: &ServeArgs) -> Result<SocketPerms> {
    // clap's `requires` does not fire when --listen (which conflicts with --socket) is given.
    if args.socket.is_none() && (args.socket_mode.is_some() || args.socket_group.is_some()) {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            "--socket-mode and --socket-group apply only to --socket PATH \
             (for systemd's socket, set SocketMode=/SocketGroup= in the .socket unit)",
        ));
    }
    Ok(SocketPerms {
        mode: args.socket_mode.unwrap_or(DEFAULT_SOCKET_MODE),
        gid: args
            .socket_group
            .as_deref()
            .map(resolve_group)
            .transpose()?,
    })
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

/// A listening socket [`run`] accepts clients on.
pub enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl From<UnixListener> for Listener {
    fn from(l: UnixListener) -> Self {
        Listener::Unix(l)
    }
}

impl From<TcpListener> for Listener {
    fn from(l: TcpListener) -> Self {
        Listener::Tcp(l)
    }
}

/// Binds a unix socket with the given permissions. A leftover socket file is removed only
/// when nothing answers on it; any other file is left alone.
fn bind_unix(path: &Path, perms: SocketPerms) -> Result<UnixListener> {
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
    // bind() and listen() apart, with the group and mode set on the file in between: a
    // socket that is bound but not listening refuses every connect (ECONNREFUSED) whatever
    // its file's permissions, so no client can ever get in under looser permissions than
    // asked, not even for a moment. Rejected alternatives: the umask is process-wide (other
    // threads may be creating files meanwhile) and cannot set a group; binding in a private
    // directory and renaming makes a longer path, which may not fit in sun_path (108 bytes).
    use socket2::{Domain, SockAddr, Socket, Type};
    let at = |what: &str| {
        let p = path.display().to_string();
        let what = what.to_string();
        move |e| Error::io(format!("{what} {p}"), e)
    };
    let addr = SockAddr::unix(path).map_err(at("listening on"))?;
    let sock = Socket::new(Domain::UNIX, Type::STREAM, None).map_err(at("listening on"))?;
    sock.bind(&addr).map_err(at("listening on"))?;
    let finish = |sock: Socket| -> Result<UnixListener> {
        if let Some(gid) = perms.gid {
            std::os::unix::fs::lchown(path, None, Some(gid))
                .map_err(at(&format!("setting group {gid} of")))?;
        }
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(perms.mode))
            .map_err(at(&format!("setting mode {:04o} of", perms.mode)))?;
        sock.listen(libc::SOMAXCONN).map_err(at("listening on"))?;
        sock.set_nonblocking(true).map_err(at("listening on"))?;
        let l: std::os::unix::net::UnixListener = sock.into();
        UnixListener::from_std(l).map_err(at("listening on"))
    };
    finish(sock).inspect_err(|_| {
        let _ = std::fs::remove_file(path);
    })
}

impl Listener {
    async fn bind(addr: &ListenAddr, perms: SocketPerms) -> Result<Listener> {
        match addr {
            ListenAddr::Unix(p) => Ok(Listener::Unix(bind_unix(p, perms)?)),
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

/// Serves `args.image` until SIGTERM/SIGINT/SIGHUP (or, with `--once`, the first client's end).
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
    let perms = socket_perms(&args)?;
    // Signals first: a SIGTERM during open must still close cleanly.
    let mut sigterm = signal(SignalKind::terminate())
        .map_err(|e| Error::io("installing the SIGTERM handler", e))?;
    let mut sigint = signal(SignalKind::interrupt())
        .map_err(|e| Error::io("installing the SIGINT handler", e))?;
    // The terminal `serve` was started from went away: a clean close too, not a death
    // that leaves the map to be rebuilt at the next open (SIGHUP's default).
    let mut sighup =
        signal(SignalKind::hangup()).map_err(|e| Error::io("installing the SIGHUP handler", e))?;

    let opts = OpenOptions {
        read_only: args.read_only,
        shared_default: config.shared_default,
        checkpoint_idle: args.checkpoint_idle,
    };
    // Store errors already name the image, the store and the file that failed.
    let image = if args.exclusive {
        let h = store
            .open_image(&spec, crate::store::OpenMode::ReadWrite)
            .await?;
        Image::from_store_image(h, &spec, &opts).await?
    } else {
        Image::open(&store, &spec, &opts).await?
    };
    let image = Arc::new(image);
    if !args.exclusive {
        image.enable_handover();
    }
    // `rados-nbd resize` / `rbd resize` of the image while it is served come to us.
    image.serve_owner_requests();
    image.spawn_map_rebuild();
    image.spawn_idle_checkpoints();
    if args.quiesce && !image.is_read_only() {
        let hook = crate::quiesce::QuiesceHook::new(args.quiesce_hook.clone(), spec.to_string());
        tracing::info!(
            "--quiesce: snapshots of {spec} run {} around them",
            hook.path.display()
        );
        image.enable_quiesce(hook);
    }
    if args.copy_on_read && !image.enable_copy_on_read() {
        tracing::info!("--copy-on-read: {spec} is not a writable clone; nothing to copy");
    }
    let bound = match inherited {
        Some(l) => Ok(l),
        None => Listener::bind(&addr, perms).await,
    };
    let listener = match bound {
        Ok(l) => l,
        Err(e) => {
            let _ = image.close().await;
            return Err(e);
        }
    };
    // `--listen HOST:0` asks the kernel for a port: name the one it gave.
    let addr = match (&listener, &addr) {
        (Listener::Tcp(t), ListenAddr::Tcp(h, 0)) => match t.local_addr() {
            Ok(a) => ListenAddr::Tcp(h.clone(), a.port()),
            Err(_) => addr,
        },
        _ => addr,
    };
    let shutdown = async move {
        tokio::select! {
            _ = sigterm.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = sigint.recv() => tracing::info!("SIGINT: shutting down"),
            _ = sighup.recv() => tracing::info!("SIGHUP: shutting down"),
        }
    };
    let r = run(
        &image,
        &spec,
        listener,
        &addr,
        &args,
        &server_opts,
        shutdown,
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

/// Serves an opened image on `listener` (named `addr` in messages) until `shutdown`
/// resolves, or with `--once` until the first client has gone; then every connection
/// finishes the requests it has read, and the last checkpoint under way ends, before this
/// returns. The caller opened the image and closes it. [`serve`] runs it with the
/// command line's listener and SIGTERM/SIGINT; tests run it with their own.
pub async fn run<I: ImageStore>(
    image: &Arc<Image<I>>,
    spec: &ImageSpec,
    listener: Listener,
    addr: &ListenAddr,
    args: &ServeArgs,
    server_opts: &ServerOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    tokio::pin!(shutdown);
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
    let poll_max = std::time::Duration::from_micros(args.poll_max_us.into());
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

    // A slot per connection, given back the moment its task ends (not when the loop below
    // gets round to its `Done`), so a client that leaves frees its place for the next one
    // at once.
    let max = args.max_connections as usize;
    let slots = Arc::new(Semaphore::new(max));
    let mut refusals = Refusals::default();
    // Checkpoints run in their own task: a slow store (an OSD away until the op timeout)
    // must not stop this loop from accepting clients or hearing SIGTERM. At most one is
    // queued, so a burst of clients leaving costs one checkpoint, not one each.
    let (ckpt_tx, mut ckpt_rx) = mpsc::channel::<()>(1);
    let checkpointer = {
        let image = image.clone();
        tokio::spawn(async move {
            while ckpt_rx.recv().await.is_some() {
                // While the map is rebuilt after an unclean close there is nothing to
                // checkpoint yet: the rebuild ends first (a failed one is tried again
                // here; its failure was logged and keeps the flag set).
                if image.rebuild_pending() && image.finish_rebuild().await.is_err() {
                    continue;
                }
                if let Err(e) = image.checkpoint().await {
                    tracing::warn!("{e} (the dirty flag stays set)");
                }
            }
        })
    };
    let spawn_conn =
        |conns: &mut JoinSet<()>, peer: String, fut: ConnFuture, slot: OwnedSemaphorePermit| {
            let done = done_tx.clone();
            conns.spawn(async move {
                match fut.await {
                    Ok(()) => tracing::debug!("connection from {peer} ended"),
                    Err(e) => tracing::warn!("connection from {peer}: {e}"),
                }
                drop(slot);
                let _ = done.send(Done);
            });
        };

    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(Done) = done_rx.recv() => {
                active -= 1;
                if active == 0 && args.once && served > 0 {
                    break;
                }
                // Persistent by default (like qemu-nbd --persistent), but the last client
                // leaving is a disconnect: write the map and clear the dirty flag now, so
                // a crash while idle costs no rebuild. The next map-changing write sets
                // the flag again before it touches the store.
                if active == 0 && !image.is_read_only() {
                    let _ = ckpt_tx.try_send(());
                }
            }
            r = accept(&listener) => {
                let conn = match r {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of fds and the like: log and keep serving the others.
                        tracing::warn!("accepting on {addr}: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    // Closed before the greeting: the client fails at once instead of
                    // waiting in the backlog (qemu-nbd --shared's way), and costs nothing.
                    refusals.refused(&conn.peer(), max);
                    drop(conn);
                    continue;
                };
                let peer = conn.peer();
                let sock = match conn {
                    Conn::Unix(s) => NbdSocket::from_unix(s),
                    Conn::Tcp(s, _) => {
                        let _ = s.set_nodelay(true);
                        NbdSocket::from_tcp(s)
                    }
                };
                let sock = match sock {
                    Ok(s) => s.with_polling(poll_max),
                    Err(e) => {
                        tracing::warn!("setting up the connection from {peer}: {e}");
                        continue;
                    }
                };
                let fut = conn_future(sock, &exports, server_opts, &stop_rx);
                tracing::debug!("connection from {peer}");
                active += 1;
                served += 1;
                spawn_conn(&mut conns, peer, fut, slot);
            }
        }
    }
    drop(listener);
    // Connections finish the requests they have read, then end.
    let _ = stop_tx.send(true);
    while conns.join_next().await.is_some() {}
    // A checkpoint under way finishes (the close after this waits for it anyway); never
    // abandoned halfway through a store operation.
    drop(ckpt_tx);
    let _ = checkpointer.await;
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

impl Conn {
    fn peer(&self) -> String {
        match self {
            Conn::Unix(_) => "unix socket".to_string(),
            Conn::Tcp(_, a) => a.to_string(),
        }
    }
}

/// Logs clients refused by `--max-connections`: the first at once, then at most one line a
/// second with the count, so a client hammering a full server cannot flood the log.
#[derive(Default)]
struct Refusals {
    last_log: Option<std::time::Instant>,
    unlogged: u64,
}

impl Refusals {
    fn refused(&mut self, peer: &str, max: usize) {
        self.unlogged += 1;
        let now = std::time::Instant::now();
        if self
            .last_log
            .is_some_and(|t| now.duration_since(t) < std::time::Duration::from_secs(1))
        {
            return;
        }
        let more = match self.unlogged {
            1 => String::new(),
            n => format!("; {} more refused since the last such line", n - 1),
        };
        tracing::warn!(
            "refused a connection from {peer}: {max} clients already connected \
             (--max-connections {max}){more}"
        );
        self.last_log = Some(now);
        self.unlogged = 0;
    }
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

    /// `serve`'s arguments alone, parsed by clap with the attributes the command line has.
    #[derive(clap::Parser, Debug)]
    struct ServeCommand {
        #[command(flatten)]
        args: ServeArgs,
    }

    fn parse_serve(argv: Vec<&str>) -> std::result::Result<ServeArgs, clap::Error> {
        use clap::Parser;
        ServeCommand::try_parse_from(argv).map(|c| c.args)
    }

    fn serve_args(extra: &[&str]) -> std::result::Result<ServeArgs, clap::Error> {
        let mut argv = vec!["serve", "img", "--socket", "/tmp/x.sock"];
        argv.extend_from_slice(extra);
        parse_serve(argv)
    }

    #[test]
    fn socket_mode_flags() {
        // Through clap: default 0600, bad values refused, only with --socket.
        assert_eq!(serve_args(&[]).unwrap().socket_mode, None);
        let a = serve_args(&["--socket-mode", "0660", "--socket-group", "0"]).unwrap();
        assert_eq!(
            socket_perms(&a).unwrap(),
            SocketPerms {
                mode: 0o660,
                gid: Some(0)
            }
        );
        assert_eq!(socket_perms(&serve_args(&[]).unwrap()).unwrap().mode, 0o600);
        assert!(serve_args(&["--socket-mode", "999"]).is_err());
        for extra in [&["--listen", "1"][..], &[]] {
            let mut argv = vec!["serve", "img", "--socket-mode", "0660"];
            argv.extend_from_slice(extra);
            let refused = match parse_serve(argv) {
                Err(_) => true,
                Ok(a) => socket_perms(&a).is_err(),
            };
            assert!(
                refused,
                "--socket-mode without --socket accepted ({extra:?})"
            );
        }
    }

    #[test]
    fn checkpoint_idle_option() {
        assert_eq!(serve_args(&[]).unwrap().checkpoint_idle, None);
        assert_eq!(
            serve_args(&["--checkpoint-idle", "1.5"])
                .unwrap()
                .checkpoint_idle,
            Some(std::time::Duration::from_millis(1500))
        );
        assert!(serve_args(&["--checkpoint-idle", "-1"]).is_err());
    }

    #[tokio::test]
    async fn unix_socket_gets_mode_and_group() {
        use std::os::unix::fs::MetadataExt;
        let perms = |mode, gid| SocketPerms { mode, gid };
        let d = tempfile::tempdir().unwrap();
        // SAFETY: getgid cannot fail.
        let gid = unsafe { libc::getgid() };
        let mut held = Vec::new();
        for (mode, group) in [
            (0o600, None),
            (0o660, Some(gid)),
            (0o666, None),
            (0o000, None),
        ] {
            let p = d.path().join(format!("s{mode:o}"));
            let l = bind_unix(&p, perms(mode, group)).unwrap();
            let md = std::fs::symlink_metadata(&p).unwrap();
            assert_eq!(md.mode() & 0o7777, mode, "mode of {}", p.display());
            assert_eq!(md.gid(), gid);
            if mode & 0o200 != 0 {
                // Listening: a connect gets through to accept.
                let c = tokio::net::UnixStream::connect(&p).await.unwrap();
                let _ = l.accept().await.unwrap();
                drop(c);
            }
            held.push(l);
        }
        // A socket that answers is not replaced; a stale one is.
        let p = d.path().join("s600");
        let e = bind_unix(&p, perms(0o600, None)).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Busy);
        drop(held);
        drop(bind_unix(&p, perms(0o600, None)).unwrap());
        // Any other file is left alone.
        let f = d.path().join("file");
        std::fs::write(&f, b"keep").unwrap();
        let e = bind_unix(&f, perms(0o600, None)).unwrap_err();
        assert_eq!(e.kind, ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&f).unwrap(), b"keep");
        // A path too long for sun_path: an error naming it, no file left behind.
        let long = d.path().join("x".repeat(120));
        let e = bind_unix(&long, perms(0o600, None)).unwrap_err();
        assert!(e.message.contains("xxxxxxxx"), "{e}");
        assert!(!long.exists());
    }

    #[test]
    fn max_connections_flag() {
        assert_eq!(
            serve_args(&[]).unwrap().max_connections,
            DEFAULT_MAX_CONNECTIONS
        );
        assert_eq!(
            serve_args(&["--max-connections", "2"])
                .unwrap()
                .max_connections,
            2
        );
        assert!(serve_args(&["--max-connections", "0"]).is_err());
        assert!(serve_args(&["--max-connections", "-1"]).is_err());
    }

    #[test]
    fn poll_max_flag() {
        assert_eq!(serve_args(&[]).unwrap().poll_max_us, DEFAULT_POLL_MAX_US);
        assert_eq!(serve_args(&["--poll-max-us", "0"]).unwrap().poll_max_us, 0);
        assert_eq!(
            serve_args(&["--poll-max-us", "200"]).unwrap().poll_max_us,
            200
        );
        assert!(serve_args(&["--poll-max-us", "-1"]).is_err());
        assert!(serve_args(&["--poll-max-us", "10001"]).is_err());
        assert!(serve_args(&["--poll-max-us", "fast"]).is_err());
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
