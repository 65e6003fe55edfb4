//! The ledger behind [`CostTracker::report`](crate::CostTracker::report), and the report:
//! JSON through serde, a table for people through `Display`.

use std::collections::{BTreeMap, HashMap};

use foldhash::fast::RandomState;
use std::fmt::{self, Write as _};
use std::sync::Arc;
use std::time::SystemTime;

use claude_core::Tenant;
use serde::{Deserialize, Serialize};

use crate::budget::BudgetStatus;
use crate::money::Usd;
use crate::tracker::CostRecord;
use crate::utc::Day;

/// Sums over a set of recorded requests.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Totals {
    /// Requests recorded (cache hits included).
    pub requests: u64,
    /// Uncached input tokens billed.
    pub input_tokens: u64,
    /// Output tokens billed.
    pub output_tokens: u64,
    /// 5-minute cache writes billed.
    pub cache_write_5m_tokens: u64,
    /// 1-hour cache writes billed.
    pub cache_write_1h_tokens: u64,
    /// Cache reads billed.
    pub cache_read_tokens: u64,
    /// Web searches billed.
    pub web_search_requests: u64,
    /// Money spent on the requests whose model has a price.
    pub cost: Usd,
    /// Requests whose model has no price: their tokens are counted above, their cost is
    /// not in `cost`.
    pub unpriced_requests: u64,
    /// Answers served by the response cache (no tokens billed).
    pub cache_hits: u64,
    /// What those answers would have cost.
    pub savings: Usd,
    /// Requests recorded from a lower bound (stream cut, failed or dropped).
    pub incomplete_requests: u64,
}

impl Totals {
    /// All cache writes (5-minute and 1-hour).
    pub fn cache_write_tokens(&self) -> u64 {
        self.cache_write_5m_tokens
            .saturating_add(self.cache_write_1h_tokens)
    }

    /// Whether `cost` covers every request (no unknown model).
    pub fn is_fully_priced(&self) -> bool {
        self.unpriced_requests == 0
    }

    pub(crate) fn add(&mut self, rec: &CostRecord) {
        fn inc(a: &mut u64, b: u64) {
            *a = a.saturating_add(b);
        }
        inc(&mut self.requests, 1);
        if rec.cost.is_none() {
            inc(&mut self.unpriced_requests, 1);
        }
        if rec.cache_hit {
            inc(&mut self.cache_hits, 1);
            self.savings += rec.saved();
            return;
        }
        let u = &rec.usage;
        inc(&mut self.input_tokens, u.input_tokens);
        inc(&mut self.output_tokens, u.output_tokens);
        inc(&mut self.cache_write_5m_tokens, u.cache_write_5m());
        inc(&mut self.cache_write_1h_tokens, u.cache_write_1h());
        inc(&mut self.cache_read_tokens, u.cache_read_input_tokens);
        inc(
            &mut self.web_search_requests,
            u.server_tool_use.web_search_requests,
        );
        self.cost += rec.spent();
        if !rec.complete {
            inc(&mut self.incomplete_requests, 1);
        }
    }
}

/// Everything a tracker recorded, as of `generated_at`.
///
/// Serializes to JSON with every amount as an exact decimal string of dollars; `Display`
/// renders a table.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CostReport {
    /// When the report was made (RFC 3339, UTC).
    pub generated_at: String,
    /// The `version` of the price table.
    pub prices_version: Option<String>,
    /// Every request.
    pub total: Totals,
    /// By model (the price table's canonical id, or the name of an unknown model).
    pub by_model: BTreeMap<String, Totals>,
    /// By tenant id.
    pub by_tenant: BTreeMap<String, Totals>,
    /// By UTC day (`YYYY-MM-DD`) on which the usage became known.
    pub by_day: BTreeMap<String, Totals>,
    /// By tag (`key=value`).
    pub by_tag: BTreeMap<String, Totals>,
    /// The current budget windows.
    pub budgets: Vec<BudgetStatus>,
}

impl CostReport {
    /// The report as pretty-printed JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }
}

#[derive(Debug, Default)]
pub(crate) struct Ledger {
    total: Totals,
    by_model: HashMap<Arc<str>, Totals, RandomState>,
    by_tenant: HashMap<Tenant, Totals, RandomState>,
    by_day: BTreeMap<Day, Totals>,
    by_tag: HashMap<(Arc<str>, Arc<str>), Totals, RandomState>,
}

impl Ledger {
    pub(crate) fn add(&mut self, rec: &CostRecord, day: Day) {
        self.total.add(rec);
        self.by_model.entry(rec.model.clone()).or_default().add(rec);
        self.by_tenant
            .entry(rec.tenant.clone())
            .or_default()
            .add(rec);
        self.by_day.entry(day).or_default().add(rec);
        if let Some(tags) = &rec.tags {
            for (k, v) in tags.iter() {
                self.by_tag
                    .entry((Arc::from(k), Arc::from(v)))
                    .or_default()
                    .add(rec);
            }
        }
    }

    pub(crate) fn total(&self) -> &Totals {
        &self.total
    }

