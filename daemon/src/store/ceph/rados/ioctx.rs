//! The pool handle: reads, stats, removals, write operations, class method calls, omap
//! pages and object listings.

use super::cluster::Rados;
use super::completion::{aio, completed, Keep, RadosBuf};
use super::error::{cstring, rados_error};
use super::ffi::*;
use crate::error::{Error, ErrorKind, Result};
use libc::ENOENT;
use std::ffi::{c_char, c_int, CStr};
use std::ptr::{null, null_mut};
use std::sync::Arc;

/// A pool handle (`rados_ioctx_t`).
pub struct IoCtx {
    pub(super) h: rados_ioctx_t,
    pub(super) cluster: Arc<Rados>,
    pub(super) pool: String,
    pub(super) namespace: String,
    /// Held (shared) while a write is handed to librados, and exclusively while the
    /// snapshot context writes carry is replaced: librados copies the handle's context
    /// into each write as it is handed over, and replaces it (`set_snap_write_ctx`)
    /// with no lock of its own, so a refresh of the header beside writes in flight
    /// would free the vector another thread is copying.
    pub(super) snapc: std::sync::RwLock<()>,
}

unsafe impl Send for IoCtx {}
unsafe impl Sync for IoCtx {}

impl Drop for IoCtx {
    fn drop(&mut self) {
        // In-flight operations hold their own reference inside librados.
        unsafe { rados_ioctx_destroy(self.h) }
    }
}

/// Object size and modification time (seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    pub size: u64,
    pub mtime: i64,
}

/// A write operation: several actions applied atomically to one object.
pub struct WriteOp {
    h: rados_write_op_t,
    /// Return-value slots of exec actions (librados writes them at completion).
    #[allow(clippy::vec_box)] // boxed: librados keeps pointers to them while the Vec grows
    prvals: Vec<Box<c_int>>,
}

unsafe impl Send for WriteOp {}

impl Drop for WriteOp {
    fn drop(&mut self) {
        unsafe { rados_release_write_op(self.h) }
    }
}

impl Default for WriteOp {
    fn default() -> Self {
        Self::new()
    }
}

// The C API copies data, names and inputs into its own buffers when an action is added,
// so only the return-value slots have to outlive the call.
impl WriteOp {
    pub fn new() -> Self {
        WriteOp {
            h: unsafe { rados_create_write_op() },
            prvals: Vec::new(),
        }
    }
    pub fn assert_exists(&mut self) -> &mut Self {
        unsafe { rados_write_op_assert_exists(self.h) };
        self
    }
    pub fn create(&mut self, exclusive: bool) -> &mut Self {
        unsafe { rados_write_op_create(self.h, exclusive as c_int, null()) };
        self
    }
    pub fn write(&mut self, off: u64, data: &[u8]) -> &mut Self {
        unsafe { rados_write_op_write(self.h, data.as_ptr() as *const c_char, data.len(), off) };
        self
    }
    pub fn write_full(&mut self, data: &[u8]) -> &mut Self {
        unsafe { rados_write_op_write_full(self.h, data.as_ptr() as *const c_char, data.len()) };
        self
    }
    pub fn zero(&mut self, off: u64, len: u64) -> &mut Self {
        unsafe { rados_write_op_zero(self.h, off, len) };
        self
    }
    pub fn truncate(&mut self, off: u64) -> &mut Self {
        unsafe { rados_write_op_truncate(self.h, off) };
        self
    }
    pub fn remove(&mut self) -> &mut Self {
        unsafe { rados_write_op_remove(self.h) };
        self
    }
    /// Like librbd: tell the OSD the object's expected size so BlueStore allocates well.
    pub fn set_alloc_hint(&mut self, object_size: u64, write_size: u64) -> &mut Self {
        unsafe { rados_write_op_set_alloc_hint2(self.h, object_size, write_size, 0) };
        self
    }
    pub fn exec(&mut self, cls: &CStr, method: &CStr, input: &[u8]) -> &mut Self {
        let mut slot = Box::new(0 as c_int);
        let p: *mut c_int = &mut *slot;
        unsafe {
            rados_write_op_exec(
                self.h,
                cls.as_ptr(),
                method.as_ptr(),
                input.as_ptr() as *const c_char,
                input.len(),
                p,
            )
        };
        self.prvals.push(slot);
        self
    }
    pub fn omap_set(&mut self, pairs: &[(&str, &[u8])]) -> Result<&mut Self> {
        let keys = pairs
            .iter()
            .map(|(k, _)| cstring("omap key", k))
            .collect::<Result<Vec<_>>>()?;
        let kp: Vec<*const c_char> = keys.iter().map(|k| k.as_ptr()).collect();
        let vp: Vec<*const c_char> = pairs
            .iter()
            .map(|p| p.1.as_ptr() as *const c_char)
            .collect();
        let lens: Vec<usize> = pairs.iter().map(|p| p.1.len()).collect();
        unsafe {
            rados_write_op_omap_set(self.h, kp.as_ptr(), vp.as_ptr(), lens.as_ptr(), pairs.len())
        };
        Ok(self)
    }
}

