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
//! # Reservations that nobody settles
//!
//! Each reservation has an id (a random prefix per store and a counter) and is recorded in
//! each of its windows as a field `r:{id}` and in the sorted set `{window}:leases` with the
//! time its lease ends ([`RedisBudgets::reservation_lease`], 15 minutes by default).
//! Settles and releases remove it by id, so they are idempotent. What would otherwise hold
//! a window's reservations for ever:
//!
//! - an admission that timed out (or whose connection broke) here but ran in Redis: the
//!   tracker releases its id at once, retrying for a few seconds; a release that arrives
//!   before the admission it cancels leaves a marker (`{window}:gone`, for the lease's
//!   length) that makes that admission reserve nothing;
//! - an instance that dies, or a settle or release that never reached Redis: the next
//!   admission to the window drops reservations whose lease has ended (at most 32 per
//!   window per admission).
//!
//! A request still running when its lease ends stops counting toward the cap (its spend is
//! still added when it settles): keep the lease above the longest answer.
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
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub use claude_core::redis::FailurePolicy;
use claude_core::redis::{Call, RedisConn};
use redis::Script;

use crate::budget::{BudgetScope, BudgetWindow};

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "claude-cost:v1:";
/// The default timeout of each Redis call.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(250);
/// The default lease of a reservation ([`RedisBudgets::reservation_lease`]).
pub const DEFAULT_LEASE: Duration = Duration::from_secs(15 * 60);
/// Counter, label `op` (`admit`, `settle`, `release`): failed calls to Redis.
pub const REDIS_ERRORS: &str = "claude_cost_redis_errors_total";
const STORE: &str = "claude-cost: shared budgets";

/// Removes reservation `id` from window `key` (idempotent). With `gone_until` (ms), a
/// reservation not there yet is remembered as given up until then, so that an admission
/// that arrives after its own release (another connection, after a timeout) reserves
/// nothing.
const DROP_RESERVATION: &str = r"
local function drop_reservation(key, id, gone_until)
  local amount = redis.call('HGET', key, 'r:' .. id)
  if amount then
    if redis.call('HINCRBY', key, 'reserved', -tonumber(amount)) < 0 then
      redis.call('HSET', key, 'reserved', 0)
    end
    redis.call('HDEL', key, 'r:' .. id)
    redis.call('ZREM', key .. ':leases', id)
  elseif gone_until then
    redis.call('ZADD', key .. ':gone', gone_until, id)
    redis.call('PEXPIREAT', key .. ':gone', gone_until)
  end
end
";

const ADMIT: &str = r"
-- KEYS: the windows. ARGV[1]: worst; ARGV[2]: reservation id; ARGV[3]: lease (ms);
-- then per window: limit, expire-at (ms).
local worst = tonumber(ARGV[1])
local id = ARGV[2]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local given_up = false
for i = 1, #KEYS do
  local expired = redis.call('ZRANGEBYSCORE', KEYS[i] .. ':leases', '-inf', now, 'LIMIT', 0, 32)
  for _, old in ipairs(expired) do
    drop_reservation(KEYS[i], old, nil)
  end
  redis.call('ZREMRANGEBYSCORE', KEYS[i] .. ':gone', '-inf', now)
  if redis.call('ZREM', KEYS[i] .. ':gone', id) == 1 then given_up = true end
end
if given_up then
  return {0}
end
for i = 1, #KEYS do
  local limit = tonumber(ARGV[2 * i + 2])
  local v = redis.call('HMGET', KEYS[i], 'spent', 'reserved')
  local spent = tonumber(v[1] or '0')
  local reserved = tonumber(v[2] or '0')
  if spent >= limit or spent + reserved + worst > limit then
    local first = redis.call('HSETNX', KEYS[i], 'alert:refused', 1)
    redis.call('PEXPIREAT', KEYS[i], ARGV[2 * i + 3])
    return {i, first, spent, reserved}
  end
end
for i = 1, #KEYS do
  redis.call('HINCRBY', KEYS[i], 'reserved', worst)
  redis.call('HSET', KEYS[i], 'r:' .. id, worst)
  redis.call('ZADD', KEYS[i] .. ':leases', now + tonumber(ARGV[3]), id)
  redis.call('PEXPIREAT', KEYS[i], ARGV[2 * i + 3])
  redis.call('PEXPIREAT', KEYS[i] .. ':leases', ARGV[2 * i + 3])
end
return {0}
";

const SETTLE: &str = r"
-- KEYS[1..n]: the current windows; KEYS[n+1..]: the windows holding the reservation.
-- ARGV: n, reservation id, spent, t, t thresholds, then per current window: limit, expire-at.
local n = tonumber(ARGV[1])
local id = ARGV[2]
local spent = tonumber(ARGV[3])
local t = tonumber(ARGV[4])
for j = n + 1, #KEYS do
  drop_reservation(KEYS[j], id, nil)
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
-- KEYS: the windows of the reservation. ARGV[1]: the reservation id; ARGV[2]: lease (ms).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for j = 1, #KEYS do
  drop_reservation(KEYS[j], ARGV[1], now + tonumber(ARGV[2]))
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
    lease: Duration,
    scripts: Arc<Scripts>,
    ids: Arc<Ids>,
}

