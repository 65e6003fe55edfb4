//! `claude-gateway`: the relay server. See the crate docs for routes and configuration.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use claude_gateway::{Gateway, Options};

#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A relay for the Anthropic Messages API with retries, rate limits, caching, cost
/// accounting and managed keys. Point an SDK's base_url at it.
#[derive(Debug, Parser)]
#[command(name = "claude-gateway", version)]
struct Cli {
    /// Address to listen on [default: 127.0.0.1:8787].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// TOML configuration file.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Upstream base URL [default: https://api.anthropic.com].
    #[arg(long)]
    upstream: Option<String>,
    /// Run the claude-mock simulator inside the process and relay to it (no key, no network).
    #[arg(long, conflicts_with = "upstream")]
    mock: bool,
    /// Tokio worker threads [default: one per CPU; env CLAUDE_GATEWAY_WORKER_THREADS]. On
    /// machines with 2 vCPUs or fewer, 1 measured less CPU per request (BENCHMARKS.md).
    #[arg(long, env = "CLAUDE_GATEWAY_WORKER_THREADS")]
    worker_threads: Option<std::num::NonZeroUsize>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the stored form (`blake3:…`) of a gateway key, for the `client_keys` config.
    HashKey {
        /// The key.
        key: String,
    },
}

/// The log filter when `RUST_LOG` is not set: `info`, except the per-request span
/// `gen_ai.request` (target `claude_stack::observe`). The terminal output shows a span only as
/// the context of an event inside it, yet formats its fields on every request: about 25,000
/// instructions per request, 15% of the relay's (BENCHMARKS.md §8). Warnings inside a request
/// are still printed; `RUST_LOG=info` brings the span back.
const DEFAULT_LOG: &str = "info,claude_stack::observe=warn";

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::HashKey { key }) = &cli.command {
        println!("{}", claude_gateway::format_hash(key));
        return ExitCode::SUCCESS;
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = cli.worker_threads {
        builder.worker_threads(n.get());
    }
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("claude-gateway: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(run(cli))
}

async fn run(cli: Cli) -> ExitCode {
    let options = Options {
        config_path: cli.config,
        listen: cli.listen,
        upstream: cli.upstream,
        mock: cli.mock,
        use_env: true,
    };
    let gw = match Gateway::start(options).await {
        Ok(gw) => gw,
        Err(e) => {
            eprintln!("claude-gateway: {e}");
            return ExitCode::FAILURE;
        }
    };
    let addr = gw.addr();
    println!("claude-gateway listening on http://{addr}");
    if gw.mock().is_some() {
        println!(
            "upstream: the built-in claude-mock simulator at {} (no API key needed)",
            gw.upstream_url()
        );
    } else {
        println!("upstream: {}", gw.upstream_url());
    }
    if gw.loopback_only() {
        println!("no gateway keys configured: serving loopback callers only, as tenant `default`");
    }
    println!(
        "point an SDK at it:  ANTHROPIC_BASE_URL=http://{addr} ANTHROPIC_API_KEY=<gateway key or anything> python your_app.py"
    );
    println!("stop with Ctrl-C (in-flight streams finish first)");
    wait_for_signal().await;
    eprintln!("claude-gateway: shutting down");
    let summary = gw.shutdown().await;
    println!("{summary}");
    ExitCode::SUCCESS
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
