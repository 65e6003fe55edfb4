//! The server: the listener, its accept loop, and the handle tests hold.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::fault::FaultPlan;
use crate::limits::Limits;
use crate::service::{Shared, handle};
use crate::stats::Stats;

/// How long [`MockServer::shutdown`] waits for open connections to finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Configuration of a [`MockServer`], consuming setters; [`start`](Self::start) binds and
/// serves.
#[derive(Debug, Clone)]
pub struct MockServerBuilder {
    api_keys: Vec<String>,
    limits: Limits,
    first_byte_latency: Duration,
    token_latency: Duration,
    output_tokens: u64,
    faults: Option<FaultPlan>,
    listen: SocketAddr,
}

impl Default for MockServerBuilder {
    fn default() -> Self {
        Self {
            api_keys: Vec::new(),
            limits: Limits::default(),
            first_byte_latency: Duration::ZERO,
            token_latency: Duration::ZERO,
            output_tokens: 12,
            faults: None,
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        }
    }
}

impl MockServerBuilder {
    /// Accepts this API key (`x-api-key: K` or `authorization: Bearer K`); repeatable.
    /// Default: no key configured, and then any key, or none, is accepted.
    #[must_use]
    pub fn api_key(mut self, key: impl Into<String>) -> Self {
        self.api_keys.push(key.into());
        self
    }

    /// Requests per minute. Default: unlimited.
    #[must_use]
    pub fn rpm(mut self, limit: u64) -> Self {
        self.limits.requests_per_minute = Some(limit);
        self
    }

    /// Input tokens per minute. Default: unlimited.
    #[must_use]
    pub fn itpm(mut self, limit: u64) -> Self {
        self.limits.input_tokens_per_minute = Some(limit);
        self
    }

    /// Output tokens per minute. Default: unlimited.
    #[must_use]
    pub fn otpm(mut self, limit: u64) -> Self {
        self.limits.output_tokens_per_minute = Some(limit);
        self
    }

    /// All three limits at once. Default: [`Limits::default`], unlimited.
    #[must_use]
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Delay before the response head of every answer (not of errors). Default: zero.
    #[must_use]
    pub fn first_byte_latency(mut self, latency: Duration) -> Self {
        self.first_byte_latency = latency;
        self
    }

    /// Delay per output token: before each text delta of a stream, and added to the delay
    /// before a JSON answer (once per word of its text). Default: zero.
    #[must_use]
    pub fn token_latency(mut self, latency: Duration) -> Self {
        self.token_latency = latency;
        self
    }

    /// Reply length in tokens when neither `x-mock-output-tokens` nor `x-mock-usage`
    /// says otherwise (capped by the request's `max_tokens`). Default: 12.
    #[must_use]
    pub fn output_tokens(mut self, tokens: u64) -> Self {
        self.output_tokens = tokens;
        self
    }

    /// The fault plan of requests that send no `x-mock-fault`. Default: none (every
    /// request is answered normally).
    #[must_use]
    pub fn faults(mut self, plan: FaultPlan) -> Self {
        self.faults = Some(plan);
        self
    }

    /// The address to bind. Default: `127.0.0.1:0` (an ephemeral port).
    #[must_use]
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.listen = addr;
        self
    }

    /// Binds the address and starts serving on a task of the current tokio runtime.
    ///
    /// # Errors
    ///
    /// When the address cannot be bound.
    ///
    /// # Panics
    ///
    /// When called outside a tokio runtime.
    pub async fn start(self) -> io::Result<MockServer> {
        let listener = TcpListener::bind(self.listen).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::new(
            self.api_keys,
            self.faults,
            self.limits,
            self.first_byte_latency,
            self.token_latency,
            self.output_tokens,
        ));
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(serve(listener, Arc::clone(&shared), stopped));
        Ok(MockServer {
            addr,
            shared,
            stop,
            task,
        })
    }
}

/// A running simulator of the Messages API, listening on loopback.
///
/// Dropping the handle stops the server too: it stops accepting connections at once and
/// closes the open ones gracefully in the background (requests in progress, streams
/// included, are finished). [`shutdown`](Self::shutdown) does the same and waits for it.
#[derive(Debug)]
pub struct MockServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl MockServer {
    /// Starts a server with the defaults on an ephemeral port of 127.0.0.1.
    ///
    /// # Errors
    ///
    /// When no port can be bound.
    ///
    /// # Panics
    ///
    /// When called outside a tokio runtime.
    pub async fn start() -> io::Result<Self> {
        Self::builder().start().await
    }

    /// A builder with the defaults.
    pub fn builder() -> MockServerBuilder {
        MockServerBuilder::default()
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The base URL, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The counters, as `GET /mock/stats` returns them.
    pub fn stats(&self) -> Stats {
        self.shared.stats.snapshot()
    }

    /// Zeroes the counters and the fault attempt counters, like `POST /mock/reset`.
    pub fn reset_stats(&self) {
        self.shared.reset();
    }

    /// Replaces the accepted API keys (an empty list accepts any key or none); applies to
    /// the requests that arrive after the call.
    pub fn set_api_keys<I, K>(&self, keys: I)
    where
        I: IntoIterator<Item = K>,
        K: Into<String>,
    {
        let keys = keys.into_iter().map(Into::into).collect();
        if let Ok(mut current) = self.shared.keys.write() {
            *current = keys;
        }
    }

    /// Replaces the limits; the buckets of the configured limits restart full.
    pub fn set_limits(&self, limits: Limits) {
        self.shared.limiter.set_limits(limits);
    }

    /// The limits in force.
    pub fn limits(&self) -> Limits {
        self.shared.limiter.limits()
    }

    /// Replaces the fault plan of requests that send no `x-mock-fault` (`None`: answer
    /// normally).
    pub fn set_faults(&self, plan: Option<FaultPlan>) {
        if let Ok(mut current) = self.shared.faults.write() {
            *current = plan;
        }
    }

    /// Stops accepting connections, lets the open ones finish (at most 10 s), and returns
    /// when they are closed.
    pub async fn shutdown(self) {
        let Self { stop, task, .. } = self;
        let _ = stop.send(());
        let _ = task.await;
    }
}

/// The accept loop: one task per connection, HTTP/1.1 or h2c (prior knowledge).
async fn serve(listener: TcpListener, shared: Arc<Shared>, mut stop: oneshot::Receiver<()>) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // No header read timeout: it needs a timer, which would close idle keep-alive
    // connections of tests that pause tokio's clock.
    builder.http1().header_read_timeout(None);
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();
    loop {
        tokio::select! {
            biased;
            _ = &mut stop => break,
            accepted = listener.accept() => {
                let Ok((tcp, _)) = accepted else {
                    // Out of file descriptors, or a connection aborted before accept: back
                    // off a little and go on.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                };
                // Events are small writes: do not let Nagle hold them back.
                let _ = tcp.set_nodelay(true);
                let shared = Arc::clone(&shared);
                let builder = Arc::clone(&builder);
                let watcher = graceful.watcher();
                tokio::spawn(async move {
                    let service = service_fn(move |request| handle(Arc::clone(&shared), request));
                    let connection = builder.serve_connection(TokioIo::new(tcp), service);
                    // Errors are the client's business (resets, aborted streams).
                    let _ = watcher.watch(connection).await;
                });
            }
        }
    }
    drop(listener);
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown()).await;
}
