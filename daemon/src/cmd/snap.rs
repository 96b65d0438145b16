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
use crate::store::{
    GroupSnapNames, ImageStore, OpenMode, OwnerAction, QuiesceMode, SnapInfo, SnapNamespace, Store,
};
use std::collections::HashMap;

pub async fn snap<S: Store>(store: &S, cmd: SnapCommand) -> Result<()> {
    match cmd {
        SnapCommand::Ls {
            image,
            all,
            format,
            pretty_format,
        } => {
            super::set_pretty_json(pretty_format);
            let spec = parse_spec(&image)?;
            if spec.snap.is_some() {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    format!("snap ls takes an image, not a snapshot: {spec}"),
                ));
            }
            let (mut snaps, groups, objects) =
                with_image(store, &spec, OpenMode::ReadOnly, async |i| {
                    let h = i.header();
                    let objects = h.size.div_ceil(h.object_size());
                    let snaps = h.snaps;
                    // Group snapshots name their group by ids: named as rbd names them (only
                    // the namespace's type where the group cannot be read any more, as rbd).
                    let mut groups = HashMap::new();
                    for s in snaps.iter().filter(|_| all) {
                        if let SnapNamespace::Group {
                            pool,
                            group_id,
                            snap_id,
                        } = &s.namespace
                        {
                            if let Ok(names) = i.group_snap_names(*pool, group_id, snap_id).await {
                                groups.insert(s.id, names);
                            }
                        }
                    }
                    Ok((snaps, groups, objects))
                })
                .await?;
            // Oldest first, as rbd lists them.
            snaps.sort_by_key(|s| s.id);
            let text = list(&snaps, format, all, &groups, objects);
            match format {
                Format::Json => println!("{}", super::json_text(text.trim_end())),
                Format::Plain => print!("{text}"),
            }
            Ok(())
        }
        SnapCommand::Create {
            snap,
            skip_quiesce,
            ignore_quiesce_error,
        } => {
            let mode = match (skip_quiesce, ignore_quiesce_error) {
                (true, _) => QuiesceMode::Skip,
                (_, true) => QuiesceMode::IgnoreError,
                _ => QuiesceMode::Run,
            };
            let (spec, name) = snap_spec(&snap)?;
            let r = try_on_head(store, &spec, "create a snapshot of", async |img| {
                img.snap_create(&name).await.map(|_| ())
            })
            .await?;
            match r {
                Head::InUse(_) => {
                    let action = OwnerAction::SnapCreate {
                        name,
                        quiesce: mode,
                    };
                    ask(store, &spec, &action).await
                }
                Head::Done(r) => r,
            }
        }
        SnapCommand::Rm { snap } => {
            let (spec, name) = snap_spec(&snap)?;
            let r = try_on_head(store, &spec, "remove a snapshot of", async |img| {
                img.snap_remove(&name).await
            })
            .await?;
            match r {
                Head::InUse(_) => ask(store, &spec, &OwnerAction::SnapRemove { name }).await,
                Head::Done(r) => r,
            }
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
            let r = try_on_head(store, &spec, "rename a snapshot of", async |img| {
                img.snap_rename(&name, &new_name).await
            })
            .await?;
            match r {
                Head::InUse(_) => {
                    // The holder's request names the snapshot by id, as librbd's does.
                    let id = with_image(store, &spec, OpenMode::ReadOnly, async |i| {
                        Ok(i.header().user_snap(&name).map(|s| s.id))
                    })
                    .await?;
                    match id {
                        Some(snap_id) => {
                            let action = OwnerAction::SnapRename { snap_id, new_name };
                            ask(store, &spec, &action).await
                        }
                        None => Err(Error::new(
                            ErrorKind::NotFound,
                            format!("snapshot {spec}@{name} not found"),
                        )),
                    }
                }
                Head::Done(r) => r,
            }
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

/// Asks the process serving `spec` (its lock holder) to do `action` for us.
pub(super) async fn ask<S: Store>(store: &S, spec: &ImageSpec, action: &OwnerAction) -> Result<()> {
    store.ask_holder(spec, action, &mut |_, _| {}).await
}

async fn protect<S: Store>(store: &S, snap: &str, protected: bool) -> Result<()> {
    let (spec, name) = snap_spec(snap)?;
    let what = if protected {
        "protect a snapshot of"
    } else {
        "unprotect a snapshot of"
    };
    let r = try_on_head(store, &spec, what, async |img| {
        img.snap_set_protected(&name, protected).await
    })
    .await?;
    match r {
        Head::InUse(_) => {
            let action = OwnerAction::SnapProtect { name, protected };
            ask(store, &spec, &action).await
        }
        Head::Done(r) => r,
    }
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
    match try_on_head(store, spec, what, f).await? {
        Head::Done(r) => r,
        Head::InUse(e) => Err(e),
    }
}

/// What `try_on_head` did: ran `f` (its result), or found the image in use elsewhere
/// (the open's error, with what to do), where the holder may be asked instead. Kept
/// apart so that a Busy from `f` itself (a protected snapshot) is never taken for one.
pub(super) enum Head {
    Done(Result<()>),
    InUse(Error),
}

pub(super) async fn try_on_head<S: Store>(
    store: &S,
    spec: &ImageSpec,
    what: &str,
    f: impl AsyncFnOnce(&Image<S::Image>) -> Result<()>,
) -> Result<Head> {
    let opts = image::OpenOptions {
        read_only: false,
        shared_default: Config::load()?.shared_default,
        checkpoint_idle: None,
    };
    let img = match Image::open(store, spec, &opts).await {
        Ok(i) => i,
        Err(e) if e.kind == ErrorKind::Busy => {
            return Ok(Head::InUse(e.context(format!(
                "cannot {what} {spec} while it is in use; stop serving it (or unmap it) first"
            ))));
        }
        Err(e) => return Err(e),
    };
    let r = f(&img).await;
    let c = img.close().await;
    Ok(Head::Done(r.and(c)))
}

/// `rbd snap ls`'s table (TextTable: every column padded to its width, the last one
/// too, two spaces apart; SNAPID, SIZE and TIMESTAMP right-aligned under left-aligned
/// headings; nothing at all without snapshots) or its JSON (`protected` a string, the
/// timestamp as ctime prints it). Only user snapshots, unless `all` (`--all`: every
/// namespace, with a NAMESPACE column, or `namespace` object in JSON, as rbd's).
/// `objects`: the image's object count (a non-primary mirror snapshot's copy progress).
pub fn list(
    snaps: &[SnapInfo],
    format: Format,
    all: bool,
    groups: &HashMap<u64, GroupSnapNames>,
    objects: u64,
) -> String {
    let ts = |s: &SnapInfo| {
        s.timestamp
            .filter(|&t| t != 0)
            .map(ctime)
            .unwrap_or_default()
    };
    let snaps: Vec<&SnapInfo> = snaps.iter().filter(|s| all || s.is_user()).collect();
    match format {
        Format::Json => {
            let rows: Vec<String> = snaps
                .iter()
                .map(|s| {
                    // Fields in rbd's order.
                    let mut o = format!(
                        r#"{{"id":{},"name":{},"size":{},"protected":"{}","timestamp":{}"#,
                        s.id,
                        serde_json::json!(s.name),
                        s.size,
                        s.protected,
                        serde_json::json!(ts(s)),
                    );
                    if all {
                        let ns = match &s.namespace {
                            SnapNamespace::User => r#"{"type":"user"}"#.to_string(),
                            SnapNamespace::Trash { original, .. } => format!(
                                r#"{{"type":"trash","original_name":{}}}"#,
                                serde_json::json!(original)
                            ),
                            SnapNamespace::Group { .. } => match groups.get(&s.id) {
                                None => r#"{"type":"group"}"#.to_string(),
                                // In rbd's order (json! would sort the keys).
                                Some(g) => format!(
                                    r#"{{"type":"group","pool":{},"group":{},"group snap":{}}}"#,
                                    serde_json::json!(g.pool),
                                    serde_json::json!(g.group),
                                    serde_json::json!(g.snap)
                                ),
                            },
                            SnapNamespace::Mirror(m) => {
                                // rbd's order; the non-primary side's fields only there.
                                let mut o = format!(
                                    r#"{{"type":"mirror","state":"{}","mirror_peer_uuids":{},"complete":{}"#,
                                    m.state_name(),
                                    serde_json::json!(m.peer_uuids),
                                    m.complete
                                );
                                if m.non_primary() {
                                    o.push_str(&format!(
                                        r#","primary_mirror_uuid":{},"primary_snap_id":{},"last_copied_object_number":{}"#,
                                        serde_json::json!(m.primary_mirror_uuid),
                                        m.primary_snap_id,
                                        m.last_copied_object_number
                                    ));
                                }
                                o.push('}');
                                o
                            }
                            SnapNamespace::Other(t) => {
                                format!(r#"{{"type":"{}"}}"#, namespace_type(*t))
                            }
                        };
                        o.push_str(&format!(r#","namespace":{ns}"#));
                    }
                    o.push('}');
                    o
                })
                .collect();
            format!("[{}]\n", rows.join(","))
        }
        Format::Plain => {
            if snaps.is_empty() {
                return String::new();
            }
            let mut head = vec!["SNAPID", "NAME", "SIZE", "PROTECTED", "TIMESTAMP"];
            let mut right = vec![true, false, true, false, true];
            if all {
                head.push("NAMESPACE");
                right.push(false);
            }
            let rows: Vec<Vec<String>> = snaps
                .iter()
                .map(|s| {
                    let mut r = vec![
                        s.id.to_string(),
                        s.name.clone(),
                        human_size(s.size),
                        if s.protected { "yes" } else { "" }.to_string(),
                        ts(s),
                    ];
                    if all {
                        r.push(match &s.namespace {
                            SnapNamespace::User => "user".to_string(),
                            SnapNamespace::Trash { original, .. } => format!("trash ({original})"),
                            SnapNamespace::Group { .. } => match groups.get(&s.id) {
                                None => "group".to_string(),
                                Some(g) => format!("group ({}/{}@{})", g.pool, g.group, g.snap),
                            },
                            SnapNamespace::Mirror(m) => mirror_plain(m, objects),
                            SnapNamespace::Other(t) => namespace_type(*t).to_string(),
                        });
                    }
                    r
                })
                .collect();
            let cols: Vec<(&str, bool)> = head.iter().copied().zip(right).collect();
            super::table::text_table(&cols, &rows)
        }
    }
}

/// The names rbd prints for snapshot namespace types other than user and trash.
/// rbd's NAMESPACE column for a mirror snapshot: `mirror (primary peer_uuids:[A,B])`,
/// and on the non-primary side the primary's mirror uuid and snapshot id and how far the
/// copy got (`... UUID:ID 42% copied)`, `not copied` with no objects, `copied` when done).
fn mirror_plain(m: &crate::store::MirrorSnap, objects: u64) -> String {
    let mut o = format!(
        "mirror ({} peer_uuids:[{}]",
        m.state_name(),
        m.peer_uuids.join(",")
    );
    if m.non_primary() {
        o.push_str(&format!(
            " {}:{} ",
            m.primary_mirror_uuid, m.primary_snap_id
        ));
        if !m.complete {
            if objects > 0 {
                let pct =
                    (100 * u128::from(m.last_copied_object_number) / u128::from(objects)).min(100);
                o.push_str(&format!("{pct}% "));
            } else {
                o.push_str("not ");
            }
        }
        o.push_str("copied");
    }
    o.push(')');
    o
}

fn namespace_type(t: u32) -> &'static str {
    match t {
        1 => "group",
        3 => "mirror",
        _ => "unknown",
    }
}

/// `ctime(3)` without its newline, in local time: `Wed Dec  2 18:00:00 2026`.
pub(crate) fn ctime(secs: u64) -> String {
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
            namespace: Default::default(),
        };
        assert_eq!(list(&[], Format::Plain, false, &HashMap::new(), 0), "");
        assert_eq!(list(&[], Format::Json, false, &HashMap::new(), 0), "[]\n");
        let t = list(
            &[s(4, "a", false), s(12, "longer", true)],
            Format::Plain,
            false,
            &HashMap::new(),
            0,
        );
        assert_eq!(
            t,
            "SNAPID  NAME    SIZE   PROTECTED  TIMESTAMP\n     4  a       1 GiB                      \n    12  longer  1 GiB  yes                 \n"
        );
        // Byte for byte: rbd's key order, protected as a string.
        assert_eq!(
            list(&[s(4, "a", true)], Format::Json, false, &HashMap::new(), 0),
            "[{\"id\":4,\"name\":\"a\",\"size\":1073741824,\"protected\":\"true\",\"timestamp\":\"\"}]\n"
        );
    }

    #[test]
    fn mirror_namespace_as_rbd_prints_it() {
        let mut m = crate::store::MirrorSnap {
            state: 0,
            complete: true,
            peer_uuids: vec!["a".into(), "b".into()],
            ..Default::default()
        };
        assert_eq!(mirror_plain(&m, 16), "mirror (primary peer_uuids:[a,b])");
        m.state = 1;
        assert_eq!(mirror_plain(&m, 16), "mirror (demoted peer_uuids:[a,b])");
        // The non-primary side: the primary's uuid and snapshot, the copy's progress.
        m.state = 2;
        m.peer_uuids.clear();
        m.primary_mirror_uuid = "p".into();
        m.primary_snap_id = 7;
        m.complete = false;
        m.last_copied_object_number = 4;
        assert_eq!(
            mirror_plain(&m, 16),
            "mirror (non-primary peer_uuids:[] p:7 25% copied)"
        );
        assert_eq!(
            mirror_plain(&m, 0),
            "mirror (non-primary peer_uuids:[] p:7 not copied)"
        );
        m.complete = true;
        assert_eq!(
            mirror_plain(&m, 16),
            "mirror (non-primary peer_uuids:[] p:7 copied)"
        );
    }
}
