//! The shared state: a sharded map of keys, each with its buckets, its in-flight count, its
//! pause and its FIFO queue behind one short mutex.
//!
//! Everything a decision needs about one key sits in one [`KeyInner`] behind one
//! `std::sync::Mutex` that is never held across an await: admission of the queue head is
//! all-or-nothing across the request, input and output buckets and the concurrency count,
//! which one lock makes exact without any compare-and-swap loop over several atomics.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::Waker;
use std::time::{Duration, SystemTime};

use claude_core::headers::{RateLimitHeaders, retry_after};
use claude_core::{BodyFormat, Error, ErrorKind, RequestMeta, Tenant, UsageReport};
use http::{HeaderMap, StatusCode};
use tokio::time::Instant;

use crate::bucket::{Bucket, MILLI};
use crate::config::{KeyScope, RateLimitConfig};
use crate::grant::{Grant, GrantBucket, Hold, ScopeBuckets};
use crate::metrics;
use crate::queue::Acquire;

/// Index of the request bucket in the per-kind arrays.
pub(crate) const REQUESTS: usize = 0;
/// Index of the input-token bucket.
pub(crate) const INPUT: usize = 1;
/// Index of the output-token bucket.
pub(crate) const OUTPUT: usize = 2;
const KIND_NAMES: [&str; 3] = ["requests", "input_tokens", "output_tokens"];

/// Milli-units per kind: requests, input tokens, output tokens.
pub(crate) type Amounts = [i64; 3];

/// Shards of the key map: enough that unrelated keys rarely meet on one lock.
const SHARDS: usize = 16;
/// One shard is swept for idle keys every this many calls.
const SWEEP_EVERY: u64 = 64;
/// Distinct model-family labels on the `tokens_available` gauge before `other`.
const MAX_FAMILY_LABELS: usize = 32;

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn tokens(milli: u64) -> i64 {
    i64::try_from(milli.saturating_mul(MILLI as u64)).unwrap_or(i64::MAX / 4)
}

/// What a set of buckets is shared by (see [`KeyScope`](crate::KeyScope)).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Key {
    tenant: Option<Tenant>,
    family: Option<Arc<str>>,
}

impl Key {
    /// An unambiguous id for shared state: the family with its length, then the tenant
    /// (`-` for a part the scope leaves out).
    pub(crate) fn shared_id(&self) -> String {
        let family = self
            .family
            .as_deref()
            .map_or_else(|| "-".to_owned(), |f| format!("{}.{f}", f.len()));
        let tenant = self
            .tenant
            .as_ref()
            .map_or_else(|| "-".to_owned(), |t| format!("t.{t}"));
        format!("{family}:{tenant}")
    }
}

/// The three buckets of one scope: limits, and capacities and safety margins in
/// milli-units.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Buckets {
    limits: [Option<u64>; 3],
    caps: [i64; 3],
    margins: [i64; 3],
}

impl Buckets {
    fn new(limits: [Option<u64>; 3], safety_margin: Duration) -> Self {
        let mut caps = [0; 3];
        let mut margins = [0; 3];
        for k in 0..3 {
            if let Some(limit) = limits[k] {
                caps[k] = tokens(limit);
                let margin = (caps[k] as u128)
                    .saturating_mul(safety_margin.as_nanos())
                    .div_ceil(60_000_000_000);
                margins[k] = i64::try_from(margin).unwrap_or(caps[k]).min(caps[k]);
            }
        }
        Self {
            limits,
            caps,
            margins,
        }
    }

    /// The level a bucket must hold to admit `demand`: the demand plus the safety margin
    /// (less when the demand is close to the capacity, so that a request as large as the
    /// bucket still passes when it is full), and always more than zero (a bucket in debt
    /// admits nothing, as the server's output bucket).
    pub(crate) fn required(&self, k: usize, demand: i64) -> i64 {
        let margin = self.margins[k].min((self.caps[k] - demand).max(0));
        (demand + margin).max(1)
    }

    /// The grant buckets of `demand` (each capped at its bucket's capacity), with ids
    /// from `id(kind name)`.
    fn grant(&self, demand: &Amounts, id: impl Fn(&str) -> String) -> Vec<GrantBucket> {
        (0..3)
            .filter(|&k| self.limits[k].is_some())
            .map(|k| {
                let amount = demand[k].min(self.caps[k]);
                GrantBucket {
                    kind: k,
                    key: id(KIND_NAMES[k]),
                    cap: self.caps[k],
                    demand: amount,
                    required: self.required(k, amount),
                }
            })
            .collect()
    }
}

/// The configuration, validated, with the figures the hot path needs precomputed.
#[derive(Debug)]
pub(crate) struct Settings {
    pub(crate) config: RateLimitConfig,
    own: Buckets,
    /// The further scopes ([`RateLimitConfig::scopes`]).
    extra: Vec<(KeyScope, Buckets)>,
    limits: [Option<u64>; 3],
    caps: [i64; 3],
}

