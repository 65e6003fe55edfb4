//! An axum app that calls Claude through a [`ClaudeStack`] client, with costs per tenant.
//!
//! - `POST /ask` takes a question as its plain-text body, sends it as a Messages request
//!   through the stack (cost and budgets, retries, per-attempt timeout, HTTP client) and
//!   returns the answer's text. The `x-tenant` header becomes a [`Tenant`] extension, so
//!   the cost is attributed to that tenant. An upstream error comes back as Anthropic sent
//!   it; an error of the stack itself (a budget refusal, a timeout) as an Anthropic-shaped
//!   error from [`claude_core::Error::into_response`].
//! - `GET /costs` returns the cost report as JSON.
//!
//! By default the upstream is an in-process `claude-mock` server, so no API key is needed.
//! With `--real` the requests go to the real API, with the key from `ANTHROPIC_API_KEY`
//! injected by the stack's secrets layer.
//!
//! ```text
//! cargo run -p axum-embed                 # listens on 127.0.0.1:3000 (set PORT to change)
//! cargo run -p axum-embed -- --real       # ... in front of the real API
//! cargo run -p axum-embed -- --self-test  # one /ask and one /costs against itself, then exit
//! ```

use axum::Router;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use claude_core::Tenant;
use claude_cost::CostTracker;
use claude_mock::MockServer;
use claude_stack::{ClaudeStack, ClientConfig, StackConfig, StackService};
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use tower::ServiceExt;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const MODEL: &str = "claude-haiku-4-5";

/// The stack for `--real`: defaults (api.anthropic.com, cost and retry on), plus the key
/// from the environment.
const REAL_API: &str = r#"
[secrets.environments.prod.default]
source = "env"
var = "ANTHROPIC_API_KEY"
"#;

/// The app's state: the stack's client (cheap to clone) and its cost ledger.
#[derive(Clone)]
struct App {
    claude: StackService,
    costs: CostTracker,
}

fn router(app: App) -> Router {
    Router::new()
        .route("/ask", post(ask))
        .route("/costs", get(costs))
        .with_state(app)
}

async fn ask(State(app): State<App>, headers: HeaderMap, question: String) -> Response {
    let tenant = headers
        .get("x-tenant")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("anonymous");
    match ask_claude(app.claude, Tenant::new(tenant), question).await {
        Ok(response) => response,
        // Errors of the stack itself, in the shape Anthropic's SDKs understand.
        Err(err) => claude_core::Error::from_box(err)
            .into_response()
            .map(axum::body::Body::new),
    }
}

async fn ask_claude(
    claude: StackService,
    tenant: Tenant,
    question: String,
) -> Result<Response, BoxError> {
    let body = serde_json::json!({
        "model": MODEL,
        "max_tokens": 512,
        "messages": [{"role": "user", "content": question}],
    });
    let request = Request::post("/v1/messages")
        .header(CONTENT_TYPE, "application/json")
        .extension(tenant)
        .body(Bytes::from(serde_json::to_vec(&body)?))?;
    let (parts, body) = claude.oneshot(request).await?.into_parts();
    // Reading the body to its end is also when the cost layer records the usage.
    let bytes = body.collect().await?.to_bytes();
    if !parts.status.is_success() {
        return Ok((parts.status, [(CONTENT_TYPE, "application/json")], bytes).into_response());
    }
    let message: serde_json::Value = serde_json::from_slice(&bytes)?;
    let text: String = message["content"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|block| block["text"].as_str())
        .collect();
    Ok(text.into_response())
}

async fn costs(State(app): State<App>) -> impl IntoResponse {
    (
        [(CONTENT_TYPE, "application/json")],
        app.costs.report().to_json(),
    )
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str| args.iter().any(|a| a == name);

    // The upstream: the real API, or a simulator on an ephemeral loopback port (kept alive
    // by `_mock` until main returns).
    let (config, _mock) = if flag("--real") {
        if std::env::var_os("ANTHROPIC_API_KEY").is_none() {
            return Err("--real needs ANTHROPIC_API_KEY".into());
        }
        (toml::from_str::<StackConfig>(REAL_API)?, None)
    } else {
        let mock = MockServer::start().await?;
        let config = StackConfig {
            client: ClientConfig {
                base_url: mock.url(),
                ..ClientConfig::default()
            },
            ..StackConfig::default()
        };
        (config, Some(mock))
    };
    let stack = ClaudeStack::new(config)?;
    let app = router(App {
        claude: stack.client()?,
        costs: stack.cost_tracker().ok_or("the cost layer is off")?.clone(),
    });

    if flag("--self-test") {
        return self_test(app).await;
    }

    let port = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse::<u16>().ok())
        .unwrap_or(3000);
    let listener = TcpListener::bind(("127.0.0.1", port)).await?;
    let addr = listener.local_addr()?;
    println!(
        "listening on http://{addr}, upstream {}",
        stack.config().client.base_url
    );
    println!("  curl -d 'Why is the sky blue?' -H 'x-tenant: team-a' http://{addr}/ask");
    println!("  curl http://{addr}/costs");
    axum::serve(listener, app).await?;
    Ok(())
}

/// Serves the app on an ephemeral port, calls `/ask` and `/costs` once each over HTTP and
/// prints the answers.
async fn self_test(app: Router) -> Result<(), BoxError> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });

    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let requests = [
        Request::post(format!("{base}/ask"))
            .header("x-tenant", "team-a")
            .body(Full::from("Why is the sky blue?"))?,
        Request::get(format!("{base}/costs")).body(Full::default())?,
    ];
    for request in requests {
        let line = format!("{} {}", request.method(), request.uri().path());
        let response = client.request(request).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        println!("{line} -> {status}\n{}\n", String::from_utf8_lossy(&body));
        if !status.is_success() {
            return Err(format!("{line} failed with {status}").into());
        }
    }
    Ok(())
}
