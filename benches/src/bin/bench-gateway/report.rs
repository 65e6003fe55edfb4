//! Markdown output, ready to paste into BENCHMARKS.md.

use std::fmt::Write;
use std::time::Duration;

use crate::load::Shape;
use crate::servers::Kind;
use crate::{Plan, Row, Scenario};

const KINDS: [Scenario; 3] = [Scenario::Mock, Scenario::Proxy, Scenario::Gateway];

fn name(kind: Scenario) -> &'static str {
    match kind {
        Scenario::Mock => "(a) mock",
        Scenario::Proxy => "(b) hyper proxy",
        Scenario::Gateway => "(c) claude-gateway",
        Scenario::GatewayHit => "(c) gateway, cache hits",
    }
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

fn q(row: &Row, quantile: f64) -> u64 {
    row.outcome.latency.value_at_quantile(quantile)
}

/// One line per step, for the log.
pub(crate) fn progress(row: &Row) -> String {
    let o = &row.outcome;
    let relay = row
        .cpu_us
        .0
        .map_or(String::new(), |c| format!(" relay {c:.0} µs CPU/req,"));
    format!(
        "{:<20} {:<4} {:>6} req/s: achieved {:>8.0}, p50 {:.3} p99 {:.3} p99.9 {:.3} ms,{relay} mock {:.0} µs CPU/req, {:.1} switches/req, generator {:.0} µs CPU/req, pacer p99 lag {:.3} ms, {} ok {} err {} dropped{}{}",
        name(row.kind),
        row.shape.label(),
        row.rate,
        o.achieved,
        ms(q(row, 0.5)),
        ms(q(row, 0.99)),
        ms(q(row, 0.999)),
        row.cpu_us.1,
        row.switches,
        row.generator_cpu_us,
        ms(o.pacer_lag.value_at_quantile(0.99)),
        o.ok,
        o.errors,
        o.dropped,
        if row.sustained { "" } else { "  NOT SUSTAINED" },
        o.first_error
            .as_ref()
            .map_or(String::new(), |e| format!(" (first error: {e})")),
    )
}

/// The highest rate `kind` sustained with `shape`.
pub(crate) fn highest(rows: &[Row], kind: Scenario, shape: Shape) -> Option<u64> {
    rows.iter()
        .filter(|r| r.kind == kind && r.shape == shape && r.sustained)
        .map(|r| r.rate)
        .max()
}

/// The lowest rate `kind` failed at with `shape` (after its retry): the ladder's first
/// failure, or a lower rate that failed while the gap below it was narrowed.
pub(crate) fn failed_at(rows: &[Row], kind: Scenario, shape: Shape) -> Option<u64> {
    // A failed step is retried once: a rate counts as failed when its last row failed.
    rows.iter()
        .filter(|r| r.kind == kind && r.shape == shape)
        .map(|r| r.rate)
        .filter(|&rate| last_row(rows, kind, shape, rate).is_some_and(|r| !r.sustained))
        .min()
}

/// The rate halfway between a sustained rate `lo` and a failed rate `hi`, rounded down to a
/// multiple of [`REFINE_UNIT`]; `None` when no such rate lies strictly between them.
pub(crate) fn between(lo: u64, hi: u64) -> Option<u64> {
    let mid = u64::midpoint(lo, hi) / REFINE_UNIT * REFINE_UNIT;
    (mid > lo && mid < hi).then_some(mid)
}

/// The finest step (req/s) by which a highest sustained rate is narrowed.
pub(crate) const REFINE_UNIT: u64 = 500;

/// The last row of `kind` at `rate` (the retry, when there was one).
fn last_row(rows: &[Row], kind: Scenario, shape: Shape, rate: u64) -> Option<&Row> {
    rows.iter()
        .rev()
        .find(|r| r.kind == kind && r.shape == shape && r.rate == rate)
}

/// Memory of one server process.
#[derive(Debug)]
pub(crate) struct Memory {
    pub(crate) kind: Kind,
    pub(crate) idle_kb: u64,
    pub(crate) end_kb: u64,
    pub(crate) peak_kb: u64,
}

/// Everything a ladder run prints.
#[derive(Debug)]
pub(crate) struct Report<'a> {
    pub(crate) plan: &'a Plan,
    pub(crate) rows: &'a [Row],
    pub(crate) target_rows: &'a [Row],
    pub(crate) memory: &'a [Memory],
    pub(crate) cache: bool,
    pub(crate) layers: String,
    pub(crate) elapsed: Duration,
    pub(crate) command: String,
}

