//! `/api/v1`: enqueue one event or a batch, an event's status, an account's events,
//! stack counts, the NAS list with live figures and owners, the cluster's daemons, retry
//! and cancel. Bodies are JSON objects with no unknown fields; every error is
//! `{"error": "..."}` naming the problem.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Extension;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::{ApiError, ApiState, Caller, EventInput, json_response};
use crate::stats::NasSnapshot;
use crate::store::cluster::{Member, NasOwner};
use crate::store::{CancelOutcome, Nas, RetryOutcome, Store, StoreError};

type ApiResult = Result<Response, ApiError>;

/// Parses a JSON body: the content type must be `application/json`, the body within
/// `max_body`, the JSON well formed and without unknown fields.
pub fn json_body<T: DeserializeOwned>(
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let ctype = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let essence = ctype.split(';').next().unwrap_or("").trim();
    if !essence.eq_ignore_ascii_case("application/json") {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            if ctype.is_empty() {
                "content type missing: send Content-Type: application/json".to_string()
            } else {
                format!(
                    "content type `{}` is not supported: send application/json",
                    super::printable(ctype)
                )
            },
        ));
    }
    let body = body.map_err(body_rejection)?;
    serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

/// A body that could not be read: too large (413) or broken.
pub fn body_rejection(r: BytesRejection) -> ApiError {
    let status = r.status();
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(status, "request body is larger than api.max_body")
    } else {
        ApiError::new(
            status,
            format!(
                "cannot read the request body: {}",
                r.body_text().to_lowercase()
            ),
        )
    }
}

/// A positive id from a path segment.
pub fn parse_id(what: &str, raw: &str) -> Result<i64, ApiError> {
    match raw.parse::<i64>() {
        Ok(v) if v > 0 => Ok(v),
        _ => Err(ApiError::bad_request(format!(
            "{what} must be a positive integer, got `{}`",
            super::printable(raw)
        ))),
    }
}

/// Query parameters into `T` (unknown parameters are errors).
pub(super) fn query<T: DeserializeOwned + Default>(raw: Option<String>) -> Result<T, ApiError> {
    match raw.as_deref() {
        None | Some("") => Ok(T::default()),
        Some(q) => serde_urlencoded::from_str(q)
            .map_err(|e| ApiError::bad_request(format!("invalid query string: {e}"))),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Batch {
    pub events: Vec<EventInput>,
}

pub async fn enqueue_one(
    State(state): State<Arc<ApiState>>,
    caller: Option<Extension<Caller>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let input: EventInput = json_body(&headers, body)?;
    let event = input.validate().map_err(ApiError::bad_request)?;
    let what = format!("{} user_id={}", event.cmd, event.user_id);
    let ids = state
        .store
        .enqueue_compact(&[event])
        .await
        .map_err(ApiError::store)?;
    state.stats.api_enqueued.fetch_add(1, Ordering::Relaxed);
    let id = ids.first().copied().unwrap_or_default();
    // An operator's enqueue from the console is an action of theirs; billing's own
    // enqueues (tokens, the compatible endpoint) are the normal flow, not audited.
    if let Some(Extension(caller)) = caller
        && caller.session
    {
        super::console::audit(&state, &caller, "enqueue", &format!("event {id}"), &what, 1).await;
    }
    Ok(json_response(
        StatusCode::CREATED,
        &json!({ "id": id, "status_url": format!("/api/v1/events/{id}") }),
    ))
}

pub async fn enqueue_batch(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let batch: Batch = json_body(&headers, body)?;
    if batch.events.is_empty() {
        return Err(ApiError::bad_request("events is empty"));
    }
    if batch.events.len() > state.cfg.max_batch {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "batch of {} events is larger than api.max_batch {}",
                batch.events.len(),
                state.cfg.max_batch
            ),
        ));
    }
    let mut events = Vec::with_capacity(batch.events.len());
    for (i, e) in batch.events.into_iter().enumerate() {
        events.push(
            e.validate()
                .map_err(|why| ApiError::bad_request(format!("events[{i}]: {why}")))?,
        );
    }
    let ids = state
        .store
        .enqueue_compact(&events)
        .await
        .map_err(ApiError::store)?;
    state
        .stats
        .api_enqueued
        .fetch_add(ids.len() as i64, Ordering::Relaxed);
    Ok(json_response(StatusCode::CREATED, &json!({ "ids": ids })))
}

