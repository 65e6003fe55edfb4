//! [`HttpClient`]: the HTTP client at the bottom of the stack.
//!
//! A hyper-util pooled client (HTTP/1.1 and HTTP/2 by ALPN, keep-alive) over rustls with the
//! **ring provider passed explicitly**, so that another crate in the application enabling
//! aws-lc-rs cannot make client construction panic ("Could not automatically determine the
//! process-level CryptoProvider"), and this library never installs a process default.
//!
//! What it adds to a bare hyper client:
//! - `base_url`: requests may carry a path only (`/v1/messages`); the client joins it to the
//!   base URL, keeping the base's path prefix, so a relay such as
//!   `https://relay.example/anthropic` works.
//! - `anthropic-version: 2023-06-01` when the caller sent none.
//! - `accept-encoding: identity` always: every layer that reads usage scans the body as it
//!   passes, so the answer must not be compressed (a caller's `accept-encoding: gzip` is
//!   replaced). `host` and hop-by-hop headers of the caller's connection are dropped (the
//!   client sets `host` from the base URL).
//! - A connect timeout (default 5 s), and for response bodies a **first-byte timeout** and an
//!   **idle timeout between frames** (defaults 60 s each; tower's `Timeout` stops at the
//!   headers, so a stalled SSE stream would otherwise hang forever). A body timeout ends the
//!   body with a [`claude_core::Error`] of kind [`ErrorKind::Timeout`].
//! - The pool's idle timeout (default 30 s) runs on a tokio timer (hyper-util ignores it
//!   without one) and stays below common server keep-alive limits, which narrows the race
//!   where a pooled connection closes as a request is written.
//!
//! The per-attempt timeout (until the response headers) is not here: it is a layer of the
//! stack, inside the retry layer, so a timed-out attempt can be retried.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use claude_core::headers::{self, ANTHROPIC_VERSION, DEFAULT_ANTHROPIC_VERSION};
use claude_core::{BoxError, Error, ErrorKind, Origin};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use pin_project_lite::pin_project;
use serde::Deserialize;
use tokio::time::{Instant, Sleep};

/// Configuration of the [`HttpClient`]. Every field has a documented default.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClientConfig {
    /// Where requests go. Default `https://api.anthropic.com`. A path prefix is kept
    /// (`https://relay.example/anthropic` + `/v1/messages`). `http://` is allowed (local
    /// relays, the mock).
    pub base_url: String,
    /// TCP connect timeout. Default 5 s.
    #[serde(with = "claude_core::config::duration")]
    pub connect_timeout: Duration,
    /// Time allowed from the response headers to the first body frame. Default 60 s.
    #[serde(with = "claude_core::config::option_duration")]
    pub first_byte_timeout: Option<Duration>,
    /// Time allowed between two body frames (Anthropic streams send `ping` events while a
    /// long answer is thought about). Default 60 s.
    #[serde(with = "claude_core::config::option_duration")]
    pub idle_timeout: Option<Duration>,
    /// How long an idle pooled connection is kept. Default 30 s.
    #[serde(with = "claude_core::config::duration")]
    pub pool_idle_timeout: Duration,
    /// Idle connections kept per host. Default 64.
    pub pool_max_idle_per_host: usize,
    /// Offer HTTP/2 by ALPN on TLS connections. Default true. (Plain-HTTP upstreams always
    /// use HTTP/1.1.)
    pub http2: bool,
    /// The `anthropic-version` sent when the caller set none. Default `2023-06-01`.
    pub anthropic_version: String,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            base_url: "https://api.anthropic.com".into(),
            connect_timeout: Duration::from_secs(5),
            first_byte_timeout: Some(Duration::from_secs(60)),
            idle_timeout: Some(Duration::from_secs(60)),
            pool_idle_timeout: Duration::from_secs(30),
            pool_max_idle_per_host: 64,
            http2: true,
            anthropic_version: DEFAULT_ANTHROPIC_VERSION.into(),
        }
    }
}

/// The parsed base URL.
#[derive(Clone)]
struct Base {
    scheme: Scheme,
    authority: Authority,
    prefix: String,
}

impl Base {
    /// The `host` header hyper-util would send to a plain-HTTP upstream: the host, with the
    /// port unless it is 80. `None` over TLS.
    fn plain_http_host(&self) -> Option<HeaderValue> {
        if self.scheme != Scheme::HTTP {
            return None;
        }
        let host = self.authority.host();
        let value = match self.authority.port_u16() {
            Some(port) if port != 80 => format!("{host}:{port}"),
            _ => host.to_owned(),
        };
        HeaderValue::from_str(&value).ok()
    }

