//! `unmap`, `detach` and `list-mapped`: find a mapping from its device or image, ask its
//! daemon (or the kernel) to let go, and learn how the close ended.

use super::cli::{DetachArgs, ListFormat, ListMappedArgs, UnmapArgs};
use super::device::{self, DevKey, DeviceState, Transport};
use super::{ioctl, open_netlink};
use crate::error::{Error, ErrorKind, Result};
use crate::spec::ImageSpec;
use std::io::Write;
use std::time::Duration;

fn resolve(target: &str) -> Result<(DevKey, Option<DeviceState>)> {
    if device::looks_like_device(target) || target.starts_with("ublkb") {
        let dev = DevKey::parse(target)?;
        return Ok((dev, device::read_state(dev)?));
    }
    let spec: ImageSpec = target.parse().map_err(|e: Error| {
        e.context(format!(
            "{target:?} is neither a device (/dev/nbdN, /dev/ublkbN) nor an image spec"
        ))
    })?;
    let found: Vec<DeviceState> = device::all_states()
        .into_iter()
        .filter(|s| {
            s.pool == spec.pool
                && s.namespace == spec.namespace
                && s.image == spec.name
                && s.snap == spec.snap
        })
        .collect();
    match found.len() {
        0 => Err(Error::new(
            ErrorKind::NotFound,
            format!("image {spec} is not mapped"),
        )),
        1 => {
            let st = found.into_iter().next();
            let dev = st
                .as_ref()
                .map(|s| s.key())
                .transpose()?
                .unwrap_or(DevKey::Nbd(0));
            Ok((dev, st))
        }
        _ => Err(Error::new(
            ErrorKind::InvalidInput,
            format!(
                "image {spec} is mapped more than once ({}); name the device",
                found
                    .iter()
                    .map(|s| s.device.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
}

fn kernel_disconnect(index: u32) -> Result<()> {
    match open_netlink()? {
        Some(mut nl) => nl.disconnect(index),
        None => {
            let dev = ioctl::IoctlDevice::open(&device::device_path(index))?;
            dev.disconnect()
        }
    }
}

/// The kernel still has the device: an nbd device is connected, a ublk device exists.
fn configured(dev: DevKey) -> bool {
    match dev {
        DevKey::Nbd(i) => device::device_pid(i).is_some(),
        DevKey::Ublk(_) => std::path::Path::new(&dev.path()).exists(),
    }
}

fn signal(pid: u32, sig: i32, path: &str) -> Result<()> {
    // SAFETY: kill(2) with a pid we checked is our daemon.
    if unsafe { libc::kill(pid as libc::pid_t, sig) } != 0 {
        return Err(Error::io(
            format!("signalling daemon pid {pid} of {path}"),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Deletes a ublk device whose daemon is gone (its requests fail; the image stays as the
/// dead daemon left it, flagged dirty, repaired by the next open).
#[cfg(feature = "ublk")]
fn ublk_delete(dev: DevKey) -> Result<()> {
    super::ublk::delete(dev)
}
#[cfg(not(feature = "ublk"))]
fn ublk_delete(dev: DevKey) -> Result<()> {
    Err(Error::new(
        ErrorKind::Unsupported,
        format!(
            "{} is a ublk device and this rados-nbd was built without ublk",
            dev.path()
        ),
    ))
}

pub(super) fn unmap(a: UnmapArgs) -> Result<()> {
    let (dev, st) = resolve(&a.target)?;
    let path = dev.path();
    let configured = configured(dev);
    let pid = st
        .as_ref()
        .map(|s| s.pid)
        .filter(|p| device::daemon_alive(*p));
    if st.is_none() && !configured {
        return Err(Error::new(
            ErrorKind::NotFound,
            format!("{path} is not mapped"),
        ));
    }
    if st.is_none() {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!(
                "{path} is not mapped by rados-nbd (no {})",
                device::state_path(dev).display()
            ),
        ));
    }
    if !a.force {
        if let Some(why) = device::busy_reason(dev) {
            return Err(Error::new(
                ErrorKind::Busy,
                // rados-nbd@.service's ExecStop detaches when it sees "unmount it first".
                format!("cannot unmap {path}: {why} (unmount it first, or use --force)"),
            ));
        }
    }
    // Disconnect first: the kernel sends NBD_CMD_DISC after the requests it has in flight,
    // so once the daemon has drained them nothing can reach the image after its close.
    match dev {
        DevKey::Nbd(index) if configured => kernel_disconnect(index)?,
        DevKey::Nbd(_) => {}
        // ublk: the daemon stops its device (the driver finishes what is in flight first),
        // then closes the image; with no daemon (it died), the device is deleted here.
        DevKey::Ublk(_) => match pid {
            Some(pid) => signal(pid, libc::SIGTERM, &path)?,
            None if configured => ublk_delete(dev)?,
            None => {}
        },
    }
    let closed = match (pid, &st) {
        (Some(pid), Some(st)) => {
            if !device::wait_exit(pid, Duration::from_secs(a.wait_timeout)) {
                return Err(Error::new(
                    ErrorKind::TimedOut,
                    format!(
                        "{path} is disconnected but its daemon (pid {pid}) has not finished closing the image after {}s",
                        a.wait_timeout
                    ),
                ));
            }
            close_outcome(dev, pid, st)
        }
        _ => Ok(()),
    };
    // The device is gone either way; a failed close is reported, not retried.
    device::remove_state(dev);
    closed.map_err(|why| {
        Error::new(
            ErrorKind::Io,
            format!(
                "{path} ({}) is unmapped, but {why}",
                st.as_ref().map(|s| s.spec_string()).unwrap_or_default()
            ),
        )
    })
}

/// What daemon `pid` of device `index` recorded about its close once it exited: Ok for a
/// clean close, otherwise what went wrong, as the end of a sentence.
fn close_outcome(dev: DevKey, pid: u32, st: &DeviceState) -> std::result::Result<(), String> {
    match device::take_close_result(dev, pid) {
        Ok(Some(device::CloseResult { error: None, .. })) => Ok(()),
        Ok(Some(device::CloseResult { error: Some(e), .. })) => {
            Err(format!("the image was not closed cleanly: {e}"))
        }
        // A daemon that records its close and left nothing died before the end of it (a
        // kill, a crash): the image may be left flagged dirty.
        Ok(None) if st.close_result => Err(format!(
            "its daemon (pid {pid}) exited without recording a clean close of the image (killed or crashed?); the next map repairs a dirty object map"
        )),
        Ok(None) => Ok(()),
        Err(e) => Err(format!("its close cannot be confirmed: {e}")),
    }
}

pub(super) fn detach(a: DetachArgs) -> Result<()> {
    let (dev, st) = resolve(&a.target)?;
    let path = dev.path();
    let st = st.ok_or_else(|| {
        Error::new(
            ErrorKind::NotFound,
            format!("{path} is not mapped by rados-nbd"),
        )
    })?;
    if !st.netlink && st.transport == Transport::Nbd {
        return Err(Error::new(
            ErrorKind::Unsupported,
            format!("{path} was set up with ioctls (the kernel has no nbd netlink family), so it could not be re-attached; not detaching"),
        ));
    }
    if st.detached || !device::daemon_alive(st.pid) {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!("{path} has no running daemon to detach"),
        ));
    }
    signal(st.pid, libc::SIGUSR1, &path)?;
    if !device::wait_exit(st.pid, Duration::from_secs(a.wait_timeout)) {
        return Err(Error::new(
            ErrorKind::TimedOut,
            format!(
                "the daemon of {path} ({}, pid {}) did not detach within {}s",
                st.spec_string(),
                st.pid,
                a.wait_timeout
            ),
        ));
    }
    close_outcome(dev, st.pid, &st).map_err(|why| {
        Error::new(
            ErrorKind::Io,
            format!("{path} ({}) is detached, but {why}", st.spec_string()),
        )
    })
}

pub(super) fn list_mapped(a: ListMappedArgs) -> Result<()> {
    let rows: Vec<DeviceState> = device::all_states()
        .into_iter()
        .filter(|s| device::daemon_alive(s.pid) || s.key().is_ok_and(configured))
        .collect();
    let mut out = std::io::stdout().lock();
    let res = match a.format {
        ListFormat::Xml => write!(out, "{}", list_xml(&rows, a.pretty_format)),
        ListFormat::Json => {
            let v: Vec<serde_json::Value> = rows
                .iter()
                .map(|s| {
                    let pid = if s.detached {
                        serde_json::Value::Null
                    } else {
                        s.pid.into()
                    };
                    serde_json::json!({
                        // rbd-nbd's name for the daemon's pid, so its users' scripts parse
                        // ours; `pid` as before.
                        "id": pid.clone(),
                        "pid": pid,
                        "pool": s.pool,
                        "namespace": s.namespace,
                        "image": s.image,
                        // "" for the head, as rbd-nbd prints it.
                        "snap": s.snap.clone().unwrap_or_default(),
                        "device": s.device,
                        "cookie": s.backend.clone().unwrap_or_default(),
                        "store": s.store,
                        "read_only": s.read_only,
                        "state": if s.detached { "detached" } else { "attached" },
                        "transport": s.transport,
                    })
                })
                .collect();
            let v = serde_json::Value::Array(v);
            if a.pretty_format {
                writeln!(out, "{}", crate::cmd::pretty_json(&v)?)
            } else {
                writeln!(out, "{v}")
            }
        }
        ListFormat::Plain => write!(out, "{}", list_plain(&rows)),
    };
    res.map_err(|e| Error::io("writing to stdout", e))
}

/// `list-mapped` plain: rbd-nbd's columns, then store and transport, padded as Ceph's
/// TextTable pads them (by bytes), with no trailing blanks; nothing when nothing is mapped.
fn list_plain(rows: &[DeviceState]) -> String {
    const COLS: [(&str, bool); 9] = [
        ("pid", false),
        ("pool", false),
        ("namespace", false),
        ("image", false),
        ("snap", false),
        ("device", false),
        ("cookie", false),
        ("store", false),
        ("transport", false),
    ];
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|s| {
            vec![
                if s.detached {
                    "detached".into()
                } else {
                    s.pid.to_string()
                },
                s.pool.clone(),
                // Empty, not "-", for the default namespace and for no cookie, as
                // rbd-nbd prints them: a script's awk counts the fields the same.
                s.namespace.clone(),
                s.image.clone(),
                s.snap.clone().unwrap_or_else(|| "-".into()),
                s.device.clone(),
                s.backend.clone().unwrap_or_default(),
                s.store.clone(),
                s.transport.to_string(),
            ]
        })
        .collect();
    crate::cmd::table::text_table(&COLS, &cells)
        .lines()
        .map(|l| format!("{}\n", l.trim_end()))
        .collect()
}

/// `list-mapped --format xml` as rbd-nbd's XMLFormatter prints it (one line, or with
/// `pretty` one element a line indented a space a level): a `devices` section of `device`
/// objects with id (the daemon's pid; 0 once detached), pool, namespace, image, snap
/// (empty for the head), device and cookie; then rados-nbd's own store, read_only, state
/// and transport.
fn list_xml(rows: &[DeviceState], pretty: bool) -> String {
    fn esc(v: &str) -> String {
        v.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
            .replace('"', "&quot;")
            .replace('\'', "&apos;")
    }
    let nl = if pretty { "\n" } else { "" };
    let pad = |n: usize| if pretty { " ".repeat(n) } else { String::new() };
    let mut o = format!("<devices>{nl}");
    for s in rows {
        let fields = [
            ("id", if s.detached { 0 } else { s.pid }.to_string()),
            ("pool", s.pool.clone()),
            ("namespace", s.namespace.clone()),
            ("image", s.image.clone()),
            ("snap", s.snap.clone().unwrap_or_default()),
            ("device", s.device.clone()),
            ("cookie", s.backend.clone().unwrap_or_default()),
            ("store", s.store.clone()),
            ("read_only", s.read_only.to_string()),
            (
                "state",
                if s.detached { "detached" } else { "attached" }.to_string(),
            ),
            ("transport", s.transport.to_string()),
        ];
        o.push_str(&format!("{}<device>{nl}", pad(1)));
        for (k, v) in fields {
            o.push_str(&format!("{}<{k}>{}</{k}>{nl}", pad(2), esc(&v)));
        }
        o.push_str(&format!("{}</device>{nl}", pad(1)));
    }
    // Byte for byte as rbd-nbd ends them: the pretty form with an empty line, the one
    // line with no newline at all.
    o.push_str(if pretty {
        "</devices>\n\n"
    } else {
        "</devices>"
    });
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use device::test_state as state;

    #[test]
    fn list_mapped_plain_pads_by_bytes() {
        assert_eq!(list_plain(&[]), "");
        let mut a = state(true);
        a.pid = 7;
        a.pool = "rbd".into();
        a.image = "ü名".into();
        a.snap = None;
        a.device = "/dev/nbd3".into();
        a.backend = Some("c".into());
        a.store = "dir:/s".into();
        let mut b = a.clone();
        b.image = "abcdef".into();
        b.device = "/dev/nbd4".into();
        b.snap = Some("s".into());
        assert_eq!(
            list_plain(&[a, b]),
            "pid  pool  namespace  image   snap  device     cookie  store   transport\n\
             7    rbd              ü名   -     /dev/nbd3  c       dir:/s  nbd\n\
             7    rbd              abcdef  s     /dev/nbd4  c       dir:/s  nbd\n"
        );
    }

    #[test]
    fn list_mapped_xml_is_rbd_nbds_with_our_fields_after() {
        assert_eq!(list_xml(&[], false), "<devices></devices>");
        assert_eq!(list_xml(&[], true), "<devices>\n</devices>\n\n");
        let mut a = state(true);
        a.pool = "rbd".into();
        a.image = "vm<1>".into();
        a.snap = None;
        a.device = "/dev/nbd3".into();
        a.backend = Some("c00k1e".into());
        let x = list_xml(&[a.clone()], false);
        assert!(
            x.starts_with(&format!(
                "<devices><device><id>{}</id><pool>rbd</pool><namespace></namespace>\
                 <image>vm&lt;1&gt;</image><snap></snap><device>/dev/nbd3</device>\
                 <cookie>c00k1e</cookie><store>",
                a.pid
            )),
            "{x}"
        );
        assert!(
            x.ends_with("<state>attached</state><transport>nbd</transport></device></devices>"),
            "{x}"
        );
        a.detached = true;
        a.snap = Some("s1".into());
        let pretty = list_xml(&[a.clone()], true);
        assert!(
            pretty.starts_with("<devices>\n <device>\n  <id>0</id>\n  <pool>rbd</pool>\n")
                && pretty.ends_with("  <transport>nbd</transport>\n </device>\n</devices>\n\n"),
            "{pretty}"
        );
        let x = list_xml(&[a], false);
        assert!(
            x.contains("<id>0</id>") && x.contains("<snap>s1</snap>"),
            "{x}"
        );
        assert!(x.contains("<state>detached</state>"), "{x}");
    }

    #[test]
    fn unmap_by_spec_tells_namespaces_apart() {
        let _dir = device::test_run_dir();
        // The same image name in the default namespace (nbd3) and in ns1 (nbd5).
        device::write_state(3, &state(true)).unwrap();
        let mut ns = state(true);
        ns.namespace = "ns1".into();
        ns.device = "/dev/nbd5".into();
        device::write_state(5, &ns).unwrap();
        let (idx, st) = resolve("rbd/ns1/vm1").unwrap();
        assert_eq!(
            (idx, st.unwrap().namespace.as_str()),
            (DevKey::Nbd(5), "ns1")
        );
        let (idx, st) = resolve("rbd/vm1").unwrap();
        assert_eq!((idx, st.unwrap().namespace.as_str()), (DevKey::Nbd(3), ""));
        let e = resolve("rbd/ns2/vm1").unwrap_err();
        assert!(e.message.contains("rbd/ns2/vm1 is not mapped"), "{e}");
        // A ublk mapping of another image is found by its spec and by its device.
        let mut u = state(true);
        u.image = "vm2".into();
        u.device = "/dev/ublkb0".into();
        u.transport = Transport::Ublk;
        device::write_state(DevKey::Ublk(0), &u).unwrap();
        let (dev, st) = resolve("rbd/vm2").unwrap();
        assert_eq!(dev, DevKey::Ublk(0));
        assert_eq!(st.unwrap().transport, Transport::Ublk);
        let (dev, st) = resolve("/dev/ublkb0").unwrap();
        assert_eq!((dev, st.unwrap().image.as_str()), (DevKey::Ublk(0), "vm2"));
        assert!(resolve("/dev/ublkbx").is_err());
        // list-mapped order: nbd devices, then ublk ones.
        let all: Vec<String> = device::all_states().into_iter().map(|s| s.device).collect();
        assert_eq!(all, ["/dev/nbd3", "/dev/nbd5", "/dev/ublkb0"]);
        // Old state files (no transport) read as nbd.
        let old = std::fs::read_to_string(device::state_path(3)).unwrap();
        assert!(!old.contains("ublk"));
        let v: DeviceState =
            serde_json::from_str(&old.replace(",\n  \"transport\": \"nbd\"", "")).unwrap();
        assert_eq!(v.transport, Transport::Nbd);
    }

    #[test]
    fn unmap_learns_how_the_close_ended() {
        let dir = device::test_run_dir();
        let result = |error: Option<&str>| device::CloseResult {
            pid: 42,
            device: "/dev/nbd3".into(),
            image: "rbd/vm1".into(),
            error: error.map(String::from),
        };
        device::write_close_result(3, &result(None)).unwrap();
        assert_eq!(close_outcome(DevKey::Nbd(3), 42, &state(true)), Ok(()));
        let failed = "closing rbd/vm1: writing rbd_object_map.abc: No space left on device";
        device::write_close_result(3, &result(Some(failed))).unwrap();
        let why = close_outcome(DevKey::Nbd(3), 42, &state(true)).unwrap_err();
        assert!(why.contains(failed), "{why}");
        // Read once: the result does not linger in the run directory.
        assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none());
        // A daemon that records its close but left nothing was killed mid-close.
        let why = close_outcome(DevKey::Nbd(3), 42, &state(true)).unwrap_err();
        assert!(
            why.contains("pid 42") && why.contains("exited without"),
            "{why}"
        );
        // An older daemon records nothing: its silence proves nothing.
        assert_eq!(close_outcome(DevKey::Nbd(3), 42, &state(false)), Ok(()));
        // Another daemon's result is not ours.
        device::write_close_result(
            3,
            &device::CloseResult {
                pid: 7,
                ..result(Some(failed))
            },
        )
        .unwrap();
        assert!(close_outcome(DevKey::Nbd(3), 42, &state(true)).is_err());
        assert!(close_outcome(DevKey::Nbd(3), 7, &state(true)).is_err());
    }
}
