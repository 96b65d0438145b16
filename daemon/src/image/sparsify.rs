//! `rbd sparsify` asked of the lock owner: every object that exists is sparsified by the
//! store (Ceph: cls_rbd's `sparsify` on the OSD: zero runs of the sparse size punched,
//! trailing zeros truncated, an object of zeros removed), as librbd's SparsifyRequest does,
//! with the map following each removal (and every object left marked EXISTS, as librbd
//! marks it, cut or not). Objects inside a clone's parent overlap are never
//! removed: an empty object there hides the parent's data (librbd's rule too).

use super::Image;
use crate::error::{Error, ErrorKind, Result};
use crate::store::ImageStore;
use objmap::ObjectState;

impl<S: ImageStore> Image<S> {
    pub async fn sparsify(
        &self,
        sparse_size: u64,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<()> {
        self.check_writable()?;
        let spec = &self.spec;
        if self.shared {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!("{spec} is a shared image: sparsifying one is not supported"),
            ));
        }
        let ctx = |e: Error| e.context(format!("sparsifying {spec}"));
        // Which objects exist must be known: a rebuild under way ends first.
        self.whole_map("sparsifying").await.map_err(ctx)?;
        let osize = self.header.object_size();
        let total = self.size().div_ceil(osize);
        let one = |objno: u64| async move {
            // Under the gate (`for_each_object`), so the size and the overlap hold for
            // this step; a resize asked meanwhile (it runs beside) may have changed them
            // since the start: nothing past the end, and a lowered overlap lets more go.
            if objno >= self.size().div_ceil(osize) || self.is_nonexistent(objno) {
                return Ok(());
            }
            let overlap_objects = self
                .chain()
                .map(|c| c.overlap().div_ceil(osize))
                .unwrap_or(0);
            let _o = self.lock_for(objno).write().await;
            let remove_empty = objno >= overlap_objects;
            // A removal changes the map: the flag is set before the store is touched.
            self.dirty_before(|| remove_empty).await?;
            let exists = self
                .store
                .sparsify_object(objno, sparse_size, remove_empty)
                .await?;
            if !exists {
                if let Some(m) = self.map_now().as_deref() {
                    m.set(objno, ObjectState::Nonexistent);
                }
            } else if remove_empty {
                // As librbd's SparsifyRequest: an object left (cut or not) is EXISTS, one
                // unchanged since the last snapshot included. A cut one was cloned for
                // that snapshot: EXISTS_CLEAN would hide the change from fast-diff.
                self.mark_changed(objno);
            }
            Ok(())
        };
        progress(0, total);
        self.for_each_object(total, one, progress)
            .await
            .map_err(ctx)?;
        tracing::info!("sparsified {spec} (runs of {sparse_size} zero bytes)");
        Ok(())
    }
}
