//! Cache keys: a BLAKE3 hash of what decides the answer, and nothing secret.
//!
//! # What the key covers
//!
//! A [`CacheKey`] is the 256-bit BLAKE3 hash of these fields, in this order, each written
//! as an 8-byte little-endian length followed by its bytes (so no choice of values can move
//! a boundary between two fields and forge another request's key):
//!
//! 1. a domain tag (`claude-cache/v1`), so a future change of layout cannot collide with
//!    today's keys;
//! 2. the scope: `tenant` and the [`Tenant`] id, or `shared` and nothing when the
//!    configuration shares entries across tenants ([`CacheScope::Shared`]);
//! 3. the endpoint ([`Endpoint::as_str`]: `messages` or `count_tokens`), not the raw path,
//!    so a relay prefix does not split the cache;
//! 4. the query string, with a presence flag (the SDKs' beta clients send `?beta=true`);
//! 5. `anthropic-version`, with a presence flag (several values are joined with `,`);
//! 6. `anthropic-beta`, normalised: every value split on commas, trimmed, empty items
//!    dropped, sorted and deduplicated, then written as a count and one field per item (the
//!    order in which a client lists its betas does not change the answer);
//! 7. the canonical JSON of the body ([`canonical_json`]), with the configured top-level
//!    fields left out (`metadata` by default: `metadata.user_id` identifies the end user,
//!    not the question).
//!
//! No header that carries a credential (`x-api-key`, `authorization`) or any other header
//! enters the key: only the three above are read. Tenants are kept apart by the scope, not by
//! their keys, so a key rotation does not empty the cache.
//!
//! # Canonical JSON
//!
//! Two bodies that mean the same JSON get the same canonical bytes: object members are sorted
//! by key, insignificant whitespace is dropped, strings are re-encoded in one way (escapes
//! decoded; only `"`, `\` and control characters escaped), and numbers are kept **exactly as
//! written** (`1.0` and `1` stay different; no float round trip, so two distinct large
//! integers can never collide the way they would through `f64`). Duplicate keys are kept, in
//! their original relative order.
//!
//! The canonicaliser is a small validating recursive-descent parser written for this purpose
//! rather than `serde_json::Value`: `Value` allocates a `String` per string and a map per
//! object, loses the written form of numbers, and its key order depends on whether some
//! crate in the build enabled `serde_json/preserve_order`. Here, the runs of a string between
//! escapes are copied as they are (a `memchr` scan plus a UTF-8 and control-character
//! check), escapes are decoded in place, each object whose keys are not already sorted costs
//! one extra copy of its bytes, and nesting is limited to [`MAX_DEPTH`] levels. The cost is
//! linear in the body; the `cache` bench measures it on a 100 KB request.
//!
//! A body that is not valid JSON (or nests too deeply) has no key: the layer passes such a
//! request through uncached ([`crate::BypassReason::InvalidBody`]) and the client gets
//! Anthropic's own 400.

use std::fmt;

use claude_core::headers::{ANTHROPIC_BETA, ANTHROPIC_VERSION};
use claude_core::{Endpoint, Tenant};
use http::{HeaderMap, Request};

use crate::config::{CacheConfig, CacheScope};

/// The deepest nesting of arrays and objects the canonicaliser accepts (as serde_json).
pub const MAX_DEPTH: usize = 128;

const DOMAIN: &[u8] = b"claude-cache/v1";

/// A 256-bit cache key: the BLAKE3 hash described in the [module docs](self).
///
/// `Debug` and `Display` print it in hex; it is safe to log (it is a hash of the request,
/// and no credential is part of what is hashed).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CacheKey([u8; 32]);

