//! Data reads whose bytes are librados' reply buffer itself, through our C++ shim read.cc
//! (which says why: the C API copies every byte read), asynchronous through `shim::call`
//! (which also says why dropping the future early is safe). The shim's result object owns
//! the buffer; the `Bytes` returned owns the result object, so the NBD reply is written
//! from where the messenger received the data.

#![allow(non_camel_case_types)]

use super::rados::IoCtx;
use super::shim::{self, rnbd_done_t, ShimOut};
use crate::error::{Error, ErrorKind, Result};
use bytes::Bytes;
use std::ffi::{c_char, c_int, c_void};

#[repr(C)]
struct rnbd_read {
    _opaque: [u8; 0],
}

extern "C" {
    fn rnbd_read_new() -> *mut rnbd_read;
    fn rnbd_read_free(s: *mut rnbd_read);
    fn rnbd_aio_read(
        io: *mut c_void,
        oid: *const c_char,
        off: u64,
        len: u64,
        s: *mut rnbd_read,
        done: rnbd_done_t,
        arg: *mut c_void,
    ) -> c_int;
    fn rnbd_read_data(s: *const rnbd_read) -> *const c_char;
    fn rnbd_read_len(s: *const rnbd_read) -> usize;
}

/// A completed read's result object, as the owner of its bytes.
struct Reply {
    /// Held for its bytes only: dropping it frees them.
    _out: ShimOut<rnbd_read>,
    data: *const u8,
    len: usize,
}

// SAFETY: the bytes are immutable after completion and owned by `_out` (Send); nothing
// else refers to them.
unsafe impl Send for Reply {}

impl AsRef<[u8]> for Reply {
    fn as_ref(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: `data` points at `len` bytes held by the result object `_out`, which
        // lives (unchanged) as long as `self`.
        unsafe { std::slice::from_raw_parts(self.data, self.len) }
    }
}

/// Reads up to `len` bytes at `off` of `oid` (at `io`'s read snapshot); fewer at the
/// object's end; `None` when the object does not exist.
pub async fn read(io: &IoCtx, oid: &str, off: u64, len: u64) -> Result<Option<Bytes>> {
    if len == 0 {
        // The shim refuses a length of 0 (librados: "to the end"); the plain read knows.
        return Ok(io.read(oid, off, 0).await?.map(Bytes::from));
    }
    // SAFETY: rnbd_aio_read calls `done` once exactly when it returns >= 0 and writes only
    // into its result object; `io` outlives the call and in-flight operations hold their
    // own reference on the handle.
    let out = unsafe {
        shim::call(
            "read",
            oid,
            rnbd_read_new,
            rnbd_read_free,
            |name, res, done, arg| rnbd_aio_read(io.raw(), name, off, len, res, done, arg),
        )
        .await?
    };
    let Some(out) = out else { return Ok(None) };
    // SAFETY: the read completed successfully, so the accessors read a filled result.
    let (data, n) = unsafe { (rnbd_read_data(out.get()), rnbd_read_len(out.get())) };
    if n as u64 > len || (n > 0 && data.is_null()) {
        return Err(Error::new(
            ErrorKind::Corrupt,
            format!("read of {oid}: the OSD answered {n} bytes to a read of {len}"),
        ));
    }
    Ok(Some(Bytes::from_owner(Reply {
        _out: out,
        data: data as *const u8,
        len: n,
    })))
}
