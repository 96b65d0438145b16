//! The NBD wire protocol, server side: fixed-newstyle handshake, transmission phase,
//! structured replies and `base:allocation` block status.
//!
//! This crate knows nothing of images or storage: a server is generic over a
//! [`Backend`], which answers byte-addressed requests. The authoritative reference is
//! the NBD spec (NetworkBlockDevice/nbd doc/proto.md).
//!
//! One file per concern: `consts` (every number), `export` (the exports and the
//! per-connection options, read by both phases below), `handshake` (option haggling),
//! `request` (parsing and the one `validate`), `reply` (encoding), `transmission` (the
//! request loop, concurrency and backpressure), `server` (entry points), `socket` (the
//! connection's socket, woken only when it has something to read), `halves` (the
//! reader's and writer's halves of a connection, without a lock between them on our own
//! socket), `error` (the error type and the one errno mapping), `memory` (an in-memory
//! backend for tests and examples). Streams that are one of two kinds (plain or TLS, our
//! socket's halves or tokio's) are `tokio_util::either::Either`.

pub mod backend;
pub mod consts;
pub mod error;
mod export;
mod halves;
pub mod handshake;
pub mod inline;
mod io;
pub mod memory;
pub mod reply;
pub mod request;
pub mod server;
pub mod socket;
pub mod tls;
mod transmission;

pub use backend::{Backend, BackendError, Errno, ExportInfo, Extent, ReadChunk, ZeroFlags};
pub use error::ProtocolError;
pub use memory::MemoryBackend;
pub use server::{
    serve_connection, serve_transmission, transmission_flags, Export, Exports, ServerOptions,
};
pub use socket::{NbdSocket, PollHint};
pub use tls::{TlsConfig, TlsError, TlsMode, TlsSetting};
