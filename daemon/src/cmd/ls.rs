//! `ls`: the images of a pool (or of an RBD namespace in it).

use crate::cli::Format;
use crate::error::Result;
use crate::spec::DEFAULT_POOL;
use crate::store::Store;
use serde_json::json;

pub async fn ls<S: Store>(store: &S, pool: Option<&str>, format: Format) -> Result<()> {
    let pool = pool.unwrap_or(DEFAULT_POOL);
    // The same rules as the pool (and namespace) part of an image spec.
    crate::spec::parse_pool_spec(pool)?;
    let names = store.list_images(pool).await?;
    match format {
        Format::Json => println!("{}", super::json_text(&json!(names).to_string())),
        Format::Plain => {
            for n in names {
                println!("{n}");
            }
        }
    }
    Ok(())
}
