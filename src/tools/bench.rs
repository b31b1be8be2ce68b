//! `nasd bench`: events/s and enqueue-to-done latency through the whole pipeline
//! (compact stack -> expansion -> claim -> transport -> history) on a fresh database.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::progress::{Format, Progress};
use super::scratch::{self, ScratchDb, ScratchDir};
use crate::config::Config;
use crate::store::{CompactEvent, Nas, Store};

// The old path, kept while tests use it.
pub use super::scratch::replace_db_name;

#[derive(Debug, Clone, clap::Args)]
pub struct BenchOptions {
    /// `sqlite` (a temporary file) or a PostgreSQL server URL such as
    /// postgres://postgres@127.0.0.1:5432/test: a temporary database is created on that
    /// server and dropped afterwards; the named database is not touched.
    #[arg(long, default_value = "sqlite")]
    pub database: String,
    /// `null` (in-process, sends nowhere), `exec` (a no-op local script per event),
    /// `ssh-sim` / `telnet-sim` / `api-sim` / `api-tls-sim` / `coa-sim` (mikrotik-ssh /
    /// -telnet / -api / -api-ssl / -coa to the in-process simulator), `coa-pyrad`
    /// (mikrotik-coa to the pyrad NAS of the test peers).
    #[arg(long, default_value = "null")]
    pub transport: String,
    /// Simulated device latency per command (the *-sim transports).
    #[arg(long, default_value = "0ms")]
    pub latency: String,
    /// Sessions per NAS (`max_sessions`), and the simulator's session limit for the
    /// *-sim transports (default: as many as --workers, at most 100; the simulator 1000).
    #[arg(long)]
    pub max_sessions: Option<i32>,
    /// `[transport] connect_timeout` for the run (default 10s).
    #[arg(long)]
    pub connect_timeout: Option<String>,
    /// Also time N commands sent the way the original daemon does (a new `ssh` process
    /// and connection per command) to the same simulator, serially and 8 at a time.
    #[arg(long, default_value_t = 0)]
    pub baseline: usize,
    #[arg(long, default_value_t = 20000)]
    pub events: i64,
    #[arg(long, default_value_t = 2000)]
    pub accounts: i64,
    /// Worker tasks per NAS.
    #[arg(long, default_value_t = 64)]
    pub workers: i32,
    /// Number of NAS the accounts are spread over.
    #[arg(long, default_value_t = 2)]
    pub nas: i64,
    /// Enqueue at this many events/s while the daemon runs (0: enqueue everything
    /// first, a burst such as after a NAS reboot).
    #[arg(long, default_value_t = 0)]
    pub rate: i64,
    /// `[log] max_size` and `account_max_size` for the run (e.g. 1MB; 0: no rotation);
    /// without it the defaults apply.
    #[arg(long)]
    pub log_max_size: Option<String>,
    /// `[log] gzip = true`: compress rotated logs.
    #[arg(long)]
    pub log_gzip: bool,
    /// `[log] format`: text or json.
    #[arg(long, default_value = "text")]
    pub log_format: String,
    /// Write the NAS and account logs here and keep them (default: a temporary
    /// directory, removed afterwards). A second run into the same directory measures
    /// with the account log directories and files already there, as in production.
    #[arg(long)]
    pub log_dir: Option<std::path::PathBuf>,
    /// Idle mode: configure this many NAS (local-script scheme, no events), start the
    /// daemon with its default timings and print how long the owners took to start, then
    /// the CPU, RSS and database calls per second over `--seconds`.
    #[arg(long, default_value_t = 0)]
    pub idle_nas: i64,
    /// Idle mode: how long to measure.
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
    /// First run the same events spread over this many NAS with the default 64 workers
    /// (the reference), then this run, and print this run's rate as a share of the
    /// reference's, measured in the same minute (the many-NAS check: `--nas 1000
    /// --workers 4 --compare-nas 2`).
    #[arg(long, default_value_t = 0)]
    pub compare_nas: i64,
    /// Expansion only (`[billing]`): expand --events compact events for --accounts
    /// accounts with the variables from nasd's own `accounts` table, then with the same
    /// variables from a MariaDB/MySQL billing database (a scratch database created on
    /// this server, e.g. mysql://root@127.0.0.1:3306), and print both events/s.
    #[arg(long)]
    pub billing_mysql: Option<String>,
}

