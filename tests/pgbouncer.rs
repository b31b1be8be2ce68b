//! nasd behind PgBouncer (Debian's package, a private one per test on a free port, in
//! front of the machine's PostgreSQL): the daemon delivering through session pooling
//! with LISTEN and with polling only; through transaction pooling in pooled mode
//! (`[database] statement_cache = false`: each call its own transaction, unnamed
//! statements, no LISTEN), alone and as two daemons of a cluster; why the key exists
//! (with sqlx's named statements a transaction pooler fails the daemon at start); the
//! pooled mode leaving no named statement on the server; and the LISTEN check that keeps
//! a transaction pooler's server connections free of stray notifications.
//!
//! `pooled_mode_costs` (ignored; run it with `--ignored --nocapture`) prints what the
//! pooled mode costs per call and per event; nothing asserts those figures.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use common::pgbouncer::{PgBouncer, PoolMode};
use common::{Backend, TestEnv, add_accounts, nas, recorder_script, wait_for, wait_history};
use nasd::config::Config;
use nasd::store::{CompactEvent, ConnectOptions, Store};
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
    billing_rounds(5, 1)
}

/// `rounds` times add, rate, drop, add, rate for each of accounts 1..=`accounts`, the
/// accounts interleaved.
fn billing_rounds(accounts: i64, rounds: usize) -> Vec<(i64, &'static str)> {
    let cmds = [
        "user_add",
        "user_rate_set",
        "user_drop",
        "user_add",
        "user_rate_set",
    ];
    (0..rounds)
        .flat_map(|_| cmds.iter())
        .flat_map(|cmd| (1..=accounts).map(move |user| (user, *cmd)))
        .collect()
}

/// The test config of `env` pointed at `bouncer` in pooled mode: `statement_cache =
/// false`, with `listen` as given.
fn pooled_config(env: &TestEnv, bouncer: &PgBouncer, listen: bool) -> Config {
    let mut cfg = env.config();
    cfg.database.url = bouncer.url();
    cfg.database.statement_cache = false;
    cfg.database.listen = listen;
    cfg.validate().expect("pooled config");
    cfg
}

/// A store on a direct connection to the scratch database, without migrating (the
/// daemon under test migrates through the pooler).
async fn direct_store(env: &TestEnv) -> Store {
    Store::connect(&env.url, 4)
        .await
        .expect("connect to the scratch database directly")
}

/// How often `needle` occurs in the daemon log.
fn daemon_log_count(env: &TestEnv, needle: &str) -> usize {
    env.read("log/nas_event_daemon.log").matches(needle).count()
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

/// Pooled mode through transaction pooling: three server connections for the daemon's
/// eight client connections, so PgBouncer hands each server to whichever client begins
/// a transaction next. The daemon migrates the empty database through the pooler,
/// expands, claims, sends and completes; every event reaches the device once, in
/// per-account order, and ends `done` at its first attempt, which a statement that met
/// another client's server would have broken (a failed completion resends). No LISTEN
/// ever reaches the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_delivers_through_transaction_pooling_with_the_statement_cache_off() {
    let env = TestEnv::new(Backend::Postgres).await;
    let db = db_name(&env);
    let bouncer = PgBouncer::start(&db, PoolMode::Transaction, 3).await;
    let token = CancellationToken::new();
    let daemon = nasd::daemon::start(pooled_config(&env, &bouncer, false), token.clone())
        .await
        .expect("the daemon migrates and starts through transaction pooling");

    // Billing's side, straight to the server as billing has it.
    let store = direct_store(&env).await;
    let log = env.path().join("attempts.log");
    let script = env.script("device.sh", &recorder_script(&log, 0, ""));
    for id in [1, 2] {
        store
            .nas_upsert(&nas(id, Some(&script), None, 4))
            .await
            .expect("nas");
    }
    add_accounts(&store, 20, &[1, 2]).await;
    let events = billing_rounds(20, 2);
    let mut billing = direct(&env).await;
    billing_insert(&mut billing, &events).await;
    wait_history(&store, events.len() as i64, Duration::from_secs(60)).await;
    assert_eq!(
        listening_backends(&mut billing, &db).await,
        0,
        "no LISTEN in pooled mode"
    );
    token.cancel();
    daemon.wait().await.expect("the daemon stops");

    assert_delivered_once_in_order(&env, &store, &events).await;
    assert_eq!(daemon_log_count(&env, "LISTEN is off"), 0);
}

