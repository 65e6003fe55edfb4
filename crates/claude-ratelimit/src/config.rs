//! The configuration of [`RateLimitLayer`](crate::RateLimitLayer), readable from TOML/JSON.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What one set of buckets (one queue) is shared by.
///
/// Anthropic's limits are per organization and per model family (Opus 4.x share one pool,
/// Sonnet 4.x another), so the default keys buckets by model family and, inside a gateway
/// shared by many applications, by tenant too, so one tenant's burst queues behind its own
/// limit instead of everyone's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyScope {
    /// One set of buckets for every request.
    Global,
    /// One set per [`Tenant`](claude_core::Tenant).
    Tenant,
    /// One set per model family ([`RequestMeta::model_family`](claude_core::RequestMeta::model_family)).
    ModelFamily,
    /// One set per tenant and model family (the default).
    #[default]
    TenantAndModelFamily,
}

impl KeyScope {
    /// Whether keys include the tenant.
    pub const fn has_tenant(self) -> bool {
        matches!(self, Self::Tenant | Self::TenantAndModelFamily)
    }

    /// Whether keys include the model family.
    pub const fn has_model_family(self) -> bool {
        matches!(self, Self::ModelFamily | Self::TenantAndModelFamily)
    }
}

impl KeyScope {
    /// The name of the scope as written in a configuration (`"tenant_and_model_family"`).
    pub const fn name(self) -> &'static str {
        match self {
            Self::Global => "global",
            Self::Tenant => "tenant",
            Self::ModelFamily => "model_family",
            Self::TenantAndModelFamily => "tenant_and_model_family",
        }
    }
}

/// Further limits over another [`KeyScope`] than the layer's own
/// ([`RateLimitConfig::scopes`]): for example 50 RPM per tenant and model family (the
/// layer's scope) and, at the same time, 4,000 RPM per model family for the whole
/// organisation. A request passes only when every scope it touches holds it: all or
/// nothing, never charging one scope for a request another refused.
///
/// ```
/// use claude_ratelimit::{KeyScope, RateLimitConfig};
///
/// # fn main() -> Result<(), serde_json::Error> {
/// let config: RateLimitConfig = serde_json::from_str(r#"{
///     "requests_per_minute": 50,
///     "scopes": [
///         { "scope": "model_family", "requests_per_minute": 4000, "input_tokens_per_minute": 2000000 },
///         { "scope": "global", "requests_per_minute": 10000 }
///     ]
/// }"#)?;
/// assert_eq!(config.scopes[0].scope, KeyScope::ModelFamily);
/// assert!(config.validate().is_ok());
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScopeLimits {
    /// What these buckets are shared by. Must differ from the layer's own scope and from
    /// the other entries'.
    pub scope: KeyScope,
    /// Requests per minute per key of this scope. Default `None`: unlimited.
    #[serde(default)]
    pub requests_per_minute: Option<u64>,
    /// Input tokens per minute per key of this scope. Default `None`: unlimited.
    #[serde(default)]
    pub input_tokens_per_minute: Option<u64>,
    /// Output tokens per minute per key of this scope. Default `None`: unlimited.
    #[serde(default)]
    pub output_tokens_per_minute: Option<u64>,
}

impl ScopeLimits {
    /// No limit yet over `scope` (set the fields).
    pub const fn new(scope: KeyScope) -> Self {
        Self {
            scope,
            requests_per_minute: None,
            input_tokens_per_minute: None,
            output_tokens_per_minute: None,
        }
    }

    /// The three limits, in the order requests, input, output.
    pub(crate) const fn limits(&self) -> [Option<u64>; 3] {
        [
            self.requests_per_minute,
            self.input_tokens_per_minute,
            self.output_tokens_per_minute,
        ]
    }
}

