//! The exclusive lock, the header watch and notifies: taking `rbd_lock` as librbd does,
//! breaking a dead owner's lock after fencing it, keeping the lock across a lost watch,
//! answering and carrying out requests addressed to the lock owner, and fencing our own
//! handle once the lock is lost.

use super::image::Inner;
use super::owner_msgs::{self, OwnerMsg, OwnerOp};
use super::rados::{self, errno_of, is_blocklisted, Reply, Watch, WatchEvent};
use super::{cls, LOCK, NOTIFY_TIMEOUT_MS};
use crate::error::{Error, ErrorKind, Result};
use crate::store::{LockAtOpen, OpenMode, OwnerAction, OwnerRequest, QuiesceMode};
use libc::{EACCES, EBUSY, EEXIST, EINVAL, EIO, ENOENT, ENOSPC, EOPNOTSUPP, EPERM, EROFS};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use tokio::sync::mpsc;

/// How long an open waits for the watch of a lock owner that does not answer (a killed or
/// stopped client) to be dropped by the OSD, which takes `osd_client_watch_timeout` (30 s
/// by default) after its last ping, before giving up with "in use". The environment
/// variable `RADOS_NBD_LOCK_WAIT_SECS` overrides it (tests, clusters with a longer timeout).
const LOCK_WAIT_SECS: u64 = 45;
/// While waiting: how long each re-check gives the owner to answer, and the pause between.
const LOCK_RECHECK_NOTIFY_MS: u64 = 1000;
const LOCK_RECHECK_PAUSE: std::time::Duration = std::time::Duration::from_millis(500);

pub(super) struct LockState {
    pub(super) watch: Watch,
    pub(super) cookie: String,
    pub(super) stop: tokio::sync::watch::Sender<bool>,
    /// The AcquiredLock notify sent after taking the lock: `close` waits for it, so no
    /// notify of ours is still out when the handle (and maybe the cluster) goes.
    pub(super) acquired_notify: Option<tokio::task::JoinHandle<()>>,
    /// The `watch_events` task: `close` stops it and waits for it, so it holds no
    /// reference to the handle (a header refresh still out, say) once close returns. A
    /// task dropped at runtime shutdown with the last reference would shut the cluster
    /// connection down under that operation (a SIGSEGV in librados' messenger thread).
    pub(super) events: Option<tokio::task::JoinHandle<()>>,
}

impl Inner {
    /// Whether requests addressed to the lock owner are taken (ours is an exclusive,
    /// read-write open whose image layer serves them).
    fn takes_owner_requests(&self) -> bool {
        self.mode == OpenMode::ReadWrite
            && !self.closed.load(Ordering::SeqCst)
            && !self.released.load(Ordering::SeqCst)
            && self
                .owner_tx
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_some()
    }
}

/// Takes the image's exclusive lock the way librbd does: a watch on the header, then
/// cls_lock `rbd_lock` (exclusive, tag `internal`, cookie `auto <watch handle>`); for
/// SharedWrite the same lock taken shared with our own tag (see `lock_kind`).
/// A live owner is asked to hand the lock over (`LockAtOpen::Ask`, as when taking it
/// back after a hand-over), left with it (`Defer`: the handle starts as after a
/// hand-over, watching, released; its first write takes the lock), or makes the open
/// fail with "in use" (`Refuse`).
pub(super) async fn acquire_lock(inner: &Arc<Inner>, how: LockAtOpen) -> Result<()> {
    let spec = &inner.spec;
    let (tx, rx) = mpsc::unbounded_channel();
    let watch = inner
        .meta
        .watch(&inner.hdr_oid, replier(inner), tx.clone())
        .await
        .map_err(|e| e.context(format!("opening image {spec}")))?;
    let cookie = cls::lock_cookie(watch.cookie);
    let ask = (how == LockAtOpen::Ask).then(|| Ask {
        handle: watch.cookie,
        deadline: std::time::Instant::now() + lock_wait(),
    });
    let defer = how == LockAtOpen::Defer && inner.mode == OpenMode::ReadWrite;
    let t0 = std::time::Instant::now();
    let taken = match take_lock(inner, &cookie, ask, defer).await {
        Ok(taken) => taken,
        Err(e) => {
            let _ = inner.meta.unwatch(watch).await;
            return Err(e);
        }
    };
    let gid = inner.meta.cluster().instance_id();
    if taken {
        inner.released.store(false, Ordering::SeqCst);
        tracing::info!(image = %spec, locker = %format!("client.{gid}"), %cookie, "acquired {} in {:.1} ms", lock_name(inner.mode), t0.elapsed().as_secs_f64() * 1e3);
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let handle = watch.cookie;
    let mut state = inner.lock.lock().await;
    *state = Some(LockState {
        watch,
        cookie,
        stop: stop_tx,
        acquired_notify: None,
        events: None,
    });
    let events = tokio::spawn(watch_events(Arc::downgrade(inner), rx, tx, stop_rx));
    // Tell waiting librbd clients, as librbd does; nobody has to answer.
    let acquired_notify = taken.then(|| {
        let meta = inner.meta.clone();
        let oid = inner.hdr_oid.clone();
        tokio::spawn(async move {
            let msg = cls::lock_notify(cls::NOTIFY_OP_ACQUIRED_LOCK, gid, handle);
            let _ = meta.notify(&oid, &msg, NOTIFY_TIMEOUT_MS).await;
        })
    });
    if let Some(st) = state.as_mut() {
        st.acquired_notify = acquired_notify;
        st.events = Some(events);
    }
    Ok(())
}

/// The watch's replier for this image: whether requests are taken can change after the
/// watch is registered (the image layer starts taking them once it is serving).
fn replier(inner: &Arc<Inner>) -> rados::NotifyReplier {
    let inner = Arc::downgrade(inner);
    Box::new(move |notifier, payload| {
        let Some(i) = inner.upgrade() else {
            return reply_to_notify(notifier, payload, Role::Closed, false, |_| None);
        };
        match cls::notify_op(payload) {
            Ok(cls::NOTIFY_OP_HEADER_UPDATE) => {
                // Counted before the ack goes back: our next write reads the header
                // first (`Inner::fresh`).
                i.updates_announced.fetch_add(1, Ordering::AcqRel);
            }
            Ok(cls::NOTIFY_OP_RELEASED_LOCK) => {
                // A take-back (or an open with --wait-for-lock) waiting for it tries at
                // once; woken here, not in `watch_events`, which an open has not started.
                i.lock_freed.notify_waiters();
            }
            _ => {}
        }
        let role = if i.released.load(Ordering::SeqCst) || i.is_fenced() {
            // A fenced handle's lock was broken: another client may own it now.
            Role::NotOwner
        } else if !i.takes_owner_requests() {
            if i.mode == OpenMode::ReadWrite {
                Role::Busy
            } else {
                Role::Closed
            }
        } else if i.hands_over.load(Ordering::SeqCst) {
            Role::OwnerHandsOver
        } else {
            Role::Owner
        };
        let defers = i.quiesce.defers();
        reply_to_notify(notifier, payload, role, defers, |id| i.owner_result(id))
    })
}

/// Who we are to the clients that notify the header, for our answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// The lock owner, taking requests; the lock itself is not handed over (`--exclusive`).
    Owner,
    /// The lock owner, taking requests and handing the lock over when asked.
    OwnerHandsOver,
    /// Holding the exclusive lock but taking no requests yet (not serving yet) or any
    /// more (closing): as librbd's owner while it acquires or shuts down
    /// (`ExclusiveLock::accept_request` false, its error 0), a lock request is acked 0
    /// (the asker waits for ReleasedLock, or asks again), a request for the owner acked
    /// empty (the asker finds no owner and sends it again).
    Busy,
    /// Holding a lock that is never handed over and taking no requests (a shared
    /// writer): refused with -EROFS.
    Closed,
    /// The lock was handed over: another client owns it and answers; we ack empty, as a
    /// librbd client that does not own the lock does (two answers would confuse the asker).
    NotOwner,
}

