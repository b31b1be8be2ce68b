//! Alerts: webhook and Telegram messages when a NAS goes down and comes back, when a
//! NAS's queue stays above a threshold or stops draining, and when events start to fail
//! permanently. One message per transition, never one per event.
//!
//! - NAS down / up come from the owners' circuit breakers, at once ([`Alerts::send`]).
//! - Queue and failure alerts come from [`Watcher::step`] (pure, table-tested), run
//!   every `check_interval` over the queue depth per NAS (database) and the per-NAS
//!   counters (`Stats`).
//! - One sender task renders each alert through its template (minijinja, strict) and
//!   posts it to every destination, retrying a few times; a destination that stays
//!   unreachable is logged, never blocks the daemon.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{ConfigError, duration_key};
use crate::duration::format_duration;
use crate::journal::Journal;
use crate::stats::Stats;
use crate::store::{Secret, Store};

/// The kinds of alert, each with its own template (`[alerts.templates]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AlertKind {
    NasDown,
    NasUp,
    QueueHigh,
    QueueOk,
    QueueStalled,
    QueueMoving,
    EventsFailed,
}

impl AlertKind {
    pub const ALL: [AlertKind; 7] = [
        AlertKind::NasDown,
        AlertKind::NasUp,
        AlertKind::QueueHigh,
        AlertKind::QueueOk,
        AlertKind::QueueStalled,
        AlertKind::QueueMoving,
        AlertKind::EventsFailed,
    ];

    pub fn name(self) -> &'static str {
        match self {
            AlertKind::NasDown => "nas_down",
            AlertKind::NasUp => "nas_up",
            AlertKind::QueueHigh => "queue_high",
            AlertKind::QueueOk => "queue_ok",
            AlertKind::QueueStalled => "queue_stalled",
            AlertKind::QueueMoving => "queue_moving",
            AlertKind::EventsFailed => "events_failed",
        }
    }

    fn default_template(self) -> &'static str {
        match self {
            AlertKind::NasDown => {
                "nasd: NAS {{ nas_name }} ({{ nas_ip }}, id {{ nas_id }}) is DOWN after \
                 {{ failures }} failed connections: {{ reason }}. Its events wait."
            }
            AlertKind::NasUp => {
                "nasd: NAS {{ nas_name }} ({{ nas_ip }}, id {{ nas_id }}) is UP again after \
                 {{ down_for }} down."
            }
            AlertKind::QueueHigh => {
                "nasd: NAS {{ nas_name }} ({{ nas_ip }}, id {{ nas_id }}) has {{ queue }} events \
                 waiting, above {{ threshold }} for {{ duration }}."
            }
            AlertKind::QueueOk => {
                "nasd: NAS {{ nas_name }} ({{ nas_ip }}, id {{ nas_id }}) queue is back to \
                 {{ queue }} events (threshold {{ threshold }})."
            }
            AlertKind::QueueStalled => {
                "nasd: NAS {{ nas_name }} ({{ nas_ip }}, id {{ nas_id }}) queue of {{ queue }} \
                 events has not shrunk for {{ duration }}: no event finished."
            }
            AlertKind::QueueMoving => {
                "nasd: NAS {{ nas_name }} ({{ nas_ip }}, id {{ nas_id }}) queue is moving again \
                 ({{ queue }} events waiting)."
            }
            AlertKind::EventsFailed => {
                "nasd: NAS {{ nas_name }} ({{ nas_ip }}, id {{ nas_id }}): {{ failed }} events \
                 failed permanently; last error: {{ last_error }}"
            }
        }
    }
}

/// One alert: its kind, the NAS, and the kind's own fields (`reason`, `queue`, ...).
#[derive(Debug, Clone, PartialEq)]
pub struct Alert {
    pub kind: AlertKind,
    pub nas_id: i64,
    pub nas_name: String,
    pub nas_ip: String,
    pub at: DateTime<Utc>,
    pub fields: BTreeMap<String, serde_json::Value>,
}

impl Alert {
    /// The variables a template sees.
    pub fn vars(&self) -> BTreeMap<String, serde_json::Value> {
        let mut vars = self.fields.clone();
        vars.insert("kind".into(), self.kind.name().into());
        vars.insert("nas_id".into(), self.nas_id.into());
        vars.insert("nas_name".into(), self.nas_name.clone().into());
        vars.insert("nas_ip".into(), self.nas_ip.clone().into());
        vars.insert(
            "at".into(),
            self.at.format("%Y-%m-%d %H:%M:%S UTC").to_string().into(),
        );
        vars
    }

