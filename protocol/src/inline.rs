//! Request tasks that may finish on the thread that completes their I/O.
//!
//! A read from a backend whose I/O completes on a thread of its own (librados calls back
//! on its `io_context_pool` threads) normally costs two more thread hand-offs before the
//! reply leaves: the completion wakes a tokio worker, which polls the request task, which
//! queues the reply for the writer task. On a machine whose idle CPUs take tens of
//! microseconds to wake (a VM without halt polling), each hand-off is a visible share of
//! a queue-depth-1 read. Measured on this project's 2-vCPU test machine, the daemon's own
//! path was about 100 us of a 420 us Ceph read, against about 55 us of librbd's own.
//!
//! So a request task may be polled right on the completing thread, and its reply written
//! to the socket from there (transmission.rs, `Direct`), when the completing code says it
//! is safe: it calls [`completing`] around the wake-up, promising that it holds no lock
//! and that blocking its thread for the rest of the request is fine. Any other wake-up
//! (a tokio worker, a timer, a thread that did not promise) schedules the task on tokio
//! as usual. Only tasks created as inline-capable ([`InlineTask::new`] with `inline`) ever
//! run on a foreign thread; the transmission loop makes reads so (their rest is encoding
//! the reply).

use std::cell::Cell;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use tokio::runtime::Handle;

thread_local! {
    /// Set while a completion that allows it wakes its waiter (see [`completing`]).
    static MAY_RUN_HERE: Cell<bool> = const { Cell::new(false) };
}

/// Runs `wake` (a completion delivering its result, which wakes the request waiting for
/// it) so that the woken request, if inline-capable, continues on this thread before
/// `completing` returns. The caller promises that it holds no lock a request could want
/// and that this thread may be kept for the rest of the request.
pub fn completing(wake: &mut dyn FnMut()) {
    let _allow = MayRunHere::set(true);
    wake();
}

/// Sets [`MAY_RUN_HERE`] until dropped, then puts back what it was.
struct MayRunHere(bool);

impl MayRunHere {
    fn set(v: bool) -> MayRunHere {
        MayRunHere(MAY_RUN_HERE.with(|c| c.replace(v)))
    }
}

impl Drop for MayRunHere {
    fn drop(&mut self) {
        MAY_RUN_HERE.with(|c| c.set(self.0));
    }
}

const IDLE: u8 = 0;
const SCHEDULED: u8 = 1;
const RUNNING: u8 = 2;
/// Running, and woken meanwhile: poll again before going idle.
const NOTIFIED: u8 = 3;
const DONE: u8 = 4;

type Task = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A spawned future with its own waker: see the module's comment.
pub(crate) struct InlineTask {
    state: AtomicU8,
    /// Taken by whoever polls (the state already makes that one at a time).
    fut: Mutex<Option<Task>>,
    rt: Handle,
    inline: bool,
}

impl InlineTask {
    /// Must be called within a tokio runtime (where the task is scheduled when it is not
    /// run inline).
    pub(crate) fn new(fut: impl Future<Output = ()> + Send + 'static, inline: bool) -> Arc<Self> {
        Arc::new(InlineTask {
            state: AtomicU8::new(IDLE),
            fut: Mutex::new(Some(Box::pin(fut))),
            rt: Handle::current(),
            inline,
        })
    }

    /// Polls the task here and now (the first poll, by its creator); true when it has
    /// finished.
    pub(crate) fn run_now(self: &Arc<Self>) -> bool {
        if self
            .state
            .compare_exchange(IDLE, RUNNING, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.run();
        }
        self.state.load(Ordering::Acquire) == DONE
    }

    fn spawn(self: &Arc<Self>) {
        let me = self.clone();
        self.rt.spawn(async move {
            if me
                .state
                .compare_exchange(SCHEDULED, RUNNING, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                me.run();
            }
        });
    }

