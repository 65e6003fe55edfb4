//! Budgets: daily and monthly (UTC) spend caps, global and per tenant, with alerts and
//! reservations.
//!
//! # Windows
//!
//! A daily window is a UTC calendar day, a monthly window a UTC calendar month, both read
//! from the tracker's clock (injectable, so tests cross midnight and month ends). A
//! request's cost is booked in the window in which its usage becomes known (when its body
//! ends), which is also the day it appears under in the report.
//!
//! # Reservations and the hard cap
//!
//! When a cap is enforced ([`BudgetConfig::enforce`], the default), every request reserves
//! its **worst-case cost** in each window that applies (global and its tenant's, daily and
//! monthly) before it is sent:
//!
//! ```text
//! worst = input_tokens_estimate × highest input-side price (the 1-hour cache write, 2× input)
//!       + max_tokens × output price
//! ```
//!
//! at long-context prices when the request sends the long-context beta. A request is
//! refused with [`ErrorKind::BudgetExceeded`](claude_core::ErrorKind::BudgetExceeded)
//! before the inner service is called when, in any window, `spent + reserved + worst >
//! limit` (or the window is already spent). When its usage is known, the reservation is
//! released and the real cost is added to `spent`; a request that fails or is cancelled
//! before a response releases its reservation and spends nothing.
//!
//! Because the check and the reservation happen under one lock, concurrent requests
//! cannot jointly pass a cap through the check. **The overshoot bound:** a window's spend
//! can exceed its limit only by `Σ max(0, real cost − reservation)` over the requests it
//! admitted, which is zero unless a request's input is more than twice the estimate at
//! the 1-hour write price (the estimate is `ceil(bytes / 4)` of the prompt JSON: text at
//! fewer than ~2 bytes per token, such as CJK, can be counted low; server tools add input
//! the client never sent, e.g. web search results) or it ran web searches ($0.01 each,
//! not reserved). A request whose worst case does not fit what is left is refused even if
//! its real cost would have fit: lower its `max_tokens`.
//!
//! Requests to an unknown model cannot be priced: they reserve nothing and spend nothing
//! (their tokens are still counted) unless [`BudgetConfig::reject_unknown_models`] refuses
//! them while caps are enforced.
//!
//! # Alerts
//!
//! Each threshold ([`BudgetConfig::alert_thresholds`], default 50%, 80%, 100% of the limit)
//! fires once per window when the real spend reaches it, and each window fires one
//! [`AlertKind::Refused`] at its first refusal (with reservations, a hard cap usually
//! refuses before 100% is reached). The check and the "fired" mark share the lock of the
//! spend update, so concurrent requests fire each alert exactly once. Alerts go to an
//! [`AlertHandler`] (default [`LogAlerts`], a `tracing` warning), called after the lock is
//! released, on the task that settled the request: keep it short.
//!
//! Budgets live in the process: a restart starts the windows at zero, and several gateway
//! replicas each hold their own, unless they share them through Redis (feature `redis`,
//! the `redis` module: the same admission, reservations and alerts, atomic across instances).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::time::SystemTime;

use claude_core::Tenant;
use serde::{Deserialize, Serialize};

use crate::money::Usd;
use crate::utc::Day;

/// Spend caps for one scope: per UTC day and per UTC month. `None` is no cap.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Budget {
    /// Cap per UTC day. Default: none.
    pub daily: Option<Usd>,
    /// Cap per UTC calendar month. Default: none.
    pub monthly: Option<Usd>,
}

impl Budget {
    /// No caps.
    pub const fn new() -> Self {
        Self {
            daily: None,
            monthly: None,
        }
    }

    /// Sets the daily cap.
    #[must_use]
    pub const fn daily(mut self, limit: Usd) -> Self {
        self.daily = Some(limit);
        self
    }

    /// Sets the monthly cap.
    #[must_use]
    pub const fn monthly(mut self, limit: Usd) -> Self {
        self.monthly = Some(limit);
        self
    }

