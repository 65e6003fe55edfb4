//! The cache over real HTTP: a hyper client behind `CacheLayer`, claude-mock upstream on
//! loopback, and the mock's own counters as the judge of what reached upstream.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use claude_cache::{BypassReason, CacheLayer, CacheScope, CacheStatus};
use claude_core::{CacheHit, UsageHandle};
use claude_mock::MockServer;
use common::*;
use http_body_util::BodyExt;

// ===== hit and miss =====

#[tokio::test]
async fn miss_then_hit_replays_the_answer_without_upstream() {
    let mock = MockServer::start().await.unwrap();
    let svc = service(&CacheLayer::default());

    let first = send(&svc, post(&mock, body("hello"))).await;
    assert_eq!(first.status, 200);
    assert_eq!(first.cache(), "MISS");
    assert_eq!(first.status_ext(), Some(CacheStatus::Miss));
    assert!(first.headers.get("age").is_none());

    let second = send(&svc, post(&mock, body("hello"))).await;
    assert_eq!(second.cache(), "HIT");
    assert_eq!(second.status, 200);
    assert_eq!(
        second.body(),
        first.body(),
        "a hit replays the stored answer"
    );
    assert_eq!(
        second.headers["content-type"],
        first.headers["content-type"]
    );
    assert_eq!(second.headers["request-id"], first.headers["request-id"]);
    assert_eq!(second.headers["age"], "0");
    assert_eq!(upstream(&mock), 1, "the hit never reached upstream");

    // The hit carries the original usage, flagged as a hit, and a completed usage handle.
    let hit = second.extensions.get::<CacheHit>().unwrap();
    let report = second
        .extensions
        .get::<UsageHandle>()
        .unwrap()
        .get()
        .unwrap();
    let stats = mock.stats();
    assert_eq!(hit.usage.output_tokens, stats.usage.output_tokens);
    assert_eq!(hit.usage.input_tokens, stats.usage.input_tokens);
    assert!(hit.usage.output_tokens > 0);
    assert_eq!(hit.model.as_deref(), Some("claude-sonnet-4-5"));
    assert!(report.is_complete_success());
    assert_eq!(report.usage, hit.usage);

    // A different question is a miss.
    let other = send(&svc, post(&mock, body("goodbye"))).await;
    assert_eq!(other.cache(), "MISS");
    assert_eq!(upstream(&mock), 2);
}

#[tokio::test]
async fn equivalent_bodies_share_an_entry_and_secrets_do_not_split_it() {
    let mock = MockServer::start().await.unwrap();
    let svc = service(&CacheLayer::default());
    let req = with_header(post(&mock, body("hi")), "anthropic-beta", "b-2,a-1");
    let first = send(&svc, with_header(req, "x-api-key", "sk-one")).await;
    assert_eq!(first.cache(), "MISS");

    // Same JSON, other key order and whitespace, other metadata, betas reordered, other
    // credentials.
    let same = r#"{ "messages" : [ { "content" : "hi", "role" : "user" } ],
        "metadata": {"user_id": "someone-else"}, "max_tokens": 64, "model": "claude-sonnet-4-5" }"#;
    let req = with_header(post(&mock, same), "anthropic-beta", " a-1 , b-2");
    let req = with_header(req, "authorization", "Bearer other-token");
    let second = send(&svc, req).await;
    assert_eq!(second.cache(), "HIT");
    assert_eq!(second.body(), first.body());

    // A different beta set, or a different max_tokens, is another entry.
    let req = with_header(post(&mock, body("hi")), "anthropic-beta", "a-1");
    assert_eq!(send(&svc, req).await.cache(), "MISS");
    let other = body("hi").replace("\"max_tokens\":64", "\"max_tokens\":65");
    assert_eq!(send(&svc, post(&mock, other)).await.cache(), "MISS");
    assert_eq!(upstream(&mock), 3);
}

