//! The servers under test, each run in a child process of this binary (`--serve KIND`), so
//! that each has its own memory figures, CPU time and tokio runtime:
//!
//! - `mock`: `claude_mock::MockServer`, requiring the upstream key;
//! - `proxy`: a bare pass-through relay: hyper-util's `auto` server (as claude-gateway uses)
//!   and hyper-util's pooled client, the request and response bodies streamed through,
//!   nothing else;
//! - `gateway`: `claude_gateway::Gateway::start` with every layer on.
//!
//! Protocol with the parent: the child prints `LISTEN <addr> CACHE <on|off>` once it
//! serves; then for each `rss` line it reads on stdin it prints `RSS <VmRSS kB> <VmHWM kB>`;
//! at the end of stdin (the parent closed it, or died) it exits. It also exits by itself
//! after `max_lifetime`, so it can never outlive a run by much.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::{Either, Empty};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

/// The key the mock accepts; the load generator sends it as the caller's key (used as is by
/// the proxy; replaced by the gateway with the one from its secret source).
pub(crate) const UPSTREAM_KEY: &str = "sk-ant-api03-bench-upstream-key";

/// Which server a child runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Kind {
    /// claude-mock alone.
    Mock,
    /// A bare hyper pass-through proxy.
    Proxy,
    /// claude-gateway with every layer on.
    Gateway,
}

/// What a child needs to know.
#[derive(Debug, Clone)]
pub(crate) struct ServeArgs {
    pub(crate) kind: Kind,
    pub(crate) upstream: Option<String>,
    pub(crate) output_tokens: u64,
    pub(crate) max_lifetime: Duration,
    /// The gateway cache's `max_bytes` (default: the cache's own, 256 MiB).
    pub(crate) cache_max_bytes: Option<u64>,
    /// The gateway's layers that are on.
    pub(crate) layers: Vec<Layer>,
    /// Worker threads of the server's tokio runtime (default: one per core).
    pub(crate) worker_threads: Option<usize>,
}

/// Runs a child: starts the server, answers `rss` queries, exits at the end of stdin.
pub(crate) fn serve(args: &ServeArgs) -> Result<(), String> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = args.worker_threads {
        builder.worker_threads(n.max(1));
    }
    let rt = builder
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    let lifetime = args.max_lifetime;
    std::thread::spawn(move || {
        std::thread::sleep(lifetime);
        eprintln!("bench-gateway child: max lifetime reached, exiting");
        std::process::exit(3);
    });
    let (addr, cache, guard) = rt.block_on(start(args))?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "LISTEN {addr} CACHE {}",
        if cache { "on" } else { "off" }
    )
    .and_then(|()| out.flush())
    .map_err(|e| format!("stdout: {e}"))?;
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        if line.trim() == "rss" {
            let (rss, hwm) = memory_kb("self").unwrap_or((0, 0));
            writeln!(out, "RSS {rss} {hwm}")
                .and_then(|()| out.flush())
                .map_err(|e| format!("stdout: {e}"))?;
        }
    }
    // The parent is done: stop at once (servers hold no state worth a graceful close).
    drop(guard);
    rt.shutdown_timeout(Duration::from_millis(100));
    Ok(())
}

/// Keeps a server alive; dropping it stops the server.
enum Guard {
    Mock {
        _server: claude_mock::MockServer,
    },
    Gateway {
        _server: claude_gateway::Gateway,
        _dir: TempDir,
    },
    Task(tokio::task::JoinHandle<()>),
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Self::Task(t) = self {
            t.abort();
        }
    }
}

async fn start(args: &ServeArgs) -> Result<(SocketAddr, bool, Guard), String> {
    match args.kind {
        Kind::Mock => {
            let mock = claude_mock::MockServer::builder()
                .api_key(UPSTREAM_KEY)
                .output_tokens(args.output_tokens)
                .start()
                .await
                .map_err(|e| format!("mock: {e}"))?;
            Ok((mock.addr(), false, Guard::Mock { _server: mock }))
        }
        Kind::Proxy => {
            let upstream = args.upstream.as_deref().ok_or("proxy needs --upstream")?;
            let listener = TcpListener::bind("127.0.0.1:0")
                .await
                .map_err(|e| format!("proxy bind: {e}"))?;
            let addr = listener.local_addr().map_err(|e| e.to_string())?;
            let authority = upstream_authority(upstream)?;
            let task = tokio::spawn(proxy(listener, authority));
            Ok((addr, false, Guard::Task(task)))
        }
        Kind::Gateway => {
            let upstream = args.upstream.clone().ok_or("gateway needs --upstream")?;
            let dir = TempDir::new()?;
            let config = gateway_config(&dir.key_file()?, &args.layers, args.cache_max_bytes)?;
            let cache = args.layers.contains(&Layer::Cache);
            let path = dir.path.join("gateway.toml");
            std::fs::write(&path, config).map_err(|e| format!("{}: {e}", path.display()))?;
            let gw = claude_gateway::Gateway::start(claude_gateway::Options {
                config_path: Some(path),
                listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
                upstream: Some(upstream),
                mock: false,
                use_env: false,
            })
            .await
            .map_err(|e| format!("gateway: {e}"))?;
            Ok((
                gw.addr(),
                cache,
                Guard::Gateway {
                    _server: gw,
                    _dir: dir,
                },
            ))
        }
    }
}

