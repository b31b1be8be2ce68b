//! `nasd bench --billing-mysql URL`: expansion alone (compact stack -> main stack) with
//! the variables from nasd's own `accounts` table, then from a MariaDB/MySQL billing
//! database holding the same accounts (`[billing] params_query`), events/s of each.
//! Nothing is delivered: no daemon runs, only the expander's calls.

use anyhow::Context;
use sqlx::{Connection, Executor};
use tokio::time::Instant;

use super::bench::BenchOptions;
use super::scratch::{self, ScratchDb, ScratchDir};
use crate::billing::Billing;
use crate::config::billing::{BillingConfig, BillingKind};
use crate::store::{CompactEvent, Nas, Store};

const PARAMS_MYSQL: &str = "SELECT user_id, abonent_id, nas_id, login, ip, rate_in, rate_out \
     FROM accounts WHERE user_id = ?";

pub async fn run(opts: &BenchOptions, billing_server: &str) -> anyhow::Result<()> {
    let tmp = ScratchDir::create("nasd-bench-billing")?;
    let db = ScratchDb::create(
        &opts.database,
        &tmp.path().join("bench.db"),
        "nasd_bench_billing",
    )
    .await?;
    let result = measure(opts, billing_server, &db.url).await;
    db.remove().await;
    let (own, billing) = result?;
    println!(
        "bench: expansion database={} events={} accounts={} batch=1000",
        if opts.database == "sqlite" {
            "sqlite"
        } else {
            "postgres"
        },
        opts.events,
        opts.accounts
    );
    println!(
        "bench: expansion with variables from nasd's own accounts table: {} events in {:.2}s = {:.0} events/s",
        opts.events,
        own,
        opts.events as f64 / own
    );
    println!(
        "bench: expansion with variables from MariaDB ([billing], one query per distinct user, {} connections): {} events in {:.2}s = {:.0} events/s",
        4,
        opts.events,
        billing,
        opts.events as f64 / billing
    );
    Ok(())
}

/// Seconds to expand every event: (own table, billing).
async fn measure(
    opts: &BenchOptions,
    billing_server: &str,
    url: &str,
) -> anyhow::Result<(f64, f64)> {
    let store = Store::connect(url, 8).await?;
    store.migrate().await?;
    store
        .nas_upsert(&Nas {
            scheme: Some("bench-null".into()),
            ..Nas::new(1, "bench", "10.255.0.1")
        })
        .await?;
    let rows: Vec<Vec<String>> = (1..=opts.accounts)
        .map(|i| {
            vec![
                i.to_string(),
                (100_000 + i).to_string(),
                "1".into(),
                format!("user{i}"),
                format!("10.{}.{}.{}", i / 65536 % 256, i / 256 % 256, i % 256),
                "10240".into(),
                "5120".into(),
            ]
        })
        .collect();
    let headers = [
        "user_id",
        "abonent_id",
        "nas_id",
        "login",
        "ip",
        "rate_in",
        "rate_out",
    ];
    store
        .accounts_upsert(&scratch::accounts(&headers, rows.clone())?)
        .await?;
    let events: Vec<CompactEvent> = (0..opts.events)
        .map(|i| CompactEvent {
            cmd: "user_rate_set".into(),
            user_id: 1 + i % opts.accounts.max(1),
            ..Default::default()
        })
        .collect();

    // nasd's own table.
    for chunk in events.chunks(5000) {
        store.enqueue_compact(chunk).await?;
    }
    let started = Instant::now();
    loop {
        let report = store
            .expand(crate::config::DEFAULT_PARAMS_QUERY, 1000)
            .await?;
        if report.expanded + report.failed == 0 {
            break;
        }
    }
    let own = started.elapsed().as_secs_f64();

    // The same accounts in a MariaDB database.
    let name = "nasd_bench_billing";
    let mut admin = sqlx::MySqlConnection::connect(billing_server)
        .await
        .context("connecting to the MariaDB/MySQL server for the benchmark")?;
    admin
        .execute(format!("DROP DATABASE IF EXISTS {name}").as_str())
        .await?;
    admin
        .execute(format!("CREATE DATABASE {name}").as_str())
        .await?;
    let billing_url = format!("{}/{name}", billing_server.trim_end_matches('/'));
    let outcome = async {
        let mut conn = sqlx::MySqlConnection::connect(&billing_url).await?;
        conn.execute(
            "CREATE TABLE accounts (user_id BIGINT PRIMARY KEY, abonent_id BIGINT, nas_id INT, \
             login VARCHAR(64), ip VARCHAR(45), rate_in INT, rate_out INT)",
        )
        .await?;
        for chunk in rows.chunks(1000) {
            let values: Vec<String> = chunk
                .iter()
                .map(|r| {
                    format!(
                        "({}, {}, {}, '{}', '{}', {}, {})",
                        r[0], r[1], r[2], r[3], r[4], r[5], r[6]
                    )
                })
                .collect();
            conn.execute(format!("INSERT INTO accounts VALUES {}", values.join(", ")).as_str())
                .await?;
        }
        let cfg = BillingConfig {
            url: billing_url.clone(),
            kind: BillingKind::MySql,
            params_query: PARAMS_MYSQL.into(),
            max_connections: 4,
            connect_timeout: std::time::Duration::from_secs(5),
            events: None,
        };
        let billing = Billing::connect_lazy(&cfg)?;
        billing.check().await?;
        for chunk in events.chunks(5000) {
            store.enqueue_compact(chunk).await?;
        }
        let started = Instant::now();
        while let Some((users, up_to)) = store.compact_users(1000).await? {
            let params = billing.params(&users).await?;
            store.expand_given(&params, up_to, 1000).await?;
        }
        let took = started.elapsed().as_secs_f64();
        billing.close().await;
        anyhow::Ok(took)
    }
    .await;
    let _ = admin
        .execute(format!("DROP DATABASE IF EXISTS {name}").as_str())
        .await;
    let (done, failed) = store.history_counts().await?;
    if failed > 0 || done > 0 {
        anyhow::bail!("expansion failed {failed} event(s)");
    }
    Ok((own, outcome?))
}
