//! Budgets shared by several trackers (several gateway instances) through Redis (feature
//! `redis`).
//!
//! # What is shared
//!
//! Every budget window (scope × daily/monthly × period) is one Redis hash,
//! `{prefix}{scope}:{window}:{period}` (for example
//! `claude-cost:v1:tenant:acme:daily:2026-03-01`), with the fields `spent` and `reserved`
//! in nano-dollars and one `alert:{percent}` / `alert:refused` field per alert that fired.
//! Each key gets a `PEXPIREAT` past the end of its window on every write (a day after a
//! daily window; 33 days after the last write for a monthly one), so nothing lives for ever.
//!
//! - **Admit** is one Lua script over every window the request touches (global and its
//!   tenant's, daily and monthly): if any window has `spent ≥ limit` or
//!   `spent + reserved + worst > limit` it refuses (and marks the window's refusal alert with
//!   `HSETNX`, so it fires once across all instances), otherwise it adds `worst` to
//!   `reserved` in all of them. All or nothing, atomically: concurrent requests on any
//!   number of instances cannot pass a cap together. The bound on overshoot is the one of
//!   the [local budgets](crate::budget#reservations-and-the-hard-cap).
//! - **Settle** is a second script: it takes the reservation back from the windows that
//!   hold it (the ones of the admission, even when the period has rolled since), adds the
//!   real cost to `spent` in the current windows, and marks each threshold reached with
//!   `HSETNX alert:{percent}`: only the instance whose settle set the mark fires the alert,
//!   so each alert fires once in total. A reservation given back without a response
//!   (error, cancellation) is released by a third script. Settles and releases run on a
//!   task of their own, off the response path.
//! - The windows' periods come from each tracker's clock, as locally; instances should
//!   keep their clocks in sync (NTP) so that they agree on midnight.
//! - Reports ([`CostTracker::report`](crate::CostTracker::report)) stay per instance; the
//!   budgets in them show the instance's local view.
//!
//! Amounts are integers in Redis; Lua compares them as doubles, exact up to 2^53
//! nano-dollars (about $9 million) per window.
//!
//! # When Redis is unreachable
//!
//! Every call has a timeout ([`RedisBudgets::timeout`], 250 ms by default). When admission
//! cannot reach Redis, [`FailurePolicy`] decides:
//!
//! - [`FailurePolicy::FailOpen`] (the default): the tracker's local budgets decide, as
//!   without Redis. Each instance keeps the spend it settled in its local windows, so the
//!   local caps still bound what one instance spends; alerts of those requests fire
//!   locally.
//! - [`FailurePolicy::FailClosed`]: the request is refused with `BudgetExceeded` (a 429
//!   for a client), saying that the budget store is unreachable.
//!
//! Spend settled while Redis was down is not replayed into it later. The connection is
//! redis-rs's `ConnectionManager`, created lazily on first use, which reconnects by itself:
//! the shared budgets are used again as soon as Redis answers. Failures count in
//! `claude_cost_redis_errors_total` (label `op`: `admit`, `settle`, `release`), are logged at
//! `debug`, and at `warn` at most every 10 seconds.
//!
//! A reservation held by an instance that dies stays in its windows until they expire.
//!
//! # In the layer
//!
//! With shared budgets, [`Cost`](crate::Cost) calls its inner service at once (as tower
//! requires after `poll_ready`) but polls the returned future only after Redis admitted the
//! request; a refused request's future is dropped unpolled. Every layer of this workspace
//! and hyper's client do no work before their future is polled, so a refused request never
//! reaches the upstream (the tests check it with the mock's counters).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

pub use claude_core::redis::FailurePolicy;
use claude_core::redis::RedisConn;
use redis::Script;

use crate::budget::{BudgetScope, BudgetWindow};

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "claude-cost:v1:";
/// The default timeout of each Redis call.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(250);
/// Counter, label `op` (`admit`, `settle`, `release`): failed calls to Redis.
pub const REDIS_ERRORS: &str = "claude_cost_redis_errors_total";
const STORE: &str = "claude-cost: shared budgets";

