//! The transmission phase. One reader (this task) parses and validates requests; each
//! valid request runs in its own task; one writer task sends replies in the order they
//! complete. Two semaphores bound what a connection may hold: requests in flight, and
//! bytes buffered (write payloads waiting to run, read data waiting to be sent). When
//! either is exhausted the reader stops reading, so a client that sends faster than we
//! answer, or never reads its replies, is throttled by TCP rather than by our memory.

use crate::backend::{Backend, BackendError, Errno, ZeroFlags};
use crate::consts::*;
use crate::error::{is_disconnect, ProtocolError};
use crate::export::{ServerOptions, READ_BUFFER};
use crate::inline::InlineTask;
use crate::io::{discard, raised, read_exact_or_shutdown, ReadOutcome};
use crate::reply::{self, Pieces};
use crate::request::{validate, Command, RequestHeader, Session};
use crate::socket::{DirectFd, PollHint};
use bytes::{Bytes, BytesMut};
use std::future::Future;
use std::io::IoSlice;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Waker};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, warn};

/// After the reader stops and every request has run, how long the writer may take to get
/// the last replies to a client that is not reading them before the connection is cut.
const FINAL_WRITE_GRACE: Duration = Duration::from_secs(30);
/// The writer stops gathering queued replies for one `writev` beyond this many bytes.
const WRITE_BATCH_BYTES: usize = 4 * 1024 * 1024;
/// iovecs per `writev` (the kernel's IOV_MAX is 1024).
const MAX_IOVECS: usize = 256;

/// What our own socket ([`NbdSocket`](crate::NbdSocket)) offers the loop beyond reading
/// and writing; nothing for any other stream.
#[derive(Default)]
pub(crate) struct OwnSocket {
    /// Polling before the reader sleeps, switched on while it pays.
    pub poll: Option<PollHint>,
    /// Replies written from the thread that finished the request.
    pub direct: Option<DirectFd>,
}

/// The budget a request holds from before it is read until its reply has been written.
struct Permits {
    _slot: OwnedSemaphorePermit,
    _bytes: Option<OwnedSemaphorePermit>,
}

struct Outgoing {
    handle: u64,
    pieces: Pieces,
    /// None only for a direct write's kick (see [`Replies::send_direct`]).
    _permits: Option<Permits>,
}

/// Where finished requests put their replies: the writer task's queue, or, for a request
/// that may finish on the thread completing its I/O (inline.rs), the socket itself when
/// the writer has nothing queued, which saves waking the writer.
#[derive(Clone)]
struct Replies {
    tx: mpsc::UnboundedSender<Outgoing>,
    direct: Option<Arc<Direct>>,
}

/// The shared state of direct writes on a plain socket ([`NbdSocket`](crate::NbdSocket)).
/// Replies must not interleave on the wire, so a direct write happens only when the
/// writer task has nothing queued and nothing in hand, and the writer waits for a direct
/// write in progress. What a direct write cannot send at once (a full socket buffer, an
/// error) is left in `front` for the writer, which sends it before anything else.
struct Direct {
    fd: DirectFd,
    /// Messages queued for the writer and not yet written, plus [`BUSY`] while a direct
    /// write runs.
    state: AtomicUsize,
    front: std::sync::Mutex<Option<Outgoing>>,
}

const BUSY: usize = 1 << (usize::BITS - 1);
/// Set for good once the writer failed: what it sent last may have been cut off mid-frame,
/// so nothing may follow it.
const DEAD: usize = 1 << (usize::BITS - 2);

/// Reads up to this long may finish on the completing thread: a bigger one would keep
/// that thread (librados completes every operation of the cluster handle on it, one at a
/// time) copying its reply into the socket while other completions wait.
const INLINE_READ_MAX: u32 = 128 * 1024;

/// Clears [`BUSY`] when dropped, so a direct write that panicked cannot leave the writer
/// waiting for it forever.
struct Busy<'a>(&'a AtomicUsize);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.fetch_and(!BUSY, Ordering::AcqRel);
    }
}

