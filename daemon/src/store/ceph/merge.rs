//! Writes to an object that arrive while another write to it is in flight wait, and go
//! out together as one RADOS operation when it completes: what librbd's default I/O
//! scheduler does (`rbd_io_scheduler = simple`, SimpleSchedulerObjectDispatch), and read
//! from the same Ceph option, so an image served by us and by librbd sees the same
//! operations for the same requests.
//!
//! Why: every OSD operation costs the client's messenger, the network and the OSD some
//! fixed work. Sequential 1 MiB writes into 4 MiB objects at queue depth 8 become 0.6
//! operations per MiB instead of 1.0, which in the emulated test guest was the whole of
//! rbd-nbd's lead on 1 MiB writes (bench/kernel-notes.md, section 7). It is not free: a
//! held write waits for the one before it (on the loopback cluster, where an operation is
//! cheap, merging cost 14-17% on that job), so `rbd_io_scheduler = none` turns it off, as
//! for librbd.
//!
//! Rules (librbd's):
//! - A write is held only behind a write to the same object that is in flight, and only
//!   if it overlaps none of the writes already held there; held writes are answered when
//!   the operation carrying them completes (never earlier: an acknowledged write is on
//!   the OSDs).
//! - Order: RADOS applies one client's operations on an object in the order they were
//!   handed to librados, so every operation here is handed over while the lock of the
//!   object's stripe of the table is held, and what was held always goes before any
//!   later write to the object: a write that overlaps a held one sends the held ones
//!   first, then itself; any other change to the object (`release`) and a flush
//!   (`release_all`) send them first too.
//! - librbd also sends held writes early, at half the recent write latency; here they
//!   wait for the write in flight, at most one operation's latency.
//!
//! The table is cut in stripes by object number, each with its own lock: only one
//! object's operations need an order, and handing an operation to librados can block
//! (its in-flight throttle, `objecter_inflight_ops` / `_op_bytes`); under one lock for
//! the whole image, that would stall every writer of the image, not only the writers of
//! objects sharing the stripe.

use crate::error::{Error, ErrorKind, Result};
use bytes::Bytes;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// How many locks the object table is cut into (see the module's comment).
const STRIPES: usize = 64;

/// One stripe of the object table: object number → writes held behind the one in flight.
type Table = HashMap<u64, Vec<Held>>;
use tokio::sync::oneshot;

/// A started write's completion.
pub(super) type Pending = Pin<Box<dyn Future<Output = Result<()>> + Send>>;

/// Hands librados, before returning, one operation writing `extents` (sorted by offset,
/// not overlapping) of object `objno`, and returns its completion.
pub(super) type Submit = Box<dyn Fn(u64, Vec<(u64, Bytes)>) -> Result<Pending> + Send + Sync>;

struct Held {
    off: u64,
    data: Bytes,
    tx: oneshot::Sender<Result<()>>,
}

impl Held {
    fn end(&self) -> u64 {
        self.off + self.data.len() as u64
    }
}

pub(super) struct Merger {
    on: bool,
    submit: Submit,
    /// An object is here while a write to it that may have writes held behind it is in
    /// flight; its Vec holds them, in the order they came. Object `n` is in stripe
    /// `n % STRIPES`.
    objects: Box<[Mutex<Table>]>,
    /// Writes that were held, and the operations that carried them.
    held_writes: AtomicU64,
    merged_ops: AtomicU64,
}

/// Dropped when the write in flight on an object completes (or its request is given
/// up): sends what is held behind it, or forgets the object when nothing is.
struct Drain {
    m: Arc<Merger>,
    objno: u64,
}

impl Drop for Drain {
    fn drop(&mut self) {
        let mut objects = self.m.lock(self.objno);
        let Some(held) = objects.get_mut(&self.objno) else {
            return;
        };
        abandon(held);
        if held.is_empty() {
            objects.remove(&self.objno);
            return;
        }
        let batch = std::mem::take(held);
        // That batch is now the write in flight on the object.
        let sent = self.m.send_locked(&objects, self.objno, batch, true);
        drop(objects);
        if let Some(sent) = sent {
            sent.start();
        }
    }
}

