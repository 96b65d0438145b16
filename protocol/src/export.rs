//! What a server serves and the limits it serves it within: the exports and the
//! per-connection options. Both phases read these, so they live below both (the handshake
//! picks an export, the transmission phase runs within the options) and import nothing
//! of either.

use crate::backend::Backend;
use crate::tls::TlsSetting;
use std::sync::Arc;

/// Read-side buffer: lets a burst of small pipelined requests cost one syscall, while
/// large write payloads bypass it.
pub(crate) const READ_BUFFER: usize = 64 * 1024;

pub struct Export<B: Backend> {
    pub name: String,
    pub description: String,
    pub backend: Arc<B>,
}

/// The exports one server offers. The name "" selects the first export (the default).
pub struct Exports<B: Backend> {
    pub exports: Vec<Export<B>>,
}

/// Per-connection limits.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Requests accepted but not yet answered; beyond it the server stops reading.
    pub max_in_flight: usize,
    /// Write payloads held and read replies not yet sent, in bytes; beyond it the server
    /// stops reading. A single request larger than this still runs, alone.
    pub max_buffered_bytes: usize,
    /// Whether STARTTLS is offered or required (off by default).
    pub tls: TlsSetting,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            max_in_flight: 128,
            max_buffered_bytes: 64 * 1024 * 1024,
            tls: TlsSetting::Off,
        }
    }
}
