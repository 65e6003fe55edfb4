//! Gateway configuration: a TOML file, then environment variables, then flags, validated
//! once at start with errors that name the field.
//!
//! ```toml
//! listen = "127.0.0.1:8787"
//! upstream = "https://api.anthropic.com"
//! body_limit = 33554432            # bytes; requests above get 413 request_too_large
//! shutdown_grace = "30s"           # how long in-flight streams may run after SIGTERM
//!
//! # Gateway keys, stored hashed: `claude-gateway hash-key KEY` prints the hash.
//! [[client_keys]]
//! hash = "blake3:9f0c…"
//! tenant = "team-a"
//!
//! admin_key_hash = "blake3:…"       # for GET /admin/costs
//!
//! # Several gateways sharing one set of limits, one cache and one budget (see
//! # claude_stack::shared): every instance with the same Redis URL shares them.
//! redis_url = "redis://127.0.0.1:6379/"
//! ```
//!
//! Environment: `CLAUDE_GATEWAY_LISTEN`, `CLAUDE_GATEWAY_UPSTREAM`,
//! `CLAUDE_GATEWAY_CLIENT_KEYS="key1=tenant-a,key2=tenant-b"` (plain keys, hashed at load
//! and added to the file's), `CLAUDE_GATEWAY_ADMIN_KEY` (plain; replaces the file's hash),
//! `CLAUDE_GATEWAY_REDIS_URL` (replaces `redis_url`).
//!
//! `redis_url` (top level, or `stack.redis_url`; the top level wins) switches the rate
//! limiter, the cache and the budgets to state shared in Redis. While Redis is unreachable
//! the cache passes through, and the limiter and the budgets follow
//! `stack.redis_on_failure` (`fail_open`, the default: each instance's local limits and
//! budgets; `fail_closed`: refuse). They use Redis again by themselves when it returns.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use claude_core::Tenant;
use serde::Deserialize;

/// A configuration problem, naming the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The field (e.g. `client_keys[1].hash`) or source (a file path, an environment variable).
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid configuration: {}: {}", self.field, self.message)
    }
}

impl std::error::Error for ConfigError {}

fn err(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.into(),
        message: message.into(),
    }
}

/// One gateway key, stored as a hash.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientKeyEntry {
    /// `blake3:` followed by 64 hex digits.
    pub hash: String,
    /// The tenant requests with this key belong to.
    pub tenant: String,
}

/// The gateway's configuration file. Every field is optional; defaults are documented.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// Address to listen on. Default `127.0.0.1:8787`.
    pub listen: SocketAddr,
    /// The upstream base URL. Default `https://api.anthropic.com`.
    pub upstream: String,
    /// Largest request body accepted, in bytes. Default 32 MiB (Anthropic's own limit).
    pub body_limit: usize,
    /// How long in-flight requests (streams included) may run after a shutdown signal.
    /// Default 30 s.
    #[serde(with = "claude_core::config::duration")]
    pub shutdown_grace: Duration,
    /// Gateway keys, hashed, mapped to tenants.
    pub client_keys: Vec<ClientKeyEntry>,
    /// The admin key's hash, for `GET /admin/costs`.
    pub admin_key_hash: Option<String>,
    /// Redis shared by every instance: rate limits, cache and budgets (see the module
    /// docs). Default: none. Replaces `stack.redis_url` when set.
    pub redis_url: Option<claude_stack::RedisUrl>,
    /// The layer stack (client, retry, rate limit, cache, cost, secrets).
    pub stack: claude_stack::StackConfig,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8787)),
            upstream: "https://api.anthropic.com".into(),
            body_limit: 32 * 1024 * 1024,
            shutdown_grace: Duration::from_secs(30),
            client_keys: Vec::new(),
            admin_key_hash: None,
            redis_url: None,
            stack: claude_stack::StackConfig::default(),
        }
    }
}