    fn parse(url: &str) -> Result<Self, Error> {
        let bad = |why: &str| {
            Error::new(
                ErrorKind::InvalidRequest,
                format!("invalid base_url `{url}`: {why}"),
            )
        };
        let uri: Uri = url.parse().map_err(|_| bad("not a URL"))?;
        let scheme = uri.scheme().cloned().ok_or_else(|| bad("missing scheme"))?;
        if scheme != Scheme::HTTP && scheme != Scheme::HTTPS {
            return Err(bad("scheme must be http or https"));
        }
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| bad("missing host"))?;
        if uri.query().is_some() {
            return Err(bad("must not have a query"));
        }
        let prefix = uri.path().trim_end_matches('/').to_owned();
        Ok(Self {
            scheme,
            authority,
            prefix,
        })
    }

    fn join(&self, uri: &Uri) -> Result<Uri, Error> {
        let b = Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone());
        // Without a prefix the request's own path and query go as they are (a clone shares
        // their bytes: no new string, no second parse).
        let b = match (self.prefix.is_empty(), uri.path_and_query()) {
            (true, Some(pq)) => b.path_and_query(pq.clone()),
            (_, pq) => {
                let pq = pq.map_or("/", PathAndQuery::as_str);
                b.path_and_query(format!("{}{}", self.prefix, pq))
            }
        };
        b.build().map_err(|e| {
            Error::new(ErrorKind::InvalidRequest, "request path is not valid").with_source(e)
        })
    }
}

#[cfg(feature = "rustls-ring")]
type Connector = hyper_rustls::HttpsConnector<HttpConnector>;
#[cfg(not(feature = "rustls-ring"))]
type Connector = HttpConnector;

/// The pooled HTTP client at the bottom of the stack: a `Service<Request<Bytes>>` whose
/// responses stream ([`TimeoutBody`] around hyper's body). Cheap to clone: one shared
/// allocation (the layers above clone their inner service on every call, and a clone of
/// hyper-util's client alone is several reference counts and about 400 bytes to copy).
#[derive(Clone)]
pub struct HttpClient(Arc<ClientInner>);

struct ClientInner {
    client: Client<Connector, Full<Bytes>>,
    base: Base,
    /// The `host` header of a plain-HTTP upstream (always HTTP/1.1), made once: hyper-util
    /// would otherwise format it for every request (`host:port`). `None` over TLS, where
    /// the connection may turn out HTTP/2 (`:authority`, no `host`) and hyper-util sets it
    /// only on HTTP/1.1.
    host: Option<HeaderValue>,
    version: HeaderValue,
    first_byte: Option<Duration>,
    idle: Option<Duration>,
}

impl fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpClient")
            .field(
                "base_url",
                &format_args!(
                    "{}://{}{}",
                    self.0.base.scheme, self.0.base.authority, self.0.base.prefix
                ),
            )
            .finish_non_exhaustive()
    }
}

impl HttpClient {
    /// Builds a client. Fails with [`ErrorKind::InvalidRequest`] on a bad `base_url` or
    /// version, and with [`ErrorKind::Internal`] if TLS cannot be set up.
    ///
    /// # Errors
    ///
    /// The configuration is checked here, once, so requests never fail for it.
    pub fn new(config: &ClientConfig) -> Result<Self, Error> {
        let base = Base::parse(&config.base_url)?;
        let version = HeaderValue::from_str(&config.anthropic_version).map_err(|_| {
            Error::new(
                ErrorKind::InvalidRequest,
                "anthropic_version is not a valid header value",
            )
        })?;
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(config.connect_timeout));
        http.set_nodelay(true);
        http.enforce_http(false);
        let connector = Self::connector(http, config.http2)?;
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(config.pool_idle_timeout)
            .pool_max_idle_per_host(config.pool_max_idle_per_host);
        let client = builder.build(connector);
        let host = base.plain_http_host();
        Ok(Self(Arc::new(ClientInner {
            client,
            base,
            host,
            version,
            first_byte: config.first_byte_timeout,
            idle: config.idle_timeout,
        })))
    }

    #[cfg(feature = "rustls-ring")]
    fn connector(http: HttpConnector, http2: bool) -> Result<Connector, Error> {
        let builder = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
            .map_err(|e| Error::new(ErrorKind::Internal, "TLS setup failed").with_source(e))?
            .https_or_http();
        Ok(if http2 {
            builder.enable_all_versions().wrap_connector(http)
        } else {
            builder.enable_http1().wrap_connector(http)
        })
    }

    #[cfg(not(feature = "rustls-ring"))]
    fn connector(http: HttpConnector, _http2: bool) -> Result<Connector, Error> {
        Ok(http)
    }
}

