//! `nasd bench-prune`: does pruning `[history] keep` stall delivery? A fresh database
//! gets `--rows` finished events older than `keep` in `events_history` (set-based SQL,
//! the secondary indexes dropped during the fill and built again after it, so the table
//! ends as the migrations made it); then the daemon runs twice in-process with one NAS
//! on the in-process simulator while events are enqueued at a steady `--rate`: first
//! without pruning (the baseline), then with `keep` set so that the pruner deletes every
//! filled row, in batches of `--prune-batch` with its pause between statements. Both
//! runs report the longest delivery pause (the longest time an event was waiting and
//! none finished) and enqueue-to-done percentiles; the pruning run also how long the
//! rows took to go and the rate.

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use sqlx::{ConnectOptions, Connection};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::progress::{Format, Progress};
use super::scratch::{self, ScratchDb, ScratchDir};
use crate::config::Config;
use crate::stats::Stats;
use crate::store::{CompactEvent, Nas, Secret, Store};

#[derive(Debug, Clone, clap::Args)]
pub struct BenchPruneOptions {
    /// `sqlite` (a temporary file) or a PostgreSQL server URL such as
    /// postgres://postgres@127.0.0.1:5432/test: a temporary database is created on that
    /// server and dropped afterwards; the named database is not touched.
    #[arg(long, default_value = "sqlite")]
    pub database: String,
    /// Old rows filled into `events_history`, all of them to be pruned.
    #[arg(long, default_value_t = 10_000_000)]
    pub rows: i64,
    /// Events per second enqueued (and delivered) during both runs.
    #[arg(long, default_value_t = 200)]
    pub rate: i64,
    /// `api-sim` (mikrotik-api) or `ssh-sim` (mikrotik-ssh) to the in-process simulator.
    #[arg(long, default_value = "api-sim")]
    pub transport: String,
    /// Simulated device latency per command.
    #[arg(long, default_value = "5ms")]
    pub latency: String,
    /// `[history] prune_batch`: rows per delete statement (default: the daemon's).
    #[arg(long, default_value_t = crate::config::HistoryConfig::default().prune_batch)]
    pub prune_batch: i64,
    /// `[history] prune_interval`; the first round starts this long after the start,
    /// at most 5 s.
    #[arg(long, default_value = "5s")]
    pub prune_interval: String,
    /// How long the baseline run (no pruning) delivers.
    #[arg(long, default_value = "30s")]
    pub baseline: String,
    /// Accounts the events are spread over.
    #[arg(long, default_value_t = 1000)]
    pub accounts: i64,
    /// Worker tasks of the NAS.
    #[arg(long, default_value_t = 16)]
    pub workers: i32,
}

/// The target of the issue: no delivery pause above this while pruning.
pub const TARGET_MS: f64 = 100.0;
/// Rows per fill statement.
const CHUNK: i64 = 200_000;
const DAY_MS: i64 = 86_400_000;
/// The NAS of the benchmark.
const NAS_ID: i64 = 1;
/// How often the bench looks at how far pruning got.
const WATCH: Duration = Duration::from_millis(250);
/// How often the finished count is sampled (the observed pause).
const SAMPLE: Duration = Duration::from_millis(5);
/// Pruning that deletes nothing for this long is stuck: the bench stops.
const STUCK: Duration = Duration::from_secs(180);

/// What one run of the daemon delivered.
#[derive(Debug, Clone, Default)]
pub struct Delivery {
    pub events: usize,
    pub elapsed: Duration,
    /// Longest time while an event waited and none finished, from the finish times in
    /// `events_history`.
    pub longest_pause_ms: f64,
    /// When it began.
    pub longest_pause_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Pauses longer than `TARGET_MS`.
    pub pauses_over_target: usize,
    /// The same seen from outside: the daemon's finished count sampled every 5 ms.
    pub observed_pause_ms: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// The slowest enqueue statement (billing's INSERT into the compact stack).
    pub longest_enqueue_ms: f64,
}

/// What pruning did.
#[derive(Debug, Clone, Default)]
pub struct Pruning {
    /// Rows the daemon log says were pruned.
    pub pruned: u64,
    /// Filled rows still there at the end (0 when all went).
    pub left: i64,
    /// From the first deleted row seen to the last.
    pub elapsed: Duration,
    /// The slowest delete statement, when the daemon log names it.
    pub longest_statement_ms: Option<f64>,
}