impl Settings {
    pub(crate) fn new(config: RateLimitConfig) -> Self {
        let own = Buckets::new(
            [
                config.requests_per_minute,
                config.input_tokens_per_minute,
                config.output_tokens_per_minute,
            ],
            config.safety_margin,
        );
        let extra = config
            .scopes
            .iter()
            .map(|s| (s.scope, Buckets::new(s.limits(), config.safety_margin)))
            .collect();
        Self {
            config,
            limits: own.limits,
            caps: own.caps,
            own,
            extra,
        }
    }

    /// See [`Buckets::required`] (the key's own buckets).
    pub(crate) fn required(&self, k: usize, demand: i64) -> i64 {
        self.own.required(k, demand)
    }
}

/// One waiting request.
#[derive(Debug)]
struct Waiter {
    id: u64,
    demand: Amounts,
    waker: Option<Waker>,
}

/// The answer of [`KeyInner::check`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Check {
    /// Every bucket covers the demand, concurrency allows, the key is not paused.
    Admit,
    /// Not now; a timer at this instant may help (`None`: only a settlement can).
    Wait(Option<Instant>),
}

/// How the last server correction of one bucket limits later refunds.
///
/// When the server reports `remaining`, that figure already reflects what it charged for
/// the requests it has seen. Those requests' refunds (reservation minus use) must not
/// raise the bucket again past what the server said, or the bucket would count them twice.
/// After a correction made with the response of admission number `seq`, requests admitted
/// up to `seq` may together refund at most `allowance`: the distance between the bucket
/// and the server's figure at that moment (zero when the correction lowered the bucket).
#[derive(Debug, Clone, Copy, Default)]
struct Correction {
    seq: u64,
    allowance: i64,
}

/// Totals of what settled requests were finally charged.
#[derive(Debug, Clone, Copy, Default)]
struct Totals {
    requests: u64,
    input: i64,
    output: i64,
}

/// The state of one key.
#[derive(Debug)]
pub(crate) struct KeyInner {
    buckets: [Option<Bucket>; 3],
    in_flight: u32,
    paused_until: Option<Instant>,
    queue: VecDeque<Waiter>,
    /// The sum of the demands in `queue`.
    queued: Amounts,
    next_waiter: u64,
    next_seq: u64,
    corrections: [Correction; 3],
    totals: Totals,
    /// Output reserved by the requests in flight.
    in_flight_output: i64,
    /// Moving average of settled output over reserved output (starts at 1.0).
    output_used: f64,
    /// Removed from the map by the sweeper: whoever finds this looks the key up again.
    evicted: bool,
}

impl KeyInner {
    fn new(settings: &Settings, now: Instant) -> Self {
        Self {
            buckets: settings.limits.map(|l| l.map(|l| Bucket::new(l, now))),
            in_flight: 0,
            paused_until: None,
            queue: VecDeque::new(),
            queued: [0; 3],
            next_waiter: 0,
            next_seq: 0,
            corrections: [Correction::default(); 3],
            totals: Totals::default(),
            in_flight_output: 0,
            output_used: 1.0,
            evicted: false,
        }
    }

    pub(crate) fn refill(&mut self, now: Instant) {
        for b in self.buckets.iter_mut().flatten() {
            b.refill(now);
        }
        if self.paused_until.is_some_and(|p| p <= now) {
            self.paused_until = None;
        }
    }

    /// Whether `demand` can be admitted now (call [`refill`](Self::refill) first).
    pub(crate) fn check(&self, settings: &Settings, demand: &Amounts, now: Instant) -> Check {
        let mut until: Option<Instant> = self.paused_until.filter(|p| *p > now);
        let mut blocked = until.is_some();
        for (k, b) in self.buckets.iter().enumerate() {
            if let Some(b) = b {
                let required = settings.required(k, demand[k]);
                if b.level() < required {
                    blocked = true;
                    let at = now + b.time_until(required);
                    until = Some(until.map_or(at, |u| u.max(at)));
                }
            }
        }
        if let Some(max) = settings.config.max_concurrent_requests
            && self.in_flight >= max
        {
            blocked = true;
        }
        if blocked {
            Check::Wait(until)
        } else {
            Check::Admit
        }
    }

    /// Charges `demand` and counts one more request in flight; returns its admission
    /// number.
    pub(crate) fn admit(&mut self, demand: &Amounts) -> u64 {
        for (b, d) in self.buckets.iter_mut().zip(demand) {
            if let Some(b) = b {
                b.charge(*d);
            }
        }
        self.in_flight += 1;
        self.in_flight_output += demand[OUTPUT];
        self.next_seq += 1;
        self.next_seq
    }

