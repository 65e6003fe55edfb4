//! AWS Secrets Manager, through the official SDK.

use std::fmt;
use std::time::SystemTime;

use aws_config::{BehaviorVersion, Region};
use aws_sdk_secretsmanager::Client;
use aws_sdk_secretsmanager::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_secretsmanager::operation::get_secret_value::GetSecretValueError;
use aws_smithy_http_client::tls;
use zeroize::Zeroize;

use crate::config::AwsSecretsManagerConfig;
use crate::secret::{Secret, SecretError, SecretErrorKind, json_string_field, secret_from_text};
use crate::source::{FetchFuture, SecretSource};

/// Reads the key from an AWS Secrets Manager secret (`GetSecretValue`).
///
/// The secret string is the key itself, or, when [`field`](AwsSecretsManagerConfig::field)
/// is set, a JSON object whose string field holds it (the console's key/value form). A
/// binary secret is used when it is UTF-8. The version is the `VersionId` and the creation
/// time the version's `CreatedDate`, so the ring can report the key's age.
///
/// # Why the SDK
///
/// The issue asks for the standard AWS credential and region resolution: environment,
/// shared config and credentials files with profiles, `credential_process`, SSO, web
/// identity (EKS IRSA), ECS task roles and EC2 instance metadata (IMDSv2). `aws-config`
/// implements all of it; signing requests with `aws-sigv4` alone would be lighter (about 33
/// extra crates instead of about 89) but would leave us reimplementing and maintaining
/// that chain, which is where the security-sensitive subtleties are. The feature is opt-in,
/// so nobody else pays for it.
///
/// # TLS and the crypto provider
///
/// The SDK's HTTPS client is built here with rustls and the **ring provider chosen
/// explicitly** (`aws-smithy-http-client` feature `rustls-ring`; aws-config's and the SDK's
/// default features, which would pull aws-lc-rs, are off). Nothing depends on a
/// process-level rustls provider, so no combination of providers in the application can
/// make it panic.
///
/// # Construction
///
/// [`new`](Self::new) is synchronous and cheap: the SDK configuration (credential chain,
/// region) is loaded on the first fetch, on the runtime that runs it.
///
/// # Errors
///
/// [`SecretErrorKind::NotFound`] (`ResourceNotFoundException`), [`SecretErrorKind::Denied`]
/// (`AccessDeniedException`, `DecryptionFailure`, credentials refused),
/// [`SecretErrorKind::Invalid`] (a parameter or request the service refuses, a missing
/// field, a non-UTF-8 binary), [`SecretErrorKind::Unavailable`] (no credentials or region,
/// connection failures, throttling, 5xx).
pub struct AwsSecretsManagerSource {
    config: AwsSecretsManagerConfig,
    name: String,
    client: tokio::sync::OnceCell<Client>,
}

impl AwsSecretsManagerSource {
    /// A source for `config`; the SDK is set up on first fetch.
    ///
    /// # Errors
    ///
    /// [`SecretErrorKind::Invalid`] when `secret_id` is empty.
    pub fn new(config: AwsSecretsManagerConfig) -> Result<Self, SecretError> {
        Self::build(config, tokio::sync::OnceCell::new())
    }

    /// A source using a client you built (your own `SdkConfig`, credentials, interceptors).
    /// `region`, `profile` and `endpoint_url` of `config` are then ignored.
    ///
    /// # Errors
    ///
    /// [`SecretErrorKind::Invalid`] when `secret_id` is empty.
    pub fn with_client(
        client: Client,
        config: AwsSecretsManagerConfig,
    ) -> Result<Self, SecretError> {
        Self::build(config, tokio::sync::OnceCell::new_with(Some(client)))
    }

