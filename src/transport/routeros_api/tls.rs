//! TLS for the RouterOS API (`api-ssl`): certificate policies ([`CertPolicy`]),
//! fingerprints in the form nasd prints and records (`SHA256:<base64>`), the known
//! certificates file beside the SSH known_hosts (`known_hosts.tls`), the verifier that
//! leaves the check to the fingerprint policy, and the rustls client settings.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

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

pub(super) enum Refusal {
    Changed { known: String },
    Unknown,
    File(String),
}

/// The I/O shell around [`decide`]: reads the known certificates file and appends what
/// accept-new learns.
pub(super) fn check_fingerprint(
    tls: &ApiTls,
    host: &str,
    port: u16,
    offered: &str,
) -> Result<(), Refusal> {
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
pub(super) fn client_config(policy: &CertPolicy) -> Result<Arc<ClientConfig>, String> {
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
pub(super) fn handshake_failure(error: &std::io::Error, policy: &CertPolicy, port: u16) -> String {
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
pub(super) fn looks_like_tls(bytes: &[u8]) -> bool {
    matches!(bytes, [0x15 | 0x16, 0x03, 0x00..=0x04, ..])
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let done = super::super::codec::encode_sentence(&["!done".to_string()]);
        assert!(!looks_like_tls(&done));
        assert!(!looks_like_tls(&[0x16]));
        assert!(!looks_like_tls(&[0x16, 0x03, 0x09]));
    }
}
