//! librados' `sparse_read` (C++ API only) through our C shim sparse_read.cc, asynchronous
//! like snaps.rs: the shim's completion hands the result to a tokio oneshot, and the
//! result and the object name live in a heap slot that the callback owns, so dropping the
//! future early never frees memory librados still writes to.

#![allow(non_camel_case_types)]

use super::rados::{rados_error, IoCtx};
use crate::error::{Error, ErrorKind, Result};
use bytes::Bytes;
use std::ffi::{c_char, c_int, c_void, CString};
use tokio::sync::oneshot;

#[repr(C)]
struct rnbd_sparse {
    _opaque: [u8; 0],
}
type rnbd_done_t = unsafe extern "C" fn(*mut c_void, c_int);

extern "C" {
    fn rnbd_sparse_new() -> *mut rnbd_sparse;
    fn rnbd_sparse_free(s: *mut rnbd_sparse);
    fn rnbd_aio_sparse_read(
        io: *mut c_void,
        oid: *const c_char,
        off: u64,
        len: u64,
        s: *mut rnbd_sparse,
        done: rnbd_done_t,
        arg: *mut c_void,
    ) -> c_int;
    fn rnbd_sparse_extents(s: *const rnbd_sparse) -> usize;
    fn rnbd_sparse_extent(s: *const rnbd_sparse, i: usize, off: *mut u64, len: *mut u64);
    fn rnbd_sparse_data_len(s: *const rnbd_sparse) -> usize;
    fn rnbd_sparse_copy_data(s: *const rnbd_sparse, out: *mut c_char);
}

const ENOENT: i32 = 2;
const ENOMEM: i32 = 12;
const ETIMEDOUT: i32 = 110;

struct Out {
    s: *mut rnbd_sparse,
    oid: CString,
}
// SAFETY: plain heap data; one thread at a time touches it (librados until the callback,
// then whoever receives it).
unsafe impl Send for Out {}
impl Drop for Out {
    fn drop(&mut self) {
        // SAFETY: allocated by rnbd_sparse_new, freed once, after the operation completed
        // (or was never submitted).
        unsafe { rnbd_sparse_free(self.s) }
    }
}

impl Out {
    /// The extents read, each (offset in the object, its bytes); None when the answer
    /// does not add up (extents out of order or outside `[lo, hi)`, or not as long as
    /// the data).
    fn extents(&self, lo: u64, hi: u64) -> Option<Vec<(u64, Bytes)>> {
        let s = self.s as *const rnbd_sparse;
        // SAFETY: the operation completed successfully, so the result is filled in; the
        // data is copied out into a buffer of exactly its length.
        let (ext, data) = unsafe {
            let ext: Vec<(u64, u64)> = (0..rnbd_sparse_extents(s))
                .map(|i| {
                    let (mut off, mut len) = (0u64, 0u64);
                    rnbd_sparse_extent(s, i, &mut off, &mut len);
                    (off, len)
                })
                .collect();
            let n = rnbd_sparse_data_len(s);
            let mut data = vec![0u8; n];
            if n > 0 {
                rnbd_sparse_copy_data(s, data.as_mut_ptr() as *mut c_char);
            }
            (ext, Bytes::from(data))
        };
        let mut out = Vec::with_capacity(ext.len());
        let (mut at, mut end) = (0usize, lo);
        for (off, len) in ext {
            let n = usize::try_from(len).ok()?;
            if off < end || off.checked_add(len)? > hi || at.checked_add(n)? > data.len() {
                return None;
            }
            out.push((off, data.slice(at..at + n)));
            at += n;
            end = off + len;
        }
        (at == data.len()).then_some(out)
    }
}

struct Slot {
    out: Out,
    tx: oneshot::Sender<(i32, Out)>,
}

unsafe extern "C" fn on_done(arg: *mut c_void, r: c_int) {
    // SAFETY: `arg` is the Box<Slot> leaked by `sparse_read` for this operation; the shim
    // calls back exactly once, so we are its only owner now.
    let slot = unsafe { Box::from_raw(arg as *mut Slot) };
    let Slot { out, tx } = *slot;
    let _ = tx.send((r, out));
}

/// The allocated extents of `len` bytes at `off` of `oid` (at `io`'s read snapshot), each
/// (offset in the object, its bytes), ascending; `None` when the object does not exist.
pub async fn sparse_read(
    io: &IoCtx,
    oid: &str,
    off: u64,
    len: u64,
) -> Result<Option<Vec<(u64, Bytes)>>> {
    let coid = CString::new(oid).map_err(|_| {
        Error::new(
            ErrorKind::InvalidInput,
            format!("object name {oid:?} contains a NUL byte"),
        )
    })?;
    // SAFETY: plain constructor.
    let s = unsafe { rnbd_sparse_new() };
    if s.is_null() {
        return Err(rados_error("sparse-read", oid, -ENOMEM));
    }
    let (tx, rx) = oneshot::channel();
    let raw = Box::into_raw(Box::new(Slot {
        out: Out { s, oid: coid },
        tx,
    }));
    // SAFETY: `raw` is a live slot; the name and the result it holds stay where they are
    // until the callback frees the slot; `io` outlives the call and in-flight operations
    // hold their own reference on the handle.
    let r = unsafe {
        rnbd_aio_sparse_read(
            io.raw(),
            (*raw).out.oid.as_ptr(),
            off,
            len,
            (*raw).out.s,
            on_done,
            raw as *mut c_void,
        )
    };
    if r < 0 {
        // Not submitted: the callback will never run.
        drop(unsafe { Box::from_raw(raw) });
        return Err(rados_error("sparse-read", oid, r));
    }
    let (r, out) = rx
        .await
        .map_err(|_| rados_error("sparse-read", oid, -ETIMEDOUT))?;
    if r == -ENOENT {
        return Ok(None);
    }
    if r < 0 {
        return Err(rados_error("sparse-read", oid, r));
    }
    out.extents(off, off.saturating_add(len))
        .map(Some)
        .ok_or_else(|| {
            Error::new(
                ErrorKind::Corrupt,
                format!("sparse-read of {oid}: the OSD's extents do not match its data"),
            )
        })
}