impl GatewayConfig {
    /// Reads a TOML file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| err(path.display().to_string(), format!("cannot read: {e}")))?;
        Self::from_toml(&text).map_err(|mut e| {
            e.field = format!("{}: {}", path.display(), e.field);
            e
        })
    }

    /// Parses TOML text.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| {
            let field = e.span().and_then(|s| text.get(..s.start)).map_or_else(
                || "config".to_owned(),
                |before| format!("line {}", before.matches('\n').count() + 1),
            );
            err(field, e.message().to_owned())
        })
    }

    /// Applies the environment variables (see the module docs). `get` reads a variable.
    pub fn apply_env(
        &mut self,
        get: impl Fn(&str) -> Option<String>,
    ) -> Result<Extra, ConfigError> {
        let mut extra = Extra::default();
        if let Some(v) = get("CLAUDE_GATEWAY_LISTEN") {
            self.listen = v.parse().map_err(|_| {
                err(
                    "CLAUDE_GATEWAY_LISTEN",
                    format!("`{v}` is not an address such as 127.0.0.1:8787"),
                )
            })?;
        }
        if let Some(v) = get("CLAUDE_GATEWAY_UPSTREAM") {
            self.upstream = v;
        }
        if let Some(v) = get("CLAUDE_GATEWAY_CLIENT_KEYS") {
            for (i, pair) in v
                .split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .enumerate()
            {
                let (key, tenant) = pair.split_once('=').ok_or_else(|| {
                    err(
                        format!("CLAUDE_GATEWAY_CLIENT_KEYS[{i}]"),
                        "expected KEY=TENANT (the key itself is not shown)",
                    )
                })?;
                if key.trim().is_empty() || tenant.trim().is_empty() {
                    return Err(err(
                        format!("CLAUDE_GATEWAY_CLIENT_KEYS[{i}]"),
                        "key and tenant must not be empty",
                    ));
                }
                extra
                    .plain_client_keys
                    .push((hash_key(key.trim()), tenant.trim().to_owned()));
            }
        }
        if let Some(v) = get("CLAUDE_GATEWAY_REDIS_URL") {
            if v.trim().is_empty() {
                return Err(err("CLAUDE_GATEWAY_REDIS_URL", "must not be empty"));
            }
            self.redis_url = Some(claude_stack::RedisUrl::new(v.trim()));
        }
        if let Some(v) = get("CLAUDE_GATEWAY_ADMIN_KEY") {
            if v.trim().is_empty() {
                return Err(err("CLAUDE_GATEWAY_ADMIN_KEY", "must not be empty"));
            }
            self.admin_key_hash = Some(format!("blake3:{}", hex(&hash_key(v.trim()))));
        }
        Ok(extra)
    }

    /// The stack's configuration, with the top-level `redis_url` applied.
    pub fn stack_config(&self) -> claude_stack::StackConfig {
        let mut stack = self.stack.clone();
        if let Some(url) = &self.redis_url {
            stack.redis_url = Some(url.clone());
        }
        stack
    }

    /// Checks everything and builds the runtime key table.
    pub fn validate(&self, extra: &Extra) -> Result<ClientKeys, ConfigError> {
        let mut map = HashMap::new();
        for (i, e) in self.client_keys.iter().enumerate() {
            let h = parse_hash(&e.hash).map_err(|m| err(format!("client_keys[{i}].hash"), m))?;
            if e.tenant.trim().is_empty() {
                return Err(err(format!("client_keys[{i}].tenant"), "must not be empty"));
            }
            map.insert(h, Tenant::new(e.tenant.trim()));
        }
        for (h, t) in &extra.plain_client_keys {
            map.insert(*h, Tenant::new(t.as_str()));
        }
        let admin = match &self.admin_key_hash {
            Some(h) => Some(parse_hash(h).map_err(|m| err("admin_key_hash", m))?),
            None => None,
        };
        if self.body_limit == 0 {
            return Err(err("body_limit", "must be greater than 0"));
        }
        if !map.is_empty() || self.listen.ip().is_loopback() {
            Ok(ClientKeys { map, admin })
        } else {
            Err(err(
                "listen",
                format!(
                    "{} is not a loopback address and no client keys are configured: \
                     refusing to serve Anthropic with your key to the network. Configure \
                     client_keys (or CLAUDE_GATEWAY_CLIENT_KEYS), or listen on 127.0.0.1",
                    self.listen
                ),
            ))
        }
    }
}

/// Settings that come from the environment only (plain keys are hashed on arrival).
#[derive(Default)]
pub struct Extra {
    plain_client_keys: Vec<([u8; 32], String)>,
}

impl fmt::Debug for Extra {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Extra")
            .field("client_keys", &self.plain_client_keys.len())
            .finish()
    }
}

/// The runtime table of gateway keys (hashes only) and the admin key hash.
#[derive(Clone, Default)]
pub struct ClientKeys {
    map: HashMap<[u8; 32], Tenant>,
    admin: Option<[u8; 32]>,
}

impl fmt::Debug for ClientKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientKeys")
            .field("keys", &self.map.len())
            .field("admin", &self.admin.is_some())
            .finish()
    }
}

impl ClientKeys {
    /// Whether any gateway key is configured (else only loopback callers are served).
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The tenant of a presented key, if it is known.
    pub fn tenant(&self, presented: &str) -> Option<Tenant> {
        self.map.get(&hash_key(presented)).cloned()
    }

    /// Whether an admin key is configured.
    pub fn has_admin(&self) -> bool {
        self.admin.is_some()
    }

