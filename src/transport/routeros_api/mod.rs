//! The MikroTik RouterOS API transport: plain TCP (service `api`, port 8728) or TLS
//! (service `api-ssl`, port 8729).
//!
//! Three layers, the first two pure and table-tested:
//! - `codec.rs`: the wire codec (a sentence is a list of length-prefixed words ended by
//!   an empty word: [`encode_sentence`], [`SentenceDecoder`]) and the command text
//!   schemes render and logs show, one command per line in the API's own word syntax
//!   (`/ip/firewall/address-list/add =list=allowed =address=10.0.0.1`), split into
//!   words by [`parse_command`]. Values the scheme renderer quoted
//!   (`=comment="x; /system reset"`) arrive as one word, so no value can become a
//!   second word or command;
//! - `tls.rs`: certificate policies, fingerprints, `known_hosts.tls`, the verifier and
//!   the rustls client settings;
//! - here: [`ApiPool`], logged-in connections to one NAS on [`super::pool`], shared by
//!   its workers, never more than `max_sessions` at once, reused between events; the
//!   login and the tagged commands.
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

mod codec;
mod tls;

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout_at};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

pub use self::codec::{
    MAX_WORD_LEN, SentenceDecoder, decode_length, encode_length, encode_sentence, encode_word,
    md5_login_response, parse_command, split_find,
};
pub use self::tls::{
    ApiTls, CertPolicy, cert_fingerprint, known_certs_path, normalize_fingerprint,
};
/// Moved to [`crate::tls`]; kept here for the paths that name it.
pub use crate::tls::load_ca_file;

use self::codec::{attribute, fatal_message, ids_of, re_line, trap_line};
use self::tls::{Refusal, check_fingerprint, client_config, handshake_failure, looks_like_tls};
use super::pool::{Connector, Pool, PoolCounters, Session};
use super::{CliResult, Exchange, SessionError, Target};

/// How long `close` waits per connection for the polite `/quit` to be written.
const QUIT_TIMEOUT: Duration = Duration::from_millis(500);

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
            if let Err(error) = crate::transport::gate::check(label, index) {
                // Dropping the lease discards the connection.
                result.error = Some(error);
                return result;
            }
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
            Ok(Err(e)) => return Err(SessionError::connect(label, &e)),
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
        // A find-then-act command asks again before its second sentence.
        if !crate::transport::gate::open() {
            return Err(CommandFailure {
                nothing_received: true,
                error: crate::transport::gate::closed_before(label, text),
            });
        }
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