pub async fn event_status(State(state): State<Arc<ApiState>>, Path(id): Path<String>) -> ApiResult {
    let id = parse_id("event id", &id)?;
    match state
        .store
        .event_status(id)
        .await
        .map_err(ApiError::store)?
    {
        Some(st) => Ok(json_response(StatusCode::OK, &to_value(&st))),
        None => Err(ApiError::not_found(format!("event {id} does not exist"))),
    }
}

pub async fn retry(
    State(state): State<Arc<ApiState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult {
    let id = parse_id("event id", &id)?;
    match state.store.retry_event(id).await.map_err(ApiError::store)? {
        RetryOutcome::Enqueued(new_id) => {
            super::console::audit(
                &state,
                &caller,
                "retry",
                &format!("event {id}"),
                &format!("new event {new_id}"),
                1,
            )
            .await;
            Ok(json_response(
                StatusCode::CREATED,
                &json!({ "id": new_id, "retry_of": id, "status_url": format!("/api/v1/events/{new_id}") }),
            ))
        }
        RetryOutcome::NotFound => Err(ApiError::not_found(format!("event {id} does not exist"))),
        RetryOutcome::NotFailed(state) => Err(ApiError::conflict(format!(
            "event {id} is {state}: only failed events can be retried"
        ))),
        RetryOutcome::NasGone(nas) => Err(ApiError::conflict(format!(
            "event {id} was for nas {nas}, which no longer exists"
        ))),
    }
}

pub async fn cancel(
    State(state): State<Arc<ApiState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult {
    let id = parse_id("event id", &id)?;
    match state
        .store
        .cancel_event(id)
        .await
        .map_err(ApiError::store)?
    {
        CancelOutcome::Cancelled(st) => {
            super::console::audit(&state, &caller, "cancel", &format!("event {id}"), "", 1).await;
            Ok(json_response(StatusCode::OK, &to_value(&*st)))
        }
        CancelOutcome::NotFound => Err(ApiError::not_found(format!("event {id} does not exist"))),
        CancelOutcome::NotCancellable(state) => Err(ApiError::conflict(format!(
            "event {id} is {state}: only queued or retrying events can be cancelled"
        ))),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitQuery {
    limit: Option<i64>,
}

pub async fn account_events(
    State(state): State<Arc<ApiState>>,
    Path(user_id): Path<String>,
    RawQuery(raw): RawQuery,
) -> ApiResult {
    let user_id = parse_id("user_id", &user_id)?;
    let q: LimitQuery = query(raw)?;
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::bad_request(format!(
            "limit must be 1..1000, got {limit}"
        )));
    }
    let events = state
        .store
        .account_events(user_id, limit)
        .await
        .map_err(ApiError::store)?;
    Ok(json_response(
        StatusCode::OK,
        &json!({ "user_id": user_id, "events": events }),
    ))
}

pub async fn stack_counts(State(state): State<Arc<ApiState>>) -> ApiResult {
    let (read_at, c) = super::console::stack_counts(&state)
        .await
        .map_err(ApiError::store)?;
    let age = c
        .oldest
        .map(|t| (Utc::now() - t).num_milliseconds().max(0) as f64 / 1000.0);
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "compact_total": c.compact_total,
            "stack_total": c.stack_total,
            "by_cmd": c.by_cmd.iter().map(|(cmd, n)| json!({"cmd": cmd, "count": n})).collect::<Vec<_>>(),
            "by_nas": c.by_nas.iter().map(|(nas, n)| json!({"nas_id": nas, "count": n})).collect::<Vec<_>>(),
            "oldest_event_at": c.oldest,
            "oldest_event_age_seconds": age,
            "read_at": read_at,
            "cache_seconds": super::console::STACK_CACHE.as_secs(),
        }),
    ))
}

/// Who owns each NAS, as operators are shown it: on PostgreSQL the rows of `nas_owner`
/// (an ownership counts only while its daemon's lease is current); on SQLite the one
/// daemon, which serves every enabled NAS.
pub struct Owners {
    /// SQLite: the database has no owner rows, because one daemon serves everything.
    sqlite: bool,
    /// SQLite: that daemon's id, when the caller is the daemon (the CLI is not, so it
    /// cannot name one).
    single: Option<String>,
    rows: HashMap<i64, NasOwner>,
}

