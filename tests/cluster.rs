//! The cluster chaos test (issue 13): several `nasd run` daemons (the real binary, one
//! config file, each in its own working directory so that their logs stay apart) share
//! one private PostgreSQL cluster and twelve NAS, each a `nasd sim` process reached over
//! SSH, telnet, the RouterOS API or RADIUS CoA, started with `--max-sessions` equal to
//! the NAS's `max_sessions`: a second daemon holding sessions to a NAS while its owner
//! does shows up as refused connections in the simulator's record. A feeder inserts
//! about 300 events/s while the harness, in turn:
//!
//! - kills a random daemon with SIGKILL and restarts it (its NAS are taken over after
//!   its lease);
//! - starts a fourth daemon mid-run (it takes its share, handed over by the others) and
//!   stops it with SIGTERM (it hands its NAS back, in-flight commands first);
//! - restarts PostgreSQL (immediate stop, start);
//! - freezes a daemon with SIGSTOP for twice the lease, then SIGCONT (it must stop
//!   everything, reload and rejoin). A frozen daemon keeps its TCP sessions open, so this
//!   phase runs against simulators restarted with room for two owners' sessions.
//!
//! Every command names its event and the ownership epoch of its NAS at the sender
//! (`comment=d{{ nas_epoch }}/{{ daemon }}`). Checked at the end, as tests/fault.rs
//! does: nothing lost, nothing unexpected, per-account order kept, repeats only of events
//! in flight at a fault; and per NAS the epoch of the recorded commands never goes back
//! (an older epoch after a newer one is a daemon sending after its lease ended), except
//! the commands a frozen daemon had in flight when it froze; no connection refused
//! outside the SIGSTOP phase. Figures (stderr, `--nocapture`; appended to the file
//! `NASD_CLUSTER_FIGURES` names): takeover after SIGKILL and after SIGSTOP (from the
//! signal to the first command of a new epoch on each NAS the daemon owned, from the
//! records' timestamps), handover on SIGTERM, events/s with 1, 2 and 3 daemons. Timings
//! are figures, never assertions.
//!
//! `kill_9_through_pgbouncer_session` runs the SIGKILL part with the daemons reaching
//! the tests' PostgreSQL on 127.0.0.1:5432 through PgBouncer in session mode.
//! `kill_9_through_pgbouncer_transaction` does the same in transaction mode (with
//! `statement_cache = false`, which runs every call in a transaction of its own with
//! unnamed statements, and `listen = false`).
//!
//! The short form (default, CI) takes a few minutes. `NASD_CLUSTER=long` runs the long
//! form (10 kills, two join/leave rounds, two restarts, two freezes, larger backlogs):
//! run it with `scripts/cluster.sh long`, which builds in release. `NASD_CLUSTER_SEED`
//! repeats a run's random choices; `NASD_CLUSTER_KEEP=1` keeps the work directories
//! (daemon logs, device records); `NASD_CLUSTER_LOG` is the daemons' `NASD_LOG`.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

use chrono::{DateTime, Utc};
use nasd::store::{Nas, Secret, Store};
use rand::Rng;
use rand::rngs::StdRng;
use sqlx::{PgPool, Row};
use tokio::time::Instant;

use common::harness::{
    ACCOUNTS_PER_NAS, Check, Daemon, Device, Feed, Feeder, Figures, Peer, PgCluster, Recorded,
    SimProc, add_accounts, harness_pool, percentile, publish, random_points, secs, verify_except,
};
use common::pgbouncer::{PgBouncer, PoolMode};
use common::{Backend, TestEnv};

/// The scenarios share the machine's two cores and must not overlap.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// `[cluster] lease` (and `[daemon] lease`, the claims' lease).
const LEASE: Duration = Duration::from_secs(3);
const HEARTBEAT: &str = "500ms";
/// NAS 1..=12: ssh, telnet, api, coa, ssh, ...
const NAS_COUNT: i64 = 12;
/// `n_workers` and `max_sessions` of every NAS, and each simulator's `--max-sessions`.
const WORKERS: i32 = 3;
/// Events per second billing sends, over all NAS.
const FEED_RATE: f64 = 300.0;
/// The daemons that run throughout; one more joins and leaves.
const DAEMONS: usize = 3;
/// How long any wait may take before the harness gives up (liveness, not speed).
const LIMIT: Duration = Duration::from_secs(300);
const FIGURES_ENV: &str = "NASD_CLUSTER_FIGURES";

// ---------------------------------------------------------------------------------------
// The two forms

#[derive(Debug, Clone)]
struct Form {
    name: &'static str,
    kill_events: i64,
    kills: usize,
    join_events: i64,
    /// Rounds of a fourth daemon joining, then leaving with SIGTERM.
    joins: usize,
    restart_events: i64,
    /// How long PostgreSQL stays down at each restart.
    pg_pauses: Vec<Duration>,
    stop_events: i64,
    stops: usize,
    /// Events per SIGKILL run through PgBouncer.
    bouncer_events: i64,
    bouncer_kills: usize,
    /// The backlog drained with 1, 2 and 3 daemons.
    backlog: i64,
}

fn form() -> Form {
    match std::env::var("NASD_CLUSTER").as_deref() {
        Ok("long") => Form {
            name: "long",
            kill_events: 30_000,
            kills: 10,
            join_events: 9_000,
            joins: 2,
            restart_events: 9_000,
            pg_pauses: vec![Duration::from_secs(2), Duration::from_secs(8)],
            stop_events: 9_000,
            stops: 2,
            bouncer_events: 15_000,
            bouncer_kills: 5,
            backlog: 20_000,
        },
        _ => Form {
            name: "short",
            kill_events: 6_000,
            kills: 3,
            join_events: 3_000,
            joins: 1,
            restart_events: 3_000,
            pg_pauses: vec![Duration::from_secs(6)],
            stop_events: 3_000,
            stops: 1,
            bouncer_events: 4_500,
            bouncer_kills: 3,
            backlog: 3_000,
        },
    }
}