/// How many results of finished requests are kept for clients that ask again, and for
/// how long (librbd's owner: 600 s, `m_async_complete_expiration`).
const OWNER_DONE_KEPT: usize = 256;
const OWNER_DONE_FOR: std::time::Duration = std::time::Duration::from_secs(600);
/// While a request runs, a progress notice at least this often: librbd's asker gives up
/// (and sends the request again) after `rbd_request_timed_out_seconds` (30) without one.
const OWNER_HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(10);
/// Progress notices no more often than this.
const OWNER_PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

impl Inner {
    /// The result of request `id` if we finished it already.
    fn owner_result(&self, id: &cls::AsyncRequestId) -> Option<i32> {
        self.owner_done
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .rev()
            .find(|(d, _, at)| d == id && at.elapsed() < OWNER_DONE_FOR)
            .map(|&(_, r, _)| r)
    }
}

/// Whether we carry out `msg`, or the errno it is refused with at once (in the ack),
/// as librbd's owner refuses what it cannot do before starting. Refusals are -EBUSY
/// ("in use"): librbd's asker passes that on as it is, where -EOPNOTSUPP would make it
/// try to take the lock from us and end with a puzzling -EROFS.
fn owner_verdict(msg: &OwnerMsg) -> std::result::Result<cls::AsyncRequestId, (i32, &'static str)> {
    let Some(id) = msg.id else {
        // An old client wants its answer in the ack, after the work: we cannot hold an
        // ack back, so it is refused as before.
        return Err((
            EROFS,
            "the asker is an old librbd that wants the answer in the ack",
        ));
    };
    match &msg.op {
        // `rbd group snap create|rm` asks each image's owner for its part, in the group's
        // namespace; `rbd mirror image enable|snapshot|disable` for mirror snapshots;
        // the removal of a trashed snapshot comes from librbd's DetachChildRequest when
        // the last format-2 clone of it goes. A namespace we do not know, and protecting
        // anything but a user snapshot, are not ours to do.
        OwnerOp::SnapCreate { ns, .. }
            if ![
                owner_msgs::SNAP_NS_USER,
                owner_msgs::SNAP_NS_GROUP,
                owner_msgs::SNAP_NS_MIRROR,
            ]
            .contains(ns) =>
        {
            Err((
                EBUSY,
                "only user, group and mirror snapshots are taken by rados-nbd",
            ))
        }
        OwnerOp::SnapRemove { ns, .. }
            if ![
                owner_msgs::SNAP_NS_USER,
                owner_msgs::SNAP_NS_GROUP,
                owner_msgs::SNAP_NS_TRASH,
                owner_msgs::SNAP_NS_MIRROR,
            ]
            .contains(ns) =>
        {
            Err((
                EBUSY,
                "only user, group, trash and mirror snapshots are removed by rados-nbd",
            ))
        }
        OwnerOp::SnapProtect { ns, .. } | OwnerOp::SnapUnprotect { ns, .. }
            if *ns != owner_msgs::SNAP_NS_USER =>
        {
            Err((EBUSY, "only user snapshots are protected by rados-nbd"))
        }
        OwnerOp::SnapCreate { flags, .. } if *flags & !SNAP_CREATE_FLAGS_KNOWN != 0 => Err((
            EBUSY,
            "rados-nbd takes no snapshot without its object map (skip-object-map flag)",
        )),
        OwnerOp::UpdateFeatures { features, .. }
            if *features & !crate::image::UPDATABLE_FEATURES != 0 =>
        {
            Err((
                EBUSY,
                "rados-nbd changes only object-map, fast-diff, deep-flatten and exclusive-lock \
                 of an image it serves; stop serving it to change the others",
            ))
        }
        OwnerOp::Sparsify { sparse_size }
            if !sparse_size.is_power_of_two() || *sparse_size < 4096 =>
        {
            Err((
                EINVAL,
                "the sparse size must be a power of two of at least 4096 bytes",
            ))
        }
        _ => Ok(id),
    }
}

/// `SNAP_CREATE_FLAG_SKIP_OBJECT_MAP` (1) and `_SKIP_NOTIFY_QUIESCE` (2),
/// `_IGNORE_NOTIFY_QUIESCE_ERROR` (4) (librbd/internal.h): we take no snapshot without
/// its map; the quiesce flags are honoured (`start_owner_op`).
const SNAP_CREATE_FLAGS_KNOWN: u64 =
    cls::SNAP_CREATE_FLAG_SKIP_NOTIFY_QUIESCE | cls::SNAP_CREATE_FLAG_IGNORE_NOTIFY_QUIESCE_ERROR;

/// Runs on librados' callback thread. A request to the lock owner that we carry out is
/// acked 0 (or, asked again, 0 while it runs and its result once done), then carried out
/// by `watch_events`, which sends AsyncProgress and AsyncComplete, as librbd's owner does
/// (ImageWatcher::handle_operation_request). One we do not do gets its errno; requests
/// for the lock get -EROFS (we do not hand the lock over, like `rbd-nbd --exclusive`);
/// a quiesce is answered by `watch_events` after the hook when `defers_quiesce`
/// (`--quiesce`); the rest (an unquiesce, a quiesce without a hook: nothing to do) are
/// acked empty.
fn reply_to_notify(
    _notifier: u64,
    payload: &[u8],
    role: Role,
    defers_quiesce: bool,
    result_of: impl Fn(&cls::AsyncRequestId) -> Option<i32>,
) -> Reply {
    let op = cls::notify_op(payload);
    if let Ok(cls::NOTIFY_OP_QUIESCE) = op {
        if defers_quiesce && cls::quiesce_request(payload).is_ok() {
            return Reply::Later;
        }
    }
    match role {
        Role::NotOwner => Reply::Now(Vec::new()),
        // librbd's AutomaticPolicy: a lock request is accepted (0) and the lock released
        // (`watch_events` passes it to the image layer), a forced one too.
        Role::OwnerHandsOver | Role::Busy
            if op.as_ref().is_ok_and(|&o| o == cls::NOTIFY_OP_REQUEST_LOCK) =>
        {
            Reply::Now(cls::response_message(0))
        }
        Role::Busy => Reply::Now(Vec::new()),
        r => Reply::Now(owner_reply(payload, r, result_of)),
    }
}

fn owner_reply(
    payload: &[u8],
    role: Role,
    result_of: impl Fn(&cls::AsyncRequestId) -> Option<i32>,
) -> Vec<u8> {
    let takes = matches!(role, Role::Owner | Role::OwnerHandsOver);
    match owner_msgs::owner_msg(payload) {
        Ok(Some(msg)) if takes => match owner_verdict(&msg) {
            Ok(id) => cls::response_message(result_of(&id).unwrap_or(0)),
            Err((errno, _)) => cls::response_message(-errno),
        },
        Ok(Some(_)) => cls::response_message(-EROFS),
        _ => match cls::notify_op(payload) {
            // A request for the owner that we do not know (a migration's): librbd's owner
            // answers EOPNOTSUPP, upon which the asker takes the lock and does it itself;
            // we hand the lock over when asked. Keeping the lock (`--exclusive`), we say
            // no, as before.
            Ok(op) if cls::notify_wants_owner_reply(op) => {
                cls::response_message(if role == Role::OwnerHandsOver {
                    -EOPNOTSUPP
                } else {
                    -EROFS
                })
            }
            _ => Vec::new(),
        },
    }
}

