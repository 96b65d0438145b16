//! Public entry points: serve one connection, with or without the handshake.

use crate::backend::{Backend, ExportInfo};
use crate::error::ProtocolError;
use crate::export::READ_BUFFER;
use crate::halves;
use crate::handshake::{self, block_sizes, flags_for, Negotiated, Outcome};
use crate::request::Session;
use crate::socket::{NbdSocket, PollHint};
use crate::tls::MaybeTls;
use crate::transmission::{self, OwnSocket};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, BufReader, ReadHalf, WriteHalf};
use tokio::sync::watch;
use tracing::{debug, info};

// Kept at their old path, `server::*`, as well as at the crate root.
pub use crate::export::{Export, Exports, ServerOptions};

/// A client gets this long from connecting to entering transmission. Without a bound, idle
/// or trickling connections could pile up forever; qemu-nbd uses 10 s, real clients need
/// milliseconds.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// The transmission flags an export advertises to a client that has not negotiated
/// structured replies (the Linux kernel driver, or `serve_transmission`).
pub fn transmission_flags(info: &ExportInfo) -> u16 {
    flags_for(info, false)
}

/// Serve one client from the handshake to the end of transmission. Returns `Ok(())` for
/// every ending the client chose (ABORT, DISC, a closed socket, even mid-request) and for
/// `shutdown` turning true; in every case requests that were running have completed
/// against the backend before this returns. `Err` means the client broke the protocol
/// (bad magic, absurd option) or the socket failed.
pub async fn serve_connection<S, B>(
    stream: S,
    exports: Arc<Exports<B>>,
    opts: ServerOptions,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ProtocolError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    B: Backend,
{
    let hint = poll_hint(&stream);
    let hs = handshake_phase(stream, &exports, &opts, &mut shutdown);
    let (rd, wr, neg) = match tokio::time::timeout(HANDSHAKE_TIMEOUT, hs).await {
        Err(_) => {
            info!(
                "client did not finish the handshake within {:?}; closing",
                HANDSHAKE_TIMEOUT
            );
            return Ok(());
        }
        Ok(Ok(Some(v))) => v,
        Ok(Ok(None)) => {
            debug!("connection closed during handshake");
            return Ok(());
        }
        Ok(Err(ProtocolError::Io(e))) if crate::error::is_disconnect(&e) => {
            debug!("client left during handshake: {e}");
            return Ok(());
        }
        Ok(Err(e)) => {
            info!("handshake failed: {e}");
            return Err(e);
        }
    };
    let export = &exports.exports[neg.export];
    let (_, _, max_block) = block_sizes(&neg.info);
    info!(
        export = %export.name,
        size = neg.info.size,
        flags = neg.transmission_flags,
        structured = neg.structured,
        base_allocation = neg.base_allocation.is_some(),
        "client entered transmission"
    );
    // The handshake read through a buffer of its own; what it holds beyond the last
    // option (a client may pipeline its first requests) is passed on.
    let early = rd.buffer().to_vec();
    let (rd, wr) = halves::split(rd.into_inner().unsplit(wr), early);
    let direct = halves::direct(&wr);
    let rd = BufReader::with_capacity(READ_BUFFER, rd);
    let session = Session {
        size: neg.info.size,
        transmission_flags: neg.transmission_flags,
        structured_replies: neg.structured,
        base_allocation: neg.base_allocation,
        max_block,
        // A client told a size at the handshake keeps it: NBD cannot tell it otherwise.
        size_follows_backend: false,
    };
    let r = transmission::run(
        rd,
        wr,
        export.backend.clone(),
        session,
        &opts,
        shutdown,
        OwnSocket { poll: hint, direct },
    )
    .await;
    info!(export = %export.name, ok = r.is_ok(), "connection finished");
    r
}

/// Our own socket type can poll before sleeping; the transmission loop tells it when
/// that pays. Any other stream (tests, TLS-only pipes) just reads.
fn poll_hint<S: 'static>(stream: &S) -> Option<PollHint> {
    (stream as &dyn std::any::Any)
        .downcast_ref::<NbdSocket>()
        .and_then(NbdSocket::poll_hint)
}

