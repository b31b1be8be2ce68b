//! The MikroTik RouterOS API transport: plain TCP (service `api`, port 8728) or TLS
//! (service `api-ssl`, port 8729).
//!
//! Three layers, the first two pure and table-tested:
//! - the wire codec: a sentence is a list of length-prefixed words ended by an empty
//!   word ([`encode_sentence`], [`SentenceDecoder`]);
//! - the command text schemes render and logs show, one command per line in the API's
//!   own word syntax (`/ip/firewall/address-list/add =list=allowed =address=10.0.0.1`),
//!   split into words by [`parse_command`]. Values the scheme renderer quoted
//!   (`=comment="x; /system reset"`) arrive as one word, so no value can become a
//!   second word or command;
//! - [`ApiPool`]: logged-in connections to one NAS, shared by its workers, never more
//!   than `max_sessions` at once, reused between events.
//!
//! Replies are rendered as text in the shape the RouterOS CLI prints, so the answer
//! patterns written for SSH work unchanged: `!re` becomes a line of `key=value` pairs,
//! `!trap` a line `failure: <message>`, `!done =ret=X` a line `ret=X`.
//!
//! TLS ([`ApiOptions::tls`]; rustls with the ring provider) wraps the same codec, login
//! and pool. The device's certificate is checked the way SSH host keys are
//! ([`CertPolicy`]): a pinned SHA-256 fingerprint of the leaf certificate, trust on first
//! use recorded in nasd's own file ([`known_certs_path`]: `[host]:port SHA256:...`
//! lines beside the SSH known_hosts), a recorded fingerprint, or a CA bundle (chain
//! and name). The fingerprint is checked after the handshake and before any API word is
//! sent, so a refused device never sees the login. RouterOS' `api-ssl` without a
//! certificate (anonymous Diffie-Hellman) cannot be spoken: rustls has no anonymous
//! cipher suites; give the service a certificate (a self-signed one is fine).
//!
//! Over plain TCP the login (RouterOS 6.43+) sends the password in clear; use TLS, or
//! keep the API service restricted to the billing host's address on the router.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use md5::{Digest, Md5};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout_at};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::pool::{Connector, Pool, PoolCounters, Session};
use super::{CliResult, Exchange, SessionError, Target};

/// Longest word accepted from a device. Real replies are a few KiB at most; the cap
/// keeps a broken or hostile peer from making us buffer without bound.
pub const MAX_WORD_LEN: usize = 16 * 1024 * 1024;

/// Longest word accepted in command text: far beyond any real value, and it keeps
/// `encode_length`'s saturation below unreachable from a command line.
const MAX_COMMAND_WORD_LEN: usize = 1024 * 1024;

/// How long `close` waits per connection for the polite `/quit` to be written.
const QUIT_TIMEOUT: Duration = Duration::from_millis(500);

// ---------------------------------------------------------------------------------
// Codec
// ---------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------
// Command text
// ---------------------------------------------------------------------------------

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
fn ids_of(listed: &str) -> Vec<String> {
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
fn attribute<'a>(sentence: &'a [String], key: &str) -> Option<&'a str> {
    sentence[1..].iter().find_map(|w| {
        w.strip_prefix('=')
            .and_then(|rest| rest.strip_prefix(key))
            .and_then(|rest| rest.strip_prefix('='))
    })
}

/// `!fatal` carries its reason as a bare word (some versions as `=message=`).
fn fatal_message(sentence: &[String]) -> String {
    attribute(sentence, "message")
        .map(str::to_string)
        .or_else(|| sentence[1..].iter().find(|w| !w.starts_with('.')).cloned())
        .unwrap_or_else(|| "!fatal without a reason".to_string())
}

/// The line a `!trap` adds to the output. RouterOS already starts some messages with
/// `failure: ` (`failure: already have such entry`), as the CLI prints them; those are
/// not prefixed twice.
fn trap_line(sentence: &[String]) -> String {
    let message = attribute(sentence, "message").unwrap_or("unknown error");
    if message.starts_with("failure:") {
        message.to_string()
    } else {
        format!("failure: {message}")
    }
}

/// `!re` as the CLI's `print as-value` would show it: `key=value` pairs.
fn re_line(sentence: &[String]) -> String {
    sentence[1..]
        .iter()
        .filter_map(|w| w.strip_prefix('='))
        .collect::<Vec<_>>()
        .join(" ")
}

// ---------------------------------------------------------------------------------
// TLS: certificate fingerprints and policies
// ---------------------------------------------------------------------------------

/// Which device certificates a TLS connection accepts (the NAS's `host_key_policy` and
/// `host_key`, as for SSH host keys).
#[derive(Clone, Debug)]
pub enum CertPolicy {
    /// Only the certificate with this fingerprint (canonical form, see
    /// [`normalize_fingerprint`]).
    Pinned(String),
    /// Trust on first use: an unknown device's fingerprint is recorded in the known
    /// certificates file; a device whose recorded fingerprint differs is refused.
    AcceptNew,
    /// The fingerprint must already be recorded in the known certificates file.
    Strict,
    /// The chain must lead to one of these CAs and the certificate must be valid for the
    /// host nasd connects to (DNS name or IP address); `file` names them in errors.
    Ca {
        roots: Arc<RootCertStore>,
        file: PathBuf,
    },
}

