//! The shared vocabulary of claude-tower: errors and their classification, request metadata,
//! usage and the usage scanner, header names and body adapters.
//!
//! Every layer of the workspace (retry, rate limit, cache, cost, secrets) speaks these types,
//! so that a failure is classified once, a request body is parsed once, and a response body
//! is scanned for usage once, however many layers care.
//!
//! - [`Error`] / [`ErrorKind`]: what the stack itself produces, with stable codes,
//!   retryability and an Anthropic-shaped [`Error::into_response`].
//! - [`classify`]: the one classifier for responses and boxed errors.
//! - [`headers`]: header names and parsers (`retry-after`, `retry-after-ms`,
//!   `anthropic-ratelimit-*`, RFC 3339).
//! - [`RequestMeta`] and [`Tenant`]: what a request is about and who sends it.
//! - [`Usage`], [`UsageScanner`], [`observe_usage`]: usage from JSON and SSE bodies;
//!   [`FirstEvent`]: whether a stream failed at its first event.
//! - [`collect_body`] and [`into_full`]: the body adapters at the edges.
//! - `redis` (feature `redis`): the Redis connection, timeouts and failure policy that the
//!   shared cache, rate limits and budgets have in common.
//!
//! # Example
//!
//! ```
//! use bytes::Bytes;
//! use claude_core::{observe_usage, RequestMeta, Tenant};
//! use http_body_util::{BodyExt, Full};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut req = http::Request::post("/v1/messages")
//!     .extension(Tenant::new("team-a"))
//!     .body(Bytes::from_static(
//!         br#"{"model":"claude-sonnet-4-5","max_tokens":64,"messages":[{"role":"user","content":"hi"}]}"#,
//!     ))?;
//! let meta = RequestMeta::get_or_parse(&mut req); // parsed once, stored in extensions
//! assert_eq!(meta.max_tokens, Some(64));
//! assert_eq!(meta.model_family(), "sonnet-4");
//!
//! let resp = http::Response::builder()
//!     .header("content-type", "application/json")
//!     .body(Full::new(Bytes::from_static(
//!         br#"{"type":"message","content":[],"usage":{"input_tokens":9,"output_tokens":4}}"#,
//!     )))?;
//! let (resp, usage) = observe_usage(resp);
//! usage.on_complete(|report| println!("used {} output tokens", report.usage.output_tokens));
//! let _body = resp.into_body().collect().await?; // the report is published as the body ends
//! assert_eq!(usage.get().map(|r| r.usage.output_tokens), Some(4));
//! # Ok(())
//! # }
//! ```
#![cfg_attr(docsrs, feature(doc_cfg))]

mod body;
pub mod classify;
pub mod config;
mod error;
pub mod headers;
mod meta;
pub mod metric;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub mod redis;
pub mod scan;
mod skim;
mod usage;

pub use body::{FullBodyService, UsageBody, UsageHandle, collect_body, into_full, observe_usage};
pub use classify::{Classification, classify_error, classify_response, classify_stream_error};
pub use error::{BoxError, Error, ErrorKind, Origin};
pub use meta::{
    Attempt, CacheHit, Endpoint, RequestMeta, Tenant, Validity, estimate_tokens_from_bytes,
    model_family,
};
pub use scan::{ApiError, BodyEnd, BodyFormat, FirstEvent, UsageReport, UsageScanner};
pub use usage::{CacheCreation, ServerToolUse, ServiceTier, Usage};
