//! The price table: what one token of each kind costs on each model, and the cost of a
//! request from its usage.
//!
//! # Data
//!
//! The table ships in the crate (`data/prices.toml`, read with `include_str!`): the models
//! of the API reference §5.2 with their ids, dated ids and aliases, every price an exact
//! decimal string per million tokens, converted to nano-dollars per token with no rounding
//! (see [`crate::money`]). A user file in the same format overrides or adds models
//! ([`PriceTable::with_overrides`]).
//!
//! **Table figures, not multipliers.** Cache write and read prices are the table's own
//! figures. For every model but Haiku 3 they equal the multipliers (5-minute write ×1.25,
//! 1-hour write ×2, read ×0.1 of input); Haiku 3's table rounds them ($0.30 instead of
//! $0.3125, $0.03 instead of $0.025). We follow the published table, which is what the
//! invoices show; a user who believes otherwise overrides the model.
//!
//! # Matching
//!
//! A model is found by its id, its dated id or one of its aliases, exactly. There is no
//! prefix or family matching: an unknown model (a new dated id, a typo, a non-Anthropic
//! model behind a relay) never gets another model's price; [`PriceTable::get`] returns
//! `None`, and the tracker counts its tokens and marks its cost unknown.
//!
//! # The cost formula
//!
//! For one request, with `usage` as the API reported it:
//!
//! - rates: the model's standard prices; its long-context prices instead when the request
//!   sent the model's long-context beta (`anthropic-beta: context-1m-2025-08-07` for
//!   Sonnet 4 and 4.5) **and** the total input (`input + cache writes + cache reads`) is
//!   above the threshold (200,000 tokens); then the batch prices of those rates (50% off)
//!   when `usage.service_tier == "batch"`;
//! - `cost = input × in + w5m × write_5m + w1h × write_1h + reads × read + output × out
//!   + web_searches × fee`, where `w5m`/`w1h` come from `usage.cache_creation` (all writes
//!   count as 5-minute when the API gave no split: [`Usage::cache_write_5m`]).
//!
//! The web search fee ($10 per 1,000) is not discounted by batch: the price page lists the
//! batch discount for tokens only.

use std::collections::HashMap;

use foldhash::fast::RandomState;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use claude_core::{ServiceTier, Usage};
use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

use crate::money::{Decimal, DecimalError, TokenPrice, Usd};

/// The bundled price data (TOML).
pub const BUNDLED_PRICES: &str = include_str!("../data/prices.toml");

/// Prices per token of each kind, for one model in one pricing mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct Rates {
    /// Uncached input.
    pub input: TokenPrice,
    /// Output (thinking included).
    pub output: TokenPrice,
    /// Cache writes with the 5-minute TTL.
    pub cache_write_5m: TokenPrice,
    /// Cache writes with the 1-hour TTL.
    pub cache_write_1h: TokenPrice,
    /// Cache reads.
    pub cache_read: TokenPrice,
}

impl Rates {
    /// The highest price an input token can have (usually the 1-hour cache write).
    pub fn highest_input_side(&self) -> TokenPrice {
        self.input
            .max(self.cache_write_5m)
            .max(self.cache_write_1h)
            .max(self.cache_read)
    }

    fn scale(&self, factor: Decimal) -> Option<Self> {
        Some(Self {
            input: self.input.scale(factor)?,
            output: self.output.scale(factor)?,
            cache_write_5m: self.cache_write_5m.scale(factor)?,
            cache_write_1h: self.cache_write_1h.scale(factor)?,
            cache_read: self.cache_read.scale(factor)?,
        })
    }
}

/// The long-context pricing of a model (Sonnet 4 and 4.5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LongContext {
    beta: Arc<str>,
    above_input_tokens: u64,
    standard: Rates,
    batch: Rates,
}

impl LongContext {
    /// The beta (in `anthropic-beta`) that enables the long context.
    pub fn beta(&self) -> &str {
        &self.beta
    }

    /// The total input above which the long-context prices apply (200,000).
    pub fn above_input_tokens(&self) -> u64 {
        self.above_input_tokens
    }

    /// The long-context prices.
    pub fn rates(&self) -> &Rates {
        &self.standard
    }

    /// The long-context prices with the batch discount.
    pub fn batch_rates(&self) -> &Rates {
        &self.batch
    }
}

/// The prices of one model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelPrice {
    id: Arc<str>,
    name: Option<Arc<str>>,
    aliases: Vec<Arc<str>>,
    standard: Rates,
    batch: Rates,
    long_context: Option<LongContext>,
    web_search: Usd,
}

