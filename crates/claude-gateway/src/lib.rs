//! A relay server for the Anthropic Messages API built from the claude-tower stack: point
//! any Anthropic SDK's `base_url` at it and every call gets retries, rate limits, caching,
//! cost accounting and managed keys.
//!
//! The binary is `claude-gateway`; this library runs the same server in-process (tests,
//! embedding):
//!
//! ```no_run
//! use claude_gateway::{Gateway, Options};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let gw = Gateway::start(Options { mock: true, ..Options::default() }).await?;
//! println!("listening on {}", gw.addr());
//! let summary = gw.shutdown().await;
//! println!("{summary}");
//! # Ok(())
//! # }
//! ```
//!
//! # Routes
//!
//! - `/v1/*` (`/v1/messages` JSON and SSE, `/v1/messages/count_tokens`,
//!   `/v1/messages/batches*`, `/v1/models`): relayed through the stack. Responses stream
//!   frame by frame. Callers may speak HTTP/1.1 or HTTP/2 (cleartext with prior knowledge);
//!   upstream, the stack's client picks its own protocol.
//! - `GET /healthz`, `GET /readyz`, `GET /metrics` (Prometheus text; histograms with the
//!   buckets of [`HISTOGRAM_BUCKETS`]).
//! - `GET /admin/costs`: JSON cost report; needs `authorization: Bearer <admin key>` when an
//!   admin key is configured, else only loopback callers are served.
//!
//! # Client authentication
//!
//! Callers present a gateway key (`x-api-key` or `authorization: Bearer`), mapped to a
//! tenant; it never reaches Anthropic. With no gateway keys configured the gateway only
//! listens on loopback addresses, refuses to start on any other, and serves every caller as
//! the `default` tenant.

mod admin;
mod config;
mod drain;
mod server;
mod wake;

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use claude_mock::MockServer;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use config::{ClientKeyEntry, ClientKeys, ConfigError, GatewayConfig, format_hash, hash_key};
pub use server::{App, Counters, GatewayBody, Upstream};

/// How to start a gateway: the config file and the command-line overrides.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// A TOML configuration file.
    pub config_path: Option<PathBuf>,
    /// `--listen`: overrides the file and the environment.
    pub listen: Option<SocketAddr>,
    /// `--upstream`: overrides the file and the environment.
    pub upstream: Option<String>,
    /// `--mock`: run claude-mock inside the process and relay to it.
    pub mock: bool,
    /// Read `CLAUDE_GATEWAY_*` and `ANTHROPIC_API_KEY` from the process environment
    /// (the binary does; tests usually don't).
    pub use_env: bool,
}

/// A startup failure.
#[derive(Debug)]
pub enum StartError {
    /// The configuration is invalid.
    Config(ConfigError),
    /// The stack could not be built.
    Stack(claude_core::Error),
    /// The listener could not be bound.
    Bind(SocketAddr, std::io::Error),
    /// The in-process mock could not start.
    Mock(std::io::Error),
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Config(e) => write!(f, "{e}"),
            Self::Stack(e) => write!(f, "cannot build the stack: {e}"),
            Self::Bind(a, e) => write!(f, "cannot listen on {a}: {e}"),
            Self::Mock(e) => write!(f, "cannot start the mock upstream: {e}"),
        }
    }
}

impl std::error::Error for StartError {}

impl From<ConfigError> for StartError {
    fn from(e: ConfigError) -> Self {
        Self::Config(e)
    }
}

/// A running gateway.
#[derive(Debug)]
pub struct Gateway {
    addr: SocketAddr,
    upstream_url: String,
    loopback_only: bool,
    counters: Arc<Counters>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<bool>,
    mock: Option<MockServer>,
    cost: Option<claude_cost::CostTracker>,
}

