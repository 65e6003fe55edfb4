//! The environment source over its real protocol: a process started with the variable set.
#![allow(clippy::unwrap_used)]

mod common;

use claude_secrets::{
    ApiKeyLayer, EnvSource, KeyRing, KeyRingConfig, SecretErrorKind, SecretSource,
};
use secrecy::ExposeSecret;
use tower::{Service, ServiceBuilder, ServiceExt};

const VAR: &str = "CLAUDE_SECRETS_TEST_API_KEY";
const KEY: &str = "sk-ant-api03-env-0123456789";

/// The parent runs this same test in a child process whose environment holds the key (with
/// a trailing newline, as `export K="$(cat file)\n"` would leave); the child reads it and
/// calls claude-mock with it.
#[tokio::test]
async fn env_source_reads_the_process_environment_and_authenticates() {
    if !common::is_child() {
        common::run_child(
            "env_source_reads_the_process_environment_and_authenticates",
            &[
                (VAR, &format!("{KEY}\n")),
                ("CLAUDE_SECRETS_TEST_EMPTY", "  "),
            ],
        );
        return;
    }
    let source = EnvSource::new(VAR);
    let secret = source.fetch().await.unwrap();
    assert_eq!(secret.expose_secret(), KEY);
    assert_eq!(secret.version(), None);
    assert_eq!(secret.created_at(), None);

    let e = EnvSource::new("CLAUDE_SECRETS_TEST_EMPTY")
        .fetch()
        .await
        .unwrap_err();
    assert_eq!(e.kind(), SecretErrorKind::Invalid);

    let mock = claude_mock::MockServer::builder()
        .api_key(KEY)
        .start()
        .await
        .unwrap();
    let ring = KeyRing::new(source, KeyRingConfig::default());
    assert_eq!(ring.name(), "env:CLAUDE_SECRETS_TEST_API_KEY");
    let mut svc = ServiceBuilder::new()
        .layer(ApiKeyLayer::new(ring))
        .service(common::http_client());
    let resp = svc
        .ready()
        .await
        .unwrap()
        .call(common::messages_with(
            &mock.url(),
            &[("x-api-key", "sk-wrong")],
        ))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{}", common::body_text(resp).await);
    assert_eq!(common::status_count(&mock, "200"), 1);
    mock.shutdown().await;
}
