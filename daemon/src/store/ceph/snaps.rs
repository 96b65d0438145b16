//! librados' `list_snaps` (C++ API only) through our C shim list_snaps.cc, asynchronous
//! like the rest of rados.rs: the shim's completion hands the result to a tokio oneshot.
//!
//! Memory safety follows rados.rs: the snap set and the object name live in a heap slot
//! whose ownership passes to the completion callback, so dropping the future early never
//! frees memory librados still writes to.

#![allow(non_camel_case_types)]

use super::rados::{rados_error, IoCtx};
use crate::error::{Error, ErrorKind, Result};
use crate::store::snapset::{CloneInfo, SnapSet};
use std::ffi::{c_char, c_int, c_void, CString};
use tokio::sync::oneshot;

/// librados' SNAP_DIR: the read snapshot at which `list_snaps` sees every clone, also of
/// an object removed from the head.
pub const SNAP_DIR: u64 = u64::MAX;

#[repr(C)]
struct rnbd_snaps {
    _opaque: [u8; 0],
}
type rnbd_done_t = unsafe extern "C" fn(*mut c_void, c_int);

// The shim is a static library built by build.rs (which also links librados and the C++
// runtime after it).
extern "C" {
    fn rnbd_snaps_new() -> *mut rnbd_snaps;
    fn rnbd_snaps_free(s: *mut rnbd_snaps);
    fn rnbd_aio_list_snaps(
        io: *mut c_void,
        oid: *const c_char,
        s: *mut rnbd_snaps,
        done: rnbd_done_t,
        arg: *mut c_void,
    ) -> c_int;
    fn rnbd_snaps_seq(s: *const rnbd_snaps) -> u64;
    fn rnbd_snaps_clones(s: *const rnbd_snaps) -> usize;
    fn rnbd_snaps_clone(
        s: *const rnbd_snaps,
        i: usize,
        snaps: *mut *const u64,
        nsnaps: *mut usize,
    ) -> u64;
    fn rnbd_snaps_clone_size(s: *const rnbd_snaps, i: usize, noverlap: *mut usize) -> u64;
    fn rnbd_snaps_overlap(s: *const rnbd_snaps, i: usize, j: usize, off: *mut u64, len: *mut u64);
}

const ENOENT: i32 = 2;
const ENOMEM: i32 = 12;
const ETIMEDOUT: i32 = 110;

/// What librados writes into until the callback: the snap set and the object name.
struct Out {
    snaps: *mut rnbd_snaps,
    oid: CString,
}
// SAFETY: plain heap data; only one thread touches it at a time (librados until the
// callback, then whoever receives it).
unsafe impl Send for Out {}
impl Drop for Out {
    fn drop(&mut self) {
        // SAFETY: allocated by rnbd_snaps_new, freed once, after the operation completed
        // (or was never submitted).
        unsafe { rnbd_snaps_free(self.snaps) }
    }
}

impl Out {
    fn snap_set(&self) -> SnapSet {
        let s = self.snaps as *const rnbd_snaps;
        // SAFETY: the operation completed successfully, so the set is filled in; the
        // pointers returned stay valid while `self` lives and are copied out here.
        unsafe {
            let clones = (0..rnbd_snaps_clones(s))
                .map(|i| {
                    let (mut p, mut n) = (std::ptr::null(), 0usize);
                    let id = rnbd_snaps_clone(s, i, &mut p, &mut n);
                    let snaps = if n == 0 {
                        Vec::new()
                    } else {
                        std::slice::from_raw_parts(p, n).to_vec()
                    };
                    let mut n = 0usize;
                    let size = rnbd_snaps_clone_size(s, i, &mut n);
                    let overlap = (0..n)
                        .map(|j| {
                            let (mut off, mut len) = (0u64, 0u64);
                            rnbd_snaps_overlap(s, i, j, &mut off, &mut len);
                            (off, len)
                        })
                        .collect();
                    CloneInfo {
                        id,
                        snaps,
                        size,
                        overlap,
                    }
                })
                .collect();
            SnapSet {
                seq: rnbd_snaps_seq(s),
                clones,
            }
        }
    }
}

struct Slot {
    out: Out,
    tx: oneshot::Sender<(i32, Out)>,
}

unsafe extern "C" fn on_done(arg: *mut c_void, r: c_int) {
    // SAFETY: `arg` is the Box<Slot> leaked by `submit` for this operation; the shim calls
    // back exactly once, so we are its only owner now.
    let slot = unsafe { Box::from_raw(arg as *mut Slot) };
    let Slot { out, tx } = *slot;
    // When the future was dropped, `out` is dropped (freed) here, after librados is done.
    let _ = tx.send((r, out));
}

