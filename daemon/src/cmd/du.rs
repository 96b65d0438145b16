//! `du`: provisioned and used space, like `rbd du`: one line per snapshot (what it
//! holds that the snapshot before does not: the objects written in between) and one for
//! the head (what it holds that the newest snapshot does not), from the object maps (each
//! rebuilt from the objects when it cannot be trusted), never from the data.

use super::diff::{find_version, need_fast_diff, version_map, versions};
use super::info::human_size;
use super::with_image;
use crate::cli::Format;
use crate::error::Result;
use crate::spec::ImageSpec;
use crate::store::{ImageStore, OpenMode, Store};
use objmap::diff::{diff_maps, DiffState};
use serde_json::json;

/// One `rbd du` line.
struct Line {
    snap: Option<(String, u64)>,
    provisioned: u64,
    used: u64,
}

/// Bytes of the objects a diff lists as data, in a version of `size` bytes.
fn used(diff: &[DiffState], object_size: u64, size: u64) -> u64 {
    super::diff::extents(diff, object_size, size)
        .iter()
        .filter(|e| e.2)
        .map(|e| e.1)
        .sum()
}

pub async fn du<S: Store>(store: &S, spec: &ImageSpec, format: Format) -> Result<()> {
    let head = ImageSpec {
        snap: None,
        ..spec.clone()
    };
    let (id, lines) = with_image(store, &head, OpenMode::ReadOnly, async |img: &S::Image| {
        let h = img.header();
        let vs = versions(&h);
        // `rbd du IMAGE@SNAP`: the snapshots up to SNAP, without the head.
        let last = find_version(&vs, &head, spec.snap.as_deref())?;
        if last > 0 {
            need_fast_diff(&h, spec, "du")?;
        }
        // Each version against the one before (the first against nothing): every map is
        // loaded once.
        let mut lines = Vec::new();
        let mut prev = None;
        for v in &vs[..=last] {
            let map = version_map(store, img, &head, v).await?;
            let d = match &prev {
                None => diff_maps([&map], false),
                Some(p) => diff_maps([p, &map], true),
            };
            lines.push(Line {
                snap: v.name.clone().zip(v.snap),
                provisioned: v.size,
                used: used(&d, h.object_size(), v.size),
            });
            prev = Some(map);
        }
        Ok((h.id, lines))
    })
    .await?;
    // As rbd: the total provisioned is the head's size, or with a snapshot named, the
    // sum of the listed snapshots' sizes.
    let total_prov: u64 = if spec.snap.is_some() {
        lines.iter().map(|l| l.provisioned).sum()
    } else {
        lines.last().map_or(0, |l| l.provisioned)
    };
    let total_used: u64 = lines.iter().map(|l| l.used).sum();
    match format {
        Format::Json => {
            let images: Vec<_> = lines
                .iter()
                .map(|l| {
                    let mut o = json!({"name": spec.name, "id": id});
                    if let Some((name, sid)) = &l.snap {
                        o["snapshot"] = json!(name);
                        o["snapshot_id"] = json!(sid);
                    }
                    o["provisioned_size"] = json!(l.provisioned);
                    o["used_size"] = json!(l.used);
                    o
                })
                .collect();
            println!(
                "{}",
                json!({
                    "images": images,
                    "total_provisioned_size": total_prov,
                    "total_used_size": total_used,
                })
            );
        }
        Format::Plain => {
            let name = head.to_string();
            let name = name
                .strip_prefix(&format!("{}/", spec.pool_spec()))
                .unwrap_or(&name)
                .to_string();
            let mut rows: Vec<Vec<String>> = lines
                .iter()
                .map(|l| {
                    let n = match &l.snap {
                        Some((s, _)) => format!("{name}@{s}"),
                        None => name.clone(),
                    };
                    vec![n, human_size(l.provisioned), human_size(l.used)]
                })
                .collect();
            if rows.len() > 1 {
                rows.push(vec![
                    "<TOTAL>".to_string(),
                    human_size(total_prov),
                    human_size(total_used),
                ]);
            }
            print!(
                "{}",
                text_table(
                    &[("NAME", false), ("PROVISIONED", true), ("USED", true)],
                    &rows
                )
            );
        }
    }
    Ok(())
}

/// A table as Ceph's TextTable prints it (`rbd du`, `rbd diff`): each column as wide as
/// its widest cell, two spaces between columns, headings left-aligned, cells left- or
/// right-aligned (`right`) per column; nothing at all when there are no rows.
pub(super) fn text_table(cols: &[(&str, bool)], rows: &[Vec<String>]) -> String {
    if rows.is_empty() {
        return String::new();
    }
    let widths: Vec<usize> = cols
        .iter()
        .enumerate()
        .map(|(i, (h, _))| rows.iter().map(|r| r[i].len()).fold(h.len(), usize::max))
        .collect();
    let mut out = String::new();
    let mut line = |cells: Vec<(&str, bool)>| {
        let l: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|((c, right), &w)| {
                if *right {
                    format!("{c:>w$}")
                } else {
                    format!("{c:<w$}")
                }
            })
            .collect();
        out.push_str(&l.join("  "));
        out.push('\n');
    };
    line(cols.iter().map(|(h, _)| (*h, false)).collect());
    for r in rows {
        line(
            r.iter()
                .zip(cols)
                .map(|(c, (_, right))| (c.as_str(), *right))
                .collect(),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_table_pads_like_ceph() {
        let rows: Vec<Vec<String>> = [
            ["t2@a", "16 MiB", "8 MiB"],
            ["t2@b", "16 MiB", "4 MiB"],
            ["t2", "16 MiB", "0 B"],
            ["<TOTAL>", "16 MiB", "12 MiB"],
        ]
        .iter()
        .map(|r| r.iter().map(|c| c.to_string()).collect())
        .collect();
        // What `rbd du` (16.2.15) printed for the same cells, byte for byte.
        assert_eq!(
            text_table(
                &[("NAME", false), ("PROVISIONED", true), ("USED", true)],
                &rows
            ),
            "NAME     PROVISIONED  USED  \n\
             t2@a          16 MiB   8 MiB\n\
             t2@b          16 MiB   4 MiB\n\
             t2            16 MiB     0 B\n\
             <TOTAL>       16 MiB  12 MiB\n"
        );
        assert_eq!(text_table(&[("Offset", false)], &[]), "");
    }
}