/// TLS settings of an API pool.
#[derive(Clone, Debug)]
pub struct ApiTls {
    pub policy: CertPolicy,
    /// nasd's file of recorded certificate fingerprints ([`known_certs_path`]).
    pub known_certs: PathBuf,
}

/// The file where API certificate fingerprints are recorded, beside the SSH known_hosts
/// file (`var/known_hosts` -> `var/known_hosts.tls`), so OpenSSH tools never see its
/// lines. One line per fingerprint: `[host]:port SHA256:<base64>`; `#` starts a comment.
pub fn known_certs_path(known_hosts: &Path) -> PathBuf {
    let mut name = known_hosts
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_else(|| "known_hosts".into());
    name.push(".tls");
    known_hosts.with_file_name(name)
}

/// The fingerprint of a DER certificate as nasd prints and records it: `SHA256:` and the
/// unpadded base64 of its SHA-256, the form `ssh-keygen -l` uses for host keys.
pub fn cert_fingerprint(der: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    format!("SHA256:{}", base64_unpadded(digest.as_ref()))
}

fn base64_unpadded(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let byte = |i: usize| u32::from(chunk.get(i).copied().unwrap_or(0));
        let n = (byte(0) << 16) | (byte(1) << 8) | byte(2);
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
        }
    }
    out
}

/// A certificate fingerprint as an operator may paste it, in the form nasd prints:
/// `SHA256:` + base64 (padded or not), or 64 hex digits with or without colons (as
/// `openssl x509 -noout -fingerprint -sha256` prints them, its `sha256 Fingerprint=`
/// included); the `SHA256:` prefix is optional.
pub fn normalize_fingerprint(text: &str) -> Result<String, String> {
    let trimmed = text.trim();
    let mut body = trimmed;
    if let Some(at) = body.to_ascii_lowercase().find("fingerprint=") {
        body = &body[at + "fingerprint=".len()..];
    }
    if body.len() >= 7 && body.is_char_boundary(7) && body[..7].eq_ignore_ascii_case("sha256:") {
        body = &body[7..];
    }
    let hex: Vec<u8> = body.bytes().filter(|b| *b != b':').collect();
    if hex.len() == 64 && hex.iter().all(u8::is_ascii_hexdigit) {
        let digit = |b: u8| (b as char).to_digit(16).unwrap_or(0) as u8;
        let bytes: Vec<u8> = hex
            .chunks(2)
            .map(|pair| (digit(pair[0]) << 4) | digit(pair[1]))
            .collect();
        return Ok(format!("SHA256:{}", base64_unpadded(&bytes)));
    }
    let b64 = body.trim_end_matches('=');
    if b64.len() == 43
        && b64
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
    {
        return Ok(format!("SHA256:{b64}"));
    }
    Err(format!(
        "`{trimmed}` is not a SHA-256 certificate fingerprint (SHA256:<base64> or 64 hex digits)"
    ))
}

/// How a device is named in the known certificates file.
fn host_entry(host: &str, port: u16) -> String {
    format!("[{host}]:{port}")
}

/// The fingerprints recorded for `entry` in the text of a known certificates file; a
/// line for it that does not hold a fingerprint is an error naming the line.
fn recorded_fingerprints(text: &str, entry: &str) -> Result<Vec<String>, String> {
    let mut found = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let mut fields = line.split_whitespace();
        match (fields.next(), fields.next()) {
            (Some(host), _) if host.starts_with('#') || host != entry => {}
            (Some(_), Some(fp)) => {
                found.push(normalize_fingerprint(fp).map_err(|e| format!("line {}: {e}", n + 1))?)
            }
            (Some(_), None) => return Err(format!("line {}: no fingerprint after {entry}", n + 1)),
            (None, _) => {}
        }
    }
    Ok(found)
}

/// What a fingerprint policy says about an offered certificate.
#[derive(Debug, PartialEq, Eq)]
enum CertDecision {
    Accept,
    /// Accept and record it (accept-new, nothing recorded yet).
    Learn,
    Changed {
        known: String,
    },
    Unknown,
}

/// Pure: the policy applied to the fingerprints recorded for the device and the offered
/// one. A recorded fingerprint that differs refuses under every policy but `Pinned`
/// (a pin is the operator's explicit word).
fn decide(policy: &CertPolicy, recorded: &[String], offered: &str) -> CertDecision {
    match policy {
        CertPolicy::Ca { .. } => CertDecision::Accept,
        CertPolicy::Pinned(pin) if pin == offered => CertDecision::Accept,
        CertPolicy::Pinned(pin) => CertDecision::Changed { known: pin.clone() },
        CertPolicy::AcceptNew | CertPolicy::Strict => {
            if recorded.iter().any(|r| r == offered) {
                CertDecision::Accept
            } else if let Some(known) = recorded.first() {
                CertDecision::Changed {
                    known: known.clone(),
                }
            } else if matches!(policy, CertPolicy::AcceptNew) {
                CertDecision::Learn
            } else {
                CertDecision::Unknown
            }
        }
    }
}

