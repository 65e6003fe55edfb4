//! Feeds arbitrary bytes, split at an arbitrary point, to both scanner formats.
#![no_main]

use claude_core::scan::{BodyEnd, BodyFormat, UsageScanner};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let cut = data.first().map_or(0, |b| usize::from(*b)) % (data.len() + 1);
    for format in [BodyFormat::Sse, BodyFormat::Json] {
        let mut s = UsageScanner::new(format);
        s.feed(&data[..cut]);
        s.feed(&data[cut..]);
        let r = s.finish(BodyEnd::Ended);
        assert_eq!(r.body_bytes, data.len() as u64);
    }
});
