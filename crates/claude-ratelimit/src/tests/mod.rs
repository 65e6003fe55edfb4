//! Unit tests of the layer against the in-process upstream of [`harness`], on tokio's
//! paused clock: refill, queue waits, pauses and deadlines are exact.
// Exact float comparisons are the point: bucket levels are whole milli-tokens.
#![allow(clippy::float_cmp, clippy::unchecked_time_subtraction)]

mod harness;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use claude_core::{BoxError, Error, ErrorKind, Tenant, UsageBody};
use http::{Request, Response};
use http_body_util::BodyExt;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};

use self::harness::{Reply, TestBody, Upstream, estimate, message, tagged};
use crate::{KeyScope, KeySnapshot, RateLimit, RateLimitLayer};

const SONNET: &str = "claude-sonnet-4-5";

type Svc = RateLimit<Upstream>;
type Resp = Response<UsageBody<TestBody>>;

fn exact() -> RateLimitLayer {
    RateLimitLayer::new().safety_margin(Duration::ZERO)
}

async fn send(svc: &mut Svc, req: Request<Bytes>) -> Result<Resp, BoxError> {
    svc.ready().await?.call(req).await
}

/// Sends and reads the whole body; returns the status.
async fn complete(svc: &mut Svc, req: Request<Bytes>) -> Result<u16, BoxError> {
    let resp = send(svc, req).await?;
    let status = resp.status().as_u16();
    let _ = resp.into_body().collect().await;
    Ok(status)
}

fn kind(e: &BoxError) -> ErrorKind {
    e.downcast_ref::<Error>()
        .map_or(ErrorKind::Internal, Error::kind)
}

fn snap(layer: &RateLimitLayer, model: &str) -> KeySnapshot {
    layer.snapshot(&Tenant::default(), model).unwrap()
}

fn levels(s: &KeySnapshot) -> (f64, f64, f64) {
    (
        s.requests.unwrap().available,
        s.input_tokens.unwrap().available,
        s.output_tokens.unwrap().available,
    )
}

