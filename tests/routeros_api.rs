//! The RouterOS API transport against a fake API listener built on the Python
//! `librouteros` package's own encoder and decoder (tests/peers/routeros_api), run with
//! the project's peer venv (`scripts/test-setup.sh` installs it), in plain TCP and over
//! TLS served by Python's `ssl` module (OpenSSL) with certificates made here with rcgen;
//! and the TLS API of nasd's simulator through the whole pipeline.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

#[macro_use]
mod common;

use common::Backend;
use nasd::store::Secret;
use nasd::transport::routeros_api::{
    ApiOptions, ApiPool, ApiTls, CertPolicy, cert_fingerprint, encode_sentence, load_ca_file,
    normalize_fingerprint,
};
use nasd::transport::{SessionError, Target};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

const USER: &str = "api";
const PASSWORD: &str = "s3cret-Pw";
const TIMEOUT: Duration = Duration::from_secs(3);

fn python() -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv-peers/bin/python");
    assert!(
        path.exists(),
        "{} is missing: run scripts/test-setup.sh to install the test peers",
        path.display()
    );
    path
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local address").port()
}

struct Peer {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
    args: Vec<String>,
}

impl Peer {
    async fn start(args: &[&str]) -> Peer {
        let dir = tempfile::tempdir().expect("temp dir");
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let port = free_port();
        let child = spawn_peer(port, dir.path(), &args).await;
        Peer {
            child,
            port,
            dir,
            args,
        }
    }

    async fn kill(&mut self) {
        self.child.kill().await.expect("kill the peer");
    }

    /// A new peer process on the same port (its address list starts empty again).
    async fn restart(&mut self) {
        self.kill().await;
        self.child = spawn_peer(self.port, self.dir.path(), &self.args).await;
    }

    fn records(&self) -> Vec<Value> {
        let text =
            std::fs::read_to_string(self.dir.path().join("sentences.jsonl")).unwrap_or_default();
        text.lines()
            .map(|l| serde_json::from_str(l).expect("peer log is JSON lines"))
            .collect()
    }

    /// Every sentence received, as words.
    fn sentences(&self) -> Vec<Vec<String>> {
        self.records()
            .iter()
            .filter_map(|r| r.get("words"))
            .map(|w| serde_json::from_value(w.clone()).expect("words are strings"))
            .collect()
    }

    /// Sentences other than logins, with the `.tag` word taken off (checked unique).
    fn commands(&self) -> Vec<Vec<String>> {
        let mut tags = std::collections::HashSet::new();
        self.sentences()
            .into_iter()
            .filter(|s| s[0] != "/login")
            .map(|mut s| {
                let at = s
                    .iter()
                    .position(|w| w.starts_with(".tag="))
                    .expect("every command carries a .tag");
                let tag = s.remove(at);
                assert!(tags.insert(tag.clone()), "tag {tag} used twice");
                s
            })
            .collect()
    }

    fn connections_opened(&self) -> usize {
        self.records()
            .iter()
            .filter(|r| r.get("event").and_then(Value::as_str) == Some("open"))
            .count()
    }

    fn max_concurrent(&self) -> usize {
        std::fs::read_to_string(self.dir.path().join("max-conn"))
            .expect("peer wrote max-conn")
            .trim()
            .parse()
            .expect("a number")
    }

    fn target(&self, max_sessions: usize, password: &str) -> Target {
        target(self.port, max_sessions, password)
    }
}

fn target(port: u16, max_sessions: usize, password: &str) -> Target {
    Target {
        nas_id: 7,
        nas_name: "mikrotik".into(),
        host: "127.0.0.1".into(),
        port,
        login: Some(USER.into()),
        password: Some(Secret::new(password)),
        secret: None,
        max_sessions,
    }
}

async fn spawn_peer(port: u16, dir: &Path, args: &[String]) -> Child {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers/routeros_api/fake_api.py");
    let mut child = Command::new(python())
        .arg(script)
        .args(["--port", &port.to_string()])
        .arg("--log")
        .arg(dir.join("sentences.jsonl"))
        .arg("--max-conn")
        .arg(dir.join("max-conn"))
        .args(["--user", USER, "--password", PASSWORD])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the fake RouterOS API peer");
    let stdout = child.stdout.take().expect("peer stdout");
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .expect("peer ready within 10s")
        .expect("read peer stdout");
    assert_eq!(line.as_deref(), Some("READY"));
    child
}

fn pool(target: Target, legacy_login: bool) -> ApiPool {
    ApiPool::new(
        target,
        ApiOptions {
            connect_timeout: Duration::from_secs(2),
            legacy_login,
            tls: None,
        },
    )
}

