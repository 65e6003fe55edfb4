//! Token usage as Anthropic reports it, and the merge rule for streams.

use serde::{Deserialize, Serialize};

/// The split of cache writes by TTL (`usage.cache_creation`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CacheCreation {
    /// Tokens written with the 5-minute TTL (priced at 1.25× input).
    pub ephemeral_5m_input_tokens: u64,
    /// Tokens written with the 1-hour TTL (priced at 2× input).
    pub ephemeral_1h_input_tokens: u64,
}

/// Server-side tool calls billed per request (`usage.server_tool_use`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ServerToolUse {
    /// Web searches run (billed per 1,000).
    #[serde(default)]
    pub web_search_requests: u64,
    /// Web fetches run (tokens only).
    #[serde(default)]
    pub web_fetch_requests: u64,
}

/// The service tier that served the request (`usage.service_tier`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServiceTier {
    /// Standard capacity.
    Standard,
    /// Priority Tier capacity.
    Priority,
    /// Message Batches (half price).
    Batch,
    /// A value this version does not know.
    #[serde(other)]
    Other,
}

/// Token usage of one answer.
///
/// The total prompt is `input_tokens + cache_creation_input_tokens + cache_read_input_tokens`
/// (`input_tokens` counts only the tokens after the last cache breakpoint).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Usage {
    /// Uncached input tokens.
    pub input_tokens: u64,
    /// Output tokens (thinking included): the billed figure.
    pub output_tokens: u64,
    /// Tokens written to the prompt cache.
    pub cache_creation_input_tokens: u64,
    /// Tokens read from the prompt cache.
    pub cache_read_input_tokens: u64,
    /// The TTL split of the cache writes, when the API reported it.
    pub cache_creation: Option<CacheCreation>,
    /// Server tool calls.
    pub server_tool_use: ServerToolUse,
    /// The service tier, when reported.
    pub service_tier: Option<ServiceTier>,
}

impl Usage {
    /// Cache writes with the 5-minute TTL. Without a TTL split, every write counts as 5-minute
    /// (the API's default TTL).
    pub fn cache_write_5m(&self) -> u64 {
        match self.cache_creation {
            Some(c) => c.ephemeral_5m_input_tokens,
            None => self.cache_creation_input_tokens,
        }
    }

    /// Cache writes with the 1-hour TTL.
    pub fn cache_write_1h(&self) -> u64 {
        self.cache_creation
            .map_or(0, |c| c.ephemeral_1h_input_tokens)
    }

    /// All input tokens: uncached, cache writes and cache reads.
    pub fn total_input_tokens(&self) -> u64 {
        self.input_tokens + self.cache_creation_input_tokens + self.cache_read_input_tokens
    }

    /// The input tokens that count toward ITPM on current models: uncached input plus cache
    /// writes (cache reads do not count; API reference §1.2).
    pub fn itpm_tokens(&self) -> u64 {
        self.input_tokens + self.cache_creation_input_tokens
    }

    /// Adds another usage to this one (for totals across requests, never within a stream).
    pub fn accumulate(&mut self, other: &Self) {
        let split = self.cache_creation.is_some() || other.cache_creation.is_some();
        let w5m = self.cache_write_5m() + other.cache_write_5m();
        let w1h = self.cache_write_1h() + other.cache_write_1h();
        self.input_tokens += other.input_tokens;
        self.output_tokens += other.output_tokens;
        self.cache_creation_input_tokens += other.cache_creation_input_tokens;
        self.cache_read_input_tokens += other.cache_read_input_tokens;
        if split {
            self.cache_creation = Some(CacheCreation {
                ephemeral_5m_input_tokens: w5m,
                ephemeral_1h_input_tokens: w1h,
            });
        }
        self.server_tool_use.web_search_requests += other.server_tool_use.web_search_requests;
        self.server_tool_use.web_fetch_requests += other.server_tool_use.web_fetch_requests;
    }
}

/// A usage object as it appears on the wire: every field optional, `null` allowed.
#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct WireUsage {
    pub(crate) input_tokens: Option<u64>,
    pub(crate) output_tokens: Option<u64>,
    pub(crate) cache_creation_input_tokens: Option<u64>,
    pub(crate) cache_read_input_tokens: Option<u64>,
    pub(crate) cache_creation: Option<WireCacheCreation>,
    pub(crate) server_tool_use: Option<WireServerToolUse>,
    pub(crate) service_tier: Option<ServiceTier>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize)]