    /// How long a request of `demand` behind `ahead` (the demands queued before it) would
    /// wait, from refill rates and the pause alone. The wait for a concurrency slot is
    /// unknowable (it depends on how long answers take) and is not included. Output
    /// reservations are scaled by the share of them this key's answers have used lately
    /// (`output_used`, 1.0 until answers were settled), so that strict reservations,
    /// which are mostly refunded, do not make every estimate a worst case.
    fn estimate(
        &self,
        settings: &Settings,
        ahead: &Amounts,
        demand: &Amounts,
        now: Instant,
    ) -> Duration {
        let mut wait = self
            .paused_until
            .map_or(Duration::ZERO, |p| p.saturating_duration_since(now));
        for (k, b) in self.buckets.iter().enumerate() {
            if let Some(b) = b {
                let mut required = ahead[k].saturating_add(settings.required(k, demand[k]));
                if k == OUTPUT {
                    // Output reservations are mostly refunded: predict with the share this
                    // key's answers actually used, and count the refunds to come from the
                    // requests in flight.
                    let used = self.output_used;
                    let refunds = self.in_flight_output as f64 * (1.0 - used);
                    required = (required as f64 * used - refunds) as i64;
                }
                wait = wait.max(b.time_until(required));
            }
        }
        wait
    }

    fn push(&mut self, demand: Amounts) -> u64 {
        self.next_waiter += 1;
        let id = self.next_waiter;
        for (q, d) in self.queued.iter_mut().zip(demand) {
            *q += d;
        }
        self.queue.push_back(Waiter {
            id,
            demand,
            waker: None,
        });
        id
    }

    /// The position of waiter `id` (ids grow along the queue).
    fn position(&self, id: u64) -> Option<usize> {
        self.queue.binary_search_by_key(&id, |w| w.id).ok()
    }

    fn remove_at(&mut self, pos: usize) {
        if let Some(w) = self.queue.remove(pos) {
            for (q, d) in self.queued.iter_mut().zip(w.demand) {
                *q -= d;
            }
        }
    }

    fn head_waker(&mut self) -> Option<Waker> {
        self.queue.front_mut().and_then(|w| w.waker.take())
    }

    fn is_idle(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.queue.is_empty()
            && self.in_flight == 0
            && self.paused_until.is_none()
            && self.buckets.iter().flatten().all(Bucket::is_full)
    }

    /// Applies the server's `remaining` figures (see [`Correction`]).
    fn follow(&mut self, seq: u64, headers: &RateLimitHeaders) {
        let remaining = [
            headers.requests.remaining,
            headers.input_tokens.remaining,
            headers.output_tokens.remaining,
        ];
        let slots = self
            .buckets
            .iter_mut()
            .zip(&mut self.corrections)
            .zip(remaining);
        for ((bucket, c), rem) in slots {
            let (Some(b), Some(rem)) = (bucket.as_mut(), rem) else {
                continue;
            };
            let target = tokens(rem);
            let level = b.level();
            if b.clamp(target) {
                c.seq = c.seq.max(seq);
                c.allowance = 0;
            } else if seq >= c.seq {
                // Fresher than the last correction: it supersedes it.
                *c = Correction {
                    seq,
                    allowance: target - level,
                };
            } else {
                // An older figure arriving late: keep the stricter of the two.
                c.allowance = c.allowance.min(target - level);
            }
        }
    }

    fn settle(&mut self, seq: u64, reserved: &Amounts, finals: &Amounts) {
        for k in 0..3 {
            let delta = reserved[k] - finals[k];
            let Some(b) = self.buckets[k].as_mut() else {
                continue;
            };
            if delta > 0 {
                let c = &mut self.corrections[k];
                let refund = if seq <= c.seq {
                    let r = delta.min(c.allowance.max(0));
                    c.allowance -= r;
                    r
                } else {
                    delta
                };
                b.refund(refund);
            } else if delta < 0 {
                b.charge(-delta);
            }
        }
        self.in_flight = self.in_flight.saturating_sub(1);
        self.in_flight_output -= reserved[OUTPUT];
        if reserved[OUTPUT] > 0 {
            let sample = (finals[OUTPUT] as f64 / reserved[OUTPUT] as f64).clamp(0.0, 4.0);
            self.output_used = 0.8 * self.output_used + 0.2 * sample;
        }
        self.totals.requests += u64::from(finals[REQUESTS] > 0);
        self.totals.input += finals[INPUT];
        self.totals.output += finals[OUTPUT];
    }

    fn levels(&self) -> [Option<i64>; 3] {
        [0, 1, 2].map(|k| self.buckets[k].as_ref().map(Bucket::level))
    }
}

/// One key's state: its [`KeyInner`] and, when the scope allows, its metrics label.
#[derive(Debug)]
pub(crate) struct KeyState {
    pub(crate) inner: Mutex<KeyInner>,
    label: Option<metrics::SharedString>,
}

impl KeyState {
    /// Removes a cancelled waiter; the next in line is woken if it was the head.
    pub(crate) fn cancel_waiter(&self, id: u64) {
        let mut inner = lock(&self.inner);
        let Some(pos) = inner.position(id) else {
            return;
        };
        inner.remove_at(pos);
        let next = if pos == 0 { inner.head_waker() } else { None };
        drop(inner);
        if let Some(w) = next {
            w.wake();
        }
    }
}

