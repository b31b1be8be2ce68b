//! Configuration: the TOML file, its defaults, and validation before anything starts.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

pub mod alerts;
pub mod billing;
pub mod keys;
pub mod reconcile;
pub mod secret;

use keys::size_key;
pub use keys::{ConfigError, duration_key};
pub use reconcile::ReconcileConfig;

/// The query that reads one account's variables from the reference `accounts` table.
/// `$1` is the user_id; every column returned becomes a variable of the same name.
pub const DEFAULT_PARAMS_QUERY: &str = "SELECT user_id, abonent_id, nas_id, login, ip, mac, vlan, \
     auth_type, snat_ip, rate_in, rate_out, ceil_in, ceil_out, burst_in, burst_out, extra \
     FROM accounts WHERE user_id = $1";

#[derive(Debug, Clone)]
pub struct Config {
    pub database: DatabaseConfig,
    pub daemon: DaemonConfig,
    /// `[api]`: the HTTP server. `None` (no `[api]` section) runs no HTTP server.
    pub api: Option<ApiConfig>,
    /// `[alerts]`: webhook and Telegram notifications. `None`: no alerts are sent.
    pub alerts: Option<alerts::AlertsConfig>,
    /// `[log]`: format and rotation of the log files under `daemon.log_dir`.
    pub log: crate::journal::LogConfig,
    /// `[cluster]`: several daemons on one PostgreSQL (ignored on SQLite).
    pub cluster: ClusterConfig,
    /// `[history]`: how long finished events are kept.
    pub history: HistoryConfig,
    /// `[billing]`: the billing's own database for account variables (and events).
    /// `None`: `[database] params_query` runs on nasd's own database.
    pub billing: Option<billing::BillingConfig>,
    /// `[reconcile]`: the daemon's own reconciliation runs.
    pub reconcile: ReconcileConfig,
}

/// `[history]`: rows of `events_history` older than `keep` are deleted in small batches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryConfig {
    /// Finished events older than this are deleted; zero keeps them forever.
    pub keep: Duration,
    /// Rows deleted per statement (each its own short transaction).
    pub prune_batch: i64,
    /// How often the daemon looks for rows to delete.
    pub prune_interval: Duration,
}

impl Default for HistoryConfig {
    fn default() -> HistoryConfig {
        HistoryConfig {
            keep: Duration::from_secs(90 * 86_400),
            prune_batch: 2000,
            prune_interval: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawHistory {
    keep: Option<String>,
    prune_batch: Option<i64>,
    prune_interval: Option<String>,
}

fn history_section(raw: RawHistory) -> Result<HistoryConfig, ConfigError> {
    let d = HistoryConfig::default();
    let cfg = HistoryConfig {
        keep: duration_key("history.keep", raw.keep.as_ref(), d.keep)?,
        prune_batch: raw.prune_batch.unwrap_or(d.prune_batch),
        prune_interval: duration_key(
            "history.prune_interval",
            raw.prune_interval.as_ref(),
            d.prune_interval,
        )?,
    };
    if !(1..=100_000).contains(&cfg.prune_batch) {
        return Err(ConfigError::Key {
            key: "history.prune_batch",
            message: format!("{} is out of range (1 to 100000)", cfg.prune_batch),
        });
    }
    if cfg.prune_interval < Duration::from_secs(1) {
        return Err(ConfigError::Key {
            key: "history.prune_interval",
            message: "must be at least 1s".into(),
        });
    }
    Ok(cfg)
}

/// `[cluster]`: how a daemon takes part in a cluster of daemons sharing one PostgreSQL.
/// Every PostgreSQL daemon is a member (a cluster of one when it is alone); none of
/// these keys is needed to join.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// The daemon's id in the cluster; `<hostname>:<pid>` when not set.
    pub name: Option<String>,
    /// How long an ownership lasts without a heartbeat: a killed daemon's NAS are
    /// taken over this long after its last heartbeat.
    pub lease: Duration,
    /// How often the daemon renews its lease and looks at the other daemons (also how
    /// soon a released NAS is taken).
    pub heartbeat: Duration,
}

impl Default for ClusterConfig {
    fn default() -> ClusterConfig {
        ClusterConfig {
            name: None,
            lease: Duration::from_secs(10),
            heartbeat: Duration::from_secs(1),
        }
    }
}

impl ClusterConfig {
    /// The part of the lease a daemon does not trust itself with: it stops claiming and
    /// sending this long before its lease ends in the database (counted on its own
    /// monotonic clock from the moment the renewal was sent), so clock drift and the
    /// renewal's round trip never let two daemons send to one NAS.
    pub fn safety_margin(&self) -> Duration {
        (self.lease / 5).max(Duration::from_millis(500))
    }
}

/// What a token may do: `admin` reads and acts, `read-only` only reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Admin,
    ReadOnly,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::ReadOnly => "read-only",
        }
    }
}

/// One API token: `[api] tokens` entries (admins named `tokens[N]`) and `[[api.token]]`
/// tables (`name`, `role`, and the secret from `secret`, `secret_file` or `secret_env`).
#[derive(Debug, Clone)]
pub struct ApiToken {
    pub name: String,
    pub role: Role,
    pub secret: crate::model::Secret,
}

/// The API's tokens, replaced as a whole when SIGHUP reloads the config. Clones share
/// one set: the API server reads the set the reload wrote.
#[derive(Clone, Default)]
pub struct Tokens(Arc<std::sync::RwLock<Arc<Vec<ApiToken>>>>);

impl Tokens {
    pub fn new(tokens: Vec<ApiToken>) -> Tokens {
        Tokens(Arc::new(std::sync::RwLock::new(Arc::new(tokens))))
    }
    /// The tokens now.
    pub fn get(&self) -> Arc<Vec<ApiToken>> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
    pub fn set(&self, tokens: Vec<ApiToken>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(tokens);
    }
    pub fn is_empty(&self) -> bool {
        self.get().is_empty()
    }
    pub fn len(&self) -> usize {
        self.get().len()
    }
}

impl From<Vec<ApiToken>> for Tokens {
    fn from(tokens: Vec<ApiToken>) -> Tokens {
        Tokens::new(tokens)
    }
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} token(s)", self.len())
    }
}