fn cmds(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn words(list: &[&str]) -> Vec<String> {
    cmds(list)
}

const ADD: &str =
    r#"/ip/firewall/address-list/add =list=allowed =address=10.88.0.2 =comment="x; /system reset""#;

#[tokio::test]
async fn plaintext_login_add_duplicate_print_remove() {
    let peer = Peer::start(&[]).await;
    let pool = pool(peer.target(1, PASSWORD), false);
    let commands = cmds(&[
        ADD,
        ADD,
        "/ip/firewall/address-list/print ?address=10.88.0.2",
        "/ip/firewall/address-list/remove =numbers=*99",
    ]);
    let result = pool.run(&commands, TIMEOUT).await;
    assert_eq!(result.error, None);
    let outputs: Vec<&str> = result.exchanges.iter().map(|e| e.output.as_str()).collect();
    assert_eq!(
        outputs,
        [
            "ret=*1",
            "failure: already have such entry",
            ".id=*1 list=allowed address=10.88.0.2 comment=x; /system reset",
            "failure: no such item",
        ]
    );
    let sent: Vec<&str> = result
        .exchanges
        .iter()
        .map(|e| e.command.as_str())
        .collect();
    assert_eq!(sent, commands);

    // A second run reuses the logged-in connection.
    let result = pool
        .run(
            &cmds(&[
                "/ip/firewall/address-list/remove =.id=*1",
                "/ip/firewall/address-list/print ?address=10.88.0.2",
            ]),
            TIMEOUT,
        )
        .await;
    assert_eq!(result.error, None);
    assert_eq!(result.exchanges[0].output, "");
    assert_eq!(result.exchanges[1].output, "");
    assert_eq!(pool.open_sessions(), 1);
    assert_eq!(peer.connections_opened(), 1);

    // The device received exactly the words we meant: the injected text is one value.
    let add = words(&[
        "/ip/firewall/address-list/add",
        "=list=allowed",
        "=address=10.88.0.2",
        "=comment=x; /system reset",
    ]);
    assert_eq!(
        peer.commands(),
        vec![
            add.clone(),
            add,
            words(&["/ip/firewall/address-list/print", "?address=10.88.0.2"]),
            words(&["/ip/firewall/address-list/remove", "=numbers=*99"]),
            words(&["/ip/firewall/address-list/remove", "=.id=*1"]),
            words(&["/ip/firewall/address-list/print", "?address=10.88.0.2"]),
        ]
    );
    let logins: Vec<Vec<String>> = peer
        .sentences()
        .into_iter()
        .filter(|s| s[0] == "/login")
        .collect();
    let expected_login = format!("=password={PASSWORD}");
    assert_eq!(
        logins,
        vec![words(&["/login", "=name=api", expected_login.as_str()])]
    );

    pool.close().await;
    assert_eq!(pool.open_sessions(), 0);
    let after = pool.run(&cmds(&["/system/identity/print"]), TIMEOUT).await;
    assert!(
        matches!(after.error, Some(SessionError::Closed(..))),
        "{after:?}"
    );
}

#[tokio::test]
async fn legacy_challenge_login() {
    let peer = Peer::start(&["--legacy"]).await;
    let legacy = pool(peer.target(1, PASSWORD), true);
    let result = legacy.run(&cmds(&[ADD]), TIMEOUT).await;
    assert_eq!(result.error, None);
    assert_eq!(result.exchanges[0].output, "ret=*1");
    let logins: Vec<Vec<String>> = peer
        .sentences()
        .into_iter()
        .filter(|s| s[0] == "/login")
        .collect();
    assert_eq!(logins.len(), 2, "{logins:?}");
    assert_eq!(logins[0], words(&["/login"]));
    assert_eq!(logins[1][..2], words(&["/login", "=name=api"]));
    let response = logins[1][2]
        .strip_prefix("=response=00")
        .expect("an MD5 response");
    assert_eq!(response.len(), 32);
    assert!(!logins.concat().iter().any(|w| w.contains(PASSWORD)));

    // A device older than 6.43 answers the plaintext login with a challenge; the
    // client answers it, so such a device works without the option.
    let plain = pool(peer.target(1, PASSWORD), false);
    let result = plain
        .run(
            &cmds(&["/ip/firewall/address-list/print ?address=10.88.0.2"]),
            TIMEOUT,
        )
        .await;
    assert_eq!(result.error, None);
    assert_eq!(
        result.exchanges[0].output,
        ".id=*1 list=allowed address=10.88.0.2 comment=x; /system reset"
    );

    let wrong = pool(peer.target(1, "wrong"), true);
    let result = wrong.run(&cmds(&[ADD]), TIMEOUT).await;
    assert_eq!(
        result.error,
        Some(SessionError::Auth(
            "nas 7 (127.0.0.1:".to_string() + &peer.port.to_string() + ")",
            USER.into()
        ))
    );
}

#[tokio::test]
async fn wrong_password_is_auth_and_backs_off() {
    let peer = Peer::start(&[]).await;
    let pool = pool(peer.target(2, "not-the-password"), false);
    let result = pool.run(&cmds(&[ADD]), TIMEOUT).await;
    assert!(result.exchanges.is_empty());
    let error = result.error.expect("an error");
    assert!(
        matches!(error, SessionError::Auth(_, ref u) if u == USER),
        "{error:?}"
    );
    assert!(!error.to_string().contains("not-the-password"), "{error}");
    assert_eq!(pool.open_sessions(), 0);

    // Straight after, inside the back-off: the same verdict without a new login.
    let result = pool.run(&cmds(&[ADD]), Duration::from_millis(20)).await;
    assert!(
        matches!(result.error, Some(SessionError::Auth(..))),
        "{result:?}"
    );
    let logins = peer.sentences().iter().filter(|s| s[0] == "/login").count();
    assert_eq!(logins, 1);
    assert!(peer.commands().is_empty(), "nothing but the login was sent");
}

#[tokio::test]
async fn parse_error_sends_nothing() {
    let peer = Peer::start(&[]).await;
    let pool = pool(peer.target(1, PASSWORD), false);
    let bad = "/ip/firewall/address-list/add =list=allowed =comment=x /system/reset";
    let result = pool.run(&cmds(&[ADD, bad]), TIMEOUT).await;
    assert!(result.exchanges.is_empty());
    match result.error {
        Some(SessionError::Protocol(_, message)) => {
            assert!(message.contains(bad), "{message}");
            assert!(message.contains("nothing was sent"), "{message}");
        }
        other => panic!("expected a protocol error, got {other:?}"),
    }
    assert_eq!(peer.connections_opened(), 0);
}

#[tokio::test]
async fn never_more_than_max_sessions() {
    let peer = Peer::start(&["--delay-ms", "150"]).await;
    let pool = Arc::new(pool(peer.target(2, PASSWORD), false));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..8 {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            let command =
                format!("/ip/firewall/address-list/add =list=allowed =address=10.0.0.{i}");
            pool.run(&[command], Duration::from_secs(5)).await
        }));
    }
    for task in tasks {
        let result = task.await.expect("task");
        assert_eq!(result.error, None);
        assert!(
            result.exchanges[0].output.starts_with("ret=*"),
            "{result:?}"
        );
    }
    // 8 commands of 150 ms over 2 connections take at least 4 rounds.
    assert!(started.elapsed() >= Duration::from_millis(550));
    assert_eq!(peer.max_concurrent(), 2);
    assert_eq!(peer.connections_opened(), 2);
    assert_eq!(pool.open_sessions(), 2);
    assert_eq!(peer.commands().len(), 8);
}

