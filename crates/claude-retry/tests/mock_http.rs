//! `RetryLayer` over real HTTP on loopback against `claude-mock`: every fault class,
//! server waits, the cap, the deadline, the budget bound, first-event stream errors, and
//! 1,000 concurrent requests of which a third fail first.
//!
//! The client is hyper-util's legacy client behind `claude_core::FullBodyService`, as in
//! production. No assertion is about how long something took: waits are read from the
//! `RetryInfo` the layer attaches, attempts from the `Attempt` extension every attempt
//! carries (recorded just inside the layer) and from the mock's own request counts.

#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use claude_core::{Attempt, BoxError, Error, ErrorKind, FullBodyService, Origin};
use claude_mock::MockServer;
use claude_retry::{
    BudgetConfig, Deadline, GiveUp, ResponseBody, RetryConfig, RetryInfo, RetryLayer, RetryReason,
    WaitSource,
};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tower::util::BoxCloneSyncService;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};

/// Extra request headers of a test case.
type Headers = &'static [(&'static str, &'static str)];
type HttpClient = FullBodyService<Client<HttpConnector, Full<Bytes>>>;
type Stack = BoxCloneSyncService<Request<Bytes>, Response<ResponseBody<Incoming>>, BoxError>;

fn client() -> HttpClient {
    FullBodyService::new(Client::builder(TokioExecutor::new()).build_http())
}

/// Fast waits and a budget that never binds, unless a test says otherwise.
fn fast() -> RetryConfig {
    RetryConfig {
        initial_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(5),
        budget: BudgetConfig {
            retry_ratio: 10.0,
            ..BudgetConfig::default()
        },
        ..RetryConfig::default()
    }
}

/// `retry → record the attempt number → [inner] → HTTP client`; returns the attempt
/// numbers seen just inside the retry layer.
fn stack_with<L>(layer: RetryLayer, inner: L) -> (Stack, Arc<Mutex<Vec<u32>>>)
where
    L: Layer<HttpClient>,
    L::Service:
        Service<Request<Bytes>, Response = Response<Incoming>> + Clone + Send + Sync + 'static,
    <L::Service as Service<Request<Bytes>>>::Error: Into<BoxError>,
    <L::Service as Service<Request<Bytes>>>::Future: Send + 'static,
{
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .map_request(move |req: Request<Bytes>| {
            record.lock().unwrap().push(Attempt::of(&req));
            req
        })
        .layer(inner)
        .service(client());
    (BoxCloneSyncService::new(svc), seen)
}

fn stack(config: RetryConfig) -> (Stack, Arc<Mutex<Vec<u32>>>) {
    stack_with(RetryLayer::new(config), tower::layer::util::Identity::new())
}

/// A unique `x-mock-key`, so fault attempts are counted per request.
fn key() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("k{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

fn message(mock: &MockServer, headers: &[(&str, &str)], stream: bool) -> Request<Bytes> {
    let body = format!(
        r#"{{"model":"claude-sonnet-4-5","max_tokens":64,"stream":{stream},"messages":[{{"role":"user","content":"Hello"}}]}}"#
    );
    let mut b = Request::post(format!("{}/v1/messages", mock.url()))
        .header("anthropic-version", "2023-06-01")
        .header("content-type", "application/json")
        .header("x-mock-key", key());
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Bytes::from(body)).unwrap()
}

fn info<B>(resp: &Response<B>) -> RetryInfo {
    resp.extensions().get::<RetryInfo>().cloned().unwrap()
}

async fn text(resp: Response<ResponseBody<Incoming>>) -> String {
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}