pub async fn run(opts: BenchPruneOptions) -> anyhow::Result<()> {
    let backend = if opts.database == "sqlite" {
        "sqlite"
    } else {
        "postgres"
    };
    let prune_interval = crate::duration::parse_duration(&opts.prune_interval)
        .map_err(|e| anyhow::anyhow!("--prune-interval: {e}"))?;
    let baseline = crate::duration::parse_duration(&opts.baseline)
        .map_err(|e| anyhow::anyhow!("--baseline: {e}"))?;
    anyhow::ensure!(opts.rows > 0, "--rows must be above 0");
    anyhow::ensure!(opts.rate > 0, "--rate must be above 0");
    anyhow::ensure!(opts.accounts > 0, "--accounts must be above 0");
    let scratch_dir = ScratchDir::create("nasd-bench-prune")?;
    let tmp = scratch_dir.path();
    let db = ScratchDb::create(
        &opts.database,
        &tmp.join("bench.db"),
        &format!("nasd_bench_prune_{}", std::process::id()),
    )
    .await?;
    println!(
        "bench-prune: database={backend} rows={} transport={} latency={} rate={}/s prune_batch={} prune_interval={} keep={}",
        opts.rows,
        opts.transport,
        opts.latency,
        opts.rate,
        opts.prune_batch,
        opts.prune_interval,
        crate::duration::format_duration(crate::config::HistoryConfig::default().keep)
    );
    let result = measure(&opts, &db.url, tmp, prune_interval, baseline).await;
    db.remove().await;
    let (fill, base, during, pruning) = result?;
    println!(
        "bench-prune: filled {} rows in {:.1} s ({:.0} rows/s), then indexes built and the table settled (PostgreSQL: VACUUM ANALYZE, CHECKPOINT; SQLite: synced) in {:.1} s",
        opts.rows,
        fill.rows.as_secs_f64(),
        opts.rows as f64 / fill.rows.as_secs_f64().max(1e-9),
        fill.indexes.as_secs_f64()
    );
    println!(
        "bench-prune: baseline, no pruning: {}",
        delivery_line(&base)
    );
    println!(
        "bench-prune: while pruning:        {}",
        delivery_line(&during)
    );
    let secs = pruning.elapsed.as_secs_f64();
    let worst = during.longest_pause_ms.max(during.observed_pause_ms);
    println!(
        "bench-prune: {backend}, {} rows pruned in {:.1} s ({:.0} rows/s{}), delivery {} events at {:.0}/s, longest pause {:.0} ms (target <= {TARGET_MS:.0} ms: {}), p99 {:.1} ms (baseline {:.1} ms)",
        pruning.pruned,
        secs,
        pruning.pruned as f64 / secs.max(1e-9),
        pruning
            .longest_statement_ms
            .map(|ms| format!(", slowest statement {ms:.0} ms"))
            .unwrap_or_default(),
        during.events,
        during.events as f64 / during.elapsed.as_secs_f64().max(1e-9),
        worst,
        if worst <= TARGET_MS { "met" } else { "MISSED" },
        during.p99_ms,
        base.p99_ms,
    );
    if pruning.left > 0 {
        anyhow::bail!("{} filled rows were not pruned", pruning.left);
    }
    Ok(())
}

fn delivery_line(d: &Delivery) -> String {
    format!(
        "{} events in {:.1} s ({:.0}/s), longest pause {:.0} ms{} (observed {:.0} ms), {} over {TARGET_MS:.0} ms, enqueue-to-done p50 {:.1} ms p99 {:.1} ms max {:.0} ms, slowest enqueue {:.0} ms",
        d.events,
        d.elapsed.as_secs_f64(),
        d.events as f64 / d.elapsed.as_secs_f64().max(1e-9),
        d.longest_pause_ms,
        d.longest_pause_at
            .map(|t| format!(" at {}", t.format("%H:%M:%S%.3f UTC")))
            .unwrap_or_default(),
        d.observed_pause_ms,
        d.pauses_over_target,
        d.p50_ms,
        d.p99_ms,
        d.max_ms,
        d.longest_enqueue_ms
    )
}

/// How long the fill took.
pub struct Fill {
    pub rows: Duration,
    pub indexes: Duration,
}

/// The device of the benchmark and how its NAS reaches it.
struct Device {
    sim: crate::sim::Sim,
    scheme: &'static str,
    cmd: &'static str,
    addr: std::net::SocketAddr,
    user: String,
    password: String,
}

async fn device(opts: &BenchPruneOptions, tmp: &Path) -> anyhow::Result<Device> {
    let sim_opts = crate::sim::SimOptions {
        latency: opts.latency.clone(),
        max_sessions: 1000,
        host_key: Some(tmp.join("sim_host_key")),
        ..Default::default()
    };
    let sim = crate::sim::start(&sim_opts, CancellationToken::new()).await?;
    let (scheme, cmd, addr) = match opts.transport.as_str() {
        "api-sim" => ("mikrotik-api", "user_accept", sim.api_addr),
        "ssh-sim" => ("mikrotik-ssh", "user_drop", sim.ssh_addr),
        other => {
            sim.stop().await;
            anyhow::bail!("--transport {other}: expected api-sim or ssh-sim");
        }
    };
    Ok(Device {
        sim,
        scheme,
        cmd,
        addr,
        user: sim_opts.user,
        password: sim_opts.password,
    })
}

