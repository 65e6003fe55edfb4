//! The cache configuration and its defaults.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The longest lifetime an entry can get, whatever the configuration says (one year): keeps
/// deadline arithmetic far from overflow.
pub const MAX_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// Whether tenants share cache entries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CacheScope {
    /// Each [`claude_core::Tenant`] has its own entries: two tenants sending the same body
    /// never see each other's answer. The default.
    #[default]
    Tenant,
    /// All tenants share entries (the tenant does not enter the key). Only for deployments
    /// where every tenant may read every other tenant's answers.
    Shared,
}

/// How the response cache behaves. Every field has a default (see [`CacheConfig::default`]),
/// so a configuration file names only what it changes:
///
/// ```
/// # fn main() -> Result<(), serde_json::Error> {
/// let cfg: claude_cache::CacheConfig =
///     serde_json::from_str(r#"{"ttl": "10m", "max_bytes": 67108864, "scope": "shared"}"#)?;
/// assert_eq!(cfg.ttl, std::time::Duration::from_secs(600));
/// assert_eq!(cfg.max_entry_bytes, 4 * 1024 * 1024);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    /// The most bytes the cache holds, counted as body bytes plus replayed header bytes of
    /// every entry (default 256 MiB). The least valuable entries are evicted past it.
    pub max_bytes: u64,
    /// How long an entry lives (default 1 h; at most [`MAX_TTL`]). A request's
    /// `cache-control: max-age=N` can shorten the lifetime of the answer it stores, never
    /// lengthen it.
    #[serde(with = "claude_core::config::duration")]
    pub ttl: Duration,
    /// The largest response body that is stored (default 4 MiB; at most 4 GiB). A larger
    /// answer passes through to the caller unchanged and is not stored.
    pub max_entry_bytes: u64,
    /// Whether tenants share entries (default: they do not, [`CacheScope::Tenant`]).
    pub scope: CacheScope,
    /// Top-level request body fields left out of the key (default `["metadata"]`:
    /// `metadata.user_id` names the end user, not the question).
    pub key_ignore_fields: Vec<String>,
    /// Whether a thread of the cache's own stores completed answers and runs moka's
    /// maintenance (default true). moka does its bookkeeping (admission, eviction, expiry) in
    /// batches during cache calls, so without this thread an insert or a read now and then
    /// stalls the request that makes it for tens to hundreds of microseconds, and with it
    /// every other request on that runtime worker. With the thread, a request only reads:
    /// the leader of a flight hands its answer over when its body ends (its followers, and
    /// any request on the same key, are served from the flight until the entry is in the
    /// cache, about a millisecond later). One thread per layer, which ends when the layer and
    /// its services are dropped. The metrics of stores and evictions are then recorded on that
    /// thread, so they go to the global `metrics` recorder, not to a thread-local one. `false`
    /// stores and maintains on the requests' own threads.
    pub store_thread: bool,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            max_bytes: 256 * 1024 * 1024,
            ttl: Duration::from_secs(3600),
            max_entry_bytes: 4 * 1024 * 1024,
            scope: CacheScope::Tenant,
            key_ignore_fields: vec!["metadata".to_owned()],
            store_thread: true,
        }
    }
}

impl CacheConfig {
    /// The configured TTL, capped at [`MAX_TTL`].
    pub(crate) fn effective_ttl(&self) -> Duration {
        self.ttl.min(MAX_TTL)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_partial_files() {
        let d = CacheConfig::default();
        assert_eq!(d.max_bytes, 268_435_456);
        assert_eq!(d.ttl, Duration::from_secs(3600));
        assert_eq!(d.max_entry_bytes, 4_194_304);
        assert_eq!(d.scope, CacheScope::Tenant);
        assert_eq!(d.key_ignore_fields, ["metadata"]);
        assert!(d.store_thread);
        let c: CacheConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(c, d);
        let c: CacheConfig =
            serde_json::from_str(r#"{"ttl":"1.5s","key_ignore_fields":[],"store_thread":false}"#)
                .unwrap();
        assert_eq!(c.ttl, Duration::from_millis(1500));
        assert!(c.key_ignore_fields.is_empty());
        assert!(!c.store_thread);
    }

    #[test]
    fn rejects_unknown_fields_and_bad_values() {
        assert!(serde_json::from_str::<CacheConfig>(r#"{"tll":"1s"}"#).is_err());
        assert!(serde_json::from_str::<CacheConfig>(r#"{"scope":"global"}"#).is_err());
        assert!(serde_json::from_str::<CacheConfig>(r#"{"ttl":"-1s"}"#).is_err());
    }

    #[test]
    fn round_trips() {
        let c = CacheConfig {
            ttl: Duration::from_millis(250),
            scope: CacheScope::Shared,
            ..CacheConfig::default()
        };
        let s = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<CacheConfig>(&s).unwrap(), c);
    }

    #[test]
    fn ttl_is_capped() {
        let c = CacheConfig {
            ttl: Duration::from_secs(u64::MAX),
            ..CacheConfig::default()
        };
        assert_eq!(c.effective_ttl(), MAX_TTL);
    }
}
