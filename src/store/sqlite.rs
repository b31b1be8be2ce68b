//! SQLite backend, the embedded default: one connection (SQLite has one writer anyway),
//! WAL journal, write transactions opened with `BEGIN IMMEDIATE` so they never fail on
//! lock upgrade. Times are stored as INTEGER milliseconds since the Unix epoch.

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{Column, Row, TypeInfo, ValueRef};

use super::{
    AccountRecord, Claimed, CompactEvent, CompactRow, EventStatus, ExpandReport, Filter,
    FilterValue, Finish, HistoryRow, Nas, NasQueue, PoolFigures, PruneStep, Reschedule, Secret,
    SqlContext, StackCount, StackEvent, StoreError, plan_expansion,
};
use crate::model::Vars;

#[derive(Clone)]
pub struct SqliteStore {
    /// Calls made through `Store` (each one statement or one transaction).
    pub(super) calls: super::CallCounter,
    pool: SqlitePool,
}

fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

fn from_ms(v: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(v).single().unwrap_or_default()
}

/// `?1, ?2, ...` for `n` values starting at `start`.
fn placeholders(start: usize, n: usize) -> String {
    (start..start + n)
        .map(|i| format!("?{i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl SqliteStore {
    /// The connection pool (the copy tool speaks SQL of its own).
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Per NAS, the highest event id above `after_id` (new rows since the last look).
    pub async fn stack_heads_after(&self, after_id: i64) -> Result<Vec<(i64, i64)>, StoreError> {
        let rows = sqlx::query(
            "SELECT nas_id, MAX(id) AS max_id FROM events_stack WHERE id > ?1 GROUP BY nas_id",
        )
        .bind(after_id)
        .fetch_all(&self.pool)
        .await
        .ctx("look for new events")?;
        rows.iter()
            .map(|r| Ok((r.try_get::<i64, _>(0)?, r.try_get::<i64, _>(1)?)))
            .collect::<Result<_, sqlx::Error>>()
            .ctx("look for new events")
    }

    /// Opens (and creates) the database file of `url`, its directory made ready by
    /// [`SqliteStore::prepare_dir`].
    pub async fn connect(url: &str) -> Result<SqliteStore, StoreError> {
        let opts = SqliteStore::options(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        SqliteStore::prepare_dir(url)?;
        let file = opts.get_filename().display().to_string();
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(opts)
            .await
            .map_err(|e| {
                StoreError::Invalid(format!(
                    "cannot open the SQLite database {file}: {}",
                    super::connect_cause(&e)
                ))
            })?;
        Ok(SqliteStore {
            calls: Default::default(),
            pool,
        })
    }

    fn options(url: &str) -> Result<SqliteConnectOptions, StoreError> {
        SqliteConnectOptions::from_str(url).map_err(|e| {
            StoreError::Invalid(format!("database url {url}: {}", super::connect_cause(&e)))
        })
    }

    /// Makes sure the directory of the database file `url` names is there before the
    /// file is opened (or its daemon lock taken beside it). It must exist, or be one
    /// level under a directory that does (the default `var/nasd.db` in a fresh working
    /// directory), which is then created: a path several directories deep that does not
    /// exist is a mistake in the url, refused naming the directory rather than created.
    pub fn prepare_dir(url: &str) -> Result<(), StoreError> {
        let opts = SqliteStore::options(url)?;
        let file = opts.get_filename();
        let cannot_open = |why: String| {
            StoreError::Invalid(format!(
                "cannot open the SQLite database {}: {why}",
                file.display()
            ))
        };
        let Some(dir) = file.parent() else {
            return Ok(());
        };
        if dir.as_os_str().is_empty() || dir.is_dir() {
            return Ok(());
        }
        if dir.exists() {
            return Err(cannot_open(format!("{} is not a directory", dir.display())));
        }
        match dir.parent() {
            Some(up) if up.as_os_str().is_empty() || up.is_dir() => std::fs::create_dir(dir)
                .map_err(|e| {
                    cannot_open(format!(
                        "cannot create the directory {}: {e}",
                        dir.display()
                    ))
                }),
            _ => Err(cannot_open(format!(
                "directory {} does not exist (create it first)",
                dir.display()
            ))),
        }
    }

    pub async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::migrate!("migrations/sqlite").run(&self.pool).await?;
        Ok(())
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .ctx("ping")?;
        Ok(())
    }

    pub async fn nas_list(&self) -> Result<Vec<Nas>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, name, ip, scheme, script_name, n_workers, protocol, port, login, password, \
             secret, max_sessions, enabled, host_key_policy, host_key, legacy_crypto, paused FROM nas ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await
        .ctx("list nas")?;
        rows.iter()
            .map(|r| -> Result<Nas, sqlx::Error> {
                Ok(Nas {
                    id: r.try_get("id")?,
                    name: r.try_get("name")?,
                    ip: r.try_get("ip")?,
                    scheme: r.try_get("scheme")?,
                    script_name: r.try_get("script_name")?,
                    n_workers: r.try_get("n_workers")?,
                    protocol: r.try_get("protocol")?,
                    port: r.try_get("port")?,
                    login: r.try_get("login")?,
                    password: r.try_get::<Option<String>, _>("password")?.map(Secret::new),
                    secret: r.try_get::<Option<String>, _>("secret")?.map(Secret::new),
                    max_sessions: r.try_get("max_sessions")?,
                    enabled: r.try_get("enabled")?,
                    host_key_policy: r.try_get("host_key_policy")?,
                    host_key: r.try_get("host_key")?,
                    legacy_crypto: r.try_get("legacy_crypto")?,
                    paused: r.try_get("paused")?,
                })
            })
            .collect::<Result<_, _>>()
            .ctx("list nas")
    }

    pub async fn nas_upsert(&self, nas: &Nas) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO nas (id, name, ip, scheme, script_name, n_workers, protocol, port, login, \
             password, secret, max_sessions, enabled, updated_at, host_key_policy, host_key, legacy_crypto, \
             paused) \
             VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14,?15,?16,?17,?18) \
             ON CONFLICT (id) DO UPDATE SET name=excluded.name, ip=excluded.ip, \
             scheme=excluded.scheme, script_name=excluded.script_name, n_workers=excluded.n_workers, \
             protocol=excluded.protocol, port=excluded.port, login=excluded.login, \
             password=excluded.password, secret=excluded.secret, max_sessions=excluded.max_sessions, \
             enabled=excluded.enabled, updated_at=excluded.updated_at, \
             host_key_policy=excluded.host_key_policy, host_key=excluded.host_key, \
             legacy_crypto=excluded.legacy_crypto, paused=excluded.paused",
        )
        .bind(nas.id)
        .bind(&nas.name)
        .bind(&nas.ip)
        .bind(&nas.scheme)
        .bind(&nas.script_name)
        .bind(nas.n_workers)
        .bind(&nas.protocol)
        .bind(nas.port)
        .bind(&nas.login)
        .bind(nas.password.as_ref().map(Secret::expose))
        .bind(nas.secret.as_ref().map(Secret::expose))
        .bind(nas.max_sessions)
        .bind(nas.enabled)
        .bind(ms(Utc::now()))
        .bind(&nas.host_key_policy)
        .bind(&nas.host_key)
        .bind(nas.legacy_crypto)
        .bind(nas.paused)
        .execute(&self.pool)
        .await
        .ctx("save nas")?;
        Ok(())
    }

    pub async fn nas_remove(&self, id: i64) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM nas WHERE id = ?1")
            .bind(id)
            .execute(&self.pool)
            .await
            .ctx("remove nas")?;
        Ok(done.rows_affected() > 0)
    }

    pub async fn accounts_upsert(&self, records: &[AccountRecord]) -> Result<u64, StoreError> {
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .ctx("import accounts")?;
        let now = ms(Utc::now());
        for rec in records {
            sqlx::query(
                "INSERT INTO accounts (user_id, abonent_id, nas_id, login, ip, mac, vlan, auth_type, \
                 snat_ip, rate_in, rate_out, ceil_in, ceil_out, burst_in, burst_out, extra, updated_at) \
                 VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14,?15,?16,?17) \
                 ON CONFLICT (user_id) DO UPDATE SET abonent_id=excluded.abonent_id, \
                 nas_id=excluded.nas_id, login=excluded.login, ip=excluded.ip, mac=excluded.mac, \
                 vlan=excluded.vlan, auth_type=excluded.auth_type, snat_ip=excluded.snat_ip, \
                 rate_in=excluded.rate_in, rate_out=excluded.rate_out, ceil_in=excluded.ceil_in, \
                 ceil_out=excluded.ceil_out, burst_in=excluded.burst_in, burst_out=excluded.burst_out, \
                 extra=excluded.extra, updated_at=excluded.updated_at",
            )
            .bind(rec.int("user_id"))
            .bind(rec.int("abonent_id"))
            .bind(rec.int("nas_id"))
            .bind(rec.text("login"))
            .bind(rec.text("ip"))
            .bind(rec.text("mac"))
            .bind(rec.int("vlan"))
            .bind(rec.text("auth_type"))
            .bind(rec.text("snat_ip"))
            .bind(rec.int("rate_in"))
            .bind(rec.int("rate_out"))
            .bind(rec.int("ceil_in"))
            .bind(rec.int("ceil_out"))
            .bind(rec.int("burst_in"))
            .bind(rec.int("burst_out"))
            .bind(serde_json::Value::Object(rec.extra.clone()).to_string())
            .bind(now)
            .execute(&mut *tx)
            .await
            .ctx("import accounts")?;
        }
        tx.commit().await.ctx("import accounts")?;
        Ok(records.len() as u64)
    }

    pub async fn account_params(
        &self,
        params_query: &str,
        user_id: i64,
    ) -> Result<Option<Vars>, StoreError> {
        let mut conn = self.pool.acquire().await.ctx("params_query")?;
        params_for(&mut conn, params_query, user_id).await
    }

    pub async fn enqueue_compact(&self, events: &[CompactEvent]) -> Result<Vec<i64>, StoreError> {
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .ctx("enqueue")?;
        let now = ms(Utc::now());
        let mut ids = Vec::with_capacity(events.len());
        for e in events {
            let id: i64 = sqlx::query_scalar(
                "INSERT INTO events_stack_compact (cmd, user_id, abonent_id, nas_ip, usluga_id, \
                 acct_session_id, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) RETURNING id",
            )
            .bind(&e.cmd)
            .bind(e.user_id)
            .bind(e.abonent_id)
            .bind(&e.nas_ip)
            .bind(e.usluga_id)
            .bind(&e.acct_session_id)
            .bind(now)
            .fetch_one(&mut *tx)
            .await
            .ctx("enqueue")?;
            ids.push(id);
        }
        tx.commit().await.ctx("enqueue")?;
        Ok(ids)
    }

    pub async fn expand(
        &self,
        from: super::ParamsFrom<'_>,
        limit: i64,
    ) -> Result<ExpandReport, StoreError> {
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .ctx("expand")?;
        let rows = sqlx::query(
            "SELECT id, cmd, user_id, abonent_id, nas_ip, usluga_id, acct_session_id, created_at \
             FROM events_stack_compact WHERE id <= ?2 ORDER BY id LIMIT ?1",
        )
        .bind(limit)
        .bind(from.up_to())
        .fetch_all(&mut *tx)
        .await
        .ctx("expand: read compact stack")?;
        let mut compact: Vec<CompactRow> = rows
            .iter()
            .map(compact_from_row)
            .collect::<Result<_, _>>()
            .ctx("expand: read compact stack")?;
        if let super::ParamsFrom::Given { params, .. } = from {
            compact.truncate(super::looked_up_prefix(&compact, params));
        }
        if compact.is_empty() {
            return Ok(ExpandReport::default());
        }
        let nas: Vec<(i64, String)> = sqlx::query_as("SELECT id, ip FROM nas")
            .fetch_all(&mut *tx)
            .await
            .ctx("expand: read nas")?;
        let nas_by_ip: HashMap<String, i64> =
            nas.iter().map(|(id, ip)| (ip.clone(), *id)).collect();
        let nas_ids: Vec<i64> = nas.iter().map(|(id, _)| *id).collect();
        let mut looked_up: HashMap<i64, Option<Vars>> = HashMap::new();
        let params = match from {
            // Looked up in the billing database before this transaction began.
            super::ParamsFrom::Given { params, .. } => params,
            super::ParamsFrom::Query(params_query) => {
                for row in &compact {
                    if let std::collections::hash_map::Entry::Vacant(slot) =
                        looked_up.entry(row.event.user_id)
                    {
                        slot.insert(params_for(&mut tx, params_query, row.event.user_id).await?);
                    }
                }
                &looked_up
            }
        };
        let (events, failures) = plan_expansion(&compact, params, &nas_by_ip, &nas_ids);
        let now = ms(Utc::now());
        for e in &events {
            sqlx::query(
                "INSERT INTO events_stack (compact_id, event_date, enqueued_at, cmd, user_id, \
                 abonent_id, nas_id, usluga_id, acct_session_id, params, owner_script, owner_function) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, 'events_stack_compact', 'expand')",
            )
            .bind(e.compact_id)
            .bind(now)
            .bind(ms(e.enqueued_at))
            .bind(&e.cmd)
            .bind(e.user_id)
            .bind(e.abonent_id)
            .bind(e.nas_id)
            .bind(e.usluga_id)
            .bind(&e.acct_session_id)
            .bind(serde_json::Value::Object(e.params.clone()).to_string())
            .execute(&mut *tx)
            .await
            .ctx("expand: write events_stack")?;
        }
        for (row, reason) in &failures {
            let e = &row.event;
            sqlx::query(
                "INSERT INTO events_history (compact_id, enqueued_at, cmd, user_id, abonent_id, \
                 usluga_id, acct_session_id, outcome, attempts, error, finished_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'failed', 0, ?8, ?9)",
            )
            .bind(row.id)
            .bind(ms(row.created_at))
            .bind(&e.cmd)
            .bind(e.user_id)
            .bind(e.abonent_id)
            .bind(e.usluga_id)
            .bind(&e.acct_session_id)
            .bind(reason)
            .bind(now)
            .execute(&mut *tx)
            .await
            .ctx("expand: write history")?;
        }
        let (Some(first), Some(last)) = (compact.first(), compact.last()) else {
            return Ok(ExpandReport::default());
        };
        // The rows were read in id order under the write lock, so the range is exactly them.
        sqlx::query("DELETE FROM events_stack_compact WHERE id BETWEEN ?1 AND ?2")
            .bind(first.id)
            .bind(last.id)
            .execute(&mut *tx)
            .await
            .ctx("expand: delete compact rows")?;
        tx.commit().await.ctx("expand: commit")?;
        let mut touched: Vec<i64> = events.iter().map(|e| e.nas_id).collect();
        touched.sort_unstable();
        touched.dedup();
        Ok(ExpandReport {
            expanded: events.len(),
            failed: failures.len(),
            nas_ids: touched,
            notified_by: None,
        })
    }

    pub async fn load_windows(
        &self,
        windows: &[(i64, i64, i64)],
    ) -> Result<Vec<StackEvent>, StoreError> {
        // In-process: one query per window costs no round trip worth merging.
        let mut events = Vec::new();
        for (nas_id, after_id, limit) in windows {
            let rows = sqlx::query(
                "SELECT id, compact_id, event_date, enqueued_at, cmd, user_id, abonent_id, nas_id, \
                 usluga_id, acct_session_id, params, try_count, state, retry_at, claim_token, \
                 lease_until, last_error FROM events_stack WHERE nas_id = ?1 AND id > ?2 \
                 ORDER BY id LIMIT ?3",
            )
            .bind(nas_id)
            .bind(after_id)
            .bind(limit)
            .fetch_all(&self.pool)
            .await
            .ctx("load events")?;
            for row in &rows {
                events.push(stack_from_row(row).ctx("load events")?);
            }
        }
        Ok(events)
    }

    pub async fn claim(
        &self,
        claims: &[(i64, i64, i64)],
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
    ) -> Result<Vec<Claimed>, StoreError> {
        // One statement per token (one per owner in the batch), all in one transaction.
        // SQLite is one daemon: there is no ownership to fence, the epoch is ignored.
        let mut by_token: std::collections::HashMap<i64, Vec<i64>> =
            std::collections::HashMap::new();
        for (id, token, _epoch) in claims {
            by_token.entry(*token).or_default().push(*id);
        }
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .ctx("claim events")?;
        let mut claimed = Vec::with_capacity(claims.len());
        for (token, ids) in &by_token {
            // SQLite caps bound parameters; claim in slices well under the limit.
            for chunk in ids.chunks(500) {
                let sql = format!(
                    "UPDATE events_stack SET state = 'running', claim_token = ?1, claimed_at = ?2, \
                     lease_until = ?3, try_count = try_count + 1 WHERE id IN ({}) \
                     AND (state = 'ready' OR lease_until < ?2) RETURNING id, try_count",
                    placeholders(4, chunk.len())
                );
                let mut q = sqlx::query_as::<_, (i64, i32)>(&sql)
                    .bind(token)
                    .bind(ms(now))
                    .bind(ms(lease_until));
                for id in chunk {
                    q = q.bind(id);
                }
                let rows = q.fetch_all(&mut *tx).await.ctx("claim events")?;
                claimed.extend(
                    rows.into_iter()
                        .map(|(id, try_count)| Claimed { id, try_count }),
                );
            }
        }
        tx.commit().await.ctx("claim events: commit")?;
        Ok(claimed)
    }

    pub async fn complete(
        &self,
        finishes: &[Finish],
        reschedules: &[Reschedule],
        now: DateTime<Utc>,
    ) -> Result<Vec<i64>, StoreError> {
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .ctx("complete events")?;
        let mut applied = Vec::with_capacity(finishes.len() + reschedules.len());
        // A superseded event was claimed (which counts an attempt) but never sent: its
        // attempts are one less.
        for f in finishes {
            let commands = serde_json::to_string(&f.commands).unwrap_or_else(|_| "[]".into());
            let moved = sqlx::query(
                "INSERT INTO events_history (event_id, compact_id, event_date, enqueued_at, cmd, \
                 user_id, abonent_id, nas_id, usluga_id, acct_session_id, params, outcome, attempts, \
                 commands, answer, error, duration_ms, finished_at) \
                 SELECT id, compact_id, event_date, enqueued_at, cmd, user_id, abonent_id, nas_id, \
                 usluga_id, acct_session_id, params, ?3, try_count - (?3 = 'superseded'), \
                 ?4, ?5, ?6, ?7, ?8 FROM events_stack WHERE id = ?1 AND claim_token = ?2",
            )
            .bind(f.id)
            .bind(f.claim_token)
            .bind(f.outcome.as_str())
            .bind(commands)
            .bind(&f.answer)
            .bind(&f.error)
            .bind(f.duration_ms)
            .bind(ms(now))
            .execute(&mut *tx)
            .await
            .ctx("finish events")?;
            if moved.rows_affected() == 1 {
                sqlx::query("DELETE FROM events_stack WHERE id = ?1 AND claim_token = ?2")
                    .bind(f.id)
                    .bind(f.claim_token)
                    .execute(&mut *tx)
                    .await
                    .ctx("finish events")?;
                applied.push(f.id);
            }
        }
        for r in reschedules {
            let done = sqlx::query(
                "UPDATE events_stack SET state = 'ready', retry_at = ?3, last_error = ?4, \
                 claim_token = NULL, lease_until = NULL, try_count = try_count - ?5 \
                 WHERE id = ?1 AND claim_token = ?2",
            )
            .bind(r.id)
            .bind(r.claim_token)
            .bind(ms(r.retry_at))
            .bind(&r.error)
            .bind(i32::from(r.refund))
            .execute(&mut *tx)
            .await
            .ctx("reschedule events")?;
            if done.rows_affected() == 1 {
                applied.push(r.id);
            }
        }
        tx.commit().await.ctx("complete events: commit")?;
        Ok(applied)
    }

    pub async fn extend_leases(
        &self,
        claims: &[(i64, i64)],
        lease_until: DateTime<Utc>,
    ) -> Result<Vec<i64>, StoreError> {
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .ctx("extend leases")?;
        let mut extended = Vec::with_capacity(claims.len());
        for (id, token) in claims {
            let done = sqlx::query(
                "UPDATE events_stack SET lease_until = ?1 \
                 WHERE id = ?2 AND claim_token = ?3 AND state = 'running'",
            )
            .bind(ms(lease_until))
            .bind(id)
            .bind(token)
            .execute(&mut *tx)
            .await
            .ctx("extend leases")?;
            if done.rows_affected() == 1 {
                extended.push(*id);
            }
        }
        tx.commit().await.ctx("extend leases")?;
        Ok(extended)
    }

    pub async fn release(&self, ids: &[(i64, i64)]) -> Result<(), StoreError> {
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .ctx("release events")?;
        for (id, token) in ids {
            sqlx::query(
                "UPDATE events_stack SET state = 'ready', claim_token = NULL, lease_until = NULL \
                 WHERE id = ?1 AND claim_token = ?2",
            )
            .bind(id)
            .bind(token)
            .execute(&mut *tx)
            .await
            .ctx("release events")?;
        }
        tx.commit().await.ctx("release events")?;
        Ok(())
    }

    pub async fn stack_count(&self) -> Result<StackCount, StoreError> {
        let compact_total: i64 = sqlx::query_scalar("SELECT count(*) FROM events_stack_compact")
            .fetch_one(&self.pool)
            .await
            .ctx("count compact stack")?;
        let by_cmd: Vec<(String, i64)> = sqlx::query_as(
            "SELECT cmd, count(*) FROM events_stack GROUP BY cmd ORDER BY count(*) DESC, cmd",
        )
        .fetch_all(&self.pool)
        .await
        .ctx("count stack by cmd")?;
        let by_nas: Vec<(i64, i64)> = sqlx::query_as(
            "SELECT nas_id, count(*) FROM events_stack GROUP BY nas_id ORDER BY nas_id",
        )
        .fetch_all(&self.pool)
        .await
        .ctx("count stack by nas")?;
        let oldest: Option<i64> = sqlx::query_scalar(
            "SELECT min(t) FROM (SELECT min(enqueued_at) AS t FROM events_stack \
             UNION ALL SELECT min(created_at) FROM events_stack_compact)",
        )
        .fetch_one(&self.pool)
        .await
        .ctx("oldest event")?;
        Ok(StackCount {
            compact_total,
            stack_total: by_cmd.iter().map(|(_, n)| n).sum(),
            by_cmd,
            by_nas,
            oldest: oldest.map(from_ms),
        })
    }

    pub async fn history(
        &self,
        user_id: Option<i64>,
        limit: i64,
    ) -> Result<Vec<HistoryRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, event_id, compact_id, cmd, user_id, nas_id, outcome, attempts, commands, \
             answer, error, duration_ms, enqueued_at, finished_at FROM events_history \
             WHERE (?1 IS NULL OR user_id = ?1) ORDER BY id LIMIT ?2",
        )
        .bind(user_id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .ctx("read history")?;
        rows.iter()
            .map(|r| -> Result<HistoryRow, sqlx::Error> {
                let commands: String = r.try_get("commands")?;
                Ok(HistoryRow {
                    id: r.try_get("id")?,
                    event_id: r.try_get("event_id")?,
                    compact_id: r.try_get("compact_id")?,
                    cmd: r.try_get("cmd")?,
                    user_id: r.try_get("user_id")?,
                    nas_id: r.try_get("nas_id")?,
                    outcome: r.try_get("outcome")?,
                    attempts: r.try_get("attempts")?,
                    commands: serde_json::from_str(&commands).unwrap_or_default(),
                    answer: r.try_get("answer")?,
                    error: r.try_get("error")?,
                    duration_ms: r.try_get("duration_ms")?,
                    enqueued_at: from_ms(r.try_get("enqueued_at")?),
                    finished_at: from_ms(r.try_get("finished_at")?),
                })
            })
            .collect::<Result<_, _>>()
            .ctx("read history")
    }

    pub async fn history_counts(&self) -> Result<(i64, i64), StoreError> {
        let (done, failed): (i64, i64) = sqlx::query_as(
            "SELECT coalesce(sum(outcome <> 'failed'), 0), coalesce(sum(outcome = 'failed'), 0) \
             FROM events_history",
        )
        .fetch_one(&self.pool)
        .await
        .ctx("count history")?;
        Ok((done, failed))
    }

    pub async fn history_size(&self) -> Result<(i64, Option<i64>), StoreError> {
        let rows: i64 =
            sqlx::query_scalar("SELECT coalesce(max(id) - min(id) + 1, 0) FROM events_history")
                .fetch_one(&self.pool)
                .await
                .ctx("size of history")?;
        Ok((rows, None))
    }

    pub async fn prune_history(
        &self,
        cutoff: DateTime<Utc>,
        batch: i64,
        from: i64,
    ) -> Result<PruneStep, StoreError> {
        // SQLite removes a deleted row's index entries at once: scanning from `from`
        // each time costs nothing more, so the position stays where it is.
        let done = sqlx::query(
            "DELETE FROM events_history WHERE id IN (SELECT id FROM (SELECT id, finished_at \
             FROM events_history WHERE id >= ?3 ORDER BY id LIMIT ?2) WHERE finished_at < ?1)",
        )
        .bind(ms(cutoff))
        .bind(batch)
        .bind(from)
        .execute(&self.pool)
        .await
        .ctx("prune history")?;
        Ok(PruneStep {
            deleted: done.rows_affected(),
            next: from,
        })
    }

    pub async fn latencies_ms(&self) -> Result<Vec<f64>, StoreError> {
        sqlx::query_scalar(
            "SELECT CAST(finished_at - enqueued_at AS REAL) FROM events_history ORDER BY 1",
        )
        .fetch_all(&self.pool)
        .await
        .ctx("read latencies")
    }
}

