//! `du`: provisioned and used space, like `rbd du`: one line per snapshot (what it
//! holds that the snapshot before does not: the objects written in between) and one for
//! the head (what it holds that the newest snapshot does not). As librbd: with fast-diff
//! from the object maps (each rebuilt from the objects when it cannot be trusted), whole
//! objects; with `--exact` or without fast-diff from the data objects' snap sets (see
//! diff.rs), exact byte ranges with `--exact`. Never from the data.

use super::diff::{
    diff_versions, find_version, maps_usable, snapset_extents, version_flags, versions, Memo,
};
use super::info::human_size;
use super::table::text_table;
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

/// The du lines of one image (`spec` names a snapshot to stop at, or the head), and the
/// image's id.
async fn image_lines<S: Store>(
    store: &S,
    spec: &ImageSpec,
    opts: &DuOptions,
) -> Result<(String, Vec<Line>)> {
    let head = ImageSpec {
        snap: None,
        ..spec.clone()
    };
    let from = opts.from_snap.as_deref();
    let memo = &Memo::default();
    with_image(store, &head, OpenMode::ReadOnly, async |img: &S::Image| {
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
            if version_flags(store, img, &head, v, memo).await? & RBD_FLAG_FAST_DIFF_INVALID != 0 {
                let at = v.name.as_ref().map(|n| format!("@{n}")).unwrap_or_default();
                eprintln!(
                    "warning: fast-diff map is invalid for {}{at}. operation may be slow.",
                    spec.name
                );
            }
            let maps = !opts.exact
                && maps_usable(store, img, &head, &vs, from.unwrap_or(0), i, memo).await?;
            let used = if maps {
                let d = diff_versions(store, img, &head, &vs, from, i, memo).await?;
                used(&d, h.object_size(), v.size)
            } else {
                snapset_extents(
                    store,
                    img,
                    &head,
                    &vs,
                    from,
                    i,
                    v.size,
                    !opts.exact,
                    &[],
                    memo,
                )
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
    .await
}

pub async fn du<S: Store>(store: &S, spec: &ImageSpec, opts: &DuOptions) -> Result<()> {
    let (id, lines) = image_lines(store, spec, opts).await?;
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
    let count = lines.len();
    let lines = merged(lines, opts.merge_snapshots);
    match format {
        // The totals only come with a whole pool's du.
        Format::Json => {
            let images: Vec<String> = lines
                .iter()
                .map(|l| json_line(&spec.name, &id, l))
                .collect();
            let text = format!(r#"{{"images":[{}]}}"#, images.join(","));
            println!("{}", super::json_text(&text));
        }
        Format::Plain => {
            let mut rows: Vec<Vec<String>> =
                lines.iter().map(|l| plain_row(&spec.name, l)).collect();
            if count > 1 {
                rows.push(vec![
                    "<TOTAL>".to_string(),
                    human_size(total_prov),
                    human_size(total_used),
                ]);
            }
            let cols = COLUMNS;
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

/// `rbd du` without an image: every image of the pool (or namespace), by name, each as
/// `du IMAGE` would list it, then `<TOTAL>` (plain, when more than one line) or the
/// totals (json, as rbd: `total_provisioned_size`, `total_used_size`). An image that
/// cannot be opened (removed meanwhile, or in use by another client for a directory
/// store) is left out with a line on stderr, as rbd does.
pub async fn du_pool<S: Store>(store: &S, pool: &str, opts: &DuOptions) -> Result<()> {
    crate::spec::parse_pool_spec(pool)?;
    if opts.from_snap.is_some() {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            "--from-snap needs an image".to_string(),
        ));
    }
    let images = super::each_pool_image(store, pool, async |spec: &ImageSpec| {
        let (id, lines) = image_lines(store, spec, opts).await?;
        Ok((spec.name.clone(), id, lines))
    })
    .await?;
    let total_prov: u64 = images
        .iter()
        .filter_map(|(_, _, l)| l.last().map(|l| l.provisioned))
        .sum();
    let total_used: u64 = images
        .iter()
        .flat_map(|(_, _, l)| l.iter().map(|l| l.used))
        .sum();
    let count: usize = images.iter().map(|(_, _, l)| l.len()).sum();
    let images: Vec<(String, String, Vec<Line>)> = images
        .into_iter()
        .map(|(n, id, lines)| (n, id, merged(lines, opts.merge_snapshots)))
        .collect();
    match opts.format {
        Format::Json => {
            let items: Vec<String> = images
                .iter()
                .flat_map(|(n, id, lines)| lines.iter().map(move |l| json_line(n, id, l)))
                .collect();
            let text = format!(
                r#"{{"images":[{}],"total_provisioned_size":{total_prov},"total_used_size":{total_used}}}"#,
                items.join(",")
            );
            println!("{}", super::json_text(&text));
        }
        Format::Plain => {
            let mut rows: Vec<Vec<String>> = images
                .iter()
                .flat_map(|(n, _, lines)| lines.iter().map(move |l| plain_row(n, l)))
                .collect();
            if count > 1 {
                rows.push(vec![
                    "<TOTAL>".to_string(),
                    human_size(total_prov),
                    human_size(total_used),
                ]);
            }
            print!("{}", text_table(&COLUMNS, &rows));
        }
    }
    Ok(())
}

const COLUMNS: [(&str, bool); 3] = [("NAME", false), ("PROVISIONED", true), ("USED", true)];

/// `--merge-snapshots`: as rbd, the snapshots' lines are left out and the head's line
/// carries everything listed (with a snapshot named there is no head line).
fn merged(lines: Vec<Line>, merge: bool) -> Vec<Line> {
    if !merge {
        return lines;
    }
    let total: u64 = lines.iter().map(|l| l.used).sum();
    lines
        .into_iter()
        .filter(|l| l.snap.is_none())
        .map(|l| Line { used: total, ..l })
        .collect()
}

/// One image line of rbd du's json, rbd's key order.
fn json_line(name: &str, id: &str, l: &Line) -> String {
    let snap = match &l.snap {
        Some((s, sid)) => format!(r#""snapshot":{},"snapshot_id":{sid},"#, json!(s)),
        None => String::new(),
    };
    format!(
        r#"{{"name":{},"id":{},{snap}"provisioned_size":{},"used_size":{}}}"#,
        json!(name),
        json!(id),
        l.provisioned,
        l.used
    )
}

/// One row of rbd du's table: NAME[@SNAP], provisioned, used.
fn plain_row(name: &str, l: &Line) -> Vec<String> {
    let n = match &l.snap {
        Some((s, _)) => format!("{name}@{s}"),
        None => name.to_string(),
    };
    vec![n, human_size(l.provisioned), human_size(l.used)]
}