/// A stripe of the table, locked (a panic under it leaves the table as it was: each
/// change under the lock is one step).
fn lock_stripe(stripe: &Mutex<Table>) -> MutexGuard<'_, Table> {
    stripe.lock().unwrap_or_else(|p| p.into_inner())
}

/// Drops the held writes whose requests gave up on them (their futures were dropped: a
/// request answered with another piece's error, a client gone): never sent, since a
/// write landing after its request was answered could land after the lock went to
/// another client, outside everything a hand-over or a close waits for.
fn abandon(batch: &mut Vec<Held>) {
    batch.retain(|h| !h.tx.is_closed());
}

impl Merger {
    /// `on`: merge (librbd's `rbd_io_scheduler = simple`); otherwise every write is sent
    /// at once on its own.
    pub(super) fn new(on: bool, submit: Submit) -> Arc<Self> {
        Arc::new(Merger {
            on,
            submit,
            objects: (0..STRIPES).map(|_| Mutex::new(HashMap::new())).collect(),
            held_writes: AtomicU64::new(0),
            merged_ops: AtomicU64::new(0),
        })
    }

    /// Whether no object has a write in flight that writes could be held behind.
    #[cfg(test)]
    fn idle(&self) -> bool {
        self.objects.iter().all(|s| lock_stripe(s).is_empty())
    }

    /// The stripe of the table that holds object `objno`, locked.
    fn lock(&self, objno: u64) -> MutexGuard<'_, Table> {
        lock_stripe(&self.objects[(objno % STRIPES as u64) as usize])
    }

    /// (writes that were held, operations that carried them): held - ops = operations saved.
    pub(super) fn counts(&self) -> (u64, u64) {
        (
            self.held_writes.load(Ordering::Relaxed),
            self.merged_ops.load(Ordering::Relaxed),
        )
    }

    /// Writes `data` at `off` of object `objno`: at once, or held behind the write in
    /// flight there (see the module's rules). Returns when it is on the OSDs.
    pub(super) async fn write(self: &Arc<Self>, objno: u64, off: u64, data: Bytes) -> Result<()> {
        if !self.on {
            return (self.submit)(objno, vec![(off, data)])?.await;
        }
        let end = off + data.len() as u64;
        enum Step {
            Held(oneshot::Receiver<Result<()>>),
            Sent(Result<Pending>, bool),
        }
        let mut before = None;
        let step = {
            let mut objects = self.lock(objno);
            match objects.get_mut(&objno) {
                Some(held) if !held.iter().any(|h| h.off < end && off < h.end()) => {
                    let (tx, rx) = oneshot::channel();
                    held.push(Held { off, data, tx });
                    self.held_writes.fetch_add(1, Ordering::Relaxed);
                    Step::Held(rx)
                }
                Some(held) => {
                    // It overlaps a held write, which was asked for first: those go first.
                    let batch = std::mem::take(held);
                    before = self.send_locked(&objects, objno, batch, false);
                    Step::Sent((self.submit)(objno, vec![(off, data)]), false)
                }
                None => {
                    let p = (self.submit)(objno, vec![(off, data)]);
                    let owner = p.is_ok();
                    if owner {
                        objects.insert(objno, Vec::new());
                    }
                    Step::Sent(p, owner)
                }
            }
        };
        if let Some(sent) = before {
            sent.start();
        }
        let (pending, owner) = match step {
            Step::Held(rx) => {
                return rx.await.unwrap_or_else(|_| {
                    Err(Error::new(
                        ErrorKind::Io,
                        format!(
                            "a write to object {objno} held behind another was not \
                             answered: the daemon is shutting down (it may have been \
                             written or not)"
                        ),
                    ))
                })
            }
            Step::Sent(p, owner) => (p, owner),
        };
        let _drain = owner.then(|| Drain {
            m: self.clone(),
            objno,
        });
        pending?.await
    }

    /// Sends what is held on object `objno` now: before another change to it (a zero,
    /// a removal, a copy-up) or a read of it, as librbd does.
    pub(super) fn release(self: &Arc<Self>, objno: u64) {
        if !self.on {
            return;
        }
        let mut objects = self.lock(objno);
        let Some(held) = objects.get_mut(&objno) else {
            return;
        };
        if held.is_empty() {
            return;
        }
        let batch = std::mem::take(held);
        let sent = self.send_locked(&objects, objno, batch, false);
        drop(objects);
        if let Some(sent) = sent {
            sent.start();
        }
    }

    /// Sends everything held (a flush), stripe by stripe.
    pub(super) fn release_all(self: &Arc<Self>) {
        if !self.on {
            return;
        }
        for stripe in self.objects.iter() {
            let mut objects = lock_stripe(stripe);
            let batches: Vec<(u64, Vec<Held>)> = objects
                .iter_mut()
                .filter(|(_, h)| !h.is_empty())
                .map(|(o, h)| (*o, std::mem::take(h)))
                .collect();
            let sent: Vec<Sent> = batches
                .into_iter()
                .filter_map(|(objno, batch)| self.send_locked(&objects, objno, batch, false))
                .collect();
            drop(objects);
            for s in sent {
                s.start();
            }
        }
    }

    /// Hands `batch` to librados as one operation (the caller holds the object's stripe:
    /// that is what keeps the order); the caller lets the lock go, then `start`s what
    /// answers its writes when it completes. `owner`: the batch is the object's write in
    /// flight, so what is held behind it goes next. None: nothing left to send.
    fn send_locked(
        self: &Arc<Self>,
        _objects: &MutexGuard<'_, Table>,
        objno: u64,
        mut batch: Vec<Held>,
        owner: bool,
    ) -> Option<Sent> {
        if !owner {
            // (The owner's batch was cut in `Drain::drop`, under this same lock.)
            abandon(&mut batch);
            if batch.is_empty() {
                return None;
            }
        }
        batch.sort_by_key(|h| h.off);
        let extents = batch.iter().map(|h| (h.off, h.data.clone())).collect();
        self.merged_ops.fetch_add(1, Ordering::Relaxed);
        let pending = (self.submit)(objno, extents);
        let drain = owner.then(|| Drain {
            m: self.clone(),
            objno,
        });
        Some(Sent {
            pending,
            batch,
            drain,
        })
    }
}

