//! The whole pipeline over SSH to a real OpenSSH sshd whose ForceCommand records what
//! arrives: commands arrive once and in order per account, connections stay within
//! max_sessions (counted on the server side), a changed host key sends nothing, and a
//! dropped connection loses nothing.

#[macro_use]
mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::sshd::Sshd;
use common::{Backend, TestEnv, add_accounts, event, wait_for, wait_history};
use nasd::config::Config;
use nasd::store::{CompactEvent, Nas, Store};
use tokio_util::sync::CancellationToken;

fn ssh_nas(sshd: &Sshd, workers: i32, max_sessions: i32, policy: &str) -> Nas {
    let mut nas = Nas::new(1, "Ros SSH", "127.0.0.1");
    nas.scheme = Some("mikrotik-ssh".into());
    nas.port = Some(i32::from(sshd.port));
    nas.login = Some(common::sshd::USER.into());
    nas.n_workers = workers;
    nas.max_sessions = max_sessions;
    nas.host_key_policy = policy.into();
    nas
}

fn config(env: &TestEnv, sshd: &Sshd) -> Config {
    let mut cfg = env.config();
    cfg.daemon.schemes_dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("schemes");
    cfg.daemon.transport.known_hosts = env.path().join("known_hosts");
    cfg.daemon.transport.ssh_key = Some(sshd.client_key.clone());
    // Every event is to reach the device: runs of one `[coalesce]` group are not merged
    // (tests/coalesce.rs covers that).
    cfg.daemon.coalesce = false;
    cfg
}

/// Account i's address as the tests' accounts have it (see common::add_accounts).
fn ip_of(user: i64) -> String {
    format!("10.88.{}.{}", user / 250, user % 250 + 1)
}

async fn start(
    cfg: Config,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<anyhow::Result<()>>,
) {
    let token = CancellationToken::new();
    (token.clone(), tokio::spawn(nasd::daemon::run(cfg, token)))
}

/// Commands per account as the recorder saw them, in arrival order.
fn per_account(sshd: &Sshd, accounts: i64) -> HashMap<i64, Vec<String>> {
    let mut out: HashMap<i64, Vec<String>> = HashMap::new();
    let ips: HashMap<String, i64> = (1..=accounts)
        .map(|u| (format!("crb_{}", ip_of(u)), u))
        .collect();
    for (_, cmd) in sshd.received() {
        let user = ips
            .iter()
            .find(|(tag, _)| {
                cmd.split_whitespace()
                    .any(|w| w.ends_with(tag.as_str()) || w.contains(&format!("{}]", tag)))
            })
            .map(|(_, u)| *u);
        if let Some(u) = user {
            out.entry(u).or_default().push(cmd);
        }
    }
    out
}

/// What each account should have received: its events in id order, rendered.
async fn expected(store: &Store, accounts: i64) -> HashMap<i64, Vec<String>> {
    let (schemes, _) = nasd::scheme::SchemeSet::load_dir(
        &std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("schemes"),
    );
    let scheme = schemes.get("mikrotik-ssh").expect("mikrotik-ssh");
    let mut history = store.history(None, 100_000).await.expect("history");
    history.sort_by_key(|h| h.event_id);
    let mut out: HashMap<i64, Vec<String>> = HashMap::new();
    for h in history {
        assert!(h.user_id <= accounts);
        let mut vars = nasd::scheme::Vars::new();
        vars.insert("ip".into(), ip_of(h.user_id).into());
        vars.insert("rate_in".into(), 10240.into());
        vars.insert("rate_out".into(), 5120.into());
        out.entry(h.user_id)
            .or_default()
            .extend(scheme.render(&h.cmd, &vars).expect("render"));
    }
    out
}

const CMDS: [&str; 6] = [
    "user_add",
    "user_rate_set",
    "user_drop",
    "user_accept",
    "user_redirect",
    "user_redirect_cancel",
];

async fn commands_arrive_once_in_order(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let sshd = Sshd::start(&env.path().join("sshd"), "");
    let store = env.store().await;
    store
        .nas_upsert(&ssh_nas(&sshd, 8, 3, "accept-new"))
        .await
        .unwrap();
    let accounts = 30;
    add_accounts(&store, accounts, &[1]).await;
    let events: Vec<CompactEvent> = (0..300)
        .map(|i| event(CMDS[(i / 7 % 6) as usize], 1 + (i * 13) % accounts))
        .collect();
    store.enqueue_compact(&events).await.unwrap();
    let (token, handle) = start(config(&env, &sshd)).await;
    wait_history(&store, 300, Duration::from_secs(120)).await;
    token.cancel();
    handle.await.unwrap().unwrap();
    let history = store.history(None, 1000).await.unwrap();
    assert!(
        history.iter().all(|h| h.outcome == "done"),
        "{:?}",
        history.iter().find(|h| h.outcome != "done")
    );
    let got = per_account(&sshd, accounts);
    let want = expected(&store, accounts).await;
    for u in 1..=accounts {
        assert_eq!(
            got.get(&u),
            want.get(&u),
            "account {u}: commands differ (order, loss or repeat)"
        );
    }
    let ports: HashSet<u16> = sshd.received().iter().map(|(p, _)| *p).collect();
    assert!(
        !ports.is_empty() && ports.len() <= 3,
        "{} connections for max_sessions 3",
        ports.len()
    );
    let nas_log =
        std::fs::read_to_string(env.log_dir().join("nas_event_daemon/Ros_SSH_127.0.0.1.log"))
            .unwrap();
    assert!(nas_log.contains(
        "send: /ip firewall address-list add list=allowed address=10.88.0.2 comment=crb_10.88.0.2"
    ));
}

