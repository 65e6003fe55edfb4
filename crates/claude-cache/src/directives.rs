//! The request `cache-control` directives the cache honours.

use std::time::Duration;

use http::HeaderMap;
use http::header::CACHE_CONTROL;

/// What a request's `cache-control` asks of the cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Directives {
    /// `no-store`: neither read nor write.
    pub(crate) no_store: bool,
    /// `no-cache`: do not answer from the cache, but store the fresh answer.
    pub(crate) no_cache: bool,
    /// `max-age=N`: accept a stored answer at most N seconds old, and store the fresh answer
    /// for at most N seconds.
    pub(crate) max_age: Option<Duration>,
}

impl Directives {
    /// Reads every `cache-control` value. Names are case-insensitive; unknown directives and
    /// malformed `max-age` values are ignored; when `max-age` repeats, the smallest wins.
    pub(crate) fn parse(headers: &HeaderMap) -> Self {
        let mut d = Self::default();
        for value in headers.get_all(CACHE_CONTROL) {
            let Ok(value) = value.to_str() else { continue };
            for item in value.split(',') {
                let (name, arg) = match item.split_once('=') {
                    Some((n, a)) => (n.trim(), Some(a.trim().trim_matches('"'))),
                    None => (item.trim(), None),
                };
                if name.eq_ignore_ascii_case("no-store") {
                    d.no_store = true;
                } else if name.eq_ignore_ascii_case("no-cache") {
                    d.no_cache = true;
                } else if name.eq_ignore_ascii_case("max-age")
                    && let Some(secs) = arg.and_then(|a| a.parse::<u64>().ok())
                {
                    let age = Duration::from_secs(secs);
                    d.max_age = Some(d.max_age.map_or(age, |m| m.min(age)));
                }
            }
        }
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn parse(values: &[&'static str]) -> Directives {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(CACHE_CONTROL, HeaderValue::from_static(v));
        }
        Directives::parse(&h)
    }

    #[test]
    fn reads_directives() {
        assert_eq!(parse(&[]), Directives::default());
        assert!(parse(&["no-store"]).no_store);
        assert!(parse(&["No-Cache"]).no_cache);
        let d = parse(&["max-age=60, no-cache", "max-age=\"30\""]);
        assert!(d.no_cache && !d.no_store);
        assert_eq!(d.max_age, Some(Duration::from_secs(30)));
        assert_eq!(parse(&["max-age=0"]).max_age, Some(Duration::ZERO));
    }

    #[test]
    fn ignores_what_it_does_not_know() {
        assert_eq!(
            parse(&["private, max-age=soon, max-age=-1, no-transform"]),
            Directives::default()
        );
    }
}
