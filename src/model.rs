//! The domain types every layer shares: a NAS, an event on its way (compact, expanded,
//! on the stack), its final outcome, the variables templates see, and `Secret`.
//!
//! Plain data with no I/O, so `store`, `scheme`, `transport` and `dispatch` can all use
//! them without importing each other.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::Serialize;

/// The variables of one event (subscriber, NAS, speed, ...), as the templates see them.
pub type Vars = serde_json::Map<String, serde_json::Value>;

/// A password or shared secret: printed as `***` by `Debug` so it cannot leak into logs.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }
    /// The plain value, for the one place that must send it to a device.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// One row of the `nas` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nas {
    pub id: i64,
    pub name: String,
    pub ip: String,
    pub scheme: Option<String>,
    pub script_name: Option<String>,
    pub n_workers: i32,
    pub protocol: Option<String>,
    pub port: Option<i32>,
    pub login: Option<String>,
    pub password: Option<Secret>,
    pub secret: Option<Secret>,
    pub max_sessions: i32,
    pub enabled: bool,
    /// SSH: `strict` (key must be in nasd's known_hosts) or `accept-new` (learn once,
    /// refuse a change). A pinned `host_key` overrides both.
    pub host_key_policy: String,
    /// SSH: pinned host key fingerprint, `SHA256:...` as `ssh-keygen -lf` prints it.
    pub host_key: Option<String>,
    /// SSH: also offer legacy key exchange and ciphers (old Cisco IOS, old RouterOS).
    pub legacy_crypto: bool,
    /// Paused by an operator (console): the NAS keeps its queue but is sent nothing.
    pub paused: bool,
}

impl Nas {
    /// A NAS with defaults for everything but identity and how it is reached.
    pub fn new(id: i64, name: &str, ip: &str) -> Nas {
        Nas {
            id,
            name: name.to_string(),
            ip: ip.to_string(),
            scheme: None,
            script_name: None,
            n_workers: 4,
            protocol: None,
            port: None,
            login: None,
            password: None,
            secret: None,
            max_sessions: 4,
            enabled: true,
            host_key_policy: "strict".to_string(),
            host_key: None,
            legacy_crypto: false,
            paused: false,
        }
    }

    /// Checks what the database constraints also check, with messages an operator can act on.
    pub fn validate(&self) -> Result<(), String> {
        if self.name.trim().is_empty() {
            return Err(format!("nas {}: name is empty", self.id));
        }
        if self.ip.trim().is_empty() {
            return Err(format!("nas {}: ip is empty", self.id));
        }
        if self.scheme.is_none() && self.script_name.is_none() {
            return Err(format!("nas {}: needs --scheme or --script", self.id));
        }
        if !(1..=100).contains(&self.n_workers) {
            return Err(format!(
                "nas {}: workers must be 1..100, got {}",
                self.id, self.n_workers
            ));
        }
        if !(1..=100).contains(&self.max_sessions) {
            return Err(format!(
                "nas {}: max_sessions must be 1..100, got {}",
                self.id, self.max_sessions
            ));
        }
        if let Some(port) = self.port
            && !(1..=65535).contains(&port)
        {
            return Err(format!(
                "nas {}: port must be 1..65535, got {port}",
                self.id
            ));
        }
        Ok(())
    }
}

/// What a billing service appends to `events_stack_compact`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct CompactEvent {
    pub cmd: String,
    pub user_id: i64,
    pub abonent_id: Option<i64>,
    pub nas_ip: Option<String>,
    pub usluga_id: Option<i64>,
    pub acct_session_id: Option<String>,
}

/// An event ready for the main stack, produced by expansion.
#[derive(Debug, Clone)]
pub struct NewStackEvent {
    pub compact_id: Option<i64>,
    pub enqueued_at: DateTime<Utc>,
    pub cmd: String,
    pub user_id: i64,
    pub abonent_id: Option<i64>,
    pub nas_id: i64,
    pub usluga_id: Option<i64>,
    pub acct_session_id: Option<String>,
    pub params: Vars,
}

/// A row of `events_stack`.
#[derive(Debug, Clone, Default)]
pub struct StackEvent {
    pub id: i64,
    pub compact_id: Option<i64>,
    pub event_date: DateTime<Utc>,
    pub enqueued_at: DateTime<Utc>,
    pub cmd: String,
    pub user_id: i64,
    pub abonent_id: Option<i64>,
    pub nas_id: i64,
    pub usluga_id: Option<i64>,
    pub acct_session_id: Option<String>,
    pub params: Vars,
    pub try_count: i32,
    pub state: String,
    pub retry_at: Option<DateTime<Utc>>,
    pub claim_token: Option<i64>,
    pub lease_until: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Done,
    Failed,
    /// Never sent: a later queued event of the same account and `[coalesce]` group set
    /// the same state, and only that one was sent.
    Superseded,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Done => "done",
            Outcome::Failed => "failed",
            Outcome::Superseded => "superseded",
        }
    }
}
