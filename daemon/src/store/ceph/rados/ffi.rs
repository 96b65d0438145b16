//! The librados C API calls we use, as declared in Ceph 16.2's `librados.h`.

#![allow(non_camel_case_types)]

use std::ffi::{c_char, c_int, c_void};

pub(super) type rados_t = *mut c_void;
pub(super) type rados_ioctx_t = *mut c_void;
pub(super) type rados_completion_t = *mut c_void;
pub(super) type rados_write_op_t = *mut c_void;
pub(super) type rados_read_op_t = *mut c_void;
pub(super) type rados_list_ctx_t = *mut c_void;
pub(super) type rados_omap_iter_t = *mut c_void;
pub(super) type rados_callback_t = Option<unsafe extern "C" fn(rados_completion_t, *mut c_void)>;
pub(super) type rados_watchcb2_t =
    Option<unsafe extern "C" fn(*mut c_void, u64, u64, u64, *mut c_void, usize)>;
pub(super) type rados_watcherrcb_t = Option<unsafe extern "C" fn(*mut c_void, u64, c_int)>;
/// `time_t` on every 64-bit Linux target we build for.
pub(super) type time_t = i64;

/// `LIBRADOS_SNAP_HEAD` (also Ceph's `CEPH_NOSNAP`).
pub const SNAP_HEAD: u64 = u64::MAX - 1;