fn submit(io: &IoCtx, oid: &str) -> Result<oneshot::Receiver<(i32, Out)>> {
    let coid = CString::new(oid).map_err(|_| {
        Error::new(
            ErrorKind::InvalidInput,
            format!("object name {oid:?} contains a NUL byte"),
        )
    })?;
    // SAFETY: plain constructor.
    let snaps = unsafe { rnbd_snaps_new() };
    if snaps.is_null() {
        return Err(rados_error("list snapshots of", oid, -ENOMEM));
    }
    let (tx, rx) = oneshot::channel();
    let raw = Box::into_raw(Box::new(Slot {
        out: Out { snaps, oid: coid },
        tx,
    }));
    // SAFETY: `raw` is a live slot; the name and the snap set it holds stay where they are
    // until the callback frees the slot; `io` outlives the call and in-flight operations
    // hold their own reference on the handle.
    let r = unsafe {
        rnbd_aio_list_snaps(
            io.raw(),
            (*raw).out.oid.as_ptr(),
            (*raw).out.snaps,
            on_done,
            raw as *mut c_void,
        )
    };
    if r < 0 {
        // Not submitted: the callback will never run.
        drop(unsafe { Box::from_raw(raw) });
        return Err(rados_error("list snapshots of", oid, r));
    }
    Ok(rx)
}

/// The snap set of `oid`: its clones and its head, `None` when the object does not exist
/// at all. `io` must read at [`SNAP_DIR`] (`IoCtx::at_snap(SNAP_DIR)`).
pub async fn list_snaps(io: &IoCtx, oid: &str) -> Result<Option<SnapSet>> {
    let rx = submit(io, oid)?;
    let (r, out) = rx
        .await
        // The callback is dropped uncalled only if the cluster handle shuts down under us.
        .map_err(|_| rados_error("list snapshots of", oid, -ETIMEDOUT))?;
    if r == -ENOENT {
        return Ok(None);
    }
    if r < 0 {
        return Err(rados_error("list snapshots of", oid, r));
    }
    Ok(Some(out.snap_set()))
}

/// How many `list_snaps` are in flight at once while rebuilding a map (what
/// `rbd_concurrent_management_ops` is for librbd, whose default is 10; our calls are
/// tiny reads).
const PARALLEL: usize = 32;

/// The snap sets of the data objects `objs` (`None`: no such object), in that order,
/// `PARALLEL` at a time.
pub async fn snap_sets(
    data: &IoCtx,
    object_prefix: &str,
    objs: Vec<u64>,
) -> Result<Vec<(u64, Option<SnapSet>)>> {
    use futures_util::stream::{self, StreamExt, TryStreamExt};
    let io = data.at_snap(SNAP_DIR)?;
    let io = &io;
    stream::iter(objs)
        .map(|objno| async move {
            let oid = format!("{object_prefix}.{objno:016x}");
            Ok::<_, Error>((objno, list_snaps(io, &oid).await?))
        })
        .buffered(PARALLEL)
        .try_collect()
        .await
}

/// The object map states (at snapshot `at`, [`SNAP_HEAD`](crate::store::snapset::SNAP_HEAD)
/// for the head) of the data objects `objs` (a pool listing: it also names objects that
/// only clones keep, whose head was removed since a snapshot) of an image with snapshots
/// `image_snaps` (any order). Objects that do not exist at `at` are left out. `what`
/// names the image in progress lines.
pub async fn object_states(
    meta: &IoCtx,
    object_prefix: &str,
    objs: Vec<u64>,
    at: u64,
    image_snaps: &[u64],
    fast_diff: bool,
    what: &str,
) -> Result<Vec<(u64, objmap::ObjectState)>> {
    use futures_util::stream::{self, StreamExt, TryStreamExt};
    let io = meta.at_snap(SNAP_DIR)?;
    let mut snaps = image_snaps.to_vec();
    snaps.sort_unstable();
    let mut progress = crate::progress::Progress::new(format!(
        "reading the snapshot sets of {} objects of {what}: objects done",
        objs.len()
    ));
    let io = &io;
    let mut states = stream::iter(objs)
        .map(|objno| async move {
            let oid = format!("{object_prefix}.{objno:016x}");
            Ok::<_, Error>((objno, list_snaps(io, &oid).await?))
        })
        .buffer_unordered(PARALLEL)
        .try_filter_map(|(objno, set)| {
            progress.tick();
            let state = set.map(|s| crate::store::snapset::object_state(&s, at, &snaps, fast_diff));
            async move {
                Ok(match state {
                    Some(st) if st != objmap::ObjectState::Nonexistent => Some((objno, st)),
                    _ => None,
                })
            }
        })
        .try_collect::<Vec<_>>()
        .await?;
    states.sort_unstable_by_key(|&(o, _)| o);
    Ok(states)
}
