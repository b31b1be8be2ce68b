//! `nasd bench-storm`: Carbon's reboot storm. One NAS on the in-process simulator (a real
//! SSH server, `mikrotik-ssh`, a latency per command, a session limit) comes back with a
//! backlog: every account has the same few events queued (`--mix`, by default a drop
//! and an accept, then a speed set, cancelled and set again). The daemon runs twice
//! in-process on a fresh database and a fresh simulator each time: first with `[daemon]
//! coalesce = false`, then with coalescing on, where of several queued events of one
//! `[coalesce]` group in a row only the last is sent and the others go to history as
//! `superseded`. Each run reports the events sent and superseded (history's outcomes),
//! the commands that reached the simulator (its counters), the drain time and the
//! commands/s; at the end the two simulators' final address lists and queues are
//! compared, which must be the same.
//!
//! The backlog is enqueued into the compact stack and expanded into the main stack
//! before the daemon starts, so the owner's first window load sees every event (as
//! after a reboot, when the events piled up while the NAS was away).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::progress::{Format, Progress};
use super::scratch::{self, ScratchDb, ScratchDir};
use crate::config::Config;
use crate::scheme::Scheme;
use crate::store::{CompactEvent, Nas, Secret, Store};

/// The default storm mix: `allowed` twice, then `speed` three times in a row.
pub const DEFAULT_MIX: &str =
    "user_drop,user_accept,user_rate_set,user_rate_set_cancel,user_rate_set";
/// The scheme of the benchmark.
const SCHEME: &str = "mikrotik-ssh";
/// The NAS of the benchmark.
const NAS_ID: i64 = 1;
/// How often the bench looks at the stack.
const POLL: Duration = Duration::from_millis(100);
/// A stack that does not shrink for this long is stuck: the bench stops.
const STUCK: Duration = Duration::from_secs(120);

#[derive(Debug, Clone, clap::Args)]
pub struct BenchStormOptions {
    /// `sqlite` (a temporary file) or a PostgreSQL server URL such as
    /// postgres://postgres@127.0.0.1:5432/test: a temporary database is created on that
    /// server for each run and dropped afterwards; the named database is not touched.
    #[arg(long, default_value = "sqlite")]
    pub database: String,
    /// Accounts with a backlog on the NAS.
    #[arg(long, default_value_t = 1000)]
    pub accounts: i64,
    /// The cmds every account has queued, in order (comma-separated, cmds of
    /// mikrotik-ssh).
    #[arg(long, default_value = DEFAULT_MIX)]
    pub mix: String,
    /// Simulated device latency per command.
    #[arg(long, default_value = "300ms")]
    pub latency: String,
    /// The NAS's `max_sessions`, and the simulator's session limit.
    #[arg(long, default_value_t = 10)]
    pub sessions: i32,
    /// The NAS's `n_workers`.
    #[arg(long, default_value_t = 10)]
    pub workers: i32,
}

/// The simulator's configuration at the end of a run, without RouterOS's internal ids
/// (they follow the order commands arrived in), sorted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FinalState {
    /// (list, address, comment, disabled)
    pub address_list: Vec<(String, String, String, bool)>,
    /// (name, target, max_limit, comment, disabled)
    pub queues: Vec<(String, String, String, String, bool)>,
}

impl FinalState {
    fn of(state: &crate::sim::RouterState) -> FinalState {
        let mut address_list: Vec<_> = state
            .address_list
            .iter()
            .map(|e| {
                (
                    e.list.clone(),
                    e.address.clone(),
                    e.comment.clone(),
                    e.disabled,
                )
            })
            .collect();
        address_list.sort();
        let mut queues: Vec<_> = state
            .queues
            .iter()
            .map(|q| {
                (
                    q.name.clone(),
                    q.target.clone(),
                    q.max_limit.clone(),
                    q.comment.clone(),
                    q.disabled,
                )
            })
            .collect();
        queues.sort();
        FinalState {
            address_list,
            queues,
        }
    }
}

/// What one run saw.
#[derive(Debug, Clone, Default)]
pub struct StormRun {
    pub coalesce: bool,
    /// Events in history at the end (every event enqueued).
    pub events: usize,
    pub done: usize,
    pub failed: usize,
    pub superseded: usize,
    /// Any other outcome (none expected).
    pub other: usize,
    /// Commands history says were sent.
    pub history_commands: usize,
    /// Commands the simulator executed.
    pub sim_commands: u64,
    pub sessions_opened: u64,
    pub sessions_refused: u64,
    pub max_concurrent_sessions: u64,
    /// From the first send (the earliest history row's finish less its duration) to the
    /// last history row.
    pub drain: Duration,
    /// From the daemon's start to an empty stack.
    pub wall: Duration,
    pub state: FinalState,
}

