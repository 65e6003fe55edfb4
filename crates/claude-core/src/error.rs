//! The one error type of the stack and its Anthropic-shaped rendering.
//!
//! Upstream HTTP errors stay `Ok(Response)` all the way up, so an embedding application sees
//! exactly what Anthropic said. [`Error`] is for what the stack itself produces (a local rate
//! limit, a budget refusal, a timeout, a connection failure, a missing secret) and for the
//! classification of upstream answers ([`crate::classify`]). Layers box it as
//! [`tower::BoxError`]; callers get it back with [`Error::from_box`] or `downcast_ref`.

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::Full;

use crate::headers::{RETRY_AFTER_MS, X_SHOULD_RETRY};

/// A boxed error, as tower layers exchange them.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What went wrong, in the terms callers act on.
///
/// The set is closed for matching (`#[non_exhaustive]` so new kinds can be added); every kind
/// has a stable [`code`](ErrorKind::code), an HTTP status and an Anthropic `error.type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The API key is missing, invalid, revoked or expired (401 `authentication_error`).
    Authentication,
    /// The key lacks permission for the resource (403 `permission_error`).
    Permission,
    /// The resource does not exist (404 `not_found_error`).
    NotFound,
    /// The request is malformed or otherwise refused (400 `invalid_request_error`).
    InvalidRequest,
    /// The request exceeds the upstream byte limit (413 `request_too_large`).
    RequestTooLarge,
    /// Billing problem on the account (402 `billing_error`).
    Billing,
    /// A conflict the server says can be retried (409 `conflict_error`).
    Conflict,
    /// A rate limit was hit (429 `rate_limit_error`), upstream or local.
    RateLimited,
    /// The organisation reached its monthly spend cap (429 with
    /// `enforced_spend_limit_reached`); retrying before next month is pointless.
    SpendCapReached,
    /// The API is temporarily overloaded (529 `overloaded_error`).
    Overloaded,
    /// An internal server error upstream (500 and other 5xx, `api_error`).
    ServerError,
    /// An attempt or the whole request ran out of time (408/504, or a local timeout).
    Timeout,
    /// The connection failed: refused, reset, closed mid-message.
    Connection,
    /// A local budget cap refused the request before it was sent.
    BudgetExceeded,
    /// The local rate-limit queue was full.
    QueueFull,
    /// The local rate-limit queue wait would exceed its maximum.
    QueueTimeout,
    /// No API key could be obtained from the configured secret source.
    SecretUnavailable,
    /// A request or response body exceeded a local size limit.
    BodyTooLarge,
    /// A bug or an unexpected failure inside the stack.
    Internal,
}