/// One reader-or-writer of known certificates files at a time in this process, so two
/// connections learning the same device do not record it twice.
static KNOWN_CERTS_LOCK: Mutex<()> = Mutex::new(());

enum Refusal {
    Changed { known: String },
    Unknown,
    File(String),
}

/// The I/O shell around [`decide`]: reads the known certificates file and appends what
/// accept-new learns.
fn check_fingerprint(tls: &ApiTls, host: &str, port: u16, offered: &str) -> Result<(), Refusal> {
    if matches!(tls.policy, CertPolicy::Ca { .. }) {
        return Ok(());
    }
    // The data is `()`: a panic while holding the lock leaves nothing half-updated.
    let _lock = KNOWN_CERTS_LOCK
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let entry = host_entry(host, port);
    let recorded = if matches!(tls.policy, CertPolicy::Pinned(_)) {
        Vec::new()
    } else {
        let text = match std::fs::read_to_string(&tls.known_certs) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(Refusal::File(e.to_string())),
        };
        recorded_fingerprints(&text, &entry).map_err(Refusal::File)?
    };
    match decide(&tls.policy, &recorded, offered) {
        CertDecision::Accept => Ok(()),
        CertDecision::Changed { known } => Err(Refusal::Changed { known }),
        CertDecision::Unknown => Err(Refusal::Unknown),
        CertDecision::Learn => {
            learn(&tls.known_certs, &entry, offered)
                .map_err(|e| Refusal::File(format!("cannot record the certificate: {e}")))?;
            tracing::info!(device = %entry, fingerprint = offered, "learned RouterOS API certificate");
            Ok(())
        }
    }
}

fn learn(path: &Path, entry: &str, fingerprint: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir)?;
    }
    let new = !path.exists();
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    if new {
        file.write_all(
            b"# nasd: RouterOS API TLS certificates, SHA-256 of the leaf certificate\n",
        )?;
    }
    file.write_all(format!("{entry} {fingerprint}\n").as_bytes())
}

/// Loads a PEM bundle of CA certificates for [`CertPolicy::Ca`].
pub fn load_ca_file(path: &Path) -> Result<Arc<RootCertStore>, String> {
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    for cert in certs {
        let cert = cert.map_err(|e| format!("{}: {e}", path.display()))?;
        roots
            .add(cert)
            .map_err(|e| format!("{}: not usable as a CA certificate: {e}", path.display()))?;
    }
    if roots.is_empty() {
        return Err(format!(
            "{}: no PEM certificate (-----BEGIN CERTIFICATE-----) in it",
            path.display()
        ));
    }
    Ok(Arc::new(roots))
}

/// Accepts any certificate during the handshake, but still checks the handshake
/// signatures, so the peer does hold the certificate's key. The fingerprint policy is
/// applied right after the handshake, before any API word is sent.
#[derive(Debug)]
struct FingerprintChecksFollow {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for FingerprintChecksFollow {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The rustls client settings for a policy: TLS 1.2 and 1.3 with the ring provider.
fn client_config(policy: &CertPolicy) -> Result<Arc<ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let algorithms = provider.signature_verification_algorithms;
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?;
    let config = match policy {
        CertPolicy::Ca { roots, .. } => builder
            .with_root_certificates(roots.clone())
            .with_no_client_auth(),
        _ => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(FingerprintChecksFollow { algorithms }))
            .with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// Why a TLS handshake failed, with a hint at the usual cause.
fn handshake_failure(error: &std::io::Error, policy: &CertPolicy, port: u16) -> String {
    let not_tls = format!(
        "the device does not speak TLS on port {port} (the plain API listens on 8728, api-ssl on 8729)"
    );
    match error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(e @ rustls::Error::InvalidCertificate(_)) => match policy {
            CertPolicy::Ca { file, .. } => format!(
                "TLS handshake failed: {e} (checked against the CA certificates in {})",
                file.display()
            ),
            _ => format!("TLS handshake failed: {e}"),
        },
        Some(
            e @ (rustls::Error::InvalidMessage(_)
            | rustls::Error::InappropriateMessage { .. }
            | rustls::Error::InappropriateHandshakeMessage { .. }),
        ) => format!("TLS handshake failed: {e}; {not_tls}"),
        Some(e @ rustls::Error::AlertReceived(rustls::AlertDescription::HandshakeFailure)) => {
            format!(
                "TLS handshake failed: {e}; no cipher in common (a RouterOS api-ssl service \
                 without a certificate offers only anonymous ciphers, which nasd cannot use: \
                 give the service a certificate, a self-signed one will do)"
            )
        }
        Some(e) => format!("TLS handshake failed: {e}"),
        None if error.kind() == std::io::ErrorKind::UnexpectedEof => {
            format!("the device closed the connection during the TLS handshake; {not_tls}")
        }
        None => format!("TLS handshake failed: {error}"),
    }
}

/// Whether the first bytes a plaintext connection received are a TLS record (an alert
/// or handshake of TLS 1.x): a real API reply starts with a word such as `!done`.
fn looks_like_tls(bytes: &[u8]) -> bool {
    matches!(bytes, [0x15 | 0x16, 0x03, 0x00..=0x04, ..])
}

/// A connection's byte stream: plain TCP or TLS over TCP.
enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

// ---------------------------------------------------------------------------------
// Client
// ---------------------------------------------------------------------------------

#[derive(Clone, Debug)]
pub struct ApiOptions {
    /// Deadline for getting a usable session once a slot is free (`[transport]
    /// connect_timeout`): backoff, TCP connect, TLS handshake and certificate check,
    /// login; the run's command timeout when that is shorter. Waiting for the slot is not
    /// bounded.
    pub connect_timeout: Duration,
    /// Use the pre-6.43 MD5 challenge login instead of sending the password.
    pub legacy_login: bool,
    /// Speak TLS (RouterOS `api-ssl`) with this certificate check; plain TCP when `None`.
    pub tls: Option<ApiTls>,
}

impl Default for ApiOptions {
    fn default() -> ApiOptions {
        ApiOptions {
            connect_timeout: super::pool::DEFAULT_CONNECT_TIMEOUT,
            legacy_login: false,
            tls: None,
        }
    }
}

/// One logged-in API connection.
struct Connection {
    stream: Stream,
    decoder: SentenceDecoder,
    /// Total bytes read, to tell "died before answering" from "died mid-answer".
    received: u64,
}

impl Session for Connection {
    async fn usable(&mut self) -> bool {
        self.looks_alive()
    }

