//! Watches and notifies: registering a watch whose callbacks ack each notification and
//! pass events on, ending it, and notifying the watchers of an object.

use super::completion::{aio, Keep, RadosBuf};
use super::error::{cstring, rados_error};
use super::ffi::*;
use super::ioctx::IoCtx;
use crate::error::{Error, ErrorKind, Result};
use libc::{ENOENT, ENOTCONN, ETIMEDOUT};
use std::ffi::{c_char, c_int, c_void, CString};
use std::sync::Arc;
use tokio::sync::mpsc;

/// The answer to a notify: who acknowledged (with their reply payloads) and who did not.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NotifyReply {
    /// (client gid, watch cookie, reply payload)
    pub acks: Vec<(u64, u64, Vec<u8>)>,
    /// (client gid, watch cookie) of watchers that did not answer in time.
    pub timeouts: Vec<(u64, u64)>,
}

impl NotifyReply {
    /// Parses librados' notify reply buffer:
    /// `le32 n, n × {le64 gid, le64 cookie, le32 len, bytes}, le32 m, m × {le64 gid, le64 cookie}`.
    pub fn parse(buf: &[u8]) -> Result<NotifyReply> {
        let mut d = crate::store::ceph::cls::Dec::new(buf, "notify reply");
        let mut out = NotifyReply::default();
        let n = d.u32()?;
        for _ in 0..n {
            let gid = d.u64()?;
            let cookie = d.u64()?;
            let payload = d.bytes()?.to_vec();
            out.acks.push((gid, cookie, payload));
        }
        let m = d.u32()?;
        for _ in 0..m {
            out.timeouts.push((d.u64()?, d.u64()?));
        }
        Ok(out)
    }

    /// Is the watch (gid, cookie) registered (answered or timed out)?
    pub fn has_watcher(&self, gid: u64, cookie: u64) -> bool {
        self.acks.iter().any(|a| a.0 == gid && a.1 == cookie)
            || self.timeouts.iter().any(|t| t.0 == gid && t.1 == cookie)
    }
}

/// What a watch reports.
#[derive(Debug)]
pub enum WatchEvent {
    /// A notification: already acknowledged with the reply the handler chose, or, when
    /// it chose [`Reply::Later`], to be acknowledged through `ack`.
    Notify {
        notifier_id: u64,
        data: Vec<u8>,
        ack: Option<PendingAck>,
    },
    /// The watch was lost (e.g. -ENOTCONN after an OSD connection reset); re-watch.
    Error { cookie: u64, err: i32 },
}

/// How a notification is acknowledged.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    /// At once, with this payload.
    Now(Vec<u8>),
    /// Later, by whoever handles the event, through its [`PendingAck`]: for an answer that
    /// takes long to find (a quiesce hook), which must not hold librados' callback thread
    /// and with it every other notification.
    Later,
}

/// Chooses how to acknowledge a notification: called on librados' callback thread, so it
/// must be quick and must not block.
pub type NotifyReplier = Box<dyn Fn(u64, &[u8]) -> Reply + Send + Sync>;

/// The acknowledgement a notification still owes its notifier ([`Reply::Later`]).
/// Dropped unsent, the notifier gets no answer from us and sees a timeout, which is what
/// a watcher that could not answer should give.
pub struct PendingAck {
    io: Arc<IoCtx>,
    oid: CString,
    notify_id: u64,
    handle: u64,
}

impl std::fmt::Debug for PendingAck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PendingAck(notify {})", self.notify_id)
    }
}

impl PendingAck {
    /// Acknowledges with `reply`. rados_notify_ack only queues a message; it does not
    /// wait for the OSD.
    pub fn send(self, reply: &[u8]) {
        send_ack(&self.io, &self.oid, self.notify_id, self.handle, reply);
    }
}

fn send_ack(io: &IoCtx, oid: &CString, notify_id: u64, handle: u64, reply: &[u8]) {
    let len = c_int::try_from(reply.len()).unwrap_or(0);
    // SAFETY: the pool handle lives as long as `io`; the buffers outlive the call.
    unsafe {
        rados_notify_ack(
            io.h,
            oid.as_ptr(),
            notify_id,
            handle,
            reply.as_ptr() as *const c_char,
            len,
        )
    };
}

struct WatchCtx {
    /// Keeps the pool handle alive as long as a callback may use it, even if the owner of
    /// the watch forgets to unwatch.
    io: Arc<IoCtx>,
    oid: CString,
    reply: NotifyReplier,
    tx: mpsc::UnboundedSender<WatchEvent>,
}

unsafe extern "C" fn on_watch_notify(
    arg: *mut c_void,
    notify_id: u64,
    handle: u64,
    notifier_id: u64,
    data: *mut c_void,
    data_len: usize,
) {
    // SAFETY: `arg` is the WatchCtx owned by the Watch, which outlives the watch (it is only
    // freed after unwatch and a watch flush).
    let ctx = unsafe { &*(arg as *const WatchCtx) };
    let payload = if data.is_null() || data_len == 0 {
        Vec::new()
    } else {
        unsafe { std::slice::from_raw_parts(data as *const u8, data_len) }.to_vec()
    };
    // Every notify must be acknowledged, or the notifier waits for its timeout: now, or
    // by the event's handler.
    let ack = match (ctx.reply)(notifier_id, &payload) {
        Reply::Now(reply) => {
            send_ack(&ctx.io, &ctx.oid, notify_id, handle, &reply);
            None
        }
        Reply::Later => Some(PendingAck {
            io: ctx.io.clone(),
            oid: ctx.oid.clone(),
            notify_id,
            handle,
        }),
    };
    let _ = ctx.tx.send(WatchEvent::Notify {
        notifier_id,
        data: payload,
        ack,
    });
}

