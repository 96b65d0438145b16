//! The server against real NBD clients from Debian (libnbd's nbdinfo/nbdsh/nbdcopy, qemu-img,
//! fio's nbd engine),
//! through `examples/memserver.rs` on a unix socket. A missing tool skips its part with a
//! message rather than failing: these are interoperability checks, the raw-bytes tests
//! cover the protocol itself.

mod tlscerts;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn tool(name: &str) -> Option<PathBuf> {
    let p = Path::new("/usr/bin").join(name);
    if p.exists() {
        Some(p)
    } else {
        println!("SKIP: {name} not installed (/usr/bin/{name})");
        None
    }
}

fn memserver_binary() -> PathBuf {
    // tests run from target/<profile>/deps/; `cargo test` builds examples next door.
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = profile_dir.join("examples").join("memserver");
    if bin.exists() {
        return bin;
    }
    // `cargo test --test real_clients` does not build examples: build it in a separate
    // target dir so we never wait on the lock of the build that is running us.
    let target = profile_dir.join("real-clients-target");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let st = Command::new(cargo)
        .args([
            "build",
            "-p",
            "nbd-protocol",
            "--example",
            "memserver",
            "--target-dir",
        ])
        .arg(&target)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("run cargo build");
    assert!(st.success(), "building memserver failed");
    target.join("debug").join("examples").join("memserver")
}

/// The example server, stopped with SIGTERM (then SIGKILL) by its own pid on drop.
struct MemServer {
    child: Child,
    socket: PathBuf,
    _dir: TempDir,
}

