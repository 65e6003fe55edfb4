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
//! check), escapes are decoded in place, and nesting is limited to [`MAX_DEPTH`] levels. The
//! parse writes each value once, with each object's members in the order they came. An
//! object whose keys are not in order (most requests: the SDKs write `model` before
//! `messages`, `role` before `content`) is put in order in place when it is small (a copy
//! out and back of at most 8 KiB); a larger one is not rewritten but recorded, and its
//! members are put in order as the canonical form is written into the BLAKE3 hasher
//! (through a 16 KiB buffer on the stack whose flushes end on BLAKE3's chunk boundaries, so
//! the hasher keeps hashing several chunks at once). So a large request is copied once,
//! where it used to be copied twice more for every level of out-of-order objects. The
//! canonical form is still built whole in one buffer about as large as the body before it
//! is hashed: the key hashes its length before it (the layout above, which cannot change
//! without changing every key), and an object's members can only be ordered once all are
//! read. The cost is linear in the body; the `cache` bench measures it on a 100 KB request.
//! Each thread keeps the canonicaliser's buffers between keys (up to 64 KiB each), so a key
//! of an ordinary request allocates nothing once its thread has made one.
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
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct CacheKey([u8; 32]);

/// Hashes 8 of the 32 bytes: they are already a uniform hash, so the rest adds nothing to
/// where a key lands in a table, only cost to every lookup (the cache, the in-flight map).
/// The table's own hasher still mixes them (with a seed of its own, for std's and moka's
/// maps), so no request can choose its bucket.
impl std::hash::Hash for CacheKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let mut first = [0; 8];
        first.copy_from_slice(&self.0[..8]);
        state.write_u64(u64::from_le_bytes(first));
    }
}

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
        let canonical = Canon::run(body, ignore)?;
        // Everything before the canonical form is gathered first and given to the hasher in
        // one update (BLAKE3 hashes a stream: how it is cut does not change the hash, and
        // each update has a fixed cost).
        let mut prefix = Vec::with_capacity(192);
        field(&mut prefix, DOMAIN);
        let (kind, id): (&[u8], &str) = match scope {
            Some(id) => (b"tenant", id),
            None => (b"shared", ""),
        };
        field(&mut prefix, kind);
        field(&mut prefix, id.as_bytes());
        field(&mut prefix, endpoint.as_str().as_bytes());
        optional(&mut prefix, query.map(str::as_bytes));
        optional_joined(&mut prefix, headers, &ANTHROPIC_VERSION);
        let betas = betas(headers);
        prefix.extend_from_slice(&(betas.len() as u64).to_le_bytes());
        for b in &betas {
            field(&mut prefix, b);
        }
        let mut h = blake3::Hasher::new();
        h.update(&prefix);
        // The canonical form is written straight into the hasher, objects' members in their
        // canonical order, after its length (as `field` would write it).
        h.update(&(canonical.len() as u64).to_le_bytes());
        if canonical.reorders.is_empty() {
            h.update(&canonical.out);
        } else {
            let fed = h.count();
            let mut sink = HashSink::new(&mut h, fed);
            canonical.write(&mut sink);
            sink.flush();
        }
        Workspace::give_back(canonical);
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

fn field(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
    out.extend_from_slice(bytes);
}

fn optional(out: &mut Vec<u8>, bytes: Option<&[u8]>) {
    match bytes {
        Some(b) => {
            out.push(1);
            field(out, b);
        }
        None => out.push(0),
    }
}

