//! `du`: provisioned and used space, from the object map (rebuilt from the objects when
//! the image has none).

use super::info::human_size;
use super::{snap_of, with_image};
use crate::cli::Format;
use crate::error::Result;
use crate::image::{load_object_map, rebuild_map};
use crate::spec::ImageSpec;
use crate::store::{ImageHeader, ImageStore, OpenMode, Store, RBD_FEATURE_OBJECT_MAP};
use objmap::ObjectState;
use serde_json::json;

/// Bytes of object `objno` inside an image of `size`.
fn object_len(h: &ImageHeader, size: u64, objno: u64) -> u64 {
    h.object_size()
        .min(size.saturating_sub(objno * h.object_size()))
}

pub async fn du<S: Store>(store: &S, spec: &ImageSpec, format: Format) -> Result<()> {
    let (h, size, used) = with_image(store, spec, OpenMode::ReadOnly, async |img: &S::Image| {
        let h = img.header();
        let (snap, size) = snap_of(&h, spec)?;
        let count = size.div_ceil(h.object_size());
        let map = if h.features & RBD_FEATURE_OBJECT_MAP != 0 {
            load_object_map(img, spec, &h, snap, size).await?.0
        } else {
            rebuild_map(img, spec, count, snap).await?
        };
        let mut used = 0u64;
        for run in map.runs(0..count) {
            if run.state != ObjectState::Nonexistent {
                for o in run.start..run.start + run.len {
                    used += object_len(&h, size, o);
                }
            }
        }
        Ok((h, size, used))
    })
    .await?;
    let _ = h;
    match format {
        Format::Json => println!(
            "{}",
            json!({
                "images": [{"name": spec.name, "provisioned_size": size, "used_size": used}],
                "total_provisioned_size": size,
                "total_used_size": used,
            })
        ),
        Format::Plain => {
            let name = spec.to_string();
            let name = name
                .strip_prefix(&format!("{}/", spec.pool_spec()))
                .unwrap_or(&name);
            let w = name.len().max(4);
            println!("{:<w$}  {:>11}  {:>9}", "NAME", "PROVISIONED", "USED");
            println!(
                "{:<w$}  {:>11}  {:>9}",
                name,
                human_size(size),
                human_size(used)
            );
        }
    }
    Ok(())
}