/// The machine, as this process sees it.
pub(crate) fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map_or("unknown", |v| v.trim_start_matches([' ', '\t', ':']).trim());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kb = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{cpus} CPUs ({model}), {:.1} GiB memory, Linux {}",
        mem_kb as f64 / 1024.0 / 1024.0,
        kernel.trim()
    )
}

impl Report<'_> {
    pub(crate) fn markdown(&self) -> String {
        let mut s = String::new();
        let p = self.plan;
        let _ = writeln!(s, "### bench-gateway results\n");
        let _ = writeln!(s, "- machine: {}", machine());
        let _ = writeln!(
            s,
            "- command: `bench-gateway {}` ({:.0} s in all)",
            self.command,
            self.elapsed.as_secs_f64()
        );
        let _ = writeln!(
            s,
            "- steps: {:.1} s recorded after {:.1} s of warm-up; {} keep-alive HTTP/1.1 connections; open loop, latency from each request's intended send time to the end of its body (coordinated omission corrected)",
            p.step.as_secs_f64(),
            p.warmup.as_secs_f64(),
            p.connections
        );
        let _ = writeln!(
            s,
            "- answers: {} output tokens (an SSE answer is {} events, one per frame); ~1.5 KB requests, each distinct",
            p.output_tokens,
            p.output_tokens + 6
        );
        let _ = writeln!(
            s,
            "- sustained: achieved ≥ 95% of the offered rate, no error, p99 ≤ {:.0} ms",
            p.p99_bound.as_secs_f64() * 1000.0
        );
        let _ = writeln!(
            s,
            "- (c) claude-gateway layers: {}{}",
            self.layers,
            if self.cache {
                "; the requests are distinct, so (c) is the cache's miss path; the hit path is a row of its own at the target rate"
            } else {
                ""
            }
        );
        let _ = writeln!(
            s,
            "- added latency = the percentile of (b) or (c) minus the same percentile of (a), at the same offered rate in the same run"
        );

        for &shape in &p.shapes {
            self.shape_tables(&mut s, shape);
        }

        let _ = writeln!(s, "\n#### Highest sustained rate (req/s)\n");
        let mut head = String::from("| scenario |");
        let mut rule = String::from("|---|");
        for shape in &p.shapes {
            let _ = write!(head, " {} |", shape.label());
            rule.push_str("---:|");
        }
        let _ = writeln!(s, "{head}\n{rule}");
        for kind in KINDS {
            let mut line = format!("| {} |", name(kind));
            for &shape in &p.shapes {
                let top = p.rates.iter().max().copied().unwrap_or(0);
                let cell = match (
                    highest(self.rows, kind, shape),
                    failed_at(self.rows, kind, shape),
                ) {
                    (Some(h), Some(f)) => format!("{h} (failed at {f})"),
                    (Some(h), None) if h == top => format!("≥ {h} (top of the ladder)"),
                    (Some(h), None) => h.to_string(),
                    (None, Some(f)) => format!("< {f}"),
                    (None, None) => "–".into(),
                };
                let _ = write!(line, " {cell} |");
            }
            let _ = writeln!(s, "{line}");
        }

        self.targets(&mut s);

        let _ = writeln!(s, "\n#### Memory of each server process (MiB)\n");
        let _ = writeln!(
            s,
            "| process | RSS idle | RSS at the end | peak RSS (VmHWM) |"
        );
        let _ = writeln!(s, "|---|---:|---:|---:|");
        for m in self.memory {
            let _ = writeln!(
                s,
                "| {} | {:.1} | {:.1} | {:.1} |",
                match m.kind {
                    Kind::Mock => "claude-mock (shared upstream of all three)",
                    Kind::Proxy => "(b) hyper proxy",
                    Kind::Gateway => "(c) claude-gateway",
                },
                m.idle_kb as f64 / 1024.0,
                m.end_kb as f64 / 1024.0,
                m.peak_kb as f64 / 1024.0
            );
        }
        let _ = writeln!(
            s,
            "\nEach server runs in its own child process; the load generator's memory is not included."
        );
        s
    }

    fn shape_tables(&self, s: &mut String, shape: Shape) {
        let rates: Vec<u64> = {
            let mut r: Vec<u64> = self
                .rows
                .iter()
                .filter(|r| r.shape == shape)
                .map(|r| r.rate)
                .collect();
            r.sort_unstable();
            r.dedup();
            r
        };
        let _ = writeln!(
            s,
            "\n#### {}: added latency over the mock alone (ms)\n",
            shape.label()
        );
        let _ = writeln!(
            s,
            "| offered req/s | (a) p50 | (a) p99 | (a) p99.9 | (b)−(a) p50 | (b)−(a) p99 | (b)−(a) p99.9 | (c)−(a) p50 | (c)−(a) p99 | (c)−(a) p99.9 |"
        );
        let _ = writeln!(s, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for &rate in &rates {
            let a = last_row(self.rows, Scenario::Mock, shape, rate);
            let mut line = format!("| {rate} |");
            for quantile in [0.5, 0.99, 0.999] {
                let cell = a.map_or("–".into(), |a| format!("{:.3}", ms(q(a, quantile))));
                let _ = write!(line, " {cell} |");
            }
            for kind in [Scenario::Proxy, Scenario::Gateway] {
                let r = last_row(self.rows, kind, shape, rate);
                for quantile in [0.5, 0.99, 0.999] {
                    let cell = match (a, r) {
                        (Some(a), Some(r)) => {
                            let d = q(r, quantile) as f64 - q(a, quantile) as f64;
                            let mark = if r.sustained { "" } else { " ✗" };
                            format!("{:+.3}{mark}", d / 1e6)
                        }
                        _ => "–".into(),
                    };
                    let _ = write!(line, " {cell} |");
                }
            }
            let _ = writeln!(s, "{line}");
        }
        let _ = writeln!(s, "\n✗: that scenario did not sustain the rate.");

        let _ = writeln!(
            s,
            "\n#### {}: every step (latency in ms; CPU in µs per request)\n",
            shape.label()
        );
        let _ = writeln!(
            s,
            "| scenario | offered req/s | achieved | p50 | p90 | p99 | p99.9 | max | relay CPU | mock CPU | generator CPU | switches/req | errors | sustained |"
        );
        let _ = writeln!(
            s,
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
        );
        for r in self
            .rows
            .iter()
            .chain(self.target_rows)
            .filter(|r| r.shape == shape)
        {
            let o = &r.outcome;
            let _ = writeln!(
                s,
                "| {} | {} | {:.0} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {} | {:.0} | {:.0} | {:.1} | {} | {} |",
                name(r.kind),
                r.rate,
                o.achieved,
                ms(q(r, 0.5)),
                ms(q(r, 0.9)),
                ms(q(r, 0.99)),
                ms(q(r, 0.999)),
                ms(o.latency.max()),
                r.cpu_us.0.map_or("–".into(), |c| format!("{c:.0}")),
                r.cpu_us.1,
                r.generator_cpu_us,
                r.switches,
                o.errors + o.dropped,
                if r.sustained { "yes" } else { "no" },
            );
        }
        let lag: Vec<String> = self
            .rows
            .iter()
            .filter(|r| r.shape == shape && r.kind == Scenario::Mock)
            .map(|r| {
                format!(
                    "{}: {:.3}",
                    r.rate,
                    ms(r.outcome.pacer_lag.value_at_quantile(0.99))
                )
            })
            .collect();
        let _ = writeln!(
            s,
            "\nThe instrument's floor, pacer release lateness p99 (ms) by rate, (a) steps: {}",
            lag.join(", ")
        );
    }

    fn targets(&self, s: &mut String) {
        let _ = writeln!(s, "\n#### The issue's targets, as ratios in this run\n");
        let _ = writeln!(s, "| target | shape | measured | met |");
        let _ = writeln!(s, "|---|---|---|---|");
        for &shape in &self.plan.shapes {
            let b = highest(self.rows, Scenario::Proxy, shape);
            let c = highest(self.rows, Scenario::Gateway, shape);
            // A proxy that sustained the ladder's top has a highest rate of at least that.
            let capped = b.is_some() && failed_at(self.rows, Scenario::Proxy, shape).is_none();
            let (measured, met) = match (b, c) {
                (Some(b), Some(c)) => throughput_verdict(b, c, capped),
                (Some(b), None) => (format!("(c) sustained no rate; (b) {b}"), "no"),
                _ => ("(b) sustained no rate".into(), "n/a"),
            };
            let _ = writeln!(
                s,
                "| (c) sustains ≥ 80% of (b)'s highest rate | {} | {measured} | {met} |",
                shape.label()
            );
        }
        for &shape in &self.plan.shapes {
            let a = self
                .target_rows
                .iter()
                .find(|r| r.shape == shape && r.kind == Scenario::Mock);
            let c = self
                .target_rows
                .iter()
                .find(|r| r.shape == shape && r.kind == Scenario::Gateway);
            let b = self
                .target_rows
                .iter()
                .find(|r| r.shape == shape && r.kind == Scenario::Proxy);
            let (measured, met) = match (a, c) {
                (Some(a), Some(c)) => {
                    let added = (q(c, 0.99) as f64 - q(a, 0.99) as f64) / 1e6;
                    let proxy = b.map_or(String::new(), |b| {
                        format!(
                            "; (b) adds {:+.3} ms",
                            (q(b, 0.99) as f64 - q(a, 0.99) as f64) / 1e6
                        )
                    });
                    let capped = failed_at(self.rows, Scenario::Proxy, shape).is_none();
                    let below = if capped {
                        " ((b) never failed: this rate may be below half its highest)"
                    } else {
                        ""
                    };
                    (
                        format!(
                            "at {} req/s{below}: (a) p99 {:.3} ms, (c) p99 {:.3} ms: (c) adds {added:+.3} ms{proxy}",
                            a.rate,
                            ms(q(a, 0.99)),
                            ms(q(c, 0.99))
                        ),
                        latency_verdict(added <= 1.0 && c.sustained, capped),
                    )
                }
                _ => ("not run ((b) sustained no rate)".into(), "n/a"),
            };
            let _ = writeln!(
                s,
                "| at half (b)'s highest rate, (c) adds ≤ 1 ms p99 over (a) | {} | {measured} | {met} |",
                shape.label()
            );
        }
    }
}

