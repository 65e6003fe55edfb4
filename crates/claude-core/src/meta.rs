//! What a request is about, parsed once: [`RequestMeta`], and who sends it: [`Tenant`].
//!
//! # Parsing once, without a DOM
//!
//! [`RequestMeta::get_or_parse`] parses the JSON body the first time a layer asks and stores
//! the result in the request's extensions; every later layer gets the stored copy (cloning
//! it is a few reference-count increments). Parsing keeps `system`, `messages` and `tools`
//! as raw JSON slices: their text is checked for syntax but no tree is built, so a 100 KB
//! prompt costs one linear scan. An ordinary body is read by a strict pass of this crate's
//! own, which validates all of it and answers only where serde_json would accept the body
//! and read the same slices; any other body (invalid, or unusual: escaped member names, a
//! member given twice, deep nesting) is parsed by serde_json with
//! [`serde_json::value::RawValue`], which then decides, so the meta is the same either way.
//!
//! # The input-token estimate
//!
//! `input_tokens_estimate = ceil(B / 4)`, at least 1, where `B` is the sum of the byte
//! lengths of the raw JSON texts of the top-level `system`, `messages` and `tools` values as
//! they appear in the body. claude-mock reports exactly this figure as `input_tokens`, so
//! tests can compare; against the real API it over-estimates plain English text (about 4
//! characters per token plus the JSON punctuation), which is the safe side for a limiter.
//!
//! # Invalid requests
//!
//! Malformed JSON or a missing required field never panics: the meta says
//! [`Validity::Invalid`] with a reason. Each layer documents what it does with one; the
//! default throughout the workspace is to **pass it on**, so the client gets Anthropic's own
//! 400 (rate limiting charges it one request and the minimum token estimate, the cache does
//! not store it, cost records it with zero usage).

use std::sync::Arc;

use http::Request;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::skim;

/// Which API endpoint a request targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Endpoint {
    /// `POST /v1/messages`.
    Messages,
    /// `POST /v1/messages/count_tokens`.
    CountTokens,
    /// `/v1/messages/batches` and everything below it.
    Batches,
    /// `/v1/models` and below.
    Models,
    /// Anything else.
    Other,
}

impl Endpoint {
    /// Recognises the endpoint from a request path; a relay prefix before `/v1/` is allowed.
    pub fn from_path(path: &str) -> Self {
        // The usual path starts with `/v1/`; only a relay prefix needs the search.
        let p = if path.starts_with("/v1/") {
            path
        } else {
            match path.find("/v1/") {
                Some(i) => &path[i..],
                None => return Self::Other,
            }
        };
        let p = p.trim_end_matches('/');
        if p == "/v1/messages" {
            Self::Messages
        } else if p == "/v1/messages/count_tokens" {
            Self::CountTokens
        } else if p.starts_with("/v1/messages/batches") {
            Self::Batches
        } else if p == "/v1/models" || p.starts_with("/v1/models/") {
            Self::Models
        } else {
            Self::Other
        }
    }

    /// A short stable name (`messages`, `count_tokens`, …) for labels and keys.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Messages => "messages",
            Self::CountTokens => "count_tokens",
            Self::Batches => "batches",
            Self::Models => "models",
            Self::Other => "other",
        }
    }

    /// Whether requests to this endpoint carry a Messages-shaped JSON body.
    pub const fn has_message_body(self) -> bool {
        matches!(self, Self::Messages | Self::CountTokens)
    }
}

/// Whether the body is a well-formed request for its endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Validity {
    /// Well-formed as far as the stack checks (JSON object with the required fields).
    Valid,
    /// Not JSON, or missing/mistyped required fields; the reason says which.
    Invalid(Arc<str>),
    /// The endpoint has no Messages body to check (models, batches, other).
    NotApplicable,
}

/// What a request is about, parsed once from its body. Cheap to clone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestMeta {
    /// The endpoint.
    pub endpoint: Endpoint,
    /// `model`, when present.
    pub model: Option<Arc<str>>,
    /// `max_tokens`, when present.
    pub max_tokens: Option<u32>,
    /// `stream` (false when absent).
    pub stream: bool,
    /// The input-token estimate (see the module docs), at least 1 for Messages bodies.
    pub input_tokens_estimate: u64,
    /// Whether the body is well-formed.
    pub validity: Validity,
}

