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
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

pub struct NbdSocket {
    rd: NbdReadHalf,
    wr: NbdWriteHalf,
}

/// The reading side of an [`NbdSocket`] (see [`NbdSocket::into_split`]).
pub struct NbdReadHalf {
    /// The registration for readability; it owns the descriptor, which closes when the
    /// last half is dropped.
    fd: Arc<AsyncFd<OwnedFd>>,
    poll: Poller,
}

/// The writing side of an [`NbdSocket`] (see [`NbdSocket::into_split`]).
pub struct NbdWriteHalf {
    fd: Arc<AsyncFd<OwnedFd>>,
    /// Present only while a write is waiting for room in the socket buffer.
    write: Option<AsyncFd<OwnedFd>>,
}

/// Set by whoever parses the stream (the transmission loop) when polling pays: when the
/// client sends one request at a time and waits for its reply. With many requests in
/// flight the next ones come anyway, and polling would only take a CPU from the client.
#[derive(Debug, Clone, Default)]
pub struct PollHint(Arc<AtomicBool>);

impl PollHint {
    pub fn set(&self, poll: bool) {
        self.0.store(poll, Ordering::Relaxed);
    }

    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Adaptive polling before a read sleeps, by the rule QEMU's event loop uses for its
/// `poll-max-ns` (on by default there, 32 us): when the socket has nothing to read, keep
/// trying for up to `window` before going to sleep. The window grows while data keeps
/// arriving within `max` of when we started waiting, and shrinks (to zero) when waits are
/// longer, so an idle or slow client costs nothing and a client in a tight request/reply
/// loop (queue depth 1) is answered without a sleep and a wake-up in between: each costs
/// an inter-processor interrupt, and on a VM whose host does not halt-poll, a trip
/// through the hypervisor that takes longer than serving the request from the page cache.
#[derive(Debug)]
struct Poller {
    hint: PollHint,
    max: Duration,
    window: Duration,
    /// When the current wait began (spin included), if a read is waiting.
    waiting_since: Option<Instant>,
}

/// The first window after a short wait, and the smallest one kept when shrinking.
const POLL_GROW_START: Duration = Duration::from_micros(4);

/// Connections polling right now, process-wide. At most one fewer than the CPUs may poll
/// at once, so a thread stays free to take over the other tasks of a polling thread.
static POLLING: AtomicUsize = AtomicUsize::new(0);

fn max_polling() -> usize {
    static MAX: OnceLock<usize> = OnceLock::new();
    *MAX.get_or_init(|| {
        std::thread::available_parallelism()
            .map(|n| n.get().saturating_sub(1).max(1))
            .unwrap_or(1)
    })
}

/// Holds one of the `max_polling` places while a read polls.
struct PollSlot<'a>(&'a AtomicUsize);

impl<'a> PollSlot<'a> {
    fn take(count: &'a AtomicUsize, max: usize) -> Option<PollSlot<'a>> {
        let mut n = count.load(Ordering::Relaxed);
        loop {
            if n >= max {
                return None;
            }
            match count.compare_exchange_weak(n, n + 1, Ordering::Acquire, Ordering::Relaxed) {
                Ok(_) => return Some(PollSlot(count)),
                Err(now) => n = now,
            }
        }
    }
}

impl Drop for PollSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Release);
    }
}

impl Poller {
    /// A wait of `waited` just ended with data: adapt the window (QEMU's
    /// `adjust_polling_time`: keep it when it sufficed, grow it when a slightly longer one
    /// would have, halve it when even the longest would not have).
    fn waited(&mut self, waited: Duration) {
        if waited <= self.window {
            return;
        }
        if waited > self.max {
            self.window /= 2;
            if self.window < POLL_GROW_START {
                self.window = Duration::ZERO;
            }
        } else if self.window < self.max {
            self.window = if self.window.is_zero() {
                POLL_GROW_START
            } else {
                (self.window * 2).min(self.max)
            };
        }
    }

