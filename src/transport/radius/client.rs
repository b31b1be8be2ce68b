//! `RadiusClient`: one UDP socket per NAS shared by its workers, replies routed to
//! their request by identifier, retransmissions and timeouts mapped to a `Verdict`.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use tokio::net::UdpSocket;
use tokio::sync::{OnceCell, Semaphore, mpsc};

use super::MAX_PACKET;
use super::dictionary::Dictionary;
use super::packet::{
    VerifiedReply, classify, code_name, describe_reply, encode_request, verify_reply,
};
use super::request::{Request, RequestKind, parse_request, radclient_line};
use crate::transport::{Reply, Target, Verdict};

/// Per-NAS settings of the client.
#[derive(Clone, Debug)]
pub struct RadiusOptions {
    /// How long to wait for a reply to each transmission.
    pub timeout: Duration,
    /// Transmissions of the same packet before giving up (at least 1).
    pub tries: u32,
    pub dictionary: Arc<Dictionary>,
}

impl Default for RadiusOptions {
    fn default() -> RadiusOptions {
        RadiusOptions {
            timeout: Duration::from_secs(1),
            tries: 3,
            dictionary: Arc::new(Dictionary::builtin()),
        }
    }
}

/// The UDP socket of one client, opened on first use so that `new` needs no runtime.
struct Channel {
    socket: UdpSocket,
    peer: SocketAddr,
}

/// Identifiers in flight, each with the queue its replies go to.
type Pending = Mutex<HashMap<u8, mpsc::UnboundedSender<Vec<u8>>>>;

/// Sends CoA / Disconnect requests to one NAS. Shared by that NAS's workers: all
/// requests use one UDP socket and run in parallel; replies are routed to their
/// request by identifier (random, unique among requests in flight, so at most 256 in
/// flight; more wait). There is no reader task: whichever request is waiting reads
/// the socket and hands other requests' replies over, so nothing outlives the client.
pub struct RadiusClient {
    target: Target,
    options: RadiusOptions,
    channel: OnceCell<Arc<Channel>>,
    pending: Arc<Pending>,
    slots: Semaphore,
}

/// Removes an identifier from the in-flight table however `send` ends (including
/// when its future is dropped), so identifiers never leak.
struct IdGuard {
    pending: Arc<Pending>,
    id: u8,
}

impl Drop for IdGuard {
    fn drop(&mut self) {
        if let Ok(mut map) = self.pending.lock() {
            map.remove(&self.id);
        }
    }
}

/// Why the client's UDP socket could not be opened.
enum OpenError {
    /// This host ran short of a resource (descriptors, memory): wait it out.
    Resource(String),
    /// The address does not resolve, or the socket cannot be had for another reason.
    Other(String),
}

impl RadiusClient {
    /// `target.port` is the CoA port (the caller maps "unset" to 3799).
    pub fn new(target: Target, options: RadiusOptions) -> RadiusClient {
        RadiusClient {
            target,
            options,
            channel: OnceCell::new(),
            pending: Arc::new(Mutex::new(HashMap::new())),
            slots: Semaphore::new(256),
        }
    }

    /// Parses `request_text`, sends it and waits for the verdict. Never fails: every
    /// problem becomes a `Verdict`.
    pub async fn send(&self, request_text: &str) -> Reply {
        let request = match parse_request(request_text, &self.options.dictionary) {
            Ok(request) => request,
            Err(e) => {
                return Reply {
                    commands: vec![request_text.trim().to_string()],
                    answer: String::new(),
                    verdict: Verdict::Failed(format!("bad RADIUS request: {e}")),
                };
            }
        };
        let line = radclient_line(&request, &self.target.host, self.target.port);
        let (answer, verdict) = self.exchange(&request).await;
        Reply {
            commands: vec![line],
            answer,
            verdict,
        }
    }

