//! The metrics the tracker emits, through the `metrics` facade.
//!
//! | Name | Labels | Meaning |
//! |---|---|---|
//! | `claude_cost_requests_total` | `model`, `tenant` | requests recorded (cache hits included) |
//! | `claude_cost_tokens_total` | `kind`, `model`, `tenant` | tokens billed; `kind` is `input`, `output`, `cache_write_5m`, `cache_write_1h`, `cache_read` |
//! | `claude_cost_web_search_requests_total` | `model`, `tenant` | web searches billed |
//! | `claude_cost_usd_nanos_total` | `model`, `tenant` | money spent, in nano-dollars (known prices only) |
//! | `claude_cost_cache_hits_total` | `model`, `tenant` | answers served by the response cache |
//! | `claude_cost_savings_nanos_total` | `model`, `tenant` | what those answers would have cost, in nano-dollars |
//! | `claude_cost_unknown_model_total` | `model`, `tenant` | requests whose model has no price (cost unknown) |
//! | `claude_cost_incomplete_total` | `model`, `tenant` | requests recorded from a lower bound (stream cut, failed or dropped) |
//! | `claude_cost_budget_rejections_total` | `scope`, `window` | requests refused by a cap (`scope` is `global` or `tenant`) |
//! | `claude_cost_budget_alerts_total` | `scope`, `window`, `kind` | alerts fired (`kind` is a threshold like `80` or `refused`) |
//!
//! Money is counted in nano-dollars because counters are integers: the sum is exact, and a
//! dashboard divides by 10⁹. Labels never carry an API key or a request id: `model` is the
//! price table's canonical id when the model is known, otherwise the model the response
//! named (so it was accepted upstream), at most 64 bytes, or `unknown`; `tenant` is the
//! [`Tenant`] id, whose cardinality the application controls.
//! Tenants are not a label of the budget metrics: refusals can be driven by clients.

use std::collections::HashMap;

use foldhash::fast::RandomState;
use std::sync::{Arc, PoisonError, RwLock};

use claude_core::Tenant;
use metrics::{Counter, Label, SharedString, counter, describe_counter};

use crate::budget::{AlertKind, BudgetAlert, BudgetScope, BudgetWindow};
use crate::tracker::CostRecord;

/// `claude_cost_requests_total`.
pub const REQUESTS: &str = "claude_cost_requests_total";
/// `claude_cost_tokens_total`.
pub const TOKENS: &str = "claude_cost_tokens_total";
/// `claude_cost_web_search_requests_total`.
pub const WEB_SEARCHES: &str = "claude_cost_web_search_requests_total";
/// `claude_cost_usd_nanos_total`.
pub const USD_NANOS: &str = "claude_cost_usd_nanos_total";
/// `claude_cost_cache_hits_total`.
pub const CACHE_HITS: &str = "claude_cost_cache_hits_total";
/// `claude_cost_savings_nanos_total`.
pub const SAVINGS_NANOS: &str = "claude_cost_savings_nanos_total";
/// `claude_cost_unknown_model_total`.
pub const UNKNOWN_MODEL: &str = "claude_cost_unknown_model_total";
/// `claude_cost_incomplete_total`.
pub const INCOMPLETE: &str = "claude_cost_incomplete_total";
/// `claude_cost_budget_rejections_total`.
pub const BUDGET_REJECTIONS: &str = "claude_cost_budget_rejections_total";
/// `claude_cost_budget_alerts_total`.
pub const BUDGET_ALERTS: &str = "claude_cost_budget_alerts_total";

/// Registers the descriptions of every metric with the installed recorder. Call it once
/// after installing the recorder (optional: metrics work without descriptions).
pub fn describe_metrics() {
    describe_counter!(
        REQUESTS,
        "Claude requests recorded by claude-cost (cache hits included)."
    );
    describe_counter!(TOKENS, "Claude tokens billed, by kind.");
    describe_counter!(WEB_SEARCHES, "Web searches billed.");
    describe_counter!(
        USD_NANOS,
        "Money spent on Claude, in nano-dollars (1e-9 USD)."
    );
    describe_counter!(CACHE_HITS, "Answers served by the response cache.");
    describe_counter!(
        SAVINGS_NANOS,
        "What cached answers would have cost, in nano-dollars (1e-9 USD)."
    );
    describe_counter!(
        UNKNOWN_MODEL,
        "Requests to a model without a price (cost unknown)."
    );
    describe_counter!(
        INCOMPLETE,
        "Requests recorded from a lower bound (stream cut or dropped)."
    );
    describe_counter!(BUDGET_REJECTIONS, "Requests refused by a budget cap.");
    describe_counter!(BUDGET_ALERTS, "Budget alerts fired.");
}

