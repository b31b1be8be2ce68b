//! `[alerts]`: the kinds of alert with their default templates, the variables each
//! template sees, the destinations and the watcher's thresholds. Parsed and checked
//! here (every template is rendered once with sample values, so a typo fails at
//! start); `crate::alerts` sends what this describes and never the other way round.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Deserialize;

use super::keys::{ConfigError, duration_key};
use crate::model::Secret;

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
    /// A daemon of the cluster let its lease run out and its NAS are being taken over.
    DaemonLost,
    /// A daemon whose NAS were taken over joined the cluster again.
    DaemonBack,
    /// `[billing]`: the billing database stopped answering (events wait).
    BillingDown,
    /// `[billing]`: the billing database answers again.
    BillingUp,
}

impl AlertKind {
    pub const ALL: [AlertKind; 11] = [
        AlertKind::NasDown,
        AlertKind::NasUp,
        AlertKind::QueueHigh,
        AlertKind::QueueOk,
        AlertKind::QueueStalled,
        AlertKind::QueueMoving,
        AlertKind::EventsFailed,
        AlertKind::DaemonLost,
        AlertKind::DaemonBack,
        AlertKind::BillingDown,
        AlertKind::BillingUp,
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
            AlertKind::DaemonLost => "daemon_lost",
            AlertKind::DaemonBack => "daemon_back",
            AlertKind::BillingDown => "billing_down",
            AlertKind::BillingUp => "billing_up",
        }
    }

    pub fn default_template(self) -> &'static str {
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
            AlertKind::DaemonLost => {
                "nasd: daemon {{ daemon }} is LOST: its lease ran out and its NAS are being \
                 taken over by the other daemons (seen by {{ reporter }})."
            }
            AlertKind::DaemonBack => {
                "nasd: daemon {{ daemon }} is BACK in the cluster after its NAS were taken over."
            }
            AlertKind::BillingDown => {
                "nasd: billing database {{ billing }} is DOWN ({{ part }}): {{ reason }}. \
                 New events wait."
            }
            AlertKind::BillingUp => {
                "nasd: billing database {{ billing }} is UP again ({{ part }}) after {{ down_for }}."
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
    webhooks_file: Option<std::path::PathBuf>,
    webhooks_env: Option<String>,
    webhooks_credential: Option<String>,
    telegram_bot_token: Option<String>,
    telegram_bot_token_file: Option<std::path::PathBuf>,
    telegram_bot_token_env: Option<String>,
    telegram_bot_token_credential: Option<String>,
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
    let mut webhooks = raw.webhooks.unwrap_or_default();
    // More addresses from outside the file (they often hold a token): one per line or
    // separated by spaces; lines starting with `#` are comments.
    let more = crate::config::secret::resolve(
        "webhooks",
        crate::config::secret::Sources {
            value: None,
            file: raw.webhooks_file,
            env: raw.webhooks_env,
            credential: raw.webhooks_credential,
        },
        &crate::config::secret::process_env,
    )
    .map_err(|e| key_error("alerts.webhooks", e))?;
    if let Some(text) = more {
        webhooks.extend(
            text.lines()
                .filter(|l| !l.trim_start().starts_with('#'))
                .flat_map(str::split_whitespace)
                .map(str::to_string),
        );
    }
    for url in &webhooks {
        // The parse error names the problem, not the address (it may hold a token).
        Url::parse(url).map_err(|e| key_error("alerts.webhooks", e))?;
    }
    let bot_token = crate::config::secret::resolve(
        "telegram_bot_token",
        crate::config::secret::Sources {
            value: raw.telegram_bot_token,
            file: raw.telegram_bot_token_file,
            env: raw.telegram_bot_token_env,
            credential: raw.telegram_bot_token_credential,
        },
        &crate::config::secret::process_env,
    )
    .map_err(|e| key_error("alerts.telegram_bot_token", e))?;
    let telegram = match (bot_token, raw.telegram_chat_id) {
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
        AlertKind::DaemonLost => {
            put("daemon", "nasd-2".into());
            put("reporter", "nasd-1".into());
            put("taken", 4.into());
        }
        AlertKind::DaemonBack => {
            put("daemon", "nasd-2".into());
            put("reporter", "nasd-2".into());
        }
        AlertKind::BillingDown => {
            put("billing", "mysql://nasd:***@billing/abills".into());
            put("part", "params_query".into());
            put(
                "reason",
                "billing database unreachable: connection refused".into(),
            );
        }
        AlertKind::BillingUp => {
            put("billing", "mysql://nasd:***@billing/abills".into());
            put("part", "params_query".into());
            put("down_for", "3m".into());
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

#[cfg(test)]
mod tests {
    use super::*;

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
            match kind {
                // Daemon alerts concern a daemon of the cluster, not one NAS.
                AlertKind::DaemonLost | AlertKind::DaemonBack => {
                    assert!(text.contains("daemon nasd-2 is "), "{text}")
                }
                AlertKind::BillingDown | AlertKind::BillingUp => {
                    assert!(
                        text.contains("billing database mysql://nasd:***@billing/abills is "),
                        "{text}"
                    )
                }
                _ => assert!(text.contains("NAS nas (10.0.0.1, id 1)"), "{text}"),
            }
        }
    }
}