impl Replies {
    fn queue(&self, m: Outgoing) {
        if let Some(d) = &self.direct {
            d.state.fetch_add(1, Ordering::AcqRel);
        }
        if self.tx.send(m).is_err() {
            // The writer is gone, and with it the client.
            if let Some(d) = &self.direct {
                d.state.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }

    fn send_direct(&self, m: Outgoing) {
        let Some(d) = &self.direct else {
            return self.queue(m);
        };
        if d.state
            .compare_exchange(0, BUSY, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return self.queue(m);
        }
        let busy = Busy(&d.state);
        match d.write_now(&m.pieces) {
            None => {
                drop(busy);
                // Permits go back only now that the reply has left.
                drop(m);
            }
            Some(rest) => {
                let handle = m.handle;
                *d.front.lock().unwrap_or_else(|e| e.into_inner()) = Some(Outgoing {
                    handle,
                    pieces: rest,
                    _permits: m._permits,
                });
                // The kick wakes the writer, and being counted, keeps other direct writes
                // out until the writer has sent the rest.
                self.queue(Outgoing {
                    handle,
                    pieces: Vec::new(),
                    _permits: None,
                });
                drop(busy);
            }
        }
    }
}

impl Direct {
    /// Sends `pieces` with one `sendmsg`, without waiting (the caller's thread may be
    /// librados' completion thread); what it did not take, if anything.
    fn write_now(&self, pieces: &Pieces) -> Option<Pieces> {
        let slices: Vec<IoSlice<'_>> = pieces
            .iter()
            .filter(|p| !p.is_empty())
            .take(MAX_IOVECS)
            .map(|p| IoSlice::new(p))
            .collect();
        // Full, failed or closed: the writer takes over and finds out which.
        let mut n = self.fd.try_send(&slices).unwrap_or(0);
        let mut rest = Vec::new();
        for p in pieces {
            if n >= p.len() {
                n -= p.len();
            } else {
                rest.push(p.slice(n..));
                n = 0;
            }
        }
        (!rest.is_empty()).then_some(rest)
    }
}

/// Why the reader stopped.
#[derive(Debug)]
enum Stop {
    Disconnect,
    Eof,
    Shutdown,
    WriterFailed,
    Fatal(ProtocolError),
}

/// Write payloads from this size on are received polling (why: where it is used). Smaller
/// ones mostly arrive whole, and polling for their rest took a CPU from the client
/// instead. Measured: bench/README.md, third round.
const POLL_PAYLOAD_MIN: u32 = 128 * 1024;

pub(crate) async fn run<R, W, B>(
    mut rd: BufReader<R>,
    wr: W,
    backend: Arc<B>,
    session: Session,
    opts: &ServerOptions,
    mut shutdown: watch::Receiver<bool>,
    own: OwnSocket,
) -> Result<(), ProtocolError>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send + 'static,
    B: Backend,
{
    // Semaphore::new panics above MAX_PERMITS; no real setting gets near it.
    let max_in_flight = opts.max_in_flight.clamp(1, Semaphore::MAX_PERMITS);
    // acquire_many takes u32; one request never needs more than its own length.
    let max_bytes = opts.max_buffered_bytes.clamp(1, u32::MAX as usize);
    let slots = Arc::new(Semaphore::new(max_in_flight));
    let bytes = Arc::new(Semaphore::new(max_bytes));

    let (tx, rx) = mpsc::unbounded_channel::<Outgoing>();
    let (dead_tx, mut dead_rx) = watch::channel(false);
    // Every request task holds a clone; when the receiver sees the channel close, every
    // task has finished its backend work.
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
    let OwnSocket {
        poll: poll_hint,
        direct,
    } = own;
    let direct = direct.map(|fd| {
        Arc::new(Direct {
            fd,
            state: AtomicUsize::new(0),
            front: std::sync::Mutex::new(None),
        })
    });
    let mut writer = tokio::spawn(write_loop(wr, rx, dead_tx, direct.clone()));
    let replies = Replies { tx, direct };

    let mut session = session;
    // Requests in a row that arrived alone (nothing buffered before or after them) and
    // were answered inline: the queue-depth-1 pattern that polling serves.
    let mut alone: u32 = 0;
    let stop = loop {
        // A slot is taken before the header is read, so even a stream of requests that
        // are all rejected is bounded by the replies the client has not read.
        let slot = tokio::select! {
            // Checked first: with a slot free and shutdown raised, stop rather than take
            // one more request half of the time.
            biased;
            _ = raised(&mut shutdown) => break Stop::Shutdown,
            _ = raised(&mut dead_rx) => break Stop::WriterFailed,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break Stop::Shutdown,
            },
        };
        let mut hb = [0u8; REQUEST_HEADER_LEN];
        let must_wait = rd.buffer().len() < REQUEST_HEADER_LEN;
        if must_wait {
            if let Some(hint) = &poll_hint {
                // Poll (NbdSocket) only for a client that sends one request at a time:
                // the last two each came alone and were answered here at once.
                let poll = alone >= 2;
                hint.set(poll);
                if poll {
                    // The reply of the request just run may wait in the queue of the
                    // writer task (all but small reads, which write their own), which runs
                    // only once we yield: let it leave before the read polls for a
                    // request the client sends only after that reply.
                    tokio::task::yield_now().await;
                }
            }
        }
        // Pipelining clients usually leave whole headers in the read buffer: take them
        // without setting up the shutdown-aware read. Shutdown is still noticed at the
        // slot acquisition above, once per request.
        let outcome = if !must_wait {
            hb.copy_from_slice(&rd.buffer()[..REQUEST_HEADER_LEN]);
            rd.consume(REQUEST_HEADER_LEN);
            Ok(ReadOutcome::Done)
        } else {
            tokio::select! {
                r = read_exact_or_shutdown(&mut rd, &mut hb, &mut shutdown, None) => r,
                _ = raised(&mut dead_rx) => break Stop::WriterFailed,
            }
        };
        match outcome {
            Ok(ReadOutcome::Done) => {}
            Ok(ReadOutcome::Eof) => break Stop::Eof,
            Ok(ReadOutcome::Shutdown) => break Stop::Shutdown,
            Err(e) if is_disconnect(&e) => break Stop::Eof,
            Err(e) => break Stop::Fatal(e.into()),
        }
        let h = match RequestHeader::parse(&hb) {
            Ok(h) => h,
            Err(magic) => {
                // Out of step with the client: nothing after this can be framed.
                break Stop::Fatal(ProtocolError::BadMagic {
                    what: "request",
                    got: u64::from(magic),
                    expected: u64::from(REQUEST_MAGIC),
                });
            }
        };
        debug!(
            handle = h.handle,
            command = command_name(h.command),
            flags = h.flags,
            offset = h.offset,
            length = h.length,
            "request"
        );

        if session.size_follows_backend {
            if let Some(size) = backend.current_size() {
                session.size = size;
            }
        }
        let cmd = match validate(&h, &session) {
            Ok(c) => c,
            Err(rej) => {
                debug!(
                    handle = h.handle,
                    error = rej.error,
                    "rejected: {}",
                    rej.message
                );
                // The payload of a rejected WRITE is still on the wire; skipping it keeps
                // us in step so the connection survives the bad request.
                if h.command == CMD_WRITE && h.length > 0 {
                    let r = tokio::select! {
                        r = discard(&mut rd, u64::from(h.length)) => r,
                        _ = raised(&mut shutdown) => break Stop::Shutdown,
                        _ = raised(&mut dead_rx) => break Stop::WriterFailed,
                    };
                    if let Err(e) = r {
                        break if is_disconnect(&e) {
                            Stop::Eof
                        } else {
                            Stop::Fatal(e.into())
                        };
                    }
                }
                let pieces = reply::error_reply(
                    h.handle,
                    session.structured_replies,
                    rej.error,
                    &rej.message,
                );
                replies.queue(Outgoing {
                    handle: h.handle,
                    pieces,
                    _permits: Some(Permits {
                        _slot: slot,
                        _bytes: None,
                    }),
                });
                continue;
            }
        };
        if cmd == Command::Disconnect {
            break Stop::Disconnect;
        }

        let cost = match cmd {
            Command::Read { length, .. } | Command::Write { length, .. } => {
                (length as usize).min(max_bytes)
            }
            _ => 0,
        };
        let byte_permit = if cost > 0 {
            let p = tokio::select! {
                p = bytes.clone().acquire_many_owned(cost as u32) => p,
                _ = raised(&mut shutdown) => break Stop::Shutdown,
                _ = raised(&mut dead_rx) => break Stop::WriterFailed,
            };
            match p {
                Ok(p) => Some(p),
                Err(_) => break Stop::Shutdown,
            }
        } else {
            None
        };

        let mut payload = Bytes::new();
        if let Command::Write { length, .. } = cmd {
            if let Some(hint) = &poll_hint {
                // A large payload cannot arrive at once: a client's socket send buffer
                // holds 208 KiB by default, so we drain the socket and the client wakes
                // to refill it, four or five times per MiB. Sleeping in between costs a
                // wake-up each time (see NbdSocket's polling), so poll while the rest of
                // the payload is on its way. The next header read decides afresh.
                if length >= POLL_PAYLOAD_MIN && rd.buffer().len() < length as usize {
                    hint.set(true);
                }
            }
            let r = tokio::select! {
                r = read_payload(&mut rd, length as usize) => r,
                // A write cut off by shutdown was never acknowledged; dropping it is safe.
                _ = raised(&mut shutdown) => break Stop::Shutdown,
                _ = raised(&mut dead_rx) => break Stop::WriterFailed,
            };
            match r {
                Ok(buf) => payload = buf,
                Err(e) if is_disconnect(&e) => {
                    debug!(
                        handle = h.handle,
                        "client left in the middle of a write payload"
                    );
                    break Stop::Eof;
                }
                Err(e) => break Stop::Fatal(e.into()),
            }
        }

        // A payload bigger than the read buffer was read straight from the socket, so an
        // empty buffer after it says nothing about what the client has queued behind it:
        // run such a write as its own task and go back to reading (at queue depth 1 the
        // hand-off is small next to receiving the payload; measured: bench/README.md,
        // third round).
        let big_payload = payload.len() > READ_BUFFER;
        let permits = Permits {
            _slot: slot,
            _bytes: byte_permit,
        };
        let backend = backend.clone();
        let replies = replies.clone();
        let done = done_tx.clone();
        let structured = session.structured_replies;
        let handle = h.handle;
        let pipelined = rd.buffer().len() >= REQUEST_HEADER_LEN || big_payload;
        // A small read that came alone may finish on the thread that completes its I/O
        // and write its own reply to our own socket (inline.rs says why). Only reads: what
        // is left of one after its data arrives is encoding the reply. With requests
        // pipelined behind it, the writer's batching is worth more than the hand-off saved.
        let inline = replies.direct.is_some()
            && !pipelined
            && matches!(cmd, Command::Read { length, .. } if length <= INLINE_READ_MAX);
        let task = async move {
            let guard = ReplyGuard {
                replies: Some(replies),
                direct: inline,
                handle,
                structured,
                permits: Some(permits),
            };
            let pieces = execute(&*backend, cmd, handle, payload, structured).await;
            guard.send(pieces);
            // The backend before `done`: once every `done` is gone, the caller may close
            // the image, and its last reference must not go on a librados thread.
            drop(backend);
            drop(done);
        };
        // With nothing else pipelined behind this request (queue depth 1, or the last of
        // a burst), run it here first: a backend answering from memory or the page cache
        // then costs no task hand-off. If it has to wait, or more requests are already
        // queued (so running them concurrently pays), it becomes a task of its own. A
        // backend panic is caught either way; dropping the future then drops its
        // ReplyGuard, which answers EIO.
        let pending = if inline {
            // Polled with its own waker, which may run it on the completing thread.
            !InlineTask::new(task, true).run_now()
        } else {
            // A future polled once with a no-op waker is polled again by its tokio task,
            // which registers the real waker.
            let mut task = Box::pin(task);
            let pending = pipelined
                || std::panic::catch_unwind(AssertUnwindSafe(|| {
                    task.as_mut()
                        .poll(&mut Context::from_waker(Waker::noop()))
                        .is_pending()
                }))
                .unwrap_or(false);
            if pending {
                tokio::spawn(task);
            }
            pending
        };
        alone = if must_wait && !pending {
            alone.saturating_add(1)
        } else {
            0
        };
    };

    debug!(?stop, "reader stopped");
    drop(replies);
    drop(done_tx);
    // Requests already running finish against the backend whatever happened to the
    // client: the caller may rely on that to close its image cleanly after we return.
    let _ = done_rx.recv().await;
    match tokio::time::timeout(FINAL_WRITE_GRACE, &mut writer).await {
        Ok(_) => {}
        Err(_) => {
            warn!("client did not read its last replies in time; dropping the connection");
            writer.abort();
        }
    }
    match stop {
        Stop::Fatal(e) => Err(e),
        _ => Ok(()),
    }
}

/// Reads exactly `len` payload bytes into a fresh buffer without zero-filling it first.
async fn read_payload<R: AsyncRead + Unpin>(rd: &mut R, len: usize) -> std::io::Result<Bytes> {
    let mut buf = BytesMut::with_capacity(len);
    while buf.len() < len {
        // `take` keeps a roomy buffer from swallowing the next request's header.
        let want = (len - buf.len()) as u64;
        if (&mut *rd).take(want).read_buf(&mut buf).await? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!(
                    "peer closed the connection {} bytes into a {len}-byte payload",
                    buf.len()
                ),
            ));
        }
    }
    Ok(buf.freeze())
}

