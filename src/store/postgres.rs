//! PostgreSQL backend: batched statements with arrays (`unnest`), `FOR UPDATE SKIP LOCKED`
//! claims, and LISTEN/NOTIFY as a wake-up hint for new compact rows.
//!
//! Every call opens its connection with `PgStore::open` and ends it with
//! `Session::done`. With `[database] statement_cache = false` ("pooled mode") that
//! connection is an explicit transaction and every statement is unnamed
//! (`persistent(false)`), which is what PgBouncer before 1.21 in `pool_mode =
//! transaction` needs (see `Session`).

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions, PgRow};
use sqlx::{Column, PgConnection, Postgres, Row, Transaction, TypeInfo, ValueRef};

use super::{
    AccountRecord, Claimed, CompactEvent, CompactRow, EventStatus, ExpandReport, Filter,
    FilterValue, Finish, HistoryRow, Nas, NasQueue, PoolFigures, PruneStep, Reschedule, Secret,
    SqlContext, StackCount, StackEvent, StoreError, plan_expansion,
};
use crate::model::Vars;

#[derive(Clone)]
pub struct PgStore {
    /// Calls made through `Store` (each one statement or one transaction).
    pub(super) calls: super::CallCounter,
    pool: PgPool,
    /// `params_query` -> its form for many users in one statement, or None when the
    /// server refused that form (then each user is looked up on its own).
    batched_params: std::sync::Arc<std::sync::Mutex<Option<BatchedParams>>>,
    /// Whether statements are named and kept by sqlx (`[database] statement_cache`,
    /// the default). False is the pooled mode: each call runs in an explicit
    /// transaction of its own and every statement is unnamed, passed to each query as
    /// `.persistent(self.persistent)`.
    pub(super) persistent: bool,
}

/// The connection one call of `PgStore` runs its statements on (`PgStore::open`).
///
/// sqlx runs a statement with parameters in two round trips: Parse/Describe/Sync, then
/// Bind/Execute/Sync. A pooler in transaction mode (PgBouncer before 1.21, or later
/// ones without `max_prepared_statements`) may hand the server connection to another
/// client at each Sync outside a transaction, so the second half can reach another
/// server than the first: a named statement is missing there or collides with another
/// client's name, and even an unnamed one runs whatever that server last parsed.
/// Inside a transaction the pooler keeps one server for the client from BEGIN to
/// COMMIT, so both halves of every unnamed statement reach the same server.
pub(super) enum Session {
    /// A connection of the pool on which each statement is its own implicit
    /// transaction (the default, `statement_cache = true`): no BEGIN or COMMIT.
    Plain(PoolConnection<Postgres>),
    /// An explicit transaction around the whole call (pooled mode).
    Tx(Transaction<'static, Postgres>),
}

impl Session {
    /// The connection to run the call's statements on.
    pub(super) fn exec(&mut self) -> &mut PgConnection {
        match self {
            Session::Plain(conn) => conn,
            Session::Tx(tx) => tx,
        }
    }

    /// Ends the call: commits the transaction in pooled mode; a plain connection goes
    /// back to the pool when dropped. A session dropped without this rolls back, which
    /// is how a call that failed half-way leaves nothing behind.
    pub(super) async fn done(self) -> Result<(), sqlx::Error> {
        match self {
            Session::Plain(_) => Ok(()),
            Session::Tx(tx) => tx.commit().await,
        }
    }
}

/// A `params_query` and its batched form (None: run per user).
type BatchedParams = (String, Option<String>);

/// The advisory lock key that serialises expansion across daemons ("nasdexpd").
const EXPAND_LOCK: i64 = 0x6e61_7364_6578_7064;

/// The payload of the `nasd_stack` notification: the NAS ids that got events, comma
/// separated; empty when they would not fit a notification (then nobody is woken by
/// it, and the daemons' safety net finds the events).
pub fn stack_notice(nas_ids: &[i64]) -> String {
    let text = nas_ids
        .iter()
        .map(|id| id.to_string())
        .collect::<Vec<_>>()
        .join(",");
    if text.len() > 7000 {
        String::new()
    } else {
        text
    }
}

/// The NAS ids of a `nasd_stack` notification (the ids that parse; an empty payload
/// gives none).
pub fn parse_stack_notice(payload: &str) -> Vec<i64> {
    payload
        .split(',')
        .filter_map(|id| id.trim().parse().ok())
        .collect()
}

impl PgStore {
    /// Per NAS, the highest event id above `after_id` (new rows since the last look).
    pub async fn stack_heads_after(&self, after_id: i64) -> Result<Vec<(i64, i64)>, StoreError> {
        let mut db = self.open().await.ctx("look for new events")?;
        let rows = sqlx::query(
            "SELECT nas_id, MAX(id) AS max_id FROM events_stack WHERE id > $1 GROUP BY nas_id",
        )
        .persistent(self.persistent)
        .bind(after_id)
        .fetch_all(db.exec())
        .await
        .ctx("look for new events")?;
        db.done().await.ctx("look for new events")?;
        rows.iter()
            .map(|r| Ok((r.try_get::<i64, _>(0)?, r.try_get::<i64, _>(1)?)))
            .collect::<Result<_, sqlx::Error>>()
            .ctx("look for new events")
    }

    pub async fn connect(url: &str, max_connections: u32) -> Result<PgStore, StoreError> {
        PgStore::connect_with(url, &super::ConnectOptions::new(max_connections)).await
    }

