//! The simulator's RouterOS API side (TCP, the port-8728 protocol, and the same over TLS
//! as the `api-ssl` service on 8729): sentences in the transport's codec, the plaintext
//! login of RouterOS 6.43+ (and the older MD5 challenge), and the same menus as the CLI
//! acting on the same `RouterState`.
//!
//! `add`, `set`, `remove`, `enable` and `disable` are translated into one CLI line with
//! every value quoted, and run by the CLI interpreter: the API then validates, numbers
//! items and reports errors exactly as the SSH and telnet sides do, and no value can
//! become a second command. `print` reads the state directly, since API rows and queries
//! (`?key=value`, `?#|&!` stack operations, `=.proplist=`) have no CLI counterpart.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use rand::Rng as _;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::routeros::{Protocol, RouterState, execute};
use super::{Fate, Shared};
use crate::transport::routeros_api::{
    SentenceDecoder, cert_fingerprint, encode_sentence, md5_login_response,
};

/// An idle connection is closed after this long, so abandoned clients free their slot.
const IDLE_TIMEOUT: Duration = Duration::from_secs(600);

/// A client that has not finished the TLS handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The api-ssl listener's TLS identity and the SHA-256 fingerprint of its certificate.
///
/// With `--tls-cert` and `--tls-key` both files are read (PEM); when neither exists yet
/// a self-signed certificate is generated and written there (the key with mode 0600), so
/// a demo keeps its fingerprint across restarts. Without them it lives in memory only.
/// Generated certificates name `localhost`, 127.0.0.1 and the listen address.
pub(crate) fn tls_acceptor(
    cert: Option<&Path>,
    key: Option<&Path>,
    listen: &str,
) -> anyhow::Result<(TlsAcceptor, String)> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    let files = match (cert, key) {
        (None, None) => None,
        (Some(cert), Some(key)) => Some((cert, key)),
        _ => anyhow::bail!("sim: --tls-cert and --tls-key go together"),
    };
    let (chain, private_key) = match files {
        Some((cert, key)) if cert.exists() || key.exists() => {
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .with_context(|| format!("sim: reading --tls-cert {}", cert.display()))?;
            anyhow::ensure!(
                !chain.is_empty(),
                "sim: --tls-cert {}: no PEM certificate in it",
                cert.display()
            );
            let private_key = PrivateKeyDer::from_pem_file(key)
                .with_context(|| format!("sim: reading --tls-key {}", key.display()))?;
            (chain, private_key)
        }
        _ => {
            let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
            let unspecified = listen
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_unspecified());
            if !unspecified && !names.iter().any(|n| n == listen) {
                names.push(listen.to_string());
            }
            let generated = rcgen::generate_simple_self_signed(names)
                .context("sim: generating the api-ssl certificate")?;
            let key_der = generated.signing_key.serialize_der();
            if let Some((cert, key)) = files {
                write_new(cert, generated.cert.pem().as_bytes(), 0o644)?;
                write_new(key, generated.signing_key.serialize_pem().as_bytes(), 0o600)?;
            }
            let private_key = PrivateKeyDer::try_from(key_der)
                .map_err(|e| anyhow::anyhow!("sim: encoding the api-ssl key: {e}"))?;
            (vec![generated.cert.der().clone()], private_key)
        }
    };
    let fingerprint = cert_fingerprint(&chain[0]);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("sim: TLS setup")?
        .with_no_client_auth()
        .with_single_cert(chain, private_key)
        .context("sim: the api-ssl certificate and key do not fit together")?;
    Ok((TlsAcceptor::from(Arc::new(config)), fingerprint))
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("sim: creating {}", path.display()))?;
    file.write_all(bytes)
        .with_context(|| format!("sim: writing {}", path.display()))
}

