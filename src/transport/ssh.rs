//! SSH transport: a per-NAS pool of long-lived russh connections running commands either
//! as one exec channel per command (RouterOS, Junos, Linux) or through a PTY shell read
//! up to an anchored prompt (Cisco IOS/ISG, where `enable`/`configure` keep state).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use regex::Regex;
use russh::client::{self, Handle, KeyboardInteractiveAuthResponse};
use russh::keys::{HashAlg, PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate};
use russh::{Channel, ChannelMsg, Disconnect, MethodKind, Preferred, cipher, kex, mac};
use tokio::time::Instant;

use super::pool::{Connector, Pool, PoolCounters, Session};
use super::{CliResult, Exchange, SessionError, Target};

/// How commands are sent over a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SshMode {
    /// One exec channel per command on a long-lived connection (RouterOS, Linux, Junos).
    Exec,
    /// One PTY shell per connection, prompt-driven (Cisco IOS/ISG).
    Shell,
}

/// Which server host keys are trusted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostKeyPolicy {
    /// The key must already be in the known_hosts file.
    Strict,
    /// Learn an unknown key once (appending it to known_hosts), refuse a changed one.
    AcceptNew,
    /// Accept only this fingerprint (`SHA256:...` as `ssh-keygen -lf` prints it).
    Pinned(String),
}

/// Per-NAS SSH settings.
#[derive(Clone, Debug)]
pub struct SshOptions {
    pub mode: SshMode,
    /// nasd-owned known_hosts file (OpenSSH format, `[host]:port` for non-22 ports).
    pub known_hosts: PathBuf,
    pub host_key_policy: HostKeyPolicy,
    /// Also offer diffie-hellman-group1/14-sha1 and group-exchange-sha1 kex, aes*-cbc
    /// ciphers, hmac-sha1 and ssh-rsa (SHA-1) host keys.
    pub legacy_crypto: bool,
    /// Key authentication with this OpenSSH private key file; password auth when `None`.
    pub private_key: Option<PathBuf>,
    /// The passphrase of an encrypted `private_key`.
    pub key_passphrase: Option<crate::model::Secret>,
    /// Shell mode: matched against the text after the last newline of the output.
    pub prompt: Regex,
    /// Shell mode: send `enable` after login, answering `Password:` with `target.secret`.
    pub enable: bool,
    /// Shell mode: sent once per new session after login/enable (e.g. `terminal length 0`).
    pub setup: Vec<String>,
    /// Deadline for getting a usable session once a slot is free (`[transport]
    /// connect_timeout`): backoff, TCP, key exchange, authentication and (shell mode)
    /// the shell, enable and setup. Waiting for the slot itself is not bounded.
    pub connect_timeout: Duration,
    /// Keepalive interval; the connection is dropped after 4x this without traffic.
    pub keepalive: Duration,
}

/// The default shell prompt: scrapli's IOS exec-mode pattern plus `$` for Unix shells.
const DEFAULT_PROMPT: &str = r"^\S{1,63}[>#$]\s?$";

impl SshOptions {
    pub fn new(mode: SshMode, known_hosts: PathBuf) -> SshOptions {
        SshOptions {
            mode,
            known_hosts,
            host_key_policy: HostKeyPolicy::Strict,
            legacy_crypto: false,
            private_key: None,
            key_passphrase: None,
            prompt: default_prompt(),
            enable: false,
            setup: Vec::new(),
            connect_timeout: super::pool::DEFAULT_CONNECT_TIMEOUT,
            keepalive: Duration::from_secs(15),
        }
    }
}

fn default_prompt() -> Regex {
    // The pattern is a constant that is covered by the tests; failing here would be a
    // programming error, not an input error.
    Regex::new(DEFAULT_PROMPT).expect("default prompt regex is valid")
}

/// The OpenSSH fingerprint of a key: `SHA256:` + unpadded base64, as `ssh-keygen -l` prints.
pub fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

/// How long a discarded connection may take to say goodbye before it is just dropped.
const DISCONNECT_GRACE: Duration = Duration::from_secs(1);

/// A pool of SSH connections to one NAS, shared by all its workers (see
/// [`super::pool`]: slots, idle reuse, backoff and closing live there).
pub struct SshPool {
    pool: Pool<SshConnector>,
}

