//! One asynchronous call into our C++ shims (list_snaps.cc, sparse_read.cc, read.cc:
//! librados operations its C API lacks or does only with a copy), awaited from tokio.
//!
//! Each shim call fills a result object the shim allocates and frees, and calls back once
//! with the operation's return code. Memory safety follows rados.rs: the result object,
//! the object name and the oneshot sender live in a heap slot whose ownership passes to
//! the callback, so dropping the future early never frees memory librados still writes
//! to (the callback then frees it, after librados is done).

#![allow(non_camel_case_types)]

use super::rados::rados_error;
use crate::error::{Error, ErrorKind, Result};
use std::ffi::{c_char, c_int, c_void, CString};
use std::sync::OnceLock;
use tokio::sync::oneshot;

/// The shims' completion callback: (its argument, the operation's return code).
pub type rnbd_done_t = unsafe extern "C" fn(*mut c_void, c_int);

const ENOENT: i32 = 2;
const ENOMEM: i32 = 12;
const ETIMEDOUT: i32 = 110;

/// A shim's result object, freed by the shim's own function when dropped.
pub struct ShimOut<T> {
    ptr: *mut T,
    free: unsafe extern "C" fn(*mut T),
}

// SAFETY: plain heap data; one thread at a time touches it (librados until the callback,
// then whoever receives it).
unsafe impl<T> Send for ShimOut<T> {}

impl<T> Drop for ShimOut<T> {
    fn drop(&mut self) {
        // SAFETY: allocated by the shim's constructor, freed once, after the operation
        // completed (or was never submitted).
        unsafe { (self.free)(self.ptr) }
    }
}

impl<T> ShimOut<T> {
    /// The result object, for the shim's accessors; valid while `self` lives.
    pub fn get(&self) -> *const T {
        self.ptr
    }
}

struct Slot<T> {
    out: ShimOut<T>,
    oid: CString,
    tx: oneshot::Sender<(i32, ShimOut<T>)>,
}

unsafe extern "C" fn on_done<T>(arg: *mut c_void, r: c_int) {
    // SAFETY: `arg` is the Box<Slot<T>> leaked by `call` for this operation; the shim
    // calls back exactly once, so we are its only owner now.
    let slot = unsafe { Box::from_raw(arg as *mut Slot<T>) };
    // The name goes with the slot: librados is done with it.
    let Slot { out, tx, .. } = *slot;
    // When the future was dropped, `out` is dropped (freed) here, after librados is done.
    let mut send = Some((tx, out));
    let mut deliver = || {
        if let Some((tx, out)) = send.take() {
            let _ = tx.send((r, out));
        }
    };
    match DELIVER.get() {
        Some(hook) => hook(&mut deliver),
        None => deliver(),
    }
}

/// How a completion reaches the task awaiting it, if the server says (see
/// [`set_completion_hook`]).
static DELIVER: OnceLock<fn(&mut dyn FnMut())> = OnceLock::new();

/// Has every completion of the shim's operations delivered through `hook`, which calls
/// its argument once. The NBD server installs its `inline::completing`, under which a read
/// may finish on this librados thread and send its reply from here instead of handing it
/// to two more threads first. What that needs of us holds here: no lock of ours is held
/// while delivering, and the request's rest never blocks on another librados completion
/// (every wait for one is an await). The first hook installed stays.
pub fn set_completion_hook(hook: fn(&mut dyn FnMut())) {
    let _ = DELIVER.set(hook);
}

/// Runs one shim operation on object `oid` (`what` names it in errors, e.g. "sparse-read"):
/// `new` and `free` are the shim's constructor and destructor of its result object, and
/// `start` submits the operation given the object's name, the result object, the callback
/// and the callback's argument, returning the shim's code (negative: not submitted).
/// `Ok(None)` when the object does not exist; the filled result object otherwise.
///
/// # Safety
/// `start` must pass the callback and its argument to an operation that calls it exactly
/// once when it returns a code >= 0 and never when it returns < 0, and must only write
/// into the result object until then.
pub async unsafe fn call<T>(
    what: &str,
    oid: &str,
    new: unsafe extern "C" fn() -> *mut T,
    free: unsafe extern "C" fn(*mut T),
    start: impl FnOnce(*const c_char, *mut T, rnbd_done_t, *mut c_void) -> c_int,
) -> Result<Option<ShimOut<T>>> {
    let coid = CString::new(oid).map_err(|_| {
        Error::new(
            ErrorKind::InvalidInput,
            format!("object name {oid:?} contains a NUL byte"),
        )
    })?;
    // SAFETY: a plain constructor.
    let ptr = unsafe { new() };
    if ptr.is_null() {
        return Err(rados_error(what, oid, -ENOMEM));
    }
    let (tx, rx) = oneshot::channel();
    let raw = Box::into_raw(Box::new(Slot {
        out: ShimOut { ptr, free },
        oid: coid,
        tx,
    }));
    // SAFETY: `raw` is a live slot; the name and the result object it holds stay where
    // they are until the callback frees the slot.
    let (name, res) = unsafe { ((*raw).oid.as_ptr(), (*raw).out.ptr) };
    let r = start(name, res, on_done::<T>, raw as *mut c_void);
    if r < 0 {
        // Not submitted: the callback will never run.
        drop(unsafe { Box::from_raw(raw) });
        return Err(rados_error(what, oid, r));
    }
    let (r, out) = rx
        .await
        // The callback is dropped uncalled only if the cluster handle shuts down under us.
        .map_err(|_| rados_error(what, oid, -ETIMEDOUT))?;
    match r {
        r if r == -ENOENT => Ok(None),
        r if r < 0 => Err(rados_error(what, oid, r)),
        _ => Ok(Some(out)),
    }
}