/// All values of a header, trimmed and joined with `,`, written as an optional field
/// (absent when the header is).
fn optional_joined(out: &mut Vec<u8>, headers: &HeaderMap, name: &http::HeaderName) {
    let mut values = headers.get_all(name).iter();
    let Some(first) = values.next() else {
        out.push(0);
        return;
    };
    out.push(1);
    // The length goes before the bytes: write a placeholder and fill it in at the end.
    let at = out.len();
    out.extend_from_slice(&[0; 8]);
    out.extend_from_slice(first.as_bytes().trim_ascii());
    for v in values {
        // As the key has always been written: no comma while nothing is written yet.
        if out.len() > at + 8 {
            out.push(b',');
        }
        out.extend_from_slice(v.as_bytes().trim_ascii());
    }
    let len = (out.len() - at - 8) as u64;
    out[at..at + 8].copy_from_slice(&len.to_le_bytes());
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
    let c = Canon::run(input, ignore)?;
    if c.reorders.is_empty() {
        // Every object was in order with nothing left out: `out` is the canonical form.
        return Ok(c.out);
    }
    let mut v = Vec::with_capacity(c.len());
    c.write(&mut v);
    Ok(v)
}

/// Where [`Canon::write`] puts the canonical form.
trait Sink {
    fn put(&mut self, bytes: &[u8]);
}

impl Sink for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

/// Feeds a BLAKE3 hasher through a buffer on the stack whose flushes end on the hasher's
/// 1 KiB chunk boundaries. BLAKE3 hashes whole chunks several at a time (SIMD), but a chunk
/// that an update starts or ends in the middle of is hashed alone: handing it the pieces of
/// a reordered object one by one would hash most chunks alone. Copying the pieces into the
/// buffer costs less.
struct HashSink<'h> {
    hasher: &'h mut blake3::Hasher,
    buf: [u8; HASH_BUF],
    len: usize,
    /// Where the current fill of `buf` ends: `HASH_BUF`, less for the first fill so that
    /// it ends on a chunk boundary.
    end: usize,
}

/// The buffer of [`HashSink`]: 16 chunks.
const HASH_BUF: usize = 16 * 1024;

impl<'h> HashSink<'h> {
    /// A sink for `hasher`, which has been given `fed` bytes so far.
    fn new(hasher: &'h mut blake3::Hasher, fed: u64) -> Self {
        const CHUNK: u64 = 1024;
        Self {
            hasher,
            buf: [0; HASH_BUF],
            len: 0,
            end: HASH_BUF - (fed % CHUNK) as usize,
        }
    }

    fn flush(&mut self) {
        self.hasher.update(&self.buf[..self.len]);
        self.len = 0;
        self.end = HASH_BUF;
    }
}

impl Sink for HashSink<'_> {
    fn put(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let n = bytes.len().min(self.end - self.len);
            self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
            self.len += n;
            bytes = &bytes[n..];
            if self.len == self.end {
                self.flush();
            }
        }
    }
}

/// One object member in `out`: `"key":value` spans `start..end`, the key `start..key_end`.
#[derive(Clone, Copy)]
struct Span {
    start: usize,
    key_end: usize,
    end: usize,
}

/// An object whose members are not written in canonical order in `out` (or has members to
/// leave out): its `{` is `out[open]`, its members lie in `out[open + 1..end]`, and are
/// written as `Canon::members[members]` lists them.
struct Reorder {
    open: usize,
    end: usize,
    members: std::ops::Range<usize>,
}

/// The canonicaliser: one pass over the input writes every value canonically into `out`,
/// with each object's members in their input order; an object whose members are not in
/// canonical order is recorded (a [`Reorder`]) rather than rewritten, and
/// [`write`](Self::write) puts the members in order as it writes `out` out.
struct Canon<'a> {
    src: &'a [u8],
    pos: usize,
    out: Vec<u8>,
    /// A stack of member spans shared by all open objects (each uses the part above the
    /// length it found on entry).
    spans: Vec<Span>,
    /// The objects to write in another order, by position once the parse is done.
    reorders: Vec<Reorder>,
    /// The members of those objects, in canonical order, ignored ones left out.
    members: Vec<Span>,
    /// The bytes of `out` that the canonical form leaves out (ignored members).
    removed: usize,
    /// Where a small object is put in order (never larger than [`REORDER_IN_PLACE`]).
    scratch: Vec<u8>,
    depth: usize,
}

/// The canonicaliser's buffers, kept by each thread between two keys so that a key costs no
/// allocation once its thread has made one of about the same size. A buffer that grew past
/// [`Workspace::KEEP`] (a large request) is freed rather than kept.
#[derive(Default)]
struct Workspace {
    out: Vec<u8>,
    spans: Vec<Span>,
    reorders: Vec<Reorder>,
    members: Vec<Span>,
    scratch: Vec<u8>,
}