/// The configuration of a [`RateLimitLayer`](crate::RateLimitLayer).
///
/// Every field has a default (below), so a config file names only what it changes; unknown
/// fields are an error. Durations read as `"500ms"`, `"1.5s"`, `"2m"` or a number of
/// seconds ([`claude_core::config`]).
///
/// ```
/// use std::time::Duration;
/// use claude_ratelimit::{KeyScope, RateLimitConfig};
///
/// # fn main() -> Result<(), serde_json::Error> {
/// let config: RateLimitConfig = serde_json::from_str(r#"{
///     "requests_per_minute": 50,
///     "input_tokens_per_minute": 30000,
///     "output_tokens_per_minute": 8000,
///     "max_concurrent_requests": 16,
///     "scope": "model_family",
///     "max_wait": "20s"
/// }"#)?;
/// assert_eq!(config.max_wait, Duration::from_secs(20));
/// assert_eq!(config.scope, KeyScope::ModelFamily);
/// assert!(config.follow_server); // a default
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Requests per minute per key (RPM). Default `None`: unlimited.
    pub requests_per_minute: Option<u64>,
    /// Input tokens per minute per key (ITPM), counted as Anthropic counts them:
    /// `input_tokens + cache_creation_input_tokens`, plus cache reads on Haiku 3 and 3.5.
    /// Default `None`: unlimited.
    pub input_tokens_per_minute: Option<u64>,
    /// Output tokens per minute per key (OTPM). Default `None`: unlimited.
    pub output_tokens_per_minute: Option<u64>,
    /// Requests in flight per key, from the call until the response body ends or is
    /// dropped (a stream occupies the upstream until its end). Default `None`: unlimited.
    pub max_concurrent_requests: Option<u32>,
    /// What a key is made of. Default [`KeyScope::TenantAndModelFamily`].
    pub scope: KeyScope,
    /// The share of `max_tokens` reserved from the output bucket before sending, settled to
    /// the real output when the answer ends. Default `1.0` ("strict": never overshoots,
    /// matches the 2025 server behaviour that estimated OTPM from `max_tokens`); a smaller
    /// figure admits more requests at once and relies on settlement and the server's
    /// headers to correct. Must be finite and non-negative.
    pub output_reservation_ratio: f64,
    /// Requests waiting per key at most; one more is refused at once with a 429
    /// ([`ErrorKind::QueueFull`](claude_core::ErrorKind::QueueFull)). `0` disables the
    /// queue (a request that cannot pass at once is refused). Default `1000`.
    pub max_queue: usize,
    /// The longest a request may wait in the queue. A request whose estimated wait is
    /// longer is refused at once with a 429
    /// ([`ErrorKind::QueueTimeout`](claude_core::ErrorKind::QueueTimeout)) carrying the
    /// estimate as `retry-after`; one still waiting when it runs out is refused then.
    /// The estimate counts output reservations at the share of them that this key's recent
    /// answers used, which is all of it before any answer has settled: the first burst
    /// through a strict layer (`output_reservation_ratio` 1.0) is estimated at its worst
    /// case. Default 30 s.
    #[serde(with = "claude_core::config::duration")]
    pub max_wait: Duration,
    /// Follow the server: lower the buckets to the `anthropic-ratelimit-*-remaining` figures
    /// of every response, and pause the key after a 429 until its `retry-after`.
    /// Default `true`.
    pub follow_server: bool,
    /// Headroom against timing noise: every bucket keeps what it refills in this much time
    /// unspent (but a request as large as the whole bucket can still pass), so the delay
    /// between the moment the layer admits a request and the moment the server counts it
    /// (connection set-up, scheduling) cannot make the server's bucket come up short.
    /// Default 100 ms (at 30,000 ITPM: 50 tokens).
    #[serde(with = "claude_core::config::duration")]
    pub safety_margin: Duration,
    /// The longest pause a server's `retry-after` (or, without one, its `-reset` time) may
    /// impose on a key. Default 60 s.
    #[serde(with = "claude_core::config::duration")]
    pub max_pause: Duration,
    /// Further limits over other scopes, checked together with the key's own: a request
    /// the key's buckets admitted (after its turn in the key's queue) must also be granted
    /// by the buckets of every scope listed here, all at once, or it waits (holding its
    /// admission) until they would hold it, at most `max_wait`, and is then refused with
    /// `QueueTimeout`. With Redis, the key's buckets and these are granted in one atomic
    /// script. Settled like the key's buckets. The server's `anthropic-ratelimit-*`
    /// figures correct the key's buckets only. Default: none.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<ScopeLimits>,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            requests_per_minute: None,
            input_tokens_per_minute: None,
            output_tokens_per_minute: None,
            max_concurrent_requests: None,
            scope: KeyScope::default(),
            output_reservation_ratio: 1.0,
            max_queue: 1000,
            max_wait: Duration::from_secs(30),
            follow_server: true,
            safety_margin: Duration::from_millis(100),
            max_pause: Duration::from_secs(60),
            scopes: Vec::new(),
        }
    }
}

/// A configuration value that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid rate-limit configuration: {0}")]
pub struct ConfigError(String);

