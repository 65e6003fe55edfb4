//! The open-loop load generator.
//!
//! - **Schedule**: request `i` of a step has an intended send time `start + i / rate`. A
//!   pacer thread (`std::thread::sleep`, tens of microseconds of precision, where tokio's
//!   timer has one millisecond) releases each slot at its time into a queue, whatever
//!   happened to earlier requests: the offered load does not slow down when the server does.
//! - **Connections**: a fixed pool of keep-alive HTTP/1.1 connections (hyper's client
//!   connection, one request in flight each), opened before the step starts. A worker task
//!   per connection takes the next released slot when it is free. When all are busy, slots
//!   wait in the queue.
//! - **Latency** is measured from the intended send time to the last byte of the response
//!   body (JSON read whole, SSE streams read to their end), so time spent waiting for a free
//!   connection or for a late pacer counts: coordinated omission is corrected. The pacer's
//!   own lateness is recorded apart (it is the instrument's floor, the same for every
//!   scenario).
//! - **Bounds**: a step sends at most `rate × (warm-up + duration)` requests; each request
//!   times out after 5 s; slots not started 5 s after the schedule's end are dropped, and
//!   counted.
//! - Requests of the warm-up are sent the same way but not recorded.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use hdrhistogram::Histogram;
use http::{HeaderValue, Request};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::servers::UPSTREAM_KEY;

/// Time allowed to one request, from its send to the end of its body.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Time allowed after the schedule's end for queued slots to start.
const DRAIN: Duration = Duration::from_secs(5);

/// The request shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub(crate) enum Shape {
    /// `POST /v1/messages`, a JSON answer.
    Json,
    /// `POST /v1/messages` with `"stream": true`, an SSE answer read to its end.
    Sse,
}

impl Shape {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::Json => "JSON",
            Self::Sse => "SSE",
        }
    }
}

/// One step: a fixed rate for a fixed time against one address.
#[derive(Debug, Clone)]
pub(crate) struct Step {
    pub(crate) addr: SocketAddr,
    pub(crate) shape: Shape,
    pub(crate) rate: f64,
    pub(crate) warmup: Duration,
    pub(crate) duration: Duration,
    pub(crate) connections: usize,
    /// Makes request bodies distinct across steps (with the index inside a step), so a
    /// response cache, when there is one, measures its miss path.
    pub(crate) nonce: u64,
    /// Every request identical (a cache's hit path).
    pub(crate) identical: bool,
}

/// What a step measured.
#[derive(Debug)]
pub(crate) struct Outcome {
    /// Latency of the recorded (post warm-up) successful requests, in nanoseconds.
    pub(crate) latency: Histogram<u64>,
    /// How late the pacer released slots, in nanoseconds (all slots).
    pub(crate) pacer_lag: Histogram<u64>,
    /// Recorded requests answered 200 with a complete body.
    pub(crate) ok: u64,
    /// Recorded requests that failed (status, transport, timeout, incomplete body).
    pub(crate) errors: u64,
    /// Recorded slots never started (the drain time ran out).
    pub(crate) dropped: u64,
    /// Requests completed in the whole step, warm-up included (for CPU per request).
    pub(crate) completed_total: u64,
    /// Successful recorded requests per second, over the recorded window or until the
    /// last of them ended, whichever is longer.
    pub(crate) achieved: f64,
    /// The first error seen, for the log.
    pub(crate) first_error: Option<String>,
}

pub(crate) fn histogram() -> Histogram<u64> {
    // 1 µs to 60 s at 3 significant digits.
    Histogram::new_with_bounds(1_000, 60_000_000_000, 3)
        .unwrap_or_else(|e| panic!("histogram bounds: {e}"))
}

fn record(h: &mut Histogram<u64>, d: Duration) {
    let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
    h.saturating_record(ns.max(1_000));
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    index: u64,
    intended: Instant,
    recorded: bool,
}

/// Request bodies: a ~1.5 KB Messages request, made distinct by an index.
#[derive(Debug)]
struct Bodies {
    head: Bytes,
    tail: Bytes,
    nonce: u64,
    identical: bool,
}