impl ErrorKind {
    /// A stable machine-readable code, e.g. `RATE_LIMIT`. These strings never change.
    pub const fn code(self) -> &'static str {
        match self {
            Self::Authentication => "AUTH_ERROR",
            Self::Permission => "PERMISSION_ERROR",
            Self::NotFound => "NOT_FOUND",
            Self::InvalidRequest => "BAD_REQUEST",
            Self::RequestTooLarge => "REQUEST_TOO_LARGE",
            Self::Billing => "BILLING_ERROR",
            Self::Conflict => "CONFLICT",
            Self::RateLimited => "RATE_LIMIT",
            Self::SpendCapReached => "SPEND_CAP",
            Self::Overloaded => "OVERLOADED",
            Self::ServerError => "SERVER_ERROR",
            Self::Timeout => "TIMEOUT",
            Self::Connection => "CONNECTION_ERROR",
            Self::BudgetExceeded => "BUDGET_EXCEEDED",
            Self::QueueFull => "QUEUE_FULL",
            Self::QueueTimeout => "QUEUE_TIMEOUT",
            Self::SecretUnavailable => "SECRET_UNAVAILABLE",
            Self::BodyTooLarge => "BODY_TOO_LARGE",
            Self::Internal => "INTERNAL_ERROR",
        }
    }

    /// The HTTP status an Anthropic-shaped error of this kind carries.
    ///
    /// Local refusals map to the status an official SDK handles the right way: queue and
    /// rate-limit rejections are 429 (the SDK may retry after `retry-after`), a budget
    /// refusal is 400 (as Anthropic answers when a user-set spend limit is reached; SDKs do
    /// not retry it), a missing secret is 503.
    pub const fn status(self) -> StatusCode {
        match self {
            Self::Authentication => StatusCode::UNAUTHORIZED,
            Self::Permission => StatusCode::FORBIDDEN,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::InvalidRequest | Self::BudgetExceeded => StatusCode::BAD_REQUEST,
            Self::RequestTooLarge | Self::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Billing => StatusCode::PAYMENT_REQUIRED,
            Self::Conflict => StatusCode::CONFLICT,
            Self::RateLimited | Self::SpendCapReached | Self::QueueFull | Self::QueueTimeout => {
                StatusCode::TOO_MANY_REQUESTS
            }
            Self::Overloaded => match StatusCode::from_u16(529) {
                Ok(s) => s,
                Err(_) => StatusCode::SERVICE_UNAVAILABLE,
            },
            Self::ServerError | Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            Self::Timeout => StatusCode::GATEWAY_TIMEOUT,
            Self::Connection => StatusCode::BAD_GATEWAY,
            Self::SecretUnavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The Anthropic `error.type` string for this kind.
    pub const fn api_type(self) -> &'static str {
        match self {
            Self::Authentication => "authentication_error",
            Self::Permission => "permission_error",
            Self::NotFound => "not_found_error",
            Self::InvalidRequest | Self::BudgetExceeded => "invalid_request_error",
            Self::RequestTooLarge | Self::BodyTooLarge => "request_too_large",
            Self::Billing => "billing_error",
            Self::Conflict => "conflict_error",
            Self::RateLimited | Self::SpendCapReached | Self::QueueFull | Self::QueueTimeout => {
                "rate_limit_error"
            }
            Self::Overloaded => "overloaded_error",
            Self::ServerError | Self::Internal | Self::Connection | Self::SecretUnavailable => {
                "api_error"
            }
            Self::Timeout => "timeout_error",
        }
    }

    /// Whether an upstream failure of this kind is worth another attempt.
    ///
    /// This is the kind's nature only; [`Error::is_retryable`] also refuses errors the stack
    /// produced itself, and [`crate::classify`] applies `x-should-retry`.
    pub const fn is_transient(self) -> bool {
        matches!(
            self,
            Self::Conflict
                | Self::RateLimited
                | Self::Overloaded
                | Self::ServerError
                | Self::Timeout
                | Self::Connection
        )
    }

    /// Maps an Anthropic `error.type` to a kind; `None` for types this version does not know
    /// (the caller then falls back to the HTTP status, as the API docs ask).
    pub fn from_api_type(api_type: &str) -> Option<Self> {
        Some(match api_type {
            "authentication_error" => Self::Authentication,
            "permission_error" => Self::Permission,
            "not_found_error" => Self::NotFound,
            "invalid_request_error" => Self::InvalidRequest,
            "request_too_large" => Self::RequestTooLarge,
            "billing_error" => Self::Billing,
            "conflict_error" => Self::Conflict,
            "rate_limit_error" => Self::RateLimited,
            "overloaded_error" => Self::Overloaded,
            "api_error" => Self::ServerError,
            "timeout_error" => Self::Timeout,
            _ => return None,
        })
    }

    /// Maps an HTTP error status to a kind (`None` below 400).
    pub fn from_status(status: StatusCode) -> Option<Self> {
        let code = status.as_u16();
        Some(match code {
            401 => Self::Authentication,
            402 => Self::Billing,
            403 => Self::Permission,
            404 => Self::NotFound,
            408 | 504 => Self::Timeout,
            409 => Self::Conflict,
            413 => Self::RequestTooLarge,
            429 => Self::RateLimited,
            529 => Self::Overloaded,
            400..=499 => Self::InvalidRequest,
            500..=599 => Self::ServerError,
            _ => return None,
        })
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.code())
    }
}

