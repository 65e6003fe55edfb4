//! Handles of the layers' fixed metrics, kept across requests where the process allows it.
//!
//! A `metrics` macro (`counter!`, `histogram!`, …) looks its metric up in the recorder on
//! every use: with the Prometheus recorder that is a key built, hashed and found, and a
//! handle made, about 450 instructions and an allocation each time. The layers record a few
//! metrics on every request whose names and labels are fixed in the code; a [`Kept`] makes
//! the handle once and reuses it, when [`keep_metric_handles`] is on.
//!
//! It is off by default: a kept handle stays with the recorder it was made with, and that
//! recorder is known only by its address. A process whose one recorder is installed
//! globally before its first request (claude-gateway) turns it on. Where recorders come and
//! go (tests that use `metrics::with_local_recorder` one after another, which may reuse an
//! address), it stays off and every use looks the metric up, as the macros do. (When the
//! recorder in use is not the one a handle was kept for, the lookup is made too.)

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

static KEEP: AtomicBool = AtomicBool::new(false);

/// Lets every [`Kept`] handle be made once and reused (see the [module docs](self)).
/// Process-wide; default off.
pub fn keep_metric_handles(on: bool) {
    KEEP.store(on, Ordering::Relaxed);
}

/// Whether [`keep_metric_handles`] is on.
pub fn metric_handles_kept() -> bool {
    KEEP.load(Ordering::Relaxed)
}

/// The address of the recorder the `metrics` macros would use here and now (the local one
/// if set, else the global one, else the no-op one).
pub fn recorder_id() -> usize {
    metrics::with_recorder(|r| std::ptr::from_ref(r).cast::<()>().addr())
}

/// The handle of one metric with a fixed name and labels, for a `static`:
///
/// ```
/// use claude_core::metric::Kept;
///
/// static HITS: Kept<metrics::Counter> = Kept::new();
/// HITS.with(|| metrics::counter!("my_hits_total"), |c| c.increment(1));
/// ```
pub struct Kept<H> {
    cell: OnceLock<(usize, H)>,
}

impl<H> std::fmt::Debug for Kept<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kept")
            .field("made", &self.cell.get().is_some())
            .finish()
    }
}

impl<H> Default for Kept<H> {
    fn default() -> Self {
        Self::new()
    }
}

impl<H> Kept<H> {
    /// An empty slot.
    pub const fn new() -> Self {
        Self {
            cell: OnceLock::new(),
        }
    }

    /// Calls `f` with the handle: the kept one when handles are kept and it was made for the
    /// recorder in use, else one `make` makes now (a `metrics` macro call).
    pub fn with<R>(&self, make: impl FnOnce() -> H, f: impl FnOnce(&H) -> R) -> R {
        if !metric_handles_kept() {
            return f(&make());
        }
        let id = recorder_id();
        match self.cell.get() {
            Some((kept, h)) if *kept == id => f(h),
            Some(_) => f(&make()),
            None => {
                let h = make();
                let r = f(&h);
                // Kept for the next uses (when another thread kept one first, this one goes).
                let _ = self.cell.set((id, h));
                r
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    use std::sync::atomic::AtomicUsize;

    static COUNT: Kept<metrics::Counter> = Kept::new();
    static MADE: AtomicUsize = AtomicUsize::new(0);

    /// Counts `n` times through `COUNT` with `rec` as the recorder; returns what `rec` got
    /// and how many handles were made.
    fn count(rec: &DebuggingRecorder, n: u64) -> (u64, usize) {
        let snap = rec.snapshotter();
        let made = MADE.load(Ordering::Relaxed);
        metrics::with_local_recorder(rec, || {
            for _ in 0..n {
                COUNT.with(
                    || {
                        MADE.fetch_add(1, Ordering::Relaxed);
                        metrics::counter!("kept_total")
                    },
                    |c| c.increment(1),
                );
            }
        });
        let got = snap
            .snapshot()
            .into_vec()
            .into_iter()
            .map(|(_, _, _, v)| match v {
                DebugValue::Counter(n) => n,
                _ => 0,
            })
            .sum();
        (got, MADE.load(Ordering::Relaxed) - made)
    }

    // One test, so that the process-wide switch is not flipped under another one.
    #[test]
    fn kept_handles_are_made_once_per_recorder() {
        // Off: a handle is made at every use, for the recorder in use.
        let a = DebuggingRecorder::new();
        assert_eq!(count(&a, 3), (3, 3));

        // On: made once and kept for that recorder.
        keep_metric_handles(true);
        let b = Box::new(DebuggingRecorder::new());
        assert_eq!(count(&b, 3), (3, 1));
        assert_eq!(count(&b, 2), (2, 0));
        // A recorder at another address still gets its counts, through a handle made at
        // each use.
        let c = Box::new(DebuggingRecorder::new());
        assert_eq!(count(&c, 2), (2, 2));
        keep_metric_handles(false);
    }
}
