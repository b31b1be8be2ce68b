//! `[billing]`: the billing's own database (MySQL/MariaDB or PostgreSQL), where the
//! account variables are read for each expansion (`params_query`, so a change in the
//! billing is seen by the next event) and, optionally, where new events come from
//! (`source.rs`). nasd's own tables stay in its own database (`store`).
//!
//! - [`Billing`]: the connection pool and the queries; row values are converted by
//!   `types` (pure, table-tested).
//! - [`Health`]: what the expander and the events source report: an outage is logged
//!   once when it starts and once when it ends, named by `/status` while it lasts and
//!   alerted (`billing_down`, `billing_up`). Events wait meanwhile; nothing fails.

pub mod source;
pub mod types;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::mysql::{MySqlConnectOptions, MySqlPool, MySqlPoolOptions, MySqlRow};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{Column, Executor, Row, TypeInfo, ValueRef};

use crate::alerts::{Alert, AlertKind, Alerts};
use crate::config::billing::{BillingConfig, BillingKind, EVENT_COLUMNS};
use crate::journal::Journal;
use crate::model::{CompactEvent, Vars};
use crate::stats::Stats;
use crate::store::billing::SourceRow;
use types::ColumnKind;

/// What went wrong with the billing database; every kind makes events wait.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BillingError {
    /// No connection (refused, timed out, lost): it comes back by itself.
    #[error("billing database unreachable: {0}")]
    Unreachable(String),
    /// The database refused a query (its own message).
    #[error("billing database refused {what}: {message}")]
    Refused { what: &'static str, message: String },
    /// A value nasd cannot use (a column's type, a row of the events source).
    #[error("billing {what}: {message}")]
    Data { what: &'static str, message: String },
}

impl BillingError {
    fn from_sqlx(what: &'static str, e: sqlx::Error) -> BillingError {
        match e {
            sqlx::Error::Database(db) => BillingError::Refused {
                what,
                message: db.message().to_string(),
            },
            sqlx::Error::ColumnDecode { index, source } => BillingError::Data {
                what,
                message: format!("column {index}: {source}"),
            },
            other => BillingError::Unreachable(other.to_string()),
        }
    }

    pub fn is_unreachable(&self) -> bool {
        matches!(self, BillingError::Unreachable(_))
    }
}

#[derive(Clone)]
enum Pool {
    MySql(MySqlPool),
    Postgres(PgPool),
}

/// The billing database and the queries nasd runs there.
#[derive(Clone)]
pub struct Billing {
    pool: Pool,
    cfg: Arc<BillingConfig>,
    /// PostgreSQL: the form of `params_query` for many users in one statement, once
    /// the server accepted it (None inside: refused, run per user).
    batched: Arc<Mutex<Option<Option<String>>>>,
}

impl Billing {
    /// A pool that connects when first used: an unreachable billing database at start
    /// makes events wait, it does not stop the daemon.
    pub fn connect_lazy(cfg: &BillingConfig) -> Result<Billing, BillingError> {
        let bad_url = |e: sqlx::Error| BillingError::Data {
            what: "url",
            message: format!("{}: {e}", cfg.shown_url()),
        };
        let pool = match cfg.kind {
            BillingKind::MySql => {
                let options: MySqlConnectOptions = cfg.url.parse().map_err(bad_url)?;
                Pool::MySql(
                    MySqlPoolOptions::new()
                        .max_connections(cfg.max_connections)
                        .acquire_timeout(cfg.connect_timeout)
                        .connect_lazy_with(options),
                )
            }
            BillingKind::Postgres => {
                let options: PgConnectOptions = cfg.url.parse().map_err(bad_url)?;
                Pool::Postgres(
                    PgPoolOptions::new()
                        .max_connections(cfg.max_connections)
                        .acquire_timeout(cfg.connect_timeout)
                        .connect_lazy_with(options),
                )
            }
        };
        Ok(Billing {
            pool,
            cfg: Arc::new(cfg.clone()),
            batched: Arc::new(Mutex::new(None)),
        })
    }

    pub fn config(&self) -> &BillingConfig {
        &self.cfg
    }

    /// Closes the pool's connections.
    pub async fn close(&self) {
        match &self.pool {
            Pool::MySql(p) => p.close().await,
            Pool::Postgres(p) => p.close().await,
        }
    }

    /// Prepares every configured query on the billing database and checks what it
    /// returns: the database's own message for a wrong query, the column for a type
    /// nasd cannot use or a column the events source needs and lacks. What `nasd check`
    /// and the daemon's start run.
    pub async fn check(&self) -> Result<Vec<String>, BillingError> {
        let kind = self.cfg.kind;
        let mut report = Vec::new();
        let columns = self
            .describe("params_query", &self.cfg.params_query)
            .await?;
        for (name, type_name) in &columns {
            if types::column_kind(kind, type_name).is_none() {
                return Err(BillingError::Data {
                    what: "params_query",
                    message: types::unusable(kind, name, type_name),
                });
            }
        }
        report.push(format!(
            "billing params_query: {} column(s): {}",
            columns.len(),
            columns
                .iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
        // Run once for a user that does not exist: what describing cannot see (a
        // function missing at run time) shows here.
        self.params_one(-1).await?;
        if let Some(events) = &self.cfg.events {
            let query = self.source_query(&events.query, 1);
            let columns = self.describe("events_query", &query).await?;
            let names: Vec<String> = columns
                .iter()
                .map(|(n, _)| n.to_ascii_lowercase())
                .collect();
            for needed in ["id", "cmd", "user_id"] {
                if !names.iter().any(|n| n == needed) {
                    return Err(BillingError::Data {
                        what: "events_query",
                        message: format!(
                            "returns no column {needed} (it needs id, cmd and user_id)"
                        ),
                    });
                }
            }
            for (name, type_name) in &columns {
                if EVENT_COLUMNS.contains(&name.to_ascii_lowercase().as_str())
                    && types::column_kind(kind, type_name).is_none()
                {
                    return Err(BillingError::Data {
                        what: "events_query",
                        message: types::unusable(kind, name, type_name),
                    });
                }
            }
            self.read_events(i64::MAX, 1).await?;
            report.push(format!(
                "billing events_query: columns {}",
                names.join(", ")
            ));
            if let Some(statement) = &events.after_move {
                self.describe("after_move", statement).await?;
                report.push(format!("billing after_move: {statement}"));
            }
        }
        Ok(report)
    }

    /// The columns (name, type) a statement returns, as the server prepares it.
    async fn describe(
        &self,
        what: &'static str,
        sql: &str,
    ) -> Result<Vec<(String, String)>, BillingError> {
        let columns = match &self.pool {
            Pool::MySql(p) => p
                .describe(sql)
                .await
                .map_err(|e| BillingError::from_sqlx(what, e))?
                .columns()
                .iter()
                .map(|c| (c.name().to_string(), c.type_info().name().to_string()))
                .collect(),
            Pool::Postgres(p) => p
                .describe(sql)
                .await
                .map_err(|e| BillingError::from_sqlx(what, e))?
                .columns()
                .iter()
                .map(|c| (c.name().to_string(), c.type_info().name().to_string()))
                .collect(),
        };
        Ok(columns)
    }

    /// One account's variables, or None when `params_query` returns no row.
    pub async fn params_one(&self, user_id: i64) -> Result<Option<Vars>, BillingError> {
        let kind = self.cfg.kind;
        let query = self.cfg.params_query.as_str();
        let err = |e| BillingError::from_sqlx("params_query", e);
        let data = |message| BillingError::Data {
            what: "params_query",
            message: format!("user_id={user_id}: {message}"),
        };
        match &self.pool {
            Pool::MySql(p) => match sqlx::query(query)
                .bind(user_id)
                .fetch_optional(p)
                .await
                .map_err(err)?
            {
                None => Ok(None),
                Some(row) => mysql_vars(&row, kind, false).map(Some).map_err(data),
            },
            Pool::Postgres(p) => match sqlx::query(query)
                .bind(user_id)
                .fetch_optional(p)
                .await
                .map_err(err)?
            {
                None => Ok(None),
                Some(row) => pg_vars(&row, 0, false).map(Some).map_err(data),
            },
        }
    }

    /// The variables of each of `users` (None: no row). PostgreSQL runs one statement
    /// for all of them when the query allows; MySQL one per user, spread over the pool.
    pub async fn params(&self, users: &[i64]) -> Result<HashMap<i64, Option<Vars>>, BillingError> {
        if let Pool::Postgres(p) = &self.pool
            && let Some(batched) = self.pg_batched(p).await?
        {
            let rows = sqlx::query(&batched)
                .bind(users)
                .fetch_all(p)
                .await
                .map_err(|e| BillingError::from_sqlx("params_query", e))?;
            let mut out: HashMap<i64, Option<Vars>> = HashMap::with_capacity(users.len());
            for row in &rows {
                let user_id: i64 = row
                    .try_get(0)
                    .map_err(|e| BillingError::from_sqlx("params_query", e))?;
                let vars = pg_vars(row, 1, false).map_err(|message| BillingError::Data {
                    what: "params_query",
                    message: format!("user_id={user_id}: {message}"),
                })?;
                out.insert(user_id, Some(vars));
            }
            for user_id in users {
                out.entry(*user_id).or_insert(None);
            }
            return Ok(out);
        }
        // One query per user on up to `max_connections` connections at once.
        let lanes = (self.cfg.max_connections as usize).clamp(1, users.len().max(1));
        let mut tasks = tokio::task::JoinSet::new();
        for lane in 0..lanes {
            let billing = self.clone();
            let mine: Vec<i64> = users.iter().skip(lane).step_by(lanes).copied().collect();
            tasks.spawn(async move {
                let mut out = Vec::with_capacity(mine.len());
                for user_id in mine {
                    out.push((user_id, billing.params_one(user_id).await?));
                }
                Ok::<_, BillingError>(out)
            });
        }
        let mut out = HashMap::with_capacity(users.len());
        while let Some(done) = tasks.join_next().await {
            let part =
                done.map_err(|e| BillingError::Unreachable(format!("lookup task: {e}")))??;
            out.extend(part);
        }
        Ok(out)
    }

    /// The batched form of `params_query`, checked once against the server.
    async fn pg_batched(&self, pool: &PgPool) -> Result<Option<String>, BillingError> {
        if let Ok(cached) = self.batched.lock()
            && let Some(batched) = cached.as_ref()
        {
            return Ok(batched.clone());
        }
        let batched = match crate::store::postgres::lateral_params_query(&self.cfg.params_query) {
            None => None,
            Some(batched) => match sqlx::query(&batched)
                .bind(Vec::<i64>::new())
                .fetch_all(pool)
                .await
            {
                Ok(_) => Some(batched),
                Err(sqlx::Error::Database(e)) => {
                    tracing::info!(
                        "billing params_query is run once per user: its batched form was refused ({})",
                        e.message()
                    );
                    None
                }
                Err(e) => return Err(BillingError::from_sqlx("params_query", e)),
            },
        };
        if let Ok(mut cached) = self.batched.lock() {
            *cached = Some(batched.clone());
        }
        Ok(batched)
    }

    /// The events query with its limit: rows above the cursor, lowest ids first.
    fn source_query(&self, query: &str, limit: i64) -> String {
        let query = query.trim().trim_end_matches(';');
        format!("SELECT * FROM ({query}) AS nasd_source ORDER BY id LIMIT {limit}")
    }

    /// Up to `limit` rows of the events source with an id above `cursor`, in id order.
    pub async fn read_events(
        &self,
        cursor: i64,
        limit: i64,
    ) -> Result<Vec<SourceRow>, BillingError> {
        let Some(events) = &self.cfg.events else {
            return Ok(Vec::new());
        };
        let query = self.source_query(&events.query, limit);
        let err = |e| BillingError::from_sqlx("events_query", e);
        let rows: Vec<Vars> = match &self.pool {
            Pool::MySql(p) => sqlx::query(&query)
                .bind(cursor)
                .fetch_all(p)
                .await
                .map_err(err)?
                .iter()
                .map(|r| mysql_vars(r, BillingKind::MySql, true))
                .collect::<Result<_, _>>(),
            Pool::Postgres(p) => sqlx::query(&query)
                .bind(cursor)
                .fetch_all(p)
                .await
                .map_err(err)?
                .iter()
                .map(|r| pg_vars(r, 0, true))
                .collect::<Result<_, _>>(),
        }
        .map_err(|message| BillingError::Data {
            what: "events_query",
            message,
        })?;
        rows.iter()
            .map(source_row)
            .collect::<Result<_, _>>()
            .map_err(|message| BillingError::Data {
                what: "events_query",
                message,
            })
    }

    /// Runs `after_move` for each billing id, in one transaction of the billing.
    pub async fn after_move(&self, statement: &str, ids: &[i64]) -> Result<(), BillingError> {
        let err = |e| BillingError::from_sqlx("after_move", e);
        match &self.pool {
            Pool::MySql(p) => {
                let mut tx = p.begin().await.map_err(err)?;
                for id in ids {
                    sqlx::query(statement)
                        .bind(id)
                        .execute(&mut *tx)
                        .await
                        .map_err(err)?;
                }
                tx.commit().await.map_err(err)?;
            }
            Pool::Postgres(p) => {
                let mut tx = p.begin().await.map_err(err)?;
                for id in ids {
                    sqlx::query(statement)
                        .bind(id)
                        .execute(&mut *tx)
                        .await
                        .map_err(err)?;
                }
                tx.commit().await.map_err(err)?;
            }
        }
        Ok(())
    }
}

/// A compact event from a row of the events source (columns by lowercase name).
fn source_row(vars: &Vars) -> Result<SourceRow, String> {
    let int = |name: &str| -> Result<Option<i64>, String> {
        match vars.get(name) {
            None => Ok(None),
            Some(serde_json::Value::Number(n)) => n
                .as_i64()
                .map(Some)
                .ok_or_else(|| format!("column {name}: {n} is not an integer")),
            Some(serde_json::Value::String(s)) => s
                .trim()
                .parse()
                .map(Some)
                .map_err(|_| format!("column {name}: `{s}` is not an integer")),
            Some(other) => Err(format!("column {name}: {other} is not an integer")),
        }
    };
    let text = |name: &str| -> Option<String> {
        match vars.get(name) {
            None => None,
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(other) => Some(other.to_string()),
        }
    };
    let billing_id = int("id")?.ok_or("a row has no id")?;
    let needed = |what: &str| format!("row id={billing_id}: {what} is NULL or missing");
    let cmd = text("cmd").ok_or_else(|| needed("cmd"))?;
    let user_id = int("user_id")
        .map_err(|e| format!("row id={billing_id}: {e}"))?
        .ok_or_else(|| needed("user_id"))?;
    let event = CompactEvent {
        cmd: cmd.trim().to_string(),
        user_id,
        abonent_id: int("abonent_id").map_err(|e| format!("row id={billing_id}: {e}"))?,
        nas_ip: text("nas_ip")
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty()),
        usluga_id: int("usluga_id").map_err(|e| format!("row id={billing_id}: {e}"))?,
        acct_session_id: text("acct_session_id").filter(|s| !s.is_empty()),
    };
    Ok(SourceRow { billing_id, event })
}

/// One MySQL row as variables (NULLs left out).
fn mysql_vars(row: &MySqlRow, kind: BillingKind, lowercase: bool) -> Result<Vars, String> {
    let mut columns = Vec::with_capacity(row.len());
    for (i, col) in row.columns().iter().enumerate() {
        let name = col.name();
        let raw = row.try_get_raw(i).map_err(|e| e.to_string())?;
        if raw.is_null() {
            continue;
        }
        let type_name = col.type_info().name();
        let err = |e: sqlx::Error| format!("column {name}: {e}");
        let value: serde_json::Value = match types::column_kind(kind, type_name) {
            Some(ColumnKind::Int) => row.try_get_unchecked::<i64, _>(i).map_err(err)?.into(),
            Some(ColumnKind::UInt) => row.try_get_unchecked::<u64, _>(i).map_err(err)?.into(),
            Some(ColumnKind::Float) => {
                if type_name.eq_ignore_ascii_case("FLOAT") {
                    f64::from(row.try_get::<f32, _>(i).map_err(err)?).into()
                } else {
                    row.try_get::<f64, _>(i).map_err(err)?.into()
                }
            }
            Some(ColumnKind::Decimal) => {
                types::decimal_value(&row.try_get_unchecked::<String, _>(i).map_err(err)?)
            }
            Some(ColumnKind::Text | ColumnKind::Json) => {
                row.try_get_unchecked::<String, _>(i).map_err(err)?.into()
            }
            Some(ColumnKind::Binary) => {
                let bytes = row.try_get_unchecked::<Vec<u8>, _>(i).map_err(err)?;
                String::from_utf8(bytes)
                    .map_err(|_| {
                        format!("column {name} ({type_name}) holds bytes that are not UTF-8 text")
                    })?
                    .into()
            }
            Some(ColumnKind::Date) => row
                .try_get::<chrono::NaiveDate, _>(i)
                .map_err(err)?
                .format("%Y-%m-%d")
                .to_string()
                .into(),
            Some(ColumnKind::DateTime) => row
                .try_get::<chrono::NaiveDateTime, _>(i)
                .map_err(err)?
                .format("%Y-%m-%d %H:%M:%S")
                .to_string()
                .into(),
            Some(ColumnKind::Timestamp) => row
                .try_get::<DateTime<Utc>, _>(i)
                .map_err(err)?
                .format("%Y-%m-%d %H:%M:%S")
                .to_string()
                .into(),
            Some(ColumnKind::Null) => continue,
            Some(ColumnKind::Bool | ColumnKind::Inet) | None => {
                return Err(types::unusable(kind, name, type_name));
            }
        };
        columns.push((name.to_string(), value));
    }
    Ok(types::vars_from_columns(columns, lowercase))
}

/// One PostgreSQL row as variables, from column `skip` on (NULLs left out).
fn pg_vars(row: &PgRow, skip: usize, lowercase: bool) -> Result<Vars, String> {
    let kind = BillingKind::Postgres;
    let mut columns = Vec::with_capacity(row.len());
    for (i, col) in row.columns().iter().enumerate().skip(skip) {
        let name = col.name();
        let raw = row.try_get_raw(i).map_err(|e| e.to_string())?;
        if raw.is_null() {
            continue;
        }
        let type_name = col.type_info().name();
        let err = |e: sqlx::Error| format!("column {name}: {e}");
        let value: serde_json::Value = match types::column_kind(kind, type_name) {
            Some(ColumnKind::Int) => match type_name {
                "INT2" => row.try_get::<i16, _>(i).map_err(err)?.into(),
                "INT4" => row.try_get::<i32, _>(i).map_err(err)?.into(),
                _ => row.try_get::<i64, _>(i).map_err(err)?.into(),
            },
            Some(ColumnKind::UInt) => row
                .try_get::<sqlx::postgres::types::Oid, _>(i)
                .map_err(err)?
                .0
                .into(),
            Some(ColumnKind::Float) => match type_name {
                "FLOAT4" => f64::from(row.try_get::<f32, _>(i).map_err(err)?).into(),
                _ => row.try_get::<f64, _>(i).map_err(err)?.into(),
            },
            Some(ColumnKind::Decimal) => {
                let bytes = raw.as_bytes().map_err(|e| format!("column {name}: {e}"))?;
                let text = match raw.format() {
                    sqlx::postgres::PgValueFormat::Binary => types::pg_numeric_text(bytes),
                    sqlx::postgres::PgValueFormat::Text => {
                        String::from_utf8(bytes.to_vec()).map_err(|e| e.to_string())
                    }
                }
                .map_err(|e| format!("column {name}: {e}"))?;
                types::decimal_value(&text)
            }
            Some(ColumnKind::Text) => row.try_get_unchecked::<String, _>(i).map_err(err)?.into(),
            Some(ColumnKind::Bool) => row.try_get::<bool, _>(i).map_err(err)?.into(),
            Some(ColumnKind::Json) => row.try_get::<serde_json::Value, _>(i).map_err(err)?,
            Some(ColumnKind::Date) => row
                .try_get::<chrono::NaiveDate, _>(i)
                .map_err(err)?
                .format("%Y-%m-%d")
                .to_string()
                .into(),
            Some(ColumnKind::DateTime) => row
                .try_get::<chrono::NaiveDateTime, _>(i)
                .map_err(err)?
                .format("%Y-%m-%d %H:%M:%S")
                .to_string()
                .into(),
            Some(ColumnKind::Timestamp) => row
                .try_get::<DateTime<Utc>, _>(i)
                .map_err(err)?
                .format("%Y-%m-%d %H:%M:%S")
                .to_string()
                .into(),
            Some(ColumnKind::Inet) => {
                let bytes = raw.as_bytes().map_err(|e| format!("column {name}: {e}"))?;
                match raw.format() {
                    sqlx::postgres::PgValueFormat::Binary => types::pg_inet_text(bytes),
                    sqlx::postgres::PgValueFormat::Text => {
                        String::from_utf8(bytes.to_vec()).map_err(|e| e.to_string())
                    }
                }
                .map_err(|e| format!("column {name}: {e}"))?
                .into()
            }
            Some(ColumnKind::Null) => continue,
            Some(ColumnKind::Binary) | None => {
                return Err(types::unusable(kind, name, type_name));
            }
        };
        columns.push((name.to_string(), value));
    }
    Ok(types::vars_from_columns(columns, lowercase))
}

/// The two parts of nasd that use the billing database, each reported on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Part {
    /// The expander's `params_query`.
    Params,
    /// The events source.
    Events,
}

impl Part {
    pub fn name(self) -> &'static str {
        match self {
            Part::Params => "params_query",
            Part::Events => "events source",
        }
    }
}