fn seeded_rng(scenario: &str) -> StdRng {
    common::harness::seeded_rng(&format!("cluster {scenario}"), "NASD_CLUSTER_SEED")
}

/// One address-list entry (or CoA) per event, naming the event, the ownership epoch of
/// the NAS at the sender and the sender; a repeat is answered "already have such
/// entry", which counts as done.
const SCHEMES: &[(&str, &str)] = &[
    (
        "cluster-ssh",
        r#"description = "cluster harness: one address-list entry per event, over SSH"
transport = "ssh"
mode = "exec"
dialect = "routeros"
timeout = "10s"
[commands]
user_accept = ["/ip firewall address-list add list=ev{{ event_id }} address={{ ip }} comment=d{{ nas_epoch }}/{{ daemon }}"]
[answers]
failure = ["^failure:", "no such item", "^bad command name", "^syntax error", "^expected "]
[answers.benign]
user_accept = ["already have such entry"]
"#,
    ),
    (
        "cluster-telnet",
        r#"description = "cluster harness: one address-list entry per event, over telnet"
transport = "telnet"
dialect = "routeros"
timeout = "10s"
prompt = '^\[[^\]]+\] >\s?$'
[commands]
user_accept = ["/ip firewall address-list add list=ev{{ event_id }} address={{ ip }} comment=d{{ nas_epoch }}/{{ daemon }}"]
[answers]
failure = ["^failure:", "no such item", "^bad command name", "^syntax error", "^expected "]
[answers.benign]
user_accept = ["already have such entry"]
"#,
    ),
    (
        "cluster-api",
        r#"description = "cluster harness: one address-list entry per event, over the API"
transport = "api"
dialect = "routeros"
timeout = "10s"
[commands]
user_accept = ["/ip/firewall/address-list/add =list=ev{{ event_id }} =address={{ ip }} =comment=d{{ nas_epoch }}/{{ daemon }}"]
[answers]
failure = ["^failure:", "no such item", "no such command"]
[answers.benign]
user_accept = ["already have such entry"]
"#,
    ),
    (
        "cluster-coa",
        r#"description = "cluster harness: one CoA per event, naming it in Filter-Id (the epoch in the address list)"
transport = "radius"
dialect = "radius"
timeout = "5s"
[commands]
user_accept = ["coa User-Name = {{ login }}, Acct-Session-Id = {{ login }}, Mikrotik-Address-List = d{{ nas_epoch }}/{{ daemon }}, Filter-Id = ev{{ event_id }}"]
"#,
    ),
];

// ---------------------------------------------------------------------------------------
// One run: database, devices, daemons

enum Database {
    /// A private cluster the harness may stop and start.
    Private(PgCluster),
    /// A fresh database on the tests' server, reached by the daemons through PgBouncer
    /// (the harness itself connects directly).
    Bouncer { _bouncer: PgBouncer, _env: TestEnv },
}

struct ClusterRun {
    name: &'static str,
    db: Database,
    pool: PgPool,
    devices: Vec<Device>,
    /// Slots 0..DAEMONS run throughout (restarted after kills); slot DAEMONS is the
    /// daemon that joins and leaves.
    daemons: Vec<Daemon>,
    /// Cluster ids by process id (`<hostname>:<pid>`, read from `nasd_daemons`).
    ids: HashMap<u32, String>,
    work: tempfile::TempDir,
    seed: u64,
    /// Phases by name and time span, to say where a finding happened.
    phases: Vec<(String, DateTime<Utc>, DateTime<Utc>)>,
}

