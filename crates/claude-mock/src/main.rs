//! `claude-mock`: runs the Messages API simulator until SIGINT or SIGTERM.
//!
//! Prints `claude-mock listening on http://ADDR` (the bound address, so `--listen
//! 127.0.0.1:0` works) once it accepts connections. Exits non-zero on a bad flag (2) or
//! when the address cannot be bound (1).

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use claude_mock::{FaultPlan, MockServer};

/// A simulator of the Anthropic Messages API for tests and benchmarks.
#[derive(Debug, Parser)]
#[command(name = "claude-mock", version)]
struct Cli {
    /// Address to listen on.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8788")]
    listen: SocketAddr,
    /// Accepted API key (repeatable). Without any, every key (or none) is accepted.
    #[arg(long = "api-key", value_name = "KEY")]
    api_keys: Vec<String>,
    /// Requests per minute (default: unlimited).
    #[arg(long, value_name = "N")]
    rpm: Option<u64>,
    /// Input tokens per minute (default: unlimited).
    #[arg(long, value_name = "N")]
    itpm: Option<u64>,
    /// Output tokens per minute (default: unlimited).
    #[arg(long, value_name = "N")]
    otpm: Option<u64>,
    /// Delay before the response head of every answer, in milliseconds.
    #[arg(long, value_name = "N", default_value_t = 0)]
    first_byte_ms: u64,
    /// Delay per output token, in milliseconds.
    #[arg(long, value_name = "N", default_value_t = 0)]
    token_ms: u64,
    /// Reply length in tokens when the request does not script it.
    #[arg(long, value_name = "N", default_value_t = 12)]
    output_tokens: u64,
    /// Fault plan of requests that send no x-mock-fault, e.g. "529,ok".
    #[arg(long, value_name = "PLAN", value_parser = FaultPlan::parse)]
    fault: Option<FaultPlan>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("claude-mock: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(cli))
}

async fn run(cli: Cli) -> ExitCode {
    let mut builder = MockServer::builder()
        .listen(cli.listen)
        .first_byte_latency(Duration::from_millis(cli.first_byte_ms))
        .token_latency(Duration::from_millis(cli.token_ms))
        .output_tokens(cli.output_tokens);
    for key in cli.api_keys {
        builder = builder.api_key(key);
    }
    if let Some(n) = cli.rpm {
        builder = builder.rpm(n);
    }
    if let Some(n) = cli.itpm {
        builder = builder.itpm(n);
    }
    if let Some(n) = cli.otpm {
        builder = builder.otpm(n);
    }
    if let Some(plan) = cli.fault {
        builder = builder.faults(plan);
    }
    let mock = match builder.start().await {
        Ok(mock) => mock,
        Err(e) => {
            eprintln!("claude-mock: cannot listen on {}: {e}", cli.listen);
            return ExitCode::FAILURE;
        }
    };
    println!("claude-mock listening on {}", mock.url());
    if let Err(e) = shutdown_signal().await {
        eprintln!("claude-mock: cannot wait for signals: {e}");
        mock.shutdown().await;
        return ExitCode::FAILURE;
    }
    mock.shutdown().await;
    ExitCode::SUCCESS
}

/// Resolves on SIGINT (Ctrl-C) or, on Unix, SIGTERM.
async fn shutdown_signal() -> std::io::Result<()> {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            result = tokio::signal::ctrl_c() => result,
            _ = term.recv() => Ok(()),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await
    }
}
