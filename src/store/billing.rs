//! nasd's side of `[billing]`: the users of the next compact rows (their variables are
//! looked up in the billing database before an expansion), and the events source's
//! state: the cursor (`billing_cursor`, the highest billing id moved) and each billing
//! id moved (`billing_moved`, with whether its billing row was deleted or marked).
//!
//! A move is one transaction: the cursor is compared and set, the billing ids not seen
//! before are recorded and only those rows go into `events_stack_compact`. A crash
//! before the commit moved nothing; after it, the cursor says so. Two daemons moving at
//! once: the second one's cursor no longer matches and it reads again.

use chrono::{DateTime, Utc};
use sqlx::Row;

use super::{CompactEvent, SqlContext, Store, StoreError};

/// One row read from the billing's events source.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceRow {
    /// Its id in the billing database.
    pub billing_id: i64,
    pub event: CompactEvent,
}

/// What `Store::billing_move` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Moved {
    /// The cursor now stands at the highest id given; `moved` rows went into the compact
    /// stack, `skipped` had been moved before (their billing id was known).
    Done { moved: usize, skipped: usize },
    /// The cursor was not where the rows were read from (another daemon moved them):
    /// nothing was written; read again.
    CursorMoved,
}

impl Store {
    /// The user ids (distinct) of the first `limit` compact rows and the highest of their
    /// ids; None when the compact stack is empty.
    pub async fn compact_users(&self, limit: i64) -> Result<Option<(Vec<i64>, i64)>, StoreError> {
        const SQL_PG: &str = "SELECT id, user_id FROM events_stack_compact ORDER BY id LIMIT $1";
        const SQL_LITE: &str = "SELECT id, user_id FROM events_stack_compact ORDER BY id LIMIT ?1";
        let rows: Vec<(i64, i64)> = match self {
            Store::Postgres(s) => {
                let mut db = s.open().await.ctx("read compact users")?;
                let rows = sqlx::query_as(SQL_PG)
                    .persistent(s.persistent)
                    .bind(limit)
                    .fetch_all(db.exec())
                    .await
                    .ctx("read compact users")?;
                db.done().await.ctx("read compact users")?;
                rows
            }
            Store::Sqlite(s) => sqlx::query_as(SQL_LITE)
                .bind(limit)
                .fetch_all(s.pool())
                .await
                .ctx("read compact users")?,
        };
        let Some(up_to) = rows.iter().map(|(id, _)| *id).max() else {
            return Ok(None);
        };
        let mut users: Vec<i64> = rows.into_iter().map(|(_, user)| user).collect();
        users.sort_unstable();
        users.dedup();
        Ok(Some((users, up_to)))
    }

    /// The events source's cursor: the highest billing id moved (0 before the first).
    pub async fn billing_cursor(&self) -> Result<i64, StoreError> {
        let last: Option<i64> = match self {
            Store::Postgres(s) => {
                let mut db = s.open().await.ctx("read the billing cursor")?;
                let last = sqlx::query_scalar("SELECT last_id FROM billing_cursor WHERE id = 1")
                    .persistent(s.persistent)
                    .fetch_optional(db.exec())
                    .await
                    .ctx("read the billing cursor")?;
                db.done().await.ctx("read the billing cursor")?;
                last
            }
            Store::Sqlite(s) => {
                sqlx::query_scalar("SELECT last_id FROM billing_cursor WHERE id = 1")
                    .fetch_optional(s.pool())
                    .await
                    .ctx("read the billing cursor")?
            }
        };
        Ok(last.unwrap_or(0))
    }