fn error_type(body: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    v["error"]["type"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn retried_fault_classes() {
    let mock = MockServer::start().await.unwrap();
    let cases: &[(&str, Headers, ErrorKind)] = &[
        ("408,ok", &[], ErrorKind::Timeout),
        ("409,ok", &[], ErrorKind::Conflict),
        ("429,ok", &[], ErrorKind::RateLimited),
        ("500,ok", &[], ErrorKind::ServerError),
        ("502,ok", &[], ErrorKind::ServerError),
        ("503,ok", &[], ErrorKind::ServerError),
        ("504,ok", &[], ErrorKind::Timeout),
        ("529,ok", &[], ErrorKind::Overloaded),
        ("reset,ok", &[], ErrorKind::Connection),
        // `x-should-retry: true` overrides the status.
        (
            "400,ok",
            &[("x-mock-should-retry", "true")],
            ErrorKind::InvalidRequest,
        ),
    ];
    for (spec, extra, kind) in cases {
        let (svc, seen) = stack(fast());
        let before = mock.stats().requests;
        let mut headers = vec![("x-mock-fault", *spec)];
        headers.extend_from_slice(extra);
        let resp = svc.oneshot(message(&mock, &headers, false)).await.unwrap();
        assert_eq!(resp.status(), 200, "{spec}");
        let info = info(&resp);
        assert_eq!(info.attempts, 2, "{spec}");
        assert_eq!(info.retries[0].reason.kind(), *kind, "{spec}");
        assert_eq!(resp.extensions().get::<Attempt>(), Some(&Attempt(2)));
        assert_eq!(*seen.lock().unwrap(), [1, 2], "{spec}");
        assert_eq!(mock.stats().requests - before, 2, "{spec}");
        let body: serde_json::Value = serde_json::from_str(&text(resp).await).unwrap();
        assert_eq!(body["type"], "message", "{spec}");
    }
}

#[tokio::test]
async fn never_retried_fault_classes() {
    let mock = MockServer::start().await.unwrap();
    let cases: &[(&str, Headers, u16, &str)] = &[
        ("400,ok", &[], 400, "invalid_request_error"),
        ("401,ok", &[], 401, "authentication_error"),
        ("403,ok", &[], 403, "permission_error"),
        ("404,ok", &[], 404, "not_found_error"),
        ("413,ok", &[], 413, "request_too_large"),
        ("spendcap,ok", &[], 429, "rate_limit_error"),
        // `x-should-retry: false` overrides the status.
        (
            "529,ok",
            &[("x-mock-should-retry", "false")],
            529,
            "overloaded_error",
        ),
    ];
    for (spec, extra, status, api_type) in cases {
        let (svc, seen) = stack(fast());
        let before = mock.stats().requests;
        let mut headers = vec![("x-mock-fault", *spec)];
        headers.extend_from_slice(extra);
        let resp = svc.oneshot(message(&mock, &headers, false)).await.unwrap();
        assert_eq!(resp.status(), *status, "{spec}");
        assert_eq!(info(&resp).attempts, 1, "{spec}");
        assert_eq!(info(&resp).gave_up, Some(GiveUp::NotRetryable), "{spec}");
        assert_eq!(*seen.lock().unwrap(), [1], "{spec}");
        assert_eq!(mock.stats().requests - before, 1, "{spec}");
        // The caller gets Anthropic's answer as it was sent.
        let body = text(resp).await;
        assert_eq!(error_type(&body), *api_type, "{spec}");
        if *spec == "spendcap,ok" {
            assert!(body.contains("enforced_spend_limit_reached"));
        }
    }
}

/// An inner layer that refuses every request locally, as the rate limiter or the cost
/// budget would, without sending anything.
#[derive(Clone)]
struct Refuse<S> {
    inner: S,
    error: fn() -> Error,
}

impl<S> Service<Request<Bytes>> for Refuse<S>
where
    S: Service<Request<Bytes>, Response = Response<Incoming>>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = Response<Incoming>;
    type Error = BoxError;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Response<Incoming>, BoxError>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, _req: Request<Bytes>) -> Self::Future {
        let error = (self.error)();
        Box::pin(async move { Err(error.into()) })
    }
}

#[tokio::test]
async fn local_refusals_are_not_retried() {
    let mock = MockServer::start().await.unwrap();
    let refusals: [fn() -> Error; 2] = [
        || Error::rate_limited_locally(Duration::from_secs(2), "local rate limit: rpm reached"),
        || Error::budget_exceeded("budget: daily limit reached"),
    ];
    for error in refusals {
        let layer = tower::layer::layer_fn(move |inner| Refuse { inner, error });
        let (svc, seen) = stack_with(RetryLayer::new(fast()), layer);
        let err = svc
            .oneshot(message(&mock, &[("x-mock-fault", "ok")], false))
            .await
            .unwrap_err();
        let err = err.downcast_ref::<Error>().unwrap();
        assert_eq!(err.kind(), error().kind());
        assert_eq!(err.message(), error().message());
        assert_eq!(*seen.lock().unwrap(), [1]);
    }
    assert_eq!(mock.stats().requests, 0);
}

