//! What the cache stores for one answer, and what it weighs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use claude_core::UsageReport;
use claude_core::headers::REQUEST_ID;
use http::header::CONTENT_TYPE;
use http::{HeaderMap, HeaderName, StatusCode};

/// The response headers a hit replays. Everything else is left out: rate-limit headers
/// describe the moment of the original request and would mislead a client now,
/// `retry-after`/`date` likewise, `content-length`/`transfer-encoding`/`connection` belong
/// to the hop (hyper sets them for the replay), and `set-cookie` or anything credential-like
/// must never be served to someone else. `request-id` is kept: it names the upstream request
/// that produced the body being replayed (the `age` header and `x-claude-cache: HIT` say it
/// is a replay).
pub(crate) const REPLAYED_HEADERS: [HeaderName; 2] = [CONTENT_TYPE, REQUEST_ID];

/// One stored answer.
#[derive(Debug)]
pub(crate) struct Entry {
    pub(crate) status: StatusCode,
    /// The [`REPLAYED_HEADERS`] the answer carried.
    pub(crate) headers: HeaderMap,
    /// The whole body, in one exactly sized allocation (see [`Entry::new`]).
    pub(crate) body: Bytes,
    /// Where each original frame ended in `body`, so a replay has the original framing.
    pub(crate) frame_ends: Box<[u32]>,
    /// The usage report of the original answer.
    pub(crate) report: UsageReport,
    /// The model that answered (from the response, else the request).
    pub(crate) model: Option<Arc<str>>,
    pub(crate) stored_at: Instant,
    pub(crate) lifetime: Duration,
    /// Body bytes + replayed header bytes + the frame index, saturated to `u32`.
    pub(crate) weight: u32,
}

/// The parts of an entry known when the response head arrives.
#[derive(Debug)]
pub(crate) struct Head {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) model: Option<Arc<str>>,
    pub(crate) lifetime: Duration,
}

impl Head {
    /// Keeps the [`REPLAYED_HEADERS`] of `headers`.
    pub(crate) fn replayed_headers(headers: &HeaderMap) -> HeaderMap {
        let mut out = HeaderMap::with_capacity(REPLAYED_HEADERS.len());
        for name in REPLAYED_HEADERS {
            for v in headers.get_all(&name) {
                // Copy the value: a header parsed by hyper is a slice of the connection's
                // read buffer, and cloning it would keep that whole buffer alive for the
                // entry's lifetime, unseen by the weigher.
                if let Ok(mut copy) = http::HeaderValue::from_bytes(v.as_bytes()) {
                    copy.set_sensitive(v.is_sensitive());
                    out.append(name.clone(), copy);
                }
            }
        }
        out
    }
}

impl Entry {
    /// Builds an entry from the frames that passed to the caller.
    ///
    /// The frames are copied once into a single buffer. Keeping the refcounted frames
    /// themselves would cost no copy, but a frame handed out by hyper is a slice of its
    /// connection read buffer (8 KiB to 400 KiB), and holding the slice keeps the whole
    /// buffer alive: a 300-byte answer could pin kilobytes that no weigher sees, and the
    /// byte bound would not hold. The copy runs once per stored answer, off the caller's
    /// path (in the store task); hits replay slices of the buffer without copying.
    pub(crate) fn new(head: Head, frames: &[Bytes], report: UsageReport) -> Self {
        let total: usize = frames.iter().map(Bytes::len).sum();
        let mut buf = BytesMut::with_capacity(total);
        let mut ends = Vec::with_capacity(frames.len());
        for f in frames.iter().filter(|f| !f.is_empty()) {
            buf.extend_from_slice(f);
            ends.push(u32::try_from(buf.len()).unwrap_or(u32::MAX));
        }
        let weight = weight(total, &head.headers, ends.len());
        let model = report.model.clone().or(head.model);
        Self {
            status: head.status,
            headers: head.headers,
            body: buf.freeze(),
            frame_ends: ends.into_boxed_slice(),
            report,
            model,
            stored_at: Instant::now(),
            lifetime: head.lifetime,
            weight,
        }
    }

    /// An entry read back from a second level (its body already in one buffer).
    #[cfg(feature = "redis")]
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn restored(
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
        frame_ends: Box<[u32]>,
        report: UsageReport,
        model: Option<Arc<str>>,
        stored_at: Instant,
        lifetime: Duration,
    ) -> Self {
        let weight = weight(body.len(), &headers, frame_ends.len());
        Self {
            status,
            headers,
            body,
            frame_ends,
            report,
            model,
            stored_at,
            lifetime,
            weight,
        }
    }

    /// How long ago the answer was stored.
    pub(crate) fn age(&self) -> Duration {
        self.stored_at.elapsed()
    }

    /// Frame `i` of the replay (a slice of the stored buffer, no copy).
    pub(crate) fn frame(&self, i: usize) -> Option<Bytes> {
        let end = *self.frame_ends.get(i)? as usize;
        let start = match i {
            0 => 0,
            _ => self.frame_ends[i - 1] as usize,
        };
        Some(self.body.slice(start..end))
    }

