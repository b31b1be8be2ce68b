//! The NAS simulator: a fake MikroTik RouterOS box (SSH and telnet CLI, the binary API,
//! and a RADIUS CoA / Disconnect server) that the demo, the benchmarks and the tests drive
//! over real sockets.
//!
//! `routeros` is the pure interpreter and the shared `Device`; `ssh_server`,
//! `telnet_server`, `api_server` and `radius_server` are thin protocol shells around the
//! session logic kept here (latency, fault injection, line editing), so every protocol
//! behaves the same way and changes the same state.

mod api_server;
mod radius_server;
pub mod routeros;
mod ssh_server;
mod telnet_server;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use rand::Rng as _;
use tokio::net::{TcpListener, UdpSocket};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use routeros::{
    CoaOutcome, Device, DeviceCounters, Protocol, RadiusSession, RouterState, execute,
};

/// Command-line options of `nasd sim`.
#[derive(Clone, Debug, clap::Args)]
pub struct SimOptions {
    /// Address every listener (SSH, telnet, API, CoA) binds to.
    #[arg(long, default_value = "127.0.0.1")]
    pub listen: String,
    /// SSH port; 0 picks a free port (printed at start).
    #[arg(long, default_value_t = 0)]
    pub ssh_port: u16,
    /// Telnet port; 0 picks a free port (printed at start).
    #[arg(long, default_value_t = 0)]
    pub telnet_port: u16,
    /// RADIUS CoA / Disconnect UDP port; 0 picks a free port (printed at start).
    #[arg(long, default_value_t = 0)]
    pub coa_port: u16,
    /// RouterOS API TCP port; 0 picks a free port (printed at start).
    #[arg(long, default_value_t = 0)]
    pub api_port: u16,
    /// RouterOS API over TLS (api-ssl) TCP port; 0 picks a free port (printed at start
    /// with the certificate's SHA-256 fingerprint).
    #[arg(long, default_value_t = 0)]
    pub api_tls_port: u16,
    /// api-ssl certificate (PEM), given with --tls-key; when neither file exists a
    /// self-signed pair is generated there; without both, a self-signed one in memory.
    #[arg(long)]
    pub tls_cert: Option<std::path::PathBuf>,
    /// api-ssl private key (PEM), given with --tls-cert.
    #[arg(long)]
    pub tls_key: Option<std::path::PathBuf>,
    /// RADIUS shared secret the CoA server verifies requests and signs replies with.
    #[arg(long, default_value = "testing123")]
    pub secret: String,
    /// A CoA-Request naming an unknown session creates it (and is ACKed) instead of
    /// being NAKed with Session-Context-Not-Found, so benchmarks need no session setup.
    /// Disconnect-Requests for unknown sessions are NAKed either way.
    /// `--auto-sessions=false` turns it off.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub auto_sessions: bool,
    #[arg(long, default_value = "admin")]
    pub user: String,
    #[arg(long, default_value = "admin")]
    pub password: String,
    /// Delay before each command is answered, e.g. `50ms`.
    #[arg(long, default_value = "0ms")]
    pub latency: String,
    /// Live connections allowed per protocol (SSH, telnet, API); more are refused and
    /// counted.
    #[arg(long, default_value_t = 100)]
    pub max_sessions: usize,
    /// `drop:P` drops the connection on a command with probability P (the command is not
    /// applied; a CoA request is left unanswered), `hang:P` applies a command and never
    /// answers, `refuse-auth` rejects logins (CLI and API).
    #[arg(long)]
    pub fault: Vec<String>,
    /// The router identity shown in the prompt and by `/system identity print`.
    #[arg(long, default_value = "sim")]
    pub identity: String,
    /// Ed25519 host key file (OpenSSH format); generated there if missing, random in memory
    /// when not given.
    #[arg(long)]
    pub host_key: Option<std::path::PathBuf>,
    /// Appends one line per applied command to this file, `<unix ms> <kind> <command>`
    /// (kind `cli`, `api`, `coa` or `disconnect`), so a harness can count what reached
    /// the device: losses, repeats and order; and one line per connection refused for
    /// `--max-sessions`, `<unix ms> refused <ssh|telnet|api>`.
    #[arg(long)]
    pub record: Option<std::path::PathBuf>,
}