    /// Moves `rows` (read from the billing with ids above `cursor`, in id order) into the
    /// compact stack in one transaction, setting the cursor to their highest id. Rows
    /// whose billing id was moved before are skipped. `done`: nothing is to be done with
    /// the billing rows afterwards (no `after_move`).
    pub async fn billing_move(
        &self,
        cursor: i64,
        rows: &[SourceRow],
        done: bool,
    ) -> Result<Moved, StoreError> {
        let Some(new_cursor) = rows.iter().map(|r| r.billing_id).max() else {
            return Ok(Moved::Done {
                moved: 0,
                skipped: 0,
            });
        };
        let new_cursor = new_cursor.max(cursor);
        match self {
            Store::Postgres(s) => {
                let p = s.persistent;
                let mut tx = s.pool().begin().await.ctx("billing move")?;
                sqlx::query(
                    "INSERT INTO billing_cursor (id, last_id) VALUES (1, 0) ON CONFLICT DO NOTHING",
                )
                .persistent(p)
                .execute(&mut *tx)
                .await
                .ctx("billing move: cursor")?;
                // Takes the cursor's row lock until the commit: a second daemon moving at
                // the same time waits here, then finds the cursor moved.
                let set = sqlx::query(
                    "UPDATE billing_cursor SET last_id = $2, updated_at = now() \
                     WHERE id = 1 AND last_id = $1",
                )
                .persistent(p)
                .bind(cursor)
                .bind(new_cursor)
                .execute(&mut *tx)
                .await
                .ctx("billing move: cursor")?;
                if set.rows_affected() == 0 {
                    return Ok(Moved::CursorMoved);
                }
                let ids: Vec<i64> = rows.iter().map(|r| r.billing_id).collect();
                let fresh: Vec<i64> = sqlx::query_scalar(
                    "INSERT INTO billing_moved (billing_id, compact_id, done) \
                     SELECT b, 0, $2 FROM unnest($1::bigint[]) AS b \
                     ON CONFLICT DO NOTHING RETURNING billing_id",
                )
                .persistent(p)
                .bind(&ids)
                .bind(done)
                .fetch_all(&mut *tx)
                .await
                .ctx("billing move: record billing ids")?;
                let fresh: std::collections::HashSet<i64> = fresh.into_iter().collect();
                let fresh_rows: Vec<&SourceRow> = rows
                    .iter()
                    .filter(|r| fresh.contains(&r.billing_id))
                    .collect();
                if !fresh_rows.is_empty() {
                    let events: Vec<&CompactEvent> = fresh_rows.iter().map(|r| &r.event).collect();
                    let cmds: Vec<&str> = events.iter().map(|e| e.cmd.as_str()).collect();
                    let users: Vec<i64> = events.iter().map(|e| e.user_id).collect();
                    let abonents: Vec<Option<i64>> = events.iter().map(|e| e.abonent_id).collect();
                    let ips: Vec<Option<&str>> =
                        events.iter().map(|e| e.nas_ip.as_deref()).collect();
                    let uslugas: Vec<Option<i64>> = events.iter().map(|e| e.usluga_id).collect();
                    let sessions: Vec<Option<&str>> = events
                        .iter()
                        .map(|e| e.acct_session_id.as_deref())
                        .collect();
                    let compact_ids: Vec<i64> = sqlx::query_scalar(
                        "INSERT INTO events_stack_compact (cmd, user_id, abonent_id, nas_ip, usluga_id, acct_session_id) \
                         SELECT cmd, user_id, abonent_id, nas_ip, usluga_id, acct_session_id FROM \
                         unnest($1::text[], $2::bigint[], $3::bigint[], $4::text[], $5::bigint[], $6::text[]) \
                         WITH ORDINALITY AS t(cmd, user_id, abonent_id, nas_ip, usluga_id, acct_session_id, ord) \
                         ORDER BY ord RETURNING id",
                    )
                    .persistent(p)
                    .bind(&cmds)
                    .bind(&users)
                    .bind(&abonents)
                    .bind(&ips)
                    .bind(&uslugas)
                    .bind(&sessions)
                    .fetch_all(&mut *tx)
                    .await
                    .ctx("billing move: enqueue")?;
                    let billing_ids: Vec<i64> = fresh_rows.iter().map(|r| r.billing_id).collect();
                    sqlx::query(
                        "UPDATE billing_moved m SET compact_id = t.c \
                         FROM unnest($1::bigint[], $2::bigint[]) AS t(b, c) WHERE m.billing_id = t.b",
                    )
                    .persistent(p)
                    .bind(&billing_ids)
                    .bind(&compact_ids)
                    .execute(&mut *tx)
                    .await
                    .ctx("billing move: record compact ids")?;
                }
                tx.commit().await.ctx("billing move: commit")?;
                Ok(Moved::Done {
                    moved: fresh_rows.len(),
                    skipped: rows.len() - fresh_rows.len(),
                })
            }
            Store::Sqlite(s) => {
                let mut tx = s
                    .pool()
                    .begin_with("BEGIN IMMEDIATE")
                    .await
                    .ctx("billing move")?;
                sqlx::query("INSERT OR IGNORE INTO billing_cursor (id, last_id) VALUES (1, 0)")
                    .execute(&mut *tx)
                    .await
                    .ctx("billing move: cursor")?;
                let set = sqlx::query(
                    "UPDATE billing_cursor SET last_id = ?2, \
                     updated_at = CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER) \
                     WHERE id = 1 AND last_id = ?1",
                )
                .bind(cursor)
                .bind(new_cursor)
                .execute(&mut *tx)
                .await
                .ctx("billing move: cursor")?;
                if set.rows_affected() == 0 {
                    return Ok(Moved::CursorMoved);
                }
                let now = Utc::now().timestamp_millis();
                let mut moved = 0;
                for row in rows {
                    let fresh = sqlx::query(
                        "INSERT INTO billing_moved (billing_id, compact_id, moved_at, done) \
                         VALUES (?1, 0, ?2, ?3) ON CONFLICT DO NOTHING",
                    )
                    .bind(row.billing_id)
                    .bind(now)
                    .bind(done)
                    .execute(&mut *tx)
                    .await
                    .ctx("billing move: record billing ids")?;
                    if fresh.rows_affected() == 0 {
                        continue;
                    }
                    let e = &row.event;
                    let compact_id: i64 = sqlx::query_scalar(
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
                    .ctx("billing move: enqueue")?;
                    sqlx::query("UPDATE billing_moved SET compact_id = ?2 WHERE billing_id = ?1")
                        .bind(row.billing_id)
                        .bind(compact_id)
                        .execute(&mut *tx)
                        .await
                        .ctx("billing move: record compact ids")?;
                    moved += 1;
                }
                tx.commit().await.ctx("billing move: commit")?;
                Ok(Moved::Done {
                    moved,
                    skipped: rows.len() - moved,
                })
            }
        }
    }

    /// Up to `limit` billing ids moved whose billing row still waits for `after_move`,
    /// lowest first.
    pub async fn billing_pending(&self, limit: i64) -> Result<Vec<i64>, StoreError> {
        match self {
            Store::Postgres(s) => {
                let mut db = s.open().await.ctx("read pending billing rows")?;
                let ids = sqlx::query_scalar(
                    "SELECT billing_id FROM billing_moved WHERE NOT done ORDER BY billing_id LIMIT $1",
                )
                .persistent(s.persistent)
                .bind(limit)
                .fetch_all(db.exec())
                .await
                .ctx("read pending billing rows")?;
                db.done().await.ctx("read pending billing rows")?;
                Ok(ids)
            }
            Store::Sqlite(s) => sqlx::query_scalar(
                "SELECT billing_id FROM billing_moved WHERE done = 0 ORDER BY billing_id LIMIT ?1",
            )
            .bind(limit)
            .fetch_all(s.pool())
            .await
            .ctx("read pending billing rows"),
        }
    }

    /// Records that `after_move` ran for these billing ids.
    pub async fn billing_done(&self, ids: &[i64]) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        match self {
            Store::Postgres(s) => {
                let mut db = s.open().await.ctx("mark billing rows done")?;
                sqlx::query("UPDATE billing_moved SET done = true WHERE billing_id = ANY($1)")
                    .persistent(s.persistent)
                    .bind(ids)
                    .execute(db.exec())
                    .await
                    .ctx("mark billing rows done")?;
                db.done().await.ctx("mark billing rows done")?;
            }
            Store::Sqlite(s) => {
                let mut tx = s
                    .pool()
                    .begin_with("BEGIN IMMEDIATE")
                    .await
                    .ctx("mark billing rows done")?;
                for id in ids {
                    sqlx::query("UPDATE billing_moved SET done = 1 WHERE billing_id = ?1")
                        .bind(id)
                        .execute(&mut *tx)
                        .await
                        .ctx("mark billing rows done")?;
                }
                tx.commit().await.ctx("mark billing rows done")?;
            }
        }
        Ok(())
    }

