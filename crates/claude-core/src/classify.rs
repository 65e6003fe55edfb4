//! The one classifier: what kind of failure a response or an error is, and whether another
//! attempt may help.
//!
//! No other crate of the workspace classifies: retry, rate limit, secrets and the gateway all
//! call [`classify_response`] and [`classify_error`].
//!
//! Rules for responses, in order (the official SDKs' order, see the API reference §3.1):
//! 1. 2xx/3xx are not failures.
//! 2. The kind comes from `error.type` when the body is an Anthropic JSON envelope and the
//!    type is known; otherwise from the status (unknown types fall back to the status, as the
//!    API docs ask).
//! 3. A 429 whose `error.details.error_code` is `enforced_spend_limit_reached` is
//!    [`ErrorKind::SpendCapReached`]: not retryable (access resumes next month).
//! 4. `x-should-retry: true|false` overrides the retry decision.
//! 5. Otherwise 408, 409, 429, and 5xx (529 included) are retryable, the rest are not.

use std::error::Error as StdError;
use std::time::{Duration, SystemTime};

use http::{HeaderMap, StatusCode};
use serde::Deserialize;

use crate::error::{Error, ErrorKind, Origin};
use crate::headers::{X_SHOULD_RETRY, retry_after};

/// The classification of a failed response or an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Classification {
    /// What went wrong.
    pub kind: ErrorKind,
    /// Where it came from.
    pub origin: Origin,
    /// Whether another attempt may succeed (after `x-should-retry` and the spend-cap rule).
    pub retryable: bool,
    /// The server's requested wait, from `retry-after-ms` or `retry-after`.
    pub retry_after: Option<Duration>,
    /// The `error.type` string from the body, when there was one (known or not).
    pub api_type: Option<String>,
}

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow)]
    error: Option<ErrorBody<'a>>,
}

#[derive(Deserialize)]
struct ErrorBody<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    details: Option<Details<'a>>,
}

#[derive(Deserialize)]
struct Details<'a> {
    #[serde(borrow)]
    error_code: Option<std::borrow::Cow<'a, str>>,
}

/// The `error.type` and `error.details.error_code` of an Anthropic error body, if it is one.
fn parse_error_body(body: &[u8]) -> (Option<String>, Option<String>) {
    match serde_json::from_slice::<Envelope<'_>>(body) {
        Ok(Envelope { error: Some(e) }) => (
            e.kind.map(std::borrow::Cow::into_owned),
            e.details
                .and_then(|d| d.error_code)
                .map(std::borrow::Cow::into_owned),
        ),
        _ => (None, None),
    }
}

/// Classifies a response. Returns `None` for non-failures (status below 400).
///
/// `body` is the response body when the caller has it buffered (error bodies are small);
/// without it the kind comes from the status alone. `now` is used for HTTP-date
/// `retry-after` values.
pub fn classify_response(
    status: StatusCode,
    headers: &HeaderMap,
    body: Option<&[u8]>,
    now: SystemTime,
) -> Option<Classification> {
    let by_status = ErrorKind::from_status(status)?;
    let (api_type, error_code) = body.map(parse_error_body).unwrap_or_default();
    let mut kind = api_type
        .as_deref()
        .and_then(ErrorKind::from_api_type)
        .unwrap_or(by_status);
    // A 529 without a body is still an overload; an `api_error` body on 529 is one too.
    if status.as_u16() == 529 {
        kind = ErrorKind::Overloaded;
    }
    let retry_after = retry_after(headers, now);
    let spend_cap = status == StatusCode::TOO_MANY_REQUESTS
        && error_code.as_deref() == Some("enforced_spend_limit_reached");
    if spend_cap {
        kind = ErrorKind::SpendCapReached;
    }
    let mut retryable = if spend_cap {
        false
    } else {
        matches!(status.as_u16(), 408 | 409 | 429 | 500..=599)
    };
    match headers.get(X_SHOULD_RETRY).map(http::HeaderValue::as_bytes) {
        Some(b"true") => retryable = true,
        Some(b"false") => retryable = false,
        _ => {}
    }
    Some(Classification {
        kind,
        origin: Origin::Upstream,
        retryable,
        retry_after,
        api_type,
    })
}

