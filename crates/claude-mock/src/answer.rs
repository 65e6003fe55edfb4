//! The answers: JSON messages, SSE event sequences, error envelopes, and the response body
//! that writes them frame by frame while keeping the stats exact.

use std::fmt::Write as _;
use std::pin::Pin;
use std::sync::LazyLock;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::Sleep;

use crate::stats::{InFlight, UsageFigures};

/// At most this many words of text (and text deltas in a stream) per answer; the usage
/// still reports the full figure.
pub const MAX_TEXT_TOKENS: usize = 4096;

const WORDS: [&str; 16] = [
    "Lorem",
    "ipsum",
    "dolor",
    "sit",
    "amet",
    "consectetur",
    "adipiscing",
    "elit",
    "sed",
    "do",
    "eiusmod",
    "tempor",
    "incididunt",
    "ut",
    "labore",
    "magna",
];

/// Token `i` of every answer: a word, with a leading space after the first.
fn token_text(i: usize) -> String {
    let word = WORDS[i % WORDS.len()];
    if i == 0 {
        word.to_owned()
    } else {
        format!(" {word}")
    }
}

/// The text of the first `MAX_TEXT_TOKENS` tokens, and where each token ends in it.
struct TextTable {
    text: String,
    ends: Vec<usize>,
    deltas: Vec<Bytes>,
}

static TEXT: LazyLock<TextTable> = LazyLock::new(|| {
    let mut text = String::new();
    let mut ends = Vec::with_capacity(MAX_TEXT_TOKENS);
    let mut deltas = Vec::with_capacity(MAX_TEXT_TOKENS);
    for i in 0..MAX_TEXT_TOKENS {
        let token = token_text(i);
        text.push_str(&token);
        ends.push(text.len());
        deltas.push(Bytes::from(format!(
            "event: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"index\":0,\"delta\":{{\"type\":\"text_delta\",\"text\":\"{token}\"}}}}\n\n"
        )));
    }
    TextTable { text, ends, deltas }
});

/// The answer text of `tokens` tokens (at most [`MAX_TEXT_TOKENS`] words).
pub(crate) fn answer_text(tokens: u64) -> &'static str {
    let n = usize::try_from(tokens)
        .unwrap_or(MAX_TEXT_TOKENS)
        .min(MAX_TEXT_TOKENS);
    if n == 0 {
        return "";
    }
    &TEXT.text[..TEXT.ends[n - 1]]
}

const CONTENT_BLOCK_START: &str = "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n";
const PING: &str = "event: ping\ndata: {\"type\":\"ping\"}\n\n";
const CONTENT_BLOCK_STOP: &str =
    "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n";
const MESSAGE_STOP: &str = "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";

/// The usage of one answer, with the cache-write split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AnswerUsage {
    pub(crate) input: u64,
    pub(crate) output: u64,
    pub(crate) cache_read: u64,
    pub(crate) cache_write_5m: u64,
    pub(crate) cache_write_1h: u64,
    pub(crate) web_search: u64,
    pub(crate) service_tier: &'static str,
}

impl AnswerUsage {
    /// `,"server_tool_use":{…}` when web searches were scripted, else nothing.
    fn server_tool_use(&self) -> String {
        if self.web_search == 0 {
            String::new()
        } else {
            format!(
                ",\"server_tool_use\":{{\"web_search_requests\":{}}}",
                self.web_search
            )
        }
    }

    pub(crate) fn cache_creation(&self) -> u64 {
        self.cache_write_5m.saturating_add(self.cache_write_1h)
    }

    pub(crate) fn figures(&self) -> UsageFigures {
        UsageFigures {
            input: self.input,
            cache_creation: self.cache_creation(),
            cache_read: self.cache_read,
            output: self.output,
        }
    }

    /// The full usage object of a message (`output_tokens` given).
    fn write_json(&self, out: &mut String, output: u64) {
        let _ = write!(
            out,
            "{{\"input_tokens\":{},\"cache_creation_input_tokens\":{},\"cache_read_input_tokens\":{},\
             \"cache_creation\":{{\"ephemeral_5m_input_tokens\":{},\"ephemeral_1h_input_tokens\":{}}},\
             \"output_tokens\":{output}{},\"service_tier\":\"{}\"}}",
            self.input,
            self.cache_creation(),
            self.cache_read,
            self.cache_write_5m,
            self.cache_write_1h,
            self.server_tool_use(),
            self.service_tier,
        );
    }
}

