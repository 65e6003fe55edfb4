//! Counters behind `GET /mock/stats`: lock-free except for the rare unknown `/v1/*` path.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

/// What the mock has seen since it started or since the last reset: the JSON of
/// `GET /mock/stats` and the value of [`MockServer::stats`](crate::MockServer::stats).
///
/// Only requests to `/v1/*` are counted; `/mock/*` and other paths are not.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Every request received on `/v1/*`, whatever its outcome (errors and resets included).
    pub requests: u64,
    /// Requests per path (without the query string), e.g. `"/v1/messages"`.
    pub by_path: BTreeMap<String, u64>,
    /// Requests per response status (`"200"`, `"429"`, ...), plus `"reset"` for connections
    /// closed without a response by a `reset` fault and `"aborted"` for requests whose client
    /// went away before the response head was produced (while its body was read or during
    /// a scripted latency). The values add up to `requests` once no request is in flight.
    pub by_status: BTreeMap<String, u64>,
    /// 429s produced by the server-side rate limits (scripted 429s are not counted here).
    pub rate_limited: u64,
    /// The highest number of `/v1/*` requests processed at the same time, from the moment
    /// the request head arrived until the response body ended or was dropped (streams
    /// included).
    pub max_in_flight: u64,
    /// `/v1/*` requests being processed now (not reset by a stats reset).
    pub in_flight: u64,
    /// The usage the clients could read from the bytes the mock wrote (see the crate docs).
    pub usage: UsageTotals,
}

/// Sums of the usage fields of `/v1/messages` answers, as written to the clients.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageTotals {
    /// Sum of `input_tokens`.
    pub input_tokens: u64,
    /// Sum of `output_tokens`.
    pub output_tokens: u64,
    /// Sum of `cache_creation_input_tokens`.
    pub cache_creation_input_tokens: u64,
    /// Sum of `cache_read_input_tokens`.
    pub cache_read_input_tokens: u64,
}

/// The usage figures of one answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct UsageFigures {
    pub(crate) input: u64,
    pub(crate) cache_creation: u64,
    pub(crate) cache_read: u64,
    pub(crate) output: u64,
}

/// The paths counted without a lock.
const KNOWN_PATHS: [&str; 3] = ["/v1/messages", "/v1/messages/count_tokens", "/v1/models"];
/// Slots: statuses 0..=599, then reset, then aborted.
const RESET_SLOT: usize = 600;
const ABORTED_SLOT: usize = 601;
const STATUS_SLOTS: usize = 602;

/// The live counters.
#[derive(Debug)]
pub(crate) struct StatsRecorder {
    requests: AtomicU64,
    known_paths: [AtomicU64; KNOWN_PATHS.len()],
    other_paths: Mutex<HashMap<String, u64>>,
    statuses: Box<[AtomicU64]>,
    rate_limited: AtomicU64,
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
    // Signed: a stream's message_delta replaces the message_start figures, which may lower
    // a sum (1 placeholder output token replaced by 0) right after a reset.
    input: AtomicI64,
    output: AtomicI64,
    cache_creation: AtomicI64,
    cache_read: AtomicI64,
}

impl Default for StatsRecorder {
    fn default() -> Self {
        Self {
            requests: AtomicU64::new(0),
            known_paths: Default::default(),
            other_paths: Mutex::new(HashMap::new()),
            statuses: (0..STATUS_SLOTS).map(|_| AtomicU64::new(0)).collect(),
            rate_limited: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            max_in_flight: AtomicU64::new(0),
            input: AtomicI64::new(0),
            output: AtomicI64::new(0),
            cache_creation: AtomicI64::new(0),
            cache_read: AtomicI64::new(0),
        }
    }
}

fn clamp(v: &AtomicI64) -> u64 {
    u64::try_from(v.load(Relaxed)).unwrap_or(0)
}

