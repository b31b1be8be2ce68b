//! The fault harness: the real `nasd` binary on a private PostgreSQL cluster, delivering
//! to real devices over real sockets (four `nasd sim` processes reached over SSH, telnet,
//! the RouterOS API and RADIUS CoA, and an OpenSSH sshd whose ForceCommand records), while
//! the harness breaks things:
//!
//! - `kill_9`: SIGKILL of the daemon at random moments, then an immediate restart;
//! - `postgres_restart`: the database stopped (`pg_ctl stop -m immediate`) and started
//!   again while the daemon runs;
//! - `terminate_backends`: the daemon's database connections killed with
//!   `pg_terminate_backend`;
//! - `nas_down`: one simulator killed for a while and restarted on the same ports.
//!
//! Every device records each command it applied; each command names its event
//! (`list=ev<event_id>`, `Filter-Id = ev<event_id>`), so the harness counts lost,
//! unexpected and repeated deliveries and checks per-account order, and checks the
//! database (every event in `events_history` exactly once, `done`, nothing left queued).
//! It prints a figures table to stderr (`--nocapture`); timings are figures, never
//! assertions.
//!
//! The short form (default, CI) takes a few minutes in debug. `NASD_FAULT=long` runs the
//! long form (20 kills during 20,000 events, 3 restarts, a NAS down for 3 minutes): run
//! it with `scripts/fault.sh long`, which builds in release. `NASD_FAULT_FIGURES=FILE`
//! appends the table rows to FILE; `NASD_FAULT_SEED` repeats a run's random choices;
//! `NASD_FAULT_KEEP=1` keeps the work directories (daemon log, device records).

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use nasd::store::{Nas, Secret, Store};
use rand::Rng;
use rand::rngs::StdRng;
use sqlx::{PgPool, Row};
use tokio::time::Instant;

use common::harness::{
    Check, Daemon, Device, Feed, Feeder, Figures, HARNESS_APP, Peer, PgCluster, SimProc,
    add_accounts, harness_pool, pending_by_nas, percentile, random_points, secs, verify,
};
use common::sshd::Sshd;

/// The scenarios share the machine's two cores and must not overlap.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const TERMINATIONS_PER_ROUND: usize = 5;

// ---------------------------------------------------------------------------------------
// The two forms

#[derive(Debug, Clone)]
struct Form {
    name: &'static str,
    kill_events: i64,
    kills: usize,
    restart_events: i64,
    /// How long PostgreSQL stays down at each restart: some shorter than the daemon's
    /// pool acquire timeout (10 s, calls just wait), some longer (calls fail and retry).
    pg_pauses: Vec<Duration>,
    terminate_events: i64,
    /// Rounds of `TERMINATIONS_PER_ROUND` terminations a few hundred ms apart.
    terminate_rounds: usize,
    /// Throughput of the other NAS is measured over this long before the outage...
    down_baseline: Duration,
    /// ...and over the outage.
    down_for: Duration,
    /// Events per second billing sends (kill, restart and terminate scenarios).
    feed_rate: f64,
}

fn seeded_rng(scenario: &str) -> StdRng {
    common::harness::seeded_rng(&format!("fault {scenario}"), "NASD_FAULT_SEED")
}

fn form() -> Form {
    match std::env::var("NASD_FAULT").as_deref() {
        Ok("long") => Form {
            name: "long",
            kill_events: 20_000,
            kills: 20,
            restart_events: 12_000,
            pg_pauses: [3, 8, 15].map(Duration::from_secs).to_vec(),
            terminate_events: 6_000,
            terminate_rounds: 3,
            down_baseline: Duration::from_secs(30),
            down_for: Duration::from_secs(180),
            feed_rate: 400.0,
        },
        _ => Form {
            name: "short",
            kill_events: 3_000,
            kills: 5,
            restart_events: 2_500,
            pg_pauses: vec![Duration::from_secs(12)],
            terminate_events: 2_000,
            terminate_rounds: 1,
            down_baseline: Duration::from_secs(10),
            down_for: Duration::from_secs(20),
            feed_rate: 250.0,
        },
    }
}

