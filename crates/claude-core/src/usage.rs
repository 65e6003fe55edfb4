//! Token usage as Anthropic reports it, and the merge rule for streams.

use serde::{Deserialize, Serialize};

use crate::scan::string_stop_swar;

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

impl WireUsage {
    /// `serde_json::from_slice::<WireUsage>(json).ok()`, read by hand when the object has the
    /// shape the API sends (a flat object of unsigned integers, `null`s, the two nested
    /// objects of the same and a plain `service_tier` string): about a tenth of the
    /// instructions of serde's derive. Anything else, including anything serde would reject
    /// (duplicate fields, signs, fractions, numbers over `u64`, escapes, trailing commas),
    /// is left to serde, so the result is serde's for every input.
    pub(crate) fn from_json(json: &[u8]) -> Option<Self> {
        let mut r = Reader { s: json, i: 0 };
        match r.usage() {
            Some(w) if r.at_end() => Some(w),
            _ => serde_json::from_slice(json).ok(),
        }
    }

    /// The usage object at the very start of `json` (its `{`), read by hand, and its length:
    /// `Some` only when [`from_json`](Self::from_json) of those bytes is that object without
    /// serde's help, and then the object is well formed (its strings have no escapes, its
    /// only brackets are those of its two nested objects), so it ends at the `}` any
    /// bracket-counting tokenizer would end it at.
    pub(crate) fn read_prefix(json: &[u8]) -> Option<(Self, usize)> {
        let mut r = Reader { s: json, i: 0 };
        let w = r.usage()?;
        Some((w, r.i))
    }
}

/// The hand reader behind [`WireUsage::from_json`]. Each method returns `None` when it meets
/// anything it does not handle, which sends the whole object to serde: it only ever answers
/// for input where serde's answer is known to be the same. (So an optional field reads as
/// `Option<Option<_>>`: `None` for "ask serde", `Some(None)` for `null`.)
struct Reader<'a> {
    s: &'a [u8],
    i: usize,
}

#[allow(clippy::option_option)]
impl<'a> Reader<'a> {
    fn usage(&mut self) -> Option<WireUsage> {
        let mut w = WireUsage::default();
        let mut seen = 0_u8;
        self.object(|r, key| {
            let bit = match key {
                b"input_tokens" => 0,
                b"output_tokens" => 1,
                b"cache_creation_input_tokens" => 2,
                b"cache_read_input_tokens" => 3,
                b"cache_creation" => 4,
                b"server_tool_use" => 5,
                b"service_tier" => 6,
                _ => return r.skip_plain(),
            };
            // serde's derive rejects a field given twice (even as `null`).
            if seen & (1 << bit) != 0 {
                return None;
            }
            seen |= 1 << bit;
            match bit {
                0 => w.input_tokens = r.opt_u64()?,
                1 => w.output_tokens = r.opt_u64()?,
                2 => w.cache_creation_input_tokens = r.opt_u64()?,
                3 => w.cache_read_input_tokens = r.opt_u64()?,
                4 => {
                    w.cache_creation = r
                        .opt_pair(b"ephemeral_5m_input_tokens", b"ephemeral_1h_input_tokens")?
                        .map(|(a, b)| WireCacheCreation {
                            ephemeral_5m_input_tokens: a,
                            ephemeral_1h_input_tokens: b,
                        });
                }
                5 => {
                    w.server_tool_use = r
                        .opt_pair(b"web_search_requests", b"web_fetch_requests")?
                        .map(|(a, b)| WireServerToolUse {
                            web_search_requests: a,
                            web_fetch_requests: b,
                        });
                }
                _ => w.service_tier = r.opt_tier()?,
            }
            Some(())
        })?;
        Some(w)
    }

    /// Whether only whitespace is left.
    fn at_end(&mut self) -> bool {
        self.ws();
        self.i == self.s.len()
    }

