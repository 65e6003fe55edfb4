//! [`KeyRing`]: the current key of one source, refreshed in the background, served stale
//! within limits when the source fails, refreshed once after any number of 401s.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use claude_core::{Error, ErrorKind};
use http::HeaderValue;
use secrecy::ExposeSecret;
use serde::Deserialize;
use tokio::time::Instant;
use zeroize::Zeroize;

use crate::secret::{Fingerprint, Secret, SecretError, SecretErrorKind};
use crate::source::SecretSource;

/// Metric names (labels: `source`, the key ring's name; `trigger` and `result` where noted).
pub mod metric {
    /// Counter of fetches, labels `source`, `trigger` (`initial`, `interval`, `stale`,
    /// `auth_failure`, `manual`) and `result` (`loaded`, `unchanged`, `rotated`, `error`).
    pub const REFRESH_TOTAL: &str = "claude_secrets_refresh_total";
    /// Gauge, 1 while the ring serves a key whose last refresh failed, else 0.
    pub const STALE: &str = "claude_secrets_stale";
    /// Gauge, the age of the current key in seconds, set at each refresh, for sources that
    /// know when the key was created (Vault, AWS).
    pub const KEY_AGE_SECONDS: &str = "claude_secrets_key_age_seconds";
    /// Counter of upstream 401s seen by the layer, labels `source` and `outcome`
    /// (`replayed`: the key had changed and the request was sent again; `returned`: it had
    /// not, and the 401 went back to the caller).
    pub const AUTH_REJECTIONS_TOTAL: &str = "claude_secrets_auth_rejections_total";
}

/// Configuration of a [`KeyRing`]. Every field has a default; see the field docs.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KeyRingConfig {
    /// How often the background task asks the source again. Default 5 min; at least 1 s
    /// (shorter values are raised to 1 s). A [`FileSource`](crate::FileSource) only stats
    /// the file when nothing changed, so it can take a short interval (10 s) cheaply.
    #[serde(with = "claude_core::config::duration")]
    pub refresh_interval: Duration,
    /// How long after the source last confirmed the key the ring keeps serving it while
    /// the source fails. Past it, [`KeyRing::current`] asks the source and, if it still
    /// fails, returns [`ErrorKind::SecretUnavailable`]. Default 1 h.
    #[serde(with = "claude_core::config::duration")]
    pub max_staleness: Duration,
    /// Keys older than this (by the source's creation time) are reported with a warning,
    /// once per key. Default 90 days.
    #[serde(with = "claude_core::config::duration")]
    pub rotation_period: Duration,
    /// The longest a fetch may take before it counts as failed. Default 10 s.
    #[serde(with = "claude_core::config::duration")]
    pub fetch_timeout: Duration,
    /// After a fetch failed, requests that find no usable key fail at once with the last
    /// error for this long instead of asking the source again; and after a 401 the source
    /// was asked about and still gave the same key, further 401s for that key do not ask
    /// again for this long. It keeps a dead or stubborn source from being hammered by
    /// traffic. Default 5 s.
    #[serde(with = "claude_core::config::duration")]
    pub min_refresh_interval: Duration,
}

impl Default for KeyRingConfig {
    fn default() -> Self {
        Self {
            refresh_interval: Duration::from_secs(5 * 60),
            max_staleness: Duration::from_secs(60 * 60),
            rotation_period: Duration::from_secs(90 * 24 * 60 * 60),
            fetch_timeout: Duration::from_secs(10),
            min_refresh_interval: Duration::from_secs(5),
        }
    }
}

/// The smallest refresh interval honoured.
const MIN_INTERVAL: Duration = Duration::from_secs(1);

/// A key as the ring serves it: the [`Secret`] and its `x-api-key` header value, built once.
///
/// The header value is marked sensitive (`HeaderValue::set_sensitive`), so HTTP/2 never
/// indexes it in HPACK tables and tower-http / hyper `Debug` print `Sensitive`. It shares
/// one buffer across all requests (cloning it is a reference count), and that buffer is
/// zeroed when the last request holding it is gone. Copies made further down (hyper's write
/// buffer, the kernel) cannot be wiped.
///
/// `Debug` shows the fingerprint, version and creation time.
pub struct LoadedKey {
    secret: Secret,
    header: HeaderValue,
}

/// The owner of a header value's bytes: zeroed when the last `Bytes` referring to it drops.
struct ZeroizingBuf(Box<[u8]>);

