//! Rate limits shared by several layers (several gateway instances) through Redis (feature
//! `redis`).
//!
//! # How it works
//!
//! The local limiter keeps doing everything it does alone: the FIFO queue, the concurrency
//! slots, its own buckets, following the server. With [`RateLimitLayer::redis`], a request
//! the local limiter admitted must also obtain a **grant** from the shared buckets before
//! it is sent:
//!
//! - The grant is one Lua script over every bucket the request touches (requests, input
//!   tokens, output tokens of its key, with the key's scope: tenant and/or model family):
//!   each bucket is refilled continuously from the time of its last update to the Redis
//!   server's clock (`TIME`, so instances' clocks do not matter), and if every bucket holds
//!   the demand plus the safety margin, all are charged at once; otherwise nothing is
//!   charged and the script returns how long until they would hold it. All or nothing,
//!   atomically, across any number of instances.
//! - A bucket is a hash `{prefix}{kind}:{family}:{tenant}` with its level (thousandths of a
//!   token) and the time of the level; its expiry is the time it takes to refill to full,
//!   after which it is indistinguishable from an absent (full) bucket.
//! - A denied request waits locally for the time the script returned, then asks again,
//!   until its deadline ([`RateLimitConfig::max_wait`](crate::RateLimitConfig::max_wait)
//!   from the moment it asks), when it is refused with `QueueTimeout`. Waiters of different
//!   instances are not ordered among themselves (each instance's own queue stays FIFO).
//! - Settlement runs a second script that refunds (or charges) the difference between the
//!   reservation and the usage, by the same rules as locally, on a task of its own.
//!
//! The local buckets keep the same limits: an instance never exceeds the limits alone, and
//! they are the fallback (the further scopes' too: with Redis unreachable and the fail-open
//! policy, a request is granted by the instance's local buckets of those scopes). A request waiting for its grant holds its local admission (and
//! its concurrency slot, with `max_concurrent_requests`) meanwhile.
//!
//! Scopes: the grant covers the buckets of the request's key under the layer's
//! [`KeyScope`](crate::KeyScope) (tenant and model family by default) **and** those of every
//! further scope of [`RateLimitConfig::scopes`](crate::RateLimitConfig::scopes) (say, the
//! model family for the whole organisation, and a global cap), in the same script: a
//! request is charged in all of them or in none. A further scope's bucket is
//! `{prefix}{kind}:{scope}/{family}:{tenant}`.
//!
//! Following the server: a 429's pause (its `retry-after`, at most `max_pause`) is
//! shared: the instance that received it writes `{prefix}pause:{family}:{tenant}` with
//! that lifetime, and every instance's grant for the key waits until it is gone (a longer
//! pause in force is kept). The `anthropic-ratelimit-*-remaining` figures correct the local
//! buckets of the instance that received them; the shared buckets follow the configured
//! limits (each instance's local buckets stay under the server's figures, and the server
//! counts every instance, so a low `remaining` slows every instance that sees it).
//!
//! # When Redis is unreachable
//!
//! Every call has a timeout ([`RedisLimits::timeout`], 250 ms by default). When the grant
//! cannot be obtained because Redis fails, [`FailurePolicy`] decides:
//! [`FailurePolicy::FailOpen`] (the default) sends the request on the local admission alone,
//! so each instance holds the limits by itself; [`FailurePolicy::FailClosed`] refuses it with
//! a local 429 (`RateLimited`, `retry-after: 1`). The connection (redis-rs's
//! `ConnectionManager`, created on first use) reconnects by itself, and the shared buckets
//! are used again as soon as Redis answers. Failures count in
//! `claude_ratelimit_redis_errors_total` (label `op`: `grant`, `settle`).
//!
//! [`RateLimitLayer::redis`]: crate::RateLimitLayer::redis

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

pub use claude_core::redis::FailurePolicy;
use claude_core::redis::RedisConn;
use claude_core::{Error, ErrorKind};
use redis::Script;
use tokio::time::Instant;

use crate::grant::GrantBucket;

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "claude-ratelimit:v1:";
/// The default timeout of each Redis call.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(250);
/// Counter, label `op` (`grant`, `settle`): failed calls to Redis.
pub const REDIS_ERRORS: &str = "claude_ratelimit_redis_errors_total";
const STORE: &str = "claude-ratelimit: shared rate limits";

