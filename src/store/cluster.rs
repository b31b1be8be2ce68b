//! The cluster's tables on PostgreSQL: daemons with leases renewed in database time
//! (`nasd_daemons`) and one owner per NAS with an epoch (`nas_owner`). Every statement
//! here is one round trip once sqlx has it prepared; in pooled mode (`[database]
//! statement_cache = false`) each call is a transaction of its own with unnamed
//! statements instead (see `postgres::Session`). None depends on the number of NAS
//! except taking, releasing and listing.

use chrono::{DateTime, Utc};
use sqlx::Row;

use super::postgres::PgStore;
use super::{SqlContext, StoreError};

/// One daemon of the cluster as the table shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Member {
    pub id: String,
    pub session: i64,
    pub host: String,
    pub pid: i32,
    pub version: String,
    /// Where its HTTP API listens, when it has one.
    pub api: Option<String>,
    /// `live`, `draining` (stopping: handing its NAS over), `left` or `lost` (its lease
    /// ran out and its NAS were taken over).
    pub state: String,
    /// Its lease has not run out (database time).
    pub alive: bool,
    pub started_at: DateTime<Utc>,
    pub heartbeat_at: DateTime<Utc>,
    pub lease_until: DateTime<Utc>,
    /// NAS it owns now (rows naming its current session).
    pub owned: i64,
}

impl Member {
    /// Counts among the daemons NAS are spread over.
    pub fn is_live(&self) -> bool {
        self.alive && self.state == "live"
    }
}

/// What joining found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Joined {
    /// Joined; `previous` is the state of an earlier row under the same id (`lost`: this
    /// daemon is back after its NAS were taken over).
    Joined { previous: Option<String> },
    /// The id is held by a live daemon (two daemons configured with one name).
    InUse {
        host: String,
        pid: i32,
        lease_until: DateTime<Utc>,
    },
}

/// The answer to a heartbeat.
#[derive(Debug, Clone)]
pub struct Beat {
    /// The lease was renewed (false: the row is gone or belongs to a newer session).
    pub renewed: bool,
    /// Every daemon row, as it was before this renewal.
    pub members: Vec<Member>,
    /// NAS rows naming this session.
    pub held: i64,
}

/// A NAS taken by `take`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Taken {
    pub nas_id: i64,
    pub epoch: i64,
    /// The daemon that owned it before, if any.
    pub from: Option<String>,
    /// Why it could be taken: `free` (never owned), `released` (handed over),
    /// `lease expired`, `daemon left`, `daemon restarted`.
    pub why: String,
    /// Rows of the NAS left `running` by the previous owner, put back to ready.
    pub reset: i64,
}

/// The owner of one NAS.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct NasOwner {
    pub nas_id: i64,
    pub daemon_id: Option<String>,
    pub epoch: i64,
    /// The owner's lease is current (false: nobody owns it right now).
    pub valid: bool,
    pub since: Option<DateTime<Utc>>,
}

