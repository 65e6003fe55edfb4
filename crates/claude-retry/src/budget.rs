//! [`RetryBudget`]: retries are a bounded share of recent requests, shared by every clone.
//!
//! # Why not tower's `TpsBudget`
//!
//! - It truncates fractional percentages: the withdrawal cost is `(1 / percent) as isize`,
//!   so 0.6 allows a retry per request and 0.3 one per three (tower#857).
//! - It panics (`assert!`) on out-of-range arguments, which a configuration file controls.
//! - It only answers yes or no; this one also reports what is left
//!   ([`available`](RetryBudget::available)), which tests and dashboards use.
//!
//! # The rule
//!
//! A retry is allowed when, counting over the sliding window,
//! `retries + 1 ≤ retry_ratio × requests + min_per_sec × window`. Every request (first
//! attempt) deposits one; every retry withdraws one. The arithmetic is integer fixed point
//! (millionths), so a ratio of 0.3 allows exactly 3 retries per 10 requests.
//!
//! The window is cut into 10 slots; a count leaves the window when its slot does, so it
//! counts for between 0.9 and 1.0 window. The clock is `tokio::time::Instant`, so tests
//! drive the window with `tokio::time::pause`.
//!
//! The state is one short `std::sync::Mutex` (a few integer operations, never held across
//! an await); a request costs one uncontended lock to deposit.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use tokio::time::Instant;

use crate::config::{BudgetConfig, MAX_RATIO, MIN_WINDOW};

const SLOTS: usize = 10;
/// Fixed point: one retry is `SCALE` units.
const SCALE: u128 = 1_000_000;

/// A retry budget: at most a configured share of recent requests may be retried, plus a
/// floor per second. Cheap to clone; clones share the budget.
///
/// Every service built by one [`RetryLayer`](crate::RetryLayer) (and all their clones)
/// shares one budget; pass the same budget to several layers with
/// [`RetryLayer::budget`](crate::RetryLayer::budget) to share it wider.
///
/// ```
/// use std::time::Duration;
/// use claude_retry::{BudgetConfig, RetryBudget};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let budget = RetryBudget::new(BudgetConfig {
///     window: Duration::from_secs(10),
///     retry_ratio: 0.3,
///     min_per_sec: 0,
/// });
/// for _ in 0..10 {
///     budget.deposit();
/// }
/// assert_eq!(budget.available(), 3); // 0.3 × 10, exactly
/// assert!(budget.withdraw() && budget.withdraw() && budget.withdraw());
/// assert!(!budget.withdraw());
/// # }
/// ```
#[derive(Clone)]
pub struct RetryBudget {
    inner: Arc<Inner>,
}

struct Inner {
    config: BudgetConfig,
    slot_len_nanos: u128,
    ratio_units: u128,
    reserve_units: u128,
    state: Mutex<State>,
}

#[derive(Default, Clone, Copy)]
struct Slot {
    requests: u64,
    retries: u64,
}

#[derive(Default)]
struct State {
    /// The instant of slot 0, set on first use (so a budget built before a runtime, or
    /// before `tokio::time::pause`, measures from its first request).
    base: Option<Instant>,
    /// Absolute index of the newest slot.
    head: u64,
    slots: [Slot; SLOTS],
    requests: u64,
    retries: u64,
}

impl fmt::Debug for RetryBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (requests, retries) = self.counts();
        f.debug_struct("RetryBudget")
            .field("config", &self.inner.config)
            .field("requests", &requests)
            .field("retries", &retries)
            .finish()
    }
}

impl Default for RetryBudget {
    fn default() -> Self {
        Self::new(BudgetConfig::default())
    }
}

impl RetryBudget {
    /// A budget with these settings. Out-of-range values are clamped, never a panic: a
    /// ratio that is negative or NaN counts as 0, above 1000 as 1000; a window under
    /// 10 ms as 10 ms ([`BudgetConfig::validate`] refuses them instead).
    pub fn new(config: BudgetConfig) -> Self {
        let ratio = if config.retry_ratio.is_nan() {
            0.0
        } else {
            config.retry_ratio.clamp(0.0, MAX_RATIO)
        };
        let window = config.window.max(MIN_WINDOW);
        // Millionths of a retry per request; rounding (not truncating) the ratio.
        let ratio_units = (ratio * SCALE as f64).round() as u128;
        // min_per_sec × window, in millionths of a retry: per_sec × nanos / 1e9 × 1e6.
        let reserve_units = u128::from(config.min_per_sec) * window.as_nanos() / 1_000;
        Self {
            inner: Arc::new(Inner {
                config,
                slot_len_nanos: (window.as_nanos() / SLOTS as u128).max(1),
                ratio_units,
                reserve_units,
                state: Mutex::new(State::default()),
            }),
        }
    }

    /// The settings this budget was built with.
    pub fn config(&self) -> &BudgetConfig {
        &self.inner.config
    }

    /// Records a request (a first attempt). The retry layer calls it once per call.
    pub fn deposit(&self) {
        self.deposit_at(Instant::now());
    }

    pub(crate) fn deposit_at(&self, now: Instant) {
        let mut st = self.lock();
        self.inner.advance(&mut st, now);
        let head = slot_index(st.head);
        st.slots[head].requests += 1;
        st.requests += 1;
    }

    /// Takes one retry from the budget; `false` (and nothing taken) when the budget is
    /// spent.
    pub fn withdraw(&self) -> bool {
        let now = Instant::now();
        let mut st = self.lock();
        self.inner.advance(&mut st, now);
        if u128::from(st.retries + 1) * SCALE > self.inner.allowance(st.requests) {
            return false;
        }
        let head = slot_index(st.head);
        st.slots[head].retries += 1;
        st.retries += 1;
        true
    }

