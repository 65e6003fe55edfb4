//! A tower layer that keeps calls to the Claude Messages API within their requests, input
//! tokens and output tokens per minute and their concurrency, queueing what does not fit
//! yet instead of letting the server answer 429.
//!
//! # Why
//!
//! Anthropic limits each organization per model family with token buckets (RPM, ITPM,
//! OTPM) that refill continuously. A burst that exceeds them draws 429s, and clients that
//! retry on their own turn one burst into a storm. This layer holds the same buckets on the
//! client side, reserves what a request may cost before sending it, settles the reservation
//! to the real usage when the answer ends, queues requests fairly (FIFO) while the buckets
//! refill, refuses at once with a local 429 what would wait too long, and follows what the
//! server says (its `anthropic-ratelimit-*-remaining` headers and its 429 `retry-after`).
//!
//! # Example
//!
//! ```
//! use bytes::Bytes;
//! use claude_core::Tenant;
//! use claude_ratelimit::RateLimitLayer;
//! use http_body_util::{BodyExt, Full};
//! use tower::{Layer, Service, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let limits = RateLimitLayer::new()
//!     .requests_per_minute(50)
//!     .input_tokens_per_minute(30_000)
//!     .output_tokens_per_minute(8_000)
//!     .max_concurrent_requests(8);
//!
//! // Any `Service<Request<Bytes>>`; in production, the HTTP client.
//! let upstream = tower::service_fn(|_request: http::Request<Bytes>| async {
//!     http::Response::builder()
//!         .header("content-type", "application/json")
//!         .body(Full::new(Bytes::from_static(
//!             br#"{"type":"message","usage":{"input_tokens":10,"output_tokens":5}}"#,
//!         )))
//! });
//! let mut service = limits.layer(upstream);
//!
//! let request = http::Request::post("/v1/messages").body(Bytes::from_static(
//!     br#"{"model":"claude-sonnet-4-5","max_tokens":1024,"messages":[{"role":"user","content":"Hi"}]}"#,
//! ))?;
//! let response = service.ready().await?.call(request).await?;
//! response.into_body().collect().await?; // the reservation settles as the body ends
//!
//! let key = limits
//!     .snapshot(&Tenant::default(), "claude-sonnet-4-5")
//!     .ok_or("no such key")?;
//! assert_eq!(key.in_flight, 0);
//! assert_eq!(key.settled_output_tokens, 5); // 1,024 were reserved, 1,019 refunded
//! # Ok(())
//! # }
//! ```
//!
//! Refusals are [`claude_core::Error`]s boxed as [`BoxError`](claude_core::BoxError):
//! [`ErrorKind::QueueFull`](claude_core::ErrorKind::QueueFull) and
//! [`ErrorKind::QueueTimeout`](claude_core::ErrorKind::QueueTimeout) with a `retry-after`
//! (both render as an Anthropic-shaped 429 `rate_limit_error` whose message says the limit
//! is local), and [`ErrorKind::InvalidRequest`](claude_core::ErrorKind::InvalidRequest) (a
//! 400) for a request whose input estimate exceeds the input bucket, which could never pass.
//!
//! # Design
//!
//! **Keys.** Buckets are kept per key: global, per [`Tenant`](claude_core::Tenant), per model
//! family, or per both ([`KeyScope`], default both). Opus 4.x and Sonnet 4.x each share one
//! family, as Anthropic pools them.
//!
//! **One state per key, one short lock.** A key holds its three buckets, its in-flight
//! count, its pause and its FIFO queue in one small struct behind a `std::sync::Mutex` that
//! is never held across an await; keys live in a map of 16 shards, each a
//! `Mutex<HashMap<Key, Arc<KeyState>>>`, locked only to find or create a key. Admission is
//! all-or-nothing across the buckets and the concurrency count, under that one lock. This
//! is preferred to `governor`, which has no refund (settlement needs one), no
//! all-or-nothing admission across several limiters (checking RPM then ITPM then OTPM
//! separately leaks capacity when a later check fails), no FIFO queue, and whose waits use
//! real time (`futures-timer`, quanta) where ours use tokio time, so paused-clock tests
//! drive refill and queue waits deterministically.
//!
//! **Buckets.** Capacity is the per-minute limit and refill is continuous, at limit / 60 per
//! second, as Anthropic's: a burst may spend a full minute's worth at once, then requests
//! pass as the buckets refill. Levels are integers in thousandths of a token, refilled from
//! elapsed nanoseconds with the remainder carried, so accounting is exact; a bucket may go
//! below zero when an answer used more than it reserved.
//!
//! **Reserve, then settle.** A Messages request reserves one request, its input estimate
//! ([`RequestMeta::input_tokens_estimate`](claude_core::RequestMeta), the formula
//! claude-mock uses too), and `ceil(max_tokens × output_reservation_ratio)` output tokens
//! (default ratio 1.0, "strict"; capped at the output bucket's capacity, since the 2026 API
//! no longer counts `max_tokens` and a large one must not make a request impossible). When
//! the response body ends, fails or is dropped, the reservation is settled to the usage the
//! body carried ([`claude_core::observe_usage`]: the body is scanned once for every layer):
//! what was not used is refunded, what went over is charged. Input counts as Anthropic
//! counts ITPM: `input_tokens + cache_creation_input_tokens`, plus cache reads on Haiku 3
//! and 3.5. A stream that failed or was dropped is settled to what was seen, never below;
//! a JSON answer that broke before its usage keeps its reservation (the server had produced
//! all of it); a 4xx (429 included) refunds the tokens; a 5xx refunds the output; a transport
//! error keeps everything. The request itself always stays counted (whether the server
//! counts refused requests toward RPM is not documented). An invalid request (Anthropic will
//! answer 400) is passed on, charged one request and one input token. Calls to other
//! endpoints (`count_tokens`, models, batches) pass through untouched.
//!
//! **Concurrency.** A request holds its slot from admission until its response body ends
//! or is dropped: a stream occupies the upstream until its last event.
//!
//! **The queue.** Strict FIFO per key: a request passes at once only if nobody waits and
//! everything allows it; otherwise it queues, and only the head of the queue can be
//! admitted, so a large request is never starved by small ones (and small ones wait behind
//! it). When a request arrives, its wait is estimated from the deficit of the queue ahead
//! plus its own demand over the refill rates (and the pause); if the queue already holds
//! `max_queue` requests, or the estimate exceeds `max_wait`, it is refused at once with the
//! estimate as `retry-after`. The estimate ignores the wait for a concurrency slot (it
//! depends on answer durations), so a waiter that is still queued at its deadline is
//! refused then. The head sleeps until the moment its deficit will have refilled, and is
//! woken early by settlements.
//!
//! **Following the server** (`follow_server`, default on). Every response's
//! `anthropic-ratelimit-{requests,input-tokens,output-tokens}-remaining` lowers the matching
//! bucket to that figure if it holds more; the bucket is never raised. The figure already
//! includes the server's charge for the requests it has seen, so refunds of requests
//! admitted before that response may raise the bucket only by the distance that was
//! between the bucket and the figure (none after a correction that lowered it); requests
//! still travelling to the server when it computed the figure are assumed to be in it (the
//! next response corrects any difference). The `tokens-*` headers are not used: they repeat
//! "the most restrictive" limit, whichever it is. Missing headers (Microsoft Foundry) mean
//! no correction. A 429 with `retry-after` pauses the key until then (at most `max_pause`):
//! queued and new requests wait together instead of stampeding; a 429 without one pauses it
//! until the earliest `-reset` of a limit reported exhausted, measured against the
//! response's `date` header, so client clock skew does not matter. `-reset` is otherwise
//! not used to pace: it is when a bucket is full again, not when the next request fits, and
//! has one-second resolution. The local bucket also keeps a small `safety_margin` unspent
//! so that the jitter between admission here and counting there cannot make the server
//! come up short.
//!
//! **Bounded memory.** A key is idle when nobody waits on it, nothing is in flight, it is
//! not paused and its buckets are full again: a fresh key would behave the same, so idle
//! keys are dropped. Every 64th call sweeps one shard (no background task); a key lives
//! only as long as its buckets take to refill after its last request, so a gateway with
//! 100,000 tenants holds the recently active ones only. [`RateLimitLayer::evict_idle`]
//! sweeps everything at once.
//!
//! **Further scopes** ([`RateLimitConfig::scopes`], [`RateLimitLayer::scope_limits`]): limits
//! over other scopes than the key's, for example 50 RPM per tenant and model family and, at
//! once, the organisation's 4,000 RPM per model family. A request the key's buckets admitted
//! (after its turn in the key's queue) must also be granted by every further scope's
//! buckets, all at once or not at all; until they hold it, it waits (keeping its admission
//! and concurrency slot) as long as `max_wait` allows, and is then refused with
//! `QueueTimeout`. Waiters of different keys are not ordered among themselves at a further
//! scope. Settled like the key's buckets.
//!
//! **Several instances** (feature `redis`): with `RateLimitLayer::redis`, a locally
//! admitted request must also obtain an atomic grant from buckets shared in Redis (its
//! key's and every further scope's, in one script), so several gateways hold one limit
//! together; see the `redis` module.
//!
//! **Metrics**: see [`metrics`] (queue depth, wait time, rejections by
//! reason, tokens available; never labelled by tenant).
//!
//! # Panics
//!
//! Calls must run inside a tokio runtime with the time driver enabled (queued requests
//! sleep on tokio timers), as every tower service stack on tokio does.
//!
//! # Cancel safety
//!
//! Dropping a [`ResponseFuture`](future::ResponseFuture) while its request waits removes
//! the request from the queue and wakes the next one; nothing was charged. Dropping it after
//! the request was sent keeps the reservation charged (the server may have counted it) and
//! releases the concurrency slot. Dropping the response body settles to the usage seen.

mod bucket;
mod config;
pub mod future;
mod grant;
mod layer;
mod limiter;
pub mod metrics;
mod queue;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub mod redis;
#[cfg(test)]
mod tests;

pub use config::{ConfigError, KeyScope, RateLimitConfig, ScopeLimits};
pub use layer::{RateLimit, RateLimitLayer};
pub use limiter::{BucketSnapshot, KeySnapshot};
pub use metrics::describe_metrics;

#[cfg(feature = "redis")]
pub use crate::redis::{FailurePolicy, RedisLimits};
