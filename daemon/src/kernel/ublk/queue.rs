//! One ublk hardware queue, served on a thread libublk starts for it.
//!
//! libublk drives a queue from one thread: its own io_uring, a smol executor, one task per
//! tag (a tag is a request slot: FETCH, then COMMIT_AND_FETCH with the result). The image
//! layer is tokio's, so each request hops: the tag task validates it, copies a write's data
//! out of the tag's buffer, and spawns the image operation on the tokio runtime; the tokio
//! task sends the outcome back on a oneshot channel and writes the queue's eventfd. The
//! eventfd matters: the queue thread sleeps in io_uring_enter, which a waker from another
//! thread does not interrupt, so one read of the eventfd is always pending in the queue's
//! ring and its completion wakes the thread, whose executor then runs the woken tag tasks.

use super::request::{self, Desc, Done};
use super::Gate;
use libublk::helpers::IoBuf;
use libublk::io::{UblkDev, UblkQueue};
use libublk::{BufDesc, UblkError};
use nbd_protocol::Backend;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::Arc;

/// What every queue thread shares.
pub struct Shared<B> {
    pub backend: Arc<B>,
    pub rt: tokio::runtime::Handle,
    pub gate: Arc<Gate>,
    pub read_only: bool,
}

impl<B> Clone for Shared<B> {
    fn clone(&self) -> Self {
        Shared {
            backend: self.backend.clone(),
            rt: self.rt.clone(),
            gate: self.gate.clone(),
            read_only: self.read_only,
        }
    }
}

/// Serves queue `qid` of `dev` until the driver aborts it (stop, delete, or our exit).
pub fn serve_queue<B: Backend>(qid: u16, dev: &UblkDev, sh: Shared<B>) {
    // SAFETY: eventfd(2) has no memory arguments; the result is checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if fd < 0 {
        tracing::error!(
            "ublk queue {qid}: eventfd: {}",
            std::io::Error::last_os_error()
        );
        return;
    }
    // SAFETY: a fresh descriptor owned from here on.
    let efd = Arc::new(unsafe { OwnedFd::from_raw_fd(fd) });
    let q = match UblkQueue::new(qid, dev) {
        Ok(q) => Rc::new(q),
        Err(e) => {
            tracing::error!("ublk queue {qid}: {e}");
            return;
        }
    };
    let exe = Rc::new(smol::LocalExecutor::new());
    let mut tags = Vec::new();
    for tag in q.tags() {
        let (q, sh, efd) = (q.clone(), sh.clone(), efd.clone());
        tags.push(exe.spawn(async move {
            match serve_tag(&q, tag, &sh, &efd).await {
                Ok(()) | Err(UblkError::QueueIsDown) => {}
                Err(e) => tracing::error!("ublk queue {qid} tag {tag}: {e}"),
            }
        }));
    }
    // The wake-up read: never finishes on its own; the queue is done when its tags are.
    let waker_q = q.clone();
    let waker_fd = efd.clone();
    exe.spawn(async move {
        let mut word = Box::new([0u8; 8]);
        loop {
            let sqe = io_uring::opcode::Read::new(
                io_uring::types::Fd(waker_fd.as_raw_fd()),
                word.as_mut_ptr(),
                8,
            )
            .build();
            if waker_q.ublk_submit_sqe(sqe).await < 0 {
                // Should not happen; keep the executor turning rather than spin.
                smol::Timer::after(std::time::Duration::from_millis(1)).await;
            }
        }
    })
    .detach();
    let exe2 = exe.clone();
    smol::block_on(exe.run(async move {
        let run_ops = || while exe2.try_tick() {};
        let done = || tags.iter().all(|t| t.is_finished());
        if let Err(e) = libublk::wait_and_handle_io_events(&q, Some(20), run_ops, done).await {
            tracing::error!("ublk queue {qid}: {e}");
        }
    }));
}

async fn serve_tag<B: Backend>(
    q: &UblkQueue<'_>,
    tag: u16,
    sh: &Shared<B>,
    efd: &Arc<OwnedFd>,
) -> Result<(), UblkError> {
    let buf_len = q.dev.dev_info.max_io_buf_bytes as usize;
    let mut buf = IoBuf::<u8>::new(buf_len);
    q.submit_io_prep_cmd(tag, BufDesc::Slice(buf.as_slice()), 0, Some(&buf))
        .await?;
    loop {
        let iod = q.get_iod(tag);
        let desc = Desc {
            op_flags: iod.op_flags,
            nr_sectors: iod.nr_sectors,
            start_sector: iod.start_sector,
        };
        let size = sh.backend.current_size().unwrap_or(sh.backend.info().size);
        let res = match request::validate(desc, size, buf_len, sh.read_only) {
            Err(e) => {
                tracing::warn!(
                    "ublk queue {} tag {tag}: refused {desc:?}: {e}",
                    q.get_qid()
                );
                e
            }
            Ok(req) => {
                // Detaching: hold the request, never answer it. The driver gives it to the
                // next daemon (UBLK_F_USER_RECOVERY_REISSUE) once this one has gone.
                let Some(_pass) = sh.gate.enter() else {
                    return std::future::pending().await;
                };
                let data = match req {
                    request::Req::Write { len, .. } => Some(bytes::Bytes::copy_from_slice(
                        &buf.as_slice()[..len as usize],
                    )),
                    _ => None,
                };
                let (tx, rx) = tokio::sync::oneshot::channel();
                let b = sh.backend.clone();
                let efd = efd.clone();
                sh.rt.spawn(async move {
                    let done = request::run(&*b, req, data).await;
                    let _ = tx.send(done);
                    let one = 1u64.to_ne_bytes();
                    // SAFETY: writes 8 bytes from a live array to our own eventfd.
                    unsafe { libc::write(efd.as_raw_fd(), one.as_ptr().cast(), 8) };
                });
                match rx.await {
                    Ok(Done::Result(r)) => r,
                    Ok(Done::Read(chunks, len)) => request::fill(buf.as_mut_slice(), &chunks, len),
                    // The runtime dropped the task: shutting down.
                    Err(_) => -libc::EIO,
                }
            }
        };
        q.submit_io_commit_cmd(tag, BufDesc::Slice(buf.as_slice()), res)
            .await?;
    }
}
