//! SSH transport against real peers: an OpenSSH sshd started per test on a loopback port
//! (with a ForceCommand script that records what it receives and answers like RouterOS)
//! and fake-switches' Cisco IOS emulation for the PTY shell mode.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

use nasd::store::Secret;
use nasd::transport::ssh::{HostKeyPolicy, SshMode, SshOptions, SshPool};
use nasd::transport::{SessionError, Target};

const TIMEOUT: Duration = Duration::from_secs(5);

/// A port for a test server of this binary. Taken from a counter over 20000..30000,
/// below the kernel's ephemeral range (32768..), so that two servers of this binary
/// never get the same one and no client connection holds it: with ports from bind(0),
/// a server could find its port taken by another test's server and the client would
/// talk to the wrong one (seen once: a fake Cisco switch's login refused by an sshd).
fn free_port() -> u16 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let start = std::process::id() % 10_000;
    loop {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let port = 20_000 + ((start + n) % 10_000) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

#[allow(clippy::disallowed_methods)] // a synchronous wait on a process outside the runtime
fn wait_for_port(port: u16, child: &mut Child) {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("peer exited before listening on {port}: {status}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("nothing listens on 127.0.0.1:{port}");
}

fn keygen(path: &Path) {
    let _ = std::fs::remove_file(path);
    let _ = std::fs::remove_file(path.with_extension("pub"));
    let status = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "nasd-test", "-f"])
        .arg(path)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
}

/// `SHA256:...` of a public key file, as ssh-keygen prints it.
fn keygen_fingerprint(public: &Path) -> String {
    let out = Command::new("ssh-keygen")
        .arg("-lf")
        .arg(public)
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    text.split_whitespace().nth(1).unwrap().to_string()
}

/// Every process below `pid` (sshd forks one per connection, and those escape its
/// process group with setsid, so they are found by parent links).
fn descendants(pid: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some(after) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        if let Some(ppid) = after.split_whitespace().nth(1).and_then(|p| p.parse().ok()) {
            parents.push((child, ppid));
        }
    }
    let mut found = vec![pid];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        for (child, ppid) in &parents {
            if *ppid == parent && !found.contains(child) {
                found.push(*child);
            }
        }
        i += 1;
    }
    found.remove(0);
    found
}

/// The sshd login, made by scripts/test-setup.sh with shell /bin/sh: root's bash would
/// read ~/.bashrc (pyenv init) for every recorded command.
const LOGIN: &str = "nasdpeer";

const RECORDER: &str = r#"#!/bin/sh
# Records each command and answers like RouterOS would.
dir=__DIR__
cmd="$SSH_ORIGINAL_COMMAND"
set -- $SSH_CONNECTION
port=$2
printf '%s\n' "$cmd" >> "$dir/commands.log"
echo "start $port" >> "$dir/events.log"
case "$cmd" in *slow*) sleep 0.3;; esac
case "$cmd" in *hang*) sleep 30;; esac
status=0
case "$cmd" in
  *dup*) echo "failure: already have such entry";;
  *bad*) echo "expected end of command" >&2; status=2;;
  *) echo "done: $cmd";;
esac
echo "end $port" >> "$dir/events.log"
exit $status
"#;

/// A temp dir with keys, a recorder script and an sshd on a loopback port.
struct Lab {
    dir: tempfile::TempDir,
    port: u16,
    sshd: Option<Child>,
    extra_config: String,
}

impl Lab {
    fn new() -> Lab {
        Lab::with_config("")
    }

