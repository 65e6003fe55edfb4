//! claude-mock over real HTTP: answers, streams, auth, validation, faults, limits, stats.

// The helpers panic on a malformed answer: that is a test failure.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use claude_mock::{FaultPlan, Limits, MockServer, Stats, estimate_input_tokens};
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type TestResult = Result<(), BoxError>;

const BODY: &str = r#"{"model":"claude-sonnet-4-5","max_tokens":100,"messages":[{"role":"user","content":"Hello"}]}"#;
const STREAM_BODY: &str = r#"{"model":"claude-sonnet-4-5","max_tokens":100,"stream":true,"messages":[{"role":"user","content":"Hello"}]}"#;
/// ceil(35 / 4): `[{"role":"user","content":"Hello"}]` is 35 bytes.
const BODY_INPUT_TOKENS: u64 = 9;

fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

fn h2_client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

fn request(
    mock: &MockServer,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Request<Full<Bytes>> {
    let mut builder = Request::builder()
        .method(method)
        .uri(format!("{}{path}", mock.url()))
        .header("content-type", "application/json");
    let has = |name: &str| headers.iter().any(|(n, _)| n.eq_ignore_ascii_case(name));
    if !has("anthropic-version") && !has("x-no-version") {
        builder = builder.header("anthropic-version", "2023-06-01");
    }
    for (name, value) in headers {
        if *name != "x-no-version" {
            builder = builder.header(*name, *value);
        }
    }
    builder
        .body(Full::new(Bytes::copy_from_slice(body.as_bytes())))
        .unwrap()
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn text(&self) -> &str {
        std::str::from_utf8(&self.body).unwrap()
    }
}

async fn send(
    client: &Client<HttpConnector, Full<Bytes>>,
    request: Request<Full<Bytes>>,
) -> Result<Answer, BoxError> {
    let response = client.request(request).await?;
    let (parts, body) = response.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok(Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}

async fn post(mock: &MockServer, headers: &[(&str, &str)], body: &str) -> Result<Answer, BoxError> {
    send(
        &client(),
        request(mock, "POST", "/v1/messages", headers, body),
    )
    .await
}

/// The `(event, data)` pairs of an SSE body.
fn parse_events(body: &str) -> Vec<(String, Value)> {
    body.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            let mut lines = e.lines();
            let event = lines.next().unwrap().strip_prefix("event: ").unwrap();
            let data = lines.next().unwrap().strip_prefix("data: ").unwrap();
            assert!(lines.next().is_none(), "extra line in {e:?}");
            (event.to_owned(), serde_json::from_str(data).unwrap())
        })
        .collect()
}

fn names(events: &[(String, Value)]) -> Vec<&str> {
    events.iter().map(|(n, _)| n.as_str()).collect()
}

fn assert_error(answer: &Answer, status: u16, error_type: &str) {
    assert_eq!(answer.status, status, "{}", answer.text());
    let v = answer.json();
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], error_type, "{v}");
    assert!(v["error"]["message"].is_string());
    let request_id = answer.header("request-id").unwrap();
    assert!(request_id.starts_with("req_mock_"));
    assert_eq!(v["request_id"], request_id);
    assert_eq!(answer.header("content-type"), Some("application/json"));
}