    /// Connects with `options`: the pool size and whether sqlx keeps its per-connection
    /// cache of prepared statements (`[database] statement_cache`).
    ///
    /// A server that cannot be reached is reported at once with its address and the
    /// cause, `cannot connect to PostgreSQL at 127.0.0.1:5432: connection refused` (the
    /// url's password never appears): a first connection of its own is opened before
    /// the pool, because the pool retries until its acquire timeout and then reports
    /// only that it timed out, hiding the cause.
    pub async fn connect_with(
        url: &str,
        options: &super::ConnectOptions,
    ) -> Result<PgStore, StoreError> {
        use sqlx::Connection as _;
        /// The longest the first connection, and later a connection of the pool, may take.
        const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
        let mut connect: PgConnectOptions = url.parse().map_err(|e| {
            StoreError::Invalid(format!("database url: {}", super::connect_cause(&e)))
        })?;
        if !options.statement_cache {
            // Capacity 0 is sqlx's switch for "no cache". sqlx 0.8 would still name
            // every statement run with `persistent(true)` and never close it; nasd's
            // own statements are all unnamed in this mode (`Session`), and the
            // migrator's named ones are cleaned up by `migrate_pooled`.
            connect = connect.statement_cache_capacity(0);
        }
        let at = match connect.get_socket() {
            Some(socket) => socket.display().to_string(),
            None => format!("{}:{}", connect.get_host(), connect.get_port()),
        };
        let failed = |cause: String| {
            StoreError::Invalid(format!("cannot connect to PostgreSQL at {at}: {cause}"))
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect_with(&connect)).await {
            Err(_) => {
                return Err(failed(format!(
                    "no answer within {}s",
                    CONNECT_TIMEOUT.as_secs()
                )));
            }
            Ok(Err(e)) => return Err(failed(super::connect_cause(&e))),
            // The server answers: the pool opens its own connections.
            Ok(Ok(first)) => {
                let _ = first.close().await;
            }
        }
        let pool = PgPoolOptions::new()
            .max_connections(options.max_connections)
            .acquire_timeout(CONNECT_TIMEOUT)
            // No ping before each statement (sqlx's default is one extra round trip per
            // acquire, doubling the cost of a short statement): a connection that broke
            // while idle fails its statement instead, which every caller already treats
            // as the database being away for a moment (retried), and sqlx closes it.
            .test_before_acquire(false)
            .connect_with(connect)
            .await
            .map_err(|e| failed(super::connect_cause(&e)))?;
        Ok(PgStore {
            calls: Default::default(),
            pool,
            batched_params: Default::default(),
            persistent: options.statement_cache,
        })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Whether this store runs in pooled mode (`[database] statement_cache = false`):
    /// each call in a transaction of its own, every statement unnamed, no LISTEN.
    pub fn pooled(&self) -> bool {
        !self.persistent
    }

    /// The connection for one call: a plain connection of the pool, or in pooled mode
    /// a transaction begun on one (one more round trip for BEGIN, one for COMMIT in
    /// `Session::done`). See `Session` for why.
    pub(super) async fn open(&self) -> Result<Session, sqlx::Error> {
        if self.persistent {
            Ok(Session::Plain(self.pool.acquire().await?))
        } else {
            Ok(Session::Tx(self.pool.begin().await?))
        }
    }

    /// A listener on the channel the compact-stack trigger notifies, or `None` when the
    /// connection is not one server session of its own (a pooler in transaction or
    /// statement mode, such as PgBouncer's `pool_mode = transaction`). There LISTEN
    /// would register on whichever server connection happened to run it: the listener
    /// would receive nothing, and the notifications would arrive later in the middle of
    /// other clients' statements on that server connection, which sqlx fails with
    /// "unexpected message: NotificationResponse". So the check runs before LISTEN.
    /// In pooled mode (`statement_cache = false`) there is no LISTEN at all: that mode
    /// exists for transaction pooling, where it could not work, and the check would
    /// cost a connection for nothing.
    pub async fn listen_compact(&self) -> Result<Option<PgListener>, StoreError> {
        if self.pooled() {
            return Ok(None);
        }
        let mut listener = PgListener::connect_with(&self.pool).await.ctx("listen")?;
        if !self
            .owns_its_session(&mut listener)
            .await
            .ctx("listen: check that the connection is one server session")?
        {
            return Ok(None);
        }
        // New compact rows (expand them) and events another daemon expanded (wake the
        // owners of their NAS).
        listener
            .listen_all(["nasd_compact", "nasd_stack"])
            .await
            .ctx("listen")?;
        Ok(Some(listener))
    }

    /// Whether `listener`'s connection is one server session of its own: its backend
    /// stays the same across statements and no other connection of the pool ever runs
    /// on it. Behind a pooler in transaction mode the backend changes between
    /// statements or turns up under another client (PgBouncer hands out the server it
    /// released last), which a few rounds of `pg_backend_pid()` show without changing
    /// any session state. The simple protocol is used, so the check itself works where
    /// prepared statements do not.
    async fn owns_its_session(&self, listener: &mut PgListener) -> Result<bool, sqlx::Error> {
        use sqlx::Executor;
        // A bare string is sent as a simple query (no parameters, nothing prepared).
        const BACKEND: &str = "SELECT pg_backend_pid()";
        let own: i32 = (&mut *listener).fetch_one(BACKEND).await?.try_get(0)?;
        for _ in 0..3 {
            let other: i32 = (&self.pool).fetch_one(BACKEND).await?.try_get(0)?;
            let again: i32 = (&mut *listener).fetch_one(BACKEND).await?.try_get(0)?;
            if other == own || again != own {
                return Ok(false);
            }
        }
        Ok(true)
    }

    pub async fn migrate(&self) -> Result<(), StoreError> {
        let mut migrator = sqlx::migrate!("migrations/postgres");
        if self.pooled() {
            return self.migrate_pooled(&mut migrator).await;
        }
        migrator.run(&self.pool).await?;
        Ok(())
    }

    /// The migrations in pooled mode, as one transaction. sqlx's migrator takes a
    /// session-level advisory lock (`pg_advisory_lock`) for its whole run, which behind
    /// a transaction pooler would stay held by whichever server connection ran it, and
    /// it runs named statements outside any transaction, which a transaction pooler
    /// breaks (see `Session`). So the transaction takes the migrator's own lock key at
    /// transaction level (the commit releases it, and it still excludes a migrator on a
    /// direct connection, which locks the same key), and runs sqlx's migrator inside
    /// with its locking off, where each migration becomes a savepoint: daemons started
    /// together through the pooler migrate one after the other. The named statements
    /// the migrator leaves on the server are deallocated before the commit, since the
    /// next client the pooler gives that server connection to would collide with them.
    async fn migrate_pooled(
        &self,
        migrator: &mut sqlx::migrate::Migrator,
    ) -> Result<(), StoreError> {
        migrator.set_locking(false);
        let mut tx = self.pool.begin().await.ctx("migrate: begin")?;
        let database: String = sqlx::query_scalar("SELECT current_database()")
            .persistent(false)
            .fetch_one(&mut *tx)
            .await
            .ctx("migrate: name the database")?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .persistent(false)
            .bind(migrator_lock_id(&database))
            .execute(&mut *tx)
            .await
            .ctx("migrate: wait for the migration lock")?;
        // Names left on this server connection by an earlier migrator that failed (a
        // rollback does not remove prepared statements) or by a client with the cache
        // on: the migrator below starts naming at sqlx_s_1 and would meet them.
        deallocate_sqlx_statements(&mut tx)
            .await
            .ctx("migrate: deallocate leftover sqlx statements")?;
        // `run_direct` is `run` on a connection: `run` with a borrowed transaction
        // makes the future fail to be `Send` ("Acquire is not general enough"), the
        // case sqlx added `run_direct` for.
        migrator.run_direct(&mut *tx).await?;
        deallocate_sqlx_statements(&mut tx)
            .await
            .ctx("migrate: deallocate the migrator's statements")?;
        tx.commit().await.ctx("migrate: commit")?;
        Ok(())
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        let mut db = self.open().await.ctx("ping")?;
        sqlx::query("SELECT 1")
            .persistent(self.persistent)
            .execute(db.exec())
            .await
            .ctx("ping")?;
        db.done().await.ctx("ping")?;
        Ok(())
    }

    pub async fn nas_list(&self) -> Result<Vec<Nas>, StoreError> {
        let mut db = self.open().await.ctx("list nas")?;
        let rows = sqlx::query(
            "SELECT id, name, ip, scheme, script_name, n_workers, protocol, port, login, password, \
             secret, max_sessions, enabled, host_key_policy, host_key, legacy_crypto, paused FROM nas ORDER BY id",
        )
        .persistent(self.persistent)
        .fetch_all(db.exec())
        .await
        .ctx("list nas")?;
        db.done().await.ctx("list nas")?;
        rows.iter()
            .map(nas_from_row)
            .collect::<Result<_, _>>()
            .ctx("list nas")
    }

    pub async fn nas_upsert(&self, nas: &Nas) -> Result<(), StoreError> {
        let mut db = self.open().await.ctx("save nas")?;
        sqlx::query(
            "INSERT INTO nas (id, name, ip, scheme, script_name, n_workers, protocol, port, login, \
             password, secret, max_sessions, enabled, host_key_policy, host_key, legacy_crypto, paused, \
             updated_at) \
             VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16,$17, clock_timestamp()) \
             ON CONFLICT (id) DO UPDATE SET name=EXCLUDED.name, ip=EXCLUDED.ip, \
             scheme=EXCLUDED.scheme, script_name=EXCLUDED.script_name, n_workers=EXCLUDED.n_workers, \
             protocol=EXCLUDED.protocol, port=EXCLUDED.port, login=EXCLUDED.login, \
             password=EXCLUDED.password, secret=EXCLUDED.secret, max_sessions=EXCLUDED.max_sessions, \
             enabled=EXCLUDED.enabled, host_key_policy=EXCLUDED.host_key_policy, \
             host_key=EXCLUDED.host_key, legacy_crypto=EXCLUDED.legacy_crypto, paused=EXCLUDED.paused, \
             updated_at=clock_timestamp()",
        )
        .persistent(self.persistent)
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
        .bind(&nas.host_key_policy)
        .bind(&nas.host_key)
        .bind(nas.legacy_crypto)
        .bind(nas.paused)
        .execute(db.exec())
        .await
        .ctx("save nas")?;
        db.done().await.ctx("save nas")?;
        Ok(())
    }

    pub async fn nas_remove(&self, id: i64) -> Result<bool, StoreError> {
        let mut db = self.open().await.ctx("remove nas")?;
        let done = sqlx::query("DELETE FROM nas WHERE id = $1")
            .persistent(self.persistent)
            .bind(id)
            .execute(db.exec())
            .await
            .ctx("remove nas")?;
        db.done().await.ctx("remove nas")?;
        Ok(done.rows_affected() > 0)
    }

    pub async fn accounts_upsert(&self, records: &[AccountRecord]) -> Result<u64, StoreError> {
        // Already one transaction in either mode.
        let mut tx = self.pool.begin().await.ctx("import accounts")?;
        for rec in records {
            sqlx::query(
                "INSERT INTO accounts (user_id, abonent_id, nas_id, login, ip, mac, vlan, auth_type, \
                 snat_ip, rate_in, rate_out, ceil_in, ceil_out, burst_in, burst_out, extra) \
                 VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16) \
                 ON CONFLICT (user_id) DO UPDATE SET abonent_id=EXCLUDED.abonent_id, \
                 nas_id=EXCLUDED.nas_id, login=EXCLUDED.login, ip=EXCLUDED.ip, mac=EXCLUDED.mac, \
                 vlan=EXCLUDED.vlan, auth_type=EXCLUDED.auth_type, snat_ip=EXCLUDED.snat_ip, \
                 rate_in=EXCLUDED.rate_in, rate_out=EXCLUDED.rate_out, ceil_in=EXCLUDED.ceil_in, \
                 ceil_out=EXCLUDED.ceil_out, burst_in=EXCLUDED.burst_in, burst_out=EXCLUDED.burst_out, \
                 extra=EXCLUDED.extra, updated_at=clock_timestamp()",
            )
            .persistent(self.persistent)
            .bind(rec.int("user_id"))
            .bind(rec.int("abonent_id"))
            .bind(rec.int("nas_id"))
            .bind(rec.text("login"))
            .bind(rec.text("ip"))
            .bind(rec.text("mac"))
            .bind(rec.int("vlan").map(|v| v as i32))
            .bind(rec.text("auth_type"))
            .bind(rec.text("snat_ip"))
            .bind(rec.int("rate_in"))
            .bind(rec.int("rate_out"))
            .bind(rec.int("ceil_in"))
            .bind(rec.int("ceil_out"))
            .bind(rec.int("burst_in"))
            .bind(rec.int("burst_out"))
            .bind(serde_json::Value::Object(rec.extra.clone()))
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
        let mut db = self.open().await.ctx("params_query")?;
        let vars = params_for(db.exec(), params_query, user_id, self.persistent).await?;
        db.done().await.ctx("params_query")?;
        Ok(vars)
    }

    pub async fn enqueue_compact(&self, events: &[CompactEvent]) -> Result<Vec<i64>, StoreError> {
        let cmds: Vec<&str> = events.iter().map(|e| e.cmd.as_str()).collect();
        let users: Vec<i64> = events.iter().map(|e| e.user_id).collect();
        let abonents: Vec<Option<i64>> = events.iter().map(|e| e.abonent_id).collect();
        let ips: Vec<Option<&str>> = events.iter().map(|e| e.nas_ip.as_deref()).collect();
        let uslugas: Vec<Option<i64>> = events.iter().map(|e| e.usluga_id).collect();
        let sessions: Vec<Option<&str>> = events
            .iter()
            .map(|e| e.acct_session_id.as_deref())
            .collect();
        let mut db = self.open().await.ctx("enqueue")?;
        let ids: Vec<i64> = sqlx::query_scalar(
            "INSERT INTO events_stack_compact (cmd, user_id, abonent_id, nas_ip, usluga_id, acct_session_id) \
             SELECT cmd, user_id, abonent_id, nas_ip, usluga_id, acct_session_id FROM \
             unnest($1::text[], $2::bigint[], $3::bigint[], $4::text[], $5::bigint[], $6::text[]) \
             WITH ORDINALITY AS t(cmd, user_id, abonent_id, nas_ip, usluga_id, acct_session_id, ord) \
             ORDER BY ord RETURNING id",
        )
        .persistent(self.persistent)
        .bind(&cmds)
        .bind(&users)
        .bind(&abonents)
        .bind(&ips)
        .bind(&uslugas)
        .bind(&sessions)
        .fetch_all(db.exec())
        .await
        .ctx("enqueue")?;
        db.done().await.ctx("enqueue")?;
        Ok(ids)
    }

    /// Expands with a synchronous commit: an expansion lost in a crash of the server
    /// would be expanded again under new event ids, and commands already sent for the
    /// lost ids would name events that exist nowhere (the fault harness counts them).
    pub async fn expand(
        &self,
        from: super::ParamsFrom<'_>,
        limit: i64,
    ) -> Result<ExpandReport, StoreError> {
        let mut tx = self.pool.begin().await.ctx("expand")?;
        // One expander at a time in the whole cluster: the main stack's ids must follow
        // compact-id order (owners refill their windows by `id > max_loaded_id`), so two
        // daemons must not expand side by side. A transaction-level advisory lock (it
        // works through a transaction-mode pooler and ends with the transaction); a
        // daemon that does not get it reads no rows and looks again at its next poll.
        // A daemon frozen in the middle of this transaction would hold the lock (and so
        // every expansion of the cluster) while it is stopped: the server ends a
        // transaction left idle for 5 s (set for this transaction only).
        let rows = sqlx::query(
            "SELECT id, cmd, user_id, abonent_id, nas_ip, usluga_id, acct_session_id, created_at \
             FROM events_stack_compact, \
             (SELECT set_config('idle_in_transaction_session_timeout', '5000', true)) AS t \
             WHERE pg_try_advisory_xact_lock($2) AND id <= $3 \
             ORDER BY id LIMIT $1 FOR UPDATE OF events_stack_compact SKIP LOCKED",
        )
        .persistent(self.persistent)
        .bind(limit)
        .bind(EXPAND_LOCK)
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
            .persistent(self.persistent)
            .fetch_all(&mut *tx)
            .await
            .ctx("expand: read nas")?;
        let nas_by_ip: HashMap<String, i64> =
            nas.iter().map(|(id, ip)| (ip.clone(), *id)).collect();
        let nas_ids: Vec<i64> = nas.iter().map(|(id, _)| *id).collect();
        let mut users: Vec<i64> = compact.iter().map(|r| r.event.user_id).collect();
        users.sort_unstable();
        users.dedup();
        let mut looked_up: HashMap<i64, Option<Vars>> = HashMap::new();
        let params = match from {
            // Looked up in the billing database before this transaction began.
            super::ParamsFrom::Given { params, .. } => params,
            super::ParamsFrom::Query(params_query) => {
                looked_up.reserve(users.len());
                match self.batched_params_query(params_query, &mut tx).await? {
                    Some(batched) => {
                        // One statement for every user of the batch instead of one each.
                        let rows = sqlx::query(&batched)
                            .persistent(self.persistent)
                            .bind(&users)
                            .fetch_all(&mut *tx)
                            .await
                            .map_err(|e| StoreError::ParamsQuery(e.to_string()))?;
                        for row in &rows {
                            let user_id: i64 = row
                                .try_get(0)
                                .map_err(|e| StoreError::ParamsQuery(e.to_string()))?;
                            let vars = row_to_vars(row, 1).map_err(StoreError::ParamsQuery)?;
                            looked_up.insert(user_id, Some(vars));
                        }
                        for user_id in users {
                            looked_up.entry(user_id).or_insert(None);
                        }
                    }
                    None => {
                        for user_id in users {
                            looked_up.insert(
                                user_id,
                                params_for(&mut tx, params_query, user_id, self.persistent).await?,
                            );
                        }
                    }
                }
                &looked_up
            }
        };
        let (events, failures) = plan_expansion(&compact, params, &nas_by_ip, &nas_ids);

        if !events.is_empty() {
            let compact_ids: Vec<Option<i64>> = events.iter().map(|e| e.compact_id).collect();
            let enqueued: Vec<DateTime<Utc>> = events.iter().map(|e| e.enqueued_at).collect();
            let cmds: Vec<&str> = events.iter().map(|e| e.cmd.as_str()).collect();
            let users: Vec<i64> = events.iter().map(|e| e.user_id).collect();
            let abonents: Vec<Option<i64>> = events.iter().map(|e| e.abonent_id).collect();
            let nas_ids: Vec<i64> = events.iter().map(|e| e.nas_id).collect();
            let uslugas: Vec<Option<i64>> = events.iter().map(|e| e.usluga_id).collect();
            let sessions: Vec<Option<&str>> = events
                .iter()
                .map(|e| e.acct_session_id.as_deref())
                .collect();
            let params: Vec<String> = events
                .iter()
                .map(|e| serde_json::Value::Object(e.params.clone()).to_string())
                .collect();
            sqlx::query(
                "INSERT INTO events_stack (compact_id, enqueued_at, cmd, user_id, abonent_id, nas_id, \
                 usluga_id, acct_session_id, params, owner_script, owner_function) \
                 SELECT compact_id, enqueued_at, cmd, user_id, abonent_id, nas_id, usluga_id, \
                 acct_session_id, params::jsonb, 'events_stack_compact', 'expand' FROM \
                 unnest($1::bigint[], $2::timestamptz[], $3::text[], $4::bigint[], $5::bigint[], \
                 $6::bigint[], $7::bigint[], $8::text[], $9::text[]) WITH ORDINALITY AS \
                 t(compact_id, enqueued_at, cmd, user_id, abonent_id, nas_id, usluga_id, \
                 acct_session_id, params, ord) ORDER BY ord",
            )
            .persistent(self.persistent)
            .bind(&compact_ids)
            .bind(&enqueued)
            .bind(&cmds)
            .bind(&users)
            .bind(&abonents)
            .bind(&nas_ids)
            .bind(&uslugas)
            .bind(&sessions)
            .bind(&params)
            .execute(&mut *tx)
            .await
            .ctx("expand: write events_stack")?;
        }
        for (row, reason) in &failures {
            let e = &row.event;
            sqlx::query(
                "INSERT INTO events_history (compact_id, enqueued_at, cmd, user_id, abonent_id, \
                 usluga_id, acct_session_id, outcome, attempts, error) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, 'failed', 0, $8)",
            )
            .persistent(self.persistent)
            .bind(row.id)
            .bind(row.created_at)
            .bind(&e.cmd)
            .bind(e.user_id)
            .bind(e.abonent_id)
            .bind(e.usluga_id)
            .bind(&e.acct_session_id)
            .bind(reason)
            .execute(&mut *tx)
            .await
            .ctx("expand: write history")?;
        }
        let ids: Vec<i64> = compact.iter().map(|r| r.id).collect();
        let mut touched: Vec<i64> = events.iter().map(|e| e.nas_id).collect();
        touched.sort_unstable();
        touched.dedup();
        // The other daemons of the cluster learn which NAS got events (their owners are
        // woken; a hint delivered at commit, they poll as well).
        // The backend's pid comes back so that this daemon's expander can tell its own
        // notification from another daemon's.
        let notified_by: Option<i32> = sqlx::query_scalar(
            "WITH d AS (DELETE FROM events_stack_compact WHERE id = ANY($1) RETURNING 1) \
             SELECT pg_backend_pid() FROM (SELECT pg_notify('nasd_stack', $2) \
             WHERE $2 <> '' AND EXISTS (SELECT 1 FROM d)) AS n",
        )
        .persistent(self.persistent)
        .bind(&ids)
        .bind(stack_notice(&touched))
        .fetch_optional(&mut *tx)
        .await
        .ctx("expand: delete compact rows")?;
        tx.commit().await.ctx("expand: commit")?;
        Ok(ExpandReport {
            expanded: events.len(),
            failed: failures.len(),
            nas_ids: touched,
            notified_by,
        })
    }

    pub async fn load_windows(
        &self,
        windows: &[(i64, i64, i64)],
    ) -> Result<Vec<StackEvent>, StoreError> {
        let nas: Vec<i64> = windows.iter().map(|w| w.0).collect();
        let after: Vec<i64> = windows.iter().map(|w| w.1).collect();
        let limit: Vec<i64> = windows.iter().map(|w| w.2).collect();
        let mut db = self.open().await.ctx("load events")?;
        let rows = sqlx::query(
            "SELECT e.* FROM unnest($1::bigint[], $2::bigint[], $3::bigint[]) AS f(nas, after, lim) \
             CROSS JOIN LATERAL (SELECT id, compact_id, event_date, enqueued_at, cmd, user_id, \
             abonent_id, nas_id, usluga_id, acct_session_id, params, try_count, state, retry_at, \
             claim_token, lease_until, last_error FROM events_stack \
             WHERE nas_id = f.nas AND id > f.after ORDER BY id LIMIT f.lim) e ORDER BY e.id",
        )
        .persistent(self.persistent)
        .bind(&nas)
        .bind(&after)
        .bind(&limit)
        .fetch_all(db.exec())
        .await
        .ctx("load events")?;
        db.done().await.ctx("load events")?;
        rows.iter()
            .map(stack_from_row)
            .collect::<Result<_, _>>()
            .ctx("load events")
    }

    /// Claims with asynchronous commit: a claim lost in a crash leaves its row ready
    /// (and its try count as it was), which is what an expired lease would give after
    /// the restart anyway; and a later synchronous commit (the completion) flushes the
    /// WAL up to and including the claim, so no result outlives the claim it fences.
    pub async fn claim(
        &self,
        claims: &[(i64, i64, i64)],
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
    ) -> Result<Vec<Claimed>, StoreError> {
        let ids: Vec<i64> = claims.iter().map(|c| c.0).collect();
        let tokens: Vec<i64> = claims.iter().map(|c| c.1).collect();
        let epochs: Vec<i64> = claims.iter().map(|c| c.2).collect();
        // One round trip: the statement's own implicit transaction commits with the
        // setting it made (set_config(..., true) lasts until that commit). In pooled
        // mode the call's explicit transaction holds only this statement, and its
        // COMMIT is the one the setting applies to: the same effect.
        // The epoch fence: a row is taken only while its NAS is owned under the claim's
        // epoch by a daemon whose lease is current, so a daemon that lost the NAS (and
        // has not noticed yet) claims nothing.
        let mut db = self.open().await.ctx("claim events")?;
        let rows: Vec<(i64, i32)> = sqlx::query_as(&format!(
            "WITH sc AS MATERIALIZED (SELECT set_config('synchronous_commit', 'off', true)), \
             f AS (SELECT u.* FROM sc, unnest($1::bigint[], $2::bigint[], $5::bigint[]) \
             AS u(id, tok, epoch)), \
             c AS MATERIALIZED (SELECT s.id, f.tok FROM events_stack s JOIN f ON s.id = f.id \
             WHERE (s.state = 'ready' OR s.lease_until < $3) AND (f.epoch = 0 OR EXISTS \
             (SELECT 1 FROM nas_owner o WHERE o.nas_id = s.nas_id AND o.epoch = f.epoch \
             AND {})) FOR UPDATE OF s SKIP LOCKED) \
             UPDATE events_stack s SET state = 'running', claim_token = c.tok, claimed_at = $3, \
             lease_until = $4, try_count = s.try_count + 1 FROM c WHERE s.id = c.id \
             RETURNING s.id, s.try_count",
            super::cluster::VALID_OWNER
        ))
        .persistent(self.persistent)
        .bind(&ids)
        .bind(&tokens)
        .bind(now)
        .bind(lease_until)
        .bind(&epochs)
        .fetch_all(db.exec())
        .await
        .ctx("claim events")?;
        db.done().await.ctx("claim events")?;
        Ok(rows
            .into_iter()
            .map(|(id, try_count)| Claimed { id, try_count })
            .collect())
    }

    /// Records finishes and reschedules in one statement (its own transaction, one
    /// round trip; in pooled mode the only statement of the call's transaction):
    /// data-modifying CTEs of one statement commit or fail together. A superseded event
    /// was claimed (which counts an attempt) but never sent: its attempts are one less.
    pub async fn complete(
        &self,
        finishes: &[Finish],
        reschedules: &[Reschedule],
        now: DateTime<Utc>,
    ) -> Result<Vec<i64>, StoreError> {
        let ids: Vec<i64> = finishes.iter().map(|f| f.id).collect();
        let tokens: Vec<i64> = finishes.iter().map(|f| f.claim_token).collect();
        let outcomes: Vec<&str> = finishes.iter().map(|f| f.outcome.as_str()).collect();
        let commands: Vec<String> = finishes
            .iter()
            .map(|f| serde_json::to_string(&f.commands).unwrap_or_else(|_| "[]".into()))
            .collect();
        let answers: Vec<&str> = finishes.iter().map(|f| f.answer.as_str()).collect();
        let errors: Vec<Option<&str>> = finishes.iter().map(|f| f.error.as_deref()).collect();
        let durations: Vec<i64> = finishes.iter().map(|f| f.duration_ms).collect();
        let r_ids: Vec<i64> = reschedules.iter().map(|r| r.id).collect();
        let r_tokens: Vec<i64> = reschedules.iter().map(|r| r.claim_token).collect();
        let retry_at: Vec<DateTime<Utc>> = reschedules.iter().map(|r| r.retry_at).collect();
        let r_errors: Vec<&str> = reschedules.iter().map(|r| r.error.as_str()).collect();
        let refunds: Vec<i32> = reschedules.iter().map(|r| i32::from(r.refund)).collect();
        let mut db = self.open().await.ctx("complete events")?;
        let applied: Vec<i64> = sqlx::query_scalar(
            "WITH f AS (SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::text[], \
             $5::text[], $6::text[], $7::bigint[]) AS f(id, tok, outcome, commands, answer, error, \
             duration_ms)), \
             moved AS (DELETE FROM events_stack s USING f WHERE s.id = f.id AND s.claim_token = f.tok \
             RETURNING s.*, f.outcome AS f_outcome, f.commands AS f_commands, f.answer AS f_answer, \
             f.error AS f_error, f.duration_ms AS f_duration), \
             finished AS (INSERT INTO events_history (event_id, compact_id, event_date, enqueued_at, \
             cmd, user_id, abonent_id, nas_id, usluga_id, acct_session_id, params, outcome, attempts, \
             commands, answer, error, duration_ms, finished_at) \
             SELECT id, compact_id, event_date, enqueued_at, cmd, user_id, abonent_id, nas_id, \
             usluga_id, acct_session_id, params, f_outcome, \
             try_count - (f_outcome = 'superseded')::int, f_commands::jsonb, f_answer, \
             f_error, f_duration, $8 FROM moved ORDER BY id RETURNING event_id), \
             rescheduled AS (UPDATE events_stack s SET state = 'ready', retry_at = r.retry_at, \
             last_error = r.error, claim_token = NULL, lease_until = NULL, \
             try_count = s.try_count - r.refund \
             FROM unnest($9::bigint[], $10::bigint[], $11::timestamptz[], $12::text[], $13::int[]) \
             AS r(id, tok, retry_at, error, refund) \
             WHERE s.id = r.id AND s.claim_token = r.tok RETURNING s.id) \
             SELECT event_id FROM finished UNION ALL SELECT id FROM rescheduled",
        )
        .persistent(self.persistent)
        .bind(&ids)
        .bind(&tokens)
        .bind(&outcomes)
        .bind(&commands)
        .bind(&answers)
        .bind(&errors)
        .bind(&durations)
        .bind(now)
        .bind(&r_ids)
        .bind(&r_tokens)
        .bind(&retry_at)
        .bind(&r_errors)
        .bind(&refunds)
        .fetch_all(db.exec())
        .await
        .ctx("complete events")?;
        db.done().await.ctx("complete events")?;
        Ok(applied)
    }

    pub async fn extend_leases(
        &self,
        claims: &[(i64, i64)],
        lease_until: DateTime<Utc>,
    ) -> Result<Vec<i64>, StoreError> {
        let (ids, tokens): (Vec<i64>, Vec<i64>) = claims.iter().copied().unzip();
        // Asynchronous commit, as for claims (one round trip, the same way): only a
        // crash of the server can lose a renewal, and that ends every session holding
        // a lease anyway.
        let mut db = self.open().await.ctx("extend leases")?;
        let extended: Vec<i64> = sqlx::query_scalar(
            "WITH sc AS MATERIALIZED (SELECT set_config('synchronous_commit', 'off', true)) \
             UPDATE events_stack s SET lease_until = $3 \
             FROM sc, unnest($1::bigint[], $2::bigint[]) AS f(id, tok) \
             WHERE s.id = f.id AND s.claim_token = f.tok AND s.state = 'running' \
             RETURNING s.id",
        )
        .persistent(self.persistent)
        .bind(&ids)
        .bind(&tokens)
        .bind(lease_until)
        .fetch_all(db.exec())
        .await
        .ctx("extend leases")?;
        db.done().await.ctx("extend leases")?;
        Ok(extended)
    }

    pub async fn release(&self, ids: &[(i64, i64)]) -> Result<(), StoreError> {
        let (ids, tokens): (Vec<i64>, Vec<i64>) = ids.iter().copied().unzip();
        let mut db = self.open().await.ctx("release events")?;
        sqlx::query(
            "UPDATE events_stack s SET state = 'ready', claim_token = NULL, lease_until = NULL \
             FROM unnest($1::bigint[], $2::bigint[]) AS f(id, tok) \
             WHERE s.id = f.id AND s.claim_token = f.tok",
        )
        .persistent(self.persistent)
        .bind(&ids)
        .bind(&tokens)
        .execute(db.exec())
        .await
        .ctx("release events")?;
        db.done().await.ctx("release events")?;
        Ok(())
    }

    pub async fn stack_count(&self) -> Result<StackCount, StoreError> {
        let mut db = self.open().await.ctx("count stacks")?;
        let compact_total: i64 = sqlx::query_scalar("SELECT count(*) FROM events_stack_compact")
            .persistent(self.persistent)
            .fetch_one(db.exec())
            .await
            .ctx("count compact stack")?;
        let by_cmd: Vec<(String, i64)> = sqlx::query_as(
            "SELECT cmd, count(*) FROM events_stack GROUP BY cmd ORDER BY count(*) DESC, cmd",
        )
        .persistent(self.persistent)
        .fetch_all(db.exec())
        .await
        .ctx("count stack by cmd")?;
        let by_nas: Vec<(i64, i64)> = sqlx::query_as(
            "SELECT nas_id, count(*) FROM events_stack GROUP BY nas_id ORDER BY nas_id",
        )
        .persistent(self.persistent)
        .fetch_all(db.exec())
        .await
        .ctx("count stack by nas")?;
        let oldest: Option<DateTime<Utc>> = sqlx::query_scalar(
            "SELECT min(t) FROM (SELECT min(enqueued_at) AS t FROM events_stack \
             UNION ALL SELECT min(created_at) FROM events_stack_compact) x",
        )
        .persistent(self.persistent)
        .fetch_one(db.exec())
        .await
        .ctx("oldest event")?;
        db.done().await.ctx("count stacks")?;
        Ok(StackCount {
            compact_total,
            stack_total: by_cmd.iter().map(|(_, n)| n).sum(),
            by_cmd,
            by_nas,
            oldest,
        })
    }

    pub async fn history(
        &self,
        user_id: Option<i64>,
        limit: i64,
    ) -> Result<Vec<HistoryRow>, StoreError> {
        let mut db = self.open().await.ctx("read history")?;
        let rows = sqlx::query(
            "SELECT id, event_id, compact_id, cmd, user_id, nas_id, outcome, attempts, \
             commands::text AS commands, answer, error, duration_ms, enqueued_at, finished_at \
             FROM events_history WHERE ($1::bigint IS NULL OR user_id = $1) ORDER BY id LIMIT $2",
        )
        .persistent(self.persistent)
        .bind(user_id)
        .bind(limit)
        .fetch_all(db.exec())
        .await
        .ctx("read history")?;
        db.done().await.ctx("read history")?;
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
                    enqueued_at: r.try_get("enqueued_at")?,
                    finished_at: r.try_get("finished_at")?,
                })
            })
            .collect::<Result<_, _>>()
            .ctx("read history")
    }

    pub async fn history_counts(&self) -> Result<(i64, i64), StoreError> {
        let mut db = self.open().await.ctx("count history")?;
        let (done, failed): (i64, i64) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE outcome <> 'failed'), count(*) FILTER (WHERE outcome = 'failed') \
             FROM events_history",
        )
        .persistent(self.persistent)
        .fetch_one(db.exec())
        .await
        .ctx("count history")?;
        db.done().await.ctx("count history")?;
        Ok((done, failed))
    }

    pub async fn history_size(&self) -> Result<(i64, Option<i64>), StoreError> {
        let mut db = self.open().await.ctx("size of history")?;
        let (estimate, bytes): (f32, i64) = sqlx::query_as(
            "SELECT c.reltuples, pg_total_relation_size(c.oid) FROM pg_class c \
             WHERE c.oid = 'events_history'::regclass",
        )
        .persistent(self.persistent)
        .fetch_one(db.exec())
        .await
        .ctx("size of history")?;
        let rows = if estimate < 0.0 {
            // Never analyzed yet: a young table, cheap to count.
            sqlx::query_scalar("SELECT count(*) FROM events_history")
                .persistent(self.persistent)
                .fetch_one(db.exec())
                .await
                .ctx("size of history")?
        } else {
            estimate as i64
        };
        db.done().await.ctx("size of history")?;
        Ok((rows, Some(bytes)))
    }

    pub async fn prune_history(
        &self,
        cutoff: DateTime<Utc>,
        batch: i64,
        from: i64,
    ) -> Result<PruneStep, StoreError> {
        let mut db = self.open().await.ctx("prune history")?;
        // The `batch` lowest ids from `from`: those finished before the cutoff go; the
        // lowest one kept (if any), else the one after the last seen, is where the next
        // statement of the round looks. A deleted row leaves its index entries behind
        // until VACUUM, so a scan from the start of the primary key would walk over every
        // row deleted since (35 to 60 ms per statement after a few million rows).
        let (deleted, kept, last): (i64, Option<i64>, Option<i64>) = sqlx::query_as(
            "WITH head AS (SELECT id, finished_at FROM events_history WHERE id >= $3 \
             ORDER BY id LIMIT $2), \
             gone AS (DELETE FROM events_history WHERE id IN \
             (SELECT id FROM head WHERE finished_at < $1) RETURNING 1) \
             SELECT (SELECT count(*) FROM gone), \
             (SELECT min(id) FROM head WHERE finished_at >= $1), (SELECT max(id) FROM head)",
        )
        .persistent(self.persistent)
        .bind(cutoff)
        .bind(batch)
        .bind(from)
        .fetch_one(db.exec())
        .await
        .ctx("prune history")?;
        db.done().await.ctx("prune history")?;
        Ok(PruneStep {
            deleted: deleted.max(0) as u64,
            next: kept.or(last.map(|l| l + 1)).unwrap_or(from),
        })
    }

    pub async fn latencies_ms(&self) -> Result<Vec<f64>, StoreError> {
        let mut db = self.open().await.ctx("read latencies")?;
        let latencies = sqlx::query_scalar(
            "SELECT (EXTRACT(EPOCH FROM (finished_at - enqueued_at)) * 1000)::float8 \
             FROM events_history ORDER BY 1",
        )
        .persistent(self.persistent)
        .fetch_all(db.exec())
        .await
        .ctx("read latencies")?;
        db.done().await.ctx("read latencies")?;
        Ok(latencies)
    }
}

