//! Shared test helpers: a Vault KV v2 server, log capture, requests to claude-mock.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, missing_docs)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use tokio::net::TcpListener;

// ===== Vault =====

/// One version of a KV v2 secret.
struct Version {
    data: serde_json::Value,
    created: SystemTime,
    deleted: bool,
}

struct VaultState {
    token: String,
    namespace: Option<String>,
    secrets: HashMap<String, Vec<Version>>,
    reads: u64,
    sealed: bool,
    seen_namespaces: Vec<Option<String>>,
}

/// A server speaking the part of the Vault HTTP API the source uses: "read secret version"
/// of the KV v2 engine (`GET /v1/{mount}/data/{path}`), per the public API docs:
/// `X-Vault-Token` required (403 `{"errors":["permission denied"]}` otherwise),
/// `X-Vault-Namespace` checked when the server has a namespace, 404 `{"errors":[]}` for an
/// unknown path, 404 with the metadata for a deleted latest version, 503 when sealed, and
/// the documented answer shape
/// `{"data":{"data":{..},"metadata":{"created_time","custom_metadata","deletion_time","destroyed","version"}}}`.
pub struct VaultServer {
    addr: SocketAddr,
    tls: bool,
    state: Arc<Mutex<VaultState>>,
    task: tokio::task::JoinHandle<()>,
}

/// Fractional seconds Vault puts in its timestamps; the source must parse them.
pub const VAULT_NANOS: u32 = 945_319_214;

impl VaultServer {
    pub async fn start(token: &str) -> Self {
        Self::start_with(token, None, None).await
    }