    /// Polls until the task is done or pending with no wake-up in between. The caller
    /// has moved the state to RUNNING.
    fn run(self: &Arc<Self>) {
        // Polled on a foreign thread, the task still finds its runtime (timers, spawn).
        let _enter = self.rt.enter();
        // The completing code's promise covers this task, not what the task's own code
        // wakes (perhaps holding a lock of its own): those are scheduled as usual.
        let _not_here = MayRunHere::set(false);
        let waker = Waker::from(self.clone());
        loop {
            let mut slot = self.fut.lock().unwrap_or_else(|e| e.into_inner());
            let Some(fut) = slot.as_mut() else {
                self.state.store(DONE, Ordering::Release);
                return;
            };
            // A panic must not unwind into whoever woke us (a C++ callback, say): the
            // future is dropped instead, and its own guards answer for it.
            let polled = std::panic::catch_unwind(AssertUnwindSafe(|| {
                fut.as_mut().poll(&mut Context::from_waker(&waker))
            }));
            if !matches!(polled, Ok(Poll::Pending)) {
                let fut = slot.take();
                drop(slot);
                self.state.store(DONE, Ordering::Release);
                let _ = std::panic::catch_unwind(AssertUnwindSafe(move || drop(fut)));
                return;
            }
            drop(slot);
            match self
                .state
                .compare_exchange(RUNNING, IDLE, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return,
                // NOTIFIED: woken while polling; poll again.
                Err(_) => self.state.store(RUNNING, Ordering::Release),
            }
        }
    }
}

impl Wake for InlineTask {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let here = self.inline && MAY_RUN_HERE.with(Cell::get);
        let mut s = self.state.load(Ordering::Acquire);
        loop {
            let (next, then): (u8, fn(&Arc<Self>)) = match s {
                IDLE if here => (RUNNING, Self::run),
                IDLE => (SCHEDULED, Self::spawn),
                RUNNING => (NOTIFIED, |_| {}),
                // Already going to be polled, or finished.
                _ => return,
            };
            match self
                .state
                .compare_exchange(s, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return then(self),
                Err(now) => s = now,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use tokio::sync::oneshot;

    /// Which thread ran the part after the await, for a task woken by a foreign thread
    /// with and without `completing`, inline-capable or not.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn runs_on_the_completing_thread_only_when_allowed() {
        for (inline, allow, expect_here) in [
            (true, true, true),
            (true, false, false),
            (false, true, false),
        ] {
            let (tx, rx) = oneshot::channel::<()>();
            let (done_tx, done_rx) = oneshot::channel::<std::thread::ThreadId>();
            let task = InlineTask::new(
                async move {
                    rx.await.unwrap();
                    let _ = done_tx.send(std::thread::current().id());
                },
                inline,
            );
            assert!(!task.run_now(), "pending on its channel");
            let waker = std::thread::spawn(move || {
                let mut tx = Some(tx);
                let mut send = || {
                    let _ = tx.take().unwrap().send(());
                };
                if allow {
                    completing(&mut send);
                } else {
                    send();
                }
                std::thread::current().id()
            });
            let waker_id = waker.join().unwrap();
            let ran_on = done_rx.await.unwrap();
            assert_eq!(
                ran_on == waker_id,
                expect_here,
                "inline {inline} allowed {allow}"
            );
        }
    }

    /// Woken many times from several threads at once, a task is polled by one at a time
    /// and never loses a wake-up: it counts to the end.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_wakes_lose_nothing() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let seen = Arc::new(AtomicUsize::new(0));
        let (done_tx, done_rx) = oneshot::channel();
        let s = seen.clone();
        let task = InlineTask::new(
            async move {
                while rx.recv().await.is_some() {
                    s.fetch_add(1, Ordering::SeqCst);
                }
                let _ = done_tx.send(());
            },
            true,
        );
        task.run_now();
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let tx = tx.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        let t = tx.clone();
                        completing(&mut || {
                            let _ = t.send(());
                        });
                    }
                })
            })
            .collect();
        drop(tx);
        for t in threads {
            t.join().unwrap();
        }
        done_rx.await.unwrap();
        assert_eq!(seen.load(Ordering::SeqCst), 4000);
    }

    /// A panic in a task polled on a foreign thread stays there: the future is dropped
    /// (its guards run) and the waking thread goes on.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panic_does_not_reach_the_waker() {
        struct Guard(Option<oneshot::Sender<()>>);
        impl Drop for Guard {
            fn drop(&mut self) {
                let _ = self.0.take().unwrap().send(());
            }
        }
        let (tx, rx) = oneshot::channel::<()>();
        let (dropped_tx, dropped_rx) = oneshot::channel();
        let task = InlineTask::new(
            async move {
                let _g = Guard(Some(dropped_tx));
                rx.await.unwrap();
                panic!("backend bug");
            },
            true,
        );
        assert!(!task.run_now());
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            completing(&mut || {
                let _ = tx.take().unwrap().send(());
            });
        })
        .join()
        .expect("the waking thread must not see the panic");
        dropped_rx.await.unwrap();
    }
}
