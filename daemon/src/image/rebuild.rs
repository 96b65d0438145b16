//! The object map rebuilt in the background after an unclean close, while the image is
//! served.
//!
//! Until the listing is in, objects no request has touched are *unknown*: the map in
//! memory holds EXISTS for them, which sends every read to the store, never skips a
//! discard and reports data in block status, and `known` tells the paths for which
//! EXISTS would be wrong (a clone's copy-up) to ask the store. A request marks each
//! object it changes as touched (and so known) before the store sees the change. When
//! the listing is in, every untouched object takes the listing's state, with `gate`
//! held exclusively: no request is in flight then, and every object a request changed
//! since open keeps the state that request gave it, so neither a discard after the
//! listing began nor a write the listing missed is undone.
//!
//! The dirty flag stays set until then: whatever writes the map or clears the flag
//! (close, checkpoints, snapshots, resize, rollback) waits for the whole map first
//! (`whole_map`). A failed rebuild (the store unreachable for a while) is tried again:
//! in the background after a pause that grows from `REBUILD_RETRY_FIRST` to
//! `REBUILD_RETRY_MAX`, and at once by whatever needs the whole map next, close
//! included. Until one succeeds the flag stays set, so an image closed (or a daemon
//! killed) meanwhile is rebuilt by its next open.

use super::map::{describe_rebuilt, rebuild_map};
use super::Image;
use crate::error::{Error, ErrorKind, Result};
use crate::store::ImageStore;
use objmap::{BitSet, ObjectState};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Environment variable: `1` rebuilds a crashed image's map before serving it (the
/// behaviour before background rebuilds), an escape hatch.
pub const REBUILD_BEFORE_SERVING_ENV: &str = "RADOS_NBD_REBUILD_BEFORE_SERVING";

/// How long a change that needs the whole map (a checkpoint, a snapshot, a resize)
/// waits for a rebuild someone else runs before it gives up with an error.
pub const REBUILD_WAIT: Duration = Duration::from_secs(300);

/// The pause before the background rebuild is tried again after it failed; it doubles
/// after each failure, up to `REBUILD_RETRY_MAX`.
pub const REBUILD_RETRY_FIRST: Duration = Duration::from_secs(5);
/// The longest pause between two background attempts.
pub const REBUILD_RETRY_MAX: Duration = Duration::from_secs(120);

/// Whether a crashed image's map is rebuilt before serving (see the env variable).
pub fn rebuild_before_serving() -> bool {
    #[cfg(test)]
    if FORCE_BEFORE_SERVING.with(|f| f.get()) {
        return true;
    }
    std::env::var(REBUILD_BEFORE_SERVING_ENV).is_ok_and(|v| v.trim() == "1")
}

#[cfg(test)]
thread_local! {
    /// The escape hatch for one test's thread (the environment is the whole process's).
    pub(super) static FORCE_BEFORE_SERVING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Phase {
    /// Nobody runs it yet: the first to need the map (or `spawn_map_rebuild`) does.
    Pending,
    Running,
    Done,
    Failed(String),
}

/// A rebuild under way: which objects requests touched, and how far it got.
pub(super) struct Rebuild {
    touched: BitSet,
    /// Set once the listing is merged: every object is known from then on.
    whole: AtomicBool,
    phase: watch::Sender<Phase>,
    reason: String,
    count: u64,
}

impl Rebuild {
    pub(super) fn new(count: u64, reason: String) -> std::result::Result<Self, String> {
        let touched = BitSet::try_new(count).map_err(|e| e.to_string())?;
        Ok(Rebuild {
            touched,
            whole: AtomicBool::new(false),
            phase: watch::Sender::new(Phase::Pending),
            reason,
            count,
        })
    }
}

/// Puts the phase back to Pending when the future running the rebuild is dropped
/// before it ends (a caller's timeout), so the next caller runs it again.
struct RunGuard<'a> {
    phase: &'a watch::Sender<Phase>,
    ended: bool,
}

impl Drop for RunGuard<'_> {
    fn drop(&mut self) {
        if !self.ended {
            self.phase.send_replace(Phase::Pending);
        }
    }
}

impl<S: ImageStore> Image<S> {
    /// Whether object `objno`'s state in the map is known (no rebuild under way, or a
    /// request touched it since open).
    #[inline]
    pub(super) fn known(&self, objno: u64) -> bool {
        match &self.rebuild {
            None => true,
            Some(r) => r.whole.load(Ordering::Acquire) || r.touched.contains(objno),
        }
    }

    /// Object `objno`'s state when the map knows it: None without a map, or while it is
    /// unknown (the store knows).
    pub(super) fn known_state(&self, objno: u64) -> Option<ObjectState> {
        if !self.known(objno) {
            return None;
        }
        self.map_now().as_deref().map(|m| m.get(objno))
    }

    /// Marks object `objno` known: a request is about to change it in the store, and
    /// the state it leaves in the map wins over the listing's. Called before the change
    /// reaches the store (the merge cannot run meanwhile: it holds `gate`).
    #[inline]
    pub(super) fn touch(&self, objno: u64) {
        if let Some(r) = &self.rebuild {
            if !r.whole.load(Ordering::Acquire) {
                r.touched.insert(objno);
            }
        }
    }

    /// Whether the map in memory is whole (no rebuild, or it finished).
    pub fn map_is_whole(&self) -> bool {
        self.rebuild
            .as_ref()
            .is_none_or(|r| r.whole.load(Ordering::Acquire))
    }

    /// Whether a rebuild is under way or failed (the map is not whole).
    pub fn rebuild_pending(&self) -> bool {
        !self.map_is_whole()
    }

