//! `snap create|ls|rm|rename|protect|unprotect|rollback`, with `rbd snap`'s meanings and
//! output. Changes run on the image opened for writing (its exclusive lock held), as
//! `rbd` does through librbd; `ls` only reads the header.

use super::{parse_spec, with_image};
use crate::cli::{Format, SnapCommand};
use crate::cmd::info::human_size;
use crate::config::Config;
use crate::error::{Error, ErrorKind, Result};
use crate::image::{self, Image};
use crate::spec::ImageSpec;
use crate::store::{ImageStore, OpenMode, SnapInfo, Store};

pub async fn snap<S: Store>(store: &S, cmd: SnapCommand) -> Result<()> {
    match cmd {
        SnapCommand::Ls { image, format } => {
            let spec = parse_spec(&image)?;
            if spec.snap.is_some() {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    format!("snap ls takes an image, not a snapshot: {spec}"),
                ));
            }
            let mut snaps = with_image(store, &spec, OpenMode::ReadOnly, async |i| {
                Ok(i.header().snaps)
            })
            .await?;
            // Oldest first, as rbd lists them.
            snaps.sort_by_key(|s| s.id);
            print!("{}", list(&snaps, format));
            Ok(())
        }
        SnapCommand::Create { snap } => {
            let (spec, name) = snap_spec(&snap)?;
            let r = on_head(store, &spec, "create a snapshot of", async |img| {
                img.snap_create(&name).await.map(|_| ())
            })
            .await;
            match r {
                Err(e) if e.kind == ErrorKind::Busy => {
                    store.ask_holder_to_snap_create(&spec, &name).await
                }
                r => r,
            }
        }
        SnapCommand::Rm { snap } => {
            let (spec, name) = snap_spec(&snap)?;
            on_head(store, &spec, "remove a snapshot of", async |img| {
                img.snap_remove(&name).await
            })
            .await
        }
        SnapCommand::Rename { snap, dest } => {
            let (spec, name) = snap_spec(&snap)?;
            let new_name = match dest.split_once('@') {
                None => dest.clone(),
                Some(_) => {
                    let (dspec, dname) = snap_spec(&dest)?;
                    if dspec != spec {
                        return Err(Error::new(
                            ErrorKind::InvalidInput,
                            format!("a snapshot is renamed within its image: {snap} vs {dest}"),
                        ));
                    }
                    dname
                }
            };
            on_head(store, &spec, "rename a snapshot of", async |img| {
                img.snap_rename(&name, &new_name).await
            })
            .await
        }
        SnapCommand::Protect { snap } => protect(store, &snap, true).await,
        SnapCommand::Unprotect { snap } => protect(store, &snap, false).await,
        SnapCommand::Rollback { snap } => {
            let (spec, name) = snap_spec(&snap)?;
            on_head(store, &spec, "roll back", async |img| {
                img.snap_rollback(&name).await
            })
            .await?;
            eprintln!("Rolling back to snapshot: 100% complete...done.");
            Ok(())
        }
    }
}

async fn protect<S: Store>(store: &S, snap: &str, protected: bool) -> Result<()> {
    let (spec, name) = snap_spec(snap)?;
    let what = if protected {
        "protect a snapshot of"
    } else {
        "unprotect a snapshot of"
    };
    on_head(store, &spec, what, async |img| {
        img.snap_set_protected(&name, protected).await
    })
    .await
}

/// `IMAGE@SNAP` → (the image, the snapshot's name).
fn snap_spec(s: &str) -> Result<(ImageSpec, String)> {
    let mut spec = parse_spec(s)?;
    match spec.snap.take() {
        Some(name) => Ok((spec, name)),
        None => Err(Error::new(
            ErrorKind::InvalidInput,
            format!("{s}: name a snapshot as IMAGE@SNAP"),
        )),
    }
}

/// Runs `f` on the image opened for writing (holding its exclusive lock) and closes it.
/// An image in use elsewhere is Busy, with what to do.
async fn on_head<S: Store>(
    store: &S,
    spec: &ImageSpec,
    what: &str,
    f: impl AsyncFnOnce(&Image<S::Image>) -> Result<()>,
) -> Result<()> {
    let opts = image::OpenOptions {
        read_only: false,
        shared_default: Config::load()?.shared_default,
        checkpoint_idle: None,
    };
    let img = match Image::open(store, spec, &opts).await {
        Ok(i) => i,
        Err(e) if e.kind == ErrorKind::Busy => {
            return Err(e.context(format!(
                "cannot {what} {spec} while it is in use; stop serving it (or unmap it) first"
            )));
        }
        Err(e) => return Err(e),
    };
    let r = f(&img).await;
    let c = img.close().await;
    r?;
    c
}

