//! HashiCorp Vault KV version 2, over our own hyper-util client.

use std::fmt::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, StatusCode, Uri};
use http_body_util::Empty;
use hyper_rustls::{ConfigBuilderExt, HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use rustls::{ClientConfig, RootCertStore};
use serde::Deserialize;
use serde_json::value::RawValue;
use zeroize::Zeroizing;

use crate::config::VaultConfig;
use crate::secret::{Secret, SecretError, SecretErrorKind, json_error, json_string_field};
use crate::source::{FetchFuture, SecretSource};

/// The largest Vault answer read (a KV secret is a few hundred bytes).
const MAX_RESPONSE_BYTES: usize = 1024 * 1024;
/// The TCP connect timeout; the key ring's `fetch_timeout` bounds the whole fetch.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// `X-Vault-Token`.
const X_VAULT_TOKEN: &str = "x-vault-token";
/// `X-Vault-Namespace`.
const X_VAULT_NAMESPACE: &str = "x-vault-namespace";

/// Reads the key from a HashiCorp Vault KV version 2 secret.
///
/// Each fetch is one `GET {address}/v1/{mount}/data/{path}` with the `X-Vault-Token`
/// header (and `X-Vault-Namespace` when a namespace is set), the "read secret version"
/// call of the KV v2 HTTP API. From the answer
/// `{"data":{"data":{..},"metadata":{"created_time":..,"version":N,..}}}` the source takes
/// the configured field of `data.data` as the key, `metadata.version` as the version and
/// `metadata.created_time` as the creation time (so the ring can report the key's age).
/// Other fields of the secret are skipped without being copied.
///
/// # Why no Vault client crate
///
/// The call is one GET with one header. `vaultrs` would bring reqwest, rustify and
/// aws-lc-rs (about 70 crates, see the workspace research); this uses the hyper-util client
/// the workspace already has. Token renewal and auth methods are left to Vault Agent (or
/// whatever writes the token file): the source reads the token at every fetch from
/// [`token_file`](VaultConfig::token_file) or `VAULT_TOKEN`.
///
/// # TLS
///
/// rustls with the **ring provider passed explicitly**, so neither a missing process-level
/// provider nor aws-lc-rs elsewhere in the application can make it panic. It trusts the CA
/// file of [`ca_cert`](VaultConfig::ca_cert) / `VAULT_CACERT` when set (like the Vault CLI),
/// else the system trust store. HTTP/1.1 only: one small GET every few minutes gains nothing
/// from HTTP/2. No connection is kept between fetches (they are minutes apart, and a pooled
/// connection closed by the server in between is a failure waiting to happen).
///
/// # Errors
///
/// [`SecretErrorKind::Denied`] for a 403 or a missing token, [`SecretErrorKind::NotFound`]
/// for a 404 (no such secret, or its latest version is deleted or destroyed),
/// [`SecretErrorKind::Invalid`] for a malformed answer or a missing field,
/// [`SecretErrorKind::Unavailable`] for connection failures and other statuses (a sealed
/// Vault answers 503).
pub struct VaultSource {
    config: VaultConfig,
    address: String,
    uri: Uri,
    namespace: Option<HeaderValue>,
    name: String,
    client: Client<HttpsConnector<HttpConnector>, Empty<Bytes>>,
}

impl VaultSource {
    /// Builds the source: resolves `VAULT_ADDR`, `VAULT_NAMESPACE` and `VAULT_CACERT` for
    /// unset fields and loads the CA file. Nothing is sent yet.
    ///
    /// # Errors
    ///
    /// [`SecretErrorKind::Invalid`] when there is no address or path, the address is not an
    /// `http`/`https` URL, or the CA file cannot be read or holds no certificate; when no
    /// CA file is set for an `https` address and the system trust store is empty.
    pub fn new(mut config: VaultConfig) -> Result<Self, SecretError> {
        let invalid = |m: String| SecretError::new(SecretErrorKind::Invalid, m);
        let address = config
            .address
            .clone()
            .or_else(|| non_empty_env("VAULT_ADDR"))
            .ok_or_else(|| invalid("no Vault address: set `address` or VAULT_ADDR".into()))?;
        let address = address.trim().trim_end_matches('/').to_owned();
        config.address = Some(address.clone());
        if config.namespace.is_none() {
            config.namespace = non_empty_env("VAULT_NAMESPACE");
        }
        if config.ca_cert.is_none() {
            config.ca_cert = non_empty_env("VAULT_CACERT").map(PathBuf::from);
        }
        let trim = |s: &str| {
            s.trim_matches(|c: char| c == '/' || c.is_whitespace())
                .to_owned()
        };
        let (mount, path) = (trim(&config.mount), trim(&config.path));
        if path.is_empty() || mount.is_empty() {
            return Err(invalid(
                "the Vault `mount` and `path` must not be empty".into(),
            ));
        }
        let uri: Uri = format!(
            "{address}/v1/{}/data/{}",
            encode_path(&mount),
            encode_path(&path)
        )
        .parse()
        .map_err(|e| invalid(format!("invalid Vault address `{address}`: {e}")))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => {
                return Err(invalid(format!(
                    "the Vault address `{address}` must start with http:// or https://"
                )));
            }
        };
        let namespace = config
            .namespace
            .as_deref()
            .map(|ns| {
                HeaderValue::from_str(ns.trim_matches('/'))
                    .map_err(|_| invalid(format!("invalid Vault namespace `{ns}`")))
            })
            .transpose()?;
        let tls = tls_config(https, config.ca_cert.as_deref())?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(CONNECT_TIMEOUT));
        let connector = HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .build(connector);
        let name = match &config.namespace {
            Some(ns) => format!(
                "vault:{}/{mount}/{path}#{}",
                ns.trim_matches('/'),
                config.field
            ),
            None => format!("vault:{mount}/{path}#{}", config.field),
        };
        Ok(Self {
            config,
            address,
            uri,
            namespace,
            name,
            client,
        })
    }

    /// The configuration in force (environment defaults resolved).
    pub fn config(&self) -> &VaultConfig {
        &self.config
    }

    async fn token(&self) -> Result<HeaderValue, SecretError> {
        let denied = |m: String| SecretError::new(SecretErrorKind::Denied, m);
        let token = match &self.config.token_file {
            Some(path) => Zeroizing::new(tokio::fs::read_to_string(path).await.map_err(|e| {
                denied(format!(
                    "cannot read the Vault token file {}: {e}",
                    path.display()
                ))
            })?),
            None => Zeroizing::new(std::env::var(&self.config.token_env).map_err(|_| {
                denied(format!(
                    "no Vault token: set {} or `token_file`",
                    self.config.token_env
                ))
            })?),
        };
        let token = token.trim();
        if token.is_empty() {
            return Err(denied("the Vault token is empty".into()));
        }
        let mut value = HeaderValue::from_str(token)
            .map_err(|_| denied("the Vault token is not a valid header value".into()))?;
        value.set_sensitive(true);
        Ok(value)
    }

    async fn read(&self) -> Result<Secret, SecretError> {
        let mut req = Request::get(self.uri.clone())
            .body(Empty::new())
            .map_err(|e| SecretError::new(SecretErrorKind::Invalid, format!("{e}")))?;
        req.headers_mut().insert(X_VAULT_TOKEN, self.token().await?);
        if let Some(ns) = &self.namespace {
            req.headers_mut().insert(X_VAULT_NAMESPACE, ns.clone());
        }
        let resp = self.client.request(req).await.map_err(|e| {
            SecretError::new(
                SecretErrorKind::Unavailable,
                format!("cannot reach Vault at {}: {}", self.address, chain(&e)),
            )
            .with_cause(e)
        })?;
        let status = resp.status();
        let body = claude_core::collect_body(resp.into_body(), MAX_RESPONSE_BYTES)
            .await
            .map_err(|e| {
                SecretError::new(
                    SecretErrorKind::Unavailable,
                    format!("reading Vault's answer failed: {e}"),
                )
            })?;
        let what = format!("Vault secret {}", self.name);
        if status != StatusCode::OK {
            return Err(status_error(status, &body, &what));
        }
        let text = std::str::from_utf8(&body).map_err(|_| {
            SecretError::new(
                SecretErrorKind::Invalid,
                format!("{what}: answer is not UTF-8"),
            )
        })?;
        let envelope: Envelope<'_> = serde_json::from_str(text)
            .map_err(|e| json_error(&format!("the answer for {what}"), &e))?;
        let kv = envelope.data.ok_or_else(|| {
            SecretError::new(
                SecretErrorKind::Invalid,
                format!("{what}: answer has no `data`"),
            )
        })?;
        let meta = kv.metadata.unwrap_or_default();
        let Some(data) = kv.data.filter(|d| d.get() != "null") else {
            let state = if meta.destroyed == Some(true) {
                "destroyed"
            } else {
                "deleted"
            };
            return Err(SecretError::new(
                SecretErrorKind::NotFound,
                format!("{what}: the latest version is {state}"),
            ));
        };
        let value = json_string_field(&what, data.get(), &self.config.field)?;
        let mut secret = Secret::new(value);
        if let Some(v) = meta.version {
            secret = secret.with_version(v.to_string());
        }
        if let Some(t) = meta
            .created_time
            .as_deref()
            .and_then(claude_core::headers::parse_rfc3339)
        {
            secret = secret.with_created_at(t);
        }
        Ok(secret)
    }
}

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow)]
    data: Option<KvData<'a>>,
}

