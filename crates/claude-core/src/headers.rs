//! Header names of the Anthropic API and the parsers every layer shares.
//!
//! Parsers are lenient about what the API or a relay may send (float seconds, HTTP dates,
//! missing headers) and never panic: a value that does not parse is `None`.

use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderName};

/// `retry-after-ms`: milliseconds to wait (non-standard; the SDKs read it first).
pub const RETRY_AFTER_MS: HeaderName = HeaderName::from_static("retry-after-ms");
/// `x-should-retry`: `true`/`false`, overrides every other retry rule.
pub const X_SHOULD_RETRY: HeaderName = HeaderName::from_static("x-should-retry");
/// `request-id`: Anthropic's id of the request.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("request-id");
/// `anthropic-version`: the API version the request is written for.
pub const ANTHROPIC_VERSION: HeaderName = HeaderName::from_static("anthropic-version");
/// `anthropic-beta`: comma-separated beta features.
pub const ANTHROPIC_BETA: HeaderName = HeaderName::from_static("anthropic-beta");
/// `x-api-key`: the API key (legacy but universal auth header).
pub const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
/// `x-claude-error-code`: the stable [`crate::ErrorKind::code`] on responses the stack made.
pub const X_CLAUDE_ERROR_CODE: HeaderName = HeaderName::from_static("x-claude-error-code");
/// `x-claude-cache`: `HIT`, `MISS` or `BYPASS`, set by the cache layer.
pub const X_CLAUDE_CACHE: HeaderName = HeaderName::from_static("x-claude-cache");

/// The current (and only) Anthropic API version string.
pub const DEFAULT_ANTHROPIC_VERSION: &str = "2023-06-01";

/// Reads the server's wait from `retry-after-ms`, then `retry-after` (integer or float
/// seconds, or an HTTP date measured from `now`).
///
/// Negative or unparsable values give `None`; a date in the past gives `Some(ZERO)`.
pub fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    if let Some(ms) = headers
        .get(RETRY_AFTER_MS)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_retry_after_ms)
    {
        return Some(ms);
    }
    headers
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, now))
}

/// Parses a `retry-after-ms` value (float milliseconds).
pub fn parse_retry_after_ms(value: &str) -> Option<Duration> {
    let ms: f64 = value.trim().parse().ok()?;
    secs_f64(ms / 1000.0)
}

/// Parses a `retry-after` value: seconds (integer or float) or an HTTP date.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<f64>() {
        return secs_f64(secs);
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

fn secs_f64(secs: f64) -> Option<Duration> {
    if !secs.is_finite() || secs < 0.0 {
        return None;
    }
    // Anything beyond a year is nonsense; clamp so Duration never overflows.
    Some(Duration::from_secs_f64(secs.min(365.0 * 86_400.0)))
}

/// Parses an RFC 3339 timestamp (`2026-11-26T11:00:05Z`, fractions and offsets allowed).
pub fn parse_rfc3339(value: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339_weak(value.trim())
        .ok()
        .or_else(|| {
            // humantime accepts only `Z`; handle explicit offsets such as `+00:00`.
            let v = value.trim();
            let (base, offset) = split_offset(v)?;
            let t = humantime::parse_rfc3339_weak(base).ok()?;
            if offset >= 0 {
                t.checked_sub(Duration::from_secs(offset.unsigned_abs()))
            } else {
                t.checked_add(Duration::from_secs(offset.unsigned_abs()))
            }
        })
}

fn split_offset(v: &str) -> Option<(&str, i64)> {
    let idx = v.len().checked_sub(6)?;
    let (base, off) = v.split_at(idx);
    let bytes = off.as_bytes();
    if !(bytes[0] == b'+' || bytes[0] == b'-') || bytes[3] != b':' {
        return None;
    }
    let h: i64 = off.get(1..3)?.parse().ok()?;
    let m: i64 = off.get(4..6)?.parse().ok()?;
    let secs = h * 3600 + m * 60;
    Some((base, if bytes[0] == b'-' { -secs } else { secs }))
}

/// Formats a time as RFC 3339 in UTC with whole seconds.
pub fn format_rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// One `anthropic-ratelimit-<kind>-{limit,remaining,reset}` triple.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LimitInfo {
    /// The maximum allowed in the period.
    pub limit: Option<u64>,
    /// What is left (token counts are rounded to the nearest 1,000 by the API).
    pub remaining: Option<u64>,
    /// When the bucket is full again (not when the next request is accepted).
    pub reset: Option<SystemTime>,
}

