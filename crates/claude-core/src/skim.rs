//! The fast path of [`RequestMeta::parse`](crate::RequestMeta::parse): one strict pass over
//! a JSON object that validates all of it and keeps the raw text of the few top-level
//! members the meta reads.
//!
//! It answers only when it is sure to agree with the serde path it stands in for, and says
//! "ask serde" (`None`) otherwise: for a body that is not UTF-8, not an object, not valid
//! JSON, nested deeper than [`MAX_DEPTH`], with an escaped member name at the top level, or
//! with a member the meta reads given twice. So a body it accepts is one serde_json also
//! accepts (its checks are at least as strict: every string is checked for control
//! characters, escapes and UTF-8, every number against the JSON grammar, and a byte outside
//! a string can only be JSON punctuation, so the whole body is UTF-8),
//! and the raw texts it keeps are the ones serde's `RawValue` would borrow (the value
//! without the whitespace around it). A JSON `null` reads as an absent member, as serde's
//! `Option` does. Everything serde would reject, and everything unusual, goes to serde,
//! which then decides (and words the error) as before.

use memchr::memchr2;

/// Nesting beyond this goes to serde (whose own limit is 128).
const MAX_DEPTH: u32 = 100;

/// The raw texts of the top-level members the meta reads (`None`: absent or `null`).
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Members<'a> {
    pub(crate) model: Option<&'a [u8]>,
    pub(crate) max_tokens: Option<&'a [u8]>,
    pub(crate) stream: Option<&'a [u8]>,
    pub(crate) system: Option<&'a [u8]>,
    pub(crate) messages: Option<&'a [u8]>,
    pub(crate) tools: Option<&'a [u8]>,
}

/// The members of `body`, or `None` when serde should decide (see the module docs).
pub(crate) fn members(body: &[u8]) -> Option<Members<'_>> {
    let mut p = Skim { b: body, i: 0 };
    let mut out = Members::default();
    // Which members were seen (a repeat goes to serde, which calls it an error).
    let mut seen = [false; 6];
    p.ws();
    if p.peek()? != b'{' {
        return None;
    }
    p.members(|p, name, escaped| {
        if escaped {
            // An escaped name: serde decodes it before matching; let it.
            return None;
        }
        let at = p.i;
        p.value(1)?;
        let raw = &body[at..p.i];
        let slot = match name {
            b"model" => Some((0, &mut out.model)),
            b"max_tokens" => Some((1, &mut out.max_tokens)),
            b"stream" => Some((2, &mut out.stream)),
            b"system" => Some((3, &mut out.system)),
            b"messages" => Some((4, &mut out.messages)),
            b"tools" => Some((5, &mut out.tools)),
            _ => None,
        };
        if let Some((n, slot)) = slot {
            if std::mem::replace(&mut seen[n], true) {
                return None;
            }
            *slot = (raw != b"null").then_some(raw);
        }
        Some(())
    })?;
    p.ws();
    (p.i == body.len()).then_some(out)
}

/// A cursor over the body (also the validating skipper of the scanner's SSE fast path).
pub(crate) struct Skim<'a> {
    pub(crate) b: &'a [u8],
    pub(crate) i: usize,
}

impl<'a> Skim<'a> {
    pub(crate) fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    pub(crate) fn next(&mut self) -> Option<u8> {
        let c = self.peek()?;
        self.i += 1;
        Some(c)
    }

    pub(crate) fn eat(&mut self, c: u8) -> Option<()> {
        (self.next()? == c).then_some(())
    }

