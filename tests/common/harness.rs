//! The machinery of the harnesses that run the real `nasd` binary against a private
//! PostgreSQL cluster and `nasd sim` devices while breaking things (tests/fault.rs, one
//! daemon; tests/cluster.rs, several): the cluster, the simulators and their `--record`
//! files, the daemon processes, the billing feeder, the end-of-run checks and the
//! figures table. Each test binary uses only part of it (see `#![allow(dead_code)]` in
//! `common/mod.rs`).

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use nasd::store::{AccountRecord, Nas, Store};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Row};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::sshd::Sshd;

/// Marks the harness's own connections, so `pg_terminate_backend` spares them.
pub const HARNESS_APP: &str = "nasd-fault-harness";

pub const ACCOUNTS_PER_NAS: i64 = 40;

/// A random generator whose seed is printed, or taken from the environment variable
/// `env` to repeat a run's choices.
pub fn seeded_rng(label: &str, env: &str) -> StdRng {
    let seed = std::env::var(env)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    eprintln!("{label}: seed {seed} ({env}={seed} repeats the choices)");
    StdRng::seed_from_u64(seed)
}

// ---------------------------------------------------------------------------------------
// A private PostgreSQL cluster: the machine's shared server is used by other tests at the
// same time and must not be restarted.

pub struct PgCluster {
    pub dir: tempfile::TempDir,
    bin: PathBuf,
    pub port: u16,
    as_root: bool,
    max_connections: u32,
}

/// The server binaries of the newest PostgreSQL installed the Debian way.
pub fn pg_bin() -> PathBuf {
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

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

pub fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

pub fn id_of(user: &str, flag: &str) -> u32 {
    let out = Command::new("id").args([flag, user]).output().expect("id");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("no `{user}` user (the postgresql package creates it)"))
}

impl PgCluster {
    pub fn start() -> PgCluster {
        PgCluster::start_with(60)
    }