impl Bodies {
    fn new(shape: Shape, nonce: u64, identical: bool) -> Self {
        let turn = "Here is the quarterly report of the platform team. Summarise the incidents, \
                    the latency figures and the open risks, then propose three next steps.";
        let stream = shape == Shape::Sse;
        let head = format!(
            r#"{{"model":"claude-sonnet-4-5","max_tokens":1024,"stream":{stream},"temperature":0.2,"system":"You are a careful assistant for an engineering organisation. Answer briefly and cite the section you rely on.","messages":[{{"role":"user","content":"{turn} {turn}"}},{{"role":"assistant","content":"I can do that. Which quarter do you mean, and should I include the incident timelines?"}},{{"role":"user","content":"Q3, with the timelines (request "#
        );
        let tail = format!(r#"). {turn} {turn} {turn}"}}]}}"#);
        Self {
            head: Bytes::from(head),
            tail: Bytes::from(tail),
            nonce,
            identical,
        }
    }

    fn body(&self, index: u64) -> Bytes {
        let id = if self.identical {
            "fixed".to_owned()
        } else {
            format!("{}-{index}", self.nonce)
        };
        let mut b = BytesMut::with_capacity(self.head.len() + id.len() + self.tail.len());
        b.extend_from_slice(&self.head);
        b.extend_from_slice(id.as_bytes());
        b.extend_from_slice(&self.tail);
        b.freeze()
    }
}

/// The last bytes of a body, kept across frames without allocating.
struct Tail {
    buf: [u8; 32],
    len: usize,
}

impl Tail {
    fn push(&mut self, data: &[u8]) {
        let cap = self.buf.len();
        if data.len() >= cap {
            self.buf.copy_from_slice(&data[data.len() - cap..]);
            self.len = cap;
        } else {
            let keep = (cap - data.len()).min(self.len);
            self.buf.copy_within(self.len - keep..self.len, 0);
            self.buf[keep..keep + data.len()].copy_from_slice(data);
            self.len = keep + data.len();
        }
    }

    fn ends_with(&self, s: &[u8]) -> bool {
        self.buf[..self.len].ends_with(s)
    }
}

async fn connect(addr: SocketAddr) -> Result<SendRequest<Full<Bytes>>, String> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| format!("handshake {addr}: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// One request on `sender`; `Ok` when the answer is a 200 with a complete body.
async fn exchange(
    sender: &mut SendRequest<Full<Bytes>>,
    host: &HeaderValue,
    shape: Shape,
    body: Bytes,
) -> Result<(), String> {
    sender
        .ready()
        .await
        .map_err(|e| format!("connection: {e}"))?;
    let mut req = Request::new(Full::new(body));
    *req.method_mut() = http::Method::POST;
    *req.uri_mut() = http::Uri::from_static("/v1/messages");
    let h = req.headers_mut();
    h.insert(http::header::HOST, host.clone());
    h.insert("x-api-key", HeaderValue::from_static(UPSTREAM_KEY));
    h.insert("anthropic-version", HeaderValue::from_static("2023-06-01"));
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("request: {e}"))?;
    let status = resp.status();
    let mut body = resp.into_body();
    let mut tail = Tail {
        buf: [0; 32],
        len: 0,
    };
    let mut n = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("body: {e}"))?;
        if let Some(d) = frame.data_ref() {
            n += d.len();
            tail.push(d);
        }
    }
    if status != http::StatusCode::OK {
        return Err(format!("status {status}"));
    }
    let complete = match shape {
        Shape::Json => tail.ends_with(b"}"),
        Shape::Sse => tail.ends_with(b"{\"type\":\"message_stop\"}\n\n"),
    };
    if n == 0 || !complete {
        return Err(format!("incomplete {} body ({n} bytes)", shape.label()));
    }
    Ok(())
}

#[derive(Debug)]
struct WorkerOut {
    latency: Histogram<u64>,
    ok: u64,
    errors: u64,
    dropped: u64,
    completed: u64,
    last_done: Option<Instant>,
    first_error: Option<String>,
}

