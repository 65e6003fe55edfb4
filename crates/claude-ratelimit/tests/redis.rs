//! Two layers (two gateway instances) sharing their limits through a `redis-server` the test
//! starts itself on a free loopback port (skipped with a printed reason when the binary is
//! missing, failed when `CI=true`), against claude-mock with limits equal to the shared ones:
//! the mock is the oracle that answers 429 when the combined traffic overshoots.
#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use claude_core::{BoxError, Error, ErrorKind, FullBodyService, Tenant};
use claude_mock::redis_server::RedisServer;
use claude_mock::{Limits, MockServer};
use claude_ratelimit::{
    FailurePolicy, KeyScope, RateLimit, RateLimitLayer, RedisLimits, ScopeLimits,
};
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tower::{Layer, Service, ServiceExt};

type Upstream = FullBodyService<Client<HttpConnector, Full<Bytes>>>;
type Svc = RateLimit<Upstream>;

const RPM: u64 = 360;
const MAX_TOKENS: u32 = 16;

fn upstream() -> Upstream {
    FullBodyService::new(Client::builder(TokioExecutor::new()).build_http())
}

fn message(url: &str) -> Request<Bytes> {
    let body = format!(
        r#"{{"model":"claude-sonnet-4-5","max_tokens":{MAX_TOKENS},"messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(60)
    );
    Request::post(format!("{url}/v1/messages"))
        .header("anthropic-version", "2023-06-01")
        .header("content-type", "application/json")
        .body(Bytes::from(body))
        .unwrap()
}

fn input_estimate() -> u64 {
    let req = message("http://x");
    claude_core::RequestMeta::parse(req.uri().path(), req.body()).input_tokens_estimate
}

/// The limits of the mock and of each layer: RPM and ITPM both bind for 400 requests.
fn limits() -> Limits {
    Limits {
        requests_per_minute: Some(RPM),
        input_tokens_per_minute: Some(input_estimate() * RPM),
        output_tokens_per_minute: Some(u64::from(MAX_TOKENS) * RPM),
    }
}

fn layer(shared: Option<RedisLimits>) -> RateLimitLayer {
    let l = limits();
    let layer = RateLimitLayer::new()
        .requests_per_minute(l.requests_per_minute.unwrap())
        .input_tokens_per_minute(l.input_tokens_per_minute.unwrap())
        .output_tokens_per_minute(l.output_tokens_per_minute.unwrap())
        .max_wait(Duration::from_secs(60))
        // The time between a grant and the mock counting the request is the margin the
        // buckets keep: generous, because two loaded cores can delay a request by far more
        // than the default 100 ms, and the mock then sees a burst the grants had spread.
        .safety_margin(Duration::from_secs(2));
    match shared {
        Some(s) => layer.redis(s),
        None => layer,
    }
}

fn shared(redis: &RedisServer) -> RedisLimits {
    RedisLimits::open(&redis.url())
        .unwrap()
        .timeout(Duration::from_millis(200))
}

async fn complete(svc: &mut Svc, req: Request<Bytes>) -> Result<u16, BoxError> {
    let ready = svc.ready().await?;
    let resp = ready.call(req).await?;
    let status = resp.status().as_u16();
    resp.into_body().collect().await?;
    Ok(status)
}

/// 200 concurrent tasks on each of the two services; returns the statuses.
async fn hammer(a: &Svc, b: &Svc, url: &str) -> Vec<u16> {
    hammer_as(a, b, url, None).await
}