/// One counter of a (model, tenant) pair.
#[derive(Debug, Clone, Copy)]
enum Which {
    Requests,
    UnknownModel,
    CacheHits,
    Savings,
    /// Tokens of the kind `TOKEN_KINDS[i]`.
    Tokens(usize),
    WebSearches,
    Incomplete,
    Usd,
}

const TOKEN_KINDS: [&str; 5] = [
    "input",
    "output",
    "cache_write_5m",
    "cache_write_1h",
    "cache_read",
];

impl Which {
    const ALL: [Which; 12] = [
        Which::Requests,
        Which::UnknownModel,
        Which::CacheHits,
        Which::Savings,
        Which::Tokens(0),
        Which::Tokens(1),
        Which::Tokens(2),
        Which::Tokens(3),
        Which::Tokens(4),
        Which::WebSearches,
        Which::Incomplete,
        Which::Usd,
    ];

    /// The position in [`Which::ALL`].
    fn index(self) -> usize {
        match self {
            Which::Requests => 0,
            Which::UnknownModel => 1,
            Which::CacheHits => 2,
            Which::Savings => 3,
            Which::Tokens(i) => 4 + i,
            Which::WebSearches => 9,
            Which::Incomplete => 10,
            Which::Usd => 11,
        }
    }

    /// Looks the counter up in the recorder in use.
    fn counter(self, labels: &[Label; 2]) -> Counter {
        let name = match self {
            Which::Tokens(i) => {
                let [model, tenant] = labels.clone();
                let kind = Label::from_static_parts("kind", TOKEN_KINDS[i]);
                return counter!(TOKENS, vec![kind, model, tenant]);
            }
            Which::Requests => REQUESTS,
            Which::UnknownModel => UNKNOWN_MODEL,
            Which::CacheHits => CACHE_HITS,
            Which::Savings => SAVINGS_NANOS,
            Which::WebSearches => WEB_SEARCHES,
            Which::Incomplete => INCOMPLETE,
            Which::Usd => USD_NANOS,
        };
        counter!(name, labels.iter())
    }
}

/// The model and tenant labels of a record, sharing its strings (no copy).
fn labels(rec: &CostRecord) -> [Label; 2] {
    [
        Label::new("model", SharedString::from(rec.model.clone())),
        Label::new("tenant", SharedString::from(rec.tenant.id_arc())),
    ]
}

/// What `rec` adds to which counter.
fn count(rec: &CostRecord, mut add: impl FnMut(Which, u64)) {
    add(Which::Requests, 1);
    if rec.cost.is_none() {
        add(Which::UnknownModel, 1);
    }
    if rec.cache_hit {
        add(Which::CacheHits, 1);
        let saved = rec.saved().nanos();
        if saved > 0 {
            add(Which::Savings, saved);
        }
        return;
    }
    let u = &rec.usage;
    let tokens = [
        u.input_tokens,
        u.output_tokens,
        u.cache_write_5m(),
        u.cache_write_1h(),
        u.cache_read_input_tokens,
    ];
    for (i, n) in tokens.into_iter().enumerate() {
        add(Which::Tokens(i), n);
    }
    if u.server_tool_use.web_search_requests > 0 {
        add(Which::WebSearches, u.server_tool_use.web_search_requests);
    }
    if !rec.complete {
        add(Which::Incomplete, 1);
    }
    if let Some(c) = &rec.cost {
        add(Which::Usd, c.total.nanos());
    }
}

/// Counts one committed record, looking each counter it touches up in the recorder in use.
pub(crate) fn record(rec: &CostRecord) {
    let labels = labels(rec);
    count(rec, |which, n| which.counter(&labels).increment(n));
}

