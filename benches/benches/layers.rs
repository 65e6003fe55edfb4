//! What each layer costs per request, and what the whole stack costs, against the bare
//! service in the same run.
//!
//! The upstream is an in-process `tower::service_fn` that answers at once, so every figure
//! is the middleware's own work: a realistic Messages answer as JSON (one frame) and as an
//! SSE stream of 20 frames (`message_start`, `content_block_start`, `ping`, 14 text deltas,
//! `content_block_stop`, `message_delta`, `message_stop`). Each iteration builds the
//! request, calls the service and collects the whole response body, because several layers
//! do their work as the body passes and ends (usage scan, cost record, limiter settlement).
//!
//! Rows, for each shape:
//! - `bare`: the upstream alone;
//! - `retry`: `RetryLayer` with the defaults (2 retries, budget, peek of the first SSE event);
//! - `rate_limit`: `RateLimitLayer` with RPM/ITPM/OTPM and concurrency far above the load;
//! - `cost`: `CostLayer` with a global monthly budget (so the reservation path runs);
//! - `api_key`: `ApiKeyLayer` over a `KeyRing` of a `StaticSource`, key loaded;
//! - `cache_miss`: `CacheLayer` (defaults: 256 MiB, 1 h) with a distinct request every
//!   iteration: the key, the single-flight map, the tee of the frames and the hand-over to
//!   the cache's store thread, which inserts into moka on the other core (the cache fills
//!   and then evicts as the run goes on);
//! - `cache_miss_inline`: the same with `store_thread = false`: the moka insert and moka's
//!   maintenance run on the request's thread, as they did before the store thread;
//! - `cache_hit`: the same request every iteration, answered from the cache;
//! - `stack`: `ClaudeStack::service(upstream)` from a TOML config with every layer on
//!   (cost with a budget, cache, retry, per-attempt timeout, rate limit, API key), distinct
//!   requests, so the cache's miss path;
//! - `stack_hit`: the same stack, the same request every iteration (a cache hit: cost
//!   records the saving, nothing below the cache runs);
//! - `stack_prometheus` (last): `stack` with the Prometheus recorder installed, as in
//!   claude-gateway, so the layers' metrics are really recorded (the rows before it run with
//!   no recorder, where the `metrics` macros do nothing).
//!
//! Every row except the two hit rows sends a distinct request body each iteration (the
//! bare row too: the formatting of the body is in every row alike).
//!
//! Group `cache_key`: throughput of `CacheKey::for_request` (canonical JSON + BLAKE3) on the
//! 1.5 KB request and on a 100 KB one. The usage scanner's throughput is in the `core`
//! bench.
//!
//! After the runs the bench prints a markdown table of the added cost per request (the
//! layer's mean minus `bare`'s mean, from criterion's own estimates of this run).
//!
//! `cargo bench -p claude-benches --bench layers`
#![allow(missing_docs)]

use std::cell::Cell;
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use claude_benches::{api_keys, stack_config, upstream};
use claude_cache::key::CacheKey;
use claude_cache::{CacheConfig, CacheLayer};
use claude_core::BoxError;
use claude_cost::{Budget, BudgetConfig, CostConfig, CostTracker, Usd};
use claude_ratelimit::RateLimitLayer;
use claude_retry::{RetryConfig, RetryLayer};
use claude_stack::ClaudeStack;
use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, Throughput, criterion_group};
use http::{HeaderValue, Request, Response};
use http_body::Body;
use http_body_util::BodyExt;
use tokio::runtime::Runtime;
use tower::{Layer, Service, ServiceExt};

/// The shapes benched, as criterion group names.
const GROUPS: [&str; 2] = ["layers_json", "layers_sse"];
/// The rows of each group, in order.
const ROWS: [&str; 11] = [
    "bare",
    "retry",
    "rate_limit",
    "cost",
    "api_key",
    "cache_miss",
    "cache_miss_inline",
    "cache_hit",
    "stack",
    "stack_hit",
    "stack_prometheus",
];

/// Request bodies of about 1.5 KB (a system prompt, three turns, sampling settings), made
/// distinct by a counter, or all the same.
struct Bodies {
    head: Bytes,
    tail: Bytes,
    next: Cell<u64>,
    distinct: bool,
}