    fn is_some(&self) -> bool {
        self.daily.is_some() || self.monthly.is_some()
    }

    /// `self`'s caps, falling back to `base`'s field by field.
    fn or(self, base: Self) -> Self {
        Self {
            daily: self.daily.or(base.daily),
            monthly: self.monthly.or(base.monthly),
        }
    }
}

/// Budgets of a tracker: global caps, per-tenant caps, alert thresholds, enforcement.
///
/// ```
/// use claude_cost::{Budget, BudgetConfig, Usd};
///
/// let cfg: BudgetConfig = toml::from_str(r#"
///     global = { monthly = "5000" }
///     per_tenant = { daily = "50.00" }
///     tenants.research = { daily = "200" }
///     alert_thresholds = [75, 100]
/// "#)?;
/// assert_eq!(cfg.global, Budget::new().monthly(Usd::from_dollars(5_000)));
/// assert!(cfg.enforce);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BudgetConfig {
    /// Caps on the spend of all tenants together. Default: none.
    pub global: Budget,
    /// Caps applied to each tenant (including the default tenant). Default: none.
    pub per_tenant: Budget,
    /// Caps for named tenants; a cap left out falls back to `per_tenant`. Default: empty.
    pub tenants: BTreeMap<String, Budget>,
    /// Alert thresholds in percent of each limit. Default: `[50, 80, 100]`. Zeros are
    /// ignored, duplicates merged, at most 32 kept.
    pub alert_thresholds: Vec<u32>,
    /// Refuse requests that would go over a cap (the hard cap). `false` only alerts.
    /// Default: `true`.
    pub enforce: bool,
    /// While enforcing, refuse requests to models without a price (their cost could not
    /// be counted against any cap). Default: `false`.
    pub reject_unknown_models: bool,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        Self {
            global: Budget::new(),
            per_tenant: Budget::new(),
            tenants: BTreeMap::new(),
            alert_thresholds: vec![50, 80, 100],
            enforce: true,
            reject_unknown_models: false,
        }
    }
}

impl BudgetConfig {
    /// No budgets (the default).
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the global caps.
    #[must_use]
    pub fn global(mut self, budget: Budget) -> Self {
        self.global = budget;
        self
    }

    /// Sets the caps of every tenant.
    #[must_use]
    pub fn per_tenant(mut self, budget: Budget) -> Self {
        self.per_tenant = budget;
        self
    }

    /// Sets the caps of one tenant.
    #[must_use]
    pub fn tenant(mut self, tenant: impl Into<String>, budget: Budget) -> Self {
        self.tenants.insert(tenant.into(), budget);
        self
    }

    /// Sets the alert thresholds (percent of each limit).
    #[must_use]
    pub fn alert_thresholds(mut self, percents: impl IntoIterator<Item = u32>) -> Self {
        self.alert_thresholds = percents.into_iter().collect();
        self
    }

    /// Whether caps refuse requests (default) or only alert.
    #[must_use]
    pub fn enforce(mut self, enforce: bool) -> Self {
        self.enforce = enforce;
        self
    }

    /// Whether to refuse requests to unknown models while enforcing.
    #[must_use]
    pub fn reject_unknown_models(mut self, reject: bool) -> Self {
        self.reject_unknown_models = reject;
        self
    }

    /// Whether any cap is set.
    pub fn has_caps(&self) -> bool {
        self.global.is_some()
            || self.per_tenant.is_some()
            || self.tenants.values().any(Budget::is_some)
    }

    fn tenant_budget(&self, tenant: &Tenant) -> Budget {
        match self.tenants.get(tenant.as_str()) {
            Some(b) => b.or(self.per_tenant),
            None => self.per_tenant,
        }
    }
}

/// What a budget applies to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BudgetScope {
    /// All tenants together.
    Global,
    /// One tenant.
    Tenant(Tenant),
}

