//! Redis stopped in the middle of concurrent traffic (issue #10): two stacks (instances A and
//! B) share one `redis-server` and one claude-mock upstream, with every Redis-backed part on
//! (cache, rate limits, budgets). Sixteen tasks send distinct requests through A and B in
//! turn, without pause, while the test kills Redis, lets the traffic run through the outage
//! for several Redis call timeouts, starts Redis again and keeps the traffic going.
//!
//! - `fail_open` (the default): every request is a 200 with a complete body, during the
//!   outage too; the mock saw exactly one call per answer.
//! - `fail_closed`: every request that started and ended while Redis was down is refused
//!   with a classified local error (`BudgetExceeded` or `RateLimited`) and never reaches the
//!   mock; every other request is a 200 or such a refusal.
//!
//! In both, no request is lost or hangs (each ends in exactly one outcome within a bound),
//! and once Redis is back the shared state is used again by itself: new rate-limit buckets
//! and budget spend appear in the (empty, restarted) Redis, and an answer A stores after the
//! restart is a hit on B.
//!
//! No assertion depends on speed: phases end on counts of finished requests (and a minimum
//! outage length), recovery is awaited with bounded loops, and the few steps a loaded machine
//! can make fail once (a Redis call past its timeout) are tried again with fresh requests.
//! The `redis-server` is started by the test itself (skipped with a printed reason when the
//! binary is missing, failed when `CI=true`).
#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used)]

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use claude_cache::CacheConfig;
use claude_cache::key::CacheKey;
use claude_core::{CacheHit, Error, ErrorKind};
use claude_mock::MockServer;
use claude_mock::redis_server::RedisServer;
use claude_stack::{ClaudeStack, StackConfig, StackService};
use http::Request;
use http_body_util::BodyExt;
use tower::ServiceExt;

/// Concurrent senders.
const TASKS: usize = 16;
/// Requests that must finish inside each phase before the test moves on.
const PER_PHASE: usize = 2 * TASKS;
/// The shortest outage: several times the Redis call timeouts (100 ms for the cache, 250 ms
/// for the limiter and the budgets).
const OUTAGE: Duration = Duration::from_secs(2);
/// The longest any one request may take before it counts as hung.
const REQUEST_BOUND: Duration = Duration::from_secs(60);
/// The longest the test waits for a condition (progress, recovery) before it fails.
const PATIENCE: Duration = Duration::from_secs(90);
/// Fresh requests the cross-instance cache check may use (a Redis call past its timeout on
/// a loaded machine spoils one).
const CACHE_TRIES: usize = 20;

/// Where the outage stood.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Redis runs (before the stop).
    Up,
    /// `stop` is under way.
    Stopping,
    /// Redis is dead: set after `stop` returned (the process was reaped).
    Down,
    /// `restart` is under way.
    Restarting,
    /// Redis runs again: set after `restart` returned (it accepts connections).
    Back,
}

impl Phase {
    const ALL: [Self; 5] = [
        Self::Up,
        Self::Stopping,
        Self::Down,
        Self::Restarting,
        Self::Back,
    ];
}

/// How one request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    /// A 200 with a complete message body; `hit` when the cache answered.
    Answered { hit: bool },
    /// A local refusal: a `claude_core::Error` of this kind.
    Refused(ErrorKind),
    /// Anything else: another status, a body that failed or is not a whole message, an
    /// error the stack could not classify.
    Failed(String),
    /// No outcome within [`REQUEST_BOUND`].
    Hung,
}

/// One finished request of the traffic.
#[derive(Debug)]
struct Record {
    started: Phase,
    ended: Phase,
    outcome: Outcome,
}

/// The traffic's shared state.
#[derive(Default)]
struct Traffic {
    phase: AtomicU8,
    stop: AtomicBool,
    sent: AtomicU64,
    records: Mutex<Vec<Record>>,
}