/// What an answer says, shared by the JSON and the SSE shapes.
#[derive(Debug)]
pub(crate) struct Answer<'a> {
    pub(crate) id: u64,
    pub(crate) model_json: &'a str,
    pub(crate) usage: AnswerUsage,
    pub(crate) stop_reason: &'static str,
}

impl Answer<'_> {
    /// The non-streaming JSON body.
    pub(crate) fn json(&self) -> Bytes {
        let text = answer_text(self.usage.output);
        let mut out = String::with_capacity(400 + text.len() + self.model_json.len());
        let _ = write!(
            out,
            "{{\"id\":\"msg_mock_{}\",\"type\":\"message\",\"role\":\"assistant\",\"model\":{},\
             \"content\":[{{\"type\":\"text\",\"text\":\"{text}\"}}],\"stop_reason\":\"{}\",\
             \"stop_sequence\":null,\"usage\":",
            self.id, self.model_json, self.stop_reason
        );
        self.usage.write_json(&mut out, self.usage.output);
        out.push('}');
        Bytes::from(out)
    }

    fn message_start(&self) -> Bytes {
        let mut out = String::with_capacity(512 + self.model_json.len());
        let _ = write!(
            out,
            "event: message_start\ndata: {{\"type\":\"message_start\",\"message\":{{\"id\":\"msg_mock_{}\",\
             \"type\":\"message\",\"role\":\"assistant\",\"model\":{},\"content\":[],\"stop_reason\":null,\
             \"stop_sequence\":null,\"usage\":",
            self.id, self.model_json
        );
        self.usage.write_json(&mut out, 1);
        out.push_str("}}\n\n");
        Bytes::from(out)
    }

    fn message_delta(&self) -> Bytes {
        Bytes::from(format!(
            "event: message_delta\ndata: {{\"type\":\"message_delta\",\"delta\":{{\"stop_reason\":\"{}\",\
             \"stop_sequence\":null}},\"usage\":{{\"input_tokens\":{},\"cache_creation_input_tokens\":{},\
             \"cache_read_input_tokens\":{},\"output_tokens\":{}{}}}}}\n\n",
            self.stop_reason,
            self.usage.input,
            self.usage.cache_creation(),
            self.usage.cache_read,
            self.usage.output,
            self.usage.server_tool_use(),
        ))
    }

    /// The SSE event source of this answer.
    pub(crate) fn stream(&self, token_latency: Duration, error: Option<(u64, Bytes)>) -> SseSource {
        let start_usage = UsageFigures {
            output: 1,
            ..self.usage.figures()
        };
        let (error_after, error_event) = match error {
            Some((after, event)) => (Some(after), event),
            None => (None, Bytes::new()),
        };
        SseSource {
            phase: if error_after == Some(0) {
                Phase::Error
            } else {
                Phase::Start
            },
            message_start: self.message_start(),
            message_delta: self.message_delta(),
            start_usage,
            final_usage: self.usage.figures(),
            deltas: usize::try_from(self.usage.output)
                .unwrap_or(MAX_TEXT_TOKENS)
                .min(MAX_TEXT_TOKENS),
            next_delta: 0,
            slept: false,
            token_latency,
            error_after,
            error_event,
        }
    }
}

/// `event: error` with this type and message.
pub(crate) fn error_event(error_type: &str, message: &str) -> Bytes {
    Bytes::from(format!(
        "event: error\ndata: {{\"type\":\"error\",\"error\":{{\"type\":\"{error_type}\",\"message\":{}}}}}\n\n",
        json_string(message)
    ))
}

/// A JSON string literal.
pub(crate) fn json_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_owned())
}

