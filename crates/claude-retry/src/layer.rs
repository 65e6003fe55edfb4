//! [`RetryLayer`]: builds [`Retry`] services that share one budget.

use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use crate::backoff::Rng;
use crate::budget::RetryBudget;
use crate::config::{Jitter, RetryConfig};
use crate::service::{Retry, Shared};

/// A [`Layer`] that wraps services in [`Retry`].
///
/// Every service it builds, and every clone of those, shares one [`RetryBudget`] (built
/// from `config.budget`, or the one given to [`budget`](Self::budget)) and one jitter
/// generator. The setters consume the layer; called on a clone, they give a layer with
/// its own settings that still shares the budget of the original.
///
/// ```
/// use std::time::Duration;
/// use claude_retry::{Jitter, RetryConfig, RetryLayer};
///
/// let layer = RetryLayer::new(RetryConfig::default())
///     .max_retries(4)
///     .backoff(Duration::from_millis(200), Duration::from_secs(5))
///     .jitter(Jitter::Full)
///     .deadline(Duration::from_secs(120));
/// assert_eq!(layer.config().max_retries, 4);
/// ```
#[derive(Debug, Clone)]
pub struct RetryLayer {
    shared: Arc<Shared>,
}

impl Default for RetryLayer {
    fn default() -> Self {
        Self::new(RetryConfig::default())
    }
}

impl RetryLayer {
    /// A layer with this configuration and a new budget built from `config.budget`.
    pub fn new(config: RetryConfig) -> Self {
        let budget = RetryBudget::new(config.budget);
        Self {
            shared: Arc::new(Shared {
                config,
                budget,
                rng: Rng::from_entropy(),
            }),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &RetryConfig {
        &self.shared.config
    }

    /// The budget shared by the services this layer builds.
    pub fn retry_budget(&self) -> &RetryBudget {
        &self.shared.budget
    }

    fn map(self, f: impl FnOnce(&mut Shared)) -> Self {
        let mut shared = Arc::try_unwrap(self.shared).unwrap_or_else(|arc| Shared {
            config: arc.config.clone(),
            budget: arc.budget.clone(),
            rng: Rng::new(arc.rng.next_u64()),
        });
        f(&mut shared);
        Self {
            shared: Arc::new(shared),
        }
    }

    /// Sets [`RetryConfig::max_retries`].
    #[must_use]
    pub fn max_retries(self, max_retries: u32) -> Self {
        self.map(|s| s.config.max_retries = max_retries)
    }

    /// Sets [`RetryConfig::initial_backoff`] and [`RetryConfig::max_backoff`].
    #[must_use]
    pub fn backoff(self, initial: Duration, max: Duration) -> Self {
        self.map(|s| {
            s.config.initial_backoff = initial;
            s.config.max_backoff = max;
        })
    }

    /// Sets [`RetryConfig::jitter`].
    #[must_use]
    pub fn jitter(self, jitter: Jitter) -> Self {
        self.map(|s| s.config.jitter = jitter)
    }

    /// Sets [`RetryConfig::max_retry_after`].
    #[must_use]
    pub fn max_retry_after(self, max: Duration) -> Self {
        self.map(|s| s.config.max_retry_after = max)
    }

    /// Sets [`RetryConfig::deadline`].
    #[must_use]
    pub fn deadline(self, deadline: Duration) -> Self {
        self.map(|s| s.config.deadline = deadline)
    }

    /// Sets [`RetryConfig::peek_first_event`].
    #[must_use]
    pub fn peek_first_event(self, peek: bool) -> Self {
        self.map(|s| s.config.peek_first_event = peek)
    }

    /// Sets [`RetryConfig::error_body_limit`].
    #[must_use]
    pub fn error_body_limit(self, limit: usize) -> Self {
        self.map(|s| s.config.error_body_limit = limit)
    }

    /// Uses this budget instead of the one built from `config.budget`, e.g. to share one
    /// budget between several layers. ([`config`](Self::config)`.budget` then no longer
    /// describes it; [`RetryBudget::config`] does.)
    #[must_use]
    pub fn budget(self, budget: RetryBudget) -> Self {
        self.map(|s| s.budget = budget)
    }

    /// Seeds the jitter generator, making the waits reproducible (tests, simulations).
    #[must_use]
    pub fn jitter_seed(self, seed: u64) -> Self {
        self.map(|s| s.rng = Rng::new(seed))
    }
}

impl<S> Layer<S> for RetryLayer {
    type Service = Retry<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Retry::from_shared(inner, self.shared.clone())
    }
}
