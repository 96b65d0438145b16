//! The command-line contract, run against the built binary in a temporary store.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_rados-nbd");

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

fn run_in(store: &Path, args: &[&str]) -> Out {
    let o = Command::new(BIN)
        .args(args)
        .env("RADOS_NBD_STORE", store)
        .env("RADOS_NBD_CONFIG", store.join("no-such.conf"))
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    Out {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

fn ok(store: &Path, args: &[&str]) -> String {
    let o = run_in(store, args);
    assert_eq!(o.code, 0, "{args:?} failed: {}", o.stderr);
    o.stdout
}

/// Asserts one clean error line mentioning `needle`, non-zero exit, nothing on disk changed.
fn fails_cleanly(store: &Path, args: &[&str], needle: &str) -> String {
    let before = tree(store);
    let o = run_in(store, args);
    assert_ne!(o.code, 0, "{args:?} succeeded: {}", o.stdout);
    let lines: Vec<&str> = o.stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "{args:?}: want one line, got {:?}",
        o.stderr
    );
    assert!(lines[0].starts_with("rados-nbd: "), "{:?}", lines[0]);
    assert!(
        lines[0].contains(needle),
        "{args:?}: {:?} lacks {needle:?}",
        lines[0]
    );
    assert!(!o.stderr.contains("panicked") && !o.stderr.contains("RUST_BACKTRACE"));
    assert_eq!(before, tree(store), "{args:?} changed the store");
    lines[0].to_string()
}

/// Every file under `dir` with its content and mtime.
fn tree(dir: &Path) -> BTreeMap<PathBuf, (Vec<u8>, std::time::SystemTime)> {
    let mut m = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd {
            let p = e.unwrap().path();
            let md = std::fs::metadata(&p).unwrap();
            if md.is_dir() {
                stack.push(p);
            } else {
                m.insert(
                    p.clone(),
                    (std::fs::read(&p).unwrap(), md.modified().unwrap()),
                );
            }
        }
    }
    m
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s.trim()).unwrap_or_else(|e| panic!("bad json {s:?}: {e}"))
}

fn image_id(store: &Path, pool: &str, name: &str) -> String {
    std::fs::read_to_string(store.join(pool).join(format!("rbd_id.{name}"))).unwrap()
}

/// `--size` as `rbd create` and `rbd resize` read it: a number alone is MiB, `B` is bytes.
#[test]
fn sizes_without_a_unit_are_mib_as_in_rbd() {
    let d = tempfile::tempdir().unwrap();
    let s = d.path();
    let size = |name: &str| json(&ok(s, &["info", name, "--format", "json"]))["size"].clone();
    ok(s, &["create", "--size", "10", "a"]);
    assert_eq!(size("a"), 10u64 << 20);
    ok(s, &["create", "--size", "12288B", "b"]);
    assert_eq!(size("b"), 12288);
    ok(s, &["resize", "--size", "20", "a"]);
    assert_eq!(size("a"), 20u64 << 20);
    // 20 bytes would be a shrink; 20 MiB is the size it has, so nothing to do.
    ok(s, &["resize", "--size", "20", "a"]);
    ok(s, &["resize", "--size", "4194304B", "--allow-shrink", "a"]);
    assert_eq!(size("a"), 4u64 << 20);
}

/// `create --image-feature` as rbd's: names, repeated or comma-separated; object-map brings
/// fast-diff, as librbd's create adds it; what rados-nbd cannot serve is refused.
#[test]
fn create_with_image_features() {
    let d = tempfile::tempdir().unwrap();
    let s = d.path();
    let features =
        |name: &str| json(&ok(s, &["info", name, "--format", "json"]))["features"].clone();
    ok(
        s,
        &["create", "--size", "4M", "--image-feature", "layering", "a"],
    );
    assert_eq!(features("a"), serde_json::json!(["layering"]));
    ok(
        s,
        &[
            "create",
            "--size",
            "4M",
            "--image-feature",
            "layering,exclusive-lock",
            "--image-feature",
            "object-map",
            "b",
        ],
    );
    assert_eq!(
        features("b"),
        serde_json::json!(["layering", "exclusive-lock", "object-map", "fast-diff"])
    );
    fails_cleanly(
        s,
        &[
            "create",
            "--size",
            "4M",
            "--image-feature",
            "object-map",
            "c",
        ],
        "needs exclusive-lock",
    );
    fails_cleanly(
        s,
        &[
            "create",
            "--size",
            "4M",
            "--image-feature",
            "exclusive-lock,journaling",
            "c",
        ],
        "journaling",
    );
}