fn nas_from_row(r: &PgRow) -> Result<Nas, sqlx::Error> {
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
}

impl PgStore {
    /// The batched form of `params_query` (see `lateral_params_query`), checked once
    /// against the server: a query the form does not suit (the server refuses it) is
    /// run per user as written. `expansion` is the connection of the expansion's
    /// transaction, which asks.
    async fn batched_params_query(
        &self,
        params_query: &str,
        expansion: &mut PgConnection,
    ) -> Result<Option<String>, StoreError> {
        if let Ok(cached) = self.batched_params.lock()
            && let Some((query, batched)) = cached.as_ref()
            && query == params_query
        {
            return Ok(batched.clone());
        }
        let batched = match lateral_params_query(params_query) {
            None => None,
            Some(batched) => match self.try_batched(&batched, expansion).await {
                Ok(()) => Some(batched),
                Err(sqlx::Error::Database(e)) => {
                    tracing::info!(
                        "params_query is run once per user: its batched form was refused ({e})"
                    );
                    None
                }
                Err(e) => {
                    return Err(StoreError::Sql {
                        context: "params_query",
                        source: e,
                    });
                }
            },
        };
        if let Ok(mut cached) = self.batched_params.lock() {
            *cached = Some((params_query.to_string(), batched.clone()));
        }
        Ok(batched)
    }