impl Default for SimOptions {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1".to_string(),
            ssh_port: 0,
            telnet_port: 0,
            coa_port: 0,
            api_port: 0,
            api_tls_port: 0,
            tls_cert: None,
            tls_key: None,
            secret: "testing123".to_string(),
            auto_sessions: true,
            user: "admin".to_string(),
            password: "admin".to_string(),
            latency: "0ms".to_string(),
            max_sessions: 100,
            fault: Vec::new(),
            identity: "sim".to_string(),
            host_key: None,
            record: None,
        }
    }
}

/// Injected misbehaviour, parsed from `--fault`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Faults {
    pub drop_probability: f64,
    pub hang_probability: f64,
    pub refuse_auth: bool,
}

impl Faults {
    pub fn parse(specs: &[String]) -> Result<Self, String> {
        let mut faults = Faults::default();
        for spec in specs {
            let probability = |text: &str| -> Result<f64, String> {
                text.parse::<f64>()
                    .ok()
                    .filter(|p| (0.0..=1.0).contains(p))
                    .ok_or_else(|| {
                        format!("fault `{spec}`: probability must be a number from 0 to 1")
                    })
            };
            match spec.split_once(':') {
                Some(("drop", p)) => faults.drop_probability = probability(p)?,
                Some(("hang", p)) => faults.hang_probability = probability(p)?,
                None if spec == "refuse-auth" => faults.refuse_auth = true,
                _ => {
                    return Err(format!(
                        "unknown fault `{spec}` (expected drop:P, hang:P or refuse-auth)"
                    ));
                }
            }
        }
        Ok(faults)
    }
}

/// What a session does with one command line.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Print this answer (possibly empty) and carry on.
    Answer(String),
    /// Close the connection without answering; the command was not applied.
    Drop,
    /// Never answer; the command was applied.
    Hang,
    /// The client asked to leave (`/quit`).
    Quit,
}

/// What the faults decided for one command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fate {
    /// Apply and answer.
    Answer,
    /// Do not apply, close the connection (or, over UDP, do not answer).
    Drop,
    /// Apply, never answer.
    Hang,
}

/// Settings and state every session of every protocol reads.
pub(crate) struct Shared {
    pub device: Device,
    pub user: String,
    pub password: String,
    pub latency: Duration,
    pub faults: Faults,
    pub max_sessions: usize,
    /// `--record`: the file applied commands are appended to.
    pub record: Option<Recorder>,
}

/// Appends applied commands to the `--record` file, one `write` per line (O_APPEND), so
/// the lines survive the simulator being killed.
pub(crate) struct Recorder {
    file: std::sync::Mutex<std::fs::File>,
}

impl Recorder {
    fn open(path: &Path) -> anyhow::Result<Recorder> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("sim: opening the record file {}", path.display()))?;
        Ok(Recorder {
            file: std::sync::Mutex::new(file),
        })
    }

    fn line(&self, kind: &str, command: &str) {
        use std::io::Write as _;
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let line = format!("{ms} {kind} {}\n", command.replace('\n', "\\n"));
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(error) = file.write_all(line.as_bytes()) {
            tracing::warn!(%error, "sim: writing the record file");
        }
    }
}

impl Shared {
    pub fn credentials_ok(&self, user: &str, password: &str) -> bool {
        !self.faults.refuse_auth && user == self.user && password == self.password
    }

    /// Records one applied command (with `--record`).
    pub fn record(&self, kind: &str, command: &str) {
        if let Some(recorder) = &self.record {
            recorder.line(kind, command);
        }
    }

    /// Takes a session slot for `protocol` unless `--max-sessions` of it are open; a
    /// refusal is counted and recorded (`refused ssh`), so a harness can tell how many
    /// connections a device turned away.
    pub fn open_session(&self, protocol: Protocol) -> Option<routeros::SessionGuard> {
        let guard = self.device.try_open_session(protocol, self.max_sessions);
        if guard.is_none() {
            let name = match protocol {
                Protocol::Ssh => "ssh",
                Protocol::Telnet => "telnet",
                Protocol::Api => "api",
            };
            self.record("refused", name);
        }
        guard
    }

    pub fn prompt(&self) -> String {
        format!("[{}@{}] > ", self.user, self.device.identity())
    }

