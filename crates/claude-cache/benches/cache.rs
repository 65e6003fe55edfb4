//! The costs of the cache: the key of a 100 KB request (canonical JSON + BLAKE3, in MB/s),
//! and a hit on a 10 KB answer against the bare service it saves a call to, in the same run.
#![allow(missing_docs, clippy::unwrap_used)]

use std::convert::Infallible;
use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use claude_cache::key::{CacheKey, canonical_json};
use claude_cache::{CacheConfig, CacheLayer, CacheStatus};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tower::{Layer, ServiceExt};

/// A multi-turn conversation of about `target` bytes, keys in SDK order (not sorted), with
/// some escapes, numbers and nesting, as a real request has.
fn request_body(target: usize) -> Vec<u8> {
    let mut messages = Vec::new();
    let mut size = 0;
    let mut i = 0;
    while size < target {
        let text = format!(
            "Turn {i}: please summarise section {i} of the document.\n\"Quoted\" text, tabs\tand \
             unicode: caf\u{e9} \u{2014} {}",
            "lorem ipsum dolor sit amet ".repeat(20)
        );
        size += text.len() + 40;
        let role = if i % 2 == 0 { "user" } else { "assistant" };
        messages.push(serde_json::json!({
            "role": role,
            "content": [{"type": "text", "text": text, "cache_control": {"type": "ephemeral"}}],
        }));
        i += 1;
    }
    let body = serde_json::json!({
        "model": "claude-sonnet-4-5", "max_tokens": 1024, "temperature": 0.7, "stream": true,
        "system": "You are a helpful assistant.",
        "metadata": {"user_id": "user-1234"},
        "messages": messages,
    });
    serde_json::to_vec(&body).unwrap()
}

fn key(c: &mut Criterion) {
    let body = Bytes::from(request_body(100 * 1000));
    let req = Request::post("https://api.anthropic.com/v1/messages")
        .header("anthropic-version", "2023-06-01")
        .header(
            "anthropic-beta",
            "context-1m-2025-08-07,extended-cache-ttl-2025-04-11",
        )
        .body(body.clone())
        .unwrap();
    let config = CacheConfig::default();
    let mut g = c.benchmark_group("key");
    g.warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Bytes(body.len() as u64));
    g.bench_function("canonical_json_100KB", |b| {
        b.iter(|| canonical_json(black_box(&body), &["metadata"]).unwrap());
    });
    g.bench_function("cache_key_100KB", |b| {
        b.iter(|| CacheKey::for_request(black_box(&req), &config).unwrap());
    });
    g.bench_function("blake3_only_100KB", |b| {
        b.iter(|| blake3::hash(black_box(&body)));
    });
    g.finish();
}

fn answer(target: usize) -> Bytes {
    let text = "lorem ipsum dolor sit amet ".repeat(target / 27);
    Bytes::from(
        serde_json::to_vec(&serde_json::json!({
            "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
            "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
            "usage": {"input_tokens": 12, "output_tokens": 2000}
        }))
        .unwrap(),
    )
}

fn hit(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let answer = answer(10 * 1000);
    let bare = tower::service_fn(move |_: Request<Bytes>| {
        let mut resp = Response::new(Full::new(answer.clone()));
        resp.headers_mut()
            .insert("content-type", "application/json".parse().unwrap());
        async move { Ok::<_, Infallible>(resp) }
    });
    let cached = CacheLayer::default().layer(bare.clone());
    let request = || {
        Request::post("https://api.anthropic.com/v1/messages")
            .header("anthropic-version", "2023-06-01")
            .body(Bytes::from_static(
                br#"{"model":"claude-sonnet-4-5","max_tokens":2048,"messages":[{"role":"user","content":"Write 10 KB of lorem ipsum."}]}"#,
            ))
            .unwrap()
    };
    // Warm the cache and check that the measured path is a hit.
    rt.block_on(async {
        let first = cached.clone().oneshot(request()).await.unwrap();
        first.into_body().collect().await.unwrap();
        let second = cached.clone().oneshot(request()).await.unwrap();
        assert_eq!(second.extensions().get(), Some(&CacheStatus::Hit));
    });

    let mut g = c.benchmark_group("hit_10KB");
    g.warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    g.bench_function("bare_service", |b| {
        b.iter(|| {
            rt.block_on(async {
                let resp = bare.clone().oneshot(request()).await.unwrap();
                black_box(resp.into_body().collect().await.unwrap().to_bytes())
            })
        });
    });
    g.bench_function("cache_hit", |b| {
        b.iter(|| {
            rt.block_on(async {
                let resp = cached.clone().oneshot(request()).await.unwrap();
                black_box(resp.into_body().collect().await.unwrap().to_bytes())
            })
        });
    });
    g.finish();
}

criterion_group!(benches, key, hit);
criterion_main!(benches);