/// Serves the API on `listener`: plain TCP, or TLS when `tls` is given.
pub(crate) async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (socket, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Usually out of file descriptors: back off instead of spinning.
                tracing::warn!(%error, "sim: api accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Every answer is one small write; Nagle would hold it for the client's ACK.
        let _ = socket.set_nodelay(true);
        let shared = shared.clone();
        let cancel = shutdown.child_token();
        let tls = tls.clone();
        tasks.spawn(async move {
            let Some(acceptor) = tls else {
                return session(socket, peer, shared, cancel).await;
            };
            let handshake = tokio::select! {
                _ = cancel.cancelled() => return,
                handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(socket)) => handshake,
            };
            match handshake {
                Ok(Ok(stream)) => session(stream, peer, shared, cancel).await,
                Ok(Err(error)) => tracing::info!(%peer, %error, "sim: api-ssl handshake failed"),
                Err(_) => tracing::info!(%peer, "sim: api-ssl handshake timed out"),
            }
        });
    }
}

/// One API session on an accepted (and, for api-ssl, handshaken) connection.
async fn session<S>(
    mut socket: S,
    peer: std::net::SocketAddr,
    shared: Arc<Shared>,
    cancel: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let Some(guard) = shared.open_session(Protocol::Api) else {
        tracing::info!(%peer, "sim: api session refused (max sessions reached)");
        let words = ["!fatal".to_string(), "too many sessions".to_string()];
        let _ = socket.write_all(&encode_sentence(&words)).await;
        let _ = socket.shutdown().await;
        return;
    };
    let mut connection = Connection {
        socket,
        decoder: SentenceDecoder::new(),
        shared,
        cancel,
        logged_in: false,
        challenge: None,
    };
    if let Err(error) = connection.run().await {
        tracing::debug!(%error, "sim: api session ended with an error");
    }
    drop(guard);
}

struct Connection<S> {
    socket: S,
    decoder: SentenceDecoder,
    shared: Arc<Shared>,
    cancel: CancellationToken,
    logged_in: bool,
    /// The hex challenge of a pre-6.43 login in progress.
    challenge: Option<String>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    async fn run(&mut self) -> std::io::Result<()> {
        while let Some(sentence) = self.read_sentence().await? {
            let Some(command) = sentence.first().cloned() else {
                continue;
            };
            // The tag is echoed on every reply to this sentence and is not an argument.
            let tag = sentence
                .iter()
                .find_map(|w| w.strip_prefix(".tag="))
                .map(str::to_string);
            let words: Vec<String> = sentence
                .into_iter()
                .filter(|w| !w.starts_with(".tag="))
                .collect();
            let replies = match command.as_str() {
                "/quit" => {
                    let bye = vec!["!fatal".to_string(), "session terminated on request".into()];
                    self.send(&[bye], tag.as_deref()).await?;
                    let _ = self.socket.shutdown().await;
                    return Ok(());
                }
                "/login" => self.login(&words),
                _ if !self.logged_in => trap("not logged in"),
                _ => {
                    if !self.shared.wait_latency(&self.cancel).await {
                        return Ok(());
                    }
                    let fate = self.shared.roll_faults();
                    if fate == Fate::Drop {
                        tracing::debug!(command, "sim: fault drops the api connection");
                        return Ok(());
                    }
                    let replies = self.shared.device.apply(|state| run(state, &words));
                    self.shared.record("api", &words.join(" "));
                    tracing::debug!(?words, ?replies, "sim: api command");
                    if fate == Fate::Hang {
                        tracing::debug!(command, "sim: fault hangs the api session");
                        // Stay connected but silent until the client gives up or we stop.
                        while self.read_sentence().await?.is_some() {}
                        return Ok(());
                    }
                    replies
                }
            };
            self.send(&replies, tag.as_deref()).await?;
        }
        Ok(())
    }

