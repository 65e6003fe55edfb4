//! The layer over real HTTP against claude-mock on loopback, with the mock's limits set
//! equal to the layer's: the mock is the independent oracle that counts what reached it and
//! answers 429 when a limit is overshot. Real time (a paused clock misbehaves with real
//! sockets); the limits are chosen so each test takes seconds.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use claude_core::{BodyEnd, BodyFormat, BoxError, FullBodyService, Tenant, UsageScanner};
use claude_mock::{Limits, MockServer};
use claude_ratelimit::{KeyScope, RateLimit, RateLimitLayer, ScopeLimits};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tower::{Layer, Service, ServiceExt};

type Upstream = FullBodyService<Client<HttpConnector, Full<Bytes>>>;

const MODEL: &str = "claude-sonnet-4-5";

fn upstream() -> Upstream {
    FullBodyService::new(Client::builder(TokioExecutor::new()).build_http())
}

/// A Messages request with a prompt of `chars` characters.
fn message(url: &str, chars: usize, max_tokens: u32, stream: bool) -> Request<Bytes> {
    let body = format!(
        r#"{{"model":"{MODEL}","max_tokens":{max_tokens},"stream":{stream},"messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(chars)
    );
    Request::post(format!("{url}/v1/messages"))
        .header("anthropic-version", "2023-06-01")
        .header("content-type", "application/json")
        .body(Bytes::from(body))
        .unwrap()
}

fn estimate(req: &Request<Bytes>) -> u64 {
    claude_core::RequestMeta::parse(req.uri().path(), req.body()).input_tokens_estimate
}

/// Sends through any service and reads the whole body; returns the status.
async fn complete<S, B>(svc: &mut S, req: Request<Bytes>) -> Result<u16, BoxError>
where
    S: Service<Request<Bytes>, Response = Response<B>>,
    S::Error: Into<BoxError>,
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let resp = svc.ready().await.map_err(Into::into)?;
    let resp = resp.call(req).await.map_err(Into::into)?;
    let status = resp.status().as_u16();
    resp.into_body().collect().await.map_err(Into::into)?;
    Ok(status)
}

/// The burst of the issue: 500 requests of mixed sizes (a fifth of them large), a third
/// streamed, about 35,000 input tokens against 30,000 ITPM.
fn burst(url: &str) -> Vec<Request<Bytes>> {
    (0..500)
        .map(|i| {
            let chars = if i % 5 == 0 { 1050 } else { 50 };
            message(url, chars, 16 + (i % 4) * 16, i % 3 == 0)
        })
        .collect()
}

const BURST_LIMITS: Limits = Limits {
    requests_per_minute: Some(450),
    input_tokens_per_minute: Some(30_000),
    output_tokens_per_minute: Some(8_000),
};

async fn fire(svc: &RateLimit<Upstream>, requests: Vec<Request<Bytes>>) -> Vec<u16> {
    let tasks: Vec<_> = requests
        .into_iter()
        .map(|req| {
            let mut svc = svc.clone();
            tokio::spawn(async move { complete(&mut svc, req).await.unwrap() })
        })
        .collect();
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    statuses
}

