//! The state every clone of a cache service shares: the moka cache, the in-flight map and
//! the byte accounting.

use std::fmt;
use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use claude_core::metric::Kept;
use moka::notification::RemovalCause;

use crate::body::Pending;
use crate::config::CacheConfig;
use crate::entry::{Entry, EntryExpiry};
use crate::flight::{self, Flights, Role};
use crate::key::CacheKey;
use crate::metric_names;

/// The moka cache. Its hasher is a seeded one-word hash rather than SipHash: a key is already
/// a uniform hash (see `CacheKey`'s `Hash`), and moka hashes it on every read, insert and
/// key lock.
pub(crate) type Store = moka::future::Cache<CacheKey, Arc<Entry>, foldhash::fast::RandomState>;

pub(crate) struct Shared {
    pub(crate) config: CacheConfig,
    pub(crate) cache: Store,
    pub(crate) flights: Arc<Flights>,
    held: Arc<AtomicU64>,
    /// The store thread's queue ([`CacheConfig::store_thread`]); `None` without one.
    jobs: Option<SyncSender<Job>>,
    /// Stores made on the requests' own threads so far (see [`Job::Store`]).
    direct: AtomicU64,
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
                BYTES.with(bytes_gauge, |g| g.decrement(f64::from(e.weight)));
                let (kept, cause) = match cause {
                    RemovalCause::Size => (&EVICTED_SIZE, "size"),
                    RemovalCause::Expired => (&EVICTED_EXPIRED, "expired"),
                    RemovalCause::Explicit | RemovalCause::Replaced => return,
                };
                kept.with(
                    || metrics::counter!(metric_names::EVICTIONS, "cause" => cause),
                    |c| c.increment(1),
                );
            })
            .build_with_hasher(foldhash::fast::RandomState::default());
        let jobs = if config.store_thread {
            spawn_store_thread(cache.clone())
        } else {
            None
        };
        Self {
            config,
            cache,
            flights: Arc::new(Flights::default()),
            held,
            jobs,
            direct: AtomicU64::new(0),
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
        match self.flights.join(key, seen, refresh) {
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
                // Boxed, and only with a second level: a Redis read's future is large, and
                // would otherwise make every request's future as large.
                #[cfg(feature = "redis")]
                if self.l2.is_some()
                    && let Some(e) = Box::pin(self.second_level(&key, max_age)).await
                {
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
        BYTES.with(bytes_gauge, |g| g.increment(f64::from(entry.weight)));
        STORED.with(
            || metrics::counter!(metric_names::STORED),
            |c| c.increment(1),
        );
        self.cache.insert(key, entry).await;
        self.flights.stored(&key);
    }

    /// Counts a store made on a request's own thread, once it has landed.
    pub(crate) fn stored_directly(&self) {
        self.direct.fetch_add(1, Ordering::Release);
    }

    /// Hands a leader's completed answer to the store thread. Gives it back when there is no
    /// thread (not configured, or it could not start or has died) or its queue is full: the
    /// caller then stores it itself.
    pub(crate) fn defer(
        &self,
        pending: Pending,
        entry: Arc<Entry>,
    ) -> Result<(), (Pending, Arc<Entry>)> {
        let Some(jobs) = &self.jobs else {
            return Err((pending, entry));
        };
        // Where the write to a second level will run (the store thread has no runtime).
        let rt = tokio::runtime::Handle::try_current().ok();
        let direct = self.direct.load(Ordering::Acquire);
        match jobs.try_send(Job::Store(pending, entry, rt, direct)) {
            Ok(()) => Ok(()),
            Err(
                TrySendError::Full(Job::Store(p, e, ..))
                | TrySendError::Disconnected(Job::Store(p, e, ..)),
            ) => Err((p, e)),
            Err(_) => unreachable!("a store job comes back as sent"),
        }
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
        self.stored_directly();
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

/// The handles of the store's metrics (see `claude_core::metric`): the
/// `claude_cache_bytes` gauge, the stored and evicted counters.
static BYTES: Kept<metrics::Gauge> = Kept::new();
static STORED: Kept<metrics::Counter> = Kept::new();
static EVICTED_SIZE: Kept<metrics::Counter> = Kept::new();
static EVICTED_EXPIRED: Kept<metrics::Counter> = Kept::new();

fn bytes_gauge() -> metrics::Gauge {
    metrics::gauge!(metric_names::BYTES)
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

    /// The number of keys whose leader is upstream right now, or whose answer is on its way
    /// into the cache (see [`CacheConfig::store_thread`]).
    pub fn in_flight(&self) -> usize {
        self.shared.flights.len()
    }

    /// Stores the answers handed to the store thread so far, then runs moka's pending
    /// maintenance (evictions, expirations, listener calls) now. Without a store thread
    /// ([`CacheConfig::store_thread`]) this otherwise happens during cache operations; with
    /// one, the thread does it after every 16 answers it stores or 50 ms, whichever comes
    /// first, and every 100 ms when no answer comes.
    pub async fn run_pending_tasks(&self) {
        if let Some(jobs) = &self.shared.jobs {
            let (tx, rx) = tokio::sync::oneshot::channel();
            // A full queue waits (this is not a request path); a dead thread answers at once.
            let mut job = Job::Flush(tx);
            loop {
                match jobs.try_send(job) {
                    Ok(()) => {
                        let _ = rx.await;
                        break;
                    }
                    Err(TrySendError::Full(j)) => {
                        job = j;
                        tokio::task::yield_now().await;
                    }
                    Err(TrySendError::Disconnected(_)) => break,
                }
            }
        }
        self.shared.cache.run_pending_tasks().await;
    }

    /// Discards every stored entry (lazily: they stop being served at once, and are
    /// removed by the next maintenance).
    pub fn invalidate_all(&self) {
        self.shared.cache.invalidate_all();
    }
}

/// How long the store thread lets answers gather after the first one before it stores them
/// (so that, under load, the requests that hand answers over wake it about once a
/// millisecond rather than once each).
const STORE_BATCH: Duration = Duration::from_millis(1);
/// How often the store thread runs moka's maintenance when no answer comes.
const IDLE_MAINTENANCE: Duration = Duration::from_millis(100);
/// The store thread runs moka's maintenance after this many stores, or when this long has
/// passed since it last did: often enough that moka's logs (it flushes them at 64 reads or
/// 64 writes) rarely fill on a request's thread (each miss reads about twice per store),
/// seldom enough that a trickle of stores does not pay for maintenance each.
const MAINTENANCE_STORES: usize = 16;
const MAINTENANCE_EVERY: Duration = Duration::from_millis(50);
/// Answers waiting for the store thread at most; past it, a request stores its own.
const STORE_QUEUE: usize = 8192;

/// Work for the store thread.
pub(crate) enum Job {
    /// Store a leader's answer, then let its flight go (and, with a second level, write the
    /// answer there on the runtime the request ran on). The count of direct stores as the
    /// answer completed tells whether one may have landed since.
    Store(Pending, Arc<Entry>, Option<tokio::runtime::Handle>, u64),
    /// Answer once everything queued before is stored and maintenance has run.
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// Starts the store thread of a cache; `None` if the thread cannot start (requests then store
/// their own answers). The thread holds the moka cache, not the [`Shared`] state that owns
/// the sending side: it ends when the last cache service (and its queued answers) is gone.
fn spawn_store_thread(cache: Store) -> Option<SyncSender<Job>> {
    let (tx, rx) = mpsc::sync_channel(STORE_QUEUE);
    let started = std::thread::Builder::new()
        .name("claude-cache-store".to_owned())
        .stack_size(256 * 1024)
        .spawn(move || store_loop(&rx, &cache));
    match started {
        Ok(_) => Some(tx),
        Err(e) => {
            tracing::warn!(error = %e, "claude-cache: cannot start the store thread; requests store their own answers");
            None
        }
    }
}

fn store_loop(rx: &mpsc::Receiver<Job>, cache: &Store) {
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut flushes = Vec::new();
    let mut stores = 0;
    let mut maintained = std::time::Instant::now();
    loop {
        let first = match rx.recv_timeout(IDLE_MAINTENANCE) {
            Ok(job) => job,
            Err(RecvTimeoutError::Timeout) => {
                block_on(&waker, cache.run_pending_tasks());
                stores = 0;
                maintained = std::time::Instant::now();
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => return,
        };
        std::thread::sleep(STORE_BATCH);
        for job in std::iter::once(first).chain(rx.try_iter()) {
            match job {
                Job::Store(pending, entry, rt, direct) => {
                    block_on(&waker, store(pending, entry, rt, direct));
                    stores += 1;
                }
                Job::Flush(tx) => flushes.push(tx),
            }
        }
        if stores >= MAINTENANCE_STORES
            || !flushes.is_empty()
            || maintained.elapsed() >= MAINTENANCE_EVERY
        {
            block_on(&waker, cache.run_pending_tasks());
            stores = 0;
            maintained = std::time::Instant::now();
        }
        for tx in flushes.drain(..) {
            let _ = tx.send(());
        }
    }
}

/// A store handed over by a leader, on the store thread. An answer stored in the meantime
/// on a request's own thread by a request that completed later (a `no-cache` request that
/// went upstream alone while this leader's flight was pending) is newer: it stays. Such
/// stores are rare, so the cache is read to check only when one has landed since this
/// answer completed.
async fn store(
    pending: Pending,
    entry: Arc<Entry>,
    rt: Option<tokio::runtime::Handle>,
    direct: u64,
) {
    let shared = &pending.shared;
    if shared.direct.load(Ordering::Acquire) != direct
        && let Some(stored) = shared.cache.get(&pending.key).await
        && stored.stored_at > entry.stored_at
    {
        return;
    }
    crate::body::insert(pending, entry, rt, false).await;
}

/// Wakes the store thread when a future it waits on can go on.
struct Unpark(std::thread::Thread);

impl Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.unpark();
    }
}

/// Runs a future to its end on this thread (moka's futures need no runtime).
fn block_on<F: Future>(waker: &Waker, fut: F) -> F::Output {
    let mut fut = pin!(fut);
    let mut cx = Context::from_waker(waker);
    loop {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::park();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderMap;

    fn shared() -> Arc<Shared> {
        let config = CacheConfig {
            store_thread: false,
            ..CacheConfig::default()
        };
        Arc::new(Shared::build(
            config,
            #[cfg(feature = "redis")]
            None,
        ))
    }

    fn pending(shared: &Arc<Shared>) -> Pending {
        let key = CacheKey::from_parts::<&str>(
            None,
            claude_core::Endpoint::Messages,
            None,
            &HeaderMap::new(),
            b"{}",
            &[],
        )
        .unwrap();
        Pending {
            shared: shared.clone(),
            key,
            guard: None,
            max: usize::MAX,
        }
    }

    fn entry() -> Arc<Entry> {
        // Distinct instants, whatever the clock's resolution.
        std::thread::sleep(Duration::from_millis(2));
        crate::flight::tests::entry()
    }

    async fn stored(shared: &Arc<Shared>) -> Arc<Entry> {
        shared.cache.get(&pending(shared).key).await.unwrap()
    }

    #[tokio::test]
    async fn a_handed_over_answer_does_not_replace_a_newer_one_stored_directly() {
        let s = shared();
        // A leader's answer completes and is handed over; then a request that went upstream
        // alone completes and stores its own where it ran, before the store thread gets to it.
        let old = entry();
        let seen = s.direct.load(Ordering::Acquire);
        let new = entry();
        crate::body::insert(pending(&s), new.clone(), None, true).await;
        store(pending(&s), old, None, seen).await;
        assert!(
            Arc::ptr_eq(&stored(&s).await, &new),
            "the newer answer stays"
        );

        // Handed over after that direct store: it is the newer one, it replaces it.
        let seen = s.direct.load(Ordering::Acquire);
        let newest = entry();
        store(pending(&s), newest.clone(), None, seen).await;
        assert!(Arc::ptr_eq(&stored(&s).await, &newest));

        // A direct store of an older answer (a second level's) does not protect it either.
        let older = entry();
        let seen = s.direct.load(Ordering::Acquire);
        let latest = entry();
        crate::body::insert(pending(&s), older, None, true).await;
        store(pending(&s), latest.clone(), None, seen).await;
        assert!(Arc::ptr_eq(&stored(&s).await, &latest));
    }
}