/// The admission of a call (see [`Limiter::begin`]).
#[derive(Debug)]
pub(crate) enum Begin {
    /// Admitted at once.
    Admitted(Ticket),
    /// Queued; the future resolves on admission, timeout or cancellation.
    Queued(Acquire),
    /// Refused at once.
    Rejected(Error),
}

/// The demand of one call, and what settlement needs to know about it.
#[derive(Debug, Clone)]
pub(crate) struct Demand {
    pub(crate) key: Key,
    /// The keys of the further scopes, in the order of [`Settings::extra`].
    pub(crate) extra: Vec<Key>,
    pub(crate) amounts: Amounts,
    /// Haiku 3 and 3.5 count cache reads toward ITPM (API reference §1.2).
    pub(crate) counts_cache_reads: bool,
}

/// One shard of the key map.
type Shard = Mutex<HashMap<Key, Arc<KeyState>, foldhash::fast::RandomState>>;

/// The state shared by every clone of a layer and its services.
pub(crate) struct Limiter {
    pub(crate) settings: Settings,
    shards: Box<[Shard]>,
    /// Picks a key's shard (the same seeded hash as the maps': SipHash costs several times as
    /// much for a choice among a few shards).
    hasher: foldhash::fast::RandomState,
    calls: AtomicU64,
    family_labels: Mutex<HashSet<Arc<str>>>,
    /// The local buckets of the further scopes.
    scopes: Arc<ScopeBuckets>,
    /// The shared buckets in Redis, if any.
    #[cfg(feature = "redis")]
    pub(crate) shared: Option<crate::redis::RedisLimits>,
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter")
            .field("config", &self.settings.config)
            .field("keys", &self.key_count())
            .finish_non_exhaustive()
    }
}

fn static_family(family: &str) -> Option<Arc<str>> {
    static FAMILIES: std::sync::LazyLock<[Arc<str>; 4]> = std::sync::LazyLock::new(|| {
        [
            Arc::from("opus-4"),
            Arc::from("sonnet-4"),
            Arc::from("haiku-4"),
            Arc::from("unknown"),
        ]
    });
    FAMILIES.iter().find(|f| f.as_ref() == family).cloned()
}

/// Whether a model family counts cache reads toward ITPM: Haiku 3 and 3.5 (the models the
/// rate-limit docs mark with †).
fn counts_cache_reads(family: &str) -> bool {
    family.starts_with("claude-3") && family.contains("haiku")
}

impl Limiter {
    pub(crate) fn new(config: RateLimitConfig) -> Self {
        Self {
            settings: Settings::new(config),
            shards: (0..SHARDS)
                .map(|_| Mutex::new(HashMap::default()))
                .collect(),
            hasher: foldhash::fast::RandomState::default(),
            calls: AtomicU64::new(0),
            family_labels: Mutex::new(HashSet::new()),
            scopes: Arc::new(ScopeBuckets::default()),
            #[cfg(feature = "redis")]
            shared: None,
        }
    }

    /// Whether a locally admitted call must also obtain a grant (further scopes, or
    /// shared buckets).
    pub(crate) fn grants(&self) -> bool {
        #[cfg(feature = "redis")]
        if self.shared.is_some() {
            return true;
        }
        !self.settings.extra.is_empty()
    }

    /// The grant a locally admitted call must also obtain from the further scopes' buckets
    /// and the shared buckets; `None` when there are neither.
    pub(crate) fn grant(&self, ticket: &Ticket) -> Option<Grant> {
        let max_wait = self.settings.config.max_wait;
        let extra_id = |i: usize, kind: &str| {
            let (scope, _) = &self.settings.extra[i];
            format!("{kind}:{}/{}", scope.name(), ticket.extra[i].shared_id())
        };
        let local: Vec<GrantBucket> = self
            .settings
            .extra
            .iter()
            .enumerate()
            .flat_map(|(i, (_, b))| b.grant(&ticket.reserved, |kind| extra_id(i, kind)))
            .collect();
        #[cfg(feature = "redis")]
        if let Some(shared) = &self.shared {
            let id = ticket.key.shared_id();
            let mut buckets = self
                .settings
                .own
                .grant(&ticket.reserved, |kind| shared.key(kind, &id));
            buckets.extend(local.iter().map(|b| GrantBucket {
                key: shared.prefixed(&b.key),
                ..b.clone()
            }));
            let redis = shared
                .clone()
                .grant(shared.pause_key(&id), buckets, max_wait);
            let store = Arc::clone(&self.scopes);
            return Some(Box::pin(async move {
                match redis.await? {
                    Some(hold) => Ok(Some(Hold::Redis(Box::new(hold)))),
                    None if local.is_empty() => Ok(None),
                    // Redis unreachable, fail open: the local buckets of the further scopes.
                    None => crate::grant::local(store, local, max_wait).await,
                }
            }));
        }
        if local.is_empty() {
            return None;
        }
        Some(Box::pin(crate::grant::local(
            Arc::clone(&self.scopes),
            local,
            max_wait,
        )))
    }

