//! `info`: an image's size, layout, features and flags, printed as `rbd info` does.

use super::with_image;
use crate::cli::Format;
use crate::config::Config;
use crate::error::Result;
use crate::image::shared_setting;
use crate::spec::ImageSpec;
use crate::store::{
    ImageStore, OpenMode, Store, RBD_FLAG_FAST_DIFF_INVALID, RBD_FLAG_OBJECT_MAP_INVALID,
};
use serde_json::json;

/// `1 GiB`, `4 MiB`, `1.5 GiB`, like `rbd` prints sizes.
pub fn human_size(n: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut i = 0;
    while i + 1 < UNITS.len() && n >= 1u64 << (10 * (i + 1)) {
        i += 1;
    }
    let unit = 1u64 << (10 * i);
    if n.is_multiple_of(unit) {
        return format!("{} {}", n / unit, UNITS[i]);
    }
    // Ceph's byte_u_t: as many decimals (2, 1, 0) as fit in 7 characters with the unit,
    // never trimmed: "2.3 MiB", "2.0 MiB", "228 KiB", "1024 MiB".
    let v = n as f64 / unit as f64;
    let mut s = String::new();
    for precision in [2, 1, 0] {
        s = format!("{v:.precision$} {}", UNITS[i]);
        if s.len() <= 7 {
            break;
        }
    }
    s
}

/// librbd's feature names, bit by bit.
pub const FEATURE_NAMES: [&str; 11] = [
    "layering",
    "striping",
    "exclusive-lock",
    "object-map",
    "fast-diff",
    "deep-flatten",
    "journaling",
    "data-pool",
    "operations",
    "migrating",
    "non-primary",
];

pub fn feature_names(features: u64) -> Vec<String> {
    (0..64)
        .filter(|b| features & (1u64 << b) != 0)
        .map(|b| {
            FEATURE_NAMES
                .get(b as usize)
                .map(|s| s.to_string())
                .unwrap_or_else(|| format!("unknown-{:#x}", 1u64 << b))
        })
        .collect()
}

/// librbd's op feature names (RBD_OPERATION_FEATURE_*), bit by bit, as `rbd info` lists
/// them (bits it has no name for are left out, as rbd leaves them).
pub fn op_feature_names(op_features: u64) -> Vec<String> {
    const NAMES: [&str; 4] = ["clone-parent", "clone-child", "group", "snap-trash"];
    (0..NAMES.len())
        .filter(|b| op_features & (1u64 << b) != 0)
        .map(|b| NAMES[b].to_string())
        .collect()
}

pub fn flag_names(flags: u64) -> Vec<String> {
    (0..64)
        .filter(|b| flags & (1u64 << b) != 0)
        .map(|b| match 1u64 << b {
            RBD_FLAG_OBJECT_MAP_INVALID => "object map invalid".to_string(),
            RBD_FLAG_FAST_DIFF_INVALID => "fast diff invalid".to_string(),
            f => format!("unknown flag {f:#x}"),
        })
        .collect()
}