impl fmt::Display for BudgetScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Global => f.write_str("global"),
            Self::Tenant(t) => write!(f, "tenant:{t}"),
        }
    }
}

/// The length of a budget window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BudgetWindow {
    /// A UTC calendar day.
    Daily,
    /// A UTC calendar month.
    Monthly,
}

impl BudgetWindow {
    /// `daily` or `monthly`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Daily => "daily",
            Self::Monthly => "monthly",
        }
    }
}

impl fmt::Display for BudgetWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// Why an alert fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum AlertKind {
    /// The spend reached this percentage of the limit.
    Threshold {
        /// The threshold, in percent.
        percent: u32,
    },
    /// The window refused its first request.
    Refused,
}

/// A budget alert: fired once per window per threshold, and once per window at the first
/// refusal.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BudgetAlert {
    /// Whose budget.
    pub scope: BudgetScope,
    /// Which window.
    pub window: BudgetWindow,
    /// The window: `2026-03-01` (daily) or `2026-03` (monthly).
    pub period: String,
    /// Why it fired.
    pub kind: AlertKind,
    /// The limit of the window.
    pub limit: Usd,
    /// The spend in the window when it fired.
    pub spent: Usd,
}

impl fmt::Display for BudgetAlert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            AlertKind::Threshold { percent } => write!(
                f,
                "{} {} budget for {} reached {percent}%: spent {} of {}",
                self.scope, self.window, self.period, self.spent, self.limit
            ),
            AlertKind::Refused => write!(
                f,
                "{} {} budget for {} is refusing requests: spent {} of {}",
                self.scope, self.window, self.period, self.spent, self.limit
            ),
        }
    }
}

/// Receives budget alerts.
pub trait AlertHandler: Send + Sync + 'static {
    /// Called once per alert, outside any lock, on the task that settled the request.
    fn on_alert(&self, alert: &BudgetAlert);
}

impl<F> AlertHandler for F
where
    F: Fn(&BudgetAlert) + Send + Sync + 'static,
{
    fn on_alert(&self, alert: &BudgetAlert) {
        self(alert);
    }
}

/// The default [`AlertHandler`]: a `tracing` warning.
#[derive(Debug, Clone, Copy, Default)]
pub struct LogAlerts;

impl AlertHandler for LogAlerts {
    fn on_alert(&self, alert: &BudgetAlert) {
        tracing::warn!(
            scope = %alert.scope,
            window = alert.window.as_str(),
            period = %alert.period,
            spent = %alert.spent,
            limit = %alert.limit,
            "claude-cost budget alert: {alert}"
        );
    }
}

/// The state of one budget window, as the report shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BudgetStatus {
    /// `global` or `tenant:<id>`.
    pub scope: String,
    /// `daily` or `monthly`.
    pub window: BudgetWindow,
    /// The current window (`2026-03-01` or `2026-03`).
    pub period: String,
    /// The limit.
    pub limit: Usd,
    /// Spent in the current window.
    pub spent: Usd,
    /// Held by requests in flight.
    pub reserved: Usd,
}

// ===== state =====

#[derive(Debug)]
struct Meter {
    scope: BudgetScope,
    window: BudgetWindow,
    limit: u64,
    period: i64,
    spent: u64,
    reserved: u64,
    fired: u32,
    refused_alerted: bool,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Now {
    day: Day,
}

impl Now {
    pub(crate) fn at(t: SystemTime) -> Self {
        Self { day: Day::of(t) }
    }

    fn period(self, w: BudgetWindow) -> i64 {
        match w {
            BudgetWindow::Daily => self.day.0,
            BudgetWindow::Monthly => self.day.month().0,
        }
    }

