//! No key in any log line, `Debug` or `Display` output, error, or metric label, with tracing
//! at TRACE for every crate, along a request path that loads, injects, rotates, replays,
//! refuses and fails.
#![allow(clippy::unwrap_used)]

mod common;

use std::fmt::Debug;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use claude_core::{BoxError, Error, Tenant};
use claude_secrets::{
    ApiKeyLayer, FileSource, Fingerprint, KeyRing, KeyRingConfig, SecretSource, StaticSource,
};
use http::{Request, Response};
use hyper::body::Incoming;
use metrics_util::debugging::DebuggingRecorder;
use tower::{Service, ServiceBuilder, ServiceExt};

/// Keys shaped like real ones (`sk-ant-api03-` + 86 + `-` + 8 characters), each with a
/// marker that appears nowhere else.
fn key(marker: &str) -> String {
    let body = format!("{marker}{}", "x".repeat(86 - marker.len()));
    format!("sk-ant-api03-{body}-AAAAAAAA")
}

/// An upstream wrapper that logs every request and response with `Debug` at TRACE, as a
/// careless tracing layer would, and records the `x-api-key` it saw (positive control).
#[derive(Clone, Debug)]
struct Spy {
    inner: common::HttpClient,
    sent: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl Service<Request<Bytes>> for Spy {
    type Response = Response<Incoming>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Incoming>, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<Bytes>) -> Self::Future {
        tracing::trace!(request = ?req, "spy: request going upstream");
        if let Some(v) = req.headers().get("x-api-key") {
            self.sent.lock().unwrap().push(v.as_bytes().to_vec());
        }
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            tracing::trace!(response = ?resp, "spy: response");
            Ok(resp)
        })
    }
}

fn debug_all<T: Debug + ?Sized>(out: &mut Vec<String>, v: &T) {
    out.push(format!("{v:?}"));
    out.push(format!("{v:#?}"));
}

