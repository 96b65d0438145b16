//! Everything about /dev/nbdX that is not the driver's control interface: loading the
//! module, naming and finding devices, waiting for a device to be usable, telling whether it
//! is in use, the per-device runtime state file, and hardening the serving process.

use crate::error::{Error, ErrorKind, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[cfg(test)]
thread_local! {
    /// Per-test-thread roots, so tests never mutate the process environment.
    static TEST_SYS_BLOCK: std::cell::RefCell<Option<PathBuf>> = const { std::cell::RefCell::new(None) };
    static TEST_RUN_DIR: std::cell::RefCell<Option<PathBuf>> = const { std::cell::RefCell::new(None) };
}

/// A run directory of this test thread's own for state files; gone when dropped.
#[cfg(test)]
pub(super) fn test_run_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    TEST_RUN_DIR.with(|c| *c.borrow_mut() = Some(dir.path().to_path_buf()));
    dir
}

/// The state tests start from: rbd/vm1 mapped at /dev/nbd3 by pid 42.
#[cfg(test)]
pub(super) fn test_state(close_result: bool) -> DeviceState {
    DeviceState {
        pid: 42,
        pool: "rbd".into(),
        namespace: String::new(),
        image: "vm1".into(),
        snap: None,
        device: "/dev/nbd3".into(),
        store: "dir:/x".into(),
        read_only: false,
        connections: 1,
        netlink: true,
        detached: false,
        backend: None,
        close_result,
        transport: Transport::Nbd,
        image_id: "10ab".into(),
    }
}

fn sys_block() -> PathBuf {
    #[cfg(test)]
    if let Some(p) = TEST_SYS_BLOCK.with(|c| c.borrow().clone()) {
        return p;
    }
    PathBuf::from("/sys/block")
}

/// The runtime directory for state files (`/run/rados-nbd`, or `$RADOS_NBD_RUN_DIR`).
pub fn run_dir() -> PathBuf {
    #[cfg(test)]
    if let Some(p) = TEST_RUN_DIR.with(|c| c.borrow().clone()) {
        return p;
    }
    PathBuf::from(std::env::var_os("RADOS_NBD_RUN_DIR").unwrap_or_else(|| "/run/rados-nbd".into()))
}

/// `/dev/nbd3`, `nbd3` or `3` -> 3.
pub fn parse_device(s: &str) -> Result<u32> {
    let name = s.strip_prefix("/dev/").unwrap_or(s);
    let num = name.strip_prefix("nbd").unwrap_or(name);
    if !num.is_empty() && num.len() <= 6 && num.bytes().all(|b| b.is_ascii_digit()) {
        if let Ok(n) = num.parse::<u32>() {
            return Ok(n);
        }
    }
    Err(Error::new(
        ErrorKind::InvalidInput,
        format!("invalid nbd device {s:?} (expected /dev/nbdN)"),
    ))
}

/// Looks like a device rather than an image spec (`/dev/...` or `nbdN`).
pub fn looks_like_device(s: &str) -> bool {
    s.starts_with("/dev/") || (s.starts_with("nbd") && parse_device(s).is_ok())
}

pub fn device_path(index: u32) -> String {
    format!("/dev/nbd{index}")
}

fn read_trimmed(p: &Path) -> Option<String> {
    std::fs::read_to_string(p)
        .ok()
        .map(|s| s.trim().to_string())
}

/// Is the nbd driver present (loaded module or built in)?
pub fn module_loaded() -> bool {
    Path::new("/sys/module/nbd").exists()
}