    /// With `namespace`, requests must send `X-Vault-Namespace: namespace`. With `tls`
    /// (cert chain PEM, key PEM), the server speaks https.
    pub async fn start_with(
        token: &str,
        namespace: Option<&str>,
        tls: Option<(&[u8], &[u8])>,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(VaultState {
            token: token.to_owned(),
            namespace: namespace.map(str::to_owned),
            secrets: HashMap::new(),
            reads: 0,
            sealed: false,
            seen_namespaces: Vec::new(),
        }));
        let acceptor = tls.map(|(cert, key)| {
            use rustls::pki_types::pem::PemObject;
            use rustls::pki_types::{CertificateDer, PrivateKeyDer};
            let certs: Vec<_> = CertificateDer::pem_slice_iter(cert)
                .collect::<Result<_, _>>()
                .unwrap();
            let key = PrivateKeyDer::from_pem_slice(key).unwrap();
            let config = rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
            tokio_rustls::TlsAcceptor::from(Arc::new(config))
        });
        let tls = acceptor.is_some();
        let st = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let st = st.clone();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let st = st.clone();
                        async move { Ok::<_, Infallible>(vault_answer(&st, &req)) }
                    });
                    let http = hyper::server::conn::http1::Builder::new();
                    match acceptor {
                        Some(acceptor) => {
                            if let Ok(tls) = acceptor.accept(tcp).await {
                                let _ = http.serve_connection(TokioIo::new(tls), svc).await;
                            }
                        }
                        None => {
                            let _ = http.serve_connection(TokioIo::new(tcp), svc).await;
                        }
                    }
                });
            }
        });
        Self {
            addr,
            tls,
            state,
            task,
        }
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Writes a new version of `mount/path` (like `vault kv put`); returns its number.
    pub fn put(&self, mount: &str, path: &str, data: serde_json::Value) -> u64 {
        self.put_created(mount, path, data, SystemTime::now())
    }

    /// As [`put`](Self::put) with a chosen creation time (whole seconds are kept).
    pub fn put_created(
        &self,
        mount: &str,
        path: &str,
        data: serde_json::Value,
        created: SystemTime,
    ) -> u64 {
        let secs = created
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let created = SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
        let mut st = self.state.lock().unwrap();
        let versions = st.secrets.entry(format!("{mount}/{path}")).or_default();
        versions.push(Version {
            data,
            created,
            deleted: false,
        });
        versions.len() as u64
    }

    /// Soft-deletes the latest version (like `vault kv delete`).
    pub fn delete_latest(&self, mount: &str, path: &str) {
        let mut st = self.state.lock().unwrap();
        if let Some(v) = st
            .secrets
            .get_mut(&format!("{mount}/{path}"))
            .and_then(|v| v.last_mut())
        {
            v.deleted = true;
        }
    }

    pub fn set_sealed(&self, sealed: bool) {
        self.state.lock().unwrap().sealed = sealed;
    }

    pub fn set_token(&self, token: &str) {
        token.clone_into(&mut self.state.lock().unwrap().token);
    }

    /// Successful and failed reads of secret data so far.
    pub fn reads(&self) -> u64 {
        self.state.lock().unwrap().reads
    }

    pub fn seen_namespaces(&self) -> Vec<Option<String>> {
        self.state.lock().unwrap().seen_namespaces.clone()
    }

    /// Stops accepting connections: later fetches get "connection refused".
    pub async fn shutdown(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

fn vault_json(status: StatusCode, body: &serde_json::Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

fn vault_answer(st: &Arc<Mutex<VaultState>>, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let mut st = st.lock().unwrap();
    if st.sealed {
        return vault_json(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"errors":["Vault is sealed"]}),
        );
    }
    let ns = req
        .headers()
        .get("x-vault-namespace")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    st.seen_namespaces.push(ns.clone());
    let token_ok = req
        .headers()
        .get("x-vault-token")
        .is_some_and(|t| t.as_bytes() == st.token.as_bytes());
    let ns_ok = st.namespace.is_none() || st.namespace == ns;
    if req.method() != http::Method::GET {
        return vault_json(StatusCode::METHOD_NOT_ALLOWED, &json!({"errors":[]}));
    }
    if !token_ok || !ns_ok {
        return vault_json(
            StatusCode::FORBIDDEN,
            &json!({"errors":["permission denied"]}),
        );
    }
    let path = req.uri().path();
    let Some((mount, secret)) = path
        .strip_prefix("/v1/")
        .and_then(|p| p.split_once("/data/"))
    else {
        return vault_json(StatusCode::NOT_FOUND, &json!({"errors":[]}));
    };
    st.reads += 1;
    let key = format!("{mount}/{secret}");
    let Some(versions) = st.secrets.get(&key) else {
        return vault_json(StatusCode::NOT_FOUND, &json!({"errors":[]}));
    };
    let n = versions.len();
    let Some(latest) = versions.last() else {
        return vault_json(StatusCode::NOT_FOUND, &json!({"errors":[]}));
    };
    let created = claude_core::headers::format_rfc3339(latest.created);
    let created = format!("{}.{VAULT_NANOS}Z", created.trim_end_matches('Z'));
    let metadata = json!({
        "created_time": created,
        "custom_metadata": null,
        "deletion_time": if latest.deleted { created.clone() } else { String::new() },
        "destroyed": false,
        "version": n,
    });
    if latest.deleted {
        return vault_json(
            StatusCode::NOT_FOUND,
            &json!({"request_id":"r","lease_id":"","renewable":false,"lease_duration":0,
                    "data":{"data":null,"metadata":metadata},"wrap_info":null,"warnings":null,"auth":null}),
        );
    }
    vault_json(
        StatusCode::OK,
        &json!({"request_id":"0f1b3b07-1b8e-4a5e-8d4e-1b0d3f0d6b2a","lease_id":"","renewable":false,
                "lease_duration":0,"data":{"data":latest.data,"metadata":metadata},
                "wrap_info":null,"warnings":null,"auth":null}),
    )
}

// ===== logs =====

