//! librados' `sparse_read` (C++ API only) through our C shim sparse_read.cc, asynchronous
//! through `shim::call` (which also says why dropping the future early is safe).

#![allow(non_camel_case_types)]

use super::rados::IoCtx;
use super::shim::{self, rnbd_done_t, ShimOut};
use crate::error::{Error, ErrorKind, Result};
use bytes::Bytes;
use std::ffi::{c_char, c_int, c_void};

#[repr(C)]
struct rnbd_sparse {
    _opaque: [u8; 0],
}

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

impl ShimOut<rnbd_sparse> {
    /// The extents read, each (offset in the object, its bytes); None when the answer
    /// does not add up (extents out of order or outside `[lo, hi)`, or not as long as
    /// the data).
    fn extents(&self, lo: u64, hi: u64) -> Option<Vec<(u64, Bytes)>> {
        let s = self.get();
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

/// The allocated extents of `len` bytes at `off` of `oid` (at `io`'s read snapshot), each
/// (offset in the object, its bytes), ascending; `None` when the object does not exist.
pub async fn sparse_read(
    io: &IoCtx,
    oid: &str,
    off: u64,
    len: u64,
) -> Result<Option<Vec<(u64, Bytes)>>> {
    // SAFETY: rnbd_aio_sparse_read calls `done` once exactly when it returns >= 0 and
    // writes only into its result object; `io` outlives the call and in-flight
    // operations hold their own reference on the handle.
    let out = unsafe {
        shim::call(
            "sparse-read",
            oid,
            rnbd_sparse_new,
            rnbd_sparse_free,
            |name, res, done, arg| rnbd_aio_sparse_read(io.raw(), name, off, len, res, done, arg),
        )
        .await?
    };
    let Some(out) = out else { return Ok(None) };
    out.extents(off, off.saturating_add(len))
        .map(Some)
        .ok_or_else(|| {
            Error::new(
                ErrorKind::Corrupt,
                format!("sparse-read of {oid}: the OSD's extents do not match its data"),
            )
        })
}