/// One address-list entry per event, named after it; a repeat is answered "already have
/// such entry", which counts as done.
const SCHEMES: &[(&str, &str)] = &[
    (
        "fault-ssh",
        r#"description = "fault harness: one address-list entry per event, over SSH"
transport = "ssh"
mode = "exec"
dialect = "routeros"
timeout = "10s"
[commands]
user_accept = ["/ip firewall address-list add list=ev{{ event_id }} address={{ ip }}"]
[answers]
failure = ["^failure:", "no such item", "^bad command name", "^syntax error", "^expected "]
[answers.benign]
user_accept = ["already have such entry"]
"#,
    ),
    (
        "fault-telnet",
        r#"description = "fault harness: one address-list entry per event, over telnet"
transport = "telnet"
dialect = "routeros"
timeout = "10s"
prompt = '^\[[^\]]+\] >\s?$'
[commands]
user_accept = ["/ip firewall address-list add list=ev{{ event_id }} address={{ ip }}"]
[answers]
failure = ["^failure:", "no such item", "^bad command name", "^syntax error", "^expected "]
[answers.benign]
user_accept = ["already have such entry"]
"#,
    ),
    (
        "fault-api",
        r#"description = "fault harness: one address-list entry per event, over the API"
transport = "api"
dialect = "routeros"
timeout = "10s"
[commands]
user_accept = ["/ip/firewall/address-list/add =list=ev{{ event_id }} =address={{ ip }}"]
[answers]
failure = ["^failure:", "no such item", "no such command"]
[answers.benign]
user_accept = ["already have such entry"]
"#,
    ),
    (
        "fault-coa",
        r#"description = "fault harness: one CoA per event, naming it in Filter-Id"
transport = "radius"
dialect = "radius"
timeout = "5s"
[commands]
user_accept = ["coa User-Name = {{ login }}, Acct-Session-Id = {{ login }}, Filter-Id = ev{{ event_id }}"]
"#,
    ),
];

// ---------------------------------------------------------------------------------------
// One run: cluster, database, devices, daemon

struct Run {
    name: &'static str,
    pg: PgCluster,
    pool: PgPool,
    devices: Vec<Device>,
    daemon: Daemon,
    work: tempfile::TempDir,
    seed: u64,
}

struct RunOptions {
    /// `nasd sim --latency`, and the OpenSSH recorder's sleep.
    latency: &'static str,
    workers: i32,
}