async fn params_for(
    conn: &mut sqlx::SqliteConnection,
    params_query: &str,
    user_id: i64,
) -> Result<Option<Vars>, StoreError> {
    let row = sqlx::query(params_query)
        .bind(user_id)
        .fetch_optional(&mut *conn)
        .await
        .map_err(|e| StoreError::ParamsQuery(format!("user_id={user_id}: {e}")))?;
    match row {
        None => Ok(None),
        Some(row) => row_to_vars(&row).map(Some).map_err(StoreError::ParamsQuery),
    }
}

/// Turns one row of `params_query` into variables (NULLs left out; a JSON object in a
/// column named `extra` merged in). SQLite types each value, so the value decides.
fn row_to_vars(row: &SqliteRow) -> Result<Vars, String> {
    let mut vars = Vars::new();
    for (i, col) in row.columns().iter().enumerate() {
        let name = col.name();
        let raw = row.try_get_raw(i).map_err(|e| e.to_string())?;
        if raw.is_null() {
            continue;
        }
        let type_name = raw.type_info().name().to_string();
        let err = |e: sqlx::Error| format!("column {name}: {e}");
        let value: serde_json::Value = match type_name.as_str() {
            "INTEGER" => row.try_get::<i64, _>(i).map_err(err)?.into(),
            "REAL" => row.try_get::<f64, _>(i).map_err(err)?.into(),
            "TEXT" => row.try_get::<String, _>(i).map_err(err)?.into(),
            other => {
                return Err(format!(
                    "column {name} has type {other} that nasd cannot read: cast it to text in the query"
                ));
            }
        };
        if name == "extra" {
            if let serde_json::Value::String(text) = &value
                && let Ok(serde_json::Value::Object(map)) = serde_json::from_str(text)
            {
                for (k, v) in map {
                    vars.entry(k).or_insert(v);
                }
            }
            continue;
        }
        vars.insert(name.to_string(), value);
    }
    Ok(vars)
}