    /// The JSON body posted to webhooks: the variables plus the rendered text.
    pub fn webhook_body(&self, text: &str) -> serde_json::Value {
        let mut vars = self.vars();
        vars.insert("text".into(), text.into());
        vars.insert("at".into(), self.at.to_rfc3339().into());
        serde_json::to_value(vars).unwrap_or(serde_json::Value::Null)
    }
}

/// Where Telegram messages go.
#[derive(Debug, Clone)]
pub struct TelegramConfig {
    /// The Bot API base address; `https://api.telegram.org` unless a proxy is used.
    pub api: String,
    pub bot_token: Secret,
    pub chat_id: String,
}

/// `[alerts]`.
#[derive(Debug, Clone)]
pub struct AlertsConfig {
    /// Each gets a JSON POST per alert. Kept as secrets: such addresses often hold a
    /// token, so logs show only their host.
    pub webhooks: Vec<Secret>,
    pub telegram: Option<TelegramConfig>,
    pub watch: WatchConfig,
    /// Message template per kind (minijinja; a missing variable is an error at load).
    pub templates: BTreeMap<AlertKind, String>,
    /// Deadline of one HTTP request, and tries per destination.
    pub timeout: Duration,
    pub tries: u32,
    /// Extra CA certificates (PEM) trusted for https destinations, beside the system's.
    pub ca_file: Option<std::path::PathBuf>,
    /// Built from the system store and `ca_file` when the config is loaded.
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

/// What the watcher looks for, per NAS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchConfig {
    pub check_interval: Duration,
    /// Events waiting above which, for `queue_for`, a queue is high; 0 turns it off.
    pub queue_threshold: i64,
    pub queue_for: Duration,
    /// A non-empty queue with no event finished for this long is stalled; 0 turns it off.
    pub stall_for: Duration,
    /// Alert when events start to fail permanently.
    pub failures: bool,
}

