//! Project automation, run as `cargo xtask <task>`.
//!
//! - `ci`: what CI runs, in order: `cargo fmt --check`, clippy on every target with every
//!   feature and warnings denied, `cargo doc` with warnings denied, doc tests, then every test
//!   of every crate with every feature (cargo-nextest when installed, else `cargo test`).
//!   The tests run last so their summary is the closing line of the log.
//! - `bench-gateway [--quick] [ARGS...]`: the open-loop load benchmark of claude-gateway
//!   against claude-mock alone and a bare hyper proxy (`cargo run --release --locked -p
//!   claude-benches --bin bench-gateway -- ARGS`); prints markdown tables for BENCHMARKS.md.
//!   `--quick` takes 1.5 to 2.5 minutes, the full ladder 11 to 14; `--soak-memory` is the
//!   5-minute memory run; `--help` lists the settings.

use std::env;
use std::process::{Command, ExitCode};
use std::time::Instant;

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let task = args.first().map_or("help", String::as_str);
    let result = match task {
        "ci" => ci(),
        "bench-gateway" => bench_gateway(args.get(1..).unwrap_or_default()),
        "help" | "--help" | "-h" => {
            print_help();
            Ok(())
        }
        other => {
            eprintln!("xtask: unknown task `{other}`");
            print_help();
            Err(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(()) => ExitCode::FAILURE,
    }
}

fn print_help() {
    eprintln!(
        "usage: cargo xtask <task>\n\ntasks:\n  ci                    fmt, clippy, doc, doc tests, all tests (what CI runs)\n  bench-gateway [ARGS]  load benchmark: mock vs hyper proxy vs claude-gateway\n                        (--quick: ~2 minutes; --soak-memory; --help)"
    );
}

fn cargo() -> Command {
    Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn run(label: &str, cmd: &mut Command) -> Result<(), ()> {
    eprintln!("\n==> {label}");
    let started = Instant::now();
    let status = cmd
        .status()
        .map_err(|e| eprintln!("xtask: cannot run {label}: {e}"))?;
    eprintln!(
        "==> {label}: {status} in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    if status.success() {
        Ok(())
    } else {
        eprintln!("xtask: {label} failed");
        Err(())
    }
}

fn has_nextest() -> bool {
    cargo()
        .args(["nextest", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Runs the load generator of claude-benches in a release build, passing `args` on.
fn bench_gateway(args: &[String]) -> Result<(), ()> {
    run(
        "bench-gateway",
        cargo()
            .args([
                "run",
                "--release",
                "--locked",
                "-p",
                "claude-benches",
                "--bin",
                "bench-gateway",
                "--",
            ])
            .args(args),
    )
}

fn ci() -> Result<(), ()> {
    let started = Instant::now();
    run(
        "cargo fmt --check",
        cargo().args(["fmt", "--all", "--check"]),
    )?;
    run(
        "cargo clippy",
        cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--all-features",
            "--locked",
            "--",
            "-D",
            "warnings",
        ]),
    )?;
    run(
        "cargo doc",
        cargo()
            .args([
                "doc",
                "--workspace",
                "--no-deps",
                "--all-features",
                "--locked",
            ])
            .env("RUSTDOCFLAGS", "-D warnings"),
    )?;
    run(
        "doc tests",
        cargo().args(["test", "--workspace", "--all-features", "--locked", "--doc"]),
    )?;
    if has_nextest() {
        run(
            "cargo nextest",
            cargo().args([
                "nextest",
                "run",
                "--workspace",
                "--all-features",
                "--locked",
                "--no-fail-fast",
            ]),
        )?;
    } else {
        eprintln!("xtask: cargo-nextest not found, using cargo test");
        run(
            "cargo test",
            cargo().args([
                "test",
                "--workspace",
                "--all-features",
                "--locked",
                "--all-targets",
                "--no-fail-fast",
            ]),
        )?;
    }
    eprintln!(
        "\nxtask ci: all checks passed in {:.0}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
