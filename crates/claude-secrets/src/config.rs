//! Configuration: sources, environments, and building an [`ApiKeyLayer`] from them.
//!
//! ```toml
//! environment = "prod"            # which environment's keys this process uses
//!
//! [ring]                          # KeyRingConfig for every ring (all optional)
//! refresh_interval = "5m"
//! max_staleness = "1h"
//!
//! [environments.prod.default]
//! source = "vault"
//! address = "https://vault.internal:8200"
//! mount = "secret"
//! path = "claude/prod"
//! field = "api_key"
//!
//! [environments.prod.tenants.team-a]
//! source = "aws"
//! secret_id = "prod/claude/team-a"
//! field = "api_key"
//!
//! [environments.dev.default]
//! source = "env"
//! var = "ANTHROPIC_API_KEY_DEV"
//! ```
//!
//! # Keeping environments apart
//!
//! Keys of every environment can live in one file, and exactly one environment is used:
//!
//! - [`SecretsConfig::environment`] names it. It is required when more than one environment
//!   is defined (a process never guesses between dev and prod); an unknown name is an error,
//!   never a fallback.
//! - Only the selected environment's sources are built: a prod process never reads, fetches
//!   or even stats a dev key.
//! - Two environments may not share a source (the same variable, file, Vault secret or AWS
//!   secret): [`SecretsConfig::validate`] refuses it, so a dev key cannot be promoted to prod
//!   by a copy-pasted path.
//! - There is no `static` source in configuration: a literal key in a config file would be a
//!   secret in a config file. Use [`StaticSource`](crate::StaticSource) from code (tests).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::PathBuf;

use serde::Deserialize;

use crate::layer::ApiKeyLayer;
use crate::ring::{KeyRing, KeyRingConfig};
use crate::source::SecretSource;

/// The secrets configuration: environments of sources and the ring settings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SecretsConfig {
    /// The environment whose keys this process uses. Required when more than one
    /// environment is defined; with exactly one, that one is used.
    pub environment: Option<String>,
    /// Environments by name (`dev`, `test`, `prod`, ...).
    pub environments: BTreeMap<String, EnvironmentConfig>,
    /// Ring settings applied to every source.
    pub ring: KeyRingConfig,
    /// Whether a 401 leads to a refresh and, if the key changed, one replay. Default true.
    #[serde(default = "yes")]
    pub replay_on_auth_failure: bool,
}

fn yes() -> bool {
    true
}

/// The sources of one environment.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EnvironmentConfig {
    /// The key for tenants without their own. Without it, only the listed tenants get a key.
    pub default: Option<SourceConfig>,
    /// Keys by tenant id (the [`claude_core::Tenant`] of a request).
    pub tenants: BTreeMap<String, SourceConfig>,
}

/// Where one key comes from. In files, the `source` field says which kind.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "source", rename_all = "snake_case")]
#[non_exhaustive]
pub enum SourceConfig {
    /// An environment variable ([`EnvSource`](crate::EnvSource)).
    Env(EnvSourceConfig),
    /// A file ([`FileSource`](crate::FileSource)).
    File(FileSourceConfig),
    /// HashiCorp Vault KV v2 (feature `vault`).
    Vault(VaultConfig),
    /// AWS Secrets Manager (feature `aws`).
    Aws(AwsSecretsManagerConfig),
}

/// An environment variable holding the key.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvSourceConfig {
    /// The variable's name, e.g. `ANTHROPIC_API_KEY`.
    pub var: String,
}

/// A file holding the key.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSourceConfig {
    /// The file's path, e.g. `/var/run/secrets/claude/api-key`.
    pub path: PathBuf,
}

/// A HashiCorp Vault KV version 2 secret (read by `VaultSource`, feature `vault`).
///
/// Unset fields follow the Vault CLI's environment variables, read when the source is
/// built: `VAULT_ADDR`, `VAULT_NAMESPACE`, `VAULT_CACERT`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VaultConfig {
    /// The server, e.g. `https://vault.internal:8200`. Default `VAULT_ADDR`.
    pub address: Option<String>,
    /// The KV v2 mount. Default `secret`.
    pub mount: String,
    /// The secret's path inside the mount, e.g. `claude/prod`. Required.
    pub path: String,
    /// The field of the secret's data holding the key. Default `api_key`.
    pub field: String,
    /// The Vault Enterprise namespace, sent as `X-Vault-Namespace`. Default
    /// `VAULT_NAMESPACE`, else none.
    pub namespace: Option<String>,
    /// A file holding the token (a Vault Agent sink, a mounted token), read at every fetch
    /// so a renewed token is picked up. When unset, the token comes from the environment
    /// variable named by [`token_env`](Self::token_env).
    pub token_file: Option<PathBuf>,
    /// The environment variable holding the token when there is no `token_file`. Default
    /// `VAULT_TOKEN`.
    pub token_env: String,
    /// A PEM file of CA certificates to trust instead of the system's for `https`
    /// addresses. Default `VAULT_CACERT`, else the system trust store.
    pub ca_cert: Option<PathBuf>,
}

