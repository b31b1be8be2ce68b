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
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use nasd::store::{AccountRecord, Nas, Secret, Store};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Row};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use common::sshd::Sshd;

/// The scenarios share the machine's two cores and must not overlap.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Marks the harness's own connections, so `pg_terminate_backend` spares them.
const HARNESS_APP: &str = "nasd-fault-harness";

const ACCOUNTS_PER_NAS: i64 = 40;

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

fn seeded_rng(scenario: &str) -> StdRng {
    let seed = std::env::var("NASD_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    eprintln!("fault {scenario}: seed {seed} (NASD_FAULT_SEED={seed} repeats the choices)");
    StdRng::seed_from_u64(seed)
}

// ---------------------------------------------------------------------------------------
// A private PostgreSQL cluster: the machine's shared server is used by other tests at the
// same time and must not be restarted.

struct PgCluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    as_root: bool,
}

/// The server binaries of the newest PostgreSQL installed the Debian way.
fn pg_bin() -> PathBuf {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin).expect(
        "PostgreSQL server binaries (initdb, pg_ctl) not found under /usr/lib/postgresql/*/bin \
         (bash scripts/test-setup.sh installs them)",
    )
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

fn id_of(user: &str, flag: &str) -> u32 {
    let out = Command::new("id").args([flag, user]).output().expect("id");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("no `{user}` user (the postgresql package creates it)"))
}

impl PgCluster {
    fn start() -> PgCluster {
        let bin = pg_bin();
        let dir = tempfile::tempdir().expect("temp dir");
        // initdb refuses to run as root: the cluster belongs to the postgres user then.
        let as_root = running_as_root();
        if as_root {
            std::os::unix::fs::chown(
                dir.path(),
                Some(id_of("postgres", "-u")),
                Some(id_of("postgres", "-g")),
            )
            .expect("chown the cluster directory to postgres");
        }
        let cluster = PgCluster {
            dir,
            bin,
            port: free_port(),
            as_root,
        };
        let data = cluster.data();
        let status = cluster
            .command("initdb")
            .args([
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-sync",
                "-D",
            ])
            .arg(&data)
            .stdout(Stdio::null())
            .status()
            .expect("run initdb");
        assert!(status.success(), "initdb failed");
        cluster.start_server();
        cluster
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn command(&self, tool: &str) -> Command {
        let path = self.bin.join(tool);
        if self.as_root {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        }
    }

    fn start_server(&self) {
        // fsync off: the machine does not crash in these tests, only the server does,
        // and the kernel keeps what it wrote.
        let options = format!(
            "-h 127.0.0.1 -p {} -k {} -c fsync=off -c max_connections=60",
            self.port,
            self.dir.path().display()
        );
        let status = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(self.dir.path().join("server.log"))
            .args(["-o", &options, "-w", "-t", "60", "start"])
            .stdout(Stdio::null())
            .status()
            .expect("run pg_ctl start");
        assert!(
            status.success(),
            "pg_ctl start failed; see {}",
            self.dir.path().join("server.log").display()
        );
    }

    /// Stops the server the way a crash would (no checkpoint; recovery at the next start).
    fn stop_immediate(&self) {
        let _ = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }

    fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        self.stop_immediate();
    }
}

// ---------------------------------------------------------------------------------------
// Devices

#[derive(Debug, Clone, Copy)]
struct SimPorts {
    ssh: u16,
    telnet: u16,
    api: u16,
    coa: u16,
}

/// A `nasd sim` child process with `--record`, restartable on the same ports.
struct SimProc {
    listen: String,
    latency: String,
    record: PathBuf,
    host_key: PathBuf,
    ports: Option<SimPorts>,
    child: Option<Child>,
}

/// The address printed after `label` ("ssh on 127.0.0.1:2222, ...").
fn addr_after(line: &str, label: &str) -> Option<SocketAddr> {
    let rest = &line[line.find(label)? + label.len()..];
    let end = rest.find([',', ' ']).unwrap_or(rest.len());
    rest[..end].parse().ok()
}

