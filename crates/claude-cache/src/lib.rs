//! A response cache for the Claude Messages API, as tower middleware: repeated requests are
//! answered from memory, per tenant, with streams stored as they pass and replayed on hits.
//!
//! # Why
//!
//! Identical Messages requests (evaluation suites, retries of a whole pipeline, many users
//! asking a service the same thing) cost the same tokens every time. Caching them is only
//! safe if the cache is *correct*: a key that covers everything that decides the answer and
//! nothing secret, tenants that never see each other's answers, no partial or errored
//! stream ever stored, no added latency to a streamed first byte, bounded memory, and no
//! stampede when a hundred identical requests miss together. Peers got each of these wrong
//! at least once (raw-body 64-bit keys without tenant scope, misses buffered whole before
//! the first byte, zero usage on hits); this crate is built around them.
//!
//! # Example
//!
//! ```
//! use std::convert::Infallible;
//! use std::time::Duration;
//!
//! use bytes::Bytes;
//! use claude_cache::{CacheLayer, CacheStatus};
//! use claude_core::CacheHit;
//! use http_body_util::{BodyExt, Full};
//! use tower::{Service, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! // Any service of `Request<Bytes>`: a hyper client in production.
//! let upstream = tower::service_fn(|_req: http::Request<Bytes>| async {
//!     let mut resp = http::Response::new(Full::new(Bytes::from_static(
//!         br#"{"type":"message","content":[],"usage":{"input_tokens":9,"output_tokens":4}}"#,
//!     )));
//!     resp.headers_mut().insert("content-type", "application/json".parse()?);
//!     Ok::<_, claude_core::BoxError>(resp)
//! });
//! let layer = CacheLayer::default().ttl(Duration::from_secs(600));
//! let mut svc = ServiceBuilder::new().layer(layer).service(upstream);
//!
//! let request = || {
//!     http::Request::post("https://api.anthropic.com/v1/messages")
//!         .header("anthropic-version", "2023-06-01")
//!         .body(Bytes::from_static(
//!             br#"{"model":"claude-sonnet-4-5","max_tokens":64,"messages":[{"role":"user","content":"hi"}]}"#,
//!         ))
//! };
//!
//! let first = svc.ready().await?.call(request()?).await?;
//! assert_eq!(first.headers()["x-claude-cache"], "MISS");
//! let original = first.into_body().collect().await?.to_bytes(); // stored as it ends
//!
//! let second = svc.ready().await?.call(request()?).await?;
//! assert_eq!(second.extensions().get(), Some(&CacheStatus::Hit));
//! let hit = second.extensions().get::<CacheHit>().cloned();
//! assert_eq!(hit.map(|h| h.usage.output_tokens), Some(4)); // saved, not spent
//! assert_eq!(second.into_body().collect().await?.to_bytes(), original);
//! # Ok(())
//! # }
//! ```
//!
//! # What is cached
//!
//! Only `POST /v1/messages` and `POST /v1/messages/count_tokens` with a valid body; only
//! 2xx answers without a `content-encoding`; only answers whose body **ended normally and
//! completed** ([`UsageReport::is_complete_success`]: for a stream, `message_stop` seen and
//! no `event: error`; for JSON, a whole document); only answers no larger than
//! [`CacheConfig::max_entry_bytes`]. Everything else passes through untouched. Requests
//! that are not considered at all (other endpoints and methods, `no-store`, invalid bodies)
//! are marked `x-claude-cache: BYPASS`.
//!
//! The key is described in [`key`]: a BLAKE3 hash of the tenant scope, the endpoint, the
//! query, `anthropic-version`, the normalised `anthropic-beta` list and the canonical JSON of
//! the body without `metadata`. `stream` is part of the body, so a streaming and a
//! non-streaming request never share an entry.
//!
//! # Request `cache-control`
//!
//! - `no-store`: bypass (neither read nor write).
//! - `no-cache`: do not answer from the cache, go upstream (never following a flight
//!   already on its way: this request wants an answer fetched after it was sent), and store
//!   the fresh answer, replacing the old one.
//! - `max-age=N`: accept a stored answer only if it is at most N seconds old (as RFC 9111
//!   says for requests), and store a fresh answer for `min(N, ttl)` seconds. `max-age=0`
//!   stores nothing.
//!
//! # Responses
//!
//! Every response carries `x-claude-cache: HIT`, `MISS` or `BYPASS` and the same
//! [`CacheStatus`] as a response extension. A hit replays the stored status, the
//! `content-type` and `request-id` of the original answer (the `request-id` names the
//! upstream request that produced the body), `age` in whole seconds, and the body in its
//! original frames: a streaming request gets the SSE stream byte for byte, a non-streaming
//! one the JSON. A hit carries [`claude_core::CacheHit`] (the original usage and model, and
//! the age) and a completed [`claude_core::UsageHandle`] with the original report, so
//! claude-cost records the answer as saved money and every usage subscriber hears at once.
//!
//! # Streams: tee on the way out
//!
//! On a miss the body is wrapped (after [`claude_core::observe_usage`], so the usage scan is
//! shared with the other layers): each frame goes to the caller the moment it arrives and a
//! refcounted clone of it is kept, up to the size cap (past it the clones are dropped at
//! once). When the body ends and the usage report says it completed, the answer is stored
//! there and then, before the last frame is handed on: the frames are copied into one
//! exactly sized buffer (see below; about a microsecond for a small answer) and the entry
//! goes to the waiting followers. The moka insert then runs on the cache's store thread
//! ([`CacheConfig::store_thread`], on by default): the request hands the entry over through
//! a bounded queue and goes on, and its flight stays in the in-flight map, serving the
//! entry to any request on the key, until the entry is in moka (about a millisecond: the
//! thread gathers what arrives in a millisecond, stores it, and runs moka's maintenance
//! every 16 stores or 50 ms). moka does its bookkeeping (admission, eviction, expiry) in
//! batches inside cache calls; on the request's thread that is a stall of tens to hundreds
//! of microseconds now and then, for that request and for every other one on the same
//! runtime worker. A request that went upstream alone (no flight) stores its answer itself,
//! as does a leader when the queue is full or there is no thread; a handed-over answer never
//! replaces a newer one stored that way. Without the thread, a task is spawned only for work
//! that has to wait: an insert that moka cannot finish at once (its write queue is full)
//! and the write to the Redis second level. (A task per miss used to do the whole store; on
//! a multi-threaded runtime it woke another worker for every miss, which cost more than the
//! store itself.) With no tokio runtime, such an insert is abandoned and counted as not
//! stored (`no_runtime`).
//!
//! Why copy once at store time instead of keeping the frames: a `Bytes` frame from hyper is
//! a slice of the connection's read buffer, and holding it keeps the whole buffer (8 KiB or
//! more) alive. Kept as they are, small answers would pin memory the weigher cannot see and
//! the byte bound would be fiction. Hits replay slices of the stored buffer with no copy.
//!
//! # Single flight
//!
//! Concurrent identical misses go upstream once: the first becomes the leader, the others
//! wait for it. When the leader's answer is stored they are
//! served it as hits. For a stream that means a follower's first byte waits for the
//! leader's whole stream: a follower trades time-to-first-byte for not paying again. When
//! the leader fails, gets an answer that cannot be stored, or its caller drops the future or
//! the body, the followers are released at once and each goes upstream by itself (no new
//! leader is elected among them: after a failure the cache does not try to protect the
//! upstream from a second burst). This is our own in-flight map rather than moka's
//! `get_with`, whose waiters stay blocked while an initialising future is neither polled nor
//! dropped (moka#240). Every path removes the flight from the map through a drop guard.
//!
//! # Memory bound
//!
//! [`CacheConfig::max_bytes`] bounds the sum of entry weights: body bytes plus replayed
//! header bytes plus 4 bytes per frame of the replay index plus a fixed 1 KiB per entry for
//! the entry's own structures (an estimate from a memory soak of small answers), saturated to
//! `u32`. Nothing stored points into a network buffer: bodies and header values are copied
//! once when stored, so the weight is what the entry really holds. Entries live
//! for the configured TTL (per entry, through moka's `Expiry`, so `max-age` can shorten it).
//! moka evicts by TinyLFU past the bound; eviction runs on the store thread, or during cache
//! operations without it (or in [`CacheHandle::run_pending_tasks`]).
//!
//! # Several instances
//!
//! With the `redis` feature, `CacheLayer::redis` adds a shared second level in Redis
//! under the local cache, so an answer stored by one gateway is a hit on the others; a
//! Redis failure is a miss, never an error (see the `redis` module).
//!
//! # Metrics
//!
//! Names are in [`metric_names`]; [`describe_metrics`] registers their descriptions.
//!
//! | Metric | Kind | Labels |
//! |---|---|---|
//! | `claude_cache_hits_total` | counter | |
//! | `claude_cache_misses_total` | counter | |
//! | `claude_cache_bypasses_total` | counter | `reason`: `method`, `endpoint`, `no_store`, `invalid_body` |
//! | `claude_cache_stored_total` | counter | |
//! | `claude_cache_not_stored_total` | counter | `reason`: `status`, `encoding`, `too_large`, `zero_lifetime`, `incomplete`, `no_runtime` |
//! | `claude_cache_evictions_total` | counter | `cause`: `size`, `expired` |
//! | `claude_cache_bytes` | gauge | |
//! | `claude_cache_redis_hits_total` | counter | (feature `redis`) |
//! | `claude_cache_redis_stored_total` | counter | (feature `redis`) |
//! | `claude_cache_redis_errors_total` | counter | `op`: `get`, `set`, `decode` (feature `redis`) |
//!
//! [`UsageReport::is_complete_success`]: claude_core::UsageReport::is_complete_success
#![cfg_attr(docsrs, feature(doc_cfg))]