pub struct BenchResult {
    pub events: i64,
    /// Device commands sent in all (several per event for some schemes).
    pub commands: i64,
    pub elapsed: Duration,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub failed: i64,
    /// Process-per-command figures (serial, 8 in parallel), when asked for.
    pub baseline: Option<(f64, f64)>,
}

/// The device a benchmark talks to, kept alive for the run.
enum Peer {
    None,
    Sim(Box<crate::sim::Sim>),
    // Held only so the process is killed when the benchmark ends.
    Pyrad(#[allow(dead_code)] KillOnDrop),
}

/// A peer process that must not outlive the benchmark.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// How the benchmark's NAS reach their device.
struct Setup {
    scheme: String,
    schemes_dir: std::path::PathBuf,
    cmds: Vec<&'static str>,
    host: String,
    port: Option<i32>,
    login: Option<String>,
    password: Option<String>,
    secret: Option<String>,
    peer: Peer,
    /// More devices for NAS 2..N (coa-sim, api-sim): address and port each.
    more: Vec<(String, i32)>,
    more_sims: Vec<crate::sim::Sim>,
}

async fn setup(opts: &BenchOptions, tmp: &Path) -> anyhow::Result<Setup> {
    let repo_schemes = super::demo::default_schemes_dir();
    let local = |scheme: &str, cmds: Vec<&'static str>| Setup {
        scheme: scheme.into(),
        schemes_dir: tmp.join("schemes"),
        cmds,
        host: String::new(),
        port: None,
        login: None,
        password: None,
        secret: None,
        peer: Peer::None,
        more: Vec::new(),
        more_sims: Vec::new(),
    };
    Ok(match opts.transport.as_str() {
        "null" => local("bench-null", vec!["user_add", "user_rate_set", "user_drop"]),
        "exec" => local("bench-exec", vec!["user_add", "user_rate_set", "user_drop"]),
        "coa-sim" | "api-sim" | "api-tls-sim" => {
            let sim_opts = crate::sim::SimOptions {
                latency: opts.latency.clone(),
                max_sessions: sim_max_sessions(opts),
                secret: "bench-secret".into(),
                ..Default::default()
            };
            let sim = crate::sim::start(&sim_opts, CancellationToken::new()).await?;
            let coa = opts.transport == "coa-sim";
            let tls = opts.transport == "api-tls-sim";
            let pick = |sim: &crate::sim::Sim| match opts.transport.as_str() {
                "coa-sim" => sim.coa_addr,
                "api-tls-sim" => sim.api_tls_addr,
                _ => sim.api_addr,
            };
            let addr = pick(&sim);
            // One simulated router per NAS, on 127.0.0.N (all of 127/8 is loopback).
            let mut more = Vec::new();
            let mut more_sims = Vec::new();
            for n in 2..=opts.nas.max(1) {
                let extra = crate::sim::start(
                    &crate::sim::SimOptions {
                        listen: format!("127.0.0.{n}"),
                        ..sim_opts.clone()
                    },
                    CancellationToken::new(),
                )
                .await?;
                let a = pick(&extra);
                more.push((a.ip().to_string(), i32::from(a.port())));
                more_sims.push(extra);
            }
            Setup {
                scheme: match (coa, tls) {
                    (true, _) => "mikrotik-coa",
                    (false, true) => "mikrotik-api-ssl",
                    (false, false) => "mikrotik-api",
                }
                .into(),
                schemes_dir: repo_schemes,
                cmds: vec![if coa { "user_rate_set" } else { "user_accept" }],
                host: addr.ip().to_string(),
                port: Some(i32::from(addr.port())),
                login: Some(sim_opts.user.clone()),
                password: Some(sim_opts.password.clone()),
                secret: Some("bench-secret".into()),
                peer: Peer::Sim(Box::new(sim)),
                more,
                more_sims,
            }
        }
        "ssh-sim" | "telnet-sim" => {
            let sim_opts = crate::sim::SimOptions {
                latency: opts.latency.clone(),
                max_sessions: sim_max_sessions(opts),
                host_key: Some(tmp.join("sim_host_key")),
                ..Default::default()
            };
            let sim = crate::sim::start(&sim_opts, CancellationToken::new()).await?;
            let ssh = opts.transport == "ssh-sim";
            let addr = if ssh { sim.ssh_addr } else { sim.telnet_addr };
            Setup {
                scheme: if ssh {
                    "mikrotik-ssh"
                } else {
                    "mikrotik-telnet"
                }
                .into(),
                schemes_dir: repo_schemes,
                // One command per event, so events/s is commands/s.
                cmds: vec!["user_drop"],
                host: addr.ip().to_string(),
                port: Some(i32::from(addr.port())),
                login: Some(sim_opts.user.clone()),
                password: Some(sim_opts.password.clone()),
                secret: None,
                peer: Peer::Sim(Box::new(sim)),
                more: Vec::new(),
                more_sims: Vec::new(),
            }
        }
        "coa-pyrad" => {
            let root = Path::new(env!("CARGO_MANIFEST_DIR"));
            let mut child = std::process::Command::new(root.join(".venv-peers/bin/python"))
                .arg(root.join("tests/peers/radius/coa_nas.py"))
                .arg("bench-secret")
                .arg(root.join("tests/peers/radius/dictionary"))
                .arg(tmp.join("pyrad.jsonl"))
                .stdout(std::process::Stdio::piped())
                .spawn()
                .context(
                    "starting the pyrad NAS (bash scripts/test-setup.sh installs .venv-peers)",
                )?;
            let mut line = String::new();
            if let Some(out) = child.stdout.take() {
                use std::io::BufRead;
                std::io::BufReader::new(out).read_line(&mut line)?;
            }
            let port: i32 = line
                .trim()
                .strip_prefix("READY ")
                .and_then(|p| p.parse().ok())
                .with_context(|| format!("pyrad NAS said {line:?}"))?;
            Setup {
                scheme: "mikrotik-coa".into(),
                schemes_dir: repo_schemes,
                cmds: vec!["user_rate_set"],
                host: "127.0.0.1".into(),
                port: Some(port),
                login: None,
                password: None,
                secret: Some("bench-secret".into()),
                peer: Peer::Pyrad(KillOnDrop(child)),
                more: Vec::new(),
                more_sims: Vec::new(),
            }
        }
        other => anyhow::bail!(
            "--transport {other}: expected null, exec, ssh-sim, telnet-sim, api-sim, api-tls-sim, coa-sim or coa-pyrad"
        ),
    })
}

