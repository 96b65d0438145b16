//! librados' `list_snaps` (C++ API only) through our C shim list_snaps.cc, asynchronous
//! through `shim::call` (which also says why dropping the future early is safe).

#![allow(non_camel_case_types)]

use super::rados::IoCtx;
use super::shim::{self, rnbd_done_t, ShimOut};
use crate::error::{Error, Result};
use crate::store::snapset::{CloneInfo, SnapSet};
use std::ffi::{c_char, c_int, c_void};

/// librados' SNAP_DIR: the read snapshot at which `list_snaps` sees every clone, also of
/// an object removed from the head.
pub const SNAP_DIR: u64 = u64::MAX;

#[repr(C)]
struct rnbd_snaps {
    _opaque: [u8; 0],
}

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

impl ShimOut<rnbd_snaps> {
    fn snap_set(&self) -> SnapSet {
        let s = self.get();
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

/// The snap set of `oid`: its clones and its head, `None` when the object does not exist
/// at all. `io` must read at [`SNAP_DIR`] (`IoCtx::at_snap(SNAP_DIR)`).
pub async fn list_snaps(io: &IoCtx, oid: &str) -> Result<Option<SnapSet>> {
    // SAFETY: rnbd_aio_list_snaps calls `done` once exactly when it returns >= 0 and
    // writes only into its result object; `io` outlives the call and in-flight
    // operations hold their own reference on the handle.
    let out = unsafe {
        shim::call(
            "list snapshots of",
            oid,
            rnbd_snaps_new,
            rnbd_snaps_free,
            |name, res, done, arg| rnbd_aio_list_snaps(io.raw(), name, res, done, arg),
        )
        .await?
    };
    Ok(out.map(|o| o.snap_set()))
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
    data: &IoCtx,
    object_prefix: &str,
    objs: Vec<u64>,
    at: u64,
    image_snaps: &[u64],
    fast_diff: bool,
    what: &str,
) -> Result<Vec<(u64, objmap::ObjectState)>> {
    use futures_util::stream::{self, StreamExt, TryStreamExt};
    let io = data.at_snap(SNAP_DIR)?;
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
