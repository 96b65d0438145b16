//! The header's access and modify timestamps, kept up as librbd keeps them (its
//! ImageRequest::update_timestamp): each I/O request may move one of them to now, at most
//! once per `rbd_atime_update_interval` (reads) or `rbd_mtime_update_interval` (writes,
//! discards, zeroing; not flushes, which librbd's ImageFlushRequest leaves out), 60 s by
//! default, 0 = never. The update is sent without holding the
//! request (librbd fires and forgets it) and its failure is ignored; a close waits for the
//! ones in flight, so that `rbd info` after an unmap shows them.

use super::rados::{errno_of, IoCtx};
use super::{cls, RBD};
use crate::error::{ErrorKind, Result};
use crate::store::ImageDetails;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

const NS: u64 = 1_000_000_000;

/// One timestamp: how often it may move, and where it stands (ns since the epoch; 0 when
/// the header has none).
struct Stamp {
    interval_s: u64,
    at_ns: AtomicU64,
}

impl Stamp {
    /// librbd's should_update_timestamp, `now.sec() >= interval + timestamp`, compared
    /// as librbd compares (whole seconds of now against the stored time), and the stamp
    /// moved to now by the one caller that wins the race to it.
    fn take(&self, now_ns: u64) -> bool {
        if self.interval_s == 0 {
            return false;
        }
        // In u128: a huge interval (a way to turn updates off) must not overflow.
        let due = |at: u64| {
            u128::from(now_ns / NS) * u128::from(NS)
                >= u128::from(self.interval_s) * u128::from(NS) + u128::from(at)
        };
        let mut at = self.at_ns.load(Ordering::Acquire);
        loop {
            if !due(at) {
                return false;
            }
            match self
                .at_ns
                .compare_exchange(at, now_ns, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return true,
                Err(seen) => at = seen,
            }
        }
    }
}

/// The two stamps, once read.
struct Stamps {
    access: Stamp,
    modify: Stamp,
}

/// An image handle's timestamps. Read from the header at the first I/O request, not at
/// open: commands that open an image without serving it (info, du, snap...) pay nothing.
pub(super) struct Timestamps {
    meta: Arc<IoCtx>,
    hdr_oid: String,
    /// Set (under `loading`) once read: the path every request takes after the first.
    stamps: OnceLock<Stamps>,
    /// `Some` while the stamps are being read: the kinds of request (access, modify) that
    /// came meanwhile, noted once they are.
    loading: Mutex<Option<[bool; 2]>>,
    /// Set by `settle` (the image closes): nothing more is sent.
    closed: AtomicBool,
    /// The read and the updates sent, not finished yet (at most one update of each kind
    /// a minute).
    in_flight: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Timestamps {
    pub(super) fn new(meta: Arc<IoCtx>, hdr_oid: String) -> Arc<Timestamps> {
        Arc::new(Timestamps {
            meta,
            hdr_oid,
            stamps: OnceLock::new(),
            loading: Mutex::new(None),
            closed: AtomicBool::new(false),
            in_flight: Mutex::new(Vec::new()),
        })
    }

    /// Moves the modify (or access) timestamp to now in the header, if its interval has
    /// passed since it last moved; returns at once.
    pub(super) fn note(self: &Arc<Self>, modify: bool) {
        if self.closed.load(Ordering::Acquire) {
            return;
        }
        if let Some(st) = self.stamps.get() {
            self.send_if_due(st, modify);
            return;
        }
        let mut loading = self.loading.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(st) = self.stamps.get() {
            // Read meanwhile (set under this lock).
            drop(loading);
            self.send_if_due(st, modify);
            return;
        }
        match &mut *loading {
            Some(waiting) => waiting[modify as usize] = true,
            None => {
                let mut waiting = [false; 2];
                waiting[modify as usize] = true;
                *loading = Some(waiting);
                drop(loading);
                let this = self.clone();
                let started = self.spawn(async move {
                    let st = this.load().await;
                    let waiting = {
                        let mut loading = this.loading.lock().unwrap_or_else(|p| p.into_inner());
                        let _ = this.stamps.set(st);
                        loading.take().unwrap_or_default()
                    };
                    if let Some(st) = this.stamps.get() {
                        for (kind, came) in waiting.into_iter().enumerate() {
                            if came {
                                this.send_if_due(st, kind == 1);
                            }
                        }
                    }
                });
                if !started {
                    // No runtime to read them in: the next request tries again.
                    *self.loading.lock().unwrap_or_else(|p| p.into_inner()) = None;
                }
            }
        }
    }

    /// The intervals as this image resolves librbd's options, and the timestamps its
    /// header holds now (librbd's OpenRequest reads both at open).
    async fn load(&self) -> Stamps {
        let (meta, hdr) = (&*self.meta, self.hdr_oid.as_str());
        let interval = async |opt: &str| {
            super::store::image_option(meta, hdr, opt)
                .await
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(60)
        };
        let at = async |method: &str| read_stamp(meta, hdr, method).await.ok().flatten();
        let (atime_s, mtime_s, atime, mtime) = futures_util::join!(
            interval("rbd_atime_update_interval"),
            interval("rbd_mtime_update_interval"),
            at("get_access_timestamp"),
            at("get_modify_timestamp"),
        );
        let stamp = |interval_s, at: Option<u64>| Stamp {
            interval_s,
            at_ns: AtomicU64::new(at.unwrap_or(0)),
        };
        Stamps {
            access: stamp(atime_s, atime),
            modify: stamp(mtime_s, mtime),
        }
    }

    fn send_if_due(&self, st: &Stamps, modify: bool) {
        let stamp = if modify { &st.modify } else { &st.access };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64;
        if !stamp.take(now) {
            return;
        }
        let method = if modify {
            "set_modify_timestamp"
        } else {
            "set_access_timestamp"
        };
        let (meta, oid) = (self.meta.clone(), self.hdr_oid.clone());
        self.spawn(async move {
            // The OSD stamps its own clock; an error (an OSD without the method, a
            // client that may only read) changes nothing, as for librbd.
            if let Err(e) = meta.exec_write(&oid, RBD, method, &[]).await {
                tracing::debug!(object = %oid, "{method}: {e}");
            }
        });
    }

    /// Runs `f` on the runtime, kept in `in_flight`; false when there is no runtime.
    fn spawn(&self, f: impl std::future::Future<Output = ()> + Send + 'static) -> bool {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return false;
        };
        let task = rt.spawn(f);
        let mut v = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        v.retain(|t| !t.is_finished());
        v.push(task);
        true
    }

