//! [`ClaudeStack`]: every layer in the documented order, each optional, around any service.

use std::time::Duration;

use bytes::Bytes;
use claude_core::{BoxError, Error};
use http::{Request, Response};
use http_body::Body;
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use serde::Deserialize;
use tower::util::BoxCloneSyncService;
use tower::{Service, ServiceBuilder, ServiceExt};

use crate::client::{ClientConfig, HttpClient};

/// The response body of an assembled stack: streamed, boxed once.
pub type StackBody = UnsyncBoxBody<Bytes, BoxError>;

/// An assembled stack: `Request<Bytes>` in, a streamed response out. Cheap to clone.
pub type StackService = BoxCloneSyncService<Request<Bytes>, Response<StackBody>, BoxError>;

/// Configuration of the whole stack, as one TOML document (see each section's type for its
/// fields and defaults).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StackConfig {
    /// The HTTP client at the bottom ([`HttpClient`]).
    pub client: ClientConfig,
    /// Time allowed for one attempt until the response headers (inside the retry layer, so
    /// a timed-out attempt is retried). Default 600 s, the SDKs' default.
    #[serde(with = "claude_core::config::option_duration")]
    pub attempt_timeout: Option<Duration>,
}

impl Default for StackConfig {
    fn default() -> Self {
        Self {
            client: ClientConfig::default(),
            attempt_timeout: Some(Duration::from_secs(600)),
        }
    }
}

/// The stack builder.
#[derive(Debug, Clone)]
pub struct ClaudeStack {
    config: StackConfig,
}

impl ClaudeStack {
    /// A stack from its configuration.
    ///
    /// # Errors
    ///
    /// Fails when a section is invalid; the message names the field.
    pub fn new(config: StackConfig) -> Result<Self, Error> {
        Ok(Self { config })
    }

    /// The configuration.
    pub fn config(&self) -> &StackConfig {
        &self.config
    }

    /// The stack around any service of `Request<Bytes>` (a hyper client, a test double).
    pub fn service<S, B>(&self, inner: S) -> StackService
    where
        S: Service<Request<Bytes>, Response = Response<B>> + Clone + Send + Sync + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let inner = inner
            .map_response(|r: Response<B>| r.map(|b| b.map_err(Into::into).boxed_unsync()))
            .map_err(Into::into);
        let svc = ServiceBuilder::new()
            .option_layer(
                self.config
                    .attempt_timeout
                    .map(tower::timeout::TimeoutLayer::new),
            )
            .service(inner)
            .map_err(Into::<BoxError>::into);
        BoxCloneSyncService::new(svc)
    }

    /// The stack around an [`HttpClient`] built from the `client` section.
    ///
    /// # Errors
    ///
    /// Fails when the client section is invalid.
    pub fn client(&self) -> Result<StackService, Error> {
        let http = HttpClient::new(&self.config.client)?;
        Ok(self.service(http))
    }
}