/// A read operation of one action, released when dropped: it lives in the slot of the
/// call, so after the completion. `prval` is where librados puts the action's result.
struct ReadOp {
    h: rados_read_op_t,
    prval: c_int,
}

impl ReadOp {
    fn new() -> Self {
        ReadOp {
            h: unsafe { rados_create_read_op() },
            prval: 0,
        }
    }

    /// The action's own result, once the operation completed.
    fn action_result(&self, what: &str, oid: &str) -> Result<()> {
        if self.prval < 0 {
            return Err(rados_error(what, oid, self.prval));
        }
        Ok(())
    }
}

impl Drop for ReadOp {
    fn drop(&mut self) {
        unsafe { rados_release_read_op(self.h) }
    }
}

struct ExecOut {
    op: ReadOp,
    out: RadosBuf,
}

struct OmapOut {
    op: ReadOp,
    iter: rados_omap_iter_t,
    more: u8,
}
impl Drop for OmapOut {
    fn drop(&mut self) {
        if !self.iter.is_null() {
            unsafe { rados_omap_get_end(self.iter) }
        }
    }
}

impl IoCtx {
    pub fn pool(&self) -> &str {
        &self.pool
    }
    pub fn namespace(&self) -> &str {
        &self.namespace
    }
    /// The pool's id (what clone headers and child records hold).
    pub fn pool_id(&self) -> i64 {
        unsafe { rados_ioctx_get_id(self.h) }
    }
    pub fn cluster(&self) -> &Arc<Rados> {
        &self.cluster
    }
    /// The raw handle, for our C++ shim (snaps.rs); valid while `self` lives.
    pub(in crate::store::ceph) fn raw(&self) -> rados_ioctx_t {
        self.h
    }

    /// To hold while a write is handed to librados through `raw` (see `snapc`).
    pub(in crate::store::ceph) fn submitting(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.snapc.read().unwrap_or_else(|p| p.into_inner())
    }

    /// A second handle on the same pool reading at `snap` (reads are per handle in librados).
    pub fn at_snap(&self, snap: u64) -> Result<Arc<IoCtx>> {
        let io = self.cluster.ioctx_in(&self.pool, &self.namespace)?;
        unsafe { rados_ioctx_snap_set_read(io.h, snap) };
        Ok(io)
    }

    /// Allocates a self-managed snapshot id in the pool (librbd's first step of a
    /// snapshot). Blocking in librados (a round trip to the monitors): run off the runtime.
    pub async fn selfmanaged_snap_create(self: &Arc<Self>) -> Result<u64> {
        let me = self.clone();
        let (r, id) = tokio::task::spawn_blocking(move || {
            let mut id = 0u64;
            let r = unsafe { rados_ioctx_selfmanaged_snap_create(me.h, &mut id) };
            (r, id)
        })
        .await
        .map_err(|e| Error::new(ErrorKind::Io, format!("snapshot id allocation: {e}")))?;
        if r < 0 {
            return Err(rados_error("allocate a snapshot id in pool", &self.pool, r));
        }
        Ok(id)
    }

