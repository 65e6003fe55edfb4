//! The stack's shared state in Redis (`redis_url`): one URL switches the rate limiter, the
//! cache and the budgets to state shared by every instance on the same Redis.
//!
//! - **Cache**: a second level under the local cache; a Redis failure is a miss, never an
//!   error.
//! - **Rate limits**: each locally admitted request also needs an atomic grant from the
//!   shared buckets.
//! - **Budgets**: admission, reservations and alerts in shared windows.
//!
//! [`StackConfig::redis_on_failure`](crate::StackConfig::redis_on_failure) says what the
//! limiter and the budgets do while Redis is unreachable: `fail_open` (the default) falls
//! back to each instance's local limits and budgets, `fail_closed` refuses requests. Both
//! use the shared state again by themselves once Redis answers. The layers' own docs
//! (`claude_ratelimit::redis`, `claude_cache::redis`, `claude_cost::redis`, feature `redis`)
//! describe the scripts and keys.
//!
//! Needs the `redis` feature of this crate; without it a configured `redis_url` is an error
//! at [`ClaudeStack::new`](crate::ClaudeStack::new).

use std::fmt;

use serde::Deserialize;

/// A Redis URL (`redis://[user:password@]host:port/db`). Its `Debug` hides any password.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct RedisUrl(String);

impl RedisUrl {
    /// Wraps a URL (checked when the stack is built).
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }

    /// The URL, password included.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // scheme://[userinfo@]rest: drop the userinfo.
        let shown = match (self.0.find("://"), self.0.rfind('@')) {
            (Some(s), Some(at)) if at > s => {
                format!("{}://***@{}", &self.0[..s], &self.0[at + 1..])
            }
            _ => self.0.clone(),
        };
        f.debug_tuple("RedisUrl").field(&shown).finish()
    }
}

/// What the rate limiter and the budgets do while Redis is unreachable: `fail_open` (the
/// default) falls back to each instance's local limits and budgets, `fail_closed` refuses
/// requests (a 429 from the limiter, `BudgetExceeded` from the budgets). The one policy type
/// of the workspace, [`claude_core::config::FailurePolicy`].
pub type RedisOnFailure = claude_core::config::FailurePolicy;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_the_password() {
        let u = RedisUrl::new("redis://user:s3cret@cache.internal:6379/0");
        let shown = format!("{u:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("cache.internal:6379/0"), "{shown}");
        assert_eq!(u.expose(), "redis://user:s3cret@cache.internal:6379/0");
        assert!(format!("{:?}", RedisUrl::new("redis://h:1/")).contains("redis://h:1/"));
    }
}
