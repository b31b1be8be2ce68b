//! `nasd bench`: events/s and enqueue-to-done latency through the whole pipeline
//! (compact stack -> expansion -> claim -> transport -> history) on a fresh database.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use sqlx::Connection;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::store::{AccountRecord, CompactEvent, Nas, Store};

#[derive(Debug, Clone, clap::Args)]
pub struct BenchOptions {
    /// `sqlite` (a temporary file) or a PostgreSQL server URL such as
    /// postgres://postgres@127.0.0.1:5432/test: a temporary database is created on that
    /// server and dropped afterwards; the named database is not touched.
    #[arg(long, default_value = "sqlite")]
    pub database: String,
    /// `null` (in-process, sends nowhere) or `exec` (runs a no-op local script per event).
    #[arg(long, default_value = "null")]
    pub transport: String,
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
}

pub struct BenchResult {
    pub events: i64,
    pub elapsed: Duration,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub failed: i64,
}

pub async fn run(opts: BenchOptions) -> anyhow::Result<()> {
    let result = measure(&opts).await?;
    println!(
        "bench: database={} transport={} events={} accounts={} nas={} workers={} rate={}",
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
        if opts.rate == 0 {
            "burst".to_string()
        } else {
            format!("{}/s", opts.rate)
        }
    );
    println!(
        "bench: {} events in {:.2}s = {:.0} events/s; enqueue-to-done p50 {:.1} ms, p99 {:.1} ms; failed {}",
        result.events,
        result.elapsed.as_secs_f64(),
        result.events as f64 / result.elapsed.as_secs_f64(),
        result.p50_ms,
        result.p99_ms,
        result.failed
    );
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
    let tmp = std::env::temp_dir().join(format!("nasd-bench-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    write_schemes(&tmp.join("schemes"))?;
    let scheme = match opts.transport.as_str() {
        "null" => "bench-null",
        "exec" => "bench-exec",
        other => anyhow::bail!("--transport {other}: expected null or exec"),
    };
    let mut pg_admin: Option<(String, String)> = None;
    let url = if opts.database == "sqlite" {
        format!("sqlite://{}", tmp.join("bench.db").display())
    } else if opts.database.starts_with("postgres") {
        let name = format!("nasd_bench_{}", std::process::id());
        let mut admin = sqlx::PgConnection::connect(&opts.database)
            .await
            .context("connecting to the PostgreSQL server for the benchmark")?;
        sqlx::query(&format!("DROP DATABASE IF EXISTS {name}"))
            .execute(&mut admin)
            .await?;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await?;
        let url = replace_db_name(&opts.database, &name);
        pg_admin = Some((opts.database.clone(), name));
        url
    } else {
        anyhow::bail!("--database must be `sqlite` or a postgres:// URL");
    };
    let result = measure_on(opts, &url, &tmp, scheme).await;
    if let Some((admin_url, name)) = pg_admin
        && let Ok(mut admin) = sqlx::PgConnection::connect(&admin_url).await
    {
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .execute(&mut admin)
            .await;
    }
    let _ = std::fs::remove_dir_all(&tmp);
    result
}

/// postgres://u@h:5432/test -> postgres://u@h:5432/NAME (query string kept).
pub fn replace_db_name(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (url, String::new()),
    };
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    match base[scheme_end..].find('/') {
        Some(slash) => format!("{}/{name}{query}", &base[..scheme_end + slash]),
        None => format!("{base}/{name}{query}"),
    }
}

async fn measure_on(
    opts: &BenchOptions,
    url: &str,
    tmp: &Path,
    scheme: &str,
) -> anyhow::Result<BenchResult> {
    let mut cfg = Config::default();
    cfg.database.url = url.to_string();
    cfg.database.max_connections = 16;
    cfg.daemon.log_dir = tmp.join("log");
    cfg.daemon.schemes_dir = tmp.join("schemes");
    cfg.daemon.resync_interval = Duration::from_secs(5);
    cfg.daemon.poll_interval = Duration::from_millis(100);
    cfg.daemon.window = 20000;
    cfg.daemon.expand_batch = 2000;
    cfg.validate()?;
    let store: Store = crate::daemon::open_store(&cfg).await?;
    for n in 1..=opts.nas.max(1) {
        store
            .nas_upsert(&Nas {
                id: n,
                name: format!("bench{n}"),
                ip: format!("10.254.0.{n}"),
                scheme: Some(scheme.into()),
                script_name: None,
                n_workers: opts.workers,
                protocol: None,
                port: None,
                login: None,
                password: None,
                secret: None,
                max_sessions: 4,
                enabled: true,
                host_key_policy: "strict".into(),
                host_key: None,
                legacy_crypto: false,
            })
            .await?;
    }
    let headers: Vec<String> = [
        "user_id",
        "abonent_id",
        "nas_id",
        "ip",
        "rate_in",
        "rate_out",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut accounts = Vec::new();
    for i in 1..=opts.accounts {
        let values = vec![
            i.to_string(),
            i.to_string(),
            (1 + i % opts.nas.max(1)).to_string(),
            format!("10.{}.{}.{}", 64 + i / 65536, (i / 256) % 256, i % 256),
            "10240".into(),
            "10240".into(),
        ];
        accounts.push(AccountRecord::from_fields(&headers, &values).map_err(anyhow::Error::msg)?);
    }
    for chunk in accounts.chunks(2000) {
        store.accounts_upsert(chunk).await?;
    }
    const CMDS: [&str; 3] = ["user_add", "user_rate_set", "user_drop"];
    let events: Vec<CompactEvent> = (0..opts.events)
        .map(|i| CompactEvent {
            cmd: CMDS[(i / opts.accounts.max(1)) as usize % CMDS.len()].into(),
            user_id: 1 + i % opts.accounts.max(1),
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
    let (done, failed) = loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let (done, failed) = store.history_counts().await?;
        if done + failed >= opts.events {
            break (done, failed);
        }
        if daemon.is_finished() {
            anyhow::bail!("the daemon stopped before the stack was drained");
        }
    };
    let elapsed = started.elapsed();
    shutdown.cancel();
    daemon.await??;
    if let Some(p) = producer {
        p.await??;
    }
    let mut lat = store.latencies_ms().await?;
    lat.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 - 1.0) * p) as usize)
            .copied()
            .unwrap_or(0.0)
    };
    Ok(BenchResult {
        events: done + failed,
        elapsed,
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
        failed,
    })
}

#[cfg(test)]
mod tests {
    use super::replace_db_name;

    #[test]
    fn db_name_replaced() {
        assert_eq!(
            replace_db_name("postgres://postgres@127.0.0.1:5432/test", "x"),
            "postgres://postgres@127.0.0.1:5432/x"
        );
        assert_eq!(replace_db_name("postgres://h", "x"), "postgres://h/x");
        assert_eq!(
            replace_db_name("postgres://h/db?sslmode=disable", "x"),
            "postgres://h/x?sslmode=disable"
        );
    }
}