#[derive(Deserialize)]
struct KvData<'a> {
    #[serde(borrow)]
    data: Option<&'a RawValue>,
    metadata: Option<KvMetadata>,
}

#[derive(Deserialize, Default)]
struct KvMetadata {
    created_time: Option<String>,
    version: Option<u64>,
    destroyed: Option<bool>,
}

#[derive(Deserialize)]
struct ErrorBody {
    #[serde(default)]
    errors: Vec<String>,
}

fn status_error(status: StatusCode, body: &[u8], what: &str) -> SecretError {
    // Vault's `errors` are its own messages ("permission denied"); keep a bounded excerpt.
    let mut detail = serde_json::from_slice::<ErrorBody>(body)
        .map(|b| b.errors.join("; "))
        .unwrap_or_default();
    if detail.len() > 200 {
        let cut = (0..=200)
            .rev()
            .find(|&i| detail.is_char_boundary(i))
            .unwrap_or(0);
        detail.truncate(cut);
        detail.push('…');
    }
    let detail = if detail.is_empty() {
        String::new()
    } else {
        format!(" ({detail})")
    };
    let (kind, msg) = match status {
        StatusCode::FORBIDDEN => (
            SecretErrorKind::Denied,
            "permission denied: the token is invalid or may not read this path",
        ),
        StatusCode::NOT_FOUND => (SecretErrorKind::NotFound, "no such secret"),
        StatusCode::SERVICE_UNAVAILABLE => (
            SecretErrorKind::Unavailable,
            "Vault is sealed or in maintenance",
        ),
        _ => (SecretErrorKind::Unavailable, "Vault answered with an error"),
    };
    SecretError::new(kind, format!("{what}: {msg}: {status}{detail}"))
}

