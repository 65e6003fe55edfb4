//! [`ResponseFuture`]: the attempt loop of one request, as a hand-written state machine.
//!
//! States: `Calling` (an attempt in flight) → `Reading` (the layer reads the start of the
//! body to decide: a small error body, or a stream's first event) → `Backoff` (waiting
//! before the next attempt) → `Polling` (driving the kept service to readiness, as the
//! `Service` contract requires before each `call`) → `Calling` again, until the future
//! returns. One tokio `Sleep` serves as the deadline (armed only once an attempt is
//! pending, so a service that answers at once never touches the timer wheel) and as the
//! backoff timer.
//!
//! The future is written by hand rather than as a boxed `async` block so that it needs no
//! `Send`/`'static` bounds of its own and costs no allocation on the success path.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::SystemTime;

use bytes::{Bytes, BytesMut};
use claude_core::{
    Attempt, BodyFormat, BoxError, Classification, Error, ErrorKind, FirstEvent, Origin,
    classify_error, classify_response, classify_stream_error,
};
use http::{Request, Response, header};
use http_body::{Body, Frame};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower_service::Service;

use crate::backoff::{base_backoff, jittered};
use crate::body::ResponseBody;
use crate::info::{Deadline, GiveUp, RetryInfo, RetryReason, RetryRecord, WaitSource, after};
use crate::service::Shared;
use crate::{ATTEMPTS_TOTAL, BUDGET_EXHAUSTED_TOTAL};

pin_project! {
    /// The response future of [`Retry`](crate::Retry).
    ///
    /// # Cancel safety
    ///
    /// Dropping it drops the attempt in flight (and any body it was reading) and sends
    /// nothing more. The budget keeps the request's deposit and any retry already taken.
    ///
    /// # Panics
    ///
    /// Must be polled inside a tokio runtime with the time driver enabled (it sleeps with
    /// `tokio::time`).
    pub struct ResponseFuture<S, B>
    where
        S: Service<Request<Bytes>>,
    {
        #[pin]
        state: State<S::Future, B>,
        #[pin]
        timer: Timer,
        ctx: Ctx<S>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, B> {
        Calling {
            #[pin]
            fut: F,
        },
        Reading {
            read: Option<Box<Read<B>>>,
        },
        Backoff {
            until: Instant,
        },
        Polling,
        Done,
    }
}

pin_project! {
    #[project = TimerProj]
    enum Timer {
        Idle,
        Armed {
            #[pin]
            sleep: Sleep,
        },
    }
}

/// Polls the timer until `at`, arming or moving it as needed.
fn poll_until(mut timer: Pin<&mut Timer>, at: Instant, cx: &mut Context<'_>) -> Poll<()> {
    if matches!(timer.as_mut().project(), TimerProj::Idle) {
        timer.set(Timer::Armed {
            sleep: tokio::time::sleep_until(at),
        });
    }
    match timer.project() {
        TimerProj::Armed { mut sleep } => {
            if sleep.deadline() != at {
                sleep.as_mut().reset(at);
            }
            sleep.poll(cx)
        }
        // Armed just above.
        TimerProj::Idle => Poll::Ready(()),
    }
}

/// Per-request state that is not pinned.
struct Ctx<S> {
    /// The service the first attempt was sent on, kept for the retries.
    service: S,
    shared: Arc<Shared>,
    /// The request every attempt clones (`Bytes` body: a reference count); `None` when no
    /// retry is possible.
    template: Option<Request<Bytes>>,
    attempt: u32,
    deadline: Instant,
    retries: Vec<RetryRecord>,
}

/// The start of a body being read to decide.
struct Read<B> {
    parts: http::response::Parts,
    body: Pin<Box<B>>,
    frames: VecDeque<Frame<Bytes>>,
    bytes: usize,
    ended: bool,
    purpose: Purpose,
}

enum Purpose {
    /// An error body, read (up to the limit) to classify by `error.type`.
    ErrorBody,
    /// A `200` stream, read up to its first complete event (only an `event: error` is
    /// parsed).
    FirstEvent(FirstEvent),
}

enum Step<B> {
    Return(Result<Response<ResponseBody<B>>, BoxError>),
    Read(Box<Read<B>>),
    Wait(Instant),
    Poll,
    Call,
}

impl<S, B> ResponseFuture<S, B>
where
    S: Service<Request<Bytes>>,
{
    pub(crate) fn start(mut service: S, shared: Arc<Shared>, mut req: Request<Bytes>) -> Self {
        let now = Instant::now();
        shared.budget.deposit_at(now);
        let deadline = req
            .extensions()
            .get::<Deadline>()
            .map_or_else(|| after(now, shared.config.deadline), |d| d.instant());
        let template = (shared.config.max_retries > 0).then(|| req.clone());
        req.extensions_mut().insert(Attempt(1));
        let fut = service.call(req);
        Self {
            state: State::Calling { fut },
            timer: Timer::Idle,
            ctx: Ctx {
                service,
                shared,
                template,
                attempt: 1,
                deadline,
                retries: Vec::new(),
            },
        }
    }
}

impl<S, B> fmt::Debug for ResponseFuture<S, B>
where
    S: Service<Request<Bytes>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Calling { .. } => "calling",
            State::Reading { .. } => "reading",
            State::Backoff { .. } => "backoff",
            State::Polling => "polling",
            State::Done => "done",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .field("attempt", &self.ctx.attempt)
            .finish_non_exhaustive()
    }
}

