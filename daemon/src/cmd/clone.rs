//! `clone`: a copy-on-write child of a snapshot, like `rbd clone`.

use super::create::{parse_features, stripe_unit, with_fast_diff};
use super::with_image;
use crate::error::{Error, ErrorKind, Result};
use crate::parse::parse_object_size;
use crate::spec::ImageSpec;
use crate::store::{
    CloneOptions, ImageStore, OpenMode, Store, RBD_FEATURE_DATA_POOL, RBD_FEATURE_FAST_DIFF,
    RBD_FEATURE_LAYERING, RBD_FEATURE_MIGRATING, RBD_FEATURE_NON_PRIMARY, RBD_FEATURE_OPERATIONS,
    RBD_FEATURE_STRIPINGV2,
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
    with_fast_diff(parent & !IMPLICIT)
}

/// What the command line says of the child, beside the two specs.
#[derive(Debug, Clone, Default)]
pub struct CloneArgs {
    pub clone_format: u8,
    pub object_size: Option<String>,
    pub image_features: Vec<String>,
    pub stripe_unit: Option<String>,
    pub stripe_count: Option<String>,
    pub data_pool: Option<String>,
}

pub async fn clone<S: Store>(
    store: &S,
    parent: &ImageSpec,
    child: &ImageSpec,
    a: &CloneArgs,
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
    let order = match &a.object_size {
        Some(s) => parse_object_size(s)?,
        None => h.order,
    };
    // As librbd's CloneRequest: the features asked for, else the parent's; either way
    // the child needs layering.
    let features = if a.image_features.is_empty() {
        clone_features(h.features)
    } else {
        let f = parse_features(&a.image_features.join(","))
            .map_err(|e| e.context("--image-feature"))?;
        with_fast_diff(f & !RBD_FEATURE_STRIPINGV2)
    };
    if features & RBD_FEATURE_LAYERING == 0 {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!("cannot clone {parent} into {child}: a clone needs the layering feature"),
        ));
    }
    // The stripe settings asked for (both, as librbd requires), else the parent's.
    let stripe_unit = if a.stripe_unit.is_some() || a.stripe_count.is_some() {
        Some(
            stripe_unit(a.stripe_unit.as_deref(), a.stripe_count.as_deref(), order)?
                .unwrap_or(1u64 << order),
        )
    } else {
        None
    };
    // librbd makes the child as any new image: the child pool's rbd_default_data_pool
    // unless --data-pool names one (a clone does not inherit its parent's).
    let data_pool = match &a.data_pool {
        Some(p) => Some(p.clone()),
        None => store.create_defaults(&child.pool_spec()).await?.data_pool,
    };
    let opts = CloneOptions {
        clone_format: a.clone_format,
        features,
        order,
        data_pool,
        stripe_unit,
    };
    crate::image::check_map_size(features, h.size, order)?;
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
