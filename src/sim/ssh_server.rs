//! The simulator's SSH side (russh server): password login, `exec` channels (one command
//! each) and PTY shells with a RouterOS prompt.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use russh::keys::PrivateKey;
use russh::server::{Auth, Config, Handle, Msg, Session};
use russh::{Channel, ChannelId, Disconnect, MethodKind, MethodSet, Pty, SshId};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::routeros::Protocol;
use super::{BANNER, LineEditor, Outcome, Shared, terminal_text};

pub(crate) fn config(host_key: PrivateKey) -> Arc<Config> {
    Arc::new(Config {
        // What a real MikroTik announces, so clients that look at it see a RouterOS box.
        server_id: SshId::Standard("SSH-2.0-ROSSSH".into()),
        methods: MethodSet::from(&[MethodKind::Password][..]),
        // Short, so that tests of rejected logins stay quick; this is not a real login.
        auth_rejection_time: Duration::from_millis(100),
        auth_rejection_time_initial: Some(Duration::ZERO),
        keys: vec![host_key],
        keepalive_interval: Some(Duration::from_secs(15)),
        keepalive_max: 3,
        inactivity_timeout: Some(Duration::from_secs(600)),
        nodelay: true,
        ..Default::default()
    })
}

pub(crate) async fn serve(
    listener: TcpListener,
    config: Arc<Config>,
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
                tracing::warn!(%error, "sim: ssh accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // russh applies `Config::nodelay` only to sockets it accepts itself; this one
        // comes from our own listener, and with Nagle on every exec round trip waits
        // for the client's delayed ACK (~40 ms).
        let _ = socket.set_nodelay(true);
        let guard = shared.open_session(Protocol::Ssh);
        let refused = guard.is_none();
        if refused {
            tracing::info!(%peer, "sim: ssh session refused (max sessions reached)");
        }
        let config = config.clone();
        let shared = shared.clone();
        let cancel = shutdown.child_token();
        tasks.spawn(async move {
            connection(socket, config, shared, refused, cancel).await;
            drop(guard);
        });
    }
}

async fn connection(
    socket: TcpStream,
    config: Arc<Config>,
    shared: Arc<Shared>,
    refused: bool,
    cancel: CancellationToken,
) {
    let handler = SshHandler {
        shared,
        refused,
        cancel: cancel.clone(),
        channels: HashMap::new(),
    };
    let session = match russh::server::run_stream(config, socket, handler).await {
        Ok(session) => session,
        Err(error) => {
            tracing::debug!(%error, "sim: ssh handshake failed");
            return;
        }
    };
    let handle = session.handle();
    if refused {
        // russh sends this once key exchange is done, before any login: OpenSSH then
        // reports "Received disconnect ... too many sessions".
        let _ = handle
            .disconnect(
                Disconnect::TooManyConnections,
                "too many sessions".into(),
                String::new(),
            )
            .await;
    }
    tokio::select! {
        result = session => {
            if let Err(error) = result {
                tracing::debug!(%error, "sim: ssh session ended with an error");
            }
        }
        _ = cancel.cancelled() => {
            let _ = handle
                .disconnect(Disconnect::ByApplication, "simulator shutting down".into(), String::new())
                .await;
        }
    }
    // Ends the channel tasks of this connection (including hung ones).
    cancel.cancel();
}

#[derive(Default)]
struct ChannelState {
    pty: bool,
    /// Bytes typed into a running shell.
    input: Option<mpsc::UnboundedSender<Vec<u8>>>,
}

struct SshHandler {
    shared: Arc<Shared>,
    refused: bool,
    cancel: CancellationToken,
    channels: HashMap<ChannelId, ChannelState>,
}

impl russh::server::Handler for SshHandler {
    type Error = russh::Error;

    async fn auth_password(&mut self, user: &str, password: &str) -> Result<Auth, Self::Error> {
        if !self.refused && self.shared.credentials_ok(user, password) {
            return Ok(Auth::Accept);
        }
        self.shared.device.record_auth_failure();
        Ok(Auth::reject())
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: russh::server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        // The `Channel` object is dropped on purpose: input arrives through `data`, and
        // output goes out through the session handle from the channel's task.
        self.channels.insert(channel.id(), ChannelState::default());
        reply.accept().await;
        Ok(())
    }