/// Loads `nbd` with our parameters when it is not there yet. `RADOS_NBD_MODULES_ROOT`
/// names a module tree root for `modprobe -d` (the test VM runs an unpacked kernel).
pub fn load_module(nbds_max: Option<u32>, max_part: Option<u32>) -> Result<()> {
    if module_loaded() {
        return Ok(());
    }
    let mut cmd = std::process::Command::new("modprobe");
    if let Some(root) = std::env::var_os("RADOS_NBD_MODULES_ROOT") {
        cmd.arg("-d").arg(root);
    }
    cmd.arg("nbd");
    if let Some(n) = nbds_max {
        cmd.arg(format!("nbds_max={n}"));
    }
    if let Some(n) = max_part {
        cmd.arg(format!("max_part={n}"));
    }
    let out = cmd
        .output()
        .map_err(|e| Error::io("running modprobe nbd (is kmod installed?)", e))?;
    if !out.status.success() {
        return Err(Error::new(
            ErrorKind::Unsupported,
            format!(
                "loading the nbd kernel module failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    // udev/devtmpfs create the nodes asynchronously after the module loads.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !module_loaded() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Size in bytes as the kernel sees it (`/sys/block/nbdN/size` is in 512-byte sectors).
pub fn device_size(index: u32) -> Option<u64> {
    read_trimmed(&sys_block().join(format!("nbd{index}/size")))?
        .parse::<u64>()
        .ok()
        .map(|s| s * 512)
}

/// The kernel's idea of who serves the device: present only while it is configured.
pub fn device_pid(index: u32) -> Option<u32> {
    read_trimmed(&sys_block().join(format!("nbd{index}/pid")))?
        .parse()
        .ok()
}

/// The backend identifier given at connect (netlink only).
pub fn device_backend(index: u32) -> Option<String> {
    read_trimmed(&sys_block().join(format!("nbd{index}/backend"))).filter(|s| !s.is_empty())
}

/// Every nbd device the kernel has, sorted.
pub fn all_devices() -> Vec<u32> {
    let mut v: Vec<u32> = std::fs::read_dir(sys_block())
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let n = e.file_name();
            let n = n.to_str()?;
            n.strip_prefix("nbd")?.parse().ok()
        })
        .collect();
    v.sort_unstable();
    v
}

/// Not configured: no `pid` attribute and size 0 (what rbd-nbd checks too).
pub fn is_free(index: u32) -> bool {
    device_pid(index).is_none() && device_size(index).unwrap_or(0) == 0
}

pub fn free_devices() -> Vec<u32> {
    all_devices().into_iter().filter(|i| is_free(*i)).collect()
}

/// Waits until the kernel shows the device with the expected size and its node exists.
pub fn wait_ready(index: u32, size: u64, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let node = device_path(index);
    loop {
        let seen = device_size(index);
        if seen == Some(size) && Path::new(&node).exists() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Error::new(
                ErrorKind::TimedOut,
                format!(
                    "{node} did not become ready within {}s (kernel reports size {:?}, expected {size})",
                    timeout.as_secs(),
                    seen
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `major:minor` of the whole device and each partition, from sysfs.
fn dev_numbers(dev: DevKey) -> Vec<(String, String)> {
    let me = dev.name();
    let base = sys_block().join(&me);
    let mut out = Vec::new();
    if let Some(d) = read_trimmed(&base.join("dev")) {
        out.push((me.clone(), d));
    }
    for e in std::fs::read_dir(&base).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with(&format!("{me}p")) {
            if let Some(d) = read_trimmed(&e.path().join("dev")) {
                out.push((name, d));
            }
        }
    }
    out
}

/// Where one of `devs` is mounted in a mountinfo text: (device name, mount point).
fn mounted_in<'a>(mountinfo: &str, devs: &'a [(String, String)]) -> Option<(&'a str, String)> {
    for line in mountinfo.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        if f.len() > 4 {
            if let Some((name, _)) = devs.iter().find(|(_, d)| d == f[2]) {
                return Some((name.as_str(), f[4].to_string()));
            }
        }
    }
    None
}

/// The device node of a block device name (`/dev/nbd0`); none in unit tests, which must not
/// touch the host's devices.
fn dev_node(name: &str) -> Option<PathBuf> {
    #[cfg(test)]
    if TEST_SYS_BLOCK.with(|c| c.borrow().is_some()) {
        return None;
    }
    Some(Path::new("/dev").join(name))
}

/// Is the block device claimed exclusively by someone (a mounted file system in any mount
/// namespace, a dm/md/bcache holder, swap, an O_EXCL opener such as mkfs)? The kernel refuses
/// a second exclusive open with EBUSY. Our own daemon opens the device without O_EXCL.
fn claimed_exclusively(node: &Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL | libc::O_NONBLOCK)
        .open(node)
    {
        Ok(_) => false,
        Err(e) => e.raw_os_error() == Some(libc::EBUSY),
    }
}

/// A process whose mount namespace (not ours) has one of `devs` mounted: its pid and name,
/// with the device and mount point. One process per namespace is read.
fn mounted_elsewhere(devs: &[(String, String)]) -> Option<(u32, String, String, String)> {
    let own = std::fs::read_link("/proc/self/ns/mnt").ok();
    let mut seen = std::collections::HashSet::new();
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(ns) = std::fs::read_link(e.path().join("ns/mnt")) else {
            continue;
        };
        if Some(&ns) == own.as_ref() || !seen.insert(ns) {
            continue;
        }
        let Ok(mi) = std::fs::read_to_string(e.path().join("mountinfo")) else {
            continue;
        };
        if let Some((name, at)) = mounted_in(&mi, devs) {
            let comm = read_trimmed(&e.path().join("comm")).unwrap_or_default();
            return Some((pid, comm, name.to_string(), at));
        }
    }
    None
}

/// Why the device must not be disconnected now (mounted, held by dm/md, used as swap, claimed
/// exclusively), or None when it is idle. Checks the whole device and its partitions.
///
/// A file system can outlive its unmount here: a process whose private mount namespace was
/// made while it was mounted (a systemd unit with ProtectSystem=, PrivateTmp=, ...) may keep
/// it alive in that namespace, still writing to the device. /proc/self/mountinfo does not
/// show it, the kernel's exclusive claim does; disconnecting then would fail the writes it
/// still has to make (its journal checkpoint at the final unmount).
pub fn busy_reason(dev: impl Into<DevKey>) -> Option<String> {
    let dev = dev.into();
    let devs = dev_numbers(dev);
    if let Ok(mi) = std::fs::read_to_string("/proc/self/mountinfo") {
        if let Some((name, at)) = mounted_in(&mi, &devs) {
            return Some(format!("/dev/{name} is mounted on {at}"));
        }
    }
    let base = sys_block().join(dev.name());
    for (name, _) in &devs {
        let holders = if *name == dev.name() {
            base.join("holders")
        } else {
            base.join(name).join("holders")
        };
        if let Some(h) = std::fs::read_dir(&holders)
            .into_iter()
            .flatten()
            .flatten()
            .next()
        {
            return Some(format!(
                "/dev/{name} is held by {}",
                h.file_name().to_string_lossy()
            ));
        }
    }
    if let Ok(sw) = std::fs::read_to_string("/proc/swaps") {
        for (name, _) in &devs {
            let p = format!("/dev/{name}");
            if sw
                .lines()
                .skip(1)
                .any(|l| l.split_whitespace().next() == Some(&p))
            {
                return Some(format!("{p} is in use as swap"));
            }
        }
    }
    for (name, _) in &devs {
        if dev_node(name).is_some_and(|n| claimed_exclusively(&n)) {
            return Some(match mounted_elsewhere(&devs) {
                Some((pid, comm, name, at)) => format!(
                    "/dev/{name} is mounted on {at} in another mount namespace \
                     (that of pid {pid}, {comm})"
                ),
                None => format!(
                    "/dev/{name} is claimed exclusively by another user \
                     (a file system, a device-mapper or RAID member, or an O_EXCL opener)"
                ),
            });
        }
    }
    None
}

/// A process that is ours and alive (pid reuse is checked by the process name).
pub fn daemon_alive(pid: u32) -> bool {
    if pid == 0 {
        return false;
    }
    match read_trimmed(Path::new(&format!("/proc/{pid}/comm"))) {
        Some(comm) => {
            comm == "rados-nbd"
                // A zombie still has a comm; it is not serving anything.
                && !read_trimmed(Path::new(&format!("/proc/{pid}/stat")))
                    .map(|s| s.rsplit_once(") ").map(|(_, r)| r.starts_with('Z')).unwrap_or(false))
                    .unwrap_or(false)
        }
        None => false,
    }
}

/// Waits for a pid to go away; true when it did.
pub fn wait_exit(pid: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while daemon_alive(pid) {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// Which kernel device a state file or close result belongs to: `/dev/nbdN` or, with the
/// ublk transport, `/dev/ublkbN`. A bare index means an nbd device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DevKey {
    Nbd(u32),
    Ublk(u32),
}

impl From<u32> for DevKey {
    fn from(i: u32) -> Self {
        DevKey::Nbd(i)
    }
}

impl DevKey {
    /// `nbd3`, `ublkb3`: the device's name, and its files' stem.
    pub fn name(self) -> String {
        match self {
            DevKey::Nbd(i) => format!("nbd{i}"),
            DevKey::Ublk(i) => format!("ublkb{i}"),
        }
    }
    pub fn path(self) -> String {
        format!("/dev/{}", self.name())
    }
    /// `/dev/ublkb3` or `ublkb3` -> Ublk(3); anything else as [`parse_device`] reads it.
    pub fn parse(s: &str) -> Result<DevKey> {
        let name = s.strip_prefix("/dev/").unwrap_or(s);
        if let Some(n) = name.strip_prefix("ublkb") {
            if !n.is_empty() && n.len() <= 6 && n.bytes().all(|b| b.is_ascii_digit()) {
                if let Ok(i) = n.parse() {
                    return Ok(DevKey::Ublk(i));
                }
            }
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("invalid ublk device {s:?} (expected /dev/ublkbN)"),
            ));
        }
        parse_device(s).map(DevKey::Nbd)
    }
    /// The stem of a state file name (`nbd3.json`, `ublkb3.json`), if it is one.
    fn from_state_file(name: &str) -> Option<DevKey> {
        let stem = name.strip_suffix(".json")?;
        let num = |r: &str| {
            (!r.is_empty() && r.bytes().all(|b| b.is_ascii_digit()))
                .then(|| r.parse().ok())
                .flatten()
        };
        if let Some(r) = stem.strip_prefix("ublkb") {
            return num(r).map(DevKey::Ublk);
        }
        stem.strip_prefix("nbd").and_then(num).map(DevKey::Nbd)
    }
}

/// How a mapping reaches the kernel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// The kernel's NBD client over socket pairs (/dev/nbdN).
    #[default]
    Nbd,
    /// ublk (/dev/ublkbN): requests through io_uring and shared buffers.
    Ublk,
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Transport::Nbd => "nbd",
            Transport::Ublk => "ublk",
        })
    }
}

