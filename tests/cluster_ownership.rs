//! Several daemons on one PostgreSQL, in one process (each with its own `[cluster]
//! name`): NAS spread by rendezvous hashing, a join moves only what the newcomer wins,
//! a stop hands everything over, and every event is sent once, by the owner of its NAS,
//! in per-account order. And the database fence itself: a claim under an epoch that
//! moved takes nothing, a takeover puts the old owner's running rows back to ready so
//! its late completion is discarded. The real-binary chaos test (kills, freezes,
//! restarts) is tests/cluster.rs.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::{Backend, TestEnv, add_accounts, event, nas, wait_for};
use nasd::cluster::plan::owner_of;
use nasd::config::Config;
use nasd::store::{Finish, Outcome, Store};
use tokio_util::sync::CancellationToken;

const N_NAS: i64 = 6;

/// One line per command the script received: `nas daemon epoch event user`.
fn recorder(log: &std::path::Path) -> String {
    format!(
        "#!/bin/sh\necho \"$nas_id $daemon $nas_epoch $event_id $user_id\" >> {}\necho ok\n",
        log.display()
    )
}

struct Line {
    nas: i64,
    daemon: String,
    epoch: i64,
    event: i64,
    user: i64,
}

fn lines(path: &std::path::Path) -> Vec<Line> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            assert_eq!(f.len(), 5, "recorder line {l:?}");
            Line {
                nas: f[0].parse().expect("nas"),
                daemon: f[1].to_string(),
                epoch: f[2].parse().expect("epoch"),
                event: f[3].parse().expect("event"),
                user: f[4].parse().expect("user"),
            }
        })
        .collect()
}

fn config(env: &TestEnv, name: &str) -> Config {
    let mut cfg = env.config();
    cfg.cluster.name = Some(name.to_string());
    cfg.cluster.lease = Duration::from_secs(3);
    cfg.cluster.heartbeat = Duration::from_millis(200);
    cfg.validate().expect("config");
    cfg
}

/// The valid owner of each NAS, as `nas_owner` says.
async fn owners(store: &Store) -> HashMap<i64, String> {
    store
        .nas_owners()
        .await
        .expect("owners")
        .into_iter()
        .filter(|o| o.valid)
        .filter_map(|o| Some((o.nas_id, o.daemon_id?)))
        .collect()
}

async fn wait_owners(store: &Store, want: &HashMap<i64, String>, what: &str) {
    wait_for(Duration::from_secs(30), what, || async {
        &owners(store).await == want
    })
    .await;
}

