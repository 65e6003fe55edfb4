//! Rotation without restart, outages and 401 storms, over real HTTP: a Vault KV v2 server as
//! the source, claude-mock as the upstream.
#![cfg(feature = "vault")]
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, SystemTime};

use claude_core::{Error, ErrorKind, classify_response};
use claude_secrets::config::VaultConfig;
use claude_secrets::{ApiKeyLayer, Fingerprint, KeyRing, KeyRingConfig, VaultSource, metric};
use common::VaultServer;
use metrics_util::debugging::DebuggingRecorder;
use serde_json::json;
use tower::{Service, ServiceBuilder, ServiceExt};

const TOKEN: &str = "hvs.rotation-test";
const K1: &str = "sk-ant-api03-rotation-one";
const K2: &str = "sk-ant-api03-rotation-two";

async fn vault_with(key: &str) -> VaultServer {
    let vault = VaultServer::start(TOKEN).await;
    vault.put("secret", "claude/prod", json!({ "api_key": key }));
    vault
}

fn ring(vault: &VaultServer, config: KeyRingConfig) -> KeyRing {
    let dir = common::scratch_dir("rot-token");
    std::fs::write(dir.join("token"), TOKEN).unwrap();
    let source = VaultSource::new(VaultConfig {
        address: Some(vault.url()),
        path: "claude/prod".into(),
        token_file: Some(dir.join("token")),
        ..VaultConfig::default()
    })
    .unwrap();
    KeyRing::new(source, config)
}

fn long_interval() -> KeyRingConfig {
    KeyRingConfig {
        refresh_interval: Duration::from_secs(3600),
        ..KeyRingConfig::default()
    }
}

/// The key changes in Vault; a request already in flight with the old key finishes, and new
/// requests go out with the new key (no 401 at all).
#[tokio::test]
async fn rotation_without_restart_lets_in_flight_requests_finish() {
    let vault = vault_with(K1).await;
    let mock = claude_mock::MockServer::builder()
        .api_key(K1)
        .start()
        .await
        .unwrap();
    let ring = ring(&vault, long_interval());
    let svc = ServiceBuilder::new()
        .layer(ApiKeyLayer::new(ring.clone()))
        .service(common::http_client());

    // A slow request with K1.
    let mut slow_svc = svc.clone();
    let url = mock.url();
    let in_flight = tokio::spawn(async move {
        let req = common::messages_with(&url, &[("x-mock-latency-ms", "1500")]);
        slow_svc.ready().await.unwrap().call(req).await.unwrap()
    });
    assert!(
        common::wait_until(Duration::from_secs(10), || mock.stats().in_flight == 1).await,
        "the slow request never reached the mock"
    );

    // Rotate: Vault gets K2, the upstream revokes K1, the ring refreshes (as its background
    // task would at the next interval).
    vault.put("secret", "claude/prod", json!({ "api_key": K2 }));
    mock.set_api_keys([K2]);
    let fresh = ring.refresh().await.unwrap();
    assert_eq!(fresh.fingerprint(), Fingerprint::of(K2));
    assert_eq!(fresh.version(), Some("2"));

    let mut svc = svc;
    let resp = svc
        .ready()
        .await
        .unwrap()
        .call(common::messages(&mock.url()))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        common::status_count(&mock, "401"),
        0,
        "the new request used K2 directly"
    );

    let slow = in_flight.await.unwrap();
    assert_eq!(slow.status(), 200, "the in-flight request finished");
    assert_eq!(common::status_count(&mock, "200"), 2);
    assert_eq!(common::status_count(&mock, "401"), 0);
    mock.shutdown().await;
}

