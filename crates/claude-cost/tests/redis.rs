//! Budgets shared by two trackers (two gateway instances) through a `redis-server` the test
//! starts itself on a free loopback port (skipped with a printed reason when the binary is
//! missing, failed when `CI=true`), with claude-mock upstream.
#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use claude_core::{Error, ErrorKind, FullBodyService};
use claude_cost::{
    AlertKind, Budget, BudgetAlert, BudgetConfig, BudgetWindow, CostLayer, CostTracker,
    FailurePolicy, RedisBudgets, Usd,
};
use claude_mock::MockServer;
use claude_mock::redis_server::RedisServer;
use futures_util::StreamExt;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tower::{Layer, ServiceExt};

type Upstream = FullBodyService<Client<HttpConnector, Full<Bytes>>>;
type Svc = claude_cost::Cost<Upstream>;
type Alerts = Arc<Mutex<Vec<BudgetAlert>>>;

const MAX_TOKENS: u32 = 1_000;

fn upstream() -> Upstream {
    FullBodyService::new(Client::builder(TokioExecutor::new()).build_http())
}

fn body() -> Bytes {
    Bytes::from(format!(
        r#"{{"model":"claude-opus-4-5","max_tokens":{MAX_TOKENS},"stream":true,"messages":[{{"role":"user","content":"What does a tower layer do?"}}]}}"#
    ))
}

/// One instance: a tracker with `budgets` over the shared Redis (or none), its alerts
/// collected into `alerts`.
fn instance(
    budgets: &BudgetConfig,
    redis: Option<RedisBudgets>,
    alerts: &Alerts,
) -> (CostTracker, Svc) {
    let sink = alerts.clone();
    let mut b = CostTracker::builder()
        .budgets(budgets.clone())
        .alert_handler(move |a: &BudgetAlert| sink.lock().unwrap().push(a.clone()));
    if let Some(r) = redis {
        b = b.redis(r);
    }
    let tracker = b.build();
    let svc = CostLayer::new(tracker.clone()).layer(upstream());
    (tracker, svc)
}

fn shared(redis: &RedisServer) -> RedisBudgets {
    RedisBudgets::open(&redis.url())
        .unwrap()
        .timeout(Duration::from_millis(200))
}

async fn send(svc: &Svc, mock: &MockServer, key: &str) -> Result<u16, ErrorKind> {
    let req = Request::post(format!("{}/v1/messages", mock.url()))
        .header("anthropic-version", "2023-06-01")
        .header("content-type", "application/json")
        .header("x-mock-output-tokens", MAX_TOKENS.to_string())
        .header("x-mock-latency-ms", "10")
        .header("x-mock-key", key)
        .body(body())
        .unwrap();
    match svc.clone().oneshot(req).await {
        Ok(resp) => {
            let status = resp.status().as_u16();
            resp.into_body().collect().await.unwrap();
            Ok(status)
        }
        Err(e) => Err(Error::from_box(e).kind()),
    }
}

/// Opus 4.5: the worst case of one request (1-hour write price for the input estimate,
/// `max_tokens` of output) and what the mock bills for it.
fn prices() -> (u64, u64) {
    let input = claude_mock::estimate_input_tokens(&body()).unwrap();
    let worst = input * 10_000 + u64::from(MAX_TOKENS) * 25_000;
    let actual = input * 5_000 + u64::from(MAX_TOKENS) * 25_000;
    (worst, actual)
}

fn count(alerts: &Alerts, kind: AlertKind) -> usize {
    alerts
        .lock()
        .unwrap()
        .iter()
        .filter(|a| a.kind == kind)
        .count()
}

/// The `spent` field of a window's hash in Redis, read with a connection of the test's own.
fn redis_spent(redis: &RedisServer, key: &str) -> Option<u64> {
    redis_field(redis, key, "spent").and_then(|v| u64::try_from(v).ok())
}