impl Default for WatchConfig {
    fn default() -> WatchConfig {
        WatchConfig {
            check_interval: Duration::from_secs(30),
            queue_threshold: 1000,
            queue_for: Duration::from_secs(300),
            stall_for: Duration::from_secs(600),
            failures: true,
        }
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawAlerts {
    webhooks: Option<Vec<String>>,
    telegram_bot_token: Option<String>,
    telegram_chat_id: Option<toml::Value>,
    telegram_api: Option<String>,
    check_interval: Option<String>,
    queue_threshold: Option<i64>,
    queue_for: Option<String>,
    stall_for: Option<String>,
    failures: Option<bool>,
    timeout: Option<String>,
    tries: Option<u32>,
    ca_file: Option<std::path::PathBuf>,
    templates: Option<BTreeMap<String, String>>,
}

fn key_error(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Key {
        key,
        message: message.into(),
    }
}

/// Parses and checks `[alerts]`: addresses, durations and every template (rendered
/// once with sample values, so a typo fails at start, not at the first outage).
pub fn alerts_section(raw: RawAlerts) -> Result<AlertsConfig, ConfigError> {
    let d = WatchConfig::default();
    let webhooks = raw.webhooks.unwrap_or_default();
    for url in &webhooks {
        Url::parse(url).map_err(|e| key_error("alerts.webhooks", e))?;
    }
    let telegram = match (raw.telegram_bot_token, raw.telegram_chat_id) {
        (None, None) => None,
        (Some(token), Some(chat)) => {
            let chat_id = match chat {
                toml::Value::String(s) => s,
                toml::Value::Integer(i) => i.to_string(),
                _ => {
                    return Err(key_error(
                        "alerts.telegram_chat_id",
                        "expected a chat id such as -1001234567890 or \"@channel\"",
                    ));
                }
            };
            if token.trim().is_empty() || token.contains('/') {
                return Err(key_error(
                    "alerts.telegram_bot_token",
                    "expected a bot token such as 123456:ABC-DEF...",
                ));
            }
            let api = raw
                .telegram_api
                .unwrap_or_else(|| "https://api.telegram.org".into());
            Url::parse(&api).map_err(|e| key_error("alerts.telegram_api", e))?;
            Some(TelegramConfig {
                api: api.trim_end_matches('/').to_string(),
                bot_token: Secret::new(token),
                chat_id,
            })
        }
        (Some(_), None) => {
            return Err(key_error(
                "alerts.telegram_chat_id",
                "is needed with telegram_bot_token",
            ));
        }
        (None, Some(_)) => {
            return Err(key_error(
                "alerts.telegram_bot_token",
                "is needed with telegram_chat_id",
            ));
        }
    };
    let watch = WatchConfig {
        check_interval: duration_key(
            "alerts.check_interval",
            raw.check_interval.as_ref(),
            d.check_interval,
        )?,
        queue_threshold: raw.queue_threshold.unwrap_or(d.queue_threshold),
        queue_for: duration_key("alerts.queue_for", raw.queue_for.as_ref(), d.queue_for)?,
        stall_for: duration_key("alerts.stall_for", raw.stall_for.as_ref(), d.stall_for)?,
        failures: raw.failures.unwrap_or(d.failures),
    };
    if watch.check_interval < Duration::from_millis(100) {
        return Err(key_error("alerts.check_interval", "must be at least 100ms"));
    }
    if watch.queue_threshold < 0 {
        return Err(key_error(
            "alerts.queue_threshold",
            "must be 0 (off) or more",
        ));
    }
    let mut templates: BTreeMap<AlertKind, String> = AlertKind::ALL
        .iter()
        .map(|k| (*k, k.default_template().to_string()))
        .collect();
    for (name, text) in raw.templates.unwrap_or_default() {
        let Some(kind) = AlertKind::ALL.iter().find(|k| k.name() == name) else {
            let known: Vec<&str> = AlertKind::ALL.iter().map(|k| k.name()).collect();
            return Err(key_error(
                "alerts.templates",
                format!("unknown alert `{name}`; known: {}", known.join(", ")),
            ));
        };
        templates.insert(*kind, text);
    }
    for (kind, text) in &templates {
        render(text, &sample(*kind))
            .map_err(|e| key_error("alerts.templates", format!("template {}: {e}", kind.name())))?;
    }
    let timeout = duration_key(
        "alerts.timeout",
        raw.timeout.as_ref(),
        Duration::from_secs(10),
    )?;
    let needs_tls = raw.ca_file.is_some()
        || webhooks.iter().any(|u| u.trim().starts_with("https://"))
        || telegram
            .as_ref()
            .is_some_and(|t| t.api.starts_with("https://"));
    let tls = if needs_tls {
        Some(tls_config(raw.ca_file.as_deref()).map_err(|e| key_error("alerts.ca_file", e))?)
    } else {
        None
    };
    Ok(AlertsConfig {
        webhooks: webhooks.into_iter().map(Secret::new).collect(),
        telegram,
        watch,
        templates,
        timeout,
        tries: raw.tries.unwrap_or(3).max(1),
        ca_file: raw.ca_file,
        tls,
    })
}

/// An alert of `kind` with every field that kind carries, for checking templates.
fn sample(kind: AlertKind) -> Alert {
    let mut fields = BTreeMap::new();
    let mut put = |k: &str, v: serde_json::Value| {
        fields.insert(k.to_string(), v);
    };
    match kind {
        AlertKind::NasDown => {
            put("reason", "cannot connect: Connection refused".into());
            put("failures", 5.into());
        }
        AlertKind::NasUp => {
            put("down_for", "3m".into());
            put("down_for_seconds", 180.into());
            put("probes", 4.into());
        }
        AlertKind::QueueHigh | AlertKind::QueueOk => {
            put("queue", 1500.into());
            put("threshold", 1000.into());
            put("duration", "5m".into());
        }
        AlertKind::QueueStalled | AlertKind::QueueMoving => {
            put("queue", 12.into());
            put("duration", "10m".into());
        }
        AlertKind::EventsFailed => {
            put("failed", 3.into());
            put("failed_total", 3.into());
            put("last_error", "device refused `x`: failure".into());
        }
    }
    Alert {
        kind,
        nas_id: 1,
        nas_name: "nas".into(),
        nas_ip: "10.0.0.1".into(),
        at: Utc::now(),
        fields,
    }
}

/// Renders one template with strict undefined variables.
pub fn render(template: &str, alert: &Alert) -> Result<String, String> {
    let mut env = minijinja::Environment::new();
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
    env.render_str(template, alert.vars())
        .map_err(|e| e.to_string())
}

// ---------------------------------------------------------------------------------
// The watcher (pure)
// ---------------------------------------------------------------------------------

/// One NAS as seen at one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    pub nas_id: i64,
    /// Events waiting in `events_stack` for this NAS.
    pub depth: i64,
    /// Events of this NAS finished (done or failed) since the daemon started.
    pub finished: u64,
    /// Of those, failed permanently.
    pub failed: u64,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone)]
