//! Single-flight: concurrent identical misses go upstream once.
//!
//! The first miss on a key becomes the leader and registers a flight (a [`Cell`]) in the
//! in-flight map; later misses on the same key follow it and wait. The leader's
//! [`FlightGuard`] has two ways out:
//!
//! - [`FlightGuard::publish`]: the answer was stored; followers wake up and serve it as a
//!   hit.
//! - drop without publishing (upstream failed, the answer is not cacheable, the caller
//!   dropped the future or the body): the flight is released, and every follower goes
//!   upstream by itself at once.
//!
//! Either way the guard's `Drop` removes the flight from the map, so nothing leaks whatever
//! path a request takes. A flight whose answer completed stays in the map until its entry is
//! in moka, and lookups read such flights before moka: a request that follows the refresh of
//! an entry (`no-cache`, or a `max-age` the old entry failed) gets the new answer, never the
//! old one, even before the insert has landed (while the answer is being copied it waits for
//! the copy, never for an upstream). The map is sharded by key so that this check, on every
//! lookup, does not contend. This is deliberately not moka's `get_with`: there, a waiter is
//! stuck for as long as the initialising future is neither polled nor dropped (moka#240).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use event_listener::Event;

use crate::entry::Entry;
use crate::key::CacheKey;

/// The state of one flight.
#[derive(Debug)]
pub(crate) enum Flight {
    /// The leader is upstream.
    Pending,
    /// The leader's answer completed and is being stored (a copy away from `Stored`).
    Storing,
    /// The leader's answer, stored or about to be inserted.
    Stored(Arc<Entry>),
    /// The leader went without an answer to share: followers go upstream themselves.
    Released,
}

/// One flight: its state, and the followers waiting for it to change. Not a `watch`
/// channel: that notifies eight lists of waiters on every change, and almost every flight
/// has no follower at all; an [`Event`] nobody listened to costs nothing to notify.
#[derive(Debug)]
pub(crate) struct Cell {
    state: Mutex<Flight>,
    changed: Event,
}

impl Cell {
    fn new() -> Self {
        Self {
            state: Mutex::new(Flight::Pending),
            changed: Event::new(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, Flight> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn is_pending(&self) -> bool {
        matches!(*self.state(), Flight::Pending)
    }

    /// Sets the state and wakes every follower.
    fn set(&self, f: Flight) {
        *self.state() = f;
        self.wake();
    }

    /// Wakes the followers waiting for a change of state (made before this call).
    ///
    /// Only when there are any: notifying an `Event` allocates its list of listeners if
    /// nobody has listened yet. No follower is missed: a follower listens before it reads
    /// the state under the lock, so one that read the state before the change (and is
    /// about to wait) was counted before the change took the lock.
    fn wake(&self) {
        if self.changed.total_listeners() > 0 {
            self.changed.notify(usize::MAX);
        }
    }
}

type Shard = Mutex<ShardMap>;

/// One shard of the in-flight map.
#[derive(Debug, Default)]
pub(crate) struct ShardMap {
    /// A seeded hasher of one word, the key's (see `CacheKey`'s `Hash`): SipHash would cost
    /// ten times as much per lookup for nothing a uniform 64-bit word needs.
    flights: HashMap<CacheKey, (u64, Arc<Cell>), foldhash::fast::RandomState>,
    /// Entries stored in the cache under this shard's keys so far (see [`Flights::stored`]).
    stored: u64,
}

/// What [`Flights::completed`] saw: the shard's count of stored entries, to be handed to
/// [`Flights::join`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Seen(u64);

const SHARDS: usize = 64;

/// The in-flight map.
#[derive(Debug)]
pub(crate) struct Flights {
    shards: Box<[Shard]>,
    next_id: AtomicU64,
}

impl Default for Flights {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
            next_id: AtomicU64::new(0),
        }
    }
}

/// What a miss does on a key.
#[derive(Debug)]
pub(crate) enum Role {
    /// Go upstream; release or feed the followers through the guard. The flag says whether
    /// an entry was stored under a key of this shard since the [`Seen`] given to `join`
    /// (when not, a cache read made after that `Seen` is still up to date for this key).
    Leader(FlightGuard, bool),
    /// Wait for the leader.
    Follower(Arc<Cell>),
}

impl Flights {
    /// Joins the flight on `key`, or starts one.
    fn shard(&self, key: &CacheKey) -> std::sync::MutexGuard<'_, ShardMap> {
        // Keys are uniform hashes: any byte spreads them.
        self.shards[usize::from(key.as_bytes()[0]) % SHARDS]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The flight on `key`, if its answer has completed (it is being stored, or stored), and
    /// the shard's count of stored entries as of now.
    pub(crate) fn completed(&self, key: &CacheKey) -> (Option<Arc<Cell>>, Seen) {
        let shard = self.shard(key);
        let seen = Seen(shard.stored);
        let cell = shard
            .flights
            .get(key)
            .filter(|(_, cell)| !cell.is_pending())
            .map(|(_, cell)| cell.clone());
        (cell, seen)
    }