#[link(name = "rados")]
extern "C" {
    pub(super) fn rados_create(cluster: *mut rados_t, id: *const c_char) -> c_int;
    pub(super) fn rados_conf_read_file(cluster: rados_t, path: *const c_char) -> c_int;
    pub(super) fn rados_conf_parse_env(cluster: rados_t, var: *const c_char) -> c_int;
    pub(super) fn rados_conf_set(
        cluster: rados_t,
        option: *const c_char,
        value: *const c_char,
    ) -> c_int;
    pub(super) fn rados_conf_get(
        cluster: rados_t,
        option: *const c_char,
        buf: *mut c_char,
        len: usize,
    ) -> c_int;
    pub(super) fn rados_connect(cluster: rados_t) -> c_int;
    pub(super) fn rados_wait_for_latest_osdmap(cluster: rados_t) -> c_int;
    pub(super) fn rados_pool_get_base_tier(
        cluster: rados_t,
        pool: i64,
        base_tier: *mut i64,
    ) -> c_int;
    pub(super) fn rados_get_min_compatible_client(
        cluster: rados_t,
        min_compat_client: *mut i8,
        require_min_compat_client: *mut i8,
    ) -> c_int;
    pub(super) fn rados_shutdown(cluster: rados_t);
    pub(super) fn rados_watch_flush(cluster: rados_t) -> c_int;
    pub(super) fn rados_get_instance_id(cluster: rados_t) -> u64;
    pub(super) fn rados_blocklist_add(
        cluster: rados_t,
        client_address: *mut c_char,
        expire_seconds: u32,
    ) -> c_int;
    pub(super) fn rados_ioctx_create(
        cluster: rados_t,
        pool: *const c_char,
        io: *mut rados_ioctx_t,
    ) -> c_int;
    pub(super) fn rados_ioctx_destroy(io: rados_ioctx_t);
    pub(super) fn rados_ioctx_get_id(io: rados_ioctx_t) -> i64;
    pub(super) fn rados_pool_reverse_lookup(
        cluster: rados_t,
        id: i64,
        buf: *mut c_char,
        maxlen: usize,
    ) -> c_int;
    pub(super) fn rados_pool_list(cluster: rados_t, buf: *mut c_char, len: usize) -> c_int;
    pub(super) fn rados_ioctx_set_namespace(io: rados_ioctx_t, nspace: *const c_char);
    pub(super) fn rados_ioctx_snap_set_read(io: rados_ioctx_t, snap: u64);
    pub(super) fn rados_ioctx_selfmanaged_snap_create(io: rados_ioctx_t, snapid: *mut u64)
        -> c_int;
    pub(super) fn rados_ioctx_selfmanaged_snap_remove(io: rados_ioctx_t, snapid: u64) -> c_int;
    pub(super) fn rados_ioctx_selfmanaged_snap_rollback(
        io: rados_ioctx_t,
        oid: *const c_char,
        snapid: u64,
    ) -> c_int;
    pub(super) fn rados_ioctx_selfmanaged_snap_set_write_ctx(
        io: rados_ioctx_t,
        seq: u64,
        snaps: *mut u64,
        num_snaps: c_int,
    ) -> c_int;
    pub(super) fn rados_nobjects_list_open(io: rados_ioctx_t, ctx: *mut rados_list_ctx_t) -> c_int;
    pub(super) fn rados_nobjects_list_next2(
        ctx: rados_list_ctx_t,
        entry: *mut *const c_char,
        key: *mut *const c_char,
        nspace: *mut *const c_char,
        entry_size: *mut usize,
        key_size: *mut usize,
        nspace_size: *mut usize,
    ) -> c_int;
    pub(super) fn rados_nobjects_list_close(ctx: rados_list_ctx_t);

    pub(super) fn rados_aio_create_completion2(
        arg: *mut c_void,
        cb_complete: rados_callback_t,
        pc: *mut rados_completion_t,
    ) -> c_int;
    pub(super) fn rados_aio_get_return_value(c: rados_completion_t) -> c_int;
    pub(super) fn rados_aio_release(c: rados_completion_t);
    pub(super) fn rados_aio_read(
        io: rados_ioctx_t,
        oid: *const c_char,
        c: rados_completion_t,
        buf: *mut c_char,
        len: usize,
        off: u64,
    ) -> c_int;
    pub(super) fn rados_aio_remove(
        io: rados_ioctx_t,
        oid: *const c_char,
        c: rados_completion_t,
    ) -> c_int;
    pub(super) fn rados_aio_stat(
        io: rados_ioctx_t,
        oid: *const c_char,
        c: rados_completion_t,
        psize: *mut u64,
        pmtime: *mut time_t,
    ) -> c_int;
    pub(super) fn rados_aio_exec(
        io: rados_ioctx_t,
        oid: *const c_char,
        c: rados_completion_t,
        cls: *const c_char,
        method: *const c_char,
        in_buf: *const c_char,
        in_len: usize,
        buf: *mut c_char,
        out_len: usize,
    ) -> c_int;

    pub(super) fn rados_create_write_op() -> rados_write_op_t;
    pub(super) fn rados_release_write_op(op: rados_write_op_t);
    pub(super) fn rados_write_op_assert_exists(op: rados_write_op_t);
    pub(super) fn rados_write_op_create(
        op: rados_write_op_t,
        exclusive: c_int,
        category: *const c_char,
    );
    pub(super) fn rados_write_op_write(
        op: rados_write_op_t,
        buf: *const c_char,
        len: usize,
        off: u64,
    );
    pub(super) fn rados_write_op_write_full(op: rados_write_op_t, buf: *const c_char, len: usize);
    pub(super) fn rados_write_op_remove(op: rados_write_op_t);
    pub(super) fn rados_write_op_truncate(op: rados_write_op_t, off: u64);
    pub(super) fn rados_write_op_zero(op: rados_write_op_t, off: u64, len: u64);
    pub(super) fn rados_write_op_exec(
        op: rados_write_op_t,
        cls: *const c_char,
        method: *const c_char,
        in_buf: *const c_char,
        in_len: usize,
        prval: *mut c_int,
    );
    pub(super) fn rados_write_op_omap_set(
        op: rados_write_op_t,
        keys: *const *const c_char,
        vals: *const *const c_char,
        lens: *const usize,
        num: usize,
    );
    pub(super) fn rados_write_op_set_alloc_hint2(
        op: rados_write_op_t,
        expected_object_size: u64,
        expected_write_size: u64,
        flags: u32,
    );
    pub(super) fn rados_aio_write_op_operate(
        op: rados_write_op_t,
        io: rados_ioctx_t,
        c: rados_completion_t,
        oid: *const c_char,
        mtime: *mut time_t,
        flags: c_int,
    ) -> c_int;

    pub(super) fn rados_create_read_op() -> rados_read_op_t;
    pub(super) fn rados_release_read_op(op: rados_read_op_t);
    pub(super) fn rados_read_op_exec(
        op: rados_read_op_t,
        cls: *const c_char,
        method: *const c_char,
        in_buf: *const c_char,
        in_len: usize,
        out_buf: *mut *mut c_char,
        out_len: *mut usize,
        prval: *mut c_int,
    );
    pub(super) fn rados_read_op_omap_get_vals2(
        op: rados_read_op_t,
        start_after: *const c_char,
        filter_prefix: *const c_char,
        max_return: u64,
        iter: *mut rados_omap_iter_t,
        pmore: *mut u8,
        prval: *mut c_int,
    );
    pub(super) fn rados_omap_get_next2(
        iter: rados_omap_iter_t,
        key: *mut *mut c_char,
        val: *mut *mut c_char,
        key_len: *mut usize,
        val_len: *mut usize,
    ) -> c_int;
    pub(super) fn rados_omap_get_end(iter: rados_omap_iter_t);
    pub(super) fn rados_aio_read_op_operate(
        op: rados_read_op_t,
        io: rados_ioctx_t,
        c: rados_completion_t,
        oid: *const c_char,
        flags: c_int,
    ) -> c_int;
    pub(super) fn rados_buffer_free(buf: *mut c_char);

    pub(super) fn rados_aio_watch2(
        io: rados_ioctx_t,
        oid: *const c_char,
        c: rados_completion_t,
        handle: *mut u64,
        watchcb: rados_watchcb2_t,
        watcherrcb: rados_watcherrcb_t,
        timeout: u32,
        arg: *mut c_void,
    ) -> c_int;
    pub(super) fn rados_aio_unwatch(io: rados_ioctx_t, cookie: u64, c: rados_completion_t)
        -> c_int;
    pub(super) fn rados_aio_watch_flush(cluster: rados_t, c: rados_completion_t) -> c_int;
    pub(super) fn rados_aio_notify(
        io: rados_ioctx_t,
        oid: *const c_char,
        c: rados_completion_t,
        buf: *const c_char,
        buf_len: c_int,
        timeout_ms: u64,
        reply_buffer: *mut *mut c_char,
        reply_buffer_len: *mut usize,
    ) -> c_int;
    pub(super) fn rados_notify_ack(
        io: rados_ioctx_t,
        oid: *const c_char,
        notify_id: u64,
        cookie: u64,
        buf: *const c_char,
        buf_len: c_int,
    ) -> c_int;
}