impl CacheKey {
    /// The key of a request, under the scope and ignored fields of `config`.
    ///
    /// The endpoint is read from the path ([`Endpoint::from_path`]) and the tenant from the
    /// request extensions ([`Tenant::of`]).
    ///
    /// # Errors
    ///
    /// [`KeyError`] when the body is not valid JSON.
    pub fn for_request<B: AsRef<[u8]>>(
        req: &Request<B>,
        config: &CacheConfig,
    ) -> Result<Self, KeyError> {
        let tenant = Tenant::of(req);
        let scope = match config.scope {
            CacheScope::Tenant => Some(tenant.as_str()),
            CacheScope::Shared => None,
        };
        Self::from_parts(
            scope,
            Endpoint::from_path(req.uri().path()),
            req.uri().query(),
            req.headers(),
            req.body().as_ref(),
            &config.key_ignore_fields,
        )
    }

    /// The key of explicit parts: `scope` is the tenant id (`None`: shared across tenants),
    /// `headers` are the request headers (only `anthropic-version` and `anthropic-beta` are
    /// read), `ignore` the top-level body fields to leave out.
    ///
    /// # Errors
    ///
    /// [`KeyError`] when the body is not valid JSON.
    pub fn from_parts<S: AsRef<str>>(
        scope: Option<&str>,
        endpoint: Endpoint,
        query: Option<&str>,
        headers: &HeaderMap,
        body: &[u8],
        ignore: &[S],
    ) -> Result<Self, KeyError> {
        let canonical = canonical_json(body, ignore)?;
        let mut h = blake3::Hasher::new();
        field(&mut h, DOMAIN);
        let (kind, id): (&[u8], &str) = match scope {
            Some(id) => (b"tenant", id),
            None => (b"shared", ""),
        };
        field(&mut h, kind);
        field(&mut h, id.as_bytes());
        field(&mut h, endpoint.as_str().as_bytes());
        optional(&mut h, query.map(str::as_bytes));
        let version = joined(headers, &ANTHROPIC_VERSION);
        optional(&mut h, version.as_deref());
        let betas = betas(headers);
        h.update(&(betas.len() as u64).to_le_bytes());
        for b in &betas {
            field(&mut h, b);
        }
        field(&mut h, &canonical);
        Ok(Self(*h.finalize().as_bytes()))
    }

    /// The 32 bytes of the key.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CacheKey({self})")
    }
}

fn field(h: &mut blake3::Hasher, bytes: &[u8]) {
    h.update(&(bytes.len() as u64).to_le_bytes());
    h.update(bytes);
}

fn optional(h: &mut blake3::Hasher, bytes: Option<&[u8]>) {
    match bytes {
        Some(b) => {
            h.update(&[1]);
            field(h, b);
        }
        None => {
            h.update(&[0]);
        }
    }
}

/// All values of a header, trimmed and joined with `,` (`None` when absent).
fn joined(headers: &HeaderMap, name: &http::HeaderName) -> Option<Vec<u8>> {
    let mut out: Option<Vec<u8>> = None;
    for v in headers.get_all(name) {
        let v = v.as_bytes().trim_ascii();
        let buf = out.get_or_insert_with(Vec::new);
        if !buf.is_empty() {
            buf.push(b',');
        }
        buf.extend_from_slice(v);
    }
    out
}

/// `anthropic-beta` items: split on commas across all values, trimmed, sorted, deduplicated.
fn betas(headers: &HeaderMap) -> Vec<&[u8]> {
    let mut items: Vec<&[u8]> = headers
        .get_all(ANTHROPIC_BETA)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|s| !s.is_empty())
        .collect();
    items.sort_unstable();
    items.dedup();
    items
}

/// Why a body has no canonical form (and so no key).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("request body is not valid JSON ({reason} at byte {offset})")]
pub struct KeyError {
    reason: &'static str,
    offset: usize,
}

impl KeyError {
    /// What was wrong.
    pub fn reason(&self) -> &'static str {
        self.reason
    }

    /// The byte offset in the body where it was found.
    pub fn offset(&self) -> usize {
        self.offset
    }
}

