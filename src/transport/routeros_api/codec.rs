//! The RouterOS API's wire format and command text, pure and table-tested: a sentence
//! is a list of length-prefixed words ended by an empty word ([`encode_sentence`],
//! [`SentenceDecoder`]); the command text schemes render (one command per line in the
//! API's word syntax) is split into words by [`parse_command`]; `?` queries on actions
//! become a print and an action ([`split_find`]); replies are rendered in the shape the
//! RouterOS CLI prints; the pre-6.43 MD5 login answer ([`md5_login_response`]).

use md5::{Digest, Md5};

/// Longest word accepted from a device. Real replies are a few KiB at most; the cap
/// keeps a broken or hostile peer from making us buffer without bound.
pub const MAX_WORD_LEN: usize = 16 * 1024 * 1024;

/// Longest word accepted in command text: far beyond any real value, and it keeps
/// `encode_length`'s saturation below unreachable from a command line.
const MAX_COMMAND_WORD_LEN: usize = 1024 * 1024;

/// The length prefix of a word: 1 to 4 bytes with the high bits telling the size, or
/// `0xF0` and 4 bytes for lengths from `0x10000000` on.
pub fn encode_length(n: usize) -> Vec<u8> {
    if n < 0x80 {
        vec![n as u8]
    } else if n < 0x4000 {
        let v = (n as u32) | 0x8000;
        v.to_be_bytes()[2..].to_vec()
    } else if n < 0x20_0000 {
        let v = (n as u32) | 0xC0_0000;
        v.to_be_bytes()[1..].to_vec()
    } else if n < 0x1000_0000 {
        ((n as u32) | 0xE000_0000).to_be_bytes().to_vec()
    } else {
        // The format cannot express more than u32::MAX; such a word can never be built
        // from command text (MAX_COMMAND_WORD_LEN), so saturating is never reached.
        let v = u32::try_from(n).unwrap_or(u32::MAX);
        let mut out = vec![0xF0];
        out.extend_from_slice(&v.to_be_bytes());
        out
    }
}

/// Reads a length prefix from the start of `bytes`: `Ok(Some((length, prefix_len)))`,
/// `Ok(None)` when more bytes are needed, or an error for a control byte (`0xF8`..)
/// or a reserved one, which the API never uses inside a sentence.
pub fn decode_length(bytes: &[u8]) -> Result<Option<(usize, usize)>, String> {
    let Some(&first) = bytes.first() else {
        return Ok(None);
    };
    let (size, mask): (usize, u32) = match first {
        0x00..=0x7F => (1, 0xFF),
        0x80..=0xBF => (2, 0x3FFF),
        0xC0..=0xDF => (3, 0x1F_FFFF),
        0xE0..=0xEF => (4, 0x0FFF_FFFF),
        0xF0 => (5, u32::MAX),
        other => return Err(format!("invalid length prefix byte 0x{other:02x}")),
    };
    if bytes.len() < size {
        return Ok(None);
    }
    // For 0xF0 the value is the 4 bytes after the marker; otherwise the marker bits are
    // part of the first byte and masked off.
    let value_bytes = if size == 5 {
        &bytes[1..5]
    } else {
        &bytes[..size]
    };
    let value = value_bytes
        .iter()
        .fold(0u32, |acc, b| (acc << 8) | u32::from(*b))
        & mask;
    Ok(Some((value as usize, size)))
}

/// One word: length prefix and UTF-8 bytes.
pub fn encode_word(word: &str) -> Vec<u8> {
    let mut out = encode_length(word.len());
    out.extend_from_slice(word.as_bytes());
    out
}

/// A whole sentence, ended by the empty word.
pub fn encode_sentence(words: &[String]) -> Vec<u8> {
    let mut out = Vec::with_capacity(words.iter().map(|w| w.len() + 2).sum::<usize>() + 1);
    for word in words {
        out.extend_from_slice(&encode_word(word));
    }
    out.push(0);
    out
}

/// Reassembles sentences from bytes as they arrive, split anywhere.
#[derive(Debug, Default)]
pub struct SentenceDecoder {
    buf: Vec<u8>,
    /// Bytes of `buf` already consumed; compacted lazily so many small words in one
    /// read do not cost a copy each.
    pos: usize,
    /// Words of the sentence being assembled.
    words: Vec<String>,
}