#[test]
fn create_info_ls_rm() {
    let d = tempfile::tempdir().unwrap();
    let s = d.path();
    ok(s, &["create", "--size", "10G", "vm1"]);
    ok(
        s,
        &["create", "--size", "6M", "--object-size", "1M", "p2/small"],
    );
    let v = json(&ok(s, &["info", "vm1", "--format", "json"]));
    assert_eq!(v["size"], 10u64 << 30);
    assert_eq!(v["objects"], 2560);
    assert_eq!(v["order"], 22);
    assert_eq!(v["object_size"], 4 << 20);
    assert_eq!(
        v["block_name_prefix"],
        format!("rbd_data.{}", v["id"].as_str().unwrap())
    );
    assert_eq!(
        v["features"],
        serde_json::json!([
            "layering",
            "exclusive-lock",
            "object-map",
            "fast-diff",
            "deep-flatten"
        ])
    );
    assert_eq!(v["flags"], serde_json::json!([]));
    let v = json(&ok(s, &["info", "p2/small", "--format", "json"]));
    assert_eq!(
        (v["objects"].as_u64(), v["order"].as_u64()),
        (Some(6), Some(20))
    );
    let text = ok(s, &["info", "vm1"]);
    assert!(text.contains("size 10 GiB in 2560 objects"), "{text}");
    assert!(text.contains("order 22 (4 MiB objects)"), "{text}");
    assert_eq!(ok(s, &["ls"]), "vm1\n");
    assert_eq!(
        json(&ok(s, &["ls", "p2", "--format", "json"])),
        serde_json::json!(["small"])
    );
    assert_eq!(ok(s, &["ls", "empty"]), "");
    assert_eq!(ok(s, &["ls", "-l", "empty"]), "");
    // ls -l as rbd's: images and their snapshots, the parent of a clone, protection.
    ok(s, &["snap", "create", "p2/small@s1"]);
    ok(s, &["snap", "protect", "p2/small@s1"]);
    ok(s, &["clone", "p2/small@s1", "p2/kid"]);
    assert_eq!(
        ok(s, &["ls", "-l", "p2"]),
        concat!(
            "NAME      SIZE   PARENT       FMT  PROT  LOCK\n",
            "kid       6 MiB  p2/small@s1    2            \n",
            "small     6 MiB                 2            \n",
            "small@s1  6 MiB                 2  yes       \n",
        )
    );
    let v = json(&ok(s, &["ls", "--long", "p2", "--format", "json"]));
    assert_eq!(v[0]["parent"]["snapshot"], "s1");
    assert_eq!(v[2]["snapshot"], "s1");
    assert_eq!(v[2]["protected"], "true");
    assert_eq!(v[2]["snapshot_id"], 1);
    assert_eq!(v[1]["id"], v[2]["id"]);
    ok(s, &["rm", "p2/kid"]);
    ok(s, &["snap", "unprotect", "p2/small@s1"]);
    ok(s, &["snap", "rm", "p2/small@s1"]);
    // rbd's --pretty-format: the same JSON, indented by four, fields in rbd info's order.
    let pretty = ok(s, &["info", "vm1", "--format", "json", "--pretty-format"]);
    assert_eq!(
        json(&pretty),
        json(&ok(s, &["info", "vm1", "--format", "json"]))
    );
    assert!(
        pretty.starts_with("{\n    \"name\": \"vm1\",\n    \"id\": "),
        "{pretty}"
    );
    assert_eq!(
        ok(s, &["ls", "p2", "--format", "json", "--pretty-format"]),
        "[\n    \"small\"\n]\n"
    );
    ok(s, &["rm", "vm1"]);
    assert_eq!(ok(s, &["ls"]), "");
    let left: Vec<_> = std::fs::read_dir(s.join("rbd"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| !n.starts_with("rbd_directory"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    // --store wins over the environment.
    let other = tempfile::tempdir().unwrap();
    let uri = format!("dir:{}", other.path().display());
    ok(s, &["--store", &uri, "create", "--size", "1M", "elsewhere"]);
    assert_eq!(ok(s, &["--store", &uri, "ls"]), "elsewhere\n");
    assert_eq!(ok(s, &["ls", "p2"]), "small\n");
}

#[test]
fn bad_inputs_give_one_line_and_change_nothing() {
    let d = tempfile::tempdir().unwrap();
    let s = d.path();
    ok(s, &["create", "--size", "64M", "vm1"]);
    let l = fails_cleanly(s, &["info", "nosuch"], "image rbd/nosuch not found in dir:");
    assert!(l.contains(&s.display().to_string()), "{l}");
    fails_cleanly(s, &["create", "--size", "12Q", "t2"], "12Q");
    fails_cleanly(
        s,
        &["create", "--size", "1M", "--object-size", "3M", "t2"],
        "3M",
    );
    fails_cleanly(s, &["create", "--size", "1M", "vm1"], "already exists");
    fails_cleanly(s, &["create", "--size", "2048P", "huge"], "too large");
    fails_cleanly(
        s,
        &["create", "--size", "8P", "--object-size", "4K", "huge"],
        "not compatible with object map",
    );
    fails_cleanly(s, &["create", "--size", "1M", "bad/na/me"], "bad/na/me");
    fails_cleanly(s, &["--store", "nosuch:/x", "ls"], "nosuch:/x");
    if cfg!(feature = "ceph") {
        fails_cleanly(
            s,
            &["--store", "ceph:/nonexistent/ceph.conf", "ls"],
            "read config /nonexistent/ceph.conf",
        );
    } else {
        fails_cleanly(s, &["--store", "ceph:", "ls"], "no Ceph support");
    }
    fails_cleanly(s, &["--id", "admin", "ls"], "--id and --keyring only apply");
    fails_cleanly(
        s,
        &[
            "serve",
            "vm1",
            "--socket",
            "/tmp/x.sock",
            "--allow-encrypted",
        ],
        "--allow-encrypted only applies",
    );
    fails_cleanly(s, &["rm", "nosuch"], "not found");
    fails_cleanly(s, &["frobnicate"], "frobnicate");
    fails_cleanly(s, &["create", "vm2"], "--size");
    fails_cleanly(s, &["config", "vm1", "colour=blue"], "colour");
    fails_cleanly(s, &["config", "vm1", "shared=maybe"], "maybe");
    fails_cleanly(s, &["info", "vm1@nosnap"], "vm1@nosnap");
    fails_cleanly(s, &["serve", "vm1", "--listen", "127.0.0.1:99999"], "99999");
    fails_cleanly(
        s,
        &["serve", "nosuch", "--socket", "/tmp/x.sock"],
        "not found",
    );
}

#[test]
fn corrupt_header_and_object_map_are_reported() {
    let d = tempfile::tempdir().unwrap();
    let s = d.path();
    ok(s, &["create", "--size", "64M", "vm1"]);
    let id = image_id(s, "rbd", "vm1");
    let hp = s.join("rbd").join(format!("rbd_header.{id}"));
    let good = std::fs::read(&hp).unwrap();
    std::fs::write(&hp, b"{\"format\": 1, \"id\": ").unwrap();
    let l = fails_cleanly(s, &["info", "vm1"], "corrupt image header");
    assert!(l.contains(&hp.display().to_string()), "{l}");
    fails_cleanly(s, &["du", "vm1"], "corrupt image header");
    fails_cleanly(
        s,
        &[
            "serve",
            "vm1",
            "--socket",
            &s.join("x.sock").display().to_string(),
        ],
        "corrupt",
    );
    std::fs::write(&hp, &good).unwrap();

    let mp = s.join("rbd").join(format!("rbd_object_map.{id}"));
    let mut m = std::fs::read(&mp).unwrap();
    let n = m.len();
    m[n - 1] ^= 0x55;
    std::fs::write(&mp, &m).unwrap();
    let before = tree(s);
    let o = run_in(s, &["object-map", "check", "vm1"]);
    assert_ne!(o.code, 0);
    assert!(o.stdout.contains("corrupt"), "{}", o.stdout);
    assert_eq!(o.stderr.lines().count(), 1, "{}", o.stderr);
    assert!(
        o.stderr.starts_with("rados-nbd: object map of rbd/vm1"),
        "{}",
        o.stderr
    );
    // du does not trust it either: it rebuilds in memory and says why, on stderr.
    let o = run_in(s, &["du", "vm1"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(
        o.stderr.contains("rebuilding object map") && o.stderr.contains("corrupt"),
        "{}",
        o.stderr
    );
    assert_eq!(before, tree(s), "read-only commands changed the store");
    ok(s, &["object-map", "rebuild", "vm1"]);
    ok(s, &["object-map", "check", "vm1"]);
}

#[test]
fn object_map_check_names_mismatched_objects_and_rebuild_fixes() {
    let d = tempfile::tempdir().unwrap();
    let s = d.path();
    ok(s, &["create", "--size", "64M", "vm1"]);
    ok(s, &["object-map", "check", "vm1"]);
    let id = image_id(s, "rbd", "vm1");
    let obj = format!("rbd_data.{id}.0000000000000002");
    std::fs::write(s.join("rbd").join(&obj), vec![1u8; 4096]).unwrap();
    let o = run_in(s, &["object-map", "check", "vm1"]);
    assert_ne!(o.code, 0);
    assert!(o.stdout.contains(&obj), "{}", o.stdout);
    let v = json(&ok(s, &["du", "vm1", "--format", "json"]));
    assert_eq!(v["images"][0]["used_size"], 0, "du trusts a clean map");
    let out = ok(s, &["object-map", "rebuild", "vm1"]);
    assert!(out.contains("1 of 16"), "{out}");
    ok(s, &["object-map", "check", "vm1"]);
    let v = json(&ok(s, &["du", "vm1", "--format", "json"]));
    assert_eq!(v["images"][0]["used_size"], 4 << 20);
    assert_eq!(v["images"][0]["provisioned_size"], 64 << 20);
    let text = ok(s, &["du", "vm1"]);
    assert!(text.contains("64 MiB") && text.contains("4 MiB"), "{text}");
    // A flagged-invalid map fails the check even when the bits happen to agree.
    let hp = s.join("rbd").join(format!("rbd_header.{id}"));
    let mut h = json(&std::fs::read_to_string(&hp).unwrap());
    h["flags"] = 3.into();
    std::fs::write(&hp, serde_json::to_vec(&h).unwrap()).unwrap();
    let o = run_in(s, &["object-map", "check", "vm1"]);
    assert_ne!(o.code, 0);
    assert!(o.stdout.contains("invalid"), "{}", o.stdout);
    let text = ok(s, &["info", "vm1"]);
    assert!(
        text.contains("flags: object map invalid, fast diff invalid"),
        "{text}"
    );
    let v = json(&ok(s, &["info", "vm1", "--format", "json"]));
    assert_eq!(
        v["flags"],
        serde_json::json!(["object map invalid", "fast diff invalid"])
    );
    ok(s, &["object-map", "rebuild", "vm1"]);
    assert_eq!(
        json(&ok(s, &["info", "vm1", "--format", "json"]))["flags"],
        serde_json::json!([])
    );
}

#[test]
fn config_shared_and_default_from_file() {
    let d = tempfile::tempdir().unwrap();
    let s = d.path();
    ok(s, &["create", "--size", "8M", "vm1"]);
    assert_eq!(ok(s, &["config", "vm1"]), "shared=false (default)\n");
    ok(s, &["config", "vm1", "shared=true"]);
    assert_eq!(ok(s, &["config", "vm1"]), "shared=true (image)\n");
    assert_eq!(
        json(&ok(s, &["info", "vm1", "--format", "json"]))["shared"],
        true
    );
    ok(s, &["config", "vm1", "shared=false"]);
    // The config file's default applies to images without the setting.
    ok(s, &["create", "--size", "8M", "vm2"]);
    let conf = s.join("rados-nbd.conf");
    std::fs::write(&conf, "# test\nshared_default = true\n").unwrap();
    let with_conf = |args: &[&str]| {
        Command::new(BIN)
            .args(args)
            .env("RADOS_NBD_STORE", s)
            .env("RADOS_NBD_CONFIG", &conf)
            .output()
            .unwrap()
    };
    let o = with_conf(&["config", "vm2"]);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "shared=true (default)\n"
    );
    std::fs::write(&conf, "shared_default = sometimes\n").unwrap();
    let o = with_conf(&["info", "vm2"]);
    assert_ne!(o.status.code(), Some(0));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&conf.display().to_string()) && err.contains("line 1"),
        "{err}"
    );
}

#[test]
fn version_and_help() {
    let d = tempfile::tempdir().unwrap();
    let out = ok(d.path(), &["--version"]);
    assert!(out.starts_with("rados-nbd "), "{out}");
    let help = ok(d.path(), &["--help"]);
    for c in [
        "create",
        "info",
        "rm",
        "ls",
        "serve",
        "du",
        "object-map",
        "config",
    ] {
        assert!(help.contains(c), "help lacks {c}");
    }
}

#[test]
fn flatten_refuses_an_image_that_is_not_a_clone() {
    let d = tempfile::tempdir().unwrap();
    let s = d.path();
    ok(s, &["create", "--size", "8M", "vm1"]);
    fails_cleanly(s, &["flatten", "vm1"], "vm1 is not a clone");
    fails_cleanly(s, &["flatten", "vm1@s1"], "flatten");
    fails_cleanly(s, &["flatten", "nosuch"], "nosuch");
}

#[test]
fn diff_lists_written_extents_or_whole_objects_and_du_names_the_image_id() {
    let d = tempfile::tempdir().unwrap();
    let s = d.path();
    ok(s, &["create", "--size", "10M", "vm1"]);
    assert_eq!(ok(s, &["diff", "vm1", "--format", "json"]).trim(), "[]");
    assert_eq!(
        ok(s, &["diff", "vm1"]),
        "",
        "rbd prints nothing for no extents"
    );
    // Objects 0 and 2 (the last, 2 MiB of the 10 MiB image) exist; the map is rebuilt
    // so it says so, and diff answers from it alone.
    let id = image_id(s, "rbd", "vm1");
    for o in [0, 2] {
        let obj = format!("rbd_data.{id}.{o:016x}");
        std::fs::write(s.join("rbd").join(obj), vec![1u8; 4096]).unwrap();
    }
    ok(s, &["object-map", "rebuild", "vm1"]);
    let before = tree(s);
    assert_eq!(
        ok(s, &["diff", "--whole-object", "vm1", "--format", "json"]).trim(),
        r#"[{"offset":0,"length":4194304,"exists":"true"},{"offset":8388608,"length":2097152,"exists":"true"}]"#
    );
    // Without --whole-object: what the objects hold (their snap sets; 4 KiB each).
    assert_eq!(
        ok(s, &["diff", "vm1"]),
        "Offset   Length  Type\n0        4096    data\n8388608  4096    data\n"
    );
    assert_eq!(
        ok(s, &["diff", "--whole-object", "vm1"]),
        "Offset   Length   Type\n0        4194304  data\n8388608  2097152  data\n"
    );
    let v = json(&ok(s, &["du", "--exact", "vm1", "--format", "json"]));
    assert_eq!(v["images"][0]["used_size"], 2 * 4096);
    let v = json(&ok(s, &["du", "vm1", "--format", "json"]));
    assert_eq!(v["images"][0]["id"], id.trim());
    assert_eq!(v["images"][0]["used_size"], (4 << 20) + (2 << 20));
    assert_eq!(v["images"].as_array().unwrap().len(), 1);
    assert_eq!(before, tree(s), "diff and du changed the store");
    fails_cleanly(
        s,
        &["diff", "--from-snap", "nope", "vm1"],
        "snapshot rbd/vm1@nope not found",
    );
    fails_cleanly(s, &["du", "vm1@nope"], "snapshot rbd/vm1@nope not found");
    // Without an image: the whole pool, by name, with totals (json) and <TOTAL> (plain).
    ok(s, &["create", "--size", "6M", "avm"]);
    for args in [
        &["du", "--format", "json"][..],
        &["du", "-p", "rbd", "--format", "json"],
    ] {
        let v = json(&ok(s, args));
        let names: Vec<&str> = v["images"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["avm", "vm1"], "{args:?}");
        assert_eq!(v["total_provisioned_size"], (6 << 20) + (10 << 20));
        assert_eq!(v["total_used_size"], (4 << 20) + (2 << 20));
    }
    let plain = ok(s, &["du"]);
    assert!(
        plain.lines().last().unwrap().starts_with("<TOTAL>"),
        "{plain}"
    );
    fails_cleanly(s, &["du", "-p", "rbd", "vm1"], "cannot be used with");
}

/// Exit status 2 says "this can never succeed as given" (rados-nbd@.service does not retry
/// it: RestartPreventExitStatus=2); other failures are 1.
#[test]
fn exit_status_tells_permanent_failures_apart() {
    let d = tempfile::tempdir().unwrap();
    let s = d.path();
    ok(s, &["create", "--size", "4M", "vm1"]);
    // Something named that does not exist.
    let o = run_in(s, &["info", "nosuch"]);
    assert_eq!(o.code, 2, "{}", o.stderr);
    let o = run_in(s, &["snap", "rm", "vm1@nosuch"]);
    assert_eq!(o.code, 2, "{}", o.stderr);
    // Bad arguments.
    let o = run_in(s, &["info", "--no-such-flag", "vm1"]);
    assert_eq!(o.code, 2, "{}", o.stderr);
    let o = run_in(s, &["create", "vm2"]);
    assert_eq!(o.code, 2, "{}", o.stderr);
    // Anything else: 1 (the image exists already).
    let o = run_in(s, &["create", "--size", "4M", "vm1"]);
    assert_eq!(o.code, 1, "{}", o.stderr);
}

/// A flag given twice takes its later value (`--store`, `--id`, `--keyring` and every
/// subcommand's own): rados-nbdmap puts RADOS_NBD_MAP_OPTIONS first and an nbdtab entry's own
/// options after (and rados-nbd@.service RADOS_NBD_IMAGE_OPTIONS after RADOS_NBD_MAP_OPTIONS).
#[test]
fn a_later_flag_wins() {
    let d = tempfile::tempdir().unwrap();
    let s = d.path();
    ok(s, &["create", "--size", "4M", "vm1"]);
    let here = format!("dir:{}", s.display());
    let out = ok(
        s,
        &[
            "--store",
            "dir:/nonexistent/rados-nbd",
            "info",
            "--store",
            &here,
            "vm1",
        ],
    );
    assert!(out.contains("size 4 MiB"), "{out}");
    // The other order: the missing store is the one used.
    let o = run_in(
        s,
        &[
            "--store",
            &here,
            "info",
            "--store",
            "dir:/nonexistent/rados-nbd",
            "vm1",
        ],
    );
    assert_ne!(o.code, 0, "{}", o.stdout);
    assert!(o.stderr.contains("/nonexistent/rados-nbd"), "{}", o.stderr);
    // --id and --keyring twice are taken too (here refused for what they are: a directory
    // store has no Ceph user), not as a usage error.
    let o = run_in(
        s,
        &[
            "--id",
            "a",
            "--keyring",
            "/a",
            "info",
            "--id",
            "b",
            "--keyring",
            "/b",
            "vm1",
        ],
    );
    assert!(
        o.stderr.contains("only apply to --store ceph") && !o.stderr.contains("multiple"),
        "{}",
        o.stderr
    );
    // A subcommand's own flag.
    ok(s, &["create", "--size", "4M", "--size", "8M", "vm2"]);
    let out = ok(s, &["info", "vm2"]);
    assert!(out.contains("size 8 MiB"), "{out}");
}