/// The simulator's session limit: `--max-sessions` when given, else out of the way.
fn sim_max_sessions(opts: &BenchOptions) -> usize {
    opts.max_sessions
        .map_or(1000, |n| usize::try_from(n.max(1)).unwrap_or(1))
}

/// The original daemon's way: one `ssh` process (and connection, key exchange, login)
/// per command. Returns commands/s serially and with 8 processes at a time.
async fn process_per_command(
    addr: std::net::SocketAddr,
    tmp: &Path,
    n: usize,
) -> anyhow::Result<(f64, f64)> {
    let askpass = tmp.join("askpass.sh");
    std::fs::write(&askpass, "#!/bin/sh\necho admin\n")?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&askpass, std::fs::Permissions::from_mode(0o755))?;
    let one = |i: usize| {
        let askpass = askpass.clone();
        async move {
            let status = tokio::process::Command::new("ssh")
                .args([
                    "-o",
                    "StrictHostKeyChecking=no",
                    "-o",
                    "UserKnownHostsFile=/dev/null",
                    "-o",
                    "LogLevel=ERROR",
                    "-o",
                    "PreferredAuthentications=password",
                    "-o",
                    "PubkeyAuthentication=no",
                    "-p",
                    &addr.port().to_string(),
                    &format!("admin@{}", addr.ip()),
                    &format!(
                        "/ip firewall address-list add list=baseline address=10.1.{}.{}",
                        i / 250,
                        i % 250
                    ),
                ])
                .env("SSH_ASKPASS", &askpass)
                .env("SSH_ASKPASS_REQUIRE", "force")
                .env("DISPLAY", ":0")
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .status()
                .await?;
            anyhow::ensure!(status.success(), "ssh exited with {status}");
            anyhow::Ok(())
        }
    };
    let started = Instant::now();
    for i in 0..n {
        one(i).await?;
    }
    let serial = n as f64 / started.elapsed().as_secs_f64();
    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..n {
        if set.len() >= 8
            && let Some(done) = set.join_next().await
        {
            done??;
        }
        set.spawn(one(n + i));
    }
    while let Some(done) = set.join_next().await {
        done??;
    }
    let parallel = n as f64 / started.elapsed().as_secs_f64();
    Ok((serial, parallel))
}

