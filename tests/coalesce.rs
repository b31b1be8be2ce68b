//! Coalescing of superseded events (issue 17), in-process on SQLite and a real
//! PostgreSQL, against two simulated RouterOS routers over SSH with the shipped
//! `mikrotik-ssh` scheme (its `[coalesce]` groups: allowed, negbal, speed).
//!
//! `the_nas_ends_in_the_same_state` queues thousands of random events (the rate of an
//! account changing between them, so that every `user_rate_set` carries the rate of its
//! moment) in two databases, then runs one daemon with coalescing switched off through
//! the live reload (the path SIGHUP takes) and one with it on, each to its own router.
//! Both routers end with the same address lists and queues, which are also what the
//! last event of each group and account says; the second got fewer commands. Every
//! event is in history exactly once (done, or superseded with no attempt), each
//! superseded row names a later, sent event of the same account and group with nothing
//! of its account in between but a `user_info`, and each account's commands reached the
//! router in the id order of their events. The NAS and account logs say it once per
//! superseded event, and the figures count them.
//!
//! `a_run_stops_at_an_event_held_elsewhere`: the middle event of a queued run is taken
//! by another owner's lease after the lanes were loaded; the run's claim misses it, so
//! nothing is superseded: the run is given back, planned again, and its events are sent
//! one by one in order once the lease ends.
//!
//! `migration_keeps_history`: a database at migration 0005 with history rows (the
//! newest one pruned) migrated to 0006: the rows, their ids, the indexes and the id
//! sequence are kept, and `superseded` is the one new outcome allowed.
//!
//! `COALESCE_SEED=<n>` repeats a run's random choices.

#[macro_use]
mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{Backend, TestEnv, add_accounts, event, wait_for};
use nasd::config::Config;
use nasd::scheme::Scheme;
use nasd::sim::{Sim, SimOptions};
use nasd::store::{AccountRecord, CompactEvent, HistoryRow, Nas, Secret, Store};
use rand::Rng;
use tokio_util::sync::CancellationToken;

both_backends!(
    the_nas_ends_in_the_same_state,
    a_run_stops_at_an_event_held_elsewhere,
    migration_keeps_history
);

const ACCOUNTS: i64 = 60;
const EVENTS: usize = 3000;
/// Events enqueued between two changes of the accounts' rates.
const BATCH: usize = 100;
const SCHEME: &str = "mikrotik-ssh";
const CMDS: [&str; 9] = [
    "user_accept",
    "user_drop",
    "user_redirect",
    "user_redirect_cancel",
    "user_rate_set",
    "user_rate_set_cancel",
    "own_disabled",
    "own_disabled_cancel",
    "user_info",
];

fn shipped_schemes() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("schemes")
}

/// Account i's address as `common::add_accounts` gives it.
fn ip_of(user: i64) -> String {
    format!("10.88.{}.{}", user / 250, user % 250 + 1)
}

/// One queued event of the plan, with the account's rate at its enqueue.
#[derive(Debug, Clone)]
struct Planned {
    cmd: &'static str,
    user_id: i64,
    rate: (i64, i64),
}

/// New rates `(user_id, (rate_in, rate_out))` set before one batch.
type RateChanges = Vec<(i64, (i64, i64))>;

/// The events in enqueue order: batches of `BATCH`, the rates of some accounts changed
/// before each batch.
fn plan(rng: &mut impl Rng) -> (Vec<RateChanges>, Vec<Vec<Planned>>) {
    let mut rates: HashMap<i64, (i64, i64)> = (1..=ACCOUNTS).map(|u| (u, (10240, 5120))).collect();
    let mut changes = Vec::new();
    let mut batches = Vec::new();
    for _ in 0..EVENTS / BATCH {
        let mut changed = Vec::new();
        for _ in 0..ACCOUNTS / 4 {
            let user = rng.random_range(1..=ACCOUNTS);
            let rate = (
                1024 * rng.random_range(1..=64),
                512 * rng.random_range(1..=64),
            );
            rates.insert(user, rate);
            changed.push((user, rate));
        }
        changes.push(changed);
        // A few accounts at a time, so that their events come in runs.
        let busy: Vec<i64> = (0..6).map(|_| rng.random_range(1..=ACCOUNTS)).collect();
        let batch = (0..BATCH)
            .map(|_| {
                let user_id = if rng.random_bool(0.7) {
                    busy[rng.random_range(0..busy.len())]
                } else {
                    rng.random_range(1..=ACCOUNTS)
                };
                Planned {
                    cmd: CMDS[rng.random_range(0..CMDS.len())],
                    user_id,
                    rate: rates[&user_id],
                }
            })
            .collect();
        batches.push(batch);
    }
    (changes, batches)
}

