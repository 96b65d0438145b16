//! `ls`: the images of a pool (or of an RBD namespace in it); with `--long`, as `rbd ls
//! -l`: each image and its user snapshots with size, parent, format, protection and lock.

use super::info::human_size;
use super::table::text_table;
use crate::cli::Format;
use crate::error::Result;
use crate::spec::{ImageSpec, DEFAULT_POOL};
use crate::store::{ImageStore, OpenMode, ParentInfo, Store};
use serde_json::{json, Map, Value};

pub async fn ls<S: Store>(store: &S, pool: Option<&str>, long: bool, format: Format) -> Result<()> {
    let pool = pool.unwrap_or(DEFAULT_POOL);
    // The same rules as the pool (and namespace) part of an image spec.
    crate::spec::parse_pool_spec(pool)?;
    let names = store.list_images(pool).await?;
    if !long {
        match format {
            Format::Json => println!("{}", super::json_text(&json!(names).to_string())),
            Format::Plain => {
                for n in names {
                    println!("{n}");
                }
            }
        }
        return Ok(());
    }
    let entries: Vec<Entry> = super::each_pool_image(store, pool, async |spec: &ImageSpec| {
        long_entries(store, spec).await
    })
    .await?
    .into_iter()
    .flatten()
    .collect();
    match format {
        Format::Json => {
            let v: Vec<Value> = entries.iter().map(Entry::json).collect();
            println!("{}", super::json_text(&json!(v).to_string()));
        }
        Format::Plain => {
            const COLUMNS: [(&str, bool); 6] = [
                ("NAME", false),
                ("SIZE", true),
                ("PARENT", false),
                ("FMT", true),
                ("PROT", false),
                ("LOCK", false),
            ];
            let rows: Vec<Vec<String>> = entries.iter().map(Entry::row).collect();
            print!("{}", text_table(&COLUMNS, &rows));
        }
    }
    Ok(())
}

/// One line of `rbd ls -l`: an image (no `snap`) or one of its user snapshots.
struct Entry {
    image: String,
    id: String,
    snap: Option<(String, u64, bool)>,
    size: u64,
    parent: Option<ParentInfo>,
    /// Some(true) exclusive, Some(false) shared, None unlocked (images only).
    locked: Option<bool>,
}

impl Entry {
    fn row(&self) -> Vec<String> {
        let name = match &self.snap {
            Some((s, _, _)) => format!("{}@{s}", self.image),
            None => self.image.clone(),
        };
        let parent = self.parent.as_ref().map(|p| p.spec.to_string());
        let prot = matches!(self.snap, Some((_, _, true))).then_some("yes");
        let lock = self.locked.map(|x| if x { "excl" } else { "shr" });
        vec![
            name,
            human_size(self.size),
            parent.unwrap_or_default(),
            "2".into(),
            prot.unwrap_or_default().into(),
            lock.unwrap_or_default().into(),
        ]
    }

    /// rbd's fields, in its order.
    fn json(&self) -> Value {
        let mut o = Map::new();
        o.insert("image".into(), json!(self.image));
        o.insert("id".into(), json!(self.id));
        if let Some((name, id, _)) = &self.snap {
            o.insert("snapshot".into(), json!(name));
            o.insert("snapshot_id".into(), json!(id));
        }
        o.insert("size".into(), json!(self.size));
        if let Some(p) = &self.parent {
            o.insert(
                "parent".into(),
                json!({
                    "pool": p.spec.pool,
                    "pool_namespace": p.spec.namespace,
                    "image": p.spec.name,
                    "snapshot": p.spec.snap.as_deref().unwrap_or(""),
                }),
            );
        }
        o.insert("format".into(), json!(2));
        match &self.snap {
            Some((_, _, protected)) => {
                o.insert("protected".into(), json!(protected.to_string()));
            }
            None => {
                if let Some(x) = self.locked {
                    let kind = if x { "exclusive" } else { "shared" };
                    o.insert("lock_type".into(), json!(kind));
                }
            }
        }
        Value::Object(o)
    }
}

/// The image's line and its user snapshots' (each opened at the snapshot for the parent
/// it had: a flatten leaves the snapshots' parents in place without deep-flatten).
async fn long_entries<S: Store>(store: &S, spec: &ImageSpec) -> Result<Vec<Entry>> {
    let (h, details) =
        super::with_image(store, spec, OpenMode::ReadOnly, async |img: &S::Image| {
            Ok((img.header(), img.details().await?))
        })
        .await?;
    let mut out = vec![Entry {
        image: spec.name.clone(),
        id: h.id.clone(),
        snap: None,
        size: h.size,
        parent: h.parent.clone(),
        locked: details.locked,
    }];
    let mut snaps: Vec<_> = h.snaps.iter().filter(|s| s.is_user()).collect();
    snaps.sort_by_key(|s| s.id);
    for s in snaps {
        let at = ImageSpec {
            snap: Some(s.name.clone()),
            ..spec.clone()
        };
        let parent = super::with_image(store, &at, OpenMode::ReadOnly, async |img: &S::Image| {
            Ok(img.header().parent)
        })
        .await?;
        out.push(Entry {
            image: spec.name.clone(),
            id: h.id.clone(),
            snap: Some((s.name.clone(), s.id, s.protected)),
            size: s.size,
            parent,
            locked: None,
        });
    }
    Ok(out)
}