/// The Anthropic error envelope.
pub(crate) fn error_json(id: u64, error_type: &str, message: &str, details: Option<&str>) -> Bytes {
    let mut out = String::with_capacity(128 + message.len());
    let _ = write!(
        out,
        "{{\"type\":\"error\",\"error\":{{\"type\":\"{error_type}\",\"message\":{}",
        json_string(message)
    );
    if let Some(details) = details {
        let _ = write!(out, ",\"details\":{details}");
    }
    let _ = write!(out, "}},\"request_id\":\"req_mock_{id}\"}}");
    Bytes::from(out)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Start,
    BlockStart,
    Ping,
    Deltas,
    BlockStop,
    MessageDelta,
    MessageStop,
    Error,
    Done,
}

/// Which usage a frame carries, applied to the stats when the frame is handed to hyper.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Commit {
    None,
    Add(UsageFigures),
    Replace(UsageFigures, UsageFigures),
}

/// One step of a body.
#[derive(Debug)]
enum Step {
    Frame(Bytes, Commit),
    Sleep(Duration),
    End,
}

/// The events of one streamed answer, produced lazily.
#[derive(Debug)]
pub(crate) struct SseSource {
    phase: Phase,
    message_start: Bytes,
    message_delta: Bytes,
    start_usage: UsageFigures,
    final_usage: UsageFigures,
    deltas: usize,
    next_delta: usize,
    slept: bool,
    token_latency: Duration,
    error_after: Option<u64>,
    error_event: Bytes,
}

impl SseSource {
    fn after_deltas(&self) -> Phase {
        if self.error_after.is_some() {
            Phase::Error
        } else {
            Phase::BlockStop
        }
    }

    fn next(&mut self) -> Step {
        let frame = |b: &'static str| Step::Frame(Bytes::from_static(b.as_bytes()), Commit::None);
        match self.phase {
            Phase::Start => {
                self.phase = Phase::BlockStart;
                Step::Frame(self.message_start.clone(), Commit::Add(self.start_usage))
            }
            Phase::BlockStart => {
                self.phase = Phase::Ping;
                frame(CONTENT_BLOCK_START)
            }
            Phase::Ping => {
                self.phase = if self.deltas == 0 {
                    self.after_deltas()
                } else {
                    Phase::Deltas
                };
                frame(PING)
            }
            Phase::Deltas => {
                if !self.slept && !self.token_latency.is_zero() {
                    self.slept = true;
                    return Step::Sleep(self.token_latency);
                }
                self.slept = false;
                let delta = TEXT.deltas[self.next_delta].clone();
                self.next_delta += 1;
                let written = self.next_delta as u64;
                if self.error_after.is_some_and(|after| written >= after)
                    || self.next_delta == self.deltas
                {
                    self.phase = self.after_deltas();
                }
                Step::Frame(delta, Commit::None)
            }
            Phase::BlockStop => {
                self.phase = Phase::MessageDelta;
                frame(CONTENT_BLOCK_STOP)
            }
            Phase::MessageDelta => {
                self.phase = Phase::MessageStop;
                Step::Frame(
                    self.message_delta.clone(),
                    Commit::Replace(self.start_usage, self.final_usage),
                )
            }
            Phase::MessageStop => {
                self.phase = Phase::Done;
                frame(MESSAGE_STOP)
            }
            Phase::Error => {
                self.phase = Phase::Done;
                Step::Frame(self.error_event.clone(), Commit::None)
            }
            Phase::Done => Step::End,
        }
    }
}

/// Where the bytes of a body come from.
#[derive(Debug)]
enum Source {
    /// One frame (a JSON answer or an error), with the usage it carries.
    Once(Option<(Bytes, Commit)>, u64),
    /// An event stream.
    Sse(Box<SseSource>),
}

impl Source {
    fn next(&mut self) -> Step {
        match self {
            Self::Once(frame, _) => match frame.take() {
                Some((bytes, commit)) => Step::Frame(bytes, commit),
                None => Step::End,
            },
            Self::Sse(sse) => sse.next(),
        }
    }

    fn is_exhausted(&self) -> bool {
        match self {
            Self::Once(frame, _) => frame.is_none(),
            Self::Sse(sse) => sse.phase == Phase::Done,
        }
    }
}

/// The error that ends a body cut by `x-mock-reset-after`: hyper then aborts the
/// connection, so the client sees an incomplete body rather than a clean end.
#[derive(Debug)]
pub(crate) struct ResetAfter;

impl std::fmt::Display for ResetAfter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection reset by x-mock-reset-after")
    }
}

