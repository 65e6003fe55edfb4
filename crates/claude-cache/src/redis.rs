//! A shared second level in Redis under the local cache (feature `redis`), so that several
//! gateway instances answer from one another's answers.
//!
//! # How it works
//!
//! - **Read.** On a local miss the leader of the flight (never its followers, so N identical
//!   misses cost one round trip) reads the entry from Redis with `GET`, bounded by
//!   [`RedisCache::timeout`]. A valid, fresh entry is inserted into the local cache and served
//!   as a hit; anything else is a miss and the request goes upstream.
//! - **Write.** An answer stored locally is also written with `SET key value PX lifetime`
//!   on the store task (never on the caller's path), so Redis drops it when it expires.
//!   Entries read from Redis are never written back.
//! - **Key.** `{prefix}{hex of the 256-bit cache key}` (default prefix `claude-cache:v1:`).
//!   The cache key is a BLAKE3 hash and no credential enters it, so the Redis key reveals
//!   nothing; the tenant scope is part of the hash, so tenants stay apart across instances
//!   too.
//! - **Value.** A compact binary record: a version tag, the stream flag, the status, the
//!   wall-clock store time (so `age` and `max-age` hold across instances), the lifetime, the
//!   replayed headers, the model, the frame index and the body. The usage report of a hit
//!   is rebuilt by scanning the stored body (the same scanner that produced it), and an entry
//!   whose body does not scan as a complete, error-free answer, or whose body is larger than
//!   [`CacheConfig::max_entry_bytes`](crate::CacheConfig::max_entry_bytes), is rejected.
//!
//! # When Redis is unreachable
//!
//! The cache passes through: a failed or timed-out `GET` is a miss, a failed `SET` is
//! dropped. No request fails because of Redis. Each failure counts in
//! `claude_cache_redis_errors_total` (label `op`: `get`, `set`, `decode`) and is logged at
//! `debug`, with one `warn` at most every 10 seconds. The connection is redis-rs's
//! `ConnectionManager`, created lazily on first use, which reconnects by itself: once Redis
//! is back, the second level works again with no action.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use claude_core::BodyFormat;
use claude_core::redis::RedisConn;
use claude_core::scan::scan_all;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

use crate::entry::Entry;
use crate::key::CacheKey;
use crate::metric_names;

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "claude-cache:v1:";
/// The default timeout of each Redis call.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(100);
const STORE: &str = "claude-cache: redis second level (passing through)";

const MAGIC: &[u8; 4] = b"CTC1";
const FLAG_STREAM: u8 = 1;
const FLAG_MODEL: u8 = 2;

/// The Redis second level of a [`CacheLayer`](crate::CacheLayer): where it connects, the key
/// prefix and the per-call timeout. Cheap to clone; clones share one connection.
///
/// ```no_run
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use claude_cache::{CacheLayer, RedisCache};
/// let layer = CacheLayer::default().redis(RedisCache::open("redis://127.0.0.1:6379/")?);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RedisCache {
    conn: RedisConn,
    prefix: Arc<str>,
}

impl fmt::Debug for RedisCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisCache")
            .field("addr", self.conn.addr())
            .field("prefix", &self.prefix)
            .field("timeout", &self.conn.timeout())
            .finish_non_exhaustive()
    }
}

impl RedisCache {
    /// A second level on the Redis server at `url` (`redis://[:password@]host:port/db`,
    /// `rediss://` needs redis-rs's TLS features). Nothing connects until the first use.
    ///
    /// # Errors
    ///
    /// When the URL does not parse.
    pub fn open(url: &str) -> redis::RedisResult<Self> {
        Ok(Self::new(redis::Client::open(url)?))
    }

    /// A second level through `client`.
    pub fn new(client: redis::Client) -> Self {
        Self {
            conn: RedisConn::new(client, STORE, metric_names::REDIS_ERRORS, DEFAULT_TIMEOUT),
            prefix: Arc::from(DEFAULT_PREFIX),
        }
    }

    /// Sets the key prefix (default [`DEFAULT_PREFIX`]).
    #[must_use]
    pub fn prefix(mut self, prefix: impl Into<Arc<str>>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Sets the timeout of every Redis call (default [`DEFAULT_TIMEOUT`], 100 ms). A call
    /// that takes longer counts as a failure: a miss for `GET`.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.conn = self.conn.with_timeout(timeout);
        self
    }

    /// The Redis key of a cache key.
    pub fn key(&self, key: &CacheKey) -> String {
        format!("{}{key}", self.prefix)
    }

