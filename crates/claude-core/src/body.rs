//! Response bodies scanned once for usage, and the body adapters at the stack's edges.
//!
//! # One scan, many subscribers
//!
//! Several layers want the final usage of a response (the rate limiter settles its
//! reservation, the cost layer records the bill). [`observe_usage`] makes sure the body is
//! scanned exactly once: the first (innermost) caller wraps the body in a scanning
//! [`UsageBody`] and stores a [`UsageHandle`] in the response extensions; every later caller
//! finds the handle and subscribes to it, and its `UsageBody` just passes frames through.
//!
//! The scan runs on each data frame in place (no copy) and the result is published when the
//! body ends, fails, or is dropped (a client that went away): subscribers always hear exactly
//! once, with a lower bound when the body did not complete.

use std::fmt;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use pin_project_lite::pin_project;

use crate::error::{BoxError, Error, ErrorKind};
use crate::scan::{BodyEnd, UsageReport, UsageScanner};

type Callback = Box<dyn FnOnce(&Arc<UsageReport>) + Send>;

/// A subscription point for the final usage of one response body. Cheap to clone; lives in
/// the response extensions.
#[derive(Clone)]
pub struct UsageHandle {
    inner: Arc<Mutex<HandleState>>,
}

#[derive(Default)]
struct HandleState {
    result: Option<Arc<UsageReport>>,
    callbacks: Vec<Callback>,
}

impl fmt::Debug for UsageHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let done = self.get().is_some();
        f.debug_struct("UsageHandle").field("done", &done).finish()
    }
}

impl Default for UsageHandle {
    fn default() -> Self {
        Self::new()
    }
}

impl UsageHandle {
    /// A handle whose report is not known yet.
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Mutex::new(HandleState::default())),
        }
    }

    /// A handle that already holds its report (e.g. a cache hit replaying a stored answer).
    pub fn completed(report: UsageReport) -> Self {
        let h = Self::new();
        h.publish(report);
        h
    }

    /// Runs `f` with the final report: at once if it is known, else when the body ends,
    /// fails or is dropped. `f` runs on the task that drives (or drops) the body; keep it
    /// short and non-blocking.
    pub fn on_complete(&self, f: impl FnOnce(&Arc<UsageReport>) + Send + 'static) {
        let mut st = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        match &st.result {
            Some(r) => {
                let r = r.clone();
                drop(st);
                f(&r);
            }
            None => st.callbacks.push(Box::new(f)),
        }
    }

    /// The final report, once published.
    pub fn get(&self) -> Option<Arc<UsageReport>> {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .result
            .clone()
    }

    /// Publishes the report once; later calls are ignored. Callbacks run outside the lock.
    pub fn publish(&self, report: UsageReport) {
        let (report, callbacks) = {
            let mut st = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
            if st.result.is_some() {
                return;
            }
            let r = Arc::new(report);
            st.result = Some(r.clone());
            (r, std::mem::take(&mut st.callbacks))
        };
        for cb in callbacks {
            cb(&report);
        }
    }
}

struct Tap {
    scanner: UsageScanner,
    handle: UsageHandle,
    done: bool,
}

impl Tap {
    fn finish(&mut self, end: BodyEnd) {
        if !self.done {
            self.done = true;
            let report = self.scanner.finish(end);
            self.handle.publish(report);
        }
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        self.finish(BodyEnd::Dropped);
    }
}

pin_project! {
    /// A response body that scans its frames for usage (or passes them through when an
    /// inner layer already does). See [`observe_usage`].
    pub struct UsageBody<B> {
        #[pin]
        inner: B,
        tap: Option<Box<Tap>>,
    }
}

impl<B> fmt::Debug for UsageBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UsageBody")
            .field("scanning", &self.tap.is_some())
            .finish_non_exhaustive()
    }
}

impl<B> UsageBody<B> {
    /// Whether this wrapper is the one scanning (false when it only passes frames on).
    pub fn is_scanning(&self) -> bool {
        self.tap.is_some()
    }

    /// The wrapped body.
    pub fn get_ref(&self) -> &B {
        &self.inner
    }
}