/// Whether a comma-separated `anthropic-beta` value lists `beta`.
pub fn has_beta(anthropic_beta: Option<&str>, beta: &str) -> bool {
    anthropic_beta.is_some_and(|v| v.split(',').any(|b| b.trim() == beta))
}

impl ModelPrice {
    /// The canonical (dated) model id, e.g. `claude-opus-4-5-20251101`.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The id, shared (a cost record names its model with it, without a copy).
    pub(crate) fn shared_id(&self) -> Arc<str> {
        Arc::clone(&self.id)
    }

    /// The display name, e.g. `Claude Opus 4.5`.
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// The other names this model answers to, e.g. `claude-opus-4-5`.
    pub fn aliases(&self) -> impl Iterator<Item = &str> {
        self.aliases.iter().map(|a| &**a)
    }

    /// The standard prices.
    pub fn rates(&self) -> &Rates {
        &self.standard
    }

    /// The prices with the batch discount.
    pub fn batch_rates(&self) -> &Rates {
        &self.batch
    }

    /// The long-context pricing, for the models that have one.
    pub fn long_context(&self) -> Option<&LongContext> {
        self.long_context.as_ref()
    }

    /// The fee of one web search.
    pub fn web_search_fee(&self) -> Usd {
        self.web_search
    }

    /// Whether this usage, on a request that sent `anthropic_beta`, is billed at the
    /// long-context prices.
    pub fn long_context_applies(&self, usage: &Usage, anthropic_beta: Option<&str>) -> bool {
        self.long_context.as_ref().is_some_and(|lc| {
            has_beta(anthropic_beta, &lc.beta) && usage.total_input_tokens() > lc.above_input_tokens
        })
    }

    /// The exact cost of a request with this usage. `anthropic_beta` is the request's
    /// `anthropic-beta` header (comma-separated), which decides long-context pricing.
    pub fn cost(&self, usage: &Usage, anthropic_beta: Option<&str>) -> CostBreakdown {
        let long_context = self.long_context_applies(usage, anthropic_beta);
        let batch = usage.service_tier == Some(ServiceTier::Batch);
        let rates = match (&self.long_context, long_context, batch) {
            (Some(lc), true, false) => &lc.standard,
            (Some(lc), true, true) => &lc.batch,
            (_, _, false) => &self.standard,
            (_, _, true) => &self.batch,
        };
        let searches = usage.server_tool_use.web_search_requests;
        let web_search = Usd::from_nanos(self.web_search.nanos().saturating_mul(searches));
        let mut c = CostBreakdown {
            input: rates.input.times(usage.input_tokens),
            output: rates.output.times(usage.output_tokens),
            cache_write_5m: rates.cache_write_5m.times(usage.cache_write_5m()),
            cache_write_1h: rates.cache_write_1h.times(usage.cache_write_1h()),
            cache_read: rates.cache_read.times(usage.cache_read_input_tokens),
            web_search,
            total: Usd::ZERO,
            batch,
            long_context,
        };
        c.total =
            c.input + c.output + c.cache_write_5m + c.cache_write_1h + c.cache_read + web_search;
        c
    }

    /// The most a request can cost before its usage is known: `input_estimate` tokens at the
    /// highest input-side price (the 1-hour cache write) plus `max_tokens` at the output
    /// price, at long-context prices when the request sent the long-context beta (whatever
    /// its size, since the estimate may be short), at standard (not batch) prices.
    pub fn worst_case(
        &self,
        input_estimate: u64,
        max_tokens: u64,
        anthropic_beta: Option<&str>,
    ) -> Usd {
        let rates = match &self.long_context {
            Some(lc) if has_beta(anthropic_beta, &lc.beta) => &lc.standard,
            _ => &self.standard,
        };
        rates.highest_input_side().times(input_estimate) + rates.output.times(max_tokens)
    }
}

/// The cost of one request, by component. All amounts are exact.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CostBreakdown {
    /// Uncached input tokens.
    pub input: Usd,
    /// Output tokens.
    pub output: Usd,
    /// 5-minute cache writes.
    pub cache_write_5m: Usd,
    /// 1-hour cache writes.
    pub cache_write_1h: Usd,
    /// Cache reads.
    pub cache_read: Usd,
    /// Web search fees.
    pub web_search: Usd,
    /// The sum of the above.
    pub total: Usd,
    /// Batch prices were used (`service_tier == "batch"`).
    pub batch: bool,
    /// Long-context prices were used.
    pub long_context: bool,
}

