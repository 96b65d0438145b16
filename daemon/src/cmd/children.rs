//! `children`: the clones of a snapshot (or of every snapshot of an image), printed as
//! `rbd children` does.

use crate::cli::Format;
use crate::error::{Error, ErrorKind, Result};
use crate::spec::ImageSpec;
use crate::store::Store;
use serde_json::json;

pub async fn children<S: Store>(
    store: &S,
    parent: &ImageSpec,
    snap_id: Option<u64>,
    all: bool,
    descendants: bool,
    format: Format,
) -> Result<()> {
    if let (Some(name), Some(id)) = (&parent.snap, snap_id) {
        // rbd: "trying to access snapshot using both name and id".
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!("children: snapshot {name} and --snap-id {id} both given; name one"),
        ));
    }
    let kids = store.children(parent, snap_id, descendants).await?;
    // Without --all, rbd leaves the clones in the trash out.
    let kids = kids.iter().filter(|c| all || !c.trash);
    match format {
        Format::Json => {
            let v: Vec<_> = kids
                .map(|c| {
                    let mut o = json!({
                        "pool": c.spec.pool,
                        "pool_namespace": c.spec.namespace,
                        "image": c.spec.name,
                    });
                    if all {
                        o["id"] = json!(c.id);
                        o["trash"] = json!(c.trash);
                    }
                    o
                })
                .collect();
            println!("{}", super::json_text(&json!(v).to_string()));
        }
        Format::Plain => {
            for c in kids {
                if c.trash {
                    println!("{} (trash {})", c.spec, c.id);
                } else {
                    println!("{}", c.spec);
                }
            }
        }
    }
    Ok(())
}
