//! `Cache<S>`, `CacheLayer` and the request path.

use std::fmt;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use claude_core::headers::X_CLAUDE_CACHE;
use claude_core::metric::Kept;
use claude_core::{CacheHit, Endpoint, RequestMeta, UsageHandle, observe_usage};
use http::header::{AGE, CONTENT_ENCODING, CONTENT_LENGTH};
use http::{HeaderValue, Method, Request, Response};
use http_body::Body;
use tower::ServiceExt;
use tower_layer::Layer;
use tower_service::Service;

use crate::body::{Pending, ResponseBody, Tee};
use crate::config::{CacheConfig, CacheScope};
use crate::directives::Directives;
use crate::entry::{Entry, Head};
use crate::future::ResponseFuture;
use crate::key::CacheKey;
use crate::metric_names;
use crate::store::{CacheHandle, Lookup, Shared};

/// The lookup counters' handles (see `claude_core::metric`).
static HITS: Kept<metrics::Counter> = Kept::new();
static MISSES: Kept<metrics::Counter> = Kept::new();

/// How the cache treated a request: the value of the `x-claude-cache` header, also set as a
/// response extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CacheStatus {
    /// Answered from the cache; upstream was not called.
    Hit,
    /// Not in the cache: the answer came from upstream (and is stored if it qualifies).
    Miss,
    /// The cache did not consider the request at all.
    Bypass(BypassReason),
}

impl CacheStatus {
    /// `HIT`, `MISS` or `BYPASS`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Hit => "HIT",
            Self::Miss => "MISS",
            Self::Bypass(_) => "BYPASS",
        }
    }
}

/// Why a request bypassed the cache (the `reason` label of `claude_cache_bypasses_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BypassReason {
    /// Not a `POST`.
    Method,
    /// Not `/v1/messages` or `/v1/messages/count_tokens`.
    Endpoint,
    /// The request said `cache-control: no-store`.
    NoStore,
    /// The body is not a valid Messages request (not JSON, or missing required fields); the
    /// client gets Anthropic's own 400.
    InvalidBody,
}

impl BypassReason {
    /// The metric label: `method`, `endpoint`, `no_store`, `invalid_body`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Method => "method",
            Self::Endpoint => "endpoint",
            Self::NoStore => "no_store",
            Self::InvalidBody => "invalid_body",
        }
    }
}

// ===== impl CacheLayer =====

/// Applies [`Cache`] to a service. Every service this layer (or a clone of it) produces
/// shares one cache; a setter gives the layer a fresh, empty cache with the new setting.
///
/// See the [crate docs](crate) for an example.
#[derive(Clone)]
pub struct CacheLayer {
    config: CacheConfig,
    shared: Arc<OnceLock<Arc<Shared>>>,
    #[cfg(feature = "redis")]
    l2: Option<crate::redis::RedisCache>,
}

impl fmt::Debug for CacheLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheLayer")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Default for CacheLayer {
    fn default() -> Self {
        Self::new(CacheConfig::default())
    }
}

impl CacheLayer {
    /// A layer with this configuration.
    pub fn new(config: CacheConfig) -> Self {
        Self {
            config,
            shared: Arc::new(OnceLock::new()),
            #[cfg(feature = "redis")]
            l2: None,
        }
    }

    /// Adds a shared second level in Redis under the local cache (feature `redis`; see the
    /// [`redis`](crate::redis) module). Like every setter, gives the layer a fresh cache.
    #[cfg(feature = "redis")]
    #[must_use]
    pub fn redis(mut self, l2: crate::redis::RedisCache) -> Self {
        self.l2 = Some(l2);
        self.shared = Arc::new(OnceLock::new());
        self
    }

    fn with(mut self, f: impl FnOnce(&mut CacheConfig)) -> Self {
        f(&mut self.config);
        self.shared = Arc::new(OnceLock::new());
        self
    }

    /// Sets [`CacheConfig::max_bytes`].
    #[must_use]
    pub fn max_bytes(self, bytes: u64) -> Self {
        self.with(|c| c.max_bytes = bytes)
    }

    /// Sets [`CacheConfig::ttl`].
    #[must_use]
    pub fn ttl(self, ttl: Duration) -> Self {
        self.with(|c| c.ttl = ttl)
    }

    /// Sets [`CacheConfig::max_entry_bytes`].
    #[must_use]
    pub fn max_entry_bytes(self, bytes: u64) -> Self {
        self.with(|c| c.max_entry_bytes = bytes)
    }