impl StormRun {
    /// Events whose commands were sent (done or failed).
    pub fn sent(&self) -> usize {
        self.done + self.failed
    }
}

/// Events and commands per account for `mix` as sent one by one, and as left when the
/// scheme's `[coalesce]` groups act on the whole backlog: an event is superseded when
/// the next one is of the same group.
pub fn per_account(scheme: &Scheme, mix: &[String]) -> ((usize, usize), (usize, usize)) {
    let commands = |cmd: &str| scheme.templates(cmd).map_or(0, <[String]>::len);
    let all = (mix.len(), mix.iter().map(|c| commands(c)).sum());
    let mut kept = (0, 0);
    for (i, cmd) in mix.iter().enumerate() {
        let group = scheme.coalesce_group(cmd);
        let superseded = group.is_some()
            && mix
                .get(i + 1)
                .is_some_and(|next| scheme.coalesce_group(next) == group);
        if !superseded {
            kept.0 += 1;
            kept.1 += commands(cmd);
        }
    }
    (all, kept)
}

/// `--mix`: comma-separated cmds, every one defined by the scheme.
pub fn parse_mix(mix: &str, scheme: &Scheme) -> anyhow::Result<Vec<String>> {
    let cmds: Vec<String> = mix
        .split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(String::from)
        .collect();
    anyhow::ensure!(!cmds.is_empty(), "--mix: no cmd given");
    for cmd in &cmds {
        anyhow::ensure!(
            scheme.defines(cmd),
            "--mix: {SCHEME} has no cmd {cmd} (it has {})",
            scheme.cmds().join(", ")
        );
    }
    Ok(cmds)
}

pub async fn run(opts: BenchStormOptions) -> anyhow::Result<()> {
    anyhow::ensure!(opts.accounts > 0, "--accounts must be above 0");
    anyhow::ensure!(
        (1..=100).contains(&opts.sessions),
        "--sessions must be 1..100"
    );
    anyhow::ensure!(
        (1..=100).contains(&opts.workers),
        "--workers must be 1..100"
    );
    crate::duration::parse_duration(&opts.latency)
        .map_err(|e| anyhow::anyhow!("--latency: {e}"))?;
    let schemes_dir = super::demo::default_schemes_dir();
    let scheme = Scheme::load(&schemes_dir.join(SCHEME))
        .with_context(|| format!("loading the scheme {SCHEME}"))?;
    let mix = parse_mix(&opts.mix, &scheme)?;
    let ((events, commands), (kept_events, kept_commands)) = per_account(&scheme, &mix);
    let backend = if opts.database == "sqlite" {
        "sqlite"
    } else {
        "postgres"
    };
    println!(
        "bench-storm: database={backend} scheme={SCHEME} accounts={} mix={} latency={} sessions={} workers={}",
        opts.accounts,
        mix.join(","),
        opts.latency,
        opts.sessions,
        opts.workers
    );
    let accounts = opts.accounts as usize;
    println!(
        "bench-storm: per account {events} events, {commands} commands; coalesced by [coalesce] {kept_events} events, {kept_commands} commands (in all {} and {}; coalesced {} and {})",
        events * accounts,
        commands * accounts,
        kept_events * accounts,
        kept_commands * accounts
    );
    let scratch_dir = ScratchDir::create("nasd-bench-storm")?;
    let tmp = scratch_dir.path();
    let mut runs = Vec::new();
    for coalesce in [false, true] {
        let run = storm(&opts, &mix, tmp, coalesce).await?;
        println!("{}", run_line(&run));
        runs.push(run);
    }
    let (off, on) = (&runs[0], &runs[1]);
    println!(
        "bench-storm: final state identical: {} (address lists {} and {} entries, queues {} and {})",
        if off.state == on.state { "yes" } else { "no" },
        off.state.address_list.len(),
        on.state.address_list.len(),
        off.state.queues.len(),
        on.state.queues.len()
    );
    println!(
        "bench-storm: with coalescing {} of {} events sent ({:.0}%), {} of {} commands ({:.0}%), drained in {:.1} s instead of {:.1} s ({:.2}x faster)",
        on.sent(),
        off.sent(),
        100.0 * on.sent() as f64 / off.sent().max(1) as f64,
        on.sim_commands,
        off.sim_commands,
        100.0 * on.sim_commands as f64 / off.sim_commands.max(1) as f64,
        on.drain.as_secs_f64(),
        off.drain.as_secs_f64(),
        off.drain.as_secs_f64() / on.drain.as_secs_f64().max(1e-9)
    );
    if off.state != on.state {
        anyhow::bail!("the final states differ: coalescing changed what the NAS holds");
    }
    Ok(())
}