/// Everything written by a TRACE-level fmt subscriber installed for the current thread.
#[derive(Clone, Default)]
pub struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl LogBuffer {
    pub fn contents(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogBuffer {
    type Writer = LogBuffer;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// Installs a TRACE subscriber for this thread (use a current-thread runtime) writing into
/// the returned buffer, every span and event of every crate included.
pub fn capture_logs() -> (tracing::subscriber::DefaultGuard, LogBuffer) {
    let buf = LogBuffer::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_span_events(tracing_subscriber::fmt::format::FmtSpan::FULL)
        .with_writer(buf.clone())
        .finish();
    (tracing::subscriber::set_default(subscriber), buf)
}

// ===== claude-mock requests =====

pub type HttpClient = claude_core::FullBodyService<
    Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
>;

pub fn http_client() -> HttpClient {
    claude_core::FullBodyService::new(
        Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>(),
    )
}

/// A valid Messages request to the mock at `base`.
pub fn messages(base: &str) -> Request<Bytes> {
    messages_with(base, &[])
}

pub fn messages_with(base: &str, headers: &[(&str, &str)]) -> Request<Bytes> {
    let mut b = Request::post(format!("{base}/v1/messages"))
        .header("anthropic-version", "2023-06-01")
        .header("content-type", "application/json");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Bytes::from_static(
        br#"{"model":"claude-sonnet-4-5","max_tokens":16,"messages":[{"role":"user","content":"hi"}]}"#,
    ))
    .unwrap()
}

/// Reads a response body to the end.
pub async fn body_text(resp: Response<Incoming>) -> String {
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// A status count from the mock's stats.
pub fn status_count(mock: &claude_mock::MockServer, status: &str) -> u64 {
    mock.stats().by_status.get(status).copied().unwrap_or(0)
}

/// Polls `cond` every 10 ms, at most `limit` (a bound on a wait, not a timing assertion).
pub async fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = tokio::time::Instant::now();
    while start.elapsed() < limit {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cond()
}

/// A unique scratch directory under the target directory.
pub fn scratch_dir(tag: &str) -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "claude-secrets-{tag}-{}-{}",
        std::process::id(),
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs the test `name` of this test binary again in a child process with `envs` set and
/// `CLAUDE_SECRETS_CHILD=1`, and asserts it passed. Setting variables in-process needs
/// `unsafe` (edition 2024); a child process gets them the way a real deployment does.
pub fn run_child(name: &str, envs: &[(&str, &str)]) {
    run_child_clean(name, envs, &[]);
}

/// As [`run_child`], with the variables of `remove` taken out of the child's environment.
pub fn run_child_clean(name: &str, envs: &[(&str, &str)], remove: &[&str]) {
    let exe = std::env::current_exe().unwrap();
    let mut cmd = std::process::Command::new(exe);
    cmd.args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env("CLAUDE_SECRETS_CHILD", "1");
    for var in remove {
        cmd.env_remove(var);
    }
    let out = cmd.envs(envs.iter().copied()).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "child {name} failed\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
    assert!(
        stdout.contains("1 passed"),
        "child {name} ran no test\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
}

/// Whether this process is the child of [`run_child`].
pub fn is_child() -> bool {
    std::env::var_os("CLAUDE_SECRETS_CHILD").is_some()
}

// ===== metrics =====

/// One snapshot of a `DebuggingRecorder`. Taking a snapshot resets its counters and gauges
/// to 0 (metrics-util 0.20), so a test takes one snapshot per checkpoint and reads every
/// value it needs from it.
pub struct MetricsSnapshot(
    Vec<(
        metrics_util::CompositeKey,
        Option<metrics::Unit>,
        Option<metrics::SharedString>,
        metrics_util::debugging::DebugValue,
    )>,
);

pub fn snapshot(snapshotter: &metrics_util::debugging::Snapshotter) -> MetricsSnapshot {
    MetricsSnapshot(snapshotter.snapshot().into_vec())
}

impl MetricsSnapshot {
    /// The value of the metric `name` whose labels include all of `labels`.
    pub fn value(
        &self,
        name: &str,
        labels: &[(&str, &str)],
    ) -> Option<&metrics_util::debugging::DebugValue> {
        self.0
            .iter()
            .find(|(k, _, _, _)| {
                let key = k.key();
                key.name() == name
                    && labels
                        .iter()
                        .all(|(lk, lv)| key.labels().any(|l| l.key() == *lk && l.value() == *lv))
            })
            .map(|(_, _, _, v)| v)
    }

    /// A counter's increments since the last snapshot, 0 when absent.
    pub fn counter(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        match self.value(name, labels) {
            Some(metrics_util::debugging::DebugValue::Counter(n)) => *n,
            _ => 0,
        }
    }

    /// A gauge's value, if it was set since the last snapshot.
    pub fn gauge(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        match self.value(name, labels) {
            Some(metrics_util::debugging::DebugValue::Gauge(v)) => Some(v.into_inner()),
            _ => None,
        }
    }

    /// Every key, label and value, rendered with `Debug` (for leak checks).
    pub fn render(&self) -> String {
        format!("{:?}", self.0)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}