thread_local! {
    static SPARE: std::cell::Cell<Option<Workspace>> = const { std::cell::Cell::new(None) };
}

impl Workspace {
    /// The most bytes of each buffer a thread keeps.
    const KEEP: usize = 64 * 1024;

    /// This thread's spare buffers, or new ones.
    fn take() -> Self {
        SPARE
            .try_with(std::cell::Cell::take)
            .ok()
            .flatten()
            .unwrap_or_else(|| Self {
                // Room for the members of a few levels of objects at once.
                spans: Vec::with_capacity(32),
                ..Self::default()
            })
    }

    /// Keeps the buffers of `c` for this thread's next key.
    fn give_back(c: Canon<'_>) {
        fn keep<T>(mut v: Vec<T>) -> Vec<T> {
            v.clear();
            if v.capacity() * std::mem::size_of::<T>() > Workspace::KEEP {
                v = Vec::new();
            }
            v
        }
        let w = Self {
            out: keep(c.out),
            spans: keep(c.spans),
            reorders: keep(c.reorders),
            members: keep(c.members),
            scratch: keep(c.scratch),
        };
        // During thread teardown there is nowhere to keep them: they are dropped.
        let _ = SPARE.try_with(|s| s.set(Some(w)));
    }
}

/// The largest object (in canonical bytes) put in order in place, by a copy to the scratch
/// buffer and back; a larger one is recorded and put in order as it is hashed. Measured on
/// 100 KB requests in SDK order: copying small objects costs less than recording them,
/// copying the large ones (at each level of nesting) more; between 4 and 16 KiB it made no
/// difference that could be measured.
const REORDER_IN_PLACE: usize = 8192;

impl<'a> Canon<'a> {
    /// Parses `input` (see [`canonical_json`]).
    fn run<S: AsRef<str>>(input: &'a [u8], ignore: &[S]) -> Result<Self, KeyError> {
        let Workspace {
            mut out,
            spans,
            reorders,
            members,
            scratch,
        } = Workspace::take();
        out.reserve(input.len());
        let mut c = Canon {
            src: input,
            pos: 0,
            out,
            spans,
            reorders,
            members,
            removed: 0,
            scratch,
            depth: 0,
        };
        c.skip_ws();
        c.value(Some(ignore))?;
        c.skip_ws();
        if c.pos != input.len() {
            return Err(c.err("trailing characters"));
        }
        // Objects finish inner first; `write` looks them up by position.
        c.reorders.sort_unstable_by_key(|r| r.open);
        Ok(c)
    }

    /// The length of the canonical form.
    fn len(&self) -> usize {
        self.out.len() - self.removed
    }

    /// Writes the canonical form.
    fn write(&self, sink: &mut impl Sink) {
        self.write_range(0, self.out.len(), sink);
    }

