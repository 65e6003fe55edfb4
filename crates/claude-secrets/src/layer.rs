//! [`ApiKeyLayer`] and [`ApiKey`]: inject the tenant's key, refresh and replay once on 401.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::SystemTime;

use bytes::Bytes;
use claude_core::headers::X_API_KEY;
use claude_core::{BoxError, Error, ErrorKind, Tenant, classify_response};
use http::{Request, Response, header::AUTHORIZATION};
use tower::ServiceExt;
use tower_layer::Layer;
use tower_service::Service;

use crate::future::ResponseFuture;
use crate::ring::{KeyRing, metric};

/// Applies [`ApiKey`] to a service: sets `x-api-key` from the [`KeyRing`] of the request's
/// [`Tenant`], and after an upstream 401 refreshes the ring and replays the request once if
/// the key changed.
///
/// # What a request goes through
///
/// 1. The ring is chosen by the request's [`Tenant`] extension (missing means the default
///    tenant): the ring registered for that tenant with [`tenant`](Self::tenant), else the
///    default ring. With neither, the call fails with [`ErrorKind::SecretUnavailable`]
///    (a tenant without a key is a configuration error; it never falls through to another
///    tenant's key).
/// 2. [`KeyRing::current`] gives the key; when it fails the call fails with its
///    [`ErrorKind::SecretUnavailable`] error (503 via `Error::into_response`).
/// 3. Any `x-api-key` and `authorization` the caller sent are removed (so a client can never
///    choose or smuggle the upstream credential), and `x-api-key` is set to the key as a
///    sensitive header value.
/// 4. If the upstream answers 401 (classified by [`claude_core::classify_response`] as
///    [`ErrorKind::Authentication`], code `AUTH_ERROR`), the layer calls
///    [`KeyRing::refresh_after_auth_failure`]. If that yields a different key, the request
///    is sent once more with it (the 401's body is dropped unread). Otherwise the 401 is
///    returned as it is. A replayed request that gets a 401 again is returned as it is:
///    there is never a second replay.
///
/// # Decisions
///
/// - The secret fetch waits in the response future, never in `poll_ready`: readiness is the
///   inner service's, and a failing source can never poison a `Buffer` above.
/// - The request is cloned before it is sent when replay is enabled (`Request<Bytes>`: the
///   body is a reference count; headers and extensions are copied). Disable replay with
///   [`replay_on_auth_failure`](Self::replay_on_auth_failure) to skip the copy (the 401
///   still refreshes the ring).
/// - In the stack the layer sits inside retry and rate limit, so a replay is one attempt's
///   business; it is not a retry and is not counted as one.
///
/// ```
/// use claude_secrets::{ApiKeyLayer, KeyRing, KeyRingConfig, StaticSource};
/// use tower::{Service, ServiceBuilder, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tower::BoxError> {
/// let ring = KeyRing::new(StaticSource::new("sk-ant-team"), KeyRingConfig::default());
/// let mut svc = ServiceBuilder::new()
///     .layer(ApiKeyLayer::new(ring))
///     .service_fn(|req: http::Request<bytes::Bytes>| async move {
///         // The upstream sees our key, whatever the caller sent.
///         assert_eq!(req.headers()["x-api-key"], "sk-ant-team");
///         assert!(req.headers().get("authorization").is_none());
///         Ok::<_, tower::BoxError>(http::Response::new(()))
///     });
/// let req = http::Request::post("/v1/messages")
///     .header("x-api-key", "caller-supplied")
///     .header("authorization", "Bearer caller-supplied")
///     .body(bytes::Bytes::new())?;
/// svc.ready().await?.call(req).await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct ApiKeyLayer {
    keys: Arc<Keys>,
}

#[derive(Clone)]
pub(crate) struct Keys {
    default: Option<KeyRing>,
    tenants: HashMap<String, KeyRing>,
    environment: Option<Arc<str>>,
    replay: bool,
}

impl Keys {
    fn ring_for(&self, tenant: &Tenant) -> Option<&KeyRing> {
        self.tenants.get(tenant.as_str()).or(self.default.as_ref())
    }
}

impl ApiKeyLayer {
    /// A layer whose every tenant uses `default`.
    pub fn new(default: KeyRing) -> Self {
        Self::with_default(Some(default))
    }

