//! Where keys come from: the [`SecretSource`] trait and its implementations.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::secret::{Secret, SecretError, SecretErrorKind};

#[cfg(feature = "aws")]
mod aws;
mod env;
mod file;
#[cfg(feature = "vault")]
mod vault;

#[cfg(feature = "aws")]
pub use aws::AwsSecretsManagerSource;
pub use env::EnvSource;
pub use file::FileSource;
#[cfg(feature = "vault")]
pub use vault::VaultSource;

/// The future a [`SecretSource`] returns.
pub type FetchFuture<'a> = Pin<Box<dyn Future<Output = Result<Secret, SecretError>> + Send + 'a>>;

/// Something that can produce the current value of a secret.
///
/// The trait is object safe (a [`KeyRing`](crate::KeyRing) holds an `Arc<dyn SecretSource>`),
/// hence the boxed future rather than an `async fn`: one allocation per fetch, and fetches
/// happen every few minutes, not per request.
///
/// Implementations fetch the latest value every time [`fetch`](Self::fetch) is called (they
/// may skip work when they can tell nothing changed, as [`FileSource`] does); caching,
/// refresh intervals, staleness and single-flight are the [`KeyRing`](crate::KeyRing)'s job.
///
/// ```
/// use claude_secrets::{FetchFuture, Secret, SecretError, SecretSource};
///
/// /// A source that reads the key from some in-house store.
/// struct MyStore;
///
/// impl SecretSource for MyStore {
///     fn name(&self) -> &str {
///         "my-store:claude"
///     }
///     fn fetch(&self) -> FetchFuture<'_> {
///         Box::pin(async move { Ok(Secret::new("sk-ant-from-my-store").with_version("1")) })
///     }
/// }
/// ```
pub trait SecretSource: Send + Sync + 'static {
    /// A short description of where the secret lives (`env:ANTHROPIC_API_KEY`,
    /// `file:/var/run/secrets/claude/api-key`, `vault:secret/claude#api_key`). It is the
    /// `source` label of the metrics and appears in logs and errors, so it must never contain
    /// the secret.
    fn name(&self) -> &str;

    /// Fetches the current value.
    ///
    /// # Cancel safety
    ///
    /// The future may be dropped at any await point (the key ring applies a timeout).
    fn fetch(&self) -> FetchFuture<'_>;
}

impl<T: SecretSource + ?Sized> SecretSource for Arc<T> {
    fn name(&self) -> &str {
        (**self).name()
    }

    fn fetch(&self) -> FetchFuture<'_> {
        (**self).fetch()
    }
}

impl<T: SecretSource + ?Sized> SecretSource for Box<T> {
    fn name(&self) -> &str {
        (**self).name()
    }

    fn fetch(&self) -> FetchFuture<'_> {
        (**self).fetch()
    }
}

/// A source holding a value in memory, for tests and for keys that arrive by other means.
///
/// It is a handle: clones share the value, so a test keeps one clone to rotate the key
/// ([`set`](Self::set)), simulate an outage ([`set_unavailable`](Self::set_unavailable)),
/// slow fetches down ([`set_delay`](Self::set_delay), on tokio's clock) and count fetches
/// ([`fetch_count`](Self::fetch_count)) while a [`KeyRing`](crate::KeyRing) uses another.
///
/// ```
/// use claude_secrets::{SecretSource, StaticSource};
/// use secrecy::ExposeSecret;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), claude_secrets::SecretError> {
/// let source = StaticSource::new("sk-ant-one");
/// assert_eq!(source.fetch().await?.expose_secret(), "sk-ant-one");
/// source.set("sk-ant-two");
/// assert_eq!(source.fetch().await?.expose_secret(), "sk-ant-two");
/// assert_eq!(source.fetch_count(), 2);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct StaticSource {
    name: Arc<str>,
    state: Arc<Mutex<StaticState>>,
}

struct StaticState {
    secret: Secret,
    unavailable: bool,
    delay: Duration,
    fetches: u64,
}

impl StaticSource {
    /// A source named `static` holding `secret`.
    pub fn new(secret: impl Into<Secret>) -> Self {
        Self::named("static", secret)
    }

    /// A source with a name of your choice (the metrics' `source` label).
    pub fn named(name: impl Into<Arc<str>>, secret: impl Into<Secret>) -> Self {
        Self {
            name: name.into(),
            state: Arc::new(Mutex::new(StaticState {
                secret: secret.into(),
                unavailable: false,
                delay: Duration::ZERO,
                fetches: 0,
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, StaticState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Replaces the value (a rotation).
    pub fn set(&self, secret: impl Into<Secret>) {
        self.lock().secret = secret.into();
    }

    /// Makes fetches fail with [`SecretErrorKind::Unavailable`] (an outage) or succeed again.
    pub fn set_unavailable(&self, unavailable: bool) {
        self.lock().unavailable = unavailable;
    }

    /// Makes every fetch wait this long first (tokio time, so paused clocks apply).
    pub fn set_delay(&self, delay: Duration) {
        self.lock().delay = delay;
    }

    /// How many fetches were started.
    pub fn fetch_count(&self) -> u64 {
        self.lock().fetches
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Secret::new(value)
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Secret::new(value)
    }
}

impl std::fmt::Debug for StaticSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.lock();
        f.debug_struct("StaticSource")
            .field("name", &self.name)
            .field("secret", &st.secret)
            .field("unavailable", &st.unavailable)
            .finish_non_exhaustive()
    }
}

impl SecretSource for StaticSource {
    fn name(&self) -> &str {
        &self.name
    }

    fn fetch(&self) -> FetchFuture<'_> {
        Box::pin(async move {
            let delay = {
                let mut st = self.lock();
                st.fetches += 1;
                st.delay
            };
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let st = self.lock();
            if st.unavailable {
                return Err(SecretError::new(
                    SecretErrorKind::Unavailable,
                    format!("{}: unavailable (simulated outage)", self.name),
                ));
            }
            Ok(st.secret.clone())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    #[tokio::test(start_paused = true)]
    async fn static_source_rotates_fails_and_counts() {
        let s = StaticSource::named("test", "k1");
        let handle = s.clone();
        assert_eq!(s.fetch().await.unwrap().expose_secret(), "k1");
        handle.set(Secret::new("k2").with_version("2"));
        let got = s.fetch().await.unwrap();
        assert_eq!((got.expose_secret(), got.version()), ("k2", Some("2")));
        handle.set_unavailable(true);
        let e = s.fetch().await.unwrap_err();
        assert_eq!(e.kind(), SecretErrorKind::Unavailable);
        assert_eq!(handle.fetch_count(), 3);
        assert!(!format!("{s:?}").contains("k2"));
        assert_eq!(s.name(), "test");
    }
}
