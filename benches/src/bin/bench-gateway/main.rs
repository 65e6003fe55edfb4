//! `bench-gateway`: what claude-gateway adds to a request, measured against the mock alone
//! and against a bare hyper pass-through proxy, in one run on this machine.
//!
//! Run it as `cargo xtask bench-gateway [--quick]` (a release build); `--help` lists the
//! settings. Scenarios, each server in its own child process of this binary:
//!
//! - (a) `claude-mock` alone;
//! - (b) a bare hyper pass-through proxy in front of the mock (the floor any relay pays);
//! - (c) `claude-gateway` with every layer on (cost with a budget, retry, per-attempt
//!   timeout, rate limit far above the load, API key from a file source, the cache (distinct
//!   requests: its miss path; the hit path is an extra row at the target rate), Prometheus
//!   metrics) in front of the mock. `--layers` switches layers off to see what each costs.
//!
//! The load generator (this process) is open-loop with a fixed pool of keep-alive
//! connections and corrects for coordinated omission (see `load.rs`). Rates climb a ladder,
//! interleaving the scenarios at each rate so they see the same machine; a scenario
//! *sustains* a rate when it completes at least 95% of the offered requests per second with
//! no error and a p99 below `--p99-bound-ms` (default 10 ms); a failed step is tried once
//! more before the scenario stops climbing. Then the three scenarios run again at half the
//! proxy's highest sustained rate, the latency target. Results print as markdown.
//!
//! `--soak-memory` instead runs the gateway at a fixed rate for 5 minutes and samples its
//! resident memory every 10 s.

mod load;
mod report;
mod servers;

#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::io::{BufReader, Write};
use std::net::SocketAddr;
use std::process::{Child as Process, ChildStdin, ChildStdout, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;

use crate::load::{Shape, Step};
use crate::servers::{Kind, Layer, ServeArgs};

/// The layers of (c), for the report.
fn layers_text(layers: &[Layer]) -> String {
    let mut names: Vec<&str> = vec!["API key (file source)"];
    for (l, text) in [
        (Layer::Cost, "cost (global budget)"),
        (Layer::Cache, "cache"),
        (Layer::Retry, "retry"),
        (Layer::RateLimit, "rate limit (limits far above the load)"),
    ] {
        if layers.contains(&l) {
            names.push(text);
        }
    }
    names.push("per-attempt timeout, Prometheus metrics");
    names.join(", ")
}

/// The flag value of a layer.
pub(crate) fn layer_name(l: Layer) -> &'static str {
    match l {
        Layer::Cost => "cost",
        Layer::Cache => "cache",
        Layer::Retry => "retry",
        Layer::RateLimit => "rate-limit",
        Layer::ApiKey => "api-key",
    }
}