    /// The image closes: nothing more is sent, and what is in flight is waited for (a
    /// few seconds at most, then dropped).
    pub(super) async fn settle(&self) {
        self.closed.store(true, Ordering::Release);
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let tasks =
                std::mem::take(&mut *self.in_flight.lock().unwrap_or_else(|p| p.into_inner()));
            if tasks.is_empty() {
                return;
            }
            for mut t in tasks {
                if tokio::time::timeout_at(deadline, &mut t).await.is_err() {
                    t.abort();
                }
            }
        }
    }
}

/// A timestamp from the header: `None` when the OSD does not know the method (older than
/// Mimic), as librbd takes -EOPNOTSUPP.
async fn read_stamp(meta: &IoCtx, hdr_oid: &str, method: &str) -> Result<Option<u64>> {
    match meta.exec_read(hdr_oid, RBD, method, &[]).await {
        Ok(b) => Ok(Some(cls::utime_out(&b, &format!("rbd.{method} reply"))?)),
        Err(e) if matches!(errno_of(&e), Some(libc::EOPNOTSUPP | libc::ENOSYS)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// `info`'s op features and timestamps of the image with header `hdr_oid`.
pub(super) async fn details(meta: &IoCtx, hdr_oid: &str, striped: bool) -> Result<ImageDetails> {
    let op_features = match meta.exec_read(hdr_oid, RBD, "op_features_get", &[]).await {
        Ok(b) => cls::u64_out(&b, "rbd.op_features_get reply")?,
        Err(e) if e.kind == ErrorKind::NotFound => 0,
        Err(e) if matches!(errno_of(&e), Some(libc::EOPNOTSUPP | libc::ENOSYS)) => 0,
        Err(e) => return Err(e),
    };
    let secs = |ns: Option<u64>| ns.map(|n| n / NS).filter(|&s| s != 0);
    Ok(ImageDetails {
        op_features,
        create_timestamp: secs(read_stamp(meta, hdr_oid, "get_create_timestamp").await?),
        access_timestamp: secs(read_stamp(meta, hdr_oid, "get_access_timestamp").await?),
        modify_timestamp: secs(read_stamp(meta, hdr_oid, "get_modify_timestamp").await?),
        // get_stripe_unit_count fails (ENOEXEC) without the feature.
        stripe: if striped {
            let b = meta
                .exec_read(hdr_oid, RBD, "get_stripe_unit_count", &[])
                .await?;
            Some(cls::stripe_out(&b)?)
        } else {
            None
        },
        // The caller adds the lockers.
        locked: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(interval_s: u64, at_ns: u64) -> Stamp {
        Stamp {
            interval_s,
            at_ns: AtomicU64::new(at_ns),
        }
    }

    #[test]
    fn moves_once_per_interval_as_librbd_compares() {
        // Stored at 100.5 s; interval 60: due when now's whole seconds reach 160.5.
        let s = stamp(60, 100 * NS + NS / 2);
        assert!(!s.take(160 * NS + 900_000_000), "160 s < 160.5 s");
        assert!(s.take(161 * NS + 1));
        assert_eq!(s.at_ns.load(Ordering::Relaxed), 161 * NS + 1);
        assert!(!s.take(200 * NS), "moved at 161 s: not due before 221 s");
        // Now's whole seconds against the stored time: 221 < 221.000000001.
        assert!(!s.take(221 * NS + 5));
        assert!(s.take(222 * NS));
    }

    #[test]
    fn a_huge_interval_is_never_due() {
        let s = stamp(u64::MAX, 100 * NS);
        assert!(!s.take(u64::MAX));
    }

    #[test]
    fn interval_zero_never_moves() {
        let s = stamp(0, 0);
        assert!(!s.take(1_000_000 * NS));
    }

    #[test]
    fn a_header_without_a_stamp_moves_at_the_first_request() {
        let s = stamp(60, 0);
        assert!(s.take(1_700_000_000 * NS));
    }
}
