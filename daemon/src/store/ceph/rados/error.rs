//! librados errors: the operation, the object and the errno in one message, the errno
//! mapped to our error kinds.

use crate::error::{Error, ErrorKind, Result};
use libc::{EBUSY, EDQUOT, EEXIST, EINVAL, ENOENT, ENOSPC, EROFS, ETIMEDOUT};
use std::ffi::CString;

/// librados reports a blocklisted client as ESHUTDOWN.
pub const EBLOCKLISTED: i32 = libc::ESHUTDOWN;

/// An error from librados: names the operation and the object, carries the errno.
pub fn rados_error(op: &str, object: &str, r: i32) -> Error {
    let errno = r.checked_neg().unwrap_or(i32::MAX);
    let kind = match errno {
        ENOENT => ErrorKind::NotFound,
        EEXIST => ErrorKind::AlreadyExists,
        ENOSPC | EDQUOT => ErrorKind::NoSpace,
        EBUSY => ErrorKind::Busy,
        ETIMEDOUT => ErrorKind::TimedOut,
        EROFS => ErrorKind::ReadOnly,
        EINVAL => ErrorKind::InvalidInput,
        _ => ErrorKind::Io,
    };
    let text = if errno == EBLOCKLISTED {
        "client is blocklisted by the cluster".to_string()
    } else {
        let t = std::io::Error::from_raw_os_error(errno).to_string();
        // Display appends " (os error N)"; we print the errno ourselves.
        t.split(" (os error").next().unwrap_or(&t).to_string()
    };
    let what = if object.is_empty() {
        op.to_string()
    } else {
        format!("{op} {object}")
    };
    Error::new(kind, format!("rados {what}: {text} (errno {errno})"))
}

/// The errno of an error built by [`rados_error`], if it was one (for callers that react to
/// one specific errno, e.g. -EBUSY from cls_lock).
pub fn errno_of(e: &Error) -> Option<i32> {
    let tail = e.message.rsplit_once("(errno ")?.1;
    tail.strip_suffix(')')?.parse().ok()
}

/// Whether an error says this client is blocklisted (fenced off by another client).
pub fn is_blocklisted(e: &Error) -> bool {
    errno_of(e) == Some(EBLOCKLISTED)
}

pub(super) fn cstring(what: &str, s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| {
        Error::new(
            ErrorKind::InvalidInput,
            format!("{what} {s:?} contains a NUL byte"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_op_object_and_errno() {
        let e = rados_error("read", "rbd_data.abc.0000000000000001", -2);
        assert_eq!(e.kind, ErrorKind::NotFound);
        assert!(
            e.message.contains("read rbd_data.abc.0000000000000001"),
            "{}",
            e.message
        );
        assert_eq!(errno_of(&e), Some(2));
        assert_eq!(rados_error("w", "o", -28).kind, ErrorKind::NoSpace);
        assert_eq!(rados_error("w", "o", -122).kind, ErrorKind::NoSpace);
        assert_eq!(rados_error("w", "o", -16).kind, ErrorKind::Busy);
        assert_eq!(rados_error("w", "o", -17).kind, ErrorKind::AlreadyExists);
        assert_eq!(rados_error("w", "o", -110).kind, ErrorKind::TimedOut);
        assert_eq!(rados_error("w", "o", -30).kind, ErrorKind::ReadOnly);
        assert_eq!(rados_error("w", "o", -5).kind, ErrorKind::Io);
        assert!(rados_error("w", "o", -108).message.contains("blocklisted"));
    }
}