impl AsRef<[u8]> for ZeroizingBuf {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for ZeroizingBuf {
    fn drop(&mut self) {
        self.0.zeroize();
        #[cfg(test)]
        tests::ZEROIZED.fetch_add(1, Ordering::SeqCst);
    }
}

impl LoadedKey {
    /// Builds the header value for `secret`.
    ///
    /// # Errors
    ///
    /// [`SecretErrorKind::Invalid`] when the value is not visible ASCII (control
    /// characters, spaces, non-ASCII characters).
    pub fn new(secret: Secret) -> Result<Self, SecretError> {
        let invalid = || {
            SecretError::new(
                SecretErrorKind::Invalid,
                "the key contains characters other than visible ASCII (a stray quote, space or \
                 control character?)",
            )
        };
        // API keys are visible ASCII; HTTP would also take obs-text and inner spaces, which
        // in a key are copy-paste accidents.
        if !secret.expose_secret().bytes().all(|b| b.is_ascii_graphic()) {
            return Err(invalid());
        }
        let buf = ZeroizingBuf(secret.expose_secret().as_bytes().into());
        let mut header =
            HeaderValue::from_maybe_shared(Bytes::from_owner(buf)).map_err(|_| invalid())?;
        header.set_sensitive(true);
        Ok(Self { secret, header })
    }

    /// The secret.
    pub fn secret(&self) -> &Secret {
        &self.secret
    }

    /// The fingerprint of the key.
    pub fn fingerprint(&self) -> Fingerprint {
        self.secret.fingerprint()
    }

    /// The source's version of the key, if it has versions.
    pub fn version(&self) -> Option<&str> {
        self.secret.version()
    }

    /// When the key was created, if the source knows.
    pub fn created_at(&self) -> Option<SystemTime> {
        self.secret.created_at()
    }

    /// How old the key is, if the source knows when it was created.
    pub fn age(&self) -> Option<Duration> {
        self.created_at()
            .map(|t| SystemTime::now().duration_since(t).unwrap_or_default())
    }

    /// The value for an `x-api-key` header, marked sensitive.
    pub fn header_value(&self) -> HeaderValue {
        self.header.clone()
    }
}

impl fmt::Debug for LoadedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadedKey")
            .field("fingerprint", &self.secret.fingerprint())
            .field("version", &self.secret.version())
            .field(
                "created_at",
                &self.secret.created_at().map(httpdate::fmt_http_date),
            )
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trigger {
    Initial,
    Interval,
    Stale,
    AuthFailure,
    Manual,
}

impl Trigger {
    const fn as_str(self) -> &'static str {
        match self {
            Self::Initial => "initial",
            Self::Interval => "interval",
            Self::Stale => "stale",
            Self::AuthFailure => "auth_failure",
            Self::Manual => "manual",
        }
    }
}

/// What a [`KeyRing`] knows right now, for health checks and admin endpoints.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct KeyRingStatus {
    /// The ring's name (its source's name).
    pub name: Arc<str>,
    /// The key served, if one was ever loaded.
    pub key: Option<Arc<LoadedKey>>,
    /// Whether the last refresh failed while a key was being served.
    pub stale: bool,
    /// How long ago the source last returned the key.
    pub since_confirmed: Option<Duration>,
    /// The error of the last fetch, if it failed.
    pub last_error: Option<SecretError>,
}

