//! Ways of reaching a device. Each protocol is one file; the dispatcher sees only
//! `Reply` and its `Verdict`. Nothing here touches the database.

pub mod exec;
pub mod null;
pub mod radius;
pub mod routeros_api;
pub mod ssh;
pub mod telnet;

use std::time::Duration;

use crate::store::Secret;

/// Where and how to reach one NAS, built from its `nas` row. `Debug` never shows secrets.
#[derive(Debug, Clone)]
pub struct Target {
    pub nas_id: i64,
    pub nas_name: String,
    pub host: String,
    pub port: u16,
    pub login: Option<String>,
    pub password: Option<Secret>,
    /// RADIUS shared secret; for CLI devices the `enable` password.
    pub secret: Option<Secret>,
    /// Connections open to the device at once, never more.
    pub max_sessions: usize,
}

impl Target {
    /// How errors name the device: `nas 7 (10.0.0.1:22)`.
    pub fn label(&self) -> String {
        format!("nas {} ({}:{})", self.nas_id, self.host, self.port)
    }
}

/// One command and what the device printed in answer to it (prompt and echo removed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exchange {
    pub command: String,
    pub output: String,
}

/// Why a session could not run (all of) the commands. Messages name the device and
/// never contain a password or secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    #[error("{0}: cannot connect: {1}")]
    Connect(String, String),
    #[error("{0}: authentication rejected for user {1}")]
    Auth(String, String),
    #[error("{label}: host key changed: known {known}, offered {offered}; nothing was sent")]
    HostKeyChanged {
        label: String,
        known: String,
        offered: String,
    },
    #[error("{label}: unknown host key {offered} (not in {known_hosts}); nothing was sent")]
    HostKeyUnknown {
        label: String,
        offered: String,
        known_hosts: String,
    },
    #[error("{0}: timeout: {1}")]
    Timeout(String, String),
    #[error("{0}: connection closed: {1}")]
    Closed(String, String),
    #[error("{0}: protocol error: {1}")]
    Protocol(String, String),
}

/// What a CLI-like transport (SSH, telnet, RouterOS API) did with a list of commands:
/// the exchanges completed, and the error that stopped it, if any.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CliResult {
    pub exchanges: Vec<Exchange>,
    pub error: Option<SessionError>,
}

/// Default deadline for one command when a scheme does not set one.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// What the device's answer means for the event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Applied: the event is done.
    Done,
    /// Not applied now but may be later (timeout, "postpone"): try again after a backoff.
    Retry(String),
    /// Will not succeed by repeating it: the event fails with this reason.
    Failed(String),
}

/// The result of sending one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The commands exactly as sent, copy-pasteable.
    pub commands: Vec<String>,
    /// What the device answered (stdout and stderr for scripts).
    pub answer: String,
    pub verdict: Verdict,
}

/// Keeps at most `max` bytes of device output, cut at a character boundary, so one
/// chatty device cannot fill the history table.
pub fn truncate_answer(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut cut = max;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push_str("\n[answer truncated]");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncates_on_char_boundary() {
        assert_eq!(truncate_answer("abc".into(), 10), "abc");
        assert_eq!(
            truncate_answer("abcdef".into(), 3),
            "abc\n[answer truncated]"
        );
        assert_eq!(truncate_answer("жжж".into(), 3), "ж\n[answer truncated]");
    }
}