impl ClusterRun {
    /// Database, schemes, NAS and simulators, the config file, and `initial` daemons
    /// started (not yet settled).
    async fn start(
        name: &'static str,
        pooler: Option<PoolMode>,
        initial: usize,
        rng: &mut StdRng,
    ) -> ClusterRun {
        let (db, url, daemon_url) = if let Some(mode) = pooler {
            let env = TestEnv::new(Backend::Postgres).await;
            let database = env
                .url
                .rsplit('/')
                .next()
                .expect("database name")
                .to_string();
            // Session mode holds a server connection per client connection: room for
            // four daemons' pools.
            let bouncer = PgBouncer::start(&database, mode, 40).await;
            let daemon_url = bouncer.url();
            let url = env.url.clone();
            (
                Database::Bouncer {
                    _bouncer: bouncer,
                    _env: env,
                },
                url,
                daemon_url,
            )
        } else {
            let pg = PgCluster::start_with(150);
            let admin = harness_pool(&pg.url("postgres")).await;
            sqlx::query("CREATE DATABASE nasd")
                .execute(&admin)
                .await
                .expect("create database");
            admin.close().await;
            let url = pg.url("nasd");
            (Database::Private(pg), url.clone(), url)
        };
        // Kept (even when the run panics) with NASD_CLUSTER_KEEP.
        let keep = std::env::var("NASD_CLUSTER_KEEP").is_ok();
        let work = tempfile::Builder::new()
            .disable_cleanup(keep)
            .tempdir()
            .expect("work dir");
        if keep {
            eprintln!("cluster {name}: work directory {}", work.path().display());
        }
        let dir = work.path();
        for (scheme, toml) in SCHEMES {
            std::fs::create_dir_all(dir.join("schemes").join(scheme)).expect("scheme dir");
            std::fs::write(dir.join("schemes").join(scheme).join("scheme.toml"), toml)
                .expect("scheme.toml");
        }
        let kinds: [(&'static str, &str); 4] = [
            ("sim ssh", "cluster-ssh"),
            ("sim telnet", "cluster-telnet"),
            ("sim api", "cluster-api"),
            ("sim coa", "cluster-coa"),
        ];
        let mut devices = Vec::new();
        for id in 1..=NAS_COUNT {
            let (label, scheme) = kinds[(id as usize - 1) % kinds.len()];
            let listen = format!("127.0.0.{}", id + 1);
            let sim =
                SimProc::start_with(dir, &format!("nas{id}"), &listen, "5ms", WORKERS as usize);
            let p = sim.ports();
            let port = match scheme {
                "cluster-ssh" => p.ssh,
                "cluster-telnet" => p.telnet,
                "cluster-api" => p.api,
                _ => p.coa,
            };
            let mut nas = Nas::new(id, &format!("{label} {id}"), &listen);
            nas.scheme = Some(scheme.into());
            nas.port = Some(i32::from(port));
            nas.login = Some("admin".into());
            nas.password = Some(Secret::new("admin"));
            nas.secret = Some(Secret::new("testing123"));
            nas.n_workers = WORKERS;
            nas.max_sessions = WORKERS;
            nas.host_key_policy = "accept-new".into();
            devices.push(Device {
                nas,
                label,
                peer: Peer::Sim(sim),
            });
        }
        let store = Store::connect(&url, 2).await.expect("connect");
        store.migrate().await.expect("migrate");
        for d in &devices {
            store.nas_upsert(&d.nas).await.expect("nas");
        }
        add_accounts(&store, NAS_COUNT).await;
        drop(store);

        // One config for every daemon; the relative paths (logs, known hosts) resolve in
        // each daemon's own working directory.
        let pooler = if pooler == Some(PoolMode::Transaction) {
            "statement_cache = false\nlisten = false\n"
        } else {
            ""
        };
        let config = dir.join("nasd.toml");
        std::fs::write(
            &config,
            format!(
                "[database]\nurl = \"{daemon_url}\"\nmax_connections = 6\n{pooler}\
                 [daemon]\nlog_dir = \"log\"\nschemes_dir = \"{schemes}\"\n\
                 resync_interval = \"1s\"\npoll_interval = \"100ms\"\nretry_base = \"100ms\"\n\
                 retry_cap = \"2s\"\nlease = \"{lease}\"\nmax_attempts = 10\nshutdown_grace = \"5s\"\n\
                 [transport]\nknown_hosts = \"known_hosts\"\n\
                 [cluster]\nlease = \"{lease}\"\nheartbeat = \"{HEARTBEAT}\"\n",
                schemes = dir.join("schemes").display(),
                lease = format_args!("{}s", LEASE.as_secs()),
            ),
        )
        .expect("config");
        let daemons: Vec<Daemon> = (0..=DAEMONS)
            .map(|slot| {
                let home = dir.join(format!("d{}", slot + 1));
                std::fs::create_dir_all(&home).expect("daemon dir");
                let mut d =
                    Daemon::new(config.clone(), home.join("stderr.log"), "NASD_CLUSTER_LOG");
                d.dir = Some(home);
                d
            })
            .collect();
        let mut run = ClusterRun {
            name,
            pool: harness_pool(&url).await,
            db,
            devices,
            daemons,
            ids: HashMap::new(),
            work,
            seed: rng.random(),
            phases: Vec::new(),
        };
        for slot in 0..initial {
            run.daemons[slot].spawn();
        }
        run
    }

    fn pg(&self) -> &PgCluster {
        match &self.db {
            Database::Private(pg) => pg,
            Database::Bouncer { .. } => panic!("{}: no private cluster", self.name),
        }
    }

    fn feeder(&self, total: i64, phase: u64) -> Feeder {
        let modes = (1..=NAS_COUNT)
            .map(|id| (id, Feed::Rate(FEED_RATE / NAS_COUNT as f64)))
            .collect();
        Feeder::start(self.pool.clone(), modes, Some(total), self.seed ^ phase)
    }

    fn check_alive(&mut self) {
        for d in &mut self.daemons {
            d.check_alive();
        }
    }

    /// The last lines of every daemon's stderr and journal, for a failure message.
    fn log_tails(&self) -> String {
        let mut out = String::new();
        for (slot, d) in self.daemons.iter().enumerate() {
            let journal = journal_text(d);
            let lines: Vec<&str> = journal.lines().collect();
            out.push_str(&format!(
                "--- daemon slot {slot} stderr:\n{}\n--- its journal:\n{}\n",
                d.log_tail(),
                lines[lines.len().saturating_sub(15)..].join("\n")
            ));
        }
        out
    }

    /// Waits (polling; database errors count as "not yet") until `check` holds.
    async fn wait_until<F, Fut>(&mut self, limit: Duration, what: &str, mut check: F)
    where
        F: FnMut(PgPool) -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = Instant::now() + limit;
        loop {
            self.check_alive();
            if check(self.pool.clone()).await {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "{}: timed out after {limit:?} waiting for {what}\n{}",
                    self.name,
                    self.log_tails()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn wait_history(&mut self, n: i64) {
        self.wait_until(
            LIMIT,
            &format!("{n} events in history"),
            |pool| async move {
                sqlx::query_scalar::<_, i64>("SELECT count(*) FROM events_history")
                    .fetch_one(&pool)
                    .await
                    .is_ok_and(|c| c >= n)
            },
        )
        .await;
    }

    /// The cluster id of the daemon in `slot` (waits until it has joined).
    async fn daemon_id(&mut self, slot: usize) -> String {
        let pid = self.daemons[slot].pid().expect("daemon running");
        if let Some(id) = self.ids.get(&pid) {
            return id.clone();
        }
        let found = std::sync::Arc::new(std::sync::Mutex::new(None));
        let into = found.clone();
        self.wait_until(LIMIT, &format!("daemon pid {pid} to join"), move |pool| {
            let into = into.clone();
            async move {
                let id: Option<String> = sqlx::query_scalar(
                    "SELECT id FROM nasd_daemons WHERE pid = $1 AND state = 'live' \
                     ORDER BY started_at DESC LIMIT 1",
                )
                .bind(pid as i32)
                .fetch_optional(&pool)
                .await
                .ok()
                .flatten();
                let joined = id.is_some();
                *into.lock().expect("id") = id;
                joined
            }
        })
        .await;
        let id = found.lock().expect("id").clone().expect("joined");
        self.ids.insert(pid, id.clone());
        id
    }

    /// The NAS a daemon validly owns now, with their epochs.
    async fn owned(&self, daemon: &str) -> BTreeMap<i64, i64> {
        sqlx::query(&format!(
            "SELECT o.nas_id, o.epoch FROM nas_owner o WHERE o.daemon_id = $1 AND {VALID}"
        ))
        .bind(daemon)
        .fetch_all(&self.pool)
        .await
        .expect("nas_owner")
        .iter()
        .map(|r| (r.get::<i64, _>("nas_id"), r.get::<i64, _>("epoch")))
        .collect()
    }

    /// Waits until the cluster is the running daemons and every NAS is owned by the
    /// daemon rendezvous hashing gives it to (joins, leaves and takeovers done).
    async fn wait_settled(&mut self) {
        let mut expected = Vec::new();
        for slot in 0..self.daemons.len() {
            if self.daemons[slot].is_running() {
                expected.push(self.daemon_id(slot).await);
            }
        }
        expected.sort();
        self.wait_until(
            LIMIT,
            &format!("the cluster to settle on {expected:?}"),
            |pool| {
                let expected = expected.clone();
                async move { settled(&pool, &expected).await.unwrap_or(false) }
            },
        )
        .await;
    }

    /// A random running daemon among slots `0..n` that owns at least one NAS (any
    /// running one if none does).
    async fn pick(&mut self, rng: &mut StdRng, n: usize) -> usize {
        let mut owners = Vec::new();
        let mut running = Vec::new();
        for slot in 0..n {
            if !self.daemons[slot].is_running() {
                continue;
            }
            running.push(slot);
            let id = self.daemon_id(slot).await;
            if !self.owned(&id).await.is_empty() {
                owners.push(slot);
            }
        }
        let from = if owners.is_empty() { running } else { owners };
        from[rng.random_range(0..from.len())]
    }

    /// Events claimed (in flight) on these NAS now, with their NAS.
    async fn running_on(&self, nas: &[i64]) -> Vec<(i64, i64)> {
        sqlx::query(
            "SELECT id, nas_id FROM events_stack WHERE state = 'running' AND nas_id = ANY($1)",
        )
        .bind(nas)
        .fetch_all(&self.pool)
        .await
        .unwrap_or_default()
        .iter()
        .map(|r| (r.get::<i64, _>("id"), r.get::<i64, _>("nas_id")))
        .collect()
    }

    /// Waits for the feeder's last insert, then for every event of the run to be done.
    async fn drain(&mut self, feeder: Feeder, tally: &mut Tally) {
        self.wait_until(LIMIT, "the feeder", |_| {
            let done = feeder.done();
            async move { done }
        })
        .await;
        let confirmed = feeder.finish().await;
        tally.confirmed.extend(confirmed);
        self.wait_history(tally.confirmed.len() as i64).await;
    }

    /// Time from `since` to the first event finished after it.
    async fn resumed(&mut self, since: DateTime<Utc>) -> Duration {
        let first = std::sync::Arc::new(std::sync::Mutex::new(None));
        let into = first.clone();
        self.wait_until(
            LIMIT,
            &format!("an event finished after {since}"),
            move |pool| {
                let into = into.clone();
                async move {
                    let t: Option<DateTime<Utc>> = sqlx::query_scalar(
                        "SELECT min(finished_at) FROM events_history WHERE finished_at > $1",
                    )
                    .bind(since)
                    .fetch_one(&pool)
                    .await
                    .ok()
                    .flatten();
                    let found = t.is_some();
                    *into.lock().expect("first") = t;
                    found
                }
            },
        )
        .await;
        let t = first.lock().expect("first").expect("found");
        (t - since).to_std().unwrap_or_default()
    }

    fn phase(&mut self, name: &str, from: DateTime<Utc>) {
        self.phases.push((name.to_string(), from, Utc::now()));
    }

    /// Which phase a record time falls in.
    fn phase_at(&self, ms: i64) -> String {
        self.phases
            .iter()
            .find(|(_, from, to)| from.timestamp_millis() <= ms && ms <= to.timestamp_millis())
            .map_or_else(|| "between phases".to_string(), |(n, _, _)| n.clone())
    }

    fn finish(self) {
        let ClusterRun {
            name,
            work,
            daemons,
            devices,
            db,
            pool,
            ..
        } = self;
        drop(daemons);
        drop(devices);
        drop(pool);
        drop(db);
        if std::env::var("NASD_CLUSTER_KEEP").is_ok() {
            eprintln!(
                "cluster {name}: work directory kept at {}",
                work.path().display()
            );
        }
    }
}

/// A valid ownership (as the daemons define it): the row names a daemon's current
/// session with an unexpired lease.
const VALID: &str = "EXISTS (SELECT 1 FROM nasd_daemons d WHERE d.id = o.daemon_id \
     AND d.session = o.session AND d.lease_until > now() AND d.state IN ('live', 'draining'))";

/// Whether the live daemons are exactly `expected` and every NAS is validly owned by
/// the one rendezvous hashing gives it to.
async fn settled(pool: &PgPool, expected: &[String]) -> Result<bool, sqlx::Error> {
    let mut live: Vec<String> = sqlx::query_scalar(
        "SELECT id FROM nasd_daemons WHERE state = 'live' AND lease_until > now() ORDER BY id",
    )
    .fetch_all(pool)
    .await?;
    live.sort();
    if live != expected {
        return Ok(false);
    }
    let owners: HashMap<i64, String> = sqlx::query(&format!(
        "SELECT o.nas_id, o.daemon_id FROM nas_owner o WHERE {VALID}"
    ))
    .fetch_all(pool)
    .await?
    .iter()
    .map(|r| (r.get("nas_id"), r.get("daemon_id")))
    .collect();
    Ok((1..=NAS_COUNT).all(|nas| {
        owners.get(&nas).map(String::as_str) == nasd::cluster::plan::owner_of(nas, &live)
    }))
}

fn journal_path(d: &Daemon) -> PathBuf {
    d.dir
        .as_ref()
        .expect("daemon dir")
        .join("log")
        .join("nas_event_daemon.log")
}

/// The daemon's journal (`log/nas_event_daemon.log` in its working directory).
fn journal_text(d: &Daemon) -> String {
    std::fs::read_to_string(journal_path(d)).unwrap_or_default()
}

// ---------------------------------------------------------------------------------------
// What the phases gather

/// A change of owner the harness caused: the daemon, when, and what it owned then.
struct Change {
    what: String,
    daemon: String,
    at: DateTime<Utc>,
    owned: BTreeMap<i64, i64>,
}

#[derive(Default)]
struct Tally {
    confirmed: Vec<i64>,
    /// Events in flight at a fault: only they may reach a device twice.
    in_flight: HashSet<i64>,
    faults: Vec<String>,
    kills: Vec<Change>,
    leaves: Vec<Change>,
    stops: Vec<Change>,
    /// The NAS a joining daemon took: (join time, daemon, NAS and epochs).
    joins: Vec<Change>,
    /// (stopped, back) of each PostgreSQL restart.
    pg_restarts: Vec<(DateTime<Utc>, DateTime<Utc>)>,
    pg_resumes: Vec<Duration>,
    /// Commands a frozen daemon had in flight: (NAS, epoch, event) may come late.
    stale_allowed: HashSet<(i64, i64, i64)>,
    /// Record times in which simulators may refuse (the SIGSTOP phase).
    refusals_allowed: Vec<(i64, i64)>,
    /// SIGTERM exits: how long, and the status.
    exits: Vec<(Duration, String)>,
    notes: Vec<String>,
}

/// From the signal to the first command of a newer epoch on each NAS the daemon owned
/// (None for a NAS that got no command afterwards).
fn takeovers(
    records: &HashMap<i64, Vec<Recorded>>,
    change: &Change,
) -> Vec<(i64, Option<Duration>)> {
    let at = change.at.timestamp_millis();
    change
        .owned
        .iter()
        .map(|(nas, epoch)| {
            let first = records.get(nas).and_then(|rs| {
                rs.iter()
                    .filter(|r| !r.is_refusal() && r.ms >= at)
                    .find(|r| r.epoch().is_some_and(|e| e > *epoch))
            });
            (
                *nas,
                first.map(|r| Duration::from_millis((r.ms - at).max(0) as u64)),
            )
        })
        .collect()
}

fn describe_changes(
    title: &str,
    records: &HashMap<i64, Vec<Recorded>>,
    changes: &[Change],
) -> (String, Vec<Duration>) {
    let mut all = Vec::new();
    let mut parts = Vec::new();
    for c in changes {
        let t = takeovers(records, c);
        let got: Vec<Duration> = t.iter().filter_map(|(_, d)| *d).collect();
        let missing = t.len() - got.len();
        parts.push(format!(
            "{} {} ({} NAS{}): p50 {} max {}",
            c.what,
            c.daemon,
            t.len(),
            if missing > 0 {
                format!(", {missing} with no command after")
            } else {
                String::new()
            },
            secs(percentile(&got, 0.5)),
            secs(percentile(&got, 1.0)),
        ));
        all.extend(got);
    }
    (
        format!(
            "{title}: p50 {} / max {} over {} NAS; {}",
            secs(percentile(&all, 0.5)),
            secs(percentile(&all, 1.0)),
            all.len(),
            parts.join("; ")
        ),
        all,
    )
}

/// Every device's record, by NAS id.
fn all_records(run: &ClusterRun) -> HashMap<i64, Vec<Recorded>> {
    run.devices
        .iter()
        .map(|d| (d.nas.id, d.records()))
        .collect()
}

/// Per NAS, commands whose epoch is older than one recorded before them (not allowed
/// ones), commands without an epoch, and the allowed late commands of a frozen daemon.
/// Commands of an older epoch recorded after a newer one: those not allowed (as text),
/// the number without an epoch, and the allowed late ones (record lines per NAS: a
/// frozen daemon's command for an event it had claimed, written as it woke).
fn epoch_regressions(
    run: &ClusterRun,
    records: &HashMap<i64, Vec<Recorded>>,
    allowed: &HashSet<(i64, i64, i64)>,
) -> (Vec<String>, usize, HashMap<i64, HashSet<String>>) {
    let mut bad = Vec::new();
    let mut without = 0;
    let mut late: HashMap<i64, HashSet<String>> = HashMap::new();
    let mut ids: Vec<&i64> = records.keys().collect();
    ids.sort();
    for nas in ids {
        let mut newest: Option<&Recorded> = None;
        for r in records[nas].iter().filter(|r| !r.is_refusal()) {
            let Some(epoch) = r.epoch() else {
                without += 1;
                continue;
            };
            match newest {
                Some(n) if n.epoch().is_some_and(|e| epoch < e) => {
                    if r.event()
                        .is_some_and(|ev| allowed.contains(&(*nas, epoch, ev)))
                    {
                        late.entry(*nas)
                            .or_default()
                            .insert(format!("{} {} {}", r.ms, r.kind, r.text));
                    } else {
                        bad.push(format!(
                            "NAS {nas} ({}): `{} {} {}` after `{} {} {}`",
                            run.phase_at(r.ms),
                            r.ms,
                            r.kind,
                            r.text,
                            n.ms,
                            n.kind,
                            n.text
                        ));
                    }
                }
                _ => newest = Some(r),
            }
        }
    }
    (bad, without, late)
}

/// Connections refused outside the windows where refusals are allowed.
fn refusals_outside(
    run: &ClusterRun,
    records: &HashMap<i64, Vec<Recorded>>,
    allowed: &[(i64, i64)],
) -> (Vec<String>, usize) {
    let mut bad = Vec::new();
    let mut inside = 0;
    let mut ids: Vec<&i64> = records.keys().collect();
    ids.sort();
    for nas in ids {
        for r in records[nas].iter().filter(|r| r.is_refusal()) {
            if allowed.iter().any(|(a, b)| *a <= r.ms && r.ms <= *b) {
                inside += 1;
            } else {
                bad.push(format!(
                    "NAS {nas} ({}): `{} refused {}`",
                    run.phase_at(r.ms),
                    r.ms,
                    r.text
                ));
            }
        }
    }
    (bad, inside)
}

/// Events with a command recorded before `back` and done only after `stopped`: in
/// flight while the database was away.
async fn in_flight_across(
    pool: &PgPool,
    records: &HashMap<i64, Vec<Recorded>>,
    stopped: DateTime<Utc>,
    back: DateTime<Utc>,
) -> HashSet<i64> {
    let late: HashSet<i64> = sqlx::query_scalar::<_, Option<i64>>(
        "SELECT event_id FROM events_history WHERE finished_at > $1",
    )
    .bind(stopped)
    .fetch_all(pool)
    .await
    .expect("history")
    .into_iter()
    .flatten()
    .collect();
    let back = back.timestamp_millis();
    records
        .values()
        .flatten()
        .filter(|r| !r.is_refusal() && r.ms < back)
        .filter_map(Recorded::event)
        .filter(|ev| late.contains(ev))
        .collect()
}

/// "Lease lost" lines in a daemon's journal.
fn leases_lost(d: &Daemon) -> usize {
    journal_text(d).matches("Lease lost").count()
}

// ---------------------------------------------------------------------------------------
// The phases

/// SIGKILL of a random daemon at random points, each restarted at once.
async fn kill_phase(
    run: &mut ClusterRun,
    rng: &mut StdRng,
    events: i64,
    kills: usize,
    tally: &mut Tally,
) {
    let from = Utc::now();
    let base = tally.confirmed.len() as i64;
    let feeder = run.feeder(events, 1);
    for point in random_points(rng, kills, 0.05, 0.9) {
        run.wait_history(base + (point * events as f64) as i64)
            .await;
        // Each kill finds the cluster whole again (the previous one taken over).
        run.wait_settled().await;
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..250))).await;
        let slot = run.pick(rng, DAEMONS).await;
        let daemon = run.daemon_id(slot).await;
        let owned = run.owned(&daemon).await;
        let at = Utc::now();
        run.daemons[slot].kill9();
        // Rows a dead daemon left `running` are exactly the attempts it had in flight.
        let nas: Vec<i64> = owned.keys().copied().collect();
        tally
            .in_flight
            .extend(run.running_on(&nas).await.into_iter().map(|(id, _)| id));
        run.daemons[slot].spawn();
        tally.kills.push(Change {
            what: format!("kill {}", tally.kills.len() + 1),
            daemon,
            at,
            owned,
        });
    }
    run.drain(feeder, tally).await;
    tally.faults.push(format!("{kills} SIGKILL"));
    run.phase("SIGKILL", from);
}