    async fn exchange(&self, request: &Request) -> (String, Verdict) {
        let label = self.target.label();
        let secret = match &self.target.secret {
            Some(secret) if !secret.expose().is_empty() => secret.expose().as_bytes(),
            _ => {
                return (
                    String::new(),
                    Verdict::Failed(format!("{label} has no RADIUS secret")),
                );
            }
        };
        let channel = match self.channel.get_or_try_init(|| self.open()).await {
            Ok(channel) => channel.clone(),
            Err(OpenError::Resource(e)) => {
                return (String::new(), Verdict::Requeue(format!("{label}: {e}")));
            }
            Err(OpenError::Other(e)) => {
                return (String::new(), Verdict::Unreachable(format!("{label}: {e}")));
            }
        };
        // The semaphore is never closed; an error would only mean a bug, so it is
        // reported as a retry rather than a panic.
        let Ok(_slot) = self.slots.acquire().await else {
            return (
                String::new(),
                Verdict::Retry(format!("{label}: client closed")),
            );
        };
        let (tx, mut rx) = mpsc::unbounded_channel();
        let Some(guard) = self.claim_id(tx) else {
            return (
                String::new(),
                Verdict::Retry(format!("{label}: no free identifier")),
            );
        };
        let (packet, authenticator) = match encode_request(request, guard.id, secret) {
            Ok(encoded) => encoded,
            Err(e) => return (String::new(), Verdict::Failed(e)),
        };
        let tries = self.options.tries.max(1);
        let peer = channel.peer;
        for attempt in 1..=tries {
            // Each retransmission too: a daemon that woke past its lease sends nothing.
            if !crate::transport::gate::open() {
                let error = crate::transport::gate::closed(&label, 0);
                return (String::new(), Verdict::Requeue(error.to_string()));
            }
            if let Err(e) = channel.socket.send_to(&packet, peer).await {
                tracing::debug!(nas = %label, attempt, "RADIUS send failed: {e}");
            } else {
                tracing::debug!(
                    nas = %label,
                    id = guard.id,
                    attempt,
                    "sent {}",
                    code_name(request.kind.code())
                );
            }
            let deadline = tokio::time::Instant::now() + self.options.timeout;
            let waited = tokio::time::timeout_at(
                deadline,
                self.wait_reply(&channel, &mut rx, guard.id, &authenticator, secret),
            )
            .await;
            if let Ok(reply) = waited {
                let answer = describe_reply(&reply, &self.options.dictionary);
                let verdict = classify(
                    reply.code,
                    request.kind == RequestKind::Disconnect,
                    reply.error_cause(),
                );
                return (answer, verdict);
            }
        }
        let host = if self.target.host.contains(':') {
            format!("[{}]", self.target.host)
        } else {
            self.target.host.clone()
        };
        (
            String::new(),
            Verdict::Unreachable(format!(
                "no answer from {host}:{} after {tries} tries",
                self.target.port
            )),
        )
    }

    /// Resolves the NAS address and binds a socket of the same family.
    async fn open(&self) -> Result<Arc<Channel>, OpenError> {
        let host = self.target.host.as_str();
        let port = self.target.port;
        let peer = match host.parse::<IpAddr>() {
            Ok(ip) => SocketAddr::new(ip, port),
            Err(_) => tokio::net::lookup_host((host, port))
                .await
                .map_err(|e| OpenError::Other(format!("cannot resolve {host}: {e}")))?
                .next()
                .ok_or_else(|| OpenError::Other(format!("cannot resolve {host}: no address")))?,
        };
        let local: SocketAddr = if peer.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let socket = UdpSocket::bind(local).await.map_err(|e| {
            if super::super::resource::exhausted(&e) {
                OpenError::Resource(super::super::resource::describe(
                    "cannot open a UDP socket",
                    &e,
                ))
            } else {
                OpenError::Other(format!("cannot open a UDP socket: {e}"))
            }
        })?;
        Ok(Arc::new(Channel { socket, peer }))
    }

    /// A random identifier not in flight. Random rather than sequential so an
    /// off-path sender cannot guess the next one.
    fn claim_id(&self, tx: mpsc::UnboundedSender<Vec<u8>>) -> Option<IdGuard> {
        let mut map = self.pending.lock().ok()?;
        let start: u8 = rand::rng().random();
        let id = (0..=255u8)
            .map(|offset| start.wrapping_add(offset))
            .find(|id| !map.contains_key(id))?;
        map.insert(id, tx);
        Some(IdGuard {
            pending: self.pending.clone(),
            id,
        })
    }

    /// Waits for a valid reply to request `id`, reading the shared socket meanwhile
    /// and routing what it reads to whichever request it belongs to.
    async fn wait_reply(
        &self,
        channel: &Channel,
        rx: &mut mpsc::UnboundedReceiver<Vec<u8>>,
        id: u8,
        authenticator: &[u8; 16],
        secret: &[u8],
    ) -> VerifiedReply {
        let mut buf = vec![0u8; MAX_PACKET];
        let label = self.target.label();
        loop {
            tokio::select! {
                biased;
                Some(datagram) = rx.recv() => {
                    match verify_reply(&datagram, id, authenticator, secret) {
                        Ok(reply) => return reply,
                        Err(e) => tracing::debug!(nas = %label, id, "reply dropped: {e}"),
                    }
                }
                // recv_from is cancel-safe: a datagram is either returned or left
                // in the socket for the next reader.
                received = channel.socket.recv_from(&mut buf) => match received {
                    Ok((n, from)) => self.route(&buf[..n], from, channel.peer),
                    Err(e) => {
                        tracing::debug!(nas = %label, "RADIUS receive failed: {e}");
                        // Do not spin on a socket that keeps failing.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                },
            }
        }
    }

    fn route(&self, datagram: &[u8], from: SocketAddr, peer: SocketAddr) {
        let label = self.target.label();
        if from != peer {
            tracing::debug!(nas = %label, %from, "datagram from a foreign address dropped");
            return;
        }
        let Some(&id) = datagram.get(1) else {
            tracing::debug!(nas = %label, "empty datagram dropped");
            return;
        };
        let sender = self
            .pending
            .lock()
            .ok()
            .and_then(|map| map.get(&id).cloned());
        match sender {
            // The receiver may be gone if that request just finished; then the reply
            // is a late duplicate and dropping it is right.
            Some(sender) => {
                let _ = sender.send(datagram.to_vec());
            }
            None => tracing::debug!(nas = %label, id, "reply to no request in flight dropped"),
        }
    }
}
