//! An in-process upstream for the unit tests: scripted replies (JSON, SSE, errors, delays,
//! broken bodies) and counters of calls and concurrency. Timers are tokio's, so paused-clock
//! tests drive everything.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use claude_core::{BoxError, RequestMeta};
use http::{Request, Response};
use http_body::{Body, Frame};
use tokio::time::Sleep;
use tower_service::Service;

/// What the upstream saw.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) calls: AtomicUsize,
    pub(crate) in_flight: AtomicUsize,
    pub(crate) max_in_flight: AtomicUsize,
    /// The `x-id` header of each call, in call order.
    pub(crate) order: Mutex<Vec<String>>,
    /// (time since start, input estimate) of each call.
    pub(crate) arrivals: Mutex<Vec<(Duration, u64)>>,
}

impl Counters {
    pub(crate) fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    pub(crate) fn max_in_flight(&self) -> usize {
        self.max_in_flight.load(Ordering::SeqCst)
    }

    pub(crate) fn order(&self) -> Vec<String> {
        self.order.lock().unwrap().clone()
    }
}

struct InFlight(Arc<Counters>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A response body of scripted frames, with an optional delay before each.
pub(crate) struct TestBody {
    frames: VecDeque<Result<Bytes, io::Error>>,
    delay: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
    guard: Option<InFlight>,
}

impl Body for TestBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = &mut *self;
        if this.frames.is_empty() {
            this.guard = None;
            return Poll::Ready(None);
        }
        if !this.delay.is_zero() {
            let delay = this.delay;
            let sleep = this
                .sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(delay)));
            ready!(sleep.as_mut().poll(cx));
            this.sleep = None;
        }
        let frame = this.frames.pop_front();
        if this.frames.is_empty() {
            this.guard = None;
        }
        Poll::Ready(frame.map(|f| f.map(Frame::data)))
    }

    fn is_end_stream(&self) -> bool {
        self.frames.is_empty()
    }
}

/// A scripted reply.
#[derive(Debug, Clone, Default)]
pub(crate) struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    frames: Vec<String>,
    content_type: &'static str,
    fail_after: Option<usize>,
    frame_delay: Duration,
    head_delay: Duration,
    transport_error: bool,
}

fn event(name: &str, data: &str) -> String {
    format!("event: {name}\ndata: {data}\n\n")
}

impl Reply {
    /// A complete JSON message with this usage.
    pub(crate) fn json(input: u64, output: u64) -> Self {
        Self::json_usage(&format!(
            r#"{{"input_tokens":{input},"output_tokens":{output}}}"#
        ))
    }

    /// A complete JSON message with this usage object.
    pub(crate) fn json_usage(usage: &str) -> Self {
        Self {
            status: 200,
            content_type: "application/json",
            frames: vec![format!(
                r#"{{"type":"message","content":[{{"type":"text","text":"hi"}}],"usage":{usage}}}"#
            )],
            ..Self::default()
        }
    }

    /// A complete stream: message_start (input, 1 output), a delta, message_delta (output),
    /// message_stop; one frame per event.
    pub(crate) fn sse(input: u64, output: u64) -> Self {
        Self {
            status: 200,
            content_type: "text/event-stream",
            frames: vec![
                event(
                    "message_start",
                    &format!(
                        r#"{{"type":"message_start","message":{{"usage":{{"input_tokens":{input},"output_tokens":1}}}}}}"#
                    ),
                ),
                event(
                    "content_block_delta",
                    r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"hi"}}"#,
                ),
                event(
                    "message_delta",
                    &format!(
                        r#"{{"type":"message_delta","delta":{{"stop_reason":"end_turn"}},"usage":{{"output_tokens":{output}}}}}"#
                    ),
                ),
                event("message_stop", r#"{"type":"message_stop"}"#),
            ],
            ..Self::default()
        }
    }

    /// A stream that carries `event: error` right after message_start and ends there.
    pub(crate) fn sse_error_after_start(input: u64) -> Self {
        let mut r = Self::sse(input, 0);
        r.frames.truncate(1);
        r.frames.push(event(
            "error",
            r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
        ));
        r
    }

    /// An Anthropic error envelope with this status.
    pub(crate) fn error(status: u16, kind: &str) -> Self {
        Self {
            status,
            content_type: "application/json",
            frames: vec![format!(
                r#"{{"type":"error","error":{{"type":"{kind}","message":"scripted"}}}}"#
            )],
            ..Self::default()
        }
    }

    /// No response at all: the call fails.
    pub(crate) fn transport_error() -> Self {
        Self {
            transport_error: true,
            ..Self::default()
        }
    }

    pub(crate) fn header(mut self, name: &str, value: impl std::fmt::Display) -> Self {
        self.headers.push((name.to_owned(), value.to_string()));
        self
    }

    /// The body fails (connection reset) after `n` frames.
    pub(crate) fn fail_after(mut self, n: usize) -> Self {
        self.fail_after = Some(n);
        self
    }

    pub(crate) fn frame_delay(mut self, d: Duration) -> Self {
        self.frame_delay = d;
        self
    }

    pub(crate) fn head_delay(mut self, d: Duration) -> Self {
        self.head_delay = d;
        self
    }
}

