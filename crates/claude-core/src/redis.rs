//! The Redis plumbing that the shared cache, rate limits and budgets have in common (feature
//! `redis`): one lazily created connection, a timeout on every call, failures counted and
//! logged without flooding, and the policy for when Redis cannot be reached.
//!
//! Each crate keeps its own keys, scripts and semantics; [`RedisConn`] only carries the
//! calls. It is an implementation detail of claude-cache, claude-cost and claude-ratelimit
//! made public so that they share it; applications configure those crates' own types
//! (`RedisCache`, `RedisBudgets`, `RedisLimits`).
//!
//! # Connection
//!
//! redis-rs's `ConnectionManager`, created on first use (inside the runtime, as redis-rs
//! requires) with the call timeout as connection and response timeout, one reconnection
//! attempt per call and at most 1 s between attempts. It reconnects by itself: once Redis
//! answers again, the shared state is used again with no action. Clones share the
//! connection (one multiplexed TCP connection per store).
//!
//! # Failures
//!
//! A call that errs or does not answer within the timeout returns `None` to the caller,
//! increments the store's error counter (label `op`), is logged at `debug`, and at `warn` at
//! most every 10 seconds per store. After two consecutive failures to reach Redis (a
//! connection error or a timeout; not an error Redis answered), the store answers `None` at
//! once for 250 ms (counted under `op="skipped"`) instead of making every request wait for
//! its timeout while Redis is down; then the next call tries again. So during an outage a
//! request pays at most one timeout per store every 250 ms, and the shared state is used
//! again within about 250 ms of Redis answering (plus the connection manager's own
//! reconnection delay). The error text of redis-rs never holds the password of
//! the URL; the `Debug` output of a store prints the address only.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

pub use crate::config::FailurePolicy;

/// How often a store warns at most about Redis failures.
const WARN_EVERY_MS: u64 = 10_000;
/// Consecutive failures after which a store stops calling Redis for a while.
const FAILURES_TO_BACK_OFF: u32 = 2;
/// How long a store that backs off answers `None` without calling Redis.
const BACK_OFF_MS: u64 = 250;

/// Whether Redis is answering: consecutive failures, and until when (ms since the store's
/// epoch) calls are skipped.
#[derive(Debug, Default)]
struct Health {
    failures: std::sync::atomic::AtomicU32,
    skip_until: AtomicU64,
}

/// The outcome of a call: its answer, or no answer and whether it may still have run
/// (callers whose call changes state compensate for [`Call::Unknown`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call<T> {
    /// Redis answered.
    Done(T),
    /// Redis did not run it: skipped while backing off, connection refused, or an error
    /// Redis answered.
    NotRun,
    /// No answer: it timed out or the connection broke after it was sent, so Redis may have
    /// run it (or may still).
    Unknown,
}

impl<T> Call<T> {
    /// The answer, if Redis gave one.
    pub fn done(self) -> Option<T> {
        match self {
            Self::Done(v) => Some(v),
            Self::NotRun | Self::Unknown => None,
        }
    }
}

/// A lazily connected Redis client with a timeout on every call, an error counter and
/// rate-limited warnings. Cheap to clone; clones share one connection.
#[derive(Clone)]
pub struct RedisConn {
    client: redis::Client,
    timeout: Duration,
    conn: Arc<OnceLock<Option<ConnectionManager>>>,
    warned: Arc<AtomicU64>,
    health: Arc<Health>,
    epoch: Instant,
    store: &'static str,
    errors_metric: &'static str,
}