fn expected(live: &[&str]) -> HashMap<i64, String> {
    let live: Vec<String> = live.iter().map(|s| s.to_string()).collect();
    (1..=N_NAS)
        .map(|n| (n, owner_of(n, &live).expect("owner").to_string()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nas_are_spread_handed_over_and_sent_once_by_their_owner() {
    let env = TestEnv::new(Backend::Postgres).await;
    let log = env.path().join("received.log");
    let script = env.script("rec.sh", &recorder(&log));
    let store = env.store().await;
    for id in 1..=N_NAS {
        store
            .nas_upsert(&nas(id, Some(&script), None, 4))
            .await
            .expect("nas");
    }
    let ids: Vec<i64> = (1..=N_NAS).collect();
    add_accounts(&store, 60, &ids).await;

    // One daemon owns everything.
    let stop1 = CancellationToken::new();
    let d1 = nasd::daemon::start(config(&env, "d1"), stop1.clone())
        .await
        .expect("d1 starts");
    wait_owners(&store, &expected(&["d1"]), "d1 owning every NAS").await;
    let batch1: Vec<_> = (1..=60).map(|u| event("user_accept", u)).collect();
    store.enqueue_compact(&batch1).await.expect("enqueue");
    common::wait_history(&store, 60, Duration::from_secs(60)).await;

    // A second daemon joins: it takes exactly the NAS it wins, and nothing else moves.
    let stop2 = CancellationToken::new();
    let d2 = nasd::daemon::start(config(&env, "d2"), stop2.clone())
        .await
        .expect("d2 starts");
    let both = expected(&["d1", "d2"]);
    assert!(
        both.values().any(|d| d == "d1") && both.values().any(|d| d == "d2"),
        "the test needs NAS on both daemons: {both:?}"
    );
    wait_owners(&store, &both, "the NAS spread over d1 and d2").await;
    let batch2: Vec<_> = (1..=60)
        .flat_map(|u| [event("user_drop", u), event("user_accept", u)])
        .collect();
    store.enqueue_compact(&batch2).await.expect("enqueue");
    common::wait_history(&store, 180, Duration::from_secs(60)).await;

    // d2 stops: its NAS are handed over to d1, which sends what comes next.
    stop2.cancel();
    d2.wait().await.expect("d2 stops");
    wait_owners(&store, &expected(&["d1"]), "d1 owning every NAS again").await;
    let batch3: Vec<_> = (1..=60).map(|u| event("user_drop", u)).collect();
    store.enqueue_compact(&batch3).await.expect("enqueue");
    common::wait_history(&store, 240, Duration::from_secs(60)).await;
    stop1.cancel();
    d1.wait().await.expect("d1 stops");

    // Every event exactly once, each account's events in id order, and every command
    // sent by the daemon that owned its NAS at that phase.
    let got = lines(&log);
    assert_eq!(got.len(), 240, "each event sent once");
    let unique: HashSet<i64> = got.iter().map(|l| l.event).collect();
    assert_eq!(unique.len(), 240, "no event sent twice");
    let mut per_user: HashMap<i64, Vec<i64>> = HashMap::new();
    for l in &got {
        per_user.entry(l.user).or_default().push(l.event);
    }
    for (user, events) in &per_user {
        let mut sorted = events.clone();
        sorted.sort_unstable();
        assert_eq!(events, &sorted, "account {user} in order");
    }
    let (first, rest) = got.split_at(60);
    assert!(first.iter().all(|l| l.daemon == "d1"));
    let (second, third) = rest.split_at(120);
    for l in second {
        assert_eq!(l.daemon, both[&l.nas], "nas {} in phase 2", l.nas);
    }
    assert!(third.iter().all(|l| l.daemon == "d1"));
    // A NAS d2 had came back to d1 under a higher epoch than d1 held it before.
    for l in third {
        if both[&l.nas] == "d2" {
            let before = first
                .iter()
                .filter(|f| f.nas == l.nas)
                .map(|f| f.epoch)
                .max()
                .unwrap_or(0);
            assert!(
                l.epoch > before + 1,
                "nas {} epoch {} after {before}",
                l.nas,
                l.epoch
            );
        }
    }
    // The logs tell the story.
    let daemon_log = env.read("log/nas_event_daemon.log");
    assert!(
        daemon_log.contains("Hand over nas nasid="),
        "handover logged:\n{daemon_log}"
    );
    assert!(
        daemon_log.contains("from daemon d2 (released)"),
        "{daemon_log}"
    );
    let members = store.cluster_members().await.expect("members");
    assert_eq!(
        members
            .iter()
            .map(|m| (m.id.as_str(), m.state.as_str()))
            .collect::<Vec<_>>(),
        vec![("d1", "left"), ("d2", "left")]
    );
}

/// Ends a daemon's lease now, as if it had stopped renewing it (the call a daemon makes
/// for a dead daemon of its own host).
async fn expire(store: &Store, id: &str) {
    let ended = store
        .cluster_expire(&[id.to_string()])
        .await
        .expect("expire lease");
    assert_eq!(ended, vec![id.to_string()], "lease of {id} ended");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_ownership_claims_nothing_and_its_late_result_is_discarded() {
    let env = TestEnv::new(Backend::Postgres).await;
    let store = env.store().await;
    store
        .nas_upsert(&nas(1, None, Some("demo-exec"), 4))
        .await
        .expect("nas");
    add_accounts(&store, 2, &[1]).await;
    let lease = Duration::from_secs(30);
    for (id, session) in [("old", 11), ("new", 22)] {
        store
            .cluster_join(id, session, None, "host", 1, None, lease)
            .await
            .expect("join");
    }
    let taken = store.cluster_take("old", 11, &[1]).await.expect("take");
    assert_eq!(taken.len(), 1);
    assert_eq!((taken[0].epoch, taken[0].why.as_str()), (1, "free"));
    // Held by a live daemon: nobody else takes it.
    assert!(
        store
            .cluster_take("new", 22, &[1])
            .await
            .expect("take")
            .is_empty()
    );

    store
        .enqueue_compact(&[event("user_accept", 1), event("user_accept", 2)])
        .await
        .expect("enqueue");
    store
        .expand(nasd::config::DEFAULT_PARAMS_QUERY, 100)
        .await
        .expect("expand");
    let rows = store.load_windows(&[(1, 0, 10)]).await.expect("load");
    let (a, b) = (rows[0].id, rows[1].id);
    let now = chrono::Utc::now();
    let later = now + chrono::Duration::seconds(60);
    // The owner claims under its epoch; a wrong epoch takes nothing.
    assert!(
        store
            .claim(&[(b, 7, 5)], now, later)
            .await
            .expect("claim")
            .is_empty()
    );
    let claimed = store.claim(&[(a, 7, 1)], now, later).await.expect("claim");
    assert_eq!(claimed.len(), 1);

    // Its lease runs out; the other daemon takes the NAS under epoch 2, and the row
    // the old owner left running is ready again.
    expire(&store, "old").await;
    let taken = store.cluster_take("new", 22, &[1]).await.expect("take");
    assert_eq!(taken.len(), 1);
    assert_eq!(
        (
            taken[0].epoch,
            taken[0].from.as_deref(),
            taken[0].why.as_str(),
            taken[0].reset
        ),
        (2, Some("old"), "lease expired", 1)
    );
    assert_eq!(
        store
            .cluster_mark_lost(&["old".to_string()])
            .await
            .expect("mark"),
        vec!["old".to_string()]
    );
    // Marked once: a second taker does not raise the alert again.
    assert!(
        store
            .cluster_mark_lost(&["old".to_string()])
            .await
            .expect("mark")
            .is_empty()
    );
    // The old owner, late: its claim under epoch 1 takes nothing, and its result for
    // the event it had claimed is discarded (its claim token is gone).
    assert!(
        store
            .claim(&[(b, 7, 1)], now, later)
            .await
            .expect("claim")
            .is_empty()
    );
    let finish = Finish {
        id: a,
        claim_token: 7,
        outcome: Outcome::Done,
        commands: vec![],
        answer: String::new(),
        error: None,
        duration_ms: 1,
    };
    assert!(
        store
            .complete(std::slice::from_ref(&finish), &[], now)
            .await
            .expect("complete")
            .is_empty()
    );
    // The new owner claims both under epoch 2.
    let claimed = store
        .claim(&[(a, 9, 2), (b, 9, 2)], now, later)
        .await
        .expect("claim");
    assert_eq!(claimed.len(), 2);
    // The daemon list shows who is who.
    let members = store.cluster_members().await.expect("members");
    let states: Vec<(&str, &str, i64)> = members
        .iter()
        .map(|m| (m.id.as_str(), m.state.as_str(), m.owned))
        .collect();
    assert_eq!(states, vec![("new", "live", 1), ("old", "lost", 0)]);
}
