//! Completions turned into futures: each asynchronous librados call gets a completion
//! whose callback hands the result, and the memory librados wrote to, to a oneshot channel.

use super::error::rados_error;
use super::ffi::{
    rados_aio_create_completion2, rados_aio_get_return_value, rados_aio_release, rados_buffer_free,
    rados_completion_t,
};
use crate::error::Result;
use libc::ETIMEDOUT;
use std::ffi::{c_char, c_int, c_void};
use std::ptr::null_mut;
use tokio::sync::oneshot;

struct Slot<K> {
    keep: K,
    tx: oneshot::Sender<(i32, K)>,
}

/// Asynchronous librados operations submitted and not yet called back, process-wide.
/// `Rados::drop` waits (bounded) for them to come back before `rados_shutdown`: shutting
/// the cluster handle down with an operation still out lets its reply reach a torn-down
/// dispatcher, a SIGSEGV in a messenger thread (seen after `rados-nbd resize` returned
/// while the lock-acquired notify it had sent was still waiting for its acks).
pub(super) static IN_FLIGHT: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(0);

/// The longest `Rados::drop` waits for operations still out (a notify lasts at most its
/// own timeout, 5 s for ours).
pub(super) const SHUTDOWN_DRAIN: std::time::Duration = std::time::Duration::from_secs(10);

pub(super) fn in_flight() -> usize {
    IN_FLIGHT.load(std::sync::atomic::Ordering::Acquire)
}

unsafe extern "C" fn on_complete<K: Send + 'static>(c: rados_completion_t, arg: *mut c_void) {
    // SAFETY: `arg` is the Box<Slot<K>> leaked by `aio` for exactly this completion; the
    // callback runs once, so we are its only owner now.
    let slot = unsafe { Box::from_raw(arg as *mut Slot<K>) };
    IN_FLIGHT.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    let r = unsafe { rados_aio_get_return_value(c) };
    // The callback holds its own reference on the completion, so releasing ours here is
    // allowed (librados' CB_AioComplete takes a reference for the duration of the call).
    unsafe { rados_aio_release(c) };
    let Slot { keep, tx } = *slot;
    // When the future was dropped, `keep` is dropped here, after librados is done with it.
    let _ = tx.send((r, keep));
}

/// Runs one asynchronous librados call. `keep` holds everything librados may touch until
/// completion; `start` gets a pointer to it (stable: it lives in a heap slot) and the
/// completion, and returns the librados submit result.
pub(super) async fn aio<K, F>(keep: K, start: F) -> (i32, Option<K>)
where
    K: Send + 'static,
    F: FnOnce(*mut K, rados_completion_t) -> c_int,
{
    // Submission is synchronous and keeps its raw pointers out of the future's state.
    let rx = match submit(keep, start) {
        Ok(rx) => rx,
        Err((r, keep)) => return (r, Some(keep)),
    };
    match rx.await {
        Ok((r, keep)) => (r, Some(keep)),
        // The sender is only dropped without sending if librados drops the completion
        // without calling back (cluster shut down under us).
        Err(_) => (-ETIMEDOUT, None),
    }
}

#[allow(clippy::type_complexity)]
fn submit<K, F>(keep: K, start: F) -> std::result::Result<oneshot::Receiver<(i32, K)>, (i32, K)>
where
    K: Send + 'static,
    F: FnOnce(*mut K, rados_completion_t) -> c_int,
{
    let (tx, rx) = oneshot::channel();
    let raw = Box::into_raw(Box::new(Slot { keep, tx }));
    let mut c: rados_completion_t = null_mut();
    // SAFETY: plain constructor; `raw` stays valid until the callback runs.
    let r =
        unsafe { rados_aio_create_completion2(raw as *mut c_void, Some(on_complete::<K>), &mut c) };
    if r < 0 {
        // SAFETY: no completion exists, so nobody else owns the slot.
        let slot = unsafe { Box::from_raw(raw) };
        return Err((r, slot.keep));
    }
    // SAFETY: `raw` points to a live slot; only the field address is taken.
    let keep_ptr = unsafe { std::ptr::addr_of_mut!((*raw).keep) };
    // Counted before submission: the callback may run (and count down) before `start`
    // returns.
    IN_FLIGHT.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    let r = start(keep_ptr, c);
    if r < 0 {
        IN_FLIGHT.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        // Submission failed synchronously: the callback will never run.
        unsafe { rados_aio_release(c) };
        let slot = unsafe { Box::from_raw(raw) };
        return Err((r, slot.keep));
    }
    Ok(rx)
}

/// What a call kept, once it completed: a negative `r` is the error of `what` on `oid`, and
/// no slot back (the cluster shut down under the call) a timeout.
pub(super) fn completed<K>(r: i32, keep: Option<K>, what: &str, oid: &str) -> Result<K> {
    if r < 0 {
        return Err(rados_error(what, oid, r));
    }
    keep.ok_or_else(|| rados_error(what, oid, -ETIMEDOUT))
}

/// An output buffer librados allocates for a call (a class method's output, a notify's
/// replies): it fills `ptr` and `len` at completion; freed with `rados_buffer_free` when
/// dropped.
pub(super) struct RadosBuf {
    pub(super) ptr: *mut c_char,
    pub(super) len: usize,
}

impl RadosBuf {
    pub(super) fn new() -> Self {
        RadosBuf {
            ptr: null_mut(),
            len: 0,
        }
    }

    /// The bytes librados put there (none before the call completed).
    pub(super) fn as_slice(&self) -> &[u8] {
        if self.ptr.is_null() || self.len == 0 {
            return &[];
        }
        // SAFETY: librados allocated `len` bytes at `ptr`, freed only when `self` drops.
        unsafe { std::slice::from_raw_parts(self.ptr as *const u8, self.len) }
    }
}

impl Drop for RadosBuf {
    fn drop(&mut self) {
        if !self.ptr.is_null() {
            unsafe { rados_buffer_free(self.ptr) }
        }
    }
}

pub(super) struct Keep<T>(pub(super) T);
unsafe impl<T> Send for Keep<T> {}