/// What `/run/rados-nbd/nbdN.json` (`ublkbN.json`) holds: enough for list-mapped, unmap and
/// attach.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceState {
    /// The serving daemon; 0 once it detached.
    pub pid: u32,
    pub pool: String,
    /// The RBD namespace; empty (and absent from older daemons' files) for the default one.
    #[serde(default)]
    pub namespace: String,
    pub image: String,
    pub snap: Option<String>,
    pub device: String,
    pub store: String,
    pub read_only: bool,
    pub connections: u32,
    /// Configured through netlink (so it can be re-attached).
    pub netlink: bool,
    /// The daemon left on purpose (`detach`); the kernel keeps the device for `attach`.
    pub detached: bool,
    pub backend: Option<String>,
    /// The daemon records how its close ended ([`write_close_result`]), so `unmap` can
    /// tell a failed close from a clean one. False in state files of older daemons, which
    /// record nothing: their silence is then no sign of failure.
    #[serde(default)]
    pub close_result: bool,
    /// Absent (nbd) in state files of daemons older than the ublk transport.
    #[serde(default)]
    pub transport: Transport,
    /// The image's id (its name may change: `rename`, or a removal and a new image of the
    /// old name). A takeover of the device checks that the image it opened is this one.
    /// Empty in state files of older daemons, whose takeovers go by the name alone.
    #[serde(default)]
    pub image_id: String,
}