type Case = (&'static str, bool, Read, (f64, f64, f64));

#[derive(Clone, Copy)]
enum Read {
    All,
    Frames(usize),
    Nothing,
}

/// Every settlement rule, checked to the token: the buckets end exactly where the rules
/// say (no time passes: nothing sleeps on the paused clock).
#[tokio::test(start_paused = true)]
async fn settlement_is_exact_for_every_outcome() {
    let layer = exact()
        .requests_per_minute(1000)
        .input_tokens_per_minute(100_000)
        .output_tokens_per_minute(10_000);
    let e = estimate(&message(SONNET, 400, 100, false));
    let usage_cache = format!(
        r#"{{"input_tokens":{e},"cache_creation_input_tokens":20,"cache_read_input_tokens":30,"output_tokens":5}}"#
    );
    let upstream =
        Upstream::new(
            move |req| match req.headers().get("x-case").unwrap().to_str().unwrap() {
                "json" | "json_unread" => Reply::json(e, 7),
                "sse" | "sse_dropped" | "sse_unread" => Reply::sse(e, 9),
                "sse_error_event" => Reply::sse_error_after_start(e),
                "sse_reset" => Reply::sse(e, 9).fail_after(2),
                "json_reset" => Reply::json(e, 7).fail_after(0),
                "429" => Reply::error(429, "rate_limit_error"),
                "529" => Reply::error(529, "overloaded_error"),
                "transport" => Reply::transport_error(),
                "overuse" => Reply::json(e, 150),
                "cache" => Reply::json_usage(&usage_cache),
                "invalid" => Reply::error(400, "invalid_request_error"),
                other => panic!("{other}"),
            },
        );
    let mut svc = layer.layer(upstream);
    let (ei, e_req) = (e as f64, 1.0);
    // (case, stream, how the client reads, expected charge: requests, input, output)
    let cases: Vec<Case> = vec![
        ("json", false, Read::All, (e_req, ei, 7.0)),
        ("sse", true, Read::All, (e_req, ei, 9.0)),
        // message_start and one delta seen: output 1 so far.
        ("sse_dropped", true, Read::Frames(2), (e_req, ei, 1.0)),
        ("sse_error_event", true, Read::All, (e_req, ei, 1.0)),
        ("sse_reset", true, Read::All, (e_req, ei, 1.0)),
        // Nothing seen: input stays reserved, output 0 (what was seen).
        ("sse_unread", true, Read::Nothing, (e_req, ei, 0.0)),
        // A JSON answer was produced whole before its head: the reservation stays.
        ("json_unread", false, Read::Nothing, (e_req, ei, 100.0)),
        ("json_reset", false, Read::All, (e_req, ei, 100.0)),
        ("429", false, Read::All, (e_req, 0.0, 0.0)),
        ("529", false, Read::All, (e_req, ei, 0.0)),
        ("transport", false, Read::All, (e_req, ei, 100.0)),
        ("overuse", false, Read::All, (e_req, ei, 150.0)),
        // Cache writes count toward ITPM, cache reads do not (Sonnet 4.5).
        ("cache", false, Read::All, (e_req, ei + 20.0, 5.0)),
        // An invalid body reserves 1 request + 1 input token; the 400 refunds the token.
        ("invalid", false, Read::All, (e_req, 0.0, 0.0)),
    ];
    let mut expect = (1000.0, 100_000.0, 10_000.0);
    for (case, stream, read, charge) in cases {
        let mut req = if case == "invalid" {
            // No max_tokens: invalid (a body without a model would key as "unknown").
            Request::post("/v1/messages")
                .body(Bytes::from_static(
                    br#"{"model":"claude-sonnet-4-5","messages":[{"role":"user","content":"hi"}]}"#,
                ))
                .unwrap()
        } else {
            message(SONNET, 400, 100, stream)
        };
        req.headers_mut().insert("x-case", case.parse().unwrap());
        match send(&mut svc, req).await {
            Ok(resp) => {
                let mut body = resp.into_body();
                match read {
                    Read::All => while let Some(Ok(_)) = body.frame().await {},
                    Read::Frames(n) => {
                        for _ in 0..n {
                            body.frame().await.unwrap().unwrap();
                        }
                    }
                    Read::Nothing => {}
                }
                drop(body);
            }
            Err(e) => assert_eq!(case, "transport", "{e}"),
        }
        expect = (
            expect.0 - charge.0,
            expect.1 - charge.1,
            expect.2 - charge.2,
        );
        let s = snap(&layer, SONNET);
        assert_eq!(levels(&s), expect, "after {case}");
        assert_eq!(s.in_flight, 0, "after {case}");
    }
    let s = snap(&layer, SONNET);
    assert_eq!(s.settled_requests, 14);
    assert_eq!(s.settled_input_tokens as f64, 100_000.0 - expect.1);
    assert_eq!(s.settled_output_tokens as f64, 10_000.0 - expect.2);
}

/// Haiku 3.5 counts cache reads toward ITPM (API reference §1.2).
#[tokio::test(start_paused = true)]
async fn haiku_3_counts_cache_reads() {
    let model = "claude-3-5-haiku-20241022";
    let layer = exact().input_tokens_per_minute(10_000);
    let e = estimate(&message(model, 40, 100, false));
    let usage = format!(
        r#"{{"input_tokens":{e},"cache_creation_input_tokens":20,"cache_read_input_tokens":30,"output_tokens":5}}"#
    );
    let mut svc = layer.layer(Upstream::new(move |_| Reply::json_usage(&usage)));
    complete(&mut svc, message(model, 40, 100, false))
        .await
        .unwrap();
    let s = snap(&layer, model);
    assert_eq!(s.input_tokens.unwrap().available, (10_000 - e - 50) as f64);
}

/// A request that finds the bucket empty waits exactly as long as it takes to refill.
#[tokio::test(start_paused = true)]
async fn queued_request_waits_exactly_for_the_refill() {
    let layer = exact().requests_per_minute(60); // one per second
    let upstream = Upstream::new(|_| Reply::json(1, 1));
    let counters = Arc::clone(&upstream.counters);
    let mut svc = layer.layer(upstream);
    let start = Instant::now();
    for _ in 0..60 {
        complete(&mut svc, message(SONNET, 10, 10, false))
            .await
            .unwrap();
    }
    assert_eq!(
        start.elapsed(),
        Duration::ZERO,
        "a full bucket spends at once"
    );
    complete(&mut svc, message(SONNET, 10, 10, false))
        .await
        .unwrap();
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_secs(1) && waited < Duration::from_millis(1005),
        "{waited:?}"
    );
    assert_eq!(counters.calls(), 61);
}

