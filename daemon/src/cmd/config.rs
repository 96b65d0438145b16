//! `config`: show or change per-image settings (`shared`).

use super::with_image;
use crate::config::Config;
use crate::error::{Error, ErrorKind, Result};
use crate::image::{self, shared_setting, META_SHARED};
use crate::spec::ImageSpec;
use crate::store::{ImageStore, OpenMode, Store};

pub async fn config<S: Store>(store: &S, spec: &ImageSpec, setting: Option<&str>) -> Result<()> {
    let shared_default = Config::load()?.shared_default;
    match setting {
        None => {
            let (v, explicit) =
                with_image(store, spec, OpenMode::ReadOnly, async |img: &S::Image| {
                    let explicit = img.get_meta(META_SHARED).await?.is_some();
                    Ok((shared_setting(img, spec, shared_default).await?, explicit))
                })
                .await?;
            let src = if explicit { "image" } else { "default" };
            println!("shared={v} ({src})");
            Ok(())
        }
        Some(s) => {
            let Some((k, v)) = s.split_once('=') else {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    format!("invalid setting {s:?} (expected shared=true|false)"),
                ));
            };
            if k.trim() != "shared" {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    format!("unknown setting {:?} (known: shared)", k.trim()),
                ));
            }
            let b = image::parse_bool("shared", v)?;
            with_image(store, spec, OpenMode::ReadWrite, async |img: &S::Image| {
                img.set_meta(META_SHARED, if b { "true" } else { "false" })
                    .await
            })
            .await?;
            println!("shared={b}");
            Ok(())
        }
    }
}
