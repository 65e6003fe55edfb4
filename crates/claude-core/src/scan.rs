//! The usage scanner: reads usage from a response body as its frames pass, for both shapes.
//!
//! - **SSE** (`text/event-stream`): `message_start` usage is the base, then every
//!   `message_delta` usage replaces the fields it carries (the API's counts are cumulative:
//!   never summed). `ping` and unknown events are ignored; `event: error` is captured;
//!   `message_stop` marks completion. Lines are split across any frame boundary (`\n`,
//!   `\r\n`, `\r`). Lines are read where they lie in the frame, and an event that starts
//!   and ends in one frame (the usual case: the API sends one event per frame) has its data
//!   parsed in place; only the start of a line or of an event that a frame leaves unfinished
//!   is copied, into a buffer carried to the next frame. Events are told apart by their
//!   `event:` name: the data of `ping`, `content_block_*` and unknown events is neither kept
//!   nor parsed, and nothing of an event's JSON is copied but the strings the report keeps
//!   (`model`, the error). An `event:` line equal to the previous one (a run of text
//!   deltas) is known without being read again. The data of the events that are parsed is
//!   read by hand when it has the shape the API sends (validated whole as strictly as serde
//!   would), and by serde otherwise, with the same result either way.
//! - **JSON**: an incremental tokenizer tracks nesting and strings and captures only the
//!   top-level `usage`, `model`, `type` and `error` values; the rest (the content text) is
//!   skipped without copying, and inside a nested value it stops only at quotes and
//!   brackets. A captured value is read where it lies when it ends in the chunk it began
//!   in (the usual case); only one that a chunk leaves unfinished is copied. The usage
//!   object and plain strings are read by hand when they have the shape the API sends, and
//!   by serde otherwise, with the same result either way.
//!
//! Memory is bounded whatever the input: a line or captured value longer than
//! [`MAX_CAPTURE`] is skipped (and counted in [`UsageReport::oversized`]). The scanner never
//! panics on arbitrary bytes.

use std::ops::Range;
use std::sync::Arc;

use memchr::{memchr, memchr2};
use serde::Deserialize;

use crate::skim::Skim;
use crate::usage::{Usage, UsageMerge, WireUsage};

/// The most bytes kept for one SSE line/event data or one captured JSON value (64 KiB).
pub const MAX_CAPTURE: usize = 64 * 1024;

/// The two body shapes the scanner reads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum BodyFormat {
    /// A JSON document.
    #[default]
    Json,
    /// A server-sent-event stream.
    Sse,
}

impl BodyFormat {
    /// The format announced by a `content-type` header: SSE for `text/event-stream`, JSON
    /// otherwise.
    pub fn from_content_type(content_type: Option<&http::HeaderValue>) -> Self {
        const SSE: &[u8] = b"text/event-stream";
        let Some(ct) = content_type.map(http::HeaderValue::as_bytes) else {
            return Self::Json;
        };
        match ct.trim_ascii_start().get(..SSE.len()) {
            Some(prefix) if prefix.eq_ignore_ascii_case(SSE) => Self::Sse,
            _ => Self::Json,
        }
    }
}

/// How a scanned body ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum BodyEnd {
    /// Still being read.
    #[default]
    InProgress,
    /// The body reached its end.
    Ended,
    /// The body failed with an error (e.g. the connection broke).
    Failed,
    /// The body was dropped before its end (the client went away).
    Dropped,
}

/// An Anthropic error seen in a body (`event: error` in a stream, or a JSON error envelope).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ApiError {
    /// `error.type`, e.g. `overloaded_error`.
    pub error_type: String,
    /// `error.message`.
    pub message: String,
}

/// What the scanner learnt from a body.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsageReport {
    /// The merged usage (a lower bound when the body did not complete).
    pub usage: Usage,
    /// Whether any usage object was seen at all.
    pub saw_usage: bool,
    /// `model` as the response named it (shared: a report is copied to every layer that
    /// reads it, and a cache hit replays it).
    pub model: Option<Arc<str>>,
    /// The body shape.
    pub format: BodyFormat,
    /// SSE: `message_stop` was seen. JSON: a complete top-level value was read.
    pub completed: bool,
    /// The first error the body carried, if any.
    pub error: Option<ApiError>,
    /// How the body ended.
    pub end: BodyEnd,
    /// Bytes of body seen.
    pub body_bytes: u64,
    /// SSE events dispatched (all types, including `ping` and unknown ones).
    pub events: u64,
    /// Lines or values skipped because they exceeded [`MAX_CAPTURE`], or events whose JSON
    /// did not parse.
    pub oversized: u64,
}

impl UsageReport {
    /// A body that ended normally, completed, and carried no error: the only kind a cache
    /// may store.
    pub fn is_complete_success(&self) -> bool {
        self.end == BodyEnd::Ended && self.completed && self.error.is_none()
    }
}

/// Incremental usage scanner. Feed it every data frame, then [`finish`](Self::finish).
#[derive(Debug, Clone)]
pub struct UsageScanner {
    format: BodyFormat,
    merge: UsageMerge,
    report: UsageReport,
    sse: SseReader,
    json: JsonState,
}

impl UsageScanner {
    /// A scanner for the given body shape.
    pub fn new(format: BodyFormat) -> Self {
        Self {
            format,
            merge: UsageMerge::default(),
            report: UsageReport {
                format,
                ..UsageReport::default()
            },
            sse: SseReader::default(),
            json: JsonState::default(),
        }
    }

    /// A scanner for a response with these headers (SSE for `text/event-stream`).
    pub fn for_headers(headers: &http::HeaderMap) -> Self {
        Self::new(BodyFormat::from_content_type(
            headers.get(http::header::CONTENT_TYPE),
        ))
    }

    /// The body shape being scanned.
    pub fn format(&self) -> BodyFormat {
        self.format
    }

    /// Reads the next piece of the body.
    pub fn feed(&mut self, chunk: &[u8]) {
        self.report.body_bytes += chunk.len() as u64;
        match self.format {
            BodyFormat::Sse => self.feed_sse(chunk),
            BodyFormat::Json => self.json.feed(chunk),
        }
    }

    /// The report so far (usage is a lower bound until the body ends).
    pub fn snapshot(&self) -> UsageReport {
        let mut r = self.report.clone();
        if self.format == BodyFormat::Json {
            self.json.fill(&mut r);
        } else {
            r.usage = self.merge.usage();
            r.saw_usage = self.merge.seen;
        }
        r
    }

    /// Ends the scan with how the body ended, and returns the report.
    ///
    /// For SSE, an event not terminated by a blank line is discarded, as the SSE spec says
    /// (a client would not have seen it either).
    pub fn finish(&mut self, end: BodyEnd) -> UsageReport {
        self.report.end = end;
        self.snapshot()
    }

    /// Whether an SSE `event: error` or JSON error envelope has been seen so far.
    pub fn error(&self) -> Option<&ApiError> {
        self.report.error.as_ref()
    }

    /// Number of SSE events dispatched so far.
    pub fn events(&self) -> u64 {
        self.report.events
    }

    // ===== SSE =====

    fn feed_sse(&mut self, chunk: &[u8]) {
        let mut events = UsageEvents {
            merge: &mut self.merge,
            report: &mut self.report,
        };
        self.sse.feed(chunk, &mut events);
    }
}

/// The SSE side of [`UsageScanner`]: what it does with each event.
struct UsageEvents<'a> {
    merge: &'a mut UsageMerge,
    report: &'a mut UsageReport,
}

impl SseHandler for UsageEvents<'_> {
    fn event(&mut self, name: Option<EventName>, data: Option<&[u8]>) {
        self.report.events += 1;
        let Some(data) = data.filter(|d| !d.is_empty()) else {
            return;
        };
        let named = name.filter(|n| *n != EventName::Empty);
        match named {
            // Nothing to learn from these: no parse.
            Some(EventName::Other) => return,
            // The exact data the API sends: no parse needed to know it is valid.
            Some(EventName::MessageStop) if data == MESSAGE_STOP => {
                self.report.completed = true;
                return;
            }
            _ => {}
        }
        let Some((kind, ev)) = parse_event(named, data) else {
            if matches!(
                named,
                Some(EventName::MessageStart | EventName::MessageDelta | EventName::Error)
            ) {
                self.report.oversized += 1;
            }
            return;
        };
        match kind {
            EventName::MessageStart => {
                if let Some(m) = ev.message {
                    if let Some(u) = &m.usage {
                        self.merge.apply(u);
                    }
                    if let Some(model) = m.model {
                        self.report.model = Some(Arc::from(model));
                    }
                }
            }
            EventName::MessageDelta => {
                if let Some(u) = &ev.usage {
                    self.merge.apply(u);
                }
            }
            EventName::MessageStop => self.report.completed = true,
            EventName::Error if self.report.error.is_none() => {
                self.report.error = Some(ev.error.unwrap_or_default().into_api_error());
            }
            _ => {}
        }
    }

    fn oversized(&mut self) {
        self.report.oversized += 1;
    }
}

/// Parses an event's data: its kind (the `event:` name, or without one the JSON `type`)
/// and the fields the scanner reads. `None` when the data is not such JSON.
fn parse_event(named: Option<EventName>, data: &[u8]) -> Option<(EventName, SseEvent)> {
    let ev = match fast_event(data) {
        Some(ev) => ev,
        None => serde_json::from_slice::<SseEvent>(data).ok()?,
    };
    Some((named.or(ev.kind).unwrap_or(EventName::Empty), ev))
}

/// [`SseEvent::read`] (off in tests that compare it with serde alone).
fn fast_event(data: &[u8]) -> Option<SseEvent> {
    #[cfg(test)]
    if tests::SERDE_ONLY.get() {
        return None;
    }
    SseEvent::read(data)
}

/// The start of a server-sent-event stream, read up to the end of its first event without
/// parsing anything but an `event: error`: enough to decide whether a stream failed before
/// it began (and may be retried, since its reader has seen nothing yet).
///
/// It reads every frame it is fed to the end, as [`UsageScanner`] does, so an error event
/// that follows the first event in the same frame is seen too. Lines and events split
/// across frames are joined as the scanner joins them, with the same bound
/// ([`MAX_CAPTURE`]); [`error`](Self::error) is what the scanner's
/// [`UsageReport::error`] would be for the same bytes.
///
/// ```
/// use claude_core::scan::FirstEvent;
///
/// let mut peek = FirstEvent::new();
/// peek.feed(b"event: error\ndata: {\"type\":\"error\",\"error\":");
/// assert!(!peek.ended());
/// peek.feed(b"{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n");
/// assert!(peek.ended());
/// assert_eq!(peek.error().map(|e| e.error_type.as_str()), Some("overloaded_error"));
/// ```
#[derive(Debug, Clone, Default)]
pub struct FirstEvent {
    sse: SseReader,
    peek: FirstEventPeek,
}