    pub(crate) fn config(&self) -> &RateLimitConfig {
        &self.settings.config
    }

    /// The key of a tenant and model under the configured scope.
    pub(crate) fn key(&self, tenant: &Tenant, model: Option<&Arc<str>>) -> Key {
        Self::key_in(self.settings.config.scope, tenant, model)
    }

    /// The key of a tenant and model under `scope`.
    fn key_in(scope: KeyScope, tenant: &Tenant, model: Option<&Arc<str>>) -> Key {
        let family = scope.has_model_family().then(|| {
            let family = model.map_or("unknown", |m| claude_core::model_family(m));
            match model {
                Some(m) if **m == *family => Arc::clone(m),
                _ => static_family(family).unwrap_or_else(|| Arc::from(family)),
            }
        });
        Key {
            tenant: scope.has_tenant().then(|| tenant.clone()),
            family,
        }
    }

    /// What a call to the Messages endpoint reserves, or the 400 for one that can never
    /// fit.
    ///
    /// A valid request reserves one request, its input estimate, and
    /// `ceil(max_tokens × output_reservation_ratio)` output tokens, capped at the output
    /// bucket's capacity (`max_tokens` is a ceiling, not a demand, and the 2026 API no
    /// longer counts it: a request is not refused for a large `max_tokens`). An invalid
    /// request (Anthropic will answer 400) reserves one request and one input token.
    pub(crate) fn demand(&self, tenant: &Tenant, meta: &RequestMeta) -> Result<Demand, Error> {
        let valid = meta.is_valid();
        let input = if valid {
            meta.input_tokens_estimate.max(1)
        } else {
            1
        };
        let mut output = 0i64;
        if valid && let Some(max_tokens) = meta.max_tokens {
            let wanted =
                (f64::from(max_tokens) * self.settings.config.output_reservation_ratio).ceil();
            output = tokens(wanted as u64);
            if self.settings.limits[OUTPUT].is_some() {
                output = output.min(self.settings.caps[OUTPUT]);
            }
        }
        if let Some(limit) = self.settings.limits[INPUT]
            && input > limit
        {
            metrics::rejected("never_fits");
            return Err(Error::new(
                ErrorKind::InvalidRequest,
                format!(
                    "local rate limit: this request needs an estimated {input} input tokens, \
                     more than the {limit} input tokens per minute this gateway allows for its \
                     key, so it can never be sent; shorten the prompt"
                ),
            ));
        }
        for (scope, b) in &self.settings.extra {
            if let Some(limit) = b.limits[INPUT]
                && input > limit
            {
                metrics::rejected("never_fits");
                return Err(Error::new(
                    ErrorKind::InvalidRequest,
                    format!(
                        "local rate limit: this request needs an estimated {input} input \
                         tokens, more than the {limit} input tokens per minute this gateway \
                         allows per {} scope, so it can never be sent; shorten the prompt",
                        scope.name()
                    ),
                ));
            }
        }
        let family = meta.model_family();
        Ok(Demand {
            key: self.key(tenant, meta.model.as_ref()),
            extra: self
                .settings
                .extra
                .iter()
                .map(|(scope, _)| Self::key_in(*scope, tenant, meta.model.as_ref()))
                .collect(),
            amounts: [MILLI, tokens(input), output],
            counts_cache_reads: counts_cache_reads(family),
        })
    }

    fn shard(&self, key: &Key) -> &Shard {
        let i = (self.hasher.hash_one(key) as usize) % SHARDS;
        &self.shards[i]
    }

    fn label(&self, key: &Key) -> Option<metrics::SharedString> {
        if self.settings.config.scope.has_tenant() {
            return None;
        }
        let Some(family) = &key.family else {
            return Some(metrics::SharedString::const_str("all"));
        };
        let mut labels = lock(&self.family_labels);
        if labels.contains(family) || labels.len() < MAX_FAMILY_LABELS {
            labels.insert(Arc::clone(family));
            Some(metrics::SharedString::from(family.to_string()))
        } else {
            Some(metrics::SharedString::const_str("other"))
        }
    }

    fn key_state(&self, key: &Key, now: Instant) -> Arc<KeyState> {
        let mut map = lock(self.shard(key));
        if let Some(state) = map.get(key) {
            return Arc::clone(state);
        }
        let state = Arc::new(KeyState {
            inner: Mutex::new(KeyInner::new(&self.settings, now)),
            label: self.label(key),
        });
        map.insert(key.clone(), Arc::clone(&state));
        state
    }