/// Runs one step. Call from a tokio runtime.
pub(crate) async fn run(step: &Step) -> Result<Outcome, String> {
    let mut senders = Vec::with_capacity(step.connections);
    for _ in 0..step.connections {
        senders.push(connect(step.addr).await?);
    }
    let host = HeaderValue::from_str(&step.addr.to_string()).map_err(|e| e.to_string())?;
    let bodies = Arc::new(Bodies::new(step.shape, step.nonce, step.identical));
    let warm = (step.rate * step.warmup.as_secs_f64()).round() as u64;
    let total = warm + (step.rate * step.duration.as_secs_f64()).round() as u64;
    let interval_ns = 1e9 / step.rate;

    let (tx, rx) = mpsc::unbounded_channel::<Slot>();
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    // The schedule starts a little after now, once every worker waits.
    let start = Instant::now() + Duration::from_millis(20);
    let schedule_end = start + step.warmup + step.duration;
    let hard_deadline = schedule_end + DRAIN;
    let measure_start = start + step.warmup;

    let mut workers = Vec::with_capacity(senders.len());
    for mut sender in senders {
        let rx = Arc::clone(&rx);
        let bodies = Arc::clone(&bodies);
        let host = host.clone();
        let (addr, shape) = (step.addr, step.shape);
        workers.push(tokio::spawn(async move {
            let mut out = WorkerOut {
                latency: histogram(),
                ok: 0,
                errors: 0,
                dropped: 0,
                completed: 0,
                last_done: None,
                first_error: None,
            };
            let mut broken = false;
            loop {
                // The lock is held while waiting for the next slot: the waiting workers
                // queue on it in order, the first in line takes the next slot.
                let slot = { rx.lock().await.recv().await };
                let Some(slot) = slot else { break };
                if Instant::now() > hard_deadline {
                    out.dropped += u64::from(slot.recorded);
                    continue;
                }
                if broken {
                    match connect(addr).await {
                        Ok(s) => {
                            sender = s;
                            broken = false;
                        }
                        Err(e) => {
                            out.errors += u64::from(slot.recorded);
                            out.first_error.get_or_insert(e);
                            continue;
                        }
                    }
                }
                let body = bodies.body(slot.index);
                let res = tokio::time::timeout(
                    REQUEST_TIMEOUT,
                    exchange(&mut sender, &host, shape, body),
                )
                .await
                .unwrap_or_else(|_| Err("timed out".into()));
                let done = Instant::now();
                out.completed += 1;
                match res {
                    Ok(()) if slot.recorded => {
                        record(&mut out.latency, done - slot.intended);
                        out.ok += 1;
                        out.last_done = Some(out.last_done.map_or(done, |t| t.max(done)));
                    }
                    Ok(()) => {}
                    Err(e) => {
                        out.errors += u64::from(slot.recorded);
                        out.first_error.get_or_insert(e);
                        broken = true;
                    }
                }
            }
            out
        }));
    }

    let pacer = std::thread::Builder::new()
        .name("pacer".into())
        .spawn(move || {
            let mut lag = histogram();
            for i in 0..total {
                let intended = start + Duration::from_nanos((i as f64 * interval_ns) as u64);
                let now = Instant::now();
                if intended > now {
                    std::thread::sleep(intended - now);
                }
                let now = Instant::now();
                if now > hard_deadline {
                    break;
                }
                record(&mut lag, now.saturating_duration_since(intended));
                let slot = Slot {
                    index: i,
                    intended,
                    recorded: i >= warm,
                };
                if tx.send(slot).is_err() {
                    break;
                }
            }
            lag
        })
        .map_err(|e| format!("pacer thread: {e}"))?;

    let mut latency = histogram();
    let (mut ok, mut errors, mut dropped, mut completed) = (0, 0, 0, 0);
    let mut last_done: Option<Instant> = None;
    let mut first_error = None;
    for w in workers {
        let out = w.await.map_err(|e| format!("worker: {e}"))?;
        latency
            .add(&out.latency)
            .map_err(|e| format!("histogram: {e}"))?;
        ok += out.ok;
        errors += out.errors;
        dropped += out.dropped;
        completed += out.completed;
        if let Some(t) = out.last_done {
            last_done = Some(last_done.map_or(t, |l| l.max(t)));
        }
        if first_error.is_none() {
            first_error = out.first_error;
        }
    }
    let pacer_lag = pacer.join().map_err(|_| "the pacer panicked".to_owned())?;
    let recorded_slots = total - warm;
    // Slots the pacer never released (it ran past the deadline) count as dropped.
    let released = pacer_lag.len();
    dropped += total.saturating_sub(released).min(recorded_slots);
    let window = last_done
        .map_or(step.duration, |t| {
            t.saturating_duration_since(measure_start)
        })
        .max(step.duration);
    Ok(Outcome {
        latency,
        pacer_lag,
        ok,
        errors,
        dropped,
        completed_total: completed,
        achieved: ok as f64 / window.as_secs_f64(),
        first_error,
    })
}
