//! The response body: an upstream body passed through, an upstream body teed into the
//! cache, or a stored answer replayed.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker, ready};

use bytes::Bytes;
use claude_core::{BodyFormat, UsageBody, UsageHandle, UsageReport};
use http::header::CONTENT_TYPE;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::entry::{Entry, Head};
use crate::flight::FlightGuard;
use crate::key::CacheKey;
use crate::metric_names;
use crate::store::Shared;

pin_project! {
    /// The body of a response that went through the cache.
    ///
    /// On a miss it passes the upstream frames on as they arrive (the cache adds no delay)
    /// while keeping refcounted clones of them, up to the size cap; when the body ends and
    /// the answer completed, the answer is stored. On a hit it replays the stored frames.
    pub struct ResponseBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        Upstream {
            #[pin]
            body: B,
        },
        Tee {
            #[pin]
            body: UsageBody<B>,
            tee: Option<Box<Tee>>,
        },
        Replay {
            entry: Arc<Entry>,
            next: usize,
        },
    }
}

impl<B> fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            Kind::Upstream { .. } => "upstream",
            Kind::Tee { .. } => "tee",
            Kind::Replay { .. } => "replay",
        };
        f.debug_struct("ResponseBody")
            .field("kind", &kind)
            .finish_non_exhaustive()
    }
}

impl<B> ResponseBody<B> {
    pub(crate) fn upstream(body: B) -> Self {
        Self {
            kind: Kind::Upstream { body },
        }
    }

    pub(crate) fn tee(body: UsageBody<B>, tee: Tee) -> Self {
        Self {
            kind: Kind::Tee {
                body,
                tee: Some(Box::new(tee)),
            },
        }
    }