async fn measure(
    opts: &BenchPruneOptions,
    url: &str,
    tmp: &Path,
    prune_interval: Duration,
    baseline: Duration,
) -> anyhow::Result<(Fill, Delivery, Delivery, Pruning)> {
    let device = device(opts, tmp).await?;
    let measured = measure_with(opts, url, tmp, &device, prune_interval, baseline).await;
    device.sim.stop().await;
    measured
}

async fn measure_with(
    opts: &BenchPruneOptions,
    url: &str,
    tmp: &Path,
    device: &Device,
    prune_interval: Duration,
    baseline: Duration,
) -> anyhow::Result<(Fill, Delivery, Delivery, Pruning)> {
    let mut cfg = Config::default();
    cfg.database.url = url.to_string();
    cfg.database.max_connections = 16;
    cfg.daemon.log_dir = tmp.join("log");
    cfg.daemon.schemes_dir = super::demo::default_schemes_dir();
    cfg.daemon.transport.known_hosts = tmp.join("known_hosts");
    cfg.daemon.resync_interval = Duration::from_secs(5);
    // SQLite has no NOTIFY: new events are found by polling, this often, so that the
    // poll does not hide the pauses measured.
    cfg.daemon.poll_interval = Duration::from_millis(10);
    cfg.history.prune_batch = opts.prune_batch;
    cfg.history.prune_interval = prune_interval;
    let keep = cfg.history.keep;
    cfg.validate()?;
    let store: Store = crate::daemon::open_store(&cfg).await?;
    store
        .nas_upsert(&Nas {
            scheme: Some(device.scheme.into()),
            n_workers: opts.workers,
            port: Some(i32::from(device.addr.port())),
            login: Some(device.user.clone()),
            password: Some(Secret::new(device.password.clone())),
            max_sessions: opts.workers.clamp(1, 100),
            host_key_policy: "accept-new".into(),
            ..Nas::new(NAS_ID, "prune-bench", &device.addr.ip().to_string())
        })
        .await?;
    let accounts = scratch::accounts(
        &["user_id", "abonent_id", "nas_id", "ip", "login"],
        (1..=opts.accounts).map(|i| {
            vec![
                i.to_string(),
                i.to_string(),
                NAS_ID.to_string(),
                format!("10.{}.{}.{}", 64 + i / 65536, (i / 256) % 256, i % 256),
                format!("user{i}"),
            ]
        }),
    )?;
    for chunk in accounts.chunks(2000) {
        store.accounts_upsert(chunk).await?;
    }
    let mut db = BenchDb::connect(url).await?;
    let now_ms = chrono::Utc::now().timestamp_millis();
    let keep_ms = i64::try_from(keep.as_millis()).unwrap_or(i64::MAX / 4);
    let sqlite_file = url
        .strip_prefix("sqlite://")
        .map(|f| Path::new(f.split('?').next().unwrap_or(f)));
    let fill = db.fill(opts, now_ms - keep_ms, sqlite_file).await?;

    // The baseline: the same table, the same rate, no pruner.
    println!(
        "bench-prune: baseline: delivering {}/s for {} without pruning",
        opts.rate, opts.baseline
    );
    let mut base_cfg = cfg.clone();
    base_cfg.history.keep = Duration::ZERO;
    let base = deliver(
        opts,
        &base_cfg,
        &store,
        device.cmd,
        'b',
        Until::Elapsed(baseline),
    )
    .await?;
    let base = db.delivery(opts.rows, "b", base).await?;

    println!(
        "bench-prune: pruning {} rows ([history] keep = {}) while delivering {}/s",
        opts.rows,
        crate::duration::format_duration(keep),
        opts.rate
    );
    let during = deliver(opts, &cfg, &store, device.cmd, 'p', Until::Pruned(&mut db)).await?;
    let pruned_in = during.pruned_in;
    let during = db.delivery(opts.rows, "p", during).await?;
    let log = std::fs::read_to_string(cfg.daemon.log_dir.join("nas_event_daemon.log"))
        .context("reading the daemon log")?;
    let (pruned, longest_statement_ms) = pruned_from_log(&log);
    let left = db.old_rows_left(opts.rows).await?;
    db.close().await;
    Ok((
        fill,
        base,
        during,
        Pruning {
            pruned,
            left,
            elapsed: pruned_in,
            longest_statement_ms,
        },
    ))
}