impl<S, B> Future for ResponseFuture<S, B>
where
    S: Service<Request<Bytes>, Response = Response<B>>,
    S::Error: Into<BoxError>,
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Output = Result<Response<ResponseBody<B>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let ctx = this.ctx;
        loop {
            let step = match this.state.as_mut().project() {
                StateProj::Calling { fut } => match fut.poll(cx) {
                    Poll::Ready(Ok(resp)) => ctx.on_response(resp),
                    Poll::Ready(Err(e)) => ctx.on_error(e.into()),
                    Poll::Pending => {
                        ready!(poll_until(this.timer.as_mut(), ctx.deadline, cx));
                        Step::Return(Err(ctx.deadline_error()))
                    }
                },
                StateProj::Reading { read } => {
                    let limit = ctx.shared.config.error_body_limit;
                    match read.as_mut().map(|r| r.poll_read(cx, limit)) {
                        Some(Poll::Ready(Ok(()))) => match read.take() {
                            Some(r) => ctx.on_read(*r),
                            None => Step::Return(Err(polled_after_completion())),
                        },
                        Some(Poll::Ready(Err(e))) => ctx.on_error(e),
                        Some(Poll::Pending) => {
                            ready!(poll_until(this.timer.as_mut(), ctx.deadline, cx));
                            Step::Return(Err(ctx.deadline_error()))
                        }
                        None => Step::Return(Err(polled_after_completion())),
                    }
                }
                StateProj::Backoff { until } => {
                    ready!(poll_until(this.timer.as_mut(), *until, cx));
                    Step::Poll
                }
                StateProj::Polling => match ctx.service.poll_ready(cx) {
                    Poll::Ready(Ok(())) => Step::Call,
                    Poll::Ready(Err(e)) => ctx.on_error(e.into()),
                    Poll::Pending => {
                        ready!(poll_until(this.timer.as_mut(), ctx.deadline, cx));
                        Step::Return(Err(ctx.deadline_error()))
                    }
                },
                StateProj::Done => Step::Return(Err(polled_after_completion())),
            };
            match step {
                Step::Return(out) => {
                    this.state.set(State::Done);
                    return Poll::Ready(out);
                }
                Step::Read(read) => this.state.set(State::Reading { read: Some(read) }),
                Step::Wait(until) => this.state.set(State::Backoff { until }),
                Step::Poll => this.state.set(State::Polling),
                Step::Call => {
                    let Some(req) = ctx.next_request() else {
                        // Unreachable: a retry is only decided while the template is kept.
                        this.state.set(State::Done);
                        return Poll::Ready(Err(internal("no request kept for the retry")));
                    };
                    let fut = ctx.service.call(req);
                    this.state.set(State::Calling { fut });
                }
            }
        }
    }
}

fn internal(what: &'static str) -> BoxError {
    Box::new(Error::new(
        ErrorKind::Internal,
        format!("claude-retry: {what}"),
    ))
}

fn polled_after_completion() -> BoxError {
    internal("response future polled after completion")
}