#[tokio::test]
async fn count_tokens_is_cached_too() {
    let mock = MockServer::start().await.unwrap();
    let svc = service(&CacheLayer::default());
    let b = r#"{"model":"claude-sonnet-4-5","messages":[{"role":"user","content":"count me"}]}"#;
    let first = send(&svc, post_to(&mock, "/v1/messages/count_tokens", b)).await;
    assert_eq!((first.status.as_u16(), first.cache()), (200, "MISS"));
    let second = send(&svc, post_to(&mock, "/v1/messages/count_tokens", b)).await;
    assert_eq!(second.cache(), "HIT");
    assert_eq!(second.body(), first.body());
    assert_eq!(upstream_count(&mock, "/v1/messages/count_tokens"), 1);
    // The same body on /v1/messages is not the same entry.
    let third = send(&svc, post(&mock, b)).await;
    assert_ne!(third.cache(), "HIT");
}

#[tokio::test]
async fn other_endpoints_and_invalid_bodies_bypass() {
    let mock = MockServer::start().await.unwrap();
    let svc = service(&CacheLayer::default());
    let get = http::Request::get(format!("{}/v1/models", mock.url()))
        .header("anthropic-version", "2023-06-01")
        .body(Bytes::new())
        .unwrap();
    for _ in 0..2 {
        let a = send(&svc, get.clone()).await;
        assert_eq!((a.status.as_u16(), a.cache()), (200, "BYPASS"));
        assert_eq!(
            a.status_ext(),
            Some(CacheStatus::Bypass(BypassReason::Method))
        );
    }
    assert_eq!(upstream_count(&mock, "/v1/models"), 2);

    for _ in 0..2 {
        let a = send(&svc, post(&mock, "{not json")).await;
        assert_eq!(a.status, 400, "Anthropic's own 400 passes through");
        assert_eq!(a.cache(), "BYPASS");
        assert_eq!(
            a.status_ext(),
            Some(CacheStatus::Bypass(BypassReason::InvalidBody))
        );
    }
    assert_eq!(upstream(&mock), 2);
}

// ===== TTL and cache-control =====

#[tokio::test]
async fn entries_expire_after_the_ttl() {
    let mock = MockServer::start().await.unwrap();
    let layer = CacheLayer::default().ttl(Duration::from_secs(1));
    let svc = service(&layer);
    let first = send(&svc, post(&mock, body("ttl"))).await;
    assert_eq!(first.cache(), "MISS");
    assert_eq!(send(&svc, post(&mock, body("ttl"))).await.cache(), "HIT");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let late = send(&svc, post(&mock, body("ttl"))).await;
    assert_eq!(late.cache(), "MISS", "the entry outlived its TTL");
    assert_ne!(late.message_id(), first.message_id());
    assert_eq!(upstream(&mock), 2);
}

#[tokio::test]
async fn no_store_bypasses_and_no_cache_refreshes() {
    let mock = MockServer::start().await.unwrap();
    let svc = service(&CacheLayer::default());

    // no-store: goes upstream, stores nothing.
    let req = with_header(post(&mock, body("cc")), "cache-control", "no-store");
    let a = send(&svc, req).await;
    assert_eq!(a.cache(), "BYPASS");
    assert_eq!(
        a.status_ext(),
        Some(CacheStatus::Bypass(BypassReason::NoStore))
    );
    let stored = send(&svc, post(&mock, body("cc"))).await;
    assert_eq!(stored.cache(), "MISS", "no-store stored nothing");
    assert_eq!(upstream(&mock), 2);

    // no-store also refuses to read a stored answer.
    let req = with_header(post(&mock, body("cc")), "cache-control", "no-store");
    assert_eq!(send(&svc, req).await.cache(), "BYPASS");
    assert_eq!(upstream(&mock), 3);

    // no-cache: skips the read, stores the fresh answer in place of the old one.
    let req = with_header(post(&mock, body("cc")), "cache-control", "no-cache");
    let fresh = send(&svc, req).await;
    assert_eq!(fresh.cache(), "MISS");
    assert_eq!(upstream(&mock), 4);
    assert_ne!(fresh.message_id(), stored.message_id());
    let after = send(&svc, post(&mock, body("cc"))).await;
    assert_eq!(after.cache(), "HIT");
    assert_eq!(after.body(), fresh.body(), "no-cache replaced the entry");
    assert_eq!(upstream(&mock), 4);
}

