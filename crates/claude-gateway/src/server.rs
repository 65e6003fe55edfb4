//! The HTTP server: routing, client authentication, relaying through the stack, graceful
//! shutdown.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use claude_core::headers::X_API_KEY;
use claude_core::{BoxError, Error, ErrorKind, Tenant, collect_body};
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tower::ServiceExt;

use crate::config::ClientKeys;
use crate::drain::Drain;
use crate::wake::SelfWake;

/// The response body the gateway streams to callers.
pub type GatewayBody = UnsyncBoxBody<Bytes, BoxError>;

/// The stack as the gateway sees it: buffered requests in, streamed responses out.
pub type Upstream = claude_stack::StackService;

/// Produces the JSON of `GET /admin/costs`.
pub(crate) type CostReport = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

/// Counters printed in the shutdown summary.
#[derive(Debug, Default)]
pub struct Counters {
    /// Requests relayed to the stack.
    pub requests: AtomicU64,
    /// Requests answered by an error the gateway or the stack produced.
    pub local_errors: AtomicU64,
    /// Extra upstream attempts made by the retry layer.
    pub retries: AtomicU64,
    /// Answers served from the cache.
    pub cache_hits: AtomicU64,
    /// Requests refused for a bad or missing client key.
    pub unauthorized: AtomicU64,
    /// Requests that waited in the local rate-limit queue.
    pub rate_limit_waits: AtomicU64,
    /// Requests refused by the local rate limiter (queue full, wait too long).
    pub rate_limit_rejections: AtomicU64,
}

/// Everything a request handler needs. Cheap to clone.
#[derive(Clone)]
pub struct App {
    pub(crate) upstream: Upstream,
    pub(crate) keys: ClientKeys,
    pub(crate) metrics: Option<PrometheusHandle>,
    pub(crate) costs: Option<CostReport>,
    pub(crate) counters: Arc<Counters>,
    pub(crate) body_limit: usize,
    pub(crate) ready: Arc<dyn Fn() -> bool + Send + Sync>,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("keys", &self.keys)
            .finish_non_exhaustive()
    }
}