/// What opening a connection needs; also runs commands on one.
struct SshConnector {
    target: Target,
    options: SshOptions,
    config: Arc<client::Config>,
}

/// One authenticated connection (and, in shell mode, its shell at a prompt).
struct Conn {
    handle: Handle<Client>,
    shell: Option<Shell>,
}

impl Session for Conn {
    async fn usable(&mut self) -> bool {
        // Closed by the server or by the inactivity timeout while idle.
        !self.handle.is_closed()
    }

    async fn goodbye(&mut self) {
        say_goodbye(self).await;
    }
}

impl Connector for SshConnector {
    type Session = Conn;

    async fn connect(&self, _deadline: Instant) -> Result<Conn, SessionError> {
        self.open().await
    }
}

/// A command failure, and whether it showed the connection was already dead before any
/// of the command was sent (then a fresh connection may run the command once more).
struct CmdError {
    error: SessionError,
    stale: bool,
}

impl CmdError {
    fn new(error: SessionError) -> CmdError {
        CmdError {
            error,
            stale: false,
        }
    }
}

impl SshPool {
    /// A pool that connects lazily, on the first `run`.
    pub fn new(target: Target, options: SshOptions) -> SshPool {
        let config = Arc::new(client_config(&options));
        let label = target.label();
        let max_sessions = target.max_sessions;
        let connect_timeout = options.connect_timeout;
        SshPool {
            pool: Pool::new(
                SshConnector {
                    target,
                    options,
                    config,
                },
                label,
                "SSH",
                max_sessions,
                connect_timeout,
            ),
        }
    }

    /// Connections open now (idle and in use).
    pub fn open_sessions(&self) -> usize {
        self.pool.open_sessions()
    }

    /// The pool's counters, for the statistics.
    pub fn counters(&self) -> Arc<PoolCounters> {
        self.pool.counters()
    }

    /// Runs the commands in order on one session (taken from the pool or opened), each
    /// under `timeout`. Waiting for a free session is unbounded; getting the session once
    /// a slot is free is bounded by `connect_timeout` (and `timeout`). On any error the
    /// session is dropped, and the command in flight is not in `exchanges`.
    pub async fn run(&self, commands: &[String], timeout: Duration) -> CliResult {
        let mut result = CliResult::default();
        let label = self.pool.label();
        let mut lease = match self.pool.checkout(timeout).await {
            Ok(lease) => lease,
            Err(error) => {
                result.error = Some(error);
                return result;
            }
        };
        let connector = self.pool.connector();
        let mut index = 0;
        while let Some(command) = commands.get(index) {
            if let Err(error) = super::gate::check(label, index) {
                // Dropping the lease discards the connection.
                result.error = Some(error);
                return result;
            }
            let outcome =
                match tokio::time::timeout(timeout, connector.command(lease.session(), command))
                    .await
                {
                    Ok(outcome) => outcome,
                    Err(_) => Err(CmdError::new(SessionError::Timeout(
                        label.to_string(),
                        format!(
                            "no complete answer to command {} within {timeout:?}",
                            index + 1
                        ),
                    ))),
                };
            match outcome {
                Ok(output) => {
                    result.exchanges.push(Exchange {
                        command: command.clone(),
                        output,
                    });
                    index += 1;
                }
                Err(CmdError { error, stale: true }) if lease.reused() && index == 0 => {
                    // A pooled connection that died while idle: nothing was sent, so the
                    // command goes once over a fresh connection (same slot).
                    tracing::debug!(nas = %label, %error, "pooled SSH connection is dead, reconnecting");
                    lease = match lease.reconnect().await {
                        Ok(lease) => lease,
                        Err(error) => {
                            result.error = Some(error);
                            return result;
                        }
                    };
                }
                Err(CmdError { error, .. }) => {
                    // Dropping the lease discards the connection: it is never reused.
                    tracing::debug!(nas = %label, %error, "SSH session dropped");
                    result.error = Some(error);
                    return result;
                }
            }
        }
        lease.done();
        result
    }