impl RateLimitConfig {
    /// Checks the values: limits at least 1, a finite non-negative reservation ratio,
    /// further scopes distinct and each with a limit.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_limits(
            "",
            &[
                ("requests_per_minute", self.requests_per_minute),
                ("input_tokens_per_minute", self.input_tokens_per_minute),
                ("output_tokens_per_minute", self.output_tokens_per_minute),
                (
                    "max_concurrent_requests",
                    self.max_concurrent_requests.map(u64::from),
                ),
            ],
        )?;
        for (i, extra) in self.scopes.iter().enumerate() {
            let at = format!("scopes[{i}].");
            let [rpm, itpm, otpm] = extra.limits();
            check_limits(
                &at,
                &[
                    ("requests_per_minute", rpm),
                    ("input_tokens_per_minute", itpm),
                    ("output_tokens_per_minute", otpm),
                ],
            )?;
            if extra.limits().iter().all(Option::is_none) {
                return Err(ConfigError(format!(
                    "`{at}scope` (\"{}\") sets no limit: give it requests_per_minute, \
                     input_tokens_per_minute or output_tokens_per_minute, or remove it",
                    extra.scope.name()
                )));
            }
            if extra.scope == self.scope || self.scopes[..i].iter().any(|e| e.scope == extra.scope)
            {
                return Err(ConfigError(format!(
                    "`{at}scope`: the scope \"{}\" is already limited (each scope may \
                     appear once, and not again as the layer's own `scope`)",
                    extra.scope.name()
                )));
            }
        }
        if !self.output_reservation_ratio.is_finite() || self.output_reservation_ratio < 0.0 {
            return Err(ConfigError(
                "`output_reservation_ratio` must be a finite number >= 0".to_owned(),
            ));
        }
        Ok(())
    }
}

fn check_limits(at: &str, values: &[(&str, Option<u64>)]) -> Result<(), ConfigError> {
    for (name, value) in values {
        if *value == Some(0) {
            return Err(ConfigError(format!(
                "`{at}{name}` must be at least 1 (leave it out for no limit)"
            )));
        }
        if value.is_some_and(|v| v > MAX_LIMIT) {
            return Err(ConfigError(format!(
                "`{at}{name}` must be at most {MAX_LIMIT}"
            )));
        }
    }
    Ok(())
}

/// The largest limit accepted (a trillion per minute): keeps the fixed-point arithmetic far
/// from overflow.
const MAX_LIMIT: u64 = 1_000_000_000_000;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_partial_files() {
        let c: RateLimitConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(c, RateLimitConfig::default());
        let c: RateLimitConfig = serde_json::from_str(
            r#"{"max_wait": 1.5, "safety_margin": "250ms", "scope": "tenant"}"#,
        )
        .unwrap();
        assert_eq!(c.max_wait, Duration::from_millis(1500));
        assert_eq!(c.safety_margin, Duration::from_millis(250));
        assert_eq!(c.scope, KeyScope::Tenant);
        assert!(c.scope.has_tenant() && !c.scope.has_model_family());
    }

    #[test]
    fn unknown_fields_and_bad_values_are_errors() {
        assert!(serde_json::from_str::<RateLimitConfig>(r#"{"rpm": 5}"#).is_err());
        assert!(serde_json::from_str::<RateLimitConfig>(r#"{"max_wait": "soon"}"#).is_err());
        let c = RateLimitConfig {
            requests_per_minute: Some(0),
            ..RateLimitConfig::default()
        };
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("requests_per_minute")
        );
        let c = RateLimitConfig {
            output_reservation_ratio: f64::NAN,
            ..RateLimitConfig::default()
        };
        assert!(c.validate().is_err());
        assert!(RateLimitConfig::default().validate().is_ok());
    }

    #[test]
    fn further_scopes_are_checked() {
        let c: RateLimitConfig =
            serde_json::from_str(r#"{"scopes": [{"scope": "global", "requests_per_minute": 10}]}"#)
                .unwrap();
        assert!(c.validate().is_ok());
        for (text, needle) in [
            (r#"{"scopes": [{"scope": "global"}]}"#, "sets no limit"),
            (
                r#"{"scopes": [{"scope": "global", "requests_per_minute": 0}]}"#,
                "scopes[0].requests_per_minute",
            ),
            (
                r#"{"scopes": [{"scope": "tenant_and_model_family", "requests_per_minute": 5}]}"#,
                "already limited",
            ),
            (
                r#"{"scopes": [{"scope": "global", "requests_per_minute": 5},
                              {"scope": "global", "requests_per_minute": 6}]}"#,
                "scopes[1].scope",
            ),
        ] {
            let c: RateLimitConfig = serde_json::from_str(text).unwrap();
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(needle), "{text}: {e}");
        }
        assert!(
            serde_json::from_str::<RateLimitConfig>(
                r#"{"scopes": [{"scope": "global", "rpm": 1}]}"#
            )
            .is_err()
        );
    }

    #[test]
    fn round_trips_through_serde() {
        let c = RateLimitConfig {
            requests_per_minute: Some(50),
            max_wait: Duration::from_millis(2500),
            scopes: vec![ScopeLimits {
                input_tokens_per_minute: Some(9000),
                ..ScopeLimits::new(KeyScope::Global)
            }],
            ..RateLimitConfig::default()
        };
        let text = serde_json::to_string(&c).unwrap();
        let back: RateLimitConfig = serde_json::from_str(&text).unwrap();
        assert_eq!(back, c);
    }
}