/// Every counter of one (model, tenant) pair, in the order of [`Which::ALL`].
struct Handles([Counter; 12]);

/// The most (model, tenant) pairs whose handles [`MetricHandles`] keeps; past it, a record
/// looks its counters up each time (correct, only slower).
const MAX_HANDLE_SETS: usize = 4096;

/// Counter handles per (model, tenant), kept across records (see
/// [`CostTrackerBuilder::reuse_metric_handles`](crate::CostTrackerBuilder::reuse_metric_handles)).
#[derive(Default)]
pub(crate) struct MetricHandles {
    sets: RwLock<HandleSets>,
}

#[derive(Default)]
struct HandleSets {
    recorder: usize,
    by_pair: HashMap<(Arc<str>, Tenant), Arc<Handles>, RandomState>,
}

impl MetricHandles {
    /// Counts one committed record through the kept handles of its pair. (Every counter of
    /// a pair is registered when the pair is first seen, so the ones it never touches show
    /// at zero.)
    pub(crate) fn record(&self, rec: &CostRecord) {
        let h = self.handles(rec);
        count(rec, |which, n| h.0[which.index()].increment(n));
    }

    fn handles(&self, rec: &CostRecord) -> Arc<Handles> {
        let recorder = claude_core::metric::recorder_id();
        let pair = (rec.model.clone(), rec.tenant.clone());
        {
            let sets = self.sets.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(h) = sets
                .by_pair
                .get(&pair)
                .filter(|_| sets.recorder == recorder)
            {
                return h.clone();
            }
        }
        let labels = labels(rec);
        let h = Arc::new(Handles(Which::ALL.map(|w| w.counter(&labels))));
        let mut sets = self.sets.write().unwrap_or_else(PoisonError::into_inner);
        if sets.recorder != recorder {
            sets.recorder = recorder;
            sets.by_pair.clear();
        }
        if sets.by_pair.len() < MAX_HANDLE_SETS {
            sets.by_pair.insert(pair, h.clone());
        }
        h
    }
}

fn scope_label(scope: &BudgetScope) -> &'static str {
    match scope {
        BudgetScope::Global => "global",
        BudgetScope::Tenant(_) => "tenant",
    }
}

pub(crate) fn rejection(scope: &BudgetScope, window: BudgetWindow) {
    counter!(
        BUDGET_REJECTIONS,
        "scope" => scope_label(scope),
        "window" => window.as_str()
    )
    .increment(1);
}