    /// Disconnects the idle connections and refuses further runs; sessions in use are
    /// disconnected when their run ends.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

impl SshConnector {
    /// TCP, key exchange with the host key check, authentication, and in shell mode the
    /// shell up to its first prompt with enable and setup done.
    async fn open(&self) -> Result<Conn, SessionError> {
        let label = self.target.label();
        let user = self.target.login.clone().ok_or_else(|| {
            SessionError::Connect(label.clone(), "no login configured for SSH".into())
        })?;
        let handler = Client {
            label: label.clone(),
            host: self.target.host.clone(),
            port: self.target.port,
            policy: self.options.host_key_policy.clone(),
            known_hosts: self.options.known_hosts.clone(),
        };
        let address = (self.target.host.as_str(), self.target.port);
        let mut handle = client::connect(self.config.clone(), address, handler)
            .await
            .map_err(|error| match error {
                ClientError::HostKey(error) => error,
                ClientError::Ssh(russh::Error::IO(error)) => SessionError::connect(&label, &error),
                ClientError::Ssh(error) => SessionError::Connect(label.clone(), error.to_string()),
            })?;
        self.authenticate(&mut handle, &user).await?;
        let mut conn = Conn {
            handle,
            shell: None,
        };
        if self.options.mode == SshMode::Shell {
            let shell = self.open_shell(&conn.handle).await?;
            conn.shell = Some(shell);
        }
        Ok(conn)
    }

    async fn authenticate(
        &self,
        handle: &mut Handle<Client>,
        user: &str,
    ) -> Result<(), SessionError> {
        let label = self.target.label();
        let connect_error =
            |error: russh::Error| SessionError::Connect(label.clone(), error.to_string());
        let rejected = || SessionError::Auth(label.clone(), user.to_string());
        if let Some(path) = &self.options.private_key {
            let passphrase = self.options.key_passphrase.as_ref().map(|p| p.expose());
            let key = russh::keys::load_secret_key(path, passphrase).map_err(|error| {
                SessionError::Connect(
                    label.clone(),
                    format!("cannot load private key {}: {error}", path.display()),
                )
            })?;
            let hash = handle
                .best_supported_rsa_hash()
                .await
                .map_err(connect_error)?
                .flatten();
            let key = PrivateKeyWithHashAlg::new(Arc::new(key), hash);
            let outcome = handle
                .authenticate_publickey(user, key)
                .await
                .map_err(connect_error)?;
            if outcome.success() {
                return Ok(());
            }
            // The daemon key is often global while passwords are per NAS: a NAS that
            // does not know the key may still take its password.
            if self.target.password.is_none() {
                return Err(rejected());
            }
        }
        let Some(password) = &self.target.password else {
            let outcome = handle
                .authenticate_none(user)
                .await
                .map_err(connect_error)?;
            return if outcome.success() {
                Ok(())
            } else {
                Err(rejected())
            };
        };
        let outcome = handle
            .authenticate_password(user, password.expose())
            .await
            .map_err(connect_error)?;
        let remaining = match outcome {
            client::AuthResult::Success => return Ok(()),
            client::AuthResult::Failure {
                remaining_methods, ..
            } => remaining_methods,
        };
        if !remaining.contains(&MethodKind::KeyboardInteractive) {
            return Err(rejected());
        }
        // Servers that take passwords only through PAM (Linux, Junos) offer
        // keyboard-interactive instead: answer every hidden prompt with the password.
        let mut reply = handle
            .authenticate_keyboard_interactive_start(user, None)
            .await
            .map_err(connect_error)?;
        for _ in 0..4 {
            match reply {
                KeyboardInteractiveAuthResponse::Success => return Ok(()),
                KeyboardInteractiveAuthResponse::Failure { .. } => return Err(rejected()),
                KeyboardInteractiveAuthResponse::InfoRequest { prompts, .. } => {
                    let answers = prompts
                        .iter()
                        .map(|p| {
                            if p.echo {
                                String::new()
                            } else {
                                password.expose().to_string()
                            }
                        })
                        .collect();
                    reply = handle
                        .authenticate_keyboard_interactive_respond(answers)
                        .await
                        .map_err(connect_error)?;
                }
            }
        }
        Err(rejected())
    }