impl SentenceDecoder {
    pub fn new() -> SentenceDecoder {
        SentenceDecoder::default()
    }

    pub fn push(&mut self, bytes: &[u8]) {
        if self.pos > 0 && self.pos * 2 >= self.buf.len() {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete sentence, `None` until one is complete. An error means the
    /// stream is out of step; the decoder must then be discarded with its connection.
    pub fn next_sentence(&mut self) -> Result<Option<Vec<String>>, String> {
        loop {
            let rest = &self.buf[self.pos..];
            let Some((len, prefix)) = decode_length(rest)? else {
                return Ok(None);
            };
            if len > MAX_WORD_LEN {
                return Err(format!("word of {len} bytes is longer than {MAX_WORD_LEN}"));
            }
            if len == 0 {
                self.pos += prefix;
                return Ok(Some(std::mem::take(&mut self.words)));
            }
            if rest.len() < prefix + len {
                return Ok(None);
            }
            // Devices may carry comments in a legacy 8-bit charset: show them lossily
            // rather than fail the whole session over one byte.
            let word = String::from_utf8_lossy(&rest[prefix..prefix + len]).into_owned();
            self.pos += prefix + len;
            self.words.push(word);
        }
    }

    /// Bytes received but not yet part of a returned sentence.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.pos
    }
}

/// Splits one command line into API words on unquoted whitespace. A double-quoted part
/// (as the RouterOS scheme dialect renders values) is unquoted with the escapes `\"`,
/// `\\`, `\$`, `\?`, `\n`, `\r`, `\t`, and stays inside its word whatever it contains.
///
/// Refused, so that nothing ambiguous reaches a device: unterminated quotes, unknown
/// escapes, a backslash or control character outside quotes, empty words (an empty
/// word ends a sentence early), a first word that is not a `/command`, later words
/// that are not `=attribute`, `?query` or `.api` words, and `.tag` (nasd sets it).
pub fn parse_command(text: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            break;
        }
        let mut word = String::new();
        while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
            match c {
                '"' => loop {
                    match chars.next() {
                        None => return Err("unterminated double quote".to_string()),
                        Some('"') => break,
                        Some('\\') => word.push(match chars.next() {
                            Some(e @ ('"' | '\\' | '$' | '?')) => e,
                            Some('n') => '\n',
                            Some('r') => '\r',
                            Some('t') => '\t',
                            Some(other) => {
                                return Err(format!("unknown escape `\\{other}` in quotes"));
                            }
                            None => return Err("unterminated double quote".to_string()),
                        }),
                        Some(inner) => word.push(inner),
                    }
                },
                '\\' => {
                    return Err("backslash outside double quotes (quote the value)".to_string());
                }
                c if c.is_control() => {
                    return Err(format!(
                        "control character U+{:04X} outside double quotes",
                        u32::from(c)
                    ));
                }
                c => word.push(c),
            }
        }
        if word.len() > MAX_COMMAND_WORD_LEN {
            return Err(format!(
                "word of {} bytes is longer than {MAX_COMMAND_WORD_LEN}",
                word.len()
            ));
        }
        words.push(word);
    }
    let Some(first) = words.first() else {
        return Err("empty command".to_string());
    };
    let command_ok = first.len() > 1
        && first.starts_with('/')
        && first
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '-' | '_' | '.'));
    if !command_ok {
        return Err(format!(
            "`{first}` is not a command word such as /ip/firewall/address-list/add"
        ));
    }
    for word in &words[1..] {
        if word.is_empty() {
            return Err("empty word (it would end the sentence early)".to_string());
        }
        if word.starts_with(".tag=") {
            return Err("`.tag` is set by nasd, not by the command".to_string());
        }
        if !matches!(word.as_bytes()[0], b'=' | b'?' | b'.') {
            return Err(format!(
                "`{word}` is neither an =attribute, a ?query nor an .api word"
            ));
        }
    }
    Ok(words)
}

