//! One token bucket with continuous refill, in fixed point.
//!
//! Levels are counted in thousandths of a unit ("milli-tokens", or milli-requests for the
//! request bucket) in an `i64`, so refunds and overages are exact and a bucket may go below
//! zero (an answer that used more than it reserved puts the bucket in debt, as the server's
//! own bucket would be). Capacity is the per-minute limit and the bucket refills at
//! `limit / 60` per second, continuously: the refill is computed from the elapsed
//! nanoseconds, and the remainder of the division is carried to the next refill, so
//! refilling often loses nothing and the level after `t` seconds is exact whatever the
//! number of refills in between.

use std::time::Duration;

use tokio::time::Instant;

/// Milli-units per unit.
pub(crate) const MILLI: i64 = 1000;

const NANOS_PER_MINUTE: u128 = 60_000_000_000;

/// A token bucket of capacity `limit` units that refills at `limit / 60` units per second.
#[derive(Debug, Clone)]
pub(crate) struct Bucket {
    limit: u64,
    /// Capacity in milli-units.
    cap: i64,
    /// Current level in milli-units; may be negative (debt).
    level: i64,
    /// Remainder of the last refill division (numerator units: nanosecond × milli-unit).
    carry: u64,
    /// When the level was last brought up to date.
    updated: Instant,
}

impl Bucket {
    /// A full bucket of `limit` units per minute. `limit` must be at least 1.
    pub(crate) fn new(limit: u64, now: Instant) -> Self {
        let cap = i64::try_from(limit.saturating_mul(MILLI as u64)).unwrap_or(i64::MAX / 2);
        Self {
            limit,
            cap,
            level: cap,
            carry: 0,
            updated: now,
        }
    }

    /// The per-minute limit.
    pub(crate) fn limit(&self) -> u64 {
        self.limit
    }

    /// The capacity in milli-units.
    #[cfg(test)]
    pub(crate) fn capacity(&self) -> i64 {
        self.cap
    }

    /// The level in milli-units (call [`refill`](Self::refill) first).
    pub(crate) fn level(&self) -> i64 {
        self.level
    }

    /// Whether the bucket is full.
    pub(crate) fn is_full(&self) -> bool {
        self.level >= self.cap
    }

    /// Brings the level up to `now`.
    pub(crate) fn refill(&mut self, now: Instant) {
        if now <= self.updated {
            return;
        }
        let elapsed = now.duration_since(self.updated).as_nanos();
        self.updated = now;
        if self.level >= self.cap {
            self.carry = 0;
            return;
        }
        let num = elapsed
            .saturating_mul(self.cap as u128)
            .saturating_add(u128::from(self.carry));
        let add = num / NANOS_PER_MINUTE;
        self.carry = (num % NANOS_PER_MINUTE) as u64;
        let level =
            (i128::from(self.level) + add.min(i128::MAX as u128) as i128).min(i128::from(self.cap));
        self.level = level as i64;
        if self.level >= self.cap {
            self.carry = 0;
        }
    }

    /// How long until the level reaches `required` milli-units (zero when it has). The
    /// figure is linear in the deficit: it ignores the capacity, so it is also the drain
    /// time of a queue whose total demand exceeds the capacity.
    pub(crate) fn time_until(&self, required: i64) -> Duration {
        if self.level >= required {
            return Duration::ZERO;
        }
        let deficit = (i128::from(required) - i128::from(self.level)) as u128;
        let num = deficit
            .saturating_mul(NANOS_PER_MINUTE)
            .saturating_sub(u128::from(self.carry));
        let nanos = num.div_ceil(self.cap.max(1) as u128);
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    /// Takes `amount` milli-units (the level may go negative).
    pub(crate) fn charge(&mut self, amount: i64) {
        self.level = self.level.saturating_sub(amount);
    }

    /// Gives back `amount` milli-units, never above the capacity.
    pub(crate) fn refund(&mut self, amount: i64) {
        self.level = self.level.saturating_add(amount).min(self.cap);
        if self.level >= self.cap {
            self.carry = 0;
        }
    }

    /// Lowers the level to `max` milli-units if it is above; returns whether it was.
    pub(crate) fn clamp(&mut self, max: i64) -> bool {
        if self.level > max {
            self.level = max;
            self.carry = 0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn refills_continuously_and_exactly() {
        let t0 = Instant::now();
        let mut b = Bucket::new(600, t0); // 10 per second
        assert_eq!(b.capacity(), 600_000);
        b.charge(600_000);
        assert_eq!(b.level(), 0);
        // 1,000 refills of 1 ms each add exactly what one refill of 1 s adds.
        for i in 1..=1000 {
            b.refill(t0 + Duration::from_millis(i));
        }
        assert_eq!(b.level(), 10_000);
        // Sub-milli refills are carried, not lost: 3 refills of 1/3 of a milli-unit.
        let mut c = Bucket::new(1, t0); // 1 per minute: 1 milli-unit per 60 ms
        c.charge(1000);
        c.refill(t0 + Duration::from_millis(20));
        c.refill(t0 + Duration::from_millis(40));
        assert_eq!(c.level(), 0);
        c.refill(t0 + Duration::from_millis(60));
        assert_eq!(c.level(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn never_above_capacity_and_debt_refills() {
        let t0 = Instant::now();
        let mut b = Bucket::new(60, t0); // 1 per second
        b.refill(t0 + Duration::from_secs(100));
        assert_eq!(b.level(), 60_000);
        assert!(b.is_full());
        b.charge(70_000); // 10 units of debt
        assert_eq!(b.level(), -10_000);
        let t1 = t0 + Duration::from_secs(100);
        assert_eq!(b.time_until(0), Duration::from_secs(10));
        assert_eq!(b.time_until(5_000), Duration::from_secs(15));
        b.refill(t1 + Duration::from_secs(10));
        assert_eq!(b.level(), 0);
        b.refund(1_000_000);
        assert_eq!(b.level(), 60_000);
    }

    #[tokio::test(start_paused = true)]
    async fn time_until_is_exact_and_rounds_up() {
        let t0 = Instant::now();
        let mut b = Bucket::new(7, t0); // 7 per minute: awkward rate
        b.charge(7_000);
        let wait = b.time_until(1_000);
        b.refill(t0 + wait);
        assert!(b.level() >= 1_000, "level {} after {wait:?}", b.level());
        // One nanosecond earlier is not enough.
        let mut c = Bucket::new(7, t0);
        c.charge(7_000);
        c.refill(t0 + wait - Duration::from_nanos(1));
        assert!(c.level() < 1_000);
    }

    #[tokio::test(start_paused = true)]
    async fn clamp_only_lowers() {
        let t0 = Instant::now();
        let mut b = Bucket::new(100, t0);
        assert!(!b.clamp(200_000));
        assert_eq!(b.level(), 100_000);
        assert!(b.clamp(40_000));
        assert_eq!(b.level(), 40_000);
        assert!(!b.clamp(40_000));
    }
}
