//! `du`: provisioned and used space, like `rbd du`: one line per snapshot (what it
//! holds that the snapshot before does not: the objects written in between) and one for
//! the head (what it holds that the newest snapshot does not). As librbd: with fast-diff
//! from the object maps (each rebuilt from the objects when it cannot be trusted), whole
//! objects; with `--exact` or without fast-diff from the data objects' snap sets (see
//! diff.rs), exact byte ranges with `--exact`. Never from the data.

use super::diff::{
    diff_versions, find_version, maps_usable, snapset_extents, version_flags, versions,
};
use super::info::human_size;
use super::with_image;
use crate::cli::Format;
use crate::error::{Error, ErrorKind, Result};
use crate::spec::ImageSpec;
use crate::store::{
    ImageStore, OpenMode, Store, RBD_FEATURE_FAST_DIFF, RBD_FLAG_FAST_DIFF_INVALID,
};
use objmap::diff::DiffState;
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

/// `rbd du`'s options besides the image.
pub struct DuOptions {
    /// `--from-snap`: only the versions after this snapshot.
    pub from_snap: Option<String>,
    /// `--merge-snapshots`: the head's line carries every listed version's used space.
    pub merge_snapshots: bool,
    /// `--exact`: the bytes changed, not whole objects (reads every snap set).
    pub exact: bool,
    pub format: Format,
}

pub async fn du<S: Store>(store: &S, spec: &ImageSpec, opts: &DuOptions) -> Result<()> {
    let head = ImageSpec {
        snap: None,
        ..spec.clone()
    };
    let from = opts.from_snap.as_deref();
    let (id, lines) = with_image(store, &head, OpenMode::ReadOnly, async |img: &S::Image| {
        let h = img.header();
        let vs = versions(&h);
        // rbd du's warnings, on stderr, word for word.
        if h.features & RBD_FEATURE_FAST_DIFF == 0 {
            eprintln!(
                "warning: fast-diff map is not enabled for {}. operation may be slow.",
                spec.name
            );
        }
        // `rbd du IMAGE@SNAP`: the snapshots up to SNAP, without the head.
        let last = find_version(&vs, &head, spec.snap.as_deref())?;
        // `--from-snap S`: the versions after S (rbd's order of checks and errors).
        let first = match from {
            None => 0,
            Some(f) => {
                let at = find_version(&vs, &head, Some(f))?;
                if spec.snap.is_some() && at == last {
                    return Ok((h.id, Vec::new())); // rbd prints nothing at all
                }
                if at > last {
                    return Err(Error::new(
                        ErrorKind::InvalidInput,
                        format!("--from-snap {f} is newer than {spec}",),
                    ));
                }
                at + 1
            }
        };
        let prev_user = |i: usize| (0..i).rev().find(|&j| vs[j].user);
        // Each user version against the user version before it (the first against
        // nothing), as librbd's diff_iterate without the parent's data: from the maps
        // of the versions between (in the trash: not listed, but their maps are part of
        // the history, as librbd's diff goes through them) where they are usable and
        // --exact is not given, else from the objects' snap sets.
        let mut lines = Vec::new();
        for (i, v) in vs.iter().enumerate().take(last + 1).skip(first) {
            if !v.user {
                continue;
            }
            let from = prev_user(i);
            if version_flags(store, img, &head, v).await? & RBD_FLAG_FAST_DIFF_INVALID != 0 {
                let at = v.name.as_ref().map(|n| format!("@{n}")).unwrap_or_default();
                eprintln!(
                    "warning: fast-diff map is invalid for {}{at}. operation may be slow.",
                    spec.name
                );
            }
            let maps =
                !opts.exact && maps_usable(store, img, &head, &vs, from.unwrap_or(0), i).await?;
            let used = if maps {
                let d = diff_versions(store, img, &head, &vs, from, i).await?;
                used(&d, h.object_size(), v.size)
            } else {
                snapset_extents(store, img, &head, &vs, from, i, v.size, !opts.exact, &[])
                    .await?
                    .iter()
                    .filter(|e| e.2)
                    .map(|e| e.1)
                    .sum()
            };
            lines.push(Line {
                snap: v.name.clone().zip(v.snap),
                provisioned: v.size,
                used,
            });
        }
        Ok((h.id, lines))
    })
    .await?;
    if lines.is_empty() {
        return Ok(());
    }
    let format = opts.format;
    // As rbd: the total provisioned is the head's size, or with a snapshot named, the
    // sum of the listed snapshots' sizes.
    let total_prov: u64 = if spec.snap.is_some() {
        lines.iter().map(|l| l.provisioned).sum()
    } else {
        lines.last().map_or(0, |l| l.provisioned)
    };
    let total_used: u64 = lines.iter().map(|l| l.used).sum();
    // `--merge-snapshots`: as rbd, the snapshots' lines are left out and the head's line
    // carries everything listed (with a snapshot named there is no head line).
    let count = lines.len();
    let lines: Vec<Line> = if opts.merge_snapshots {
        lines
            .into_iter()
            .filter(|l| l.snap.is_none())
            .map(|l| Line {
                used: total_used,
                ..l
            })
            .collect()
    } else {
        lines
    };
    match format {
        // rbd's key order; the totals only come with a whole pool's du.
        Format::Json => {
            let images: Vec<String> = lines
                .iter()
                .map(|l| {
                    let snap = match &l.snap {
                        Some((name, sid)) => {
                            format!(r#""snapshot":{},"snapshot_id":{sid},"#, json!(name))
                        }
                        None => String::new(),
                    };
                    format!(
                        r#"{{"name":{},"id":{},{snap}"provisioned_size":{},"used_size":{}}}"#,
                        json!(spec.name),
                        json!(id),
                        l.provisioned,
                        l.used
                    )
                })
                .collect();
            println!(r#"{{"images":[{}]}}"#, images.join(","));
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
            if count > 1 {
                rows.push(vec![
                    "<TOTAL>".to_string(),
                    human_size(total_prov),
                    human_size(total_used),
                ]);
            }
            let cols = [("NAME", false), ("PROVISIONED", true), ("USED", true)];
            if rows.is_empty() {
                // rbd prints the headings of an empty table (--merge-snapshots of a
                // snapshot); no heading at all comes only from an empty diff.
                println!("NAME  PROVISIONED  USED");
            }
            print!("{}", text_table(&cols, &rows));
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
