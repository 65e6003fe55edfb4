//! Server-side rate limits: token buckets with continuous refill, one set per server.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, SystemTime};

use http::HeaderValue;
use http::header::HeaderName;
use tokio::time::Instant;

/// Per-minute limits enforced by the mock, like the API's organization limits. `None` (the
/// default for all three) means unlimited, and then no header of that limit is sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// Requests per minute (RPM). Default `None`.
    pub requests_per_minute: Option<u64>,
    /// Input tokens per minute (ITPM), counting `input_tokens + cache_creation_input_tokens`
    /// (cache reads do not count). Default `None`.
    pub input_tokens_per_minute: Option<u64>,
    /// Output tokens per minute (OTPM). Default `None`.
    pub output_tokens_per_minute: Option<u64>,
}

impl Limits {
    fn any(&self) -> bool {
        self.requests_per_minute.is_some()
            || self.input_tokens_per_minute.is_some()
            || self.output_tokens_per_minute.is_some()
    }
}

/// A bucket of capacity `limit` that refills at `limit / 60` per second.
#[derive(Debug)]
struct Bucket {
    limit: u64,
    level: f64,
    updated: Instant,
}

impl Bucket {
    fn new(limit: u64, now: Instant) -> Self {
        Self {
            limit,
            level: limit as f64,
            updated: now,
        }
    }

    fn per_second(&self) -> f64 {
        self.limit as f64 / 60.0
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.updated = now;
        self.level = (self.level + elapsed * self.per_second()).min(self.limit as f64);
    }

    /// Seconds until the level reaches `need` (0 when it already has).
    fn wait_for(&self, need: f64) -> f64 {
        if self.level >= need {
            0.0
        } else if self.limit == 0 {
            60.0
        } else {
            (need - self.level) / self.per_second()
        }
    }

    fn snapshot(&self) -> BucketState {
        BucketState {
            limit: self.limit,
            remaining: if self.level > 0.0 {
                self.level.floor() as u64
            } else {
                0
            },
            full_in: if self.limit == 0 {
                0.0
            } else {
                ((self.limit as f64 - self.level) / self.per_second()).max(0.0)
            },
        }
    }
}

/// One bucket as reported in the headers.
#[derive(Debug, Clone, Copy)]
struct BucketState {
    limit: u64,
    remaining: u64,
    /// Seconds until full.
    full_in: f64,
}

#[derive(Debug, Default)]
struct Buckets {
    limits: Limits,
    requests: Option<Bucket>,
    input: Option<Bucket>,
    output: Option<Bucket>,
}

impl Buckets {
    fn new(limits: Limits, now: Instant) -> Self {
        Self {
            limits,
            requests: limits.requests_per_minute.map(|l| Bucket::new(l, now)),
            input: limits.input_tokens_per_minute.map(|l| Bucket::new(l, now)),
            output: limits.output_tokens_per_minute.map(|l| Bucket::new(l, now)),
        }
    }
}

/// The rate-limit state of a server.
#[derive(Debug)]
pub(crate) struct RateLimiter {
    any: AtomicBool,
    buckets: Mutex<Buckets>,
}

/// The answer of [`RateLimiter::admit`].
#[derive(Debug)]
pub(crate) enum Admission {
    /// No limit configured: no headers.
    Unlimited,
    /// Admitted and charged; the headers to send.
    Admitted(RateHeaders),
    /// Refused: a 429 with this message and `retry-after`.
    Limited {
        message: String,
        retry_after_secs: u64,
        headers: RateHeaders,
    },
}

/// The `anthropic-ratelimit-*` headers of one response.
#[derive(Debug, Default)]
pub(crate) struct RateHeaders {
    requests: Option<BucketState>,
    input: Option<BucketState>,
    output: Option<BucketState>,
}

fn limited_message(limit: u64, what: &str) -> String {
    format!(
        "This request would exceed the rate limit for your organization of {limit} {what} per minute. \
         For details, refer to: https://docs.claude.com/en/api/rate-limits. You can see the response \
         headers for current usage. Please reduce the prompt length or the maximum tokens requested, \
         or try again later."
    )
}

impl RateLimiter {
    pub(crate) fn new(limits: Limits) -> Self {
        Self {
            any: AtomicBool::new(limits.any()),
            buckets: Mutex::new(Buckets::new(limits, Instant::now())),
        }
    }

    /// Replaces the limits; the configured buckets restart full.
    pub(crate) fn set_limits(&self, limits: Limits) {
        let fresh = Buckets::new(limits, Instant::now());
        if let Ok(mut buckets) = self.buckets.lock() {
            *buckets = fresh;
        }
        self.any.store(limits.any(), Relaxed);
    }

    pub(crate) fn limits(&self) -> Limits {
        self.buckets.lock().map(|b| b.limits).unwrap_or_default()
    }

