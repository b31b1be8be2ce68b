//! Telnet transport against real telnet servers: busybox telnetd running a shell CLI stub
//! (tests/peers/telnet/cli-stub.sh) and fake-switches' Cisco IOS emulation, plus table
//! tests of the sans-IO `TelnetStream`.

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

use nasd::store::Secret;
use nasd::transport::telnet::{TelnetOptions, TelnetPool, TelnetStream};
use nasd::transport::{SessionError, Target};
use regex::Regex;
use tempfile::TempDir;

const IAC: u8 = 255;
const WILL: u8 = 251;
const WONT: u8 = 252;
const DO: u8 = 253;
const DONT: u8 = 254;
const SB: u8 = 250;
const SE: u8 = 240;
const ECHO: u8 = 1;
const SGA: u8 = 3;
const STATUS: u8 = 5;
const TTYPE: u8 = 24;
const NAWS: u8 = 31;
const LINEMODE: u8 = 34;
const NEW_ENVIRON: u8 = 39;

const T: Duration = Duration::from_secs(3);

fn peers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers/telnet")
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// Waits until something accepts connections on `port`.
#[allow(clippy::disallowed_methods)] // a synchronous wait on a process outside the runtime
fn wait_listening(port: u16, limit: Duration) {
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(start.elapsed() < limit, "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A child process killed when the test ends, however it ends.
struct Peer(Child);

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// busybox telnetd on a loopback port, running the CLI stub, recording into a temp dir.
struct Telnetd {
    dir: TempDir,
    port: u16,
    peer: Option<Peer>,
}

impl Telnetd {
    fn start() -> Telnetd {
        let dir = TempDir::new().unwrap();
        // A copy with the executable bit set, whatever mode the checkout gave the fixture.
        let stub = dir.path().join("cli-stub.sh");
        std::fs::copy(peers_dir().join("cli-stub.sh"), &stub).unwrap();
        std::fs::set_permissions(&stub, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut telnetd = Telnetd {
            dir,
            port: free_port(),
            peer: None,
        };
        telnetd.restart();
        telnetd
    }

    /// Starts (again) on the same port.
    fn restart(&mut self) {
        let child = Command::new("/bin/busybox")
            .args(["telnetd", "-F", "-b", "127.0.0.1", "-f", "/dev/null"])
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-l")
            .arg(self.dir.path().join("cli-stub.sh"))
            .env("STUB_DIR", self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.peer = Some(Peer(child));
        wait_listening(self.port, Duration::from_secs(3));
    }

    fn kill(&mut self) {
        self.peer = None;
    }

    fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }

    /// The commands the stub received, in order, without the PID.
    fn commands(&self) -> Vec<String> {
        self.read("commands")
            .lines()
            .map(|l| l.split_once(' ').map_or("", |(_, c)| c).to_string())
            .collect()
    }

    fn logins(&self) -> usize {
        self.read("sessions")
            .lines()
            .filter(|l| l.starts_with("in "))
            .count()
    }

    /// The most sessions logged in at the same time, from the stub's in/out records.
    fn max_concurrent(&self) -> usize {
        let mut events: Vec<(u128, i32)> = self
            .read("sessions")
            .lines()
            .filter_map(|l| {
                let parts: Vec<&str> = l.split(' ').collect();
                match parts[..] {
                    ["in", _, ns] => Some((ns.parse().unwrap(), 1)),
                    ["out", _, ns] => Some((ns.parse().unwrap(), -1)),
                    _ => None,
                }
            })
            .collect();
        // At equal times count the logout first: the slot was free.
        events.sort();
        let (mut now, mut max) = (0i32, 0i32);
        for (_, delta) in events {
            now += delta;
            max = max.max(now);
        }
        max as usize
    }

    fn target(&self, password: &str, max_sessions: usize) -> Target {
        Target {
            nas_id: 7,
            nas_name: "stub".into(),
            host: "127.0.0.1".into(),
            port: self.port,
            login: Some("admin".into()),
            password: Some(Secret::new(password)),
            secret: None,
            max_sessions,
        }
    }
}

/// The stub's RouterOS-style prompt `[admin@stub] > ` is not the default IOS-style one.
fn stub_options() -> TelnetOptions {
    TelnetOptions {
        prompt: Regex::new(r"^\[[^\]]+\] >\s?$").unwrap(),
        ..TelnetOptions::default()
    }
}

fn cmds(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

async fn wait_until(limit: Duration, what: &str, check: impl Fn() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn login_runs_commands_in_order_and_reuses_the_session() {
    let server = Telnetd::start();
    let pool = TelnetPool::new(server.target("secret", 2), stub_options());
    assert_eq!(pool.open_sessions(), 0, "connects lazily");

    let add = "/ip address add address=10.0.0.1/24 interface=ether1";
    let dup = "/ip address add address=10.0.0.1/24 interface=ether1 dup";
    let result = pool
        .run(&cmds(&[add, dup, "/system identity print"]), T)
        .await;
    assert_eq!(result.error, None);
    let outputs: Vec<&str> = result.exchanges.iter().map(|e| e.output.as_str()).collect();
    assert_eq!(
        outputs,
        [
            format!("ok: {add}").as_str(),
            "failure: already have such entry",
            "  name: stub"
        ]
    );
    assert_eq!(result.exchanges[1].command, dup);
    assert_eq!(
        server.commands(),
        [add, dup, "/system identity print"],
        "each command exactly once, in order"
    );

    let again = pool.run(&cmds(&["/system identity print"]), T).await;
    assert_eq!(again.error, None);
    assert_eq!(again.exchanges[0].output, "  name: stub");
    assert_eq!(pool.open_sessions(), 1);
    assert_eq!(server.logins(), 1, "the second run reused the session");
    assert_eq!(server.commands().len(), 4);

    pool.close().await;
    assert_eq!(pool.open_sessions(), 0);
    wait_until(T, "the stub's logout", || {
        server.read("sessions").contains("out ")
    })
    .await;
    let after = pool.run(&cmds(&["/system identity print"]), T).await;
    assert!(
        matches!(after.error, Some(SessionError::Closed(..))),
        "{after:?}"
    );
}

#[tokio::test]
async fn never_more_sessions_than_max_sessions() {
    let server = Telnetd::start();
    let pool = Arc::new(TelnetPool::new(server.target("secret", 2), stub_options()));
    let start = Instant::now();
    let mut runs = tokio::task::JoinSet::new();
    for i in 0..6 {
        let pool = Arc::clone(&pool);
        runs.spawn(async move { pool.run(&[format!("slow {i}")], T).await });
    }
    while let Some(result) = runs.join_next().await {
        let result = result.unwrap();
        assert_eq!(result.error, None);
        assert_eq!(result.exchanges[0].output, "done slowly");
    }
    // 6 commands of 0.3 s on 2 sessions: at least 3 rounds, so they queued.
    assert!(start.elapsed() >= Duration::from_millis(900));
    assert_eq!(pool.open_sessions(), 2);
    assert_eq!(server.logins(), 2);
    assert_eq!(server.commands().len(), 6);

    pool.close().await;
    wait_until(T, "both logouts", || {
        server.read("sessions").matches("out ").count() == 2
    })
    .await;
    assert_eq!(server.max_concurrent(), 2);
}

#[tokio::test]
async fn wrong_password_is_an_auth_error_and_sends_nothing() {
    let server = Telnetd::start();
    let pool = TelnetPool::new(server.target("not-the-password", 1), stub_options());
    let result = pool.run(&cmds(&["/system identity print"]), T).await;
    assert!(result.exchanges.is_empty());
    match &result.error {
        Some(error @ SessionError::Auth(label, user)) => {
            assert_eq!(*label, format!("nas 7 (127.0.0.1:{})", server.port));
            assert_eq!(user, "admin");
            assert!(!error.to_string().contains("not-the-password"));
        }
        other => panic!("expected Auth, got {other:?}"),
    }
    assert_eq!(pool.open_sessions(), 0);
    assert!(server.commands().is_empty(), "nothing recorded");
    assert_eq!(server.logins(), 0);
    assert!(server.read("sessions").contains("fail "));
}

#[tokio::test]
async fn server_killed_mid_command_then_restarted() {
    let mut server = Telnetd::start();
    let pool = Arc::new(TelnetPool::new(server.target("secret", 1), stub_options()));
    assert_eq!(pool.run(&cmds(&["first"]), T).await.error, None);

    let running = {
        let pool = Arc::clone(&pool);
        tokio::spawn(async move { pool.run(&cmds(&["second", "hang"]), T).await })
    };
    wait_until(T, "the stub to receive `hang`", || {
        server.commands().last().is_some_and(|c| c == "hang")
    })
    .await;
    server.kill();
    let result = running.await.unwrap();
    assert!(
        matches!(
            result.error,
            Some(SessionError::Closed(..) | SessionError::Timeout(..))
        ),
        "{result:?}"
    );
    // `second` completed; the command in flight is not reported as done.
    assert_eq!(result.exchanges.len(), 1);
    assert_eq!(result.exchanges[0].command, "second");
    assert_eq!(pool.open_sessions(), 0, "the broken session was dropped");

    server.restart();
    let result = pool.run(&cmds(&["third"]), T).await;
    assert_eq!(result.error, None);
    assert_eq!(result.exchanges[0].output, "ok: third");
    assert_eq!(pool.open_sessions(), 1);
    assert_eq!(server.logins(), 2);

    // Killed while the session is idle: the next run notices before sending and
    // opens a new session instead of failing.
    server.kill();
    server.restart();
    let result = pool.run(&cmds(&["fourth"]), T).await;
    assert_eq!(result.error, None);
    assert_eq!(result.exchanges[0].output, "ok: fourth");
    assert_eq!(pool.open_sessions(), 1);
    assert_eq!(server.logins(), 3);
}

#[tokio::test]
async fn a_timeout_names_the_wait_and_drops_the_session() {
    let server = Telnetd::start();
    let pool = TelnetPool::new(server.target("secret", 1), stub_options());
    let result = pool
        .run(&cmds(&["first", "hang"]), Duration::from_millis(600))
        .await;
    assert_eq!(result.exchanges.len(), 1);
    match result.error {
        Some(SessionError::Timeout(_, what)) => {
            assert!(
                what.starts_with("waiting for the prompt after `hang`"),
                "{what}"
            );
        }
        other => panic!("expected Timeout, got {other:?}"),
    }
    assert_eq!(
        pool.open_sessions(),
        0,
        "a session in an unknown state is dropped"
    );

    // A line break would desynchronise prompt matching: refused before anything is sent.
    let result = pool.run(&cmds(&["ok", "a\nb"]), T).await;
    assert!(matches!(result.error, Some(SessionError::Protocol(..))));
    assert!(result.exchanges.is_empty());

    let result = pool.run(&cmds(&["again"]), T).await;
    assert_eq!(result.error, None);
    assert_eq!(server.commands(), ["first", "hang", "again"]);
    assert_eq!(server.logins(), 2);
}

#[tokio::test]
async fn connect_failures_back_off_within_the_deadline() {
    let port = free_port();
    let target = Target {
        nas_id: 9,
        nas_name: "down".into(),
        host: "127.0.0.1".into(),
        port,
        login: Some("admin".into()),
        password: Some(Secret::new("secret")),
        secret: None,
        max_sessions: 1,
    };
    let pool = TelnetPool::new(target, stub_options());
    let first = pool.run(&cmds(&["x"]), T).await;
    assert!(
        matches!(first.error, Some(SessionError::Connect(..))),
        "{first:?}"
    );
    // The next attempt is 100 ms away: a run with a shorter deadline is answered from
    // the backoff (the message says when the next attempt is) instead of waiting past
    // its deadline or connecting.
    let second = pool.run(&cmds(&["x"]), Duration::from_millis(20)).await;
    let message = second.error.map(|e| e.to_string()).unwrap_or_default();
    assert!(message.contains("next attempt in"), "{message}");
    // A run with time to spare waits for the backoff, then tries again.
    let start = Instant::now();
    let third = pool.run(&cmds(&["x"]), T).await;
    assert!(matches!(third.error, Some(SessionError::Connect(..))));
    assert!(start.elapsed() >= Duration::from_millis(50));
}

// --- TelnetStream, pure ---

fn feed_all(chunks: &[&[u8]]) -> (String, Vec<u8>) {
    let mut stream = TelnetStream::new();
    let (mut text, mut reply) = (String::new(), Vec::new());
    for chunk in chunks {
        let fed = stream.feed(chunk);
        text.push_str(&fed.text);
        reply.extend(fed.reply);
    }
    (text, reply)
}

fn naws_reply() -> Vec<u8> {
    let mut v = vec![IAC, WILL, NAWS, IAC, SB, NAWS];
    v.extend(nasd::transport::telnet::WINDOW_WIDTH.to_be_bytes());
    v.extend(nasd::transport::telnet::WINDOW_HEIGHT.to_be_bytes());
    v.extend([IAC, SE]);
    v
}

#[test]
fn negotiation_replies() {
    let cases: Vec<(&str, Vec<u8>, Vec<u8>)> = vec![
        ("server echoes", vec![IAC, WILL, ECHO], vec![IAC, DO, ECHO]),
        (
            "server suppresses GA",
            vec![IAC, WILL, SGA],
            vec![IAC, DO, SGA],
        ),
        ("we suppress GA", vec![IAC, DO, SGA], vec![IAC, WILL, SGA]),
        ("we send our window", vec![IAC, DO, NAWS], naws_reply()),
        (
            "no terminal type",
            vec![IAC, DO, TTYPE],
            vec![IAC, WONT, TTYPE],
        ),
        (
            "no environment",
            vec![IAC, DO, NEW_ENVIRON],
            vec![IAC, WONT, NEW_ENVIRON],
        ),
        ("we do not echo", vec![IAC, DO, ECHO], vec![IAC, WONT, ECHO]),
        (
            "no linemode",
            vec![IAC, WILL, LINEMODE],
            vec![IAC, DONT, LINEMODE],
        ),
        (
            "no status",
            vec![IAC, WILL, STATUS],
            vec![IAC, DONT, STATUS],
        ),
        ("refusing is not answered", vec![IAC, WONT, TTYPE], vec![]),
        ("DONT of an off option", vec![IAC, DONT, NAWS], vec![]),
        (
            "busybox telnetd's opening",
            vec![
                IAC, DO, ECHO, IAC, DO, NAWS, IAC, WILL, ECHO, IAC, WILL, SGA,
            ],
            [
                vec![IAC, WONT, ECHO],
                naws_reply(),
                vec![IAC, DO, ECHO, IAC, DO, SGA],
            ]
            .concat(),
        ),
        (
            "no answer loop: a repeated request is answered once",
            vec![
                IAC, WILL, ECHO, IAC, WILL, ECHO, IAC, DO, NAWS, IAC, DO, NAWS,
            ],
            [vec![IAC, DO, ECHO], naws_reply()].concat(),
        ),
        (
            "server stops echoing",
            vec![IAC, WILL, ECHO, IAC, WONT, ECHO],
            vec![IAC, DO, ECHO, IAC, DONT, ECHO],
        ),
    ];
    for (name, input, want) in cases {
        let (text, reply) = feed_all(&[&input]);
        assert_eq!(reply, want, "{name}");
        assert_eq!(text, "", "{name}");
    }
}

/// Name, reads as they arrive, text wanted, reply wanted.
type TextCase<'a> = (&'a str, Vec<&'a [u8]>, &'a str, Vec<u8>);

#[test]
fn text_is_separated_from_telnet_sequences() {
    let cases: Vec<TextCase> = vec![
        (
            "negotiation around text",
            vec![b"\xff\xfb\x01Login: \xff\xfb\x03"],
            "Login: ",
            vec![IAC, DO, ECHO, IAC, DO, SGA],
        ),
        (
            "IAC IAC is one 0xFF data byte (not UTF-8, so replaced)",
            vec![b"a\xff\xffb"],
            "a\u{fffd}b",
            vec![],
        ),
        (
            "escaped IAC at the start of a read",
            vec![b"x", b"\xff\xffy"],
            "x\u{fffd}y",
            vec![],
        ),
        (
            "text split across reads",
            vec![b"Pass", b"word: "],
            "Password: ",
            vec![],
        ),
        (
            "IAC alone at the end of a read",
            vec![b"ab\xff", b"\xfb\x01cd"],
            "abcd",
            vec![IAC, DO, ECHO],
        ),
        (
            "negotiation cut before the option",
            vec![b"ab\xff\xfd", b"\x18cd"],
            "abcd",
            vec![IAC, WONT, TTYPE],
        ),
        (
            "subnegotiation skipped, across reads, with an escaped IAC inside",
            vec![b"a\xff\xfa\x18\x01\xff", b"\xff\x00\xff", b"\xf0b"],
            "ab",
            vec![],
        ),
        (
            "NOP and GA dropped",
            vec![b"a\xff\xf1b\xff\xf9c"],
            "abc",
            vec![],
        ),
        (
            "CR NUL is a bare CR",
            vec![b"a\r\0b\r", b"\0c\r\n"],
            "a\rb\rc\r\n",
            vec![],
        ),
        (
            "UTF-8 character split across reads",
            vec![
                "имя: ".as_bytes().split_at(3).0,
                "имя: ".as_bytes().split_at(3).1,
            ],
            "имя: ",
            vec![],
        ),
        (
            "invalid UTF-8 replaced",
            vec![b"a\xc3(b"],
            "a\u{fffd}(b",
            vec![],
        ),
        (
            "ANSI escapes are left for the prompt matcher",
            vec![b"\x1b[1mx"],
            "\x1b[1mx",
            vec![],
        ),
    ];
    for (name, chunks, want_text, want_reply) in cases {
        let (text, reply) = feed_all(&chunks);
        assert_eq!(text, want_text, "{name}");
        assert_eq!(reply, want_reply, "{name}");
    }
}

#[test]
fn lines_are_sent_with_crlf() {
    assert_eq!(TelnetStream::encode_line("show run"), b"show run\r\n");
    assert_eq!(TelnetStream::encode_line(""), b"\r\n");
}

// --- Cisco IOS over telnet, fake-switches ---

#[tokio::test]
async fn cisco_over_telnet_against_fake_switches() {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv-peers/bin/python");
    assert!(
        python.exists(),
        "{} missing: run scripts/test-setup.sh",
        python.display()
    );
    let port = free_port();
    let _peer = Peer(
        Command::new(&python)
            .arg(peers_dir().join("fake_switch_telnet.py"))
            .arg(port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_listening(port, Duration::from_secs(10));

    let target = Target {
        nas_id: 3,
        nas_name: "ios".into(),
        host: "127.0.0.1".into(),
        port,
        login: Some("root".into()),
        password: Some(Secret::new("root")),
        secret: Some(Secret::new("root")),
        max_sessions: 1,
    };
    let options = TelnetOptions {
        enable: true,
        setup: vec!["terminal length 0".into()],
        ..TelnetOptions::default()
    };
    let pool = TelnetPool::new(target, options);
    let result = pool
        .run(
            &cmds(&[
                "configure terminal",
                "interface FastEthernet0/1",
                "description nasd telnet 42",
                "exit",
                "exit",
                "show running-config interface FastEthernet0/1",
            ]),
            T,
        )
        .await;
    assert_eq!(result.error, None, "{result:?}");
    assert_eq!(result.exchanges.len(), 6);
    assert_eq!(
        result.exchanges[0].output,
        "Enter configuration commands, one per line.  End with CNTL/Z."
    );
    let running = &result.exchanges[5].output;
    assert!(running.contains("interface FastEthernet0/1"), "{running}");
    assert!(running.contains(" description nasd telnet 42"), "{running}");
    assert!(
        !running.contains("my_switch#"),
        "prompt stripped: {running}"
    );

    // fake-switches prints nothing for an unknown `show` (real IOS prints "% Invalid
    // input"); an unknown interface gives its "% Invalid input" answer.
    let result = pool
        .run(
            &cmds(&[
                "show nonsense",
                "show running-config interface FastEthernet9/99",
            ]),
            T,
        )
        .await;
    assert_eq!(result.error, None, "{result:?}");
    assert_eq!(result.exchanges[0].output, "");
    assert!(
        result.exchanges[1]
            .output
            .contains("% Invalid input detected at '^' marker."),
        "{:?}",
        result.exchanges[1]
    );
    assert_eq!(
        pool.open_sessions(),
        1,
        "same session, still in enable mode"
    );
}
