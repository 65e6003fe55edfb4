//! The ordering promises of the stack, each proved over real HTTP against claude-mock with
//! the stack a user would build from configuration.
#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use claude_core::Tenant;
use claude_mock::MockServer;
use claude_retry::RetryInfo;
use claude_secrets::{ApiKeyLayer, KeyRing, KeyRingConfig, StaticSource};
use claude_stack::{ClaudeStack, StackConfig, StackService};
use http::Request;
use http_body_util::BodyExt;
use tower::ServiceExt;

const BODY: &str =
    r#"{"model":"claude-sonnet-4-5","max_tokens":64,"messages":[{"role":"user","content":"hi"}]}"#;

fn config(mock: &MockServer, extra: &str) -> StackConfig {
    let text = format!(
        "[client]\nbase_url = \"{}\"\n[retry]\ninitial_backoff = \"1ms\"\nmax_backoff = \"5ms\"\n{extra}",
        mock.url()
    );
    toml::from_str(&text).unwrap()
}

async fn send(svc: &StackService, headers: &[(&str, &str)]) -> (u16, http::Extensions, Bytes) {
    let mut b = Request::post("/v1/messages").header("content-type", "application/json");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let resp = svc
        .clone()
        .oneshot(b.body(Bytes::from_static(BODY.as_bytes())).unwrap())
        .await
        .unwrap();
    let (parts, body) = resp.into_parts();
    (
        parts.status.as_u16(),
        parts.extensions,
        body.collect().await.unwrap().to_bytes(),
    )
}

#[tokio::test]
async fn a_retried_request_is_charged_once() {
    let mock = MockServer::start().await.unwrap();
    let stack = ClaudeStack::new(config(&mock, "")).unwrap();
    let svc = stack.client().unwrap();
    let (status, ext, _) = send(
        &svc,
        &[
            ("x-mock-fault", "529,500,ok"),
            ("x-mock-key", "charged-once"),
            ("x-mock-usage", "input=100,output=10"),
        ],
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(ext.get::<RetryInfo>().unwrap().attempts, 3);
    assert_eq!(
        mock.stats().requests,
        3,
        "three attempts reached the upstream"
    );
    let t = stack.cost_tracker().unwrap().total();
    assert_eq!(t.requests, 1, "one request in the ledger");
    assert_eq!((t.input_tokens, t.output_tokens), (100, 10));
}

#[tokio::test]
async fn every_retry_attempt_passes_the_rate_limiter() {
    let mock = MockServer::start().await.unwrap();
    let stack =
        ClaudeStack::new(config(&mock, "[rate_limit]\nrequests_per_minute = 1000\n")).unwrap();
    let svc = stack.client().unwrap();
    let (status, ext, _) = send(
        &svc,
        &[("x-mock-fault", "429,500,ok"), ("x-mock-key", "limiter")],
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(ext.get::<RetryInfo>().unwrap().attempts, 3);
    let snap = stack
        .rate_limiter()
        .unwrap()
        .snapshot(&Tenant::default(), "claude-sonnet-4-5")
        .unwrap();
    assert_eq!(
        snap.settled_requests, 3,
        "each attempt was admitted and settled by the limiter"
    );
}

#[tokio::test]
async fn a_401_refresh_happens_below_the_retry_layer() {
    let mock = MockServer::builder()
        .api_key("new-key")
        .start()
        .await
        .unwrap();
    let source = StaticSource::new("old-key");
    let ring = KeyRing::new(source.clone(), KeyRingConfig::default());
    // The ring holds the old key; the source has rotated by the time of the request.
    ring.current().await.unwrap();
    source.set("new-key");
    let stack = ClaudeStack::new(config(&mock, ""))
        .unwrap()
        .with_api_keys(ApiKeyLayer::new(ring));
    let svc = stack.client().unwrap();
    let (status, ext, _) = send(&svc, &[]).await;
    assert_eq!(status, 200);
    assert_eq!(
        ext.get::<RetryInfo>().unwrap().attempts,
        1,
        "the retry layer saw one attempt: the refresh and replay happened below it"
    );
    let stats = mock.stats();
    assert_eq!(stats.by_status.get("401").copied(), Some(1));
    assert_eq!(stats.by_status.get("200").copied(), Some(1));
    assert_eq!(stack.cost_tracker().unwrap().total().requests, 1);
}

#[tokio::test]
async fn a_cache_hit_costs_nothing_and_touches_no_limiter() {
    let mock = MockServer::start().await.unwrap();
    let stack = ClaudeStack::new(config(
        &mock,
        "[cache]\n[rate_limit]\nrequests_per_minute = 1000\n",
    ))
    .unwrap();
    let svc = stack.client().unwrap();
    let usage = ("x-mock-usage", "input=1000,output=100");
    let (s1, _, first) = send(&svc, &[usage]).await;
    let (s2, ext, second) = send(&svc, &[usage]).await;
    assert_eq!((s1, s2), (200, 200));
    assert_eq!(first, second, "the hit replays the stored answer");
    assert!(ext.get::<claude_core::CacheHit>().is_some());
    assert_eq!(
        mock.stats().requests,
        1,
        "the hit never reached the upstream"
    );
    let snap = stack
        .rate_limiter()
        .unwrap()
        .snapshot(&Tenant::default(), "claude-sonnet-4-5")
        .unwrap();
    assert_eq!(
        snap.settled_requests, 1,
        "the hit was not admitted by the limiter"
    );
    let t = stack.cost_tracker().unwrap().total();
    assert_eq!((t.requests, t.cache_hits), (2, 1));
    // Sonnet 4.5: 1,000 × $3 + 100 × $15 per MTok = $0.0045, spent once, saved once.
    assert_eq!(t.cost.nanos(), 4_500_000);
    assert_eq!(t.savings.nanos(), 4_500_000);
}