#[tokio::test]
async fn slow_answer_times_out_and_drops_the_connection() {
    let peer = Peer::start(&["--delay-ms", "1500"]).await;
    let pool = pool(peer.target(1, PASSWORD), false);
    let started = Instant::now();
    let result = pool
        .run(&cmds(&[ADD, ADD]), Duration::from_millis(300))
        .await;
    assert!(started.elapsed() < Duration::from_secs(1));
    assert!(result.exchanges.is_empty());
    match result.error {
        Some(SessionError::Timeout(_, message)) => assert!(message.contains(ADD), "{message}"),
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert_eq!(pool.open_sessions(), 0);
}

#[tokio::test]
async fn peer_killed_mid_command_then_restarted() {
    let mut peer = Peer::start(&["--delay-ms", "3000"]).await;
    let pool = Arc::new(pool(peer.target(1, PASSWORD), false));
    let running = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.run(&cmds(&[ADD]), Duration::from_secs(5)).await })
    };
    // Wait until the command has reached the peer, then kill it mid-command.
    let deadline = Instant::now() + Duration::from_secs(5);
    while peer.commands().is_empty() {
        assert!(Instant::now() < deadline, "command never arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let started = Instant::now();
    peer.kill().await;
    let result = running.await.expect("task");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(result.exchanges.is_empty());
    assert!(
        matches!(
            result.error,
            Some(SessionError::Closed(..) | SessionError::Timeout(..))
        ),
        "{result:?}"
    );
    assert_eq!(pool.open_sessions(), 0);

    peer.args = Vec::new();
    peer.restart().await;
    let result = pool.run(&cmds(&[ADD]), TIMEOUT).await;
    assert_eq!(result.error, None);
    assert_eq!(result.exchanges[0].output, "ret=*1");
}

#[tokio::test]
async fn stale_idle_connection_is_replaced() {
    let mut peer = Peer::start(&[]).await;
    let pool = pool(peer.target(1, PASSWORD), false);
    let result = pool.run(&cmds(&[ADD]), TIMEOUT).await;
    assert_eq!(result.error, None);
    assert_eq!(pool.open_sessions(), 1);
    // The device restarts while our connection sits idle.
    peer.restart().await;
    let result = pool.run(&cmds(&[ADD]), TIMEOUT).await;
    assert_eq!(result.error, None, "{result:?}");
    assert_eq!(result.exchanges[0].output, "ret=*1");
    assert_eq!(pool.open_sessions(), 1);
}

#[tokio::test]
async fn reused_connection_dropped_without_answer_is_retried_once_on_a_new_one() {
    let peer = Peer::start(&["--hangup-once"]).await;
    let pool = pool(peer.target(1, PASSWORD), false);
    let first = pool.run(&cmds(&[ADD]), TIMEOUT).await;
    assert_eq!(first.error, None);
    // The peer closes the reused connection on this command without a word.
    let second = pool
        .run(
            &cmds(&["/ip/firewall/address-list/print ?address=10.88.0.2"]),
            TIMEOUT,
        )
        .await;
    assert_eq!(second.error, None, "{second:?}");
    assert_eq!(
        second.exchanges[0].output,
        ".id=*1 list=allowed address=10.88.0.2 comment=x; /system reset"
    );
    assert_eq!(peer.connections_opened(), 2);
    assert_eq!(peer.commands().len(), 3);
    assert_eq!(pool.open_sessions(), 1);
}

#[tokio::test]
async fn connect_failure_backs_off_without_blocking_past_the_deadline() {
    let port = free_port();
    let pool = pool(target(port, 1, PASSWORD), false);
    let result = pool.run(&cmds(&[ADD]), TIMEOUT).await;
    assert!(
        matches!(result.error, Some(SessionError::Connect(..))),
        "{result:?}"
    );
    // Back-off (100 ms) ends after this run's deadline: it is answered from the backoff
    // (the error says it is not retrying yet) without waiting for it.
    let result = pool.run(&cmds(&[ADD]), Duration::from_millis(30)).await;
    match result.error {
        Some(SessionError::Connect(_, message)) => {
            assert!(message.contains("not retrying"), "{message}")
        }
        other => panic!("expected a connect error, got {other:?}"),
    }
    // With time to spare it waits out the back-off and tries again.
    let result = pool.run(&cmds(&[ADD]), Duration::from_secs(2)).await;
    match result.error {
        Some(SessionError::Connect(_, message)) => {
            assert!(!message.contains("not retrying"), "{message}")
        }
        other => panic!("expected a connect error, got {other:?}"),
    }
    assert_eq!(pool.open_sessions(), 0);
}

/// Our encoder against librouteros's, for words across every length class.
#[tokio::test]
async fn sentences_encode_like_librouteros() {
    let sentences: Vec<Vec<String>> = vec![
        words(&[
            "/ip/firewall/address-list/add",
            "=comment=x; /system reset",
            ".tag=1",
        ]),
        vec!["!re".into(), "=a=".to_string() + &"b".repeat(0x7C)],
        vec!["=x=".to_string() + &"\u{416}".repeat(0x2000)],
        vec!["y".repeat(0x3FFF), "z".repeat(0x4000)],
        vec!["w".repeat(0x20_0000)],
    ];
    let program = "import sys, json\nfrom librouteros.protocol import encode_sentence\n\
                   for s in json.load(sys.stdin):\n    \
                   sys.stdout.write(encode_sentence(*s, encoding='utf-8').hex() + '\\n')\n";
    let mut child = Command::new(python())
        .args(["-c", program])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run python");
    let input = serde_json::to_vec(&sentences).expect("json");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(&input).await.expect("write");
    drop(stdin);
    let out = child.wait_with_output().await.expect("python output");
    assert!(out.status.success());
    let theirs: Vec<&str> = std::str::from_utf8(&out.stdout)
        .expect("hex")
        .lines()
        .collect();
    assert_eq!(theirs.len(), sentences.len());
    for (sentence, hex) in sentences.iter().zip(theirs) {
        let ours: String = encode_sentence(sentence)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let start: String = sentence[0].chars().take(20).collect();
        assert!(ours == hex, "sentence starting {start:?} differs");
    }
}

// ---------------------------------------------------------------------------------
// TLS (api-ssl)
// ---------------------------------------------------------------------------------

/// A certificate and key written as PEM for the peer, with its fingerprint in nasd's
/// form and as `openssl x509 -noout -fingerprint -sha256` prints it.
struct Cert {
    cert: PathBuf,
    key: PathBuf,
    fingerprint: String,
    openssl: String,
}

impl Cert {
    fn write(dir: &Path, name: &str, cert: &rcgen::Certificate, key: &rcgen::KeyPair) -> Cert {
        let cert_path = dir.join(format!("{name}.pem"));
        let key_path = dir.join(format!("{name}.key"));
        std::fs::write(&cert_path, cert.pem()).expect("write cert");
        std::fs::write(&key_path, key.serialize_pem()).expect("write key");
        let digest = ring::digest::digest(&ring::digest::SHA256, cert.der());
        let hex: Vec<String> = digest.as_ref().iter().map(|b| format!("{b:02X}")).collect();
        Cert {
            cert: cert_path,
            key: key_path,
            fingerprint: cert_fingerprint(cert.der()),
            openssl: format!("sha256 Fingerprint={}", hex.join(":")),
        }
    }

    /// Self-signed for 127.0.0.1, as a RouterOS router's own certificate usually is.
    fn self_signed(dir: &Path, name: &str) -> Cert {
        let made = rcgen::generate_simple_self_signed(vec![
            "127.0.0.1".to_string(),
            "localhost".to_string(),
        ])
        .expect("self-signed certificate");
        Cert::write(dir, name, &made.cert, &made.signing_key)
    }

    /// The peer's arguments serving this certificate.
    fn args(&self) -> Vec<String> {
        vec![
            "--tls-cert".into(),
            self.cert.display().to_string(),
            "--tls-key".into(),
            self.key.display().to_string(),
        ]
    }
}

/// A CA whose certificate is written to `ca.pem`.
struct TestCa {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    pem: PathBuf,
}

impl TestCa {
    fn new(dir: &Path) -> TestCa {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "nasd test CA");
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("CA certificate");
        let pem = dir.join("ca.pem");
        std::fs::write(&pem, cert.pem()).expect("write CA");
        TestCa {
            issuer: rcgen::Issuer::new(params, key),
            pem,
        }
    }

    fn issue(&self, dir: &Path, name: &str, names: &[&str]) -> Cert {
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .expect("leaf params");
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let key = rcgen::KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign leaf");
        Cert::write(dir, name, &cert, &key)
    }
}