    /// Called when a read found nothing to read: polls the socket for up to the window
    /// if polling pays now. `Some` is the read's outcome; `None` means sleep, and the
    /// wait is timed from now.
    fn before_sleep(&mut self, fd: RawFd, buf: &mut ReadBuf<'_>) -> Option<io::Result<()>> {
        if self.max.is_zero() || self.waiting_since.is_some() {
            return None;
        }
        let start = Instant::now();
        let slot = if self.window.is_zero() || !self.hint.is_set() {
            None
        } else {
            PollSlot::take(&POLLING, max_polling())
        };
        if slot.is_some() {
            loop {
                match recv(fd, buf, libc::MSG_DONTWAIT) {
                    Ok(_) => {
                        self.waited(start.elapsed());
                        return Some(Ok(()));
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Some(Err(e)),
                }
                if start.elapsed() >= self.window {
                    break;
                }
                std::hint::spin_loop();
            }
        }
        self.waiting_since = Some(start);
        None
    }

    /// A read got data: if it had been waiting, adapt the window to how long.
    fn data_arrived(&mut self) {
        if let Some(start) = self.waiting_since.take() {
            self.waited(start.elapsed());
        }
    }
}

impl NbdSocket {
    /// Takes over a connected stream socket (Unix or TCP) and makes it non-blocking.
    /// Must be called within a tokio runtime.
    pub fn new(fd: impl Into<OwnedFd>) -> io::Result<Self> {
        let fd: OwnedFd = fd.into();
        set_nonblocking(fd.as_raw_fd())?;
        grow_send_buffer(fd.as_raw_fd());
        let fd = Arc::new(register(fd, Interest::READABLE)?);
        Ok(NbdSocket {
            rd: NbdReadHalf {
                fd: fd.clone(),
                poll: Poller {
                    hint: PollHint::default(),
                    max: Duration::ZERO,
                    window: Duration::ZERO,
                    waiting_since: None,
                },
            },
            wr: NbdWriteHalf { fd, write: None },
        })
    }

    /// Poll for up to `max` before a read sleeps (adaptively, see [`Poller`]) while the
    /// [`PollHint`] is set; zero, the default, never polls.
    pub fn with_polling(mut self, max: Duration) -> Self {
        self.rd.poll.max = max;
        self
    }

    /// The switch that turns polling on and off, if polling is configured at all.
    pub fn poll_hint(&self) -> Option<PollHint> {
        let poll = &self.rd.poll;
        (!poll.max.is_zero()).then(|| poll.hint.clone())
    }

    /// Separate halves for the reader and the writer, with no lock between them:
    /// `recv` and `sendmsg` on one socket may run at once. `tokio::io::split` would put
    /// the socket behind a mutex, so a reply could not leave while the reader is in
    /// `recv`, or polling for the rest of a write payload, and the writer would sleep on
    /// the mutex instead (measured: bench/README.md, third round).
    pub fn into_split(self) -> (NbdReadHalf, NbdWriteHalf) {
        (self.rd, self.wr)
    }

    #[cfg(test)]
    fn fd(&self) -> RawFd {
        self.rd.fd.get_ref().as_raw_fd()
    }

    /// From a tokio Unix socket (deregistering it from the runtime first).
    pub fn from_unix(s: tokio::net::UnixStream) -> io::Result<Self> {
        Self::new(s.into_std()?)
    }

    /// From a tokio TCP socket (deregistering it from the runtime first).
    pub fn from_tcp(s: tokio::net::TcpStream) -> io::Result<Self> {
        Self::new(s.into_std()?)
    }
}

fn register(fd: OwnedFd, interest: Interest) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: an OwnedFd stays open, and stays the same descriptor, until the AsyncFd that
    // owns it is dropped.
    unsafe { AsyncFd::register_with_interest(fd, interest) }.map_err(|e| e.into_parts().1)
}