impl Owners {
    /// From the rows `Store::nas_owners` returned; `me` is the asking daemon's id.
    pub fn new(sqlite: bool, me: Option<&str>, rows: Vec<NasOwner>) -> Owners {
        Owners {
            sqlite,
            single: me.map(str::to_string),
            rows: rows.into_iter().map(|o| (o.nas_id, o)).collect(),
        }
    }

    /// Reads the owners (one query on PostgreSQL, none on SQLite).
    pub async fn load(store: &Store, me: Option<&str>) -> Result<Owners, StoreError> {
        let rows = store.nas_owners().await?;
        Ok(Owners::new(matches!(store, Store::Sqlite(_)), me, rows))
    }

    /// Whether the database is SQLite (one daemon, no cluster).
    pub fn sqlite(&self) -> bool {
        self.sqlite
    }

    /// The valid owner of `nas` and its epoch. On SQLite: the daemon itself, epoch 0,
    /// for an enabled NAS.
    pub fn of(&self, nas: &Nas) -> Option<(&str, i64)> {
        if self.sqlite {
            return match (&self.single, nas.enabled) {
                (Some(me), true) => Some((me.as_str(), 0)),
                _ => None,
            };
        }
        let row = self.rows.get(&nas.id)?;
        if !row.valid {
            return None;
        }
        Some((row.daemon_id.as_deref()?, row.epoch))
    }

    /// The ownership row of a NAS, valid or not (PostgreSQL only): who held it last.
    pub fn row(&self, nas_id: i64) -> Option<&NasOwner> {
        self.rows.get(&nas_id)
    }

    /// The enabled NAS that no daemon validly owns: their events wait. Never any on
    /// SQLite, where the daemon serves every enabled NAS.
    pub fn unowned<'a>(&self, nas: &'a [Nas]) -> Vec<&'a Nas> {
        if self.sqlite {
            return Vec::new();
        }
        nas.iter()
            .filter(|n| n.enabled && self.of(n).is_none())
            .collect()
    }
}

/// Seconds from a duration, with millisecond precision and never negative: the times
/// come from the database's clock, which may run slightly ahead of this host's.
pub fn seconds(d: chrono::Duration) -> f64 {
    d.num_milliseconds().max(0) as f64 / 1000.0
}

/// One daemon of the cluster as the API shows it; `me` marks the asking daemon.
pub fn daemon_info(m: &Member, me: Option<&str>, now: DateTime<Utc>) -> Value {
    json!({
        "id": m.id,
        "this": me == Some(m.id.as_str()),
        "host": m.host,
        "pid": m.pid,
        "version": m.version,
        "api": m.api,
        "state": m.state,
        "alive": m.alive,
        "started_at": m.started_at,
        "heartbeat_at": m.heartbeat_at,
        "heartbeat_age_seconds": seconds(now - m.heartbeat_at),
        "lease_until": m.lease_until,
        "lease_left_seconds": if m.alive { seconds(m.lease_until - now) } else { 0.0 },
        "owned": m.owned,
    })
}

/// What SQLite says instead of a list of daemons.
pub const SQLITE_CLUSTER_NOTE: &str =
    "SQLite runs one daemon, which owns every enabled NAS; several daemons need PostgreSQL";

/// The cluster as `GET /api/v1/cluster` and `nasd cluster status --json` show it: the
/// daemons, how many are live, and the enabled NAS without a valid owner.
pub fn cluster_value(
    me: Option<&str>,
    members: &[Member],
    nas: &[Nas],
    owners: &Owners,
    now: DateTime<Utc>,
) -> Value {
    let unowned: Vec<Value> = owners
        .unowned(nas)
        .into_iter()
        .map(|n| {
            let row = owners.row(n.id);
            json!({
                "id": n.id,
                "name": n.name,
                "ip": n.ip,
                "last_owner": row.and_then(|o| o.daemon_id.clone()),
                "epoch": row.map(|o| o.epoch),
            })
        })
        .collect();
    json!({
        "backend": if owners.sqlite() { "sqlite" } else { "postgres" },
        "daemon_id": me,
        "live": members.iter().filter(|m| m.is_live()).count(),
        "daemons": members.iter().map(|m| daemon_info(m, me, now)).collect::<Vec<_>>(),
        "unowned": unowned,
        "note": owners.sqlite().then_some(SQLITE_CLUSTER_NOTE),
    })
}