/// `[api]`: the REST API, the console, `/status` and `/metrics`.
#[derive(Clone)]
pub struct ApiConfig {
    /// Address to listen on (`127.0.0.1:8082` by default; port 0 picks a free one).
    pub listen: std::net::SocketAddr,
    /// Bearer tokens accepted by the API, each with a name (who, in the audit log) and a
    /// role. Empty: no authentication (loopback only).
    pub tokens: Tokens,
    /// `/status` answers without a token.
    pub open_status: bool,
    /// `/metrics` answers without a token.
    pub open_metrics: bool,
    /// `/rest_api/v2/...` (the billing-compatible endpoint) answers without a token,
    /// so that billing scripts work unchanged.
    pub open_rest_compat: bool,
    /// `/status` reports a NAS whose attempts have failed for this long.
    pub nas_down_after: Duration,
    /// `/status` reports an event waiting longer than this.
    pub oldest_event_alert: Duration,
    /// Largest request body accepted, in bytes.
    pub max_body: usize,
    /// Largest number of events in one batch request.
    pub max_batch: usize,
    /// A request's head (request line and headers) must arrive within this, counted
    /// from when the connection is ready for a request: after it opens, and after each
    /// answer on a keep-alive connection (so it is also how long an idle keep-alive
    /// connection stays open).
    pub header_timeout: Duration,
    /// The longest a request body may pause between two pieces.
    pub body_timeout: Duration,
    /// Connections served at once. Past it the oldest connection is asked to close
    /// (at once when idle, after its answer when busy) and the new one waits for its
    /// place; one that cannot get it within `header_timeout` is closed.
    pub max_connections: usize,
}

impl std::fmt::Debug for ApiConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiConfig")
            .field("listen", &self.listen)
            .field("tokens", &format_args!("{} token(s)", self.tokens.len()))
            .field("open_status", &self.open_status)
            .field("open_metrics", &self.open_metrics)
            .field("open_rest_compat", &self.open_rest_compat)
            .field("nas_down_after", &self.nas_down_after)
            .field("oldest_event_alert", &self.oldest_event_alert)
            .field("max_body", &self.max_body)
            .field("max_batch", &self.max_batch)
            .field("header_timeout", &self.header_timeout)
            .field("body_timeout", &self.body_timeout)
            .field("max_connections", &self.max_connections)
            .finish()
    }
}

impl Default for ApiConfig {
    fn default() -> ApiConfig {
        ApiConfig {
            listen: std::net::SocketAddr::from(([127, 0, 0, 1], 8082)),
            tokens: Tokens::default(),
            open_status: true,
            open_metrics: true,
            open_rest_compat: false,
            nas_down_after: Duration::from_secs(300),
            oldest_event_alert: Duration::from_secs(600),
            max_body: 1 << 20,
            max_batch: 10_000,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            max_connections: 256,
        }
    }
}

#[derive(Debug, Clone)]
pub struct DatabaseConfig {
    pub url: String,
    pub params_query: String,
    pub max_connections: u32,
    /// PostgreSQL: keep sqlx's per-connection cache of prepared statements. `false` is
    /// the pooled mode that PgBouncer in transaction mode needs: no cache, unnamed
    /// statements, each database call in a transaction of its own, no LISTEN (see
    /// README "Running behind PgBouncer, a VIP or HAProxy").
    pub statement_cache: bool,
    /// PostgreSQL: the expander LISTENs for the compact stack's NOTIFY. `false`: it
    /// never opens a LISTEN connection and `[daemon] poll_interval` carries the
    /// wake-ups, as a pooler in transaction mode needs.
    pub listen: bool,
}

#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub resync_interval: Duration,
    pub log_dir: PathBuf,
    /// The schemes directory (the first of `schemes_dir` when it is a list).
    pub schemes_dir: PathBuf,
    /// The rest of a `schemes_dir` list, in order: a scheme name found in an earlier
    /// directory hides the same name in the later ones (operator schemes in
    /// /etc/nasd/schemes over the packaged /usr/share/nasd/schemes).
    pub schemes_fallback: Vec<PathBuf>,
    pub max_attempts: i32,
    pub retry_base: Duration,
    pub retry_cap: Duration,
    pub lease: Duration,
    pub poll_interval: Duration,
    pub window: usize,
    pub expand_batch: i64,
    pub shutdown_grace: Duration,
    pub exec_timeout: Duration,
    pub transport: TransportConfig,
    /// `[breaker]`: the per-NAS circuit breaker.
    pub breaker: BreakerConfig,
    /// Coalesce superseded events where a scheme declares `[coalesce]` groups (of
    /// several queued events of one group in a row for an account only the last is
    /// sent); `false` sends every event everywhere.
    pub coalesce: bool,
}

/// The delivery settings a SIGHUP changes while the daemon runs: retries, the circuit
/// breaker and coalescing. Owners read them at each decision.
#[derive(Debug, Clone, PartialEq)]
pub struct Tuning {
    pub max_attempts: i32,
    pub retry_base: Duration,
    pub retry_cap: Duration,
    pub breaker: BreakerConfig,
    pub coalesce: bool,
}

impl DaemonConfig {
    pub fn tuning(&self) -> Tuning {
        Tuning {
            max_attempts: self.max_attempts,
            retry_base: self.retry_base,
            retry_cap: self.retry_cap,
            breaker: self.breaker.clone(),
            coalesce: self.coalesce,
        }
    }
}

/// `[breaker]` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Unreachable attempts in a row that mark the NAS down; 0 turns the breaker off.
    pub failures: u32,
    /// Wait before the first probe, doubled after each failed probe up to `probe_max`.
    pub probe_first: Duration,
    pub probe_max: Duration,
    /// Attempts that could not reach the device are not counted against
    /// `max_attempts`: the events wait for the NAS instead of failing.
    pub hold_attempts: bool,
}

impl Default for BreakerConfig {
    fn default() -> BreakerConfig {
        BreakerConfig {
            failures: 5,
            probe_first: Duration::from_secs(1),
            probe_max: Duration::from_secs(60),
            hold_attempts: true,
        }
    }
}

impl BreakerConfig {
    pub fn enabled(&self) -> bool {
        self.failures > 0
    }
}