    /// The polite `/quit`, then the TCP (or TLS) shutdown, each bounded.
    async fn goodbye(&mut self) {
        let deadline = Instant::now() + QUIT_TIMEOUT;
        let _ = self.send(&["/quit".to_string()], deadline).await;
        let _ = timeout_at(deadline, self.stream.shutdown()).await;
    }
}

/// Why reading or writing on a connection failed, before the label and context are
/// added.
enum IoFailure {
    Timeout,
    Closed(String),
    Protocol(String),
}

impl Connection {
    async fn send(&mut self, words: &[String], deadline: Instant) -> Result<(), IoFailure> {
        let bytes = encode_sentence(words);
        // TLS buffers records until flushed; for TCP the flush is a no-op.
        let write = async {
            self.stream.write_all(&bytes).await?;
            self.stream.flush().await
        };
        match timeout_at(deadline, write).await {
            Err(_) => Err(IoFailure::Timeout),
            Ok(Err(e)) => Err(IoFailure::Closed(format!("write failed: {e}"))),
            Ok(Ok(())) => Ok(()),
        }
    }

    /// The next non-empty sentence, read under `deadline`.
    async fn read_sentence(&mut self, deadline: Instant) -> Result<Vec<String>, IoFailure> {
        let mut buf = [0u8; 8192];
        loop {
            match self.decoder.next_sentence() {
                Err(e) => return Err(IoFailure::Protocol(e)),
                // An empty sentence carries nothing; RouterOS does not send them, but
                // skipping is harmless and avoids indexing an empty reply.
                Ok(Some(sentence)) if sentence.is_empty() => continue,
                Ok(Some(sentence)) => return Ok(sentence),
                Ok(None) => {}
            }
            match timeout_at(deadline, self.stream.read(&mut buf)).await {
                Err(_) => return Err(IoFailure::Timeout),
                Ok(Err(e)) => return Err(IoFailure::Closed(format!("read failed: {e}"))),
                Ok(Ok(0)) => {
                    return Err(IoFailure::Closed("connection closed by the device".into()));
                }
                Ok(Ok(n)) => {
                    if self.received == 0
                        && matches!(self.stream, Stream::Plain(_))
                        && looks_like_tls(&buf[..n])
                    {
                        return Err(IoFailure::Protocol(
                            "the device answered with TLS: this port serves api-ssl; set \
                             `tls = true` in the scheme (e.g. use mikrotik-api-ssl)"
                                .into(),
                        ));
                    }
                    self.received += n as u64;
                    self.decoder.push(&buf[..n]);
                }
            }
        }
    }

    /// Whether an idle connection still looks usable: not closed by the device and
    /// with nothing unsolicited (such as `!fatal`) waiting. Checked without blocking:
    /// one poll with a waker that does nothing (TLS may first have records to decrypt).
    fn looks_alive(&mut self) -> bool {
        let mut buf = [0u8; 1024];
        let mut cx = Context::from_waker(Waker::noop());
        loop {
            let mut read = ReadBuf::new(&mut buf);
            match Pin::new(&mut self.stream).poll_read(&mut cx, &mut read) {
                Poll::Pending => break,
                Poll::Ready(Err(_)) => return false,
                Poll::Ready(Ok(())) if read.filled().is_empty() => return false,
                Poll::Ready(Ok(())) => self.decoder.push(read.filled()),
            }
        }
        self.decoder.pending() == 0
    }
}

/// A command that failed on the wire, and whether the device had sent anything at all
/// for it (if not, a reused connection may simply have gone stale while idle).
struct CommandFailure {
    error: SessionError,
    nothing_received: bool,
}

/// Logged-in connections to one NAS, shared by its workers (`Arc<ApiPool>`).
///
/// Connections are opened lazily, reused, and dropped after any error; at most
/// `target.max_sessions` are open at once (see [`super::pool`]).
pub struct ApiPool {
    pool: Pool<ApiConnector>,
}

/// What connecting and logging in needs; also runs commands on a connection.
struct ApiConnector {
    target: Target,
    options: ApiOptions,
    /// The TLS client settings, built once so sessions can be resumed; an error here
    /// (reported by every run) means TLS cannot be set up at all.
    tls: Option<Result<TlsConnector, String>>,
    label: String,
    next_tag: AtomicU64,
}

impl Connector for ApiConnector {
    type Session = Connection;

