//! `HttpClient` over real HTTP on loopback: what reaches the upstream.
#![allow(clippy::unwrap_used)]

use std::convert::Infallible;

use bytes::Bytes;
use claude_stack::{ClientConfig, HttpClient};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tower::ServiceExt;

/// An upstream that answers with what it received: method, path, headers, body length.
async fn echo_server() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let svc = service_fn(|req: Request<Incoming>| async move {
                    let (parts, body) = req.into_parts();
                    let body = body.collect().await.unwrap().to_bytes();
                    let headers: serde_json::Map<String, serde_json::Value> = parts
                        .headers
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").into()))
                        .collect();
                    let out = serde_json::json!({
                        "path": parts.uri.path_and_query().map(http::uri::PathAndQuery::as_str),
                        "headers": headers,
                        "body_len": body.len(),
                    });
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(out.to_string()))))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn relays_to_base_url_with_prefix_and_sane_headers() {
    let addr = echo_server().await;
    let client = HttpClient::new(&ClientConfig {
        base_url: format!("http://{addr}/relay/anthropic/"),
        ..ClientConfig::default()
    })
    .unwrap();
    let req = Request::post("/v1/messages?beta=true")
        .header("host", "gateway.local:8787")
        .header("accept-encoding", "gzip, br")
        .header("x-custom", "kept")
        .header("te", "trailers")
        .header("keep-alive", "timeout=5")
        .header("proxy-connection", "keep-alive")
        .header("proxy-authorization", "Basic dXNlcjpwYXNz")
        .body(Bytes::from_static(b"{\"model\":\"m\"}"))
        .unwrap();
    let resp = client.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let v: serde_json::Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(v["path"], "/relay/anthropic/v1/messages?beta=true");
    assert_eq!(v["headers"]["anthropic-version"], "2023-06-01");
    assert_eq!(v["headers"]["accept-encoding"], "identity");
    assert_eq!(v["headers"]["host"], addr.to_string());
    assert_eq!(v["headers"]["x-custom"], "kept");
    for hop in [
        "te",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
    ] {
        assert!(v["headers"].get(hop).is_none(), "{hop} travelled upstream");
    }
    assert_eq!(v["body_len"], 13);

    // A caller's own anthropic-version is kept.
    let req = Request::get("/v1/models")
        .header("anthropic-version", "2099-01-01")
        .body(Bytes::new())
        .unwrap();
    let resp = client.oneshot(req).await.unwrap();
    let v: serde_json::Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(v["headers"]["anthropic-version"], "2099-01-01");
}

/// The version of the caller's request belongs to the caller's hop: a request that reached
/// a gateway over HTTP/2 (or HTTP/1.0) is sent upstream on whatever connection the client has
/// (here HTTP/1.1), not refused by the connection pool.
#[tokio::test]
async fn callers_http_version_does_not_travel_upstream() {
    let addr = echo_server().await;
    let client = HttpClient::new(&ClientConfig {
        base_url: format!("http://{addr}"),
        ..ClientConfig::default()
    })
    .unwrap();
    for version in [
        http::Version::HTTP_2,
        http::Version::HTTP_10,
        http::Version::HTTP_11,
    ] {
        let req = Request::post("/v1/messages")
            .version(version)
            .body(Bytes::from_static(b"{}"))
            .unwrap();
        let resp = client.clone().oneshot(req).await.unwrap_or_else(|e| {
            panic!("{version:?}: {e:?}");
        });
        assert_eq!(resp.status(), 200, "{version:?}");
        assert_eq!(resp.version(), http::Version::HTTP_11, "{version:?}");
    }
}

#[tokio::test]
async fn connection_refused_is_a_classified_connection_error() {
    // Bind then drop to get a port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let client = HttpClient::new(&ClientConfig {
        base_url: format!("http://127.0.0.1:{port}"),
        ..ClientConfig::default()
    })
    .unwrap();
    let err = client
        .oneshot(Request::get("/v1/models").body(Bytes::new()).unwrap())
        .await
        .unwrap_err();
    let class = claude_core::classify_error(err.as_ref());
    assert_eq!(class.kind, claude_core::ErrorKind::Connection);
    assert!(class.retryable);
}

#[tokio::test]
async fn https_client_uses_its_own_crypto_provider_and_installs_none() {
    // Building a TLS client must not need (or install) a process-wide rustls provider, so
    // an application that enables a second provider elsewhere cannot make it panic.
    let client = HttpClient::new(&ClientConfig {
        base_url: "https://api.anthropic.com".into(),
        ..ClientConfig::default()
    });
    assert!(client.is_ok());
    assert!(rustls::crypto::CryptoProvider::get_default().is_none());
}

#[tokio::test]
async fn claude_client_relays_through_the_whole_stack() {
    let mock = claude_mock::MockServer::start().await.unwrap();
    let config = claude_stack::StackConfig::default().with_base_url(mock.url());
    let client = claude_stack::ClaudeClient::new(config).unwrap();
    let req = Request::post("/v1/messages")
        .header("x-mock-fault", "529,ok")
        .header("x-mock-usage", "input=10,output=2")
        .body(Bytes::from_static(
            br#"{"model":"claude-haiku-4-5","max_tokens":8,"messages":[{"role":"user","content":"hi"}]}"#,
        ))
        .unwrap();
    let resp = client.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let _ = resp.into_body().collect().await.unwrap();
    assert_eq!(mock.stats().requests, 2, "the 529 was retried");
    let total = client.stack().cost_tracker().unwrap().total();
    assert_eq!(
        (total.requests, total.input_tokens, total.output_tokens),
        (1, 10, 2)
    );
}
