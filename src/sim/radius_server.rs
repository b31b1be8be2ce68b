//! The simulator's RADIUS side: a CoA / Disconnect server (RFC 5176) acting on the
//! `Device`'s subscriber sessions.
//!
//! Requests are verified with the transport's `verify_request` (request authenticator,
//! and the Message-Authenticator when present); anything that fails is dropped silently
//! and counted, as a NAS does with a wrong secret. Replies are built here because the
//! transport only encodes requests: the Message-Authenticator is computed over the reply
//! with the request authenticator in place, then the response authenticator over the
//! whole reply (RFC 5176 section 3, RFC 3579 section 3.2).
//!
//! One socket and one loop: with no latency every datagram is handled inline (no task per
//! packet), which keeps the server well above the rates a benchmark sends. With latency
//! each datagram gets a task that sleeps, then acts and answers, so slow answers overlap.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use md5::{Digest, Md5};
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::routeros::{CoaOutcome, RadiusSession, RouterState};
use super::{Fate, Shared};
use crate::transport::radius::{
    COA_ACK, COA_NAK, COA_REQUEST, DISCONNECT_ACK, DISCONNECT_NAK, DISCONNECT_REQUEST,
    verify_request,
};

const HEADER_LEN: usize = 20;
const USER_NAME: u8 = 1;
const FRAMED_IP_ADDRESS: u8 = 8;
const FILTER_ID: u8 = 11;
const VENDOR_SPECIFIC: u8 = 26;
const PROXY_STATE: u8 = 33;
const ACCT_SESSION_ID: u8 = 44;
const MESSAGE_AUTHENTICATOR: u8 = 80;
const ERROR_CAUSE: u8 = 101;

const VENDOR_CISCO: u32 = 9;
const CISCO_AVPAIR: u8 = 1;
const VENDOR_MIKROTIK: u32 = 14988;
const MIKROTIK_RATE_LIMIT: u8 = 8;
const MIKROTIK_ADDRESS_LIST: u8 = 19;

/// RFC 5176 section 3.6 Error-Cause values the simulator answers with.
const MISSING_ATTRIBUTE: u32 = 402;
const SESSION_CONTEXT_NOT_FOUND: u32 = 503;

/// Larger than any RADIUS packet (4096), so an oversized datagram is seen whole and
/// rejected by its length check rather than silently truncated.
const RECEIVE_BUFFER: usize = 65_536;

pub(crate) struct Settings {
    pub secret: Vec<u8>,
    pub auto_sessions: bool,
}