    async fn connect(&self, deadline: Instant) -> Result<Connection, SessionError> {
        self.connect_and_login(deadline).await
    }
}

impl ApiPool {
    pub fn new(target: Target, options: ApiOptions) -> ApiPool {
        let tls = options
            .tls
            .as_ref()
            .map(|tls| client_config(&tls.policy).map(TlsConnector::from));
        let label = target.label();
        let max_sessions = target.max_sessions;
        let connect_timeout = options.connect_timeout;
        ApiPool {
            pool: Pool::new(
                ApiConnector {
                    target,
                    options,
                    tls,
                    label: label.clone(),
                    next_tag: AtomicU64::new(1),
                },
                label,
                "API",
                max_sessions,
                connect_timeout,
            ),
        }
    }

    /// Connections open now, idle or in use.
    pub fn open_sessions(&self) -> usize {
        self.pool.open_sessions()
    }

    /// The pool's counters, for the statistics.
    pub fn counters(&self) -> Arc<PoolCounters> {
        self.pool.counters()
    }

    /// Runs the commands in order on one connection. Each command is sent with its own
    /// `.tag` and has `timeout` to be answered completely. Waiting for a free session is
    /// not bounded; once a slot is free, getting a connection (connect back-off, connect,
    /// TLS, login) has `connect_timeout` (or `timeout` when shorter). A `!trap` is an
    /// answer, not an error: the next command still runs and the answer patterns
    /// decide. The first session error stops the run.
    pub async fn run(&self, commands: &[String], timeout: Duration) -> CliResult {
        let mut result = CliResult::default();
        let label = self.pool.label();
        // Parse everything first so a bad line late in the list cannot leave the
        // device half-configured.
        let mut parsed = Vec::with_capacity(commands.len());
        for text in commands {
            match parse_command(text) {
                Ok(words) => parsed.push(words),
                Err(e) => {
                    result.error = Some(SessionError::Protocol(
                        label.to_string(),
                        format!("command `{text}`: {e}; nothing was sent"),
                    ));
                    return result;
                }
            }
        }
        if parsed.is_empty() {
            return result;
        }

        let mut lease = match self.pool.checkout(timeout).await {
            Ok(lease) => lease,
            Err(e) => {
                result.error = Some(e);
                return result;
            }
        };
        let connector = self.pool.connector();
        let mut reused = lease.reused();
        let mut index = 0;
        while let (Some(text), Some(words)) = (commands.get(index), parsed.get(index)) {
            match connector
                .execute_with_find(lease.session(), text, words, timeout)
                .await
            {
                Ok(output) => {
                    result.exchanges.push(Exchange {
                        command: text.clone(),
                        output,
                    });
                    index += 1;
                    reused = false;
                }
                Err(failure)
                    if reused
                        && failure.nothing_received
                        && matches!(failure.error, SessionError::Closed(..)) =>
                {
                    // The device (or a NAT box) dropped the idle connection and said
                    // nothing about this command: it never ran it. One fresh try.
                    tracing::debug!(nas = %label, "reused API connection was stale: {}", failure.error);
                    reused = false;
                    lease = match lease.reconnect().await {
                        Ok(fresh) => fresh,
                        Err(e) => {
                            result.error = Some(e);
                            return result;
                        }
                    };
                }
                Err(failure) => {
                    // The connection is out of step or gone: dropping the lease discards
                    // it, it is never reused.
                    result.error = Some(failure.error);
                    return result;
                }
            }
        }
        lease.done();
        result
    }

    /// Drops the idle connections (after a polite `/quit`) and refuses later runs;
    /// connections in use are dropped when their run ends.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

impl ApiConnector {
    async fn connect_and_login(&self, deadline: Instant) -> Result<Connection, SessionError> {
        let label = &self.label;
        let Some(user) = self.target.login.as_deref() else {
            return Err(SessionError::Protocol(
                label.clone(),
                "no login is set for this NAS".into(),
            ));
        };
        let address = (self.target.host.as_str(), self.target.port);
        let stream = match timeout_at(deadline, TcpStream::connect(address)).await {
            Err(_) => {
                return Err(SessionError::Connect(
                    label.clone(),
                    "the TCP connect was not answered in time".into(),
                ));
            }
            Ok(Err(e)) => return Err(SessionError::Connect(label.clone(), e.to_string())),
            Ok(Ok(stream)) => stream,
        };
        // Commands are single small writes answered at once; Nagle would only delay.
        let _ = stream.set_nodelay(true);
        let stream = self.secure(stream, deadline).await?;
        let mut conn = Connection {
            stream,
            decoder: SentenceDecoder::new(),
            received: 0,
        };
        self.login(&mut conn, user, deadline).await?;
        tracing::debug!(nas = %label, user, "RouterOS API session opened");
        Ok(conn)
    }