    async fn open_shell(&self, handle: &Handle<Client>) -> Result<Shell, SessionError> {
        let label = self.target.label();
        let closed = |what: &str, error: russh::Error| {
            SessionError::Closed(label.clone(), format!("{what}: {error}"))
        };
        let channel = handle
            .channel_open_session()
            .await
            .map_err(|e| closed("cannot open a channel", e))?;
        let mut shell = Shell {
            channel,
            raw: Vec::new(),
            last_prompt: String::new(),
            label: label.clone(),
        };
        // A wide terminal so that long commands are not wrapped in the echo.
        shell
            .channel
            .request_pty(true, "vt100", 511, 24, 0, 0, &[])
            .await
            .map_err(|e| closed("pty request", e))?;
        shell.wait_reply("pty request").await?;
        shell
            .channel
            .request_shell(true)
            .await
            .map_err(|e| closed("shell request", e))?;
        shell.wait_reply("shell request").await?;
        shell.read_until(&self.options.prompt, None).await?;
        if self.options.enable {
            self.enable(&mut shell).await?;
        }
        for command in &self.options.setup {
            let output = shell
                .command(command, &self.options.prompt)
                .await
                .map_err(|e| e.error)?;
            tracing::debug!(nas = %label, command, output, "SSH setup command");
        }
        Ok(shell)
    }

    async fn enable(&self, shell: &mut Shell) -> Result<(), SessionError> {
        let label = self.target.label();
        let refused = || SessionError::Auth(label.clone(), "enable".to_string());
        let password_prompt = password_prompt();
        shell.send("enable\n").await?;
        let (_, asked) = shell
            .read_until(&self.options.prompt, Some(&password_prompt))
            .await?;
        if asked {
            let Some(secret) = &self.target.secret else {
                return Err(refused());
            };
            shell.send(&format!("{}\n", secret.expose())).await?;
            let (_, asked_again) = shell
                .read_until(&self.options.prompt, Some(&password_prompt))
                .await?;
            if asked_again {
                return Err(refused());
            }
        }
        if !shell.last_prompt.trim_end().ends_with('#') {
            return Err(refused());
        }
        Ok(())
    }

    async fn command(&self, conn: &mut Conn, command: &str) -> Result<String, CmdError> {
        match &mut conn.shell {
            Some(shell) => shell.command(command, &self.options.prompt).await,
            None => exec(&conn.handle, &self.target.label(), command).await,
        }
    }
}

fn password_prompt() -> Regex {
    // Constant pattern; see default_prompt.
    Regex::new(r"(?i)password:\s*$").expect("password prompt regex is valid")
}

async fn say_goodbye(conn: &Conn) {
    let _ = tokio::time::timeout(
        DISCONNECT_GRACE,
        conn.handle
            .disconnect(Disconnect::ByApplication, "nasd closing session", "en"),
    )
    .await;
}

/// One command on its own exec channel. A non-zero exit status is not an error: it is
/// appended to the output as `exit status N` for the answer classifier.
async fn exec(handle: &Handle<Client>, label: &str, command: &str) -> Result<String, CmdError> {
    let mut channel = handle
        .channel_open_session()
        .await
        .map_err(|error| match error {
            // The device is there and said no (e.g. too many channels): not a dead link.
            russh::Error::ChannelOpenFailure(reason) => CmdError::new(SessionError::Protocol(
                label.to_string(),
                format!("the device refused to open a channel: {reason:?}"),
            )),
            error => CmdError {
                error: SessionError::Closed(
                    label.to_string(),
                    format!("cannot open a channel: {error}"),
                ),
                stale: true,
            },
        })?;
    // Opening the channel took a round trip: a daemon frozen meanwhile asks again.
    if !super::gate::open() {
        return Err(CmdError::new(super::gate::closed_before(label, command)));
    }
    channel.exec(true, command).await.map_err(|error| {
        CmdError::new(SessionError::Closed(
            label.to_string(),
            format!("cannot send exec request: {error}"),
        ))
    })?;
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    let mut confirmed = false;
    let mut status: Option<u32> = None;
    let mut signal: Option<String> = None;
    loop {
        match channel.wait().await {
            Some(ChannelMsg::Success) => confirmed = true,
            // `exec` returns Ok even when the server refuses it; the refusal comes here.
            Some(ChannelMsg::Failure) if !confirmed => {
                return Err(CmdError::new(SessionError::Protocol(
                    label.to_string(),
                    "the device refused the exec request".into(),
                )));
            }
            Some(ChannelMsg::Data { data }) => stdout.extend_from_slice(&data),
            Some(ChannelMsg::ExtendedData { data, .. }) => stderr.extend_from_slice(&data),
            Some(ChannelMsg::ExitStatus { exit_status }) => status = Some(exit_status),
            Some(ChannelMsg::ExitSignal { signal_name, .. }) => {
                signal = Some(format!("{signal_name:?}"));
            }
            Some(ChannelMsg::Close) => break,
            Some(_) => {}
            None if status.is_some() || signal.is_some() => break,
            None => {
                return Err(CmdError::new(SessionError::Closed(
                    label.to_string(),
                    "connection lost before the command finished".into(),
                )));
            }
        }
    }
    // A command killed by a signal may not have done its work (the device rebooted or
    // its process was killed): report it like a dropped connection so it is retried.
    if let (None, Some(signal)) = (status, &signal) {
        return Err(CmdError::new(SessionError::Closed(
            label.to_string(),
            format!("the command was killed by signal {signal}"),
        )));
    }
    let mut output = String::from_utf8_lossy(&stdout)
        .trim_end_matches(['\r', '\n'])
        .to_string();
    let errors = String::from_utf8_lossy(&stderr);
    let errors = errors.trim_end_matches(['\r', '\n']);
    for part in [errors.to_string(), exit_note(status, signal)] {
        if part.is_empty() {
            continue;
        }
        if !output.is_empty() {
            output.push('\n');
        }
        output.push_str(&part);
    }
    Ok(output)
}

fn exit_note(status: Option<u32>, signal: Option<String>) -> String {
    match (status, signal) {
        (Some(0), _) | (None, None) => String::new(),
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => format!("exit signal {signal}"),
    }
}

/// A PTY shell positioned at a prompt.
struct Shell {
    channel: Channel<client::Msg>,
    /// Bytes received since the last prompt.
    raw: Vec<u8>,
    /// The prompt line that ended the last read (enable checks it ends in `#`).
    last_prompt: String,
    label: String,
}

impl Shell {
    async fn send(&self, text: &str) -> Result<(), SessionError> {
        self.channel.data(text.as_bytes()).await.map_err(|error| {
            SessionError::Closed(self.label.clone(), format!("cannot send: {error}"))
        })
    }

