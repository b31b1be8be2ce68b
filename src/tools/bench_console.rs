//! `nasd bench-console`: the operator console's data requests (issue 14) timed on big
//! tables. A fresh database is filled with set-based SQL (1,000,000 finished events in
//! `events_history`, 100,000 queued in `events_stack`, a few thousand in
//! `events_stack_compact`, 100,000 accounts, 20 NAS, all paused so nothing is
//! delivered meanwhile); the daemon is started in-process with its HTTP server on
//! loopback, and every endpoint a console page asks is requested `--requests` times in
//! a row on one kept-alive connection. One line per endpoint: p50, p99 and max in
//! milliseconds, and whether p99 is within 100 ms.

use std::net::SocketAddr;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use sqlx::{ConnectOptions, Connection};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::http_client::HttpClient;
use super::scratch::{ScratchDb, ScratchDir};
use crate::config::{ApiConfig, Config};
use crate::store::{Nas, Secret};

#[derive(Debug, Clone, clap::Args)]
pub struct BenchConsoleOptions {
    /// `sqlite` (a temporary file) or a PostgreSQL server URL: a temporary database is
    /// created on that server and dropped afterwards.
    #[arg(long, default_value = "sqlite")]
    pub database: String,
    /// Finished events in `events_history` (90% done, 10% failed, over 30 days).
    #[arg(long, default_value_t = 1_000_000)]
    pub history: i64,
    /// Queued events in `events_stack` (5% of them retrying).
    #[arg(long, default_value_t = 100_000)]
    pub queued: i64,
    /// Events not expanded yet, in `events_stack_compact`.
    #[arg(long, default_value_t = 3000)]
    pub compact: i64,
    #[arg(long, default_value_t = 100_000)]
    pub accounts: i64,
    /// NAS the accounts and events are spread over (all paused).
    #[arg(long, default_value_t = 20)]
    pub nas: i64,
    /// Sequential requests per endpoint (after one untimed request).
    #[arg(long, default_value_t = 200)]
    pub requests: usize,
}

/// The target of issue 14: each data request within this at p99.
const TARGET_MS: f64 = 100.0;
const TOKEN: &str = "bench-token-0123456789abcdef";
/// Rows per statement when filling.
const CHUNK: i64 = 100_000;
const DAY_MS: i64 = 86_400_000;