impl Traffic {
    fn phase(&self) -> Phase {
        Phase::ALL[usize::from(self.phase.load(Ordering::SeqCst))]
    }

    fn enter(&self, phase: Phase) {
        let i = Phase::ALL.iter().position(|p| *p == phase).unwrap();
        self.phase.store(u8::try_from(i).unwrap(), Ordering::SeqCst);
    }

    fn count(&self, f: impl Fn(&Record) -> bool) -> usize {
        self.records.lock().unwrap().iter().filter(|r| f(r)).count()
    }
}

fn config(redis: &RedisServer, mock: &MockServer, on_failure: &str) -> StackConfig {
    // Limits and budget far above what the test can send: only Redis can refuse.
    let text = format!(
        "redis_url = \"{}\"\nredis_on_failure = \"{on_failure}\"\n\
         [client]\nbase_url = \"{}\"\n[cache]\n\
         [rate_limit]\nrequests_per_minute = 100000000\n\
         input_tokens_per_minute = 10000000000\noutput_tokens_per_minute = 10000000000\n\
         [cost.budgets]\nglobal = {{ daily = \"1000000\" }}\n",
        redis.url(),
        mock.url()
    );
    toml::from_str(&text).unwrap()
}

fn request(question: &str) -> Request<Bytes> {
    let body = format!(
        r#"{{"model":"claude-sonnet-4-5","max_tokens":64,"messages":[{{"role":"user","content":"{question}"}}]}}"#
    );
    Request::post("/v1/messages")
        .header("content-type", "application/json")
        .body(Bytes::from(body))
        .unwrap()
}

/// The Redis key under which the cache stores the answer to `question`.
fn cache_key(question: &str) -> String {
    let key = CacheKey::for_request(&request(question), &CacheConfig::default()).unwrap();
    format!("claude-cache:v1:{key}")
}

/// Sends one request and reads its whole body, within [`REQUEST_BOUND`].
async fn exchange(svc: &StackService, req: Request<Bytes>) -> Outcome {
    let exchange = async {
        let resp = match svc.clone().oneshot(req).await {
            Ok(resp) => resp,
            Err(e) => {
                let e = Error::from_box(e);
                return match e.kind() {
                    kind @ (ErrorKind::BudgetExceeded | ErrorKind::RateLimited) => {
                        Outcome::Refused(kind)
                    }
                    kind => Outcome::Failed(format!("error {kind:?}: {e}")),
                };
            }
        };
        let (parts, body) = resp.into_parts();
        let body = match body.collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => return Outcome::Failed(format!("body of a {}: {e}", parts.status)),
        };
        if parts.status != 200 {
            return Outcome::Failed(format!(
                "status {}: {}",
                parts.status,
                String::from_utf8_lossy(&body)
            ));
        }
        let complete = serde_json::from_slice::<serde_json::Value>(&body).is_ok_and(|m| {
            m["type"] == "message"
                && m["stop_reason"] == "end_turn"
                && m["content"][0]["text"]
                    .as_str()
                    .is_some_and(|t| !t.is_empty())
                && m["usage"]["output_tokens"].as_u64().is_some_and(|n| n > 0)
        });
        if !complete {
            return Outcome::Failed(format!("incomplete: {}", String::from_utf8_lossy(&body)));
        }
        let hit = parts.extensions.get::<CacheHit>().is_some();
        let header = parts
            .headers
            .get("x-claude-cache")
            .is_some_and(|v| v == "HIT");
        assert_eq!(
            hit, header,
            "the CacheHit extension and x-claude-cache agree"
        );
        Outcome::Answered { hit }
    };
    tokio::time::timeout(REQUEST_BOUND, exchange)
        .await
        .unwrap_or(Outcome::Hung)
}

/// A plain client on the test's Redis. The calls are short and blocking: the test body runs
/// on the test thread (`block_on`), not on a runtime worker, so no traffic task waits.
struct Inspect(redis::Client);

