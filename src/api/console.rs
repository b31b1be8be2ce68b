//! The operator console: the page under `/ui` (embedded assets, no CDN), its session
//! (a token asked once, then an HttpOnly SameSite=Strict cookie and a CSRF header on
//! every action), and the JSON endpoints only the console needed so far: overview and
//! live updates (server-sent events from memory: `series::Series` and `Stats`), charts,
//! a NAS's log tail, pause / resume / probe / send, the event browser with bulk retry
//! and cancel by selection or filter, account search and the audit log. Every action
//! is written to `nasd_audit` and the daemon log; the same endpoints serve scripts
//! with a bearer token.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Extension;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::json::{Owners, json_body, parse_id, query};
use super::{ApiError, ApiState, Caller, json_response, printable};
use crate::config::DaemonConfig;
use crate::journal::{Journal, NasTarget};
use crate::series::{Point, Series};
use crate::stats::NasSnapshot;
use crate::store::{AuditEntry, EventQuery, EventState, Nas};

type ApiResult = Result<Response, ApiError>;

const INDEX_HTML: &str = include_str!("ui/index.html");
const APP_JS: &str = include_str!("ui/app.js");
const APP_CSS: &str = include_str!("ui/app.css");
const FAVICON: &str = include_str!("ui/favicon.svg");

/// The session cookie's name.
pub const COOKIE: &str = "nasd_session";
/// The header every console action carries with the session's CSRF value.
pub const CSRF_HEADER: &str = "x-nasd-csrf";
/// How long a console session lasts.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Sessions kept at most; past it the oldest go first.
const MAX_SESSIONS: usize = 10_000;
/// Events one bulk retry or cancel acts on at most.
pub const BULK_MAX: i64 = 10_000;
/// How often the live view sends the overview.
pub const LIVE_EVERY: Duration = Duration::from_secs(2);

struct Session {
    caller: Caller,
    csrf: String,
    expires: Instant,
}

/// The console's sessions, in memory: a restart asks for the token again.
#[derive(Default)]
pub struct Sessions {
    map: Mutex<HashMap<String, Session>>,
}

fn random_hex(bytes: usize) -> String {
    use rand::RngCore;
    let mut buf = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut buf);
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

impl Sessions {
    /// A new session for `caller`: (cookie value, csrf value).
    pub fn open(&self, caller: Caller) -> (String, String) {
        let id = random_hex(32);
        let csrf = random_hex(16);
        let now = Instant::now();
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, s| s.expires > now);
        while map.len() >= MAX_SESSIONS {
            let Some(oldest) = map
                .iter()
                .min_by_key(|(_, s)| s.expires)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            map.remove(&oldest);
        }
        map.insert(
            id.clone(),
            Session {
                caller,
                csrf: csrf.clone(),
                expires: now + SESSION_TTL,
            },
        );
        (id, csrf)
    }

    /// The caller and csrf value of a live session.
    pub fn get(&self, id: &str) -> Option<(Caller, String)> {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.get(id)
            .filter(|s| s.expires > Instant::now())
            .map(|s| (s.caller.clone(), s.csrf.clone()))
    }

    pub fn close(&self, id: &str) {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }
}

/// What the console acts through: the daemon's journal, its owners' wake-ups, the
/// supervisor's resync, the recent series. `detached` (an API server without a daemon,
/// in tests) has none of them.
pub struct Console {
    pub sessions: Sessions,
    pub series: Arc<Series>,
    pub journal: Option<Journal>,
    /// Asks the owner of a NAS in this daemon to probe it now (false: no owner here).
    pub probe_owner: Option<Box<dyn Fn(i64) -> bool + Send + Sync>>,
    pub resync: Option<Arc<tokio::sync::Notify>>,
    pub daemon: Option<DaemonConfig>,
    pub params_query: String,
    /// `[billing]`: the test command takes the account's variables from there.
    pub billing: Option<crate::billing::Billing>,
    /// The owners' devices: a reconciliation of a NAS served here reads through its
    /// owner's session pool (within `max_sessions`).
    pub devices: Option<crate::cluster::Devices>,
    /// Ends the live streams when the daemon stops.
    pub shutdown: CancellationToken,
    /// `GET /api/v1/stack`'s counts (a scan of the stacks), computed at most once per
    /// `STACK_CACHE`, whatever the number of pages asking.
    pub stack: tokio::sync::Mutex<Option<(Instant, DateTime<Utc>, crate::store::StackCount)>>,
}

/// How long the stack counts are reused.
pub const STACK_CACHE: Duration = Duration::from_secs(10);

/// The stack counts and when they were read: from the cache while younger than
/// `STACK_CACHE`, else read now (one reader at a time; the others wait and reuse it).
pub async fn stack_counts(
    state: &ApiState,
) -> Result<(DateTime<Utc>, crate::store::StackCount), crate::store::StoreError> {
    let mut cached = state.console.stack.lock().await;
    if let Some((at, read_at, counts)) = cached.as_ref()
        && at.elapsed() < STACK_CACHE
    {
        return Ok((*read_at, counts.clone()));
    }
    let counts = state.store.stack_count().await?;
    let read_at = Utc::now();
    *cached = Some((Instant::now(), read_at, counts.clone()));
    Ok((read_at, counts))
}

