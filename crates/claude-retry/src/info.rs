//! Extensions: the per-request [`Deadline`] a caller may set, and the [`RetryInfo`] the
//! final response carries (attempts, why each retry happened, the waits chosen, and why
//! the layer stopped).

use std::fmt;
use std::time::Duration;

use claude_core::ErrorKind;
use http::StatusCode;
use tokio::time::Instant;

/// A request extension that overrides [`RetryConfig::deadline`](crate::RetryConfig::deadline)
/// for one request: the instant by which the request, all attempts and waits included,
/// must be answered.
///
/// It replaces the configured deadline (it may be longer or shorter); an application that
/// wants "the sooner of the two" computes that itself.
///
/// ```
/// use std::time::Duration;
/// use bytes::Bytes;
/// use claude_retry::Deadline;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), http::Error> {
/// let req = http::Request::post("/v1/messages")
///     .extension(Deadline::after(Duration::from_secs(30)))
///     .body(Bytes::new())?;
/// assert!(req.extensions().get::<Deadline>().is_some());
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Deadline(Instant);

impl Deadline {
    /// A deadline at this instant.
    pub const fn at(instant: Instant) -> Self {
        Self(instant)
    }

    /// A deadline `timeout` from now (far in the future if that overflows).
    pub fn after(timeout: Duration) -> Self {
        Self(after(Instant::now(), timeout))
    }

    /// The instant.
    pub const fn instant(self) -> Instant {
        self.0
    }
}

/// `now + d`, saturating at roughly thirty years from now.
pub(crate) fn after(now: Instant, d: Duration) -> Instant {
    now.checked_add(d)
        .or_else(|| now.checked_add(Duration::from_secs(30 * 365 * 86_400)))
        .unwrap_or(now)
}

/// Why an attempt was retried (or, in [`RetryInfo::gave_up`], the failure that was not).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RetryReason {
    /// An error response: its status and its classification.
    Status {
        /// The HTTP status.
        status: StatusCode,
        /// The kind from the status, `error.type` and `error.details`.
        kind: ErrorKind,
    },
    /// A `200` stream whose first event was `event: error`.
    StreamError {
        /// The kind from the event's `error.type`.
        kind: ErrorKind,
    },
    /// No response: a transport failure (connection, attempt timeout) or an error from an
    /// inner layer.
    Error {
        /// The classified kind.
        kind: ErrorKind,
    },
}

impl RetryReason {
    /// The classified kind.
    pub const fn kind(self) -> ErrorKind {
        match self {
            Self::Status { kind, .. } | Self::StreamError { kind } | Self::Error { kind } => kind,
        }
    }

    /// Where the failure showed: `"status"`, `"stream"` or `"error"` (the `source` label
    /// of the attempts metric).
    pub const fn source(self) -> &'static str {
        match self {
            Self::Status { .. } => "status",
            Self::StreamError { .. } => "stream",
            Self::Error { .. } => "error",
        }
    }
}

impl fmt::Display for RetryReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Status { status, kind } => write!(f, "status {} ({kind})", status.as_u16()),
            Self::StreamError { kind } => write!(f, "first stream event was an error ({kind})"),
            Self::Error { kind } => write!(f, "{kind}"),
        }
    }
}

/// Where a wait came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WaitSource {
    /// The server named it (`retry-after-ms`, then `retry-after`); used as is, no jitter.
    Server,
    /// Exponential backoff with the configured jitter.
    Backoff,
}

/// One retry: the attempt that failed, why, and the wait before the next one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RetryRecord {
    /// The attempt that failed (1-based).
    pub attempt: u32,
    /// Why it was retried.
    pub reason: RetryReason,
    /// The wait chosen before the next attempt.
    pub wait: Duration,
    /// Where that wait came from.
    pub source: WaitSource,
}

/// Why the layer returned a failure instead of retrying it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum GiveUp {
    /// The failure is not retryable (400, 401, 403, 404, 413, the spend cap,
    /// `x-should-retry: false`, an error the stack made itself, ...).
    NotRetryable,
    /// `max_retries` retries were already made.
    MaxRetries,
    /// The shared retry budget is spent.
    BudgetExhausted,
    /// The server asked to wait longer than `max_retry_after`.
    RetryAfterTooLong(Duration),
    /// The wait (the server's, or the backoff) would end past the deadline.
    WaitPastDeadline(Duration),
}

impl fmt::Display for GiveUp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotRetryable => f.write_str("not retryable"),
            Self::MaxRetries => f.write_str("retries exhausted"),
            Self::BudgetExhausted => f.write_str("retry budget exhausted"),
            Self::RetryAfterTooLong(d) => {
                write!(
                    f,
                    "the server asked to wait {d:?}, more than max_retry_after"
                )
            }
            Self::WaitPastDeadline(d) => {
                write!(f, "a wait of {d:?} would pass the request deadline")
            }
        }
    }
}

/// A response extension: what the retry layer did for this request.
///
/// The final response also carries [`claude_core::Attempt`] with the same attempt number.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetryInfo {
    /// Attempts made, the final one included (1 when nothing was retried).
    pub attempts: u32,
    /// One record per retry, in order.
    pub retries: Vec<RetryRecord>,
    /// Set when the response is a failure the layer did not retry, with the reason it
    /// stopped; `None` for a success.
    pub gave_up: Option<GiveUp>,
}

impl RetryInfo {
    /// The waits chosen before each retry, in order.
    pub fn waits(&self) -> impl Iterator<Item = Duration> + '_ {
        self.retries.iter().map(|r| r.wait)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_labels_and_display() {
        let r = RetryReason::Status {
            status: StatusCode::from_u16(529).unwrap(),
            kind: ErrorKind::Overloaded,
        };
        assert_eq!(r.kind(), ErrorKind::Overloaded);
        assert_eq!(r.source(), "status");
        assert_eq!(r.to_string(), "status 529 (OVERLOADED)");
        let r = RetryReason::StreamError {
            kind: ErrorKind::ServerError,
        };
        assert_eq!(r.source(), "stream");
        assert!(r.to_string().contains("SERVER_ERROR"));
        assert_eq!(
            GiveUp::RetryAfterTooLong(Duration::from_secs(90)).to_string(),
            "the server asked to wait 90s, more than max_retry_after"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn deadline_after_saturates() {
        let d = Deadline::after(Duration::MAX);
        assert!(d.instant() > Instant::now() + Duration::from_secs(365 * 86_400));
        let now = Instant::now();
        assert_eq!(
            Deadline::at(now + Duration::from_secs(1)).instant() - now,
            Duration::from_secs(1)
        );
    }
}