    /// Runs one command line the way the simulated router would: waits the configured
    /// latency (abandoned on shutdown), rolls the faults, then executes.
    pub async fn run_command(&self, line: &str, cancel: &CancellationToken) -> Outcome {
        let line = line.trim();
        if matches!(line, "/quit" | "quit") {
            return Outcome::Quit;
        }
        if !self.wait_latency(cancel).await {
            return Outcome::Drop;
        }
        let fate = self.roll_faults();
        if fate == Fate::Drop {
            tracing::debug!(command = line, "sim: fault drops the connection");
            return Outcome::Drop;
        }
        let answer = self.device.execute(line);
        self.record("cli", line);
        tracing::debug!(command = line, answer = answer.as_str(), "sim: command");
        if fate == Fate::Hang {
            tracing::debug!(command = line, "sim: fault hangs the session");
            return Outcome::Hang;
        }
        Outcome::Answer(answer)
    }

    /// Waits the configured latency; false when shutdown cut the wait short.
    pub async fn wait_latency(&self, cancel: &CancellationToken) -> bool {
        if self.latency.is_zero() {
            return true;
        }
        tokio::select! {
            _ = cancel.cancelled() => false,
            _ = tokio::time::sleep(self.latency) => true,
        }
    }

    /// Rolls `drop:P` and `hang:P` for one command. Without faults no random number is
    /// drawn, which keeps the CoA hot path cheap.
    pub fn roll_faults(&self) -> Fate {
        if self.faults.drop_probability <= 0.0 && self.faults.hang_probability <= 0.0 {
            return Fate::Answer;
        }
        let (drop_roll, hang_roll) = {
            let mut rng = rand::rng();
            (rng.random::<f64>(), rng.random::<f64>())
        };
        if drop_roll < self.faults.drop_probability {
            Fate::Drop
        } else if hang_roll < self.faults.hang_probability {
            Fate::Hang
        } else {
            Fate::Answer
        }
    }
}

/// Turns typed bytes into command lines the way a terminal in canonical mode does: `\r`,
/// `\n`, `\r\n` and telnet's `\r\0` end a line; backspace, Ctrl-U and Ctrl-C edit it;
/// escape sequences (arrow keys) are ignored. It also produces the echo a PTY would send.
#[derive(Default)]
pub(crate) struct LineEditor {
    pending: std::collections::VecDeque<u8>,
    line: Vec<u8>,
    after_cr: bool,
    in_escape: bool,
    pub echo: bool,
}

/// Longer lines are cut: nothing nasd sends comes close, and it bounds memory per session.
const MAX_LINE: usize = 64 * 1024;

impl LineEditor {
    pub fn new(echo: bool) -> Self {
        Self {
            echo,
            ..Self::default()
        }
    }

    pub fn feed(&mut self, bytes: &[u8]) {
        self.pending.extend(bytes);
    }

    /// Consumes pending bytes up to the end of the next line. Returns the echo to send
    /// and the line, or `None` when more input is needed.
    pub fn next_line(&mut self) -> (Vec<u8>, Option<String>) {
        let mut echo = Vec::new();
        while let Some(byte) = self.pending.pop_front() {
            let after_cr = std::mem::take(&mut self.after_cr);
            if self.in_escape {
                // CSI sequences end with a byte in 0x40..=0x7e; `ESC [` itself does not.
                if byte != b'[' && (0x40..=0x7e).contains(&byte) {
                    self.in_escape = false;
                }
                continue;
            }
            match byte {
                b'\n' | 0 if after_cr => {}
                b'\r' | b'\n' => {
                    self.after_cr = byte == b'\r';
                    if self.echo {
                        echo.extend_from_slice(b"\r\n");
                    }
                    let line =
                        String::from_utf8_lossy(&std::mem::take(&mut self.line)).into_owned();
                    return (echo, Some(line));
                }
                0x7f | 0x08 => {
                    // Remove one whole UTF-8 character: continuation bytes, then the lead byte.
                    while self.line.last().is_some_and(|b| b & 0xc0 == 0x80) {
                        self.line.pop();
                    }
                    if self.line.pop().is_some() && self.echo {
                        echo.extend_from_slice(b"\x08 \x08");
                    }
                }
                0x15 | 0x03 => {
                    if self.echo {
                        for _ in String::from_utf8_lossy(&self.line).chars() {
                            echo.extend_from_slice(b"\x08 \x08");
                        }
                    }
                    self.line.clear();
                }
                0x1b => self.in_escape = true,
                byte if byte < 0x20 && byte != b'\t' => {}
                byte => {
                    if self.line.len() < MAX_LINE {
                        self.line.push(byte);
                        if self.echo {
                            echo.push(byte);
                        }
                    }
                }
            }
        }
        (echo, None)
    }
}

