//! The whole claude-tower stack around a plain [`tower::service_fn`], in-process.
//!
//! [`ClaudeStack`] works around any `Service<Request<Bytes>>`. Here the service is a closure
//! that answers like the Messages API: overloaded (529, `retry-after-ms: 100`) on the first
//! attempt, then a message with its usage. The example sends one request and prints the
//! status, what the retry layer did ([`RetryInfo`]) and what the cost layer recorded. No
//! network, no API key.
//!
//! Run it with `cargo run -p stack-service-fn`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use bytes::Bytes;
use claude_retry::RetryInfo;
use claude_stack::{ClaudeStack, StackConfig};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tower::ServiceExt;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The stack's configuration. Sections left out keep their defaults: cost and retry on,
/// rate limits and secrets off.
const CONFIG: &str = r#"
attempt_timeout = "30s"

[retry]
max_retries = 2

[cost.budgets]
global = { daily = "5.00" }
"#;

const OVERLOADED: &str =
    r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;

const MESSAGE: &str = r#"{
  "id": "msg_01", "type": "message", "role": "assistant",
  "model": "claude-sonnet-4-5-20250929",
  "content": [{"type": "text", "text": "Hello from a service_fn!"}],
  "stop_reason": "end_turn", "stop_sequence": null,
  "usage": {"input_tokens": 1200, "output_tokens": 85}
}"#;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), BoxError> {
    let config: StackConfig = toml::from_str(CONFIG)?;
    let stack = ClaudeStack::new(config)?;

    // The service at the bottom: anything `Clone + Send + Sync` that maps `Request<Bytes>`
    // to a `Response` with a `Bytes` body (a hyper client, a test double, ...).
    let calls = Arc::new(AtomicU32::new(0));
    let upstream = tower::service_fn(move |_req: Request<Bytes>| {
        let attempt = calls.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            let (status, body) = if attempt == 1 {
                (529, OVERLOADED)
            } else {
                (200, MESSAGE)
            };
            println!("upstream: attempt {attempt} -> {status}");
            Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .header("retry-after-ms", "100")
                .body(Full::new(Bytes::from_static(body.as_bytes())))
        }
    });
    let claude = stack.service(upstream);

    let request = Request::post("/v1/messages")
        .header("content-type", "application/json")
        .body(Bytes::from_static(
            br#"{"model":"claude-sonnet-4-5","max_tokens":256,"messages":[{"role":"user","content":"Say hello"}]}"#,
        ))?;
    let response = claude.oneshot(request).await?;

    println!("status: {}", response.status());
    if let Some(info) = response.extensions().get::<RetryInfo>() {
        println!("attempts: {}", info.attempts);
        for retry in &info.retries {
            println!(
                "  attempt {} failed with {}; waited {:?} ({:?})",
                retry.attempt, retry.reason, retry.wait, retry.source
            );
        }
    }

    // The cost is recorded when the body ends.
    let body = response.into_body().collect().await?.to_bytes();
    let message: serde_json::Value = serde_json::from_slice(&body)?;
    println!(
        "answer: {}",
        message["content"][0]["text"].as_str().unwrap_or_default()
    );

    let tracker = stack.cost_tracker().ok_or("the cost layer is off")?;
    println!("\n{}", tracker.report());
    Ok(())
}