unsafe extern "C" fn on_watch_error(arg: *mut c_void, cookie: u64, err: c_int) {
    let ctx = unsafe { &*(arg as *const WatchCtx) };
    let _ = ctx.tx.send(WatchEvent::Error { cookie, err });
}

/// A registered watch. Call [`IoCtx::unwatch`] to end it; dropping it without unwatching
/// leaks its context on purpose (librados may still call back into it).
pub struct Watch {
    pub cookie: u64,
    ctx: *mut WatchCtx,
}

unsafe impl Send for Watch {}
unsafe impl Sync for Watch {}

impl IoCtx {
    /// Registers a watch on `oid`. `reply` picks the ack payload of each notification (on
    /// librados' thread); events are also sent to `tx` for slower follow-up work.
    pub async fn watch(
        self: &Arc<Self>,
        oid: &str,
        reply: NotifyReplier,
        tx: mpsc::UnboundedSender<WatchEvent>,
    ) -> Result<Watch> {
        let ctxp = Box::into_raw(Box::new(WatchCtx {
            io: self.clone(),
            oid: cstring("object name", oid)?,
            reply,
            tx,
        })) as usize;
        let io = self.h as usize;
        let (r, keep) = aio(Keep(0u64), |k, c| unsafe {
            rados_aio_watch2(
                io as rados_ioctx_t,
                (*(ctxp as *const WatchCtx)).oid.as_ptr(),
                c,
                &mut (*k).0,
                Some(on_watch_notify),
                Some(on_watch_error),
                0,
                ctxp as *mut c_void,
            )
        })
        .await;
        if r < 0 {
            // A failed watch registers nothing that could call back; free the context.
            drop(unsafe { Box::from_raw(ctxp as *mut WatchCtx) });
            return Err(rados_error("watch", oid, r));
        }
        let cookie = keep.map(|k| k.0).unwrap_or(0);
        Ok(Watch {
            cookie,
            ctx: ctxp as *mut WatchCtx,
        })
    }

    /// Ends a watch and frees its context once no callback can still be running.
    pub async fn unwatch(&self, w: Watch) -> Result<()> {
        let io = self.h as usize;
        let cookie = w.cookie;
        let (r, _) = aio(Keep(()), |_, c| unsafe {
            rados_aio_unwatch(io as rados_ioctx_t, cookie, c)
        })
        .await;
        let flushed = self.cluster.watch_flush().await;
        // After the flush no callback holds the context any more.
        drop(unsafe { Box::from_raw(w.ctx) });
        if r < 0 && r != -ENOENT && r != -ENOTCONN {
            return Err(rados_error("unwatch", &format!("cookie {cookie}"), r));
        }
        flushed
    }

    /// Sends a notification to every watcher of `oid` and collects the answers. A watcher
    /// that does not ack within `timeout_ms` is listed in `timeouts` (the call then
    /// returns -ETIMEDOUT in librados; that is not an error here).
    pub async fn notify(&self, oid: &str, payload: &[u8], timeout_ms: u64) -> Result<NotifyReply> {
        let coid = cstring("object name", oid)?;
        let io = self.h as usize;
        struct Out {
            oid: CString,
            payload: Vec<u8>,
            reply: RadosBuf,
        }
        let plen = c_int::try_from(payload.len())
            .map_err(|_| Error::new(ErrorKind::InvalidInput, "notify payload too large"))?;
        let keep = Keep(Out {
            oid: coid,
            payload: payload.to_vec(),
            reply: RadosBuf::new(),
        });
        let (r, keep) = aio(keep, |k, c| unsafe {
            let o = &mut (*k).0;
            rados_aio_notify(
                io as rados_ioctx_t,
                o.oid.as_ptr(),
                c,
                o.payload.as_ptr() as *const c_char,
                plen,
                timeout_ms,
                &mut o.reply.ptr,
                &mut o.reply.len,
            )
        })
        .await;
        if r < 0 && r != -ETIMEDOUT {
            return Err(rados_error("notify", oid, r));
        }
        let k = keep.ok_or_else(|| rados_error("notify", oid, -ETIMEDOUT))?;
        if k.0.reply.ptr.is_null() {
            return Ok(NotifyReply::default());
        }
        NotifyReply::parse(k.0.reply.as_slice()).map_err(|e| e.context(format!("notify {oid}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_reply_parses_acks_and_timeouts() {
        let mut b = Vec::new();
        b.extend_from_slice(&2u32.to_le_bytes());
        b.extend_from_slice(&4100u64.to_le_bytes());
        b.extend_from_slice(&77u64.to_le_bytes());
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(b"abc");
        b.extend_from_slice(&4101u64.to_le_bytes());
        b.extend_from_slice(&78u64.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&1u32.to_le_bytes());
        b.extend_from_slice(&4102u64.to_le_bytes());
        b.extend_from_slice(&79u64.to_le_bytes());
        let r = NotifyReply::parse(&b).unwrap();
        assert_eq!(
            r.acks,
            vec![(4100, 77, b"abc".to_vec()), (4101, 78, Vec::new())]
        );
        assert_eq!(r.timeouts, vec![(4102, 79)]);
        assert!(r.has_watcher(4102, 79));
        assert!(r.has_watcher(4100, 77));
        assert!(!r.has_watcher(4100, 79));
        assert!(NotifyReply::parse(&b[..b.len() - 1]).is_err());
    }
}
