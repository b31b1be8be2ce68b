//! Telnet transport: a pool of long-lived CLI sessions per NAS, driven by an anchored
//! prompt regex, over a sans-IO telnet decoder (`TelnetStream`).
//!
//! There is no maintained tokio telnet client, so the protocol part is `libmudtelnet-rs`'s
//! option table behind our own byte scanner, and the session part is a plain read loop:
//! send a line, read until the last line matches the prompt, every read under a deadline.

use std::os::fd::AsFd;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use libmudtelnet_rs::Parser;
use libmudtelnet_rs::compatibility::CompatibilityTable;
use libmudtelnet_rs::events::TelnetEvents;
use libmudtelnet_rs::telnet::op_command::{DO, DONT, IAC, SB, SE, WILL, WONT};
use libmudtelnet_rs::telnet::op_option::{ECHO, NAWS, SGA};
use regex::Regex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::pool::{Connector, Pool, PoolCounters};
use super::{CliResult, Exchange, SessionError, Target};

/// Window size announced when the server asks for NAWS: wide, so that devices with their
/// own line editor (Cisco IOS) do not scroll or wrap a long command in the echo, which
/// would break stripping the echo; tall, so that devices that page by window height
/// (RouterOS) do not stop at `-- more --`. Neither value has a 0xFF byte: it would have
/// to be sent as `IAC IAC`, and servers such as busybox telnetd read the four size bytes
/// raw, so a doubled byte would shift the size and leak the rest into the login line.
pub const WINDOW_WIDTH: u16 = 500;
pub const WINDOW_HEIGHT: u16 = 4000;
const _: () = assert!(
    WINDOW_WIDTH.to_be_bytes()[0] != 0xFF
        && WINDOW_WIDTH.to_be_bytes()[1] != 0xFF
        && WINDOW_HEIGHT.to_be_bytes()[0] != 0xFF
        && WINDOW_HEIGHT.to_be_bytes()[1] != 0xFF
);

/// A device that prints this much without showing a prompt is broken or streaming;
/// stop instead of growing the buffer until the deadline.
const MAX_PENDING: usize = 4 * 1024 * 1024;

/// A subnegotiation longer than this is a server bug (or a lost `IAC SE`); give up on it
/// rather than swallowing all later output as subnegotiation data.
const MAX_SUBNEGOTIATION: usize = 4096;

/// Words devices print when they reject a login or an enable password.
static AUTH_FAILURE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?i)(login incorrect|login invalid|authentication failed|access denied|bad passwords?|bad secrets|invalid password|permission denied)",
    )
    .expect("constant regex")
});

/// ANSI/VT100 escape sequences (CSI, OSC and two-byte ones) that devices add to prompts
/// and output; they are never part of what a scheme wants to see.
static ANSI: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]")
        .expect("constant regex")
});

/// How to log in to and talk with one kind of device.
#[derive(Clone, Debug)]
pub struct TelnetOptions {
    /// Matched against the last line received (after the last newline).
    pub login_prompt: Regex,
    /// Matched against the last line received; used for login and for `enable`.
    pub password_prompt: Regex,
    /// The device's command prompt, matched against the last line received.
    pub prompt: Regex,
    /// After login send `enable` and answer its password prompt with `target.secret`.
    pub enable: bool,
    /// Sent once per new session after login (and enable), e.g. `terminal length 0`.
    pub setup: Vec<String>,
    /// Deadline for getting a usable session once a slot is free (`[transport]
    /// connect_timeout`): backoff, TCP connect, login, enable and setup; the run's
    /// command timeout when that is shorter. Waiting for the slot is not bounded.
    pub connect_timeout: Duration,
}

impl Default for TelnetOptions {
    fn default() -> TelnetOptions {
        TelnetOptions {
            login_prompt: Regex::new(r"(?i)(login|username)\s*:\s*$").expect("constant regex"),
            password_prompt: Regex::new(r"(?i)password\s*:\s*$").expect("constant regex"),
            prompt: Regex::new(r"^\S{1,63}[>#$]\s?$").expect("constant regex"),
            enable: false,
            setup: Vec::new(),
            connect_timeout: super::pool::DEFAULT_CONNECT_TIMEOUT,
        }
    }
}

/// What one call to [`TelnetStream::feed`] produced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fed {
    /// Application text, telnet sequences removed, `IAC IAC` unescaped, `CR NUL` -> `CR`.
    pub text: String,
    /// Negotiation answers to write back to the server, in order.
    pub reply: Vec<u8>,
}

