//! nasd behind PgBouncer (Debian's package, a private one per test on a free port, in
//! front of the machine's PostgreSQL): the daemon delivering through session pooling
//! with LISTEN and with polling only, what transaction pooling does to sqlx's prepared
//! statements with and without `[database] statement_cache`, and the LISTEN check that
//! keeps a transaction pooler's server connections free of stray notifications.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use common::pgbouncer::{PgBouncer, PoolMode};
use common::{Backend, TestEnv, add_accounts, nas, recorder_script, wait_for, wait_history};
use nasd::store::{ConnectOptions, Store};
use sqlx::{Connection, Executor};
use tokio_util::sync::CancellationToken;

/// The scratch database's name (the last part of its URL).
fn db_name(env: &TestEnv) -> String {
    env.url.rsplit('/').next().unwrap_or_default().to_string()
}

/// A connection straight to the scratch database, as billing has one to the primary.
async fn direct(env: &TestEnv) -> sqlx::PgConnection {
    sqlx::PgConnection::connect(&env.url)
        .await
        .expect("connect to the scratch database directly")
}

/// The events billing enqueues, in order: five accounts, each getting add, rate, drop,
/// add, rate, interleaved with the others.
fn billing_events() -> Vec<(i64, &'static str)> {
    let cmds = [
        "user_add",
        "user_rate_set",
        "user_drop",
        "user_add",
        "user_rate_set",
    ];
    cmds.iter()
        .flat_map(|cmd| (1..=5).map(move |user| (user, *cmd)))
        .collect()
}

/// Inserts `events` into `events_stack_compact` the way billing does (plain INSERTs,
/// a few rows per statement), on a direct connection.
async fn billing_insert(conn: &mut sqlx::PgConnection, events: &[(i64, &str)]) {
    for chunk in events.chunks(10) {
        let values: Vec<String> = chunk
            .iter()
            .map(|(user, cmd)| format!("('{cmd}', {user})"))
            .collect();
        conn.execute(
            format!(
                "INSERT INTO events_stack_compact (cmd, user_id) VALUES {}",
                values.join(", ")
            )
            .as_str(),
        )
        .await
        .expect("billing's INSERT into events_stack_compact");
    }
}

/// Backends of `db` whose last statement was a LISTEN that has finished (`idle`).
async fn listening_backends(conn: &mut sqlx::PgConnection, db: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 \
         AND query ILIKE 'LISTEN%nasd_compact%' AND state = 'idle'",
    )
    .bind(db)
    .fetch_one(conn)
    .await
    .expect("read pg_stat_activity")
}

/// What the device (the recording script) received and what history says: every
/// event exactly once, `done` at the first attempt, and per account in enqueue order.
async fn assert_delivered_once_in_order(env: &TestEnv, store: &Store, events: &[(i64, &str)]) {
    let record = env.read("attempts.log");
    let mut per_account: BTreeMap<i64, Vec<(i64, String)>> = BTreeMap::new();
    let mut seen = HashSet::new();
    for line in record.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        assert_eq!(f.len(), 5, "recorder line {line:?}");
        assert_eq!(f[4], "ok", "{line:?}");
        let user: i64 = f[0].parse().expect("user_id");
        let event_id: i64 = f[1].parse().expect("event_id");
        assert!(
            seen.insert(event_id),
            "event {event_id} reached the device twice:\n{record}"
        );
        per_account
            .entry(user)
            .or_default()
            .push((event_id, f[2].to_string()));
    }
    assert_eq!(seen.len(), events.len(), "commands received:\n{record}");
    for (user, got) in &per_account {
        let want: Vec<&str> = events
            .iter()
            .filter(|(u, _)| u == user)
            .map(|(_, cmd)| *cmd)
            .collect();
        let cmds: Vec<&str> = got.iter().map(|(_, cmd)| cmd.as_str()).collect();
        assert_eq!(cmds, want, "account {user}: commands in enqueue order");
        assert!(
            got.windows(2).all(|w| w[0].0 < w[1].0),
            "account {user}: event ids in order: {got:?}"
        );
    }
    let history = store.history(None, 1000).await.expect("history");
    assert_eq!(history.len(), events.len());
    assert!(
        history
            .iter()
            .all(|h| h.outcome == "done" && h.attempts == 1),
        "every event done at its first attempt: {history:?}"
    );
    let count = store.stack_count().await.expect("stack count");
    assert_eq!((count.compact_total, count.stack_total), (0, 0));
}

