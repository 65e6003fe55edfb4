//! The gateway driven by the official Anthropic Python SDK (`pip install anthropic`; `.ci/run`
//! installs it): create, stream, count_tokens, a scripted 529 the SDK never sees, a local
//! rate-limit rejection raised as the SDK's `RateLimitError`, and a bad gateway key raised
//! as `AuthenticationError`. The checks themselves are in `tests/sdk/python_sdk.py`.
#![allow(clippy::unwrap_used)]

use std::process::Command;

use claude_gateway::{Gateway, Options, format_hash};

fn python_with_sdk() -> bool {
    Command::new("python3")
        .args(["-c", "import anthropic"])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_python_sdk_works_through_the_gateway() {
    if !python_with_sdk() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "python3 with the `anthropic` package is required on CI (pip install anthropic)"
        );
        eprintln!("SKIPPED: python3 with the `anthropic` package is not installed");
        return;
    }
    // A tight local limit: 6 requests a minute and no queueing, so the probe loop meets
    // the gateway's own 429 quickly; the mock upstream is unlimited.
    let config = format!(
        "listen = \"127.0.0.1:0\"\n\
         [[client_keys]]\nhash = \"{}\"\ntenant = \"sdk\"\n\
         [stack.rate_limit]\nrequests_per_minute = 6\nmax_wait = \"50ms\"\n",
        format_hash("gw-sdk-key")
    );
    let path = std::env::temp_dir().join(format!("claude-gateway-sdk-{}.toml", std::process::id()));
    std::fs::write(&path, config).unwrap();
    let gw = Gateway::start(Options {
        mock: true,
        config_path: Some(path),
        ..Options::default()
    })
    .await
    .unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/python_sdk.py");
    let url = format!("http://{}", gw.addr());
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg(script)
            .env("GATEWAY_URL", url)
            .env("GATEWAY_KEY", "gw-sdk-key")
            .env("GATEWAY_RATELIMIT_PROBE", "1")
            .env_remove("ANTHROPIC_API_KEY")
            .env_remove("ANTHROPIC_BASE_URL")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "SDK script failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    for check in [
        "ok   create",
        "ok   stream",
        "ok   count_tokens",
        "ok   529_then_ok_invisible",
        "ok   local_ratelimit_is_RateLimitError",
        "ok   local_ratelimit_says_local",
        "ok   bad_key_is_AuthenticationError",
    ] {
        assert!(stdout.contains(check), "missing `{check}` in\n{stdout}");
    }
    let stats = gw.mock().unwrap().stats();
    assert_eq!(
        stats.by_status.get("529").copied(),
        Some(1),
        "the 529 reached the gateway, not the SDK: {stats:?}"
    );
    let summary = gw.shutdown().await;
    assert!(summary.retries >= 1);
    assert!(summary.unauthorized >= 1);
    assert!(summary.rate_limit_rejections >= 1, "{summary}");
}