impl Default for VaultConfig {
    fn default() -> Self {
        Self {
            address: None,
            mount: "secret".to_owned(),
            path: String::new(),
            field: "api_key".to_owned(),
            namespace: None,
            token_file: None,
            token_env: "VAULT_TOKEN".to_owned(),
            ca_cert: None,
        }
    }
}

/// An AWS Secrets Manager secret (read by `AwsSecretsManagerSource`, feature `aws`).
///
/// Credentials and region come from the standard AWS chain (environment, shared config and
/// credentials files and profiles, SSO, web identity / IRSA, ECS and EC2 instance metadata)
/// unless overridden here.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AwsSecretsManagerConfig {
    /// The secret's name or ARN. Required.
    pub secret_id: String,
    /// The JSON field holding the key when the secret string is a JSON object
    /// (`{"api_key":"sk-ant-..."}`); unset means the secret string is the key itself.
    pub field: Option<String>,
    /// The version stage to read. Default `AWSCURRENT` (the service's default).
    pub version_stage: Option<String>,
    /// The region, overriding the chain (`AWS_REGION`, profile).
    pub region: Option<String>,
    /// The profile to use, overriding `AWS_PROFILE`.
    pub profile: Option<String>,
    /// An endpoint to call instead of the regional one (a VPC endpoint, a local emulator).
    pub endpoint_url: Option<String>,
}

impl SourceConfig {
    /// A string identifying the secret this source reads, used to refuse two environments
    /// sharing one. Not a secret.
    pub fn identity(&self) -> String {
        match self {
            Self::Env(c) => format!("env:{}", c.var),
            Self::File(c) => format!("file:{}", c.path.display()),
            Self::Vault(c) => format!(
                "vault:{}|{}|{}/{}#{}",
                c.address.as_deref().unwrap_or("$VAULT_ADDR"),
                c.namespace.as_deref().unwrap_or(""),
                c.mount.trim_matches('/'),
                c.path.trim_matches('/'),
                c.field
            ),
            Self::Aws(c) => format!(
                "aws:{}|{}|{}#{}",
                c.region.as_deref().unwrap_or(""),
                c.secret_id,
                c.version_stage.as_deref().unwrap_or("AWSCURRENT"),
                c.field.as_deref().unwrap_or("")
            ),
        }
    }

    /// Builds the source.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] when the kind's feature is not enabled or its settings are invalid.
    pub fn build(&self) -> Result<Box<dyn SecretSource>, ConfigError> {
        match self {
            Self::Env(c) => Ok(Box::new(crate::EnvSource::new(c.var.clone()))),
            Self::File(c) => Ok(Box::new(crate::FileSource::new(c.path.clone()))),
            #[cfg(feature = "vault")]
            Self::Vault(c) => crate::VaultSource::new(c.clone())
                .map(|s| Box::new(s) as Box<dyn SecretSource>)
                .map_err(|e| ConfigError(format!("vault source: {e}"))),
            #[cfg(not(feature = "vault"))]
            Self::Vault(_) => Err(ConfigError(
                "a `vault` source needs claude-secrets built with the `vault` feature".into(),
            )),
            #[cfg(feature = "aws")]
            Self::Aws(c) => crate::AwsSecretsManagerSource::new(c.clone())
                .map(|s| Box::new(s) as Box<dyn SecretSource>)
                .map_err(|e| ConfigError(format!("aws source: {e}"))),
            #[cfg(not(feature = "aws"))]
            Self::Aws(_) => Err(ConfigError(
                "an `aws` source needs claude-secrets built with the `aws` feature".into(),
            )),
        }
    }
}

/// A configuration that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("secrets configuration: {0}")]
pub struct ConfigError(String);

