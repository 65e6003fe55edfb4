//! [`CostLayer`] and [`Cost`]: budget admission before a request is sent, and the final
//! usage of every answer recorded once.
//!
//! # What is recorded
//!
//! Every `POST /v1/messages` request that gets a response is recorded exactly once, when
//! its usage is final: [`claude_core::observe_usage`] scans the body as it passes (JSON or
//! SSE, the same single scan other layers subscribe to) and its handle fires once when the
//! body ends, fails, or is dropped by a client that went away. A cut or dropped stream is
//! recorded with what was seen (the usage of `message_start` and of the last
//! `message_delta` that arrived): a lower bound, marked incomplete. Upstream error answers
//! are recorded with their (zero) usage. Other endpoints (`count_tokens`, models, batches)
//! pass through untouched: they bill nothing themselves.
//!
//! A response that carries [`CacheHit`] (set by the cache layer)
//! is recorded at once as a saving: zero spend, its original cost saved.
//!
//! The model priced is the one the response names (the model that ran), else the one the
//! request names. Long-context pricing reads the request's `anthropic-beta` header.
//! Attribution reads the request extensions [`Tenant`] and [`CostTags`].
//!
//! # Budgets
//!
//! With caps configured, the worst-case cost is reserved before the inner service is
//! called, and a request that does not fit is refused with
//! [`ErrorKind::BudgetExceeded`] (boxed
//! [`claude_core::Error`]; `into_response` gives Anthropic's 400 `invalid_request_error`
//! shape) without calling the inner service. See [`crate::budget`] for the bound.
//!
//! # Place in the stack and readiness
//!
//! The layer belongs outside the cache and the retry layers (as in `claude-stack`): a hit
//! then reaches it as a saving, and a retried request is recorded once, with the usage of
//! the answer the client got. `poll_ready` is the inner service's; a refused request
//! completes without calling the inner service (as tower-http's `ValidateRequest` does).
//!
//! # Cancel safety
//!
//! Dropping the [`ResponseFuture`] before the response head arrives releases the
//! reservation and records nothing (the layer never learns what the upstream billed).
//! Dropping the response body records the lower bound.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use claude_core::headers::ANTHROPIC_BETA;
use claude_core::{
    BoxError, CacheHit, Endpoint, Error, ErrorKind, RequestMeta, Tenant, UsageBody, observe_usage,
};
use http::{Request, Response};
use http_body::Body;
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::tags::CostTags;
use crate::tracker::{Admission, CostTracker, RequestInfo, Reservation};

/// The response body of [`Cost`]: the body, scanned once for usage.
pub type ResponseBody<B> = UsageBody<B>;

/// Applies [`Cost`] to a service: records every answer's cost in a [`CostTracker`] and
/// enforces its budgets.
#[derive(Debug, Clone)]
pub struct CostLayer {
    tracker: CostTracker,
}

impl CostLayer {
    /// A layer recording into `tracker`.
    pub fn new(tracker: CostTracker) -> Self {
        Self { tracker }
    }

    /// The tracker.
    pub fn tracker(&self) -> &CostTracker {
        &self.tracker
    }
}

impl<S> Layer<S> for CostLayer {
    type Service = Cost<S>;

    fn layer(&self, inner: S) -> Cost<S> {
        Cost::new(inner, self.tracker.clone())
    }
}

/// Records the cost of every answer of the inner service and enforces budgets. See the
/// [module docs](self).
#[derive(Debug, Clone)]
pub struct Cost<S> {
    inner: S,
    tracker: CostTracker,
}

impl<S> Cost<S> {
    /// Wraps `inner`, recording into `tracker`.
    pub fn new(inner: S, tracker: CostTracker) -> Self {
        Self { inner, tracker }
    }

    /// A [`CostLayer`] recording into `tracker`.
    pub fn layer(tracker: CostTracker) -> CostLayer {
        CostLayer::new(tracker)
    }

