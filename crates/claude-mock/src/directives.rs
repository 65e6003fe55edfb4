//! The `x-mock-*` request headers, parsed once per request.

use std::time::Duration;

use http::{HeaderMap, HeaderValue};

use crate::fault::FaultPlan;

/// Usage scripted by `x-mock-usage`: every field optional.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ScriptedUsage {
    pub(crate) input: Option<u64>,
    pub(crate) output: Option<u64>,
    pub(crate) cache_read: u64,
    pub(crate) cache_write_5m: u64,
    pub(crate) cache_write_1h: u64,
    pub(crate) web_search: u64,
    pub(crate) service_tier: ServiceTier,
}

/// `usage.service_tier` of an answer.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ServiceTier {
    #[default]
    Standard,
    Priority,
    Batch,
}

impl ServiceTier {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Standard => "standard",
            Self::Priority => "priority",
            Self::Batch => "batch",
        }
    }
}

/// Everything the `x-mock-*` headers of one request asked for.
#[derive(Debug, Default)]
pub(crate) struct Directives {
    /// `x-mock-fault`, with its raw text (part of the attempt key).
    pub(crate) fault: Option<(FaultPlan, String)>,
    /// `x-mock-key`.
    pub(crate) key: Option<String>,
    /// `x-mock-retry-after`, validated, copied verbatim.
    pub(crate) retry_after: Option<HeaderValue>,
    /// `x-mock-retry-after-ms`, validated, copied verbatim.
    pub(crate) retry_after_ms: Option<HeaderValue>,
    /// `x-mock-should-retry`.
    pub(crate) should_retry: Option<bool>,
    /// `x-mock-latency-ms`.
    pub(crate) latency: Duration,
    /// `x-mock-stream-error-after`.
    pub(crate) stream_error_after: Option<u64>,
    /// `x-mock-stream-error-type`.
    pub(crate) stream_error_type: Option<String>,
    /// `x-mock-reset-after`.
    pub(crate) reset_after: Option<u64>,
    /// `x-mock-output-tokens`.
    pub(crate) output_tokens: Option<u64>,
    /// `x-mock-usage`.
    pub(crate) usage: ScriptedUsage,
}

fn bad(name: &str, expected: &str) -> String {
    format!("{name}: header value is invalid: expected {expected}")
}

fn parse_u64(name: &str, value: &str) -> Result<u64, String> {
    value
        .trim()
        .parse::<u64>()
        .map_err(|_| bad(name, "a non-negative integer"))
}

fn is_non_negative_number(value: &str) -> bool {
    value
        .trim()
        .parse::<f64>()
        .is_ok_and(|v| v.is_finite() && v >= 0.0)
}

fn parse_usage(name: &str, value: &str) -> Result<ScriptedUsage, String> {
    const EXPECTED: &str = "comma-separated key=value pairs with keys input, output, cache_read, \
                            cache_write_5m, cache_write_1h, web_search (non-negative integers) \
                            and service_tier (standard, priority or batch)";
    let mut usage = ScriptedUsage::default();
    let mut seen = [false; 7];
    for pair in value.split(',') {
        let (key, val) = pair.split_once('=').ok_or_else(|| bad(name, EXPECTED))?;
        if key.trim() == "service_tier" {
            usage.service_tier = match val.trim() {
                "standard" => ServiceTier::Standard,
                "priority" => ServiceTier::Priority,
                "batch" => ServiceTier::Batch,
                _ => return Err(bad(name, EXPECTED)),
            };
            if std::mem::replace(&mut seen[6], true) {
                return Err(format!(
                    "{name}: header value is invalid: key `service_tier` repeated"
                ));
            }
            continue;
        }
        let val = parse_u64(name, val).map_err(|_| bad(name, EXPECTED))?;
        let slot = match key.trim() {
            "input" => {
                usage.input = Some(val);
                0
            }
            "output" => {
                usage.output = Some(val);
                1
            }
            "cache_read" => {
                usage.cache_read = val;
                2
            }
            "cache_write_5m" => {
                usage.cache_write_5m = val;
                3
            }
            "cache_write_1h" => {
                usage.cache_write_1h = val;
                4
            }
            "web_search" => {
                usage.web_search = val;
                5
            }
            _ => return Err(bad(name, EXPECTED)),
        };
        if std::mem::replace(&mut seen[slot], true) {
            return Err(format!(
                "{name}: header value is invalid: key `{}` repeated",
                key.trim()
            ));
        }
    }
    Ok(usage)
}

fn is_error_type(value: &str) -> bool {
    !value.is_empty() && value.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
}

impl Directives {
    /// The `error.type` of a stream error: `x-mock-stream-error-type`, else
    /// `overloaded_error`.
    pub(crate) fn stream_error_type(&self) -> &str {
        self.stream_error_type
            .as_deref()
            .unwrap_or("overloaded_error")
    }