    /// Forgets billing ids moved before `cutoff` whose rows are done (the cursor keeps
    /// them from being read again); returns how many.
    pub async fn billing_prune(&self, cutoff: DateTime<Utc>) -> Result<u64, StoreError> {
        let done = match self {
            Store::Postgres(s) => {
                let mut db = s.open().await.ctx("prune billing ids")?;
                let done = sqlx::query("DELETE FROM billing_moved WHERE done AND moved_at < $1")
                    .persistent(s.persistent)
                    .bind(cutoff)
                    .execute(db.exec())
                    .await
                    .ctx("prune billing ids")?;
                db.done().await.ctx("prune billing ids")?;
                done.rows_affected()
            }
            Store::Sqlite(s) => {
                sqlx::query("DELETE FROM billing_moved WHERE done = 1 AND moved_at < ?1")
                    .bind(cutoff.timestamp_millis())
                    .execute(s.pool())
                    .await
                    .ctx("prune billing ids")?
                    .rows_affected()
            }
        };
        Ok(done)
    }

    /// The billing ids moved so far with the compact id each got, in billing id order
    /// (tests and `nasd check`).
    pub async fn billing_moved(&self) -> Result<Vec<(i64, i64, bool)>, StoreError> {
        let rows = match self {
            Store::Postgres(s) => sqlx::query(
                "SELECT billing_id, compact_id, done FROM billing_moved ORDER BY billing_id",
            )
            .persistent(s.persistent)
            .fetch_all(s.pool())
            .await
            .ctx("read billing ids")?
            .iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
            .collect::<Result<Vec<_>, sqlx::Error>>(),
            Store::Sqlite(s) => sqlx::query(
                "SELECT billing_id, compact_id, done FROM billing_moved ORDER BY billing_id",
            )
            .fetch_all(s.pool())
            .await
            .ctx("read billing ids")?
            .iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get::<i64, _>(2)? != 0)))
            .collect::<Result<Vec<_>, sqlx::Error>>(),
        };
        rows.ctx("read billing ids")
    }
}