/// The queue depths the sampler read, when they are at most `max_age` old.
pub fn cached_queue(
    state: &ApiState,
    max_age: chrono::Duration,
) -> Option<HashMap<i64, crate::store::NasQueue>> {
    let cached = state.console.series.cached();
    match cached.at {
        Some(at) if Utc::now() - at <= max_age && cached.error.is_none() => Some(cached.queue),
        _ => None,
    }
}

impl Console {
    pub fn detached() -> Console {
        Console {
            sessions: Sessions::default(),
            series: Series::new(),
            journal: None,
            probe_owner: None,
            resync: None,
            daemon: None,
            params_query: String::new(),
            billing: None,
            devices: None,
            shutdown: CancellationToken::new(),
            stack: Default::default(),
        }
    }

    fn daemon(&self) -> Result<&DaemonConfig, ApiError> {
        self.daemon.as_ref().ok_or_else(|| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "this API server runs without a daemon",
            )
        })
    }
}

/// Paths served without credentials: the page's assets and the login itself.
pub fn is_public(path: &str) -> bool {
    matches!(
        path,
        "/ui"
            | "/ui/"
            | "/ui/app.js"
            | "/ui/app.css"
            | "/ui/favicon.svg"
            | "/ui/login"
            | "/ui/logout"
    )
}

/// An action must come from this server's own pages: a browser's `Origin` (or
/// `Sec-Fetch-Site`) naming another site is refused. Scripts send neither.
pub fn same_origin(headers: &HeaderMap) -> Result<(), String> {
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok())
        && site.eq_ignore_ascii_case("cross-site")
    {
        return Err("cross-site request refused (Sec-Fetch-Site: cross-site)".into());
    }
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    let origin = origin.to_str().unwrap_or("");
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let own = !host.is_empty()
        && (origin == format!("http://{host}") || origin == format!("https://{host}"));
    if own {
        Ok(())
    } else {
        Err(format!(
            "cross-site request refused: Origin `{}` is not this server (`{}`)",
            printable(origin),
            printable(host)
        ))
    }
}

/// The session cookie's value, if the request has one.
fn session_id(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v)
}

/// The caller of a request with a live session cookie, and the session's csrf value.
pub fn session_caller(state: &ApiState, headers: &HeaderMap) -> Option<(Caller, Option<String>)> {
    let id = session_id(headers)?;
    let (caller, csrf) = state.console.sessions.get(id)?;
    // A session outlives no change of its token: removed, or its role changed by a
    // reload (SIGHUP), the session ends and the page asks for a token again.
    let tokens = state.cfg.tokens.get();
    let still = if tokens.is_empty() {
        caller.name == Caller::anonymous().name
    } else {
        tokens
            .iter()
            .any(|t| t.name == caller.name && t.role == caller.role)
    };
    if !still {
        state.console.sessions.close(id);
        return None;
    }
    Some((caller, Some(csrf)))
}

/// A session's action must carry its csrf value: a page of another site cannot read it.
pub fn check_csrf(headers: &HeaderMap, expected: &str) -> Result<(), String> {
    match headers.get(CSRF_HEADER).and_then(|v| v.to_str().ok()) {
        None => Err("missing X-Nasd-Csrf header: console actions carry the session's value".into()),
        Some(v) if super::same_secret(v.as_bytes(), expected.as_bytes()) => Ok(()),
        Some(_) => Err("X-Nasd-Csrf header does not match the session".into()),
    }
}

fn asset(ctype: &'static str, body: &'static str) -> Response {
    let mut resp = (StatusCode::OK, body).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        "content-security-policy",
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
             img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; form-action 'self'",
        ),
    );
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    resp
}