// Queries of the HTTP API: event status, account history, cancel, filters, queue depth.

pub(super) const STACK_COLUMNS: &str = "s.id, s.compact_id, s.event_date, s.enqueued_at, s.cmd, s.user_id, \
     s.abonent_id, s.nas_id, s.usluga_id, s.acct_session_id, s.params, s.try_count, s.state, \
     s.retry_at, s.claim_token, s.lease_until, s.last_error, n.ip AS nas_ip";
pub(super) const HISTORY_COLUMNS: &str = "h.event_id, h.compact_id, h.enqueued_at, h.cmd, h.user_id, \
     h.abonent_id, h.nas_id, h.usluga_id, h.acct_session_id, h.outcome, h.attempts, \
     h.commands, h.answer, h.error, h.duration_ms, h.finished_at, n.ip AS nas_ip, h.params";
pub(super) const COMPACT_COLUMNS: &str =
    "id, cmd, user_id, abonent_id, nas_ip, usluga_id, acct_session_id, created_at";

pub(super) fn compact_from_row(r: &SqliteRow) -> Result<CompactRow, sqlx::Error> {
    Ok(CompactRow {
        id: r.try_get("id")?,
        event: CompactEvent {
            cmd: r.try_get("cmd")?,
            user_id: r.try_get("user_id")?,
            abonent_id: r.try_get("abonent_id")?,
            nas_ip: r.try_get("nas_ip")?,
            usluga_id: r.try_get("usluga_id")?,
            acct_session_id: r.try_get("acct_session_id")?,
        },
        created_at: from_ms(r.try_get("created_at")?),
    })
}