/// When a delivery run ends.
enum Until<'a> {
    Elapsed(Duration),
    /// When no filled row is left (the bench's connection looks).
    Pruned(&'a mut BenchDb),
}

/// A delivery run before its rows are read back.
struct Run {
    events: u64,
    elapsed: Duration,
    observed_pause_ms: f64,
    longest_enqueue_ms: f64,
    /// Pruning: from the first deleted row seen to the last.
    pruned_in: Duration,
}

/// Starts the daemon, enqueues `tag`-marked events at `--rate` until `until`, waits for
/// them to be delivered and stops the daemon.
async fn deliver(
    opts: &BenchPruneOptions,
    cfg: &Config,
    store: &Store,
    cmd: &'static str,
    tag: char,
    until: Until<'_>,
) -> anyhow::Result<Run> {
    let shutdown = CancellationToken::new();
    let daemon = crate::daemon::start(cfg.clone(), shutdown.clone()).await?;
    let outcome = deliver_on(opts, &daemon.stats, store, cmd, tag, until).await;
    shutdown.cancel();
    daemon.wait().await?;
    outcome
}

async fn deliver_on(
    opts: &BenchPruneOptions,
    stats: &Arc<Stats>,
    store: &Store,
    cmd: &'static str,
    tag: char,
    until: Until<'_>,
) -> anyhow::Result<Run> {
    // Warm-up, not measured: the owner running and its device session open.
    store
        .enqueue_compact(&[CompactEvent {
            cmd: cmd.into(),
            user_id: 1,
            acct_session_id: Some(format!("w{tag}")),
            ..Default::default()
        }])
        .await
        .context("enqueueing the warm-up event")?;
    let warming = Instant::now();
    while finished(stats) < 1 {
        if warming.elapsed() > Duration::from_secs(60) {
            anyhow::bail!("the warm-up event was not delivered within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let warm = finished(stats);
    let produced = Arc::new(AtomicU64::new(0));
    let stop_producing = CancellationToken::new();
    let stop_sampling = CancellationToken::new();
    let producer = tokio::spawn(produce(
        store.clone(),
        opts.rate,
        opts.accounts,
        cmd,
        tag,
        produced.clone(),
        stop_producing.clone(),
    ));
    let sampler = tokio::spawn(sample(
        stats.clone(),
        warm,
        produced.clone(),
        stop_sampling.clone(),
    ));
    let started = Instant::now();
    let waited = match until {
        Until::Elapsed(d) => {
            tokio::time::sleep(d).await;
            Ok(Duration::ZERO)
        }
        Until::Pruned(db) => watch_pruning(db, opts.rows).await,
    };
    stop_producing.cancel();
    let elapsed = started.elapsed();
    let produced_run = producer.await.context("the producer task")?;
    let pruned_in = waited?;
    let (events, longest_enqueue_ms) = produced_run?;
    // Every event enqueued delivered.
    let drained = Instant::now();
    while finished(stats) < warm + events {
        if drained.elapsed() > Duration::from_secs(120) {
            anyhow::bail!(
                "only {} of {events} events finished within 120 s of the last enqueue",
                finished(stats).saturating_sub(warm)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop_sampling.cancel();
    let observed_pause_ms = sampler.await.context("the sampler task")?;
    Ok(Run {
        events,
        elapsed,
        observed_pause_ms,
        longest_enqueue_ms,
        pruned_in,
    })
}

/// Looks every `WATCH` at the lowest id left until none of the `rows` filled ids is:
/// the time from the first deleted row seen to the last. A progress shows the count.
async fn watch_pruning(db: &mut BenchDb, rows: i64) -> anyhow::Result<Duration> {
    let progress = Progress::start(Format::count("  pruned", rows as u64, "rows"));
    let mut first: Option<Instant> = None;
    let mut last_change = Instant::now();
    let mut last_pruned = 0;
    loop {
        tokio::time::sleep(WATCH).await;
        let pruned = match db.min_id().await? {
            Some(min) => (min - 1).clamp(0, rows),
            None => rows,
        };
        if pruned > last_pruned {
            last_pruned = pruned;
            last_change = Instant::now();
            first.get_or_insert_with(Instant::now);
        }
        progress.set(pruned as u64, 0);
        if pruned >= rows {
            progress.finish();
            return Ok(first.map(|t| t.elapsed()).unwrap_or_default());
        }
        if last_change.elapsed() > STUCK {
            anyhow::bail!(
                "pruning stopped at {pruned} of {rows} rows: nothing deleted for {} s",
                STUCK.as_secs()
            );
        }
    }
}

/// Events finished (done or failed) by the NAS, as the daemon counts them.
fn finished(stats: &Stats) -> u64 {
    stats
        .get(NAS_ID)
        .map(|s| s.by_cmd.iter().map(|(_, c)| c.done + c.failed).sum())
        .unwrap_or(0)
}

/// Enqueues at `rate` events/s (in 20 ms steps, catching up after a slow statement)
/// until `stop`: how many, and the slowest statement in milliseconds.
async fn produce(
    store: Store,
    rate: i64,
    accounts: i64,
    cmd: &'static str,
    tag: char,
    produced: Arc<AtomicU64>,
    stop: CancellationToken,
) -> anyhow::Result<(u64, f64)> {
    let started = Instant::now();
    let mut ticks = tokio::time::interval(Duration::from_millis(20));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut sent: u64 = 0;
    let mut slowest = Duration::ZERO;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = ticks.tick() => {}
        }
        let due = (rate as f64 * started.elapsed().as_secs_f64()) as u64;
        if due <= sent {
            continue;
        }
        let events: Vec<CompactEvent> = (sent..due)
            .map(|n| CompactEvent {
                cmd: cmd.into(),
                user_id: 1 + (n as i64) % accounts,
                acct_session_id: Some(format!("{tag}{n}")),
                ..Default::default()
            })
            .collect();
        let t = Instant::now();
        store
            .enqueue_compact(&events)
            .await
            .context("enqueueing events")?;
        slowest = slowest.max(t.elapsed());
        sent = due;
        produced.store(sent, Ordering::Relaxed);
    }
    Ok((sent, slowest.as_secs_f64() * 1000.0))
}

/// Samples the finished count (less `warm`, those before the run) every `SAMPLE` until
/// `stop`: the longest time during which an enqueued event was not finished and the
/// count did not move, in ms.
async fn sample(
    stats: Arc<Stats>,
    warm: u64,
    produced: Arc<AtomicU64>,
    stop: CancellationToken,
) -> f64 {
    let mut ticks = tokio::time::interval(SAMPLE);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut last_done = 0;
    let mut waiting_since: Option<Instant> = None;
    let mut longest = Duration::ZERO;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = ticks.tick() => {}
        }
        let now = Instant::now();
        let done = finished(&stats).saturating_sub(warm);
        if done > last_done {
            if let Some(since) = waiting_since {
                longest = longest.max(now - since);
            }
            last_done = done;
            waiting_since = None;
        }
        if waiting_since.is_none() && produced.load(Ordering::Relaxed) > done {
            waiting_since = Some(now);
        }
    }
    longest.as_secs_f64() * 1000.0
}

/// The delivery pauses of a run.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Pauses {
    /// The longest, in ms, and when it began (epoch ms).
    pub longest_ms: f64,
    pub longest_from: f64,
    /// How many were longer than `TARGET_MS`.
    pub over_target: usize,
}

/// The delivery pauses in `(enqueued, finished)` times (epoch ms): each time during
/// which some event had been enqueued and was not finished while no event finished.
/// Sorts `events` by finish time.
pub fn pauses(events: &mut [(f64, f64)]) -> Pauses {
    events.sort_by(|a, b| a.1.total_cmp(&b.1));
    // The earliest enqueue among the events finishing at or after each position.
    let mut waiting_from = vec![f64::INFINITY; events.len() + 1];
    for i in (0..events.len()).rev() {
        waiting_from[i] = waiting_from[i + 1].min(events[i].0);
    }
    let mut found = Pauses::default();
    let mut previous = f64::NEG_INFINITY;
    for (i, &(_, finished)) in events.iter().enumerate() {
        // Nothing finished between `previous` and `finished`; the pause counts from
        // when an event was waiting.
        let from = previous.max(waiting_from[i]);
        let pause = finished - from;
        if pause > found.longest_ms {
            found.longest_ms = pause;
            found.longest_from = from;
        }
        if pause > TARGET_MS {
            found.over_target += 1;
        }
        previous = finished;
    }
    found
}

/// The value at `p` (0..=1) of sorted `values` (0 when empty).
fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted
        .get(((sorted.len() as f64 - 1.0) * p).round() as usize)
        .copied()
        .unwrap_or(0.0)
}

