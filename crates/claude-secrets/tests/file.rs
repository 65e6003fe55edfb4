//! The file source as Kubernetes mounts secrets, through the layer, against claude-mock.
#![cfg(unix)]
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::symlink;
use std::path::Path;
use std::time::Duration;

use claude_secrets::{ApiKeyLayer, FileSource, Fingerprint, KeyRing, KeyRingConfig};
use tower::{Service, ServiceBuilder, ServiceExt};

const K1: &str = "sk-ant-api03-file-one";
const K2: &str = "sk-ant-api03-file-two";

/// Lays out a secret volume as the kubelet does: `api-key -> ..data/api-key`,
/// `..data -> ..<version>`.
fn mount(dir: &Path, version: &str, key: &str) {
    let target = dir.join(format!("..{version}"));
    std::fs::create_dir(&target).unwrap();
    std::fs::write(target.join("api-key"), format!("{key}\n")).unwrap();
    if dir.join("..data").exists() {
        // The kubelet's atomic swap: a new symlink renamed over the old one.
        symlink(format!("..{version}"), dir.join("..data_tmp")).unwrap();
        std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    } else {
        symlink(format!("..{version}"), dir.join("..data")).unwrap();
        symlink("..data/api-key", dir.join("api-key")).unwrap();
    }
}

/// Rotation without restart: the background refresh sees the swapped volume before any
/// request fails, so requests after the old key is revoked go out with the new one directly.
#[tokio::test]
async fn a_swapped_secret_volume_reaches_new_requests_without_a_401() {
    let dir = common::scratch_dir("k8s");
    mount(&dir, "v1", K1);
    let mock = claude_mock::MockServer::builder()
        .api_key(K1)
        .start()
        .await
        .unwrap();
    let ring = KeyRing::new(
        FileSource::new(dir.join("api-key")),
        KeyRingConfig {
            refresh_interval: Duration::from_secs(1),
            ..KeyRingConfig::default()
        },
    );
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

    // Rotation: both keys valid for a while, the volume updated, then the old key revoked.
    mock.set_api_keys([K1, K2]);
    mount(&dir, "v2", K2);
    let rotated = common::wait_until(Duration::from_secs(10), || {
        ring.status()
            .key
            .is_some_and(|k| k.fingerprint() == Fingerprint::of(K2))
    })
    .await;
    assert!(
        rotated,
        "the background refresh did not pick up the new file"
    );
    mock.set_api_keys([K2]);
    let resp = svc
        .ready()
        .await
        .unwrap()
        .call(common::messages(&mock.url()))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(common::status_count(&mock, "401"), 0);
    assert_eq!(common::status_count(&mock, "200"), 2);
    mock.shutdown().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

/// When the upstream revokes the old key before the refresh ran, the 401 makes the ring
/// re-read the file and the request is replayed with the new key.
#[tokio::test]
async fn a_401_rereads_the_file_and_replays() {
    let dir = common::scratch_dir("k8s-401");
    mount(&dir, "v1", K1);
    let mock = claude_mock::MockServer::builder()
        .api_key(K1)
        .start()
        .await
        .unwrap();
    let ring = KeyRing::new(
        FileSource::new(dir.join("api-key")),
        KeyRingConfig::default(),
    );
    ring.current().await.unwrap();
    mount(&dir, "v2", K2);
    mock.set_api_keys([K2]);
    let mut svc = ServiceBuilder::new()
        .layer(ApiKeyLayer::new(ring))
        .service(common::http_client());
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
    mock.shutdown().await;
    std::fs::remove_dir_all(&dir).unwrap();
}