/// Makes sure every request that started gets a reply. If the backend panics, the task
/// unwinds through this guard, which answers EIO instead of leaving the client waiting
/// forever for a handle that will never come back.
struct ReplyGuard {
    replies: Option<Replies>,
    /// Write the reply straight to the socket when possible ([`Replies::send_direct`]).
    direct: bool,
    handle: u64,
    structured: bool,
    permits: Option<Permits>,
}

impl ReplyGuard {
    fn send(mut self, pieces: Pieces) {
        if let (Some(r), Some(permits)) = (self.replies.take(), self.permits.take()) {
            // If the writer is gone the client is gone; the work is done either way.
            let m = Outgoing {
                handle: self.handle,
                pieces,
                _permits: Some(permits),
            };
            if self.direct {
                r.send_direct(m);
            } else {
                r.queue(m);
            }
        }
    }
}

impl Drop for ReplyGuard {
    fn drop(&mut self) {
        if let (Some(r), Some(permits)) = (self.replies.take(), self.permits.take()) {
            warn!(
                handle = self.handle,
                "request ended without a reply (backend panic?); answering EIO"
            );
            let pieces = reply::error_reply(
                self.handle,
                self.structured,
                EIO,
                "internal server error while handling the request",
            );
            r.queue(Outgoing {
                handle: self.handle,
                pieces,
                _permits: Some(permits),
            });
        }
    }
}