#[tokio::test]
async fn failures_that_persist_end_after_max_retries() {
    let mock = MockServer::start().await.unwrap();

    // An error status: the last response, intact.
    let (svc, seen) = stack(fast());
    let resp = svc
        .oneshot(message(&mock, &[("x-mock-fault", "500")], false))
        .await
        .unwrap();
    assert_eq!(resp.status(), 500);
    assert_eq!(info(&resp).attempts, 3);
    assert_eq!(info(&resp).gave_up, Some(GiveUp::MaxRetries));
    assert_eq!(*seen.lock().unwrap(), [1, 2, 3]);
    assert_eq!(error_type(&text(resp).await), "api_error");
    assert_eq!(mock.stats().requests, 3);

    // Connection reset every time: a classified error naming the attempts.
    let (svc, seen) = stack(fast());
    let err = svc
        .oneshot(message(&mock, &[("x-mock-fault", "reset")], false))
        .await
        .unwrap_err();
    let err = Error::from_box(err);
    assert_eq!(err.kind(), ErrorKind::Connection, "{err}");
    assert_eq!(err.origin(), Origin::Transport);
    assert!(err.message().contains("3 attempts"), "{err}");
    assert_eq!(*seen.lock().unwrap(), [1, 2, 3]);
    assert_eq!(mock.stats().requests, 6);
    assert_eq!(mock.stats().by_status.get("reset"), Some(&3));
}

#[tokio::test]
async fn connection_refused_is_retried() {
    // A port with nothing listening.
    let addr = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let (svc, seen) = stack(fast());
    let req = Request::post(format!("http://{addr}/v1/messages"))
        .body(Bytes::from_static(b"{}"))
        .unwrap();
    let err = Error::from_box(svc.oneshot(req).await.unwrap_err());
    assert_eq!(err.kind(), ErrorKind::Connection, "{err}");
    assert!(err.message().contains("3 attempts"), "{err}");
    assert_eq!(*seen.lock().unwrap(), [1, 2, 3]);
}

#[tokio::test]
async fn attempt_timeouts_are_retried() {
    let mock = MockServer::start().await.unwrap();
    // A per-attempt timeout inside the retry layer, and an upstream far slower than it.
    let timeout = tower::timeout::TimeoutLayer::new(Duration::from_millis(100));
    let (svc, seen) = stack_with(RetryLayer::new(fast()), timeout);
    let err = svc
        .oneshot(message(&mock, &[("x-mock-latency-ms", "10000")], false))
        .await
        .unwrap_err();
    let err = Error::from_box(err);
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
    assert_eq!(err.origin(), Origin::Transport);
    assert!(err.message().contains("3 attempts"), "{err}");
    assert_eq!(*seen.lock().unwrap(), [1, 2, 3]);
}

#[tokio::test]
async fn server_waits_are_honoured() {
    let mock = MockServer::start().await.unwrap();
    let cases: &[(&str, Headers, Duration)] = &[
        (
            "429,ok",
            &[("x-mock-retry-after-ms", "30")],
            Duration::from_millis(30),
        ),
        (
            "529,ok",
            &[("x-mock-retry-after", "1")],
            Duration::from_secs(1),
        ),
        // retry-after-ms wins over retry-after.
        (
            "503,ok",
            &[("x-mock-retry-after", "5"), ("x-mock-retry-after-ms", "20")],
            Duration::from_millis(20),
        ),
    ];
    for (spec, extra, wait) in cases {
        let (svc, _) = stack(fast());
        let mut headers = vec![("x-mock-fault", *spec)];
        headers.extend_from_slice(extra);
        let resp = svc.oneshot(message(&mock, &headers, false)).await.unwrap();
        assert_eq!(resp.status(), 200, "{spec}");
        let info = info(&resp);
        assert_eq!(info.retries.len(), 1, "{spec}");
        assert_eq!(info.retries[0].wait, *wait, "{spec}");
        assert_eq!(info.retries[0].source, WaitSource::Server, "{spec}");
    }
}