/// Strict FIFO: a small request does not overtake a large one queued before it, even when
/// the bucket could cover the small one.
#[tokio::test(start_paused = true)]
async fn queue_is_fifo_and_large_requests_are_not_starved() {
    let a = message(SONNET, 2000, 10, false);
    let b = message(SONNET, 1800, 10, false);
    let c = message(SONNET, 10, 10, false);
    let (ea, eb, ec) = (estimate(&a), estimate(&b), estimate(&c));
    let itpm = ea + 50; // after A: 50 left, enough for C, not for B
    assert!(ec < 50 && eb > 50);
    let layer = exact()
        .input_tokens_per_minute(itpm)
        .max_wait(Duration::from_secs(600));
    let upstream = Upstream::new(|_| Reply::json(1, 1));
    let counters = Arc::clone(&upstream.counters);
    let mut svc = layer.layer(upstream);
    // A's body is held unread, so its reservation is not settled (no refund) meanwhile.
    let resp_a = send(&mut svc, tagged(a, "a")).await.unwrap();
    let fut_b = svc.ready().await.unwrap().call(tagged(b, "b"));
    let fut_c = svc.ready().await.unwrap().call(tagged(c, "c"));
    assert_eq!(snap(&layer, SONNET).queued, 2);
    let start = Instant::now();
    // Poll C first: it must still wait for B.
    let hc = tokio::spawn(fut_c);
    let hb = tokio::spawn(fut_b);
    let rc = hc.await.unwrap().unwrap();
    let rb = hb.await.unwrap().unwrap();
    assert_eq!((rb.status().as_u16(), rc.status().as_u16()), (200, 200));
    assert_eq!(counters.order(), ["a", "b", "c"]);
    // B waited for its whole deficit at itpm / 60 per second.
    let deficit = (eb - 50) as f64 * 60.0 / itpm as f64;
    assert!(
        start.elapsed().as_secs_f64() >= deficit,
        "{:?}",
        start.elapsed()
    );
    drop(resp_a);
}

#[tokio::test(start_paused = true)]
async fn full_queue_long_wait_and_impossible_requests_are_refused_at_once() {
    let layer = exact()
        .requests_per_minute(1)
        .input_tokens_per_minute(100)
        .max_queue(1)
        .max_wait(Duration::from_secs(600));
    let upstream = Upstream::new(|_| Reply::json(1, 1));
    let counters = Arc::clone(&upstream.counters);
    let mut svc = layer.layer(upstream);
    complete(&mut svc, message(SONNET, 10, 1, false))
        .await
        .unwrap();
    let queued = svc
        .ready()
        .await
        .unwrap()
        .call(message(SONNET, 10, 1, false));
    let start = Instant::now();
    let err = send(&mut svc, message(SONNET, 10, 1, false))
        .await
        .unwrap_err();
    assert_eq!(start.elapsed(), Duration::ZERO);
    let err = err.downcast::<Error>().unwrap();
    assert_eq!(err.kind(), ErrorKind::QueueFull);
    // One request ahead and this one, at one per minute.
    assert_eq!(err.retry_after(), Some(Duration::from_secs(120)));
    let resp = err.into_response();
    assert_eq!(resp.status(), 429);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"]["type"], "rate_limit_error");
    assert!(v["error"]["message"].as_str().unwrap().contains("local"));
    drop(queued);
    assert_eq!(snap(&layer, SONNET).queued, 0, "a dropped waiter leaves");

    // A wait longer than max_wait is refused at once, with the estimate.
    let layer = exact()
        .requests_per_minute(1)
        .max_wait(Duration::from_secs(30));
    let mut svc = layer.layer(Upstream::new(|_| Reply::json(1, 1)));
    complete(&mut svc, message(SONNET, 10, 1, false))
        .await
        .unwrap();
    let err = send(&mut svc, message(SONNET, 10, 1, false))
        .await
        .unwrap_err();
    assert_eq!(start.elapsed(), Duration::ZERO);
    let err = err.downcast::<Error>().unwrap();
    assert_eq!(err.kind(), ErrorKind::QueueTimeout);
    assert_eq!(err.retry_after(), Some(Duration::from_secs(60)));

    // More input than the bucket holds can never pass: a 400 naming the limit.
    let big = message(SONNET, 1000, 1, false);
    assert!(estimate(&big) > 100);
    let mut svc = exact()
        .input_tokens_per_minute(100)
        .layer(Upstream::new(|_| Reply::json(1, 1)));
    let err = send(&mut svc, big).await.unwrap_err();
    assert_eq!(kind(&err), ErrorKind::InvalidRequest);
    assert!(
        err.to_string().contains("100 input tokens per minute"),
        "{err}"
    );
    assert_eq!(
        err.downcast::<Error>().unwrap().into_response().status(),
        400
    );
    assert_eq!(counters.calls(), 1);
}