    fn login(&mut self, words: &[String]) -> Vec<Vec<String>> {
        let name = attribute(words, "name");
        let password = attribute(words, "password");
        let response = attribute(words, "response");
        let ok = match (name, password, response) {
            (Some(name), Some(password), _) => self.shared.credentials_ok(name, password),
            (Some(name), None, Some(response)) => {
                // The pre-6.43 answer to our challenge: the password never crosses the wire.
                let expected = self.challenge.take().and_then(|challenge| {
                    md5_login_response(&self.shared.password, &challenge).ok()
                });
                expected.is_some_and(|expected| expected == response)
                    && self.shared.credentials_ok(name, &self.shared.password)
            }
            (None, None, None) => {
                let challenge: [u8; 16] = rand::rng().random();
                let hex: String = challenge.iter().map(|b| format!("{b:02x}")).collect();
                self.challenge = Some(hex.clone());
                return vec![vec!["!done".to_string(), format!("=ret={hex}")]];
            }
            _ => false,
        };
        if ok {
            self.logged_in = true;
            return vec![vec!["!done".to_string()]];
        }
        self.shared.device.record_auth_failure();
        trap("invalid user name or password (6)")
    }

    /// Writes the reply sentences in one write, each with the request's tag.
    async fn send(&mut self, replies: &[Vec<String>], tag: Option<&str>) -> std::io::Result<()> {
        let mut bytes = Vec::new();
        for reply in replies {
            let mut words = reply.clone();
            if let Some(tag) = tag {
                words.push(format!(".tag={tag}"));
            }
            bytes.extend_from_slice(&encode_sentence(&words));
        }
        self.socket.write_all(&bytes).await?;
        // TLS holds records until flushed; for TCP this does nothing.
        self.socket.flush().await
    }

    /// The next sentence; `None` on end of input, shutdown or idle timeout.
    async fn read_sentence(&mut self) -> std::io::Result<Option<Vec<String>>> {
        let mut buffer = [0u8; 8192];
        loop {
            match self.decoder.next_sentence() {
                Ok(Some(sentence)) => return Ok(Some(sentence)),
                Ok(None) => {}
                Err(error) => {
                    // Out of step with the client: nothing later can be trusted.
                    return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, error));
                }
            }
            let read = tokio::select! {
                _ = self.cancel.cancelled() => return Ok(None),
                read = tokio::time::timeout(IDLE_TIMEOUT, self.socket.read(&mut buffer)) => read,
            };
            let count = match read {
                Ok(result) => result?,
                Err(_) => return Ok(None),
            };
            if count == 0 {
                return Ok(None);
            }
            self.decoder.push(&buffer[..count]);
        }
    }
}

/// `!trap =message=...` followed by the `!done` RouterOS always ends a reply with.
fn trap(message: &str) -> Vec<Vec<String>> {
    vec![
        vec!["!trap".to_string(), format!("=message={message}")],
        vec!["!done".to_string()],
    ]
}

fn done() -> Vec<Vec<String>> {
    vec![vec!["!done".to_string()]]
}

/// The value of `=key=value` among the words after the command.
fn attribute<'a>(words: &'a [String], key: &str) -> Option<&'a str> {
    words.iter().skip(1).find_map(|w| {
        w.strip_prefix('=')
            .and_then(|rest| rest.strip_prefix(key))
            .and_then(|rest| rest.strip_prefix('='))
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Menu {
    AddressList,
    SimpleQueue,
    Identity,
}

impl Menu {
    fn from_path(path: &str) -> Option<Menu> {
        Some(match path {
            "/ip/firewall/address-list" => Menu::AddressList,
            "/queue/simple" => Menu::SimpleQueue,
            "/system/identity" => Menu::Identity,
            _ => return None,
        })
    }

    /// The CLI spelling of the menu.
    fn cli(self) -> &'static str {
        match self {
            Menu::AddressList => "/ip firewall address-list",
            Menu::SimpleQueue => "/queue simple",
            Menu::Identity => "/system identity",
        }
    }

    fn verbs(self) -> &'static [&'static str] {
        match self {
            Menu::Identity => &["print", "set"],
            _ => &["add", "remove", "set", "print", "enable", "disable"],
        }
    }

    /// Properties `add` and `set` take: the CLI interpreter's list, repeated here so that
    /// an unknown one gets the API's own message rather than a CLI line and column.
    fn settable(self) -> &'static [&'static str] {
        match self {
            Menu::AddressList => &["list", "address", "comment", "disabled", "timeout"],
            Menu::SimpleQueue => &[
                "name",
                "target",
                "max-limit",
                "comment",
                "disabled",
                "limit-at",
                "parent",
                "priority",
                "queue",
                "burst-limit",
                "burst-threshold",
                "burst-time",
                "packet-marks",
            ],
            Menu::Identity => &["name"],
        }
    }
}