    /// Admits a call at once, queues it, or refuses it.
    pub(crate) fn begin(self: &Arc<Self>, demand: Demand) -> Begin {
        let now = Instant::now();
        self.housekeeping(now);
        loop {
            let state = self.key_state(&demand.key, now);
            let mut inner = lock(&state.inner);
            if inner.evicted {
                continue;
            }
            inner.refill(now);
            if inner.queue.is_empty()
                && inner.check(&self.settings, &demand.amounts, now) == Check::Admit
            {
                let seq = inner.admit(&demand.amounts);
                let levels = inner.levels();
                drop(inner);
                metrics::waited(0.0);
                emit_levels(&state, levels);
                return Begin::Admitted(Ticket::new(Arc::clone(self), state, &demand, seq));
            }
            let estimate = inner
                .estimate(&self.settings, &inner.queued, &demand.amounts, now)
                .max(Duration::from_millis(1));
            let config = &self.settings.config;
            if inner.queue.len() >= config.max_queue {
                drop(inner);
                metrics::rejected("queue_full");
                return Begin::Rejected(Error::queue_full(estimate));
            }
            if estimate > config.max_wait {
                drop(inner);
                metrics::rejected("queue_timeout");
                return Begin::Rejected(Error::queue_timeout(estimate));
            }
            let id = inner.push(demand.amounts);
            drop(inner);
            metrics::queue_depth(1.0);
            return Begin::Queued(Acquire::new(Arc::clone(self), state, id, demand, now));
        }
    }

    /// Sweeps one shard every [`SWEEP_EVERY`] calls, so the cost is spread and no
    /// background task is needed.
    fn housekeeping(&self, now: Instant) {
        let n = self.calls.fetch_add(1, Ordering::Relaxed);
        if n % SWEEP_EVERY == SWEEP_EVERY - 1 {
            self.sweep((n / SWEEP_EVERY) as usize % SHARDS, now);
        }
    }

    /// Removes the idle keys of one shard: no waiter, nothing in flight, not paused, every
    /// bucket full again. Such a key holds nothing a fresh one would not, so forgetting it
    /// changes no decision. Returns how many were removed.
    fn sweep(&self, shard: usize, now: Instant) -> usize {
        let mut map = lock(&self.shards[shard]);
        let before = map.len();
        map.retain(|_, state| {
            // A key someone holds right now is busy, not idle.
            let Ok(mut inner) = state.inner.try_lock() else {
                return true;
            };
            if inner.is_idle(now) {
                inner.evicted = true;
                false
            } else {
                true
            }
        });
        if map.capacity() > 64 && map.len() < map.capacity() / 4 {
            map.shrink_to_fit();
        }
        before - map.len()
    }

    /// Sweeps every shard; returns how many keys were removed.
    pub(crate) fn evict_idle(&self) -> usize {
        let now = Instant::now();
        (0..SHARDS).map(|s| self.sweep(s, now)).sum()
    }

    /// The number of keys held.
    pub(crate) fn key_count(&self) -> usize {
        self.shards.iter().map(|s| lock(s).len()).sum()
    }

    pub(crate) fn snapshot(&self, key: &Key) -> Option<KeySnapshot> {
        let state = lock(self.shard(key)).get(key).cloned()?;
        let now = Instant::now();
        let mut inner = lock(&state.inner);
        inner.refill(now);
        let bucket = |k: usize| {
            inner.buckets[k].as_ref().map(|b| BucketSnapshot {
                limit: b.limit(),
                available: b.level() as f64 / MILLI as f64,
            })
        };
        Some(KeySnapshot {
            requests: bucket(REQUESTS),
            input_tokens: bucket(INPUT),
            output_tokens: bucket(OUTPUT),
            in_flight: inner.in_flight,
            queued: inner.queue.len(),
            paused_for: inner.paused_until.map(|p| p.saturating_duration_since(now)),
            settled_requests: inner.totals.requests,
            settled_input_tokens: u64::try_from(inner.totals.input / MILLI).unwrap_or(0),
            settled_output_tokens: u64::try_from(inner.totals.output / MILLI).unwrap_or(0),
        })
    }

    /// One poll of waiter `id`: the head is admitted when [`KeyInner::check`] says so;
    /// every waiter gives up at its deadline. Registers `waker` otherwise.
    pub(crate) fn poll_waiter(
        &self,
        state: &KeyState,
        id: u64,
        demand: &Amounts,
        deadline: Instant,
        waker: &Waker,
    ) -> WaiterPoll {
        let now = Instant::now();
        let mut inner = lock(&state.inner);
        let Some(pos) = inner.position(id) else {
            return WaiterPoll::Gone;
        };
        inner.refill(now);
        let until = if pos == 0 {
            match inner.check(&self.settings, demand, now) {
                Check::Admit => {
                    inner.remove_at(0);
                    let seq = inner.admit(demand);
                    // The next in line may fit too: let it try at once.
                    let next = inner.head_waker();
                    let levels = inner.levels();
                    drop(inner);
                    if let Some(w) = next {
                        w.wake();
                    }
                    emit_levels(state, levels);
                    return WaiterPoll::Admitted(seq);
                }
                Check::Wait(until) => until,
            }
        } else {
            None
        };
        if now >= deadline {
            let mut ahead = [0i64; 3];
            for w in inner.queue.range(..pos) {
                for (a, d) in ahead.iter_mut().zip(w.demand) {
                    *a += d;
                }
            }
            let estimate = inner
                .estimate(&self.settings, &ahead, demand, now)
                .max(Duration::from_millis(1));
            inner.remove_at(pos);
            let next = if pos == 0 { inner.head_waker() } else { None };
            drop(inner);
            if let Some(w) = next {
                w.wake();
            }
            return WaiterPoll::TimedOut(estimate);
        }
        let slot = &mut inner.queue[pos].waker;
        if !slot.as_ref().is_some_and(|w| w.will_wake(waker)) {
            *slot = Some(waker.clone());
        }
        WaiterPoll::Wait(until)
    }
}

