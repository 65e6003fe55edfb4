//! In-process tests of the whole layer: a scripted inner service, tokio paused time (so
//! waits are exact and instant), and the metrics debugging recorder.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use claude_core::{Attempt, BoxError, Error, ErrorKind, Origin};
use http::{Request, Response};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};

use crate::{
    BudgetConfig, Deadline, GiveUp, Jitter, ResponseBody, Retry, RetryConfig, RetryInfo,
    RetryLayer, RetryReason, WaitSource,
};

// ===== a scripted upstream =====

/// What the upstream does on one attempt; the last entry repeats.
#[derive(Clone, Debug)]
enum Reply {
    /// A response with status, headers and body frames.
    Resp(u16, Vec<(&'static str, String)>, Vec<&'static str>),
    /// A 200 SSE response with these frames, then a body error (connection reset).
    SseBroken(Vec<&'static str>),
    /// An io error of this kind instead of a response.
    Io(std::io::ErrorKind),
    /// An error the stack made itself.
    Local(fn() -> Error),
    /// Never answers.
    Hang,
}

fn ok_json() -> Reply {
    Reply::Resp(
        200,
        vec![("content-type", "application/json".into())],
        vec![r#"{"type":"message","content":[]}"#],
    )
}

fn status(code: u16) -> Reply {
    Reply::Resp(code, vec![], vec![error_body(code)])
}

fn status_with(code: u16, headers: &[(&'static str, &str)]) -> Reply {
    Reply::Resp(
        code,
        headers.iter().map(|(k, v)| (*k, (*v).to_owned())).collect(),
        vec![error_body(code)],
    )
}

fn error_body(code: u16) -> &'static str {
    match code {
        529 => r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
        429 => r#"{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}"#,
        500..=599 => r#"{"type":"error","error":{"type":"api_error","message":"oops"}}"#,
        _ => r#"{"type":"error","error":{"type":"invalid_request_error","message":"no"}}"#,
    }
}

fn sse(frames: Vec<&'static str>) -> Reply {
    Reply::Resp(
        200,
        vec![("content-type", "text/event-stream".into())],
        frames,
    )
}

const START: &str = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":5,\"output_tokens\":1}}}\n\n";
const DELTA: &str = "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}\n\n";
const STOP: &str = "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
const OVERLOADED_EVENT: &str = "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n";
const INVALID_EVENT: &str = "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"invalid_request_error\",\"message\":\"bad\"}}\n\n";

/// A body of frames, optionally failing at the end.
struct TestBody {
    frames: VecDeque<Bytes>,
    fail: bool,
}

impl Body for TestBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        if let Some(f) = self.frames.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(f))));
        }
        if std::mem::take(&mut self.fail) {
            return Poll::Ready(Some(Err(std::io::ErrorKind::ConnectionReset.into())));
        }
        Poll::Ready(None)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Call {
    attempt: u32,
    body_ptr: usize,
}

/// The scripted upstream. It also checks the `Service` contract: `call` panics unless
/// this very instance was polled ready since its last call (clones start not ready).
struct Scripted {
    script: Arc<Vec<Reply>>,
    calls: Arc<Mutex<Vec<Call>>>,
    ready: bool,
}

impl Clone for Scripted {
    fn clone(&self) -> Self {
        Self {
            script: self.script.clone(),
            calls: self.calls.clone(),
            ready: false,
        }
    }
}

impl Scripted {
    fn new(script: Vec<Reply>) -> Self {
        Self {
            script: Arc::new(script),
            calls: Arc::default(),
            ready: false,
        }
    }

    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }
}

type BoxFut = Pin<Box<dyn Future<Output = Result<Response<TestBody>, BoxError>> + Send>>;

