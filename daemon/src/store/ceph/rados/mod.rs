//! Our own binding to the librados C API (Ceph 16.2 `librados.h`) with a small safe,
//! asynchronous wrapper.
//!
//! Why our own: the crates.io `librados` 0.2 binding only reads and bundles its own copy of
//! the shared library, and `ceph` 3.2 is synchronous (one blocked thread per I/O). We need
//! the `rados_aio_*` calls, write/read operations, class method calls (`exec`) and
//! watch/notify, driven from tokio without a thread per request: every asynchronous call
//! gets a librados completion whose callback hands the result to a tokio oneshot channel.
//!
//! Memory safety of asynchronous calls: everything librados may touch until the completion
//! fires (read buffers, return-value slots, output pointers, the operation handle) lives in
//! a heap "slot" whose ownership passes to the completion callback. Dropping the Rust future
//! early therefore never frees memory librados still writes to; the callback frees it.
//!
//! Files: `ffi` declares the C API; `error` turns errnos into our errors; `completion`
//! makes a librados completion a future; `cluster` is the cluster handle (connect, config,
//! blocklist); `ioctx` the pool handle, its reads, write operations and class calls;
//! `watch` watches and notifies.

mod cluster;
mod completion;
mod error;
mod ffi;
mod ioctx;
mod watch;

pub use cluster::{ConnectOptions, Rados};
pub use error::{errno_of, is_blocklisted, rados_error, EBLOCKLISTED};
pub use ffi::SNAP_HEAD;
pub use ioctx::{IoCtx, Stat, WriteOp};
pub use watch::{NotifyReplier, NotifyReply, PendingAck, Reply, Watch, WatchEvent};