    /// The tracker.
    pub fn tracker(&self) -> &CostTracker {
        &self.tracker
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

fn beta_header<B>(req: &Request<B>) -> Option<Arc<str>> {
    let mut values = req
        .headers()
        .get_all(ANTHROPIC_BETA)
        .iter()
        .filter_map(|v| v.to_str().ok());
    let first = values.next()?;
    let mut joined = first.to_owned();
    for v in values {
        joined.push(',');
        joined.push_str(v);
    }
    Some(Arc::from(joined))
}

impl<S, B> Service<Request<Bytes>> for Cost<S>
where
    S: Service<Request<Bytes>, Response = Response<B>>,
    S::Error: Into<BoxError>,
    B: Body<Data = Bytes>,
{
    type Response = Response<ResponseBody<B>>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: Request<Bytes>) -> Self::Future {
        let meta = RequestMeta::get_or_parse(&mut req);
        if meta.endpoint != Endpoint::Messages {
            return ResponseFuture::called(self.inner.call(req), None);
        }
        let info = RequestInfo {
            tenant: Tenant::of(&req),
            model: meta.model.clone(),
            beta: beta_header(&req),
            tags: req.extensions().get::<CostTags>().cloned(),
        };
        match self
            .tracker
            .admission(&info, meta.input_tokens_estimate, meta.max_tokens)
        {
            Admission::Ready(Ok(reservation)) => ResponseFuture::called(
                self.inner.call(req),
                Some(Pending {
                    tracker: self.tracker.clone(),
                    info,
                    reservation,
                }),
            ),
            Admission::Ready(Err(error)) => ResponseFuture {
                state: State::Refused { error: Some(error) },
            },
            #[cfg(feature = "redis")]
            Admission::Shared(admit) => ResponseFuture {
                state: State::Called {
                    future: self.inner.call(req),
                    pending: None,
                    admitting: Some(Admitting {
                        admit,
                        tracker: self.tracker.clone(),
                        info,
                    }),
                },
            },
        }
    }
}

/// A request waiting for the shared budgets to admit it (feature `redis`).
#[cfg(feature = "redis")]
struct Admitting {
    admit: std::pin::Pin<Box<dyn Future<Output = Result<Reservation, Error>> + Send>>,
    tracker: CostTracker,
    info: RequestInfo,
}

/// Never built without the `redis` feature.
#[cfg(not(feature = "redis"))]
struct Admitting(std::convert::Infallible);

impl Admitting {
    /// Drives the admission in `slot`, if any, to its end: on success the reservation goes
    /// to `pending`.
    #[cfg(feature = "redis")]
    fn poll(
        slot: &mut Option<Self>,
        pending: &mut Option<Pending>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), Error>> {
        let Some(a) = slot else {
            return Poll::Ready(Ok(()));
        };
        let admitted = ready!(a.admit.as_mut().poll(cx));
        let Some(a) = slot.take() else {
            return Poll::Ready(Ok(()));
        };
        let reservation = admitted?;
        *pending = Some(Pending {
            tracker: a.tracker,
            info: a.info,
            reservation,
        });
        Poll::Ready(Ok(()))
    }