pub(crate) async fn serve(
    socket: UdpSocket,
    settings: Settings,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    let socket = Arc::new(socket);
    let settings = Arc::new(settings);
    let mut buffer = vec![0u8; RECEIVE_BUFFER];
    loop {
        let received = tokio::select! {
            _ = shutdown.cancelled() => return,
            received = socket.recv_from(&mut buffer) => received,
        };
        let (len, peer) = match received {
            Ok(received) => received,
            Err(error) => {
                // Nothing a peer sends makes recv fail for long; pausing keeps a
                // persistent local error from spinning the loop.
                tracing::warn!(%error, "sim: coa receive failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let datagram = &buffer[..len];
        if shared.latency.is_zero() {
            if let Some(reply) = respond(&shared, &settings, datagram) {
                send(&socket, &reply, peer).await;
            }
            continue;
        }
        let datagram = datagram.to_vec();
        let (socket, settings, shared) = (socket.clone(), settings.clone(), shared.clone());
        let cancel = shutdown.clone();
        tasks.spawn(async move {
            if !shared.wait_latency(&cancel).await {
                return;
            }
            if let Some(reply) = respond(&shared, &settings, &datagram) {
                send(&socket, &reply, peer).await;
            }
        });
    }
}

async fn send(socket: &UdpSocket, reply: &[u8], peer: SocketAddr) {
    if let Err(error) = socket.send_to(reply, peer).await {
        tracing::debug!(%error, %peer, "sim: coa reply not sent");
    }
}

/// What a request asks for, taken from its attributes.
#[derive(Debug, Default, PartialEq)]
struct CoaRequest {
    user: Option<String>,
    acct_session_id: Option<String>,
    ip: Option<String>,
    rate_limit: Option<String>,
    address_list: Option<String>,
    filter_id: Option<String>,
    cisco_avpair: Option<String>,
    /// Copied into the reply unchanged and in order (RFC 5176 section 3.1).
    proxy_states: Vec<Vec<u8>>,
}

/// Verifies, applies and answers one datagram; `None` means no answer (dropped, or a
/// fault decided so).
fn respond(shared: &Shared, settings: &Settings, datagram: &[u8]) -> Option<Vec<u8>> {
    if let Err(error) = verify_request(datagram, &settings.secret) {
        tracing::debug!(%error, "sim: coa request dropped");
        shared.device.record_coa(CoaOutcome::Dropped);
        return None;
    }
    // `verify_request` checked the length field against the datagram.
    let len = usize::from(u16::from_be_bytes([datagram[2], datagram[3]]));
    let packet = &datagram[..len];
    let (code, id) = (packet[0], packet[1]);
    if code != COA_REQUEST && code != DISCONNECT_REQUEST {
        tracing::debug!(code, "sim: not a CoA or Disconnect request, dropped");
        shared.device.record_coa(CoaOutcome::Dropped);
        return None;
    }
    let request = parse_attributes(packet);
    let fate = shared.roll_faults();
    if fate == Fate::Drop {
        tracing::debug!(id, "sim: fault drops the coa request");
        return None;
    }
    let (reply_code, cause) = shared
        .device
        .apply(|state| act(state, code, &request, settings.auto_sessions));
    let outcome = if cause.is_none() {
        CoaOutcome::Ack
    } else {
        CoaOutcome::Nak
    };
    shared.device.record_coa(outcome);
    let kind = if code == COA_REQUEST {
        "coa"
    } else {
        "disconnect"
    };
    shared.record(kind, &request.record_text());
    tracing::debug!(id, ?request, reply_code, ?cause, "sim: coa request");
    if fate == Fate::Hang {
        tracing::debug!(id, "sim: fault leaves the coa request unanswered");
        return None;
    }
    let mut authenticator = [0u8; 16];
    authenticator.copy_from_slice(&packet[4..HEADER_LEN]);
    let mut attributes: Vec<(u8, Vec<u8>)> = request
        .proxy_states
        .iter()
        .map(|state| (PROXY_STATE, state.clone()))
        .collect();
    if let Some(cause) = cause {
        attributes.push((ERROR_CAUSE, cause.to_be_bytes().to_vec()));
    }
    encode_reply(
        reply_code,
        id,
        &authenticator,
        &attributes,
        &settings.secret,
    )
}

impl CoaRequest {
    /// The attributes it carries as `name=value` words, for `--record`.
    fn record_text(&self) -> String {
        [
            ("user", &self.user),
            ("acct_session_id", &self.acct_session_id),
            ("ip", &self.ip),
            ("rate_limit", &self.rate_limit),
            ("address_list", &self.address_list),
            ("filter_id", &self.filter_id),
            ("cisco_avpair", &self.cisco_avpair),
        ]
        .iter()
        .filter_map(|(name, value)| value.as_ref().map(|v| format!("{name}={v}")))
        .collect::<Vec<_>>()
        .join(" ")
    }
}

/// The attributes the simulator understands; others are ignored, as a NAS ignores what
/// it does not act on.
fn parse_attributes(packet: &[u8]) -> CoaRequest {
    let text = |value: &[u8]| String::from_utf8_lossy(value).into_owned();
    let mut request = CoaRequest::default();
    for (kind, value) in attributes(&packet[HEADER_LEN..]) {
        match kind {
            USER_NAME => request.user = Some(text(value)),
            ACCT_SESSION_ID => request.acct_session_id = Some(text(value)),
            FILTER_ID => request.filter_id = Some(text(value)),
            PROXY_STATE => request.proxy_states.push(value.to_vec()),
            FRAMED_IP_ADDRESS => {
                if let Ok(octets) = <[u8; 4]>::try_from(value) {
                    request.ip = Some(Ipv4Addr::from(octets).to_string());
                }
            }
            VENDOR_SPECIFIC if value.len() >= 4 => {
                let vendor = u32::from_be_bytes([value[0], value[1], value[2], value[3]]);
                for (sub, data) in attributes(&value[4..]) {
                    match (vendor, sub) {
                        (VENDOR_MIKROTIK, MIKROTIK_RATE_LIMIT) => {
                            request.rate_limit = Some(text(data));
                        }
                        (VENDOR_MIKROTIK, MIKROTIK_ADDRESS_LIST) => {
                            request.address_list = Some(text(data));
                        }
                        (VENDOR_CISCO, CISCO_AVPAIR) => request.cisco_avpair = Some(text(data)),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    request
}

/// (type, value) pairs of an attribute area; stops at the first malformed length, which
/// `verify_request` has already ruled out for the top level.
fn attributes(mut rest: &[u8]) -> Vec<(u8, &[u8])> {
    let mut out = Vec::new();
    while rest.len() >= 2 {
        let len = usize::from(rest[1]);
        if len < 2 || len > rest.len() {
            break;
        }
        out.push((rest[0], &rest[2..len]));
        rest = &rest[len..];
    }
    out
}

/// The key of the session a request names: by Acct-Session-Id (and then the User-Name
/// must agree, if given), else by User-Name, else by Framed-IP-Address.
fn find_session(state: &RouterState, request: &CoaRequest) -> Option<String> {
    let user_agrees = |session: &RadiusSession| {
        request
            .user
            .as_ref()
            .is_none_or(|user| *user == session.user)
    };
    if let Some(id) = &request.acct_session_id {
        return state
            .sessions
            .get(id)
            .filter(|session| user_agrees(session))
            .map(|_| id.clone());
    }
    let found = if let Some(user) = &request.user {
        state.sessions.iter().find(|(_, s)| s.user == *user)
    } else if let Some(ip) = &request.ip {
        state.sessions.iter().find(|(_, s)| s.ip == *ip)
    } else {
        None
    };
    found.map(|(key, _)| key.clone())
}

/// Applies a verified request; returns the reply code and, for a NAK, its Error-Cause.
fn act(
    state: &mut RouterState,
    code: u8,
    request: &CoaRequest,
    auto_sessions: bool,
) -> (u8, Option<u32>) {
    let (ack, nak) = if code == DISCONNECT_REQUEST {
        (DISCONNECT_ACK, DISCONNECT_NAK)
    } else {
        (COA_ACK, COA_NAK)
    };
    // The key a new session would get; `None` when nothing identifies one.
    let new_key = request
        .acct_session_id
        .as_ref()
        .or(request.user.as_ref())
        .or(request.ip.as_ref())
        .cloned();
    let Some(new_key) = new_key else {
        return (nak, Some(MISSING_ATTRIBUTE));
    };
    let key = match find_session(state, request) {
        Some(key) => key,
        // Auto-sessions stand in for the login the simulator never saw, so only a CoA
        // creates one; a Disconnect of an unknown session is a NAK, as on a real NAS.
        // A key already taken (by a session of another user) is never overwritten.
        None if code == COA_REQUEST && auto_sessions && !state.sessions.contains_key(&new_key) => {
            state.sessions.insert(
                new_key.clone(),
                RadiusSession {
                    user: request.user.clone().unwrap_or_default(),
                    acct_session_id: request.acct_session_id.clone().unwrap_or_default(),
                    ip: request.ip.clone().unwrap_or_default(),
                    ..RadiusSession::default()
                },
            );
            new_key
        }
        None => return (nak, Some(SESSION_CONTEXT_NOT_FOUND)),
    };
    if code == DISCONNECT_REQUEST {
        state.sessions.remove(&key);
        return (ack, None);
    }
    if let Some(session) = state.sessions.get_mut(&key) {
        let updates = [
            (&mut session.rate_limit, &request.rate_limit),
            (&mut session.address_list, &request.address_list),
            (&mut session.filter_id, &request.filter_id),
            (&mut session.cisco_avpair, &request.cisco_avpair),
        ];
        for (field, value) in updates {
            if let Some(value) = value {
                field.clone_from(value);
            }
        }
        session.coa_count += 1;
    }
    (ack, None)
}

/// Builds a reply: attributes, a Message-Authenticator computed with the request
/// authenticator in the authenticator field, then the response authenticator
/// MD5(code | id | length | request authenticator | attributes | secret) over it all.
/// `None` only if the attributes do not fit a packet (never for what `respond` adds).
fn encode_reply(
    code: u8,
    id: u8,
    request_authenticator: &[u8; 16],
    attributes: &[(u8, Vec<u8>)],
    secret: &[u8],
) -> Option<Vec<u8>> {
    let mut packet = vec![code, id, 0, 0];
    packet.extend_from_slice(request_authenticator);
    for (kind, value) in attributes {
        let len = u8::try_from(value.len() + 2).ok()?;
        packet.push(*kind);
        packet.push(len);
        packet.extend_from_slice(value);
    }
    let ma_offset = packet.len() + 2;
    packet.extend_from_slice(&[MESSAGE_AUTHENTICATOR, 18]);
    packet.extend_from_slice(&[0; 16]);
    let len = u16::try_from(packet.len()).ok()?;
    packet[2..4].copy_from_slice(&len.to_be_bytes());
    // HMAC takes keys of any length; the error branch exists only in the type.
    let mut mac = Hmac::<Md5>::new_from_slice(secret).ok()?;
    mac.update(&packet);
    let ma: [u8; 16] = mac.finalize().into_bytes().into();
    packet[ma_offset..ma_offset + 16].copy_from_slice(&ma);
    let mut md5 = Md5::new();
    md5.update(&packet);
    md5.update(secret);
    let response: [u8; 16] = md5.finalize().into();
    packet[4..HEADER_LEN].copy_from_slice(&response);
    Some(packet)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::radius::{Dictionary, encode_request, parse_request, verify_reply};

    fn request(text: &str, id: u8, secret: &[u8]) -> (Vec<u8>, [u8; 16]) {
        let dict = Dictionary::builtin();
        let parsed = parse_request(text, &dict).expect("request parses");
        encode_request(&parsed, id, secret).expect("request encodes")
    }

    #[test]
    fn record_text_names_the_attributes_present() {
        let (packet, _) = request(
            "coa User-Name = u1, Acct-Session-Id = s1, Filter-Id = ev7",
            1,
            b"s",
        );
        assert_eq!(
            parse_attributes(&packet).record_text(),
            "user=u1 acct_session_id=s1 filter_id=ev7"
        );
        assert_eq!(CoaRequest::default().record_text(), "");
    }

    #[test]
    fn act_table() {
        let coa = |attrs: &str| {
            let (packet, _) = request(&format!("coa {attrs}"), 1, b"s");
            parse_attributes(&packet)
        };
        let disconnect = |attrs: &str| {
            let (packet, _) = request(&format!("disconnect {attrs}"), 1, b"s");
            parse_attributes(&packet)
        };
        let mut state = RouterState::new("sim");
        state.sessions.insert(
            "s1".into(),
            RadiusSession {
                user: "u1".into(),
                acct_session_id: "s1".into(),
                ip: "10.0.0.1".into(),
                ..RadiusSession::default()
            },
        );
        // (request code, request, auto-sessions, expected reply code and Error-Cause)
        type Case = (u8, CoaRequest, bool, (u8, Option<u32>));
        let cases: Vec<Case> = vec![
            (
                COA_REQUEST,
                coa(r#"User-Name = "u1", Acct-Session-Id = "s1", Mikrotik-Rate-Limit = "1M/1M""#),
                false,
                (COA_ACK, None),
            ),
            (
                COA_REQUEST,
                coa(r#"User-Name = "u1", Filter-Id = "gold""#),
                false,
                (COA_ACK, None),
            ),
            (
                COA_REQUEST,
                coa(r#"User-Name = "u2", Acct-Session-Id = "s1""#),
                true,
                (COA_NAK, Some(503)),
            ),
            (
                COA_REQUEST,
                coa(r#"Acct-Session-Id = "s9""#),
                false,
                (COA_NAK, Some(503)),
            ),
            (
                COA_REQUEST,
                coa(r#"Filter-Id = "x""#),
                true,
                (COA_NAK, Some(402)),
            ),
            (
                COA_REQUEST,
                coa(r#"User-Name = "u3", Acct-Session-Id = "s3", Cisco-AVPair = "a=b""#),
                true,
                (COA_ACK, None),
            ),
            (
                DISCONNECT_REQUEST,
                disconnect(r#"Acct-Session-Id = "s9""#),
                true,
                (DISCONNECT_NAK, Some(503)),
            ),
            (
                DISCONNECT_REQUEST,
                disconnect(r#"Framed-IP-Address = 10.0.0.1"#),
                false,
                (DISCONNECT_ACK, None),
            ),
        ];
        for (index, (code, request, auto, want)) in cases.into_iter().enumerate() {
            assert_eq!(act(&mut state, code, &request, auto), want, "case {index}");
        }
        assert!(!state.sessions.contains_key("s1"), "disconnected");
        let created = &state.sessions["s3"];
        assert_eq!(created.user, "u3");
        assert_eq!(created.cisco_avpair, "a=b");
        assert_eq!(created.coa_count, 1);
    }

    #[test]
    fn reply_verifies_with_our_client_check() {
        let secret = b"testing123";
        let (packet, authenticator) = request(
            r#"coa User-Name = "u1", Mikrotik-Rate-Limit = "10M/10M""#,
            77,
            secret,
        );
        let parsed = parse_attributes(&packet);
        assert_eq!(parsed.user.as_deref(), Some("u1"));
        assert_eq!(parsed.rate_limit.as_deref(), Some("10M/10M"));
        let reply = encode_reply(
            COA_NAK,
            77,
            &authenticator,
            &[(ERROR_CAUSE, 503u32.to_be_bytes().to_vec())],
            secret,
        )
        .expect("reply encodes");
        let verified = verify_reply(&reply, 77, &authenticator, secret).expect("reply verifies");
        assert_eq!(verified.code, COA_NAK);
        assert_eq!(verified.error_cause(), Some(503));
        assert!(verify_reply(&reply, 77, &authenticator, b"other").is_err());
        let mut tampered = reply.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(verify_reply(&tampered, 77, &authenticator, secret).is_err());
    }
}