struct NasWatch {
    above_since: Option<Instant>,
    high: bool,
    finished: u64,
    progress_at: Instant,
    stalled: bool,
    failed: u64,
    failing: bool,
}

/// Queue and failure transitions per NAS, fed one [`Observation`] per NAS per check.
#[derive(Debug, Default)]
pub struct Watcher {
    nas: HashMap<i64, NasWatch>,
}

/// A transition found by the watcher: the NAS, the kind and its fields.
pub type Found = (i64, AlertKind, BTreeMap<String, serde_json::Value>);

impl Watcher {
    pub fn step(&mut self, cfg: &WatchConfig, now: Instant, seen: &[Observation]) -> Vec<Found> {
        let mut found = Vec::new();
        self.nas
            .retain(|id, _| seen.iter().any(|o| o.nas_id == *id));
        for o in seen {
            let w = self.nas.entry(o.nas_id).or_insert(NasWatch {
                above_since: None,
                high: false,
                finished: o.finished,
                progress_at: now,
                stalled: false,
                failed: o.failed,
                failing: false,
            });
            let fields = |pairs: &[(&str, serde_json::Value)]| {
                pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.clone()))
                    .collect::<BTreeMap<_, _>>()
            };
            // Queue above the threshold for queue_for.
            if cfg.queue_threshold > 0 && o.depth > cfg.queue_threshold {
                let since = *w.above_since.get_or_insert(now);
                let lasted = now.saturating_duration_since(since);
                if !w.high && lasted >= cfg.queue_for {
                    w.high = true;
                    found.push((
                        o.nas_id,
                        AlertKind::QueueHigh,
                        fields(&[
                            ("queue", o.depth.into()),
                            ("threshold", cfg.queue_threshold.into()),
                            ("duration", format_duration(lasted).into()),
                        ]),
                    ));
                }
            } else {
                w.above_since = None;
                if w.high {
                    w.high = false;
                    found.push((
                        o.nas_id,
                        AlertKind::QueueOk,
                        fields(&[
                            ("queue", o.depth.into()),
                            ("threshold", cfg.queue_threshold.into()),
                            ("duration", "0s".into()),
                        ]),
                    ));
                }
            }
            // A queue that does not drain: events waiting, none finished for stall_for.
            if o.depth == 0 || o.finished > w.finished {
                w.progress_at = now;
                if w.stalled {
                    w.stalled = false;
                    found.push((
                        o.nas_id,
                        AlertKind::QueueMoving,
                        fields(&[("queue", o.depth.into()), ("duration", "0s".into())]),
                    ));
                }
            } else if !cfg.stall_for.is_zero() && !w.stalled {
                let lasted = now.saturating_duration_since(w.progress_at);
                if lasted >= cfg.stall_for {
                    w.stalled = true;
                    found.push((
                        o.nas_id,
                        AlertKind::QueueStalled,
                        fields(&[
                            ("queue", o.depth.into()),
                            ("duration", format_duration(lasted).into()),
                        ]),
                    ));
                }
            }
            w.finished = o.finished;
            // Permanent failures: one message when they start, none while they go on,
            // rearmed by a check without new failures.
            if o.failed > w.failed {
                if cfg.failures && !w.failing {
                    found.push((
                        o.nas_id,
                        AlertKind::EventsFailed,
                        fields(&[
                            ("failed", (o.failed - w.failed).into()),
                            ("failed_total", o.failed.into()),
                            (
                                "last_error",
                                o.last_error.clone().unwrap_or_default().into(),
                            ),
                        ]),
                    ));
                }
                w.failing = true;
            } else {
                w.failing = false;
            }
            w.failed = o.failed;
        }
        found
    }
}

// ---------------------------------------------------------------------------------
// Delivery
// ---------------------------------------------------------------------------------

/// The daemon's handle for raising alerts; cheap to clone, a no-op without `[alerts]`.
#[derive(Clone, Default)]
pub struct Alerts {
    tx: Option<mpsc::UnboundedSender<Alert>>,
}

impl Alerts {
    pub fn off() -> Alerts {
        Alerts { tx: None }
    }

    pub fn send(&self, alert: Alert) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(alert);
        }
    }
}