/// A fourth daemon joins, takes its share, and leaves with SIGTERM.
async fn join_leave_phase(
    run: &mut ClusterRun,
    rng: &mut StdRng,
    events: i64,
    rounds: usize,
    tally: &mut Tally,
) {
    let from = Utc::now();
    let base = tally.confirmed.len() as i64;
    let feeder = run.feeder(events, 2);
    let points = random_points(rng, rounds * 2, 0.1, 0.9);
    for pair in points.chunks(2) {
        run.wait_history(base + (pair[0] * events as f64) as i64)
            .await;
        run.wait_settled().await;
        let joined_at = Utc::now();
        run.daemons[DAEMONS].spawn();
        let daemon = run.daemon_id(DAEMONS).await;
        run.wait_settled().await;
        let took = run.owned(&daemon).await;
        tally.joins.push(Change {
            what: format!("join {}", tally.joins.len() + 1),
            daemon: daemon.clone(),
            at: joined_at,
            owned: took.clone(),
        });
        run.wait_history(base + (pair[1] * events as f64) as i64)
            .await;
        run.wait_settled().await;
        let owned = run.owned(&daemon).await;
        let at = Utc::now();
        let status = run.daemons[DAEMONS]
            .terminate(Duration::from_secs(60))
            .await;
        let took_to_exit = (Utc::now() - at).to_std().unwrap_or_default();
        tally.exits.push((
            took_to_exit,
            status.map_or("killed after 60 s".into(), |s| s.to_string()),
        ));
        tally.leaves.push(Change {
            what: format!("leave {}", tally.leaves.len() + 1),
            daemon,
            at,
            owned,
        });
        run.wait_settled().await;
    }
    run.drain(feeder, tally).await;
    tally.faults.push(format!("{rounds} join + SIGTERM"));
    run.phase("join/leave", from);
}