/// Queue estimates learn how much of the output reservations answers use: with strict
/// reservations mostly refunded, a queue that the worst case would refuse is accepted.
#[tokio::test(start_paused = true)]
async fn estimates_learn_the_share_of_output_used() {
    let layer = exact()
        .output_tokens_per_minute(600) // 10 per second
        .max_wait(Duration::from_secs(10));
    let upstream = Upstream::new(|_| Reply::json(1, 10));
    let counters = Arc::clone(&upstream.counters);
    let mut svc = layer.layer(upstream);
    // Before any history: 4 answers hold the whole bucket; one more would wait 10 s for
    // its 100 tokens at worst: fine; a second one 20 s: refused at once.
    let mut held = Vec::new();
    for _ in 0..6 {
        held.push(
            send(&mut svc, message(SONNET, 10, 100, false))
                .await
                .unwrap(),
        );
    }
    let w1 = svc
        .ready()
        .await
        .unwrap()
        .call(message(SONNET, 10, 100, false));
    let refused = send(&mut svc, message(SONNET, 10, 100, false)).await;
    assert_eq!(kind(&refused.unwrap_err()), ErrorKind::QueueTimeout);
    drop(w1);
    for r in held.drain(..) {
        r.into_body().collect().await.unwrap();
    }
    // History: 20 answers used 10 of their 100 tokens.
    for _ in 0..20 {
        complete(&mut svc, message(SONNET, 10, 100, false))
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_secs(60)).await; // full again
    for _ in 0..6 {
        held.push(
            send(&mut svc, message(SONNET, 10, 100, false))
                .await
                .unwrap(),
        );
    }
    let mut waiting = Vec::new();
    for _ in 0..5 {
        waiting.push(
            svc.ready()
                .await
                .unwrap()
                .call(message(SONNET, 10, 100, false)),
        );
    }
    assert_eq!(snap(&layer, SONNET).queued, 5, "none refused");
    for r in held {
        r.into_body().collect().await.unwrap();
    }
    for w in waiting {
        w.await.unwrap().into_body().collect().await.unwrap();
    }
    assert_eq!(counters.calls(), 6 + 20 + 6 + 5);
}

/// A waiter blocked by concurrency (which no estimate covers) gives up at its deadline.
#[tokio::test(start_paused = true)]
async fn waiter_gives_up_at_max_wait() {
    let layer = exact()
        .max_concurrent_requests(1)
        .max_wait(Duration::from_secs(5));
    let mut svc = layer.layer(Upstream::new(|_| Reply::json(1, 1)));
    let held = send(&mut svc, message(SONNET, 10, 1, false)).await.unwrap();
    let start = Instant::now();
    let err = send(&mut svc, message(SONNET, 10, 1, false))
        .await
        .unwrap_err();
    assert_eq!(kind(&err), ErrorKind::QueueTimeout);
    assert_eq!(start.elapsed(), Duration::from_secs(5));
    assert_eq!(snap(&layer, SONNET).queued, 0);
    drop(held); // the body ends: the slot is free
    let start = Instant::now();
    complete(&mut svc, message(SONNET, 10, 1, false))
        .await
        .unwrap();
    assert_eq!(start.elapsed(), Duration::ZERO);
}

/// Cancel safety: a dropped waiter leaves the queue, the next one moves up, nothing is
/// charged for it.
#[tokio::test(start_paused = true)]
async fn cancelled_waiters_leave_the_queue() {
    let layer = exact().requests_per_minute(60);
    let upstream = Upstream::new(|_| Reply::json(1, 1));
    let counters = Arc::clone(&upstream.counters);
    let mut svc = layer.layer(upstream);
    for _ in 0..60 {
        complete(&mut svc, message(SONNET, 10, 1, false))
            .await
            .unwrap();
    }
    let start = Instant::now();
    let f1 = svc
        .ready()
        .await
        .unwrap()
        .call(tagged(message(SONNET, 10, 1, false), 1));
    let f2 = svc
        .ready()
        .await
        .unwrap()
        .call(tagged(message(SONNET, 10, 1, false), 2));
    let f3 = svc
        .ready()
        .await
        .unwrap()
        .call(tagged(message(SONNET, 10, 1, false), 3));
    let f4 = svc
        .ready()
        .await
        .unwrap()
        .call(tagged(message(SONNET, 10, 1, false), 4));
    assert_eq!(snap(&layer, SONNET).queued, 4);
    drop(f1); // the head
    drop(f3); // one in the middle
    assert_eq!(snap(&layer, SONNET).queued, 2);
    f2.await.unwrap();
    assert_eq!(
        start.elapsed(),
        Duration::from_secs(1),
        "2 moved up to the head"
    );
    f4.await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_secs(2));
    assert_eq!(counters.order(), ["2", "4"]);
    // Cancelling a timed wait: a waiter dropped on timeout.
    let f5 = svc
        .ready()
        .await
        .unwrap()
        .call(message(SONNET, 10, 1, false));
    assert!(
        tokio::time::timeout(Duration::from_millis(500), f5)
            .await
            .is_err()
    );
    let s = snap(&layer, SONNET);
    assert_eq!(s.queued, 0);
    assert_eq!(s.settled_requests, 62, "cancelled waiters are not charged");
}

