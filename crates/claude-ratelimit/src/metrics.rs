//! The metrics the layer records, through the [`metrics`] facade.
//!
//! | Name | Type | Labels | Meaning |
//! |---|---|---|---|
//! | `claude_ratelimit_queue_depth` | gauge | none | requests waiting in the queues of all keys |
//! | `claude_ratelimit_wait_seconds` | histogram | none | time from the call to admission, for every admitted request (0 for those admitted at once) |
//! | `claude_ratelimit_rejections_total` | counter | `reason` | requests the layer refused: `queue_full`, `queue_timeout`, `never_fits` |
//! | `claude_ratelimit_tokens_available` | gauge | `kind`, `key` | the level of a bucket (`requests`, `input_tokens`, `output_tokens`), after each admission, settlement and server correction |
//!
//! # Cardinality
//!
//! Tenant ids are unbounded (a gateway may serve 100,000 of them), so no metric is labelled
//! by tenant. `tokens_available` is recorded only when the [`KeyScope`](crate::KeyScope)
//! does not include the tenant: with `Global` its `key` label is `all`; with `ModelFamily`
//! it is the model family, and since the model string comes from the client, only the
//! first 32 distinct families get their own label, the rest share `other`. With a tenant
//! scope, read one key's buckets with
//! [`RateLimitLayer::snapshot`](crate::RateLimitLayer::snapshot).

use ::metrics::{Unit, describe_counter, describe_gauge, describe_histogram};

pub(crate) use ::metrics::SharedString;

pub(crate) const QUEUE_DEPTH: &str = "claude_ratelimit_queue_depth";
pub(crate) const WAIT_SECONDS: &str = "claude_ratelimit_wait_seconds";
pub(crate) const REJECTIONS: &str = "claude_ratelimit_rejections_total";
pub(crate) const TOKENS_AVAILABLE: &str = "claude_ratelimit_tokens_available";

/// Registers the descriptions and units of the layer's metrics with the installed recorder.
/// Optional: the metrics are recorded either way.
pub fn describe_metrics() {
    describe_gauge!(
        QUEUE_DEPTH,
        Unit::Count,
        "Requests waiting in the local rate-limit queues"
    );
    describe_histogram!(
        WAIT_SECONDS,
        Unit::Seconds,
        "Time a request waited for local rate-limit admission"
    );
    describe_counter!(
        REJECTIONS,
        Unit::Count,
        "Requests refused by the local rate limiter, by reason"
    );
    describe_gauge!(
        TOKENS_AVAILABLE,
        Unit::Count,
        "Level of a local rate-limit bucket, by kind"
    );
}

pub(crate) fn queue_depth(delta: f64) {
    ::metrics::gauge!(QUEUE_DEPTH).increment(delta);
}

pub(crate) fn waited(seconds: f64) {
    static WAITED: claude_core::metric::Kept<::metrics::Histogram> =
        claude_core::metric::Kept::new();
    WAITED.with(
        || ::metrics::histogram!(WAIT_SECONDS),
        |h| h.record(seconds),
    );
}

pub(crate) fn rejected(reason: &'static str) {
    ::metrics::counter!(REJECTIONS, "reason" => reason).increment(1);
}

pub(crate) fn available(kind: &'static str, key: &SharedString, level: f64) {
    ::metrics::gauge!(TOKENS_AVAILABLE, "kind" => kind, "key" => key.clone()).set(level);
}