impl SimProc {
    fn start(dir: &Path, name: &str, listen: &str, latency: &str) -> SimProc {
        let mut sim = SimProc {
            listen: listen.to_string(),
            latency: latency.to_string(),
            record: dir.join(format!("{name}.record")),
            host_key: dir.join(format!("{name}.host_key")),
            ports: None,
            child: None,
        };
        sim.spawn();
        sim
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_nasd"));
        cmd.args(["sim", "--listen", &self.listen, "--latency", &self.latency])
            .args(["--max-sessions", "100", "--record"])
            .arg(&self.record)
            .arg("--host-key")
            .arg(&self.host_key);
        if let Some(p) = self.ports {
            cmd.args(["--ssh-port", &p.ssh.to_string()])
                .args(["--telnet-port", &p.telnet.to_string()])
                .args(["--api-port", &p.api.to_string()])
                .args(["--coa-port", &p.coa.to_string()]);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nasd sim");
        let stdout = child.stdout.take().expect("sim stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        // Reads the listening addresses, then keeps draining so the sim never blocks.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let (mut ssh, mut telnet, mut api, mut coa) = (None, None, None, None);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while ssh.is_none() || coa.is_none() {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let line = rx
                .recv_timeout(left)
                .expect("nasd sim did not print its addresses");
            ssh = ssh.or(addr_after(&line, "ssh on "));
            telnet = telnet.or(addr_after(&line, "telnet on "));
            api = api.or(addr_after(&line, "api on "));
            coa = coa.or(addr_after(&line, "coa on "));
        }
        let port = |a: Option<SocketAddr>, what: &str| {
            a.unwrap_or_else(|| panic!("nasd sim did not print its {what} address"))
                .port()
        };
        self.ports = Some(SimPorts {
            ssh: port(ssh, "ssh"),
            telnet: port(telnet, "telnet"),
            api: port(api, "api"),
            coa: port(coa, "coa"),
        });
        self.child = Some(child);
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn ports(&self) -> SimPorts {
        self.ports.expect("sim started")
    }
}

impl Drop for SimProc {
    fn drop(&mut self) {
        self.kill();
    }
}

enum Peer {
    Sim(SimProc),
    OpenSsh(Sshd),
}

struct Device {
    nas: Nas,
    label: &'static str,
    peer: Peer,
}

/// The event id a recorded command names (`=ev<id>`).
fn event_in(text: &str) -> Option<i64> {
    let at = text.find("=ev")? + 3;
    let digits: String = text[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

impl Device {
    /// The commands the device applied, in order, as the event ids they name (None for a
    /// command that names no event).
    fn received(&self) -> Vec<Option<i64>> {
        let text = match &self.peer {
            Peer::Sim(sim) => std::fs::read_to_string(&sim.record).unwrap_or_default(),
            Peer::OpenSsh(sshd) => std::fs::read_to_string(&sshd.record).unwrap_or_default(),
        };
        text.lines().map(event_in).collect()
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
// The daemon

struct Daemon {
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    /// Exits nobody asked for (the daemon gave up on its own).
    unexpected_exits: Vec<String>,
}

impl Daemon {
    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("daemon log");
        let child = Command::new(env!("CARGO_BIN_EXE_nasd"))
            .arg("--config")
            .arg(&self.config)
            .arg("run")
            .env(
                "NASD_LOG",
                std::env::var("NASD_FAULT_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start nasd");
        self.child = Some(child);
    }

    fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Notes (and restarts after) an exit nobody caused.
    fn check_alive(&mut self) {
        let exited = self
            .child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten());
        if let Some(status) = exited {
            self.unexpected_exits.push(status.to_string());
            self.child = None;
            self.spawn();
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

// ---------------------------------------------------------------------------------------
// Billing: a feeder inserting into events_stack_compact while the daemon runs

#[derive(Debug, Clone, Copy, PartialEq)]
enum Feed {
    /// This many events per second.
    Rate(f64),
    /// Keeps this many events pending (compact + stack), so the NAS never runs dry.
    Backlog(i64),
    Off,
}

struct Feeder {
    modes: Arc<Mutex<HashMap<i64, Feed>>>,
    /// Compact ids whose insert was confirmed.
    confirmed: Arc<Mutex<Vec<i64>>>,
    stop: CancellationToken,
    join: tokio::task::JoinHandle<()>,
}

impl Feeder {
    /// Inserts events for each NAS as its mode says, until `total` are confirmed (if
    /// given) or `stop` is called. A failed insert (database away) is retried by the
    /// next tick, as billing would.
    fn start(pool: PgPool, modes: HashMap<i64, Feed>, total: Option<i64>, seed: u64) -> Feeder {
        let modes = Arc::new(Mutex::new(modes));
        let confirmed = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let join = tokio::spawn(feed(
            pool,
            modes.clone(),
            confirmed.clone(),
            total,
            stop.clone(),
            seed,
        ));
        Feeder {
            modes,
            confirmed,
            stop,
            join,
        }
    }

    fn set(&self, nas_id: i64, feed: Feed) {
        self.modes.lock().expect("modes").insert(nas_id, feed);
    }

    fn count(&self) -> i64 {
        self.confirmed.lock().expect("confirmed").len() as i64
    }

    async fn finish(self) -> Vec<i64> {
        self.stop.cancel();
        let _ = self.join.await;
        std::mem::take(&mut *self.confirmed.lock().expect("confirmed"))
    }

    fn done(&self) -> bool {
        self.join.is_finished()
    }
}

async fn pending_by_nas(pool: &PgPool) -> Option<HashMap<i64, i64>> {
    let rows = sqlx::query(
        "SELECT a.nas_id, count(*)::bigint AS n FROM (SELECT user_id FROM events_stack \
         UNION ALL SELECT user_id FROM events_stack_compact) e JOIN accounts a USING (user_id) \
         GROUP BY a.nas_id",
    )
    .fetch_all(pool)
    .await
    .ok()?;
    Some(
        rows.iter()
            .map(|r| (r.get::<i64, _>("nas_id"), r.get::<i64, _>("n")))
            .collect(),
    )
}

/// Account user ids of a NAS (see `add_accounts`: round-robin over NAS 1..=n).
fn accounts_of(nas_id: i64, n_nas: i64) -> Vec<i64> {
    (1..=ACCOUNTS_PER_NAS * n_nas)
        .filter(|u| (u - 1) % n_nas + 1 == nas_id)
        .collect()
}

async fn feed(
    pool: PgPool,
    modes: Arc<Mutex<HashMap<i64, Feed>>>,
    confirmed: Arc<Mutex<Vec<i64>>>,
    total: Option<i64>,
    stop: CancellationToken,
    seed: u64,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let tick = Duration::from_millis(100);
    let n_nas = modes.lock().expect("modes").len() as i64;
    let mut owed: HashMap<i64, f64> = HashMap::new();
    let mut last = Instant::now();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(tick) => {}
        }
        let elapsed = last.elapsed().as_secs_f64();
        last = Instant::now();
        let current: Vec<(i64, Feed)> = modes
            .lock()
            .expect("modes")
            .iter()
            .map(|(k, v)| (*k, *v))
            .collect();
        let pending = if current.iter().any(|(_, f)| matches!(f, Feed::Backlog(_))) {
            pending_by_nas(&pool).await
        } else {
            None
        };
        let mut users = Vec::new();
        for (nas_id, mode) in current {
            let n = match mode {
                Feed::Off => 0,
                Feed::Rate(rate) => {
                    let o = owed.entry(nas_id).or_default();
                    *o += rate * elapsed;
                    let n = o.floor();
                    *o -= n;
                    n as i64
                }
                Feed::Backlog(target) => match &pending {
                    Some(p) => (target - p.get(&nas_id).copied().unwrap_or(0)).max(0),
                    None => 0,
                },
            };
            let accounts = accounts_of(nas_id, n_nas);
            users.extend((0..n).map(|_| accounts[rng.random_range(0..accounts.len())]));
        }
        if let Some(total) = total {
            let have = confirmed.lock().expect("confirmed").len() as i64;
            users.truncate((total - have).max(0) as usize);
        }
        if users.is_empty() {
            if total.is_some_and(|t| confirmed.lock().expect("confirmed").len() as i64 >= t) {
                return;
            }
            continue;
        }
        // Interleave the NAS as billing would.
        for i in (1..users.len()).rev() {
            users.swap(i, rng.random_range(0..=i));
        }
        let inserted: Result<Vec<i64>, _> = sqlx::query_scalar(
            "INSERT INTO events_stack_compact (cmd, user_id) \
             SELECT 'user_accept', u FROM unnest($1::bigint[]) WITH ORDINALITY AS t(u, n) \
             ORDER BY n RETURNING id",
        )
        .bind(&users)
        .fetch_all(&pool)
        .await;
        match inserted {
            Ok(ids) => confirmed.lock().expect("confirmed").extend(ids),
            Err(_) => {
                // The database is away; what was owed is owed again next tick (Rate) or
                // recomputed (Backlog). An insert whose commit we did not hear about is
                // not counted: the checks only require what was confirmed.
            }
        }
    }
}

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

async fn harness_pool(url: &str) -> PgPool {
    let options = PgConnectOptions::from_str(url)
        .expect("database url")
        .application_name(HARNESS_APP);
    PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(options)
        .await
        .expect("connect to the private cluster")
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

        let config = dir.join("nasd.toml");
        std::fs::write(
            &config,
            format!(
                "[database]\nurl = \"{url}\"\n\
                 [daemon]\nlog_dir = \"{log}\"\nschemes_dir = \"{schemes}\"\n\
                 resync_interval = \"1s\"\npoll_interval = \"100ms\"\nretry_base = \"100ms\"\n\
                 retry_cap = \"2s\"\nlease = \"3s\"\nmax_attempts = 10\nshutdown_grace = \"2s\"\n\
                 [transport]\nknown_hosts = \"{known}\"\nssh_key = \"{key}\"\n",
                log = dir.join("log").display(),
                schemes = dir.join("schemes").display(),
                known = dir.join("known_hosts").display(),
                key = client_key.display(),
            ),
        )
        .expect("config");
        let mut daemon = Daemon {
            config,
            log: dir.join("nasd.stderr"),
            child: None,
            unexpected_exits: Vec::new(),
        };
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

    /// The checks every scenario ends with: the database and the devices agree that every
    /// confirmed event was delivered exactly once (repeats counted), in order per account.
    async fn verify(&self, confirmed: &[i64]) -> Check {
        let rows = sqlx::query(
            "SELECT event_id, compact_id, user_id, nas_id, outcome, attempts FROM events_history",
        )
        .fetch_all(&self.pool)
        .await
        .expect("read history");
        let mut check = Check {
            events: confirmed.len() as i64,
            ..Check::default()
        };
        let mut per_compact: HashMap<i64, usize> = HashMap::new();
        // event id -> (user, nas)
        let mut events: HashMap<i64, (i64, i64)> = HashMap::new();
        for r in &rows {
            let compact: Option<i64> = r.get("compact_id");
            *per_compact.entry(compact.unwrap_or(-1)).or_default() += 1;
            let event_id: Option<i64> = r.get("event_id");
            let outcome: String = r.get("outcome");
            if outcome != "done" {
                check.not_done += 1;
            }
            check.max_attempts = check.max_attempts.max(r.get::<i32, _>("attempts"));
            if let Some(id) = event_id {
                let nas: Option<i64> = r.get("nas_id");
                events.insert(id, (r.get("user_id"), nas.unwrap_or(0)));
            }
        }
        check.history_repeats = per_compact.values().map(|n| n - 1).sum::<usize>() as i64;
        check.lost_in_db = confirmed
            .iter()
            .filter(|id| !per_compact.contains_key(id))
            .count() as i64;
        check.left_queued = sqlx::query_scalar(
            "SELECT (SELECT count(*) FROM events_stack) + (SELECT count(*) FROM events_stack_compact)",
        )
        .fetch_one(&self.pool)
        .await
        .expect("count queues");

        let mut expected: HashMap<i64, Vec<i64>> = HashMap::new();
        let mut sorted: Vec<(&i64, &(i64, i64))> = events.iter().collect();
        sorted.sort();
        for (id, (user, _)) in &sorted {
            expected.entry(*user).or_default().push(**id);
        }
        let mut delivered: HashSet<i64> = HashSet::new();
        let mut got: HashMap<i64, Vec<i64>> = HashMap::new();
        for device in &self.devices {
            for id in device.received() {
                let Some(id) = id else {
                    check.unexpected += 1;
                    continue;
                };
                match events.get(&id) {
                    Some((user, nas)) if *nas == device.nas.id => {
                        if !delivered.insert(id) {
                            check.duplicates += 1;
                            check.repeated.insert(id);
                        }
                        got.entry(*user).or_default().push(id);
                    }
                    _ => check.unexpected += 1,
                }
            }
        }
        check.lost_on_device = events.keys().filter(|id| !delivered.contains(id)).count() as i64;
        for (user, want) in &expected {
            let mut seq = got.get(user).cloned().unwrap_or_default();
            // A repeat right after itself is a resend, counted above; anything else out
            // of place is an order violation.
            seq.dedup();
            if &seq != want {
                check.order_violations += 1;
            }
        }
        check.unexpected_exits = self.daemon.unexpected_exits.len();
        check.panics = std::fs::read_to_string(&self.daemon.log)
            .unwrap_or_default()
            .matches("panicked")
            .count();
        check
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

/// Accounts 1..=ACCOUNTS_PER_NAS*n, round-robin over NAS 1..=n.
async fn add_accounts(store: &Store, n_nas: i64) {
    let headers: Vec<String> = ["user_id", "abonent_id", "nas_id", "login", "ip"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let records: Vec<AccountRecord> = (1..=ACCOUNTS_PER_NAS * n_nas)
        .map(|i| {
            let values = vec![
                i.to_string(),
                (1000 + i).to_string(),
                ((i - 1) % n_nas + 1).to_string(),
                format!("user{i}"),
                format!("10.88.{}.{}", i / 250, i % 250 + 1),
            ];
            AccountRecord::from_fields(&headers, &values).expect("account")
        })
        .collect();
    store.accounts_upsert(&records).await.expect("accounts");
}

// ---------------------------------------------------------------------------------------
// Figures

#[derive(Debug, Default)]
struct Check {
    events: i64,
    not_done: i64,
    history_repeats: i64,
    lost_in_db: i64,
    lost_on_device: i64,
    left_queued: i64,
    unexpected: i64,
    duplicates: i64,
    /// The events that reached a device more than once.
    repeated: HashSet<i64>,
    order_violations: i64,
    max_attempts: i32,
    unexpected_exits: usize,
    panics: usize,
}

struct Figures {
    scenario: String,
    faults: String,
    check: Check,
    /// Repeats allowed: the events in flight at each fault.
    allowed_duplicates: i64,
    /// When known, which events were in flight: only they may repeat.
    in_flight: Option<HashSet<i64>>,
    resume: String,
    other: String,
}

fn percentile(values: &[Duration], p: f64) -> Duration {
    if values.is_empty() {
        return Duration::ZERO;
    }
    let mut v = values.to_vec();
    v.sort();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

const HEADER: &str = "| scenario | events | faults | lost | unexpected | duplicates (allowed) | order violations | history repeats / not done / left queued | resume after the fault p50 / max | other |\n|---|---|---|---|---|---|---|---|---|---|";

impl Figures {
    fn row(&self) -> String {
        let c = &self.check;
        format!(
            "| {} | {} | {} | {} | {} | {} ({}) | {} | {} / {} / {} | {} | {} |",
            self.scenario,
            c.events,
            self.faults,
            c.lost_in_db + c.lost_on_device,
            c.unexpected,
            c.duplicates,
            self.allowed_duplicates,
            c.order_violations,
            c.history_repeats,
            c.not_done,
            c.left_queued,
            self.resume,
            self.other
        )
    }

    /// Prints the row (stderr, and `NASD_FAULT_FIGURES`), then asserts what must hold.
    fn report_and_check(self) {
        let row = self.row();
        eprintln!("\n{HEADER}\n{row}\n");
        if let Ok(path) = std::env::var("NASD_FAULT_FIGURES")
            && let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
        {
            if f.metadata().is_ok_and(|m| m.len() == 0) {
                let _ = writeln!(f, "{HEADER}");
            }
            let _ = writeln!(f, "{row}");
        }
        let c = &self.check;
        let s = &self.scenario;
        assert_eq!(
            c.lost_in_db, 0,
            "{s}: confirmed events missing from history"
        );
        assert_eq!(c.lost_on_device, 0, "{s}: events done but never received");
        assert_eq!(
            c.unexpected, 0,
            "{s}: devices received commands of no event"
        );
        assert_eq!(c.history_repeats, 0, "{s}: an event reached history twice");
        assert_eq!(c.not_done, 0, "{s}: events failed");
        assert_eq!(c.left_queued, 0, "{s}: events left queued");
        assert_eq!(
            c.order_violations, 0,
            "{s}: accounts received events out of order"
        );
        assert!(
            c.duplicates <= self.allowed_duplicates,
            "{s}: {} repeats, more than the {} events in flight at the faults",
            c.duplicates,
            self.allowed_duplicates
        );
        if let Some(in_flight) = &self.in_flight {
            let strays: Vec<&i64> = c.repeated.difference(in_flight).collect();
            assert!(
                strays.is_empty(),
                "{s}: events repeated that were not in flight at a fault: {strays:?}"
            );
        }
        assert_eq!(c.unexpected_exits, 0, "{s}: the daemon exited on its own");
        assert_eq!(c.panics, 0, "{s}: the daemon panicked");
    }
}

/// Random points of a run (fractions of its events), sorted.
fn random_points(rng: &mut StdRng, n: usize, from: f64, to: f64) -> Vec<f64> {
    let mut points: Vec<f64> = (0..n).map(|_| rng.random_range(from..to)).collect();
    points.sort_by(f64::total_cmp);
    points
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
    figures.report_and_check();
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
    let points = random_points(&mut rng, form.pg_pauses.len(), 0.15, 0.85);
    for (point, pause) in points.into_iter().zip(form.pg_pauses.clone()) {
        run.wait_history((point * total as f64) as i64, Duration::from_secs(900))
            .await;
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..250))).await;
        run.pg.stop_immediate();
        tokio::time::sleep(pause).await;
        run.daemon.check_alive();
        run.pg.start_server();
        let back = Utc::now();
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
        allowed_duplicates: 0,
        in_flight: Some(HashSet::new()),
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
    figures.report_and_check();
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
    figures.report_and_check();
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
    figures.report_and_check();
}
