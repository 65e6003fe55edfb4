//! [`Retry`]: the service.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use claude_core::BoxError;
use http::{Request, Response};
use http_body::Body;
use tower_layer::Layer;
use tower_service::Service;

use crate::backoff::Rng;
use crate::body::ResponseBody;
use crate::budget::RetryBudget;
use crate::config::RetryConfig;
use crate::future::ResponseFuture;
use crate::layer::RetryLayer;

/// What every clone of a [`Retry`] shares.
pub(crate) struct Shared {
    pub(crate) config: RetryConfig,
    pub(crate) budget: RetryBudget,
    pub(crate) rng: Rng,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("config", &self.config)
            .field("budget", &self.budget)
            .finish_non_exhaustive()
    }
}

/// Retries Claude API calls that failed in a way another attempt may fix. See the
/// [crate docs](crate) for what is retried and how long it waits.
///
/// Cheap to clone: the configuration, the budget and the jitter generator are shared
/// through an `Arc`.
///
/// # Errors
///
/// HTTP error responses are never errors: the last one comes back as `Ok(Response)`,
/// its body intact, with [`RetryInfo::gave_up`](crate::RetryInfo::gave_up) saying why it
/// was not retried. The future fails (with a boxed [`claude_core::Error`]) when no response
/// came back: a transport or inner-layer failure that was not retried (its kind, origin
/// and source kept, the attempt count in the message; a local refusal on the first
/// attempt passes through untouched), or the request deadline passed
/// ([`ErrorKind::Timeout`](claude_core::ErrorKind::Timeout), origin `Local`).
#[derive(Clone, Debug)]
pub struct Retry<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> Retry<S> {
    /// Wraps `inner` with this configuration (and a budget of its own, shared by clones).
    pub fn new(inner: S, config: RetryConfig) -> Self {
        RetryLayer::new(config).layer(inner)
    }

    /// A [`RetryLayer`] with this configuration.
    pub fn layer(config: RetryConfig) -> RetryLayer {
        RetryLayer::new(config)
    }

    pub(crate) fn from_shared(inner: S, shared: Arc<Shared>) -> Self {
        Self { inner, shared }
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

    /// The configuration.
    pub fn config(&self) -> &RetryConfig {
        &self.shared.config
    }

    /// The retry budget, shared with every clone.
    pub fn retry_budget(&self) -> &RetryBudget {
        &self.shared.budget
    }
}

impl<S, B> Service<Request<Bytes>> for Retry<S>
where
    S: Service<Request<Bytes>, Response = Response<B>> + Clone,
    S::Error: Into<BoxError>,
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody<B>>;
    type Error = BoxError;
    type Future = ResponseFuture<S, B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    /// Sends the first attempt at once on the service that was polled ready, and keeps it
    /// for the retries (a fresh clone, not yet ready, takes its place in `self`, as
    /// tower's `Retry` does).
    ///
    /// # Panics
    ///
    /// The returned future uses tokio timers: it must be polled inside a tokio runtime
    /// with the time driver enabled.
    fn call(&mut self, req: Request<Bytes>) -> Self::Future {
        let clone = self.inner.clone();
        let ready = std::mem::replace(&mut self.inner, clone);
        ResponseFuture::start(ready, self.shared.clone(), req)
    }
}