impl<B> Body for UsageBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let mut this = self.project();
        let res = ready!(this.inner.as_mut().poll_frame(cx));
        if let Some(tap) = this.tap.as_mut() {
            match &res {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        tap.scanner.feed(data);
                    }
                    // hyper stops polling once the body says it ended: publish now.
                    if this.inner.is_end_stream() {
                        tap.finish(BodyEnd::Ended);
                    }
                }
                Some(Err(_)) => tap.finish(BodyEnd::Failed),
                None => tap.finish(BodyEnd::Ended),
            }
        }
        Poll::Ready(res)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Makes sure the response body is scanned for usage once, and returns the handle to
/// subscribe to.
///
/// If an inner layer already scans this response (a [`UsageHandle`] is in its extensions),
/// the body is passed through untouched and that handle is returned. Otherwise the body is
/// wrapped in a scanner chosen by `content-type` and a new handle is stored.
pub fn observe_usage<B>(resp: Response<B>) -> (Response<UsageBody<B>>, UsageHandle)
where
    B: Body<Data = Bytes>,
{
    let (mut parts, body) = resp.into_parts();
    if let Some(h) = parts.extensions.get::<UsageHandle>() {
        let h = h.clone();
        let body = UsageBody {
            inner: body,
            tap: None,
        };
        return (Response::from_parts(parts, body), h);
    }
    let handle = UsageHandle::new();
    parts.extensions.insert(handle.clone());
    let scanner = UsageScanner::for_headers(&parts.headers);
    let mut tap = Box::new(Tap {
        scanner,
        handle: handle.clone(),
        done: false,
    });
    if body.is_end_stream() {
        tap.finish(BodyEnd::Ended);
    }
    let body = UsageBody {
        inner: body,
        tap: Some(tap),
    };
    (Response::from_parts(parts, body), handle)
}

// ===== adapters =====

/// Collects any body into `Bytes`, refusing more than `limit` bytes with
/// [`ErrorKind::BodyTooLarge`]. Other body errors are classified with
/// [`Error::from_box`].
pub async fn collect_body<B>(body: B, limit: usize) -> Result<Bytes, Error>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    match Limited::new(body, limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) => {
            if e.is::<LengthLimitError>() {
                Err(Error::new(
                    ErrorKind::BodyTooLarge,
                    format!("request body exceeds the limit of {limit} bytes"),
                ))
            } else {
                Err(Error::from_box(e))
            }
        }
    }
}

/// Turns a buffered request into one a hyper client can send (`Full<Bytes>` is `Clone`, so
/// this costs one reference count).
pub fn into_full(req: Request<Bytes>) -> Request<Full<Bytes>> {
    req.map(Full::new)
}

/// Adapts a service of `Request<Full<Bytes>>` (such as hyper-util's client) to the stack's
/// `Request<Bytes>` with [`into_full`]. Readiness, responses and errors are the inner
/// service's.
///
/// ```
/// use claude_core::FullBodyService;
/// use hyper_util::client::legacy::Client;
/// use hyper_util::rt::TokioExecutor;
///
/// # fn main() {
/// let client = Client::builder(TokioExecutor::new()).build_http::<http_body_util::Full<bytes::Bytes>>();
/// let svc = FullBodyService::new(client); // a Service<Request<Bytes>>
/// # let _ = svc;
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct FullBodyService<S> {
    inner: S,
}