/// Where an error came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Origin {
    /// Anthropic (or the relay in front of it) answered with this error.
    Upstream,
    /// The transport failed: no usable answer came back (connect, reset, timeout).
    Transport,
    /// The stack refused or failed the request itself (rate limit, budget, secret, bug).
    Local,
}

/// The error the stack produces, boxed as [`BoxError`] between layers.
///
/// `Display` gives the message only; it never contains a secret or a prompt.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    kind: ErrorKind,
    origin: Origin,
    message: Cow<'static, str>,
    retry_after: Option<Duration>,
    #[source]
    source: Option<BoxError>,
}

impl Error {
    /// A new error of `kind` with a human message. The origin is [`Origin::Local`].
    pub fn new(kind: ErrorKind, message: impl Into<Cow<'static, str>>) -> Self {
        Self {
            kind,
            origin: Origin::Local,
            message: message.into(),
            retry_after: None,
            source: None,
        }
    }

    /// A local rate-limit rejection with the wait after which it may pass.
    pub fn rate_limited_locally(
        retry_after: Duration,
        message: impl Into<Cow<'static, str>>,
    ) -> Self {
        Self::new(ErrorKind::RateLimited, message).with_retry_after(retry_after)
    }

    /// The local queue was full.
    pub fn queue_full(retry_after: Duration) -> Self {
        Self::new(
            ErrorKind::QueueFull,
            "local rate limit: the gateway's request queue for this key is full",
        )
        .with_retry_after(retry_after)
    }

    /// The local queue wait would exceed its maximum.
    pub fn queue_timeout(retry_after: Duration) -> Self {
        Self::new(
            ErrorKind::QueueTimeout,
            "local rate limit: the wait in the gateway's queue would exceed its maximum",
        )
        .with_retry_after(retry_after)
    }

    /// A budget cap refused the request.
    pub fn budget_exceeded(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorKind::BudgetExceeded, message)
    }

    /// Sets the origin.
    #[must_use]
    pub fn with_origin(mut self, origin: Origin) -> Self {
        self.origin = origin;
        self
    }

    /// Sets the time after which the request may be retried.
    #[must_use]
    pub fn with_retry_after(mut self, retry_after: Duration) -> Self {
        self.retry_after = Some(retry_after);
        self
    }

    /// Attaches the underlying cause.
    #[must_use]
    pub fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// What went wrong.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// Where it came from.
    pub fn origin(&self) -> Origin {
        self.origin
    }

    /// The stable code of the kind, e.g. `RATE_LIMIT`.
    pub fn code(&self) -> &'static str {
        self.kind.code()
    }

    /// The human message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// When the server (or the local limiter) said the request may be tried again.
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }

    /// Whether the stack's retry layer should try again.
    ///
    /// Errors the stack made itself ([`Origin::Local`]: a local rate-limit rejection, a budget
    /// refusal, a missing secret) are never retried by the stack: retrying cannot help, and
    /// retrying local 429s is how storms start.
    pub fn is_retryable(&self) -> bool {
        self.origin != Origin::Local && self.kind.is_transient()
    }

    /// Recovers an [`Error`] from a boxed error, classifying foreign errors
    /// (hyper, hyper-util, tower timeouts, io) with [`crate::classify::classify_error`].
    pub fn from_box(err: BoxError) -> Self {
        match err.downcast::<Self>() {
            Ok(e) => *e,
            Err(other) => {
                let class = crate::classify::classify_error(other.as_ref());
                let message = class.kind.default_message();
                Self {
                    kind: class.kind,
                    origin: class.origin,
                    message: Cow::Borrowed(message),
                    retry_after: None,
                    source: Some(other),
                }
            }
        }
    }

    /// Renders the Anthropic error envelope with the right status and, where one applies,
    /// `retry-after` (whole seconds, rounded up) and `retry-after-ms`.
    ///
    /// Local refusals say in the message that the limit is the gateway's, and carry an extra
    /// `x-claude-error-code` header with [`code`](Self::code). A budget refusal also carries
    /// `x-should-retry: false` so SDKs do not retry it.
    pub fn into_response(self) -> Response<Full<Bytes>> {
        let body = serde_json::json!({
            "type": "error",
            "error": {
                "type": self.kind.api_type(),
                "message": self.message,
                "code": self.kind.code(),
            }
        });
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        let mut resp = Response::new(Full::new(Bytes::from(bytes)));
        *resp.status_mut() = self.kind.status();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(
            crate::headers::X_CLAUDE_ERROR_CODE,
            HeaderValue::from_static(self.kind.code()),
        );
        if let Some(ra) = self.retry_after {
            let secs = ra.as_secs() + u64::from(ra.subsec_nanos() > 0);
            h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
            h.insert(RETRY_AFTER_MS, HeaderValue::from(ra.as_millis() as u64));
        }
        if matches!(
            self.kind,
            ErrorKind::BudgetExceeded | ErrorKind::SpendCapReached
        ) {
            h.insert(X_SHOULD_RETRY, HeaderValue::from_static("false"));
        }
        resp
    }
}