    /// The number of frames of the replay.
    pub(crate) fn frames(&self) -> usize {
        self.frame_ends.len()
    }
}

/// The memory an entry costs besides its body, headers and frame index: the entry itself,
/// its `Arc`, the key, moka's node, the header map's table and the usage report. An estimate
/// (about 1 KiB, from a memory soak of small answers), counted so that `max_bytes` bounds
/// what the process really holds even when answers are tiny.
pub(crate) const ENTRY_OVERHEAD: usize = 1024;

/// Body bytes + replayed header bytes + 4 per frame + [`ENTRY_OVERHEAD`], saturated to `u32`.
fn weight(body: usize, headers: &HeaderMap, frames: usize) -> u32 {
    let header_bytes: usize = headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len())
        .sum();
    let w = body
        .saturating_add(header_bytes)
        .saturating_add(frames * 4)
        .saturating_add(ENTRY_OVERHEAD);
    u32::try_from(w).unwrap_or(u32::MAX)
}

/// Per-entry lifetimes for moka: the lifetime chosen when the answer was stored (the
/// configured TTL, or less with `max-age`), also when it replaces an older entry.
#[derive(Debug, Clone, Copy)]
pub(crate) struct EntryExpiry;

impl<K> moka::Expiry<K, Arc<Entry>> for EntryExpiry {
    fn expire_after_create(&self, _: &K, v: &Arc<Entry>, _: Instant) -> Option<Duration> {
        Some(v.lifetime)
    }

    fn expire_after_update(
        &self,
        _: &K,
        v: &Arc<Entry>,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(v.lifetime)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn head() -> Head {
        let mut h = HeaderMap::new();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
        h.insert(REQUEST_ID, HeaderValue::from_static("req_1"));
        h.insert("set-cookie", HeaderValue::from_static("a=b"));
        h.insert(
            "anthropic-ratelimit-requests-remaining",
            HeaderValue::from_static("3"),
        );
        h.insert("content-length", HeaderValue::from_static("9"));
        Head {
            status: StatusCode::OK,
            headers: Head::replayed_headers(&h),
            model: Some(Arc::from("req-model")),
            lifetime: Duration::from_secs(5),
        }
    }

    #[test]
    fn keeps_only_replayed_headers() {
        let h = head().headers;
        assert_eq!(h.len(), 2);
        assert_eq!(h["content-type"], "text/event-stream");
        assert_eq!(h["request-id"], "req_1");
    }

    #[test]
    fn frames_are_compacted_and_replayed_with_their_boundaries() {
        let backing = Bytes::from_static(b"xxabcdefghixx");
        let frames = [
            backing.slice(2..5),
            Bytes::new(),
            backing.slice(5..6),
            backing.slice(6..11),
        ];
        let e = Entry::new(head(), &frames, UsageReport::default());
        assert_eq!(&e.body[..], b"abcdefghi");
        assert_eq!(e.frames(), 3);
        let replay: Vec<Bytes> = (0..e.frames()).filter_map(|i| e.frame(i)).collect();
        assert_eq!(replay, [&b"abc"[..], b"d", b"efghi"]);
        assert_eq!(e.frame(3), None);
        // The stored body does not point into the frames' buffer.
        let range = backing.as_ptr_range();
        assert!(!range.contains(&e.body.as_ptr()));
    }

    #[test]
    fn weight_counts_body_headers_and_index() {
        let frames = [Bytes::from_static(b"0123456789")];
        let e = Entry::new(head(), &frames, UsageReport::default());
        let headers =
            "content-type".len() + "text/event-stream".len() + "request-id".len() + "req_1".len();
        assert_eq!(e.weight as usize, 10 + headers + 4 + ENTRY_OVERHEAD);
    }

    #[test]
    fn replayed_headers_do_not_pin_the_response_buffer() {
        let buffer = Bytes::from(b"xxxxxxxxtext/event-stream".repeat(100));
        let value = http::HeaderValue::from_maybe_shared(buffer.slice(8..25)).unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(http::header::CONTENT_TYPE, value);
        let kept = Head::replayed_headers(&headers);
        let v = kept.get(http::header::CONTENT_TYPE).unwrap();
        assert_eq!(v, "text/event-stream");
        let range = buffer.as_ptr_range();
        assert!(
            !range.contains(&v.as_bytes().as_ptr()),
            "the value was copied"
        );
    }

    #[test]
    fn model_prefers_the_response() {
        let report = UsageReport {
            model: Some("resp-model".into()),
            ..UsageReport::default()
        };
        let e = Entry::new(head(), &[], report);
        assert_eq!(e.model.as_deref(), Some("resp-model"));
        let e = Entry::new(head(), &[], UsageReport::default());
        assert_eq!(e.model.as_deref(), Some("req-model"));
    }
}