/// `GET /api/v1/cluster`: the daemons sharing the database, with their heartbeat and
/// the NAS each owns, and the NAS nobody owns.
pub async fn cluster(State(state): State<Arc<ApiState>>) -> ApiResult {
    let members = state
        .store
        .cluster_members()
        .await
        .map_err(ApiError::store)?;
    let nas = state.store.nas_list().await.map_err(ApiError::store)?;
    let owners = Owners::load(&state.store, Some(&state.daemon_id))
        .await
        .map_err(ApiError::store)?;
    Ok(json_response(
        StatusCode::OK,
        &cluster_value(Some(&state.daemon_id), &members, &nas, &owners, Utc::now()),
    ))
}

/// One NAS as the API shows it: settings (no secrets), live figures and its valid
/// owner with the ownership's epoch.
pub fn nas_info(
    nas: &Nas,
    snap: Option<&NasSnapshot>,
    queue: Option<&crate::store::NasQueue>,
    owner: Option<(&str, i64)>,
) -> Value {
    let empty = NasSnapshot::default();
    let s = snap.unwrap_or(&empty);
    json!({
        "id": nas.id,
        "name": nas.name,
        "ip": nas.ip,
        "enabled": nas.enabled,
        "paused": nas.paused,
        "settings": settings(nas),
        "scheme": nas.scheme,
        "script_name": nas.script_name,
        "pool_size": nas.n_workers,
        "max_sessions": nas.max_sessions,
        "running": s.running,
        "open_sessions": s.open_sessions,
        "in_flight": s.in_flight,
        "queue_depth": queue.map_or(0, |q| q.depth),
        "oldest_event_at": queue.and_then(|q| q.oldest),
        "last_error": s.last_error,
        "last_error_at": s.last_error_at,
        "last_success_at": s.last_success_at,
        "consecutive_failures": s.consecutive_failures,
        "failing_since": s.failing_since,
        "unavailable": s.unavailable,
        "down": s.down_since.is_some(),
        "down_since": s.down_since,
        "down_reason": s.down_reason,
        "owner": owner.map(|(daemon, _)| daemon),
        "owner_epoch": owner.map(|(_, epoch)| epoch),
    })
}

/// A NAS's settings as the console shows them: secrets only as set or not.
pub fn settings(nas: &Nas) -> Value {
    let masked = |s: &Option<crate::model::Secret>| s.as_ref().map(|_| "••••");
    json!({
        "protocol": nas.protocol,
        "port": nas.port,
        "login": nas.login,
        "password": masked(&nas.password),
        "secret": masked(&nas.secret),
        "n_workers": nas.n_workers,
        "max_sessions": nas.max_sessions,
        "enabled": nas.enabled,
        "paused": nas.paused,
        "scheme": nas.scheme,
        "script_name": nas.script_name,
    })
}

async fn nas_values(state: &ApiState) -> Result<Vec<Value>, ApiError> {
    let list = state.store.nas_list().await.map_err(ApiError::store)?;
    // The console's sampler reads the queues every 10 s: reuse that when it is fresh.
    let queues: HashMap<i64, crate::store::NasQueue> =
        match super::console::cached_queue(state, chrono::Duration::seconds(15)) {
            Some(q) => q,
            None => state
                .store
                .queue_by_nas()
                .await
                .map_err(ApiError::store)?
                .into_iter()
                .map(|q| (q.nas_id, q))
                .collect(),
        };
    let snaps: HashMap<i64, NasSnapshot> = state
        .stats
        .snapshot()
        .into_iter()
        .map(|s| (s.nas_id, s))
        .collect();
    let owners = Owners::load(&state.store, Some(&state.daemon_id))
        .await
        .map_err(ApiError::store)?;
    Ok(list
        .iter()
        .map(|n| nas_info(n, snaps.get(&n.id), queues.get(&n.id), owners.of(n)))
        .collect())
}

pub async fn nas_list(State(state): State<Arc<ApiState>>) -> ApiResult {
    let all = nas_values(&state).await?;
    Ok(json_response(StatusCode::OK, &json!({ "nas": all })))
}

pub async fn nas_one(State(state): State<Arc<ApiState>>, Path(id): Path<String>) -> ApiResult {
    let id = parse_id("nas id", &id)?;
    let all = nas_values(&state).await?;
    all.into_iter()
        .find(|v| v["id"] == id)
        .map(|v| json_response(StatusCode::OK, &v))
        .ok_or_else(|| ApiError::not_found(format!("nas {id} does not exist")))
}

fn to_value<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}