    /// Reads the entry of `key`; `None` on absence or on any failure (counted and logged).
    pub(crate) async fn get(&self, key: &CacheKey, max_entry_bytes: u64) -> Option<Entry> {
        let raw: Vec<u8> = self
            .conn
            .query::<Option<Vec<u8>>>("get", redis::cmd("GET").arg(self.key(key)))
            .await??;
        let entry = decode(&raw, max_entry_bytes);
        if entry.is_some() {
            metrics::counter!(metric_names::REDIS_HITS).increment(1);
        } else {
            self.conn.failed("decode", &"invalid entry");
        }
        entry
    }

    /// Writes `entry` under `key` with its remaining lifetime as `PX`.
    pub(crate) async fn set(&self, key: &CacheKey, entry: &Entry) {
        let Some(remaining) = entry.lifetime.checked_sub(entry.age()) else {
            return;
        };
        let px = u64::try_from(remaining.as_millis()).unwrap_or(u64::MAX);
        if px == 0 {
            return;
        }
        let value = encode(entry);
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.key(key)).arg(value.as_ref()).arg("PX").arg(px);
        if self.conn.query::<()>("set", &cmd).await.is_some() {
            metrics::counter!(metric_names::REDIS_STORED).increment(1);
        }
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The binary record of an entry (see the module docs).
pub(crate) fn encode(e: &Entry) -> Bytes {
    let stored_at = SystemTime::now().checked_sub(e.age()).map_or(0, unix_ms);
    let model = e.model.as_deref().unwrap_or("");
    let mut out = BytesMut::with_capacity(64 + e.body.len() + e.frame_ends.len() * 4);
    out.put_slice(MAGIC);
    let mut flags = 0;
    if e.report.format == BodyFormat::Sse {
        flags |= FLAG_STREAM;
    }
    if e.model.is_some() {
        flags |= FLAG_MODEL;
    }
    out.put_u8(flags);
    out.put_u16(e.status.as_u16());
    out.put_u64(stored_at);
    out.put_u64(u64::try_from(e.lifetime.as_millis()).unwrap_or(u64::MAX));
    let headers: Vec<_> = e
        .headers
        .iter()
        .filter(|(k, v)| k.as_str().len() <= 0xFFFF && v.len() <= 0xFFFF)
        .take(0xFFFF)
        .collect();
    out.put_u16(headers.len() as u16);
    for (k, v) in headers {
        out.put_u16(k.as_str().len() as u16);
        out.put_slice(k.as_str().as_bytes());
        out.put_u16(v.len() as u16);
        out.put_slice(v.as_bytes());
    }
    let model = &model.as_bytes()[..model.len().min(0xFFFF)];
    out.put_u16(model.len() as u16);
    out.put_slice(model);
    out.put_u32(e.frame_ends.len() as u32);
    for end in &e.frame_ends {
        out.put_u32(*end);
    }
    out.put_u32(e.body.len() as u32);
    out.put_slice(&e.body);
    out.freeze()
}

/// Reads a record back; `None` when it is malformed, too large, expired, or does not hold a
/// complete answer.
pub(crate) fn decode(raw: &[u8], max_entry_bytes: u64) -> Option<Entry> {
    let mut b = raw;
    if b.len() < MAGIC.len() || &b[..MAGIC.len()] != MAGIC {
        return None;
    }
    b.advance(MAGIC.len());
    let flags = b.try_get_u8().ok()?;
    let status = StatusCode::from_u16(b.try_get_u16().ok()?).ok()?;
    let stored_at = UNIX_EPOCH.checked_add(Duration::from_millis(b.try_get_u64().ok()?))?;
    let lifetime = Duration::from_millis(b.try_get_u64().ok()?);
    let mut headers = HeaderMap::new();
    for _ in 0..b.try_get_u16().ok()? {
        let n = usize::from(b.try_get_u16().ok()?);
        let name = HeaderName::from_bytes(take(&mut b, n)?).ok()?;
        let n = usize::from(b.try_get_u16().ok()?);
        let value = take(&mut b, n)?;
        headers.append(name, HeaderValue::from_bytes(value).ok()?);
    }
    let n = usize::from(b.try_get_u16().ok()?);
    let model = take(&mut b, n)?;
    let model = (flags & FLAG_MODEL != 0)
        .then(|| std::str::from_utf8(model).ok().map(Arc::<str>::from))
        .flatten();
    let frames = b.try_get_u32().ok()? as usize;
    if frames > b.remaining() / 4 {
        return None;
    }
    let mut ends = Vec::with_capacity(frames);
    for _ in 0..frames {
        ends.push(b.try_get_u32().ok()?);
    }
    let len = b.try_get_u32().ok()?;
    if u64::from(len) > max_entry_bytes || len as usize != b.remaining() {
        return None;
    }
    // Frame ends rise and stay within the body.
    if ends.windows(2).any(|w| w[0] > w[1]) || ends.last().is_some_and(|&e| e > len) {
        return None;
    }
    let body = Bytes::copy_from_slice(b);
    let format = if flags & FLAG_STREAM == 0 {
        BodyFormat::Json
    } else {
        BodyFormat::Sse
    };
    let report = scan_all(format, &body);
    if !report.is_complete_success() {
        return None;
    }
    let age = SystemTime::now()
        .duration_since(stored_at)
        .unwrap_or(Duration::ZERO);
    if age >= lifetime {
        return None;
    }
    let stored_at = Instant::now().checked_sub(age)?;
    Some(Entry::restored(
        status,
        headers,
        body,
        ends.into_boxed_slice(),
        report,
        model,
        stored_at,
        lifetime,
    ))
}

fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if b.len() < n {
        return None;
    }
    let (head, rest) = b.split_at(n);
    *b = rest;
    Some(head)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::Head;
    use claude_core::headers::REQUEST_ID;
    use http::header::CONTENT_TYPE;