impl<S> FullBodyService<S> {
    /// Wraps `inner`.
    pub const fn new(inner: S) -> Self {
        Self { inner }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S> tower::Service<Request<Bytes>> for FullBodyService<S>
where
    S: tower::Service<Request<Full<Bytes>>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Bytes>) -> Self::Future {
        self.inner.call(into_full(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::StreamBody;
    use std::sync::atomic::{AtomicUsize, Ordering};

    type Frames =
        futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, std::io::Error>>>;

    fn sse_response(chunks: Vec<&'static str>) -> Response<StreamBody<Frames>> {
        let frames: Vec<Result<Frame<Bytes>, std::io::Error>> = chunks
            .into_iter()
            .map(|c| Ok(Frame::data(Bytes::from_static(c.as_bytes()))))
            .collect();
        Response::builder()
            .header("content-type", "text/event-stream")
            .body(StreamBody::new(futures_util::stream::iter(frames)))
            .unwrap()
    }

    const START: &str = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":5,\"output_tokens\":1}}}\n\n";
    const DELTA: &str = "event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":8}}\n\n";
    const STOP: &str = "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";

    #[tokio::test]
    async fn scanned_once_and_published_to_all() {
        let resp = sse_response(vec![START, DELTA, STOP]);
        let (resp, inner) = observe_usage(resp);
        assert!(resp.body().is_scanning());
        let (resp, outer) = observe_usage(resp);
        assert!(
            !resp.body().is_scanning(),
            "second observer must not scan again"
        );
        let calls = Arc::new(AtomicUsize::new(0));
        for h in [&inner, &outer] {
            let c = calls.clone();
            h.on_complete(move |r| {
                assert_eq!(r.usage.output_tokens, 8);
                c.fetch_add(1, Ordering::SeqCst);
            });
        }
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(bytes.len(), START.len() + DELTA.len() + STOP.len());
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert!(inner.get().unwrap().is_complete_success());
    }

    #[tokio::test]
    async fn dropped_body_publishes_lower_bound() {
        let resp = sse_response(vec![START, DELTA, STOP]);
        let (resp, h) = observe_usage(resp);
        let mut body = resp.into_body();
        let first = body.frame().await.unwrap().unwrap();
        assert!(first.is_data());
        assert!(h.get().is_none());
        drop(body);
        let r = h.get().unwrap();
        assert_eq!(r.end, BodyEnd::Dropped);
        assert_eq!(r.usage.input_tokens, 5);
        assert_eq!(r.usage.output_tokens, 1);
        // Late subscribers still hear.
        let seen = Arc::new(AtomicUsize::new(0));
        let s = seen.clone();
        h.on_complete(move |_| {
            s.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(seen.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn failed_body_is_reported() {
        let frames: Vec<Result<Frame<Bytes>, std::io::Error>> = vec![
            Ok(Frame::data(Bytes::from_static(START.as_bytes()))),
            Err(std::io::Error::from(std::io::ErrorKind::ConnectionReset)),
        ];
        let resp = Response::builder()
            .header("content-type", "text/event-stream")
            .body(StreamBody::new(futures_util::stream::iter(frames)))
            .unwrap();
        let (resp, h) = observe_usage(resp);
        assert!(resp.into_body().collect().await.is_err());
        let r = h.get().unwrap();
        assert_eq!(r.end, BodyEnd::Failed);
        assert_eq!(r.usage.input_tokens, 5);
    }

    #[tokio::test]
    async fn empty_body_completes_at_once() {
        let resp = Response::new(Full::new(Bytes::new()));
        let (_resp, h) = observe_usage(resp);
        assert_eq!(h.get().unwrap().end, BodyEnd::Ended);
    }

    #[tokio::test]
    async fn full_body_completes_without_a_final_poll() {
        let body = Full::new(Bytes::from_static(
            br#"{"type":"message","usage":{"input_tokens":2,"output_tokens":3}}"#,
        ));
        let (resp, h) = observe_usage(Response::new(body));
        let mut body = resp.into_body();
        let _frame = body.frame().await.unwrap().unwrap();
        assert!(body.is_end_stream());
        drop(body);
        let r = h.get().unwrap();
        assert_eq!(r.end, BodyEnd::Ended);
        assert!(r.is_complete_success());
        assert_eq!(r.usage.output_tokens, 3);
    }

    #[tokio::test]
    async fn collect_limits() {
        let b = Full::new(Bytes::from_static(b"0123456789"));
        assert_eq!(collect_body(b, 10).await.unwrap().len(), 10);
        let b = Full::new(Bytes::from_static(b"0123456789"));
        let e = collect_body(b, 9).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::BodyTooLarge);
    }
}