#[derive(Deserialize)]
struct Wire<'a> {
    #[serde(borrow)]
    model: Option<&'a RawValue>,
    max_tokens: Option<&'a RawValue>,
    stream: Option<&'a RawValue>,
    #[serde(borrow)]
    system: Option<&'a RawValue>,
    #[serde(borrow)]
    messages: Option<&'a RawValue>,
    #[serde(borrow)]
    tools: Option<&'a RawValue>,
}

impl<'a> Wire<'a> {
    fn members(&self) -> skim::Members<'a> {
        skim::Members {
            model: self.model.map(raw),
            max_tokens: self.max_tokens.map(raw),
            stream: self.stream.map(raw),
            system: self.system.map(raw),
            messages: self.messages.map(raw),
            tools: self.tools.map(raw),
        }
    }
}

fn raw(v: &RawValue) -> &[u8] {
    v.get().as_bytes()
}

/// The model named by the raw JSON text of `model`, when it is a string.
fn model_name(raw: &[u8]) -> Option<Arc<str>> {
    // A string without escapes is its own text between the quotes (the raw text is valid
    // JSON, so there is no quote inside).
    if let Some(inner) = raw.strip_prefix(b"\"").and_then(|r| r.strip_suffix(b"\""))
        && !inner.contains(&b'\\')
    {
        return std::str::from_utf8(inner).ok().map(Arc::from);
    }
    serde_json::from_slice::<String>(raw).ok().map(Arc::from)
}

/// The documented estimate: `ceil(bytes / 4)`, at least 1.
pub const fn estimate_tokens_from_bytes(bytes: usize) -> u64 {
    let t = (bytes as u64).div_ceil(4);
    if t == 0 { 1 } else { t }
}

impl RequestMeta {
    /// Parses the meta of a request to `path` with `body`.
    pub fn parse(path: &str, body: &[u8]) -> Self {
        Self::parse_with(path, body, true)
    }

    /// [`parse`](Self::parse), with or without the fast path (the tests compare the two).
    fn parse_with(path: &str, body: &[u8], fast: bool) -> Self {
        let endpoint = Endpoint::from_path(path);
        let mut meta = Self {
            endpoint,
            model: None,
            max_tokens: None,
            stream: false,
            input_tokens_estimate: 0,
            validity: Validity::NotApplicable,
        };
        if !endpoint.has_message_body() {
            return meta;
        }
        meta.input_tokens_estimate = 1;
        // The fast path answers for ordinary bodies; serde decides whenever it does not.
        let wire = match skim::members(body).filter(|_| fast) {
            Some(m) => m,
            None => match serde_json::from_slice::<Wire<'_>>(body) {
                Ok(w) => w.members(),
                Err(e) => {
                    meta.validity =
                        Validity::Invalid(format!("body is not a JSON object: {e}").into());
                    return meta;
                }
            },
        };
        let raw_len = |v: Option<&[u8]>| v.map_or(0, <[u8]>::len);
        meta.input_tokens_estimate = estimate_tokens_from_bytes(
            raw_len(wire.system) + raw_len(wire.messages) + raw_len(wire.tools),
        );
        let mut problems: Vec<&str> = Vec::new();
        match wire.model.map(model_name) {
            Some(Some(m)) => meta.model = Some(m),
            Some(None) => problems.push("`model` must be a string"),
            None => problems.push("`model` is required"),
        }
        match wire.stream {
            None | Some(b"false" | b"null") => {}
            Some(b"true") => meta.stream = true,
            Some(_) => problems.push("`stream` must be a boolean"),
        }
        if wire.messages.is_none_or(|m| !m.starts_with(b"[")) {
            problems.push("`messages` must be an array");
        }
        if endpoint == Endpoint::Messages {
            match wire.max_tokens.map(|t| {
                std::str::from_utf8(t)
                    .ok()
                    .and_then(|t| t.parse::<u32>().ok())
            }) {
                Some(Some(n)) if n > 0 => meta.max_tokens = Some(n),
                Some(_) => problems.push("`max_tokens` must be a positive integer"),
                None => problems.push("`max_tokens` is required"),
            }
        }
        meta.validity = if problems.is_empty() {
            Validity::Valid
        } else {
            Validity::Invalid(problems.join("; ").into())
        };
        meta
    }

    /// The meta stored in the request's extensions, parsed and stored on first use.
    pub fn get_or_parse<B: AsRef<[u8]>>(req: &mut Request<B>) -> Self {
        if let Some(m) = req.extensions().get::<Self>() {
            return m.clone();
        }
        let meta = Self::parse(req.uri().path(), req.body().as_ref());
        req.extensions_mut().insert(meta.clone());
        meta
    }

    /// Whether the body was well-formed.
    pub fn is_valid(&self) -> bool {
        self.validity == Validity::Valid
    }

    /// The model family used as a rate-limit key (see [`model_family`]).
    pub fn model_family(&self) -> &str {
        self.model.as_deref().map_or("unknown", model_family)
    }
}