/// Two daemons of a cluster, both through one transaction-mode PgBouncer with four
/// server connections in pooled mode, started at the same moment on an empty database:
/// their migrations take turns (a transaction-level lock), they join, the NAS are
/// spread over both, and every event is sent once, by the owner of its NAS, in
/// per-account order. `d1` keeps `listen = true`: in pooled mode it skips LISTEN and
/// the daemon log says so once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_through_transaction_pooling_send_each_event_once_by_its_owner() {
    const N_NAS: i64 = 6;
    const ACCOUNTS: i64 = 60;
    let env = TestEnv::new(Backend::Postgres).await;
    let db = db_name(&env);
    let bouncer = PgBouncer::start(&db, PoolMode::Transaction, 4).await;
    let config = |name: &str, listen: bool| {
        let mut cfg = pooled_config(&env, &bouncer, listen);
        cfg.cluster.name = Some(name.to_string());
        cfg.cluster.lease = Duration::from_secs(3);
        cfg.cluster.heartbeat = Duration::from_millis(200);
        cfg.validate().expect("cluster config");
        cfg
    };
    let stop1 = CancellationToken::new();
    let stop2 = CancellationToken::new();
    let (d1, d2) = tokio::join!(
        nasd::daemon::start(config("d1", true), stop1.clone()),
        nasd::daemon::start(config("d2", false), stop2.clone()),
    );
    let d1 = d1.expect("d1 migrates and starts through transaction pooling");
    let d2 = d2.expect("d2 migrates and starts through transaction pooling");

    let store = direct_store(&env).await;
    let log = env.path().join("received.log");
    // One line per command: `nas daemon event user cmd`.
    let script = env.script(
        "device.sh",
        &format!(
            "#!/bin/sh\necho \"$nas_id $daemon $event_id $user_id $1\" >> {}\necho ok\n",
            log.display()
        ),
    );
    for id in 1..=N_NAS {
        store
            .nas_upsert(&nas(id, Some(&script), None, 4))
            .await
            .expect("nas");
    }
    let ids: Vec<i64> = (1..=N_NAS).collect();
    add_accounts(&store, ACCOUNTS, &ids).await;
    let live = vec!["d1".to_string(), "d2".to_string()];
    let want: HashMap<i64, String> = (1..=N_NAS)
        .map(|n| {
            let owner = nasd::cluster::plan::owner_of(n, &live).expect("an owner");
            (n, owner.to_string())
        })
        .collect();
    assert!(
        want.values().any(|d| d == "d1") && want.values().any(|d| d == "d2"),
        "the test needs NAS on both daemons: {want:?}"
    );
    wait_for(
        Duration::from_secs(30),
        "the NAS spread over d1 and d2",
        || {
            let store = store.clone();
            let want = want.clone();
            async move {
                let owners: HashMap<i64, String> = store
                    .nas_owners()
                    .await
                    .expect("owners")
                    .into_iter()
                    .filter(|o| o.valid)
                    .filter_map(|o| Some((o.nas_id, o.daemon_id?)))
                    .collect();
                owners == want
            }
        },
    )
    .await;

    let events = billing_rounds(ACCOUNTS, 1);
    let mut billing = direct(&env).await;
    billing_insert(&mut billing, &events).await;
    wait_history(&store, events.len() as i64, Duration::from_secs(60)).await;
    stop1.cancel();
    stop2.cancel();
    d1.wait().await.expect("d1 stops");
    d2.wait().await.expect("d2 stops");

    let record = std::fs::read_to_string(&log).expect("the device's record");
    let mut seen = HashSet::new();
    let mut per_account: BTreeMap<i64, Vec<(i64, String)>> = BTreeMap::new();
    for line in record.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        assert_eq!(f.len(), 5, "recorder line {line:?}");
        let nas_id: i64 = f[0].parse().expect("nas_id");
        let event_id: i64 = f[2].parse().expect("event_id");
        let user: i64 = f[3].parse().expect("user_id");
        assert_eq!(
            f[1], want[&nas_id],
            "nas {nas_id} sent by its owner: {line}"
        );
        assert!(seen.insert(event_id), "event {event_id} sent twice");
        per_account
            .entry(user)
            .or_default()
            .push((event_id, f[4].to_string()));
    }
    assert_eq!(seen.len(), events.len(), "each event sent once");
    for (user, got) in &per_account {
        let want_cmds: Vec<&str> = events
            .iter()
            .filter(|(u, _)| u == user)
            .map(|(_, cmd)| *cmd)
            .collect();
        let cmds: Vec<&str> = got.iter().map(|(_, cmd)| cmd.as_str()).collect();
        assert_eq!(cmds, want_cmds, "account {user}: commands in enqueue order");
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
        "every event done at its first attempt"
    );
    let count = store.stack_count().await.expect("stack count");
    assert_eq!((count.compact_total, count.stack_total), (0, 0));
    let members = store.cluster_members().await.expect("members");
    let states: Vec<(&str, &str)> = members
        .iter()
        .map(|m| (m.id.as_str(), m.state.as_str()))
        .collect();
    assert_eq!(states, vec![("d1", "left"), ("d2", "left")]);
    assert_eq!(
        daemon_log_count(&env, "LISTEN is off"),
        1,
        "d1 says once that it does not LISTEN:\n{}",
        env.read("log/nas_event_daemon.log")
    );
}