    /// Sets [`CacheConfig::scope`].
    #[must_use]
    pub fn scope(self, scope: CacheScope) -> Self {
        self.with(|c| c.scope = scope)
    }

    /// Sets [`CacheConfig::store_thread`].
    #[must_use]
    pub fn store_thread(self, on: bool) -> Self {
        self.with(|c| c.store_thread = on)
    }

    /// Sets [`CacheConfig::key_ignore_fields`].
    #[must_use]
    pub fn key_ignore_fields<I, F>(self, fields: I) -> Self
    where
        I: IntoIterator<Item = F>,
        F: Into<String>,
    {
        let fields = fields.into_iter().map(Into::into).collect();
        self.with(|c| c.key_ignore_fields = fields)
    }

    /// The configuration.
    pub fn config(&self) -> &CacheConfig {
        &self.config
    }

    fn shared(&self) -> Arc<Shared> {
        self.shared
            .get_or_init(|| {
                Arc::new(Shared::build(
                    self.config.clone(),
                    #[cfg(feature = "redis")]
                    self.l2.clone(),
                ))
            })
            .clone()
    }

    /// A handle on the cache this layer's services share.
    pub fn handle(&self) -> CacheHandle {
        CacheHandle {
            shared: self.shared(),
        }
    }
}

impl<S> Layer<S> for CacheLayer {
    type Service = Cache<S>;

    fn layer(&self, inner: S) -> Cache<S> {
        Cache {
            inner,
            shared: self.shared(),
        }
    }
}

// ===== impl Cache =====

/// Middleware that answers repeated Messages requests from a cache. See the
/// [crate docs](crate).
///
/// # Readiness
///
/// `Cache` is always ready. Before the call it cannot know whether the request is a hit
/// (which needs no upstream capacity) or a miss, so it does not reserve capacity of the
/// inner service in `poll_ready`; on a miss or bypass it drives a clone of the inner service
/// to readiness inside the response future and calls it then (as axum's router does with
/// `oneshot`). A hit therefore never waits for, or holds, a permit of a limiter below the
/// cache. Backpressure from the inner service shows as latency of misses.
#[derive(Clone)]
pub struct Cache<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S: fmt::Debug> fmt::Debug for Cache<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cache")
            .field("inner", &self.inner)
            .field("shared", &self.shared)
            .finish()
    }
}

impl<S> Cache<S> {
    /// Wraps `inner` with a cache of its own.
    pub fn new(inner: S, config: CacheConfig) -> Self {
        CacheLayer::new(config).layer(inner)
    }

    /// A [`CacheLayer`] with this configuration.
    pub fn layer(config: CacheConfig) -> CacheLayer {
        CacheLayer::new(config)
    }