    /// Releases a self-managed snapshot id: the OSDs trim the clones only it kept.
    pub async fn selfmanaged_snap_remove(self: &Arc<Self>, id: u64) -> Result<()> {
        let me = self.clone();
        let r = tokio::task::spawn_blocking(move || unsafe {
            rados_ioctx_selfmanaged_snap_remove(me.h, id)
        })
        .await
        .map_err(|e| Error::new(ErrorKind::Io, format!("snapshot id release: {e}")))?;
        if r < 0 {
            return Err(rados_error(
                &format!("release snapshot id {id} in pool"),
                &self.pool,
                r,
            ));
        }
        Ok(())
    }

    /// Makes object `oid` what it was at self-managed snapshot `snap` (removed if it did
    /// not exist then), with this handle's snapshot context. Blocking in librados.
    pub async fn selfmanaged_snap_rollback(self: &Arc<Self>, oid: &str, snap: u64) -> Result<()> {
        let me = self.clone();
        let coid = cstring("object name", oid)?;
        let r = tokio::task::spawn_blocking(move || unsafe {
            let _g = me.submitting();
            rados_ioctx_selfmanaged_snap_rollback(me.h, coid.as_ptr(), snap)
        })
        .await
        .map_err(|e| Error::new(ErrorKind::Io, format!("rollback of {oid}: {e}")))?;
        if r < 0 && r != -ENOENT {
            return Err(rados_error(
                &format!("roll back to snapshot {snap}"),
                oid,
                r,
            ));
        }
        Ok(())
    }

    /// The snapshot context carried by every write from this handle (newest snap first).
    pub fn set_snap_write_ctx(&self, seq: u64, snaps: &[u64]) -> Result<()> {
        let mut v = snaps.to_vec();
        let n = c_int::try_from(v.len()).map_err(|_| {
            Error::new(
                ErrorKind::InvalidInput,
                "snapshot context too large".to_string(),
            )
        })?;
        let r = {
            let _only = self.snapc.write().unwrap_or_else(|p| p.into_inner());
            unsafe { rados_ioctx_selfmanaged_snap_set_write_ctx(self.h, seq, v.as_mut_ptr(), n) }
        };
        if r < 0 {
            return Err(rados_error(
                "set snapshot write context in pool",
                &self.pool,
                r,
            ));
        }
        Ok(())
    }

    /// Reads up to `len` bytes at `off`; `None` when the object does not exist.
    pub async fn read(&self, oid: &str, off: u64, len: usize) -> Result<Option<Vec<u8>>> {
        if len == 0 {
            // librados reads a length of 0 as "to the end of the object", which would not
            // fit in the buffer; and nothing is asked for.
            return Ok(self.stat(oid).await?.map(|_| Vec::new()));
        }
        let coid = cstring("object name", oid)?;
        let io = self.h as usize;
        // Not zero-filled first: librados copies the bytes read into the buffer, and only
        // those r bytes are ever made part of the Vec (a 1 MiB read saves a 1 MiB memset).
        let keep = Keep((coid, Vec::<u8>::with_capacity(len)));
        let (r, keep) = aio(keep, |k, c| unsafe {
            let k = &mut *k;
            rados_aio_read(
                io as rados_ioctx_t,
                k.0 .0.as_ptr(),
                c,
                k.0 .1.as_mut_ptr() as *mut c_char,
                len,
                off,
            )
        })
        .await;
        if r == -ENOENT {
            return Ok(None);
        }
        // Never zeros for a read that did not complete.
        let mut buf = completed(r, keep, "read", oid)?.0 .1;
        let n = (r as usize).min(len);
        // SAFETY: the capacity is `len` and librados wrote the first r (<= len) bytes
        // before it completed the read.
        unsafe { buf.set_len(n) };
        Ok(Some(buf))
    }

    pub async fn stat(&self, oid: &str) -> Result<Option<Stat>> {
        let coid = cstring("object name", oid)?;
        let io = self.h as usize;
        let keep = Keep((coid, 0u64, 0 as time_t));
        let (r, keep) = aio(keep, |k, c| unsafe {
            let k = &mut *k;
            rados_aio_stat(
                io as rados_ioctx_t,
                k.0 .0.as_ptr(),
                c,
                &mut k.0 .1,
                &mut k.0 .2,
            )
        })
        .await;
        if r == -ENOENT {
            return Ok(None);
        }
        let k = completed(r, keep, "stat", oid)?;
        Ok(Some(Stat {
            size: k.0 .1,
            mtime: k.0 .2,
        }))
    }