/// The current key of one [`SecretSource`], kept fresh.
///
/// - **First use** fetches the key (concurrent first callers share one fetch). Call
///   [`current`](Self::current) at startup to fail fast when the key is missing.
/// - **Background refresh**: a task on the tokio runtime fetches again every
///   [`refresh_interval`](KeyRingConfig::refresh_interval). It holds only a weak reference:
///   dropping the last clone of the ring stops it at once. It is spawned by `new` when
///   called inside a runtime, else on first use.
/// - **Outages**: when a fetch fails the ring keeps serving the last good key, sets the
///   `claude_secrets_stale` gauge to 1 and logs a warning at each failed refresh, until
///   [`max_staleness`](KeyRingConfig::max_staleness) after the source last confirmed the
///   key; then [`current`](Self::current) fails with [`ErrorKind::SecretUnavailable`] unless
///   the source answers again.
/// - **After a 401**: [`refresh_after_auth_failure`](Self::refresh_after_auth_failure)
///   fetches once for any number of concurrent callers that were rejected with the same key.
/// - **Age**: for sources that know the key's creation time the ring sets
///   `claude_secrets_key_age_seconds` and warns once per key older than
///   [`rotation_period`](KeyRingConfig::rotation_period).
///
/// # Decisions
///
/// - Fetches of one ring never overlap (a tokio mutex is held for each), and each is bounded
///   by [`fetch_timeout`](KeyRingConfig::fetch_timeout). A fetch runs in the task of the
///   caller that needs it, not in a spawned task: if that caller is cancelled (a request
///   timeout above), the fetch is dropped and the next caller starts one. Nothing is left
///   half-applied: the result is installed under a short synchronous lock.
/// - The hot path ([`current`](Self::current) with a usable key) takes one uncontended
///   `std::sync::Mutex` and clones an `Arc`; it never awaits.
/// - "Changed" means a different [`Fingerprint`] (a hash of the value), not a different
///   version: a new version holding the same value is no rotation, and a source without
///   versions (env, file) rotates like any other.
/// - Staleness is measured from the last successful fetch on tokio's clock (so tests can
///   pause it); a key's age from the source's creation time on the system clock.
/// - The background task needs a tokio runtime and lives on the runtime that spawned it.
///
/// Clones share state; the ring is cheap to clone.
///
/// ```
/// use claude_secrets::{KeyRing, KeyRingConfig, StaticSource};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), claude_core::Error> {
/// let source = StaticSource::new("sk-ant-one");
/// let ring = KeyRing::new(source.clone(), KeyRingConfig::default());
/// let key = ring.current().await?;
/// source.set("sk-ant-two"); // rotated at the source
/// let fresh = ring.refresh().await?; // or wait for the background refresh
/// assert_ne!(key.fingerprint(), fresh.fingerprint());
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct KeyRing {
    inner: Arc<Inner>,
}

struct Inner {
    name: Arc<str>,
    source: Box<dyn SecretSource>,
    config: KeyRingConfig,
    state: Mutex<State>,
    /// Held for the whole of every fetch: fetches of one ring never overlap.
    fetch_lock: tokio::sync::Mutex<()>,
    background_started: AtomicBool,
    /// Never sent on; dropped with `Inner`, which ends the background task.
    shutdown: tokio::sync::watch::Sender<()>,
}

#[derive(Default)]
struct State {
    current: Option<Arc<LoadedKey>>,
    /// When the source last returned a key.
    confirmed_at: Option<Instant>,
    stale: bool,
    last_error: Option<SecretError>,
    last_failure_at: Option<Instant>,
    /// Fetches started so far; a fetch's index is the value after its start.
    fetches_started: u64,
    /// The index of the last fetch that completed.
    last_completed: u64,
    /// After a 401: the rejected key the source was asked about, and when.
    auth_checked: Option<(Fingerprint, Instant)>,
    /// The key already reported as older than the rotation period.
    warned_old: Option<Fingerprint>,
}

impl KeyRing {
    /// A ring over `source`, named after the source.
    pub fn new(source: impl SecretSource, config: KeyRingConfig) -> Self {
        let name: Arc<str> = Arc::from(source.name());
        Self::build(name, Box::new(source), config)
    }

    /// A ring with a name of your choice (the metrics' `source` label and the log field).
    pub fn named(
        name: impl Into<Arc<str>>,
        source: impl SecretSource,
        config: KeyRingConfig,
    ) -> Self {
        Self::build(name.into(), Box::new(source), config)
    }

    fn build(name: Arc<str>, source: Box<dyn SecretSource>, mut config: KeyRingConfig) -> Self {
        config.refresh_interval = config.refresh_interval.max(MIN_INTERVAL);
        let (shutdown, _) = tokio::sync::watch::channel(());
        let ring = Self {
            inner: Arc::new(Inner {
                name,
                source,
                config,
                state: Mutex::new(State::default()),
                fetch_lock: tokio::sync::Mutex::new(()),
                background_started: AtomicBool::new(false),
                shutdown,
            }),
        };
        if tokio::runtime::Handle::try_current().is_ok() {
            ring.ensure_background();
        }
        ring
    }

    /// The ring's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The configuration in force (after clamping).
    pub fn config(&self) -> &KeyRingConfig {
        &self.inner.config
    }