#[tokio::test]
async fn the_cap_and_the_deadline_are_respected() {
    let mock = MockServer::start().await.unwrap();

    // Over max_retry_after (60 s), in seconds and as an HTTP date: returned at once.
    let in_an_hour = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(3600));
    for retry_after in ["120", in_an_hour.as_str()] {
        let (svc, seen) = stack(fast());
        let headers = [
            ("x-mock-fault", "429,ok"),
            ("x-mock-retry-after", retry_after),
        ];
        let resp = svc.oneshot(message(&mock, &headers, false)).await.unwrap();
        assert_eq!(resp.status(), 429);
        match info(&resp).gave_up {
            Some(GiveUp::RetryAfterTooLong(d)) => {
                assert!(d >= Duration::from_secs(120), "{d:?}");
            }
            other => panic!("{retry_after}: {other:?}"),
        }
        assert_eq!(*seen.lock().unwrap(), [1]);
        assert_eq!(error_type(&text(resp).await), "rate_limit_error");
    }

    // A server wait that would pass the deadline: returned at once.
    let (svc, seen) = stack(RetryConfig {
        deadline: Duration::from_secs(3),
        ..fast()
    });
    let headers = [("x-mock-fault", "529,ok"), ("x-mock-retry-after", "5")];
    let resp = svc.oneshot(message(&mock, &headers, false)).await.unwrap();
    assert_eq!(resp.status(), 529);
    assert_eq!(
        info(&resp).gave_up,
        Some(GiveUp::WaitPastDeadline(Duration::from_secs(5)))
    );
    assert_eq!(*seen.lock().unwrap(), [1]);

    // The deadline bounds the attempt in flight (config, then a per-request override).
    let (svc, _) = stack(RetryConfig {
        deadline: Duration::from_millis(300),
        ..fast()
    });
    let slow = [("x-mock-latency-ms", "10000")];
    let err = Error::from_box(svc.oneshot(message(&mock, &slow, false)).await.unwrap_err());
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
    assert_eq!(err.origin(), Origin::Local);

    let (svc, seen) = stack(fast());
    let mut req = message(&mock, &slow, false);
    req.extensions_mut()
        .insert(Deadline::after(Duration::from_millis(300)));
    let err = Error::from_box(svc.oneshot(req).await.unwrap_err());
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
    assert_eq!(*seen.lock().unwrap(), [1]);
}

#[tokio::test]
async fn a_first_event_error_is_retried() {
    let mock = MockServer::start().await.unwrap();
    let (svc, seen) = stack(fast());
    // `stream_error` with no `x-mock-stream-error-after`: the error is the first event.
    let resp = svc
        .oneshot(message(&mock, &[("x-mock-fault", "stream_error,ok")], true))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        info(&resp).retries[0].reason,
        RetryReason::StreamError {
            kind: ErrorKind::Overloaded
        }
    );
    assert_eq!(*seen.lock().unwrap(), [1, 2]);
    assert_eq!(mock.stats().requests, 2);
    let body = text(resp).await;
    assert!(body.starts_with("event: message_start"), "{body}");
    assert!(body.contains("event: message_stop"), "{body}");
    assert!(!body.contains("event: error"), "{body}");

    // api_error is retried too.
    let (svc, seen) = stack(fast());
    let headers = [
        ("x-mock-fault", "stream_error,ok"),
        ("x-mock-stream-error-type", "api_error"),
    ];
    let resp = svc.oneshot(message(&mock, &headers, true)).await.unwrap();
    assert_eq!(info(&resp).attempts, 2);
    assert_eq!(*seen.lock().unwrap(), [1, 2]);
    assert!(text(resp).await.contains("event: message_stop"));
}

#[tokio::test]
async fn an_error_after_the_first_event_is_not_retried() {
    let mock = MockServer::start().await.unwrap();
    let (svc, seen) = stack(fast());
    let headers = [
        ("x-mock-fault", "stream_error,ok"),
        ("x-mock-stream-error-after", "1"),
    ];
    let resp = svc.oneshot(message(&mock, &headers, true)).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(info(&resp).attempts, 1);
    assert_eq!(info(&resp).gave_up, None);
    let body = text(resp).await;
    assert!(body.starts_with("event: message_start"), "{body}");
    assert!(body.contains("event: error"), "{body}");
    assert!(body.contains("overloaded_error"), "{body}");
    assert!(!body.contains("event: message_stop"), "{body}");
    assert_eq!(*seen.lock().unwrap(), [1]);
    assert_eq!(mock.stats().requests, 1);
}

