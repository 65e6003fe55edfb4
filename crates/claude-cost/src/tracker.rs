//! [`CostTracker`]: the shared ledger of every recorded request, its budgets and its
//! report.

use std::collections::HashSet;
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::SystemTime;

use claude_core::{BodyEnd, CacheHit, Error, Tenant, Usage, UsageReport};
use serde::Deserialize;

use crate::budget::{AlertHandler, BudgetConfig, Budgets, LogAlerts, Now};
use crate::layer::CostLayer;
use crate::metrics;
use crate::money::Usd;
use crate::prices::{CostBreakdown, ModelPrice, PriceTable, PriceTableError};
use crate::report::{CostReport, Ledger, Totals};
use crate::tags::CostTags;
use crate::utc::Day;

/// The clock budgets and reports read (UTC days and months are computed from it).
pub type Clock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

type RecordHook = Arc<dyn Fn(&CostRecord) + Send + Sync>;

/// The longest model name used as a label or report key; longer names are cut.
const MAX_MODEL_LABEL: usize = 64;
/// How many distinct unknown models get their own warning.
const MAX_UNKNOWN_WARNINGS: usize = 256;

/// What one request cost: the record the tracker keeps a sum of, and hands to
/// [`CostTrackerBuilder::on_record`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CostRecord {
    /// When the usage became known (the tracker's clock).
    pub at: SystemTime,
    /// Who sent the request.
    pub tenant: Tenant,
    /// The model: the price table's canonical id when priced, else the name the response
    /// (or the request) gave, or `unknown`.
    pub model: Arc<str>,
    /// The usage (a lower bound when `complete` is false).
    pub usage: Usage,
    /// The cost; `None` when the model has no price.
    pub cost: Option<CostBreakdown>,
    /// Served by the response cache: nothing was spent, and `cost` is the saving.
    pub cache_hit: bool,
    /// The body ended normally with the API's end marker; otherwise the usage is what was
    /// seen before the stream was cut, failed or dropped.
    pub complete: bool,
    /// The request's tags.
    pub tags: Option<CostTags>,
}

impl CostRecord {
    /// The money spent (zero for cache hits and unknown models).
    pub fn spent(&self) -> Usd {
        match (&self.cost, self.cache_hit) {
            (Some(c), false) => c.total,
            _ => Usd::ZERO,
        }
    }

    /// The money saved by a cache hit (zero otherwise).
    pub fn saved(&self) -> Usd {
        match (&self.cost, self.cache_hit) {
            (Some(c), true) => c.total,
            _ => Usd::ZERO,
        }
    }
}

/// The configuration of a tracker, as it appears in a config file.
///
/// ```
/// let cfg: claude_cost::CostConfig = toml::from_str(r#"
///     [budgets]
///     global = { daily = "100" }
/// "#)?;
/// let tracker = claude_cost::CostTracker::from_config(&cfg)?;
/// assert!(tracker.budget_config().has_caps());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CostConfig {
    /// A price file (the format of the bundled `data/prices.toml`) whose models override
    /// or add to the bundled ones. Default: none (the bundled table).
    pub prices_file: Option<PathBuf>,
    /// Budgets. Default: none.
    pub budgets: BudgetConfig,
    /// Not read from TOML: see [`CostTrackerBuilder::reuse_metric_handles`]. Default false.
    #[serde(skip)]
    pub reuse_metric_handles: bool,
}

/// The cost ledger shared by every [`Cost`](crate::Cost) service (cheap to clone): totals
/// by model, tenant, UTC day and tag, budgets and their alerts.
///
/// ```
/// use claude_core::{Tenant, Usage};
/// use claude_cost::{CostTracker, Usd};
///
/// let tracker = CostTracker::new();
/// let usage = Usage { input_tokens: 1_000, output_tokens: 100, ..Usage::default() };
/// let rec = tracker.record_usage(&Tenant::new("a"), "claude-haiku-4-5", &usage, None, None);
/// // 1,000 × $1/MTok + 100 × $5/MTok = $0.0015
/// assert_eq!(rec.spent(), Usd::from_nanos(1_500_000));
/// assert_eq!(tracker.report().by_tenant["a"].cost, Usd::from_nanos(1_500_000));
/// ```
#[derive(Clone)]
pub struct CostTracker {
    inner: Arc<Inner>,
}