/// The sum of the daemon log's `History pruned: N` lines, and the slowest statement
/// the lines name (`the slowest statement N ms`).
pub fn pruned_from_log(log: &str) -> (u64, Option<f64>) {
    let mut pruned = 0;
    let mut slowest: Option<f64> = None;
    for rest in log
        .lines()
        .filter_map(|l| l.split("History pruned: ").nth(1))
    {
        pruned += rest
            .split(' ')
            .next()
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0);
        if let Some(ms) = rest
            .split("slowest statement ")
            .nth(1)
            .and_then(|r| r.split(' ').next())
            .and_then(|n| n.parse::<f64>().ok())
        {
            slowest = Some(slowest.map_or(ms, |s| s.max(ms)));
        }
    }
    (pruned, slowest)
}

/// The bench's own connection: the fill, the watch on pruning, the rows read back.
enum BenchDb {
    Postgres(sqlx::PgConnection),
    Sqlite(sqlx::SqliteConnection),
}

/// The commands of the filled events (by a hash of the id).
const CMD_CASE: &str = "CASE ((i * 2654435761) >> 24) % 4 WHEN 0 THEN 'user_add' \
     WHEN 1 THEN 'user_drop' WHEN 2 THEN 'user_rate_set' ELSE 'user_accept' END";