/// Waits until the settles spawned by the trackers have landed (the Redis spend stops
/// moving and equals the sum of what the trackers recorded).
async fn settled(redis: &RedisServer, key: &str, expected: u64) {
    for _ in 0..500 {
        if redis_spent(redis, key) == Some(expected) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "redis spend {:?} never reached {expected}",
        redis_spent(redis, key)
    );
}

fn today_key() -> String {
    // The key of the global daily window: `claude-cost:v1:global:daily:YYYY-MM-DD`.
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let days = i64::try_from(secs / 86_400).unwrap();
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("claude-cost:v1:global:daily:{y:04}-{m:02}-{d:02}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cap_reached_across_two_instances_refuses_on_both_and_each_alert_fires_once() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let mock = MockServer::start().await.unwrap();
    let cap = Usd::from_dollars(1);
    let budgets = BudgetConfig::new().global(Budget::new().daily(cap));
    let alerts = Alerts::default();
    // A generous timeout: on two loaded cores a slow round trip would fail open to the
    // local budget, by policy, and this test is about the shared one.
    let patient = || shared(&redis).timeout(Duration::from_secs(2));
    let (ta, a) = instance(&budgets, Some(patient()), &alerts);
    let (tb, b) = instance(&budgets, Some(patient()), &alerts);
    let (worst, actual) = prices();

    // One request through each instance first (far below the cap), so both have spent
    // whatever the scheduling of the burst; then 198 concurrent requests, half on each.
    assert_eq!(send(&a, &mock, "first-a").await, Ok(200));
    assert_eq!(send(&b, &mock, "first-b").await, Ok(200));
    let results: Vec<Result<u16, ErrorKind>> = futures_util::stream::iter(0..198)
        .map(|i| {
            let svc = if i % 2 == 0 { a.clone() } else { b.clone() };
            let mock = &mock;
            async move { send(&svc, mock, &format!("cap-{i}")).await }
        })
        .buffer_unordered(200)
        .collect()
        .await;
    let ok = 2 + results.iter().filter(|r| **r == Ok(200)).count() as u64;
    let refused = results
        .iter()
        .filter(|r| **r == Err(ErrorKind::BudgetExceeded))
        .count() as u64;
    assert_eq!(ok + refused, 200, "{results:?}");
    assert!(refused > 0 && ok > 0);
    assert_eq!(
        mock.stats().requests,
        ok,
        "refused requests never go upstream"
    );

    // The cap holds across both instances, by the trackers, the mock and Redis.
    let spent = ta.total().cost.nanos() + tb.total().cost.nanos();
    assert_eq!(spent, ok * actual);
    assert!(spent <= cap.nanos(), "spent {spent} > cap {cap}");
    assert!(
        ok >= cap.nanos() / worst,
        "not over-conservative: {ok} admitted, worst {worst}"
    );
    assert!(
        ta.total().requests > 0 && tb.total().requests > 0,
        "both instances spent"
    );
    settled(&redis, &today_key(), spent).await;

    // Now both refuse.
    assert_eq!(
        send(&a, &mock, "after-a").await,
        Err(ErrorKind::BudgetExceeded)
    );
    assert_eq!(
        send(&b, &mock, "after-b").await,
        Err(ErrorKind::BudgetExceeded)
    );

    // Each alert fired once in total, across both instances.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(count(&alerts, AlertKind::Threshold { percent: 50 }), 1);
    assert_eq!(count(&alerts, AlertKind::Threshold { percent: 80 }), 1);
    assert!(count(&alerts, AlertKind::Threshold { percent: 100 }) <= 1);
    assert_eq!(count(&alerts, AlertKind::Refused), 1);
    let all = alerts.lock().unwrap().clone();
    assert!(all.iter().all(|a| a.window == BudgetWindow::Daily));
    let fifty = all
        .iter()
        .find(|a| a.kind == AlertKind::Threshold { percent: 50 })
        .unwrap();
    assert!(fifty.spent.nanos() * 100 >= cap.nanos() * 50, "{fifty}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_follows_the_policy_and_the_shared_budget_returns_with_it() {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let mock = MockServer::start().await.unwrap();
    let (_, actual) = prices();
    // Room for 10 requests per day, shared.
    let cap = Usd::from_nanos(actual * 10 + actual / 2);
    let budgets = BudgetConfig::new().global(Budget::new().daily(cap));
    let alerts = Alerts::default();
    let (_, open) = instance(&budgets, Some(shared(&redis)), &alerts);
    let (_, closed) = instance(
        &budgets,
        Some(shared(&redis).policy(FailurePolicy::FailClosed)),
        &alerts,
    );

    // Both work while Redis is up: 2 of the 10 shared requests.
    assert_eq!(send(&open, &mock, "up-1").await, Ok(200));
    assert_eq!(send(&closed, &mock, "up-2").await, Ok(200));
    settled(&redis, &today_key(), 2 * actual).await;

    redis.stop();
    // Fail open: the local budget decides (room for 10 on this instance alone: it has
    // spent 1 of them locally).
    let mut ok = 0;
    for i in 0..12 {
        match send(&open, &mock, &format!("down-open-{i}")).await {
            Ok(200) => ok += 1,
            Err(ErrorKind::BudgetExceeded) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(ok, 9, "the local cap still holds while redis is down");
    // Fail closed: refused.
    assert_eq!(
        send(&closed, &mock, "down-closed").await,
        Err(ErrorKind::BudgetExceeded)
    );

    // Redis returns, empty: both instances share a fresh window again.
    redis.restart();
    // While an instance has not reconnected yet, the fail-closed one refuses and the
    // fail-open one falls back to its local budget, which is spent: every admission
    // counts in the shared window, 10 in total.
    let mut admitted = 0;
    for i in 0..300 {
        let svc = if i % 2 == 0 { &closed } else { &open };
        match send(svc, &mock, &format!("back-{i}")).await {
            Ok(200) => admitted += 1,
            Err(ErrorKind::BudgetExceeded) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            other => panic!("unexpected {other:?}"),
        }
        if admitted == 10 {
            break;
        }
    }
    assert_eq!(admitted, 10, "the shared window admits again");
    settled(&redis, &today_key(), admitted * actual).await;
    // And no more, on either instance.
    for i in 0..10 {
        let svc = if i % 2 == 0 { &closed } else { &open };
        assert_eq!(
            send(svc, &mock, &format!("final-{i}")).await,
            Err(ErrorKind::BudgetExceeded)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_without_caps_costs_no_round_trip_and_leaves_no_key() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let mock = MockServer::start().await.unwrap();
    let budgets = BudgetConfig::new().tenant("acme", Budget::new().daily(Usd::from_dollars(1)));
    let alerts = Alerts::default();
    let (tracker, svc) = instance(&budgets, Some(shared(&redis)), &alerts);
    assert_eq!(send(&svc, &mock, "other").await, Ok(200));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut conn).unwrap();
    assert!(keys.is_empty(), "{keys:?}");
    assert_eq!(tracker.total().requests, 1);
}

/// A field of a window's hash, with a connection of the test's own.
fn redis_field(redis: &RedisServer, key: &str, field: &str) -> Option<i64> {
    let mut conn = redis::Client::open(redis.url())
        .and_then(|c| c.get_connection())
        .ok()?;
    redis::cmd("HGET")
        .arg(key)
        .arg(field)
        .query::<Option<i64>>(&mut conn)
        .ok()
        .flatten()
}

/// Leaves a reservation `r:ghost` of `amount` in the window `key`, as a dead instance would,
/// with its lease ending at `lease_end_ms` (a score of the window's lease set).
fn ghost_reservation(redis: &RedisServer, key: &str, amount: u64, lease_end_ms: &str) {
    let amount = amount.to_string();
    redis_cmd(
        redis,
        &["HSET", key, "reserved", &amount, "r:ghost", &amount],
    );
    redis_cmd(
        redis,
        &["ZADD", &format!("{key}:leases"), lease_end_ms, "ghost"],
    );
}

fn redis_cmd(redis: &RedisServer, args: &[&str]) {
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query::<redis::Value>(&mut conn).unwrap();
}

/// An admission that times out here while Redis runs it anyway (Redis paused longer than
/// the call timeout) must not leave its reservation in the window for ever: the tracker takes
/// it back by id once Redis answers. Without that, a slow Redis would fill the windows with
/// reservations nobody settles, until every instance is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admission_that_timed_out_leaves_no_reservation_behind() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let mock = MockServer::start().await.unwrap();
    let (_, actual) = prices();
    let budgets = BudgetConfig::new().global(Budget::new().daily(Usd::from_nanos(actual * 100)));
    let alerts = Alerts::default();
    for policy in [FailurePolicy::FailOpen, FailurePolicy::FailClosed] {
        let (_, svc) = instance(&budgets, Some(shared(&redis).policy(policy)), &alerts);
        assert_eq!(send(&svc, &mock, "before").await, Ok(200));
        let key = today_key();
        // Nothing reserved once the answer is settled.
        for _ in 0..500 {
            if redis_field(&redis, &key, "reserved") == Some(0) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(redis_field(&redis, &key, "reserved"), Some(0));

        // Redis stops answering for 1 s: the admissions of these 4 requests time out here
        // (200 ms) and run there when the pause ends.
        redis_cmd(&redis, &["CLIENT", "PAUSE", "1000", "ALL"]);
        let mut outcomes = Vec::new();
        for i in 0..4 {
            outcomes.push(send(&svc, &mock, &format!("paused-{i}")).await);
        }
        let expected = match policy {
            FailurePolicy::FailOpen => Ok(200),
            FailurePolicy::FailClosed => Err(ErrorKind::BudgetExceeded),
        };
        assert!(outcomes.iter().all(|o| *o == expected), "{outcomes:?}");

        // Once Redis answers again, every reservation the paused admissions made is taken
        // back.
        let mut reserved = None;
        for _ in 0..500 {
            reserved = redis_field(&redis, &key, "reserved");
            if reserved == Some(0) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(reserved, Some(0), "{policy:?}: phantom reservations remain");
        redis_cmd(&redis, &["DEL", &key, &format!("{key}:leases")]);
    }
}

/// A reservation whose settlement never reached Redis (its instance died) ends with its
/// lease: the next admission to the window drops it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reservation_nobody_settles_ends_with_its_lease() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let mock = MockServer::start().await.unwrap();
    let (worst, actual) = prices();
    // Room for exactly one worst case.
    let budgets = BudgetConfig::new().global(Budget::new().daily(Usd::from_nanos(worst)));
    let alerts = Alerts::default();
    let (_, svc) = instance(
        &budgets,
        Some(shared(&redis).reservation_lease(Duration::from_millis(300))),
        &alerts,
    );
    let key = today_key();
    // A dead instance's reservation of the whole cap, whose lease has ended.
    ghost_reservation(&redis, &key, worst, "1");
    // The next admission drops it, and fits.
    assert_eq!(send(&svc, &mock, "after-the-lease").await, Ok(200));
    settled(&redis, &key, actual).await;
    assert_eq!(redis_field(&redis, &key, "r:ghost"), None);
    // A live lease is kept: the same ghost with a lease far in the future refuses.
    redis_cmd(&redis, &["DEL", &key, &format!("{key}:leases")]);
    ghost_reservation(&redis, &key, worst, "99999999999999");
    assert_eq!(
        send(&svc, &mock, "during-the-lease").await,
        Err(ErrorKind::BudgetExceeded)
    );
}
