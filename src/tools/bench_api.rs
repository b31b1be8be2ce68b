//! `nasd bench-api`: enqueue throughput over HTTP against the daemon started in-process
//! on a fresh database (loopback, a random port, a bearer token): single events on
//! `/api/v1/events`, batches on `/api/v1/events/batch`, and single events on the
//! billing-compatible `/rest_api/v2/EventsStackCompact/`. The daemon expands and
//! delivers the events meanwhile (a null-transport NAS), as in production.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use anyhow::Context;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::http_client::HttpClient;
use super::scratch::{self, ScratchDb, ScratchDir};
use crate::config::{ApiConfig, Config};
use crate::store::{Nas, Secret};

#[derive(Debug, Clone, clap::Args)]
pub struct BenchApiOptions {
    /// `sqlite` (a temporary file) or a PostgreSQL server URL: a temporary database is
    /// created on that server and dropped afterwards.
    #[arg(long, default_value = "sqlite")]
    pub database: String,
    /// Requests of one event each (JSON API, then as many on the billing endpoint).
    #[arg(long, default_value_t = 5000)]
    pub requests: i64,
    /// Batch requests, of `--batch-size` events each.
    #[arg(long, default_value_t = 200)]
    pub batches: i64,
    #[arg(long, default_value_t = 100)]
    pub batch_size: i64,
    /// Concurrent client connections (kept alive).
    #[arg(long, default_value_t = 8)]
    pub connections: i64,
    /// Accounts the events are spread over.
    #[arg(long, default_value_t = 1000)]
    pub accounts: i64,
}

