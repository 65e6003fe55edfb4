//! Property tests of the usage scanner: any frame split of a stream gives the report of the
//! whole, and arbitrary bytes never panic.
//!
//! The fixtures in `tests/fixtures/` are built from the event shapes documented for the
//! Messages API (text with a 5m/1h cache-write split, a server-tool stream whose final
//! `message_delta` repeats the input side, thinking with CRLF line endings and an unknown
//! event, an `event: error` mid-stream).
#![allow(clippy::unwrap_used)]

use claude_core::scan::{BodyEnd, BodyFormat, UsageScanner, scan_all};
use proptest::prelude::*;

const FIXTURES: [(&str, &str); 4] = [
    ("text_cached", include_str!("fixtures/text_cached.sse")),
    ("server_tool", include_str!("fixtures/server_tool.sse")),
    ("thinking_crlf", include_str!("fixtures/thinking_crlf.sse")),
    (
        "midstream_error",
        include_str!("fixtures/midstream_error.sse"),
    ),
];

fn scan_split(format: BodyFormat, body: &[u8], cuts: &[usize]) -> claude_core::UsageReport {
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (body.len() + 1)).collect();
    cuts.sort_unstable();
    let mut s = UsageScanner::new(format);
    let mut at = 0;
    for c in cuts {
        s.feed(&body[at..c]);
        at = c;
    }
    s.feed(&body[at..]);
    s.finish(BodyEnd::Ended)
}

#[test]
fn fixtures_have_the_expected_usage() {
    let r = scan_all(BodyFormat::Sse, FIXTURES[0].1.as_bytes());
    assert!(r.is_complete_success());
    assert_eq!(r.usage.input_tokens, 2095);
    assert_eq!(r.usage.output_tokens, 503);
    assert_eq!(r.usage.cache_creation_input_tokens, 1800);
    assert_eq!(
        (r.usage.cache_write_5m(), r.usage.cache_write_1h()),
        (800, 1000)
    );
    assert_eq!(r.usage.cache_read_input_tokens, 12000);

    let r = scan_all(BodyFormat::Sse, FIXTURES[1].1.as_bytes());
    assert!(r.is_complete_success());
    assert_eq!(
        r.usage.input_tokens, 10682,
        "message_delta's cumulative input wins"
    );
    assert_eq!(r.usage.output_tokens, 510);
    assert_eq!(r.usage.server_tool_use.web_search_requests, 1);

    let r = scan_all(BodyFormat::Sse, FIXTURES[2].1.as_bytes());
    assert!(r.is_complete_success());
    assert_eq!((r.usage.input_tokens, r.usage.output_tokens), (40, 77));
    assert_eq!(r.model.as_deref(), Some("claude-haiku-4-5-20251001"));

    let r = scan_all(BodyFormat::Sse, FIXTURES[3].1.as_bytes());
    assert!(!r.is_complete_success());
    assert_eq!(r.error.as_ref().unwrap().error_type, "overloaded_error");
    assert_eq!(r.usage.input_tokens, 120);
    assert_eq!(r.usage.cache_read_input_tokens, 4000);
    assert_eq!(r.usage.output_tokens, 1, "lower bound from message_start");
}

#[test]
fn every_byte_by_byte_feed_matches() {
    for (name, body) in FIXTURES {
        let whole = scan_all(BodyFormat::Sse, body.as_bytes());
        let mut s = UsageScanner::new(BodyFormat::Sse);
        for b in body.as_bytes() {
            s.feed(std::slice::from_ref(b));
        }
        assert_eq!(s.finish(BodyEnd::Ended), whole, "{name}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn any_split_of_a_fixture_gives_the_same_report(
        which in 0..FIXTURES.len(),
        cuts in proptest::collection::vec(any::<usize>(), 0..40),
    ) {
        let body = FIXTURES[which].1.as_bytes();
        let whole = scan_all(BodyFormat::Sse, body);
        prop_assert_eq!(scan_split(BodyFormat::Sse, body, &cuts), whole);
    }

    #[test]
    fn any_split_of_a_json_answer_gives_the_same_report(
        text in "[ -~]{0,300}",
        input in 0u64..1_000_000,
        output in 0u64..100_000,
        cuts in proptest::collection::vec(any::<usize>(), 0..20),
    ) {
        let body = serde_json::json!({
            "id": "msg", "type": "message", "model": "claude-opus-4-5",
            "content": [{"type": "text", "text": text}],
            "usage": {"input_tokens": input, "output_tokens": output},
        })
        .to_string();
        let whole = scan_all(BodyFormat::Json, body.as_bytes());
        prop_assert_eq!(whole.usage.input_tokens, input);
        prop_assert_eq!(whole.usage.output_tokens, output);
        prop_assert!(whole.completed);
        prop_assert_eq!(scan_split(BodyFormat::Json, body.as_bytes(), &cuts), whole);
    }

    #[test]
    fn arbitrary_bytes_never_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..4096),
        cuts in proptest::collection::vec(any::<usize>(), 0..10),
    ) {
        for format in [BodyFormat::Sse, BodyFormat::Json] {
            let r = scan_split(format, &bytes, &cuts);
            prop_assert_eq!(r.body_bytes, bytes.len() as u64);
        }
    }

    #[test]
    fn mutated_fixtures_never_panic(
        which in 0..FIXTURES.len(),
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..20),
    ) {
        let mut body = FIXTURES[which].1.as_bytes().to_vec();
        let n = body.len();
        for (at, b) in flips {
            body[at % n] = b;
        }
        let _ = scan_all(BodyFormat::Sse, &body);
        let _ = scan_all(BodyFormat::Json, &body);
    }
}