fn error_all(out: &mut Vec<String>, e: &(dyn std::error::Error + 'static)) {
    out.push(format!("{e} {e:?} {e:#?}"));
    let mut cur = e.source();
    while let Some(c) = cur {
        out.push(format!("{c} {c:?}"));
        cur = c.source();
    }
}

// The default current-thread runtime: every task's logs and metrics land in the
// thread-local subscriber and recorder installed here.
#[tokio::test]
async fn no_key_in_logs_debug_output_errors_or_metric_labels() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _metrics = metrics::set_default_local_recorder(&recorder);
    let (_logs, logs) = common::capture_logs();
    tracing::info!("capture started");

    let file1 = key("LEAKFILEONE");
    let file2 = key("LEAKFILETWO");
    let stat = key("LEAKSTATIC");
    let caller = key("LEAKCALLER");
    #[cfg_attr(not(feature = "vault"), allow(unused_mut))]
    let mut keys = vec![file1.clone(), file2.clone(), stat.clone(), caller.clone()];
    let mut debug: Vec<String> = Vec::new();

    let mock = claude_mock::MockServer::builder()
        .api_key(file1.as_str())
        .api_key(stat.as_str())
        .start()
        .await
        .unwrap();

    let dir = common::scratch_dir("leak");
    let key_file = dir.join("api-key");
    std::fs::write(&key_file, format!("{file1}\n")).unwrap();
    let file_ring = KeyRing::new(FileSource::new(&key_file), KeyRingConfig::default());
    let static_source = StaticSource::named("static:team-s", stat.as_str());
    let static_ring = KeyRing::new(static_source.clone(), KeyRingConfig::default());
    let missing_ring = KeyRing::new(
        FileSource::new(dir.join("missing")),
        KeyRingConfig::default(),
    );
    #[cfg_attr(not(feature = "vault"), allow(unused_mut))]
    let mut layer = ApiKeyLayer::new(file_ring.clone())
        .tenant("team-s", static_ring.clone())
        .tenant("team-x", missing_ring.clone());

    #[cfg(feature = "vault")]
    let vault_part = {
        let vault1 = key("LEAKVAULTONE");
        let vault2 = key("LEAKVAULTTWO");
        keys.push(vault1.clone());
        keys.push(vault2.clone());
        mock.set_api_keys([file1.as_str(), stat.as_str(), vault1.as_str()]);
        let vault = common::VaultServer::start("hvs.leak-token").await;
        vault.put(
            "secret",
            "claude/leak",
            serde_json::json!({ "api_key": vault1, "other": vault2 }),
        );
        std::fs::write(dir.join("token"), "hvs.leak-token").unwrap();
        let source = claude_secrets::VaultSource::new(claude_secrets::config::VaultConfig {
            address: Some(vault.url()),
            path: "claude/leak".into(),
            token_file: Some(dir.join("token")),
            ..Default::default()
        })
        .unwrap();
        debug_all(&mut debug, &source);
        debug_all(&mut debug, &source.fetch().await.unwrap());
        let ring = KeyRing::new(source, KeyRingConfig::default());
        layer = layer.tenant("team-v", ring.clone());
        (vault, ring, vault1, vault2)
    };

    let sent = Arc::new(Mutex::new(Vec::new()));
    let spy = Spy {
        inner: common::http_client(),
        sent: sent.clone(),
    };
    let mut svc = ServiceBuilder::new().layer(layer.clone()).service(spy);
    let url = mock.url();
    let request = |tenant: &str| {
        let mut req = common::messages_with(
            &url,
            &[
                ("x-api-key", caller.as_str()),
                ("authorization", &format!("Bearer {caller}")),
            ],
        );
        req.extensions_mut().insert(Tenant::new(tenant));
        req
    };
    let mut call = async |req: Request<Bytes>| {
        let fut = svc.ready().await.unwrap().call(req);
        let out = format!("{fut:?}");
        (fut.await, out)
    };

    // 1. The default tenant's file key, the caller's own credentials stripped.
    let (resp, fut_debug) = call(request("default")).await;
    debug.push(fut_debug);
    let resp = resp.unwrap();
    debug_all(&mut debug, &resp);
    assert_eq!(resp.status(), 200);

    // 2. Another tenant, another source.
    let (resp, _) = call(request("team-s")).await;
    assert_eq!(resp.unwrap().status(), 200);

    // 3. The file rotates and the old key is revoked: 401, refresh, replay.
    std::fs::write(&key_file, format!("{file2}\n")).unwrap();
    #[cfg(feature = "vault")]
    mock.set_api_keys([file2.as_str(), stat.as_str(), vault_part.2.as_str()]);
    #[cfg(not(feature = "vault"))]
    mock.set_api_keys([file2.as_str(), stat.as_str()]);
    let (resp, _) = call(request("default")).await;
    let resp = resp.unwrap();
    assert_eq!(resp.status(), 200);

    // 4. Vault: served, then rotated to a key the upstream refuses: one replay, then 401.
    #[cfg(feature = "vault")]
    {
        let (vault, ring, _vault1, vault2) = &vault_part;
        let (resp, _) = call(request("team-v")).await;
        assert_eq!(resp.unwrap().status(), 200);
        vault.put(
            "secret",
            "claude/leak",
            serde_json::json!({ "api_key": vault2 }),
        );
        mock.set_api_keys([file2.as_str(), stat.as_str()]);
        let (resp, _) = call(request("team-v")).await;
        let resp = resp.unwrap();
        debug_all(&mut debug, &resp);
        assert_eq!(resp.status(), 401);
        debug_all(&mut debug, &ring.status());
    }

    // 5. A source outage: stale serving, with a warning naming the fingerprint.
    static_source.set_unavailable(true);
    let err = static_ring.refresh().await.unwrap_err();
    error_all(&mut debug, &err);
    debug_all(&mut debug, &static_ring.status());
    let (resp, _) = call(request("team-s")).await;
    assert_eq!(resp.unwrap().status(), 200, "the last good key is served");

    // 6. No key at all: a classified error.
    let (resp, _) = call(request("team-x")).await;
    let err = Error::from_box(resp.unwrap_err());
    error_all(&mut debug, &err);
    assert_eq!(err.code(), "SECRET_UNAVAILABLE");
    let (resp, _) = call(request("nobody-configured-this")).await;
    assert!(resp.is_ok(), "unknown tenants use the default ring");

    // 7. Vault goes away.
    #[cfg(feature = "vault")]
    {
        let (vault, ring, _, _) = vault_part;
        vault.shutdown().await;
        let err = ring.refresh().await.unwrap_err();
        error_all(&mut debug, &err);
        debug_all(&mut debug, &ring);
    }

    // Every public type holding or naming a key.
    for ring in [&file_ring, &static_ring, &missing_ring] {
        debug_all(&mut debug, ring);
        debug_all(&mut debug, &ring.status());
        if let Ok(k) = ring.current().await {
            debug_all(&mut debug, &*k);
            debug_all(&mut debug, k.secret());
            debug_all(&mut debug, &k.header_value());
            debug.push(k.fingerprint().to_string());
        }
    }
    debug_all(&mut debug, &layer);
    debug_all(&mut debug, &svc);
    debug_all(&mut debug, &static_source);
    debug_all(&mut debug, &FileSource::new(&key_file));
    let file_secret = FileSource::new(&key_file).fetch().await.unwrap();
    debug_all(&mut debug, &file_secret);
    debug.push(format!("{:?}", static_source.fetch().await));

    let metrics = common::snapshot(&snapshotter);
    let metrics_text = metrics.render();
    let logs = logs.contents();
    let debug = debug.join("\n");

    // Positive controls: the capture works, the keys really went through this path, and
    // they are named by fingerprint.
    assert!(logs.contains("capture started"));
    assert!(
        logs.contains("spy: request going upstream"),
        "TRACE logs were not captured"
    );
    assert!(
        logs.contains("Sensitive"),
        "the spy saw the x-api-key, marked sensitive"
    );
    assert!(logs.contains("x-api-key set"));
    let sent = sent.lock().unwrap().clone();
    for k in [&file1, &file2, &stat] {
        assert!(sent.iter().any(|s| s == k.as_bytes()), "key never sent");
        let fp = Fingerprint::of(k).to_string();
        assert!(logs.contains(&fp), "no log names {fp}");
    }
    assert!(!metrics.is_empty());
    assert!(metrics_text.contains("claude_secrets_refresh_total"));
    assert!(metrics_text.contains("static:team-s"));
    assert!(debug.contains(&Fingerprint::of(&file2).to_string()));

    for k in &keys {
        let marker = &k["sk-ant-api03-".len().."sk-ant-api03-".len() + 10];
        for (what, text) in [
            ("logs", &logs),
            ("Debug output", &debug),
            ("metrics", &metrics_text),
        ] {
            assert!(!text.contains(k.as_str()), "a key appears in the {what}");
            assert!(
                !text.contains(marker),
                "part of a key ({marker}) appears in the {what}"
            );
        }
    }
    mock.shutdown().await;
    std::fs::remove_dir_all(&dir).unwrap();
}