    fn with_config(extra_config: &str) -> Lab {
        let dir = tempfile::tempdir().unwrap();
        let lab = Lab {
            port: free_port(),
            dir,
            sshd: None,
            extra_config: extra_config.to_string(),
        };
        keygen(&lab.path("host_key"));
        keygen(&lab.path("client_key"));
        keygen(&lab.path("stranger_key"));
        std::fs::copy(lab.path("client_key.pub"), lab.path("authorized_keys")).unwrap();
        let recorder = RECORDER.replace("__DIR__", &lab.dir.path().display().to_string());
        std::fs::write(lab.path("recorder.sh"), recorder).unwrap();
        Command::new("chmod")
            .arg("755")
            .arg(lab.path("recorder.sh"))
            .status()
            .unwrap();
        // The recorder runs as the test login (common::sshd::USER, shell /bin/sh, so no
        // login script of root's runs per command): it must be able to write here.
        for log in ["commands.log", "events.log"] {
            std::fs::write(lab.path(log), "").unwrap();
            Command::new("chmod")
                .arg("666")
                .arg(lab.path(log))
                .status()
                .unwrap();
        }
        Command::new("chmod")
            .arg("777")
            .arg(lab.dir.path())
            .status()
            .unwrap();
        lab
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn start(&mut self) {
        let config = format!(
            "Port {port}\n\
             ListenAddress 127.0.0.1\n\
             HostKey {host_key}\n\
             PidFile {pid}\n\
             AuthorizedKeysFile {authorized}\n\
             UsePAM no\n\
             StrictModes no\n\
             PasswordAuthentication no\n\
             KbdInteractiveAuthentication no\n\
             PubkeyAuthentication yes\n\
             PermitRootLogin yes\n\
             MaxStartups 100\n\
             MaxSessions 20\n\
             ForceCommand {recorder}\n\
             {extra}\n",
            port = self.port,
            host_key = self.path("host_key").display(),
            pid = self.path("sshd.pid").display(),
            authorized = self.path("authorized_keys").display(),
            recorder = self.path("recorder.sh").display(),
            extra = self.extra_config,
        );
        std::fs::write(self.path("sshd_config"), config).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path("sshd.log"))
            .unwrap();
        let mut child = Command::new("/usr/sbin/sshd")
            .arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(self.path("sshd_config"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        wait_for_port(self.port, &mut child);
        self.sshd = Some(child);
    }

    /// Kills sshd and every connection it forked, as a crash or power loss would.
    fn kill(&mut self) {
        if let Some(mut child) = self.sshd.take() {
            let all = descendants(child.id());
            let _ = child.kill();
            for pid in all {
                let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            }
            let _ = child.wait();
        }
    }

    fn host_fingerprint(&self) -> String {
        keygen_fingerprint(&self.path("host_key.pub"))
    }

    fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.path(name)).unwrap_or_default()
    }

    fn commands(&self) -> Vec<String> {
        self.read("commands.log")
            .lines()
            .map(String::from)
            .collect()
    }

    fn accepted_connections(&self) -> usize {
        self.read("sshd.log")
            .lines()
            .filter(|l| l.contains("Accepted publickey"))
            .count()
    }

    fn target(&self, max_sessions: usize) -> Target {
        Target {
            nas_id: 7,
            nas_name: "lab".into(),
            host: "127.0.0.1".into(),
            port: self.port,
            login: Some(LOGIN.into()),
            password: None,
            secret: None,
            max_sessions,
        }
    }

    /// Exec mode, key auth, the current host key pinned.
    fn options(&self) -> SshOptions {
        let mut options = SshOptions::new(SshMode::Exec, self.path("known_hosts"));
        options.private_key = Some(self.path("client_key"));
        options.host_key_policy = HostKeyPolicy::Pinned(self.host_fingerprint());
        options.connect_timeout = TIMEOUT;
        options
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.kill();
    }
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

#[tokio::test]
async fn exec_mode_runs_commands_in_order_and_reuses_the_connection() {
    let mut lab = Lab::new();
    lab.start();
    let pool = SshPool::new(lab.target(2), lab.options());
    let commands = strings(&[
        "/ip firewall address-list add list=blocked address=10.0.0.1",
        "/queue simple add name=dup",
        "/bad command",
    ]);
    let result = pool.run(&commands, TIMEOUT).await;
    assert_eq!(result.error, None);
    assert_eq!(lab.commands(), commands);
    let outputs: Vec<&str> = result.exchanges.iter().map(|e| e.output.as_str()).collect();
    assert_eq!(
        outputs,
        [
            "done: /ip firewall address-list add list=blocked address=10.0.0.1",
            "failure: already have such entry",
            "expected end of command\nexit status 2",
        ]
    );
    assert_eq!(result.exchanges[1].command, commands[1]);

    let again = pool
        .run(&strings(&["/system identity print"]), TIMEOUT)
        .await;
    assert_eq!(again.error, None);
    assert_eq!(again.exchanges[0].output, "done: /system identity print");
    assert_eq!(pool.open_sessions(), 1);
    assert_eq!(lab.accepted_connections(), 1, "{}", lab.read("sshd.log"));
    assert_eq!(lab.commands().len(), 4);
    pool.close().await;
    assert_eq!(pool.open_sessions(), 0);
}

#[tokio::test]
async fn never_more_connections_than_max_sessions() {
    let mut lab = Lab::new();
    lab.start();
    let pool = Arc::new(SshPool::new(lab.target(2), lab.options()));
    let mut tasks = Vec::new();
    for i in 0..8 {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            pool.run(&[format!("slow {i}")], TIMEOUT).await
        }));
    }
    for (i, task) in tasks.into_iter().enumerate() {
        let result = task.await.unwrap();
        assert_eq!(result.error, None);
        assert_eq!(result.exchanges[0].output, format!("done: slow {i}"));
    }
    let mut active: Vec<String> = Vec::new();
    let mut most = 0;
    let mut ports = std::collections::BTreeSet::new();
    for line in lab.read("events.log").lines() {
        let (what, port) = line.split_once(' ').unwrap();
        ports.insert(port.to_string());
        if what == "start" {
            active.push(port.to_string());
        } else {
            let at = active.iter().position(|p| p == port).unwrap();
            active.remove(at);
        }
        let distinct: std::collections::BTreeSet<&String> = active.iter().collect();
        most = most.max(distinct.len());
    }
    assert_eq!(lab.commands().len(), 8);
    assert_eq!(most, 2, "the two sessions were used in parallel");
    assert!(ports.len() <= 2, "client ports seen: {ports:?}");
    assert!(lab.accepted_connections() <= 2, "{}", lab.read("sshd.log"));
    assert!(pool.open_sessions() <= 2);
}

