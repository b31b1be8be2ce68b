//! The whole pipeline over RADIUS CoA / Disconnect to a pyrad NAS with the shipped
//! `mikrotik-coa` scheme: what the NAS decoded, ACK = done, NAK Resources-Unavailable =
//! retried until max_attempts.

mod common;

use std::time::Duration;

use common::pyrad::{PyradNas, SECRET};
use common::{Backend, TestEnv, wait_history};
use nasd::store::{AccountRecord, CompactEvent, Nas, Secret};
use tokio_util::sync::CancellationToken;

async fn coa_through_the_pipeline(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let peer = PyradNas::start();
    let store = env.store().await;
    let mut nas = Nas::new(1, "Ros CoA", "127.0.0.1");
    nas.scheme = Some("mikrotik-coa".into());
    nas.port = Some(i32::from(peer.port));
    nas.secret = Some(Secret::new(SECRET));
    nas.n_workers = 8;
    store.nas_upsert(&nas).await.unwrap();
    let headers: Vec<String> = [
        "user_id",
        "abonent_id",
        "nas_id",
        "login",
        "rate_in",
        "rate_out",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let row = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let accounts = vec![
        AccountRecord::from_fields(&headers, &row(&["1", "11", "1", "alice", "10240", "5120"]))
            .unwrap(),
        AccountRecord::from_fields(
            &headers,
            &row(&["2", "12", "1", "nak-busy", "1024", "1024"]),
        )
        .unwrap(),
        AccountRecord::from_fields(
            &headers,
            &row(&["3", "13", "1", "nak-gone", "1024", "1024"]),
        )
        .unwrap(),
    ];
    store.accounts_upsert(&accounts).await.unwrap();
    let ev = |cmd: &str, user: i64, session: &str| CompactEvent {
        cmd: cmd.into(),
        user_id: user,
        acct_session_id: Some(session.into()),
        ..Default::default()
    };
    store
        .enqueue_compact(&[
            ev("user_rate_set", 1, "81200001"),
            ev("user_rate_set", 2, "81200002"),
            ev("user_drop", 3, "81200003"),
            ev("user_drop", 1, "81200001"),
        ])
        .await
        .unwrap();
    let mut cfg = env.config();
    cfg.daemon.schemes_dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("schemes");
    cfg.daemon.max_attempts = 2;
    cfg.daemon.transport.radius_timeout = Duration::from_millis(300);
    let token = CancellationToken::new();
    let handle = tokio::spawn(nasd::daemon::run(cfg, token.clone()));
    wait_history(&store, 4, Duration::from_secs(30)).await;
    token.cancel();
    handle.await.unwrap().unwrap();

    let history = store.history(None, 10).await.unwrap();
    let find = |user: i64, cmd: &str| {
        history
            .iter()
            .find(|h| h.user_id == user && h.cmd == cmd)
            .unwrap()
    };
    let rate = find(1, "user_rate_set");
    assert_eq!(rate.outcome, "done");
    assert!(rate.answer.starts_with("CoA-ACK"), "{}", rate.answer);
    assert!(
        rate.commands[0].contains("Mikrotik-Rate-Limit = \"10240k/5120k\"")
            || rate.commands[0].contains("Mikrotik-Rate-Limit = 10240k/5120k"),
        "{:?}",
        rate.commands
    );
    assert!(
        !rate.commands[0].contains(SECRET),
        "the secret is not in the logged line"
    );
    let busy = find(2, "user_rate_set");
    assert_eq!(busy.outcome, "failed");
    assert_eq!(busy.attempts, 2);
    assert!(
        busy.error
            .as_deref()
            .unwrap_or_default()
            .contains("gave up after 2 attempts"),
        "{:?}",
        busy.error
    );
    // A Disconnect NAK Session-Context-Not-Found means the session is already gone: done.
    assert_eq!(find(3, "user_drop").outcome, "done");
    assert_eq!(find(1, "user_drop").outcome, "done");

    // What the NAS decoded, in order for account 1: the rate change, then the disconnect.
    let records = peer.records();
    let alice: Vec<&serde_json::Value> = records
        .iter()
        .filter(|r| r.to_string().contains("alice"))
        .collect();
    assert_eq!(alice.len(), 2, "{records:#?}");
    let first = alice[0].to_string();
    assert!(
        first.contains("Mikrotik-Rate-Limit")
            && first.contains("10240k/5120k")
            && first.contains("81200001"),
        "{first}"
    );
    assert!(
        alice.iter().all(|r| r["ma_ok"] == true),
        "Message-Authenticator verified by the NAS"
    );
    assert_eq!(
        alice[1]["code"], 40,
        "Disconnect-Request second: {}",
        alice[1]
    );
    let nas_log =
        std::fs::read_to_string(env.log_dir().join("nas_event_daemon/Ros_CoA_127.0.0.1.log"))
            .unwrap();
    assert!(nas_log.contains("radclient") && !nas_log.contains(SECRET));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_coa_through_the_pipeline() {
    coa_through_the_pipeline(Backend::Sqlite).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_coa_through_the_pipeline() {
    coa_through_the_pipeline(Backend::Postgres).await
}