/// Carries out a request a client addressed to the lock owner (accepted in
/// `reply_to_notify`) through the image layer, with progress notices while it runs, then
/// tells the asker with AsyncComplete. A request sent again while it runs is not started
/// twice; one sent again once done gets its AsyncComplete again.
fn start_owner_op(inner: &Arc<Inner>, msg: OwnerMsg, notifier_id: u64) {
    let id = match owner_verdict(&msg) {
        Ok(id) => id,
        Err((errno, why)) => {
            tracing::info!(image = %inner.spec, "refused {} asked by client.{notifier_id} (errno {errno}): {why}", msg.op.describe());
            return;
        }
    };
    let tx = inner
        .owner_tx
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let Some(tx) = tx else {
        tracing::info!(image = %inner.spec, "refused {} from client.{notifier_id}: not serving requests", msg.op.describe());
        return;
    };
    if let Some(r) = inner.owner_result(&id) {
        // Asked again: it missed our AsyncComplete (or the ack of the first).
        let inner = inner.clone();
        tokio::spawn(async move {
            let msg = cls::async_complete_notify(id, r);
            let _ = inner
                .meta
                .notify(&inner.hdr_oid, &msg, NOTIFY_TIMEOUT_MS)
                .await;
        });
        return;
    }
    if !inner
        .owner_pending
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(id)
    {
        return; // Sent again while we are at it: one answer will come.
    }
    let what = msg.op.describe();
    tracing::info!(image = %inner.spec, "{what} asked by client.{notifier_id} (request {id})");
    let (done, mut rx) = tokio::sync::oneshot::channel();
    // A snapshot's flags: every watcher is asked to quiesce around it (as librbd's
    // SnapshotCreateRequest), unless they say to skip it.
    let mut snap_quiesce = None;
    let action = match msg.op {
        OwnerOp::MetadataUpdate { key, value } => {
            // Only the header changes (librbd's owner: MetadataSetRequest /
            // MetadataRemoveRequest): done here, not by the image layer.
            let me = inner.clone();
            inner.quiesce.spawn(async move {
                let r = me.metadata_update(&key, value.as_deref()).await;
                finish_owner_op(&me, id, r, notifier_id, &what).await;
            });
            return;
        }
        OwnerOp::Resize { size, allow_shrink } => OwnerAction::Resize { size, allow_shrink },
        OwnerOp::SnapCreate {
            name,
            flags,
            ns,
            ns_raw,
        } => {
            snap_quiesce = Some(flags);
            if ns == owner_msgs::SNAP_NS_GROUP || ns == owner_msgs::SNAP_NS_MIRROR {
                OwnerAction::NsSnapCreate {
                    name,
                    namespace: ns_raw,
                }
            } else {
                // Our own hook runs as a watcher's (quiesce_watchers below), not again here.
                OwnerAction::SnapCreate {
                    name,
                    quiesce: QuiesceMode::Skip,
                }
            }
        }
        OwnerOp::SnapRemove { name, ns }
            if ns == owner_msgs::SNAP_NS_GROUP
                || ns == owner_msgs::SNAP_NS_MIRROR
                || ns == owner_msgs::SNAP_NS_TRASH =>
        {
            OwnerAction::NsSnapRemove {
                name,
                namespace_type: ns,
            }
        }
        OwnerOp::SnapRemove { name, .. } => OwnerAction::SnapRemove { name },
        OwnerOp::SnapRename { snap_id, name } => OwnerAction::SnapRename {
            snap_id,
            new_name: name,
        },
        OwnerOp::SnapProtect { name, .. } => OwnerAction::SnapProtect {
            name,
            protected: true,
        },
        OwnerOp::SnapUnprotect { name, .. } => OwnerAction::SnapProtect {
            name,
            protected: false,
        },
        OwnerOp::Rename { name } => OwnerAction::Rename { new_name: name },
        OwnerOp::Flatten => OwnerAction::Flatten,
        OwnerOp::RebuildObjectMap => OwnerAction::RebuildObjectMap,
        OwnerOp::Sparsify { sparse_size } => OwnerAction::Sparsify { sparse_size },
        OwnerOp::UpdateFeatures { features, enabled } => {
            OwnerAction::UpdateFeatures { features, enabled }
        }
    };
    let req = OwnerRequest::new(action, done);
    let mut progress_rx = req.progress.subscribe();
    let me = inner.clone();
    // A task that close ends (`Quiesce::stop`): none may hold the handle, and with it the
    // cluster connection, when the runtime shuts down.
    inner.quiesce.spawn(async move {
        let inner = me;
        let skip = snap_quiesce.is_none_or(|f| f & cls::SNAP_CREATE_FLAG_SKIP_NOTIFY_QUIESCE != 0);
        let ignore =
            snap_quiesce.is_some_and(|f| f & cls::SNAP_CREATE_FLAG_IGNORE_NOTIFY_QUIESCE_ERROR != 0);
        let quiesced = if skip {
            None
        } else {
            Some(super::quiesce::quiesce_watchers(&inner).await)
        };
        let refused = match &quiesced {
            Some((_, Err(e))) if !ignore => Some(e.clone().context(format!(
                "quiescing {} for the {what}; no snapshot taken",
                inner.spec
            ))),
            Some((_, Err(e))) => {
                tracing::warn!(image = %inner.spec, "{e}; {what} goes on (quiesce errors ignored)");
                None
            }
            _ => None,
        };
        let r = if let Some(e) = refused {
            Err(e)
        } else if tx.send(req).is_err() {
            Err(Error::new(ErrorKind::Interrupted, "the image is closing"))
        } else {
            let mut beat = tokio::time::interval(OWNER_HEARTBEAT);
            beat.tick().await;
            let mut last_sent = std::time::Instant::now();
            let mut progress_open = true;
            loop {
                let send_progress = tokio::select! {
                    r = &mut rx => {
                        break r.unwrap_or_else(|_| Err(Error::new(ErrorKind::Interrupted, "the image closed first")));
                    }
                    _ = beat.tick() => true,
                    c = progress_rx.changed(), if progress_open => {
                        if c.is_err() {
                            progress_open = false;
                        }
                        last_sent.elapsed() >= OWNER_PROGRESS_EVERY
                    }
                };
                if send_progress {
                    // An op without progress of its own (a snapshot) reports 0 of 1: a
                    // total of 0 is a division by zero in some progress printers.
                    let (d, t) = *progress_rx.borrow();
                    let m = owner_msgs::async_progress_notify(id, d, t.max(1));
                    let _ = inner
                        .meta
                        .notify(&inner.hdr_oid, &m, NOTIFY_TIMEOUT_MS)
                        .await;
                    last_sent = std::time::Instant::now();
                }
            }
        };
        if let Some((qid, _)) = quiesced {
            super::quiesce::unquiesce_watchers(&inner, qid).await;
        }
        finish_owner_op(&inner, id, r, notifier_id, &what).await;
    });
}

/// Answers request `id` once done: its result kept for a client that asks again (not a
/// restart: asked again, it starts again), the asker told with AsyncComplete.
async fn finish_owner_op(
    inner: &Arc<Inner>,
    id: cls::AsyncRequestId,
    r: Result<()>,
    notifier_id: u64,
    what: &str,
) {
    let result = match &r {
        Ok(()) => 0,
        // Queued behind a hand-over: the lock is another client's now; or stopped by our
        // close, after which it will be. librbd's asker sends the request again on
        // ERESTART, and reaches the new owner.
        Err(_) if inner.released.load(Ordering::SeqCst) => -libc::ERESTART,
        Err(e) if e.kind == ErrorKind::Interrupted => -libc::ERESTART,
        // librbd re-sends a request that ends in ETIMEDOUT or ERESTART, quiesce and
        // all, until its own deadline: a quiesce that timed out is an EIO.
        Err(e) => match errno_for_librbd(e) {
            libc::ETIMEDOUT | libc::ERESTART => -EIO,
            n => -n,
        },
    };
    if result != -libc::ERESTART {
        let mut d = inner.owner_done.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        d.retain(|(_, _, at)| now.duration_since(*at) < OWNER_DONE_FOR);
        d.push_back((id, result, now));
        while d.len() > OWNER_DONE_KEPT {
            d.pop_front();
        }
    }
    inner
        .owner_pending
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&id);
    let msg = cls::async_complete_notify(id, result);
    if let Err(e) = inner
        .meta
        .notify(&inner.hdr_oid, &msg, NOTIFY_TIMEOUT_MS)
        .await
    {
        tracing::warn!(image = %inner.spec, "telling client.{notifier_id} its {what} is done: {e}");
    } else {
        tracing::info!(image = %inner.spec, "{what} asked by client.{notifier_id} done: {}", if result == 0 { "ok".to_string() } else { format!("error {result}") });
    }
}

