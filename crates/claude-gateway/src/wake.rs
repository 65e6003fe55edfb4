//! Polls a connection again at once when it wakes itself while it is being polled.
//!
//! hyper runs a connection's dispatcher and the request handler in one task. When the
//! handler takes a chunk of the request body, hyper's body channel wakes the body's sender:
//! the dispatcher, that is the very task being polled. tokio treats a task woken while it
//! runs as one that yields: it queues it behind the others and wakes an idle worker to steal
//! it, a context switch and a pair of futex calls per request for work the task could have
//! done at once. [`SelfWake`] gives the connection a waker of its own; a wake that arrives
//! while the connection is being polled (from this thread or another) only marks it, and the
//! connection is polled again before `poll` returns, up to [`REPOLLS`] times, after which it
//! yields to the scheduler as before so that one busy connection cannot starve the others.
//! A wake that arrives between polls goes to the task's waker as usual.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Wake, Waker};

/// How many times a poll polls the connection again after it woke itself, before it yields.
const REPOLLS: usize = 1;

/// Not being polled.
const IDLE: u8 = 0;
/// Being polled, not woken since the poll began.
const POLLING: u8 = 1;
/// Being polled and woken since the poll began: poll again.
const NOTIFIED: u8 = 2;

/// The waker of the task that polls a wrapped future, kept for the wakes that come between
/// its polls (shared by [`SelfWake`] and the drain's stop signal).
#[derive(Default)]
pub(crate) struct TaskWaker(Mutex<Option<Waker>>);

impl TaskWaker {
    /// Keeps `w` unless the kept waker already wakes the same task.
    pub(crate) fn update(&self, w: &Waker) {
        let mut task = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        match task.as_ref() {
            Some(kept) if kept.will_wake(w) => {}
            _ => *task = Some(w.clone()),
        }
    }

    /// Forgets the kept waker.
    pub(crate) fn clear(&self) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }

    /// Wakes the kept waker's task, if there is one.
    pub(crate) fn wake(&self) {
        if let Some(w) = self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
        {
            w.wake_by_ref();
        }
    }
}

/// The waker a [`SelfWake`] future hands to what it wraps.
struct Shared {
    state: AtomicU8,
    /// The waker of the task that polls the future (set by each poll when it changes).
    task: TaskWaker,
}

impl Wake for Shared {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let mut state = self.state.load(Ordering::Acquire);
        loop {
            match state {
                NOTIFIED => return,
                POLLING => {
                    match self.state.compare_exchange_weak(
                        POLLING,
                        NOTIFIED,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    ) {
                        Ok(_) => return,
                        Err(now) => state = now,
                    }
                }
                _ => {
                    // Between polls (or a poll is just starting: the task is then polled once
                    // more, which is harmless).
                    self.task.wake();
                    return;
                }
            }
        }
    }
}

/// A future (a connection) polled again at once when it wakes itself during a poll.
pub(crate) struct SelfWake<F> {
    inner: Pin<Box<F>>,
    shared: Arc<Shared>,
    waker: Waker,
}

impl<F> SelfWake<F> {
    pub(crate) fn new(inner: F) -> Self {
        let shared = Arc::new(Shared {
            state: AtomicU8::new(IDLE),
            task: TaskWaker::default(),
        });
        let waker = Waker::from(Arc::clone(&shared));
        Self {
            inner: Box::pin(inner),
            shared,
            waker,
        }
    }
}

impl<F: Future> Future for SelfWake<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        this.shared.task.update(cx.waker());
        this.shared.state.store(POLLING, Ordering::Release);
        let mut inner_cx = Context::from_waker(&this.waker);
        for _ in 0..=REPOLLS {
            if let Poll::Ready(out) = this.inner.as_mut().poll(&mut inner_cx) {
                this.shared.state.store(IDLE, Ordering::Release);
                return Poll::Ready(out);
            }
            if this
                .shared
                .state
                .compare_exchange(POLLING, IDLE, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                // Not woken during the poll: a later wake goes to the task.
                return Poll::Pending;
            }
            // Woken during the poll: it has work to do now.
            this.shared.state.store(POLLING, Ordering::Release);
        }
        // Still waking itself: let the scheduler run the others first.
        this.shared.state.store(IDLE, Ordering::Release);
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Wakes itself `wakes` times during its polls, then is ready; counts its polls.
    struct Waking {
        wakes: usize,
        polls: Arc<AtomicUsize>,
    }

    impl Future for Waking {
        type Output = ();
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.polls.fetch_add(1, Ordering::Relaxed);
            if self.wakes == 0 {
                return Poll::Ready(());
            }
            self.wakes -= 1;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }

    /// Counts the wakes of the task.
    struct Counter(AtomicUsize);
    impl Wake for Counter {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn poll_once<F: Future>(f: &mut SelfWake<F>, task: &Arc<Counter>) -> Poll<F::Output> {
        let waker = Waker::from(Arc::clone(task));
        Pin::new(f).poll(&mut Context::from_waker(&waker))
    }

    /// Polls a [`SelfWake`] around a future that wakes itself `wakes` times once: whether it
    /// was ready, how often the inner future was polled, how often the task was woken.
    fn poll_waking(wakes: usize) -> (bool, usize, usize) {
        let polls = Arc::new(AtomicUsize::new(0));
        let task = Arc::new(Counter(AtomicUsize::new(0)));
        let mut f = SelfWake::new(Waking {
            wakes,
            polls: Arc::clone(&polls),
        });
        let ready = poll_once(&mut f, &task).is_ready();
        (
            ready,
            polls.load(Ordering::Relaxed),
            task.0.load(Ordering::Relaxed),
        )
    }

    #[test]
    fn a_self_wake_is_polled_again_within_the_poll() {
        // Woken during each of its first REPOLLS polls: ready within one poll of the task,
        // which is not woken.
        assert_eq!(poll_waking(REPOLLS), (true, REPOLLS + 1, 0));
    }

    #[test]
    fn a_future_that_keeps_waking_itself_yields_to_the_scheduler() {
        // Still waking itself after REPOLLS more polls: the task is woken once to come back.
        assert_eq!(poll_waking(100), (false, REPOLLS + 1, 1));
    }

    #[test]
    fn a_wake_between_polls_reaches_the_task() {
        /// Pending until its stored waker has been woken from outside.
        struct Parked(Arc<Mutex<Option<Waker>>>, Arc<AtomicUsize>);
        impl Future for Parked {
            type Output = ();
            fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
                if self.1.load(Ordering::Relaxed) > 0 {
                    return Poll::Ready(());
                }
                *self.0.lock().unwrap() = Some(cx.waker().clone());
                Poll::Pending
            }
        }
        let slot = Arc::new(Mutex::new(None::<Waker>));
        let fired = Arc::new(AtomicUsize::new(0));
        let task = Arc::new(Counter(AtomicUsize::new(0)));
        let mut f = SelfWake::new(Parked(Arc::clone(&slot), Arc::clone(&fired)));
        assert!(poll_once(&mut f, &task).is_pending());
        assert_eq!(task.0.load(Ordering::Relaxed), 0);
        fired.fetch_add(1, Ordering::Relaxed);
        let w = slot.lock().unwrap().take().unwrap();
        std::thread::spawn(move || w.wake()).join().unwrap();
        assert_eq!(
            task.0.load(Ordering::Relaxed),
            1,
            "the outside wake reached the task"
        );
        assert!(poll_once(&mut f, &task).is_ready());
    }
}