    fn build(
        config: AwsSecretsManagerConfig,
        client: tokio::sync::OnceCell<Client>,
    ) -> Result<Self, SecretError> {
        if config.secret_id.trim().is_empty() {
            return Err(SecretError::new(
                SecretErrorKind::Invalid,
                "the AWS `secret_id` must not be empty",
            ));
        }
        let name = match &config.field {
            Some(f) => format!("aws:{}#{f}", config.secret_id),
            None => format!("aws:{}", config.secret_id),
        };
        Ok(Self {
            config,
            name,
            client,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &AwsSecretsManagerConfig {
        &self.config
    }

    async fn client(&self) -> &Client {
        self.client
            .get_or_init(|| async {
                let http = aws_smithy_http_client::Builder::new()
                    .tls_provider(tls::Provider::Rustls(
                        tls::rustls_provider::CryptoMode::Ring,
                    ))
                    .build_https();
                let mut loader = aws_config::defaults(BehaviorVersion::latest()).http_client(http);
                if let Some(region) = &self.config.region {
                    loader = loader.region(Region::new(region.clone()));
                }
                if let Some(profile) = &self.config.profile {
                    loader = loader.profile_name(profile);
                }
                let sdk = loader.load().await;
                // The endpoint override applies to Secrets Manager only, never to the
                // credential providers (STS, SSO) built from the same configuration.
                let mut conf = aws_sdk_secretsmanager::config::Builder::from(&sdk);
                if let Some(url) = &self.config.endpoint_url {
                    conf = conf.endpoint_url(url);
                }
                Client::from_conf(conf.build())
            })
            .await
    }

    async fn read(&self) -> Result<Secret, SecretError> {
        let what = format!("AWS secret {}", self.config.secret_id);
        let out = self
            .client()
            .await
            .get_secret_value()
            .secret_id(&self.config.secret_id)
            .set_version_stage(self.config.version_stage.clone())
            .send()
            .await
            .map_err(|e| map_error(&e, &what))?;
        let version = out.version_id.clone();
        let created_at = out.created_date.and_then(|d| SystemTime::try_from(d).ok());
        let text = match (out.secret_string, out.secret_binary) {
            (Some(s), _) => s,
            (None, Some(blob)) => String::from_utf8(blob.into_inner()).map_err(|e| {
                e.into_bytes().zeroize();
                SecretError::new(
                    SecretErrorKind::Invalid,
                    format!("{what}: the binary secret is not UTF-8"),
                )
            })?,
            (None, None) => {
                return Err(SecretError::new(
                    SecretErrorKind::Invalid,
                    format!("{what}: the answer holds no secret value"),
                ));
            }
        };
        let value = match &self.config.field {
            Some(field) => {
                let text = zeroize::Zeroizing::new(text);
                json_string_field(&what, &text, field)?
            }
            None => secret_from_text(text)
                .map_err(|e| SecretError::new(e.kind(), format!("{what}: {}", e.message())))?,
        };
        let mut secret = Secret::new(value);
        if let Some(v) = version {
            secret = secret.with_version(v);
        }
        if let Some(t) = created_at {
            secret = secret.with_created_at(t);
        }
        Ok(secret)
    }
}

fn map_error<R: fmt::Debug>(e: &SdkError<GetSecretValueError, R>, what: &str) -> SecretError {
    let kind = match e {
        SdkError::ServiceError(se) => match se.err() {
            GetSecretValueError::ResourceNotFoundException(_) => SecretErrorKind::NotFound,
            GetSecretValueError::DecryptionFailure(_) => SecretErrorKind::Denied,
            GetSecretValueError::InvalidParameterException(_)
            | GetSecretValueError::InvalidRequestException(_) => SecretErrorKind::Invalid,
            other => match other.code() {
                Some(
                    "AccessDeniedException"
                    | "UnrecognizedClientException"
                    | "InvalidClientTokenId"
                    | "InvalidSignatureException"
                    | "ExpiredTokenException",
                ) => SecretErrorKind::Denied,
                _ => SecretErrorKind::Unavailable,
            },
        },
        _ => SecretErrorKind::Unavailable,
    };
    SecretError::new(kind, format!("{what}: {}", DisplayErrorContext(e)))
}

impl fmt::Debug for AwsSecretsManagerSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AwsSecretsManagerSource")
            .field("config", &self.config)
            .field("client_ready", &self.client.initialized())
            .finish_non_exhaustive()
    }
}

impl SecretSource for AwsSecretsManagerSource {
    fn name(&self) -> &str {
        &self.name
    }

    fn fetch(&self) -> FetchFuture<'_> {
        Box::pin(self.read())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_validation() {
        let s = AwsSecretsManagerSource::new(AwsSecretsManagerConfig {
            secret_id: "prod/claude".into(),
            field: Some("api_key".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(s.name(), "aws:prod/claude#api_key");
        let e = AwsSecretsManagerSource::new(AwsSecretsManagerConfig::default()).unwrap_err();
        assert_eq!(e.kind(), SecretErrorKind::Invalid);
    }
}