/// Session pooling gives each client connection a server session of its own, so
/// everything works as on a direct connection, LISTEN included: with a poll interval
/// of a minute, events arrive within seconds only because the NOTIFY of billing's
/// INSERT woke the expander.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_delivers_through_session_pooling_woken_by_listen() {
    let env = TestEnv::new(Backend::Postgres).await;
    let store = env.store().await;
    let log = env.path().join("attempts.log");
    let script = env.script("device.sh", &recorder_script(&log, 0, ""));
    store
        .nas_upsert(&nas(1, Some(&script), None, 4))
        .await
        .expect("nas");
    add_accounts(&store, 5, &[1]).await;
    let bouncer = PgBouncer::start(&db_name(&env), PoolMode::Session, 20).await;
    let mut cfg = env.config();
    cfg.database.url = bouncer.url();
    cfg.daemon.poll_interval = Duration::from_secs(60);
    assert!(cfg.database.statement_cache && cfg.database.listen);
    let token = CancellationToken::new();
    let daemon = tokio::spawn(nasd::daemon::run(cfg, token.clone()));

    let mut billing = direct(&env).await;
    let db = db_name(&env);
    wait_for(Duration::from_secs(20), "the expander's LISTEN", || {
        let url = env.url.clone();
        let db = db.clone();
        async move {
            match sqlx::PgConnection::connect(&url).await {
                Ok(mut conn) => listening_backends(&mut conn, &db).await == 1,
                Err(_) => false,
            }
        }
    })
    .await;
    let events = billing_events();
    billing_insert(&mut billing, &events).await;
    // Well under the minute-long poll: only the notification can have woken it.
    wait_history(&store, events.len() as i64, Duration::from_secs(20)).await;
    token.cancel();
    daemon.await.expect("daemon task").expect("daemon run");

    assert_delivered_once_in_order(&env, &store, &events).await;
    let daemon_log = env.read("log/nas_event_daemon.log");
    assert!(!daemon_log.contains("LISTEN is off"), "{daemon_log}");
}

/// Both keys off, as a transaction pooler needs them: no LISTEN connection is ever
/// opened (no backend ran LISTEN), and the poll alone carries the wake-ups.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_with_listen_and_statement_cache_off_delivers_by_polling() {
    let env = TestEnv::new(Backend::Postgres).await;
    let store = env.store().await;
    let log = env.path().join("attempts.log");
    let script = env.script("device.sh", &recorder_script(&log, 0, ""));
    store
        .nas_upsert(&nas(1, Some(&script), None, 4))
        .await
        .expect("nas");
    add_accounts(&store, 5, &[1]).await;
    let bouncer = PgBouncer::start(&db_name(&env), PoolMode::Session, 20).await;
    let mut cfg = nasd::config::Config::from_toml(&format!(
        "[database]\nurl = \"{}\"\nstatement_cache = false\nlisten = false\n",
        bouncer.url()
    ))
    .expect("config with both keys");
    let test_cfg = env.config();
    cfg.daemon = test_cfg.daemon;
    let token = CancellationToken::new();
    let daemon = tokio::spawn(nasd::daemon::run(cfg, token.clone()));

    let mut billing = direct(&env).await;
    let events = billing_events();
    billing_insert(&mut billing, &events).await;
    wait_history(&store, events.len() as i64, Duration::from_secs(30)).await;
    assert_eq!(
        listening_backends(&mut billing, &db_name(&env)).await,
        0,
        "no LISTEN with listen = false"
    );
    token.cancel();
    daemon.await.expect("daemon task").expect("daemon run");
    assert_delivered_once_in_order(&env, &store, &events).await;
    let daemon_log = env.read("log/nas_event_daemon.log");
    assert!(!daemon_log.contains("LISTEN is off"), "{daemon_log}");
}

/// Through transaction pooling sqlx's statements fail, whatever `statement_cache`
/// says: sqlx 0.8 names every statement it prepares (`sqlx_s_1`, `sqlx_s_2`, ...
/// counted per client connection) even with a cache of capacity 0, and prepares and
/// runs it in two round trips, between which PgBouncer may hand the server connection
/// to another client. With one server connection the collision is certain: the second
/// client's first statement finds the first client's `sqlx_s_1` already there.
/// (PgBouncer 1.21 and later can track prepared statements, `max_prepared_statements`;
/// the helper turns that off to show the bare behaviour.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_pooling_breaks_prepared_statements_with_or_without_the_cache() {
    let env = TestEnv::new(Backend::Postgres).await;
    let _migrated = env.store().await;
    for statement_cache in [true, false] {
        // A fresh PgBouncer each time: its server connection keeps what clients
        // prepared on it.
        let bouncer = PgBouncer::start(&db_name(&env), PoolMode::Transaction, 1).await;
        let options = ConnectOptions {
            max_connections: 2,
            statement_cache,
        };
        let first = Store::connect_with(&bouncer.url(), &options)
            .await
            .expect("connect through pgbouncer");
        let second = Store::connect_with(&bouncer.url(), &options)
            .await
            .expect("connect through pgbouncer");
        first
            .history_counts()
            .await
            .expect("the first client's statement");
        let err = second
            .history_counts()
            .await
            .expect_err("the second client's statement meets the first one's sqlx_s_1")
            .to_string();
        assert!(
            err.contains("prepared statement \"sqlx_s_1\" already exists"),
            "statement_cache = {statement_cache}: {err}"
        );
    }
}

