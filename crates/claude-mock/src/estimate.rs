//! Request validation and the deterministic input-token estimate.

use serde::Deserialize;
use serde_json::value::RawValue;

/// The top-level fields the mock reads, borrowed from the body without building a DOM.
#[derive(Deserialize)]
struct Fields<'a> {
    #[serde(borrow, default)]
    model: Option<&'a RawValue>,
    #[serde(borrow, default)]
    max_tokens: Option<&'a RawValue>,
    #[serde(borrow, default)]
    messages: Option<&'a RawValue>,
    #[serde(borrow, default)]
    system: Option<&'a RawValue>,
    #[serde(borrow, default)]
    tools: Option<&'a RawValue>,
    #[serde(borrow, default)]
    stream: Option<&'a RawValue>,
}

/// What the mock needs from a valid request body.
#[derive(Debug)]
pub(crate) struct ParsedRequest<'a> {
    /// The `model` value as a JSON string literal, quotes and escapes included, so it can be
    /// written back verbatim.
    pub(crate) model_json: &'a str,
    /// `max_tokens` (`None` only for count_tokens, where it is not required).
    pub(crate) max_tokens: Option<u64>,
    /// `"stream": true`.
    pub(crate) stream: bool,
    /// The estimated input tokens.
    pub(crate) input_tokens: u64,
}

/// ceil(bytes / 4), at least 1.
pub(crate) fn tokens_for_bytes(bytes: usize) -> u64 {
    (bytes as u64).div_ceil(4).max(1)
}

fn raw_len(value: Option<&RawValue>) -> usize {
    value.map_or(0, |raw| raw.get().len())
}

fn parse_fields(body: &[u8]) -> Result<Fields<'_>, String> {
    // A JSON array would deserialize positionally into the struct: reject anything that is
    // not an object up front.
    match body.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => {}
        _ => return Err("request body must be a JSON object".to_owned()),
    }
    serde_json::from_slice::<Fields<'_>>(body)
        .map_err(|e| format!("request body is not valid JSON: {e}"))
}

/// Validates a Messages (`need_max_tokens`) or count_tokens body and estimates its input
/// tokens. The error is the message of a 400 `invalid_request_error`.
pub(crate) fn parse_request(
    body: &[u8],
    need_max_tokens: bool,
) -> Result<ParsedRequest<'_>, String> {
    let fields = parse_fields(body)?;

    let model_json = match fields.model {
        None => return Err("model: Field required".to_owned()),
        Some(raw) if raw.get().starts_with('"') => raw.get(),
        Some(_) => return Err("model: Input should be a valid string".to_owned()),
    };

    let max_tokens = match fields.max_tokens {
        None if need_max_tokens => return Err("max_tokens: Field required".to_owned()),
        None => None,
        Some(raw) => match raw.get().parse::<u64>() {
            Ok(n) if n > 0 => Some(n),
            _ if !need_max_tokens => None,
            _ => return Err("max_tokens: Input should be a positive integer".to_owned()),
        },
    };

    match fields.messages {
        None => return Err("messages: Field required".to_owned()),
        Some(raw) if raw.get().starts_with('[') => {}
        Some(_) => return Err("messages: Input should be a valid array".to_owned()),
    }

    let stream = match fields.stream.map(RawValue::get) {
        None | Some("false") => false,
        Some("true") => true,
        Some(_) => return Err("stream: Input should be a valid boolean".to_owned()),
    };

    let bytes = raw_len(fields.system) + raw_len(fields.messages) + raw_len(fields.tools);
    Ok(ParsedRequest {
        model_json,
        max_tokens,
        stream,
        input_tokens: tokens_for_bytes(bytes),
    })
}

/// The mock's input-token estimate for a request body: `ceil(B / 4)`, at least 1, where `B`
/// is the sum of the byte lengths of the raw JSON texts of the top-level `system`,
/// `messages` and `tools` values exactly as they appear in the body (an absent or `null`
/// value counts 0 bytes). See the crate docs.
///
/// Returns `None` when the body is not a JSON object. It does not check the other fields.
pub fn estimate_input_tokens(body: &[u8]) -> Option<u64> {
    let fields = parse_fields(body).ok()?;
    let bytes = raw_len(fields.system) + raw_len(fields.messages) + raw_len(fields.tools);
    Some(tokens_for_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimate_counts_raw_bytes_of_three_fields() {
        // messages raw = [{"role":"user","content":"hi"}] = 32 bytes -> 8 tokens
        let body = br#"{"model":"m","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}"#;
        let parsed = parse_request(body, true).unwrap();
        assert_eq!(parsed.input_tokens, 8);
        assert_eq!(parsed.max_tokens, Some(5));
        assert_eq!(parsed.model_json, "\"m\"");
        assert!(!parsed.stream);

        // whitespace inside values counts, around them does not; system "abc" is 5 bytes,
        // tools [ 1 ] is 5 bytes, messages [] is 2 bytes: 12 bytes -> 3 tokens
        let body = br#"{ "system" :  "abc" , "tools": [ 1 ], "messages":[], "model":"m", "max_tokens": 1, "stream": true }"#;
        let parsed = parse_request(body, true).unwrap();
        assert_eq!(parsed.input_tokens, 3);
        assert!(parsed.stream);
        assert_eq!(estimate_input_tokens(body), Some(3));

        // 13 bytes -> 4 tokens (ceil)
        let body = br#"{"system":"abcd","tools":[ 1 ],"messages":[],"model":"m"}"#;
        assert_eq!(estimate_input_tokens(body), Some(4));

        // minimum 1
        assert_eq!(estimate_input_tokens(b"{}"), Some(1));
        assert_eq!(estimate_input_tokens(b"[]"), None);
    }

    #[test]
    fn validation_names_the_problem() {
        let cases: [(&[u8], &str); 9] = [
            (b"", "JSON object"),
            (b"[1]", "JSON object"),
            (b"{", "not valid JSON"),
            (
                br#"{"max_tokens":1,"messages":[]}"#,
                "model: Field required",
            ),
            (br#"{"model":1,"max_tokens":1,"messages":[]}"#, "model:"),
            (
                br#"{"model":"m","messages":[]}"#,
                "max_tokens: Field required",
            ),
            (
                br#"{"model":"m","max_tokens":0,"messages":[]}"#,
                "max_tokens:",
            ),
            (
                br#"{"model":"m","max_tokens":1.5,"messages":[]}"#,
                "max_tokens:",
            ),
            (
                br#"{"model":"m","max_tokens":1,"messages":{}}"#,
                "messages:",
            ),
        ];
        for (body, needle) in cases {
            let err = parse_request(body, true).unwrap_err();
            assert!(err.contains(needle), "{err} should mention {needle}");
        }
        let err = parse_request(
            br#"{"model":"m","max_tokens":1,"messages":[],"stream":"yes"}"#,
            true,
        )
        .unwrap_err();
        assert!(err.contains("stream:"));
        // count_tokens: max_tokens not required
        assert!(parse_request(br#"{"model":"m","messages":[]}"#, false).is_ok());
        assert!(parse_request(br#"{"model":"m"}"#, false).is_err());
    }
}