fn tls_config(https: bool, ca_cert: Option<&Path>) -> Result<ClientConfig, SecretError> {
    let invalid = |m: String| SecretError::new(SecretErrorKind::Invalid, m);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid(format!("TLS setup failed: {e}")))?;
    let config = if let Some(path) = ca_cert {
        let pem = std::fs::read(path)
            .map_err(|e| invalid(format!("cannot read the CA file {}: {e}", path.display())))?;
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| {
                invalid(format!(
                    "the CA file {} is not valid PEM: {e}",
                    path.display()
                ))
            })?;
            roots.add(cert).map_err(|e| {
                invalid(format!(
                    "a certificate in {} is unusable: {e}",
                    path.display()
                ))
            })?;
        }
        if roots.is_empty() {
            return Err(invalid(format!(
                "the CA file {} holds no certificate",
                path.display()
            )));
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    } else if https {
        builder
            .with_native_roots()
            .map_err(|e| invalid(format!("cannot load the system's CA certificates: {e}")))?
            .with_no_client_auth()
    } else {
        // Plain http: TLS is never used, so do not require a trust store.
        builder
            .with_root_certificates(RootCertStore::empty())
            .with_no_client_auth()
    };
    Ok(config)
}

/// Percent-encodes everything but unreserved characters and `/`.
fn encode_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for b in path.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'/') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