    pub(crate) fn report(
        &self,
        now: SystemTime,
        prices_version: Option<&str>,
        budgets: Vec<BudgetStatus>,
    ) -> CostReport {
        CostReport {
            generated_at: claude_core::headers::format_rfc3339(now),
            prices_version: prices_version.map(str::to_owned),
            total: self.total.clone(),
            by_model: self
                .by_model
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            by_tenant: self
                .by_tenant
                .iter()
                .map(|(k, v)| (k.as_str().to_owned(), v.clone()))
                .collect(),
            by_day: self
                .by_day
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            by_tag: self
                .by_tag
                .iter()
                .map(|((k, v), t)| (format!("{k}={v}"), t.clone()))
                .collect(),
            budgets,
        }
    }
}

// ===== the table =====

const HEADERS: [&str; 10] = [
    "",
    "requests",
    "input",
    "output",
    "write 5m",
    "write 1h",
    "cache read",
    "searches",
    "cost",
    "saved",
];

fn cost_cell(t: &Totals) -> String {
    match (t.unpriced_requests, t.cost.is_zero()) {
        (0, _) => t.cost.to_string(),
        (_, true) => "unknown".to_owned(),
        (_, false) => format!("{} + unknown", t.cost),
    }
}

fn row(name: &str, t: &Totals) -> [String; 10] {
    [
        name.to_owned(),
        t.requests.to_string(),
        t.input_tokens.to_string(),
        t.output_tokens.to_string(),
        t.cache_write_5m_tokens.to_string(),
        t.cache_write_1h_tokens.to_string(),
        t.cache_read_tokens.to_string(),
        t.web_search_requests.to_string(),
        cost_cell(t),
        t.savings.to_string(),
    ]
}

impl fmt::Display for CostReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rows: Vec<Option<[String; 10]>> = Vec::new();
        rows.push(Some(HEADERS.map(str::to_owned)));
        rows.push(Some(row("total", &self.total)));
        for (title, map) in [
            ("by model", &self.by_model),
            ("by tenant", &self.by_tenant),
            ("by day (UTC)", &self.by_day),
            ("by tag", &self.by_tag),
        ] {
            if map.is_empty() {
                continue;
            }
            rows.push(None);
            let mut h: [String; 10] = Default::default();
            title.clone_into(&mut h[0]);
            rows.push(Some(h));
            for (k, t) in map {
                rows.push(Some(row(&format!("  {k}"), t)));
            }
        }
        let mut widths = [0usize; 10];
        for r in rows.iter().flatten() {
            for (w, c) in widths.iter_mut().zip(r) {
                *w = (*w).max(c.chars().count());
            }
        }
        let mut out = String::new();
        let _ = write!(out, "claude-cost report, {}", self.generated_at);
        if let Some(v) = &self.prices_version {
            let _ = write!(out, " (prices of {v})");
        }
        out.push('\n');
        for r in &rows {
            match r {
                None => out.push('\n'),
                Some(cells) => {
                    for (i, (c, w)) in cells.iter().zip(widths).enumerate() {
                        if i == 0 {
                            let _ = write!(out, "{c:<w$}");
                        } else {
                            let _ = write!(out, "  {c:>w$}");
                        }
                    }
                    let trimmed = out.trim_end_matches(' ').len();
                    out.truncate(trimmed);
                    out.push('\n');
                }
            }
        }
        if !self.budgets.is_empty() {
            out.push_str("\nbudgets\n");
            for b in &self.budgets {
                let _ = writeln!(
                    out,
                    "  {} {} {}: spent {} of {} ({} reserved in flight)",
                    b.scope, b.window, b.period, b.spent, b.limit, b.reserved
                );
            }
        }
        f.write_str(&out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CostTags, CostTracker};
    use claude_core::Usage;

    fn sample() -> CostReport {
        let t = CostTracker::new();
        let u = Usage {
            input_tokens: 1_000,
            output_tokens: 200,
            cache_read_input_tokens: 5_000,
            ..Usage::default()
        };
        let tags = CostTags::new().with("feature", "chat");
        t.record_usage(
            &Tenant::new("acme"),
            "claude-sonnet-4-5",
            &u,
            None,
            Some(&tags),
        );
        t.record_usage(&Tenant::new("acme"), "mystery-model", &u, None, None);
        t.report()
    }

    #[test]
    fn json_round_trip_is_lossless() {
        let r = sample();
        let json = r.to_json();
        // 1,000 × $3 + 200 × $15 + 5,000 × $0.30 = 3,000,000 + 3,000,000 + 1,500,000 n$.
        assert!(json.contains(r#""cost": "0.0075""#), "{json}");
        let back: CostReport = serde_json::from_str(&json).unwrap();
        assert_eq!(back, r);
        assert_eq!(r.by_tag["feature=chat"].requests, 1);
        assert_eq!(r.total.unpriced_requests, 1);
        assert_eq!(r.total.input_tokens, 2_000);
    }

    #[test]
    fn table_for_people() {
        let s = sample().to_string();
        assert!(s.starts_with("claude-cost report, "), "{s}");
        let line = |prefix: &str| {
            s.lines()
                .find(|l| l.trim_start().starts_with(prefix))
                .unwrap_or_else(|| panic!("no `{prefix}` line in\n{s}"))
                .split_whitespace()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            line("total"),
            [
                "total", "2", "2000", "400", "0", "0", "10000", "0", "$0.0075", "+", "unknown",
                "$0.00"
            ]
        );
        assert_eq!(line("mystery-model")[8], "unknown");
        assert_eq!(line("claude-sonnet-4-5-20250929")[8], "$0.0075");
        assert_eq!(line("feature=chat")[1], "1");
        assert!(s.contains("by day (UTC)"));
    }
}