/// SSH, telnet and API: the default `[transport] connect_timeout`.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// `[transport]`: settings shared by every NAS of a protocol.
#[derive(Debug, Clone)]
pub struct TransportConfig {
    /// The known_hosts file nasd owns (OpenSSH format) for host key checks.
    pub known_hosts: PathBuf,
    /// Private key for SSH key authentication; NAS without it use their password.
    pub ssh_key: Option<PathBuf>,
    /// The passphrase of an encrypted `ssh_key` (`ssh_key_passphrase`, or from
    /// `_file`, `_env` or `_credential`).
    pub ssh_key_passphrase: Option<crate::model::Secret>,
    /// Extra FreeRADIUS-format dictionaries (vendor attributes) beside the built-in one.
    pub radius_dictionaries: Vec<PathBuf>,
    /// RADIUS: wait per try, and tries (the first send plus retransmits).
    pub radius_timeout: Duration,
    pub radius_tries: u32,
    /// RouterOS API over TLS: CA certificates (PEM) that NAS with `host_key_policy`
    /// strict are verified against (chain and name); without it strict needs a recorded
    /// fingerprint.
    pub api_tls_ca: Option<PathBuf>,
    /// SSH, telnet, API: the longest getting a usable session may take once one of the
    /// NAS's `max_sessions` slots is free (backoff, connect, TLS or key exchange, login).
    /// Waiting for the slot is not bounded by it.
    pub connect_timeout: Duration,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            database: DatabaseConfig {
                url: "sqlite://var/nasd.db".into(),
                params_query: DEFAULT_PARAMS_QUERY.into(),
                max_connections: 8,
                statement_cache: true,
                listen: true,
            },
            daemon: DaemonConfig {
                resync_interval: Duration::from_secs(60),
                log_dir: "var/log".into(),
                schemes_dir: "schemes".into(),
                schemes_fallback: Vec::new(),
                max_attempts: 10,
                retry_base: Duration::from_secs(1),
                retry_cap: Duration::from_secs(300),
                lease: Duration::from_secs(30),
                poll_interval: Duration::from_millis(500),
                window: 5000,
                expand_batch: 1000,
                shutdown_grace: Duration::from_secs(10),
                exec_timeout: Duration::from_secs(10),
                transport: TransportConfig {
                    known_hosts: "var/known_hosts".into(),
                    ssh_key: None,
                    ssh_key_passphrase: None,
                    radius_dictionaries: Vec::new(),
                    radius_timeout: Duration::from_secs(1),
                    radius_tries: 3,
                    api_tls_ca: None,
                    connect_timeout: DEFAULT_CONNECT_TIMEOUT,
                },
                breaker: BreakerConfig::default(),
                coalesce: true,
            },
            api: None,
            alerts: None,
            log: crate::journal::LogConfig::default(),
            cluster: ClusterConfig::default(),
            history: HistoryConfig::default(),
            billing: None,
            reconcile: ReconcileConfig::default(),
        }
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    database: RawDatabase,
    #[serde(default)]
    daemon: RawDaemon,
    #[serde(default)]
    transport: RawTransport,
    api: Option<RawApi>,
    #[serde(default)]
    breaker: RawBreaker,
    alerts: Option<alerts::RawAlerts>,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    cluster: RawCluster,
    #[serde(default)]
    history: RawHistory,
    billing: Option<billing::RawBilling>,
    #[serde(default)]
    reconcile: reconcile::RawReconcile,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    name: Option<String>,
    lease: Option<String>,
    heartbeat: Option<String>,
}