impl ErrorKind {
    /// A short message for errors that arrive without one.
    pub const fn default_message(self) -> &'static str {
        match self {
            Self::Authentication => "authentication failed",
            Self::Permission => "permission denied",
            Self::NotFound => "not found",
            Self::InvalidRequest => "invalid request",
            Self::RequestTooLarge => "request too large",
            Self::Billing => "billing error",
            Self::Conflict => "conflict",
            Self::RateLimited => "rate limited",
            Self::SpendCapReached => "the organisation's monthly spend cap was reached",
            Self::Overloaded => "upstream overloaded",
            Self::ServerError => "upstream server error",
            Self::Timeout => "request timed out",
            Self::Connection => "connection to the upstream failed",
            Self::BudgetExceeded => "budget exceeded",
            Self::QueueFull => "local rate-limit queue full",
            Self::QueueTimeout => "local rate-limit queue wait too long",
            Self::SecretUnavailable => "no API key available",
            Self::BodyTooLarge => "body too large",
            Self::Internal => "internal error",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_stable() {
        assert_eq!(ErrorKind::Authentication.code(), "AUTH_ERROR");
        assert_eq!(ErrorKind::RateLimited.code(), "RATE_LIMIT");
        assert_eq!(ErrorKind::InvalidRequest.code(), "BAD_REQUEST");
        assert_eq!(ErrorKind::ServerError.code(), "SERVER_ERROR");
        assert_eq!(ErrorKind::Connection.code(), "CONNECTION_ERROR");
    }

    #[test]
    fn local_errors_are_not_retryable() {
        let e = Error::rate_limited_locally(Duration::from_secs(2), "local");
        assert!(!e.is_retryable());
        let e = Error::new(ErrorKind::RateLimited, "x").with_origin(Origin::Upstream);
        assert!(e.is_retryable());
        let e = Error::new(ErrorKind::Connection, "x").with_origin(Origin::Transport);
        assert!(e.is_retryable());
        let e = Error::new(ErrorKind::SpendCapReached, "x").with_origin(Origin::Upstream);
        assert!(!e.is_retryable());
    }

    #[test]
    fn into_response_has_envelope_status_and_retry_after() {
        let resp = Error::queue_full(Duration::from_millis(1500)).into_response();
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(resp.headers()["retry-after"], "2");
        assert_eq!(resp.headers()["retry-after-ms"], "1500");
        let body = resp.into_body();
        let bytes = futures_executor_block(body);
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], "rate_limit_error");
        assert_eq!(v["error"]["code"], "QUEUE_FULL");
        assert!(v["error"]["message"].as_str().unwrap().contains("local"));
    }

    #[test]
    fn overloaded_is_529() {
        assert_eq!(ErrorKind::Overloaded.status().as_u16(), 529);
    }

    #[test]
    fn budget_refusal_tells_sdks_not_to_retry() {
        let resp = Error::budget_exceeded("daily budget reached").into_response();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        assert_eq!(resp.headers()["x-should-retry"], "false");
    }

    fn futures_executor_block(body: Full<Bytes>) -> Bytes {
        use http_body_util::BodyExt;
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async { body.collect().await.unwrap().to_bytes() })
    }
}