/// A call dropped after it was sent keeps its charge (the server may have counted it) and
/// frees its concurrency slot.
#[tokio::test(start_paused = true)]
async fn call_cancelled_in_flight_releases_its_slot_and_keeps_its_charge() {
    let layer = exact()
        .max_concurrent_requests(1)
        .requests_per_minute(100)
        .input_tokens_per_minute(10_000)
        .output_tokens_per_minute(10_000);
    let upstream = Upstream::new(|_| Reply::json(1, 1).head_delay(Duration::from_secs(10)));
    let mut svc = layer.layer(upstream);
    let req = message(SONNET, 100, 300, false);
    let e = estimate(&req);
    let fut = svc.ready().await.unwrap().call(req);
    assert!(
        tokio::time::timeout(Duration::from_secs(1), fut)
            .await
            .is_err()
    );
    let s = snap(&layer, SONNET);
    assert_eq!(s.in_flight, 0);
    assert_eq!(
        (
            s.settled_requests,
            s.settled_input_tokens,
            s.settled_output_tokens
        ),
        (1, e, 300)
    );
    // The slot is free: the next call goes at once.
    let req = message(SONNET, 100, 300, false);
    let fut = svc.ready().await.unwrap().call(req);
    assert_eq!(snap(&layer, SONNET).in_flight, 1);
    drop(fut);
}

/// The concurrency slot is held until the response body ends, not until the head arrives.
#[tokio::test(start_paused = true)]
async fn concurrency_slots_are_held_until_the_body_ends() {
    let layer = exact().max_concurrent_requests(2);
    let upstream = Upstream::new(|_| Reply::sse(10, 5).frame_delay(Duration::from_secs(1)));
    let counters = Arc::clone(&upstream.counters);
    let svc = layer.layer(upstream);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let mut svc = svc.clone();
        tasks.push(tokio::spawn(async move {
            complete(&mut svc, message(SONNET, 10, 10, true)).await
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), 200);
    }
    assert_eq!(counters.max_in_flight(), 2);
    assert_eq!(counters.calls(), 6);
    // 3 rounds of 4-second streams.
    assert_eq!(start.elapsed(), Duration::from_secs(12));
}

/// The bucket follows the server's `remaining` down, and only when switched on.
#[tokio::test(start_paused = true)]
async fn follows_the_servers_remaining_figures() {
    for follow in [true, false] {
        let layer = exact().input_tokens_per_minute(6_000).follow_server(follow); // 100/s
        let small = message(SONNET, 40, 10, false);
        let big = message(SONNET, 3000, 10, false);
        let (es, eb) = (estimate(&small), estimate(&big));
        let upstream = Upstream::new(move |req| {
            let e = estimate(req);
            Reply::json(e, 1).header("anthropic-ratelimit-input-tokens-remaining", 200)
        });
        let mut svc = layer.layer(upstream);
        complete(&mut svc, small).await.unwrap();
        let available = snap(&layer, SONNET).input_tokens.unwrap().available;
        if follow {
            assert_eq!(available, 200.0);
        } else {
            assert_eq!(available, (6_000 - es) as f64);
        }
        let start = Instant::now();
        complete(&mut svc, big).await.unwrap();
        let waited = start.elapsed();
        if follow {
            // (eb - 200) tokens at 100 per second.
            let expected = Duration::from_millis((eb - 200) * 10);
            assert!(
                waited >= expected && waited < expected + Duration::from_millis(5),
                "{waited:?} vs {expected:?}"
            );
        } else {
            assert_eq!(waited, Duration::ZERO);
        }
    }
}