impl Gateway {
    /// Loads the configuration (file, then environment, then `options`), validates it, builds
    /// the stack and starts serving.
    ///
    /// # Errors
    ///
    /// Any configuration error names its field; nothing is served until all is valid.
    pub async fn start(options: Options) -> Result<Self, StartError> {
        let mut cfg = match &options.config_path {
            Some(p) => GatewayConfig::from_file(p)?,
            None => GatewayConfig::default(),
        };
        let extra = if options.use_env {
            cfg.apply_env(|k| std::env::var(k).ok())?
        } else {
            cfg.apply_env(|_| None)?
        };
        if let Some(l) = options.listen {
            cfg.listen = l;
        }
        if let Some(u) = &options.upstream {
            cfg.upstream.clone_from(u);
        }
        let keys = cfg.validate(&extra)?;

        let mock = if options.mock {
            let m = MockServer::start().await.map_err(StartError::Mock)?;
            cfg.upstream = m.url();
            Some(m)
        } else {
            None
        };
        cfg.stack.client.base_url.clone_from(&cfg.upstream);
        let mut stack_config = cfg.stack_config();
        if let claude_stack::Toggle::On(cost) = &mut stack_config.cost {
            // The gateway's metrics go to one global recorder (installed below, before the
            // first request), so the cost counters' handles can be kept across requests.
            cost.reuse_metric_handles = true;
        }
        let mut stack = claude_stack::ClaudeStack::new(stack_config).map_err(StartError::Stack)?;
        // Readiness: with the default key ring, ready once it holds a key; with configured
        // [stack.secrets], the rings fetch in the background and report through metrics.
        let mut ready: Arc<dyn Fn() -> bool + Send + Sync> = Arc::new(|| true);
        if !cfg.stack.secrets.is_on() {
            let ring = default_key_ring(options.mock, options.use_env)?;
            // Fail fast: a gateway that cannot load its upstream key should not start.
            ring.current().await.map_err(|e| {
                StartError::Stack(claude_core::Error::new(
                    claude_core::ErrorKind::SecretUnavailable,
                    format!("cannot load the upstream API key: {e}"),
                ))
            })?;
            stack = stack.with_api_keys(claude_secrets::ApiKeyLayer::new(ring.clone()));
            ready = Arc::new(move || ring.status().key.is_some());
        }
        let upstream = stack.client().map_err(StartError::Stack)?;
        let cost = stack.cost_tracker().cloned();
        let costs: Option<server::CostReport> = cost
            .clone()
            .map(|t| Arc::new(move || admin::costs_json(&t.report())) as server::CostReport);

        let metrics = prometheus();
        let counters = Arc::new(Counters::default());
        let app = App {
            upstream,
            keys: keys.clone(),
            metrics,
            costs,
            counters: counters.clone(),
            body_limit: cfg.body_limit,
            ready,
        };
        let listener = TcpListener::bind(cfg.listen)
            .await
            .map_err(|e| StartError::Bind(cfg.listen, e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| StartError::Bind(cfg.listen, e))?;
        let (stop, stopped) = oneshot::channel::<()>();
        let grace = cfg.shutdown_grace;
        let task = tokio::spawn(server::serve(
            listener,
            app,
            async move {
                let _ = stopped.await;
            },
            grace,
        ));
        Ok(Self {
            addr,
            upstream_url: cfg.upstream.clone(),
            loopback_only: keys.is_empty(),
            counters,
            stop: Some(stop),
            task,
            mock,
            cost,
        })
    }

    /// The address the gateway listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The upstream base URL.
    pub fn upstream_url(&self) -> &str {
        &self.upstream_url
    }

    /// Whether no client keys are configured (loopback callers only).
    pub fn loopback_only(&self) -> bool {
        self.loopback_only
    }

    /// The in-process mock upstream, in `--mock` mode.
    pub fn mock(&self) -> Option<&MockServer> {
        self.mock.as_ref()
    }

    /// Stops accepting, lets in-flight requests finish (up to the grace period), and returns
    /// the summary.
    pub async fn shutdown(mut self) -> Summary {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let drained = (&mut self.task).await.unwrap_or(false);
        let c = &self.counters;
        let totals = self.cost.as_ref().map(claude_cost::CostTracker::total);
        Summary {
            costs: totals,
            drained,
            requests: c.requests.load(Ordering::Relaxed),
            retries: c.retries.load(Ordering::Relaxed),
            cache_hits: c.cache_hits.load(Ordering::Relaxed),
            local_errors: c.local_errors.load(Ordering::Relaxed),
            unauthorized: c.unauthorized.load(Ordering::Relaxed),
            rate_limit_waits: c.rate_limit_waits.load(Ordering::Relaxed),
            rate_limit_rejections: c.rate_limit_rejections.load(Ordering::Relaxed),
        }
    }
}

/// The upstream key ring when the configuration names no secret source: `ANTHROPIC_API_KEY`
/// (re-read on every refresh), or, in mock mode without it, a placeholder the mock accepts.
fn default_key_ring(mock: bool, use_env: bool) -> Result<claude_secrets::KeyRing, StartError> {
    use claude_secrets::{EnvSource, KeyRing, KeyRingConfig, StaticSource};
    let has_env = use_env && std::env::var_os("ANTHROPIC_API_KEY").is_some_and(|v| !v.is_empty());
    if has_env {
        Ok(KeyRing::new(
            EnvSource::new("ANTHROPIC_API_KEY"),
            KeyRingConfig::default(),
        ))
    } else if mock {
        Ok(KeyRing::new(
            StaticSource::new("sk-ant-mock-gateway"),
            KeyRingConfig::default(),
        ))
    } else {
        Err(StartError::Config(ConfigError {
            field: "stack.secrets".into(),
            message: "no upstream API key: set ANTHROPIC_API_KEY, or name a secret source in \
                      [stack.secrets] (env, file, vault, aws), or run with --mock"
                .into(),
        }))
    }
}

/// The upper bounds (seconds) of the buckets of every histogram `/metrics` serves
/// (`claude_stack_overhead_seconds`, `claude_ratelimit_wait_seconds`): from 100 µs, the
/// stack's own time on a quiet machine, to a minute, longer than a rate-limit queue waits by
/// default. Histograms rather than summaries: Prometheus can add histograms' buckets across
/// gateway instances (summaries' quantiles cannot be added), and a sample costs a bucket
/// search instead of an insertion into a quantile sketch (BENCHMARKS.md section 11).
pub const HISTOGRAM_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0,
];