/// One event in ten failed.
const FAILED: &str = "((i * 2654435761) >> 16) % 10 = 3";
const HISTORY_INSERT: &str = "events_history (id, event_id, compact_id, event_date, enqueued_at, \
     cmd, user_id, abonent_id, nas_id, params, outcome, attempts, commands, answer, error, \
     duration_ms, finished_at)";

/// The filled rows: id `i`, finished in id order over the nine days before
/// `newest_ms` (less a day); `time` turns epoch milliseconds into the column's type.
fn history_select(
    rows: i64,
    accounts: i64,
    newest_ms: i64,
    time: &dyn Fn(&str) -> String,
) -> String {
    let step = (9 * DAY_MS / rows).max(1);
    let start = newest_ms - DAY_MS - step * rows;
    format!(
        "SELECT i, i, i, {event_date}, {enqueued_at}, cmd, u, u, {NAS_ID}, '{{}}', \
         CASE WHEN {FAILED} THEN 'failed' ELSE 'done' END, \
         CASE WHEN {FAILED} THEN 3 ELSE 1 END, \
         '[\"' || replace(cmd, 'user_', '') || ' ' || u || '\"]', \
         CASE WHEN {FAILED} THEN '' ELSE 'ok' END, \
         CASE WHEN {FAILED} THEN 'timeout after 10s' END, 20 + i % 180, {finished_at} \
         FROM (SELECT i, 1 + (i * 7919) % {accounts} AS u, {CMD_CASE} AS cmd, \
         {start} + i * {step} AS f FROM s) x",
        event_date = time("f - 2000"),
        enqueued_at = time("f - 1500"),
        finished_at = time("f"),
    )
}

impl BenchDb {
    async fn connect(url: &str) -> anyhow::Result<BenchDb> {
        if url.starts_with("sqlite:") {
            let options = sqlx::sqlite::SqliteConnectOptions::from_str(url)
                .with_context(|| format!("reading the SQLite URL {url}"))?
                .busy_timeout(Duration::from_secs(30))
                .disable_statement_logging();
            Ok(BenchDb::Sqlite(
                sqlx::SqliteConnection::connect_with(&options)
                    .await
                    .context("opening the SQLite database for the bench")?,
            ))
        } else {
            let options = sqlx::postgres::PgConnectOptions::from_str(url)
                .context("reading the PostgreSQL URL")?
                .disable_statement_logging();
            Ok(BenchDb::Postgres(
                sqlx::PgConnection::connect_with(&options)
                    .await
                    .context("connecting to PostgreSQL for the bench")?,
            ))
        }
    }

    async fn close(self) {
        let _ = match self {
            BenchDb::Postgres(c) => c.close().await,
            BenchDb::Sqlite(c) => c.close().await,
        };
    }