    pub(crate) fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.i += 1;
        }
    }

    /// One value (any whitespace before it already skipped), `depth` levels down.
    pub(crate) fn value(&mut self, depth: u32) -> Option<()> {
        match self.peek()? {
            b'"' => self.string().map(|_| ()),
            b'{' => self.object(depth + 1),
            b'[' => self.array(depth + 1),
            b't' => self.word(b"true"),
            b'f' => self.word(b"false"),
            b'n' => self.word(b"null"),
            b'-' | b'0'..=b'9' => self.number(),
            _ => None,
        }
    }

    pub(crate) fn word(&mut self, w: &[u8]) -> Option<()> {
        let end = self.i + w.len();
        (self.b.get(self.i..end)? == w).then(|| self.i = end)
    }

    fn object(&mut self, depth: u32) -> Option<()> {
        if depth > MAX_DEPTH {
            return None;
        }
        self.members(|p, _, _| p.value(depth))
    }

    /// The members of the object under the cursor (on its `{`), each validated: `member`
    /// gets the cursor on the member's value (which it must read), the raw text of its name
    /// between the quotes, and whether that name had an escape (then the raw text is not the
    /// name).
    pub(crate) fn members(
        &mut self,
        mut member: impl FnMut(&mut Self, &'a [u8], bool) -> Option<()>,
    ) -> Option<()> {
        self.i += 1;
        self.ws();
        if self.peek()? == b'}' {
            self.i += 1;
            return Some(());
        }
        loop {
            self.ws();
            if self.peek()? != b'"' {
                return None;
            }
            let start = self.i + 1;
            let escaped = self.string()?;
            let name = &self.b[start..self.i - 1];
            self.ws();
            self.eat(b':')?;
            self.ws();
            member(self, name, escaped)?;
            self.ws();
            match self.next()? {
                b',' => {}
                b'}' => return Some(()),
                _ => return None,
            }
        }
    }

    fn array(&mut self, depth: u32) -> Option<()> {
        if depth > MAX_DEPTH {
            return None;
        }
        self.i += 1;
        self.ws();
        if self.peek()? == b']' {
            self.i += 1;
            return Some(());
        }
        loop {
            self.ws();
            self.value(depth)?;
            self.ws();
            match self.next()? {
                b',' => {}
                b']' => return Some(()),
                _ => return None,
            }
        }
    }

    /// A string (the cursor on its opening quote); whether it had an escape.
    pub(crate) fn string(&mut self) -> Option<bool> {
        self.i += 1;
        // A short plain string (member names, roles, ids: printable ASCII, no escape) is
        // found eight bytes at a time, faster than memchr's set-up.
        let rest = &self.b[self.i..];
        if let Some(n) = crate::scan::string_stop_swar(&rest[..rest.len().min(32)], true)
            && rest[n] == b'"'
        {
            self.i += n + 1;
            return Some(false);
        }
        let mut escaped = false;
        loop {
            let rest = &self.b[self.i..];
            let n = memchr2(b'"', b'\\', rest)?;
            let run = &rest[..n];
            // Control characters must be escaped, and text must be UTF-8 (a quote or a
            // backslash never cuts a UTF-8 sequence).
            if !printable_ascii(run)
                && (run.iter().any(|&c| c < 0x20) || std::str::from_utf8(run).is_err())
            {
                return None;
            }
            self.i += n + 1;
            if rest[n] == b'"' {
                return Some(escaped);
            }
            escaped = true;
            match self.next()? {
                b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => {}
                b'u' => {
                    let end = self.i + 4;
                    if !self.b.get(self.i..end)?.iter().all(u8::is_ascii_hexdigit) {
                        return None;
                    }
                    self.i = end;
                }
                _ => return None,
            }
        }
    }

    /// `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`
    fn number(&mut self) -> Option<()> {
        if self.peek() == Some(b'-') {
            self.i += 1;
        }
        match self.next()? {
            b'0' => {}
            b'1'..=b'9' => self.digits(),
            _ => return None,
        }
        if self.peek() == Some(b'.') {
            self.i += 1;
            self.some_digits()?;
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.i += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.i += 1;
            }
            self.some_digits()?;
        }
        Some(())
    }

    fn digits(&mut self) {
        while let Some(b'0'..=b'9') = self.peek() {
            self.i += 1;
        }
    }

    fn some_digits(&mut self) -> Option<()> {
        let start = self.i;
        self.digits();
        (self.i > start).then_some(())
    }
}

