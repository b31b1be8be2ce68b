//! The database: one `Store` with a PostgreSQL and an SQLite backend (one file each).
//!
//! Everything SQL lives below this module; nothing here knows a device protocol. The
//! two backends answer the same calls; what differs (placeholders, arrays, time types,
//! locking) stays inside their files.

pub mod postgres;
pub mod sqlite;

use std::collections::HashMap;
use std::fmt;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::scheme::Vars;

/// A database error, with the statement's purpose in the message.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {context}: {source}")]
    Sql {
        context: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error("database: migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database url `{0}` is not supported (expected postgres://... or sqlite://...)")]
    UnsupportedUrl(String),
    #[error("params_query: {0}")]
    ParamsQuery(String),
    #[error("{0}")]
    Invalid(String),
}

pub(crate) trait SqlContext<T> {
    fn ctx(self, context: &'static str) -> Result<T, StoreError>;
}

impl<T> SqlContext<T> for Result<T, sqlx::Error> {
    fn ctx(self, context: &'static str) -> Result<T, StoreError> {
        self.map_err(|source| StoreError::Sql { context, source })
    }
}

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

/// A row of `events_stack_compact`.
#[derive(Debug, Clone)]
pub struct CompactRow {
    pub id: i64,
    pub event: CompactEvent,
    pub created_at: DateTime<Utc>,
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
#[derive(Debug, Clone)]
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
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Done => "done",
            Outcome::Failed => "failed",
        }
    }
}

/// The end of a claimed event: it leaves `events_stack` for `events_history`.
#[derive(Debug, Clone)]
pub struct Finish {
    pub id: i64,
    pub claim_token: i64,
    pub outcome: Outcome,
    pub commands: Vec<String>,
    pub answer: String,
    pub error: Option<String>,
    pub duration_ms: i64,
}

/// A claimed event that goes back to the stack to be tried again later.
#[derive(Debug, Clone)]
pub struct Reschedule {
    pub id: i64,
    pub claim_token: i64,
    pub retry_at: DateTime<Utc>,
    pub error: String,
}

/// What `claim` took: the event id and its try count after the increment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claimed {
    pub id: i64,
    pub try_count: i32,
}

/// What one expansion pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ExpandReport {
    pub expanded: usize,
    pub failed: usize,
    /// NAS ids that received new events, so their owners can be woken.
    pub nas_ids: Vec<i64>,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct StackCount {
    pub compact_total: i64,
    pub stack_total: i64,
    pub by_cmd: Vec<(String, i64)>,
    pub by_nas: Vec<(i64, i64)>,
    pub oldest: Option<DateTime<Utc>>,
}

/// A row of `events_history`.
#[derive(Debug, Clone, Serialize)]
pub struct HistoryRow {
    pub id: i64,
    pub event_id: Option<i64>,
    pub compact_id: Option<i64>,
    pub cmd: String,
    pub user_id: i64,
    pub nas_id: Option<i64>,
    pub outcome: String,
    pub attempts: i32,
    pub commands: Vec<String>,
    pub answer: String,
    pub error: Option<String>,
    pub duration_ms: i64,
    pub enqueued_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
}

