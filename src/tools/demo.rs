//! `nasd demo`: a fresh embedded SQLite database in its own directory, the NAS simulator
//! started in-process (RouterOS-like routers on loopback addresses), four NAS that reach
//! them over SSH, telnet, RADIUS CoA/Disconnect and the RouterOS API, one NAS on a
//! shipped local script, a few hundred accounts and a burst of events; shows progress and
//! a summary, and exits when the stack is drained.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::progress::{Format, Progress};
use super::scratch;
use crate::config::Config;
use crate::store::{CompactEvent, Nas};

#[derive(Debug, Clone, clap::Args)]
pub struct DemoOptions {
    /// Directory for the demo's database and logs (default: var/demo/<timestamp>).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Number of subscriber accounts.
    #[arg(long, default_value_t = 300)]
    pub accounts: i64,
    /// Events per account (a NAS reboot brings up to 5).
    #[arg(long, default_value_t = 5)]
    pub events_per_account: i64,
    /// Worker tasks per demo NAS.
    #[arg(long, default_value_t = 16)]
    pub workers: i32,
    /// Simulated router latency per command.
    #[arg(long, default_value = "5ms")]
    pub latency: String,
    /// Schemes directory (default: ./schemes, else the one shipped in the source tree).
    #[arg(long)]
    pub schemes_dir: Option<PathBuf>,
}

/// The demo's directory: the one given, or a new one under var/demo.
pub fn choose_dir(opts: &DemoOptions) -> PathBuf {
    opts.dir.clone().unwrap_or_else(|| {
        PathBuf::from("var/demo").join(chrono::Local::now().format("%Y%m%d-%H%M%S").to_string())
    })
}

pub fn default_schemes_dir() -> PathBuf {
    let local = PathBuf::from("schemes");
    if local.join("demo-exec/scheme.toml").exists() {
        local
    } else {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("schemes")
    }
}

/// The cmds a subscriber's life brings, in a plausible order.
const LIFE: &[&str] = &[
    "user_add",
    "user_rate_set",
    "user_drop",
    "user_redirect",
    "user_redirect_cancel",
    "user_accept",
    "user_info",
    "user_rate_set_cancel",
];

/// The same for a NAS driven by RADIUS (`mikrotik-coa` knows speed, redirect and drop).
const COA_LIFE: &[&str] = &[
    "user_rate_set",
    "user_redirect",
    "user_redirect_cancel",
    "user_rate_set",
    "user_rate_set_cancel",
    "user_drop",
];

/// NAS ids of the demo, in the order accounts are spread over them.
const DEMO_NAS: i64 = 5;
const COA_NAS_ID: i64 = 4;