/// Where the scanner is inside the telnet byte stream; kept between reads because a
/// read may end in the middle of any sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scan {
    Data,
    /// After `IAC`.
    Iac,
    /// After `IAC WILL|WONT|DO|DONT`, waiting for the option byte.
    Negotiation(u8),
    /// Inside `IAC SB ... IAC SE`.
    Sub,
    /// After an `IAC` inside a subnegotiation.
    SubIac,
}

/// The telnet protocol of one connection, without I/O: feed it what the server sent, get
/// the text and the bytes to answer with.
///
/// We scan the stream ourselves and hand `libmudtelnet_rs::Parser` only complete
/// negotiations, because its own scanner drops data that starts with an escaped
/// `IAC IAC` and turns a sequence cut by the end of a read into a bogus command. The
/// parser's option table decides the answers: the server may ECHO and SGA (we answer
/// DO), we will do NAWS (with a wide window) and SGA, and everything else is refused.
/// Options already in the requested state get no answer, so negotiation cannot loop.
pub struct TelnetStream {
    parser: Parser,
    scan: Scan,
    sub_len: usize,
    /// The previous data byte was CR: a following NUL is the padding of a bare CR.
    after_cr: bool,
    /// Start of a UTF-8 character cut by the end of the previous read.
    utf8_tail: Vec<u8>,
}

impl Default for TelnetStream {
    fn default() -> TelnetStream {
        TelnetStream::new()
    }
}

impl TelnetStream {
    pub fn new() -> TelnetStream {
        let mut table = CompatibilityTable::new();
        table.support_remote(ECHO);
        // SGA both ways: we never send GA anyway, and refusing DO SGA makes some
        // servers fall back to half-duplex behaviour.
        table.support(SGA);
        table.support_local(NAWS);
        TelnetStream {
            parser: Parser::with_support(table),
            scan: Scan::Data,
            sub_len: 0,
            after_cr: false,
            utf8_tail: Vec::new(),
        }
    }

    /// Consumes bytes from the server.
    pub fn feed(&mut self, input: &[u8]) -> Fed {
        let mut data = Vec::with_capacity(input.len());
        let mut reply = Vec::new();
        for &byte in input {
            match self.scan {
                Scan::Data => {
                    if byte == IAC {
                        self.scan = Scan::Iac;
                    } else {
                        if !(self.after_cr && byte == 0) {
                            data.push(byte);
                        }
                        self.after_cr = byte == b'\r';
                    }
                }
                Scan::Iac => {
                    self.scan = match byte {
                        IAC => {
                            data.push(IAC);
                            self.after_cr = false;
                            Scan::Data
                        }
                        WILL | WONT | DO | DONT => Scan::Negotiation(byte),
                        SB => {
                            self.sub_len = 0;
                            Scan::Sub
                        }
                        // NOP, GA, DM, AYT and friends carry nothing for a CLI client.
                        _ => Scan::Data,
                    };
                }
                Scan::Negotiation(command) => {
                    self.negotiate(command, byte, &mut reply);
                    self.scan = Scan::Data;
                }
                Scan::Sub | Scan::SubIac => {
                    // We enable no option whose subnegotiation we need to read (NAWS
                    // only flows from us), so its content is skipped.
                    self.sub_len += 1;
                    self.scan = match (self.scan, byte) {
                        (Scan::Sub, IAC) => Scan::SubIac,
                        (Scan::SubIac, SE) => Scan::Data,
                        _ if self.sub_len > MAX_SUBNEGOTIATION => Scan::Data,
                        _ => Scan::Sub,
                    };
                }
            }
        }
        Fed {
            text: self.decode(data),
            reply,
        }
    }

    /// One line as the client sends it: CR LF appended, IAC bytes doubled.
    pub fn encode_line(line: &str) -> Vec<u8> {
        let mut out = Vec::with_capacity(line.len() + 2);
        for &byte in line.as_bytes() {
            out.push(byte);
            if byte == IAC {
                out.push(IAC);
            }
        }
        out.extend_from_slice(b"\r\n");
        out
    }