    /// The key to use now.
    ///
    /// Returns the current key at once when the source confirmed it within
    /// `max_staleness`; otherwise fetches (sharing a fetch in progress).
    ///
    /// # Errors
    ///
    /// [`ErrorKind::SecretUnavailable`] when there is no key yet and the source fails, or the
    /// last good key is older than `max_staleness` and the source still fails. Within
    /// `min_refresh_interval` of a failed fetch, the last error is returned without asking the
    /// source again.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a dropped call leaves the ring consistent (a fetch it drove is abandoned
    /// and the next caller starts another).
    pub async fn current(&self) -> Result<Arc<LoadedKey>, Error> {
        self.ensure_background();
        let now = Instant::now();
        if let Some(key) = self.inner.usable(&self.inner.lock(), now) {
            return Ok(key);
        }
        // Boxed: a fetch's future is large, and without the box every caller's future (one
        // per request) would be as large as the rare fetch.
        Box::pin(self.fetch_current()).await
    }

    /// [`KeyRing::current`] when no usable key is held: one fetch at a time.
    async fn fetch_current(&self) -> Result<Arc<LoadedKey>, Error> {
        let _fetching = self.inner.fetch_lock.lock().await;
        let trigger = {
            let st = self.inner.lock();
            let now = Instant::now();
            if let Some(key) = self.inner.usable(&st, now) {
                return Ok(key);
            }
            if let (Some(at), Some(err)) = (st.last_failure_at, &st.last_error)
                && now.duration_since(at) < self.inner.config.min_refresh_interval
            {
                return Err(self.inner.unavailable(err, st.current.is_some()));
            }
            if st.current.is_some() {
                Trigger::Stale
            } else {
                Trigger::Initial
            }
        };
        self.inner
            .fetch_and_apply(trigger)
            .await
            .map_err(|e| self.inner.unavailable(&e, trigger == Trigger::Stale))
    }

    /// Fetches now (an operator's "reload"), sharing a fetch that starts while this call
    /// waits for another to finish.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::SecretUnavailable`] when the fetch fails. The ring keeps serving the
    /// last good key within `max_staleness` either way.
    pub async fn refresh(&self) -> Result<Arc<LoadedKey>, Error> {
        self.ensure_background();
        let seen_started = self.inner.lock().fetches_started;
        let _fetching = self.inner.fetch_lock.lock().await;
        {
            let st = self.inner.lock();
            if st.last_completed > seen_started {
                // A fetch that started after this call did completed while it waited.
                return match (&st.current, &st.last_error) {
                    (_, Some(err)) => Err(self.inner.unavailable(err, st.current.is_some())),
                    (Some(key), None) => Ok(key.clone()),
                    (None, None) => Err(Error::new(ErrorKind::SecretUnavailable, "no API key")),
                };
            }
        }
        self.inner
            .fetch_and_apply(Trigger::Manual)
            .await
            .map_err(|e| self.inner.unavailable(&e, false))
    }

    /// Called after the upstream rejected `rejected` with a 401: returns the key to replay
    /// with, if a different one is current now, else `None`.
    ///
    /// - If the ring already holds a different key (another request refreshed), it is
    ///   returned without a fetch.
    /// - Otherwise the source is asked once: every caller rejected with the same key while
    ///   that fetch is in flight shares it, and for `min_refresh_interval` after the source
    ///   confirmed the same key, further 401s for it do not ask again. A storm of concurrent
    ///   401s therefore costs one fetch.
    /// - A failing source gives `None` (the 401 stands; the ring keeps its key).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe, as [`current`](Self::current).
    pub async fn refresh_after_auth_failure(&self, rejected: &LoadedKey) -> Option<Arc<LoadedKey>> {
        let fp = rejected.fingerprint();
        let check = |st: &State| -> Option<Option<Arc<LoadedKey>>> {
            if let Some(current) = &st.current
                && current.fingerprint() != fp
            {
                return Some(Some(current.clone()));
            }
            if let Some((checked, at)) = st.auth_checked
                && checked == fp
                && at.elapsed() < self.inner.config.min_refresh_interval
            {
                return Some(None);
            }
            None
        };
        let seen_started = {
            let st = self.inner.lock();
            if let Some(answer) = check(&st) {
                return answer;
            }
            st.fetches_started
        };
        let _fetching = self.inner.fetch_lock.lock().await;
        {
            let st = self.inner.lock();
            if let Some(answer) = check(&st) {
                return answer;
            }
            if st.last_completed > seen_started {
                // A fetch that started after this 401 arrived gave the same key (or failed).
                return None;
            }
        }
        let res = self.inner.fetch_and_apply(Trigger::AuthFailure).await;
        self.inner.lock().auth_checked = Some((fp, Instant::now()));
        match res {
            Ok(key) if key.fingerprint() != fp => Some(key),
            _ => None,
        }
    }