/// The errno librbd gets for an error of ours: librados' own when it came from there.
fn errno_for_librbd(e: &Error) -> i32 {
    if let Some(n) = errno_of(e) {
        return n.abs();
    }
    match e.kind {
        ErrorKind::InvalidInput => EINVAL,
        ErrorKind::NotFound => ENOENT,
        ErrorKind::AlreadyExists => EEXIST,
        ErrorKind::ReadOnly => EROFS,
        ErrorKind::Unsupported => EOPNOTSUPP,
        ErrorKind::NoSpace => ENOSPC,
        ErrorKind::Busy => EBUSY,
        _ => EIO,
    }
}

pub(super) fn lock_name(mode: OpenMode) -> &'static str {
    if mode == OpenMode::SharedWrite {
        "shared-write lock"
    } else {
        "exclusive lock"
    }
}

/// The kind and tag of the lock a mode takes on `rbd_lock`. Shared writers take it shared
/// with their own tag: they coexist with each other, and a librbd client (which wants it
/// exclusive with tag `internal`) or a ReadWrite opener is kept out, and vice versa.
fn lock_kind(mode: OpenMode) -> (u8, &'static str) {
    if mode == OpenMode::SharedWrite {
        (cls::LOCK_SHARED, cls::SHARED_LOCK_TAG)
    } else {
        (cls::LOCK_EXCLUSIVE, cls::RBD_LOCK_TAG)
    }
}

async fn try_lock(inner: &Inner, cookie: &str) -> Result<()> {
    let (kind, tag) = lock_kind(inner.mode);
    let input = cls::lock_in(cls::RBD_LOCK_NAME, kind, cookie, tag, "");
    inner
        .meta
        .exec_write(&inner.hdr_oid, LOCK, "lock", &input)
        .await
}

/// Up to how long `take_lock` waits for a silent owner's watch to expire.
fn lock_wait() -> std::time::Duration {
    let secs = std::env::var("RADOS_NBD_LOCK_WAIT_SECS")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(LOCK_WAIT_SECS);
    std::time::Duration::from_secs(secs)
}

pub(super) async fn get_lock_info(inner: &Inner) -> Result<cls::LockInfo> {
    let b = inner
        .meta
        .exec_read(
            &inner.hdr_oid,
            LOCK,
            "get_info",
            &cls::get_info_in(cls::RBD_LOCK_NAME),
        )
        .await?;
    cls::get_info_out(&b)
}

/// Takes `rbd_lock`; a lock whose owner is dead is broken the way librbd's
/// managed_lock::BreakRequest does it: the owner must have no watch left on the header
/// (a watch that does not answer is waited for, up to [`lock_wait`], until the OSD drops
/// it), then its address is blocklisted, so that nothing it still sends (requests queued
/// in a stopped process) can land after ours, and only then is the lock broken. An owner
/// that answers is alive: the open is refused ("in use"), unless `ask` (taking the lock
/// back after a hand-over, until the deadline): then it is asked to release the lock, as
/// librbd's requester asks (RequestLock), and we wait for its ReleasedLock.
///
/// With `defer`, a live exclusive owner is left with the lock: `Ok(false)` (not taken).
async fn take_lock(inner: &Inner, cookie: &str, ask: Option<Ask>, defer: bool) -> Result<bool> {
    let spec = &inner.spec;
    let busy_errno = |e: &Error| matches!(errno_of(e), Some(EBUSY) | Some(EEXIST));
    let ctx = |e: Error| e.context(format!("locking image {spec}"));
    let mut round = 0;
    // Rounds: each after breaking a stale lock (or after a racing release); asking a
    // live owner is bounded by the deadline instead.
    'rounds: while round < 3 {
        round += 1;
        match try_lock(inner, cookie).await {
            Ok(()) => return Ok(true),
            Err(e) if busy_errno(&e) => {}
            Err(e) => return Err(ctx(e)),
        }
        let info = get_lock_info(inner).await.map_err(ctx)?;
        if info.lockers.is_empty() {
            continue;
        }
        let known = (info.kind == cls::LOCK_EXCLUSIVE && info.tag == cls::RBD_LOCK_TAG)
            || (info.kind == cls::LOCK_SHARED && info.tag == cls::SHARED_LOCK_TAG);
        if !known {
            return Err(Error::new(
                ErrorKind::Busy,
                format!(
                    "image {spec} is locked by {} (tag {:?}): not a lock of librbd or rados-nbd, refusing",
                    info.lockers[0], info.tag
                ),
            ));
        }
        let held = if info.kind == cls::LOCK_SHARED {
            "shared-write (rados-nbd)"
        } else {
            "exclusive"
        };
        let mut handles = Vec::new();
        for locker in &info.lockers {
            let handle = cls::parse_lock_cookie(&locker.cookie).ok_or_else(|| {
                Error::new(
                    ErrorKind::Busy,
                    format!(
                        "image {spec} is locked by {locker}, which is not a librbd lock cookie"
                    ),
                )
            })?;
            handles.push((u64::try_from(locker.entity_num).unwrap_or(u64::MAX), handle));
        }
        // Who still watches the header? A notify reaches every registered watch: an owner
        // that acks is alive; one listed as timed out still has a watch but is silent
        // (killed, stopped, cut off): wait for the OSD to drop it, re-checking.
        let mut waited: Option<(std::time::Instant, std::time::Duration)> = None;
        let mut notify_ms = NOTIFY_TIMEOUT_MS;
        loop {
            let watchers = inner
                .meta
                .notify(&inner.hdr_oid, &cls::header_update_notify(), notify_ms)
                .await
                .map_err(ctx)?;
            let mut silent = None;
            let mut alive = None;
            for (locker, &(gid, handle)) in info.lockers.iter().zip(&handles) {
                if watchers.acks.iter().any(|a| a.0 == gid && a.1 == handle) {
                    if ask.is_some() && info.kind == cls::LOCK_EXCLUSIVE {
                        alive = Some(locker);
                        break;
                    }
                    if defer && info.kind == cls::LOCK_EXCLUSIVE {
                        tracing::info!(image = %spec, %locker,
                            "the exclusive lock is held by {locker}, which is alive: serving without \
                             it, as librbd opens an image in use (reads go without the lock, the \
                             first write asks {locker} for it)");
                        return Ok(false);
                    }
                    return Err(Error::new(
                        ErrorKind::Busy,
                        format!(
                            "image {spec} is in use: {held} lock held by {locker}, which is alive"
                        ),
                    ));
                }
                if watchers
                    .timeouts
                    .iter()
                    .any(|t| t.0 == gid && t.1 == handle)
                {
                    silent = Some(locker);
                }
            }
            if let (Some(locker), Some(ask)) = (alive, ask) {
                ask_for_lock(inner, locker, ask).await?;
                round = 0;
                continue 'rounds;
            }
            let Some(locker) = silent else { break };
            let addr = locker.address.as_deref().unwrap_or("unknown address");
            match waited {
                None => {
                    let wait = lock_wait();
                    tracing::info!(image = %spec, %locker, address = addr,
                        "{held} lock held by a client whose watch is still registered but does not answer \
                         (killed or stopped); waiting up to {} s for the OSD to drop its watch \
                         (osd_client_watch_timeout), then fencing it", wait.as_secs());
                    waited = Some((std::time::Instant::now(), wait));
                }
                Some((t0, wait)) if t0.elapsed() >= wait => {
                    return Err(Error::new(
                        ErrorKind::Busy,
                        format!(
                            "image {spec} is in use: {held} lock held by {locker} at {addr}, whose watch is \
                             still registered after {} s but does not answer (a dead client whose \
                             watch outlives osd_client_watch_timeout, or a stopped one); retry later \
                             (RADOS_NBD_LOCK_WAIT_SECS sets the wait)",
                            wait.as_secs()
                        ),
                    ));
                }
                Some(_) => {}
            }
            tokio::time::sleep(LOCK_RECHECK_PAUSE).await;
            notify_ms = LOCK_RECHECK_NOTIFY_MS;
        }
        if let Some((t0, _)) = waited {
            tracing::info!(image = %spec, "the silent owner's watch is gone after {:.1} s", t0.elapsed().as_secs_f64());
            // The lock may have changed hands meanwhile: only break what was checked.
            let now = get_lock_info(inner).await.map_err(ctx)?;
            if now.lockers != info.lockers {
                continue;
            }
        }
        for locker in &info.lockers {
            fence_and_break(inner, locker, held).await?;
        }
    }
    Err(Error::new(
        ErrorKind::Busy,
        format!("image {spec}: could not take the exclusive lock (another client keeps taking it)"),
    ))
}

