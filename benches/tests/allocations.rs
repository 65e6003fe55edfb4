//! Guards of the hot path's allocation properties (issue 9): an SSE answer costs the stack
//! no allocation per frame, and a request body is not copied on its way through the stack
//! more than the cache key's one canonical form.
//!
//! These count heap allocations, not time, so they are repeatable: every request runs to
//! the end of its body on one current-thread runtime, the cache stores on the request's
//! thread (`store_thread = false`, so no other thread of the stack allocates), and a
//! counting global allocator (`stats_alloc`) counts. The figure kept is the fewest of 16
//! distinct requests after 8 of warm-up: moka's maintenance, which runs in some inserts and
//! not in others, and anything the test harness does meanwhile only ever add. The upstream
//! is an in-process service that answers at once from shared frames (no copy, no allocation
//! per frame of its own), so the counts are the stack's own, plus the test's collecting of
//! each answer (a few allocations, growing only as its list of frames doubles). (Over HTTP, hyper's read
//! buffers would add allocations that depend on how the socket happens to coalesce frames;
//! the load benchmark measures that path.)
//!
//! The figures are printed (`cargo test -p claude-benches --test allocations -- --nocapture`).

use std::alloc::System;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::{Bytes, BytesMut};
use claude_benches::{api_keys, stack_config, upstream};
use claude_stack::{ClaudeStack, StackService};
use http::{HeaderValue, Request};
use http_body_util::BodyExt;
use stats_alloc::{INSTRUMENTED_SYSTEM, StatsAlloc};
use tower::ServiceExt;

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Allocations (reallocations included) and bytes allocated in the process so far.
fn counters() -> (u64, u64) {
    let s = GLOBAL.stats();
    let bytes = s.bytes_allocated as i64 + s.bytes_reallocated as i64;
    (
        (s.allocations + s.reallocations) as u64,
        bytes.max(0) as u64,
    )
}

/// The tests of this file run one at a time: the counters are the whole process's.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// A streamed answer with `deltas` text deltas: 6 other events around them, one event per
/// frame as the API sends them.
fn sse_frames(deltas: usize) -> Arc<[Bytes]> {
    let mut frames = vec![
        Bytes::from_static(b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_01\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"claude-sonnet-4-5-20250929\",\"content\":[],\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{\"input_tokens\":412,\"cache_creation_input_tokens\":0,\"cache_read_input_tokens\":0,\"output_tokens\":1}}}\n\n"),
        Bytes::from_static(b"event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n"),
        Bytes::from_static(b"event: ping\ndata: {\"type\": \"ping\"}\n\n"),
    ];
    frames.extend((0..deltas).map(|i| {
        Bytes::from(format!(
            "event: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"index\":0,\"delta\":{{\"type\":\"text_delta\",\"text\":\" word{i}\"}}}}\n\n"
        ))
    }));
    frames.push(Bytes::from_static(
        b"event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
    ));
    frames.push(Bytes::from(format!("event: message_delta\ndata: {{\"type\":\"message_delta\",\"delta\":{{\"stop_reason\":\"end_turn\",\"stop_sequence\":null}},\"usage\":{{\"output_tokens\":{deltas}}}}}\n\n")));
    frames.push(Bytes::from_static(
        b"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
    ));
    frames.into()
}

const JSON_ANSWER: &str = r#"{"id":"msg_01","type":"message","role":"assistant","model":"claude-sonnet-4-5-20250929","content":[{"type":"text","text":"Two incidents in Q3."}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":412,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":9}}"#;

/// Every layer on, limits and budget far above the load; the cache stores on the
/// request's thread.
fn stack(
    rt: &tokio::runtime::Runtime,
    frames: Arc<[Bytes]>,
    content_type: &'static str,
) -> StackService {
    ClaudeStack::new(stack_config(false))
        .unwrap_or_else(|e| panic!("stack: {e}"))
        .with_api_keys(api_keys(rt))
        .service(upstream(frames, content_type))
}

/// A distinct request (`n`) whose body has a user turn of `text_len` bytes.
fn request(n: u64, stream: bool, text_len: usize) -> Request<Bytes> {
    let text = "The quarterly report of the platform team. ".repeat(text_len / 43 + 1);
    let text = &text[..text_len];
    let body = format!(
        r#"{{"model":"claude-sonnet-4-5","max_tokens":1024,"stream":{stream},"metadata":{{"user_id":"u-1"}},"messages":[{{"role":"user","content":"Request {n}: {text}"}}]}}"#
    );
    let mut req = Request::new(BytesMut::from(body.as_bytes()).freeze());
    *req.method_mut() = http::Method::POST;
    *req.uri_mut() = http::Uri::from_static("/v1/messages");
    let h = req.headers_mut();
    h.insert("anthropic-version", HeaderValue::from_static("2023-06-01"));
    h.insert("content-type", HeaderValue::from_static("application/json"));
    req
}