/// An operation handed to librados whose writes are still to be answered: by a task
/// started (`start`) once the stripe's lock is let go, because a runtime that is shutting
/// down drops a new task at once, inside `spawn`, and with it the `Drain`, which takes
/// that lock (under it, the thread would wait for itself).
#[must_use]
struct Sent {
    pending: Result<Pending>,
    batch: Vec<Held>,
    drain: Option<Drain>,
}

impl Sent {
    fn start(self) {
        let Sent {
            pending,
            batch,
            drain,
        } = self;
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            // No runtime (the daemon is going away): the operation, if started, still
            // completes; its writes' requests are gone with the runtime. The object is
            // forgotten with it (nothing would send what is held behind).
            if let Some(d) = drain {
                std::mem::forget(d);
            }
            return;
        };
        rt.spawn(async move {
            let r = match pending {
                Ok(p) => p.await,
                Err(e) => Err(e),
            };
            for h in batch {
                let _ = h.tx.send(r.clone());
            }
            // Sends what queued behind this batch.
            drop(drain);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::time::Duration;

    /// Operations handed over: (object, [(offset, length)]).
    type Ops = Vec<(u64, Vec<(u64, usize)>)>;

    /// A fake cluster: records each operation handed to it (object, extents) in order,
    /// and completes them when told (all at once), or fails them when `fail` is set.
    #[derive(Default)]
    struct Fake {
        ops: Mutex<Ops>,
        waiting: Mutex<Vec<oneshot::Sender<()>>>,
        fail: AtomicBool,
        data: Mutex<HashMap<u64, Vec<u8>>>,
        /// (object, entered, go): handing over an operation on that object blocks (as
        /// librados does when its in-flight throttle is full): says so on `entered`,
        /// then waits for `go`.
        stall: Mutex<Option<Stall>>,
    }

    type Stall = (
        u64,
        std::sync::mpsc::Sender<()>,
        std::sync::mpsc::Receiver<()>,
    );

    impl Fake {
        fn merger(self: &Arc<Self>, on: bool) -> Arc<Merger> {
            let f = self.clone();
            Merger::new(
                on,
                Box::new(move |objno, extents: Vec<(u64, Bytes)>| {
                    let stall = {
                        let mut s = f.stall.lock().unwrap();
                        match *s {
                            Some((o, ..)) if o == objno => s.take(),
                            _ => None,
                        }
                    };
                    if let Some((_, entered, go)) = stall {
                        let _ = entered.send(());
                        let _ = go.recv();
                    }
                    f.ops
                        .lock()
                        .unwrap()
                        .push((objno, extents.iter().map(|(o, b)| (*o, b.len())).collect()));
                    // Applied in the order handed over, as RADOS does.
                    let mut d = f.data.lock().unwrap();
                    let obj = d.entry(objno).or_default();
                    for (o, b) in &extents {
                        let end = *o as usize + b.len();
                        if obj.len() < end {
                            obj.resize(end, 0);
                        }
                        obj[*o as usize..end].copy_from_slice(b);
                    }
                    let (tx, rx) = oneshot::channel::<()>();
                    f.waiting.lock().unwrap().push(tx);
                    let fail = f.fail.load(Ordering::Relaxed);
                    Ok(Box::pin(async move {
                        let _ = rx.await;
                        if fail {
                            Err(Error::new(ErrorKind::Io, "injected"))
                        } else {
                            Ok(())
                        }
                    }) as Pending)
                }),
            )
        }

        fn complete_all(&self) -> usize {
            let w: Vec<_> = std::mem::take(&mut *self.waiting.lock().unwrap());
            let n = w.len();
            for tx in w {
                let _ = tx.send(());
            }
            n
        }

        fn ops(&self) -> Ops {
            self.ops.lock().unwrap().clone()
        }
    }

    async fn settle() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    fn bytes(v: u8, n: usize) -> Bytes {
        Bytes::from(vec![v; n])
    }

    #[tokio::test]
    async fn writes_behind_one_in_flight_go_as_one_operation() {
        let f = Arc::new(Fake::default());
        let m = f.merger(true);
        let mut tasks = Vec::new();
        for i in 0..4u64 {
            let m = m.clone();
            tasks.push(tokio::spawn(async move {
                m.write(7, i * 100, bytes(i as u8 + 1, 100)).await
            }));
            settle().await;
        }
        // The first is in flight; the three behind it are held, not sent.
        assert_eq!(f.ops(), vec![(7, vec![(0, 100)])]);
        assert!(
            tasks.iter().all(|t| !t.is_finished()),
            "nothing answered yet"
        );
        assert_eq!(f.complete_all(), 1);
        settle().await;
        // The held three in one operation, contiguous, sorted.
        assert_eq!(f.ops()[1], (7, vec![(100, 100), (200, 100), (300, 100)]));
        assert!(tasks[0].is_finished());
        assert!(
            !tasks[1].is_finished(),
            "held writes wait for their own operation"
        );
        assert_eq!(f.complete_all(), 1);
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert_eq!(m.counts(), (3, 1));
        assert!(m.idle(), "the object is forgotten once idle");
    }

    #[tokio::test]
    async fn off_sends_everything_at_once() {
        let f = Arc::new(Fake::default());
        let m = f.merger(false);
        let mut tasks = Vec::new();
        for i in 0..3u64 {
            let m = m.clone();
            tasks.push(tokio::spawn(async move {
                m.write(1, i * 10, bytes(1, 10)).await
            }));
        }
        settle().await;
        assert_eq!(f.ops().len(), 3);
        f.complete_all();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert_eq!(m.counts(), (0, 0));
    }

    #[tokio::test]
    async fn an_overlapping_write_sends_the_held_ones_first() {
        let f = Arc::new(Fake::default());
        let m = f.merger(true);
        let spawn = |off: u64, v: u8, n: usize| {
            let m = m.clone();
            tokio::spawn(async move { m.write(3, off, bytes(v, n)).await })
        };
        let a = spawn(0, 1, 10);
        settle().await;
        let b = spawn(100, 2, 50); // held
        settle().await;
        let c = spawn(120, 3, 10); // overlaps b: b goes now, then c
        settle().await;
        assert_eq!(
            f.ops(),
            vec![
                (3, vec![(0, 10)]),
                (3, vec![(100, 50)]),
                (3, vec![(120, 10)])
            ]
        );
        // Applied in order: c's bytes over b's.
        let d = f.data.lock().unwrap()[&3].clone();
        assert_eq!(&d[100..120], &[2u8; 20][..]);
        assert_eq!(&d[120..130], &[3u8; 10][..]);
        assert_eq!(&d[130..150], &[2u8; 20][..]);
        f.complete_all();
        for t in [a, b, c] {
            t.await.unwrap().unwrap();
        }
        settle().await;
        assert!(m.idle());
    }

    #[tokio::test]
    async fn release_and_flush_send_what_is_held() {
        let f = Arc::new(Fake::default());
        let m = f.merger(true);
        let w = |objno: u64, off: u64| {
            let m = m.clone();
            tokio::spawn(async move { m.write(objno, off, bytes(9, 8)).await })
        };
        let t: Vec<_> = vec![w(1, 0), w(2, 0)];
        settle().await;
        let t2: Vec<_> = vec![w(1, 8), w(2, 8)];
        settle().await;
        assert_eq!(f.ops().len(), 2);
        m.release(1);
        settle().await;
        assert_eq!(f.ops()[2], (1, vec![(8, 8)]));
        m.release_all();
        settle().await;
        assert_eq!(f.ops()[3], (2, vec![(8, 8)]));
        assert_eq!(f.ops().len(), 4);
        f.complete_all();
        for x in t.into_iter().chain(t2) {
            x.await.unwrap().unwrap();
        }
        settle().await;
        assert!(m.idle());
    }

    #[tokio::test]
    async fn a_given_up_request_still_sends_what_is_held_behind_it() {
        let f = Arc::new(Fake::default());
        let m = f.merger(true);
        let m1 = m.clone();
        let first = tokio::spawn(async move { m1.write(5, 0, bytes(1, 4)).await });
        settle().await;
        let m2 = m.clone();
        let second = tokio::spawn(async move { m2.write(5, 4, bytes(2, 4)).await });
        settle().await;
        // The client went away: the first request's future is dropped mid-flight.
        first.abort();
        settle().await;
        assert_eq!(f.ops().len(), 2, "the held write went out");
        f.complete_all();
        second.await.unwrap().unwrap();
        settle().await;
        assert!(m.idle());
    }

    #[tokio::test]
    async fn a_held_write_whose_request_gave_up_is_never_sent() {
        let f = Arc::new(Fake::default());
        let m = f.merger(true);
        let first = tokio::spawn({
            let m = m.clone();
            async move { m.write(3, 0, bytes(1, 10)).await }
        });
        settle().await;
        let gone = tokio::spawn({
            let m = m.clone();
            async move { m.write(3, 100, bytes(2, 10)).await }
        });
        let kept = tokio::spawn({
            let m = m.clone();
            async move { m.write(3, 200, bytes(3, 10)).await }
        });
        settle().await;
        // Held behind the first; then one's request gives up (another piece failed).
        gone.abort();
        assert!(gone.await.unwrap_err().is_cancelled());
        assert_eq!(f.complete_all(), 1);
        settle().await;
        assert_eq!(f.ops(), vec![(3, vec![(0, 10)]), (3, vec![(200, 10)])]);
        f.complete_all();
        first.await.unwrap().unwrap();
        kept.await.unwrap().unwrap();
        // Everything given up: the object is forgotten, nothing is sent.
        let first = tokio::spawn({
            let m = m.clone();
            async move { m.write(4, 0, bytes(1, 10)).await }
        });
        settle().await;
        let gone = tokio::spawn({
            let m = m.clone();
            async move { m.write(4, 100, bytes(2, 10)).await }
        });
        settle().await;
        gone.abort();
        let _ = gone.await;
        m.release_all();
        f.complete_all();
        first.await.unwrap().unwrap();
        settle().await;
        assert_eq!(f.ops().len(), 3);
        assert!(m.idle(), "the object is forgotten once idle");
    }

    /// The runtime goes away with a write in flight and another held behind it whose
    /// request lives elsewhere: the in-flight task's `Drain` sends the held one, whose
    /// answering task the closed runtime drops at once, inside `spawn`; that must not
    /// take the stripe's lock the sender still held (the thread waited for itself).
    #[test]
    fn a_runtime_shutting_down_with_writes_held_does_not_hang() {
        let f = Arc::new(Fake::default());
        let m = f.merger(true);
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let (m2, f2) = (m.clone(), f.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            rt.spawn({
                let m = m2.clone();
                async move { m.write(5, 0, bytes(1, 10)).await }
            });
            while f2.ops().is_empty() {
                std::thread::sleep(Duration::from_millis(1));
            }
            // Held behind it, by a request that outlives the runtime.
            let held = {
                let m = m2.clone();
                std::thread::spawn(move || {
                    let other = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap();
                    other.block_on(m.write(5, 100, bytes(2, 10)))
                })
            };
            while m2.counts().0 == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
            drop(rt);
            let _ = done_tx.send(held);
        });
        let held = done_rx
            .recv_timeout(Duration::from_secs(20))
            .expect("the runtime's shutdown hung on a stripe of the object table");
        // The held write went out when the one in flight was given up; it is answered
        // once its operation completes (its answering task died with the runtime, so
        // never: its request learns the write was not answered).
        assert_eq!(f.ops().len(), 2);
        f.complete_all();
        assert!(held.join().unwrap().is_err());
    }

    /// Handing an operation to librados can block (its in-flight throttle): that stalls
    /// the writers of objects in the same stripe of the table, not every writer.
    #[test]
    fn a_blocked_handover_stalls_only_its_stripe() {
        let f = Arc::new(Fake::default());
        let (entered_tx, entered) = std::sync::mpsc::channel();
        let (go, go_rx) = std::sync::mpsc::channel();
        *f.stall.lock().unwrap() = Some((1, entered_tx, go_rx));
        let m = f.merger(true);
        // Each write on a thread of its own: the blocked one blocks its thread.
        let write = |objno: u64| {
            let m = m.clone();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(m.write(objno, 0, bytes(objno as u8, 10)))
            })
        };
        let blocked = write(1);
        entered
            .recv_timeout(Duration::from_secs(10))
            .expect("the write to object 1 reached librados");
        // Object 2 is in another stripe: handed over while object 1's hand-over blocks.
        let other = write(2);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !f.ops().iter().any(|(o, _)| *o == 2) {
            assert!(
                std::time::Instant::now() < deadline,
                "a write to object 2 waited for object 1's blocked hand-over"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(!f.ops().iter().any(|(o, _)| *o == 1));
        go.send(()).unwrap();
        // Both complete (the fake answers what it was handed, when told).
        for t in [other, blocked] {
            while !t.is_finished() {
                f.complete_all();
                std::thread::sleep(Duration::from_millis(5));
            }
            t.join().unwrap().unwrap();
        }
        assert_eq!(f.ops().len(), 2);
        assert!(m.idle());
    }

    #[tokio::test]
    async fn a_failed_operation_fails_every_write_it_carried() {
        let f = Arc::new(Fake::default());
        let m = f.merger(true);
        let mut tasks = Vec::new();
        for i in 0..3u64 {
            let m = m.clone();
            tasks.push(tokio::spawn(
                async move { m.write(2, i * 4, bytes(1, 4)).await },
            ));
            settle().await;
        }
        f.fail.store(true, Ordering::Relaxed);
        f.complete_all(); // the first succeeds (started before `fail`)
        settle().await;
        f.complete_all(); // the merged one fails
        let r: Vec<_> = futures_util::future::join_all(tasks).await;
        assert!(r[0].as_ref().unwrap().is_ok());
        assert!(r[1].as_ref().unwrap().is_err());
        assert!(r[2].as_ref().unwrap().is_err());
    }
}