    /// Waits for the reply to a want_reply channel request.
    async fn wait_reply(&mut self, what: &str) -> Result<(), SessionError> {
        loop {
            match self.channel.wait().await {
                Some(ChannelMsg::Success) => return Ok(()),
                Some(ChannelMsg::Failure) => {
                    return Err(SessionError::Protocol(
                        self.label.clone(),
                        format!("the device refused the {what}"),
                    ));
                }
                Some(ChannelMsg::Data { data }) | Some(ChannelMsg::ExtendedData { data, .. }) => {
                    self.raw.extend_from_slice(&data);
                }
                Some(ChannelMsg::Eof) | Some(ChannelMsg::Close) | None => {
                    return Err(SessionError::Closed(
                        self.label.clone(),
                        format!("channel closed during the {what}"),
                    ));
                }
                Some(_) => {}
            }
        }
    }

    /// Reads until the last line matches `prompt` (returns false) or `alternative`
    /// (returns true); returns the cleaned text including that last line.
    async fn read_until(
        &mut self,
        prompt: &Regex,
        alternative: Option<&Regex>,
    ) -> Result<(String, bool), SessionError> {
        loop {
            let start = self
                .raw
                .iter()
                .rposition(|b| *b == b'\n')
                .map_or(0, |i| i + 1);
            let tail = clean(&String::from_utf8_lossy(&self.raw[start..]));
            let matched = if prompt.is_match(&tail) {
                Some(false)
            } else if alternative.is_some_and(|a| a.is_match(&tail)) {
                Some(true)
            } else {
                None
            };
            if let Some(asked) = matched {
                let text = clean(&String::from_utf8_lossy(&self.raw));
                self.raw.clear();
                self.last_prompt = tail;
                return Ok((text, asked));
            }
            match self.channel.wait().await {
                Some(ChannelMsg::Data { data }) | Some(ChannelMsg::ExtendedData { data, .. }) => {
                    self.raw.extend_from_slice(&data);
                }
                Some(ChannelMsg::Eof) | Some(ChannelMsg::Close) | None => {
                    return Err(SessionError::Closed(
                        self.label.clone(),
                        "the device closed the shell".into(),
                    ));
                }
                Some(_) => {}
            }
        }
    }

