//! Fixtures shared by the criterion benches (`benches/`) and the allocation guards
//! (`tests/allocations.rs`): an in-process upstream that answers at once from shared frames,
//! so that what is measured or counted around it is the middleware's own work.
//!
//! Run the benches with `cargo bench -p claude-benches`.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use claude_secrets::{ApiKeyLayer, KeyRing, KeyRingConfig, StaticSource};
use claude_stack::StackConfig;
use http::{HeaderValue, Request, Response};
use http_body::{Body, Frame, SizeHint};
use tower::Service;

/// A response body that hands out shared frames one by one (no copy, no allocation per
/// frame).
#[derive(Debug)]
pub struct Frames {
    frames: Arc<[Bytes]>,
    next: usize,
}

impl Body for Frames {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let i = self.next;
        self.next += 1;
        Poll::Ready(self.frames.get(i).cloned().map(|b| Ok(Frame::data(b))))
    }

    fn is_end_stream(&self) -> bool {
        self.next >= self.frames.len()
    }

    fn size_hint(&self) -> SizeHint {
        let rest: usize = self
            .frames
            .get(self.next..)
            .map_or(0, |f| f.iter().map(Bytes::len).sum());
        SizeHint::with_exact(rest as u64)
    }
}

/// The in-process upstream: answers every request at once, 200 with `frames` as the body,
/// `content_type` and a `request-id`.
pub fn upstream(
    frames: Arc<[Bytes]>,
    content_type: &'static str,
) -> impl Service<
    Request<Bytes>,
    Response = Response<Frames>,
    Error = Infallible,
    Future = std::future::Ready<Result<Response<Frames>, Infallible>>,
> + Clone
+ Send
+ Sync
+ 'static {
    tower::service_fn(move |_req: Request<Bytes>| {
        let mut resp = Response::new(Frames {
            frames: frames.clone(),
            next: 0,
        });
        resp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static(content_type),
        );
        resp.headers_mut()
            .insert("request-id", HeaderValue::from_static("req_bench_1"));
        std::future::ready(Ok(resp))
    })
}

/// The stack's configuration: every layer on, limits far above the load, a global budget far
/// above the spend, the cache with its store thread (`store_thread`) or storing on the
/// request's thread.
///
/// # Panics
///
/// Never: the TOML is fixed.
pub fn stack_config(store_thread: bool) -> StackConfig {
    let text = format!(
        r#"
[cache]
store_thread = {store_thread}

[cost.budgets]
global = {{ monthly = "1000000000" }}

[retry]

[rate_limit]
requests_per_minute = 1000000000
input_tokens_per_minute = 1000000000000
output_tokens_per_minute = 1000000000000
max_concurrent_requests = 1000000
"#
    );
    toml::from_str(&text).unwrap_or_else(|e| panic!("the fixed stack config: {e}"))
}

/// The API key layer over a static upstream key, loaded on `rt`.
///
/// # Panics
///
/// If the static key does not load (it always does).
pub fn api_keys(rt: &tokio::runtime::Runtime) -> ApiKeyLayer {
    rt.block_on(async {
        let ring = KeyRing::new(
            StaticSource::new("sk-ant-api03-bench-upstream-key"),
            KeyRingConfig::default(),
        );
        if let Err(e) = ring.current().await {
            panic!("the static key does not load: {e}");
        }
        ApiKeyLayer::new(ring)
    })
}