    /// Fills `opts.rows` rows finished before `newest_ms` less a day: the secondary
    /// indexes are dropped first and built again after (their definitions as the
    /// migrations wrote them); then the database is on disk (`sqlite_file` synced).
    async fn fill(
        &mut self,
        opts: &BenchPruneOptions,
        newest_ms: i64,
        sqlite_file: Option<&Path>,
    ) -> anyhow::Result<Fill> {
        let indexes = self.history_indexes().await?;
        for (name, _) in &indexes {
            self.execute(&format!("DROP INDEX {name}"))
                .await
                .with_context(|| format!("dropping index {name} for the fill"))?;
        }
        let insert = match self {
            BenchDb::Postgres(_) => {
                let time = |ms: &str| format!("to_timestamp(({ms}) / 1000.0)");
                format!(
                    "WITH s AS (SELECT generate_series($1::bigint, $2::bigint) AS i) \
                     INSERT INTO {HISTORY_INSERT} SELECT id, event_id, compact_id, event_date, \
                     enqueued_at, cmd, user_id, abonent_id, nas_id, params::jsonb, outcome, \
                     attempts, commands::jsonb, answer, error, duration_ms, finished_at \
                     FROM ({}) AS r(id, event_id, compact_id, event_date, enqueued_at, cmd, \
                     user_id, abonent_id, nas_id, params, outcome, attempts, commands, answer, \
                     error, duration_ms, finished_at)",
                    history_select(opts.rows, opts.accounts, newest_ms, &time)
                )
            }
            BenchDb::Sqlite(c) => {
                sqlx::query("PRAGMA synchronous = OFF")
                    .execute(&mut *c)
                    .await
                    .context("PRAGMA synchronous")?;
                format!(
                    "WITH RECURSIVE s(i) AS (SELECT ?1 UNION ALL SELECT i + 1 FROM s WHERE i < ?2) \
                     INSERT INTO {HISTORY_INSERT} {}",
                    history_select(opts.rows, opts.accounts, newest_ms, &|ms| format!("({ms})"))
                )
            }
        };
        let started = Instant::now();
        let progress = Progress::start(Format::count("  filled", opts.rows as u64, "rows"));
        let mut lo = 1;
        while lo <= opts.rows {
            let hi = (lo + CHUNK - 1).min(opts.rows);
            let done = match self {
                BenchDb::Postgres(c) => sqlx::query(&insert)
                    .bind(lo)
                    .bind(hi)
                    .execute(&mut *c)
                    .await
                    .map(|_| ()),
                BenchDb::Sqlite(c) => sqlx::query(&insert)
                    .bind(lo)
                    .bind(hi)
                    .execute(&mut *c)
                    .await
                    .map(|_| ()),
            };
            done.with_context(|| format!("filling events_history ({lo}..{hi})"))?;
            progress.set(hi as u64, 0);
            lo = hi + 1;
        }
        progress.finish();
        let rows = started.elapsed();
        let started = Instant::now();
        for (name, sql) in &indexes {
            self.execute(sql)
                .await
                .with_context(|| format!("building index {name} again"))?;
        }
        match self {
            BenchDb::Postgres(_) => {
                // The id sequence goes on after the filled ids; then what autovacuum does
                // after a bulk load (statistics, the visibility map).
                self.execute(&format!(
                    "SELECT setval(pg_get_serial_sequence('events_history', 'id'), {})",
                    opts.rows
                ))
                .await
                .context("moving the id sequence of events_history")?;
                self.execute("VACUUM ANALYZE events_history")
                    .await
                    .context("VACUUM ANALYZE")?;
                // Best effort: the fill's dirty pages written before measuring.
                let _ = self.execute("CHECKPOINT").await;
            }
            BenchDb::Sqlite(_) => {
                self.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                    .await
                    .context("checkpointing the fill")?;
            }
        }
        if let Some(file) = sqlite_file {
            // Synced before measuring: with `synchronous = OFF` the fill sits in the page
            // cache, and the daemon's first checkpoint (its fsync) would write all of it
            // back, a second and more after 10 million rows.
            let file = file.to_path_buf();
            tokio::task::spawn_blocking(move || std::fs::File::open(&file)?.sync_all())
                .await
                .context("syncing the filled database")?
                .context("syncing the filled database")?;
        }
        Ok(Fill {
            rows,
            indexes: started.elapsed(),
        })
    }

    async fn execute(&mut self, sql: &str) -> Result<(), sqlx::Error> {
        match self {
            BenchDb::Postgres(c) => sqlx::query(sql).execute(&mut *c).await.map(|_| ()),
            BenchDb::Sqlite(c) => sqlx::query(sql).execute(&mut *c).await.map(|_| ()),
        }
    }

    /// The secondary indexes of `events_history`: name and CREATE statement.
    async fn history_indexes(&mut self) -> anyhow::Result<Vec<(String, String)>> {
        let found = match self {
            BenchDb::Postgres(c) => {
                sqlx::query_as(
                    "SELECT i.indexname, i.indexdef FROM pg_indexes i \
                     JOIN pg_class x ON x.relname = i.indexname \
                     JOIN pg_index ix ON ix.indexrelid = x.oid \
                     WHERE i.schemaname = current_schema() AND i.tablename = 'events_history' \
                     AND NOT ix.indisprimary ORDER BY i.indexname",
                )
                .fetch_all(&mut *c)
                .await
            }
            BenchDb::Sqlite(c) => {
                sqlx::query_as(
                    "SELECT name, sql FROM sqlite_master WHERE type = 'index' \
                     AND tbl_name = 'events_history' AND sql IS NOT NULL ORDER BY name",
                )
                .fetch_all(&mut *c)
                .await
            }
        };
        found.context("listing the indexes of events_history")
    }

    /// The lowest id in `events_history`.
    async fn min_id(&mut self) -> anyhow::Result<Option<i64>> {
        let sql = "SELECT min(id) FROM events_history";
        let min = match self {
            BenchDb::Postgres(c) => sqlx::query_scalar(sql).fetch_one(&mut *c).await,
            BenchDb::Sqlite(c) => sqlx::query_scalar(sql).fetch_one(&mut *c).await,
        };
        min.context("reading the lowest history id")
    }

