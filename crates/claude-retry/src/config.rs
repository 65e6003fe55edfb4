//! [`RetryConfig`]: what is retried, how long to wait, and the limits that stop a storm.
//!
//! Every field has a default modelled on the official Anthropic SDKs (2 retries; backoff
//! `min(0.5 s · 2^n, 8 s)` with the SDKs' jitter; the server's wait honoured up to 60 s;
//! 10 minutes for the whole request, the SDKs' default timeout). The struct reads from any
//! serde format (TOML in `claude-stack`), with unknown fields refused and durations written
//! as `"500ms"`, `"1.5s"`, `"10m"` or a number of seconds:
//!
//! ```
//! use std::time::Duration;
//! use claude_retry::{Jitter, RetryConfig};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let config: RetryConfig = serde_json::from_str(
//!     r#"{"max_retries": 4, "initial_backoff": "250ms", "jitter": "full",
//!         "budget": {"retry_ratio": 0.1}}"#,
//! )?;
//! assert_eq!(config.max_retries, 4);
//! assert_eq!(config.initial_backoff, Duration::from_millis(250));
//! assert_eq!(config.jitter, Jitter::Full);
//! assert_eq!(config.max_backoff, Duration::from_secs(8)); // default kept
//! config.validate()?;
//! # Ok(())
//! # }
//! ```

use std::time::Duration;

use serde::Deserialize;

/// How the exponential backoff is randomised, so that clients that failed together do not
/// retry together.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Jitter {
    /// The official SDKs' jitter: `wait × (1 − 0.25·U)`, `U` uniform in `[0, 1)`, so the
    /// wait lands between 75 % and 100 % of the base. The default.
    #[default]
    Sdk,
    /// "Full jitter": `U · wait`, anywhere between zero and the base. Spreads a herd best;
    /// the mean wait is half the base.
    Full,
    /// No randomness: exactly the base wait.
    None,
}

/// Settings of the retry budget shared by every clone of a retry service (see
/// [`RetryBudget`](crate::RetryBudget)).
///
/// Within a sliding `window`, retries are allowed while
/// `retries + 1 ≤ retry_ratio × requests + min_per_sec × window` (seconds).
/// The defaults (20 % of requests, plus 10 per second, over 10 s) are Finagle's and
/// tower's `TpsBudget` defaults.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BudgetConfig {
    /// The sliding window over which requests and retries are counted. Default 10 s; at
    /// least 10 ms (see [`RetryConfig::validate`]).
    #[serde(with = "claude_core::config::duration")]
    pub window: Duration,
    /// The share of requests that may be retried, e.g. `0.2` for one retry per five
    /// requests. Fractions are honoured exactly to the millionth (tower's `TpsBudget`
    /// truncates them, tower#857). Default 0.2; between 0 and 1000.
    pub retry_ratio: f64,
    /// Retries allowed per second of window on top of the ratio, so that a client with
    /// little traffic can still retry. Default 10.
    pub min_per_sec: u32,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(10),
            retry_ratio: 0.2,
            min_per_sec: 10,
        }
    }
}

/// Configuration of [`RetryLayer`](crate::RetryLayer). Every field has a default; see the
/// field docs.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryConfig {
    /// Retries after the first attempt: `2` means at most 3 attempts. Default 2, like the
    /// official SDKs.
    pub max_retries: u32,
    /// The backoff before the first retry when the server names no wait. Retry `n`
    /// (0-based) waits `min(initial_backoff · 2^n, max_backoff)`, then [`jitter`](Self::jitter)
    /// applies. Default 500 ms.
    #[serde(with = "claude_core::config::duration")]
    pub initial_backoff: Duration,
    /// The longest backoff. Default 8 s.
    #[serde(with = "claude_core::config::duration")]
    pub max_backoff: Duration,
    /// How the backoff is randomised. Default [`Jitter::Sdk`]. Server-named waits are
    /// never jittered: the server said when.
    pub jitter: Jitter,
    /// The longest server-named wait (`retry-after-ms`, `retry-after`) the layer sleeps
    /// for. A longer one is not retried: the response goes back at once, since retrying
    /// earlier than the server asked fails for sure. Default 60 s (the Python SDK's cap).
    #[serde(with = "claude_core::config::duration")]
    pub max_retry_after: Duration,
    /// The time the whole request may take, across attempts and waits, counted from the
    /// call. It bounds the attempt in flight, the read of an error body and the peek of
    /// the first stream event ([`ErrorKind::Timeout`](claude_core::ErrorKind::Timeout)),
    /// and a retry whose wait would end past it is not made. A [`Deadline`](crate::Deadline)
    /// request extension overrides it. Default 10 min, the SDKs' default timeout.
    #[serde(with = "claude_core::config::duration")]
    pub deadline: Duration,
    /// Whether a `200 text/event-stream` response is held back until its first event is
    /// read, so that a first-event `event: error` of a retryable type is retried (the
    /// caller has seen nothing yet). Default true.
    pub peek_first_event: bool,
    /// The most bytes read from an error body to classify it by `error.type` (and from a
    /// stream while looking for its first event). A longer body is classified by status
    /// alone and handed on intact. Default 64 KiB.
    pub error_body_limit: usize,
    /// The retry budget. Default [`BudgetConfig::default`].
    pub budget: BudgetConfig,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_retries: 2,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(8),
            jitter: Jitter::Sdk,
            max_retry_after: Duration::from_secs(60),
            deadline: Duration::from_secs(600),
            peek_first_event: true,
            error_body_limit: 64 * 1024,
            budget: BudgetConfig::default(),
        }
    }
}

