//! The NBD wire protocol, server side: fixed-newstyle handshake, transmission phase,
//! structured replies and `base:allocation` block status.
//!
//! This crate knows nothing of images or storage: a server is generic over a
//! [`Backend`], which answers byte-addressed requests. The authoritative reference is
//! the NBD spec (NetworkBlockDevice/nbd doc/proto.md).

pub mod backend;

pub use backend::{Backend, BackendError, Errno, ExportInfo, Extent, ReadChunk, ZeroFlags};
