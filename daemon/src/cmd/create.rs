//! `create`: a new image with the default features, like `rbd create`.

use super::parse_head_spec;
use crate::cli::CreateArgs;
use crate::error::Result;
use crate::image;
use crate::parse::{parse_image_size, parse_object_size};
use crate::store::{CreateOptions, Store, DEFAULT_FEATURES};

pub async fn create<S: Store>(store: &S, a: &CreateArgs) -> Result<()> {
    let spec = parse_head_spec(&a.image, "create")?;
    let size = parse_image_size(&a.size).map_err(|e| e.context("--size"))?;
    let order = parse_object_size(&a.object_size)?;
    let opts = CreateOptions {
        size,
        order,
        features: DEFAULT_FEATURES,
        data_pool: a.data_pool.clone(),
    };
    image::create_image(store, &spec, &opts).await
}