/// After the server's figure lowered the bucket, the refunds of requests it had already
/// counted are forfeited; after a figure above the bucket, they may raise it up to that
/// figure and no further.
#[tokio::test(start_paused = true)]
async fn refunds_never_raise_the_bucket_past_the_servers_figure() {
    let layer = exact().output_tokens_per_minute(1_000);
    let upstream = Upstream::new(|req| {
        match req.headers().get("x-id").unwrap().to_str().unwrap() {
            // Reserved 500, used 100; the server has 300 left (someone else spent).
            "a" => Reply::json(1, 100).header("anthropic-ratelimit-output-tokens-remaining", 300),
            // Reserved 100 (bucket 200), used 10; the server has 290 left.
            _ => Reply::json(1, 10).header("anthropic-ratelimit-output-tokens-remaining", 290),
        }
    });
    let mut svc = layer.layer(upstream);
    complete(&mut svc, tagged(message(SONNET, 10, 500, false), "a"))
        .await
        .unwrap();
    assert_eq!(snap(&layer, SONNET).output_tokens.unwrap().available, 300.0);
    complete(&mut svc, tagged(message(SONNET, 10, 100, false), "b"))
        .await
        .unwrap();
    assert_eq!(snap(&layer, SONNET).output_tokens.unwrap().available, 290.0);
}

/// One 429 with `retry-after: 2` pauses the key: the requests behind it wait together.
#[tokio::test(start_paused = true)]
async fn upstream_429_pauses_the_key() {
    for follow in [true, false] {
        let layer = exact().requests_per_minute(1000).follow_server(follow);
        let upstream = Upstream::new(|req| {
            if req.headers().contains_key("x-id") {
                Reply::error(429, "rate_limit_error").header("retry-after", 2)
            } else {
                Reply::json(1, 1)
            }
        });
        let counters = Arc::clone(&upstream.counters);
        let svc = layer.layer(upstream);
        let start = Instant::now();
        let status = complete(&mut svc.clone(), tagged(message(SONNET, 10, 1, false), "x"))
            .await
            .unwrap();
        assert_eq!(status, 429);
        let paused = snap(&layer, SONNET).paused_for;
        let mut tasks = Vec::new();
        for _ in 0..5 {
            let mut svc = svc.clone();
            tasks.push(tokio::spawn(async move {
                let status = complete(&mut svc, message(SONNET, 10, 1, false)).await;
                (status.unwrap(), Instant::now())
            }));
        }
        for t in tasks {
            let (status, at) = t.await.unwrap();
            assert_eq!(status, 200);
            if follow {
                assert_eq!(at - start, Duration::from_secs(2));
            } else {
                assert_eq!(at - start, Duration::ZERO);
            }
        }
        assert_eq!(counters.calls(), 6);
        if follow {
            assert_eq!(paused, Some(Duration::from_secs(2)));
        } else {
            assert_eq!(paused, None);
        }
    }
}

/// Without `retry-after`, a 429 pauses until the earliest `-reset` of an exhausted limit,
/// measured on the server's clock (`date`).
#[tokio::test(start_paused = true)]
async fn upstream_429_without_retry_after_pauses_until_reset() {
    let layer = exact().requests_per_minute(1000);
    let upstream = Upstream::new(|_| {
        let now = SystemTime::now();
        Reply::error(429, "rate_limit_error")
            .header("date", httpdate::fmt_http_date(now))
            .header("anthropic-ratelimit-input-tokens-remaining", 0)
            .header(
                "anthropic-ratelimit-input-tokens-reset",
                claude_core::headers::format_rfc3339(now + Duration::from_secs(5)),
            )
            .header("anthropic-ratelimit-requests-remaining", 10)
            .header(
                "anthropic-ratelimit-requests-reset",
                claude_core::headers::format_rfc3339(now + Duration::from_secs(1)),
            )
    });
    let mut svc = layer.layer(upstream);
    assert_eq!(
        complete(&mut svc, message(SONNET, 10, 1, false))
            .await
            .unwrap(),
        429
    );
    let paused = snap(&layer, SONNET).paused_for.unwrap();
    assert!(
        paused > Duration::from_secs(4) && paused < Duration::from_secs(6),
        "{paused:?}"
    );
}

/// Calls to other endpoints are not limited.
#[tokio::test(start_paused = true)]
async fn other_endpoints_pass_through() {
    let layer = exact().requests_per_minute(1).max_queue(0);
    let upstream = Upstream::new(|_| Reply::json(1, 1));
    let counters = Arc::clone(&upstream.counters);
    let mut svc = layer.layer(upstream);
    complete(&mut svc, message(SONNET, 10, 1, false))
        .await
        .unwrap();
    for _ in 0..3 {
        let req = Request::post("/v1/messages/count_tokens")
            .body(Bytes::from_static(
                br#"{"model":"claude-sonnet-4-5","messages":[]}"#,
            ))
            .unwrap();
        complete(&mut svc, req).await.unwrap();
    }
    assert_eq!(counters.calls(), 4);
    assert_eq!(
        kind(
            &send(&mut svc, message(SONNET, 10, 1, false))
                .await
                .unwrap_err()
        ),
        ErrorKind::QueueFull
    );
}