fn cluster_section(raw: RawCluster) -> Result<ClusterConfig, ConfigError> {
    let d = ClusterConfig::default();
    let cfg = ClusterConfig {
        name: raw.name.map(|n| n.trim().to_string()),
        lease: duration_key("cluster.lease", raw.lease.as_ref(), d.lease)?,
        heartbeat: duration_key("cluster.heartbeat", raw.heartbeat.as_ref(), d.heartbeat)?,
    };
    if let Some(name) = &cfg.name
        && (name.is_empty() || name.len() > 200 || name.chars().any(|c| c.is_control()))
    {
        return Err(ConfigError::Key {
            key: "cluster.name",
            message: format!("`{name}` is not a usable name (1 to 200 printable characters)"),
        });
    }
    if cfg.lease < Duration::from_secs(2) {
        return Err(ConfigError::Key {
            key: "cluster.lease",
            message: format!(
                "{} is too short: use at least 2s",
                crate::duration::format_duration(cfg.lease)
            ),
        });
    }
    if cfg.heartbeat < Duration::from_millis(100) || cfg.heartbeat * 2 > cfg.lease {
        return Err(ConfigError::Key {
            key: "cluster.heartbeat",
            message: format!(
                "{} must be at least 100ms and at most half of cluster.lease ({})",
                crate::duration::format_duration(cfg.heartbeat),
                crate::duration::format_duration(cfg.lease)
            ),
        });
    }
    Ok(cfg)
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLog {
    format: Option<String>,
    /// A string such as "10MB" or an integer number of bytes.
    max_size: Option<toml::Value>,
    account_max_size: Option<toml::Value>,
    backups: Option<toml::Value>,
    gzip: Option<toml::Value>,
    stderr_format: Option<String>,
}

fn log_section(raw: RawLog) -> Result<crate::journal::LogConfig, ConfigError> {
    use crate::journal::{LogConfig, LogFormat};
    let d = LogConfig::default();
    let format = |key: &'static str, raw: Option<String>, default: LogFormat| match raw {
        None => Ok(default),
        Some(text) => LogFormat::parse(&text).map_err(|message| ConfigError::Key { key, message }),
    };
    let cfg = LogConfig {
        format: format("log.format", raw.format, d.format)?,
        max_size: size_key("log.max_size", raw.max_size.as_ref(), d.max_size)?,
        account_max_size: size_key(
            "log.account_max_size",
            raw.account_max_size.as_ref(),
            d.account_max_size,
        )?,
        backups: match raw.backups {
            None => d.backups,
            Some(v) => v
                .as_integer()
                .and_then(|n| u32::try_from(n).ok())
                .filter(|n| *n <= 1000)
                .ok_or_else(|| ConfigError::Key {
                    key: "log.backups",
                    message: format!("{v} is not a number from 0 to 1000"),
                })?,
        },
        gzip: match raw.gzip {
            None => d.gzip,
            Some(v) => v.as_bool().ok_or_else(|| ConfigError::Key {
                key: "log.gzip",
                message: format!("{v} is not true or false"),
            })?,
        },
        stderr_format: format("log.stderr_format", raw.stderr_format, d.stderr_format)?,
    };
    for (key, size) in [
        ("log.max_size", cfg.max_size),
        ("log.account_max_size", cfg.account_max_size),
    ] {
        if size != 0 && size < 1024 {
            return Err(ConfigError::Key {
                key,
                message: format!("{size} bytes is too small: use 0 (no rotation) or at least 1KB"),
            });
        }
    }
    Ok(cfg)
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawBreaker {
    failures: Option<u32>,
    probe_first: Option<String>,
    probe_max: Option<String>,
    hold_attempts: Option<bool>,
}

fn breaker_section(raw: RawBreaker) -> Result<BreakerConfig, ConfigError> {
    let d = BreakerConfig::default();
    let cfg = BreakerConfig {
        failures: raw.failures.unwrap_or(d.failures),
        probe_first: duration_key(
            "breaker.probe_first",
            raw.probe_first.as_ref(),
            d.probe_first,
        )?,
        probe_max: duration_key("breaker.probe_max", raw.probe_max.as_ref(), d.probe_max)?,
        hold_attempts: raw.hold_attempts.unwrap_or(d.hold_attempts),
    };
    if cfg.probe_first.is_zero() || cfg.probe_max < cfg.probe_first {
        return Err(ConfigError::Key {
            key: "breaker.probe_max",
            message: "probe_first must be above 0 and probe_max at least probe_first".into(),
        });
    }
    Ok(cfg)
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawApi {
    listen: Option<String>,
    tokens: Option<Vec<String>>,
    token: Option<Vec<RawToken>>,
    open_status: Option<bool>,
    open_metrics: Option<bool>,
    open_rest_compat: Option<bool>,
    nas_down_after: Option<String>,
    oldest_event_alert: Option<String>,
    max_body: Option<usize>,
    max_batch: Option<usize>,
    header_timeout: Option<String>,
    body_timeout: Option<String>,
    max_connections: Option<usize>,
}

/// One `[[api.token]]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawToken {
    name: String,
    role: Option<String>,
    secret: Option<String>,
    secret_file: Option<std::path::PathBuf>,
    secret_env: Option<String>,
    secret_credential: Option<String>,
}

/// The tokens of `[api]`: plain `tokens` are admins named `tokens[N]`, then the
/// `[[api.token]]` tables in order. Names are unique; a secret comes from exactly one
/// of `secret`, `secret_file` (trailing newline dropped) or `secret_env`.
fn api_tokens(
    plain: Vec<String>,
    named: Vec<RawToken>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<ApiToken>, ConfigError> {
    let key = |message: String| ConfigError::Key {
        key: "api.token",
        message,
    };
    let mut out: Vec<ApiToken> = plain
        .into_iter()
        .enumerate()
        .map(|(i, t)| ApiToken {
            name: format!("tokens[{i}]"),
            role: Role::Admin,
            secret: crate::model::Secret::new(t),
        })
        .collect();
    for t in named {
        let name = t.name.trim().to_string();
        if name.is_empty() || name.len() > 64 || name.chars().any(char::is_control) {
            return Err(key(format!(
                "name `{}` must be 1..64 printable characters",
                t.name.escape_default()
            )));
        }
        if out.iter().any(|o| o.name == name) {
            return Err(key(format!("name `{name}` is used twice")));
        }
        let role = match t.role.as_deref().map(str::trim) {
            None | Some("admin") => Role::Admin,
            Some("read-only") | Some("readonly") | Some("read_only") => Role::ReadOnly,
            Some(other) => {
                return Err(key(format!(
                    "token `{name}`: role `{}` is neither `admin` nor `read-only`",
                    other.escape_default()
                )));
            }
        };
        let secret = secret::resolve(
            "secret",
            secret::Sources {
                value: t.secret,
                file: t.secret_file,
                env: t.secret_env,
                credential: t.secret_credential,
            },
            env,
        )
        .map_err(|e| key(format!("token `{name}`: {e}")))?
        .ok_or_else(|| {
            key(format!(
                "token `{name}` needs one of secret, secret_file, secret_env, secret_credential"
            ))
        })?;
        out.push(ApiToken {
            name,
            role,
            secret: crate::model::Secret::new(secret),
        });
    }
    Ok(out)
}

fn api_section(raw: RawApi) -> Result<ApiConfig, ConfigError> {
    let d = ApiConfig::default();
    let listen = match raw.listen {
        None => d.listen,
        Some(text) => text.trim().parse().map_err(|_| ConfigError::Key {
            key: "api.listen",
            message: format!("`{text}` is not an address such as 127.0.0.1:8082"),
        })?,
    };
    Ok(ApiConfig {
        listen,
        tokens: api_tokens(
            raw.tokens.unwrap_or_default(),
            raw.token.unwrap_or_default(),
            &|var| std::env::var(var).ok(),
        )?
        .into(),
        open_status: raw.open_status.unwrap_or(d.open_status),
        open_metrics: raw.open_metrics.unwrap_or(d.open_metrics),
        open_rest_compat: raw.open_rest_compat.unwrap_or(d.open_rest_compat),
        nas_down_after: duration_key(
            "api.nas_down_after",
            raw.nas_down_after.as_ref(),
            d.nas_down_after,
        )?,
        oldest_event_alert: duration_key(
            "api.oldest_event_alert",
            raw.oldest_event_alert.as_ref(),
            d.oldest_event_alert,
        )?,
        max_body: raw.max_body.unwrap_or(d.max_body),
        max_batch: raw.max_batch.unwrap_or(d.max_batch),
        header_timeout: duration_key(
            "api.header_timeout",
            raw.header_timeout.as_ref(),
            d.header_timeout,
        )?,
        body_timeout: duration_key(
            "api.body_timeout",
            raw.body_timeout.as_ref(),
            d.body_timeout,
        )?,
        max_connections: raw.max_connections.unwrap_or(d.max_connections),
    })
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTransport {
    known_hosts: Option<PathBuf>,
    ssh_key: Option<PathBuf>,
    ssh_key_passphrase: Option<String>,
    ssh_key_passphrase_file: Option<PathBuf>,
    ssh_key_passphrase_env: Option<String>,
    ssh_key_passphrase_credential: Option<String>,
    radius_dictionaries: Option<Vec<PathBuf>>,
    radius_timeout: Option<String>,
    radius_tries: Option<u32>,
    api_tls_ca: Option<PathBuf>,
    connect_timeout: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDatabase {
    url: Option<String>,
    params_query: Option<String>,
    max_connections: Option<u32>,
    /// Read as a value so that a wrong type is reported with the key's name.
    statement_cache: Option<toml::Value>,
    listen: Option<toml::Value>,
}

/// A `true`/`false` key; anything else is an error naming the key and the value.
fn bool_key(
    key: &'static str,
    raw: Option<&toml::Value>,
    default: bool,
) -> Result<bool, ConfigError> {
    match raw {
        None => Ok(default),
        Some(v) => v.as_bool().ok_or_else(|| ConfigError::Key {
            key,
            message: format!("{v} is not true or false"),
        }),
    }
}

/// `[daemon] schemes_dir`: one directory, or a non-empty list of them, as (first, rest).
fn schemes_dirs(
    raw: Option<&toml::Value>,
    default: &Path,
) -> Result<(PathBuf, Vec<PathBuf>), ConfigError> {
    let bad = || ConfigError::Key {
        key: "daemon.schemes_dir",
        message: "expected a directory or a non-empty list of directories, e.g. \
                  [\"/etc/nasd/schemes\", \"/usr/share/nasd/schemes\"]"
            .into(),
    };
    let dirs: Vec<PathBuf> = match raw {
        None => return Ok((default.to_path_buf(), Vec::new())),
        Some(toml::Value::String(dir)) => vec![dir.into()],
        Some(toml::Value::Array(list)) => list
            .iter()
            .map(|v| v.as_str().filter(|s| !s.is_empty()).map(PathBuf::from))
            .collect::<Option<_>>()
            .ok_or_else(bad)?,
        Some(_) => return Err(bad()),
    };
    let mut dirs = dirs.into_iter();
    let first = dirs
        .next()
        .filter(|d| !d.as_os_str().is_empty())
        .ok_or_else(bad)?;
    Ok((first, dirs.collect()))
}

impl DaemonConfig {
    /// Every schemes directory, the one that wins first.
    pub fn schemes_dirs(&self) -> Vec<PathBuf> {
        std::iter::once(self.schemes_dir.clone())
            .chain(self.schemes_fallback.iter().cloned())
            .collect()
    }

    /// The schemes directories for messages: `a` or `a, b`.
    pub fn schemes_shown(&self) -> String {
        self.schemes_dirs()
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDaemon {
    resync_interval: Option<String>,
    log_dir: Option<PathBuf>,
    /// A directory, or a list of them (the first holding a scheme name wins).
    schemes_dir: Option<toml::Value>,
    max_attempts: Option<i32>,
    retry_base: Option<String>,
    retry_cap: Option<String>,
    lease: Option<String>,
    poll_interval: Option<String>,
    window: Option<usize>,
    expand_batch: Option<i64>,
    shutdown_grace: Option<String>,
    exec_timeout: Option<String>,
    coalesce: Option<toml::Value>,
}

/// The 1-based line of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset)
        .map_or(1, |head| head.matches('\n').count() + 1)
}

impl Config {
    /// `--config FILE` when given; else `nasd.toml` in the working directory when present;
    /// else the built-in defaults.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        match path {
            Some(p) => Config::from_file(p),
            None if Path::new("nasd.toml").exists() => Config::from_file(Path::new("nasd.toml")),
            None => Ok(Config::default()),
        }
    }

    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Config::from_toml(&text).map_err(|e| match e {
            ConfigError::File { message, .. } => ConfigError::File {
                path: path.display().to_string(),
                message,
            },
            other => other,
        })
    }

    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::File {
            path: "(text)".into(),
            message: e.message().to_string()
                + &e.span()
                    .map(|s| format!(" (at line {})", line_of(text, s.start)))
                    .unwrap_or_default(),
        })?;
        let d = Config::default();
        let schemes = schemes_dirs(raw.daemon.schemes_dir.as_ref(), &d.daemon.schemes_dir)?;
        let cfg = Config {
            database: DatabaseConfig {
                url: raw.database.url.unwrap_or(d.database.url),
                params_query: raw.database.params_query.unwrap_or(d.database.params_query),
                max_connections: raw
                    .database
                    .max_connections
                    .unwrap_or(d.database.max_connections),
                statement_cache: bool_key(
                    "database.statement_cache",
                    raw.database.statement_cache.as_ref(),
                    d.database.statement_cache,
                )?,
                listen: bool_key(
                    "database.listen",
                    raw.database.listen.as_ref(),
                    d.database.listen,
                )?,
            },
            daemon: DaemonConfig {
                resync_interval: duration_key(
                    "daemon.resync_interval",
                    raw.daemon.resync_interval.as_ref(),
                    d.daemon.resync_interval,
                )?,
                log_dir: raw.daemon.log_dir.unwrap_or(d.daemon.log_dir),
                schemes_dir: schemes.0,
                schemes_fallback: schemes.1,
                max_attempts: raw.daemon.max_attempts.unwrap_or(d.daemon.max_attempts),
                retry_base: duration_key(
                    "daemon.retry_base",
                    raw.daemon.retry_base.as_ref(),
                    d.daemon.retry_base,
                )?,
                retry_cap: duration_key(
                    "daemon.retry_cap",
                    raw.daemon.retry_cap.as_ref(),
                    d.daemon.retry_cap,
                )?,
                lease: duration_key("daemon.lease", raw.daemon.lease.as_ref(), d.daemon.lease)?,
                poll_interval: duration_key(
                    "daemon.poll_interval",
                    raw.daemon.poll_interval.as_ref(),
                    d.daemon.poll_interval,
                )?,
                window: raw.daemon.window.unwrap_or(d.daemon.window),
                expand_batch: raw.daemon.expand_batch.unwrap_or(d.daemon.expand_batch),
                shutdown_grace: duration_key(
                    "daemon.shutdown_grace",
                    raw.daemon.shutdown_grace.as_ref(),
                    d.daemon.shutdown_grace,
                )?,
                exec_timeout: duration_key(
                    "daemon.exec_timeout",
                    raw.daemon.exec_timeout.as_ref(),
                    d.daemon.exec_timeout,
                )?,
                transport: TransportConfig {
                    known_hosts: raw
                        .transport
                        .known_hosts
                        .unwrap_or(d.daemon.transport.known_hosts),
                    ssh_key: raw.transport.ssh_key,
                    ssh_key_passphrase: secret::resolve(
                        "ssh_key_passphrase",
                        secret::Sources {
                            value: raw.transport.ssh_key_passphrase,
                            file: raw.transport.ssh_key_passphrase_file,
                            env: raw.transport.ssh_key_passphrase_env,
                            credential: raw.transport.ssh_key_passphrase_credential,
                        },
                        &secret::process_env,
                    )
                    .map_err(|message| ConfigError::Key {
                        key: "transport.ssh_key_passphrase",
                        message,
                    })?
                    .map(crate::model::Secret::new),
                    radius_dictionaries: raw.transport.radius_dictionaries.unwrap_or_default(),
                    radius_timeout: duration_key(
                        "transport.radius_timeout",
                        raw.transport.radius_timeout.as_ref(),
                        d.daemon.transport.radius_timeout,
                    )?,
                    radius_tries: raw
                        .transport
                        .radius_tries
                        .unwrap_or(d.daemon.transport.radius_tries),
                    api_tls_ca: raw.transport.api_tls_ca,
                    connect_timeout: duration_key(
                        "transport.connect_timeout",
                        raw.transport.connect_timeout.as_ref(),
                        d.daemon.transport.connect_timeout,
                    )?,
                },
                breaker: breaker_section(raw.breaker)?,
                coalesce: bool_key(
                    "daemon.coalesce",
                    raw.daemon.coalesce.as_ref(),
                    d.daemon.coalesce,
                )?,
            },
            api: raw.api.map(api_section).transpose()?,
            alerts: raw.alerts.map(alerts::alerts_section).transpose()?,
            log: log_section(raw.log)?,
            cluster: cluster_section(raw.cluster)?,
            history: history_section(raw.history)?,
            billing: raw.billing.map(billing::billing_section).transpose()?,
            reconcile: reconcile::reconcile_section(raw.reconcile)?,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Refuses values the daemon cannot run with, naming the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let key = |key: &'static str, message: &str| {
            Err(ConfigError::Key {
                key,
                message: message.to_string(),
            })
        };
        let url = &self.database.url;
        if !(url.starts_with("postgres://")
            || url.starts_with("postgresql://")
            || url.starts_with("sqlite:"))
        {
            return key(
                "database.url",
                "expected postgres://USER@HOST/DB or sqlite://PATH",
            );
        }
        if !self.database.params_query.contains("$1") {
            return key(
                "database.params_query",
                "must use $1 for the user_id, e.g. SELECT * FROM accounts WHERE user_id = $1",
            );
        }
        if self.database.max_connections < 2 {
            return key("database.max_connections", "must be at least 2");
        }
        let d = &self.daemon;
        if d.max_attempts < 1 {
            return key("daemon.max_attempts", "must be at least 1");
        }
        if d.resync_interval < Duration::from_millis(100) {
            return key("daemon.resync_interval", "must be at least 100ms");
        }
        if d.retry_base.is_zero() || d.retry_cap < d.retry_base {
            return key(
                "daemon.retry_cap",
                "retry_base must be above 0 and retry_cap at least retry_base",
            );
        }
        if d.lease < Duration::from_secs(1) {
            return key("daemon.lease", "must be at least 1s");
        }
        if d.poll_interval.is_zero() {
            return key("daemon.poll_interval", "must be above 0");
        }
        if d.window < 10 {
            return key("daemon.window", "must be at least 10");
        }
        if d.expand_batch < 1 {
            return key("daemon.expand_batch", "must be at least 1");
        }
        if d.exec_timeout.is_zero() {
            return key("daemon.exec_timeout", "must be above 0");
        }
        if d.transport.radius_timeout.is_zero() {
            return key("transport.radius_timeout", "must be above 0");
        }
        if d.transport.radius_tries == 0 {
            return key("transport.radius_tries", "must be at least 1");
        }
        if d.transport.connect_timeout.is_zero() {
            return key("transport.connect_timeout", "must be above 0");
        }
        if let Some(api) = &self.api {
            let tokens = api.tokens.get();
            if let Some(t) = tokens.iter().find(|t| t.secret.expose().trim().len() < 16) {
                return Err(ConfigError::Key {
                    key: if t.name.starts_with("tokens[") {
                        "api.tokens"
                    } else {
                        "api.token"
                    },
                    message: format!(
                        "token `{}`: every token must be at least 16 characters (e.g. `openssl rand -hex 32`)",
                        t.name
                    ),
                });
            }
            if api.tokens.is_empty() && !api.listen.ip().is_loopback() {
                return key(
                    "api.tokens",
                    "listening on a non-loopback address needs at least one token",
                );
            }
            if api.max_body < 1024 {
                return key("api.max_body", "must be at least 1024 bytes");
            }
            if api.max_batch == 0 {
                return key("api.max_batch", "must be at least 1");
            }
            if api.header_timeout < Duration::from_millis(100) {
                return key("api.header_timeout", "must be at least 100ms");
            }
            if api.body_timeout < Duration::from_millis(100) {
                return key("api.body_timeout", "must be at least 100ms");
            }
            if api.max_connections < 4 {
                return key(
                    "api.max_connections",
                    &format!("must be at least 4, got {}", api.max_connections),
                );
            }
            if api.nas_down_after.is_zero() || api.oldest_event_alert.is_zero() {
                return key(
                    "api.nas_down_after",
                    "nas_down_after and oldest_event_alert must be above 0",
                );
            }
        }
        if let Some(k) = &d.transport.ssh_key
            && !k.exists()
        {
            return key(
                "transport.ssh_key",
                &format!("{} does not exist", k.display()),
            );
        }
        if let Some(ca) = &d.transport.api_tls_ca
            && let Err(e) = crate::tls::load_ca_file(ca)
        {
            return key("transport.api_tls_ca", &e);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_without_keys() {
        let cfg = Config::from_toml("").unwrap();
        assert_eq!(cfg.database.url, "sqlite://var/nasd.db");
        assert_eq!(cfg.daemon.resync_interval, Duration::from_secs(60));
        assert_eq!(cfg.daemon.max_attempts, 10);
    }

    #[test]
    fn cluster_keys() {
        let c = Config::from_toml("").unwrap().cluster;
        assert_eq!(c, ClusterConfig::default());
        assert_eq!(
            (c.name.clone(), c.lease, c.heartbeat),
            (None, Duration::from_secs(10), Duration::from_secs(1))
        );
        assert_eq!(c.safety_margin(), Duration::from_secs(2));
        let c = Config::from_toml(
            "[cluster]\nname = \"nasd-a\"\nlease = \"4s\"\nheartbeat = \"500ms\"\n",
        )
        .unwrap()
        .cluster;
        assert_eq!(
            (c.name.as_deref(), c.lease, c.heartbeat),
            (
                Some("nasd-a"),
                Duration::from_secs(4),
                Duration::from_millis(500)
            )
        );
        let bad = [
            ("lease = \"1s\"", "cluster.lease", "1s is too short"),
            ("heartbeat = \"6s\"", "cluster.heartbeat", "at most half"),
            (
                "heartbeat = \"50ms\"",
                "cluster.heartbeat",
                "at least 100ms",
            ),
            ("name = \"\"", "cluster.name", "not a usable name"),
            ("lease = \"soon\"", "cluster.lease", "soon"),
            ("leader = true", "unknown field", "leader"),
        ];
        for (text, key, words) in bad {
            let e = Config::from_toml(&format!("[cluster]\n{text}\n"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(key) && e.contains(words), "{text:?}: {e}");
        }
    }

    #[test]
    fn schemes_dir_is_one_dir_or_a_list() {
        let d = Config::from_toml("").unwrap().daemon;
        assert_eq!(d.schemes_dirs(), vec![PathBuf::from("schemes")]);
        let d = Config::from_toml("[daemon]\nschemes_dir = \"/srv/schemes\"\n")
            .unwrap()
            .daemon;
        assert_eq!(
            (d.schemes_dir.clone(), d.schemes_fallback.clone()),
            (PathBuf::from("/srv/schemes"), Vec::new())
        );
        let d = Config::from_toml(
            "[daemon]\nschemes_dir = [\"/etc/nasd/schemes\", \"/usr/share/nasd/schemes\"]\n",
        )
        .unwrap()
        .daemon;
        assert_eq!(d.schemes_dir, PathBuf::from("/etc/nasd/schemes"));
        assert_eq!(
            d.schemes_dirs(),
            vec![
                PathBuf::from("/etc/nasd/schemes"),
                PathBuf::from("/usr/share/nasd/schemes")
            ]
        );
        assert_eq!(
            d.schemes_shown(),
            "/etc/nasd/schemes, /usr/share/nasd/schemes"
        );
        for bad in ["[]", "3", "[\"a\", 3]", "[\"\"]", "\"\""] {
            let err = Config::from_toml(&format!("[daemon]\nschemes_dir = {bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains("daemon.schemes_dir"), "{bad}: {err}");
        }
    }

    #[test]
    fn reads_keys() {
        let cfg = Config::from_toml(
            "[database]\nurl = \"postgres://u@h/db\"\n[daemon]\nresync_interval = \"5s\"\nmax_attempts = 3\nlog_dir = \"/tmp/x\"\n",
        )
        .unwrap();
        assert_eq!(cfg.database.url, "postgres://u@h/db");
        assert_eq!(cfg.daemon.resync_interval, Duration::from_secs(5));
        assert_eq!(cfg.daemon.max_attempts, 3);
        assert_eq!(cfg.daemon.log_dir, PathBuf::from("/tmp/x"));
    }

    #[test]
    fn database_pooler_keys() {
        let d = Config::from_toml("").unwrap().database;
        assert!(d.statement_cache && d.listen, "both on by default");
        let cases = [
            ("statement_cache = false", false, true),
            ("listen = false", true, false),
            ("statement_cache = false\nlisten = false", false, false),
            ("statement_cache = true\nlisten = true", true, true),
        ];
        for (text, cache, listen) in cases {
            let got = Config::from_toml(&format!("[database]\n{text}\n"))
                .unwrap()
                .database;
            assert_eq!(
                (got.statement_cache, got.listen),
                (cache, listen),
                "{text:?}"
            );
        }
        let bad = [
            ("statement_cache = \"no\"", "database.statement_cache"),
            ("statement_cache = 0", "database.statement_cache"),
            ("listen = \"off\"", "database.listen"),
            ("listen = 1", "database.listen"),
            ("statement_caches = false", "statement_caches"),
        ];
        for (text, needle) in bad {
            let err = Config::from_toml(&format!("[database]\n{text}\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{text:?} gave {err:?}");
            if needle.starts_with("database.") {
                let value = text.split(" = ").nth(1).unwrap_or_default();
                assert!(
                    err.contains(value),
                    "{text:?} gave {err:?} without the value"
                );
            }
        }
    }

    #[test]
    fn api_section_enables_the_server() {
        assert!(Config::from_toml("").unwrap().api.is_none());
        let api = Config::from_toml("[api]\n").unwrap().api.unwrap();
        assert_eq!(api.listen.to_string(), "127.0.0.1:8082");
        assert!(api.open_status && api.open_metrics && !api.open_rest_compat);
        assert_eq!(api.nas_down_after, Duration::from_secs(300));
        let api = Config::from_toml(
            "[api]\nlisten = \"0.0.0.0:9000\"\ntokens = [\"0123456789abcdef0123\"]\nopen_metrics = false\noldest_event_alert = \"2m\"\n",
        )
        .unwrap()
        .api
        .unwrap();
        assert_eq!(api.listen.port(), 9000);
        assert_eq!(api.tokens.len(), 1);
        assert!(!api.open_metrics);
        assert_eq!(api.oldest_event_alert, Duration::from_secs(120));
        assert!(!format!("{api:?}").contains("0123456789abcdef"));
    }

    #[test]
    fn log_section_table() {
        use crate::journal::{LogConfig, LogFormat};
        let d = Config::from_toml("").unwrap().log;
        assert_eq!(d, LogConfig::default());
        assert_eq!(d.format, LogFormat::Text);
        assert_eq!((d.max_size, d.account_max_size), (50 << 20, 1 << 20));
        let cases = [
            (
                "format = \"json\"",
                LogConfig {
                    format: LogFormat::Json,
                    ..d.clone()
                },
            ),
            (
                "max_size = \"10MB\"",
                LogConfig {
                    max_size: 10 << 20,
                    ..d.clone()
                },
            ),
            (
                "max_size = 4096",
                LogConfig {
                    max_size: 4096,
                    ..d.clone()
                },
            ),
            (
                "max_size = 0\naccount_max_size = \"0\"",
                LogConfig {
                    max_size: 0,
                    account_max_size: 0,
                    ..d.clone()
                },
            ),
            (
                "account_max_size = \"512KB\"",
                LogConfig {
                    account_max_size: 512 << 10,
                    ..d.clone()
                },
            ),
            (
                "backups = 0\ngzip = true",
                LogConfig {
                    backups: 0,
                    gzip: true,
                    ..d.clone()
                },
            ),
            (
                "stderr_format = \"json\"",
                LogConfig {
                    stderr_format: LogFormat::Json,
                    ..d.clone()
                },
            ),
        ];
        for (text, want) in cases {
            let got = Config::from_toml(&format!("[log]\n{text}\n")).unwrap().log;
            assert_eq!(got, want, "{text:?}");
        }
        let bad = [
            ("format = \"xml\"", "log.format"),
            ("stderr_format = \"yaml\"", "log.stderr_format"),
            ("max_size = \"ten\"", "log.max_size"),
            ("max_size = -1", "log.max_size"),
            ("max_size = 100", "log.max_size"),
            ("max_size = true", "log.max_size"),
            ("account_max_size = \"1.5MB\"", "log.account_max_size"),
            ("account_max_size = 10", "log.account_max_size"),
            ("backups = -1", "log.backups"),
            ("backups = 5000", "log.backups"),
            ("gzip = \"yes\"", "log.gzip"),
            ("backups = \"5\"", "log.backups"),
            ("rotate = 3", "rotate"),
        ];
        for (text, needle) in bad {
            let err = Config::from_toml(&format!("[log]\n{text}\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{text:?} gave {err:?}");
        }
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            (
                "[daemon]\nresync_interval = \"soon\"",
                "daemon.resync_interval",
            ),
            ("[daemon]\nmax_attempts = 0", "daemon.max_attempts"),
            ("[database]\nurl = \"mysql://x\"", "database.url"),
            (
                "[database]\nparams_query = \"SELECT 1\"",
                "database.params_query",
            ),
            ("[daemon]\nresync_intreval = \"5s\"", "resync_intreval"),
            ("[deamon]\n", "deamon"),
            ("[api]\nlisten = \"localhost\"", "api.listen"),
            ("[api]\ntokens = [\"short\"]", "api.tokens"),
            ("[api]\nlisten = \"0.0.0.0:8082\"", "api.tokens"),
            ("[api]\nnas_down_after = \"soon\"", "api.nas_down_after"),
            ("[api]\nmax_body = 10", "api.max_body"),
            ("[api]\ntokn = []", "tokn"),
            (
                "[[api.token]]\nname = \"a\"\nrole = \"boss\"\nsecret = \"0123456789abcdef\"",
                "role `boss`",
            ),
            (
                "[[api.token]]\nname = \"a\"\nsecret = \"short\"",
                "token `a`: every token",
            ),
            (
                "[[api.token]]\nname = \"a\"",
                "needs one of secret, secret_file",
            ),
            (
                "[[api.token]]\nname = \"a\"\nsecret_file = \"/nonexistent/t\"",
                "cannot read secret_file /nonexistent/t",
            ),
            (
                "[api]\ntokens = [\"0123456789abcdef\"]\n[[api.token]]\nname = \"tokens[0]\"\nsecret = \"0123456789abcdefx\"",
                "used twice",
            ),
            (
                "[transport]\napi_tls_ca = \"/nonexistent/ca.pem\"",
                "transport.api_tls_ca",
            ),
        ];
        for (text, needle) in cases {
            let err = Config::from_toml(text).unwrap_err().to_string();
            assert!(err.contains(needle), "{text:?} gave {err:?}");
        }
    }

    #[test]
    fn syntax_errors_name_their_line() {
        for (text, line) in [
            ("[daemon\n", "at line 1"),
            ("[daemon]\nmax_attempts = = 3\n", "at line 2"),
            (
                "# a comment\n\n[api]\nlisten = 127.0.0.1:8082\n",
                "at line 4",
            ),
        ] {
            let err = Config::from_toml(text).unwrap_err().to_string();
            assert!(err.contains(line), "{text:?} gave {err:?}");
        }
        assert_eq!(line_of("a\nb\nc", 4), 3);
        assert_eq!(line_of("a", 99), 1);
    }

    #[test]
    fn named_tokens_with_roles_and_secret_sources() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("helpdesk.token");
        std::fs::write(&file, "ffffffffffffffff0000\n").unwrap();
        let plain = vec!["0123456789abcdef".to_string()];
        let named = vec![
            RawToken {
                name: "helpdesk".into(),
                role: Some("read-only".into()),
                secret: None,
                secret_file: Some(file),
                secret_env: None,
                secret_credential: None,
            },
            RawToken {
                name: "noc".into(),
                role: None,
                secret: None,
                secret_file: None,
                secret_env: Some("NOC_TOKEN".into()),
                secret_credential: None,
            },
        ];
        let env = |v: &str| (v == "NOC_TOKEN").then(|| "eeeeeeeeeeeeeeee".to_string());
        let tokens = api_tokens(plain, named, &env).unwrap();
        let seen: Vec<(&str, Role, &str)> = tokens
            .iter()
            .map(|t| (t.name.as_str(), t.role, t.secret.expose()))
            .collect();
        assert_eq!(
            seen,
            vec![
                ("tokens[0]", Role::Admin, "0123456789abcdef"),
                ("helpdesk", Role::ReadOnly, "ffffffffffffffff0000"),
                ("noc", Role::Admin, "eeeeeeeeeeeeeeee"),
            ]
        );
        let missing = vec![RawToken {
            name: "x".into(),
            role: None,
            secret: None,
            secret_file: None,
            secret_env: Some("UNSET_VAR".into()),
            secret_credential: None,
        }];
        let err = api_tokens(Vec::new(), missing, &env)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("UNSET_VAR") && err.contains("not set"),
            "{err}"
        );
    }
}