type Halves<S> = (
    BufReader<ReadHalf<MaybeTls<S>>>,
    WriteHalf<MaybeTls<S>>,
    Negotiated,
);

/// Greeting and option haggling, upgrading the stream to TLS when the client asks for it
/// and the options allow it. `None` is a quiet ending (the client left or aborted).
async fn handshake_phase<S, B>(
    stream: S,
    exports: &Exports<B>,
    opts: &ServerOptions,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<Option<Halves<S>>, ProtocolError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    B: Backend,
{
    let (rd, mut wr) = tokio::io::split(MaybeTls::Left(stream));
    let mut rd = BufReader::with_capacity(READ_BUFFER, rd);
    let mode = opts.tls.mode();
    let Some(mut st) = handshake::greet(&mut rd, &mut wr, exports, shutdown, mode).await? else {
        return Ok(None);
    };
    loop {
        match handshake::negotiate(&mut rd, &mut wr, exports, shutdown, &mut st).await? {
            Outcome::Closed => return Ok(None),
            Outcome::Transmission(n) => return Ok(Some((rd, wr, n))),
            Outcome::StartTls => {}
        }
        // The client must wait for our ACK before starting TLS, so nothing may be
        // buffered; bytes here would be plain text smuggled in front of the TLS session.
        let early = rd.buffer().len();
        if early > 0 {
            return Err(ProtocolError::DataBeforeTls(early));
        }
        let Some(config) = opts.tls.config() else {
            // negotiate() only acknowledges STARTTLS when TLS is configured.
            return Err(ProtocolError::TlsHandshake(std::io::Error::other(
                "STARTTLS acknowledged without a TLS configuration",
            )));
        };
        let MaybeTls::Left(plain) = rd.into_inner().unsplit(wr) else {
            return Err(ProtocolError::TlsHandshake(std::io::Error::other(
                "STARTTLS on a stream that is already TLS",
            )));
        };
        let tls = config
            .acceptor()
            .accept(plain)
            .await
            .map_err(ProtocolError::TlsHandshake)?;
        debug!("TLS established");
        st.tls_started();
        let (r, w) = tokio::io::split(MaybeTls::Right(Box::new(tls)));
        rd = BufReader::with_capacity(READ_BUFFER, r);
        wr = w;
    }
}

/// Transmission phase only, for a socket whose size and flags were set out of band (the
/// Linux kernel driver: no handshake, simple replies only, flags from
/// [`transmission_flags`]).
pub async fn serve_transmission<S, B>(
    stream: S,
    backend: Arc<B>,
    opts: ServerOptions,
    shutdown: watch::Receiver<bool>,
) -> Result<(), ProtocolError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    B: Backend,
{
    let info = backend.info();
    let (_, _, max_block) = block_sizes(&info);
    let session = Session {
        size: info.size,
        transmission_flags: transmission_flags(&info),
        structured_replies: false,
        base_allocation: None,
        max_block,
        // The kernel's device follows a resized export (the daemon resizes it too), so
        // its requests are checked against the size now, not the size at connect.
        size_follows_backend: true,
    };
    let hint = poll_hint(&stream);
    let (rd, wr) = halves::split(MaybeTls::Left(stream), Vec::new());
    let direct = halves::direct(&wr);
    let rd = BufReader::with_capacity(READ_BUFFER, rd);
    info!(size = info.size, "transmission-only connection started");
    let r = transmission::run(
        rd,
        wr,
        backend,
        session,
        &opts,
        shutdown,
        OwnSocket { poll: hint, direct },
    )
    .await;
    info!(ok = r.is_ok(), "transmission-only connection finished");
    r
}