/// An outage of one part as it goes: when it started and the last error (pure).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Outage {
    since: Option<DateTime<Utc>>,
}

/// What a report changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Nothing,
    /// The first failure after a success.
    Down,
    /// The first success after failures, with how long they lasted.
    Up(Duration),
}

impl Outage {
    pub fn failed(&mut self, now: DateTime<Utc>) -> Change {
        if self.since.is_some() {
            return Change::Nothing;
        }
        self.since = Some(now);
        Change::Down
    }

    pub fn ok(&mut self, now: DateTime<Utc>) -> Change {
        match self.since.take() {
            None => Change::Nothing,
            Some(since) => Change::Up((now - since).to_std().unwrap_or_default()),
        }
    }

    pub fn since(&self) -> Option<DateTime<Utc>> {
        self.since
    }
}

/// Where the expander and the events source report how the billing database answers:
/// the daemon log (once per transition), `/status` (through `Stats`) and alerts.
#[derive(Clone)]
pub struct Health {
    pub journal: Journal,
    pub stats: Arc<Stats>,
    pub alerts: Alerts,
    /// The billing url without its password, for the messages.
    pub shown_url: String,
    outages: Arc<Mutex<HashMap<Part, Outage>>>,
}

impl Health {
    pub fn new(journal: Journal, stats: Arc<Stats>, alerts: Alerts, shown_url: String) -> Health {
        Health {
            journal,
            stats,
            alerts,
            shown_url,
            outages: Arc::default(),
        }
    }