/// Vault goes away: the ring serves the last good key, says so in the stale gauge and a
/// warning, and requests keep succeeding; past `max_staleness` they fail with
/// SECRET_UNAVAILABLE (503).
#[tokio::test]
async fn an_outage_serves_the_last_good_key_then_fails_past_max_staleness() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _metrics = metrics::set_default_local_recorder(&recorder);
    let (_logs, logs) = common::capture_logs();

    let vault = vault_with(K1).await;
    let mock = claude_mock::MockServer::builder()
        .api_key(K1)
        .start()
        .await
        .unwrap();
    let ring = ring(
        &vault,
        KeyRingConfig {
            refresh_interval: Duration::from_secs(1),
            max_staleness: Duration::from_secs(4),
            min_refresh_interval: Duration::ZERO,
            ..KeyRingConfig::default()
        },
    );
    let source = ring.name().to_owned();
    let mut svc = ServiceBuilder::new()
        .layer(ApiKeyLayer::new(ring.clone()))
        .service(common::http_client());
    let resp = svc
        .ready()
        .await
        .unwrap()
        .call(common::messages(&mock.url()))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let snap = common::snapshot(&snapshotter);
    assert_eq!(snap.gauge(metric::STALE, &[("source", &source)]), Some(0.0));
    assert_eq!(
        snap.counter(
            metric::REFRESH_TOTAL,
            &[("source", &source), ("result", "loaded")]
        ),
        1
    );

    vault.shutdown().await;
    assert!(
        common::wait_until(Duration::from_secs(10), || ring.status().stale).await,
        "no background refresh failed"
    );
    let snap = common::snapshot(&snapshotter);
    assert_eq!(snap.gauge(metric::STALE, &[("source", &source)]), Some(1.0));
    assert!(
        snap.counter(
            metric::REFRESH_TOTAL,
            &[
                ("source", &source),
                ("trigger", "interval"),
                ("result", "error")
            ]
        ) >= 1
    );
    assert!(
        logs.contents()
            .contains("API key refresh failed; serving the last good key"),
        "{}",
        logs.contents()
    );
    // Still served while within max_staleness (unless this machine was so slow that 4 s
    // already passed, which the next step covers anyway).
    let stale_at = ring.status().since_confirmed.unwrap();
    if stale_at < Duration::from_secs(3) {
        let resp = svc
            .ready()
            .await
            .unwrap()
            .call(common::messages(&mock.url()))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "the last good key is served");
    }

    // Past max_staleness: SECRET_UNAVAILABLE.
    let mut last = None;
    let failed = {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            let r = svc
                .ready()
                .await
                .unwrap()
                .call(common::messages(&mock.url()))
                .await;
            if let Err(e) = r {
                last = Some(Error::from_box(e));
                break true;
            }
            if tokio::time::Instant::now() > deadline {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    assert!(failed, "requests kept succeeding past max_staleness");
    let err = last.unwrap();
    assert_eq!(err.kind(), ErrorKind::SecretUnavailable);
    assert!(err.message().contains("maximum staleness"), "{err}");
    assert_eq!(err.into_response().status(), 503);
    mock.shutdown().await;
}

/// 100 requests in flight with a key the upstream just revoked: 100 401s, one Vault read,
/// 100 replays with the new key.
#[tokio::test]
async fn a_storm_of_100_concurrent_401s_causes_exactly_one_refresh() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _metrics = metrics::set_default_local_recorder(&recorder);

    let vault = vault_with(K1).await;
    let mock = claude_mock::MockServer::builder()
        .api_key(K1)
        .start()
        .await
        .unwrap();
    let ring = ring(&vault, long_interval());
    ring.current().await.unwrap();
    assert_eq!(vault.reads(), 1);

    vault.put("secret", "claude/prod", json!({ "api_key": K2 }));
    mock.set_api_keys([K2]);

    let svc = ServiceBuilder::new()
        .layer(ApiKeyLayer::new(ring.clone()))
        .service(common::http_client());
    let url = mock.url();
    // Polled together on this task: every request takes K1 before any answer arrives.
    let responses = futures_util::future::join_all((0..100).map(|_| {
        let mut svc = svc.clone();
        let req = common::messages(&url);
        async move { svc.ready().await.unwrap().call(req).await.unwrap().status() }
    }))
    .await;
    assert!(responses.iter().all(|s| *s == 200), "{responses:?}");
    assert_eq!(vault.reads(), 2, "exactly one refresh for 100 401s");
    assert_eq!(common::status_count(&mock, "401"), 100);
    assert_eq!(common::status_count(&mock, "200"), 100);
    let source = ring.name().to_owned();
    let snap = common::snapshot(&snapshotter);
    assert_eq!(
        snap.counter(
            metric::REFRESH_TOTAL,
            &[
                ("source", &source),
                ("trigger", "auth_failure"),
                ("result", "rotated")
            ]
        ),
        1
    );
    assert_eq!(
        snap.counter(
            metric::AUTH_REJECTIONS_TOTAL,
            &[("source", &source), ("outcome", "replayed")]
        ),
        100
    );
    mock.shutdown().await;
}

/// claude-mock accepts only the new key: the request with the old one gets a 401, the ring
/// refreshes, and the replay with the new key succeeds. When the source has nothing new,
/// the 401 is returned as it is, classified AUTH_ERROR, without a replay.
#[tokio::test]
async fn replay_after_401_only_when_the_key_changed() {
    let vault = vault_with(K1).await;
    let mock = claude_mock::MockServer::builder()
        .api_key(K1)
        .start()
        .await
        .unwrap();
    let ring = ring(&vault, long_interval());
    ring.current().await.unwrap();
    let mut svc = ServiceBuilder::new()
        .layer(ApiKeyLayer::new(ring.clone()))
        .service(common::http_client());

    vault.put("secret", "claude/prod", json!({ "api_key": K2 }));
    mock.set_api_keys([K2]);
    let resp = svc
        .ready()
        .await
        .unwrap()
        .call(common::messages(&mock.url()))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(common::status_count(&mock, "401"), 1);
    assert_eq!(common::status_count(&mock, "200"), 1);
    assert_eq!(vault.reads(), 2);

    // Now the upstream revokes K2 too, and Vault still has K2: no replay.
    mock.reset_stats();
    mock.set_api_keys(["sk-ant-api03-someone-else"]);
    let resp = svc
        .ready()
        .await
        .unwrap()
        .call(common::messages(&mock.url()))
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let headers = resp.headers().clone();
    let body = common::body_text(resp).await;
    let c = classify_response(
        http::StatusCode::UNAUTHORIZED,
        &headers,
        Some(body.as_bytes()),
        SystemTime::now(),
    )
    .unwrap();
    assert_eq!(c.kind, ErrorKind::Authentication);
    assert_eq!(c.kind.code(), "AUTH_ERROR");
    assert!(body.contains("authentication_error"), "{body}");
    assert_eq!(mock.stats().requests, 1, "no replay with an unchanged key");
    assert_eq!(vault.reads(), 3, "the source was asked once");
    mock.shutdown().await;
}
