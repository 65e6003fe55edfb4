//! Graceful shutdown of the server's connections, with the stop signal polled only when it
//! fired.
//!
//! hyper-util's `GracefulShutdown` does the same job, but its connection future polls the
//! stop signal (a `watch` receiver's `changed()`: a coop budget check, a `Notify`
//! registration) on every poll of the connection: an SSE answer polls its connection about
//! twenty times, so that was a few thousand instructions per request spent asking "are we
//! stopping yet?". Here the signal is polled with a waker of its own, which marks the signal
//! as fired and wakes the connection's task; a connection poll looks at that mark (one atomic
//! swap) and polls the signal only when it is set. The signal is polled on the connection's
//! first poll, so that its waker is registered before anything can fire it.
//!
//! [`Drain::shutdown`] signals every connection to finish its in-flight requests and close
//! (`graceful_shutdown`: idle keep-alive connections close at once), then waits until every
//! connection future has ended.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};

use hyper_util::server::graceful::GracefulConnection;
use pin_project_lite::pin_project;
use tokio::sync::watch;

use crate::wake::TaskWaker;

/// Hands out watched connections and stops them all.
pub(crate) struct Drain {
    tx: watch::Sender<()>,
}

impl Drain {
    pub(crate) fn new() -> Self {
        Self {
            tx: watch::channel(()).0,
        }
    }

    /// `conn`, told to shut down gracefully when [`shutdown`](Self::shutdown) is called.
    pub(crate) fn watch<C: GracefulConnection>(&self, conn: C) -> Watched<C> {
        let mut rx = self.tx.subscribe();
        let gate = Arc::new(Gate {
            fired: AtomicBool::new(true),
            task: TaskWaker::default(),
        });
        Watched {
            conn,
            // The receiver is given back when the signal fires and kept until the connection
            // ends: `shutdown` waits for every receiver to be dropped.
            signal: Some(Box::pin(async move {
                let _ = rx.changed().await;
                rx
            })),
            stopped: None,
            gate_waker: Waker::from(Arc::clone(&gate)),
            gate,
            task: None,
        }
    }

    /// Tells every watched connection to finish and close, and waits until they all have.
    pub(crate) async fn shutdown(self) {
        let _ = self.tx.send(());
        self.tx.closed().await;
    }
}

/// The stop signal's waker: marks the signal as fired and wakes the connection's task.
struct Gate {
    fired: AtomicBool,
    /// The waker of the task that last polled the connection.
    task: TaskWaker,
}

impl Wake for Gate {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.fired.store(true, Ordering::Release);
        self.task.wake();
    }
}

type Signal = Pin<Box<dyn Future<Output = watch::Receiver<()>> + Send>>;

pin_project! {
    /// A connection that shuts down gracefully when its [`Drain`] says so.
    pub(crate) struct Watched<C> {
        #[pin]
        conn: C,
        // Until the signal fires.
        signal: Option<Signal>,
        // After it fired: keeps the drain waiting until the connection ends.
        stopped: Option<watch::Receiver<()>>,
        gate: Arc<Gate>,
        gate_waker: Waker,
        // The task waker last given to the gate (compared without its lock).
        task: Option<Waker>,
    }
}

impl<C: GracefulConnection> Future for Watched<C> {
    type Output = C::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<C::Output> {
        let mut this = self.project();
        if this.signal.is_some() {
            // Compared here first, so that a poll takes the gate's lock only when the task
            // changed.
            if !this.task.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                this.gate.task.update(cx.waker());
                *this.task = Some(cx.waker().clone());
            }
            if this.gate.fired.swap(false, Ordering::AcqRel)
                && let Some(signal) = this.signal.as_mut()
                && let Poll::Ready(rx) = signal
                    .as_mut()
                    .poll(&mut Context::from_waker(this.gate_waker))
            {
                *this.signal = None;
                *this.stopped = Some(rx);
                *this.task = None;
                this.gate.task.clear();
                this.conn.as_mut().graceful_shutdown();
            }
        }
        this.conn.poll(cx)
    }
}