#[derive(Debug, Clone, Default)]
struct FirstEventPeek {
    events: u64,
    error: Option<ApiError>,
}

impl FirstEvent {
    /// A peek at the start of a stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads the next piece of the stream.
    pub fn feed(&mut self, chunk: &[u8]) {
        self.sse.feed(chunk, &mut self.peek);
    }

    /// Whether at least one event has ended (been dispatched by a blank line).
    pub fn ended(&self) -> bool {
        self.peek.events > 0
    }

    /// The first `event: error` among the events read so far.
    pub fn error(&self) -> Option<&ApiError> {
        self.peek.error.as_ref()
    }
}

impl SseHandler for FirstEventPeek {
    fn event(&mut self, name: Option<EventName>, data: Option<&[u8]>) {
        self.events += 1;
        let named = name.filter(|n| *n != EventName::Empty);
        // Only an error, or an event whose JSON type has to tell, is parsed.
        if self.error.is_some() || !matches!(named, None | Some(EventName::Error)) {
            return;
        }
        if let Some(data) = data.filter(|d| !d.is_empty())
            && let Some((EventName::Error, ev)) = parse_event(named, data)
        {
            self.error = Some(ev.error.unwrap_or_default().into_api_error());
        }
    }

    fn oversized(&mut self) {}
}

/// What [`SseReader`] reports its events to.
trait SseHandler {
    /// An event ended: `name` from its `event:` line (if any), `data` its `data:` lines
    /// joined with `\n` (`None` without a data line; the data of an unwanted event, see
    /// [`SseReader::event_wanted`], is not kept and is then empty).
    fn event(&mut self, name: Option<EventName>, data: Option<&[u8]>);
    /// A line or an event's data was over [`MAX_CAPTURE`] and skipped.
    fn oversized(&mut self);
}

impl SseReader {
    /// Reads SSE bytes. Whole lines are read where they lie in `chunk`, and the data of a
    /// wanted event is handed over in place when the event ends in the same chunk (the
    /// usual case: one event per frame). Only what a chunk leaves open is copied: the start
    /// of an unfinished line, and the data of an event that has not ended yet (both bounded
    /// by [`MAX_CAPTURE`]).
    fn feed(&mut self, chunk: &[u8], h: &mut impl SseHandler) {
        let mut pos = 0;
        // The current event's data when it lies in `chunk` (then `self.data` is empty).
        let mut here: Option<Range<usize>> = None;
        match chunk.first() {
            None => return,
            Some(&first) => {
                if std::mem::take(&mut self.after_cr) && first == b'\n' {
                    pos = 1;
                }
            }
        }
        if self.line_open() {
            let rest = &chunk[pos..];
            let Some(i) = memchr2(b'\n', b'\r', rest) else {
                self.carry(rest, h);
                return;
            };
            self.carry(&rest[..i], h);
            self.after_cr = rest[i] == b'\r';
            pos += i + 1;
            self.carried_line_end(chunk, &mut here, h);
        }
        while pos < chunk.len() {
            if std::mem::take(&mut self.after_cr) && chunk[pos] == b'\n' {
                pos += 1;
                continue;
            }
            if let Some(n) = self.same_event_line(&chunk[pos..]) {
                let end = pos + n;
                self.after_cr = chunk[end] == b'\r';
                pos = end + 1;
                continue;
            }
            let Some(i) = line_end(&chunk[pos..]) else {
                self.carry(&chunk[pos..], h);
                break;
            };
            let end = pos + i;
            self.after_cr = chunk[end] == b'\r';
            self.line(chunk, pos..end, &mut here, h);
            pos = end + 1;
        }
        if let Some(r) = here {
            // The event goes on in the next chunk: keep its data.
            self.data.reserve(r.len().max(DATA_CAPACITY));
            self.data.extend_from_slice(&chunk[r]);
        }
    }

    /// A whole line of `chunk` (without its terminator).
    fn line(
        &mut self,
        chunk: &[u8],
        line: Range<usize>,
        here: &mut Option<Range<usize>>,
        h: &mut impl SseHandler,
    ) {
        let bytes = &chunk[line.clone()];
        if bytes.is_empty() {
            self.dispatch(chunk, here, h);
            return;
        }
        if bytes.len() >= PREFIX
            && let Some(data) = self.skips(bytes)
        {
            self.has_data |= data;
            return;
        }
        if bytes.len() > MAX_CAPTURE {
            h.oversized();
            self.has_data |= bytes.starts_with(b"data");
            return;
        }
        self.field(bytes, Some(line.start), chunk, here, h);
    }

    /// Keeps the start of a line that the chunk leaves unfinished (deciding from its first
    /// bytes whether it is worth keeping).
    fn carry(&mut self, mut seg: &[u8], h: &mut impl SseHandler) {
        if self.skip_line {
            return;
        }
        if !self.line_decided {
            let need = PREFIX.saturating_sub(self.line.len()).min(seg.len());
            if self.line.capacity() == 0 {
                self.line.reserve(LINE_CAPACITY);
            }
            self.line.extend_from_slice(&seg[..need]);
            seg = &seg[need..];
            if self.line.len() >= PREFIX {
                self.line_decided = true;
                if let Some(data) = self.skips(&self.line) {
                    self.skip_line = true;
                    self.skipped_data = data;
                    self.line.clear();
                    return;
                }
            }
        }
        if self.line.len() + seg.len() > MAX_CAPTURE {
            self.skip_line = true;
            self.skipped_data = self.line.starts_with(b"data");
            self.line.clear();
            h.oversized();
            return;
        }
        self.line.extend_from_slice(seg);
    }

    /// The end of the line kept by [`carry`](Self::carry).
    fn carried_line_end(
        &mut self,
        chunk: &[u8],
        here: &mut Option<Range<usize>>,
        h: &mut impl SseHandler,
    ) {
        let skipped = self.skip_line;
        self.skip_line = false;
        self.line_decided = false;
        if skipped {
            // A skipped data line still belongs to an event that will be dispatched.
            self.has_data |= std::mem::take(&mut self.skipped_data);
            self.line.clear();
            return;
        }
        let line = std::mem::take(&mut self.line);
        if line.is_empty() {
            self.dispatch(chunk, here, h);
        } else {
            self.field(&line, None, chunk, here, h);
        }
        // Keep the allocation for the next line.
        self.line = line;
        self.line.clear();
    }

    /// A kept, non-empty line: `event` and `data` fields count, others are ignored. `at` is
    /// where `line` starts in `chunk`, when it lies there.
    fn field(
        &mut self,
        line: &[u8],
        at: Option<usize>,
        chunk: &[u8],
        here: &mut Option<Range<usize>>,
        h: &mut impl SseHandler,
    ) {
        // The colon of the usual fields without a search.
        let colon = match line {
            [b'd', b'a', b't', b'a', b':', ..] => Some(4),
            [b'e', b'v', b'e', b'n', b't', b':', ..] => Some(5),
            _ => memchr(b':', line),
        };
        let (field, value, value_at) = match colon {
            Some(i) => match line.get(i + 1) {
                Some(b' ') => (&line[..i], &line[i + 2..], i + 2),
                _ => (&line[..i], &line[i + 1..], i + 1),
            },
            None => (line, &b""[..], line.len()),
        };
        match field {
            b"event" => {
                let name = EventName::of(value);
                self.event = Some(name);
                if let Some(dst) = self.last_event_line.get_mut(..line.len()) {
                    dst.copy_from_slice(line);
                    self.last_event = Some((name, line.len() as u8));
                }
            }
            b"data" => {
                let held = here.as_ref().map_or(self.data.len(), Range::len);
                if held + value.len() + 1 > MAX_CAPTURE {
                    h.oversized();
                } else if held == 0 {
                    match at {
                        _ if value.is_empty() => {}
                        Some(at) => *here = Some(at + value_at..at + value_at + value.len()),
                        None => {
                            if self.data.capacity() == 0 {
                                self.data.reserve(value.len().max(DATA_CAPACITY));
                            }
                            self.data.extend_from_slice(value);
                        }
                    }
                } else {
                    if let Some(r) = here.take() {
                        self.data.reserve(r.len() + value.len() + 1);
                        self.data.extend_from_slice(&chunk[r]);
                    }
                    // `held > 0`: a line has data, so `has_data` is set.
                    self.data.push(b'\n');
                    self.data.extend_from_slice(value);
                }
                self.has_data = true;
            }
            _ => {}
        }
    }

    fn dispatch(&mut self, chunk: &[u8], here: &mut Option<Range<usize>>, h: &mut impl SseHandler) {
        if !self.has_data && self.event.is_none() {
            return;
        }
        let has_data = std::mem::take(&mut self.has_data);
        let name = self.event.take();
        if !has_data {
            h.event(name, None);
        } else if let Some(r) = here.take() {
            h.event(name, Some(&chunk[r]));
        } else {
            h.event(name, Some(&self.data));
            self.data.clear();
        }
    }

    /// When `rest` begins with a whole line equal to the last `event:` line read: sets the
    /// event's name, as reading the line would, and returns the line's length.
    fn same_event_line(&mut self, rest: &[u8]) -> Option<usize> {
        if rest.first() != Some(&b'e') {
            return None;
        }
        let (name, n) = self.last_event?;
        let n = usize::from(n);
        if rest.get(..n)? == &self.last_event_line[..n] && matches!(rest.get(n)?, b'\n' | b'\r') {
            self.event = Some(name);
            return Some(n);
        }
        None
    }

    /// Whether a line was left unfinished by the previous chunk.
    fn line_open(&self) -> bool {
        self.skip_line || !self.line.is_empty()
    }

    /// Whether the event's data is worth keeping: the events that carry usage, errors or
    /// completion, and events whose name is not known yet.
    fn event_wanted(&self) -> bool {
        self.event.is_none_or(|e| {
            matches!(
                e,
                EventName::MessageStart
                    | EventName::MessageDelta
                    | EventName::MessageStop
                    | EventName::Error
            )
        })
    }

    /// Decides from a line's first [`PREFIX`] bytes whether to skip it: `Some(true)` for a
    /// data line of an unwanted event, `Some(false)` for a comment, `None` to keep it.
    fn skips(&self, first: &[u8]) -> Option<bool> {
        if first.first() == Some(&b':') {
            Some(false)
        } else if first.starts_with(b"data") && !self.event_wanted() {
            Some(true)
        } else {
            None
        }
    }
}

/// Where the line at the start of `s` ends (its `\n` or `\r`): an empty line is told by its
/// first byte, without memchr's set-up.
fn line_end(s: &[u8]) -> Option<usize> {
    match s.first()? {
        b'\n' | b'\r' => Some(0),
        _ => memchr2(b'\n', b'\r', s),
    }
}