    const SSE: &str = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"m-1\",\"usage\":{\"input_tokens\":3,\"output_tokens\":1}}}\n\nevent: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":7}}\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";

    fn entry(body: &'static str, sse: bool) -> Entry {
        let mut h = HeaderMap::new();
        let ct = if sse {
            "text/event-stream"
        } else {
            "application/json"
        };
        h.insert(CONTENT_TYPE, HeaderValue::from_static(ct));
        h.insert(REQUEST_ID, HeaderValue::from_static("req_1"));
        let format = if sse {
            BodyFormat::Sse
        } else {
            BodyFormat::Json
        };
        let head = Head {
            status: StatusCode::OK,
            headers: h,
            model: Some(Arc::from("req-model")),
            lifetime: Duration::from_secs(60),
        };
        let b = Bytes::from_static(body.as_bytes());
        let frames = [b.slice(..10), b.slice(10..)];
        Entry::new(head, &frames, scan_all(format, body.as_bytes()))
    }

    #[test]
    fn round_trips_a_stream_with_its_frames_usage_and_age() {
        let e = entry(SSE, true);
        let raw = encode(&e);
        let d = decode(&raw, 1 << 20).expect("decodes");
        assert_eq!(d.status, StatusCode::OK);
        assert_eq!(d.headers, e.headers);
        assert_eq!(d.body, e.body);
        assert_eq!(d.frame_ends, e.frame_ends);
        assert_eq!(d.report.usage, e.report.usage);
        assert_eq!(d.report.format, BodyFormat::Sse);
        assert_eq!(d.model.as_deref(), Some("m-1"));
        assert_eq!(d.lifetime, e.lifetime);
        assert!(d.age() < Duration::from_secs(2));
        assert_eq!(d.weight, e.weight);
    }

    #[test]
    fn round_trips_json() {
        let json =
            r#"{"type":"message","content":[],"usage":{"input_tokens":9,"output_tokens":4}}"#;
        let e = entry(json, false);
        let d = decode(&encode(&e), 1 << 20).expect("decodes");
        assert_eq!(d.report.usage.output_tokens, 4);
        assert_eq!(d.report.format, BodyFormat::Json);
        assert_eq!(d.model.as_deref(), Some("req-model"));
    }

    #[test]
    fn rejects_garbage_truncation_oversize_and_incomplete_bodies() {
        let raw = encode(&entry(SSE, true));
        assert!(decode(b"", 1 << 20).is_none());
        assert!(decode(b"XXXX", 1 << 20).is_none());
        for n in 0..raw.len() {
            assert!(decode(&raw[..n], 1 << 20).is_none(), "truncated at {n}");
        }
        assert!(decode(&raw, 10).is_none(), "larger than the cap");
        let partial = &SSE[..SSE.find("event: message_stop").unwrap_or(0)];
        let mut e = entry(SSE, true);
        e.body = Bytes::from_static(partial.as_bytes());
        e.frame_ends = vec![partial.len() as u32].into_boxed_slice();
        assert!(decode(&encode(&e), 1 << 20).is_none(), "not complete");
    }

    #[test]
    fn expired_entries_are_misses() {
        let mut e = entry(SSE, true);
        e.lifetime = Duration::from_millis(1);
        let raw = encode(&e);
        std::thread::sleep(Duration::from_millis(5));
        assert!(decode(&raw, 1 << 20).is_none());
    }
}
