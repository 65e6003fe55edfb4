//! Exact cost of every Claude Messages API request, in integer nano-dollars, with spend
//! reports and daily/monthly budgets, as a tower layer.
//!
//! # Why
//!
//! Cost accounting is where LLM gateways are most often wrong for Anthropic: usage is split
//! between `message_start` (input and cache counts) and cumulative `message_delta` events
//! (summing them, or dropping the cache counts, over- or under-bills), cache writes cost
//! 1.25× or 2× and reads 0.1×, batch halves everything, Sonnet's long context doubles the
//! input price above 200K tokens, web searches are billed per call, and floats drift. This
//! crate prices every component from a bundled, dated price table with exact integer
//! arithmetic, reads usage through the workspace's single body scan
//! ([`claude_core::observe_usage`]) so streams cut or dropped are still billed, never gives
//! an unknown model another model's price, and holds a reservation for every request in
//! flight so that concurrent requests cannot run past a hard cap.
//!
//! - [`PriceTable`] ([`prices`]): the bundled prices and user overrides; [`Usd`] and
//!   [`TokenPrice`] ([`money`]): integer money.
//! - [`CostLayer`] / [`Cost`] ([`layer`]): records the final usage of every request,
//!   attributed to [`Tenant`](claude_core::Tenant), model and [`CostTags`]; cache hits are
//!   savings.
//! - [`CostTracker`]: the shared ledger; [`CostReport`] ([`report`]) as JSON or a table.
//! - [`BudgetConfig`] ([`budget`]): daily and monthly UTC caps, global and per tenant,
//!   alerts at 50/80/100% through an [`AlertHandler`], refusal with `BudgetExceeded`.
//! - [`metrics`](mod@metrics): counters of tokens, money, requests and savings.
//! - `redis` (feature): budgets shared by several trackers through Redis, with atomic
//!   admission and alerts that fire once across instances (`CostTrackerBuilder::redis`).
//!
//! # Example
//!
//! ```
//! use bytes::Bytes;
//! use claude_cost::{Budget, BudgetConfig, CostLayer, CostTracker, Usd};
//! use http_body_util::{BodyExt, Full};
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let tracker = CostTracker::builder()
//!     .budgets(BudgetConfig::new().global(Budget::new().daily(Usd::from_dollars(100))))
//!     .build();
//!
//! // Any service of `Request<Bytes>` (a hyper client, the rest of the stack); here a
//! // stand-in for the Messages API.
//! let api = tower::service_fn(|_req: http::Request<Bytes>| async {
//!     let answer = r#"{"type":"message","model":"claude-opus-4-5-20251101","content":[],
//!                      "usage":{"input_tokens":1000,"output_tokens":200}}"#;
//!     Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from(answer))))
//! });
//! let svc = ServiceBuilder::new()
//!     .layer(CostLayer::new(tracker.clone()))
//!     .service(api);
//!
//! let req = http::Request::post("https://api.anthropic.com/v1/messages").body(Bytes::from(
//!     r#"{"model":"claude-opus-4-5","max_tokens":1024,"messages":[{"role":"user","content":"Hi"}]}"#,
//! ))?;
//! let resp = svc.oneshot(req).await?;
//! resp.into_body().collect().await?; // the cost is recorded when the body ends
//!
//! // 1,000 input tokens × $5/MTok + 200 output tokens × $25/MTok = $0.01
//! assert_eq!(tracker.total().cost, Usd::from_nanos(10_000_000));
//! println!("{}", tracker.report()); // a table; `report().to_json()` for machines
//! # Ok(())
//! # }
//! ```

pub mod budget;
pub mod layer;
pub mod metrics;
pub mod money;
pub mod prices;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub mod redis;
pub mod report;
mod tags;
mod tracker;
mod utc;

pub use budget::{
    AlertHandler, AlertKind, Budget, BudgetAlert, BudgetConfig, BudgetScope, BudgetStatus,
    BudgetWindow, LogAlerts,
};
pub use layer::{Cost, CostLayer, ResponseBody, ResponseFuture};
pub use money::{TokenPrice, Usd};
pub use prices::{CostBreakdown, ModelPrice, PriceTable, PriceTableError, Rates};
pub use report::{CostReport, Totals};
pub use tags::CostTags;
pub use tracker::{Clock, CostConfig, CostRecord, CostTracker, CostTrackerBuilder};

#[cfg(feature = "redis")]
pub use crate::redis::{FailurePolicy, RedisBudgets};