impl Service<Request<Bytes>> for Scripted {
    type Response = Response<TestBody>;
    type Error = BoxError;
    type Future = BoxFut;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.ready = true;
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Bytes>) -> BoxFut {
        assert!(
            std::mem::take(&mut self.ready),
            "call without poll_ready on this instance"
        );
        let n = {
            let mut calls = self.calls.lock().unwrap();
            calls.push(Call {
                attempt: Attempt::of(&req),
                body_ptr: req.body().as_ptr() as usize,
            });
            calls.len() - 1
        };
        let reply = self.script[n.min(self.script.len() - 1)].clone();
        Box::pin(async move {
            let (code, headers, frames, fail) = match reply {
                Reply::Resp(code, headers, frames) => (code, headers, frames, false),
                Reply::SseBroken(frames) => (
                    200,
                    vec![("content-type", "text/event-stream".to_owned())],
                    frames,
                    true,
                ),
                Reply::Io(kind) => return Err(std::io::Error::from(kind).into()),
                Reply::Local(make) => return Err(make().into()),
                Reply::Hang => std::future::pending().await,
            };
            let mut resp = Response::new(TestBody {
                frames: frames.into_iter().map(Bytes::from).collect(),
                fail,
            });
            *resp.status_mut() = http::StatusCode::from_u16(code)?;
            for (k, v) in headers {
                resp.headers_mut().insert(k, v.parse()?);
            }
            Ok(resp)
        })
    }
}

// ===== helpers =====

fn request() -> Request<Bytes> {
    Request::post("http://upstream.test/v1/messages")
        .header("anthropic-version", "2023-06-01")
        .body(Bytes::from_static(
            br#"{"model":"claude-sonnet-4-5","max_tokens":16,"messages":[]}"#,
        ))
        .unwrap()
}

/// Test config: no jitter, SDK backoff constants, generous budget.
fn config() -> RetryConfig {
    RetryConfig {
        jitter: Jitter::None,
        budget: BudgetConfig {
            retry_ratio: 10.0,
            ..BudgetConfig::default()
        },
        ..RetryConfig::default()
    }
}

async fn run(
    config: RetryConfig,
    script: Vec<Reply>,
) -> (Result<Response<ResponseBody<TestBody>>, BoxError>, Scripted) {
    let upstream = Scripted::new(script);
    let svc = Retry::new(upstream.clone(), config);
    (svc.oneshot(request()).await, upstream)
}

fn info<B>(resp: &Response<B>) -> RetryInfo {
    resp.extensions().get::<RetryInfo>().cloned().unwrap()
}

async fn text(resp: Response<ResponseBody<TestBody>>) -> String {
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}

// ===== tests =====

#[tokio::test(start_paused = true)]
async fn success_passes_through_untouched() {
    let (resp, up) = run(config(), vec![ok_json()]).await;
    let resp = resp.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        !resp.body().is_prefixed(),
        "a JSON success must not be read"
    );
    assert_eq!(resp.extensions().get::<Attempt>(), Some(&Attempt(1)));
    assert_eq!(
        info(&resp),
        RetryInfo {
            attempts: 1,
            retries: vec![],
            gave_up: None
        }
    );
    assert_eq!(up.calls().len(), 1);
    assert_eq!(text(resp).await, r#"{"type":"message","content":[]}"#);
}