/// Pure part of expansion: turns compact rows into stack events or failures with a reason.
///
/// `params` holds the account variables per user id (None: the account is unknown);
/// `nas_by_ip` and `nas_ids` describe the `nas` table.
pub fn plan_expansion(
    rows: &[CompactRow],
    params: &HashMap<i64, Option<Vars>>,
    nas_by_ip: &HashMap<String, i64>,
    nas_ids: &[i64],
) -> (Vec<NewStackEvent>, Vec<(CompactRow, String)>) {
    let mut events = Vec::with_capacity(rows.len());
    let mut failures = Vec::new();
    for row in rows {
        let e = &row.event;
        let Some(Some(account)) = params.get(&e.user_id) else {
            failures.push((
                row.clone(),
                format!("unknown account user_id={}", e.user_id),
            ));
            continue;
        };
        let nas_id = match e.nas_ip.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
            Some(ip) => match nas_by_ip.get(ip) {
                Some(id) => *id,
                None => {
                    failures.push((row.clone(), format!("unknown nas_ip {ip}")));
                    continue;
                }
            },
            None => match account.get("nas_id").and_then(value_as_i64) {
                Some(id) if nas_ids.contains(&id) => id,
                Some(id) => {
                    failures.push((
                        row.clone(),
                        format!("account user_id={} names unknown nas_id {id}", e.user_id),
                    ));
                    continue;
                }
                None => {
                    failures.push((
                        row.clone(),
                        format!(
                            "cannot resolve the NAS: no nas_ip in the event and no nas_id in the params of user_id={}",
                            e.user_id
                        ),
                    ));
                    continue;
                }
            },
        };
        let mut vars = account.clone();
        vars.insert("user_id".into(), e.user_id.into());
        let abonent_id = e
            .abonent_id
            .or_else(|| account.get("abonent_id").and_then(value_as_i64));
        if let Some(a) = abonent_id {
            vars.insert("abonent_id".into(), a.into());
        }
        if let Some(u) = e.usluga_id {
            vars.insert("usluga_id".into(), u.into());
        }
        if let Some(s) = &e.acct_session_id {
            vars.insert("acct_session_id".into(), s.clone().into());
        }
        events.push(NewStackEvent {
            compact_id: Some(row.id),
            enqueued_at: row.created_at,
            cmd: e.cmd.clone(),
            user_id: e.user_id,
            abonent_id,
            nas_id,
            usluga_id: e.usluga_id,
            acct_session_id: e.acct_session_id.clone(),
            params: vars,
        });
    }
    (events, failures)
}