pub async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML)
}
pub async fn app_js() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS)
}
pub async fn app_css() -> Response {
    asset("text/css; charset=utf-8", APP_CSS)
}
pub async fn favicon() -> Response {
    asset("image/svg+xml", FAVICON)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Login {
    #[serde(default)]
    token: String,
}

fn cookie(value: &str, max_age: u64) -> HeaderValue {
    HeaderValue::from_str(&format!(
        "{COOKIE}={value}; HttpOnly; SameSite=Strict; Path=/; Max-Age={max_age}"
    ))
    .unwrap_or_else(|_| HeaderValue::from_static("nasd_session=; Max-Age=0"))
}

/// `POST /ui/login` `{"token": "..."}`: a session cookie for the token's name and role.
pub async fn login(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let input: Login = json_body(&headers, body)?;
    let caller = if state.cfg.tokens.get().is_empty() {
        Caller::anonymous()
    } else {
        match super::token_caller(&state.cfg, input.token.trim()) {
            Some(c) => c,
            None => {
                log(&state, "console login refused: invalid token");
                return Err(ApiError::new(StatusCode::UNAUTHORIZED, "invalid token"));
            }
        }
    };
    let caller = Caller {
        session: true,
        ..caller
    };
    let (id, csrf) = state.console.sessions.open(caller.clone());
    log(
        &state,
        &format!("console login: {} ({})", caller.name, caller.role.as_str()),
    );
    let mut resp = json_response(
        StatusCode::OK,
        &json!({ "name": caller.name, "role": caller.role.as_str(), "csrf": csrf }),
    );
    resp.headers_mut()
        .insert(header::SET_COOKIE, cookie(&id, SESSION_TTL.as_secs()));
    Ok(resp)
}

/// `POST /ui/logout`: ends the session and clears the cookie.
pub async fn logout(State(state): State<Arc<ApiState>>, headers: HeaderMap) -> Response {
    if let Some(id) = session_id(&headers) {
        state.console.sessions.close(id);
    }
    let mut resp = StatusCode::NO_CONTENT.into_response();
    resp.headers_mut().insert(header::SET_COOKIE, cookie("", 0));
    resp
}

/// `GET /api/v1/whoami`: the caller's name and role (and the session's csrf value).
pub async fn whoami(
    State(state): State<Arc<ApiState>>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
) -> Response {
    let csrf = session_caller(&state, &headers).and_then(|(_, c)| c);
    json_response(
        StatusCode::OK,
        &json!({ "name": caller.name, "role": caller.role.as_str(), "csrf": csrf,
                 "auth": !state.cfg.tokens.get().is_empty() }),
    )
}

fn log(state: &ApiState, line: &str) {
    tracing::info!("{line}");
    if let Some(j) = &state.console.journal {
        j.daemon(line);
    }
}

/// Writes an operator action to `nasd_audit` and the daemon log. The action is done
/// already: a database that refuses the audit row is logged, not reported as the
/// action failing.
pub async fn audit(
    state: &ApiState,
    caller: &Caller,
    action: &str,
    target: &str,
    detail: &str,
    count: i64,
) {
    log(
        state,
        &format!(
            "Audit: {} {action} {target} count={count}{}",
            caller.name,
            if detail.is_empty() {
                String::new()
            } else {
                format!(" ({detail})")
            }
        ),
    );
    let entry = AuditEntry {
        who: caller.name.clone(),
        action: action.to_string(),
        target: target.to_string(),
        detail: detail.to_string(),
        count,
    };
    if let Err(e) = state.store.audit_insert(&entry).await {
        log(state, &format!("audit row not written: {e}"));
    }
}

/// The state of a NAS as the overview names it.
pub fn nas_state(nas: &Nas, snap: Option<&NasSnapshot>, owned: bool, sqlite: bool) -> &'static str {
    if !nas.enabled {
        return "disabled";
    }
    if nas.paused {
        return "paused";
    }
    if let Some(s) = snap
        && s.unavailable.is_some()
    {
        return "config_error";
    }
    if !owned && !sqlite {
        return "unowned";
    }
    match snap {
        Some(s) if s.down_since.is_some() => "down",
        _ => "up",
    }
}

/// The overview: every NAS with its live figures (from memory) and the queue depths
/// and owners the sampler read last, plus totals.
pub fn overview(state: &ApiState) -> Value {
    let cached = state.console.series.cached();
    let snaps: HashMap<i64, NasSnapshot> = state
        .stats
        .snapshot()
        .into_iter()
        .map(|s| (s.nas_id, s))
        .collect();
    let owners = Owners::new(
        matches!(state.store, crate::store::Store::Sqlite(_)),
        Some(&state.daemon_id),
        cached.owners.clone(),
    );
    let now = Utc::now();
    let mut rows = Vec::new();
    let (mut up, mut down, mut depth, mut in_flight) = (0, 0, 0i64, 0i64);
    let (mut done, mut failed, mut retried) = (0u64, 0u64, 0u64);
    for nas in &cached.nas {
        let snap = snaps.get(&nas.id);
        let queue = cached.queue.get(&nas.id);
        let owner = owners.of(nas);
        let st = nas_state(nas, snap, owner.is_some(), owners.sqlite());
        match st {
            "up" => up += 1,
            "down" | "config_error" | "unowned" => down += 1,
            _ => {}
        }
        let per_minute = state.console.series.per_minute(nas.id);
        let (p50, p99) = match snap {
            Some(s) => state.console.series.latency_ms(nas.id, &s.latency),
            None => (None, None),
        };
        let q = queue.map_or(0, |q| q.depth);
        depth += q;
        in_flight += snap.map_or(0, |s| s.in_flight);
        done += per_minute.done;
        failed += per_minute.failed;
        retried += per_minute.retried;
        rows.push(json!({
            "id": nas.id,
            "name": nas.name,
            "ip": nas.ip,
            "scheme": nas.scheme,
            "script_name": nas.script_name,
            "transport": nas.protocol,
            "enabled": nas.enabled,
            "paused": nas.paused,
            "state": st,
            "up": st == "up",
            "down_reason": snap.and_then(|s| s.down_reason.clone().or_else(|| s.unavailable.clone())),
            "down_since": snap.and_then(|s| s.down_since),
            "owner": owner.map(|(d, _)| d),
            "pool_size": nas.n_workers,
            "max_sessions": nas.max_sessions,
            "in_flight": snap.map_or(0, |s| s.in_flight),
            "open_sessions": snap.map_or(0, |s| s.open_sessions),
            "queue_depth": q,
            "oldest_age_seconds": queue.and_then(|q| q.oldest).map(|t| (now - t).num_milliseconds().max(0) as f64 / 1000.0),
            "per_minute": {"done": per_minute.done, "failed": per_minute.failed, "retried": per_minute.retried},
            "latency_ms": {"p50": p50, "p99": p99},
            "last_error": snap.and_then(|s| s.last_error.clone()),
        }));
    }
    json!({
        "now": now,
        "daemon": state.daemon_id,
        "read_at": cached.at,
        "read_error": cached.error,
        "nas": rows,
        "totals": {
            "nas": cached.nas.len(), "up": up, "down": down,
            "queue_depth": depth, "in_flight": in_flight,
            "per_minute": {"done": done, "failed": failed, "retried": retried},
        },
    })
}