/// A configuration value out of range (see [`RetryConfig::validate`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid retry configuration: {0}")]
pub struct ConfigError(String);

/// The shortest budget window: one millisecond per slot.
pub(crate) const MIN_WINDOW: Duration = Duration::from_millis(10);
/// The largest retry ratio (the bound tower's `TpsBudget` uses too).
pub(crate) const MAX_RATIO: f64 = 1000.0;

impl RetryConfig {
    /// Checks the values a configuration file could get wrong.
    ///
    /// The layer never panics on a bad configuration: it clamps (a ratio that is negative
    /// or not a number counts as 0, above 1000 as 1000; a window under 10 ms as 10 ms).
    /// Call this when loading configuration to refuse such values instead.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] when `budget.retry_ratio` is not a number between 0 and 1000, or
    /// `budget.window` is shorter than 10 ms.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.budget.validate()
    }
}

impl BudgetConfig {
    /// See [`RetryConfig::validate`].
    ///
    /// # Errors
    ///
    /// [`ConfigError`] for a ratio outside `0..=1000` (or NaN) or a window under 10 ms.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(0.0..=MAX_RATIO).contains(&self.retry_ratio) {
            return Err(ConfigError(format!(
                "budget.retry_ratio must be between 0 and {MAX_RATIO}, got {}",
                self.retry_ratio
            )));
        }
        if self.window < MIN_WINDOW {
            return Err(ConfigError(format!(
                "budget.window must be at least {MIN_WINDOW:?}, got {:?}",
                self.window
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_sdks() {
        let c = RetryConfig::default();
        assert_eq!(c.max_retries, 2);
        assert_eq!(c.initial_backoff, Duration::from_millis(500));
        assert_eq!(c.max_backoff, Duration::from_secs(8));
        assert_eq!(c.jitter, Jitter::Sdk);
        assert_eq!(c.max_retry_after, Duration::from_secs(60));
        assert_eq!(c.deadline, Duration::from_secs(600));
        assert!(c.peek_first_event);
        assert_eq!(c.error_body_limit, 65_536);
        assert_eq!(c.budget.window, Duration::from_secs(10));
        assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn deserializes_with_defaults_and_refuses_unknown_fields() {
        let c: RetryConfig = serde_json::from_str(
            r#"{"deadline":"2m","max_retry_after":30,"jitter":"none","budget":{"window":"1s","min_per_sec":0}}"#,
        )
        .unwrap();
        assert_eq!(c.deadline, Duration::from_secs(120));
        assert_eq!(c.max_retry_after, Duration::from_secs(30));
        assert_eq!(c.jitter, Jitter::None);
        assert_eq!(c.budget.window, Duration::from_secs(1));
        assert_eq!(c.budget.min_per_sec, 0);
        assert!((c.budget.retry_ratio - 0.2).abs() < f64::EPSILON);
        assert_eq!(c.max_retries, 2);
        assert!(serde_json::from_str::<RetryConfig>(r#"{"max_retry":3}"#).is_err());
        assert!(serde_json::from_str::<RetryConfig>(r#"{"budget":{"ratio":1}}"#).is_err());
        assert!(serde_json::from_str::<RetryConfig>(r#"{"jitter":"half"}"#).is_err());
    }

    #[test]
    fn validate_refuses_bad_budgets() {
        let mut c = RetryConfig::default();
        c.budget.retry_ratio = f64::NAN;
        assert!(c.validate().is_err());
        c.budget.retry_ratio = -0.1;
        assert!(c.validate().is_err());
        c.budget.retry_ratio = 1000.5;
        assert!(c.validate().is_err());
        c.budget.retry_ratio = 0.3;
        c.budget.window = Duration::from_millis(5);
        let err = c.validate().unwrap_err();
        assert!(err.to_string().contains("budget.window"), "{err}");
    }
}