    fn negotiate(&mut self, command: u8, option: u8, reply: &mut Vec<u8>) {
        let naws_before = self.parser.options.get_option(NAWS).local_state;
        for event in self.parser.receive(&[IAC, command, option]) {
            if let TelnetEvents::DataSend(bytes) = event {
                reply.extend_from_slice(&bytes);
            }
        }
        // NAWS is announced with WILL and then needs the size itself.
        if option == NAWS && !naws_before && self.parser.options.get_option(NAWS).local_state {
            let mut size = Vec::with_capacity(4);
            size.extend_from_slice(&WINDOW_WIDTH.to_be_bytes());
            size.extend_from_slice(&WINDOW_HEIGHT.to_be_bytes());
            if let Some(TelnetEvents::DataSend(bytes)) = self.parser.subnegotiation(NAWS, size) {
                reply.extend_from_slice(&bytes);
            }
        }
    }

    /// UTF-8 with invalid bytes replaced, keeping a character cut by the end of the read
    /// for the next one.
    fn decode(&mut self, data: Vec<u8>) -> String {
        let mut bytes = std::mem::take(&mut self.utf8_tail);
        bytes.extend_from_slice(&data);
        let mut text = String::with_capacity(bytes.len());
        let mut rest = &bytes[..];
        loop {
            match std::str::from_utf8(rest) {
                Ok(valid) => {
                    text.push_str(valid);
                    break;
                }
                Err(error) => {
                    let (valid, after) = rest.split_at(error.valid_up_to());
                    text.push_str(&String::from_utf8_lossy(valid));
                    match error.error_len() {
                        None => {
                            self.utf8_tail = after.to_vec();
                            break;
                        }
                        Some(bad) => {
                            text.push(char::REPLACEMENT_CHARACTER);
                            rest = &after[bad..];
                        }
                    }
                }
            }
        }
        text
    }
}

/// Text with ANSI escapes and carriage returns removed.
fn clean(text: &str) -> String {
    ANSI.replace_all(text, "").replace('\r', "")
}

/// The text after the last newline, cleaned: what prompts are matched against.
pub fn last_line(text: &str) -> String {
    let start = text.rfind('\n').map_or(0, |i| i + 1);
    clean(&text[start..])
}

/// What the device printed for `command`: the echoed command line and the prompt line
/// removed, escapes and `\r` removed, blank lines around trimmed.
pub fn command_output(raw: &str, command: &str) -> String {
    let cleaned = clean(raw);
    let mut lines: Vec<&str> = cleaned.split('\n').collect();
    // The last line is the prompt that ended the read.
    lines.pop();
    if lines
        .first()
        .is_some_and(|first| first.trim_end().ends_with(command.trim()))
    {
        lines.remove(0);
    }
    lines
        .join("\n")
        .trim_end()
        .trim_start_matches('\n')
        .to_string()
}

/// What a login-phase read saw on the last line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    Login,
    Password,
    Prompt,
    Rejected,
}

/// One telnet connection, logged in.
struct Session {
    stream: TcpStream,
    telnet: TelnetStream,
    /// Received and not yet consumed by a wait.
    pending: String,
    label: String,
    /// Strings never to show in an error (password, enable secret).
    redact: Vec<String>,
}

impl super::pool::Session for Session {
    async fn usable(&mut self) -> bool {
        self.revive().await
    }

    async fn goodbye(&mut self) {
        // Best effort: the socket is closed by the drop anyway; shutdown only sends the
        // FIN sooner so the device frees its vty line now.
        let _ = tokio::time::timeout(Duration::from_millis(500), self.stream.shutdown()).await;
    }
}

impl Session {
    /// `text` for an error message: secrets masked, cut to a readable length.
    fn shown(&self, text: &str) -> String {
        let mut text = text.to_string();
        for secret in &self.redact {
            text = text.replace(secret.as_str(), "***");
        }
        if text.chars().count() > 80 {
            text = text.chars().take(80).collect::<String>() + "...";
        }
        format!("{text:?}")
    }

    async fn send_line(&mut self, line: &str, deadline: Instant) -> Result<(), SessionError> {
        let bytes = TelnetStream::encode_line(line);
        self.write(&bytes, deadline).await
    }

    async fn write(&mut self, bytes: &[u8], deadline: Instant) -> Result<(), SessionError> {
        match tokio::time::timeout_at(deadline, self.stream.write_all(bytes)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(SessionError::Closed(
                self.label.clone(),
                format!("write failed: {error}"),
            )),
            Err(_) => Err(SessionError::Timeout(
                self.label.clone(),
                "the device does not read what is sent".into(),
            )),
        }
    }

