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
    let options = crate::store::ConnectOptions {
        max_connections: cfg.database.max_connections,
        statement_cache: cfg.database.statement_cache,
    };
    let store = Store::connect_with(&cfg.database.url, &options)
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

/// Raises the open files limit towards what the NAS, the API and the database may need,
/// and warns at start (stderr and the daemon log) when it stays short.
async fn descriptor_headroom(cfg: &Config, store: &Store, journal: &Journal) {
    let sessions: u64 = match store.nas_list().await {
        Ok(list) => list
            .iter()
            .filter(|n| n.enabled)
            .map(|n| n.max_sessions.max(1) as u64)
            .sum(),
        Err(_) => 0,
    };
    let need = crate::limits::Need {
        sessions,
        api: cfg.api.as_ref().map_or(0, |a| a.max_connections as u64),
        database: u64::from(cfg.database.max_connections),
    };
    if let Some(warning) = crate::limits::ensure(&need) {
        tracing::warn!("{warning}");
        journal.daemon(&format!("Warning: {warning}"));
    }
}

/// Opens the `[billing]` database and checks its queries. A query the database refuses
/// (or a column nasd cannot use) stops the start with the database's message; a
/// database that does not answer does not: its events wait (the check's error is
/// returned beside the handle, for the daemon log).
async fn open_billing(
    cfg: &crate::config::billing::BillingConfig,
) -> anyhow::Result<(
    crate::billing::Billing,
    Result<Vec<String>, crate::billing::BillingError>,
)> {
    let billing = crate::billing::Billing::connect_lazy(cfg)
        .map_err(|e| anyhow::anyhow!("[billing] {}: {e}", cfg.shown_url()))?;
    let checked = match tokio::time::timeout(
        cfg.connect_timeout + std::time::Duration::from_secs(10),
        billing.check(),
    )
    .await
    {
        Ok(Err(e)) if !e.is_unreachable() => {
            anyhow::bail!("[billing] {}: {e}", cfg.shown_url());
        }
        Ok(checked) => checked,
        Err(_) => Err(crate::billing::BillingError::Unreachable(
            "no answer to the check of the queries".into(),
        )),
    };
    if let Err(e) = &checked {
        tracing::warn!(
            "[billing] {}: {e}; events wait until it answers",
            cfg.shown_url()
        );
    }
    Ok((billing, checked))
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
    /// Its id in the cluster (`[cluster] name` or `<hostname>:<pid>`).
    pub daemon_id: String,
    /// The cluster's daemons as its last heartbeat saw them (PostgreSQL).
    pub members: Option<Arc<Mutex<Vec<crate::store::cluster::Member>>>>,
    /// Applies a reloaded config (SIGHUP).
    pub reloader: Arc<Mutex<crate::reload::Reloader>>,
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
    let sqlite_lock = crate::daemon_lock::lock_sqlite(&cfg.database.url)?;
    let store = open_store(&cfg).await?;
    // A schemes_dir that is not there, while an enabled NAS needs a scheme found in no
    // other directory, stops the start (a daemon of scripts alone needs none).
    let dirs = cfg.daemon.schemes_dirs();
    let (schemes, _) = crate::scheme::SchemeSet::load_dirs(&dirs);
    if let Some(problem) =
        crate::supervisor::schemes_dirs_problem(&dirs, &schemes, &store.nas_list().await?)
    {
        anyhow::bail!(problem);
    }
    let billing = match &cfg.billing {
        Some(billing_cfg) => Some(open_billing(billing_cfg).await?),
        None => None,
    };
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
        cfg.daemon.schemes_shown(),
        crate::duration::format_duration(cfg.daemon.resync_interval),
        api_addr.map_or("off".to_string(), |a| format!("on http://{a}"))
    ));
    descriptor_headroom(&cfg, &store, &journal).await;
    let stats = crate::stats::Stats::new();
    // `/status` and `/metrics` report the journal's failing files and dropped lines.
    stats.attach_journal(journal.health());
    // `[alerts]` as a watched value, so a SIGHUP can replace it.
    let alerts_live = cfg
        .alerts
        .as_ref()
        .map(|a| tokio::sync::watch::channel(Arc::new(a.clone())));
    let (alerts, alerts_join) = match &alerts_live {
        Some((_, rx)) => {
            let (alerts, join) = crate::alerts::start(
                rx.clone(),
                store.clone(),
                stats.clone(),
                journal.clone(),
                shutdown.clone(),
            );
            (alerts, Some(join))
        }
        None => (crate::alerts::Alerts::off(), None),
    };
    let (tuning_tx, tuning_rx) = tokio::sync::watch::channel(cfg.daemon.tuning());
    let reloader = Arc::new(Mutex::new(crate::reload::Reloader::new(
        cfg.clone(),
        journal.clone(),
        tuning_tx,
        alerts_live.map(|(tx, _)| tx),
    )));
    let billing = billing.map(|(billing, checked)| {
        let shown_url = billing.config().shown_url();
        match checked {
            Ok(lines) => {
                for line in lines {
                    journal.daemon(&format!("{line} (checked on {shown_url})"));
                }
            }
            Err(e) => journal.daemon(&format!(
                "billing database {shown_url} could not be checked at start ({e}); events wait until it answers"
            )),
        }
        let health =
            crate::billing::Health::new(journal.clone(), stats.clone(), alerts.clone(), shown_url);
        (billing, health)
    });
    // Every PostgreSQL daemon is a member of the cluster (of one, when alone); SQLite
    // is one daemon and serves every NAS.
    let identity = crate::cluster::Identity::new(&cfg.cluster, api_addr.map(|a| a.to_string()));
    let daemon_id = identity.id.clone();
    let devices: crate::cluster::Devices = Arc::default();
    let (fence, link, cluster, members) = match &store {
        Store::Postgres(_) => {
            let joining = crate::cluster::join(
                store.clone(),
                cfg.cluster.clone(),
                identity,
                journal.clone(),
                alerts.clone(),
                devices.clone(),
            )
            .await?;
            (
                joining.fence,
                joining.link,
                Some(joining.cluster),
                Some(joining.members),
            )
        }
        Store::Sqlite(_) => (
            crate::cluster::Fence::always(),
            crate::cluster::Link::single(),
            None,
            None,
        ),
    };
    let resync = Arc::new(tokio::sync::Notify::new());
    let shared = Arc::new(Shared {
        store: store.clone(),
        journal: journal.clone(),
        cfg: cfg.daemon.clone(),
        stats: stats.clone(),
        alerts,
        batches: crate::dispatch::batch::Batches::start(store.clone(), cfg.daemon.lease),
        fence,
        resync: resync.clone(),
        tuning: tuning_rx,
    });
    let wakers: Wakers = Arc::new(Mutex::new(HashMap::new()));
    // The console's recent history: one sampler per daemon, whatever the open pages.
    let series = crate::series::Series::new();
    let sampler = cfg.api.as_ref().map(|_| {
        tokio::spawn(crate::series::run(
            series.clone(),
            stats.clone(),
            store.clone(),
            shutdown.clone(),
        ))
    });
    let api = match (listener, &cfg.api) {
        (Some(listener), Some(api_cfg)) => {
            let state = Arc::new(crate::api::ApiState {
                store,
                stats: stats.clone(),
                cfg: api_cfg.clone(),
                daemon_id: daemon_id.clone(),
                console: crate::api::console::Console {
                    sessions: Default::default(),
                    series: series.clone(),
                    journal: Some(journal.clone()),
                    probe_owner: Some({
                        let wakers = wakers.clone();
                        Box::new(move |nas_id| {
                            let Ok(map) = wakers.lock() else {
                                return false;
                            };
                            map.get(&nas_id).map(|o| o.probe_now()).is_some()
                        })
                    }),
                    resync: Some(resync.clone()),
                    daemon: Some(cfg.daemon.clone()),
                    params_query: cfg.database.params_query.clone(),
                    billing: billing.as_ref().map(|(b, _)| b.clone()),
                    devices: Some(devices.clone()),
                    shutdown: shutdown.clone(),
                    stack: Default::default(),
                },
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
    let reconcile_params = cfg.database.params_query.clone();
    let reconcile = cfg.reconcile.clone();
    let history = cfg.history.clone();
    let supervisor_id = daemon_id.clone();
    let join = tokio::spawn(async move {
        let expander = crate::expand::Expander {
            store: shared.store.clone(),
            journal: shared.journal.clone(),
            params_query,
            batch: shared.cfg.expand_batch,
            poll: shared.cfg.poll_interval,
            listen: cfg.database.listen,
            billing: billing.clone(),
        };
        // `[billing] events_table` / `events_query`: events from the billing's own table.
        let source = billing.as_ref().and_then(|(billing, health)| {
            billing.config().events.as_ref()?;
            Some(tokio::spawn(crate::billing::source::run(
                crate::billing::source::Source {
                    store: shared.store.clone(),
                    billing: billing.clone(),
                    health: health.clone(),
                },
                shutdown.clone(),
            )))
        });
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
        let pruner = tokio::spawn(crate::prune::run(
            shared.store.clone(),
            shared.journal.clone(),
            history,
            shutdown.clone(),
        ));
        let reconciler = tokio::spawn(crate::reconcile::schedule(
            crate::reconcile::Scheduler {
                cfg: shared.cfg.clone(),
                rc: reconcile,
                store: shared.store.clone(),
                params_query: reconcile_params,
                billing: billing.as_ref().map(|(b, _)| b.clone()),
                journal: shared.journal.clone(),
                devices: devices.clone(),
                stats: shared.stats.clone(),
            },
            shutdown.clone(),
        ));
        let cluster_task = cluster.map(|c| tokio::spawn(c.run(shutdown.clone())));
        let supervisor = Supervisor::new(shared.clone(), wakers, link, &supervisor_id, devices);
        supervisor.run(shutdown.clone()).await;
        if let Some(task) = cluster_task {
            let _ = task.await;
        }
        let _ = expander.await;
        if let Some(source) = source {
            let _ = source.await;
        }
        if let Some((billing, _)) = &billing {
            billing.close().await;
        }
        let _ = pruner.await;
        let _ = reconciler.await;
        if let Some(sampler) = sampler {
            let _ = sampler.await;
        }
        if let Some(api) = api {
            let _ = api.await;
        }
        if let Some(alerts) = alerts_join {
            let _ = alerts.await;
        }
        journal.daemon("nasd stopped");
        let flushing = journal.clone();
        let _ = tokio::task::spawn_blocking(move || flushing.flush()).await;
        // Held until everything above has stopped, so the next daemon finds it free
        // only once this one is done with the database.
        drop(sqlite_lock);
    });
    Ok(Running {
        api_addr,
        stats,
        store: running_store,
        daemon_id,
        members,
        reloader,
        join,
    })
}
