#![allow(clippy::unwrap_used)]
//! The cost layer over real HTTP against claude-mock on loopback: what the tracker records
//! must equal what the mock served, to the token and to the nano-dollar.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use claude_core::{Error, ErrorKind, FullBodyService, Tenant};
use claude_cost::{AlertKind, Budget, BudgetAlert, BudgetConfig, CostLayer, CostTracker, Usd};
use claude_mock::MockServer;
use futures_util::StreamExt;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tower::{Layer, ServiceExt};

type Upstream = FullBodyService<Client<HttpConnector, Full<Bytes>>>;

fn upstream() -> Upstream {
    FullBodyService::new(Client::builder(TokioExecutor::new()).build_http())
}

fn messages(url: &str) -> http::request::Builder {
    Request::post(format!("{url}/v1/messages"))
        .header("anthropic-version", "2023-06-01")
        .header("content-type", "application/json")
}

fn body(model: &str, max_tokens: u32, stream: bool) -> Bytes {
    Bytes::from(format!(
        r#"{{"model":"{model}","max_tokens":{max_tokens},"stream":{stream},"messages":[{{"role":"user","content":"What does a tower layer do?"}}]}}"#
    ))
}

/// Prices typed in by hand from the price page, independent of the crate: nano-dollars
/// per token ($/MTok × 1000) for (input, output, 5m write, 1h write, cache read).
fn price(model: &str, long_context: bool) -> Option<(&'static str, [u64; 5])> {
    Some(match model {
        "claude-opus-4-5" => (
            "claude-opus-4-5-20251101",
            [5_000, 25_000, 6_250, 10_000, 500],
        ),
        "claude-opus-4-1" => (
            "claude-opus-4-1-20250805",
            [15_000, 75_000, 18_750, 30_000, 1_500],
        ),
        "claude-sonnet-4-5-20250929" if long_context => (
            "claude-sonnet-4-5-20250929",
            [6_000, 22_500, 7_500, 12_000, 600],
        ),
        "claude-sonnet-4-5-20250929" => (
            "claude-sonnet-4-5-20250929",
            [3_000, 15_000, 3_750, 6_000, 300],
        ),
        "claude-haiku-4-5" => (
            "claude-haiku-4-5-20251001",
            [1_000, 5_000, 1_250, 2_000, 100],
        ),
        "claude-3-haiku-20240307" => ("claude-3-haiku-20240307", [250, 1_250, 300, 500, 30]),
        _ => return None,
    })
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Scripted {
    input: u64,
    output: u64,
    read: u64,
    w5m: u64,
    w1h: u64,
}

#[derive(Default)]
struct Expected {
    cost: u64,
    requests: u64,
    tokens: [u64; 5],
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_mixed_requests_match_the_mock_to_the_token_and_the_nano_dollar() {
    const MODELS: [&str; 6] = [
        "claude-opus-4-5",
        "claude-opus-4-1",
        "claude-sonnet-4-5-20250929",
        "claude-haiku-4-5",
        "claude-3-haiku-20240307",
        "claude-mystery-1",
    ];
    const TENANTS: [&str; 3] = ["default", "team-a", "team-b"];
    const LONG_CONTEXT: &str = "context-1m-2025-08-07";
    let mock = MockServer::start().await.unwrap();
    let url = mock.url();
    let tracker = CostTracker::new();
    let layer = CostLayer::new(tracker.clone());
    let client = upstream();

    let mut rng = Rng(0x2545_F491_4F6C_DD1D);
    let mut jobs = Vec::new();
    let mut by_model: BTreeMap<String, Expected> = BTreeMap::new();
    let mut by_tenant: BTreeMap<&str, u64> = BTreeMap::new();
    let (mut total_cost, mut unknown) = (0u64, 0u64);
    for i in 0..1_000u64 {
        let model = MODELS[rng.below(MODELS.len() as u64) as usize];
        let tenant = TENANTS[rng.below(3) as usize];
        let stream = rng.below(2) == 0;
        let mut s = Scripted {
            input: 1 + rng.below(5_000),
            // Streams carry one delta per token: keep them short.
            output: 1 + rng.below(if stream { 300 } else { 5_000 }),
            read: if rng.below(2) == 0 {
                rng.below(20_000)
            } else {
                0
            },
            w5m: if rng.below(3) == 0 {
                rng.below(5_000)
            } else {
                0
            },
            w1h: if rng.below(4) == 0 {
                rng.below(5_000)
            } else {
                0
            },
        };
        // Some Sonnet requests use the 1M context beta; half of those go over 200K.
        let beta = model.starts_with("claude-sonnet") && rng.below(4) == 0;
        if beta && rng.below(2) == 0 {
            s.input = 150_000;
            s.read = 50_000 + rng.below(2); // 200,000 (standard) or 200,001 (long context)
            s.w5m = 0;
            s.w1h = 0;
        }
        let long_context = beta && s.input + s.read + s.w5m + s.w1h > 200_000;
        if let Some((id, p)) = price(model, long_context) {
            let cost =
                s.input * p[0] + s.output * p[1] + s.w5m * p[2] + s.w1h * p[3] + s.read * p[4];
            total_cost += cost;
            *by_tenant.entry(tenant).or_default() += cost;
            let e = by_model.entry(id.to_owned()).or_default();
            e.cost += cost;
            e.requests += 1;
        } else {
            unknown += 1;
            let e = by_model.entry(model.to_owned()).or_default();
            e.requests += 1;
            for (t, v) in e
                .tokens
                .iter_mut()
                .zip([s.input, s.output, s.w5m, s.w1h, s.read])
            {
                *t += v;
            }
        }
        let mut req = messages(&url)
            .header(
                "x-mock-usage",
                format!(
                    "input={},output={},cache_read={},cache_write_5m={},cache_write_1h={}",
                    s.input, s.output, s.read, s.w5m, s.w1h
                ),
            )
            .header("x-mock-key", format!("req-{i}"));
        if beta {
            req = req.header(
                "anthropic-beta",
                format!("prompt-caching-2024-07-31,{LONG_CONTEXT}"),
            );
        }
        let mut req = req.body(body(model, 8_192, stream)).unwrap();
        if tenant != "default" {
            req.extensions_mut().insert(Tenant::new(tenant));
        }
        jobs.push(req);
    }

    let svc = layer.layer(client);
    let statuses: Vec<u16> = futures_util::stream::iter(jobs)
        .map(|req| {
            let svc = svc.clone();
            async move {
                let resp = svc.oneshot(req).await.unwrap();
                let status = resp.status().as_u16();
                resp.into_body().collect().await.unwrap();
                status
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    assert!(statuses.iter().all(|&s| s == 200));

    let served = mock.stats();
    let report = tracker.report();
    let t = &report.total;
    assert_eq!(served.requests, 1_000);
    assert_eq!(t.requests, 1_000);
    assert_eq!(t.incomplete_requests, 0);
    // To the token.
    assert_eq!(t.input_tokens, served.usage.input_tokens);
    assert_eq!(t.output_tokens, served.usage.output_tokens);
    assert_eq!(
        t.cache_write_tokens(),
        served.usage.cache_creation_input_tokens
    );
    assert_eq!(t.cache_read_tokens, served.usage.cache_read_input_tokens);
    // To the nano-dollar, against the plain formula above.
    assert_eq!(t.cost, Usd::from_nanos(total_cost));
    assert_eq!(t.unpriced_requests, unknown);
    assert!(unknown > 0);
    for (model, e) in &by_model {
        let got = &report.by_model[model];
        assert_eq!(got.requests, e.requests, "{model}");
        assert_eq!(got.cost, Usd::from_nanos(e.cost), "{model}");
        if got.unpriced_requests > 0 {
            assert_eq!(got.unpriced_requests, got.requests, "{model}");
            let tokens = [
                got.input_tokens,
                got.output_tokens,
                got.cache_write_5m_tokens,
                got.cache_write_1h_tokens,
                got.cache_read_tokens,
            ];
            assert_eq!(
                tokens, e.tokens,
                "{model}: unknown model tokens are counted"
            );
        }
    }
    for (tenant, cost) in by_tenant {
        assert_eq!(
            report.by_tenant[tenant].cost,
            Usd::from_nanos(cost),
            "{tenant}"
        );
    }
    mock.shutdown().await;
}

type Alerts = Arc<Mutex<Vec<BudgetAlert>>>;

fn alert_sink() -> (Alerts, impl Fn(&BudgetAlert) + Send + Sync + 'static) {
    let alerts: Alerts = Arc::default();
    let sink = alerts.clone();
    (alerts, move |a: &BudgetAlert| {
        sink.lock().unwrap().push(a.clone());
    })
}

fn count(alerts: &Alerts, kind: AlertKind) -> usize {
    alerts
        .lock()
        .unwrap()
        .iter()
        .filter(|a| a.kind == kind)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hard_cap_holds_under_200_concurrent_requests() {
    const MAX_TOKENS: u32 = 1_000;
    let mock = MockServer::start().await.unwrap();
    let url = mock.url();
    let cap = Usd::from_dollars(1);
    let (alerts, sink) = alert_sink();
    let tracker = CostTracker::builder()
        .budgets(BudgetConfig::new().global(Budget::new().daily(cap)))
        .alert_handler(sink)
        .build();
    let svc = CostLayer::new(tracker.clone()).layer(upstream());

    // Opus 4.5. The mock bills exactly the estimate as input and `max_tokens` as output.
    let b = body("claude-opus-4-5", MAX_TOKENS, true);
    let input = claude_mock::estimate_input_tokens(&b).unwrap();
    let worst = input * 10_000 + u64::from(MAX_TOKENS) * 25_000; // 1h-write price + output
    let actual = input * 5_000 + u64::from(MAX_TOKENS) * 25_000;

    let results: Vec<Result<u16, ErrorKind>> = futures_util::stream::iter(0..200)
        .map(|i| {
            let svc = svc.clone();
            let req = messages(&url)
                .header("x-mock-output-tokens", MAX_TOKENS.to_string())
                .header("x-mock-latency-ms", "20")
                .header("x-mock-key", format!("cap-{i}"))
                .body(b.clone())
                .unwrap();
            async move {
                match svc.oneshot(req).await {
                    Ok(resp) => {
                        let status = resp.status().as_u16();
                        resp.into_body().collect().await.unwrap();
                        Ok(status)
                    }
                    Err(e) => Err(Error::from_box(e).kind()),
                }
            }
        })
        .buffer_unordered(200)
        .collect()
        .await;

    let ok = results.iter().filter(|r| **r == Ok(200)).count() as u64;
    let refused = results
        .iter()
        .filter(|r| **r == Err(ErrorKind::BudgetExceeded))
        .count() as u64;
    assert_eq!(
        ok + refused,
        200,
        "every request ends in an answer or a refusal: {results:?}"
    );
    assert!(refused > 0);
    let served = mock.stats();
    assert_eq!(
        served.requests, ok,
        "refused requests never reach the upstream"
    );
    // The cap holds, by the tracker and by what the mock served.
    let spent = tracker.total().cost;
    assert!(spent <= cap, "spent {spent} > cap {cap}");
    let served_cost = served.usage.input_tokens * 5_000 + served.usage.output_tokens * 25_000;
    assert_eq!(spent, Usd::from_nanos(served_cost));
    assert_eq!(served_cost, ok * actual);
    // Not over-conservative: any refusal saw at most (admitted × worst) spent or held.
    assert!(
        ok >= cap.nanos() / worst,
        "{ok} admitted, worst case {worst}"
    );
    let status = &tracker.report().budgets[0];
    assert_eq!(status.reserved, Usd::ZERO, "every reservation was settled");
    // Alerts: 50% and 80% once each, one refusal alert.
    assert_eq!(count(&alerts, AlertKind::Threshold { percent: 50 }), 1);
    assert_eq!(count(&alerts, AlertKind::Threshold { percent: 80 }), 1);
    assert!(count(&alerts, AlertKind::Threshold { percent: 100 }) <= 1);
    assert_eq!(count(&alerts, AlertKind::Refused), 1);
    mock.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thresholds_fire_exactly_once_each_under_concurrency() {
    let mock = MockServer::start().await.unwrap();
    let url = mock.url();
    let (alerts, sink) = alert_sink();
    // Haiku 4.5, 1,000 in + 1,000 out = $0.006 a request; 100 requests = $0.60, three
    // times each tenant's $0.10 and 1.2 times the global $0.50. Alerts only.
    let tracker = CostTracker::builder()
        .budgets(
            BudgetConfig::new()
                .global(Budget::new().daily(Usd::from_nanos(500_000_000)))
                .per_tenant(Budget::new().daily(Usd::from_nanos(100_000_000)))
                .alert_thresholds([25, 50, 75, 80, 90, 100])
                .enforce(false),
        )
        .alert_handler(sink)
        .build();
    let svc = CostLayer::new(tracker.clone()).layer(upstream());
    let _: Vec<()> = futures_util::stream::iter(0..100)
        .map(|i| {
            let svc = svc.clone();
            let mut req = messages(&url)
                .header("x-mock-usage", "input=1000,output=1000")
                .header("x-mock-key", format!("t-{i}"))
                .body(body("claude-haiku-4-5", 2_000, i % 2 == 0))
                .unwrap();
            req.extensions_mut().insert(Tenant::new(["x", "y"][i % 2]));
            async move {
                let resp = svc.oneshot(req).await.unwrap();
                resp.into_body().collect().await.unwrap();
            }
        })
        .buffer_unordered(50)
        .collect()
        .await;
    assert_eq!(tracker.total().cost, Usd::from_nanos(600_000_000));
    let alerts = alerts.lock().unwrap().clone();
    for scope in ["global", "tenant:x", "tenant:y"] {
        for percent in [25, 50, 75, 80, 90, 100] {
            let n = alerts
                .iter()
                .filter(|a| {
                    a.scope.to_string() == scope && a.kind == AlertKind::Threshold { percent }
                })
                .count();
            assert_eq!(n, 1, "{scope} {percent}%");
        }
    }
    assert_eq!(alerts.len(), 18);
    mock.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_streams_and_upstream_errors_match_the_mock() {
    let mock = MockServer::start().await.unwrap();
    let url = mock.url();
    let tracker = CostTracker::new();
    let svc = CostLayer::new(tracker.clone()).layer(upstream());
    let usage = "input=700,output=50,cache_read=300,cache_write_1h=100";
    let cases = [
        // `event: error` after 3 deltas: no message_delta.
        ("x-mock-stream-error-after", "3", true),
        // The connection drops in the middle of the deltas.
        ("x-mock-reset-after", "2000", true),
        // An upstream 529: zero usage, still one request.
        ("x-mock-fault", "529", false),
    ];
    for (i, (name, value, stream)) in cases.into_iter().enumerate() {
        let req = messages(&url)
            .header("x-mock-usage", usage)
            .header("x-mock-output-tokens", "50")
            .header("x-mock-key", format!("cut-{i}"))
            .header(name, value)
            .body(body("claude-sonnet-4-5-20250929", 100, stream))
            .unwrap();
        let resp = svc.clone().oneshot(req).await.unwrap();
        let _ = resp.into_body().collect().await;
    }
    let served = mock.stats();
    let t = tracker.total();
    assert_eq!(t.requests, 3);
    assert_eq!(t.incomplete_requests, 2);
    assert_eq!(t.input_tokens, served.usage.input_tokens);
    assert_eq!(t.output_tokens, served.usage.output_tokens);
    assert_eq!(
        t.cache_write_tokens(),
        served.usage.cache_creation_input_tokens
    );
    assert_eq!(t.cache_read_tokens, served.usage.cache_read_input_tokens);
    // Two lower bounds of message_start: 700 × 3,000 + 300 × 300 + 100 × 6,000 + 1 ×
    // 15,000 = 2,805,000 n$ each.
    assert_eq!((t.input_tokens, t.output_tokens), (1_400, 2));
    assert_eq!(t.cost, Usd::from_nanos(2 * 2_805_000));
    mock.shutdown().await;
}