/// The send buffer a connection asks for. With the default (208 KiB) a 1 MiB read reply
/// leaves in five or more pieces, each waiting for the client to drain the socket: a
/// sleep and a wake-up for the writer every time (measured: bench/README.md, second
/// round). The kernel caps the request at net.core.wmem_max, which this does not override
/// (SO_SNDBUFFORCE would): raise that sysctl to let it take effect.
const SEND_BUFFER: libc::c_int = 4 << 20;

/// An int-valued SOL_SOCKET option (SO_DOMAIN, SO_SNDBUF, ...).
fn sockopt_int(fd: RawFd, name: libc::c_int) -> io::Result<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt into a local int whose size we pass.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            name,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(v)
    }
}

/// Unix sockets only: a TCP socket given an explicit size loses the kernel's send-buffer
/// autotuning (which may grow beyond it). Best effort: a refusal leaves the default
/// buffer, which only costs speed.
fn grow_send_buffer(fd: RawFd) {
    if sockopt_int(fd, libc::SO_DOMAIN).ok() != Some(libc::AF_UNIX) {
        return;
    }
    let want = send_buffer_granted();
    // The kernel reports twice what was granted (its bookkeeping overhead); never shrink.
    if sockopt_int(fd, libc::SO_SNDBUF).is_ok_and(|have| have >= want * 2) {
        return;
    }
    // SAFETY: setsockopt from a local int whose size we pass.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&want as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
}

/// SEND_BUFFER as the kernel will grant it: capped at net.core.wmem_max.
fn send_buffer_granted() -> libc::c_int {
    static GRANTED: OnceLock<libc::c_int> = OnceLock::new();
    *GRANTED.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/net/core/wmem_max")
            .ok()
            .and_then(|s| s.trim().parse::<libc::c_int>().ok())
            .map_or(SEND_BUFFER, |cap| SEND_BUFFER.min(cap))
    })
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

fn recv(fd: RawFd, buf: &mut ReadBuf<'_>, flags: libc::c_int) -> io::Result<usize> {
    // SAFETY: the kernel writes at most `unfilled.len()` bytes into memory we own; the
    // bytes it wrote are marked initialised below, and only those.
    let unfilled = unsafe { buf.unfilled_mut() };
    let n = unsafe { libc::recv(fd, unfilled.as_mut_ptr().cast(), unfilled.len(), flags) };
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
        Pin::new(&mut self.get_mut().rd).poll_read(cx, buf)
    }
}

impl AsyncWrite for NbdSocket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().wr).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().wr).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().wr).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().wr).poll_shutdown(cx)
    }
}

