//! Copying nasd's tables from one database to another (`nasd copy --to`, `nasd restore`,
//! and `nasd backup` of PostgreSQL): NAS, accounts, both stacks and history, with their
//! ids, states, try counts, retry times and errors, SQLite or PostgreSQL on either side.
//!
//! - The source is read in one snapshot (PostgreSQL: a repeatable-read, read-only
//!   transaction; SQLite: one read transaction), page by page in key order.
//! - The target is written in one transaction: a copy that is interrupted (SIGKILL, a
//!   lost connection) leaves the target as empty as it was, so it can simply be run
//!   again. A target that already holds rows is refused.
//! - Events claimed at the moment of the copy arrive ready, their try count kept (the
//!   claim belonged to a daemon of the source).
//! - At the end every table is read back from the target: its row count and a SHA-256
//!   of its rows in key order must equal the source's (times compared at the target's
//!   precision: SQLite keeps milliseconds).
//!
//! The table descriptions, value normalisation and the running-to-ready rule are pure
//! ([`TABLES`], [`Val`], [`release_claim`], [`Digest`]); the rest is a thin I/O shell.

use std::fmt::Write as _;

use ring::digest;
use sqlx::{Row, SqlitePool};

use super::{SqlContext, StoreError};

/// How a column is read and written on each backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Int,
    Text,
    /// TIMESTAMPTZ on PostgreSQL, epoch milliseconds on SQLite; microseconds here.
    Time,
    /// JSONB on PostgreSQL, TEXT on SQLite; canonical JSON text here.
    Json,
    /// BOOLEAN on PostgreSQL, 0/1 on SQLite.
    Bool,
}

/// One of nasd's tables: its name, the key it is read in order of, its columns.
pub struct Table {
    pub name: &'static str,
    pub key: &'static str,
    pub columns: &'static [(&'static str, Kind)],
    /// PostgreSQL: the key comes from a sequence that must continue after the copy.
    pub serial: bool,
}

use Kind::{Bool, Int, Json, Text, Time};

/// Every table a copy carries, in the order they are written.
pub const TABLES: &[Table] = &[
    Table {
        name: "nas",
        key: "id",
        serial: false,
        columns: &[
            ("id", Int),
            ("name", Text),
            ("ip", Text),
            ("scheme", Text),
            ("script_name", Text),
            ("n_workers", Int),
            ("protocol", Text),
            ("port", Int),
            ("login", Text),
            ("password", Text),
            ("secret", Text),
            ("max_sessions", Int),
            ("enabled", Bool),
            ("updated_at", Time),
            ("host_key_policy", Text),
            ("host_key", Text),
            ("legacy_crypto", Bool),
            ("paused", Bool),
        ],
    },
    Table {
        name: "accounts",
        key: "user_id",
        serial: false,
        columns: &[
            ("user_id", Int),
            ("abonent_id", Int),
            ("nas_id", Int),
            ("login", Text),
            ("ip", Text),
            ("mac", Text),
            ("vlan", Int),
            ("auth_type", Text),
            ("snat_ip", Text),
            ("rate_in", Int),
            ("rate_out", Int),
            ("ceil_in", Int),
            ("ceil_out", Int),
            ("burst_in", Int),
            ("burst_out", Int),
            ("extra", Json),
            ("updated_at", Time),
        ],
    },
    Table {
        name: "events_stack_compact",
        key: "id",
        serial: true,
        columns: &[
            ("id", Int),
            ("cmd", Text),
            ("user_id", Int),
            ("abonent_id", Int),
            ("nas_ip", Text),
            ("usluga_id", Int),
            ("acct_session_id", Text),
            ("created_at", Time),
        ],
    },
    Table {
        name: "events_stack",
        key: "id",
        serial: true,
        columns: &[
            ("id", Int),
            ("compact_id", Int),
            ("event_date", Time),
            ("enqueued_at", Time),
            ("cmd", Text),
            ("user_id", Int),
            ("abonent_id", Int),
            ("nas_id", Int),
            ("usluga_id", Int),
            ("acct_session_id", Text),
            ("params", Json),
            ("owner_script", Text),
            ("owner_function", Text),
            ("try_count", Int),
            ("state", Text),
            ("retry_at", Time),
            ("claim_token", Int),
            ("claimed_at", Time),
            ("lease_until", Time),
            ("last_error", Text),
        ],
    },
    Table {
        name: "events_history",
        key: "id",
        serial: true,
        columns: &[
            ("id", Int),
            ("event_id", Int),
            ("compact_id", Int),
            ("event_date", Time),
            ("enqueued_at", Time),
            ("cmd", Text),
            ("user_id", Int),
            ("abonent_id", Int),
            ("nas_id", Int),
            ("usluga_id", Int),
            ("acct_session_id", Text),
            ("params", Json),
            ("outcome", Text),
            ("attempts", Int),
            ("commands", Json),
            ("answer", Text),
            ("error", Text),
            ("duration_ms", Int),
            ("finished_at", Time),
        ],
    },
    Table {
        name: "nasd_audit",
        key: "id",
        serial: true,
        columns: &[
            ("id", Int),
            ("at", Time),
            ("who", Text),
            ("action", Text),
            ("target", Text),
            ("detail", Text),
            ("count", Int),
        ],
    },
    // `[billing]` events source: the cursor and the billing ids moved (a copy without
    // them would move the billing's events a second time).
    Table {
        name: "billing_cursor",
        key: "id",
        serial: false,
        columns: &[("id", Int), ("last_id", Int), ("updated_at", Time)],
    },
    Table {
        name: "billing_moved",
        key: "billing_id",
        serial: false,
        columns: &[
            ("billing_id", Int),
            ("compact_id", Int),
            ("moved_at", Time),
            ("done", Bool),
        ],
    },
];