/// Taking the lock back after a hand-over: our watch (whose handle names us in the
/// request) and how long a live owner may take to let go.
#[derive(Debug, Clone, Copy)]
struct Ask {
    handle: u64,
    deadline: std::time::Instant,
}

/// How often a live owner is asked again while we wait for its ReleasedLock (librbd's
/// requester retries the same way when the notification does not come).
const ASK_AGAIN: std::time::Duration = std::time::Duration::from_millis(1000);

/// Asks the live owner `locker` to release the lock (RequestLock, not forced) and waits
/// for its ReleasedLock, or `ASK_AGAIN`; the caller then tries to lock again. An owner
/// that refuses (rbd-nbd or rados-nbd `--exclusive`) ends it with an error, as does
/// the deadline.
async fn ask_for_lock(inner: &Inner, locker: &cls::Locker, ask: Ask) -> Result<()> {
    let spec = &inner.spec;
    if std::time::Instant::now() >= ask.deadline {
        return Err(Error::new(
            ErrorKind::Busy,
            format!(
                "image {spec}: {locker} did not hand the exclusive lock back in time                  (RADOS_NBD_LOCK_WAIT_SECS sets the wait); the request fails, the next one asks again"
            ),
        ));
    }
    let freed = inner.lock_freed.notified();
    tokio::pin!(freed);
    // Registered before asking, so a ReleasedLock that comes quickly is not missed.
    freed.as_mut().enable();
    let gid = inner.meta.cluster().instance_id();
    let reply = inner
        .meta
        .notify(
            &inner.hdr_oid,
            &cls::lock_request_notify(gid, ask.handle, false),
            NOTIFY_TIMEOUT_MS,
        )
        .await
        .map_err(|e| e.context(format!("asking {locker} for the lock of image {spec}")))?;
    // Only the owner's answer counts (other watchers ack empty, or, holding no lock, must
    // not be taken for it).
    let owner = u64::try_from(locker.entity_num).ok();
    let answer = reply
        .acks
        .iter()
        .filter(|a| Some(a.0) == owner && cls::parse_lock_cookie(&locker.cookie) == Some(a.1))
        .find_map(|a| cls::response_result(&a.2).ok().flatten());
    if let Some(r) = answer.filter(|&r| r < 0) {
        return Err(Error::new(
            ErrorKind::Busy,
            format!(
                "image {spec}: {locker} refuses to hand the exclusive lock over (errno {}: it                  serves the image with --exclusive, as rbd-nbd --exclusive does); I/O through                  this handle fails until it lets go",
                -r
            ),
        ));
    }
    tracing::info!(image = %spec, %locker, "asked the lock owner to hand the exclusive lock over");
    let wait = ask
        .deadline
        .saturating_duration_since(std::time::Instant::now())
        .min(ASK_AGAIN);
    tokio::select! {
        _ = &mut freed => {}
        _ = tokio::time::sleep(wait) => {}
    }
    Ok(())
}

/// Another client asked for the lock and we hand it over: the image layer holds new
/// requests, drains, writes the map, clears the flag and calls `release_lock`.
fn hand_over(inner: &Inner, who: String) {
    let tx = inner
        .owner_tx
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let Some(tx) = tx else { return };
    tracing::info!(image = %inner.spec, "{who} asks for the exclusive lock: handing it over");
    // The image layer logs a failure; nobody waits for the outcome here.
    let (done, _) = tokio::sync::oneshot::channel();
    let _ = tx.send(OwnerRequest::new(OwnerAction::ReleaseLock, done));
}

/// Releases the lock for another client (librbd's ReleaseRequest: unlock, then
/// ReleasedLock to every watcher), keeping our watch: requests for the owner are then
/// answered by the new owner, and we hear when it lets go.
pub(super) async fn release_lock(inner: &Arc<Inner>) -> Result<()> {
    let spec = &inner.spec;
    let guard = inner.lock.lock().await;
    let Some(state) = guard.as_ref() else {
        return Err(Error::new(ErrorKind::Io, format!("image {spec} is closed")));
    };
    if inner.is_fenced() {
        return Err(inner.fenced_error());
    }
    inner.released.store(true, Ordering::SeqCst);
    let unlocked = inner
        .meta
        .exec_write(
            &inner.hdr_oid,
            LOCK,
            "unlock",
            &cls::unlock_in(cls::RBD_LOCK_NAME, &state.cookie),
        )
        .await;
    if let Err(e) = unlocked {
        inner.released.store(false, Ordering::SeqCst);
        if lock_definitely_lost(&e) {
            inner.fence(&format!(
                "the lock was not ours any more when handing it over ({e})"
            ));
        }
        return Err(e.context(format!("releasing the exclusive lock of image {spec}")));
    }
    let gid = inner.meta.cluster().instance_id();
    let msg = cls::lock_notify(cls::NOTIFY_OP_RELEASED_LOCK, gid, state.watch.cookie);
    drop(guard);
    let _ = inner.meta.notify(&inner.hdr_oid, &msg, 1000).await;
    tracing::info!(image = %spec, "released the exclusive lock for another client");
    Ok(())
}

/// Takes the lock back after `release_lock`: locks again, asking a live owner to let go
/// (bounded by [`lock_wait`]); a dead one is fenced and broken as at open. Then tells the
/// other watchers, as after the first acquire.
pub(super) async fn reacquire_lock(inner: &Arc<Inner>) -> Result<()> {
    let spec = &inner.spec;
    if !inner.released.load(Ordering::SeqCst) {
        return Ok(());
    }
    if inner.is_fenced() {
        return Err(inner.fenced_error());
    }
    // A lost watch being re-registered: locked once it is, under its cookie (a lock
    // taken under the dead watch's would have the next requester take us for dead);
    // librbd too waits for its watch before it acquires.
    inner.rewatched().await;
    if inner.reacquiring.load(Ordering::SeqCst) {
        return Err(Error::new(
            ErrorKind::Io,
            format!("image {spec}: the header watch is not re-registered yet; lock not taken back"),
        ));
    }
    // Held until the lock is ours under the cookie read here: a watch re-registered
    // meanwhile (`rewatch`) would otherwise leave us locking under the old watch's cookie,
    // and a later requester would take us for dead. `rewatch` waits, then moves the lock
    // to its new cookie as usual.
    let g = inner.lock.lock().await;
    let Some(st) = g.as_ref() else {
        return Err(Error::new(ErrorKind::Io, format!("image {spec} is closed")));
    };
    let (cookie, handle) = (st.cookie.clone(), st.watch.cookie);
    let ask = Ask {
        handle,
        deadline: std::time::Instant::now() + lock_wait(),
    };
    take_lock(inner, &cookie, Some(ask), false).await?;
    inner.released.store(false, Ordering::SeqCst);
    drop(g);
    let gid = inner.meta.cluster().instance_id();
    let msg = cls::lock_notify(cls::NOTIFY_OP_ACQUIRED_LOCK, gid, handle);
    let _ = inner.meta.notify(&inner.hdr_oid, &msg, 1000).await;
    tracing::info!(image = %spec, "took the exclusive lock back");
    Ok(())
}