/// Starts the sender and the watcher; both stop with `shutdown` (the sender first
/// delivers what is queued, for at most a few seconds).
pub fn start(
    cfg: AlertsConfig,
    store: Store,
    stats: Arc<Stats>,
    journal: Journal,
    shutdown: CancellationToken,
) -> (Alerts, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let alerts = Alerts { tx: Some(tx) };
    let cfg = Arc::new(cfg);
    let sender = tokio::spawn(deliver_all(
        cfg.clone(),
        rx,
        journal.clone(),
        shutdown.clone(),
    ));
    let watcher = tokio::spawn(watch_loop(
        cfg,
        store,
        stats,
        alerts.clone(),
        journal,
        shutdown,
    ));
    let join = tokio::spawn(async move {
        let _ = watcher.await;
        let _ = sender.await;
    });
    (alerts, join)
}

async fn watch_loop(
    cfg: Arc<AlertsConfig>,
    store: Store,
    stats: Arc<Stats>,
    alerts: Alerts,
    journal: Journal,
    shutdown: CancellationToken,
) {
    let mut watcher = Watcher::default();
    let mut warned = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(cfg.watch.check_interval) => {}
        }
        let (nas, queues) = match tokio::try_join!(store.nas_list(), store.queue_by_nas()) {
            Ok(both) => {
                warned = false;
                both
            }
            Err(e) => {
                if !warned {
                    journal.daemon(&format!("alerts: cannot read the queues: {e}"));
                    warned = true;
                }
                continue;
            }
        };
        let seen: Vec<Observation> = nas
            .iter()
            .filter(|n| n.enabled)
            .map(|n| {
                let snap = stats.get(n.id).unwrap_or_default();
                let (finished, failed) = snap.by_cmd.iter().fold((0, 0), |(f, x), (_, c)| {
                    (f + c.done + c.failed, x + c.failed)
                });
                Observation {
                    nas_id: n.id,
                    depth: queues
                        .iter()
                        .find(|q| q.nas_id == n.id)
                        .map_or(0, |q| q.depth),
                    finished,
                    failed,
                    last_error: snap.last_error,
                }
            })
            .collect();
        for (nas_id, kind, fields) in watcher.step(&cfg.watch, Instant::now(), &seen) {
            let Some(n) = nas.iter().find(|n| n.id == nas_id) else {
                continue;
            };
            alerts.send(Alert {
                kind,
                nas_id,
                nas_name: n.name.clone(),
                nas_ip: n.ip.clone(),
                at: Utc::now(),
                fields,
            });
        }
    }
}

async fn deliver_all(
    cfg: Arc<AlertsConfig>,
    mut rx: mpsc::UnboundedReceiver<Alert>,
    journal: Journal,
    shutdown: CancellationToken,
) {
    loop {
        let alert = tokio::select! {
            biased;
            a = rx.recv() => match a { Some(a) => a, None => return },
            _ = shutdown.cancelled() => break,
        };
        deliver(&cfg, &alert, &journal).await;
    }
    // Shutting down: what is queued still goes out, within a short deadline.
    let deadline = Instant::now() + Duration::from_secs(5);
    while let Ok(alert) = rx.try_recv() {
        if tokio::time::timeout_at(deadline, deliver(&cfg, &alert, &journal))
            .await
            .is_err()
        {
            journal.daemon("alerts: shutdown deadline; undelivered alerts dropped");
            return;
        }
    }
}

async fn deliver(cfg: &AlertsConfig, alert: &Alert, journal: &Journal) {
    let template = cfg
        .templates
        .get(&alert.kind)
        .map(String::as_str)
        .unwrap_or(alert.kind.default_template());
    let text = match render(template, alert) {
        Ok(t) => t,
        Err(e) => {
            // Checked at load with every field, so this means a field went missing.
            format!(
                "{} (template {} failed: {e})",
                alert.kind.name(),
                alert.kind.name()
            )
        }
    };
    journal.daemon(&format!("alert {}: {text}", alert.kind.name()));
    for hook in &cfg.webhooks {
        let body = alert.webhook_body(&text).to_string();
        let dest = Url::parse(hook.expose())
            .map(|u| format!("webhook {}", u.host))
            .unwrap_or_else(|_| "webhook".into());
        post_with_tries(cfg, hook.expose(), &body, &dest, journal).await;
    }
    if let Some(tg) = &cfg.telegram {
        let url = format!("{}/bot{}/sendMessage", tg.api, tg.bot_token.expose());
        let body = serde_json::json!({
            "chat_id": tg.chat_id,
            "text": text,
            "disable_web_page_preview": true,
        })
        .to_string();
        post_with_tries(cfg, &url, &body, "telegram", journal).await;
    }
}

