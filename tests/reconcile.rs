//! Reconciliation against the simulator (SSH and the RouterOS API, both databases):
//! entries removed, added and changed by hand on the NAS are found by `reconcile`
//! exactly, `apply` fixes them through the pipeline (history rows, the simulator's
//! state), and a second run finds nothing but the stray entry it must leave alone.

#[macro_use]
mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{Backend, TestEnv, wait_for};
use nasd::reconcile::{Context, Request};
use nasd::scheme::state::Kind;
use nasd::sim::SimOptions;
use nasd::store::{AccountRecord, Nas, Secret, Store};
use tokio_util::sync::CancellationToken;

const ACCOUNTS: i64 = 40;

fn ip_of(user: i64) -> String {
    format!("10.88.{}.{}", user / 250, user % 250 + 1)
}

fn blocked(user: i64) -> bool {
    user % 5 == 0
}

fn negbal(user: i64) -> bool {
    user % 7 == 0
}

/// Accounts 1..=ACCOUNTS on NAS 1, with `blocked` and `negbal` in their extra columns
/// (as a CSV import gives them: text).
async fn add_accounts(store: &Store) {
    let headers: Vec<String> = [
        "user_id",
        "abonent_id",
        "nas_id",
        "login",
        "ip",
        "rate_in",
        "rate_out",
        "blocked",
        "negbal",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let records: Vec<AccountRecord> = (1..=ACCOUNTS)
        .map(|u| {
            let values = vec![
                u.to_string(),
                (1000 + u).to_string(),
                "1".into(),
                format!("user{u}"),
                ip_of(u),
                "10240".into(),
                "5120".into(),
                if blocked(u) { "1" } else { "0" }.into(),
                if negbal(u) { "yes" } else { "no" }.into(),
            ];
            AccountRecord::from_fields(&headers, &values).expect("account")
        })
        .collect();
    store.accounts_upsert(&records).await.expect("accounts");
}

/// What the NAS should hold, as RouterOS CLI lines that create it.
fn expected_lines() -> Vec<String> {
    let mut lines = Vec::new();
    for u in 1..=ACCOUNTS {
        let ip = ip_of(u);
        if !blocked(u) {
            lines.push(format!(
                "/ip firewall address-list add list=allowed address={ip} comment=crb_{ip}"
            ));
        }
        if negbal(u) {
            lines.push(format!(
                "/ip firewall address-list add list=negbal address={ip} comment=crb_{ip}"
            ));
        }
        lines.push(format!(
            "/queue simple add name=crb_{ip} target={ip}/32 max-limit=10240k/5120k comment=crb_{ip}"
        ));
    }
    lines
}

/// The simulator's state as comparable facts: (list, address) and (target, bit rates).
/// (list, address) entries and (target, bit rates) queues.
type Facts = (BTreeSet<(String, String)>, BTreeSet<(String, Vec<u64>)>);

fn facts_of(sim: &nasd::sim::Sim) -> Facts {
    let state = sim.device.state();
    let lists = state
        .address_list
        .iter()
        .map(|e| (e.list.clone(), e.address.clone()))
        .collect();
    let queues = state
        .queues
        .iter()
        .map(|q| {
            (
                q.target.clone(),
                nasd::scheme::state::bitrate(&q.max_limit).expect("rate"),
            )
        })
        .collect();
    (lists, queues)
}

#[derive(Clone, Copy, Debug)]
enum Protocol {
    Ssh,
    Api,
}

async fn hand_edits_are_found_and_fixed(backend: Backend, protocol: Protocol) {
    let env = TestEnv::new(backend).await;
    let sim = nasd::sim::start(&SimOptions::default(), CancellationToken::new())
        .await
        .expect("sim starts");
    let (scheme, addr) = match protocol {
        Protocol::Ssh => ("mikrotik-ssh", sim.ssh_addr),
        Protocol::Api => ("mikrotik-api", sim.api_addr),
    };
    let store = env.store().await;
    let mut nas = Nas::new(1, "Reconciled", &addr.ip().to_string());
    nas.scheme = Some(scheme.into());
    nas.port = Some(i32::from(addr.port()));
    nas.login = Some("admin".into());
    nas.password = Some(Secret::new("admin"));
    nas.n_workers = 4;
    nas.max_sessions = 2;
    nas.host_key_policy = "accept-new".into();
    store.nas_upsert(&nas).await.expect("nas");
    add_accounts(&store).await;

    let mut cfg = env.config();
    cfg.daemon.schemes_dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("schemes");
    cfg.daemon.transport.known_hosts = env.path().join("known_hosts");
    let run = |apply: bool| {
        let cfg = cfg.clone();
        let store = store.clone();
        async move {
            let ctx = Context {
                cfg: &cfg.daemon,
                store: &store,
                params_query: &cfg.database.params_query,
                billing: None,
                journal: None,
            };
            let req = Request {
                nas_id: 1,
                account: None,
                apply,
                by: "test".into(),
            };
            nasd::reconcile::run(&ctx, None, &req)
                .await
                .unwrap_or_else(|e| panic!("{protocol:?}: reconcile: {e}"))
        }
    };

    // The NAS as billing wants it: nothing to do.
    for line in expected_lines() {
        assert_eq!(sim.device.execute(&line), "", "{line}");
    }
    let want = facts_of(&sim);
    let report = run(false).await;
    assert_eq!(
        report.comparison.compared, ACCOUNTS as usize,
        "{protocol:?}"
    );
    assert!(
        report.comparison.differences.is_empty()
            && report.comparison.strays.is_empty()
            && report.comparison.problems.is_empty(),
        "{protocol:?}: {:?}",
        report.comparison
    );

    // Hand edits.
    for line in [
        format!(
            "/ip firewall address-list remove [find list=allowed address={}]",
            ip_of(1)
        ),
        format!(
            "/queue simple set [find comment=crb_{}] max-limit=1M/1M",
            ip_of(2)
        ),
        format!("/queue simple remove [find comment=crb_{}]", ip_of(3)),
        format!(
            "/ip firewall address-list add list=negbal address={0} comment=crb_{0}",
            ip_of(4)
        ),
        format!(
            "/ip firewall address-list add list=allowed address={0} comment=crb_{0}",
            ip_of(5)
        ),
        format!(
            "/ip firewall address-list remove [find list=negbal address={}]",
            ip_of(7)
        ),
        "/ip firewall address-list add list=allowed address=10.99.0.1 comment=crb_10.99.0.1"
            .to_string(),
    ] {
        assert_eq!(sim.device.execute(&line), "", "{line}");
    }
    let report = run(false).await;
    let found: Vec<(i64, &str, Kind, Option<&str>)> = report
        .comparison
        .differences
        .iter()
        .map(|d| (d.user_id, d.fact.as_str(), d.kind, d.fix.as_deref()))
        .collect();
    assert_eq!(
        found,
        vec![
            (1, "allowed", Kind::Missing, Some("user_accept")),
            (2, "rate", Kind::Differs, Some("user_rate_set")),
            (3, "rate", Kind::Missing, Some("user_rate_set")),
            (4, "negbal", Kind::Extra, Some("user_redirect_cancel")),
            (5, "allowed", Kind::Extra, Some("user_drop")),
            (7, "negbal", Kind::Missing, Some("user_redirect")),
        ],
        "{protocol:?}"
    );
    let strays: Vec<&str> = report
        .comparison
        .strays
        .iter()
        .map(|s| s.key.as_str())
        .collect();
    assert_eq!(strays, vec!["10.99.0.1"], "{protocol:?}");
    assert!(report.enqueued.is_empty(), "not applied");
    let lines = report.lines(false);
    assert!(
        lines.iter().any(|l| l
            == &format!(
                "user 2 ({}): rate differs: expected 10240k/5120k, found 1M/1M -> user_rate_set",
                ip_of(2)
            )),
        "{lines:#?}"
    );
    assert!(
        lines.last().is_some_and(
            |l| l.contains("6 differences, 1 strays, 0 problems; 6 events would fix them")
        ),
        "{lines:#?}"
    );

    // Applied while the daemon runs: the fixes go through the pipeline.
    let token = CancellationToken::new();
    let daemon = nasd::daemon::start(cfg.clone(), token.clone())
        .await
        .expect("daemon starts");
    let report = run(true).await;
    assert_eq!(report.enqueued.len(), 6, "{protocol:?}");
    wait_for(Duration::from_secs(60), "the fixes in history", || {
        let store = store.clone();
        async move {
            let (done, failed) = store.history_counts().await.expect("history counts");
            done + failed >= 6
        }
    })
    .await;
    token.cancel();
    daemon.wait().await.expect("daemon stops");
    let mut history: Vec<(i64, String, String)> = store
        .history(None, 100)
        .await
        .expect("history")
        .into_iter()
        .map(|h| (h.user_id, h.cmd, h.outcome))
        .collect();
    history.sort();
    assert_eq!(
        history,
        vec![
            (1, "user_accept".into(), "done".into()),
            (2, "user_rate_set".into(), "done".into()),
            (3, "user_rate_set".into(), "done".into()),
            (4, "user_redirect_cancel".into(), "done".into()),
            (5, "user_drop".into(), "done".into()),
            (7, "user_redirect".into(), "done".into()),
        ],
        "{protocol:?}"
    );
    // The NAS holds what billing wants again, plus the stray nobody owns.
    let (mut lists, queues) = facts_of(&sim);
    assert!(
        lists.remove(&("allowed".to_string(), "10.99.0.1".to_string())),
        "stray left alone"
    );
    assert_eq!((lists, queues), want, "{protocol:?}");
    let report = run(false).await;
    assert!(
        report.comparison.differences.is_empty(),
        "{protocol:?}: second run: {:?}",
        report.comparison.differences
    );
    assert_eq!(report.comparison.strays.len(), 1, "{protocol:?}");

    // One account: only its own facts, no strays.
    let ctx = Context {
        cfg: &cfg.daemon,
        store: &store,
        params_query: &cfg.database.params_query,
        billing: None,
        journal: None,
    };
    sim.device.execute(&format!(
        "/ip firewall address-list remove [find list=allowed address={}]",
        ip_of(9)
    ));
    let one = nasd::reconcile::run(
        &ctx,
        None,
        &Request {
            nas_id: 1,
            account: Some(9),
            apply: false,
            by: "test".into(),
        },
    )
    .await
    .expect("one account");
    assert_eq!(one.accounts, 1);
    assert_eq!(one.fixes, vec![(9, "user_accept".to_string())]);
    assert!(one.comparison.strays.is_empty());
    let err = nasd::reconcile::run(
        &ctx,
        None,
        &Request {
            nas_id: 1,
            account: Some(999),
            apply: false,
            by: "test".into(),
        },
    )
    .await
    .expect_err("unknown account");
    assert!(
        err.contains("user_id=999 is not an account of nas 1"),
        "{err}"
    );
    sim.stop().await;
}

async fn over_ssh(backend: Backend) {
    hand_edits_are_found_and_fixed(backend, Protocol::Ssh).await;
}

async fn over_api(backend: Backend) {
    hand_edits_are_found_and_fixed(backend, Protocol::Api).await;
}

/// A NAS that reboots empty (the simulator stopped, then started again on the same port
/// with nothing configured): with `[reconcile] on_return` and `apply`, the daemon
/// reconciles it when its breaker closes, and the NAS holds what billing wants again
/// without a single billing event.
async fn a_nas_back_from_down_is_reconciled(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let port = common::harness::free_port();
    // The same host key after the reboot, as a real router keeps it.
    let options = SimOptions {
        ssh_port: port,
        host_key: Some(env.path().join("sim_host_key")),
        ..SimOptions::default()
    };
    let sim = nasd::sim::start(&options, CancellationToken::new())
        .await
        .expect("sim starts");
    for line in expected_lines() {
        sim.device.execute(&line);
    }
    let want = facts_of(&sim);
    let store = env.store().await;
    let mut nas = Nas::new(1, "Rebooting", &sim.ssh_addr.ip().to_string());
    nas.scheme = Some("mikrotik-ssh".into());
    nas.port = Some(i32::from(port));
    nas.login = Some("admin".into());
    nas.password = Some(Secret::new("admin"));
    nas.n_workers = 4;
    nas.max_sessions = 2;
    nas.host_key_policy = "accept-new".into();
    store.nas_upsert(&nas).await.expect("nas");
    add_accounts(&store).await;

    let mut cfg = env.config();
    cfg.daemon.schemes_dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("schemes");
    cfg.daemon.transport.known_hosts = env.path().join("known_hosts");
    cfg.daemon.transport.connect_timeout = Duration::from_secs(2);
    cfg.daemon.breaker.failures = 2;
    cfg.daemon.breaker.probe_first = Duration::from_millis(300);
    cfg.daemon.breaker.probe_max = Duration::from_secs(1);
    cfg.reconcile.on_return = true;
    cfg.reconcile.apply = true;
    let token = CancellationToken::new();
    let daemon = nasd::daemon::start(cfg, token.clone())
        .await
        .expect("daemon starts");
    let stats = daemon.stats.clone();

    // The NAS goes away; events for it find it unreachable and the breaker opens.
    sim.stop().await;
    let events: Vec<_> = (1..=3).map(|u| common::event("user_info", u)).collect();
    store.enqueue_compact(&events).await.expect("enqueue");
    wait_for(Duration::from_secs(60), "the NAS marked down", || {
        let down = stats.get(1).is_some_and(|s| s.down_since.is_some());
        async move { down }
    })
    .await;

    // It comes back empty, as after a reboot.
    let sim = nasd::sim::start(&options, CancellationToken::new())
        .await
        .expect("sim starts again");
    assert!(sim.device.state().address_list.is_empty());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while facts_of(&sim) != want {
        if tokio::time::Instant::now() > deadline {
            panic!(
                "the NAS does not hold what billing wants after 120 s; daemon log:\n{}",
                env.read("log/nas_event_daemon.log")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    token.cancel();
    daemon.wait().await.expect("daemon stops");
    let log = env.read("log/nas_event_daemon.log");
    assert!(
        log.contains("reconcile nas 1 (Rebooting") && log.contains("by nas back up"),
        "{log}"
    );
    // Every fix went through the pipeline: in history, done.
    let history = store.history(None, 1000).await.expect("history");
    let fixes = history.iter().filter(|h| h.cmd != "user_info").count();
    let active = (1..=ACCOUNTS).filter(|u| !blocked(*u)).count();
    let negbals = (1..=ACCOUNTS).filter(|u| negbal(*u)).count();
    // user_accept per active account, user_redirect per negbal one, user_rate_set each.
    assert_eq!(fixes, active + negbals + ACCOUNTS as usize, "{history:#?}");
    assert!(history.iter().all(|h| h.outcome == "done"), "{history:#?}");
    sim.stop().await;
}

both_backends!(
    over_ssh,
    over_api,
    a_nas_back_from_down_is_reconciled,
    a_big_nas_is_read_within_max_sessions
);

const BIG: i64 = 10_000;
const LATENCY_MS: i64 = 200;

/// A NAS holding 10,000 accounts' entries, busy with a backlog on both of its
/// `max_sessions` = 2 sessions, reconciled with `nasd reconcile` (the real binary) while
/// the daemon runs: the command asks the daemon, which reads through its owner's pool, so
/// the simulator (limited to 2 sessions) refuses nothing, every account is compared, and
/// the other session keeps sending the backlog during the read.
async fn a_big_nas_is_read_within_max_sessions(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let record = env.path().join("sim.record");
    let sim = nasd::sim::start(
        &SimOptions {
            latency: format!("{LATENCY_MS}ms"),
            max_sessions: 2,
            record: Some(record.clone()),
            ..SimOptions::default()
        },
        CancellationToken::new(),
    )
    .await
    .expect("sim starts");
    let store = env.store().await;
    let mut nas = Nas::new(1, "Big", &sim.ssh_addr.ip().to_string());
    nas.scheme = Some("mikrotik-ssh".into());
    nas.port = Some(i32::from(sim.ssh_addr.port()));
    nas.login = Some("admin".into());
    nas.password = Some(Secret::new("admin"));
    nas.n_workers = 2;
    nas.max_sessions = 2;
    nas.host_key_policy = "accept-new".into();
    store.nas_upsert(&nas).await.expect("nas");
    let headers: Vec<String> = [
        "user_id",
        "abonent_id",
        "nas_id",
        "ip",
        "rate_in",
        "rate_out",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let records: Vec<AccountRecord> = (1..=BIG)
        .map(|u| {
            let values = vec![
                u.to_string(),
                u.to_string(),
                "1".into(),
                ip_of(u),
                "10240".into(),
                "5120".into(),
            ];
            AccountRecord::from_fields(&headers, &values).expect("account")
        })
        .collect();
    store.accounts_upsert(&records).await.expect("accounts");
    sim.device.apply(|state| {
        for u in 1..=BIG {
            let ip = ip_of(u);
            nasd::sim::execute(
                state,
                &format!("/ip firewall address-list add list=allowed address={ip} comment=crb_{ip}"),
            );
            nasd::sim::execute(
                state,
                &format!(
                    "/queue simple add name=crb_{ip} target={ip}/32 max-limit=10240k/5120k comment=crb_{ip}"
                ),
            );
        }
    });
    // A backlog that keeps both sessions busy for a minute: read-only commands, so
    // the state compared does not move.
    let events: Vec<_> = (1..=300).map(|u| common::event("user_info", u)).collect();
    store.enqueue_compact(&events).await.expect("enqueue");

    let api_port = common::harness::free_port();
    let text = format!(
        "[database]\nurl = \"{}\"\n[daemon]\nlog_dir = \"{}\"\nschemes_dir = \"{}\"\n\
         resync_interval = \"300ms\"\npoll_interval = \"50ms\"\n\
         [transport]\nknown_hosts = \"{}\"\n[api]\nlisten = \"127.0.0.1:{api_port}\"\n",
        env.url,
        env.log_dir().display(),
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("schemes")
            .display(),
        env.path().join("known_hosts").display(),
    );
    let config_path = env.path().join("nasd.toml");
    std::fs::write(&config_path, &text).expect("config");
    let cfg = nasd::config::Config::from_toml(&text).expect("config parses");
    let token = CancellationToken::new();
    let daemon = nasd::daemon::start(cfg, token.clone())
        .await
        .expect("daemon starts");
    wait_for(Duration::from_secs(60), "the backlog flowing", || {
        let store = store.clone();
        async move { store.history_counts().await.expect("counts").0 >= 4 }
    })
    .await;

    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_nasd"))
        .arg("--config")
        .arg(&config_path)
        .args(["reconcile", "--nas", "1", "--json"])
        .output()
        .await
        .expect("nasd reconcile runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("JSON report");
    let (done_after, _) = store.history_counts().await.expect("counts");
    token.cancel();
    daemon.wait().await.expect("daemon stops");

    assert_eq!(report["owner_session"], serde_json::json!(true), "{report}");
    assert_eq!(report["compared"], serde_json::json!(BIG), "{report}");
    assert_eq!(report["facts"], serde_json::json!(2 * BIG), "{report}");
    assert_eq!(report["differences"], serde_json::json!([]), "{report}");
    assert!(
        done_after < 300,
        "the backlog was still there when the read ended"
    );
    let counters = sim.device.counters();
    assert_eq!(counters.sessions_refused, 0, "{counters:?}");
    assert!(counters.max_concurrent_sessions <= 2, "{counters:?}");
    // The other session kept sending the backlog while the state was read.
    let records: Vec<common::harness::Recorded> = std::fs::read_to_string(&record)
        .expect("record")
        .lines()
        .filter_map(common::harness::Recorded::parse)
        .collect();
    let reads: Vec<i64> = records
        .iter()
        .filter(|r| r.text.contains(" print terse "))
        .map(|r| r.ms)
        .collect();
    assert_eq!(reads.len(), 2, "{reads:?}");
    let during = records
        .iter()
        .filter(|r| !r.text.contains(" print terse "))
        .filter(|r| r.ms > reads[0] - LATENCY_MS && r.ms <= reads[1])
        .count();
    assert!(
        during >= 1,
        "no backlog command between the two reads ({reads:?})"
    );
    eprintln!(
        "{backend:?}: read {} lines in {} ms through the owner's pool; {during} backlog commands \
         applied meanwhile; sessions at most {}, refused {}",
        report["read_lines"],
        report["read_ms"],
        counters.max_concurrent_sessions,
        counters.sessions_refused
    );
    sim.stop().await;
}