/// Figures of one endpoint.
#[derive(Debug, Clone)]
pub struct Timing {
    pub name: String,
    /// `/status` and `/metrics`: not a console page's data request.
    pub informational: bool,
    pub status: u16,
    pub bytes: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Timing {
    pub fn within(&self) -> bool {
        self.p99_ms <= TARGET_MS
    }

    pub fn line(&self) -> String {
        format!(
            "{:<52} {:>4} {:>8} {:>8.2} {:>8.2} {:>8.2}  {}",
            self.name,
            self.status,
            self.bytes,
            self.p50_ms,
            self.p99_ms,
            self.max_ms,
            match (self.within(), self.informational) {
                (true, false) => "yes",
                (false, false) => "NO",
                (true, true) => "yes (informational)",
                (false, true) => "no (informational)",
            }
        )
    }
}

/// Sizes of what was filled and how long it took.
#[derive(Debug, Clone, Default)]
struct Fill {
    steps: Vec<(&'static str, Duration)>,
}

impl Fill {
    fn total(&self) -> Duration {
        self.steps.iter().map(|(_, d)| *d).sum()
    }
}

pub async fn run(opts: BenchConsoleOptions) -> anyhow::Result<()> {
    if opts.history < 1000 || opts.queued < 100 || opts.accounts < 5000 || opts.nas < 3 {
        anyhow::bail!(
            "--history must be at least 1000, --queued 100, --accounts 5000 and --nas 3 \
             (the requests name event ids, account 4242 and nas 3)"
        );
    }
    if opts.requests < 1 || opts.compact < 0 || opts.nas > 65_535 {
        anyhow::bail!("--requests must be at least 1, --compact at least 0, --nas at most 65535");
    }
    let backend = if opts.database == "sqlite" {
        "sqlite"
    } else {
        "postgres"
    };
    println!(
        "nasd bench-console: database {backend}, {} cores, {} requests per endpoint \
         (sequential, one kept-alive connection, after one untimed request)",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        opts.requests,
    );
    println!(
        "data: {} events in history (about 90% done, 10% failed, finished over the last \
         30 days), {} queued in events_stack (about 5% retrying), {} in events_stack_compact, \
         {} accounts, {} NAS (paused)",
        opts.history, opts.queued, opts.compact, opts.accounts, opts.nas
    );
    let scratch_dir = ScratchDir::create("nasd-bench-console")?;
    let tmp = scratch_dir.path();
    std::fs::create_dir_all(tmp.join("schemes/null"))
        .with_context(|| format!("creating {}", tmp.join("schemes/null").display()))?;
    std::fs::write(
        tmp.join("schemes/null/scheme.toml"),
        "description = \"bench-console: renders, sends nowhere\"\ntransport = \"null\"\n\
         dialect = \"plain\"\n[commands]\nuser_add = [\"add {{ user_id }}\"]\n\
         user_drop = [\"drop {{ user_id }}\"]\n",
    )
    .context("writing the bench scheme")?;
    let db = ScratchDb::create(
        &opts.database,
        &tmp.join("bench.db"),
        &format!("nasd_bench_console_{}", std::process::id()),
    )
    .await?;
    let result = measure_on(&opts, &db.url, tmp).await;
    db.remove().await;
    let timings = result?;
    let over: Vec<&Timing> = timings
        .iter()
        .filter(|t| !t.informational && !t.within())
        .collect();
    let counted = timings.iter().filter(|t| !t.informational).count();
    println!(
        "result: {} of {counted} data requests within {TARGET_MS:.0} ms at p99{}",
        counted - over.len(),
        if over.is_empty() {
            String::new()
        } else {
            format!(
                "; over: {}",
                over.iter()
                    .map(|t| t.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
    );
    Ok(())
}

async fn measure_on(
    opts: &BenchConsoleOptions,
    url: &str,
    tmp: &Path,
) -> anyhow::Result<Vec<Timing>> {
    let mut cfg = Config::default();
    cfg.database.url = url.to_string();
    cfg.daemon.log_dir = tmp.join("log");
    cfg.daemon.schemes_dir = tmp.join("schemes");
    // The compact rows are written after the daemon started: with no NOTIFY and an
    // hour between polls its expander leaves them where they are while we measure.
    cfg.daemon.poll_interval = Duration::from_secs(3600);
    cfg.database.listen = false;
    cfg.api = Some(ApiConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        tokens: vec![crate::config::ApiToken {
            name: "bench".into(),
            role: crate::config::Role::Admin,
            secret: Secret::new(TOKEN),
        }]
        .into(),
        ..ApiConfig::default()
    });
    let store = crate::daemon::open_store(&cfg).await?;
    for id in 1..=opts.nas {
        let mut nas = Nas::new(id, &format!("bench-{id}"), &nas_ip(id));
        nas.scheme = Some("null".into());
        nas.paused = true;
        store
            .nas_upsert(&nas)
            .await
            .with_context(|| format!("adding nas {id}"))?;
    }
    drop(store);
    let now_ms = chrono::Utc::now().timestamp_millis();
    let mut fill = Fill::default();
    if url.starts_with("sqlite") {
        fill_sqlite(opts, url, now_ms, &mut fill).await?;
    } else {
        fill_postgres(opts, url, now_ms, &mut fill).await?;
    }
    let shutdown = CancellationToken::new();
    let daemon = crate::daemon::start(cfg, shutdown.clone()).await?;
    let measured = async {
        // The expander's first pass has run by now; what is written from here on waits.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let t = Instant::now();
        if opts.compact > 0 {
            if url.starts_with("sqlite") {
                fill_sqlite_compact(opts, url, now_ms).await?;
            } else {
                fill_postgres_compact(opts, url, now_ms).await?;
            }
        }
        fill.steps.push(("compact stack", t.elapsed()));
        println!(
            "filled in {:.1}s ({})",
            fill.total().as_secs_f64(),
            fill.steps
                .iter()
                .map(|(what, d)| format!("{what} {:.1}s", d.as_secs_f64()))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let addr = daemon
            .api_addr
            .context("the daemon started without its HTTP server")?;
        // Let the console's sampler read the queues and the NAS once.
        tokio::time::sleep(Duration::from_secs(3)).await;
        measure_endpoints(opts, addr).await
    }
    .await;
    shutdown.cancel();
    daemon.wait().await?;
    measured
}

/// The address of NAS `id`: 10.255.x.y.
fn nas_ip(id: i64) -> String {
    format!("10.255.{}.{}", id / 256, id % 256)
}

/// Which events failed (one in ten) and which queued ones are retrying (one in 20): a
/// multiplicative hash of the id, so that neither follows the NAS or the account.
const FAILED: &str = "((i * 2654435761) >> 16) % 10 = 3";
const RETRYING: &str = "((i * 2654435761) >> 16) % 20 = 7";
/// The commands of the filled events (by the hash of the id): user_add the most frequent.
const CMD_CASE: &str = "CASE ((i * 2654435761) >> 24) % 8 WHEN 0 THEN 'user_add' WHEN 1 THEN 'user_add' \
     WHEN 2 THEN 'user_add' WHEN 3 THEN 'user_drop' WHEN 4 THEN 'user_drop' \
     WHEN 5 THEN 'user_rate_set' WHEN 6 THEN 'user_block' ELSE 'user_unblock' END";
/// A failed event's error (by the hash of the id).
const ERROR_CASE: &str = "CASE ((i * 2654435761) >> 20) % 4 WHEN 0 THEN 'timeout after 10s' \
     WHEN 1 THEN 'timeout after 10s' WHEN 2 THEN 'exit 1: no such user' \
     ELSE 'no route to host' END";

/// The SELECT list of the accounts; the SQL dialects differ only in the MAC.
fn accounts_select(opts: &BenchConsoleOptions, mac: &str) -> String {
    format!(
        "SELECT i, i, 1 + i % {nas}, 'user' || i, \
         '10.' || ((i >> 16) & 255) || '.' || ((i >> 8) & 255) || '.' || (i & 255), {mac} FROM s",
        nas = opts.nas
    )
}

/// The history rows: `i` is the id (and event id); finished in id order, spread over
/// the 30 days before `now_ms`; `f` is the finish time in epoch milliseconds.
fn history_select(
    opts: &BenchConsoleOptions,
    time: &dyn Fn(&str) -> String,
    now_ms: i64,
) -> String {
    let step = (30 * DAY_MS / opts.history).max(1);
    let start = now_ms - step * opts.history;
    format!(
        "SELECT i, i, i, {event_date}, {enqueued_at}, cmd, u, u, 1 + u % {nas}, '{{}}', \
         CASE WHEN {FAILED} THEN 'failed' ELSE 'done' END, \
         CASE WHEN {FAILED} THEN 3 ELSE 1 END, \
         '[\"' || replace(cmd, 'user_', '') || ' ' || u || '\"]', \
         CASE WHEN {FAILED} THEN '' ELSE 'ok' END, \
         CASE WHEN {FAILED} THEN {ERROR_CASE} END, 20 + i % 180, {finished_at} \
         FROM (SELECT i, 1 + (i * 7919) % {accounts} AS u, {CMD_CASE} AS cmd, \
         {start} + i * {step} AS f FROM s) x",
        event_date = time("f - 2000"),
        enqueued_at = time("f - 1500"),
        finished_at = time("f"),
        nas = opts.nas,
        accounts = opts.accounts,
    )
}

/// The main stack's rows: `i` is the id, the event id follows history's; enqueued over
/// the last hour; one in 20 retrying (an attempt failed, the next in ten minutes).
fn stack_select(opts: &BenchConsoleOptions, time: &dyn Fn(&str) -> String, now_ms: i64) -> String {
    let step = (3_600_000 / opts.queued).max(1);
    let start = now_ms - step * opts.queued;
    let retry_at = now_ms + 600_000;
    format!(
        "SELECT i, {history} + i, {t}, {t}, cmd, u, u, 1 + u % {nas}, '{{}}', \
         CASE WHEN {RETRYING} THEN 1 + i % 3 ELSE 0 END, 'ready', \
         CASE WHEN {RETRYING} THEN {retry_at} END, \
         CASE WHEN {RETRYING} THEN 'timeout after 10s' END \
         FROM (SELECT i, 1 + (i * 104729) % {accounts} AS u, {CMD_CASE} AS cmd, \
         {start} + i * {step} AS f FROM s) x",
        history = opts.history,
        t = time("f"),
        retry_at = time(&retry_at.to_string()),
        nas = opts.nas,
        accounts = opts.accounts,
    )
}

/// The compact stack's rows: ids after the main stack's, created in the last minute.
fn compact_select(
    opts: &BenchConsoleOptions,
    time: &dyn Fn(&str) -> String,
    now_ms: i64,
) -> String {
    let step = (60_000 / opts.compact.max(1)).max(1);
    let start = now_ms - step * opts.compact;
    format!(
        "SELECT {base} + i, cmd, u, u, \
         '10.255.' || ((1 + u % {nas}) / 256) || '.' || ((1 + u % {nas}) % 256), {t} \
         FROM (SELECT i, 1 + (i * 7907) % {accounts} AS u, {CMD_CASE} AS cmd, \
         {start} + i * {step} AS f FROM s) x",
        base = opts.history + opts.queued,
        t = time("f"),
        nas = opts.nas,
        accounts = opts.accounts,
    )
}

const ACCOUNT_COLUMNS: &str = "accounts (user_id, abonent_id, nas_id, login, ip, mac)";
const HISTORY_INSERT: &str = "events_history (id, event_id, compact_id, event_date, enqueued_at, \
     cmd, user_id, abonent_id, nas_id, params, outcome, attempts, commands, answer, error, \
     duration_ms, finished_at)";
const STACK_INSERT: &str = "events_stack (id, compact_id, event_date, enqueued_at, cmd, user_id, \
     abonent_id, nas_id, params, try_count, state, retry_at, last_error)";
const COMPACT_INSERT: &str =
    "events_stack_compact (id, cmd, user_id, abonent_id, nas_ip, created_at)";

/// Runs `insert` (which reads `i` from `s`) for `1..=total` in chunks, on SQLite: a
/// recursive CTE counts each chunk.
async fn sqlite_chunks(
    conn: &mut sqlx::SqliteConnection,
    what: &str,
    total: i64,
    insert: &str,
) -> anyhow::Result<()> {
    let mut lo = 1;
    while lo <= total {
        let hi = (lo + CHUNK - 1).min(total);
        let sql = format!(
            "WITH RECURSIVE s(i) AS (SELECT {lo} UNION ALL SELECT i + 1 FROM s WHERE i < {hi}) {insert}"
        );
        sqlx::query(&sql)
            .execute(&mut *conn)
            .await
            .with_context(|| format!("filling {what} ({lo}..{hi})"))?;
        lo = hi + 1;
    }
    Ok(())
}

async fn sqlite_connect(url: &str) -> anyhow::Result<sqlx::SqliteConnection> {
    let options = sqlx::sqlite::SqliteConnectOptions::from_str(url)
        .with_context(|| format!("reading the SQLite URL {url}"))?
        .busy_timeout(Duration::from_secs(30))
        // The fill's statements take seconds: not worth a warning each.
        .disable_statement_logging();
    sqlx::SqliteConnection::connect_with(&options)
        .await
        .context("opening the SQLite database to fill it")
}

/// SQLite times are epoch milliseconds already.
fn sqlite_time(ms: &str) -> String {
    format!("({ms})")
}

async fn fill_sqlite(
    opts: &BenchConsoleOptions,
    url: &str,
    now_ms: i64,
    fill: &mut Fill,
) -> anyhow::Result<()> {
    let mut conn = sqlite_connect(url).await?;
    sqlx::query("PRAGMA synchronous = OFF")
        .execute(&mut conn)
        .await
        .context("PRAGMA synchronous")?;
    let t = Instant::now();
    let mac = "printf('02:00:%02x:%02x:%02x:%02x', (i >> 24) & 255, (i >> 16) & 255, \
               (i >> 8) & 255, i & 255)";
    let sql = format!(
        "INSERT INTO {ACCOUNT_COLUMNS} {}",
        accounts_select(opts, mac)
    );
    sqlite_chunks(&mut conn, "accounts", opts.accounts, &sql).await?;
    fill.steps.push(("accounts", t.elapsed()));
    let t = Instant::now();
    let sql = format!(
        "INSERT INTO {HISTORY_INSERT} {}",
        history_select(opts, &sqlite_time, now_ms)
    );
    sqlite_chunks(&mut conn, "events_history", opts.history, &sql).await?;
    fill.steps.push(("history", t.elapsed()));
    let t = Instant::now();
    let sql = format!(
        "INSERT INTO {STACK_INSERT} {}",
        stack_select(opts, &sqlite_time, now_ms)
    );
    sqlite_chunks(&mut conn, "events_stack", opts.queued, &sql).await?;
    fill.steps.push(("stack", t.elapsed()));
    // No ANALYZE: nasd never runs it on SQLite, so the plans measured are the ones a
    // production database gets.
    conn.close().await.context("closing the fill connection")?;
    Ok(())
}

async fn fill_sqlite_compact(
    opts: &BenchConsoleOptions,
    url: &str,
    now_ms: i64,
) -> anyhow::Result<()> {
    let mut conn = sqlite_connect(url).await?;
    let sql = format!(
        "INSERT INTO {COMPACT_INSERT} {}",
        compact_select(opts, &sqlite_time, now_ms)
    );
    sqlite_chunks(&mut conn, "events_stack_compact", opts.compact, &sql).await?;
    conn.close().await.context("closing the fill connection")?;
    Ok(())
}

/// On PostgreSQL: `generate_series` gives each chunk's `i`.
async fn postgres_chunks(
    conn: &mut sqlx::PgConnection,
    what: &str,
    total: i64,
    insert: &str,
) -> anyhow::Result<()> {
    let mut lo = 1;
    while lo <= total {
        let hi = (lo + CHUNK - 1).min(total);
        let sql =
            format!("WITH s AS (SELECT generate_series({lo}::bigint, {hi}::bigint) AS i) {insert}");
        sqlx::query(&sql)
            .execute(&mut *conn)
            .await
            .with_context(|| format!("filling {what} ({lo}..{hi})"))?;
        lo = hi + 1;
    }
    Ok(())
}

async fn postgres_connect(url: &str) -> anyhow::Result<sqlx::PgConnection> {
    let options = sqlx::postgres::PgConnectOptions::from_str(url)
        .context("reading the PostgreSQL URL")?
        .disable_statement_logging();
    sqlx::PgConnection::connect_with(&options)
        .await
        .context("connecting to PostgreSQL to fill the database")
}

fn postgres_time(ms: &str) -> String {
    format!("to_timestamp(({ms}) / 1000.0)")
}

async fn fill_postgres(
    opts: &BenchConsoleOptions,
    url: &str,
    now_ms: i64,
    fill: &mut Fill,
) -> anyhow::Result<()> {
    let mut conn = postgres_connect(url).await?;
    let t = Instant::now();
    let hex = |shift: u32| format!("lpad(to_hex((i >> {shift}) & 255), 2, '0')");
    let mac = format!(
        "'02:00:' || {} || ':' || {} || ':' || {} || ':' || {}",
        hex(24),
        hex(16),
        hex(8),
        hex(0)
    );
    let sql = format!(
        "INSERT INTO {ACCOUNT_COLUMNS} {}",
        accounts_select(opts, &mac)
    );
    postgres_chunks(&mut conn, "accounts", opts.accounts, &sql).await?;
    fill.steps.push(("accounts", t.elapsed()));
    let t = Instant::now();
    // jsonb columns: the text built is cast.
    let sql = format!(
        "INSERT INTO {HISTORY_INSERT} SELECT id, event_id, compact_id, event_date, enqueued_at, \
         cmd, user_id, abonent_id, nas_id, params::jsonb, outcome, attempts, commands::jsonb, \
         answer, error, duration_ms, finished_at FROM ({}) AS r(id, event_id, compact_id, \
         event_date, enqueued_at, cmd, user_id, abonent_id, nas_id, params, outcome, attempts, \
         commands, answer, error, duration_ms, finished_at)",
        history_select(opts, &postgres_time, now_ms)
    );
    postgres_chunks(&mut conn, "events_history", opts.history, &sql).await?;
    fill.steps.push(("history", t.elapsed()));
    let t = Instant::now();
    let sql = format!(
        "INSERT INTO {STACK_INSERT} SELECT id, compact_id, event_date, enqueued_at, cmd, \
         user_id, abonent_id, nas_id, params::jsonb, try_count, state, retry_at, last_error \
         FROM ({}) AS r(id, compact_id, event_date, enqueued_at, cmd, user_id, abonent_id, \
         nas_id, params, try_count, state, retry_at, last_error)",
        stack_select(opts, &postgres_time, now_ms)
    );
    postgres_chunks(&mut conn, "events_stack", opts.queued, &sql).await?;
    fill.steps.push(("stack", t.elapsed()));
    let t = Instant::now();
    // The ids were given: the sequences go on after them (the compact stack's after the
    // ids of the rows written once the daemon runs).
    for (table, last) in [
        ("events_history", opts.history),
        ("events_stack", opts.queued),
        (
            "events_stack_compact",
            opts.history + opts.queued + opts.compact,
        ),
    ] {
        sqlx::query(&format!(
            "SELECT setval(pg_get_serial_sequence('{table}', 'id'), {last})"
        ))
        .execute(&mut conn)
        .await
        .with_context(|| format!("moving the id sequence of {table}"))?;
    }
    // What autovacuum does soon after a bulk load: statistics and the visibility map.
    sqlx::query("VACUUM ANALYZE")
        .execute(&mut conn)
        .await
        .context("VACUUM ANALYZE")?;
    fill.steps.push(("vacuum analyze", t.elapsed()));
    conn.close().await.context("closing the fill connection")?;
    Ok(())
}

async fn fill_postgres_compact(
    opts: &BenchConsoleOptions,
    url: &str,
    now_ms: i64,
) -> anyhow::Result<()> {
    let mut conn = postgres_connect(url).await?;
    let sql = format!(
        "INSERT INTO {COMPACT_INSERT} {}",
        compact_select(opts, &postgres_time, now_ms)
    );
    postgres_chunks(&mut conn, "events_stack_compact", opts.compact, &sql).await?;
    sqlx::query("ANALYZE events_stack_compact")
        .execute(&mut conn)
        .await
        .context("ANALYZE events_stack_compact")?;
    conn.close().await.context("closing the fill connection")?;
    Ok(())
}

/// One endpoint to time.
struct Endpoint {
    name: String,
    method: &'static str,
    path: String,
    body: Vec<u8>,
    /// Statuses that count as an answer (`/status` says 503 while events wait long).
    ok: &'static [u16],
    informational: bool,
}

impl Endpoint {
    fn get(path: impl Into<String>) -> Endpoint {
        let path = path.into();
        Endpoint {
            name: format!("GET {path}"),
            method: "GET",
            path,
            body: Vec::new(),
            ok: &[200],
            informational: false,
        }
    }
}

/// One request with the bench token; an error unless the status is one of `ok`.
async fn call(
    client: &mut HttpClient,
    method: &str,
    path: &str,
    body: &[u8],
    ok: &[u16],
) -> anyhow::Result<super::http_client::HttpResponse> {
    let auth = format!("Bearer {TOKEN}");
    let mut headers = vec![("Authorization", auth.as_str())];
    if !body.is_empty() {
        headers.push(("Content-Type", "application/json"));
    }
    let resp = client
        .request(method, path, &headers, body)
        .await
        .with_context(|| format!("{method} {path}"))?;
    if !ok.contains(&resp.status) {
        anyhow::bail!(
            "{method} {path}: HTTP {}: {}",
            resp.status,
            resp.text().chars().take(300).collect::<String>()
        );
    }
    Ok(resp)
}

async fn measure_endpoints(
    opts: &BenchConsoleOptions,
    addr: SocketAddr,
) -> anyhow::Result<Vec<Timing>> {
    let mut client = HttpClient::new(addr);
    // What the requests name, read from the daemon.
    let user = 4242;
    let found = call(
        &mut client,
        "GET",
        &format!("/api/v1/accounts?q={user}"),
        b"",
        &[200],
    )
    .await?
    .json();
    let hit = &found["accounts"][0];
    let ip = hit["ip"]
        .as_str()
        .with_context(|| format!("account {user} not found: {found}"))?
        .to_string();
    let mac = hit["mac"]
        .as_str()
        .with_context(|| format!("account {user} has no MAC: {found}"))?
        .to_string();
    let first = call(&mut client, "GET", "/api/v1/events?state=done", b"", &[200])
        .await?
        .json();
    let next_before = first["next_before"]
        .as_i64()
        .with_context(|| format!("the first page of done events has no next_before: {first}"))?;
    // The NAS's log, as a NAS that has worked for a while has one (the tail reads 1 MiB).
    let log = call(&mut client, "GET", "/api/v1/nas/3/log?lines=1", b"", &[200])
        .await?
        .json();
    let log_path = log["path"]
        .as_str()
        .with_context(|| format!("no log path for nas 3: {log}"))?
        .to_string();
    write_nas_log(Path::new(&log_path))?;
    let history_id = opts.history / 2;
    let retry_filter = br#"{"filter":{"state":"failed","nas":3,"error":"timeout"},"dry_run":true}"#;
    let mut endpoints = vec![
        Endpoint::get("/api/v1/overview"),
        Endpoint::get("/api/v1/series"),
        Endpoint::get("/api/v1/nas/3"),
        Endpoint::get("/api/v1/nas/3/series"),
        Endpoint::get("/api/v1/nas/3/log?lines=200"),
    ];
    for q in [
        "state=queued",
        "state=retrying",
        "state=running",
        "state=failed",
        "state=done",
        "state=failed&nas=3",
        "state=done&cmd=user_add",
        "state=failed&error=timeout",
        "state=done&since=1h",
    ] {
        endpoints.push(Endpoint::get(format!("/api/v1/events?{q}")));
    }
    let mut second = Endpoint::get(format!("/api/v1/events?state=done&before={next_before}"));
    second.name = "GET /api/v1/events?state=done&before=<next_before>".into();
    endpoints.push(second);
    endpoints.push(Endpoint::get(format!("/api/v1/events/{history_id}")));
    for q in [
        user.to_string(),
        format!("user{user}"),
        ip.clone(),
        mac.clone(),
    ] {
        endpoints.push(Endpoint::get(format!("/api/v1/accounts?q={q}")));
    }
    endpoints.push(Endpoint::get(format!("/api/v1/accounts/{user}/events")));
    endpoints.push(Endpoint::get("/api/v1/stack"));
    endpoints.push(Endpoint::get("/api/v1/audit"));
    endpoints.push(Endpoint {
        name: "POST /api/v1/events/retry (filter, dry_run)".into(),
        method: "POST",
        path: "/api/v1/events/retry".into(),
        body: retry_filter.to_vec(),
        ok: &[200],
        informational: false,
    });
    for path in ["/status", "/metrics"] {
        endpoints.push(Endpoint {
            ok: &[200, 503],
            informational: true,
            ..Endpoint::get(path)
        });
    }
    println!(
        "{:<52} {:>4} {:>8} {:>8} {:>8} {:>8}  p99<={TARGET_MS:.0}ms",
        "endpoint", "http", "bytes", "p50 ms", "p99 ms", "max ms"
    );
    let mut timings = Vec::with_capacity(endpoints.len());
    for e in &endpoints {
        // One untimed request: the statement is prepared, the pages are cached.
        let warm = call(&mut client, e.method, &e.path, &e.body, e.ok).await?;
        let mut lat = Vec::with_capacity(opts.requests);
        let mut last = warm;
        for _ in 0..opts.requests {
            let t = Instant::now();
            last = call(&mut client, e.method, &e.path, &e.body, e.ok).await?;
            lat.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        lat.sort_by(f64::total_cmp);
        let pct = |p: f64| lat[((lat.len() - 1) as f64 * p).round() as usize];
        let timing = Timing {
            name: e.name.clone(),
            informational: e.informational,
            status: last.status,
            bytes: last.body.len(),
            p50_ms: pct(0.5),
            p99_ms: pct(0.99),
            max_ms: lat[lat.len() - 1],
        };
        println!("{}", timing.line());
        timings.push(timing);
    }
    Ok(timings)
}

/// Fills the NAS's log file with 2 MiB of lines such as the journal writes, unless it
/// has more already.
fn write_nas_log(path: &Path) -> anyhow::Result<()> {
    use std::io::Write;
    if std::fs::metadata(path).is_ok_and(|m| m.len() >= 2 << 20) {
        return Ok(());
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let mut out = std::io::BufWriter::new(file);
    let mut written = 0usize;
    let mut i = 0u64;
    while written < 2 << 20 {
        let line = format!(
            "2026-01-01 00:{:02}:{:02}.{:03} event {} user_add user_id={} -> add {} : ok ({} ms)\n",
            (i / 60) % 60,
            i % 60,
            i % 1000,
            1_000_000 + i,
            1 + i % 100_000,
            1 + i % 100_000,
            20 + i % 180
        );
        out.write_all(line.as_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
        written += line.len();
        i += 1;
    }
    out.flush()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