/// Without the layer the burst draws 429s; with it, none, and all 500 complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_of_500_completes_without_a_single_429() {
    // Without the layer: the same burst against the same limits.
    let bare = MockServer::builder()
        .limits(BURST_LIMITS)
        .start()
        .await
        .unwrap();
    let requests = burst(&bare.url());
    let total: u64 = requests.iter().map(estimate).sum();
    assert!((34_000..36_000).contains(&total), "{total}");
    let client = upstream();
    let tasks: Vec<_> = requests
        .into_iter()
        .map(|req| {
            let mut svc = client.clone();
            tokio::spawn(async move { complete(&mut svc, req).await.unwrap() })
        })
        .collect();
    let mut refused = 0;
    for t in tasks {
        refused += usize::from(t.await.unwrap() == 429);
    }
    let stats = bare.stats();
    assert!(stats.rate_limited > 0, "the burst must exceed the limits");
    assert_eq!(stats.rate_limited as usize, refused);

    // With the layer, limits equal to the server's.
    let mock = MockServer::builder()
        .limits(BURST_LIMITS)
        .start()
        .await
        .unwrap();
    let layer = RateLimitLayer::new()
        .requests_per_minute(450)
        .input_tokens_per_minute(30_000)
        .output_tokens_per_minute(8_000)
        .max_concurrent_requests(32)
        // At a cold start the layer has no history of how much of the strict output
        // reservations answers use, so the queue's wait estimates assume all of it (up to
        // 90 s here, though the real wait is about 10 s): allow for that worst case.
        .max_wait(Duration::from_secs(120));
    let svc = layer.layer(upstream());
    let started = Instant::now();
    let statuses = fire(&svc, burst(&mock.url())).await;
    let elapsed = started.elapsed();
    let stats = mock.stats();
    assert_eq!(stats.rate_limited, 0, "{stats:?}");
    assert_eq!(statuses.len(), 500);
    assert!(statuses.iter().all(|s| *s == 200));
    assert_eq!(stats.requests, 500);
    assert_eq!(stats.by_status.get("200"), Some(&500));
    assert!(stats.max_in_flight <= 32, "{}", stats.max_in_flight);
    // The demand exceeded one bucket: the layer must have spread it over time.
    assert!(elapsed > Duration::from_secs(5), "{elapsed:?}");
    let key = layer.snapshot(&Tenant::default(), MODEL).unwrap();
    assert_eq!(
        (key.in_flight, key.queued, key.settled_requests),
        (0, 0, 500)
    );
    assert_eq!(key.settled_input_tokens, total);
    assert_eq!(key.settled_output_tokens, stats.usage.output_tokens);
}

/// What the layer must settle a request to, by the rule table of the crate docs, from the
/// bytes the client read (the same bytes the layer's scanner saw).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Charge {
    requests: u64,
    input: u64,
    output: u64,
}

#[derive(Debug, Clone, Copy)]
enum Variant {
    Json,
    Stream,
    StreamError,
    StreamDropped,
    JsonReset,
    StreamReset,
}

async fn hammer_one(
    svc: &mut RateLimit<Upstream>,
    url: &str,
    chars: usize,
    output: u64,
    variant: Variant,
) -> Charge {
    let stream = !matches!(variant, Variant::Json | Variant::JsonReset);
    let mut req = message(url, chars, 32, stream);
    let input = estimate(&req);
    let h = req.headers_mut();
    h.insert("x-mock-output-tokens", output.into());
    match variant {
        Variant::StreamError => {
            h.insert("x-mock-stream-error-after", 2.into());
        }
        Variant::JsonReset => {
            h.insert("x-mock-reset-after", 50.into());
        }
        Variant::StreamReset => {
            h.insert("x-mock-reset-after", 400.into());
        }
        _ => {}
    }
    let resp = match svc.ready().await.unwrap().call(req).await {
        Ok(resp) => resp,
        // A JSON answer is one frame: hyper may abort the connection before the head is
        // flushed, and then the call itself fails. The rules charge a call without an
        // answer the whole reservation, as a JSON body cut before its usage.
        Err(e) if matches!(variant, Variant::JsonReset) => {
            let e = claude_core::Error::from_box(e);
            assert_eq!(e.kind(), claude_core::ErrorKind::Connection, "{e}");
            return Charge {
                requests: 1,
                input,
                output: 32,
            };
        }
        Err(e) => panic!("{variant:?}: {e}"),
    };
    assert_eq!(resp.status(), 200);
    let mut scanner = UsageScanner::for_headers(resp.headers());
    let mut body = resp.into_body();
    let mut frames = 0;
    let end = loop {
        if matches!(variant, Variant::StreamDropped) && frames == 2 {
            break BodyEnd::Dropped;
        }
        match body.frame().await {
            None => break BodyEnd::Ended,
            Some(Err(_)) => break BodyEnd::Failed,
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    scanner.feed(data);
                }
                frames += 1;
            }
        }
    };
    drop(body);
    let report = scanner.finish(end);
    if report.saw_usage {
        Charge {
            requests: 1,
            input: report.usage.itpm_tokens(),
            output: report.usage.output_tokens,
        }
    } else if report.format == BodyFormat::Sse {
        Charge {
            requests: 1,
            input,
            output: 0,
        }
    } else {
        Charge {
            requests: 1,
            input,
            output: 32,
        }
    }
}