pub async fn run(opts: BenchOptions) -> anyhow::Result<()> {
    if let Some(billing) = &opts.billing_mysql {
        return super::bench_billing::run(&opts, billing).await;
    }
    if opts.idle_nas > 0 {
        let r = measure_idle(&opts).await?;
        println!(
            "bench: idle database={} nas={} seconds={}",
            if opts.database == "sqlite" {
                "sqlite"
            } else {
                "postgres"
            },
            opts.idle_nas,
            opts.seconds
        );
        println!(
            "bench: {} owners started in {:.2}s; over {}s idle: CPU {:.2}% of one core, RSS {} MB (peak {} MB), {:.2} database calls/s ({} in all)",
            r.owners,
            r.started_in.as_secs_f64(),
            opts.seconds,
            r.cpu_percent,
            r.rss_kb / 1024,
            r.peak_rss_kb / 1024,
            r.calls as f64 / opts.seconds.max(1) as f64,
            r.calls
        );
        return Ok(());
    }
    let reference = if opts.compare_nas > 0 {
        let reference_opts = BenchOptions {
            nas: opts.compare_nas,
            workers: 64,
            compare_nas: 0,
            ..opts.clone()
        };
        Some(measure(&reference_opts).await?)
    } else {
        None
    };
    let result = measure(&opts).await?;
    println!(
        "bench: database={} transport={} events={} accounts={} nas={} workers={} max_sessions={} latency={} rate={}",
        if opts.database == "sqlite" {
            "sqlite"
        } else {
            "postgres"
        },
        opts.transport,
        opts.events,
        opts.accounts,
        opts.nas,
        opts.workers,
        nas_max_sessions(&opts),
        opts.latency,
        if opts.rate == 0 {
            "burst".to_string()
        } else {
            format!("{}/s", opts.rate)
        }
    );
    println!(
        "bench: {} events in {:.2}s = {:.0} events/s, {:.0} device commands/s; enqueue-to-done p50 {:.1} ms, p99 {:.1} ms; failed {}",
        result.events,
        result.elapsed.as_secs_f64(),
        result.events as f64 / result.elapsed.as_secs_f64(),
        result.commands as f64 / result.elapsed.as_secs_f64(),
        result.p50_ms,
        result.p99_ms,
        result.failed
    );
    if let Some(reference) = reference {
        let rate = |r: &BenchResult| r.events as f64 / r.elapsed.as_secs_f64().max(1e-9);
        println!(
            "bench: reference nas={} workers=64: {} events in {:.2}s = {:.0} events/s; this run reaches {:.0}% of it",
            opts.compare_nas,
            reference.events,
            reference.elapsed.as_secs_f64(),
            rate(&reference),
            100.0 * rate(&result) / rate(&reference).max(1e-9)
        );
    }
    if let Some((serial, parallel)) = result.baseline {
        println!(
            "bench: process per command (new `ssh` client and connection each, as the original daemon): {serial:.1} commands/s serial, {parallel:.1} commands/s 8 in parallel"
        );
    }
    Ok(())
}