pub async fn run(opts: DemoOptions) -> anyhow::Result<()> {
    let dir = choose_dir(&opts);
    if dir.join("nasd.db").exists() {
        anyhow::bail!(
            "{} already holds a demo database; pass a new --dir",
            dir.display()
        );
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut cfg = Config::default();
    cfg.database.url = format!("sqlite://{}", dir.join("nasd.db").display());
    cfg.daemon.log_dir = dir.join("log");
    cfg.daemon.schemes_dir = opts.schemes_dir.clone().unwrap_or_else(default_schemes_dir);
    cfg.daemon.resync_interval = Duration::from_secs(5);
    cfg.daemon.poll_interval = Duration::from_millis(50);
    cfg.daemon.retry_base = Duration::from_millis(200);
    cfg.validate()?;

    cfg.daemon.transport.known_hosts = dir.join("known_hosts");
    let store = crate::daemon::open_store(&cfg).await?;
    // Two simulated routers, as two NAS would be: one reached over SSH on 127.0.0.1,
    // one over telnet on 127.0.0.2 (Linux routes all of 127.0.0.0/8 to loopback).
    let sim_opts = |listen: &str, identity: &str, key: &str| crate::sim::SimOptions {
        listen: listen.into(),
        latency: opts.latency.clone(),
        identity: identity.into(),
        host_key: Some(dir.join(key)),
        ..Default::default()
    };
    let ssh_opts = sim_opts("127.0.0.1", "router-ssh", "sim1_host_key");
    let telnet_opts = sim_opts("127.0.0.2", "router-telnet", "sim2_host_key");
    let coa_opts = sim_opts("127.0.0.3", "router-coa", "sim3_host_key");
    let api_opts = sim_opts("127.0.0.4", "router-api", "sim4_host_key");
    let sim_ssh = crate::sim::start(&ssh_opts, CancellationToken::new()).await?;
    let sim_telnet = crate::sim::start(&telnet_opts, CancellationToken::new()).await?;
    let sim_coa = crate::sim::start(&coa_opts, CancellationToken::new()).await?;
    let sim_api = crate::sim::start(&api_opts, CancellationToken::new()).await?;
    let sim_nas =
        |id: i64, name: &str, scheme: &str, addr: std::net::SocketAddr, sessions: i32| Nas {
            scheme: Some(scheme.into()),
            n_workers: opts.workers,
            port: Some(i32::from(addr.port())),
            login: Some(ssh_opts.user.clone()),
            password: Some(crate::store::Secret::new(ssh_opts.password.clone())),
            max_sessions: sessions,
            // The simulator makes a new host key per demo directory: learn it once.
            host_key_policy: "accept-new".into(),
            ..Nas::new(id, name, &addr.ip().to_string())
        };
    let ssh_nas = sim_nas(
        1,
        "Sim_SSH",
        "mikrotik-ssh",
        sim_ssh.ssh_addr,
        opts.workers.clamp(1, 100),
    );
    let telnet_nas = sim_nas(
        2,
        "Sim_Telnet",
        "mikrotik-telnet",
        sim_telnet.telnet_addr,
        4,
    );
    let exec_nas = Nas {
        scheme: Some("demo-exec".into()),
        n_workers: opts.workers,
        login: Some("admin".into()),
        password: Some(crate::store::Secret::new("demo-password")),
        ..Nas::new(3, "Legacy_Script", "10.255.0.3")
    };
    // RADIUS needs no session: requests run in parallel up to the workers.
    let coa_nas = Nas {
        login: None,
        password: None,
        secret: Some(crate::store::Secret::new(coa_opts.secret.clone())),
        ..sim_nas(
            COA_NAS_ID,
            "Sim_CoA",
            "mikrotik-coa",
            sim_coa.coa_addr,
            opts.workers.clamp(1, 100),
        )
    };
    let api_nas = sim_nas(5, "Sim_API", "mikrotik-api", sim_api.api_addr, 4);
    for nas in [&ssh_nas, &telnet_nas, &exec_nas, &coa_nas, &api_nas] {
        store.nas_upsert(nas).await?;
    }
    let accounts = scratch::accounts(
        &[
            "user_id",
            "abonent_id",
            "nas_id",
            "login",
            "ip",
            "rate_in",
            "rate_out",
        ],
        (1..=opts.accounts).map(|i| {
            vec![
                i.to_string(),
                (1000 + i).to_string(),
                (1 + i % DEMO_NAS).to_string(),
                format!("user{i}"),
                format!("10.88.{}.{}", i / 250, i % 250 + 1),
                "10240".to_string(),
                "10240".to_string(),
            ]
        }),
    )?;
    store.accounts_upsert(&accounts).await?;
    let mut events = Vec::new();
    for round in 0..opts.events_per_account {
        for user_id in 1..=opts.accounts {
            let at = round as usize + user_id as usize;
            let on_coa = 1 + user_id % DEMO_NAS == COA_NAS_ID;
            let (cmd, session) = if on_coa {
                // A RADIUS event names the subscriber's session, as billing's radius
                // service does.
                (
                    COA_LIFE[at % COA_LIFE.len()],
                    Some(format!("demo-{user_id}")),
                )
            } else {
                (LIFE[at % LIFE.len()], None)
            };
            events.push(CompactEvent {
                cmd: cmd.into(),
                user_id,
                acct_session_id: session,
                ..Default::default()
            });
        }
    }
    // Two mistakes an operator meets in real life, to show how they are reported.
    events.push(CompactEvent {
        cmd: "user_frobnicate".into(),
        user_id: 1,
        ..Default::default()
    });
    events.push(CompactEvent {
        cmd: "user_add".into(),
        user_id: opts.accounts + 1000,
        ..Default::default()
    });
    let total = events.len() as i64;
    println!(
        "nasd demo: {} accounts on {DEMO_NAS} NAS, {} events ({} workers each):",
        opts.accounts, total, opts.workers
    );
    println!(
        "  NAS 1 Sim_SSH      mikrotik-ssh    -> simulated RouterOS, ssh {} (latency {})",
        sim_ssh.ssh_addr, opts.latency
    );
    println!(
        "  NAS 2 Sim_Telnet   mikrotik-telnet -> simulated RouterOS, telnet {} (4 sessions)",
        sim_telnet.telnet_addr
    );
    println!("  NAS 3 Legacy_Script demo-exec    -> schemes/demo-exec/bin/session, a local script");
    println!(
        "  NAS 4 Sim_CoA      mikrotik-coa    -> simulated RouterOS, RADIUS CoA/Disconnect {}",
        sim_coa.coa_addr
    );
    println!(
        "  NAS 5 Sim_API      mikrotik-api    -> simulated RouterOS, API {} (4 sessions)",
        sim_api.api_addr
    );
    println!("  database {}", cfg.database.url);
    let started = Instant::now();
    for chunk in events.chunks(1000) {
        store.enqueue_compact(chunk).await?;
    }
    let shutdown = CancellationToken::new();
    let daemon = tokio::spawn(crate::daemon::run(cfg.clone(), shutdown.clone()));
    let progress = Progress::start(Format::events("  progress", total as u64));
    let (done, failed) = scratch::wait_drained(
        &store,
        total,
        &daemon,
        Duration::from_millis(100),
        |done, failed| progress.set(done as u64, failed as u64),
    )
    .await?;
    let elapsed = started.elapsed();
    progress.finish();
    shutdown.cancel();
    daemon.await??;
    let (p50_ms, p99_ms) = scratch::latency_percentiles(&store).await?;
    println!(
        "summary: {} events in {:.2}s: {} done, {} failed, {:.0} events/s, enqueue-to-done p50 {:.0} ms p99 {:.0} ms",
        total,
        elapsed.as_secs_f64(),
        done,
        failed,
        total as f64 / elapsed.as_secs_f64(),
        p50_ms,
        p99_ms
    );
    let history = store.history(None, i64::MAX).await?;
    let superseded = history.iter().filter(|h| h.outcome == "superseded").count();
    if superseded > 0 {
        println!(
            "  of the done, {superseded} were superseded: replaced by a later event of the same \
             account and [coalesce] group while queued, so not sent"
        );
    }
    for row in history {
        if row.outcome == "failed" {
            println!(
                "  failed: event for user_id={} cmd={}: {}",
                row.user_id,
                row.cmd,
                row.error.unwrap_or_default()
            );
        }
    }
    for (name, sim) in [
        ("router-ssh", &sim_ssh),
        ("router-telnet", &sim_telnet),
        ("router-api", &sim_api),
    ] {
        let counters = sim.device.counters();
        let state = sim.device.state();
        println!(
            "  simulated {name} executed {} commands over {} sessions (at most {} at once); it now holds {} address-list entries and {} queues",
            counters.commands_executed,
            counters.sessions_opened,
            counters.max_concurrent_sessions,
            state.address_list.len(),
            state.queues.len()
        );
    }
    let coa = sim_coa.device.counters();
    println!(
        "  simulated router-coa answered {} CoA/Disconnect requests: {} ACK, {} NAK (a Disconnect for a session already gone is done); it now holds {} sessions",
        coa.coa_acks + coa.coa_naks,
        coa.coa_acks,
        coa.coa_naks,
        sim_coa.device.state().sessions.len()
    );
    let device_log = dir.join("device.log");
    if let Ok(text) = std::fs::read_to_string(&device_log) {
        println!(
            "  the local script received {} commands: {}",
            text.lines().count(),
            device_log.display()
        );
    }
    let logs = &cfg.daemon.log_dir;
    println!(
        "  daemon log:  {}",
        logs.join("nas_event_daemon.log").display()
    );
    println!("  NAS logs:    {}", logs.join("nas_event_daemon").display());
    println!(
        "  account 3:   {}",
        logs.join("abonents/1003/event_3.log").display()
    );
    // The simulators' tasks end with the process.
    drop((sim_ssh, sim_telnet, sim_coa, sim_api));
    Ok(())
}
