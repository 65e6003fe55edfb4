//! Grants: what a request the key's own buckets admitted must also obtain before it is
//! sent, from the buckets of the further scopes ([`RateLimitConfig::scopes`]) and, with
//! Redis, from the shared buckets of its key and of those scopes.
//!
//! A grant covers several buckets at once and is all or nothing: either every bucket holds
//! the demand (plus the safety margin) and all are charged, or none is charged and the
//! answer says how long until they would hold it. The request then waits that long and asks
//! again, until its deadline. Locally the buckets sit behind one mutex ([`ScopeBuckets`]);
//! in Redis one Lua script does the same over the shared buckets (see the `redis` module).
//!
//! [`RateLimitConfig::scopes`]: crate::RateLimitConfig::scopes

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use claude_core::Error;
use tokio::time::Instant;

use crate::limiter::lock;

/// One bucket of a grant: its id (a Redis key, or a local id), capacity, the demand it is
/// charged, and the level it must hold to grant (milli-units).
#[derive(Debug, Clone)]
pub(crate) struct GrantBucket {
    pub(crate) kind: usize,
    pub(crate) key: String,
    pub(crate) cap: i64,
    pub(crate) demand: i64,
    pub(crate) required: i64,
}

/// A grant obtained: the buckets to settle when the request ends.
#[derive(Debug)]
pub(crate) enum Hold {
    /// Granted by the local buckets of the further scopes.
    Local {
        store: Arc<ScopeBuckets>,
        buckets: Vec<GrantBucket>,
    },
    /// Granted by the shared buckets in Redis.
    #[cfg(feature = "redis")]
    Redis(Box<crate::redis::Hold>),
}

impl Hold {
    /// Refunds (or charges) each bucket the difference between its demand and `finals`
    /// (per kind, milli-units). Redis settlements run on a task of their own.
    pub(crate) fn settle(self, finals: &[i64; 3]) {
        match self {
            Self::Local { store, buckets } => {
                let deltas: Vec<i64> = buckets.iter().map(|b| b.demand - finals[b.kind]).collect();
                if deltas.iter().any(|d| *d != 0) {
                    store.settle(&buckets, &deltas, Instant::now());
                }
            }
            #[cfg(feature = "redis")]
            Self::Redis(hold) => hold.settle(finals),
        }
    }
}

/// The future of a grant: `Some` when granted, `None` when the request may go on its local
/// admission alone (Redis unreachable under the fail-open policy, and no further scope).
pub(crate) type Grant = Pin<Box<dyn Future<Output = Result<Option<Hold>, Error>> + Send>>;

/// The refill window of every bucket: one minute, in microseconds.
const MINUTE_US: i128 = 60_000_000;
/// Full buckets are forgotten every this many grants.
const SWEEP_EVERY: u64 = 256;

/// The local buckets of the further scopes, by id, behind one mutex (held for a few
/// arithmetic operations per bucket, never across an await). A bucket that has refilled
/// to full is forgotten: a fresh one would behave the same.
#[derive(Debug)]
pub(crate) struct ScopeBuckets {
    levels: Mutex<HashMap<String, Level>>,
    epoch: Instant,
    grants: AtomicU64,
}

#[derive(Debug, Clone, Copy)]
struct Level {
    /// Milli-units; negative when a settlement charged more than was reserved.
    milli: i64,
    /// Microseconds since the store's epoch.
    at: i64,
    /// The bucket's capacity, for the sweep.
    cap: i64,
}

impl Level {
    /// The level at `now`, refilled continuously (a bucket in debt takes longer than a
    /// minute to be full again).
    fn at(self, now: i64) -> i64 {
        let elapsed = i128::from(now.saturating_sub(self.at)).max(0);
        let refill = elapsed * i128::from(self.cap) / MINUTE_US;
        i64::try_from((i128::from(self.milli) + refill).min(i128::from(self.cap)))
            .unwrap_or(self.cap)
    }
}

impl Default for ScopeBuckets {
    fn default() -> Self {
        Self {
            levels: Mutex::new(HashMap::new()),
            epoch: Instant::now(),
            grants: AtomicU64::new(0),
        }
    }
}

impl ScopeBuckets {
    fn micros(&self, now: Instant) -> i64 {
        i64::try_from(now.saturating_duration_since(self.epoch).as_micros()).unwrap_or(i64::MAX)
    }

    /// Records `b`'s level `milli` as of `now`.
    fn store(levels: &mut HashMap<String, Level>, b: &GrantBucket, milli: i64, now: i64) {
        levels.insert(
            b.key.clone(),
            Level {
                milli,
                at: now,
                cap: b.cap,
            },
        );
    }

    /// The level of a bucket at `now`, refilled continuously from its last update.
    fn refilled(levels: &HashMap<String, Level>, b: &GrantBucket, now: i64) -> i64 {
        levels
            .get(&b.key)
            .map_or(b.cap, |l| Level { cap: b.cap, ..*l }.at(now))
    }