/// The rate-limit family of a model id: Anthropic pools Opus 4.x together and Sonnet 4.x
/// together (API reference §1.1); other models are their own family.
///
/// Returns `"opus-4"`, `"sonnet-4"`, `"haiku-4"`, or the model id without its date suffix
/// (e.g. `claude-3-5-haiku`).
pub fn model_family(model: &str) -> &str {
    let m = model.strip_prefix("claude-").unwrap_or(model);
    for fam in ["opus-4", "sonnet-4", "haiku-4"] {
        if m.starts_with(fam) {
            return fam;
        }
    }
    // Strip a trailing -YYYYMMDD date.
    match model.rsplit_once('-') {
        Some((base, date)) if date.len() == 8 && date.bytes().all(|b| b.is_ascii_digit()) => base,
        _ => model,
    }
}

/// Who is calling: an application, a team, a virtual key. Set by the embedding app or the
/// gateway as a request extension; rate-limit keys, cache scopes, cost attribution and key
/// selection all read it. A request without one belongs to [`Tenant::default`] (`"default"`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tenant(Arc<str>);

impl Tenant {
    /// A tenant with this id.
    pub fn new(id: impl Into<Arc<str>>) -> Self {
        Self(id.into())
    }

    /// The tenant id.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The tenant id as a shared string (a reference-count increment, no copy).
    pub fn id_arc(&self) -> Arc<str> {
        self.0.clone()
    }

    /// The tenant of a request (the default tenant when none is set).
    pub fn of<B>(req: &Request<B>) -> Self {
        req.extensions().get::<Self>().cloned().unwrap_or_default()
    }
}

impl Default for Tenant {
    fn default() -> Self {
        static DEFAULT: std::sync::OnceLock<Arc<str>> = std::sync::OnceLock::new();
        Self(DEFAULT.get_or_init(|| Arc::from("default")).clone())
    }
}

impl std::fmt::Display for Tenant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(&self.0)
    }
}

impl From<&str> for Tenant {
    fn from(s: &str) -> Self {
        Self::new(s)
    }
}

