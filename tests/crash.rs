//! A daemon killed with SIGKILL mid-run loses nothing: after a restart every event is
//! delivered, per-account order holds, and only events in flight at the kill are sent
//! twice. Runs the real `nasd` binary as a child process.

mod common;

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{Backend, TestEnv, add_accounts, event, nas, recorder_script, wait_for, wait_history};

fn spawn_daemon(config: &std::path::Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_nasd"))
        .arg("--config")
        .arg(config)
        .arg("run")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start nasd")
}

async fn kill_mid_run(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let store = env.store().await;
    let log = env.path().join("attempts.log");
    let script = env.script("rec.sh", &recorder_script(&log, 5, ""));
    let workers = 8;
    store
        .nas_upsert(&nas(1, Some(&script), None, workers))
        .await
        .unwrap();
    let accounts = 50;
    add_accounts(&store, accounts, &[1]).await;
    let n_events: i64 = 1500;
    let events: Vec<_> = (0..n_events)
        .map(|i| {
            event(
                ["user_add", "user_drop", "user_accept"][(i % 3) as usize],
                1 + i % accounts,
            )
        })
        .collect();
    for chunk in events.chunks(500) {
        store.enqueue_compact(chunk).await.unwrap();
    }
    let config = env.path().join("nasd.toml");
    std::fs::write(
        &config,
        format!(
            "[database]\nurl = \"{}\"\n[daemon]\nlog_dir = \"{}\"\nschemes_dir = \"{}\"\n\
             resync_interval = \"500ms\"\npoll_interval = \"50ms\"\nretry_base = \"20ms\"\n\
             retry_cap = \"100ms\"\nlease = \"2s\"\nmax_attempts = 50\n",
            env.url,
            env.log_dir().display(),
            env.schemes_dir().display()
        ),
    )
    .unwrap();

    let mut kills = 0;
    let mut child = spawn_daemon(&config);
    for threshold in [200, 600, 1000] {
        wait_for(
            Duration::from_secs(120),
            "progress before the kill",
            || async {
                let (done, failed) = store.history_counts().await.unwrap();
                done + failed >= threshold
            },
        )
        .await;
        child.kill().expect("SIGKILL");
        child.wait().expect("reap");
        kills += 1;
        child = spawn_daemon(&config);
    }
    wait_history(&store, n_events, Duration::from_secs(240)).await;
    child.kill().ok();
    child.wait().ok();
    assert_eq!(kills, 3);

    let history = store.history(None, n_events * 2).await.unwrap();
    assert_eq!(
        history.len() as i64,
        n_events,
        "every event reached history once"
    );
    assert!(history.iter().all(|h| h.outcome == "done"));
    let count = store.stack_count().await.unwrap();
    assert_eq!((count.compact_total, count.stack_total), (0, 0));

    // Per account, successful deliveries follow event id order; a repeat may only be the
    // same event again right after itself (it was in flight at a kill).
    let mut sorted = history.clone();
    sorted.sort_by_key(|h| h.event_id);
    let mut expected: HashMap<i64, Vec<i64>> = HashMap::new();
    for h in &sorted {
        expected
            .entry(h.user_id)
            .or_default()
            .push(h.event_id.unwrap());
    }
    let mut delivered: HashMap<i64, Vec<i64>> = HashMap::new();
    for line in env.read("attempts.log").lines() {
        let f: Vec<&str> = line.split(' ').collect();
        if f[4] == "ok" {
            delivered
                .entry(f[0].parse().unwrap())
                .or_default()
                .push(f[1].parse().unwrap());
        }
    }
    let mut duplicates = 0;
    for (user, got) in &delivered {
        let mut dedup = got.clone();
        dedup.dedup();
        duplicates += got.len() - dedup.len();
        assert_eq!(
            &dedup, &expected[user],
            "account {user}: order or completeness broken"
        );
    }
    assert!(
        duplicates <= kills * workers as usize,
        "{duplicates} duplicates for {kills} kills with {workers} in flight at most"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_kill_9_loses_nothing() {
    kill_mid_run(Backend::Postgres).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_kill_9_loses_nothing() {
    kill_mid_run(Backend::Sqlite).await
}