    /// An object: `member` reads the value of each key (keys without escapes only).
    fn object(&mut self, mut member: impl FnMut(&mut Self, &'a [u8]) -> Option<()>) -> Option<()> {
        self.ws();
        self.byte(b'{')?;
        self.ws();
        if self.s.get(self.i) == Some(&b'}') {
            self.i += 1;
            return Some(());
        }
        loop {
            self.ws();
            let key = self.plain_str()?;
            self.ws();
            self.byte(b':')?;
            self.ws();
            member(self, key)?;
            self.ws();
            match self.s.get(self.i)? {
                b',' => self.i += 1,
                b'}' => {
                    self.i += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    /// `null` or an object with (at most) the two given `Option<u64>` fields.
    fn opt_pair(
        &mut self,
        first: &[u8],
        second: &[u8],
    ) -> Option<Option<(Option<u64>, Option<u64>)>> {
        if self.null()? {
            return Some(None);
        }
        let (mut a, mut b) = (None, None);
        let mut seen = 0_u8;
        self.object(|r, key| {
            let bit = if key == first {
                1
            } else if key == second {
                2
            } else {
                return r.skip_plain();
            };
            if seen & bit != 0 {
                return None;
            }
            seen |= bit;
            let v = r.opt_u64()?;
            *(if bit == 1 { &mut a } else { &mut b }) = v;
            Some(())
        })?;
        Some(Some((a, b)))
    }

    fn opt_u64(&mut self) -> Option<Option<u64>> {
        if self.null()? {
            return Some(None);
        }
        self.u64().map(Some)
    }

    fn opt_tier(&mut self) -> Option<Option<ServiceTier>> {
        if self.null()? {
            return Some(None);
        }
        Some(Some(match self.plain_str()? {
            b"standard" => ServiceTier::Standard,
            b"priority" => ServiceTier::Priority,
            b"batch" => ServiceTier::Batch,
            _ => ServiceTier::Other,
        }))
    }

    /// The value of an unknown key, which serde skips: only `null`, `true`, `false`, an
    /// unsigned integer or a plain string are read here.
    fn skip_plain(&mut self) -> Option<()> {
        match self.s.get(self.i)? {
            b'n' => self.word(b"null"),
            b't' => self.word(b"true"),
            b'f' => self.word(b"false"),
            b'"' => self.plain_str().map(drop),
            _ => self.u64().map(drop),
        }
    }

    /// Whether the value is `null` (then read). `None` for `n` not followed by `ull`.
    fn null(&mut self) -> Option<bool> {
        if self.s.get(self.i) == Some(&b'n') {
            self.word(b"null")?;
            return Some(true);
        }
        Some(false)
    }

    /// A JSON integer that fits in a `u64`: `0` or digits without a leading zero (what
    /// follows is checked by the caller: a `.`, `e` or any other byte is not a separator).
    fn u64(&mut self) -> Option<u64> {
        let first = *self.s.get(self.i)?;
        if !first.is_ascii_digit() {
            return None;
        }
        self.i += 1;
        let mut n = u64::from(first - b'0');
        if n == 0 {
            return Some(0);
        }
        while let Some(&d) = self.s.get(self.i)
            && d.is_ascii_digit()
        {
            n = n.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
            self.i += 1;
        }
        Some(n)
    }

    /// A string of printable ASCII without escapes (what serde reads as the same bytes).
    fn plain_str(&mut self) -> Option<&'a [u8]> {
        self.byte(b'"')?;
        let start = self.i;
        let len = string_stop_swar(&self.s[start..], true)?;
        self.i += len;
        self.byte(b'"')?;
        Some(&self.s[start..start + len])
    }

    fn word(&mut self, word: &[u8]) -> Option<()> {
        let end = self.i + word.len();
        (self.s.get(self.i..end)? == word).then(|| self.i = end)
    }

    fn byte(&mut self, b: u8) -> Option<()> {
        (*self.s.get(self.i)? == b).then(|| self.i += 1)
    }

    /// JSON whitespace (serde's set: no form feed).
    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.s.get(self.i) {
            self.i += 1;
        }
    }
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

    /// `from_json` is `serde_json::from_slice` for every input: usage objects as the API
    /// sends them and what it should not, then every one-byte edit of some of them (an edit
    /// that keeps the hand reader going must agree with serde; most send it to serde).
    #[test]
    fn from_json_is_serde() {
        let same = |json: &[u8]| {
            let serde = serde_json::from_slice::<WireUsage>(json).ok();
            assert_eq!(
                format!("{:?}", WireUsage::from_json(json)),
                format!("{serde:?}"),
                "{}",
                String::from_utf8_lossy(json)
            );
            // An object read in place is the one serde reads from those bytes alone.
            if let Some((w, n)) = WireUsage::read_prefix(json) {
                let serde = serde_json::from_slice::<WireUsage>(&json[..n]).ok();
                assert_eq!(format!("{:?}", Some(w)), format!("{serde:?}"));
                assert_eq!(json[n - 1], b'}');
            }
        };
        let read_by_hand = [
            r#"{"input_tokens":380,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"cache_creation":{"ephemeral_5m_input_tokens":0,"ephemeral_1h_input_tokens":0},"output_tokens":16,"service_tier":"standard"}"#,
            r#"{"input_tokens":12,"output_tokens":34,"server_tool_use":{"web_search_requests":2,"web_fetch_requests":1},"service_tier":"batch","unknown":null,"u2":true,"u3":false,"u4":"x","u5":7}"#,
            "{\n  \"input_tokens\" : null ,\r\n\t\"output_tokens\": 18446744073709551615, \"cache_creation\": null, \"server_tool_use\": {}, \"service_tier\": \"priority\"\n}\n",
            r#"{"service_tier":"flex","cache_creation":{"ephemeral_1h_input_tokens":5,"x":0}}"#,
            r#"{"service_tier":null,"service":"standard"}"#,
            "{}",
            " {} ",
        ];
        for json in read_by_hand {
            let mut r = Reader {
                s: json.as_bytes(),
                i: 0,
            };
            assert!(r.usage().is_some() && r.at_end(), "{json}");
            same(json.as_bytes());
        }
        for json in [
            r#"{"input_tokens":1,"input_tokens":2}"#,
            r#"{"output_tokens":null,"output_tokens":2}"#,
            r#"{"cache_creation":{"ephemeral_5m_input_tokens":1},"cache_creation":null}"#,
            r#"{"server_tool_use":{"web_fetch_requests":1,"web_fetch_requests":1}}"#,
            r#"{"service_tier":"batch","service_tier":"batch"}"#,
            r#"{"u":1,"u":2,"output_tokens":3}"#,
            r#"{"output_tokens":-1}"#,
            r#"{"output_tokens":-0}"#,
            r#"{"output_tokens":0}"#,
            r#"{"output_tokens":00}"#,
            r#"{"output_tokens":01}"#,
            r#"{"output_tokens":1.0}"#,
            r#"{"output_tokens":1e3}"#,
            r#"{"output_tokens":1E3}"#,
            r#"{"output_tokens":18446744073709551616}"#,
            r#"{"output_tokens":184467440737095516150}"#,
            r#"{"output_tokens":"1"}"#,
            r#"{"output_tokens":nul}"#,
            r#"{"output_tokens":nulll}"#,
            r#"{"output_tokens":1,}"#,
            r#"{,"output_tokens":1}"#,
            r#"{"output_tokens":1}}"#,
            r#"{"output_tokens":1} x"#,
            r#"{"output_tokens":1]"#,
            r#"{"output_tokens" 1}"#,
            r#"{"output_tokens":1 "input_tokens":2}"#,
            r#"{"output_tokens":1"#,
            r#"{"outp\u0075t_tokens":1}"#,
            r#"{"service_tier":"b\u0061tch"}"#,
            r#"{"service_tier":"batch\n"}"#,
            r#"{"service_tier":"ĉ"}"#,
            r#"{"service_tier":{"batch":null}}"#,
            r#"{"service_tier":1}"#,
            r#"{"cache_creation":[1,2]}"#,
            r#"{"cache_creation":true}"#,
            r#"[1,2,3,4,null,null,"batch"]"#,
            "[1]",
            r#"{"x":[1,{"a":"}"}],"y":{"z":-1.5e-3},"output_tokens":2}"#,
            r#"{"x":"é","output_tokens":2}"#,
            r#"{"x":"\"","output_tokens":2}"#,
            "{\"x\":\"\x01\",\"output_tokens\":2}",
            "{\"x\":\"\x7f\",\"output_tokens\":2}",
            "{\u{c}\"output_tokens\":2}",
            "null",
            "1",
            "\"usage\"",
            "",
            "{",
        ] {
            same(json.as_bytes());
        }
        for base in &read_by_hand[..4] {
            crate::skim::for_each_one_byte_edit(base.as_bytes(), &same);
        }
    }

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
