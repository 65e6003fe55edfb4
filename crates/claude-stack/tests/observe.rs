//! The stack's span carries the GenAI attributes and the usage, never the prompt, and the
//! overhead histogram is recorded.
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use claude_mock::MockServer;
use claude_stack::{ClaudeStack, OVERHEAD_SECONDS, StackConfig};
use http::Request;
use http_body_util::BodyExt;
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use tower::ServiceExt;
use tracing_subscriber::fmt::format::FmtSpan;

#[derive(Clone, Default)]
struct Buf(Arc<Mutex<Vec<u8>>>);

impl Write for Buf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// One request through a stack in front of a fresh mock, with `subscriber` and a local
/// metrics recorder: the status, the response's timings, the body, and the overhead samples.
fn one_request(
    subscriber: impl tracing::Subscriber + Send + Sync + 'static,
    req: Request<Bytes>,
) -> (
    http::StatusCode,
    Option<claude_stack::StackTimings>,
    Bytes,
    Vec<f64>,
) {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _t = tracing::subscriber::set_default(subscriber);
    let _m = metrics::set_default_local_recorder(&recorder);
    let (status, timings, body) = rt.block_on(async {
        let mock = MockServer::start().await.unwrap();
        let config: StackConfig =
            toml::from_str(&format!("[client]\nbase_url = \"{}\"\n", mock.url())).unwrap();
        let svc = ClaudeStack::new(config).unwrap().client().unwrap();
        let resp = svc.oneshot(req).await.unwrap();
        let timings = resp
            .extensions()
            .get::<claude_stack::StackTimings>()
            .copied();
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        mock.shutdown().await;
        (status, timings, body)
    });
    let overhead = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter(|(k, ..)| k.key().name() == OVERHEAD_SECONDS)
        .flat_map(|(.., v)| match v {
            DebugValue::Histogram(h) => h.into_iter().map(ordered_float_inner).collect(),
            _ => Vec::new(),
        })
        .collect();
    (status, timings, body, overhead)
}

fn request(prompt: &'static str) -> Request<Bytes> {
    let body = format!(
        r#"{{"model":"claude-sonnet-4-5","max_tokens":64,"messages":[{{"role":"user","content":"{prompt}"}}]}}"#
    );
    Request::post("/v1/messages")
        .header("x-mock-usage", "input=42,output=7")
        .header("x-api-key", "sk-ant-caller-key-should-not-leak")
        .body(Bytes::from(body))
        .unwrap()
}

#[test]
fn span_has_gen_ai_fields_and_usage_but_no_prompt_and_overhead_is_recorded() {
    let buf = Buf::default();
    let writer = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_span_events(FmtSpan::CLOSE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let (status, _, _, hist) = one_request(subscriber, request("TOP-SECRET-PROMPT"));
    assert_eq!(status, 200);
    let logs = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("gen_ai.request"), "{logs}");
    assert!(logs.contains("gen_ai.system=\"anthropic\""), "{logs}");
    assert!(
        logs.contains("gen_ai.request.model=\"claude-sonnet-4-5\""),
        "{logs}"
    );
    assert!(logs.contains("gen_ai.usage.input_tokens=42"), "{logs}");
    assert!(logs.contains("gen_ai.usage.output_tokens=7"), "{logs}");
    assert!(logs.contains("http.response.status_code=200"), "{logs}");
    assert!(
        !logs.contains("TOP-SECRET-PROMPT"),
        "the prompt must never be logged"
    );
    assert!(
        !logs.contains("sk-ant-caller-key"),
        "keys must never be logged"
    );
    assert_eq!(hist.len(), 1, "one overhead sample per request");
    assert!(hist[0] >= 0.0 && hist[0].is_finite());
}

/// With the span filtered out (as the gateway binary's default filter does), the response is
/// passed on as the layers below made it: the whole body, the timings, the overhead sample.
#[test]
fn with_the_span_filtered_out_the_answer_timings_and_overhead_are_unchanged() {
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_writer(std::io::sink)
        .finish();
    let (status, timings, body, hist) = one_request(subscriber, request("hi"));
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["usage"]["input_tokens"], 42, "{v}");
    assert_eq!(v["usage"]["output_tokens"], 7, "{v}");
    assert!(timings.is_some(), "the timings are on the response");
    assert_eq!(hist.len(), 1, "the overhead is recorded");
}

fn ordered_float_inner<F: Into<f64>>(x: F) -> f64 {
    x.into()
}

/// Time an attempt waits in the rate limiter is reported as queueing, not as the stack's
/// own overhead: with one request allowed at a time and an upstream that takes 300 ms, the
/// second of two concurrent requests waits about that long in the limiter.
#[test]
fn time_queued_in_the_rate_limiter_is_reported_as_queued() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (a, b) = rt.block_on(async {
        let mock = MockServer::start().await.unwrap();
        let config: StackConfig = toml::from_str(&format!(
            "[client]\nbase_url = \"{}\"\n[rate_limit]\nmax_concurrent_requests = 1\n",
            mock.url()
        ))
        .unwrap();
        let svc = ClaudeStack::new(config).unwrap().client().unwrap();
        let one = |prompt| {
            let svc = svc.clone();
            async move {
                let mut req = request(prompt);
                req.headers_mut()
                    .insert("x-mock-latency-ms", http::HeaderValue::from_static("300"));
                let resp = svc.oneshot(req).await.unwrap();
                assert!(resp.status().is_success());
                let t = resp
                    .extensions()
                    .get::<claude_stack::StackTimings>()
                    .copied()
                    .unwrap();
                resp.into_body().collect().await.unwrap();
                t
            }
        };
        let out = tokio::join!(one("first"), one("second"));
        mock.shutdown().await;
        out
    });
    let (waited, went) = if a.queued > b.queued { (a, b) } else { (b, a) };
    assert!(
        waited.queued >= std::time::Duration::from_millis(200),
        "the second request waited for the first: {waited:?}"
    );
    assert!(went.queued < waited.queued, "{went:?} {waited:?}");
    assert!(waited.upstream >= std::time::Duration::from_millis(300));
}