impl AsyncRead for NbdReadHalf {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let fd = this.fd.get_ref().as_raw_fd();
        loop {
            let mut guard = match this.fd.poll_read_ready(cx) {
                Poll::Ready(g) => g?,
                // Nothing known to be readable: the waker is registered, so returning
                // Pending is safe; first, poll for a while if that has been paying.
                Poll::Pending => {
                    return match this.poll.before_sleep(fd, buf) {
                        Some(r) => Poll::Ready(r),
                        None => Poll::Pending,
                    };
                }
            };
            let want = buf.remaining();
            match guard.try_io(|_| recv(fd, buf, 0)) {
                Ok(Ok(n)) => {
                    // A short read drained the socket (it is edge-triggered): forget the
                    // readiness now rather than pay a recv that says EAGAIN next time.
                    // New data arriving meanwhile bumps the readiness tick, so this cannot
                    // lose a wake-up.
                    if n > 0 && n < want {
                        guard.clear_ready();
                    }
                    this.poll.data_arrived();
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl NbdWriteHalf {
    /// A handle that writes to this socket without waiting, from any thread (the
    /// transmission loop's direct replies; it keeps the writes of the two apart).
    pub(crate) fn direct(&self) -> DirectFd {
        DirectFd(self.fd.clone())
    }
}

/// Non-blocking writes to an [`NbdSocket`], usable off the runtime: see
/// [`NbdWriteHalf::direct`].
pub(crate) struct DirectFd(Arc<AsyncFd<OwnedFd>>);

impl DirectFd {
    /// One `sendmsg` without waiting: the bytes taken (maybe fewer than offered), or an
    /// error (`WouldBlock` when the socket buffer is full).
    pub(crate) fn try_send(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        send(self.0.get_ref().as_raw_fd(), bufs)
    }
}

impl AsyncWrite for NbdWriteHalf {
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
        let fd = self.fd.get_ref().as_raw_fd();
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
        if unsafe { libc::shutdown(self.fd.get_ref().as_raw_fd(), libc::SHUT_WR) } < 0 {
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
        assert!(a.wr.write.is_none(), "write registration kept after flush");
    }

    #[tokio::test]
    async fn unix_send_buffer_grows_tcp_keeps_autotuning() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let before = sockopt_int(a.as_raw_fd(), libc::SO_SNDBUF).unwrap();
        let a = NbdSocket::new(a).unwrap();
        let after = sockopt_int(a.fd(), libc::SO_SNDBUF).unwrap();
        // Granted up to wmem_max, reported doubled; never smaller than before.
        assert_eq!(after, (send_buffer_granted() * 2).max(before));

        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let before = sockopt_int(c.as_raw_fd(), libc::SO_SNDBUF).unwrap();
        let c = NbdSocket::new(c).unwrap();
        assert_eq!(sockopt_int(c.fd(), libc::SO_SNDBUF).unwrap(), before);
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

    #[test]
    fn polling_window_adapts_like_qemu() {
        let us = Duration::from_micros;
        let mut p = Poller {
            hint: PollHint::default(),
            max: us(64),
            window: Duration::ZERO,
            waiting_since: None,
        };
        // Short waits grow the window from the start value, doubling, up to max.
        p.waited(us(10));
        assert_eq!(p.window, POLL_GROW_START);
        for _ in 0..10 {
            p.waited(us(60));
        }
        assert_eq!(p.window, us(64));
        // A wait the window covered changes nothing.
        p.waited(us(30));
        assert_eq!(p.window, us(64));
        // Waits longer than max halve it, down to nothing.
        p.waited(us(1000));
        assert_eq!(p.window, us(32));
        for _ in 0..5 {
            p.waited(Duration::from_secs(1));
        }
        assert_eq!(p.window, Duration::ZERO);
    }

    #[test]
    fn polling_places_are_bounded() {
        let count = AtomicUsize::new(0);
        let held: Vec<PollSlot> = std::iter::from_fn(|| PollSlot::take(&count, 3))
            .take(8)
            .collect();
        assert_eq!(held.len(), 3, "more pollers than allowed");
        assert!(PollSlot::take(&count, 3).is_none());
        drop(held);
        assert_eq!(count.load(Ordering::Relaxed), 0, "places not given back");
        assert!(PollSlot::take(&count, 3).is_some());
    }

    /// A request/reply ping-pong with polling on: once the window has grown, reads are
    /// answered by the polling loop (MSG_DONTWAIT), and every byte still arrives in order,
    /// end of stream included.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn polling_reads_deliver_every_byte() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut server = NbdSocket::new(a)
            .unwrap()
            .with_polling(Duration::from_micros(500));
        server.poll_hint().unwrap().set(true);
        let mut client = NbdSocket::new(b).unwrap();
        let rounds = 2000u32;
        let echo = tokio::spawn(async move {
            let mut buf = [0u8; 4];
            loop {
                match server.read_exact(&mut buf).await {
                    Ok(_) => server.write_all(&buf).await.unwrap(),
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
                    Err(e) => panic!("{e}"),
                }
            }
            server.rd.poll.window
        });
        for i in 0..rounds {
            client.write_all(&i.to_be_bytes()).await.unwrap();
            let mut back = [0u8; 4];
            client.read_exact(&mut back).await.unwrap();
            assert_eq!(u32::from_be_bytes(back), i);
        }
        drop(client);
        let window = echo.await.unwrap();
        // The client answered within microseconds every time: the window grew (it shrinks
        // only on waits longer than max, and the last wait, for the EOF, is short too).
        assert!(!window.is_zero(), "polling never engaged");
    }
}