    /// Joins the flight on `key`, or starts one. `seen` is what an earlier
    /// [`completed`](Self::completed) saw (a leader learns whether an entry was stored
    /// since). A `refresh` (`no-cache`) request does not follow a flight whose answer has
    /// completed: it starts a new flight in its place, so that the requests after it get its
    /// answer rather than the one before (the old leader's guard, which still stores its
    /// answer, then leaves the new flight in the map).
    pub(crate) fn join(self: &Arc<Self>, key: CacheKey, seen: Seen, refresh: bool) -> Role {
        let mut shard = self.shard(&key);
        if let Some((_, cell)) = shard.flights.get(&key)
            && (!refresh || cell.is_pending())
        {
            return Role::Follower(cell.clone());
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let cell = Arc::new(Cell::new());
        shard.flights.insert(key, (id, cell.clone()));
        let stored_since = shard.stored != seen.0;
        Role::Leader(
            FlightGuard {
                flights: self.clone(),
                key,
                id,
                cell,
            },
            stored_since,
        )
    }

    /// Counts an entry stored in the cache under `key`; called once the cache holds it.
    ///
    /// So a request that missed the cache and then leads a flight re-reads the cache only
    /// when something was stored under its shard in between. Every store counts, after it
    /// lands, and a leader stores before its flight leaves the map: so an entry for the key
    /// that landed after that request's cache read either shows in the count at its `join`,
    /// or came from a flight still in the map then (and the request follows it).
    pub(crate) fn stored(&self, key: &CacheKey) {
        self.shard(key).stored += 1;
    }

    /// The number of flights in progress.
    pub(crate) fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                s.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .flights
                    .len()
            })
            .sum()
    }
}

/// Waits for the leader: `Some(entry)` when it stored its answer, `None` when it was
/// released (the follower then goes upstream by itself).
///
/// # Cancel safety
///
/// Dropping the future leaves the flight untouched.
pub(crate) async fn follow(cell: Arc<Cell>) -> Option<Arc<Entry>> {
    loop {
        // Listen before reading the state: a change made after the read wakes this listener.
        let changed = cell.changed.listen();
        match &*cell.state() {
            Flight::Stored(e) => return Some(e.clone()),
            Flight::Released => return None,
            Flight::Pending | Flight::Storing => {}
        }
        changed.await;
    }
}

/// The leader's side of a flight. Dropping it removes the flight from the map and, unless
/// an entry was published, releases the followers.
#[derive(Debug)]
pub(crate) struct FlightGuard {
    flights: Arc<Flights>,
    key: CacheKey,
    id: u64,
    cell: Arc<Cell>,
}

impl FlightGuard {
    /// Says that the answer completed and is being stored: lookups wait for it rather than
    /// read an older entry.
    pub(crate) fn storing(&self) {
        self.cell.set(Flight::Storing);
    }