async fn wait_idle(mock: &MockServer) -> Stats {
    for _ in 0..200 {
        let stats = mock.stats();
        if stats.in_flight == 0 {
            return stats;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("requests still in flight: {:?}", mock.stats());
}

/// Writes a raw HTTP/1.1 request and returns the stream.
async fn raw(mock: &MockServer, head: &str, body: &str) -> Result<TcpStream, BoxError> {
    let mut tcp = TcpStream::connect(mock.addr()).await?;
    tcp.write_all(head.as_bytes()).await?;
    tcp.write_all(body.as_bytes()).await?;
    Ok(tcp)
}

fn raw_post(path: &str, extra: &str, body: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nhost: mock\r\nanthropic-version: 2023-06-01\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n{extra}\r\n",
        body.len()
    )
}

/// Reads until the peer closes (or resets) the connection.
async fn read_all(tcp: &mut TcpStream) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match tcp.read(&mut buf).await {
            Ok(0) => return (out, true),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(_) => return (out, false),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Answers

#[tokio::test]
async fn json_answer() -> TestResult {
    let mock = MockServer::start().await?;
    let answer = post(&mock, &[], BODY).await?;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("content-type"), Some("application/json"));
    assert_eq!(
        answer.header("content-length"),
        Some(answer.body.len().to_string().as_str())
    );
    let v = answer.json();
    let request_id = answer.header("request-id").unwrap();
    let n = request_id.strip_prefix("req_mock_").unwrap();
    assert_eq!(v["id"], format!("msg_mock_{n}"));
    assert_eq!(v["type"], "message");
    assert_eq!(v["role"], "assistant");
    assert_eq!(v["model"], "claude-sonnet-4-5");
    assert_eq!(v["content"][0]["type"], "text");
    let text = v["content"][0]["text"].as_str().unwrap();
    assert_eq!(text.split(' ').count(), 12);
    assert!(text.starts_with("Lorem ipsum dolor"));
    assert_eq!(v["stop_reason"], "end_turn");
    assert_eq!(v["stop_sequence"], Value::Null);
    let usage = &v["usage"];
    assert_eq!(usage["input_tokens"], BODY_INPUT_TOKENS);
    assert_eq!(usage["output_tokens"], 12);
    assert_eq!(usage["cache_creation_input_tokens"], 0);
    assert_eq!(usage["cache_read_input_tokens"], 0);
    assert_eq!(usage["cache_creation"]["ephemeral_5m_input_tokens"], 0);
    assert_eq!(usage["cache_creation"]["ephemeral_1h_input_tokens"], 0);
    assert_eq!(
        estimate_input_tokens(BODY.as_bytes()),
        Some(BODY_INPUT_TOKENS)
    );

    // The estimate counts system, messages and tools, byte for byte.
    let body = r#"{"model":"m","max_tokens":5,"system":"You are terse.","tools":[{"name":"t"}],"messages":[]}"#;
    // "You are terse." = 16 bytes, [{"name":"t"}] = 14, [] = 2: 32 bytes -> 8 tokens.
    let v = post(&mock, &[], body).await?.json();
    assert_eq!(v["usage"]["input_tokens"], 8);
    // No rate-limit headers without limits.
    assert!(
        answer
            .header("anthropic-ratelimit-requests-limit")
            .is_none()
    );
    Ok(())
}

#[tokio::test]
async fn output_length_and_stop_reason() -> TestResult {
    let mock = MockServer::builder().output_tokens(20).start().await?;
    let capped = r#"{"model":"m","max_tokens":5,"messages":[]}"#;
    let v = post(&mock, &[], capped).await?.json();
    assert_eq!(v["usage"]["output_tokens"], 5);
    assert_eq!(v["stop_reason"], "max_tokens");
    assert_eq!(v["content"][0]["text"], "Lorem ipsum dolor sit amet");
    let v = post(&mock, &[("x-mock-output-tokens", "3")], capped)
        .await?
        .json();
    assert_eq!(v["usage"]["output_tokens"], 3);
    assert_eq!(v["stop_reason"], "end_turn");
    let v = post(&mock, &[], BODY).await?.json();
    assert_eq!(v["usage"]["output_tokens"], 20);
    assert_eq!(v["stop_reason"], "end_turn");
    Ok(())
}

#[tokio::test]
async fn sse_sequence_and_usage() -> TestResult {
    let mock = MockServer::builder().output_tokens(4).start().await?;
    let response = client()
        .request(request(&mock, "POST", "/v1/messages", &[], STREAM_BODY))
        .await?;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers().get("content-type").unwrap(),
        "text/event-stream"
    );
    assert!(response.headers().get("request-id").is_some());
    // Read frame by frame: each event is its own frame.
    let mut body = response.into_body();
    let mut frames = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            frames.push(data);
        }
    }
    assert!(frames.len() > 1, "a stream must arrive in several frames");
    let text: String = frames
        .iter()
        .map(|f| std::str::from_utf8(f).unwrap())
        .collect();
    let events = parse_events(&text);
    assert_eq!(
        names(&events),
        [
            "message_start",
            "content_block_start",
            "ping",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ]
    );
    let start = &events[0].1;
    assert_eq!(start["type"], "message_start");
    assert_eq!(start["message"]["content"], Value::Array(vec![]));
    assert_eq!(start["message"]["model"], "claude-sonnet-4-5");
    let usage = &start["message"]["usage"];
    assert_eq!(usage["input_tokens"], BODY_INPUT_TOKENS);
    assert_eq!(usage["output_tokens"], 1);
    assert_eq!(usage["cache_creation_input_tokens"], 0);
    assert_eq!(usage["cache_read_input_tokens"], 0);
    assert_eq!(usage["cache_creation"]["ephemeral_5m_input_tokens"], 0);
    assert_eq!(usage["cache_creation"]["ephemeral_1h_input_tokens"], 0);
    assert_eq!(events[1].1["index"], 0);
    assert_eq!(events[1].1["content_block"]["type"], "text");
    let streamed: String = events[3..7]
        .iter()
        .map(|(_, d)| {
            assert_eq!(d["delta"]["type"], "text_delta");
            d["delta"]["text"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(streamed, "Lorem ipsum dolor sit");
    let delta = &events[8].1;
    assert_eq!(delta["delta"]["stop_reason"], "end_turn");
    assert_eq!(delta["delta"]["stop_sequence"], Value::Null);
    assert_eq!(delta["usage"]["output_tokens"], 4);
    assert_eq!(delta["usage"]["input_tokens"], BODY_INPUT_TOKENS);
    assert_eq!(delta["usage"]["cache_read_input_tokens"], 0);
    assert_eq!(delta["usage"]["cache_creation_input_tokens"], 0);

    // The same request without stream has the same text.
    let v = post(&mock, &[], BODY).await?.json();
    assert_eq!(v["content"][0]["text"], "Lorem ipsum dolor sit");

    let stats = wait_idle(&mock).await;
    assert_eq!(stats.usage.input_tokens, 2 * BODY_INPUT_TOKENS);
    assert_eq!(stats.usage.output_tokens, 8);
    Ok(())
}

#[tokio::test]
async fn token_latency_spreads_the_stream() -> TestResult {
    let mock = MockServer::builder()
        .output_tokens(5)
        .first_byte_latency(Duration::from_millis(50))
        .token_latency(Duration::from_millis(30))
        .start()
        .await?;
    let started = Instant::now();
    let response = client()
        .request(request(&mock, "POST", "/v1/messages", &[], STREAM_BODY))
        .await?;
    let head_after = started.elapsed();
    assert!(head_after >= Duration::from_millis(50), "{head_after:?}");
    response.into_body().collect().await?;
    let total = started.elapsed();
    assert!(total >= Duration::from_millis(50 + 5 * 30), "{total:?}");

    // A JSON answer waits for its whole generation before its head.
    let started = Instant::now();
    post(&mock, &[("x-mock-latency-ms", "40")], BODY).await?;
    assert!(started.elapsed() >= Duration::from_millis(40 + 50 + 5 * 30));
    Ok(())
}

#[tokio::test]
async fn h2c_answers_json_and_sse() -> TestResult {
    let mock = MockServer::builder().output_tokens(3).start().await?;
    let client = h2_client();
    let answer = send(&client, request(&mock, "POST", "/v1/messages", &[], BODY)).await?;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.json()["usage"]["output_tokens"], 3);
    let answer = send(
        &client,
        request(&mock, "POST", "/v1/messages", &[], STREAM_BODY),
    )
    .await?;
    assert_eq!(names(&parse_events(answer.text())).len(), 9);
    let stats = wait_idle(&mock).await;
    assert_eq!(stats.by_status["200"], 2);
    assert_eq!(stats.usage.output_tokens, 6);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Auth and validation

#[tokio::test]
async fn auth_and_key_rotation() -> TestResult {
    let mock = MockServer::builder()
        .api_key("sk-test-1")
        .api_key("sk-test-2")
        .start()
        .await?;
    let missing = post(&mock, &[], BODY).await?;
    assert_error(&missing, 401, "authentication_error");
    assert_eq!(missing.json()["error"]["message"], "invalid x-api-key");
    assert_error(
        &post(&mock, &[("x-api-key", "sk-wrong")], BODY).await?,
        401,
        "authentication_error",
    );
    assert_eq!(
        post(&mock, &[("x-api-key", "sk-test-1")], BODY)
            .await?
            .status,
        200
    );
    assert_eq!(
        post(&mock, &[("x-api-key", "sk-test-2")], BODY)
            .await?
            .status,
        200
    );
    assert_eq!(
        post(&mock, &[("authorization", "Bearer sk-test-1")], BODY)
            .await?
            .status,
        200
    );
    assert_eq!(
        post(&mock, &[("authorization", "sk-test-1")], BODY)
            .await?
            .status,
        401
    );

    mock.set_api_keys(["sk-new"]);
    assert_eq!(
        post(&mock, &[("x-api-key", "sk-test-1")], BODY)
            .await?
            .status,
        401
    );
    assert_eq!(
        post(&mock, &[("x-api-key", "sk-new")], BODY).await?.status,
        200
    );

    mock.set_api_keys(Vec::<String>::new());
    assert_eq!(post(&mock, &[], BODY).await?.status, 200);
    let stats = mock.stats();
    assert_eq!(stats.by_status["401"], 4);
    assert_eq!(stats.by_status["200"], 5);
    Ok(())
}

#[tokio::test]
async fn missing_version_and_bad_bodies() -> TestResult {
    let mock = MockServer::start().await?;
    let answer = post(&mock, &[("x-no-version", "1")], BODY).await?;
    assert_error(&answer, 400, "invalid_request_error");
    assert!(
        answer.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("anthropic-version")
    );

    for (body, needle) in [
        ("{not json", "JSON"),
        ("[1,2]", "JSON object"),
        (r#"{"max_tokens":5,"messages":[]}"#, "model"),
        (r#"{"model":"m","messages":[]}"#, "max_tokens"),
        (
            r#"{"model":"m","max_tokens":-1,"messages":[]}"#,
            "max_tokens",
        ),
        (r#"{"model":"m","max_tokens":5}"#, "messages"),
        (
            r#"{"model":"m","max_tokens":5,"messages":"hi"}"#,
            "messages",
        ),
        (
            r#"{"model":"m","max_tokens":5,"messages":[],"stream":1}"#,
            "stream",
        ),
    ] {
        let answer = post(&mock, &[], body).await?;
        assert_error(&answer, 400, "invalid_request_error");
        let message = answer.json()["error"]["message"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(message.contains(needle), "{body}: {message}");
    }

    for (name, value) in [
        ("x-mock-fault", "429,maybe"),
        ("x-mock-usage", "input=lots"),
        ("x-mock-latency-ms", "soon"),
        ("x-mock-frobnicate", "1"),
    ] {
        let answer = post(&mock, &[(name, value)], BODY).await?;
        assert_error(&answer, 400, "invalid_request_error");
        let message = answer.json()["error"]["message"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(message.contains(name), "{message}");
    }
    Ok(())
}

#[tokio::test]
async fn oversize_body_is_413() -> TestResult {
    let mock = MockServer::start().await?;
    let head = format!(
        "POST /v1/messages HTTP/1.1\r\nhost: mock\r\nanthropic-version: 2023-06-01\r\n\
         content-type: application/json\r\nconnection: close\r\ncontent-length: {}\r\n\r\n",
        claude_mock::MAX_BODY_BYTES + 1
    );
    let mut tcp = raw(&mock, &head, "").await?;
    let (bytes, _) = read_all(&mut tcp).await;
    let text = String::from_utf8_lossy(&bytes);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(text.contains("\"request_too_large\""), "{text}");
    assert_eq!(mock.stats().by_status["413"], 1);
    Ok(())
}

#[tokio::test]
async fn not_found_and_wrong_method() -> TestResult {
    let mock = MockServer::start().await?;
    let c = client();
    let answer = send(&c, request(&mock, "GET", "/nope", &[], "")).await?;
    assert_error(&answer, 404, "not_found_error");
    let answer = send(&c, request(&mock, "POST", "/v1/nope", &[], BODY)).await?;
    assert_error(&answer, 404, "not_found_error");
    let answer = send(&c, request(&mock, "GET", "/v1/messages", &[], "")).await?;
    assert_error(&answer, 405, "invalid_request_error");
    assert_eq!(answer.header("allow"), Some("POST"));
    let stats = mock.stats();
    // /nope is outside /v1: not counted.
    assert_eq!(stats.requests, 2);
    assert_eq!(stats.by_path["/v1/nope"], 1);
    assert_eq!(stats.by_status["404"], 1);
    assert_eq!(stats.by_status["405"], 1);
    Ok(())
}

#[tokio::test]
async fn models_list() -> TestResult {
    let mock = MockServer::start().await?;
    let c = client();
    let v = send(&c, request(&mock, "GET", "/v1/models", &[], ""))
        .await?
        .json();
    assert_eq!(v["data"][0]["type"], "model");
    assert_eq!(v["data"][0]["id"], "claude-sonnet-4-5-20250929");
    assert_eq!(v["has_more"], false);
    assert_eq!(v["first_id"], "claude-sonnet-4-5-20250929");
    assert_eq!(v["last_id"], v["data"][2]["id"]);
    let one = send(
        &c,
        request(&mock, "GET", "/v1/models/claude-opus-4-5-20251101", &[], ""),
    )
    .await?;
    assert_eq!(one.json()["id"], "claude-opus-4-5-20251101");
    let missing = send(&c, request(&mock, "GET", "/v1/models/claude-9", &[], "")).await?;
    assert_error(&missing, 404, "not_found_error");
    Ok(())
}

#[tokio::test]
async fn count_tokens_counts_but_charges_nothing() -> TestResult {
    let mock = MockServer::builder().rpm(1).itpm(10).start().await?;
    let c = client();
    let body =
        r#"{"model":"m","system":"0123456789","messages":[{"role":"user","content":"Hello"}]}"#;
    // "0123456789" = 12 bytes + 35 bytes = 47 -> 12 tokens (more than the ITPM limit).
    for _ in 0..3 {
        let answer = send(
            &c,
            request(&mock, "POST", "/v1/messages/count_tokens", &[], body),
        )
        .await?;
        assert_eq!(answer.status, 200);
        assert_eq!(answer.json(), serde_json::json!({"input_tokens": 12}));
    }
    let scripted = send(
        &c,
        request(
            &mock,
            "POST",
            "/v1/messages/count_tokens",
            &[("x-mock-usage", "input=777")],
            body,
        ),
    )
    .await?;
    assert_eq!(scripted.json(), serde_json::json!({"input_tokens": 777}));
    let bad = send(
        &c,
        request(
            &mock,
            "POST",
            "/v1/messages/count_tokens",
            &[],
            r#"{"model":"m"}"#,
        ),
    )
    .await?;
    assert_error(&bad, 400, "invalid_request_error");
    // The limits are untouched: one message still fits.
    assert_eq!(post(&mock, &[], BODY).await?.status, 200);
    let stats = mock.stats();
    assert_eq!(stats.by_path["/v1/messages/count_tokens"], 5);
    assert_eq!(stats.usage.input_tokens, BODY_INPUT_TOKENS);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Faults

#[tokio::test]
async fn fault_sequence_per_key_and_per_body() -> TestResult {
    let mock = MockServer::start().await?;
    let fault = ("x-mock-fault", "429,529,ok");
    let a = [fault, ("x-mock-key", "a")];
    assert_error(&post(&mock, &a, BODY).await?, 429, "rate_limit_error");
    let overloaded = post(&mock, &a, BODY).await?;
    assert_error(&overloaded, 529, "overloaded_error");
    assert_eq!(overloaded.json()["error"]["message"], "Overloaded");
    assert!(overloaded.header("retry-after").is_none());
    assert_eq!(post(&mock, &a, BODY).await?.status, 200);
    assert_eq!(
        post(&mock, &a, BODY).await?.status,
        200,
        "the last entry repeats"
    );
    // The key counts attempts, whatever the body.
    let b = [fault, ("x-mock-key", "b")];
    assert_eq!(post(&mock, &b, BODY).await?.status, 429);
    assert_eq!(post(&mock, &b, STREAM_BODY).await?.status, 529);

    // Without a key: per spec + path + body.
    assert_eq!(post(&mock, &[fault], BODY).await?.status, 429);
    assert_eq!(post(&mock, &[fault], STREAM_BODY).await?.status, 429);
    assert_eq!(post(&mock, &[fault], BODY).await?.status, 529);
    assert_eq!(
        post(&mock, &[("x-mock-fault", "429, 529, ok")], BODY)
            .await?
            .status,
        429
    );

    // A reset forgets the attempts.
    mock.reset_stats();
    assert_eq!(post(&mock, &a, BODY).await?.status, 429);
    Ok(())
}

#[tokio::test]
async fn last_entry_repeats_and_status_types() -> TestResult {
    let mock = MockServer::start().await?;
    for _ in 0..3 {
        assert_error(
            &post(&mock, &[("x-mock-fault", "500")], BODY).await?,
            500,
            "api_error",
        );
    }
    for (status, error_type) in [
        ("400", "invalid_request_error"),
        ("401", "authentication_error"),
        ("402", "billing_error"),
        ("403", "permission_error"),
        ("404", "not_found_error"),
        ("409", "conflict_error"),
        ("413", "request_too_large"),
        ("503", "api_error"),
        ("504", "timeout_error"),
    ] {
        let answer = post(&mock, &[("x-mock-fault", status)], BODY).await?;
        assert_error(&answer, status.parse()?, error_type);
    }
    assert_eq!(mock.stats().by_status["500"], 3);
    assert_eq!(mock.stats().usage.output_tokens, 0, "errors have no usage");
    Ok(())
}

#[tokio::test]
async fn retry_headers_only_when_scripted() -> TestResult {
    let mock = MockServer::start().await?;
    let answer = post(
        &mock,
        &[
            ("x-mock-fault", "529"),
            ("x-mock-retry-after", "3"),
            ("x-mock-retry-after-ms", "2500"),
            ("x-mock-should-retry", "false"),
        ],
        BODY,
    )
    .await?;
    assert_error(&answer, 529, "overloaded_error");
    assert_eq!(answer.header("retry-after"), Some("3"));
    assert_eq!(answer.header("retry-after-ms"), Some("2500"));
    assert_eq!(answer.header("x-should-retry"), Some("false"));

    let answer = post(&mock, &[("x-mock-fault", "429")], BODY).await?;
    assert_error(&answer, 429, "rate_limit_error");
    assert!(answer.header("retry-after").is_none());
    assert!(answer.header("retry-after-ms").is_none());
    assert!(answer.header("x-should-retry").is_none());

    // A scripted error waits for x-mock-latency-ms too.
    let started = Instant::now();
    let slow = post(
        &mock,
        &[("x-mock-fault", "529"), ("x-mock-latency-ms", "120")],
        BODY,
    )
    .await?;
    assert_eq!(slow.status, 529);
    assert!(started.elapsed() >= Duration::from_millis(120));

    let date = "Wed, 21 Oct 2037 07:28:00 GMT";
    let answer = post(
        &mock,
        &[("x-mock-fault", "503"), ("x-mock-retry-after", date)],
        BODY,
    )
    .await?;
    assert_eq!(answer.header("retry-after"), Some(date));

    // Success responses never carry them.
    let answer = post(&mock, &[("x-mock-retry-after", "3")], BODY).await?;
    assert_eq!(answer.status, 200);
    assert!(answer.header("retry-after").is_none());
    Ok(())
}

#[tokio::test]
async fn spend_cap() -> TestResult {
    let mock = MockServer::start().await?;
    let answer = post(
        &mock,
        &[("x-mock-fault", "spendcap"), ("x-mock-retry-after", "5")],
        BODY,
    )
    .await?;
    assert_error(&answer, 429, "rate_limit_error");
    assert_eq!(
        answer.json()["error"]["details"]["error_code"],
        "enforced_spend_limit_reached"
    );
    assert!(answer.header("retry-after").is_none());
    assert_eq!(
        mock.stats().rate_limited,
        0,
        "scripted 429s are not rate limiting"
    );
    Ok(())
}

#[tokio::test]
async fn reset_closes_without_response() -> TestResult {
    let mock = MockServer::start().await?;
    let c = client();
    let result = c
        .request(request(
            &mock,
            "POST",
            "/v1/messages",
            &[("x-mock-fault", "reset")],
            BODY,
        ))
        .await;
    assert!(result.is_err(), "a reset must be a connection error");

    // Raw: the server closes without writing a byte.
    let mut tcp = raw(
        &mock,
        &raw_post("/v1/messages", "x-mock-fault: reset\r\n", BODY),
        BODY,
    )
    .await?;
    let (bytes, _) = read_all(&mut tcp).await;
    assert!(bytes.is_empty(), "{}", String::from_utf8_lossy(&bytes));

    // reset,ok: the retry succeeds.
    let headers = [("x-mock-fault", "reset,ok"), ("x-mock-key", "r")];
    assert!(
        c.request(request(&mock, "POST", "/v1/messages", &headers, BODY))
            .await
            .is_err()
    );
    assert_eq!(
        send(&c, request(&mock, "POST", "/v1/messages", &headers, BODY))
            .await?
            .status,
        200
    );

    let stats = wait_idle(&mock).await;
    assert_eq!(stats.requests, 4);
    assert_eq!(stats.by_status["reset"], 3);
    assert_eq!(stats.by_status["200"], 1);
    Ok(())
}

#[tokio::test]
async fn reset_after_cuts_json_body() -> TestResult {
    let mock = MockServer::start().await?;
    let response = client()
        .request(request(
            &mock,
            "POST",
            "/v1/messages",
            &[("x-mock-reset-after", "20")],
            BODY,
        ))
        .await?;
    assert_eq!(response.status(), 200);
    let declared: usize = response.headers()["content-length"].to_str()?.parse()?;
    assert!(declared > 20);
    let mut body = response.into_body();
    let mut received = 0;
    let error = loop {
        match body.frame().await {
            Some(Ok(frame)) => received += frame.into_data().map_or(0, |d| d.len()),
            Some(Err(e)) => break Some(e),
            None => break None,
        }
    };
    assert!(
        error.is_some(),
        "the body must end with an error, not cleanly"
    );
    assert_eq!(received, 20);

    // Raw: exactly 20 body bytes, then the connection closes.
    let mut tcp = raw(
        &mock,
        &raw_post("/v1/messages", "x-mock-reset-after: 20\r\n", BODY),
        BODY,
    )
    .await?;
    let (bytes, _) = read_all(&mut tcp).await;
    let text = String::from_utf8_lossy(&bytes);
    let (_, body) = text.split_once("\r\n\r\n").unwrap();
    assert_eq!(body.len(), 20, "{text}");

    let stats = wait_idle(&mock).await;
    assert_eq!(
        stats.usage.output_tokens, 0,
        "a cut JSON answer has no readable usage"
    );
    assert_eq!(stats.usage.input_tokens, 0);
    Ok(())
}

#[tokio::test]
async fn reset_after_cuts_stream() -> TestResult {
    let mock = MockServer::builder().output_tokens(6).start().await?;
    // Find the length of message_start from a complete stream.
    let full = post(&mock, &[], STREAM_BODY).await?;
    let start_len = full.text().find("event: content_block_start").unwrap();
    mock.reset_stats();

    let cut = (start_len + 10).to_string();
    let response = client()
        .request(request(
            &mock,
            "POST",
            "/v1/messages",
            &[("x-mock-reset-after", &cut)],
            STREAM_BODY,
        ))
        .await?;
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let mut received = Vec::new();
    let error = loop {
        match body.frame().await {
            Some(Ok(frame)) => received.extend_from_slice(&frame.into_data().unwrap_or_default()),
            Some(Err(e)) => break Some(e),
            None => break None,
        }
    };
    assert!(error.is_some(), "the stream must end with an error");
    assert_eq!(received.len(), start_len + 10);
    let received = String::from_utf8_lossy(&received);
    assert!(received.starts_with("event: message_start\n"), "{received}");
    assert!(received[start_len..].starts_with("event: co"), "{received}");

    let stats = wait_idle(&mock).await;
    // Only message_start was written whole.
    assert_eq!(stats.usage.input_tokens, BODY_INPUT_TOKENS);
    assert_eq!(stats.usage.output_tokens, 1);
    Ok(())
}

#[tokio::test]
async fn stream_error_after_n_deltas() -> TestResult {
    let mock = MockServer::builder().output_tokens(5).start().await?;
    let answer = post(&mock, &[("x-mock-stream-error-after", "2")], STREAM_BODY).await?;
    assert_eq!(answer.status, 200);
    let events = parse_events(answer.text());
    assert_eq!(
        names(&events),
        [
            "message_start",
            "content_block_start",
            "ping",
            "content_block_delta",
            "content_block_delta",
            "error"
        ]
    );
    assert_eq!(
        events[5].1,
        serde_json::json!({"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}})
    );
    let stats = wait_idle(&mock).await;
    assert_eq!(stats.usage.output_tokens, 1, "message_delta never came");
    assert_eq!(stats.usage.input_tokens, BODY_INPUT_TOKENS);

    let answer = post(
        &mock,
        &[
            ("x-mock-stream-error-after", "1"),
            ("x-mock-stream-error-type", "api_error"),
        ],
        STREAM_BODY,
    )
    .await?;
    let events = parse_events(answer.text());
    assert_eq!(names(&events).len(), 5);
    assert_eq!(events[4].1["error"]["type"], "api_error");
    Ok(())
}

#[tokio::test]
async fn stream_error_as_first_event() -> TestResult {
    let mock = MockServer::start().await?;
    let answer = post(&mock, &[("x-mock-stream-error-after", "0")], STREAM_BODY).await?;
    assert_eq!(answer.status, 200);
    assert_eq!(names(&parse_events(answer.text())), ["error"]);

    // The stream_error fault: first event by default, then ok.
    let headers = [("x-mock-fault", "stream_error,ok"), ("x-mock-key", "s")];
    let first = post(&mock, &headers, STREAM_BODY).await?;
    assert_eq!(names(&parse_events(first.text())), ["error"]);
    let second = post(&mock, &headers, STREAM_BODY).await?;
    assert_eq!(
        names(&parse_events(second.text())).last(),
        Some(&"message_stop")
    );
    // Without a stream, the same fault is the status of the error type.
    let json = post(&mock, &[("x-mock-fault", "stream_error")], BODY).await?;
    assert_error(&json, 529, "overloaded_error");

    let stats = wait_idle(&mock).await;
    assert_eq!(
        stats.usage.output_tokens, 12,
        "only the complete stream has usage"
    );
    Ok(())
}

#[tokio::test]
async fn scripted_usage_json_and_sse() -> TestResult {
    let mock = MockServer::start().await?;
    let usage = (
        "x-mock-usage",
        "input=1200,output=300,cache_read=500,cache_write_5m=100,cache_write_1h=7",
    );
    let v = post(&mock, &[usage], BODY).await?.json();
    let u = &v["usage"];
    assert_eq!(u["input_tokens"], 1200);
    assert_eq!(u["output_tokens"], 300);
    assert_eq!(u["cache_read_input_tokens"], 500);
    assert_eq!(u["cache_creation_input_tokens"], 107);
    assert_eq!(u["cache_creation"]["ephemeral_5m_input_tokens"], 100);
    assert_eq!(u["cache_creation"]["ephemeral_1h_input_tokens"], 7);
    assert_eq!(
        v["content"][0]["text"].as_str().unwrap().split(' ').count(),
        300
    );

    let answer = post(&mock, &[usage], STREAM_BODY).await?;
    let events = parse_events(answer.text());
    let start = &events[0].1["message"]["usage"];
    assert_eq!(start["input_tokens"], 1200);
    assert_eq!(start["cache_creation_input_tokens"], 107);
    assert_eq!(start["cache_read_input_tokens"], 500);
    assert_eq!(start["cache_creation"]["ephemeral_1h_input_tokens"], 7);
    assert_eq!(start["output_tokens"], 1);
    let deltas = events
        .iter()
        .filter(|(n, _)| n == "content_block_delta")
        .count();
    assert_eq!(deltas, 300);
    let end = &events.iter().find(|(n, _)| n == "message_delta").unwrap().1["usage"];
    assert_eq!(end["output_tokens"], 300);
    assert_eq!(end["input_tokens"], 1200);
    assert_eq!(end["cache_creation_input_tokens"], 107);
    assert_eq!(end["cache_read_input_tokens"], 500);

    assert!(
        end.get("server_tool_use").is_none(),
        "no web search scripted"
    );

    // Web searches and the batch tier, in JSON and in the final message_delta.
    let tools = (
        "x-mock-usage",
        "input=10,output=5,web_search=2,service_tier=batch",
    );
    let v = post(&mock, &[tools], BODY).await?.json();
    assert_eq!(v["usage"]["server_tool_use"]["web_search_requests"], 2);
    assert_eq!(v["usage"]["service_tier"], "batch");
    let events = parse_events(post(&mock, &[tools], STREAM_BODY).await?.text());
    let start = &events[0].1["message"]["usage"];
    assert_eq!(start["service_tier"], "batch");
    let end = &events.iter().find(|(n, _)| n == "message_delta").unwrap().1["usage"];
    assert_eq!(end["server_tool_use"]["web_search_requests"], 2);

    // A subset: input from the estimate, no cache.
    let v = post(&mock, &[("x-mock-usage", "output=2")], BODY)
        .await?
        .json();
    assert_eq!(v["usage"]["input_tokens"], BODY_INPUT_TOKENS);
    assert_eq!(v["usage"]["output_tokens"], 2);
    assert_eq!(v["usage"]["cache_read_input_tokens"], 0);

    // More than the delta cap: usage still says so.
    let answer = post(&mock, &[("x-mock-usage", "output=5000")], STREAM_BODY).await?;
    let events_big = events_count(answer.text());
    assert_eq!(events_big, claude_mock::MAX_TEXT_TOKENS);
    assert!(answer.text().contains("\"output_tokens\":5000"));

    let stats = wait_idle(&mock).await;
    assert_eq!(
        stats.usage.input_tokens,
        1200 * 2 + 10 * 2 + BODY_INPUT_TOKENS * 2
    );
    assert_eq!(stats.usage.output_tokens, 300 * 2 + 5 * 2 + 2 + 5000);
    assert_eq!(stats.usage.cache_read_input_tokens, 1000);
    assert_eq!(stats.usage.cache_creation_input_tokens, 214);
    Ok(())
}

fn events_count(body: &str) -> usize {
    body.matches("event: content_block_delta").count()
}

#[tokio::test]
async fn default_fault_plan() -> TestResult {
    let mock = MockServer::builder()
        .faults(FaultPlan::parse("529,ok")?)
        .start()
        .await?;
    assert_eq!(post(&mock, &[], BODY).await?.status, 529);
    assert_eq!(post(&mock, &[], BODY).await?.status, 200);
    // A request's own plan wins.
    assert_eq!(
        post(&mock, &[("x-mock-fault", "ok")], STREAM_BODY)
            .await?
            .status,
        200
    );
    mock.set_faults(None);
    assert_eq!(post(&mock, &[], STREAM_BODY).await?.status, 200);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Rate limits

fn parse_rfc3339_secs_from_now(value: &str) -> i64 {
    // YYYY-MM-DDTHH:MM:SSZ -> seconds since the epoch (days from civil).
    let (date, time) = value.trim_end_matches('Z').split_once('T').unwrap();
    let d: Vec<i64> = date.split('-').map(|p| p.parse().unwrap()).collect();
    let t: Vec<i64> = time.split(':').map(|p| p.parse().unwrap()).collect();
    let (y, m) = if d[1] <= 2 {
        (d[0] - 1, d[1] + 9)
    } else {
        (d[0], d[1] - 3)
    };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + d[2] - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let at = days * 86_400 + t[0] * 3600 + t[1] * 60 + t[2];
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    at - now
}

#[tokio::test]
async fn requests_per_minute() -> TestResult {
    let mock = MockServer::builder().rpm(2).start().await?;
    let first = post(&mock, &[], BODY).await?;
    assert_eq!(first.status, 200);
    assert_eq!(
        first.header("anthropic-ratelimit-requests-limit"),
        Some("2")
    );
    assert_eq!(
        first.header("anthropic-ratelimit-requests-remaining"),
        Some("1")
    );
    // Full again in 30 s (one request at 2/min), rounded up to the second.
    let reset =
        parse_rfc3339_secs_from_now(first.header("anthropic-ratelimit-requests-reset").unwrap());
    assert!((29..=31).contains(&reset), "{reset}");
    assert!(
        first
            .header("anthropic-ratelimit-input-tokens-limit")
            .is_none()
    );
    assert!(first.header("anthropic-ratelimit-tokens-limit").is_none());
    let second = post(&mock, &[], BODY).await?;
    assert_eq!(
        second.header("anthropic-ratelimit-requests-remaining"),
        Some("0")
    );

    let limited = post(&mock, &[], BODY).await?;
    assert_error(&limited, 429, "rate_limit_error");
    assert_eq!(limited.header("retry-after"), Some("30"));
    assert_eq!(
        limited.header("anthropic-ratelimit-requests-remaining"),
        Some("0")
    );
    let message = limited.json()["error"]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(message.contains("2 requests per minute"), "{message}");
    let stats = mock.stats();
    assert_eq!(stats.rate_limited, 1);
    assert_eq!(stats.by_status["429"], 1);
    assert_eq!(
        stats.usage.input_tokens,
        2 * BODY_INPUT_TOKENS,
        "a 429 has no usage"
    );

    // Runtime change: the buckets restart full.
    mock.set_limits(Limits {
        requests_per_minute: Some(100),
        ..Limits::default()
    });
    assert_eq!(mock.limits().requests_per_minute, Some(100));
    assert_eq!(post(&mock, &[], BODY).await?.status, 200);
    mock.set_limits(Limits::default());
    let free = post(&mock, &[], BODY).await?;
    assert!(free.header("anthropic-ratelimit-requests-limit").is_none());
    Ok(())
}

#[tokio::test]
async fn token_limits() -> TestResult {
    let mock = MockServer::builder().itpm(1000).otpm(600).start().await?;
    // ITPM counts input + cache writes, not cache reads.
    let first = post(
        &mock,
        &[(
            "x-mock-usage",
            "input=700,cache_write_5m=100,cache_read=5000,output=10",
        )],
        BODY,
    )
    .await?;
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(
        first.header("anthropic-ratelimit-input-tokens-limit"),
        Some("1000")
    );
    assert_eq!(
        first.header("anthropic-ratelimit-input-tokens-remaining"),
        Some("200")
    );
    assert_eq!(
        first.header("anthropic-ratelimit-output-tokens-limit"),
        Some("600")
    );
    assert_eq!(
        first.header("anthropic-ratelimit-output-tokens-remaining"),
        Some("590")
    );
    // tokens-* is the most restrictive: input (200 left).
    assert_eq!(
        first.header("anthropic-ratelimit-tokens-limit"),
        Some("1000")
    );
    assert_eq!(
        first.header("anthropic-ratelimit-tokens-remaining"),
        Some("200")
    );
    assert!(first.header("anthropic-ratelimit-requests-limit").is_none());

    // 800 more input: lacks 600 at 1000/60 per second = 36 s.
    let limited = post(&mock, &[("x-mock-usage", "input=800,output=1")], BODY).await?;
    assert_error(&limited, 429, "rate_limit_error");
    assert_eq!(limited.header("retry-after"), Some("36"));
    let message = limited.json()["error"]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        message.contains("1000 input tokens per minute"),
        "{message}"
    );

    // Output may go negative, then blocks until it refills past 0.
    let big = post(&mock, &[("x-mock-usage", "input=1,output=700")], BODY).await?;
    assert_eq!(big.status, 200);
    assert_eq!(
        big.header("anthropic-ratelimit-output-tokens-remaining"),
        Some("0")
    );
    let limited = post(&mock, &[("x-mock-usage", "input=1,output=1")], BODY).await?;
    assert_error(&limited, 429, "rate_limit_error");
    // -110 at 10/s: 11 s.
    assert_eq!(limited.header("retry-after"), Some("11"));
    assert!(
        limited.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("600 output tokens")
    );
    assert_eq!(mock.stats().rate_limited, 2);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Stats

#[tokio::test]
async fn stats_are_exact_with_a_stream_cut_by_the_client() -> TestResult {
    let mock = MockServer::builder()
        .output_tokens(20)
        .token_latency(Duration::from_millis(40))
        .start()
        .await?;
    let mut tcp = raw(
        &mock,
        &raw_post(
            "/v1/messages",
            "x-mock-usage: cache_read=30\r\n",
            STREAM_BODY,
        ),
        STREAM_BODY,
    )
    .await?;
    // Read until two deltas have arrived, then hang up.
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while String::from_utf8_lossy(&seen)
        .matches("content_block_delta")
        .count()
        < 4
    {
        // each delta names content_block_delta twice (event and type)
        let n = tcp.read(&mut buf).await?;
        assert!(n > 0, "stream ended early");
        seen.extend_from_slice(&buf[..n]);
    }
    drop(tcp);
    let stats = wait_idle(&mock).await;
    assert_eq!(stats.requests, 1);
    assert_eq!(stats.by_status["200"], 1);
    assert_eq!(stats.max_in_flight, 1);
    // Only message_start's usage was written: input, cache read, and 1 output token.
    assert_eq!(stats.usage.input_tokens, BODY_INPUT_TOKENS);
    assert_eq!(stats.usage.cache_read_input_tokens, 30);
    assert_eq!(stats.usage.output_tokens, 1);

    // A complete JSON answer then adds its figures; a complete stream replaces 1 by 20.
    post(&mock, &[("x-mock-output-tokens", "2")], BODY).await?;
    post(&mock, &[], STREAM_BODY).await?;
    let stats = wait_idle(&mock).await;
    assert_eq!(stats.requests, 3);
    assert_eq!(stats.usage.input_tokens, 3 * BODY_INPUT_TOKENS);
    assert_eq!(stats.usage.output_tokens, 1 + 2 + 20);

    // The same JSON over HTTP.
    let c = client();
    let over_http = send(&c, request(&mock, "GET", "/mock/stats", &[], "")).await?;
    let parsed: Stats = serde_json::from_slice(&over_http.body)?;
    assert_eq!(parsed, mock.stats());
    let v = over_http.json();
    assert_eq!(v["by_path"]["/v1/messages"], 3);
    assert_eq!(v["usage"]["output_tokens"], 23);
    assert_eq!(mock.stats().requests, 3, "/mock/* is not counted");

    let reset = send(&c, request(&mock, "POST", "/mock/reset", &[], "")).await?;
    assert_eq!(reset.status, 200);
    assert_eq!(mock.stats(), Stats::default());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_in_flight_counts_concurrent_requests() -> TestResult {
    let mock = MockServer::builder()
        .first_byte_latency(Duration::from_millis(400))
        .start()
        .await?;
    let c = client();
    let mut tasks = Vec::new();
    for i in 0..5 {
        let req = request(
            &mock,
            "POST",
            "/v1/messages",
            &[],
            if i % 2 == 0 { BODY } else { STREAM_BODY },
        );
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            send(&c, req).await.map(|a| a.status)
        }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap()?, 200);
    }
    let stats = wait_idle(&mock).await;
    assert_eq!(stats.max_in_flight, 5);
    assert_eq!(stats.requests, 5);

    // Sequential requests never overlap.
    mock.reset_stats();
    for _ in 0..3 {
        post(&mock, &[("x-mock-fault", "ok")], STREAM_BODY).await?;
    }
    assert_eq!(wait_idle(&mock).await.max_in_flight, 1);
    Ok(())
}

#[tokio::test]
async fn shutdown_stops_listening() -> TestResult {
    let mock = MockServer::start().await?;
    let addr = mock.addr();
    assert_eq!(post(&mock, &[], BODY).await?.status, 200);
    mock.shutdown().await;
    assert!(TcpStream::connect(addr).await.is_err());

    let dropped = MockServer::start().await?;
    let addr = dropped.addr();
    drop(dropped);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(TcpStream::connect(addr).await.is_err());
    Ok(())
}

#[tokio::test]
async fn a_client_that_drops_a_stream_is_noticed_at_once() -> TestResult {
    let mock = MockServer::builder()
        .output_tokens(50)
        .token_latency(Duration::from_millis(600))
        .start()
        .await?;
    let response = client()
        .request(request(&mock, "POST", "/v1/messages", &[], STREAM_BODY))
        .await?;
    let mut body = response.into_body();
    let mut text = String::new();
    while !text.contains("content_block_delta") {
        let frame = body.frame().await.ok_or("stream ended early")??;
        if let Ok(data) = frame.into_data() {
            text.push_str(std::str::from_utf8(&data)?);
        }
    }
    assert_eq!(mock.stats().in_flight, 1);
    let dropped = Instant::now();
    drop(body);
    while mock.stats().in_flight > 0 {
        assert!(
            dropped.elapsed() < Duration::from_millis(500),
            "the server kept streaming to a client that left"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let stats = mock.stats();
    assert_eq!(stats.usage.output_tokens, 1);
    assert_eq!(stats.usage.input_tokens, BODY_INPUT_TOKENS);
    Ok(())
}