/// `rbd snap ls`'s table (TextTable: every column padded to its width, the last one
/// too, two spaces apart; SNAPID, SIZE and TIMESTAMP right-aligned under left-aligned
/// headings; nothing at all without snapshots) or its JSON (`protected` a string, the timestamp as ctime prints it).
pub fn list(snaps: &[SnapInfo], format: Format) -> String {
    let ts = |s: &SnapInfo| {
        s.timestamp
            .filter(|&t| t != 0)
            .map(ctime)
            .unwrap_or_default()
    };
    match format {
        Format::Json => {
            // Fields in rbd's order (a struct keeps it; a JSON map would sort them).
            #[derive(serde::Serialize)]
            struct Row<'a> {
                id: u64,
                name: &'a str,
                size: u64,
                protected: &'static str,
                timestamp: String,
            }
            let v: Vec<Row> = snaps
                .iter()
                .map(|s| Row {
                    id: s.id,
                    name: &s.name,
                    size: s.size,
                    protected: if s.protected { "true" } else { "false" },
                    timestamp: ts(s),
                })
                .collect();
            format!("{}\n", serde_json::to_string(&v).unwrap_or_default())
        }
        Format::Plain => {
            if snaps.is_empty() {
                return String::new();
            }
            let head = ["SNAPID", "NAME", "SIZE", "PROTECTED", "TIMESTAMP"];
            let right = [true, false, true, false, true];
            let rows: Vec<[String; 5]> = snaps
                .iter()
                .map(|s| {
                    [
                        s.id.to_string(),
                        s.name.clone(),
                        human_size(s.size),
                        if s.protected { "yes" } else { "" }.to_string(),
                        ts(s),
                    ]
                })
                .collect();
            let width: Vec<usize> = (0..5)
                .map(|c| {
                    rows.iter()
                        .map(|r| r[c].chars().count())
                        .chain([head[c].len()])
                        .max()
                        .unwrap_or(0)
                })
                .collect();
            let line = |cells: &[String], align_right: &[bool]| {
                let padded: Vec<String> = cells
                    .iter()
                    .enumerate()
                    .map(|(c, cell)| {
                        let pad = " ".repeat(width[c].saturating_sub(cell.chars().count()));
                        if align_right[c] {
                            format!("{pad}{cell}")
                        } else {
                            format!("{cell}{pad}")
                        }
                    })
                    .collect();
                format!("{}\n", padded.join("  "))
            };
            let heads: Vec<String> = head.iter().map(|h| h.to_string()).collect();
            let mut out = line(&heads, &[false; 5]);
            for r in &rows {
                out.push_str(&line(r, &right));
            }
            out
        }
    }
}

/// `ctime(3)` without its newline, in local time: `Wed Dec  2 18:00:00 2026`.
fn ctime(secs: u64) -> String {
    let t = secs as libc::time_t;
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: localtime_r only writes `tm`; a null return leaves the fallback below.
    if unsafe { libc::localtime_r(&t, &mut tm) }.is_null() {
        return secs.to_string();
    }
    const DAYS: [&str; 7] = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{} {} {:2} {:02}:{:02}:{:02} {}",
        DAYS[tm.tm_wday.rem_euclid(7) as usize],
        MONTHS[tm.tm_mon.rem_euclid(12) as usize],
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec,
        tm.tm_year as i64 + 1900
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ls_shapes_are_rbds() {
        let s = |id, name: &str, protected| SnapInfo {
            id,
            name: name.into(),
            size: 1 << 30,
            protected,
            timestamp: None,
        };
        assert_eq!(list(&[], Format::Plain), "");
        assert_eq!(list(&[], Format::Json), "[]\n");
        let t = list(&[s(4, "a", false), s(12, "longer", true)], Format::Plain);
        assert_eq!(
            t,
            "SNAPID  NAME    SIZE   PROTECTED  TIMESTAMP\n     4  a       1 GiB                      \n    12  longer  1 GiB  yes                 \n"
        );
        // Byte for byte: rbd's key order, protected as a string.
        assert_eq!(
            list(&[s(4, "a", true)], Format::Json),
            "[{\"id\":4,\"name\":\"a\",\"size\":1073741824,\"protected\":\"true\",\"timestamp\":\"\"}]\n"
        );
    }
}