    #[cfg(not(feature = "redis"))]
    #[allow(clippy::unnecessary_wraps)]
    fn poll(
        slot: &mut Option<Self>,
        _: &mut Option<Pending>,
        _: &mut Context<'_>,
    ) -> Poll<Result<(), Error>> {
        match slot {
            Some(a) => match a.0 {},
            None => Poll::Ready(Ok(())),
        }
    }
}

/// What the future settles once the response arrives.
struct Pending {
    tracker: CostTracker,
    info: RequestInfo,
    reservation: Reservation,
}

pin_project! {
    /// The response future of [`Cost`].
    pub struct ResponseFuture<F> {
        #[pin]
        state: State<F>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Refused { error: Option<Error> },
        Called {
            #[pin]
            future: F,
            pending: Option<Pending>,
            // The shared admission, awaited before `future` is first polled.
            admitting: Option<Admitting>,
        },
    }
}

impl<F> ResponseFuture<F> {
    fn called(future: F, pending: Option<Pending>) -> Self {
        Self {
            state: State::Called {
                future,
                pending,
                admitting: None,
            },
        }
    }
}

impl<F> std::fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    E: Into<BoxError>,
    B: Body<Data = Bytes>,
{
    type Output = Result<Response<ResponseBody<B>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Refused { error } => {
                Poll::Ready(Err(Box::new(error.take().unwrap_or_else(|| {
                    Error::new(
                        ErrorKind::Internal,
                        "claude-cost future polled after completion",
                    )
                }))))
            }
            StateProj::Called {
                future,
                pending,
                admitting,
            } => {
                if let Err(error) = ready!(Admitting::poll(admitting, pending, cx)) {
                    return Poll::Ready(Err(Box::new(error)));
                }
                let result = ready!(future.poll(cx));
                let response = match result {
                    Ok(r) => r,
                    Err(e) => {
                        // No answer: the reservation is released, nothing is recorded.
                        drop(pending.take());
                        return Poll::Ready(Err(e.into()));
                    }
                };
                let (response, usage) = observe_usage(response);
                if let Some(p) = pending.take() {
                    if let Some(hit) = response.extensions().get::<CacheHit>() {
                        p.tracker.settle_hit(p.info, p.reservation, hit);
                    } else {
                        usage.on_complete(move |report| {
                            p.tracker.settle(p.info, p.reservation, report);
                        });
                    }
                }
                Poll::Ready(Ok(response))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Budget, BudgetConfig, CostReport, Totals, Usd};
    use claude_core::Usage;
    use http_body::Frame;
    use http_body_util::{BodyExt, StreamBody};
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tower::ServiceExt;

    const TEXT_CACHED: &str = include_str!("../../claude-core/tests/fixtures/text_cached.sse");
    const SERVER_TOOL: &str = include_str!("../../claude-core/tests/fixtures/server_tool.sse");
    const THINKING_CRLF: &str = include_str!("../../claude-core/tests/fixtures/thinking_crlf.sse");
    const MIDSTREAM_ERROR: &str =
        include_str!("../../claude-core/tests/fixtures/midstream_error.sse");

    type Frames = Vec<Result<Frame<Bytes>, std::io::Error>>;
    type TestBody = StreamBody<
        futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, std::io::Error>>>,
    >;

    fn frames(chunks: &[&[u8]]) -> Frames {
        chunks
            .iter()
            .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
            .collect()
    }

    fn sse(frames: Frames) -> Response<TestBody> {
        let mut r = Response::new(StreamBody::new(futures_util::stream::iter(frames)));
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/event-stream"),
        );
        r
    }

    fn request(model: &str, max_tokens: u32) -> Request<Bytes> {
        let body = format!(
            r#"{{"model":"{model}","max_tokens":{max_tokens},"stream":true,"messages":[{{"role":"user","content":"Hello"}}]}}"#
        );
        Request::post("http://api.test/v1/messages")
            .body(Bytes::from(body))
            .unwrap()
    }

    /// Sends one request whose answer is `frames`, reads the whole body, and returns the
    /// tracker's totals.
    async fn run(tracker: &CostTracker, req: Request<Bytes>, frames: Frames) -> Totals {
        let frames = std::sync::Mutex::new(Some(frames));
        let svc = tower::service_fn(move |_req: Request<Bytes>| {
            let f = frames.lock().unwrap().take().unwrap_or_default();
            async move { Ok::<_, Infallible>(sse(f)) }
        });
        let resp = Cost::new(svc, tracker.clone()).oneshot(req).await.unwrap();
        let _ = resp.into_body().collect().await;
        tracker.total()
    }

    /// Expected costs, by hand (nano-dollars):
    /// - text_cached (Sonnet 4.5): 2,095 in × 3,000 = 6,285,000; 800 5m writes × 3,750 =
    ///   3,000,000; 1,000 1h writes × 6,000 = 6,000,000; 12,000 reads × 300 = 3,600,000;
    ///   503 out × 15,000 = 7,545,000. Total 26,430,000.
    /// - server_tool (Opus 4.5): the final `message_delta` repeats the input count (10,682
    ///   × 5,000 = 53,410,000); 510 out × 25,000 = 12,750,000; 1 search = 10,000,000.
    ///   Total 76,160,000.
    /// - thinking_crlf (Haiku 4.5, CRLF, an unknown event with a bogus usage): 40 × 1,000
    ///   + 77 × 5,000 = 425,000.
    /// - midstream_error (Sonnet 4.5, `event: error` before any `message_delta`): the
    ///   lower bound 120 × 3,000 + 4,000 reads × 300 + 1 placeholder out × 15,000 =
    ///   1,575,000.
    const FIXTURES: [(&str, &str, u64, bool); 4] = [
        (TEXT_CACHED, "claude-sonnet-4-5-20250929", 26_430_000, true),
        (SERVER_TOOL, "claude-opus-4-5-20251101", 76_160_000, true),
        (THINKING_CRLF, "claude-haiku-4-5-20251001", 425_000, true),
        (
            MIDSTREAM_ERROR,
            "claude-sonnet-4-5-20250929",
            1_575_000,
            false,
        ),
    ];

