//! [`StackService`]: the stack's type-erased service, whose clones share one allocation.
//!
//! Every optional layer of the stack is erased to this one type so that the layers compose
//! whichever are on. `tower::util::BoxCloneSyncService` would do that too, but cloning it
//! allocates a new box, and cloning a box around a layer clones the box below it: with a dozen
//! erased layers and several clones per request (the caller's, the retry layer's replay, the
//! cache's leader), that was about 35 allocations per request. Here the erased service sits
//! behind an [`Arc`], so a clone is a reference-count increment.
//!
//! A call clones the concrete service behind the `Arc` (whose own inner service is again a
//! `StackService`, so that clone does not allocate either) and drives it with
//! [`ServiceExt::oneshot`]: `poll_ready` then `call`, inside the returned future. So
//! [`StackService::poll_ready`] is always ready, and readiness of the layers below (a rate
//! limiter's queue, say) is waited for when the future is polled, as with any other layer
//! that clones its inner service per call.

use std::any::Any;
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use claude_core::BoxError;
use http::{Request, Response};
use http_body::Body;
use http_body_util::{BodyExt, Empty};
use pin_project_lite::pin_project;
use tower::{Service, ServiceExt};

use crate::stack::StackBody;

/// The future of a [`StackService`] call.
pub type StackFuture = Pin<Box<dyn Future<Output = Result<Response<StackBody>, BoxError>> + Send>>;

/// The stack as one type: buffered requests in, streamed responses out. Cheap to clone (one
/// shared allocation); always ready (see the module documentation).
#[derive(Clone)]
pub struct StackService(Arc<dyn Call>);

impl fmt::Debug for StackService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StackService").finish_non_exhaustive()
    }
}

impl StackService {
    /// Erases `inner`, boxing its response body unless it already is a [`StackBody`].
    pub fn new<S, B>(inner: S) -> Self
    where
        S: Service<Request<Bytes>, Response = Response<B>> + Clone + Send + Sync + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        Self(Arc::new(Erased(inner)))
    }

    /// Erases a service that is always ready and whose future already is a [`StackFuture`]
    /// (the observe layer over a `StackService`): its calls are made directly, without a
    /// `poll_ready` and without boxing its boxed future once more.
    pub(crate) fn direct<S>(inner: S) -> Self
    where
        S: AlwaysReady + Clone + Send + Sync + 'static,
    {
        Self(Arc::new(Direct(inner)))
    }
}

/// A service whose `poll_ready` is always ready, so that a call needs no `poll_ready` first
/// (checked on every call in debug builds, so the tests would catch a broken promise).
pub(crate) trait AlwaysReady:
    Service<Request<Bytes>, Response = Response<StackBody>, Error = BoxError, Future = StackFuture>
{
}

impl Service<Request<Bytes>> for StackService {
    type Response = Response<StackBody>;
    type Error = BoxError;
    type Future = StackFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Bytes>) -> StackFuture {
        self.0.call(req)
    }
}

trait Call: Send + Sync {
    fn call(&self, req: Request<Bytes>) -> StackFuture;
}

struct Erased<S>(S);

impl<S, B> Call for Erased<S>
where
    S: Service<Request<Bytes>, Response = Response<B>> + Clone + Send + Sync + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    fn call(&self, req: Request<Bytes>) -> StackFuture {
        Box::pin(Erase {
            fut: self.0.clone().oneshot(req),
        })
    }
}

struct Direct<S>(S);

impl<S> Call for Direct<S>
where
    S: AlwaysReady + Clone + Send + Sync + 'static,
{
    fn call(&self, req: Request<Bytes>) -> StackFuture {
        let mut svc = self.0.clone();
        debug_assert!(
            matches!(
                svc.poll_ready(&mut Context::from_waker(std::task::Waker::noop())),
                Poll::Ready(Ok(()))
            ),
            "a service erased with StackService::direct was not ready"
        );
        svc.call(req)
    }
}

pin_project! {
    /// A call's future with its response body made a [`StackBody`] and its error boxed. A
    /// struct rather than an `async` block: the block would keep its captured service and
    /// request beside the `Oneshot` it moves them into (a generator does not reuse the
    /// space of its captures), doubling what is boxed and copied on every call.
    struct Erase<F> {
        #[pin]
        fut: F,
    }
}

impl<F, B, E> Future for Erase<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    E: Into<BoxError>,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Output = Result<Response<StackBody>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let out = ready!(self.project().fut.poll(cx));
        Poll::Ready(match out {
            Ok(resp) => Ok(resp.map(stack_body)),
            Err(e) => Err(e.into()),
        })
    }
}

/// `body` as a [`StackBody`]: as it is when it already is one (a layer that passes its inner
/// body through), else boxed once.
pub(crate) fn stack_body<B>(body: B) -> StackBody
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let mut slot = Some(body);
    if let Some(body) = (&mut slot as &mut dyn Any)
        .downcast_mut::<Option<StackBody>>()
        .and_then(Option::take)
    {
        return body;
    }
    match slot {
        Some(body) => body.map_err(Into::into).boxed_unsync(),
        // Not reached: `slot` is only emptied when it was a `StackBody`, returned above.
        None => Empty::new().map_err(|e| match e {}).boxed_unsync(),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::Full;

    use super::*;

    #[tokio::test]
    async fn clones_share_the_service_and_every_call_drives_readiness() {
        #[derive(Clone)]
        struct Counting(Arc<AtomicUsize>, Arc<AtomicUsize>);
        impl Service<Request<Bytes>> for Counting {
            type Response = Response<Full<Bytes>>;
            type Error = BoxError;
            type Future = std::future::Ready<Result<Response<Full<Bytes>>, BoxError>>;
            fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
                self.0.fetch_add(1, Ordering::Relaxed);
                Poll::Ready(Ok(()))
            }
            fn call(&mut self, req: Request<Bytes>) -> Self::Future {
                self.1.fetch_add(1, Ordering::Relaxed);
                std::future::ready(Ok(Response::new(Full::new(req.into_body()))))
            }
        }
        let (ready, called) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let svc = StackService::new(Counting(ready.clone(), called.clone()));
        for i in 0..3 {
            let body = Bytes::from(format!("req {i}"));
            let resp = svc
                .clone()
                .oneshot(Request::new(body.clone()))
                .await
                .unwrap();
            assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), body);
        }
        assert_eq!(ready.load(Ordering::Relaxed), 3);
        assert_eq!(called.load(Ordering::Relaxed), 3);
        assert_eq!(
            Arc::strong_count(&svc.0),
            1,
            "clones were dropped with their calls"
        );
    }

    #[tokio::test]
    async fn stack_body_keeps_the_bytes_of_stack_bodies_and_of_other_bodies() {
        let inner: StackBody = Full::new(Bytes::from_static(b"abc"))
            .map_err(|e| match e {})
            .boxed_unsync();
        let hint = inner.size_hint().exact();
        let same = stack_body(inner);
        assert_eq!(same.size_hint().exact(), hint);
        assert_eq!(same.collect().await.unwrap().to_bytes(), "abc");
        let other = stack_body(Full::new(Bytes::from_static(b"xyz")));
        assert_eq!(other.collect().await.unwrap().to_bytes(), "xyz");
    }
}