pub(crate) struct WireCacheCreation {
    pub(crate) ephemeral_5m_input_tokens: Option<u64>,
    pub(crate) ephemeral_1h_input_tokens: Option<u64>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize)]
pub(crate) struct WireServerToolUse {
    pub(crate) web_search_requests: Option<u64>,
    pub(crate) web_fetch_requests: Option<u64>,
}

/// Field-by-field accumulator: `message_start` sets the base, each `message_delta` replaces
/// the fields it carries (its counts are cumulative, never summed).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct UsageMerge {
    input: Option<u64>,
    output: Option<u64>,
    cache_creation: Option<u64>,
    cache_read: Option<u64>,
    w5m: Option<u64>,
    w1h: Option<u64>,
    web_search: Option<u64>,
    web_fetch: Option<u64>,
    tier: Option<ServiceTier>,
    pub(crate) seen: bool,
}

impl UsageMerge {
    pub(crate) fn apply(&mut self, w: &WireUsage) {
        fn set(dst: &mut Option<u64>, src: Option<u64>) {
            if src.is_some() {
                *dst = src;
            }
        }
        self.seen = true;
        set(&mut self.input, w.input_tokens);
        set(&mut self.output, w.output_tokens);
        set(&mut self.cache_creation, w.cache_creation_input_tokens);
        set(&mut self.cache_read, w.cache_read_input_tokens);
        if let Some(c) = w.cache_creation {
            set(&mut self.w5m, c.ephemeral_5m_input_tokens);
            set(&mut self.w1h, c.ephemeral_1h_input_tokens);
        }
        if let Some(s) = w.server_tool_use {
            set(&mut self.web_search, s.web_search_requests);
            set(&mut self.web_fetch, s.web_fetch_requests);
        }
        if w.service_tier.is_some() {
            self.tier = w.service_tier;
        }
    }

    pub(crate) fn usage(&self) -> Usage {
        let cache_creation = if self.w5m.is_some() || self.w1h.is_some() {
            Some(CacheCreation {
                ephemeral_5m_input_tokens: self.w5m.unwrap_or(0),
                ephemeral_1h_input_tokens: self.w1h.unwrap_or(0),
            })
        } else {
            None
        };
        Usage {
            input_tokens: self.input.unwrap_or(0),
            output_tokens: self.output.unwrap_or(0),
            cache_creation_input_tokens: self.cache_creation.unwrap_or(0),
            cache_read_input_tokens: self.cache_read.unwrap_or(0),
            cache_creation,
            server_tool_use: ServerToolUse {
                web_search_requests: self.web_search.unwrap_or(0),
                web_fetch_requests: self.web_fetch.unwrap_or(0),
            },
            service_tier: self.tier,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_split_defaults_to_5m() {
        let u = Usage {
            cache_creation_input_tokens: 100,
            ..Usage::default()
        };
        assert_eq!((u.cache_write_5m(), u.cache_write_1h()), (100, 0));
        let u = Usage {
            cache_creation_input_tokens: 100,
            cache_creation: Some(CacheCreation {
                ephemeral_5m_input_tokens: 30,
                ephemeral_1h_input_tokens: 70,
            }),
            ..Usage::default()
        };
        assert_eq!((u.cache_write_5m(), u.cache_write_1h()), (30, 70));
    }

    #[test]
    fn accumulate_keeps_splits() {
        let mut a = Usage {
            input_tokens: 1,
            cache_creation_input_tokens: 10,
            ..Usage::default()
        };
        let b = Usage {
            input_tokens: 2,
            output_tokens: 3,
            cache_creation_input_tokens: 5,
            cache_creation: Some(CacheCreation {
                ephemeral_5m_input_tokens: 0,
                ephemeral_1h_input_tokens: 5,
            }),
            ..Usage::default()
        };
        a.accumulate(&b);
        assert_eq!(a.input_tokens, 3);
        assert_eq!(a.cache_creation_input_tokens, 15);
        assert_eq!(a.cache_write_5m(), 10);
        assert_eq!(a.cache_write_1h(), 5);
    }
}