    pub(crate) fn replay(entry: Arc<Entry>) -> Self {
        Self {
            kind: Kind::Replay { entry, next: 0 },
        }
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project().kind.project() {
            KindProj::Upstream { body } => body.poll_frame(cx),
            KindProj::Tee { mut body, tee } => {
                let res = ready!(body.as_mut().poll_frame(cx));
                match &res {
                    Some(Ok(frame)) => {
                        if let Some(data) = frame.data_ref()
                            && tee.as_mut().is_some_and(|t| !t.push(data))
                        {
                            *tee = None; // over the cap: stop copying, release followers
                        }
                        // hyper stops polling once the body says it ended.
                        if body.is_end_stream()
                            && let Some(t) = tee.take()
                        {
                            t.finish();
                        }
                    }
                    Some(Err(_)) => *tee = None,
                    None => {
                        if let Some(t) = tee.take() {
                            t.finish();
                        }
                    }
                }
                Poll::Ready(res)
            }
            KindProj::Replay { entry, next } => match entry.frame(*next) {
                Some(data) => {
                    *next += 1;
                    Poll::Ready(Some(Ok(Frame::data(data))))
                }
                None => Poll::Ready(None),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Upstream { body } => body.is_end_stream(),
            Kind::Tee { body, .. } => body.is_end_stream(),
            Kind::Replay { entry, next } => *next >= entry.frames(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Upstream { body } => body.size_hint(),
            Kind::Tee { body, .. } => body.size_hint(),
            Kind::Replay { entry, next } => {
                let start = match *next {
                    0 => 0,
                    n => entry
                        .frame_ends
                        .get(n - 1)
                        .map_or(entry.body.len(), |&e| e as usize),
                };
                SizeHint::with_exact((entry.body.len() - start) as u64)
            }
        }
    }
}

/// What a storable miss needs to store its answer once the body is complete.
#[derive(Debug)]
pub(crate) struct Pending {
    pub(crate) shared: Arc<Shared>,
    pub(crate) key: CacheKey,
    /// `Some` when this request leads a flight.
    pub(crate) guard: Option<FlightGuard>,
    /// The size cap ([`crate::CacheConfig::max_entry_bytes`]).
    pub(crate) max: usize,
}

/// The frames a teed event stream has room for before its list grows (256 bytes).
const SSE_FRAMES: usize = 32;

/// The copy of a miss's frames on their way to the caller.
#[derive(Debug)]
pub(crate) struct Tee {
    pending: Option<Pending>,
    head: Head,
    usage: UsageHandle,
    frames: Vec<Bytes>,
    len: usize,
    max: usize,
}

impl Tee {
    pub(crate) fn new(pending: Pending, head: Head, usage: UsageHandle) -> Self {
        // An event stream comes in many frames (a short answer already has about 20): room
        // for them up front instead of four reallocations on the way; a JSON answer comes
        // in one or a few.
        let sse = BodyFormat::from_content_type(head.headers.get(CONTENT_TYPE)) == BodyFormat::Sse;
        let frames = Vec::with_capacity(if sse { SSE_FRAMES } else { 4 });
        Self {
            max: pending.max,
            pending: Some(pending),
            head,
            usage,
            frames,
            len: 0,
        }
    }

    /// Keeps a clone of `data`; `false` once the answer is over the size cap.
    fn push(&mut self, data: &Bytes) -> bool {
        self.len = self.len.saturating_add(data.len());
        if self.len > self.max {
            metrics::counter!(metric_names::NOT_STORED, "reason" => "too_large").increment(1);
            self.pending = None;
            return false;
        }
        self.frames.push(data.clone());
        true
    }

    /// The body ended: store the answer once its usage report says it completed.
    fn finish(mut self: Box<Self>) {
        let usage = self.usage.clone();
        usage.on_complete(move |report| {
            if report.is_complete_success() {
                self.store(report);
            } else {
                // Dropping `self` releases the followers.
                metrics::counter!(metric_names::NOT_STORED, "reason" => "incomplete").increment(1);
                self.pending = None;
            }
        });
    }

    /// Builds the entry (the copy into one buffer) and hands it to the followers as the body
    /// ends. A leader then hands it to the store thread, if the cache has one (see
    /// [`CacheConfig::store_thread`](crate::CacheConfig::store_thread)): until the entry
    /// is in moka the flight stays in the in-flight map and serves it. Otherwise the moka
    /// insert runs here and now (a task spawned per miss cost more than the store itself:
    /// on a multi-threaded runtime it wakes another worker); only work that has to wait goes
    /// to a task: an insert that moka cannot finish at once (its write queue is full), and
    /// the write to the second level.
    fn store(&mut self, report: &UsageReport) {
        let Some(pending) = self.pending.take() else {
            return;
        };
        if let Some(guard) = &pending.guard {
            guard.storing();
        }
        let frames = std::mem::take(&mut self.frames);
        let head = Head {
            status: self.head.status,
            headers: std::mem::take(&mut self.head.headers),
            model: self.head.model.take(),
            lifetime: self.head.lifetime,
        };
        let entry = Arc::new(Entry::new(head, &frames, report.clone()));
        drop(frames);
        if let Some(guard) = &pending.guard {
            guard.publish(entry.clone());
        }
        // Without a flight, nothing would serve the answer before it is in moka: a request
        // that went upstream alone stores it here, so that the next request sees it.
        let (pending, entry) = if pending.guard.is_some() {
            let shared = pending.shared.clone();
            match shared.defer(pending, entry) {
                Ok(()) => return,
                Err(back) => back,
            }
        } else {
            (pending, entry)
        };
        let rt = tokio::runtime::Handle::try_current().ok();
        let mut insert = Box::pin(insert(pending, entry, rt.clone(), true));
        let mut cx = Context::from_waker(Waker::noop());
        if insert.as_mut().poll(&mut cx).is_ready() {
            return;
        }
        // Polled again by the task, with its own waker: no wake-up is lost.
        match rt {
            Some(rt) => drop(rt.spawn(insert)),
            None => {
                metrics::counter!(metric_names::NOT_STORED, "reason" => "no_runtime").increment(1);
            }
        }
    }
}

/// Inserts a stored answer into moka, then lets its flight go (and, with a second level,
/// has a task on `rt` write the answer there). `direct`: on a request's own thread, not
/// the store thread.
pub(crate) async fn insert(
    pending: Pending,
    entry: Arc<Entry>,
    rt: Option<tokio::runtime::Handle>,
    direct: bool,
) {
    // Only a second level's write needs a runtime.
    #[cfg(not(feature = "redis"))]
    let _ = rt;
    pending.shared.insert(pending.key, entry.clone()).await;
    if direct {
        pending.shared.stored_directly();
    }
    #[cfg(feature = "redis")]
    let (shared, key) = (pending.shared.clone(), pending.key);
    // The guard leaves the in-flight map only now that the entry is in the cache.
    drop(pending);
    #[cfg(feature = "redis")]
    if shared.l2.is_some() {
        // Network I/O: never on the caller's poll. (A second level needs a runtime to
        // exist at all, so there is one.)
        if let Some(rt) = rt {
            drop(rt.spawn(async move { shared.write_through(&key, &entry).await }));
        }
    }
}

impl Drop for Tee {
    fn drop(&mut self) {
        if self.pending.take().is_some() {
            // The body failed or was dropped before its end.
            metrics::counter!(metric_names::NOT_STORED, "reason" => "incomplete").increment(1);
        }
    }
}