impl tower::Service<Request<Bytes>> for HttpClient {
    type Response = Response<TimeoutBody<Incoming>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // hyper-util's client is always ready (no backpressure); limits are layers above.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Bytes>) -> Self::Future {
        let this = &*self.0;
        let (mut parts, body) = req.into_parts();
        let uri = match this.base.join(&parts.uri) {
            Ok(u) => u,
            Err(e) => return Box::pin(async move { Err(e.into()) }),
        };
        parts.uri = uri;
        // The caller's HTTP version belongs to the caller's hop (a gateway's caller may speak
        // HTTP/2 or HTTP/1.0); upstream, the connection decides. hyper-util refuses an HTTP/2
        // request on an HTTP/1 connection, and would send an HTTP/1.0 one as such.
        parts.version = http::Version::HTTP_11;
        if !parts.headers.contains_key(ANTHROPIC_VERSION) {
            parts
                .headers
                .insert(ANTHROPIC_VERSION, this.version.clone());
        }
        // The usage scanners read the body as it passes: it must not be compressed.
        parts.headers.insert(
            http::header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
        // The framing (the client sets both for the upstream connection) and the hop-by-hop
        // headers of the caller's connection do not travel on: the upstream's `host` replaces
        // the caller's.
        match &this.host {
            Some(host) => {
                parts.headers.insert(http::header::HOST, host.clone());
            }
            None => {
                parts.headers.remove(http::header::HOST);
            }
        }
        parts.headers.remove(http::header::CONTENT_LENGTH);
        headers::remove_hop_by_hop(&mut parts.headers);
        let req = Request::from_parts(parts, Full::new(body));
        let fut = this.client.request(req);
        let (first_byte, idle) = (this.first_byte, this.idle);
        Box::pin(async move {
            let resp = fut.await.map_err(|e| Error::from_box(Box::new(e)))?;
            Ok(resp.map(|b| TimeoutBody::new(b, first_byte, idle)))
        })
    }
}

pin_project! {
    /// A response body with a first-byte timeout and an idle timeout between frames.
    pub struct TimeoutBody<B> {
        #[pin]
        inner: B,
        #[pin]
        sleep: Option<Sleep>,
        idle: Option<Duration>,
        // When the last frame came: the timer is not moved on every frame (that is a trip
        // through the timer wheel per SSE event); when it fires, it is re-armed to this
        // time plus `idle` if a frame came since.
        last_frame: Option<Instant>,
        // The waker the timer was last polled with since it was (re)armed. While the task's
        // waker still wakes the same task and the timer has not fired, polling it again
        // only registers the same waker once more (most polls of a streamed body find no
        // frame and would otherwise go through the timer's waker registration each time).
        armed: Option<Waker>,
        first: bool,
    }
}

impl<B> fmt::Debug for TimeoutBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TimeoutBody").finish_non_exhaustive()
    }
}

impl<B> TimeoutBody<B> {
    /// Wraps `inner`: the first frame must come within `first_byte`, each later one within
    /// `idle` of the previous.
    pub fn new(inner: B, first_byte: Option<Duration>, idle: Option<Duration>) -> Self {
        Self {
            inner,
            sleep: first_byte.map(tokio::time::sleep),
            idle,
            last_frame: None,
            armed: None,
            first: true,
        }
    }
}