/// Converts an answer to terminal output: `\r\n` line ends, a final line end when non-empty.
pub(crate) fn terminal_text(answer: &str) -> String {
    if answer.is_empty() {
        String::new()
    } else {
        format!("{}\r\n", answer.replace('\n', "\r\n"))
    }
}

/// Shown once before the first prompt of an interactive session, like RouterOS's logo
/// banner, so clients have to find the prompt rather than assume the first bytes are it.
pub(crate) const BANNER: &str = "\r\n  MikroTik RouterOS 7.16 (c) 1999-2024       https://www.mikrotik.com/\r\n  (nasd simulator)\r\n\r\n";

/// A running simulator.
pub struct Sim {
    pub ssh_addr: SocketAddr,
    pub telnet_addr: SocketAddr,
    /// The RADIUS CoA / Disconnect server (UDP).
    pub coa_addr: SocketAddr,
    /// The RouterOS API server (TCP).
    pub api_addr: SocketAddr,
    /// The RouterOS API over TLS (api-ssl) and its certificate's fingerprint
    /// (`SHA256:...`, for pinning).
    pub api_tls_addr: SocketAddr,
    pub api_tls_fingerprint: String,
    pub device: Device,
    /// The SSH host public key in OpenSSH form (`ssh-ed25519 AAAA...`), for pinning.
    pub host_public_key: String,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

impl Sim {
    /// Stops accepting, closes every session and waits for the servers to finish.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.tasks.wait().await;
    }

    /// Waits until the servers have finished (after the shutdown token was cancelled).
    pub async fn wait(&self) {
        self.tasks.wait().await;
    }
}

/// Binds every listener, spawns the servers and returns once they are listening.
pub async fn start(opts: &SimOptions, shutdown: CancellationToken) -> anyhow::Result<Sim> {
    let latency = crate::duration::parse_duration(&opts.latency)
        .map_err(|e| anyhow::anyhow!("sim: --latency: {e}"))?;
    let faults = Faults::parse(&opts.fault).map_err(|e| anyhow::anyhow!("sim: {e}"))?;
    let host_key = load_or_create_host_key(opts.host_key.as_deref())?;
    let host_public_key = host_key
        .public_key()
        .to_openssh()
        .context("sim: encoding the host public key")?;

    let ssh_listener = TcpListener::bind((opts.listen.as_str(), opts.ssh_port))
        .await
        .with_context(|| format!("sim: binding ssh on {}:{}", opts.listen, opts.ssh_port))?;
    let telnet_listener = TcpListener::bind((opts.listen.as_str(), opts.telnet_port))
        .await
        .with_context(|| {
            format!(
                "sim: binding telnet on {}:{}",
                opts.listen, opts.telnet_port
            )
        })?;
    let api_listener = TcpListener::bind((opts.listen.as_str(), opts.api_port))
        .await
        .with_context(|| format!("sim: binding api on {}:{}", opts.listen, opts.api_port))?;
    let api_tls_listener = TcpListener::bind((opts.listen.as_str(), opts.api_tls_port))
        .await
        .with_context(|| {
            format!(
                "sim: binding api-ssl on {}:{}",
                opts.listen, opts.api_tls_port
            )
        })?;
    let (api_tls, api_tls_fingerprint) = api_server::tls_acceptor(
        opts.tls_cert.as_deref(),
        opts.tls_key.as_deref(),
        &opts.listen,
    )?;
    let coa_socket = UdpSocket::bind((opts.listen.as_str(), opts.coa_port))
        .await
        .with_context(|| format!("sim: binding coa on {}:{}", opts.listen, opts.coa_port))?;
    let ssh_addr = ssh_listener.local_addr()?;
    let telnet_addr = telnet_listener.local_addr()?;
    let api_addr = api_listener.local_addr()?;
    let api_tls_addr = api_tls_listener.local_addr()?;
    let coa_addr = coa_socket.local_addr()?;

    let device = Device::new(&opts.identity);
    let shared = Arc::new(Shared {
        device: device.clone(),
        user: opts.user.clone(),
        password: opts.password.clone(),
        latency,
        faults,
        max_sessions: opts.max_sessions,
        record: opts.record.as_deref().map(Recorder::open).transpose()?,
    });
    let tasks = TaskTracker::new();
    tasks.spawn(ssh_server::serve(
        ssh_listener,
        ssh_server::config(host_key),
        shared.clone(),
        shutdown.clone(),
        tasks.clone(),
    ));
    tasks.spawn(telnet_server::serve(
        telnet_listener,
        shared.clone(),
        shutdown.clone(),
        tasks.clone(),
    ));
    tasks.spawn(api_server::serve(
        api_listener,
        None,
        shared.clone(),
        shutdown.clone(),
        tasks.clone(),
    ));
    tasks.spawn(api_server::serve(
        api_tls_listener,
        Some(api_tls),
        shared.clone(),
        shutdown.clone(),
        tasks.clone(),
    ));
    tasks.spawn(radius_server::serve(
        coa_socket,
        radius_server::Settings {
            secret: opts.secret.clone().into_bytes(),
            auto_sessions: opts.auto_sessions,
        },
        shared,
        shutdown.clone(),
        tasks.clone(),
    ));
    // `wait` only returns once the tracker is closed; closing does not stop the servers
    // from tracking the connection tasks they spawn later.
    tasks.close();
    Ok(Sim {
        ssh_addr,
        telnet_addr,
        coa_addr,
        api_addr,
        api_tls_addr,
        api_tls_fingerprint,
        device,
        host_public_key,
        shutdown,
        tasks,
    })
}

