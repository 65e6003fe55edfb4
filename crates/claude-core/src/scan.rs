//! The usage scanner: reads usage from a response body as its frames pass, for both shapes.
//!
//! - **SSE** (`text/event-stream`): `message_start` usage is the base, then every
//!   `message_delta` usage replaces the fields it carries (the API's counts are cumulative:
//!   never summed). `ping` and unknown events are ignored; `event: error` is captured;
//!   `message_stop` marks completion. Lines are split across any frame boundary (`\n`,
//!   `\r\n`, `\r`).
//! - **JSON**: an incremental tokenizer tracks nesting and strings and captures only the
//!   top-level `usage`, `model`, `type` and `error` values; the rest (the content text) is
//!   skipped without copying.
//!
//! Memory is bounded whatever the input: a line or captured value longer than
//! [`MAX_CAPTURE`] is skipped (and counted in [`UsageReport::oversized`]). The scanner never
//! panics on arbitrary bytes.

use memchr::{memchr, memchr2};
use serde::Deserialize;

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
    /// `model` as the response named it.
    pub model: Option<String>,
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
    sse: SseState,
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
            sse: SseState::default(),
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

    fn feed_sse(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.sse.after_cr {
                self.sse.after_cr = false;
                if data[0] == b'\n' {
                    data = &data[1..];
                    continue;
                }
            }
            let nl = memchr2(b'\n', b'\r', data);
            let (segment, rest, line_end) = match nl {
                Some(i) => (&data[..i], &data[i + 1..], Some(data[i])),
                None => (data, &data[data.len()..], None),
            };
            self.sse_segment(segment);
            if let Some(b) = line_end {
                self.sse.after_cr = b == b'\r';
                self.sse_line_end();
            }
            data = rest;
        }
    }

    fn sse_segment(&mut self, mut seg: &[u8]) {
        let s = &mut self.sse;
        if s.skip_line {
            return;
        }
        // Decide from the line's first bytes whether it is worth keeping.
        if !s.line_decided {
            let need = PREFIX.saturating_sub(s.line.len()).min(seg.len());
            s.line.extend_from_slice(&seg[..need]);
            seg = &seg[need..];
            if s.line.len() >= PREFIX || !seg.is_empty() {
                s.line_decided = true;
                if s.line.first() == Some(&b':')
                    || (s.line.starts_with(b"data") && !s.event_wanted())
                {
                    s.skip_line = true;
                    s.skipped_data = s.line.starts_with(b"data");
                    s.line.clear();
                    return;
                }
            }
        }
        if s.line.len() + seg.len() > MAX_CAPTURE {
            s.skip_line = true;
            s.skipped_data = s.line.starts_with(b"data");
            s.line.clear();
            self.report.oversized += 1;
            return;
        }
        s.line.extend_from_slice(seg);
    }

    fn sse_line_end(&mut self) {
        let s = &mut self.sse;
        let skipped = s.skip_line;
        s.skip_line = false;
        s.line_decided = false;
        if skipped {
            // A skipped data line still belongs to an event that will be dispatched.
            s.has_data |= std::mem::take(&mut s.skipped_data);
            s.line.clear();
            return;
        }
        let line = std::mem::take(&mut s.line);
        if line.is_empty() {
            self.sse_dispatch();
        } else {
            let (field, value) = match memchr(b':', &line) {
                Some(i) => {
                    let v = &line[i + 1..];
                    (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
                }
                None => (&line[..], &b""[..]),
            };
            match field {
                b"event" => {
                    s.event.clear();
                    s.event.extend_from_slice(value);
                    s.has_event = true;
                }
                b"data" => {
                    if s.data.len() + value.len() + 1 > MAX_CAPTURE {
                        self.report.oversized += 1;
                    } else {
                        if s.has_data && !s.data.is_empty() {
                            s.data.push(b'\n');
                        }
                        s.data.extend_from_slice(value);
                    }
                    s.has_data = true;
                }
                _ => {}
            }
            // Keep the allocation for the next line.
            s.line = line;
            s.line.clear();
        }
    }

    fn sse_dispatch(&mut self) {
        let s = &mut self.sse;
        if !s.has_data && !s.has_event {
            return;
        }
        let data = std::mem::take(&mut s.data);
        let has_data = s.has_data;
        s.has_data = false;
        s.has_event = false;
        self.report.events += 1;
        let name = std::mem::take(&mut s.event);
        if has_data {
            self.handle_event(&name, &data);
        }
        let s = &mut self.sse;
        s.event = name;
        s.event.clear();
        s.data = data;
        s.data.clear();
    }

    fn handle_event(&mut self, name: &[u8], data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let Ok(ev) = serde_json::from_slice::<SseEvent>(data) else {
            if matches!(name, b"message_start" | b"message_delta" | b"error") {
                self.report.oversized += 1;
            }
            return;
        };
        // The `event:` name wins; without one, the JSON `type` says what it is.
        let kind: &str = if name.is_empty() {
            ev.kind.as_deref().unwrap_or("")
        } else {
            std::str::from_utf8(name).unwrap_or("")
        };
        match kind {
            "message_start" => {
                if let Some(m) = ev.message {
                    if let Some(u) = &m.usage {
                        self.merge.apply(u);
                    }
                    if m.model.is_some() {
                        self.report.model = m.model;
                    }
                }
            }
            "message_delta" => {
                if let Some(u) = &ev.usage {
                    self.merge.apply(u);
                }
            }
            "message_stop" => self.report.completed = true,
            "error" if self.report.error.is_none() => {
                let e = ev.error.unwrap_or_default();
                self.report.error = Some(ApiError {
                    error_type: e.kind.unwrap_or_else(|| "unknown_error".into()),
                    message: e.message.unwrap_or_default(),
                });
            }
            _ => {}
        }
    }
}

