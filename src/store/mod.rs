//! The database: one `Store` with a PostgreSQL and an SQLite backend (one file each).
//!
//! Everything SQL lives below this module; nothing here knows a device protocol. The
//! two backends answer the same calls; what differs (placeholders, arrays, time types,
//! locking) stays inside their files.

pub mod accounts;
pub mod billing;
pub mod cluster;
pub mod console;
pub mod copy;
pub mod postgres;
pub mod sqlite;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use chrono::{DateTime, Utc};
use serde::Serialize;

// The domain types moved to `crate::model`; their old paths keep working.
pub use crate::model::{CompactEvent, Nas, NewStackEvent, Outcome, Secret, StackEvent};

pub use console::{
    AccountHit, AuditEntry, AuditRow, BulkOutcome, EventPage, EventQuery, EventState,
};

use crate::model::Vars;

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

/// A row of `events_stack_compact`.
#[derive(Debug, Clone)]
pub struct CompactRow {
    pub id: i64,
    pub event: CompactEvent,
    pub created_at: DateTime<Utc>,
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
    /// The attempt is not counted (the device was unreachable and the breaker holds
    /// attempts): the try count goes back down by one.
    pub refund: bool,
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
    /// PostgreSQL: the server process that sent the `nasd_stack` notification of this
    /// expansion (the expander ignores its own notifications).
    pub notified_by: Option<i32>,
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

/// Where an event is now and what happened to it, as the API reports it. `id` is the
/// id the event got when it was enqueued (`events_stack_compact.id`); it stays the
/// event's name through the main stack (`compact_id`) and history.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct EventStatus {
    pub id: i64,
    /// `queued`, `running`, `retrying`, `done` or `failed`.
    pub state: String,
    /// The table it is in: `compact`, `stack` or `history`.
    pub stage: String,
    /// Its id in `events_stack` (and `events_history.event_id`) once expanded.
    pub stack_id: Option<i64>,
    pub cmd: String,
    pub user_id: i64,
    pub abonent_id: Option<i64>,
    pub nas_id: Option<i64>,
    pub nas_ip: Option<String>,
    pub usluga_id: Option<i64>,
    pub acct_session_id: Option<String>,
    pub enqueued_at: DateTime<Utc>,
    /// Attempts made so far.
    pub try_count: i32,
    /// For `retrying`: when the next attempt is due.
    pub next_try_at: Option<DateTime<Utc>>,
    /// The reason of the last retry (stack) or of the failure (history).
    pub error: Option<String>,
    /// Commands sent by the last attempt, exactly as sent (history only).
    pub commands: Vec<String>,
    /// The device's answer to the last attempt (history only).
    pub answer: Option<String>,
    pub finished_at: Option<DateTime<Utc>>,
    pub duration_ms: Option<i64>,
    /// The variables the event was expanded with (none before expansion); values of
    /// keys that look like secrets (`password`, `secret`, `psw`, `key`) shown as `••••`.
    pub params: Option<Vars>,
}

/// An event's variables as operators are shown them: secret-looking keys masked.
pub fn visible_params(params: &Vars) -> Vars {
    params
        .iter()
        .map(|(k, v)| {
            let key = k.to_ascii_lowercase();
            let secret = ["pass", "secret", "psw", "key", "token"]
                .iter()
                .any(|s| key.contains(s));
            let v = if secret && !v.is_null() {
                serde_json::Value::String("••••".into())
            } else {
                v.clone()
            };
            (k.clone(), v)
        })
        .collect()
}

