//! The request text a scheme renders, in radclient's input style
//! (`coa User-Name = "u", Mikrotik-Rate-Limit = "10M/10M"`): parsed against a
//! `Dictionary` into typed attributes, and printed back as a radclient command line.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

use super::dictionary::{AttrDef, AttrType, Dictionary, parse_number};
use super::{COA_REQUEST, DISCONNECT_REQUEST, MESSAGE_AUTHENTICATOR};

/// CoA-Request or Disconnect-Request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    Coa,
    Disconnect,
}

impl RequestKind {
    pub fn code(self) -> u8 {
        match self {
            RequestKind::Coa => COA_REQUEST,
            RequestKind::Disconnect => DISCONNECT_REQUEST,
        }
    }

    /// The packet type word radclient takes on its command line.
    pub fn word(self) -> &'static str {
        match self {
            RequestKind::Coa => "coa",
            RequestKind::Disconnect => "disconnect",
        }
    }
}

/// An attribute value, already checked against its dictionary type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Text(String),
    Octets(Vec<u8>),
    Integer(u32),
    Ip(Ipv4Addr),
}

impl Value {
    pub(super) fn bytes(&self) -> Vec<u8> {
        match self {
            Value::Text(s) => s.as_bytes().to_vec(),
            Value::Octets(b) => b.clone(),
            Value::Integer(n) => n.to_be_bytes().to_vec(),
            Value::Ip(ip) => ip.octets().to_vec(),
        }
    }
}

/// One `Name = value` of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attribute {
    pub def: AttrDef,
    pub value: Value,
    /// The value as radclient reads it (quoted string, VALUE name, `0x` hex, ...).
    pub shown: String,
}

/// A parsed request: what to send, before identifier and secret are added.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub kind: RequestKind,
    pub attributes: Vec<Attribute>,
}

/// Parses `coa|disconnect Name = value, Name = value ...` (pairs separated by commas
/// and/or newlines; values bare or double-quoted with `\"` and `\\` escapes).
pub fn parse_request(text: &str, dict: &Dictionary) -> Result<Request, String> {
    let text = text.trim_start();
    let word_end = text.find(char::is_whitespace).unwrap_or(text.len());
    let kind = match text[..word_end].to_ascii_lowercase().as_str() {
        "coa" => RequestKind::Coa,
        "disconnect" => RequestKind::Disconnect,
        "" => return Err("empty RADIUS request".to_string()),
        other => {
            return Err(format!(
                "RADIUS request must start with coa or disconnect, not {other:?}"
            ));
        }
    };
    let mut cursor = Cursor {
        chars: text[word_end..].chars().collect(),
        at: 0,
    };
    let mut attributes = Vec::new();
    loop {
        cursor.skip(|c| c.is_whitespace() || c == ',');
        if cursor.done() {
            break;
        }
        let name = cursor.take(|c| !(c.is_whitespace() || c == '=' || c == ','));
        cursor.skip(|c| c == ' ' || c == '\t');
        if cursor.peek() != Some('=') {
            return Err(format!("expected '=' after {name}"));
        }
        cursor.at += 1;
        cursor.skip(|c| c == ' ' || c == '\t');
        let (raw, quoted) = if cursor.peek() == Some('"') {
            cursor.at += 1;
            let value = cursor.quoted(&name)?;
            cursor.skip(|c| c == ' ' || c == '\t');
            match cursor.peek() {
                None | Some(',' | '\n' | '\r') => {}
                Some(c) => return Err(format!("unexpected {c:?} after the value of {name}")),
            }
            (value, true)
        } else {
            let value = cursor.take(|c| c != ',' && c != '\n');
            let value = value.trim().to_string();
            if value.is_empty() {
                return Err(format!("{name} has no value"));
            }
            (value, false)
        };
        let def = dict
            .attribute(&name)
            .ok_or_else(|| format!("unknown RADIUS attribute {name}"))?;
        if def.vendor == 0 && def.number == MESSAGE_AUTHENTICATOR {
            // radclient's way of asking for a Message-Authenticator; we always add
            // our own, so the operator's placeholder is dropped.
            continue;
        }
        attributes.push(convert(def, dict, &raw, quoted)?);
    }
    if attributes.is_empty() {
        return Err(format!("{} request without attributes", kind.word()));
    }
    Ok(Request { kind, attributes })
}

/// A character cursor for `parse_request`.
struct Cursor {
    chars: Vec<char>,
    at: usize,
}

