//! API keys for calls to the Claude API: loaded from the environment, files, HashiCorp Vault
//! or AWS Secrets Manager, rotated live, injected by a tower layer that refreshes and
//! replays once after a 401.
//!
//! # Why
//!
//! A key baked into a process at startup cannot be rotated without a restart, and a rotation
//! then means a window of 401s. Here a [`KeyRing`] keeps the current key of a
//! [`SecretSource`] fresh in the background; when the source is down it serves the last good
//! key for a bounded time (and says so); when the upstream rejects a key, the ring asks the
//! source once, however many requests were rejected, and [`ApiKeyLayer`] replays the request
//! with the new key. The key never appears in logs, `Debug` output, errors or metric labels:
//! they show a [`Fingerprint`].
//!
//! # Example
//!
//! ```
//! use claude_secrets::{ApiKeyLayer, KeyRing, KeyRingConfig, StaticSource};
//! use tower::{Service, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower::BoxError> {
//! // In production: EnvSource::new("ANTHROPIC_API_KEY"), FileSource::new(path),
//! // VaultSource::new(config)?, AwsSecretsManagerSource::new(config)?
//! let source = StaticSource::new("sk-ant-api03-first");
//! let ring = KeyRing::new(source.clone(), KeyRingConfig::default());
//!
//! let mut client = ServiceBuilder::new()
//!     .layer(ApiKeyLayer::new(ring.clone()))
//!     .service_fn(|req: http::Request<bytes::Bytes>| async move {
//!         // Stands in for the HTTP client (claude_core::FullBodyService over hyper-util).
//!         let ok = req.headers()["x-api-key"] == "sk-ant-api03-second";
//!         let status = if ok { 200 } else { 401 };
//!         Ok::<_, tower::BoxError>(http::Response::builder().status(status).body(())?)
//!     });
//!
//! ring.current().await?; // loads "first" (fail fast at startup)
//! source.set("sk-ant-api03-second"); // rotated; "first" is revoked upstream
//!
//! let req = http::Request::post("https://api.anthropic.com/v1/messages")
//!     .body(bytes::Bytes::from_static(b"{}"))?;
//! let resp = client.ready().await?.call(req).await?;
//! assert_eq!(resp.status(), 200); // 401 with "first", refreshed, replayed with "second"
//! assert!(!format!("{ring:?}").contains("sk-ant")); // Debug shows fingerprints only
//! # Ok(())
//! # }
//! ```
//!
//! # Pieces
//!
//! - [`SecretSource`]: an object-safe async trait returning a [`Secret`] (a
//!   `secrecy::SecretString`, zeroed on drop, with the source's version and creation time).
//!   Sources: [`EnvSource`], [`FileSource`] (re-read when the file changes, Kubernetes
//!   symlink swaps included), `VaultSource` (feature `vault`: KV v2 over our own hyper
//!   client), `AwsSecretsManagerSource` (feature `aws`: the official SDK with the standard
//!   credential and region chain), [`StaticSource`] (tests).
//! - [`KeyRing`]: the current key of a source; background refresh (default every 5 min),
//!   last-good serving up to [`max_staleness`](KeyRingConfig::max_staleness) (default 1 h),
//!   single-flight refresh after 401s, key age and rotation-period warnings.
//! - [`ApiKeyLayer`]: picks the ring by [`claude_core::Tenant`], removes the caller's
//!   `x-api-key`/`authorization`, sets `x-api-key` (sensitive), refreshes and replays once
//!   on 401.
//! - [`SecretsConfig`]: dev/test/prod environments of sources in one file, exactly one used,
//!   never sharing a source (see [`config`]).
//!
//! # Features
//!
//! | feature | adds | cost |
//! |---|---|---|
//! | (none, default) | env, file, static sources | nothing beyond the workspace's core crates |
//! | `vault` | `VaultSource` | hyper-rustls and rustls with ring (no new HTTP stack) |
//! | `aws` | `AwsSecretsManagerSource` | the AWS SDK (`aws-config`, `aws-sdk-secretsmanager`, about 90 crates) |
//!
//! MSRV: the workspace's. Cargo's MSRV-aware resolver (resolver 3) picks AWS crates that
//! build with it; the newest AWS releases need a newer Rust.
//!
//! # Metrics and logs
//!
//! Metrics (names in [`metric`]) carry one label naming the key, `source`: the ring's name,
//! which is the source's description (`vault:secret/claude/prod#api_key`), never the key.
//! `claude_secrets_refresh_total{source,trigger,result}`, `claude_secrets_stale{source}`
//! (1 while a key whose refresh failed is served), `claude_secrets_key_age_seconds{source}`,
//! `claude_secrets_auth_rejections_total{source,outcome}`.
//!
//! Logs (`tracing`): `info` when a key is loaded or rotated, `warn` when a refresh fails and
//! the last good key is served, when a key is older than the rotation period, and when a 401
//! is returned; `error` when no key can be served. They name keys by fingerprint.
//!
//! # What is zeroed, and what cannot be
//!
//! The ring's copies of the key (the `SecretString` and the shared `x-api-key` header buffer)
//! are zeroed when dropped. Transient copies outside our control are not: hyper's read and
//! write buffers, the JSON parse of a Vault or AWS answer, the kernel's socket buffers. Keep
//! core dumps off in production.
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod config;
mod future;
mod layer;
mod ring;
mod secret;
mod source;

pub use config::{ConfigError, SecretsConfig};
pub use future::ResponseFuture;
pub use layer::{ApiKey, ApiKeyLayer};
pub use ring::{KeyRing, KeyRingConfig, KeyRingStatus, LoadedKey, metric};
pub use secret::{Fingerprint, Secret, SecretError, SecretErrorKind};
#[cfg(feature = "aws")]
#[cfg_attr(docsrs, doc(cfg(feature = "aws")))]
pub use source::AwsSecretsManagerSource;
#[cfg(feature = "vault")]
#[cfg_attr(docsrs, doc(cfg(feature = "vault")))]
pub use source::VaultSource;
pub use source::{EnvSource, FetchFuture, FileSource, SecretSource, StaticSource};
