//! claude-cost on its own: exact costs per tenant and model, and a daily budget, around a
//! plain hyper-util client.
//!
//! No other layer of the workspace is involved: [`FullBodyService`] adapts the hyper client
//! to `Request<Bytes>`, and the [`CostLayer`](claude_cost::CostLayer) of a [`CostTracker`] with a $0.05 daily cap
//! wraps it. The requests go to an in-process `claude-mock` (no network, no API key) whose
//! `x-mock-usage` header scripts the usage each answer reports. The third request does not
//! fit what is left of the budget and is refused before it is sent; a cheaper fourth one
//! still fits. At the end the example prints the cost table.
//!
//! Run it with `cargo run -p cost-only`.

use bytes::Bytes;
use claude_core::{FullBodyService, Tenant};
use claude_cost::{Budget, BudgetAlert, BudgetConfig, CostTracker, Usd};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::{ServiceBuilder, ServiceExt};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), BoxError> {
    // A Messages API simulator on an ephemeral loopback port stands in for the real API.
    let mock = claude_mock::MockServer::start().await?;

    let tracker = CostTracker::builder()
        .budgets(BudgetConfig::new().global(Budget::new().daily("0.05".parse::<Usd>()?)))
        .alert_handler(|alert: &BudgetAlert| println!("  alert: {alert}"))
        .build();

    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let claude = ServiceBuilder::new()
        .layer(tracker.layer())
        .service(FullBodyService::new(client));

    #[rustfmt::skip]
    let calls = [
        // tenant   model               max_tokens  the usage the mock will report
        ("search", "claude-haiku-4-5", 1024,       "input=12000,output=800,cache_read=40000"),
        ("chat",   "claude-opus-4-5",  1024,       "input=1500,output=600"),
        ("chat",   "claude-opus-4-5",  1024,       "input=1500,output=600"),
        ("chat",   "claude-haiku-4-5", 256,        "input=300,output=120"),
    ];
    for (tenant, model, max_tokens, usage) in calls {
        let body = format!(
            r#"{{"model":"{model}","max_tokens":{max_tokens},"messages":[{{"role":"user","content":"Hello"}}]}}"#
        );
        let request = http::Request::post(format!("{}/v1/messages", mock.url()))
            .header("anthropic-version", "2023-06-01")
            .header("content-type", "application/json")
            .header("x-mock-usage", usage)
            .extension(Tenant::new(tenant))
            .body(Bytes::from(body))?;
        println!("{tenant} -> {model} (max_tokens {max_tokens})");
        match claude.clone().oneshot(request).await {
            Ok(response) => {
                let status = response.status();
                // The cost is recorded when the body ends.
                response.into_body().collect().await?;
                println!("  {status}; spent today: {}", tracker.total().cost);
            }
            Err(err) => {
                let err = claude_core::Error::from_box(err);
                println!("  refused ({}): {}", err.code(), err.message());
            }
        }
    }

    println!("\n{}", tracker.report());
    mock.shutdown().await;
    Ok(())
}