    /// A cluster that accepts `max_connections` (several daemons need more than one).
    pub fn start_with(max_connections: u32) -> PgCluster {
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
            max_connections,
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

    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn command(&self, tool: &str) -> Command {
        let path = self.bin.join(tool);
        if self.as_root {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        }
    }

    pub fn start_server(&self) {
        // fsync off: the machine does not crash in these tests, only the server does,
        // and the kernel keeps what it wrote.
        let options = format!(
            "-h 127.0.0.1 -p {} -k {} -c fsync=off -c max_connections={}",
            self.port,
            self.dir.path().display(),
            self.max_connections
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
    pub fn stop_immediate(&self) {
        let _ = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }

    pub fn url(&self, db: &str) -> String {
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
pub struct SimPorts {
    pub ssh: u16,
    pub telnet: u16,
    pub api: u16,
    pub coa: u16,
}

/// A `nasd sim` child process with `--record`, restartable on the same ports.
pub struct SimProc {
    pub listen: String,
    pub latency: String,
    /// `--max-sessions`: live connections allowed per protocol; more are refused and
    /// recorded (`<ms> refused ssh`).
    pub max_sessions: usize,
    pub record: PathBuf,
    pub host_key: PathBuf,
    ports: Option<SimPorts>,
    child: Option<Child>,
}

/// The address printed after `label` ("ssh on 127.0.0.1:2222, ...").
pub fn addr_after(line: &str, label: &str) -> Option<SocketAddr> {
    let rest = &line[line.find(label)? + label.len()..];
    let end = rest.find([',', ' ']).unwrap_or(rest.len());
    rest[..end].parse().ok()
}

impl SimProc {
    pub fn start(dir: &Path, name: &str, listen: &str, latency: &str) -> SimProc {
        SimProc::start_with(dir, name, listen, latency, 100)
    }

    pub fn start_with(
        dir: &Path,
        name: &str,
        listen: &str,
        latency: &str,
        max_sessions: usize,
    ) -> SimProc {
        let mut sim = SimProc {
            listen: listen.to_string(),
            latency: latency.to_string(),
            max_sessions,
            record: dir.join(format!("{name}.record")),
            host_key: dir.join(format!("{name}.host_key")),
            ports: None,
            child: None,
        };
        sim.spawn();
        sim
    }

    pub fn spawn(&mut self) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_nasd"));
        cmd.args(["sim", "--listen", &self.listen, "--latency", &self.latency])
            .args(["--max-sessions", &self.max_sessions.to_string(), "--record"])
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

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn ports(&self) -> SimPorts {
        self.ports.expect("sim started")
    }
}

impl Drop for SimProc {
    fn drop(&mut self) {
        self.kill();
    }
}

pub enum Peer {
    Sim(SimProc),
    OpenSsh(Sshd),
}

pub struct Device {
    pub nas: Nas,
    pub label: &'static str,
    pub peer: Peer,
}

/// The event id a recorded command names (`=ev<id>`).
pub fn event_in(text: &str) -> Option<i64> {
    number_after(text, "=ev")
}

/// The ownership epoch a recorded command names (`=d<epoch>`, from a template's
/// `d{{ nas_epoch }}`).
pub fn epoch_in(text: &str) -> Option<i64> {
    number_after(text, "=d")
}

fn number_after(text: &str, marker: &str) -> Option<i64> {
    let at = text.find(marker)? + marker.len();
    let digits: String = text[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

/// One line of a simulator's `--record` file: `<unix ms> <kind> <command>`, where kind
/// `refused` marks a connection turned away for `--max-sessions` (the command is then
/// the protocol).
#[derive(Debug, Clone, PartialEq)]
pub struct Recorded {
    pub ms: i64,
    pub kind: String,
    pub text: String,
}

impl Recorded {
    pub fn parse(line: &str) -> Option<Recorded> {
        let (ms, rest) = line.split_once(' ')?;
        let (kind, text) = rest.split_once(' ').unwrap_or((rest, ""));
        Some(Recorded {
            ms: ms.parse().ok()?,
            kind: kind.to_string(),
            text: text.to_string(),
        })
    }

    pub fn is_refusal(&self) -> bool {
        self.kind == "refused"
    }

    pub fn event(&self) -> Option<i64> {
        event_in(&self.text)
    }

    pub fn epoch(&self) -> Option<i64> {
        epoch_in(&self.text)
    }

    pub fn at(&self) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(self.ms).unwrap_or_default()
    }
}

impl Device {
    fn record_text(&self) -> String {
        match &self.peer {
            Peer::Sim(sim) => std::fs::read_to_string(&sim.record).unwrap_or_default(),
            Peer::OpenSsh(sshd) => std::fs::read_to_string(&sshd.record).unwrap_or_default(),
        }
    }

    /// A simulator's record, line by line (empty for the OpenSSH recorder, whose lines
    /// carry no time).
    pub fn records(&self) -> Vec<Recorded> {
        match &self.peer {
            Peer::Sim(_) => self
                .record_text()
                .lines()
                .filter_map(Recorded::parse)
                .collect(),
            Peer::OpenSsh(_) => Vec::new(),
        }
    }

    /// The commands the device applied, in order, as the event ids they name (None for a
    /// command that names no event). Refused connections are not commands.
    pub fn received(&self) -> Vec<Option<i64>> {
        self.received_except(&HashSet::new())
    }

    /// [`Device::received`] without the record lines in `skip` (whole lines as
    /// recorded).
    pub fn received_except(&self, skip: &HashSet<String>) -> Vec<Option<i64>> {
        let text = self.record_text();
        let sim = matches!(self.peer, Peer::Sim(_));
        text.lines()
            .filter(|line| !(sim && Recorded::parse(line).is_some_and(|r| r.is_refusal())))
            .filter(|line| !skip.contains(*line))
            .map(event_in)
            .collect()
    }

    /// Connections the device refused (only simulators refuse), as record times.
    pub fn refusals(&self) -> Vec<Recorded> {
        self.records()
            .into_iter()
            .filter(Recorded::is_refusal)
            .collect()
    }
}

// ---------------------------------------------------------------------------------------
// The daemon

pub struct Daemon {
    pub config: PathBuf,
    /// The working directory (relative paths of the config resolve there), if not the
    /// test's own.
    pub dir: Option<PathBuf>,
    /// Where its stderr goes.
    pub log: PathBuf,
    /// `NASD_LOG` for it.
    pub filter: String,
    child: Option<Child>,
    /// Exits nobody asked for (the daemon gave up on its own).
    pub unexpected_exits: Vec<String>,
}

impl Daemon {
    /// A daemon (not started) with `--config config`, its stderr appended to `log`, and
    /// the tracing filter from the environment variable `filter_env` (default `warn`).
    pub fn new(config: PathBuf, log: PathBuf, filter_env: &str) -> Daemon {
        Daemon {
            config,
            dir: None,
            log,
            filter: std::env::var(filter_env).unwrap_or_else(|_| "warn".into()),
            child: None,
            unexpected_exits: Vec::new(),
        }
    }

    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("daemon log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_nasd"));
        cmd.arg("--config")
            .arg(&self.config)
            .arg("run")
            .env("NASD_LOG", &self.filter)
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(dir) = &self.dir {
            cmd.current_dir(dir);
        }
        self.child = Some(cmd.spawn().expect("start nasd"));
    }

    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Sends `signal` (`TERM`, `STOP`, `CONT`) with kill(1).
    pub fn signal(&self, signal: &str) {
        let pid = self.pid().expect("daemon running");
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} {pid} failed");
    }

    /// SIGTERM, then waits (polling) for the exit; SIGKILL after `limit`. The exit
    /// status, None if it had to be killed.
    pub async fn terminate(&mut self, limit: Duration) -> Option<ExitStatus> {
        self.signal("TERM");
        let deadline = Instant::now() + limit;
        loop {
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                self.child = None;
                return Some(status);
            }
            if Instant::now() > deadline {
                self.kill9();
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Notes (and restarts after) an exit nobody caused.
    pub fn check_alive(&mut self) {
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

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Panics the daemon reported on stderr.
    pub fn panics(&self) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .matches("panicked")
            .count()
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
pub enum Feed {
    /// This many events per second.
    Rate(f64),
    /// Keeps this many events pending (compact + stack), so the NAS never runs dry.
    Backlog(i64),
    Off,
}

pub struct Feeder {
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
    pub fn start(pool: PgPool, modes: HashMap<i64, Feed>, total: Option<i64>, seed: u64) -> Feeder {
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

    pub fn set(&self, nas_id: i64, feed: Feed) {
        self.modes.lock().expect("modes").insert(nas_id, feed);
    }

    pub fn count(&self) -> i64 {
        self.confirmed.lock().expect("confirmed").len() as i64
    }

    pub async fn finish(self) -> Vec<i64> {
        self.stop.cancel();
        let _ = self.join.await;
        std::mem::take(&mut *self.confirmed.lock().expect("confirmed"))
    }

    pub fn done(&self) -> bool {
        self.join.is_finished()
    }
}

pub async fn pending_by_nas(pool: &PgPool) -> Option<HashMap<i64, i64>> {
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
pub fn accounts_of(nas_id: i64, n_nas: i64) -> Vec<i64> {
    (1..=ACCOUNTS_PER_NAS * n_nas)
        .filter(|u| (u - 1) % n_nas + 1 == nas_id)
        .collect()
}

pub async fn feed(
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

pub async fn harness_pool(url: &str) -> PgPool {
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

/// Accounts 1..=ACCOUNTS_PER_NAS*n, round-robin over NAS 1..=n.
pub async fn add_accounts(store: &Store, n_nas: i64) {
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
// The end-of-run checks

/// The checks every scenario ends with: the database and the devices agree that every
/// confirmed event was delivered exactly once (repeats counted), in order per account.
pub async fn verify(
    pool: &PgPool,
    devices: &[Device],
    daemons: &[&Daemon],
    confirmed: &[i64],
) -> Check {
    verify_except(pool, devices, daemons, confirmed, &HashMap::new()).await
}

/// [`verify`], leaving out of the devices' records the lines in `skip` (per NAS id):
/// commands a test allows and accounts for itself (a frozen daemon's late command).
pub async fn verify_except(
    pool: &PgPool,
    devices: &[Device],
    daemons: &[&Daemon],
    confirmed: &[i64],
    skip: &HashMap<i64, HashSet<String>>,
) -> Check {
    let none = HashSet::new();
    let rows = sqlx::query(
        "SELECT event_id, compact_id, user_id, nas_id, outcome, attempts FROM events_history",
    )
    .fetch_all(pool)
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
    .fetch_one(pool)
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
    for device in devices {
        for id in device.received_except(skip.get(&device.nas.id).unwrap_or(&none)) {
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
            if check.order_details.len() < 5 {
                check.order_details.push(format!(
                    "account {user}: expected {}, devices got {}",
                    around_mismatch(want, &seq),
                    around_mismatch(&seq, want)
                ));
            }
        }
    }
    check.unexpected_exits = daemons.iter().map(|d| d.unexpected_exits.len()).sum();
    check.panics = daemons.iter().map(|d| d.panics()).sum();
    check.refused = devices.iter().map(|d| d.refusals().len() as i64).sum();
    check
}
/// `seq` from a little before its first difference with `other`, for a message.
fn around_mismatch(seq: &[i64], other: &[i64]) -> String {
    let first = seq
        .iter()
        .zip(other)
        .position(|(a, b)| a != b)
        .unwrap_or(seq.len().min(other.len()));
    let from = first.saturating_sub(2);
    let to = (first + 4).min(seq.len());
    format!("[..{from}] {:?} (of {})", &seq[from..to], seq.len())
}

// ---------------------------------------------------------------------------------------
// Figures

#[derive(Debug, Default)]
pub struct Check {
    pub events: i64,
    pub not_done: i64,
    pub history_repeats: i64,
    pub lost_in_db: i64,
    pub lost_on_device: i64,
    pub left_queued: i64,
    pub unexpected: i64,
    pub duplicates: i64,
    /// The events that reached a device more than once.
    pub repeated: HashSet<i64>,
    pub order_violations: i64,
    /// The first violations: the account and the two sequences around the mismatch.
    pub order_details: Vec<String>,
    pub max_attempts: i32,
    pub unexpected_exits: usize,
    pub panics: usize,
    /// Connections the simulators refused for `--max-sessions`.
    pub refused: i64,
}

pub struct Figures {
    pub scenario: String,
    pub faults: String,
    pub check: Check,
    /// Repeats allowed: the events in flight at each fault.
    pub allowed_duplicates: i64,
    /// When known, which events were in flight: only they may repeat.
    pub in_flight: Option<HashSet<i64>>,
    pub resume: String,
    pub other: String,
}

pub fn percentile(values: &[Duration], p: f64) -> Duration {
    if values.is_empty() {
        return Duration::ZERO;
    }
    let mut v = values.to_vec();
    v.sort();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

pub fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

pub const HEADER: &str = "| scenario | events | faults | lost | unexpected | duplicates (allowed) | order violations | history repeats / not done / left queued | resume after the fault p50 / max | other |\n|---|---|---|---|---|---|---|---|---|---|";

impl Figures {
    pub fn row(&self) -> String {
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

    /// Prints the row (stderr, and the file the environment variable `figures_env`
    /// names), then asserts what must hold.
    pub fn report_and_check(self, figures_env: &str) {
        publish(figures_env, Some(HEADER), &self.row());
        self.check();
    }

    /// Asserts what must hold after any run: nothing lost, nothing unexpected, order
    /// kept, repeats only of events in flight at a fault, no exit nobody asked for.
    pub fn check(&self) {
        let c = &self.check;
        let s = &self.scenario;
        // Every failed condition is named at once: one run often shows several sides
        // of the same fault.
        let mut failed: Vec<String> = Vec::new();
        let mut expect = |ok: bool, what: String| {
            if !ok {
                failed.push(what);
            }
        };
        expect(
            c.lost_in_db == 0,
            format!("{} confirmed events missing from history", c.lost_in_db),
        );
        expect(
            c.lost_on_device == 0,
            format!("{} events done but never received", c.lost_on_device),
        );
        expect(
            c.unexpected == 0,
            format!("devices received {} commands of no event", c.unexpected),
        );
        expect(
            c.history_repeats == 0,
            format!("{} events reached history twice", c.history_repeats),
        );
        expect(c.not_done == 0, format!("{} events failed", c.not_done));
        expect(
            c.left_queued == 0,
            format!("{} events left queued", c.left_queued),
        );
        expect(
            c.order_violations == 0,
            format!(
                "{} accounts received events out of order:\n{}",
                c.order_violations,
                c.order_details.join("\n")
            ),
        );
        expect(
            c.duplicates <= self.allowed_duplicates,
            format!(
                "{} repeats, more than the {} events in flight at the faults",
                c.duplicates, self.allowed_duplicates
            ),
        );
        if let Some(in_flight) = &self.in_flight {
            let mut strays: Vec<&i64> = c.repeated.difference(in_flight).collect();
            strays.sort();
            expect(
                strays.is_empty(),
                format!("events repeated that were not in flight at a fault: {strays:?}"),
            );
        }
        expect(
            c.unexpected_exits == 0,
            format!("the daemon exited on its own {} times", c.unexpected_exits),
        );
        expect(
            c.panics == 0,
            format!("the daemon panicked {} times", c.panics),
        );
        assert!(failed.is_empty(), "{s}:\n- {}", failed.join("\n- "));
    }
}

/// Prints `text` to stderr and appends it to the file the environment variable `env`
/// names (if set), after `header` when that file is still empty.
pub fn publish(env: &str, header: Option<&str>, text: &str) {
    match header {
        Some(header) => eprintln!("\n{header}\n{text}\n"),
        None => eprintln!("{text}"),
    }
    if let Ok(path) = std::env::var(env)
        && let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
    {
        if let Some(header) = header
            && f.metadata().is_ok_and(|m| m.len() == 0)
        {
            let _ = writeln!(f, "{header}");
        }
        let _ = writeln!(f, "{text}");
    }
}

/// Random points of a run (fractions of its events), sorted.
pub fn random_points(rng: &mut StdRng, n: usize, from: f64, to: f64) -> Vec<f64> {
    let mut points: Vec<f64> = (0..n).map(|_| rng.random_range(from..to)).collect();
    points.sort_by(f64::total_cmp);
    points
}
