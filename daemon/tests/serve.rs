//! `rados-nbd serve` end to end, with real NBD clients from Debian (libnbd's Python
//! module under /usr/bin/python3, and nbdinfo). Skipped, loudly, where they are missing.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_rados-nbd");
const PY: &str = "/usr/bin/python3";
const OBJ: u64 = 4 << 20;

fn have_clients() -> bool {
    let py = Command::new(PY)
        .args(["-c", "import nbd"])
        .output()
        .is_ok_and(|o| o.status.success());
    let info = Command::new("nbdinfo")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !(py && info) {
        eprintln!("SKIP: needs python3-libnbd for {PY} and nbdinfo (libnbd-bin)");
    }
    py && info
}

fn cmd(store: &Path) -> Command {
    let mut c = Command::new(BIN);
    c.env("RADOS_NBD_STORE", store)
        .env("RADOS_NBD_CONFIG", store.join("no-such.conf"))
        .env("RUST_LOG", "rados_nbd=info");
    c
}

fn ok(store: &Path, args: &[&str]) -> String {
    let o = cmd(store).args(args).output().unwrap();
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

struct Server {
    child: Child,
    log: Arc<Mutex<String>>,
    uri: String,
}

impl Server {
    fn start(store: &Path, image: &str, extra: &[&str]) -> Server {
        let sock = store.join("nbd.sock");
        let mut args = vec!["serve", image, "--socket", sock.to_str().unwrap()];
        args.extend_from_slice(extra);
        let mut child = cmd(store)
            .args(&args)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let l2 = log.clone();
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                l2.lock().unwrap().push_str(&(line + "\n"));
            }
        });
        let t = Instant::now();
        while !log.lock().unwrap().contains("rados-nbd: serving") {
            if let Some(st) = child.try_wait().unwrap() {
                panic!("serve exited {st}: {}", log.lock().unwrap());
            }
            assert!(t.elapsed() < Duration::from_secs(20), "serve did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        let name = extra
            .iter()
            .position(|a| *a == "--export-name")
            .map(|i| extra[i + 1].to_string())
            .unwrap_or_else(|| image.rsplit('/').next().unwrap().to_string());
        let uri = format!("nbd+unix:///{name}?socket={}", sock.display());
        Server { child, log, uri }
    }

    fn signal(&self, sig: i32) {
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// SIGTERM and wait; returns the exit code and the whole log.
    fn stop(self) -> (i32, String) {
        self.stop_with(libc::SIGTERM)
    }

    /// `sig` and wait; returns the exit code and the whole log.
    fn stop_with(mut self, sig: i32) -> (i32, String) {
        self.signal(sig);
        let st = self.child.wait().unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let log = self.log.lock().unwrap().clone();
        (st.code().unwrap_or(-1), log)
    }

    fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a Python snippet with `h` connected to `uri`, then keeps the connection open
/// (so the server has a client) until the returned child is killed. Returns once the
/// snippet has finished and every write in it was acknowledged.
fn nbd_py_hold(uri: &str, body: &str) -> Child {
    let script = format!(
        "import nbd, sys, time\nh = nbd.NBD()\nh.connect_uri({uri:?})\n{body}\nprint('acked', flush=True)\ntime.sleep(600)\n"
    );
    let mut child = Command::new(PY)
        .args(["-c", &script])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(
        line.trim(),
        "acked",
        "client failed before its writes were acked"
    );
    child
}

/// Waits until the header's flags equal `want` (a checkpoint runs just after the last
/// client leaves, asynchronously to that client's exit).
fn wait_flags(store: &Path, name: &str, want: u64) {
    let t = Instant::now();
    while header(store, name)["flags"] != want {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "flags stayed {} instead of {want}",
            header(store, name)["flags"]
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs a Python snippet with `h` connected to `uri`.
fn nbd_py(uri: &str, body: &str) -> String {
    let script =
        format!("import nbd, sys\nh = nbd.NBD()\nh.connect_uri({uri:?})\n{body}\nh.shutdown()\n");
    let o = Command::new(PY).args(["-c", &script]).output().unwrap();
    assert!(
        o.status.success(),
        "python failed: {}\n{script}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn header(store: &Path, name: &str) -> serde_json::Value {
    let id = std::fs::read_to_string(store.join("rbd").join(format!("rbd_id.{name}"))).unwrap();
    let b = std::fs::read(store.join("rbd").join(format!("rbd_header.{id}"))).unwrap();
    serde_json::from_slice(&b).unwrap()
}

fn objects(store: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(store.join("rbd"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("rbd_data."))
        .collect();
    v.sort();
    v
}

/// A store in a temporary directory holding the image vm1 of `size`; None (the test is
/// skipped) where the NBD clients are missing.
fn store_with_vm1(size: &str) -> Option<tempfile::TempDir> {
    if !have_clients() {
        return None;
    }
    let d = tempfile::tempdir().unwrap();
    ok(d.path(), &["create", "--size", size, "vm1"]);
    Some(d)
}

/// [`store_with_vm1`] with vm1 served on the store's socket.
fn serve_vm1(size: &str) -> Option<(tempfile::TempDir, Server)> {
    let d = store_with_vm1(size)?;
    let srv = Server::start(d.path(), "vm1", &[]);
    Some((d, srv))
}

fn sock(store: &Path) -> PathBuf {
    store.join("nbd.sock")
}

#[test]
fn write_read_map_and_clean_close() {
    let Some((d, srv)) = serve_vm1("64M") else {
        return;
    };
    let s = d.path();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(sock(s)).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert_eq!(header(s, "vm1")["flags"], 3, "dirty flag while served");

    let out = nbd_py(
        &srv.uri,
        &format!(
            "assert h.pread(4096, {}) == bytearray(4096)\n\
             h.pwrite(b'hello' * 1000, {} - 2500)\n\
             h.pwrite(b'x' * 512, {}, nbd.CMD_FLAG_FUA)\n\
             assert h.pread(5000, {} - 2500) == bytearray(b'hello' * 1000)\n\
             h.flush()\n\
             print(h.get_size(), h.can_multi_conn(), h.can_fast_zero())",
            2 * OBJ,
            OBJ,
            9 * OBJ,
            OBJ
        ),
    );
    assert_eq!(out.trim(), format!("{} True True", 64u64 << 20));
    assert_eq!(objects(s).len(), 3, "objects 0, 1 and 9");
    // A second connection sees the first one's data (one shared image).
    nbd_py(
        &srv.uri,
        &format!("assert h.pread(5, {}) == b'x' * 5", 9 * OBJ),
    );
    let o = Command::new("nbdinfo")
        .args(["--map", "--json", &srv.uri])
        .output()
        .unwrap();
    let map: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let got: Vec<(u64, u64, u64)> = map
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["type"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (0, 2 * OBJ, 0),
            (2 * OBJ, 7 * OBJ, 3),
            (9 * OBJ, OBJ, 0),
            (10 * OBJ, 6 * OBJ, 3)
        ]
    );
    // Trim of a whole object removes it; of a fresh region, costs nothing.
    nbd_py(
        &srv.uri,
        &format!(
            "h.trim({OBJ}, {})\nh.trim({OBJ}, {})\nh.flush()",
            9 * OBJ,
            10 * OBJ
        ),
    );
    assert_eq!(objects(s).len(), 2);
    // The last client left: the map is checkpointed and the flag cleared while the
    // server keeps running; the next write sets it again before it is acknowledged.
    wait_flags(s, "vm1", 0);
    ok(s, &["object-map", "check", "vm1"]);
    let mut holder = nbd_py_hold(&srv.uri, &format!("h.pwrite(b'y' * 512, {})", 12 * OBJ));
    assert_eq!(
        header(s, "vm1")["flags"],
        3,
        "flag set again by the first write"
    );
    holder.kill().unwrap();
    holder.wait().unwrap();
    wait_flags(s, "vm1", 0);
    nbd_py(&srv.uri, &format!("h.trim({OBJ}, {})\nh.flush()", 12 * OBJ));
    assert_eq!(objects(s).len(), 2);

    let (code, log) = srv.stop();
    assert_eq!(code, 0, "{log}");
    assert!(!sock(s).exists(), "socket removed at exit");
    assert_eq!(header(s, "vm1")["flags"], 0, "flag cleared at clean close");
    let out = ok(s, &["object-map", "check", "vm1"]);
    assert!(out.contains("matches the 2 data objects"), "{out}");
    // The read of a fresh object was answered from the map, with no store read.
    assert!(log.contains("map_reads=1 store_reads="), "{log}");
    assert!(log.contains("skipped_removes=1"), "{log}");
}

#[test]
fn crash_then_restart_rebuilds_and_keeps_acked_data() {
    let Some((d, srv)) = serve_vm1("32M") else {
        return;
    };
    let s = d.path();
    // The client is still connected when the daemon dies: no checkpoint can save it.
    let mut holder = nbd_py_hold(
        &srv.uri,
        &format!(
            "h.pwrite(b'A' * 65536, {})\nh.flush()\nh.pwrite(b'B' * 4096, {}, nbd.CMD_FLAG_FUA)",
            3 * OBJ,
            6 * OBJ + 8192
        ),
    );
    srv.kill9();
    let _ = holder.kill();
    let _ = holder.wait();
    assert_eq!(header(s, "vm1")["flags"], 3, "a crash leaves the flag set");
    let o = cmd(s)
        .args(["object-map", "check", "vm1"])
        .output()
        .unwrap();
    assert!(!o.status.success(), "a flagged map never passes the check");

    let srv = Server::start(s, "vm1", &[]);
    assert!(
        srv.log.lock().unwrap().contains("rebuilding object map"),
        "{}",
        srv.log.lock().unwrap()
    );
    nbd_py(
        &srv.uri,
        &format!(
            "assert h.pread(65536, {}) == b'A' * 65536\nassert h.pread(4096, {}) == b'B' * 4096",
            3 * OBJ,
            6 * OBJ + 8192
        ),
    );
    let (code, log) = srv.stop();
    assert_eq!(code, 0, "{log}");
    assert_eq!(header(s, "vm1")["flags"], 0);
    ok(s, &["object-map", "check", "vm1"]);
}

#[test]
fn read_only_export_names_and_busy() {
    let Some(d) = store_with_vm1("8M") else {
        return;
    };
    let s = d.path();
    let srv = Server::start(s, "vm1", &["--read-only", "--export-name", "disk"]);
    assert_eq!(
        header(s, "vm1")["flags"],
        0,
        "read-only never sets the flag"
    );
    nbd_py(
        &srv.uri,
        "assert h.is_read_only()\nh.set_strict_mode(0)\n\
         try:\n    h.pwrite(b'x', 0)\n    sys.exit('write accepted')\n\
         except nbd.Error as e:\n    assert e.errno == 'EPERM', e.errno",
    );
    // "" selects the one export too; an unknown name does not.
    let default_uri = format!("nbd+unix:///?socket={}", sock(s).display());
    let o = Command::new("nbdinfo")
        .args(["--size", &default_uri])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        (8u64 << 20).to_string()
    );
    let bad = format!("nbd+unix:///vm1?socket={}", sock(s).display());
    assert!(!Command::new("nbdinfo")
        .args(["--size", &bad])
        .output()
        .unwrap()
        .status
        .success());
    // The socket is taken: a second server refuses to steal it.
    let o = cmd(s)
        .args([
            "serve",
            "vm1",
            "--read-only",
            "--socket",
            sock(s).to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("in use"), "{err}");
    let (code, _) = srv.stop();
    assert_eq!(code, 0);

    // A writer holds the image: a second writer gets one clear line.
    let srv = Server::start(s, "vm1", &[]);
    let other = s.join("other.sock");
    let o = cmd(s)
        .args(["serve", "vm1", "--socket", other.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("rbd/vm1 is in use"), "{err}");
    assert!(!other.exists());
    let (code, _) = srv.stop();
    assert_eq!(code, 0);
}

#[test]
fn stale_socket_is_replaced_but_other_files_are_not() {
    let Some(d) = store_with_vm1("8M") else {
        return;
    };
    let s = d.path();
    drop(std::os::unix::net::UnixListener::bind(sock(s)).unwrap());
    assert!(sock(s).exists(), "a stale socket file");
    let srv = Server::start(s, "vm1", &[]);
    nbd_py(&srv.uri, "assert h.get_size() == 8 << 20");
    let (code, _) = srv.stop();
    assert_eq!(code, 0);
    std::fs::write(sock(s), b"not a socket").unwrap();
    let o = cmd(s)
        .args(["serve", "vm1", "--socket", sock(s).to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert_eq!(std::fs::read(sock(s)).unwrap(), b"not a socket");
    assert_eq!(
        header(s, "vm1")["flags"],
        0,
        "failed serve left the image clean"
    );
}

#[test]
fn sigterm_with_a_client_attached_and_once() {
    let Some((d, srv)) = serve_vm1("8M") else {
        return;
    };
    let s = d.path();
    // A client that wrote, then sits idle holding its connection.
    let script = format!(
        "import nbd, time\nh = nbd.NBD()\nh.connect_uri({:?})\nh.pwrite(b'q' * 4096, 0)\nprint('ready', flush=True)\ntime.sleep(30)\n",
        srv.uri
    );
    let mut client = Command::new(PY)
        .args(["-c", &script])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(client.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready");
    let t = Instant::now();
    let (code, log) = srv.stop();
    let _ = client.kill();
    let _ = client.wait();
    assert_eq!(code, 0, "{log}");
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t.elapsed()
    );
    assert_eq!(header(s, "vm1")["flags"], 0);
    ok(s, &["object-map", "check", "vm1"]);

    // --once: the server ends (cleanly) when its first client leaves.
    let mut srv = Server::start(s, "vm1", &["--once"]);
    nbd_py(&srv.uri, "assert h.pread(4, 0) == b'qqqq'");
    let t = Instant::now();
    let st = loop {
        if let Some(st) = srv.child.try_wait().unwrap() {
            break st;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "--once did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(st.success());
    assert_eq!(header(s, "vm1")["flags"], 0);
}

#[test]
fn kill9_mid_workload_loses_nothing_acked() {
    let Some((d, srv)) = serve_vm1("256M") else {
        return;
    };
    let s = d.path();
    // Writes spread over many objects (half with FUA), each acknowledged index printed.
    let script = format!(
        "import nbd, sys\nh = nbd.NBD()\nh.connect_uri({:?})\n\
         for i in range(100000):\n\
         \x20   off = (i * 1048576 + (i % 7) * 4096) % (256 << 20)\n\
         \x20   h.pwrite(i.to_bytes(4, 'little') * 1024, off, nbd.CMD_FLAG_FUA if i % 2 else 0)\n\
         \x20   print(i, flush=True)\n",
        srv.uri
    );
    let mut client = Command::new(PY)
        .args(["-c", &script])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut rd = BufReader::new(client.stdout.take().unwrap());
    let mut last = None;
    let mut line = String::new();
    while last.is_none_or(|l: u64| l < 150) {
        line.clear();
        assert!(rd.read_line(&mut line).unwrap() > 0, "client ended early");
        last = Some(line.trim().parse().unwrap());
    }
    srv.kill9();
    // Whatever else the client printed was acknowledged before the kill.
    let mut rest = String::new();
    let _ = std::io::Read::read_to_string(&mut rd, &mut rest);
    let _ = client.wait();
    let acked = rest
        .lines()
        .filter_map(|l| l.trim().parse::<u64>().ok())
        .max()
        .unwrap_or(last.unwrap());
    assert_eq!(header(s, "vm1")["flags"], 3);

    let srv = Server::start(s, "vm1", &[]);
    // The later of two writes to one offset wins: check the last index per offset.
    let check = format!(
        "last = {{}}\n\
         for i in range({}):\n\
         \x20   last[(i * 1048576 + (i % 7) * 4096) % (256 << 20)] = i\n\
         for off, i in last.items():\n\
         \x20   assert h.pread(4096, off) == i.to_bytes(4, 'little') * 1024, (off, i)\n\
         print(len(last))",
        acked + 1
    );
    let n: usize = nbd_py(&srv.uri, &check).trim().parse().unwrap();
    assert!(n > 100);
    let (code, log) = srv.stop();
    assert_eq!(code, 0, "{log}");
    ok(s, &["object-map", "check", "vm1"]);
}

#[test]
fn hole_reads_never_reach_the_store_and_sigint_closes_cleanly() {
    let Some((d, srv)) = serve_vm1("64M") else {
        return;
    };
    let s = d.path();
    // Reads of objects that do not exist, one of them spanning two objects: three
    // pieces, all answered from the object map.
    nbd_py(
        &srv.uri,
        &format!(
            "assert h.pread(4096, {}) == bytearray(4096)\n\
             assert h.pread(8192, {} - 4096) == bytearray(8192)",
            5 * OBJ,
            3 * OBJ
        ),
    );
    assert!(objects(s).is_empty(), "reads and queries created nothing");
    let (code, log) = srv.stop_with(libc::SIGINT);
    assert_eq!(code, 0, "SIGINT is a clean close: {log}");
    assert_eq!(header(s, "vm1")["flags"], 0, "flag cleared at clean close");
    assert!(
        log.contains("map_reads=3 store_reads=0 store_writes=0"),
        "every hole read was answered from the map, none by the store: {log}"
    );
}

#[test]
fn resize_while_served_through_the_holder() {
    let Some((d, srv)) = serve_vm1("32M") else {
        return;
    };
    let s = d.path();
    // Growing: done by the serving process (it holds the lock); new clients see it.
    let out = ok(s, &["resize", "--size", "64M", "vm1"]);
    assert_eq!(out, format!("rbd/vm1: size {} bytes\n", 64 << 20));
    assert_eq!(header(s, "vm1")["size"], 64 << 20);
    let size = nbd_py(&srv.uri, "print(h.get_size())");
    assert_eq!(size.trim(), (64u64 << 20).to_string());
    nbd_py(
        &srv.uri,
        &format!(
            "h.pwrite(b'g' * 512, {})\nassert h.pread(512, {}) == b'g' * 512",
            60 << 20,
            60 << 20
        ),
    );
    // Shrinking discards data: refused without --allow-shrink, and nothing changes.
    let o = cmd(s)
        .args(["resize", "--size", "8M", "vm1"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("--allow-shrink") && err.lines().count() == 1,
        "{err}"
    );
    assert_eq!(header(s, "vm1")["size"], 64 << 20);
    // A client connected before the shrink still believes in 64 MiB: past the new end
    // it gets ENOSPC, and the connection goes on.
    let r = nbd_py(
        &srv.uri,
        &format!(
            "import os, subprocess\n\
             assert h.get_size() == {big}\n\
             env = dict(os.environ, RADOS_NBD_STORE='{store}', RADOS_NBD_CONFIG='{store}/no.conf')\n\
             subprocess.run(['{bin}', 'resize', '--size', '6M', '--allow-shrink', 'vm1'], env=env, check=True)\n\
             try:\n    h.pwrite(b'x', {past})\n    print('accepted')\n\
             except nbd.Error as e:\n    print('refused', 'ENOSPC' in str(e))\n\
             assert h.pread(512, 0) == bytearray(512)",
            big = 64u64 << 20,
            store = s.display(),
            bin = BIN,
            past = 20u64 << 20
        ),
    );
    assert_eq!(r.lines().last(), Some("refused True"), "{r}");
    assert_eq!(header(s, "vm1")["size"], 6 << 20);
    let left = objects(s);
    assert!(left.is_empty(), "objects 15 lay past 6 MiB: {left:?}");
    let (code, log) = srv.stop();
    assert_eq!(code, 0, "{log}");
    assert!(
        log.contains("resized rbd/vm1 from 33554432 to 67108864 bytes"),
        "{log}"
    );
    assert_eq!(header(s, "vm1")["flags"], 0);
    let out = ok(s, &["object-map", "check", "vm1"]);
    assert!(out.contains("matches the 0 data objects"), "{out}");
    // No control socket is left behind, and an image nobody serves is resized in place.
    assert!(!std::fs::read_dir(s.join("rbd")).unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .ends_with(".ctl")));
    ok(s, &["resize", "--size", "12M", "vm1"]);
    assert_eq!(header(s, "vm1")["size"], 12 << 20);
}

/// `serve::run` in-process, without argv or signals: an opened image on a 127.0.0.1
/// listener, a client that wrote and left, one that wrote and stays connected; resolving
/// the shutdown future ends the serving, every acknowledged write is in the store and the
/// image closes clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_serves_an_opened_image_until_its_shutdown_future() {
    use clap::Parser;
    use rados_nbd::image::{create_image, Image, OpenOptions};
    use rados_nbd::serve::{run, ListenAddr, ServeArgs};
    use rados_nbd::spec::ImageSpec;
    use rados_nbd::store::dir::DirStore;
    use rados_nbd::store::{CreateOptions, ImageStore, OpenMode, Store, DEFAULT_FEATURES};

    if !have_clients() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let store = DirStore::new(d.path().to_path_buf());
    let spec: ImageSpec = "vm1".parse().unwrap();
    let create = CreateOptions {
        size: 8 << 20,
        order: 22,
        features: DEFAULT_FEATURES,
        data_pool: None,
        stripe_unit: None,
    };
    create_image(&store, &spec, &create).await.unwrap();
    let opts = OpenOptions {
        read_only: false,
        shared_default: false,
        checkpoint_idle: None,
    };
    let image = Arc::new(Image::open(&store, &spec, &opts).await.unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let addr = ListenAddr::Tcp("127.0.0.1".into(), port);
    let argv = ["rados-nbd", "serve", "vm1", "--listen", &port.to_string()];
    let args: ServeArgs = match rados_nbd::cli::Cli::try_parse_from(argv).unwrap().command {
        rados_nbd::cli::Command::Serve(a) => a,
        other => panic!("parsed as {other:?}"),
    };
    let uri = format!("nbd://127.0.0.1:{port}/vm1");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server_opts = nbd_protocol::ServerOptions::default();
    let server = run(
        &image,
        &spec,
        listener.into(),
        &addr,
        &args,
        &server_opts,
        async {
            let _ = stopped.await;
        },
    );
    let clients = async {
        tokio::task::spawn_blocking(move || {
            let out = nbd_py(
                &uri,
                "h.pwrite(b'a' * 4096, 0)\nprint(h.pread(4096, 0) == b'a' * 4096)",
            );
            assert_eq!(out.trim(), "True");
            let held = nbd_py_hold(&uri, "h.pwrite(b'b' * 4096, 8192)");
            stop.send(()).unwrap();
            held
        })
        .await
        .unwrap()
    };
    let (served, mut held) = tokio::time::timeout(Duration::from_secs(30), async {
        tokio::join!(server, clients)
    })
    .await
    .expect("run did not return after its shutdown future resolved");
    let _ = held.kill();
    let _ = held.wait();
    served.unwrap();
    image.close().await.unwrap();

    let img = store.open_image(&spec, OpenMode::ReadOnly).await.unwrap();
    assert_eq!(img.header().flags, 0, "closed clean after the drain");
    let data = img.read(0, 0, 12288, None).await.unwrap().unwrap();
    assert_eq!(&data[..4096], &[b'a'; 4096][..]);
    assert_eq!(&data[8192..12288], &[b'b'; 4096][..]);
    img.close().await.unwrap();
}
