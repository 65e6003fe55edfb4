//! The wait of a queued request: a future that resolves when the request reaches the head
//! of its key's FIFO queue and every bucket covers it.
//!
//! # Wake-ups
//!
//! Only the head of a queue can be admitted, so only the head arms a timer for the moment
//! its buckets will have refilled enough (computed from the deficit and the refill rates,
//! or the end of a pause). Settlements (a refund, a released concurrency slot) and the
//! admission or departure of the previous head wake the head through its stored waker, so
//! it re-checks at once. Every waiter also has its deadline (`max_wait` after the call).
//!
//! # Cancel safety
//!
//! Dropping an [`Acquire`] before it resolves removes the request from the queue; if it was
//! the head, the next one is woken. Nothing was charged yet, so nothing needs refunding.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use claude_core::{Error, ErrorKind};
use tokio::time::{Instant, Sleep};

use crate::limiter::{Demand, KeyState, Limiter, Ticket, WaiterPoll};
use crate::metrics;

/// A queued request's wait for admission.
#[derive(Debug)]
pub(crate) struct Acquire {
    limiter: Arc<Limiter>,
    state: Arc<KeyState>,
    id: u64,
    demand: Demand,
    started: Instant,
    deadline: Instant,
    timer: Pin<Box<Sleep>>,
    done: bool,
}

impl Acquire {
    pub(crate) fn new(
        limiter: Arc<Limiter>,
        state: Arc<KeyState>,
        id: u64,
        demand: Demand,
        now: Instant,
    ) -> Self {
        let deadline = now + limiter.config().max_wait;
        Self {
            limiter,
            state,
            id,
            demand,
            started: now,
            deadline,
            timer: Box::pin(tokio::time::sleep_until(deadline)),
            done: false,
        }
    }

    fn leave(&mut self) {
        self.done = true;
        metrics::queue_depth(-1.0);
    }
}

impl Future for Acquire {
    type Output = Result<Ticket, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(Err(Error::new(
                ErrorKind::Internal,
                "rate-limit wait polled after completion",
            )));
        }
        // A timer that is already due (rounding) sends us round again; a few rounds always
        // suffice, the bound only guards against a clock that disagrees with itself.
        for _ in 0..8 {
            match this.limiter.poll_waiter(
                &this.state,
                this.id,
                &this.demand.amounts,
                this.deadline,
                cx.waker(),
            ) {
                WaiterPoll::Admitted(seq) => {
                    this.leave();
                    metrics::waited(this.started.elapsed().as_secs_f64());
                    return Poll::Ready(Ok(Ticket::new(
                        Arc::clone(&this.limiter),
                        Arc::clone(&this.state),
                        &this.demand,
                        seq,
                    )));
                }
                WaiterPoll::TimedOut(estimate) => {
                    this.leave();
                    metrics::rejected("queue_timeout");
                    return Poll::Ready(Err(Error::queue_timeout(estimate)));
                }
                WaiterPoll::Gone => {
                    this.leave();
                    return Poll::Ready(Err(Error::new(
                        ErrorKind::Internal,
                        "rate-limit waiter lost its place in the queue",
                    )));
                }
                WaiterPoll::Wait(until) => {
                    let at = until.map_or(this.deadline, |u| u.min(this.deadline));
                    if this.timer.deadline() != at {
                        this.timer.as_mut().reset(at);
                    }
                    if this.timer.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                }
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl Drop for Acquire {
    fn drop(&mut self) {
        if !self.done {
            self.state.cancel_waiter(self.id);
            self.leave();
        }
    }
}
