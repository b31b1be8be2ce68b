//! A frozen daemon, with the real binary: two `nasd run` on one PostgreSQL, one of them
//! stopped with SIGSTOP for twice its lease. The other takes its NAS over once its lease
//! ran out and sends `daemon_lost` once; the frozen one, woken with SIGCONT, stops
//! everything, rejoins and sends `daemon_back` once; no command is sent under an epoch
//! older than one already seen on its NAS, and every event is delivered once.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::webhook::Receiver;
use common::{Backend, TestEnv, add_accounts, event, nas, wait_for};
use nasd::cluster::plan::owner_of;
use nasd::store::Store;

const N_NAS: i64 = 6;

fn spawn(dir: &Path, config: &Path) -> Child {
    std::fs::create_dir_all(dir).expect("daemon dir");
    let stderr = std::fs::File::create(dir.join("stderr")).expect("stderr file");
    Command::new(env!("CARGO_BIN_EXE_nasd"))
        .arg("--config")
        .arg(config)
        .arg("run")
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("start nasd run")
}

fn signal(child: &Child, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success(), "kill {sig}");
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

async fn owners(store: &Store) -> HashMap<i64, String> {
    store
        .nas_owners()
        .await
        .unwrap_or_default()
        .into_iter()
        .filter(|o| o.valid)
        .filter_map(|o| Some((o.nas_id, o.daemon_id?)))
        .collect()
}

fn expected(live: &[String]) -> HashMap<i64, String> {
    (1..=N_NAS)
        .map(|n| (n, owner_of(n, live).expect("owner").to_string()))
        .collect()
}

/// `nas daemon epoch event` per command the recorder script received.
fn received(path: &Path) -> Vec<(i64, String, i64, i64)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            assert_eq!(f.len(), 4, "line {l:?}");
            (
                f[0].parse().expect("nas"),
                f[1].to_string(),
                f[2].parse().expect("epoch"),
                f[3].parse().expect("event"),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_daemon_is_taken_over_reported_once_and_rejoins() {
    let env = TestEnv::new(Backend::Postgres).await;
    let receiver = Receiver::start().await;
    let log = env.path().join("received.log");
    let script = env.script(
        "rec.sh",
        &format!(
            "#!/bin/sh\necho \"$nas_id $daemon $nas_epoch $event_id\" >> {}\necho ok\n",
            log.display()
        ),
    );
    let store = env.store().await;
    for id in 1..=N_NAS {
        store
            .nas_upsert(&nas(id, Some(&script), None, 2))
            .await
            .expect("nas");
    }
    let ids: Vec<i64> = (1..=N_NAS).collect();
    add_accounts(&store, 60, &ids).await;
    let config = env.path().join("nasd.toml");
    std::fs::write(
        &config,
        format!(
            "[database]\nurl = \"{}\"\n[daemon]\nlog_dir = \"log\"\nresync_interval = \"1s\"\n\
             poll_interval = \"100ms\"\n[cluster]\nlease = \"3s\"\nheartbeat = \"300ms\"\n\
             [alerts]\nwebhooks = [\"http://{}/hook\"]\ncheck_interval = \"1h\"\n",
            env.url, receiver.addr
        ),
    )
    .expect("config");

    let mut a = spawn(&env.path().join("a"), &config);
    let mut b = spawn(&env.path().join("b"), &config);
    let host = hostname();
    let (id_a, id_b) = (format!("{host}:{}", a.id()), format!("{host}:{}", b.id()));
    let both = expected(&[id_a.clone(), id_b.clone()]);
    assert!(
        both.values().any(|d| *d == id_a) && both.values().any(|d| *d == id_b),
        "this test needs NAS on both daemons: {both:?}"
    );
    wait_for(
        Duration::from_secs(60),
        "NAS spread over both daemons",
        || async { owners(&store).await == both },
    )
    .await;
    let first: Vec<_> = (1..=60).map(|u| event("user_accept", u)).collect();
    store.enqueue_compact(&first).await.expect("enqueue");
    common::wait_history(&store, 60, Duration::from_secs(60)).await;

    // b freezes with events still coming: a takes its NAS once its lease ran out.
    signal(&b, "-STOP");
    let during: Vec<_> = (1..=60).map(|u| event("user_drop", u)).collect();
    store.enqueue_compact(&during).await.expect("enqueue");
    let only_a = expected(std::slice::from_ref(&id_a));
    wait_for(Duration::from_secs(60), "a owning every NAS", || async {
        owners(&store).await == only_a
    })
    .await;
    common::wait_history(&store, 120, Duration::from_secs(60)).await;
    // Twice the lease in all, then b wakes: it stops, rejoins, and gets its NAS back.
    tokio::time::sleep(Duration::from_secs(3)).await;
    signal(&b, "-CONT");
    wait_for(Duration::from_secs(60), "b back with its NAS", || async {
        owners(&store).await == both
    })
    .await;
    let last: Vec<_> = (1..=60).map(|u| event("user_accept", u)).collect();
    store.enqueue_compact(&last).await.expect("enqueue");
    common::wait_history(&store, 180, Duration::from_secs(60)).await;
    wait_for(Duration::from_secs(30), "both alerts delivered", || async {
        !receiver.hooks("daemon_lost").is_empty() && !receiver.hooks("daemon_back").is_empty()
    })
    .await;

    signal(&a, "-TERM");
    signal(&b, "-TERM");
    for child in [&mut a, &mut b] {
        let status = child.wait().expect("wait");
        assert!(status.success(), "daemon exit {status}");
    }

    // One alert each, naming the frozen daemon.
    let lost = receiver.hooks("daemon_lost");
    let back = receiver.hooks("daemon_back");
    assert_eq!(lost.len(), 1, "{lost:?}");
    assert_eq!(back.len(), 1, "{back:?}");
    assert_eq!(lost[0]["daemon"], id_b.as_str());
    assert_eq!(lost[0]["reporter"], id_a.as_str());
    assert_eq!(back[0]["daemon"], id_b.as_str());
    assert!(
        lost[0]["text"]
            .as_str()
            .is_some_and(|t| t.contains("is LOST")),
        "{lost:?}"
    );

    // Every event once; per NAS the epoch never goes back (no command from an owner
    // after its lease ended). The frozen daemon had nothing in flight when it froze:
    // the first 60 were all done.
    let got = received(&log);
    assert_eq!(got.len(), 180, "each event delivered once");
    let mut seen: HashMap<i64, i64> = HashMap::new();
    for (nas_id, daemon, epoch, event_id) in &got {
        let top = seen.entry(*nas_id).or_insert(0);
        assert!(
            *epoch >= *top,
            "nas {nas_id}: event {event_id} sent by {daemon} under epoch {epoch} after epoch {top}"
        );
        *top = *epoch;
    }
    let (done, failed) = store.history_counts().await.expect("counts");
    assert_eq!((done, failed), (180, 0));
    // The logs of both tell the story.
    let log_a = env.read("a/log/nas_event_daemon.log");
    let log_b = env.read("b/log/nas_event_daemon.log");
    assert!(
        log_a.contains(&format!("from daemon {id_b} (lease expired)")),
        "{log_a}"
    );
    assert!(log_b.contains("Lease lost: daemon"), "{log_b}");
    assert!(log_b.contains("Rejoined the cluster"), "{log_b}");
    assert!(log_a.contains(&format!("to daemon {id_b}")), "{log_a}");
}
