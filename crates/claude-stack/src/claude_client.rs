//! [`ClaudeClient`]: the whole stack around the pooled [`HttpClient`], in one value.

use std::task::{Context, Poll};

use bytes::Bytes;
use claude_core::{BoxError, Error};
use http::{Request, Response};
use tower::Service;

use crate::stack::{ClaudeStack, StackBody, StackConfig, StackService};

/// The stack around a hyper-util client with rustls: what most Rust services want.
///
/// Cheap to clone (clones share the connection pool, the cost ledger, the limiter and the
/// cache). It is a `Service<Request<Bytes>>`; send requests with a path (`/v1/messages`),
/// the base URL comes from the configuration.
///
/// ```no_run
/// use claude_stack::{ClaudeClient, StackConfig};
/// use tower::ServiceExt;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), claude_core::BoxError> {
/// let config: StackConfig = toml::from_str(r#"
///     [rate_limit]
///     requests_per_minute = 50
///     input_tokens_per_minute = 30000
///     output_tokens_per_minute = 8000
///     [secrets.environments.prod.default]
///     source = "env"
///     var = "ANTHROPIC_API_KEY"
/// "#)?;
/// let client = ClaudeClient::new(config)?;
/// let resp = client
///     .clone()
///     .oneshot(http::Request::post("/v1/messages").body(bytes::Bytes::from_static(
///         br#"{"model":"claude-sonnet-4-5","max_tokens":64,"messages":[{"role":"user","content":"hi"}]}"#,
///     ))?)
///     .await?;
/// println!("{} — spent so far: {:?}", resp.status(), client.stack().cost_tracker().map(|t| t.total().cost));
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct ClaudeClient {
    stack: ClaudeStack,
    service: StackService,
}

impl std::fmt::Debug for ClaudeClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClaudeClient")
            .field("stack", &self.stack)
            .finish_non_exhaustive()
    }
}

impl ClaudeClient {
    /// Builds the stack and the HTTP client from one configuration.
    ///
    /// # Errors
    ///
    /// A configuration error names the section and the field.
    pub fn new(config: StackConfig) -> Result<Self, Error> {
        Self::from_stack(ClaudeStack::new(config)?)
    }

    /// Builds the client around an already configured stack (e.g. one with
    /// [`ClaudeStack::with_api_keys`]).
    ///
    /// # Errors
    ///
    /// Fails when the client section is invalid.
    pub fn from_stack(stack: ClaudeStack) -> Result<Self, Error> {
        let service = stack.client()?;
        Ok(Self { stack, service })
    }

    /// The stack: cost ledger, limiter, cache handles.
    pub fn stack(&self) -> &ClaudeStack {
        &self.stack
    }
}

impl Service<Request<Bytes>> for ClaudeClient {
    type Response = Response<StackBody>;
    type Error = BoxError;
    type Future = <StackService as Service<Request<Bytes>>>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.service.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Bytes>) -> Self::Future {
        self.service.call(req)
    }
}