const PREFIX: usize = 5; // enough for "data:" / "event"

#[derive(Debug, Clone, Default)]
struct SseState {
    line: Vec<u8>,
    line_decided: bool,
    skip_line: bool,
    skipped_data: bool,
    after_cr: bool,
    event: Vec<u8>,
    has_event: bool,
    data: Vec<u8>,
    has_data: bool,
}

impl SseState {
    /// Whether the current event's data is worth buffering: the events that carry usage,
    /// errors or completion, and events whose name is not known yet.
    fn event_wanted(&self) -> bool {
        !self.has_event
            || matches!(
                self.event.as_slice(),
                b"message_start" | b"message_delta" | b"message_stop" | b"error"
            )
    }
}

#[derive(Deserialize)]
struct SseEvent {
    #[serde(rename = "type")]
    kind: Option<String>,
    message: Option<SseMessage>,
    usage: Option<WireUsage>,
    error: Option<WireError>,
}

#[derive(Deserialize)]
struct SseMessage {
    model: Option<String>,
    usage: Option<WireUsage>,
}

#[derive(Deserialize, Default)]
struct WireError {
    #[serde(rename = "type")]
    kind: Option<String>,
    message: Option<String>,
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
    key: Vec<u8>,
    key_too_long: bool,
    pending: Option<Field>,
    value_next: bool,
    // capture of one top-level value
    capture: Option<(Field, Capture)>,
    buf: Vec<u8>,
    buf_overflow: bool,
    usage: Option<Vec<u8>>,
    model: Option<Vec<u8>>,
    kind: Option<Vec<u8>>,
    error: Option<Vec<u8>>,
    oversized: u64,
}