impl LimitInfo {
    fn read(headers: &HeaderMap, [limit, remaining, reset]: &[HeaderName; 3]) -> Self {
        let get = |name: &HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
        Self {
            limit: get(limit).and_then(|v| v.trim().parse().ok()),
            remaining: get(remaining).and_then(|v| v.trim().parse().ok()),
            reset: get(reset).and_then(parse_rfc3339),
        }
    }

    /// Whether any of the three headers was present.
    pub fn is_present(&self) -> bool {
        self.limit.is_some() || self.remaining.is_some() || self.reset.is_some()
    }
}

macro_rules! ratelimit_names {
    ($kind:literal) => {
        [
            HeaderName::from_static(concat!("anthropic-ratelimit-", $kind, "-limit")),
            HeaderName::from_static(concat!("anthropic-ratelimit-", $kind, "-remaining")),
            HeaderName::from_static(concat!("anthropic-ratelimit-", $kind, "-reset")),
        ]
    };
}

/// `anthropic-ratelimit-requests-{limit,remaining,reset}`.
pub const RATELIMIT_REQUESTS: [HeaderName; 3] = ratelimit_names!("requests");
/// `anthropic-ratelimit-tokens-{limit,remaining,reset}`.
pub const RATELIMIT_TOKENS: [HeaderName; 3] = ratelimit_names!("tokens");
/// `anthropic-ratelimit-input-tokens-{limit,remaining,reset}`.
pub const RATELIMIT_INPUT_TOKENS: [HeaderName; 3] = ratelimit_names!("input-tokens");
/// `anthropic-ratelimit-output-tokens-{limit,remaining,reset}`.
pub const RATELIMIT_OUTPUT_TOKENS: [HeaderName; 3] = ratelimit_names!("output-tokens");

/// Every `anthropic-ratelimit-*` header of a response.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateLimitHeaders {
    /// `anthropic-ratelimit-requests-*`.
    pub requests: LimitInfo,
    /// `anthropic-ratelimit-tokens-*` (the most restrictive token limit in force).
    pub tokens: LimitInfo,
    /// `anthropic-ratelimit-input-tokens-*`.
    pub input_tokens: LimitInfo,
    /// `anthropic-ratelimit-output-tokens-*`.
    pub output_tokens: LimitInfo,
}

impl RateLimitHeaders {
    /// Reads them from a response's headers. Missing headers stay `None` (Microsoft Foundry
    /// and some relays send none).
    pub fn from_headers(headers: &HeaderMap) -> Self {
        Self {
            requests: LimitInfo::read(headers, &RATELIMIT_REQUESTS),
            tokens: LimitInfo::read(headers, &RATELIMIT_TOKENS),
            input_tokens: LimitInfo::read(headers, &RATELIMIT_INPUT_TOKENS),
            output_tokens: LimitInfo::read(headers, &RATELIMIT_OUTPUT_TOKENS),
        }
    }

    /// Whether any rate-limit header was present.
    pub fn is_present(&self) -> bool {
        self.requests.is_present()
            || self.tokens.is_present()
            || self.input_tokens.is_present()
            || self.output_tokens.is_present()
    }
}

/// The `request-id` of a response, if any.
pub fn request_id(headers: &HeaderMap) -> Option<&str> {
    headers.get(REQUEST_ID).and_then(|v| v.to_str().ok())
}

/// The hop-by-hop headers of HTTP/1.1 (RFC 9110 §7.6.1, and RFC 2616's
/// `proxy-authenticate` and `proxy-authorization`): they describe the connection they came
/// on and are not forwarded.
pub const HOP_BY_HOP: [HeaderName; 8] = [
    http::header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    http::header::PROXY_AUTHENTICATE,
    http::header::PROXY_AUTHORIZATION,
    http::header::TE,
    http::header::TRANSFER_ENCODING,
    http::header::UPGRADE,
];

/// The index in [`HOP_BY_HOP`] of a header name, if it is one (a match on the name's text,
/// which compiles to a switch on its length: cheaper than comparing `HeaderName`s).
fn hop_by_hop_index(name: &HeaderName) -> Option<usize> {
    Some(match name.as_str() {
        "connection" => 0,
        "keep-alive" => 1,
        "proxy-connection" => 2,
        "proxy-authenticate" => 3,
        "proxy-authorization" => 4,
        "te" => 5,
        "transfer-encoding" => 6,
        "upgrade" => 7,
        _ => return None,
    })
}