struct TempDir(PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl MemServer {
    fn start(size: &str) -> MemServer {
        Self::start_with(size, "plain", &[])
    }

    /// `tag` keeps the sockets of servers started by parallel tests apart.
    fn start_with(size: &str, tag: &str, args: &[&std::ffi::OsStr]) -> MemServer {
        let dir =
            std::env::temp_dir().join(format!("nbd-protocol-rc-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let socket = dir.join("mem.sock");
        let child = Command::new(memserver_binary())
            .arg(&socket)
            .arg(size)
            .args(args)
            .stdout(Stdio::null())
            .spawn()
            .expect("start memserver");
        let t0 = Instant::now();
        while !socket.exists() {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "memserver did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        MemServer {
            child,
            socket,
            _dir: TempDir(dir),
        }
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }

    /// SIGTERM and wait: the server must drain and exit 0 by itself.
    fn stop(mut self) -> bool {
        let pid = self.child.id().to_string();
        let _ = Command::new("/bin/kill").args(["-TERM", &pid]).status();
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.success();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for MemServer {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn run(cmd: &mut Command) -> Output {
    let out = try_run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn try_run(cmd: &mut Command) -> Output {
    // Debian's python3-libnbd only works with Debian's interpreter; keep /usr/bin first.
    cmd.env("PATH", "/usr/bin:/bin").output().expect("run tool")
}

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn real_clients() {
    let srv = MemServer::start("64M");
    let uri = srv.uri();

    if let Some(nbdinfo) = tool("nbdinfo") {
        let j = text(&run(Command::new(&nbdinfo).arg("--json").arg(&uri)));
        for want in [
            "\"export-size\": 67108864",
            "\"structured\": true",
            "\"is_read_only\": false",
            "\"can_flush\": true",
            "\"can_fua\": true",
            "\"can_trim\": true",
            "\"can_zero\": true",
            "\"can_fast_zero\": true",
            "\"can_df\": true",
            "\"can_multi_conn\": true",
            "\"can_cache\": true",
            "\"block_size_maximum\": 33554432",
        ] {
            assert!(j.contains(want), "nbdinfo --json lacks {want}:\n{j}");
        }
        let m = text(&run(Command::new(&nbdinfo).arg("--map").arg(&uri)));
        assert_eq!(m.lines().count(), 1, "fresh export is one hole:\n{m}");
        assert!(m.contains("hole,zero"), "{m}");
    }

    if let Some(nbdsh) = tool("nbdsh") {
        // Write two areas (one with FUA), read them back, flush, zero part of one.
        let script = [
            "h.pwrite(b'A' * 65536, 1048576)",
            "h.pwrite(b'B' * 4096, 8388608, nbd.CMD_FLAG_FUA)",
            "assert h.pread(65536, 1048576) == b'A' * 65536",
            "assert h.pread(4096, 8388608) == b'B' * 4096",
            "assert h.pread(512, 0) == bytes(512)",
            "h.flush()",
            "h.zero(4096, 1048576 + 4096)",
            "assert h.pread(8192, 1048576) == b'A' * 4096 + bytes(4096)",
            "print('nbdsh-ok', h.get_size(), h.can_meta_context('base:allocation'))",
        ];
        let mut cmd = Command::new(&nbdsh);
        cmd.arg("--base-allocation").arg("-u").arg(&uri);
        for s in script {
            cmd.arg("-c").arg(s);
        }
        let out = text(&run(&mut cmd));
        assert!(out.contains("nbdsh-ok 67108864 True"), "{out}");

        if let Some(nbdinfo) = tool("nbdinfo") {
            let m = text(&run(Command::new(&nbdinfo).arg("--map").arg(&uri)));
            // Pages are 64 KiB: the data at 1 MiB and at 8 MiB show as data, the rest holes.
            let data: Vec<(u64, u64)> = m
                .lines()
                .filter(|l| l.contains("data"))
                .map(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    (f[0].parse().unwrap(), f[1].parse().unwrap())
                })
                .collect();
            assert_eq!(data, vec![(1048576, 65536), (8388608, 65536)], "map:\n{m}");
        }
    }

    if let Some(qemu_img) = tool("qemu-img") {
        let j = text(&run(Command::new(&qemu_img)
            .args(["info", "--output=json"])
            .arg(&uri)));
        assert!(j.contains("\"virtual-size\": 67108864"), "{j}");
        // Write a whole image through the server with qemu, read it back with nbdcopy.
        let dir = srv.socket.parent().unwrap().to_path_buf();
        let src = dir.join("src.raw");
        let mut img = vec![0u8; 64 << 20];
        for (i, b) in img.iter_mut().enumerate().step_by(4096) {
            *b = (i / 4096) as u8 | 1;
        }
        std::fs::write(&src, &img).unwrap();
        run(Command::new(&qemu_img)
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&src)
            .arg(&uri));
        if let Some(nbdcopy) = tool("nbdcopy") {
            let back = dir.join("back.raw");
            run(Command::new(&nbdcopy).arg(&uri).arg(&back));
            assert!(
                std::fs::read(&back).unwrap() == img,
                "image read back differs"
            );
        }
        run(Command::new(&qemu_img)
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&src)
            .arg(&uri));
    }

    if let Some(fio) = tool("fio") {
        // QD 32 random reads and writes with checksums: many requests in flight, replies
        // out of order, every block verified.
        let out = text(&run(Command::new(&fio)
            .args([
                "--name=verify",
                "--ioengine=nbd",
                "--rw=randrw",
                "--bs=4k",
                "--iodepth=32",
                "--size=16M",
                "--offset=32M",
                "--verify=crc32c",
                "--do_verify=1",
                "--output-format=terse",
                // No verify-state file left behind in the working directory.
                "--verify_state_save=0",
            ])
            .current_dir(srv.socket.parent().unwrap())
            .arg(format!("--uri={uri}"))));
        // Terse format: field 5 is the job's error code.
        let fields: Vec<&str> = out.trim().split(';').collect();
        assert!(
            fields.len() > 5 && fields[4] == "0",
            "fio reported an error: {out}"
        );
    }

    assert!(srv.stop(), "memserver did not exit cleanly on SIGTERM");
}

/// nbdinfo (libnbd, GnuTLS) against `--tls=require` with client certificates checked, and
/// against `--tls=allow`: TLS clients get in, plain clients only where allowed.
#[test]
fn tls_with_nbdinfo() {
    let Some(nbdinfo) = tool("nbdinfo") else {
        return;
    };
    let certs = tlscerts::CertDir::new("rc");
    let p = |n: &str| certs.path(n).into_os_string();
    let (cert, key, ca) = (p("server-cert.pem"), p("server-key.pem"), p("ca-cert.pem"));
    let tls_uri = |srv: &MemServer, dir: &Path| {
        format!(
            "nbds+unix:///?socket={}&tls-certificates={}",
            srv.socket.display(),
            dir.display()
        )
    };
    // The client's directory for a client without a certificate of its own.
    let anon = certs.dir().join("anonymous");
    std::fs::create_dir_all(&anon).expect("mkdir");
    std::fs::copy(certs.path("ca-cert.pem"), anon.join("ca-cert.pem")).expect("copy CA");

    let flags: Vec<&std::ffi::OsStr> = vec![
        "--tls=require".as_ref(),
        "--tls-cert".as_ref(),
        &cert,
        "--tls-key".as_ref(),
        &key,
        "--tls-ca".as_ref(),
        &ca,
    ];
    let srv = MemServer::start_with("8M", "tls-require", &flags);
    let j = text(&run(Command::new(&nbdinfo)
        .arg("--json")
        .arg(tls_uri(&srv, certs.dir()))));
    assert!(j.contains("\"TLS\": true"), "{j}");
    assert!(j.contains("\"export-size\": 8388608"), "{j}");
    let plain = try_run(Command::new(&nbdinfo).arg(srv.uri()));
    assert!(
        !plain.status.success(),
        "plain client got in under --tls=require"
    );
    let anon_out = try_run(Command::new(&nbdinfo).arg(tls_uri(&srv, &anon)));
    assert!(
        !anon_out.status.success(),
        "a client without a certificate got in although --tls-ca was given"
    );
    // Data round trip over TLS.
    if let Some(nbdsh) = tool("nbdsh") {
        // nbdsh -u refuses tls-certificates (a local file) unless allowed first.
        let script = format!(
            "h.set_uri_allow_local_file(True); h.connect_uri({:?}); \
             h.pwrite(b'T' * 65536, 4096); assert h.pread(65536, 4096) == b'T' * 65536; \
             print('tls-io-ok', h.get_size(), h.get_tls_negotiated())",
            tls_uri(&srv, certs.dir())
        );
        let out = text(&run(Command::new(&nbdsh).arg("-c").arg(script)));
        assert!(out.contains("tls-io-ok 8388608 True"), "{out}");
    }
    assert!(srv.stop(), "memserver did not exit cleanly");

    let flags: Vec<&std::ffi::OsStr> = vec![
        "--tls=allow".as_ref(),
        "--tls-cert".as_ref(),
        &cert,
        "--tls-key".as_ref(),
        &key,
    ];
    let srv = MemServer::start_with("8M", "tls-allow", &flags);
    let j = text(&run(Command::new(&nbdinfo)
        .arg("--json")
        .arg(tls_uri(&srv, &anon))));
    assert!(j.contains("\"TLS\": true"), "{j}");
    let j = text(&run(Command::new(&nbdinfo).arg("--json").arg(srv.uri())));
    assert!(j.contains("\"TLS\": false"), "{j}");
    assert!(srv.stop(), "memserver did not exit cleanly");
}