/// A set of model prices, found by id, dated id or alias.
///
/// ```
/// use claude_core::Usage;
/// use claude_cost::{PriceTable, Usd};
///
/// let prices = PriceTable::bundled();
/// let opus = prices.get("claude-opus-4-5").ok_or("no price")?; // alias of the dated id
/// assert_eq!(opus.id(), "claude-opus-4-5-20251101");
/// let usage = Usage { input_tokens: 1_000_000, output_tokens: 1_000_000, ..Usage::default() };
/// assert_eq!(opus.cost(&usage, None).total, Usd::from_dollars(5 + 25));
/// assert!(prices.get("claude-opus-4-5-20990101").is_none()); // never another model's price
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct PriceTable {
    version: Option<Arc<str>>,
    models: Vec<Arc<ModelPrice>>,
    index: HashMap<Arc<str>, usize, RandomState>,
}

impl PriceTable {
    /// The bundled table (`data/prices.toml`).
    ///
    /// # Panics
    ///
    /// Never in a released build: the bundled file is parsed by the crate's tests.
    pub fn bundled() -> Self {
        static BUNDLED: OnceLock<PriceTable> = OnceLock::new();
        BUNDLED
            .get_or_init(|| match Self::from_toml(BUNDLED_PRICES) {
                Ok(t) => t,
                Err(e) => panic!("the bundled price table is invalid: {e}"),
            })
            .clone()
    }

    /// A table with no models (every model is then unknown).
    pub fn empty() -> Self {
        Self::default()
    }

    /// Reads a table from TOML text (the format of `data/prices.toml`).
    pub fn from_toml(text: &str) -> Result<Self, PriceTableError> {
        let file: PriceFile =
            toml::from_str(text).map_err(|e| PriceTableError::Parse(Box::new(e)))?;
        let mut table = Self {
            version: file.version.map(Arc::from),
            ..Self::default()
        };
        for entry in file.model {
            let price = entry.into_price()?;
            let i = table.models.len();
            for name in std::iter::once(&price.id).chain(&price.aliases) {
                if table.index.insert(name.clone(), i).is_some() {
                    return Err(PriceTableError::DuplicateName(name.to_string()));
                }
            }
            table.models.push(Arc::new(price));
        }
        Ok(table)
    }

    /// Reads a table from a TOML file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, PriceTableError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| PriceTableError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text)
    }

    /// This table with the models of `overrides` replacing or added to its own.
    ///
    /// A model of `overrides` whose `id` is the id of a model here replaces it; if it lists
    /// no aliases it keeps the aliases of the model it replaces. Other models are added.
    /// Every name of `overrides` (ids and aliases) takes precedence over the names here.
    #[must_use]
    pub fn with_overrides(mut self, overrides: &Self) -> Self {
        let mut overridden = vec![false; self.models.len()];
        for m in &overrides.models {
            if let Some(i) = self.models.iter().position(|x| x.id == m.id) {
                let mut m = (**m).clone();
                if m.aliases.is_empty() {
                    m.aliases.clone_from(&self.models[i].aliases);
                }
                self.models[i] = Arc::new(m);
                overridden[i] = true;
            } else {
                self.models.push(m.clone());
                overridden.push(true);
            }
        }
        self.index.clear();
        for pass in [false, true] {
            for (i, m) in self.models.iter().enumerate() {
                if overridden[i] == pass {
                    for name in std::iter::once(&m.id).chain(&m.aliases) {
                        self.index.insert(name.clone(), i);
                    }
                }
            }
        }
        if overrides.version.is_some() {
            self.version.clone_from(&overrides.version);
        }
        self
    }

    /// The prices of a model, by id, dated id or alias (exact match).
    pub fn get(&self, model: &str) -> Option<&Arc<ModelPrice>> {
        self.index.get(model).map(|&i| &self.models[i])
    }

    /// The cost of a request to `model` with this usage; `None` for an unknown model.
    pub fn cost(
        &self,
        model: &str,
        usage: &Usage,
        anthropic_beta: Option<&str>,
    ) -> Option<CostBreakdown> {
        self.get(model).map(|p| p.cost(usage, anthropic_beta))
    }

    /// Every model of the table.
    pub fn models(&self) -> impl Iterator<Item = &Arc<ModelPrice>> {
        self.models.iter()
    }

    /// The `version` of the price data (the date its figures were taken).
    pub fn version(&self) -> Option<&str> {
        self.version.as_deref()
    }
}