/// Sends replies in the order they complete. Every reply already queued when the writer
/// wakes goes out in one vectored write (header and read payload together, many small
/// replies per syscall), without copying payloads into a buffer first.
async fn write_loop<W: AsyncWrite + Unpin>(
    mut w: W,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    dead: watch::Sender<bool>,
    direct: Option<Arc<Direct>>,
) {
    let mut failed = false;
    let mut batch: Vec<Outgoing> = Vec::new();
    while let Some(first) = rx.recv().await {
        batch.push(first);
        let mut bytes: usize = batch[0].pieces.iter().map(|p| p.len()).sum();
        while bytes < WRITE_BATCH_BYTES && !failed {
            match rx.try_recv() {
                Ok(m) => {
                    bytes += m.pieces.iter().map(|p| p.len()).sum::<usize>();
                    batch.push(m);
                }
                Err(_) => break,
            }
        }
        // Counted in `Direct::state` until written (or dropped).
        let taken = batch.len();
        if let Some(d) = &direct {
            // A direct write under way takes a single sendmsg: wait for it, then send
            // first what it could not.
            while d.state.load(Ordering::Acquire) & BUSY != 0 {
                tokio::task::yield_now().await;
            }
            if let Some(f) = d.front.lock().unwrap_or_else(|e| e.into_inner()).take() {
                batch.insert(0, f);
            }
        }
        let release = |batch: &mut Vec<Outgoing>| {
            batch.clear();
            if let Some(d) = &direct {
                d.state.fetch_sub(taken, Ordering::AcqRel);
            }
        };
        if failed {
            // Keep receiving so permits are released and tasks never block on us.
            release(&mut batch);
            continue;
        }
        let mut res = write_all_pieces(&mut w, batch.iter().flat_map(|m| m.pieces.iter())).await;
        // A plain socket's flush is a no-op, but a TLS stream holds what was written in
        // its session buffer until flushed: without this, replies over TLS never leave.
        if res.is_ok() {
            res = w.flush().await;
        }
        if let Err(e) = res {
            let handle = batch[0].handle;
            if is_disconnect(&e) {
                debug!(handle, "client gone while sending reply: {e}");
            } else {
                warn!(handle, "writing reply failed: {e}");
            }
            failed = true;
            if let Some(d) = &direct {
                d.state.fetch_or(DEAD, Ordering::AcqRel);
            }
            let _ = dead.send(true);
        }
        // Permits go back only now that the replies have left.
        release(&mut batch);
    }
    if !failed {
        let _ = w.flush().await;
        let _ = w.shutdown().await;
    }
}

