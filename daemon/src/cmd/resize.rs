//! `resize`: here when the image is not in use, else through the process that holds it.

use crate::config::Config;
use crate::error::{ErrorKind, Result};
use crate::image;
use crate::spec::ImageSpec;
use crate::store::{OwnerAction, Store};

/// Resizes an image that is not in use here, or asks the process serving it to.
pub async fn resize<S: Store>(
    store: &S,
    spec: &ImageSpec,
    size: u64,
    allow_shrink: bool,
) -> Result<()> {
    let opts = image::OpenOptions {
        read_only: false,
        shared_default: Config::load()?.shared_default,
        checkpoint_idle: None,
    };
    match image::Image::open(store, spec, &opts).await {
        Ok(img) => {
            let r = img.resize(size, allow_shrink).await;
            let c = img.close().await;
            r?;
            c?;
        }
        Err(e) if e.kind == ErrorKind::Busy => {
            let action = OwnerAction::Resize { size, allow_shrink };
            store.ask_holder(spec, &action, &mut |_, _| {}).await?;
        }
        Err(e) => return Err(e),
    }
    println!("{spec}: size {size} bytes");
    Ok(())
}