const PREFIX: usize = 5; // enough for "data:" / "event"

/// The first allocation of the buffer that carries an unfinished line.
const LINE_CAPACITY: usize = 256;

/// The first allocation of the buffer that carries the data of an unfinished event.
const DATA_CAPACITY: usize = 1024;

/// The data of `message_stop` as the API sends it.
const MESSAGE_STOP: &[u8] = br#"{"type":"message_stop"}"#;

/// An SSE event name (from the `event:` line or the JSON `type`), as far as the scanner
/// cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EventName {
    MessageStart,
    MessageDelta,
    MessageStop,
    Error,
    /// `event:` with no name.
    Empty,
    /// Any other name (`ping`, `content_block_*`, unknown events).
    Other,
}

impl EventName {
    fn of(name: &[u8]) -> Self {
        match name {
            b"message_start" => Self::MessageStart,
            b"message_delta" => Self::MessageDelta,
            b"message_stop" => Self::MessageStop,
            b"error" => Self::Error,
            b"" => Self::Empty,
            _ => Self::Other,
        }
    }
}

/// Reads a JSON `type` string without keeping it.
impl<'de> Deserialize<'de> for EventName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = EventName;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an event type")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<EventName, E> {
                Ok(EventName::of(v.as_bytes()))
            }
        }
        d.deserialize_str(Visitor)
    }
}

/// The SSE line and event reader shared by [`UsageScanner`] and [`FirstEvent`].
#[derive(Debug, Clone, Default)]
struct SseReader {
    /// The start of a line the previous chunk left unfinished (kept lines only).
    line: Vec<u8>,
    line_decided: bool,
    skip_line: bool,
    skipped_data: bool,
    after_cr: bool,
    /// The current event's name, once its `event:` line was read.
    event: Option<EventName>,
    /// The current event's data, when it did not end in the chunk that holds it.
    data: Vec<u8>,
    has_data: bool,
    /// The last `event:` line read (its first `last_event.1` bytes) and the name it gave:
    /// the same line again (the usual case: a run of `content_block_delta`) is known
    /// without reading it.
    last_event_line: [u8; LAST_EVENT_MAX],
    last_event: Option<(EventName, u8)>,
}

/// The longest `event:` line remembered by [`SseReader`] (the API's are at most 26 bytes).
const LAST_EVENT_MAX: usize = 32;

#[derive(Debug, Default, Deserialize)]
struct SseEvent {
    #[serde(rename = "type")]
    kind: Option<EventName>,
    message: Option<SseMessage>,
    usage: Option<WireUsage>,
    error: Option<WireError>,
}

#[derive(Debug, Deserialize)]
struct SseMessage {
    model: Option<String>,
    usage: Option<WireUsage>,
}

#[derive(Debug, Deserialize, Default)]
struct WireError {
    #[serde(rename = "type")]
    kind: Option<String>,
    message: Option<String>,
}

impl SseEvent {
    /// `serde_json::from_slice::<SseEvent>(data).ok()` read by hand, when that is certain
    /// without serde: the data is one JSON object, validated whole as strictly as serde does
    /// (by [`Skim`], and by [`WireUsage::read_prefix`] for the usage objects), whose
    /// `type`, `message.model` and the two usage objects have the shape the API sends.
    /// `None` (ask serde) for anything else: not an object or not valid JSON, an escaped
    /// key at the two levels read, a field `SseEvent` or `SseMessage` reads given twice
    /// (serde's derive rejects it) or of another type than expected, an escaped `type` or
    /// `model`, a usage object the hand reader leaves to serde, an `error` member (error
    /// events are rare). So the answer is serde's for every input, and serde's own work is
    /// left to the unusual.
    fn read(data: &[u8]) -> Option<Self> {
        let mut p = Skim { b: data, i: 0 };
        let mut ev = Self::default();
        let mut seen = 0_u8;
        p.ws();
        if p.peek()? != b'{' {
            return None;
        }
        members(&mut p, |p, key| {
            let bit = match key {
                b"type" => 1,
                b"message" => 2,
                b"usage" => 4,
                b"error" => return None,
                _ => return skip_value(p, 1),
            };
            if seen & bit != 0 {
                return None;
            }
            seen |= bit;
            match bit {
                1 => ev.kind = nullable(p, |p| plain_str(p).map(EventName::of))?,
                2 => ev.message = nullable(p, SseMessage::read)?,
                _ => ev.usage = nullable(p, read_usage)?,
            }
            Some(())
        })?;
        p.ws();
        (p.i == data.len()).then_some(ev)
    }
}

impl SseMessage {
    /// The `message` object (the cursor on its `{`), as serde reads it; `None`: ask serde.
    fn read(p: &mut Skim<'_>) -> Option<Self> {
        if p.peek()? != b'{' {
            return None;
        }
        let (mut model, mut usage) = (None, None);
        let mut seen = 0_u8;
        members(p, |p, key| {
            let bit = match key {
                b"model" => 1,
                b"usage" => 2,
                _ => return skip_value(p, 2),
            };
            if seen & bit != 0 {
                return None;
            }
            seen |= bit;
            if bit == 1 {
                model = nullable(p, |p| {
                    let s = plain_str(p)?;
                    std::str::from_utf8(s).ok().map(str::to_owned)
                })?;
            } else {
                usage = nullable(p, read_usage)?;
            }
            Some(())
        })?;
        Some(Self { model, usage })
    }
}

/// The members of the object whose `{` is under the cursor: `member` reads the value of
/// each key (the cursor on the value). Keys with escapes are refused (`None`), as serde
/// would decode them before matching.
fn members<'a>(
    p: &mut Skim<'a>,
    mut member: impl FnMut(&mut Skim<'a>, &'a [u8]) -> Option<()>,
) -> Option<()> {
    p.i += 1;
    p.ws();
    if p.peek()? == b'}' {
        p.i += 1;
        return Some(());
    }
    loop {
        p.ws();
        let key = plain_str(p)?;
        p.ws();
        p.eat(b':')?;
        p.ws();
        member(p, key)?;
        p.ws();
        match p.next()? {
            b',' => {}
            b'}' => return Some(()),
            _ => return None,
        }
    }
}

/// `null` (then `Some(None)`), or the value `read` reads.
#[allow(clippy::option_option)]
fn nullable<'a, T>(
    p: &mut Skim<'a>,
    read: impl FnOnce(&mut Skim<'a>) -> Option<T>,
) -> Option<Option<T>> {
    if p.peek()? == b'n' {
        p.word(b"null")?;
        return Some(None);
    }
    read(p).map(Some)
}

/// The text of the string under the cursor when it has no escape (valid UTF-8 without
/// control characters, as serde reads it); `None` for anything else. Printable ASCII is
/// read eight bytes at a time; [`Skim`] checks the rest.
fn plain_str<'a>(p: &mut Skim<'a>) -> Option<&'a [u8]> {
    let b = p.b;
    if p.peek()? != b'"' {
        return None;
    }
    let start = p.i + 1;
    let rest = &b[start..];
    if let Some(n) = string_stop_swar(rest, true)
        && rest[n] == b'"'
    {
        p.i = start + n + 1;
        return Some(&rest[..n]);
    }
    if p.string()? {
        return None;
    }
    Some(&b[start..p.i - 1])
}

/// Skips (and validates) the value under the cursor, `depth` levels down.
fn skip_value(p: &mut Skim<'_>, depth: u32) -> Option<()> {
    match p.peek()? {
        b'"' => {
            let start = p.i + 1;
            let rest = &p.b[start..];
            if let Some(n) = string_stop_swar(rest, true)
                && rest[n] == b'"'
            {
                p.i = start + n + 1;
                return Some(());
            }
            p.string().map(drop)
        }
        b'n' => p.word(b"null"),
        _ => p.value(depth),
    }
}

/// A usage object under the cursor, when the hand reader reads it.
fn read_usage(p: &mut Skim<'_>) -> Option<WireUsage> {
    let (w, n) = WireUsage::read_prefix(&p.b[p.i..])?;
    p.i += n;
    Some(w)
}

impl WireError {
    fn into_api_error(self) -> ApiError {
        ApiError {
            error_type: self.kind.unwrap_or_else(|| "unknown_error".into()),
            message: self.message.unwrap_or_default(),
        }
    }
}

// ===== JSON =====

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Usage,
    Model,
    Type,
    Error,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Capture {
    /// An object or array value: ends when the depth returns to 1.
    Nested,
    /// A string value: ends at its closing quote.
    Str,
    /// A number, boolean or null: ends at the next delimiter.
    Scalar,
}

/// Where, in the chunk being read, the captured value and the key being read begin (0 for
/// one that began in an earlier chunk).
#[derive(Default)]
struct Marks {
    cap: usize,
    key: usize,
}

/// The most bytes kept of a key that a chunk leaves unfinished: a longer key is none of ours
/// (`usage`, `model`, `type`, `error`).
const KEY_MAX: usize = 16;

/// The JSON side of [`UsageScanner`]: a tokenizer that tracks nesting, strings and the keys
/// of the top-level object, and reads the values of the keys it wants.
///
/// A captured value's bytes are always one contiguous run of the body (from its first byte to
/// its last), so they are never copied byte by byte: a value that begins and ends in one
/// chunk (the usual case) is read in place when it ends, and only a value a chunk leaves
/// unfinished is copied, once per chunk, into `buf`. Values are read when their capture ends
/// (the last complete one of each key wins, as a JSON object's last duplicate key does), so
/// a snapshot has nothing left to parse.
#[derive(Debug, Clone, Default)]
struct JsonState {
    depth: u32,
    in_string: bool,
    escape: bool,
    started: bool,
    complete: bool,
    broken: bool,
    // key tracking at depth 1
    expect_key: bool,
    reading_key: bool,
    key: [u8; KEY_MAX],
    key_len: usize,
    key_too_long: bool,
    pending: Option<Field>,
    value_next: bool,
    // capture of one top-level value
    capture: Option<(Field, Capture)>,
    /// The start of the value being captured, when it began in an earlier chunk.
    buf: Vec<u8>,
    buf_overflow: bool,
    /// The last `usage` read (`None` when it was not a usage object).
    usage: Option<Usage>,
    /// The last `model` read (`None` when it was not a string).
    model: Option<Arc<str>>,
    /// Whether the last `type` read was `"error"`.
    is_error: bool,
    /// The last `error` value (only read if the body turns out to be an error envelope).
    error: Option<Vec<u8>>,
    oversized: u64,
}