/// Posts with up to `cfg.tries` tries, 1 s, 2 s, ... apart. Errors name `dest` (never
/// the address, which may hold a token).
async fn post_with_tries(cfg: &AlertsConfig, url: &str, body: &str, dest: &str, journal: &Journal) {
    let mut wait = Duration::from_secs(1);
    for attempt in 1..=cfg.tries {
        match post_json(url, body, cfg.timeout, cfg.tls.as_ref()).await {
            Ok(status) if (200..300).contains(&status) => return,
            Ok(status) => {
                journal.daemon(&format!(
                    "alerts: {dest} answered HTTP {status} (try {attempt} of {})",
                    cfg.tries
                ));
                if (400..500).contains(&status) && status != 429 {
                    return;
                }
            }
            Err(e) => journal.daemon(&format!(
                "alerts: {dest}: {e} (try {attempt} of {})",
                cfg.tries
            )),
        }
        if attempt < cfg.tries {
            tokio::time::sleep(wait).await;
            wait *= 2;
        }
    }
}

// ---------------------------------------------------------------------------------
// A minimal HTTP/1.1 POST (http and https)
// ---------------------------------------------------------------------------------

/// The parts of an `http://` or `https://` address a POST needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// Path and query, starting with `/`.
    pub path: String,
}

impl Url {
    pub fn parse(text: &str) -> Result<Url, String> {
        let text = text.trim();
        let (tls, rest) = if let Some(r) = text.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = text.strip_prefix("http://") {
            (false, r)
        } else {
            return Err("expected an http:// or https:// address".into());
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.contains('@') {
            return Err("user:password@ in the address is not supported".into());
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let Some(end) = v6.find(']') else {
                return Err("unclosed [ in the address".into());
            };
            let after = &v6[end + 1..];
            let port = match after.strip_prefix(':') {
                Some(p) => Some(p),
                None if after.is_empty() => None,
                None => return Err("unexpected text after ]".into()),
            };
            (v6[..end].to_string(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (authority.to_string(), None),
            }
        };
        if host.is_empty() {
            return Err("the address has no host".into());
        }
        let port = match port {
            Some(p) => p
                .parse::<u16>()
                .map_err(|_| format!("bad port `{p}` in the address"))?,
            None if tls => 443,
            None => 80,
        };
        if path.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err("the address has spaces or control characters".into());
        }
        Ok(Url {
            tls,
            host,
            port,
            path: path.to_string(),
        })
    }
}

/// POSTs a JSON body and returns the HTTP status. One connection per call.
pub async fn post_json(
    url: &str,
    body: &str,
    timeout: Duration,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> Result<u16, String> {
    let url = Url::parse(url)?;
    let host_header = if url.host.contains(':') {
        format!("[{}]", url.host)
    } else {
        url.host.clone()
    };
    let request = format!(
        "POST {} HTTP/1.1\r\nHost: {host_header}\r\nUser-Agent: nasd/{}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        url.path,
        env!("CARGO_PKG_VERSION"),
        body.len()
    );
    let exchange = async {
        let tcp = tokio::net::TcpStream::connect((url.host.as_str(), url.port))
            .await
            .map_err(|e| format!("cannot connect to {}:{}: {e}", url.host, url.port))?;
        if url.tls {
            let stream = tls_connect(&url.host, tcp, tls).await?;
            exchange(stream, request.as_bytes()).await
        } else {
            exchange(tcp, request.as_bytes()).await
        }
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| format!("no answer within {}", format_duration(timeout)))?
}

async fn exchange<S>(mut stream: S, request: &[u8]) -> Result<u16, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream
        .write_all(request)
        .await
        .map_err(|e| format!("sending: {e}"))?;
    stream.flush().await.map_err(|e| format!("sending: {e}"))?;
    // Only the status line matters; read until it is complete.
    let mut head = Vec::with_capacity(256);
    let mut buf = [0u8; 1024];
    loop {
        let n = stream
            .read(&mut buf)
            .await
            .map_err(|e| format!("reading the answer: {e}"))?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
        if head.windows(2).any(|w| w == b"\r\n") || head.len() > 8192 {
            break;
        }
    }
    parse_status(&head)
}

/// The status code of an HTTP/1.x status line.
pub fn parse_status(head: &[u8]) -> Result<u16, String> {
    let line_end = head
        .windows(2)
        .position(|w| w == b"\r\n")
        .ok_or_else(|| "the server closed without an HTTP answer".to_string())?;
    let line = String::from_utf8_lossy(&head[..line_end]);
    let mut parts = line.split(' ');
    match (parts.next(), parts.next()) {
        (Some(v), Some(code)) if v.starts_with("HTTP/1.") => code
            .parse::<u16>()
            .map_err(|_| format!("bad HTTP status line `{line}`")),
        _ => Err(format!("bad HTTP status line `{line}`")),
    }
}

/// The TLS client settings for https destinations: the system's CA store plus
/// `alerts.ca_file`. Built once at start.
pub fn tls_config(ca_file: Option<&std::path::Path>) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        let _ = roots.add(cert);
    }
    if let Some(path) = ca_file {
        let extra = crate::tls::load_ca_file(path)?;
        roots.extend(extra.roots.iter().cloned());
    }
    if roots.is_empty() {
        return Err(
            "no CA certificates: the system store is empty and alerts.ca_file is not set".into(),
        );
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

async fn tls_connect(
    host: &str,
    tcp: tokio::net::TcpStream,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
    let Some(config) = tls else {
        return Err("https is unavailable: the CA certificates could not be loaded".into());
    };
    let name = rustls::pki_types::ServerName::try_from(host.to_string())
        .map_err(|e| format!("bad TLS server name {host}: {e}"))?;
    tokio_rustls::TlsConnector::from(config.clone())
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS with {host}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(nas_id: i64, depth: i64, finished: u64, failed: u64) -> Observation {
        Observation {
            nas_id,
            depth,
            finished,
            failed,
            last_error: Some("boom".into()),
        }
    }

    /// (seconds from the start, depth, finished, the transitions expected)
    type Step = (u64, i64, u64, Vec<(i64, AlertKind)>);

    fn kinds(found: &[Found]) -> Vec<(i64, AlertKind)> {
        found.iter().map(|(n, k, _)| (*n, *k)).collect()
    }

    #[test]
    fn queue_high_once_then_ok() {
        let cfg = WatchConfig {
            check_interval: Duration::from_secs(1),
            queue_threshold: 100,
            queue_for: Duration::from_secs(60),
            stall_for: Duration::ZERO,
            failures: true,
        };
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut w = Watcher::default();
        // (seconds, depth, finished, expected)
        let steps: Vec<Step> = vec![
            (0, 150, 0, vec![]),
            (30, 400, 10, vec![]),
            (60, 300, 20, vec![(1, AlertKind::QueueHigh)]),
            (90, 500, 30, vec![]),
            (120, 80, 40, vec![(1, AlertKind::QueueOk)]),
            (150, 90, 50, vec![]),
            // Above again: the 60 s count starts over.
            (180, 200, 60, vec![]),
            (200, 200, 70, vec![]),
            (240, 200, 80, vec![(1, AlertKind::QueueHigh)]),
        ];
        for (at, depth, finished, want) in steps {
            let found = w.step(&cfg, t0 + s(at), &[obs(1, depth, finished, 0)]);
            assert_eq!(kinds(&found), want, "at {at}s depth {depth}");
        }
    }

    #[test]
    fn stall_needs_waiting_events_and_no_finished_ones() {
        let cfg = WatchConfig {
            check_interval: Duration::from_secs(1),
            queue_threshold: 0,
            queue_for: Duration::ZERO,
            stall_for: Duration::from_secs(600),
            failures: true,
        };
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut w = Watcher::default();
        let steps: Vec<Step> = vec![
            (0, 5, 0, vec![]),
            (300, 5, 0, vec![]),
            (600, 7, 0, vec![(1, AlertKind::QueueStalled)]),
            (900, 9, 0, vec![]),
            (960, 8, 1, vec![(1, AlertKind::QueueMoving)]),
            // An empty queue is never stalled.
            (2000, 0, 1, vec![]),
            (3000, 0, 1, vec![]),
        ];
        for (at, depth, finished, want) in steps {
            let found = w.step(&cfg, t0 + s(at), &[obs(1, depth, finished, 0)]);
            assert_eq!(kinds(&found), want, "at {at}s");
        }
    }

    #[test]
    fn failures_alert_once_per_run_of_failures() {
        let cfg = WatchConfig {
            queue_threshold: 0,
            stall_for: Duration::ZERO,
            ..WatchConfig::default()
        };
        let t0 = Instant::now();
        let mut w = Watcher::default();
        // First sight only sets the baseline.
        assert!(w.step(&cfg, t0, &[obs(1, 0, 10, 2)]).is_empty());
        let found = w.step(&cfg, t0, &[obs(1, 0, 20, 5)]);
        assert_eq!(kinds(&found), vec![(1, AlertKind::EventsFailed)]);
        assert_eq!(found[0].2["failed"], 3);
        assert_eq!(found[0].2["last_error"], "boom");
        // Still failing: quiet.
        assert!(w.step(&cfg, t0, &[obs(1, 0, 30, 9)]).is_empty());
        // A check without failures rearms it.
        assert!(w.step(&cfg, t0, &[obs(1, 0, 40, 9)]).is_empty());
        assert_eq!(
            kinds(&w.step(&cfg, t0, &[obs(1, 0, 50, 10)])),
            vec![(1, AlertKind::EventsFailed)]
        );
        // Two NAS are independent; a NAS that disappears is forgotten.
        let found = w.step(&cfg, t0, &[obs(1, 0, 50, 11), obs(2, 0, 0, 0)]);
        assert!(found.is_empty());
        let found = w.step(&cfg, t0, &[obs(2, 0, 1, 1)]);
        assert_eq!(kinds(&found), vec![(2, AlertKind::EventsFailed)]);
    }

    #[test]
    fn urls() {
        let ok = |text: &str, tls: bool, host: &str, port: u16, path: &str| {
            assert_eq!(
                Url::parse(text).unwrap(),
                Url {
                    tls,
                    host: host.into(),
                    port,
                    path: path.into()
                },
                "{text}"
            );
        };
        ok(
            "http://127.0.0.1:8080/hook",
            false,
            "127.0.0.1",
            8080,
            "/hook",
        );
        ok(
            "https://api.telegram.org",
            true,
            "api.telegram.org",
            443,
            "/",
        );
        ok(
            "http://example.net/a?b=c",
            false,
            "example.net",
            80,
            "/a?b=c",
        );
        ok("https://[::1]:8443/x", true, "::1", 8443, "/x");
        for bad in [
            "ftp://x",
            "http://",
            "http://h:99999/",
            "http://u:p@h/",
            "http://h/a b",
            "https://[::1/x",
        ] {
            assert!(Url::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn status_lines() {
        assert_eq!(parse_status(b"HTTP/1.1 200 OK\r\n"), Ok(200));
        assert_eq!(
            parse_status(b"HTTP/1.0 404 Not Found\r\nX: y\r\n\r\n"),
            Ok(404)
        );
        assert!(parse_status(b"").is_err());
        assert!(parse_status(b"SSH-2.0-x\r\n").is_err());
        assert!(parse_status(b"HTTP/1.1 abc\r\n").is_err());
    }

    #[test]
    fn config_checks_templates_and_names_keys() {
        let parse = |text: &str| -> Result<AlertsConfig, String> {
            let raw: RawAlerts = toml::from_str(text).map_err(|e| e.to_string())?;
            alerts_section(raw).map_err(|e| e.to_string())
        };
        let cfg = parse(
            "webhooks = [\"http://127.0.0.1:9/hook\"]\ntelegram_bot_token = \"1:abc\"\n\
             telegram_chat_id = -100123\n[templates]\nnas_down = \"down {{ nas_name }}: {{ reason }}\"\n",
        )
        .unwrap();
        assert_eq!(cfg.telegram.as_ref().unwrap().chat_id, "-100123");
        assert_eq!(
            cfg.templates[&AlertKind::NasDown],
            "down {{ nas_name }}: {{ reason }}"
        );
        for (text, key) in [
            ("webhooks = [\"ftp://x\"]", "alerts.webhooks"),
            ("telegram_bot_token = \"1:abc\"", "alerts.telegram_chat_id"),
            ("telegram_chat_id = 5", "alerts.telegram_bot_token"),
            ("[templates]\nnas_gone = \"x\"", "alerts.templates"),
            ("[templates]\nnas_up = \"{{ queue }}\"", "alerts.templates"),
            ("[templates]\nnas_up = \"{% if %}\"", "alerts.templates"),
            ("check_interval = \"soon\"", "alerts.check_interval"),
            ("queue_threshold = -1", "alerts.queue_threshold"),
        ] {
            let e = parse(text).unwrap_err();
            assert!(e.contains(key), "{text}: {e}");
        }
    }

    #[test]
    fn every_default_template_renders_its_sample() {
        for kind in AlertKind::ALL {
            let text = render(kind.default_template(), &sample(kind)).unwrap();
            assert!(text.contains("NAS nas (10.0.0.1, id 1)"), "{text}");
        }
    }
}