impl std::error::Error for ResetAfter {}

/// How long a cut body waits before failing, so that hyper flushes the bytes written so far
/// (a failing body makes hyper drop what it still buffers).
const FLUSH_BEFORE_RESET: Duration = Duration::from_millis(5);

/// The body of every response. It holds the request's in-flight guard until it ends or is
/// dropped, applies `x-mock-reset-after`, and adds a frame's usage to the stats at the
/// moment the frame is handed to hyper, so a client never reads usage the stats miss.
pub(crate) struct MockBody {
    source: Source,
    /// Bytes still allowed by `x-mock-reset-after`.
    allowance: Option<u64>,
    /// The body was cut: fail once the sleep (if any) is over.
    failing: bool,
    /// The timer, allocated on first use and reset for every later sleep.
    sleep: Option<Pin<Box<Sleep>>>,
    sleeping: bool,
    in_flight: Option<InFlight>,
}

impl std::fmt::Debug for MockBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MockBody")
            .field("source", &self.source)
            .field("allowance", &self.allowance)
            .field("failing", &self.failing)
            .finish_non_exhaustive()
    }
}

impl MockBody {
    /// A one-frame body; `usage` is added to the stats if the whole frame is written.
    pub(crate) fn once(bytes: Bytes, usage: Option<UsageFigures>) -> Self {
        let len = bytes.len() as u64;
        let commit = usage.map_or(Commit::None, Commit::Add);
        Self::new(Source::Once(Some((bytes, commit)), len))
    }

    /// An event-stream body.
    pub(crate) fn sse(source: SseSource) -> Self {
        Self::new(Source::Sse(Box::new(source)))
    }

    fn new(source: Source) -> Self {
        Self {
            source,
            allowance: None,
            failing: false,
            sleep: None,
            sleeping: false,
            in_flight: None,
        }
    }

    /// Holds the request's in-flight guard, and reports usage to its stats, until the body
    /// ends or is dropped. A body without a guard reports nothing.
    pub(crate) fn attach(&mut self, in_flight: InFlight) {
        self.in_flight = Some(in_flight);
    }

    /// Cuts the body after `bytes` bytes.
    pub(crate) fn reset_after(mut self, bytes: Option<u64>) -> Self {
        self.allowance = bytes;
        self
    }

    fn start_sleep(&mut self, duration: Duration) {
        let now = tokio::time::Instant::now();
        let deadline = now
            .checked_add(duration)
            .unwrap_or(now + Duration::from_secs(86_400 * 365));
        match &mut self.sleep {
            Some(sleep) => sleep.as_mut().reset(deadline),
            None => self.sleep = Some(Box::pin(tokio::time::sleep_until(deadline))),
        }
        self.sleeping = true;
    }

    fn commit(&self, commit: Commit) {
        let Some(in_flight) = &self.in_flight else {
            return;
        };
        match commit {
            Commit::None => {}
            Commit::Add(u) => in_flight.stats().add_usage(&u),
            Commit::Replace(before, after) => in_flight.stats().replace_usage(&before, &after),
        }
    }
}