    /// Whether `presented` is the admin key.
    pub fn is_admin(&self, presented: &str) -> bool {
        self.admin.is_some_and(|h| h == hash_key(presented))
    }
}

/// The BLAKE3 hash of a key. Lookups compare hashes, so a timing side channel tells an
/// attacker nothing about the key.
pub fn hash_key(key: &str) -> [u8; 32] {
    *blake3::hash(key.as_bytes()).as_bytes()
}

/// The stored form of a key hash: `blake3:<64 hex digits>`.
pub fn format_hash(key: &str) -> String {
    format!("blake3:{}", hex(&hash_key(key)))
}

fn hex(b: &[u8; 32]) -> String {
    use fmt::Write;
    b.iter().fold(String::with_capacity(64), |mut s, x| {
        let _ = write!(s, "{x:02x}");
        s
    })
}

fn parse_hash(s: &str) -> Result<[u8; 32], String> {
    let hexpart = s
        .strip_prefix("blake3:")
        .ok_or("expected `blake3:` followed by 64 hex digits (see `claude-gateway hash-key`)")?;
    if hexpart.len() != 64 {
        return Err("expected 64 hex digits after `blake3:`".into());
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&hexpart[i * 2..i * 2 + 2], 16)
            .map_err(|_| "not a hexadecimal digest".to_owned())?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_are_named() {
        let e =
            GatewayConfig::from_toml("listen = \"127.0.0.1:1\"\nlisten_adress = 3\n").unwrap_err();
        assert!(e.message.contains("listen_adress"), "{e}");
        assert!(e.field.contains("line 2"), "{e}");
    }

    #[test]
    fn bad_hash_names_the_field() {
        let cfg =
            GatewayConfig::from_toml("[[client_keys]]\nhash = \"sha1:abc\"\ntenant = \"a\"\n")
                .unwrap();
        let e = cfg.validate(&Extra::default()).unwrap_err();
        assert_eq!(e.field, "client_keys[0].hash");
    }

    #[test]
    fn redis_url_from_file_and_env_reaches_the_stack() {
        let mut cfg = GatewayConfig::from_toml("redis_url = \"redis://a:1/\"\n").unwrap();
        assert_eq!(
            cfg.redis_url.as_ref().map(claude_stack::RedisUrl::expose),
            Some("redis://a:1/")
        );
        cfg.apply_env(|k| (k == "CLAUDE_GATEWAY_REDIS_URL").then(|| "redis://:pw@b:2/".to_owned()))
            .unwrap();
        assert_eq!(
            cfg.stack_config()
                .redis_url
                .as_ref()
                .map(claude_stack::RedisUrl::expose),
            Some("redis://:pw@b:2/")
        );
        assert!(!format!("{cfg:?}").contains("pw"));
        let nested = GatewayConfig::from_toml("[stack]\nredis_url = \"redis://c:3/\"\n").unwrap();
        assert_eq!(
            nested
                .stack_config()
                .redis_url
                .as_ref()
                .map(claude_stack::RedisUrl::expose),
            Some("redis://c:3/")
        );
        assert!(
            GatewayConfig::default()
                .apply_env(|k| (k == "CLAUDE_GATEWAY_REDIS_URL").then(String::new))
                .is_err()
        );
    }

    #[test]
    fn env_keys_are_hashed_and_found() {
        let mut cfg = GatewayConfig::default();
        let extra = cfg
            .apply_env(|k| {
                (k == "CLAUDE_GATEWAY_CLIENT_KEYS").then(|| "k1=team-a, k2=team-b".to_owned())
            })
            .unwrap();
        let keys = cfg.validate(&extra).unwrap();
        assert_eq!(keys.tenant("k2").unwrap().as_str(), "team-b");
        assert!(keys.tenant("k3").is_none());
        assert!(!format!("{keys:?}{extra:?}").contains("k1"));
    }

    #[test]
    fn non_loopback_without_keys_is_refused() {
        let mut cfg = GatewayConfig {
            listen: "0.0.0.0:8787".parse().unwrap(),
            ..GatewayConfig::default()
        };
        let e = cfg.validate(&Extra::default()).unwrap_err();
        assert_eq!(e.field, "listen");
        cfg.client_keys.push(ClientKeyEntry {
            hash: format_hash("secret"),
            tenant: "a".into(),
        });
        assert!(cfg.validate(&Extra::default()).is_ok());
    }

    #[test]
    fn admin_key() {
        let mut cfg = GatewayConfig::default();
        let extra = cfg
            .apply_env(|k| (k == "CLAUDE_GATEWAY_ADMIN_KEY").then(|| "adm".to_owned()))
            .unwrap();
        let keys = cfg.validate(&extra).unwrap();
        assert!(keys.is_admin("adm") && !keys.is_admin("x") && keys.has_admin());
    }
}