/// PostgreSQL stopped the way a crash would and started again.
async fn pg_restart_phase(
    run: &mut ClusterRun,
    rng: &mut StdRng,
    events: i64,
    pauses: &[Duration],
    tally: &mut Tally,
) {
    let from = Utc::now();
    let base = tally.confirmed.len() as i64;
    let feeder = run.feeder(events, 3);
    let points = random_points(rng, pauses.len(), 0.15, 0.85);
    for (point, pause) in points.into_iter().zip(pauses) {
        run.wait_history(base + (point * events as f64) as i64)
            .await;
        run.wait_settled().await;
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..250))).await;
        let all: Vec<i64> = (1..=NAS_COUNT).collect();
        tally
            .in_flight
            .extend(run.running_on(&all).await.into_iter().map(|(id, _)| id));
        let stopped = Utc::now();
        run.pg().stop_immediate();
        tokio::time::sleep(*pause).await;
        run.check_alive();
        run.pg().start_server();
        let back = Utc::now();
        tally.pg_restarts.push((stopped, back));
        let resumed = run.resumed(back).await;
        tally.pg_resumes.push(resumed);
        run.wait_settled().await;
    }
    run.drain(feeder, tally).await;
    tally.faults.push(format!(
        "PostgreSQL restarts down {}",
        pauses
            .iter()
            .map(|d| secs(*d))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    run.phase("PostgreSQL restart", from);
}

/// A daemon frozen for twice the lease, against simulators with room for two owners'
/// sessions.
async fn stop_phase(
    run: &mut ClusterRun,
    rng: &mut StdRng,
    events: i64,
    stops: usize,
    tally: &mut Tally,
) {
    let from = Utc::now();
    // Nothing is in flight (the previous phase drained): restart every simulator with
    // room for the frozen daemon's sessions and the new owner's.
    for d in &mut run.devices {
        if let Peer::Sim(sim) = &mut d.peer {
            sim.kill();
            sim.max_sessions = 2 * WORKERS as usize;
            sim.spawn();
        }
    }
    let base = tally.confirmed.len() as i64;
    let feeder = run.feeder(events, 4);
    for point in random_points(rng, stops, 0.1, 0.7) {
        run.wait_history(base + (point * events as f64) as i64)
            .await;
        run.wait_settled().await;
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..250))).await;
        let slot = run.pick(rng, DAEMONS).await;
        let daemon = run.daemon_id(slot).await;
        let owned = run.owned(&daemon).await;
        let lost_before = leases_lost(&run.daemons[slot]);
        let at = Utc::now();
        run.daemons[slot].signal("STOP");
        let nas: Vec<i64> = owned.keys().copied().collect();
        // What it had claimed: now, and once more after a claim it sent just before
        // freezing has surely been answered by the database.
        let mut frozen = run.running_on(&nas).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        frozen.extend(run.running_on(&nas).await);
        tokio::time::sleep(2 * LEASE - Duration::from_secs(1)).await;
        run.daemons[slot].signal("CONT");
        for (event, nas) in frozen {
            tally.in_flight.insert(event);
            if let Some(epoch) = owned.get(&nas) {
                tally.stale_allowed.insert((nas, *epoch, event));
            }
        }
        tally.stops.push(Change {
            what: format!("SIGSTOP {}", tally.stops.len() + 1),
            daemon: daemon.clone(),
            at,
            owned,
        });
        // An operator sees it in its journal.
        let journal = journal_path(&run.daemons[slot]);
        run.wait_until(
            LIMIT,
            &format!("daemon {daemon} to log \"Lease lost\" after SIGCONT"),
            |_| {
                let n = std::fs::read_to_string(&journal)
                    .unwrap_or_default()
                    .matches("Lease lost")
                    .count();
                async move { n > lost_before }
            },
        )
        .await;
        // It rejoined under a new session: the same id, live again, with its share.
        run.wait_settled().await;
    }
    run.drain(feeder, tally).await;
    tally
        .refusals_allowed
        .push((from.timestamp_millis(), Utc::now().timestamp_millis()));
    tally
        .faults
        .push(format!("{stops} SIGSTOP for {}", secs(2 * LEASE)));
    run.phase("SIGSTOP", from);
}