pub(crate) fn alert(a: &BudgetAlert) {
    let kind = match a.kind {
        AlertKind::Threshold { percent } => percent.to_string(),
        AlertKind::Refused => "refused".to_owned(),
    };
    counter!(
        BUDGET_ALERTS,
        "scope" => scope_label(&a.scope),
        "window" => a.window.as_str(),
        "kind" => kind
    )
    .increment(1);
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use claude_core::{CacheCreation, ServerToolUse, Tenant, Usage};
    use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};

    use super::*;
    use crate::{Budget, BudgetConfig, CostTracker, Usd};

    type Counters = BTreeMap<(String, Vec<(String, String)>), u64>;

    fn counters(s: &Snapshotter) -> Counters {
        s.snapshot()
            .into_vec()
            .into_iter()
            .filter_map(|(k, _, _, v)| match v {
                DebugValue::Counter(n) => {
                    let key = k.key();
                    let mut labels: Vec<_> = key
                        .labels()
                        .map(|l| (l.key().to_owned(), l.value().to_owned()))
                        .collect();
                    labels.sort();
                    Some(((key.name().to_owned(), labels), n))
                }
                _ => None,
            })
            .collect()
    }

    fn get(c: &Counters, name: &str, labels: &[(&str, &str)]) -> u64 {
        let mut l: Vec<_> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        l.sort();
        c.get(&(name.to_owned(), l)).copied().unwrap_or(0)
    }

    #[test]
    fn counters_by_kind_model_and_tenant() {
        let recorder = DebuggingRecorder::new();
        let snap = recorder.snapshotter();
        metrics::with_local_recorder(&recorder, || {
            let t = CostTracker::builder()
                .budgets(
                    BudgetConfig::new().global(Budget::new().daily(Usd::from_nanos(50_000_000))),
                )
                .build();
            let u = Usage {
                input_tokens: 1_000,
                output_tokens: 100,
                cache_creation_input_tokens: 500,
                cache_read_input_tokens: 400,
                cache_creation: Some(CacheCreation {
                    ephemeral_5m_input_tokens: 200,
                    ephemeral_1h_input_tokens: 300,
                }),
                server_tool_use: ServerToolUse {
                    web_search_requests: 2,
                    web_fetch_requests: 0,
                },
                service_tier: None,
            };
            t.record_usage(&Tenant::new("a"), "claude-sonnet-4-5", &u, None, None);
            t.record_usage(&Tenant::new("b"), "mystery-1", &u, None, None);
        });
        let c = counters(&snap);
        let a = [("model", "claude-sonnet-4-5-20250929"), ("tenant", "a")];
        assert_eq!(get(&c, REQUESTS, &a), 1);
        for (kind, n) in [
            ("input", 1_000),
            ("output", 100),
            ("cache_write_5m", 200),
            ("cache_write_1h", 300),
            ("cache_read", 400),
        ] {
            let l = [a[0], a[1], ("kind", kind)];
            assert_eq!(get(&c, TOKENS, &l), n, "{kind}");
        }
        assert_eq!(get(&c, WEB_SEARCHES, &a), 2);
        // 1,000 × 3,000 + 100 × 15,000 + 200 × 3,750 + 300 × 6,000 + 400 × 300 + 2 × 10^7.
        assert_eq!(get(&c, USD_NANOS, &a), 27_170_000);
        // The unknown model: tokens counted, no money, one unknown-model count.
        let b = [("model", "mystery-1"), ("tenant", "b")];
        assert_eq!(get(&c, TOKENS, &[b[0], b[1], ("kind", "input")]), 1_000);
        assert_eq!(get(&c, USD_NANOS, &b), 0);
        assert_eq!(get(&c, UNKNOWN_MODEL, &b), 1);
        assert_eq!(get(&c, UNKNOWN_MODEL, &a), 0);
        // $0.02717 of a $0.05 daily budget: the 50% alert fired once.
        let alert = [("scope", "global"), ("window", "daily"), ("kind", "50")];
        assert_eq!(get(&c, BUDGET_ALERTS, &alert), 1);
        assert_eq!(
            get(&c, BUDGET_ALERTS, &[alert[0], alert[1], ("kind", "80")]),
            0
        );
        // No label beyond the documented ones.
        for (_, labels) in c.keys() {
            for (k, _) in labels {
                assert!(
                    ["model", "tenant", "kind", "scope", "window"].contains(&k.as_str()),
                    "{k}"
                );
            }
        }
    }

    #[test]
    fn handles_follow_the_recorder_in_use() {
        // One tracker, records under three recorders in turn (at one stack address): each
        // recorder gets its own counts, none is swallowed by an earlier one.
        let t = CostTracker::builder().build();
        let u = Usage {
            input_tokens: 7,
            ..Usage::default()
        };
        let a = [("model", "claude-sonnet-4-5-20250929"), ("tenant", "a")];
        let mut seen = Vec::new();
        for round in 1..=3_u64 {
            let recorder = DebuggingRecorder::new();
            let snap = recorder.snapshotter();
            metrics::with_local_recorder(&recorder, || {
                for _ in 0..round {
                    t.record_usage(&Tenant::new("a"), "claude-sonnet-4-5", &u, None, None);
                }
            });
            let c = counters(&snap);
            seen.push((
                get(&c, REQUESTS, &a),
                get(&c, TOKENS, &[a[0], a[1], ("kind", "input")]),
            ));
        }
        assert_eq!(seen, [(1, 7), (2, 14), (3, 21)]);
    }

    #[test]
    fn reused_handles_count_like_the_lookups_and_follow_a_new_recorder() {
        // The same records through a tracker that looks its counters up each time and one
        // that keeps the handles: the same counts. Then the keeping tracker under a second
        // recorder (alive at the same time as the first, so at another address): its handles
        // are resolved again and the second recorder gets the counts.
        let u = Usage {
            input_tokens: 11,
            output_tokens: 3,
            ..Usage::default()
        };
        let records = |t: &CostTracker| {
            t.record_usage(&Tenant::new("a"), "claude-sonnet-4-5", &u, None, None);
            t.record_usage(&Tenant::new("a"), "claude-sonnet-4-5", &u, None, None);
            t.record_usage(&Tenant::new("b"), "mystery-1", &u, None, None);
        };
        let looked_up = DebuggingRecorder::new();
        let kept = DebuggingRecorder::new();
        let later = DebuggingRecorder::new();
        let keeping = CostTracker::builder().reuse_metric_handles(true).build();
        metrics::with_local_recorder(&looked_up, || records(&CostTracker::builder().build()));
        metrics::with_local_recorder(&kept, || records(&keeping));
        metrics::with_local_recorder(&later, || records(&keeping));
        let (a, b, c) = (
            counters(&looked_up.snapshotter()),
            counters(&kept.snapshotter()),
            counters(&later.snapshotter()),
        );
        let sonnet = [("model", "claude-sonnet-4-5-20250929"), ("tenant", "a")];
        let mystery = [("model", "mystery-1"), ("tenant", "b")];
        let usd = get(&a, USD_NANOS, &sonnet);
        assert!(usd > 0);
        for c in [&a, &b, &c] {
            assert_eq!(get(c, REQUESTS, &sonnet), 2);
            assert_eq!(
                get(c, TOKENS, &[sonnet[0], sonnet[1], ("kind", "input")]),
                22
            );
            assert_eq!(
                get(c, TOKENS, &[sonnet[0], sonnet[1], ("kind", "output")]),
                6
            );
            assert_eq!(get(c, UNKNOWN_MODEL, &mystery), 1);
            assert_eq!(get(c, USD_NANOS, &sonnet), usd);
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn hits_and_refusals_through_the_layer() {
        use bytes::Bytes;
        use http_body_util::{BodyExt, Full};
        use tower::ServiceExt;

        let recorder = DebuggingRecorder::new();
        let snap = recorder.snapshotter();
        let _guard = metrics::set_default_local_recorder(&recorder);
        let t = CostTracker::builder()
            .budgets(BudgetConfig::new().tenant("poor", Budget::new().daily(Usd::ZERO)))
            .build();
        let svc = tower::service_fn(|_req: http::Request<Bytes>| async {
            let mut r = http::Response::new(Full::new(Bytes::from_static(b"{}")));
            r.extensions_mut().insert(claude_core::CacheHit {
                usage: Usage {
                    output_tokens: 1_000,
                    ..Usage::default()
                },
                model: None,
                age: std::time::Duration::ZERO,
            });
            Ok::<_, std::convert::Infallible>(r)
        });
        let layer = t.layer();
        for tenant in ["rich", "poor"] {
            let req = http::Request::post("http://x/v1/messages")
                .extension(Tenant::new(tenant))
                .body(Bytes::from_static(
                    br#"{"model":"claude-opus-4-5","max_tokens":10,"messages":[]}"#,
                ))
                .unwrap();
            let svc = tower::Layer::layer(&layer, svc);
            if let Ok(resp) = svc.oneshot(req).await {
                let _ = resp.into_body().collect().await;
            }
        }
        let c = counters(&snap);
        let rich = [("model", "claude-opus-4-5-20251101"), ("tenant", "rich")];
        assert_eq!(get(&c, CACHE_HITS, &rich), 1);
        // 1,000 output tokens × $25/MTok saved.
        assert_eq!(get(&c, SAVINGS_NANOS, &rich), 25_000_000);
        assert_eq!(get(&c, USD_NANOS, &rich), 0);
        assert_eq!(
            get(
                &c,
                BUDGET_REJECTIONS,
                &[("scope", "tenant"), ("window", "daily")]
            ),
            1
        );
        assert_eq!(
            get(
                &c,
                BUDGET_ALERTS,
                &[
                    ("scope", "tenant"),
                    ("window", "daily"),
                    ("kind", "refused")
                ]
            ),
            1
        );
    }
}