#[tokio::test]
async fn max_age_limits_the_stored_lifetime_and_the_accepted_age() {
    let mock = MockServer::start().await.unwrap();
    let svc = service(&CacheLayer::default()); // TTL 1 h

    // Stored with max-age=1: lives one second although the TTL is an hour.
    let req = with_header(post(&mock, body("short")), "cache-control", "max-age=1");
    assert_eq!(send(&svc, req).await.cache(), "MISS");
    assert_eq!(send(&svc, post(&mock, body("short"))).await.cache(), "HIT");
    // Stored for an hour, then read by a client that accepts at most 1 s.
    let long = send(&svc, post(&mock, body("long"))).await;
    assert_eq!(long.cache(), "MISS");
    // max-age=0 stores nothing.
    let req = with_header(post(&mock, body("zero")), "cache-control", "max-age=0");
    assert_eq!(send(&svc, req).await.cache(), "MISS");
    assert_eq!(send(&svc, post(&mock, body("zero"))).await.cache(), "MISS");
    assert_eq!(upstream(&mock), 4);

    tokio::time::sleep(Duration::from_millis(2500)).await;

    assert_eq!(send(&svc, post(&mock, body("short"))).await.cache(), "MISS");
    assert_eq!(send(&svc, post(&mock, body("long"))).await.cache(), "HIT");
    let req = with_header(post(&mock, body("long")), "cache-control", "max-age=1");
    let fresh = send(&svc, req).await;
    assert_eq!(fresh.cache(), "MISS", "older than the client accepts");
    assert_ne!(fresh.message_id(), long.message_id());
    let again = send(&svc, post(&mock, body("long"))).await;
    assert_eq!(again.cache(), "HIT");
    assert_eq!(
        again.body(),
        fresh.body(),
        "the fresh answer replaced the old"
    );
    assert_eq!(upstream(&mock), 6);
}

// ===== tenants =====

#[tokio::test]
async fn tenants_never_share_entries_by_default() {
    let mock = MockServer::start().await.unwrap();
    let svc = service(&CacheLayer::default());
    let a1 = send(&svc, for_tenant(post(&mock, body("same")), "team-a")).await;
    let b1 = send(&svc, for_tenant(post(&mock, body("same")), "team-b")).await;
    assert_eq!((a1.cache(), b1.cache()), ("MISS", "MISS"));
    assert_ne!(a1.message_id(), b1.message_id());
    let a2 = send(&svc, for_tenant(post(&mock, body("same")), "team-a")).await;
    let b2 = send(&svc, for_tenant(post(&mock, body("same")), "team-b")).await;
    assert_eq!((a2.cache(), b2.cache()), ("HIT", "HIT"));
    assert_eq!(a2.body(), a1.body());
    assert_eq!(b2.body(), b1.body());
    // No tenant is the default tenant, a third scope.
    assert_eq!(send(&svc, post(&mock, body("same"))).await.cache(), "MISS");
    assert_eq!(upstream(&mock), 3);
}

#[tokio::test]
async fn a_shared_scope_shares_across_tenants() {
    let mock = MockServer::start().await.unwrap();
    let svc = service(&CacheLayer::default().scope(CacheScope::Shared));
    let a = send(&svc, for_tenant(post(&mock, body("same")), "team-a")).await;
    let b = send(&svc, for_tenant(post(&mock, body("same")), "team-b")).await;
    assert_eq!((a.cache(), b.cache()), ("MISS", "HIT"));
    assert_eq!(b.body(), a.body());
    assert_eq!(upstream(&mock), 1);
}

// ===== streams =====

