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
//!
//! Layers: `crate::config::alerts` (what to send, templates), [`watch`] (pure
//! transitions), this file (the handle, the watcher loop and the sender), [`http`]
//! (the POST itself, one kept-alive reqwest client per sender).

pub mod http;
pub mod watch;

pub use crate::config::alerts::{
    Alert, AlertKind, AlertsConfig, RawAlerts, TelegramConfig, Url, WatchConfig, alerts_section,
    render, tls_config,
};
pub use http::{Poster, post_json};
pub use watch::{Found, Observation, Watcher};

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::journal::Journal;
use crate::stats::Stats;
use crate::store::Store;

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
    cfg: tokio::sync::watch::Receiver<Arc<AlertsConfig>>,
    store: Store,
    stats: Arc<Stats>,
    journal: Journal,
    shutdown: CancellationToken,
) -> (Alerts, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let alerts = Alerts { tx: Some(tx) };
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
    live: tokio::sync::watch::Receiver<Arc<AlertsConfig>>,
    store: Store,
    stats: Arc<Stats>,
    alerts: Alerts,
    journal: Journal,
    shutdown: CancellationToken,
) {
    let mut watcher = Watcher::default();
    let mut warned = false;
    loop {
        // The settings as the config says now (SIGHUP replaces them).
        let cfg = live.borrow().clone();
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
    mut live: tokio::sync::watch::Receiver<Arc<AlertsConfig>>,
    mut rx: mpsc::UnboundedReceiver<Alert>,
    journal: Journal,
    shutdown: CancellationToken,
) {
    // One client for every alert and destination, built again when a reload changes
    // the settings; should it not build, each delivery logs why.
    let mut cfg = live.borrow_and_update().clone();
    let mut poster = Poster::new(cfg.timeout, cfg.tls.as_ref());
    loop {
        let alert = tokio::select! {
            biased;
            a = rx.recv() => match a { Some(a) => a, None => return },
            _ = shutdown.cancelled() => break,
        };
        if live.has_changed().unwrap_or(false) {
            cfg = live.borrow_and_update().clone();
            poster = Poster::new(cfg.timeout, cfg.tls.as_ref());
        }
        deliver(&cfg, &poster, &alert, &journal).await;
    }
    // Shutting down: what is queued still goes out, within a short deadline.
    let deadline = Instant::now() + Duration::from_secs(5);
    while let Ok(alert) = rx.try_recv() {
        if tokio::time::timeout_at(deadline, deliver(&cfg, &poster, &alert, &journal))
            .await
            .is_err()
        {
            journal.daemon("alerts: shutdown deadline; undelivered alerts dropped");
            return;
        }
    }
}

async fn deliver(
    cfg: &AlertsConfig,
    poster: &Result<Poster, String>,
    alert: &Alert,
    journal: &Journal,
) {
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
        post_with_tries(cfg, poster, hook.expose(), &body, &dest, journal).await;
    }
    if let Some(tg) = &cfg.telegram {
        let url = format!("{}/bot{}/sendMessage", tg.api, tg.bot_token.expose());
        let body = serde_json::json!({
            "chat_id": tg.chat_id,
            "text": text,
            "disable_web_page_preview": true,
        })
        .to_string();
        post_with_tries(cfg, poster, &url, &body, "telegram", journal).await;
    }
}

/// Posts with up to `cfg.tries` tries, 1 s, 2 s, ... apart. Errors name `dest` (never
/// the address, which may hold a token).
async fn post_with_tries(
    cfg: &AlertsConfig,
    poster: &Result<Poster, String>,
    url: &str,
    body: &str,
    dest: &str,
    journal: &Journal,
) {
    let poster = match poster {
        Ok(p) => p,
        Err(e) => {
            journal.daemon(&format!("alerts: {dest}: {e}"));
            return;
        }
    };
    let mut wait = Duration::from_secs(1);
    for attempt in 1..=cfg.tries {
        match poster.post_json(url, body).await {
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