/// Blocklists a dead lock owner's address, then breaks its lock (librbd's BreakRequest
/// with `rbd_blocklist_on_break_lock`, expiry `rbd_blocklist_expire_seconds` = 0: the
/// cluster's default).
async fn fence_and_break(inner: &Inner, locker: &cls::Locker, held: &str) -> Result<()> {
    let spec = &inner.spec;
    let Some(addr) = locker.address.as_deref() else {
        return Err(Error::new(
            ErrorKind::Busy,
            format!(
                "image {spec}: the {held} lock of {locker} records no address, so its owner cannot be \
                 fenced; if it is surely dead, remove the lock with `rbd lock rm`"
            ),
        ));
    };
    let me = inner.meta.cluster().instance_id();
    if u64::try_from(locker.entity_num) == Ok(me) {
        return Err(Error::new(
            ErrorKind::Busy,
            format!("image {spec}: the {held} lock is held by this very client ({locker}); refusing to blocklist ourselves"),
        ));
    }
    tracing::warn!(image = %spec, %locker, address = addr,
        "breaking the stale {held} lock of a dead owner: blocklisting {addr} first (fencing it off)");
    if let Err(e) = inner.meta.cluster().blocklist_add(addr, 0).await {
        let denied = matches!(errno_of(&e), Some(EPERM) | Some(EACCES));
        return Err(if denied {
            Error::new(
                ErrorKind::Busy,
                format!(
                    "image {spec}: may not blocklist the dead lock owner {locker} at {addr} before \
                     breaking its lock: the client needs the mon cap 'profile rbd' (or \
                     'allow command \"osd blocklist\" with blocklistop=add'): {e}"
                ),
            )
        } else {
            e.context(format!(
                "image {spec}: blocklisting the dead lock owner {locker} at {addr}"
            ))
        });
    }
    match inner
        .meta
        .exec_write(
            &inner.hdr_oid,
            LOCK,
            "break_lock",
            &cls::break_lock_in(cls::RBD_LOCK_NAME, locker),
        )
        .await
    {
        Ok(())
        | Err(Error {
            kind: ErrorKind::NotFound,
            ..
        }) => Ok(()),
        Err(e) => Err(e.context(format!("breaking the stale lock of image {spec}"))),
    }
}

/// Follows the header watch: refreshes on header updates, re-registers a lost watch and
/// moves the lock to the new cookie (librbd's ReacquireRequest).
async fn watch_events(
    inner: Weak<Inner>,
    mut rx: mpsc::UnboundedReceiver<WatchEvent>,
    tx: mpsc::UnboundedSender<WatchEvent>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let ev = tokio::select! {
            ev = rx.recv() => ev,
            _ = stop.changed() => None,
        };
        let Some(ev) = ev else { return };
        let Some(inner) = inner.upgrade() else { return };
        match ev {
            WatchEvent::Notify {
                notifier_id,
                data,
                ack,
            } => match cls::notify_op(&data) {
                Ok(cls::NOTIFY_OP_QUIESCE) | Ok(cls::NOTIFY_OP_UNQUIESCE) => {
                    match (cls::quiesce_request(&data), ack) {
                        (Ok((cls::NOTIFY_OP_QUIESCE, id)), Some(ack)) => {
                            super::quiesce::on_quiesce(&inner, id, ack)
                        }
                        (Ok((cls::NOTIFY_OP_UNQUIESCE, id)), _) => {
                            super::quiesce::on_unquiesce(&inner, id)
                        }
                        (Err(e), _) => {
                            tracing::warn!(image = %inner.spec, "quiesce notification from client.{notifier_id}: {e}")
                        }
                        _ => {}
                    }
                }
                // Already answered -EROFS by the replier: say who wanted the lock, so an
                // operator sees why `rbd bench` or a second opener was turned away.
                // Our own request (taking the lock back, or an open with --wait-for-lock),
                // seen once we hold the lock: nothing to hand over.
                Ok(cls::NOTIFY_OP_REQUEST_LOCK)
                    if cls::lock_request(&data)
                        .is_ok_and(|r| r.gid == inner.meta.cluster().instance_id()) => {}
                Ok(cls::NOTIFY_OP_REQUEST_LOCK)
                    if inner.hands_over.load(Ordering::SeqCst) && inner.takes_owner_requests() =>
                {
                    let who = match cls::lock_request(&data) {
                        Ok(r) => format!("client.{} (watch {})", r.gid, r.handle),
                        Err(_) => format!("client.{notifier_id}"),
                    };
                    hand_over(&inner, who);
                }
                Ok(cls::NOTIFY_OP_REQUEST_LOCK) if inner.released.load(Ordering::SeqCst) => {}
                Ok(cls::NOTIFY_OP_REQUEST_LOCK) => match cls::lock_request(&data) {
                    Ok(r) => {
                        tracing::info!(image = %inner.spec, "refused the lock to client.{} (watch {}{}): rados-nbd keeps its exclusive lock while serving",
                            r.gid, r.handle, if r.force { ", forced request" } else { "" })
                    }
                    Err(e) => {
                        tracing::warn!(image = %inner.spec, "lock request from client.{notifier_id}: {e}")
                    }
                },
                Ok(op) if cls::notify_wants_owner_reply(op) && inner.takes_owner_requests() => {
                    match owner_msgs::owner_msg(&data) {
                        Ok(Some(msg)) => start_owner_op(&inner, msg, notifier_id),
                        Ok(None) => {
                            tracing::info!(image = %inner.spec, "refused request (op {op}) from client.{notifier_id}: not done by rados-nbd")
                        }
                        Err(e) => {
                            tracing::warn!(image = %inner.spec, "request from client.{notifier_id}: {e}")
                        }
                    }
                    tracing::debug!(image = %inner.spec, "request payload from client.{notifier_id}: {}", hex(&data));
                }
                Ok(cls::NOTIFY_OP_HEADER_UPDATE) => match inner.fresh().await {
                    Ok(()) => {}
                    Err(e) => {
                        tracing::warn!(image = %inner.spec, "refreshing header after an update notification: {e}");
                    }
                },
                Ok(op) if cls::notify_wants_owner_reply(op) => {
                    tracing::info!(image = %inner.spec, "refused request (op {op}) from client.{notifier_id}: the lock is held exclusively");
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(image = %inner.spec, "undecodable header notification: {e}")
                }
            },
            WatchEvent::Error { cookie, err } => {
                if inner.is_fenced() {
                    return;
                }
                if -err == rados::EBLOCKLISTED {
                    inner.fence("blocklisted by the cluster");
                    return;
                }
                tracing::warn!(image = %inner.spec, "header watch {cookie} lost (errno {}); re-registering", -err);
                inner.reacquiring.store(true, Ordering::SeqCst);
                let mut delay = std::time::Duration::from_millis(500);
                loop {
                    match rewatch(&inner, tx.clone()).await {
                        Ok(()) => {
                            tracing::info!(image = %inner.spec, "header watch re-registered; exclusive lock re-asserted");
                            // Updates announced while the watch was down never reached
                            // us: read the header as if one had (librbd refreshes after a
                            // re-watch too), before the next write.
                            inner.updates_announced.fetch_add(1, Ordering::AcqRel);
                            if let Err(e) = inner.fresh().await {
                                tracing::warn!(image = %inner.spec, "refreshing header after the re-watch: {e}");
                            }
                            break;
                        }
                        Err(e) if is_blocklisted(&e) => {
                            inner.fence("blocklisted by the cluster");
                            inner.reacquiring.store(false, Ordering::SeqCst);
                            inner.reacquired.notify_waiters();
                            return;
                        }
                        // The lock is no longer ours (broken by another client, or the
                        // image is gone): never send anything again through this handle.
                        Err(e) if lock_definitely_lost(&e) => {
                            let why = match get_lock_info(&inner).await {
                                Ok(i) if !i.lockers.is_empty() => {
                                    let l = &i.lockers[0];
                                    format!("lock broken, now held by {l}")
                                }
                                Ok(_) => format!("lock broken by another client ({e})"),
                                Err(_) => e.to_string(),
                            };
                            inner.fence(&why);
                            inner.reacquiring.store(false, Ordering::SeqCst);
                            inner.reacquired.notify_waiters();
                            return;
                        }
                        // Unreachable OSD, timeouts: keep trying; writes wait (for a
                        // while, then fail with EIO).
                        Err(e) => {
                            tracing::warn!(image = %inner.spec, "re-registering the header watch: {e}; retrying in {delay:?}");
                            tokio::select! {
                                _ = tokio::time::sleep(delay) => {}
                                _ = stop.changed() => {
                                    // Closing: waiting writes find it so at once.
                                    inner.reacquired.notify_waiters();
                                    return;
                                }
                            }
                            delay = (delay * 2).min(std::time::Duration::from_secs(5));
                        }
                    }
                }
                inner.reacquiring.store(false, Ordering::SeqCst);
                inner.reacquired.notify_waiters();
            }
        }
    }
}