    /// What the ring knows right now (never fetches).
    pub fn status(&self) -> KeyRingStatus {
        let st = self.inner.lock();
        KeyRingStatus {
            name: self.inner.name.clone(),
            key: st.current.clone(),
            stale: st.stale,
            since_confirmed: st.confirmed_at.map(|t| t.elapsed()),
            last_error: st.last_error.clone(),
        }
    }

    fn ensure_background(&self) {
        if self.inner.background_started.swap(true, Ordering::AcqRel) {
            return;
        }
        let weak = Arc::downgrade(&self.inner);
        let shutdown = self.inner.shutdown.subscribe();
        let interval = self.inner.config.refresh_interval;
        tokio::spawn(background(weak, shutdown, interval));
    }
}

async fn background(
    weak: Weak<Inner>,
    mut shutdown: tokio::sync::watch::Receiver<()>,
    every: Duration,
) {
    // Prefetch, so that the first request finds the key ready.
    if let Some(inner) = weak.upgrade() {
        let _fetching = inner.fetch_lock.lock().await;
        let untouched = {
            let st = inner.lock();
            st.current.is_none() && st.last_failure_at.is_none()
        };
        if untouched {
            let _ = inner.fetch_and_apply(Trigger::Initial).await;
        }
    }
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            _ = shutdown.changed() => return,
        }
        let Some(inner) = weak.upgrade() else { return };
        let _fetching = inner.fetch_lock.lock().await;
        let _ = inner.fetch_and_apply(Trigger::Interval).await;
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn usable(&self, st: &State, now: Instant) -> Option<Arc<LoadedKey>> {
        let key = st.current.as_ref()?;
        let confirmed = st.confirmed_at?;
        (now.duration_since(confirmed) <= self.config.max_staleness).then(|| key.clone())
    }

    fn unavailable(&self, err: &SecretError, had_key: bool) -> Error {
        let message = if had_key {
            format!(
                "API key source {} fails and the last good key is older than the maximum staleness ({}): {err}",
                self.name,
                claude_core::config::format(self.config.max_staleness)
            )
        } else {
            format!("no API key from source {}: {err}", self.name)
        };
        Error::new(ErrorKind::SecretUnavailable, message).with_source(err.clone())
    }

    /// Fetches and installs the result. The caller holds `fetch_lock`.
    async fn fetch_and_apply(&self, trigger: Trigger) -> Result<Arc<LoadedKey>, SecretError> {
        let index = {
            let mut st = self.lock();
            st.fetches_started += 1;
            st.fetches_started
        };
        let timeout = self.config.fetch_timeout;
        let res = match tokio::time::timeout(timeout, self.source.fetch()).await {
            Ok(res) => res,
            Err(_) => Err(SecretError::new(
                SecretErrorKind::Unavailable,
                format!(
                    "{}: no answer within {}",
                    self.name,
                    claude_core::config::format(timeout)
                ),
            )),
        }
        .and_then(LoadedKey::new);
        let now = Instant::now();
        let source = self.name.to_string();
        let mut st = self.lock();
        st.last_completed = index;
        match res {
            Ok(key) => {
                let key = Arc::new(key);
                let previous = st.current.replace(key.clone());
                let was_stale = std::mem::replace(&mut st.stale, false);
                st.confirmed_at = Some(now);
                st.last_error = None;
                st.last_failure_at = None;
                let warn_old = match key.age() {
                    Some(age)
                        if age > self.config.rotation_period
                            && st.warned_old != Some(key.fingerprint()) =>
                    {
                        st.warned_old = Some(key.fingerprint());
                        Some(age)
                    }
                    _ => None,
                };
                drop(st);
                let result = match &previous {
                    None => "loaded",
                    Some(p) if p.fingerprint() == key.fingerprint() => "unchanged",
                    Some(_) => "rotated",
                };
                metrics::counter!(metric::REFRESH_TOTAL, "source" => source.clone(), "trigger" => trigger.as_str(), "result" => result).increment(1);
                metrics::gauge!(metric::STALE, "source" => source.clone()).set(0.0);
                if let Some(age) = key.age() {
                    metrics::gauge!(metric::KEY_AGE_SECONDS, "source" => source)
                        .set(age.as_secs_f64());
                }
                match (result, &previous) {
                    ("rotated", Some(p)) => tracing::info!(
                        source = %self.name,
                        from = %p.fingerprint(),
                        to = %key.fingerprint(),
                        version = key.version(),
                        trigger = trigger.as_str(),
                        "API key rotated"
                    ),
                    ("loaded", _) => tracing::info!(
                        source = %self.name,
                        fingerprint = %key.fingerprint(),
                        version = key.version(),
                        "API key loaded"
                    ),
                    _ => tracing::debug!(
                        source = %self.name,
                        fingerprint = %key.fingerprint(),
                        trigger = trigger.as_str(),
                        "API key unchanged"
                    ),
                }
                if was_stale {
                    tracing::info!(source = %self.name, "API key source answers again; key no longer stale");
                }
                if let Some(age) = warn_old {
                    tracing::warn!(
                        source = %self.name,
                        fingerprint = %key.fingerprint(),
                        age_days = age.as_secs() / 86_400,
                        rotation_period_days = self.config.rotation_period.as_secs() / 86_400,
                        "API key is older than the rotation period; rotate it"
                    );
                }
                Ok(key)
            }
            Err(err) => {
                st.last_error = Some(err.clone());
                st.last_failure_at = Some(now);
                let serving = st.current.clone();
                let since = st.confirmed_at.map(|t| now.duration_since(t));
                if serving.is_some() {
                    st.stale = true;
                }
                drop(st);
                metrics::counter!(metric::REFRESH_TOTAL, "source" => source.clone(), "trigger" => trigger.as_str(), "result" => "error").increment(1);
                match (serving, since) {
                    (Some(key), Some(since)) if since <= self.config.max_staleness => {
                        metrics::gauge!(metric::STALE, "source" => source).set(1.0);
                        tracing::warn!(
                            source = %self.name,
                            fingerprint = %key.fingerprint(),
                            error = %err,
                            kind = %err.kind(),
                            stale_for_secs = since.as_secs(),
                            max_staleness_secs = self.config.max_staleness.as_secs(),
                            "API key refresh failed; serving the last good key"
                        );
                    }
                    (Some(key), _) => {
                        metrics::gauge!(metric::STALE, "source" => source).set(1.0);
                        tracing::error!(
                            source = %self.name,
                            fingerprint = %key.fingerprint(),
                            error = %err,
                            kind = %err.kind(),
                            max_staleness_secs = self.config.max_staleness.as_secs(),
                            "API key refresh failed and the last good key is past the maximum staleness; requests fail"
                        );
                    }
                    (None, _) => tracing::error!(
                        source = %self.name,
                        error = %err,
                        kind = %err.kind(),
                        trigger = trigger.as_str(),
                        "API key fetch failed; no key to serve"
                    ),
                }
                Err(err)
            }
        }
    }
}