    /// A handle on the cache.
    pub fn handle(&self) -> CacheHandle {
        CacheHandle {
            shared: self.shared.clone(),
        }
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

/// What to do with a request.
enum Plan {
    Bypass(BypassReason),
    Cache {
        key: CacheKey,
        directives: Directives,
        /// The requested model (the entry prefers the model the answer names).
        model: Option<Arc<str>>,
    },
}

fn plan(shared: &Shared, req: &mut Request<Bytes>) -> Plan {
    if req.method() != Method::POST {
        return Plan::Bypass(BypassReason::Method);
    }
    let meta = RequestMeta::get_or_parse(req);
    if !matches!(meta.endpoint, Endpoint::Messages | Endpoint::CountTokens) {
        return Plan::Bypass(BypassReason::Endpoint);
    }
    let directives = Directives::parse(req.headers());
    if directives.no_store {
        return Plan::Bypass(BypassReason::NoStore);
    }
    if !meta.is_valid() {
        return Plan::Bypass(BypassReason::InvalidBody);
    }
    match CacheKey::for_request(req, &shared.config) {
        Ok(key) => Plan::Cache {
            key,
            directives,
            model: meta.model,
        },
        Err(_) => Plan::Bypass(BypassReason::InvalidBody),
    }
}

impl<S, B> Service<Request<Bytes>> for Cache<S>
where
    S: Service<Request<Bytes>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
{
    type Response = Response<ResponseBody<B>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, B>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<Bytes>) -> Self::Future {
        let svc = self.inner.clone();
        match plan(&self.shared, &mut req) {
            Plan::Bypass(reason) => {
                metrics::counter!(metric_names::BYPASSES, "reason" => reason.as_str()).increment(1);
                ResponseFuture::bypass(svc.oneshot(req), reason)
            }
            Plan::Cache {
                key,
                directives,
                model,
            } => ResponseFuture::cached(Box::pin(cached(
                self.shared.clone(),
                svc,
                req,
                key,
                directives,
                model,
            ))),
        }
    }
}

/// The path of a cacheable request.
async fn cached<S, B>(
    shared: Arc<Shared>,
    svc: S,
    req: Request<Bytes>,
    key: CacheKey,
    directives: Directives,
    model: Option<Arc<str>>,
) -> Result<Response<ResponseBody<B>>, S::Error>
where
    S: Service<Request<Bytes>, Response = Response<B>>,
    B: Body<Data = Bytes>,
{
    // `no-cache` skips the read but stores what comes back (see `Shared::lookup`).
    let guard = match shared
        .lookup(key, directives.max_age, directives.no_cache)
        .await
    {
        Lookup::Hit(entry) => {
            HITS.with(|| metrics::counter!(metric_names::HITS), |c| c.increment(1));
            return Ok(hit_response(&entry));
        }
        Lookup::Lead(guard) => Some(guard),
        Lookup::Alone => None,
    };
    MISSES.with(
        || metrics::counter!(metric_names::MISSES),
        |c| c.increment(1),
    );
    let resp = svc.oneshot(req).await?;
    let ttl = shared.config.effective_ttl();
    let head = Head {
        status: resp.status(),
        headers: Head::replayed_headers(resp.headers()),
        model,
        lifetime: directives.max_age.map_or(ttl, |m| m.min(ttl)),
    };
    let pending = Pending {
        // The replay index counts in u32: larger entries are never stored.
        max: usize::try_from(shared.config.max_entry_bytes.min(u64::from(u32::MAX)))
            .unwrap_or(usize::MAX),
        shared,
        key,
        guard,
    };
    Ok(miss_response(resp, head, pending))
}

/// Why a response head rules out storing the answer.
fn unstorable(resp: &Response<impl Body>, head: &Head, max: usize) -> Option<&'static str> {
    if !resp.status().is_success() {
        return Some("status");
    }
    if resp
        .headers()
        .get(CONTENT_ENCODING)
        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"))
    {
        // A compressed body would be replayed without its encoding header.
        return Some("encoding");
    }
    let declared = resp
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Some("too_large");
    }
    if head.lifetime.is_zero() {
        return Some("zero_lifetime");
    }
    None
}

fn miss_response<B>(resp: Response<B>, head: Head, pending: Pending) -> Response<ResponseBody<B>>
where
    B: Body<Data = Bytes>,
{
    if let Some(reason) = unstorable(&resp, &head, pending.max) {
        metrics::counter!(metric_names::NOT_STORED, "reason" => reason).increment(1);
        // Dropping `pending` releases any followers now, not at the end of the body.
        drop(pending);
        let mut resp = resp.map(ResponseBody::upstream);
        mark(&mut resp, CacheStatus::Miss);
        return resp;
    }
    let (resp, usage) = observe_usage(resp);
    let (parts, body) = resp.into_parts();
    let mut resp = Response::from_parts(
        parts,
        ResponseBody::tee(body, Tee::new(pending, head, usage)),
    );
    mark(&mut resp, CacheStatus::Miss);
    resp
}

fn hit_response<B>(entry: &Arc<Entry>) -> Response<ResponseBody<B>> {
    let age = entry.age();
    let mut resp = Response::new(ResponseBody::replay(entry.clone()));
    *resp.status_mut() = entry.status;
    *resp.headers_mut() = entry.headers.clone();
    resp.headers_mut()
        .insert(AGE, HeaderValue::from(age.as_secs()));
    let ext = resp.extensions_mut();
    ext.insert(CacheHit {
        usage: entry.report.usage,
        model: entry.model.clone(),
        age,
    });
    ext.insert(UsageHandle::completed(entry.report.clone()));
    mark(&mut resp, CacheStatus::Hit);
    resp
}