async fn set_rates(store: &Store, changed: &[(i64, (i64, i64))]) {
    let headers: Vec<String> = [
        "user_id",
        "abonent_id",
        "nas_id",
        "login",
        "ip",
        "rate_in",
        "rate_out",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let records: Vec<AccountRecord> = changed
        .iter()
        .map(|(user, (rate_in, rate_out))| {
            let values = vec![
                user.to_string(),
                (1000 + user).to_string(),
                "1".into(),
                format!("user{user}"),
                ip_of(*user),
                rate_in.to_string(),
                rate_out.to_string(),
            ];
            AccountRecord::from_fields(&headers, &values).expect("account")
        })
        .collect();
    store.accounts_upsert(&records).await.expect("rates");
}

/// Enqueues and expands the plan batch by batch (the daemon is not running yet, so
/// every event gets the rate of its moment); returns compact id -> planned event.
async fn enqueue(
    store: &Store,
    cfg: &Config,
    changes: &[RateChanges],
    batches: &[Vec<Planned>],
) -> HashMap<i64, Planned> {
    let mut by_id = HashMap::new();
    for (changed, batch) in changes.iter().zip(batches) {
        set_rates(store, changed).await;
        let events: Vec<CompactEvent> = batch.iter().map(|p| event(p.cmd, p.user_id)).collect();
        let ids = store.enqueue_compact(&events).await.expect("enqueue");
        for (id, p) in ids.into_iter().zip(batch) {
            by_id.insert(id, p.clone());
        }
        loop {
            let report = store
                .expand(&cfg.database.params_query, 1000)
                .await
                .expect("expand");
            assert_eq!(report.failed, 0, "{report:?}");
            if report.expanded == 0 {
                break;
            }
        }
    }
    by_id
}

/// A router's configuration with the ids left out, sorted: what a comparison needs.
#[derive(Debug, PartialEq, Eq)]
struct Applied {
    /// (list, address, comment)
    lists: Vec<(String, String, String)>,
    /// (name, target, max-limit, comment)
    queues: Vec<(String, String, String, String)>,
}

fn applied(sim: &Sim) -> Applied {
    let state = sim.device.state();
    let mut lists: Vec<_> = state
        .address_list
        .into_iter()
        .map(|e| {
            assert!(!e.disabled, "{e:?}");
            (e.list, e.address, e.comment)
        })
        .collect();
    lists.sort();
    let mut queues: Vec<_> = state
        .queues
        .into_iter()
        .map(|q| (q.name, q.target, q.max_limit, q.comment))
        .collect();
    queues.sort();
    Applied { lists, queues }
}

/// What the last event of each group of each account leaves on the router.
fn expected(planned: &HashMap<i64, Planned>) -> Applied {
    let mut ids: Vec<&i64> = planned.keys().collect();
    ids.sort();
    let mut allowed: BTreeMap<i64, bool> = BTreeMap::new();
    let mut negbal: BTreeMap<i64, bool> = BTreeMap::new();
    let mut queue: BTreeMap<i64, Option<(i64, i64)>> = BTreeMap::new();
    for id in ids {
        let p = &planned[id];
        match p.cmd {
            "user_accept" | "own_disabled_cancel" => {
                allowed.insert(p.user_id, true);
            }
            "user_drop" | "own_disabled" => {
                allowed.insert(p.user_id, false);
            }
            "user_redirect" => {
                negbal.insert(p.user_id, true);
            }
            "user_redirect_cancel" => {
                negbal.insert(p.user_id, false);
            }
            "user_rate_set" => {
                queue.insert(p.user_id, Some(p.rate));
            }
            "user_rate_set_cancel" => {
                queue.insert(p.user_id, None);
            }
            _ => {}
        }
    }
    let comment = |u: i64| format!("crb_{}", ip_of(u));
    let mut lists = Vec::new();
    for (list, members) in [("allowed", &allowed), ("negbal", &negbal)] {
        for (u, _) in members.iter().filter(|(_, on)| **on) {
            lists.push((list.to_string(), ip_of(*u), comment(*u)));
        }
    }
    lists.sort();
    let mut queues: Vec<_> = queue
        .iter()
        .filter_map(|(u, rate)| {
            let (rate_in, rate_out) = (*rate)?;
            Some((
                comment(*u),
                format!("{}/32", ip_of(*u)),
                format!("{rate_in}k/{rate_out}k"),
                comment(*u),
            ))
        })
        .collect();
    queues.sort();
    Applied { lists, queues }
}

/// One side of the comparison: a database with the plan queued, a router, a daemon.
struct Side {
    env: TestEnv,
    store: Store,
    sim: Sim,
    record: PathBuf,
    cfg: Config,
}

async fn side(
    backend: Backend,
    changes: &[RateChanges],
    batches: &[Vec<Planned>],
) -> (Side, HashMap<i64, Planned>) {
    let env = TestEnv::new(backend).await;
    let record = env.path().join("record.log");
    let sim = nasd::sim::start(
        &SimOptions {
            record: Some(record.clone()),
            ..SimOptions::default()
        },
        CancellationToken::new(),
    )
    .await
    .expect("sim starts");
    let store = env.store().await;
    let mut nas = Nas::new(1, "sim", &sim.ssh_addr.ip().to_string());
    nas.scheme = Some(SCHEME.into());
    nas.port = Some(i32::from(sim.ssh_addr.port()));
    nas.login = Some("admin".into());
    nas.password = Some(Secret::new("admin"));
    nas.n_workers = 8;
    nas.max_sessions = 4;
    nas.host_key_policy = "accept-new".into();
    store.nas_upsert(&nas).await.expect("nas");
    // Paused until the test has set the daemon up: nothing is sent before.
    assert!(store.nas_set_paused(1, true).await.expect("pause"));
    add_accounts(&store, ACCOUNTS, &[1]).await;
    let mut cfg = env.config();
    cfg.daemon.schemes_dir = shipped_schemes();
    cfg.daemon.transport.known_hosts = env.path().join("known_hosts");
    let planned = enqueue(&store, &cfg, changes, batches).await;
    (
        Side {
            env,
            store,
            sim,
            record,
            cfg,
        },
        planned,
    )
}

/// Every NAS-log and account-log line under `dir`.
fn log_lines(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(log_lines(&path));
        } else {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            out.extend(text.lines().map(str::to_string));
        }
    }
    out
}

