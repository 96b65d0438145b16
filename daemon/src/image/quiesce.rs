//! `--quiesce` in the image layer: the hook run around a snapshot taken for another
//! client (the directory store's `rados-nbd snap create` of an image in use), and the
//! hook handed to the store, which runs it for its own quiesce requests (Ceph: librbd's
//! quiesce notifications on the header).

use super::Image;
use crate::error::Result;
use crate::quiesce::{Phase, QuiesceHook};
use crate::store::{ImageStore, QuiesceMode};
use std::sync::Arc;

impl<S: ImageStore> Image<S> {
    /// `--quiesce`: from now on snapshots asked of this holder run `hook` around them.
    /// Once; false when already on.
    pub fn enable_quiesce(&self, hook: QuiesceHook) -> bool {
        let hook = Arc::new(hook);
        if self.quiesce.set(hook.clone()).is_err() {
            return false;
        }
        self.store.enable_quiesce(hook);
        true
    }

    /// A snapshot asked by another client: with `--quiesce` (and unless `mode` skips it)
    /// the hook quiesces first; when that fails the snapshot is not taken (unless `mode`
    /// ignores it) and, as in rbd-nbd, no unquiesce follows. After the snapshot (taken or
    /// failed) the hook unquiesces; a failed unquiesce is logged, the snapshot stays.
    pub(super) async fn snap_create_quiesced(&self, name: &str, mode: QuiesceMode) -> Result<()> {
        let hook = match (self.quiesce.get(), mode) {
            (Some(h), QuiesceMode::Run | QuiesceMode::IgnoreError) => h.clone(),
            _ => return self.snap_create(name).await.map(|_| ()),
        };
        if let Err(e) = hook.run(Phase::Quiesce).await {
            if mode != QuiesceMode::IgnoreError {
                return Err(e.context(format!(
                    "quiescing {} for snapshot {name}; no snapshot taken",
                    self.spec
                )));
            }
            tracing::warn!(
                "{e}; taking snapshot {}@{name} anyway (quiesce errors ignored)",
                self.spec
            );
            return self.snap_create(name).await.map(|_| ());
        }
        let r = self.snap_create(name).await.map(|_| ());
        if let Err(e) = hook.run(Phase::Unquiesce).await {
            tracing::warn!("after snapshot {}@{name}: {e}", self.spec);
        }
        r
    }
}
