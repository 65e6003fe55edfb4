//! The added cost of the Redis second level per request: a miss through the cache alone
//! against a miss that also asks Redis (`GET`, then `SET` on the store task), in the same
//! run, against a `redis-server` the bench starts on a free loopback port. Each iteration
//! is a new question, so every request misses both levels and reaches the (in-memory)
//! upstream; the difference is the round trip.
#![allow(missing_docs, clippy::unwrap_used)]

use std::convert::Infallible;
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use claude_cache::{CacheLayer, RedisCache};
use claude_mock::redis_server::RedisServer;
use criterion::Criterion;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tower::{Layer, ServiceExt};

const ANSWER: &str = r#"{"type":"message","model":"claude-sonnet-4-5","content":[{"type":"text","text":"hello"}],"usage":{"input_tokens":9,"output_tokens":4}}"#;

fn bench(c: &mut Criterion, redis: &RedisServer) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let upstream = tower::service_fn(|_req: Request<Bytes>| async {
        let mut resp = Response::new(Full::new(Bytes::from_static(ANSWER.as_bytes())));
        resp.headers_mut()
            .insert("content-type", "application/json".parse().unwrap());
        Ok::<_, Infallible>(resp)
    });
    let local = CacheLayer::default().layer(upstream);
    let shared = rt.block_on(async {
        CacheLayer::default()
            .redis(
                RedisCache::open(&redis.url())
                    .unwrap()
                    .timeout(Duration::from_secs(1)),
            )
            .layer(upstream)
    });
    let n = AtomicU64::new(0);
    let request = || {
        let i = n.fetch_add(1, Ordering::Relaxed);
        Request::post("https://api.anthropic.com/v1/messages")
            .header("anthropic-version", "2023-06-01")
            .body(Bytes::from(format!(
                r#"{{"model":"claude-sonnet-4-5","max_tokens":64,"messages":[{{"role":"user","content":"question {i}"}}]}}"#
            )))
            .unwrap()
    };
    let mut g = c.benchmark_group("redis_l2_miss");
    g.warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    g.bench_function("local_only", |b| {
        b.iter(|| {
            rt.block_on(async {
                let resp = local.clone().oneshot(request()).await.unwrap();
                black_box(resp.into_body().collect().await.unwrap());
            });
        });
    });
    g.bench_function("with_redis", |b| {
        b.iter(|| {
            rt.block_on(async {
                let resp = shared.clone().oneshot(request()).await.unwrap();
                black_box(resp.into_body().collect().await.unwrap());
            });
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