const GRANT: &str = r"
-- KEYS[1]: the key's pause; KEYS[2..]: buckets.
-- ARGV: per bucket: capacity, demand, required (milli-units).
local paused = redis.call('PTTL', KEYS[1])
if paused > 0 then
  return {0, paused}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local levels = {}
local wait = 0
for i = 1, #KEYS - 1 do
  local cap = tonumber(ARGV[3 * i - 2])
  local required = tonumber(ARGV[3 * i])
  local v = redis.call('HMGET', KEYS[i + 1], 'level', 'ts')
  local level = tonumber(v[1])
  local ts = tonumber(v[2])
  if level == nil or ts == nil then
    level = cap
  elseif now > ts then
    level = math.min(cap, level + (now - ts) * cap / 60000000)
  end
  levels[i] = level
  if level < required then
    local w = (required - level) * 60000000 / cap
    if w > wait then wait = w end
  end
end
if wait > 0 then
  return {0, math.ceil(wait / 1000)}
end
for i = 1, #KEYS - 1 do
  local cap = tonumber(ARGV[3 * i - 2])
  local level = levels[i] - tonumber(ARGV[3 * i - 1])
  redis.call('HSET', KEYS[i + 1], 'level', string.format('%.3f', level), 'ts', now)
  redis.call('PEXPIRE', KEYS[i + 1], math.ceil((cap - level) * 60000 / cap) + 1000)
end
return {1, 0}
";

const PAUSE: &str = r"
-- KEYS[1]: the key's pause. ARGV[1]: its length (ms); a longer pause in force is kept.
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], 1, 'PX', ARGV[1])
end
return 0
";

const SETTLE: &str = r"
-- KEYS: buckets. ARGV: per bucket: capacity, delta (milli-units; > 0 refunds).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
for i = 1, #KEYS do
  local cap = tonumber(ARGV[2 * i - 1])
  local delta = tonumber(ARGV[2 * i])
  local v = redis.call('HMGET', KEYS[i], 'level', 'ts')
  local level = tonumber(v[1])
  local ts = tonumber(v[2])
  if level == nil or ts == nil then
    level = cap
  elseif now > ts then
    level = math.min(cap, level + (now - ts) * cap / 60000000)
  end
  level = math.min(cap, level + delta)
  if level >= cap then
    redis.call('DEL', KEYS[i])
  else
    redis.call('HSET', KEYS[i], 'level', string.format('%.3f', level), 'ts', now)
    redis.call('PEXPIRE', KEYS[i], math.ceil((cap - level) * 60000 / cap) + 1000)
  end
end
return {0}
";

/// The Redis store of shared rate limits: where it connects, the key prefix, the per-call
/// timeout and the [`FailurePolicy`]. Cheap to clone; clones share one connection. Give it
/// to [`RateLimitLayer::redis`](crate::RateLimitLayer::redis).
#[derive(Clone)]
pub struct RedisLimits {
    conn: RedisConn,
    prefix: Arc<str>,
    policy: FailurePolicy,
    scripts: Arc<(Script, Script, Script)>,
}

impl fmt::Debug for RedisLimits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisLimits")
            .field("addr", self.conn.addr())
            .field("prefix", &self.prefix)
            .field("timeout", &self.conn.timeout())
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

/// A grant obtained in Redis: what to settle there.
#[derive(Debug)]
pub(crate) struct Hold {
    redis: RedisLimits,
    buckets: Vec<GrantBucket>,
}

impl Hold {
    /// Refunds (or charges) each bucket the difference between its demand and `finals`, on
    /// a task of its own (nothing when nothing changes, or outside a runtime).
    pub(crate) fn settle(self, finals: &[i64; 3]) {
        let deltas: Vec<i64> = self
            .buckets
            .iter()
            .map(|b| b.demand - finals[b.kind])
            .collect();
        if deltas.iter().any(|d| *d != 0)
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            rt.spawn(async move { self.redis.settle(&self.buckets, &deltas).await });
        }
    }
}

enum Reply {
    Granted,
    Wait(Duration),
}

impl RedisLimits {
    /// Shared limits on the Redis server at `url`. Nothing connects until the first use.
    ///
    /// # Errors
    ///
    /// When the URL does not parse.
    pub fn open(url: &str) -> redis::RedisResult<Self> {
        Ok(Self::new(redis::Client::open(url)?))
    }