impl Body for MockBody {
    type Data = Bytes;
    type Error = ResetAfter;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ResetAfter>>> {
        let this = self.get_mut();
        loop {
            if this.sleeping {
                if let Some(sleep) = &mut this.sleep
                    && sleep.as_mut().poll(cx).is_pending()
                {
                    return Poll::Pending;
                }
                this.sleeping = false;
            }
            if this.failing {
                this.in_flight = None;
                return Poll::Ready(Some(Err(ResetAfter)));
            }
            match this.source.next() {
                Step::Sleep(duration) => this.start_sleep(duration),
                Step::End => {
                    this.in_flight = None;
                    return Poll::Ready(None);
                }
                Step::Frame(bytes, commit) => {
                    if let Some(allowance) = &mut this.allowance {
                        let len = bytes.len() as u64;
                        if len > *allowance {
                            // Cut inside this frame: write what is allowed, let hyper flush
                            // it, then fail. The frame's usage is not committed.
                            let keep = usize::try_from(*allowance).unwrap_or(0);
                            *allowance = 0;
                            this.failing = true;
                            this.start_sleep(FLUSH_BEFORE_RESET);
                            if keep > 0 {
                                return Poll::Ready(Some(Ok(Frame::data(bytes.slice(..keep)))));
                            }
                            continue;
                        }
                        *allowance -= len;
                    }
                    this.commit(commit);
                    if this.source.is_exhausted() {
                        // Release the request before hyper can write the end of the body.
                        this.in_flight = None;
                    }
                    return Poll::Ready(Some(Ok(Frame::data(bytes))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        !self.failing && !self.sleeping && self.source.is_exhausted()
    }

    fn size_hint(&self) -> SizeHint {
        match &self.source {
            Source::Once(_, len) => SizeHint::with_exact(*len),
            Source::Sse(_) => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(output: u64) -> AnswerUsage {
        AnswerUsage {
            input: 10,
            output,
            cache_read: 3,
            cache_write_5m: 2,
            cache_write_1h: 1,
            web_search: 0,
            service_tier: "standard",
        }
    }

    fn drain(mut source: SseSource) -> Vec<String> {
        let mut events = Vec::new();
        loop {
            match source.next() {
                Step::Frame(b, _) => events.push(String::from_utf8(b.to_vec()).unwrap()),
                Step::Sleep(_) => {}
                Step::End => return events,
            }
        }
    }

    fn names(events: &[String]) -> Vec<&str> {
        events
            .iter()
            .map(|e| e.lines().next().unwrap().trim_start_matches("event: "))
            .collect()
    }

    #[test]
    fn text_is_deterministic_and_capped() {
        assert_eq!(answer_text(0), "");
        assert_eq!(answer_text(3), "Lorem ipsum dolor");
        assert_eq!(answer_text(100_000).split(' ').count(), MAX_TEXT_TOKENS);
    }

    #[test]
    fn json_answer_is_valid() {
        let answer = Answer {
            id: 7,
            model_json: "\"claude-x\"",
            usage: usage(2),
            stop_reason: "end_turn",
        };
        let v: serde_json::Value = serde_json::from_slice(&answer.json()).unwrap();
        assert_eq!(v["id"], "msg_mock_7");
        assert_eq!(v["model"], "claude-x");
        assert_eq!(v["content"][0]["text"], "Lorem ipsum");
        assert_eq!(v["usage"]["cache_creation_input_tokens"], 3);
        assert_eq!(v["usage"]["cache_creation"]["ephemeral_1h_input_tokens"], 1);
        assert_eq!(v["usage"]["output_tokens"], 2);
    }

    #[test]
    fn stream_sequence_and_errors() {
        let answer = Answer {
            id: 1,
            model_json: "\"m\"",
            usage: usage(3),
            stop_reason: "max_tokens",
        };
        let events = drain(answer.stream(Duration::ZERO, None));
        assert_eq!(
            names(&events),
            [
                "message_start",
                "content_block_start",
                "ping",
                "content_block_delta",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        for event in &events {
            let data = event.lines().nth(1).unwrap().trim_start_matches("data: ");
            let _: serde_json::Value = serde_json::from_str(data).unwrap();
        }
        let err = error_event("overloaded_error", "Overloaded");
        let first = drain(answer.stream(Duration::ZERO, Some((0, err.clone()))));
        assert_eq!(names(&first), ["error"]);
        let after2 = drain(answer.stream(Duration::ZERO, Some((2, err.clone()))));
        assert_eq!(
            names(&after2),
            [
                "message_start",
                "content_block_start",
                "ping",
                "content_block_delta",
                "content_block_delta",
                "error"
            ]
        );
        let beyond = drain(answer.stream(Duration::ZERO, Some((9, err))));
        assert_eq!(names(&beyond).last(), Some(&"error"));
        assert_eq!(names(&beyond).len(), 7);
    }

    #[test]
    fn error_envelope() {
        let body = error_json(
            5,
            "rate_limit_error",
            "a \"quoted\" limit",
            Some("{\"error_code\":\"x\"}"),
        );
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], "rate_limit_error");
        assert_eq!(v["error"]["message"], "a \"quoted\" limit");
        assert_eq!(v["error"]["details"]["error_code"], "x");
        assert_eq!(v["request_id"], "req_mock_5");
    }
}
