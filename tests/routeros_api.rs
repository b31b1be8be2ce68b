//! The RouterOS API transport against a fake API listener built on the Python
//! `librouteros` package's own encoder and decoder (tests/peers/routeros_api), run with
//! the project's peer venv (`scripts/test-setup.sh` installs it).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nasd::store::Secret;
use nasd::transport::routeros_api::{ApiOptions, ApiPool, encode_sentence};
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
    let started = Instant::now();
    let result = pool.run(&cmds(&[ADD]), Duration::from_millis(20)).await;
    assert!(
        matches!(result.error, Some(SessionError::Auth(..))),
        "{result:?}"
    );
    assert!(started.elapsed() < Duration::from_millis(500));
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
    // Back-off (100 ms) ends after this run's deadline: it fails at once.
    let started = Instant::now();
    let result = pool.run(&cmds(&[ADD]), Duration::from_millis(30)).await;
    // Under the 100 ms back-off, so it did not wait for it (slack for a loaded machine).
    assert!(
        started.elapsed() < Duration::from_millis(90),
        "{:?}",
        started.elapsed()
    );
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
