//! Reads that can be interrupted by the shutdown signal without losing their place.

use std::io;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::watch;
use tokio::time::Instant;

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ReadOutcome {
    /// The buffer is full.
    Done,
    /// The peer closed the connection before sending a single byte of this message: a
    /// clean end, not an error.
    Eof,
    /// The shutdown signal fired (and the grace period, if any, ran out).
    Shutdown,
}

/// Fill `buf`, unless shutdown is signalled. With `grace`, a client already sending
/// (or about to) gets that long to finish its message, so it can be told why it is being
/// turned away. Each step is a plain `read`, which is cancel-safe, so the partial state
/// lives here and never in a dropped future.
pub(crate) async fn read_exact_or_shutdown<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut [u8],
    shutdown: &mut watch::Receiver<bool>,
    grace: Option<Duration>,
) -> io::Result<ReadOutcome> {
    let mut filled = 0;
    // A dropped sender means nobody can ever ask us to stop; stop watching it.
    let mut watching = true;
    let mut deadline: Option<Instant> = None;
    while filled < buf.len() {
        tokio::select! {
            n = r.read(&mut buf[filled..]) => {
                let n = n?;
                if n == 0 {
                    if filled == 0 {
                        return Ok(ReadOutcome::Eof);
                    }
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("peer closed the connection {filled} bytes into a {}-byte message", buf.len()),
                    ));
                }
                filled += n;
            }
            res = shutdown.wait_for(|stop| *stop), if watching && deadline.is_none() => {
                let fired = res.is_ok();
                if !fired {
                    watching = false;
                    continue;
                }
                match grace {
                    None => return Ok(ReadOutcome::Shutdown),
                    Some(g) => deadline = Some(Instant::now() + g),
                }
            }
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                return Ok(ReadOutcome::Shutdown);
            }
        }
    }
    Ok(ReadOutcome::Done)
}

/// Read and throw away `n` bytes without holding them: a 4 GiB payload costs no memory.
pub(crate) async fn discard<R: AsyncRead + Unpin>(r: &mut R, n: u64) -> io::Result<()> {
    let copied = tokio::io::copy(&mut r.take(n), &mut tokio::io::sink()).await?;
    if copied < n {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("peer closed the connection {copied} bytes into a {n}-byte payload"),
        ));
    }
    Ok(())
}

/// Resolves once the watched flag is true. A dropped sender means nobody can ever raise
/// it, so that waits forever instead of being mistaken for a signal.
pub(crate) async fn raised(rx: &mut watch::Receiver<bool>) {
    if rx.wait_for(|v| *v).await.is_err() {
        std::future::pending::<()>().await;
    }
}
