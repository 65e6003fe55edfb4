//! The added cost of shared rate limits per request: a request through the limiter with
//! local buckets against the same with the grant script in Redis on the request's path (the
//! settle script runs on a task of its own), in the same run, against a `redis-server` the
//! bench starts on a free loopback port. Limits are high enough never to wait.
#![allow(missing_docs, clippy::unwrap_used)]

use std::convert::Infallible;
use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use claude_mock::redis_server::RedisServer;
use claude_ratelimit::{RateLimitLayer, RedisLimits};
use criterion::Criterion;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tower::{Layer, ServiceExt};

const ANSWER: &str =
    r#"{"type":"message","content":[],"usage":{"input_tokens":9,"output_tokens":4}}"#;
const BODY: &str =
    r#"{"model":"claude-sonnet-4-5","max_tokens":64,"messages":[{"role":"user","content":"hi"}]}"#;

fn bench(c: &mut Criterion, redis: &RedisServer) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let upstream = tower::service_fn(|_req: Request<Bytes>| async {
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
            ANSWER.as_bytes(),
        ))))
    });
    let limits = RateLimitLayer::new()
        .requests_per_minute(1_000_000_000)
        .input_tokens_per_minute(1_000_000_000)
        .output_tokens_per_minute(1_000_000_000);
    let local = limits.clone().layer(upstream);
    let shared = limits
        .redis(
            RedisLimits::open(&redis.url())
                .unwrap()
                .timeout(Duration::from_secs(1)),
        )
        .layer(upstream);
    let request = || {
        Request::post("https://api.anthropic.com/v1/messages")
            .body(Bytes::from_static(BODY.as_bytes()))
            .unwrap()
    };
    let mut g = c.benchmark_group("redis_rate_limit");
    g.warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    g.bench_function("local_only", |b| {
        b.to_async(&rt).iter(|| async {
            let resp = local.clone().oneshot(request()).await.unwrap();
            black_box(resp.into_body().collect().await.unwrap());
        });
    });
    g.bench_function("with_redis", |b| {
        b.to_async(&rt).iter(|| async {
            let resp = shared.clone().oneshot(request()).await.unwrap();
            black_box(resp.into_body().collect().await.unwrap());
        });
    });
    g.finish();
}

fn main() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let mut c = Criterion::default().configure_from_args();
    bench(&mut c, &redis);
    c.final_summary();
}