impl<B> Read<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    fn new(resp: Response<B>, purpose: Purpose) -> Box<Self> {
        let (parts, body) = resp.into_parts();
        let ended = body.is_end_stream();
        Box::new(Self {
            parts,
            body: Box::pin(body),
            frames: VecDeque::new(),
            bytes: 0,
            ended,
            purpose,
        })
    }

    fn enough(&self, limit: usize) -> bool {
        if self.ended || self.bytes > limit {
            return true;
        }
        match &self.purpose {
            Purpose::ErrorBody => false,
            Purpose::FirstEvent(peek) => peek.ended(),
        }
    }

    /// Reads frames until enough is known; `Err` when the body fails.
    fn poll_read(&mut self, cx: &mut Context<'_>, limit: usize) -> Poll<Result<(), BoxError>> {
        while !self.enough(limit) {
            match ready!(self.body.as_mut().poll_frame(cx)) {
                None => self.ended = true,
                Some(Err(e)) => return Poll::Ready(Err(e.into())),
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        self.bytes += data.len();
                        if let Purpose::FirstEvent(peek) = &mut self.purpose {
                            peek.feed(data);
                        }
                    }
                    self.frames.push_back(frame);
                    // hyper may never be asked for a frame past the last one.
                    self.ended |= self.body.is_end_stream();
                }
            }
        }
        Poll::Ready(Ok(()))
    }

    /// The whole body, when it was read to its end.
    fn complete_body(&self) -> Option<Bytes> {
        if !self.ended {
            return None;
        }
        let mut data = self.frames.iter().filter_map(Frame::data_ref);
        match (data.next(), data.next()) {
            (None, _) => Some(Bytes::new()),
            (Some(one), None) => Some(one.clone()),
            _ => {
                let mut buf = BytesMut::with_capacity(self.bytes);
                for d in self.frames.iter().filter_map(Frame::data_ref) {
                    buf.extend_from_slice(d);
                }
                Some(buf.freeze())
            }
        }
    }

    fn into_response(self) -> Response<ResponseBody<B>> {
        let rest = (!self.ended).then_some(self.body);
        Response::from_parts(self.parts, ResponseBody::prefixed(self.frames, rest))
    }
}

fn is_event_stream(headers: &http::HeaderMap) -> bool {
    BodyFormat::from_content_type(headers.get(header::CONTENT_TYPE)) == BodyFormat::Sse
}

impl<S> Ctx<S> {
    /// Whether another attempt is allowed by `max_retries` (and possible at all).
    fn can_retry(&self) -> bool {
        self.template.is_some() && self.attempt <= self.shared.config.max_retries
    }

