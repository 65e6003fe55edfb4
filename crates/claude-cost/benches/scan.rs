//! Throughput of the usage scanner and of the cost layer on a 1 MB SSE stream, against the
//! same body read without the layer (the ratio is the layer's overhead).
//!
//! `cargo bench -p claude-cost --bench scan`

use std::convert::Infallible;
use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use claude_core::{BodyEnd, BodyFormat, UsageScanner};
use claude_cost::{Budget, BudgetConfig, CostLayer, CostTracker, Usd};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use http::{Request, Response};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use tower::{Layer, Service, ServiceExt};

/// A 1 MB answer: `message_start` with cache counts, text deltas, `message_delta`,
/// `message_stop`, one event per frame (as the API sends them).
fn stream() -> Vec<Bytes> {
    let mut frames = vec![Bytes::from_static(
        b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"claude-sonnet-4-5-20250929\",\"content\":[],\"usage\":{\"input_tokens\":2095,\"cache_creation_input_tokens\":1800,\"cache_read_input_tokens\":12000,\"cache_creation\":{\"ephemeral_5m_input_tokens\":800,\"ephemeral_1h_input_tokens\":1000},\"output_tokens\":1}}}\n\n",
    )];
    frames.push(Bytes::from_static(b"event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n"));
    let delta = Bytes::from_static(b"event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\" lorem ipsum dolor sit\"}}\n\n");
    let mut size: usize = frames.iter().map(Bytes::len).sum();
    let mut n = 0u64;
    while size < 1 << 20 {
        frames.push(delta.clone());
        size += delta.len();
        n += 1;
    }
    frames.push(Bytes::from_static(
        b"event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
    ));
    frames.push(Bytes::from(format!(
        "event: message_delta\ndata: {{\"type\":\"message_delta\",\"delta\":{{\"stop_reason\":\"end_turn\"}},\"usage\":{{\"output_tokens\":{n}}}}}\n\n"
    )));
    frames.push(Bytes::from_static(
        b"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
    ));
    frames
}

type Body =
    StreamBody<futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;

fn upstream(
    frames: Vec<Bytes>,
) -> impl Service<Request<Bytes>, Response = Response<Body>, Error = Infallible, Future: Send> + Clone
{
    tower::service_fn(move |_req: Request<Bytes>| {
        let body: Vec<_> = frames.iter().cloned().map(|b| Ok(Frame::data(b))).collect();
        async move {
            let mut r = Response::new(StreamBody::new(futures_util::stream::iter(body)));
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/event-stream"),
            );
            Ok(r)
        }
    })
}

fn request() -> Request<Bytes> {
    Request::post("http://api.test/v1/messages")
        .body(Bytes::from_static(
            br#"{"model":"claude-sonnet-4-5","max_tokens":64000,"stream":true,"messages":[{"role":"user","content":"Hello"}]}"#,
        ))
        .unwrap_or_default()
}

fn bench(c: &mut Criterion) {
    let frames = stream();
    let bytes: usize = frames.iter().map(Bytes::len).sum();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap_or_else(|e| panic!("runtime: {e}"));

    let mut g = c.benchmark_group("sse_1mb");
    g.throughput(Throughput::Bytes(bytes as u64));

    g.bench_function("scanner", |b| {
        b.iter(|| {
            let mut s = UsageScanner::new(BodyFormat::Sse);
            for f in &frames {
                s.feed(f);
            }
            black_box(s.finish(BodyEnd::Ended))
        });
    });

    let bare = upstream(frames.clone());
    g.bench_function("bare_service", |b| {
        b.iter(|| {
            rt.block_on(async {
                let resp = bare
                    .clone()
                    .oneshot(request())
                    .await
                    .unwrap_or_else(|e| match e {});
                black_box(resp.into_body().collect().await.map(|c| c.to_bytes().len()))
            })
        });
    });

    let tracker = CostTracker::new();
    let layered = CostLayer::new(tracker.clone()).layer(upstream(frames.clone()));
    g.bench_function("cost_layer", |b| {
        b.iter(|| {
            rt.block_on(async {
                let resp = layered.clone().oneshot(request()).await;
                match resp {
                    Ok(r) => black_box(
                        r.into_body()
                            .collect()
                            .await
                            .map(|c| c.to_bytes().len())
                            .ok(),
                    ),
                    Err(_) => None,
                }
            })
        });
    });

    let budgeted = CostTracker::builder()
        .budgets(
            BudgetConfig::new().per_tenant(Budget::new().daily(Usd::from_dollars(1_000_000_000))),
        )
        .build();
    let layered = CostLayer::new(budgeted).layer(upstream(frames.clone()));
    g.bench_function("cost_layer_with_budgets", |b| {
        b.iter(|| {
            rt.block_on(async {
                let resp = layered.clone().oneshot(request()).await;
                match resp {
                    Ok(r) => black_box(
                        r.into_body()
                            .collect()
                            .await
                            .map(|c| c.to_bytes().len())
                            .ok(),
                    ),
                    Err(_) => None,
                }
            })
        });
    });
    g.finish();
    // Keep the tracker's figures honest: every iteration was recorded.
    assert!(tracker.total().requests > 0);
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20);
    targets = bench
}
criterion_main!(benches);