    /// When the shared state of the window `w` of `self` may be dropped, in Unix
    /// milliseconds: a day after a daily window ends; 33 days after today for a monthly one
    /// (past the end of any month).
    #[cfg(feature = "redis")]
    pub(crate) fn expire_at_ms(self, w: BudgetWindow) -> i64 {
        let days = match w {
            BudgetWindow::Daily => 2,
            BudgetWindow::Monthly => 33,
        };
        self.day.0.saturating_add(days).saturating_mul(86_400_000)
    }

    pub(crate) fn label(self, w: BudgetWindow) -> String {
        match w {
            BudgetWindow::Daily => self.day.to_string(),
            BudgetWindow::Monthly => self.day.month().to_string(),
        }
    }
}

impl Meter {
    fn new(scope: BudgetScope, window: BudgetWindow, limit: Usd) -> Self {
        Self {
            scope,
            window,
            limit: limit.nanos(),
            period: i64::MIN,
            spent: 0,
            reserved: 0,
            fired: 0,
            refused_alerted: false,
        }
    }

    /// Moves to the window of `now`. The spend and the alerts start over; reservations
    /// carry over, since their cost will be booked in the new window.
    fn roll(&mut self, now: Now) {
        let p = now.period(self.window);
        if p != self.period {
            self.period = p;
            self.spent = 0;
            self.fired = 0;
            self.refused_alerted = false;
        }
    }

    pub(crate) fn alert(&self, now: Now, kind: AlertKind) -> BudgetAlert {
        BudgetAlert {
            scope: self.scope.clone(),
            window: self.window,
            period: now.label(self.window),
            kind,
            limit: Usd::from_nanos(self.limit),
            spent: Usd::from_nanos(self.spent),
        }
    }
}

type Pair = [Option<Meter>; 2];

fn pair(scope: &BudgetScope, b: Budget) -> Pair {
    [
        b.daily
            .map(|l| Meter::new(scope.clone(), BudgetWindow::Daily, l)),
        b.monthly
            .map(|l| Meter::new(scope.clone(), BudgetWindow::Monthly, l)),
    ]
}

/// Every budget window of a tracker. Lives under the tracker's lock.
#[derive(Debug)]
pub(crate) struct Budgets {
    config: BudgetConfig,
    thresholds: Vec<u32>,
    global: Pair,
    tenants: HashMap<Tenant, Pair, foldhash::fast::RandomState>,
}

/// A refusal: the error message and the alert it may fire.
pub(crate) struct Refusal {
    pub(crate) message: String,
    pub(crate) alert: Option<BudgetAlert>,
    pub(crate) scope: BudgetScope,
    pub(crate) window: BudgetWindow,
}

impl Refusal {
    /// A refusal by the `window` budget of `scope` in `period` (its label), where `used`
    /// (spent + reserved) of `limit` is taken and the request may cost `worst`.
    pub(crate) fn new(
        scope: BudgetScope,
        window: BudgetWindow,
        period: &str,
        limit: u64,
        used: u64,
        worst: u64,
        alert: Option<BudgetAlert>,
    ) -> Self {
        let message = match &scope {
            BudgetScope::Global => format!(
                "budget exceeded: the {window} budget of this service for {period} cannot \
                 cover this request"
            ),
            BudgetScope::Tenant(t) => format!(
                "budget exceeded: the {window} budget of tenant `{t}` for {period} ({}) \
                 cannot cover this request (it may cost up to {}; {} is left)",
                Usd::from_nanos(limit),
                Usd::from_nanos(worst),
                Usd::from_nanos(limit.saturating_sub(used)),
            ),
        };
        Self {
            message,
            alert,
            scope,
            window,
        }
    }
}

impl Budgets {
    pub(crate) fn new(config: BudgetConfig) -> Self {
        let mut thresholds: Vec<u32> = config
            .alert_thresholds
            .iter()
            .copied()
            .filter(|&p| p > 0)
            .collect();
        thresholds.sort_unstable();
        thresholds.dedup();
        thresholds.truncate(32);
        let global = pair(&BudgetScope::Global, config.global);
        Self {
            config,
            thresholds,
            global,
            tenants: HashMap::default(),
        }
    }