struct Inner {
    prices: PriceTable,
    clock: Clock,
    alerts: Arc<dyn AlertHandler>,
    on_record: Option<RecordHook>,
    has_budgets: bool,
    enforcing: bool,
    reject_unknown: bool,
    state: Mutex<State>,
    warned: Mutex<HashSet<Arc<str>>>,
    /// Counter handles per (model, tenant), when reused.
    metric_handles: Option<crate::metrics::MetricHandles>,
    /// Budgets shared through Redis, if any.
    #[cfg(feature = "redis")]
    shared: Option<crate::redis::RedisBudgets>,
}

struct State {
    ledger: Ledger,
    budgets: Budgets,
}

impl fmt::Debug for CostTracker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CostTracker")
            .field("models", &self.inner.prices.models().count())
            .field("budgets", &self.inner.has_budgets)
            .finish_non_exhaustive()
    }
}

impl Default for CostTracker {
    fn default() -> Self {
        Self::new()
    }
}

/// Builds a [`CostTracker`].
#[must_use]
pub struct CostTrackerBuilder {
    prices: PriceTable,
    budgets: BudgetConfig,
    alerts: Arc<dyn AlertHandler>,
    clock: Clock,
    on_record: Option<RecordHook>,
    reuse_metric_handles: bool,
    #[cfg(feature = "redis")]
    shared: Option<crate::redis::RedisBudgets>,
}

impl fmt::Debug for CostTrackerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CostTrackerBuilder")
            .field("budgets", &self.budgets)
            .finish_non_exhaustive()
    }
}

impl CostTrackerBuilder {
    /// The price table. Default: [`PriceTable::bundled`].
    pub fn prices(mut self, prices: PriceTable) -> Self {
        self.prices = prices;
        self
    }

    /// The budgets. Default: none.
    pub fn budgets(mut self, budgets: BudgetConfig) -> Self {
        self.budgets = budgets;
        self
    }

    /// Where budget alerts go. Default: [`LogAlerts`] (a `tracing` warning).
    pub fn alert_handler(mut self, handler: impl AlertHandler) -> Self {
        self.alerts = Arc::new(handler);
        self
    }

    /// The clock of budget windows and daily totals. Default: [`SystemTime::now`].
    pub fn clock(mut self, clock: impl Fn() -> SystemTime + Send + Sync + 'static) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// Called with every record after it is counted (for logs or an external store), on
    /// the task that settled the request: keep it short.
    pub fn on_record(mut self, hook: impl Fn(&CostRecord) + Send + Sync + 'static) -> Self {
        self.on_record = Some(Arc::new(hook));
        self
    }

    /// Resolves the counters of each (model, tenant) pair once and keeps the handles, instead
    /// of building, hashing and looking up ten labelled keys per request (about 13,000
    /// instructions per request with the Prometheus recorder). Default false.
    ///
    /// Turn it on only where one `metrics` recorder serves the whole process, installed
    /// globally, as claude-gateway does. The handles are re-resolved when the recorder in use
    /// changes address (none installed yet, then a global one), but two local recorders that
    /// live at the same address one after the other (a test's `with_local_recorder` in a
    /// loop) cannot be told apart, and the second would get no counts.
    pub fn reuse_metric_handles(mut self, on: bool) -> Self {
        self.reuse_metric_handles = on;
        self
    }

    /// Shares the budgets with every tracker on the same Redis (feature `redis`; see the
    /// [`redis`](crate::redis) module). Without budgets it changes nothing.
    #[cfg(feature = "redis")]
    pub fn redis(mut self, budgets: crate::redis::RedisBudgets) -> Self {
        self.shared = Some(budgets);
        self
    }

    /// The tracker.
    pub fn build(self) -> CostTracker {
        let has_budgets = self.budgets.has_caps();
        let enforcing = has_budgets && self.budgets.enforce;
        let reject_unknown = enforcing && self.budgets.reject_unknown_models;
        CostTracker {
            inner: Arc::new(Inner {
                prices: self.prices,
                clock: self.clock,
                alerts: self.alerts,
                on_record: self.on_record,
                has_budgets,
                enforcing,
                reject_unknown,
                state: Mutex::new(State {
                    ledger: Ledger::default(),
                    budgets: Budgets::new(self.budgets),
                }),
                warned: Mutex::new(HashSet::new()),
                metric_handles: self
                    .reuse_metric_handles
                    .then(crate::metrics::MetricHandles::default),
                #[cfg(feature = "redis")]
                shared: self.shared.filter(|_| has_budgets),
            }),
        }
    }
}

/// The outcome of [`CostTracker::admit`]: decided at once, or after a round trip to the
/// shared budgets.
#[allow(clippy::large_enum_variant)] // short-lived, and boxing would cost every request
pub(crate) enum Admission {
    Ready(Result<Reservation, Error>),
    #[cfg(feature = "redis")]
    Shared(std::pin::Pin<Box<dyn Future<Output = Result<Reservation, Error>> + Send>>),
}

/// What the layer knows about a request before it is sent.
#[derive(Debug, Clone)]
pub(crate) struct RequestInfo {
    pub(crate) tenant: Tenant,
    pub(crate) model: Option<Arc<str>>,
    pub(crate) beta: Option<Arc<str>>,
    pub(crate) tags: Option<CostTags>,
}

/// Money held by a request in flight; given back when dropped unless settled.
pub(crate) struct Reservation {
    inner: Option<Arc<Inner>>,
    tenant: Tenant,
    amount: u64,
    /// Admitted by the shared budgets: settled (or released) in Redis.
    #[cfg(feature = "redis")]
    hold: Option<crate::redis::Hold>,
}

impl Reservation {
    fn none(tenant: Tenant) -> Self {
        Self {
            inner: None,
            tenant,
            amount: 0,
            #[cfg(feature = "redis")]
            hold: None,
        }
    }