fn ms(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// A valid ownership: the row names a daemon's current session with an unexpired
/// lease. Used by `take` (what may not be taken) and by claims (what may claim).
pub(super) const VALID_OWNER: &str = "EXISTS (SELECT 1 FROM nasd_daemons d WHERE d.id = o.daemon_id \
     AND d.session = o.session AND d.lease_until > now() AND d.state IN ('live', 'draining'))";

impl PgStore {
    /// Adds this daemon (or replaces an earlier life of it whose lease ran out, that
    /// left, or whose session is `previous_session`). Old rows of daemons gone for a
    /// day are deleted on the way.
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
    ) -> Result<Joined, StoreError> {
        let mut db = self.open().await.ctx("cluster: join")?;
        sqlx::query(
            "DELETE FROM nasd_daemons WHERE state IN ('left', 'lost') \
             AND heartbeat_at < now() - interval '1 day' AND id <> $1",
        )
        .persistent(self.persistent)
        .bind(id)
        .execute(db.exec())
        .await
        .ctx("cluster: forget old daemons")?;
        let row = sqlx::query(
            "WITH prev AS (SELECT state, host, pid, lease_until, (lease_until < now()) AS expired, \
             session FROM nasd_daemons WHERE id = $1), \
             up AS (INSERT INTO nasd_daemons AS d (id, session, host, pid, version, api, started_at, \
             heartbeat_at, lease_until, state) VALUES ($1, $2, $3, $4, $5, $6, now(), now(), \
             now() + $7 * interval '1 millisecond', 'live') \
             ON CONFLICT (id) DO UPDATE SET session = EXCLUDED.session, host = EXCLUDED.host, \
             pid = EXCLUDED.pid, version = EXCLUDED.version, api = EXCLUDED.api, started_at = now(), \
             heartbeat_at = now(), lease_until = EXCLUDED.lease_until, state = 'live' \
             WHERE d.lease_until < now() OR d.state IN ('left', 'lost') OR d.session = $8 \
             RETURNING 1) \
             SELECT (SELECT count(*) FROM up) AS joined, prev.state, prev.host, prev.pid, \
             prev.lease_until FROM (SELECT 1) one LEFT JOIN prev ON true",
        )
        .persistent(self.persistent)
        .bind(id)
        .bind(session)
        .bind(host)
        .bind(pid)
        .bind(env!("CARGO_PKG_VERSION"))
        .bind(api)
        .bind(ms(lease))
        .bind(previous_session)
        .fetch_one(db.exec())
        .await
        .ctx("cluster: join")?;
        db.done().await.ctx("cluster: join")?;
        let joined: i64 = row.try_get("joined").ctx("cluster: join")?;
        let state: Option<String> = row.try_get("state").ctx("cluster: join")?;
        if joined == 1 {
            return Ok(Joined::Joined { previous: state });
        }
        Ok(Joined::InUse {
            host: row
                .try_get::<Option<String>, _>("host")
                .ctx("cluster: join")?
                .unwrap_or_default(),
            pid: row
                .try_get::<Option<i32>, _>("pid")
                .ctx("cluster: join")?
                .unwrap_or_default(),
            lease_until: row
                .try_get::<Option<DateTime<Utc>>, _>("lease_until")
                .ctx("cluster: join")?
                .unwrap_or_else(Utc::now),
        })
    }

    /// Renews this daemon's lease (database time) and returns every daemon row and how
    /// many NAS rows name this session. One statement.
    pub async fn cluster_heartbeat(
        &self,
        id: &str,
        session: i64,
        lease: std::time::Duration,
    ) -> Result<Beat, StoreError> {
        let mut db = self.open().await.ctx("cluster: heartbeat")?;
        let rows = sqlx::query(&format!(
            "WITH hb AS (UPDATE nasd_daemons SET heartbeat_at = now(), \
             lease_until = now() + $3 * interval '1 millisecond' \
             WHERE id = $1 AND session = $2 AND state IN ('live', 'draining') RETURNING id) \
             SELECT (SELECT count(*) FROM hb) AS renewed, \
             (SELECT count(*) FROM nas_owner WHERE session = $2) AS held, {MEMBER_COLUMNS} \
             FROM nasd_daemons d ORDER BY d.id"
        ))
        .persistent(self.persistent)
        .bind(id)
        .bind(session)
        .bind(ms(lease))
        .fetch_all(db.exec())
        .await
        .ctx("cluster: heartbeat")?;
        db.done().await.ctx("cluster: heartbeat")?;
        let mut beat = Beat {
            renewed: false,
            members: Vec::with_capacity(rows.len()),
            held: 0,
        };
        for row in &rows {
            beat.renewed = row.try_get::<i64, _>("renewed").ctx("cluster: heartbeat")? == 1;
            beat.held = row.try_get("held").ctx("cluster: heartbeat")?;
            beat.members
                .push(member_from_row(row).ctx("cluster: heartbeat")?);
        }
        Ok(beat)
    }

    /// Takes the NAS of `nas_ids` that nobody validly owns (free, released, or whose
    /// owner's lease ran out), bumping each one's epoch; in the same statement the rows
    /// the previous owner left `running` on them go back to ready (try count kept), so
    /// its late completions and lease renewals match no claim token. Does nothing
    /// unless this daemon's own lease is current.
    pub async fn cluster_take(
        &self,
        id: &str,
        session: i64,
        nas_ids: &[i64],
    ) -> Result<Vec<Taken>, StoreError> {
        if nas_ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut db = self.open().await.ctx("cluster: take nas")?;
        let rows = sqlx::query(&format!(
            "WITH me AS (SELECT 1 FROM nasd_daemons WHERE id = $1 AND session = $2 \
             AND state = 'live' AND lease_until > now()), \
             prev AS (SELECT o.nas_id, o.daemon_id, CASE WHEN o.daemon_id IS NULL THEN 'free' \
             WHEN o.session IS NULL THEN 'released' \
             WHEN d.id IS NULL OR d.session IS DISTINCT FROM o.session THEN 'daemon restarted' \
             WHEN d.state = 'left' THEN 'daemon left' ELSE 'lease expired' END AS why \
             FROM nas_owner o LEFT JOIN nasd_daemons d ON d.id = o.daemon_id \
             WHERE o.nas_id = ANY($3)), \
             up AS (INSERT INTO nas_owner AS o (nas_id, daemon_id, session, epoch, since) \
             SELECT n, $1, $2, 1, now() FROM unnest($3::bigint[]) AS n, me \
             ON CONFLICT (nas_id) DO UPDATE SET daemon_id = $1, session = $2, \
             epoch = o.epoch + 1, since = now() \
             WHERE o.session IS NULL OR NOT {VALID_OWNER} \
             RETURNING o.nas_id, o.epoch), \
             reset AS (UPDATE events_stack s SET state = 'ready', claim_token = NULL, \
             lease_until = NULL FROM up WHERE s.nas_id = up.nas_id AND s.state = 'running' \
             RETURNING s.nas_id) \
             SELECT up.nas_id, up.epoch, prev.daemon_id, COALESCE(prev.why, 'free') AS why, \
             (SELECT count(*) FROM reset r WHERE r.nas_id = up.nas_id) AS reset \
             FROM up LEFT JOIN prev ON prev.nas_id = up.nas_id ORDER BY up.nas_id"
        ))
        .persistent(self.persistent)
        .bind(id)
        .bind(session)
        .bind(nas_ids)
        .fetch_all(db.exec())
        .await
        .ctx("cluster: take nas")?;
        db.done().await.ctx("cluster: take nas")?;
        rows.iter()
            .map(|r| {
                let from: Option<String> = r.try_get("daemon_id")?;
                let why: String = r.try_get("why")?;
                Ok(Taken {
                    nas_id: r.try_get("nas_id")?,
                    epoch: r.try_get("epoch")?,
                    from: if why == "free" { None } else { from },
                    why,
                    reset: r.try_get("reset")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .ctx("cluster: take nas")
    }

    /// Marks these daemons `lost` if their lease has run out and they are not marked
    /// yet; returns the ids this call marked (each daemon is marked once, by one
    /// daemon of the cluster, which is what makes its alert fire once).
    pub async fn cluster_mark_lost(&self, ids: &[String]) -> Result<Vec<String>, StoreError> {
        let mut db = self.open().await.ctx("cluster: mark lost daemons")?;
        let marked = sqlx::query_scalar(
            "UPDATE nasd_daemons SET state = 'lost' WHERE id = ANY($1) \
             AND lease_until < now() AND state IN ('live', 'draining') RETURNING id",
        )
        .persistent(self.persistent)
        .bind(ids)
        .fetch_all(db.exec())
        .await
        .ctx("cluster: mark lost daemons")?;
        db.done().await.ctx("cluster: mark lost daemons")?;
        Ok(marked)
    }

    /// Ends the leases of these daemons now (they are known to be dead: processes of
    /// this host that no longer run); returns the ids whose lease this ended.
    pub async fn cluster_expire(&self, ids: &[String]) -> Result<Vec<String>, StoreError> {
        let mut db = self
            .open()
            .await
            .ctx("cluster: end the leases of dead daemons")?;
        let ended = sqlx::query_scalar(
            "UPDATE nasd_daemons SET lease_until = now() - interval '1 millisecond' \
             WHERE id = ANY($1) AND state IN ('live', 'draining') AND lease_until > now() \
             RETURNING id",
        )
        .persistent(self.persistent)
        .bind(ids)
        .fetch_all(db.exec())
        .await
        .ctx("cluster: end the leases of dead daemons")?;
        db.done()
            .await
            .ctx("cluster: end the leases of dead daemons")?;
        Ok(ended)
    }

    /// Gives these NAS up (after their owners stopped): anyone may take them now. The
    /// row keeps the daemon's id (without a session, so it is no ownership) to say who
    /// released it.
    pub async fn cluster_release(
        &self,
        id: &str,
        session: i64,
        nas_ids: &[i64],
    ) -> Result<u64, StoreError> {
        let mut db = self.open().await.ctx("cluster: release nas")?;
        let done = sqlx::query(
            "UPDATE nas_owner SET session = NULL, since = now() \
             WHERE nas_id = ANY($3) AND daemon_id = $1 AND session = $2",
        )
        .persistent(self.persistent)
        .bind(id)
        .bind(session)
        .bind(nas_ids)
        .execute(db.exec())
        .await
        .ctx("cluster: release nas")?;
        db.done().await.ctx("cluster: release nas")?;
        Ok(done.rows_affected())
    }

    /// Sets this daemon's state: `draining` when it starts stopping (the others stop
    /// counting it and take its NAS as it releases them), `left` at the end.
    pub async fn cluster_set_state(
        &self,
        id: &str,
        session: i64,
        state: &str,
    ) -> Result<(), StoreError> {
        let end_lease = if state == "left" {
            ", lease_until = now()"
        } else {
            ""
        };
        let mut db = self.open().await.ctx("cluster: set daemon state")?;
        sqlx::query(&format!(
            "UPDATE nasd_daemons SET state = $3{end_lease} WHERE id = $1 AND session = $2"
        ))
        .persistent(self.persistent)
        .bind(id)
        .bind(session)
        .bind(state)
        .execute(db.exec())
        .await
        .ctx("cluster: set daemon state")?;
        db.done().await.ctx("cluster: set daemon state")?;
        Ok(())
    }

    /// Every daemon row with how many NAS it owns.
    pub async fn cluster_members(&self) -> Result<Vec<Member>, StoreError> {
        let mut db = self.open().await.ctx("cluster: list daemons")?;
        let rows = sqlx::query(&format!(
            "SELECT {MEMBER_COLUMNS} FROM nasd_daemons d ORDER BY d.id"
        ))
        .persistent(self.persistent)
        .fetch_all(db.exec())
        .await
        .ctx("cluster: list daemons")?;
        db.done().await.ctx("cluster: list daemons")?;
        rows.iter()
            .map(member_from_row)
            .collect::<Result<_, _>>()
            .ctx("cluster: list daemons")
    }

    /// The owner of every NAS that has an ownership row.
    pub async fn nas_owners(&self) -> Result<Vec<NasOwner>, StoreError> {
        let mut db = self.open().await.ctx("cluster: list nas owners")?;
        let rows = sqlx::query(&format!(
            "SELECT o.nas_id, o.daemon_id, o.epoch, o.since, \
             (o.session IS NOT NULL AND {VALID_OWNER}) AS valid FROM nas_owner o ORDER BY o.nas_id"
        ))
        .persistent(self.persistent)
        .fetch_all(db.exec())
        .await
        .ctx("cluster: list nas owners")?;
        db.done().await.ctx("cluster: list nas owners")?;
        rows.iter()
            .map(|r| {
                Ok(NasOwner {
                    nas_id: r.try_get("nas_id")?,
                    daemon_id: r.try_get("daemon_id")?,
                    epoch: r.try_get("epoch")?,
                    valid: r.try_get("valid")?,
                    since: r.try_get("since")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .ctx("cluster: list nas owners")
    }
}

const MEMBER_COLUMNS: &str = "d.id, d.session, d.host, d.pid, d.version, d.api, d.state, \
     (d.lease_until > now()) AS alive, d.started_at, d.heartbeat_at, d.lease_until, \
     (SELECT count(*) FROM nas_owner o WHERE o.daemon_id = d.id AND o.session = d.session) AS owned";

fn member_from_row(r: &sqlx::postgres::PgRow) -> Result<Member, sqlx::Error> {
    Ok(Member {
        id: r.try_get("id")?,
        session: r.try_get("session")?,
        host: r.try_get("host")?,
        pid: r.try_get("pid")?,
        version: r.try_get("version")?,
        api: r.try_get("api")?,
        state: r.try_get("state")?,
        alive: r.try_get("alive")?,
        started_at: r.try_get("started_at")?,
        heartbeat_at: r.try_get("heartbeat_at")?,
        lease_until: r.try_get("lease_until")?,
        owned: r.try_get("owned")?,
    })
}