    /// Runs the batched form of `params_query` once for no user; a refusal leaves the
    /// expansion's transaction (on `expansion`) usable. With the cache on it runs on a
    /// connection of its own. In pooled mode it runs inside the expansion's
    /// transaction, under a savepoint that a refusal rolls back: a transaction of its
    /// own would need a second server connection from the pooler while the expansion
    /// holds one, and with every server connection held the expansion would wait for
    /// itself until the server ended it for idling.
    async fn try_batched(
        &self,
        batched: &str,
        expansion: &mut PgConnection,
    ) -> Result<(), sqlx::Error> {
        let probe = sqlx::query(batched)
            .persistent(self.persistent)
            .bind(Vec::<i64>::new());
        if self.persistent {
            probe.fetch_all(&self.pool).await?;
            return Ok(());
        }
        let mut savepoint = sqlx::Connection::begin(expansion).await?;
        match probe.fetch_all(&mut *savepoint).await {
            Ok(_) => savepoint.commit().await,
            Err(e) => {
                savepoint.rollback().await?;
                Err(e)
            }
        }
    }
}

/// `params_query` for many users in one statement: the query (its `$1` replaced by
/// each user id of the array `$1`) runs as a LATERAL subquery per user, keeping its
/// first row as a lookup of its own would. The first column is the user id. None when
/// the query has no `$1` outside quotes, or other parameters.
pub(crate) fn lateral_params_query(params_query: &str) -> Option<String> {
    let query = params_query.trim().trim_end_matches(';').trim_end();
    let bytes = query.as_bytes();
    let mut out = String::with_capacity(query.len() + 160);
    let mut found = false;
    let mut quote: Option<u8> = None;
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == b'\'' || c == b'"' => quote = Some(c),
            None if c == b'$' && bytes.get(i + 1).is_some_and(u8::is_ascii_digit) => {
                let digits = bytes[i + 1..]
                    .iter()
                    .take_while(|b| b.is_ascii_digit())
                    .count();
                if &query[i + 1..i + 1 + digits] != "1" {
                    return None;
                }
                out.push_str("nasd_u.uid");
                found = true;
                i += 1 + digits;
                continue;
            }
            None if c == b'$' => return None, // dollar quoting: leave the query alone
            None => {}
        }
        // Copy one whole UTF-8 character.
        let len = query[i..].chars().next().map_or(1, char::len_utf8);
        out.push_str(&query[i..i + len]);
        i += len;
    }
    if !found || quote.is_some() {
        return None;
    }
    Some(format!(
        "SELECT nasd_u.uid, nasd_p.* FROM unnest($1::bigint[]) AS nasd_u(uid) \
         CROSS JOIN LATERAL (SELECT * FROM ({out}) AS nasd_q LIMIT 1) AS nasd_p"
    ))
}

