//! A simulator of the Anthropic Messages API: a real HTTP server on loopback that answers
//! deterministically, enforces rate limits, plays scripted faults, and counts exactly what
//! it wrote.
//!
//! # Why
//!
//! The middleware of this workspace (retry, rate limit, cache, cost, secrets) must be tested
//! over real HTTP against something that behaves like the API: the right status codes and
//! error envelopes, `retry-after`, the SSE event sequence, usage in both shapes, 429s from
//! real token buckets, connections that drop mid-body. `claude-mock` is that upstream, and
//! it is an independent oracle: it depends on no other crate of the workspace, so a test can
//! compare what a layer believes (a cost, a number of attempts, a limit) with what actually
//! reached the server ([`Stats`]). It is also the upstream of the load benchmarks, so the
//! hot path takes no lock across an await and precomputes what it can.
//!
//! # Example
//!
//! ```
//! use http_body_util::{BodyExt, Full};
//! use hyper_util::client::legacy::Client;
//! use hyper_util::rt::TokioExecutor;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mock = claude_mock::MockServer::builder()
//!     .api_key("sk-test-1")
//!     .output_tokens(3)
//!     .start()
//!     .await?;
//!
//! let client = Client::builder(TokioExecutor::new()).build_http::<Full<bytes::Bytes>>();
//! let request = http::Request::post(format!("{}/v1/messages", mock.url()))
//!     .header("x-api-key", "sk-test-1")
//!     .header("anthropic-version", "2023-06-01")
//!     .header("content-type", "application/json")
//!     .body(Full::from(
//!         r#"{"model":"claude-sonnet-4-5","max_tokens":100,"messages":[{"role":"user","content":"Hello"}]}"#,
//!     ))?;
//! let response = client.request(request).await?;
//! assert_eq!(response.status(), 200);
//! let body = response.into_body().collect().await?.to_bytes();
//! let message: serde_json::Value = serde_json::from_slice(&body)?;
//! assert_eq!(message["content"][0]["text"], "Lorem ipsum dolor");
//! // `messages` is 35 bytes of JSON: ceil(35 / 4) = 9 input tokens.
//! assert_eq!(message["usage"]["input_tokens"], 9);
//!
//! let stats = mock.stats();
//! assert_eq!(stats.requests, 1);
//! assert_eq!(stats.usage.output_tokens, 3);
//! mock.shutdown().await;
//! # Ok(())
//! # }
//! ```
//!
//! From the command line: `claude-mock --listen 127.0.0.1:8788 --api-key K --rpm 50`
//! (`claude-mock --help` lists the flags).
//!
//! # Endpoints
//!
//! | Endpoint | Answer |
//! |---|---|
//! | `POST /v1/messages` | a message (JSON), or an SSE stream with `"stream": true` |
//! | `POST /v1/messages/count_tokens` | `{"input_tokens": N}`: the estimate, or the `input` of `x-mock-usage` (same checks as messages but no `max_tokens` needed; faults apply; touches no rate limit; no usage in the stats) |
//! | `GET /v1/models`, `GET /v1/models/{id}` | a fixed list of three models |
//! | `GET /mock/stats` | [`Stats`] as JSON (not counted, no auth) |
//! | `POST /mock/reset` | zeroes the stats and the fault attempt counters (not counted, no auth) |
//! | anything else | 404 `not_found_error`; a known path with the wrong method gets 405 |
//!
//! A `/v1/messages` request goes through, in order:
//! 1. auth: `x-api-key: K` or `authorization: Bearer K` must be a configured key, else 401
//!    `authentication_error` ("invalid x-api-key"); with no key configured anything passes;
//! 2. the `anthropic-version` header must be present, else 400 `invalid_request_error`;
//! 3. the body: more than [`MAX_BODY_BYTES`] (32 MiB) is 413 `request_too_large`; it must be
//!    a JSON object with `model` (string), `max_tokens` (positive integer), `messages`
//!    (array), and `stream` if present must be a boolean, else 400 `invalid_request_error`
//!    whose message names the field (`max_tokens: Field required`);
//! 4. the `x-mock-*` headers (a value that does not parse, or an unknown `x-mock-` header,
//!    is 400 `invalid_request_error` naming the header);
//! 5. the fault plan, then the rate limits, then the answer.
//!
//! Every response carries `request-id: req_mock_<n>` and a `content-type`; every error uses
//! the Anthropic envelope
//! `{"type":"error","error":{"type":"...","message":"..."},"request_id":"req_mock_<n>"}`.
//! `n` counts every request the server received, from 1; the message id is `msg_mock_<n>`.
//!
//! # The answer
//!
//! Deterministic. The text is one word per output token from a fixed list ("Lorem ipsum
//! dolor ..."), at most [`MAX_TEXT_TOKENS`] words. `stop_reason` is `"max_tokens"` when the
//! requested length (the scripted `output`, else `x-mock-output-tokens`, else the configured
//! length) exceeds `max_tokens`, else `"end_turn"`; `stop_sequence` is `null`.
//!
//! **Input tokens** = `ceil(B / 4)`, at least 1, where `B` is the sum of the byte lengths of
//! the raw JSON texts of the top-level `system`, `messages` and `tools` values exactly as
//! they appear in the request body (from the first to the last byte of each value, inner
//! whitespace included; an absent or `null` value counts 0). [`estimate_input_tokens`]
//! computes it; claude-core uses the same formula.
//!
//! **Output tokens** = `min(max_tokens, L)` where `L` is `x-mock-output-tokens` if sent, else
//! the configured [`output_tokens`](MockServerBuilder::output_tokens) (12 by default).
//!
//! **Cache fields** are 0 unless scripted by `x-mock-usage`.
//!
//! A stream is `message_start` (the message with empty content; usage `input_tokens`,
//! `cache_creation_input_tokens`, `cache_read_input_tokens`, `cache_creation`
//! `{ephemeral_5m_input_tokens, ephemeral_1h_input_tokens}`, `output_tokens: 1`),
//! `content_block_start` (index 0, text), `ping`, one `content_block_delta` (`text_delta`,
//! one word) per output token (at most [`MAX_TEXT_TOKENS`]), `content_block_stop`,
//! `message_delta` (`delta: {stop_reason, stop_sequence: null}`, cumulative usage
//! `input_tokens`, `cache_creation_input_tokens`, `cache_read_input_tokens`,
//! `output_tokens`), `message_stop`. Each event is written as `event: NAME\ndata: JSON\n\n`
//! in its own body frame (`content-type: text/event-stream`, chunked), so clients really see
//! a stream.
//!
//! **Latency**: [`first_byte_latency`](MockServerBuilder::first_byte_latency) delays the
//! response head of an answer; [`token_latency`](MockServerBuilder::token_latency) delays
//! each text delta of a stream, and the head of a JSON answer once per word. Both use tokio
//! timers, so a test with a paused clock sees them auto-advance.
//!
//! # Request headers that script the mock
//!
//! | Header | Effect |
//! |---|---|
//! | `x-mock-output-tokens: N` | reply length (capped by `max_tokens`); `x-mock-usage` `output` wins over it |
//! | `x-mock-usage: input=1200,output=300,cache_read=500,cache_write_5m=100,cache_write_1h=0` | the exact usage reported in the JSON and in the stream; any subset; missing `input`/`output` take the estimate, missing cache keys 0; `cache_creation_input_tokens = cache_write_5m + cache_write_1h` and `cache_creation` carries the split; `web_search=N` reports `server_tool_use.web_search_requests` (in the JSON usage and the final `message_delta`), `service_tier=standard|priority|batch` sets `usage.service_tier` (default `standard`). A scripted `output` is reported as is (not capped); a stream then carries `min(output, 4096)` deltas |
//! | `x-mock-fault: 429,529,ok` | the outcome of successive attempts of the same request (see Faults) |
//! | `x-mock-key: K` | counts attempts per `K` instead of per request content |
//! | `x-mock-retry-after: S` | copied as `retry-after` on scripted error responses (seconds, or an HTTP date) |
//! | `x-mock-retry-after-ms: MS` | copied as `retry-after-ms` on scripted error responses |
//! | `x-mock-should-retry: true\|false` | copied as `x-should-retry` on scripted error responses |
//! | `x-mock-latency-ms: N` | delay before the response head of whatever the request gets after its headers were parsed (answers, scripted errors, resets, 429s), on top of the first-byte latency of an answer |
//! | `x-mock-stream-error-after: N` | a streamed answer carries `event: error` (`{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}`) after `N` text deltas and ends there (no `message_delta`, no `message_stop`). `N = 0`: the error is the very first event, before `message_start`; `N >= 1`: `message_start`, `content_block_start`, `ping` and `N` deltas precede it (all the deltas, if there are fewer than `N`). Ignored without `"stream": true` |
//! | `x-mock-stream-error-type: T` | the `error.type` of that event (`overloaded_error` by default) |
//! | `x-mock-reset-after: N` | the connection drops after `N` bytes of response body: the body ends with an error, hyper aborts the connection, and the client sees an incomplete body (JSON answers have a `content-length`, streams are chunked). Applies to every response of a request whose headers were parsed; `N` at or beyond the body length changes nothing |
//!
//! # Faults
//!
//! A [`FaultPlan`] lists the outcomes of successive attempts of the same request: attempt `k`
//! gets entry `k`, and past the end the last entry repeats, so `x-mock-fault: 500` always
//! fails and `529,ok` fails once. Attempts are counted per (fault spec as sent + path + body
//! bytes), or per `x-mock-key` when the request sends one; [`MockServer::reset_stats`]
//! forgets them. A request without `x-mock-fault` follows the server's default plan
//! ([`faults`](MockServerBuilder::faults)), if any, counted the same way with the plan's
//! canonical text as spec. The counters grow by one entry per distinct faulted request
//! until a reset.
//!
//! Entries:
//! - a status `400..=599`: that status with the Anthropic error type of
//!   [`error_type_for_status`] (400 `invalid_request_error`, 401 `authentication_error`,
//!   402 `billing_error`, 403 `permission_error`, 404 `not_found_error`, 408
//!   `timeout_error`, 409 `conflict_error`, 413 `request_too_large`, 429
//!   `rate_limit_error`, 500/502/503 `api_error`, 504 `timeout_error`, 529
//!   `overloaded_error` with message `Overloaded`; other 4xx `invalid_request_error`, other
//!   5xx `api_error`). It carries `retry-after`, `retry-after-ms` and `x-should-retry` only
//!   when the request scripted them;
//! - `ok`: the normal answer;
//! - `reset`: the connection is closed without any response (HTTP/1.1), or the stream is
//!   reset (h2);
//! - `spendcap`: 429 `rate_limit_error` with
//!   `"details":{"error_code":"enforced_spend_limit_reached"}` and never a `retry-after`;
//! - `stream_error`: the normal answer with a stream error after `x-mock-stream-error-after`
//!   deltas (0, the first event, by default); a non-streaming request gets the status that
//!   error type maps to (529 for `overloaded_error`, 500 for `api_error`).
//!
//! Scripted errors produce no usage and do not touch the rate limits.
//!
//! # Rate limits
//!
//! [`Limits`] (unlimited by default; [`MockServer::set_limits`] changes them at run time and
//! refills the buckets): one set of token buckets per server, not per key, with continuous
//! refill (capacity = the per-minute limit, refill = limit / 60 per second, on
//! `tokio::time::Instant`, so tests may pause time). After auth, validation and faults, a
//! `/v1/messages` request needs at least 1 in the requests bucket, at least its ITPM count
//! (`input_tokens + cache_creation_input_tokens`; cache reads do not count) in the input
//! bucket, and more than 0 in the output bucket. Admitted, it is charged 1 request, its ITPM
//! count, and the output tokens it reports (the output bucket may go negative and refills).
//! Refused, it gets 429 `rate_limit_error` naming the limit ("This request would exceed the
//! rate limit for your organization of N input tokens per minute. ...") with `retry-after`
//! in whole seconds (ceiling, at least 1) until every short bucket has enough. A request
//! whose ITPM count exceeds the input limit can never be admitted (`retry-after: 60`), and a
//! limit of 0 refuses every request (`retry-after: 60`).
//!
//! When any limit is configured, every `/v1/messages` answer and rate-limit 429 carries
//! `anthropic-ratelimit-{requests,input-tokens,output-tokens,tokens}-{limit,remaining,reset}`
//! for the configured limits: `remaining` is exact (floor of the bucket, 0 when negative;
//! the real API rounds token figures to the nearest 1000), `reset` is the RFC 3339 UTC time
//! (whole seconds, rounded up) at which the bucket is full again, and `tokens-*` repeats
//! whichever of input and output has fewer tokens remaining.
//!
//! # Stats
//!
//! [`Stats`] (`GET /mock/stats`, [`MockServer::stats`]) counts `/v1/*` requests by path and
//! status, the 429s of the limits, the highest number of requests in flight (from the
//! request head until the body ended or was dropped), and the usage the clients could read:
//! a frame's usage is added at the moment it is handed to hyper (so a client never reads
//! usage that the stats miss), a JSON answer counts only if its whole body was written, and
//! a stream counts the figures of the events fully written (`message_start`, then replaced
//! field by field by `message_delta` if that event was written; never summed). A client that
//! disconnects early leaves only what was written: hyper reads the end of a keep-alive
//! connection at once and drops the body. The one imprecision: a frame handed to hyper that
//! then fails to reach the socket, because the connection broke between the hand-over and
//! the write, is counted. Over h2, a frame counts when it is handed to the h2 stream.
//!
//! # Server
//!
//! hyper 1 with hyper-util's `auto` builder: HTTP/1.1 with keep-alive, and h2c with prior
//! knowledge, on 127.0.0.1 (ephemeral port by default). Dropping the [`MockServer`] stops it
//! (the listener closes at once; open connections finish in the background);
//! [`MockServer::shutdown`] does the same and waits (at most 10 s).

mod answer;
mod directives;
mod estimate;
mod fault;
mod limits;
pub mod redis_server;
mod server;
mod service;
mod stats;

pub use answer::MAX_TEXT_TOKENS;
pub use estimate::estimate_input_tokens;
pub use fault::{Fault, FaultPlan, FaultPlanError, error_type_for_status};
pub use limits::Limits;
pub use server::{MockServer, MockServerBuilder};
pub use service::MAX_BODY_BYTES;
pub use stats::{Stats, UsageTotals};
