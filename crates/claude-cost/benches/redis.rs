//! The added cost of shared budgets per request: a request through a budgeted `CostLayer`
//! with local budgets against the same with budgets in Redis (the admission script on the
//! request's path, the settle script on a task of its own), in the same run, against a
//! `redis-server` the bench starts on a free loopback port. The upstream is in memory.
#![allow(missing_docs, clippy::unwrap_used)]

use std::convert::Infallible;
use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use claude_cost::{Budget, BudgetConfig, CostLayer, CostTracker, RedisBudgets, Usd};
use claude_mock::redis_server::RedisServer;
use criterion::Criterion;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tower::{Layer, ServiceExt};

const ANSWER: &str = r#"{"type":"message","model":"claude-sonnet-4-5","content":[],"usage":{"input_tokens":9,"output_tokens":4}}"#;
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
    let budgets = BudgetConfig::new()
        .global(Budget::new().daily(Usd::from_dollars(1_000_000)))
        .per_tenant(Budget::new().monthly(Usd::from_dollars(1_000_000)));
    let local =
        CostLayer::new(CostTracker::builder().budgets(budgets.clone()).build()).layer(upstream);
    let shared = CostLayer::new(
        CostTracker::builder()
            .budgets(budgets)
            .redis(
                RedisBudgets::open(&redis.url())
                    .unwrap()
                    .timeout(Duration::from_secs(1)),
            )
            .build(),
    )
    .layer(upstream);
    let request = || {
        Request::post("https://api.anthropic.com/v1/messages")
            .body(Bytes::from_static(BODY.as_bytes()))
            .unwrap()
    };
    let mut g = c.benchmark_group("redis_budget");
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
