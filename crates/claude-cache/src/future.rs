//! Future types.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::{Request, Response};
use pin_project_lite::pin_project;
use tower::util::Oneshot;
use tower_service::Service;

use crate::body::ResponseBody;
use crate::service::{BypassReason, CacheStatus, mark};

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

pin_project! {
    /// Response future of [`Cache`](crate::Cache).
    ///
    /// # Cancel safety
    ///
    /// Dropping it at any point is safe: a request leading a flight releases its followers,
    /// a follower stops waiting, and nothing stays in the in-flight map.
    pub struct ResponseFuture<S, B>
    where
        S: Service<Request<Bytes>>,
    {
        #[pin]
        kind: Kind<S, B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<S, B>
    where
        S: Service<Request<Bytes>>,
    {
        Bypass {
            #[pin]
            fut: Oneshot<S, Request<Bytes>>,
            reason: BypassReason,
        },
        Cached {
            fut: BoxFuture<Result<Response<ResponseBody<B>>, S::Error>>,
        },
    }
}

impl<S, B> ResponseFuture<S, B>
where
    S: Service<Request<Bytes>>,
{
    pub(crate) fn bypass(fut: Oneshot<S, Request<Bytes>>, reason: BypassReason) -> Self {
        Self {
            kind: Kind::Bypass { fut, reason },
        }
    }

    pub(crate) fn cached(fut: BoxFuture<Result<Response<ResponseBody<B>>, S::Error>>) -> Self {
        Self {
            kind: Kind::Cached { fut },
        }
    }
}

impl<S, B> fmt::Debug for ResponseFuture<S, B>
where
    S: Service<Request<Bytes>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            Kind::Bypass { .. } => "bypass",
            Kind::Cached { .. } => "cached",
        };
        f.debug_struct("ResponseFuture")
            .field("kind", &kind)
            .finish_non_exhaustive()
    }
}

impl<S, B> Future for ResponseFuture<S, B>
where
    S: Service<Request<Bytes>, Response = Response<B>>,
{
    type Output = Result<Response<ResponseBody<B>>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Bypass { fut, reason } => {
                let resp = ready!(fut.poll(cx))?;
                let mut resp = resp.map(ResponseBody::upstream);
                mark(&mut resp, CacheStatus::Bypass(*reason));
                Poll::Ready(Ok(resp))
            }
            KindProj::Cached { fut } => fut.as_mut().poll(cx),
        }
    }
}