impl Run {
    async fn start(name: &'static str, opts: RunOptions, rng: &mut StdRng) -> Run {
        let pg = PgCluster::start();
        let admin = harness_pool(&pg.url("postgres")).await;
        sqlx::query("CREATE DATABASE nasd")
            .execute(&admin)
            .await
            .expect("create database");
        admin.close().await;
        let url = pg.url("nasd");
        let work = tempfile::tempdir().expect("work dir");
        let dir = work.path();
        for (scheme, toml) in SCHEMES {
            std::fs::create_dir_all(dir.join("schemes").join(scheme)).expect("scheme dir");
            std::fs::write(dir.join("schemes").join(scheme).join("scheme.toml"), toml)
                .expect("scheme.toml");
        }

        // Four simulators on 127.0.0.2-5 (NAS ip is unique) and the OpenSSH recorder on
        // 127.0.0.1.
        let sim_nas = |id: i64, label: &str, scheme: &str, port: u16| {
            let mut nas = Nas::new(id, label, &format!("127.0.0.{}", id + 1));
            nas.scheme = Some(scheme.into());
            nas.port = Some(i32::from(port));
            nas.login = Some("admin".into());
            nas.password = Some(Secret::new("admin"));
            nas.secret = Some(Secret::new("testing123"));
            nas.n_workers = opts.workers;
            nas.max_sessions = opts.workers;
            nas.host_key_policy = "accept-new".into();
            nas
        };
        let mut devices = Vec::new();
        let kinds: [(&'static str, &str); 4] = [
            ("sim ssh", "fault-ssh"),
            ("sim telnet", "fault-telnet"),
            ("sim api", "fault-api"),
            ("sim coa", "fault-coa"),
        ];
        for (i, (label, scheme)) in kinds.into_iter().enumerate() {
            let id = i as i64 + 1;
            let sim = SimProc::start(
                dir,
                &format!("nas{id}"),
                &format!("127.0.0.{}", id + 1),
                opts.latency,
            );
            let p = sim.ports();
            let port = match scheme {
                "fault-ssh" => p.ssh,
                "fault-telnet" => p.telnet,
                "fault-api" => p.api,
                _ => p.coa,
            };
            devices.push(Device {
                nas: sim_nas(id, label, scheme, port),
                label,
                peer: Peer::Sim(sim),
            });
        }
        let seconds = opts
            .latency
            .trim_end_matches("ms")
            .parse::<f64>()
            .map_or(String::new(), |ms| format!("{}", ms / 1000.0));
        let sshd = Sshd::start(&dir.join("sshd"), &seconds);
        let mut openssh = Nas::new(5, "openssh", "127.0.0.1");
        openssh.scheme = Some("fault-ssh".into());
        openssh.port = Some(i32::from(sshd.port));
        openssh.login = Some(common::sshd::USER.into());
        openssh.n_workers = opts.workers;
        openssh.max_sessions = opts.workers;
        openssh.host_key_policy = "accept-new".into();
        let client_key = sshd.client_key.clone();
        devices.push(Device {
            nas: openssh,
            label: "openssh",
            peer: Peer::OpenSsh(sshd),
        });

        let store = Store::connect(&url, 2).await.expect("connect");
        store.migrate().await.expect("migrate");
        for d in &devices {
            store.nas_upsert(&d.nas).await.expect("nas");
        }
        add_accounts(&store, devices.len() as i64).await;
        drop(store);

        // One daemon: its cluster lease (30 s) outlasts the longest PostgreSQL outage
        // made here (15 s), so an outage only delays delivery. An outage past the lease
        // makes the daemon drop its NAS and take them again, which sends the events
        // whose results it could not record once more: tests/cluster.rs covers that.
        let config = dir.join("nasd.toml");
        std::fs::write(
            &config,
            format!(
                "[database]\nurl = \"{url}\"\n\
                 [daemon]\nlog_dir = \"{log}\"\nschemes_dir = \"{schemes}\"\n\
                 resync_interval = \"1s\"\npoll_interval = \"100ms\"\nretry_base = \"100ms\"\n\
                 retry_cap = \"2s\"\nlease = \"3s\"\nmax_attempts = 10\nshutdown_grace = \"2s\"\n\
                 [transport]\nknown_hosts = \"{known}\"\nssh_key = \"{key}\"\n\
                 [cluster]\nlease = \"30s\"\n",
                log = dir.join("log").display(),
                schemes = dir.join("schemes").display(),
                known = dir.join("known_hosts").display(),
                key = client_key.display(),
            ),
        )
        .expect("config");
        let mut daemon = Daemon::new(config, dir.join("nasd.stderr"), "NASD_FAULT_LOG");
        daemon.spawn();
        Run {
            name,
            pool: harness_pool(&url).await,
            pg,
            devices,
            daemon,
            work,
            seed: rng.random(),
        }
    }

    fn feeder(&self, modes: HashMap<i64, Feed>, total: Option<i64>) -> Feeder {
        Feeder::start(self.pool.clone(), modes, total, self.seed)
    }

    fn all_nas(&self, feed: Feed) -> HashMap<i64, Feed> {
        self.devices.iter().map(|d| (d.nas.id, feed)).collect()
    }

    async fn history_count(&self) -> Option<i64> {
        sqlx::query_scalar("SELECT count(*) FROM events_history")
            .fetch_one(&self.pool)
            .await
            .ok()
    }

    /// Waits (polling; database errors count as "not yet") until `check` holds.
    async fn wait_until<F, Fut>(&mut self, limit: Duration, what: &str, mut check: F)
    where
        F: FnMut(PgPool) -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = Instant::now() + limit;
        loop {
            self.daemon.check_alive();
            if check(self.pool.clone()).await {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "{}: timed out after {limit:?} waiting for {what}\ndaemon log tail:\n{}",
                    self.name,
                    self.daemon.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn wait_history(&mut self, n: i64, limit: Duration) {
        self.wait_until(
            limit,
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

    /// Time from `since` to the first event finished after it (None if every confirmed
    /// event was already done, so there was nothing to resume).
    async fn wait_resume(&mut self, since: DateTime<Utc>, feeder: &Feeder) -> Option<Duration> {
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            self.daemon.check_alive();
            let first: Option<Option<DateTime<Utc>>> = sqlx::query_scalar(
                "SELECT min(finished_at) FROM events_history WHERE finished_at > $1",
            )
            .bind(since)
            .fetch_one(&self.pool)
            .await
            .ok();
            if let Some(Some(t)) = first {
                return (t - since).to_std().ok();
            }
            if feeder.done()
                && self
                    .history_count()
                    .await
                    .is_some_and(|c| c >= feeder.count())
            {
                return None;
            }
            assert!(
                Instant::now() < deadline,
                "{}: nothing completed within 300s after {since}\ndaemon log tail:\n{}",
                self.name,
                self.daemon.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn running_ids(&self) -> Vec<i64> {
        sqlx::query_scalar("SELECT id FROM events_stack WHERE state = 'running'")
            .fetch_all(&self.pool)
            .await
            .unwrap_or_default()
    }

    /// The checks every scenario ends with (see `harness::verify`).
    async fn verify(&self, confirmed: &[i64]) -> Check {
        verify(&self.pool, &self.devices, &[&self.daemon], confirmed).await
    }

    fn finish(self) {
        if std::env::var("NASD_FAULT_KEEP").is_ok() {
            let kept = self.work.keep();
            eprintln!(
                "fault {}: work directory kept at {}",
                self.name,
                kept.display()
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// Scenarios

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9() {
    let _serial = SERIAL.lock().await;
    let form = form();
    let mut rng = seeded_rng("kill_9");
    let mut run = Run::start(
        "kill_9",
        RunOptions {
            latency: "5ms",
            workers: 4,
        },
        &mut rng,
    )
    .await;
    let total = form.kill_events;
    let feeder = run.feeder(run.all_nas(Feed::Rate(form.feed_rate / 5.0)), Some(total));
    let mut resumes = Vec::new();
    let mut allowed = 0;
    let mut recovered = Duration::ZERO;
    let mut in_flight_at_kills: Vec<(DateTime<Utc>, Vec<i64>)> = Vec::new();
    for point in random_points(&mut rng, form.kills, 0.05, 0.95) {
        run.wait_history((point * total as f64) as i64, Duration::from_secs(900))
            .await;
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..250))).await;
        run.daemon.kill9();
        // Rows a dead daemon left `running` are exactly the attempts it had in flight:
        // only those may reach a device twice.
        let running = run.running_ids().await;
        allowed += running.len() as i64;
        let restarted = Utc::now();
        run.daemon.spawn();
        in_flight_at_kills.push((restarted, running));
        if let Some(d) = run.wait_resume(restarted, &feeder).await {
            resumes.push(d);
        }
    }
    let kills = in_flight_at_kills.len();
    let in_flight: HashSet<i64> = in_flight_at_kills
        .iter()
        .flat_map(|(_, ids)| ids.iter().copied())
        .collect();
    run.wait_until(Duration::from_secs(900), "the feeder", |_| {
        let done = feeder.done();
        async move { done }
    })
    .await;
    let confirmed = feeder.finish().await;
    run.wait_history(confirmed.len() as i64, Duration::from_secs(900))
        .await;
    // How long the attempts in flight at a kill took to be done after the restart (they
    // wait for their lease to expire).
    for (restarted, ids) in &in_flight_at_kills {
        let last: Option<DateTime<Utc>> = sqlx::query_scalar(
            "SELECT max(finished_at) FROM events_history WHERE event_id = ANY($1)",
        )
        .bind(ids)
        .fetch_one(&run.pool)
        .await
        .expect("history");
        if let Some(t) = last {
            recovered = recovered.max((t - *restarted).to_std().unwrap_or_default());
        }
    }
    run.daemon.kill9();
    let check = run.verify(&confirmed).await;
    let figures = Figures {
        scenario: format!("kill -9 ({})", form.name),
        faults: format!("{kills} kills"),
        check,
        allowed_duplicates: allowed,
        in_flight: Some(in_flight),
        resume: format!(
            "{} / {} (restart to next event done)",
            secs(percentile(&resumes, 0.5)),
            secs(percentile(&resumes, 1.0))
        ),
        other: format!(
            "in flight at the kills: {allowed}; all of them done again within {} (lease 3 s)",
            secs(recovered)
        ),
    };
    run.finish();
    figures.report_and_check("NASD_FAULT_FIGURES");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart() {
    let _serial = SERIAL.lock().await;
    let form = form();
    let mut rng = seeded_rng("postgres_restart");
    let mut run = Run::start(
        "postgres_restart",
        RunOptions {
            latency: "5ms",
            workers: 4,
        },
        &mut rng,
    )
    .await;
    let total = form.restart_events;
    let feeder = run.feeder(run.all_nas(Feed::Rate(form.feed_rate / 5.0)), Some(total));
    let mut resumes = Vec::new();
    let mut skipped = 0;
    let mut outages: Vec<(DateTime<Utc>, DateTime<Utc>)> = Vec::new();
    let points = random_points(&mut rng, form.pg_pauses.len(), 0.15, 0.85);
    for (point, pause) in points.into_iter().zip(form.pg_pauses.clone()) {
        run.wait_history((point * total as f64) as i64, Duration::from_secs(900))
            .await;
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..250))).await;
        let stopped = Utc::now();
        run.pg.stop_immediate();
        tokio::time::sleep(pause).await;
        run.daemon.check_alive();
        run.pg.start_server();
        let back = Utc::now();
        outages.push((stopped, back));
        match run.wait_resume(back, &feeder).await {
            Some(d) => resumes.push(d),
            None => skipped += 1,
        }
    }
    run.wait_until(Duration::from_secs(900), "the feeder", |_| {
        let done = feeder.done();
        async move { done }
    })
    .await;
    let confirmed = feeder.finish().await;
    run.wait_history(confirmed.len() as i64, Duration::from_secs(900))
        .await;
    run.daemon.check_alive();
    run.daemon.kill9();
    // Claims commit with `synchronous_commit = off` (README, Guarantees: "What is
    // synchronous"): a crash of the server may forget the last few hundred milliseconds
    // of them, and such an event is sent again under the same id. Only events pending at
    // an outage (expanded before the stop, finished after the server was back) may be.
    let mut pending: HashSet<i64> = HashSet::new();
    for (stopped, back) in &outages {
        let ids: Vec<i64> = sqlx::query_scalar(
            "SELECT event_id FROM events_history WHERE enqueued_at <= $1 AND finished_at >= $2",
        )
        .bind(stopped)
        .bind(back)
        .fetch_all(&run.pool)
        .await
        .expect("events pending at an outage");
        pending.extend(ids);
    }
    let check = run.verify(&confirmed).await;
    let figures = Figures {
        scenario: format!("PostgreSQL restart ({})", form.name),
        faults: format!(
            "{} restarts (immediate stop), down {}",
            form.pg_pauses.len(),
            form.pg_pauses
                .iter()
                .map(|d| secs(*d))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        check,
        allowed_duplicates: pending.len() as i64,
        in_flight: Some(pending),
        resume: format!(
            "{} / {} (database back to next event done{})",
            secs(percentile(&resumes, 0.5)),
            secs(percentile(&resumes, 1.0)),
            if skipped > 0 {
                format!("; {skipped} with nothing left to do")
            } else {
                String::new()
            }
        ),
        other: format!(
            "target: resume within 5 s: {}",
            if resumes.iter().all(|d| *d <= Duration::from_secs(5)) {
                "met"
            } else {
                "NOT MET"
            }
        ),
    };
    run.finish();
    figures.report_and_check("NASD_FAULT_FIGURES");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminate_backends() {
    let _serial = SERIAL.lock().await;
    let form = form();
    let mut rng = seeded_rng("terminate_backends");
    let mut run = Run::start(
        "terminate_backends",
        RunOptions {
            latency: "5ms",
            workers: 4,
        },
        &mut rng,
    )
    .await;
    let total = form.terminate_events;
    let feeder = run.feeder(run.all_nas(Feed::Rate(form.feed_rate / 5.0)), Some(total));
    let mut resumes = Vec::new();
    let mut terminated = 0;
    for point in random_points(&mut rng, form.terminate_rounds, 0.15, 0.85) {
        run.wait_history((point * total as f64) as i64, Duration::from_secs(900))
            .await;
        let mut at = Utc::now();
        for _ in 0..TERMINATIONS_PER_ROUND {
            tokio::time::sleep(Duration::from_millis(rng.random_range(100..500))).await;
            let killed: i64 = sqlx::query_scalar(
                "SELECT count(*) FILTER (WHERE t) FROM (SELECT pg_terminate_backend(pid) AS t \
                 FROM pg_stat_activity WHERE datname = 'nasd' AND pid <> pg_backend_pid() \
                 AND application_name <> $1) x",
            )
            .bind(HARNESS_APP)
            .fetch_one(&run.pool)
            .await
            .expect("pg_terminate_backend");
            terminated += killed;
            at = Utc::now();
        }
        if let Some(d) = run.wait_resume(at, &feeder).await {
            resumes.push(d);
        }
    }
    run.wait_until(Duration::from_secs(900), "the feeder", |_| {
        let done = feeder.done();
        async move { done }
    })
    .await;
    let confirmed = feeder.finish().await;
    run.wait_history(confirmed.len() as i64, Duration::from_secs(900))
        .await;
    run.daemon.check_alive();
    run.daemon.kill9();
    let check = run.verify(&confirmed).await;
    let figures = Figures {
        scenario: format!("pg_terminate_backend ({})", form.name),
        faults: format!(
            "{} rounds of {TERMINATIONS_PER_ROUND}, {terminated} connections terminated",
            form.terminate_rounds
        ),
        check,
        allowed_duplicates: 0,
        in_flight: Some(HashSet::new()),
        resume: format!(
            "{} / {} (last termination of a round to next event done)",
            secs(percentile(&resumes, 0.5)),
            secs(percentile(&resumes, 1.0))
        ),
        other: String::new(),
    };
    run.finish();
    figures.report_and_check("NASD_FAULT_FIGURES");
}

/// Events done per second per NAS with `finished_at` in [from, to).
async fn rates(pool: &PgPool, from: DateTime<Utc>, to: DateTime<Utc>) -> HashMap<i64, f64> {
    let seconds = (to - from)
        .to_std()
        .unwrap_or_default()
        .as_secs_f64()
        .max(0.001);
    sqlx::query(
        "SELECT nas_id, count(*)::bigint AS n FROM events_history \
         WHERE finished_at >= $1 AND finished_at < $2 GROUP BY nas_id",
    )
    .bind(from)
    .bind(to)
    .fetch_all(pool)
    .await
    .expect("rates")
    .iter()
    .map(|r| {
        (
            r.get::<Option<i64>, _>("nas_id").unwrap_or(0),
            r.get::<i64, _>("n") as f64 / seconds,
        )
    })
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nas_down() {
    let _serial = SERIAL.lock().await;
    let form = form();
    let mut rng = seeded_rng("nas_down");
    // Device latency makes each NAS's throughput its own (workers / latency), so a drop
    // shows interference rather than the machine's load.
    let mut run = Run::start(
        "nas_down",
        RunOptions {
            latency: "50ms",
            workers: 2,
        },
        &mut rng,
    )
    .await;
    let down_id = 1;
    let mut modes = run.all_nas(Feed::Backlog(300));
    let down_rate = 10.0;
    modes.insert(down_id, Feed::Rate(down_rate));
    let feeder = run.feeder(modes, None);
    // Warm up: every NAS has delivered something.
    run.wait_until(
        Duration::from_secs(120),
        "every NAS working",
        |pool| async move {
            sqlx::query_scalar::<_, i64>("SELECT count(DISTINCT nas_id) FROM events_history")
                .fetch_one(&pool)
                .await
                .is_ok_and(|n| n >= 5)
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let baseline_from = Utc::now();
    tokio::time::sleep(form.down_baseline).await;
    let went_down = Utc::now();
    let in_flight_down = run.devices[0].nas.n_workers as i64;
    let Peer::Sim(sim) = &mut run.devices[0].peer else {
        unreachable!("NAS 1 is a simulator")
    };
    sim.kill();
    let mut waited = Duration::ZERO;
    while waited < form.down_for {
        let step = Duration::from_secs(1).min(form.down_for - waited);
        tokio::time::sleep(step).await;
        waited += step;
        run.daemon.check_alive();
    }
    let Peer::Sim(sim) = &mut run.devices[0].peer else {
        unreachable!("NAS 1 is a simulator")
    };
    sim.spawn();
    let came_back = Utc::now();
    feeder.set(down_id, Feed::Off);
    let waiting: i64 = pending_by_nas(&run.pool)
        .await
        .and_then(|p| p.get(&down_id).copied())
        .unwrap_or(0);
    // The down NAS's first delivery after its return, then its backlog drained.
    let first_back = {
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            let t: Option<DateTime<Utc>> = sqlx::query_scalar(
                "SELECT min(finished_at) FROM events_history WHERE nas_id = $1 AND finished_at > $2",
            )
            .bind(down_id)
            .bind(came_back)
            .fetch_one(&run.pool)
            .await
            .ok()
            .flatten();
            if let Some(t) = t {
                break (t - came_back).to_std().unwrap_or_default();
            }
            assert!(
                Instant::now() < deadline,
                "nas_down: the NAS got nothing within 600 s of its return\n{}",
                run.daemon.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    run.wait_until(
        Duration::from_secs(900),
        "the down NAS's backlog",
        |pool| async move {
            pending_by_nas(&pool)
                .await
                .is_some_and(|p| p.get(&down_id).copied().unwrap_or(0) == 0)
        },
    )
    .await;
    let drained = (Utc::now() - came_back).to_std().unwrap_or_default();
    let confirmed = feeder.finish().await;
    run.wait_history(confirmed.len() as i64, Duration::from_secs(900))
        .await;
    run.daemon.check_alive();
    run.daemon.kill9();

    let baseline = rates(&run.pool, baseline_from, went_down).await;
    let outage = rates(&run.pool, went_down, came_back).await;
    let others: Vec<i64> = run
        .devices
        .iter()
        .map(|d| d.nas.id)
        .filter(|id| *id != down_id)
        .collect();
    let sum = |r: &HashMap<i64, f64>| {
        others
            .iter()
            .map(|id| r.get(id).unwrap_or(&0.0))
            .sum::<f64>()
    };
    let total_ratio = sum(&outage) / sum(&baseline).max(0.001);
    let worst = others
        .iter()
        .map(|id| {
            let label = run
                .devices
                .iter()
                .find(|d| d.nas.id == *id)
                .map_or("?", |d| d.label);
            let b = baseline.get(id).copied().unwrap_or(0.0);
            let o = outage.get(id).copied().unwrap_or(0.0);
            (o / b.max(0.001), label)
        })
        .min_by(|a, b| a.0.total_cmp(&b.0))
        .unwrap_or((0.0, "?"));
    let check = run.verify(&confirmed).await;
    let max_attempts = check.max_attempts;
    let figures = Figures {
        scenario: format!("NAS down ({})", form.name),
        faults: format!(
            "sim ssh NAS killed for {}, restarted on its ports",
            secs(form.down_for)
        ),
        check,
        allowed_duplicates: in_flight_down,
        in_flight: None,
        resume: format!("{} (return to its first event done)", secs(first_back)),
        other: format!(
            "other NAS: {:.1} events/s before, {:.1} during = {:.1}% (worst: {} {:.1}%; target within 10%: {}); \
             {waiting} events waited for the down NAS, drained {} after its return; \
             most attempts of one event {max_attempts}",
            sum(&baseline),
            sum(&outage),
            total_ratio * 100.0,
            worst.1,
            worst.0 * 100.0,
            if worst.0 >= 0.9 { "met" } else { "NOT MET" },
            secs(drained),
        ),
    };
    run.finish();
    figures.report_and_check("NASD_FAULT_FIGURES");
}
