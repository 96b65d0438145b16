//! The connection-level error type, and the one place a backend `Errno` becomes an NBD
//! error number (so the mapping cannot drift between commands or reply kinds).

use crate::backend::Errno;
use crate::consts;

impl Errno {
    /// The NBD error number the spec defines for this condition. ENOTSUP only exists in the
    /// spec for FAST_ZERO; clients that predate it still treat any non-zero value as failure.
    pub fn to_nbd(self) -> u32 {
        match self {
            Errno::Perm => consts::EPERM,
            Errno::Io => consts::EIO,
            Errno::NoMem => consts::ENOMEM,
            Errno::Inval => consts::EINVAL,
            Errno::NoSpc => consts::ENOSPC,
            Errno::Overflow => consts::EOVERFLOW,
            Errno::NotSup => consts::ENOTSUP,
            Errno::Shutdown => consts::ESHUTDOWN,
        }
    }
}

/// Why a connection ended abnormally. A client that disconnects (cleanly or not) or
/// aborts is not an error: `serve_connection` returns `Ok(())` for those.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("socket I/O failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("client sent bad magic {got:#x} in {what} (expected {expected:#x})")]
    BadMagic {
        what: &'static str,
        got: u64,
        expected: u64,
    },
    #[error("client sent unknown handshake flags {0:#x}")]
    BadClientFlags(u32),
    #[error("client sent option {option} with absurd length {length}")]
    OptionTooLarge { option: u32, length: u32 },
    #[error("client asked for unknown export {0:?} with NBD_OPT_EXPORT_NAME")]
    UnknownExport(String),
    #[error("client used option {0} without fixed newstyle negotiation")]
    NotFixedNewstyle(u32),
    #[error("client sent NBD_OPT_EXPORT_NAME without TLS, which this server requires")]
    TlsRequired,
    #[error("TLS handshake failed: {0}")]
    TlsHandshake(std::io::Error),
    #[error("client sent {0} bytes after NBD_OPT_STARTTLS before the TLS handshake")]
    DataBeforeTls(usize),
    #[error("no exports configured")]
    NoExports,
}

/// Errors that mean the peer is simply gone: the connection ends quietly, not as a failure.
pub(crate) fn is_disconnect(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe | NotConnected
    )
}