    /// Reads until `check` (given everything received since the last wait) says done,
    /// then consumes and returns that text. `what` names the wait in errors.
    async fn read_until<T>(
        &mut self,
        deadline: Instant,
        what: &str,
        mut check: impl FnMut(&str) -> Option<T>,
    ) -> Result<(T, String), SessionError> {
        let mut buf = [0u8; 4096];
        loop {
            if let Some(found) = check(&self.pending) {
                return Ok((found, std::mem::take(&mut self.pending)));
            }
            if self.pending.len() > MAX_PENDING {
                return Err(SessionError::Protocol(
                    self.label.clone(),
                    format!("more than {MAX_PENDING} bytes without a prompt while {what}"),
                ));
            }
            let read = tokio::time::timeout_at(deadline, self.stream.read(&mut buf)).await;
            let n = match read {
                Err(_) => {
                    let last = last_line(&self.pending);
                    return Err(SessionError::Timeout(
                        self.label.clone(),
                        format!("{what} (last line received: {})", self.shown(&last)),
                    ));
                }
                Ok(Err(error)) => {
                    return Err(SessionError::Closed(
                        self.label.clone(),
                        format!("{what}: {error}"),
                    ));
                }
                Ok(Ok(0)) => {
                    return Err(SessionError::Closed(
                        self.label.clone(),
                        format!("by the device while {what}"),
                    ));
                }
                Ok(Ok(n)) => n,
            };
            let fed = self.telnet.feed(&buf[..n]);
            if !fed.reply.is_empty() {
                self.write(&fed.reply, deadline).await?;
            }
            self.pending.push_str(&fed.text);
        }
    }

    /// Logs in: answers the login and password prompts the device shows (either may be
    /// missing), then waits for the command prompt.
    async fn login(
        &mut self,
        target: &Target,
        options: &TelnetOptions,
        deadline: Instant,
    ) -> Result<(), SessionError> {
        let user = target.login.clone().unwrap_or_default();
        let label = self.label.clone();
        let rejected = || SessionError::Auth(label.clone(), user.clone());
        let mut sent_login = false;
        let mut sent_password = false;
        loop {
            let what = match (sent_login, sent_password) {
                (false, false) => "waiting for a login, password or command prompt",
                (true, false) => "waiting for the password or command prompt after the user name",
                _ => "waiting for the command prompt after the password",
            };
            let (seen, _) = self
                .read_until(deadline, what, |text| {
                    classify_login(text, options, sent_password)
                })
                .await?;
            match seen {
                Seen::Prompt => return Ok(()),
                Seen::Rejected => return Err(rejected()),
                Seen::Login if sent_login || sent_password => return Err(rejected()),
                Seen::Password if sent_password => return Err(rejected()),
                Seen::Login => {
                    self.send_line(&user, deadline).await?;
                    sent_login = true;
                }
                Seen::Password => {
                    let password = target
                        .password
                        .as_ref()
                        .map(|p| p.expose().to_string())
                        .unwrap_or_default();
                    self.send_line(&password, deadline).await?;
                    sent_password = true;
                }
            }
        }
    }

    /// `enable`, answering its password prompt with the target's secret.
    async fn enable(
        &mut self,
        target: &Target,
        options: &TelnetOptions,
        deadline: Instant,
    ) -> Result<(), SessionError> {
        let user = format!("{} (enable)", target.login.as_deref().unwrap_or(""));
        self.send_line("enable", deadline).await?;
        let mut sent_secret = false;
        loop {
            let what = if sent_secret {
                "waiting for the prompt after the enable password"
            } else {
                "waiting for the enable password prompt"
            };
            let (seen, _) = self
                .read_until(deadline, what, |text| {
                    // The echoed `enable` line must be complete before a prompt counts.
                    if !text.contains('\n') {
                        return None;
                    }
                    classify_login(text, options, true).filter(|s| *s != Seen::Login)
                })
                .await?;
            match seen {
                Seen::Prompt => return Ok(()),
                Seen::Password if !sent_secret => {
                    let secret = target
                        .secret
                        .as_ref()
                        .map(|s| s.expose().to_string())
                        .unwrap_or_default();
                    self.send_line(&secret, deadline).await?;
                    sent_secret = true;
                }
                _ => return Err(SessionError::Auth(self.label.clone(), user)),
            }
        }
    }