impl EventStatus {
    /// A row still in `events_stack_compact`: queued, not yet expanded.
    pub fn from_compact(row: &CompactRow) -> EventStatus {
        let e = &row.event;
        EventStatus {
            id: row.id,
            state: "queued".into(),
            stage: "compact".into(),
            stack_id: None,
            cmd: e.cmd.clone(),
            user_id: e.user_id,
            abonent_id: e.abonent_id,
            nas_id: None,
            nas_ip: e.nas_ip.clone(),
            usluga_id: e.usluga_id,
            acct_session_id: e.acct_session_id.clone(),
            enqueued_at: row.created_at,
            try_count: 0,
            next_try_at: None,
            error: None,
            commands: Vec::new(),
            answer: None,
            finished_at: None,
            duration_ms: None,
            params: None,
        }
    }

    /// A row of `events_stack` (with its NAS's ip when the NAS still exists).
    pub fn from_stack(e: &StackEvent, nas_ip: Option<String>) -> EventStatus {
        let state = if e.state == "running" {
            "running"
        } else if e.try_count > 0 {
            "retrying"
        } else {
            "queued"
        };
        EventStatus {
            id: e.compact_id.unwrap_or_default(),
            state: state.into(),
            stage: "stack".into(),
            stack_id: Some(e.id),
            cmd: e.cmd.clone(),
            user_id: e.user_id,
            abonent_id: e.abonent_id,
            nas_id: Some(e.nas_id),
            nas_ip,
            usluga_id: e.usluga_id,
            acct_session_id: e.acct_session_id.clone(),
            enqueued_at: e.enqueued_at,
            try_count: e.try_count,
            next_try_at: if state == "retrying" {
                e.retry_at
            } else {
                None
            },
            error: e.last_error.clone(),
            commands: Vec::new(),
            answer: None,
            finished_at: None,
            duration_ms: None,
            params: Some(visible_params(&e.params)),
        }
    }
}

/// What `Store::retry_event` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RetryOutcome {
    /// A copy went to `events_stack_compact` under this new id.
    Enqueued(i64),
    NotFound,
    /// Only failed events can be retried; this is the event's state.
    NotFailed(String),
    /// The event's NAS was removed since.
    NasGone(i64),
}

/// What `Store::cancel_event` did.
#[derive(Debug, Clone, PartialEq)]
pub enum CancelOutcome {
    /// Moved to `events_history` as failed with `CANCELLED`.
    Cancelled(Box<EventStatus>),
    NotFound,
    /// Running or finished events cannot be cancelled; this is the event's state.
    NotCancellable(String),
}

/// The error a cancelled event carries in `events_history`.
pub const CANCELLED: &str = "cancelled by operator";

/// Queue depth of one NAS in `events_stack`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NasQueue {
    pub nas_id: i64,
    pub depth: i64,
    pub oldest: Option<DateTime<Utc>>,
}

/// Connection pool figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PoolFigures {
    pub size: u32,
    pub idle: u32,
    pub max: u32,
}

/// A value to compare a column with in `Filter`.
#[derive(Debug, Clone, PartialEq)]
pub enum FilterValue {
    Int(i64),
    Text(String),
    Null,
}

/// Equality conditions on whitelisted columns, an order and a limit: what the
/// billing-compatible `objects.filter`/`objects.get` need.
#[derive(Debug, Clone, PartialEq)]
pub struct Filter {
    pub conds: Vec<(&'static str, FilterValue)>,
    /// Column to order by (one of the table's filterable columns), descending when set.
    pub order_by: &'static str,
    pub descending: bool,
    pub limit: i64,
}

impl Filter {
    /// The `WHERE ... ORDER BY ... LIMIT` tail, columns prefixed with `prefix` (a table
    /// alias such as `s.`), placeholders numbered from 1 by `ph`; NULL conditions become `IS NULL` and take no placeholder. Values are bound
    /// in `binds()` order.
    pub fn sql_tail(&self, prefix: &str, ph: impl Fn(usize) -> String) -> String {
        let mut n = 0;
        let mut parts = Vec::new();
        for (col, v) in &self.conds {
            if *v == FilterValue::Null {
                parts.push(format!("{prefix}{col} IS NULL"));
            } else {
                n += 1;
                parts.push(format!("{prefix}{col} = {}", ph(n)));
            }
        }
        let where_ = if parts.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", parts.join(" AND "))
        };
        format!(
            "{where_} ORDER BY {prefix}{} {} LIMIT {}",
            self.order_by,
            if self.descending { "DESC" } else { "ASC" },
            self.limit.max(0)
        )
    }