type Script = dyn Fn(&Request<Bytes>) -> Reply + Send + Sync;

/// The scripted upstream service.
#[derive(Clone)]
pub(crate) struct Upstream {
    script: Arc<Script>,
    pub(crate) counters: Arc<Counters>,
    start: tokio::time::Instant,
}

impl Upstream {
    pub(crate) fn new(script: impl Fn(&Request<Bytes>) -> Reply + Send + Sync + 'static) -> Self {
        Self {
            script: Arc::new(script),
            counters: Arc::default(),
            start: tokio::time::Instant::now(),
        }
    }
}

impl Service<Request<Bytes>> for Upstream {
    type Response = Response<TestBody>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<TestBody>, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<Bytes>) -> Self::Future {
        let reply = (self.script)(&req);
        let c = &self.counters;
        c.calls.fetch_add(1, Ordering::SeqCst);
        let now = c.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        c.max_in_flight.fetch_max(now, Ordering::SeqCst);
        if let Some(id) = req.headers().get("x-id") {
            c.order
                .lock()
                .unwrap()
                .push(id.to_str().unwrap().to_owned());
        }
        let estimate = RequestMeta::get_or_parse(&mut req).input_tokens_estimate;
        c.arrivals
            .lock()
            .unwrap()
            .push((self.start.elapsed(), estimate));
        let guard = InFlight(Arc::clone(c));
        Box::pin(async move {
            if !reply.head_delay.is_zero() {
                tokio::time::sleep(reply.head_delay).await;
            }
            if reply.transport_error {
                drop(guard);
                return Err(Box::new(io::Error::from(io::ErrorKind::ConnectionReset)) as BoxError);
            }
            let mut frames: VecDeque<Result<Bytes, io::Error>> = reply
                .frames
                .into_iter()
                .map(|f| Ok(Bytes::from(f)))
                .collect();
            if let Some(n) = reply.fail_after {
                frames.truncate(n);
                frames.push_back(Err(io::Error::from(io::ErrorKind::ConnectionReset)));
            }
            let body = TestBody {
                guard: if frames.is_empty() { None } else { Some(guard) },
                frames,
                delay: reply.frame_delay,
                sleep: None,
            };
            let mut builder = Response::builder()
                .status(reply.status)
                .header("content-type", reply.content_type);
            for (k, v) in &reply.headers {
                builder = builder.header(k.as_str(), v.as_str());
            }
            Ok(builder.body(body)?)
        })
    }
}

/// A Messages request whose prompt is `chars` characters long.
pub(crate) fn message(model: &str, chars: usize, max_tokens: u32, stream: bool) -> Request<Bytes> {
    let content = "x".repeat(chars);
    let body = format!(
        r#"{{"model":"{model}","max_tokens":{max_tokens},"stream":{stream},"messages":[{{"role":"user","content":"{content}"}}]}}"#
    );
    Request::post("/v1/messages")
        .body(Bytes::from(body))
        .unwrap()
}

/// The input estimate of a request (the formula claude-core documents).
pub(crate) fn estimate(req: &Request<Bytes>) -> u64 {
    RequestMeta::parse(req.uri().path(), req.body()).input_tokens_estimate
}

/// Sets `x-id` on a request.
pub(crate) fn tagged(mut req: Request<Bytes>, id: impl std::fmt::Display) -> Request<Bytes> {
    req.headers_mut()
        .insert("x-id", id.to_string().parse().unwrap());
    req
}
