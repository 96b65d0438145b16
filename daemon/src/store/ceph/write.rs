//! Data writes sent from the request's own buffer, through our C++ shim write.cc (which
//! says why: the C API copies every byte written).
//!
//! librados sends such bytes from where they are, so they must stay valid until it drops
//! its last reference to them, which is not always by the time the write completes (a
//! cancelled operation's message can still be queued on a connection). The bytes (a
//! `Bytes` clone: the buffer cannot be reused while it lives) go with the shim's object
//! into a heap slot whose ownership passes to the completion callback, as in shim.rs, so
//! dropping the future early frees nothing. At completion the callback asks the shim
//! whether librados still holds a reference; if it does, the bytes are parked in `HELD`
//! and freed by a later completion that finds them released.

#![allow(non_camel_case_types)]

use super::rados::{rados_error, IoCtx};
use super::shim::rnbd_done_t;
use crate::error::{Error, ErrorKind, Result};
use bytes::Bytes;
use std::ffi::{c_char, c_int, c_void, CString};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use tokio::sync::oneshot;

const ENOMEM: i32 = 12;
const ETIMEDOUT: i32 = 110;

#[repr(C)]
struct rnbd_write {
    _opaque: [u8; 0],
}

extern "C" {
    fn rnbd_write_new() -> *mut rnbd_write;
    fn rnbd_write_free(s: *mut rnbd_write);
    #[allow(clippy::too_many_arguments)]
    fn rnbd_aio_write_nocopy(
        io: *mut c_void,
        oid: *const c_char,
        n: usize,
        offs: *const u64,
        bufs: *const *const c_char,
        lens: *const usize,
        hint: u64,
        s: *mut rnbd_write,
        done: rnbd_done_t,
        arg: *mut c_void,
    ) -> c_int;
    fn rnbd_write_released(s: *const rnbd_write) -> c_int;
}

/// The shim's object of one write and the bytes it sends; dropping it frees both, which
/// is only done once librados holds no reference to the bytes (or never had one).
struct Held {
    s: *mut rnbd_write,
    _data: Vec<Bytes>,
}

// SAFETY: plain heap data; one thread at a time touches it (librados until the callback,
// then whoever holds it).
unsafe impl Send for Held {}

impl Held {
    fn released(&self) -> bool {
        // SAFETY: `s` is live until drop; the check reads an atomic reference count.
        unsafe { rnbd_write_released(self.s) != 0 }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        // SAFETY: allocated by rnbd_write_new, freed once; the bytes go after it.
        unsafe { rnbd_write_free(self.s) }
    }
}

/// Writes that completed while librados still referenced their bytes.
static HELD: Mutex<Vec<Held>> = Mutex::new(Vec::new());
static HELD_COUNT: AtomicUsize = AtomicUsize::new(0);

/// How many completed writes' buffers are still parked.
#[cfg(test)]
pub fn held() -> usize {
    HELD_COUNT.load(Ordering::Relaxed)
}

/// Frees the parked buffers librados has let go of.
fn sweep() {
    if HELD_COUNT.load(Ordering::Relaxed) == 0 {
        return;
    }
    let mut h = HELD.lock().unwrap_or_else(|p| p.into_inner());
    let before = h.len();
    h.retain(|x| !x.released());
    HELD_COUNT.store(h.len(), Ordering::Relaxed);
    if h.len() < before {
        tracing::debug!(
            freed = before - h.len(),
            still_held = h.len(),
            "librados let go of parked write buffers"
        );
    }
}

struct Slot {
    held: Held,
    oid: CString,
    tx: oneshot::Sender<i32>,
}

unsafe extern "C" fn on_done(arg: *mut c_void, r: c_int) {
    // SAFETY: `arg` is the Box<Slot> leaked by `write_nocopy` for this operation; the shim
    // calls back exactly once, so we are its only owner now.
    let slot = unsafe { Box::from_raw(arg as *mut Slot) };
    let Slot { held, tx, .. } = *slot;
    let _ = tx.send(r);
    if !held.released() {
        tracing::debug!(
            "a write completed (r = {r}) while librados still referenced its bytes: kept"
        );
        let mut h = HELD.lock().unwrap_or_else(|p| p.into_inner());
        h.push(held);
        HELD_COUNT.store(h.len(), Ordering::Relaxed);
    } else {
        drop(held);
    }
    sweep();
}

/// Hands librados, before returning, one operation on `oid` through `io` (with its write
/// snapshot context) that does `set_alloc_hint(hint, hint)` and writes each of `extents`
/// (sorted by offset, not overlapping), without copying their bytes; the future it returns
/// resolves when the operation completes. Started here rather than at the first poll:
/// RADOS applies one client's operations on an object in the order they were handed to
/// it, and merge.rs relies on that order.
pub fn start_write(
    io: &IoCtx,
    oid: &str,
    extents: Vec<(u64, Bytes)>,
    hint: u64,
) -> Result<impl std::future::Future<Output = Result<()>> + Send + 'static> {
    let coid = CString::new(oid).map_err(|_| {
        Error::new(
            ErrorKind::InvalidInput,
            format!("object name {oid:?} contains a NUL byte"),
        )
    })?;
    // SAFETY: a plain constructor.
    let s = unsafe { rnbd_write_new() };
    if s.is_null() {
        return Err(rados_error("write", oid, -ENOMEM));
    }
    let offs: Vec<u64> = extents.iter().map(|e| e.0).collect();
    let lens: Vec<usize> = extents.iter().map(|e| e.1.len()).collect();
    let bufs: Vec<*const c_char> = extents
        .iter()
        .map(|e| e.1.as_ptr() as *const c_char)
        .collect();
    let (tx, rx) = oneshot::channel();
    // The slot owns the bytes (`Bytes` clones share them: the pointers above stay valid).
    let raw = Box::into_raw(Box::new(Slot {
        held: Held {
            s,
            _data: extents.into_iter().map(|e| e.1).collect(),
        },
        oid: coid,
        tx,
    }));
    // SAFETY: `raw` is a live slot; the name, the shim's object and the bytes it holds stay
    // where they are until the callback takes the slot (and the bytes until released).
    // Only raw pointers are taken: the callback may free the slot before the call returns.
    // The pointer arrays are read during the call only.
    let (name, s) = unsafe { ((*raw).oid.as_ptr(), (*raw).held.s) };
    let submitting = io.submitting();
    let r = unsafe {
        rnbd_aio_write_nocopy(
            io.raw(),
            name,
            offs.len(),
            offs.as_ptr(),
            bufs.as_ptr(),
            lens.as_ptr(),
            hint,
            s,
            on_done,
            raw as *mut c_void,
        )
    };
    drop(submitting);
    if r < 0 {
        // Not submitted: the callback will never run, and the operation that referenced
        // the bytes is gone with the shim's call.
        drop(unsafe { Box::from_raw(raw) });
        return Err(rados_error("write", oid, r));
    }
    let oid = oid.to_string();
    Ok(async move {
        let r = rx
            .await
            // The callback is dropped uncalled only if the cluster handle shuts down under us.
            .map_err(|_| rados_error("write", &oid, -ETIMEDOUT))?;
        if r < 0 {
            return Err(rados_error("write", &oid, r));
        }
        Ok(())
    })
}
