//! `nasd run`: connects, migrates, opens the logs, and runs the expander and the
//! supervisor until the shutdown token fires.

use std::collections::HashMap;
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
    let store = open_store(&cfg).await?;
    let journal = Journal::open(&cfg.daemon.log_dir)
        .with_context(|| format!("opening log_dir {}", cfg.daemon.log_dir.display()))?;
    journal.daemon(&format!(
        "nasd {} started: database {}, schemes {}, resync every {}",
        env!("CARGO_PKG_VERSION"),
        store.backend_name(),
        cfg.daemon.schemes_dir.display(),
        crate::duration::format_duration(cfg.daemon.resync_interval)
    ));
    let shared = Arc::new(Shared {
        store,
        journal: journal.clone(),
        cfg: cfg.daemon.clone(),
    });
    let wakers: Wakers = Arc::new(Mutex::new(HashMap::new()));
    let expander = tokio::spawn(crate::expand::run(
        shared.clone(),
        cfg.database.params_query.clone(),
        wakers.clone(),
        shutdown.clone(),
    ));
    let supervisor = Supervisor::new(shared.clone(), wakers);
    supervisor.run(shutdown.clone()).await;
    let _ = expander.await;
    journal.daemon("nasd stopped");
    let flushing = journal.clone();
    let _ = tokio::task::spawn_blocking(move || flushing.flush()).await;
    Ok(())
}