mod body;
mod config;
mod directives;
mod entry;
mod flight;
pub mod future;
pub mod key;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub mod redis;
mod service;
mod store;

pub use body::ResponseBody;
pub use config::{CacheConfig, CacheScope, MAX_TTL};
pub use service::{BypassReason, Cache, CacheLayer, CacheStatus};
pub use store::CacheHandle;

#[cfg(feature = "redis")]
pub use crate::redis::RedisCache;

/// The names of the metrics this crate records (see the [crate docs](crate#metrics)).
pub mod metric_names {
    /// Counter: requests answered from the cache.
    pub const HITS: &str = "claude_cache_hits_total";
    /// Counter: cacheable requests that went upstream.
    pub const MISSES: &str = "claude_cache_misses_total";
    /// Counter, label `reason`: requests the cache did not consider.
    pub const BYPASSES: &str = "claude_cache_bypasses_total";
    /// Counter: answers inserted into the cache.
    pub const STORED: &str = "claude_cache_stored_total";
    /// Counter, label `reason`: misses whose answer was not stored.
    pub const NOT_STORED: &str = "claude_cache_not_stored_total";
    /// Counter, label `cause` (`size`, `expired`): entries evicted.
    pub const EVICTIONS: &str = "claude_cache_evictions_total";
    /// Gauge: bytes held by stored entries.
    pub const BYTES: &str = "claude_cache_bytes";
    /// Counter: local misses answered from the Redis second level (feature `redis`).
    pub const REDIS_HITS: &str = "claude_cache_redis_hits_total";
    /// Counter: answers written to the Redis second level (feature `redis`).
    pub const REDIS_STORED: &str = "claude_cache_redis_stored_total";
    /// Counter, label `op` (`get`, `set`, `decode`): failed Redis calls, passed through
    /// (feature `redis`).
    pub const REDIS_ERRORS: &str = "claude_cache_redis_errors_total";
}