/// The canonical form of a JSON document (see the [module docs](self)), with the listed
/// top-level object members left out.
///
/// ```
/// use claude_cache::key::canonical_json;
///
/// # fn main() -> Result<(), claude_cache::key::KeyError> {
/// let a = canonical_json(br#"{ "b": [1, 2.50], "a": "\u00e9", "metadata": {"user_id": "u1"} }"#, &["metadata"])?;
/// let b = canonical_json("{\"a\":\"é\",\"b\":[1,2.50]}".as_bytes(), &["metadata"])?;
/// assert_eq!(a, b);
/// assert_eq!(a, "{\"a\":\"é\",\"b\":[1,2.50]}".as_bytes());
/// # Ok(())
/// # }
/// ```
///
/// # Errors
///
/// [`KeyError`] when `input` is not one valid JSON value (surrounded by optional
/// whitespace), or nests deeper than [`MAX_DEPTH`].
pub fn canonical_json<S: AsRef<str>>(input: &[u8], ignore: &[S]) -> Result<Vec<u8>, KeyError> {
    let mut c = Canon {
        src: input,
        pos: 0,
        out: Vec::with_capacity(input.len()),
        spans: Vec::new(),
        scratch: Vec::new(),
        depth: 0,
    };
    c.skip_ws();
    c.value(Some(ignore))?;
    c.skip_ws();
    if c.pos != input.len() {
        return Err(c.err("trailing characters"));
    }
    Ok(c.out)
}

/// One object member in `out`: `"key":value` spans `start..end`, the key `start..key_end`.
#[derive(Clone, Copy)]
struct Span {
    start: usize,
    key_end: usize,
    end: usize,
}

struct Canon<'a> {
    src: &'a [u8],
    pos: usize,
    out: Vec<u8>,
    /// A stack of member spans shared by all open objects (each uses the part above the
    /// length it found on entry).
    spans: Vec<Span>,
    scratch: Vec<u8>,
    depth: usize,
}