    /// Charges every bucket its demand if every one holds its required level; otherwise
    /// charges nothing and returns how long until they all would.
    pub(crate) fn try_grant(&self, buckets: &[GrantBucket], now: Instant) -> Result<(), Duration> {
        let t = self.micros(now);
        let mut levels = lock(&self.levels);
        let mut wait_us: i128 = 0;
        let current: Vec<i64> = buckets
            .iter()
            .map(|b| {
                let level = Self::refilled(&levels, b, t);
                if level < b.required && b.cap > 0 {
                    let w = i128::from(b.required - level) * MINUTE_US / i128::from(b.cap);
                    wait_us = wait_us.max(w + 1);
                }
                level
            })
            .collect();
        if wait_us > 0 {
            return Err(Duration::from_micros(
                u64::try_from(wait_us).unwrap_or(u64::MAX),
            ));
        }
        for (b, level) in buckets.iter().zip(current) {
            Self::store(&mut levels, b, level - b.demand, t);
        }
        if self.grants.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            Self::sweep(&mut levels, t);
        }
        Ok(())
    }

    /// Adds `deltas` (refunds when positive) to the buckets, capped at their capacity.
    pub(crate) fn settle(&self, buckets: &[GrantBucket], deltas: &[i64], now: Instant) {
        let t = self.micros(now);
        let mut levels = lock(&self.levels);
        for (b, d) in buckets.iter().zip(deltas) {
            let level = Self::refilled(&levels, b, t).saturating_add(*d).min(b.cap);
            if level >= b.cap {
                levels.remove(&b.key);
            } else {
                Self::store(&mut levels, b, level, t);
            }
        }
    }

    /// Forgets the buckets that have refilled to full.
    fn sweep(levels: &mut HashMap<String, Level>, now: i64) {
        levels.retain(|_, l| l.at(now) < l.cap);
    }

    /// The number of buckets held (not full).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        lock(&self.levels).len()
    }
}

/// Obtains the grant of `buckets` from the local store, waiting as it says, until
/// `max_wait` has passed (then `QueueTimeout`).
pub(crate) async fn local(
    store: Arc<ScopeBuckets>,
    buckets: Vec<GrantBucket>,
    max_wait: Duration,
) -> Result<Option<Hold>, Error> {
    let deadline = Instant::now() + max_wait;
    loop {
        let now = Instant::now();
        match store.try_grant(&buckets, now) {
            Ok(()) => return Ok(Some(Hold::Local { store, buckets })),
            Err(wait) => {
                if now + wait > deadline {
                    crate::metrics::rejected("queue_timeout");
                    return Err(Error::queue_timeout(wait));
                }
                tokio::time::sleep(wait).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket(key: &str, cap: i64, demand: i64) -> GrantBucket {
        GrantBucket {
            kind: 0,
            key: key.to_owned(),
            cap,
            demand,
            required: demand,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn all_or_nothing_across_buckets() {
        let store = ScopeBuckets::default();
        let now = Instant::now();
        let a = bucket("a", 10_000, 6_000);
        let b = bucket("b", 100_000, 6_000);
        store.try_grant(&[a.clone(), b.clone()], now).unwrap();
        // `a` holds 4,000 of the 6,000 needed: nothing is charged, not even `b`.
        let wait = store.try_grant(&[a.clone(), b.clone()], now).unwrap_err();
        // 2,000 of 10,000 per minute: 12 s.
        assert!(
            (Duration::from_secs(12)..Duration::from_millis(12_001)).contains(&wait),
            "{wait:?}"
        );
        // `b` alone still holds 94,000: the refused grant charged it nothing.
        for _ in 0..15 {
            store.try_grant(std::slice::from_ref(&b), now).unwrap();
        }
        assert!(store.try_grant(std::slice::from_ref(&b), now).is_err());
        // After the wait, `a` grants again.
        assert!(store.try_grant(&[a], now + wait).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn settlement_refunds_up_to_the_capacity_and_forgets_full_buckets() {
        let store = ScopeBuckets::default();
        let now = Instant::now();
        let a = bucket("a", 10_000, 8_000);
        store.try_grant(std::slice::from_ref(&a), now).unwrap();
        assert_eq!(store.len(), 1);
        store.settle(std::slice::from_ref(&a), &[5_000], now);
        store.settle(std::slice::from_ref(&a), &[5_000], now);
        assert_eq!(store.len(), 0, "refilled to full: forgotten");
        // A settlement that charges more than reserved leaves the bucket in debt.
        store.try_grant(std::slice::from_ref(&a), now).unwrap();
        store.settle(std::slice::from_ref(&a), &[-4_000], now);
        let wait = store.try_grant(&[bucket("a", 10_000, 1)], now).unwrap_err();
        assert!(wait > Duration::from_secs(12), "{wait:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_local_grant_waits_and_times_out() {
        let store = Arc::new(ScopeBuckets::default());
        let a = bucket("a", 60_000, 60_000);
        local(Arc::clone(&store), vec![a.clone()], Duration::ZERO)
            .await
            .unwrap()
            .unwrap();
        let started = Instant::now();
        let err = local(Arc::clone(&store), vec![a.clone()], Duration::from_secs(1))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), claude_core::ErrorKind::QueueTimeout);
        // With enough patience it passes after the refill (virtual time).
        local(Arc::clone(&store), vec![a], Duration::from_secs(120))
            .await
            .unwrap()
            .unwrap();
        assert!(started.elapsed() >= Duration::from_secs(59));
    }
}
