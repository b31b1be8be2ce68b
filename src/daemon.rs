//! `nasd run`: connects, migrates, opens the logs, and runs the expander, the
//! supervisor and (with `[api]`) the HTTP server until the shutdown token fires.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::dispatch::Shared;
use crate::journal::Journal;
use crate::store::Store;
use crate::supervisor::{Supervisor, Wakers};

/// Connects to the configured database and applies the migrations.
pub async fn open_store(cfg: &Config) -> anyhow::Result<Store> {
    let store = Store::connect(&cfg.database.url, cfg.database.max_connections)
        .await
        .with_context(|| format!("opening the {} database", backend_of(&cfg.database.url)))?;
    store.migrate().await?;
    Ok(store)
}

fn backend_of(url: &str) -> &'static str {
    if url.starts_with("sqlite:") {
        "sqlite"
    } else {
        "postgres"
    }
}

/// Runs the daemon until `shutdown` is cancelled; then stops claiming, lets in-flight
/// commands finish within the grace period and releases the rest.
pub async fn run(cfg: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    start(cfg, shutdown).await?.wait().await
}

/// A daemon started by `start`.
pub struct Running {
    /// Where the HTTP server listens (with `[api]` in the config).
    pub api_addr: Option<SocketAddr>,
    pub stats: Arc<crate::stats::Stats>,
    /// The daemon's database handle (benchmarks read its call counter).
    pub store: Store,
    join: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Waits until the daemon has stopped (after `shutdown` fired).
    pub async fn wait(self) -> anyhow::Result<()> {
        self.join
            .await
            .map_err(|e| anyhow::anyhow!("daemon task: {e}"))
    }
}

/// Connects, migrates, opens the logs and binds the HTTP server (errors here are
/// returned), then runs everything in the background until `shutdown` fires.
pub async fn start(cfg: Config, shutdown: CancellationToken) -> anyhow::Result<Running> {
    let store = open_store(&cfg).await?;
    let running_store = store.clone();
    let journal = Journal::open_with(&cfg.daemon.log_dir, &cfg.log)
        .with_context(|| format!("opening log_dir {}", cfg.daemon.log_dir.display()))?;
    let listener = match &cfg.api {
        Some(api) => Some(crate::api::bind(api.listen).await?),
        None => None,
    };
    let api_addr = listener.as_ref().and_then(|l| l.local_addr().ok());
    journal.daemon(&format!(
        "nasd {} started: database {}, schemes {}, resync every {}, api {}",
        env!("CARGO_PKG_VERSION"),
        store.backend_name(),
        cfg.daemon.schemes_dir.display(),
        crate::duration::format_duration(cfg.daemon.resync_interval),
        api_addr.map_or("off".to_string(), |a| format!("on http://{a}"))
    ));
    let stats = crate::stats::Stats::new();
    let (alerts, alerts_join) = match &cfg.alerts {
        Some(alerts_cfg) => {
            let (alerts, join) = crate::alerts::start(
                alerts_cfg.clone(),
                store.clone(),
                stats.clone(),
                journal.clone(),
                shutdown.clone(),
            );
            (alerts, Some(join))
        }
        None => (crate::alerts::Alerts::off(), None),
    };
    let shared = Arc::new(Shared {
        store: store.clone(),
        journal: journal.clone(),
        cfg: cfg.daemon.clone(),
        stats: stats.clone(),
        alerts,
        batches: crate::dispatch::batch::Batches::start(store.clone(), cfg.daemon.lease),
    });
    let api = match (listener, &cfg.api) {
        (Some(listener), Some(api_cfg)) => {
            let state = Arc::new(crate::api::ApiState {
                store,
                stats: stats.clone(),
                cfg: api_cfg.clone(),
            });
            Some(tokio::spawn(crate::api::serve(
                listener,
                state,
                shutdown.clone(),
            )))
        }
        _ => None,
    };
    let params_query = cfg.database.params_query.clone();
    let join = tokio::spawn(async move {
        let wakers: Wakers = Arc::new(Mutex::new(HashMap::new()));
        let expander = crate::expand::Expander {
            store: shared.store.clone(),
            journal: shared.journal.clone(),
            params_query,
            batch: shared.cfg.expand_batch,
            poll: shared.cfg.poll_interval,
        };
        let owners = wakers.clone();
        let wake = move |wake: crate::expand::Wake<'_>| {
            let Ok(w) = owners.lock() else {
                return;
            };
            match wake {
                crate::expand::Wake::Got(nas_ids) => {
                    for id in nas_ids {
                        if let Some(owner) = w.get(id) {
                            owner.notify();
                        }
                    }
                }
                crate::expand::Wake::Behind(heads) => {
                    for (id, max_id) in heads {
                        if let Some(owner) = w.get(id) {
                            owner.notify_if_behind(*max_id);
                        }
                    }
                }
            }
        };
        let expander = tokio::spawn(crate::expand::run(expander, wake, shutdown.clone()));
        let supervisor = Supervisor::new(shared.clone(), wakers);
        supervisor.run(shutdown.clone()).await;
        let _ = expander.await;
        if let Some(api) = api {
            let _ = api.await;
        }
        if let Some(alerts) = alerts_join {
            let _ = alerts.await;
        }
        journal.daemon("nasd stopped");
        let flushing = journal.clone();
        let _ = tokio::task::spawn_blocking(move || flushing.flush()).await;
    });
    Ok(Running {
        api_addr,
        stats,
        store: running_store,
        join,
    })
}
