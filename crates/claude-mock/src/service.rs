//! The request handler: routing, auth, validation, faults, limits and answers.

use std::collections::{HashMap, HashSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;

use crate::answer::{Answer, AnswerUsage, MAX_TEXT_TOKENS, MockBody, error_event, error_json};
use crate::directives::Directives;
use crate::estimate::parse_request;
use crate::fault::{
    Fault, FaultPlan, default_message, error_type_for_status, status_for_error_type,
};
use crate::limits::{Admission, Limits, RateLimiter};
use crate::stats::StatsRecorder;

/// The largest request body accepted (32 MiB); larger ones get 413 `request_too_large`.
pub const MAX_BODY_BYTES: usize = 32 * 1024 * 1024;

const JSON: HeaderValue = HeaderValue::from_static("application/json");
const EVENT_STREAM: HeaderValue = HeaderValue::from_static("text/event-stream");

/// The models of `GET /v1/models`: id, display name, creation date.
const MODELS: [(&str, &str, &str); 3] = [
    (
        "claude-sonnet-4-5-20250929",
        "Claude Sonnet 4.5",
        "2025-09-29T00:00:00Z",
    ),
    (
        "claude-opus-4-5-20251101",
        "Claude Opus 4.5",
        "2025-11-01T00:00:00Z",
    ),
    (
        "claude-haiku-4-5-20251001",
        "Claude Haiku 4.5",
        "2025-10-01T00:00:00Z",
    ),
];

fn model_json((id, name, created): (&str, &str, &str)) -> String {
    format!(r#"{{"type":"model","id":"{id}","display_name":"{name}","created_at":"{created}"}}"#)
}

fn models_list() -> Bytes {
    let data: Vec<String> = MODELS.into_iter().map(model_json).collect();
    Bytes::from(format!(
        r#"{{"data":[{}],"has_more":false,"first_id":"{}","last_id":"{}"}}"#,
        data.join(","),
        MODELS[0].0,
        MODELS[MODELS.len() - 1].0
    ))
}

/// The state shared by every connection of a server.
#[derive(Debug)]
pub(crate) struct Shared {
    /// Accepted API keys; empty accepts any key or none.
    pub(crate) keys: RwLock<HashSet<String>>,
    /// The plan of requests that send no `x-mock-fault`.
    pub(crate) faults: RwLock<Option<FaultPlan>>,
    pub(crate) limiter: RateLimiter,
    pub(crate) stats: Arc<StatsRecorder>,
    /// Attempts seen per attempt key.
    pub(crate) attempts: Mutex<HashMap<u64, u64>>,
    pub(crate) next_id: AtomicU64,
    pub(crate) first_byte_latency: Duration,
    pub(crate) token_latency: Duration,
    pub(crate) output_tokens: u64,
}

impl Shared {
    pub(crate) fn new(
        keys: impl IntoIterator<Item = String>,
        faults: Option<FaultPlan>,
        limits: Limits,
        first_byte_latency: Duration,
        token_latency: Duration,
        output_tokens: u64,
    ) -> Self {
        Self {
            keys: RwLock::new(keys.into_iter().collect()),
            faults: RwLock::new(faults),
            limiter: RateLimiter::new(limits),
            stats: Arc::default(),
            attempts: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            first_byte_latency,
            token_latency,
            output_tokens,
        }
    }

    pub(crate) fn reset(&self) {
        self.stats.reset();
        if let Ok(mut attempts) = self.attempts.lock() {
            attempts.clear();
        }
    }

    fn authorized(&self, headers: &HeaderMap) -> bool {
        let Ok(keys) = self.keys.read() else {
            return false;
        };
        if keys.is_empty() {
            return true;
        }
        let x_api_key = headers.get("x-api-key").and_then(|v| v.to_str().ok());
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        [x_api_key, bearer]
            .into_iter()
            .flatten()
            .any(|key| keys.contains(key.trim()))
    }

    /// The default plan with its canonical text (its part of the attempt key).
    fn default_faults(&self) -> Option<(FaultPlan, String)> {
        let plan = self.faults.read().ok()?.clone()?;
        let spec = plan.to_string();
        Some((plan, spec))
    }

    /// The 0-based attempt number of this request under its attempt key.
    fn next_attempt(&self, key: u64) -> u64 {
        let Ok(mut attempts) = self.attempts.lock() else {
            return 0;
        };
        let seen = attempts.entry(key).or_insert(0);
        let attempt = *seen;
        *seen += 1;
        attempt
    }
}

/// The error a handler returns to make hyper close the connection without a response.
#[derive(Debug)]
pub(crate) struct CloseConnection;

impl std::fmt::Display for CloseConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection closed by claude-mock")
    }
}