/// `nasd sim`: runs the simulator until ctrl-c or SIGTERM.
pub async fn run(opts: SimOptions) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let sim = start(&opts, shutdown.clone()).await?;
    println!(
        "sim: ssh on {}, telnet on {}, api on {}, user {}",
        sim.ssh_addr, sim.telnet_addr, sim.api_addr, opts.user
    );
    // The secret itself is not printed: it came from the command line, and logs of
    // a demo should not teach anyone to paste secrets around.
    println!(
        "sim: coa on {} (udp), auto-sessions {}",
        sim.coa_addr,
        if opts.auto_sessions { "on" } else { "off" }
    );
    println!("sim: host key {}", sim.host_public_key);
    println!(
        "sim: api-ssl on {}, certificate {}",
        sim.api_tls_addr, sim.api_tls_fingerprint
    );
    wait_for_signal().await?;
    let counters = sim.device.counters();
    shutdown.cancel();
    // Sessions end as soon as they see the token; do not let a stuck peer hold the exit.
    if tokio::time::timeout(Duration::from_secs(5), sim.wait())
        .await
        .is_err()
    {
        tracing::warn!("sim: sessions still open after 5s, exiting anyway");
    }
    println!(
        "sim: stopped after {} commands, {} sessions ({} refused), coa {} ack / {} nak / {} dropped",
        counters.commands_executed,
        counters.sessions_opened,
        counters.sessions_refused,
        counters.coa_acks,
        counters.coa_naks,
        counters.coa_dropped
    );
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("sim: installing the SIGTERM handler")?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result.context("sim: waiting for ctrl-c")?,
        _ = terminate.recv() => {}
    }
    Ok(())
}