fn value_as_i64(v: &serde_json::Value) -> Option<i64> {
    match v {
        serde_json::Value::Number(n) => n.as_i64(),
        serde_json::Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// Columns of the reference `accounts` table that CSV import writes directly; any other
/// column goes into `extra` (a JSON object merged into the variables).
pub const ACCOUNT_COLUMNS: &[&str] = &[
    "user_id",
    "abonent_id",
    "nas_id",
    "login",
    "ip",
    "mac",
    "vlan",
    "auth_type",
    "snat_ip",
    "rate_in",
    "rate_out",
    "ceil_in",
    "ceil_out",
    "burst_in",
    "burst_out",
];
const INTEGER_ACCOUNT_COLUMNS: &[&str] = &[
    "user_id",
    "abonent_id",
    "nas_id",
    "vlan",
    "rate_in",
    "rate_out",
    "ceil_in",
    "ceil_out",
    "burst_in",
    "burst_out",
];

/// One account for import: known columns as typed values, the rest in `extra`.
#[derive(Debug, Clone, Default)]
pub struct AccountRecord {
    pub ints: HashMap<&'static str, Option<i64>>,
    pub texts: HashMap<&'static str, Option<String>>,
    pub extra: Vars,
}

impl AccountRecord {
    /// Builds a record from CSV header names and one line's values; errors name the column.
    pub fn from_fields(headers: &[String], values: &[String]) -> Result<AccountRecord, String> {
        let mut rec = AccountRecord::default();
        for (name, value) in headers.iter().zip(values) {
            let name = name.trim();
            let value = value.trim();
            if let Some(col) = ACCOUNT_COLUMNS.iter().find(|c| **c == name) {
                if INTEGER_ACCOUNT_COLUMNS.contains(col) {
                    let parsed =
                        if value.is_empty() {
                            None
                        } else {
                            Some(value.parse::<i64>().map_err(|_| {
                                format!("column {name}: `{value}` is not an integer")
                            })?)
                        };
                    rec.ints.insert(col, parsed);
                } else {
                    rec.texts
                        .insert(col, (!value.is_empty()).then(|| value.to_string()));
                }
            } else if !value.is_empty() {
                rec.extra.insert(name.to_string(), value.to_string().into());
            }
        }
        for required in ["user_id", "abonent_id", "nas_id"] {
            if rec.ints.get(required).copied().flatten().is_none() {
                return Err(format!(
                    "column {required} is required and empty or missing"
                ));
            }
        }
        Ok(rec)
    }

    pub fn int(&self, col: &str) -> Option<i64> {
        self.ints.get(col).copied().flatten()
    }
    pub fn text(&self, col: &str) -> Option<String> {
        self.texts.get(col).cloned().flatten()
    }
}

/// The database handle: PostgreSQL or embedded SQLite.
#[derive(Clone)]
pub enum Store {
    Postgres(postgres::PgStore),
    Sqlite(sqlite::SqliteStore),
}

macro_rules! on_backend {
    ($self:expr, $s:ident => $body:expr) => {
        match $self {
            Store::Postgres($s) => $body,
            Store::Sqlite($s) => $body,
        }
    };
}

impl Store {
    /// Connects to `url` (`postgres://...` or `sqlite://path`); an SQLite file is created.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Store, StoreError> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Store::Postgres(
                postgres::PgStore::connect(url, max_connections).await?,
            ))
        } else if url.starts_with("sqlite:") {
            Ok(Store::Sqlite(sqlite::SqliteStore::connect(url).await?))
        } else {
            Err(StoreError::UnsupportedUrl(url.to_string()))
        }
    }

    pub fn backend_name(&self) -> &'static str {
        match self {
            Store::Postgres(_) => "postgres",
            Store::Sqlite(_) => "sqlite",
        }
    }

    pub async fn migrate(&self) -> Result<(), StoreError> {
        on_backend!(self, s => s.migrate().await)
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        on_backend!(self, s => s.ping().await)
    }

    pub async fn nas_list(&self) -> Result<Vec<Nas>, StoreError> {
        on_backend!(self, s => s.nas_list().await)
    }

    pub async fn nas_get(&self, id: i64) -> Result<Option<Nas>, StoreError> {
        Ok(self.nas_list().await?.into_iter().find(|n| n.id == id))
    }

    pub async fn nas_upsert(&self, nas: &Nas) -> Result<(), StoreError> {
        nas.validate().map_err(StoreError::Invalid)?;
        on_backend!(self, s => s.nas_upsert(nas).await)
    }

    /// Removes a NAS; returns whether it existed. Its queued events stay in the stack.
    pub async fn nas_remove(&self, id: i64) -> Result<bool, StoreError> {
        on_backend!(self, s => s.nas_remove(id).await)
    }

    pub async fn accounts_upsert(&self, records: &[AccountRecord]) -> Result<u64, StoreError> {
        on_backend!(self, s => s.accounts_upsert(records).await)
    }

    /// Runs `params_query` for one account: its variables, or None when it returns no row.
    pub async fn account_params(
        &self,
        params_query: &str,
        user_id: i64,
    ) -> Result<Option<Vars>, StoreError> {
        on_backend!(self, s => s.account_params(params_query, user_id).await)
    }

    pub async fn enqueue_compact(&self, events: &[CompactEvent]) -> Result<Vec<i64>, StoreError> {
        on_backend!(self, s => s.enqueue_compact(events).await)
    }

    /// Moves up to `limit` compact rows into the main stack (or history, when they
    /// cannot be expanded) in one transaction.
    pub async fn expand(&self, params_query: &str, limit: i64) -> Result<ExpandReport, StoreError> {
        on_backend!(self, s => s.expand(params_query, limit).await)
    }

    /// Events of one NAS with id > `after_id`, in id order.
    pub async fn load_window(
        &self,
        nas_id: i64,
        after_id: i64,
        limit: i64,
    ) -> Result<Vec<StackEvent>, StoreError> {
        on_backend!(self, s => s.load_window(nas_id, after_id, limit).await)
    }

    /// Marks events running under `claim_token` until `lease_until`, if they are ready or
    /// their lease has expired. Returns what was taken.
    pub async fn claim(
        &self,
        ids: &[i64],
        claim_token: i64,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
    ) -> Result<Vec<Claimed>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        on_backend!(self, s => s.claim(ids, claim_token, now, lease_until).await)
    }

    /// Records results in one transaction, fenced by claim token. Returns the ids applied
    /// (an id missing from the answer was not ours any more: its claim went stale).
    pub async fn complete(
        &self,
        finishes: &[Finish],
        reschedules: &[Reschedule],
        now: DateTime<Utc>,
    ) -> Result<Vec<i64>, StoreError> {
        if finishes.is_empty() && reschedules.is_empty() {
            return Ok(Vec::new());
        }
        on_backend!(self, s => s.complete(finishes, reschedules, now).await)
    }

    /// Extends the lease of events still held under these claim tokens.
    pub async fn extend_leases(
        &self,
        ids: &[i64],
        lease_until: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        on_backend!(self, s => s.extend_leases(ids, lease_until).await)
    }

    /// Puts claimed events back to ready (shutdown), keeping their try count.
    pub async fn release(&self, ids: &[(i64, i64)]) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        on_backend!(self, s => s.release(ids).await)
    }

    pub async fn stack_count(&self) -> Result<StackCount, StoreError> {
        on_backend!(self, s => s.stack_count().await)
    }

    pub async fn history(
        &self,
        user_id: Option<i64>,
        limit: i64,
    ) -> Result<Vec<HistoryRow>, StoreError> {
        on_backend!(self, s => s.history(user_id, limit).await)
    }

    pub async fn history_counts(&self) -> Result<(i64, i64), StoreError> {
        on_backend!(self, s => s.history_counts().await)
    }

    /// Enqueue-to-done latencies in milliseconds of every finished event, for benchmarks.
    pub async fn latencies_ms(&self) -> Result<Vec<f64>, StoreError> {
        on_backend!(self, s => s.latencies_ms().await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compact(id: i64, user_id: i64, nas_ip: Option<&str>) -> CompactRow {
        CompactRow {
            id,
            event: CompactEvent {
                cmd: "user_add".into(),
                user_id,
                nas_ip: nas_ip.map(str::to_string),
                ..Default::default()
            },
            created_at: Utc::now(),
        }
    }

    #[test]
    fn expansion_resolves_nas_and_reports_failures() {
        let mut params = HashMap::new();
        let mut a1 = Vars::new();
        a1.insert("nas_id".into(), 1.into());
        a1.insert("abonent_id".into(), 10.into());
        a1.insert("ip".into(), "10.0.0.1".into());
        params.insert(1, Some(a1));
        let mut a2 = Vars::new();
        a2.insert("nas_id".into(), 99.into());
        params.insert(2, Some(a2));
        params.insert(3, None);
        params.insert(4, Some(Vars::new()));
        let nas_by_ip: HashMap<String, i64> = [("10.9.9.1".to_string(), 1)].into();
        let rows = vec![
            compact(1, 1, None),
            compact(2, 1, Some("10.9.9.1")),
            compact(3, 1, Some("10.9.9.2")),
            compact(4, 2, None),
            compact(5, 3, None),
            compact(6, 4, None),
        ];
        let (events, failures) = plan_expansion(&rows, &params, &nas_by_ip, &[1]);
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].nas_id, 1);
        assert_eq!(events[0].abonent_id, Some(10));
        assert_eq!(events[0].params["ip"], "10.0.0.1");
        assert_eq!(events[0].params["user_id"], 1);
        let reasons: Vec<(i64, &str)> = failures
            .iter()
            .map(|(r, why)| (r.id, why.as_str()))
            .collect();
        assert_eq!(
            reasons,
            vec![
                (3, "unknown nas_ip 10.9.9.2"),
                (4, "account user_id=2 names unknown nas_id 99"),
                (5, "unknown account user_id=3"),
                (
                    6,
                    "cannot resolve the NAS: no nas_ip in the event and no nas_id in the params of user_id=4"
                ),
            ]
        );
    }

    #[test]
    fn account_record_from_csv_fields() {
        let headers: Vec<String> = ["user_id", "abonent_id", "nas_id", "ip", "rate_in", "tariff"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let row = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let rec =
            AccountRecord::from_fields(&headers, &row(&["1", "2", "3", "10.0.0.1", "", "gold"]))
                .unwrap();
        assert_eq!(rec.int("user_id"), Some(1));
        assert_eq!(rec.int("rate_in"), None);
        assert_eq!(rec.text("ip").as_deref(), Some("10.0.0.1"));
        assert_eq!(rec.extra["tariff"], "gold");
        let err =
            AccountRecord::from_fields(&headers, &row(&["x", "2", "3", "", "", ""])).unwrap_err();
        assert_eq!(err, "column user_id: `x` is not an integer");
        let err =
            AccountRecord::from_fields(&headers, &row(&["1", "", "3", "", "", ""])).unwrap_err();
        assert_eq!(err, "column abonent_id is required and empty or missing");
    }

    #[test]
    fn secret_debug_is_redacted() {
        assert_eq!(format!("{:?}", Secret::new("hunter2")), "***");
    }
}
