//! [`ClaudeStack`]: every layer in the documented order, each optional, around any service.
//!
//! # Order (outermost first) and why
//!
//! 0. **observe**: one `tracing` span per request with the GenAI attribute names, request
//!    headers that carry keys marked sensitive, and the stack's overhead histogram (see
//!    [`crate::OVERHEAD_SECONDS`]).
//! 1. **cost**: checks the budget before anything is spent, and records the final usage
//!    once per request, whatever happened below (a retried request is charged once, for
//!    the answer the caller got; a cache hit is recorded as savings).
//! 2. **cache**: a hit returns here, so it costs nothing upstream and touches no limiter.
//! 3. **retry**: each attempt below is a fresh pass through the timeout, the limiter and the
//!    key layer.
//! 4. **per-attempt timeout** (until the response headers): inside retry, so a timed-out
//!    attempt is retried.
//! 5. **rate limit**: every attempt waits its turn, so retries cannot break the limits.
//! 6. **API key**: injects the key; on a 401 it refreshes and replays once, below the retry
//!    layer (a rotated key costs no retry).
//! 7. the HTTP client (or any service you pass).
//!
//! Layers that are switched off are simply absent. So that optional layers compose, the
//! present layers are erased to one [`StackService`] type in four groups (the limiter with
//! the key layer and the client; retry with the timeout; cost with the cache; observe): its
//! clones share one allocation, each call boxes the group's future (observe's is boxed
//! already and is not boxed again), and the group's response body is boxed once unless it
//! passes its inner body through.

use std::time::Duration;

use bytes::Bytes;
use claude_cache::{CacheConfig, CacheHandle, CacheLayer};
use claude_core::{BoxError, Error, ErrorKind};
use claude_cost::{CostConfig, CostTracker};
use claude_ratelimit::{RateLimitConfig, RateLimitLayer};
use claude_retry::{RetryConfig, RetryLayer};
use claude_secrets::ApiKeyLayer;
use claude_secrets::config::SecretsConfig;
use http::{Request, Response};
use http_body::Body;
use http_body_util::combinators::UnsyncBoxBody;
use serde::Deserialize;
use tower::{Layer, Service};

use crate::client::{ClientConfig, HttpClient};
pub use crate::erased::StackService;
use crate::observe::{ObserveLayer, Probe, Probed};
use crate::shared::{RedisOnFailure, RedisUrl};
use crate::toggle::Toggle;

/// The response body of an assembled stack: streamed, boxed once per layer.
pub type StackBody = UnsyncBoxBody<Bytes, BoxError>;

/// Configuration of the whole stack, as one TOML document. Each layer section is `false`
/// (off), `true` (on with defaults) or a table of settings (on).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StackConfig {
    /// The HTTP client at the bottom ([`HttpClient`]).
    pub client: ClientConfig,
    /// Time allowed for one attempt until the response headers (inside the retry layer, so
    /// a timed-out attempt is retried). Default 600 s, the SDKs' default.
    #[serde(with = "claude_core::config::option_duration")]
    pub attempt_timeout: Option<Duration>,
    /// Cost accounting and budgets ([`claude_cost`]). Default: on, bundled prices, no budget.
    pub cost: Toggle<CostConfig>,
    /// The response cache ([`claude_cache`]). Default: off (replaying answers is a choice:
    /// sampled answers are not deterministic).
    pub cache: Toggle<CacheConfig>,
    /// Retries ([`claude_retry`]). Default: on, the SDKs' schedule (2 retries).
    pub retry: Toggle<RetryConfig>,
    /// Client-side rate limits ([`claude_ratelimit`]). Default: off (set the limits your
    /// organisation has).
    pub rate_limit: Toggle<RateLimitConfig>,
    /// API keys ([`claude_secrets`]): sources, environments, rotation. Default: off (the
    /// service below is given requests as they are; the gateway supplies
    /// `ANTHROPIC_API_KEY` when this is off).
    pub secrets: Toggle<SecretsConfig>,
    /// Shares the rate limits, the cache and the budgets with every instance on this Redis
    /// (see [`crate::shared`]; needs the `redis` feature). Default: none (state is local).
    pub redis_url: Option<RedisUrl>,
    /// What the rate limiter and the budgets do while Redis is unreachable. Default:
    /// `fail_open` (each instance's local limits and budgets apply). The cache always
    /// passes through.
    pub redis_on_failure: RedisOnFailure,
}