impl DeviceState {
    /// The nbd index; an error for a ublk device.
    pub fn index(&self) -> Result<u32> {
        parse_device(&self.device)
    }
    pub fn key(&self) -> Result<DevKey> {
        DevKey::parse(&self.device)
    }
    pub fn spec_string(&self) -> String {
        let pool = crate::spec::pool_spec(&self.pool, &self.namespace);
        match &self.snap {
            Some(s) => format!("{pool}/{}@{s}", self.image),
            None => format!("{pool}/{}", self.image),
        }
    }
}

pub fn state_path(dev: impl Into<DevKey>) -> PathBuf {
    run_dir().join(format!("{}.json", dev.into().name()))
}

/// Written atomically (temp file + rename) so a reader never sees half a file.
pub fn write_state(dev: impl Into<DevKey>, st: &DeviceState) -> Result<()> {
    let dev = dev.into();
    let dir = run_dir();
    std::fs::create_dir_all(&dir)
        .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    let path = state_path(dev);
    let tmp = dir.join(format!(".{}.json.{}", dev.name(), std::process::id()));
    let data = serde_json::to_vec_pretty(st)
        .map_err(|e| Error::new(ErrorKind::Io, format!("encoding device state: {e}")))?;
    write_then_rename(&tmp, &path, data)
}