pub(super) fn stack_from_row(r: &SqliteRow) -> Result<StackEvent, sqlx::Error> {
    let params: String = r.try_get("params")?;
    Ok(StackEvent {
        id: r.try_get("id")?,
        compact_id: r.try_get("compact_id")?,
        event_date: from_ms(r.try_get("event_date")?),
        enqueued_at: from_ms(r.try_get("enqueued_at")?),
        cmd: r.try_get("cmd")?,
        user_id: r.try_get("user_id")?,
        abonent_id: r.try_get("abonent_id")?,
        nas_id: r.try_get("nas_id")?,
        usluga_id: r.try_get("usluga_id")?,
        acct_session_id: r.try_get("acct_session_id")?,
        params: serde_json::from_str(&params).unwrap_or_default(),
        try_count: r.try_get("try_count")?,
        state: r.try_get("state")?,
        retry_at: r.try_get::<Option<i64>, _>("retry_at")?.map(from_ms),
        claim_token: r.try_get("claim_token")?,
        lease_until: r.try_get::<Option<i64>, _>("lease_until")?.map(from_ms),
        last_error: r.try_get("last_error")?,
    })
}

pub(super) fn history_status(r: &SqliteRow) -> Result<EventStatus, sqlx::Error> {
    let commands: String = r.try_get("commands")?;
    Ok(EventStatus {
        id: r
            .try_get::<Option<i64>, _>("compact_id")?
            .unwrap_or_default(),
        state: r.try_get("outcome")?,
        stage: "history".into(),
        stack_id: r.try_get("event_id")?,
        cmd: r.try_get("cmd")?,
        user_id: r.try_get("user_id")?,
        abonent_id: r.try_get("abonent_id")?,
        nas_id: r.try_get("nas_id")?,
        nas_ip: r.try_get("nas_ip")?,
        usluga_id: r.try_get("usluga_id")?,
        acct_session_id: r.try_get("acct_session_id")?,
        enqueued_at: from_ms(r.try_get("enqueued_at")?),
        try_count: r.try_get("attempts")?,
        next_try_at: None,
        error: r.try_get("error")?,
        commands: serde_json::from_str(&commands).unwrap_or_default(),
        answer: Some(r.try_get("answer")?),
        finished_at: Some(from_ms(r.try_get("finished_at")?)),
        duration_ms: Some(r.try_get("duration_ms")?),
        params: r
            .try_get::<Option<String>, _>("params")?
            .and_then(|p| serde_json::from_str::<crate::model::Vars>(&p).ok())
            .map(|p| super::visible_params(&p)),
    })
}