/// Runs one API sentence (without its tag) and returns the reply sentences, `!done` last.
fn run(state: &mut RouterState, words: &[String]) -> Vec<Vec<String>> {
    let Some(command) = words.first() else {
        return trap("no such command prefix");
    };
    let Some((path, verb)) = command.rsplit_once('/') else {
        return trap("no such command prefix");
    };
    let Some(menu) = Menu::from_path(path) else {
        return trap("no such command prefix");
    };
    if !menu.verbs().contains(&verb) {
        return trap("no such command");
    }
    let mut properties: Vec<(&str, &str)> = Vec::new();
    let mut queries: Vec<&str> = Vec::new();
    for word in &words[1..] {
        if let Some(query) = word.strip_prefix('?') {
            queries.push(query);
        } else if let Some(attribute) = word.strip_prefix('=') {
            properties.push(attribute.split_once('=').unwrap_or((attribute, "")));
        } else if let Some(api_word) = word.strip_prefix('.') {
            // `.proplist=` as an API word is accepted like `=.proplist=`.
            if let Some(list) = api_word.strip_prefix("proplist=") {
                properties.push((".proplist", list));
            }
        }
    }
    if verb == "print" {
        return print(state, menu, &properties, &queries);
    }
    let mut line = format!("{} {verb}", menu.cli());
    let mut items: Option<&str> = None;
    for (key, value) in properties {
        match key {
            ".id" | "numbers" => items = Some(value),
            // Accepted and meaningless for actions, as on RouterOS.
            ".proplist" => {}
            key if !matches!(verb, "add" | "set") => {
                return trap(&format!("unknown parameter {key}"));
            }
            key if !menu.settable().contains(&key) => {
                return trap(&format!("unknown parameter {key}"));
            }
            key => line.push_str(&format!(" {key}={}", cli_quote(value))),
        }
    }
    if let Some(items) = items {
        if verb == "add" || menu == Menu::Identity {
            return trap("unknown parameter .id");
        }
        line.push_str(&format!(" numbers={}", cli_quote(items)));
    }
    let answer = execute(state, &line);
    if !answer.is_empty() {
        return trap(&answer);
    }
    if verb == "add" {
        // `add` appends, and the lock is held since `execute`: the last entry is ours.
        let id = match menu {
            Menu::AddressList => state.address_list.last().map(|e| e.id),
            Menu::SimpleQueue => state.queues.last().map(|q| q.id),
            Menu::Identity => None,
        };
        if let Some(id) = id {
            return vec![vec!["!done".to_string(), format!("=ret={}", item_id(id))]];
        }
    }
    done()
}

/// RouterOS internal ids as the API shows them: `*` and upper-case hex.
fn item_id(id: u32) -> String {
    format!("*{id:X}")
}