/// With the cache off, sqlx 0.8 leaves one named prepared statement on the server per
/// execution, for as long as the connection lives; with it on, one per distinct
/// statement. (What a later sqlx changes here shows up in this test first.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statement_cache_off_leaves_a_prepared_statement_per_execution() {
    let env = TestEnv::new(Backend::Postgres).await;
    let _migrated = env.store().await;
    let mut counts = Vec::new();
    for statement_cache in [true, false] {
        // One connection, so every statement below runs in the session counted.
        let options = ConnectOptions {
            max_connections: 1,
            statement_cache,
        };
        let store = Store::connect_with(&env.url, &options)
            .await
            .expect("connect");
        for _ in 0..20 {
            store.history_counts().await.expect("history counts");
        }
        let Store::Postgres(pg) = &store else {
            panic!("a postgres:// url gives the PostgreSQL store");
        };
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_prepared_statements")
            .fetch_one(pg.pool())
            .await
            .expect("count prepared statements");
        counts.push((statement_cache, n));
    }
    assert!(counts[0].1 <= 5, "cache on: {counts:?}");
    assert!(counts[1].1 >= 20, "cache off: {counts:?}");
}

/// LISTEN through transaction pooling: PgBouncer runs it on whichever server
/// connection is free and keeps that connection in its pool, still listening. The
/// listener never receives anything, and a later notification arrives in the middle
/// of another client's statement on that server connection, which sqlx fails with
/// "unexpected message: NotificationResponse". nasd's check sees that the connection
/// is not a session of its own before it LISTENs; through session pooling it LISTENs
/// and receives billing's notifications.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_is_checked_before_it_can_reach_a_transaction_pool() {
    let env = TestEnv::new(Backend::Postgres).await;
    let _migrated = env.store().await;
    let db = db_name(&env);
    let mut billing = direct(&env).await;

    // One server connection behind the pooler, so every client below shares it.
    let bouncer = PgBouncer::start(&db, PoolMode::Transaction, 1).await;
    let connect = || async {
        match Store::connect_with(&bouncer.url(), &ConnectOptions::new(2)).await {
            Ok(Store::Postgres(pg)) => pg,
            Ok(_) => panic!("a postgres:// url gives the PostgreSQL store"),
            Err(e) => panic!("connect through pgbouncer: {e}"),
        }
    };
    let expander = connect().await;
    let refused = expander
        .listen_compact()
        .await
        .expect("the session check answers through a transaction pool");
    assert!(refused.is_none(), "transaction pooling must be recognised");
    // Another client (its connections never had a listener, which would swallow
    // notifications) runs simple queries, which need no prepared statement, on the
    // one server connection after billing's NOTIFY: nothing is waiting there.
    let other = connect().await;
    billing_insert(&mut billing, &[(1, "user_add")]).await;
    for _ in 0..20 {
        other
            .pool()
            .execute("SELECT 1")
            .await
            .expect("a statement after billing's NOTIFY");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // What the check prevents: sqlx's own listener LISTENs without an error...
    let unchecked = connect().await;
    let mut raw = sqlx::postgres::PgListener::connect_with(unchecked.pool())
        .await
        .expect("listener connection");
    raw.listen("nasd_compact")
        .await
        .expect("LISTEN itself succeeds through a transaction pool");
    billing_insert(&mut billing, &[(2, "user_add")]).await;
    // ... receives nothing ...
    let got = tokio::time::timeout(Duration::from_secs(2), raw.recv()).await;
    assert!(got.is_err(), "the listener received {got:?}");
    // ... and the other client's statement on that server connection meets the
    // notification instead.
    let mut stray = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while stray.is_none() && tokio::time::Instant::now() < deadline {
        billing_insert(&mut billing, &[(3, "user_add")]).await;
        if let Err(e) = other.pool().execute("SELECT 1").await {
            stray = Some(e.to_string());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stray = stray.expect("a statement meets the stray notification");
    assert!(stray.contains("NotificationResponse"), "{stray}");
    drop(raw);
    drop(bouncer);

    let session = PgBouncer::start(&db, PoolMode::Session, 4).await;
    let store = Store::connect_with(&session.url(), &ConnectOptions::new(2))
        .await
        .expect("connect through pgbouncer");
    let Store::Postgres(pg) = &store else {
        panic!("a postgres:// url gives the PostgreSQL store");
    };
    let mut listener = pg
        .listen_compact()
        .await
        .expect("listen through session pooling")
        .expect("session pooling is a session of its own");
    billing_insert(&mut billing, &[(4, "user_add")]).await;
    let note = tokio::time::timeout(Duration::from_secs(5), listener.recv())
        .await
        .expect("billing's notification within 5s")
        .expect("a notification");
    assert_eq!(note.channel(), "nasd_compact");
}