    pub fn binds(&self) -> impl Iterator<Item = &FilterValue> {
        self.conds
            .iter()
            .map(|(_, v)| v)
            .filter(|v| **v != FilterValue::Null)
    }
}

/// Columns of `events_stack_compact` that `Filter` may name.
pub const COMPACT_FILTER_COLUMNS: &[&str] = &[
    "id",
    "cmd",
    "user_id",
    "abonent_id",
    "nas_ip",
    "usluga_id",
    "acct_session_id",
];
/// Columns of `events_stack` that `Filter` may name.
pub const STACK_FILTER_COLUMNS: &[&str] = &[
    "id",
    "compact_id",
    "cmd",
    "user_id",
    "abonent_id",
    "nas_id",
    "usluga_id",
    "acct_session_id",
    "try_count",
    "state",
];

/// Where an expansion takes the account variables from.
#[derive(Debug, Clone, Copy)]
pub enum ParamsFrom<'a> {
    /// `[database] params_query`, run on nasd's own database inside the expansion.
    Query(&'a str),
    /// Looked up beforehand (in the billing database, `[billing]`) for the users of the
    /// compact rows up to id `up_to` (see `Store::compact_users`); None: no row.
    Given {
        params: &'a HashMap<i64, Option<Vars>>,
        up_to: i64,
    },
}

impl ParamsFrom<'_> {
    /// The highest compact id this expansion may take.
    pub(crate) fn up_to(&self) -> i64 {
        match self {
            ParamsFrom::Query(_) => i64::MAX,
            ParamsFrom::Given { up_to, .. } => *up_to,
        }
    }
}

