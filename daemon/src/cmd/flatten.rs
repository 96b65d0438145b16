//! `flatten`: copies up everything a clone still reads from its ancestors, then
//! detaches it from its parent (`rbd flatten`).

use crate::config::Config;
use crate::error::{Error, ErrorKind, Result};
use crate::image;
use crate::progress::Progress;
use crate::spec::ImageSpec;
use crate::store::{ImageStore, OpenMode, Store};

/// Flattens a clone that is not in use (a served image must be flattened by the
/// process serving it, which does not take that request yet).
pub async fn flatten<S: Store>(store: &S, spec: &ImageSpec) -> Result<()> {
    // Refused before anything is written (opening for writing sets the dirty flag).
    let peek = store.open_image(spec, OpenMode::ReadOnly).await?;
    let parent = peek.header().parent;
    peek.close().await?;
    if parent.is_none() {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!("image {spec} is not a clone: nothing to flatten"),
        ));
    }
    let opts = image::OpenOptions {
        read_only: false,
        shared_default: Config::load()?.shared_default,
        checkpoint_idle: None,
    };
    let img = match image::Image::open(store, spec, &opts).await {
        Ok(img) => img,
        Err(e) if e.kind == ErrorKind::Busy => {
            return Err(Error::new(
                ErrorKind::Busy,
                format!(
                    "image {spec} is in use; stop serving it before flattening it ({})",
                    e.message
                ),
            ))
        }
        Err(e) => return Err(e),
    };
    let mut progress = Progress::new(format!("flattening {spec}: objects copied up or checked"));
    let r = img.flatten(|_, _| {
        progress.tick();
    });
    let r = r.await;
    let c = img.close().await;
    r?;
    c?;
    println!("{spec}: flattened ({} objects checked)", progress.count());
    Ok(())
}