fn write_schemes(dir: &Path) -> anyhow::Result<()> {
    let null = dir.join("bench-null");
    std::fs::create_dir_all(&null)?;
    std::fs::write(
        null.join("scheme.toml"),
        "description = \"benchmark: renders RouterOS commands, sends nowhere\"\n\
         transport = \"null\"\ndialect = \"routeros\"\n[commands]\n\
         user_add = [\"/ip firewall address-list add list=allowed address={{ ip }} comment=crb_{{ ip }}\"]\n\
         user_drop = [\"/ip firewall address-list remove [find comment=crb_{{ ip }}]\"]\n\
         user_rate_set = [\"/queue simple set [find name=crb_{{ ip }}] max-limit={{ rate_in }}k/{{ rate_out }}k\"]\n",
    )?;
    let exec = dir.join("bench-exec");
    std::fs::create_dir_all(exec.join("bin"))?;
    std::fs::write(
        exec.join("scheme.toml"),
        "description = \"benchmark: a no-op local script\"\ntransport = \"exec\"\n\
         dialect = \"shell\"\nscript = \"bin/noop\"\ntimeout = \"10s\"\n",
    )?;
    let script = exec.join("bin/noop");
    std::fs::write(&script, "#!/bin/sh\nexit 0\n")?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// Creates a fresh database, loads it, runs the daemon in-process until every event is in
/// history, and reads the latencies.
pub async fn measure(opts: &BenchOptions) -> anyhow::Result<BenchResult> {
    let scratch_dir = ScratchDir::create("nasd-bench")?;
    let tmp = scratch_dir.path();
    write_schemes(&tmp.join("schemes"))?;
    let setup = setup(opts, tmp).await?;
    let db = ScratchDb::create(
        &opts.database,
        &tmp.join("bench.db"),
        &format!("nasd_bench_{}", std::process::id()),
    )
    .await?;
    let mut result = measure_on(opts, &db.url, tmp, &setup).await;
    if let (Ok(r), Peer::Sim(sim)) = (&mut result, &setup.peer)
        && opts.baseline > 0
        && opts.transport == "ssh-sim"
    {
        match process_per_command(sim.ssh_addr, tmp, opts.baseline).await {
            Ok(baseline) => r.baseline = Some(baseline),
            Err(e) => result = Err(e),
        }
    }
    for sim in setup.more_sims {
        sim.stop().await;
    }
    if let Peer::Sim(sim) = setup.peer {
        let sim = *sim;
        sim.stop().await;
    }
    db.remove().await;
    result
}

/// What the idle benchmark saw.
pub struct IdleResult {
    pub owners: usize,
    /// From `nasd run` (the daemon's start) until every owner was running.
    pub started_in: Duration,
    /// Process CPU time over the measured seconds, as a percentage of one core.
    pub cpu_percent: f64,
    /// Resident memory at the end, and the most it reached (VmHWM), in KiB.
    pub rss_kb: u64,
    pub peak_rss_kb: u64,
    /// Database calls the daemon made while idle (each one statement or transaction).
    pub calls: u64,
}

/// User plus system CPU time of this process, from /proc/self/stat (in clock ticks of
/// 1/100 s, Linux's USER_HZ).
fn process_cpu_ticks() -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    // The command name may hold spaces; the fields after its closing parenthesis are
    // state (3rd field) onwards, so utime and stime (14th, 15th) are the 12th and 13th.
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| anyhow::anyhow!("/proc/self/stat: unexpected format"))?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let field = |i: usize| -> anyhow::Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("/proc/self/stat: no field {i}"))
    };
    Ok(field(11)? + field(12)?)
}

/// A `VmRSS:`-style line of /proc/self/status, in KiB.
fn status_kb(key: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("/proc/self/status: no {key}"))
}

/// `--idle-nas`: many NAS, no events, the daemon's default timings.
pub async fn measure_idle(opts: &BenchOptions) -> anyhow::Result<IdleResult> {
    let scratch_dir = ScratchDir::create("nasd-bench-idle")?;
    let tmp = scratch_dir.path();
    write_schemes(&tmp.join("schemes"))?;
    let db = ScratchDb::create(
        &opts.database,
        &tmp.join("bench.db"),
        &format!("nasd_bench_idle_{}", std::process::id()),
    )
    .await?;
    let result = measure_idle_on(opts, &db.url, tmp).await;
    db.remove().await;
    result
}

