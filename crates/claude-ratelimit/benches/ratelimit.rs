//! The cost of `RateLimit`, against the bare service in the same run.
//!
//! - `bare` / `uncontended`: one request at a time through a service that answers at once
//!   with a 200 JSON message, without and with the layer (limits far above the load). The
//!   difference is the layer's whole cost: parsing the request meta (done once per request
//!   for the whole stack), the key lookup, admission under the key's lock, the usage scan
//!   of the response body and the settlement.
//! - `1000_waiting_tasks`: 1,000 tasks call at once through a layer that admits 16 at a
//!   time (a concurrency limit, so the pace is set by the layer's hand-offs, not by a
//!   refill clock): 984 of them queue, and each settlement wakes the next head. Reported as
//!   requests per second.
//!
//! `cargo bench -p claude-ratelimit --bench ratelimit`
#![allow(clippy::unwrap_used)]

use std::convert::Infallible;
use std::future::Ready;
use std::hint::black_box;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use claude_ratelimit::RateLimitLayer;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use http_body_util::{BodyExt, Full};
use tower::{Layer, Service, ServiceExt};

const BODY: &[u8] = br#"{"model":"claude-sonnet-4-5","max_tokens":1024,"messages":[{"role":"user","content":"Summarise the attached design document in three bullet points, then list open questions."}]}"#;
const ANSWER: &[u8] = br#"{"id":"msg_1","type":"message","role":"assistant","model":"claude-sonnet-4-5","content":[{"type":"text","text":"Done."}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":40,"output_tokens":12}}"#;

fn request() -> http::Request<Bytes> {
    http::Request::post("http://127.0.0.1:8788/v1/messages")
        .header("anthropic-version", "2023-06-01")
        .header("content-type", "application/json")
        .body(Bytes::from_static(BODY))
        .unwrap()
}

#[derive(Clone)]
struct Upstream;

impl Service<http::Request<Bytes>> for Upstream {
    type Response = http::Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Request<Bytes>) -> Self::Future {
        let resp = http::Response::builder()
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(ANSWER)))
            .unwrap();
        std::future::ready(Ok(resp))
    }
}

/// Answers after yielding once, so that concurrent callers interleave and queue.
#[derive(Clone)]
struct Yielding;

impl Service<http::Request<Bytes>> for Yielding {
    type Response = http::Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Infallible>> + Send>,
    >;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Bytes>) -> Self::Future {
        let answer = Upstream.call(req);
        Box::pin(async move {
            tokio::task::yield_now().await;
            answer.await
        })
    }
}

fn generous() -> RateLimitLayer {
    RateLimitLayer::new()
        .requests_per_minute(1_000_000_000)
        .input_tokens_per_minute(1_000_000_000_000)
        .output_tokens_per_minute(1_000_000_000_000)
}

fn ratelimit(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("ratelimit");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));

    group.bench_function("bare", |b| {
        let svc = Upstream;
        b.to_async(&rt).iter(|| async {
            let resp = svc.clone().oneshot(request()).await.unwrap();
            black_box(resp.into_body().collect().await.unwrap());
        });
    });

    let uncontended = generous().max_concurrent_requests(1_000);
    group.bench_function("uncontended", |b| {
        let svc = uncontended.layer(Upstream);
        b.to_async(&rt).iter(|| async {
            let resp = svc.clone().oneshot(request()).await.unwrap();
            black_box(resp.into_body().collect().await.unwrap());
        });
    });

    group.throughput(Throughput::Elements(1000));
    let queued = generous().max_concurrent_requests(16).max_queue(2_000);
    group.bench_function("1000_waiting_tasks", |b| {
        let svc = queued.layer(Yielding);
        b.to_async(&rt).iter(|| async {
            let tasks: Vec<_> = (0..1000)
                .map(|_| {
                    let svc = svc.clone();
                    tokio::spawn(async move {
                        let resp = svc.oneshot(request()).await.unwrap();
                        resp.into_body().collect().await.unwrap();
                    })
                })
                .collect();
            for t in tasks {
                t.await.unwrap();
            }
        });
    });
    group.finish();
}

criterion_group!(benches, ratelimit);
criterion_main!(benches);