/// Figures of one phase.
#[derive(Debug, Clone)]
pub struct Phase {
    pub name: &'static str,
    pub requests: i64,
    pub events: i64,
    pub elapsed: Duration,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

impl Phase {
    pub fn line(&self) -> String {
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        format!(
            "{:<28} {:>7} requests {:>8} events in {:>6.2}s: {:>8.0} requests/s {:>9.0} events/s  p50 {:.2} ms  p99 {:.2} ms",
            self.name,
            self.requests,
            self.events,
            secs,
            self.requests as f64 / secs,
            self.events as f64 / secs,
            self.p50_ms,
            self.p99_ms
        )
    }
}

const TOKEN: &str = "bench-token-0123456789abcdef";

pub async fn run(opts: BenchApiOptions) -> anyhow::Result<()> {
    if opts.requests < 1 || opts.batches < 0 || opts.batch_size < 1 || opts.connections < 1 {
        anyhow::bail!("--requests, --batch-size and --connections must be at least 1");
    }
    let phases = measure(&opts).await?;
    println!(
        "nasd bench-api: database {}, {} connections, {} cores",
        if opts.database == "sqlite" {
            "sqlite"
        } else {
            "postgres"
        },
        opts.connections,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    for p in &phases {
        println!("{}", p.line());
    }
    Ok(())
}

/// Runs the phases on a fresh database and returns their figures.
pub async fn measure(opts: &BenchApiOptions) -> anyhow::Result<Vec<Phase>> {
    let scratch_dir = ScratchDir::create("nasd-bench-api")?;
    let tmp = scratch_dir.path();
    std::fs::create_dir_all(tmp.join("schemes/null"))?;
    std::fs::write(
        tmp.join("schemes/null/scheme.toml"),
        "description = \"bench-api: renders, sends nowhere\"\ntransport = \"null\"\ndialect = \"plain\"\n\
         [commands]\nuser_add = [\"add {{ user_id }}\"]\nuser_drop = [\"drop {{ user_id }}\"]\n",
    )?;
    let db = ScratchDb::create(
        &opts.database,
        &tmp.join("bench.db"),
        &format!("nasd_bench_api_{}", std::process::id()),
    )
    .await?;
    let result = measure_on(opts, &db.url, tmp).await;
    db.remove().await;
    result
}

async fn measure_on(
    opts: &BenchApiOptions,
    url: &str,
    tmp: &std::path::Path,
) -> anyhow::Result<Vec<Phase>> {
    let mut cfg = Config::default();
    cfg.database.url = url.to_string();
    cfg.daemon.log_dir = tmp.join("log");
    cfg.daemon.schemes_dir = tmp.join("schemes");
    cfg.daemon.resync_interval = Duration::from_millis(500);
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
    let mut nas = Nas::new(1, "bench", "10.255.0.1");
    nas.scheme = Some("null".into());
    nas.n_workers = 64;
    store.nas_upsert(&nas).await?;
    let records = scratch::accounts(
        &["user_id", "abonent_id", "nas_id"],
        (1..=opts.accounts).map(|i| vec![i.to_string(), i.to_string(), "1".into()]),
    )?;
    store.accounts_upsert(&records).await?;
    let shutdown = CancellationToken::new();
    let daemon = crate::daemon::start(cfg, shutdown.clone()).await?;
    let addr = daemon
        .api_addr
        .context("the daemon started without its HTTP server")?;
    let accounts = opts.accounts;
    let auth = format!("Bearer {TOKEN}");
    let mut phases = Vec::new();
    let single = load(addr, opts.connections, opts.requests, {
        let auth = auth.clone();
        move |i| {
            let body = format!("{{\"cmd\":\"user_add\",\"user_id\":{}}}", 1 + i % accounts);
            (
                "/api/v1/events",
                vec![
                    ("Authorization".into(), auth.clone()),
                    ("Content-Type".into(), "application/json".into()),
                ],
                body.into_bytes(),
                1,
            )
        }
    })
    .await?;
    phases.push(Phase {
        name: "json, 1 event/request",
        ..single
    });
    if opts.batches > 0 {
        let size = opts.batch_size;
        let batched = load(addr, opts.connections, opts.batches, {
            let auth = auth.clone();
            move |i| {
                let events: Vec<String> = (0..size)
                    .map(|k| {
                        format!(
                            "{{\"cmd\":\"user_drop\",\"user_id\":{}}}",
                            1 + (i * size + k) % accounts
                        )
                    })
                    .collect();
                (
                    "/api/v1/events/batch",
                    vec![
                        ("Authorization".into(), auth.clone()),
                        ("Content-Type".into(), "application/json".into()),
                    ],
                    format!("{{\"events\":[{}]}}", events.join(",")).into_bytes(),
                    size,
                )
            }
        })
        .await?;
        phases.push(Phase {
            name: "json, batch request",
            ..batched
        });
    }
    let billing = load(addr, opts.connections, opts.requests, {
        let auth = auth.clone();
        move |i| {
            (
                "/rest_api/v2/EventsStackCompact/",
                vec![
                    ("Authorization".into(), auth.clone()),
                    (
                        "Content-Type".into(),
                        "application/x-www-form-urlencoded".into(),
                    ),
                ],
                format!(
                    "method1=objects.create&arg1={{\"user_id\": {},\"cmd\":\"user_add\"}}",
                    1 + i % accounts
                )
                .into_bytes(),
                1,
            )
        }
    })
    .await?;
    phases.push(Phase {
        name: "billing form, 1 event",
        ..billing
    });
    shutdown.cancel();
    daemon.wait().await?;
    Ok(phases)
}

type RequestSpec = (&'static str, Vec<(String, String)>, Vec<u8>, i64);

/// `total` requests over `connections` kept-alive connections; every answer must be 201
/// (or 200 for the billing endpoint).
async fn load<F>(addr: SocketAddr, connections: i64, total: i64, make: F) -> anyhow::Result<Phase>
where
    F: Fn(i64) -> RequestSpec + Send + Sync + 'static,
{
    let make = Arc::new(make);
    let next = Arc::new(AtomicI64::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..connections {
        let make = make.clone();
        let next = next.clone();
        tasks.spawn(async move {
            let mut client = HttpClient::new(addr);
            let mut latencies = Vec::new();
            let mut events = 0;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let (path, headers, body, n) = make(i);
                let h: Vec<(&str, &str)> = headers
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                let t = Instant::now();
                let resp = client.request("POST", path, &h, &body).await?;
                latencies.push(t.elapsed().as_secs_f64() * 1000.0);
                if resp.status != 201 && resp.status != 200 {
                    anyhow::bail!("{path}: HTTP {}: {}", resp.status, resp.text());
                }
                events += n;
            }
            Ok::<_, anyhow::Error>((latencies, events))
        });
    }
    let mut all = Vec::new();
    let mut events = 0;
    while let Some(done) = tasks.join_next().await {
        let (lat, n) = done??;
        all.extend(lat);
        events += n;
    }
    let elapsed = started.elapsed();
    all.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        if all.is_empty() {
            0.0
        } else {
            all[((all.len() - 1) as f64 * p).round() as usize]
        }
    };
    Ok(Phase {
        name: "",
        requests: total,
        events,
        elapsed,
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
    })
}