    /// Shared limits through `client`.
    pub fn new(client: redis::Client) -> Self {
        Self {
            conn: RedisConn::new(client, STORE, REDIS_ERRORS, DEFAULT_TIMEOUT),
            prefix: Arc::from(DEFAULT_PREFIX),
            policy: FailurePolicy::default(),
            scripts: Arc::new((Script::new(GRANT), Script::new(SETTLE), Script::new(PAUSE))),
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

    /// Sets what a request does when Redis is unreachable (default
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

    /// The Redis key of bucket `kind` of the key whose id is `id`.
    pub(crate) fn key(&self, kind: &str, id: &str) -> String {
        format!("{}{kind}:{id}", self.prefix)
    }

    /// The Redis key of the pause of the key whose id is `id`.
    pub(crate) fn pause_key(&self, id: &str) -> String {
        format!("{}pause:{id}", self.prefix)
    }

    /// Pauses the key whose id is `id` for every instance, for `pause` (a 429's
    /// `retry-after`), on a task of its own; a longer pause already in force is kept.
    pub(crate) fn pause(&self, id: &str, pause: Duration) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let key = self.pause_key(id);
        let ms = u64::try_from(pause.as_millis()).unwrap_or(u64::MAX).max(1);
        let redis = self.clone();
        rt.spawn(async move {
            let mut inv = redis.scripts.2.prepare_invoke();
            inv.key(&key).arg(ms);
            let _: Option<i64> = redis.conn.script("pause", inv).await;
        });
    }

    /// The Redis key of the bucket whose local id is `id` (`{kind}:{scope}/{key id}`).
    pub(crate) fn prefixed(&self, id: &str) -> String {
        format!("{}{id}", self.prefix)
    }

    async fn try_grant(&self, pause: &str, buckets: &[GrantBucket]) -> Option<Reply> {
        let mut inv = self.scripts.0.prepare_invoke();
        inv.key(pause);
        for b in buckets {
            inv.key(&b.key).arg(b.cap).arg(b.demand).arg(b.required);
        }
        match self.conn.script::<Vec<i64>>("grant", inv).await?.as_slice() {
            [1, _] => Some(Reply::Granted),
            &[0, ms] => Some(Reply::Wait(Duration::from_millis(
                u64::try_from(ms).unwrap_or(0).max(1),
            ))),
            _ => {
                self.conn.failed("grant", &"unexpected reply");
                None
            }
        }
    }

    /// Obtains the grant of `buckets`, waiting as the script says, until `max_wait` has
    /// passed. `Ok(None)` when Redis failed under the fail-open policy: the caller falls
    /// back to its local buckets.
    pub(crate) async fn grant(
        self,
        pause: String,
        buckets: Vec<GrantBucket>,
        max_wait: Duration,
    ) -> Result<Option<Hold>, Error> {
        let redis = self;
        {
            if buckets.is_empty() {
                return Ok(None);
            }
            let deadline = Instant::now() + max_wait;
            loop {
                match redis.try_grant(&pause, &buckets).await {
                    Some(Reply::Granted) => return Ok(Some(Hold { redis, buckets })),
                    Some(Reply::Wait(wait)) => {
                        let now = Instant::now();
                        if now + wait > deadline {
                            crate::metrics::rejected("queue_timeout");
                            return Err(Error::queue_timeout(wait));
                        }
                        tokio::time::sleep(wait).await;
                    }
                    None => {
                        return match redis.policy {
                            FailurePolicy::FailOpen => Ok(None),
                            FailurePolicy::FailClosed => Err(Error::new(
                                ErrorKind::RateLimited,
                                "local rate limit: the shared rate-limit store is unreachable, \
                                 and this gateway refuses requests it cannot count (fail closed)",
                            )
                            .with_retry_after(Duration::from_secs(1))),
                        };
                    }
                }
            }
        }
    }

    /// Refunds (or charges) `deltas` (per bucket of the hold, milli-units).
    async fn settle(&self, buckets: &[GrantBucket], deltas: &[i64]) {
        let mut inv = self.scripts.1.prepare_invoke();
        for (b, d) in buckets.iter().zip(deltas) {
            inv.key(&b.key).arg(b.cap).arg(*d);
        }
        let _: Option<Vec<i64>> = self.conn.script("settle", inv).await;
    }
}