/// The answer of [`Limiter::poll_waiter`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WaiterPoll {
    /// Admitted with this admission number.
    Admitted(u64),
    /// Still waiting; a timer at this instant may help.
    Wait(Option<Instant>),
    /// The deadline passed; the estimate of the remaining wait.
    TimedOut(Duration),
    /// Not in the queue (cannot happen while the waiter exists).
    Gone,
}

fn emit_levels(state: &KeyState, levels: [Option<i64>; 3]) {
    if let Some(label) = &state.label {
        for (k, level) in levels.iter().enumerate() {
            if let Some(level) = level {
                metrics::available(KIND_NAMES[k], label, *level as f64 / MILLI as f64);
            }
        }
    }
}

/// How the upstream answered, as far as settlement cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// No response head: a transport error, or the call was cancelled after it was sent.
    NoResponse,
    /// 1xx–3xx: settle from the usage in the body.
    Answered,
    /// 4xx (429 included): the server refused the request before running it.
    Refused,
    /// 5xx (529 included): the server may have counted the prompt, produced no answer.
    Failed,
}

/// An admitted call's reservation: settled once, from the usage report when the body ends,
/// or conservatively when dropped without one.
///
/// | What happened | requests | input tokens | output tokens |
/// |---|---|---|---|
/// | body ended with usage (JSON, or a stream that saw `message_start`) | 1 | `itpm_tokens()` (+ cache reads on Haiku 3/3.5) | `output_tokens` as seen (a lower bound for an incomplete stream) |
/// | stream that ended, failed or was dropped before any usage | 1 | reservation | 0 (nothing was seen) |
/// | JSON body that failed or was dropped before its usage | 1 | reservation | reservation (the server produced the whole answer before its head) |
/// | 4xx, 429 included (not admitted upstream) | 1 | 0 | 0 |
/// | 5xx, 529 included | 1 | reservation | 0 |
/// | no response (transport error, cancelled after sending) | 1 | reservation | reservation |
///
/// The request itself stays counted in every case: whether the server counts refused
/// requests toward RPM is not documented, and the safe side is to assume it does.
#[derive(Debug)]
pub(crate) struct Ticket {
    limiter: Arc<Limiter>,
    state: Arc<KeyState>,
    reserved: Amounts,
    seq: u64,
    counts_cache_reads: bool,
    outcome: Outcome,
    settled: bool,
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    key: Key,
    extra: Vec<Key>,
    /// The grant of the further scopes' or shared buckets, settled there too.
    hold: Option<Box<Hold>>,
}

impl Ticket {
    pub(crate) fn new(
        limiter: Arc<Limiter>,
        state: Arc<KeyState>,
        demand: &Demand,
        seq: u64,
    ) -> Self {
        Self {
            limiter,
            state,
            reserved: demand.amounts,
            seq,
            counts_cache_reads: demand.counts_cache_reads,
            outcome: Outcome::NoResponse,
            settled: false,
            key: demand.key.clone(),
            extra: demand.extra.clone(),
            hold: None,
        }
    }

    /// The grant this call must also obtain, if any (see [`Limiter::grant`]).
    pub(crate) fn grant(&self) -> Option<Grant> {
        self.limiter.grant(self)
    }

    /// Attaches the grant obtained.
    pub(crate) fn attach(&mut self, hold: Option<Hold>) {
        self.hold = hold.map(Box::new);
    }

    /// Gives everything back: the call was refused before it was sent.
    pub(crate) fn abandon(mut self) {
        self.finish(&[0; 3]);
    }