async fn measure_idle_on(opts: &BenchOptions, url: &str, tmp: &Path) -> anyhow::Result<IdleResult> {
    let mut cfg = Config::default();
    cfg.database.url = url.to_string();
    cfg.daemon.log_dir = tmp.join("log");
    cfg.daemon.schemes_dir = tmp.join("schemes");
    cfg.daemon.transport.known_hosts = tmp.join("known_hosts");
    cfg.validate()?;
    let store: Store = crate::daemon::open_store(&cfg).await?;
    for n in 1..=opts.idle_nas {
        store
            .nas_upsert(&Nas {
                scheme: Some("bench-exec".into()),
                n_workers: 4,
                ..Nas::new(
                    n,
                    &format!("idle{n}"),
                    &format!("10.{}.{}.{}", 100 + n / 65536, (n / 256) % 256, n % 256),
                )
            })
            .await?;
    }
    drop(store);
    let shutdown = CancellationToken::new();
    let started = Instant::now();
    let daemon = crate::daemon::start(cfg, shutdown.clone()).await?;
    let want = opts.idle_nas as usize;
    let owners = loop {
        let running = daemon.stats.snapshot().iter().filter(|s| s.running).count();
        if running >= want {
            break running;
        }
        if started.elapsed() > Duration::from_secs(600) {
            anyhow::bail!("only {running} of {want} owners started within 600 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let started_in = started.elapsed();
    // Let the start settle (every owner's first read of its window), then measure.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let calls_before = daemon.store.calls();
    let cpu_before = process_cpu_ticks()?;
    tokio::time::sleep(Duration::from_secs(opts.seconds.max(1))).await;
    let cpu = process_cpu_ticks()?.saturating_sub(cpu_before);
    let calls = daemon.store.calls().saturating_sub(calls_before);
    let rss_kb = status_kb("VmRSS:")?;
    let peak_rss_kb = status_kb("VmHWM:")?;
    shutdown.cancel();
    daemon.wait().await?;
    Ok(IdleResult {
        owners,
        started_in,
        cpu_percent: cpu as f64 / opts.seconds.max(1) as f64,
        rss_kb,
        peak_rss_kb,
        calls,
    })
}

/// Each NAS's `max_sessions`: `--max-sessions`, else one per worker up to 100.
fn nas_max_sessions(opts: &BenchOptions) -> i32 {
    opts.max_sessions
        .map_or(opts.workers.clamp(1, 100), |n| n.max(1))
}

async fn measure_on(
    opts: &BenchOptions,
    url: &str,
    tmp: &Path,
    setup: &Setup,
) -> anyhow::Result<BenchResult> {
    let device = !setup.host.is_empty();
    if device && opts.nas as usize != 1 + setup.more.len() {
        anyhow::bail!(
            "--transport {} talks to one device: use --nas 1",
            opts.transport
        );
    }
    let mut cfg = Config::default();
    cfg.database.url = url.to_string();
    cfg.database.max_connections = 16;
    cfg.daemon.log_dir = opts.log_dir.clone().unwrap_or_else(|| tmp.join("log"));
    cfg.daemon.schemes_dir = setup.schemes_dir.clone();
    cfg.daemon.transport.known_hosts = tmp.join("known_hosts");
    cfg.daemon.resync_interval = Duration::from_secs(5);
    cfg.daemon.poll_interval = Duration::from_millis(100);
    cfg.daemon.window = 20000;
    cfg.daemon.expand_batch = 2000;
    cfg.log.format =
        crate::journal::LogFormat::parse(&opts.log_format).map_err(|e| anyhow::anyhow!(e))?;
    if let Some(size) = &opts.log_max_size {
        let size = crate::journal::parse_size(size).map_err(|e| anyhow::anyhow!(e))?;
        cfg.log.max_size = size;
        cfg.log.account_max_size = size;
    }
    cfg.log.gzip = opts.log_gzip;
    if let Some(timeout) = &opts.connect_timeout {
        cfg.daemon.transport.connect_timeout = crate::duration::parse_duration(timeout)
            .map_err(|e| anyhow::anyhow!("--connect-timeout: {e}"))?;
    }
    cfg.validate()?;
    let store: Store = crate::daemon::open_store(&cfg).await?;
    for n in 1..=opts.nas.max(1) {
        store
            .nas_upsert(&Nas {
                scheme: Some(setup.scheme.clone()),
                n_workers: opts.workers,
                port: if n == 1 {
                    setup.port
                } else {
                    setup.more.get(n as usize - 2).map(|(_, p)| *p)
                },
                login: setup.login.clone(),
                password: setup.password.clone().map(crate::store::Secret::new),
                secret: setup.secret.clone().map(crate::store::Secret::new),
                max_sessions: nas_max_sessions(opts),
                host_key_policy: "accept-new".into(),
                ..Nas::new(
                    n,
                    &format!("bench{n}"),
                    &if device {
                        if n == 1 {
                            setup.host.clone()
                        } else {
                            setup
                                .more
                                .get(n as usize - 2)
                                .map(|(h, _)| h.clone())
                                .unwrap_or_default()
                        }
                    } else {
                        format!("10.254.0.{n}")
                    },
                )
            })
            .await?;
    }
    let accounts = scratch::accounts(
        &[
            "user_id",
            "abonent_id",
            "nas_id",
            "ip",
            "login",
            "rate_in",
            "rate_out",
        ],
        (1..=opts.accounts).map(|i| {
            vec![
                i.to_string(),
                i.to_string(),
                (1 + i % opts.nas.max(1)).to_string(),
                format!("10.{}.{}.{}", 64 + i / 65536, (i / 256) % 256, i % 256),
                format!("user{i}"),
                "10240".into(),
                "10240".into(),
            ]
        }),
    )?;
    for chunk in accounts.chunks(2000) {
        store.accounts_upsert(chunk).await?;
    }
    let cmds = &setup.cmds;
    let events: Vec<CompactEvent> = (0..opts.events)
        .map(|i| CompactEvent {
            cmd: cmds[(i / opts.accounts.max(1)) as usize % cmds.len()].into(),
            user_id: 1 + i % opts.accounts.max(1),
            acct_session_id: Some(format!("{:08X}", i)),
            ..Default::default()
        })
        .collect();
    let shutdown = CancellationToken::new();
    let started;
    let producer = if opts.rate <= 0 {
        for chunk in events.chunks(5000) {
            store.enqueue_compact(chunk).await?;
        }
        started = Instant::now();
        None
    } else {
        started = Instant::now();
        let store = store.clone();
        let rate = opts.rate;
        Some(tokio::spawn(async move {
            let tick = Duration::from_millis(20);
            let per_tick = ((rate as f64) * tick.as_secs_f64()).ceil().max(1.0) as usize;
            let mut next = Instant::now();
            for chunk in events.chunks(per_tick) {
                store.enqueue_compact(chunk).await?;
                next += tick;
                tokio::time::sleep_until(next).await;
            }
            anyhow::Ok(())
        }))
    };
    let daemon = tokio::spawn(crate::daemon::run(cfg.clone(), shutdown.clone()));
    // Counting history scans it whole: every 100 ms (the run's end is known to within
    // that), not more often, so that the count does not take the CPU it measures.
    let progress = Progress::start(Format::events("  progress", opts.events as u64));
    let (done, failed) = scratch::wait_drained(
        &store,
        opts.events,
        &daemon,
        Duration::from_millis(100),
        |done, failed| progress.set(done as u64, failed as u64),
    )
    .await?;
    let elapsed = started.elapsed();
    progress.finish();
    shutdown.cancel();
    daemon.await??;
    if let Some(p) = producer {
        p.await??;
    }
    let commands: i64 = store
        .history(None, i64::MAX)
        .await?
        .iter()
        .map(|h| h.commands.len() as i64)
        .sum();
    let (p50_ms, p99_ms) = scratch::latency_percentiles(&store).await?;
    Ok(BenchResult {
        events: done + failed,
        elapsed,
        p50_ms,
        p99_ms,
        failed,
        commands,
        baseline: None,
    })
}
