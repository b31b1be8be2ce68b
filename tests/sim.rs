//! The NAS simulator driven by clients nobody on this project wrote: the OpenSSH client
//! (`ssh`, exec and PTY shell) and Python's stdlib `telnetlib`, over loopback sockets.

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use nasd::sim::{self, Sim, SimOptions};
use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::process::{Child, Command};
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;

const PROMPT: &str = "[admin@sim] > ";
const CLIENT_DEADLINE: Duration = Duration::from_secs(30);

async fn start(opts: SimOptions) -> Sim {
    sim::start(&opts, CancellationToken::new())
        .await
        .expect("sim starts")
}

/// A directory holding the `SSH_ASKPASS` helper that types the password for `ssh`.
struct Askpass {
    dir: tempfile::TempDir,
}

impl Askpass {
    fn new(password: &str) -> Self {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let script = dir.path().join("askpass.sh");
        std::fs::write(&script, format!("#!/bin/sh\nprintf '%s\\n' '{password}'\n"))
            .expect("write askpass");
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))
            .expect("chmod askpass");
        Self { dir }
    }

    fn script(&self) -> PathBuf {
        self.dir.path().join("askpass.sh")
    }
}

fn ssh_command(askpass: &Askpass, port: u16, extra: &[&str]) -> Command {
    let mut command = Command::new("ssh");
    command
        .env("SSH_ASKPASS", askpass.script())
        .env("SSH_ASKPASS_REQUIRE", "force")
        .env("DISPLAY", ":0")
        .args(["-F", "/dev/null"])
        .args(["-o", "StrictHostKeyChecking=no"])
        .args(["-o", "UserKnownHostsFile=/dev/null"])
        .args(["-o", "PreferredAuthentications=password"])
        .args(["-o", "PubkeyAuthentication=no"])
        .args(["-o", "NumberOfPasswordPrompts=1"])
        .args(["-o", "ConnectTimeout=10"])
        .args(["-o", "LogLevel=ERROR"])
        .args(["-p", &port.to_string()])
        .args(extra)
        .kill_on_drop(true);
    command
}

