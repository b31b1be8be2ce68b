//! The simulator's telnet side: option negotiation through libmudtelnet-rs, a `Login:` /
//! `Password:` exchange, then the same RouterOS prompt loop as the SSH shell.

use std::sync::Arc;
use std::time::Duration;

use libmudtelnet_rs::Parser;
use libmudtelnet_rs::compatibility::CompatibilityTable;
use libmudtelnet_rs::events::TelnetEvents;
use libmudtelnet_rs::telnet::{op_command, op_option};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::routeros::Protocol;
use super::{BANNER, LineEditor, Outcome, Shared, terminal_text};

/// RouterOS closes the connection after this many failed logins.
const MAX_LOGIN_ATTEMPTS: usize = 3;
/// An idle session is closed after this long, so abandoned clients free their slot.
const IDLE_TIMEOUT: Duration = Duration::from_secs(600);

pub(crate) async fn serve(
    listener: TcpListener,
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
                tracing::warn!(%error, "sim: telnet accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = socket.set_nodelay(true);
        let shared = shared.clone();
        let cancel = shutdown.child_token();
        tasks.spawn(async move {
            let Some(guard) = shared.open_session(Protocol::Telnet) else {
                tracing::info!(%peer, "sim: telnet session refused (max sessions reached)");
                let mut socket = socket;
                let _ = socket.write_all(b"too many sessions\r\n").await;
                let _ = socket.shutdown().await;
                return;
            };
            let mut connection = Connection::new(socket, shared, cancel);
            if let Err(error) = connection.run().await {
                tracing::debug!(%error, "sim: telnet session ended with an error");
            }
            drop(guard);
        });
    }
}

struct Connection {
    socket: TcpStream,
    parser: Parser,
    editor: LineEditor,
    shared: Arc<Shared>,
    cancel: CancellationToken,
}

impl Connection {
    fn new(socket: TcpStream, shared: Arc<Shared>, cancel: CancellationToken) -> Self {
        let mut options = CompatibilityTable::new();
        // We echo and suppress go-ahead ourselves, like RouterOS; SGA from the client is
        // welcome too. Everything else (NAWS, TTYPE, LINEMODE...) is refused by the parser.
        options.support_local(op_option::ECHO);
        options.support(op_option::SGA);
        Self {
            socket,
            parser: Parser::with_support(options),
            editor: LineEditor::new(true),
            shared,
            cancel,
        }
    }

    /// Whether the client let us echo (it may answer our WILL ECHO with DONT ECHO).
    fn echo_enabled(&self) -> bool {
        self.parser.options.get_option(op_option::ECHO).local_state
    }

    async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        let escaped = Parser::escape_iac(bytes.to_vec());
        self.socket.write_all(&escaped).await
    }

    async fn run(&mut self) -> std::io::Result<()> {
        let mut greeting = Vec::new();
        for option in [op_option::ECHO, op_option::SGA] {
            if let Some(TelnetEvents::DataSend(bytes)) = self.parser._will(option) {
                greeting.extend_from_slice(&bytes);
            }
        }
        self.socket.write_all(&greeting).await?;

        if !self.login().await? {
            return Ok(());
        }
        let banner = BANNER.to_string() + &self.shared.prompt();
        self.send(banner.as_bytes()).await?;
        while let Some(line) = self.read_line(true).await? {
            match self.shared.run_command(&line, &self.cancel).await {
                Outcome::Answer(answer) => {
                    let text = terminal_text(&answer) + &self.shared.prompt();
                    self.send(text.as_bytes()).await?;
                }
                Outcome::Quit => {
                    self.send(b"interrupted\r\n").await?;
                    break;
                }
                Outcome::Drop => return Ok(()),
                Outcome::Hang => {
                    // Stay connected but silent until the client gives up or we shut down.
                    while self.read_line(false).await?.is_some() {}
                    return Ok(());
                }
            }
        }
        let _ = self.socket.shutdown().await;
        Ok(())
    }

    /// Asks for credentials up to three times; `Ok(false)` when the client is turned away.
    async fn login(&mut self) -> std::io::Result<bool> {
        for _ in 0..MAX_LOGIN_ATTEMPTS {
            self.send(b"Login: ").await?;
            let Some(user) = self.read_line(true).await? else {
                return Ok(false);
            };
            self.send(b"Password: ").await?;
            let Some(password) = self.read_line(false).await? else {
                return Ok(false);
            };
            // The password is not echoed, so end its line for the client.
            if self.echo_enabled() {
                self.send(b"\r\n").await?;
            }
            if self.shared.credentials_ok(user.trim(), &password) {
                return Ok(true);
            }
            self.shared.device.record_auth_failure();
            self.send(b"Login failed, incorrect username or password\r\n\r\n")
                .await?;
        }
        Ok(false)
    }

    /// Reads the next line, echoing it if `echo` and the client agreed to server echo.
    /// `None` on end of input, shutdown or idle timeout.
    async fn read_line(&mut self, echo: bool) -> std::io::Result<Option<String>> {
        let mut buffer = [0u8; 4096];
        loop {
            self.editor.echo = echo && self.echo_enabled();
            let (echoed, line) = self.editor.next_line();
            self.send(&echoed).await?;
            if let Some(line) = line {
                return Ok(Some(line));
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
            let mut replies = Vec::new();
            for event in self.parser.receive(&buffer[..count]) {
                match event {
                    TelnetEvents::DataSend(bytes) => replies.extend_from_slice(&bytes),
                    // A negotiation split across reads reaches us as data; drop its IAC
                    // bytes rather than type them into the command line.
                    TelnetEvents::DataReceive(bytes) => {
                        let clean: Vec<u8> = bytes
                            .iter()
                            .copied()
                            .filter(|&b| b != op_command::IAC)
                            .collect();
                        self.editor.feed(&clean);
                    }
                    _ => {}
                }
            }
            if !replies.is_empty() {
                self.socket.write_all(&replies).await?;
            }
        }
    }
}
