//! A parent snapshot in the trash goes with its last clone: `rbd snap rm` of a snapshot
//! that format-2 clones use moves it to the trash namespace (the Ceph store does it, as
//! librbd's SnapshotRemoveRequest), and librbd's DetachChildRequest removes it once the
//! last clone is flattened or removed. This does the same after our `rm` (flatten does it
//! itself, in whichever process flattens: `Image::flatten`).

use crate::config::Config;
use crate::image;
use crate::spec::ImageSpec;
use crate::store::{ParentInfo, Store};

/// Removes `parent`'s snapshot if it is in the trash and no clone uses it any more.
/// Best effort, as librbd's (whose failure there does not fail the flatten or rm): a
/// parent in use by another client, say, keeps the snapshot, with a warning saying so.
pub async fn remove_if_unused<S: Store>(store: &S, parent: &ParentInfo) {
    let head = ImageSpec {
        snap: None,
        ..parent.spec.clone()
    };
    let what = format!("snapshot {} (id {}) of {head}", parent.spec, parent.snap_id);
    let r = async {
        let opts = image::OpenOptions {
            read_only: false,
            shared_default: Config::load()?.shared_default,
            checkpoint_idle: None,
        };
        let img = image::Image::open(store, &head, &opts).await?;
        image::remove_trashed_snap(img, parent.snap_id).await
    }
    .await;
    if let Err(e) = r {
        tracing::warn!("{what} stays in the trash: {e}");
    }
}