    /// The amount, which the caller now settles.
    fn take(mut self) -> u64 {
        self.inner = None;
        self.amount
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.take() {
            inner.lock().budgets.release(&self.tenant, self.amount);
        }
        #[cfg(feature = "redis")]
        if let Some(hold) = self.hold.take()
            && self.amount > 0
            && !hold.keys.is_empty()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            rt.spawn(async move { hold.redis.release(&hold.keys, &hold.id).await });
        }
    }
}

impl fmt::Debug for Reservation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reservation")
            .field("amount", &Usd::from_nanos(self.amount))
            .finish_non_exhaustive()
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn label(name: &str) -> Arc<str> {
    if name.len() <= MAX_MODEL_LABEL {
        return Arc::from(name);
    }
    let mut end = MAX_MODEL_LABEL;
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    Arc::from(&name[..end])
}

impl CostTracker {
    /// A tracker with the bundled prices and no budgets.
    pub fn new() -> Self {
        Self::builder().build()
    }

    /// A builder.
    pub fn builder() -> CostTrackerBuilder {
        CostTrackerBuilder {
            prices: PriceTable::bundled(),
            budgets: BudgetConfig::default(),
            alerts: Arc::new(LogAlerts),
            clock: Arc::new(SystemTime::now),
            on_record: None,
            reuse_metric_handles: false,
            #[cfg(feature = "redis")]
            shared: None,
        }
    }

    /// A tracker from its configuration (reads the price file, if any).
    pub fn from_config(config: &CostConfig) -> Result<Self, PriceTableError> {
        Ok(Self::builder_from_config(config)?.build())
    }

    /// A builder holding the configuration (reads the price file, if any), to refine
    /// before [`build`](CostTrackerBuilder::build).
    pub fn builder_from_config(config: &CostConfig) -> Result<CostTrackerBuilder, PriceTableError> {
        let mut prices = PriceTable::bundled();
        if let Some(path) = &config.prices_file {
            prices = prices.with_overrides(&PriceTable::from_file(path)?);
        }
        Ok(Self::builder()
            .prices(prices)
            .budgets(config.budgets.clone())
            .reuse_metric_handles(config.reuse_metric_handles))
    }

    /// A [`CostLayer`] recording into this tracker.
    pub fn layer(&self) -> CostLayer {
        CostLayer::new(self.clone())
    }

    /// The price table.
    pub fn prices(&self) -> &PriceTable {
        &self.inner.prices
    }

    /// The budgets.
    pub fn budget_config(&self) -> BudgetConfig {
        self.inner.lock().budgets.config().clone()
    }

    /// The totals over every request recorded.
    pub fn total(&self) -> Totals {
        self.inner.lock().ledger.total().clone()
    }

    /// Everything recorded so far: totals, by model, tenant, UTC day and tag, and the
    /// current budget windows.
    pub fn report(&self) -> CostReport {
        let now = (self.inner.clock)();
        let st = self.inner.lock();
        st.ledger.report(
            now,
            self.inner.prices.version(),
            st.budgets.status(Now::at(now)),
        )
    }

    /// Records the usage of a request the layer did not see (for example a result of the
    /// Message Batches API) and returns its record. `anthropic_beta` is the request's
    /// `anthropic-beta` header, which decides long-context pricing.
    pub fn record_usage(
        &self,
        tenant: &Tenant,
        model: &str,
        usage: &Usage,
        anthropic_beta: Option<&str>,
        tags: Option<&CostTags>,
    ) -> CostRecord {
        let (model, price) = self.resolve(Some(model), None);
        let rec = CostRecord {
            at: (self.inner.clock)(),
            tenant: tenant.clone(),
            model,
            usage: *usage,
            cost: price.map(|p| p.cost(usage, anthropic_beta)),
            cache_hit: false,
            complete: true,
            tags: tags.cloned(),
        };
        self.commit(&rec, 0);
        rec
    }

