//! The claude-tower layers assembled in one documented order, around any HTTP service, and
//! [`HttpClient`]: a pooled hyper-util client over rustls to put at the bottom.
//!
//! Building the stack yourself means getting the order right (a cache hit must not touch the
//! limiter; every retry attempt must pass the limiter; a 401 refresh must happen below the
//! retry layer). This crate does it once, with a test per ordering promise.
//!
//! # Example
//!
//! ```no_run
//! use claude_stack::{ClientConfig, HttpClient};
//! use tower::ServiceExt;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), claude_core::BoxError> {
//! let client = HttpClient::new(&ClientConfig::default())?; // https://api.anthropic.com
//! let req = http::Request::post("/v1/messages")
//!     .header("x-api-key", "sk-ant-...")
//!     .header("content-type", "application/json")
//!     .body(bytes::Bytes::from_static(
//!         br#"{"model":"claude-sonnet-4-5","max_tokens":64,"messages":[{"role":"user","content":"hi"}]}"#,
//!     ))?;
//! let resp = client.oneshot(req).await?;
//! println!("{}", resp.status());
//! # Ok(())
//! # }
//! ```
//!
//! # Metrics
//!
//! The layers record through the `metrics` facade, so whatever recorder the process has
//! gets them. Where that is one global recorder installed before the first request (as in
//! claude-gateway), two switches save a recorder lookup per metric and request:
//! [`claude_core::metric::keep_metric_handles`] for the layers' fixed metrics, and claude-cost's
//! `reuse_metric_handles` (in [`StackConfig`]'s cost settings) for its labelled counters. Both
//! are off by default, because a kept handle stays with the recorder it was made with.
#![cfg_attr(docsrs, feature(doc_cfg))]

mod claude_client;
mod client;
mod erased;
mod observe;
pub mod shared;
mod stack;
mod toggle;

pub use claude_client::ClaudeClient;
pub use client::{ClientConfig, HttpClient, TimeoutBody};
pub use erased::StackFuture;
pub use observe::{OVERHEAD_SECONDS, StackTimings};
pub use shared::{RedisOnFailure, RedisUrl};
pub use stack::{ClaudeStack, StackBody, StackConfig, StackService};
pub use toggle::Toggle;