    /// Admits a request that counts `input` tokens toward ITPM and reports `output` tokens,
    /// or refuses it. Never blocks on anything but a short critical section.
    pub(crate) fn admit(&self, input: u64, output: u64) -> Admission {
        if !self.any.load(Relaxed) {
            return Admission::Unlimited;
        }
        let now = Instant::now();
        let Ok(mut guard) = self.buckets.lock() else {
            return Admission::Unlimited;
        };
        let b = &mut *guard;
        for bucket in [&mut b.requests, &mut b.input, &mut b.output]
            .into_iter()
            .flatten()
        {
            bucket.refill(now);
        }

        // The longest wait among the buckets that lack capacity names the limit.
        let mut refusal: Option<(f64, String)> = None;
        let mut refuse = |wait: f64, message: String| {
            if refusal.as_ref().is_none_or(|(w, _)| wait > *w) {
                refusal = Some((wait, message));
            }
        };
        if let Some(r) = &b.requests
            && r.level < 1.0
        {
            refuse(r.wait_for(1.0), limited_message(r.limit, "requests"));
        }
        if let Some(i) = &b.input {
            if input > i.limit {
                // Can never be admitted: the bucket never holds more than the limit.
                refuse(60.0, limited_message(i.limit, "input tokens"));
            } else if i.level < input as f64 {
                refuse(
                    i.wait_for(input as f64),
                    limited_message(i.limit, "input tokens"),
                );
            }
        }
        if let Some(o) = &b.output
            && o.level <= 0.0
        {
            // Strictly positive: wait a hair past the moment the level crosses 0.
            refuse(
                o.wait_for(f64::EPSILON),
                limited_message(o.limit, "output tokens"),
            );
        }

        if refusal.is_none() {
            if let Some(r) = &mut b.requests {
                r.level -= 1.0;
            }
            if let Some(i) = &mut b.input {
                i.level -= input as f64;
            }
            if let Some(o) = &mut b.output {
                o.level -= output as f64;
            }
        }
        let headers = RateHeaders {
            requests: b.requests.as_ref().map(Bucket::snapshot),
            input: b.input.as_ref().map(Bucket::snapshot),
            output: b.output.as_ref().map(Bucket::snapshot),
        };
        drop(guard);

        match refusal {
            None => Admission::Admitted(headers),
            Some((wait, message)) => Admission::Limited {
                message,
                retry_after_secs: (wait.ceil() as u64).max(1),
                headers,
            },
        }
    }
}

/// RFC 3339 (UTC, whole seconds rounded up) of `now + secs`.
fn rfc3339_after(now: SystemTime, secs: f64) -> HeaderValue {
    let secs = if secs.is_finite() {
        secs.clamp(0.0, 1e9)
    } else {
        0.0
    };
    let mut at = now + Duration::from_secs_f64(secs);
    let nanos = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    if nanos > 0 {
        at += Duration::from_nanos(u64::from(1_000_000_000 - nanos));
    }
    let text = humantime::format_rfc3339_seconds(at).to_string();
    HeaderValue::from_str(&text).unwrap_or(HeaderValue::from_static("1970-01-01T00:00:00Z"))
}

