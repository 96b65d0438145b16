//! Quiesce on the header watch, both sides of librbd's protocol (ImageWatcher's
//! QuiescePayload / UnquiescePayload, NOTIFY_OP_QUIESCE = 18 / UNQUIESCE = 19).
//!
//! The taker of a snapshot (`rbd snap create` through us as the lock owner, see
//! `lock::start_owner_op`) notifies Quiesce to every watcher of the header and waits
//! for the acks; an ack carrying an error fails the snapshot (unless the request says to
//! ignore it); after the snapshot it notifies Unquiesce.
//!
//! A watcher (every locking open of ours, the one taking the snapshot included) with
//! `--quiesce` runs the hook on Quiesce and acks with its result (0 or -errno) only when
//! the hook is done: the ack is deferred ([`Reply::Later`]), so librados' callback thread
//! is never held by a hook. The notifier times out (5 s) and sends the same request
//! again, up to 10 times, while the hook runs: a repeat is acked with the result once
//! known, never runs the hook twice. Unquiesce is acked at once and runs the hook's
//! unquiesce, only after a quiesce that succeeded (rbd-nbd runs none after a failed one).
//! A quiesce left without its Unquiesce (the snapshot taker died) is undone after
//! [`AUTO_UNQUIESCE`], as librbd does after twice its notify timeout (longer here: the
//! snapshot is taken by our own image layer, behind the requests in flight). Without
//! `--quiesce` both are acked empty at once: nothing to quiesce, which librbd counts as
//! success.
//!
//! Quiesce sessions run one at a time, as librbd's QuiesceWatchers queue them: a second
//! request (another snapshot taker) waits until the first is unquiesced (or undone after
//! [`AUTO_UNQUIESCE`]) before its hook runs, so a hook never runs beside another
//! (`fsfreeze -f` of a frozen file system fails) and never thaws what another froze.

use super::cls::{self, AsyncRequestId};
use super::image::Inner;
use super::rados::PendingAck;
use crate::error::{Error, ErrorKind, Result};
use crate::quiesce::{Phase, QuiesceHook};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// After a successful quiesce, how long to wait for the Unquiesce before undoing it anyway.
const AUTO_UNQUIESCE: Duration = Duration::from_secs(30);
/// How long a finished request's result is kept for repeats (librbd: 600 s).
const KEEP_DONE: Duration = Duration::from_secs(600);
/// The notifier's side, as librbd's defaults: each notify waits this long for the acks
/// (watcher::Notifier::NOTIFY_TIMEOUT), and is sent up to this many times while some
/// watcher has not answered (rbd_quiesce_notification_attempts).
const QUIESCE_NOTIFY_MS: u64 = 5000;
const QUIESCE_ATTEMPTS: u32 = 10;

enum Req {
    /// The hook runs; the acks owed to the notifies seen meanwhile.
    Running {
        acks: Vec<PendingAck>,
        unquiesce_asked: bool,
    },
    Done {
        result: i32,
        at: Instant,
        /// The unquiesce ran (or is running), or none is due (a failed quiesce).
        unquiesced: bool,
        /// While quiesced: the session's turn, given back after the unquiesce.
        turn: Option<tokio::sync::OwnedSemaphorePermit>,
    },
}

/// An open's quiesce state: the hook (`--quiesce`) and the requests seen.
pub(super) struct Quiesce {
    hook: OnceLock<Arc<QuiesceHook>>,
    reqs: Mutex<HashMap<AsyncRequestId, Req>>,
    /// One quiesce session at a time (one permit): taken before the quiesce hook runs,
    /// given back once the session is over (failed, or unquiesced).
    turns: Arc<tokio::sync::Semaphore>,
    /// Our own request numbers when we take a snapshot.
    next_request: AtomicU64,
    /// The tasks started for quiesce requests and for snapshots we take: `stop` ends
    /// them before the image closes, so none holds the handle (and with it the cluster
    /// connection) when the runtime shuts down.
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Default for Quiesce {
    fn default() -> Self {
        Quiesce {
            hook: OnceLock::new(),
            reqs: Mutex::new(HashMap::new()),
            turns: Arc::new(tokio::sync::Semaphore::new(1)),
            next_request: AtomicU64::new(0),
            tasks: Mutex::new(Vec::new()),
        }
    }
}

impl Quiesce {
    pub(super) fn set_hook(&self, hook: Arc<QuiesceHook>) {
        let _ = self.hook.set(hook);
    }

    /// Whether Quiesce notifications get a deferred ack (a hook is set).
    pub(super) fn defers(&self) -> bool {
        self.hook.get().is_some()
    }