impl JsonState {
    fn feed(&mut self, data: &[u8]) {
        let mut i = 0;
        let mut marks = Marks::default();
        while i < data.len() && !self.broken {
            if self.in_string {
                if self.escape {
                    self.escape = false;
                    i += 1;
                    continue;
                }
                match string_stop(&data[i..]) {
                    None => i = data.len(),
                    Some(k) => {
                        i += k + 1;
                        if data[i - 1] == b'\\' {
                            self.escape = true;
                            // An escaped key is none of ours.
                            self.key_too_long |= self.reading_key;
                        } else {
                            self.in_string = false;
                            self.string_end(&data[marks.key..i - 1], &data[marks.cap..i]);
                        }
                    }
                }
                continue;
            }
            if self.depth >= 2 {
                // Inside a nested value only strings and brackets change anything (a value
                // being captured is kept whole, whatever its bytes).
                let Some(k) = data[i..]
                    .iter()
                    .position(|&b| matches!(b, b'"' | b'{' | b'}' | b'[' | b']'))
                else {
                    i = data.len();
                    continue;
                };
                i += k;
            }
            i = self.structural(data, i, &mut marks);
        }
        if self.in_string && self.reading_key {
            self.key_bytes(&data[marks.key..i]);
        }
        if self.capture.is_some() {
            self.spill(&data[marks.cap..i]);
        }
    }

    /// The byte at `at` of `data`, outside strings; returns where to go on. `marks` is where
    /// a capture or key begins.
    fn structural(&mut self, data: &[u8], at: usize, marks: &mut Marks) -> usize {
        let b = data[at];
        if self.complete {
            if !b.is_ascii_whitespace() {
                self.broken = true;
            }
            return at + 1;
        }
        match b {
            b' ' | b'\t' | b'\n' | b'\r' => {
                if self.depth == 1 && self.capturing(Capture::Scalar) {
                    self.finish_capture(&data[marks.cap..at]);
                }
            }
            b'"' => {
                if self.depth == 1 && self.expect_key {
                    self.reading_key = true;
                    self.key_len = 0;
                    self.key_too_long = false;
                    marks.key = at + 1;
                } else if self.value_next {
                    self.start_capture(Capture::Str);
                    marks.cap = at;
                }
                self.in_string = true;
            }
            b'{' | b'[' => {
                if self.value_next {
                    self.start_capture(Capture::Nested);
                    marks.cap = at;
                    if b == b'{'
                        && self.capture == Some((Field::Usage, Capture::Nested))
                        && let Some(end) = self.usage_in_place(&data[at..])
                    {
                        return at + end;
                    }
                }
                self.depth += 1;
                self.started = true;
                // A top-level array is not a Messages answer; keep tokenizing.
                self.expect_key = self.depth == 1 && b == b'{';
            }
            b'}' | b']' => {
                if self.depth == 1 && self.capturing(Capture::Scalar) {
                    self.finish_capture(&data[marks.cap..at]);
                }
                if self.depth == 0 {
                    self.broken = true;
                    return at + 1;
                }
                self.depth -= 1;
                if self.depth == 1 && self.capturing(Capture::Nested) {
                    self.finish_capture(&data[marks.cap..=at]);
                }
                if self.depth == 0 {
                    self.complete = true;
                }
            }
            b':' => {
                if self.depth == 1 && !self.expect_key && self.capture.is_none() {
                    self.value_next = true;
                }
            }
            b',' => {
                if self.depth == 1 {
                    if self.capturing(Capture::Scalar) {
                        self.finish_capture(&data[marks.cap..at]);
                    }
                    self.expect_key = true;
                    self.pending = None;
                    self.value_next = false;
                }
            }
            _ => {
                if !self.started {
                    // Not JSON at all (e.g. an HTML error page): stop looking.
                    self.broken = true;
                    return at + 1;
                }
                if self.value_next {
                    self.start_capture(Capture::Scalar);
                    marks.cap = at;
                }
            }
        }
        at + 1
    }

    /// A `usage` object starting at `value[0]` read where it lies, without tokenizing it:
    /// its length when it has the shape the API sends and ends in this chunk (otherwise the
    /// tokenizer goes on as for any value). The state is then what tokenizing it would have
    /// left: `read_prefix` only accepts a well-formed object, which the tokenizer would have
    /// captured whole (back to depth 1, outside strings, no key pending) and read with the
    /// same result.
    fn usage_in_place(&mut self, value: &[u8]) -> Option<usize> {
        let (w, len) = WireUsage::read_prefix(value)?;
        if len > MAX_CAPTURE {
            return None;
        }
        self.capture = None;
        self.usage = Some(usage_of(&w));
        Some(len)
    }

    fn capturing(&self, how: Capture) -> bool {
        self.capture.is_some_and(|(_, c)| c == how)
    }

    /// Keeps the start of a key that a chunk leaves unfinished.
    fn key_bytes(&mut self, bytes: &[u8]) {
        if !self.key_too_long {
            match self.key.get_mut(self.key_len..self.key_len + bytes.len()) {
                Some(dst) => {
                    dst.copy_from_slice(bytes);
                    self.key_len += bytes.len();
                }
                None => self.key_too_long = true,
            }
        }
    }

    /// The end of a string: `key` is the end of the key being read (when reading one),
    /// `value` the captured value up to here (when capturing).
    fn string_end(&mut self, key: &[u8], value: &[u8]) {
        if self.reading_key {
            self.reading_key = false;
            self.expect_key = false;
            if self.key_len > 0 {
                // The key began in an earlier chunk.
                self.key_bytes(key);
            }
            let key = if self.key_len > 0 {
                &self.key[..self.key_len]
            } else {
                key
            };
            self.pending = if self.key_too_long {
                None
            } else {
                match key {
                    b"usage" => Some(Field::Usage),
                    b"model" => Some(Field::Model),
                    b"type" => Some(Field::Type),
                    b"error" => Some(Field::Error),
                    _ => None,
                }
            };
        } else if self.depth == 1 && self.capturing(Capture::Str) {
            self.finish_capture(value);
        }
    }

    fn start_capture(&mut self, how: Capture) {
        self.value_next = false;
        if let Some(field) = self.pending.take() {
            self.capture = Some((field, how));
            self.buf.clear();
            self.buf_overflow = false;
        }
    }

    /// Keeps the part of the captured value that a chunk leaves unfinished.
    fn spill(&mut self, bytes: &[u8]) {
        let Some((field, _)) = self.capture else {
            return;
        };
        if self.buf_overflow {
            return;
        }
        if self.buf.len() + bytes.len() > MAX_CAPTURE {
            self.buf_overflow = true;
            self.buf = Vec::new();
            self.oversized += 1;
        } else {
            if self.buf.is_empty() {
                // Room for the usual size of each value at once, rather than doubling up
                // from a few bytes.
                self.buf.reserve(match field {
                    Field::Usage | Field::Error => 512,
                    Field::Model => 64,
                    Field::Type => 16,
                });
            }
            self.buf.extend_from_slice(bytes);
        }
    }

    /// The capture ends with `last`, its bytes in the current chunk.
    fn finish_capture(&mut self, last: &[u8]) {
        let Some((field, _)) = self.capture else {
            return;
        };
        // A value begun in an earlier chunk left at least its first byte in `buf` (or
        // overflowed), so an empty `buf` means that the whole value lies in this chunk: it
        // is read in place.
        if self.buf.is_empty() && !self.buf_overflow {
            self.capture = None;
            if last.len() > MAX_CAPTURE {
                self.oversized += 1;
            } else {
                self.read(field, last);
            }
            return;
        }
        self.spill(last);
        self.capture = None;
        if !self.buf_overflow {
            let buf = std::mem::take(&mut self.buf);
            self.read(field, &buf);
            self.buf = buf;
            self.buf.clear();
        }
    }

    /// Reads a captured value (as the last one of its key).
    fn read(&mut self, field: Field, value: &[u8]) {
        match field {
            Field::Usage => {
                self.usage = WireUsage::from_json(value).as_ref().map(usage_of);
            }
            Field::Model => {
                self.model = match plain_json_str(value) {
                    Some(s) => Some(Arc::from(s)),
                    None => serde_json::from_slice::<String>(value).ok().map(Arc::from),
                };
            }
            Field::Type => {
                self.is_error = match plain_json_str(value) {
                    Some(s) => s == "error",
                    None => serde_json::from_slice::<String>(value).is_ok_and(|k| k == "error"),
                };
            }
            Field::Error => self.error = Some(value.to_vec()),
        }
    }

    fn fill(&self, r: &mut UsageReport) {
        r.completed = self.complete && !self.broken;
        r.oversized += self.oversized;
        if let Some(u) = self.usage {
            r.usage = u;
            r.saw_usage = true;
        }
        if let Some(m) = &self.model {
            r.model = Some(m.clone());
        }
        if self.is_error && r.error.is_none() {
            let e = self
                .error
                .as_deref()
                .and_then(|e| serde_json::from_slice::<WireError>(e).ok())
                .unwrap_or_default();
            r.error = Some(e.into_api_error());
        }
    }
}

/// The usage one usage object reports.
fn usage_of(w: &WireUsage) -> Usage {
    let mut m = UsageMerge::default();
    m.apply(w);
    m.usage()
}

/// Where a string's content stops: its closing quote or a backslash. The first 32 bytes
/// (keys, ids and short values end there) are looked through eight at a time, faster than
/// memchr's set-up; the rest of a longer string (the content text) with memchr.
fn string_stop(s: &[u8]) -> Option<usize> {
    let head = s.len().min(32);
    match string_stop_swar(&s[..head], false) {
        Some(k) => Some(k),
        None => memchr2(b'"', b'\\', &s[head..]).map(|k| k + head),
    }
}

/// Where the plain run of a JSON string's content stops: the first `"`, `\`, control or
/// non-ASCII byte of `s`, read eight bytes at a time (for short strings, faster than
/// memchr's set-up). `None` when every byte of `s` is plain.
pub fn plain_run_end(s: &[u8]) -> Option<usize> {
    string_stop_swar(s, true)
}

/// The first `"` or `\` of `s` (with `strict`, also the first control or non-ASCII byte),
/// read eight bytes at a time.
pub(crate) fn string_stop_swar(s: &[u8], strict: bool) -> Option<usize> {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    // The high bit of each byte below `n` (`n <= 0x80`). Exact for the lowest flagged byte,
    // which is all that is read: a false flag can only follow a true one (a borrow).
    let below = |w: u64, n: u8| w.wrapping_sub(LO * u64::from(n)) & !w & HI;
    let equal = |w: u64, b: u8| below(w ^ (LO * u64::from(b)), 1);
    let (words, tail) = s.as_chunks::<8>();
    for (n, w) in words.iter().enumerate() {
        let w = u64::from_le_bytes(*w);
        let mut m = equal(w, b'"') | equal(w, b'\\');
        if strict {
            m |= below(w, 0x20) | (w & HI);
        }
        if m != 0 {
            return Some(n * 8 + (m.trailing_zeros() / 8) as usize);
        }
    }
    let at = words.len() * 8;
    tail.iter()
        .position(|&b| b == b'"' || b == b'\\' || (strict && !(0x20..0x80).contains(&b)))
        .map(|k| at + k)
}

