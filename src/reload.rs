//! SIGHUP (`systemctl reload nasd`): the config file is read again; what can change
//! while the daemon runs is applied (the `[log]` format, sizes, backups and gzip;
//! `[alerts]`; retries, `[breaker]` and `[daemon] coalesce`; the API tokens), and what
//! needs a restart is
//! named in the daemon log, its old value kept. A config with an error changes nothing.
//!
//! [`restart_needed`] and [`live_changes`] are pure (table tests below); [`Reloader`]
//! hands the new values to the parts that read them.

use std::sync::Arc;

use tokio::sync::watch;

use crate::config::alerts::AlertsConfig;
use crate::config::{Config, Tokens, Tuning};

type AlertsConfigRef = Arc<AlertsConfig>;
use crate::journal::Journal;

/// The sections (or keys) whose change needs a restart, in the config's order.
pub fn restart_needed(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut out = Vec::new();
    let differ =
        |a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| format!("{a:?}") != format!("{b:?}");
    if differ(&old.database, &new.database) {
        out.push("[database]");
    }
    let fixed = |c: &Config| {
        let mut d = c.daemon.clone();
        let t = Tuning {
            max_attempts: 0,
            retry_base: std::time::Duration::ZERO,
            retry_cap: std::time::Duration::ZERO,
            breaker: Default::default(),
            coalesce: false,
        };
        d.max_attempts = t.max_attempts;
        d.retry_base = t.retry_base;
        d.retry_cap = t.retry_cap;
        d.breaker = t.breaker;
        d.coalesce = t.coalesce;
        let transport = d.transport.clone();
        (format!("{d:?}"), format!("{transport:?}"))
    };
    let (old_daemon, old_transport) = fixed(old);
    let (new_daemon, new_transport) = fixed(new);
    if old_daemon.replace(&old_transport, "") != new_daemon.replace(&new_transport, "") {
        out.push("[daemon] (other than max_attempts, retry_base, retry_cap, coalesce)");
    }
    if old_transport != new_transport {
        out.push("[transport]");
    }
    let api = |c: &Config| {
        c.api.as_ref().map(|a| {
            let mut a = a.clone();
            a.tokens = Tokens::default();
            format!("{a:?}")
        })
    };
    match (api(old), api(new)) {
        (Some(a), Some(b)) if a != b => out.push("[api] (other than the tokens)"),
        (None, Some(_)) | (Some(_), None) => out.push("[api] (turned on or off)"),
        _ => {}
    }
    if old.alerts.is_some() != new.alerts.is_some() {
        out.push("[alerts] (turned on or off)");
    }
    if old.log.stderr_format != new.log.stderr_format {
        out.push("[log] stderr_format");
    }
    if differ(&old.cluster, &new.cluster) {
        out.push("[cluster]");
    }
    if differ(&old.history, &new.history) {
        out.push("[history]");
    }
    if differ(&old.billing, &new.billing) {
        out.push("[billing]");
    }
    if old.reconcile != new.reconcile {
        out.push("[reconcile]");
    }
    out
}

/// What a reload changes live (for the daemon log): names only, never values.
pub fn live_changes(old: &Config, new: &Config) -> Vec<String> {
    let mut out = Vec::new();
    let (a, b) = (old.daemon.tuning(), new.daemon.tuning());
    if (a.max_attempts, a.retry_base, a.retry_cap) != (b.max_attempts, b.retry_base, b.retry_cap) {
        out.push(format!(
            "retries (max_attempts {}, retry_base {}, retry_cap {})",
            b.max_attempts,
            crate::duration::format_duration(b.retry_base),
            crate::duration::format_duration(b.retry_cap)
        ));
    }
    if a.breaker != b.breaker {
        out.push("[breaker]".into());
    }
    if a.coalesce != b.coalesce {
        out.push(format!(
            "coalescing {}",
            if b.coalesce {
                "on (where a scheme declares [coalesce])"
            } else {
                "off"
            }
        ));
    }
    if old.log != new.log {
        out.push("[log]".into());
    }
    if let (Some(x), Some(y)) = (&old.alerts, &new.alerts) {
        let shown = |c: &crate::config::alerts::AlertsConfig| {
            let webhooks: Vec<&str> = c.webhooks.iter().map(|w| w.expose()).collect();
            let bot = c.telegram.as_ref().map(|t| {
                (
                    t.api.clone(),
                    t.bot_token.expose().to_string(),
                    t.chat_id.clone(),
                )
            });
            format!(
                "{webhooks:?}{bot:?}{:?}{:?}{:?}{}{:?}",
                c.watch, c.templates, c.timeout, c.tries, c.ca_file
            )
        };
        if shown(x) != shown(y) {
            out.push("[alerts]".into());
        }
    }
    if let (Some(x), Some(y)) = (&old.api, &new.api) {
        let shown = |t: &Tokens| {
            t.get()
                .iter()
                .map(|t| (t.name.clone(), t.role, t.secret.expose().to_string()))
                .collect::<Vec<_>>()
        };
        let after = shown(&y.tokens);
        if shown(&x.tokens) != after {
            let names: Vec<String> = after
                .iter()
                .map(|(name, role, _)| format!("{name} ({})", role.as_str()))
                .collect();
            out.push(format!("API tokens (now: {})", names.join(", ")));
        }
    }
    out
}

/// Hands reloaded settings to the running daemon's parts.
pub struct Reloader {
    /// The config as the daemon now runs it (live parts updated at each reload).
    current: Config,
    journal: Journal,
    tuning: watch::Sender<Tuning>,
    alerts: Option<watch::Sender<AlertsConfigRef>>,
}