fn with_policy(lab: &Lab, policy: HostKeyPolicy, known_hosts: &Path) -> SshPool {
    let mut options = lab.options();
    options.host_key_policy = policy;
    options.known_hosts = known_hosts.to_path_buf();
    SshPool::new(lab.target(1), options)
}

#[tokio::test]
async fn host_keys_are_learned_once_and_a_changed_key_is_refused() {
    let mut lab = Lab::new();
    lab.start();
    let old = lab.host_fingerprint();
    let known_hosts = lab.path("state/ssh/known_hosts");
    let one = strings(&["/ping"]);

    let learn = with_policy(&lab, HostKeyPolicy::AcceptNew, &known_hosts);
    assert_eq!(learn.run(&one, TIMEOUT).await.error, None);
    let recorded = std::fs::read_to_string(&known_hosts).unwrap();
    assert!(
        recorded
            .trim_start()
            .starts_with(&format!("[127.0.0.1]:{} ssh-ed25519 ", lab.port)),
        "{recorded}"
    );
    let strict = with_policy(&lab, HostKeyPolicy::Strict, &known_hosts);
    assert_eq!(strict.run(&one, TIMEOUT).await.error, None);
    learn.close().await;
    strict.close().await;

    lab.kill();
    keygen(&lab.path("host_key"));
    lab.start();
    let new = lab.host_fingerprint();
    assert_ne!(old, new);
    let received = lab.commands().len();

    for policy in [HostKeyPolicy::Strict, HostKeyPolicy::AcceptNew] {
        let pool = with_policy(&lab, policy.clone(), &known_hosts);
        let result = pool.run(&one, TIMEOUT).await;
        let error = result.error.expect("a changed key must be refused");
        assert_eq!(
            error,
            SessionError::HostKeyChanged {
                label: lab.target(1).label(),
                known: old.clone(),
                offered: new.clone(),
            },
            "{policy:?}"
        );
        let message = error.to_string();
        assert!(
            message.contains(&old) && message.contains(&new),
            "{message}"
        );
        assert!(result.exchanges.is_empty());
    }
    assert_eq!(std::fs::read_to_string(&known_hosts).unwrap(), recorded);

    let pinned_wrong = with_policy(&lab, HostKeyPolicy::Pinned(old.clone()), &known_hosts);
    match pinned_wrong.run(&one, TIMEOUT).await.error {
        Some(SessionError::HostKeyChanged { known, offered, .. }) => {
            assert_eq!((known, offered), (old.clone(), new.clone()));
        }
        other => panic!("expected HostKeyChanged, got {other:?}"),
    }
    let empty = lab.path("empty_known_hosts");
    match with_policy(&lab, HostKeyPolicy::Strict, &empty)
        .run(&one, TIMEOUT)
        .await
        .error
    {
        Some(SessionError::HostKeyUnknown { offered, .. }) => assert_eq!(offered, new),
        other => panic!("expected HostKeyUnknown, got {other:?}"),
    }
    assert_eq!(
        lab.commands().len(),
        received,
        "nothing sent to a refused host"
    );

    let pinned_right = with_policy(&lab, HostKeyPolicy::Pinned(new.clone()), &known_hosts);
    assert_eq!(pinned_right.run(&one, TIMEOUT).await.error, None);
    assert_eq!(lab.commands().len(), received + 1);
}

