//! Exponential backoff with jitter, and the tiny random number generator behind it.
//!
//! The generator is SplitMix64 over one shared `AtomicU64` (a `fetch_add` per draw, no
//! lock, no dependency): retries are rare, statistical quality needs are modest (spreading
//! a herd), and a fixed seed makes the sequence reproducible
//! ([`RetryLayer::jitter_seed`](crate::RetryLayer::jitter_seed)). The default seed comes
//! from the standard library's randomly keyed hasher, as tower's `HasherRng` does.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::config::{Jitter, RetryConfig};

const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64 on an atomic counter: thread-safe, lock-free.
#[derive(Debug)]
pub(crate) struct Rng {
    state: AtomicU64,
}

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Self {
            state: AtomicU64::new(seed),
        }
    }

    pub(crate) fn from_entropy() -> Self {
        let mut h = RandomState::new().build_hasher();
        h.write_u64(GAMMA);
        Self::new(h.finish())
    }

    pub(crate) fn next_u64(&self) -> u64 {
        let mut z = self
            .state
            .fetch_add(GAMMA, Ordering::Relaxed)
            .wrapping_add(GAMMA);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub(crate) fn unit(&self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// The base wait before retry `n` (0 before the first retry): `min(initial · 2^n, max)`.
pub(crate) fn base_backoff(config: &RetryConfig, n: u32) -> Duration {
    config
        .initial_backoff
        .checked_mul(1u32 << n.min(31))
        .unwrap_or(Duration::MAX)
        .min(config.max_backoff)
}

/// Applies the jitter to a base wait, with `u` uniform in `[0, 1)`.
pub(crate) fn jittered(base: Duration, jitter: Jitter, u: f64) -> Duration {
    let u = u.clamp(0.0, 1.0);
    match jitter {
        Jitter::Sdk => base.mul_f64(1.0 - 0.25 * u),
        Jitter::Full => base.mul_f64(u),
        Jitter::None => base,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sdk_schedule() {
        let c = RetryConfig::default();
        let ms = |n| base_backoff(&c, n).as_millis();
        assert_eq!(
            [ms(0), ms(1), ms(2), ms(3), ms(4), ms(5)],
            [500, 1000, 2000, 4000, 8000, 8000]
        );
        assert_eq!(base_backoff(&c, 1000), Duration::from_secs(8));
        let huge = RetryConfig {
            initial_backoff: Duration::from_secs(u64::MAX / 2),
            max_backoff: Duration::MAX,
            ..RetryConfig::default()
        };
        assert_eq!(base_backoff(&huge, 40), Duration::MAX);
    }

    #[test]
    fn jitter_bounds() {
        let base = Duration::from_secs(1);
        assert_eq!(jittered(base, Jitter::Sdk, 0.0), base);
        assert_eq!(jittered(base, Jitter::Sdk, 0.5), Duration::from_millis(875));
        assert_eq!(jittered(base, Jitter::Full, 0.0), Duration::ZERO);
        assert_eq!(
            jittered(base, Jitter::Full, 0.25),
            Duration::from_millis(250)
        );
        assert_eq!(jittered(base, Jitter::None, 0.9), base);
        let rng = Rng::new(7);
        for _ in 0..10_000 {
            let u = rng.unit();
            assert!((0.0..1.0).contains(&u));
            let sdk = jittered(base, Jitter::Sdk, u);
            assert!(sdk > Duration::from_millis(750) && sdk <= base, "{sdk:?}");
            assert!(jittered(base, Jitter::Full, u) < base);
        }
    }

    #[test]
    fn rng_is_reproducible_and_spread() {
        let a = Rng::new(42);
        let b = Rng::new(42);
        let xs: Vec<u64> = (0..8).map(|_| a.next_u64()).collect();
        let ys: Vec<u64> = (0..8).map(|_| b.next_u64()).collect();
        assert_eq!(xs, ys);
        // Mean of many uniforms is near 0.5 (a stuck or biased generator fails this).
        let r = Rng::from_entropy();
        let mean = (0..20_000).map(|_| r.unit()).sum::<f64>() / 20_000.0;
        assert!((mean - 0.5).abs() < 0.02, "{mean}");
        assert_ne!(
            Rng::from_entropy().next_u64(),
            Rng::from_entropy().next_u64()
        );
    }
}