    /// A layer with no default key: only tenants registered with [`tenant`](Self::tenant)
    /// get a key; other requests fail with [`ErrorKind::SecretUnavailable`].
    pub fn tenants_only() -> Self {
        Self::with_default(None)
    }

    fn with_default(default: Option<KeyRing>) -> Self {
        Self {
            keys: Arc::new(Keys {
                default,
                tenants: HashMap::new(),
                environment: None,
                replay: true,
            }),
        }
    }

    /// Uses `ring` for requests of `tenant`.
    #[must_use]
    pub fn tenant(mut self, tenant: impl Into<Tenant>, ring: KeyRing) -> Self {
        let tenant: Tenant = tenant.into();
        Arc::make_mut(&mut self.keys)
            .tenants
            .insert(tenant.as_str().to_owned(), ring);
        self
    }

    /// Whether a request rejected with a 401 is replayed once when the refresh after it
    /// found a new key. Default true. When off, the 401 goes back to the caller, but the
    /// ring is still refreshed, so the next requests use the new key; and the request is
    /// not copied before it is sent.
    #[must_use]
    pub fn replay_on_auth_failure(mut self, enabled: bool) -> Self {
        Arc::make_mut(&mut self.keys).replay = enabled;
        self
    }

    /// Records the environment the keys belong to (`prod`, `dev`), for logs and `Debug`.
    /// [`SecretsConfig`](crate::SecretsConfig) sets it.
    #[must_use]
    pub fn environment(mut self, environment: impl Into<Arc<str>>) -> Self {
        Arc::make_mut(&mut self.keys).environment = Some(environment.into());
        self
    }

    /// The ring used for `tenant`, if any.
    pub fn ring_for(&self, tenant: &Tenant) -> Option<&KeyRing> {
        self.keys.ring_for(tenant)
    }

    /// The default ring, if any.
    pub fn default_ring(&self) -> Option<&KeyRing> {
        self.keys.default.as_ref()
    }

    /// The tenants with their own ring.
    pub fn tenants(&self) -> impl Iterator<Item = (&str, &KeyRing)> {
        self.keys.tenants.iter().map(|(t, r)| (t.as_str(), r))
    }

    /// The environment the keys belong to, if recorded.
    pub fn environment_name(&self) -> Option<&str> {
        self.keys.environment.as_deref()
    }
}

impl fmt::Debug for ApiKeyLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.keys.fmt(f)
    }
}

impl fmt::Debug for Keys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKeyLayer")
            .field("environment", &self.environment)
            .field("default", &self.default)
            .field("tenants", &self.tenants)
            .field("replay", &self.replay)
            .finish()
    }
}

impl<S> Layer<S> for ApiKeyLayer {
    type Service = ApiKey<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ApiKey {
            inner,
            keys: self.keys.clone(),
        }
    }
}

/// Sets `x-api-key` from a [`KeyRing`] and replays once after a 401 with a rotated key.
/// See [`ApiKeyLayer`].
#[derive(Clone)]
pub struct ApiKey<S> {
    inner: S,
    keys: Arc<Keys>,
}

impl<S> ApiKey<S> {
    /// Wraps `inner`, using `ring` for every tenant.
    pub fn new(inner: S, ring: KeyRing) -> Self {
        ApiKeyLayer::new(ring).layer(inner)
    }

    /// A layer using `ring` for every tenant (shortcut for [`ApiKeyLayer::new`]).
    pub fn layer(ring: KeyRing) -> ApiKeyLayer {
        ApiKeyLayer::new(ring)
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: fmt::Debug> fmt::Debug for ApiKey<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKey")
            .field("inner", &self.inner)
            .field("keys", &self.keys)
            .finish()
    }
}

impl<S, B> Service<Request<Bytes>> for ApiKey<S>
where
    S: Service<Request<Bytes>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Send + 'static,
{
    type Response = Response<B>;
    type Error = BoxError;
    type Future = ResponseFuture<Response<B>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<Bytes>) -> Self::Future {
        // The service that was polled ready goes into the future; a fresh clone stays.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        ResponseFuture::new(Box::pin(send(inner, self.keys.clone(), req)))
    }
}