impl Canon<'_> {
    fn err(&self, reason: &'static str) -> KeyError {
        KeyError {
            reason,
            offset: self.pos,
        }
    }

    fn skip_ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.src.get(self.pos) {
            self.pos += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.src.get(self.pos).copied()
    }

    fn value<S: AsRef<str>>(&mut self, ignore: Option<&[S]>) -> Result<(), KeyError> {
        match self.peek() {
            Some(b'{') => self.object(ignore),
            Some(b'[') => self.array(),
            Some(b'"') => self.string(),
            Some(b't') => self.literal(b"true"),
            Some(b'f') => self.literal(b"false"),
            Some(b'n') => self.literal(b"null"),
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(_) => Err(self.err("expected a value")),
            None => Err(self.err("unexpected end")),
        }
    }

    fn enter(&mut self) -> Result<(), KeyError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(self.err("nesting too deep"));
        }
        Ok(())
    }

    fn literal(&mut self, word: &'static [u8]) -> Result<(), KeyError> {
        if self.src[self.pos..].starts_with(word) {
            self.pos += word.len();
            self.out.extend_from_slice(word);
            Ok(())
        } else {
            Err(self.err("invalid literal"))
        }
    }

    fn digits(&mut self) -> usize {
        let start = self.pos;
        while let Some(b'0'..=b'9') = self.peek() {
            self.pos += 1;
        }
        self.pos - start
    }

    fn number(&mut self) -> Result<(), KeyError> {
        let start = self.pos;
        if self.peek() == Some(b'-') {
            self.pos += 1;
        }
        match self.peek() {
            Some(b'0') => self.pos += 1,
            Some(b'1'..=b'9') => {
                self.digits();
            }
            _ => return Err(self.err("invalid number")),
        }
        if self.peek() == Some(b'.') {
            self.pos += 1;
            if self.digits() == 0 {
                return Err(self.err("invalid number"));
            }
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.pos += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.pos += 1;
            }
            if self.digits() == 0 {
                return Err(self.err("invalid number"));
            }
        }
        self.out.extend_from_slice(&self.src[start..self.pos]);
        Ok(())
    }

    /// Copies a string in its canonical form: runs of plain characters as they are (after
    /// a UTF-8 and control-character check), escapes decoded and re-encoded the one way.
    fn string(&mut self) -> Result<(), KeyError> {
        self.pos += 1; // the opening quote
        self.out.push(b'"');
        loop {
            let Some(rel) = memchr::memchr2(b'"', b'\\', &self.src[self.pos..]) else {
                self.pos = self.src.len();
                return Err(self.err("unterminated string"));
            };
            let run = &self.src[self.pos..self.pos + rel];
            // Escapes and quotes are ASCII, so a run never splits a UTF-8 sequence.
            if run.iter().any(|&b| b < 0x20) {
                return Err(self.err("control character in string"));
            }
            if std::str::from_utf8(run).is_err() {
                return Err(self.err("invalid UTF-8 in string"));
            }
            self.out.extend_from_slice(run);
            self.pos += rel;
            if self.src[self.pos] == b'"' {
                self.pos += 1;
                self.out.push(b'"');
                return Ok(());
            }
            self.escape()?;
        }
    }

    /// Decodes the escape at `pos` (a backslash) and writes its canonical form.
    fn escape(&mut self) -> Result<(), KeyError> {
        let Some(&c) = self.src.get(self.pos + 1) else {
            return Err(self.err("unterminated string"));
        };
        self.pos += 2;
        let short: &[u8] = match c {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'/' => b"/",
            b'b' => b"\\b",
            b'f' => b"\\f",
            b'n' => b"\\n",
            b'r' => b"\\r",
            b't' => b"\\t",
            b'u' => {
                let ch = self.unicode_escape()?;
                write_char(&mut self.out, ch);
                return Ok(());
            }
            _ => return Err(self.err("invalid string escape")),
        };
        self.out.extend_from_slice(short);
        Ok(())
    }

    fn hex4(&mut self) -> Result<u32, KeyError> {
        let digits = self
            .src
            .get(self.pos..self.pos + 4)
            .ok_or_else(|| self.err("invalid unicode escape"))?;
        let mut v = 0u32;
        for &d in digits {
            let n = match d {
                b'0'..=b'9' => d - b'0',
                b'a'..=b'f' => d - b'a' + 10,
                b'A'..=b'F' => d - b'A' + 10,
                _ => return Err(self.err("invalid unicode escape")),
            };
            v = v * 16 + u32::from(n);
        }
        self.pos += 4;
        Ok(v)
    }

    /// The character of a `\uXXXX` escape (after the `u`), pairing surrogates.
    fn unicode_escape(&mut self) -> Result<char, KeyError> {
        let hi = self.hex4()?;
        let code = match hi {
            0xD800..=0xDBFF => {
                if self.src.get(self.pos..self.pos + 2) != Some(b"\\u") {
                    return Err(self.err("lone surrogate"));
                }
                self.pos += 2;
                let lo = self.hex4()?;
                if !(0xDC00..=0xDFFF).contains(&lo) {
                    return Err(self.err("lone surrogate"));
                }
                0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00)
            }
            0xDC00..=0xDFFF => return Err(self.err("lone surrogate")),
            _ => hi,
        };
        char::from_u32(code).ok_or_else(|| self.err("invalid unicode escape"))
    }

    fn array(&mut self) -> Result<(), KeyError> {
        self.enter()?;
        self.pos += 1; // [
        self.out.push(b'[');
        self.skip_ws();
        if self.peek() == Some(b']') {
            self.pos += 1;
        } else {
            loop {
                self.skip_ws();
                self.value::<&str>(None)?;
                self.skip_ws();
                match self.peek() {
                    Some(b',') => {
                        self.pos += 1;
                        self.out.push(b',');
                    }
                    Some(b']') => {
                        self.pos += 1;
                        break;
                    }
                    _ => return Err(self.err("expected `,` or `]`")),
                }
            }
        }
        self.out.push(b']');
        self.depth -= 1;
        Ok(())
    }

    fn object<S: AsRef<str>>(&mut self, ignore: Option<&[S]>) -> Result<(), KeyError> {
        self.enter()?;
        self.pos += 1; // {
        self.out.push(b'{');
        let first = self.out.len();
        let base = self.spans.len();
        self.skip_ws();
        if self.peek() == Some(b'}') {
            self.pos += 1;
        } else {
            loop {
                self.skip_ws();
                if self.peek() != Some(b'"') {
                    return Err(self.err("expected a string key"));
                }
                if self.spans.len() > base {
                    self.out.push(b',');
                }
                let start = self.out.len();
                self.string()?;
                let key_end = self.out.len();
                self.skip_ws();
                if self.peek() != Some(b':') {
                    return Err(self.err("expected `:`"));
                }
                self.pos += 1;
                self.out.push(b':');
                self.skip_ws();
                self.value::<&str>(None)?;
                self.spans.push(Span {
                    start,
                    key_end,
                    end: self.out.len(),
                });
                self.skip_ws();
                match self.peek() {
                    Some(b',') => self.pos += 1,
                    Some(b'}') => {
                        self.pos += 1;
                        break;
                    }
                    _ => return Err(self.err("expected `,` or `}`")),
                }
            }
        }
        self.finish_object(first, base, ignore);
        self.out.push(b'}');
        self.depth -= 1;
        Ok(())
    }

    /// Sorts the members written since `first` (spans above `base`) and drops ignored ones.
    fn finish_object<S: AsRef<str>>(&mut self, first: usize, base: usize, ignore: Option<&[S]>) {
        let out = &self.out;
        let key = |s: &Span| &out[s.start..s.key_end];
        let members = &mut self.spans[base..];
        let ignored = |s: &Span| {
            ignore.is_some_and(|names| {
                let k = key(s);
                // The key is written canonically: a quoted string.
                names.iter().any(|n| {
                    let n = n.as_ref().as_bytes();
                    k.len() == n.len() + 2 && &k[1..k.len() - 1] == n
                })
            })
        };
        let sorted = members.windows(2).all(|w| key(&w[0]) <= key(&w[1]));
        let any_ignored = members.iter().any(ignored);
        if sorted && !any_ignored {
            self.spans.truncate(base);
            return;
        }
        // Stable: duplicate keys keep their order.
        members.sort_by(|a, b| key(a).cmp(key(b)));
        let kept: Vec<Span> = members.iter().filter(|s| !ignored(s)).copied().collect();
        self.scratch.clear();
        self.scratch.extend_from_slice(&self.out[first..]);
        self.out.truncate(first);
        for (i, s) in kept.iter().enumerate() {
            if i > 0 {
                self.out.push(b',');
            }
            self.out
                .extend_from_slice(&self.scratch[s.start - first..s.end - first]);
        }
        self.spans.truncate(base);
    }
}