fn non_empty_env(var: &str) -> Option<String> {
    std::env::var(var).ok().filter(|v| !v.trim().is_empty())
}

/// An error and its sources, joined with `: `.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

impl fmt::Debug for VaultSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let token = match &self.config.token_file {
            Some(p) => format!("file:{}", p.display()),
            None => format!("env:{}", self.config.token_env),
        };
        f.debug_struct("VaultSource")
            .field("address", &self.address)
            .field("namespace", &self.config.namespace)
            .field("mount", &self.config.mount)
            .field("path", &self.config.path)
            .field("field", &self.config.field)
            .field("token", &token)
            .field("ca_cert", &self.config.ca_cert)
            .finish_non_exhaustive()
    }
}

impl SecretSource for VaultSource {
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

    fn config(address: &str) -> VaultConfig {
        VaultConfig {
            address: Some(address.into()),
            path: "claude/prod".into(),
            ..VaultConfig::default()
        }
    }

    #[test]
    fn builds_the_kv2_read_url() {
        let s = VaultSource::new(VaultConfig {
            mount: "/kv team/".into(),
            path: "claude/prod key".into(),
            ..config("http://127.0.0.1:8200/")
        })
        .unwrap();
        assert_eq!(
            s.uri.to_string(),
            "http://127.0.0.1:8200/v1/kv%20team/data/claude/prod%20key"
        );
        assert_eq!(s.name(), "vault:kv team/claude/prod key#api_key");
    }

    #[test]
    fn https_client_builds_with_an_explicit_provider() {
        // Building the TLS config must not go through the process-level provider
        // (rust-ecosystem pitfall 12): `ClientConfig::builder()` would install one (or panic
        // with two compiled in), and none is installed afterwards.
        let s = VaultSource::new(config("https://vault.example:8200"));
        assert!(s.is_ok(), "{:?}", s.err());
        assert!(rustls::crypto::CryptoProvider::get_default().is_none());
    }

    #[test]
    fn bad_settings_are_refused() {
        for (c, needle) in [
            (config("ftp://x"), "must start with"),
            (
                VaultConfig {
                    path: " / ".into(),
                    ..config("http://x")
                },
                "must not be empty",
            ),
            (
                VaultConfig {
                    ca_cert: Some("/nonexistent/ca.pem".into()),
                    ..config("https://x")
                },
                "cannot read the CA file",
            ),
        ] {
            let e = VaultSource::new(c).unwrap_err();
            assert_eq!(e.kind(), SecretErrorKind::Invalid);
            assert!(e.message().contains(needle), "{e}");
        }
    }

    #[test]
    fn status_errors() {
        let e = status_error(
            StatusCode::FORBIDDEN,
            br#"{"errors":["permission denied"]}"#,
            "Vault secret x",
        );
        assert_eq!(e.kind(), SecretErrorKind::Denied);
        assert!(e.message().contains("(permission denied)"), "{e}");
        let e = status_error(StatusCode::NOT_FOUND, br#"{"errors":[]}"#, "x");
        assert_eq!(e.kind(), SecretErrorKind::NotFound);
        let e = status_error(StatusCode::SERVICE_UNAVAILABLE, b"", "x");
        assert_eq!(e.kind(), SecretErrorKind::Unavailable);
        let long = format!(r#"{{"errors":["{}"]}}"#, "é".repeat(300));
        let e = status_error(StatusCode::INTERNAL_SERVER_ERROR, long.as_bytes(), "x");
        assert!(e.message().len() < 300);
    }
}