    pub(crate) fn config(&self) -> &BudgetConfig {
        &self.config
    }

    /// The windows that apply to `tenant`: the global ones and its own (created on first
    /// use, only for tenants that have caps, so tenants without caps cost no memory).
    fn meters(&mut self, tenant: &Tenant) -> impl Iterator<Item = &mut Meter> {
        let budget = self.config.tenant_budget(tenant);
        let own = if budget.is_some() {
            Some(
                self.tenants
                    .entry(tenant.clone())
                    .or_insert_with(|| pair(&BudgetScope::Tenant(tenant.clone()), budget)),
            )
        } else {
            None
        };
        self.global
            .iter_mut()
            .chain(own.into_iter().flat_map(|p| p.iter_mut()))
            .flatten()
    }

    /// Checks every window of `tenant` and reserves `worst` in all of them, or refuses.
    pub(crate) fn admit(&mut self, tenant: &Tenant, worst: u64, now: Now) -> Result<u64, Refusal> {
        let enforce = self.config.enforce;
        let mut refusal = None;
        for m in self.meters(tenant) {
            m.roll(now);
            if enforce && refusal.is_none() {
                let need = u128::from(m.spent) + u128::from(m.reserved) + u128::from(worst);
                if m.spent >= m.limit || need > u128::from(m.limit) {
                    let alert = (!m.refused_alerted).then(|| {
                        m.refused_alerted = true;
                        m.alert(now, AlertKind::Refused)
                    });
                    refusal = Some(Refusal::new(
                        m.scope.clone(),
                        m.window,
                        &now.label(m.window),
                        m.limit,
                        m.spent.saturating_add(m.reserved),
                        worst,
                        alert,
                    ));
                }
            }
        }
        if let Some(r) = refusal {
            return Err(r);
        }
        if !enforce {
            return Ok(0);
        }
        for m in self.meters(tenant) {
            m.reserved = m.reserved.saturating_add(worst);
        }
        Ok(worst)
    }

    /// The windows that apply to `tenant` (scope, window, limit in nano-dollars), in the
    /// order [`admit`](Self::admit) checks them.
    #[cfg(feature = "redis")]
    pub(crate) fn windows(&mut self, tenant: &Tenant) -> Vec<(BudgetScope, BudgetWindow, u64)> {
        self.meters(tenant)
            .map(|m| (m.scope.clone(), m.window, m.limit))
            .collect()
    }

    /// The alert thresholds in force (percent, sorted, deduplicated).
    #[cfg(feature = "redis")]
    pub(crate) fn thresholds(&self) -> &[u32] {
        &self.thresholds
    }

    /// Gives back a reservation that will not be spent.
    pub(crate) fn release(&mut self, tenant: &Tenant, reserved: u64) {
        if reserved == 0 {
            return;
        }
        for m in self.meters(tenant) {
            m.reserved = m.reserved.saturating_sub(reserved);
        }
    }

    /// Replaces a reservation by the real spend; returns the alerts that fire.
    pub(crate) fn settle(
        &mut self,
        tenant: &Tenant,
        reserved: u64,
        spent: u64,
        now: Now,
        alerts: &mut Vec<BudgetAlert>,
    ) {
        let thresholds = std::mem::take(&mut self.thresholds);
        for m in self.meters(tenant) {
            m.roll(now);
            m.reserved = m.reserved.saturating_sub(reserved);
            m.spent = m.spent.saturating_add(spent);
            if m.spent == 0 {
                continue;
            }
            for (i, &pct) in thresholds.iter().enumerate() {
                let bit = 1u32 << i;
                let reached = u128::from(m.spent) * 100 >= u128::from(pct) * u128::from(m.limit);
                if m.fired & bit == 0 && reached {
                    m.fired |= bit;
                    alerts.push(m.alert(now, AlertKind::Threshold { percent: pct }));
                }
            }
        }
        self.thresholds = thresholds;
    }