// ---------------------------------------------------------------------------------------
// The end: checks and figures

/// Verifies the run, prints its figures, then asserts.
async fn report_and_check(run: ClusterRun, scenario: String, mut tally: Tally) {
    let records = all_records(&run);
    for (stopped, back) in tally.pg_restarts.clone() {
        let across = in_flight_across(&run.pool, &records, stopped, back).await;
        tally.in_flight.extend(across);
    }
    let daemons: Vec<&Daemon> = run.daemons.iter().collect();
    let (regressions, without_epoch, late) =
        epoch_regressions(&run, &records, &tally.stale_allowed);
    // A frozen daemon's late commands are the documented exception (README: "What a
    // frozen daemon means"): counted apart, left out of the order and repeat checks.
    let check: Check =
        verify_except(&run.pool, &run.devices, &daemons, &tally.confirmed, &late).await;
    let late: usize = late.values().map(HashSet::len).sum();
    let (kill_line, kill_times) =
        describe_changes("takeover after SIGKILL", &records, &tally.kills);
    let (leave_line, _) = describe_changes("handover on SIGTERM", &records, &tally.leaves);
    let (stop_line, _) = describe_changes("takeover after SIGSTOP", &records, &tally.stops);
    let (join_line, _) = describe_changes(
        "a joining daemon's first command per NAS it took",
        &records,
        &tally.joins,
    );
    let (refused, refused_allowed) = refusals_outside(&run, &records, &tally.refusals_allowed);
    let lost_lines: Vec<String> = run
        .daemons
        .iter()
        .enumerate()
        .map(|(slot, d)| format!("d{}: {}", slot + 1, leases_lost(d)))
        .collect();
    let mut lines = vec![format!(
        "cluster {scenario}: {DAEMONS} daemons (+1 joining), {NAS_COUNT} NAS (ssh, telnet, api, coa; \
         {WORKERS} workers and sessions each), lease {}, heartbeat {HEARTBEAT}, {FEED_RATE} events/s",
        secs(LEASE)
    )];
    if !tally.kills.is_empty() {
        lines.push(kill_line);
    }
    if !tally.joins.is_empty() {
        lines.push(join_line);
    }
    if !tally.leaves.is_empty() {
        lines.push(leave_line);
        lines.push(format!(
            "SIGTERM to exit: {}",
            tally
                .exits
                .iter()
                .map(|(d, s)| format!("{} ({s})", secs(*d)))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if !tally.pg_restarts.is_empty() {
        lines.push(format!(
            "PostgreSQL back to the next event done: {}",
            tally
                .pg_resumes
                .iter()
                .map(|d| secs(*d))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if !tally.stops.is_empty() {
        lines.push(stop_line);
    }
    lines.push(format!(
        "epoch regressions: {} (late commands of a frozen daemon, allowed: {late}); commands without an epoch: {without_epoch}",
        regressions.len()
    ));
    lines.push(format!(
        "connections refused: {} outside the SIGSTOP phase, {refused_allowed} in it",
        refused.len()
    ));
    lines.push(format!(
        "\"Lease lost\" in the journals: {}",
        lost_lines.join(", ")
    ));
    let down: usize = run
        .daemons
        .iter()
        .map(|d| journal_text(d).matches("NAS down").count())
        .sum();
    lines.push(format!("\"NAS down\" in the journals: {down}"));
    lines.extend(tally.notes.iter().cloned());
    publish(FIGURES_ENV, None, &lines.join("\n"));
    let figures = Figures {
        scenario,
        faults: tally.faults.join(", "),
        check,
        allowed_duplicates: tally.in_flight.len() as i64,
        in_flight: Some(tally.in_flight.clone()),
        resume: if kill_times.is_empty() {
            "-".into()
        } else {
            format!(
                "{} / {} (SIGKILL to the first command of a new epoch)",
                secs(percentile(&kill_times, 0.5)),
                secs(percentile(&kill_times, 1.0))
            )
        },
        other: format!(
            "epoch regressions {}; refused outside SIGSTOP {}",
            regressions.len(),
            refused.len()
        ),
    };
    publish(FIGURES_ENV, Some(common::harness::HEADER), &figures.row());
    let name = run.name;
    let exits = tally.exits.clone();
    run.finish();
    assert!(
        regressions.is_empty(),
        "{name}: commands of an older epoch after a newer one (a daemon sent after its lease ended):\n{}",
        regressions[..regressions.len().min(20)].join("\n")
    );
    assert_eq!(
        without_epoch, 0,
        "{name}: recorded commands without an epoch"
    );
    assert!(
        refused.is_empty(),
        "{name}: simulators refused connections (two daemons held sessions to one NAS):\n{}",
        refused[..refused.len().min(20)].join("\n")
    );
    for (took, status) in &exits {
        assert!(
            status == "exit status: 0",
            "{name}: the leaving daemon exited with {status} after {}",
            secs(*took)
        );
    }
    figures.check();
}

// ---------------------------------------------------------------------------------------
// Scenarios

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos() {
    let _serial = SERIAL.lock().await;
    let form = form();
    let mut rng = seeded_rng("chaos");
    let mut run = ClusterRun::start("chaos", None, DAEMONS, &mut rng).await;
    run.wait_settled().await;
    let mut tally = Tally::default();
    kill_phase(&mut run, &mut rng, form.kill_events, form.kills, &mut tally).await;
    join_leave_phase(&mut run, &mut rng, form.join_events, form.joins, &mut tally).await;
    pg_restart_phase(
        &mut run,
        &mut rng,
        form.restart_events,
        &form.pg_pauses,
        &mut tally,
    )
    .await;
    stop_phase(&mut run, &mut rng, form.stop_events, form.stops, &mut tally).await;
    report_and_check(run, format!("cluster chaos ({})", form.name), tally).await;
}

/// The SIGKILL part with the daemons behind a PgBouncer in `mode`.
async fn kill_9_through_pgbouncer(mode: PoolMode, name: &'static str) {
    let _serial = SERIAL.lock().await;
    let form = form();
    let mut rng = seeded_rng(name);
    let mut run = ClusterRun::start(name, Some(mode), DAEMONS, &mut rng).await;
    run.wait_settled().await;
    let mut tally = Tally::default();
    kill_phase(
        &mut run,
        &mut rng,
        form.bouncer_events,
        form.bouncer_kills,
        &mut tally,
    )
    .await;
    report_and_check(
        run,
        format!(
            "cluster SIGKILL through PgBouncer, {mode:?} mode ({})",
            form.name
        ),
        tally,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_through_pgbouncer_session() {
    kill_9_through_pgbouncer(PoolMode::Session, "kill_9_through_pgbouncer_session").await;
}

/// Through Debian 12's PgBouncer 1.18 in transaction mode: the daemons run with
/// `statement_cache = false` (each call its own transaction, unnamed statements) and
/// `listen = false`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_through_pgbouncer_transaction() {
    kill_9_through_pgbouncer(
        PoolMode::Transaction,
        "kill_9_through_pgbouncer_transaction",
    )
    .await;
}

/// Drains a backlog with 1, 2 and 3 daemons (each added to the running ones, the
/// cluster settled before the backlog is inserted) and reports events/s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_per_second_by_daemons() {
    let _serial = SERIAL.lock().await;
    let form = form();
    let mut rng = seeded_rng("events_per_second_by_daemons");
    let mut run = ClusterRun::start("events_per_second_by_daemons", None, 1, &mut rng).await;
    let mut tally = Tally::default();
    let mut rates = Vec::new();
    for n in 1..=DAEMONS {
        if !run.daemons[n - 1].is_running() {
            run.daemons[n - 1].spawn();
        }
        run.wait_settled().await;
        let users: Vec<i64> = (0..form.backlog)
            .map(|_| rng.random_range(1..=ACCOUNTS_PER_NAS * NAS_COUNT))
            .collect();
        let ids: Vec<i64> = sqlx::query_scalar(
            "INSERT INTO events_stack_compact (cmd, user_id) \
             SELECT 'user_accept', u FROM unnest($1::bigint[]) WITH ORDINALITY AS t(u, n) \
             ORDER BY n RETURNING id",
        )
        .bind(&users)
        .fetch_all(&run.pool)
        .await
        .expect("insert the backlog");
        let inserted = Utc::now();
        tally.confirmed.extend(ids);
        run.wait_history(tally.confirmed.len() as i64).await;
        let last: DateTime<Utc> = sqlx::query_scalar("SELECT max(finished_at) FROM events_history")
            .fetch_one(&run.pool)
            .await
            .expect("history");
        let took = (last - inserted).to_std().unwrap_or_default();
        let rate = form.backlog as f64 / took.as_secs_f64().max(0.001);
        let spread: Vec<usize> = {
            let mut v = Vec::new();
            for slot in 0..n {
                let id = run.daemon_id(slot).await;
                v.push(run.owned(&id).await.len());
            }
            v
        };
        rates.push(format!(
            "{n} daemon(s) (NAS per daemon {spread:?}): {rate:.0} events/s ({} in {})",
            form.backlog,
            secs(took)
        ));
    }
    tally.faults.push("none (2 joins)".into());
    tally
        .notes
        .push(format!("events/s draining a backlog: {}", rates.join("; ")));
    report_and_check(
        run,
        format!("cluster events/s by daemons ({})", form.name),
        tally,
    )
    .await;
}
