//! The Vault KV v2 source over HTTP and HTTPS against a local server speaking the Vault API.
#![cfg(feature = "vault")]
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, SystemTime};

use claude_secrets::config::VaultConfig;
use claude_secrets::{SecretErrorKind, SecretSource, VaultSource};
use common::{VAULT_NANOS, VaultServer};
use secrecy::ExposeSecret;
use serde_json::json;

const TOKEN: &str = "hvs.test-token-for-claude-secrets";
const K1: &str = "sk-ant-api03-vault-one";
const K2: &str = "sk-ant-api03-vault-two";

fn config(vault: &VaultServer, token_file: &std::path::Path) -> VaultConfig {
    VaultConfig {
        address: Some(vault.url()),
        mount: "secret".into(),
        path: "claude/prod".into(),
        field: "api_key".into(),
        token_file: Some(token_file.to_owned()),
        ..VaultConfig::default()
    }
}

fn token_file(tag: &str, token: &str) -> std::path::PathBuf {
    let path = common::scratch_dir(tag).join("token");
    std::fs::write(&path, format!("{token}\n")).unwrap();
    path
}

#[tokio::test]
async fn reads_the_field_version_and_creation_time_and_sees_new_versions() {
    let vault = VaultServer::start(TOKEN).await;
    let created = SystemTime::UNIX_EPOCH + Duration::from_secs(1_790_000_000);
    vault.put_created(
        "secret",
        "claude/prod",
        json!({"api_key": K1, "note": {"owner": "platform"}, "n": 3}),
        created,
    );
    let source = VaultSource::new(config(&vault, &token_file("v-read", TOKEN))).unwrap();
    assert_eq!(source.name(), "vault:secret/claude/prod#api_key");

    let s = source.fetch().await.unwrap();
    assert_eq!(s.expose_secret(), K1);
    assert_eq!(s.version(), Some("1"));
    assert_eq!(
        s.created_at(),
        Some(created + Duration::from_nanos(u64::from(VAULT_NANOS)))
    );

    // A new version (`vault kv put`): the next fetch returns it.
    vault.put("secret", "claude/prod", json!({"api_key": K2}));
    let s = source.fetch().await.unwrap();
    assert_eq!((s.expose_secret(), s.version()), (K2, Some("2")));
    assert_eq!(vault.reads(), 2);
    assert_eq!(vault.seen_namespaces(), vec![None, None]);
}

#[tokio::test]
async fn namespace_is_sent_and_required() {
    let vault = VaultServer::start_with(TOKEN, Some("team-a"), None).await;
    vault.put("secret", "claude/prod", json!({"api_key": K1}));
    let tf = token_file("v-ns", TOKEN);
    let with_ns = VaultSource::new(VaultConfig {
        namespace: Some("team-a/".into()),
        ..config(&vault, &tf)
    })
    .unwrap();
    assert_eq!(with_ns.name(), "vault:team-a/secret/claude/prod#api_key");
    assert_eq!(with_ns.fetch().await.unwrap().expose_secret(), K1);
    assert_eq!(vault.seen_namespaces(), vec![Some("team-a".to_owned())]);
    // The same token outside the namespace is refused.
    let without = VaultSource::new(config(&vault, &tf)).unwrap();
    assert_eq!(
        without.fetch().await.unwrap_err().kind(),
        SecretErrorKind::Denied
    );
}

#[tokio::test]
async fn the_token_file_is_read_at_every_fetch() {
    let vault = VaultServer::start(TOKEN).await;
    vault.put("secret", "claude/prod", json!({"api_key": K1}));
    let tf = token_file("v-token", TOKEN);
    let source = VaultSource::new(config(&vault, &tf)).unwrap();
    assert!(source.fetch().await.is_ok());
    // Vault Agent renews the token: the server now wants the new one...
    vault.set_token("hvs.renewed");
    let e = source.fetch().await.unwrap_err();
    assert_eq!(e.kind(), SecretErrorKind::Denied);
    assert!(e.message().contains("permission denied"), "{e}");
    // ... and the agent rewrites the file.
    std::fs::write(&tf, "hvs.renewed").unwrap();
    assert_eq!(source.fetch().await.unwrap().expose_secret(), K1);
}

/// `VAULT_ADDR` and `VAULT_TOKEN` are used when the configuration leaves them out, as with
/// the Vault CLI (run in a child process that has them in its environment).
#[tokio::test]
async fn vault_addr_and_vault_token_come_from_the_environment() {
    if !common::is_child() {
        let vault = VaultServer::start(TOKEN).await;
        vault.put("secret", "claude/prod", json!({"api_key": K1}));
        let url = vault.url();
        // The child's runtime is its own; serve from a thread that outlives this call.
        let child = tokio::task::spawn_blocking(move || {
            common::run_child(
                "vault_addr_and_vault_token_come_from_the_environment",
                &[("VAULT_ADDR", &url), ("VAULT_TOKEN", TOKEN)],
            );
        });
        child.await.unwrap();
        assert_eq!(vault.reads(), 1);
        return;
    }
    let source = VaultSource::new(VaultConfig {
        path: "claude/prod".into(),
        ..VaultConfig::default()
    })
    .unwrap();
    assert_eq!(source.fetch().await.unwrap().expose_secret(), K1);
}