/// Keys are per tenant and model family by default; other scopes share.
#[tokio::test(start_paused = true)]
async fn keys_follow_the_scope() {
    for (scope, shared) in [
        (KeyScope::TenantAndModelFamily, false),
        (KeyScope::Global, true),
    ] {
        let layer = exact().requests_per_minute(1).max_queue(0).scope(scope);
        let mut svc = layer.layer(Upstream::new(|_| Reply::json(1, 1)));
        complete(&mut svc, message(SONNET, 10, 1, false))
            .await
            .unwrap();
        let mut other_tenant = message(SONNET, 10, 1, false);
        other_tenant.extensions_mut().insert(Tenant::new("b"));
        let r1 = send(&mut svc, other_tenant).await;
        let r2 = send(&mut svc, message("claude-opus-4-1", 10, 1, false)).await;
        assert_eq!(r1.is_err(), shared, "{scope:?}");
        assert_eq!(r2.is_err(), shared, "{scope:?}");
        // Sonnet 4 and Sonnet 4.5 are one family: one key.
        let same = message("claude-sonnet-4-20250514", 10, 1, false);
        assert!(send(&mut svc, same).await.is_err(), "{scope:?}");
    }
}

/// State for idle keys is dropped: 100,000 tenants arriving over 10 simulated seconds
/// never make the map hold more than the keys whose buckets are still refilling.
#[tokio::test(start_paused = true)]
async fn memory_stays_bounded_with_100k_tenants() {
    let layer = exact()
        .requests_per_minute(50)
        .input_tokens_per_minute(30_000)
        .output_tokens_per_minute(8_000);
    let upstream = Upstream::new(|_| Reply::json(3, 1));
    let mut svc = layer.layer(upstream);
    let body = message(SONNET, 10, 4, false).into_body();
    let mut max_keys = 0;
    for step in 0..10_000u32 {
        for i in 0..10u32 {
            let mut req = Request::post("/v1/messages").body(body.clone()).unwrap();
            req.extensions_mut()
                .insert(Tenant::new(format!("tenant-{}", step * 10 + i)));
            complete(&mut svc, req).await.unwrap();
        }
        max_keys = max_keys.max(layer.key_count());
        tokio::time::advance(Duration::from_millis(1)).await;
    }
    // A key's buckets refill in 1.2 s (one request at 50 RPM): about 12,000 keys are
    // live at any time, plus the sweep's lag.
    assert!(max_keys < 20_000, "{max_keys} keys held");
    tokio::time::advance(Duration::from_secs(2)).await;
    layer.evict_idle();
    assert_eq!(layer.key_count(), 0);
}

/// Many tasks on one key: the arrivals at the upstream never exceed any bucket (checked
/// over every window), no request is lost, and the key ends idle.
#[tokio::test(start_paused = true)]
async fn hammering_one_key_never_overshoots() {
    let (rpm, itpm) = (120u64, 3_000u64);
    let layer = exact()
        .requests_per_minute(rpm)
        .input_tokens_per_minute(itpm)
        .output_tokens_per_minute(2_000)
        .max_concurrent_requests(8)
        .max_wait(Duration::from_secs(3600))
        .max_queue(10_000);
    let upstream = Upstream::new(|req| {
        let e = estimate(req);
        let out = e % 20 + 1;
        if req.body().windows(13).any(|w| w == b"\"stream\":true") {
            Reply::sse(e, out).frame_delay(Duration::from_millis(50))
        } else {
            Reply::json(e, out).head_delay(Duration::from_millis(100))
        }
    });
    let counters = Arc::clone(&upstream.counters);
    let svc = layer.layer(upstream);
    let mut tasks = Vec::new();
    for t in 0..50usize {
        let mut svc = svc.clone();
        tasks.push(tokio::spawn(async move {
            let mut ok = 0;
            for i in 0..6usize {
                let chars = (t * 37 + i * 101) % 600 + 10;
                let req = message(SONNET, chars, 30, (t + i) % 3 == 0);
                if complete(&mut svc, req).await.unwrap() == 200 {
                    ok += 1;
                }
            }
            ok
        }));
    }
    let mut ok = 0;
    for t in tasks {
        ok += t.await.unwrap();
    }
    assert_eq!(ok, 300);
    let arrivals = counters.arrivals.lock().unwrap().clone();
    assert_eq!(arrivals.len(), 300);
    assert!(counters.max_in_flight() <= 8);
    // Token-bucket conformance: any window [t_i, t_j] holds at most one bucket plus the
    // refill over the window.
    for i in 0..arrivals.len() {
        let (mut n, mut tokens) = (0u64, 0u64);
        for j in i..arrivals.len() {
            n += 1;
            tokens += arrivals[j].1;
            let window = (arrivals[j].0 - arrivals[i].0).as_secs_f64();
            assert!(n as f64 <= rpm as f64 * (1.0 + window / 60.0) + 1e-6);
            assert!(tokens as f64 <= itpm as f64 * (1.0 + window / 60.0) + 1e-6);
        }
    }
    let s = snap(&layer, SONNET);
    assert_eq!((s.in_flight, s.queued, s.settled_requests), (0, 0, 300));
}