/// A value as a double-quoted CLI string, with the escapes the CLI lexer resolves, so
/// that `;`, `[`, `$` or a newline inside it stay part of the value.
fn cli_quote(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        match c {
            '"' | '\\' | '$' | '?' => {
                out.push('\\');
                out.push(c);
            }
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn yes_no(flag: bool) -> String {
    if flag { "true" } else { "false" }.to_string()
}

/// The rows of a menu as the API prints them, properties in RouterOS's order; an empty
/// comment is left out, as RouterOS does.
fn rows(state: &RouterState, menu: Menu) -> Vec<Vec<(&'static str, String)>> {
    let with_comment = |mut row: Vec<(&'static str, String)>, comment: &str| {
        if !comment.is_empty() {
            row.push(("comment", comment.to_string()));
        }
        row
    };
    match menu {
        Menu::AddressList => state
            .address_list
            .iter()
            .map(|e| {
                let row = vec![
                    (".id", item_id(e.id)),
                    ("list", e.list.clone()),
                    ("address", e.address.clone()),
                    ("dynamic", yes_no(false)),
                    ("disabled", yes_no(e.disabled)),
                ];
                with_comment(row, &e.comment)
            })
            .collect(),
        Menu::SimpleQueue => state
            .queues
            .iter()
            .map(|q| {
                let row = vec![
                    (".id", item_id(q.id)),
                    ("name", q.name.clone()),
                    ("target", q.target.clone()),
                    ("max-limit", q.max_limit.clone()),
                    ("dynamic", yes_no(false)),
                    ("disabled", yes_no(q.disabled)),
                ];
                with_comment(row, &q.comment)
            })
            .collect(),
        Menu::Identity => vec![vec![("name", state.identity.clone())]],
    }
}

fn print(
    state: &RouterState,
    menu: Menu,
    properties: &[(&str, &str)],
    queries: &[&str],
) -> Vec<Vec<String>> {
    let proplist: Option<Vec<&str>> = properties
        .iter()
        .rev()
        .find(|(key, _)| *key == ".proplist")
        .map(|(_, list)| list.split(',').filter(|k| !k.is_empty()).collect());
    let count_only = properties.iter().any(|(key, _)| *key == "count-only");
    let mut replies = Vec::new();
    let mut count = 0usize;
    for row in rows(state, menu) {
        match matches(&row, queries) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(message) => return trap(&message),
        }
        count += 1;
        if count_only {
            continue;
        }
        let mut sentence = vec!["!re".to_string()];
        for (key, value) in &row {
            if proplist.as_ref().is_none_or(|keep| keep.contains(key)) {
                sentence.push(format!("={key}={value}"));
            }
        }
        replies.push(sentence);
    }
    if count_only {
        return vec![vec!["!done".to_string(), format!("=ret={count}")]];
    }
    replies.push(vec!["!done".to_string()]);
    replies
}

/// Evaluates RouterOS API query words (without their `?`) on one row. Each word pushes
/// a result on a stack: `key=value` / `=key=value` (equal), `key` (has the property),
/// `-key` (has not), `<key=value` / `>key=value` (less / greater, numerically when both
/// sides are numbers); `#` words operate on it: `!` not, `&` and, `|` or, `.` duplicate.
/// The row matches when every value left on the stack is true.
fn matches(row: &[(&'static str, String)], queries: &[&str]) -> Result<bool, String> {
    let get = |key: &str| row.iter().find(|(k, _)| *k == key).map(|(_, v)| v.as_str());
    let mut stack: Vec<bool> = Vec::new();
    for query in queries {
        if let Some(operations) = query.strip_prefix('#') {
            for operation in operations.chars() {
                let top = stack.pop().ok_or("invalid query")?;
                match operation {
                    '!' => stack.push(!top),
                    '.' => stack.extend([top, top]),
                    '&' | '|' => {
                        let below = stack.pop().ok_or("invalid query")?;
                        stack.push(if operation == '&' {
                            below && top
                        } else {
                            below || top
                        });
                    }
                    _ => return Err("invalid query".to_string()),
                }
            }
            continue;
        }
        let result = if let Some(key) = query.strip_prefix('-') {
            get(key).is_none()
        } else if let Some(rest) = query.strip_prefix(['<', '>']) {
            let (key, want) = rest.split_once('=').ok_or("invalid query")?;
            let Some(have) = get(key) else {
                stack.push(false);
                continue;
            };
            let ordering = match (have.parse::<f64>(), want.parse::<f64>()) {
                (Ok(have), Ok(want)) => have.partial_cmp(&want),
                _ => Some(have.cmp(want)),
            };
            let wanted = if query.starts_with('<') {
                std::cmp::Ordering::Less
            } else {
                std::cmp::Ordering::Greater
            };
            ordering == Some(wanted)
        } else {
            let rest = query.strip_prefix('=').unwrap_or(query);
            match rest.split_once('=') {
                Some((key, want)) => get(key) == Some(want),
                None => get(rest).is_some(),
            }
        };
        stack.push(result);
    }
    Ok(stack.into_iter().all(|b| b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(text: &str) -> Vec<String> {
        text.split(' ').map(str::to_string).collect()
    }

    fn run_text(state: &mut RouterState, text: &str) -> Vec<String> {
        run(state, &words(text))
            .into_iter()
            .map(|sentence| sentence.join(" "))
            .collect()
    }

    #[test]
    fn api_commands_table() {
        let mut state = RouterState::new("sim");
        let cases: &[(&str, &[&str])] = &[
            (
                "/ip/firewall/address-list/add =list=negbal =address=10.0.0.1 =comment=crb_1",
                &["!done =ret=*1"],
            ),
            (
                "/ip/firewall/address-list/add =list=negbal =address=10.0.0.1",
                &["!trap =message=failure: already have such entry", "!done"],
            ),
            (
                "/ip/firewall/address-list/add =list=allowed =address=10.0.0.2 =comment=a;/system/reset",
                &["!done =ret=*2"],
            ),
            (
                "/queue/simple/add =name=q1 =target=10.0.0.1 =max-limit=1M/1M",
                &["!done =ret=*3"],
            ),
            (
                "/ip/firewall/address-list/print ?list=negbal",
                &[
                    "!re =.id=*1 =list=negbal =address=10.0.0.1 =dynamic=false =disabled=false =comment=crb_1",
                    "!done",
                ],
            ),
            (
                "/ip/firewall/address-list/print =.proplist=.id,address ?=comment=a;/system/reset",
                &["!re =.id=*2 =address=10.0.0.2", "!done"],
            ),
            (
                "/ip/firewall/address-list/print =.proplist=.id ?list=negbal ?list=allowed ?#|",
                &["!re =.id=*1", "!re =.id=*2", "!done"],
            ),
            (
                "/ip/firewall/address-list/print =.proplist=.id ?list=negbal ?#!",
                &["!re =.id=*2", "!done"],
            ),
            (
                "/ip/firewall/address-list/print =count-only=",
                &["!done =ret=2"],
            ),
            (
                "/ip/firewall/address-list/print ?#|",
                &["!trap =message=invalid query", "!done"],
            ),
            ("/queue/simple/set =.id=*3 =max-limit=5M/5M", &["!done"]),
            (
                "/queue/simple/print =.proplist=max-limit",
                &["!re =max-limit=5M/5M", "!done"],
            ),
            (
                "/queue/simple/set =.id=*3 =max-limit=fast",
                &[
                    "!trap =message=invalid value for argument max-limit",
                    "!done",
                ],
            ),
            (
                "/queue/simple/add =name=q2 =colour=red",
                &["!trap =message=unknown parameter colour", "!done"],
            ),
            (
                "/ip/firewall/address-list/remove =.id=*1,*9",
                &["!trap =message=no such item", "!done"],
            ),
            ("/ip/firewall/address-list/remove =.id=*1,*2", &["!done"]),
            ("/ip/firewall/address-list/print", &["!done"]),
            ("/system/identity/print", &["!re =name=sim", "!done"]),
            (
                "/system/identity/add =name=x",
                &["!trap =message=no such command", "!done"],
            ),
            (
                "/system/reboot",
                &["!trap =message=no such command prefix", "!done"],
            ),
            (
                "/interface/print",
                &["!trap =message=no such command prefix", "!done"],
            ),
        ];
        for (command, want) in cases {
            assert_eq!(run_text(&mut state, command), *want, "{command}");
        }
        assert_eq!(state.identity, "sim");
    }

    #[test]
    fn quoted_values_stay_values() {
        let mut state = RouterState::new("sim");
        let words = vec![
            "/ip/firewall/address-list/add".to_string(),
            "=list=a".to_string(),
            "=address=1.2.3.4".to_string(),
            "=comment=x\" ; /system identity set name=owned ; $y \\ ?\n".to_string(),
        ];
        assert_eq!(run(&mut state, &words), vec![vec!["!done", "=ret=*1"]]);
        assert_eq!(
            state.address_list[0].comment,
            "x\" ; /system identity set name=owned ; $y \\ ?\n"
        );
        assert_eq!(state.identity, "sim");
    }
}
