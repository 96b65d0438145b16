//! The connected socket of one NBD connection (Unix or TCP), registered with the runtime
//! for readability only.
//!
//! Why not tokio's `UnixStream`: it registers every socket for both readability and
//! writability, and a Unix stream socket signals "writable" to every waiter each time the
//! peer reads data we sent (`unix_write_space`). At queue depth 1 that means each reply,
//! once the client has read it, wakes our idle worker for nothing, and a moment later the
//! client's next request wakes it again: two wake-ups per request instead of one, each a
//! cross-CPU interrupt (on a VM, a trip through the hypervisor). Here a reply is written
//! straight away (`sendmsg`), and only a write that finds the socket full registers a
//! second descriptor (a `dup`) for writability; it is dropped again once the writer has
//! caught up (`poll_flush`, which the transmission loop calls after every batch).

use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

pub struct NbdSocket {
    read: AsyncFd<OwnedFd>,
    /// Present only while a write is waiting for room in the socket buffer.
    write: Option<AsyncFd<OwnedFd>>,
}

impl NbdSocket {
    /// Takes over a connected stream socket (Unix or TCP) and makes it non-blocking.
    /// Must be called within a tokio runtime.
    pub fn new(fd: impl Into<OwnedFd>) -> io::Result<Self> {
        let fd: OwnedFd = fd.into();
        set_nonblocking(fd.as_raw_fd())?;
        Ok(NbdSocket {
            read: register(fd, Interest::READABLE)?,
            write: None,
        })
    }

    /// From a tokio Unix socket (deregistering it from the runtime first).
    pub fn from_unix(s: tokio::net::UnixStream) -> io::Result<Self> {
        Self::new(s.into_std()?)
    }

    /// From a tokio TCP socket (deregistering it from the runtime first).
    pub fn from_tcp(s: tokio::net::TcpStream) -> io::Result<Self> {
        Self::new(s.into_std()?)
    }

    fn fd(&self) -> RawFd {
        self.read.get_ref().as_raw_fd()
    }
}

fn register(fd: OwnedFd, interest: Interest) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: an OwnedFd stays open, and stays the same descriptor, until the AsyncFd that
    // owns it is dropped.
    unsafe { AsyncFd::register_with_interest(fd, interest) }.map_err(|e| e.into_parts().1)
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn recv(fd: RawFd, buf: &mut ReadBuf<'_>) -> io::Result<usize> {
    // SAFETY: the kernel writes at most `unfilled.len()` bytes into memory we own; the
    // bytes it wrote are marked initialised below, and only those.
    let unfilled = unsafe { buf.unfilled_mut() };
    let n = unsafe { libc::recv(fd, unfilled.as_mut_ptr().cast(), unfilled.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    // SAFETY: recv initialised the first n bytes of the unfilled part.
    unsafe { buf.assume_init(n) };
    buf.advance(n);
    Ok(n)
}

fn send(fd: RawFd, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
    // SAFETY: an all-zero msghdr is valid (no name, no control data).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    // IoSlice is ABI-compatible with iovec (std guarantees it on Unix).
    msg.msg_iov = bufs.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = bufs.len().min(1024) as _;
    loop {
        // MSG_NOSIGNAL: a vanished client is EPIPE here, never SIGPIPE for the process.
        // SAFETY: msg points at iovecs borrowed for the duration of the call.
        let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

impl AsyncRead for NbdSocket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let fd = self.fd();
        loop {
            let mut guard = ready!(self.read.poll_read_ready(cx))?;
            let want = buf.remaining();
            match guard.try_io(|_| recv(fd, buf)) {
                Ok(Ok(n)) => {
                    // A short read drained the socket (it is edge-triggered): forget the
                    // readiness now rather than pay a recv that says EAGAIN next time.
                    // New data arriving meanwhile bumps the readiness tick, so this cannot
                    // lose a wake-up.
                    if n > 0 && n < want {
                        guard.clear_ready();
                    }
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for NbdSocket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let fd = self.fd();
        loop {
            if let Some(w) = &self.write {
                let mut guard = ready!(w.poll_write_ready(cx))?;
                match guard.try_io(|_| send(fd, bufs)) {
                    Ok(r) => return Poll::Ready(r),
                    Err(_would_block) => continue,
                }
            }
            match send(fd, bufs) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // The socket is full: from now until the writer catches up, wait for
                    // room through a descriptor registered for writability. epoll reports
                    // a socket that became writable before the registration at once, so
                    // nothing is lost between the failed send and here.
                    // SAFETY: dup of a descriptor we own; the result is owned below.
                    let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
                    if dup < 0 {
                        return Poll::Ready(Err(io::Error::last_os_error()));
                    }
                    // SAFETY: dup is a fresh descriptor that nothing else owns.
                    let dup = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(dup) };
                    self.write = Some(register(dup, Interest::WRITABLE)?);
                }
                r => return Poll::Ready(r),
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Everything written has been accepted by the kernel; stop listening for room.
        self.write = None;
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.write = None;
        // SAFETY: shutdown on a descriptor we own.
        if unsafe { libc::shutdown(self.fd(), libc::SHUT_WR) } < 0 {
            let e = io::Error::last_os_error();
            // The peer may already be gone; there is nothing left to tell it.
            if e.raw_os_error() != Some(libc::ENOTCONN) {
                return Poll::Ready(Err(e));
            }
        }
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn round_trip_and_backpressure() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut a = NbdSocket::new(a).unwrap();
        let mut b = NbdSocket::new(b).unwrap();
        // Far more than a socket buffer holds: the writer must wait for room repeatedly,
        // which only works if the lazily registered writability wakes it.
        let data: Vec<u8> = (0..8 << 20).map(|i: u32| (i % 253) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            a.write_all(&sent).await.unwrap();
            a.flush().await.unwrap();
            a.shutdown().await.unwrap();
            a
        });
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), data.len());
        assert!(got == data, "bytes differ");
        let a = writer.await.unwrap();
        assert!(a.write.is_none(), "write registration kept after flush");
    }

    #[tokio::test]
    async fn vectored_write_and_peer_gone() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut a = NbdSocket::new(a).unwrap();
        let mut b = NbdSocket::new(b).unwrap();
        let n = a
            .write_vectored(&[IoSlice::new(b"head"), IoSlice::new(b"-tail")])
            .await
            .unwrap();
        assert_eq!(n, 9);
        let mut buf = [0u8; 9];
        b.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"head-tail");
        drop(b);
        // EPIPE, not SIGPIPE: the test process survives to see the error.
        let e = a.write_all(b"x").await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);
        let mut rest = Vec::new();
        assert_eq!(a.read_to_end(&mut rest).await.unwrap(), 0);
    }
}