/// Why `statement_cache` exists. sqlx names every statement it keeps (`sqlx_s_1`,
/// `sqlx_s_2`, ... counted per client connection) and prepares it in one round trip
/// and runs it in another; a transaction pooler gives the server connection to another
/// client in between and keeps the names on it. With one server connection the failure
/// is certain: another sqlx client left its `sqlx_s_1` there, and a daemon with the
/// cache on fails at start (its migrator's first statement is `sqlx_s_1` too). With the
/// cache off the same daemon starts on the same pooler and delivers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_pooling_fails_a_daemon_with_the_statement_cache_on() {
    let env = TestEnv::new(Backend::Postgres).await;
    let store = env.store().await;
    let log = env.path().join("attempts.log");
    let script = env.script("device.sh", &recorder_script(&log, 0, ""));
    store
        .nas_upsert(&nas(1, Some(&script), None, 2))
        .await
        .expect("nas");
    add_accounts(&store, 5, &[1]).await;
    let bouncer = PgBouncer::start(&db_name(&env), PoolMode::Transaction, 1).await;
    let other = Store::connect_with(&bouncer.url(), &ConnectOptions::new(1))
        .await
        .expect("another client through pgbouncer");
    other
        .history_counts()
        .await
        .expect("the other client's statement, sqlx_s_1");

    let mut cached = env.config();
    cached.database.url = bouncer.url();
    assert!(cached.database.statement_cache, "the default");
    let refused = nasd::daemon::start(cached, CancellationToken::new()).await;
    let err = format!("{:#}", refused.err().expect("the start fails"));
    assert!(
        err.contains("prepared statement \"sqlx_s_1\" already exists"),
        "{err}"
    );

    let token = CancellationToken::new();
    let daemon = nasd::daemon::start(pooled_config(&env, &bouncer, false), token.clone())
        .await
        .expect("with the cache off the daemon starts");
    let events = billing_events();
    let mut billing = direct(&env).await;
    billing_insert(&mut billing, &events).await;
    wait_history(&store, events.len() as i64, Duration::from_secs(30)).await;
    token.cancel();
    daemon.wait().await.expect("the daemon stops");
    assert_delivered_once_in_order(&env, &store, &events).await;
}

/// Two pooled clients take turns on one server connection, each call of one
/// alternating with a call of the other, without a statement of one meeting the
/// other's; writes included (the claim's `synchronous_commit = off` is set for its own
/// transaction only).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_clients_share_one_server_connection() {
    let env = TestEnv::new(Backend::Postgres).await;
    let direct = env.store().await;
    direct
        .nas_upsert(&nas(1, None, Some("demo-exec"), 4))
        .await
        .expect("nas");
    add_accounts(&direct, 3, &[1]).await;
    let bouncer = PgBouncer::start(&db_name(&env), PoolMode::Transaction, 1).await;
    let options = ConnectOptions {
        max_connections: 2,
        statement_cache: false,
    };
    let first = Store::connect_with(&bouncer.url(), &options)
        .await
        .expect("connect through pgbouncer");
    let second = Store::connect_with(&bouncer.url(), &options)
        .await
        .expect("connect through pgbouncer");
    let enqueue = |user: i64| CompactEvent {
        cmd: "user_add".into(),
        user_id: user,
        ..Default::default()
    };
    let mut enqueued = 0;
    for round in 0..25 {
        for (client, user) in [(&first, 1), (&second, 2)] {
            client
                .enqueue_compact(&[enqueue(user)])
                .await
                .unwrap_or_else(|e| panic!("round {round}: enqueue: {e}"));
            enqueued += 1;
            client
                .history_counts()
                .await
                .unwrap_or_else(|e| panic!("round {round}: history counts: {e}"));
            client
                .stack_count()
                .await
                .unwrap_or_else(|e| panic!("round {round}: stack count: {e}"));
        }
    }
    let report = first
        .expand(nasd::config::DEFAULT_PARAMS_QUERY, 1000)
        .await
        .expect("expand through pgbouncer");
    assert_eq!(report.expanded, enqueued);
    let rows = second
        .load_windows(&[(1, 0, 1000)])
        .await
        .expect("load through pgbouncer");
    let now = chrono::Utc::now();
    let claims: Vec<(i64, i64, i64)> = rows.iter().map(|r| (r.id, 7, 0)).collect();
    let claimed = first
        .claim(&claims, now, now + chrono::Duration::seconds(30))
        .await
        .expect("claim through pgbouncer");
    assert_eq!(claimed.len(), enqueued);
    // The setting ended with the claim's transaction.
    let Store::Postgres(pg) = &second else {
        panic!("a postgres:// url gives the PostgreSQL store");
    };
    let setting = pg
        .pool()
        .fetch_one("SHOW synchronous_commit")
        .await
        .expect("show synchronous_commit");
    assert_eq!(
        sqlx::Row::try_get::<String, _>(&setting, 0).expect("setting"),
        "on"
    );
}