#[test]
fn the_budget_bounds_attempts_under_total_failure() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    // retries ≤ 0.2 × requests + 1/s × 20 s. With 50 requests in a row that all fail:
    // 0.2 × 50 + 20 = 30 retries, 80 attempts exactly (the window is far longer than the
    // test). The first 7 requests take their 3 retries (21 ≤ 20 + 0.2 × 7); after that
    // every request that fails gets a retry only as 0.2 × requests grows, and is refused
    // once: 43 refusals.
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    metrics::with_local_recorder(&recorder, || {
        rt.block_on(async {
            let mock = MockServer::start().await.unwrap();
            let (svc, seen) = stack(RetryConfig {
                max_retries: 3,
                budget: BudgetConfig {
                    window: Duration::from_secs(20),
                    retry_ratio: 0.2,
                    min_per_sec: 1,
                },
                ..fast()
            });
            let headers = [("x-mock-fault", "500"), ("x-mock-retry-after-ms", "1")];
            let mut budget_refusals = 0;
            for _ in 0..50 {
                let resp = svc
                    .clone()
                    .oneshot(message(&mock, &headers, false))
                    .await
                    .unwrap();
                assert_eq!(resp.status(), 500);
                if info(&resp).gave_up == Some(GiveUp::BudgetExhausted) {
                    budget_refusals += 1;
                }
            }
            assert_eq!(mock.stats().requests, 80);
            assert_eq!(seen.lock().unwrap().len(), 80);
            assert_eq!(budget_refusals, 43);
        });
    });
    let mut retries = 0;
    let mut exhausted = 0;
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        if let DebugValue::Counter(n) = value {
            match key.key().name() {
                "claude_retry_attempts_total" => retries += n,
                "claude_retry_budget_exhausted_total" => exhausted += n,
                _ => {}
            }
        }
    }
    assert_eq!(retries, 30);
    assert_eq!(exhausted, 43);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_budget_bounds_attempts_under_concurrent_total_failure() {
    let mock = MockServer::start().await.unwrap();
    let (svc, seen) = stack(RetryConfig {
        max_retries: 3,
        budget: BudgetConfig {
            window: Duration::from_secs(30),
            retry_ratio: 0.25,
            min_per_sec: 1,
        },
        ..fast()
    });
    let headers = [("x-mock-fault", "529"), ("x-mock-retry-after-ms", "1")];
    let tasks: Vec<_> = (0..200)
        .map(|_| tokio::spawn(svc.clone().oneshot(message(&mock, &headers, false))))
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap().status(), 529);
    }
    // Without a budget: 200 × 4 = 800 attempts. With it: at most 200 + 0.25 × 200 + 30.
    let attempts = mock.stats().requests;
    assert!(attempts <= 280, "{attempts}");
    assert!(attempts > 200, "the floor allows some retries: {attempts}");
    assert_eq!(seen.lock().unwrap().len() as u64, attempts);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_requests_none_lost() {
    let mock = MockServer::start().await.unwrap();
    let (svc, _) = stack(RetryConfig {
        budget: BudgetConfig {
            retry_ratio: 1.0,
            ..BudgetConfig::default()
        },
        ..fast()
    });
    // A third of the first attempts fail: 429, 529, 500, connection reset.
    let specs = ["429,ok", "529,ok", "500,ok", "reset,ok"];
    let tasks: Vec<_> = (0..1000)
        .map(|i| {
            let mut headers = vec![("x-mock-retry-after-ms", "1")];
            if let Some(spec) = specs.get(i % 12) {
                headers.push(("x-mock-fault", spec));
            }
            let req = message(&mock, &headers, i % 2 == 0);
            let svc = svc.clone();
            tokio::spawn(async move {
                match svc.oneshot(req).await {
                    Ok(resp) => {
                        let status = resp.status().as_u16();
                        let attempts = info(&resp).attempts;
                        // Read the whole body: a stream must arrive complete.
                        let body = text(resp).await;
                        Ok((status, attempts, body.len()))
                    }
                    Err(e) => Err(Error::from_box(e).kind()),
                }
            })
        })
        .collect();
    let mut ok = 0;
    let mut attempts = 0;
    let mut other = Vec::new();
    for t in tasks {
        // A panic or a lost task fails here; every request ends in exactly one outcome.
        match t.await.unwrap() {
            Ok((200, n, len)) if len > 0 => {
                ok += 1;
                attempts += u64::from(n);
            }
            outcome => other.push(outcome),
        }
    }
    assert!(other.is_empty(), "{other:?}");
    assert_eq!(ok, 1000);
    // 84 requests of each failing kind (i % 12 in 0..4), each retried once.
    let stats = mock.stats();
    assert_eq!(attempts, 1336);
    assert_eq!(stats.requests, 1336);
    assert_eq!(stats.by_status.get("200"), Some(&1000));
    for status in ["429", "529", "500", "reset"] {
        assert_eq!(stats.by_status.get(status), Some(&84), "{status}");
    }
}