#[tokio::test]
async fn a_stream_passes_through_as_it_arrives_and_is_replayed_event_for_event() {
    let mock = MockServer::builder()
        .token_latency(Duration::from_millis(20))
        .output_tokens(10)
        .start()
        .await
        .unwrap();
    let layer = CacheLayer::default();
    let handle = layer.handle();
    let mut svc = service(&layer);

    let resp = call(&mut svc, post(&mock, stream_body("stream"))).await;
    assert_eq!(resp.headers()["x-claude-cache"], "MISS");
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let mut stream = resp.into_body();
    let first = stream.frame().await.unwrap().unwrap().into_data().unwrap();
    // The first frame reached us while the stream was still going upstream: nothing is
    // stored yet and the flight is still open.
    assert!(String::from_utf8_lossy(&first).starts_with("event: message_start"));
    handle.run_pending_tasks().await;
    assert_eq!(handle.entry_count(), 0);
    assert_eq!(handle.in_flight(), 1);
    assert!(!http_body::Body::is_end_stream(&stream));
    let mut original = vec![first];
    while let Some(f) = stream.frame().await {
        original.push(f.unwrap().into_data().unwrap());
    }
    drop(stream);
    let original: Bytes = original.concat().into();

    let hit = send(&svc, post(&mock, stream_body("stream"))).await;
    assert_eq!(hit.cache(), "HIT");
    assert!(
        hit.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    assert_eq!(hit.body(), original, "byte for byte");
    let events: Vec<&str> = std::str::from_utf8(&original)
        .unwrap()
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .collect();
    assert_eq!(hit.events(), events, "event for event");
    assert!(events.last().unwrap().starts_with("event: message_stop"));
    let usage = hit.extensions.get::<CacheHit>().unwrap().usage;
    assert_eq!(usage.output_tokens, 10);
    assert_eq!(upstream(&mock), 1);

    // The non-streaming request is another entry.
    assert_eq!(
        send(&svc, post(&mock, body("stream"))).await.cache(),
        "MISS"
    );
    assert_eq!(upstream(&mock), 2);
}

#[tokio::test]
async fn a_stream_with_an_error_event_is_not_stored() {
    let mock = MockServer::start().await.unwrap();
    let layer = CacheLayer::default();
    let svc = service(&layer);
    let req = with_header(
        post(&mock, stream_body("err")),
        "x-mock-stream-error-after",
        "2",
    );
    let a = send(&svc, req).await;
    assert_eq!((a.status.as_u16(), a.cache()), (200, "MISS"));
    assert!(
        a.text().contains("event: error"),
        "the caller sees the error"
    );
    assert!(!a.failed);
    let b = send(&svc, post(&mock, stream_body("err"))).await;
    assert_eq!(b.cache(), "MISS", "the errored stream was not stored");
    assert!(!b.text().contains("event: error"));
    assert_eq!(
        send(&svc, post(&mock, stream_body("err"))).await.cache(),
        "HIT"
    );
    assert_eq!(upstream(&mock), 2);
    layer.handle().run_pending_tasks().await;
    assert_eq!(layer.handle().in_flight(), 0);
}

#[tokio::test]
async fn a_broken_stream_or_json_body_is_not_stored() {
    let mock = MockServer::start().await.unwrap();
    let layer = CacheLayer::default();
    let svc = service(&layer);
    for b in [stream_body("reset"), body("reset")] {
        let req = with_header(post(&mock, b.clone()), "x-mock-reset-after", "120");
        let a = send(&svc, req).await;
        assert_eq!(a.cache(), "MISS");
        assert!(a.failed, "the connection dropped mid-body");
        let again = send(&svc, post(&mock, b.clone())).await;
        assert_eq!(again.cache(), "MISS", "a broken answer was stored");
        assert!(!again.failed);
        assert_eq!(send(&svc, post(&mock, b)).await.cache(), "HIT");
    }
    assert_eq!(upstream(&mock), 4);
    layer.handle().run_pending_tasks().await;
    assert_eq!(layer.handle().in_flight(), 0);
}

#[tokio::test]
async fn error_statuses_are_not_stored() {
    let mock = MockServer::start().await.unwrap();
    let svc = service(&CacheLayer::default());
    for status in ["529", "500", "429"] {
        let req = with_header(post(&mock, body(status)), "x-mock-fault", status);
        let a = send(&svc, req).await;
        assert_eq!(a.status.as_str(), status);
        assert_eq!(a.cache(), "MISS");
        let ok = send(&svc, post(&mock, body(status))).await;
        assert_eq!((ok.status.as_u16(), ok.cache()), (200, "MISS"));
    }
    assert_eq!(upstream(&mock), 6);
}

#[tokio::test]
async fn answers_over_the_size_cap_pass_through_uncached() {
    let mock = MockServer::start().await.unwrap();
    let svc = service(&CacheLayer::default().max_entry_bytes(200));
    // JSON declares its length (refused at the head); a stream is cut off while teeing.
    for b in [body("big"), stream_body("big")] {
        let a = send(&svc, post(&mock, b.clone())).await;
        assert_eq!(a.cache(), "MISS");
        assert!(a.body().len() > 200 && !a.failed, "the caller got it all");
        let again = send(&svc, post(&mock, b)).await;
        assert_eq!(again.cache(), "MISS");
        assert_eq!(again.body().len(), a.body().len());
    }
    assert_eq!(upstream(&mock), 4);
}

// ===== single flight =====

async fn hundred_identical(stream: bool) {
    let mock = MockServer::builder()
        .token_latency(Duration::from_millis(2))
        .start()
        .await
        .unwrap();
    let layer = CacheLayer::default();
    let svc = service(&layer);
    let b = if stream {
        stream_body("together")
    } else {
        body("together")
    };
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let svc = svc.clone();
            let req = with_header(post(&mock, b.clone()), "x-mock-latency-ms", "300");
            tokio::spawn(async move { send(&svc, req).await })
        })
        .collect();
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap());
    }
    assert_eq!(
        upstream(&mock),
        1,
        "100 identical requests went upstream once"
    );
    let misses = answers.iter().filter(|a| a.cache() == "MISS").count();
    let hits = answers.iter().filter(|a| a.cache() == "HIT").count();
    assert_eq!((misses, hits), (1, 99));
    let reference = answers[0].body();
    assert!(
        answers
            .iter()
            .all(|a| a.status == 200 && a.body() == reference && !a.failed)
    );
    if stream {
        assert!(answers[0].text().contains("event: message_stop"));
    }
    // The leader's flight stays until the store thread has the entry in the cache.
    layer.handle().run_pending_tasks().await;
    assert_eq!(layer.handle().in_flight(), 0, "no flight left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_concurrent_identical_requests_go_upstream_once() {
    hundred_identical(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_concurrent_identical_streams_go_upstream_once() {
    hundred_identical(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_leader_fails_followers_go_upstream_by_themselves() {
    let mock = MockServer::start().await.unwrap();
    let layer = CacheLayer::default();
    let svc = service(&layer);
    // Attempt 1 of this request content gets a 500, every later one an answer.
    let req = || {
        let r = with_header(post(&mock, body("fail")), "x-mock-fault", "500,ok");
        with_header(r, "x-mock-latency-ms", "1000")
    };
    let leader = {
        let (svc, r) = (svc.clone(), req());
        tokio::spawn(async move { send(&svc, r).await })
    };
    let m = &mock;
    wait_until("the leader upstream", || m.stats().in_flight == 1).await;
    let followers: Vec<_> = (0..9)
        .map(|_| {
            let (svc, r) = (svc.clone(), req());
            tokio::spawn(async move { send(&svc, r).await })
        })
        .collect();
    let all = async {
        let leader = leader.await.unwrap();
        assert_eq!(leader.status, 500);
        for f in followers {
            let f = f.await.unwrap();
            assert_eq!((f.status.as_u16(), f.cache()), (200, "MISS"));
        }
    };
    tokio::time::timeout(Duration::from_secs(20), all)
        .await
        .expect("followers were stalled behind a failed leader");
    assert_eq!(upstream(&mock), 10, "each follower went upstream by itself");
    assert_eq!(layer.handle().in_flight(), 0);
    assert_eq!(send(&svc, post(&mock, body("fail"))).await.cache(), "HIT");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_leaders_caller_goes_away_followers_are_not_stalled() {
    let mock = MockServer::start().await.unwrap();
    let layer = CacheLayer::default();
    let svc = service(&layer);
    // The leader's upstream answer would take 60 s; the followers' take none.
    let slow = with_header(post(&mock, body("gone")), "x-mock-latency-ms", "60000");
    let leader = {
        let svc = svc.clone();
        tokio::spawn(async move { send(&svc, slow).await })
    };
    let m = &mock;
    wait_until("the leader upstream", || m.stats().in_flight == 1).await;
    let followers: Vec<_> = (0..5)
        .map(|_| {
            let (svc, r) = (svc.clone(), post(&mock, body("gone")));
            tokio::spawn(async move { send(&svc, r).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(upstream(&mock), 1, "the followers wait for the leader");
    leader.abort();
    let all = async {
        for f in followers {
            let f = f.await.unwrap();
            assert_eq!((f.status.as_u16(), f.cache()), (200, "MISS"));
        }
    };
    tokio::time::timeout(Duration::from_secs(20), all)
        .await
        .expect("followers were stalled behind a leader whose caller went away");
    assert_eq!(upstream(&mock), 6);
    assert_eq!(layer.handle().in_flight(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_leader_drops_its_stream_followers_go_on() {
    let mock = MockServer::builder()
        .token_latency(Duration::from_millis(50))
        .output_tokens(20)
        .start()
        .await
        .unwrap();
    let layer = CacheLayer::default();
    let mut svc = service(&layer);
    let resp = call(&mut svc, post(&mock, stream_body("drop"))).await;
    assert_eq!(resp.headers()["x-claude-cache"], "MISS");
    let mut body = resp.into_body();
    body.frame().await.unwrap().unwrap();
    let followers: Vec<_> = (0..5)
        .map(|_| {
            let (svc, r) = (svc.clone(), post(&mock, stream_body("drop")));
            tokio::spawn(async move { send(&svc, r).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        upstream(&mock),
        1,
        "the followers wait for the leader's stream"
    );
    drop(body);
    let all = async {
        for f in followers {
            let f = f.await.unwrap();
            assert_eq!(f.cache(), "MISS");
            assert!(f.text().contains("event: message_stop"));
        }
    };
    tokio::time::timeout(Duration::from_secs(20), all)
        .await
        .expect("followers were stalled behind a leader whose stream was dropped");
    assert_eq!(upstream(&mock), 6);
    assert_eq!(layer.handle().in_flight(), 0);
}

// ===== memory bound =====

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_byte_bound_holds_after_ten_thousand_entries() {
    const MAX: u64 = 256 * 1024;
    let mock = MockServer::builder()
        .output_tokens(4)
        .start()
        .await
        .unwrap();
    let layer = CacheLayer::default().max_bytes(MAX);
    let handle = layer.handle();
    let svc = service(&layer);
    let mut smallest = u64::MAX;
    for batch in 0..10 {
        let tasks: Vec<_> = (0..16)
            .map(|w| {
                let svc = svc.clone();
                let reqs: Vec<_> = (0..1000)
                    .filter(|i| i % 16 == w)
                    .map(|i| post(&mock, body(&format!("question {batch}-{i}"))))
                    .collect();
                tokio::spawn(async move {
                    let mut min = u64::MAX;
                    for r in reqs {
                        let a = send(&svc, r).await;
                        assert_eq!((a.status.as_u16(), a.cache()), (200, "MISS"));
                        min = min.min(a.body().len() as u64);
                    }
                    min
                })
            })
            .collect();
        for t in tasks {
            smallest = smallest.min(t.await.unwrap());
        }
        // Stores run on tasks of their own: wait until every flight has landed.
        let h = &handle;
        wait_until("stores", || h.in_flight() == 0).await;
        handle.run_pending_tasks().await;
        assert!(handle.weighted_size() <= MAX, "{}", handle.weighted_size());
        assert!(handle.bytes() <= MAX, "{}", handle.bytes());
        assert_eq!(
            handle.bytes(),
            handle.weighted_size(),
            "accounting agrees with moka"
        );
    }
    assert_eq!(upstream(&mock), 10_000);
    assert!(handle.entry_count() * smallest <= MAX);
    assert!(handle.entry_count() > 0, "the cache still holds entries");
}

// ===== metrics =====

#[test]
fn metrics_count_hits_misses_bypasses_stores_evictions_and_bytes() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    const MAX: u64 = 2_000;
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let handle = metrics::with_local_recorder(&recorder, || {
        rt.block_on(async {
            let mock = MockServer::builder()
                .output_tokens(4)
                .start()
                .await
                .unwrap();
            // Stores on the requests' threads: the store thread's metrics would go to the
            // global recorder, not to this thread's.
            let layer = CacheLayer::default().max_bytes(MAX).store_thread(false);
            let handle = layer.handle();
            let svc = service(&layer);
            assert_eq!(send(&svc, post(&mock, body("m"))).await.cache(), "MISS");
            assert_eq!(send(&svc, post(&mock, body("m"))).await.cache(), "HIT");
            let req = with_header(post(&mock, body("m")), "cache-control", "no-store");
            assert_eq!(send(&svc, req).await.cache(), "BYPASS");
            let get = http::Request::get(format!("{}/v1/models", mock.url()))
                .body(Bytes::new())
                .unwrap();
            assert_eq!(send(&svc, get).await.cache(), "BYPASS");
            let req = with_header(post(&mock, body("f")), "x-mock-fault", "529");
            assert_eq!(send(&svc, req).await.status, 529);
            // About 500 bytes each: more than the bound holds.
            for i in 0..10 {
                send(&svc, post(&mock, body(&format!("fill {i}")))).await;
            }
            let h = &handle;
            wait_until("stores", || h.in_flight() == 0).await;
            handle.run_pending_tasks().await;
            handle
        })
    });

    let snapshot = snapshotter.snapshot().into_vec();
    let value = |name: &str, label: Option<(&str, &str)>| {
        snapshot
            .iter()
            .find(|(k, _, _, _)| {
                k.key().name() == name
                    && label.is_none_or(|(lk, lv)| {
                        k.key().labels().any(|l| l.key() == lk && l.value() == lv)
                    })
            })
            .map(|(_, _, _, v)| v)
    };
    let counter = |name: &str, label: Option<(&str, &str)>| match value(name, label) {
        Some(DebugValue::Counter(n)) => *n,
        None => 0,
        other => panic!("{name}: {other:?}"),
    };
    assert_eq!(counter("claude_cache_hits_total", None), 1);
    assert_eq!(counter("claude_cache_misses_total", None), 12);
    assert_eq!(
        counter("claude_cache_bypasses_total", Some(("reason", "no_store"))),
        1
    );
    assert_eq!(
        counter("claude_cache_bypasses_total", Some(("reason", "method"))),
        1
    );
    assert_eq!(
        counter("claude_cache_not_stored_total", Some(("reason", "status"))),
        1
    );
    assert_eq!(counter("claude_cache_stored_total", None), 11);
    let evicted = counter("claude_cache_evictions_total", Some(("cause", "size")));
    assert!(evicted >= 1, "{evicted}");
    let Some(DebugValue::Gauge(bytes)) = value("claude_cache_bytes", None) else {
        panic!("no bytes gauge")
    };
    assert_eq!(
        bytes.into_inner() as u64,
        handle.bytes(),
        "the gauge says what is held"
    );
    assert!(handle.bytes() <= MAX && handle.bytes() > 0);
    // Stored 11, evicted some: the entries left are what the gauge counts.
    assert!(handle.entry_count() + evicted <= 11);
}