#[tokio::test(start_paused = true)]
async fn every_attempt_sends_the_same_bytes_and_its_number() {
    let (resp, up) = run(config(), vec![status(500), status(529), ok_json()]).await;
    let resp = resp.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.extensions().get::<Attempt>(), Some(&Attempt(3)));
    let calls = up.calls();
    assert_eq!(
        calls.iter().map(|c| c.attempt).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    // One buffer for every attempt: the body was cloned (a reference count), not rebuilt.
    assert!(calls.iter().all(|c| c.body_ptr == calls[0].body_ptr));
    let info = info(&resp);
    assert_eq!(info.attempts, 3);
    assert_eq!(
        info.retries.iter().map(|r| r.reason).collect::<Vec<_>>(),
        [
            RetryReason::Status {
                status: http::StatusCode::INTERNAL_SERVER_ERROR,
                kind: ErrorKind::ServerError
            },
            RetryReason::Status {
                status: http::StatusCode::from_u16(529).unwrap(),
                kind: ErrorKind::Overloaded
            },
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn backoff_follows_the_sdk_schedule_and_stops_at_max_retries() {
    let start = Instant::now();
    let cfg = RetryConfig {
        max_retries: 4,
        ..config()
    };
    let (resp, up) = run(cfg, vec![status(503)]).await;
    let resp = resp.unwrap();
    let info = info(&resp);
    let waits: Vec<_> = info.waits().map(|d| d.as_millis()).collect();
    assert_eq!(waits, [500, 1000, 2000, 4000]);
    assert!(info.retries.iter().all(|r| r.source == WaitSource::Backoff));
    // Paused time: the layer slept exactly the waits it recorded.
    assert_eq!(start.elapsed(), Duration::from_millis(7500));
    assert_eq!(info.gave_up, Some(GiveUp::MaxRetries));
    assert_eq!(up.calls().len(), 5);
    // The last failure is returned as the server sent it.
    assert_eq!(resp.status(), 503);
    assert_eq!(text(resp).await, error_body(503));
}

#[tokio::test(start_paused = true)]
async fn jitter_modes_stay_in_their_ranges_and_seed_reproduces() {
    async fn waits(jitter: Jitter, seed: u64) -> Vec<Duration> {
        let layer = RetryLayer::new(RetryConfig {
            max_retries: 5,
            jitter,
            ..config()
        })
        .jitter_seed(seed);
        let up = Scripted::new(vec![status(500)]);
        let resp = layer.layer(up).oneshot(request()).await.unwrap();
        info(&resp).waits().collect()
    }
    let base = [500u64, 1000, 2000, 4000, 8000];
    let sdk = waits(Jitter::Sdk, 1).await;
    let full = waits(Jitter::Full, 1).await;
    for (i, b) in base.iter().enumerate() {
        let b = Duration::from_millis(*b);
        assert!(sdk[i] > b.mul_f64(0.75) && sdk[i] <= b, "{:?}", sdk[i]);
        assert!(full[i] < b, "{:?}", full[i]);
    }
    assert_ne!(sdk, base.map(Duration::from_millis).to_vec());
    assert_eq!(sdk, waits(Jitter::Sdk, 1).await);
    assert_ne!(sdk, waits(Jitter::Sdk, 2).await);
}

#[tokio::test(start_paused = true)]
async fn server_waits_are_honoured_exactly() {
    let start = Instant::now();
    let (resp, _) = run(
        config(),
        vec![
            status_with(429, &[("retry-after-ms", "250"), ("retry-after", "9")]),
            status_with(529, &[("retry-after", "2")]),
            ok_json(),
        ],
    )
    .await;
    let info = info(&resp.unwrap());
    assert_eq!(
        info.waits().collect::<Vec<_>>(),
        [Duration::from_millis(250), Duration::from_secs(2)]
    );
    assert!(info.retries.iter().all(|r| r.source == WaitSource::Server));
    assert_eq!(start.elapsed(), Duration::from_millis(2250));
}

#[tokio::test(start_paused = true)]
async fn retry_after_http_date_is_honoured() {
    let date = httpdate_in(Duration::from_secs(30));
    let (resp, _) = run(
        config(),
        vec![status_with(503, &[("retry-after", &date)]), ok_json()],
    )
    .await;
    let info = info(&resp.unwrap());
    assert_eq!(info.attempts, 2);
    let wait = info.retries[0].wait;
    // HTTP dates have whole seconds: between 29 and 30 s from "now".
    assert!(
        wait > Duration::from_secs(28) && wait <= Duration::from_secs(30),
        "{wait:?}"
    );
    assert_eq!(info.retries[0].source, WaitSource::Server);
}

fn httpdate_in(d: Duration) -> String {
    httpdate::fmt_http_date(SystemTime::now() + d)
}

#[tokio::test(start_paused = true)]
async fn zero_server_wait_falls_back_to_backoff() {
    let (resp, _) = run(
        config(),
        vec![status_with(429, &[("retry-after", "0")]), ok_json()],
    )
    .await;
    let info = info(&resp.unwrap());
    assert_eq!(info.retries[0].wait, Duration::from_millis(500));
    assert_eq!(info.retries[0].source, WaitSource::Backoff);
}

#[tokio::test(start_paused = true)]
async fn a_wait_over_the_cap_returns_at_once() {
    let start = Instant::now();
    let (resp, up) = run(
        config(),
        vec![status_with(429, &[("retry-after", "61")]), ok_json()],
    )
    .await;
    let resp = resp.unwrap();
    assert_eq!(resp.status(), 429);
    assert_eq!(
        info(&resp).gave_up,
        Some(GiveUp::RetryAfterTooLong(Duration::from_secs(61)))
    );
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert_eq!(up.calls().len(), 1);
    // The error body was read to classify it, and is handed on intact.
    assert!(resp.body().is_prefixed());
    assert_eq!(text(resp).await, error_body(429));
}

#[tokio::test(start_paused = true)]
async fn a_wait_past_the_deadline_returns_at_once() {
    let start = Instant::now();
    let cfg = RetryConfig {
        deadline: Duration::from_secs(5),
        ..config()
    };
    let (resp, up) = run(
        cfg,
        vec![status_with(529, &[("retry-after", "10")]), ok_json()],
    )
    .await;
    let resp = resp.unwrap();
    assert_eq!(resp.status(), 529);
    assert_eq!(
        info(&resp).gave_up,
        Some(GiveUp::WaitPastDeadline(Duration::from_secs(10)))
    );
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert_eq!(up.calls().len(), 1);
    // The same applies to a backoff that would end past the deadline.
    let cfg = RetryConfig {
        deadline: Duration::from_millis(1200),
        ..config()
    };
    let (resp, up) = run(cfg, vec![status(500)]).await;
    let info = info(&resp.unwrap());
    assert_eq!(info.attempts, 2); // 500 ms fits, the next 1 s does not
    assert_eq!(
        info.gave_up,
        Some(GiveUp::WaitPastDeadline(Duration::from_secs(1)))
    );
    assert_eq!(up.calls().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn the_deadline_bounds_the_attempt_in_flight() {
    let start = Instant::now();
    let cfg = RetryConfig {
        deadline: Duration::from_secs(3),
        ..config()
    };
    let (res, up) = run(cfg, vec![status(500), Reply::Hang]).await;
    let err = Error::from_box(res.unwrap_err());
    assert_eq!(err.kind(), ErrorKind::Timeout);
    assert_eq!(err.origin(), Origin::Local);
    assert!(!err.is_retryable());
    assert!(err.message().contains("attempt 2"), "{err}");
    assert_eq!(start.elapsed(), Duration::from_secs(3));
    assert_eq!(up.calls().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_deadline_extension_overrides_the_config() {
    let start = Instant::now();
    let up = Scripted::new(vec![Reply::Hang]);
    let svc = Retry::new(up, config());
    let mut req = request();
    req.extensions_mut()
        .insert(Deadline::after(Duration::from_millis(1500)));
    let err = Error::from_box(svc.oneshot(req).await.unwrap_err());
    assert_eq!(err.kind(), ErrorKind::Timeout);
    assert_eq!(start.elapsed(), Duration::from_millis(1500));
}

#[tokio::test(start_paused = true)]
async fn the_status_table() {
    let retried = [408, 409, 429, 500, 502, 503, 504, 529];
    let not_retried = [400, 401, 402, 403, 404, 413, 422];
    for code in retried {
        let (resp, up) = run(config(), vec![status(code), ok_json()]).await;
        assert_eq!(resp.unwrap().status(), 200, "{code}");
        assert_eq!(up.calls().len(), 2, "{code}");
    }
    for code in not_retried {
        let (resp, up) = run(config(), vec![status(code), ok_json()]).await;
        let resp = resp.unwrap();
        assert_eq!(resp.status(), code);
        assert_eq!(info(&resp).gave_up, Some(GiveUp::NotRetryable), "{code}");
        // Not retryable by status: the body is not even read.
        assert!(!resp.body().is_prefixed(), "{code}");
        assert_eq!(up.calls().len(), 1, "{code}");
    }
}

#[tokio::test(start_paused = true)]
async fn should_retry_header_overrides() {
    let (resp, up) = run(
        config(),
        vec![status_with(529, &[("x-should-retry", "false")]), ok_json()],
    )
    .await;
    assert_eq!(resp.unwrap().status(), 529);
    assert_eq!(up.calls().len(), 1);
    let (resp, up) = run(
        config(),
        vec![status_with(400, &[("x-should-retry", "true")]), ok_json()],
    )
    .await;
    assert_eq!(resp.unwrap().status(), 200);
    assert_eq!(up.calls().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn the_spend_cap_is_not_retried() {
    const CAP: &str = r#"{"type":"error","error":{"type":"rate_limit_error","message":"cap","details":{"error_code":"enforced_spend_limit_reached"}}}"#;
    let (resp, up) = run(
        config(),
        vec![Reply::Resp(429, vec![], vec![CAP]), ok_json()],
    )
    .await;
    let resp = resp.unwrap();
    assert_eq!(resp.status(), 429);
    assert_eq!(info(&resp).gave_up, Some(GiveUp::NotRetryable));
    assert_eq!(up.calls().len(), 1);
    assert_eq!(text(resp).await, CAP);
}

#[tokio::test(start_paused = true)]
async fn local_refusals_pass_through_unretried() {
    fn local_429() -> Error {
        Error::rate_limited_locally(Duration::from_secs(3), "local rate limit: rpm")
    }
    fn budget() -> Error {
        Error::budget_exceeded("daily budget reached")
    }
    for make in [local_429 as fn() -> Error, budget] {
        let (res, up) = run(config(), vec![Reply::Local(make), ok_json()]).await;
        let err = res.unwrap_err();
        let err = err.downcast_ref::<Error>().unwrap();
        assert_eq!(err.message(), make().message(), "passed through untouched");
        assert_eq!(err.kind(), make().kind());
        assert_eq!(up.calls().len(), 1);
    }
}

#[tokio::test(start_paused = true)]
async fn transport_errors_are_retried_then_classified() {
    let (resp, up) = run(
        config(),
        vec![Reply::Io(std::io::ErrorKind::ConnectionReset), ok_json()],
    )
    .await;
    let resp = resp.unwrap();
    assert_eq!(up.calls().len(), 2);
    assert_eq!(
        info(&resp).retries[0].reason,
        RetryReason::Error {
            kind: ErrorKind::Connection
        }
    );

    let (res, up) = run(
        config(),
        vec![Reply::Io(std::io::ErrorKind::ConnectionRefused)],
    )
    .await;
    assert_eq!(up.calls().len(), 3);
    let err = res.unwrap_err();
    let err = err.downcast_ref::<Error>().unwrap();
    assert_eq!(err.kind(), ErrorKind::Connection);
    assert_eq!(err.origin(), Origin::Transport);
    assert!(
        err.message().contains("3 attempts") && err.message().contains("retries exhausted"),
        "{err}"
    );
    // The original error is kept as the source.
    let source = std::error::Error::source(err).unwrap();
    assert!(source.downcast_ref::<std::io::Error>().is_some());

    // Unknown errors are not retried.
    let (res, up) = run(config(), vec![Reply::Io(std::io::ErrorKind::Other)]).await;
    assert_eq!(up.calls().len(), 1);
    let err = Error::from_box(res.unwrap_err());
    assert_eq!(err.kind(), ErrorKind::Internal);
    assert!(err.message().contains("1 attempt;"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn a_first_event_error_is_retried() {
    let (resp, up) = run(
        config(),
        vec![sse(vec![OVERLOADED_EVENT]), sse(vec![START, DELTA, STOP])],
    )
    .await;
    let resp = resp.unwrap();
    assert_eq!(up.calls().len(), 2);
    assert_eq!(
        info(&resp).retries[0].reason,
        RetryReason::StreamError {
            kind: ErrorKind::Overloaded
        }
    );
    // The caller gets the whole second stream, exactly.
    assert_eq!(text(resp).await, [START, DELTA, STOP].concat());
}

#[tokio::test(start_paused = true)]
async fn an_error_after_the_first_event_reaches_the_caller() {
    let frames = vec![START, DELTA, OVERLOADED_EVENT];
    let (resp, up) = run(config(), vec![sse(frames.clone()), ok_json()]).await;
    let resp = resp.unwrap();
    assert_eq!(up.calls().len(), 1);
    assert_eq!(info(&resp).gave_up, None);
    assert!(resp.body().is_prefixed());
    assert_eq!(text(resp).await, frames.concat());
}

#[tokio::test(start_paused = true)]
async fn a_non_retryable_first_event_error_reaches_the_caller() {
    let (resp, up) = run(config(), vec![sse(vec![INVALID_EVENT]), ok_json()]).await;
    let resp = resp.unwrap();
    assert_eq!(up.calls().len(), 1);
    assert_eq!(info(&resp).gave_up, Some(GiveUp::NotRetryable));
    assert_eq!(text(resp).await, INVALID_EVENT);
}

/// `s` cut into frames of one byte.
fn bytewise(s: &'static str) -> Vec<&'static str> {
    (0..s.len()).filter_map(|i| s.get(i..=i)).collect()
}

#[tokio::test(start_paused = true)]
async fn the_first_event_split_across_frames_is_found() {
    let (a, b) = OVERLOADED_EVENT.split_at(17);
    for frames in [vec![a, b], bytewise(OVERLOADED_EVENT)] {
        let (resp, up) = run(config(), vec![sse(frames), sse(vec![START, STOP])]).await;
        assert_eq!(up.calls().len(), 2);
        assert_eq!(text(resp.unwrap()).await, [START, STOP].concat());
    }
    // A first event that is not an error, however it is cut, is handed on intact.
    let frames = [bytewise(START), vec![DELTA, STOP]].concat();
    let (resp, up) = run(config(), vec![sse(frames), ok_json()]).await;
    assert_eq!(up.calls().len(), 1);
    assert_eq!(text(resp.unwrap()).await, [START, DELTA, STOP].concat());
}

#[tokio::test(start_paused = true)]
async fn first_event_errors_without_a_usable_type() {
    for (first, gave_up) in [
        // No `error.type`: an unknown error, not retried.
        (
            "event: error\ndata: {\"type\":\"error\"}\n\n",
            Some(GiveUp::NotRetryable),
        ),
        // Data that is not JSON says nothing: the stream is handed on as it is.
        ("event: error\ndata: {\"type\":\"overloaded_er\n\n", None),
    ] {
        let (resp, up) = run(config(), vec![sse(vec![first]), ok_json()]).await;
        let resp = resp.unwrap();
        assert_eq!(up.calls().len(), 1);
        assert_eq!(info(&resp).gave_up, gave_up);
        assert_eq!(text(resp).await, first);
    }
}

#[tokio::test(start_paused = true)]
async fn a_stream_broken_before_its_first_event_is_retried() {
    let (a, _) = START.split_at(20);
    let (resp, up) = run(
        config(),
        vec![Reply::SseBroken(vec![a]), sse(vec![START, STOP])],
    )
    .await;
    let resp = resp.unwrap();
    assert_eq!(up.calls().len(), 2);
    assert_eq!(
        info(&resp).retries[0].reason,
        RetryReason::Error {
            kind: ErrorKind::Connection
        }
    );
}

#[tokio::test(start_paused = true)]
async fn no_peek_without_a_retry_left() {
    let cfg = RetryConfig {
        max_retries: 0,
        ..config()
    };
    let (resp, up) = run(cfg, vec![sse(vec![OVERLOADED_EVENT])]).await;
    let resp = resp.unwrap();
    assert!(!resp.body().is_prefixed());
    assert_eq!(up.calls().len(), 1);
    let cfg = RetryConfig {
        peek_first_event: false,
        ..config()
    };
    let (resp, up) = run(cfg, vec![sse(vec![OVERLOADED_EVENT]), ok_json()]).await;
    assert!(!resp.unwrap().body().is_prefixed());
    assert_eq!(up.calls().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn an_oversized_error_body_is_classified_by_status_and_handed_on_intact() {
    const CAP: &str = r#"{"type":"error","error":{"type":"rate_limit_error","message":"cap","details":{"error_code":"enforced_spend_limit_reached"}}}"#;
    let reply = Reply::Resp(
        429,
        vec![("retry-after", "61".into())],
        vec![&CAP[..20], &CAP[20..]],
    );
    // Within the limit, the body says "spend cap": not retryable.
    let (resp, _) = run(config(), vec![reply.clone()]).await;
    assert_eq!(info(&resp.unwrap()).gave_up, Some(GiveUp::NotRetryable));
    // Past the limit the body is not parsed: a retryable 429 by status, whose wait is
    // over the cap. The caller still gets the whole body: the frames read, then the rest.
    let cfg = RetryConfig {
        error_body_limit: 16,
        ..config()
    };
    let (resp, up) = run(cfg, vec![reply]).await;
    let resp = resp.unwrap();
    assert_eq!(up.calls().len(), 1);
    assert_eq!(
        info(&resp).gave_up,
        Some(GiveUp::RetryAfterTooLong(Duration::from_secs(61)))
    );
    assert!(resp.body().is_prefixed());
    assert_eq!(text(resp).await, CAP);
}

#[tokio::test(start_paused = true)]
async fn the_budget_bounds_retries_across_clones() {
    let layer = RetryLayer::new(RetryConfig {
        max_retries: 5,
        initial_backoff: Duration::from_millis(1),
        budget: BudgetConfig {
            window: Duration::from_secs(60),
            retry_ratio: 0.5,
            min_per_sec: 0,
        },
        ..config()
    });
    let up = Scripted::new(vec![status(500)]);
    let svc = layer.layer(up.clone());
    let mut gave_up = Vec::new();
    for _ in 0..10 {
        let resp = svc.clone().oneshot(request()).await.unwrap();
        gave_up.push(info(&resp).gave_up);
    }
    // 10 requests × 0.5 = 5 retries, whichever clone asks.
    assert_eq!(up.calls().len(), 15);
    assert_eq!(svc.retry_budget().counts(), (10, 5));
    assert!(gave_up.contains(&Some(GiveUp::BudgetExhausted)));
}

#[test]
fn metrics_count_retries_by_reason_and_budget_refusals() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    metrics::with_local_recorder(&recorder, || {
        rt.block_on(async {
            let cfg = RetryConfig {
                budget: BudgetConfig {
                    window: Duration::from_secs(3600),
                    retry_ratio: 2.5,
                    min_per_sec: 0,
                },
                ..config()
            };
            // 2.5 retries per request: 529 → 529 → ok takes 2 (OVERLOADED), the stream
            // error 1, and the always-500 request the 4 left of 7.5, then the budget is
            // spent.
            let layer = RetryLayer::new(cfg);
            let up = Scripted::new(vec![status(529), status(529), ok_json()]);
            layer.layer(up).oneshot(request()).await.unwrap();
            let up = Scripted::new(vec![sse(vec![OVERLOADED_EVENT]), ok_json()]);
            layer.layer(up).oneshot(request()).await.unwrap();
            let svc = layer
                .clone()
                .max_retries(100)
                .budget(layer.retry_budget().clone());
            let up = Scripted::new(vec![status(500)]);
            let resp = svc.layer(up.clone()).oneshot(request()).await.unwrap();
            assert_eq!(info(&resp).gave_up, Some(GiveUp::BudgetExhausted));
            assert_eq!(up.calls().len(), 5);
        });
    });
    let mut counters = std::collections::HashMap::new();
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        let key = key.key();
        let mut labels: Vec<String> = key
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        labels.sort();
        if let DebugValue::Counter(n) = value {
            counters.insert(format!("{}{{{}}}", key.name(), labels.join(",")), n);
        }
    }
    assert_eq!(
        counters.get("claude_retry_attempts_total{reason=OVERLOADED,source=status}"),
        Some(&2),
        "{counters:?}"
    );
    assert_eq!(
        counters.get("claude_retry_attempts_total{reason=OVERLOADED,source=stream}"),
        Some(&1)
    );
    assert_eq!(
        counters.get("claude_retry_attempts_total{reason=SERVER_ERROR,source=status}"),
        Some(&4)
    );
    assert_eq!(
        counters.get("claude_retry_budget_exhausted_total{}"),
        Some(&1)
    );
}

#[tokio::test(start_paused = true)]
async fn clones_and_poll_ready_contract() {
    // `Scripted` panics on a call without poll_ready: retries on the kept service, and
    // calls through clones of the Retry service, must all respect it.
    let up = Scripted::new(vec![status(500), status(500), ok_json()]);
    let mut svc = Retry::new(up.clone(), config());
    let resp = svc.ready().await.unwrap().call(request()).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut clone = svc.clone();
    let resp = clone.ready().await.unwrap().call(request()).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(up.calls().len(), 4);
    assert_eq!(svc.get_ref().calls().len(), 4);
}

#[test]
fn the_future_and_body_are_send() {
    fn is_send<T: Send>() {}
    is_send::<crate::ResponseFuture<Scripted, TestBody>>();
    is_send::<ResponseBody<TestBody>>();
    is_send::<Retry<Scripted>>();
}