    #[test]
    fn services_and_futures_are_send() {
        fn send_sync<T: Send + Sync>() {}
        fn send<T: Send>() {}
        type Inner =
            tower::util::BoxCloneSyncService<Request<Bytes>, Response<TestBody>, Infallible>;
        send_sync::<CostTracker>();
        send_sync::<CostLayer>();
        send_sync::<Cost<Inner>>();
        send::<ResponseFuture<std::future::Ready<Result<Response<TestBody>, Infallible>>>>();
        send::<ResponseBody<TestBody>>();
    }

    #[tokio::test]
    async fn fixtures_cost_what_was_computed_by_hand() {
        for (body, model, nanos, complete) in FIXTURES {
            let t = CostTracker::new();
            let tot = run(
                &t,
                request("claude-sonnet-4-5", 100),
                frames(&[body.as_bytes()]),
            )
            .await;
            assert_eq!(tot.cost, Usd::from_nanos(nanos), "{model}");
            assert_eq!(tot.incomplete_requests, u64::from(!complete), "{model}");
            assert_eq!(t.report().by_model[model].requests, 1, "{model}");
        }
    }

    struct Rng(u64);
    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % n as u64) as usize
        }
    }

    #[tokio::test]
    async fn every_frame_split_gives_the_same_cost() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for (body, model, nanos, _) in FIXTURES {
            let b = body.as_bytes();
            let expect = Usd::from_nanos(nanos);
            let mut splits: Vec<Vec<&[u8]>> = Vec::new();
            // Every two-frame split.
            for i in 0..=b.len() {
                splits.push(vec![&b[..i], &b[i..]]);
            }
            // One byte per frame.
            splits.push(b.chunks(1).collect());
            // Random splits into 3 to 40 frames.
            for _ in 0..200 {
                let mut cuts: Vec<usize> = (0..2 + rng.below(39))
                    .map(|_| rng.below(b.len() + 1))
                    .collect();
                cuts.sort_unstable();
                let mut parts = Vec::new();
                let mut at = 0;
                for c in cuts.into_iter().chain([b.len()]) {
                    parts.push(&b[at..c]);
                    at = c;
                }
                splits.push(parts);
            }
            for parts in splits {
                let t = CostTracker::new();
                let tot = run(&t, request("claude-sonnet-4-5", 100), frames(&parts)).await;
                assert_eq!(
                    tot.cost,
                    expect,
                    "{model}, frames of {:?}",
                    parts.iter().map(|p| p.len()).collect::<Vec<_>>()
                );
            }
        }
    }

    /// LiteLLM-style bug: `message_delta` usage is cumulative; adding the deltas up bills
    /// 7 + 15 = 22 output tokens instead of 15.
    #[tokio::test]
    async fn regression_message_delta_usage_is_not_summed() {
        let s = "event: message_start\n\
data: {\"type\":\"message_start\",\"message\":{\"model\":\"claude-haiku-4-5\",\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\n\n\
event: message_delta\n\
data: {\"type\":\"message_delta\",\"delta\":{},\"usage\":{\"output_tokens\":7}}\n\n\
event: message_delta\n\
data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":15}}\n\n\
event: message_stop\n\
data: {\"type\":\"message_stop\"}\n\n";
        let t = CostTracker::new();
        let tot = run(
            &t,
            request("claude-haiku-4-5", 100),
            frames(&[s.as_bytes()]),
        )
        .await;
        assert_eq!(tot.output_tokens, 15);
        // 25 × 1,000 + 15 × 5,000 (not 22 × 5,000 = 110,000, nor 23 with the placeholder).
        assert_eq!(tot.cost, Usd::from_nanos(25_000 + 75_000));
    }

    /// The cache counts come only in `message_start`; a `message_delta` carrying only
    /// `output_tokens` must not reset them (the text_cached fixture: without its cache
    /// counts it would cost 6,285,000 + 7,545,000 = 13,830,000 n$).
    #[tokio::test]
    async fn regression_message_start_cache_counts_are_kept() {
        let t = CostTracker::new();
        let tot = run(
            &t,
            request("claude-sonnet-4-5", 100),
            frames(&[TEXT_CACHED.as_bytes()]),
        )
        .await;
        assert_eq!(
            (
                tot.cache_write_5m_tokens,
                tot.cache_write_1h_tokens,
                tot.cache_read_tokens
            ),
            (800, 1_000, 12_000)
        );
        assert_ne!(tot.cost, Usd::from_nanos(13_830_000));
        assert_eq!(tot.cost, Usd::from_nanos(26_430_000));
    }

    /// A stream that ends (or breaks, or is dropped) before `message_delta` is still
    /// billed: input and cache counts of `message_start` and its placeholder output, a
    /// lower bound. 6,285,000 + 3,000,000 + 6,000,000 + 3,600,000 + 1 × 15,000.
    #[tokio::test]
    async fn regression_stream_cut_before_message_delta_is_billed() {
        const LOWER_BOUND: u64 = 18_900_000;
        let cut = TEXT_CACHED.find("event: message_delta").unwrap();
        let head = &TEXT_CACHED.as_bytes()[..cut];
        // The body ends early.
        let t = CostTracker::new();
        let tot = run(&t, request("claude-sonnet-4-5", 100), frames(&[head])).await;
        assert_eq!(
            (tot.cost, tot.incomplete_requests),
            (Usd::from_nanos(LOWER_BOUND), 1)
        );
        // The connection breaks.
        let mut f = frames(&[head]);
        f.push(Err(std::io::Error::from(
            std::io::ErrorKind::ConnectionReset,
        )));
        let t = CostTracker::new();
        let tot = run(&t, request("claude-sonnet-4-5", 100), f).await;
        assert_eq!(
            (tot.cost, tot.incomplete_requests),
            (Usd::from_nanos(LOWER_BOUND), 1)
        );
        // The client reads the head and goes away.
        let t = CostTracker::new();
        let svc = tower::service_fn(|_req: Request<Bytes>| async {
            Ok::<_, Infallible>(sse(frames(&[head, &TEXT_CACHED.as_bytes()[cut..]])))
        });
        let resp = Cost::new(svc, t.clone())
            .oneshot(request("claude-sonnet-4-5", 100))
            .await
            .unwrap();
        let mut body = resp.into_body();
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.data_ref().map(Bytes::len), Some(head.len()));
        assert_eq!(
            t.total().requests,
            0,
            "nothing recorded while the body is alive"
        );
        drop(body);
        let tot = t.total();
        assert_eq!(
            (tot.cost, tot.incomplete_requests),
            (Usd::from_nanos(LOWER_BOUND), 1)
        );
    }

    fn json_response(body: &'static str) -> Response<TestBody> {
        let mut r = Response::new(StreamBody::new(futures_util::stream::iter(frames(&[
            body.as_bytes()
        ]))));
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        r
    }

    #[tokio::test]
    async fn cache_hits_are_savings() {
        let t = CostTracker::new();
        let svc = tower::service_fn(|_req: Request<Bytes>| async {
            let mut r =
                json_response(r#"{"type":"message","usage":{"input_tokens":1,"output_tokens":1}}"#);
            r.extensions_mut().insert(CacheHit {
                usage: Usage {
                    input_tokens: 1_000,
                    output_tokens: 100,
                    ..Usage::default()
                },
                model: Some(Arc::from("claude-haiku-4-5-20251001")),
                age: std::time::Duration::from_secs(1),
            });
            Ok::<_, Infallible>(r)
        });
        let resp = Cost::new(svc, t.clone())
            .oneshot(request("claude-haiku-4-5", 100))
            .await
            .unwrap();
        // Recorded at once, from the hit, not from the replayed body.
        let tot = t.total();
        assert_eq!((tot.requests, tot.cache_hits, tot.cost), (1, 1, Usd::ZERO));
        assert_eq!(tot.savings, Usd::from_nanos(1_000 * 1_000 + 100 * 5_000));
        let _ = resp.into_body().collect().await;
        assert_eq!(t.total().requests, 1, "recorded once");
    }

    #[tokio::test]
    async fn refused_requests_never_reach_the_inner_service() {
        let t = CostTracker::builder()
            .budgets(BudgetConfig::new().per_tenant(Budget::new().daily(Usd::from_nanos(1))))
            .build();
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let svc = tower::service_fn(move |_req: Request<Bytes>| {
            c.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, Infallible>(json_response("{}")) }
        });
        let mut req = request("claude-haiku-4-5", 100);
        req.extensions_mut().insert(Tenant::new("acme"));
        let err = Cost::new(svc, t.clone()).oneshot(req).await.unwrap_err();
        assert_eq!(calls.load(Ordering::SeqCst), 0);
        let err = Error::from_box(err);
        assert_eq!(err.kind(), ErrorKind::BudgetExceeded);
        let resp = err.into_response();
        assert_eq!(resp.status(), http::StatusCode::BAD_REQUEST);
        assert_eq!(t.total().requests, 0);
    }

    #[tokio::test]
    async fn inner_errors_release_the_reservation() {
        let t = CostTracker::builder()
            .budgets(BudgetConfig::new().global(Budget::new().daily(Usd::from_dollars(1))))
            .build();
        let svc = tower::service_fn(|_req: Request<Bytes>| async {
            Err::<Response<TestBody>, _>(std::io::Error::from(
                std::io::ErrorKind::ConnectionRefused,
            ))
        });
        let err = Cost::new(svc, t.clone())
            .oneshot(request("claude-haiku-4-5", 1_000))
            .await
            .unwrap_err();
        assert!(err.is::<std::io::Error>());
        let report: CostReport = t.report();
        assert_eq!(report.budgets[0].reserved, Usd::ZERO);
        assert_eq!(report.total.requests, 0);
    }

    #[tokio::test]
    async fn other_endpoints_pass_through_unrecorded() {
        let t = CostTracker::builder()
            .budgets(BudgetConfig::new().global(Budget::new().daily(Usd::ZERO)))
            .build();
        let svc = tower::service_fn(|_req: Request<Bytes>| async {
            Ok::<_, Infallible>(json_response(r#"{"input_tokens":12}"#))
        });
        let req = Request::post("http://api.test/v1/messages/count_tokens")
            .body(Bytes::from_static(
                br#"{"model":"claude-haiku-4-5","messages":[]}"#,
            ))
            .unwrap();
        let resp = Cost::new(svc, t.clone()).oneshot(req).await.unwrap();
        let _ = resp.into_body().collect().await;
        assert_eq!(t.total().requests, 0);
    }

    #[tokio::test]
    async fn tags_and_beta_header_reach_the_record() {
        let t = CostTracker::new();
        // 150,000 + 60,000 reads = 210,000 > 200K with the beta: $6 and $0.60 per MTok.
        let svc = tower::service_fn(|_req: Request<Bytes>| async {
            Ok::<_, Infallible>(json_response(
                r#"{"type":"message","model":"claude-sonnet-4-5","usage":{"input_tokens":150000,"cache_read_input_tokens":60000,"output_tokens":0}}"#,
            ))
        });
        let mut req = request("claude-sonnet-4-5", 100);
        req.headers_mut().append(
            ANTHROPIC_BETA,
            http::HeaderValue::from_static("interleaved-thinking-2025-05-14"),
        );
        req.headers_mut().append(
            ANTHROPIC_BETA,
            http::HeaderValue::from_static("context-1m-2025-08-07"),
        );
        req.extensions_mut()
            .insert(CostTags::new().with("feature", "rag"));
        let resp = Cost::new(svc, t.clone()).oneshot(req).await.unwrap();
        let _ = resp.into_body().collect().await;
        let r = t.report();
        assert_eq!(
            r.total.cost,
            Usd::from_nanos(150_000 * 6_000 + 60_000 * 600)
        );
        assert_eq!(r.by_tag["feature=rag"].requests, 1);
    }
}