/// Reads the host key from `path`, or creates it there (mode 0600) so that a demo keeps
/// the same key across restarts; without a path the key lives only in memory.
fn load_or_create_host_key(path: Option<&Path>) -> anyhow::Result<russh::keys::PrivateKey> {
    use russh::keys::ssh_key::{LineEnding, private::Ed25519Keypair};

    if let Some(path) = path
        && path.exists()
    {
        return russh::keys::load_secret_key(path, None)
            .with_context(|| format!("sim: reading host key {}", path.display()));
    }
    // russh uses a different `rand` major version than nasd, so generate the seed here and
    // build the key from it instead of handing russh our RNG.
    let mut seed = [0u8; 32];
    rand::rng().fill(&mut seed);
    let key = russh::keys::PrivateKey::from(Ed25519Keypair::from_seed(&seed));
    if let Some(path) = path {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let text = key
            .to_openssh(LineEnding::LF)
            .context("sim: encoding the host key")?;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("sim: creating host key {}", path.display()))?;
        file.write_all(text.as_bytes())
            .with_context(|| format!("sim: writing host key {}", path.display()))?;
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_parse_table() {
        let ok = Faults::parse(&["drop:0.5".into(), "hang:1".into(), "refuse-auth".into()]);
        assert_eq!(
            ok,
            Ok(Faults {
                drop_probability: 0.5,
                hang_probability: 1.0,
                refuse_auth: true
            })
        );
        for bad in ["drop:2", "hang:x", "explode", "drop"] {
            assert!(Faults::parse(&[bad.to_string()]).is_err(), "{bad}");
        }
    }

    #[test]
    fn line_editor_table() {
        let cases: &[(&[u8], &[&str], &[u8])] = &[
            (b"abc\r", &["abc"], b"abc\r\n"),
            (b"abc\r\ndef\n", &["abc", "def"], b"abc\r\ndef\r\n"),
            (b"abc\r\0x\r", &["abc", "x"], b"abc\r\nx\r\n"),
            (b"abx\x7fc\r", &["abc"], b"abx\x08 \x08c\r\n"),
            (
                b"junk\x15ok\n",
                &["ok"],
                b"junk\x08 \x08\x08 \x08\x08 \x08\x08 \x08ok\r\n",
            ),
            (b"a\x1b[Ab\r", &["ab"], b"ab\r\n"),
            (b"\r\r", &["", ""], b"\r\n\r\n"),
            ("й\x7f!\r".as_bytes(), &["!"], b"\xd0\xb9\x08 \x08!\r\n"),
        ];
        for (input, lines, echo) in cases {
            let mut editor = LineEditor::new(true);
            editor.feed(input);
            let mut got_lines = Vec::new();
            let mut got_echo = Vec::new();
            loop {
                let (e, line) = editor.next_line();
                got_echo.extend(e);
                match line {
                    Some(line) => got_lines.push(line),
                    None => break,
                }
            }
            assert_eq!(got_lines, *lines, "input {input:?}");
            assert_eq!(got_echo, *echo, "input {input:?}");
        }
    }

    #[test]
    fn line_editor_without_echo_and_split_input() {
        let mut editor = LineEditor::new(false);
        editor.feed(b"sec");
        assert_eq!(editor.next_line(), (Vec::new(), None));
        editor.feed(b"ret\r");
        assert_eq!(editor.next_line(), (Vec::new(), Some("secret".to_string())));
        editor.feed(b"\n");
        assert_eq!(editor.next_line(), (Vec::new(), None));
    }

    #[test]
    fn refused_sessions_are_recorded_one_line_each() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("record");
        let shared = Shared {
            device: Device::new("sim"),
            user: "admin".into(),
            password: "admin".into(),
            latency: Duration::ZERO,
            faults: Faults::default(),
            max_sessions: 1,
            record: Some(Recorder::open(&path).expect("open")),
        };
        let ssh = shared
            .open_session(Protocol::Ssh)
            .expect("first ssh session");
        let telnet = shared
            .open_session(Protocol::Telnet)
            .expect("limits are per protocol");
        assert!(shared.open_session(Protocol::Ssh).is_none());
        assert!(shared.open_session(Protocol::Ssh).is_none());
        assert!(shared.open_session(Protocol::Telnet).is_none());
        drop(ssh);
        let again = shared.open_session(Protocol::Ssh).expect("a slot freed");
        assert!(shared.open_session(Protocol::Api).is_some());
        let text = std::fs::read_to_string(&path).expect("read");
        let kinds: Vec<&str> = text
            .lines()
            .map(|l| {
                let (ms, rest) = l.split_once(' ').expect("time first");
                assert!(ms.parse::<u128>().is_ok(), "{l}");
                rest
            })
            .collect();
        assert_eq!(kinds, ["refused ssh", "refused ssh", "refused telnet"]);
        assert_eq!(shared.device.counters().sessions_refused, 3);
        drop((telnet, again));
    }

    #[test]
    fn recorder_appends_one_line_per_command() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("record");
        std::fs::write(&path, "kept\n").expect("earlier content");
        let recorder = Recorder::open(&path).expect("open");
        recorder.line(
            "cli",
            "/ip firewall address-list add list=ev1 address=10.0.0.1",
        );
        recorder.line("api", "two\nlines");
        let text = std::fs::read_to_string(&path).expect("read");
        let lines: Vec<(&str, &str)> = text
            .lines()
            .skip(1)
            .map(|l| l.split_once(' ').expect("time first"))
            .collect();
        assert!(text.starts_with("kept\n"), "appends: {text}");
        assert!(lines.iter().all(|(ms, _)| ms.parse::<u128>().is_ok()));
        let rest: Vec<&str> = lines.iter().map(|(_, rest)| *rest).collect();
        assert_eq!(
            rest,
            [
                "cli /ip firewall address-list add list=ev1 address=10.0.0.1",
                "api two\\nlines"
            ]
        );
    }
}