    /// Sends one command and returns what the device printed, without the echoed
    /// command line and the trailing prompt.
    async fn command(&mut self, command: &str, prompt: &Regex) -> Result<String, CmdError> {
        self.send(&format!("{command}\n"))
            .await
            .map_err(CmdError::new)?;
        let (text, _) = self.read_until(prompt, None).await.map_err(CmdError::new)?;
        Ok(strip_echo_and_prompt(&text, command))
    }
}

/// Removes the echoed command (first line, when it carries the command) and the prompt
/// (last line) from a shell answer.
fn strip_echo_and_prompt(text: &str, command: &str) -> String {
    let mut lines: Vec<&str> = text.split('\n').collect();
    lines.pop();
    let wanted = command.trim();
    if lines
        .first()
        .is_some_and(|first| !wanted.is_empty() && first.trim_end().ends_with(wanted))
    {
        lines.remove(0);
    }
    while lines.first().is_some_and(|l| l.trim().is_empty()) {
        lines.remove(0);
    }
    while lines.last().is_some_and(|l| l.trim().is_empty()) {
        lines.pop();
    }
    lines.join("\n")
}

/// Removes ANSI escape sequences, carriage returns and other control characters
/// (a backspace erases the character before it, as on a terminal).
fn clean(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => match chars.next() {
                // CSI: parameters and intermediates up to a final byte in @..~
                Some('[') => {
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                }
                // OSC: up to BEL or ESC \
                Some(']') => {
                    while let Some(c) = chars.next() {
                        if c == '\x07' {
                            break;
                        }
                        if c == '\x1b' {
                            chars.next_if_eq(&'\\');
                            break;
                        }
                    }
                }
                // Two-byte sequences (charset selection takes one more character).
                Some('(') | Some(')') => {
                    chars.next();
                }
                _ => {}
            },
            '\x08' => {
                out.pop();
            }
            '\n' | '\t' => out.push(c),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

fn client_config(options: &SshOptions) -> client::Config {
    let mut preferred = Preferred::default();
    if options.legacy_crypto {
        // Old Cisco IOS and RouterOS: SHA-1 key exchanges and CBC ciphers, only when the
        // NAS is configured for it. They go after the modern ones, before the extension
        // pseudo-algorithms.
        let mut kexes: Vec<kex::Name> = preferred.kex.to_vec();
        let at = kexes
            .iter()
            .position(|k| *k == kex::EXTENSION_SUPPORT_AS_CLIENT)
            .unwrap_or(kexes.len());
        for (i, name) in [kex::DH_G14_SHA1, kex::DH_GEX_SHA1, kex::DH_G1_SHA1]
            .into_iter()
            .enumerate()
        {
            kexes.insert(at + i, name);
        }
        preferred.kex = kexes.into();
        let mut ciphers = preferred.cipher.to_vec();
        ciphers.extend([
            cipher::AES_256_CBC,
            cipher::AES_192_CBC,
            cipher::AES_128_CBC,
        ]);
        preferred.cipher = ciphers.into();
        let mut macs = preferred.mac.to_vec();
        macs.extend([mac::HMAC_SHA1_ETM, mac::HMAC_SHA1]);
        preferred.mac = macs.into();
    } else {
        // russh offers ssh-rsa (SHA-1 signatures) by default; keep it for legacy NAS only.
        let keys: Vec<_> = preferred
            .key
            .iter()
            .filter(|k| **k != russh::keys::Algorithm::Rsa { hash: None })
            .cloned()
            .collect();
        preferred.key = keys.into();
    }
    client::Config {
        preferred,
        keepalive_interval: Some(options.keepalive),
        keepalive_max: 3,
        inactivity_timeout: Some(options.keepalive.saturating_mul(4)),
        nodelay: true,
        ..client::Config::default()
    }
}

/// What the russh client task reports besides its own errors.
#[derive(Debug)]
enum ClientError {
    Ssh(russh::Error),
    /// The host key was refused; the `SessionError` says why.
    HostKey(SessionError),
}

impl From<russh::Error> for ClientError {
    fn from(error: russh::Error) -> ClientError {
        ClientError::Ssh(error)
    }
}

/// The russh handler: only decides whether to trust the server's host key.
struct Client {
    label: String,
    host: String,
    port: u16,
    policy: HostKeyPolicy,
    known_hosts: PathBuf,
}

impl client::Handler for Client {
    type Error = ClientError;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, ClientError> {
        // For a certificate, the certified key is what is pinned or recorded.
        let key = key.public_key();
        let offered = fingerprint(&key);
        match check_host_key(&self.policy, &self.host, self.port, &key, &self.known_hosts) {
            Ok(()) => Ok(true),
            Err(refusal) => {
                let error = match refusal {
                    Refusal::Changed { known } => SessionError::HostKeyChanged {
                        label: self.label.clone(),
                        known,
                        offered,
                    },
                    Refusal::Unknown => SessionError::HostKeyUnknown {
                        label: self.label.clone(),
                        offered,
                        known_hosts: self.known_hosts.display().to_string(),
                    },
                    Refusal::File(problem) => SessionError::Connect(
                        self.label.clone(),
                        format!("known_hosts {}: {problem}", self.known_hosts.display()),
                    ),
                };
                tracing::warn!(nas = %self.label, %error, "SSH host key refused");
                Err(ClientError::HostKey(error))
            }
        }
    }
}

enum Refusal {
    Changed { known: String },
    Unknown,
    File(String),
}

fn check_host_key(
    policy: &HostKeyPolicy,
    host: &str,
    port: u16,
    key: &PublicKey,
    known_hosts: &Path,
) -> Result<(), Refusal> {
    if let HostKeyPolicy::Pinned(pinned) = policy {
        let offered = fingerprint(key);
        // OpenSSH prints the base64 without padding; tolerate a pasted padded form.
        return if offered.trim_end_matches('=') == pinned.trim().trim_end_matches('=') {
            Ok(())
        } else {
            Err(Refusal::Changed {
                known: pinned.clone(),
            })
        };
    }
    let recorded = russh::keys::known_hosts::known_host_keys_path(host, port, known_hosts)
        .map_err(|e| Refusal::File(e.to_string()))?;
    if recorded
        .iter()
        .any(|(_, known)| known.key_data() == key.key_data())
    {
        return Ok(());
    }
    // A recorded key that is not the offered one, of the same type or not, means the
    // device changed: refuse under every policy (OpenSSH would at least warn).
    if let Some((_, known)) = recorded
        .iter()
        .find(|(_, known)| known.algorithm() == key.algorithm())
        .or(recorded.first())
    {
        return Err(Refusal::Changed {
            known: fingerprint(known),
        });
    }
    match policy {
        HostKeyPolicy::AcceptNew => {
            russh::keys::known_hosts::learn_known_hosts_path(host, port, key, known_hosts)
                .map_err(|e| Refusal::File(format!("cannot record the key: {e}")))?;
            tracing::info!(host, port, fingerprint = %fingerprint(key), "learned SSH host key");
            Ok(())
        }
        _ => Err(Refusal::Unknown),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleans_terminal_output() {
        assert_eq!(clean("\x1b[1;32mok\x1b[0m\r\n"), "ok\n");
        assert_eq!(clean("ab\x08c\x07"), "ac");
        assert_eq!(clean("\x1b]0;title\x07x"), "x");
    }

    #[test]
    fn strips_echo_and_prompt() {
        let text = "show clock\n12:00\n\nswitch#";
        assert_eq!(strip_echo_and_prompt(text, "show clock"), "12:00");
        assert_eq!(strip_echo_and_prompt("exit\nswitch#", "exit"), "");
    }

    #[test]
    fn default_prompt_matches_cisco_prompts() {
        let prompt = default_prompt();
        for ok in ["switch>", "switch#", "switch(config-if)#", "user@host:~$ "] {
            assert!(prompt.is_match(ok), "{ok}");
        }
        for bad in ["show run", "% Invalid input", ""] {
            assert!(!prompt.is_match(bad), "{bad}");
        }
    }

    #[test]
    fn exit_status_is_a_final_line() {
        assert_eq!(exit_note(Some(0), None), "");
        assert_eq!(exit_note(Some(3), None), "exit status 3");
    }
}