impl JsonState {
    fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() && !self.broken {
            if self.in_string {
                if self.escape {
                    self.escape = false;
                    self.push(&data[..1]);
                    self.key_too_long |= self.reading_key;
                    data = &data[1..];
                    continue;
                }
                match memchr2(b'"', b'\\', data) {
                    None => {
                        self.push(data);
                        self.key_bytes(data);
                        return;
                    }
                    Some(i) => {
                        self.push(&data[..=i]);
                        self.key_bytes(&data[..i]);
                        if data[i] == b'\\' {
                            self.escape = true;
                        } else {
                            self.in_string = false;
                            self.string_end();
                        }
                        data = &data[i + 1..];
                    }
                }
                continue;
            }
            let b = data[0];
            data = &data[1..];
            self.structural(b);
        }
    }

    fn structural(&mut self, b: u8) {
        if self.complete {
            if !b.is_ascii_whitespace() {
                self.broken = true;
            }
            return;
        }
        match b {
            b' ' | b'\t' | b'\n' | b'\r' => {
                if self.capture.is_some_and(|(_, c)| c == Capture::Scalar) && self.depth == 1 {
                    self.finish_capture();
                } else {
                    self.push(&[b]);
                }
            }
            b'"' => {
                if self.depth == 1 && self.expect_key {
                    self.reading_key = true;
                    self.key.clear();
                    self.key_too_long = false;
                } else if self.value_next {
                    self.start_capture(Capture::Str);
                }
                self.in_string = true;
                self.push(&[b]);
            }
            b'{' | b'[' => {
                if self.value_next {
                    self.start_capture(Capture::Nested);
                }
                self.push(&[b]);
                self.depth += 1;
                self.started = true;
                self.expect_key = self.depth == 1 && b == b'{';
                if self.depth == 1 && b == b'[' {
                    // A top-level array is not a Messages answer; keep tokenizing.
                    self.expect_key = false;
                }
            }
            b'}' | b']' => {
                if self.capture.is_some_and(|(_, c)| c == Capture::Scalar) && self.depth == 1 {
                    self.finish_capture();
                } else {
                    self.push(&[b]);
                }
                if self.depth == 0 {
                    self.broken = true;
                    return;
                }
                self.depth -= 1;
                if self.depth == 1 && self.capture.is_some_and(|(_, c)| c == Capture::Nested) {
                    self.finish_capture();
                }
                if self.depth == 0 {
                    self.complete = true;
                }
            }
            b':' => {
                if self.depth == 1 && !self.expect_key && self.capture.is_none() {
                    self.value_next = true;
                } else {
                    self.push(&[b]);
                }
            }
            b',' => {
                if self.depth == 1 {
                    if self.capture.is_some_and(|(_, c)| c == Capture::Scalar) {
                        self.finish_capture();
                    }
                    self.expect_key = true;
                    self.pending = None;
                    self.value_next = false;
                } else {
                    self.push(&[b]);
                }
            }
            _ => {
                if !self.started {
                    // Not JSON at all (e.g. an HTML error page): stop looking.
                    self.broken = true;
                    return;
                }
                if self.value_next {
                    self.start_capture(Capture::Scalar);
                }
                self.push(&[b]);
            }
        }
    }

    fn key_bytes(&mut self, bytes: &[u8]) {
        if self.reading_key && !self.key_too_long {
            if self.key.len() + bytes.len() > 16 {
                self.key_too_long = true;
            } else {
                self.key.extend_from_slice(bytes);
            }
        }
    }

    fn string_end(&mut self) {
        if self.reading_key {
            self.reading_key = false;
            self.expect_key = false;
            self.pending = if self.key_too_long {
                None
            } else {
                match self.key.as_slice() {
                    b"usage" => Some(Field::Usage),
                    b"model" => Some(Field::Model),
                    b"type" => Some(Field::Type),
                    b"error" => Some(Field::Error),
                    _ => None,
                }
            };
        } else if self.depth == 1 && self.capture.is_some_and(|(_, c)| c == Capture::Str) {
            self.finish_capture();
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

    fn push(&mut self, bytes: &[u8]) {
        if self.capture.is_some() && !self.buf_overflow {
            if self.buf.len() + bytes.len() > MAX_CAPTURE {
                self.buf_overflow = true;
                self.buf = Vec::new();
                self.oversized += 1;
            } else {
                self.buf.extend_from_slice(bytes);
            }
        }
    }

    fn finish_capture(&mut self) {
        if let Some((field, _)) = self.capture.take() {
            if self.buf_overflow {
                return;
            }
            let v = std::mem::take(&mut self.buf);
            match field {
                Field::Usage => self.usage = Some(v),
                Field::Model => self.model = Some(v),
                Field::Type => self.kind = Some(v),
                Field::Error => self.error = Some(v),
            }
        }
    }

    fn fill(&self, r: &mut UsageReport) {
        r.completed = self.complete && !self.broken;
        r.oversized += self.oversized;
        if let Some(w) = self
            .usage
            .as_deref()
            .and_then(|u| serde_json::from_slice::<WireUsage>(u).ok())
        {
            let mut m = UsageMerge::default();
            m.apply(&w);
            r.usage = m.usage();
            r.saw_usage = true;
        }
        if let Some(m) = self
            .model
            .as_deref()
            .and_then(|m| serde_json::from_slice::<String>(m).ok())
        {
            r.model = Some(m);
        }
        let is_error = self
            .kind
            .as_deref()
            .and_then(|k| serde_json::from_slice::<String>(k).ok())
            .is_some_and(|k| k == "error");
        if is_error && r.error.is_none() {
            let e = self
                .error
                .as_deref()
                .and_then(|e| serde_json::from_slice::<WireError>(e).ok())
                .unwrap_or_default();
            r.error = Some(ApiError {
                error_type: e.kind.unwrap_or_else(|| "unknown_error".into()),
                message: e.message.unwrap_or_default(),
            });
        }
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
}