/// The advisory lock key of sqlx's migrator for `database` (`generate_lock_id` in
/// sqlx-postgres 0.8: a constant times the CRC-32 of the name), so that a pooled
/// migration waits for one running on a direct connection and the other way round.
fn migrator_lock_id(database: &str) -> i64 {
    0x3d32_ad9e * i64::from(crc32(database.as_bytes()))
}

/// CRC-32 (IEEE 802.3, the one of zip), bit by bit: it hashes one database name per
/// migration, so a table would buy nothing.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Deallocates the statements sqlx named (`sqlx_s_1`, ...) on the server connection
/// that `conn`'s transaction holds. Only sqlx's migrator names statements in pooled
/// mode, and sqlx never closes them there (no cache); behind a transaction pooler a
/// name left on a server connection can only collide with the next client's, since no
/// client gets that server back for sure. PgBouncer 1.21 and later, when it tracks
/// prepared statements, names them itself (`PGBOUNCER_...`): those are left alone.
async fn deallocate_sqlx_statements(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    use sqlx::Executor;
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM pg_prepared_statements WHERE name LIKE 'sqlx\\_s\\_%'",
    )
    .persistent(false)
    .fetch_all(&mut *conn)
    .await?;
    if names.is_empty() {
        return Ok(());
    }
    // DEALLOCATE takes no parameter: the names are quoted as identifiers, all of them
    // in one simple query (one round trip).
    let sql: String = names
        .iter()
        .map(|name| format!("DEALLOCATE \"{}\";", name.replace('"', "\"\"")))
        .collect();
    conn.execute(sql.as_str()).await?;
    Ok(())
}