/// Writes `data` to `tmp`, then renames it to `path`: a reader sees the old file or the new
/// one, never half of one.
fn write_then_rename(tmp: &Path, path: &Path, data: Vec<u8>) -> Result<()> {
    std::fs::write(tmp, data).map_err(|e| Error::io(format!("writing {}", tmp.display()), e))?;
    std::fs::rename(tmp, path).map_err(|e| {
        Error::io(
            format!("renaming {} to {}", tmp.display(), path.display()),
            e,
        )
    })
}

pub fn read_state(dev: impl Into<DevKey>) -> Result<Option<DeviceState>> {
    let path = state_path(dev);
    match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|e| {
            Error::new(
                ErrorKind::Corrupt,
                format!("state file {} is unreadable: {e}", path.display()),
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(format!("reading {}", path.display()), e)),
    }
}

pub fn remove_state(dev: impl Into<DevKey>) {
    let _ = std::fs::remove_file(state_path(dev));
}

/// How a daemon's clean close ended, for the `unmap` or `detach` waiting for it to exit: a
/// process that is not our child has no exit status we could read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloseResult {
    pub pid: u32,
    pub device: String,
    /// The image spec (`rbd/vm1`).
    pub image: String,
    /// None when the image was closed cleanly (flushed, object map written, dirty flag
    /// cleared, lock released); otherwise what failed, in one line.
    pub error: Option<String>,
}

/// `nbdN.close-PID.json`: named by pid too, so the result of a daemon that is gone can never
/// be mistaken for that of the next daemon on the same device. [`all_states`] skips these.
pub fn close_result_path(dev: impl Into<DevKey>, pid: u32) -> PathBuf {
    run_dir().join(format!("{}.close-{pid}.json", dev.into().name()))
}

/// Results nobody waited for (SIGTERM, `nbd-client -d`) are swept after this long; a waiting
/// `unmap` reads its result within milliseconds of the daemon's exit.
const STALE_CLOSE_RESULT: Duration = Duration::from_secs(600);

/// Records the outcome of the close, atomically (temp file + rename: the waiter reads either
/// nothing or all of it), before the daemon exits. Also removes results left behind by
/// daemons that ended with nobody waiting.
pub fn write_close_result(dev: impl Into<DevKey>, r: &CloseResult) -> Result<()> {
    let dev = dev.into();
    let dir = run_dir();
    std::fs::create_dir_all(&dir)
        .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let stale = (name.starts_with("nbd") || name.starts_with("ublkb"))
            && name.contains(".close-")
            && name.ends_with(".json")
            && e.metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > STALE_CLOSE_RESULT);
        if stale {
            let _ = std::fs::remove_file(e.path());
        }
    }
    let path = close_result_path(dev, r.pid);
    let tmp = dir.join(format!(".{}.close-{}.json.tmp", dev.name(), r.pid));
    let data = serde_json::to_vec(r)
        .map_err(|e| Error::new(ErrorKind::Io, format!("encoding the close result: {e}")))?;
    write_then_rename(&tmp, &path, data)
}

/// Reads and removes the close result daemon `pid` left for device `index`, if any.
pub fn take_close_result(dev: impl Into<DevKey>, pid: u32) -> Result<Option<CloseResult>> {
    let path = close_result_path(dev, pid);
    let data = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
    };
    let _ = std::fs::remove_file(&path);
    serde_json::from_slice(&data).map(Some).map_err(|e| {
        Error::new(
            ErrorKind::Corrupt,
            format!("close result {} is unreadable: {e}", path.display()),
        )
    })
}

/// Every state file, skipping unreadable ones (with a warning).
pub fn all_states() -> Vec<DeviceState> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(run_dir()).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(dev) = DevKey::from_state_file(&name) else {
            continue;
        };
        match read_state(dev) {
            Ok(Some(s)) => out.push(s),
            Ok(None) => {}
            Err(e) => tracing::warn!("{e}"),
        }
    }
    // nbd devices first, each kind by number.
    out.sort_by_key(|s| match s.key() {
        Ok(DevKey::Nbd(i)) => (0, i),
        Ok(DevKey::Ublk(i)) => (1, i),
        Err(_) => (2, 0),
    });
    out
}