/// Removes the [`HOP_BY_HOP`] headers of a message. It looks before it removes: only the
/// names present are removed (a removal hashes its name and probes the map), and usually
/// none is. Returns whether any was there.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) -> bool {
    let mut present = 0u8;
    for name in headers.keys() {
        if let Some(i) = hop_by_hop_index(name) {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return false;
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
    true
}

/// Removes the headers that belong to the connection a message came on, for a relay that
/// forwards it on another: the names its `connection` header lists (RFC 9110 §7.6.1), then
/// the [`HOP_BY_HOP`] headers.
pub fn remove_connection_headers(headers: &mut HeaderMap) {
    // Empty (no allocation) when there is no `connection` header.
    let listed: Vec<HeaderName> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in &listed {
        headers.remove(name);
    }
    remove_hop_by_hop(headers);
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_removed() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "keep-alive, X-Hop-Secret"),
            ("connection", "Upgrade"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers"),
            ("upgrade", "websocket"),
            ("x-hop-secret", "1"),
            ("x-custom", "kept"),
            ("anthropic-version", "2023-06-01"),
        ] {
            h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        let mut only_fixed = h.clone();
        remove_connection_headers(&mut h);
        let mut left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["anthropic-version", "x-custom"]);
        // Nothing to remove: the map is left as it was.
        let before = h.clone();
        remove_connection_headers(&mut h);
        assert_eq!(h, before);
        assert!(!remove_hop_by_hop(&mut h));
        // The fixed set alone leaves the names `connection` listed.
        assert!(remove_hop_by_hop(&mut only_fixed));
        let mut left: Vec<&str> = only_fixed.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["anthropic-version", "x-custom", "x-hop-secret"]);
    }

    #[test]
    fn every_hop_by_hop_name_is_found_by_its_index() {
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_by_hop_index(name), Some(i), "{name}");
            let mut h = HeaderMap::new();
            h.insert(name.clone(), HeaderValue::from_static("x"));
            h.insert(X_API_KEY, HeaderValue::from_static("k"));
            assert!(remove_hop_by_hop(&mut h), "{name}");
            assert_eq!(h.len(), 1, "{name}");
        }
        assert_eq!(hop_by_hop_index(&X_API_KEY), None);
    }

    #[test]
    fn retry_after_ms_wins() {
        let mut h = HeaderMap::new();
        h.insert("retry-after", HeaderValue::from_static("5"));
        h.insert("retry-after-ms", HeaderValue::from_static("250.5"));
        let d = retry_after(&h, SystemTime::now()).unwrap();
        assert_eq!(d.as_micros(), 250_500);
    }

    #[test]
    fn retry_after_seconds_float_and_date() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_retry_after("3", now), Some(Duration::from_secs(3)));
        assert_eq!(
            parse_retry_after(" 1.5 ", now),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(parse_retry_after("-1", now), None);
        assert_eq!(parse_retry_after("soon", now), None);
        let later = now + Duration::from_secs(7);
        let date = httpdate::fmt_http_date(later);
        assert_eq!(parse_retry_after(&date, now), Some(Duration::from_secs(7)));
        let past = httpdate::fmt_http_date(now - Duration::from_secs(7));
        assert_eq!(parse_retry_after(&past, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("NaN", now), None);
        assert_eq!(parse_retry_after("inf", now), None);
    }

    #[test]
    fn rfc3339_round_trip_and_offsets() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_000_000);
        let s = format_rfc3339(t);
        assert_eq!(parse_rfc3339(&s), Some(t));
        let z = parse_rfc3339("2026-11-26T11:00:05Z").unwrap();
        let plus = parse_rfc3339("2026-11-26T12:00:05+01:00").unwrap();
        assert_eq!(z, plus);
        let frac = parse_rfc3339("2026-11-26T11:00:05.500Z").unwrap();
        assert_eq!(frac.duration_since(z).unwrap(), Duration::from_millis(500));
        assert_eq!(parse_rfc3339("yesterday"), None);
    }

    #[test]
    fn ratelimit_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            "anthropic-ratelimit-requests-limit",
            HeaderValue::from_static("50"),
        );
        h.insert(
            "anthropic-ratelimit-requests-remaining",
            HeaderValue::from_static("49"),
        );
        h.insert(
            "anthropic-ratelimit-requests-reset",
            HeaderValue::from_static("2026-11-26T11:00:05Z"),
        );
        h.insert(
            "anthropic-ratelimit-input-tokens-remaining",
            HeaderValue::from_static("29000"),
        );
        h.insert(
            "anthropic-ratelimit-output-tokens-limit",
            HeaderValue::from_static("bogus"),
        );
        let r = RateLimitHeaders::from_headers(&h);
        assert_eq!(r.requests.limit, Some(50));
        assert_eq!(r.requests.remaining, Some(49));
        assert!(r.requests.reset.is_some());
        assert_eq!(r.input_tokens.remaining, Some(29_000));
        assert_eq!(r.output_tokens.limit, None);
        assert!(!r.tokens.is_present());
        assert!(r.is_present());
    }
}