#[tokio::test]
async fn failures_are_classified() {
    let vault = VaultServer::start(TOKEN).await;
    vault.put(
        "secret",
        "claude/prod",
        json!({"api_key": 42, "nested": {"api_key": K1}}),
    );
    vault.put("secret", "claude/deleted", json!({"api_key": K1}));
    vault.delete_latest("secret", "claude/deleted");
    let tf = token_file("v-err", TOKEN);
    let source = |path: &str, field: &str| {
        VaultSource::new(VaultConfig {
            path: path.into(),
            field: field.into(),
            ..config(&vault, &tf)
        })
        .unwrap()
    };
    let cases = [
        (
            source("claude/prod", "api_key"),
            SecretErrorKind::Invalid,
            "not a string",
        ),
        (
            source("claude/prod", "missing"),
            SecretErrorKind::Invalid,
            "no field `missing`",
        ),
        (
            source("claude/none", "api_key"),
            SecretErrorKind::NotFound,
            "no such secret",
        ),
        (
            source("claude/deleted", "api_key"),
            SecretErrorKind::NotFound,
            "deleted",
        ),
    ];
    for (s, kind, needle) in &cases {
        let e = s.fetch().await.unwrap_err();
        assert_eq!(e.kind(), *kind, "{e}");
        assert!(e.message().contains(needle), "{e}");
        assert!(!format!("{e:?}").contains(K1), "{e:?}");
    }

    let wrong_token = VaultSource::new(config(&vault, &token_file("v-err2", "hvs.wrong"))).unwrap();
    assert_eq!(
        wrong_token.fetch().await.unwrap_err().kind(),
        SecretErrorKind::Denied
    );
    let no_token = VaultSource::new(VaultConfig {
        token_file: None,
        token_env: "CLAUDE_SECRETS_SURELY_UNSET_TOKEN".into(),
        ..config(&vault, &tf)
    })
    .unwrap();
    let e = no_token.fetch().await.unwrap_err();
    assert_eq!(e.kind(), SecretErrorKind::Denied);
    assert!(
        e.message().contains("CLAUDE_SECRETS_SURELY_UNSET_TOKEN"),
        "{e}"
    );

    vault.set_sealed(true);
    let e = cases[0].0.fetch().await.unwrap_err();
    assert_eq!(e.kind(), SecretErrorKind::Unavailable);
    assert!(e.message().contains("sealed"), "{e}");

    let good = source("claude/prod", "api_key");
    vault.shutdown().await;
    let e = good.fetch().await.unwrap_err();
    assert_eq!(e.kind(), SecretErrorKind::Unavailable);
    assert!(e.message().contains("cannot reach Vault"), "{e}");
}

#[tokio::test]
async fn https_with_the_configured_ca_and_refused_without_it() {
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let cert = std::fs::read(fixtures.join("server.pem")).unwrap();
    let key = std::fs::read(fixtures.join("server.key")).unwrap();
    let vault = VaultServer::start_with(TOKEN, None, Some((&cert, &key))).await;
    assert!(vault.url().starts_with("https://127.0.0.1:"));
    vault.put("secret", "claude/prod", json!({"api_key": K1}));
    let tf = token_file("v-tls", TOKEN);

    let trusted = VaultSource::new(VaultConfig {
        ca_cert: Some(fixtures.join("ca.pem")),
        ..config(&vault, &tf)
    })
    .unwrap();
    assert_eq!(trusted.fetch().await.unwrap().expose_secret(), K1);

    // The system trust store does not know the test CA: the certificate is refused. (On a
    // machine without a system trust store, building the https client already refuses.)
    match VaultSource::new(config(&vault, &tf)) {
        Ok(untrusted) => {
            let e = untrusted.fetch().await.unwrap_err();
            assert_eq!(e.kind(), SecretErrorKind::Unavailable);
            assert!(e.message().to_lowercase().contains("certificate"), "{e}");
        }
        Err(e) => assert!(e.message().contains("system's CA certificates"), "{e}"),
    }
    assert_eq!(
        vault.reads(),
        1,
        "the untrusted client never got to send its request"
    );
    // Client and server passed ring explicitly: no process-level provider was needed.
    assert!(rustls::crypto::CryptoProvider::get_default().is_none());
}