/// `ssh admin@127.0.0.1 COMMAND` (an exec channel), with the password typed by askpass.
async fn ssh_exec(askpass: &Askpass, port: u16, remote_command: &str) -> Output {
    let mut command = ssh_command(askpass, port, &["admin@127.0.0.1", remote_command]);
    command.stdin(Stdio::null());
    timeout(CLIENT_DEADLINE, command.output())
        .await
        .expect("ssh finishes in time")
        .expect("ssh runs")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Starts `ssh -tt` (a PTY shell) with its stdin kept open, and waits for the first prompt.
async fn ssh_shell_open(askpass: &Askpass, port: u16) -> (Child, String) {
    let mut command = ssh_command(askpass, port, &["-tt", "admin@127.0.0.1"]);
    command.stdin(Stdio::piped()).stdout(Stdio::piped());
    let mut child = command.spawn().expect("ssh starts");
    let mut out = child.stdout.take().expect("stdout piped");
    let mut seen = Vec::new();
    let mut buffer = [0u8; 1024];
    timeout(CLIENT_DEADLINE, async {
        while !String::from_utf8_lossy(&seen).contains(PROMPT) {
            let count = out.read(&mut buffer).await.expect("read ssh stdout");
            assert!(
                count > 0,
                "ssh ended before the prompt: {:?}",
                String::from_utf8_lossy(&seen)
            );
            seen.extend_from_slice(&buffer[..count]);
        }
    })
    .await
    .expect("prompt in time");
    child.stdout = Some(out);
    (child, String::from_utf8_lossy(&seen).into_owned())
}

/// Python's stdlib telnet client: logs in (trying each credential pair in turn), sends
/// the commands one by one and reports what came back before each prompt, as JSON.
const TELNET_CLIENT: &str = r#"
import json, re, sys, time, warnings
warnings.simplefilter("ignore")
import telnetlib
cfg = json.loads(sys.argv[1])
prompt = cfg["prompt"].encode()
out = {"login_failures": 0, "logged_in": False, "answers": [], "seconds": [], "closed": False}
tn = telnetlib.Telnet("127.0.0.1", cfg["port"], timeout=10)
try:
    for user, password in cfg["attempts"]:
        text = tn.read_until(b"Login: ", 10)
        if not text.endswith(b"Login: "):
            out["greeting"] = text.decode(errors="replace")
            raise EOFError
        tn.write(user.encode() + b"\r\n")
        tn.read_until(b"Password: ", 10)
        tn.write(password.encode() + b"\r\n")
        index, _, _ = tn.expect([re.escape(prompt), b"Login failed"], 10)
        if index == 0:
            out["logged_in"] = True
            break
        out["login_failures"] += 1
    if out["logged_in"]:
        for command in cfg["commands"]:
            tn.write(command.encode() + b"\r\n")
            started = time.monotonic()
            text = tn.read_until(prompt, cfg.get("answer_timeout", 10)).decode()
            out["seconds"].append(time.monotonic() - started)
            out["answers"].append(text)
    else:
        tn.read_all()
        out["closed"] = True
except (EOFError, OSError):
    out["closed"] = True
print(json.dumps(out))
"#;

async fn telnet_session(
    port: u16,
    attempts: &[(&str, &str)],
    commands: &[&str],
    answer_timeout: f64,
) -> Value {
    let config = serde_json::json!({
        "port": port,
        "prompt": PROMPT,
        "attempts": attempts,
        "commands": commands,
        "answer_timeout": answer_timeout,
    });
    let output = timeout(
        CLIENT_DEADLINE,
        Command::new("python3")
            .args(["-c", TELNET_CLIENT, &config.to_string()])
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("python telnet finishes in time")
    .expect("python3 runs");
    assert!(
        output.status.success(),
        "telnet client failed: {}",
        stderr(&output)
    );
    serde_json::from_slice(&output.stdout).expect("telnet client prints JSON")
}

fn answers(report: &Value) -> Vec<String> {
    report["answers"]
        .as_array()
        .expect("answers")
        .iter()
        .map(|a| a.as_str().unwrap_or_default().to_string())
        .collect()
}

fn addresses(sim: &Sim) -> Vec<(String, String, String)> {
    sim.device
        .state()
        .address_list
        .into_iter()
        .map(|e| (e.list, e.address, e.comment))
        .collect()
}

async fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn openssh_exec_adds_and_reports_duplicates() {
    let sim = start(SimOptions::default()).await;
    let askpass = Askpass::new("admin");
    let port = sim.ssh_addr.port();

    let add = "/ip firewall address-list add list=negbal address=10.88.0.15 comment=crb_10.88.0.15";
    let first = ssh_exec(&askpass, port, add).await;
    assert!(first.status.success(), "stderr: {}", stderr(&first));
    assert_eq!(stdout(&first), "");
    assert_eq!(
        addresses(&sim),
        [(
            "negbal".into(),
            "10.88.0.15".into(),
            "crb_10.88.0.15".into()
        )]
    );

    let again = ssh_exec(&askpass, port, add).await;
    assert!(again.status.success());
    assert_eq!(stdout(&again), "failure: already have such entry\n");

    let queue = ssh_exec(
        &askpass,
        port,
        "/queue simple add name=crb_10.88.0.15 target=10.88.0.15/32 max-limit=10M/10M comment=crb_10.88.0.15",
    )
    .await;
    assert_eq!(stdout(&queue), "");
    let set = ssh_exec(
        &askpass,
        port,
        "/queue simple set [find name=crb_10.88.0.15] max-limit=1M/1M",
    )
    .await;
    assert_eq!(stdout(&set), "");
    assert_eq!(sim.device.state().queues[0].max_limit, "1M/1M");

    // A value quoted by the scheme stays one value even through the remote shell line.
    let quoted = ssh_exec(
        &askpass,
        port,
        r#"/ip firewall address-list add list=a address=1.2.3.4 comment="x; /system reset""#,
    )
    .await;
    assert_eq!(stdout(&quoted), "");
    assert_eq!(addresses(&sim)[1].2, "x; /system reset");

    let print = ssh_exec(
        &askpass,
        port,
        "/ip firewall address-list print where address=10.88.0.15",
    )
    .await;
    let text = stdout(&print);
    assert!(
        text.starts_with("Flags: X - disabled, D - dynamic\n"),
        "{text}"
    );
    assert!(
        text.contains("negbal") && text.contains("crb_10.88.0.15"),
        "{text}"
    );
    assert!(!text.contains("1.2.3.4"), "{text}");

    let removed = ssh_exec(
        &askpass,
        port,
        "/ip firewall address-list remove [find comment=crb_10.88.0.15]",
    )
    .await;
    assert_eq!(stdout(&removed), "");
    let missing = ssh_exec(
        &askpass,
        port,
        "/ip firewall address-list remove [find comment=crb_10.88.0.15]",
    )
    .await;
    assert_eq!(stdout(&missing), "");
    let numbered = ssh_exec(&askpass, port, "/ip firewall address-list remove 7").await;
    assert_eq!(stdout(&numbered), "no such item\n");

    let identity = ssh_exec(&askpass, port, "/system identity print").await;
    assert_eq!(stdout(&identity), "  name: sim\n");
    let unknown = ssh_exec(&askpass, port, "/system reset").await;
    assert_eq!(
        stdout(&unknown),
        "bad command name reset (line 1 column 9)\n"
    );

    let counters = sim.device.counters();
    assert_eq!(counters.commands_executed, 11);
    assert_eq!(counters.sessions_opened, 11);
    sim.stop().await;
}

#[tokio::test]
async fn openssh_pty_shell_echoes_and_prompts() {
    let sim = start(SimOptions::default()).await;
    let askpass = Askpass::new("admin");
    let (mut child, greeting) = ssh_shell_open(&askpass, sim.ssh_addr.port()).await;
    assert!(greeting.contains("MikroTik"), "{greeting:?}");
    assert!(greeting.ends_with(PROMPT), "{greeting:?}");

    let mut stdin = child.stdin.take().expect("stdin piped");
    stdin
        .write_all(
            b"/ip firewall address-list add list=a address=1.1.1.1\r\
              /ip firewall address-list add list=a address=1.1.1.1\r\
              /quit\r",
        )
        .await
        .expect("type into ssh");
    let mut rest = String::new();
    let mut out = child.stdout.take().expect("stdout piped");
    timeout(CLIENT_DEADLINE, out.read_to_string(&mut rest))
        .await
        .expect("shell ends in time")
        .expect("read ssh stdout");
    drop(stdin);
    let status = timeout(CLIENT_DEADLINE, child.wait())
        .await
        .expect("ssh exits")
        .expect("wait");
    assert!(status.success(), "{rest:?}");
    // The PTY echo, the answer and the prompt again, in the order a terminal shows them.
    let expected = "/ip firewall address-list add list=a address=1.1.1.1\r\n\
                    [admin@sim] > /ip firewall address-list add list=a address=1.1.1.1\r\n\
                    failure: already have such entry\r\n\
                    [admin@sim] > /quit\r\n\
                    interrupted\r\n";
    assert_eq!(rest, expected);
    assert_eq!(addresses(&sim).len(), 1);
    sim.stop().await;
}

#[tokio::test]
async fn python_telnetlib_logs_in_and_runs_commands() {
    let sim = start(SimOptions::default()).await;
    let report = telnet_session(
        sim.telnet_addr.port(),
        &[("admin", "wrong"), ("admin", "admin")],
        &[
            "/queue simple add name=q1 target=10.0.0.1 max-limit=10M/10M comment=c1",
            "/queue simple add name=q1 target=10.0.0.1 max-limit=10M/10M",
            "/queue simple print",
            "/queue simple remove [find comment=c1]",
            "/system identity print",
        ],
        10.0,
    )
    .await;
    assert_eq!(report["logged_in"], true, "{report}");
    assert_eq!(report["login_failures"], 1, "{report}");
    let answers = answers(&report);
    assert_eq!(answers[0], PROMPT);
    assert_eq!(
        answers[1],
        format!("failure: already have such entry\r\n{PROMPT}")
    );
    assert!(
        answers[2].contains("name=q1 target=10.0.0.1/32 max-limit=10M/10M"),
        "{}",
        answers[2]
    );
    assert_eq!(answers[3], PROMPT);
    assert_eq!(answers[4], format!("  name: sim\r\n{PROMPT}"));
    assert!(sim.device.state().queues.is_empty());
    assert_eq!(sim.device.counters().auth_failures, 1);
    sim.stop().await;
}

#[tokio::test]
async fn latency_delays_every_answer() {
    let opts = SimOptions {
        latency: "200ms".into(),
        ..SimOptions::default()
    };
    let sim = start(opts).await;
    let askpass = Askpass::new("admin");
    // Only a lower bound: the machine may be slow, but it can never be faster than this.
    let started = Instant::now();
    let output = ssh_exec(&askpass, sim.ssh_addr.port(), "/system identity print").await;
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert_eq!(stdout(&output), "  name: sim\n");

    let report = telnet_session(
        sim.telnet_addr.port(),
        &[("admin", "admin")],
        &["/system identity print"],
        10.0,
    )
    .await;
    let seconds = report["seconds"][0].as_f64().expect("seconds");
    assert!(seconds >= 0.2, "{report}");
    sim.stop().await;
}

#[tokio::test]
async fn third_session_is_refused_when_max_is_two() {
    let opts = SimOptions {
        max_sessions: 2,
        ..SimOptions::default()
    };
    let sim = start(opts).await;
    let askpass = Askpass::new("admin");
    let port = sim.ssh_addr.port();

    let (first, _) = ssh_shell_open(&askpass, port).await;
    let (second, _) = ssh_shell_open(&askpass, port).await;
    let third = ssh_exec(&askpass, port, "/system identity print").await;
    assert!(!third.status.success());
    assert!(
        stderr(&third).contains("too many sessions"),
        "{}",
        stderr(&third)
    );
    assert_eq!(stdout(&third), "");
    assert_eq!(sim.device.counters().sessions_refused, 1);

    // Telnet has its own limit of two: hold two connections at the login prompt.
    let telnet = sim.telnet_addr;
    let mut holders = Vec::new();
    for _ in 0..2 {
        let mut stream = tokio::net::TcpStream::connect(telnet)
            .await
            .expect("connect");
        let mut seen = Vec::new();
        let mut buffer = [0u8; 256];
        while !String::from_utf8_lossy(&seen).contains("Login: ") {
            let count = timeout(CLIENT_DEADLINE, stream.read(&mut buffer))
                .await
                .expect("login prompt in time")
                .expect("read");
            assert!(count > 0);
            seen.extend_from_slice(&buffer[..count]);
        }
        holders.push(stream);
    }
    let refused = telnet_session(telnet.port(), &[("admin", "admin")], &[], 10.0).await;
    assert_eq!(refused["logged_in"], false, "{refused}");
    assert_eq!(refused["closed"], true, "{refused}");
    assert_eq!(refused["greeting"], "too many sessions\r\n", "{refused}");
    let counters = sim.device.counters();
    assert_eq!(counters.sessions_refused, 2);
    assert_eq!(counters.max_concurrent_sessions, 4);

    // Closing sessions frees their slots.
    drop(holders);
    drop(first);
    drop(second);
    wait_for("sessions to close", || {
        sim.device.counters().live_sessions == 0
    })
    .await;
    let later = ssh_exec(&askpass, port, "/system identity print").await;
    assert_eq!(stdout(&later), "  name: sim\n");
    sim.stop().await;
}

#[tokio::test]
async fn refuse_auth_rejects_every_login() {
    let opts = SimOptions {
        fault: vec!["refuse-auth".into()],
        ..SimOptions::default()
    };
    let sim = start(opts).await;
    let askpass = Askpass::new("admin");
    let output = ssh_exec(
        &askpass,
        sim.ssh_addr.port(),
        "/ip firewall address-list add list=a address=1.1.1.1",
    )
    .await;
    assert_eq!(output.status.code(), Some(255));
    assert!(
        stderr(&output).contains("Permission denied"),
        "{}",
        stderr(&output)
    );

    let report = telnet_session(
        sim.telnet_addr.port(),
        &[("admin", "admin"), ("admin", "admin"), ("admin", "admin")],
        &[],
        10.0,
    )
    .await;
    assert_eq!(report["logged_in"], false, "{report}");
    assert_eq!(report["login_failures"], 3, "{report}");
    assert_eq!(report["closed"], true, "{report}");
    assert!(addresses(&sim).is_empty());
    assert!(sim.device.counters().auth_failures >= 4);
    assert_eq!(sim.device.counters().commands_executed, 0);
    sim.stop().await;
}

#[tokio::test]
async fn drop_fault_closes_the_connection_before_applying() {
    let opts = SimOptions {
        fault: vec!["drop:1".into()],
        ..SimOptions::default()
    };
    let sim = start(opts).await;
    let askpass = Askpass::new("admin");
    let output = ssh_exec(
        &askpass,
        sim.ssh_addr.port(),
        "/ip firewall address-list add list=a address=1.1.1.1",
    )
    .await;
    assert_eq!(output.status.code(), Some(255), "{}", stderr(&output));
    assert_eq!(stdout(&output), "");
    assert!(addresses(&sim).is_empty());

    let report = telnet_session(
        sim.telnet_addr.port(),
        &[("admin", "admin")],
        &["/ip firewall address-list add list=a address=1.1.1.1"],
        10.0,
    )
    .await;
    assert_eq!(report["logged_in"], true, "{report}");
    assert_eq!(report["closed"], true, "{report}");
    assert!(answers(&report).is_empty(), "{report}");
    assert!(addresses(&sim).is_empty());
    sim.stop().await;
}

#[tokio::test]
async fn hang_fault_applies_but_never_answers() {
    let opts = SimOptions {
        fault: vec!["hang:1".into()],
        ..SimOptions::default()
    };
    let sim = start(opts).await;
    let report = telnet_session(
        sim.telnet_addr.port(),
        &[("admin", "admin")],
        &["/ip firewall address-list add list=a address=1.1.1.1"],
        1.0,
    )
    .await;
    assert_eq!(report["logged_in"], true, "{report}");
    assert!(!answers(&report)[0].contains(PROMPT), "{report}");
    assert_eq!(addresses(&sim).len(), 1);
    sim.stop().await;
}

#[tokio::test]
async fn host_key_file_is_created_then_reused_and_pinnable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key_path = dir.path().join("sim_host_key");
    let opts = SimOptions {
        host_key: Some(key_path.clone()),
        ..SimOptions::default()
    };
    let first = start(opts.clone()).await;
    let public_key = first.host_public_key.clone();
    assert!(public_key.starts_with("ssh-ed25519 "), "{public_key}");
    first.stop().await;
    assert!(key_path.exists());

    let second = start(opts).await;
    assert_eq!(second.host_public_key, public_key);

    // The published key is the one the server proves: OpenSSH accepts it with strict checking.
    let known_hosts = dir.path().join("known_hosts");
    std::fs::write(
        &known_hosts,
        format!("[127.0.0.1]:{} {public_key}\n", second.ssh_addr.port()),
    )
    .expect("write known_hosts");
    let askpass = Askpass::new("admin");
    let output = strict_ssh(&askpass, second.ssh_addr.port(), &known_hosts).await;
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(stdout(&output), "  name: sim\n");
    second.stop().await;
}

async fn strict_ssh(askpass: &Askpass, port: u16, known_hosts: &Path) -> Output {
    let mut command = Command::new("ssh");
    command
        .env("SSH_ASKPASS", askpass.script())
        .env("SSH_ASKPASS_REQUIRE", "force")
        .args(["-F", "/dev/null", "-o", "StrictHostKeyChecking=yes"])
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
        .args([
            "-o",
            "PreferredAuthentications=password",
            "-o",
            "LogLevel=ERROR",
        ])
        .args([
            "-p",
            &port.to_string(),
            "admin@127.0.0.1",
            "/system identity print",
        ])
        .stdin(Stdio::null())
        .kill_on_drop(true);
    timeout(CLIENT_DEADLINE, command.output())
        .await
        .expect("ssh finishes in time")
        .expect("ssh runs")
}

#[test]
fn interpreter_tables() {
    let cases: &[(&str, &str, usize)] = &[
        // (line, answer, address-list entries afterwards), each on a fresh router.
        (
            r#"/ip firewall address-list add list=a address=1.2.3.4 comment="x; /system reset""#,
            "",
            1,
        ),
        (
            "/ip firewall address-list add list=a address=1.2.3.4; /ip firewall address-list add list=a address=5.6.7.8",
            "",
            2,
        ),
        (
            "/ip firewall address-list add list=a address=1.2.3.4; /system reset",
            "bad command name reset (line 1 column 63)",
            0,
        ),
        (
            "/ip firewall address-list add list=a address=1.2.3.4 comment=x; /system identity print",
            "  name: sim",
            1,
        ),
        (
            "/ip firewall address-list add list=a address=1.2.3.4 comment=\"unterminated",
            "syntax error (line 1 column 75)",
            0,
        ),
        (
            "/ip firewall address-list remove [find comment=nobody]",
            "",
            0,
        ),
        (
            "/ip firewall address-list remove numbers=0",
            "no such item",
            0,
        ),
        (
            "/nonsense",
            "bad command name nonsense (line 1 column 2)",
            0,
        ),
    ];
    for (line, want, entries) in cases {
        let mut state = sim::RouterState::new("sim");
        assert_eq!(sim::execute(&mut state, line), *want, "line {line:?}");
        assert_eq!(state.address_list.len(), *entries, "line {line:?}");
    }
}

// ---------------------------------------------------------------------------------------
// RADIUS CoA / Disconnect and the RouterOS API, driven by FreeRADIUS `radclient`, Python's
// `librouteros`, and nasd's own clients.

const RADIUS_SECRET: &str = "testing123";

/// `echo ATTRS | radclient -x [-t 1 -r 1] 127.0.0.1:PORT KIND SECRET`: stdout and stderr
/// together (radclient prints the reply on stdout and failures on stderr), and whether it
/// exited successfully (it fails on a NAK or no reply).
async fn radclient(port: u16, kind: &str, secret: &str, attributes: &str) -> (String, bool) {
    let mut child = Command::new("radclient")
        .args(["-x", "-t", "1", "-r", "1"])
        .arg(format!("127.0.0.1:{port}"))
        .args([kind, secret])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("radclient starts");
    let mut stdin = child.stdin.take().expect("stdin piped");
    stdin
        .write_all(format!("{attributes}\n").as_bytes())
        .await
        .expect("write radclient input");
    drop(stdin);
    let output = timeout(CLIENT_DEADLINE, child.wait_with_output())
        .await
        .expect("radclient finishes in time")
        .expect("radclient runs");
    (
        format!("{}{}", stdout(&output), stderr(&output)),
        output.status.success(),
    )
}

#[tokio::test]
async fn radclient_coa_disconnect_and_wrong_secret() {
    let sim = start(SimOptions {
        auto_sessions: false,
        ..SimOptions::default()
    })
    .await;
    sim.device.add_session("u1", "s1", "10.0.0.1");
    let port = sim.coa_addr.port();

    let (out, ok) = radclient(
        port,
        "coa",
        RADIUS_SECRET,
        r#"User-Name = "u1", Acct-Session-Id = "s1", Mikrotik-Rate-Limit = "10M/10M", Message-Authenticator = 0x00"#,
    )
    .await;
    assert!(ok && out.contains("Received CoA-ACK"), "{out}");
    let session = sim.device.session("s1").expect("session kept");
    assert_eq!(session.rate_limit, "10M/10M");
    assert_eq!(session.coa_count, 1);

    let (out, ok) = radclient(
        port,
        "coa",
        RADIUS_SECRET,
        r#"Acct-Session-Id = "s1", Mikrotik-Address-List = "negbal", Filter-Id = "redirect", Cisco-AVPair = "subscriber:command=account-logoff""#,
    )
    .await;
    assert!(ok && out.contains("Received CoA-ACK"), "{out}");
    let session = sim.device.session("s1").expect("session kept");
    assert_eq!(
        (
            session.address_list.as_str(),
            session.filter_id.as_str(),
            session.cisco_avpair.as_str(),
            session.rate_limit.as_str()
        ),
        (
            "negbal",
            "redirect",
            "subscriber:command=account-logoff",
            "10M/10M"
        )
    );

    // With auto-sessions off an unknown session is NAKed for a CoA too.
    let (out, ok) = radclient(port, "coa", RADIUS_SECRET, r#"Acct-Session-Id = "s2""#).await;
    assert!(!ok && out.contains("Received CoA-NAK"), "{out}");
    assert!(
        out.contains("Error-Cause = Session-Context-Not-Found"),
        "{out}"
    );

    let (out, ok) = radclient(
        port,
        "disconnect",
        RADIUS_SECRET,
        r#"User-Name = "nobody", Acct-Session-Id = "nope""#,
    )
    .await;
    assert!(!ok && out.contains("Received Disconnect-NAK"), "{out}");
    assert!(
        out.contains("Error-Cause = Session-Context-Not-Found"),
        "{out}"
    );

    let (out, ok) = radclient(
        port,
        "disconnect",
        RADIUS_SECRET,
        r#"User-Name = "u1", Acct-Session-Id = "s1""#,
    )
    .await;
    assert!(ok && out.contains("Received Disconnect-ACK"), "{out}");
    assert!(sim.device.session("s1").is_none(), "disconnect removes it");

    let dropped_before = sim.device.counters().coa_dropped;
    let (out, ok) = radclient(
        port,
        "coa",
        "not-the-secret",
        r#"User-Name = "u1", Message-Authenticator = 0x00"#,
    )
    .await;
    assert!(!ok && out.contains("No reply from server"), "{out}");
    let counters = sim.device.counters();
    assert_eq!(counters.coa_dropped, dropped_before + 1);
    assert_eq!((counters.coa_acks, counters.coa_naks), (3, 2));
    sim.stop().await;
}

fn radius_target(sim: &Sim, secret: &str) -> nasd::transport::Target {
    nasd::transport::Target {
        nas_id: 1,
        nas_name: "sim".into(),
        host: "127.0.0.1".into(),
        port: sim.coa_addr.port(),
        login: None,
        password: None,
        secret: Some(nasd::store::Secret::new(secret.to_string())),
        max_sessions: 4,
    }
}

fn radius_client(sim: &Sim, secret: &str, wait: Duration) -> nasd::transport::radius::RadiusClient {
    use nasd::transport::radius::{RadiusClient, RadiusOptions};
    RadiusClient::new(
        radius_target(sim, secret),
        RadiusOptions {
            timeout: wait,
            tries: 1,
            ..RadiusOptions::default()
        },
    )
}

#[tokio::test]
async fn nasd_radius_client_accepts_the_sim_replies() {
    use nasd::transport::Verdict;
    // Default options: auto-sessions on.
    let sim = start(SimOptions::default()).await;
    let client = radius_client(&sim, RADIUS_SECRET, Duration::from_secs(2));

    let reply = client
        .send(r#"coa User-Name = "u7", Acct-Session-Id = "s7", Mikrotik-Rate-Limit = "5M/5M""#)
        .await;
    assert_eq!(reply.verdict, Verdict::Done, "{reply:?}");
    assert!(reply.answer.starts_with("CoA-ACK"), "{reply:?}");
    let session = sim.device.session("s7").expect("auto-created");
    assert_eq!(
        (session.user.as_str(), session.rate_limit.as_str()),
        ("u7", "5M/5M")
    );

    // The disconnect of a session that is already gone is done for the event.
    let reply = client.send(r#"disconnect Acct-Session-Id = "gone""#).await;
    assert_eq!(reply.verdict, Verdict::Done, "{reply:?}");
    assert!(
        reply.answer.contains("Session-Context-Not-Found"),
        "{reply:?}"
    );
    let reply = client.send(r#"disconnect Acct-Session-Id = "s7""#).await;
    assert_eq!(reply.verdict, Verdict::Done, "{reply:?}");
    assert!(reply.answer.starts_with("Disconnect-ACK"), "{reply:?}");
    assert!(sim.device.session("s7").is_none());

    // A wrong secret gets no answer at all: the client times out.
    let wrong = radius_client(&sim, "wrong", Duration::from_millis(300));
    let reply = wrong.send(r#"coa User-Name = "u8""#).await;
    assert!(
        matches!(reply.verdict, Verdict::Unreachable(_)),
        "{reply:?}"
    );
    assert!(sim.device.session("u8").is_none());
    assert_eq!(sim.device.counters().coa_dropped, 1);
    sim.stop().await;
}

#[tokio::test]
async fn coa_hang_fault_applies_without_answering_and_latency_delays() {
    use nasd::transport::Verdict;
    let sim = start(SimOptions {
        fault: vec!["hang:1".into()],
        ..SimOptions::default()
    })
    .await;
    let client = radius_client(&sim, RADIUS_SECRET, Duration::from_millis(300));
    let reply = client
        .send(r#"coa User-Name = "h1", Mikrotik-Rate-Limit = "1M/1M""#)
        .await;
    assert!(
        matches!(reply.verdict, Verdict::Unreachable(_)),
        "{reply:?}"
    );
    let session = sim.device.session("h1").expect("applied");
    assert_eq!(session.rate_limit, "1M/1M");
    sim.stop().await;

    let sim = start(SimOptions {
        latency: "200ms".into(),
        ..SimOptions::default()
    })
    .await;
    let client = radius_client(&sim, RADIUS_SECRET, Duration::from_secs(2));
    let started = Instant::now();
    let (a, b, c, d) = tokio::join!(
        client.send(r#"coa User-Name = "l1""#),
        client.send(r#"coa User-Name = "l2""#),
        client.send(r#"coa User-Name = "l3""#),
        client.send(r#"coa User-Name = "l4""#),
    );
    let replies = [a, b, c, d];
    let elapsed = started.elapsed();
    for reply in &replies {
        assert_eq!(reply.verdict, nasd::transport::Verdict::Done, "{reply:?}");
    }
    // Every request waited the latency, concurrently: one after the other would be 800ms.
    assert!(
        elapsed >= Duration::from_millis(200) && elapsed < Duration::from_millis(700),
        "{elapsed:?}"
    );
    sim.stop().await;
}

/// Pipelines CoA requests over one socket (up to 256 in flight, one per identifier) and
/// checks every reply; prints the rate, which is the simulator's plus this client's cost.
#[tokio::test]
async fn coa_server_sustains_thousands_of_requests() {
    use nasd::transport::radius::{
        COA_ACK, Dictionary, encode_request, parse_request, verify_reply,
    };
    const TOTAL: usize = 5000;
    let sim = start(SimOptions::default()).await;
    let dict = Dictionary::builtin();
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind client");
    socket.connect(sim.coa_addr).await.expect("connect");
    let mut in_flight: std::collections::HashMap<u8, [u8; 16]> = Default::default();
    let (mut sent, mut acked) = (0usize, 0usize);
    let mut buffer = [0u8; 4096];
    let started = Instant::now();
    while acked < TOTAL {
        while sent < TOTAL && in_flight.len() < 128 {
            let id = (sent % 256) as u8;
            let text = format!(
                r#"coa User-Name = "bench{sent}", Acct-Session-Id = "b{sent}", Mikrotik-Rate-Limit = "1M/1M""#
            );
            let request = parse_request(&text, &dict).expect("parses");
            let (packet, authenticator) =
                encode_request(&request, id, RADIUS_SECRET.as_bytes()).expect("encodes");
            socket.send(&packet).await.expect("send");
            in_flight.insert(id, authenticator);
            sent += 1;
        }
        let len = timeout(Duration::from_secs(5), socket.recv(&mut buffer))
            .await
            .expect("a reply within 5s (none lost on loopback)")
            .expect("recv");
        let id = buffer[1];
        let authenticator = in_flight.remove(&id).expect("reply to a request in flight");
        let reply = verify_reply(&buffer[..len], id, &authenticator, RADIUS_SECRET.as_bytes())
            .expect("reply verifies");
        assert_eq!(reply.code, COA_ACK);
        acked += 1;
    }
    let elapsed = started.elapsed();
    println!(
        "coa: {TOTAL} requests in {elapsed:?} = {:.0}/s",
        TOTAL as f64 / elapsed.as_secs_f64()
    );
    assert_eq!(sim.device.state().sessions.len(), TOTAL);
    sim.stop().await;
}

/// librouteros (PyPI, 4.2.2): login, add, duplicate add, print with a query and a
/// proplist, remove by id, a wrong password; results as JSON.
const LIBROUTEROS_CLIENT: &str = r#"
import json, sys
from librouteros import connect
from librouteros.exceptions import TrapError
from librouteros.query import Key
port = int(sys.argv[1])
out = {}
api = connect(host="127.0.0.1", username="admin", password="admin", port=port, timeout=10)
lists = api.path("ip", "firewall", "address-list")
out["id1"] = lists.add(list="negbal", address="10.88.0.15", comment="crb_10.88.0.15")
out["id2"] = lists.add(list="allowed", address="10.88.0.16", comment="crb_10.88.0.16")
try:
    lists.add(list="negbal", address="10.88.0.15")
    out["duplicate"] = "accepted"
except TrapError as e:
    out["duplicate"] = e.message
out["query"] = list(lists.select(Key(".id"), Key("address")).where(Key("comment") == "crb_10.88.0.15"))
out["raw_query"] = list(api.rawCmd("/ip/firewall/address-list/print", "?list=allowed"))
lists.remove(out["id1"])
try:
    lists.remove("*99")
    out["missing"] = "accepted"
except TrapError as e:
    out["missing"] = e.message
queues = api.path("queue", "simple")
qid = queues.add(name="q1", target="10.88.0.16", **{"max-limit": "1M/1M"})
queues.update(**{".id": qid, "max-limit": "2M/2M"})
out["queues"] = list(queues)
out["identity"] = list(api.path("system", "identity"))
try:
    list(api.rawCmd("/system/reboot"))
    out["unknown"] = "accepted"
except TrapError as e:
    out["unknown"] = e.message
api.close()
try:
    connect(host="127.0.0.1", username="admin", password="wrong", port=port, timeout=10)
    out["bad_login"] = "accepted"
except TrapError as e:
    out["bad_login"] = e.message
print(json.dumps(out))
"#;

#[tokio::test]
async fn librouteros_client_adds_prints_and_removes() {
    let sim = start(SimOptions::default()).await;
    let output = timeout(
        CLIENT_DEADLINE,
        Command::new(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv-peers/bin/python"),
        )
        .args(["-c", LIBROUTEROS_CLIENT, &sim.api_addr.port().to_string()])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output(),
    )
    .await
    .expect("librouteros finishes in time")
    .expect("python runs");
    assert!(
        output.status.success(),
        "librouteros client failed: {}",
        stderr(&output)
    );
    let report: Value = serde_json::from_slice(&output.stdout).expect("client prints JSON");
    assert_eq!(report["id1"], "*1");
    assert_eq!(report["id2"], "*2");
    assert_eq!(report["duplicate"], "failure: already have such entry");
    assert_eq!(
        report["query"],
        serde_json::json!([{".id": "*1", "address": "10.88.0.15"}])
    );
    assert_eq!(
        report["raw_query"],
        serde_json::json!([{
            ".id": "*2", "list": "allowed", "address": "10.88.0.16",
            "dynamic": false, "disabled": false, "comment": "crb_10.88.0.16"
        }])
    );
    assert_eq!(report["missing"], "no such item");
    assert_eq!(report["queues"][0]["max-limit"], "2M/2M");
    assert_eq!(report["queues"][0]["target"], "10.88.0.16/32");
    assert_eq!(report["identity"], serde_json::json!([{"name": "sim"}]));
    assert_eq!(report["unknown"], "no such command prefix");
    assert_eq!(report["bad_login"], "invalid user name or password (6)");
    assert_eq!(
        addresses(&sim),
        vec![(
            "allowed".to_string(),
            "10.88.0.16".to_string(),
            "crb_10.88.0.16".to_string()
        )]
    );
    assert_eq!(sim.device.counters().auth_failures, 1);
    sim.stop().await;
}

fn api_pool(sim: &Sim, password: &str) -> nasd::transport::routeros_api::ApiPool {
    use nasd::transport::routeros_api::{ApiOptions, ApiPool};
    ApiPool::new(
        nasd::transport::Target {
            nas_id: 2,
            nas_name: "sim".into(),
            host: "127.0.0.1".into(),
            port: sim.api_addr.port(),
            login: Some("admin".into()),
            password: Some(nasd::store::Secret::new(password.to_string())),
            secret: None,
            max_sessions: 2,
        },
        ApiOptions::default(),
    )
}

#[tokio::test]
async fn nasd_api_pool_runs_the_mikrotik_api_scheme_commands() {
    let sim = start(SimOptions::default()).await;
    let pool = api_pool(&sim, "admin");
    let wait = Duration::from_secs(5);
    let ip = "10.88.0.15";
    // `user_add`, then `user_redirect` twice, as schemes/mikrotik-api renders them.
    let user_add = vec![
        format!("/ip/firewall/address-list/add =list=allowed =address={ip} =comment=crb_{ip}"),
        format!(
            "/queue/simple/add =name=crb_{ip} =target={ip}/32 =max-limit=1024k/2048k =comment=crb_{ip}"
        ),
    ];
    let redirect = vec![format!(
        "/ip/firewall/address-list/add =list=negbal =address={ip} =comment=crb_{ip}"
    )];
    let result = pool.run(&user_add, wait).await;
    assert!(result.error.is_none(), "{result:?}");
    let outputs: Vec<&str> = result.exchanges.iter().map(|e| e.output.as_str()).collect();
    assert_eq!(outputs, ["ret=*1", "ret=*2"]);
    pool.run(&redirect, wait).await;
    let result = pool.run(&redirect, wait).await;
    assert_eq!(
        result.exchanges[0].output, "failure: already have such entry",
        "{result:?}"
    );

    let info = vec![format!("/ip/firewall/address-list/print ?address={ip}")];
    let result = pool.run(&info, wait).await;
    assert_eq!(result.exchanges[0].output.lines().count(), 2, "{result:?}");

    // `user_redirect_cancel`, then `user_del`: the find-then-act path (`?` queries on
    // remove become a print of `.id`s, then `remove =.id=...`).
    let cancel = vec![format!(
        "/ip/firewall/address-list/remove ?list=negbal ?comment=crb_{ip}"
    )];
    let result = pool.run(&cancel, wait).await;
    assert!(result.error.is_none(), "{result:?}");
    assert_eq!(addresses(&sim).len(), 1);
    let user_del = vec![
        format!("/ip/firewall/address-list/remove ?comment=crb_{ip}"),
        format!("/queue/simple/remove ?comment=crb_{ip}"),
    ];
    let result = pool.run(&user_del, wait).await;
    assert!(result.error.is_none(), "{result:?}");
    assert!(
        result.exchanges.iter().all(|e| e.output.is_empty()),
        "{result:?}"
    );
    let state = sim.device.state();
    assert!(state.address_list.is_empty() && state.queues.is_empty());
    // Nothing left: the same removal is a no-op, as `[find]` is on the CLI.
    let result = pool.run(&user_del, wait).await;
    assert!(result.error.is_none(), "{result:?}");
    pool.close().await;

    // The pre-6.43 MD5 challenge login works too.
    let legacy = nasd::transport::routeros_api::ApiPool::new(
        nasd::transport::Target {
            nas_id: 3,
            nas_name: "sim".into(),
            host: "127.0.0.1".into(),
            port: sim.api_addr.port(),
            login: Some("admin".into()),
            password: Some(nasd::store::Secret::new("admin".to_string())),
            secret: None,
            max_sessions: 1,
        },
        nasd::transport::routeros_api::ApiOptions {
            legacy_login: true,
            ..Default::default()
        },
    );
    let result = legacy.run(&info, wait).await;
    assert!(result.error.is_none(), "{result:?}");
    legacy.close().await;

    let wrong = api_pool(&sim, "nope");
    let result = wrong.run(&info, wait).await;
    assert!(
        matches!(result.error, Some(nasd::transport::SessionError::Auth(..))),
        "{result:?}"
    );
    sim.stop().await;
}

#[tokio::test]
async fn api_max_sessions_and_drop_fault() {
    let sim = start(SimOptions {
        max_sessions: 1,
        fault: vec!["drop:1".into()],
        ..SimOptions::default()
    })
    .await;
    use nasd::transport::routeros_api::{SentenceDecoder, encode_sentence};
    async fn read_sentence(stream: &mut tokio::net::TcpStream) -> Option<Vec<String>> {
        let mut decoder = SentenceDecoder::new();
        let mut buffer = [0u8; 1024];
        loop {
            if let Some(sentence) = decoder.next_sentence().expect("in step") {
                return Some(sentence);
            }
            let count = timeout(Duration::from_secs(5), stream.read(&mut buffer))
                .await
                .expect("read in time")
                .expect("read");
            if count == 0 {
                return None;
            }
            decoder.push(&buffer[..count]);
        }
    }
    let words = |list: &[&str]| list.iter().map(|w| w.to_string()).collect::<Vec<_>>();
    let mut first = tokio::net::TcpStream::connect(sim.api_addr)
        .await
        .expect("connect");
    first
        .write_all(&encode_sentence(&words(&[
            "/login",
            "=name=admin",
            "=password=admin",
            ".tag=7",
        ])))
        .await
        .expect("write");
    assert_eq!(
        read_sentence(&mut first).await,
        Some(words(&["!done", ".tag=7"]))
    );

    let mut second = tokio::net::TcpStream::connect(sim.api_addr)
        .await
        .expect("connect");
    assert_eq!(
        read_sentence(&mut second).await,
        Some(words(&["!fatal", "too many sessions"]))
    );
    assert_eq!(sim.device.counters().sessions_refused, 1);

    first
        .write_all(&encode_sentence(&words(&[
            "/ip/firewall/address-list/add",
            "=list=a",
            "=address=1.1.1.1",
        ])))
        .await
        .expect("write");
    assert_eq!(read_sentence(&mut first).await, None, "dropped");
    assert!(
        addresses(&sim).is_empty(),
        "a dropped command is not applied"
    );
    sim.stop().await;
}