/// A layer of the stack that `--layers` can switch off (the API key layer stays on whatever
/// the list says: the gateway needs an upstream key).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Layer {
    /// The API key layer (always on).
    ApiKey,
    /// Cost accounting with a budget.
    Cost,
    /// The response cache.
    Cache,
    /// Retries (and, below them, the per-attempt timeout, which is always on).
    Retry,
    /// Client-side rate limits.
    RateLimit,
}

/// The gateway's configuration: the `layers` on, limits and budget far above the load, the
/// upstream key from a file (the API key layer), the cache with `cache_max_bytes` when
/// given.
pub(crate) fn gateway_config(
    key_file: &std::path::Path,
    layers: &[Layer],
    cache_max_bytes: Option<u64>,
) -> Result<String, String> {
    let on = |l: Layer| layers.contains(&l);
    let mut text = String::from("listen = \"127.0.0.1:0\"\n\n[stack]\n");
    if !on(Layer::Cost) {
        text.push_str("cost = false\n");
    }
    if !on(Layer::Retry) {
        text.push_str("retry = false\n");
    }
    match (on(Layer::Cache), cache_max_bytes) {
        (false, _) => text.push_str("cache = false\n"),
        (true, None) => text.push_str("cache = true\n"),
        (true, Some(n)) => {
            let _ = write!(text, "\n[stack.cache]\nmax_bytes = {n}\n");
        }
    }
    if on(Layer::Cost) {
        text.push_str("\n[stack.cost.budgets]\nglobal = { monthly = \"1000000000\" }\n");
    }
    if on(Layer::Retry) {
        text.push_str("\n[stack.retry]\n");
    }
    if on(Layer::RateLimit) {
        text.push_str(
            "\n[stack.rate_limit]\nrequests_per_minute = 1000000000\n\
             input_tokens_per_minute = 1000000000000\n\
             output_tokens_per_minute = 1000000000000\n\
             max_concurrent_requests = 1000000\n",
        );
    }
    let _ = write!(
        text,
        "\n[stack.secrets.environments.bench.default]\nsource = \"file\"\npath = \"{}\"\n",
        key_file.display()
    );
    claude_gateway::GatewayConfig::from_toml(&text)
        .map(|_| text)
        .map_err(|e| format!("the bench's gateway config does not parse: {e}"))
}

fn upstream_authority(url: &str) -> Result<Authority, String> {
    let uri: Uri = url.parse().map_err(|e| format!("upstream `{url}`: {e}"))?;
    uri.authority()
        .cloned()
        .ok_or_else(|| format!("upstream `{url}` has no host"))
}

type ProxyBody = Either<Incoming, Empty<Bytes>>;

/// The bare relay: every request is sent upstream as it came (its URI made absolute, its
/// `host` dropped so the client sets the upstream's), bodies streamed both ways.
async fn proxy(listener: TcpListener, authority: Authority) {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    let client: Client<HttpConnector, Incoming> = Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(64)
        .build(http);
    let builder = auto::Builder::new(TokioExecutor::new());
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let client = client.clone();
        let authority = authority.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let client = client.clone();
                let authority = authority.clone();
                async move { Ok::<_, Infallible>(relay(&client, authority, req).await) }
            });
            let _ = builder.serve_connection(TokioIo::new(tcp), svc).await;
        });
    }
}

async fn relay(
    client: &Client<HttpConnector, Incoming>,
    authority: Authority,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    let (mut parts, body) = req.into_parts();
    let pq = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let uri = Uri::builder()
        .scheme(Scheme::HTTP)
        .authority(authority)
        .path_and_query(pq)
        .build();
    let Ok(uri) = uri else {
        return status(StatusCode::BAD_REQUEST);
    };
    parts.uri = uri;
    parts.headers.remove(http::header::HOST);
    match client.request(Request::from_parts(parts, body)).await {
        Ok(resp) => resp.map(Either::Left),
        Err(_) => status(StatusCode::BAD_GATEWAY),
    }
}

fn status(code: StatusCode) -> Response<ProxyBody> {
    let mut r = Response::new(Either::Right(Empty::new()));
    *r.status_mut() = code;
    r
}

/// `VmRSS` and `VmHWM` of a process (`self` or a pid), in kB.
pub(crate) fn memory_kb(pid: &str) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// A private temporary directory, removed on drop.
pub(crate) struct TempDir {
    path: PathBuf,
}

impl TempDir {
    fn new() -> Result<Self, String> {
        let path = std::env::temp_dir().join(format!(
            "claude-bench-gateway-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ));
        std::fs::create_dir_all(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Self { path })
    }

    fn key_file(&self) -> Result<PathBuf, String> {
        let p = self.path.join("upstream-key");
        std::fs::write(&p, UPSTREAM_KEY).map_err(|e| format!("{}: {e}", p.display()))?;
        Ok(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Reads lines from a child's stdout.
pub(crate) fn read_line(r: &mut impl BufRead) -> Result<String, String> {
    let mut s = String::new();
    match r.read_line(&mut s) {
        Ok(0) => Err("the child closed its output".into()),
        Ok(_) => Ok(s.trim_end().to_owned()),
        Err(e) => Err(format!("reading the child: {e}")),
    }
}