    fn reqs(&self) -> std::sync::MutexGuard<'_, HashMap<AsyncRequestId, Req>> {
        self.reqs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` as a task that `stop` ends.
    pub(super) fn spawn(&self, f: impl std::future::Future<Output = ()> + Send + 'static) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        tasks.retain(|t| !t.is_finished());
        tasks.push(tokio::spawn(f));
    }

    /// At close (the watch's events have stopped): ends the tasks, drops the acks still
    /// owed (their notifiers see a timeout), and runs the unquiesce still due after a
    /// successful quiesce, so no file system stays frozen after us.
    pub(super) async fn stop(&self, spec: &crate::spec::ImageSpec) {
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        for t in &tasks {
            t.abort();
        }
        for t in tasks {
            let _ = t.await;
        }
        let due = std::mem::take(&mut *self.reqs()).into_values().any(|r| {
            matches!(
                r,
                Req::Done {
                    result: 0,
                    unquiesced: false,
                    ..
                }
            )
        });
        if let (true, Some(hook)) = (due, self.hook.get()) {
            tracing::info!(image = %spec, "closing while quiesced: unquiescing");
            if let Err(e) = hook.run(Phase::Unquiesce).await {
                tracing::warn!(image = %spec, "{e}");
            }
        }
    }
}

/// A Quiesce notification whose ack was deferred: runs the hook (once per request) and
/// acks with its result.
pub(super) fn on_quiesce(inner: &Arc<Inner>, id: AsyncRequestId, ack: PendingAck) {
    let Some(hook) = inner.quiesce.hook.get().cloned() else {
        ack.send(&[]);
        return;
    };
    {
        let mut reqs = inner.quiesce.reqs();
        reqs.retain(|_, r| !matches!(r, Req::Done { at, .. } if at.elapsed() > KEEP_DONE));
        match reqs.get_mut(&id) {
            Some(Req::Running { acks, .. }) => {
                acks.push(ack);
                return;
            }
            Some(Req::Done { result, .. }) => {
                ack.send(&cls::response_message(*result));
                return;
            }
            None => {
                tracing::info!(image = %inner.spec, "quiesce request {id}: running the hook");
                reqs.insert(
                    id,
                    Req::Running {
                        acks: vec![ack],
                        unquiesce_asked: false,
                    },
                );
            }
        }
    }
    let me = inner.clone();
    let turns = inner.quiesce.turns.clone();
    inner.quiesce.spawn(async move {
        let inner = me;
        // Another session quiesced: ours waits for its unquiesce (its notifier meanwhile
        // re-sends, and is acked when we are done).
        let Ok(turn) = turns.acquire_owned().await else {
            return;
        };
        let result = match hook.run(Phase::Quiesce).await {
            Ok(()) => 0,
            Err(e) => {
                // EIO whatever the failure, a timeout too: librbd re-sends a whole request
                // that ends in ETIMEDOUT, which would run the hook again and again.
                tracing::warn!(image = %inner.spec, "quiesce asked by client.{}: {e}", id.gid);
                -libc::EIO
            }
        };
        let (acks, unquiesce_now) = {
            let mut reqs = inner.quiesce.reqs();
            let (acks, asked) = match reqs.remove(&id) {
                Some(Req::Running {
                    acks,
                    unquiesce_asked,
                }) => (acks, unquiesce_asked),
                _ => (Vec::new(), false),
            };
            // Quiesced, with no unquiesce asked yet: the turn stays with the request.
            let keep = result == 0 && !asked;
            let (turn, turn_now) = if keep { (Some(turn), None) } else { (None, Some(turn)) };
            reqs.insert(
                id,
                Req::Done {
                    result,
                    at: Instant::now(),
                    unquiesced: result != 0 || asked,
                    turn,
                },
            );
            (acks, turn_now.filter(|_| result == 0 && asked))
        };
        let reply = cls::response_message(result);
        for a in acks {
            a.send(&reply);
        }
        if let Some(turn) = unquiesce_now {
            // The Unquiesce came while the hook ran (the notifier gave up waiting).
            run_unquiesce(&hook, &inner).await;
            drop(turn);
        } else if result == 0 {
            tokio::time::sleep(AUTO_UNQUIESCE).await;
            if let Some(turn) = take_unquiesce(&inner, id) {
                tracing::warn!(image = %inner.spec, "no unquiesce from client.{} within {} s after the quiesce; unquiescing",
                    id.gid, AUTO_UNQUIESCE.as_secs());
                run_unquiesce(&hook, &inner).await;
                drop(turn);
            }
        }
        // A failed quiesce's turn went with `turn_now` above: the next session may run.
    });
}

/// Marks request `id`'s unquiesce as done; when it was still due, the session's turn,
/// to give back once the unquiesce ran.
fn take_unquiesce(inner: &Inner, id: AsyncRequestId) -> Option<Option<OwnedTurn>> {
    match inner.quiesce.reqs().get_mut(&id) {
        Some(Req::Done {
            result: 0,
            unquiesced,
            turn,
            ..
        }) if !*unquiesced => {
            *unquiesced = true;
            Some(turn.take())
        }
        _ => None,
    }
}

type OwnedTurn = tokio::sync::OwnedSemaphorePermit;

async fn run_unquiesce(hook: &QuiesceHook, inner: &Inner) {
    if let Err(e) = hook.run(Phase::Unquiesce).await {
        tracing::warn!(image = %inner.spec, "{e}");
    }
}

/// An Unquiesce notification (acked already): the hook unquiesces after a successful
/// quiesce of the same request.
pub(super) fn on_unquiesce(inner: &Arc<Inner>, id: AsyncRequestId) {
    let Some(hook) = inner.quiesce.hook.get().cloned() else {
        return;
    };
    if let Some(Req::Running {
        unquiesce_asked, ..
    }) = inner.quiesce.reqs().get_mut(&id)
    {
        *unquiesce_asked = true;
        return;
    }
    if let Some(turn) = take_unquiesce(inner, id) {
        let me = inner.clone();
        inner.quiesce.spawn(async move {
            run_unquiesce(&hook, &me).await;
            drop(turn);
        });
    }
}

/// The notifier's side: asks every watcher of the header to quiesce (librbd's
/// ImageWatcher::notify_quiesce) and returns the request id to unquiesce with. Fails with
/// the first error a watcher answered (-EOPNOTSUPP, a watcher without quiesce, counts as
/// none), or when some watcher still had not answered after every attempt.
pub(super) async fn quiesce_watchers(inner: &Inner) -> (AsyncRequestId, Result<()>) {
    let handle = inner
        .lock
        .lock()
        .await
        .as_ref()
        .map(|s| s.watch.cookie)
        .unwrap_or(0);
    let id = AsyncRequestId {
        gid: inner.meta.cluster().instance_id(),
        handle,
        request_id: inner.quiesce.next_request.fetch_add(1, Ordering::SeqCst) + 1,
    };
    let msg = cls::quiesce_notify(cls::NOTIFY_OP_QUIESCE, id);
    for attempt in 1..=QUIESCE_ATTEMPTS {
        let reply = match inner
            .meta
            .notify(&inner.hdr_oid, &msg, QUIESCE_NOTIFY_MS)
            .await
        {
            Ok(r) => r,
            Err(e) => return (id, Err(e.context("notifying quiesce"))),
        };
        if !reply.timeouts.is_empty() {
            tracing::info!(image = %inner.spec, "quiesce: {} watcher(s) not done yet (attempt {attempt} of {QUIESCE_ATTEMPTS})",
                reply.timeouts.len());
            continue;
        }
        for (gid, _, payload) in &reply.acks {
            match cls::response_result(payload) {
                Ok(Some(r)) if r < 0 && r != -libc::EOPNOTSUPP => {
                    // The errno goes on to the asker (`errno_of` reads it back).
                    let text = std::io::Error::from_raw_os_error(-r).to_string();
                    let text = text.split(" (os error").next().unwrap_or(&text).to_string();
                    let e = Error::new(
                        ErrorKind::Io,
                        format!("client.{gid} failed to quiesce: {text} (errno {})", -r),
                    );
                    return (id, Err(e));
                }
                Ok(_) => {}
                Err(e) => {
                    return (
                        id,
                        Err(e.context(format!("the quiesce ack of client.{gid}"))),
                    )
                }
            }
        }
        return (id, Ok(()));
    }
    (
        id,
        Err(Error::new(
            ErrorKind::TimedOut,
            format!(
                "some watcher did not finish quiescing in {QUIESCE_ATTEMPTS} × {} s (errno {})",
                QUIESCE_NOTIFY_MS / 1000,
                libc::ETIMEDOUT
            ),
        )),
    )
}

/// Asks every watcher to unquiesce after `quiesce_watchers` (acks are not waited for
/// beyond the notify's own timeout: librbd's notify_unquiesce ignores them too).
pub(super) async fn unquiesce_watchers(inner: &Inner, id: AsyncRequestId) {
    let msg = cls::quiesce_notify(cls::NOTIFY_OP_UNQUIESCE, id);
    if let Err(e) = inner
        .meta
        .notify(&inner.hdr_oid, &msg, QUIESCE_NOTIFY_MS)
        .await
    {
        tracing::warn!(image = %inner.spec, "notifying unquiesce: {e}");
    }
}