    /// Sends one command and returns its output once the prompt is back.
    async fn command(
        &mut self,
        command: &str,
        prompt: &Regex,
        deadline: Instant,
    ) -> Result<String, SessionError> {
        // Whatever arrived after the last prompt (a late banner line, a console message)
        // does not belong to this command's answer.
        self.pending.clear();
        self.send_line(command, deadline).await?;
        let what = format!("waiting for the prompt after `{command}`");
        let (_, raw) = self
            .read_until(deadline, &what, |text| {
                // The prompt must be on a line after the one the command was typed on,
                // so the echo of a command ending in `>` or `#` never counts as a prompt.
                (text.contains('\n') && prompt.is_match(&last_line(text))).then_some(())
            })
            .await?;
        Ok(command_output(&raw, command))
    }

    /// Whether an idle session is still usable: reads whatever arrived while it was idle
    /// (answering negotiation, dropping the text) and notices a connection closed by the
    /// device, so that a command is not sent into a dead socket.
    async fn revive(&mut self) -> bool {
        let mut buf = [0u8; 4096];
        loop {
            match self.peek_now() {
                Peek::Closed => return false,
                Peek::Idle => return true,
                Peek::Data => {
                    // Data is waiting, so this read returns at once.
                    let deadline = Instant::now() + Duration::from_secs(1);
                    match tokio::time::timeout_at(deadline, self.stream.read(&mut buf)).await {
                        Ok(Ok(n)) if n > 0 => {
                            let fed = self.telnet.feed(&buf[..n]);
                            if !fed.reply.is_empty()
                                && self.write(&fed.reply, deadline).await.is_err()
                            {
                                return false;
                            }
                        }
                        _ => return false,
                    }
                }
            }
        }
    }

    /// The socket's state right now, asked of the kernel (`MSG_PEEK` on a duplicate of
    /// the descriptor, which shares its non-blocking mode). Tokio's `try_read` would
    /// only consult the reactor's cached readiness, which may not yet know that the
    /// device closed the connection.
    fn peek_now(&self) -> Peek {
        let Ok(fd) = self.stream.as_fd().try_clone_to_owned() else {
            return Peek::Closed;
        };
        let socket = std::net::TcpStream::from(fd);
        let mut byte = [0u8; 1];
        match socket.peek(&mut byte) {
            Ok(0) => Peek::Closed,
            Ok(_) => Peek::Data,
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => Peek::Idle,
            Err(_) => Peek::Closed,
        }
    }
}

/// What an idle socket has for us.
enum Peek {
    Idle,
    Data,
    Closed,
}

/// Classifies the text received during login by its last line.
fn classify_login(text: &str, options: &TelnetOptions, after_password: bool) -> Option<Seen> {
    let last = last_line(text);
    if after_password {
        // Only after a password was sent, so a banner warning about "access denied"
        // before login is not mistaken for a rejection.
        let before_last = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
        if AUTH_FAILURE.is_match(&clean(before_last)) || AUTH_FAILURE.is_match(&last) {
            return Some(Seen::Rejected);
        }
    }
    if options.password_prompt.is_match(&last) {
        Some(Seen::Password)
    } else if options.login_prompt.is_match(&last) {
        Some(Seen::Login)
    } else if options.prompt.is_match(&last) {
        Some(Seen::Prompt)
    } else {
        None
    }
}

/// The telnet sessions to one NAS, shared by its workers: at most `max_sessions` open at
/// once, opened lazily, kept open and reused; a session that failed is dropped (see
/// [`super::pool`]).
pub struct TelnetPool {
    pool: Pool<TelnetConnector>,
}

// Shared by the workers of one NAS through an Arc: must stay Send + Sync.
const _: fn() = || {
    fn shared<T: Send + Sync>() {}
    shared::<TelnetPool>();
};

/// What opening and logging in a session needs.
struct TelnetConnector {
    target: Target,
    options: TelnetOptions,
    label: String,
}

impl Connector for TelnetConnector {
    type Session = Session;