/// The pooled mode leaves no named statement on the server: nasd's statements are
/// unnamed, and the migrator's names are deallocated before its transaction commits
/// (or by the next migration on that server connection, if it failed). With the cache
/// on, sqlx keeps one per distinct statement, as it should on a session of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_mode_leaves_no_named_statement_on_the_server() {
    let env = TestEnv::new(Backend::Postgres).await;
    let mut counts = Vec::new();
    for statement_cache in [false, true] {
        // One connection, so every statement below runs in the session counted; the
        // first round migrates the empty database in pooled mode.
        let options = ConnectOptions {
            max_connections: 1,
            statement_cache,
        };
        let store = Store::connect_with(&env.url, &options)
            .await
            .expect("connect");
        store.migrate().await.expect("migrate");
        for _ in 0..20 {
            store.history_counts().await.expect("history counts");
            store.stack_count().await.expect("stack count");
        }
        let Store::Postgres(pg) = &store else {
            panic!("a postgres:// url gives the PostgreSQL store");
        };
        let n: i64 = pg
            .pool()
            .fetch_one("SELECT count(*) FROM pg_prepared_statements")
            .await
            .and_then(|row| sqlx::Row::try_get(&row, 0))
            .expect("count prepared statements");
        counts.push((statement_cache, n));
    }
    assert_eq!(counts[0], (false, 0), "pooled: {counts:?}");
    assert!(
        (1..=20).contains(&counts[1].1),
        "cache on, one per distinct statement: {counts:?}"
    );

    // Through PgBouncer with one server connection: a second pooled client migrates
    // (checks) after the first on the same server, and nothing named is left there.
    let bouncer = PgBouncer::start(&db_name(&env), PoolMode::Transaction, 1).await;
    let options = ConnectOptions {
        max_connections: 2,
        statement_cache: false,
    };
    for _ in 0..2 {
        let store = Store::connect_with(&bouncer.url(), &options)
            .await
            .expect("connect through pgbouncer");
        store.migrate().await.expect("migrate through pgbouncer");
    }
    let mut raw = sqlx::PgConnection::connect(&bouncer.url())
        .await
        .expect("a raw client through pgbouncer");
    let left: i64 = raw
        .fetch_one("SELECT count(*) FROM pg_prepared_statements")
        .await
        .and_then(|row| sqlx::Row::try_get(&row, 0))
        .expect("count prepared statements on the one server connection");
    assert_eq!(left, 0, "named statements left on the server");
}

/// The ways to the server `pooled_mode_costs` compares.
#[derive(Clone, Copy)]
enum Route {
    Direct,
    Session,
    Transaction,
}

/// The URL of `env`'s database along `route`, with the PgBouncer that serves it.
async fn route_url(env: &TestEnv, route: Route) -> (String, Option<PgBouncer>) {
    let bouncer = match route {
        Route::Direct => return (env.url.clone(), None),
        Route::Session => PgBouncer::start(&db_name(env), PoolMode::Session, 20).await,
        Route::Transaction => PgBouncer::start(&db_name(env), PoolMode::Transaction, 4).await,
    };
    (bouncer.url(), Some(bouncer))
}

