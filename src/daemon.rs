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

/// SQLite is one daemon: `nasd run` holds an exclusive lock on `<database>.daemon.lock`
/// (with its pid inside) for as long as it runs; the kernel drops it when the process
/// ends, however it ends. None for PostgreSQL and in-memory databases.
fn lock_sqlite(url: &str) -> anyhow::Result<Option<std::fs::File>> {
    use std::io::{Read, Seek, Write};
    if !url.starts_with("sqlite:") {
        return Ok(None);
    }
    let opts: sqlx::sqlite::SqliteConnectOptions = url
        .parse()
        .with_context(|| "parsing [database] url".to_string())?;
    let db = opts.get_filename();
    if db.as_os_str().is_empty() || db.as_os_str() == ":memory:" {
        return Ok(None);
    }
    let mut lock_path = db.as_os_str().to_owned();
    lock_path.push(".daemon.lock");
    let lock_path = std::path::PathBuf::from(lock_path);
    if let Some(dir) = lock_path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&lock_path)
        .with_context(|| format!("opening {}", lock_path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            anyhow::bail!(
                "the SQLite database {} is in use by another `nasd run` (pid {}, lock {}): \
                 one SQLite database serves one daemon. To run several daemons on one \
                 queue, put nasd on PostgreSQL ([database] url = \"postgres://...\")",
                db.display(),
                if holder.is_empty() { "unknown" } else { holder },
                lock_path.display()
            );
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("locking {}", lock_path.display()));
        }
    }
    file.set_len(0)
        .and_then(|_| file.rewind())
        .and_then(|_| writeln!(file, "{}", std::process::id()))
        .with_context(|| format!("writing {}", lock_path.display()))?;
    Ok(Some(file))
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
    // Before anything else: a second daemon on the same SQLite file stops here.
    let sqlite_lock = lock_sqlite(&cfg.database.url)?;
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
        // Held until everything above has stopped; closing the file releases it.
        drop(sqlite_lock);
    });
    Ok(Running {
        api_addr,
        stats,
        store: running_store,
        join,
    })
}