async fn send<S, B>(
    mut inner: S,
    keys: Arc<Keys>,
    mut req: Request<Bytes>,
) -> Result<Response<B>, BoxError>
where
    S: Service<Request<Bytes>, Response = Response<B>>,
    S::Error: Into<BoxError>,
{
    let tenant = Tenant::of(&req);
    let Some(ring) = keys.ring_for(&tenant) else {
        return Err(Error::new(
            ErrorKind::SecretUnavailable,
            format!("no API key is configured for tenant `{tenant}`"),
        )
        .into());
    };
    let key = ring.current().await?;
    let headers = req.headers_mut();
    headers.remove(AUTHORIZATION);
    headers.insert(X_API_KEY, key.header_value());
    let replay = keys.replay.then(|| clone_request(&req));
    tracing::trace!(
        tenant = %tenant,
        source = ring.name(),
        fingerprint = %key.fingerprint(),
        "x-api-key set"
    );

    let resp = inner.call(req).await.map_err(Into::into)?;
    let rejected = classify_response(resp.status(), resp.headers(), None, SystemTime::now())
        .is_some_and(|c| c.kind == ErrorKind::Authentication);
    if !rejected {
        return Ok(resp);
    }
    let source = ring.name().to_owned();
    // Refresh even when replay is off, so that the next requests get the new key.
    // Boxed: rare, and its future (a fetch) would otherwise make every request's larger.
    let fresh = Box::pin(ring.refresh_after_auth_failure(&key)).await;
    let (Some(fresh), Some(mut replay)) = (fresh, replay) else {
        metrics::counter!(metric::AUTH_REJECTIONS_TOTAL, "source" => source, "outcome" => "returned")
            .increment(1);
        tracing::warn!(
            tenant = %tenant,
            source = ring.name(),
            fingerprint = %key.fingerprint(),
            replay = keys.replay,
            "upstream rejected the key (401); returning the 401"
        );
        return Ok(resp);
    };
    metrics::counter!(metric::AUTH_REJECTIONS_TOTAL, "source" => source, "outcome" => "replayed")
        .increment(1);
    tracing::info!(
        tenant = %tenant,
        source = ring.name(),
        rejected = %key.fingerprint(),
        fingerprint = %fresh.fingerprint(),
        "upstream rejected the key (401); replaying once with the rotated key"
    );
    drop(resp);
    replay.headers_mut().insert(X_API_KEY, fresh.header_value());
    let svc = inner.ready().await.map_err(Into::into)?;
    svc.call(replay).await.map_err(Into::into)
}