impl Reloader {
    pub fn new(
        current: Config,
        journal: Journal,
        tuning: watch::Sender<Tuning>,
        alerts: Option<watch::Sender<AlertsConfigRef>>,
    ) -> Reloader {
        Reloader {
            current,
            journal,
            tuning,
            alerts,
        }
    }

    /// Applies what can change live and logs (daemon log and tracing) what was applied
    /// and what needs a restart. Returns the lines logged.
    pub fn apply(&mut self, new: Config) -> Vec<String> {
        let restart = restart_needed(&self.current, &new);
        let live = live_changes(&self.current, &new);
        self.journal.reconfigure(&new.log);
        self.current.log = new.log.clone();
        let tuning = new.daemon.tuning();
        self.tuning.send_replace(tuning.clone());
        self.current.daemon.max_attempts = tuning.max_attempts;
        self.current.daemon.retry_base = tuning.retry_base;
        self.current.daemon.retry_cap = tuning.retry_cap;
        self.current.daemon.breaker = tuning.breaker;
        self.current.daemon.coalesce = tuning.coalesce;
        if let (Some(sender), Some(alerts)) = (&self.alerts, &new.alerts) {
            sender.send_replace(Arc::new(alerts.clone()));
            self.current.alerts = Some(alerts.clone());
        }
        if let (Some(api), Some(new_api)) = (&self.current.api, &new.api) {
            // Clones share the set: the API server reads it at its next request.
            api.tokens.set(new_api.tokens.get().as_ref().clone());
        }
        let mut lines = vec![if live.is_empty() {
            "SIGHUP: config reloaded: nothing that changes live has changed".to_string()
        } else {
            format!("SIGHUP: config reloaded: applied {}", live.join("; "))
        }];
        if !restart.is_empty() {
            lines.push(format!(
                "SIGHUP: changed but kept until a restart: {} (restart nasd to apply)",
                restart.join(", ")
            ));
        }
        for line in &lines {
            tracing::warn!("{line}");
            self.journal.daemon(line);
        }
        lines
    }

    /// A config that could not be loaded: nothing changes, the error is logged.
    pub fn refused(&self, error: &str) {
        let line = format!("SIGHUP: the config has an error, nothing was changed: {error}");
        tracing::error!("{line}");
        self.journal.daemon(&line);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        Config::from_toml(text).unwrap()
    }

    #[test]
    fn what_needs_a_restart_and_what_applies_live() {
        let base = "[database]\nurl = \"sqlite://a.db\"\n[api]\ntokens = [\"0123456789abcdef\"]\n\
                    [alerts]\nwebhooks = [\"http://127.0.0.1:1/a\"]\n";
        let cases: Vec<(&str, Vec<&str>, Vec<&str>)> = vec![
            ("", vec![], vec![]),
            (
                "[daemon]\nmax_attempts = 9\n",
                vec![],
                vec!["retries (max_attempts 9"],
            ),
            ("[breaker]\nfailures = 7\n", vec![], vec!["[breaker]"]),
            (
                "[daemon]\ncoalesce = false\n",
                vec![],
                vec!["coalescing off"],
            ),
            ("[daemon]\ncoalesce = true\n", vec![], vec![]),
            (
                "[daemon]\ncoalesce = false\nmax_attempts = 9\n",
                vec![],
                vec!["retries (max_attempts 9", "coalescing off"],
            ),
            ("[log]\nformat = \"json\"\n", vec![], vec!["[log]"]),
            (
                "[log]\nstderr_format = \"json\"\n",
                vec!["[log] stderr_format"],
                vec!["[log]"],
            ),
            ("[alerts]\ntries = 5\n", vec![], vec!["[alerts]"]),
            (
                "[api]\ntokens = [\"fedcba9876543210\"]\n",
                vec![],
                vec!["API tokens (now: tokens[0] (admin))"],
            ),
            (
                "[daemon]\nresync_interval = \"5s\"\n",
                vec!["[daemon] (other than max_attempts, retry_base, retry_cap, coalesce)"],
                vec![],
            ),
            (
                "[transport]\nconnect_timeout = \"3s\"\n",
                vec!["[transport]"],
                vec![],
            ),
            (
                "[api]\nlisten = \"127.0.0.1:9999\"\n",
                vec!["[api] (other than the tokens)"],
                vec![],
            ),
            ("[history]\nkeep = \"7d\"\n", vec!["[history]"], vec![]),
            ("[reconcile]\nevery = \"1h\"\n", vec!["[reconcile]"], vec![]),
        ];
        for (change, restart, live) in cases {
            // The change's section merged into the base: the later table wins per key.
            let new_text = merge(base, change);
            let old = config(base);
            let new = config(&new_text);
            assert_eq!(restart_needed(&old, &new), restart, "{change}");
            let got = live_changes(&old, &new);
            assert_eq!(got.len(), live.len(), "{change}: {got:?}");
            for (g, want) in got.iter().zip(&live) {
                assert!(g.starts_with(want), "{change}: {g} vs {want}");
            }
        }
        // [database] and alerts turned off.
        let old = config(base);
        let new = config("[database]\nurl = \"sqlite://b.db\"\n");
        assert_eq!(
            restart_needed(&old, &new),
            vec![
                "[database]",
                "[api] (turned on or off)",
                "[alerts] (turned on or off)"
            ]
        );
    }

    /// `base` with the keys of `change` put into their sections.
    fn merge(base: &str, change: &str) -> String {
        let mut doc: toml::Table = toml::from_str(base).unwrap();
        let extra: toml::Table = toml::from_str(change).unwrap();
        for (section, table) in extra {
            let entry = doc
                .entry(section)
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if let (toml::Value::Table(into), toml::Value::Table(from)) = (entry, table) {
                into.extend(from);
            }
        }
        toml::to_string(&doc).unwrap()
    }
}