/// The latency target's verdict: a pass at a rate that may be below half (b)'s highest
/// (`capped`: (b) never failed) does not establish it.
fn latency_verdict(pass: bool, capped: bool) -> &'static str {
    match (pass, capped) {
        (false, _) => "no",
        (true, false) => "yes",
        (true, true) => "not established: (b) never failed; add higher `--rates`",
    }
}

/// The throughput target's cell and verdict for (b)'s highest rate `b` and (c)'s `c`. When
/// (b) never failed (`capped`), its highest rate is only a lower bound, so the ratio is an
/// upper bound: it can show a miss, never a pass.
fn throughput_verdict(b: u64, c: u64, capped: bool) -> (String, &'static str) {
    let ratio = c as f64 / b as f64;
    let pct = ratio * 100.0;
    match (capped, ratio >= 0.8) {
        (false, pass) => (
            format!("(c) {c} / (b) {b} = {pct:.0}%"),
            if pass { "yes" } else { "no" },
        ),
        (true, pass) => (
            format!("(c) {c} / (b) ≥ {b} (the top of the ladder) ≤ {pct:.0}%"),
            if pass {
                "not established: (b) never failed; add higher `--rates`"
            } else {
                "no"
            },
        ),
    }
}

/// One sample of the memory soak.
#[derive(Debug)]
pub(crate) struct SoakSample {
    pub(crate) at: Duration,
    pub(crate) rss_kb: u64,
    pub(crate) hwm_kb: u64,
    pub(crate) p99_ns: u64,
    pub(crate) ok: u64,
    pub(crate) errors: u64,
}

