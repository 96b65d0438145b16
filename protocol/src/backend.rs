//! What a server asks of the thing it serves. Offsets and lengths have already been
//! validated against the export size and the advertised limits before any method here
//! is called (see `request::validate`), so a backend never sees an out-of-range request.

use bytes::Bytes;
use std::future::Future;

/// Errors a backend can report. Each maps to exactly one NBD error code, in one place
/// (`Errno::to_nbd`), so the mapping cannot drift between commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Errno {
    /// EPERM: the operation is not permitted (e.g. a write to a read-only export).
    Perm,
    /// EIO: the store failed.
    Io,
    /// ENOMEM.
    NoMem,
    /// EINVAL: the request is malformed.
    Inval,
    /// ENOSPC: the store is full.
    NoSpc,
    /// EOVERFLOW: the request is too large (e.g. structured-reply limits).
    Overflow,
    /// ENOTSUP: the operation is not supported (e.g. FAST_ZERO that would be slow).
    NotSup,
    /// ESHUTDOWN: the server is shutting down.
    Shutdown,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendError {
    pub errno: Errno,
    /// Human-readable; sent to the client in a structured ERROR reply and logged.
    pub message: String,
}

impl BackendError {
    pub fn new(errno: Errno, message: impl Into<String>) -> Self {
        BackendError {
            errno,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for BackendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.errno, self.message)
    }
}

impl std::error::Error for BackendError {}

/// One piece of a read, in order; together the pieces cover the request exactly.
/// With structured replies a `Hole` becomes NBD_REPLY_TYPE_OFFSET_HOLE; with simple
/// replies it is sent as zeros.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadChunk {
    Data(Bytes),
    Hole(u32),
}

/// One `base:allocation` extent: `flags` is a combination of NBD_STATE_HOLE (1) and
/// NBD_STATE_ZERO (2). Extents are contiguous from the requested offset; the last may
/// end before or after the requested range (the spec allows both, the server trims).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub length: u64,
    pub flags: u32,
}

pub const STATE_HOLE: u32 = 1;
pub const STATE_ZERO: u32 = 2;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// NBD_CMD_FLAG_NO_HOLE: the zeroed range must stay allocated.
    pub no_hole: bool,
    /// NBD_CMD_FLAG_FAST_ZERO: fail with NotSup unless zeroing is fast.
    pub fast_zero: bool,
    /// NBD_CMD_FLAG_FUA.
    pub fua: bool,
}

/// What an export is and can do; drives the transmission flags and NBD_INFO_BLOCK_SIZE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    pub size: u64,
    pub read_only: bool,
    pub can_flush: bool,
    pub can_fua: bool,
    pub can_trim: bool,
    pub can_write_zeroes: bool,
    pub can_fast_zero: bool,
    pub can_cache: bool,
    pub can_df: bool,
    /// Only true when a flush on one connection makes writes acked on every other
    /// connection to the same export durable.
    pub can_multi_conn: bool,
    pub min_block: u32,
    pub preferred_block: u32,
    pub max_block: u32,
    pub description: String,
}

/// The thing a server serves. Methods return `Send` futures so the server may run many
/// requests of one connection concurrently on a multi-threaded runtime.
pub trait Backend: Send + Sync + 'static {
    fn info(&self) -> ExportInfo;

    /// The export's size now, for exports whose size can change while clients are
    /// connected (an image resized under a kernel device). Only transmission-only
    /// connections follow it: their size was set out of band and is changed the same way
    /// (the kernel's device is resized too). A client that negotiated a size keeps it for
    /// the connection, as the protocol says. `None`: the size never changes.
    fn current_size(&self) -> Option<u64> {
        None
    }

    fn read(
        &self,
        offset: u64,
        length: u32,
    ) -> impl Future<Output = Result<Vec<ReadChunk>, BackendError>> + Send;

    fn write(
        &self,
        offset: u64,
        data: Bytes,
        fua: bool,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;

    fn flush(&self) -> impl Future<Output = Result<(), BackendError>> + Send;

    fn trim(
        &self,
        offset: u64,
        length: u32,
        fua: bool,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;

    fn write_zeroes(
        &self,
        offset: u64,
        length: u32,
        flags: ZeroFlags,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;

    fn cache(
        &self,
        offset: u64,
        length: u32,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;

    fn block_status(
        &self,
        offset: u64,
        length: u32,
    ) -> impl Future<Output = Result<Vec<Extent>, BackendError>> + Send;
}