fn push_bucket(
    out: &mut Vec<(HeaderName, HeaderValue)>,
    names: [&'static str; 3],
    now: SystemTime,
    state: &BucketState,
) {
    out.push((
        HeaderName::from_static(names[0]),
        HeaderValue::from(state.limit),
    ));
    out.push((
        HeaderName::from_static(names[1]),
        HeaderValue::from(state.remaining),
    ));
    out.push((
        HeaderName::from_static(names[2]),
        rfc3339_after(now, state.full_in),
    ));
}

impl RateHeaders {
    /// The `anthropic-ratelimit-*` headers for the configured limits. `tokens-*` describes
    /// the most restrictive of input and output: the one with fewer tokens remaining.
    pub(crate) fn to_headers(&self) -> Vec<(HeaderName, HeaderValue)> {
        let now = SystemTime::now();
        let mut out = Vec::with_capacity(12);
        if let Some(r) = &self.requests {
            push_bucket(
                &mut out,
                [
                    "anthropic-ratelimit-requests-limit",
                    "anthropic-ratelimit-requests-remaining",
                    "anthropic-ratelimit-requests-reset",
                ],
                now,
                r,
            );
        }
        if let Some(i) = &self.input {
            push_bucket(
                &mut out,
                [
                    "anthropic-ratelimit-input-tokens-limit",
                    "anthropic-ratelimit-input-tokens-remaining",
                    "anthropic-ratelimit-input-tokens-reset",
                ],
                now,
                i,
            );
        }
        if let Some(o) = &self.output {
            push_bucket(
                &mut out,
                [
                    "anthropic-ratelimit-output-tokens-limit",
                    "anthropic-ratelimit-output-tokens-remaining",
                    "anthropic-ratelimit-output-tokens-reset",
                ],
                now,
                o,
            );
        }
        let tokens = match (&self.input, &self.output) {
            (Some(i), Some(o)) => Some(if o.remaining < i.remaining { o } else { i }),
            (Some(one), None) | (None, Some(one)) => Some(one),
            (None, None) => None,
        };
        if let Some(t) = tokens {
            push_bucket(
                &mut out,
                [
                    "anthropic-ratelimit-tokens-limit",
                    "anthropic-ratelimit-tokens-remaining",
                    "anthropic-ratelimit-tokens-reset",
                ],
                now,
                t,
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header<'a>(headers: &'a [(HeaderName, HeaderValue)], name: &str) -> Option<&'a str> {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| v.to_str().ok())
    }

    #[tokio::test(start_paused = true)]
    async fn requests_bucket_refills_continuously() {
        let limiter = RateLimiter::new(Limits {
            requests_per_minute: Some(60),
            ..Limits::default()
        });
        for _ in 0..60 {
            assert!(matches!(limiter.admit(1, 1), Admission::Admitted(_)));
        }
        let Admission::Limited {
            retry_after_secs,
            message,
            headers,
        } = limiter.admit(1, 1)
        else {
            panic!("61st request admitted");
        };
        assert_eq!(retry_after_secs, 1);
        assert!(message.contains("60 requests per minute"), "{message}");
        let h = headers.to_headers();
        assert_eq!(
            header(&h, "anthropic-ratelimit-requests-remaining"),
            Some("0")
        );
        assert_eq!(header(&h, "anthropic-ratelimit-requests-limit"), Some("60"));
        assert!(header(&h, "anthropic-ratelimit-tokens-limit").is_none());
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(matches!(limiter.admit(1, 1), Admission::Admitted(_)));
        assert!(matches!(limiter.admit(1, 1), Admission::Limited { .. }));
    }

    #[tokio::test(start_paused = true)]
    async fn input_and_output_buckets() {
        let limiter = RateLimiter::new(Limits {
            input_tokens_per_minute: Some(600),
            output_tokens_per_minute: Some(120),
            ..Limits::default()
        });
        // Charge 500 input and 200 output (output may go negative).
        let Admission::Admitted(h) = limiter.admit(500, 200) else {
            panic!("first request refused");
        };
        let h = h.to_headers();
        assert_eq!(
            header(&h, "anthropic-ratelimit-input-tokens-remaining"),
            Some("100")
        );
        assert_eq!(
            header(&h, "anthropic-ratelimit-output-tokens-remaining"),
            Some("0")
        );
        // tokens-* is the most restrictive one: output.
        assert_eq!(header(&h, "anthropic-ratelimit-tokens-limit"), Some("120"));
        // Output at -80 refills at 2/s: 40 s until it is positive again; input lacks 100 at
        // 10/s: 10 s. The longest wait names the limit.
        let Admission::Limited {
            retry_after_secs,
            message,
            ..
        } = limiter.admit(200, 1)
        else {
            panic!("admitted over the limits");
        };
        assert_eq!(retry_after_secs, 40);
        assert!(
            message.contains("120 output tokens per minute"),
            "{message}"
        );
        tokio::time::sleep(Duration::from_secs(41)).await;
        assert!(matches!(limiter.admit(200, 1), Admission::Admitted(_)));
        // Larger than the whole limit: never admitted.
        tokio::time::sleep(Duration::from_secs(120)).await;
        let Admission::Limited { message, .. } = limiter.admit(601, 1) else {
            panic!("admitted a request larger than the limit");
        };
        assert!(message.contains("600 input tokens per minute"), "{message}");
    }

    #[test]
    fn reset_is_rfc3339_rounded_up() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_millis(1_764_154_800_250);
        assert_eq!(rfc3339_after(now, 4.5), "2025-11-26T11:00:05Z");
        assert_eq!(rfc3339_after(now, 0.0), "2025-11-26T11:00:01Z");
    }

    #[test]
    fn unlimited_by_default_and_runtime_changes() {
        let limiter = RateLimiter::new(Limits::default());
        assert!(matches!(
            limiter.admit(1_000_000, 1_000_000),
            Admission::Unlimited
        ));
        let rpm = Limits {
            requests_per_minute: Some(1),
            ..Limits::default()
        };
        limiter.set_limits(rpm);
        assert_eq!(limiter.limits(), rpm);
        assert!(matches!(limiter.admit(1, 1), Admission::Admitted(_)));
        assert!(matches!(limiter.admit(1, 1), Admission::Limited { .. }));
        limiter.set_limits(Limits::default());
        assert!(matches!(limiter.admit(1, 1), Admission::Unlimited));
    }
}