/// One run's report line.
pub fn run_line(r: &StormRun) -> String {
    let secs = r.drain.as_secs_f64().max(1e-9);
    format!(
        "bench-storm: coalescing {} {} events = {} sent (done {}, failed {}) + {} superseded{}; {} commands reached the sim ({} in history), sessions {} opened, {} refused, at most {} at once; drain {:.1} s (first send to last history row; {:.1} s from the daemon's start to an empty stack) = {:.1} commands/s, {:.1} events/s",
        if r.coalesce { "on: " } else { "off:" },
        r.events,
        r.sent(),
        r.done,
        r.failed,
        r.superseded,
        if r.other > 0 {
            format!(" + {} other", r.other)
        } else {
            String::new()
        },
        r.sim_commands,
        r.history_commands,
        r.sessions_opened,
        r.sessions_refused,
        r.max_concurrent_sessions,
        r.drain.as_secs_f64(),
        r.wall.as_secs_f64(),
        r.sim_commands as f64 / secs,
        r.events as f64 / secs
    )
}

/// One run on a fresh simulator and database.
async fn storm(
    opts: &BenchStormOptions,
    mix: &[String],
    tmp: &Path,
    coalesce: bool,
) -> anyhow::Result<StormRun> {
    let tag = if coalesce { "on" } else { "off" };
    let sim_opts = crate::sim::SimOptions {
        latency: opts.latency.clone(),
        max_sessions: usize::try_from(opts.sessions).unwrap_or(1),
        host_key: Some(tmp.join("sim_host_key")),
        ..Default::default()
    };
    let sim = crate::sim::start(&sim_opts, CancellationToken::new()).await?;
    let db = match ScratchDb::create(
        &opts.database,
        &tmp.join(format!("storm-{tag}.db")),
        &format!("nasd_bench_storm_{}_{tag}", std::process::id()),
    )
    .await
    {
        Ok(db) => db,
        Err(e) => {
            sim.stop().await;
            return Err(e);
        }
    };
    let run = storm_on(opts, mix, tmp, coalesce, &db.url, &sim, &sim_opts).await;
    db.remove().await;
    let counters = sim.device.counters();
    let state = FinalState::of(&sim.device.state());
    sim.stop().await;
    let mut run = run?;
    run.sim_commands = counters.commands_executed;
    run.sessions_opened = counters.sessions_opened;
    run.sessions_refused = counters.sessions_refused;
    run.max_concurrent_sessions = counters.max_concurrent_sessions;
    run.state = state;
    Ok(run)
}

async fn storm_on(
    opts: &BenchStormOptions,
    mix: &[String],
    tmp: &Path,
    coalesce: bool,
    url: &str,
    sim: &crate::sim::Sim,
    sim_opts: &crate::sim::SimOptions,
) -> anyhow::Result<StormRun> {
    let tag = if coalesce { "on" } else { "off" };
    let mut cfg = Config::default();
    cfg.database.url = url.to_string();
    cfg.database.max_connections = 16;
    cfg.daemon.log_dir = tmp.join(format!("log-{tag}"));
    cfg.daemon.schemes_dir = super::demo::default_schemes_dir();
    cfg.daemon.transport.known_hosts = tmp.join(format!("known_hosts-{tag}"));
    cfg.daemon.coalesce = coalesce;
    cfg.validate()?;
    let store: Store = crate::daemon::open_store(&cfg).await?;
    store
        .nas_upsert(&Nas {
            scheme: Some(SCHEME.into()),
            n_workers: opts.workers,
            port: Some(i32::from(sim.ssh_addr.port())),
            login: Some(sim_opts.user.clone()),
            password: Some(Secret::new(sim_opts.password.clone())),
            max_sessions: opts.sessions,
            host_key_policy: "accept-new".into(),
            ..Nas::new(NAS_ID, "storm", &sim.ssh_addr.ip().to_string())
        })
        .await?;
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
                NAS_ID.to_string(),
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
    // Round by round, as billing would have sent them while the NAS was away: every
    // account's first event, then every account's second, ...
    let events: Vec<CompactEvent> = mix
        .iter()
        .enumerate()
        .flat_map(|(round, cmd)| {
            (1..=opts.accounts).map(move |user_id| CompactEvent {
                cmd: cmd.clone(),
                user_id,
                acct_session_id: Some(format!("{round}-{user_id}")),
                ..Default::default()
            })
        })
        .collect();
    let total = events.len();
    for chunk in events.chunks(5000) {
        store.enqueue_compact(chunk).await?;
    }
    // The backlog in the main stack before the owner starts.
    let mut expanded = 0;
    loop {
        let report = store
            .expand(&cfg.database.params_query, cfg.daemon.expand_batch)
            .await?;
        if report.failed > 0 {
            anyhow::bail!("{} events could not be expanded", report.failed);
        }
        if report.expanded == 0 {
            break;
        }
        expanded += report.expanded;
    }
    anyhow::ensure!(
        expanded == total,
        "{expanded} of {total} events expanded into the main stack"
    );

    let shutdown = CancellationToken::new();
    let daemon = crate::daemon::start(cfg.clone(), shutdown.clone()).await?;
    let started = Instant::now();
    let drained = wait_empty(&store, total, coalesce).await;
    let wall = started.elapsed();
    shutdown.cancel();
    daemon.wait().await?;
    drained?;

    let history = store.history(None, i64::MAX).await?;
    let mut run = StormRun {
        coalesce,
        events: history.len(),
        wall,
        ..Default::default()
    };
    let mut outcomes: BTreeMap<&str, usize> = BTreeMap::new();
    let mut first: Option<chrono::DateTime<chrono::Utc>> = None;
    let mut last: Option<chrono::DateTime<chrono::Utc>> = None;
    for h in &history {
        *outcomes.entry(h.outcome.as_str()).or_default() += 1;
        run.history_commands += h.commands.len();
        let began = h.finished_at - chrono::Duration::milliseconds(h.duration_ms);
        first = Some(first.map_or(began, |f| f.min(began)));
        last = Some(last.map_or(h.finished_at, |l| l.max(h.finished_at)));
    }
    for (outcome, n) in outcomes {
        match outcome {
            "done" => run.done = n,
            "failed" => run.failed = n,
            "superseded" => run.superseded = n,
            _ => run.other += n,
        }
    }
    if let (Some(first), Some(last)) = (first, last) {
        run.drain = (last - first).to_std().unwrap_or_default();
    }
    anyhow::ensure!(
        run.events == total,
        "{} of {total} events in history after the stack drained",
        run.events
    );
    Ok(run)
}