/// `GET /api/v1/overview`.
pub async fn overview_handle(State(state): State<Arc<ApiState>>) -> Response {
    json_response(StatusCode::OK, &overview(&state))
}

/// `GET /api/v1/live`: the overview as a server-sent event every `LIVE_EVERY`, from
/// memory only; ends when the client goes or the daemon stops.
pub async fn live(State(state): State<Arc<ApiState>>) -> Response {
    let stop = state.console.shutdown.clone();
    let stream = futures_util::stream::unfold((state, true), move |(state, first)| {
        let stop = stop.clone();
        async move {
            if !first {
                tokio::select! {
                    _ = stop.cancelled() => return None,
                    _ = tokio::time::sleep(LIVE_EVERY) => {}
                }
            } else if stop.is_cancelled() {
                return None;
            }
            let data = overview(&state).to_string();
            let chunk = format!("event: overview\ndata: {data}\n\n");
            Some((Ok::<_, Infallible>(Bytes::from(chunk)), (state, false)))
        }
    });
    let mut resp = axum::body::Body::from_stream(stream).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

fn series_value(points: Vec<Point>) -> Value {
    json!({ "step_seconds": crate::series::STEP.as_secs(), "points": points })
}

/// `GET /api/v1/series`: every NAS summed, last hour.
pub async fn series_all(State(state): State<Arc<ApiState>>) -> Response {
    json_response(
        StatusCode::OK,
        &series_value(state.console.series.total_points()),
    )
}

/// `GET /api/v1/nas/{id}/series`.
pub async fn series_nas(State(state): State<Arc<ApiState>>, Path(id): Path<String>) -> ApiResult {
    let id = parse_id("nas id", &id)?;
    Ok(json_response(
        StatusCode::OK,
        &series_value(state.console.series.points(id)),
    ))
}

async fn nas_of(state: &ApiState, id: &str) -> Result<Nas, ApiError> {
    let id = parse_id("nas id", id)?;
    state
        .store
        .nas_get(id)
        .await
        .map_err(ApiError::store)?
        .ok_or_else(|| ApiError::not_found(format!("nas {id} does not exist")))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LinesQuery {
    lines: Option<usize>,
}

/// The last `lines` lines of a file, reading at most its last 1 MiB.
pub fn tail(path: &std::path::Path, lines: usize) -> std::io::Result<Vec<String>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    let start = len.saturating_sub(1 << 20);
    f.seek(SeekFrom::Start(start))?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf);
    let mut all: Vec<&str> = text.lines().collect();
    if start > 0 && !all.is_empty() {
        // The first line read is probably cut.
        all.remove(0);
    }
    let from = all.len().saturating_sub(lines);
    Ok(all[from..].iter().map(|l| l.to_string()).collect())
}

/// `GET /api/v1/nas/{id}/log?lines=200`: the tail of the NAS's log file.
pub async fn nas_log(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> ApiResult {
    let nas = nas_of(&state, &id).await?;
    let q: LinesQuery = query(raw)?;
    let lines = q.lines.unwrap_or(200);
    if !(1..=5000).contains(&lines) {
        return Err(ApiError::bad_request(format!(
            "lines must be 1..5000, got {lines}"
        )));
    }
    let Some(journal) = &state.console.journal else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "this API server runs without a daemon",
        ));
    };
    let path = journal.nas_log_path(&NasTarget {
        id: nas.id,
        name: nas.name.clone(),
        ip: nas.ip.clone(),
    });
    let read = path.clone();
    let found = tokio::task::spawn_blocking(move || tail(&read, lines))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let lines = match found {
        Ok(l) => l,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => {
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot read {}: {e}", path.display()),
            ));
        }
    };
    Ok(json_response(
        StatusCode::OK,
        &json!({ "path": path, "lines": lines }),
    ))
}