/// One value, normalised so that both backends give the same for the same data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Val {
    Null,
    Int(i64),
    Text(String),
    /// Microseconds since the epoch.
    Time(i64),
    /// Canonical JSON text (keys sorted).
    Json(String),
    Bool(bool),
}

impl Val {
    /// Canonical JSON text of `text` (as stored); text that is not JSON is kept as it is.
    pub fn json(text: &str) -> Val {
        match serde_json::from_str::<serde_json::Value>(text) {
            Ok(v) => Val::Json(v.to_string()),
            Err(_) => Val::Json(text.to_string()),
        }
    }

    /// The value as a target of `backend` keeps it: SQLite stores milliseconds.
    fn fit(self, backend: Backend) -> Val {
        match (self, backend) {
            (Val::Time(us), Backend::Sqlite) => Val::Time(us.div_euclid(1000) * 1000),
            (v, _) => v,
        }
    }
}

/// The two backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

impl Backend {
    pub fn of(url: &str) -> Result<Backend, StoreError> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Backend::Postgres)
        } else if url.starts_with("sqlite:") {
            Ok(Backend::Sqlite)
        } else {
            Err(StoreError::UnsupportedUrl(url.to_string()))
        }
    }
}

/// A claimed event (state `running`) arrives ready, its try count kept: the claim
/// belonged to a daemon of the source. Returns true when the row was changed.
pub fn release_claim(table: &Table, row: &mut [Val]) -> bool {
    if table.name != "events_stack" {
        return false;
    }
    let index = |name: &str| table.columns.iter().position(|(c, _)| *c == name);
    let (Some(state), Some(token), Some(claimed), Some(lease)) = (
        index("state"),
        index("claim_token"),
        index("claimed_at"),
        index("lease_until"),
    ) else {
        return false;
    };
    if row[state] != Val::Text("running".into()) {
        return false;
    }
    row[state] = Val::Text("ready".into());
    row[token] = Val::Null;
    row[claimed] = Val::Null;
    row[lease] = Val::Null;
    true
}

/// Row count and SHA-256 of a table's rows in key order.
pub struct Digest {
    rows: u64,
    ctx: digest::Context,
}

impl Default for Digest {
    fn default() -> Digest {
        Digest {
            rows: 0,
            ctx: digest::Context::new(&digest::SHA256),
        }
    }
}

impl Digest {
    pub fn add(&mut self, row: &[Val]) {
        self.rows += 1;
        let mut line = String::new();
        for v in row {
            let _ = write!(line, "{v:?}\u{1f}");
        }
        line.push('\n');
        self.ctx.update(line.as_bytes());
    }

    /// (rows, hex SHA-256).
    pub fn finish(self) -> (u64, String) {
        let sum = self.ctx.finish();
        let hex: String = sum.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        (self.rows, hex)
    }
}

/// What a copy did, per table: (name, rows, SHA-256), and the claims released.
#[derive(Debug, Default)]
pub struct Report {
    pub tables: Vec<(String, u64, String)>,
    pub released: u64,
}