/// Keep the daemon out of the way of the memory it serves: the kernel may be writing back
/// dirty pages to our own device to free memory, and if serving those writes needed memory
/// that is not there (a page fault on our own code or data swapped out, an allocation that
/// waits for reclaim), nothing would ever make progress. So: lock every page the daemon uses
/// in RAM and make the OOM killer pick anybody else first. Failures are reported, not fatal.
///
/// MCL_ONFAULT (Linux 4.4+): a page is locked when it is first touched, not when it is
/// mapped. Without it mlockall populates every mapping at once, each thread's whole stack
/// and every malloc arena included: ~286 MiB resident just after `map` (bench/kernel-notes.md)
/// where the daemon uses a fraction of that. Every page it has touched (its code, its
/// working set) stays resident either way; an untouched page costs a fault, as any new
/// allocation does.
pub fn harden_process() -> Vec<String> {
    let mut warnings = Vec::new();
    let flags = libc::MCL_CURRENT | libc::MCL_FUTURE;
    // SAFETY: mlockall has no memory-safety preconditions.
    if unsafe { libc::mlockall(flags | libc::MCL_ONFAULT) } != 0 {
        // EINVAL: a kernel older than 4.4 knows no MCL_ONFAULT; lock everything instead.
        let onfault = std::io::Error::last_os_error();
        // SAFETY: as above.
        if onfault.raw_os_error() != Some(libc::EINVAL) || unsafe { libc::mlockall(flags) } != 0 {
            warnings.push(format!(
                "mlockall failed ({}); the daemon's memory can be swapped out",
                std::io::Error::last_os_error()
            ));
        }
    }
    if let Err(e) = std::fs::write("/proc/self/oom_score_adj", "-1000") {
        warnings.push(format!("setting oom_score_adj to -1000 failed: {e}"));
    }
    warnings
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names() {
        assert_eq!(parse_device("/dev/nbd0").unwrap(), 0);
        assert_eq!(parse_device("nbd15").unwrap(), 15);
        assert_eq!(parse_device("7").unwrap(), 7);
        for bad in [
            "/dev/sda",
            "/dev/nbd",
            "nbd-1",
            "/dev/nbd1p1",
            "",
            "nbd99999999",
        ] {
            assert!(parse_device(bad).is_err(), "{bad}");
        }
        assert!(looks_like_device("/dev/nbd2"));
        assert!(looks_like_device("nbd2"));
        assert!(!looks_like_device("rbd/vm1"));
        assert!(!looks_like_device("nbdimage"));
    }

    #[test]
    fn state_files_round_trip_and_list() {
        let dir = test_run_dir();
        let st = DeviceState {
            namespace: "ns1".into(),
            snap: Some("s1".into()),
            read_only: true,
            connections: 2,
            backend: Some("b".into()),
            ..test_state(true)
        };
        write_state(3, &st).unwrap();
        let mut st1 = st.clone();
        st1.device = "/dev/nbd1".into();
        write_state(1, &st1).unwrap();
        std::fs::write(dir.path().join("nbd9.json"), b"{not json").unwrap();
        std::fs::write(dir.path().join("other.txt"), b"x").unwrap();
        assert_eq!(read_state(3).unwrap().unwrap(), st);
        assert_eq!(read_state(4).unwrap(), None);
        assert_eq!(read_state(9).unwrap_err().kind, ErrorKind::Corrupt);
        let all = all_states();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].device, "/dev/nbd1");
        // The namespace is kept, and the spec string parses back to the same image (what
        // `unmap`/`attach` look devices up by).
        assert_eq!(all[1].spec_string(), "rbd/ns1/vm1@s1");
        let spec: crate::spec::ImageSpec = all[1].spec_string().parse().unwrap();
        assert_eq!(
            (
                spec.pool.as_str(),
                spec.namespace.as_str(),
                spec.name.as_str()
            ),
            ("rbd", "ns1", "vm1")
        );
        remove_state(3);
        assert_eq!(read_state(3).unwrap(), None);
        // A state file of a daemon that predates close results still reads, as "records
        // nothing".
        std::fs::write(
            dir.path().join("nbd2.json"),
            br#"{"pid":7,"pool":"rbd","image":"a","snap":null,"device":"/dev/nbd2","store":"dir:/x","read_only":false,"connections":1,"netlink":true,"detached":false,"backend":null}"#,
        )
        .unwrap();
        let old = read_state(2).unwrap().unwrap();
        assert!(!old.close_result);
        // ... and is in the pool's default namespace.
        assert_eq!(
            (old.namespace.as_str(), old.spec_string().as_str()),
            ("", "rbd/a")
        );
    }

    #[test]
    fn close_results() {
        let dir = test_run_dir();
        let failed = CloseResult {
            pid: 42,
            device: "/dev/nbd3".into(),
            image: "rbd/vm1".into(),
            error: Some("closing rbd/vm1: no space".into()),
        };
        let clean = CloseResult {
            pid: 43,
            error: None,
            ..failed.clone()
        };
        write_close_result(3, &failed).unwrap();
        write_close_result(3, &clean).unwrap();
        // Result files are not state files.
        assert!(all_states().is_empty());
        // Each daemon's own result, read once.
        assert_eq!(take_close_result(3, 42).unwrap(), Some(failed.clone()));
        assert_eq!(take_close_result(3, 42).unwrap(), None);
        assert_eq!(take_close_result(4, 43).unwrap(), None);
        assert_eq!(take_close_result(3, 43).unwrap(), Some(clean));
        // Nothing but the results themselves was left behind (no temp files).
        write_close_result(3, &failed).unwrap();
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["nbd3.close-42.json"]);
        // A result nobody read is swept by a later daemon once it is stale, not before.
        let old = std::time::SystemTime::now() - STALE_CLOSE_RESULT - Duration::from_secs(5);
        let f = std::fs::File::options()
            .write(true)
            .open(close_result_path(3, 42))
            .unwrap();
        f.set_modified(old).unwrap();
        write_close_result(
            5,
            &CloseResult {
                pid: 44,
                ..failed.clone()
            },
        )
        .unwrap();
        assert_eq!(take_close_result(3, 42).unwrap(), None);
        assert!(take_close_result(5, 44).unwrap().is_some());
        std::fs::write(dir.path().join("nbd1.close-9.json"), b"{").unwrap();
        assert_eq!(
            take_close_result(1, 9).unwrap_err().kind,
            ErrorKind::Corrupt
        );
    }

    #[test]
    fn sysfs_views() {
        let dir = tempfile::tempdir().unwrap();
        let b = dir.path();
        std::fs::create_dir_all(b.join("nbd0/holders")).unwrap();
        std::fs::create_dir_all(b.join("nbd1/holders")).unwrap();
        std::fs::create_dir_all(b.join("nbd1/nbd1p1/holders/dm-0")).unwrap();
        std::fs::write(b.join("nbd0/size"), "0\n").unwrap();
        std::fs::write(b.join("nbd1/size"), "2048\n").unwrap();
        std::fs::write(b.join("nbd1/pid"), "77\n").unwrap();
        std::fs::write(b.join("nbd1/dev"), "43:32\n").unwrap();
        std::fs::write(b.join("nbd1/nbd1p1/dev"), "43:33\n").unwrap();
        std::fs::create_dir_all(b.join("sda")).unwrap();
        TEST_SYS_BLOCK.with(|c| *c.borrow_mut() = Some(b.to_path_buf()));
        assert_eq!(all_devices(), vec![0, 1]);
        assert_eq!(free_devices(), vec![0]);
        assert_eq!(device_size(1), Some(1 << 20));
        assert_eq!(device_pid(1), Some(77));
        let why = busy_reason(1).unwrap();
        assert!(why.contains("nbd1p1") && why.contains("dm-0"), "{why}");
        assert_eq!(busy_reason(0), None);
        let devs = vec![("nbd1".to_string(), "43:32".to_string())];
        let mi = "36 25 0:32 / /run rw - tmpfs tmpfs rw\n\
                  41 25 43:32 / /srv/sd2 rw,relatime - ext4 /dev/nbd1 rw\n";
        assert_eq!(
            mounted_in(mi, &devs),
            Some(("nbd1", "/srv/sd2".to_string()))
        );
        assert_eq!(mounted_in(mi.lines().next().unwrap(), &devs), None);
        // The kernel shows 1 MiB; waiting for 2 MiB must time out with both sizes named.
        let e = wait_ready(1, 2 << 20, Duration::from_millis(50)).unwrap_err();
        assert_eq!(e.kind, ErrorKind::TimedOut);
        assert!(
            e.message.contains("2097152") && e.message.contains("1048576"),
            "{}",
            e.message
        );
    }
}
