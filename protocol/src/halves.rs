//! The reader's and the writer's halves of a connection in transmission.
//!
//! `tokio::io::split` keeps the stream behind a mutex that each half takes for every
//! read and write, so a reply cannot leave while the reader sits in `recv` (or polls for
//! the rest of a write payload), and the writer sleeps on the mutex's futex instead. Our
//! own socket ([`NbdSocket`]) splits without a lock; anything else (TLS, test pipes)
//! keeps tokio's split. The handshake always uses tokio's split, since STARTTLS has to
//! take the stream back whole.

use crate::socket::{DirectFd, NbdReadHalf, NbdSocket, NbdWriteHalf};
use crate::tls::MaybeTls;
use std::any::Any;
use std::io::Cursor;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, Chain, ReadHalf, WriteHalf};
use tokio_util::either::Either;

/// Bytes the handshake's reader had already taken from the socket come first.
pub(crate) type ReadSide<S> = Chain<Cursor<Vec<u8>>, ReadInner<S>>;

/// Our own socket's half (`Left`), or tokio's half of any other stream (`Right`).
pub(crate) type ReadInner<S> = Either<NbdReadHalf, ReadHalf<MaybeTls<S>>>;

pub(crate) type WriteSide<S> = Either<NbdWriteHalf, WriteHalf<MaybeTls<S>>>;

/// Splits `stream`; `early` is what was read from it but not consumed yet.
pub(crate) fn split<S>(stream: MaybeTls<S>, early: Vec<u8>) -> (ReadSide<S>, WriteSide<S>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let stream = match stream {
        MaybeTls::Left(s) => match own_socket(s) {
            Ok(sock) => {
                let (r, w) = sock.into_split();
                return (Cursor::new(early).chain(Either::Left(r)), Either::Left(w));
            }
            Err(s) => MaybeTls::Left(s),
        },
        tls => tls,
    };
    let (r, w) = tokio::io::split(stream);
    (Cursor::new(early).chain(Either::Right(r)), Either::Right(w))
}

/// Direct (non-blocking, any thread) writes for our own socket's half; none through TLS
/// or anything else.
pub(crate) fn direct<S>(w: &WriteSide<S>) -> Option<DirectFd> {
    match w {
        Either::Left(w) => Some(w.direct()),
        Either::Right(_) => None,
    }
}

/// `s` itself if it is an [`NbdSocket`], else `s` back.
fn own_socket<S: 'static>(s: S) -> Result<NbdSocket, S> {
    let mut slot = Some(s);
    let own = (&mut slot as &mut dyn Any)
        .downcast_mut::<Option<NbdSocket>>()
        .and_then(Option::take);
    match (own, slot) {
        (Some(sock), _) => Ok(sock),
        (None, Some(s)) => Err(s),
        // The slot is emptied only by a successful downcast, handled above.
        (None, None) => unreachable!("stream taken without being an NbdSocket"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// Our socket splits into its own halves, anything else into tokio's; either way the
    /// bytes the handshake had buffered come before the socket's, and writes go out.
    #[tokio::test]
    async fn own_socket_splits_without_a_lock_others_share_one() {
        let (mut peer, ours) = tokio::net::UnixStream::pair().unwrap();
        let sock = NbdSocket::from_unix(ours).unwrap();
        let (r, w) = split(MaybeTls::Left(sock), b"early ".to_vec());
        assert!(matches!(r.get_ref().1, Either::Left(_)));
        assert!(matches!(w, Either::Left(_)));
        check_halves(&mut peer, r, w).await;

        let (mut peer, ours) = tokio::io::duplex(1024);
        let (r, w) = split(MaybeTls::Left(ours), b"early ".to_vec());
        assert!(matches!(r.get_ref().1, Either::Right(_)));
        assert!(matches!(w, Either::Right(_)));
        check_halves(&mut peer, r, w).await;
    }

    async fn check_halves<P, S>(peer: &mut P, mut r: ReadSide<S>, mut w: WriteSide<S>)
    where
        P: AsyncRead + AsyncWrite + Unpin,
        S: AsyncRead + AsyncWrite + Unpin,
    {
        peer.write_all(b"then the socket").await.unwrap();
        let mut got = vec![0u8; 21];
        r.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"early then the socket");
        w.write_all(b"reply").await.unwrap();
        w.shutdown().await.unwrap();
        let mut back = Vec::new();
        peer.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"reply");
    }
}