    /// Plain TCP as it is, or the TLS handshake and the certificate check. On any
    /// refusal the connection is dropped before a word of the API is sent.
    async fn secure(&self, tcp: TcpStream, deadline: Instant) -> Result<Stream, SessionError> {
        let (Some(connector), Some(settings)) = (&self.tls, &self.options.tls) else {
            return Ok(Stream::Plain(tcp));
        };
        let label = &self.label;
        let connector = connector
            .clone()
            .map_err(|e| SessionError::Connect(label.clone(), e))?;
        let host = self.target.host.as_str();
        let port = self.target.port;
        let name = ServerName::try_from(host.to_string()).map_err(|_| {
            SessionError::Connect(
                label.clone(),
                format!("`{host}` is neither a DNS name nor an IP address, as TLS needs"),
            )
        })?;
        let stream = match timeout_at(deadline, connector.connect(name, tcp)).await {
            Err(_) => {
                return Err(SessionError::Connect(
                    label.clone(),
                    format!(
                        "TLS handshake not finished in time; the device does not speak TLS \
                         on port {port}? (the plain API listens on 8728, api-ssl on 8729)"
                    ),
                ));
            }
            Ok(Err(e)) => {
                return Err(SessionError::Connect(
                    label.clone(),
                    handshake_failure(&e, &settings.policy, port),
                ));
            }
            Ok(Ok(stream)) => stream,
        };
        let Some(leaf) = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
        else {
            return Err(SessionError::Connect(
                label.clone(),
                "the device presented no TLS certificate".into(),
            ));
        };
        let offered = cert_fingerprint(leaf);
        if let Err(refusal) = check_fingerprint(settings, host, port, &offered) {
            let known_certs = settings.known_certs.display().to_string();
            let error = match refusal {
                Refusal::Changed { known } => SessionError::HostKeyChanged {
                    label: label.clone(),
                    known: format!("TLS certificate {known}"),
                    offered: format!("TLS certificate {offered}"),
                },
                Refusal::Unknown => SessionError::HostKeyUnknown {
                    label: label.clone(),
                    offered: format!("TLS certificate {offered}"),
                    known_hosts: known_certs,
                },
                Refusal::File(problem) => {
                    SessionError::Connect(label.clone(), format!("{known_certs}: {problem}"))
                }
            };
            tracing::warn!(nas = %label, %error, "RouterOS API certificate refused");
            return Err(error);
        }
        tracing::debug!(
            nas = %label,
            certificate = %offered,
            version = ?stream.get_ref().1.protocol_version(),
            "RouterOS API TLS session established"
        );
        Ok(Stream::Tls(Box::new(stream)))
    }

    async fn login(
        &self,
        conn: &mut Connection,
        user: &str,
        deadline: Instant,
    ) -> Result<(), SessionError> {
        let password = self
            .target
            .password
            .as_ref()
            .map(|p| p.expose())
            .unwrap_or("");
        let challenge = if self.options.legacy_login {
            let reply = self
                .login_step(conn, vec!["/login".into()], user, deadline)
                .await?;
            match attribute(&reply, "ret") {
                Some(ret) => ret.to_string(),
                None => {
                    return Err(SessionError::Protocol(
                        self.label.clone(),
                        "legacy login: no challenge (=ret=) in the answer to /login; \
                         RouterOS 6.43 and later need legacy login off"
                            .into(),
                    ));
                }
            }
        } else {
            let words = vec![
                "/login".to_string(),
                format!("=name={user}"),
                format!("=password={password}"),
            ];
            let reply = self.login_step(conn, words, user, deadline).await?;
            match attribute(&reply, "ret") {
                // Before 6.43 RouterOS ignores the password and answers with a
                // challenge; answering it makes such a device work without the option.
                Some(ret) => ret.to_string(),
                None => return Ok(()),
            }
        };
        let response = md5_login_response(password, &challenge)
            .map_err(|e| SessionError::Protocol(self.label.clone(), e))?;
        let words = vec![
            "/login".to_string(),
            format!("=name={user}"),
            format!("=response={response}"),
        ];
        self.login_step(conn, words, user, deadline).await?;
        Ok(())
    }

    /// Sends one login sentence and returns its `!done`. Nothing here is logged or put
    /// in an error except the user name: the words carry the password or its hash.
    async fn login_step(
        &self,
        conn: &mut Connection,
        words: Vec<String>,
        user: &str,
        deadline: Instant,
    ) -> Result<Vec<String>, SessionError> {
        let label = &self.label;
        let io = |f: IoFailure| match f {
            IoFailure::Timeout => SessionError::Timeout(label.clone(), "login not answered".into()),
            IoFailure::Closed(m) => {
                SessionError::Closed(label.clone(), format!("during login: {m}"))
            }
            IoFailure::Protocol(m) => {
                SessionError::Protocol(label.clone(), format!("during login: {m}"))
            }
        };
        conn.send(&words, deadline).await.map_err(io)?;
        loop {
            let reply = match conn.read_sentence(deadline).await {
                Ok(reply) => reply,
                // Plain TCP hung up on without a byte: what a TLS-only port does (and
                // a RouterOS API service limited to other addresses).
                Err(IoFailure::Closed(m))
                    if conn.received == 0 && matches!(conn.stream, Stream::Plain(_)) =>
                {
                    return Err(SessionError::Closed(
                        label.clone(),
                        format!(
                            "during login: {m} without a word; if port {} serves api-ssl \
                             (TLS), use a scheme with `tls = true` such as mikrotik-api-ssl; \
                             else check the API service's allowed addresses",
                            self.target.port
                        ),
                    ));
                }
                Err(f) => return Err(io(f)),
            };
            match reply[0].as_str() {
                "!done" => return Ok(reply),
                "!trap" => {
                    tracing::debug!(
                        nas = %label,
                        user,
                        "login refused: {}",
                        attribute(&reply, "message").unwrap_or("")
                    );
                    return Err(SessionError::Auth(label.clone(), user.to_string()));
                }
                "!fatal" => {
                    return Err(SessionError::Closed(label.clone(), fatal_message(&reply)));
                }
                _ => {}
            }
        }
    }

