//! The shipped `cisco-ios` scheme through the whole pipeline to a Cisco IOS emulation
//! nobody on this project wrote (fake-switches, over SSH in a PTY session with enable).

mod common;

use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Backend, TestEnv, wait_history};
use nasd::store::{AccountRecord, CompactEvent, Nas, Secret};
use tokio_util::sync::CancellationToken;

struct FakeCisco(std::process::Child);

impl Drop for FakeCisco {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cisco_ios_scheme_against_fake_switches() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let _switch = FakeCisco(
        Command::new(root.join(".venv-peers/bin/python"))
            .arg(root.join("tests/peers/ssh/fake_cisco.py"))
            .arg(port.to_string())
            .arg("root")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("fake-switches (bash scripts/test-setup.sh)"),
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "fake-switches did not start"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let env = TestEnv::new(Backend::Sqlite).await;
    let store = env.store().await;
    let mut nas = Nas::new(1, "cisco", "127.0.0.1");
    nas.scheme = Some("cisco-ios".into());
    nas.port = Some(i32::from(port));
    nas.login = Some("root".into());
    nas.password = Some(Secret::new("root"));
    nas.secret = Some(Secret::new("root"));
    nas.host_key_policy = "accept-new".into();
    nas.max_sessions = 1;
    store.nas_upsert(&nas).await.unwrap();
    let headers: Vec<String> = ["user_id", "abonent_id", "nas_id", "login", "vlan"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let row = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    store
        .accounts_upsert(&[
            AccountRecord::from_fields(&headers, &row(&["1", "11", "1", "alice", "101"])).unwrap(),
            AccountRecord::from_fields(&headers, &row(&["2", "12", "1", "bob", "102"])).unwrap(),
        ])
        .await
        .unwrap();
    let ev = |cmd: &str, user: i64| CompactEvent {
        cmd: cmd.into(),
        user_id: user,
        ..Default::default()
    };
    store
        .enqueue_compact(&[ev("user_add", 1), ev("user_add", 2), ev("user_drop", 2)])
        .await
        .unwrap();
    let mut cfg = env.config();
    cfg.daemon.schemes_dir = root.join("schemes");
    cfg.daemon.transport.known_hosts = env.path().join("known_hosts");
    let token = CancellationToken::new();
    let handle = tokio::spawn(nasd::daemon::run(cfg, token.clone()));
    wait_history(&store, 3, Duration::from_secs(60)).await;
    // user_info jumps the queue of its account, so ask only once the changes are done.
    store
        .enqueue_compact(&[ev("user_info", 1), ev("user_info", 2)])
        .await
        .unwrap();
    wait_history(&store, 5, Duration::from_secs(60)).await;
    token.cancel();
    handle.await.unwrap().unwrap();
    let history = store.history(None, 10).await.unwrap();
    assert!(history.iter().all(|h| h.outcome == "done"), "{history:#?}");
    let info = |user: i64| {
        history
            .iter()
            .find(|h| h.user_id == user && h.cmd == "user_info")
            .map(|h| h.answer.clone())
            .unwrap_or_default()
    };
    // The running config the emulated switch reports is the state the events built.
    assert!(
        info(1).contains("interface Vlan101") && info(1).contains("description crb_alice_1"),
        "{}",
        info(1)
    );
    assert!(
        !info(1).contains(" shutdown\n") || info(1).contains("no shutdown"),
        "{}",
        info(1)
    );
    assert!(
        info(2).contains("description crb_bob_2") && info(2).contains(" shutdown"),
        "{}",
        info(2)
    );
}
