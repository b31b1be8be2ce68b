//! Ways of reaching a device. Each protocol is one file; the dispatcher sees only
//! `Reply` and its `Verdict`. Nothing here touches the database.

pub mod answer;
pub mod backoff;
pub mod device;
pub mod exec;
pub mod gate;
pub mod null;
pub mod pool;
pub mod radius;
pub mod resource;
pub mod routeros_api;
pub mod send;
pub mod ssh;
pub mod telnet;

use std::time::Duration;

use crate::model::Secret;

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
    /// The run waited for a free session and the pool was closed meanwhile (new NAS
    /// settings, NAS removed, shutdown): nothing was sent and nothing is known about the
    /// device.
    #[error("{0}: {1}")]
    PoolClosed(String, String),
    /// The daemon's lease on the NAS may have run out before a command was written (see
    /// `gate`): what follows is not sent; the event goes back to its lane.
    #[error("{0}: {1}")]
    LeaseLost(String, String),
    /// This host ran short of a resource (descriptors, memory, ports) before anything
    /// was sent: nothing is known about the device; the event goes back to its lane.
    #[error("{0}: {1}")]
    Resource(String, String),
}

impl SessionError {
    /// A connect's I/O error: a resource this host ran short of, or the device's (or the
    /// network's) refusal.
    pub fn connect(label: &str, error: &std::io::Error) -> SessionError {
        if resource::exhausted(error) {
            SessionError::Resource(
                label.to_string(),
                resource::describe("cannot connect", error),
            )
        } else {
            SessionError::Connect(label.to_string(), error.to_string())
        }
    }
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
    /// Nothing reached the device (connection refused or timed out, login rejected, no
    /// RADIUS answer): retried like `Retry`, and counted by the NAS's circuit breaker.
    Unreachable(String),
    /// Nothing was attempted: the run never got to the device because nasd itself gave
    /// up waiting (the session pool was closed while the run queued for a free session,
    /// e.g. new NAS settings or a shutdown). The event goes back to its lane with the
    /// attempt not counted, and the circuit breaker does not see it.
    Requeue(String),
}

impl Verdict {
    /// The reason of a verdict that is not `Done`.
    pub fn reason(&self) -> Option<&str> {
        match self {
            Verdict::Done => None,
            Verdict::Retry(why)
            | Verdict::Failed(why)
            | Verdict::Unreachable(why)
            | Verdict::Requeue(why) => Some(why),
        }
    }
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

/// Secrets shorter than this are not masked: replacing every `1` or `ab` would garble
/// the text, and such a value protects nothing.
pub const MIN_MASKED_SECRET: usize = 4;

/// `text` with each of `secrets` (of at least [`MIN_MASKED_SECRET`] characters)
/// replaced by `***`, longest first so a secret inside another is not half-masked.
pub fn mask_secrets(text: &str, secrets: &[&str]) -> String {
    let mut secrets: Vec<&str> = secrets
        .iter()
        .copied()
        .filter(|s| s.chars().count() >= MIN_MASKED_SECRET)
        .collect();
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    let mut text = text.to_string();
    for secret in secrets {
        if text.contains(secret) {
            text = text.replace(secret, "***");
        }
    }
    text
}

impl Reply {
    /// The reply with `secrets` (the NAS's password and RADIUS secret) masked as `***`
    /// in the commands, the answer and the verdict's reason. A template that puts a
    /// password into a command, a script that prints its environment or a device that
    /// echoes a secret would otherwise carry it into the logs, the history and the API.
    /// The verdict was judged before, on the real text.
    pub fn redacted(self, secrets: &[Option<&Secret>]) -> Reply {
        let secrets: Vec<&str> = secrets.iter().flatten().map(|s| s.expose()).collect();
        if secrets
            .iter()
            .all(|s| s.chars().count() < MIN_MASKED_SECRET)
        {
            // Nothing would be masked: keep the reply without copying it (the send path).
            return self;
        }
        let mask = |text: &str| mask_secrets(text, &secrets);
        Reply {
            commands: self.commands.iter().map(|c| mask(c)).collect(),
            answer: mask(&self.answer),
            verdict: match &self.verdict {
                Verdict::Done => Verdict::Done,
                Verdict::Retry(why) => Verdict::Retry(mask(why)),
                Verdict::Failed(why) => Verdict::Failed(mask(why)),
                Verdict::Unreachable(why) => Verdict::Unreachable(mask(why)),
                Verdict::Requeue(why) => Verdict::Requeue(mask(why)),
            },
        }
    }
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
    fn secrets_are_masked_in_commands_answers_and_reasons() {
        let password = Secret::new("S3cr3t-pw");
        let secret = Secret::new("S3cr3t-pw-and-more");
        let short = Secret::new("ab");
        let reply = Reply {
            commands: vec!["/user set password=S3cr3t-pw".into(), "x ab".into()],
            answer: "echo S3cr3t-pw-and-more and S3cr3t-pw".into(),
            verdict: Verdict::Failed("exit 1: S3cr3t-pw".into()),
        };
        let masked = reply.redacted(&[Some(&password), None, Some(&secret), Some(&short)]);
        assert_eq!(
            masked,
            Reply {
                commands: vec!["/user set password=***".into(), "x ab".into()],
                answer: "echo *** and ***".into(),
                verdict: Verdict::Failed("exit 1: ***".into()),
            }
        );
        assert_eq!(
            mask_secrets("no secret here", &["S3cr3t"]),
            "no secret here"
        );
        assert_eq!(mask_secrets("", &[""]), "");
    }

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
