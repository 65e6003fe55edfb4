//! `GET /admin/costs`: the cost ledger in a stable JSON shape.
//!
//! ```json
//! {
//!   "total":     {"requests": 3, "input_tokens": 10, "output_tokens": 36,
//!                 "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
//!                 "cost_usd": "0.000570", "cache_hits": 0, "savings_usd": "0",
//!                 "unpriced_requests": 0, "incomplete_requests": 0, "web_search_requests": 0},
//!   "by_model":  {"claude-sonnet-4-5": {…same fields…}},
//!   "by_tenant": {"default": {…}},
//!   "by_day":    {"2026-11-26": {…}},
//!   "prices_version": "2025-11-24",
//!   "generated_at": "…"
//! }
//! ```
//!
//! Money is a decimal string of dollars with every nano-dollar kept.

use claude_cost::{CostReport, Totals};
use serde_json::{Map, Value, json};

fn totals(t: &Totals) -> Value {
    json!({
        "requests": t.requests,
        "input_tokens": t.input_tokens,
        "output_tokens": t.output_tokens,
        "cache_creation_input_tokens": t.cache_write_tokens(),
        "cache_read_input_tokens": t.cache_read_tokens,
        "cost_usd": t.cost,
        "cache_hits": t.cache_hits,
        "savings_usd": t.savings,
        "unpriced_requests": t.unpriced_requests,
        "incomplete_requests": t.incomplete_requests,
        "web_search_requests": t.web_search_requests,
    })
}

fn group<'a>(it: impl Iterator<Item = (&'a String, &'a Totals)>) -> Value {
    Value::Object(
        it.map(|(k, t)| (k.clone(), totals(t)))
            .collect::<Map<_, _>>(),
    )
}

/// The admin JSON of a cost report.
pub(crate) fn costs_json(r: &CostReport) -> Value {
    json!({
        "total": totals(&r.total),
        "by_model": group(r.by_model.iter()),
        "by_tenant": group(r.by_tenant.iter()),
        "by_day": group(r.by_day.iter()),
        "prices_version": r.prices_version,
        "generated_at": r.generated_at,
    })
}