/// How often recorded histogram samples are moved into the histograms `/metrics` serves.
const UPKEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// The process-wide Prometheus recorder (metrics recorders are global: one per process,
/// shared by every gateway started in it). `None` if another recorder was installed first.
fn prometheus() -> Option<metrics_exporter_prometheus::PrometheusHandle> {
    static HANDLE: std::sync::OnceLock<Option<metrics_exporter_prometheus::PrometheusHandle>> =
        std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
                .set_buckets(HISTOGRAM_BUCKETS)
                .ok()?
                .install_recorder()
                .ok()?;
            // One global recorder, installed before any request: the layers can keep the
            // handles of their fixed metrics (claude_core::metric).
            claude_core::metric::keep_metric_handles(true);
            // Recorded samples wait in a lock-free queue until an upkeep (or a scrape) moves
            // them into their histograms: every second, so that each pass is short.
            let upkeep = handle.clone();
            std::thread::Builder::new()
                .name("prometheus-upkeep".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(UPKEEP_EVERY);
                        upkeep.run_upkeep();
                    }
                })
                .ok()?;
            Some(handle)
        })
        .clone()
}

/// What the gateway did, printed at shutdown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Whether every in-flight request finished within the grace period.
    pub drained: bool,
    /// Requests relayed.
    pub requests: u64,
    /// Extra upstream attempts made by the retry layer.
    pub retries: u64,
    /// Answers served from the cache.
    pub cache_hits: u64,
    /// Requests answered by an error the gateway or the stack produced.
    pub local_errors: u64,
    /// Requests refused for a bad or missing gateway key.
    pub unauthorized: u64,
    /// Requests that waited in the local rate-limit queue.
    pub rate_limit_waits: u64,
    /// Requests refused by the local rate limiter.
    pub rate_limit_rejections: u64,
    /// Tokens and money, when cost tracking is on.
    pub costs: Option<claude_cost::Totals>,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "claude-gateway summary")?;
        writeln!(f, "  requests relayed      {}", self.requests)?;
        writeln!(f, "  retries               {}", self.retries)?;
        writeln!(f, "  cache hits            {}", self.cache_hits)?;
        writeln!(f, "  local errors          {}", self.local_errors)?;
        writeln!(f, "  unauthorized          {}", self.unauthorized)?;
        writeln!(f, "  rate-limit waits      {}", self.rate_limit_waits)?;
        writeln!(f, "  rate-limit refusals   {}", self.rate_limit_rejections)?;
        if let Some(t) = &self.costs {
            writeln!(f, "  input tokens          {}", t.input_tokens)?;
            writeln!(f, "  output tokens         {}", t.output_tokens)?;
            writeln!(f, "  cache write tokens    {}", t.cache_write_tokens())?;
            writeln!(f, "  cache read tokens     {}", t.cache_read_tokens)?;
            writeln!(f, "  cost                  {}", t.cost)?;
            if t.unpriced_requests > 0 {
                writeln!(
                    f,
                    "  unpriced requests     {} (unknown models)",
                    t.unpriced_requests
                )?;
            }
            writeln!(f, "  saved by the cache    {}", t.savings)?;
        }
        write!(
            f,
            "  in-flight drained     {}",
            if self.drained {
                "yes"
            } else {
                "no (grace period ran out)"
            }
        )
    }
}