impl Bodies {
    fn new(stream: bool, distinct: bool) -> Self {
        let turn = "Here is the quarterly report of the platform team. Summarise the incidents, \
                    the latency figures and the open risks, then propose three next steps.";
        Self {
            head: Bytes::from(format!(
                r#"{{"model":"claude-sonnet-4-5","max_tokens":1024,"stream":{stream},"temperature":0.2,"system":"You are a careful assistant for an engineering organisation. Answer briefly and cite the section you rely on.","metadata":{{"user_id":"bench-user-1"}},"messages":[{{"role":"user","content":"{turn} {turn}"}},{{"role":"assistant","content":"I can do that. Which quarter do you mean, and should I include the incident timelines?"}},{{"role":"user","content":"Q3, with the timelines (request "#
            )),
            tail: Bytes::from(format!(r#"). {turn} {turn} {turn}"}}]}}"#)),
            next: Cell::new(0),
            distinct,
        }
    }

    fn request(&self) -> Request<Bytes> {
        let n = self.next.get();
        if self.distinct {
            self.next.set(n + 1);
        }
        // One small allocation, the same in every row.
        let id = n.to_string();
        let mut b = BytesMut::with_capacity(self.head.len() + id.len() + self.tail.len());
        b.extend_from_slice(&self.head);
        b.extend_from_slice(id.as_bytes());
        b.extend_from_slice(&self.tail);
        let mut req = Request::new(b.freeze());
        *req.method_mut() = http::Method::POST;
        *req.uri_mut() = http::Uri::from_static("/v1/messages");
        let h = req.headers_mut();
        h.insert("anthropic-version", HeaderValue::from_static("2023-06-01"));
        h.insert("content-type", HeaderValue::from_static("application/json"));
        h.insert("x-api-key", HeaderValue::from_static("sk-ant-caller"));
        req
    }
}

const JSON_ANSWER: &str = r#"{"id":"msg_01XFDUDYJgAACzvnptvVoYEL","type":"message","role":"assistant","model":"claude-sonnet-4-5-20250929","content":[{"type":"text","text":"Q3 had two incidents: a 40-minute partial outage of the ingestion path (section 2.1) and a slow rollback of the scheduler (section 2.3). p99 latency rose from 180 ms to 240 ms in August and recovered in September. Open risks: the single Redis primary and the untested failover runbook. Next steps: add a replica, rehearse the failover, and set an SLO alert on ingestion lag."}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":412,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":96,"service_tier":"standard"}}"#;

/// The 20 frames of a streamed answer, one event per frame as the API sends them.
fn sse_frames() -> Arc<[Bytes]> {
    let mut frames = vec![
        Bytes::from_static(b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_01XFDUDYJgAACzvnptvVoYEL\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"claude-sonnet-4-5-20250929\",\"content\":[],\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{\"input_tokens\":412,\"cache_creation_input_tokens\":0,\"cache_read_input_tokens\":0,\"output_tokens\":1,\"service_tier\":\"standard\"}}}\n\n"),
        Bytes::from_static(b"event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n"),
        Bytes::from_static(b"event: ping\ndata: {\"type\": \"ping\"}\n\n"),
    ];
    for word in [
        "Q3 had",
        " two incidents:",
        " a 40-minute",
        " partial outage",
        " of the",
        " ingestion path",
        " (section 2.1)",
        " and a",
        " slow rollback",
        " of the",
        " scheduler",
        " (section 2.3).",
        " Next steps",
        " follow.",
    ] {
        frames.push(Bytes::from(format!(
            "event: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"index\":0,\"delta\":{{\"type\":\"text_delta\",\"text\":\"{word}\"}}}}\n\n"
        )));
    }
    frames.push(Bytes::from_static(
        b"event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
    ));
    frames.push(Bytes::from_static(b"event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":28}}\n\n"));
    frames.push(Bytes::from_static(
        b"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
    ));
    frames.into()
}

fn budgeted_tracker() -> CostTracker {
    let config = CostConfig {
        budgets: BudgetConfig::new()
            .global(Budget::new().monthly(Usd::from_dollars(1_000_000_000))),
        ..CostConfig::default()
    };
    CostTracker::from_config(&config).unwrap_or_else(|e| panic!("cost config: {e}"))
}

fn generous_limits() -> RateLimitLayer {
    RateLimitLayer::new()
        .requests_per_minute(1_000_000_000)
        .input_tokens_per_minute(1_000_000_000_000)
        .output_tokens_per_minute(1_000_000_000_000)
        .max_concurrent_requests(1_000_000)
}

/// One shape's fixtures.
struct Shape {
    group: &'static str,
    frames: Arc<[Bytes]>,
    content_type: &'static str,
    stream: bool,
}

impl Shape {
    fn all() -> [Self; 2] {
        [
            Self {
                group: GROUPS[0],
                frames: vec![Bytes::from_static(JSON_ANSWER.as_bytes())].into(),
                content_type: "application/json",
                stream: false,
            },
            Self {
                group: GROUPS[1],
                frames: sse_frames(),
                content_type: "text/event-stream",
                stream: true,
            },
        ]
    }

    fn total(&self) -> usize {
        self.frames.iter().map(Bytes::len).sum()
    }
}

/// Benches one service: a request built, called, and its whole body collected. Checks
/// first that the service answers 200 with the whole body (and, for the cache rows, the
/// expected `x-claude-cache`), so a path that fails fast is never measured.
fn bench_service<S, B>(
    g: &mut BenchmarkGroup<'_, WallTime>,
    rt: &Runtime,
    name: &str,
    svc: &S,
    bodies: &Bodies,
    expect_bytes: usize,
    expect_cache: Option<&str>,
) where
    S: Service<Request<Bytes>, Response = Response<B>> + Clone,
    S::Error: Into<BoxError>,
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    // Twice: a hit row's first call is the miss that stores the answer.
    for _ in 0..2 {
        let check = rt.block_on(async {
            let resp = svc
                .clone()
                .oneshot(bodies.request())
                .await
                .map_err(Into::into)?;
            let status = resp.status();
            let cache = resp
                .headers()
                .get("x-claude-cache")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let got = resp
                .into_body()
                .collect()
                .await
                .map_err(Into::into)?
                .to_bytes();
            // Let the cache's store task run.
            tokio::task::yield_now().await;
            Ok::<_, BoxError>((status, got.len(), cache))
        });
        match check {
            Ok((status, len, _)) if status != 200 || len != expect_bytes => {
                panic!("{name}: status {status}, {len} body bytes, expected 200 and {expect_bytes}")
            }
            Ok(_) => {}
            Err(e) => panic!("{name}: {e}"),
        }
    }
    if let Some(want) = expect_cache {
        let got = rt.block_on(async {
            let resp = svc.clone().oneshot(bodies.request()).await.ok()?;
            let v = resp
                .headers()
                .get("x-claude-cache")?
                .to_str()
                .ok()?
                .to_owned();
            let _ = resp.into_body().collect().await;
            Some(v)
        });
        assert_eq!(got.as_deref(), Some(want), "{name}: x-claude-cache");
    }
    g.bench_function(name, |b| {
        b.iter(|| {
            rt.block_on(async {
                let Ok(resp) = svc.clone().oneshot(bodies.request()).await else {
                    panic!("{name}: the service failed")
                };
                black_box(resp.into_body().collect().await.is_ok())
            })
        });
    });
}

fn layers(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap_or_else(|e| panic!("runtime: {e}"));
    let config = stack_config(true);
    let keys = api_keys(&rt);
    for shape in Shape::all() {
        let distinct = Bodies::new(shape.stream, true);
        let same = Bodies::new(shape.stream, false);
        let total = shape.total();
        let up = upstream(shape.frames.clone(), shape.content_type);
        let mut g = c.benchmark_group(shape.group);
        g.warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_millis(2500));
        let d = &distinct;
        bench_service(&mut g, &rt, "bare", &up, d, total, None);
        let retry = RetryLayer::new(RetryConfig::default()).layer(up.clone());
        bench_service(&mut g, &rt, "retry", &retry, d, total, None);
        let limited = generous_limits().layer(up.clone());
        bench_service(&mut g, &rt, "rate_limit", &limited, d, total, None);
        let cost = budgeted_tracker().layer().layer(up.clone());
        bench_service(&mut g, &rt, "cost", &cost, d, total, None);
        let keyed = keys.clone().layer(up.clone());
        bench_service(&mut g, &rt, "api_key", &keyed, d, total, None);
        let cache = CacheLayer::new(CacheConfig::default()).layer(up.clone());
        bench_service(&mut g, &rt, "cache_miss", &cache, d, total, Some("MISS"));
        let inline = CacheLayer::new(CacheConfig::default()).store_thread(false);
        let cache = inline.layer(up.clone());
        bench_service(
            &mut g,
            &rt,
            "cache_miss_inline",
            &cache,
            d,
            total,
            Some("MISS"),
        );
        let cache = CacheLayer::new(CacheConfig::default()).layer(up.clone());
        bench_service(&mut g, &rt, "cache_hit", &cache, &same, total, Some("HIT"));
        let stack = || {
            rt.block_on(async {
                ClaudeStack::new(config.clone())
                    .unwrap_or_else(|e| panic!("stack: {e}"))
                    .with_api_keys(keys.clone())
                    .service(up.clone())
            })
        };
        bench_service(&mut g, &rt, "stack", &stack(), d, total, Some("MISS"));
        bench_service(
            &mut g,
            &rt,
            "stack_hit",
            &stack(),
            &same,
            total,
            Some("HIT"),
        );
        g.finish();
    }
}

