//! A tower layer that retries Claude Messages API calls the way the server asks, within a
//! deadline and a shared budget, so that an outage cannot multiply traffic.
//!
//! # Why
//!
//! The API fails in ways another attempt fixes (429, 529 `overloaded_error`, 5xx, dropped
//! connections, a stream whose first event is `overloaded_error`), and it says how long to
//! wait (`retry-after-ms`, `retry-after`). Retrying blindly turns an overload into a storm;
//! not retrying turns a blip into user-visible errors. [`RetryLayer`] does what the
//! official SDKs do, plus what a shared production client needs: a deadline across
//! attempts, a retry budget shared by every clone, first-event stream errors, and a record
//! of what it did ([`RetryInfo`]).
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicU32, Ordering};
//! use std::time::Duration;
//!
//! use bytes::Bytes;
//! use claude_retry::{RetryConfig, RetryInfo, RetryLayer};
//! use http_body_util::Full;
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower::BoxError> {
//! // An upstream that is overloaded on the first attempt.
//! let calls = Arc::new(AtomicU32::new(0));
//! let upstream = tower::service_fn({
//!     let calls = calls.clone();
//!     move |_req: http::Request<Bytes>| {
//!         let n = calls.fetch_add(1, Ordering::SeqCst);
//!         async move {
//!             let (status, body) = match n {
//!                 0 => (529, r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#),
//!                 _ => (200, r#"{"type":"message","content":[]}"#),
//!             };
//!             http::Response::builder()
//!                 .status(status)
//!                 .header("retry-after-ms", "20")
//!                 .body(Full::new(Bytes::from_static(body.as_bytes())))
//!         }
//!     }
//! });
//!
//! let client = ServiceBuilder::new()
//!     .layer(RetryLayer::new(RetryConfig::default()))
//!     .service(upstream);
//! let request = http::Request::post("https://api.anthropic.com/v1/messages")
//!     .body(Bytes::from_static(br#"{"model":"claude-sonnet-4-5","max_tokens":64,"messages":[]}"#))?;
//! let response = client.oneshot(request).await?;
//!
//! assert_eq!(response.status(), 200);
//! let info = response.extensions().get::<RetryInfo>().ok_or("no RetryInfo")?;
//! assert_eq!(info.attempts, 2);
//! assert_eq!(info.retries[0].wait, Duration::from_millis(20)); // the server's wait
//! # Ok(())
//! # }
//! ```
//!
//! # What is retried
//!
//! Classification is `claude_core`'s ([`classify_response`](claude_core::classify_response),
//! [`classify_error`](claude_core::classify_error),
//! [`classify_stream_error`](claude_core::classify_stream_error)); this crate only decides
//! whether and when.
//!
//! - Retried: 408, 409, 429, 500–599 (529 included), connection failures (refused, reset,
//!   closed mid-message) and attempt timeouts (`tower::timeout::error::Elapsed` from a
//!   per-attempt timeout layer placed inside this one), and a `200` stream whose first
//!   event is `event: error` of type `overloaded_error`, `api_error`, `rate_limit_error`
//!   or `timeout_error`.
//! - Never retried: 400, 401, 403, 404, 413 and other 4xx; the spend-cap 429
//!   (`error.details.error_code = enforced_spend_limit_reached`); errors the stack made
//!   itself ([`Origin::Local`](claude_core::Origin::Local): a local rate-limit rejection, a
//!   budget refusal, a missing secret); unknown errors.
//! - `x-should-retry: true|false` on a response overrides both lists, as in the SDKs.
//!
//! # Decisions
//!
//! - **Own service, not `tower::retry`.** Deciding needs async reads that tower's
//!   synchronous `Policy::retry` cannot do: an error body (at most
//!   [`error_body_limit`](RetryConfig::error_body_limit), 64 KiB) to read `error.type` and
//!   the spend-cap code, and a stream's first event. Successful JSON bodies are never read
//!   or buffered; only error bodies that may be retried and a stream's first event are,
//!   and the caller still gets every byte ([`ResponseBody`]).
//! - **Same bytes every attempt.** The request is `Request<Bytes>`; each attempt is a clone
//!   (the body is a reference count, never re-serialised). Attempt `k` carries
//!   [`claude_core::Attempt`]`(k)` in its extensions, so inner layers (rate limit, cost,
//!   secrets) can tell retries apart; the final response carries `Attempt` and
//!   [`RetryInfo`] (attempts, reasons, waits, why it stopped).
//! - **Waits.** When the server names a wait (`retry-after-ms`, then `retry-after` in
//!   seconds or as an HTTP date) it is used as is, without jitter. If it is longer than
//!   [`max_retry_after`](RetryConfig::max_retry_after) (60 s) or would end past the
//!   deadline, the layer does **not** retry and returns the response at once: retrying
//!   before the server's time fails for sure, and sleeping past the deadline is waste.
//!   (The Python SDK falls back to its backoff in that case; we prefer to tell the caller
//!   now.) A zero wait falls back to the backoff, like the SDKs. Otherwise the wait is
//!   `min(initial_backoff · 2^n, max_backoff)` with [`Jitter`]: the SDKs' `× (1 − 0.25·U)`
//!   by default, full jitter `× U`, or none. The random numbers come from a SplitMix64
//!   generator in this crate (no `rand`).
//! - **Deadline.** One deadline per request across attempts and waits
//!   ([`deadline`](RetryConfig::deadline), 10 min like the SDKs' timeout; a [`Deadline`]
//!   extension replaces it per request). It bounds the attempt in flight, the read of an
//!   error body, the peek of the first event and waiting for the inner service to be
//!   ready; when it passes the request fails with [`ErrorKind::Timeout`](claude_core::ErrorKind::Timeout)
//!   of origin `Local` (so no outer layer retries it). A retry whose wait would end past it
//!   is not made. Per-attempt timeouts are a separate `tower::timeout` layer inside this
//!   one; their `Elapsed` is retried.
//! - **Budget.** [`RetryBudget`]: retries ≤ `retry_ratio` × requests in a sliding window +
//!   `min_per_sec` × window (defaults 0.2, 10/s, 10 s), in integer fixed point, shared by
//!   every clone through an `Arc`. Every request deposits once; each retry withdraws once;
//!   an empty budget returns the failure as is and counts
//!   `claude_retry_budget_exhausted_total`. Our own instead of tower's `TpsBudget`, which
//!   truncates fractional ratios (tower#857) and panics on bad input.
//! - **Streams.** Before a `200 text/event-stream` response is returned, its first event
//!   is read (with the same deadline). An `event: error` of a retryable type is retried:
//!   the caller has seen nothing. Any other first event is handed on with the rest of the
//!   stream untouched; from then on errors reach the caller as the server sent them (a
//!   retry then would duplicate output and bill input twice). A connection that breaks
//!   before the first event is a connection failure, retried. The peek is skipped when no
//!   retry is left (no added latency on the last attempt).
//! - **Errors.** Upstream HTTP errors stay `Ok(Response)` with their status and body. A
//!   failure without a response (transport, inner layer) that is not retried comes back as
//!   a [`claude_core::Error`] (kind and origin from the classifier) whose message names the
//!   attempt count and why the layer stopped, with the original error as its source. A
//!   local refusal on the first attempt passes through untouched.
//! - **Service contract.** `call` sends the first attempt on the service that was polled
//!   ready and keeps it for the retries (a clone takes its place); before every retry the
//!   future drives it to readiness again. No `tower::buffer`; `Retry` is `Clone` when the
//!   inner service is.
//! - **Observability.** Each retry emits a `tracing` event at INFO (target
//!   `claude_retry`: attempt, reason, wait in ms, wait source) and increments
//!   [`ATTEMPTS_TOTAL`] with labels `reason` (the [`ErrorKind`](claude_core::ErrorKind)
//!   code, e.g. `OVERLOADED`) and `source` (`status`, `stream`, `error`). Give-ups are
//!   DEBUG events (an outage would otherwise flood the logs); budget refusals count
//!   [`BUDGET_EXHAUSTED_TOTAL`].
//!
//! # Order in a stack
//!
//! Place it inside the cache and cost layers (a hit is never retried; a retried request
//! is charged once) and outside the per-attempt timeout, the rate limiter (every attempt
//! waits its turn) and the API-key layer (a rotated key is used by the next attempt).

mod backoff;
mod body;
mod budget;
mod config;
pub mod future;
mod info;
mod layer;
mod service;
#[cfg(test)]
mod tests;

pub use body::ResponseBody;
pub use budget::RetryBudget;
pub use config::{BudgetConfig, ConfigError, Jitter, RetryConfig};
pub use future::ResponseFuture;
pub use info::{Deadline, GiveUp, RetryInfo, RetryReason, RetryRecord, WaitSource};
pub use layer::RetryLayer;
pub use service::Retry;

/// Counter of retries made (first attempts are not counted), labelled `reason` (the
/// [`ErrorKind`](claude_core::ErrorKind) code) and `source` (`status`, `stream`, `error`).
pub const ATTEMPTS_TOTAL: &str = "claude_retry_attempts_total";

/// Counter of retries refused because the [`RetryBudget`] was spent.
pub const BUDGET_EXHAUSTED_TOTAL: &str = "claude_retry_budget_exhausted_total";