/// Runs `params_query` for one user on `conn`; `persistent` is the store's (named and
/// cached statements, or unnamed ones in pooled mode).
async fn params_for(
    conn: &mut PgConnection,
    params_query: &str,
    user_id: i64,
    persistent: bool,
) -> Result<Option<Vars>, StoreError> {
    let row = sqlx::query(params_query)
        .persistent(persistent)
        .bind(user_id)
        .fetch_optional(&mut *conn)
        .await
        .map_err(|e| StoreError::ParamsQuery(format!("user_id={user_id}: {e}")))?;
    match row {
        None => Ok(None),
        Some(row) => row_to_vars(&row, 0)
            .map(Some)
            .map_err(StoreError::ParamsQuery),
    }
}

/// Turns one row of `params_query` into variables. NULL columns are left out, so a
/// template that needs them fails with "undefined variable"; a JSON object column named
/// `extra` is merged in.
fn row_to_vars(row: &PgRow, skip: usize) -> Result<Vars, String> {
    let mut vars = Vars::new();
    for (i, col) in row.columns().iter().enumerate().skip(skip) {
        let name = col.name();
        let raw = row.try_get_raw(i).map_err(|e| e.to_string())?;
        if raw.is_null() {
            continue;
        }
        let type_name = col.type_info().name().to_string();
        let err = |e: sqlx::Error| format!("column {name}: {e}");
        let value: serde_json::Value = match type_name.as_str() {
            "TEXT" | "VARCHAR" | "BPCHAR" | "NAME" | "CHAR" => {
                row.try_get::<String, _>(i).map_err(err)?.into()
            }
            "INT8" => row.try_get::<i64, _>(i).map_err(err)?.into(),
            "INT4" => row.try_get::<i32, _>(i).map_err(err)?.into(),
            "INT2" => row.try_get::<i16, _>(i).map_err(err)?.into(),
            "FLOAT8" => row.try_get::<f64, _>(i).map_err(err)?.into(),
            "FLOAT4" => row.try_get::<f32, _>(i).map_err(err)?.into(),
            "BOOL" => row.try_get::<bool, _>(i).map_err(err)?.into(),
            "JSON" | "JSONB" => row.try_get::<serde_json::Value, _>(i).map_err(err)?,
            "TIMESTAMPTZ" => row
                .try_get::<DateTime<Utc>, _>(i)
                .map_err(err)?
                .format("%Y-%m-%d %H:%M:%S")
                .to_string()
                .into(),
            other => {
                return Err(format!(
                    "column {name} has type {other} that nasd cannot read: cast it to text in the query ({name}::text)"
                ));
            }
        };
        if name == "extra" {
            if let serde_json::Value::Object(map) = value {
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
     h.commands::text AS commands, h.answer, h.error, h.duration_ms, h.finished_at, n.ip AS nas_ip, \
     h.params::text AS params";
pub(super) const COMPACT_COLUMNS: &str =
    "id, cmd, user_id, abonent_id, nas_ip, usluga_id, acct_session_id, created_at";

pub(super) fn compact_from_row(r: &PgRow) -> Result<CompactRow, sqlx::Error> {
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
        created_at: r.try_get("created_at")?,
    })
}

pub(super) fn stack_from_row(r: &PgRow) -> Result<StackEvent, sqlx::Error> {
    let params: serde_json::Value = r.try_get("params")?;
    Ok(StackEvent {
        id: r.try_get("id")?,
        compact_id: r.try_get("compact_id")?,
        event_date: r.try_get("event_date")?,
        enqueued_at: r.try_get("enqueued_at")?,
        cmd: r.try_get("cmd")?,
        user_id: r.try_get("user_id")?,
        abonent_id: r.try_get("abonent_id")?,
        nas_id: r.try_get("nas_id")?,
        usluga_id: r.try_get("usluga_id")?,
        acct_session_id: r.try_get("acct_session_id")?,
        params: match params {
            serde_json::Value::Object(map) => map,
            _ => Vars::new(),
        },
        try_count: r.try_get("try_count")?,
        state: r.try_get("state")?,
        retry_at: r.try_get("retry_at")?,
        claim_token: r.try_get("claim_token")?,
        lease_until: r.try_get("lease_until")?,
        last_error: r.try_get("last_error")?,
    })
}

pub(super) fn history_status(r: &PgRow) -> Result<EventStatus, sqlx::Error> {
    let commands: String = r.try_get("commands")?;
    let outcome: String = r.try_get("outcome")?;
    Ok(EventStatus {
        id: r
            .try_get::<Option<i64>, _>("compact_id")?
            .unwrap_or_default(),
        state: outcome,
        stage: "history".into(),
        stack_id: r.try_get("event_id")?,
        cmd: r.try_get("cmd")?,
        user_id: r.try_get("user_id")?,
        abonent_id: r.try_get("abonent_id")?,
        nas_id: r.try_get("nas_id")?,
        nas_ip: r.try_get("nas_ip")?,
        usluga_id: r.try_get("usluga_id")?,
        acct_session_id: r.try_get("acct_session_id")?,
        enqueued_at: r.try_get("enqueued_at")?,
        try_count: r.try_get("attempts")?,
        next_try_at: None,
        error: r.try_get("error")?,
        commands: serde_json::from_str(&commands).unwrap_or_default(),
        answer: Some(r.try_get("answer")?),
        finished_at: Some(r.try_get("finished_at")?),
        duration_ms: Some(r.try_get("duration_ms")?),
        params: r
            .try_get::<Option<String>, _>("params")?
            .and_then(|p| serde_json::from_str::<Vars>(&p).ok())
            .map(|p| super::visible_params(&p)),
    })
}

fn bind_filter<'q>(
    mut q: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    filter: &'q Filter,
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    for v in filter.binds() {
        q = match v {
            FilterValue::Int(i) => q.bind(*i),
            FilterValue::Text(t) => q.bind(t.as_str()),
            FilterValue::Null => q,
        };
    }
    q
}

impl PgStore {
    pub async fn event_status(&self, id: i64) -> Result<Option<EventStatus>, StoreError> {
        let mut db = self.open().await.ctx("event status")?;
        let compact = sqlx::query(&format!(
            "SELECT {COMPACT_COLUMNS} FROM events_stack_compact WHERE id = $1"
        ))
        .persistent(self.persistent)
        .bind(id)
        .fetch_optional(db.exec())
        .await
        .ctx("event status: compact stack")?;
        if let Some(r) = compact {
            db.done().await.ctx("event status")?;
            let row = compact_from_row(&r).ctx("event status: compact stack")?;
            return Ok(Some(EventStatus::from_compact(&row)));
        }
        let stack = sqlx::query(&format!(
            "SELECT {STACK_COLUMNS} FROM events_stack s LEFT JOIN nas n ON n.id = s.nas_id \
             WHERE s.compact_id = $1 ORDER BY s.id DESC LIMIT 1"
        ))
        .persistent(self.persistent)
        .bind(id)
        .fetch_optional(db.exec())
        .await
        .ctx("event status: stack")?;
        if let Some(r) = stack {
            db.done().await.ctx("event status")?;
            let e = stack_from_row(&r).ctx("event status: stack")?;
            let ip: Option<String> = r.try_get("nas_ip").ctx("event status: stack")?;
            return Ok(Some(EventStatus::from_stack(&e, ip)));
        }
        let history = sqlx::query(&format!(
            "SELECT {HISTORY_COLUMNS} FROM events_history h LEFT JOIN nas n ON n.id = h.nas_id \
             WHERE h.compact_id = $1 ORDER BY h.id DESC LIMIT 1"
        ))
        .persistent(self.persistent)
        .bind(id)
        .fetch_optional(db.exec())
        .await
        .ctx("event status: history")?;
        db.done().await.ctx("event status")?;
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
        let mut db = self.open().await.ctx("account events")?;
        let compact = sqlx::query(&format!(
            "SELECT {COMPACT_COLUMNS} FROM events_stack_compact WHERE user_id = $1 \
             ORDER BY id DESC LIMIT $2"
        ))
        .persistent(self.persistent)
        .bind(user_id)
        .bind(limit)
        .fetch_all(db.exec())
        .await
        .ctx("account events: compact stack")?;
        for r in &compact {
            out.push(EventStatus::from_compact(
                &compact_from_row(r).ctx("account events: compact stack")?,
            ));
        }
        let stack = sqlx::query(&format!(
            "SELECT {STACK_COLUMNS} FROM events_stack s LEFT JOIN nas n ON n.id = s.nas_id \
             WHERE s.user_id = $1 ORDER BY s.id DESC LIMIT $2"
        ))
        .persistent(self.persistent)
        .bind(user_id)
        .bind(limit)
        .fetch_all(db.exec())
        .await
        .ctx("account events: stack")?;
        for r in &stack {
            let e = stack_from_row(r).ctx("account events: stack")?;
            let ip: Option<String> = r.try_get("nas_ip").ctx("account events: stack")?;
            out.push(EventStatus::from_stack(&e, ip));
        }
        let history = sqlx::query(&format!(
            "SELECT {HISTORY_COLUMNS} FROM events_history h LEFT JOIN nas n ON n.id = h.nas_id \
             WHERE h.user_id = $1 ORDER BY h.id DESC LIMIT $2"
        ))
        .persistent(self.persistent)
        .bind(user_id)
        .bind(limit)
        .fetch_all(db.exec())
        .await
        .ctx("account events: history")?;
        db.done().await.ctx("account events")?;
        for r in &history {
            out.push(history_status(r).ctx("account events: history")?);
        }
        Ok(out)
    }

    /// Moves the event out of the compact stack, or out of the main stack while it is
    /// not claimed, into history as cancelled. Returns whether it moved.
    pub async fn cancel_event(&self, id: i64, now: DateTime<Utc>) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await.ctx("cancel event")?;
        let moved = sqlx::query(
            "WITH moved AS (DELETE FROM events_stack_compact WHERE id = $1 RETURNING *) \
             INSERT INTO events_history (compact_id, enqueued_at, cmd, user_id, abonent_id, \
             usluga_id, acct_session_id, outcome, attempts, error, finished_at) \
             SELECT id, created_at, cmd, user_id, abonent_id, usluga_id, acct_session_id, \
             'failed', 0, $2, $3 FROM moved",
        )
        .persistent(self.persistent)
        .bind(id)
        .bind(super::CANCELLED)
        .bind(now)
        .execute(&mut *tx)
        .await
        .ctx("cancel event: compact stack")?
        .rows_affected();
        let moved = if moved > 0 {
            moved
        } else {
            sqlx::query(
                "WITH moved AS (DELETE FROM events_stack WHERE compact_id = $1 AND state = 'ready' \
                 RETURNING *) \
                 INSERT INTO events_history (event_id, compact_id, event_date, enqueued_at, cmd, \
                 user_id, abonent_id, nas_id, usluga_id, acct_session_id, params, outcome, attempts, \
                 commands, answer, error, duration_ms, finished_at) \
                 SELECT id, compact_id, event_date, enqueued_at, cmd, user_id, abonent_id, nas_id, \
                 usluga_id, acct_session_id, params, 'failed', try_count, '[]', '', \
                 $2 || coalesce(' (last error: ' || last_error || ')', ''), 0, $3 FROM moved",
            )
            .persistent(self.persistent)
            .bind(id)
            .bind(super::CANCELLED)
            .bind(now)
            .execute(&mut *tx)
            .await
            .ctx("cancel event: stack")?
            .rows_affected()
        };
        tx.commit().await.ctx("cancel event: commit")?;
        Ok(moved > 0)
    }

    pub async fn compact_filter(&self, filter: &Filter) -> Result<Vec<CompactRow>, StoreError> {
        let sql = format!(
            "SELECT {COMPACT_COLUMNS} FROM events_stack_compact{}",
            filter.sql_tail("", |i| format!("${i}"))
        );
        let mut db = self.open().await.ctx("filter compact stack")?;
        let rows = bind_filter(sqlx::query(&sql).persistent(self.persistent), filter)
            .fetch_all(db.exec())
            .await
            .ctx("filter compact stack")?;
        db.done().await.ctx("filter compact stack")?;
        rows.iter()
            .map(compact_from_row)
            .collect::<Result<_, _>>()
            .ctx("filter compact stack")
    }

    pub async fn stack_filter(&self, filter: &Filter) -> Result<Vec<StackEvent>, StoreError> {
        let sql = format!(
            "SELECT {STACK_COLUMNS} FROM events_stack s LEFT JOIN nas n ON n.id = s.nas_id{}",
            filter.sql_tail("s.", |i| format!("${i}"))
        );
        let mut db = self.open().await.ctx("filter stack")?;
        let rows = bind_filter(sqlx::query(&sql).persistent(self.persistent), filter)
            .fetch_all(db.exec())
            .await
            .ctx("filter stack")?;
        db.done().await.ctx("filter stack")?;
        rows.iter()
            .map(stack_from_row)
            .collect::<Result<_, _>>()
            .ctx("filter stack")
    }

    pub async fn queue_by_nas(&self) -> Result<Vec<NasQueue>, StoreError> {
        let mut db = self.open().await.ctx("queue depth per nas")?;
        let rows: Vec<(i64, i64, Option<DateTime<Utc>>)> = sqlx::query_as(
            "SELECT nas_id, count(*), min(enqueued_at) FROM events_stack GROUP BY nas_id ORDER BY nas_id",
        )
        .persistent(self.persistent)
        .fetch_all(db.exec())
        .await
        .ctx("queue depth per nas")?;
        db.done().await.ctx("queue depth per nas")?;
        Ok(rows
            .into_iter()
            .map(|(nas_id, depth, oldest)| NasQueue {
                nas_id,
                depth,
                oldest,
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

#[cfg(test)]
mod tests {
    use super::{crc32, lateral_params_query, migrator_lock_id};

    /// Every statement of the PostgreSQL backend says whether it is named
    /// (`.persistent(...)`), and none runs straight on the pool but the few that must:
    /// a statement on the pool outside a call's `Session` would, in pooled mode, be
    /// named and outside a transaction, which is what a transaction pooler breaks.
    #[test]
    fn every_statement_runs_in_a_session_and_says_if_it_is_named() {
        let sources = [
            ("postgres.rs", include_str!("postgres.rs")),
            ("cluster.rs", include_str!("cluster.rs")),
        ];
        // The LISTEN connection and its session check (never in pooled mode), the
        // migrator with the cache on, and the batched-form probe with the cache on.
        let allowed = [
            "PgListener::connect_with(&self.pool)",
            "(&self.pool).fetch_one(BACKEND)",
            "migrator.run(&self.pool)",
            "probe.fetch_all(&self.pool)",
        ];
        for (file, text) in sources {
            let code = text.split("#[cfg(test)]").next().unwrap_or(text);
            for (at, _) in code.match_indices("sqlx::query") {
                let rest = &code[at..];
                if rest.starts_with("sqlx::query::") {
                    continue; // the type `sqlx::query::Query`
                }
                let statement = &rest[..rest.find(".await").unwrap_or(rest.len())];
                assert!(
                    statement.contains(".persistent("),
                    "{file}: a statement without .persistent(...): {}",
                    statement.lines().take(3).collect::<Vec<_>>().join(" ")
                );
            }
            for line in code.lines() {
                if line.contains("self.pool()") || line.contains("&self.pool)") {
                    assert!(
                        allowed.iter().any(|a| line.contains(a)),
                        "{file}: runs on the pool instead of `self.open()`: {}",
                        line.trim()
                    );
                }
            }
        }
    }

    #[test]
    fn migrator_lock_id_is_sqlx_s() {
        // The check value of CRC-32/ISO-HDLC, the crc crate's CRC_32_ISO_HDLC that
        // sqlx hashes with.
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(crc32(b""), 0);
        // Python's 0x3d32ad9e * zlib.crc32(b"nasd").
        assert_eq!(migrator_lock_id("nasd"), 4_364_926_652_058_980_802);
        // The largest CRC times the constant still fits an i64 (no overflow).
        assert!(0x3d32_ad9e_i64.checked_mul(i64::from(u32::MAX)).is_some());
    }

    #[test]
    fn params_query_batched_form() {
        let wrap = |inner: &str| {
            format!(
                "SELECT nasd_u.uid, nasd_p.* FROM unnest($1::bigint[]) AS nasd_u(uid) \
                 CROSS JOIN LATERAL (SELECT * FROM ({inner}) AS nasd_q LIMIT 1) AS nasd_p"
            )
        };
        let cases: &[(&str, Option<&str>)] = &[
            (
                "SELECT ip FROM accounts WHERE user_id = $1",
                Some("SELECT ip FROM accounts WHERE user_id = nasd_u.uid"),
            ),
            // Every $1, a cast, a trailing semicolon, quotes left alone.
            (
                "SELECT 'a$1' AS \"x$1\", ip FROM a WHERE id = $1::int OR owner = $1;  ",
                Some(
                    "SELECT 'a$1' AS \"x$1\", ip FROM a WHERE id = nasd_u.uid::int OR owner = nasd_u.uid",
                ),
            ),
            (
                "SELECT 'é', ip FROM a WHERE id = $1",
                Some("SELECT 'é', ip FROM a WHERE id = nasd_u.uid"),
            ),
            // Not this form: no parameter, another parameter, $10, dollar quoting,
            // an unclosed quote.
            ("SELECT ip FROM a WHERE id = 1", None),
            ("SELECT ip FROM a WHERE id = $1 AND n = $2", None),
            ("SELECT ip FROM a WHERE id = $10", None),
            ("SELECT $$x$$, ip FROM a WHERE id = $1", None),
            ("SELECT 'x FROM a WHERE id = $1", None),
        ];
        for (query, want) in cases {
            assert_eq!(
                lateral_params_query(query),
                want.map(wrap),
                "query: {query}"
            );
        }
    }
}