impl<B> Body for TimeoutBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        if let Poll::Ready(res) = this.inner.poll_frame(cx) {
            match *this.idle {
                Some(idle) if *this.first || this.sleep.is_none() => {
                    // The first frame: from now on the idle timeout applies. A first-byte
                    // timer that fires no later than this frame's idle deadline is kept (it
                    // is re-armed from the last frame when it fires, below): no trip
                    // through the timer wheel for a body that ends soon, as most do.
                    let now = Instant::now();
                    match this.sleep.as_mut().as_pin_mut() {
                        Some(s) if s.deadline() <= now + idle => {
                            *this.last_frame = Some(now);
                        }
                        Some(s) => {
                            s.reset(now + idle);
                            *this.last_frame = None;
                            *this.armed = None;
                        }
                        None => {
                            this.sleep.set(Some(tokio::time::sleep_until(now + idle)));
                            *this.last_frame = None;
                            *this.armed = None;
                        }
                    }
                }
                Some(_) => *this.last_frame = Some(Instant::now()),
                None => {
                    this.sleep.set(None);
                    *this.armed = None;
                }
            }
            *this.first = false;
            return Poll::Ready(res.map(|r| r.map_err(Into::into)));
        }
        while let Some(mut s) = this.sleep.as_mut().as_pin_mut() {
            // Registered with a waker of this task and not fired: nothing to do (a timer
            // that fires after this check wakes that waker, and the next poll sees it).
            let same_task = this.armed.as_ref().is_some_and(|w| w.will_wake(cx.waker()));
            if same_task && !s.is_elapsed() {
                return Poll::Pending;
            }
            if s.as_mut().poll(cx).is_pending() {
                if !same_task {
                    *this.armed = Some(cx.waker().clone());
                }
                return Poll::Pending;
            }
            *this.armed = None;
            // A frame came after the timer was armed: the body is not idle; wait again
            // from that frame.
            if let (Some(idle), Some(last)) = (*this.idle, this.last_frame.take())
                && !*this.first
            {
                let deadline = last + idle;
                if deadline > Instant::now() {
                    s.reset(deadline);
                    continue;
                }
            }
            let what = if *this.first {
                "no response body within the first-byte timeout"
            } else {
                "the response body stalled longer than the idle timeout"
            };
            this.sleep.set(None);
            return Poll::Ready(Some(Err(Box::new(
                Error::new(ErrorKind::Timeout, what).with_origin(Origin::Transport),
            ))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_http_upstream_gets_the_host_hyper_util_would_send() {
        let host = |url: &str| {
            Base::parse(url)
                .unwrap()
                .plain_http_host()
                .map(|v| v.to_str().unwrap().to_owned())
        };
        assert_eq!(
            host("http://relay.example").as_deref(),
            Some("relay.example")
        );
        assert_eq!(
            host("http://relay.example:80/p/").as_deref(),
            Some("relay.example")
        );
        assert_eq!(
            host("http://127.0.0.1:8788").as_deref(),
            Some("127.0.0.1:8788")
        );
        assert_eq!(host("http://[::1]:9000").as_deref(), Some("[::1]:9000"));
        // Over TLS the connection may be HTTP/2: hyper-util decides.
        assert_eq!(host("https://api.anthropic.com"), None);
        assert_eq!(host("https://relay.example:8443"), None);
    }

    #[test]
    fn joins_prefix_and_path() {
        let b = Base::parse("https://relay.example/anthropic/").unwrap();
        let u = b.join(&"/v1/messages?beta=true".parse().unwrap()).unwrap();
        assert_eq!(
            u.to_string(),
            "https://relay.example/anthropic/v1/messages?beta=true"
        );
        let b = Base::parse("http://127.0.0.1:8788").unwrap();
        let u = b
            .join(&"http://elsewhere/v1/models".parse().unwrap())
            .unwrap();
        assert_eq!(u.to_string(), "http://127.0.0.1:8788/v1/models");
        // No prefix: the path and query are kept as they are; an origin-form without a path
        // gets `/`.
        let u = b.join(&"/v1/messages?beta=true".parse().unwrap()).unwrap();
        assert_eq!(u.to_string(), "http://127.0.0.1:8788/v1/messages?beta=true");
        let u = b.join(&"http://elsewhere".parse().unwrap()).unwrap();
        assert_eq!(u.to_string(), "http://127.0.0.1:8788/");
        let b = Base::parse("http://127.0.0.1:8788/p").unwrap();
        let u = b.join(&"http://elsewhere".parse().unwrap()).unwrap();
        assert_eq!(u.to_string(), "http://127.0.0.1:8788/p/");
    }

    #[test]
    fn rejects_bad_base_urls() {
        for bad in ["", "api.anthropic.com", "ftp://x", "https://x/?q=1"] {
            let e = Base::parse(bad).err().unwrap();
            assert_eq!(e.kind(), ErrorKind::InvalidRequest, "{bad}");
            assert!(e.message().contains("base_url"));
        }
    }
}