/// The account a router command is for (every command names `crb_<ip>`).
fn account_of(command: &str, by_ip: &HashMap<String, i64>) -> Option<i64> {
    let at = command.find("crb_")? + 4;
    let ip: String = command[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    by_ip.get(&ip).copied()
}

fn is_print(command: &str) -> bool {
    command.contains(" print")
}

/// Each account's state-changing commands as the router received them, in order.
fn received(record: &Path) -> HashMap<i64, Vec<String>> {
    let by_ip: HashMap<String, i64> = (1..=ACCOUNTS).map(|u| (ip_of(u), u)).collect();
    let text = std::fs::read_to_string(record).expect("record file");
    let mut out: HashMap<i64, Vec<String>> = HashMap::new();
    for line in text.lines() {
        let mut parts = line.splitn(3, ' ');
        let (_, kind, command) = (parts.next(), parts.next(), parts.next().unwrap_or(""));
        assert_eq!(kind, Some("cli"), "{line}");
        if is_print(command) {
            continue;
        }
        let user = account_of(command, &by_ip).unwrap_or_else(|| panic!("no account in {line}"));
        out.entry(user).or_default().push(command.to_string());
    }
    out
}

/// Each account's state-changing commands as history says they were sent, in the id
/// order of their events (`user_info` aside: it goes first in its lane, and it changes
/// nothing).
fn sent_in_id_order(history: &[HistoryRow]) -> HashMap<i64, Vec<String>> {
    let mut rows: Vec<&HistoryRow> = history.iter().filter(|h| h.outcome == "done").collect();
    rows.sort_by_key(|h| h.event_id);
    let mut out: HashMap<i64, Vec<String>> = HashMap::new();
    for h in rows.into_iter().filter(|h| h.cmd != "user_info") {
        out.entry(h.user_id)
            .or_default()
            .extend(h.commands.iter().filter(|c| !is_print(c)).cloned());
    }
    out
}

/// Runs `side`'s daemon (coalescing set to `coalesce` through the live reload) until
/// its stack is empty; returns the history and the superseded count of the figures.
async fn deliver(side: &Side, coalesce: bool) -> (Vec<HistoryRow>, u64) {
    let mut cfg = side.cfg.clone();
    // Started with the other setting, switched by the reload before anything is sent.
    cfg.daemon.coalesce = !coalesce;
    let token = CancellationToken::new();
    let daemon = nasd::daemon::start(cfg.clone(), token.clone())
        .await
        .expect("daemon starts");
    cfg.daemon.coalesce = coalesce;
    let lines = daemon.reloader.lock().expect("reloader").apply(cfg);
    let want = if coalesce {
        "coalescing on"
    } else {
        "coalescing off"
    };
    assert!(lines[0].contains(want), "{lines:?}");
    assert!(side.store.nas_set_paused(1, false).await.expect("resume"));
    let store = side.store.clone();
    wait_for(Duration::from_secs(600), "an empty stack", || {
        let store = store.clone();
        async move {
            let count = store.stack_count().await.expect("stack count");
            count.stack_total + count.compact_total == 0
        }
    })
    .await;
    let superseded = daemon
        .stats
        .get(1)
        .map(|s| s.by_cmd.iter().map(|(_, c)| c.superseded).sum())
        .unwrap_or(0);
    token.cancel();
    daemon.wait().await.expect("daemon stops");
    let history = side
        .store
        .history(None, 10 * EVENTS as i64)
        .await
        .expect("history");
    (history, superseded)
}

async fn the_nas_ends_in_the_same_state(backend: Backend) {
    let mut rng = common::harness::seeded_rng("coalesce", "COALESCE_SEED");
    let (changes, batches) = plan(&mut rng);
    let (off, planned) = side(backend, &changes, &batches).await;
    let (on, planned_on) = side(backend, &changes, &batches).await;
    assert_eq!(planned.len(), EVENTS);
    assert_eq!(
        planned.keys().collect::<HashSet<_>>(),
        planned_on.keys().collect::<HashSet<_>>(),
        "both databases number the events alike"
    );
    let ((history_off, superseded_off), (history_on, superseded_on)) =
        tokio::join!(deliver(&off, false), deliver(&on, true));

    // Both routers end as the last event of each group and account says.
    let want = expected(&planned);
    assert!(
        !want.lists.is_empty() && !want.queues.is_empty(),
        "{want:?}"
    );
    assert_eq!(applied(&off.sim), want, "without coalescing");
    assert_eq!(applied(&on.sim), want, "with coalescing");

    // Every event in history exactly once: done, or superseded (nothing failed).
    for (history, name) in [(&history_off, "off"), (&history_on, "on")] {
        assert_eq!(history.len(), EVENTS, "{name}");
        let ids: HashSet<Option<i64>> = history.iter().map(|h| h.compact_id).collect();
        assert_eq!(ids.len(), EVENTS, "{name}: an event twice in history");
        for h in history.iter() {
            let p = &planned[&h.compact_id.expect("compact id")];
            assert_eq!(
                (h.cmd.as_str(), h.user_id),
                (p.cmd, p.user_id),
                "{name}: {h:?}"
            );
            assert!(
                h.outcome == "done" || (name == "on" && h.outcome == "superseded"),
                "{name}: {h:?}"
            );
        }
    }
    assert_eq!(superseded_off, 0);
    let superseded: Vec<&HistoryRow> = history_on
        .iter()
        .filter(|h| h.outcome == "superseded")
        .collect();
    assert!(!superseded.is_empty(), "nothing was coalesced");
    assert_eq!(
        superseded_on,
        superseded.len() as u64,
        "the figures count them"
    );
    eprintln!(
        "coalesce: {} of {EVENTS} events superseded",
        superseded.len()
    );

    // Each superseded row names a later event of its account and group that was sent,
    // with nothing of the account between them but events it also superseded and
    // user_info (which went ahead of them).
    let scheme = Scheme::load(&shipped_schemes().join(SCHEME)).expect("scheme");
    let by_event: HashMap<i64, &HistoryRow> = history_on
        .iter()
        .map(|h| (h.event_id.expect("event id"), h))
        .collect();
    let mut supersedes: HashMap<i64, Vec<i64>> = HashMap::new();
    for h in &superseded {
        let id = h.event_id.expect("event id");
        let error = h.error.as_deref().unwrap_or("");
        let rest = error
            .strip_prefix("superseded by event ")
            .unwrap_or_else(|| panic!("{h:?}"));
        let (by, cmd) = rest.split_once(' ').unwrap_or_else(|| panic!("{h:?}"));
        let by: i64 = by.parse().unwrap_or_else(|_| panic!("{h:?}"));
        let survivor = by_event[&by];
        assert_eq!(cmd, format!("({})", survivor.cmd), "{h:?}");
        assert!(by > id, "{h:?}");
        assert_eq!(survivor.user_id, h.user_id, "{h:?}");
        assert_eq!(survivor.outcome, "done", "{h:?} by {survivor:?}");
        let group = scheme.coalesce_group(&h.cmd);
        assert!(group.is_some(), "{h:?}");
        assert_eq!(scheme.coalesce_group(&survivor.cmd), group, "{h:?}");
        assert_eq!(h.attempts, 0, "{h:?}");
        assert!(h.commands.is_empty() && h.answer.is_empty(), "{h:?}");
        supersedes.entry(by).or_default().push(id);
    }
    for (by, ids) in &supersedes {
        let user = by_event[by].user_id;
        let first = ids.iter().min().expect("one");
        for h in history_on.iter().filter(|h| h.user_id == user) {
            let id = h.event_id.expect("event id");
            if id > *first && id < *by && h.cmd != "user_info" {
                assert!(
                    ids.contains(&id),
                    "event {id} ({}) lies inside the run {ids:?} superseded by {by}",
                    h.cmd
                );
            }
        }
    }

    // The router with coalescing got fewer commands, and each account's commands
    // arrived in the id order of their events.
    let counted_off = off.sim.device.counters().commands_executed;
    let counted_on = on.sim.device.counters().commands_executed;
    assert!(
        counted_on < counted_off,
        "{counted_on} commands with coalescing, {counted_off} without"
    );
    for (side, history) in [(&off, &history_off), (&on, &history_on)] {
        let got = received(&side.record);
        let want = sent_in_id_order(history);
        for user in 1..=ACCOUNTS {
            assert_eq!(
                got.get(&user),
                want.get(&user),
                "account {user}: commands out of event order"
            );
        }
    }

    // One NAS-log and one account-log line per superseded event.
    let lines = log_lines(&on.env.log_dir());
    for h in &superseded {
        let id = h.event_id.expect("event id");
        let needle = format!(
            "event={id} user_id={} cmd={} try=0 outcome: {}: not sent",
            h.user_id,
            h.cmd,
            h.error.as_deref().unwrap_or("")
        );
        let n = lines.iter().filter(|l| l.contains(&needle)).count();
        assert_eq!(n, 2, "{needle}");
    }
    assert!(
        !log_lines(&off.env.log_dir())
            .iter()
            .any(|l| l.contains("superseded")),
        "superseded without coalescing"
    );
    off.sim.stop().await;
    on.sim.stop().await;
}

async fn a_run_stops_at_an_event_held_elsewhere(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let record = env.path().join("record.log");
    // Each command takes a second: the run of account 2 is taken only after account 1's
    // event, which leaves the test time to put a foreign lease on its middle event.
    let sim = nasd::sim::start(
        &SimOptions {
            record: Some(record.clone()),
            latency: "1s".into(),
            ..SimOptions::default()
        },
        CancellationToken::new(),
    )
    .await
    .expect("sim starts");
    let store = env.store().await;
    let mut nas = Nas::new(1, "sim", &sim.ssh_addr.ip().to_string());
    nas.scheme = Some(SCHEME.into());
    nas.port = Some(i32::from(sim.ssh_addr.port()));
    nas.login = Some("admin".into());
    nas.password = Some(Secret::new("admin"));
    nas.n_workers = 1;
    nas.max_sessions = 1;
    nas.host_key_policy = "accept-new".into();
    store.nas_upsert(&nas).await.expect("nas");
    add_accounts(&store, 2, &[1]).await;
    let mut cfg = env.config();
    cfg.daemon.schemes_dir = shipped_schemes();
    cfg.daemon.transport.known_hosts = env.path().join("known_hosts");
    let ids = store
        .enqueue_compact(&[
            event("user_accept", 1),
            event("user_accept", 2),
            event("user_drop", 2),
            event("user_accept", 2),
        ])
        .await
        .expect("enqueue");
    store
        .expand(&cfg.database.params_query, 100)
        .await
        .expect("expand");
    let token = CancellationToken::new();
    let daemon = nasd::daemon::start(cfg, token.clone())
        .await
        .expect("daemon starts");
    // Account 1's event runs: every event is in the owner's lanes now.
    let first = ids[0];
    wait_for(Duration::from_secs(30), "the first event running", || {
        let store = store.clone();
        async move {
            store
                .event_status(first)
                .await
                .expect("status")
                .is_some_and(|s| s.state == "running")
        }
    })
    .await;
    // Another owner holds the middle event of account 2's run for 10 s.
    let held = ids[2];
    match backend {
        Backend::Sqlite => {
            let until = (chrono::Utc::now() + chrono::Duration::seconds(10)).timestamp_millis();
            let pool = sqlx::SqlitePool::connect(&env.url).await.expect("sqlite");
            sqlx::query(
                "UPDATE events_stack SET state = 'running', claim_token = 777, \
                 lease_until = ?1 WHERE compact_id = ?2",
            )
            .bind(until)
            .bind(held)
            .execute(&pool)
            .await
            .expect("foreign lease");
            pool.close().await;
        }
        Backend::Postgres => {
            let pool = sqlx::PgPool::connect(&env.url).await.expect("postgres");
            sqlx::query(
                "UPDATE events_stack SET state = 'running', claim_token = 777, \
                 lease_until = now() + interval '10 seconds' WHERE compact_id = $1",
            )
            .bind(held)
            .execute(&pool)
            .await
            .expect("foreign lease");
            pool.close().await;
        }
    }
    wait_for(Duration::from_secs(120), "an empty stack", || {
        let store = store.clone();
        async move {
            let count = store.stack_count().await.expect("stack count");
            count.stack_total + count.compact_total == 0
        }
    })
    .await;
    token.cancel();
    daemon.wait().await.expect("daemon stops");

    // Nothing superseded: each event sent once, account 2's in their order, so the
    // account ends allowed (its last event is an accept).
    let history = store.history(None, 100).await.expect("history");
    assert_eq!(history.len(), 4);
    for h in &history {
        assert_eq!(h.outcome, "done", "{h:?}");
    }
    let got = received(&record);
    let want = sent_in_id_order(&history);
    assert_eq!(got.get(&2), want.get(&2));
    assert_eq!(got.get(&2).map(Vec::len), Some(3), "{got:?}");
    let allowed: Vec<String> = sim
        .device
        .state()
        .address_list
        .into_iter()
        .filter(|e| e.list == "allowed")
        .map(|e| e.address)
        .collect();
    assert_eq!(allowed.len(), 2, "{allowed:?}");
    assert!(allowed.contains(&ip_of(2)), "{allowed:?}");
    sim.stop().await;
}

// ---- migration 0006 ------------------------------------------------------------------

/// The migrations of `backend` before 0006, copied to a directory of their own.
fn migrations_before_0006(backend: Backend, into: &Path) -> PathBuf {
    let name = match backend {
        Backend::Postgres => "postgres",
        Backend::Sqlite => "sqlite",
    };
    let from = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("migrations")
        .join(name);
    let to = into.join("migrations");
    std::fs::create_dir_all(&to).expect("dir");
    for entry in std::fs::read_dir(&from).expect("migrations").flatten() {
        let file = entry.file_name().to_string_lossy().to_string();
        if file.as_str() < "0006" {
            std::fs::copy(entry.path(), to.join(&file)).expect("copy");
        }
    }
    to
}

/// Rows of history as text, in id order; index names of the table.
async fn history_snapshot(env: &TestEnv) -> (Vec<String>, Vec<String>) {
    match env.backend {
        Backend::Sqlite => {
            let pool = sqlx::SqlitePool::connect(&env.url).await.expect("sqlite");
            let rows: Vec<(String,)> = sqlx::query_as(
                "SELECT id || '|' || event_id || '|' || compact_id || '|' || cmd || '|' || \
                 user_id || '|' || outcome || '|' || attempts || '|' || commands || '|' || \
                 answer || '|' || coalesce(error, '-') || '|' || finished_at \
                 FROM events_history ORDER BY id",
            )
            .fetch_all(&pool)
            .await
            .expect("rows");
            let indexes: Vec<(String,)> = sqlx::query_as(
                "SELECT name FROM sqlite_master WHERE type = 'index' \
                 AND tbl_name = 'events_history' AND sql IS NOT NULL ORDER BY name",
            )
            .fetch_all(&pool)
            .await
            .expect("indexes");
            pool.close().await;
            (
                rows.into_iter().map(|r| r.0).collect(),
                indexes.into_iter().map(|r| r.0).collect(),
            )
        }
        Backend::Postgres => {
            let pool = sqlx::PgPool::connect(&env.url).await.expect("postgres");
            let rows: Vec<(String,)> = sqlx::query_as(
                "SELECT concat_ws('|', id, event_id, compact_id, cmd, user_id, outcome, \
                 attempts, commands::text, answer, coalesce(error, '-'), finished_at) \
                 FROM events_history ORDER BY id",
            )
            .fetch_all(&pool)
            .await
            .expect("rows");
            let indexes: Vec<(String,)> = sqlx::query_as(
                "SELECT indexname::text FROM pg_indexes WHERE tablename = 'events_history' \
                 ORDER BY indexname",
            )
            .fetch_all(&pool)
            .await
            .expect("indexes");
            pool.close().await;
            (
                rows.into_iter().map(|r| r.0).collect(),
                indexes.into_iter().map(|r| r.0).collect(),
            )
        }
    }
}

/// Inserts a history row with `outcome`; its id, or the database's refusal.
async fn insert_history(env: &TestEnv, outcome: &str) -> Result<i64, String> {
    let sql = match env.backend {
        Backend::Sqlite => {
            "INSERT INTO events_history (event_id, compact_id, enqueued_at, cmd, user_id, \
             outcome, attempts, error, finished_at) VALUES (7, 7, 0, 'user_drop', 3, ?1, 0, \
             'superseded by event 9 (user_accept)', 0) RETURNING id"
        }
        Backend::Postgres => {
            "INSERT INTO events_history (event_id, compact_id, enqueued_at, cmd, user_id, \
             outcome, attempts, error, finished_at) VALUES (7, 7, now(), 'user_drop', 3, $1, \
             0, 'superseded by event 9 (user_accept)', now()) RETURNING id"
        }
    };
    let result = match env.backend {
        Backend::Sqlite => {
            let pool = sqlx::SqlitePool::connect(&env.url).await.expect("sqlite");
            let r = sqlx::query_scalar(sql).bind(outcome).fetch_one(&pool).await;
            pool.close().await;
            r
        }
        Backend::Postgres => {
            let pool = sqlx::PgPool::connect(&env.url).await.expect("postgres");
            let r = sqlx::query_scalar(sql).bind(outcome).fetch_one(&pool).await;
            pool.close().await;
            r
        }
    };
    result.map_err(|e| e.to_string())
}

async fn migration_keeps_history(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let before = migrations_before_0006(backend, env.path());
    let migrator = sqlx::migrate::Migrator::new(before.as_path())
        .await
        .expect("migrations up to 0005");
    match backend {
        Backend::Sqlite => {
            use std::str::FromStr;
            let options = sqlx::sqlite::SqliteConnectOptions::from_str(&env.url)
                .expect("url")
                .create_if_missing(true);
            let pool = sqlx::SqlitePool::connect_with(options)
                .await
                .expect("sqlite");
            migrator.run(&pool).await.expect("migrate to 0005");
            pool.close().await;
        }
        Backend::Postgres => {
            let pool = sqlx::PgPool::connect(&env.url).await.expect("postgres");
            migrator.run(&pool).await.expect("migrate to 0005");
            pool.close().await;
        }
    }
    // History rows, then the newest one pruned: the next id is past it.
    assert!(
        insert_history(&env, "superseded").await.is_err(),
        "0005 refuses superseded"
    );
    let mut last = 0;
    for outcome in ["done", "failed", "done", "failed"] {
        last = insert_history(&env, outcome).await.expect("insert at 0005");
    }
    let pruned = last + 1;
    assert_eq!(insert_history(&env, "done").await, Ok(pruned));
    match backend {
        Backend::Sqlite => {
            let pool = sqlx::SqlitePool::connect(&env.url).await.expect("sqlite");
            sqlx::query("DELETE FROM events_history WHERE id = ?1")
                .bind(pruned)
                .execute(&pool)
                .await
                .expect("prune");
            pool.close().await;
        }
        Backend::Postgres => {
            let pool = sqlx::PgPool::connect(&env.url).await.expect("postgres");
            sqlx::query("DELETE FROM events_history WHERE id = $1")
                .bind(pruned)
                .execute(&pool)
                .await
                .expect("prune");
            pool.close().await;
        }
    }
    let (rows_before, indexes_before) = history_snapshot(&env).await;
    assert_eq!(rows_before.len(), 4, "{rows_before:?}");

    // The daemon's own migration: 0006 only.
    let store = Store::connect(&env.url, 2).await.expect("connect");
    assert_eq!(
        store.pending_migrations().await.expect("pending").len(),
        1,
        "only 0006 is pending"
    );
    store.migrate().await.expect("migrate to 0006");
    let (rows_after, indexes_after) = history_snapshot(&env).await;
    assert_eq!(rows_after, rows_before, "rows and ids kept");
    let mut want_indexes = indexes_before.clone();
    want_indexes.push("events_history_superseded".into());
    want_indexes.sort();
    assert_eq!(indexes_after, want_indexes);
    // The sequence went on past the pruned row; superseded is allowed, nothing else new.
    assert_eq!(insert_history(&env, "superseded").await, Ok(pruned + 1));
    let refused = insert_history(&env, "cancelled").await;
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.contains("CHECK") || e.contains("check")),
        "{refused:?}"
    );
    let history = store.history(None, 100).await.expect("history");
    assert_eq!(history.len(), 5);
    assert_eq!(
        history.last().map(|h| h.outcome.as_str()),
        Some("superseded")
    );
}