/// Open-loop load benchmark of claude-gateway against claude-mock and a bare hyper proxy.
#[derive(Debug, Clone, Parser)]
#[command(name = "bench-gateway")]
struct Args {
    /// About a minute and a half: a short ladder, 1.5 s steps.
    #[arg(long)]
    quick: bool,
    /// Offered rates in requests per second, comma-separated (default: the quick or the
    /// full ladder).
    #[arg(long, value_delimiter = ',')]
    rates: Vec<u64>,
    /// Seconds recorded per step (default 1.5 quick, 5 full).
    #[arg(long)]
    step_secs: Option<f64>,
    /// Seconds of warm-up per step, sent but not recorded (default 0.5 quick, 1 full).
    #[arg(long)]
    warmup_secs: Option<f64>,
    /// Seconds recorded in the target step at half the proxy's highest rate (default 3
    /// quick, 10 full).
    #[arg(long)]
    target_secs: Option<f64>,
    /// Keep-alive connections of the load generator.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Output tokens of each answer (an SSE answer has this many text deltas plus 6
    /// events).
    #[arg(long, default_value_t = 16)]
    output_tokens: u64,
    /// The p99 (ms) above which a step does not count as sustained.
    #[arg(long, default_value_t = 10.0)]
    p99_bound_ms: f64,
    /// Scenarios to run (all three by default; one alone is for profiling).
    #[arg(long, value_delimiter = ',', default_values = ["mock", "proxy", "gateway"])]
    scenarios: Vec<Kind>,
    /// Request shapes to run.
    #[arg(long, value_delimiter = ',', default_values = ["json", "sse"])]
    shapes: Vec<Shape>,
    /// Memory soak: the gateway alone at a fixed rate, RSS sampled every 10 s.
    #[arg(long)]
    soak_memory: bool,
    /// Soak duration in seconds.
    #[arg(long, default_value_t = 300)]
    soak_secs: u64,
    /// Soak rate in requests per second (JSON, distinct requests).
    #[arg(long, default_value_t = 1000)]
    soak_rate: u64,
    /// The gateway cache's size in the soak, MiB (small, so that it is full early).
    #[arg(long, default_value_t = 32)]
    soak_cache_mib: u64,
    /// The layers of claude-gateway (c) that are on (the API key layer always is).
    #[arg(
        long,
        value_delimiter = ',',
        default_values = ["cost", "cache", "retry", "rate-limit", "api-key"]
    )]
    layers: Vec<Layer>,
    /// Worker threads of each server's tokio runtime (default: tokio's, one per core).
    #[arg(long)]
    server_threads: Option<usize>,
    /// The gateway cache's size in the ladder, MiB (default: the cache's own default, 256
    /// MiB; a small one is full, and evicting, from the first steps on).
    #[arg(long)]
    cache_mib: Option<u64>,
    /// Internal: run one server in this process (a child of the benchmark).
    #[arg(long, hide = true)]
    serve: Option<Kind>,
    /// Internal: the upstream URL of a `--serve proxy|gateway` child.
    #[arg(long, hide = true)]
    upstream: Option<String>,
    /// Internal: a child exits by itself after this many seconds.
    #[arg(long, hide = true, default_value_t = 3600)]
    max_lifetime_secs: u64,
    /// Internal: the `max_bytes` of a `--serve gateway` child's cache.
    #[arg(long, hide = true)]
    cache_max_bytes: Option<u64>,
}

/// A measured scenario: which server the load goes to, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scenario {
    /// (a) the mock alone.
    Mock,
    /// (b) the bare proxy in front of the mock.
    Proxy,
    /// (c) the gateway in front of the mock, distinct requests (the cache's miss path).
    Gateway,
    /// (c) with the same request every time: the cache's hit path.
    GatewayHit,
}