impl std::error::Error for CloseConnection {}

/// A response before the in-flight guard is attached.
struct Reply {
    status: u16,
    headers: HeaderMap,
    body: MockBody,
}

impl Reply {
    fn new(status: u16, content_type: HeaderValue, body: MockBody) -> Self {
        let mut headers = HeaderMap::with_capacity(8);
        headers.insert(header::CONTENT_TYPE, content_type);
        Self {
            status,
            headers,
            body,
        }
    }

    fn json(status: u16, bytes: Bytes) -> Self {
        Self::new(status, JSON, MockBody::once(bytes, None))
    }

    fn error(status: u16, id: u64, error_type: &str, message: &str) -> Self {
        Self::json(status, error_json(id, error_type, message, None))
    }

    fn into_response(self, id: u64) -> Response<MockBody> {
        let mut response = Response::new(self.body);
        *response.status_mut() =
            StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        *response.headers_mut() = self.headers;
        if let Ok(request_id) = HeaderValue::try_from(format!("req_mock_{id}")) {
            response
                .headers_mut()
                .insert(HeaderName::from_static("request-id"), request_id);
        }
        response
    }
}

/// Why a `/v1/*` request ends without a response.
enum Abort {
    /// A `reset` fault.
    Reset,
    /// The request body could not be read: the client went away.
    ClientGone,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Messages,
    CountTokens,
    Models,
    Model,
}

/// Handles one request of any path.
pub(crate) async fn handle(
    shared: Arc<Shared>,
    request: Request<Incoming>,
) -> Result<Response<MockBody>, CloseConnection> {
    let id = shared.next_id.fetch_add(1, Relaxed) + 1;
    let path = request.uri().path();
    if !path.starts_with("/v1/") {
        return Ok(handle_other(&shared, &request, id).into_response(id));
    }
    let mut in_flight = shared.stats.begin(path);
    match handle_v1(&shared, request, id).await {
        Ok(reply) => {
            in_flight.record_status(reply.status);
            let mut response = reply.into_response(id);
            response.body_mut().attach(in_flight);
            Ok(response)
        }
        Err(Abort::Reset) => {
            in_flight.record_reset();
            Err(CloseConnection)
        }
        Err(Abort::ClientGone) => Err(CloseConnection),
    }
}

/// `/mock/*` and unknown paths: not counted, no auth.
fn handle_other(shared: &Shared, request: &Request<Incoming>, id: u64) -> Reply {
    let method = request.method();
    match request.uri().path() {
        "/mock/stats" if method == Method::GET => {
            let stats = serde_json::to_vec(&shared.stats.snapshot()).unwrap_or_default();
            Reply::json(200, Bytes::from(stats))
        }
        "/mock/reset" if method == Method::POST => {
            shared.reset();
            Reply::json(200, Bytes::from_static(br#"{"reset":true}"#))
        }
        "/mock/stats" => method_not_allowed(id, "GET"),
        "/mock/reset" => method_not_allowed(id, "POST"),
        path => not_found(id, path),
    }
}

fn not_found(id: u64, path: &str) -> Reply {
    Reply::error(404, id, "not_found_error", &format!("Not found: {path}"))
}

fn method_not_allowed(id: u64, allow: &'static str) -> Reply {
    let mut reply = Reply::error(
        405,
        id,
        error_type_for_status(405),
        &format!("Method not allowed: use {allow}"),
    );
    reply
        .headers
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    reply
}

fn bad_request(id: u64, message: &str) -> Reply {
    Reply::error(400, id, "invalid_request_error", message)
}

fn too_large(id: u64) -> Reply {
    Reply::error(
        413,
        id,
        "request_too_large",
        &format!("Request exceeds the maximum allowed number of bytes ({MAX_BODY_BYTES})."),
    )
}

async fn sleep(duration: Duration) {
    if !duration.is_zero() {
        tokio::time::sleep(duration).await;
    }
}

async fn handle_v1(shared: &Shared, request: Request<Incoming>, id: u64) -> Result<Reply, Abort> {
    let path = request.uri().path();
    let method = request.method();
    let (route, allow) = match path {
        "/v1/messages" => (Route::Messages, "POST"),
        "/v1/messages/count_tokens" => (Route::CountTokens, "POST"),
        "/v1/models" => (Route::Models, "GET"),
        p if p
            .strip_prefix("/v1/models/")
            .is_some_and(|m| !m.contains('/')) =>
        {
            (Route::Model, "GET")
        }
        p => return Ok(not_found(id, p)),
    };
    if method.as_str() != allow {
        return Ok(method_not_allowed(id, allow));
    }
    if !shared.authorized(request.headers()) {
        return Ok(Reply::error(
            401,
            id,
            "authentication_error",
            default_message("authentication_error"),
        ));
    }
    if !request.headers().contains_key("anthropic-version") {
        return Ok(bad_request(id, "anthropic-version: header is required"));
    }
    match route {
        Route::Models => Ok(Reply::json(200, models_list())),
        Route::Model => {
            let model = path.trim_start_matches("/v1/models/");
            Ok(model_reply(id, model))
        }
        Route::Messages | Route::CountTokens => messages(shared, request, id, route).await,
    }
}

fn model_reply(id: u64, model: &str) -> Reply {
    match MODELS.into_iter().find(|m| m.0 == model) {
        Some(m) => Reply::json(200, Bytes::from(model_json(m))),
        None => Reply::error(404, id, "not_found_error", &format!("model: {model}")),
    }
}

/// The body of a POST, or the reply that refuses it.
async fn read_body(
    headers: &HeaderMap,
    body: Incoming,
    id: u64,
) -> Result<Result<Bytes, Reply>, Abort> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > MAX_BODY_BYTES as u64) {
        return Ok(Err(too_large(id)));
    }
    match Limited::new(body, MAX_BODY_BYTES).collect().await {
        Ok(collected) => Ok(Ok(collected.to_bytes())),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Ok(Err(too_large(id))),
        Err(_) => Err(Abort::ClientGone),
    }
}