/// Rows read per page.
const PAGE: i64 = 2000;

/// A database to read from or write to, as a raw pool (the copy speaks SQL of its own).
#[derive(Clone)]
pub enum Db {
    Postgres(sqlx::PgPool),
    Sqlite(SqlitePool),
}

impl Db {
    pub fn backend(&self) -> Backend {
        match self {
            Db::Postgres(_) => Backend::Postgres,
            Db::Sqlite(_) => Backend::Sqlite,
        }
    }
}

fn select_list(table: &Table, backend: Backend) -> String {
    table
        .columns
        .iter()
        .map(|(c, kind)| match (backend, kind) {
            (Backend::Postgres, Int) => format!("{c}::bigint"),
            (Backend::Postgres, Time) => {
                format!("(extract(epoch from {c}) * 1000000)::bigint")
            }
            (Backend::Postgres, Json) => format!("{c}::text"),
            (Backend::Sqlite, Time) => format!("{c} * 1000"),
            _ => c.to_string(),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn decode_pg(row: &sqlx::postgres::PgRow, table: &Table) -> Result<Vec<Val>, sqlx::Error> {
    let mut out = Vec::with_capacity(table.columns.len());
    for (i, (_, kind)) in table.columns.iter().enumerate() {
        out.push(match kind {
            Int | Time => match row.try_get::<Option<i64>, _>(i)? {
                None => Val::Null,
                Some(v) if *kind == Int => Val::Int(v),
                Some(v) => Val::Time(v),
            },
            Text => row
                .try_get::<Option<String>, _>(i)?
                .map_or(Val::Null, Val::Text),
            Json => row
                .try_get::<Option<String>, _>(i)?
                .map_or(Val::Null, |t| Val::json(&t)),
            Bool => row
                .try_get::<Option<bool>, _>(i)?
                .map_or(Val::Null, Val::Bool),
        });
    }
    Ok(out)
}

fn decode_sqlite(row: &sqlx::sqlite::SqliteRow, table: &Table) -> Result<Vec<Val>, sqlx::Error> {
    let mut out = Vec::with_capacity(table.columns.len());
    for (i, (_, kind)) in table.columns.iter().enumerate() {
        out.push(match kind {
            Int => row
                .try_get::<Option<i64>, _>(i)?
                .map_or(Val::Null, Val::Int),
            Time => row
                .try_get::<Option<i64>, _>(i)?
                .map_or(Val::Null, Val::Time),
            Text => row
                .try_get::<Option<String>, _>(i)?
                .map_or(Val::Null, Val::Text),
            Json => row
                .try_get::<Option<String>, _>(i)?
                .map_or(Val::Null, |t| Val::json(&t)),
            Bool => row
                .try_get::<Option<i64>, _>(i)?
                .map_or(Val::Null, |v| Val::Bool(v != 0)),
        });
    }
    Ok(out)
}

fn key_of(table: &Table, row: &[Val]) -> i64 {
    let at = table
        .columns
        .iter()
        .position(|(c, _)| *c == table.key)
        .unwrap_or(0);
    match row.get(at) {
        Some(Val::Int(k)) => *k,
        _ => i64::MIN,
    }
}

/// A read connection holding one snapshot of the source.
pub enum Reader {
    Postgres(sqlx::pool::PoolConnection<sqlx::Postgres>),
    Sqlite(sqlx::pool::PoolConnection<sqlx::Sqlite>),
}

impl Reader {
    /// Opens the snapshot every page is read from.
    pub async fn open(db: &Db) -> Result<Reader, StoreError> {
        match db {
            Db::Postgres(pool) => {
                let mut conn = pool.acquire().await.ctx("copy: connect to the source")?;
                sqlx::query("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                    .execute(&mut *conn)
                    .await
                    .ctx("copy: open the source snapshot")?;
                Ok(Reader::Postgres(conn))
            }
            Db::Sqlite(pool) => {
                let mut conn = pool.acquire().await.ctx("copy: open the source")?;
                sqlx::query("BEGIN")
                    .execute(&mut *conn)
                    .await
                    .ctx("copy: open the source snapshot")?;
                Ok(Reader::Sqlite(conn))
            }
        }
    }

    fn backend(&self) -> Backend {
        match self {
            Reader::Postgres(_) => Backend::Postgres,
            Reader::Sqlite(_) => Backend::Sqlite,
        }
    }

    /// Up to [`PAGE`] rows with a key above `after`, in key order.
    pub async fn page(&mut self, table: &Table, after: i64) -> Result<Vec<Vec<Val>>, StoreError> {
        let sql = format!(
            "SELECT {} FROM {} WHERE {} > $1 ORDER BY {} LIMIT $2",
            select_list(table, self.backend()),
            table.name,
            table.key,
            table.key
        );
        match self {
            Reader::Postgres(conn) => {
                let rows = sqlx::query(&sql)
                    .bind(after)
                    .bind(PAGE)
                    .fetch_all(&mut **conn)
                    .await
                    .ctx("copy: read the source")?;
                rows.iter()
                    .map(|r| decode_pg(r, table))
                    .collect::<Result<_, _>>()
                    .ctx("copy: read the source")
            }
            Reader::Sqlite(conn) => {
                let rows = sqlx::query(&sql.replace('$', "?"))
                    .bind(after)
                    .bind(PAGE)
                    .fetch_all(&mut **conn)
                    .await
                    .ctx("copy: read the source")?;
                rows.iter()
                    .map(|r| decode_sqlite(r, table))
                    .collect::<Result<_, _>>()
                    .ctx("copy: read the source")
            }
        }
    }

    /// Ends the snapshot.
    pub async fn close(self) {
        match self {
            Reader::Postgres(mut c) => {
                let _ = sqlx::query("COMMIT").execute(&mut *c).await;
            }
            Reader::Sqlite(mut c) => {
                let _ = sqlx::query("COMMIT").execute(&mut *c).await;
            }
        }
    }
}

/// Reads every row of `table` through `reader`, page by page, calling `each` with
/// each page in key order.
pub async fn read_all<F>(reader: &mut Reader, table: &Table, mut each: F) -> Result<(), StoreError>
where
    F: AsyncFnMut(Vec<Vec<Val>>) -> Result<(), StoreError>,
{
    let mut after = i64::MIN;
    loop {
        let page = reader.page(table, after).await?;
        let Some(last) = page.last() else {
            return Ok(());
        };
        after = key_of(table, last);
        let full = page.len() as i64 == PAGE;
        each(page).await?;
        if !full {
            return Ok(());
        }
    }
}

/// Writes pages into the target inside one transaction.
pub enum Writer {
    Postgres(sqlx::Transaction<'static, sqlx::Postgres>),
    Sqlite(sqlx::Transaction<'static, sqlx::Sqlite>),
}

impl Writer {
    pub async fn begin(db: &Db) -> Result<Writer, StoreError> {
        Ok(match db {
            Db::Postgres(pool) => {
                Writer::Postgres(pool.begin().await.ctx("copy: write the target")?)
            }
            Db::Sqlite(pool) => Writer::Sqlite(pool.begin().await.ctx("copy: write the target")?),
        })
    }

    pub async fn insert(&mut self, table: &Table, rows: &[Vec<Val>]) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        let names: Vec<&str> = table.columns.iter().map(|(c, _)| *c).collect();
        match self {
            Writer::Postgres(tx) => {
                // One statement per page: one array per column, unnested.
                let mut query_cols = Vec::new();
                let mut args: Vec<String> = Vec::new();
                for (i, (c, kind)) in table.columns.iter().enumerate() {
                    let n = i + 1;
                    let (array, select) = match kind {
                        Int => ("bigint[]", format!("u.{c}")),
                        Text => ("text[]", format!("u.{c}")),
                        Time => (
                            "bigint[]",
                            format!("'epoch'::timestamptz + u.{c} * interval '1 microsecond'"),
                        ),
                        Json => ("text[]", format!("u.{c}::jsonb")),
                        Bool => ("boolean[]", format!("u.{c}")),
                    };
                    args.push(format!("${n}::{array}"));
                    query_cols.push(select);
                }
                let sql = format!(
                    "INSERT INTO {} ({}) SELECT {} FROM unnest({}) AS u({})",
                    table.name,
                    names.join(", "),
                    query_cols.join(", "),
                    args.join(", "),
                    names.join(", ")
                );
                let mut q = sqlx::query(&sql);
                for (i, (_, kind)) in table.columns.iter().enumerate() {
                    q = match kind {
                        Int | Time => q.bind(
                            rows.iter()
                                .map(|r| match &r[i] {
                                    Val::Int(v) | Val::Time(v) => Some(*v),
                                    _ => None,
                                })
                                .collect::<Vec<Option<i64>>>(),
                        ),
                        Text | Json => q.bind(
                            rows.iter()
                                .map(|r| match &r[i] {
                                    Val::Text(v) | Val::Json(v) => Some(v.clone()),
                                    _ => None,
                                })
                                .collect::<Vec<Option<String>>>(),
                        ),
                        Bool => q.bind(
                            rows.iter()
                                .map(|r| match &r[i] {
                                    Val::Bool(v) => Some(*v),
                                    _ => None,
                                })
                                .collect::<Vec<Option<bool>>>(),
                        ),
                    };
                }
                q.execute(&mut **tx).await.ctx("copy: write the target")?;
            }
            Writer::Sqlite(tx) => {
                let marks: Vec<String> = (1..=names.len()).map(|i| format!("?{i}")).collect();
                let sql = format!(
                    "INSERT INTO {} ({}) VALUES ({})",
                    table.name,
                    names.join(", "),
                    marks.join(", ")
                );
                for row in rows {
                    let mut q = sqlx::query(&sql);
                    for v in row {
                        q = match v {
                            Val::Null => q.bind(None::<i64>),
                            Val::Int(i) => q.bind(*i),
                            Val::Time(us) => q.bind(us.div_euclid(1000)),
                            Val::Text(t) | Val::Json(t) => q.bind(t.clone()),
                            Val::Bool(b) => q.bind(i64::from(*b)),
                        };
                    }
                    q.execute(&mut **tx).await.ctx("copy: write the target")?;
                }
            }
        }
        Ok(())
    }

    /// PostgreSQL: the serial keys continue after the copied ids.
    pub async fn continue_sequences(&mut self) -> Result<(), StoreError> {
        if let Writer::Postgres(tx) = self {
            for table in TABLES.iter().filter(|t| t.serial) {
                let sql = format!(
                    "SELECT setval(pg_get_serial_sequence('{t}', '{k}'), \
                     COALESCE((SELECT max({k}) FROM {t}), 1), \
                     (SELECT max({k}) FROM {t}) IS NOT NULL)",
                    t = table.name,
                    k = table.key
                );
                sqlx::query(&sql)
                    .execute(&mut **tx)
                    .await
                    .ctx("copy: continue the target's sequences")?;
            }
        }
        Ok(())
    }

    pub async fn commit(self) -> Result<(), StoreError> {
        match self {
            Writer::Postgres(tx) => tx.commit().await.ctx("copy: commit the target"),
            Writer::Sqlite(tx) => tx.commit().await.ctx("copy: commit the target"),
        }
    }
}

/// Rows per table in `db` (for the emptiness check and reports).
pub async fn counts(db: &Db) -> Result<Vec<(&'static str, i64)>, StoreError> {
    let mut out = Vec::new();
    for table in TABLES {
        let sql = format!("SELECT count(*) FROM {}", table.name);
        let n: i64 = match db {
            Db::Postgres(p) => sqlx::query_scalar(&sql).fetch_one(p).await,
            Db::Sqlite(p) => sqlx::query_scalar(&sql).fetch_one(p).await,
        }
        .ctx("copy: count rows")?;
        out.push((table.name, n));
    }
    Ok(out)
}

/// Copies every table from `source` to `target` (empty, migrated) and verifies it.
/// `progress` hears (table, rows copied so far) after each page.
pub async fn copy(
    source: &Db,
    target: &Db,
    progress: &mut (dyn FnMut(&str, u64) + Send),
) -> Result<Report, StoreError> {
    let backend = target.backend();
    let mut reader = Reader::open(source).await?;
    let mut writer = Writer::begin(target).await?;
    let mut report = Report::default();
    let mut expected = Vec::new();
    for table in TABLES {
        let mut sums = Digest::default();
        let mut released = 0u64;
        let mut copied = 0u64;
        read_all(&mut reader, table, async |page: Vec<Vec<Val>>| {
            copied += page.len() as u64;
            let mut fitted = Vec::with_capacity(page.len());
            for row in page {
                let mut row: Vec<Val> = row.into_iter().map(|v| v.fit(backend)).collect();
                if release_claim(table, &mut row) {
                    released += 1;
                }
                sums.add(&row);
                fitted.push(row);
            }
            writer.insert(table, &fitted).await?;
            progress(table.name, copied);
            Ok(())
        })
        .await?;
        report.released += released;
        expected.push(sums.finish());
    }
    reader.close().await;
    writer.continue_sequences().await?;
    writer.commit().await?;
    // Read back what the target now holds.
    let mut check = Reader::open(target).await?;
    for (table, (rows, sum)) in TABLES.iter().zip(expected) {
        let mut sums = Digest::default();
        read_all(&mut check, table, async |page: Vec<Vec<Val>>| {
            for row in &page {
                sums.add(row);
            }
            Ok(())
        })
        .await?;
        let (got_rows, got_sum) = sums.finish();
        if got_rows != rows || got_sum != sum {
            check.close().await;
            return Err(StoreError::Invalid(format!(
                "copy: table {} does not match after the copy: source {rows} rows (sha256 {sum}), \
                 target {got_rows} rows (sha256 {got_sum})",
                table.name
            )));
        }
        report.tables.push((table.name.to_string(), rows, sum));
    }
    check.close().await;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(name: &str) -> &'static Table {
        TABLES.iter().find(|t| t.name == name).expect("table")
    }

    #[test]
    fn every_table_has_its_key_first_and_no_column_twice() {
        for t in TABLES {
            assert_eq!(t.columns[0].0, t.key, "{}", t.name);
            let mut names: Vec<&str> = t.columns.iter().map(|(c, _)| *c).collect();
            names.sort();
            names.dedup();
            assert_eq!(names.len(), t.columns.len(), "{}", t.name);
        }
    }

    #[test]
    fn json_is_compared_in_canonical_form() {
        // jsonb reorders keys and drops spaces; SQLite keeps the text as written.
        assert_eq!(
            Val::json(r#"{"b": 1, "a": [1, 2]}"#),
            Val::json(r#"{"a":[1,2],"b":1}"#)
        );
        assert_eq!(Val::json("not json"), Val::Json("not json".into()));
    }

    #[test]
    fn times_fit_the_target() {
        let t = Val::Time(1_700_000_000_123_456);
        assert_eq!(t.clone().fit(Backend::Postgres), t);
        assert_eq!(t.fit(Backend::Sqlite), Val::Time(1_700_000_000_123_000));
        assert_eq!(Val::Time(-1).fit(Backend::Sqlite), Val::Time(-1000));
        assert_eq!(Val::Int(5).fit(Backend::Sqlite), Val::Int(5));
    }

    #[test]
    fn a_claimed_event_arrives_ready_with_its_try_count() {
        let stack = table("events_stack");
        let mut row: Vec<Val> = stack
            .columns
            .iter()
            .map(|(c, _)| match *c {
                "state" => Val::Text("running".into()),
                "try_count" => Val::Int(3),
                "claim_token" => Val::Int(99),
                "claimed_at" | "lease_until" => Val::Time(1),
                "last_error" => Val::Text("timeout".into()),
                _ => Val::Int(1),
            })
            .collect();
        assert!(release_claim(stack, &mut row));
        let get = |row: &[Val], name: &str| {
            row[stack.columns.iter().position(|(c, _)| *c == name).unwrap()].clone()
        };
        assert_eq!(get(&row, "state"), Val::Text("ready".into()));
        assert_eq!(get(&row, "try_count"), Val::Int(3));
        assert_eq!(get(&row, "claim_token"), Val::Null);
        assert_eq!(get(&row, "lease_until"), Val::Null);
        assert_eq!(get(&row, "last_error"), Val::Text("timeout".into()));
        // Ready rows and other tables are left alone.
        assert!(!release_claim(stack, &mut row));
        let mut history = vec![Val::Text("running".into())];
        assert!(!release_claim(table("events_history"), &mut history));
    }

    #[test]
    fn the_digest_sees_every_value() {
        let sum = |rows: &[Vec<Val>]| {
            let mut d = Digest::default();
            for r in rows {
                d.add(r);
            }
            d.finish()
        };
        let a = vec![vec![Val::Int(1), Val::Text("x".into())]];
        let b = vec![vec![Val::Int(1), Val::Text("y".into())]];
        let c = vec![vec![Val::Int(1), Val::Null]];
        assert_eq!(sum(&a), sum(&a.clone()));
        assert_ne!(sum(&a).1, sum(&b).1);
        assert_ne!(sum(&a).1, sum(&c).1);
        assert_eq!(sum(&a).0, 1);
    }
}
