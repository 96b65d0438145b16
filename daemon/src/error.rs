//! One error type for the daemon. Every error names what failed and where; the CLI
//! prints it as one line (`rados-nbd: <message>`) and exits non-zero.

use nbd_protocol::{BackendError, Errno};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    NotFound,
    AlreadyExists,
    InvalidInput,
    ReadOnly,
    Unsupported,
    /// On-disk data that must not be trusted (bad header, corrupt object map).
    Corrupt,
    NoSpace,
    /// The image is in use (locked by another client, device busy).
    Busy,
    TimedOut,
    /// Stopped part way for another client (a lock hand-over): worth asking again.
    Interrupted,
    Io,
}

#[derive(Debug, Clone)]
pub struct Error {
    pub kind: ErrorKind,
    pub message: String,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
        }
    }
    /// Wrap an OS error, naming the operation and the path or object it was about.
    pub fn io(what: impl std::fmt::Display, err: std::io::Error) -> Self {
        let kind = match err.raw_os_error() {
            Some(libc_enospc) if libc_enospc == 28 || libc_enospc == 122 => ErrorKind::NoSpace,
            _ => match err.kind() {
                std::io::ErrorKind::NotFound => ErrorKind::NotFound,
                std::io::ErrorKind::AlreadyExists => ErrorKind::AlreadyExists,
                std::io::ErrorKind::PermissionDenied => ErrorKind::ReadOnly,
                std::io::ErrorKind::TimedOut => ErrorKind::TimedOut,
                _ => ErrorKind::Io,
            },
        };
        Error::new(kind, format!("{what}: {err}"))
    }
    /// Prefix the message with more context ("opening rbd/vm1: ...").
    pub fn context(mut self, what: impl std::fmt::Display) -> Self {
        self.message = format!("{what}: {}", self.message);
        self
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

/// The single place where a daemon error becomes an NBD error for a client.
impl From<Error> for BackendError {
    fn from(e: Error) -> Self {
        let errno = match e.kind {
            ErrorKind::ReadOnly => Errno::Perm,
            ErrorKind::InvalidInput => Errno::Inval,
            ErrorKind::NoSpace => Errno::NoSpc,
            ErrorKind::Unsupported => Errno::NotSup,
            _ => Errno::Io,
        };
        BackendError::new(errno, e.message)
    }
}