/// The pre-6.43 login answer: `00` + hex(MD5(0x00 + password + challenge bytes)).
/// The API has no `[find ...]`: a `remove`, `set`, `enable` or `disable` written with
/// `?` query words (`/ip/firewall/address-list/remove ?comment=crb_10.0.0.1`) becomes a
/// `print` of the matching `.id`s and then the action on those ids. Returns the print
/// sentence and the action without its queries, or None for an ordinary command.
pub fn split_find(words: &[String]) -> Option<(Vec<String>, Vec<String>)> {
    let command = words.first()?;
    let (menu, verb) = command.rsplit_once('/')?;
    if !matches!(verb, "remove" | "set" | "enable" | "disable") {
        return None;
    }
    let queries: Vec<String> = words[1..]
        .iter()
        .filter(|w| w.starts_with('?'))
        .cloned()
        .collect();
    if queries.is_empty()
        || words
            .iter()
            .any(|w| w.starts_with("=.id=") || w.starts_with("=numbers="))
    {
        return None;
    }
    let mut print = vec![format!("{menu}/print"), "=.proplist=.id".to_string()];
    print.extend(queries);
    let action = words
        .iter()
        .filter(|w| !w.starts_with('?'))
        .cloned()
        .collect();
    Some((print, action))
}

/// The `.id` values in the text lines `execute` makes of `!re` replies.
pub(super) fn ids_of(listed: &str) -> Vec<String> {
    listed
        .lines()
        .flat_map(str::split_whitespace)
        .filter_map(|w| w.strip_prefix(".id="))
        .map(str::to_string)
        .collect()
}

pub fn md5_login_response(password: &str, challenge_hex: &str) -> Result<String, String> {
    let challenge = hex_decode(challenge_hex)?;
    let mut hasher = Md5::new();
    hasher.update([0u8]);
    hasher.update(password.as_bytes());
    hasher.update(&challenge);
    let digest = hasher.finalize();
    let mut out = String::with_capacity(34);
    out.push_str("00");
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    Ok(out)
}

fn hex_decode(text: &str) -> Result<Vec<u8>, String> {
    if text.is_empty() || !text.len().is_multiple_of(2) {
        return Err(format!(
            "login challenge is not an even-length hex string ({} chars)",
            text.len()
        ));
    }
    let digit = |c: u8| -> Result<u8, String> {
        (c as char)
            .to_digit(16)
            .map(|d| d as u8)
            .ok_or_else(|| "login challenge contains a non-hex character".to_string())
    };
    text.as_bytes()
        .chunks(2)
        .map(|pair| Ok((digit(pair[0])? << 4) | digit(pair[1])?))
        .collect()
}

/// The value of attribute `=key=value` in a reply sentence.
pub(super) fn attribute<'a>(sentence: &'a [String], key: &str) -> Option<&'a str> {
    sentence[1..].iter().find_map(|w| {
        w.strip_prefix('=')
            .and_then(|rest| rest.strip_prefix(key))
            .and_then(|rest| rest.strip_prefix('='))
    })
}

/// `!fatal` carries its reason as a bare word (some versions as `=message=`).
pub(super) fn fatal_message(sentence: &[String]) -> String {
    attribute(sentence, "message")
        .map(str::to_string)
        .or_else(|| sentence[1..].iter().find(|w| !w.starts_with('.')).cloned())
        .unwrap_or_else(|| "!fatal without a reason".to_string())
}

/// The line a `!trap` adds to the output. RouterOS already starts some messages with
/// `failure: ` (`failure: already have such entry`), as the CLI prints them; those are
/// not prefixed twice.
pub(super) fn trap_line(sentence: &[String]) -> String {
    let message = attribute(sentence, "message").unwrap_or("unknown error");
    if message.starts_with("failure:") {
        message.to_string()
    } else {
        format!("failure: {message}")
    }
}

