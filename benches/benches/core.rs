//! Throughput of the shared hot paths in claude-core: the usage scanner on a 1 MB SSE
//! stream and on a JSON answer, and `RequestMeta::parse` on a 100 KB request body; and the
//! same on the sizes of an ordinary request (what `bench-gateway` sends and claude-mock
//! answers: a 1.5 KB request, a 16-token answer as JSON or as a 22-event stream).
#![allow(missing_docs)]

use std::hint::black_box;
use std::time::Duration;

use claude_core::RequestMeta;
use claude_core::scan::{BodyEnd, BodyFormat, UsageScanner};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

/// A realistic stream of about `target` bytes: message_start, many text deltas, the end.
fn sse_stream(target: usize) -> Vec<u8> {
    let mut s = String::from(
        "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"model\":\"claude-sonnet-4-5\",\"content\":[],\"usage\":{\"input_tokens\":1200,\"cache_read_input_tokens\":5000,\"output_tokens\":1}}}\n\n",
    );
    let delta = "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"the quick brown fox \"}}\n\n";
    while s.len() < target {
        s.push_str(delta);
    }
    s.push_str("event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":9000}}\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n");
    s.into_bytes()
}

fn json_answer(target: usize) -> Vec<u8> {
    let text = "lorem ipsum dolor sit amet ".repeat(target / 27 + 1);
    serde_json::to_vec(&serde_json::json!({
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
        "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
        "usage": {"input_tokens": 1200, "output_tokens": 9000}
    }))
    .unwrap_or_default()
}

fn request_body(target: usize) -> Vec<u8> {
    let text = "Please summarise the following document. ".repeat(target / 42 + 1);
    serde_json::to_vec(&serde_json::json!({
        "model": "claude-sonnet-4-5", "max_tokens": 1024, "stream": true,
        "system": "You are a helpful assistant.",
        "messages": [{"role": "user", "content": text}]
    }))
    .unwrap_or_default()
}

/// A 16-token answer as claude-mock writes it (`crates/claude-mock/src/answer.rs`), as JSON.
const MOCK_JSON: &str = r#"{"id":"msg_mock_1","type":"message","role":"assistant","model":"claude-sonnet-4-5","content":[{"type":"text","text":"lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt ut labore et"}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":380,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"cache_creation":{"ephemeral_5m_input_tokens":0,"ephemeral_1h_input_tokens":0},"output_tokens":16,"service_tier":"standard"}}"#;

/// The same answer as a stream, one event per frame as the mock sends it.
fn mock_sse_frames() -> Vec<String> {
    let usage = |out: u32| {
        format!(
            r#"{{"input_tokens":380,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"cache_creation":{{"ephemeral_5m_input_tokens":0,"ephemeral_1h_input_tokens":0}},"output_tokens":{out},"service_tier":"standard"}}"#
        )
    };
    let mut frames = vec![
        format!(
            "event: message_start\ndata: {{\"type\":\"message_start\",\"message\":{{\"id\":\"msg_mock_1\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"claude-sonnet-4-5\",\"content\":[],\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{}}}}}\n\n",
            usage(1)
        ),
        "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n".to_owned(),
        "event: ping\ndata: {\"type\":\"ping\"}\n\n".to_owned(),
    ];
    for word in "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt ut labore et".split(' ') {
        frames.push(format!(
            "event: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"index\":0,\"delta\":{{\"type\":\"text_delta\",\"text\":\"{word} \"}}}}\n\n"
        ));
    }
    frames.push(
        "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n"
            .to_owned(),
    );
    frames.push(format!(
        "event: message_delta\ndata: {{\"type\":\"message_delta\",\"delta\":{{\"stop_reason\":\"end_turn\",\"stop_sequence\":null}},\"usage\":{}}}\n\n",
        usage(16)
    ));
    frames.push("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n".to_owned());
    frames
}