impl SecretsConfig {
    /// The environment that will be used.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] when `environment` names no defined environment, or is unset while
    /// zero or several environments are defined.
    pub fn selected_environment(&self) -> Result<(&str, &EnvironmentConfig), ConfigError> {
        if let Some(name) = &self.environment {
            return self
                .environments
                .get_key_value(name)
                .map(|(k, v)| (k.as_str(), v))
                .ok_or_else(|| {
                    ConfigError(format!(
                        "environment `{name}` is not defined (defined: {})",
                        self.names()
                    ))
                });
        }
        let mut it = self.environments.iter();
        match (it.next(), it.next()) {
            (Some((k, v)), None) => Ok((k.as_str(), v)),
            (None, _) => Err(ConfigError("no environment is defined".into())),
            (Some(_), Some(_)) => Err(ConfigError(format!(
                "several environments are defined ({}): set `environment` to choose one",
                self.names()
            ))),
        }
    }

    fn names(&self) -> String {
        self.environments
            .keys()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Checks the configuration without building anything.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] when no environment can be selected, the selected one has no source,
    /// or two environments share a source.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let (name, env) = self.selected_environment()?;
        if env.default.is_none() && env.tenants.is_empty() {
            return Err(ConfigError(format!("environment `{name}` has no source")));
        }
        let mut owners: HashMap<String, &str> = HashMap::new();
        for (env_name, env) in &self.environments {
            for source in env.default.iter().chain(env.tenants.values()) {
                let id = source.identity();
                match owners.get(&id) {
                    Some(other) if *other != env_name.as_str() => {
                        return Err(ConfigError(format!(
                            "environments `{other}` and `{env_name}` share the source {id}; keep each environment's keys apart"
                        )));
                    }
                    _ => {
                        owners.insert(id, env_name);
                    }
                }
            }
        }
        Ok(())
    }

    /// Builds the layer for the selected environment: one [`KeyRing`] per distinct source
    /// (tenants that name the same source share a ring).
    ///
    /// Sources are built but nothing is fetched yet: rings fetch in the background as soon
    /// as a tokio runtime runs, and on first use.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] as [`validate`](Self::validate), or when a source cannot be built.
    pub fn build_layer(&self) -> Result<ApiKeyLayer, ConfigError> {
        self.validate()?;
        let (name, env) = self.selected_environment()?;
        let mut rings: HashMap<String, KeyRing> = HashMap::new();
        let mut ring_for = |source: &SourceConfig| -> Result<KeyRing, ConfigError> {
            let id = source.identity();
            if let Some(r) = rings.get(&id) {
                return Ok(r.clone());
            }
            let ring = KeyRing::new(source.build()?, self.ring.clone());
            rings.insert(id, ring.clone());
            Ok(ring)
        };
        let mut layer = match &env.default {
            Some(source) => ApiKeyLayer::new(ring_for(source)?),
            None => ApiKeyLayer::tenants_only(),
        };
        for (tenant, source) in &env.tenants {
            layer = layer.tenant(tenant.as_str(), ring_for(source)?);
        }
        tracing::info!(
            environment = name,
            tenants = env.tenants.len(),
            default = env.default.is_some(),
            "API keys configured"
        );
        Ok(layer
            .environment(name)
            .replay_on_auth_failure(self.replay_on_auth_failure))
    }
}

