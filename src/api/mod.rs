//! The HTTP server beside the dispatcher: the billing-compatible REST endpoint
//! (`/rest_api/v2/...`), the JSON API (`/api/v1/...`, described by `openapi.json`),
//! `/status`, `/metrics` and the operator console (`/ui`, `console.rs`). Bearer tokens
//! or the console's session cookie, each with a role (`admin` acts, `read-only` only
//! reads); cross-site requests refused; JSON errors that name the problem, a body size
//! limit; stops on the daemon's shutdown token.

pub mod console;
pub mod json;
pub mod metrics;
pub mod openapi;
pub mod rest_compat;
pub mod server;
pub mod status;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tokio_util::sync::CancellationToken;

use crate::config::{ApiConfig, Role};
use crate::stats::Stats;
use crate::store::{CompactEvent, Store};

/// What every handler needs.
pub struct ApiState {
    pub store: Store,
    pub stats: Arc<Stats>,
    pub cfg: ApiConfig,
    /// This daemon's id in the cluster (`[cluster] name` or `<hostname>:<pid>`).
    pub daemon_id: String,
    /// The console's sessions, recent series and the daemon's handles it acts through.
    pub console: console::Console,
}

/// Who made a request: a token's name and role, or `anonymous` (an admin) where no
/// token is needed. Handlers find it in the request's extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub name: String,
    pub role: Role,
    /// Came with the console's session cookie (not a bearer token).
    pub session: bool,
}

impl Caller {
    pub fn anonymous() -> Caller {
        Caller {
            name: "anonymous".into(),
            role: Role::Admin,
            session: false,
        }
    }
}

/// An error answer: a status and a lowercase message naming the problem, sent as
/// `{"error": "..."}` (the billing-compatible endpoint adds `call`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, message)
    }
    pub fn conflict(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, message)
    }
    /// A database error: logged in full, answered as 503 (the database is the
    /// dependency that failed, not the request).
    pub fn store(e: crate::store::StoreError) -> ApiError {
        tracing::warn!("api: {e}");
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        json_response(self.status, &serde_json::json!({ "error": self.message }))
    }
}

/// A JSON body with the given status.
pub fn json_response(status: StatusCode, value: &serde_json::Value) -> Response {
    let body = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

/// Builds the router over `state`.
pub fn router(state: Arc<ApiState>) -> Router {
    let max_body = state.cfg.max_body;
    Router::new()
        .route(
            "/rest_api/v2/{model}/",
            post(rest_compat::handle).fallback(rest_compat::method_not_allowed),
        )
        .route(
            "/rest_api/v2/{model}",
            post(rest_compat::handle).fallback(rest_compat::method_not_allowed),
        )
        .route("/api/v1/openapi.json", get(openapi::handle))
        .route("/api/v1/events/batch", post(json::enqueue_batch))
        .route("/ui", get(console::index))
        .route("/ui/", get(console::index))
        .route("/ui/app.js", get(console::app_js))
        .route("/ui/app.css", get(console::app_css))
        .route("/ui/favicon.svg", get(console::favicon))
        .route("/ui/login", post(console::login))
        .route("/ui/logout", post(console::logout))
        .route("/api/v1/whoami", get(console::whoami))
        .route("/api/v1/overview", get(console::overview_handle))
        .route("/api/v1/live", get(console::live))
        .route("/api/v1/series", get(console::series_all))
        .route("/api/v1/nas/{id}/series", get(console::series_nas))
        .route("/api/v1/nas/{id}/log", get(console::nas_log))
        .route("/api/v1/nas/{id}/pause", post(console::pause))
        .route("/api/v1/nas/{id}/resume", post(console::resume))
        .route("/api/v1/nas/{id}/probe", post(console::probe))
        .route("/api/v1/nas/{id}/send", post(console::send))
        .route("/api/v1/nas/{id}/reconcile", post(console::reconcile))
        .route(
            "/api/v1/events",
            get(console::events).post(json::enqueue_one),
        )
        .route("/api/v1/events/retry", post(console::bulk_retry))
        .route("/api/v1/events/cancel", post(console::bulk_cancel))
        .route("/api/v1/accounts", get(console::accounts))
        .route("/api/v1/audit", get(console::audit_list))
        .route("/api/v1/events/{id}", get(json::event_status))
        .route("/api/v1/events/{id}/retry", post(json::retry))
        .route("/api/v1/events/{id}/cancel", post(json::cancel))
        .route(
            "/api/v1/accounts/{user_id}/events",
            get(json::account_events),
        )
        .route("/api/v1/stack", get(json::stack_counts))
        .route("/api/v1/nas", get(json::nas_list))
        .route("/api/v1/nas/{id}", get(json::nas_one))
        .route("/api/v1/cluster", get(json::cluster))
        .route("/status", get(status::handle))
        .route("/metrics", get(metrics::handle))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth))
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(state)
}

async fn not_found(req: Request) -> ApiError {
    ApiError::not_found(format!("no such endpoint: {}", req.uri().path()))
}