/// Writes one decoded character the canonical way: `"` and `\` escaped, control
/// characters as `\b \f \n \r \t` or `\u00xx`, everything else as UTF-8.
fn write_char(out: &mut Vec<u8>, ch: char) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    match ch {
        '"' => out.extend_from_slice(b"\\\""),
        '\\' => out.extend_from_slice(b"\\\\"),
        '\u{8}' => out.extend_from_slice(b"\\b"),
        '\u{c}' => out.extend_from_slice(b"\\f"),
        '\n' => out.extend_from_slice(b"\\n"),
        '\r' => out.extend_from_slice(b"\\r"),
        '\t' => out.extend_from_slice(b"\\t"),
        '\0'..='\u{1f}' => {
            let b = ch as u8;
            out.extend_from_slice(b"\\u00");
            out.push(HEX[usize::from(b >> 4)]);
            out.push(HEX[usize::from(b & 0xf)]);
        }
        _ => {
            let mut buf = [0u8; 4];
            out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http::HeaderValue;

    const NONE: &[&str] = &[];

    fn canon(s: &str) -> String {
        String::from_utf8(canonical_json(s.as_bytes(), NONE).unwrap()).unwrap()
    }

    #[test]
    fn sorts_keys_and_drops_whitespace() {
        assert_eq!(
            canon(" { \"b\" : 1 ,\n \"a\" : { \"z\": [ true, false, null ], \"y\": {} } } "),
            r#"{"a":{"y":{},"z":[true,false,null]},"b":1}"#
        );
        assert_eq!(canon("[]"), "[]");
        assert_eq!(canon("{}"), "{}");
        assert_eq!(canon("[ 1 , [ ] , { } ]"), "[1,[],{}]");
    }

    #[test]
    fn numbers_are_kept_as_written() {
        assert_eq!(
            canon("[1, 1.0, 1e2, -0, 1E+2, 12345678901234567890123]"),
            "[1,1.0,1e2,-0,1E+2,12345678901234567890123]"
        );
        // Two integers that are the same f64 stay different.
        assert_ne!(
            canon("[12345678901234567890123]"),
            canon("[12345678901234567890124]")
        );
    }

    #[test]
    fn strings_have_one_form() {
        assert_eq!(canon(r#"["\u00e9", "é"]"#), r#"["é","é"]"#);
        assert_eq!(canon(r#"["\/", "/"]"#), r#"["/","/"]"#);
        assert_eq!(
            canon(r#"["\u0041\n\"\\\t\u0001"]"#),
            r#"["A\n\"\\\t\u0001"]"#
        );
        assert_eq!(canon(r#"["\ud83d\ude00"]"#), "[\"\u{1f600}\"]");
        // Escaped keys sort by their canonical form.
        assert_eq!(canon(r#"{"\u0062":1,"a":2}"#), r#"{"a":2,"b":1}"#);
    }

    #[test]
    fn duplicate_keys_keep_their_order() {
        assert_eq!(canon(r#"{"b":0,"a":1,"a":2}"#), r#"{"a":1,"a":2,"b":0}"#);
        assert_ne!(canon(r#"{"a":1,"a":2}"#), canon(r#"{"a":2,"a":1}"#));
    }

    #[test]
    fn ignores_only_top_level_fields() {
        let body = br#"{"model":"m","metadata":{"user_id":"u"},"x":{"metadata":1}}"#;
        let out = canonical_json(body, &["metadata"]).unwrap();
        assert_eq!(out, br#"{"model":"m","x":{"metadata":1}}"#);
        // Sorted input with an ignored field in the middle.
        let out = canonical_json(br#"{"a":1,"metadata":2,"z":3}"#, &["metadata"]).unwrap();
        assert_eq!(out, br#"{"a":1,"z":3}"#);
        // A key that only starts like an ignored one is kept.
        let out = canonical_json(br#"{"metadatas":1}"#, &["metadata"]).unwrap();
        assert_eq!(out, br#"{"metadatas":1}"#);
    }

    #[test]
    fn rejects_invalid_json() {
        for bad in [
            "",
            "{",
            "}",
            "[1,]",
            "{\"a\"}",
            "{\"a\":}",
            "{a:1}",
            "01",
            "1.",
            "-",
            "1e",
            "tru",
            "nul",
            "\"abc",
            "\"a\\\"",
            "[1 2]",
            "{\"a\":1,}",
            "{} {}",
            "\"\u{1}\"",
            "\"\\x\"",
            "\"\\ud800\"",
            "NaN",
            "[1]x",
        ] {
            assert!(
                canonical_json(bad.as_bytes(), NONE).is_err(),
                "accepted {bad:?}"
            );
        }
        assert!(canonical_json(b"\"\xff\"", NONE).is_err());
        let deep = "[".repeat(MAX_DEPTH + 1) + &"]".repeat(MAX_DEPTH + 1);
        let e = canonical_json(deep.as_bytes(), NONE).unwrap_err();
        assert_eq!(e.reason(), "nesting too deep");
        let ok = "[".repeat(MAX_DEPTH) + &"]".repeat(MAX_DEPTH);
        assert!(canonical_json(ok.as_bytes(), NONE).is_ok());
    }

    #[test]
    fn canonical_form_is_a_fixed_point_and_valid_json() {
        let src = r#"{"z":{"k":[1,{"b":"\u00e9\n","a":-1.5e-3}]},"a":"x","m":null}"#;
        let once = canonical_json(src.as_bytes(), NONE).unwrap();
        let twice = canonical_json(&once, NONE).unwrap();
        assert_eq!(once, twice);
        let a: serde_json::Value = serde_json::from_str(src).unwrap();
        let b: serde_json::Value = serde_json::from_slice(&once).unwrap();
        assert_eq!(a, b);
    }

    /// Writes `s` as a JSON string literal, escaping each character one of the allowed ways
    /// as `choice` says.
    fn escaped_any_way(s: &str, choice: &[u8]) -> String {
        use std::fmt::Write as _;
        let mut out = String::from("\"");
        for (i, ch) in s.chars().enumerate() {
            let c = choice.get(i).copied().unwrap_or(0) % 3;
            let must = ch == '"' || ch == '\\' || ch < ' ';
            match (c, ch) {
                (0, _) if !must => out.push(ch),
                (1, '"') => out.push_str("\\\""),
                (1, '\\') => out.push_str("\\\\"),
                (1, '\n') => out.push_str("\\n"),
                (1, '/') => out.push_str("\\/"),
                _ => {
                    let mut units = [0u16; 2];
                    for u in ch.encode_utf16(&mut units) {
                        if c == 2 {
                            write!(out, "\\u{u:04X}").unwrap();
                        } else {
                            write!(out, "\\u{u:04x}").unwrap();
                        }
                    }
                }
            }
        }
        out.push('"');
        out
    }

    proptest::proptest! {
        /// However a string is escaped, its canonical form is serde_json's encoding of it.
        #[test]
        fn strings_canonicalise_like_serde_json(s in "\\PC*|[\\x00-\\x7f]*", choice in proptest::collection::vec(0u8..3, 0..64)) {
            let input = escaped_any_way(&s, &choice);
            let canonical = canonical_json(input.as_bytes(), NONE).unwrap();
            proptest::prop_assert_eq!(canonical, serde_json::to_vec(&s).unwrap());
        }

        /// Member order does not matter; member values do.
        #[test]
        fn member_order_does_not_matter(members in proptest::collection::btree_map("[a-z\\u{e9}\"]{0,6}", -1000i64..1000, 0..12), rotate in 0usize..12) {
            let mut list: Vec<_> = members.iter().collect();
            let object = |list: &[(&String, &i64)]| {
                let inner: Vec<String> = list
                    .iter()
                    .map(|(k, v)| format!("{}: {v}", serde_json::to_string(k).unwrap()))
                    .collect();
                format!("{{ {} }}", inner.join(" , "))
            };
            let a = canonical_json(object(&list).as_bytes(), NONE).unwrap();
            if !list.is_empty() {
                let n = rotate % list.len();
                list.rotate_left(n);
                list.reverse();
            }
            let b = canonical_json(object(&list).as_bytes(), NONE).unwrap();
            proptest::prop_assert_eq!(&a, &b);
            let parsed: serde_json::Value = serde_json::from_slice(&a).unwrap();
            proptest::prop_assert_eq!(parsed.as_object().map(serde_json::Map::len), Some(members.len()));
        }
    }

    fn request(body: &'static str) -> Request<Bytes> {
        Request::post("/v1/messages")
            .header("anthropic-version", "2023-06-01")
            .body(Bytes::from_static(body.as_bytes()))
            .unwrap()
    }

    const BODY: &str =
        r#"{"model":"m","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}"#;

    fn key(req: &Request<Bytes>) -> CacheKey {
        CacheKey::for_request(req, &CacheConfig::default()).unwrap()
    }

    #[test]
    fn equivalent_requests_share_a_key() {
        let a = key(&request(BODY));
        let b = key(&request(
            r#"{ "messages": [ {"content":"hi", "role":"user"} ], "max_tokens": 5, "model": "m",
                "metadata": {"user_id": "someone"} }"#,
        ));
        assert_eq!(a, b);
        // A relay prefix is the same endpoint.
        let mut r = request(BODY);
        *r.uri_mut() = "/relay/v1/messages".parse().unwrap();
        assert_eq!(key(&r), a);
    }

    #[test]
    fn credentials_and_other_headers_do_not_enter_the_key() {
        let a = key(&request(BODY));
        let mut r = request(BODY);
        r.headers_mut()
            .insert("x-api-key", HeaderValue::from_static("sk-ant-1"));
        r.headers_mut()
            .insert("authorization", HeaderValue::from_static("Bearer t"));
        r.headers_mut()
            .insert("x-request-id", HeaderValue::from_static("r1"));
        assert_eq!(key(&r), a);
    }

    #[test]
    fn each_field_changes_the_key() {
        let base = key(&request(BODY));
        let mut seen = vec![base];
        let mut push = |k: CacheKey| {
            assert!(!seen.contains(&k), "{k} repeats");
            seen.push(k);
        };
        // body
        push(key(&request(
            r#"{"model":"m","max_tokens":6,"messages":[{"role":"user","content":"hi"}]}"#,
        )));
        push(key(&request(
            r#"{"model":"m","max_tokens":5,"stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
        )));
        // tenant
        let mut r = request(BODY);
        r.extensions_mut().insert(Tenant::new("team-b"));
        push(key(&r));
        // shared scope
        let shared = CacheConfig {
            scope: CacheScope::Shared,
            ..CacheConfig::default()
        };
        push(CacheKey::for_request(&request(BODY), &shared).unwrap());
        // endpoint
        let mut r = request(BODY);
        *r.uri_mut() = "/v1/messages/count_tokens".parse().unwrap();
        push(key(&r));
        // query
        let mut r = request(BODY);
        *r.uri_mut() = "/v1/messages?beta=true".parse().unwrap();
        push(key(&r));
        // version: other value, absent
        let mut r = request(BODY);
        r.headers_mut()
            .insert("anthropic-version", HeaderValue::from_static("2024-01-01"));
        push(key(&r));
        let mut r = request(BODY);
        r.headers_mut().remove("anthropic-version");
        push(key(&r));
        // beta
        let mut r = request(BODY);
        r.headers_mut()
            .insert("anthropic-beta", HeaderValue::from_static("a-1"));
        push(key(&r));
        // metadata counts when not ignored
        let keep = CacheConfig {
            key_ignore_fields: Vec::new(),
            ..CacheConfig::default()
        };
        let with_meta = request(
            r#"{"model":"m","max_tokens":5,"messages":[{"role":"user","content":"hi"}],"metadata":{"user_id":"u"}}"#,
        );
        push(CacheKey::for_request(&with_meta, &keep).unwrap());
    }

    #[test]
    fn tenant_and_shared_scopes_cannot_be_confused() {
        // A tenant literally named "shared" is still a tenant scope.
        let mut r = request(BODY);
        r.extensions_mut().insert(Tenant::new("shared"));
        let shared = CacheConfig {
            scope: CacheScope::Shared,
            ..CacheConfig::default()
        };
        assert_ne!(
            key(&r),
            CacheKey::for_request(&request(BODY), &shared).unwrap()
        );
        // Shared scope ignores the tenant.
        assert_eq!(
            CacheKey::for_request(&r, &shared).unwrap(),
            CacheKey::for_request(&request(BODY), &shared).unwrap()
        );
    }

    #[test]
    fn betas_are_normalised() {
        let with = |values: &[&'static str]| {
            let mut r = request(BODY);
            for v in values {
                r.headers_mut()
                    .append("anthropic-beta", HeaderValue::from_static(v));
            }
            key(&r)
        };
        let a = with(&["b-2,a-1"]);
        assert_eq!(a, with(&[" a-1 , b-2 "]));
        assert_eq!(a, with(&["a-1", "b-2"]));
        assert_eq!(a, with(&["b-2,a-1,a-1,"]));
        assert_ne!(a, with(&["a-1"]));
        // Field boundaries: one beta "a-1b-2" is not "a-1" + "b-2".
        assert_ne!(with(&["a-1b-2"]), a);
    }

    #[test]
    fn key_prints_as_hex() {
        let k = key(&request(BODY));
        assert_eq!(k.to_string().len(), 64);
        assert!(format!("{k:?}").starts_with("CacheKey("));
    }
}