/// [`hammer`], with the requests to `a` from tenant `a` and those to `b` from tenant `b`
/// when `tenants` is set.
async fn hammer_as(a: &Svc, b: &Svc, url: &str, tenants: Option<()>) -> Vec<u16> {
    let tasks: Vec<_> = (0..400)
        .map(|i| {
            let (mut svc, tenant) = if i % 2 == 0 {
                (a.clone(), "a")
            } else {
                (b.clone(), "b")
            };
            let mut req = message(url);
            if tenants.is_some() {
                req.extensions_mut().insert(Tenant::new(tenant));
            }
            tokio::spawn(async move { complete(&mut svc, req).await.unwrap() })
        })
        .collect();
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    statuses
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_hold_the_combined_limits_under_2_x_200_concurrent_tasks() {
    let Some(redis) = RedisServer::start() else {
        return;
    };

    // Without Redis, each instance holds the limits alone, and together they overshoot.
    let bare = MockServer::builder()
        .limits(limits())
        .start()
        .await
        .unwrap();
    let a = layer(None).layer(upstream());
    let b = layer(None).layer(upstream());
    let statuses = hammer(&a, &b, &bare.url()).await;
    assert!(bare.stats().rate_limited > 0, "{:?}", bare.stats());
    assert!(statuses.contains(&429));

    // Sharing one Redis: not one 429, every request completes. (A generous timeout: on two
    // loaded cores a slow round trip fails open to the local limits, by policy, and this
    // test is about the shared grant.)
    let mock = MockServer::builder()
        .limits(limits())
        .start()
        .await
        .unwrap();
    let patient = || shared(&redis).timeout(Duration::from_secs(2));
    let a = layer(Some(patient())).layer(upstream());
    let b = layer(Some(patient())).layer(upstream());
    let started = Instant::now();
    let statuses = hammer(&a, &b, &mock.url()).await;
    let elapsed = started.elapsed();
    let stats = mock.stats();
    assert_eq!(stats.rate_limited, 0, "{stats:?}");
    assert_eq!(statuses.len(), 400);
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(stats.requests, 400);
    // 400 requests against 360 per minute: the last ones waited for the shared refill.
    assert!(elapsed > Duration::from_secs(3), "{elapsed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_follows_the_policy_and_the_shared_limits_return_with_it() {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let mock = MockServer::start().await.unwrap();
    let url = mock.url();
    let mut open = layer(Some(shared(&redis))).layer(upstream());
    let mut closed =
        layer(Some(shared(&redis).policy(FailurePolicy::FailClosed))).layer(upstream());

    assert_eq!(complete(&mut open, message(&url)).await.unwrap(), 200);
    assert_eq!(complete(&mut closed, message(&url)).await.unwrap(), 200);
    let redis_url = redis.url();
    let keys = || {
        redis::Client::open(redis_url.as_str())
            .and_then(|c| c.get_connection())
            .and_then(|mut c| {
                redis::cmd("KEYS")
                    .arg("claude-ratelimit:v1:*")
                    .query::<Vec<String>>(&mut c)
            })
            .map_or(0, |k| k.len())
    };
    assert_eq!(keys(), 3, "the shared buckets of the key");

    redis.stop();
    // Fail open: the local admission alone.
    for _ in 0..5 {
        assert_eq!(complete(&mut open, message(&url)).await.unwrap(), 200);
    }
    // Fail closed: a local 429.
    let err = complete(&mut closed, message(&url)).await.unwrap_err();
    assert_eq!(Error::from_box(err).kind(), ErrorKind::RateLimited);

    // Back: both are granted by Redis again (the buckets reappear there).
    redis.restart();
    assert_eq!(keys(), 0);
    let mut ok = false;
    for _ in 0..100 {
        if complete(&mut closed, message(&url)).await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        ok,
        "the fail-closed instance is admitted again once redis is back"
    );
    assert_eq!(keys(), 3);
    assert_eq!(complete(&mut open, message(&url)).await.unwrap(), 200);
    assert_eq!(mock.stats().rate_limited, 0);
}

/// Two instances, each keyed per tenant (tenant `a` on one, `b` on the other) at the whole
/// organisation's limits, plus a further `global` scope at those limits: the shared grant
/// covers the tenant's buckets and the global ones in one script, so the mock (the
/// organisation) never answers 429 and every request completes. The global buckets are in
/// Redis next to the tenants'.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_global_scope_is_granted_with_the_tenant_s_across_instances() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let l = limits();
    let scoped = || {
        layer(Some(shared(&redis).timeout(Duration::from_secs(2))))
            .scope(KeyScope::Tenant)
            .scope_limits(ScopeLimits {
                requests_per_minute: l.requests_per_minute,
                input_tokens_per_minute: l.input_tokens_per_minute,
                output_tokens_per_minute: l.output_tokens_per_minute,
                ..ScopeLimits::new(KeyScope::Global)
            })
            .layer(upstream())
    };
    let mock = MockServer::builder().limits(l).start().await.unwrap();
    let statuses = hammer_as(&scoped(), &scoped(), &mock.url(), Some(())).await;
    let stats = mock.stats();
    assert_eq!(stats.rate_limited, 0, "{stats:?}");
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(stats.requests, 400);

    let mut c = redis::Client::open(redis.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let mut keys: Vec<String> = redis::cmd("KEYS")
        .arg("claude-ratelimit:v1:*")
        .query(&mut c)
        .unwrap();
    keys.sort();
    assert_eq!(
        keys,
        [
            "claude-ratelimit:v1:input_tokens:-:t.a",
            "claude-ratelimit:v1:input_tokens:-:t.b",
            "claude-ratelimit:v1:input_tokens:global/-:-",
            "claude-ratelimit:v1:output_tokens:-:t.a",
            "claude-ratelimit:v1:output_tokens:-:t.b",
            "claude-ratelimit:v1:output_tokens:global/-:-",
            "claude-ratelimit:v1:requests:-:t.a",
            "claude-ratelimit:v1:requests:-:t.b",
            "claude-ratelimit:v1:requests:global/-:-",
        ]
    );
}

/// A 429 that one instance receives pauses the key on every instance: the other one's next
/// request, which may wait 1 s, is refused locally at once (the shared pause is 30 s) and
/// never reaches the mock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_on_one_instance_pauses_the_key_on_the_other() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let mock = MockServer::start().await.unwrap();
    let instance = || {
        layer(Some(shared(&redis)))
            .max_wait(Duration::from_secs(1))
            .layer(upstream())
    };
    let (mut a, mut b) = (instance(), instance());
    let mut req = message(&mock.url());
    req.headers_mut()
        .insert("x-mock-fault", "429".parse().unwrap());
    req.headers_mut()
        .insert("x-mock-retry-after", "30".parse().unwrap());
    assert_eq!(complete(&mut a, req).await.unwrap(), 429);

    // The pause is written on a task of its own: wait until it is in Redis.
    let mut c = redis::Client::open(redis.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let pause = "claude-ratelimit:v1:pause:8.sonnet-4:t.default";
    let mut ttl = -2;
    for _ in 0..500 {
        ttl = redis::cmd("PTTL").arg(pause).query(&mut c).unwrap();
        if ttl > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(ttl > 20_000, "pause ttl {ttl} ms");

    let err = complete(&mut b, message(&mock.url())).await.unwrap_err();
    let err = Error::from_box(err);
    assert_eq!(err.kind(), ErrorKind::QueueTimeout, "{err}");
    assert_eq!(
        mock.stats().requests,
        1,
        "only A's request reached the mock"
    );
}