impl fmt::Debug for RedisConn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The connection info may hold a password: print the address only.
        f.debug_struct("RedisConn")
            .field("addr", &self.client.get_connection_info().addr())
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl RedisConn {
    /// A store on the Redis server at `url` (`redis://[:password@]host:port/db`).
    /// `store` names it in logs (`"claude-cache: redis second level"`), `errors_metric` is
    /// the counter of its failed calls. Nothing connects until the first call.
    ///
    /// # Errors
    ///
    /// When the URL does not parse.
    pub fn open(
        url: &str,
        store: &'static str,
        errors_metric: &'static str,
        timeout: Duration,
    ) -> redis::RedisResult<Self> {
        Ok(Self::new(
            redis::Client::open(url)?,
            store,
            errors_metric,
            timeout,
        ))
    }

    /// A store through `client` (see [`RedisConn::open`]).
    pub fn new(
        client: redis::Client,
        store: &'static str,
        errors_metric: &'static str,
        timeout: Duration,
    ) -> Self {
        Self {
            client,
            timeout,
            conn: Arc::new(OnceLock::new()),
            warned: Arc::new(AtomicU64::new(0)),
            health: Arc::new(Health::default()),
            epoch: Instant::now(),
            store,
            errors_metric,
        }
    }

    /// The same store with another call timeout (and a connection of its own, created on
    /// first use with that timeout).
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self.conn = Arc::new(OnceLock::new());
        self
    }

    /// The timeout of every call.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The server's address, for `Debug` output (never the password).
    pub fn addr(&self) -> &redis::ConnectionAddr {
        self.client.get_connection_info().addr()
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Whether Redis is known to be down right now: the call is skipped (counted as
    /// failed, op `skipped`) instead of waiting for its timeout.
    fn backing_off(&self) -> bool {
        let until = self.health.skip_until.load(Ordering::Relaxed);
        if until != 0 && self.now_ms() < until {
            metrics::counter!(self.errors_metric, "op" => "skipped").increment(1);
            return true;
        }
        false
    }

    /// The connection for a call of `op`, unless the store is backing off or has none.
    fn usable(&self, op: &'static str) -> Option<ConnectionManager> {
        if self.backing_off() {
            return None;
        }
        let conn = self.connection();
        if conn.is_none() {
            self.failed(op, &"no connection manager");
        }
        conn
    }

    fn connection(&self) -> Option<ConnectionManager> {
        self.conn
            .get_or_init(|| {
                let cfg = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(self.timeout))
                    .set_response_timeout(Some(self.timeout))
                    .set_number_of_retries(1)
                    .set_max_delay(Duration::from_secs(1));
                ConnectionManager::new_lazy_with_config(self.client.clone(), cfg)
                    .map_err(|e| {
                        tracing::warn!(store = self.store, error = %e, "redis connection manager");
                    })
                    .ok()
            })
            .clone()
    }

    /// Runs a script; `None` when Redis failed or did not answer in time (counted and
    /// logged under `op`).
    pub async fn script<T: redis::FromRedisValue>(
        &self,
        op: &'static str,
        invocation: redis::ScriptInvocation<'_>,
    ) -> Option<T> {
        self.script_call(op, invocation).await.done()
    }

    /// Runs a script, saying whether it may have run when no answer came.
    pub async fn script_call<T: redis::FromRedisValue>(
        &self,
        op: &'static str,
        invocation: redis::ScriptInvocation<'_>,
    ) -> Call<T> {
        let Some(mut conn) = self.usable(op) else {
            return Call::NotRun;
        };
        let call = invocation.invoke_async::<T>(&mut conn);
        self.finish(op, tokio::time::timeout(self.timeout, call).await)
    }

    /// Runs a command; `None` when Redis failed or did not answer in time (counted and
    /// logged under `op`).
    pub async fn query<T: redis::FromRedisValue>(
        &self,
        op: &'static str,
        cmd: &redis::Cmd,
    ) -> Option<T> {
        let mut conn = self.usable(op)?;
        let call = cmd.query_async::<T>(&mut conn);
        self.finish(op, tokio::time::timeout(self.timeout, call).await)
            .done()
    }

    fn finish<T>(
        &self,
        op: &'static str,
        outcome: Result<redis::RedisResult<T>, tokio::time::error::Elapsed>,
    ) -> Call<T> {
        let call = match outcome {
            Ok(Ok(v)) => {
                if self.health.failures.load(Ordering::Relaxed) != 0 {
                    self.health.failures.store(0, Ordering::Relaxed);
                    self.health.skip_until.store(0, Ordering::Relaxed);
                }
                return Call::Done(v);
            }
            // An error Redis answered (a script error, a wrong type) says it is up, and
            // that the call did not run.
            Ok(Err(e)) if !(e.is_io_error() || e.is_connection_dropped() || e.is_timeout()) => {
                self.failed(op, &e);
                return Call::NotRun;
            }
            Ok(Err(e)) => {
                self.failed(op, &e);
                if e.is_connection_refusal() {
                    Call::NotRun
                } else {
                    Call::Unknown
                }
            }
            Err(_) => {
                self.failed(op, &format_args!("no answer within {:?}", self.timeout));
                Call::Unknown
            }
        };
        if self.health.failures.fetch_add(1, Ordering::Relaxed) + 1 >= FAILURES_TO_BACK_OFF {
            self.health.skip_until.store(
                self.now_ms().saturating_add(BACK_OFF_MS).max(1),
                Ordering::Relaxed,
            );
        }
        call
    }

    /// Counts and logs a failure of `op` (an error, a timeout, or an answer that makes no
    /// sense to the caller).
    pub fn failed(&self, op: &'static str, error: &dyn fmt::Display) {
        metrics::counter!(self.errors_metric, "op" => op).increment(1);
        // Milliseconds since the store was made, offset so that the first failure warns.
        let now = u64::try_from(self.epoch.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .saturating_add(WARN_EVERY_MS);
        let last = self.warned.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= WARN_EVERY_MS
            && self
                .warned
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                store = self.store,
                op,
                %error,
                "redis unavailable (next warning in 10 s at the earliest)"
            );
        } else {
            tracing::debug!(store = self.store, op, %error, "redis call failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_prints_the_password() {
        let conn = RedisConn::open(
            "redis://:hunter2-secret@127.0.0.1:1/",
            "test",
            "test_errors_total",
            Duration::from_millis(10),
        )
        .unwrap();
        let text = format!("{conn:?}");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("127.0.0.1"), "{text}");
    }

    #[test]
    fn policy_reads_snake_case() {
        let p: FailurePolicy = serde_json::from_str("\"fail_closed\"").unwrap();
        assert_eq!(p, FailurePolicy::FailClosed);
        assert_eq!(FailurePolicy::default(), FailurePolicy::FailOpen);
    }

    #[tokio::test]
    async fn an_unreachable_server_is_a_counted_none_within_the_timeout() {
        // Port 1 on loopback: connection refused at once.
        let conn = RedisConn::open(
            "redis://127.0.0.1:1/",
            "test",
            "test_errors_total",
            Duration::from_millis(200),
        )
        .unwrap();
        let got: Option<String> = conn.query("get", redis::cmd("GET").arg("k")).await;
        assert_eq!(got, None);
        let got: Option<i64> = conn
            .script("script", redis::Script::new("return 1").prepare_invoke())
            .await;
        assert_eq!(got, None);
        // Two failures to reach it: the store now skips calls for a while.
        assert!(conn.health.skip_until.load(Ordering::Relaxed) > 0);
        assert!(conn.backing_off());
        let got: Option<String> = conn.query("get", redis::cmd("GET").arg("k")).await;
        assert_eq!(got, None);
    }
}