    /// The windows as of `now`, for the report.
    pub(crate) fn status(&self, now: Now) -> Vec<BudgetStatus> {
        let mut out = Vec::new();
        let tenants = {
            let mut t: Vec<_> = self.tenants.iter().collect();
            t.sort_by(|a, b| a.0.cmp(b.0));
            t
        };
        let all = self
            .global
            .iter()
            .chain(tenants.into_iter().flat_map(|(_, p)| p.iter()))
            .flatten();
        for m in all {
            let current = m.period == now.period(m.window);
            out.push(BudgetStatus {
                scope: m.scope.to_string(),
                window: m.window,
                period: now.label(m.window),
                limit: Usd::from_nanos(m.limit),
                spent: Usd::from_nanos(if current { m.spent } else { 0 }),
                reserved: Usd::from_nanos(m.reserved),
            });
        }
        out
    }
}

#[cfg(test)]
#[allow(clippy::many_single_char_names)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    const DAY: u64 = 86_400;
    // 2026-01-31T12:00:00Z.
    const T0: u64 = 1_769_860_800;

    fn now(secs: u64) -> Now {
        Now::at(UNIX_EPOCH + Duration::from_secs(secs))
    }

    fn d(n: u64) -> Usd {
        Usd::from_dollars(n)
    }