    fn on_response<B>(&mut self, resp: Response<B>) -> Step<B>
    where
        B: Body<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        let status = resp.status();
        if status.as_u16() < 400 {
            if status.is_success()
                && self.shared.config.peek_first_event
                && self.can_retry()
                && is_event_stream(resp.headers())
            {
                let peek = FirstEvent::new();
                return Step::Read(Read::new(resp, Purpose::FirstEvent(peek)));
            }
            return Step::Return(Ok(self.finish(resp.map(ResponseBody::inner), None)));
        }
        // Classified by status and headers first: the body is read only when a retry is
        // still possible (it may turn a retryable 429 into the spend cap).
        let retryable = classify_response(status, resp.headers(), None, SystemTime::now())
            .is_some_and(|c| c.retryable);
        let gave_up = if !retryable {
            GiveUp::NotRetryable
        } else if !self.can_retry() {
            GiveUp::MaxRetries
        } else {
            return Step::Read(Read::new(resp, Purpose::ErrorBody));
        };
        Step::Return(Ok(self.finish(resp.map(ResponseBody::inner), Some(gave_up))))
    }

    fn on_read<B>(&mut self, read: Read<B>) -> Step<B>
    where
        B: Body<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        let class_and_reason = match &read.purpose {
            Purpose::FirstEvent(peek) => peek.error().map(|e| {
                let class = classify_stream_error(&e.error_type);
                let kind = class.kind;
                (class, RetryReason::StreamError { kind })
            }),
            Purpose::ErrorBody => {
                let body = read.complete_body();
                let status = read.parts.status;
                classify_response(
                    status,
                    &read.parts.headers,
                    body.as_deref(),
                    SystemTime::now(),
                )
                .map(|class| {
                    let kind = class.kind;
                    (class, RetryReason::Status { status, kind })
                })
            }
        };
        let resp = read.into_response();
        match class_and_reason {
            None => Step::Return(Ok(self.finish(resp, None))),
            Some((class, reason)) => match self.decide(&class, reason) {
                Ok(until) => Step::Wait(until),
                Err(gave_up) => Step::Return(Ok(self.finish(resp, Some(gave_up)))),
            },
        }
    }

    fn on_error<B>(&mut self, err: BoxError) -> Step<B> {
        let class = classify_error(err.as_ref());
        let reason = RetryReason::Error { kind: class.kind };
        match self.decide(&class, reason) {
            Ok(until) => Step::Wait(until),
            Err(gave_up) => Step::Return(Err(self.final_error(err, &class, gave_up))),
        }
    }

    /// Whether and when to retry a classified failure. On `Ok`, the retry is recorded,
    /// logged, counted and its budget withdrawn.
    fn decide(&mut self, class: &Classification, reason: RetryReason) -> Result<Instant, GiveUp> {
        let gave_up = |g: GiveUp| {
            tracing::debug!(
                target: "claude_retry",
                attempt = self.attempt,
                reason = %reason,
                gave_up = %g,
                "not retrying"
            );
            g
        };
        if !class.retryable {
            return Err(gave_up(GiveUp::NotRetryable));
        }
        if !self.can_retry() {
            return Err(gave_up(GiveUp::MaxRetries));
        }
        let config = &self.shared.config;
        // A zero wait (`retry-after: 0`, a date in the past) falls back to the backoff,
        // as the SDKs do.
        let (wait, source) = match class.retry_after.filter(|d| !d.is_zero()) {
            Some(d) if d > config.max_retry_after => {
                return Err(gave_up(GiveUp::RetryAfterTooLong(d)));
            }
            Some(d) => (d, WaitSource::Server),
            None => {
                let base = base_backoff(config, self.attempt - 1);
                let u = self.shared.rng.unit();
                (jittered(base, config.jitter, u), WaitSource::Backoff)
            }
        };
        let until = after(Instant::now(), wait);
        if until >= self.deadline {
            return Err(gave_up(GiveUp::WaitPastDeadline(wait)));
        }
        if !self.shared.budget.withdraw() {
            metrics::counter!(BUDGET_EXHAUSTED_TOTAL).increment(1);
            return Err(gave_up(GiveUp::BudgetExhausted));
        }
        metrics::counter!(
            ATTEMPTS_TOTAL,
            "reason" => reason.kind().code(),
            "source" => reason.source(),
        )
        .increment(1);
        tracing::info!(
            target: "claude_retry",
            attempt = self.attempt,
            next_attempt = self.attempt + 1,
            reason = %reason,
            wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
            wait_source = ?source,
            "retrying request"
        );
        self.retries.push(RetryRecord {
            attempt: self.attempt,
            reason,
            wait,
            source,
        });
        Ok(until)
    }

    /// The next attempt's request: a clone of the template (moved out for the last one).
    fn next_request(&mut self) -> Option<Request<Bytes>> {
        self.attempt += 1;
        let mut req = if self.attempt > self.shared.config.max_retries {
            self.template.take()?
        } else {
            self.template.clone()?
        };
        req.extensions_mut().insert(Attempt(self.attempt));
        Some(req)
    }

    fn finish<B>(
        &mut self,
        mut resp: Response<ResponseBody<B>>,
        gave_up: Option<GiveUp>,
    ) -> Response<ResponseBody<B>> {
        let ext = resp.extensions_mut();
        ext.insert(Attempt(self.attempt));
        ext.insert(RetryInfo {
            attempts: self.attempt,
            retries: std::mem::take(&mut self.retries),
            gave_up,
        });
        resp
    }

    /// The error returned when no retry follows: a classified [`claude_core::Error`] whose
    /// message carries the attempt count. An error the stack made itself on the first
    /// attempt (a local refusal) passes through untouched.
    fn final_error(&self, err: BoxError, class: &Classification, gave_up: GiveUp) -> BoxError {
        if self.attempt == 1 && class.origin == Origin::Local && err.is::<Error>() {
            return err;
        }
        let what = err
            .downcast_ref::<Error>()
            .map_or(class.kind.default_message(), Error::message);
        let message = format!(
            "{what} ({} {}; {gave_up})",
            self.attempt,
            attempts_word(self.attempt)
        );
        let mut e = Error::new(class.kind, message).with_origin(class.origin);
        if let Some(ra) = class.retry_after {
            e = e.with_retry_after(ra);
        }
        Box::new(e.with_source(err))
    }

    fn deadline_error(&self) -> BoxError {
        let last = self
            .retries
            .last()
            .map(|r| format!("; last retried failure: {}", r.reason))
            .unwrap_or_default();
        Box::new(
            Error::new(
                ErrorKind::Timeout,
                format!(
                    "request deadline exceeded during attempt {}{last}",
                    self.attempt
                ),
            )
            .with_origin(Origin::Local),
        )
    }
}

fn attempts_word(n: u32) -> &'static str {
    if n == 1 { "attempt" } else { "attempts" }
}