/// The metrics: rejections by reason, waits, queue depth, tokens available.
#[test]
fn metrics_are_recorded() {
    use metrics_util::MetricKind;
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    metrics::with_local_recorder(&recorder, || {
        rt.block_on(async {
            let layer = exact()
                .requests_per_minute(60)
                .input_tokens_per_minute(100)
                .scope(KeyScope::Global)
                .max_queue(1)
                .max_wait(Duration::from_secs(10));
            let mut svc = layer.layer(Upstream::new(|_| Reply::json(1, 1)));
            for _ in 0..60 {
                complete(&mut svc, message(SONNET, 10, 1, false))
                    .await
                    .unwrap();
            }
            let waiting = svc
                .ready()
                .await
                .unwrap()
                .call(message(SONNET, 10, 1, false));
            // Queue full.
            assert!(send(&mut svc, message(SONNET, 10, 1, false)).await.is_err());
            waiting.await.unwrap().into_body().collect().await.unwrap();
            // Never fits.
            assert!(
                send(&mut svc, message(SONNET, 1000, 1, false))
                    .await
                    .is_err()
            );
            // Longer than max_wait (60 requests at once again: 60 s ahead).
            let layer = exact()
                .requests_per_minute(1)
                .scope(KeyScope::Global)
                .max_wait(Duration::from_secs(10));
            let mut svc = layer.layer(Upstream::new(|_| Reply::json(1, 1)));
            complete(&mut svc, message(SONNET, 10, 1, false))
                .await
                .unwrap();
            assert!(send(&mut svc, message(SONNET, 10, 1, false)).await.is_err());
        });
    });
    let mut rejections = std::collections::BTreeMap::new();
    let (mut waits, mut depth, mut tokens_labels) = (Vec::new(), None, Vec::new());
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        let name = key.key().name().to_owned();
        let labels: Vec<(String, String)> = key
            .key()
            .labels()
            .map(|l| (l.key().to_owned(), l.value().to_owned()))
            .collect();
        match (name.as_str(), key.kind(), value) {
            ("claude_ratelimit_rejections_total", MetricKind::Counter, DebugValue::Counter(n)) => {
                rejections.insert(labels[0].1.clone(), n);
            }
            ("claude_ratelimit_wait_seconds", MetricKind::Histogram, DebugValue::Histogram(v)) => {
                waits = v.into_iter().map(|x| x.0).collect();
            }
            ("claude_ratelimit_queue_depth", MetricKind::Gauge, DebugValue::Gauge(g)) => {
                depth = Some(g.0);
            }
            ("claude_ratelimit_tokens_available", MetricKind::Gauge, DebugValue::Gauge(_)) => {
                tokens_labels.push(labels);
            }
            _ => {}
        }
    }
    assert_eq!(rejections.get("queue_full"), Some(&1));
    assert_eq!(rejections.get("never_fits"), Some(&1));
    assert_eq!(rejections.get("queue_timeout"), Some(&1));
    assert_eq!(waits.len(), 62);
    assert!(waits.contains(&1.0), "{waits:?}");
    assert_eq!(depth, Some(0.0));
    assert!(tokens_labels.contains(&vec![
        ("kind".to_owned(), "requests".to_owned()),
        ("key".to_owned(), "all".to_owned())
    ]));
    assert!(
        tokens_labels
            .iter()
            .all(|l| l.iter().all(|(k, _)| k != "tenant"))
    );
}