    /// Opens and logs in a new session: TCP, login, enable and setup, all by `deadline`.
    async fn connect(&self, deadline: Instant) -> Result<Session, SessionError> {
        let address = (self.target.host.as_str(), self.target.port);
        let stream = TcpStream::connect(address)
            .await
            .map_err(|error| SessionError::connect(&self.label, &error))?;
        // Commands are small writes; do not let Nagle hold them back.
        let _ = stream.set_nodelay(true);
        let mut session = Session {
            stream,
            telnet: TelnetStream::new(),
            pending: String::new(),
            label: self.label.clone(),
            redact: [&self.target.password, &self.target.secret]
                .into_iter()
                .flatten()
                .map(|s| s.expose().to_string())
                .filter(|s| !s.is_empty())
                .collect(),
        };
        session.login(&self.target, &self.options, deadline).await?;
        if self.options.enable {
            session
                .enable(&self.target, &self.options, deadline)
                .await?;
        }
        for command in &self.options.setup {
            session
                .command(command, &self.options.prompt, deadline)
                .await?;
        }
        tracing::debug!(nas = %self.label, "telnet session opened");
        Ok(session)
    }
}

impl TelnetPool {
    /// Connects lazily: nothing happens until the first `run`.
    pub fn new(target: Target, options: TelnetOptions) -> TelnetPool {
        let label = target.label();
        let max_sessions = target.max_sessions;
        let connect_timeout = options.connect_timeout;
        TelnetPool {
            pool: Pool::new(
                TelnetConnector {
                    target,
                    options,
                    label: label.clone(),
                },
                label,
                "telnet",
                max_sessions,
                connect_timeout,
            ),
        }
    }

    /// Sessions currently connected and logged in (idle or running commands).
    pub fn open_sessions(&self) -> usize {
        self.pool.open_sessions()
    }

    /// The pool's counters, for the statistics.
    pub fn counters(&self) -> Arc<PoolCounters> {
        self.pool.counters()
    }

    /// Runs `commands` in order on one session. Waiting for a free session is not
    /// bounded; once a slot is free, `timeout` (with `connect_timeout`) bounds getting a
    /// session, and `timeout` bounds each command's prompt. The first error stops the
    /// run; the exchanges before it are returned with it.
    pub async fn run(&self, commands: &[String], timeout: Duration) -> CliResult {
        let mut result = CliResult::default();
        let label = self.pool.label();
        if let Some(bad) = commands.iter().position(|c| c.contains(['\r', '\n'])) {
            result.error = Some(SessionError::Protocol(
                label.to_string(),
                format!(
                    "command {} contains a line break; nothing was sent",
                    bad + 1
                ),
            ));
            return result;
        }
        let mut lease = match self.pool.checkout(timeout).await {
            Ok(lease) => lease,
            Err(error) => {
                result.error = Some(error);
                return result;
            }
        };
        let prompt = &self.pool.connector().options.prompt;
        for (index, command) in commands.iter().enumerate() {
            if let Err(error) = super::gate::check(label, index) {
                // Dropping the lease discards the session.
                result.error = Some(error);
                return result;
            }
            let deadline = Instant::now() + timeout;
            match lease.session().command(command, prompt, deadline).await {
                Ok(output) => result.exchanges.push(Exchange {
                    command: command.clone(),
                    output,
                }),
                Err(error) => {
                    // Dropping the lease discards the session: it is never reused.
                    tracing::debug!(nas = %label, %error, "telnet session dropped");
                    result.error = Some(error);
                    return result;
                }
            }
        }
        lease.done();
        result
    }

    /// Closes the idle sessions and makes later runs fail; runs in progress finish and
    /// then drop their session.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_strips_echo_prompt_and_escapes() {
        let raw = "show x\r\n\x1b[1mline 1\x1b[0m\r\nline 2\r\n\r\nrouter#";
        assert_eq!(command_output(raw, "show x"), "line 1\nline 2");
        assert_eq!(command_output("cmd\r\n[a@b] > ", "cmd"), "");
    }

    #[test]
    fn login_classification() {
        let options = TelnetOptions::default();
        assert_eq!(
            classify_login("Login: ", &options, false),
            Some(Seen::Login)
        );
        assert_eq!(
            classify_login("banner\r\nUsername:", &options, false),
            Some(Seen::Login)
        );
        assert_eq!(
            classify_login("\r\nPassword: ", &options, false),
            Some(Seen::Password)
        );
        assert_eq!(
            classify_login("\r\nrouter>", &options, true),
            Some(Seen::Prompt)
        );
        assert_eq!(
            classify_login("\r\nLogin incorrect\r\n", &options, true),
            Some(Seen::Rejected)
        );
        assert_eq!(classify_login("Last login: x", &options, false), None);
    }
}