/// The fewest allocations (and their bytes) of one request through `svc`, over several
/// distinct requests made after a warm-up, with the body collected to its end. Each is a
/// cache miss; the answer must be whole.
fn per_request(
    rt: &tokio::runtime::Runtime,
    svc: &StackService,
    stream: bool,
    text_len: usize,
    expect_len: usize,
) -> (u64, u64) {
    let mut fewest = (u64::MAX, u64::MAX);
    for n in 0..24 {
        // Built before counting: the request is the caller's, not the stack's.
        let req = request(n, stream, text_len);
        let before = counters();
        let (status, cache, len) = rt.block_on(async {
            let resp = svc
                .clone()
                .oneshot(req)
                .await
                .unwrap_or_else(|e| panic!("the stack failed: {e}"));
            let status = resp.status();
            let cache = resp.headers().get("x-claude-cache").cloned();
            let body = resp
                .into_body()
                .collect()
                .await
                .unwrap_or_else(|e| panic!("the body failed: {e}"));
            (status, cache, body.to_bytes().len())
        });
        let after = counters();
        assert_eq!(status, 200);
        assert_eq!(
            cache.as_ref().map(HeaderValue::as_bytes),
            Some(&b"MISS"[..])
        );
        assert_eq!(len, expect_len, "the whole answer");
        // The first requests warm the thread's kept buffers and metric handles.
        if n >= 8 {
            let got = (after.0 - before.0, after.1 - before.1);
            fewest = (fewest.0.min(got.0), fewest.1.min(got.1));
        }
    }
    fewest
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap_or_else(|e| panic!("runtime: {e}"))
}

fn total(frames: &[Bytes]) -> usize {
    frames.iter().map(Bytes::len).sum()
}

/// The most allocations one request may cost on its way through the whole stack (a miss,
/// its answer stored): the figures of this test at the commit that set them, plus about 15%
/// (JSON 78 to 79, SSE 87 with 16 text deltas, on a debug build with every feature, as CI
/// runs it; they move by one from run to run). A change that needs more says why in its
/// commit and raises these; one that needs fewer lowers them.
const MAX_JSON_ALLOCATIONS: u64 = 90;
const MAX_SSE_ALLOCATIONS: u64 = 100;

#[test]
fn an_sse_answer_costs_no_allocation_per_frame() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(PoisonError::into_inner);
    let rt = runtime();
    let mut counts = Vec::new();
    for deltas in [16, 1024] {
        let frames = sse_frames(deltas);
        let len = total(&frames);
        let svc = stack(&rt, frames, "text/event-stream");
        counts.push((deltas, per_request(&rt, &svc, true, 200, len).0));
    }
    let [(few, a), (many, b)] = counts[..] else {
        unreachable!()
    };
    let more = many - few;
    println!(
        "allocations per SSE request: {a} with {few} text deltas, {b} with {many}: {} more for {more} more frames",
        b.saturating_sub(a)
    );
    assert!(
        a <= MAX_SSE_ALLOCATIONS,
        "an SSE request costs {a} allocations, more than the {MAX_SSE_ALLOCATIONS} allowed"
    );
    // Growth is allowed only when amortised: lists that double as frames come (the cache's
    // tee of the answer, the entry's index of frames) add a few reallocations per doubling,
    // about 13 from 22 to 1030 frames; one allocation per frame would add a thousand.
    assert!(
        b <= a + 32,
        "{more} more frames cost {} more allocations ({a} → {b}): an allocation per frame?",
        b.saturating_sub(a)
    );
}

#[test]
fn a_large_request_body_is_not_copied_beyond_the_cache_keys_canonical_form() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(PoisonError::into_inner);
    let rt = runtime();
    let frames: Arc<[Bytes]> = vec![Bytes::from_static(JSON_ANSWER.as_bytes())].into();
    let svc = stack(&rt, frames, "application/json");
    let len = JSON_ANSWER.len();
    let (small_allocs, small_bytes) = per_request(&rt, &svc, false, 200, len);
    let grow = 256 * 1024;
    let (large_allocs, large_bytes) = per_request(&rt, &svc, false, 200 + grow, len);
    let extra = large_bytes.saturating_sub(small_bytes);
    println!(
        "per JSON request: {small_allocs} allocations, {small_bytes} bytes with a 200-byte turn; {large_allocs}, {large_bytes} with {grow} bytes more: {extra} bytes more ({:.2} copies)",
        extra as f64 / grow as f64
    );
    // The cache key writes the body's canonical form once (it is hashed as a whole); any
    // other copy of the body on its way (a layer that re-buffers or clones it into a new
    // allocation) would add another `grow` bytes.
    assert!(
        extra < grow as u64 * 3 / 2,
        "{extra} more bytes allocated for a body {grow} bytes larger: the body is copied more than once"
    );
    assert!(
        small_allocs <= MAX_JSON_ALLOCATIONS,
        "a JSON request costs {small_allocs} allocations, more than the {MAX_JSON_ALLOCATIONS} allowed"
    );
    assert!(
        large_allocs <= small_allocs + 4,
        "a larger body costs {} more allocations ({small_allocs} → {large_allocs})",
        large_allocs.saturating_sub(small_allocs)
    );
}