fn full(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<GatewayBody> {
    let mut r = Response::new(
        Full::new(body.into())
            .map_err(|e| match e {})
            .boxed_unsync(),
    );
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn error_response(e: Error) -> Response<GatewayBody> {
    e.into_response()
        .map(|b| b.map_err(|e| match e {}).boxed_unsync())
}

/// The key a caller presented: `x-api-key`, else `authorization: Bearer`.
fn presented_key<B>(req: &Request<B>) -> Option<&str> {
    if let Some(k) = req.headers().get(X_API_KEY).and_then(|v| v.to_str().ok()) {
        return Some(k.trim());
    }
    req.headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
}

impl App {
    /// Handles one request. Never fails: every outcome is an HTTP response.
    pub async fn handle(self, req: Request<Incoming>, peer: SocketAddr) -> Response<GatewayBody> {
        let path = req.uri().path();
        match (req.method(), path) {
            (&Method::GET, "/healthz") => full(StatusCode::OK, "text/plain", "ok\n"),
            (&Method::GET, "/readyz") => {
                if (self.ready)() {
                    full(StatusCode::OK, "text/plain", "ready\n")
                } else {
                    full(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready\n")
                }
            }
            (&Method::GET, "/metrics") => match &self.metrics {
                Some(h) => full(StatusCode::OK, "text/plain; version=0.0.4", h.render()),
                None => full(StatusCode::NOT_FOUND, "text/plain", "metrics are off\n"),
            },
            (&Method::GET, "/admin/costs") => self.admin_costs(&req, peer),
            _ if path.starts_with("/v1/") => self.relay(req, peer).await,
            _ => error_response(Error::new(
                ErrorKind::NotFound,
                format!("no route for {} {path}", req.method()),
            )),
        }
    }

    fn admin_costs(&self, req: &Request<Incoming>, peer: SocketAddr) -> Response<GatewayBody> {
        let allowed = if self.keys.has_admin() {
            req.headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .is_some_and(|k| self.keys.is_admin(k.trim()))
        } else {
            peer.ip().is_loopback()
        };
        if !allowed {
            return error_response(Error::new(
                ErrorKind::Authentication,
                "admin endpoints need `authorization: Bearer <admin key>` (or, with no admin key configured, a loopback caller)",
            ));
        }
        match &self.costs {
            Some(report) => full(
                StatusCode::OK,
                "application/json",
                serde_json::to_vec(&report()).unwrap_or_default(),
            ),
            None => error_response(Error::new(
                ErrorKind::NotFound,
                "cost tracking is disabled in this gateway's configuration",
            )),
        }
    }

    async fn relay(self, req: Request<Incoming>, peer: SocketAddr) -> Response<GatewayBody> {
        // Who is calling.
        let tenant = if self.keys.is_empty() {
            // Only loopback listeners are allowed without keys (checked at start); be strict
            // here too in case of a proxy protocol surprise.
            if !peer.ip().is_loopback() {
                self.counters.unauthorized.fetch_add(1, Ordering::Relaxed);
                return error_response(Error::new(
                    ErrorKind::Authentication,
                    "this gateway serves loopback callers only",
                ));
            }
            Tenant::default()
        } else {
            let Some(t) = presented_key(&req).and_then(|k| self.keys.tenant(k)) else {
                self.counters.unauthorized.fetch_add(1, Ordering::Relaxed);
                return error_response(Error::new(
                    ErrorKind::Authentication,
                    "invalid gateway key: send the key this gateway issued in `x-api-key` or `authorization: Bearer`",
                ));
            };
            t
        };
        let (mut parts, body) = req.into_parts();
        let body = match collect_body(body, self.body_limit).await {
            Ok(b) => b,
            Err(e) => {
                self.counters.local_errors.fetch_add(1, Ordering::Relaxed);
                return error_response(e);
            }
        };
        // The caller's key never travels upstream; the stack inserts the upstream key.
        parts.headers.remove(X_API_KEY);
        parts.headers.remove(header::AUTHORIZATION);
        // Nor do the headers of the caller's connection, those its `connection` names
        // included (before the layers, which may set some of these names themselves).
        claude_core::headers::remove_connection_headers(&mut parts.headers);
        parts.extensions.clear();
        parts.extensions.insert(tenant);
        let req = Request::from_parts(parts, body);
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        match self.upstream.clone().oneshot(req).await {
            Ok(mut resp) => {
                if let Some(a) = resp.extensions().get::<claude_core::Attempt>() {
                    self.counters
                        .retries
                        .fetch_add(u64::from(a.0.saturating_sub(1)), Ordering::Relaxed);
                }
                if resp.extensions().get::<claude_core::CacheHit>().is_some() {
                    self.counters.cache_hits.fetch_add(1, Ordering::Relaxed);
                }
                if resp
                    .extensions()
                    .get::<claude_stack::StackTimings>()
                    .is_some_and(|t| !t.queued.is_zero())
                {
                    self.counters
                        .rate_limit_waits
                        .fetch_add(1, Ordering::Relaxed);
                }
                claude_core::headers::remove_connection_headers(resp.headers_mut());
                resp
            }
            Err(e) => {
                self.counters.local_errors.fetch_add(1, Ordering::Relaxed);
                let e = Error::from_box(e);
                if e.origin() == claude_core::Origin::Local
                    && matches!(
                        e.kind(),
                        ErrorKind::RateLimited | ErrorKind::QueueFull | ErrorKind::QueueTimeout
                    )
                {
                    self.counters
                        .rate_limit_rejections
                        .fetch_add(1, Ordering::Relaxed);
                }
                tracing::debug!(code = e.code(), error = %e, "request failed in the stack");
                error_response(e)
            }
        }
    }
}

/// Serves `app` on `listener` until `shutdown` resolves, then lets in-flight requests finish
/// for at most `grace`. Returns whether every connection closed in time.
pub(crate) async fn serve(
    listener: TcpListener,
    app: App,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) -> bool {
    let drain = Drain::new();
    let builder = auto::Builder::new(TokioExecutor::new());
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (tcp, peer) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        // Out of file descriptors and the like: back off, keep serving.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let app = app.clone();
                let svc = hyper::service::service_fn(move |req| {
                    let app = app.clone();
                    async move { Ok::<_, Infallible>(app.handle(req, peer).await) }
                });
                let conn = builder.serve_connection_with_upgrades(TokioIo::new(tcp), svc);
                let conn = SelfWake::new(drain.watch(conn.into_owned()));
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    tokio::select! {
        () = drain.shutdown() => true,
        () = tokio::time::sleep(grace) => false,
    }
}