impl Inspect {
    fn new(redis: &RedisServer) -> Self {
        Self(redis::Client::open(redis.url()).unwrap())
    }

    fn keys(&self, pattern: &str) -> Vec<String> {
        self.0
            .get_connection()
            .and_then(|mut c| redis::cmd("KEYS").arg(pattern).query(&mut c))
            .unwrap_or_default()
    }

    fn exists(&self, key: &str) -> bool {
        self.0
            .get_connection()
            .and_then(|mut c| redis::cmd("EXISTS").arg(key).query::<u64>(&mut c))
            .is_ok_and(|n| n == 1)
    }

    /// The `spent` of every budget window, summed (nano-dollars).
    fn spent(&self) -> u64 {
        self.keys("claude-cost:v1:*")
            .iter()
            .map(|k| {
                self.0
                    .get_connection()
                    .and_then(|mut c| redis::cmd("HGET").arg(k).arg("spent").query(&mut c))
                    .ok()
                    .flatten()
                    .unwrap_or(0u64)
            })
            .sum()
    }
}

/// Polls `ready` every 20 ms until it holds; fails the test after [`PATIENCE`].
async fn eventually(what: &str, ready: impl FnMut() -> bool) {
    assert!(
        within(PATIENCE, ready).await,
        "not within {PATIENCE:?}: {what}"
    );
}