    #[test]
    fn config_defaults_and_serde() {
        let c = BudgetConfig::default();
        assert_eq!(c.alert_thresholds, [50, 80, 100]);
        assert!(c.enforce && !c.has_caps());
        let c: BudgetConfig = serde_json::from_str(
            r#"{"tenants":{"a":{"daily":"1.5"}},"per_tenant":{"monthly":100}}"#,
        )
        .unwrap();
        assert_eq!(
            c.tenant_budget(&Tenant::new("a")),
            Budget::new()
                .daily(Usd::from_nanos(1_500_000_000))
                .monthly(d(100))
        );
        assert_eq!(
            c.tenant_budget(&Tenant::new("b")),
            Budget::new().monthly(d(100))
        );
        assert!(serde_json::from_str::<BudgetConfig>(r#"{"dayly":{}}"#).is_err());
        assert!(serde_json::from_str::<BudgetConfig>(r#"{"global":{"daily":1.5}}"#).is_err());
    }

    #[test]
    fn reserve_refuse_release() {
        let mut b = Budgets::new(BudgetConfig::new().global(Budget::new().daily(d(10))));
        let t = Tenant::default();
        let n = now(T0);
        assert_eq!(b.admit(&t, d(4).nanos(), n).ok(), Some(d(4).nanos()));
        assert_eq!(b.admit(&t, d(4).nanos(), n).ok(), Some(d(4).nanos()));
        // 8 reserved + 4 > 10.
        let r = b.admit(&t, d(4).nanos(), n).err().unwrap();
        assert!(
            r.message
                .contains("daily budget of this service for 2026-01-31"),
            "{}",
            r.message
        );
        assert!(matches!(
            r.alert,
            Some(BudgetAlert {
                kind: AlertKind::Refused,
                ..
            })
        ));
        // The refusal alert fires once per window.
        assert!(b.admit(&t, d(4).nanos(), n).err().unwrap().alert.is_none());
        // 2 fits exactly.
        assert!(b.admit(&t, d(2).nanos(), n).is_ok());
        b.release(&t, d(2).nanos());
        let mut alerts = Vec::new();
        b.settle(&t, d(4).nanos(), d(1).nanos(), n, &mut alerts);
        let s = &b.status(n)[0];
        assert_eq!((s.spent, s.reserved), (d(1), d(4)));
        assert!(alerts.is_empty(), "10% is below every threshold");
    }

    #[test]
    fn thresholds_fire_once_per_window_and_reset_at_midnight() {
        let mut b = Budgets::new(
            BudgetConfig::new()
                .per_tenant(Budget::new().daily(d(10)))
                .alert_thresholds([100, 50, 80, 0, 50]),
        );
        let t = Tenant::new("a");
        let mut alerts = Vec::new();
        for _ in 0..12 {
            b.settle(&t, 0, d(1).nanos(), now(T0), &mut alerts);
        }
        let pcts: Vec<_> = alerts
            .iter()
            .map(|a| match a.kind {
                AlertKind::Threshold { percent } => (percent, a.spent),
                AlertKind::Refused => (0, a.spent),
            })
            .collect();
        assert_eq!(pcts, [(50, d(5)), (80, d(8)), (100, d(10))]);
        assert_eq!(alerts[0].scope, BudgetScope::Tenant(t.clone()));
        assert_eq!(alerts[0].period, "2026-01-31");
        // The next UTC day starts over.
        alerts.clear();
        let midnight = T0 + DAY / 2;
        b.settle(&t, 0, d(6).nanos(), now(midnight), &mut alerts);
        assert_eq!(alerts.len(), 1);
        assert_eq!(alerts[0].period, "2026-02-01");
        assert_eq!(alerts[0].spent, d(6));
    }

    #[test]
    fn monthly_window_rolls_at_month_end_and_reservations_carry() {
        let mut b = Budgets::new(BudgetConfig::new().global(Budget::new().monthly(d(100))));
        let t = Tenant::default();
        let jan = now(T0);
        let mut alerts = Vec::new();
        b.settle(&t, 0, d(95).nanos(), jan, &mut alerts);
        assert!(b.admit(&t, d(6).nanos(), jan).is_err(), "95 + 6 > 100");
        assert_eq!(b.admit(&t, d(5).nanos(), jan).ok(), Some(d(5).nanos()));
        // Twelve hours later it is February: spend starts over, the reservation stays.
        let feb = now(T0 + DAY / 2);
        let s = &b.status(feb)[0];
        assert_eq!(
            (s.period.as_str(), s.spent, s.reserved),
            ("2026-02", Usd::ZERO, d(5))
        );
        assert_eq!(b.admit(&t, d(95).nanos(), feb).ok(), Some(d(95).nanos()));
        assert!(
            b.admit(&t, d(1).nanos(), feb).is_err(),
            "5 carried + 95 = 100"
        );
        b.settle(&t, d(5).nanos(), d(3).nanos(), feb, &mut alerts);
        let s = &b.status(feb)[0];
        assert_eq!((s.spent, s.reserved), (d(3), d(95)));
    }

    #[test]
    fn not_enforcing_only_alerts() {
        let mut b = Budgets::new(
            BudgetConfig::new()
                .global(Budget::new().daily(d(1)))
                .enforce(false),
        );
        let t = Tenant::default();
        let mut alerts = Vec::new();
        b.settle(&t, 0, d(5).nanos(), now(T0), &mut alerts);
        assert_eq!(alerts.len(), 3);
        assert_eq!(b.admit(&t, d(100).nanos(), now(T0)).ok(), Some(0));
    }

    #[test]
    fn tenant_message_names_the_figures() {
        let mut b = Budgets::new(BudgetConfig::new().tenant("acme", Budget::new().daily(d(1))));
        let r = b
            .admit(&Tenant::new("acme"), d(2).nanos(), now(T0))
            .err()
            .unwrap();
        assert_eq!(
            r.message,
            "budget exceeded: the daily budget of tenant `acme` for 2026-01-31 ($1.00) cannot \
             cover this request (it may cost up to $2.00; $1.00 is left)"
        );
        // Other tenants have no cap, and no state.
        assert!(
            b.admit(&Tenant::new("other"), d(2).nanos(), now(T0))
                .is_ok()
        );
        assert_eq!(b.tenants.len(), 1);
    }
}