impl fmt::Display for SourceConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.identity())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use claude_core::Tenant;

    fn parse(json: &str) -> SecretsConfig {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn defaults() {
        let c = parse("{}");
        assert!(c.replay_on_auth_failure);
        assert_eq!(c.ring, KeyRingConfig::default());
        assert!(c.validate().is_err());
        let v: VaultConfig = serde_json::from_str(r#"{"path":"claude/prod"}"#).unwrap();
        assert_eq!(
            (v.mount.as_str(), v.field.as_str(), v.token_env.as_str()),
            ("secret", "api_key", "VAULT_TOKEN")
        );
    }

    #[test]
    fn unknown_fields_are_refused_everywhere() {
        for bad in [
            r#"{"environmnet":"prod"}"#,
            r#"{"environments":{"prod":{"defualt":{"source":"env","var":"K"}}}}"#,
            r#"{"environments":{"prod":{"default":{"source":"env","var":"K","extra":1}}}}"#,
            r#"{"environments":{"prod":{"default":{"source":"vault","path":"p","feild":"x"}}}}"#,
            r#"{"environments":{"prod":{"default":{"source":"aws","secret_id":"s","regoin":"x"}}}}"#,
            r#"{"environments":{"prod":{"default":{"source":"static","value":"sk"}}}}"#,
            r#"{"ring":{"refresh":"1s"}}"#,
        ] {
            assert!(serde_json::from_str::<SecretsConfig>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn environment_selection_is_explicit() {
        let two = r#"{"environments":{
            "dev":{"default":{"source":"env","var":"DEV_KEY"}},
            "prod":{"default":{"source":"env","var":"PROD_KEY"}}}}"#;
        let c = parse(two);
        let e = c.validate().unwrap_err();
        assert!(e.to_string().contains("set `environment`"), "{e}");
        let mut c = parse(two);
        c.environment = Some("staging".into());
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("not defined")
        );
        c.environment = Some("prod".into());
        c.validate().unwrap();
        let (name, env) = c.selected_environment().unwrap();
        assert_eq!(name, "prod");
        assert_eq!(
            env.default,
            Some(SourceConfig::Env(EnvSourceConfig {
                var: "PROD_KEY".into()
            }))
        );
        // A single environment is used without naming it.
        let one = parse(r#"{"environments":{"prod":{"default":{"source":"env","var":"K"}}}}"#);
        assert_eq!(one.selected_environment().unwrap().0, "prod");
    }

    #[test]
    fn environments_may_not_share_a_source() {
        let c = parse(
            r#"{"environment":"prod","environments":{
            "dev":{"tenants":{"a":{"source":"file","path":"/run/k"}}},
            "prod":{"default":{"source":"file","path":"/run/k"}}}}"#,
        );
        let e = c.validate().unwrap_err();
        assert!(
            e.to_string().contains("share the source file:/run/k"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn builds_only_the_selected_environment() {
        let c = parse(
            r#"{"environment":"dev","environments":{
            "dev":{"default":{"source":"env","var":"DEV_KEY"},
                   "tenants":{"a":{"source":"env","var":"DEV_KEY"},"b":{"source":"file","path":"/run/b"}}},
            "prod":{"default":{"source":"vault","path":"claude/prod"}}}}"#,
        );
        // prod's Vault source would need the `vault` feature and VAULT_ADDR: it is not built.
        let layer = c.build_layer().unwrap();
        assert_eq!(layer.environment_name(), Some("dev"));
        assert_eq!(layer.default_ring().unwrap().name(), "env:DEV_KEY");
        let a = layer.ring_for(&Tenant::new("a")).unwrap();
        let b = layer.ring_for(&Tenant::new("b")).unwrap();
        assert_eq!(a.name(), "env:DEV_KEY");
        assert_eq!(b.name(), "file:/run/b");
        assert_eq!(
            layer.ring_for(&Tenant::new("zzz")).unwrap().name(),
            "env:DEV_KEY"
        );
    }

    #[cfg(not(feature = "vault"))]
    #[test]
    fn vault_without_feature_is_a_config_error() {
        let c = parse(r#"{"environments":{"prod":{"default":{"source":"vault","path":"p"}}}}"#);
        let e = c.build_layer().unwrap_err();
        assert!(e.to_string().contains("`vault` feature"), "{e}");
    }

    #[test]
    fn toml_example_of_the_module_docs_parses() {
        // The example at the top of this module, verbatim.
        let docs = include_str!("config.rs");
        let start = docs.find("//! ```toml\n").unwrap() + "//! ```toml\n".len();
        let end = start + docs[start..].find("//! ```\n").unwrap();
        let text: String = docs[start..end]
            .lines()
            .map(|l| {
                l.strip_prefix("//! ")
                    .or(l.strip_prefix("//!"))
                    .unwrap_or(l)
            })
            .collect::<Vec<_>>()
            .join("\n");
        let c: SecretsConfig = toml::from_str(&text).unwrap();
        c.validate().unwrap();
        assert_eq!(c.selected_environment().unwrap().0, "prod");
        assert_eq!(c.ring.refresh_interval, std::time::Duration::from_secs(300));
        let (_, prod) = c.selected_environment().unwrap();
        assert!(
            matches!(prod.default, Some(SourceConfig::Vault(ref v)) if v.path == "claude/prod")
        );
        assert!(matches!(
            prod.tenants.get("team-a"),
            Some(SourceConfig::Aws(a)) if a.field.as_deref() == Some("api_key")
        ));
    }
}