fn bind_filter<'q>(
    mut q: sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments<'q>>,
    filter: &'q Filter,
) -> sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments<'q>> {
    for v in filter.binds() {
        q = match v {
            FilterValue::Int(i) => q.bind(*i),
            FilterValue::Text(t) => q.bind(t.as_str()),
            FilterValue::Null => q,
        };
    }
    q
}

impl SqliteStore {
    pub async fn event_status(&self, id: i64) -> Result<Option<EventStatus>, StoreError> {
        let compact = sqlx::query(&format!(
            "SELECT {COMPACT_COLUMNS} FROM events_stack_compact WHERE id = ?1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .ctx("event status: compact stack")?;
        if let Some(r) = compact {
            let row = compact_from_row(&r).ctx("event status: compact stack")?;
            return Ok(Some(EventStatus::from_compact(&row)));
        }
        let stack = sqlx::query(&format!(
            "SELECT {STACK_COLUMNS} FROM events_stack s LEFT JOIN nas n ON n.id = s.nas_id \
             WHERE s.compact_id = ?1 ORDER BY s.id DESC LIMIT 1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .ctx("event status: stack")?;
        if let Some(r) = stack {
            let e = stack_from_row(&r).ctx("event status: stack")?;
            let ip: Option<String> = r.try_get("nas_ip").ctx("event status: stack")?;
            return Ok(Some(EventStatus::from_stack(&e, ip)));
        }
        let history = sqlx::query(&format!(
            "SELECT {HISTORY_COLUMNS} FROM events_history h LEFT JOIN nas n ON n.id = h.nas_id \
             WHERE h.compact_id = ?1 ORDER BY h.id DESC LIMIT 1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .ctx("event status: history")?;
        history
            .map(|r| history_status(&r))
            .transpose()
            .ctx("event status: history")
    }

    pub async fn account_events(
        &self,
        user_id: i64,
        limit: i64,
    ) -> Result<Vec<EventStatus>, StoreError> {
        let mut out = Vec::new();
        let compact = sqlx::query(&format!(
            "SELECT {COMPACT_COLUMNS} FROM events_stack_compact WHERE user_id = ?1 \
             ORDER BY id DESC LIMIT ?2"
        ))
        .bind(user_id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .ctx("account events: compact stack")?;
        for r in &compact {
            out.push(EventStatus::from_compact(
                &compact_from_row(r).ctx("account events: compact stack")?,
            ));
        }
        let stack = sqlx::query(&format!(
            "SELECT {STACK_COLUMNS} FROM events_stack s LEFT JOIN nas n ON n.id = s.nas_id \
             WHERE s.user_id = ?1 ORDER BY s.id DESC LIMIT ?2"
        ))
        .bind(user_id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .ctx("account events: stack")?;
        for r in &stack {
            let e = stack_from_row(r).ctx("account events: stack")?;
            let ip: Option<String> = r.try_get("nas_ip").ctx("account events: stack")?;
            out.push(EventStatus::from_stack(&e, ip));
        }
        let history = sqlx::query(&format!(
            "SELECT {HISTORY_COLUMNS} FROM events_history h LEFT JOIN nas n ON n.id = h.nas_id \
             WHERE h.user_id = ?1 ORDER BY h.id DESC LIMIT ?2"
        ))
        .bind(user_id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .ctx("account events: history")?;
        for r in &history {
            out.push(history_status(r).ctx("account events: history")?);
        }
        Ok(out)
    }

    /// Moves the event out of the compact stack, or out of the main stack while it is
    /// not claimed, into history as cancelled. Returns whether it moved.
    pub async fn cancel_event(&self, id: i64, now: DateTime<Utc>) -> Result<bool, StoreError> {
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .ctx("cancel event")?;
        let moved = sqlx::query(
            "INSERT INTO events_history (compact_id, enqueued_at, cmd, user_id, abonent_id, \
             usluga_id, acct_session_id, outcome, attempts, error, finished_at) \
             SELECT id, created_at, cmd, user_id, abonent_id, usluga_id, acct_session_id, \
             'failed', 0, ?2, ?3 FROM events_stack_compact WHERE id = ?1",
        )
        .bind(id)
        .bind(super::CANCELLED)
        .bind(ms(now))
        .execute(&mut *tx)
        .await
        .ctx("cancel event: compact stack")?
        .rows_affected();
        if moved > 0 {
            sqlx::query("DELETE FROM events_stack_compact WHERE id = ?1")
                .bind(id)
                .execute(&mut *tx)
                .await
                .ctx("cancel event: compact stack")?;
        } else {
            let moved_stack = sqlx::query(
                "INSERT INTO events_history (event_id, compact_id, event_date, enqueued_at, cmd, \
                 user_id, abonent_id, nas_id, usluga_id, acct_session_id, params, outcome, attempts, \
                 commands, answer, error, duration_ms, finished_at) \
                 SELECT id, compact_id, event_date, enqueued_at, cmd, user_id, abonent_id, nas_id, \
                 usluga_id, acct_session_id, params, 'failed', try_count, '[]', '', \
                 ?2 || coalesce(' (last error: ' || last_error || ')', ''), 0, ?3 \
                 FROM events_stack WHERE compact_id = ?1 AND state = 'ready'",
            )
            .bind(id)
            .bind(super::CANCELLED)
            .bind(ms(now))
            .execute(&mut *tx)
            .await
            .ctx("cancel event: stack")?
            .rows_affected();
            if moved_stack == 0 {
                tx.commit().await.ctx("cancel event: commit")?;
                return Ok(false);
            }
            sqlx::query("DELETE FROM events_stack WHERE compact_id = ?1 AND state = 'ready'")
                .bind(id)
                .execute(&mut *tx)
                .await
                .ctx("cancel event: stack")?;
        }
        tx.commit().await.ctx("cancel event: commit")?;
        Ok(true)
    }

    pub async fn compact_filter(&self, filter: &Filter) -> Result<Vec<CompactRow>, StoreError> {
        let sql = format!(
            "SELECT {COMPACT_COLUMNS} FROM events_stack_compact{}",
            filter.sql_tail("", |i| format!("?{i}"))
        );
        let rows = bind_filter(sqlx::query(&sql), filter)
            .fetch_all(&self.pool)
            .await
            .ctx("filter compact stack")?;
        rows.iter()
            .map(compact_from_row)
            .collect::<Result<_, _>>()
            .ctx("filter compact stack")
    }

    pub async fn stack_filter(&self, filter: &Filter) -> Result<Vec<StackEvent>, StoreError> {
        let sql = format!(
            "SELECT {STACK_COLUMNS} FROM events_stack s LEFT JOIN nas n ON n.id = s.nas_id{}",
            filter.sql_tail("s.", |i| format!("?{i}"))
        );
        let rows = bind_filter(sqlx::query(&sql), filter)
            .fetch_all(&self.pool)
            .await
            .ctx("filter stack")?;
        rows.iter()
            .map(stack_from_row)
            .collect::<Result<_, _>>()
            .ctx("filter stack")
    }

    pub async fn queue_by_nas(&self) -> Result<Vec<NasQueue>, StoreError> {
        let rows: Vec<(i64, i64, Option<i64>)> = sqlx::query_as(
            "SELECT nas_id, count(*), min(enqueued_at) FROM events_stack GROUP BY nas_id ORDER BY nas_id",
        )
        .fetch_all(&self.pool)
        .await
        .ctx("queue depth per nas")?;
        Ok(rows
            .into_iter()
            .map(|(nas_id, depth, oldest)| NasQueue {
                nas_id,
                depth,
                oldest: oldest.map(from_ms),
            })
            .collect())
    }

    pub fn pool_figures(&self) -> PoolFigures {
        PoolFigures {
            size: self.pool.size(),
            idle: self.pool.num_idle() as u32,
            max: self.pool.options().get_max_connections(),
        }
    }
}