    /// Reads every `x-mock-*` header. The error is the message of a 400
    /// `invalid_request_error` naming the header.
    pub(crate) fn parse(headers: &HeaderMap) -> Result<Self, String> {
        let mut d = Self::default();
        for (name, value) in headers {
            let name = name.as_str();
            let Some(suffix) = name.strip_prefix("x-mock-") else {
                continue;
            };
            let text = value
                .to_str()
                .map_err(|_| bad(name, "visible ASCII"))?
                .trim();
            match suffix {
                "fault" => {
                    let plan = FaultPlan::parse(text).map_err(|e| format!("{name}: {e}"))?;
                    d.fault = Some((plan, text.to_owned()));
                }
                "key" => d.key = Some(text.to_owned()),
                "retry-after" => {
                    if !is_non_negative_number(text) && httpdate::parse_http_date(text).is_err() {
                        return Err(bad(name, "seconds or an HTTP date"));
                    }
                    d.retry_after = Some(value.clone());
                }
                "retry-after-ms" => {
                    if !is_non_negative_number(text) {
                        return Err(bad(name, "a non-negative number of milliseconds"));
                    }
                    d.retry_after_ms = Some(value.clone());
                }
                "should-retry" => {
                    d.should_retry = Some(match text {
                        "true" => true,
                        "false" => false,
                        _ => return Err(bad(name, "true or false")),
                    });
                }
                "latency-ms" => d.latency = Duration::from_millis(parse_u64(name, text)?),
                "stream-error-after" => d.stream_error_after = Some(parse_u64(name, text)?),
                "stream-error-type" => {
                    if !is_error_type(text) {
                        return Err(bad(name, "an error type such as overloaded_error"));
                    }
                    d.stream_error_type = Some(text.to_owned());
                }
                "reset-after" => d.reset_after = Some(parse_u64(name, text)?),
                "output-tokens" => d.output_tokens = Some(parse_u64(name, text)?),
                "usage" => d.usage = parse_usage(name, text)?,
                _ => return Err(format!("{name}: unknown x-mock header")),
            }
        }
        Ok(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(*k, HeaderValue::from_static(v));
        }
        map
    }

    #[test]
    fn parses_every_header() {
        let d = Directives::parse(&headers(&[
            ("x-mock-fault", "429, ok"),
            ("x-mock-key", "k1"),
            ("x-mock-retry-after", "2"),
            ("x-mock-retry-after-ms", "1500.5"),
            ("x-mock-should-retry", "false"),
            ("x-mock-latency-ms", "7"),
            ("x-mock-stream-error-after", "3"),
            ("x-mock-stream-error-type", "api_error"),
            ("x-mock-reset-after", "10"),
            ("x-mock-output-tokens", "4"),
            (
                "x-mock-usage",
                "input=1200, output=300,cache_read=500,cache_write_5m=100,cache_write_1h=0",
            ),
            ("content-type", "application/json"),
        ]))
        .unwrap();
        let (plan, raw) = d.fault.unwrap();
        assert_eq!(plan.to_string(), "429,ok");
        assert_eq!(raw, "429, ok");
        assert_eq!(d.key.as_deref(), Some("k1"));
        assert_eq!(d.retry_after.unwrap(), "2");
        assert_eq!(d.retry_after_ms.unwrap(), "1500.5");
        assert_eq!(d.should_retry, Some(false));
        assert_eq!(d.latency, Duration::from_millis(7));
        assert_eq!(d.stream_error_after, Some(3));
        assert_eq!(d.stream_error_type.as_deref(), Some("api_error"));
        assert_eq!(d.reset_after, Some(10));
        assert_eq!(d.output_tokens, Some(4));
        assert_eq!(
            d.usage,
            ScriptedUsage {
                input: Some(1200),
                output: Some(300),
                cache_read: 500,
                cache_write_5m: 100,
                cache_write_1h: 0,
                web_search: 0,
                service_tier: ServiceTier::Standard,
            }
        );
        let d = Directives::parse(&headers(&[(
            "x-mock-usage",
            "web_search=3,service_tier=batch",
        )]))
        .unwrap();
        assert_eq!(d.usage.web_search, 3);
        assert_eq!(d.usage.service_tier, ServiceTier::Batch);
        assert!(Directives::parse(&headers(&[("x-mock-usage", "service_tier=cheap")])).is_err());
    }

    #[test]
    fn accepts_http_date_retry_after() {
        let d = Directives::parse(&headers(&[(
            "x-mock-retry-after",
            "Wed, 21 Oct 2015 07:28:00 GMT",
        )]))
        .unwrap();
        assert!(d.retry_after.is_some());
    }

    #[test]
    fn errors_name_the_header() {
        for (name, value) in [
            ("x-mock-fault", "429,nope"),
            ("x-mock-retry-after", "soon"),
            ("x-mock-retry-after-ms", "-1"),
            ("x-mock-should-retry", "yes"),
            ("x-mock-latency-ms", "1.5"),
            ("x-mock-stream-error-after", "x"),
            ("x-mock-stream-error-type", "Bad Type"),
            ("x-mock-reset-after", "-3"),
            ("x-mock-output-tokens", ""),
            ("x-mock-usage", "input=1,bogus=2"),
            ("x-mock-usage", "input=1,input=2"),
            ("x-mock-usage", "input"),
            ("x-mock-typo", "1"),
        ] {
            let err = Directives::parse(&headers(&[(name, value)])).unwrap_err();
            assert!(err.starts_with(name), "{err} should name {name}");
        }
    }
}