#[tokio::test]
async fn a_dropped_connection_fails_the_command_in_flight_then_reconnects() {
    let mut lab = Lab::new();
    lab.start();
    let pool = Arc::new(SshPool::new(lab.target(1), lab.options()));
    let running = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.run(&strings(&["first", "hang"]), TIMEOUT).await })
    };
    let start = Instant::now();
    while !lab.commands().contains(&"hang".to_string()) {
        assert!(start.elapsed() < TIMEOUT, "hang never arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    lab.kill();
    let result = running.await.unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "noticed the drop quickly"
    );
    assert!(
        matches!(
            result.error,
            Some(SessionError::Closed(..)) | Some(SessionError::Timeout(..))
        ),
        "{:?}",
        result.error
    );
    let done: Vec<&str> = result
        .exchanges
        .iter()
        .map(|e| e.command.as_str())
        .collect();
    assert_eq!(
        done,
        ["first"],
        "the command in flight is not reported done"
    );

    lab.start();
    let result = pool.run(&strings(&["after restart"]), TIMEOUT).await;
    assert_eq!(result.error, None);
    assert_eq!(result.exchanges[0].output, "done: after restart");
    assert_eq!(pool.open_sessions(), 1);
}

#[tokio::test]
async fn a_rejected_key_is_an_auth_error() {
    let mut lab = Lab::new();
    lab.start();
    let mut options = lab.options();
    options.private_key = Some(lab.path("stranger_key"));
    let pool = SshPool::new(lab.target(1), options);
    let result = pool.run(&strings(&["/ping"]), TIMEOUT).await;
    assert_eq!(
        result.error,
        Some(SessionError::Auth(lab.target(1).label(), LOGIN.into()))
    );
    assert!(lab.commands().is_empty());
    assert_eq!(pool.open_sessions(), 0);
}

#[tokio::test]
async fn legacy_algorithms_are_offered_only_when_asked_for() {
    let mut lab = Lab::with_config(
        "KexAlgorithms diffie-hellman-group14-sha1\nCiphers aes128-cbc\nMACs hmac-sha1",
    );
    lab.start();
    let modern = SshPool::new(lab.target(1), lab.options());
    let result = modern.run(&strings(&["/ping"]), TIMEOUT).await;
    assert!(
        matches!(result.error, Some(SessionError::Connect(..))),
        "{:?}",
        result.error
    );
    let mut options = lab.options();
    options.legacy_crypto = true;
    let legacy = SshPool::new(lab.target(1), options);
    let result = legacy.run(&strings(&["/ping"]), TIMEOUT).await;
    assert_eq!(result.error, None);
    assert_eq!(lab.commands(), ["/ping"]);
}

/// fake-switches (Cisco IOS emulation over SSH, login root/root) on a loopback port.
struct FakeSwitch {
    child: Child,
    port: u16,
}

impl FakeSwitch {
    /// `launcher`: the package's own `fake-switches` script, or our copy of its launcher
    /// that keeps the enable password a str (see tests/peers/ssh/fake_cisco.py).
    fn start(patched_launcher: bool) -> FakeSwitch {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let venv = root.join(".venv-peers/bin");
        assert!(
            venv.join("fake-switches").exists(),
            "{} missing: run scripts/test-setup.sh",
            venv.display()
        );
        let port = free_port();
        let mut command = if patched_launcher {
            let mut command = Command::new(venv.join("python"));
            command
                .arg(root.join("tests/peers/ssh/fake_cisco.py"))
                .arg(port.to_string())
                .arg("root");
            command
        } else {
            let mut command = Command::new(venv.join("fake-switches"));
            command
                .args(["--model", "cisco_generic", "--listen-host", "127.0.0.1"])
                .arg("--listen-port")
                .arg(port.to_string());
            command
        };
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_for_port(port, &mut child);
        FakeSwitch { child, port }
    }

    fn target(&self, secret: &str) -> Target {
        Target {
            nas_id: 9,
            nas_name: "cisco".into(),
            host: "127.0.0.1".into(),
            port: self.port,
            login: Some("root".into()),
            password: Some(Secret::new("root")),
            secret: Some(Secret::new(secret)),
            max_sessions: 1,
        }
    }
}

impl Drop for FakeSwitch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn cisco_options(dir: &Path, enable: bool) -> SshOptions {
    let mut options = SshOptions::new(SshMode::Shell, dir.join("known_hosts"));
    options.host_key_policy = HostKeyPolicy::AcceptNew;
    options.enable = enable;
    options.setup = strings(&["terminal length 0"]);
    options.connect_timeout = TIMEOUT;
    options
}