    /// Writes `out[from..to]` (a whole value, member, or run of them) canonically.
    fn write_range(&self, mut from: usize, to: usize, sink: &mut impl Sink) {
        loop {
            let next = self.reorders.partition_point(|r| r.open < from);
            match self.reorders.get(next) {
                Some(r) if r.open < to => {
                    // Up to the `{`; the members follow it, so the lookups below do not
                    // find this object again.
                    sink.put(&self.out[from..=r.open]);
                    for (i, m) in self.members[r.members.clone()].iter().enumerate() {
                        if i > 0 {
                            sink.put(b",");
                        }
                        // Nested objects lie inside one member: the recursion is as deep as
                        // the nesting (at most MAX_DEPTH).
                        self.write_range(m.start, m.end, sink);
                    }
                    from = r.end;
                }
                _ => {
                    sink.put(&self.out[from..to]);
                    return;
                }
            }
        }
    }

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
        // A short plain string (member names, roles, types: printable ASCII, no escape) is
        // found eight bytes at a time, faster than memchr's set-up.
        let rest = &self.src[self.pos..];
        if let Some(n) = claude_core::scan::plain_run_end(&rest[..rest.len().min(32)])
            && rest[n] == b'"'
        {
            self.out.reserve(n + 2);
            self.out.push(b'"');
            self.out.extend_from_slice(&rest[..=n]);
            self.pos += n + 1;
            return Ok(());
        }
        self.out.push(b'"');
        loop {
            let Some(rel) = memchr::memchr2(b'"', b'\\', &self.src[self.pos..]) else {
                self.pos = self.src.len();
                return Err(self.err("unterminated string"));
            };
            let run = &self.src[self.pos..self.pos + rel];
            // Escapes and quotes are ASCII, so a run never splits a UTF-8 sequence. Printable
            // ASCII, the usual case, is checked in one pass; anything else is checked in full.
            if !printable_ascii(run) {
                if run.iter().any(|&b| b < 0x20) {
                    return Err(self.err("control character in string"));
                }
                if std::str::from_utf8(run).is_err() {
                    return Err(self.err("invalid UTF-8 in string"));
                }
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

    /// Records the canonical order of the members written since `first` (spans above
    /// `base`), ignored ones left out, unless they are in order already.
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
        let at = self.members.len();
        self.members
            .extend(members.iter().filter(|s| !ignored(s)).copied());
        self.spans.truncate(base);
        if out.len() - first <= REORDER_IN_PLACE {
            // A small object holds no recorded one (those are larger), and nothing after it
            // is written yet: rewriting it in order moves no recorded position.
            self.scratch.clear();
            self.scratch.extend_from_slice(&self.out[first..]);
            self.out.truncate(first);
            for (i, s) in self.members[at..].iter().enumerate() {
                if i > 0 {
                    self.out.push(b',');
                }
                self.out
                    .extend_from_slice(&self.scratch[s.start - first..s.end - first]);
            }
            self.members.truncate(at);
            return;
        }
        let kept = &self.members[at..];
        let kept_len =
            kept.iter().map(|s| s.end - s.start).sum::<usize>() + kept.len().saturating_sub(1);
        self.removed += out.len() - first - kept_len;
        self.reorders.push(Reorder {
            open: first - 1,
            end: out.len(),
            members: at..self.members.len(),
        });
    }
}

/// Whether every byte of `run` is printable ASCII (0x20..=0x7f). Folds without an early exit
/// so that it compiles to vector compares.
fn printable_ascii(run: &[u8]) -> bool {
    run.chunks(64).all(|c| {
        c.iter().fold(0u8, |outside, &b| {
            outside | u8::from(b.wrapping_sub(0x20) >= 0x60)
        }) == 0
    })
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
        // Past the first 64-byte piece of a long run, too; valid non-ASCII still passes.
        let long = "a".repeat(100);
        for (tail, ok) in [("\u{1}", false), ("\u{7f}é", true), ("", true)] {
            let text = format!("\"{long}{tail}{long}\"");
            assert_eq!(
                canonical_json(text.as_bytes(), NONE).is_ok(),
                ok,
                "{tail:?}"
            );
        }
        let mut bad_utf8 = format!("\"{long}").into_bytes();
        bad_utf8.extend_from_slice(b"\xc3\"");
        assert!(canonical_json(&bad_utf8, NONE).is_err());
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

    /// The canonicaliser keeps its buffers per thread between keys: what one key leaves in
    /// them (a large reordered object, an ignored member, a failed parse, a buffer past what
    /// is kept) never changes the next key.
    #[test]
    fn a_key_is_the_same_whatever_came_before_it_on_the_thread() {
        let (fresh, canonical) = std::thread::spawn(|| {
            (
                key(&request(BODY)),
                canonical_json(BODY.as_bytes(), &["metadata"]).unwrap(),
            )
        })
        .join()
        .unwrap();
        let large: &'static str = format!(
            r#"{{"z":[{{"b":1,"a":"{}"}}],"metadata":{{"user_id":"u"}},"a":{{"y":2,"x":1}}}}"#,
            "x".repeat(100_000)
        )
        .leak();
        for before in [large, r#"{"b":1,"a":"#, r#"{"b":{"d":1,"c":2},"a":[3]}"#] {
            let _ = CacheKey::for_request(&request(before), &CacheConfig::default());
            assert_eq!(key(&request(BODY)), fresh, "after {before:.40}");
            assert_eq!(
                canonical_json(BODY.as_bytes(), &["metadata"]).unwrap(),
                canonical
            );
        }
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

    /// Request bodies whose keys were computed by the canonicaliser as it was before the
    /// canonical form went straight into the hasher: SDK member order (nothing sorted),
    /// sorted input, escapes, duplicates, nesting, ignored and kept `metadata`.
    const GOLDEN_BODIES: &[&str] = &[
        r#"{"model":"m","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}"#,
        r#"{"max_tokens":5,"messages":[{"content":"hi","role":"user"}],"model":"m"}"#,
        r#"{ "model" : "claude-sonnet-4-5", "max_tokens" : 1024, "stream" : true, "metadata" : {"user_id":"u"}, "system" : "S\u00e9\n\"q\"\/", "messages" : [ {"role":"user","content":[{"type":"text","text":"a\tb","cache_control":{"type":"ephemeral","ttl":"1h"}}]}, {"role":"assistant","content":"ok"} ], "temperature" : 0.70, "top_k" : 1e2 }"#,
        r#"{"metadata":{"user_id":"u"},"z":[{"b":{"d":1,"c":[{"f":0,"e":{}}]},"a":-0.5E-3}],"a":null}"#,
        r#"{"b":0,"a":1,"a":2,"\u0061":3,"metadata":1,"metadata":2}"#,
        r#"{"a":{"metadata":{"y":1,"x":2}},"metadatas":1,"metadat":2," ":3,"!":4,"\n":5}"#,
        r#"[{"b":1,"a":2},{"d":{"f":1,"e":2},"c":3},[],{},"x",1.0,true,false,null]"#,
        r#""just a string \ud83d\ude00 \u0001""#,
        r#"{"tools":[{"name":"t","input_schema":{"type":"object","properties":{"q":{"type":"string"}},"required":["q"]}}],"tool_choice":{"type":"auto"},"model":"m","messages":[]}"#,
        "{}",
        "[]",
        "12345678901234567890123",
    ];

    fn golden_key(body: &str, scope: CacheScope) -> CacheKey {
        let mut r = request_owned(body);
        r.extensions_mut().insert(Tenant::new("team-a"));
        r.headers_mut()
            .append("anthropic-beta", HeaderValue::from_static("b-2, a-1"));
        let config = CacheConfig {
            scope,
            ..CacheConfig::default()
        };
        CacheKey::for_request(&r, &config).unwrap()
    }

    fn request_owned(body: &str) -> Request<Bytes> {
        Request::post("/v1/messages?beta=true")
            .header("anthropic-version", "2023-06-01")
            .body(Bytes::from(body.to_owned()))
            .unwrap()
    }

    /// A 100 KB conversation in SDK member order, with escapes and nested unsorted objects.
    fn big_body() -> String {
        use std::fmt::Write as _;
        let mut b = String::from(
            r#"{"model":"claude-sonnet-4-5","max_tokens":1024,"stream":true,"system":"You are helpful.","metadata":{"user_id":"u-1"},"messages":["#,
        );
        let mut i = 0;
        while b.len() < 100_000 {
            if i > 0 {
                b.push(',');
            }
            let role = if i % 2 == 0 { "user" } else { "assistant" };
            write!(
                b,
                r#"{{"role":"{role}","content":[{{"type":"text","text":"Turn {i}: \"quoted\"\ttab caf\u00e9 \ud83d\ude00 {}","cache_control":{{"type":"ephemeral"}}}}]}}"#,
                "lorem ipsum dolor sit amet ".repeat(i % 7 * 5)
            )
            .unwrap();
            i += 1;
        }
        b.push_str("]}");
        b
    }

    /// SDK member order with turns of about 10 KB: nested objects larger than
    /// `REORDER_IN_PLACE`, put in order as they are hashed.
    fn long_turns_body() -> String {
        use std::fmt::Write as _;
        let mut b =
            String::from(r#"{"model":"m","max_tokens":1,"metadata":{"user_id":"u"},"messages":["#);
        for i in 0..4 {
            if i > 0 {
                b.push(',');
            }
            write!(
                b,
                r#"{{"role":"user","content":[{{"type":"text","text":"{}","cache_control":{{"type":"ephemeral"}}}},{{"type":"text","text":"short {i}"}}],"z":{{"b":"{}","a":1}}}}"#,
                "caf\\u00e9 \\\"x\\\" lorem\\n ".repeat(600 + i * 100),
                "y".repeat(9000),
            )
            .unwrap();
        }
        b.push_str("]}");
        b
    }

    /// The keys of [`GOLDEN_BODIES`], then [`big_body`] and [`long_turns_body`], `(tenant
    /// scope, shared scope)`,
    /// as the canonicaliser computed them when it built the whole canonical form in a `Vec`
    /// (reordering objects in place) before hashing it: keys must never change silently.
    const GOLDEN_KEYS: &[(&str, &str)] = &[
        (
            "3b49015c7a75a15cb717449f684b1aede8e406a21f08f01eecc751cd5b1882ec",
            "bb61de872db1c4f911e7a5e93ef2e06d97a7eca0464a275f4e6b735c82453fe2",
        ),
        (
            "3b49015c7a75a15cb717449f684b1aede8e406a21f08f01eecc751cd5b1882ec",
            "bb61de872db1c4f911e7a5e93ef2e06d97a7eca0464a275f4e6b735c82453fe2",
        ),
        (
            "ed798e3c28f45b676bcea9a54573bea71381fb30c31b86322e280a148abdc8a1",
            "1b961ccfb3afc3d6b32088b507a7349f0cacb37f0de179f3e991469a40053a82",
        ),
        (
            "4271c82b5ab0c5980be8d1adb240c704793bb9bbf0e7a90ed235beaafbd2d6d1",
            "900ef099f5dc17df8a2c594a494895c660ae05d18850a0563033c3dd59d9d113",
        ),
        (
            "04fad8d361756a4b46479ceb0e76c2d9a5cd1005f10815599759eeb64593f214",
            "339d5e3fcabb145aa6d4df2d6edc181eb7828fbb6240387357fc21aad1d99ff4",
        ),
        (
            "b8da5acae3d8519dfe3022a62be56ea6cff29fb807f7b53decd6b804ed7626de",
            "0ad236b9b1559b247a723247205ac8dac2a862847b76f1286a9449614d957529",
        ),
        (
            "ad71c0190c2cc26eedcd506e1db9ffa1e417760f37d60b15c83071bb1f211e86",
            "1cbfdb171155ac2db69b9a5e4c35f83a444a6f5bd574451712463a642f50fc41",
        ),
        (
            "31e4400b8599f668b674e21898c84c98dea45b83102c6401eddb562cdaf5c72b",
            "a78dc16e1361b54d6b094f847fa8be862c0291a23dd79d5b79397d897d16a545",
        ),
        (
            "f9ae57ce3424cafb5161edb427f62d2fedfe1058da98a0540de5968e96d5d930",
            "ac136a2b3af81a964552db44159b0febffde321ff6bbd0fc34b109b9e0205f3d",
        ),
        (
            "33aaf711e13c44c17b306547b92c983b4d72089bc66a191ee2c7cb8c614b1090",
            "f3a9700c93999b412efa03de6513595a1f67f72c4139854e7ddc77b0d7bb5b59",
        ),
        (
            "545d454b6c4774d2565b52bd8e5bafcdb9167165385c72dc1d745ab0b5ffa047",
            "eb53a5665c1a570f9b9954f9b38a6a432a440057d66f0f09b124f355585674bf",
        ),
        (
            "ec89cb4b71b8e2a444692d54988149802888865b81d77b82be6b5845c75e75e3",
            "b1fcc4a3351fb7024ed3a13d79ebc9d8763f377e9aa91e46dc1a986a43d97ef6",
        ),
        (
            "537b1ecaf3648c25c7aef5a5c9fc00f2f5c721c9e160ca2df7a9b3310d5580ff",
            "6c8d4b3100d1afe679334e5f6b477034244d76f282cb4745fd1f4762d171dbe7",
        ),
        (
            "813d6d69b88b17e0a5a6fbc1184e7031141f365817ac5df8f09a81872bd3734c",
            "baae1a61fa22ffae35c73543d4e21573bc853383ca69c0d20373591ff654d726",
        ),
    ];

    #[test]
    fn keys_are_unchanged() {
        let (big, long) = (big_body(), long_turns_body());
        let bodies = GOLDEN_BODIES
            .iter()
            .copied()
            .chain([big.as_str(), long.as_str()]);
        assert_eq!(bodies.clone().count(), GOLDEN_KEYS.len());
        for (body, (tenant, shared)) in bodies.zip(GOLDEN_KEYS) {
            assert_eq!(
                golden_key(body, CacheScope::Tenant).to_string(),
                *tenant,
                "{body}"
            );
            assert_eq!(
                golden_key(body, CacheScope::Shared).to_string(),
                *shared,
                "{body}"
            );
        }
    }

    /// The key of a shared-scope `messages` request with no query and no headers, hashed
    /// from canonical bytes given in full (the layout of the module docs).
    fn key_of_canonical(canonical: &[u8]) -> CacheKey {
        let mut bytes = Vec::new();
        for f in [DOMAIN, b"shared", b"", b"messages"] {
            field(&mut bytes, f);
        }
        optional(&mut bytes, None);
        optional(&mut bytes, None);
        bytes.extend_from_slice(&0u64.to_le_bytes());
        field(&mut bytes, canonical);
        CacheKey(*blake3::hash(&bytes).as_bytes())
    }

    /// The key as the module docs lay it out, each field given to the hasher on its own
    /// (how `from_parts` wrote it before it gathered the fields into one update).
    fn key_field_by_field(
        scope: Option<&str>,
        query: Option<&str>,
        headers: &HeaderMap,
        body: &[u8],
    ) -> CacheKey {
        fn put(h: &mut blake3::Hasher, b: &[u8]) {
            h.update(&(b.len() as u64).to_le_bytes());
            h.update(b);
        }
        fn put_optional(h: &mut blake3::Hasher, b: Option<&[u8]>) {
            match b {
                Some(b) => {
                    h.update(&[1]);
                    put(h, b);
                }
                None => {
                    h.update(&[0]);
                }
            }
        }
        let mut h = blake3::Hasher::new();
        put(&mut h, DOMAIN);
        let (kind, id) = scope.map_or((&b"shared"[..], ""), |id| (&b"tenant"[..], id));
        put(&mut h, kind);
        put(&mut h, id.as_bytes());
        put(&mut h, b"messages");
        put_optional(&mut h, query.map(str::as_bytes));
        let mut version: Option<Vec<u8>> = None;
        for v in headers.get_all(ANTHROPIC_VERSION) {
            let buf = version.get_or_insert_with(Vec::new);
            if !buf.is_empty() {
                buf.push(b',');
            }
            buf.extend_from_slice(v.as_bytes().trim_ascii());
        }
        put_optional(&mut h, version.as_deref());
        // The betas' normalisation did not change with the layout: the same function.
        let betas = betas(headers);
        h.update(&(betas.len() as u64).to_le_bytes());
        for b in &betas {
            put(&mut h, b);
        }
        put(&mut h, &canonical_json(body, &["metadata"]).unwrap());
        CacheKey(*h.finalize().as_bytes())
    }

    #[test]
    fn the_fields_gathered_in_one_update_give_the_key_field_by_field() {
        let body = br#"{"model":"m","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}"#;
        let versions: [&[&str]; 5] = [
            &[],
            &["2023-06-01"],
            &["", "2023-06-01"],
            &[" 2023-06-01 ", "", "x"],
            &["", ""],
        ];
        let betas: [&[&str]; 3] = [&[], &["b, a"], &["", "a,,b", " c "]];
        let mut seen = std::collections::HashSet::new();
        for scope in [None, Some("team-a"), Some("")] {
            for query in [None, Some(""), Some("beta=true")] {
                for v in versions {
                    for b in betas {
                        let mut headers = HeaderMap::new();
                        for x in v {
                            headers.append(ANTHROPIC_VERSION, HeaderValue::from_str(x).unwrap());
                        }
                        for x in b {
                            headers.append(ANTHROPIC_BETA, HeaderValue::from_str(x).unwrap());
                        }
                        let key = CacheKey::from_parts(
                            scope,
                            Endpoint::Messages,
                            query,
                            &headers,
                            body,
                            &["metadata"],
                        )
                        .unwrap();
                        assert_eq!(
                            key,
                            key_field_by_field(scope, query, &headers, body),
                            "{scope:?} {query:?} {v:?} {b:?}"
                        );
                        seen.insert(key);
                    }
                }
            }
        }
        // `["2023-06-01"]` and `["", "2023-06-01"]` join to the same value; every other
        // combination is a key of its own.
        assert_eq!(seen.len(), 3 * 3 * 4 * 3);
    }

    /// A JSON text with random whitespace, member order, duplicate keys, escapes, and
    /// strings long enough to cross the hasher's buffer.
    fn json_text() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let ws = prop_oneof![Just(""), Just(""), Just(" "), Just("\n\t ")];
        let leaf = prop_oneof![
            Just("null".to_owned()),
            Just("true".to_owned()),
            Just("-0.50E+3".to_owned()),
            Just("12345678901234567890123".to_owned()),
            "[a-z\\u{e9}\"\\\\
/]{0,12}"
                .prop_map(|t| serde_json::to_string(&t).unwrap()),
            Just(r#""\u00e9\/\ud83d\ude00\u0001""#.to_owned()),
            (0usize..3, 0usize..12_000)
                .prop_map(|(k, n)| format!("\"{}\"", ["x", "\\n", "é"][k].repeat(n))),
        ];
        leaf.prop_recursive(5, 64, 8, move |inner| {
            let ws = ws.clone();
            prop_oneof![
                proptest::collection::vec((inner.clone(), ws.clone()), 0..6).prop_map(|items| {
                    let items: Vec<String> = items
                        .into_iter()
                        .map(|(v, w)| format!("{w}{v}{w}"))
                        .collect();
                    format!("[{}]", items.join(","))
                }),
                proptest::collection::vec(
                    ("[abm]|metadata|\\u0061|\\u006detadata", inner, ws),
                    0..6
                )
                .prop_map(|members| {
                    let members: Vec<String> = members
                        .into_iter()
                        .map(|(k, v, w)| format!("{w}\"{k}\"{w}:{w}{v}{w}"))
                        .collect();
                    format!("{{{}}}", members.join(","))
                }),
            ]
        })
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 512, ..proptest::prelude::ProptestConfig::default() })]

        /// The canonical form hashed piece by piece gives the key of the canonical form
        /// hashed whole, and that form is a fixed point.
        #[test]
        fn the_key_hashes_the_canonical_form(doc in json_text(), ignore_b in proptest::bool::ANY) {
            let ignore: &[&str] = if ignore_b { &["metadata", "b"] } else { &["metadata"] };
            let canonical = canonical_json(doc.as_bytes(), ignore).unwrap();
            let key = CacheKey::from_parts(None, Endpoint::Messages, None, &HeaderMap::new(), doc.as_bytes(), ignore).unwrap();
            proptest::prop_assert_eq!(key, key_of_canonical(&canonical));
            proptest::prop_assert_eq!(canonical_json(&canonical, NONE).unwrap(), canonical);
        }
    }

    #[test]
    fn key_prints_as_hex() {
        let k = key(&request(BODY));
        assert_eq!(k.to_string().len(), 64);
        assert!(format!("{k:?}").starts_with("CacheKey("));
    }
}
