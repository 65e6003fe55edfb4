//! The response future of [`ApiKey`](crate::ApiKey).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use claude_core::BoxError;

/// The response future of [`ApiKey`](crate::ApiKey).
///
/// It is boxed: it awaits the key ring (which may fetch), the inner call, and after a 401
/// possibly a refresh, a readiness wait and a second call. A hand-written state machine
/// would save one allocation per request at the cost of much code; the allocation is small
/// next to an HTTP round trip to the API.
pub struct ResponseFuture<T> {
    inner: Pin<Box<dyn Future<Output = Result<T, BoxError>> + Send>>,
}

impl<T> ResponseFuture<T> {
    pub(crate) fn new(inner: Pin<Box<dyn Future<Output = Result<T, BoxError>> + Send>>) -> Self {
        Self { inner }
    }
}

impl<T> Future for ResponseFuture<T> {
    type Output = Result<T, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

impl<T> fmt::Debug for ResponseFuture<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}