const ADMIT: &str = r"
-- KEYS: the windows. ARGV[1]: worst; then per window: limit, expire-at (ms).
local worst = tonumber(ARGV[1])
for i = 1, #KEYS do
  local limit = tonumber(ARGV[2 * i])
  local v = redis.call('HMGET', KEYS[i], 'spent', 'reserved')
  local spent = tonumber(v[1] or '0')
  local reserved = tonumber(v[2] or '0')
  if spent >= limit or spent + reserved + worst > limit then
    local first = redis.call('HSETNX', KEYS[i], 'alert:refused', 1)
    redis.call('PEXPIREAT', KEYS[i], ARGV[2 * i + 1])
    return {i, first, spent, reserved}
  end
end
for i = 1, #KEYS do
  redis.call('HINCRBY', KEYS[i], 'reserved', worst)
  redis.call('PEXPIREAT', KEYS[i], ARGV[2 * i + 1])
end
return {0}
";

const SETTLE: &str = r"
-- KEYS[1..n]: the current windows; KEYS[n+1..]: the windows holding the reservation.
-- ARGV: n, reserved, spent, t, t thresholds, then per current window: limit, expire-at.
local n = tonumber(ARGV[1])
local reserved = tonumber(ARGV[2])
local spent = tonumber(ARGV[3])
local t = tonumber(ARGV[4])
if reserved > 0 then
  for j = n + 1, #KEYS do
    if redis.call('EXISTS', KEYS[j]) == 1 then
      if redis.call('HINCRBY', KEYS[j], 'reserved', -reserved) < 0 then
        redis.call('HSET', KEYS[j], 'reserved', 0)
      end
    end
  end
end
local fired = {}
for i = 1, n do
  local limit = tonumber(ARGV[4 + t + 2 * i - 1])
  local total = redis.call('HINCRBY', KEYS[i], 'spent', spent)
  redis.call('PEXPIREAT', KEYS[i], ARGV[4 + t + 2 * i])
  if total > 0 then
    for k = 1, t do
      local pct = tonumber(ARGV[4 + k])
      if total * 100 >= pct * limit and redis.call('HSETNX', KEYS[i], 'alert:' .. pct, 1) == 1 then
        table.insert(fired, i)
        table.insert(fired, pct)
        table.insert(fired, total)
      end
    end
  end
end
return fired
";

const RELEASE: &str = r"
-- KEYS: the windows holding the reservation. ARGV[1]: the amount.
for j = 1, #KEYS do
  if redis.call('EXISTS', KEYS[j]) == 1 then
    if redis.call('HINCRBY', KEYS[j], 'reserved', -tonumber(ARGV[1])) < 0 then
      redis.call('HSET', KEYS[j], 'reserved', 0)
    end
  end
end
return 0
";

/// The Redis store of shared budgets: where it connects, the key prefix, the per-call
/// timeout and the [`FailurePolicy`]. Cheap to clone; clones share one connection. Give it
/// to [`CostTrackerBuilder::redis`](crate::CostTrackerBuilder::redis).
#[derive(Clone)]
pub struct RedisBudgets {
    conn: RedisConn,
    prefix: Arc<str>,
    policy: FailurePolicy,
    scripts: Arc<Scripts>,
}

struct Scripts {
    admit: Script,
    settle: Script,
    release: Script,
}

impl fmt::Debug for RedisBudgets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBudgets")
            .field("addr", self.conn.addr())
            .field("prefix", &self.prefix)
            .field("timeout", &self.conn.timeout())
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

/// A refusal by the shared budgets: the index of the window that refused, whether this
/// refusal is the window's first (its alert fires), and the window's spend and
/// reservations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SharedRefusal {
    pub(crate) index: usize,
    pub(crate) first: bool,
    pub(crate) spent: u64,
    pub(crate) reserved: u64,
}

/// A threshold a settle reached first: window index, percent, the window's spend.
pub(crate) type Fired = (usize, u32, u64);

/// One window as the scripts see it.
#[derive(Debug, Clone)]
pub(crate) struct WindowKey {
    pub(crate) key: String,
    pub(crate) limit: u64,
    pub(crate) expire_at_ms: i64,
}

impl RedisBudgets {
    /// Shared budgets on the Redis server at `url`. Nothing connects until the first use.
    ///
    /// # Errors
    ///
    /// When the URL does not parse.
    pub fn open(url: &str) -> redis::RedisResult<Self> {
        Ok(Self::new(redis::Client::open(url)?))
    }