/// `!re` as the CLI's `print as-value` would show it: `key=value` pairs.
pub(super) fn re_line(sentence: &[String]) -> String {
    sentence[1..]
        .iter()
        .filter_map(|w| w.strip_prefix('='))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const LENGTH_VECTORS: &[(usize, &[u8])] = &[
        (0, &[0x00]),
        (1, &[0x01]),
        (0x7F, &[0x7F]),
        (0x80, &[0x80, 0x80]),
        (0x3FFF, &[0xBF, 0xFF]),
        (0x4000, &[0xC0, 0x40, 0x00]),
        (0x1F_FFFF, &[0xDF, 0xFF, 0xFF]),
        (0x20_0000, &[0xE0, 0x20, 0x00, 0x00]),
        (0x0FFF_FFFF, &[0xEF, 0xFF, 0xFF, 0xFF]),
        (0x1000_0000, &[0xF0, 0x10, 0x00, 0x00, 0x00]),
        (0xFFFF_FFFF, &[0xF0, 0xFF, 0xFF, 0xFF, 0xFF]),
    ];

    #[test]
    fn length_golden_vectors_encode_and_decode() {
        for (n, bytes) in LENGTH_VECTORS {
            assert_eq!(encode_length(*n), bytes.to_vec(), "encode {n:#x}");
            assert_eq!(
                decode_length(bytes),
                Ok(Some((*n, bytes.len()))),
                "decode {n:#x}"
            );
            // Every proper prefix asks for more bytes instead of guessing.
            for cut in 0..bytes.len() {
                assert_eq!(decode_length(&bytes[..cut]), Ok(None), "{n:#x} cut {cut}");
            }
            // Trailing bytes are not part of the length.
            let mut longer = bytes.to_vec();
            longer.push(0x41);
            assert_eq!(decode_length(&longer), Ok(Some((*n, bytes.len()))));
        }
    }

    #[test]
    fn control_bytes_are_refused() {
        for b in [0xF1u8, 0xF8, 0xFF] {
            assert!(decode_length(&[b, 0, 0, 0, 0]).is_err(), "{b:#x}");
        }
    }

    #[test]
    fn words_and_sentences_match_librouteros() {
        // librouteros: encode_sentence('/ip/x', '=a=b', '.tag=1', encoding='utf-8')
        let words: Vec<String> = ["/ip/x", "=a=b", ".tag=1"].map(String::from).to_vec();
        let hex: String = encode_sentence(&words)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(hex, "052f69702f78043d613d62062e7461673d3100");
        let long = "x".repeat(0x80);
        assert_eq!(&encode_word(&long)[..2], &[0x80, 0x80]);
        assert_eq!(encode_word("").as_slice(), &[0x00]);
    }

    #[test]
    fn decoder_handles_each_length_class() {
        for n in [0usize, 1, 0x7F, 0x80, 0x3FFF, 0x4000, 0x1F_FFFF, 0x20_0000] {
            let word = "a".repeat(n);
            let words = if n == 0 {
                vec!["!re".to_string()]
            } else {
                vec!["!re".to_string(), word.clone()]
            };
            let mut d = SentenceDecoder::new();
            d.push(&encode_sentence(&words));
            assert_eq!(d.next_sentence(), Ok(Some(words)), "length {n:#x}");
            assert_eq!(d.next_sentence(), Ok(None));
            assert_eq!(d.pending(), 0);
        }
    }

    #[test]
    fn decoder_refuses_oversized_words() {
        let mut d = SentenceDecoder::new();
        d.push(&[0xF0, 0x7F, 0xFF, 0xFF, 0xFF]);
        assert!(d.next_sentence().is_err());
    }

    #[test]
    fn decoder_byte_by_byte_and_back_to_back() {
        let a: Vec<String> = ["!re", "=address=10.0.0.1", ".tag=7"]
            .map(String::from)
            .to_vec();
        let b: Vec<String> = ["!done", ".tag=7"].map(String::from).to_vec();
        let mut bytes = encode_sentence(&a);
        bytes.extend(encode_sentence(&b));
        let mut d = SentenceDecoder::new();
        let mut got = Vec::new();
        for byte in &bytes {
            d.push(&[*byte]);
            while let Some(s) = d.next_sentence().expect("valid stream") {
                got.push(s);
            }
        }
        assert_eq!(got, vec![a, b]);
    }

    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    #[test]
    fn random_sentences_survive_random_splits() {
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
        let alphabet: Vec<char> = "ab=?.!/ -_0\u{e9}\u{416}\u{1F600}\n\0".chars().collect();
        for round in 0..300 {
            let mut sentences = Vec::new();
            for _ in 0..1 + rng.below(4) {
                let mut words = Vec::new();
                for _ in 0..1 + rng.below(6) {
                    // Mostly short words, sometimes across the 1/2/3-byte boundaries.
                    let len = match rng.below(10) {
                        0 => 0x7F + rng.below(3) as usize,
                        1 => 0x3FFF + rng.below(3) as usize,
                        2 if round % 20 == 0 => 0x1F_FFFF + rng.below(3) as usize,
                        _ => 1 + rng.below(20) as usize,
                    };
                    let mut pick = || alphabet[rng.below(alphabet.len() as u64) as usize];
                    // Long words repeat one character: their job is the length prefix,
                    // and drawing millions of characters would only slow the test.
                    let word: String = if len > 100 {
                        pick().to_string().repeat(len)
                    } else {
                        (0..len).map(|_| pick()).collect()
                    };
                    words.push(word);
                }
                sentences.push(words);
            }
            let mut bytes = Vec::new();
            for s in &sentences {
                bytes.extend(encode_sentence(s));
            }
            let mut d = SentenceDecoder::new();
            let mut got = Vec::new();
            let mut at = 0;
            while at < bytes.len() {
                let max_step = if rng.below(2) == 0 { 7 } else { 5000 };
                let step = 1 + rng.below(max_step) as usize;
                let end = (at + step).min(bytes.len());
                d.push(&bytes[at..end]);
                at = end;
                while let Some(s) = d.next_sentence().expect("valid stream") {
                    got.push(s);
                }
            }
            assert_eq!(got, sentences, "round {round}");
            assert_eq!(d.pending(), 0);
        }
    }

    fn words(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn parse_command_table() {
        let ok: &[(&str, &[&str])] = &[
            (
                "/ip/firewall/address-list/add =list=allowed =address=10.88.0.2 =comment=crb_10.88.0.2",
                &[
                    "/ip/firewall/address-list/add",
                    "=list=allowed",
                    "=address=10.88.0.2",
                    "=comment=crb_10.88.0.2",
                ],
            ),
            (
                "/ip/firewall/address-list/print ?address=10.88.0.2",
                &["/ip/firewall/address-list/print", "?address=10.88.0.2"],
            ),
            ("  /system/identity/print  ", &["/system/identity/print"]),
            ("/a/add\t=x=1   =y=2", &["/a/add", "=x=1", "=y=2"]),
            (
                r#"/a/add =comment="x; /system reset""#,
                &["/a/add", "=comment=x; /system reset"],
            ),
            (r#"/a/add =comment="""#, &["/a/add", "=comment="]),
            (
                r#"/a/add =comment="q\"uote \\ \$HOME \? a\nb\rc\td""#,
                &["/a/add", "=comment=q\"uote \\ $HOME ? a\nb\rc\td"],
            ),
            (
                r#"/a/add "=comment=whole word quoted""#,
                &["/a/add", "=comment=whole word quoted"],
            ),
            (
                r#"/a/add =comment="a"b"c d""#,
                &["/a/add", "=comment=abc d"],
            ),
            (
                "/a/remove =.id=*1A =.proplist=address,list",
                &["/a/remove", "=.id=*1A", "=.proplist=address,list"],
            ),
            (
                "/a/add =comment=\"\u{416}\u{1F600}\"",
                &["/a/add", "=comment=\u{416}\u{1F600}"],
            ),
        ];
        for (text, expected) in ok {
            assert_eq!(parse_command(text), Ok(words(expected)), "{text}");
        }
    }

    #[test]
    fn parse_command_refuses_injection_and_malformed_text() {
        let bad: &[&str] = &[
            "",
            "   ",
            // A second command smuggled by an unquoted value.
            "/a/add =comment=x /system/reset",
            "/a/add =comment=x; /system/reset",
            "/a/add =comment=\"x\" /system/reset",
            // A newline is whitespace, not a way to start a second sentence.
            "/a/add =comment=x\n/system/reset",
            // An escaped quote does not close the string.
            r#"/a/add =comment="x\""#,
            r#"/a/add =comment="x"#,
            r#"/a/add =comment="x\"#,
            // An empty word would end the sentence and start another one.
            r#"/a/add "" /system/reset"#,
            r#"/a/add """#,
            // Our tag is ours.
            "/a/print .tag=5",
            // Unknown escape and bare backslash.
            r#"/a/add =comment="\x41""#,
            r"/a/add =comment=a\ b",
            // Control characters outside quotes.
            "/a/add =comment=a\u{7}b",
            // Not a command word.
            "ip/firewall/address-list/add",
            "/",
            "\"/system reset\"",
            "=list=x",
        ];
        for text in bad {
            assert!(parse_command(text).is_err(), "accepted {text:?}");
        }
        // Whatever quoting is used, an injected command stays inside the value.
        let w = parse_command(r#"/a/add =comment="\"; /system reset; \"""#).expect("quoted");
        assert_eq!(w, words(&["/a/add", "=comment=\"; /system reset; \""]));
        let w = parse_command("/a/add =comment=\"a\n/system/reset\"").expect("quoted");
        assert_eq!(w, words(&["/a/add", "=comment=a\n/system/reset"]));
    }

    #[test]
    fn md5_login_response_matches_librouteros() {
        // librouteros.login.encode_password(token, password)
        assert_eq!(
            md5_login_response("secret", "ebddd18303a54111e2dea05a92ab46b4").as_deref(),
            Ok("007319531c22b6b85e160d6ac355c1df2e")
        );
        assert_eq!(
            md5_login_response("", "00112233445566778899AABBCCDDEEFF").as_deref(),
            Ok("004fc766996a2175c8d712275fb6a3cb31")
        );
        for bad in ["", "abc", "zz", "0g"] {
            let err = md5_login_response("hunter2", bad).expect_err(bad);
            assert!(!err.contains("hunter2"), "{err}");
        }
    }

    #[test]
    fn replies_render_like_the_cli() {
        let re = words(&[
            "!re",
            "=.id=*1",
            "=list=allowed",
            "=address=10.0.0.1",
            ".tag=3",
        ]);
        assert_eq!(re_line(&re), ".id=*1 list=allowed address=10.0.0.1");
        let trap = words(&["!trap", "=message=no such item", ".tag=3"]);
        assert_eq!(trap_line(&trap), "failure: no such item");
        let trap = words(&[
            "!trap",
            "=category=1",
            "=message=failure: already have such entry",
        ]);
        assert_eq!(trap_line(&trap), "failure: already have such entry");
        let fatal = words(&["!fatal", "session terminated on request"]);
        assert_eq!(fatal_message(&fatal), "session terminated on request");
        assert_eq!(attribute(&words(&["!done", "=ret=*5"]), "ret"), Some("*5"));
        assert_eq!(attribute(&words(&["!done", "=return=x"]), "ret"), None);
    }

    #[test]
    fn find_queries_become_print_then_action() {
        let w = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let (print, action) = split_find(&w(&[
            "/ip/firewall/address-list/remove",
            "?comment=crb_10.0.0.1",
        ]))
        .unwrap();
        assert_eq!(
            print,
            w(&[
                "/ip/firewall/address-list/print",
                "=.proplist=.id",
                "?comment=crb_10.0.0.1"
            ])
        );
        assert_eq!(action, w(&["/ip/firewall/address-list/remove"]));
        let (print, action) = split_find(&w(&[
            "/queue/simple/set",
            "=max-limit=1k/1k",
            "?name=crb_x",
        ]))
        .unwrap();
        assert_eq!(
            print,
            w(&["/queue/simple/print", "=.proplist=.id", "?name=crb_x"])
        );
        assert_eq!(action, w(&["/queue/simple/set", "=max-limit=1k/1k"]));
        assert!(split_find(&w(&["/ip/firewall/address-list/add", "=list=a"])).is_none());
        assert!(split_find(&w(&["/ip/firewall/address-list/remove", "=.id=*1"])).is_none());
        assert!(split_find(&w(&["/ip/firewall/address-list/print", "?list=a"])).is_none());
        assert_eq!(ids_of(".id=*1\n.id=*A list=x"), w(&["*1", "*A"]));
    }
}