fn scanner(c: &mut Criterion) {
    let mut g = c.benchmark_group("scanner");
    g.warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    let sse = sse_stream(1 << 20);
    let r = claude_core::scan::scan_all(BodyFormat::Sse, &sse);
    assert!(r.is_complete_success() && r.usage.output_tokens == 9000);
    g.throughput(Throughput::Bytes(sse.len() as u64));
    // Frames of about 16 KiB, as a TLS reader hands them over.
    g.bench_function("sse_1MiB_16KiB_frames", |b| {
        b.iter(|| {
            let mut s = UsageScanner::new(BodyFormat::Sse);
            for chunk in sse.chunks(16 * 1024) {
                s.feed(black_box(chunk));
            }
            black_box(s.finish(BodyEnd::Ended))
        });
    });
    let json = json_answer(1 << 20);
    // Guard against measuring a scanner that silently skipped the body.
    let r = claude_core::scan::scan_all(BodyFormat::Json, &json);
    assert!(json.len() > 1 << 20 && r.completed && r.usage.output_tokens == 9000);
    g.throughput(Throughput::Bytes(json.len() as u64));
    g.bench_function("json_1MiB", |b| {
        b.iter(|| {
            let mut s = UsageScanner::new(BodyFormat::Json);
            s.feed(black_box(&json));
            black_box(s.finish(BodyEnd::Ended))
        });
    });
    // The ordinary answer: per-request costs rather than throughput.
    let r = claude_core::scan::scan_all(BodyFormat::Json, MOCK_JSON.as_bytes());
    assert!(r.is_complete_success() && r.usage.output_tokens == 16 && r.model.is_some());
    g.throughput(Throughput::Elements(1));
    g.bench_function("json_mock_answer", |b| {
        b.iter(|| {
            let mut s = UsageScanner::new(BodyFormat::Json);
            s.feed(black_box(MOCK_JSON.as_bytes()));
            black_box(s.finish(BodyEnd::Ended))
        });
    });
    let frames = mock_sse_frames();
    assert_eq!(frames.len(), 22);
    let r = claude_core::scan::scan_all(BodyFormat::Sse, frames.concat().as_bytes());
    assert!(r.is_complete_success() && r.usage.output_tokens == 16 && r.events == 22);
    g.bench_function("sse_mock_stream_22_frames", |b| {
        b.iter(|| {
            let mut s = UsageScanner::new(BodyFormat::Sse);
            for f in &frames {
                s.feed(black_box(f.as_bytes()));
            }
            black_box(s.finish(BodyEnd::Ended))
        });
    });
    g.finish();
}

fn request_meta(c: &mut Criterion) {
    let mut g = c.benchmark_group("request_meta");
    g.warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    let body = request_body(100 * 1024);
    g.throughput(Throughput::Bytes(body.len() as u64));
    g.bench_function("parse_100KiB", |b| {
        b.iter(|| black_box(RequestMeta::parse("/v1/messages", black_box(&body))));
    });
    // bench-gateway's request (about 1.5 KB, SDK member order).
    let turn = "Here is the quarterly report of the platform team. Summarise the incidents, \
                the latency figures and the open risks, then propose three next steps.";
    let small = format!(
        r#"{{"model":"claude-sonnet-4-5","max_tokens":1024,"stream":false,"temperature":0.2,"system":"You are a careful assistant for an engineering organisation. Answer briefly and cite the section you rely on.","messages":[{{"role":"user","content":"{turn} {turn}"}},{{"role":"assistant","content":"I can do that. Which quarter do you mean, and should I include the incident timelines?"}},{{"role":"user","content":"Q3, with the timelines (request 7-1). {turn} {turn} {turn}"}}]}}"#
    );
    assert!(RequestMeta::parse("/v1/messages", small.as_bytes()).is_valid());
    g.throughput(Throughput::Elements(1));
    g.bench_function("parse_request_1_5KB", |b| {
        b.iter(|| {
            black_box(RequestMeta::parse(
                "/v1/messages",
                black_box(small.as_bytes()),
            ))
        });
    });
    g.finish();
}

criterion_group!(benches, scanner, request_meta);
criterion_main!(benches);