/// Many tasks hammering one key with every kind of ending (complete, in-stream error,
/// client drop, connection reset mid-body): the mock never refuses (no limit overshot),
/// every request ends, and the layer settled exactly what the rules say.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hammering_one_key_never_overshoots_and_settles_exactly() {
    let limits = Limits {
        requests_per_minute: Some(300),
        input_tokens_per_minute: Some(6_000),
        output_tokens_per_minute: Some(3_000),
    };
    let mock = MockServer::builder()
        .limits(limits)
        .token_latency(Duration::from_millis(2))
        .start()
        .await
        .unwrap();
    let layer = RateLimitLayer::new()
        .requests_per_minute(300)
        .input_tokens_per_minute(6_000)
        .output_tokens_per_minute(3_000)
        .max_concurrent_requests(16)
        .max_wait(Duration::from_secs(60));
    let svc = layer.layer(upstream());
    let url = Arc::<str>::from(mock.url());
    let started = Instant::now();
    let variants = [
        Variant::Json,
        Variant::Stream,
        Variant::StreamError,
        Variant::StreamDropped,
        Variant::JsonReset,
        Variant::StreamReset,
    ];
    let mut tasks = Vec::new();
    for t in 0..24usize {
        let mut svc = svc.clone();
        let url = Arc::clone(&url);
        tasks.push(tokio::spawn(async move {
            let mut total = Charge::default();
            for i in 0..7usize {
                let chars = (t * 53 + i * 29) % 170 + 40;
                let output = ((t + i) % 30 + 1) as u64;
                let c = hammer_one(&mut svc, &url, chars, output, variants[(t + i) % 6]).await;
                total.requests += c.requests;
                total.input += c.input;
                total.output += c.output;
            }
            total
        }));
    }
    let mut expected = Charge::default();
    for t in tasks {
        let c = t.await.unwrap();
        expected.requests += c.requests;
        expected.input += c.input;
        expected.output += c.output;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let stats = mock.stats();
    assert_eq!(stats.rate_limited, 0, "{stats:?}");
    assert_eq!(stats.requests, 168);
    assert!(stats.requests as f64 <= 300.0 * (1.0 + elapsed / 60.0));
    // Every request reached the mock and ended in one answer.
    assert_eq!(stats.by_status.get("200"), Some(&168), "{stats:?}");
    // The settlement: exactly the rule table applied to what the client saw.
    let key = layer.snapshot(&Tenant::default(), MODEL).unwrap();
    assert_eq!((key.in_flight, key.queued), (0, 0));
    assert_eq!(
        Charge {
            requests: key.settled_requests,
            input: key.settled_input_tokens,
            output: key.settled_output_tokens,
        },
        expected
    );
    // The demand exceeded the input bucket, so the layer queued.
    assert!(expected.input > 6_000, "{expected:?}");
}

/// The mock's bucket was drained by another client: the layer learns it from the first
/// answer's `remaining` and paces the rest; without server-following the same traffic draws
/// 429s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn low_remaining_slows_the_layer_down() {
    let mut refused_without_following = 0;
    for follow in [true, false] {
        let limits = Limits {
            requests_per_minute: Some(1_000),
            input_tokens_per_minute: Some(12_000),
            output_tokens_per_minute: Some(100_000),
        };
        let mock = MockServer::builder().limits(limits).start().await.unwrap();
        let url = mock.url();
        // Someone else spends 11,000 of the 12,000 input tokens.
        let mut drain = message(&url, 10, 16, false);
        drain
            .headers_mut()
            .insert("x-mock-usage", "input=11000".parse().unwrap());
        assert_eq!(complete(&mut upstream(), drain).await.unwrap(), 200);

        let layer = RateLimitLayer::new()
            .requests_per_minute(1_000)
            .input_tokens_per_minute(12_000)
            .output_tokens_per_minute(100_000)
            .follow_server(follow);
        let svc = layer.layer(upstream());
        // One probe learns the server's figure.
        assert_eq!(
            complete(&mut svc.clone(), message(&url, 10, 16, false))
                .await
                .unwrap(),
            200
        );
        let available = layer
            .snapshot(&Tenant::default(), MODEL)
            .unwrap()
            .input_tokens
            .unwrap()
            .available;
        if follow {
            assert!(available < 1_100.0, "{available}");
        } else {
            assert!(available > 11_000.0, "{available}");
        }
        // Then 20 requests of about 60 tokens: more than the server has left.
        let requests: Vec<_> = (0..20).map(|_| message(&url, 210, 16, false)).collect();
        let statuses = fire(&svc, requests).await;
        let stats = mock.stats();
        if follow {
            assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
            assert_eq!(stats.rate_limited, 0);
        } else {
            refused_without_following = stats.rate_limited;
        }
    }
    assert!(refused_without_following > 0);
}