/// Prints what the pooled mode costs; asserts nothing about the figures (they depend on
/// the machine). Per call: the mean time of a one-statement read (`history_counts`)
/// and of a one-row enqueue, one after the other on one client. Per event: the
/// daemon's throughput and database calls from enqueue to history with a null scheme
/// (no device), 2 NAS, 20000 events of 2000 accounts (as `nasd bench` does).
/// `cargo test --release --test pgbouncer pooled_mode_costs -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: prints figures, run it on its own"]
async fn pooled_mode_costs() {
    let setups = [
        ("direct, cache on (default)", Route::Direct, true),
        ("direct, pooled mode", Route::Direct, false),
        ("pgbouncer session, cache on", Route::Session, true),
        (
            "pgbouncer transaction, pooled mode",
            Route::Transaction,
            false,
        ),
    ];
    const CALLS: u32 = 2000;
    println!("\nper call, one client, {CALLS} calls each (mean):");
    for (name, route, statement_cache) in setups {
        let env = TestEnv::new(Backend::Postgres).await;
        let _migrated = env.store().await;
        let (url, _bouncer) = route_url(&env, route).await;
        let options = ConnectOptions {
            max_connections: 1,
            statement_cache,
        };
        let store = Store::connect_with(&url, &options).await.expect("connect");
        // Warm up: connect, and with the cache on prepare the statements once.
        store.history_counts().await.expect("warm up");
        let started = tokio::time::Instant::now();
        for _ in 0..CALLS {
            store.history_counts().await.expect("history counts");
        }
        let read = started.elapsed() / CALLS;
        let started = tokio::time::Instant::now();
        for _ in 0..CALLS {
            store
                .enqueue_compact(&[CompactEvent {
                    cmd: "user_add".into(),
                    user_id: 1,
                    ..Default::default()
                }])
                .await
                .expect("enqueue");
        }
        let write = started.elapsed() / CALLS;
        println!("  {name:<36} read {read:>9.1?}   enqueue {write:>9.1?}");
    }

    const EVENTS: i64 = 20_000;
    println!("\nthe daemon, {EVENTS} events over 2 NAS (null scheme, 64 workers each):");
    for (name, route, statement_cache) in setups {
        let env = TestEnv::new(Backend::Postgres).await;
        let store = env.store().await;
        env.scheme(
            "null",
            "description = \"sends nowhere\"\ntransport = \"null\"\ndialect = \"routeros\"\n\
             [commands]\nuser_add = [\"/a {{ ip }}\"]\nuser_rate_set = [\"/b {{ ip }}\"]\n\
             user_drop = [\"/c {{ ip }}\"]\n",
        );
        for id in [1, 2] {
            store
                .nas_upsert(&nas(id, None, Some("null"), 64))
                .await
                .expect("nas");
        }
        add_accounts(&store, 2000, &[1, 2]).await;
        let (url, _bouncer) = route_url(&env, route).await;
        let mut cfg = env.config();
        cfg.database.url = url;
        cfg.database.statement_cache = statement_cache;
        cfg.database.listen = statement_cache;
        let token = CancellationToken::new();
        let daemon = nasd::daemon::start(cfg, token.clone())
            .await
            .expect("daemon starts");
        let calls_before = daemon.store.calls();
        let events: Vec<CompactEvent> = (0..EVENTS)
            .map(|i| CompactEvent {
                cmd: ["user_add", "user_rate_set", "user_drop"][(i % 3) as usize].into(),
                user_id: i % 2000 + 1,
                ..Default::default()
            })
            .collect();
        let started = tokio::time::Instant::now();
        for chunk in events.chunks(1000) {
            store.enqueue_compact(chunk).await.expect("enqueue");
        }
        wait_history(&store, EVENTS, Duration::from_secs(300)).await;
        let took = started.elapsed();
        let calls = daemon.store.calls() - calls_before;
        token.cancel();
        daemon.wait().await.expect("daemon stops");
        println!(
            "  {name:<36} {:>7.0} events/s   {:>7.1?} in all   {calls} database calls",
            EVENTS as f64 / took.as_secs_f64(),
            took
        );
    }
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
    // notification instead. Only a NOTIFY that reaches the server connection while it
    // serves a statement of `other` shows it (a race: the connection is idle between
    // statements), so each NOTIFY is followed by statements back to back, and the
    // wait is long enough for a loaded machine (it ends at the first stray).
    let mut stray = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while stray.is_none() && tokio::time::Instant::now() < deadline {
        billing_insert(&mut billing, &[(3, "user_add")]).await;
        for _ in 0..5 {
            if let Err(e) = other.pool().execute("SELECT 1").await {
                stray = Some(e.to_string());
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
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