impl Scenario {
    fn server(self) -> Kind {
        match self {
            Self::Mock => Kind::Mock,
            Self::Proxy => Kind::Proxy,
            Self::Gateway | Self::GatewayHit => Kind::Gateway,
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let res = if let Some(kind) = args.serve {
        servers::serve(&ServeArgs {
            kind,
            upstream: args.upstream.clone(),
            output_tokens: args.output_tokens,
            max_lifetime: Duration::from_secs(args.max_lifetime_secs),
            cache_max_bytes: args.cache_max_bytes,
            layers: args.layers.clone(),
            worker_threads: args.server_threads,
        })
    } else if args.soak_memory {
        soak(&args)
    } else {
        ladder(&args)
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-gateway: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A server child process.
struct Child {
    kind: Kind,
    process: Process,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    addr: SocketAddr,
    cache: bool,
    /// RSS (kB) once started, before any load.
    idle_rss: u64,
}

impl Child {
    fn spawn(
        kind: Kind,
        upstream: Option<&str>,
        args: &Args,
        lifetime: Duration,
        cache_max_bytes: Option<u64>,
    ) -> Result<Self, String> {
        let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
        // Profiling hook: `BENCH_WRAP_GATEWAY="valgrind --tool=callgrind"` (or `_PROXY`,
        // `_MOCK`) runs that child under the given command.
        let wrap_var = format!("BENCH_WRAP_{kind:?}").to_uppercase();
        let wrap = std::env::var(&wrap_var).unwrap_or_default();
        let mut words = wrap.split_whitespace();
        let mut cmd = match words.next() {
            Some(program) => {
                let mut c = Command::new(program);
                c.args(words).arg(exe);
                c
            }
            None => Command::new(exe),
        };
        cmd.arg("--serve")
            .arg(match kind {
                Kind::Mock => "mock",
                Kind::Proxy => "proxy",
                Kind::Gateway => "gateway",
            })
            .arg("--output-tokens")
            .arg(args.output_tokens.to_string())
            .arg("--max-lifetime-secs")
            .arg(lifetime.as_secs().max(60).to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(u) = upstream {
            cmd.arg("--upstream").arg(u);
        }
        if let Some(n) = args.server_threads {
            cmd.arg("--server-threads").arg(n.to_string());
        }
        if let Some(n) = cache_max_bytes {
            cmd.arg("--cache-max-bytes").arg(n.to_string());
        }
        if kind == Kind::Gateway {
            let layers: Vec<&str> = args.layers.iter().map(|l| layer_name(*l)).collect();
            cmd.arg(format!("--layers={}", layers.join(",")));
        }
        let mut process = cmd.spawn().map_err(|e| format!("spawn {kind:?}: {e}"))?;
        let stdin = process.stdin.take();
        let mut stdout = BufReader::new(process.stdout.take().ok_or("no child stdout")?);
        let line = servers::read_line(&mut stdout)?;
        let mut it = line.split_whitespace();
        let (Some("LISTEN"), Some(addr), Some("CACHE"), Some(cache)) =
            (it.next(), it.next(), it.next(), it.next())
        else {
            let _ = process.kill();
            return Err(format!("{kind:?} child said `{line}`"));
        };
        let addr = addr
            .parse()
            .map_err(|e| format!("child address `{addr}`: {e}"))?;
        let mut child = Self {
            kind,
            process,
            stdin,
            stdout,
            addr,
            cache: cache == "on",
            idle_rss: 0,
        };
        child.idle_rss = child.memory()?.0;
        Ok(child)
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `(VmRSS, VmHWM)` in kB, as the child reads them itself.
    fn memory(&mut self) -> Result<(u64, u64), String> {
        let stdin = self.stdin.as_mut().ok_or("child stdin closed")?;
        writeln!(stdin, "rss")
            .and_then(|()| stdin.flush())
            .map_err(|e| format!("{:?} child: {e}", self.kind))?;
        let line = servers::read_line(&mut self.stdout)?;
        let mut it = line.split_whitespace();
        match (it.next(), it.next(), it.next()) {
            (Some("RSS"), Some(rss), Some(hwm)) => Ok((
                rss.parse().map_err(|_| format!("bad RSS line `{line}`"))?,
                hwm.parse().map_err(|_| format!("bad RSS line `{line}`"))?,
            )),
            _ => Err(format!("{:?} child said `{line}`", self.kind)),
        }
    }

    /// User + system CPU time of the child so far, in seconds.
    fn cpu_secs(&self) -> f64 {
        cpu_secs(self.process.id())
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        // Closing stdin asks the child to exit; give it a moment, then kill it.
        drop(self.stdin.take());
        let until = Instant::now() + Duration::from_secs(3);
        while Instant::now() < until {
            if matches!(self.process.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

/// User + system CPU seconds of a process (fields 14 and 15 of `/proc/PID/stat`, in
/// USER_HZ = 100 ticks per second).
fn cpu_secs(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // The command name may hold spaces: fields are counted after its closing parenthesis.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // After ")": state is field 3, so utime (14) is index 11 and stime (15) index 12.
    (tick(11) + tick(12)) as f64 / 100.0
}

/// Context switches (voluntary and not) of every thread of a process so far.
fn context_switches(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(Result::ok)
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .map(|status| {
            status
                .lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split(':').nth(1)?.trim().parse::<u64>().ok())
                .sum::<u64>()
        })
        .sum()
}

/// Settings resolved from the flags.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub(crate) rates: Vec<u64>,
    pub(crate) step: Duration,
    pub(crate) warmup: Duration,
    pub(crate) target: Duration,
    pub(crate) connections: usize,
    pub(crate) p99_bound: Duration,
    pub(crate) shapes: Vec<Shape>,
    pub(crate) output_tokens: u64,
    /// Halvings of the gap between the last sustained rate and the first failed one (see
    /// [`report::between`]).
    pub(crate) refine: usize,
}

impl Plan {
    fn from_args(args: &Args) -> Self {
        let (rates, step, warmup, target) = if args.quick {
            (vec![1_000, 2_000, 4_000, 8_000, 16_000], 1.5, 0.5, 3.0)
        } else {
            (
                vec![
                    500, 1_000, 1_500, 2_000, 3_000, 4_000, 5_000, 6_000, 8_000, 10_000, 12_000,
                    14_000, 16_000, 20_000, 24_000, 28_000, 32_000, 40_000, 44_000, 48_000,
                ],
                5.0,
                1.0,
                10.0,
            )
        };
        let secs = |v: Option<f64>, d: f64| Duration::from_secs_f64(v.unwrap_or(d).max(0.1));
        Self {
            rates: if args.rates.is_empty() {
                rates
            } else {
                args.rates.clone()
            },
            step: secs(args.step_secs, step),
            warmup: Duration::from_secs_f64(args.warmup_secs.unwrap_or(warmup).max(0.0)),
            target: secs(args.target_secs, target),
            connections: args.connections.max(1),
            p99_bound: Duration::from_secs_f64(args.p99_bound_ms / 1000.0),
            shapes: args.shapes.clone(),
            output_tokens: args.output_tokens,
            refine: if args.quick { 1 } else { 2 },
        }
    }

    /// An upper bound of the run's length, for the children's own deadline.
    fn lifetime(&self) -> Duration {
        let per = self.step + self.warmup + Duration::from_secs(6);
        let steps = (self.rates.len() * 2 + 2 + self.refine * 2) * 3 * self.shapes.len();
        per * steps as u32 + Duration::from_secs(120)
    }
}

/// One measured step of one scenario.
#[derive(Debug)]
pub(crate) struct Row {
    pub(crate) kind: Scenario,
    pub(crate) shape: Shape,
    pub(crate) rate: u64,
    pub(crate) outcome: load::Outcome,
    /// CPU microseconds per completed request: (the relay's, the mock's).
    pub(crate) cpu_us: (Option<f64>, f64),
    /// The load generator's CPU microseconds per completed request.
    pub(crate) generator_cpu_us: f64,
    /// Context switches of the relay's (else the mock's) threads per completed request.
    pub(crate) switches: f64,
    pub(crate) sustained: bool,
}

/// The three server processes.
struct Servers {
    mock: Child,
    proxy: Child,
    gateway: Child,
}

impl Servers {
    fn start(args: &Args, lifetime: Duration) -> Result<Self, String> {
        let mock = Child::spawn(Kind::Mock, None, args, lifetime, None)?;
        let proxy = Child::spawn(Kind::Proxy, Some(&mock.url()), args, lifetime, None)?;
        let gateway = Child::spawn(
            Kind::Gateway,
            Some(&mock.url()),
            args,
            lifetime,
            args.cache_mib.map(|m| m * 1024 * 1024),
        )?;
        Ok(Self {
            mock,
            proxy,
            gateway,
        })
    }

    fn front(&self, kind: Kind) -> &Child {
        match kind {
            Kind::Mock => &self.mock,
            Kind::Proxy => &self.proxy,
            Kind::Gateway => &self.gateway,
        }
    }
}

struct Runner {
    rt: tokio::runtime::Runtime,
    nonce: u64,
}

impl Runner {
    fn new() -> Result<Self, String> {
        // The generator runs on one thread (plus the pacer), so it takes at most about one
        // core of the two; the servers have their own processes and runtimes.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("runtime: {e}"))?;
        Ok(Self { rt, nonce: 0 })
    }

    fn step(
        &mut self,
        servers: &Servers,
        plan: &Plan,
        kind: Scenario,
        shape: Shape,
        rate: u64,
        duration: Duration,
    ) -> Result<Row, String> {
        self.nonce += 1;
        let front = servers.front(kind.server());
        let step = Step {
            addr: front.addr,
            shape,
            rate: rate as f64,
            warmup: plan.warmup,
            duration,
            connections: plan.connections,
            nonce: self.nonce,
            identical: kind == Scenario::GatewayHit,
        };
        let mock_cpu = servers.mock.cpu_secs();
        let relay_cpu = (kind != Scenario::Mock).then(|| front.cpu_secs());
        let own_cpu = cpu_secs(std::process::id());
        let switches = context_switches(front.process.id());
        let outcome = self.rt.block_on(load::run(&step))?;
        let n = outcome.completed_total.max(1) as f64;
        let cpu_us = (
            relay_cpu.map(|c| (front.cpu_secs() - c) * 1e6 / n),
            (servers.mock.cpu_secs() - mock_cpu) * 1e6 / n,
        );
        let generator_cpu_us = (cpu_secs(std::process::id()) - own_cpu) * 1e6 / n;
        let switches = context_switches(front.process.id()).saturating_sub(switches) as f64 / n;
        let p99 = outcome.latency.value_at_quantile(0.99);
        let sustained = outcome.errors == 0
            && outcome.dropped == 0
            && outcome.ok > 0
            && outcome.achieved >= 0.95 * rate as f64
            && u128::from(p99) <= plan.p99_bound.as_nanos();
        let row = Row {
            kind,
            shape,
            rate,
            outcome,
            cpu_us,
            generator_cpu_us,
            switches,
            sustained,
        };
        eprintln!("{}", report::progress(&row));
        Ok(row)
    }
}

fn ladder(args: &Args) -> Result<(), String> {
    let plan = Plan::from_args(args);
    let started = Instant::now();
    let servers = Servers::start(args, plan.lifetime())?;
    let mut servers = servers;
    let mut runner = Runner::new()?;
    let kinds: Vec<Scenario> = [Scenario::Mock, Scenario::Proxy, Scenario::Gateway]
        .into_iter()
        .filter(|s| args.scenarios.contains(&s.server()))
        .collect();

    // Smoke test: every scenario answers both shapes correctly before anything is timed.
    for &kind in &kinds {
        for &shape in &plan.shapes {
            let smoke = Plan {
                warmup: Duration::ZERO,
                connections: 2,
                ..plan.clone()
            };
            let row = runner.step(
                &servers,
                &smoke,
                kind,
                shape,
                100,
                Duration::from_millis(300),
            )?;
            if row.outcome.errors > 0 || row.outcome.ok == 0 {
                return Err(format!(
                    "{kind:?} {} smoke test failed: {}",
                    shape.label(),
                    row.outcome.first_error.unwrap_or_default()
                ));
            }
        }
    }

    let mut rows: Vec<Row> = Vec::new();
    let mut alive: Vec<(Scenario, Shape)> = kinds
        .iter()
        .flat_map(|&k| plan.shapes.iter().map(move |&s| (k, s)))
        .collect();
    for &rate in &plan.rates {
        for &shape in &plan.shapes {
            for &kind in &kinds {
                if !alive.contains(&(kind, shape)) {
                    continue;
                }
                let mut row = runner.step(&servers, &plan, kind, shape, rate, plan.step)?;
                if !row.sustained {
                    eprintln!("  (not sustained; trying the step once more)");
                    row = runner.step(&servers, &plan, kind, shape, rate, plan.step)?;
                }
                if !row.sustained {
                    alive.retain(|&x| x != (kind, shape));
                }
                rows.push(row);
            }
        }
        if alive.is_empty() {
            break;
        }
    }

    // Between the ladder's rungs: the highest sustained rate of the proxy and of the gateway
    // is narrowed by halving the gap between the last rate each sustained and the first it
    // failed at, so that their ratio is not a ratio of rungs.
    for &shape in &plan.shapes {
        for &kind in kinds.iter().filter(|&&k| k != Scenario::Mock) {
            let (Some(mut lo), Some(mut hi)) = (
                report::highest(&rows, kind, shape),
                report::failed_at(&rows, kind, shape),
            ) else {
                continue;
            };
            for _ in 0..plan.refine {
                let Some(mid) = report::between(lo, hi) else {
                    break;
                };
                let mut row = runner.step(&servers, &plan, kind, shape, mid, plan.step)?;
                if !row.sustained {
                    eprintln!("  (not sustained; trying the step once more)");
                    row = runner.step(&servers, &plan, kind, shape, mid, plan.step)?;
                }
                if row.sustained {
                    lo = mid;
                } else {
                    hi = mid;
                }
                rows.push(row);
            }
        }
    }

    // The latency target: all three at half the proxy's highest sustained rate.
    let mut target_rows = Vec::new();
    for &shape in &plan.shapes {
        let best = report::highest(&rows, Scenario::Proxy, shape);
        let Some(best) = best else { continue };
        let half = (best / 2).max(1);
        for &kind in &kinds {
            target_rows.push(runner.step(&servers, &plan, kind, shape, half, plan.target)?);
        }
        if servers.gateway.cache {
            let kind = Scenario::GatewayHit;
            target_rows.push(runner.step(&servers, &plan, kind, shape, half, plan.target)?);
        }
    }

    let mut memory = Vec::new();
    for kind in [Kind::Mock, Kind::Proxy, Kind::Gateway] {
        let child = match kind {
            Kind::Mock => &mut servers.mock,
            Kind::Proxy => &mut servers.proxy,
            Kind::Gateway => &mut servers.gateway,
        };
        let (rss, hwm) = child.memory()?;
        memory.push(report::Memory {
            kind,
            idle_kb: child.idle_rss,
            end_kb: rss,
            peak_kb: hwm,
        });
    }
    let out = report::Report {
        plan: &plan,
        rows: &rows,
        target_rows: &target_rows,
        memory: &memory,
        cache: servers.gateway.cache,
        layers: layers_text(&args.layers),
        elapsed: started.elapsed(),
        command: std::env::args().skip(1).collect::<Vec<_>>().join(" "),
    };
    println!("{}", out.markdown());
    Ok(())
}

fn soak(args: &Args) -> Result<(), String> {
    let plan = Plan {
        warmup: Duration::ZERO,
        ..Plan::from_args(args)
    };
    let started = Instant::now();
    let lifetime = Duration::from_secs(args.soak_secs + 120);
    let mock = Child::spawn(Kind::Mock, None, args, lifetime, None)?;
    let cache_bytes = args.soak_cache_mib * 1024 * 1024;
    let mut gateway = Child::spawn(
        Kind::Gateway,
        Some(&mock.url()),
        args,
        lifetime,
        Some(cache_bytes),
    )?;
    let mut runner = Runner::new()?;
    let window = Duration::from_secs(10);
    let windows = args.soak_secs.div_ceil(10).max(1);
    let mut samples = Vec::new();
    let idle = gateway.memory()?;
    samples.push(report::SoakSample {
        at: Duration::ZERO,
        rss_kb: idle.0,
        hwm_kb: idle.1,
        p99_ns: 0,
        ok: 0,
        errors: 0,
    });
    for _ in 0..windows {
        runner.nonce += 1;
        let step = Step {
            addr: gateway.addr,
            shape: Shape::Json,
            rate: args.soak_rate as f64,
            warmup: Duration::ZERO,
            duration: window,
            connections: plan.connections,
            nonce: runner.nonce,
            identical: false,
        };
        let o = runner.rt.block_on(load::run(&step))?;
        let (rss, hwm) = gateway.memory()?;
        let s = report::SoakSample {
            at: started.elapsed(),
            rss_kb: rss,
            hwm_kb: hwm,
            p99_ns: o.latency.value_at_quantile(0.99),
            ok: o.ok,
            errors: o.errors + o.dropped,
        };
        eprintln!(
            "soak {:>5.0} s: RSS {:.1} MiB, peak {:.1} MiB, p99 {:.3} ms, {} ok, {} errors",
            s.at.as_secs_f64(),
            s.rss_kb as f64 / 1024.0,
            s.hwm_kb as f64 / 1024.0,
            s.p99_ns as f64 / 1e6,
            s.ok,
            s.errors
        );
        samples.push(s);
    }
    println!(
        "{}",
        report::soak_markdown(
            &samples,
            args.soak_rate,
            gateway.cache.then_some(args.soak_cache_mib),
            &std::env::args().skip(1).collect::<Vec<_>>().join(" ")
        )
    );
    drop(mock);
    Ok(())
}