impl Cursor {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.at).copied()
    }
    fn done(&self) -> bool {
        self.at >= self.chars.len()
    }
    fn skip(&mut self, f: impl Fn(char) -> bool) {
        while self.peek().is_some_and(&f) {
            self.at += 1;
        }
    }
    fn take(&mut self, f: impl Fn(char) -> bool) -> String {
        let start = self.at;
        self.skip(f);
        self.chars[start..self.at].iter().collect()
    }
    /// The rest of a double-quoted value; the opening quote is already consumed.
    fn quoted(&mut self, name: &str) -> Result<String, String> {
        let mut out = String::new();
        loop {
            let Some(c) = self.peek() else {
                return Err(format!("unterminated quoted value of {name}"));
            };
            self.at += 1;
            match c {
                '"' => return Ok(out),
                '\\' => {
                    let escaped = self
                        .peek()
                        .ok_or_else(|| format!("unterminated quoted value of {name}"))?;
                    self.at += 1;
                    out.push(match escaped {
                        '"' => '"',
                        '\\' => '\\',
                        'n' => '\n',
                        't' => '\t',
                        'r' => '\r',
                        other => {
                            return Err(format!("unknown escape \\{other} in the value of {name}"));
                        }
                    });
                }
                c => out.push(c),
            }
        }
    }
}

/// Checks a value against its attribute's type and length limits.
fn convert(def: &AttrDef, dict: &Dictionary, raw: &str, quoted: bool) -> Result<Attribute, String> {
    let name = &def.name;
    let (value, shown) = match &def.kind {
        AttrType::String => (Value::Text(raw.to_string()), quote(raw)),
        AttrType::Octets => {
            let bytes = match raw.strip_prefix("0x").filter(|_| !quoted) {
                Some(hex) => decode_hex(hex)
                    .ok_or_else(|| format!("{name}: {raw:?} is not 0x followed by hex digits"))?,
                None => raw.as_bytes().to_vec(),
            };
            let shown = format!("0x{}", hex(&bytes));
            (Value::Octets(bytes), shown)
        }
        AttrType::Integer | AttrType::Date => {
            if let Some(n) = parse_number(raw) {
                (Value::Integer(n), n.to_string())
            } else if let Some(n) = dict.value_number(name, raw) {
                let canonical = dict.value_name(name, n).unwrap_or(raw).to_string();
                (Value::Integer(n), canonical)
            } else {
                return Err(format!(
                    "{name}: {raw:?} is not a number or a known value name"
                ));
            }
        }
        AttrType::IpAddr => {
            let ip: Ipv4Addr = raw
                .parse()
                .map_err(|_| format!("{name}: {raw:?} is not an IPv4 address"))?;
            (Value::Ip(ip), ip.to_string())
        }
        AttrType::Unsupported(kind) => {
            return Err(format!(
                "{name}: nasd cannot encode attributes of type {kind}"
            ));
        }
    };
    let len = value.bytes().len();
    if len == 0 {
        // RFC 2865 section 5: string and octets values are at least one byte.
        return Err(format!("{name} is empty"));
    }
    let max = if def.vendor == 0 { 253 } else { 247 };
    if len > max {
        return Err(format!("{name}: value is {len} bytes, at most {max} fit"));
    }
    Ok(Attribute {
        def: def.clone(),
        value,
        shown,
    })
}

/// A string as radclient reads it back.
pub(super) fn quote(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

pub(super) fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

pub(super) fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || !text.is_ascii() {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok())
        .collect()
}

/// The command an operator can paste to send the same request with FreeRADIUS's
/// radclient, with `$SECRET` in place of the secret. It asks for a
/// Message-Authenticator explicitly because radclient 3.2 adds none by itself.
pub fn radclient_line(request: &Request, host: &str, port: u16) -> String {
    let mut pairs = vec!["Message-Authenticator = 0x00".to_string()];
    pairs.extend(
        request
            .attributes
            .iter()
            .map(|a| format!("{} = {}", a.def.name, a.shown)),
    );
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    };
    format!(
        "echo {} | radclient -x {host}:{port} {} $SECRET",
        shell_quote(&pairs.join(", ")),
        request.kind.word()
    )
}

fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', "'\\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dict() -> Dictionary {
        Dictionary::builtin()
    }

    fn shown(request: &Request) -> Vec<(String, String)> {
        request
            .attributes
            .iter()
            .map(|a| (a.def.name.clone(), a.shown.clone()))
            .collect()
    }

    #[test]
    fn parse_request_table() {
        let d = dict();
        type Case<'a> = (&'a str, RequestKind, &'a [(&'a str, &'a str)]);
        let ok: &[Case] = &[
            (
                r#"coa User-Name = "user1", Acct-Session-Id = "81200003", Mikrotik-Rate-Limit = "10240k/5120k""#,
                RequestKind::Coa,
                &[
                    ("User-Name", "\"user1\""),
                    ("Acct-Session-Id", "\"81200003\""),
                    ("Mikrotik-Rate-Limit", "\"10240k/5120k\""),
                ],
            ),
            (
                "disconnect Acct-Session-Id = \"81200003\", Framed-IP-Address = 10.88.0.2",
                RequestKind::Disconnect,
                &[
                    ("Acct-Session-Id", "\"81200003\""),
                    ("Framed-IP-Address", "10.88.0.2"),
                ],
            ),
            (
                "  COA\n  user-name = bare.value@x\n\n  Session-Timeout=3600,,\r\n Error-Cause = session-context-not-found\n",
                RequestKind::Coa,
                &[
                    ("User-Name", "\"bare.value@x\""),
                    ("Session-Timeout", "3600"),
                    ("Error-Cause", "Session-Context-Not-Found"),
                ],
            ),
            (
                r#"coa Cisco-AVPair = "subscriber:command=reauthenticate, \"q\" \\ end", Class = 0x0a0B, State = "ab""#,
                RequestKind::Coa,
                &[
                    (
                        "Cisco-AVPair",
                        r#""subscriber:command=reauthenticate, \"q\" \\ end""#,
                    ),
                    ("Class", "0x0a0b"),
                    ("State", "0x6162"),
                ],
            ),
            (
                "coa Message-Authenticator = 0x00, User-Name = a, Event-Timestamp = 0x10",
                RequestKind::Coa,
                &[("User-Name", "\"a\""), ("Event-Timestamp", "16")],
            ),
        ];
        for (text, kind, want) in ok {
            let request = parse_request(text, &d).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(request.kind, *kind, "{text}");
            let want: Vec<(String, String)> = want
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect();
            assert_eq!(shown(&request), want, "{text}");
        }
        let request = parse_request(
            r#"coa Cisco-AVPair = "a, \"b\" \\", Session-Timeout = Session-Context-Not-Found"#,
            &d,
        );
        assert!(request.is_err(), "VALUE names belong to their attribute");
        let request = parse_request(r#"coa Cisco-AVPair = "a, \"b\" \\""#, &d).expect("parses");
        assert_eq!(
            request.attributes[0].value,
            Value::Text("a, \"b\" \\".into())
        );

        let long = format!("coa User-Name = {}", "x".repeat(254));
        let long_vsa = format!("coa Cisco-AVPair = \"{}\"", "x".repeat(248));
        let bad: &[(&str, &str)] = &[
            ("", "empty RADIUS request"),
            (
                "reboot User-Name = a",
                "RADIUS request must start with coa or disconnect, not \"reboot\"",
            ),
            ("coa", "coa request without attributes"),
            ("coa Foo-Bar = 1", "unknown RADIUS attribute Foo-Bar"),
            (
                "coa User-Name = a, Nope = \"x\"",
                "unknown RADIUS attribute Nope",
            ),
            (
                "disconnect Framed-IP-Address = 10.0.0.300",
                "Framed-IP-Address: \"10.0.0.300\" is not an IPv4 address",
            ),
            (
                "coa Framed-IP-Address = ::1",
                "Framed-IP-Address: \"::1\" is not an IPv4 address",
            ),
            ("coa User-Name \"a\"", "expected '=' after User-Name"),
            (
                "coa User-Name = \"abc",
                "unterminated quoted value of User-Name",
            ),
            (
                "coa User-Name = \"a\" b",
                "unexpected 'b' after the value of User-Name",
            ),
            (
                "coa User-Name = \"a\\q\"",
                "unknown escape \\q in the value of User-Name",
            ),
            (
                "coa User-Name = , Acct-Session-Id = 1",
                "User-Name has no value",
            ),
            ("coa User-Name = \"\"", "User-Name is empty"),
            (
                "coa Session-Timeout = soon",
                "Session-Timeout: \"soon\" is not a number or a known value name",
            ),
            (
                "coa Class = 0xabc",
                "Class: \"0xabc\" is not 0x followed by hex digits",
            ),
            (&long, "User-Name: value is 254 bytes, at most 253 fit"),
            (
                &long_vsa,
                "Cisco-AVPair: value is 248 bytes, at most 247 fit",
            ),
        ];
        for (text, want) in bad {
            assert_eq!(
                parse_request(text, &d).as_ref().map(|_| ()),
                Err(&want.to_string()),
                "{text}"
            );
        }
    }

    #[test]
    fn radclient_line_quotes_for_the_shell_and_hides_the_secret() {
        let d = dict();
        let request = parse_request(
            "coa User-Name = \"o'brien\", Acct-Session-Id = \"81200003\", Framed-IP-Address = 10.88.0.2",
            &d,
        )
        .expect("parses");
        assert_eq!(
            radclient_line(&request, "10.0.0.1", 3799),
            "echo 'Message-Authenticator = 0x00, User-Name = \"o'\\''brien\", \
             Acct-Session-Id = \"81200003\", Framed-IP-Address = 10.88.0.2' \
             | radclient -x 10.0.0.1:3799 coa $SECRET"
        );
        let request = parse_request("disconnect User-Name = a", &d).expect("parses");
        assert_eq!(
            radclient_line(&request, "::1", 1700),
            "echo 'Message-Authenticator = 0x00, User-Name = \"a\"' | radclient -x [::1]:1700 disconnect $SECRET"
        );
    }
}
