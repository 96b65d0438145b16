//! The `--store` URI: which store images live in. Parsed from the command line and read back
//! from the kernel daemon's state files, so its text form ([`std::fmt::Display`]) is the one
//! [`StoreUri::parse`] accepts.

use crate::error::{Error, ErrorKind, Result};
use std::path::PathBuf;

/// The directory store's place when neither `--store` nor `RADOS_NBD_STORE` names one.
pub const DEFAULT_STORE_DIR: &str = "/var/lib/rados-nbd";

/// Which store a `--store` URI names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUri {
    Dir(PathBuf),
    Ceph { conf: Option<PathBuf> },
}

impl StoreUri {
    /// `dir:PATH` or `ceph:[CONF]`; `None` (no `--store`) is `$RADOS_NBD_STORE` (a
    /// directory, or a store URI), else `dir:/var/lib/rados-nbd`.
    pub fn parse(uri: Option<&str>) -> Result<StoreUri> {
        let Some(uri) = uri else {
            let dir = match std::env::var_os("RADOS_NBD_STORE") {
                // A store URI there too (`dir:/srv/s` once made a relative directory
                // named "dir:"): as --store would take it.
                Some(d)
                    if d.to_str()
                        .is_some_and(|d| d.starts_with("dir:") || d.starts_with("ceph:")) =>
                {
                    return Self::parse(d.to_str()).map_err(|e| e.context("RADOS_NBD_STORE"));
                }
                Some(d) if !d.is_empty() => PathBuf::from(d),
                _ => PathBuf::from(DEFAULT_STORE_DIR),
            };
            return Ok(StoreUri::Dir(dir));
        };
        if let Some(p) = uri.strip_prefix("dir:") {
            if p.is_empty() {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    format!("store {uri:?} names no directory (use dir:PATH)"),
                ));
            }
            return Ok(StoreUri::Dir(PathBuf::from(p)));
        }
        if let Some(c) = uri.strip_prefix("ceph:") {
            let conf = (!c.is_empty()).then(|| PathBuf::from(c));
            return Ok(StoreUri::Ceph { conf });
        }
        Err(Error::new(
            ErrorKind::InvalidInput,
            format!("unknown store {uri:?} (expected dir:PATH or ceph:[CONF])"),
        ))
    }

    pub fn is_ceph(&self) -> bool {
        matches!(self, StoreUri::Ceph { .. })
    }
}

/// How a store is written in state files and messages; [`StoreUri::parse`] reads it back.
impl std::fmt::Display for StoreUri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreUri::Dir(p) => write!(f, "dir:{}", p.display()),
            StoreUri::Ceph { conf } => match conf {
                Some(c) => write!(f, "ceph:{}", c.display()),
                None => f.write_str("ceph:"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_uris() {
        assert_eq!(
            StoreUri::parse(Some("dir:/x")).unwrap(),
            StoreUri::Dir("/x".into())
        );
        assert_eq!(
            StoreUri::parse(Some("ceph:")).unwrap(),
            StoreUri::Ceph { conf: None }
        );
        assert!(StoreUri::parse(Some("dir:")).is_err());
        let e = StoreUri::parse(Some("nosuch:/x")).unwrap_err();
        assert!(e.message.contains("nosuch:/x"));
    }

    #[test]
    fn text_form_reads_back() {
        for s in ["dir:/srv/images", "ceph:", "ceph:/etc/ceph/ceph.conf"] {
            let uri = StoreUri::parse(Some(s)).unwrap();
            assert_eq!(uri.to_string(), s);
            assert_eq!(StoreUri::parse(Some(&uri.to_string())).unwrap(), uri);
        }
    }
}