/// Errors after which the lock is not ours any more: cls_lock's set_cookie answers ENOENT
/// when no lock with our old cookie exists (someone broke it) and EBUSY when it cannot be
/// moved; a missing header means the image was removed.
fn lock_definitely_lost(e: &Error) -> bool {
    matches!(
        e.kind,
        ErrorKind::NotFound | ErrorKind::Busy | ErrorKind::AlreadyExists
    )
}

async fn rewatch(inner: &Arc<Inner>, tx: mpsc::UnboundedSender<WatchEvent>) -> Result<()> {
    let mut guard = inner.lock.lock().await;
    let Some(state) = guard.as_mut() else {
        return Ok(());
    };
    let new = inner.meta.watch(&inner.hdr_oid, replier(inner), tx).await?;
    let new_cookie = cls::lock_cookie(new.cookie);
    let (kind, tag) = lock_kind(inner.mode);
    let input = cls::set_cookie_in(cls::RBD_LOCK_NAME, kind, &state.cookie, tag, &new_cookie);
    let old = std::mem::replace(&mut state.watch, new);
    let _ = inner.meta.unwatch(old).await;
    // Handed over: the lock is another client's, there is nothing to move.
    let owner = !inner.released.load(Ordering::SeqCst);
    if owner {
        inner
            .meta
            .exec_write(&inner.hdr_oid, LOCK, "set_cookie", &input)
            .await?;
    }
    state.cookie = new_cookie;
    let handle = state.watch.cookie;
    drop(guard);
    if owner && inner.mode == OpenMode::ReadWrite {
        // The owner's new watch handle, announced as librbd's owner does after a re-watch
        // (post_reacquire_lock_handler): waiting clients track the owner by it.
        let gid = inner.meta.cluster().instance_id();
        let msg = cls::lock_notify(cls::NOTIFY_OP_ACQUIRED_LOCK, gid, handle);
        let _ = inner.meta.notify(&inner.hdr_oid, &msg, 1000).await;
    }
    Ok(())
}

impl Inner {
    pub(super) fn is_fenced(&self) -> bool {
        self.lost_lock.load(Ordering::SeqCst)
    }

    /// The lock is not ours any more (broken by another client, which blocklisted us or
    /// not): from now on nothing is sent to the cluster through this handle and every read
    /// and write fails with EIO, so that nothing lands over the new owner's writes and no
    /// client reads data the new owner is changing. Logged once, whoever notices first.
    pub(super) fn fence(&self, why: &str) {
        if !self.lost_lock.swap(true, Ordering::SeqCst) {
            tracing::error!(image = %self.spec, "lost the {} ({why}): nothing more is sent to the cluster; \
                reads and writes now fail with EIO", lock_name(self.mode));
        }
    }

    /// Passes `r` on, fencing the handle first when it says we are blocklisted (librados
    /// fails every operation of a blocklisted client with ESHUTDOWN).
    pub(super) fn noting_fence<T>(&self, r: Result<T>) -> Result<T> {
        if let Err(e) = &r {
            if is_blocklisted(e) {
                self.fence("blocklisted by the cluster");
            }
        }
        r
    }

