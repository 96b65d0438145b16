//! `clone`: a copy-on-write child of a snapshot, like `rbd clone`.

use super::with_image;
use crate::error::{Error, ErrorKind, Result};
use crate::parse::parse_object_size;
use crate::spec::ImageSpec;
use crate::store::{
    CloneOptions, ImageStore, OpenMode, Store, RBD_FEATURE_DATA_POOL, RBD_FEATURE_FAST_DIFF,
    RBD_FEATURE_MIGRATING, RBD_FEATURE_NON_PRIMARY, RBD_FEATURE_OPERATIONS, RBD_FEATURE_STRIPINGV2,
};

/// librbd's RBD_FEATURES_IMPLICIT_ENABLE: what a clone does not inherit from its parent
/// as such (fast-diff comes back with object-map, as CreateRequest enables it).
const IMPLICIT: u64 = RBD_FEATURE_STRIPINGV2
    | RBD_FEATURE_DATA_POOL
    | RBD_FEATURE_FAST_DIFF
    | RBD_FEATURE_OPERATIONS
    | RBD_FEATURE_MIGRATING
    | RBD_FEATURE_NON_PRIMARY;

/// The child's features as `rbd clone` gives them without `--image-feature`: the
/// parent's, less the implicit ones, plus fast-diff where object-map is on.
pub fn clone_features(parent: u64) -> u64 {
    super::create::with_fast_diff(parent & !IMPLICIT)
}

pub async fn clone<S: Store>(
    store: &S,
    parent: &ImageSpec,
    child: &ImageSpec,
    clone_format: u8,
    object_size: Option<&str>,
    data_pool: Option<String>,
) -> Result<()> {
    if parent.snap.is_none() {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!("cannot clone {parent}: name the snapshot to clone (PARENT@SNAP)"),
        ));
    }
    let h = with_image(store, parent, OpenMode::ReadOnly, async |img: &S::Image| {
        Ok(img.header())
    })
    .await?;
    let order = match object_size {
        Some(s) => parse_object_size(s)?,
        None => h.order,
    };
    // librbd makes the child as any new image: the child pool's rbd_default_data_pool
    // unless --data-pool names one (a clone does not inherit its parent's).
    let data_pool = match data_pool {
        Some(p) => Some(p),
        None => store.create_defaults(&child.pool_spec()).await?.data_pool,
    };
    let opts = CloneOptions {
        clone_format,
        features: clone_features(h.features),
        order,
        data_pool,
    };
    store.clone_image(parent, child, &opts).await?;
    crate::image::write_empty_object_map(store, child).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn features_like_rbd_clone() {
        // Seen with Ceph 16.2: a parent with layering, exclusive-lock, object-map (no
        // fast-diff) gives a child with fast-diff; operations and striping are not copied.
        assert_eq!(clone_features(0x0d), 0x1d);
        assert_eq!(clone_features(0x3d | RBD_FEATURE_OPERATIONS), 0x3d);
        assert_eq!(clone_features(0x1 | RBD_FEATURE_STRIPINGV2), 0x1);
    }
}