/// Classifies an in-stream `event: error` by its `error.type` (the stream already had a 200).
///
/// Retryable types are `overloaded_error`, `api_error`, `rate_limit_error` and
/// `timeout_error`; unknown types are not retried.
pub fn classify_stream_error(api_type: &str) -> Classification {
    let kind = ErrorKind::from_api_type(api_type).unwrap_or(ErrorKind::ServerError);
    let retryable = matches!(
        api_type,
        "overloaded_error" | "api_error" | "rate_limit_error" | "timeout_error"
    );
    Classification {
        kind,
        origin: Origin::Upstream,
        retryable,
        retry_after: None,
        api_type: Some(api_type.to_owned()),
    }
}

/// Classifies an error returned by a service (a boxed error, or any error with a source
/// chain).
///
/// - a [`claude_core::Error`](Error): its own kind, origin and retry decision;
/// - `tower::timeout::error::Elapsed` → [`ErrorKind::Timeout`], retryable;
/// - hyper-util's client error with `is_connect()` → [`ErrorKind::Connection`], retryable
///   (nothing was sent);
/// - a `hyper::Error`: a timeout → [`ErrorKind::Timeout`]; any other that is not a misuse
///   by the caller (`is_user`) — incomplete message, closed, canceled, body write abort,
///   HTTP/2 `RST_STREAM`/`GOAWAY` — → [`ErrorKind::Connection`], retryable (like the SDKs,
///   which retry every connection error);
/// - an `std::io::Error` of a connection kind (refused, reset, aborted, broken pipe,
///   unexpected EOF) → Connection; `TimedOut` → Timeout;
/// - anything else → [`ErrorKind::Internal`], not retryable.
pub fn classify_error(err: &(dyn StdError + 'static)) -> Classification {
    let transport = |kind| Classification {
        kind,
        origin: Origin::Transport,
        retryable: true,
        retry_after: None,
        api_type: None,
    };
    let mut cur: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(ours) = e.downcast_ref::<Error>() {
            return Classification {
                kind: ours.kind(),
                origin: ours.origin(),
                retryable: ours.is_retryable(),
                retry_after: ours.retry_after(),
                api_type: None,
            };
        }
        if e.is::<tower::timeout::error::Elapsed>() {
            return transport(ErrorKind::Timeout);
        }
        if let Some(client) = e.downcast_ref::<hyper_util::client::legacy::Error>()
            && client.is_connect()
        {
            return transport(ErrorKind::Connection);
        }
        if let Some(h) = e.downcast_ref::<hyper::Error>() {
            if h.is_timeout() {
                return transport(ErrorKind::Timeout);
            }
            // Anything but a misuse of hyper by the caller is a failed exchange: incomplete
            // message, closed or canceled connection, aborted body write, and HTTP/2 stream
            // or connection errors (RST_STREAM, GOAWAY), which hyper reports without a
            // public predicate. The SDKs retry every such connection error.
            if !h.is_user() {
                return transport(ErrorKind::Connection);
            }
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind as Io;
            match io.kind() {
                Io::TimedOut => return transport(ErrorKind::Timeout),
                Io::ConnectionRefused
                | Io::ConnectionReset
                | Io::ConnectionAborted
                | Io::NotConnected
                | Io::BrokenPipe
                | Io::UnexpectedEof => return transport(ErrorKind::Connection),
                _ => {}
            }
        }
        cur = e.source();
    }
    Classification {
        kind: ErrorKind::Internal,
        origin: Origin::Local,
        retryable: false,
        retry_after: None,
        api_type: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn classify(
        status: u16,
        body: &str,
        headers: &[(&'static str, &'static str)],
    ) -> Classification {
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.insert(*k, HeaderValue::from_static(v));
        }
        classify_response(
            StatusCode::from_u16(status).unwrap(),
            &h,
            Some(body.as_bytes()),
            SystemTime::now(),
        )
        .unwrap()
    }

    #[test]
    fn success_is_not_classified() {
        assert!(
            classify_response(StatusCode::OK, &HeaderMap::new(), None, SystemTime::now()).is_none()
        );
    }

    #[test]
    fn status_table() {
        let cases = [
            (400, ErrorKind::InvalidRequest, false),
            (401, ErrorKind::Authentication, false),
            (403, ErrorKind::Permission, false),
            (404, ErrorKind::NotFound, false),
            (408, ErrorKind::Timeout, true),
            (409, ErrorKind::Conflict, true),
            (413, ErrorKind::RequestTooLarge, false),
            (422, ErrorKind::InvalidRequest, false),
            (429, ErrorKind::RateLimited, true),
            (500, ErrorKind::ServerError, true),
            (502, ErrorKind::ServerError, true),
            (503, ErrorKind::ServerError, true),
            (504, ErrorKind::Timeout, true),
            (529, ErrorKind::Overloaded, true),
        ];
        for (status, kind, retry) in cases {
            let c = classify(status, "", &[]);
            assert_eq!((c.kind, c.retryable), (kind, retry), "status {status}");
        }
    }

    #[test]
    fn error_type_wins_and_unknown_falls_back() {
        let c = classify(
            500,
            r#"{"type":"error","error":{"type":"overloaded_error","message":"x"}}"#,
            &[],
        );
        assert_eq!(c.kind, ErrorKind::Overloaded);
        assert!(c.retryable);
        let c = classify(
            400,
            r#"{"type":"error","error":{"type":"brand_new_error","message":"x"}}"#,
            &[],
        );
        assert_eq!(c.kind, ErrorKind::InvalidRequest);
        assert_eq!(c.api_type.as_deref(), Some("brand_new_error"));
        let c = classify(502, "<html>bad gateway</html>", &[]);
        assert_eq!(c.kind, ErrorKind::ServerError);
    }

    #[test]
    fn spend_cap_is_not_retryable() {
        let body = r#"{"type":"error","error":{"type":"rate_limit_error","message":"cap","details":{"error_code":"enforced_spend_limit_reached"}}}"#;
        let c = classify(429, body, &[]);
        assert_eq!(c.kind, ErrorKind::SpendCapReached);
        assert!(!c.retryable);
        let c = classify(
            429,
            r#"{"type":"error","error":{"type":"rate_limit_error","message":"x","details":null}}"#,
            &[],
        );
        assert_eq!(c.kind, ErrorKind::RateLimited);
        assert!(c.retryable);
    }

    #[test]
    fn should_retry_header_overrides() {
        assert!(!classify(529, "", &[("x-should-retry", "false")]).retryable);
        assert!(classify(400, "", &[("x-should-retry", "true")]).retryable);
        assert!(!classify(429, "", &[("x-should-retry", "false")]).retryable);
    }

    #[test]
    fn retry_after_is_read() {
        let c = classify(429, "", &[("retry-after", "2")]);
        assert_eq!(c.retry_after, Some(Duration::from_secs(2)));
    }

    #[test]
    fn errors() {
        let io = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        let c = classify_error(&io);
        assert_eq!((c.kind, c.retryable), (ErrorKind::Connection, true));
        let io = std::io::Error::from(std::io::ErrorKind::TimedOut);
        assert_eq!(classify_error(&io).kind, ErrorKind::Timeout);
        let el = tower::timeout::error::Elapsed::new();
        assert_eq!(classify_error(&el).kind, ErrorKind::Timeout);
        let ours = Error::queue_full(Duration::from_secs(1));
        let c = classify_error(&ours);
        assert_eq!((c.kind, c.retryable), (ErrorKind::QueueFull, false));
        let other = std::fmt::Error;
        let c = classify_error(&other);
        assert_eq!((c.kind, c.retryable), (ErrorKind::Internal, false));
        // wrapped in a chain
        let wrapped = Error::new(ErrorKind::Internal, "outer").with_origin(Origin::Local);
        assert_eq!(classify_error(&wrapped).kind, ErrorKind::Internal);
    }

    #[test]
    fn stream_errors() {
        assert!(classify_stream_error("overloaded_error").retryable);
        assert!(classify_stream_error("api_error").retryable);
        assert!(!classify_stream_error("invalid_request_error").retryable);
        assert!(!classify_stream_error("mystery").retryable);
    }
}