async fn changed_host_key_sends_nothing(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let mut sshd = Sshd::start(&env.path().join("sshd"), "");
    let store = env.store().await;
    store
        .nas_upsert(&ssh_nas(&sshd, 2, 2, "accept-new"))
        .await
        .unwrap();
    add_accounts(&store, 2, &[1]).await;
    let mut cfg = config(&env, &sshd);
    cfg.daemon.max_attempts = 2;
    // A refused host key makes the attempt unreachable; by default the circuit breaker
    // then holds the event until the key is fixed (tests/alerts.rs covers that). Here
    // the attempts count, so the event fails and its error can be read back.
    cfg.daemon.breaker.hold_attempts = false;
    store
        .enqueue_compact(&[event("user_add", 1)])
        .await
        .unwrap();
    let (token, handle) = start(cfg).await;
    wait_history(&store, 1, Duration::from_secs(30)).await;
    let learned = std::fs::read_to_string(env.path().join("known_hosts")).unwrap();
    assert!(
        learned.contains(&format!("[127.0.0.1]:{}", sshd.port)),
        "{learned}"
    );
    let old_fp = sshd.fingerprint();
    let before = sshd.received().len();
    sshd.restart(true);
    let new_fp = sshd.fingerprint();
    assert_ne!(old_fp, new_fp);
    store
        .enqueue_compact(&[event("user_drop", 2)])
        .await
        .unwrap();
    wait_history(&store, 2, Duration::from_secs(30)).await;
    token.cancel();
    handle.await.unwrap().unwrap();
    assert_eq!(
        sshd.received().len(),
        before,
        "nothing reached the device with a changed key: {:?} {:?}",
        sshd.received(),
        store.history(None, 10).await.unwrap()
    );
    let h = store.history(Some(2), 10).await.unwrap();
    assert_eq!(h[0].outcome, "failed");
    let why = h[0].error.clone().unwrap_or_default();
    assert!(
        why.contains("host key changed") && why.contains(&old_fp) && why.contains(&new_fp),
        "{why}"
    );
}

async fn dropped_connection_loses_nothing(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let mut sshd = Sshd::start(&env.path().join("sshd"), "0.05");
    let store = env.store().await;
    let max_sessions = 3;
    store
        .nas_upsert(&ssh_nas(&sshd, 6, max_sessions, "accept-new"))
        .await
        .unwrap();
    let accounts = 12;
    add_accounts(&store, accounts, &[1]).await;
    let n = 120;
    let events: Vec<CompactEvent> = (0..n)
        .map(|i| event(CMDS[(i % 6) as usize], 1 + i % accounts))
        .collect();
    store.enqueue_compact(&events).await.unwrap();
    let mut cfg = config(&env, &sshd);
    cfg.daemon.max_attempts = 30;
    let (token, handle) = start(cfg).await;
    wait_for(Duration::from_secs(60), "some progress", || async {
        store.history_counts().await.unwrap().0 >= 30
    })
    .await;
    // Cut every connection while a command is provably in flight: the recorder has
    // received it and holds its answer.
    sshd.hold_next_command(Duration::from_secs(30)).await;
    sshd.stop();
    sshd.release();
    sshd.restart(false);
    wait_history(&store, n, Duration::from_secs(120)).await;
    token.cancel();
    handle.await.unwrap().unwrap();
    let history = store.history(None, 1000).await.unwrap();
    assert!(history.iter().all(|h| h.outcome == "done"));
    assert!(
        history.iter().any(|h| h.attempts > 1),
        "the drop interrupted something"
    );
    let got = per_account(&sshd, accounts);
    let events = expected_events(&store, accounts).await;
    let mut repeats = 0;
    for u in 1..=accounts {
        let got = got.get(&u).cloned().unwrap_or_default();
        let events = events.get(&u).cloned().unwrap_or_default();
        let wanted: usize = events.iter().map(|(c, _)| c.len()).sum();
        assert!(
            explains(&got, &events, 0, 0, &mut HashSet::new()),
            "account {u}: the commands received are not the events in order with retries of the interrupted ones: {got:#?}"
        );
        repeats += got.len() - wanted;
    }
    assert!(
        repeats <= 4 * max_sessions as usize,
        "{repeats} repeated commands"
    );
}