/// A copy of a buffered request (`http::Request` is not `Clone`; its parts are).
fn clone_request(req: &Request<Bytes>) -> Request<Bytes> {
    let mut copy = Request::new(req.body().clone());
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    *copy.extensions_mut() = req.extensions().clone();
    copy
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{KeyRingConfig, Secret, StaticSource};
    use std::convert::Infallible;
    use std::sync::Mutex;
    use std::time::Duration;
    use tower::ServiceBuilder;

    type Seen = Arc<Mutex<Vec<(String, Option<String>, bool)>>>;

    /// An upstream that accepts only `accepted` and records the keys it saw.
    fn upstream(
        accepted: Arc<Mutex<String>>,
        seen: Seen,
    ) -> impl Service<
        Request<Bytes>,
        Response = Response<&'static str>,
        Error = Infallible,
        Future = impl Send,
    > + Clone {
        tower::service_fn(move |req: Request<Bytes>| {
            let accepted = accepted.clone();
            let seen = seen.clone();
            async move {
                let key = req
                    .headers()
                    .get(X_API_KEY)
                    .map(|v| (v.to_str().unwrap().to_owned(), v.is_sensitive()));
                let auth = req
                    .headers()
                    .get(AUTHORIZATION)
                    .map(|v| v.to_str().unwrap().to_owned());
                let (key, sensitive) = key.unwrap_or_default();
                seen.lock().unwrap().push((key.clone(), auth, sensitive));
                let status = if key == *accepted.lock().unwrap() {
                    200
                } else {
                    401
                };
                Ok(Response::builder()
                    .status(status)
                    .body(if status == 200 { "ok" } else { "unauthorized" })
                    .unwrap())
            }
        })
    }

    fn request(tenant: Option<&str>) -> Request<Bytes> {
        let mut b = Request::post("http://upstream/v1/messages")
            .header("x-api-key", "caller")
            .header("x-api-key", "caller-2")
            .header("authorization", "Bearer caller");
        if let Some(t) = tenant {
            b = b.extension(Tenant::new(t));
        }
        b.body(Bytes::from_static(b"{}")).unwrap()
    }

    #[tokio::test]
    async fn strips_caller_credentials_and_sets_sensitive_key() {
        let accepted = Arc::new(Mutex::new("k1".to_owned()));
        let seen = Seen::default();
        let ring = KeyRing::new(StaticSource::new("k1"), KeyRingConfig::default());
        let mut svc = ServiceBuilder::new()
            .layer(ApiKeyLayer::new(ring))
            .service(upstream(accepted, seen.clone()));
        let resp = svc
            .ready()
            .await
            .unwrap()
            .call(request(None))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(*seen.lock().unwrap(), vec![("k1".to_owned(), None, true)]);
    }

    #[tokio::test]
    async fn tenants_get_their_own_keys_and_unknown_tenants_fail() {
        let accepted = Arc::new(Mutex::new("none".to_owned()));
        let seen = Seen::default();
        let ring = |k: &str| KeyRing::new(StaticSource::new(k), KeyRingConfig::default());
        let layer = ApiKeyLayer::tenants_only()
            .tenant("team-a", ring("ka"))
            .tenant("team-b", ring("kb"))
            .replay_on_auth_failure(false);
        let mut svc = ServiceBuilder::new()
            .layer(layer.clone())
            .service(upstream(accepted, seen.clone()));
        for t in ["team-a", "team-b"] {
            svc.ready()
                .await
                .unwrap()
                .call(request(Some(t)))
                .await
                .unwrap();
        }
        let keys: Vec<_> = seen.lock().unwrap().iter().map(|s| s.0.clone()).collect();
        assert_eq!(keys, ["ka", "kb"]);
        let err = svc
            .ready()
            .await
            .unwrap()
            .call(request(Some("team-c")))
            .await
            .unwrap_err();
        let err = Error::from_box(err);
        assert_eq!(err.kind(), ErrorKind::SecretUnavailable);
        assert!(err.message().contains("team-c"));
        // Default tenant without a default ring.
        assert!(
            svc.ready()
                .await
                .unwrap()
                .call(request(None))
                .await
                .is_err()
        );
        // With a default, unknown tenants use it.
        let layer = layer.clone();
        let with_default = ApiKeyLayer::new(ring("kd")).tenant(
            "team-a",
            layer.ring_for(&Tenant::new("team-a")).unwrap().clone(),
        );
        let seen2 = Seen::default();
        let mut svc = ServiceBuilder::new()
            .layer(with_default)
            .service(upstream(Arc::new(Mutex::new("x".into())), seen2.clone()));
        svc.ready()
            .await
            .unwrap()
            .call(request(Some("team-z")))
            .await
            .unwrap();
        svc.ready()
            .await
            .unwrap()
            .call(request(Some("team-a")))
            .await
            .unwrap();
        let keys: Vec<_> = seen2.lock().unwrap().iter().map(|s| s.0.clone()).collect();
        assert_eq!(keys, ["kd", "ka"]);
    }

    #[tokio::test]
    async fn replays_once_when_the_key_rotated() {
        let accepted = Arc::new(Mutex::new("k2".to_owned()));
        let seen = Seen::default();
        let src = StaticSource::new("k1");
        let ring = KeyRing::new(src.clone(), KeyRingConfig::default());
        ring.current().await.unwrap(); // k1 cached
        src.set(Secret::new("k2"));
        let mut svc = ServiceBuilder::new()
            .layer(ApiKeyLayer::new(ring))
            .service(upstream(accepted, seen.clone()));
        let resp = svc
            .ready()
            .await
            .unwrap()
            .call(request(None))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let keys: Vec<_> = seen.lock().unwrap().iter().map(|s| s.0.clone()).collect();
        assert_eq!(keys, ["k1", "k2"]);
        assert!(seen.lock().unwrap().iter().all(|s| s.1.is_none() && s.2));
    }

    #[tokio::test(start_paused = true)]
    async fn returns_the_401_when_the_key_did_not_change_or_fails_again() {
        let accepted = Arc::new(Mutex::new("other".to_owned()));
        let seen = Seen::default();
        let src = StaticSource::new("k1");
        let ring = KeyRing::new(src.clone(), KeyRingConfig::default());
        let mut svc = ServiceBuilder::new()
            .layer(ApiKeyLayer::new(ring.clone()))
            .service(upstream(accepted.clone(), seen.clone()));
        let resp = svc
            .ready()
            .await
            .unwrap()
            .call(request(None))
            .await
            .unwrap();
        assert_eq!(resp.status(), 401);
        let c = classify_response(resp.status(), resp.headers(), None, SystemTime::now()).unwrap();
        assert_eq!(c.kind.code(), "AUTH_ERROR");
        assert_eq!(seen.lock().unwrap().len(), 1, "no replay with the same key");

        // Rotated, but the new key is rejected too: one replay, then the 401. (Within
        // `min_refresh_interval` of the unchanged answer above, a 401 for k1 would not ask
        // the source again.)
        seen.lock().unwrap().clear();
        src.set(Secret::new("k2"));
        tokio::time::sleep(Duration::from_secs(6)).await;
        let resp = svc
            .ready()
            .await
            .unwrap()
            .call(request(None))
            .await
            .unwrap();
        assert_eq!(resp.status(), 401);
        let keys: Vec<_> = seen.lock().unwrap().iter().map(|s| s.0.clone()).collect();
        assert_eq!(keys, ["k1", "k2"]);
    }

    #[tokio::test]
    async fn without_replay_the_401_returns_but_the_ring_refreshes() {
        let accepted = Arc::new(Mutex::new("k2".to_owned()));
        let seen = Seen::default();
        let src = StaticSource::new("k1");
        let ring = KeyRing::new(src.clone(), KeyRingConfig::default());
        ring.current().await.unwrap();
        src.set(Secret::new("k2"));
        let mut svc = ServiceBuilder::new()
            .layer(ApiKeyLayer::new(ring).replay_on_auth_failure(false))
            .service(upstream(accepted, seen.clone()));
        let resp = svc
            .ready()
            .await
            .unwrap()
            .call(request(None))
            .await
            .unwrap();
        assert_eq!(resp.status(), 401);
        let resp = svc
            .ready()
            .await
            .unwrap()
            .call(request(None))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let keys: Vec<_> = seen.lock().unwrap().iter().map(|s| s.0.clone()).collect();
        assert_eq!(keys, ["k1", "k2"]);
    }

    #[tokio::test]
    async fn secret_failure_is_a_classified_error_not_a_readiness_failure() {
        let src = StaticSource::new("k1");
        src.set_unavailable(true);
        let ring = KeyRing::new(src, KeyRingConfig::default());
        let mut svc = ServiceBuilder::new()
            .layer(ApiKeyLayer::new(ring))
            .service(upstream(Arc::new(Mutex::new("k1".into())), Seen::default()));
        // poll_ready is the inner service's: ready.
        let ready = svc.ready().await;
        assert!(ready.is_ok());
        let err = svc.call(request(None)).await.unwrap_err();
        let err = Error::from_box(err);
        assert_eq!(err.kind(), ErrorKind::SecretUnavailable);
        assert_eq!(err.code(), "SECRET_UNAVAILABLE");
        assert_eq!(err.into_response().status(), 503);
    }

    #[tokio::test]
    async fn readiness_is_the_inner_services() {
        let flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let ring = KeyRing::new(StaticSource::new("k1"), KeyRingConfig::default());
        let mut svc = ApiKeyLayer::new(ring).layer(Gate(flag.clone()));
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(svc.poll_ready(&mut cx).is_pending());
        flag.store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(matches!(svc.poll_ready(&mut cx), Poll::Ready(Ok(()))));
        let resp = svc.call(request(None)).await.unwrap();
        assert_eq!(resp.status(), 200);
    }

    /// A service whose readiness a flag controls.
    #[derive(Clone)]
    struct Gate(Arc<std::sync::atomic::AtomicBool>);

    impl Service<Request<Bytes>> for Gate {
        type Response = Response<()>;
        type Error = Infallible;
        type Future = std::future::Ready<Result<Response<()>, Infallible>>;

        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            if self.0.load(std::sync::atomic::Ordering::SeqCst) {
                Poll::Ready(Ok(()))
            } else {
                Poll::Pending
            }
        }

        fn call(&mut self, req: Request<Bytes>) -> Self::Future {
            assert_eq!(req.headers()[X_API_KEY], "k1");
            std::future::ready(Ok(Response::new(())))
        }
    }
}