    /// Removes an object; `Ok(false)` when it did not exist.
    pub async fn remove(&self, oid: &str) -> Result<bool> {
        let coid = cstring("object name", oid)?;
        let io = self.h as usize;
        let (r, _) = aio(Keep(coid), |k, c| unsafe {
            let _g = self.submitting();
            rados_aio_remove(io as rados_ioctx_t, (*k).0.as_ptr(), c)
        })
        .await;
        if r == -ENOENT {
            return Ok(false);
        }
        if r < 0 {
            return Err(rados_error("remove", oid, r));
        }
        Ok(true)
    }

    /// Applies a write operation atomically. `what` names it in errors ("write", "cls rbd.create").
    pub async fn operate(&self, oid: &str, op: WriteOp, what: &str) -> Result<()> {
        let coid = cstring("object name", oid)?;
        let io = self.h as usize;
        let (r, _) = aio(Keep((coid, op)), |k, c| unsafe {
            let k = &mut *k;
            let _g = self.submitting();
            rados_aio_write_op_operate(
                k.0 .1.h,
                io as rados_ioctx_t,
                c,
                k.0 .0.as_ptr(),
                null_mut(),
                0,
            )
        })
        .await;
        if r < 0 {
            return Err(rados_error(what, oid, r));
        }
        Ok(())
    }

    /// Calls a class method that only reads (`get_size`, `dir_list`, ...), returning its output.
    pub async fn exec_read(
        &self,
        oid: &str,
        cls: &str,
        method: &str,
        input: &[u8],
    ) -> Result<Vec<u8>> {
        let what = format!("cls {cls}.{method} on");
        let coid = cstring("object name", oid)?;
        let ccls = cstring("class", cls)?;
        let cmethod = cstring("method", method)?;
        let io = self.h as usize;
        let out = ExecOut {
            op: ReadOp::new(),
            out: RadosBuf::new(),
        };
        let input = input.to_vec();
        let (r, keep) = aio(Keep((coid, out)), |k, c| unsafe {
            let k = &mut *k;
            let o = &mut k.0 .1;
            rados_read_op_exec(
                o.op.h,
                ccls.as_ptr(),
                cmethod.as_ptr(),
                input.as_ptr() as *const c_char,
                input.len(),
                &mut o.out.ptr,
                &mut o.out.len,
                &mut o.op.prval,
            );
            rados_aio_read_op_operate(o.op.h, io as rados_ioctx_t, c, k.0 .0.as_ptr(), 0)
        })
        .await;
        let k = completed(r, keep, &what, oid)?;
        let o = &k.0 .1;
        o.op.action_result(&what, oid)?;
        Ok(o.out.as_slice().to_vec())
    }

    /// Calls a class method that writes, through `rados_aio_exec` (its output is ignored).
    pub async fn exec_write(&self, oid: &str, cls: &str, method: &str, input: &[u8]) -> Result<()> {
        let mut op = WriteOp::new();
        op.exec(&cstring("class", cls)?, &cstring("method", method)?, input);
        self.operate(oid, op, &format!("cls {cls}.{method} on"))
            .await
    }

    /// `rados_aio_exec` with a caller-sized output buffer; kept for small fixed outputs.
    pub async fn exec_small(
        &self,
        oid: &str,
        cls: &str,
        method: &str,
        input: &[u8],
        out_max: usize,
    ) -> Result<Vec<u8>> {
        let what = format!("cls {cls}.{method} on");
        let coid = cstring("object name", oid)?;
        let ccls = cstring("class", cls)?;
        let cmethod = cstring("method", method)?;
        let io = self.h as usize;
        let keep = Keep((coid, input.to_vec(), vec![0u8; out_max]));
        let (r, keep) = aio(keep, |k, c| unsafe {
            let k = &mut *k;
            rados_aio_exec(
                io as rados_ioctx_t,
                k.0 .0.as_ptr(),
                c,
                ccls.as_ptr(),
                cmethod.as_ptr(),
                k.0 .1.as_ptr() as *const c_char,
                k.0 .1.len(),
                k.0 .2.as_mut_ptr() as *mut c_char,
                out_max,
            )
        })
        .await;
        if r < 0 {
            return Err(rados_error(&what, oid, r));
        }
        let mut out = keep.map(|k| k.0 .2).unwrap_or_default();
        out.truncate((r as usize).min(out_max));
        Ok(out)
    }

