//! `--quiesce`: the hook run around a snapshot of a served image, as rbd-nbd runs it:
//! `HOOK DEVICE quiesce` before the snapshot (typically `fsfreeze -f` of the file system
//! mounted from the device), `HOOK DEVICE unquiesce` after it. A quiesce that fails (the
//! hook exits non-zero, cannot be started or outlives its time) fails the snapshot, and
//! then no unquiesce follows, as in rbd-nbd.

use crate::error::{Error, ErrorKind, Result};
use std::path::PathBuf;
use std::time::Duration;

/// The hook installed by the Debian package, rbd-nbd's default moved to our name.
pub const DEFAULT_HOOK: &str = "/usr/libexec/rados-nbd/rados-nbd_quiesce";

/// How long one run of the hook may take before it is killed and counted as failed.
/// rbd-nbd waits for ever; a hook stuck on a file system that never freezes would then
/// hold every later snapshot (and, for Ceph, the watch's notifications) off.
/// `RADOS_NBD_QUIESCE_HOOK_TIMEOUT_SECS` overrides it (tests).
const HOOK_TIMEOUT_SECS: u64 = 60;

/// What the hook is asked to do: its second argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Quiesce,
    Unquiesce,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Quiesce => "quiesce",
            Phase::Unquiesce => "unquiesce",
        }
    }
}

/// The hook of one served image.
#[derive(Debug, Clone)]
pub struct QuiesceHook {
    pub path: PathBuf,
    /// The hook's first argument: /dev/nbdX for map and attach; for `serve`, which has
    /// no device, the image spec (POOL/NAME), so a hook can tell its images apart.
    pub device: String,
    pub timeout: Duration,
}

impl QuiesceHook {
    /// The hook for `--quiesce [--quiesce-hook PATH]`; `path` None is [`DEFAULT_HOOK`].
    pub fn new(path: Option<PathBuf>, device: String) -> QuiesceHook {
        let secs = std::env::var("RADOS_NBD_QUIESCE_HOOK_TIMEOUT_SECS")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .filter(|&s: &u64| s > 0)
            .unwrap_or(HOOK_TIMEOUT_SECS);
        QuiesceHook {
            path: path.unwrap_or_else(|| PathBuf::from(DEFAULT_HOOK)),
            device,
            timeout: Duration::from_secs(secs),
        }
    }

    /// Runs `HOOK DEVICE quiesce|unquiesce` and waits for it (at most `timeout`, then it is
    /// killed). Its output goes to our log. The error names the hook, the phase and how
    /// it ended.
    pub async fn run(&self, phase: Phase) -> Result<()> {
        let what = format!(
            "quiesce hook `{} {} {}`",
            self.path.display(),
            self.device,
            phase.as_str()
        );
        let child = tokio::process::Command::new(&self.path)
            .arg(&self.device)
            .arg(phase.as_str())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            // Its own process group, so that a timeout kills what it started too.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| Error::io(format!("starting the {what}"), e))?;
        let pgid = child.id().and_then(|p| i32::try_from(p).ok());
        tracing::info!("running the {what}");
        let out = match tokio::time::timeout(self.timeout, child.wait_with_output()).await {
            // Dropping the future killed the hook (kill_on_drop; tokio reaps it); its
            // children go with its group.
            Err(_) => {
                if let Some(g) = pgid {
                    // SAFETY: a plain syscall on the group we created.
                    unsafe { libc::killpg(g, libc::SIGKILL) };
                }
                return Err(Error::new(
                    ErrorKind::TimedOut,
                    format!(
                        "the {what} did not finish within {} s; killed",
                        self.timeout.as_secs()
                    ),
                ));
            }
            Ok(r) => r.map_err(|e| Error::io(format!("waiting for the {what}"), e))?,
        };
        let output = String::from_utf8_lossy(&out.stderr).to_string()
            + &String::from_utf8_lossy(&out.stdout);
        let output = output.trim();
        if out.status.success() {
            if !output.is_empty() {
                tracing::info!("the {what} said: {output}");
            }
            return Ok(());
        }
        let how = match (
            out.status.code(),
            std::os::unix::process::ExitStatusExt::signal(&out.status),
        ) {
            (Some(c), _) => format!("exit status {c}"),
            (None, Some(s)) => format!("killed by signal {s}"),
            _ => out.status.to_string(),
        };
        let said = if output.is_empty() {
            String::new()
        } else {
            format!(": {}", output.replace('\n', " / "))
        };
        Err(Error::new(
            ErrorKind::Io,
            format!("the {what} failed ({how}){said}"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn script(dir: &std::path::Path, body: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.join("hook");
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    #[tokio::test]
    async fn hook_runs_and_reports_failures() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let ok = script(dir.path(), &format!("echo \"$1 $2\" >> {}", log.display()));
        let h = QuiesceHook::new(Some(ok), "/dev/nbd7".into());
        assert_eq!(h.timeout, Duration::from_secs(HOOK_TIMEOUT_SECS));
        h.run(Phase::Quiesce).await.unwrap();
        h.run(Phase::Unquiesce).await.unwrap();
        assert_eq!(
            std::fs::read_to_string(&log).unwrap(),
            "/dev/nbd7 quiesce\n/dev/nbd7 unquiesce\n"
        );
        let bad = script(dir.path(), "echo cannot freeze >&2; exit 3");
        let e = QuiesceHook::new(Some(bad.clone()), "d".into())
            .run(Phase::Quiesce)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("exit status 3"), "{e}");
        assert!(e.contains("cannot freeze"), "{e}");
        assert!(e.contains(&bad.display().to_string()), "{e}");
        let slow = script(dir.path(), "sleep 30");
        let mut h = QuiesceHook::new(Some(slow), "d".into());
        h.timeout = Duration::from_millis(300);
        let e = h.run(Phase::Quiesce).await.unwrap_err().to_string();
        assert!(e.contains("did not finish"), "{e}");
        let e = QuiesceHook::new(Some(dir.path().join("none")), "d".into())
            .run(Phase::Quiesce)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("starting the quiesce hook"), "{e}");
    }
}