    /// Shared budgets through `client`.
    pub fn new(client: redis::Client) -> Self {
        Self {
            conn: RedisConn::new(client, STORE, REDIS_ERRORS, DEFAULT_TIMEOUT),
            prefix: Arc::from(DEFAULT_PREFIX),
            policy: FailurePolicy::default(),
            scripts: Arc::new(Scripts {
                admit: Script::new(ADMIT),
                settle: Script::new(SETTLE),
                release: Script::new(RELEASE),
            }),
        }
    }

    /// Sets the key prefix (default [`DEFAULT_PREFIX`]).
    #[must_use]
    pub fn prefix(mut self, prefix: impl Into<Arc<str>>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Sets the timeout of every Redis call (default [`DEFAULT_TIMEOUT`], 250 ms).
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.conn = self.conn.with_timeout(timeout);
        self
    }

    /// Sets what admission does when Redis is unreachable (default
    /// [`FailurePolicy::FailOpen`]).
    #[must_use]
    pub fn policy(mut self, policy: FailurePolicy) -> Self {
        self.policy = policy;
        self
    }

    /// The policy in force.
    pub fn failure_policy(&self) -> FailurePolicy {
        self.policy
    }

    /// The Redis key of a window.
    pub(crate) fn key(&self, scope: &BudgetScope, window: BudgetWindow, period: &str) -> String {
        format!("{}{scope}:{window}:{period}", self.prefix)
    }

    /// Reserves `worst` in every window, or says which refused; `None` when Redis failed.
    pub(crate) async fn admit(
        &self,
        windows: &[WindowKey],
        worst: u64,
    ) -> Option<Result<(), SharedRefusal>> {
        let mut inv = self.scripts.admit.prepare_invoke();
        inv.arg(worst);
        for w in windows {
            inv.key(&w.key).arg(w.limit).arg(w.expire_at_ms);
        }
        let reply: Vec<u64> = self.conn.script("admit", inv).await?;
        match reply.as_slice() {
            [0] => Some(Ok(())),
            &[i, first, spent, reserved] if i >= 1 => Some(Err(SharedRefusal {
                index: usize::try_from(i - 1).unwrap_or(usize::MAX),
                first: first == 1,
                spent,
                reserved,
            })),
            _ => {
                self.conn.failed("admit", &"unexpected reply");
                None
            }
        }
    }

    /// Moves a reservation (held in `held`) to the real spend in `windows`; returns the
    /// thresholds this settle reached first, or `None` when Redis failed.
    pub(crate) async fn settle(
        &self,
        windows: &[WindowKey],
        held: &[String],
        reserved: u64,
        spent: u64,
        thresholds: &[u32],
    ) -> Option<Vec<Fired>> {
        let mut inv = self.scripts.settle.prepare_invoke();
        inv.arg(windows.len())
            .arg(reserved)
            .arg(spent)
            .arg(thresholds.len());
        for t in thresholds {
            inv.arg(*t);
        }
        for w in windows {
            inv.key(&w.key).arg(w.limit).arg(w.expire_at_ms);
        }
        for k in held {
            inv.key(k);
        }
        let reply: Vec<u64> = self.conn.script("settle", inv).await?;
        Some(
            reply
                .chunks_exact(3)
                .map(|c| {
                    (
                        usize::try_from(c[0].saturating_sub(1)).unwrap_or(usize::MAX),
                        u32::try_from(c[1]).unwrap_or(u32::MAX),
                        c[2],
                    )
                })
                .collect(),
        )
    }

    /// Gives back a reservation that will not be spent.
    pub(crate) async fn release(&self, held: &[String], amount: u64) {
        let mut inv = self.scripts.release.prepare_invoke();
        inv.arg(amount);
        for k in held {
            inv.key(k);
        }
        let _: Option<i64> = self.conn.script("release", inv).await;
    }
}

/// A reservation held in Redis: the windows that hold it.
#[derive(Debug)]
pub(crate) struct Hold {
    pub(crate) redis: RedisBudgets,
    pub(crate) keys: Vec<String>,
}