async fn set_paused(state: &ApiState, caller: &Caller, id: &str, paused: bool) -> ApiResult {
    let nas = nas_of(state, id).await?;
    if !state
        .store
        .nas_set_paused(nas.id, paused)
        .await
        .map_err(ApiError::store)?
    {
        return Err(ApiError::not_found(format!(
            "nas {} does not exist",
            nas.id
        )));
    }
    let action = if paused { "pause" } else { "resume" };
    audit(
        state,
        caller,
        action,
        &format!("nas {} ({} {})", nas.id, nas.name, nas.ip),
        "",
        1,
    )
    .await;
    if let Some(r) = &state.console.resync {
        r.notify_one();
    }
    state.console.series.refresh();
    Ok(json_response(
        StatusCode::OK,
        &json!({ "id": nas.id, "paused": paused }),
    ))
}

/// `POST /api/v1/nas/{id}/pause`: stop claiming its events (they wait); the NAS stays.
pub async fn pause(
    State(state): State<Arc<ApiState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult {
    set_paused(&state, &caller, &id, true).await
}

/// `POST /api/v1/nas/{id}/resume`.
pub async fn resume(
    State(state): State<Arc<ApiState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult {
    set_paused(&state, &caller, &id, false).await
}

/// `POST /api/v1/nas/{id}/probe`: a fresh login, timed; a down NAS's owner here also
/// probes at once with its next event.
pub async fn probe(
    State(state): State<Arc<ApiState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult {
    let nas = nas_of(&state, &id).await?;
    let cfg = state.console.daemon()?;
    let result = crate::manual::probe(cfg, &nas).await;
    let woke = state
        .console
        .probe_owner
        .as_ref()
        .is_some_and(|probe| probe(nas.id));
    let (ok, ms, error) = match &result {
        Ok(d) => (true, Some(d.as_millis() as u64), None),
        Err(e) => (false, None, Some(e.clone())),
    };
    audit(
        &state,
        &caller,
        "probe",
        &format!("nas {} ({} {})", nas.id, nas.name, nas.ip),
        &match &result {
            Ok(d) => format!("login ok in {} ms", d.as_millis()),
            Err(e) => format!("login failed: {e}"),
        },
        1,
    )
    .await;
    Ok(json_response(
        StatusCode::OK,
        &json!({ "ok": ok, "ms": ms, "error": error, "owner_probes": woke }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReconcileInput {
    #[serde(default)]
    account: Option<i64>,
    #[serde(default)]
    apply: bool,
}

/// `POST /api/v1/nas/{id}/reconcile` `{"account"?, "apply"?}`: what the NAS holds
/// against what its accounts should have (`nasd reconcile`); read through the owner's
/// device when this daemon serves the NAS, else through a session of its own.
pub async fn reconcile(
    State(state): State<Arc<ApiState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let nas = nas_of(&state, &id).await?;
    let input: ReconcileInput = json_body(&headers, body)?;
    if let Some(account) = input.account
        && account <= 0
    {
        return Err(ApiError::bad_request(format!(
            "account must be a positive user_id, got {account}"
        )));
    }
    let cfg = state.console.daemon()?;
    let device = state
        .console
        .devices
        .as_ref()
        .and_then(|d| d.lock().ok().and_then(|map| map.get(&nas.id).cloned()));
    let owner_device = device.is_some();
    let ctx = crate::reconcile::Context {
        cfg,
        store: &state.store,
        params_query: &state.console.params_query,
        billing: state.console.billing.as_ref(),
        journal: state.console.journal.as_ref(),
    };
    let req = crate::reconcile::Request {
        nas_id: nas.id,
        account: input.account,
        apply: input.apply,
        by: caller.name.clone(),
    };
    let report = crate::reconcile::run(&ctx, device, &req)
        .await
        .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e))?;
    audit(
        &state,
        &caller,
        if input.apply {
            "reconcile (apply)"
        } else {
            "reconcile"
        },
        &format!("nas {} ({} {})", nas.id, nas.name, nas.ip),
        &format!(
            "{} differences, {} strays, {} problems, {} enqueued",
            report.comparison.differences.len(),
            report.comparison.strays.len(),
            report.comparison.problems.len(),
            report.enqueued.len()
        ),
        report.enqueued.len() as i64,
    )
    .await;
    let mut body = serde_json::to_value(&report).unwrap_or_default();
    if let Some(map) = body.as_object_mut() {
        map.insert("lines".into(), json!(report.lines(input.apply)));
        map.insert("owner_session".into(), json!(owner_device));
    }
    Ok(json_response(StatusCode::OK, &body))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SendInput {
    cmd: String,
    user_id: i64,
    #[serde(default)]
    dry_run: bool,
    #[serde(default)]
    acct_session_id: Option<String>,
    #[serde(default)]
    usluga_id: Option<i64>,
    #[serde(default)]
    params: HashMap<String, String>,
}

/// `POST /api/v1/nas/{id}/send`: a test command for an account now, or its dry run.
pub async fn send(
    State(state): State<Arc<ApiState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let nas = nas_of(&state, &id).await?;
    let input: SendInput = json_body(&headers, body)?;
    if !super::valid_cmd(&input.cmd) {
        return Err(ApiError::bad_request(format!(
            "cmd `{}` is not a cmd name (^[a-z][a-z0-9_]{{0,63}}$, e.g. user_add)",
            printable(&input.cmd)
        )));
    }
    if input.user_id <= 0 {
        return Err(ApiError::bad_request(format!(
            "user_id must be a positive integer, got {}",
            input.user_id
        )));
    }
    let cfg = state.console.daemon()?;
    let mut params: Vec<(String, String)> = input.params.into_iter().collect();
    params.sort();
    let req = crate::manual::ManualSend {
        nas_id: nas.id,
        cmd: input.cmd.clone(),
        user_id: input.user_id,
        acct_session_id: input.acct_session_id,
        usluga_id: input.usluga_id,
        params,
        dry_run: input.dry_run,
        by: caller.name.clone(),
    };
    let sent = crate::manual::send(
        cfg,
        &state.store,
        &state.console.params_query,
        state.console.billing.as_ref(),
        state.console.journal.as_ref(),
        &req,
    )
    .await
    .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e))?;
    audit(
        &state,
        &caller,
        if input.dry_run {
            "send (dry run)"
        } else {
            "send"
        },
        &format!("nas {} ({} {})", nas.id, nas.name, nas.ip),
        &format!(
            "{} user_id={}: {}{}",
            input.cmd,
            input.user_id,
            sent.outcome,
            sent.error
                .as_deref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        ),
        1,
    )
    .await;
    let answers: Vec<&str> = sent.answer.lines().collect();
    let commands: Vec<Value> = sent
        .commands
        .iter()
        .enumerate()
        .map(|(i, c)| json!({ "command": c, "answer": answers.get(i).copied() }))
        .collect();
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "outcome": sent.outcome, "ms": sent.ms, "error": sent.error,
            "commands": commands, "answer": sent.answer,
        }),
    ))
}