    /// A failure of `part`: events wait. Logged and alerted when an outage starts;
    /// `/status` always shows the latest error.
    pub fn failed(&self, part: Part, error: &BillingError) {
        let now = Utc::now();
        let change = match self.outages.lock() {
            Ok(mut map) => map.entry(part).or_default().failed(now),
            Err(_) => Change::Nothing,
        };
        let since = self.since(part).unwrap_or(now);
        self.stats.set_billing_problem(
            part.name(),
            Some(format!(
                "billing database {} ({}): {error}; events wait since {}",
                self.shown_url,
                part.name(),
                crate::journal::local_time(since)
            )),
        );
        if change == Change::Down {
            let text = format!(
                "billing database {} ({}): {error}; events wait until it answers again",
                self.shown_url,
                part.name()
            );
            tracing::warn!("{text}");
            self.journal.daemon(&text);
            self.alert(
                AlertKind::BillingDown,
                part,
                vec![("reason", error.to_string().into())],
            );
        } else {
            tracing::debug!("billing database ({}): {error}", part.name());
        }
    }

    /// A success of `part`: ends its outage, if any.
    pub fn ok(&self, part: Part) {
        let change = match self.outages.lock() {
            Ok(mut map) => map.entry(part).or_default().ok(Utc::now()),
            Err(_) => Change::Nothing,
        };
        if let Change::Up(lasted) = change {
            self.stats.set_billing_problem(part.name(), None);
            let text = format!(
                "billing database {} ({}) answers again after {}; events move on",
                self.shown_url,
                part.name(),
                crate::duration::format_duration(Duration::from_secs(lasted.as_secs()))
            );
            tracing::info!("{text}");
            self.journal.daemon(&text);
            self.alert(
                AlertKind::BillingUp,
                part,
                vec![(
                    "down_for",
                    crate::duration::format_duration(Duration::from_secs(lasted.as_secs())).into(),
                )],
            );
        }
    }

