//! The `claude-mock` binary: flags, the listening line, serving, signals, bind failures.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

const BIN: &str = env!("CARGO_BIN_EXE_claude-mock");

fn spawn(args: &[&str]) -> std::io::Result<Child> {
    Command::new(BIN)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
}

/// Reads the `claude-mock listening on http://ADDR` line and returns ADDR.
async fn listening_addr(
    child: &mut Child,
) -> Result<String, Box<dyn std::error::Error + Send + Sync>> {
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut line = String::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        BufReader::new(stdout).read_line(&mut line),
    )
    .await??;
    let addr = line
        .trim_end()
        .strip_prefix("claude-mock listening on http://")
        .ok_or_else(|| format!("unexpected line {line:?}"))?;
    Ok(addr.to_owned())
}

async fn exchange(addr: &str, request: &str) -> std::io::Result<String> {
    let mut tcp = TcpStream::connect(addr).await?;
    tcp.write_all(request.as_bytes()).await?;
    let mut out = Vec::new();
    tcp.read_to_end(&mut out).await?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

#[tokio::test]
async fn serves_with_flags_and_stops_on_sigterm() -> TestResult {
    let mut child = spawn(&[
        "--listen",
        "127.0.0.1:0",
        "--api-key",
        "k1",
        "--api-key",
        "k2",
        "--rpm",
        "50",
        "--output-tokens",
        "2",
    ])?;
    let addr = listening_addr(&mut child).await?;
    assert!(
        addr.starts_with("127.0.0.1:") && !addr.ends_with(":0"),
        "{addr}"
    );

    let body = r#"{"model":"m","max_tokens":10,"messages":[]}"#;
    let request = |key: &str| {
        format!(
            "POST /v1/messages HTTP/1.1\r\nhost: x\r\nx-api-key: {key}\r\nanthropic-version: 2023-06-01\r\n\
             content-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
    };
    let ok = exchange(&addr, &request("k2")).await?;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    assert!(ok.contains("\"output_tokens\":2"), "{ok}");
    assert!(
        ok.contains("anthropic-ratelimit-requests-limit: 50"),
        "{ok}"
    );
    let denied = exchange(&addr, &request("nope")).await?;
    assert!(denied.starts_with("HTTP/1.1 401"), "{denied}");

    let pid = child.id().ok_or("no pid")?;
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()?;
    assert!(status.success());
    let exit = tokio::time::timeout(Duration::from_secs(10), child.wait()).await??;
    assert!(exit.success(), "{exit:?}");
    Ok(())
}

#[tokio::test]
async fn bad_flag_fails() -> TestResult {
    let output = Command::new(BIN).args(["--rpm", "many"]).output().await?;
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--rpm"), "{stderr}");

    let output = Command::new(BIN)
        .args(["--fault", "429,teapot"])
        .output()
        .await?;
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("teapot"));
    Ok(())
}

#[tokio::test]
async fn bind_failure_fails() -> TestResult {
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = taken.local_addr()?.to_string();
    let output = tokio::time::timeout(
        Duration::from_secs(10),
        Command::new(BIN).args(["--listen", &addr]).output(),
    )
    .await??;
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("cannot listen on"), "{stderr}");
    assert!(stderr.contains(&addr), "{stderr}");
    assert!(output.stdout.is_empty());
    Ok(())
}
