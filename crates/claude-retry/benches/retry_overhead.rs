//! The cost of `Retry` on the success path, against the bare service in the same run.
//!
//! The inner service answers at once with a 200 JSON response, so the figures are the
//! layer's own work: the budget deposit, the request clone kept for retries, the deadline
//! computation, and the `Attempt`/`RetryInfo` response extensions.
//!
//! `cargo bench -p claude-retry --bench retry_overhead`

use std::convert::Infallible;
use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use claude_retry::{RetryConfig, RetryLayer};
use criterion::{Criterion, criterion_group, criterion_main};
use http_body_util::Full;
use tower::{Layer, Service, ServiceExt};

const BODY: &[u8] = br#"{"model":"claude-sonnet-4-5","max_tokens":1024,"messages":[{"role":"user","content":"Summarise the attached design document in three bullet points, then list open questions."}]}"#;

fn request() -> http::Request<Bytes> {
    http::Request::post("http://127.0.0.1:8788/v1/messages")
        .header("x-api-key", "sk-ant-api03-bench")
        .header("anthropic-version", "2023-06-01")
        .header("content-type", "application/json")
        .body(Bytes::from_static(BODY))
        .unwrap_or_default()
}

#[derive(Clone)]
struct Upstream;

impl Service<http::Request<Bytes>> for Upstream {
    type Response = http::Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _req: http::Request<Bytes>) -> Self::Future {
        let mut resp = http::Response::new(Full::new(Bytes::from_static(
            br#"{"type":"message","usage":{"input_tokens":40,"output_tokens":12}}"#,
        )));
        resp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        std::future::ready(Ok(resp))
    }
}

fn success_path(c: &mut Criterion) {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
    else {
        return;
    };
    let req = request();
    let mut group = c.benchmark_group("success_path");
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2));

    group.bench_function("bare", |b| {
        b.to_async(&rt).iter(|| async {
            let resp = Upstream.oneshot(req.clone()).await;
            black_box(resp.is_ok())
        });
    });

    let retry = RetryLayer::new(RetryConfig::default()).layer(Upstream);
    group.bench_function("retry", |b| {
        b.to_async(&rt).iter(|| async {
            let resp = retry.clone().oneshot(req.clone()).await;
            black_box(resp.is_ok())
        });
    });
    group.finish();
}

criterion_group!(benches, success_path);
criterion_main!(benches);