pub(crate) fn soak_markdown(
    samples: &[SoakSample],
    rate: u64,
    cache_mib: Option<u64>,
    command: &str,
) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "### bench-gateway memory soak\n");
    let _ = writeln!(s, "- machine: {}", machine());
    let _ = writeln!(s, "- command: `bench-gateway {command}`");
    let _ = writeln!(
        s,
        "- claude-gateway (every layer on; cache: {}) at {rate} req/s of distinct JSON requests; RSS of the gateway process sampled every 10 s\n",
        cache_mib.map_or("off".to_owned(), |m| format!(
            "ON, max_bytes {m} MiB, so it is full early"
        ))
    );
    let _ = writeln!(
        s,
        "| t (s) | RSS (MiB) | peak RSS (MiB) | window p99 (ms) | ok | errors |"
    );
    let _ = writeln!(s, "|---:|---:|---:|---:|---:|---:|");
    for x in samples {
        let _ = writeln!(
            s,
            "| {:.0} | {:.1} | {:.1} | {:.3} | {} | {} |",
            x.at.as_secs_f64(),
            x.rss_kb as f64 / 1024.0,
            x.hwm_kb as f64 / 1024.0,
            ms(x.p99_ns),
            x.ok,
            x.errors
        );
    }
    // Growth after the first minute under load (the warm-up: pools, allocator arenas).
    let warm = samples.iter().find(|x| x.at >= Duration::from_secs(60));
    let last = samples.last();
    if let (Some(w), Some(l)) = (warm, last) {
        let max_after = samples
            .iter()
            .filter(|x| x.at >= w.at)
            .map(|x| x.rss_kb)
            .max()
            .unwrap_or(w.rss_kb);
        let _ = writeln!(
            s,
            "\nRSS at {:.0} s: {:.1} MiB; at the end ({:.0} s): {:.1} MiB; growth {:+.1} MiB; highest after the first minute {:.1} MiB ({:+.1} MiB over the {:.0} s sample).",
            w.at.as_secs_f64(),
            w.rss_kb as f64 / 1024.0,
            l.at.as_secs_f64(),
            l.rss_kb as f64 / 1024.0,
            (l.rss_kb as f64 - w.rss_kb as f64) / 1024.0,
            max_after as f64 / 1024.0,
            (max_after as f64 - w.rss_kb as f64) / 1024.0,
            w.at.as_secs_f64(),
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::{between, failed_at, highest, latency_verdict, throughput_verdict};
    use crate::load::{Outcome, Shape, histogram};
    use crate::{Row, Scenario};

    fn row(rate: u64, sustained: bool) -> Row {
        Row {
            kind: Scenario::Gateway,
            shape: Shape::Json,
            rate,
            outcome: Outcome {
                latency: histogram(),
                pacer_lag: histogram(),
                ok: 1,
                errors: 0,
                dropped: 0,
                completed_total: 1,
                achieved: rate as f64,
                first_error: None,
            },
            cpu_us: (None, 0.0),
            generator_cpu_us: 0.0,
            switches: 0.0,
            sustained,
        }
    }

    #[test]
    fn the_gap_between_rungs_is_halved_to_a_multiple_of_500() {
        assert_eq!(between(20_000, 24_000), Some(22_000));
        assert_eq!(between(22_000, 24_000), Some(23_000));
        assert_eq!(between(4_000, 6_000), Some(5_000));
        assert_eq!(between(5_000, 6_000), Some(5_500));
        assert_eq!(between(5_500, 6_000), None);
        assert_eq!(between(23_000, 24_000), Some(23_500));
        assert_eq!(between(500, 1_000), None);
    }

    #[test]
    fn a_narrowed_rate_replaces_the_rungs_in_the_highest_and_the_failure() {
        // The ladder: 20,000 sustained, 24,000 failed twice; then 22,000 sustained and
        // 23,000 failed once and passed on its retry, so 23,000 counts as sustained.
        let rows = vec![
            row(16_000, true),
            row(20_000, true),
            row(24_000, false),
            row(24_000, false),
            row(22_000, true),
            row(23_000, false),
            row(23_000, true),
        ];
        let (kind, shape) = (Scenario::Gateway, Shape::Json);
        assert_eq!(highest(&rows, kind, shape), Some(23_000));
        assert_eq!(failed_at(&rows, kind, shape), Some(24_000));
        // A narrowed rate that failed is the lowest failure.
        let mut rows = rows;
        rows.push(row(23_500, false));
        rows.push(row(23_500, false));
        assert_eq!(failed_at(&rows, kind, shape), Some(23_500));
        assert_eq!(highest(&rows, kind, shape), Some(23_000));
    }

    #[test]
    fn a_ratio_against_a_proxy_that_never_failed_cannot_pass() {
        assert_eq!(throughput_verdict(20_000, 16_000, false).1, "yes");
        assert_eq!(throughput_verdict(20_000, 15_000, false).1, "no");
        let (cell, met) = throughput_verdict(24_000, 20_000, true);
        assert!(met.starts_with("not established"), "{met}");
        assert!(cell.contains("≥ 24000") && cell.contains("≤ 83%"), "{cell}");
        assert_eq!(throughput_verdict(24_000, 16_000, true).1, "no");
    }

    #[test]
    fn a_latency_pass_below_half_an_unknown_rate_is_not_established() {
        assert_eq!(latency_verdict(true, false), "yes");
        assert_eq!(latency_verdict(false, false), "no");
        assert_eq!(latency_verdict(false, true), "no");
        assert!(latency_verdict(true, true).starts_with("not established"));
    }
}