/// The full stack again with the Prometheus recorder installed (process-wide, so it runs
/// last).
fn stack_with_metrics(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap_or_else(|e| panic!("runtime: {e}"));
    if let Err(e) = metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder() {
        eprintln!("layers: no Prometheus recorder ({e}); stack_prometheus skipped");
        return;
    }
    let config = stack_config(true);
    let keys = api_keys(&rt);
    for shape in Shape::all() {
        let distinct = Bodies::new(shape.stream, true);
        let up = upstream(shape.frames.clone(), shape.content_type);
        let mut g = c.benchmark_group(shape.group);
        g.warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_millis(2500));
        let stack = rt.block_on(async {
            ClaudeStack::new(config.clone())
                .unwrap_or_else(|e| panic!("stack: {e}"))
                .with_api_keys(keys.clone())
                .service(up)
        });
        let total = shape.total();
        let name = "stack_prometheus";
        bench_service(&mut g, &rt, name, &stack, &distinct, total, Some("MISS"));
        g.finish();
    }
}

/// Throughput of the cache key (canonical JSON + BLAKE3) on the 1.5 KB request and on a
/// 100 KB one.
fn cache_key(c: &mut Criterion) {
    let small = Bodies::new(true, false).request();
    let turn = r#"{"role":"user","content":[{"type":"text","text":"Turn: please summarise the section of the document. \"Quoted\" text, tabs\tand unicode: caf\u00e9 lorem ipsum dolor sit amet lorem ipsum dolor sit amet lorem ipsum dolor sit amet","cache_control":{"type":"ephemeral"}}]}"#;
    let mut big = String::from(
        r#"{"model":"claude-sonnet-4-5","max_tokens":1024,"stream":true,"system":"You are a helpful assistant.","metadata":{"user_id":"u-1"},"messages":["#,
    );
    while big.len() < 100 * 1000 {
        big.push_str(turn);
        big.push(',');
    }
    big.push_str(turn);
    big.push_str("]}");
    let mut large = Request::new(Bytes::from(big));
    *large.uri_mut() = http::Uri::from_static("/v1/messages");
    *large.method_mut() = http::Method::POST;
    large
        .headers_mut()
        .insert("anthropic-version", HeaderValue::from_static("2023-06-01"));
    let config = CacheConfig::default();
    let mut g = c.benchmark_group("cache_key");
    g.warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2));
    for (name, req) in [("request_1_5KB", &small), ("request_100KB", &large)] {
        assert!(CacheKey::for_request(req, &config).is_ok(), "{name}");
        g.throughput(Throughput::Bytes(req.body().len() as u64));
        g.bench_function(name, |b| {
            b.iter(|| black_box(CacheKey::for_request(black_box(req), &config).is_ok()));
        });
    }
    g.finish();
}