#[tokio::test]
async fn cisco_shell_mode_with_enable_against_fake_switches() {
    let switch = FakeSwitch::start(true);
    let dir = tempfile::tempdir().unwrap();
    let pool = SshPool::new(switch.target("root"), cisco_options(dir.path(), true));
    let commands = strings(&[
        "configure terminal",
        "interface FastEthernet0/1",
        "description nasd-test",
        "exit",
        "exit",
        "show running-config interface FastEthernet0/1",
    ]);
    let result = pool.run(&commands, TIMEOUT).await;
    assert_eq!(result.error, None, "{:?}", result.exchanges);
    assert_eq!(result.exchanges.len(), 6);
    let last = &result.exchanges[5].output;
    assert!(
        last.contains("description nasd-test"),
        "{:#?}",
        result.exchanges
    );
    assert!(
        !last.contains("show running-config"),
        "echo stripped: {last:?}"
    );
    assert!(!last.contains("switch#"), "prompt stripped: {last:?}");
    assert!(!last.contains('\r'));
    assert_eq!(
        result.exchanges[0].output,
        "Enter configuration commands, one per line.  End with CNTL/Z."
    );
    assert_eq!(result.exchanges[1].output, "");

    // fake-switches answers an unknown `show` word with nothing at all, so the real IOS
    // error line is provoked with an interface that does not exist.
    let bad = strings(&["show running-config interface FastEthernet9/99", "nonsense"]);
    let result = pool.run(&bad, TIMEOUT).await;
    assert_eq!(result.error, None);
    assert!(
        result.exchanges[0].output.contains("% Invalid input"),
        "{:?}",
        result.exchanges[0].output
    );
    assert_eq!(result.exchanges[1].output, "No such command : nonsense");
    assert_eq!(pool.open_sessions(), 1, "the shell session was reused");
    pool.close().await;
}

#[tokio::test]
async fn a_refused_enable_secret_is_an_auth_error() {
    let switch = FakeSwitch::start(true);
    let dir = tempfile::tempdir().unwrap();
    let pool = SshPool::new(switch.target("wrong"), cisco_options(dir.path(), true));
    let result = pool.run(&strings(&["show version"]), TIMEOUT).await;
    assert_eq!(
        result.error,
        Some(SessionError::Auth(
            switch.target("").label(),
            "enable".into()
        ))
    );
    assert!(!format!("{:?}", result.error).contains("wrong"));
}

#[tokio::test]
async fn user_mode_shell_against_the_stock_fake_switches() {
    let switch = FakeSwitch::start(false);
    let dir = tempfile::tempdir().unwrap();
    let mut options = cisco_options(dir.path(), false);
    // A key the switch does not know: the pool falls back to the NAS password.
    keygen(&dir.path().join("daemon_key"));
    options.private_key = Some(dir.path().join("daemon_key"));
    let pool = SshPool::new(switch.target("root"), options);
    let result = pool
        .run(&strings(&["show nonsense", "show nonsense"]), TIMEOUT)
        .await;
    assert_eq!(result.error, None);
    assert_eq!(result.exchanges.len(), 2);
    for exchange in &result.exchanges {
        assert_eq!(exchange.output, "No such command : show nonsense");
    }
}

#[tokio::test]
async fn failed_connects_back_off_within_the_deadline() {
    // The backoff's timing (the first connect at once, then after 100 ms, 200 ms, ...;
    // a wait that would overrun the deadline fails at once with the last error) is
    // covered with paused time in `transport::pool`'s unit tests. Here, against a port
    // where nothing listens yet: every run fails with the connect error, and once sshd
    // is up the pool connects.
    let mut lab = Lab::new();
    let mut options = lab.options();
    options.connect_timeout = Duration::from_millis(1000);
    let pool = SshPool::new(lab.target(1), options);
    let one = strings(&["/ping"]);
    for _ in 0..3 {
        let result = pool.run(&one, TIMEOUT).await;
        assert!(
            matches!(result.error, Some(SessionError::Connect(..))),
            "{:?}",
            result.error
        );
    }

    // Inside the backoff with a deadline too short to wait it out: the same error.
    let mut options = lab.options();
    options.connect_timeout = Duration::from_millis(150);
    let short = SshPool::new(lab.target(1), options);
    for _ in 0..3 {
        let _ = short.run(&one, TIMEOUT).await;
    }
    let result = short.run(&one, TIMEOUT).await;
    assert!(matches!(result.error, Some(SessionError::Connect(..))));

    lab.start();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let result = pool.run(&one, TIMEOUT).await;
    assert_eq!(result.error, None);
    assert_eq!(lab.commands(), ["/ping"]);
}