fn signed(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl StatsRecorder {
    /// Counts a `/v1/*` request and marks it in flight until the guard drops.
    pub(crate) fn begin(self: &Arc<Self>, path: &str) -> InFlight {
        self.requests.fetch_add(1, Relaxed);
        if let Some(i) = KNOWN_PATHS.iter().position(|p| *p == path) {
            self.known_paths[i].fetch_add(1, Relaxed);
        } else if let Ok(mut other) = self.other_paths.lock() {
            *other.entry(path.to_owned()).or_insert(0) += 1;
        }
        let now = self.in_flight.fetch_add(1, Relaxed) + 1;
        self.max_in_flight.fetch_max(now, Relaxed);
        InFlight {
            stats: Arc::clone(self),
            outcome_recorded: false,
        }
    }

    pub(crate) fn record_rate_limited(&self) {
        self.rate_limited.fetch_add(1, Relaxed);
    }

    /// Adds the usage of a fully written JSON answer or `message_start` event.
    pub(crate) fn add_usage(&self, u: &UsageFigures) {
        self.input.fetch_add(signed(u.input), Relaxed);
        self.output.fetch_add(signed(u.output), Relaxed);
        self.cache_creation
            .fetch_add(signed(u.cache_creation), Relaxed);
        self.cache_read.fetch_add(signed(u.cache_read), Relaxed);
    }

    /// Replaces, field by field, figures added before by `add_usage` with later ones (a
    /// `message_delta` after its `message_start`).
    pub(crate) fn replace_usage(&self, before: &UsageFigures, after: &UsageFigures) {
        let pairs = [
            (&self.input, before.input, after.input),
            (&self.output, before.output, after.output),
            (
                &self.cache_creation,
                before.cache_creation,
                after.cache_creation,
            ),
            (&self.cache_read, before.cache_read, after.cache_read),
        ];
        for (sum, old, new) in pairs {
            if old != new {
                sum.fetch_add(signed(new) - signed(old), Relaxed);
            }
        }
    }

    pub(crate) fn snapshot(&self) -> Stats {
        let mut by_path = BTreeMap::new();
        for (path, count) in KNOWN_PATHS.iter().zip(&self.known_paths) {
            let count = count.load(Relaxed);
            if count > 0 {
                by_path.insert((*path).to_owned(), count);
            }
        }
        if let Ok(other) = self.other_paths.lock() {
            by_path.extend(other.iter().map(|(k, v)| (k.clone(), *v)));
        }
        let mut by_status = BTreeMap::new();
        for (slot, count) in self.statuses.iter().enumerate() {
            let count = count.load(Relaxed);
            if count == 0 {
                continue;
            }
            let key = match slot {
                RESET_SLOT => "reset".to_owned(),
                ABORTED_SLOT => "aborted".to_owned(),
                status => status.to_string(),
            };
            by_status.insert(key, count);
        }
        Stats {
            requests: self.requests.load(Relaxed),
            by_path,
            by_status,
            rate_limited: self.rate_limited.load(Relaxed),
            max_in_flight: self.max_in_flight.load(Relaxed),
            in_flight: self.in_flight.load(Relaxed),
            usage: UsageTotals {
                input_tokens: clamp(&self.input),
                output_tokens: clamp(&self.output),
                cache_creation_input_tokens: clamp(&self.cache_creation),
                cache_read_input_tokens: clamp(&self.cache_read),
            },
        }
    }

    /// Zeroes every counter; `max_in_flight` restarts from the requests in flight now.
    pub(crate) fn reset(&self) {
        self.requests.store(0, Relaxed);
        for count in &self.known_paths {
            count.store(0, Relaxed);
        }
        if let Ok(mut other) = self.other_paths.lock() {
            other.clear();
        }
        for count in &self.statuses {
            count.store(0, Relaxed);
        }
        self.rate_limited.store(0, Relaxed);
        self.max_in_flight
            .store(self.in_flight.load(Relaxed), Relaxed);
        for sum in [
            &self.input,
            &self.output,
            &self.cache_creation,
            &self.cache_read,
        ] {
            sum.store(0, Relaxed);
        }
    }
}

/// One `/v1/*` request in flight: counted in `in_flight` until dropped. Its outcome (a
/// status, or a reset) is recorded once; a guard dropped without one records `aborted`.
#[derive(Debug)]
pub(crate) struct InFlight {
    stats: Arc<StatsRecorder>,
    outcome_recorded: bool,
}

impl InFlight {
    pub(crate) fn record_status(&mut self, status: u16) {
        self.record_slot(usize::from(status).min(RESET_SLOT - 1));
    }

    pub(crate) fn record_reset(&mut self) {
        self.record_slot(RESET_SLOT);
    }

    fn record_slot(&mut self, slot: usize) {
        if !std::mem::replace(&mut self.outcome_recorded, true) {
            self.stats.statuses[slot].fetch_add(1, Relaxed);
        }
    }

    pub(crate) fn stats(&self) -> &StatsRecorder {
        &self.stats
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.record_slot(ABORTED_SLOT);
        self.stats.in_flight.fetch_sub(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_paths_statuses_and_in_flight() {
        let stats = Arc::new(StatsRecorder::default());
        let mut a = stats.begin("/v1/messages");
        let mut b = stats.begin("/v1/other");
        let c = stats.begin("/v1/messages");
        a.record_status(200);
        b.record_reset();
        b.record_status(500); // ignored: outcome already recorded
        drop((a, b, c));
        let s = stats.snapshot();
        assert_eq!(s.requests, 3);
        assert_eq!(s.by_path["/v1/messages"], 2);
        assert_eq!(s.by_path["/v1/other"], 1);
        assert_eq!(s.by_status["200"], 1);
        assert_eq!(s.by_status["reset"], 1);
        assert_eq!(s.by_status["aborted"], 1);
        assert!(!s.by_status.contains_key("500"));
        assert_eq!(s.max_in_flight, 3);
        assert_eq!(s.in_flight, 0);
        stats.reset();
        assert_eq!(stats.snapshot(), Stats::default());
    }

    #[test]
    fn usage_replacement_is_field_by_field() {
        let stats = StatsRecorder::default();
        let start = UsageFigures {
            input: 10,
            cache_creation: 2,
            cache_read: 3,
            output: 1,
        };
        let end = UsageFigures { output: 7, ..start };
        stats.add_usage(&start);
        stats.replace_usage(&start, &end);
        let u = stats.snapshot().usage;
        assert_eq!(
            (
                u.input_tokens,
                u.output_tokens,
                u.cache_creation_input_tokens,
                u.cache_read_input_tokens
            ),
            (10, 7, 2, 3)
        );
    }
}