criterion_group!(benches, cache_key, layers, stack_with_metrics);

fn main() {
    let started = SystemTime::now();
    benches();
    Criterion::default().configure_from_args().final_summary();
    print_added_costs(started);
}

/// Where criterion writes its estimates.
fn criterion_dir() -> Option<PathBuf> {
    if let Some(home) = std::env::var_os("CRITERION_HOME") {
        return Some(PathBuf::from(home));
    }
    if let Some(target) = std::env::var_os("CARGO_TARGET_DIR") {
        return Some(PathBuf::from(target).join("criterion"));
    }
    // The bench runs as <target>/<profile>/deps/layers-<hash>.
    let exe = std::env::current_exe().ok()?;
    Some(exe.parent()?.parent()?.parent()?.join("criterion"))
}

/// The mean time per iteration (ns) criterion estimated for `group/row` in this run.
fn mean_ns(dir: &Path, group: &str, row: &str, since: SystemTime) -> Option<f64> {
    let path = dir.join(group).join(row).join("new/estimates.json");
    // Skip estimates left by an earlier run (a row filtered out of this one).
    if std::fs::metadata(&path).and_then(|m| m.modified()).ok()? < since {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
    v["mean"]["point_estimate"].as_f64()
}

/// Prints the added cost of every row over `bare`, from this run's estimates.
fn print_added_costs(since: SystemTime) {
    let Some(dir) = criterion_dir() else { return };
    let mut lines = Vec::new();
    for group in GROUPS {
        let Some(bare) = mean_ns(&dir, group, "bare", since) else {
            continue;
        };
        for row in ROWS {
            let Some(t) = mean_ns(&dir, group, row, since) else {
                continue;
            };
            lines.push(format!(
                "| {} | {row} | {:.2} | {:+.2} | {:.2}x |",
                group.trim_start_matches("layers_").to_uppercase(),
                t / 1000.0,
                (t - bare) / 1000.0,
                t / bare
            ));
        }
    }
    if lines.is_empty() {
        return;
    }
    println!("\nAdded cost per request (criterion means of this run, minus `bare`):\n");
    println!("| shape | service | µs / request | added µs vs bare | ratio |");
    println!("|---|---|---:|---:|---:|");
    for l in lines {
        println!("{l}");
    }
}