/// A time bound: RFC 3339, or a duration back from now (`15m`, `1h`, `2d`).
pub fn parse_when(key: &str, text: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    let t = text.trim();
    if let Ok(at) = DateTime::parse_from_rfc3339(t) {
        return Ok(at.with_timezone(&Utc));
    }
    match crate::duration::parse_duration(t) {
        Ok(d) => chrono::Duration::from_std(d)
            .ok()
            .and_then(|d| now.checked_sub_signed(d))
            .ok_or_else(|| format!("{key} `{}` reaches too far back", printable(t))),
        Err(_) => Err(format!(
            "{key} `{}` is neither an RFC 3339 time nor a duration such as 15m, 1h or 2d",
            printable(t)
        )),
    }
}

/// The event filter of the console, the API and `nasd events` (all fields optional;
/// the state defaults to `failed`).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterInput {
    pub state: Option<String>,
    pub nas: Option<i64>,
    pub cmd: Option<String>,
    pub error: Option<String>,
    pub since: Option<String>,
    pub until: Option<String>,
    pub user_id: Option<i64>,
}

/// The list's query string (no `#[serde(flatten)]`: with it serde_urlencoded hands
/// every value over as a string and numbers would not parse).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListInput {
    state: Option<String>,
    nas: Option<i64>,
    cmd: Option<String>,
    error: Option<String>,
    since: Option<String>,
    until: Option<String>,
    user_id: Option<i64>,
    before: Option<i64>,
    limit: Option<i64>,
}

impl FilterInput {
    /// The store's query; errors name the field and the value.
    pub fn query(&self, now: DateTime<Utc>) -> Result<EventQuery, String> {
        let state = match self.state.as_deref().map(str::trim) {
            None | Some("") => EventState::Failed,
            Some(s) => EventState::parse(s)?,
        };
        if let Some(cmd) = &self.cmd
            && !cmd.is_empty()
            && !super::valid_cmd(cmd)
        {
            return Err(format!("cmd `{}` is not a cmd name", printable(cmd)));
        }
        let since = match self.since.as_deref().filter(|s| !s.trim().is_empty()) {
            Some(s) => Some(parse_when("since", s, now)?),
            None => None,
        };
        let until = match self.until.as_deref().filter(|s| !s.trim().is_empty()) {
            Some(s) => Some(parse_when("until", s, now)?),
            None => None,
        };
        if let (Some(a), Some(b)) = (since, until)
            && a > b
        {
            return Err(format!("since ({a}) is after until ({b})"));
        }
        Ok(EventQuery {
            state,
            nas_id: self.nas,
            cmd: self.cmd.clone().filter(|c| !c.is_empty()),
            user_id: self.user_id,
            error_like: self.error.clone().filter(|e| !e.trim().is_empty()),
            since,
            until,
            before_id: None,
            limit: 50,
        })
    }

    /// The filter in words, for the audit log.
    pub fn describe(&self) -> String {
        let mut parts = vec![format!(
            "state={}",
            self.state.as_deref().unwrap_or("failed")
        )];
        if let Some(n) = self.nas {
            parts.push(format!("nas={n}"));
        }
        for (k, v) in [
            ("cmd", &self.cmd),
            ("error", &self.error),
            ("since", &self.since),
            ("until", &self.until),
        ] {
            if let Some(v) = v.as_deref().filter(|v| !v.is_empty()) {
                parts.push(format!("{k}={}", printable(v)));
            }
        }
        if let Some(u) = self.user_id {
            parts.push(format!("user_id={u}"));
        }
        parts.join(" ")
    }
}