/// One 429 with `retry-after: 2` pauses the key: the requests behind it wait together
/// instead of going out and drawing more 429s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_429_pauses_the_key_for_the_others() {
    let mock = MockServer::builder().rpm(1_000).start().await.unwrap();
    let url = mock.url();
    let layer = RateLimitLayer::new().requests_per_minute(1_000);
    let svc = layer.layer(upstream());
    let started = Instant::now();
    let mut first = message(&url, 10, 16, false);
    first
        .headers_mut()
        .insert("x-mock-fault", "429".parse().unwrap());
    first
        .headers_mut()
        .insert("x-mock-retry-after", "2".parse().unwrap());
    assert_eq!(complete(&mut svc.clone(), first).await.unwrap(), 429);
    let others: Vec<_> = (0..5)
        .map(|_| {
            let mut svc = svc.clone();
            let req = message(&url, 10, 16, false);
            tokio::spawn(async move {
                let status = complete(&mut svc, req).await.unwrap();
                (status, Instant::now())
            })
        })
        .collect();
    // Well inside the 2-second pause.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        mock.stats().requests,
        1,
        "nothing may go out during the pause"
    );
    assert_eq!(layer.snapshot(&Tenant::default(), MODEL).unwrap().queued, 5);
    for t in others {
        let (status, at) = t.await.unwrap();
        assert_eq!(status, 200);
        assert!(at.duration_since(started) >= Duration::from_secs(2));
    }
    let stats = mock.stats();
    assert_eq!(stats.requests, 6);
    assert_eq!(stats.by_status.get("429"), Some(&1));
}

/// Two tenants, each limited per tenant and model family (the layer's scope) to the whole
/// organisation's RPM, plus a further `model_family` scope at that same RPM: the mock, whose
/// limit is the organisation's, must never answer 429. Without the further scope, the same
/// traffic overshoots (the control).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_further_scope_holds_the_organisation_limit_across_tenants() {
    const RPM: u64 = 240;
    let limits = Limits {
        requests_per_minute: Some(RPM),
        input_tokens_per_minute: None,
        output_tokens_per_minute: None,
    };
    let layer = |family_too: bool| {
        let layer = RateLimitLayer::new()
            .requests_per_minute(RPM)
            .max_wait(Duration::from_secs(60))
            .safety_margin(Duration::from_secs(1));
        let layer = if family_too {
            layer.scope_limits(ScopeLimits {
                requests_per_minute: Some(RPM),
                ..ScopeLimits::new(KeyScope::ModelFamily)
            })
        } else {
            layer
        };
        layer.layer(upstream())
    };
    // 2 tenants x 150 requests: 300 against 240 per minute.
    let send = |svc: RateLimit<Upstream>, url: String| async move {
        let requests = (0..300)
            .map(|i| {
                let mut req = message(&url, 40, 16, i % 3 == 0);
                req.extensions_mut()
                    .insert(Tenant::new(if i % 2 == 0 { "a" } else { "b" }));
                req
            })
            .collect();
        fire(&svc, requests).await
    };
    let control = MockServer::builder().limits(limits).start().await.unwrap();
    let statuses = send(layer(false), control.url()).await;
    assert!(control.stats().rate_limited > 0, "{:?}", control.stats());
    assert!(statuses.contains(&429));

    let mock = MockServer::builder().limits(limits).start().await.unwrap();
    let started = Instant::now();
    let statuses = send(layer(true), mock.url()).await;
    let stats = mock.stats();
    assert_eq!(stats.rate_limited, 0, "{stats:?}");
    assert_eq!(statuses.len(), 300);
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(stats.requests, 300);
    // 300 requests against 240 per minute: the last ones waited for the refill.
    assert!(started.elapsed() > Duration::from_secs(10));
}