    /// One page of omap key/values after `start_after` with `prefix`; the bool says whether
    /// more remain.
    pub async fn omap_get_vals(
        &self,
        oid: &str,
        start_after: &str,
        prefix: &str,
        max: u64,
    ) -> Result<(Vec<(String, Vec<u8>)>, bool)> {
        let coid = cstring("object name", oid)?;
        let cstart = cstring("omap key", start_after)?;
        let cprefix = cstring("omap prefix", prefix)?;
        let io = self.h as usize;
        let out = OmapOut {
            op: ReadOp::new(),
            iter: null_mut(),
            more: 0,
        };
        let (r, keep) = aio(Keep((coid, out)), |k, c| unsafe {
            let k = &mut *k;
            let o = &mut k.0 .1;
            rados_read_op_omap_get_vals2(
                o.op.h,
                cstart.as_ptr(),
                cprefix.as_ptr(),
                max,
                &mut o.iter,
                &mut o.more,
                &mut o.op.prval,
            );
            rados_aio_read_op_operate(o.op.h, io as rados_ioctx_t, c, k.0 .0.as_ptr(), 0)
        })
        .await;
        let k = completed(r, keep, "omap get vals", oid)?;
        let o = &k.0 .1;
        o.op.action_result("omap get vals", oid)?;
        let mut pairs = Vec::new();
        loop {
            let (mut kp, mut vp, mut kl, mut vl) = (null_mut(), null_mut(), 0usize, 0usize);
            let r = unsafe { rados_omap_get_next2(o.iter, &mut kp, &mut vp, &mut kl, &mut vl) };
            if r < 0 {
                return Err(rados_error("omap iterate", oid, r));
            }
            if kp.is_null() {
                break;
            }
            let key = unsafe { std::slice::from_raw_parts(kp as *const u8, kl) };
            let val = if vp.is_null() {
                Vec::new()
            } else {
                unsafe { std::slice::from_raw_parts(vp as *const u8, vl) }.to_vec()
            };
            pairs.push((String::from_utf8_lossy(key).into_owned(), val));
        }
        Ok((pairs, o.more != 0))
    }

    /// Names of the objects in the pool (default namespace) starting with `prefix`.
    /// librados' listing calls block on the network, so this runs on the blocking pool.
    pub async fn list_objects(self: &Arc<Self>, prefix: &str) -> Result<Vec<String>> {
        let io = self.clone();
        let prefix = prefix.to_string();
        tokio::task::spawn_blocking(move || io.list_objects_blocking(&prefix))
            .await
            .map_err(|e| Error::new(ErrorKind::Io, format!("listing pool objects: {e}")))?
    }

    fn list_objects_blocking(&self, prefix: &str) -> Result<Vec<String>> {
        let mut ctx: rados_list_ctx_t = null_mut();
        let r = unsafe { rados_nobjects_list_open(self.h, &mut ctx) };
        if r < 0 {
            return Err(rados_error("list objects of pool", &self.pool, r));
        }
        struct Close(rados_list_ctx_t);
        impl Drop for Close {
            fn drop(&mut self) {
                unsafe { rados_nobjects_list_close(self.0) }
            }
        }
        let _close = Close(ctx);
        let mut out = Vec::new();
        let mut progress = crate::progress::Progress::new(format!(
            "listing objects {prefix}* of pool {}: pool objects read",
            self.pool
        ));
        loop {
            progress.tick();
            let (mut entry, mut es) = (null(), 0usize);
            let r = unsafe {
                rados_nobjects_list_next2(
                    ctx,
                    &mut entry,
                    null_mut(),
                    null_mut(),
                    &mut es,
                    null_mut(),
                    null_mut(),
                )
            };
            if r == -ENOENT {
                break;
            }
            if r < 0 {
                return Err(rados_error("list objects of pool", &self.pool, r));
            }
            let name = unsafe { std::slice::from_raw_parts(entry as *const u8, es) };
            if name.starts_with(prefix.as_bytes()) {
                out.push(String::from_utf8_lossy(name).into_owned());
            }
        }
        Ok(out)
    }
}