/// Writes every piece, in order, with as few `writev` calls as the socket allows.
async fn write_all_pieces<'a, W: AsyncWrite + Unpin>(
    w: &mut W,
    pieces: impl Iterator<Item = &'a Bytes>,
) -> std::io::Result<()> {
    let mut pending: Vec<&[u8]> = pieces.filter(|p| !p.is_empty()).map(|p| &p[..]).collect();
    let mut start = 0;
    while start < pending.len() {
        let end = (start + MAX_IOVECS).min(pending.len());
        let slices: Vec<IoSlice<'_>> = pending[start..end]
            .iter()
            .map(|p| IoSlice::new(p))
            .collect();
        let mut n = w.write_vectored(&slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        // Skip what was written: whole pieces, then part of the next one.
        while n > 0 {
            let p = pending[start];
            if n >= p.len() {
                n -= p.len();
                start += 1;
            } else {
                pending[start] = &p[n..];
                n = 0;
            }
        }
    }
    Ok(())
}

/// Run one validated request against the backend and encode its reply, success or not.
async fn execute<B: Backend>(
    b: &B,
    cmd: Command,
    handle: u64,
    payload: Bytes,
    structured: bool,
) -> Pieces {
    let io_error = |m: String| BackendError::new(Errno::Io, m);
    let result: Result<Pieces, BackendError> = match cmd {
        Command::Read { offset, length, df } => unless_empty(length, || b.read(offset, length))
            .await
            .and_then(|c| {
                reply::read_reply(handle, offset, length, c, structured, df).map_err(io_error)
            }),
        Command::Write {
            offset,
            length,
            fua,
        } => unless_empty(length, || b.write(offset, payload, fua))
            .await
            .map(|_| reply::ok_reply(handle)),
        Command::Flush => b.flush().await.map(|_| reply::ok_reply(handle)),
        Command::Trim {
            offset,
            length,
            fua,
        } => unless_empty(length, || b.trim(offset, length, fua))
            .await
            .map(|_| reply::ok_reply(handle)),
        Command::Cache { offset, length } => unless_empty(length, || b.cache(offset, length))
            .await
            .map(|_| reply::ok_reply(handle)),
        Command::WriteZeroes {
            offset,
            length,
            fua,
            no_hole,
            fast_zero,
        } => {
            let flags = ZeroFlags {
                no_hole,
                fast_zero,
                fua,
            };
            unless_empty(length, || b.write_zeroes(offset, length, flags))
                .await
                .map(|_| reply::ok_reply(handle))
        }
        Command::BlockStatus {
            offset,
            length,
            req_one,
            context_id,
        } => b
            .block_status(offset, length)
            .await
            .map(|ex| reply::block_status_reply(handle, context_id, length, &ex, req_one)),
        // Never spawned: the reader handles it. Answering keeps this total.
        Command::Disconnect => Ok(reply::ok_reply(handle)),
    };
    match result {
        Ok(p) => p,
        Err(e) => {
            log_failure(handle, &e);
            reply::error_reply(handle, structured, e.errno.to_nbd(), &e.message)
        }
    }
}

/// A request that failed. EIO means the store failed, which the operator must see (the
/// client is told only the errno): a warning, at most one a second, saying how many
/// were left out since. Other errors are the client's (a bad range, a write to a
/// read-only export) or the shutdown's: debug only.
fn log_failure(handle: u64, e: &BackendError) {
    static LAST: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    static QUIET: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    if e.errno != Errno::Io {
        debug!(handle, "request failed: {e}");
        return;
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let last = LAST.load(Ordering::Relaxed);
    if now > last
        && LAST
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        match QUIET.swap(0, Ordering::Relaxed) {
            0 => warn!(handle, "request failed: {e}"),
            n => warn!(
                handle,
                "request failed: {e} ({n} more failed since the last such warning)"
            ),
        }
    } else {
        QUIET.fetch_add(1, Ordering::Relaxed);
        debug!(handle, "request failed: {e}");
    }
}

/// Zero-length requests are legal and trivially satisfied (an empty read, a write of
/// nothing); not bothering the backend spares every implementation the corner case.
async fn unless_empty<T, F, Fut>(length: u32, op: F) -> Result<T, BackendError>
where
    T: Default,
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<T, BackendError>>,
{
    if length == 0 {
        Ok(T::default())
    } else {
        op().await
    }
}