/// A price file that could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PriceTableError {
    /// The file is not TOML, or not in the price-table format.
    #[error("price table: {0}")]
    Parse(Box<toml::de::Error>),
    /// A price is not an exact decimal in the unit.
    #[error("price table: model `{model}`, `{field}`: {source}")]
    Price {
        /// The model id.
        model: String,
        /// The field.
        field: &'static str,
        /// What is wrong with the value.
        #[source]
        source: DecimalError,
    },
    /// A discount does not divide a price exactly, or is above 1.
    #[error(
        "price table: model `{model}`: a batch discount of {discount} does not give whole \
         nano-dollars per token (or is above 1)"
    )]
    InexactDiscount {
        /// The model id.
        model: String,
        /// The discount as written.
        discount: String,
    },
    /// A name (id or alias) is listed twice.
    #[error("price table: model name `{0}` is listed twice")]
    DuplicateName(String),
    /// A model without an id.
    #[error("price table: a model has an empty `id`")]
    EmptyId,
    /// The file could not be read.
    #[error("price table: reading {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

// ===== file format =====

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PriceFile {
    #[serde(default)]
    version: Option<String>,
    #[serde(default)]
    model: Vec<ModelEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelEntry {
    id: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    aliases: Vec<String>,
    input: PriceText,
    output: PriceText,
    cache_write_5m: PriceText,
    cache_write_1h: PriceText,
    cache_read: PriceText,
    #[serde(default)]
    batch_discount: Option<PriceText>,
    #[serde(default)]
    web_search_per_1000: Option<PriceText>,
    #[serde(default)]
    long_context: Option<LongContextEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LongContextEntry {
    beta: String,
    above_input_tokens: u64,
    input: PriceText,
    output: PriceText,
    cache_write_5m: PriceText,
    cache_write_1h: PriceText,
    cache_read: PriceText,
}

/// A decimal written as a string (or an integer); floats are refused.
struct PriceText(String);

impl<'de> Deserialize<'de> for PriceText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = PriceText;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a decimal price as a string, e.g. \"0.30\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<PriceText, E> {
                Ok(PriceText(v.to_owned()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<PriceText, E> {
                Ok(PriceText(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<PriceText, E> {
                Ok(PriceText(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<PriceText, E> {
                Err(E::custom(
                    "write prices as strings (\"0.30\"): floats are not exact",
                ))
            }
        }
        d.deserialize_any(V)
    }
}

const DEFAULT_BATCH_DISCOUNT: &str = "0.5";
const DEFAULT_WEB_SEARCH_PER_1000: &str = "10";

impl ModelEntry {
    fn into_price(self) -> Result<ModelPrice, PriceTableError> {
        if self.id.trim().is_empty() {
            return Err(PriceTableError::EmptyId);
        }
        let id = self.id;
        let per_mtok = |field: &'static str, v: &PriceText| {
            TokenPrice::per_mtok(&v.0).map_err(|source| PriceTableError::Price {
                model: id.clone(),
                field,
                source,
            })
        };
        let standard = Rates {
            input: per_mtok("input", &self.input)?,
            output: per_mtok("output", &self.output)?,
            cache_write_5m: per_mtok("cache_write_5m", &self.cache_write_5m)?,
            cache_write_1h: per_mtok("cache_write_1h", &self.cache_write_1h)?,
            cache_read: per_mtok("cache_read", &self.cache_read)?,
        };
        let discount_text = self
            .batch_discount
            .as_ref()
            .map_or(DEFAULT_BATCH_DISCOUNT, |d| d.0.as_str());
        let inexact = || PriceTableError::InexactDiscount {
            model: id.clone(),
            discount: discount_text.to_owned(),
        };
        let factor = Decimal::parse(discount_text.trim())
            .map_err(|source| PriceTableError::Price {
                model: id.clone(),
                field: "batch_discount",
                source,
            })?
            .one_minus()
            .ok_or_else(inexact)?;
        let batch = standard.scale(factor).ok_or_else(inexact)?;
        let long_context = match self.long_context {
            None => None,
            Some(lc) => {
                let standard = Rates {
                    input: per_mtok("long_context.input", &lc.input)?,
                    output: per_mtok("long_context.output", &lc.output)?,
                    cache_write_5m: per_mtok("long_context.cache_write_5m", &lc.cache_write_5m)?,
                    cache_write_1h: per_mtok("long_context.cache_write_1h", &lc.cache_write_1h)?,
                    cache_read: per_mtok("long_context.cache_read", &lc.cache_read)?,
                };
                Some(LongContext {
                    beta: Arc::from(lc.beta.trim()),
                    above_input_tokens: lc.above_input_tokens,
                    batch: standard.scale(factor).ok_or_else(inexact)?,
                    standard,
                })
            }
        };
        let web_text = self
            .web_search_per_1000
            .as_ref()
            .map_or(DEFAULT_WEB_SEARCH_PER_1000, |w| w.0.as_str());
        // $X per 1,000 searches = X × 10^6 nano-dollars per search.
        let web_search = Decimal::parse(web_text.trim())
            .and_then(|d| d.scaled(6))
            .map(Usd::from_nanos)
            .map_err(|source| PriceTableError::Price {
                model: id.clone(),
                field: "web_search_per_1000",
                source,
            })?;
        Ok(ModelPrice {
            id: Arc::from(id.trim()),
            name: self.name.map(Arc::from),
            aliases: self.aliases.iter().map(|a| Arc::from(a.trim())).collect(),
            standard,
            batch,
            long_context,
            web_search,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use claude_core::{CacheCreation, ServerToolUse};

    fn p(nanos: u64) -> TokenPrice {
        TokenPrice::from_nanos_per_token(nanos)
    }

    /// Every figure of the API reference §5.2, in nano-dollars per token ($/MTok × 1000),
    /// typed in by hand: (ids, input, 5m write, 1h write, read, output, batch in, batch out).
    type Row = (&'static [&'static str], u64, u64, u64, u64, u64, u64, u64);
    const TABLE: [Row; 8] = [
        (
            &["claude-opus-4-5-20251101", "claude-opus-4-5"],
            5_000,
            6_250,
            10_000,
            500,
            25_000,
            2_500,
            12_500,
        ),
        (
            &["claude-opus-4-1-20250805", "claude-opus-4-1"],
            15_000,
            18_750,
            30_000,
            1_500,
            75_000,
            7_500,
            37_500,
        ),
        (
            &[
                "claude-opus-4-20250514",
                "claude-opus-4-0",
                "claude-4-opus-20250514",
            ],
            15_000,
            18_750,
            30_000,
            1_500,
            75_000,
            7_500,
            37_500,
        ),
        (
            &["claude-sonnet-4-5-20250929", "claude-sonnet-4-5"],
            3_000,
            3_750,
            6_000,
            300,
            15_000,
            1_500,
            7_500,
        ),
        (
            &[
                "claude-sonnet-4-20250514",
                "claude-sonnet-4-0",
                "claude-4-sonnet-20250514",
            ],
            3_000,
            3_750,
            6_000,
            300,
            15_000,
            1_500,
            7_500,
        ),
        (
            &["claude-haiku-4-5-20251001", "claude-haiku-4-5"],
            1_000,
            1_250,
            2_000,
            100,
            5_000,
            500,
            2_500,
        ),
        (
            &["claude-3-5-haiku-20241022", "claude-3-5-haiku-latest"],
            800,
            1_000,
            1_600,
            80,
            4_000,
            400,
            2_000,
        ),
        (
            &["claude-3-haiku-20240307"],
            250,
            300,
            500,
            30,
            1_250,
            125,
            625,
        ),
    ];

    #[test]
    fn bundled_table_matches_the_published_figures() {
        let t = PriceTable::bundled();
        assert_eq!(t.models().count(), TABLE.len());
        assert_eq!(t.version(), Some("2025-11-24"));
        for (names, input, w5, w1, read, output, b_in, b_out) in TABLE {
            for name in names {
                let m = t.get(name).unwrap_or_else(|| panic!("{name} missing"));
                assert_eq!(m.id(), names[0]);
                let r = m.rates();
                assert_eq!(
                    (
                        r.input,
                        r.cache_write_5m,
                        r.cache_write_1h,
                        r.cache_read,
                        r.output
                    ),
                    (p(input), p(w5), p(w1), p(read), p(output)),
                    "{name}"
                );
                let b = m.batch_rates();
                assert_eq!((b.input, b.output), (p(b_in), p(b_out)), "{name} batch");
                assert_eq!(b.cache_read, p(read / 2), "{name} batch read");
                assert_eq!(m.web_search_fee(), Usd::from_nanos(10_000_000), "$0.01");
            }
        }
        // The blog's $3/$15 for Opus 4.5 is wrong.
        let opus = t.get("claude-opus-4-5").unwrap().rates();
        assert_ne!((opus.input, opus.output), (p(3_000), p(15_000)));
    }

    #[test]
    fn long_context_only_for_sonnet_4_and_4_5() {
        let t = PriceTable::bundled();
        for m in t.models() {
            let is_sonnet = m.id().starts_with("claude-sonnet-4");
            assert_eq!(m.long_context().is_some(), is_sonnet, "{}", m.id());
            if let Some(lc) = m.long_context() {
                assert_eq!(lc.beta(), "context-1m-2025-08-07");
                assert_eq!(lc.above_input_tokens(), 200_000);
                let r = lc.rates();
                assert_eq!(
                    (
                        r.input,
                        r.cache_write_5m,
                        r.cache_write_1h,
                        r.cache_read,
                        r.output
                    ),
                    (p(6_000), p(7_500), p(12_000), p(600), p(22_500))
                );
                assert_eq!(lc.batch_rates().output, p(11_250));
            }
        }
    }

    #[test]
    fn unknown_names_have_no_price() {
        let t = PriceTable::bundled();
        for name in [
            "claude-opus-4-5-20990101",
            "claude-opus-4",
            "claude-sonnet",
            "CLAUDE-OPUS-4-5",
            "gpt-4o",
            "",
        ] {
            assert!(t.get(name).is_none(), "{name}");
        }
        assert!(t.cost("claude-x", &Usage::default(), None).is_none());
    }

    fn usage(input: u64, output: u64) -> Usage {
        Usage {
            input_tokens: input,
            output_tokens: output,
            ..Usage::default()
        }
    }

    fn cost(model: &str, u: &Usage, beta: Option<&str>) -> CostBreakdown {
        PriceTable::bundled().cost(model, u, beta).unwrap()
    }

    // Golden costs, computed by hand in the comments.

    #[test]
    fn golden_input_and_output() {
        // Opus 4.5: 1,234 in × $5/MTok = $0.00617; 567 out × $25/MTok = $0.014175.
        let c = cost("claude-opus-4-5", &usage(1_234, 567), None);
        assert_eq!(c.input, Usd::from_nanos(6_170_000));
        assert_eq!(c.output, Usd::from_nanos(14_175_000));
        assert_eq!(c.total, Usd::from_nanos(20_345_000));
        assert!(!c.batch && !c.long_context);
        // Haiku 3: 7 in × $0.25/MTok = 1,750 n$; 3 out × $1.25/MTok = 3,750 n$.
        let c = cost("claude-3-haiku-20240307", &usage(7, 3), None);
        assert_eq!(c.total, Usd::from_nanos(5_500));
    }

    #[test]
    fn golden_cache_writes_and_reads() {
        // Sonnet 4.5: 100 in ($3) = 300,000 n$; 800 5m writes ($3.75) = 3,000,000 n$;
        // 1,000 1h writes ($6) = 6,000,000 n$; 12,000 reads ($0.30) = 3,600,000 n$;
        // 503 out ($15) = 7,545,000 n$. Total 20,445,000 n$ = $0.020445.
        let u = Usage {
            input_tokens: 100,
            output_tokens: 503,
            cache_creation_input_tokens: 1_800,
            cache_read_input_tokens: 12_000,
            cache_creation: Some(CacheCreation {
                ephemeral_5m_input_tokens: 800,
                ephemeral_1h_input_tokens: 1_000,
            }),
            ..Usage::default()
        };
        let c = cost("claude-sonnet-4-5-20250929", &u, None);
        assert_eq!(c.input, Usd::from_nanos(300_000));
        assert_eq!(c.cache_write_5m, Usd::from_nanos(3_000_000));
        assert_eq!(c.cache_write_1h, Usd::from_nanos(6_000_000));
        assert_eq!(c.cache_read, Usd::from_nanos(3_600_000));
        assert_eq!(c.output, Usd::from_nanos(7_545_000));
        assert_eq!(c.total, Usd::from_nanos(20_445_000));
        // Without a TTL split, all 1,800 writes are 5-minute: 1,800 × 3,750 = 6,750,000 n$.
        let u = Usage {
            cache_creation: None,
            ..u
        };
        let c = cost("claude-sonnet-4-5", &u, None);
        assert_eq!(c.cache_write_5m, Usd::from_nanos(6_750_000));
        assert_eq!(c.cache_write_1h, Usd::ZERO);
        // Haiku 3 uses the table's rounded figures: 1,000 5m writes × $0.30 = 300,000 n$
        // (not 312,500); 1,000 reads × $0.03 = 30,000 n$ (not 25,000).
        let u = Usage {
            cache_creation_input_tokens: 1_000,
            cache_read_input_tokens: 1_000,
            ..Usage::default()
        };
        let c = cost("claude-3-haiku-20240307", &u, None);
        assert_eq!(c.cache_write_5m, Usd::from_nanos(300_000));
        assert_eq!(c.cache_read, Usd::from_nanos(30_000));
    }

    #[test]
    fn golden_batch() {
        // Haiku 3 batch: 1,000 reads × $0.015 = 15,000 n$; 1,000 in × $0.125 = 125,000 n$;
        // 1,000 out × $0.625 = 625,000 n$; 1,000 1h writes × $0.25 = 250,000 n$.
        let u = Usage {
            input_tokens: 1_000,
            output_tokens: 1_000,
            cache_read_input_tokens: 1_000,
            cache_creation_input_tokens: 1_000,
            cache_creation: Some(CacheCreation {
                ephemeral_5m_input_tokens: 0,
                ephemeral_1h_input_tokens: 1_000,
            }),
            service_tier: Some(ServiceTier::Batch),
            ..Usage::default()
        };
        let c = cost("claude-3-haiku-20240307", &u, None);
        assert!(c.batch);
        assert_eq!(c.cache_read, Usd::from_nanos(15_000));
        assert_eq!(c.input, Usd::from_nanos(125_000));
        assert_eq!(c.output, Usd::from_nanos(625_000));
        assert_eq!(c.cache_write_1h, Usd::from_nanos(250_000));
        assert_eq!(c.total, Usd::from_nanos(1_015_000));
        // Opus 4.5 batch: 2,000,000 in × $2.50 = $5; 100,000 out × $12.50 = $1.25.
        let u = Usage {
            service_tier: Some(ServiceTier::Batch),
            ..usage(2_000_000, 100_000)
        };
        assert_eq!(
            cost("claude-opus-4-5", &u, None).total,
            Usd::from_nanos(6_250_000_000)
        );
        // Priority and standard tiers pay the standard price.
        let u = Usage {
            service_tier: Some(ServiceTier::Priority),
            ..usage(1_000_000, 0)
        };
        assert_eq!(
            cost("claude-opus-4-5", &u, None).total,
            Usd::from_dollars(5)
        );
    }

    #[test]
    fn golden_long_context() {
        const BETA: &str = "context-1m-2025-08-07";
        // Sonnet 4.5 with the beta, 150,000 in + 30,000 5m writes + 20,001 reads = 200,001
        // > 200K: in 150,000 × $6 = $0.90; writes 30,000 × $7.50 = $0.225; reads 20,001 ×
        // $0.60 = $0.0120006; out 10,000 × $22.50 = $0.225. Total $1.3620006.
        let u = Usage {
            input_tokens: 150_000,
            output_tokens: 10_000,
            cache_creation_input_tokens: 30_000,
            cache_read_input_tokens: 20_001,
            ..Usage::default()
        };
        let beta = Some("token-efficient-tools-2025-02-19, context-1m-2025-08-07");
        let c = cost("claude-sonnet-4-5", &u, beta);
        assert!(c.long_context);
        assert_eq!(c.input, Usd::from_nanos(900_000_000));
        assert_eq!(c.cache_write_5m, Usd::from_nanos(225_000_000));
        assert_eq!(c.cache_read, Usd::from_nanos(12_000_600));
        assert_eq!(c.output, Usd::from_nanos(225_000_000));
        assert_eq!(c.total, Usd::from_nanos(1_362_000_600));
        // Exactly 200,000: standard prices, even with the beta.
        let at = Usage {
            cache_read_input_tokens: 20_000,
            ..u
        };
        let c = cost("claude-sonnet-4-5", &at, Some(BETA));
        assert!(!c.long_context);
        assert_eq!(c.input, Usd::from_nanos(450_000_000), "150,000 × $3");
        // Above 200K without the beta: standard prices.
        assert!(!cost("claude-sonnet-4-5", &u, None).long_context);
        assert!(!cost("claude-sonnet-4-5", &u, Some("context-1m")).long_context);
        // Opus has no long-context pricing.
        assert!(!cost("claude-opus-4-5", &u, Some(BETA)).long_context);
        // Sonnet 4 too, and batch halves long-context prices: 300,000 in × $3 = $0.90;
        // 1,000 out × $11.25 = $0.01125.
        let u = Usage {
            service_tier: Some(ServiceTier::Batch),
            ..usage(300_000, 1_000)
        };
        let c = cost("claude-sonnet-4-20250514", &u, Some(BETA));
        assert!(c.long_context && c.batch);
        assert_eq!(c.total, Usd::from_nanos(900_000_000 + 11_250_000));
    }

    #[test]
    fn golden_web_search() {
        // Opus 4.5: 10,682 in × $5 = $0.05341; 510 out × $25 = $0.01275; 1 search = $0.01.
        let u = Usage {
            server_tool_use: ServerToolUse {
                web_search_requests: 1,
                web_fetch_requests: 3,
            },
            ..usage(10_682, 510)
        };
        let c = cost("claude-opus-4-5-20251101", &u, None);
        assert_eq!(c.web_search, Usd::from_nanos(10_000_000));
        assert_eq!(
            c.total,
            Usd::from_nanos(53_410_000 + 12_750_000 + 10_000_000)
        );
        // 1,000 searches = $10, not discounted by batch.
        let u = Usage {
            server_tool_use: ServerToolUse {
                web_search_requests: 1_000,
                web_fetch_requests: 0,
            },
            service_tier: Some(ServiceTier::Batch),
            ..Usage::default()
        };
        assert_eq!(
            cost("claude-haiku-4-5", &u, None).total,
            Usd::from_dollars(10)
        );
    }

    #[test]
    fn worst_case_uses_the_highest_input_price() {
        let t = PriceTable::bundled();
        // Sonnet 4.5: 1,000 × $6 (1h write) + 100 × $15 = 6,000,000 + 1,500,000 n$.
        let m = t.get("claude-sonnet-4-5").unwrap();
        assert_eq!(m.worst_case(1_000, 100, None), Usd::from_nanos(7_500_000));
        // With the long-context beta: 1,000 × $12 + 100 × $22.50.
        assert_eq!(
            m.worst_case(1_000, 100, Some("context-1m-2025-08-07")),
            Usd::from_nanos(12_000_000 + 2_250_000)
        );
    }

    const USER: &str = r#"
        version = "2026-01-01"
        [[model]]
        id = "claude-opus-4-5-20251101"
        input = "4"
        output = 20
        cache_write_5m = "5"
        cache_write_1h = "8"
        cache_read = "0.4"
        [[model]]
        id = "my-fine-tune"
        aliases = ["claude-haiku-4-5"]
        input = "0.002"
        output = "0.004"
        cache_write_5m = "0"
        cache_write_1h = "0"
        cache_read = "0"
        batch_discount = "0"
        web_search_per_1000 = "0"
    "#;

    #[test]
    fn user_file_overrides_and_adds() {
        let user = PriceTable::from_toml(USER).unwrap();
        let t = PriceTable::bundled().with_overrides(&user);
        assert_eq!(t.version(), Some("2026-01-01"));
        // Replaced, and keeps its bundled alias.
        for name in ["claude-opus-4-5", "claude-opus-4-5-20251101"] {
            assert_eq!(t.get(name).unwrap().rates().input, p(4_000), "{name}");
        }
        // Added, and its alias takes precedence over the bundled one.
        assert_eq!(t.get("my-fine-tune").unwrap().rates().input, p(2));
        assert_eq!(t.get("claude-haiku-4-5").unwrap().id(), "my-fine-tune");
        assert_eq!(
            t.get("claude-haiku-4-5-20251001").unwrap().rates().input,
            p(1_000)
        );
        // No discount: batch prices are the standard ones.
        let m = t.get("my-fine-tune").unwrap();
        assert_eq!(m.batch_rates(), m.rates());
        assert_eq!(m.web_search_fee(), Usd::ZERO);
        // Untouched models are unchanged.
        assert_eq!(t.get("claude-opus-4-1").unwrap().rates().input, p(15_000));
    }

    #[test]
    fn bad_files_are_refused_with_a_reason() {
        let base = "[[model]]\nid = \"m\"\ninput = \"1\"\noutput = \"1\"\ncache_write_5m = \"1\"\ncache_write_1h = \"1\"\ncache_read = \"1\"\n";
        assert!(PriceTable::from_toml(base).is_ok());
        let cases = [
            (
                base.replace("input = \"1\"", "input = 1.5"),
                "floats are not exact",
            ),
            (
                base.replace("input = \"1\"", "input = \"0.0005\""),
                "`input`: `0.0005` has more than 3 decimals",
            ),
            (
                base.replace(
                    "cache_read = \"1\"",
                    "cache_read = \"0.001\"\nbatch_discount = \"0.5\"",
                ),
                "batch discount of 0.5",
            ),
            (
                base.replace(
                    "cache_read = \"1\"",
                    "cache_read = \"1\"\nbatch_discount = \"2\"",
                ),
                "batch discount of 2",
            ),
            (
                base.replace("input = \"1\"", "input = \"1\"\ncolour = \"red\""),
                "colour",
            ),
            (format!("{base}{base}"), "`m` is listed twice"),
            (base.replace("id = \"m\"", "id = \"\""), "empty `id`"),
        ];
        for (text, why) in cases {
            let msg = PriceTable::from_toml(&text).expect_err(why).to_string();
            assert!(msg.contains(why), "{why}: {msg}");
        }
    }
}