/// A hash that identifies "the same request" for fault attempts.
fn attempt_key(directives: &Directives, spec: &str, path: &str, body: &[u8]) -> u64 {
    let mut hasher = DefaultHasher::new();
    if let Some(key) = &directives.key {
        0u8.hash(&mut hasher);
        key.hash(&mut hasher);
    } else {
        1u8.hash(&mut hasher);
        spec.hash(&mut hasher);
        path.hash(&mut hasher);
        body.hash(&mut hasher);
    }
    hasher.finish()
}

/// A scripted error: the status's Anthropic error, with the scripted retry headers.
fn scripted_error(id: u64, status: u16, directives: &Directives) -> Reply {
    let error_type = error_type_for_status(status);
    let mut reply = Reply::error(status, id, error_type, default_message(error_type));
    add_retry_headers(&mut reply, directives, true);
    reply
}

fn add_retry_headers(reply: &mut Reply, directives: &Directives, retry_after: bool) {
    if retry_after {
        if let Some(v) = &directives.retry_after {
            reply.headers.insert(header::RETRY_AFTER, v.clone());
        }
        if let Some(v) = &directives.retry_after_ms {
            reply
                .headers
                .insert(HeaderName::from_static("retry-after-ms"), v.clone());
        }
    }
    if let Some(should) = directives.should_retry {
        reply.headers.insert(
            HeaderName::from_static("x-should-retry"),
            HeaderValue::from_static(if should { "true" } else { "false" }),
        );
    }
}

