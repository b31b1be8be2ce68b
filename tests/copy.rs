//! Moving nasd's tables between databases, as an operator does it with the real binary:
//!
//! - `nasd copy --to postgres://...` from a SQLite database with history, events in the
//!   main stack in every state (ready, retrying, claimed by a daemon that crashed) and
//!   events still in the compact stack: every table arrives with its ids, the claims
//!   arrive ready with their try counts, the source is left as it was, a second copy
//!   into the now full target is refused, and a daemon started on the target delivers
//!   every queued event exactly once, in id order per account.
//! - `nasd backup` beside a working daemon and a feeder writes a consistent snapshot
//!   (every compact id in exactly one place, no gap) with the known_hosts file beside
//!   it; `nasd restore` puts both into an empty PostgreSQL and refuses a full one.
//! - A copy killed by SIGKILL while it writes the target leaves the source as it was
//!   and the target empty, so it can simply be run again.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{Backend, TestEnv, add_accounts, event, nas, wait_for, wait_history};
use sqlx::{PgPool, SqlitePool};
use tokio_util::sync::CancellationToken;

/// Generous bounds against a hung test, not measurements.
const LIMIT: Duration = Duration::from_secs(120);
/// A copy of a few hundred thousand rows in a debug build.
const COPY_LIMIT: Duration = Duration::from_secs(600);

/// nasd's tables, as an operator counts them.
const TABLES: [&str; 5] = [
    "nas",
    "accounts",
    "events_stack_compact",
    "events_stack",
    "events_history",
];

/// A pinned SSH host key, as `ssh-keygen -lf` prints it.
const PIN: &str = "SHA256:uNiVztksCsDhcc0u9e8BujQXVUpKZIDTMczCvj3tD2s";

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as i64
}

/// A nasd.toml in `dir` for `url`, with its known_hosts file at `known_hosts`.
fn write_config(dir: &Path, url: &str, known_hosts: &Path) -> PathBuf {
    let config = dir.join("nasd.toml");
    std::fs::write(
        &config,
        format!(
            "[database]\nurl = \"{url}\"\n[daemon]\nlog_dir = \"{}\"\nschemes_dir = \"{}\"\n\
             [transport]\nknown_hosts = \"{}\"\n",
            dir.join("log").display(),
            dir.join("schemes").display(),
            known_hosts.display()
        ),
    )
    .expect("write nasd.toml");
    config
}