    pub(super) fn fenced_error(&self) -> Error {
        Error::new(
            ErrorKind::Io,
            format!(
                "image {}: the {} was lost (fenced by another client); I/O refused",
                self.spec,
                lock_name(self.mode)
            ),
        )
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_replies() {
        for role in [Role::Closed, Role::Owner] {
            assert_eq!(
                owner_reply(
                    &cls::lock_notify(cls::NOTIFY_OP_REQUEST_LOCK, 1, 2),
                    role,
                    |_| None
                ),
                cls::response_message(-30),
                "the lock is never handed over"
            );
            assert_eq!(
                owner_reply(&cls::lock_request_notify(1, 2, true), role, |_| None),
                cls::response_message(-30),
                "not even a forced request"
            );
            assert!(owner_reply(&cls::header_update_notify(), role, |_| None).is_empty());
            assert!(owner_reply(&[], role, |_| None).is_empty());
        }
        let id = cls::AsyncRequestId {
            gid: 1,
            handle: 2,
            request_id: 3,
        };
        let resize = cls::resize_notify(1 << 30, id, false);
        assert_eq!(
            owner_reply(&resize, Role::Owner, |_| None),
            cls::response_message(0),
            "accepted; AsyncComplete follows"
        );
        assert_eq!(
            owner_reply(&resize, Role::Closed, |_| None),
            cls::response_message(-30)
        );
        assert_ne!(
            owner_reply(&resize[..resize.len() - 3], Role::Owner, |_| None),
            cls::response_message(0),
            "an undecodable resize is never accepted"
        );
    }

    #[test]
    fn owner_requests_acked_as_librbd_does() {
        let id = cls::AsyncRequestId {
            gid: 7,
            handle: 8,
            request_id: 9,
        };
        let msg = |op: u32, body: &dyn Fn(&mut cls::Enc)| {
            let mut e = cls::Enc::new();
            let at = e.start(7, 1);
            e.u32(op);
            body(&mut e);
            e.finish(at).done()
        };
        let user_snap = |name: &'static str| {
            move |e: &mut cls::Enc| {
                e.str(name);
                let ns = e.start(1, 1);
                e.u32(0).finish(ns);
                e.u64(7).u64(8).u64(9);
            }
        };
        let rm = msg(owner_msgs::NOTIFY_OP_SNAP_REMOVE, &user_snap("s"));
        // New: accepted (AsyncComplete follows); asked again once done: its result.
        assert_eq!(
            owner_reply(&rm, Role::Owner, |_| None),
            cls::response_message(0)
        );
        assert_eq!(
            owner_reply(&rm, Role::Owner, |i| (*i == id).then_some(-2)),
            cls::response_message(-2)
        );
        assert_eq!(
            owner_reply(&rm, Role::Closed, |_| None),
            cls::response_message(-30)
        );
        let flatten = msg(owner_msgs::NOTIFY_OP_FLATTEN, &|e| {
            e.u64(7).u64(8).u64(9);
        });
        assert_eq!(
            owner_reply(&flatten, Role::Owner, |_| None),
            cls::response_message(0)
        );
        // Feature changes: those of the map are done; others refused at once, EBUSY.
        let features = msg(owner_msgs::NOTIFY_OP_UPDATE_FEATURES, &|e| {
            e.u64(0x10).u8(0).u64(7).u64(8).u64(9);
        });
        assert_eq!(
            owner_reply(&features, Role::Owner, |_| None),
            cls::response_message(0)
        );
        let lock_off = msg(owner_msgs::NOTIFY_OP_UPDATE_FEATURES, &|e| {
            e.u64(0x4).u8(0).u64(7).u64(8).u64(9);
        });
        assert_eq!(
            owner_reply(&lock_off, Role::Owner, |_| None),
            cls::response_message(0),
            "exclusive-lock off is the image layer's to do (or refuse)"
        );
        let journal_on = msg(owner_msgs::NOTIFY_OP_UPDATE_FEATURES, &|e| {
            e.u64(0x40).u8(1).u64(7).u64(8).u64(9);
        });
        assert_eq!(
            owner_reply(&journal_on, Role::Owner, |_| None),
            cls::response_message(-16)
        );
        let sparsify = msg(owner_msgs::NOTIFY_OP_SPARSIFY, &|e| {
            e.u64(7).u64(8).u64(9).u64(4096);
        });
        assert_eq!(
            owner_reply(&sparsify, Role::Owner, |_| None),
            cls::response_message(0),
            "sparsify is done by the owner"
        );
        let bad = msg(owner_msgs::NOTIFY_OP_SPARSIFY, &|e| {
            e.u64(7).u64(8).u64(9).u64(1000);
        });
        assert_eq!(
            owner_reply(&bad, Role::Owner, |_| None),
            cls::response_message(-22),
            "a sparse size librbd itself would refuse"
        );
        // A group snapshot: taken (its part of `rbd group snap`), a mirror one too; a
        // namespace we do not know: refused.
        let group = msg(owner_msgs::NOTIFY_OP_SNAP_CREATE, &|e| {
            e.str("g");
            let ns = e.start(1, 1);
            e.u32(1).i64(1).str("a").str("b").finish(ns);
            e.u64(7).u64(8).u64(9).u64(0);
        });
        assert_eq!(
            owner_reply(&group, Role::Owner, |_| None),
            cls::response_message(0)
        );
        let mirror = msg(owner_msgs::NOTIFY_OP_SNAP_CREATE, &|e| {
            e.str("m");
            let ns = e.start(1, 1);
            e.u32(3)
                .u8(0)
                .u32(0)
                .str("")
                .u64(0)
                .u8(0)
                .u64(0)
                .u64(0)
                .finish(ns);
            e.u64(7).u64(8).u64(9).u64(0);
        });
        assert_eq!(
            owner_reply(&mirror, Role::Owner, |_| None),
            cls::response_message(0)
        );
        let unknown_ns = msg(owner_msgs::NOTIFY_OP_SNAP_CREATE, &|e| {
            e.str("u");
            let ns = e.start(1, 1);
            e.u32(9).finish(ns);
            e.u64(7).u64(8).u64(9).u64(0);
        });
        assert_eq!(
            owner_reply(&unknown_ns, Role::Owner, |_| None),
            cls::response_message(-16)
        );
        // An op we do not know, addressed to the owner: refused keeping the lock
        // (`--exclusive`); otherwise EOPNOTSUPP, as librbd's owner: the asker then asks
        // for the lock, which we hand over, and does it itself.
        let unknown = msg(16, &|e| {
            e.u64(7).u64(8).u64(9);
        });
        assert_eq!(
            owner_reply(&unknown, Role::Owner, |_| None),
            cls::response_message(-30)
        );
        assert_eq!(
            owner_reply(&unknown, Role::OwnerHandsOver, |_| None),
            cls::response_message(-95)
        );
        // `rbd rename` (librbd 16.2 asks the owner, journaling or not): done by the
        // owner, whether it hands the lock over or keeps it; not by one that is not.
        let rename = msg(owner_msgs::NOTIFY_OP_RENAME, &|e| {
            e.str("new-name").u64(7).u64(8).u64(9);
        });
        for role in [Role::Owner, Role::OwnerHandsOver] {
            assert_eq!(
                owner_reply(&rename, role, |_| None),
                cls::response_message(0)
            );
        }
        assert_eq!(
            owner_reply(&rename, Role::Closed, |_| None),
            cls::response_message(-30)
        );
        // `rbd image-meta set k v` (librbd 16.2's MetadataUpdate): done by the owner.
        let meta = msg(owner_msgs::NOTIFY_OP_METADATA_UPDATE, &|e| {
            e.str("k").u8(1).str("v").u64(7).u64(8).u64(9);
        });
        assert_eq!(
            owner_reply(&meta, Role::OwnerHandsOver, |_| None),
            cls::response_message(0)
        );
    }

    #[test]
    fn lock_requests_answered_by_role() {
        let req = cls::lock_request_notify(4123, 7, false);
        let reply = |role| reply_to_notify(1, &req, role, false, |_| None);
        assert_eq!(
            reply(Role::OwnerHandsOver),
            Reply::Now(cls::response_message(0)),
            "accepted, then released (librbd's automatic policy)"
        );
        assert_eq!(
            reply(Role::Owner),
            Reply::Now(cls::response_message(-30)),
            "--exclusive: refused with EROFS, as rbd-nbd --exclusive"
        );
        assert_eq!(
            reply(Role::Closed),
            Reply::Now(cls::response_message(-30)),
            "a shared writer never hands its lock over"
        );
        assert_eq!(
            reply(Role::Busy),
            Reply::Now(cls::response_message(0)),
            "closing (or not serving yet): the asker waits for ReleasedLock or asks again"
        );
        assert_eq!(
            reply(Role::NotOwner),
            Reply::Now(Vec::new()),
            "handed over: the new owner answers, we ack empty"
        );
        // Requests for the owner while another client owns the lock: not ours to answer.
        let snap = snap_create_request();
        assert_eq!(
            reply_to_notify(1, &snap, Role::NotOwner, false, |_| None),
            Reply::Now(Vec::new())
        );
        assert_eq!(
            reply_to_notify(1, &snap, Role::OwnerHandsOver, false, |_| None),
            Reply::Now(cls::response_message(0))
        );
        assert_eq!(
            reply_to_notify(1, &snap, Role::Busy, false, |_| None),
            Reply::Now(Vec::new()),
            "closing: no owner answers, so librbd's asker sends it again (not an error)"
        );
    }

    const REQ_ID: cls::AsyncRequestId = cls::AsyncRequestId {
        gid: 1,
        handle: 2,
        request_id: 3,
    };

    /// A librbd SnapCreate request for the owner (id REQ_ID), as `rbd snap create` sends it.
    fn snap_create_request() -> Vec<u8> {
        let id = REQ_ID;
        let action = crate::store::OwnerAction::SnapCreate {
            name: "s1".into(),
            quiesce: crate::store::QuiesceMode::Run,
        };
        owner_msgs::request_for(id, &action).expect("an async request")
    }

    #[test]
    fn quiesce_replies() {
        let id = REQ_ID;
        let now = Reply::Now;
        let snap = snap_create_request();
        assert_eq!(
            reply_to_notify(1, &snap, Role::Owner, false, |_| None),
            now(cls::response_message(0)),
            "a snapshot is taken by the owner"
        );
        assert_eq!(
            reply_to_notify(1, &snap, Role::Closed, true, |_| None),
            now(cls::response_message(-30))
        );
        let q = cls::quiesce_notify(cls::NOTIFY_OP_QUIESCE, id);
        let u = cls::quiesce_notify(cls::NOTIFY_OP_UNQUIESCE, id);
        for role in [
            Role::Closed,
            Role::Busy,
            Role::Owner,
            Role::OwnerHandsOver,
            Role::NotOwner,
        ] {
            assert_eq!(
                reply_to_notify(1, &q, role, false, |_| None),
                now(Vec::new()),
                "no hook: nothing to quiesce, which librbd counts as done"
            );
            assert_eq!(
                reply_to_notify(1, &q, role, true, |_| None),
                Reply::Later,
                "acked after the hook"
            );
            for defers in [false, true] {
                assert_eq!(
                    reply_to_notify(1, &u, role, defers, |_| None),
                    now(Vec::new())
                );
            }
        }
    }
}