pub(crate) fn mark<B>(resp: &mut Response<B>, status: CacheStatus) {
    resp.headers_mut()
        .insert(X_CLAUDE_CACHE, HeaderValue::from_static(status.as_str()));
    resp.extensions_mut().insert(status);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::convert::Infallible;
    use std::future::{Ready, ready};
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use http_body_util::BodyExt;
    use http_body_util::channel::{Channel, Sender};

    type TestBody = Channel<Bytes, std::io::Error>;

    /// An upstream that hands out scripted responses, counts calls, and can stop being
    /// ready.
    #[derive(Clone, Default)]
    struct Upstream {
        queue: Arc<Mutex<VecDeque<Response<TestBody>>>>,
        calls: Arc<AtomicUsize>,
        closed: Arc<AtomicBool>,
    }

    const JSON: &str = r#"{"type":"message","model":"m-1","content":[],"usage":{"input_tokens":3,"output_tokens":7}}"#;
    const START: &str = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"m-1\",\"usage\":{\"input_tokens\":3,\"output_tokens\":1}}}\n\n";
    const DELTA: &str = "event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":7}}\n\n";
    const STOP: &str = "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";

    impl Upstream {
        fn push(&self, resp: Response<TestBody>) {
            self.queue.lock().unwrap().push_back(resp);
        }

        /// A streaming response whose frames the test sends.
        fn push_stream(&self) -> Sender<Bytes, std::io::Error> {
            let (tx, body) = Channel::new(8);
            let mut resp = Response::new(body);
            resp.headers_mut().insert(
                "content-type",
                HeaderValue::from_static("text/event-stream"),
            );
            self.push(resp);
            tx
        }

        fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }
    }

    fn json(extra: Option<(&'static str, &'static str)>) -> Response<TestBody> {
        let (mut tx, body) = Channel::new(1);
        tx.try_send(http_body::Frame::data(Bytes::from_static(JSON.as_bytes())))
            .unwrap();
        let mut resp = Response::new(body);
        resp.headers_mut()
            .insert("content-type", HeaderValue::from_static("application/json"));
        if let Some((k, v)) = extra {
            resp.headers_mut().insert(k, HeaderValue::from_static(v));
        }
        resp
    }

    impl Service<Request<Bytes>> for Upstream {
        type Response = Response<TestBody>;
        type Error = Infallible;
        type Future = Ready<Result<Response<TestBody>, Infallible>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            if self.closed.load(Ordering::SeqCst) {
                Poll::Pending
            } else {
                Poll::Ready(Ok(()))
            }
        }

        fn call(&mut self, _: Request<Bytes>) -> Self::Future {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let resp = self.queue.lock().unwrap().pop_front();
            ready(Ok(resp.unwrap_or_else(|| json(None))))
        }
    }

    const BODY: &str =
        r#"{"model":"m","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}"#;

    fn req(body: &'static str) -> Request<Bytes> {
        Request::post("http://upstream/v1/messages")
            .header("anthropic-version", "2023-06-01")
            .body(Bytes::from_static(body.as_bytes()))
            .unwrap()
    }

    async fn status_of(svc: &Cache<Upstream>, r: Request<Bytes>) -> CacheStatus {
        let resp = svc.clone().oneshot(r).await.unwrap();
        let status = *resp.extensions().get::<CacheStatus>().unwrap();
        resp.into_body().collect().await.unwrap();
        status
    }

    async fn settle(h: &CacheHandle) {
        while h.in_flight() > 0 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn frames_pass_at_once_and_the_answer_is_stored_after_it_completed() {
        let up = Upstream::default();
        let svc = Cache::new(up.clone(), CacheConfig::default());
        let h = svc.handle();
        let mut tx = up.push_stream();
        let resp = svc.clone().oneshot(req(BODY)).await.unwrap();
        let mut body = resp.into_body();
        tx.send_data(Bytes::from_static(START.as_bytes()))
            .await
            .unwrap();
        // The frame reaches the caller while upstream has sent nothing more.
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(first, START);
        assert_eq!(h.in_flight(), 1);
        tx.send_data(Bytes::from_static(DELTA.as_bytes()))
            .await
            .unwrap();
        tx.send_data(Bytes::from_static(STOP.as_bytes()))
            .await
            .unwrap();
        drop(tx);
        let rest = body.collect().await.unwrap().to_bytes();
        assert_eq!(rest, [DELTA, STOP].concat());
        settle(&h).await;

        let hit = svc.clone().oneshot(req(BODY)).await.unwrap();
        assert_eq!(hit.headers()["x-claude-cache"], "HIT");
        assert_eq!(hit.headers()["content-type"], "text/event-stream");
        let cache_hit = hit.extensions().get::<CacheHit>().unwrap();
        assert_eq!(cache_hit.usage.output_tokens, 7);
        assert_eq!(cache_hit.model.as_deref(), Some("m-1"));
        // The replay keeps the original frames and knows its exact size.
        let mut body = hit.into_body();
        let total = (START.len() + DELTA.len() + STOP.len()) as u64;
        assert_eq!(body.size_hint().exact(), Some(total));
        let mut frames = Vec::new();
        while let Some(f) = body.frame().await {
            frames.push(f.unwrap().into_data().unwrap());
        }
        assert_eq!(frames, [START, DELTA, STOP]);
        assert!(body.is_end_stream());
        assert_eq!(body.size_hint().exact(), Some(0));
        assert_eq!(up.calls(), 1);
        h.run_pending_tasks().await;
        assert_eq!(h.bytes(), h.weighted_size());
    }

    /// Polls `fut` to its end with a waker that does nothing, outside any runtime.
    fn block_on<F: std::future::Future>(fut: F) -> F::Output {
        let mut fut = std::pin::pin!(fut);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        loop {
            if let Poll::Ready(out) = fut.as_mut().poll(&mut cx) {
                return out;
            }
            std::thread::yield_now();
        }
    }

    #[test]
    fn a_miss_is_stored_as_its_body_ends_with_no_task_and_no_runtime() {
        let up = Upstream::default();
        let config = CacheConfig {
            store_thread: false,
            ..CacheConfig::default()
        };
        let svc = Cache::new(up.clone(), config);
        let h = svc.handle();
        assert_eq!(block_on(status_of(&svc, req(BODY))), CacheStatus::Miss);
        assert_eq!(
            h.in_flight(),
            0,
            "stored, and the flight gone, by the body's end"
        );
        assert_eq!(block_on(status_of(&svc, req(BODY))), CacheStatus::Hit);
        assert_eq!(up.calls(), 1);
    }

    #[test]
    fn the_store_thread_stores_a_miss_with_no_runtime_anywhere() {
        let up = Upstream::default();
        let svc = Cache::new(up.clone(), CacheConfig::default());
        let h = svc.handle();
        assert_eq!(block_on(status_of(&svc, req(BODY))), CacheStatus::Miss);
        // Whether or not the thread has stored it yet, the next request is a hit: from the
        // flight, or from the cache (the flight's part is `flight`'s tests').
        assert_eq!(block_on(status_of(&svc, req(BODY))), CacheStatus::Hit);
        assert_eq!(up.calls(), 1);
        // The thread stores it, with no runtime anywhere, and the flight leaves the map.
        block_on(h.run_pending_tasks());
        assert_eq!(h.in_flight(), 0);
        assert_eq!(h.entry_count(), 1);
        assert_eq!(h.bytes(), h.weighted_size());
        assert_eq!(block_on(status_of(&svc, req(BODY))), CacheStatus::Hit);
        assert_eq!(up.calls(), 1);
    }

    #[test]
    fn the_store_thread_lets_the_cache_go() {
        let svc = Cache::new(Upstream::default(), CacheConfig::default());
        let h = svc.handle();
        assert_eq!(block_on(status_of(&svc, req(BODY))), CacheStatus::Miss);
        let shared = Arc::downgrade(&h.shared);
        drop((svc, h));
        // A queued answer holds the state until it is stored; then nothing does, and with
        // the state goes the sending side of the queue, which ends the thread.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while shared.upgrade().is_some() {
            assert!(
                std::time::Instant::now() < deadline,
                "the cache outlives its services"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    #[tokio::test]
    async fn a_body_dropped_or_failed_midway_stores_nothing_and_leaves_no_flight() {
        let up = Upstream::default();
        let svc = Cache::new(up.clone(), CacheConfig::default());
        let h = svc.handle();

        let mut tx = up.push_stream();
        let resp = svc.clone().oneshot(req(BODY)).await.unwrap();
        let mut body = resp.into_body();
        tx.send_data(Bytes::from_static(START.as_bytes()))
            .await
            .unwrap();
        body.frame().await.unwrap().unwrap();
        assert_eq!(h.in_flight(), 1);
        drop(body);
        assert_eq!(h.in_flight(), 0, "released as the body dropped");

        let tx = up.push_stream();
        let resp = svc.clone().oneshot(req(BODY)).await.unwrap();
        tx.abort(std::io::Error::other("reset"));
        assert!(resp.into_body().collect().await.is_err());
        assert_eq!(h.in_flight(), 0);

        // A stream that ends without message_stop is not complete either.
        let mut tx = up.push_stream();
        let resp = svc.clone().oneshot(req(BODY)).await.unwrap();
        tx.send_data(Bytes::from_static(START.as_bytes()))
            .await
            .unwrap();
        drop(tx);
        resp.into_body().collect().await.unwrap();
        settle(&h).await;

        assert_eq!(status_of(&svc, req(BODY)).await, CacheStatus::Miss);
        assert_eq!(up.calls(), 4);
        settle(&h).await;
        h.run_pending_tasks().await;
        assert_eq!(h.entry_count(), 1, "only the last, complete answer");
    }

    #[tokio::test]
    async fn compressed_and_failed_answers_are_not_stored() {
        let up = Upstream::default();
        let svc = Cache::new(up.clone(), CacheConfig::default());
        up.push(json(Some(("content-encoding", "gzip"))));
        assert_eq!(status_of(&svc, req(BODY)).await, CacheStatus::Miss);
        let mut failed = json(None);
        *failed.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
        up.push(failed);
        assert_eq!(status_of(&svc, req(BODY)).await, CacheStatus::Miss);
        assert_eq!(status_of(&svc, req(BODY)).await, CacheStatus::Miss);
        settle(&svc.handle()).await;
        assert_eq!(status_of(&svc, req(BODY)).await, CacheStatus::Hit);
        assert_eq!(up.calls(), 3);
    }

    #[tokio::test]
    async fn bypasses_say_why() {
        let up = Upstream::default();
        let svc = Cache::new(up.clone(), CacheConfig::default());
        let mut get = req(BODY);
        *get.method_mut() = Method::GET;
        let mut models = req(BODY);
        *models.uri_mut() = "http://upstream/v1/models".parse().unwrap();
        let no_store = {
            let mut r = req(BODY);
            r.headers_mut()
                .insert("cache-control", HeaderValue::from_static("no-store"));
            r
        };
        let cases = [
            (get, BypassReason::Method),
            (models, BypassReason::Endpoint),
            (no_store, BypassReason::NoStore),
            (
                req(r#"{"model":"m","messages":[]}"#),
                BypassReason::InvalidBody,
            ),
            (
                req(r#"{"model":"m","max_tokens":5,"messages":[]"#),
                BypassReason::InvalidBody,
            ),
        ];
        for (r, reason) in cases {
            let resp = svc.clone().oneshot(r).await.unwrap();
            assert_eq!(resp.headers()["x-claude-cache"], "BYPASS");
            assert_eq!(
                resp.extensions().get::<CacheStatus>(),
                Some(&CacheStatus::Bypass(reason))
            );
        }
        assert_eq!(up.calls(), 5);
        assert_eq!(svc.handle().entry_count(), 0);
    }

    #[tokio::test]
    async fn hits_do_not_wait_for_inner_readiness() {
        let up = Upstream::default();
        let mut svc = Cache::new(up.clone(), CacheConfig::default());
        assert_eq!(status_of(&svc, req(BODY)).await, CacheStatus::Miss);
        settle(&svc.handle()).await;
        // The inner service stops being ready: the cache stays ready and still answers hits.
        up.closed.store(true, Ordering::SeqCst);
        std::future::poll_fn(|cx| svc.poll_ready(cx)).await.unwrap();
        assert_eq!(status_of(&svc, req(BODY)).await, CacheStatus::Hit);
        // A miss waits for the inner service inside its future.
        let other = r#"{"model":"m","max_tokens":6,"messages":[]}"#;
        let mut miss = Box::pin(svc.call(req(other)));
        let pending =
            std::future::poll_fn(|cx| Poll::Ready(miss.as_mut().poll(cx).is_pending())).await;
        assert!(pending);
        assert_eq!(up.calls(), 1);
    }

    #[tokio::test]
    async fn layer_setters_give_a_fresh_cache_and_clones_share_one() {
        let layer = CacheLayer::default()
            .max_bytes(1000)
            .ttl(Duration::from_secs(9));
        assert_eq!(layer.config().max_bytes, 1000);
        let a = layer.layer(Upstream::default());
        let b = layer.clone().layer(Upstream::default());
        assert!(Arc::ptr_eq(&a.shared, &b.shared));
        let c = layer
            .clone()
            .max_entry_bytes(10)
            .scope(CacheScope::Shared)
            .key_ignore_fields(["metadata", "temperature"])
            .layer(Upstream::default());
        assert!(!Arc::ptr_eq(&a.shared, &c.shared));
        assert_eq!(
            c.handle().config().key_ignore_fields,
            ["metadata", "temperature"]
        );
        assert_eq!(c.handle().config().ttl, Duration::from_secs(9));
    }
}
