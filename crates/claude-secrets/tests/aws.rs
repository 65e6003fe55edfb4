//! The AWS Secrets Manager source against `moto_server` (PyPI `moto[server]`), started on a
//! free loopback port. Credentials and region come from the standard AWS chain: the tests
//! run in child processes whose environment (or shared config files) carry them, as a
//! deployment's would.
//!
//! Without `moto_server` on the PATH the test fails when `CI=true`, and otherwise prints why
//! it skips (to the real stderr, past the test harness's capture).
#![cfg(feature = "aws")]
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aws_sdk_secretsmanager::config::{BehaviorVersion, Credentials, Region};
use claude_secrets::config::AwsSecretsManagerConfig;
use claude_secrets::{
    AwsSecretsManagerSource, KeyRing, KeyRingConfig, SecretErrorKind, SecretSource,
};
use secrecy::ExposeSecret;

const K1: &str = "sk-ant-api03-AWSKEYONE-0123456789";
const K2: &str = "sk-ant-api03-AWSKEYTWO-0123456789";
const URL_VAR: &str = "CLAUDE_SECRETS_MOTO_URL";

/// A `moto_server` process, killed on drop.
struct Moto {
    child: Child,
    url: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_moto() -> Option<Moto> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let spawned = Command::new("moto_server")
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let why =
                "moto_server is not on the PATH (install it with `pip install 'moto[server]'`)";
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true: {why}"
            );
            let _ = writeln!(std::io::stderr(), "SKIPPED aws tests: {why}");
            return None;
        }
        Err(e) => panic!("cannot start moto_server: {e}"),
    };
    // Python takes a few seconds to start, longer on a busy machine: bounded wait.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            panic!("moto_server exited with {status}: {err}");
        }
        assert!(
            Instant::now() < deadline,
            "moto_server did not listen within 90 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Some(Moto {
        child,
        url: format!("http://127.0.0.1:{port}"),
    })
}

/// Environment for a child that must find nothing but what the test gives it.
fn isolated_env(dir: &std::path::Path) -> Vec<(String, String)> {
    vec![
        ("AWS_EC2_METADATA_DISABLED".into(), "true".into()),
        (
            "AWS_CONFIG_FILE".into(),
            dir.join("absent-config").display().to_string(),
        ),
        (
            "AWS_SHARED_CREDENTIALS_FILE".into(),
            dir.join("absent-credentials").display().to_string(),
        ),
    ]
}

fn run_child(name: &str, envs: &[(String, String)]) {
    let envs: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    common::run_child_clean(
        name,
        &envs,
        &[
            "AWS_PROFILE",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
            "AWS_REGION",
            "AWS_DEFAULT_REGION",
            "AWS_ENDPOINT_URL",
            "AWS_ROLE_ARN",
            "AWS_WEB_IDENTITY_TOKEN_FILE",
        ],
    );
}

/// A client with explicit test credentials, for setting up and rotating secrets.
fn admin(url: &str) -> aws_sdk_secretsmanager::Client {
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
            aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https();
    let conf = aws_sdk_secretsmanager::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("testing", "testing", None, None, "test"))
        .endpoint_url(url)
        .http_client(http)
        .build();
    aws_sdk_secretsmanager::Client::from_conf(conf)
}

fn source(secret_id: &str, field: Option<&str>) -> AwsSecretsManagerSource {
    AwsSecretsManagerSource::new(AwsSecretsManagerConfig {
        secret_id: secret_id.into(),
        field: field.map(str::to_owned),
        endpoint_url: Some(std::env::var(URL_VAR).unwrap()),
        ..AwsSecretsManagerConfig::default()
    })
    .unwrap()
}