    /// Records the response head: its status class for settlement and, when following the
    /// server, its `anthropic-ratelimit-*` figures and a 429's pause.
    pub(crate) fn observe_head(&mut self, status: StatusCode, headers: &HeaderMap) {
        self.outcome = if status.is_client_error() {
            Outcome::Refused
        } else if status.is_server_error() {
            Outcome::Failed
        } else {
            Outcome::Answered
        };
        if !self.limiter.settings.config.follow_server {
            return;
        }
        let is_429 = status == StatusCode::TOO_MANY_REQUESTS;
        // Most relays and every success without limits carry none: skip the parse.
        if !is_429
            && !headers
                .keys()
                .any(|k| k.as_str().starts_with("anthropic-ratelimit-"))
        {
            return;
        }
        let rl = RateLimitHeaders::from_headers(headers);
        let pause = is_429
            .then(|| pause_after_429(headers, &rl))
            .flatten()
            .map(|d| d.min(self.limiter.settings.config.max_pause));
        if !rl.is_present() && pause.is_none() {
            return;
        }
        let now = Instant::now();
        let mut inner = lock(&self.state.inner);
        inner.refill(now);
        inner.follow(self.seq, &rl);
        if let Some(pause) = pause.filter(|p| !p.is_zero()) {
            #[cfg(feature = "redis")]
            if let Some(shared) = &self.limiter.shared {
                shared.pause(&self.key.shared_id(), pause);
            }
            let until = now + pause;
            inner.paused_until = Some(inner.paused_until.map_or(until, |p| p.max(until)));
        }
        let levels = inner.levels();
        drop(inner);
        emit_levels(&self.state, levels);
    }

    fn finals(&self, report: Option<&UsageReport>) -> Amounts {
        let r = self.reserved;
        match (self.outcome, report) {
            (Outcome::NoResponse, _) | (Outcome::Answered, None) => r,
            (Outcome::Refused, _) => [r[REQUESTS], 0, 0],
            (Outcome::Failed, _) => [r[REQUESTS], r[INPUT], 0],
            (Outcome::Answered, Some(report)) if report.saw_usage => {
                let u = &report.usage;
                let mut input = u.itpm_tokens();
                if self.counts_cache_reads {
                    input += u.cache_read_input_tokens;
                }
                [r[REQUESTS], tokens(input), tokens(u.output_tokens)]
            }
            (Outcome::Answered, Some(report)) => match report.format {
                BodyFormat::Sse => [r[REQUESTS], r[INPUT], 0],
                BodyFormat::Json => r,
            },
        }
    }

    /// Settles the reservation to the usage of the finished body.
    pub(crate) fn settle(mut self, report: &UsageReport) {
        let finals = self.finals(Some(report));
        self.finish(&finals);
    }

    fn finish(&mut self, finals: &Amounts) {
        if self.settled {
            return;
        }
        self.settled = true;
        if let Some(hold) = self.hold.take() {
            hold.settle(finals);
        }
        let mut inner = lock(&self.state.inner);
        inner.refill(Instant::now());
        inner.settle(self.seq, &self.reserved, finals);
        let waker = inner.head_waker();
        let levels = inner.levels();
        drop(inner);
        if let Some(w) = waker {
            w.wake();
        }
        emit_levels(&self.state, levels);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.settled {
            let finals = self.finals(None);
            self.finish(&finals);
        }
    }
}

/// How long to pause a key after a 429: its `retry-after` (or `retry-after-ms`); without
/// one, until the earliest `-reset` of a limit the server reports as exhausted, measured on
/// the server's clock (its `date` header) so client clock skew does not matter. `None` when
/// the answer says neither.
fn pause_after_429(headers: &HeaderMap, rl: &RateLimitHeaders) -> Option<Duration> {
    let now = SystemTime::now();
    if let Some(d) = retry_after(headers, now) {
        return Some(d);
    }
    let server_now = headers
        .get(http::header::DATE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| httpdate::parse_http_date(v).ok())
        .unwrap_or(now);
    [rl.requests, rl.input_tokens, rl.output_tokens]
        .iter()
        .filter(|info| info.remaining == Some(0))
        .filter_map(|info| info.reset)
        .map(|reset| reset.duration_since(server_now).unwrap_or(Duration::ZERO))
        .min()
}

/// One bucket of a [`KeySnapshot`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BucketSnapshot {
    /// The per-minute limit (the bucket's capacity).
    pub limit: u64,
    /// What the bucket holds now; negative when answers used more than they reserved.
    pub available: f64,
}

/// The state of one key, for operators and tests
/// ([`RateLimitLayer::snapshot`](crate::RateLimitLayer::snapshot)).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct KeySnapshot {
    /// The request bucket, when RPM is limited.
    pub requests: Option<BucketSnapshot>,
    /// The input-token bucket, when ITPM is limited.
    pub input_tokens: Option<BucketSnapshot>,
    /// The output-token bucket, when OTPM is limited.
    pub output_tokens: Option<BucketSnapshot>,
    /// Requests admitted whose response has not ended.
    pub in_flight: u32,
    /// Requests waiting.
    pub queued: usize,
    /// How long the key stays paused after a server 429.
    pub paused_for: Option<Duration>,
    /// Requests settled since the key was created.
    pub settled_requests: u64,
    /// Input tokens the settled requests were finally charged.
    pub settled_input_tokens: u64,
    /// Output tokens the settled requests were finally charged.
    pub settled_output_tokens: u64,
}
