//! Helpers shared by the integration tests: a hyper client behind the cache, requests to
//! claude-mock, and responses read frame by frame.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::time::Duration;

use bytes::Bytes;
use claude_cache::{Cache, CacheLayer, CacheStatus};
use claude_core::{FullBodyService, Tenant};
use claude_mock::MockServer;
use http::{Extensions, HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tower::{Service, ServiceExt};

pub type Upstream = FullBodyService<Client<HttpConnector, Full<Bytes>>>;
pub type Svc = Cache<Upstream>;

pub fn client() -> Upstream {
    FullBodyService::new(Client::builder(TokioExecutor::new()).build_http())
}

pub fn service(layer: &CacheLayer) -> Svc {
    tower::Layer::layer(layer, client())
}

/// A Messages body asking `question`.
pub fn body(question: &str) -> String {
    format!(
        r#"{{"model":"claude-sonnet-4-5","max_tokens":64,"messages":[{{"role":"user","content":"{question}"}}]}}"#
    )
}

/// A streaming Messages body asking `question`.
pub fn stream_body(question: &str) -> String {
    format!(
        r#"{{"model":"claude-sonnet-4-5","max_tokens":64,"stream":true,"messages":[{{"role":"user","content":"{question}"}}]}}"#
    )
}

/// `POST {mock}/v1/messages` with the version header and `body`.
pub fn post(mock: &MockServer, body: impl Into<Bytes>) -> Request<Bytes> {
    post_to(mock, "/v1/messages", body)
}

pub fn post_to(mock: &MockServer, path: &str, body: impl Into<Bytes>) -> Request<Bytes> {
    Request::post(format!("{}{path}", mock.url()))
        .header("anthropic-version", "2023-06-01")
        .header("content-type", "application/json")
        .body(body.into())
        .unwrap()
}

pub fn with_header(mut req: Request<Bytes>, name: &'static str, value: &str) -> Request<Bytes> {
    req.headers_mut()
        .append(name, http::HeaderValue::from_str(value).unwrap());
    req
}

pub fn for_tenant(mut req: Request<Bytes>, tenant: &str) -> Request<Bytes> {
    req.extensions_mut().insert(Tenant::new(tenant));
    req
}

/// A response read to its end (or to its first body error).
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub extensions: Extensions,
    pub frames: Vec<Bytes>,
    pub failed: bool,
}

impl Answer {
    pub fn body(&self) -> Bytes {
        self.frames.concat().into()
    }

    pub fn text(&self) -> String {
        String::from_utf8(self.body().to_vec()).unwrap()
    }

    pub fn cache(&self) -> &str {
        self.headers
            .get("x-claude-cache")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    pub fn status_ext(&self) -> Option<CacheStatus> {
        self.extensions.get::<CacheStatus>().copied()
    }

    /// The SSE events of the body (blocks separated by a blank line).
    pub fn events(&self) -> Vec<String> {
        self.text()
            .split("\n\n")
            .filter(|e| !e.is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// The message id of a JSON answer or of a stream's `message_start`.
    pub fn message_id(&self) -> String {
        let text = self.text();
        let i = text.find("\"id\":\"msg_").expect("an id");
        let rest = &text[i + 6..];
        rest[..rest.find('"').unwrap()].to_owned()
    }
}

pub async fn send(svc: &Svc, req: Request<Bytes>) -> Answer {
    let resp = svc.clone().oneshot(req).await.unwrap();
    read(resp).await
}

pub async fn read<B>(resp: http::Response<B>) -> Answer
where
    B: http_body::Body<Data = Bytes> + Unpin,
{
    let (parts, mut body) = resp.into_parts();
    let mut frames = Vec::new();
    let mut failed = false;
    while let Some(frame) = body.frame().await {
        let Ok(f) = frame else {
            failed = true;
            break;
        };
        if let Ok(d) = f.into_data() {
            frames.push(d);
        }
    }
    Answer {
        status: parts.status,
        headers: parts.headers,
        extensions: parts.extensions,
        frames,
        failed,
    }
}

/// Requests that reached the mock on `path`.
pub fn upstream_count(mock: &MockServer, path: &str) -> u64 {
    mock.stats().by_path.get(path).copied().unwrap_or(0)
}

/// Requests that reached the mock on `/v1/messages`.
pub fn upstream(mock: &MockServer) -> u64 {
    upstream_count(mock, "/v1/messages")
}

/// Waits (at most 10 s) until `f` holds; panics otherwise.
pub async fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..1000 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

/// Calls the service once, ready or not (for use with `ServiceExt`).
pub async fn call(
    svc: &mut Svc,
    req: Request<Bytes>,
) -> http::Response<claude_cache::ResponseBody<hyper::body::Incoming>> {
    svc.ready().await.unwrap().call(req).await.unwrap()
}
