//! [`RateLimitLayer`] and the [`RateLimit`] service.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use claude_core::{BoxError, Endpoint, RequestMeta, Tenant, UsageBody};
use http::{Request, Response};
use http_body::Body;
use tower_layer::Layer;
use tower_service::Service;

use crate::config::{ConfigError, KeyScope, RateLimitConfig};
use crate::future::ResponseFuture;
use crate::limiter::{Begin, KeySnapshot, Limiter};

/// Applies [`RateLimit`] to a service: concurrency, RPM, ITPM and OTPM limits per key, a
/// FIFO queue, and server-following. See the [crate docs](crate).
///
/// Every service the layer makes, and every clone of the layer, shares one state: limits
/// hold across all of them.
///
/// The setters build a fresh state: call them while assembling the stack, before the
/// layer makes services.
#[derive(Debug, Clone)]
pub struct RateLimitLayer {
    limiter: Arc<Limiter>,
}

impl Default for RateLimitLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl RateLimitLayer {
    /// A layer with the [default configuration](RateLimitConfig::default): no limit yet,
    /// server-following on.
    pub fn new() -> Self {
        Self {
            limiter: Arc::new(Limiter::new(RateLimitConfig::default())),
        }
    }

    /// A layer with this configuration.
    ///
    /// # Errors
    ///
    /// When [`RateLimitConfig::validate`] refuses it.
    pub fn from_config(config: RateLimitConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(Self {
            limiter: Arc::new(Limiter::new(config)),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &RateLimitConfig {
        self.limiter.config()
    }

    fn with(self, change: impl FnOnce(&mut RateLimitConfig)) -> Self {
        let mut config = self.limiter.config().clone();
        change(&mut config);
        match Self::from_config(config) {
            #[cfg(feature = "redis")]
            Ok(layer) => match &self.limiter.shared {
                Some(shared) => layer.redis(shared.clone()),
                None => layer,
            },
            #[cfg(not(feature = "redis"))]
            Ok(layer) => layer,
            Err(e) => panic!("{e}"),
        }
    }

    /// Shares the limits with every layer on the same Redis (feature `redis`; see the
    /// [`redis`](crate::redis) module). Like the setters, builds a fresh state.
    #[cfg(feature = "redis")]
    #[must_use]
    pub fn redis(self, shared: crate::redis::RedisLimits) -> Self {
        let mut limiter = Limiter::new(self.limiter.config().clone());
        limiter.shared = Some(shared);
        Self {
            limiter: Arc::new(limiter),
        }
    }

    /// Requests per minute per key.
    ///
    /// # Panics
    ///
    /// When `limit` is 0.
    #[must_use]
    pub fn requests_per_minute(self, limit: u64) -> Self {
        self.with(|c| c.requests_per_minute = Some(limit))
    }

    /// Input tokens per minute per key.
    ///
    /// # Panics
    ///
    /// When `limit` is 0.
    #[must_use]
    pub fn input_tokens_per_minute(self, limit: u64) -> Self {
        self.with(|c| c.input_tokens_per_minute = Some(limit))
    }

    /// Output tokens per minute per key.
    ///
    /// # Panics
    ///
    /// When `limit` is 0.
    #[must_use]
    pub fn output_tokens_per_minute(self, limit: u64) -> Self {
        self.with(|c| c.output_tokens_per_minute = Some(limit))
    }

    /// Requests in flight per key (until the response body ends or is dropped).
    ///
    /// # Panics
    ///
    /// When `max` is 0.
    #[must_use]
    pub fn max_concurrent_requests(self, max: u32) -> Self {
        self.with(|c| c.max_concurrent_requests = Some(max))
    }

    /// What keys are made of.
    #[must_use]
    pub fn scope(self, scope: KeyScope) -> Self {
        self.with(|c| c.scope = scope)
    }

    /// Adds further limits over another scope, granted together with the key's own (see
    /// [`RateLimitConfig::scopes`]).
    ///
    /// # Panics
    ///
    /// When the limits are invalid: no limit, a limit of 0, or a scope already limited.
    #[must_use]
    pub fn scope_limits(self, limits: crate::ScopeLimits) -> Self {
        self.with(|c| c.scopes.push(limits))
    }

    /// The share of `max_tokens` reserved from the output bucket.
    ///
    /// # Panics
    ///
    /// When `ratio` is negative or not finite.
    #[must_use]
    pub fn output_reservation_ratio(self, ratio: f64) -> Self {
        self.with(|c| c.output_reservation_ratio = ratio)
    }

    /// Requests waiting per key at most (0: no queue).
    #[must_use]
    pub fn max_queue(self, max: usize) -> Self {
        self.with(|c| c.max_queue = max)
    }

    /// The longest wait in the queue.
    #[must_use]
    pub fn max_wait(self, max: Duration) -> Self {
        self.with(|c| c.max_wait = max)
    }

    /// Whether to follow the server's `anthropic-ratelimit-*` headers and 429 pauses.
    #[must_use]
    pub fn follow_server(self, follow: bool) -> Self {
        self.with(|c| c.follow_server = follow)
    }

    /// The headroom each bucket keeps against timing noise, as refill time.
    #[must_use]
    pub fn safety_margin(self, margin: Duration) -> Self {
        self.with(|c| c.safety_margin = margin)
    }

    /// The longest pause a server 429 may impose on a key.
    #[must_use]
    pub fn max_pause(self, max: Duration) -> Self {
        self.with(|c| c.max_pause = max)
    }

    /// The state of the key a request of `tenant` for `model` uses, if the layer holds it.
    pub fn snapshot(&self, tenant: &Tenant, model: &str) -> Option<KeySnapshot> {
        let model: Arc<str> = Arc::from(model);
        self.limiter
            .snapshot(&self.limiter.key(tenant, Some(&model)))
    }

    /// The number of keys held (idle keys are swept as calls arrive).
    pub fn key_count(&self) -> usize {
        self.limiter.key_count()
    }

    /// Removes every idle key now (no waiter, nothing in flight, not paused, buckets full);
    /// returns how many. Calls do this for one shard of the map every 64 calls, so this is
    /// only needed to reclaim memory when traffic stops.
    pub fn evict_idle(&self) -> usize {
        self.limiter.evict_idle()
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimit {
            inner,
            limiter: Arc::clone(&self.limiter),
        }
    }
}

/// Limits the calls to the Messages API that pass through it (see the [crate docs](crate)).
///
/// Calls to other endpoints (`count_tokens`, models, batches) pass through untouched.
#[derive(Debug, Clone)]
pub struct RateLimit<S> {
    inner: S,
    limiter: Arc<Limiter>,
}

impl<S> RateLimit<S> {
    /// A [`RateLimitLayer`] with the default configuration, to refine with its setters.
    pub fn layer() -> RateLimitLayer {
        RateLimitLayer::new()
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, B> Service<Request<Bytes>> for RateLimit<S>
where
    S: Service<Request<Bytes>, Response = Response<B>> + Clone,
    S::Error: Into<BoxError>,
    B: Body<Data = Bytes>,
{
    type Response = Response<UsageBody<B>>;
    type Error = BoxError;
    type Future = ResponseFuture<S>;

    /// The inner service's readiness. The layer's own waiting happens in the response
    /// future, never here, and its refusals are returned from the future.
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut request: Request<Bytes>) -> Self::Future {
        let meta = RequestMeta::get_or_parse(&mut request);
        if meta.endpoint != Endpoint::Messages {
            return ResponseFuture::passing(self.inner.call(request));
        }
        let tenant = Tenant::of(&request);
        let demand = match self.limiter.demand(&tenant, &meta) {
            Ok(demand) => demand,
            Err(e) => return ResponseFuture::rejected(e),
        };
        match self.limiter.begin(demand) {
            Begin::Admitted(ticket) if self.limiter.grants() => {
                let clone = self.inner.clone();
                let service = std::mem::replace(&mut self.inner, clone);
                ResponseFuture::granting(ticket, service, request)
            }
            Begin::Admitted(ticket) => ResponseFuture::calling(self.inner.call(request), ticket),
            Begin::Queued(acquire) => {
                // The ready service goes with the request; the clone left here is driven
                // to readiness by the next `poll_ready`.
                let clone = self.inner.clone();
                let service = std::mem::replace(&mut self.inner, clone);
                ResponseFuture::waiting(acquire, service, request)
            }
            Begin::Rejected(e) => ResponseFuture::rejected(e),
        }
    }
}