/// Reservation ids: a random prefix per store (so instances never collide) and a counter.
#[derive(Debug)]
struct Ids {
    prefix: u64,
    next: AtomicU64,
}

impl Ids {
    fn new() -> Self {
        use std::hash::BuildHasher;
        // RandomState is seeded from the OS's randomness once per process and then per
        // instance: enough to tell instances apart, no dependency needed.
        let prefix = std::hash::RandomState::new().hash_one((std::process::id(), Instant::now()));
        Self {
            prefix,
            next: AtomicU64::new(0),
        }
    }
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
            lease: DEFAULT_LEASE,
            scripts: Arc::new(Scripts {
                admit: Script::new(&format!("{DROP_RESERVATION}{ADMIT}")),
                settle: Script::new(&format!("{DROP_RESERVATION}{SETTLE}")),
                release: Script::new(&format!("{DROP_RESERVATION}{RELEASE}")),
            }),
            ids: Arc::new(Ids::new()),
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

    /// Sets how long a reservation may hold its windows (default [`DEFAULT_LEASE`],
    /// 15 minutes): one whose settlement never reached Redis (an instance that died, a
    /// settle or release that failed, an admission that timed out here but ran there) is
    /// dropped by the next admission to the window after this long. Keep it above the
    /// longest answer (a stream of the largest `max_tokens`): a request still running
    /// when its lease ends no longer counts toward the cap (its spend is still recorded).
    #[must_use]
    pub fn reservation_lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    fn lease_ms(&self) -> u64 {
        u64::try_from(self.lease.as_millis()).unwrap_or(u64::MAX)
    }

    /// A fresh reservation id.
    pub(crate) fn next_id(&self) -> String {
        let n = self.ids.next.fetch_add(1, Ordering::Relaxed);
        format!("{:016x}-{n:x}", self.ids.prefix)
    }

    /// The Redis key of a window.
    pub(crate) fn key(&self, scope: &BudgetScope, window: BudgetWindow, period: &str) -> String {
        format!("{}{scope}:{window}:{period}", self.prefix)
    }

    /// Reserves `worst` in every window under `id`, or says which refused; no answer when
    /// Redis failed ([`Call::Unknown`]: the reservation may have been made).
    pub(crate) async fn admit(
        &self,
        windows: &[WindowKey],
        worst: u64,
        id: &str,
    ) -> Call<Result<(), SharedRefusal>> {
        let mut inv = self.scripts.admit.prepare_invoke();
        inv.arg(worst).arg(id).arg(self.lease_ms());
        for w in windows {
            inv.key(&w.key).arg(w.limit).arg(w.expire_at_ms);
        }
        let reply: Vec<u64> = match self.conn.script_call("admit", inv).await {
            Call::Done(reply) => reply,
            Call::NotRun => return Call::NotRun,
            Call::Unknown => return Call::Unknown,
        };
        match reply.as_slice() {
            [0] => Call::Done(Ok(())),
            &[i, first, spent, reserved] if i >= 1 => Call::Done(Err(SharedRefusal {
                index: usize::try_from(i - 1).unwrap_or(usize::MAX),
                first: first == 1,
                spent,
                reserved,
            })),
            _ => {
                self.conn.failed("admit", &"unexpected reply");
                Call::Unknown
            }
        }
    }

    /// Moves a reservation (held in `held`) to the real spend in `windows`; returns the
    /// thresholds this settle reached first, or `None` when Redis failed.
    pub(crate) async fn settle(
        &self,
        windows: &[WindowKey],
        held: &[String],
        id: &str,
        spent: u64,
        thresholds: &[u32],
    ) -> Option<Vec<Fired>> {
        let mut inv = self.scripts.settle.prepare_invoke();
        inv.arg(windows.len())
            .arg(id)
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

    /// Gives back a reservation that will not be spent (nothing when it is not there; and
    /// an admission of it that runs later reserves nothing). Retried while Redis fails, for
    /// about 8 seconds (the release is idempotent, so a retry of one that did run is
    /// harmless); after that, the reservation's lease ends it.
    pub(crate) async fn release(&self, held: &[String], id: &str) {
        const BACKOFF_MS: [u64; 5] = [250, 500, 1_000, 2_000, 4_000];
        for delay in std::iter::once(0).chain(BACKOFF_MS) {
            if delay > 0 {
                tokio::time::sleep(Duration::from_millis(delay)).await;
            }
            let mut inv = self.scripts.release.prepare_invoke();
            inv.arg(id).arg(self.lease_ms());
            for k in held {
                inv.key(k);
            }
            if self.conn.script::<i64>("release", inv).await.is_some() {
                return;
            }
        }
    }
}

/// A reservation held in Redis: the windows that hold it.
#[derive(Debug)]
pub(crate) struct Hold {
    pub(crate) redis: RedisBudgets,
    pub(crate) keys: Vec<String>,
    /// The reservation's id in the windows of `keys`.
    pub(crate) id: String,
}