    /// Starts the rebuild in the background when one is pending (after an unclean
    /// close); its outcome is logged. The listing runs as a task of its own, so serving
    /// goes on meanwhile; a caller needing the whole map awaits `finish_rebuild`. A
    /// failed attempt is tried again after a growing pause until one succeeds or the
    /// image is closed (the task holds the image weakly: it never keeps it open).
    pub fn spawn_map_rebuild(self: &Arc<Self>) -> Option<tokio::task::JoinHandle<()>> {
        let r = self.rebuild.as_ref()?;
        if *r.phase.borrow() != Phase::Pending {
            return None;
        }
        let me = Arc::downgrade(self);
        let mut pause = self.rebuild_retry;
        Some(tokio::spawn(async move {
            // Serving first: let the requests already queued go ahead of the listing.
            tokio::task::yield_now().await;
            loop {
                let Some(img) = me.upgrade() else { return };
                if *img.gate.read().await {
                    return; // closed: the flag stays set for the next open
                }
                if img.finish_rebuild().await.is_ok() {
                    return;
                }
                tracing::warn!(
                    "the object map of {} will be rebuilt again in {}s (requests are \
                     served meanwhile, every object asked of the store)",
                    img.spec,
                    pause.as_secs_f64()
                );
                drop(img);
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(REBUILD_RETRY_MAX);
            }
        }))
    }

    /// Awaits the end of the map's rebuild, running it here when nobody does: Ok once
    /// the map is whole (at once without a rebuild). A rebuild that failed before this
    /// call is tried again here; one this call waited for returns its error.
    pub async fn finish_rebuild(&self) -> Result<()> {
        let Some(r) = &self.rebuild else {
            return Ok(());
        };
        let mut rx = r.phase.subscribe();
        let mut waited = false;
        loop {
            let phase = rx.borrow_and_update().clone();
            match phase {
                Phase::Done => return Ok(()),
                Phase::Failed(e) if waited => {
                    return Err(Error::new(
                        ErrorKind::Io,
                        format!("rebuilding the object map of {}: {e}", self.spec),
                    ))
                }
                Phase::Running => {
                    waited = true;
                    if rx.changed().await.is_err() {
                        return Err(Error::new(ErrorKind::Io, "the rebuild ended abruptly"));
                    }
                }
                Phase::Pending | Phase::Failed(_) => {
                    let won = r.phase.send_if_modified(|p| {
                        if matches!(p, Phase::Pending | Phase::Failed(_)) {
                            *p = Phase::Running;
                            true
                        } else {
                            false
                        }
                    });
                    if won {
                        return self.run_rebuild(r).await;
                    }
                }
            }
        }
    }

    /// `finish_rebuild` for a change that needs the whole map (`what`): a rebuild
    /// nobody runs yet is run here; one running elsewhere is waited for at most
    /// `REBUILD_WAIT`, then this fails saying why.
    pub(super) async fn whole_map(&self, what: &str) -> Result<()> {
        let Some(r) = &self.rebuild else {
            return Ok(());
        };
        if r.whole.load(Ordering::Acquire) {
            return Ok(());
        }
        let wait = self.rebuild_wait;
        let running = *r.phase.borrow() == Phase::Running;
        let res = if running {
            match tokio::time::timeout(wait, self.finish_rebuild()).await {
                Ok(r) => r,
                Err(_) => {
                    return Err(Error::new(
                        ErrorKind::Busy,
                        format!(
                            "{what} needs the whole object map of {}, still being rebuilt \
                             after {}s (after an unclean close); try again later",
                            self.spec,
                            wait.as_secs()
                        ),
                    ))
                }
            }
        } else {
            self.finish_rebuild().await
        };
        res.map_err(|e| {
            e.context(format!(
                "{what} needs the whole object map of {}, which could not be rebuilt",
                self.spec
            ))
        })
    }

    async fn run_rebuild(&self, r: &Rebuild) -> Result<()> {
        let mut guard = RunGuard {
            phase: &r.phase,
            ended: false,
        };
        let spec = &self.spec;
        tracing::debug!(
            "listing the objects of {spec} for its object map ({} objects): {}",
            r.count,
            r.reason
        );
        let fresh = rebuild_map(&self.store, spec, r.count, self.snap).await;
        let res = match fresh {
            Err(e) => Err(e),
            Ok(fresh) => {
                // No request in flight while the listing is merged (see the module doc).
                let g = self.gate.write().await;
                let map = self.map();
                if let Some(map) = &map {
                    for o in 0..r.count.min(map.len()) {
                        if !r.touched.contains(o) {
                            map.set(o, fresh.get(o));
                        }
                    }
                }
                r.whole.store(true, Ordering::Release);
                drop(g);
                if let Some(map) = &map {
                    // The same words as a rebuild before serving (scripts read them).
                    tracing::info!(
                        "object map of {spec} rebuilt: {}",
                        describe_rebuilt(map, r.count)
                    );
                    tracing::debug!(
                        "{spec}: {} objects changed by requests while the map was rebuilt kept their state",
                        r.touched.count()
                    );
                }
                Ok(())
            }
        };
        guard.ended = true;
        match res {
            Ok(()) => {
                r.phase.send_replace(Phase::Done);
                Ok(())
            }
            Err(e) => {
                tracing::error!(
                    "rebuilding the object map of {spec} failed: {e}; its dirty flag stays \
                     set until a rebuild succeeds (this one's next attempt, or the next open's)"
                );
                r.phase.send_replace(Phase::Failed(e.to_string()));
                Err(e.context(format!("rebuilding the object map of {spec}")))
            }
        }
    }
}