    /// Filled rows (ids up to `rows`) still in `events_history`.
    async fn old_rows_left(&mut self, rows: i64) -> anyhow::Result<i64> {
        let left = match self {
            BenchDb::Postgres(c) => {
                sqlx::query_scalar("SELECT count(*) FROM events_history WHERE id <= $1")
                    .bind(rows)
                    .fetch_one(&mut *c)
                    .await
            }
            BenchDb::Sqlite(c) => {
                sqlx::query_scalar("SELECT count(*) FROM events_history WHERE id <= ?1")
                    .bind(rows)
                    .fetch_one(&mut *c)
                    .await
            }
        };
        left.context("counting the rows left")
    }

    /// Reads back the run's events (ids above the filled ones, session ids starting
    /// with `tag`) and works out the pause and the percentiles.
    async fn delivery(&mut self, rows: i64, tag: &str, run: Run) -> anyhow::Result<Delivery> {
        let like = format!("{tag}%");
        let read: Result<Vec<(f64, f64)>, sqlx::Error> = match self {
            BenchDb::Postgres(c) => {
                sqlx::query_as(
                    "SELECT (EXTRACT(EPOCH FROM enqueued_at) * 1000)::float8, \
                     (EXTRACT(EPOCH FROM finished_at) * 1000)::float8 \
                     FROM events_history WHERE id > $1 AND acct_session_id LIKE $2",
                )
                .bind(rows)
                .bind(&like)
                .fetch_all(&mut *c)
                .await
            }
            BenchDb::Sqlite(c) => {
                sqlx::query_as(
                    "SELECT CAST(enqueued_at AS REAL), CAST(finished_at AS REAL) \
                     FROM events_history WHERE id > ?1 AND acct_session_id LIKE ?2",
                )
                .bind(rows)
                .bind(&like)
                .fetch_all(&mut *c)
                .await
            }
        };
        let mut events = read.context("reading the delivered events back")?;
        anyhow::ensure!(
            events.len() as u64 == run.events,
            "{} events enqueued, {} in history",
            run.events,
            events.len()
        );
        let pauses = pauses(&mut events);
        let mut latencies: Vec<f64> = events.iter().map(|(e, f)| f - e).collect();
        latencies.sort_by(|a, b| a.total_cmp(b));
        Ok(Delivery {
            events: events.len(),
            elapsed: run.elapsed,
            longest_pause_ms: pauses.longest_ms,
            longest_pause_at: chrono::DateTime::from_timestamp_millis(pauses.longest_from as i64),
            pauses_over_target: pauses.over_target,
            observed_pause_ms: run.observed_pause_ms,
            p50_ms: percentile(&latencies, 0.5),
            p99_ms: percentile(&latencies, 0.99),
            max_ms: latencies.last().copied().unwrap_or(0.0),
            longest_enqueue_ms: run.longest_enqueue_ms,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pause_counts_only_while_an_event_waits() {
        // (enqueued, finished) in ms: steady work, then nothing enqueued for 500 ms
        // (no pause), then an event that waits 300 ms behind a stall.
        let mut events = vec![
            (0.0, 10.0),
            (5.0, 20.0),
            (15.0, 30.0),
            (530.0, 540.0),
            (550.0, 850.0),
            (560.0, 860.0),
        ];
        assert_eq!(
            pauses(&mut events),
            Pauses {
                longest_ms: 300.0,
                longest_from: 550.0,
                over_target: 1
            }
        );
    }

    #[test]
    fn events_finishing_out_of_order_are_sorted_first() {
        let mut events = vec![(0.0, 100.0), (0.0, 10.0), (50.0, 60.0)];
        // Waiting since 0; finishes at 10, 60, 100: the longest gap is 10 -> 60.
        assert_eq!(pauses(&mut events).longest_ms, 50.0);
        assert_eq!(pauses(&mut []), Pauses::default());
    }

    #[test]
    fn the_daemon_log_gives_the_rows_pruned() {
        let log = "2026-01-01 00:00:00 nasd started\n\
             2026-01-01 00:00:05 History pruned: 4000 event(s) finished before 2025-10-03 00:00:00 deleted ([history] keep = 90d) in 1.2 s, the slowest statement 31 ms\n\
             2026-01-01 00:01:05 History pruned: 12 event(s) finished before 2025-10-03 00:01:00 deleted ([history] keep = 90d)\n";
        assert_eq!(pruned_from_log(log), (4012, Some(31.0)));
        assert_eq!(pruned_from_log(""), (0, None));
    }

    #[test]
    fn percentiles_of_sorted_values() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 51.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&[], 0.99), 0.0);
    }
}