    /// The price of the model a response named, else the one the request named. The
    /// response wins: it is the model that ran.
    fn resolve(
        &self,
        response_model: Option<&str>,
        request_model: Option<&str>,
    ) -> (Arc<str>, Option<Arc<ModelPrice>>) {
        let prices = &self.inner.prices;
        let name = response_model.or(request_model);
        match name.and_then(|n| prices.get(n)) {
            Some(p) => (p.shared_id(), Some(p.clone())),
            None => (name.map_or_else(|| Arc::from("unknown"), label), None),
        }
    }

    /// [`admission`](Self::admission) of the local budgets, decided at once.
    #[cfg(test)]
    pub(crate) fn admit(
        &self,
        info: &RequestInfo,
        input_estimate: u64,
        max_tokens: Option<u32>,
    ) -> Result<Reservation, Error> {
        match self.admission(info, input_estimate, max_tokens) {
            Admission::Ready(r) => r,
            #[cfg(feature = "redis")]
            Admission::Shared(_) => panic!("shared admission in a local test"),
        }
    }

    /// Checks the budgets and reserves the worst case of a request about to be sent: at
    /// once from the local budgets, or through Redis when the budgets are shared.
    pub(crate) fn admission(
        &self,
        info: &RequestInfo,
        input_estimate: u64,
        max_tokens: Option<u32>,
    ) -> Admission {
        let inner = &self.inner;
        #[cfg(feature = "redis")]
        if let Some(shared) = &inner.shared
            && !inner.enforcing
        {
            // Nothing to check, but the spend is settled in the shared windows.
            let mut r = Reservation::none(info.tenant.clone());
            r.hold = Some(crate::redis::Hold {
                redis: shared.clone(),
                keys: Vec::new(),
                id: String::new(),
            });
            return Admission::Ready(Ok(r));
        }
        if !inner.enforcing {
            return Admission::Ready(Ok(Reservation::none(info.tenant.clone())));
        }
        let price = info.model.as_deref().and_then(|m| inner.prices.get(m));
        let worst = match price {
            Some(p) => p
                .worst_case(
                    input_estimate,
                    max_tokens.map_or(0, u64::from),
                    info.beta.as_deref(),
                )
                .nanos(),
            None if inner.reject_unknown => {
                let model = info.model.as_deref().map_or("(none)", |m| m);
                return Admission::Ready(Err(Error::budget_exceeded(format!(
                    "budget exceeded: model `{}` has no price, and this service refuses \
                     requests it cannot count against its budgets",
                    label(model)
                ))));
            }
            None => 0,
        };
        let now = Now::at((inner.clock)());
        #[cfg(feature = "redis")]
        if let Some(shared) = &inner.shared {
            let tracker = self.clone();
            let shared = shared.clone();
            let tenant = info.tenant.clone();
            return Admission::Shared(Box::pin(async move {
                tracker.admit_shared(&shared, tenant, worst, now).await
            }));
        }
        Admission::Ready(self.admit_local(&info.tenant, worst, now))
    }

    /// Admission by the local budgets.
    fn admit_local(&self, tenant: &Tenant, worst: u64, now: Now) -> Result<Reservation, Error> {
        let inner = &self.inner;
        let admitted = inner.lock().budgets.admit(tenant, worst, now);
        match admitted {
            Ok(amount) => Ok(Reservation {
                inner: (amount > 0).then(|| inner.clone()),
                tenant: tenant.clone(),
                amount,
                #[cfg(feature = "redis")]
                hold: None,
            }),
            Err(refusal) => Err(self.refused(refusal)),
        }
    }

    fn refused(&self, refusal: crate::budget::Refusal) -> Error {
        metrics::rejection(&refusal.scope, refusal.window);
        if let Some(a) = refusal.alert {
            metrics::alert(&a);
            self.inner.alerts.on_alert(&a);
        }
        Error::budget_exceeded(refusal.message)
    }

    /// The windows of `tenant` as the scripts see them, at `now`.
    #[cfg(feature = "redis")]
    fn shared_windows(
        &self,
        shared: &crate::redis::RedisBudgets,
        tenant: &Tenant,
        now: Now,
    ) -> Vec<(
        crate::budget::BudgetScope,
        crate::budget::BudgetWindow,
        crate::redis::WindowKey,
    )> {
        let windows = self.inner.lock().budgets.windows(tenant);
        windows
            .into_iter()
            .map(|(scope, window, limit)| {
                let key = crate::redis::WindowKey {
                    key: shared.key(&scope, window, &now.label(window)),
                    limit,
                    expire_at_ms: now.expire_at_ms(window),
                };
                (scope, window, key)
            })
            .collect()
    }