/// The text of a JSON string without escapes, as `serde_json::from_slice::<String>` would read
/// it; `None` when serde has to tell (an escape, a control byte, invalid UTF-8, not a
/// string).
fn plain_json_str(value: &[u8]) -> Option<&str> {
    match value {
        [b'"', inner @ .., b'"'] if !inner.iter().any(|&b| matches!(b, b'"' | b'\\' | 0..0x20)) => {
            std::str::from_utf8(inner).ok()
        }
        _ => None,
    }
}

/// Scans a whole body at once (for tests and for buffered bodies).
pub fn scan_all(format: BodyFormat, body: &[u8]) -> UsageReport {
    let mut s = UsageScanner::new(format);
    s.feed(body);
    s.finish(BodyEnd::Ended)
}

#[cfg(test)]
mod tests {
    use super::*;

    thread_local! {
        /// Whether events are parsed by serde alone (the reference of the SSE fast path).
        pub(super) static SERDE_ONLY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    const STREAM: &str = "event: message_start\n\
data: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"model\":\"claude-sonnet-4-5\",\"content\":[],\"usage\":{\"input_tokens\":25,\"cache_creation_input_tokens\":100,\"cache_read_input_tokens\":50,\"cache_creation\":{\"ephemeral_5m_input_tokens\":60,\"ephemeral_1h_input_tokens\":40},\"output_tokens\":1}}}\n\n\
event: content_block_start\n\
data: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n\
event: ping\n\
data: {\"type\": \"ping\"}\n\n\
event: content_block_delta\n\
data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hello\"}}\n\n\
event: content_block_stop\n\
data: {\"type\":\"content_block_stop\",\"index\":0}\n\n\
event: message_delta\n\
data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":7}}\n\n\
event: message_delta\n\
data: {\"type\":\"message_delta\",\"delta\":{},\"usage\":{\"output_tokens\":15}}\n\n\
event: message_stop\n\
data: {\"type\":\"message_stop\"}\n\n";

    #[test]
    fn sse_merge_last_delta_wins_and_keeps_start_fields() {
        let r = scan_all(BodyFormat::Sse, STREAM.as_bytes());
        assert!(r.is_complete_success());
        assert_eq!(r.usage.input_tokens, 25);
        assert_eq!(r.usage.output_tokens, 15, "cumulative, never summed (7+15)");
        assert_eq!(r.usage.cache_creation_input_tokens, 100);
        assert_eq!(r.usage.cache_read_input_tokens, 50);
        assert_eq!(r.usage.cache_write_1h(), 40);
        assert_eq!(r.model.as_deref(), Some("claude-sonnet-4-5"));
        assert_eq!(r.events, 8);
    }

    #[test]
    fn sse_crlf_and_cr_line_endings() {
        for sep in ["\r\n", "\r"] {
            let s = STREAM.replace('\n', sep);
            let r = scan_all(BodyFormat::Sse, s.as_bytes());
            assert_eq!(r.usage.output_tokens, 15, "sep {sep:?}");
            assert!(r.completed);
        }
    }

    #[test]
    fn content_type_detection() {
        let f = |v: &'static str| {
            BodyFormat::from_content_type(Some(&http::HeaderValue::from_static(v)))
        };
        assert_eq!(f("text/event-stream"), BodyFormat::Sse);
        assert_eq!(f(" Text/Event-Stream; charset=utf-8"), BodyFormat::Sse);
        assert_eq!(f("application/json"), BodyFormat::Json);
        assert_eq!(f("text/event"), BodyFormat::Json);
        assert_eq!(BodyFormat::from_content_type(None), BodyFormat::Json);
    }

    #[test]
    fn sse_comments_are_not_events() {
        let s = format!(": keep-alive\n\n: another\n\n{STREAM}");
        let r = scan_all(BodyFormat::Sse, s.as_bytes());
        assert_eq!(r.events, 8);
        assert_eq!(r.usage.output_tokens, 15);
    }

    #[test]
    fn sse_error_event() {
        let s = "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n";
        let r = scan_all(BodyFormat::Sse, s.as_bytes());
        let e = r.error.unwrap();
        assert_eq!(e.error_type, "overloaded_error");
        assert!(!r.completed);
    }

    #[test]
    fn sse_without_event_names_uses_type() {
        let s = "data: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":3,\"output_tokens\":1}}}\n\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":9}}\n\ndata: {\"type\":\"message_stop\"}\n\n";
        let r = scan_all(BodyFormat::Sse, s.as_bytes());
        assert_eq!((r.usage.input_tokens, r.usage.output_tokens), (3, 9));
        assert!(r.completed);
    }

    #[test]
    fn sse_incomplete_last_event_is_discarded() {
        let cut = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":3,\"output_tokens\":1}}}\n\nevent: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":9}}";
        let mut s = UsageScanner::new(BodyFormat::Sse);
        s.feed(cut.as_bytes());
        let r = s.finish(BodyEnd::Failed);
        assert_eq!((r.usage.input_tokens, r.usage.output_tokens), (3, 1));
        assert_eq!(r.end, BodyEnd::Failed);
        assert!(!r.is_complete_success());
    }

    #[test]
    fn sse_huge_delta_is_skipped_but_counted_as_event() {
        let big = "x".repeat(MAX_CAPTURE * 3);
        let s = format!(
            "event: content_block_delta\ndata: {{\"delta\":{{\"text\":\"{big}\"}}}}\n\n{STREAM}"
        );
        let r = scan_all(BodyFormat::Sse, s.as_bytes());
        assert_eq!(r.usage.output_tokens, 15);
        assert_eq!(
            r.oversized, 0,
            "uninteresting lines are skipped, not oversized"
        );
        assert_eq!(r.events, 9);
    }

    #[test]
    fn sse_unknown_event_without_name_that_is_huge_is_bounded() {
        let big = "y".repeat(MAX_CAPTURE * 2);
        let s = format!("data: {big}\n\n{STREAM}");
        let r = scan_all(BodyFormat::Sse, s.as_bytes());
        assert_eq!(r.usage.output_tokens, 15);
        assert_eq!(r.oversized, 1);
    }

    /// Events whose data spans two `data:` lines (joined with `\n`), a comment, CRLF and
    /// CR endings: the data is parsed in place when an event lies in one chunk and carried
    /// over when it does not, with the same result.
    const TRICKY: &str = "event: message_start\r\n\
data: {\"type\":\"message_start\",\r\n\
data: \"message\":{\"model\":\"m\\\"1\",\"usage\":{\"input_tokens\":3,\"output_tokens\":1}}}\r\n\r\n\
: keep-alive\r\
event: ping\r\
data: {\"type\":\"ping\"}\r\r\
data: {\"type\":\"message\\u005fdelta\",\"usage\":{\"output_tokens\":9}}\n\n\
event: message_stop\n\
data: {\"type\": \"message_stop\"}\n\n";

    #[test]
    fn events_split_anywhere_give_the_same_report() {
        let whole = scan_all(BodyFormat::Sse, TRICKY.as_bytes());
        assert!(whole.is_complete_success());
        assert_eq!(
            (whole.usage.input_tokens, whole.usage.output_tokens),
            (3, 9)
        );
        assert_eq!(whole.model.as_deref(), Some("m\"1"));
        assert_eq!((whole.events, whole.oversized), (4, 0));
        let body = TRICKY.as_bytes();
        for i in 0..=body.len() {
            for j in i..=body.len() {
                let mut s = UsageScanner::new(BodyFormat::Sse);
                // Empty chunks too: one must not lose a `\r` waiting for its `\n`.
                for chunk in [&body[..i], &[], &body[i..j], &[], &body[j..]] {
                    s.feed(chunk);
                }
                assert_eq!(s.finish(BodyEnd::Ended), whole, "split at {i} and {j}");
            }
        }
    }

    #[test]
    fn first_event_agrees_with_the_scanner_however_the_stream_is_cut() {
        let error = "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Over\\\"loaded\"}}\n\n";
        let unnamed = "data: {\"type\":\"error\",\"error\":{\"message\":\"m\"}}\n\n";
        let late = format!(
            "{}{error}",
            &STREAM[..STREAM.find("event: content").unwrap_or(0)]
        );
        for body in [STREAM, TRICKY, error, unnamed, &late] {
            let body = body.as_bytes();
            for i in 0..=body.len() {
                let mut scanner = UsageScanner::new(BodyFormat::Sse);
                let mut peek = FirstEvent::new();
                for chunk in [&body[..i], &body[i..]] {
                    scanner.feed(chunk);
                    peek.feed(chunk);
                    assert_eq!(peek.ended(), scanner.events() > 0, "split at {i}");
                    assert_eq!(peek.error(), scanner.error(), "split at {i}");
                }
            }
        }
        let mut peek = FirstEvent::new();
        peek.feed(error.as_bytes());
        let e = peek.error().unwrap();
        assert_eq!(
            (e.error_type.as_str(), e.message.as_str()),
            ("overloaded_error", "Over\"loaded")
        );
        let mut peek = FirstEvent::new();
        peek.feed(unnamed.as_bytes());
        assert_eq!(peek.error().unwrap().error_type, "unknown_error");
    }

    #[test]
    fn message_stop_completes_only_with_valid_data() {
        let stop = |data: &str| {
            let s = format!("event: message_stop\ndata: {data}\n\n");
            scan_all(BodyFormat::Sse, s.as_bytes()).completed
        };
        assert!(stop(r#"{"type":"message_stop"}"#));
        assert!(stop(r#"{ "type" : "message_stop" }"#));
        assert!(stop("{}"), "the event name wins over the data");
        assert!(!stop("not json"));
        assert!(!stop(""));
        let r = scan_all(BodyFormat::Sse, b"event: message_stop\n\n");
        assert!(!r.completed, "no data, no completion");
        assert_eq!(r.events, 1);
    }

    #[test]
    fn oversized_lines_count_the_same_whole_or_split() {
        let big = "x".repeat(MAX_CAPTURE);
        let s =
            format!("event: message_delta\ndata: {big}\n\nevent: {big}\ndata: {{}}\n\n{STREAM}");
        let whole = scan_all(BodyFormat::Sse, s.as_bytes());
        assert_eq!((whole.oversized, whole.events), (2, 10));
        assert_eq!(whole.usage.output_tokens, 15);
        for i in (0..s.len()).step_by(997) {
            let mut sc = UsageScanner::new(BodyFormat::Sse);
            sc.feed(&s.as_bytes()[..i]);
            sc.feed(&s.as_bytes()[i..]);
            assert_eq!(sc.finish(BodyEnd::Ended), whole, "split at {i}");
        }
    }

    const JSON: &str = r#"{"id":"msg_1","type":"message","role":"assistant","model":"claude-opus-4-5","content":[{"type":"text","text":"a \"quoted\" } ] , usage"}],"stop_reason":"end_turn","usage":{"input_tokens":12,"cache_creation_input_tokens":0,"cache_read_input_tokens":3,"output_tokens":34,"server_tool_use":{"web_search_requests":2},"service_tier":"batch"}}"#;

    #[test]
    fn json_usage_model_and_completion() {
        let r = scan_all(BodyFormat::Json, JSON.as_bytes());
        assert!(r.is_complete_success());
        assert_eq!(r.usage.input_tokens, 12);
        assert_eq!(r.usage.output_tokens, 34);
        assert_eq!(r.usage.cache_read_input_tokens, 3);
        assert_eq!(r.usage.server_tool_use.web_search_requests, 2);
        assert_eq!(r.usage.service_tier, Some(crate::ServiceTier::Batch));
        assert_eq!(r.model.as_deref(), Some("claude-opus-4-5"));
    }

    #[test]
    fn json_error_envelope() {
        let body = br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"},"request_id":"req_1"}"#;
        let r = scan_all(BodyFormat::Json, body);
        assert_eq!(r.error.unwrap().error_type, "overloaded_error");
        assert!(!r.saw_usage);
    }

    #[test]
    fn json_pretty_printed_and_truncated() {
        let pretty =
            serde_json::to_string_pretty(&serde_json::from_str::<serde_json::Value>(JSON).unwrap())
                .unwrap();
        let r = scan_all(BodyFormat::Json, pretty.as_bytes());
        assert_eq!(r.usage.output_tokens, 34);
        let mut s = UsageScanner::new(BodyFormat::Json);
        s.feed(&JSON.as_bytes()[..JSON.len() - 10]);
        let r = s.finish(BodyEnd::Failed);
        assert!(!r.completed);
    }

    #[test]
    fn json_not_json() {
        let r = scan_all(BodyFormat::Json, b"<html>502 Bad Gateway</html>");
        assert!(!r.completed && !r.saw_usage);
    }

    /// The reference the JSON scanner is checked against: serde_json reads the whole body (a
    /// JSON object) as its top-level keys and the raw text of their values; the report of
    /// the first `cut` bytes keeps the values that end within them (a number, `true`,
    /// `false` or `null` only once the byte after it is there, as the scanner needs that byte
    /// to know it ended), the last of each key winning. Keys are compared as written (an
    /// escaped `usage` key is not the scanner's), values read with serde.
    fn reference(body: &[u8], cut: usize) -> UsageReport {
        use serde::de::{Deserializer, MapAccess, Visitor};
        use serde_json::value::RawValue;

        enum Key<'a> {
            Plain(&'a str),
            Escaped,
        }
        impl<'de> Deserialize<'de> for Key<'de> {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl<'de> Visitor<'de> for V {
                    type Value = Key<'de>;
                    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                        f.write_str("a key")
                    }
                    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                        Ok(Key::Plain(v))
                    }
                    fn visit_str<E>(self, _: &str) -> Result<Key<'de>, E> {
                        Ok(Key::Escaped)
                    }
                }
                d.deserialize_str(V)
            }
        }
        struct Entries<'a>(Vec<(Key<'a>, &'a RawValue)>);
        impl<'de> Deserialize<'de> for Entries<'de> {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl<'de> Visitor<'de> for V {
                    type Value = Entries<'de>;
                    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                        f.write_str("an object")
                    }
                    fn visit_map<A: MapAccess<'de>>(
                        self,
                        mut m: A,
                    ) -> Result<Entries<'de>, A::Error> {
                        let mut v = Vec::new();
                        while let Some(k) = m.next_key::<Key<'de>>()? {
                            v.push((k, m.next_value::<&RawValue>()?));
                        }
                        Ok(Entries(v))
                    }
                }
                d.deserialize_map(V)
            }
        }

        let entries = serde_json::from_slice::<Entries<'_>>(body)
            .expect("reference bodies are JSON objects")
            .0;
        let mut r = UsageReport {
            format: BodyFormat::Json,
            body_bytes: cut as u64,
            end: BodyEnd::Ended,
            completed: cut >= body.trim_ascii_end().len(),
            ..UsageReport::default()
        };
        let (mut usage, mut model, mut is_error, mut error) = (None, None, false, None);
        for (key, raw) in entries {
            let Key::Plain(key @ ("usage" | "model" | "type" | "error")) = key else {
                continue;
            };
            let text = raw.get();
            let start = text.as_ptr() as usize - body.as_ptr() as usize;
            let end = start + text.len();
            if start < cut && end.min(cut) - start > MAX_CAPTURE {
                r.oversized += 1;
                continue;
            }
            let ended = if text.starts_with(['"', '{', '[']) {
                end <= cut
            } else {
                end < cut
            };
            if !ended {
                continue;
            }
            match key {
                "usage" => usage = Some(serde_json::from_str::<WireUsage>(text).ok()),
                "model" => model = Some(serde_json::from_str::<String>(text).ok()),
                "type" => {
                    is_error = serde_json::from_str::<String>(text).is_ok_and(|t| t == "error");
                }
                _ => error = Some(text),
            }
        }
        if let Some(Some(w)) = usage {
            let mut m = UsageMerge::default();
            m.apply(&w);
            r.usage = m.usage();
            r.saw_usage = true;
        }
        r.model = model.flatten().map(Arc::from);
        if is_error {
            let e = error.and_then(|e| serde_json::from_str::<WireError>(e).ok());
            r.error = Some(e.unwrap_or_default().into_api_error());
        }
        r
    }

    fn scan_pieces(pieces: &[&[u8]]) -> UsageReport {
        let mut s = UsageScanner::new(BodyFormat::Json);
        for p in pieces {
            s.feed(p);
        }
        s.finish(BodyEnd::Ended)
    }

    /// Bodies for the JSON differential test: the mock's answer and variations of what the
    /// API may send, and of what it should not.
    fn reference_bodies() -> Vec<String> {
        const MOCK: &str = r#"{"id":"msg_mock_1","type":"message","role":"assistant","model":"claude-sonnet-4-5","content":[{"type":"text","text":"lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt ut labore et"}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":380,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"cache_creation":{"ephemeral_5m_input_tokens":0,"ephemeral_1h_input_tokens":0},"output_tokens":16,"service_tier":"standard"}}"#;
        let with_usage = |usage: &str| {
            format!(
                r#"{{"id":"msg_1","type":"message","model":"m","content":[],"usage":{usage},"stop_reason":"end_turn"}}"#
            )
        };
        let pretty = |s: &str| {
            serde_json::to_string_pretty(
                &serde_json::from_str::<serde_json::Value>(s).expect("JSON"),
            )
            .expect("JSON")
        };
        let mut bodies = vec![
            MOCK.to_owned(),
            pretty(MOCK),
            JSON.to_owned(),
            pretty(JSON),
            format!("\r\n\t {}\n\n", MOCK.replace(':', " :\t").replace(',', "\r\n,  ")),
            r#"{"type":"message","model":"claude-opus-4-5","usage":{"input_tokens":10,"cache_creation_input_tokens":5,"cache_read_input_tokens":7,"cache_creation":{"ephemeral_5m_input_tokens":2,"ephemeral_1h_input_tokens":3},"output_tokens":20,"server_tool_use":{"web_search_requests":4,"web_fetch_requests":1},"service_tier":"priority"}}"#.to_owned(),
            // Nulls, escapes and non-ASCII where the scanner reads strings.
            r#"{"model":null,"type":"message","usage":{"input_tokens":null,"output_tokens":5,"cache_creation":null,"server_tool_use":null,"service_tier":null},"stop_sequence":null}"#.to_owned(),
            r#"{"model":"claude-\u0073onnet \"4\" \\ 5","type":"mess\u0061ge","usage":{"output_tokens":1}}"#.to_owned(),
            r#"{"model":"clàude-ünïcode-✓","usage":{"output_tokens":1,"service_tier":"st\u0061ndard"}}"#.to_owned(),
            r#"{"model":"","type":"","usage":{}}"#.to_owned(),
            r#"{"model":5,"type":["error"],"usage":{"cache_creation":{},"server_tool_use":{}}}"#.to_owned(),
            // Brackets and quotes inside strings, nested arrays, other keys that look like ours.
            r#"{"content":[{"type":"text","text":"} ] { [ \" \\\" usage\":{\"input_tokens\":9} \\"},{"type":"tool_use","input":{"a":[1,[2,{"b":"}]"}]],"usage":{"input_tokens":99}}}],"usages":{"input_tokens":1},"mode":"x","a_very_long_key_name_usage":1,"usage":{"input_tokens":3,"output_tokens":4}}"#.to_owned(),
            r#"{"usag\u0065":{"input_tokens":1},"\u0075sage":{"input_tokens":2},"usage":{"input_tokens":3},"mod\"el":"x"}"#.to_owned(),
            // Duplicate keys: the last wins, valid or not.
            r#"{"usage":{"input_tokens":1},"model":"a","usage":{"output_tokens":2},"model":"b"}"#.to_owned(),
            r#"{"usage":{"input_tokens":1},"usage":"not usage"}"#.to_owned(),
            r#"{"type":"error","type":"message","error":{"type":"x"}}"#.to_owned(),
            // Error envelopes.
            r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"},"request_id":"req_1"}"#.to_owned(),
            r#"{"type":"error","error":{"type":"invalid_request_error","message":"a \"b\"\nc"}}"#.to_owned(),
            r#"{"error":{"message":"no type"},"type":"\u0065rror"}"#.to_owned(),
            r#"{"type":"error"}"#.to_owned(),
            r#"{"type":"error","error":"not an object"}"#.to_owned(),
            // Usage values the hand reader leaves to serde, and what serde rejects.
            with_usage(r#"{"input_tokens":1,"server_tool_use":{"web_search_requests":3},"foo":[1,{"a":"}"}],"bar":{"x":null},"baz":-1.5e3,"s":"é\n","t":true,"f":false}"#),
            with_usage(r#"{"input_tokens":1,"input_tokens":2}"#),
            with_usage(r#"{"input_tokens":null,"input_tokens":2}"#),
            with_usage(r#"{"cache_creation":{"ephemeral_5m_input_tokens":1,"ephemeral_5m_input_tokens":1}}"#),
            with_usage(r#"{"output_tokens":-1}"#),
            with_usage(r#"{"output_tokens":-0}"#),
            with_usage(r#"{"output_tokens":1.0}"#),
            with_usage(r#"{"output_tokens":1e2}"#),
            with_usage(r#"{"output_tokens":18446744073709551615}"#),
            with_usage(r#"{"output_tokens":18446744073709551616}"#),
            with_usage(r#"{"output_tokens":99999999999999999999999}"#),
            with_usage(r#"{"output_tokens":"5"}"#),
            with_usage(r#"{"output_tokens":true}"#),
            with_usage(r#"{"service_tier":"flex","inp\u0075t_tokens":8}"#),
            with_usage(r#"{"service_tier":5}"#),
            with_usage(r#"{"service_tier":{"batch":null}}"#),
            with_usage(r#"{"cache_creation":[1,2]}"#),
            with_usage(r#"[1,2,3,4,null,null,"batch"]"#),
            with_usage("null"),
            with_usage("12"),
            with_usage(r#""usage""#),
            with_usage(r#"{ "input_tokens" : 7 , "cache_creation" : { "ephemeral_1h_input_tokens" : 2 } }"#),
        ];
        // Values over MAX_CAPTURE are skipped and counted; the text around them is not.
        let big = "x".repeat(MAX_CAPTURE);
        bodies.push(format!(r#"{{"content":[{{"text":"{big}"}}],"usage":{{"output_tokens":1,"note":"{big}"}},"model":"{big}","type":"message"}}"#));
        bodies.push(format!(
            r#"{{"usage":{{"output_tokens":1}},"usage":{{"output_tokens":2,"note":"{big}"}}}}"#
        ));
        bodies
    }

    /// The JSON scanner gives the reference's report for every body: fed whole, cut at every
    /// byte (a body that ended early), and split into two and three chunks anywhere.
    #[test]
    fn json_scanner_matches_the_serde_reference() {
        for body in reference_bodies() {
            let body = body.as_bytes();
            let n = body.len();
            let show = String::from_utf8_lossy(&body[..n.min(120)]);
            let whole = reference(body, n);
            assert_eq!(scan_all(BodyFormat::Json, body), whole, "{show}");
            // The big bodies are checked at a stride (each scan reads 200 KB).
            let step = if n > MAX_CAPTURE { 4093 } else { 1 };
            for cut in (0..=n).step_by(step) {
                assert_eq!(
                    scan_pieces(&[&body[..cut]]),
                    reference(body, cut),
                    "cut at {cut}: {show}"
                );
                assert_eq!(
                    scan_pieces(&[&body[..cut], &body[cut..]]),
                    whole,
                    "split at {cut}: {show}"
                );
            }
            // Three chunks: every pair of cuts in small bodies, a spread of them otherwise.
            let second = if n <= 200 {
                1
            } else if n > MAX_CAPTURE {
                16381
            } else {
                7
            };
            for i in (0..=n).step_by(step) {
                for j in (i..=n).step_by(second) {
                    let r = scan_pieces(&[&body[..i], &body[i..j], &body[j..]]);
                    assert_eq!(r, whole, "split at {i} and {j}: {show}");
                }
            }
        }
    }

    /// What the scanner makes of bodies that are not a JSON object (no serde reference): the
    /// same, whole or split.
    #[test]
    fn json_scanner_on_other_bodies() {
        let cases: [(&str, bool, Option<u64>); 10] = [
            ("<html>502</html>", false, None),
            (r#"{"usage":{"input_tokens":1}} trailing"#, false, Some(1)),
            (r#"{"usage":{"input_tokens":1}}}"#, false, Some(1)),
            (r#"{"usage":{"input_tokens":1}"#, false, Some(1)),
            (r#"{"usage":{"input_tokens":1"#, false, None),
            (r#"{"usage":{"input_tokens":1},"model":"m"#, false, Some(1)),
            (r#"[{"usage":{"input_tokens":1}}]"#, true, None),
            (r#"["x","usage":{"input_tokens":2}]"#, true, Some(2)),
            (r#"{"usage":{"input_tokens":01}}"#, true, None),
            (r#"  ,{"usage" {"input_tokens":3}: "model"}"#, true, None),
        ];
        for (body, completed, input) in cases {
            let whole = scan_all(BodyFormat::Json, body.as_bytes());
            assert_eq!(
                (
                    whole.completed,
                    whole.saw_usage.then_some(whole.usage.input_tokens)
                ),
                (completed, input),
                "{body}"
            );
            let b = body.as_bytes();
            for i in 0..=b.len() {
                for j in i..=b.len() {
                    assert_eq!(
                        scan_pieces(&[&b[..i], &b[i..j], &b[j..]]),
                        whole,
                        "{body} split at {i} and {j}"
                    );
                }
            }
        }
    }

    /// Strings serde refuses (raw control bytes, invalid UTF-8) are not read, whole or split;
    /// valid UTF-8 is read as it is.
    #[test]
    fn json_strings_serde_rejects_are_not_read() {
        let cases: [(&[u8], Option<&str>, bool, bool); 6] = [
            (
                b"{\"model\":\"a\x01b\",\"type\":\"error\",\"usage\":{}}",
                None,
                true,
                true,
            ),
            (
                b"{\"model\":\"a\xffb\",\"type\":\"error\x1f\"}",
                None,
                false,
                false,
            ),
            (
                b"{\"model\":\"a\xc3b\",\"type\":\"err\xc3\"}",
                None,
                false,
                false,
            ),
            (
                b"{\"model\":\"a\x7fb\xc3\xa9\",\"type\":\"error\"}",
                Some("a\u{7f}b\u{e9}"),
                true,
                false,
            ),
            (
                b"{\"usage\":{\"input_tokens\":1,\"k\":\"\x01\"}}",
                None,
                false,
                false,
            ),
            (
                b"{\"usage\":{\"input_tokens\":1,\"k\":\"\xc3\xa9\x7f\"}}",
                None,
                false,
                true,
            ),
        ];
        for (body, model, error, usage) in cases {
            let whole = scan_all(BodyFormat::Json, body);
            assert_eq!(
                (
                    whole.model.as_deref(),
                    whole.error.is_some(),
                    whole.saw_usage
                ),
                (model, error, usage),
                "{body:?}"
            );
            for i in 0..=body.len() {
                assert_eq!(
                    scan_pieces(&[&body[..i], &body[i..]]),
                    whole,
                    "{body:?} split at {i}"
                );
            }
        }
    }

    #[test]
    fn every_two_way_split_is_equal() {
        for (fmt, body) in [(BodyFormat::Sse, STREAM), (BodyFormat::Json, JSON)] {
            let whole = scan_all(fmt, body.as_bytes());
            for i in 0..=body.len() {
                let mut s = UsageScanner::new(fmt);
                s.feed(&body.as_bytes()[..i]);
                s.feed(&body.as_bytes()[i..]);
                assert_eq!(s.finish(BodyEnd::Ended), whole, "split at {i}");
            }
        }
    }

    /// The mock's message_start data (as `claude-mock` writes it for a 16-token answer).
    const MOCK_START: &str = r#"{"type":"message_start","message":{"id":"msg_mock_1","type":"message","role":"assistant","model":"claude-sonnet-4-5","content":[],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":380,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"cache_creation":{"ephemeral_5m_input_tokens":0,"ephemeral_1h_input_tokens":0},"output_tokens":1,"service_tier":"standard"}}}"#;
    /// The mock's message_delta data.
    const MOCK_DELTA: &str = r#"{"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"input_tokens":380,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":16}}"#;

    /// The mock's 16-token stream, one frame per event as it sends them.
    fn mock_frames() -> Vec<String> {
        let mut f = vec![
            format!("event: message_start\ndata: {MOCK_START}\n\n"),
            "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n".to_owned(),
            "event: ping\ndata: {\"type\":\"ping\"}\n\n".to_owned(),
        ];
        // Sixteen text deltas (the words do not matter to the scanner).
        for i in 0..16 {
            let (sp, w) = (if i == 0 { "" } else { " " }, format!("word{i}"));
            f.push(format!("event: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"index\":0,\"delta\":{{\"type\":\"text_delta\",\"text\":\"{sp}{w}\"}}}}\n\n"));
        }
        f.push(
            "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n"
                .to_owned(),
        );
        f.push(format!("event: message_delta\ndata: {MOCK_DELTA}\n\n"));
        f.push("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n".to_owned());
        f
    }

    /// Event data for the SSE differential tests: the mock's, and variations of what the API
    /// may send and of what it should not (serde decides what they mean).
    fn event_data() -> Vec<Vec<u8>> {
        let pretty = |s: &str| {
            serde_json::to_string_pretty(
                &serde_json::from_str::<serde_json::Value>(s).expect("JSON"),
            )
            .expect("JSON")
        };
        let start = |message: &str| format!(r#"{{"type":"message_start","message":{message}}}"#);
        let delta = |usage: &str| {
            format!(
                r#"{{"type":"message_delta","delta":{{"stop_reason":"end_turn"}},"usage":{usage}}}"#
            )
        };
        let mut v: Vec<String> = vec![
            MOCK_START.to_owned(),
            MOCK_DELTA.to_owned(),
            pretty(MOCK_START),
            pretty(MOCK_DELTA),
            format!(" \t\r\n{} \t", MOCK_START.replace(':', " :\t").replace(',', "\r\n , ")),
            r#"{"type":"message_stop"}"#.to_owned(),
            r#"{ "type" : "message_stop" }"#.to_owned(),
            r#"{"type":"ping"}"#.to_owned(),
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":" Lorem"}}"#.to_owned(),
            // Reordered, extra and null members.
            r#"{"message":{"usage":{"output_tokens":2,"input_tokens":7},"model":"m","id":"x"},"type":"message_start"}"#.to_owned(),
            r#"{"usage":{"output_tokens":9},"delta":{},"type":"message_delta"}"#.to_owned(),
            start(r#"{"model":"m","x":{"a":[1,-2.5e+3,true,false,null,"é\n\u00e9",{"b":[]}]},"usage":{"input_tokens":1}}"#),
            r#"{"extra":[{"usage":{"input_tokens":99}}],"type":"message_start","message":{"model":"m"},"more":"\"usage\":{}"}"#.to_owned(),
            r#"{"type":null,"message":null,"usage":null}"#.to_owned(),
            start(r#"{"model":null,"usage":null}"#),
            start("null"),
            start("{}"),
            "{}".to_owned(),
            r#"{"usage":{"output_tokens":3}}"#.to_owned(),
            r#"{"type":"message_delta"}"#.to_owned(),
            // Escapes and non-ASCII where the fast path reads, and elsewhere.
            start(r#"{"model":"claude-\u0073onnet \"4\" \\ 5","usage":{"input_tokens":1}}"#),
            start(r#"{"model":"clàude-ünïcode-✓","usage":{"input_tokens":1}}"#),
            start(r#"{"model":"\ud800","usage":{"input_tokens":1}}"#),
            start(r#"{"id":"\ud800\u00e9\n\t\/","model":"m","usage":{"input_tokens":1}}"#),
            r#"{"type":"message\u005fstart","message":{"model":"m","usage":{"input_tokens":4}}}"#.to_owned(),
            r#"{"typ\u0065":"message_start","message":{"model":"m"}}"#.to_owned(),
            start(r#"{"mod\u0065l":"x","\u0075sage":{"input_tokens":5}}"#),
            r#"{"\u0075sage":{"output_tokens":5},"type":"message_delta"}"#.to_owned(),
            delta(r#"{"outp\u0075t_tokens":3,"service_tier":"b\u0061tch"}"#),
            r#"{"ключ":"значение","type":"message_delta","usage":{"output_tokens":2}}"#.to_owned(),
            // Duplicates: of fields serde reads (an error), and of others (fine).
            start(r#"{"model":"a","model":"b"}"#),
            start(r#"{"usage":{"input_tokens":1},"usage":{"input_tokens":2}}"#),
            start(r#"{"model":null,"model":"b"}"#),
            r#"{"type":"message_start","type":"message_start","message":{}}"#.to_owned(),
            r#"{"type":"message_delta","usage":{"output_tokens":1},"usage":{"output_tokens":2}}"#.to_owned(),
            r#"{"type":"message_start","message":{},"message":{}}"#.to_owned(),
            start(r#"{"id":"a","id":"b","model":"m"}"#),
            r#"{"x":1,"x":2,"type":"message_delta","usage":{"output_tokens":4}}"#.to_owned(),
            delta(r#"{"output_tokens":1,"output_tokens":2}"#),
            // Values of other types than serde's.
            start(r#"{"model":5}"#),
            start(r#"{"model":["m"]}"#),
            start(r#"["m",{"input_tokens":3}]"#),
            start(r#""message""#),
            r#"{"type":5,"usage":{"output_tokens":1}}"#.to_owned(),
            r#"{"type":{"a":1}}"#.to_owned(),
            delta("[1,2,3,4,null,null,\"batch\"]"),
            delta("7"),
            delta(r#"{"output_tokens":1.0}"#),
            delta(r#"{"output_tokens":-1}"#),
            delta(r#"{"output_tokens":"5"}"#),
            delta(r#"{"output_tokens":18446744073709551616}"#),
            delta(r#"{"input_tokens":1,"server_tool_use":{"web_search_requests":3},"foo":[1,{"a":"}"}],"service_tier":"flex"}"#),
            // Errors.
            r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#.to_owned(),
            r#"{"type":"error","error":{"message":"m"}}"#.to_owned(),
            r#"{"type":"error","error":null}"#.to_owned(),
            r#"{"type":"error"}"#.to_owned(),
            r#"{"type":"error","error":"not an object"}"#.to_owned(),
            r#"{"error":{"type":"x"},"type":"message_delta","usage":{"output_tokens":3}}"#.to_owned(),
            // Not JSON, or not one JSON object.
            "not json".to_owned(),
            "[1]".to_owned(),
            "null".to_owned(),
            r#"{"type":"message_delta","usage":{"output_tokens":3}} x"#.to_owned(),
            r#"{"type":"message_delta","usage":{"output_tokens":3}}}"#.to_owned(),
            r#"{"type":"message_delta","usage":{"output_tokens":3},}"#.to_owned(),
            r#"{"type":"message_delta","usage":{"output_tokens":3}"#.to_owned(),
            r#"{"type":"message_delta" "usage":{"output_tokens":3}}"#.to_owned(),
            r#"{"type":"message_delta","x":01,"usage":{"output_tokens":3}}"#.to_owned(),
            r#"{"type":"message_delta","x":1.,"usage":{"output_tokens":3}}"#.to_owned(),
            r#"{"type":"message_delta","x":tru,"usage":{"output_tokens":3}}"#.to_owned(),
            r#"{"type":"message_delta","x":"\x","usage":{"output_tokens":3}}"#.to_owned(),
            r#"{"type":"message_delta","x":[1 2],"usage":{"output_tokens":3}}"#.to_owned(),
            "{\u{c}\"type\":\"message_delta\"}".to_owned(),
            format!(
                r#"{{"type":"message_delta","x":{}{},"usage":{{"output_tokens":3}}}}"#,
                "[".repeat(150),
                "]".repeat(150)
            ),
        ];
        // Truncated data.
        for cut in [1, 10, 40, 100, 200, MOCK_START.len() - 1] {
            v.push(MOCK_START[..cut].to_owned());
        }
        let mut v: Vec<Vec<u8>> = v.into_iter().map(String::into_bytes).collect();
        // Bytes serde rejects in a string it reads, or (in an ignored string) accepts.
        v.push(
            b"{\"type\":\"message_delta\",\"x\":\"\x01\",\"usage\":{\"output_tokens\":3}}".to_vec(),
        );
        v.push(
            b"{\"type\":\"message_delta\",\"x\":\"\xff\",\"usage\":{\"output_tokens\":3}}".to_vec(),
        );
        v.push(b"{\"type\":\"message_start\",\"message\":{\"model\":\"m\xc3\"}}".to_vec());
        v.push(b"{\"type\":\"message_start\",\"message\":{\"model\":\"m\x7f\xc3\xa9\"}}".to_vec());
        v.push(b"{\"type\":\"message_delta\",\"\xff\":1,\"usage\":{\"output_tokens\":3}}".to_vec());
        v
    }

    /// The SSE fast path is serde's `SseEvent` for every data: those of [`event_data`], every
    /// prefix of them, and every one-byte edit of the mock's two events (an edit that keeps
    /// the fast path going must agree with serde; most send it to serde). The usual shapes
    /// are read without serde.
    #[test]
    fn sse_event_read_is_serde() {
        let same = |data: &[u8]| {
            let fast = SseEvent::read(data);
            if fast.is_some() {
                let serde = serde_json::from_slice::<SseEvent>(data).ok();
                assert_eq!(
                    format!("{fast:?}"),
                    format!("{serde:?}"),
                    "{}",
                    String::from_utf8_lossy(data)
                );
            }
        };
        for data in [
            MOCK_START,
            MOCK_DELTA,
            r#"{"type":"message_stop"}"#,
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":" Lorem"}}"#,
        ] {
            assert!(SseEvent::read(data.as_bytes()).is_some(), "{data}");
        }
        for data in event_data() {
            for cut in 0..=data.len() {
                same(&data[..cut]);
            }
        }
        for base in [MOCK_START, MOCK_DELTA] {
            crate::skim::for_each_one_byte_edit(base.as_bytes(), &same);
        }
    }

    /// Scans `pieces` in turn, with the fast path or with serde alone.
    fn scan_sse(pieces: &[&[u8]], serde_only: bool) -> UsageReport {
        SERDE_ONLY.set(serde_only);
        let mut s = UsageScanner::new(BodyFormat::Sse);
        for p in pieces {
            s.feed(p);
        }
        let r = s.finish(BodyEnd::Ended);
        SERDE_ONLY.set(false);
        r
    }

    /// The scanner gives serde's report for every stream: the mock's (one frame per event,
    /// whole, split at every byte) and each of [`event_data`] as the data of an event named
    /// `message_start`, `message_delta`, `error`, `message_stop` or unnamed, between the
    /// mock's first event and a `message_stop`, fed whole and split at every byte.
    #[test]
    fn sse_fast_path_gives_serde_reports() {
        let frames = mock_frames();
        let whole: Vec<&[u8]> = frames.iter().map(String::as_bytes).collect();
        let mock = scan_sse(&whole, false);
        assert_eq!(mock, scan_sse(&whole, true));
        assert!(mock.is_complete_success());
        assert_eq!(
            (
                mock.usage.input_tokens,
                mock.usage.output_tokens,
                mock.events
            ),
            (380, 16, 22)
        );
        assert_eq!(mock.model.as_deref(), Some("claude-sonnet-4-5"));
        let body = frames.concat();
        let body = body.as_bytes();
        for i in 0..=body.len() {
            let pieces = [&body[..i], &body[i..]];
            assert_eq!(scan_sse(&pieces, false), mock, "split at {i}");
        }
        let mut read_by_hand = 0;
        for data in event_data() {
            read_by_hand += usize::from(SseEvent::read(&data).is_some());
            for name in [
                "message_start",
                "message_delta",
                "error",
                "message_stop",
                "",
            ] {
                let mut ev = Vec::new();
                if !name.is_empty() {
                    ev.extend_from_slice(format!("event: {name}\n").as_bytes());
                }
                ev.extend_from_slice(b"data: ");
                ev.extend_from_slice(&data);
                ev.extend_from_slice(b"\n\n");
                let body = [
                    frames[0].as_bytes(),
                    &ev,
                    b"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
                ]
                .concat();
                let show = format!("{name}: {}", String::from_utf8_lossy(&data));
                let serde = scan_sse(&[&body], true);
                assert_eq!(scan_sse(&[&body], false), serde, "{show}");
                for i in frames[0].len()..=body.len() {
                    let pieces = [&body[..i], &body[i..]];
                    assert_eq!(scan_sse(&pieces, false), serde, "split at {i}: {show}");
                }
            }
        }
        assert!(read_by_hand > 20, "{read_by_hand}");
    }

    /// An `event:` line equal to the previous one is known without reading it; one that only
    /// begins like it (longer, shorter, another spelling) is read.
    #[test]
    fn repeated_event_lines_are_read_as_the_first() {
        let ev = |line: &str, n: u64| {
            format!(
                "{line}\ndata: {{\"type\":\"message_delta\",\"usage\":{{\"output_tokens\":{n}}}}}\n\n"
            )
        };
        let cases: [(&[(&str, u64)], u64); 6] = [
            (
                &[("event: message_delta", 1), ("event: message_delta", 2)],
                2,
            ),
            (
                &[("event: message_delta", 1), ("event: message_deltas", 3)],
                1,
            ),
            (
                &[("event: message_delta", 1), ("event: message_delt", 3)],
                1,
            ),
            (
                &[("event: message_delta", 1), ("event: message_delta ", 3)],
                1,
            ),
            (
                &[
                    ("event: ping", 1),
                    ("event: ping", 2),
                    ("event:message_delta", 4),
                    ("event: message_delta\r", 5),
                ],
                5,
            ),
            (
                &[
                    ("event: message_deltas", 1),
                    ("event: message_deltas", 2),
                    ("event: message_delta", 6),
                ],
                6,
            ),
        ];
        for (events, output) in cases {
            let body: String = events.iter().map(|&(line, n)| ev(line, n)).collect();
            let whole = scan_all(BodyFormat::Sse, body.as_bytes());
            assert_eq!(whole.usage.output_tokens, output, "{body}");
            assert_eq!(whole.events, events.len() as u64);
            let b = body.as_bytes();
            for i in 0..=b.len() {
                for j in i..=b.len() {
                    assert_eq!(
                        scan_sse(&[&b[..i], &b[i..j], &b[j..]], false),
                        whole,
                        "split at {i} and {j}: {body}"
                    );
                }
            }
        }
    }
}