    async fn pty_request(
        &mut self,
        channel: ChannelId,
        _term: &str,
        _col_width: u32,
        _row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        _modes: &[(Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.channels.entry(channel).or_default().pty = true;
        session.channel_success(channel)?;
        Ok(())
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)?;
        let command = String::from_utf8_lossy(data).into_owned();
        let shared = self.shared.clone();
        let handle = session.handle();
        let cancel = self.cancel.clone();
        tokio::spawn(async move {
            match shared.run_command(&command, &cancel).await {
                Outcome::Answer(answer) => {
                    if !answer.is_empty() {
                        let _ = handle.data(channel, format!("{answer}\n")).await;
                    }
                    finish_channel(&handle, channel).await;
                }
                Outcome::Quit => finish_channel(&handle, channel).await,
                Outcome::Drop => drop_connection(&handle, &cancel).await,
                Outcome::Hang => cancel.cancelled().await,
            }
        });
        Ok(())
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)?;
        let state = self.channels.entry(channel).or_default();
        let (input_tx, input_rx) = mpsc::unbounded_channel();
        state.input = Some(input_tx);
        let shell = Shell {
            shared: self.shared.clone(),
            handle: session.handle(),
            channel,
            cancel: self.cancel.clone(),
            // A PTY echoes what is typed and turns `\n` into `\r\n`; without one, neither.
            pty: state.pty,
        };
        tokio::spawn(shell.run(input_rx));
        Ok(())
    }

    async fn data(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(input) = self.channels.get(&channel).and_then(|c| c.input.as_ref()) {
            let _ = input.send(data.to_vec());
        }
        Ok(())
    }

    async fn channel_eof(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        // EOF ends a shell's input (its task finishes the queued lines, then closes); an
        // exec channel ignores it because the client may send EOF before the answer.
        if let Some(state) = self.channels.get_mut(&channel) {
            state.input = None;
        }
        Ok(())
    }

    async fn channel_close(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.channels.remove(&channel);
        Ok(())
    }
}

async fn finish_channel(handle: &Handle, channel: ChannelId) {
    let _ = handle.exit_status_request(channel, 0).await;
    let _ = handle.eof(channel).await;
    let _ = handle.close(channel).await;
}

async fn drop_connection(handle: &Handle, cancel: &CancellationToken) {
    let _ = handle
        .disconnect(
            Disconnect::ByApplication,
            "connection dropped (fault injection)".into(),
            String::new(),
        )
        .await;
    cancel.cancel();
}

struct Shell {
    shared: Arc<Shared>,
    handle: Handle,
    channel: ChannelId,
    cancel: CancellationToken,
    pty: bool,
}

impl Shell {
    async fn send(&self, text: impl Into<Vec<u8>>) {
        let text = text.into();
        if !text.is_empty() {
            let _ = self.handle.data(self.channel, text).await;
        }
    }

    fn output(&self, answer: &str) -> String {
        if self.pty {
            terminal_text(answer)
        } else if answer.is_empty() {
            String::new()
        } else {
            format!("{answer}\n")
        }
    }

    async fn run(self, mut input: mpsc::UnboundedReceiver<Vec<u8>>) {
        let mut editor = LineEditor::new(self.pty);
        let banner = if self.pty {
            BANNER.to_string()
        } else {
            BANNER.replace("\r\n", "\n")
        };
        self.send(banner + &self.shared.prompt()).await;
        loop {
            let (echo, line) = editor.next_line();
            self.send(echo).await;
            let Some(line) = line else {
                let bytes = tokio::select! {
                    _ = self.cancel.cancelled() => return,
                    bytes = input.recv() => bytes,
                };
                match bytes {
                    Some(bytes) => {
                        editor.feed(&bytes);
                        continue;
                    }
                    // The client sent EOF: leave as RouterOS does at end of input.
                    None => break,
                }
            };
            match self.shared.run_command(&line, &self.cancel).await {
                Outcome::Answer(answer) => {
                    let text = self.output(&answer) + &self.shared.prompt();
                    self.send(text).await;
                }
                Outcome::Quit => {
                    self.send(self.output("interrupted")).await;
                    break;
                }
                Outcome::Drop => {
                    drop_connection(&self.handle, &self.cancel).await;
                    return;
                }
                Outcome::Hang => {
                    self.cancel.cancelled().await;
                    return;
                }
            }
        }
        finish_channel(&self.handle, self.channel).await;
    }
}