/// Whether every byte is printable ASCII (`0x20..=0x7f`), eight at a time, without an early
/// exit (so a long run costs about a third of the first-stop search the scanner uses).
fn printable_ascii(run: &[u8]) -> bool {
    const ONES: u64 = u64::from_le_bytes([0x01; 8]);
    const HIGH: u64 = u64::from_le_bytes([0x80; 8]);
    let mut chunks = run.chunks_exact(8);
    let mut odd = 0;
    for c in &mut chunks {
        let mut w = [0; 8];
        w.copy_from_slice(c);
        let v = u64::from_le_bytes(w);
        // A high bit: a byte of 0x80 or more. Else every byte is below 0x80, and
        // `(v - 0x20 * ONES) & !v & HIGH` is non-zero exactly when one is below 0x20.
        odd |= (v | (v.wrapping_sub(0x20 * ONES) & !v)) & HIGH;
    }
    odd == 0
        && chunks
            .remainder()
            .iter()
            .all(|&c| (0x20..0x80).contains(&c))
}

/// Calls `f` with every one-byte edit of `base`: each byte deleted, and each of a set of
/// bytes that matter to JSON inserted before every position and put in place of every byte
/// (for differential tests of the hand-written readers against serde).
#[cfg(test)]
pub(crate) fn for_each_one_byte_edit(base: &[u8], mut f: impl FnMut(&[u8])) {
    const EDITS: &[u8] = b"{}[]\",:0123456789-.eEnul \t\n\\xa\x01\xc3";
    for at in 0..=base.len() {
        if at < base.len() {
            let mut v = base.to_vec();
            v.remove(at);
            f(&v);
        }
        for &b in EDITS {
            let mut v = base.to_vec();
            v.insert(at, b);
            f(&v);
            if at < base.len() {
                v.remove(at + 1);
                f(&v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printable_ascii_is_exact_at_every_position() {
        assert!(printable_ascii(b""));
        for len in 1..20 {
            for at in 0..len {
                for bad in [0x00, 0x1f, 0x80, 0xc3, 0xff] {
                    let mut run = vec![b'a'; len];
                    run[at] = bad;
                    assert!(!printable_ascii(&run), "{len} {at} {bad:#x}");
                    run[at] = 0x20;
                    assert!(printable_ascii(&run));
                }
            }
        }
    }

    #[test]
    fn keeps_the_raw_members_and_reads_null_as_absent() {
        let body = br#" { "model" : "m" , "max_tokens":12, "stream":null, "x":{"a":[1,-2.5e+3,true,false,null,"\u00e9\n"]},
            "system":"s", "messages":[ {"role":"user"} ], "tools" :[] } "#;
        let m = members(body).unwrap();
        assert_eq!(m.model, Some(&br#""m""#[..]));
        assert_eq!(m.max_tokens, Some(&b"12"[..]));
        assert_eq!(m.stream, None);
        assert_eq!(m.system, Some(&br#""s""#[..]));
        assert_eq!(m.messages, Some(&br#"[ {"role":"user"} ]"#[..]));
        assert_eq!(m.tools, Some(&b"[]"[..]));
        assert_eq!(members(b"{}"), Some(Members::default()));
    }

    #[test]
    fn anything_unusual_or_invalid_goes_to_serde() {
        for body in [
            &b""[..],
            b"[]",
            b"null",
            b"{",
            b"{} x",
            b"{\"a\":1,}",
            b"{\"a\" 1}",
            b"{\"a\":01}",
            b"{\"a\":1.}",
            b"{\"a\":1e}",
            b"{\"a\":-}",
            b"{\"a\":tru}",
            b"{\"a\":\"\x01\"}",
            b"{\"a\":\"\\x\"}",
            b"{\"a\":\"\\u12g4\"}",
            b"{\"a\":\"\xff\"}",
            b"{\"a\":\"0123456789abcdefghij\xc3\"}",
            b"{\"a\":1,\xc3\xa9:2}",
            b"{\"mod\\u0065l\":\"m\"}",
            b"{\"model\":\"a\",\"model\":\"b\"}",
            b"{\"model\":null,\"model\":\"b\"}",
            b"{\"a\":[1 2]}",
            b"{\"a\":{\"b\"}}",
        ] {
            assert_eq!(members(body), None, "{}", String::from_utf8_lossy(body));
        }
        let deep = format!("{{\"a\":{}{}}}", "[".repeat(100), "]".repeat(100));
        assert_eq!(members(deep.as_bytes()), None);
        let fine = format!("{{\"a\":{}{}}}", "[".repeat(99), "]".repeat(99));
        assert!(members(fine.as_bytes()).is_some());
    }
}