    /// How many retries [`withdraw`](Self::withdraw) would allow right now.
    pub fn available(&self) -> u64 {
        let now = Instant::now();
        let mut st = self.lock();
        self.inner.advance(&mut st, now);
        let allowed = self.inner.allowance(st.requests) / SCALE;
        u64::try_from(allowed)
            .unwrap_or(u64::MAX)
            .saturating_sub(st.retries)
    }

    /// Requests and retries counted in the current window.
    pub fn counts(&self) -> (u64, u64) {
        let now = Instant::now();
        let mut st = self.lock();
        self.inner.advance(&mut st, now);
        (st.requests, st.retries)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The critical sections cannot panic half-way; a poisoned lock still holds
        // consistent counts.
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

fn slot_index(abs: u64) -> usize {
    (abs % SLOTS as u64) as usize
}

impl Inner {
    /// Allowed retries in millionths for this many requests.
    fn allowance(&self, requests: u64) -> u128 {
        self.ratio_units * u128::from(requests) + self.reserve_units
    }

    /// Moves the window to `now`, dropping the slots that left it.
    fn advance(&self, st: &mut State, now: Instant) {
        let base = *st.base.get_or_insert(now);
        let elapsed = now.saturating_duration_since(base).as_nanos();
        let idx = u64::try_from(elapsed / self.slot_len_nanos).unwrap_or(u64::MAX);
        if idx <= st.head {
            return;
        }
        let stale = (idx - st.head).min(SLOTS as u64);
        for i in 1..=stale {
            let s = slot_index(st.head.wrapping_add(i));
            let old = std::mem::take(&mut st.slots[s]);
            st.requests -= old.requests;
            st.retries -= old.retries;
        }
        st.head = idx;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn budget(ratio: f64, min_per_sec: u32, window_secs: u64) -> RetryBudget {
        RetryBudget::new(BudgetConfig {
            window: Duration::from_secs(window_secs),
            retry_ratio: ratio,
            min_per_sec,
        })
    }

    fn drain(b: &RetryBudget) -> u64 {
        let mut n = 0;
        // Bounded, so that a budget that never refuses fails the test instead of hanging.
        while n < 100_000 && b.withdraw() {
            n += 1;
        }
        n
    }

    #[tokio::test(start_paused = true)]
    async fn fractional_ratios_are_exact() {
        // tower's TpsBudget gives 10 and 3 here (tower#857); the rule says 6 and 3.
        for (ratio, expected) in [(0.6, 6), (0.3, 3), (0.25, 2), (0.1, 1), (1.0, 10)] {
            let b = budget(ratio, 0, 10);
            for _ in 0..10 {
                b.deposit();
            }
            assert_eq!(b.available(), expected, "ratio {ratio}");
            assert_eq!(drain(&b), expected, "ratio {ratio}");
            assert_eq!(b.available(), 0);
        }
        let b = budget(0.3, 0, 10);
        for _ in 0..1000 {
            b.deposit();
        }
        assert_eq!(drain(&b), 300);
    }

    #[tokio::test(start_paused = true)]
    async fn floor_per_second_over_the_window() {
        let b = budget(0.0, 3, 10);
        assert_eq!(drain(&b), 30);
        let b = RetryBudget::new(BudgetConfig {
            window: Duration::from_millis(1500),
            retry_ratio: 0.5,
            min_per_sec: 2,
        });
        for _ in 0..5 {
            b.deposit();
        }
        // 0.5 × 5 + 2 × 1.5 = 5.5 → 5.
        assert_eq!(drain(&b), 5);
    }

    #[tokio::test(start_paused = true)]
    async fn counts_leave_the_window() {
        let b = budget(0.5, 0, 10);
        for _ in 0..10 {
            b.deposit();
        }
        assert_eq!(drain(&b), 5);
        // Still inside the window: nothing new.
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!b.withdraw());
        b.deposit();
        b.deposit();
        assert_eq!(drain(&b), 1); // 0.5 × 12 = 6
        // The first deposits and retries (slot 0) leave after 10 s; the later ones stay.
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(b.counts(), (2, 1));
        assert_eq!(b.available(), 0); // 0.5 × 2 − 1
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(b.counts(), (0, 0));
        // A long idle gap clears everything at once.
        for _ in 0..4 {
            b.deposit();
        }
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert_eq!(b.counts(), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn clones_share_one_budget() {
        let a = budget(1.0, 0, 10);
        let c = a.clone();
        a.deposit();
        c.deposit();
        assert!(a.withdraw());
        assert!(c.withdraw());
        assert!(!a.withdraw());
        assert_eq!(c.counts(), (2, 2));
    }

    #[tokio::test(start_paused = true)]
    async fn bad_values_are_clamped_not_panics() {
        let b = RetryBudget::new(BudgetConfig {
            window: Duration::ZERO,
            retry_ratio: f64::NAN,
            min_per_sec: 1000,
        });
        // window clamped to 10 ms: 1000/s × 0.01 s = 10 retries; NaN ratio = 0.
        b.deposit();
        assert_eq!(drain(&b), 10);
        let b = budget(f64::INFINITY, 0, 1);
        b.deposit();
        assert_eq!(b.available(), 1000);
        let b = budget(-3.0, 0, 1);
        b.deposit();
        assert_eq!(b.available(), 0);
    }
}