/// Waits until the main stack is empty, showing how many events left it.
async fn wait_empty(store: &Store, total: usize, coalesce: bool) -> anyhow::Result<()> {
    let label = format!("  coalescing {}", if coalesce { "on" } else { "off" });
    let progress = Progress::start(Format::count(&label, total as u64, "events"));
    let mut left = total as i64;
    let mut moved = Instant::now();
    loop {
        tokio::time::sleep(POLL).await;
        let count = store.stack_count().await?;
        let now = count.stack_total + count.compact_total;
        if now < left {
            left = now;
            moved = Instant::now();
        }
        progress.set((total as i64 - left).max(0) as u64, 0);
        if left == 0 {
            progress.finish();
            return Ok(());
        }
        if moved.elapsed() > STUCK {
            anyhow::bail!(
                "{left} of {total} events still queued, none finished for {} s",
                STUCK.as_secs()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scheme() -> Scheme {
        Scheme::load(
            &std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("schemes/mikrotik-ssh"),
        )
        .expect("mikrotik-ssh loads")
    }

    #[test]
    fn the_default_mix_keeps_the_last_of_each_group() {
        let s = scheme();
        let mix = parse_mix(DEFAULT_MIX, &s).expect("the default mix parses");
        // drop, accept (allowed); set, cancel, set (speed): user_rate_set is two commands.
        assert_eq!(per_account(&s, &mix), ((5, 7), (2, 3)));
    }

    #[test]
    fn groups_coalesce_only_in_a_row() {
        let s = scheme();
        let mix = parse_mix("user_drop,user_rate_set,user_accept", &s).expect("parses");
        assert_eq!(per_account(&s, &mix), ((3, 4), (3, 4)));
        let mix = parse_mix("user_info,user_info", &s).expect("parses");
        assert_eq!(per_account(&s, &mix), ((2, 4), (2, 4)));
    }

    #[test]
    fn unknown_cmds_are_refused() {
        let s = scheme();
        let e = parse_mix("user_drop,user_fly", &s).expect_err("unknown cmd");
        assert!(e.to_string().contains("no cmd user_fly"), "{e}");
        assert!(parse_mix(" , ", &s).is_err());
    }

    #[test]
    fn final_state_ignores_ids_and_order() {
        let a = crate::sim::Device::new("a");
        let b = crate::sim::Device::new("b");
        a.execute("/ip firewall address-list add list=allowed address=10.0.0.1 comment=x");
        a.execute("/ip firewall address-list add list=allowed address=10.0.0.2 comment=y");
        b.execute("/queue simple add name=q target=10.0.0.9/32");
        b.execute("/queue simple remove [find name=q]");
        b.execute("/ip firewall address-list add list=allowed address=10.0.0.2 comment=y");
        b.execute("/ip firewall address-list add list=allowed address=10.0.0.1 comment=x");
        assert_eq!(FinalState::of(&a.state()), FinalState::of(&b.state()));
        b.execute("/queue simple add name=q target=10.0.0.9/32");
        assert_ne!(FinalState::of(&a.state()), FinalState::of(&b.state()));
    }
}
