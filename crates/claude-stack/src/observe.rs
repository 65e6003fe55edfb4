//! Observability: one `tracing` span per request with the OpenTelemetry GenAI attribute
//! names, and a histogram of the stack's own overhead.
//!
//! # The span
//!
//! `gen_ai.request` (level INFO) with `gen_ai.system = "anthropic"`,
//! `gen_ai.operation.name` (`chat`, `count_tokens`, …), `gen_ai.request.model`,
//! `gen_ai.request.max_tokens`, `gen_ai.request.stream`, `claude.tenant`, and, as the answer
//! arrives, `http.response.status_code`, `gen_ai.response.model`,
//! `gen_ai.usage.input_tokens`, `gen_ai.usage.output_tokens`,
//! `gen_ai.usage.cache_creation_input_tokens`, `gen_ai.usage.cache_read_input_tokens`,
//! `claude.attempts`, `claude.cache_hit`, `claude.overhead_us`, and `error.type` on failure.
//! The span stays open until the response body ends (usage is known then). When no
//! subscriber takes the span (filtered out, or none installed), the body is not scanned for
//! it and passes on as the layers below made it. The prompt and
//! the answer are never recorded; request headers that carry keys are marked sensitive
//! before anything below can log them.
//!
//! # Overhead
//!
//! `claude_stack_overhead_seconds` (histogram) is the time from the request entering the
//! stack to its response headers leaving it, minus the time spent waiting on the upstream
//! (every attempt, measured just above the HTTP client), minus deliberate waits (retry
//! backoff as recorded by the retry layer, and rate-limit queueing measured around the
//! limiter). What is left is the work of the stack itself.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use claude_core::metric::Kept;
use claude_core::{BoxError, CacheHit, Endpoint, RequestMeta, Tenant, observe_usage};
use http::{Request, Response, header};
use http_body_util::BodyExt;
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower::{Layer, Service};
use tracing::Instrument;
use tracing::field::Empty;

use crate::stack::{StackBody, StackService};

/// The histogram of the stack's own time per request, in seconds.
pub const OVERHEAD_SECONDS: &str = "claude_stack_overhead_seconds";

/// The overhead histogram's handle (see `claude_core::metric`).
static OVERHEAD: Kept<metrics::Histogram> = Kept::new();

/// Where a request's time went, as a response extension set by the stack (up to the
/// response headers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StackTimings {
    /// Waiting on the upstream (all attempts, to their response headers).
    pub upstream: Duration,
    /// Queued by the rate limiter (all attempts).
    pub queued: Duration,
    /// Sleeping between retries.
    pub backoff: Duration,
    /// The stack's own work: the rest.
    pub overhead: Duration,
}

/// Time spent below the stack's own work, shared by the probes of one request.
#[derive(Debug)]
pub(crate) struct Timings {
    /// When the request entered the stack: the origin of `entered_limiter`.
    base: Instant,
    upstream_nanos: AtomicU64,
    waited_nanos: AtomicU64,
    /// When the current attempt reached the rate limiter, in nanoseconds after `base`
    /// ([`NOT_ENTERED`] when none is in it). Kept here rather than in an extension of the
    /// attempt's request: a request's attempts pass the limiter one after the other, and an
    /// extension is an allocation per attempt, copied again with the request below.
    entered_limiter: AtomicU64,
}

const NOT_ENTERED: u64 = u64::MAX;

impl Timings {
    fn new(base: Instant) -> Self {
        Self {
            base,
            upstream_nanos: AtomicU64::new(0),
            waited_nanos: AtomicU64::new(0),
            entered_limiter: AtomicU64::new(NOT_ENTERED),
        }
    }
}

#[derive(Debug, Clone)]
struct TimingsExt(Arc<Timings>);

fn add(counter: &AtomicU64, d: Duration) {
    counter.fetch_add(
        u64::try_from(d.as_nanos()).unwrap_or(u64::MAX),
        Ordering::Relaxed,
    );
}

// ===== the outer layer =====

