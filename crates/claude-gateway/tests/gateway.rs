//! The gateway end to end over real HTTP, with the in-process mock upstream.
#![allow(clippy::unwrap_used, clippy::many_single_char_names)]

use bytes::Bytes;
use claude_gateway::{Gateway, Options, format_hash};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

const BODY: &str = r#"{"model":"claude-sonnet-4-5","max_tokens":32,"messages":[{"role":"user","content":"hello"}]}"#;

async fn send(
    c: &HttpClient,
    gw: &Gateway,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (StatusCode, http::HeaderMap, Bytes) {
    let mut b = Request::builder()
        .method(method)
        .uri(format!("http://{}{path}", gw.addr()));
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let resp = c
        .request(b.body(Full::new(Bytes::from(body.to_owned()))).unwrap())
        .await
        .unwrap();
    let (parts, body) = resp.into_parts();
    (
        parts.status,
        parts.headers,
        body.collect().await.unwrap().to_bytes(),
    )
}

fn temp_config(text: &str) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!(
        "claude-gateway-test-{}-{}.toml",
        std::process::id(),
        blake3::hash(text.as_bytes()).to_hex()
    ));
    std::fs::write(&p, text).unwrap();
    p
}

/// `POST /v1/messages` to the gateway at `addr`, with one extra header.
fn post_messages(
    addr: std::net::SocketAddr,
    (name, value): (&str, &str),
    body: String,
) -> Request<Full<Bytes>> {
    Request::post(format!("http://{addr}/v1/messages"))
        .header(name, value)
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

/// A gateway on a free loopback port in front of its built-in mock, default configuration.
async fn mock_gateway() -> Gateway {
    Gateway::start(Options {
        mock: true,
        listen: Some("127.0.0.1:0".parse().unwrap()),
        ..Options::default()
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn mock_mode_relays_json_and_sse_and_serves_health() {
    let gw = mock_gateway().await;
    assert!(gw.loopback_only());
    let c = client();
    let (s, _, b) = send(
        &c,
        &gw,
        "POST",
        "/v1/messages",
        &[("content-type", "application/json")],
        BODY,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
    let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(v["type"], "message");
    assert!(v["usage"]["output_tokens"].as_u64().unwrap() > 0);

    let sse = BODY.replace("\"max_tokens\":32", "\"max_tokens\":32,\"stream\":true");
    let (s, h, b) = send(&c, &gw, "POST", "/v1/messages", &[], &sse).await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        h["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let text = String::from_utf8(b.to_vec()).unwrap();
    assert!(text.contains("event: message_start") && text.contains("event: message_stop"));

    let (s, _, b) = send(
        &c,
        &gw,
        "POST",
        "/v1/messages/count_tokens",
        &[],
        r#"{"model":"m","messages":[]}"#,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&b));

    // Other /v1 endpoints are relayed as they are (the mock lists models, and answers the
    // batches API it does not simulate with Anthropic's own 404 shape).
    let (s, _, b) = send(&c, &gw, "GET", "/v1/models", &[], "").await;
    assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
    assert!(String::from_utf8_lossy(&b).contains("\"data\""));
    let (s, _, b) = send(&c, &gw, "GET", "/v1/messages/batches", &[], "").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(String::from_utf8_lossy(&b).contains("not_found_error"));

    let (s, _, _) = send(&c, &gw, "GET", "/healthz", &[], "").await;
    assert_eq!(s, StatusCode::OK);
    let (s, _, _) = send(&c, &gw, "GET", "/readyz", &[], "").await;
    assert_eq!(s, StatusCode::OK, "the upstream key is loaded");
    let (s, _, m) = send(&c, &gw, "GET", "/metrics", &[], "").await;
    assert_eq!(s, StatusCode::OK);
    let m = String::from_utf8_lossy(&m);
    assert!(m.contains("claude_stack_overhead_seconds"), "{m}");
    // Every relayed request is counted (the layers keep their metric handles in the
    // gateway: claude_core::metric), not only the first.
    let overheads: f64 = m
        .lines()
        .find_map(|l| l.strip_prefix("claude_stack_overhead_seconds_count "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no overhead count: {m}"));
    assert!(overheads >= 5.0, "{overheads} overheads recorded: {m}");
    // A histogram with the documented buckets (Prometheus can add those across instances).
    assert!(
        m.contains("# TYPE claude_stack_overhead_seconds histogram"),
        "{m}"
    );
    for le in claude_gateway::HISTOGRAM_BUCKETS {
        assert!(
            m.contains(&format!(
                "claude_stack_overhead_seconds_bucket{{le=\"{le}\"}}"
            )),
            "bucket {le}: {m}"
        );
    }
    assert!(m.contains("claude_cost_requests_total"), "{m}");
    assert!(
        !m.contains("sk-ant-mock-gateway"),
        "no key in metric labels"
    );
    let (s, _, b) = send(&c, &gw, "GET", "/nope", &[], "").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(v["error"]["type"], "not_found_error");

    let stats = gw.mock().unwrap().stats();
    assert_eq!(stats.requests, 5, "only /v1 requests reach the upstream");
    let summary = gw.shutdown().await;
    assert_eq!(summary.requests, 5);
    assert!(summary.drained);
}

#[tokio::test]
async fn client_keys_map_to_tenants_and_bad_keys_get_anthropic_401() {
    let cfg = temp_config(&format!(
        "listen = \"127.0.0.1:0\"\n[[client_keys]]\nhash = \"{}\"\ntenant = \"team-a\"\n",
        format_hash("gw-key-a")
    ));
    let gw = Gateway::start(Options {
        mock: true,
        config_path: Some(cfg),
        ..Options::default()
    })
    .await
    .unwrap();
    let c = client();
    let (s, _, b) = send(
        &c,
        &gw,
        "POST",
        "/v1/messages",
        &[("x-api-key", "wrong")],
        BODY,
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "authentication_error");
    let (s, _, _) = send(&c, &gw, "POST", "/v1/messages", &[], BODY).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _, _) = send(
        &c,
        &gw,
        "POST",
        "/v1/messages",
        &[("authorization", "Bearer gw-key-a")],
        BODY,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _, _) = send(
        &c,
        &gw,
        "POST",
        "/v1/messages",
        &[("x-api-key", "gw-key-a")],
        BODY,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        gw.mock().unwrap().stats().requests,
        2,
        "refused requests never reach upstream"
    );
    let summary = gw.shutdown().await;
    assert_eq!(summary.unauthorized, 2);
}

#[tokio::test]
async fn oversized_body_is_refused_locally() {
    let cfg = temp_config("listen = \"127.0.0.1:0\"\nbody_limit = 100\n");
    let gw = Gateway::start(Options {
        mock: true,
        config_path: Some(cfg),
        ..Options::default()
    })
    .await
    .unwrap();
    let big = format!(
        r#"{{"model":"m","max_tokens":1,"messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(500)
    );
    let (s, h, b) = send(&client(), &gw, "POST", "/v1/messages", &[], &big).await;
    assert_eq!(
        s,
        StatusCode::PAYLOAD_TOO_LARGE,
        "{}",
        String::from_utf8_lossy(&b)
    );
    assert_eq!(h["x-claude-error-code"], "BODY_TOO_LARGE");
    assert_eq!(gw.mock().unwrap().stats().requests, 0);
    gw.shutdown().await;
}

#[tokio::test]
async fn refuses_public_listen_without_keys_and_names_bad_fields() {
    let err = Gateway::start(Options {
        listen: Some("0.0.0.0:0".parse().unwrap()),
        mock: true,
        ..Options::default()
    })
    .await
    .unwrap_err();
    assert!(err.to_string().contains("listen"), "{err}");
    let cfg = temp_config("listen = \"127.0.0.1:0\"\n[stack.client]\nconect_timeout = \"1s\"\n");
    let err = Gateway::start(Options {
        config_path: Some(cfg),
        mock: true,
        ..Options::default()
    })
    .await
    .unwrap_err();
    assert!(err.to_string().contains("conect_timeout"), "{err}");
    // No upstream key anywhere and no mock: refused at start, naming where to put one.
    let err = Gateway::start(Options {
        listen: Some("127.0.0.1:0".parse().unwrap()),
        ..Options::default()
    })
    .await
    .unwrap_err();
    assert!(err.to_string().contains("stack.secrets"), "{err}");
}

#[tokio::test]
async fn admin_costs_match_what_the_mock_served() {
    let gw = mock_gateway().await;
    let c = client();
    for (i, usage) in [
        "input=100,output=20",
        "input=7,output=3,cache_read=50,cache_write_5m=10",
    ]
    .iter()
    .enumerate()
    {
        let body = if i == 0 {
            BODY.to_owned()
        } else {
            BODY.replace("\"max_tokens\":32", "\"max_tokens\":32,\"stream\":true")
        };
        let (s, _, _) = send(
            &c,
            &gw,
            "POST",
            "/v1/messages",
            &[("x-mock-usage", usage)],
            &body,
        )
        .await;
        assert_eq!(s, StatusCode::OK);
    }
    let (s, _, b) = send(&c, &gw, "GET", "/admin/costs", &[], "").await;
    assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
    let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
    let served = gw.mock().unwrap().stats().usage;
    let total = &v["total"];
    assert_eq!(total["requests"], 2);
    assert_eq!(total["input_tokens"], served.input_tokens);
    assert_eq!(total["output_tokens"], served.output_tokens);
    assert_eq!(
        total["cache_creation_input_tokens"],
        served.cache_creation_input_tokens
    );
    assert_eq!(
        total["cache_read_input_tokens"],
        served.cache_read_input_tokens
    );
    // Sonnet 4.5: $3 in, $15 out, $3.75 5m write, $0.30 read per MTok:
    // (107×3 + 23×15 + 10×3.75 + 50×0.30) / 1e6 = $0.0007185
    assert_eq!(total["cost_usd"], "0.0007185");
    assert_eq!(v["by_tenant"]["default"]["requests"], 2);
    assert_eq!(
        v["by_model"]["claude-sonnet-4-5-20250929"]["cost_usd"], "0.0007185",
        "{v:#}"
    );
    let summary = gw.shutdown().await;
    assert_eq!(summary.costs.unwrap().output_tokens, 23);
}

#[tokio::test]
async fn admin_costs_need_the_admin_key_when_one_is_set() {
    let cfg = temp_config(&format!(
        "listen = \"127.0.0.1:0\"\nadmin_key_hash = \"{}\"\n",
        format_hash("admin-secret")
    ));
    let gw = Gateway::start(Options {
        mock: true,
        config_path: Some(cfg),
        ..Options::default()
    })
    .await
    .unwrap();
    let c = client();
    let (s, _, _) = send(&c, &gw, "GET", "/admin/costs", &[], "").await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _, _) = send(
        &c,
        &gw,
        "GET",
        "/admin/costs",
        &[("authorization", "Bearer nope")],
        "",
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _, b) = send(
        &c,
        &gw,
        "GET",
        "/admin/costs",
        &[("authorization", "Bearer admin-secret")],
        "",
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(v["total"]["requests"], 0);
    assert_eq!(v["total"]["cost_usd"], "0.00");
    gw.shutdown().await;
}

#[tokio::test]
async fn shutdown_lets_in_flight_requests_finish_then_refuses_new_ones() {
    let gw = mock_gateway().await;
    let addr = gw.addr();
    let c = client();
    let stream_body = BODY.replace("\"max_tokens\":32", "\"max_tokens\":32,\"stream\":true");
    let in_flight = tokio::spawn({
        let c = c.clone();
        async move {
            let req = post_messages(addr, ("x-mock-latency-ms", "300"), stream_body);
            let resp = c.request(req).await.unwrap();
            let status = resp.status();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            (status, String::from_utf8(body.to_vec()).unwrap())
        }
    });
    // Let the request reach the gateway, then stop it while the answer is pending.
    while gw.mock().unwrap().stats().in_flight == 0 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let summary = gw.shutdown().await;
    let (status, body) = in_flight.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert!(
        body.contains("event: message_stop"),
        "the in-flight stream finished whole"
    );
    assert!(summary.drained);
    assert_eq!(summary.requests, 1);
    let refused = tokio::net::TcpStream::connect(addr).await;
    assert!(
        refused.is_err(),
        "a stopped gateway accepts no new connections"
    );
}

/// A keep-alive connection that sits idle when the gateway stops is told to close (the
/// stop signal wakes a connection nobody is polling): the drain completes within the grace
/// period although the client still holds the connection in its pool.
#[tokio::test]
async fn shutdown_closes_idle_keep_alive_connections() {
    let gw = mock_gateway().await;
    let c = client();
    for _ in 0..2 {
        let (s, _, _) = send(
            &c,
            &gw,
            "POST",
            "/v1/messages",
            &[("content-type", "application/json")],
            BODY,
        )
        .await;
        assert_eq!(s, StatusCode::OK);
    }
    let summary = gw.shutdown().await;
    assert!(summary.drained, "the idle connection closed at the signal");
    assert_eq!(summary.requests, 2);
    drop(c);
}

/// Many requests at once on a multi-threaded runtime, over HTTP/1.1 keep-alive connections
/// and over one HTTP/2 connection (many streams on one connection future): every request gets
/// exactly one whole answer. This is the load under which connections wake themselves while
/// they are polled, and wakes arrive from other worker threads during a poll (the gateway
/// polls such a connection again at once rather than yielding).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_http1_and_http2_requests_each_get_one_whole_answer() {
    let gw = mock_gateway().await;
    let h1 = client();
    let h2: HttpClient = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let addr = gw.addr();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..200u32 {
        let c = if i % 2 == 0 { h1.clone() } else { h2.clone() };
        let stream = i % 4 < 2;
        // Distinct bodies: every request is a cache miss that reaches the mock.
        let body = BODY.replace(
            "\"hello\"",
            &format!("\"hello {i}\"{}", if stream { ",\"x\":1" } else { "" }),
        );
        let body = if stream {
            body.replace("\"max_tokens\":32", "\"max_tokens\":32,\"stream\":true")
        } else {
            body
        };
        tasks.spawn(async move {
            let req = post_messages(addr, ("content-type", "application/json"), body);
            let resp = c.request(req).await.unwrap();
            let version = resp.version();
            let status = resp.status();
            let bytes = resp.into_body().collect().await.unwrap().to_bytes();
            (i, stream, version, status, bytes)
        });
    }
    let mut seen = 0;
    while let Some(r) = tasks.join_next().await {
        let (i, stream, version, status, bytes) = r.unwrap();
        let text = String::from_utf8_lossy(&bytes);
        assert_eq!(status, StatusCode::OK, "request {i}: {text}");
        let expected = if i % 2 == 0 {
            http::Version::HTTP_11
        } else {
            http::Version::HTTP_2
        };
        assert_eq!(version, expected, "request {i}");
        if stream {
            assert_eq!(
                text.matches("event: message_start").count(),
                1,
                "{i}: {text}"
            );
            assert!(
                text.trim_end()
                    .ends_with("data: {\"type\":\"message_stop\"}"),
                "{i}: {text}"
            );
        } else {
            let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            assert!(
                v["usage"]["output_tokens"].as_u64().unwrap() > 0,
                "{i}: {text}"
            );
        }
        seen += 1;
    }
    assert_eq!(seen, 200);
    assert_eq!(
        gw.mock().unwrap().stats().requests,
        200,
        "each reached the upstream once"
    );
    let summary = gw.shutdown().await;
    assert_eq!(summary.requests, 200);
    assert!(summary.drained);
}

/// An upstream that answers every request with the names of the headers it received, as a
/// JSON array.
async fn header_echo() -> std::net::SocketAddr {
    use hyper::body::Incoming;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let names: Vec<&str> =
                        req.headers().keys().map(http::HeaderName::as_str).collect();
                    let body = serde_json::to_vec(&names).unwrap();
                    let resp = http::Response::builder()
                        .header("content-type", "application/json")
                        .header("keep-alive", "timeout=5")
                        .header("x-upstream", "kept")
                        .body(Full::new(Bytes::from(body)))
                        .unwrap();
                    Ok::<_, std::convert::Infallible>(resp)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn headers_of_the_callers_connection_do_not_travel_either_way() {
    let upstream = header_echo().await;
    let key = std::env::temp_dir().join(format!("claude-gateway-hop-key-{}", std::process::id()));
    std::fs::write(&key, "sk-ant-upstream-hop-test").unwrap();
    let cfg = temp_config(&format!(
        "listen = \"127.0.0.1:0\"\nupstream = \"http://{upstream}\"\n\n[stack]\ncache = false\nretry = false\ncost = false\n\n[stack.secrets.environments.test.default]\nsource = \"file\"\npath = \"{}\"\n",
        key.display()
    ));
    let gw = Gateway::start(Options {
        config_path: Some(cfg),
        ..Options::default()
    })
    .await
    .unwrap();
    let (status, headers, body) = send(
        &client(),
        &gw,
        "POST",
        "/v1/messages",
        &[
            ("connection", "keep-alive, X-Hop-Secret"),
            ("x-hop-secret", "for the gateway only"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("x-custom", "kept"),
        ],
        BODY,
    )
    .await;
    std::fs::remove_file(&key).ok();
    assert_eq!(status, StatusCode::OK, "{body:?}");
    let seen: Vec<String> = serde_json::from_slice(&body).unwrap();
    for hop in [
        "connection",
        "x-hop-secret",
        "keep-alive",
        "proxy-connection",
    ] {
        assert!(
            !seen.iter().any(|n| n == hop),
            "{hop} reached the upstream: {seen:?}"
        );
    }
    assert!(seen.iter().any(|n| n == "x-custom"), "{seen:?}");
    assert!(
        seen.iter().any(|n| n == "x-api-key"),
        "the upstream key: {seen:?}"
    );
    assert!(
        headers.get("keep-alive").is_none(),
        "the upstream's keep-alive reached the caller"
    );
    assert_eq!(headers["x-upstream"], "kept");
}
