//! `children`: the clones of a snapshot, printed as `rbd children` does.

use crate::cli::Format;
use crate::error::{Error, ErrorKind, Result};
use crate::spec::ImageSpec;
use crate::store::Store;
use serde_json::json;

pub async fn children<S: Store>(store: &S, parent: &ImageSpec, format: Format) -> Result<()> {
    if parent.snap.is_none() {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!("cannot list children of {parent}: name a snapshot (IMAGE@SNAP)"),
        ));
    }
    let kids = store.children(parent).await?;
    match format {
        Format::Json => {
            let v: Vec<_> = kids
                .iter()
                .map(|c| json!({"pool": c.pool, "pool_namespace": c.namespace, "image": c.name}))
                .collect();
            println!("{}", super::json_text(&json!(v).to_string()));
        }
        Format::Plain => {
            for c in &kids {
                println!("{c}");
            }
        }
    }
    Ok(())
}
