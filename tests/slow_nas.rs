//! A slow but healthy NAS with more workers than sessions (16 workers, `max_sessions` 2,
//! each command answered after 1 s), over SSH, telnet and the RouterOS API against the
//! simulator: runs queue inside nasd for a free session, the last ones for 7 s, well past
//! the 3 s connect timeout and the schemes' 3 s command timeout, and that wait is neither
//! a failed attempt nor an unreachable NAS. Every event is done at its first attempt, the
//! NAS is never marked down, and the device never sees more than 2 sessions. (3 s leaves
//! room for an SSH key exchange in a debug build on a busy machine; the waits are far
//! longer.)

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{Backend, TestEnv, add_accounts, event, wait_for};
use nasd::sim::SimOptions;
use nasd::store::{CompactEvent, Nas, Secret};
use tokio_util::sync::CancellationToken;

const EVENTS: i64 = 16;
const WORKERS: i32 = 16;
const MAX_SESSIONS: usize = 2;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// The shipped scheme with a 3 s command timeout (instead of 10 s), so a wait for a free
/// session would also overrun a deadline taken from the command timeout.
fn scheme_with_short_timeout(env: &TestEnv, name: &str) {
    let shipped = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("schemes")
        .join(name)
        .join("scheme.toml");
    let text = std::fs::read_to_string(&shipped).expect("shipped scheme");
    assert!(text.contains("\ntimeout = \"10s\"\n"), "{name}: {text}");
    env.scheme(
        name,
        &text.replace("\ntimeout = \"10s\"\n", "\ntimeout = \"3s\"\n"),
    );
}

#[derive(Clone, Copy, Debug)]
enum Protocol {
    Ssh,
    Telnet,
    Api,
}

async fn slow_nas_is_queued_for_not_marked_down(protocol: Protocol) {
    let env = TestEnv::new(Backend::Sqlite).await;
    let sim = nasd::sim::start(
        &SimOptions {
            latency: "1s".into(),
            max_sessions: MAX_SESSIONS,
            ..SimOptions::default()
        },
        CancellationToken::new(),
    )
    .await
    .expect("sim starts");
    let (scheme, addr) = match protocol {
        Protocol::Ssh => ("mikrotik-ssh", sim.ssh_addr),
        Protocol::Telnet => ("mikrotik-telnet", sim.telnet_addr),
        Protocol::Api => ("mikrotik-api", sim.api_addr),
    };
    scheme_with_short_timeout(&env, scheme);
    let store = env.store().await;
    let mut nas = Nas::new(1, "slow", &addr.ip().to_string());
    nas.scheme = Some(scheme.into());
    nas.port = Some(i32::from(addr.port()));
    nas.login = Some("admin".into());
    nas.password = Some(Secret::new("admin"));
    nas.n_workers = WORKERS;
    nas.max_sessions = MAX_SESSIONS as i32;
    nas.host_key_policy = "accept-new".into();
    store.nas_upsert(&nas).await.expect("nas");
    add_accounts(&store, EVENTS, &[1]).await;
    let events: Vec<CompactEvent> = (1..=EVENTS).map(|u| event("user_accept", u)).collect();
    store.enqueue_compact(&events).await.expect("enqueue");

    let mut cfg = env.config();
    cfg.daemon.transport.known_hosts = env.path().join("known_hosts");
    cfg.daemon.transport.connect_timeout = CONNECT_TIMEOUT;
    let breaker_failures = cfg.daemon.breaker.failures;
    assert!(breaker_failures > 0, "the breaker is on");
    let token = CancellationToken::new();
    let daemon = nasd::daemon::start(cfg, token.clone())
        .await
        .expect("daemon starts");
    let stats = daemon.stats.clone();
    let mut marked_down = false;
    wait_for(Duration::from_secs(120), "every event in history", || {
        // Sampled while it runs: a breaker that opened and closed again counts too.
        marked_down |= stats.get(1).is_some_and(|s| s.down_since.is_some());
        let store = store.clone();
        async move {
            let (done, failed) = store.history_counts().await.expect("history counts");
            done + failed >= EVENTS
        }
    })
    .await;
    let snapshot = stats.get(1).expect("figures of NAS 1");
    token.cancel();
    daemon.wait().await.expect("daemon stops");

    let history = store.history(None, 100).await.expect("history");
    assert_eq!(history.len(), EVENTS as usize);
    for row in &history {
        assert_eq!(
            (row.outcome.as_str(), row.attempts),
            ("done", 1),
            "{protocol:?}: every event done at its first attempt: {row:?}"
        );
    }
    let mut applied: Vec<String> = sim
        .device
        .state()
        .address_list
        .into_iter()
        .map(|e| e.address)
        .collect();
    applied.sort();
    applied.dedup();
    assert_eq!(applied.len(), EVENTS as usize, "{protocol:?}: {applied:?}");

    let daemon_log = env.read("log/nas_event_daemon.log");
    assert!(
        !daemon_log.contains("NAS down"),
        "{protocol:?}: the NAS was marked down:\n{daemon_log}"
    );
    assert!(!marked_down, "{protocol:?}: the breaker opened");
    assert_eq!(snapshot.consecutive_failures, 0, "{protocol:?}");
    assert_eq!(snapshot.down_since, None, "{protocol:?}");
    // Runs did queue for a session, and only two sessions were ever opened.
    assert!(snapshot.pool.waits > 0, "{protocol:?}: {:?}", snapshot.pool);
    assert_eq!(
        snapshot.pool.connects, 2,
        "{protocol:?}: {:?}",
        snapshot.pool
    );
    assert_eq!(snapshot.pool.connect_failures, 0, "{protocol:?}");

    let counters = sim.device.counters();
    assert!(
        counters.max_concurrent_sessions <= MAX_SESSIONS as u64,
        "{protocol:?}: {counters:?}"
    );
    assert_eq!(counters.sessions_refused, 0, "{protocol:?}: {counters:?}");
    assert_eq!(counters.commands_executed, EVENTS as u64, "{protocol:?}");
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh() {
    slow_nas_is_queued_for_not_marked_down(Protocol::Ssh).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telnet() {
    slow_nas_is_queued_for_not_marked_down(Protocol::Telnet).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api() {
    slow_nas_is_queued_for_not_marked_down(Protocol::Api).await;
}
