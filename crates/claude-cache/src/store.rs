//! The state every clone of a cache service shares: the moka cache, the in-flight map and
//! the byte accounting.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use moka::notification::RemovalCause;

use crate::config::CacheConfig;
use crate::entry::{Entry, EntryExpiry};
use crate::flight::{self, Flights, Role};
use crate::key::CacheKey;
use crate::metric_names;

pub(crate) struct Shared {
    pub(crate) config: CacheConfig,
    pub(crate) cache: moka::future::Cache<CacheKey, Arc<Entry>>,
    pub(crate) flights: Arc<Flights>,
    held: Arc<AtomicU64>,
    /// The shared second level, if any.
    #[cfg(feature = "redis")]
    pub(crate) l2: Option<crate::redis::RedisCache>,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("config", &self.config)
            .field("entries", &self.cache.entry_count())
            .field("bytes", &self.held.load(Ordering::Relaxed))
            .field("in_flight", &self.flights.len())
            .finish_non_exhaustive()
    }
}

/// The outcome of a lookup.
#[derive(Debug)]
pub(crate) enum Lookup {
    /// A stored answer (from the cache or from the leader of the flight).
    Hit(Arc<Entry>),
    /// Go upstream as the leader of a flight.
    Lead(flight::FlightGuard),
    /// Go upstream alone (the leader was released).
    Alone,
}

impl Shared {
    pub(crate) fn build(
        config: CacheConfig,
        #[cfg(feature = "redis")] l2: Option<crate::redis::RedisCache>,
    ) -> Self {
        let held = Arc::new(AtomicU64::new(0));
        let listener_held = held.clone();
        let cache = moka::future::Cache::builder()
            .max_capacity(config.max_bytes)
            .weigher(|_: &CacheKey, e: &Arc<Entry>| e.weight)
            .expire_after(EntryExpiry)
            .eviction_listener(move |_, e: Arc<Entry>, cause| {
                listener_held.fetch_sub(u64::from(e.weight), Ordering::Relaxed);
                metrics::gauge!(metric_names::BYTES).decrement(f64::from(e.weight));
                let cause = match cause {
                    RemovalCause::Size => "size",
                    RemovalCause::Expired => "expired",
                    RemovalCause::Explicit | RemovalCause::Replaced => return,
                };
                metrics::counter!(metric_names::EVICTIONS, "cause" => cause).increment(1);
            })
            .build();
        Self {
            config,
            cache,
            flights: Arc::new(Flights::default()),
            held,
            #[cfg(feature = "redis")]
            l2,
        }
    }

    /// A stored answer no older than `max_age`.
    async fn fresh(&self, key: &CacheKey, max_age: Option<Duration>) -> Option<Arc<Entry>> {
        let e = self.cache.get(key).await?;
        is_fresh(&e, max_age).then_some(e)
    }

    /// Looks `key` up: the answer of a flight that completed (see the `flight` module), else a fresh stored answer, else
    /// the flight on it (waiting for its leader), else a new flight. With `refresh`
    /// (`no-cache`) nothing is read: the request leads a new flight if there is none, and
    /// goes alone otherwise (it wants its own answer, not one already on its way).
    ///
    /// # Cancel safety
    ///
    /// Dropping the future at any point leaves no trace: a follower just stops waiting, and a
    /// leader's guard releases its followers as it drops.
    pub(crate) async fn lookup(
        self: &Arc<Self>,
        key: CacheKey,
        max_age: Option<Duration>,
        refresh: bool,
    ) -> Lookup {
        let (completed, seen) = self.flights.completed(&key);
        if !refresh {
            if let Some(rx) = completed
                && let Some(e) = flight::follow(rx).await
                && is_fresh(&e, max_age)
            {
                return Lookup::Hit(e);
            }
            if let Some(e) = self.fresh(&key, max_age).await {
                return Lookup::Hit(e);
            }
        }
        match self.flights.join(key, seen) {
            Role::Follower(_) if refresh => Lookup::Alone,
            Role::Follower(rx) => match flight::follow(rx).await {
                Some(e) if is_fresh(&e, max_age) => Lookup::Hit(e),
                _ => Lookup::Alone,
            },
            Role::Leader(guard, _) if refresh => Lookup::Lead(guard),
            Role::Leader(guard, stored_since) => {
                // A leader that finished between our cache read and our join has stored its
                // answer before leaving the map: check again, or we would go upstream twice.
                // (Only when something was stored under this shard since that read: see
                // `Flights::stored`.)
                if stored_since && let Some(e) = self.fresh(&key, max_age).await {
                    guard.publish(e.clone());
                    return Lookup::Hit(e);
                }
                #[cfg(feature = "redis")]
                if let Some(e) = self.second_level(&key, max_age).await {
                    guard.publish(e.clone());
                    return Lookup::Hit(e);
                }
                Lookup::Lead(guard)
            }
        }
    }