#[tokio::test]
async fn secrets_manager_over_moto() {
    if common::is_child() {
        return secrets_manager_child().await;
    }
    let Some(moto) = start_moto() else { return };
    let dir = common::scratch_dir("aws");

    // 1. Credentials and region from environment variables.
    let mut env = isolated_env(&dir);
    env.extend([
        (URL_VAR.into(), moto.url.clone()),
        ("AWS_ACCESS_KEY_ID".into(), "testing".into()),
        ("AWS_SECRET_ACCESS_KEY".into(), "testing".into()),
        ("AWS_REGION".into(), "us-east-1".into()),
        ("CLAUDE_SECRETS_AWS_PREFIX".into(), "env".into()),
    ]);
    run_child("secrets_manager_over_moto", &env);

    // 2. Credentials and region from the shared files and a named profile.
    std::fs::write(
        dir.join("credentials"),
        "[claude]\naws_access_key_id = testing\naws_secret_access_key = testing\n",
    )
    .unwrap();
    std::fs::write(dir.join("config"), "[profile claude]\nregion = us-east-1\n").unwrap();
    let env = vec![
        ("AWS_EC2_METADATA_DISABLED".into(), "true".into()),
        (
            "AWS_CONFIG_FILE".into(),
            dir.join("config").display().to_string(),
        ),
        (
            "AWS_SHARED_CREDENTIALS_FILE".into(),
            dir.join("credentials").display().to_string(),
        ),
        ("AWS_PROFILE".into(), "claude".into()),
        (URL_VAR.into(), moto.url.clone()),
        ("CLAUDE_SECRETS_AWS_PREFIX".into(), "profile".into()),
    ];
    run_child("secrets_manager_over_moto", &env);
    drop(moto);
    std::fs::remove_dir_all(&dir).unwrap();
}

async fn secrets_manager_child() {
    let (_logs, logs) = common::capture_logs();
    let url = std::env::var(URL_VAR).unwrap();
    let prefix = std::env::var("CLAUDE_SECRETS_AWS_PREFIX").unwrap();
    let plain_id = format!("{prefix}/claude/plain");
    let json_id = format!("{prefix}/claude/json");
    let admin = admin(&url);
    admin
        .create_secret()
        .name(&plain_id)
        .secret_string(format!("{K1}\n"))
        .send()
        .await
        .unwrap();
    admin
        .create_secret()
        .name(&json_id)
        .secret_string(format!(r#"{{"api_key":"{K1}","team":"platform"}}"#))
        .send()
        .await
        .unwrap();

    // A plain string secret, through the standard chain.
    let plain = source(&plain_id, None);
    assert_eq!(plain.name(), format!("aws:{plain_id}"));
    let s1 = plain.fetch().await.unwrap();
    assert_eq!(s1.expose_secret(), K1);
    let v1 = s1.version().unwrap().to_owned();
    assert!(s1.created_at().is_some(), "CreatedDate is reported");

    // A JSON secret's field.
    let json = source(&json_id, Some("api_key"));
    assert_eq!(json.fetch().await.unwrap().expose_secret(), K1);
    let e = source(&json_id, Some("nope")).fetch().await.unwrap_err();
    assert_eq!(e.kind(), SecretErrorKind::Invalid);
    assert!(e.message().contains("no field `nope`"), "{e}");

    // Rotation (`PutSecretValue` makes a new AWSCURRENT version), seen by a key ring.
    let ring = KeyRing::new(plain, KeyRingConfig::default());
    assert_eq!(
        ring.current().await.unwrap().fingerprint(),
        s1.fingerprint()
    );
    admin
        .put_secret_value()
        .secret_id(&plain_id)
        .secret_string(K2)
        .send()
        .await
        .unwrap();
    let k2 = ring.refresh().await.unwrap();
    assert_eq!(k2.secret().expose_secret(), K2);
    assert_ne!(k2.version(), Some(v1.as_str()), "a new VersionId");

    // Missing secret.
    let e = source(&format!("{prefix}/claude/none"), None)
        .fetch()
        .await
        .unwrap_err();
    assert_eq!(e.kind(), SecretErrorKind::NotFound, "{e}");

    // The SDK's HTTPS client was built with an explicit provider: no process-level one was
    // needed (or installed), so a second provider in the graph could not make it panic.
    assert!(rustls::crypto::CryptoProvider::get_default().is_none());

    // The SDK logs at TRACE too: no key in them.
    let logs = logs.contents();
    assert!(
        logs.contains("GetSecretValue"),
        "SDK logs were not captured"
    );
    for k in [K1, K2, "AWSKEYONE", "AWSKEYTWO"] {
        assert!(!logs.contains(k), "a key appears in the AWS SDK's logs");
    }
}