/// Whether `got[k..]` is the events from `e` on, each sent by up to its attempt count of
/// tries where every try but the last sent a prefix of its commands (a dropped session
/// cut it short) and the last sent them all.
fn explains(
    got: &[String],
    events: &[(Vec<String>, i32)],
    k: usize,
    e: usize,
    failed: &mut HashSet<(usize, usize)>,
) -> bool {
    if e == events.len() {
        return k == got.len();
    }
    if failed.contains(&(k, e)) {
        return false;
    }
    let (cmds, attempts) = &events[e];
    // Try every split of the stream into (attempts - 1) or fewer cut-short tries followed
    // by the full command list.
    let mut starts = vec![k];
    let mut seen = HashSet::new();
    for _ in 0..*attempts {
        let mut next = Vec::new();
        for &at in &starts {
            if !seen.insert(at) {
                continue;
            }
            if got.len() >= at + cmds.len()
                && got[at..at + cmds.len()] == cmds[..]
                && explains(got, events, at + cmds.len(), e + 1, failed)
            {
                return true;
            }
            for p in 1..=cmds.len() {
                if got.len() >= at + p && got[at..at + p] == cmds[..p] {
                    next.push(at + p);
                }
            }
        }
        starts = next;
    }
    failed.insert((k, e));
    false
}

/// Each account's events in id order: the commands they render to and their attempts.
async fn expected_events(store: &Store, accounts: i64) -> HashMap<i64, Vec<(Vec<String>, i32)>> {
    let (schemes, _) = nasd::scheme::SchemeSet::load_dir(
        &std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("schemes"),
    );
    let scheme = schemes.get("mikrotik-ssh").expect("mikrotik-ssh");
    let mut history = store.history(None, 100_000).await.expect("history");
    history.sort_by_key(|h| h.event_id);
    let mut out: HashMap<i64, Vec<(Vec<String>, i32)>> = HashMap::new();
    for h in history {
        assert!(h.user_id <= accounts);
        let mut vars = nasd::scheme::Vars::new();
        vars.insert("ip".into(), ip_of(h.user_id).into());
        vars.insert("rate_in".into(), 10240.into());
        vars.insert("rate_out".into(), 5120.into());
        let cmds = scheme.render(&h.cmd, &vars).expect("render");
        out.entry(h.user_id).or_default().push((cmds, h.attempts));
    }
    out
}

/// An encrypted client key, its passphrase from a file named by
/// `ssh_key_passphrase_file`: the daemon logs in with it and the command arrives.
async fn encrypted_key_with_its_passphrase_from_a_file(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let sshd = Sshd::start(&env.path().join("sshd"), "");
    let passphrase = "S3cr3t-key-passphrase-41";
    let status = std::process::Command::new("ssh-keygen")
        .args(["-q", "-p", "-P", "", "-N", passphrase, "-f"])
        .arg(&sshd.client_key)
        .status()
        .expect("ssh-keygen -p");
    assert!(status.success(), "ssh-keygen -p: {status}");
    let pass_file = env.path().join("key.pass");
    std::fs::write(&pass_file, format!("{passphrase}\n")).unwrap();
    let parsed = Config::from_toml(&format!(
        "[transport]\nssh_key_passphrase_file = \"{}\"\n",
        pass_file.display()
    ))
    .expect("config");
    let store = env.store().await;
    store
        .nas_upsert(&ssh_nas(&sshd, 1, 1, "accept-new"))
        .await
        .unwrap();
    add_accounts(&store, 1, &[1]).await;
    let mut cfg = config(&env, &sshd);
    cfg.daemon.transport.ssh_key_passphrase = parsed.daemon.transport.ssh_key_passphrase;
    store
        .enqueue_compact(&[event("user_add", 1)])
        .await
        .unwrap();
    let (token, handle) = start(cfg).await;
    wait_history(&store, 1, Duration::from_secs(60)).await;
    token.cancel();
    handle.await.unwrap().unwrap();
    let h = store.history(None, 10).await.unwrap();
    assert_eq!(h[0].outcome, "done", "{:?}", h[0].error);
    assert!(
        sshd.received()
            .iter()
            .any(|(_, cmd)| cmd.contains("address=10.88.0.2")),
        "{:?}",
        sshd.received()
    );
    let daemon_log = std::fs::read_to_string(env.log_dir().join("nas_event_daemon.log")).unwrap();
    assert!(!daemon_log.contains(passphrase));
}

both_backends!(
    encrypted_key_with_its_passphrase_from_a_file,
    commands_arrive_once_in_order,
    changed_host_key_sends_nothing,
    dropped_connection_loses_nothing,
);