/// `GET /api/v1/events?state=&nas=&cmd=&error=&since=&until=&user_id=&before=&limit=`.
pub async fn events(State(state): State<Arc<ApiState>>, RawQuery(raw): RawQuery) -> ApiResult {
    let input: ListInput = query(raw)?;
    let filter = FilterInput {
        state: input.state,
        nas: input.nas,
        cmd: input.cmd,
        error: input.error,
        since: input.since,
        until: input.until,
        user_id: input.user_id,
    };
    let mut q = filter.query(Utc::now()).map_err(ApiError::bad_request)?;
    let limit = input.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::bad_request(format!(
            "limit must be 1..500, got {limit}"
        )));
    }
    q.limit = limit;
    q.before_id = input.before;
    let page = state.store.events_list(&q).await.map_err(ApiError::store)?;
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "events": page.events,
            "next_before": page.next_before,
            "scanned_capped": page.scanned_capped,
        }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BulkInput {
    #[serde(default)]
    ids: Option<Vec<i64>>,
    #[serde(default)]
    filter: Option<FilterInput>,
    #[serde(default)]
    expect: Option<i64>,
    #[serde(default)]
    dry_run: bool,
}

/// Which bulk action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bulk {
    Retry,
    Cancel,
}

async fn bulk(
    state: &ApiState,
    caller: &Caller,
    kind: Bulk,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let input: BulkInput = json_body(headers, body)?;
    let (ids, what) = match (input.ids, input.filter) {
        (Some(ids), None) => {
            if ids.is_empty() {
                return Err(ApiError::bad_request("ids is empty: select events first"));
            }
            if ids.len() as i64 > BULK_MAX {
                return Err(ApiError::bad_request(format!(
                    "{} ids given: one request acts on at most {BULK_MAX} events",
                    ids.len()
                )));
            }
            if let Some(bad) = ids.iter().find(|id| **id <= 0) {
                return Err(ApiError::bad_request(format!(
                    "ids must be positive event ids, got {bad}"
                )));
            }
            let what = format!("{} selected", ids.len());
            (ids, what)
        }
        (None, Some(filter)) => {
            let q = filter.query(Utc::now()).map_err(ApiError::bad_request)?;
            let ids = state
                .store
                .events_match_ids(&q, BULK_MAX + 1)
                .await
                .map_err(ApiError::store)?;
            if ids.len() as i64 > BULK_MAX {
                return Err(ApiError::bad_request(format!(
                    "more than {BULK_MAX} events match {}: narrow the filter (one request acts on at most {BULK_MAX})",
                    filter.describe()
                )));
            }
            (ids, format!("filter {}", filter.describe()))
        }
        _ => {
            return Err(ApiError::bad_request(
                "give either ids (a selection) or filter, not both and not neither",
            ));
        }
    };
    let matched = ids.len() as i64;
    if input.dry_run {
        return Ok(json_response(
            StatusCode::OK,
            &json!({ "matched": matched }),
        ));
    }
    if let Some(expect) = input.expect
        && expect != matched
    {
        return Ok(json_response(
            StatusCode::CONFLICT,
            &json!({
                "error": format!("{matched} events match now, not the {expect} confirmed: look again and confirm the new count"),
                "matched": matched,
            }),
        ));
    }
    let outcome = match kind {
        Bulk::Retry => state.store.bulk_retry(&ids).await,
        Bulk::Cancel => state.store.bulk_cancel(&ids).await,
    }
    .map_err(ApiError::store)?;
    let done = outcome.done.len() as i64;
    audit(
        state,
        caller,
        match kind {
            Bulk::Retry => "retry",
            Bulk::Cancel => "cancel",
        },
        &what,
        &format!("{matched} matched, {} skipped", outcome.skipped.len()),
        done,
    )
    .await;
    let skipped: Vec<Value> = outcome
        .skipped
        .iter()
        .map(|(id, why)| json!({ "id": id, "why": why }))
        .collect();
    let new_ids: Vec<Value> = outcome
        .done
        .iter()
        .filter_map(|(id, new)| new.map(|n| json!({ "id": id, "new_id": n })))
        .collect();
    Ok(json_response(
        StatusCode::OK,
        &json!({ "matched": matched, "done": done, "skipped": skipped, "new_ids": new_ids }),
    ))
}

/// `POST /api/v1/events/retry`: failed events into the queue again, by ids or filter.
pub async fn bulk_retry(
    State(state): State<Arc<ApiState>>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    bulk(&state, &caller, Bulk::Retry, &headers, body).await
}