/// Outermost layer: span, sensitive headers, overhead.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ObserveLayer;

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;
    fn layer(&self, inner: S) -> Observe<S> {
        Observe { inner }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Observe<S> {
    inner: S,
}

/// Ready when the `StackService` below is, which is always.
impl crate::erased::AlwaysReady for Observe<StackService> {}

impl Service<Request<Bytes>> for Observe<StackService> {
    type Response = Response<StackBody>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<StackBody>, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Bytes>) -> Self::Future {
        let started = Instant::now();
        for name in [header::AUTHORIZATION, claude_core::headers::X_API_KEY] {
            if let Some(v) = req.headers_mut().get_mut(name) {
                v.set_sensitive(true);
            }
        }
        let meta = RequestMeta::get_or_parse(&mut req);
        let tenant = Tenant::of(&req);
        let timings = Arc::new(Timings::new(started));
        req.extensions_mut().insert(TimingsExt(timings.clone()));
        let op = match meta.endpoint {
            Endpoint::Messages => "chat",
            Endpoint::CountTokens => "count_tokens",
            Endpoint::Batches => "batches",
            Endpoint::Models => "models",
            _ => "other",
        };
        let span = tracing::info_span!(
            "gen_ai.request",
            gen_ai.system = "anthropic",
            gen_ai.operation.name = op,
            gen_ai.request.model = meta.model.as_deref().unwrap_or(""),
            gen_ai.request.max_tokens = meta.max_tokens.map(u64::from),
            gen_ai.request.stream = meta.stream,
            claude.tenant = tenant.as_str(),
            http.response.status_code = Empty,
            gen_ai.response.model = Empty,
            gen_ai.usage.input_tokens = Empty,
            gen_ai.usage.output_tokens = Empty,
            gen_ai.usage.cache_creation_input_tokens = Empty,
            gen_ai.usage.cache_read_input_tokens = Empty,
            claude.attempts = Empty,
            claude.cache_hit = Empty,
            claude.overhead_us = Empty,
            error.type = Empty,
        );
        // Whether a subscriber takes this span (read here: inside the future, the current
        // span is an enclosing one when this one is filtered out).
        let recording = !span.is_disabled();
        let fut = self.inner.call(req);
        Box::pin(
            async move {
                let result = fut.await;
                let elapsed = started.elapsed();
                let span = tracing::Span::current();
                let resp = match result {
                    Ok(r) => r,
                    Err(e) => {
                        let class = claude_core::classify_error(e.as_ref());
                        span.record("error.type", class.kind.code());
                        record_overhead(&span, elapsed, &timings, Duration::ZERO);
                        return Err(e);
                    }
                };
                span.record("http.response.status_code", resp.status().as_u16());
                if !resp.status().is_success() {
                    span.record("error.type", resp.status().as_str());
                }
                let retry_waits: Duration = resp
                    .extensions()
                    .get::<claude_retry::RetryInfo>()
                    .map(|info| {
                        span.record("claude.attempts", info.attempts);
                        info.retries.iter().map(|r| r.wait).sum()
                    })
                    .unwrap_or_default();
                span.record(
                    "claude.cache_hit",
                    resp.extensions().get::<CacheHit>().is_some(),
                );
                let t = record_overhead(&span, elapsed, &timings, retry_waits);
                let mut resp = resp;
                resp.extensions_mut().insert(t);
                if !recording {
                    // No subscriber wants this span (the gateway binary's default filter
                    // leaves it out): there is no usage to record in it, and the body goes
                    // on as it is, not wrapped and boxed once more for every frame.
                    return Ok(resp);
                }
                let (resp, usage) = observe_usage(resp);
                let span_for_usage = span.clone();
                usage.on_complete(move |r| {
                    let s = &span_for_usage;
                    if let Some(m) = &r.model {
                        s.record("gen_ai.response.model", &**m);
                    }
                    s.record("gen_ai.usage.input_tokens", r.usage.input_tokens);
                    s.record("gen_ai.usage.output_tokens", r.usage.output_tokens);
                    s.record(
                        "gen_ai.usage.cache_creation_input_tokens",
                        r.usage.cache_creation_input_tokens,
                    );
                    s.record(
                        "gen_ai.usage.cache_read_input_tokens",
                        r.usage.cache_read_input_tokens,
                    );
                    if let Some(e) = &r.error {
                        s.record("error.type", e.error_type.as_str());
                    }
                });
                Ok(resp.map(|b| b.map_err(Into::into).boxed_unsync()))
            }
            .instrument(span),
        )
    }
}

fn record_overhead(
    span: &tracing::Span,
    elapsed: Duration,
    t: &Timings,
    retry_waits: Duration,
) -> StackTimings {
    let upstream = Duration::from_nanos(t.upstream_nanos.load(Ordering::Relaxed));
    let queued = Duration::from_nanos(t.waited_nanos.load(Ordering::Relaxed));
    let own = elapsed.saturating_sub(upstream + queued + retry_waits);
    span.record(
        "claude.overhead_us",
        u64::try_from(own.as_micros()).unwrap_or(u64::MAX),
    );
    OVERHEAD.with(
        || metrics::histogram!(OVERHEAD_SECONDS),
        |h| h.record(own.as_secs_f64()),
    );
    StackTimings {
        upstream,
        queued,
        backoff: retry_waits,
        overhead: own,
    }
}

// ===== probes =====

/// Where a probe sits, and what it measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Probe {
    /// Just above the HTTP client: time to the response headers is upstream time.
    Upstream,
    /// Just outside the rate limiter: marks when an attempt reached it.
    LimiterEnter,
    /// Just inside the rate limiter: the time since `LimiterEnter` was queueing.
    LimiterPass,
}

impl<S> Layer<S> for Probe {
    type Service = Probed<S>;
    fn layer(&self, inner: S) -> Probed<S> {
        Probed {
            inner,
            probe: *self,
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Probed<S> {
    inner: S,
    probe: Probe,
}

impl<S> Service<Request<Bytes>> for Probed<S>
where
    S: Service<Request<Bytes>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ProbeFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Bytes>) -> Self::Future {
        let now = Instant::now();
        let timings = req.extensions().get::<TimingsExt>().map(|t| &t.0);
        let upstream = match (self.probe, timings) {
            (Probe::Upstream, t) => t.cloned(),
            (Probe::LimiterEnter, Some(t)) => {
                let since = now.saturating_duration_since(t.base).as_nanos();
                let since = u64::try_from(since).unwrap_or(NOT_ENTERED - 1);
                t.entered_limiter.store(since, Ordering::Relaxed);
                None
            }
            (Probe::LimiterPass, Some(t)) => {
                let since = t.entered_limiter.swap(NOT_ENTERED, Ordering::Relaxed);
                if since != NOT_ENTERED {
                    let entered = t.base + Duration::from_nanos(since);
                    add(&t.waited_nanos, now.saturating_duration_since(entered));
                }
                None
            }
            (_, None) => None,
        };
        ProbeFuture {
            inner: self.inner.call(req),
            started: now,
            upstream,
        }
    }
}

pin_project! {
    pub(crate) struct ProbeFuture<F> {
        #[pin]
        inner: F,
        started: Instant,
        upstream: Option<Arc<Timings>>,
    }
}

impl<F: Future> Future for ProbeFuture<F> {
    type Output = F::Output;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let out = ready!(this.inner.poll(cx));
        if let Some(t) = this.upstream.take() {
            add(&t.upstream_nanos, this.started.elapsed());
        }
        Poll::Ready(out)
    }
}