async fn method_not_allowed(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!(
            "method {} is not allowed on {}",
            req.method(),
            req.uri().path()
        ),
    )
}

/// Which paths need a token: everything but the OpenAPI document, and `/status`,
/// `/metrics` and the billing-compatible endpoint when the config leaves them open.
fn needs_token(cfg: &ApiConfig, path: &str) -> bool {
    if cfg.tokens.get().is_empty() || path == "/api/v1/openapi.json" {
        return false;
    }
    if path == "/status" {
        return !cfg.open_status;
    }
    if path == "/metrics" {
        return !cfg.open_metrics;
    }
    if path.starts_with("/rest_api/") {
        return !cfg.open_rest_compat;
    }
    true
}

/// Compares in time independent of where the first difference is.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn check_token(cfg: &ApiConfig, headers: &HeaderMap) -> Result<Caller, &'static str> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Err("missing bearer token (send Authorization: Bearer <token>)");
    };
    let Some(given) = value.to_str().ok().and_then(|v| {
        v.strip_prefix("Bearer ")
            .or_else(|| v.strip_prefix("bearer "))
    }) else {
        return Err("authorization header is not `Bearer <token>`");
    };
    match token_caller(cfg, given.trim()) {
        Some(caller) => Ok(caller),
        None => Err("invalid bearer token"),
    }
}

/// The token `given` names, compared with every token so the time taken does not say
/// which one nearly matched.
pub fn token_caller(cfg: &ApiConfig, given: &str) -> Option<Caller> {
    let given = given.as_bytes();
    let tokens = cfg.tokens.get();
    let found = tokens.iter().fold(None, |found, t| {
        if same_secret(t.secret.expose().as_bytes(), given) {
            Some(t)
        } else {
            found
        }
    });
    found.map(|t| Caller {
        name: t.name.clone(),
        role: t.role,
        session: false,
    })
}

/// Whether a request changes something (and so needs an admin and same-origin).
fn is_action(method: &axum::http::Method) -> bool {
    !matches!(
        *method,
        axum::http::Method::GET | axum::http::Method::HEAD | axum::http::Method::OPTIONS
    )
}

fn refused(status: StatusCode, why: String) -> Response {
    json_response(status, &serde_json::json!({ "error": why }))
}

async fn auth(State(state): State<Arc<ApiState>>, mut req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    let action = is_action(req.method());
    // A browser on another site can make a page send requests here (a form, fetch):
    // whatever credentials come with it, an action from a foreign origin is refused.
    if action && let Err(why) = console::same_origin(req.headers()) {
        return refused(StatusCode::FORBIDDEN, why);
    }
    if console::is_public(&path) || !needs_token(&state.cfg, &path) {
        let caller = if state.cfg.tokens.get().is_empty() {
            Caller::anonymous()
        } else {
            // An open endpoint: whoever it is, known by a token or a session if given.
            console::session_caller(&state, req.headers())
                .map(|(c, _)| c)
                .unwrap_or_else(Caller::anonymous)
        };
        req.extensions_mut().insert(caller);
        return next.run(req).await;
    }
    let found = if req.headers().contains_key(header::AUTHORIZATION) {
        check_token(&state.cfg, req.headers()).map(|c| (c, None))
    } else {
        console::session_caller(&state, req.headers()).ok_or(
            "missing bearer token (send Authorization: Bearer <token>) or console session \
             (log in at /ui)",
        )
    };
    match found {
        Ok((caller, csrf)) => {
            if action {
                if let Some(expected) = csrf
                    && let Err(why) = console::check_csrf(req.headers(), &expected)
                {
                    return refused(StatusCode::FORBIDDEN, why);
                }
                if caller.role == Role::ReadOnly {
                    return refused(
                        StatusCode::FORBIDDEN,
                        format!(
                            "token `{}` is read-only: {} {} needs an admin token",
                            caller.name,
                            req.method(),
                            path
                        ),
                    );
                }
            }
            req.extensions_mut().insert(caller);
            next.run(req).await
        }
        Err(why) => {
            let mut body = serde_json::json!({ "error": why });
            if path.starts_with("/rest_api/") {
                body["call"] = rest_compat::call_of(&path).into();
            }
            let mut resp = json_response(StatusCode::UNAUTHORIZED, &body);
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"nasd\""),
            );
            resp
        }
    }
}

/// The fields of one event as clients send them (JSON API and `objects.create`).
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventInput {
    pub cmd: String,
    pub user_id: i64,
    #[serde(default)]
    pub abonent_id: Option<i64>,
    #[serde(default)]
    pub nas_ip: Option<String>,
    #[serde(default)]
    pub usluga_id: Option<i64>,
    #[serde(default)]
    pub acct_session_id: Option<String>,
}

