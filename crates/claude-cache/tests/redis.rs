//! The Redis second level across two cache instances, against a `redis-server` the test
//! starts itself on a free loopback port (skipped with a printed reason when the binary is
//! missing, failed when `CI=true`).
#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used, clippy::many_single_char_names)]

mod common;

use std::time::Duration;

use claude_cache::{CacheLayer, CacheStatus, RedisCache};
use claude_core::CacheHit;
use claude_mock::MockServer;
use claude_mock::redis_server::RedisServer;
use common::*;

fn layer(redis: &RedisServer) -> CacheLayer {
    layer_with(redis, Duration::from_millis(200))
}

fn layer_with(redis: &RedisServer, timeout: Duration) -> CacheLayer {
    CacheLayer::default().redis(RedisCache::open(&redis.url()).unwrap().timeout(timeout))
}

/// Whether the answer to `req` is in Redis.
fn redis_has(redis: &RedisServer, req: &http::Request<bytes::Bytes>) -> bool {
    let key = claude_cache::key::CacheKey::for_request(req, &claude_cache::CacheConfig::default())
        .unwrap();
    let Ok(mut conn) = redis::Client::open(redis.url()).and_then(|c| c.get_connection()) else {
        return false;
    };
    redis::cmd("EXISTS")
        .arg(format!("claude-cache:v1:{key}"))
        .query::<bool>(&mut conn)
        .unwrap_or(false)
}

/// The number of cache entries in Redis (read with a plain connection of the test's own).
fn l2_keys(redis: &RedisServer) -> usize {
    let Ok(mut conn) = redis::Client::open(redis.url()).and_then(|c| c.get_connection()) else {
        return 0;
    };
    redis::cmd("KEYS")
        .arg("claude-cache:v1:*")
        .query::<Vec<String>>(&mut conn)
        .map_or(0, |k| k.len())
}

/// Waits until Redis holds `n` entries.
async fn wait_for_l2(redis: &RedisServer, n: usize) {
    for _ in 0..500 {
        if l2_keys(redis) >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("redis never held {n} entries");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_cached_by_one_instance_is_a_hit_on_the_other() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let mock = MockServer::start().await.unwrap();
    // A generous timeout: on two loaded cores a slow GET is a miss, by design, and this
    // test is about the hit.
    let a = service(&layer_with(&redis, Duration::from_secs(2)));
    let b = service(&layer_with(&redis, Duration::from_secs(2)));

    // JSON and stream answers, each stored by A and served by B.
    for (n, req) in [body("shared json"), stream_body("shared stream")]
        .into_iter()
        .enumerate()
    {
        let before = upstream(&mock);
        let first = send(&a, post(&mock, req.clone())).await;
        assert_eq!(first.cache(), "MISS");
        assert_eq!(upstream(&mock), before + 1);
        // The write to Redis runs on A's store task, off the caller's path.
        wait_for_l2(&redis, n + 1).await;
        let second = send(&b, post(&mock, req.clone())).await;
        assert_eq!(second.status_ext(), Some(CacheStatus::Hit));
        assert_eq!(second.body(), first.body(), "byte for byte");
        assert!(second.headers.contains_key("age"));
        assert_eq!(
            second.headers["content-type"],
            first.headers["content-type"]
        );
        let hit = second.extensions.get::<CacheHit>().unwrap();
        assert!(hit.usage.output_tokens > 0, "usage rebuilt from the body");
        assert_eq!(hit.model.as_deref(), Some("claude-sonnet-4-5"));
        assert_eq!(upstream(&mock), before + 1, "one upstream request in total");
        // And B now has it locally: a third request is a hit without Redis.
        assert_eq!(send(&b, post(&mock, req)).await.cache(), "HIT");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_passes_through_and_recovers_when_it_returns() {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let mock = MockServer::start().await.unwrap();
    let a = service(&layer(&redis));

    // Connected once, then Redis dies.
    assert_eq!(send(&a, post(&mock, body("before"))).await.cache(), "MISS");
    redis.stop();

    // Every request still succeeds (misses go upstream, the failed writes are dropped).
    for i in 0..5 {
        let q = format!("down {i}");
        let started = std::time::Instant::now();
        let ans = send(&a, post(&mock, body(&q))).await;
        assert_eq!(ans.status, 200);
        assert_eq!(ans.cache(), "MISS");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "a dead redis costs at most the timeout"
        );
        // A's local cache still works.
        wait_until("stored locally", || a.handle().in_flight() == 0).await;
        assert_eq!(send(&a, post(&mock, body(&q))).await.cache(), "HIT");
    }
    // A second instance over the dead Redis: a miss, not a failure.
    let b = service(&layer(&redis));
    assert_eq!(send(&b, post(&mock, body("down 0"))).await.status, 200);

    // Redis returns (empty): the connection manager reconnects by itself, and A's next
    // answers are shared again. (Which of A's first writes land depends on timing: one
    // sent while the store still backs off after its failures is not retried, by design;
    // so A answers new questions until one of them is in Redis.)
    redis.restart();
    assert_eq!(l2_keys(&redis), 0);
    let mut q = String::new();
    for i in 0.. {
        assert!(i < 200, "A never wrote to redis again");
        q = format!("after {i}");
        assert_eq!(send(&a, post(&mock, body(&q))).await.status, 200);
        wait_until("stored", || a.handle().in_flight() == 0).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        if redis_has(&redis, &post(&mock, body(&q))) {
            break;
        }
    }
    let before = upstream(&mock);
    let c = service(&layer(&redis));
    assert_eq!(send(&c, post(&mock, body(&q))).await.cache(), "HIT");
    // B, whose first calls failed, reads the shared level again too.
    assert_eq!(send(&b, post(&mock, body(&q))).await.cache(), "HIT");
    assert_eq!(upstream(&mock), before);
}