/// Registers the descriptions of this crate's metrics with the installed recorder.
pub fn describe_metrics() {
    use metrics::{Unit, describe_counter, describe_gauge};
    describe_counter!(
        metric_names::HITS,
        "Requests answered from the response cache."
    );
    describe_counter!(
        metric_names::MISSES,
        "Cacheable requests that went upstream."
    );
    describe_counter!(
        metric_names::BYPASSES,
        "Requests the response cache did not consider, by reason."
    );
    describe_counter!(
        metric_names::STORED,
        "Answers stored in the response cache."
    );
    describe_counter!(
        metric_names::NOT_STORED,
        "Answers of cache misses that were not stored, by reason."
    );
    describe_counter!(
        metric_names::EVICTIONS,
        "Entries evicted from the response cache, by cause."
    );
    describe_counter!(
        metric_names::REDIS_HITS,
        "Local cache misses answered from the Redis second level."
    );
    describe_counter!(
        metric_names::REDIS_STORED,
        "Answers written to the Redis second level."
    );
    describe_counter!(
        metric_names::REDIS_ERRORS,
        "Failed calls to the Redis second level (passed through), by operation."
    );
    describe_gauge!(
        metric_names::BYTES,
        Unit::Bytes,
        "Bytes held by the response cache."
    );
}