/// Polls `ready` every 20 ms for at most `limit`; whether it held.
async fn within(limit: Duration, mut ready: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if ready() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The rate limiter and the budgets write to Redis: a request bucket exists now, and the
/// budgets' spend grows (settles land). Call while the traffic runs.
async fn shared_limits_and_budgets_in_use(inspect: &Inspect, when: &str) {
    eventually(
        &format!("{when}: a shared rate-limit bucket in Redis"),
        || !inspect.keys("claude-ratelimit:v1:*").is_empty(),
    )
    .await;
    let mut first = 0;
    eventually(&format!("{when}: spend in a shared budget window"), || {
        first = inspect.spent();
        first > 0
    })
    .await;
    eventually(&format!("{when}: the shared spend grows"), || {
        inspect.spent() > first
    })
    .await;
}

/// Stores a fresh answer through A and asks B for it, until B answers from Redis. Returns
/// the calls these exchanges made upstream.
async fn cache_hit_across_instances(
    a: &StackService,
    b: &StackService,
    inspect: &Inspect,
    label: &str,
) -> u64 {
    let mut upstream = 0;
    let mut seen = Vec::new();
    for i in 0..CACHE_TRIES {
        let question = format!("{label} cache check {i}");
        let outcome = exchange(a, request(&question)).await;
        match outcome {
            Outcome::Answered { hit: false } => upstream += 1,
            // Fail closed: an admission past its Redis timeout is refused, and the store then
            // skips Redis for 250 ms (its back-off): try afresh after that.
            Outcome::Refused(_) => {
                seen.push(outcome);
                tokio::time::sleep(Duration::from_millis(300)).await;
                continue;
            }
            other => panic!("A, {question}: {other:?}"),
        }
        // The store task writes the answer to Redis after the body ended; a SET past its
        // timeout is dropped (then try afresh).
        let key = cache_key(&question);
        if !within(Duration::from_secs(10), || inspect.exists(&key)).await {
            seen.push(Outcome::Failed(format!("{key} never appeared")));
            continue;
        }
        let outcome = exchange(b, request(&question)).await;
        match outcome {
            Outcome::Answered { hit: true } => return upstream,
            // B's GET past its timeout is a miss: the answer came from upstream.
            Outcome::Answered { hit: false } => upstream += 1,
            Outcome::Refused(_) => tokio::time::sleep(Duration::from_millis(300)).await,
            other => panic!("B, {question}: {other:?}"),
        }
        seen.push(outcome);
    }
    panic!("no answer A stored was a hit on B in {CACHE_TRIES} tries: {seen:?}");
}

/// The mock counted `expected` calls, all answered 200, and has none in flight.
async fn mock_saw(mock: &MockServer, expected: u64) {
    eventually("the mock has no request in flight", || {
        mock.stats().in_flight == 0
    })
    .await;
    let stats = mock.stats();
    assert_eq!(stats.requests, expected, "upstream calls: {stats:?}");
    assert_eq!(
        stats.by_status.get("200").copied(),
        Some(expected),
        "every upstream call answered 200: {stats:?}"
    );
    assert_eq!(stats.by_status.len(), 1, "{stats:?}");
}

/// What the scenario observed.
struct Run {
    records: Vec<Record>,
    sent: u64,
    /// Upstream calls of the cache check after the restart.
    check_upstream: u64,
    mock: MockServer,
    elapsed: Duration,
}

/// Starts Redis, the mock and two stacks, runs the traffic through the outage and the
/// restart, checks that no request was lost ([`Run::none_lost`]), and returns what
/// happened; `None` when redis-server is missing (skipped).
async fn run_outage(on_failure: &str) -> Option<Run> {
    let mut redis = RedisServer::start()?;
    let t0 = Instant::now();
    let mock = MockServer::start().await.unwrap();
    let a = ClaudeStack::new(config(&redis, &mock, on_failure))
        .unwrap()
        .client()
        .unwrap();
    let b = ClaudeStack::new(config(&redis, &mock, on_failure))
        .unwrap()
        .client()
        .unwrap();
    let inspect = Inspect::new(&redis);
    let traffic = Arc::new(Traffic::default());

    let tasks: Vec<_> = (0..TASKS)
        .map(|task| {
            let (traffic, a, b) = (traffic.clone(), a.clone(), b.clone());
            let label = on_failure.to_owned();
            tokio::spawn(async move {
                let mut n = 0usize;
                while !traffic.stop.load(Ordering::SeqCst) {
                    let svc = if (task + n).is_multiple_of(2) { &a } else { &b };
                    let req = request(&format!("{label} task {task} request {n}"));
                    traffic.sent.fetch_add(1, Ordering::SeqCst);
                    let started = traffic.phase();
                    let outcome = exchange(svc, req).await;
                    let ended = traffic.phase();
                    traffic.records.lock().unwrap().push(Record {
                        started,
                        ended,
                        outcome,
                    });
                    n += 1;
                }
            })
        })
        .collect();

    // Up: requests go through, and the shared state is in use.
    let answered = |r: &Record| matches!(r.outcome, Outcome::Answered { .. });
    eventually("answers before the outage", || {
        traffic.count(|r| r.ended == Phase::Up && answered(r)) >= PER_PHASE
    })
    .await;
    shared_limits_and_budgets_in_use(&inspect, "before the outage").await;

    // Down, under traffic, for several Redis call timeouts and a few dozen requests that
    // started and ended inside the outage. (`stop` and `restart` block the test thread, not
    // a runtime worker, for as long as the process takes to die or to listen.)
    traffic.enter(Phase::Stopping);
    redis.stop();
    let stopped = Instant::now();
    traffic.enter(Phase::Down);
    eventually("requests finished inside the outage", || {
        traffic.count(|r| r.started == Phase::Down && r.ended == Phase::Down) >= PER_PHASE
    })
    .await;
    tokio::time::sleep(OUTAGE.saturating_sub(stopped.elapsed())).await;

    // Back: the same traffic, on an empty Redis.
    traffic.enter(Phase::Restarting);
    redis.restart();
    traffic.enter(Phase::Back);
    eventually("answers after the restart", || {
        traffic.count(|r| r.started == Phase::Back && answered(r)) >= PER_PHASE
    })
    .await;
    shared_limits_and_budgets_in_use(&inspect, "after the restart").await;
    let check_upstream = cache_hit_across_instances(&a, &b, &inspect, on_failure).await;

    traffic.stop.store(true, Ordering::SeqCst);
    for task in tasks {
        tokio::time::timeout(REQUEST_BOUND + PATIENCE, task)
            .await
            .expect("a traffic task did not finish")
            .expect("a traffic task panicked");
    }
    let records = std::mem::take(&mut *traffic.records.lock().unwrap());
    let sent = traffic.sent.load(Ordering::SeqCst);
    let run = Run {
        records,
        sent,
        check_upstream,
        mock,
        elapsed: t0.elapsed(),
    };
    eprintln!("{on_failure}: {}", run.summary());
    run.none_lost().await;
    Some(run)
}

impl Run {
    fn select(&self, f: impl Fn(&Record) -> bool) -> Vec<&Record> {
        self.records.iter().filter(|r| f(r)).collect()
    }

    fn count(&self, f: impl Fn(&Record) -> bool) -> usize {
        self.select(f).len()
    }

    fn summary(&self) -> String {
        let mut s = format!(
            "{} requests in {:.1} s;",
            self.records.len(),
            self.elapsed.as_secs_f64()
        );
        for p in Phase::ALL {
            for e in Phase::ALL {
                let ok = self.count(|r| {
                    r.started == p && r.ended == e && matches!(r.outcome, Outcome::Answered { .. })
                });
                let refused = self.count(|r| {
                    r.started == p && r.ended == e && matches!(r.outcome, Outcome::Refused(_))
                });
                if ok + refused > 0 {
                    let _ = write!(s, " {p:?}->{e:?}: {ok} answered, {refused} refused;");
                }
            }
        }
        s
    }

    /// Every request sent ended in exactly one outcome, none failed or hung, and the mock
    /// saw one call per answer that was not a cache hit.
    async fn none_lost(&self) {
        assert_eq!(
            self.sent,
            self.records.len() as u64,
            "every request sent has one outcome"
        );
        none(
            "failed or hung",
            &self.select(|r| matches!(r.outcome, Outcome::Failed(_) | Outcome::Hung)),
        );
        // Every request is distinct: the traffic never hits the cache.
        assert_eq!(
            self.count(|r| r.outcome == Outcome::Answered { hit: true }),
            0
        );
        let answered = self.count(|r| r.outcome == Outcome::Answered { hit: false }) as u64;
        mock_saw(&self.mock, answered + self.check_upstream).await;
    }
}

/// Fails with a sample when `records` is not empty.
fn none(what: &str, records: &[&Record]) {
    assert!(
        records.is_empty(),
        "{} requests {what}, e.g. {:?}",
        records.len(),
        &records[..records.len().min(3)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_open_keeps_answering_through_a_redis_outage_and_shares_again_after() {
    let Some(run) = run_outage("fail_open").await else {
        return;
    };
    none(
        "refused (fail open refuses nothing)",
        &run.select(|r| matches!(r.outcome, Outcome::Refused(_))),
    );
    assert!(run.count(|r| r.started == Phase::Down && r.ended == Phase::Down) >= PER_PHASE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_closed_refuses_during_a_redis_outage_and_answers_again_after() {
    let Some(run) = run_outage("fail_closed").await else {
        return;
    };
    // Redis dead for the whole request: nothing can grant it, so it is refused (and the
    // mock, above, never saw it).
    let inside = run.select(|r| r.started == Phase::Down && r.ended == Phase::Down);
    assert!(inside.len() >= PER_PHASE);
    none(
        "answered inside the outage (fail closed refuses them)",
        &run.select(|r| {
            r.started == Phase::Down
                && r.ended == Phase::Down
                && !matches!(r.outcome, Outcome::Refused(_))
        }),
    );
    // The refusals are the classified local errors of the budgets or the limiter (anything
    // else counted as Failed above).
    assert!(inside.iter().all(|r| matches!(
        r.outcome,
        Outcome::Refused(ErrorKind::BudgetExceeded | ErrorKind::RateLimited)
    )));
}
