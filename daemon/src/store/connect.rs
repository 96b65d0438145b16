//! The one place a store is opened from its URI: the commands, `serve` and the kernel daemon
//! all come here, and the Ceph options travel as values, not through process-wide state.

use super::dir::DirStore;
use super::uri::StoreUri;
use crate::error::Result;
use std::path::PathBuf;

/// What reaching a Ceph store takes besides its URI: `--id`, `--keyring` and
/// `--allow-encrypted`. A directory store uses none of them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CephAccess {
    /// Client id, like `rbd --id` (`admin`, not `client.admin`).
    pub id: Option<String>,
    pub keyring: Option<PathBuf>,
    /// Serve an image that starts with a LUKS header as its raw LUKS volume instead of
    /// refusing it.
    pub allow_encrypted: bool,
    /// What a read-write open does when a live client holds the image's lock.
    pub lock_at_open: LockAtOpen,
}

/// What a read-write open of a Ceph image does when a live client holds its exclusive
/// lock (a dead one is fenced and its lock broken whatever this says).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LockAtOpen {
    /// Fail with "in use": the commands (`resize`, `snap create`, ...) then ask the
    /// holder to do their work instead.
    #[default]
    Refuse,
    /// `serve|map --wait-for-lock`: ask the holder to hand the lock over (live
    /// migration: the source writes its map and releases) and wait, bounded.
    Ask,
    /// `serve|map` without `--exclusive`, as librbd (so rbd-nbd) opens an image in use:
    /// serve without the lock; reads go without it (and without the map, which only an
    /// owner can trust), the first write asks the holder for it.
    Defer,
}

impl LockAtOpen {
    /// For `serve` and `map`: `--wait-for-lock` asks, `--exclusive` refuses (it must hold
    /// the lock all along), the default defers as librbd does.
    pub fn for_serving(wait_for_lock: bool, exclusive: bool) -> Self {
        if wait_for_lock {
            LockAtOpen::Ask
        } else if exclusive {
            LockAtOpen::Refuse
        } else {
            LockAtOpen::Defer
        }
    }
}

/// An opened store, whichever kind the URI named. Callers match once and run code generic
/// over [`super::Store`].
pub enum AnyStore {
    Dir(DirStore),
    #[cfg(feature = "ceph")]
    Ceph(super::ceph::CephStore),
}

/// Opens the store `uri` names (for Ceph: connects to the cluster).
pub async fn connect(uri: &StoreUri, ceph: &CephAccess) -> Result<AnyStore> {
    match uri {
        StoreUri::Dir(p) => Ok(AnyStore::Dir(DirStore::new(p.clone()))),
        #[cfg(feature = "ceph")]
        StoreUri::Ceph { conf } => {
            use super::ceph::{CephOptions, CephStore};
            let path = |p: &PathBuf| p.to_string_lossy().into_owned();
            let opts = CephOptions {
                conf: conf.as_ref().map(path),
                id: ceph.id.clone(),
                keyring: ceph.keyring.as_ref().map(path),
                // Fail a request instead of hanging forever when the cluster is unreachable.
                options: vec![
                    ("rados_mon_op_timeout".into(), "60".into()),
                    ("client_mount_timeout".into(), "60".into()),
                ],
            };
            let st = CephStore::connect(opts).await?;
            Ok(AnyStore::Ceph(
                st.with_allow_encrypted(ceph.allow_encrypted)
                    .with_lock_at_open(ceph.lock_at_open),
            ))
        }
        #[cfg(not(feature = "ceph"))]
        StoreUri::Ceph { .. } => {
            use crate::error::{Error, ErrorKind};
            let _ = ceph;
            Err(Error::new(
                ErrorKind::Unsupported,
                "this build has no Ceph support (rebuild with --features ceph; needs librados-dev and libradospp-dev)",
            ))
        }
    }
}