fn tls_pool(target: Target, policy: CertPolicy, known_certs: &Path) -> ApiPool {
    ApiPool::new(
        target,
        ApiOptions {
            connect_timeout: Duration::from_secs(2),
            legacy_login: false,
            tls: Some(ApiTls {
                policy,
                known_certs: known_certs.to_path_buf(),
            }),
        },
    )
}

async fn tls_peer(cert: &Cert, extra: &[&str]) -> Peer {
    let mut args = cert.args();
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Peer::start(&args).await
}

const PRINT: &str = "/ip/firewall/address-list/print ?address=10.88.0.2";

#[tokio::test]
async fn tls_pinned_fingerprint_runs_commands_over_reused_connections() {
    let certs = tempfile::tempdir().expect("temp dir");
    let cert = Cert::self_signed(certs.path(), "router");
    let peer = tls_peer(&cert, &["--delay-ms", "100"]).await;
    // Pinned as openssl prints it; nasd compares it in its own form.
    let pin = normalize_fingerprint(&cert.openssl).expect("openssl's fingerprint form");
    assert_eq!(pin, cert.fingerprint);
    let known = certs.path().join("known_hosts.tls");
    let pool = Arc::new(tls_pool(
        peer.target(2, PASSWORD),
        CertPolicy::Pinned(pin),
        &known,
    ));
    let result = pool.run(&cmds(&[ADD, ADD, PRINT]), TIMEOUT).await;
    assert_eq!(result.error, None);
    let outputs: Vec<&str> = result.exchanges.iter().map(|e| e.output.as_str()).collect();
    assert_eq!(
        outputs,
        [
            "ret=*1",
            "failure: already have such entry",
            ".id=*1 list=allowed address=10.88.0.2 comment=x; /system reset",
        ]
    );
    // The login and the words crossed TLS intact (librouteros decoded them).
    let expected_login = format!("=password={PASSWORD}");
    assert_eq!(
        peer.sentences()[0],
        words(&["/login", "=name=api", expected_login.as_str()])
    );
    assert_eq!(
        peer.commands()[0],
        words(&[
            "/ip/firewall/address-list/add",
            "=list=allowed",
            "=address=10.88.0.2",
            "=comment=x; /system reset",
        ])
    );
    // Pinning writes nothing.
    assert!(!known.exists());

    // Four at once on two sessions: the idle one is reused, a second is opened (and may
    // resume the TLS session), never more.
    let mut tasks = Vec::new();
    for i in 0..4 {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            let add = format!("/ip/firewall/address-list/add =list=allowed =address=10.0.0.{i}");
            pool.run(&[add], TIMEOUT).await
        }));
    }
    for task in tasks {
        let result = task.await.expect("task");
        assert_eq!(result.error, None);
        assert!(
            result.exchanges[0].output.starts_with("ret=*"),
            "{result:?}"
        );
    }
    assert_eq!(peer.connections_opened(), 2);
    assert_eq!(peer.max_concurrent(), 2);
    assert_eq!(pool.open_sessions(), 2);
    assert_eq!(peer.commands().len(), 7);
    pool.close().await;
    assert_eq!(pool.open_sessions(), 0);
}

