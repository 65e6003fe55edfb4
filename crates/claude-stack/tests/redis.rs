//! `redis_url` switches the cache, the rate limiter and the budgets of a stack to shared
//! state: two stacks (two instances) over one `redis-server` the test starts itself (skipped
//! with a printed reason when the binary is missing, failed when `CI=true`).
#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use bytes::Bytes;
use claude_core::{CacheHit, Error, ErrorKind};
use claude_mock::MockServer;
use claude_mock::redis_server::RedisServer;
use claude_stack::{ClaudeStack, StackConfig, StackService};
use http::Request;
use http_body_util::BodyExt;
use tower::ServiceExt;

const BODY: &str =
    r#"{"model":"claude-sonnet-4-5","max_tokens":64,"messages":[{"role":"user","content":"hi"}]}"#;

fn config(redis: &RedisServer, mock: &MockServer) -> StackConfig {
    let text = format!(
        "redis_url = \"{}\"\n[client]\nbase_url = \"{}\"\n[cache]\n\
         [rate_limit]\nrequests_per_minute = 1000\n\
         [cost.budgets]\nglobal = {{ daily = \"0.01\" }}\n",
        redis.url(),
        mock.url()
    );
    toml::from_str(&text).unwrap()
}

async fn send(svc: &StackService, question: &str) -> Result<(u16, http::Extensions), ErrorKind> {
    let body = BODY.replace("hi", question);
    let req = Request::post("/v1/messages")
        .header("content-type", "application/json")
        .header("x-mock-usage", "input=1000,output=100")
        .body(Bytes::from(body))
        .unwrap();
    match svc.clone().oneshot(req).await {
        Ok(resp) => {
            let (parts, body) = resp.into_parts();
            body.collect().await.unwrap();
            Ok((parts.status.as_u16(), parts.extensions))
        }
        Err(e) => Err(Error::from_box(e).kind()),
    }
}

fn keys(redis: &RedisServer, pattern: &str) -> usize {
    redis::Client::open(redis.url())
        .and_then(|c| c.get_connection())
        .and_then(|mut c| redis::cmd("KEYS").arg(pattern).query::<Vec<String>>(&mut c))
        .map_or(0, |k| k.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_url_shares_cache_limits_and_budgets_between_two_stacks() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let mock = MockServer::start().await.unwrap();
    let a = ClaudeStack::new(config(&redis, &mock))
        .unwrap()
        .client()
        .unwrap();
    let b = ClaudeStack::new(config(&redis, &mock))
        .unwrap()
        .client()
        .unwrap();

    // Sonnet 4.5, 1,000 in + 100 out: $0.0045 each, against a shared $0.01 a day.
    let (status, _) = send(&a, "one").await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(
        keys(&redis, "claude-ratelimit:v1:*"),
        1,
        "the shared request bucket"
    );
    assert!(
        keys(&redis, "claude-cost:v1:*") >= 1,
        "the shared budget window"
    );
    // The answer A stored reaches Redis on its store task.
    for _ in 0..200 {
        if keys(&redis, "claude-cache:v1:*") == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (status, ext) = send(&b, "one").await.unwrap();
    assert_eq!(status, 200);
    assert!(ext.get::<CacheHit>().is_some(), "A's answer is a hit on B");
    assert_eq!(mock.stats().requests, 1);

    // B spends the second $0.0045; the third would pass $0.01 with its worst case, on
    // either instance.
    assert_eq!(send(&b, "two").await.unwrap().0, 200);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        send(&a, "three").await.unwrap_err(),
        ErrorKind::BudgetExceeded
    );
    assert_eq!(
        send(&b, "four").await.unwrap_err(),
        ErrorKind::BudgetExceeded
    );
}

#[test]
fn redis_url_parses_and_its_password_stays_out_of_debug() {
    let cfg: StackConfig = toml::from_str(
        "redis_url = \"redis://:pw@127.0.0.1:1/\"\nredis_on_failure = \"fail_closed\"\n",
    )
    .unwrap();
    assert!(!format!("{cfg:?}").contains("pw@"));
    assert_eq!(
        cfg.redis_on_failure,
        claude_stack::RedisOnFailure::FailClosed
    );
    assert!(toml::from_str::<StackConfig>("redis_on_failure = \"maybe\"\n").is_err());
    // Nothing connects until the first request.
    assert!(ClaudeStack::new(cfg).is_ok());
    let bad: StackConfig = toml::from_str("redis_url = \"not a url\"\n").unwrap();
    assert!(ClaudeStack::new(bad).is_err());
}