pub async fn info<S: Store>(store: &S, spec: &ImageSpec, format: Format) -> Result<()> {
    let shared_default = Config::load()?.shared_default;
    let (h, shared, data_pool, details) =
        with_image(store, spec, OpenMode::ReadOnly, async |img: &S::Image| {
            let shared = shared_setting(img, spec, shared_default).await?;
            Ok((img.header(), shared, img.data_pool(), img.details().await?))
        })
        .await?;
    let op_features = op_feature_names(details.op_features);
    // rbd info's three timestamps, each shown only when the image has one.
    let stamps: Vec<(&str, String)> = [
        ("create_timestamp", details.create_timestamp),
        ("access_timestamp", details.access_timestamp),
        ("modify_timestamp", details.modify_timestamp),
    ]
    .into_iter()
    .filter_map(|(k, t)| Some((k, super::snap::ctime(t?))))
    .collect();
    let snap = spec
        .snap
        .as_ref()
        .and_then(|n| h.snaps.iter().find(|s| s.is_user() && &s.name == n));
    let size = snap.map_or(h.size, |s| s.size);
    let objects = size.div_ceil(h.object_size());
    let features = feature_names(h.features);
    let flags = flag_names(h.flags);
    match format {
        Format::Json => {
            // rbd info's fields in its order, then ours (pool, namespace, shared, snapshots).
            let mut v = serde_json::Map::new();
            let mut put = |k: &str, x: serde_json::Value| {
                v.insert(k.to_string(), x);
            };
            put("name", json!(spec.name));
            put("id", json!(h.id));
            put("size", json!(size));
            put("objects", json!(objects));
            put("order", json!(h.order));
            put("object_size", json!(h.object_size()));
            put("snapshot_count", json!(h.snaps.len()));
            if let Some(dp) = &data_pool {
                put("data_pool", json!(dp));
            }
            put("block_name_prefix", json!(h.object_prefix));
            put("format", json!(2));
            put("features", json!(features));
            put("op_features", json!(op_features));
            put("flags", json!(flags));
            for (k, t) in &stamps {
                put(k, json!(t));
            }
            if let Some(s) = snap {
                // rbd info IMAGE@SNAP's, a string as rbd writes it.
                put("protected", json!(s.protected.to_string()));
            }
            if let Some(p) = &h.parent {
                // rbd info's `parent` object.
                put(
                    "parent",
                    json!({
                        "pool": p.spec.pool,
                        "pool_namespace": p.spec.namespace,
                        "image": p.spec.name,
                        "id": p.image_id,
                        "snapshot": p.spec.snap.as_deref().unwrap_or(""),
                        "trash": p.in_trash,
                        "overlap": p.overlap,
                    }),
                );
            }
            if let Some((unit, count)) = details.stripe {
                put("stripe_unit", json!(unit));
                put("stripe_count", json!(count));
            }
            put("pool", json!(spec.pool));
            put("namespace", json!(spec.namespace));
            put("shared", json!(shared));
            put(
                "snapshots",
                json!(h
                    .snaps
                    .iter()
                    .map(|s| json!({"id": s.id, "name": s.name, "size": s.size}))
                    .collect::<Vec<_>>()),
            );
            let v = serde_json::Value::Object(v);
            println!("{}", super::json_text(&v.to_string()));
        }
        Format::Plain => {
            println!("rbd image '{}':", spec.name);
            println!("\tsize {} in {} objects", human_size(size), objects);
            println!(
                "\torder {} ({} objects)",
                h.order,
                human_size(h.object_size())
            );
            println!("\tsnapshot_count: {}", h.snaps.len());
            println!("\tid: {}", h.id);
            if let Some(dp) = &data_pool {
                println!("\tdata_pool: {dp}");
            }
            println!("\tblock_name_prefix: {}", h.object_prefix);
            println!("\tformat: 2");
            println!("\tfeatures: {}", features.join(", "));
            println!("\top_features: {}", op_features.join(", "));
            println!("\tflags: {}", flags.join(", "));
            for (k, t) in &stamps {
                println!("\t{k}: {t}");
            }
            if let Some(s) = snap {
                println!(
                    "\tprotected: {}",
                    if s.protected { "True" } else { "False" }
                );
            }
            println!("\tshared: {shared}");
            for s in &h.snaps {
                println!("\tsnapshot {} {} ({})", s.id, s.name, human_size(s.size));
            }
            if let Some(p) = &h.parent {
                if p.in_trash {
                    println!("\tparent: {} (trash {})", p.spec, p.image_id);
                } else {
                    println!("\tparent: {}", p.spec);
                }
                println!("\toverlap: {}", human_size(p.overlap));
            }
            if let Some((unit, count)) = details.stripe {
                println!("\tstripe unit: {}", human_size(unit));
                println!("\tstripe count: {count}");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::DEFAULT_FEATURES;

    #[test]
    fn sizes_print_like_rbd() {
        assert_eq!(human_size(4 << 20), "4 MiB");
        assert_eq!(human_size(10 << 30), "10 GiB");
        assert_eq!(human_size(3 << 29), "1.5 GiB");
        // One decimal, rounded, not trimmed, as Ceph's byte_u_t prints (`rbd du --exact`).
        assert_eq!(human_size(2_369_536), "2.3 MiB");
        assert_eq!(human_size((2 << 20) + 1000), "2.0 MiB");
        assert_eq!(human_size((1 << 30) - 1), "1024 MiB");
        assert_eq!(human_size(232_960), "228 KiB");
        assert_eq!(human_size(12_900_000), "12 MiB");
        assert_eq!(human_size(1536), "1.5 KiB");
        assert_eq!(human_size(100), "100 B");
        assert_eq!(human_size(0), "0 B");
    }

    #[test]
    fn names() {
        assert_eq!(
            feature_names(DEFAULT_FEATURES),
            [
                "layering",
                "exclusive-lock",
                "object-map",
                "fast-diff",
                "deep-flatten"
            ]
        );
        assert_eq!(flag_names(3), ["object map invalid", "fast diff invalid"]);
        assert_eq!(op_feature_names(0b1010), ["clone-child", "snap-trash"]);
        assert_eq!(op_feature_names(1 | 1 << 40), ["clone-parent"]);
        assert!(flag_names(0).is_empty());
    }
}