#[tokio::test]
async fn tls_wrong_pin_names_both_fingerprints_and_sends_nothing() {
    let certs = tempfile::tempdir().expect("temp dir");
    let cert = Cert::self_signed(certs.path(), "router");
    let other = Cert::self_signed(certs.path(), "other");
    let peer = tls_peer(&cert, &[]).await;
    let pool = tls_pool(
        peer.target(1, PASSWORD),
        CertPolicy::Pinned(other.fingerprint.clone()),
        &certs.path().join("known_hosts.tls"),
    );
    let result = pool.run(&cmds(&[ADD]), TIMEOUT).await;
    assert!(result.exchanges.is_empty());
    let error = result.error.expect("refused");
    assert!(
        matches!(error, SessionError::HostKeyChanged { .. }),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(
        message.contains(&other.fingerprint) && message.contains(&cert.fingerprint),
        "{message}"
    );
    assert!(message.contains("nothing was sent"), "{message}");
    assert!(!message.contains(PASSWORD), "{message}");
    // The handshake happened, then nasd hung up: no login, no command.
    assert!(peer.sentences().is_empty(), "{:?}", peer.sentences());
    assert_eq!(pool.open_sessions(), 0);
}

#[tokio::test]
async fn tls_accept_new_learns_then_refuses_a_changed_certificate() {
    let certs = tempfile::tempdir().expect("temp dir");
    let first = Cert::self_signed(certs.path(), "first");
    let second = Cert::self_signed(certs.path(), "second");
    let mut peer = tls_peer(&first, &[]).await;
    let known = certs.path().join("var/known_hosts.tls");
    let pool = tls_pool(peer.target(1, PASSWORD), CertPolicy::AcceptNew, &known);
    let result = pool.run(&cmds(&[ADD]), TIMEOUT).await;
    assert_eq!(result.error, None);
    let entry = format!("[127.0.0.1]:{} {}", peer.port, first.fingerprint);
    let recorded = std::fs::read_to_string(&known).expect("learned");
    assert_eq!(
        recorded
            .lines()
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>(),
        [entry.as_str()]
    );

    // Another pool (a daemon restart) accepts the recorded certificate, learns nothing.
    let again = tls_pool(peer.target(1, PASSWORD), CertPolicy::AcceptNew, &known);
    let result = again.run(&cmds(&[PRINT]), TIMEOUT).await;
    assert_eq!(result.error, None);
    assert_eq!(std::fs::read_to_string(&known).expect("file"), recorded);

    // The device comes back with another certificate.
    let sent_before = peer.sentences().len();
    peer.args = second.args();
    peer.restart().await;
    let result = pool.run(&cmds(&[ADD]), TIMEOUT).await;
    let error = result.error.expect("refused");
    match &error {
        SessionError::HostKeyChanged { known, offered, .. } => {
            assert!(known.contains(&first.fingerprint), "{known}");
            assert!(offered.contains(&second.fingerprint), "{offered}");
        }
        other => panic!("expected a changed certificate, got {other:?}"),
    }
    assert_eq!(peer.sentences().len(), sent_before, "nothing was sent");
    // Still only the first certificate is recorded.
    assert_eq!(std::fs::read_to_string(&known).expect("file"), recorded);
}

#[tokio::test]
async fn tls_strict_needs_a_recorded_fingerprint() {
    let certs = tempfile::tempdir().expect("temp dir");
    let cert = Cert::self_signed(certs.path(), "router");
    let peer = tls_peer(&cert, &[]).await;
    let known = certs.path().join("known_hosts.tls");
    let pool = tls_pool(peer.target(1, PASSWORD), CertPolicy::Strict, &known);
    let result = pool.run(&cmds(&[ADD]), TIMEOUT).await;
    match &result.error {
        Some(SessionError::HostKeyUnknown {
            offered,
            known_hosts,
            ..
        }) => {
            assert!(offered.contains(&cert.fingerprint), "{offered}");
            assert_eq!(known_hosts, &known.display().to_string());
        }
        other => panic!("expected an unknown certificate, got {other:?}"),
    }
    assert!(peer.sentences().is_empty());
    assert!(!known.exists(), "strict learns nothing");

    // The operator records it (in openssl's form); a new pool then connects.
    std::fs::write(
        &known,
        format!("[127.0.0.1]:{} {}\n", peer.port, {
            cert.openssl.trim_start_matches("sha256 Fingerprint=")
        }),
    )
    .expect("record");
    let pool = tls_pool(peer.target(1, PASSWORD), CertPolicy::Strict, &known);
    let result = pool.run(&cmds(&[ADD]), TIMEOUT).await;
    assert_eq!(result.error, None);
    assert_eq!(result.exchanges[0].output, "ret=*1");
}

#[tokio::test]
async fn tls_strict_with_a_ca_verifies_chain_and_name() {
    let certs = tempfile::tempdir().expect("temp dir");
    let ca = TestCa::new(certs.path());
    let roots = load_ca_file(&ca.pem).expect("CA bundle");
    let known = certs.path().join("known_hosts.tls");
    let policy = CertPolicy::Ca {
        roots,
        file: ca.pem.clone(),
    };

    let good = ca.issue(certs.path(), "good", &["127.0.0.1"]);
    let mut peer = tls_peer(&good, &[]).await;
    let pool = tls_pool(peer.target(1, PASSWORD), policy.clone(), &known);
    let result = pool.run(&cmds(&[ADD]), TIMEOUT).await;
    assert_eq!(result.error, None);
    assert_eq!(result.exchanges[0].output, "ret=*1");
    assert!(!known.exists(), "a CA-verified device is not recorded");
    pool.close().await;

    // Self-signed, or signed by the CA for another address: refused in the handshake.
    let self_signed = Cert::self_signed(certs.path(), "self");
    let elsewhere = ca.issue(certs.path(), "elsewhere", &["10.9.9.9", "router.example"]);
    for (cert, why) in [
        (&self_signed, "UnknownIssuer"),
        (&elsewhere, "not valid for name \"127.0.0.1\""),
    ] {
        let sent_before = peer.sentences().len();
        peer.args = cert.args();
        peer.restart().await;
        let pool = tls_pool(peer.target(1, PASSWORD), policy.clone(), &known);
        let result = pool.run(&cmds(&[ADD]), TIMEOUT).await;
        match &result.error {
            Some(SessionError::Connect(_, message)) => {
                assert!(message.contains("TLS handshake failed"), "{message}");
                assert!(message.contains(why), "{message}");
                assert!(message.contains(&ca.pem.display().to_string()), "{message}");
            }
            other => panic!("expected a refused certificate, got {other:?}"),
        }
        assert_eq!(peer.sentences().len(), sent_before, "nothing was sent");
    }
}

#[tokio::test]
async fn tls_and_plain_ports_mixed_up_give_clear_errors() {
    let certs = tempfile::tempdir().expect("temp dir");
    let cert = Cert::self_signed(certs.path(), "router");
    let known = certs.path().join("known_hosts.tls");

    // TLS to the plain API port.
    let plain = Peer::start(&[]).await;
    let tls_to_plain = tls_pool(plain.target(1, PASSWORD), CertPolicy::AcceptNew, &known);
    let result = tls_to_plain.run(&cmds(&[ADD]), TIMEOUT).await;
    match &result.error {
        Some(SessionError::Connect(_, message)) => {
            assert!(
                message.contains(&format!("does not speak TLS on port {}", plain.port)),
                "{message}"
            );
        }
        other => panic!("expected a connect error, got {other:?}"),
    }
    assert!(!known.exists());

    // Plain TCP to the api-ssl port: OpenSSL hangs up without a word, and the error
    // says what that usually means.
    let tls = tls_peer(&cert, &[]).await;
    let plain_pool = pool(tls.target(1, PASSWORD), false);
    let result = plain_pool.run(&cmds(&[ADD]), TIMEOUT).await;
    assert!(result.exchanges.is_empty());
    match &result.error {
        Some(SessionError::Closed(_, message)) => {
            assert!(
                message.contains(&format!("if port {} serves api-ssl", tls.port)),
                "{message}"
            );
            assert!(!message.contains(PASSWORD), "{message}");
        }
        other => panic!("expected a closed connection, got {other:?}"),
    }
    assert!(tls.sentences().is_empty());
}

// ---------------------------------------------------------------------------------
// The simulator's api-ssl
// ---------------------------------------------------------------------------------

fn sim_target(port: u16) -> Target {
    Target {
        nas_id: 9,
        nas_name: "sim".into(),
        host: "127.0.0.1".into(),
        port,
        login: Some("admin".into()),
        password: Some(Secret::new("admin")),
        secret: None,
        max_sessions: 1,
    }
}

#[tokio::test]
async fn sim_api_ssl_keeps_its_certificate_and_tells_ports_apart() {
    use nasd::sim::SimOptions;
    let dir = tempfile::tempdir().expect("temp dir");
    let opts = SimOptions {
        tls_cert: Some(dir.path().join("sim.pem")),
        tls_key: Some(dir.path().join("sim.key")),
        ..SimOptions::default()
    };
    let sim = nasd::sim::start(&opts, tokio_util::sync::CancellationToken::new())
        .await
        .expect("sim starts");
    let fingerprint = sim.api_tls_fingerprint.clone();
    // The printed fingerprint is the one of the certificate file it wrote.
    use rustls::pki_types::pem::PemObject as _;
    let der = rustls::pki_types::CertificateDer::from_pem_file(dir.path().join("sim.pem"))
        .expect("certificate written as PEM");
    assert_eq!(cert_fingerprint(&der), fingerprint);
    let known = dir.path().join("known_hosts.tls");
    let pinned = tls_pool(
        sim_target(sim.api_tls_addr.port()),
        CertPolicy::Pinned(fingerprint.clone()),
        &known,
    );
    let result = pinned
        .run(&cmds(&["/system/identity/print"]), TIMEOUT)
        .await;
    assert_eq!(result.error, None);
    assert_eq!(result.exchanges[0].output, "name=sim");
    pinned.close().await;

    // TLS to the plain API port, and plain TCP to the api-ssl port.
    let result = tls_pool(
        sim_target(sim.api_addr.port()),
        CertPolicy::AcceptNew,
        &known,
    )
    .run(&cmds(&["/system/identity/print"]), TIMEOUT)
    .await;
    match &result.error {
        Some(SessionError::Connect(_, message)) => assert!(
            message.contains(&format!(
                "does not speak TLS on port {}",
                sim.api_addr.port()
            )),
            "{message}"
        ),
        other => panic!("expected a connect error, got {other:?}"),
    }
    let result = pool(sim_target(sim.api_tls_addr.port()), false)
        .run(&cmds(&["/system/identity/print"]), TIMEOUT)
        .await;
    let error = result.error.expect("an error").to_string();
    assert!(error.contains("serves api-ssl"), "{error}");
    assert!(!known.exists());
    let executed = sim.device.counters().commands_executed;
    assert_eq!(executed, 1, "only the pinned session's command ran");
    sim.stop().await;

    // Restarted with the same files: the same certificate.
    let sim = nasd::sim::start(&opts, tokio_util::sync::CancellationToken::new())
        .await
        .expect("sim restarts");
    assert_eq!(sim.api_tls_fingerprint, fingerprint);
    sim.stop().await;
}

/// librouteros over Python's ssl module (OpenSSL) as the client of the simulator's
/// api-ssl: the certificate it sees is the one whose fingerprint the simulator printed.
const LIBROUTEROS_TLS_CLIENT: &str = r#"
import hashlib, json, ssl, sys
from librouteros import connect
port = int(sys.argv[1])
context = ssl.create_default_context()
context.check_hostname = False
context.verify_mode = ssl.CERT_NONE
api = connect(host="127.0.0.1", username="admin", password="admin", port=port,
              timeout=10, ssl_wrapper=context.wrap_socket)
lists = api.path("ip", "firewall", "address-list")
out = {"id": lists.add(list="allowed", address="10.88.0.40", comment="crb_10.88.0.40")}
out["identity"] = list(api.path("system", "identity"))
api.close()
pem = ssl.get_server_certificate(("127.0.0.1", port))
out["sha256"] = hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).hexdigest()
print(json.dumps(out))
"#;