    fn since(&self, part: Part) -> Option<DateTime<Utc>> {
        self.outages.lock().ok()?.get(&part)?.since()
    }

    fn alert(&self, kind: AlertKind, part: Part, fields: Vec<(&str, serde_json::Value)>) {
        let mut map = std::collections::BTreeMap::new();
        map.insert("billing".to_string(), self.shown_url.clone().into());
        map.insert("part".to_string(), part.name().into());
        for (k, v) in fields {
            map.insert(k.to_string(), v);
        }
        self.alerts.send(Alert {
            kind,
            nas_id: 0,
            nas_name: String::new(),
            nas_ip: String::new(),
            at: Utc::now(),
            fields: map,
        });
    }
}

/// The wait after a failure: doubling from 250 ms up to 10 s (pure).
pub fn backoff(failures: u32) -> Duration {
    let ms = 250u64.saturating_mul(1u64 << failures.min(6));
    Duration::from_millis(ms.min(10_000))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, serde_json::Value)]) -> Vars {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    }

    #[test]
    fn source_rows() {
        let row = source_row(&vars(&[
            ("id", 7.into()),
            ("cmd", " user_add ".into()),
            ("user_id", "42".into()),
            ("nas_ip", "".into()),
            ("acct_session_id", 123.into()),
        ]))
        .unwrap();
        assert_eq!(row.billing_id, 7);
        assert_eq!(row.event.cmd, "user_add");
        assert_eq!(row.event.user_id, 42);
        assert_eq!(row.event.nas_ip, None);
        assert_eq!(row.event.acct_session_id.as_deref(), Some("123"));
        for (row, want) in [
            (vars(&[("cmd", "x".into())]), "a row has no id"),
            (
                vars(&[("id", 3.into()), ("user_id", 1.into())]),
                "row id=3: cmd is NULL or missing",
            ),
            (
                vars(&[
                    ("id", 3.into()),
                    ("cmd", "x".into()),
                    ("user_id", "u".into()),
                ]),
                "row id=3: column user_id: `u` is not an integer",
            ),
        ] {
            assert_eq!(source_row(&row).unwrap_err(), want);
        }
    }

    #[test]
    fn outages_change_once() {
        let t = |s: i64| DateTime::<Utc>::from_timestamp(s, 0).unwrap();
        let mut o = Outage::default();
        assert_eq!(o.ok(t(0)), Change::Nothing);
        assert_eq!(o.failed(t(10)), Change::Down);
        assert_eq!(o.failed(t(11)), Change::Nothing);
        assert_eq!(o.since(), Some(t(10)));
        assert_eq!(o.ok(t(70)), Change::Up(Duration::from_secs(60)));
        assert_eq!(o.ok(t(71)), Change::Nothing);
    }

    #[test]
    fn backoff_doubles_up_to_ten_seconds() {
        let got: Vec<u64> = (0..9).map(|n| backoff(n).as_millis() as u64).collect();
        assert_eq!(
            got,
            vec![250, 500, 1000, 2000, 4000, 8000, 10_000, 10_000, 10_000]
        );
    }
}