    /// Admission by the shared budgets, falling back as the policy says.
    #[cfg(feature = "redis")]
    async fn admit_shared(
        &self,
        shared: &crate::redis::RedisBudgets,
        tenant: Tenant,
        worst: u64,
        now: Now,
    ) -> Result<Reservation, Error> {
        use crate::budget::{AlertKind, BudgetAlert, Refusal};
        use crate::redis::Hold;
        use claude_core::redis::Call;

        let windows = self.shared_windows(shared, &tenant, now);
        if windows.is_empty() {
            // No cap applies to this tenant: nothing to ask Redis.
            return Ok(Reservation {
                inner: None,
                tenant,
                amount: 0,
                hold: Some(Hold {
                    redis: shared.clone(),
                    keys: Vec::new(),
                    id: String::new(),
                }),
            });
        }
        let keys: Vec<_> = windows.iter().map(|w| w.2.clone()).collect();
        let id = shared.next_id();
        match shared.admit(&keys, worst, &id).await {
            Call::Done(Ok(())) => Ok(Reservation {
                inner: None,
                tenant,
                amount: worst,
                hold: Some(Hold {
                    redis: shared.clone(),
                    keys: keys.into_iter().map(|k| k.key).collect(),
                    id,
                }),
            }),
            Call::Done(Err(r)) => {
                let Some((scope, window, key)) = windows.into_iter().nth(r.index) else {
                    return Err(Error::budget_exceeded("budget exceeded"));
                };
                let period = now.label(window);
                let alert = r.first.then(|| BudgetAlert {
                    scope: scope.clone(),
                    window,
                    period: period.clone(),
                    kind: AlertKind::Refused,
                    limit: Usd::from_nanos(key.limit),
                    spent: Usd::from_nanos(r.spent),
                });
                let used = r.spent.saturating_add(r.reserved);
                Err(self.refused(Refusal::new(
                    scope, window, &period, key.limit, used, worst, alert,
                )))
            }
            Call::NotRun => self.admit_fallback(shared, &tenant, worst, now),
            Call::Unknown => {
                // The call timed out or broke here, but may have run there (or still run):
                // take the reservation back (by id, so this is harmless if it did not run;
                // if this fails too, the reservation's lease ends it).
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    let shared = shared.clone();
                    let held: Vec<String> = keys.into_iter().map(|k| k.key).collect();
                    rt.spawn(async move { shared.release(&held, &id).await });
                }
                self.admit_fallback(shared, &tenant, worst, now)
            }
        }
    }

    /// Admission when the shared budgets could not answer, as the policy says.
    #[cfg(feature = "redis")]
    fn admit_fallback(
        &self,
        shared: &crate::redis::RedisBudgets,
        tenant: &Tenant,
        worst: u64,
        now: Now,
    ) -> Result<Reservation, Error> {
        use crate::redis::FailurePolicy;
        match shared.failure_policy() {
            FailurePolicy::FailOpen => self.admit_local(tenant, worst, now),
            FailurePolicy::FailClosed => Err(Error::budget_exceeded(
                "budget exceeded: the shared budget store is unreachable, and this \
                 service refuses requests it cannot count (fail closed)",
            )),
        }
    }

    /// Records the final usage of a response body.
    pub(crate) fn settle(&self, info: RequestInfo, reservation: Reservation, report: &UsageReport) {
        let (model, price) = self.resolve(report.model.as_deref(), info.model.as_deref());
        let rec = CostRecord {
            at: (self.inner.clock)(),
            tenant: info.tenant,
            model,
            usage: report.usage,
            cost: price.map(|p| p.cost(&report.usage, info.beta.as_deref())),
            cache_hit: false,
            complete: report.end == BodyEnd::Ended && report.completed,
            tags: info.tags,
        };
        self.settle_with(&rec, reservation);
    }

    /// Records an answer of the response cache: nothing spent, its cost saved.
    pub(crate) fn settle_hit(&self, info: RequestInfo, reservation: Reservation, hit: &CacheHit) {
        let (model, price) = self.resolve(hit.model.as_deref(), info.model.as_deref());
        let rec = CostRecord {
            at: (self.inner.clock)(),
            tenant: info.tenant,
            model,
            usage: hit.usage,
            cost: price.map(|p| p.cost(&hit.usage, info.beta.as_deref())),
            cache_hit: true,
            complete: true,
            tags: info.tags,
        };
        self.settle_with(&rec, reservation);
    }

    /// Commits `rec` against `reservation`: locally, or in the shared windows.
    fn settle_with(&self, rec: &CostRecord, reservation: Reservation) {
        #[cfg(feature = "redis")]
        let mut reservation = reservation;
        #[cfg(feature = "redis")]
        if let Some(hold) = reservation.hold.take() {
            let reserved = reservation.take();
            self.commit_shared(rec, reserved, hold);
            return;
        }
        self.commit(rec, reservation.take());
    }

    /// Records `rec` in the ledger and the local windows (as a shadow, for the fail-open
    /// fallback), then settles it in Redis on a task of its own. The alerts Redis says this
    /// settle reached first fire; when Redis fails, the local alerts fire instead.
    #[cfg(feature = "redis")]
    fn commit_shared(&self, rec: &CostRecord, reserved: u64, hold: crate::redis::Hold) {
        use crate::budget::{AlertKind, BudgetAlert};

        let inner = &self.inner;
        let now = Now::at(rec.at);
        let spent = rec.spent().nanos();
        let mut local_alerts = Vec::new();
        let thresholds = {
            let mut st = inner.lock();
            st.ledger.add(rec, Day::of(rec.at));
            st.budgets
                .settle(&rec.tenant, 0, spent, now, &mut local_alerts);
            st.budgets.thresholds().to_vec()
        };
        self.after_commit(rec);
        let windows = self.shared_windows(&hold.redis, &rec.tenant, now);
        if windows.is_empty() && (reserved == 0 || hold.keys.is_empty()) {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            self.fire(&local_alerts);
            return;
        };
        let tracker = self.clone();
        rt.spawn(async move {
            let keys: Vec<_> = windows.iter().map(|w| w.2.clone()).collect();
            let fired = hold
                .redis
                .settle(&keys, &hold.keys, &hold.id, spent, &thresholds)
                .await;
            let Some(fired) = fired else {
                tracker.fire(&local_alerts);
                return;
            };
            let alerts: Vec<_> = fired
                .into_iter()
                .filter_map(|(i, percent, total)| {
                    let (scope, window, key) = windows.get(i)?;
                    Some(BudgetAlert {
                        scope: scope.clone(),
                        window: *window,
                        period: now.label(*window),
                        kind: AlertKind::Threshold { percent },
                        limit: Usd::from_nanos(key.limit),
                        spent: Usd::from_nanos(total),
                    })
                })
                .collect();
            tracker.fire(&alerts);
        });
    }

    fn fire(&self, alerts: &[crate::budget::BudgetAlert]) {
        for a in alerts {
            metrics::alert(a);
            self.inner.alerts.on_alert(a);
        }
    }

    /// What follows every commit: metrics, the unknown-model warning, the record hook.
    fn after_commit(&self, rec: &CostRecord) {
        match &self.inner.metric_handles {
            Some(handles) => handles.record(rec),
            None => metrics::record(rec),
        }
        if rec.cost.is_none() {
            self.warn_unknown(rec);
        }
        if let Some(hook) = &self.inner.on_record {
            hook(rec);
        }
    }

    fn commit(&self, rec: &CostRecord, reserved: u64) {
        let inner = &self.inner;
        let mut alerts = Vec::new();
        {
            let mut st = inner.lock();
            st.ledger.add(rec, Day::of(rec.at));
            if inner.has_budgets {
                st.budgets.settle(
                    &rec.tenant,
                    reserved,
                    rec.spent().nanos(),
                    Now::at(rec.at),
                    &mut alerts,
                );
            }
        }
        self.after_commit(rec);
        self.fire(&alerts);
    }

    fn warn_unknown(&self, rec: &CostRecord) {
        let first = {
            let mut w = self
                .inner
                .warned
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            w.len() < MAX_UNKNOWN_WARNINGS && w.insert(rec.model.clone())
        };
        if first {
            tracing::warn!(
                model = %rec.model,
                tenant = %rec.tenant,
                "claude-cost: model `{}` has no price: its tokens are counted, its cost is unknown \
                 (add it with a price file)",
                rec.model
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::{Budget, BudgetAlert};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{Duration, UNIX_EPOCH};

    fn info(tenant: &str, model: &str) -> RequestInfo {
        RequestInfo {
            tenant: Tenant::new(tenant),
            model: Some(Arc::from(model)),
            beta: None,
            tags: None,
        }
    }

    fn report(model: Option<&str>, input: u64, output: u64) -> UsageReport {
        UsageReport {
            usage: Usage {
                input_tokens: input,
                output_tokens: output,
                ..Usage::default()
            },
            saw_usage: true,
            model: model.map(std::sync::Arc::from),
            completed: true,
            end: BodyEnd::Ended,
            ..UsageReport::default()
        }
    }

    #[test]
    fn response_model_wins_and_unknown_is_never_priced() {
        let t = CostTracker::new();
        // The request named an alias, the response the dated id: one model.
        let r = t
            .admit(&info("a", "claude-haiku-4-5"), 10, Some(10))
            .unwrap();
        t.settle(
            info("a", "claude-haiku-4-5"),
            r,
            &report(Some("claude-haiku-4-5-20251001"), 10, 10),
        );
        // A response naming an unknown model is not priced as the requested one.
        let r = t
            .admit(&info("a", "claude-haiku-4-5"), 10, Some(10))
            .unwrap();
        t.settle(
            info("a", "claude-haiku-4-5"),
            r,
            &report(Some("claude-haiku-9"), 7, 3),
        );
        // A stream cut before `message_start` is priced by the requested model.
        let r = t
            .admit(&info("a", "claude-opus-4-5"), 10, Some(10))
            .unwrap();
        t.settle(info("a", "claude-opus-4-5"), r, &report(None, 0, 0));
        let rep = t.report();
        assert_eq!(rep.by_model["claude-haiku-4-5-20251001"].requests, 1);
        assert_eq!(
            rep.by_model["claude-haiku-4-5-20251001"].cost,
            Usd::from_nanos(10 * 1_000 + 10 * 5_000)
        );
        let unknown = &rep.by_model["claude-haiku-9"];
        assert_eq!((unknown.input_tokens, unknown.output_tokens), (7, 3));
        assert_eq!((unknown.cost, unknown.unpriced_requests), (Usd::ZERO, 1));
        assert_eq!(rep.by_model["claude-opus-4-5-20251101"].requests, 1);
        assert_eq!(rep.total.unpriced_requests, 1);
        assert_eq!(rep.total.requests, 3);
    }

    /// An unknown model (here a future dated id of a known family) gets no price at all:
    /// its tokens are counted, its cost is `None`, not zero and not Sonnet 4.5's.
    #[test]
    fn golden_unknown_model() {
        let t = CostTracker::new();
        let u = Usage {
            input_tokens: 1_000,
            output_tokens: 500,
            cache_read_input_tokens: 2_000,
            ..Usage::default()
        };
        let rec = t.record_usage(
            &Tenant::default(),
            "claude-sonnet-4-5-20991231",
            &u,
            None,
            None,
        );
        assert_eq!(rec.cost, None);
        assert_eq!(&*rec.model, "claude-sonnet-4-5-20991231");
        assert_eq!(rec.spent(), Usd::ZERO);
        let tot = t.total();
        assert_eq!(
            (tot.input_tokens, tot.output_tokens, tot.cache_read_tokens),
            (1_000, 500, 2_000)
        );
        assert_eq!((tot.cost, tot.unpriced_requests), (Usd::ZERO, 1));
        assert!(!tot.is_fully_priced());
    }

    #[test]
    fn config_reads_a_price_file() {
        let path =
            std::env::temp_dir().join(format!("claude-cost-prices-{}.toml", std::process::id()));
        std::fs::write(
            &path,
            "[[model]]\nid = \"claude-sonnet-4-5-20991231\"\ninput = \"2\"\noutput = \"10\"\n\
             cache_write_5m = \"2.5\"\ncache_write_1h = \"4\"\ncache_read = \"0.2\"\n",
        )
        .unwrap();
        let cfg: CostConfig =
            toml::from_str(&format!("prices_file = {:?}", path.display().to_string())).unwrap();
        let t = CostTracker::from_config(&cfg).unwrap();
        let _ = std::fs::remove_file(&path);
        let u = Usage {
            input_tokens: 1_000,
            ..Usage::default()
        };
        let rec = t.record_usage(
            &Tenant::default(),
            "claude-sonnet-4-5-20991231",
            &u,
            None,
            None,
        );
        assert_eq!(rec.spent(), Usd::from_nanos(2_000_000));
        assert!(
            t.prices().get("claude-opus-4-5").is_some(),
            "bundled models stay"
        );
        let missing = CostConfig {
            prices_file: Some(PathBuf::from("/nonexistent/prices.toml")),
            ..CostConfig::default()
        };
        let e = CostTracker::from_config(&missing).unwrap_err();
        assert!(matches!(e, PriceTableError::Io { .. }), "{e}");
        assert!(
            toml::from_str::<CostConfig>("price_file = \"x\"").is_err(),
            "typos are refused"
        );
    }

    #[test]
    fn long_model_names_are_cut() {
        let t = CostTracker::new();
        let long = "é".repeat(100);
        let rec = t.record_usage(&Tenant::default(), &long, &Usage::default(), None, None);
        assert!(rec.model.len() <= MAX_MODEL_LABEL);
        assert!(long.starts_with(&*rec.model));
    }

    #[test]
    fn hits_save_and_do_not_spend() {
        let t = CostTracker::new();
        let hit = CacheHit {
            usage: Usage {
                input_tokens: 1_000_000,
                ..Usage::default()
            },
            model: None,
            age: Duration::from_secs(3),
        };
        let r = t
            .admit(&info("a", "claude-sonnet-4-5"), 1, Some(1))
            .unwrap();
        t.settle_hit(info("a", "claude-sonnet-4-5"), r, &hit);
        let tot = t.total();
        assert_eq!((tot.requests, tot.cache_hits), (1, 1));
        assert_eq!((tot.cost, tot.savings), (Usd::ZERO, Usd::from_dollars(3)));
        assert_eq!(tot.input_tokens, 0, "a hit bills no tokens");
    }

    #[test]
    fn reservations_are_released_when_dropped_and_settled_once() {
        let t = CostTracker::builder()
            .budgets(BudgetConfig::new().global(Budget::new().daily(Usd::from_dollars(1))))
            .build();
        // Sonnet 4.5 worst case: 10,000 × $6 + 10,000 × $15 = $0.21.
        let i = info("a", "claude-sonnet-4-5");
        let held: Vec<_> = (0..4)
            .map(|_| t.admit(&i, 10_000, Some(10_000)).unwrap())
            .collect();
        assert!(t.admit(&i, 10_000, Some(10_000)).is_err(), "5 × $0.21 > $1");
        assert_eq!(t.report().budgets[0].reserved, Usd::from_nanos(840_000_000));
        drop(held);
        assert_eq!(t.report().budgets[0].reserved, Usd::ZERO);
        let r = t.admit(&i, 10_000, Some(10_000)).unwrap();
        t.settle(i.clone(), r, &report(None, 1_000, 1_000));
        let b = &t.report().budgets[0];
        assert_eq!(
            (b.spent, b.reserved),
            (Usd::from_nanos(18_000_000), Usd::ZERO)
        );
    }

    #[test]
    fn refusal_is_a_budget_exceeded_error() {
        let t = CostTracker::builder()
            .budgets(
                BudgetConfig::new()
                    .per_tenant(Budget::new().daily(Usd::ZERO))
                    .reject_unknown_models(true),
            )
            .build();
        let e = t
            .admit(&info("a", "claude-haiku-4-5"), 1, Some(1))
            .unwrap_err();
        assert_eq!(e.kind(), claude_core::ErrorKind::BudgetExceeded);
        let e = t.admit(&info("a", "gpt-5"), 1, Some(1)).unwrap_err();
        assert!(e.to_string().contains("`gpt-5` has no price"), "{e}");
    }

    #[test]
    fn clock_decides_the_day_and_alerts_reach_the_handler() {
        let secs = Arc::new(AtomicU64::new(1_769_860_800)); // 2026-01-31T12:00:00Z
        let s = secs.clone();
        let seen: Arc<Mutex<Vec<BudgetAlert>>> = Arc::default();
        let sink = seen.clone();
        let t = CostTracker::builder()
            .clock(move || UNIX_EPOCH + Duration::from_secs(s.load(Ordering::SeqCst)))
            .budgets(BudgetConfig::new().global(Budget::new().daily(Usd::from_dollars(1))))
            .alert_handler(move |a: &BudgetAlert| sink.lock().unwrap().push(a.clone()))
            .build();
        let u = Usage {
            input_tokens: 600_000,
            ..Usage::default()
        };
        t.record_usage(&Tenant::default(), "claude-haiku-4-5", &u, None, None); // $0.60
        secs.fetch_add(43_200, Ordering::SeqCst); // 2026-02-01T00:00:00Z
        t.record_usage(&Tenant::default(), "claude-haiku-4-5", &u, None, None);
        let rep = t.report();
        assert_eq!(
            rep.by_day.keys().collect::<Vec<_>>(),
            ["2026-01-31", "2026-02-01"]
        );
        let alerts = seen.lock().unwrap();
        let periods: Vec<_> = alerts.iter().map(|a| a.period.as_str()).collect();
        assert_eq!(periods, ["2026-01-31", "2026-02-01"], "50% once per day");
    }
}
