//! Serde helpers shared by every layer's configuration, so one TOML file reads the same way
//! for all of them.
//!
//! Durations are written as human strings (`"500ms"`, `"1.5s"`, `"2m"`, `"1h 30m"`) or as a
//! plain number of seconds (`30`, `0.25`). Use them with
//! `#[serde(with = "claude_core::config::duration")]` or
//! `#[serde(with = "claude_core::config::option_duration")]`.
//!
//! ```
//! use std::time::Duration;
//!
//! #[derive(serde::Deserialize)]
//! struct Cfg {
//!     #[serde(with = "claude_core::config::duration")]
//!     ttl: Duration,
//! }
//! # fn main() -> Result<(), serde_json::Error> {
//! let cfg: Cfg = serde_json::from_str(r#"{"ttl":"1.5s"}"#)?;
//! assert_eq!(cfg.ttl, Duration::from_millis(1500));
//! let cfg: Cfg = serde_json::from_str(r#"{"ttl":2}"#)?;
//! assert_eq!(cfg.ttl, Duration::from_secs(2));
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::time::Duration;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// What a shared limit (rate limits, budgets kept in Redis) does with a request when its
/// shared store cannot be reached. Written `"fail_open"` / `"fail_closed"`. A shared cache
/// has no policy: it always passes through.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailurePolicy {
    /// Decide on the local limits alone, as without the shared store (the default): each
    /// instance still holds the limits by itself.
    #[default]
    FailOpen,
    /// Refuse the request with a local 429 saying that the shared store is unreachable.
    FailClosed,
}

struct DurationVisitor;

impl Visitor<'_> for DurationVisitor {
    type Value = Duration;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a duration such as \"500ms\", \"1.5s\", \"2m\", or a number of seconds")
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
        Ok(Duration::from_secs(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
        u64::try_from(v)
            .map(Duration::from_secs)
            .map_err(|_| E::custom("a duration cannot be negative"))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Duration, E> {
        Duration::try_from_secs_f64(v)
            .map_err(|_| E::custom("a duration must be a finite, non-negative number of seconds"))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
        parse(v).map_err(E::custom)
    }
}

/// Parses a human duration string (`"500ms"`, `"1.5s"`, `"2m"`) or plain seconds (`"30"`).
pub fn parse(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<f64>() {
        return Duration::try_from_secs_f64(secs)
            .map_err(|_| format!("invalid duration `{s}`: must be finite and non-negative"));
    }
    // humantime has no fractional units; handle the common "1.5s" / "0.5m" forms here.
    for (suffix, scale) in [("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0)] {
        if let Some(num) = s.strip_suffix(suffix)
            && let Ok(v) = num.trim().parse::<f64>()
        {
            return Duration::try_from_secs_f64(v * scale)
                .map_err(|_| format!("invalid duration `{s}`: must be finite and non-negative"));
        }
    }
    humantime::parse_duration(s).map_err(|e| format!("invalid duration `{s}`: {e}"))
}

/// Formats a duration the way [`parse`] reads it back (`"1.5s"`, `"250ms"`).
pub fn format(d: Duration) -> String {
    if d.subsec_millis() == 0 && d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else if d.as_secs() == 0 && d.subsec_nanos().is_multiple_of(1_000_000) {
        format!("{}ms", d.subsec_millis())
    } else {
        format!("{}s", d.as_secs_f64())
    }
}

/// `#[serde(with = "claude_core::config::duration")]` for `Duration` fields.
pub mod duration {
    use super::{Deserializer, DurationVisitor, Serializer};
    use std::time::Duration;

    /// Deserializes a duration.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        d.deserialize_any(DurationVisitor)
    }

    /// Serializes a duration as a string [`super::parse`] reads back.
    pub fn serialize<S: Serializer>(v: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format(*v))
    }
}

/// `#[serde(with = "claude_core::config::option_duration")]` for `Option<Duration>` fields
/// (use with `#[serde(default)]`).
pub mod option_duration {
    use super::{Deserializer, DurationVisitor, Serializer};
    use serde::Deserialize;
    use std::time::Duration;

    struct Wrap(Duration);

    impl<'de> Deserialize<'de> for Wrap {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_any(DurationVisitor).map(Wrap)
        }
    }

    /// Deserializes an optional duration.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Ok(Option::<Wrap>::deserialize(d)?.map(|w| w.0))
    }

    /// Serializes an optional duration.
    #[allow(clippy::ref_option)]
    pub fn serialize<S: Serializer>(v: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(d) => s.serialize_some(&super::format(*d)),
            None => s.serialize_none(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_forms() {
        assert_eq!(parse("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse("1h 30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse("30"), Ok(Duration::from_secs(30)));
        assert!(parse("-1s").is_err());
        assert!(parse("soon").is_err());
    }

    #[test]
    fn round_trips() {
        for d in [
            Duration::from_secs(3),
            Duration::from_millis(250),
            Duration::from_micros(1500),
        ] {
            assert_eq!(parse(&format(d)), Ok(d), "{d:?}");
        }
    }
}