/// A cmd is `^[a-z][a-z0-9_]{0,63}$`.
pub fn valid_cmd(cmd: &str) -> bool {
    cmd.len() <= 64
        && cmd.chars().next().is_some_and(|c| c.is_ascii_lowercase())
        && cmd
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

impl EventInput {
    /// Checks every field; the error names the field and what is wrong with it.
    pub fn validate(self) -> Result<CompactEvent, String> {
        if !valid_cmd(&self.cmd) {
            return Err(format!(
                "cmd `{}` is not a cmd name (^[a-z][a-z0-9_]{{0,63}}$, e.g. user_add)",
                printable(&self.cmd)
            ));
        }
        if self.user_id <= 0 {
            return Err(format!(
                "user_id must be a positive integer, got {}",
                self.user_id
            ));
        }
        for (name, v) in [
            ("abonent_id", self.abonent_id),
            ("usluga_id", self.usluga_id),
        ] {
            if let Some(v) = v
                && v <= 0
            {
                return Err(format!("{name} must be a positive integer, got {v}"));
            }
        }
        let nas_ip = match self.nas_ip.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(ip) => match ip.parse::<std::net::IpAddr>() {
                Ok(addr) => Some(addr.to_string()),
                Err(_) => {
                    return Err(format!("nas_ip `{}` is not an IP address", printable(ip)));
                }
            },
        };
        let acct_session_id = match self.acct_session_id {
            None => None,
            Some(s) if s.is_empty() => None,
            Some(s) => {
                if s.chars().count() > 253 {
                    return Err("acct_session_id is longer than 253 characters".into());
                }
                if s.chars().any(char::is_control) {
                    return Err("acct_session_id contains control characters".into());
                }
                Some(s)
            }
        };
        Ok(CompactEvent {
            cmd: self.cmd,
            user_id: self.user_id,
            abonent_id: self.abonent_id,
            nas_ip,
            usluga_id: self.usluga_id,
            acct_session_id,
        })
    }
}

/// A value for an error message: control characters escaped, at most 80 characters.
pub fn printable(s: &str) -> String {
    let escaped: String = s.chars().flat_map(char::escape_default).collect();
    if escaped.chars().count() > 80 {
        escaped.chars().take(80).collect::<String>() + "..."
    } else {
        escaped
    }
}

/// A bound listener and its address (port 0 in the config picks a free port).
pub async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("api.listen {addr}: cannot listen: {e}"))
}

/// Serves until `shutdown` fires; requests in progress are finished first.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<ApiState>,
    shutdown: CancellationToken,
) {
    let limits = server::Limits {
        header_timeout: state.cfg.header_timeout,
        body_timeout: state.cfg.body_timeout,
        max_connections: state.cfg.max_connections,
    };
    let app = router(state);
    server::serve(listener, app, limits, shutdown).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmd_names() {
        for ok in ["user_add", "a", "b_negbal", &"a".repeat(64)] {
            assert!(valid_cmd(ok), "{ok}");
        }
        for bad in [
            "",
            "User_add",
            "1abc",
            "user-add",
            "user add",
            &"a".repeat(65),
            "é",
        ] {
            assert!(!valid_cmd(bad), "{bad}");
        }
    }

    #[test]
    fn validation_names_the_field() {
        let base = EventInput {
            cmd: "user_add".into(),
            user_id: 1,
            ..Default::default()
        };
        let err = |e: EventInput| e.validate().unwrap_err();
        assert!(
            err(EventInput {
                user_id: 0,
                ..base.clone()
            })
            .starts_with("user_id must be")
        );
        assert!(
            err(EventInput {
                abonent_id: Some(-1),
                ..base.clone()
            })
            .starts_with("abonent_id")
        );
        assert!(
            err(EventInput {
                nas_ip: Some("10.0.0.x".into()),
                ..base.clone()
            })
            .starts_with("nas_ip")
        );
        assert!(
            err(EventInput {
                cmd: "x\0".into(),
                ..base.clone()
            })
            .contains("x\\u{0}")
        );
        assert!(
            err(EventInput {
                acct_session_id: Some("a\nb".into()),
                ..base.clone()
            })
            .contains("control")
        );
        let ok = EventInput {
            nas_ip: Some(" 10.0.0.1 ".into()),
            ..base
        }
        .validate()
        .unwrap();
        assert_eq!(ok.nas_ip.as_deref(), Some("10.0.0.1"));
    }

    #[test]
    fn token_checks() {
        let cfg = ApiConfig {
            tokens: vec![crate::config::ApiToken {
                name: "tokens[0]".into(),
                role: Role::Admin,
                secret: crate::store::Secret::new("0123456789abcdef"),
            }]
            .into(),
            ..Default::default()
        };
        let mut h = HeaderMap::new();
        assert!(check_token(&cfg, &h).unwrap_err().starts_with("missing"));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer nope"),
        );
        assert_eq!(check_token(&cfg, &h), Err("invalid bearer token"));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer 0123456789abcdef"),
        );
        assert_eq!(
            check_token(&cfg, &h),
            Ok(Caller {
                name: "tokens[0]".into(),
                role: Role::Admin,
                session: false
            })
        );
        assert!(needs_token(&cfg, "/api/v1/events"));
        assert!(!needs_token(&cfg, "/status"));
        assert!(!needs_token(&cfg, "/api/v1/openapi.json"));
        assert!(needs_token(&cfg, "/rest_api/v2/EventsStackCompact/"));
    }
}