    /// Hands the stored answer to the followers (and to anyone who joins until the guard is
    /// dropped).
    pub(crate) fn publish(&self, entry: Arc<Entry>) {
        self.cell.set(Flight::Stored(entry));
    }
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        let mut shard = self.flights.shard(&self.key);
        if shard
            .flights
            .get(&self.key)
            .is_some_and(|(id, _)| *id == self.id)
        {
            shard.flights.remove(&self.key);
        }
        drop(shard);
        // A published answer stays for the followers still to read it; otherwise they are
        // released.
        let mut state = self.cell.state();
        if !matches!(*state, Flight::Stored(_)) {
            *state = Flight::Released;
            drop(state);
            self.cell.wake();
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::entry::Head;
    use claude_core::UsageReport;
    use http::{HeaderMap, StatusCode};
    use std::time::Duration;

    fn key(n: u8) -> CacheKey {
        crate::key::CacheKey::from_parts::<&str>(
            None,
            claude_core::Endpoint::Messages,
            None,
            &HeaderMap::new(),
            &[b'0' + n],
            &[],
        )
        .unwrap()
    }

    /// An empty answer that lives a second.
    pub(crate) fn entry() -> Arc<Entry> {
        let head = Head {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
            model: None,
            lifetime: Duration::from_secs(1),
        };
        Arc::new(Entry::new(head, &[], UsageReport::default()))
    }

    #[tokio::test]
    async fn followers_get_the_published_entry() {
        let f = Arc::new(Flights::default());
        let Role::Leader(guard, _) = f.join(key(1), Seen(0), false) else {
            panic!("first is leader")
        };
        let Role::Follower(rx) = f.join(key(1), Seen(0), false) else {
            panic!("second follows")
        };
        assert!(
            matches!(f.join(key(2), Seen(0), false), Role::Leader(..)),
            "other keys lead"
        );
        let waiter = tokio::spawn(follow(rx));
        let e = entry();
        assert!(f.completed(&key(1)).0.is_none(), "pending is not completed");
        guard.storing();
        let storing = f.completed(&key(1)).0.unwrap();
        guard.publish(e.clone());
        assert!(Arc::ptr_eq(&follow(storing).await.unwrap(), &e));
        // Joining after publication still gets the entry.
        let Role::Follower(late) = f.join(key(1), Seen(0), false) else {
            panic!("still in flight until the guard drops")
        };
        drop(guard);
        assert!(Arc::ptr_eq(&waiter.await.unwrap().unwrap(), &e));
        assert!(Arc::ptr_eq(&follow(late).await.unwrap(), &e));
        assert_eq!(f.len(), 0);
        assert!(f.completed(&key(1)).0.is_none());
    }

    #[tokio::test]
    async fn dropping_the_leader_releases_followers_and_the_key() {
        let f = Arc::new(Flights::default());
        let Role::Leader(guard, _) = f.join(key(1), Seen(0), false) else {
            panic!()
        };
        let Role::Follower(rx) = f.join(key(1), Seen(0), false) else {
            panic!()
        };
        let waiter = tokio::spawn(follow(rx));
        drop(guard);
        assert!(waiter.await.unwrap().is_none());
        assert_eq!(f.len(), 0);
        assert!(matches!(f.join(key(1), Seen(0), false), Role::Leader(..)));
    }

    #[tokio::test]
    async fn a_refresh_follows_a_pending_flight_and_replaces_a_completed_one() {
        let f = Arc::new(Flights::default());
        let Role::Leader(old, _) = f.join(key(1), Seen(0), false) else {
            panic!()
        };
        assert!(
            matches!(f.join(key(1), Seen(0), true), Role::Follower(_)),
            "the leader is upstream: the refresh is told there is a flight"
        );
        let waiting = match f.join(key(1), Seen(0), false) {
            Role::Follower(rx) => rx,
            Role::Leader(..) => panic!("follows"),
        };
        old.publish(entry());
        // The old answer completed but is not in the cache yet: a refresh leads anew.
        let Role::Leader(new, _) = f.join(key(1), Seen(0), true) else {
            panic!("a refresh does not follow a completed flight")
        };
        assert!(
            f.completed(&key(1)).0.is_none(),
            "lookups no longer see the old answer"
        );
        let later = match f.join(key(1), Seen(0), false) {
            Role::Follower(rx) => rx,
            Role::Leader(..) => panic!("follows the refresh"),
        };
        // The old leader stores its answer and goes; its followers got it, the new flight stays.
        drop(old);
        assert!(follow(waiting).await.is_some());
        assert_eq!(f.len(), 1);
        let fresh = entry();
        new.publish(fresh.clone());
        assert!(Arc::ptr_eq(&follow(later).await.unwrap(), &fresh));
    }

    #[test]
    fn an_old_guard_does_not_remove_a_newer_flight() {
        let f = Arc::new(Flights::default());
        let Role::Leader(old, _) = f.join(key(1), Seen(0), false) else {
            panic!()
        };
        // Simulate the old flight having been replaced under the same key.
        f.shard(&key(1)).flights.remove(&key(1));
        let Role::Leader(_new, _) = f.join(key(1), Seen(0), false) else {
            panic!()
        };
        drop(old);
        assert_eq!(f.len(), 1);
    }

    #[test]
    fn a_leader_learns_whether_an_entry_was_stored_since_its_cache_read() {
        let f = Arc::new(Flights::default());
        let (_, seen) = f.completed(&key(1));
        let Role::Leader(guard, stored_since) = f.join(key(1), seen, false) else {
            panic!()
        };
        assert!(!stored_since, "nothing stored: the cache read stands");
        drop(guard);
        // Another request stores an answer for the key between this one's read and join.
        let (_, seen) = f.completed(&key(1));
        f.stored(&key(1));
        let Role::Leader(guard, stored_since) = f.join(key(1), seen, false) else {
            panic!()
        };
        assert!(stored_since, "a store since the read: read again");
        drop(guard);
        // A store under another shard does not count.
        let other = (2..=255)
            .map(key)
            .find(|k| {
                usize::from(k.as_bytes()[0]) % SHARDS != usize::from(key(1).as_bytes()[0]) % SHARDS
            })
            .unwrap();
        let (_, seen) = f.completed(&key(1));
        f.stored(&other);
        let Role::Leader(_guard, stored_since) = f.join(key(1), seen, false) else {
            panic!()
        };
        assert!(!stored_since);
    }

    /// Followers on other threads, racing the leader's publish or release: every one of them
    /// wakes with the leader's outcome (a lost wake-up would hang the test).
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn followers_on_other_threads_never_miss_the_outcome() {
        let f = Arc::new(Flights::default());
        for round in 0..300u32 {
            let Role::Leader(guard, _) = f.join(key(1), Seen(0), false) else {
                panic!("round {round}: the last flight left the map")
            };
            let followers: Vec<_> = (0..6)
                .map(|_| {
                    let Role::Follower(cell) = f.join(key(1), Seen(0), false) else {
                        panic!("follows")
                    };
                    tokio::spawn(follow(cell))
                })
                .collect();
            tokio::task::yield_now().await;
            let published = (round % 2 == 0).then(entry);
            if let Some(e) = &published {
                guard.storing();
                guard.publish(e.clone());
            }
            drop(guard);
            for w in followers {
                let got = tokio::time::timeout(Duration::from_secs(10), w)
                    .await
                    .expect("a follower was never woken")
                    .unwrap();
                match (&published, got) {
                    (Some(e), Some(g)) => assert!(Arc::ptr_eq(e, &g)),
                    (None, None) => {}
                    (p, g) => panic!("round {round}: published {p:?}, follower got {g:?}"),
                }
            }
        }
        assert_eq!(f.len(), 0);
    }
}