    /// Stores an entry (the accounting counts it before moka can evict it).
    pub(crate) async fn insert(&self, key: CacheKey, entry: Arc<Entry>) {
        self.held
            .fetch_add(u64::from(entry.weight), Ordering::Relaxed);
        metrics::gauge!(metric_names::BYTES).increment(f64::from(entry.weight));
        metrics::counter!(metric_names::STORED).increment(1);
        self.cache.insert(key, entry).await;
        self.flights.stored(&key);
    }

    /// A fresh answer from the second level, inserted locally (never written back).
    #[cfg(feature = "redis")]
    async fn second_level(&self, key: &CacheKey, max_age: Option<Duration>) -> Option<Arc<Entry>> {
        let l2 = self.l2.as_ref()?;
        let e = Arc::new(l2.get(key, self.config.max_entry_bytes).await?);
        if !is_fresh(&e, max_age) {
            return None;
        }
        self.insert(*key, e.clone()).await;
        Some(e)
    }

    /// Writes a locally stored answer to the second level, if there is one.
    #[cfg(feature = "redis")]
    pub(crate) async fn write_through(&self, key: &CacheKey, entry: &Entry) {
        if let Some(l2) = &self.l2 {
            l2.set(key, entry).await;
        }
    }

    pub(crate) fn bytes(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }
}

fn is_fresh(e: &Entry, max_age: Option<Duration>) -> bool {
    max_age.is_none_or(|m| e.age() <= m)
}

/// A handle on the state shared by every service of one [`CacheLayer`](crate::CacheLayer):
/// sizes, maintenance, purge. Cheap to clone.
#[derive(Clone)]
pub struct CacheHandle {
    pub(crate) shared: Arc<Shared>,
}

impl fmt::Debug for CacheHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.shared.fmt(f)
    }
}

impl CacheHandle {
    /// The configuration in force.
    pub fn config(&self) -> &CacheConfig {
        &self.shared.config
    }

    /// The bytes held by stored entries (body + replayed headers + frame index), exactly
    /// as the `claude_cache_bytes` gauge reports them: entries are counted when inserted and
    /// uncounted when moka removes them.
    pub fn bytes(&self) -> u64 {
        self.shared.bytes()
    }

    /// moka's own total weight (an estimate until [`run_pending_tasks`] has run).
    ///
    /// [`run_pending_tasks`]: Self::run_pending_tasks
    pub fn weighted_size(&self) -> u64 {
        self.shared.cache.weighted_size()
    }

    /// The number of stored entries (an estimate until [`run_pending_tasks`] has run).
    ///
    /// [`run_pending_tasks`]: Self::run_pending_tasks
    pub fn entry_count(&self) -> u64 {
        self.shared.cache.entry_count()
    }

    /// The number of keys whose leader is upstream right now.
    pub fn in_flight(&self) -> usize {
        self.shared.flights.len()
    }

    /// Runs moka's pending maintenance (evictions, expirations, listener calls) now. moka
    /// has no background thread: this otherwise happens during cache operations.
    pub async fn run_pending_tasks(&self) {
        self.shared.cache.run_pending_tasks().await;
    }

    /// Discards every stored entry (lazily: they stop being served at once, and are
    /// removed by the next maintenance).
    pub fn invalidate_all(&self) {
        self.shared.cache.invalidate_all();
    }
}