    /// Sends one command with a fresh tag and collects its answer until `!done`.
    /// Runs one command; a `remove`/`set`/`enable`/`disable` with `?` query words is
    /// done in two steps (see `split_find`).
    async fn execute_with_find(
        &self,
        conn: &mut Connection,
        text: &str,
        words: &[String],
        timeout: Duration,
    ) -> Result<String, CommandFailure> {
        let Some((print, mut action)) = split_find(words) else {
            return self.execute(conn, text, words, timeout).await;
        };
        let listed = self.execute(conn, text, &print, timeout).await?;
        let ids = ids_of(&listed);
        if ids.is_empty() {
            // Like `[find ...]` on the CLI: nothing matched, nothing to do.
            return Ok(String::new());
        }
        action.push(format!("=.id={}", ids.join(",")));
        self.execute(conn, text, &action, timeout).await
    }

    async fn execute(
        &self,
        conn: &mut Connection,
        text: &str,
        words: &[String],
        timeout: Duration,
    ) -> Result<String, CommandFailure> {
        let deadline = Instant::now() + timeout;
        let tag = self.next_tag.fetch_add(1, Ordering::Relaxed).to_string();
        let received_before = conn.received + conn.decoder.pending() as u64;
        let label = &self.label;
        let fail = |conn: &Connection, f: IoFailure| CommandFailure {
            nothing_received: conn.received + conn.decoder.pending() as u64 == received_before,
            error: match f {
                IoFailure::Timeout => SessionError::Timeout(
                    label.clone(),
                    format!("no complete answer to `{text}` within {}", secs(timeout)),
                ),
                IoFailure::Closed(m) => {
                    SessionError::Closed(label.clone(), format!("{m} (running `{text}`)"))
                }
                IoFailure::Protocol(m) => {
                    SessionError::Protocol(label.clone(), format!("{m} (running `{text}`)"))
                }
            },
        };
        tracing::debug!(nas = %label, tag = %tag, command = text, "RouterOS API command");
        let mut sentence = words.to_vec();
        sentence.push(format!(".tag={tag}"));
        if let Err(f) = conn.send(&sentence, deadline).await {
            return Err(fail(conn, f));
        }
        let mut lines: Vec<String> = Vec::new();
        loop {
            let reply = match conn.read_sentence(deadline).await {
                Ok(reply) => reply,
                Err(f) => return Err(fail(conn, f)),
            };
            if reply[0] == "!fatal" {
                return Err(CommandFailure {
                    nothing_received: false,
                    error: SessionError::Closed(label.clone(), fatal_message(&reply)),
                });
            }
            let reply_tag = reply[1..].iter().find_map(|w| w.strip_prefix(".tag="));
            if reply_tag != Some(tag.as_str()) {
                // Only one command is in flight per connection, so this is noise
                // (e.g. an untagged notice); it must not end our command.
                tracing::debug!(nas = %label, "ignoring API reply {} with tag {:?}", reply[0], reply_tag);
                continue;
            }
            match reply[0].as_str() {
                "!re" => lines.push(re_line(&reply)),
                "!trap" => lines.push(trap_line(&reply)),
                "!done" => {
                    if let Some(ret) = attribute(&reply, "ret") {
                        lines.push(format!("ret={ret}"));
                    }
                    return Ok(lines.join("\n"));
                }
                // `!empty` (7.18+: print found nothing) and unknown reply words add
                // nothing; `!done` still follows.
                _ => {}
            }
        }
    }
}

/// `1.5s` style, for messages.
fn secs(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
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

    const EMPTY_SHA256: &str = "SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU";
    const EMPTY_SHA256_HEX: &str =
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn fingerprints_are_sha256_base64_like_ssh_keygen() {
        for (input, out) in [
            ("", ""),
            ("f", "Zg"),
            ("fo", "Zm8"),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg"),
            ("fooba", "Zm9vYmE"),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64_unpadded(input.as_bytes()), out, "{input}");
        }
        // `printf '' | sha256sum` / `| openssl dgst -sha256 -binary | base64`
        assert_eq!(cert_fingerprint(b""), EMPTY_SHA256);
    }

