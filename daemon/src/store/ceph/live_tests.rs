//! Tests against a real cluster. With `CEPH_CONF` set they use that cluster; otherwise
//! the first of them starts a throwaway one with tests/ceph/cluster.sh, which they all
//! share and which is stopped when the test binary exits, or they print why they are
//! skipped when the Ceph binaries are missing. Each test makes its own images, so they may
//! run in parallel. Ceph's own `rbd` and `rados` tools check what we wrote.

use super::header::{generate_image_id, header_oid};
use super::lock::get_lock_info;
use super::{cls, CephOptions, CephStore, RBD};
use crate::error::{Error, ErrorKind, Result};
use crate::spec::ImageSpec;
use crate::store::{
    CloneOptions, CreateOptions, ImageStore, ObjectWrite, OpenMode, Store, DEFAULT_FEATURES,
    RBD_FEATURE_DEEP_FLATTEN, RBD_FLAG_FAST_DIFF_INVALID, RBD_FLAG_OBJECT_MAP_INVALID,
};
use bytes::Bytes;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::OnceLock;

struct Cluster {
    conf: String,
    /// Set when we started it (and so must stop it).
    dir: Option<PathBuf>,
}

/// The cluster the tests share: `Err` when starting it failed (every test then fails with
/// why), `Ok(None)` when the Ceph binaries are missing.
static CLUSTER: OnceLock<std::result::Result<Option<Cluster>, String>> = OnceLock::new();

/// Stops the cluster we started, at exit of the test binary (registered with `atexit`).
extern "C" fn stop_cluster() {
    if let Some(Ok(Some(Cluster { dir: Some(dir), .. }))) = CLUSTER.get() {
        let _ = Command::new(script()).arg("stop").arg(dir).status();
        let _ = std::fs::remove_dir_all(dir);
    }
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/ceph/cluster.sh")
}