impl From<String> for Tenant {
    fn from(s: String) -> Self {
        Self::new(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fields_and_estimate() {
        let body = br#"{"model":"claude-sonnet-4-5","max_tokens":100,"stream":true,"system":"abcd","messages":[{"role":"user","content":"hi"}]}"#;
        let m = RequestMeta::parse("/v1/messages", body);
        assert_eq!(m.endpoint, Endpoint::Messages);
        assert_eq!(m.model.as_deref(), Some("claude-sonnet-4-5"));
        assert_eq!(m.max_tokens, Some(100));
        assert!(m.stream);
        assert!(m.is_valid());
        let b = r#""abcd""#.len() + r#"[{"role":"user","content":"hi"}]"#.len();
        assert_eq!(m.input_tokens_estimate, (b as u64).div_ceil(4));
    }

    #[test]
    fn invalid_bodies_do_not_panic() {
        for body in [
            &b""[..],
            b"{",
            b"[]",
            b"null",
            b"{\"model\":1}",
            b"\xff\xfe",
        ] {
            let m = RequestMeta::parse("/v1/messages", body);
            assert!(matches!(m.validity, Validity::Invalid(_)), "{body:?}");
            assert_eq!(m.input_tokens_estimate, 1);
        }
        let m = RequestMeta::parse("/v1/messages", br#"{"model":"m","messages":[]}"#);
        match m.validity {
            Validity::Invalid(r) => assert!(r.contains("max_tokens"), "{r}"),
            other => panic!("{other:?}"),
        }
        let m = RequestMeta::parse(
            "/v1/messages",
            br#"{"model":"m","max_tokens":0,"messages":[]}"#,
        );
        assert!(!m.is_valid());
    }

    #[test]
    fn count_tokens_needs_no_max_tokens() {
        let m = RequestMeta::parse(
            "/v1/messages/count_tokens",
            br#"{"model":"m","messages":[]}"#,
        );
        assert!(m.is_valid());
        assert_eq!(m.endpoint, Endpoint::CountTokens);
    }

    #[test]
    fn escaped_model_name() {
        let m = RequestMeta::parse(
            "/v1/messages",
            br#"{"model":"claude\u002dx","max_tokens":1,"messages":[]}"#,
        );
        assert_eq!(m.model.as_deref(), Some("claude-x"));
    }

    #[test]
    fn endpoints() {
        assert_eq!(Endpoint::from_path("/v1/messages"), Endpoint::Messages);
        assert_eq!(
            Endpoint::from_path("/relay/v1/messages/"),
            Endpoint::Messages
        );
        assert_eq!(
            Endpoint::from_path("/v1/messages/count_tokens"),
            Endpoint::CountTokens
        );
        assert_eq!(
            Endpoint::from_path("/v1/messages/batches/b_1/cancel"),
            Endpoint::Batches
        );
        assert_eq!(Endpoint::from_path("/v1/models"), Endpoint::Models);
        assert_eq!(Endpoint::from_path("/healthz"), Endpoint::Other);
        let m = RequestMeta::parse("/v1/models", b"");
        assert_eq!(m.validity, Validity::NotApplicable);
    }

    #[test]
    fn families() {
        assert_eq!(model_family("claude-opus-4-5-20251101"), "opus-4");
        assert_eq!(model_family("claude-opus-4-1"), "opus-4");
        assert_eq!(model_family("claude-sonnet-4-20250514"), "sonnet-4");
        assert_eq!(model_family("claude-haiku-4-5"), "haiku-4");
        assert_eq!(
            model_family("claude-3-5-haiku-20241022"),
            "claude-3-5-haiku"
        );
        assert_eq!(model_family("gpt"), "gpt");
    }

    /// Bodies on which the fast path and serde must agree: ordinary requests, and bodies
    /// that are unusual or invalid in each way the fast path leaves to serde.
    const BODIES: &[&str] = &[
        r#"{"model":"claude-sonnet-4-5","max_tokens":1024,"stream":false,"temperature":0.2,"system":"Be brief.","messages":[{"role":"user","content":"Hello, \"world\" \u00e9\n"}]}"#,
        r#" {"messages":[],"model":"m","max_tokens":1,"tools":[{"name":"t","input_schema":{"type":"object"}}]} "#,
        r#"{"model":"m","max_tokens":1,"messages":[],"stream":true}"#,
        r#"{"model":"m","max_tokens":1,"messages":[],"stream":null}"#,
        r#"{"model":"m","max_tokens":1,"messages":[],"stream":"yes"}"#,
        r#"{"model":null,"max_tokens":1,"messages":[]}"#,
        r#"{"model":"a\u002db","max_tokens":1,"messages":[]}"#,
        r#"{"model":"\ud800","max_tokens":1,"messages":[]}"#,
        r#"{"model":7,"max_tokens":1,"messages":[]}"#,
        r#"{"model":"m","max_tokens":-1,"messages":[]}"#,
        r#"{"model":"m","max_tokens":1.0,"messages":[]}"#,
        r#"{"model":"m","max_tokens":4294967296,"messages":[]}"#,
        r#"{"model":"m","max_tokens":1,"messages":{}}"#,
        r#"{"model":"m","max_tokens":1,"messages":[],"model":"n"}"#,
        r#"{"mod\u0065l":"m","max_tokens":1,"messages":[]}"#,
        r#"{"model":"m","max_tokens":1,"messages":[],"x":"\q"}"#,
        r#"{"model":"m","max_tokens":1,"messages":[],}"#,
        r#"["m",1,false,null,[],null]"#,
        r#"{"model":"m","max_tokens":1,"messages":[[[[[[[[[[]]]]]]]]]]}"#,
        "{\"model\":\"m\",\"max_tokens\":1,\"messages\":[\"\u{1}\"]}",
        "{\"model\":\"m\u{e9}\",\"max_tokens\":1,\"messages\":[\"\u{1F600}\"]}",
        "",
        "{}",
        "null",
    ];

    fn agree(path: &str, body: &[u8]) {
        assert_eq!(
            RequestMeta::parse_with(path, body, true),
            RequestMeta::parse_with(path, body, false),
            "{path} {}",
            String::from_utf8_lossy(body)
        );
    }

    #[test]
    fn the_fast_path_agrees_with_serde() {
        // The ordinary bodies do take the fast path (else agreeing would prove nothing).
        for body in &BODIES[..6] {
            assert!(skim::members(body.as_bytes()).is_some(), "{body}");
        }
        for body in BODIES {
            for path in ["/v1/messages", "/v1/messages/count_tokens"] {
                agree(path, body.as_bytes());
            }
        }
        // Deep nesting on both sides of the fast path's limit and of serde's.
        for n in [98, 99, 100, 126, 127, 128, 200] {
            let body = format!(
                r#"{{"model":"m","max_tokens":1,"messages":{}{}}}"#,
                "[".repeat(n),
                "]".repeat(n)
            );
            agree("/v1/messages", body.as_bytes());
        }
        // Invalid UTF-8 where serde does not look (an ignored string) and where it does.
        agree(
            "/v1/messages",
            b"{\"model\":\"m\",\"max_tokens\":1,\"messages\":[],\"x\":\"\xff\"}",
        );
        agree(
            "/v1/messages",
            b"{\"model\":\"m\xff\",\"max_tokens\":1,\"messages\":[]}",
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        /// Each body above with bytes deleted, replaced or inserted (JSON punctuation mostly):
        /// valid and invalid bodies of every kind, on which both paths must agree.
        #[test]
        fn the_fast_path_agrees_with_serde_on_mutated_bodies(
            which in 0..BODIES.len(),
            edits in proptest::collection::vec(
                (0usize..400, 0u8..3, proptest::sample::select(
                    b"{}[]\":,\\ \n0123456789.eE+-tfnulrsx\x01\xff".to_vec(),
                )),
                1..4,
            ),
        ) {
            let mut body = BODIES[which].as_bytes().to_vec();
            for (at, op, byte) in edits {
                let at = at % (body.len() + 1);
                match op {
                    0 if at < body.len() => { body.remove(at); }
                    1 if at < body.len() => body[at] = byte,
                    _ => body.insert(at, byte),
                }
            }
            let fast = RequestMeta::parse_with("/v1/messages", &body, true);
            let slow = RequestMeta::parse_with("/v1/messages", &body, false);
            proptest::prop_assert_eq!(fast, slow, "{}", String::from_utf8_lossy(&body));
        }
    }

    #[test]
    fn get_or_parse_stores_once() {
        let mut req = Request::builder()
            .uri("/v1/messages")
            .body(bytes::Bytes::from_static(
                br#"{"model":"a","max_tokens":1,"messages":[]}"#,
            ))
            .unwrap();
        let m1 = RequestMeta::get_or_parse(&mut req);
        // Change the body: the stored meta is returned, proving no second parse.
        *req.body_mut() = bytes::Bytes::from_static(b"{}");
        let m2 = RequestMeta::get_or_parse(&mut req);
        assert_eq!(m1, m2);
        assert_eq!(Tenant::of(&req).as_str(), "default");
    }
}

/// Marks a response served from the response cache (a response extension set by
/// claude-cache, read by claude-cost to record the answer as saved money, not spent money).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheHit {
    /// The usage of the original answer that the hit replays.
    pub usage: crate::Usage,
    /// The model of the original answer, when known.
    pub model: Option<Arc<str>>,
    /// How long ago the answer was stored.
    pub age: std::time::Duration,
}

/// The attempt number of a request (1 for the first attempt, 2 for the first retry, …).
///
/// claude-retry inserts it into every attempt's request extensions, so inner layers can see
/// it, and into the final response's extensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Attempt(pub u32);

impl Attempt {
    /// The attempt number of a request (1 when no retry layer set one).
    pub fn of<B>(req: &Request<B>) -> u32 {
        req.extensions().get::<Self>().map_or(1, |a| a.0)
    }
}