impl Default for StackConfig {
    fn default() -> Self {
        Self {
            client: ClientConfig::default(),
            attempt_timeout: Some(Duration::from_secs(600)),
            cost: Toggle::On(CostConfig::default()),
            cache: Toggle::Off,
            retry: Toggle::On(RetryConfig::default()),
            rate_limit: Toggle::Off,
            secrets: Toggle::Off,
            redis_url: None,
            redis_on_failure: RedisOnFailure::FailOpen,
        }
    }
}

impl StackConfig {
    /// The same configuration with another upstream base URL (a relay, a proxy, a mock).
    #[must_use]
    pub fn with_base_url(mut self, base_url: impl Into<String>) -> Self {
        self.client.base_url = base_url.into();
        self
    }
}

/// The stack builder: holds the configuration and the state shared by every service it
/// builds (the cost ledger), so two services built from one stack share budgets.
#[derive(Debug, Clone)]
pub struct ClaudeStack {
    config: StackConfig,
    cost: Option<CostTracker>,
    cache: Option<CacheLayer>,
    retry: Option<RetryLayer>,
    rate_limit: Option<RateLimitLayer>,
    api_key: Option<ApiKeyLayer>,
}

impl ClaudeStack {
    /// A stack from its configuration.
    ///
    /// # Errors
    ///
    /// Fails when a section is invalid (e.g. an unreadable price file); the message names
    /// the section.
    pub fn new(config: StackConfig) -> Result<Self, Error> {
        #[cfg(not(feature = "redis"))]
        if config.redis_url.is_some() {
            return Err(Error::new(
                ErrorKind::InvalidRequest,
                "redis_url: this build has no Redis support (enable the `redis` feature of \
                 claude-stack)",
            ));
        }
        #[cfg(feature = "redis")]
        let redis = match &config.redis_url {
            Some(url) => Some(Redis::open(url, config.redis_on_failure)?),
            None => None,
        };
        let cost = match config.cost.as_on() {
            Some(c) => {
                let builder = CostTracker::builder_from_config(c)
                    .map_err(|e| Error::new(ErrorKind::InvalidRequest, format!("cost: {e}")))?;
                #[cfg(feature = "redis")]
                let builder = match &redis {
                    Some(r) => builder.redis(r.budgets.clone()),
                    None => builder,
                };
                Some(builder.build())
            }
            None => None,
        };
        let retry = match config.retry.as_on() {
            Some(c) => {
                c.validate()
                    .map_err(|e| Error::new(ErrorKind::InvalidRequest, format!("retry: {e}")))?;
                Some(RetryLayer::new(c.clone()))
            }
            None => None,
        };
        let cache = config.cache.as_on().map(|c| CacheLayer::new(c.clone()));
        let rate_limit =
            match config.rate_limit.as_on() {
                Some(c) => Some(RateLimitLayer::from_config(c.clone()).map_err(|e| {
                    Error::new(ErrorKind::InvalidRequest, format!("rate_limit: {e}"))
                })?),
                None => None,
            };
        #[cfg(feature = "redis")]
        let (cache, rate_limit) = match &redis {
            Some(r) => (
                cache.map(|c| c.redis(r.cache.clone())),
                rate_limit.map(|l| l.redis(r.limits.clone())),
            ),
            None => (cache, rate_limit),
        };
        let api_key = match config.secrets.as_on() {
            Some(c) => Some(
                c.build_layer()
                    .map_err(|e| Error::new(ErrorKind::InvalidRequest, format!("secrets: {e}")))?,
            ),
            None => None,
        };
        Ok(Self {
            config,
            cost,
            cache,
            retry,
            rate_limit,
            api_key,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &StackConfig {
        &self.config
    }

    /// Uses `layer` for API keys instead of the `secrets` section (e.g. a key ring over a
    /// source built in code).
    #[must_use]
    pub fn with_api_keys(mut self, layer: ApiKeyLayer) -> Self {
        self.api_key = Some(layer);
        self
    }

    /// The rate limiter, when it is on (for snapshots and eviction).
    pub fn rate_limiter(&self) -> Option<&RateLimitLayer> {
        self.rate_limit.as_ref()
    }

    /// The response cache's handle (sizes, invalidation), when the cache is on.
    pub fn cache(&self) -> Option<CacheHandle> {
        self.cache.as_ref().map(CacheLayer::handle)
    }

    /// The cost ledger, when the cost layer is on.
    pub fn cost_tracker(&self) -> Option<&CostTracker> {
        self.cost.as_ref()
    }

    /// The stack around any service of `Request<Bytes>` (a hyper client, a test double).
    pub fn service<S, B>(&self, inner: S) -> StackService
    where
        S: Service<Request<Bytes>, Response = Response<B>> + Clone + Send + Sync + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        // Innermost first. The upstream probe times every attempt to its response headers.
        // Layers that are on together are composed as they are and erased once: every erasure
        // costs each call a boxed future.
        let upstream = Probe::Upstream.layer(inner);
        let mut svc = match (&self.rate_limit, &self.api_key) {
            (Some(limiter), Some(keys)) => {
                StackService::new(limited(limiter, keys.layer(upstream)))
            }
            (Some(limiter), None) => StackService::new(limited(limiter, upstream)),
            (None, Some(keys)) => StackService::new(keys.layer(upstream)),
            (None, None) => StackService::new(upstream),
        };
        let timeout = self
            .config
            .attempt_timeout
            .map(tower::timeout::TimeoutLayer::new);
        svc = match (&self.retry, timeout) {
            (Some(retry), Some(t)) => StackService::new(retry.layer(t.layer(svc))),
            (Some(retry), None) => wrap(svc, retry.clone()),
            (None, Some(t)) => wrap(svc, t),
            (None, None) => svc,
        };
        svc = match (&self.cost, &self.cache) {
            (Some(tracker), Some(cache)) => {
                StackService::new(tracker.layer().layer(cache.layer(svc)))
            }
            (Some(tracker), None) => wrap(svc, tracker.layer()),
            (None, Some(cache)) => wrap(svc, cache.clone()),
            (None, None) => svc,
        };
        // Its future is boxed already: erased without another box.
        StackService::direct(ObserveLayer.layer(svc))
    }

    /// The stack around an [`HttpClient`] built from the `client` section.
    ///
    /// # Errors
    ///
    /// Fails when the client section is invalid.
    pub fn client(&self) -> Result<StackService, Error> {
        let http = HttpClient::new(&self.config.client)?;
        Ok(self.service(http))
    }
}

/// The three Redis clients of a stack (one connection each, created on first use).
#[cfg(feature = "redis")]
struct Redis {
    cache: claude_cache::RedisCache,
    limits: claude_ratelimit::RedisLimits,
    budgets: claude_cost::RedisBudgets,
}

#[cfg(feature = "redis")]
impl Redis {
    fn open(url: &RedisUrl, on_failure: RedisOnFailure) -> Result<Self, Error> {
        let bad = |e: &dyn std::fmt::Display| {
            Error::new(ErrorKind::InvalidRequest, format!("redis_url: {e}"))
        };
        let cache = claude_cache::RedisCache::open(url.expose()).map_err(|e| bad(&e))?;
        let limits = claude_ratelimit::RedisLimits::open(url.expose()).map_err(|e| bad(&e))?;
        let budgets = claude_cost::RedisBudgets::open(url.expose()).map_err(|e| bad(&e))?;
        Ok(Self {
            cache,
            limits: limits.policy(on_failure),
            budgets: budgets.policy(on_failure),
        })
    }
}

/// The limiter around `svc`, between the probes that measure its queueing (which is not
/// overhead).
fn limited<S>(
    limiter: &RateLimitLayer,
    svc: S,
) -> Probed<<RateLimitLayer as Layer<Probed<S>>>::Service>
where
    RateLimitLayer: Layer<Probed<S>>,
{
    Probe::LimiterEnter.layer(limiter.layer(Probe::LimiterPass.layer(svc)))
}

/// Applies `layer` around an erased stack and erases the result.
fn wrap<L, B>(svc: StackService, layer: L) -> StackService
where
    L: Layer<StackService>,
    L::Service: Service<Request<Bytes>, Response = Response<B>> + Clone + Send + Sync + 'static,
    <L::Service as Service<Request<Bytes>>>::Error: Into<BoxError>,
    <L::Service as Service<Request<Bytes>>>::Future: Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    StackService::new(layer.layer(svc))
}
