//! Bounded history: with `[history] keep`, the daemon deletes finished events older than
//! that, in small batches, while it goes on delivering; rows inside the window stay,
//! and the daemon log says how many were pruned. On SQLite and a real PostgreSQL.

#[macro_use]
mod common;

use std::time::Duration;

use common::{Backend, TestEnv, add_accounts, event, nas, recorder_script, wait_for, wait_history};
use tokio_util::sync::CancellationToken;

both_backends!(old_history_is_pruned_in_batches_while_delivery_goes_on);

const LIMIT: Duration = Duration::from_secs(60);

/// Runs `sql` on the test database (`$AGE` becomes "100 days ago" in its dialect).
async fn execute(env: &TestEnv, backend: Backend, sql: &str) -> u64 {
    match backend {
        Backend::Postgres => {
            let pool = sqlx::PgPool::connect(&env.url).await.expect("open");
            let sql = sql.replace("$AGE", "now() - interval '100 days'");
            sqlx::query(&sql)
                .execute(&pool)
                .await
                .expect("sql")
                .rows_affected()
        }
        Backend::Sqlite => {
            let pool = sqlx::SqlitePool::connect(&env.url).await.expect("open");
            let sql = sql.replace(
                "$AGE",
                "(CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER) - 8640000000)",
            );
            sqlx::query(&sql)
                .execute(&pool)
                .await
                .expect("sql")
                .rows_affected()
        }
    }
}

async fn count(env: &TestEnv, backend: Backend, sql: &str) -> i64 {
    match backend {
        Backend::Postgres => {
            let pool = sqlx::PgPool::connect(&env.url).await.expect("open");
            sqlx::query_scalar(sql)
                .fetch_one(&pool)
                .await
                .expect("count")
        }
        Backend::Sqlite => {
            let pool = sqlx::SqlitePool::connect(&env.url).await.expect("open");
            sqlx::query_scalar(sql)
                .fetch_one(&pool)
                .await
                .expect("count")
        }
    }
}

async fn old_history_is_pruned_in_batches_while_delivery_goes_on(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let store = env.store().await;
    let record = env.path().join("record.txt");
    let script = env.script("rec.sh", &recorder_script(&record, 0, ""));
    store
        .nas_upsert(&nas(1, Some(&script), None, 4))
        .await
        .expect("nas");
    add_accounts(&store, 20, &[1]).await;
    // 60 finished events, then the 45 lowest ids made 100 days old.
    let mut cfg = env.config();
    cfg.api = Some(nasd::config::ApiConfig {
        listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        ..nasd::config::ApiConfig::default()
    });
    cfg.history.keep = Duration::from_secs(30 * 86_400);
    cfg.history.prune_batch = 7;
    cfg.history.prune_interval = Duration::from_secs(1);
    store
        .enqueue_compact(
            &(1..=60)
                .map(|i| event("user_add", 1 + i % 20))
                .collect::<Vec<_>>(),
        )
        .await
        .expect("enqueue");
    let token = CancellationToken::new();
    let running = nasd::daemon::start(cfg.clone(), token.clone())
        .await
        .expect("start");
    wait_history(&store, 60, LIMIT).await;
    let aged = execute(
        &env,
        backend,
        "UPDATE events_history SET finished_at = $AGE WHERE id IN \
         (SELECT id FROM events_history ORDER BY id LIMIT 45)",
    )
    .await;
    assert_eq!(aged, 45);
    // Delivery goes on while the pruner works.
    store
        .enqueue_compact(
            &(1..=30)
                .map(|i| event("user_drop", 1 + i % 20))
                .collect::<Vec<_>>(),
        )
        .await
        .expect("enqueue");
    wait_for(LIMIT, "the 45 old rows pruned and 45 kept", || async {
        count(&env, backend, "SELECT count(*) FROM events_history").await == 45
            && count(
                &env,
                backend,
                "SELECT count(*) FROM events_history WHERE cmd = 'user_drop'",
            )
            .await
                == 30
    })
    .await;
    let (done, failed) = store.history_counts().await.expect("counts");
    assert_eq!(
        (done, failed),
        (45, 0),
        "15 recent user_add and 30 user_drop stay"
    );
    let journal = env.read("log/nas_event_daemon.log");
    let pruned: u64 = journal
        .lines()
        .filter_map(|l| l.split("History pruned: ").nth(1))
        .filter_map(|rest| rest.split(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(
        pruned, 45,
        "the daemon log counts what was pruned:\n{journal}"
    );
    // `/metrics` shows the history's size.
    let addr = running.api_addr.expect("api address");
    let metrics = nasd::tools::http_client::request(addr, "GET", "/metrics", &[], b"")
        .await
        .expect("metrics")
        .text();
    let value = |name: &str| {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.parse::<i64>().ok())
    };
    match backend {
        // The span of ids left after the oldest 45 went.
        Backend::Sqlite => assert_eq!(value("nasd_history_rows"), Some(45), "{metrics}"),
        // The planner's estimate (or a count before the first ANALYZE) and the size.
        Backend::Postgres => {
            assert!(value("nasd_history_rows").is_some(), "{metrics}");
            assert!(
                value("nasd_history_bytes").is_some_and(|b| b > 0),
                "{metrics}"
            );
        }
    }
    token.cancel();
    tokio::time::timeout(LIMIT, running.wait())
        .await
        .expect("stops in time")
        .expect("daemon");
}