/// `POST /api/v1/events/cancel`: queued or retrying events to history as cancelled.
pub async fn bulk_cancel(
    State(state): State<Arc<ApiState>>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    bulk(&state, &caller, Bulk::Cancel, &headers, body).await
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SearchInput {
    q: Option<String>,
    limit: Option<i64>,
}

/// `GET /api/v1/accounts?q=`: by user id, login, IP or MAC.
pub async fn accounts(State(state): State<Arc<ApiState>>, RawQuery(raw): RawQuery) -> ApiResult {
    let input: SearchInput = query(raw)?;
    let q = input.q.unwrap_or_default();
    if q.trim().is_empty() {
        return Err(ApiError::bad_request(
            "q is empty: give a user id, login, IP or MAC",
        ));
    }
    let limit = input.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::bad_request(format!(
            "limit must be 1..500, got {limit}"
        )));
    }
    let hits = state
        .store
        .account_search(q.trim(), limit)
        .await
        .map_err(ApiError::store)?;
    Ok(json_response(StatusCode::OK, &json!({ "accounts": hits })))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditInput {
    before: Option<i64>,
    limit: Option<i64>,
}

/// `GET /api/v1/audit?before=&limit=`: operator actions, newest first.
pub async fn audit_list(State(state): State<Arc<ApiState>>, RawQuery(raw): RawQuery) -> ApiResult {
    let input: AuditInput = query(raw)?;
    let limit = input.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::bad_request(format!(
            "limit must be 1..1000, got {limit}"
        )));
    }
    let rows = state
        .store
        .audit_list(input.before, limit)
        .await
        .map_err(ApiError::store)?;
    Ok(json_response(StatusCode::OK, &json!({ "entries": rows })))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn origin_must_be_this_server() {
        let own = headers(&[
            ("host", "127.0.0.1:8082"),
            ("origin", "http://127.0.0.1:8082"),
        ]);
        assert!(same_origin(&own).is_ok());
        // Scripts send no Origin.
        assert!(same_origin(&headers(&[("host", "127.0.0.1:8082")])).is_ok());
        let forged = headers(&[
            ("host", "127.0.0.1:8082"),
            ("origin", "http://evil.example"),
        ]);
        let err = same_origin(&forged).unwrap_err();
        assert!(
            err.contains("evil.example") && err.contains("127.0.0.1:8082"),
            "{err}"
        );
        let null = headers(&[("host", "127.0.0.1:8082"), ("origin", "null")]);
        assert!(same_origin(&null).is_err());
        let cross = headers(&[("host", "a"), ("sec-fetch-site", "cross-site")]);
        assert!(same_origin(&cross).is_err());
    }

    #[test]
    fn sessions_and_csrf() {
        let s = Sessions::default();
        let (id, csrf) = s.open(Caller::anonymous());
        assert_eq!(id.len(), 64);
        assert_eq!(
            s.get(&id).map(|(c, x)| (c.name, x)),
            Some(("anonymous".into(), csrf.clone()))
        );
        let h = headers(&[("cookie", &format!("a=b; {COOKIE}={id}"))]);
        assert_eq!(session_id(&h), Some(id.as_str()));
        assert!(check_csrf(&headers(&[(CSRF_HEADER, &csrf)]), &csrf).is_ok());
        assert!(check_csrf(&headers(&[(CSRF_HEADER, "x")]), &csrf).is_err());
        assert!(
            check_csrf(&HeaderMap::new(), &csrf)
                .unwrap_err()
                .contains("missing")
        );
        s.close(&id);
        assert!(s.get(&id).is_none());
    }

    #[test]
    fn times_are_rfc3339_or_durations_back() {
        let now = DateTime::parse_from_rfc3339("2026-12-02T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(
            parse_when("since", "1h", now).unwrap(),
            now - chrono::Duration::hours(1)
        );
        assert_eq!(
            parse_when("since", "2026-12-01T00:00:00+03:00", now)
                .unwrap()
                .to_rfc3339(),
            "2026-11-30T21:00:00+00:00"
        );
        let err = parse_when("since", "99999999999d", now).unwrap_err();
        assert!(err.contains("since `99999999999d`"), "{err}");
        let err = parse_when("until", "yesterday", now).unwrap_err();
        assert!(err.contains("until `yesterday`"), "{err}");
    }

    #[test]
    fn filters_name_the_bad_field() {
        let now = Utc::now();
        let bad = |f: FilterInput| f.query(now).unwrap_err();
        assert!(
            bad(FilterInput {
                state: Some("lost".into()),
                ..Default::default()
            })
            .contains("`lost`")
        );
        assert!(
            bad(FilterInput {
                cmd: Some("User Add".into()),
                ..Default::default()
            })
            .contains("cmd `User Add`")
        );
        assert!(
            bad(FilterInput {
                since: Some("1h".into()),
                until: Some("2h".into()),
                ..Default::default()
            })
            .contains("is after until")
        );
        let q = FilterInput {
            state: Some("retrying".into()),
            nas: Some(3),
            error: Some("timeout".into()),
            ..Default::default()
        }
        .query(now)
        .unwrap();
        assert_eq!(q.state, EventState::Retrying);
        assert_eq!(q.nas_id, Some(3));
        assert_eq!(q.error_like.as_deref(), Some("timeout"));
    }

    #[test]
    fn tail_reads_the_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.log");
        let text: String = (0..1000).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&p, text).unwrap();
        assert_eq!(tail(&p, 2).unwrap(), vec!["line 998", "line 999"]);
        assert_eq!(tail(&p, 5000).unwrap().len(), 1000);
    }
}