#[tokio::test]
async fn librouteros_over_ssl_talks_to_the_sim_api_ssl() {
    let sim = nasd::sim::start(
        &nasd::sim::SimOptions::default(),
        tokio_util::sync::CancellationToken::new(),
    )
    .await
    .expect("sim starts");
    let out = Command::new(python())
        .args([
            "-c",
            LIBROUTEROS_TLS_CLIENT,
            &sim.api_tls_addr.port().to_string(),
        ])
        .kill_on_drop(true)
        .output()
        .await
        .expect("run python");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(got["id"], "*1");
    assert_eq!(got["identity"][0]["name"], "sim");
    let sha256 = got["sha256"].as_str().expect("hex digest");
    assert_eq!(
        normalize_fingerprint(sha256).as_deref(),
        Ok(sim.api_tls_fingerprint.as_str())
    );
    let state = sim.device.state();
    assert_eq!(state.address_list.len(), 1);
    assert_eq!(state.address_list[0].comment, "crb_10.88.0.40");
    sim.stop().await;
}

/// mikrotik-api-ssl through the whole pipeline to two simulated routers: NAS 1 pinned to
/// the fingerprint its simulator printed, NAS 2 learning its one on first use.
async fn api_ssl_pipeline_to_the_simulator(backend: Backend) {
    use common::{TestEnv, add_accounts, event, wait_history};
    use nasd::sim::SimOptions;
    use nasd::store::{CompactEvent, Nas};
    let env = TestEnv::new(backend).await;
    let mut sims = Vec::new();
    for listen in ["127.0.0.1", "127.0.0.2"] {
        let opts = SimOptions {
            listen: listen.into(),
            ..SimOptions::default()
        };
        let sim = nasd::sim::start(&opts, tokio_util::sync::CancellationToken::new())
            .await
            .expect("sim starts");
        sims.push(sim);
    }
    let store = env.store().await;
    for (id, sim, pin, policy) in [
        (
            1,
            &sims[0],
            Some(sims[0].api_tls_fingerprint.clone()),
            "strict",
        ),
        (2, &sims[1], None, "accept-new"),
    ] {
        let mut nas = Nas::new(
            id,
            &format!("Ros API-SSL {id}"),
            &sim.api_tls_addr.ip().to_string(),
        );
        nas.scheme = Some("mikrotik-api-ssl".into());
        nas.port = Some(i32::from(sim.api_tls_addr.port()));
        nas.login = Some("admin".into());
        nas.password = Some(Secret::new("admin"));
        nas.n_workers = 4;
        nas.max_sessions = 2;
        nas.host_key_policy = policy.into();
        nas.host_key = pin;
        store.nas_upsert(&nas).await.expect("nas");
    }
    // Odd accounts on NAS 1, even ones on NAS 2.
    let accounts = 20;
    add_accounts(&store, accounts, &[1, 2]).await;
    let mut events: Vec<CompactEvent> = (1..=accounts).map(|u| event("user_add", u)).collect();
    events.extend((1..=5).map(|u| event("user_drop", u)));
    store.enqueue_compact(&events).await.expect("enqueue");

    let mut cfg = env.config();
    cfg.daemon.schemes_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("schemes");
    cfg.daemon.transport.known_hosts = env.path().join("known_hosts");
    let token = tokio_util::sync::CancellationToken::new();
    let daemon = tokio::spawn(nasd::daemon::run(cfg, token.clone()));
    wait_history(&store, events.len() as i64, Duration::from_secs(60)).await;
    token.cancel();
    daemon.await.expect("join").expect("daemon");

    let history = store.history(None, 100).await.expect("history");
    assert!(
        history.iter().all(|h| h.outcome == "done"),
        "{:?}",
        history.iter().find(|h| h.outcome != "done")
    );
    // Accounts 1, 3, 5 were dropped from router 1 and 2, 4 from router 2.
    for (sim, dropped, kept) in [
        (&sims[0], "crb_10.88.0.2", "crb_10.88.0.8"),
        (&sims[1], "crb_10.88.0.3", "crb_10.88.0.7"),
    ] {
        let state = sim.device.state();
        let allowed: Vec<&str> = state
            .address_list
            .iter()
            .filter(|e| e.list == "allowed")
            .map(|e| e.comment.as_str())
            .collect();
        assert!(!allowed.contains(&dropped), "{allowed:?}");
        assert!(allowed.contains(&kept), "{allowed:?}");
        assert_eq!(state.queues.len(), 10);
        assert!(sim.device.counters().max_concurrent_sessions <= 2);
    }
    assert_eq!(sims[0].device.state().address_list.len(), 7);
    assert_eq!(sims[1].device.state().address_list.len(), 8);
    // NAS 2 recorded its router's certificate; pinned NAS 1 wrote nothing.
    let learned = std::fs::read_to_string(env.path().join("known_hosts.tls")).expect("learned");
    let lines: Vec<&str> = learned.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(
        lines,
        [format!(
            "[127.0.0.2]:{} {}",
            sims[1].api_tls_addr.port(),
            sims[1].api_tls_fingerprint
        )]
    );
    for sim in sims {
        sim.stop().await;
    }
}

both_backends!(api_ssl_pipeline_to_the_simulator);