/// How many of `rows` (in id order) have their variables looked up in `params`: an
/// expansion with variables given beforehand stops at the first row whose user was not
/// looked up (a row committed after the look-up with a lower id), which waits for the
/// next round, so the main stack keeps compact-id order. Pure.
pub fn looked_up_prefix(rows: &[CompactRow], params: &HashMap<i64, Option<Vars>>) -> usize {
    rows.iter()
        .position(|r| !params.contains_key(&r.event.user_id))
        .unwrap_or(rows.len())
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

/// The number of calls a backend served, shared by its clones.
#[derive(Clone, Default)]
pub(crate) struct CallCounter(Arc<AtomicU64>);

impl CallCounter {
    fn count(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

macro_rules! on_backend {
    ($self:expr, $s:ident => $body:expr) => {
        match $self {
            Store::Postgres($s) => {
                $s.calls.count();
                $body
            }
            Store::Sqlite($s) => {
                $s.calls.count();
                $body
            }
        }
    };
}

/// A cluster call: PostgreSQL only (SQLite is one daemon and has no cluster tables).
macro_rules! on_cluster {
    ($self:expr, $s:ident => $body:expr) => {
        match $self {
            Store::Postgres($s) => {
                $s.calls.count();
                $body
            }
            Store::Sqlite(_) => Err(StoreError::Invalid(
                "several daemons need PostgreSQL: SQLite serves one daemon".into(),
            )),
        }
    };
}

/// How `Store::connect_with` connects: the pool size and, on PostgreSQL, what a
/// connection pooler in front of the server may need (`[database]` keys).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectOptions {
    /// PostgreSQL pool size (SQLite uses one connection).
    pub max_connections: u32,
    /// PostgreSQL: keep sqlx's per-connection cache of prepared statements
    /// (`[database] statement_cache`). `false` is the pooled mode for a transaction
    /// pooler: no cache, every statement unnamed, each call in a transaction of its own,
    /// no LISTEN (see `postgres::Session`).
    pub statement_cache: bool,
}

impl ConnectOptions {
    /// `max_connections` with the defaults of everything else (the statement cache on).
    pub fn new(max_connections: u32) -> ConnectOptions {
        ConnectOptions {
            max_connections,
            statement_cache: true,
        }
    }
}

/// Why a connection to the database could not be opened, in a few words and once (the
/// text of `sqlx::Error` repeats its source's, and never names the url, so no password
/// can show): `connection refused`, the server's own message
/// (`database "x" does not exist`), or the I/O error.
pub(crate) fn connect_cause(e: &sqlx::Error) -> String {
    use std::io::ErrorKind;
    match e {
        sqlx::Error::Io(io) => match io.kind() {
            ErrorKind::ConnectionRefused => "connection refused".into(),
            ErrorKind::TimedOut => "connection timed out".into(),
            ErrorKind::HostUnreachable => "host unreachable".into(),
            ErrorKind::NetworkUnreachable => "network unreachable".into(),
            ErrorKind::ConnectionReset => "connection reset by the server".into(),
            ErrorKind::NotFound => "no such file or directory".into(),
            ErrorKind::PermissionDenied => "permission denied".into(),
            _ => io.to_string(),
        },
        sqlx::Error::Database(db) => db.message().to_string(),
        sqlx::Error::Tls(tls) => format!("TLS: {tls}"),
        sqlx::Error::Configuration(why) => why.to_string(),
        sqlx::Error::PoolTimedOut => "no connection within the timeout".into(),
        other => other.to_string(),
    }
}

impl Store {
    /// Connects to `url` (`postgres://...` or `sqlite://path`); an SQLite file is created
    /// (and its directory, when only that one level is missing).
    pub async fn connect(url: &str, max_connections: u32) -> Result<Store, StoreError> {
        Store::connect_with(url, &ConnectOptions::new(max_connections)).await
    }

    /// `connect` with every option (`[database]` keys beside the url).
    pub async fn connect_with(url: &str, options: &ConnectOptions) -> Result<Store, StoreError> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Store::Postgres(
                postgres::PgStore::connect_with(url, options).await?,
            ))
        } else if url.starts_with("sqlite:") {
            Ok(Store::Sqlite(sqlite::SqliteStore::connect(url).await?))
        } else {
            Err(StoreError::UnsupportedUrl(url.to_string()))
        }
    }

    /// Calls made to the database through this store (and its clones) so far: each is
    /// one statement or one transaction. Benchmarks print it per second.
    pub fn calls(&self) -> u64 {
        match self {
            Store::Postgres(s) => s.calls.get(),
            Store::Sqlite(s) => s.calls.get(),
        }
    }

    /// Per NAS, the highest event id above `after_id`: the daemon-wide safety net that
    /// finds events no wake-up announced.
    pub async fn stack_heads_after(&self, after_id: i64) -> Result<Vec<(i64, i64)>, StoreError> {
        on_backend!(self, s => s.stack_heads_after(after_id).await)
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

    /// The migrations of this backend not applied yet (`version description`), without
    /// applying them.
    pub async fn pending_migrations(&self) -> Result<Vec<String>, StoreError> {
        let (migrator, applied) = match self {
            Store::Postgres(s) => (
                sqlx::migrate!("migrations/postgres"),
                sqlx::query_scalar::<_, i64>("SELECT version FROM _sqlx_migrations WHERE success")
                    .fetch_all(s.pool())
                    .await,
            ),
            Store::Sqlite(s) => (
                sqlx::migrate!("migrations/sqlite"),
                sqlx::query_scalar::<_, i64>("SELECT version FROM _sqlx_migrations WHERE success")
                    .fetch_all(s.pool())
                    .await,
            ),
        };
        // A database never migrated has no such table: everything is pending.
        let applied = match applied {
            Ok(versions) => versions,
            Err(sqlx::Error::Database(e))
                if e.code().as_deref() == Some("42P01")
                    || e.message().contains("no such table") =>
            {
                Vec::new()
            }
            Err(e) => return Err(e).ctx("read the applied migrations"),
        };
        Ok(migrator
            .iter()
            .filter(|m| !applied.contains(&m.version))
            .map(|m| format!("{} {}", m.version, m.description))
            .collect())
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
        on_backend!(self, s => s.expand(ParamsFrom::Query(params_query), limit).await)
    }

    /// `expand` with the variables looked up beforehand (`[billing]`): `params` for the
    /// users of the compact rows up to id `up_to` (`Store::compact_users`).
    pub async fn expand_given(
        &self,
        params: &HashMap<i64, Option<Vars>>,
        up_to: i64,
        limit: i64,
    ) -> Result<ExpandReport, StoreError> {
        on_backend!(self, s => s.expand(ParamsFrom::Given { params, up_to }, limit).await)
    }

    /// For each `(nas_id, after_id, limit)`: up to `limit` events of that NAS with id >
    /// `after_id`; in id order (so each NAS's events are in id order too). One call may
    /// serve the windows of many owners.
    pub async fn load_windows(
        &self,
        windows: &[(i64, i64, i64)],
    ) -> Result<Vec<StackEvent>, StoreError> {
        if windows.is_empty() {
            return Ok(Vec::new());
        }
        on_backend!(self, s => s.load_windows(windows).await)
    }

    /// Marks each `(id, claim token, epoch)` running under its own token until
    /// `lease_until`, if it is ready or its lease has expired. Returns what was taken.
    /// One call may carry the claims of many owners (each row fenced by its own token).
    /// On PostgreSQL a row is taken only while its NAS is owned under that epoch by a
    /// daemon whose lease is current (epoch 0: no ownership check, for a daemon outside
    /// any cluster); SQLite is one daemon and ignores the epoch.
    pub async fn claim(
        &self,
        claims: &[(i64, i64, i64)],
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
    ) -> Result<Vec<Claimed>, StoreError> {
        if claims.is_empty() {
            return Ok(Vec::new());
        }
        on_backend!(self, s => s.claim(claims, now, lease_until).await)
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

    /// Extends the lease of each `(id, claim token)` still held; returns the ids
    /// extended. A heartbeat for a stale claim changes nothing.
    pub async fn extend_leases(
        &self,
        claims: &[(i64, i64)],
        lease_until: DateTime<Utc>,
    ) -> Result<Vec<i64>, StoreError> {
        if claims.is_empty() {
            return Ok(Vec::new());
        }
        on_backend!(self, s => s.extend_leases(claims, lease_until).await)
    }

    /// Joins the cluster (PostgreSQL only); see `PgStore::cluster_join`.
    #[allow(clippy::too_many_arguments)]
    pub async fn cluster_join(
        &self,
        id: &str,
        session: i64,
        previous_session: Option<i64>,
        host: &str,
        pid: i32,
        api: Option<&str>,
        lease: std::time::Duration,
    ) -> Result<cluster::Joined, StoreError> {
        on_cluster!(self, s => s.cluster_join(id, session, previous_session, host, pid, api, lease).await)
    }

    /// Renews this daemon's lease and lists the daemons (PostgreSQL only).
    pub async fn cluster_heartbeat(
        &self,
        id: &str,
        session: i64,
        lease: std::time::Duration,
    ) -> Result<cluster::Beat, StoreError> {
        on_cluster!(self, s => s.cluster_heartbeat(id, session, lease).await)
    }

    /// Takes the NAS nobody validly owns (PostgreSQL only).
    pub async fn cluster_take(
        &self,
        id: &str,
        session: i64,
        nas_ids: &[i64],
    ) -> Result<Vec<cluster::Taken>, StoreError> {
        on_cluster!(self, s => s.cluster_take(id, session, nas_ids).await)
    }

    /// Marks daemons whose lease ran out as lost; returns those this call marked.
    pub async fn cluster_mark_lost(&self, ids: &[String]) -> Result<Vec<String>, StoreError> {
        on_cluster!(self, s => s.cluster_mark_lost(ids).await)
    }

    /// Ends the leases of daemons known to be dead (PostgreSQL only).
    pub async fn cluster_expire(&self, ids: &[String]) -> Result<Vec<String>, StoreError> {
        on_cluster!(self, s => s.cluster_expire(ids).await)
    }

    /// Releases NAS this daemon owns (PostgreSQL only).
    pub async fn cluster_release(
        &self,
        id: &str,
        session: i64,
        nas_ids: &[i64],
    ) -> Result<u64, StoreError> {
        on_cluster!(self, s => s.cluster_release(id, session, nas_ids).await)
    }

    /// Sets this daemon's state (`draining`, `left`).
    pub async fn cluster_set_state(
        &self,
        id: &str,
        session: i64,
        state: &str,
    ) -> Result<(), StoreError> {
        on_cluster!(self, s => s.cluster_set_state(id, session, state).await)
    }

    /// The daemons of the cluster (none on SQLite: one daemon, no table).
    pub async fn cluster_members(&self) -> Result<Vec<cluster::Member>, StoreError> {
        match self {
            Store::Postgres(s) => {
                s.calls.count();
                s.cluster_members().await
            }
            Store::Sqlite(_) => Ok(Vec::new()),
        }
    }

    /// The owner of each NAS (none on SQLite, where the one daemon owns every NAS).
    pub async fn nas_owners(&self) -> Result<Vec<cluster::NasOwner>, StoreError> {
        match self {
            Store::Postgres(s) => {
                s.calls.count();
                s.nas_owners().await
            }
            Store::Sqlite(_) => Ok(Vec::new()),
        }
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

    /// Finished events: (not failed: done or superseded, failed). What waits for a
    /// drained stack counts both.
    pub async fn history_counts(&self) -> Result<(i64, i64), StoreError> {
        on_backend!(self, s => s.history_counts().await)
    }

    /// The size of `events_history` without counting it: (rows, bytes). PostgreSQL:
    /// the planner's row estimate (`reltuples`, counted only before the first ANALYZE)
    /// and the table's size with its indexes; SQLite: the span of ids (what is left
    /// after pruning the oldest) and no size (SQLite cannot tell one table's size
    /// without reading all of it).
    pub async fn history_size(&self) -> Result<(i64, Option<i64>), StoreError> {
        on_backend!(self, s => s.history_size().await)
    }

    /// Deletes, among the `batch` lowest ids of `events_history` from `from` on, those
    /// finished before `cutoff`, in one short statement; returns how many and where the
    /// round's next statement starts (a round starts at 0). Fewer than `batch` means
    /// the old end of the table is done (ids follow completion order, so the pruner
    /// never scans past the rows it keeps).
    pub async fn prune_history(
        &self,
        cutoff: DateTime<Utc>,
        batch: i64,
        from: i64,
    ) -> Result<PruneStep, StoreError> {
        on_backend!(self, s => s.prune_history(cutoff, batch, from).await)
    }

    /// Where the event enqueued under `id` (a compact id) is now. Looks in the order
    /// events move (compact, stack, history), so a move in between is never missed.
    pub async fn event_status(&self, id: i64) -> Result<Option<EventStatus>, StoreError> {
        on_backend!(self, s => s.event_status(id).await)
    }

    /// An account's events: those still queued or running, and the last `limit`
    /// finished ones; newest first.
    pub async fn account_events(
        &self,
        user_id: i64,
        limit: i64,
    ) -> Result<Vec<EventStatus>, StoreError> {
        let mut all = on_backend!(self, s => s.account_events(user_id, limit).await)?;
        all.sort_by_key(|e| std::cmp::Reverse(e.id));
        Ok(all)
    }

    /// Enqueues a copy of a failed event into `events_stack_compact` (a new event with a
    /// new id, expanded again: the account's current variables, the same NAS by its
    /// current ip; an event that failed before expansion resolves its NAS again).
    pub async fn retry_event(&self, id: i64) -> Result<RetryOutcome, StoreError> {
        let Some(st) = self.event_status(id).await? else {
            return Ok(RetryOutcome::NotFound);
        };
        if st.state != "failed" {
            return Ok(RetryOutcome::NotFailed(st.state));
        }
        if let (Some(nas_id), None) = (st.nas_id, &st.nas_ip) {
            return Ok(RetryOutcome::NasGone(nas_id));
        }
        let ids = self
            .enqueue_compact(&[CompactEvent {
                cmd: st.cmd,
                user_id: st.user_id,
                abonent_id: st.abonent_id,
                nas_ip: st.nas_ip,
                usluga_id: st.usluga_id,
                acct_session_id: st.acct_session_id,
            }])
            .await?;
        Ok(ids
            .first()
            .map_or(RetryOutcome::NotFound, |id| RetryOutcome::Enqueued(*id)))
    }

    /// Cancels a queued (or retrying) event that is not running: it moves to
    /// `events_history` as `failed` with the error `cancelled by operator`, in one
    /// transaction that only matches it while it is not claimed.
    pub async fn cancel_event(&self, id: i64) -> Result<CancelOutcome, StoreError> {
        let moved = on_backend!(self, s => s.cancel_event(id, Utc::now()).await)?;
        let status = self.event_status(id).await?;
        Ok(match (moved, status) {
            (true, Some(st)) => CancelOutcome::Cancelled(Box::new(st)),
            (_, None) => CancelOutcome::NotFound,
            (false, Some(st)) => CancelOutcome::NotCancellable(st.state),
        })
    }

    /// Rows of `events_stack_compact` matching `filter` (columns of `COMPACT_FILTER_COLUMNS`).
    pub async fn compact_filter(&self, filter: &Filter) -> Result<Vec<CompactRow>, StoreError> {
        on_backend!(self, s => s.compact_filter(filter).await)
    }

    /// Rows of `events_stack` matching `filter` (columns of `STACK_FILTER_COLUMNS`).
    pub async fn stack_filter(&self, filter: &Filter) -> Result<Vec<StackEvent>, StoreError> {
        on_backend!(self, s => s.stack_filter(filter).await)
    }

    /// Depth and oldest event of `events_stack` per NAS.
    pub async fn queue_by_nas(&self) -> Result<Vec<NasQueue>, StoreError> {
        on_backend!(self, s => s.queue_by_nas().await)
    }

    pub fn pool_figures(&self) -> PoolFigures {
        on_backend!(self, s => s.pool_figures())
    }

    /// Enqueue-to-done latencies in milliseconds of every finished event, for benchmarks.
    pub async fn latencies_ms(&self) -> Result<Vec<f64>, StoreError> {
        on_backend!(self, s => s.latencies_ms().await)
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn secret_looking_params_are_masked() {
        let mut p = Vars::new();
        p.insert("login".into(), "user7".into());
        p.insert("pppoe_password".into(), "hunter2".into());
        p.insert("coa_psw".into(), "x".into());
        p.insert("api_key".into(), serde_json::Value::Null);
        p.insert("rate_in".into(), 10240.into());
        let v = visible_params(&p);
        assert_eq!(v["login"], "user7");
        assert_eq!(v["pppoe_password"], "••••");
        assert_eq!(v["coa_psw"], "••••");
        assert_eq!(v["api_key"], serde_json::Value::Null);
        assert_eq!(v["rate_in"], 10240);
    }
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

/// One statement of a history pruning round: rows deleted, and the id the round's next
/// statement starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PruneStep {
    pub deleted: u64,
    pub next: i64,
}