fn spend_cap(id: u64, directives: &Directives) -> Reply {
    let body = error_json(
        id,
        "rate_limit_error",
        "Your organization has reached its monthly spend limit. Access resumes at 00:00 UTC on \
         the first day of next month.",
        Some(r#"{"error_code":"enforced_spend_limit_reached"}"#),
    );
    let mut reply = Reply::json(429, body);
    add_retry_headers(&mut reply, directives, false);
    reply
}

/// What a fault entry makes of a request.
enum Scripted {
    /// Answer, with a stream error after this many deltas.
    Answer { stream_error_after: Option<u64> },
    /// Send this instead of the answer.
    Reply(Box<Reply>),
    /// Close the connection without a response.
    Reset,
}

fn scripted(fault: Fault, stream: bool, directives: &Directives, id: u64) -> Scripted {
    match fault {
        Fault::Ok => Scripted::Answer {
            stream_error_after: directives.stream_error_after,
        },
        Fault::StreamError if stream => Scripted::Answer {
            stream_error_after: Some(directives.stream_error_after.unwrap_or(0)),
        },
        Fault::StreamError => {
            // Without a stream the same condition is an HTTP error.
            let error_type = directives.stream_error_type();
            let status = status_for_error_type(error_type);
            let mut reply = Reply::error(status, id, error_type, default_message(error_type));
            add_retry_headers(&mut reply, directives, true);
            Scripted::Reply(Box::new(reply))
        }
        Fault::Status(status) => Scripted::Reply(Box::new(scripted_error(id, status, directives))),
        Fault::SpendCap => Scripted::Reply(Box::new(spend_cap(id, directives))),
        Fault::Reset => Scripted::Reset,
    }
}

async fn messages(
    shared: &Shared,
    request: Request<Incoming>,
    id: u64,
    route: Route,
) -> Result<Reply, Abort> {
    let (parts, body) = request.into_parts();
    let bytes = match read_body(&parts.headers, body, id).await? {
        Ok(bytes) => bytes,
        Err(reply) => return Ok(reply),
    };
    let parsed = match parse_request(&bytes, route == Route::Messages) {
        Ok(parsed) => parsed,
        Err(message) => return Ok(bad_request(id, &message)),
    };
    let directives = match Directives::parse(&parts.headers) {
        Ok(d) => d,
        Err(message) => return Ok(bad_request(id, &message)),
    };

    // Faults.
    let default_plan = if directives.fault.is_none() {
        shared.default_faults()
    } else {
        None
    };
    let plan = directives.fault.as_ref().or(default_plan.as_ref());
    let fault = plan.map_or(Fault::Ok, |(plan, spec)| {
        let key = attempt_key(&directives, spec, parts.uri.path(), &bytes);
        plan.outcome(shared.next_attempt(key))
    });
    let stream = route == Route::Messages && parsed.stream;
    let stream_error_after = match scripted(fault, stream, &directives, id) {
        Scripted::Answer { stream_error_after } => stream_error_after,
        Scripted::Reply(reply) => {
            sleep(directives.latency).await;
            return Ok(with_reset_after(*reply, &directives));
        }
        Scripted::Reset => {
            sleep(directives.latency).await;
            return Err(Abort::Reset);
        }
    };

    let input = directives.usage.input.unwrap_or(parsed.input_tokens);
    if route == Route::CountTokens {
        sleep(directives.latency).await;
        let body = Bytes::from(format!("{{\"input_tokens\":{input}}}"));
        return Ok(with_reset_after(Reply::json(200, body), &directives));
    }

    let max_tokens = parsed.max_tokens.unwrap_or(1);
    let wanted = directives
        .usage
        .output
        .or(directives.output_tokens)
        .unwrap_or(shared.output_tokens);
    let output = if directives.usage.output.is_some() {
        wanted
    } else {
        wanted.min(max_tokens)
    };
    let usage = AnswerUsage {
        input,
        output,
        cache_read: directives.usage.cache_read,
        cache_write_5m: directives.usage.cache_write_5m,
        cache_write_1h: directives.usage.cache_write_1h,
        web_search: directives.usage.web_search,
        service_tier: directives.usage.service_tier.as_str(),
    };

    // Limits.
    let rate_headers = match shared
        .limiter
        .admit(input.saturating_add(usage.cache_creation()), output)
    {
        Admission::Unlimited => Vec::new(),
        Admission::Admitted(headers) => headers.to_headers(),
        Admission::Limited {
            message,
            retry_after_secs,
            headers,
        } => {
            shared.stats.record_rate_limited();
            sleep(directives.latency).await;
            let mut reply = Reply::error(429, id, "rate_limit_error", &message);
            reply
                .headers
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
            reply.headers.extend(headers.to_headers());
            return Ok(with_reset_after(reply, &directives));
        }
    };

    let answer = Answer {
        id,
        model_json: parsed.model_json,
        usage,
        stop_reason: if wanted > max_tokens {
            "max_tokens"
        } else {
            "end_turn"
        },
    };
    let mut wait = directives.latency.saturating_add(shared.first_byte_latency);
    let mut reply = if stream {
        let error = stream_error_after.map(|after| {
            let error_type = directives.stream_error_type();
            (after, error_event(error_type, default_message(error_type)))
        });
        let mut reply = Reply::new(
            200,
            EVENT_STREAM,
            MockBody::sse(answer.stream(shared.token_latency, error)),
        );
        reply
            .headers
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        reply
    } else {
        let tokens = usize::try_from(output)
            .unwrap_or(MAX_TEXT_TOKENS)
            .min(MAX_TEXT_TOKENS);
        let generation = shared
            .token_latency
            .checked_mul(u32::try_from(tokens).unwrap_or(u32::MAX))
            .unwrap_or(Duration::MAX);
        wait = wait.saturating_add(generation);
        Reply::new(
            200,
            JSON,
            MockBody::once(answer.json(), Some(usage.figures())),
        )
    };
    reply.headers.extend(rate_headers);
    sleep(wait).await;
    Ok(with_reset_after(reply, &directives))
}

fn with_reset_after(mut reply: Reply, directives: &Directives) -> Reply {
    if directives.reset_after.is_some() {
        reply.body = reply.body.reset_after(directives.reset_after);
    }
    reply
}