    #[test]
    fn normalize_fingerprint_table() {
        let colons: String = EMPTY_SHA256_HEX
            .as_bytes()
            .chunks(2)
            .map(|p| std::str::from_utf8(p).unwrap_or("").to_ascii_uppercase())
            .collect::<Vec<_>>()
            .join(":");
        let ok = [
            EMPTY_SHA256.to_string(),
            format!("{EMPTY_SHA256}="),
            format!("  {EMPTY_SHA256}\n"),
            format!("sha256:{}", &EMPTY_SHA256[7..]),
            EMPTY_SHA256[7..].to_string(),
            EMPTY_SHA256_HEX.to_string(),
            format!("SHA256:{EMPTY_SHA256_HEX}"),
            colons.clone(),
            format!("sha256 Fingerprint={colons}"),
        ];
        for text in &ok {
            assert_eq!(
                normalize_fingerprint(text).as_deref(),
                Ok(EMPTY_SHA256),
                "{text}"
            );
        }
        let bad = [
            "",
            "SHA256:",
            "SHA256:abc",
            &EMPTY_SHA256[..EMPTY_SHA256.len() - 1],
            &EMPTY_SHA256_HEX[1..],
            "MD5:00:11:22",
            "SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSu*U",
            "g3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "SHA256:ЖDEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU",
        ];
        for text in bad {
            let err = normalize_fingerprint(text).expect_err(text);
            assert!(
                err.contains("not a SHA-256 certificate fingerprint"),
                "{err}"
            );
        }
    }

    #[test]
    fn known_certs_file_lines() {
        assert_eq!(
            known_certs_path(Path::new("var/known_hosts")),
            PathBuf::from("var/known_hosts.tls")
        );
        let other = "SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
        let text = format!(
            "# comment\n\n[10.0.0.1]:8729 {EMPTY_SHA256}\n[10.0.0.1]:8728 {other}\n\
             [10.0.0.10]:8729 {other}\n[10.0.0.1]:8729 {EMPTY_SHA256_HEX}\n"
        );
        assert_eq!(
            recorded_fingerprints(&text, &host_entry("10.0.0.1", 8729)),
            Ok(vec![EMPTY_SHA256.to_string(), EMPTY_SHA256.to_string()])
        );
        assert_eq!(
            recorded_fingerprints(&text, "[10.0.0.2]:8729"),
            Ok(Vec::new())
        );
        let broken = format!("[10.0.0.1]:8729 {EMPTY_SHA256}\n[10.0.0.1]:8729 junk\n");
        let err = recorded_fingerprints(&broken, "[10.0.0.1]:8729").expect_err("junk");
        assert!(err.starts_with("line 2: "), "{err}");
        assert!(recorded_fingerprints("[10.0.0.1]:8729\n", "[10.0.0.1]:8729").is_err());
        // Other devices' broken lines are not this device's problem.
        assert_eq!(
            recorded_fingerprints("[10.0.0.9]:8729 junk\n", "[10.0.0.1]:8729"),
            Ok(Vec::new())
        );
    }

    #[test]
    fn certificate_policy_table() {
        let a = "SHA256:a".to_string();
        let b = "SHA256:b".to_string();
        let ca = CertPolicy::Ca {
            roots: Arc::new(RootCertStore::empty()),
            file: "ca.pem".into(),
        };
        use CertDecision::*;
        let cases: Vec<(CertPolicy, Vec<String>, &str, CertDecision)> = vec![
            (CertPolicy::Pinned(a.clone()), vec![], "SHA256:a", Accept),
            (
                CertPolicy::Pinned(a.clone()),
                vec![b.clone()],
                "SHA256:a",
                Accept,
            ),
            (
                CertPolicy::Pinned(a.clone()),
                vec![b.clone()],
                "SHA256:b",
                Changed { known: a.clone() },
            ),
            (CertPolicy::AcceptNew, vec![], "SHA256:a", Learn),
            (CertPolicy::AcceptNew, vec![a.clone()], "SHA256:a", Accept),
            (
                CertPolicy::AcceptNew,
                vec![b.clone(), a.clone()],
                "SHA256:a",
                Accept,
            ),
            (
                CertPolicy::AcceptNew,
                vec![b.clone()],
                "SHA256:a",
                Changed { known: b.clone() },
            ),
            (CertPolicy::Strict, vec![], "SHA256:a", Unknown),
            (CertPolicy::Strict, vec![a.clone()], "SHA256:a", Accept),
            (
                CertPolicy::Strict,
                vec![b.clone()],
                "SHA256:a",
                Changed { known: b.clone() },
            ),
            (ca, vec![b.clone()], "SHA256:a", Accept),
        ];
        for (policy, recorded, offered, want) in cases {
            assert_eq!(
                decide(&policy, &recorded, offered),
                want,
                "{policy:?} {recorded:?} {offered}"
            );
        }
    }

    #[test]
    fn tls_records_are_told_from_api_replies() {
        assert!(looks_like_tls(&[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x46]));
        assert!(looks_like_tls(&[0x16, 0x03, 0x01, 0x00]));
        assert!(!looks_like_tls(&encode_sentence(&words(&["!done"]))));
        assert!(!looks_like_tls(&[0x16]));
        assert!(!looks_like_tls(&[0x16, 0x03, 0x09]));
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