impl fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.inner.lock();
        f.debug_struct("KeyRing")
            .field("name", &self.inner.name)
            .field("key", &st.current)
            .field("stale", &st.stale)
            .field("config", &self.inner.config)
            .finish()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::StaticSource;
    use std::sync::Mutex;
    use std::sync::atomic::AtomicUsize;

    pub(crate) static ZEROIZED: AtomicUsize = AtomicUsize::new(0);

    fn cfg() -> KeyRingConfig {
        KeyRingConfig::default()
    }

    #[test]
    fn config_defaults_and_parsing() {
        let c: KeyRingConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(c, KeyRingConfig::default());
        assert_eq!(c.refresh_interval, Duration::from_secs(300));
        assert_eq!(c.max_staleness, Duration::from_secs(3600));
        assert_eq!(c.rotation_period, Duration::from_secs(90 * 86_400));
        let c: KeyRingConfig =
            serde_json::from_str(r#"{"refresh_interval":"30s","max_staleness":"2h"}"#).unwrap();
        assert_eq!(c.refresh_interval, Duration::from_secs(30));
        assert_eq!(c.max_staleness, Duration::from_secs(7200));
        assert!(serde_json::from_str::<KeyRingConfig>(r#"{"refresh":"30s"}"#).is_err());
    }

    #[test]
    fn header_value_is_sensitive_shared_and_zeroed() {
        let before = ZEROIZED.load(Ordering::SeqCst);
        let key = LoadedKey::new(Secret::new("sk-ant-xyz")).unwrap();
        let h = key.header_value();
        assert!(h.is_sensitive());
        assert_eq!(h.as_bytes(), b"sk-ant-xyz");
        assert!(!format!("{h:?} {key:?}").contains("xyz"));
        let again = key.header_value();
        drop(key);
        drop(h);
        assert_eq!(ZEROIZED.load(Ordering::SeqCst), before, "still referenced");
        drop(again);
        assert_eq!(ZEROIZED.load(Ordering::SeqCst), before + 1);
        let e = LoadedKey::new(Secret::new("sk\u{7f}bad")).unwrap_err();
        assert_eq!(e.kind(), SecretErrorKind::Invalid);
        assert!(LoadedKey::new(Secret::new("sk-ünicode")).is_err());
        assert!(LoadedKey::new(Secret::new("sk key")).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn first_use_fetches_once() {
        let src = StaticSource::new("k1");
        src.set_delay(Duration::from_millis(50));
        let ring = KeyRing::new(src.clone(), cfg());
        let keys = futures_util::future::join_all((0..20).map(|_| ring.current())).await;
        for k in keys {
            assert_eq!(k.unwrap().secret().expose_secret(), "k1");
        }
        assert_eq!(src.fetch_count(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn background_refresh_picks_up_rotation() {
        let src = StaticSource::new("k1");
        let ring = KeyRing::new(src.clone(), cfg());
        let k1 = ring.current().await.unwrap();
        src.set("k2");
        tokio::time::sleep(Duration::from_secs(299)).await;
        assert_eq!(
            ring.current().await.unwrap().fingerprint(),
            k1.fingerprint()
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        let k2 = ring.current().await.unwrap();
        assert_eq!(k2.secret().expose_secret(), "k2");
        assert_eq!(
            src.fetch_count(),
            2,
            "the background task fetched, not current()"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn outage_serves_last_good_key_until_max_staleness() {
        let src = StaticSource::new("k1");
        let config = KeyRingConfig {
            refresh_interval: Duration::from_secs(60),
            max_staleness: Duration::from_secs(600),
            ..cfg()
        };
        let ring = KeyRing::new(src.clone(), config);
        ring.current().await.unwrap();
        src.set_unavailable(true);
        tokio::time::sleep(Duration::from_secs(61)).await;
        let status = ring.status();
        assert!(status.stale);
        assert!(status.last_error.is_some());
        assert_eq!(ring.current().await.unwrap().secret().expose_secret(), "k1");
        tokio::time::sleep(Duration::from_secs(540)).await; // 601 s since confirmed
        let err = ring.current().await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::SecretUnavailable);
        assert!(err.message().contains("maximum staleness"), "{err}");
        // Recovery.
        src.set_unavailable(false);
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!ring.status().stale);
        assert_eq!(ring.current().await.unwrap().secret().expose_secret(), "k1");
    }

    #[tokio::test(start_paused = true)]
    async fn failing_first_fetch_backs_off() {
        let src = StaticSource::new("k1");
        src.set_unavailable(true);
        let ring = KeyRing::new(src.clone(), cfg());
        let e = ring.current().await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::SecretUnavailable);
        let fetched = src.fetch_count();
        for _ in 0..10 {
            assert!(ring.current().await.is_err());
        }
        assert_eq!(
            src.fetch_count(),
            fetched,
            "within min_refresh_interval: no fetch"
        );
        src.set_unavailable(false);
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert!(ring.current().await.is_ok());
        assert_eq!(src.fetch_count(), fetched + 1);
    }

    /// A source that tells, through its token's count, whether it is still alive.
    struct Probe(StaticSource, #[allow(dead_code)] Arc<()>);

    impl SecretSource for Probe {
        fn name(&self) -> &str {
            self.0.name()
        }
        fn fetch(&self) -> crate::FetchFuture<'_> {
            self.0.fetch()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn dropping_the_ring_stops_the_background_task() {
        let src = StaticSource::new("k1");
        let token = Arc::new(());
        let ring = KeyRing::new(Probe(src.clone(), token.clone()), cfg());
        ring.current().await.unwrap();
        tokio::time::sleep(Duration::from_secs(301)).await;
        assert_eq!(src.fetch_count(), 2);
        assert_eq!(Arc::strong_count(&token), 2);
        drop(ring);
        // The background task holds only a weak reference: the source is gone with the ring.
        assert_eq!(Arc::strong_count(&token), 1);
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert_eq!(src.fetch_count(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_auth_failures_cause_one_fetch() {
        let src = StaticSource::new("k1");
        let ring = KeyRing::new(src.clone(), cfg());
        let k1 = ring.current().await.unwrap();
        src.set("k2");
        src.set_delay(Duration::from_millis(100));
        let before = src.fetch_count();
        let results =
            futures_util::future::join_all((0..100).map(|_| ring.refresh_after_auth_failure(&k1)))
                .await;
        assert_eq!(src.fetch_count(), before + 1);
        for r in results {
            assert_eq!(r.unwrap().secret().expose_secret(), "k2");
        }
        // A late 401 for the old key: no fetch, the new key.
        let late = ring.refresh_after_auth_failure(&k1).await.unwrap();
        assert_eq!(late.secret().expose_secret(), "k2");
        assert_eq!(src.fetch_count(), before + 1);
    }

    #[tokio::test(start_paused = true)]
    async fn unchanged_key_after_auth_failure_is_asked_once_per_interval() {
        let src = StaticSource::new("k1");
        let ring = KeyRing::new(src.clone(), cfg());
        let k1 = ring.current().await.unwrap();
        let before = src.fetch_count();
        let results =
            futures_util::future::join_all((0..100).map(|_| ring.refresh_after_auth_failure(&k1)))
                .await;
        assert!(results.iter().all(Option::is_none));
        assert!(ring.refresh_after_auth_failure(&k1).await.is_none());
        assert_eq!(src.fetch_count(), before + 1);
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert!(ring.refresh_after_auth_failure(&k1).await.is_none());
        assert_eq!(src.fetch_count(), before + 2);
    }

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn key_age_is_reported_and_old_keys_warned_about_once() {
        let buf = Buf::default();
        let writer = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let _logs = tracing::subscriber::set_default(subscriber);
        let recorder = metrics_util::debugging::DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let _metrics = metrics::set_default_local_recorder(&recorder);

        let day = Duration::from_secs(86_400);
        let old = Secret::new("k-old").with_created_at(SystemTime::now() - 100 * day);
        let src = StaticSource::named("aged", old);
        let ring = KeyRing::new(src.clone(), cfg());
        let key = ring.current().await.unwrap();
        assert!(key.age().unwrap() >= 100 * day);
        ring.refresh().await.unwrap();
        let age = snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .find(|(k, ..)| k.key().name() == metric::KEY_AGE_SECONDS)
            .map(|(.., v)| v);
        match age {
            Some(metrics_util::debugging::DebugValue::Gauge(v)) => {
                assert!(v.into_inner() >= (100 * day).as_secs_f64());
            }
            other => panic!("no key age gauge: {other:?}"),
        }
        let logs = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert_eq!(
            logs.matches("older than the rotation period").count(),
            1,
            "warned once per key: {logs}"
        );
        assert!(logs.contains("age_days=100"), "{logs}");

        // A young key: no warning.
        src.set(Secret::new("k-young").with_created_at(SystemTime::now() - 10 * day));
        ring.refresh().await.unwrap();
        let logs = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert_eq!(logs.matches("older than the rotation period").count(), 1);
        assert!(logs.contains("API key rotated"));
    }

    #[tokio::test(start_paused = true)]
    async fn hanging_source_times_out() {
        let src = StaticSource::new("k1");
        src.set_delay(Duration::from_secs(3600));
        let ring = KeyRing::new(
            src,
            KeyRingConfig {
                fetch_timeout: Duration::from_secs(2),
                ..cfg()
            },
        );
        let e = ring.current().await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::SecretUnavailable);
        assert!(e.message().contains("no answer within 2s"), "{e}");
    }

    #[tokio::test(start_paused = true)]
    async fn manual_refresh_reports_errors_and_keeps_key() {
        let src = StaticSource::new("k1");
        let ring = KeyRing::new(src.clone(), cfg());
        ring.current().await.unwrap();
        src.set_unavailable(true);
        assert!(ring.refresh().await.is_err());
        assert_eq!(ring.current().await.unwrap().secret().expose_secret(), "k1");
        assert!(ring.status().stale);
    }
}