fn have(bin: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {bin} >/dev/null"))
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// The shared cluster's config file, started by the first test that asks; None: skipped.
fn cluster() -> Option<&'static str> {
    let c = CLUSTER.get_or_init(|| {
        if let Ok(conf) = std::env::var("CEPH_CONF") {
            return Ok(Some(Cluster { conf, dir: None }));
        }
        if !have("ceph-mon") || !have("ceph-osd") || !have("rbd") {
            eprintln!("SKIPPED: ceph live tests need ceph-mon, ceph-osd and rbd (or CEPH_CONF)");
            return Ok(None);
        }
        let dir = std::env::temp_dir().join(format!("rados-nbd-ceph-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let out = Command::new(script())
            .arg("start")
            .arg(&dir)
            .output()
            .expect("running tests/ceph/cluster.sh");
        if !out.status.success() {
            let _ = Command::new(script()).arg("stop").arg(&dir).status();
            let _ = std::fs::remove_dir_all(&dir);
            return Err(format!(
                "cluster.sh start failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        // SAFETY: `stop_cluster` only reads CLUSTER, set by the time the process exits.
        unsafe { libc::atexit(stop_cluster) };
        Ok(Some(Cluster {
            conf: dir.join("ceph.conf").to_string_lossy().into_owned(),
            dir: Some(dir),
        }))
    });
    match c {
        Ok(c) => c.as_ref().map(|c| c.conf.as_str()),
        Err(e) => panic!("{e}"),
    }
}

fn tool(conf: &str, bin: &str, args: &[&str]) -> String {
    let out = Command::new(bin)
        .arg("-c")
        .arg(conf)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {bin}: {e}"));
    assert!(
        out.status.success(),
        "{bin} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn unique(name: &str) -> String {
    format!("{name}-{}-{}", std::process::id(), generate_image_id(0))
}

async fn store(conf: &str) -> CephStore {
    CephStore::connect(CephOptions {
        conf: Some(conf.to_string()),
        options: vec![("rados_osd_op_timeout".into(), "30".into())],
        ..Default::default()
    })
    .await
    .expect("connect")
}

/// Opens read-only and asks whether the image may be served.
async fn servable(st: &CephStore, spec: &ImageSpec) -> Result<()> {
    let img = st.open_image(spec, OpenMode::ReadOnly).await.expect("open");
    let r = img.check_servable().await;
    img.close().await.unwrap();
    r
}

/// A new image of `size` bytes with our default features in pool rbd: its name and spec.
async fn new_image(st: &CephStore, prefix: &str, size: u64) -> (String, ImageSpec) {
    let name = unique(prefix);
    let spec: ImageSpec = format!("rbd/{name}").parse().unwrap();
    st.create_image(
        &spec,
        &CreateOptions {
            size,
            order: 22,
            features: DEFAULT_FEATURES,
            data_pool: None,
            stripe_unit: None,
        },
    )
    .await
    .expect("create");
    (name, spec)
}

/// Makes an image with `rbd create --size 16M ARGS` and opens it read-only, which must be
/// refused (`why`): its name and the error.
async fn refused_rbd_image(
    st: &CephStore,
    conf: &str,
    prefix: &str,
    args: &[&str],
    why: &str,
) -> (String, Error) {
    let name = unique(prefix);
    let mut argv = vec!["create", "--size", "16M"];
    argv.extend_from_slice(args);
    argv.push(&name);
    tool(conf, "rbd", &argv);
    let e = st
        .open_image(&name.parse().unwrap(), OpenMode::ReadOnly)
        .await
        .err()
        .expect(why);
    (name, e)
}

/// `rbd bench` writing 4 KiB to `name`, killed after `secs` if it keeps waiting for the lock.
fn rbd_bench_write(conf: &str, name: &str, secs: u32) -> Output {
    Command::new("timeout")
        .args(["-s", "KILL", &secs.to_string(), "rbd", "-c", conf])
        .args(["bench", "--io-type", "write", "--io-total", "4096", name])
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ceph_live_create_lock_write_close() {
    let Some(conf) = cluster() else { return };
    let st = store(conf).await;

    // --- create: Ceph's tools see the image with our features and a valid object map.
    let (name, spec) = new_image(&st, "live", 64 << 20).await;
    let info = tool(conf, "rbd", &["info", &name]);
    assert!(info.contains("size 64 MiB in 16 objects"), "{info}");
    assert!(
        info.contains("features: layering, exclusive-lock, object-map, fast-diff, deep-flatten"),
        "{info}"
    );
    tool(conf, "rbd", &["object-map", "check", &name]);
    assert!(st.list_images("rbd").await.unwrap().contains(&name));
    let again = st.create_image(
        &spec,
        &CreateOptions {
            size: 1 << 20,
            order: 22,
            features: DEFAULT_FEATURES,
            data_pool: None,
            stripe_unit: None,
        },
    );
    assert_eq!(again.await.unwrap_err().kind, ErrorKind::AlreadyExists);

    // --- open for writing: lock as librbd does.
    let img = st
        .open_image(&spec, OpenMode::ReadWrite)
        .await
        .expect("open");
    let h = img.header();
    assert_eq!(
        (h.size, h.order, h.features, h.flags),
        (64 << 20, 22, 0x3d, 0)
    );
    assert_eq!(h.object_prefix, format!("rbd_data.{}", h.id));
    let locks = tool(conf, "rbd", &["lock", "ls", &name]);
    assert!(locks.contains("auto "), "{locks}");
    let linfo = tool(
        conf,
        "rados",
        &[
            "-p",
            "rbd",
            "lock",
            "info",
            &format!("rbd_header.{}", h.id),
            "rbd_lock",
        ],
    );
    assert!(linfo.contains("\"tag\":\"internal\""), "{linfo}");
    assert!(linfo.contains("\"type\":\"exclusive\""), "{linfo}");
    let second = st.open_image(&spec, OpenMode::ReadWrite).await;
    let e = second.err().expect("second writer must be refused");
    assert_eq!(e.kind, ErrorKind::Busy, "{e}");
    assert!(e.message.contains("alive"), "{e}");

    // --- data
    let a = Bytes::from(vec![0xaa; 8192]);
    img.write(0, 4096, a.clone(), false).await.unwrap();
    img.write(5, 0, Bytes::from(vec![0x55; 4 << 20]), true)
        .await
        .unwrap();
    let r = img.read(0, 0, 16384, None).await.unwrap().unwrap();
    assert_eq!(r.len(), 12288, "object 0 ends after the write");
    assert!(r[..4096].iter().all(|&b| b == 0));
    assert_eq!(&r[4096..], &a[..]);
    assert!(img.read(1, 0, 4096, None).await.unwrap().is_none());
    img.zero(5, 4096, 4096, false).await.unwrap();
    let r5 = img.read(5, 0, 3 * 4096, None).await.unwrap().unwrap();
    assert!(r5[..4096].iter().all(|&b| b == 0x55));
    assert!(r5[4096..8192].iter().all(|&b| b == 0));
    assert!(r5[8192..].iter().all(|&b| b == 0x55));
    img.zero(5, 1 << 20, 3 << 20, false).await.unwrap();
    let st5 = img
        .inner
        .data
        .stat(&format!("rbd_data.{}.{:016x}", h.id, 5))
        .await;
    assert_eq!(
        st5.unwrap().unwrap().size,
        1 << 20,
        "zero to the end truncates"
    );
    img.zero(7, 0, 4096, false).await.unwrap();
    assert!(
        img.read(7, 0, 1, None).await.unwrap().is_none(),
        "zero never creates"
    );
    img.write(9, 0, Bytes::from_static(b"x"), false)
        .await
        .unwrap();
    img.remove(9, false).await.unwrap();
    img.remove(9, false).await.unwrap();
    assert_eq!(img.list_objects(None).await.unwrap(), vec![0, 5]);

    // --- flags: `rbd info` shows the map invalid while we are attached.
    let both = RBD_FLAG_OBJECT_MAP_INVALID | RBD_FLAG_FAST_DIFF_INVALID;
    img.set_flags(both, both).await.unwrap();
    assert_eq!(img.header().flags, both);
    let info = tool(conf, "rbd", &["info", &name]);
    assert!(
        info.contains("flags: object map invalid, fast diff invalid"),
        "{info}"
    );

    // --- metadata
    assert_eq!(img.get_meta("rados-nbd.shared").await.unwrap(), None);
    img.set_meta("rados-nbd.shared", "true").await.unwrap();
    assert_eq!(
        img.get_meta("rados-nbd.shared").await.unwrap().as_deref(),
        Some("true")
    );
    let meta = tool(
        conf,
        "rbd",
        &["image-meta", "get", &name, "rados-nbd.shared"],
    );
    assert_eq!(meta.trim(), "true");

    // --- the header as librbd keeps it (omap keys seen on a real cluster).
    let (keys, more) = img
        .inner
        .meta
        .omap_get_vals(&header_oid(&h.id), "", "", 100)
        .await
        .unwrap();
    assert!(!more);
    let get = |k: &str| keys.iter().find(|p| p.0 == k).map(|p| p.1.clone());
    assert_eq!(get("features"), Some(0x3du64.to_le_bytes().to_vec()));
    assert_eq!(get("order"), Some(vec![22]));
    assert_eq!(get("size"), Some((64u64 << 20).to_le_bytes().to_vec()));
    let sz = img
        .inner
        .meta
        .exec_small(
            &header_oid(&h.id),
            RBD,
            "get_size",
            &cls::snap_in(cls::NOSNAP),
            64,
        )
        .await
        .unwrap();
    assert_eq!(cls::get_size_out(&sz).unwrap(), (22, 64 << 20));

    // --- object map object: the empty map made at create, then ours for objects 0 and 5.
    let map = img
        .read_object_map(None)
        .await
        .unwrap()
        .expect("map exists");
    let m = objmap::ObjectMap::decode(&map).expect("create wrote a valid empty map");
    assert_eq!((m.len(), m.count(0..16)[0]), (16, 16));
    m.set(0, objmap::ObjectState::Exists);
    m.set(5, objmap::ObjectState::Exists);
    img.write_object_map(m.encode()).await.unwrap();
    assert_eq!(img.read_object_map(None).await.unwrap(), Some(m.encode()));

    // --- a future dropped mid-flight frees nothing librados still writes to.
    for _ in 0..20 {
        let f = img.read(5, 0, 4 << 20, None);
        let _ = tokio::time::timeout(std::time::Duration::from_micros(10), f).await;
    }
    assert_eq!(img.read(0, 4096, 8192, None).await.unwrap().unwrap(), a);

    // --- a header update from elsewhere is picked up (size changed behind our back).
    let other = store(conf).await;
    let oio = other.pool("rbd", "").await.unwrap();
    let hdr = header_oid(&h.id);
    oio.exec_write(
        &hdr,
        RBD,
        "set_size",
        &cls::Enc::new().u64(128 << 20).done(),
    )
    .await
    .unwrap();
    oio.notify(&hdr, &cls::header_update_notify(), 5000)
        .await
        .unwrap();
    let mut seen = 0;
    for _ in 0..50 {
        seen = img.header().size;
        if seen == 128 << 20 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(seen, 128 << 20, "header update notification not applied");

    // --- a librbd client asking for the lock while this handle, holding it, takes no
    // requests (no image layer serves them): told "later" (0), as librbd's owner tells
    // it while acquiring or shutting down, so it waits (here until killed), and gets no
    // data in. (A serving owner hands the lock over or, `--exclusive`, refuses: e2e.)
    let bench = rbd_bench_write(conf, &name, 8);
    let berr = String::from_utf8_lossy(&bench.stderr);
    eprintln!("rbd bench under our lock: {berr}");
    assert!(!bench.status.success(), "rbd bench wrote under our lock");
    assert!(!berr.contains("Read-only file system"), "{berr}");

    // --- clean close: flags cleared by the image layer's order, lock and watch released.
    img.set_flags(0, both).await.unwrap();
    img.close().await.unwrap();
    let locks = tool(conf, "rbd", &["lock", "ls", &name]);
    assert!(!locks.contains("auto "), "{locks}");
    let info = tool(conf, "rbd", &["info", &name]);
    assert!(
        info.contains("flags: \n") || info.contains("flags:\n"),
        "{info}"
    );
    assert!(
        img.write(0, 0, a.clone(), false).await.is_err(),
        "closed handle wrote"
    );
    // Our map for objects 0 and 5 matches the data (the size grew to 128 MiB above: shrink
    // back first, `rbd object-map check` needs the entry count to match).
    oio.exec_write(&hdr, RBD, "set_size", &cls::Enc::new().u64(64 << 20).done())
        .await
        .unwrap();
    tool(conf, "rbd", &["object-map", "check", &name]);
    st.remove_image(&spec).await.expect("remove");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ceph_live_snapshots_survive_our_writes() {
    let Some(conf) = cluster() else { return };
    let st = store(conf).await;
    let (name, spec) = new_image(&st, "snaps", 64 << 20).await;
    let a = Bytes::from(vec![0xaa; 8192]);
    let img = st
        .open_image(&spec, OpenMode::ReadWrite)
        .await
        .expect("open");
    img.write(0, 4096, a.clone(), false).await.unwrap();
    img.write(1, 0, a.clone(), false).await.unwrap();
    img.close().await.unwrap();

    // --- snapshots taken by rbd while unmapped survive our writes.
    tool(conf, "rbd", &["snap", "create", &format!("{name}@s1")]);
    let img = st
        .open_image(&spec, OpenMode::ReadWrite)
        .await
        .expect("reopen");
    let h = img.header();
    assert_eq!(h.snaps.len(), 1);
    assert_eq!(h.snaps[0].name, "s1");
    img.write(0, 4096, Bytes::from(vec![0xbb; 8192]), false)
        .await
        .unwrap();
    let snap_spec: ImageSpec = format!("rbd/{name}@s1").parse().unwrap();
    let at = st
        .open_image(&snap_spec, OpenMode::ReadOnly)
        .await
        .expect("open snap");
    let old = at.read(0, 4096, 8192, None).await.unwrap().unwrap();
    assert_eq!(&old[..], &a[..], "snapshot data changed by a head write");
    let head = img.read(0, 4096, 8192, None).await.unwrap().unwrap();
    assert!(head.iter().all(|&b| b == 0xbb));
    assert!(at.write(0, 0, a.clone(), false).await.is_err());
    let snap_export = tool(conf, "rbd", &["export", &format!("{name}@s1"), "-"]);
    drop(snap_export);
    assert_eq!(
        st.open_image(&snap_spec, OpenMode::ReadWrite)
            .await
            .err()
            .map(|e| e.kind),
        Some(ErrorKind::ReadOnly)
    );
    // Object 1 removed from the head: only the snapshot's clone keeps it.
    img.remove(1, true).await.unwrap();
    img.close().await.unwrap();
    at.close().await.unwrap();

    // --- once the snapshots are gone, the clones wait for the OSD's snap trimming (held
    // off here) and the pool listing still names object 1: it is not in the head.
    tool(conf, "ceph", &["osd", "set", "nosnaptrim"]);
    tool(conf, "rbd", &["snap", "purge", &name]);
    let img = st
        .open_image(&spec, OpenMode::ReadOnly)
        .await
        .expect("open");
    let listed = tool(conf, "rados", &["-p", "rbd", "ls"]);
    let trimmed_already = !listed.contains(&format!("rbd_data.{}.{:016x}", h.id, 1));
    let objs = img.list_objects(None).await;
    let states = img.list_object_states(None).await;
    tool(conf, "ceph", &["osd", "unset", "nosnaptrim"]);
    assert!(
        !trimmed_already,
        "the clone of object 1 was trimmed although nosnaptrim was set"
    );
    assert_eq!(
        objs.unwrap(),
        vec![0],
        "head objects after the snapshots were removed"
    );
    assert_eq!(
        states.unwrap(),
        vec![(0, objmap::ObjectState::Exists)],
        "map states after the snapshots were removed"
    );
    img.close().await.unwrap();
    tool(conf, "rbd", &["snap", "create", &format!("{name}@s2")]);

    // --- remove: refused with snapshots, then everything is gone.
    assert_eq!(
        st.remove_image(&spec).await.unwrap_err().kind,
        ErrorKind::Busy
    );
    tool(conf, "rbd", &["snap", "purge", &name]);
    st.remove_image(&spec).await.expect("remove");
    assert!(!st.list_images("rbd").await.unwrap().contains(&name));
    // Objects whose clones wait for the OSD's (asynchronous) snap trimming are still
    // listed, without a head: only a head left behind is ours.
    let left = tool(conf, "rados", &["-p", "rbd", "ls"]);
    for oid in left.lines().filter(|o| o.contains(&h.id)) {
        let out = Command::new("rados")
            .args(["-c", conf, "-p", "rbd", "stat", oid])
            .output()
            .expect("running rados stat");
        assert!(
            !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("No such file"),
            "object {oid} left behind: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    assert_eq!(
        st.open_image(&spec, OpenMode::ReadOnly)
            .await
            .err()
            .map(|e| e.kind),
        Some(ErrorKind::NotFound)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ceph_live_shared_writers() {
    let Some(conf) = cluster() else { return };
    let st = store(conf).await;
    let (name, spec) = new_image(&st, "shared", 64 << 20).await;

    // --- shared writers coexist; an exclusive writer (ours or librbd) is kept out.
    let s1 = st
        .open_image(&spec, OpenMode::SharedWrite)
        .await
        .expect("shared 1");
    let s2 = st
        .open_image(&spec, OpenMode::SharedWrite)
        .await
        .expect("shared 2");
    s1.write(3, 0, Bytes::from_static(b"one"), false)
        .await
        .unwrap();
    s2.write(3, 3, Bytes::from_static(b"two"), false)
        .await
        .unwrap();
    assert_eq!(
        &s1.read(3, 0, 6, None).await.unwrap().unwrap()[..],
        b"onetwo"
    );
    let e = st
        .open_image(&spec, OpenMode::ReadWrite)
        .await
        .err()
        .expect("exclusive vs shared");
    assert_eq!(e.kind, ErrorKind::Busy, "{e}");
    assert!(e.message.contains("shared-write"), "{e}");
    // librbd keeps retrying for a lock it cannot get; it must not get through.
    let bench = rbd_bench_write(conf, &name, 10);
    assert!(
        !bench.status.success(),
        "rbd bench wrote past shared writers"
    );
    s1.close().await.unwrap();
    s2.close().await.unwrap();
    let ex = st
        .open_image(&spec, OpenMode::ReadWrite)
        .await
        .expect("exclusive after shared");
    assert_eq!(
        st.open_image(&spec, OpenMode::SharedWrite)
            .await
            .err()
            .map(|e| e.kind),
        Some(ErrorKind::Busy)
    );
    ex.close().await.unwrap();
    st.remove_image(&spec).await.expect("remove");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ceph_live_images_made_by_rbd() {
    let Some(conf) = cluster() else { return };
    let st = store(conf).await;

    // --- an image made by `rbd create` opens; unsupported features are refused.
    let plain = unique("byrbd");
    tool(conf, "rbd", &["create", "--size", "16M", &plain]);
    let ps: ImageSpec = plain.parse().unwrap();
    let pi = st
        .open_image(&ps, OpenMode::ReadWrite)
        .await
        .expect("open rbd-made image");
    assert_eq!(pi.header().features & 0x1d, 0x1d);
    pi.close().await.unwrap();
    let (striped, e) = refused_rbd_image(
        &st,
        conf,
        "striped",
        &["--stripe-unit", "65536", "--stripe-count", "4"],
        "fancy striping must be refused",
    )
    .await;
    assert_eq!(e.kind, ErrorKind::Unsupported, "{e}");
    let (journ, e) = refused_rbd_image(
        &st,
        conf,
        "journal",
        &["--image-feature", "exclusive-lock,journaling"],
        "journaling must be refused",
    )
    .await;
    assert!(e.message.contains("journaling"), "{e}");
    tool(conf, "rbd", &["snap", "create", &format!("{plain}@p")]);
    tool(conf, "rbd", &["snap", "protect", &format!("{plain}@p")]);
    let child = unique("child");
    tool(conf, "rbd", &["clone", &format!("{plain}@p"), &child]);
    // A clone (format 1 here: `auto` picks it on this cluster) opens, naming its parent.
    let ci = st
        .open_image(&child.parse().unwrap(), OpenMode::ReadOnly)
        .await
        .expect("clones open");
    let p = ci.header().parent.expect("a clone has a parent");
    assert_eq!(p.spec.to_string(), format!("rbd/{plain}@p"));
    assert_eq!(p.overlap, 16 << 20);
    ci.close().await.unwrap();
    let e = st
        .open_image(&"nopool/x".parse().unwrap(), OpenMode::ReadOnly)
        .await
        .err()
        .unwrap();
    assert!(e.message.contains("pool nopool not found"), "{e}");
    // Leave the pool as we found it.
    tool(conf, "rbd", &["rm", &child]);
    tool(conf, "rbd", &["snap", "unprotect", &format!("{plain}@p")]);
    tool(conf, "rbd", &["snap", "purge", &plain]);
    for n in [&plain, &striped, &journ] {
        tool(conf, "rbd", &["rm", n]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ceph_live_encrypted_images_are_refused() {
    let Some(conf) = cluster() else { return };
    let st = store(conf).await;

    // --- client-side encryption: a LUKS header in object 0 is refused before serving,
    // named librbd's when its data offset is one object (4 MiB here), unless allowed.
    let enc = unique("luks");
    tool(conf, "rbd", &["create", "--size", "16M", &enc]);
    let es: ImageSpec = enc.parse().unwrap();
    let luks1 = |payload_sectors: u32| {
        let mut h = vec![0u8; 592];
        h[..6].copy_from_slice(b"LUKS\xba\xbe");
        h[6..8].copy_from_slice(&1u16.to_be_bytes());
        h[104..108].copy_from_slice(&payload_sectors.to_be_bytes());
        Bytes::from(h)
    };
    servable(&st, &es)
        .await
        .expect("no object 0: nothing to check");
    let w = st.open_image(&es, OpenMode::ReadWrite).await.unwrap();
    w.write(0, 0, luks1(8192), false).await.unwrap();
    let e = servable(&st, &es).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Unsupported, "{e}");
    assert!(
        e.message.contains("encrypted by librbd") && e.message.contains("--allow-encrypted"),
        "{e}"
    );
    let allowing = store(conf).await.with_allow_encrypted(true);
    servable(&allowing, &es)
        .await
        .expect("--allow-encrypted serves it");
    w.close().await.unwrap();
    tool(conf, "rbd", &["snap", "create", &format!("{enc}@luks")]);
    let w = st.open_image(&es, OpenMode::ReadWrite).await.unwrap();
    w.write(0, 0, luks1(4096), false).await.unwrap();
    let e = servable(&st, &es).await.unwrap_err();
    assert!(
        e.message.contains("by cryptsetup on the device")
            && e.message.contains("--allow-encrypted"),
        "cryptsetup's 2 MiB offset: {e}"
    );
    servable(&allowing, &es)
        .await
        .expect("cryptsetup's volume, served raw with --allow-encrypted");
    let e = servable(&st, &format!("{enc}@luks").parse().unwrap())
        .await
        .unwrap_err();
    assert!(
        e.message.contains("encrypted by librbd"),
        "at the snapshot: {e}"
    );
    w.close().await.unwrap();
    // Leave the pool as we found it.
    tool(conf, "rbd", &["snap", "purge", &enc]);
    tool(conf, "rbd", &["rm", &enc]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ceph_live_fencing_a_dead_owner() {
    let Some(conf) = cluster() else { return };
    let st = store(conf).await;

    // --- fencing: the owner of a lock whose watch is gone (as after the OSD timed out a
    // stopped client's watch) is blocklisted before its lock is broken; the fenced handle
    // then fails writes and reads with EIO and closes without touching the new owner's lock.
    let (fname, fspec) = new_image(&st, "fence", 8 << 20).await;
    let old_st = store(conf).await;
    let old = old_st
        .open_image(&fspec, OpenMode::ReadWrite)
        .await
        .unwrap();
    old.write(0, 0, Bytes::from(vec![1; 4096]), false)
        .await
        .unwrap();
    let info = get_lock_info(&old.inner).await.unwrap();
    let addr = info.lockers[0].address.clone().expect("locker address");
    {
        let state = old.inner.lock.lock().await.take().unwrap();
        let _ = state.stop.send(true);
        old.inner.meta.unwatch(state.watch).await.unwrap();
    }
    let new = st
        .open_image(&fspec, OpenMode::ReadWrite)
        .await
        .expect("the stale lock is broken");
    let bl = tool(conf, "ceph", &["osd", "blocklist", "ls"]);
    assert!(bl.contains(&addr), "{addr} not blocklisted: {bl}");
    new.write(0, 0, Bytes::from(vec![2; 4096]), false)
        .await
        .unwrap();
    let e = old
        .write(0, 0, Bytes::from(vec![3; 4096]), false)
        .await
        .expect_err("a blocklisted client wrote");
    assert_eq!(e.kind, ErrorKind::Io, "{e}");
    assert!(old.inner.is_fenced(), "ESHUTDOWN did not fence: {e}");
    let e = old.read(0, 0, 4096, None).await.expect_err("fenced read");
    assert_eq!(e.kind, ErrorKind::Io, "{e}");
    assert!(old.check_usable().is_err());
    assert!(old.set_flags(0, 1).await.is_err());
    tokio::time::timeout(std::time::Duration::from_secs(20), old.close())
        .await
        .expect("closing a fenced handle hung")
        .ok();
    let got = new.read(0, 0, 4096, None).await.unwrap().unwrap();
    assert!(got.iter().all(|&b| b == 2), "the fenced write landed");
    new.close().await.unwrap();
    tool(conf, "ceph", &["osd", "blocklist", "rm", &addr]);
    tool(conf, "rbd", &["rm", &fname]);
}

/// Clone plumbing against librbd: `clone_image` (formats 2 and 1) makes what `rbd`
/// reads as a clone and lists as a child; copy-up puts the parent's data under a write
/// in one step (and only once); a deep copy-up keeps the parent's data for the child's
/// existing snapshots; `detach_parent` leaves an image `rbd` sees as flattened; chains
/// made by `rbd clone` open level by level.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ceph_live_clones() {
    let Some(conf) = cluster() else { return };
    let st = store(conf).await;
    let (pname, pspec) = new_image(&st, "cparent", 16 << 20).await;
    let pi = st.open_image(&pspec, OpenMode::ReadWrite).await.unwrap();
    let base: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8 + 1).collect();
    for o in 0..3 {
        pi.write(o, 0, Bytes::from(base.clone()), false)
            .await
            .unwrap();
    }
    pi.close().await.unwrap();
    tool(conf, "rbd", &["snap", "create", &format!("{pname}@s")]);
    let snap: ImageSpec = format!("rbd/{pname}@s").parse().unwrap();

    // --- format 2: rbd sees the clone, its parent, the child record.
    let cname = unique("cchild");
    let cspec: ImageSpec = format!("rbd/{cname}").parse().unwrap();
    // Without deep-flatten: the detach below keeps the snapshot's parent.
    let opts = CloneOptions {
        clone_format: 2,
        features: DEFAULT_FEATURES & !RBD_FEATURE_DEEP_FLATTEN,
        order: 22,
        data_pool: None,
        stripe_unit: None,
    };
    st.clone_image(&snap, &cspec, &opts)
        .await
        .expect("clone v2");
    let info = tool(conf, "rbd", &["info", &cname]);
    assert!(info.contains(&format!("parent: rbd/{pname}@s")), "{info}");
    assert!(info.contains("op_features: clone-child"), "{info}");
    assert!(tool(conf, "rbd", &["info", &pname]).contains("op_features: clone-parent"));
    assert_eq!(
        tool(conf, "rbd", &["children", &format!("{pname}@s")]).trim(),
        format!("rbd/{cname}")
    );
    assert_eq!(kid_specs(&st, &snap).await, vec![cspec.clone()]);

    let ci = st.open_image(&cspec, OpenMode::ReadWrite).await.unwrap();
    let p = ci.header().parent.expect("parent");
    assert_eq!((p.spec.clone(), p.overlap), (snap.clone(), 16 << 20));
    let par = ci.open_parent().await.unwrap().expect("the parent opens");
    assert_eq!(par.header().parent, None);
    assert_eq!(par.header().size, 16 << 20);
    assert_eq!(par.snap_flags(p.snap_id).await.unwrap(), 0);
    let pdata = par.read(0, 0, 8192, None).await.unwrap().unwrap();
    assert_eq!(&pdata[..], &base[..]);

    // --- copy-up: the parent's bytes with the write on top, in the child's object.
    let w = |off, d: &'static [u8]| ObjectWrite::Write {
        off,
        data: Bytes::from_static(d),
    };
    ci.copyup(0, pdata.clone(), w(10, b"XY"), false)
        .await
        .unwrap();
    let mut want = base.clone();
    want[10..12].copy_from_slice(b"XY");
    assert_eq!(
        &ci.read(0, 0, 8192, None).await.unwrap().unwrap()[..],
        &want[..]
    );
    // Once the object exists the parent's data is not copied again; the op still applies.
    ci.copyup(0, Bytes::from(vec![9u8; 8192]), w(0, b"Z"), false)
        .await
        .unwrap();
    want[0] = b'Z';
    assert_eq!(
        &ci.read(0, 0, 8192, None).await.unwrap().unwrap()[..],
        &want[..]
    );
    // A discard of a whole parent-backed object leaves an empty object hiding the parent.
    ci.copyup(2, pdata.clone(), ObjectWrite::Truncate { len: 0 }, false)
        .await
        .unwrap();
    assert_eq!(
        ci.read(2, 0, 8192, None).await.unwrap().map(|b| b.len()),
        Some(0)
    );
    ci.close().await.unwrap();

    // --- a deep copy-up: the child's snapshot taken before it sees the parent's data in
    // the child's own object (librbd's deep-flatten), the head sees the write.
    tool(conf, "rbd", &["snap", "create", &format!("{cname}@cs")]);
    let ci = st.open_image(&cspec, OpenMode::ReadWrite).await.unwrap();
    let cs = ci.header().snaps[0].id;
    ci.copyup(1, pdata.clone(), w(0, b"Q"), false)
        .await
        .unwrap();
    assert_eq!(
        &ci.read(1, 0, 8192, Some(cs))
            .await
            .unwrap()
            .expect("kept for the snapshot")[..],
        &base[..]
    );
    assert_eq!(ci.read(1, 0, 1, None).await.unwrap().unwrap()[0], b'Q');
    // The snapshot's parent is the same parent.
    let at = st
        .open_image(
            &format!("rbd/{cname}@cs").parse().unwrap(),
            OpenMode::ReadOnly,
        )
        .await
        .unwrap();
    assert_eq!(at.header().parent.map(|p| p.spec), Some(snap.clone()));
    at.close().await.unwrap();

    // --- detach (flatten's last step), as `rbd flatten` leaves an image without
    // deep-flatten that has a snapshot: the head has no parent, the snapshot keeps it,
    // so the parent still lists the child and the child stays clone-child.
    ci.detach_parent().await.unwrap();
    assert_eq!(ci.header().parent, None);
    ci.close().await.unwrap();
    assert_eq!(kid_specs(&st, &snap).await, vec![cspec.clone()]);
    let info = tool(conf, "rbd", &["info", &cname]);
    assert!(!info.contains("parent:"), "{info}");
    assert!(info.contains("op_features: clone-child"), "{info}");
    let sinfo = tool(conf, "rbd", &["info", &format!("{cname}@cs")]);
    assert!(sinfo.contains(&format!("parent: rbd/{pname}@s")), "{sinfo}");
    tool(conf, "rbd", &["snap", "purge", &cname]);
    tool(conf, "rbd", &["rm", &cname]);
    assert!(kid_specs(&st, &snap).await.is_empty());
    let pinfo = tool(conf, "rbd", &["info", &pname]);
    assert!(!pinfo.contains("clone-parent"), "{pinfo}");

    // --- format 1 needs a protected snapshot and is recorded in rbd_children.
    let c1 = unique("cv1");
    let c1spec: ImageSpec = format!("rbd/{c1}").parse().unwrap();
    let v1 = CloneOptions {
        clone_format: 1,
        features: DEFAULT_FEATURES,
        ..opts.clone()
    };
    let e = st.clone_image(&snap, &c1spec, &v1).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidInput, "{e}");
    assert!(
        st.open_image(&c1spec, OpenMode::ReadOnly).await.is_err(),
        "nothing left behind"
    );
    tool(conf, "rbd", &["snap", "protect", &format!("{pname}@s")]);
    st.clone_image(&snap, &c1spec, &v1).await.expect("clone v1");
    assert_eq!(
        tool(conf, "rbd", &["children", &format!("{pname}@s")]).trim(),
        format!("rbd/{c1}")
    );
    let e1 = tool(conf, "rbd", &["export", &c1, "-"]);
    let e0 = tool(conf, "rbd", &["export", &format!("{pname}@s"), "-"]);
    assert!(e0 == e1, "the v1 clone reads as its parent snapshot");
    // With deep-flatten, a detach lets go of the snapshots' parent too (as rbd flatten).
    tool(conf, "rbd", &["snap", "create", &format!("{c1}@k")]);
    let ci = st.open_image(&c1spec, OpenMode::ReadWrite).await.unwrap();
    ci.detach_parent().await.unwrap();
    ci.close().await.unwrap();
    assert!(kid_specs(&st, &snap).await.is_empty());
    let sinfo = tool(conf, "rbd", &["info", &format!("{c1}@k")]);
    assert!(!sinfo.contains("parent:"), "{sinfo}");
    tool(conf, "rbd", &["snap", "purge", &c1]);
    tool(conf, "rbd", &["snap", "unprotect", &format!("{pname}@s")]);

    // --- a chain made by rbd: grandchild → child → parent, each level by open_parent.
    let g1 = unique("g1");
    let g2 = unique("g2");
    tool(
        conf,
        "rbd",
        &[
            "clone",
            "--rbd-default-clone-format",
            "2",
            &format!("{pname}@s"),
            &g1,
        ],
    );
    tool(conf, "rbd", &["snap", "create", &format!("{g1}@t")]);
    tool(
        conf,
        "rbd",
        &[
            "clone",
            "--rbd-default-clone-format",
            "2",
            &format!("{g1}@t"),
            &g2,
        ],
    );
    let gi = st
        .open_image(&g2.parse().unwrap(), OpenMode::ReadOnly)
        .await
        .unwrap();
    let l1 = gi.open_parent().await.unwrap().unwrap();
    assert_eq!(
        gi.header().parent.unwrap().spec.to_string(),
        format!("rbd/{g1}@t")
    );
    let l2 = l1.open_parent().await.unwrap().unwrap();
    assert_eq!(l1.header().parent.unwrap().spec, snap);
    assert!(l2.open_parent().await.unwrap().is_none());
    for i in [gi, l1, l2] {
        i.close().await.unwrap();
    }

    tool(conf, "rbd", &["rm", &g2]);
    tool(conf, "rbd", &["snap", "purge", &g1]);
    tool(conf, "rbd", &["rm", &g1]);
    tool(conf, "rbd", &["rm", &c1]);
    tool(conf, "rbd", &["snap", "purge", &pname]);
    tool(conf, "rbd", &["rm", &pname]);
}

/// Writes go out from the request's own buffer (write.rs): what was written reads back,
/// concurrent writes into one object each land (merged behind the one in flight,
/// merge.rs, unless `rbd_io_scheduler` is none), a write in a snapshot's wake keeps the
/// snapshot's data, and every buffer is let go once librados is done with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ceph_live_writes_without_copy() {
    let Some(conf) = cluster() else { return };
    let st = store(conf).await;
    let (_name, spec) = new_image(&st, "nocopy", 16 << 20).await;
    let img = std::sync::Arc::new(
        st.open_image(&spec, OpenMode::ReadWrite)
            .await
            .expect("open"),
    );
    let pattern = |seed: u8, len: usize| -> Bytes {
        Bytes::from(
            (0..len)
                .map(|i| (i as u8).wrapping_mul(31) ^ seed)
                .collect::<Vec<u8>>(),
        )
    };
    // 64 writes of 64 KiB at once into object 0, each at its own offset.
    let mut tasks = Vec::new();
    for k in 0..64u64 {
        let img = img.clone();
        let data = pattern(k as u8, 64 << 10);
        tasks.push(tokio::spawn(async move {
            img.write(0, k * (64 << 10), data, false).await
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    // They went out merged (merge.rs): those behind the first one in flight, together.
    let (held, ops) = img.inner.merge.counts();
    assert!(
        held > 0 && ops < held,
        "writes behind the one in flight are merged: {held} held, in {ops} operations"
    );
    let got = img.read(0, 0, 4 << 20, None).await.unwrap().unwrap();
    for k in 0..64usize {
        assert!(
            got[k * (64 << 10)..(k + 1) * (64 << 10)] == pattern(k as u8, 64 << 10)[..],
            "write {k} reads back"
        );
    }
    // A 1 MiB write from a slice of a larger buffer (the bytes asked, not the buffer's).
    let big = pattern(0xEE, 3 << 20);
    img.write(1, 4096, big.slice(1 << 20..2 << 20), true)
        .await
        .unwrap();
    let got = img.read(1, 4096, 1 << 20, None).await.unwrap().unwrap();
    assert!(
        got[..] == big[1 << 20..2 << 20],
        "the slice written reads back"
    );
    // After a snapshot, a write to object 0 keeps the snapshot's bytes (the write carries
    // the snapshot context through the C++ handle as it did through the C one).
    let before = img.read(0, 0, 4 << 20, None).await.unwrap().unwrap();
    let snap = img.snap_create("s1").await.expect("snap");
    img.write(0, 0, pattern(0x77, 1 << 20), false)
        .await
        .unwrap();
    let at_snap = img.read(0, 0, 4 << 20, Some(snap)).await.unwrap().unwrap();
    assert!(
        at_snap == before,
        "the snapshot keeps the object's bytes before the write"
    );
    // Buffers still referenced at completion are parked and freed by later completions:
    // none stays parked for long.
    let mut waited = 0;
    while super::write::held() > 0 && waited < 50 {
        img.write(2, 0, pattern(1, 4096), false).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        waited += 1;
    }
    assert_eq!(super::write::held(), 0, "every written buffer released");
    // librbd's option turns merging off, here set on the image as `rbd config image set
    // IMAGE rbd_io_scheduler none` sets it.
    img.set_meta("conf_rbd_io_scheduler", "none").await.unwrap();
    let img = std::sync::Arc::into_inner(img).unwrap();
    img.snap_remove(snap).await.unwrap();
    img.close().await.unwrap();
    let img = std::sync::Arc::new(
        st.open_image(&spec, OpenMode::ReadWrite)
            .await
            .expect("reopen"),
    );
    let tasks: Vec<_> = (0..16u64)
        .map(|k| {
            let img = img.clone();
            let data = pattern(k as u8 ^ 0x55, 64 << 10);
            tokio::spawn(async move { img.write(3, k * (64 << 10), data, false).await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(
        img.inner.merge.counts(),
        (0, 0),
        "rbd_io_scheduler=none: nothing held"
    );
    let got = img.read(3, 0, 1 << 20, None).await.unwrap().unwrap();
    for k in 0..16usize {
        assert!(got[k * (64 << 10)..(k + 1) * (64 << 10)] == pattern(k as u8 ^ 0x55, 64 << 10)[..]);
    }
    let img = std::sync::Arc::into_inner(img).unwrap();
    img.close().await.unwrap();
    st.remove_image(&spec).await.unwrap();
}

/// `read_extents` is a sparse read (what librbd's copy-up reads of an ancestor): the
/// extents an object has, not the range asked; none at all for a missing object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ceph_live_sparse_reads() {
    let Some(conf) = cluster() else { return };
    let st = store(conf).await;
    let (_name, spec) = new_image(&st, "sparse", 16 << 20).await;
    let img = st
        .open_image(&spec, OpenMode::ReadWrite)
        .await
        .expect("open");
    let a = Bytes::from(vec![0xA5u8; 8192]);
    let b = Bytes::from(vec![0x5Au8; 4096]);
    img.write(0, 0, a.clone(), true).await.unwrap();
    img.write(0, 1 << 20, b.clone(), true).await.unwrap();
    let ext = img
        .read_extents(0, 0, 4 << 20, None)
        .await
        .unwrap()
        .expect("the object exists");
    // Whatever the OSD's allocation unit, the gap between the two writes is not all
    // data, and nothing past the second write is.
    let end = ext.last().map(|(o, d)| o + d.len() as u64).unwrap();
    assert!(ext.len() >= 2, "two extents: {:?}", shape(&ext));
    assert_eq!(
        end,
        (1 << 20) + 4096,
        "ends with the last write: {:?}",
        shape(&ext)
    );
    let mut dense = vec![0u8; end as usize];
    for (o, d) in &ext {
        dense[*o as usize..*o as usize + d.len()].copy_from_slice(d);
    }
    let want = img.read(0, 0, end, None).await.unwrap().unwrap();
    assert!(dense == want[..], "the extents' bytes are the object's");
    // A range inside the gap, and an object that does not exist.
    let mid = img.read_extents(0, 2 << 20, 4096, None).await.unwrap();
    assert!(
        mid.is_some_and(|e| e.is_empty()),
        "a hole reads as no extent"
    );
    assert!(img.read_extents(1, 0, 4096, None).await.unwrap().is_none());
    // A sparse copy-up writes only its extents: the gap stays a hole, and the object
    // ends with the last extent, not with the bytes given.
    let mut pdata = vec![0u8; 3 << 20];
    pdata[..4096].fill(1);
    pdata[2 << 20..(2 << 20) + 4096].fill(2);
    let extents = vec![(0, 4096), (2 << 20, 4096)];
    img.copyup_extents(
        2,
        Bytes::from(pdata.clone()),
        extents,
        ObjectWrite::None,
        false,
    )
    .await
    .unwrap();
    let ext = img
        .read_extents(2, 0, 4 << 20, None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        shape(&ext),
        vec![(0, 4096), (2 << 20, 4096)],
        "the copy-up's extents"
    );
    let got = img.read(2, 0, 4 << 20, None).await.unwrap().unwrap();
    assert!(got[..] == pdata[..(2 << 20) + 4096], "its bytes");
    img.close().await.unwrap();

    fn shape(e: &[(u64, Bytes)]) -> Vec<(u64, usize)> {
        e.iter().map(|(o, d)| (*o, d.len())).collect()
    }
}

/// Data reads hand over librados' reply buffer (read.rs): what they return is the object's
/// bytes, fewer at its end, nothing past it, `None` for a missing object, and the bytes
/// stay valid after the image is closed (the reply owns its buffer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ceph_live_reads_keep_the_reply() {
    let Some(conf) = cluster() else { return };
    let st = store(conf).await;
    let (_name, spec) = new_image(&st, "reads", 16 << 20).await;
    let img = st
        .open_image(&spec, OpenMode::ReadWrite)
        .await
        .expect("open");
    let data: Vec<u8> = (0..(1 << 20) + 5000u32)
        .map(|i| (i * 7 + 3) as u8)
        .collect();
    img.write(0, 4096, Bytes::from(data.clone()), true)
        .await
        .unwrap();
    let end = 4096 + data.len() as u64;
    let whole = img.read(0, 4096, data.len() as u64, None).await.unwrap();
    assert!(whole.as_deref() == Some(&data[..]), "a whole read");
    let short = img.read(0, end - 100, 4096, None).await.unwrap().unwrap();
    assert_eq!(&short[..], &data[data.len() - 100..], "a read over the end");
    let past = img.read(0, end + 4096, 4096, None).await.unwrap().unwrap();
    assert!(past.is_empty(), "a read past the end: {} bytes", past.len());
    let head = img.read(0, 0, 8192, None).await.unwrap().unwrap();
    assert!(
        head[..4096].iter().all(|&b| b == 0),
        "the hole before the write"
    );
    assert_eq!(&head[4096..], &data[..4096]);
    assert!(img.read(1, 0, 4096, None).await.unwrap().is_none());
    // Many at once, each answered with its own bytes.
    let reads = (0..32u64).map(|k| img.read(0, 4096 + k * 4096, 4096, None));
    for (k, r) in futures_util::future::join_all(reads)
        .await
        .into_iter()
        .enumerate()
    {
        let b = r.unwrap().unwrap();
        assert_eq!(&b[..], &data[k * 4096..(k + 1) * 4096], "read {k}");
    }
    img.close().await.unwrap();
    drop(img);
    assert!(whole.as_deref() == Some(&data[..]), "kept after close");
}

/// What `children` lists of `snap`, as specs.
async fn kid_specs(st: &CephStore, snap: &ImageSpec) -> Vec<ImageSpec> {
    let v = st.children(snap, None, false).await.unwrap();
    v.into_iter().map(|c| c.spec).collect()
}