/// The real binary: `nasd --config CONFIG ARGS...`, to its end.
async fn nasd(config: &Path, args: &[&str], limit: Duration) -> Output {
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_nasd"))
        .arg("--config")
        .arg(config)
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(limit, run)
        .await
        .unwrap_or_else(|_| panic!("nasd {args:?} did not end within {limit:?}"))
        .expect("run nasd")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `nasd ...` that must succeed; returns its stdout.
async fn nasd_ok(config: &Path, args: &[&str], limit: Duration) -> String {
    let out = nasd(config, args, limit).await;
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(
        out.status.success(),
        "nasd {args:?}: {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    assert!(stdout.contains("Verified"), "nasd {args:?}:\n{stdout}");
    stdout
}

/// `nasd ...` that must be refused because its target holds rows.
async fn nasd_refused_not_empty(config: &Path, args: &[&str]) {
    let out = nasd(config, args, LIMIT).await;
    let stderr = text(&out.stderr);
    assert!(
        !out.status.success(),
        "nasd {args:?} into a full target succeeded:\n{}",
        text(&out.stdout)
    );
    assert!(stderr.contains("not empty"), "nasd {args:?}: {stderr}");
}

async fn sqlite_counts(db: &SqlitePool) -> Vec<(&'static str, i64)> {
    let mut out = Vec::new();
    for table in TABLES {
        let n: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
            .fetch_one(db)
            .await
            .expect("count a SQLite table");
        out.push((table, n));
    }
    out
}

async fn pg_counts(db: &PgPool) -> Vec<(&'static str, i64)> {
    let mut out = Vec::new();
    for table in TABLES {
        let n: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
            .fetch_one(db)
            .await
            .expect("count a PostgreSQL table");
        out.push((table, n));
    }
    out
}

async fn sqlite_ids(db: &SqlitePool, sql: &str) -> Vec<i64> {
    sqlx::query_scalar(sql)
        .fetch_all(db)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

async fn pg_ids(db: &PgPool, sql: &str) -> Vec<i64> {
    sqlx::query_scalar(sql)
        .fetch_all(db)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_to_postgres_then_the_daemon_delivers_every_queued_event_once() {
    let source = TestEnv::new(Backend::Sqlite).await;
    let target = TestEnv::new(Backend::Postgres).await;
    let store = source.store().await;
    let record = source.path().join("record.txt");
    let script = source.script(
        "rec.sh",
        &format!(
            "#!/bin/sh\necho \"$event_id $user_id $1\" >> {}\necho ok\n",
            record.display()
        ),
    );
    store
        .nas_upsert(&nas(1, Some(&script), None, 4))
        .await
        .expect("nas 1");
    // A router reached over SSH with its host key pinned; it gets no events.
    let mut pinned = nas(2, None, Some("mikrotik"), 1);
    pinned.protocol = Some("ssh".into());
    pinned.port = Some(22);
    pinned.host_key = Some(PIN.into());
    pinned.enabled = false;
    store.nas_upsert(&pinned).await.expect("nas 2");
    let accounts = 5;
    add_accounts(&store, accounts, &[1]).await;
    let cmds = ["user_add", "user_rate_set", "user_drop", "user_accept"];
    let batch = |n: i64| -> Vec<nasd::store::CompactEvent> {
        (0..n)
            .map(|i| event(cmds[(i % 4) as usize], 1 + i % accounts))
            .collect()
    };

    // History first: a daemon on the source delivers a first batch.
    store.enqueue_compact(&batch(20)).await.expect("enqueue");
    let token = CancellationToken::new();
    let running = nasd::daemon::start(source.config(), token.clone())
        .await
        .expect("start the daemon on SQLite");
    wait_history(&store, 20, LIMIT).await;
    token.cancel();
    running.wait().await.expect("the SQLite daemon stops");
    assert_eq!(store.history_counts().await.expect("counts"), (20, 0));
    std::fs::rename(&record, source.path().join("record.first.txt")).expect("keep the record");

    // Events queued without a daemon: expanded into the main stack, then some of them
    // claimed by a daemon that crashed and some waiting for a retry; a few more only in
    // the compact stack.
    store.enqueue_compact(&batch(40)).await.expect("enqueue");
    let params_query = nasd::config::Config::default().database.params_query;
    let expanded = store.expand(&params_query, 1000).await.expect("expand");
    assert_eq!((expanded.expanded, expanded.failed), (40, 0));
    let src = SqlitePool::connect(&source.url)
        .await
        .expect("open the source");
    let stack_ids = sqlite_ids(&src, "SELECT id FROM events_stack ORDER BY id").await;
    assert_eq!(stack_ids.len(), 40);
    let claimed: Vec<i64> = [0, 6, 12, 23].iter().map(|&i| stack_ids[i]).collect();
    let retrying: Vec<i64> = [1, 8, 17, 30].iter().map(|&i| stack_ids[i]).collect();
    let now = now_ms();
    for (n, id) in claimed.iter().enumerate() {
        sqlx::query(
            "UPDATE events_stack SET state = 'running', claim_token = ?2, claimed_at = ?3, \
             lease_until = ?3 + 60000, try_count = 1 WHERE id = ?1",
        )
        .bind(id)
        .bind(7_000_000 + n as i64)
        .bind(now)
        .execute(&src)
        .await
        .expect("a crashed claim");
    }
    for id in &retrying {
        sqlx::query(
            "UPDATE events_stack SET try_count = 2, retry_at = ?2, last_error = 'timeout' \
             WHERE id = ?1",
        )
        .bind(id)
        .bind(now + 1000)
        .execute(&src)
        .await
        .expect("a retry");
    }
    store.enqueue_compact(&batch(8)).await.expect("enqueue");
    let mut compact_ids = sqlite_ids(&src, "SELECT id FROM events_stack_compact ORDER BY id").await;
    assert_eq!(compact_ids.len(), 8);

    let counts_before = sqlite_counts(&src).await;
    let history_before: Vec<(i64, i64, i64)> =
        sqlx::query_as("SELECT id, event_id, compact_id FROM events_history ORDER BY id")
            .fetch_all(&src)
            .await
            .expect("source history");
    assert_eq!(history_before.len(), 20);
    let stack_compact: Vec<(i64, i64)> =
        sqlx::query_as("SELECT id, compact_id FROM events_stack ORDER BY id")
            .fetch_all(&src)
            .await
            .expect("source stack");
    let retry_at_src: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT id, retry_at FROM events_stack WHERE retry_at IS NOT NULL ORDER BY id",
    )
    .fetch_all(&src)
    .await
    .expect("source retries");

    // The copy.
    let source_config = write_config(
        source.path(),
        &source.url,
        &source.path().join("known_hosts"),
    );
    let stdout = nasd_ok(&source_config, &["copy", "--to", &target.url], LIMIT).await;
    assert!(
        stdout.contains(&format!(
            "{} claimed event(s) copied as ready",
            claimed.len()
        )),
        "{stdout}"
    );

    // The target holds what the source held, with the same ids.
    let dst = PgPool::connect(&target.url).await.expect("open the target");
    assert_eq!(pg_counts(&dst).await, counts_before);
    let history_copied: Vec<(i64, i64, i64)> =
        sqlx::query_as("SELECT id, event_id, compact_id FROM events_history ORDER BY id")
            .fetch_all(&dst)
            .await
            .expect("target history");
    assert_eq!(history_copied, history_before);
    let stack_compact_copied: Vec<(i64, i64)> =
        sqlx::query_as("SELECT id, compact_id FROM events_stack ORDER BY id")
            .fetch_all(&dst)
            .await
            .expect("target stack");
    assert_eq!(stack_compact_copied, stack_compact);
    assert_eq!(
        pg_ids(&dst, "SELECT id FROM events_stack_compact ORDER BY id").await,
        compact_ids
    );
    // The crashed claims arrive ready, their try count kept.
    let released: Vec<(i64, String, Option<i64>, bool, bool, i32)> = sqlx::query_as(
        "SELECT id, state, claim_token, claimed_at IS NULL, lease_until IS NULL, try_count \
         FROM events_stack WHERE id = ANY($1) ORDER BY id",
    )
    .bind(&claimed)
    .fetch_all(&dst)
    .await
    .expect("target claims");
    assert_eq!(
        released,
        claimed
            .iter()
            .map(|&id| (id, "ready".to_string(), None, true, true, 1))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        pg_ids(
            &dst,
            "SELECT count(*) FROM events_stack WHERE state <> 'ready'"
        )
        .await,
        vec![0]
    );
    // The retries keep their try count, error and time (to the millisecond).
    let retries: Vec<(i64, i32, Option<String>, i64)> = sqlx::query_as(
        "SELECT id, try_count, last_error, (extract(epoch from retry_at) * 1000)::bigint \
         FROM events_stack WHERE retry_at IS NOT NULL ORDER BY id",
    )
    .fetch_all(&dst)
    .await
    .expect("target retries");
    assert_eq!(
        retries,
        retry_at_src
            .iter()
            .map(|&(id, at)| (id, 2, Some("timeout".to_string()), at))
            .collect::<Vec<_>>()
    );
    assert_eq!(retries.iter().map(|r| r.0).collect::<Vec<_>>(), retrying);
    // The pinned host key, its policy and the NAS's state.
    let nas2: (
        Option<String>,
        String,
        Option<String>,
        Option<i32>,
        bool,
        bool,
    ) = sqlx::query_as(
        "SELECT host_key, host_key_policy, protocol, port, enabled, legacy_crypto \
         FROM nas WHERE id = 2",
    )
    .fetch_one(&dst)
    .await
    .expect("target nas 2");
    assert_eq!(
        nas2,
        (
            Some(PIN.to_string()),
            "strict".to_string(),
            Some("ssh".to_string()),
            Some(22),
            false,
            false
        )
    );
    let script_name: Option<String> =
        sqlx::query_scalar("SELECT script_name FROM nas WHERE id = 1")
            .fetch_one(&dst)
            .await
            .expect("target nas 1");
    assert_eq!(script_name, Some(script.display().to_string()));

    // The source is left as it was: same rows, the claims still held.
    assert_eq!(sqlite_counts(&src).await, counts_before);
    let still: Vec<(i64, String, Option<i64>)> = sqlx::query_as(
        "SELECT id, state, claim_token FROM events_stack WHERE state = 'running' ORDER BY id",
    )
    .fetch_all(&src)
    .await
    .expect("source claims");
    assert_eq!(
        still,
        claimed
            .iter()
            .enumerate()
            .map(|(n, &id)| (id, "running".to_string(), Some(7_000_000 + n as i64)))
            .collect::<Vec<_>>()
    );

    // A second copy into the now full target is refused.
    nasd_refused_not_empty(&source_config, &["copy", "--to", &target.url]).await;
    assert_eq!(pg_counts(&dst).await, counts_before);

    // Billing goes on writing into the target: the compact ids continue after the
    // copied ones.
    let target_store = target.store().await;
    let fresh = target_store
        .enqueue_compact(&[event("user_add", 1)])
        .await
        .expect("enqueue into the target");
    let last_compact = *compact_ids.last().expect("compact ids");
    assert_eq!(fresh, vec![last_compact + 1]);
    compact_ids.extend(fresh);

    // A daemon on the target delivers what was queued.
    let queued = stack_ids.len() + compact_ids.len();
    let total = history_before.len() + queued;
    let token = CancellationToken::new();
    let running = nasd::daemon::start(target.config(), token.clone())
        .await
        .expect("start the daemon on PostgreSQL");
    wait_history(&target_store, total as i64, LIMIT).await;
    token.cancel();
    running.wait().await.expect("the PostgreSQL daemon stops");

    assert_eq!(
        target_store.history_counts().await.expect("counts"),
        (total as i64, 0),
        "every event done, none failed"
    );
    let count = target_store.stack_count().await.expect("stack count");
    assert_eq!((count.compact_total, count.stack_total), (0, 0));
    let history: Vec<(i64, i64, i64, String, i32)> = sqlx::query_as(
        "SELECT id, event_id, compact_id, outcome, attempts FROM events_history ORDER BY id",
    )
    .fetch_all(&dst)
    .await
    .expect("target history after delivery");
    assert_eq!(history.len(), total);
    // The copied history is still there, with its ids.
    let kept: Vec<(i64, i64, i64)> = history[..history_before.len()]
        .iter()
        .map(|h| (h.0, h.1, h.2))
        .collect();
    assert_eq!(kept, history_before);
    // Every queued event finished exactly once: the stack's events under their ids,
    // the compact ones under ids given by the target's expansion, above them.
    let delivered = &history[history_before.len()..];
    let last_copied = history_before.last().map_or(0, |h| h.0);
    assert!(delivered.iter().all(|h| h.0 > last_copied));
    let by_compact: HashMap<i64, &(i64, i64, i64, String, i32)> =
        delivered.iter().map(|h| (h.2, h)).collect();
    assert_eq!(by_compact.len(), queued, "one history row per queued event");
    for &(id, compact_id) in &stack_compact {
        let h = by_compact
            .get(&compact_id)
            .unwrap_or_else(|| panic!("event {id} (compact {compact_id}) not in history"));
        assert_eq!(h.1, id, "event {id} kept its id");
        let attempts = if claimed.contains(&id) {
            2
        } else if retrying.contains(&id) {
            3
        } else {
            1
        };
        assert_eq!(h.4, attempts, "attempts of event {id}");
    }
    let last_stack = *stack_ids.last().expect("stack ids");
    for compact_id in &compact_ids {
        let h = by_compact
            .get(compact_id)
            .unwrap_or_else(|| panic!("compact event {compact_id} not in history"));
        assert!(
            h.1 > last_stack,
            "compact {compact_id} got event id {}",
            h.1
        );
        assert_eq!(h.4, 1);
    }

    // What reached the device: each event once, in id order per account.
    let lines = std::fs::read_to_string(&record).expect("the record of the target's daemon");
    let mut per_user: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
    let mut seen: Vec<i64> = Vec::new();
    for line in lines.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        assert_eq!(f.len(), 3, "record line {line:?}");
        let (id, user): (i64, i64) = (f[0].parse().expect("id"), f[1].parse().expect("user"));
        per_user.entry(user).or_default().push(id);
        seen.push(id);
    }
    seen.sort_unstable();
    let mut expected: Vec<i64> = delivered.iter().map(|h| h.1).collect();
    expected.sort_unstable();
    assert_eq!(seen, expected, "every queued event recorded exactly once");
    assert_eq!(per_user.len() as i64, accounts);
    for (user, ids) in &per_user {
        assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "account {user} received its events out of id order: {ids:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_while_the_daemon_runs_restores_a_consistent_snapshot() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let store = env.store().await;
    let script = env.script("ok.sh", "#!/bin/sh\necho ok\n");
    store
        .nas_upsert(&nas(1, Some(&script), None, 4))
        .await
        .expect("nas");
    let accounts = 10;
    add_accounts(&store, accounts, &[1]).await;
    let known_hosts = env.path().join("ssh").join("known_hosts");
    std::fs::create_dir_all(known_hosts.parent().expect("dir")).expect("ssh dir");
    let identities = "10.20.0.2 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIH7y0ZyqjjOq4zGtTNEFnVG0IYUnC2Xx7kNHLsr4Y2Ra\n";
    std::fs::write(&known_hosts, identities).expect("known_hosts");
    let config = write_config(env.path(), &env.url, &known_hosts);
    let mut cfg = env.config();
    cfg.daemon.transport.known_hosts = known_hosts.clone();

    let token = CancellationToken::new();
    let running = nasd::daemon::start(cfg, token.clone())
        .await
        .expect("start the daemon");
    // The feeder: one event at a time, compact ids 1, 2, 3... in order.
    let fed = Arc::new(AtomicI64::new(0));
    let stop_feeding = CancellationToken::new();
    let feeder = {
        let (store, fed, stop) = (store.clone(), fed.clone(), stop_feeding.clone());
        tokio::spawn(async move {
            let mut n = 0i64;
            while !stop.is_cancelled() {
                let ids = store
                    .enqueue_compact(&[event("user_add", 1 + n % accounts)])
                    .await
                    .expect("feed");
                n += 1;
                assert_eq!(ids, vec![n], "compact ids in order");
                fed.store(n, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    wait_for(LIMIT, "events fed and delivered", || async {
        fed.load(Ordering::SeqCst) >= 100 && store.history_counts().await.expect("history").0 >= 30
    })
    .await;

    let snap = env.path().join("backup").join("snap.db");
    let snap_arg = snap.display().to_string();
    let out = nasd(&config, &["backup", &snap_arg], LIMIT).await;
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "nasd backup: {:?}\n{stdout}\n{}",
        out.status,
        text(&out.stderr)
    );
    assert!(snap.is_file(), "{stdout}");
    assert!(stdout.contains("Backup written to"), "{stdout}");
    let saved = env.path().join("backup").join("snap.db.known_hosts");
    assert_eq!(
        std::fs::read_to_string(&saved).expect("snap.db.known_hosts"),
        identities
    );

    // Both keep working a moment after the backup, then stop.
    let at_backup = fed.load(Ordering::SeqCst);
    wait_for(LIMIT, "more events fed after the backup", || async {
        fed.load(Ordering::SeqCst) >= at_backup + 20
    })
    .await;
    stop_feeding.cancel();
    feeder.await.expect("the feeder");
    token.cancel();
    running.wait().await.expect("the daemon stops");
    let fed = fed.load(Ordering::SeqCst);

    // The snapshot is consistent: each compact id in exactly one place, no gap.
    let snapshot = SqlitePool::connect(&format!("sqlite://{}?mode=ro", snap.display()))
        .await
        .expect("open the snapshot");
    let mut places: BTreeMap<i64, Vec<&str>> = BTreeMap::new();
    for (place, sql) in [
        (
            "events_stack_compact",
            "SELECT id FROM events_stack_compact",
        ),
        ("events_stack", "SELECT compact_id FROM events_stack"),
        (
            "events_history",
            "SELECT compact_id FROM events_history WHERE compact_id IS NOT NULL",
        ),
    ] {
        for id in sqlite_ids(&snapshot, sql).await {
            places.entry(id).or_default().push(place);
        }
    }
    let twice: Vec<_> = places.iter().filter(|(_, p)| p.len() > 1).collect();
    assert!(twice.is_empty(), "compact ids in two places: {twice:?}");
    let m = places.len() as i64;
    assert!(m > 0, "the snapshot holds no event");
    assert_eq!(
        places.keys().copied().collect::<Vec<_>>(),
        (1..=m).collect::<Vec<_>>(),
        "the snapshot's compact ids have a gap"
    );
    assert!(
        m <= fed,
        "the snapshot holds {m} events, only {fed} were fed"
    );
    // Each delivered event once too: no event id both in the stack and in history.
    let stack_ids: BTreeSet<i64> = sqlite_ids(&snapshot, "SELECT id FROM events_stack")
        .await
        .into_iter()
        .collect();
    let history_ids = sqlite_ids(&snapshot, "SELECT event_id FROM events_history").await;
    let history_set: BTreeSet<i64> = history_ids.iter().copied().collect();
    assert_eq!(
        history_set.len(),
        history_ids.len(),
        "an event twice in history"
    );
    assert!(stack_ids.is_disjoint(&history_set));
    let snap_counts = sqlite_counts(&snapshot).await;
    println!(
        "snapshot: compact ids 1..={m} of {fed} fed (taken at {at_backup}); counts {snap_counts:?}"
    );
    snapshot.close().await;

    // Restore into an empty PostgreSQL, known_hosts to its configured place.
    let pg = TestEnv::new(Backend::Postgres).await;
    let restored_hosts = pg.path().join("etc").join("known_hosts");
    let pg_config = write_config(pg.path(), &pg.url, &restored_hosts);
    let stdout = nasd_ok(&pg_config, &["restore", &snap_arg], LIMIT).await;
    let dst = PgPool::connect(&pg.url).await.expect("open the target");
    assert_eq!(pg_counts(&dst).await, snap_counts, "{stdout}");
    assert_eq!(
        std::fs::read_to_string(&restored_hosts).expect("restored known_hosts"),
        identities
    );
    assert!(
        stdout.contains(&format!(
            "Device identities restored to {}",
            restored_hosts.display()
        )),
        "{stdout}"
    );

    // The restored database passes `nasd check` (database, migrations, NAS rows).
    std::fs::create_dir_all(pg.schemes_dir()).expect("schemes dir");
    let checked = nasd(&pg_config, &["check"], LIMIT).await;
    let report = text(&checked.stdout);
    assert!(checked.status.success(), "nasd check:\n{report}");
    assert!(report.contains("migrations: all applied"), "{report}");
    assert!(report.contains("nasd check: 0 error(s)"), "{report}");

    // Restoring again into the now full database is refused.
    nasd_refused_not_empty(&pg_config, &["restore", &snap_arg]).await;
    assert_eq!(pg_counts(&dst).await, snap_counts);
}

/// History rows the killed copy carries: enough that a debug build writes them for
/// seconds, so the kill lands while the target's transaction is open.
const HISTORY_ROWS: i64 = 50_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_killed_half_way_leaves_the_source_untouched_and_the_target_empty() {
    let source = TestEnv::new(Backend::Sqlite).await;
    let target = TestEnv::new(Backend::Postgres).await;
    let store = source.store().await;
    let script = source.script("ok.sh", "#!/bin/sh\necho ok\n");
    store
        .nas_upsert(&nas(1, Some(&script), None, 4))
        .await
        .expect("nas 1");
    store
        .nas_upsert(&nas(2, Some(&script), None, 4))
        .await
        .expect("nas 2");
    add_accounts(&store, 100, &[1, 2]).await;
    let events: Vec<_> = (0..50).map(|i| event("user_add", 1 + i % 100)).collect();
    store.enqueue_compact(&events).await.expect("enqueue");
    let params_query = nasd::config::Config::default().database.params_query;
    let expanded = store.expand(&params_query, 30).await.expect("expand");
    assert_eq!(expanded.expanded, 30);
    let src = SqlitePool::connect(&source.url)
        .await
        .expect("open the source");
    sqlx::query(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?1) \
         INSERT INTO events_history (event_id, compact_id, event_date, enqueued_at, cmd, \
         user_id, abonent_id, nas_id, params, outcome, attempts, commands, answer, \
         duration_ms, finished_at) \
         SELECT 100000 + i, 100000 + i, 1700000000000 + i, 1700000000000 + i, 'user_add', \
         1 + i % 100, 1001 + i % 100, 1 + i % 2, '{\"ip\": \"10.88.0.2\", \"rate_in\": 10240}', \
         'done', 1, '[\"/opt/nasd/ok.sh user_add\"]', \
         replace(hex(zeroblob(100)), '00', 'done user_add for user ') || i, 12, \
         1700000000000 + i FROM n",
    )
    .bind(HISTORY_ROWS)
    .execute(&src)
    .await
    .expect("history rows");
    let counts_before = sqlite_counts(&src).await;
    assert_eq!(
        counts_before,
        vec![
            ("nas", 2),
            ("accounts", 100),
            ("events_stack_compact", 20),
            ("events_stack", 30),
            ("events_history", HISTORY_ROWS),
        ]
    );
    let config = write_config(
        source.path(),
        &source.url,
        &source.path().join("known_hosts"),
    );

    // The copy starts writing history inside its one transaction; then SIGKILL.
    let stderr_path = source.path().join("copy.stderr");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_nasd"))
        .arg("--config")
        .arg(&config)
        .args(["copy", "--to", &target.url])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr_path).expect("stderr file"))
        .kill_on_drop(true)
        .spawn()
        .expect("start nasd copy");
    let admin = PgPool::connect(&target.url).await.expect("open the target");
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        if let Some(status) = child.try_wait().expect("poll the copy") {
            panic!(
                "the copy ended ({status:?}) before it was seen writing events_history: make \
                 HISTORY_ROWS larger\n{}",
                std::fs::read_to_string(&stderr_path).unwrap_or_default()
            );
        }
        let writing: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND pid <> pg_backend_pid() AND query LIKE 'INSERT INTO events_history%'",
        )
        .fetch_one(&admin)
        .await
        .expect("pg_stat_activity");
        if writing > 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the copy did not start writing events_history within {LIMIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    child.start_kill().expect("SIGKILL the copy");
    let status = tokio::time::timeout(LIMIT, child.wait())
        .await
        .expect("the killed copy ends")
        .expect("wait for the copy");
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "the copy was not killed half way but ended on its own: {status:?}"
    );

    // Nothing changed on the source, nothing arrived on the target.
    assert_eq!(sqlite_counts(&src).await, counts_before);
    let emptied: Vec<(&str, i64)> = TABLES.iter().map(|t| (*t, 0)).collect();
    assert_eq!(pg_counts(&admin).await, emptied);

    // The copy is atomic: running it again completes.
    let stdout = nasd_ok(&config, &["copy", "--to", &target.url], COPY_LIMIT).await;
    assert!(stdout.contains(&format!("{HISTORY_ROWS} rows")), "{stdout}");
    assert_eq!(pg_counts(&admin).await, counts_before);
    assert_eq!(sqlite_counts(&src).await, counts_before);
    let last: Option<i64> = sqlx::query_scalar("SELECT max(id) FROM events_history")
        .fetch_one(&admin)
        .await
        .expect("target history");
    let last_src: Option<i64> = sqlx::query_scalar("SELECT max(id) FROM events_history")
        .fetch_one(&src)
        .await
        .expect("source history");
    assert_eq!(last, last_src);
    // The sequences go on after the copied ids.
    let next: i64 =
        sqlx::query_scalar("SELECT nextval(pg_get_serial_sequence('events_history', 'id'))")
            .fetch_one(&admin)
            .await
            .expect("nextval");
    assert_eq!(Some(next - 1), last);
}
