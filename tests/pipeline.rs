//! The pipeline end to end, in-process, against SQLite and a real PostgreSQL:
//! compact stack -> expansion -> per-NAS owners -> local scripts and schemes -> history
//! and log files.

#[macro_use]
mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{Backend, TestEnv, add_accounts, event, nas, recorder_script, wait_for, wait_history};
use nasd::store::CompactEvent;
use tokio_util::sync::CancellationToken;

both_backends!(
    end_to_end_with_logs,
    per_account_order_holds_with_random_retries,
    exit_codes_map_to_outcomes,
    bad_templates_and_unknown_cmds_fail_with_reason,
    pools_resize_and_nas_come_and_go_without_restart,
    user_info_goes_first_but_never_past_the_event_in_flight,
    params_query_forms_give_the_same_variables,
);

fn start(
    env: &TestEnv,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<anyhow::Result<()>>,
) {
    let token = CancellationToken::new();
    let handle = tokio::spawn(nasd::daemon::run(env.config(), token.clone()));
    (token, handle)
}

async fn stop(token: CancellationToken, handle: tokio::task::JoinHandle<anyhow::Result<()>>) {
    token.cancel();
    handle.await.expect("daemon task").expect("daemon run");
}

async fn end_to_end_with_logs(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let store = env.store().await;
    let received = env.path().join("received.log");
    let script = env.script(
        "session.sh",
        &format!(
            "#!/bin/sh\necho \"$1 user_id=$user_id ip=$ip login=$login nas_ip=$nas_ip pw=$telnet_password\" >> {}\n\
             echo \"ok: $1 $ip\"\n",
            received.display()
        ),
    );
    store
        .nas_upsert(&nas(1, Some(&script), None, 4))
        .await
        .unwrap();
    add_accounts(&store, 3, &[1]).await;
    let ids = store
        .enqueue_compact(&[
            event("user_add", 1),
            event("user_rate_set", 2),
            CompactEvent {
                cmd: "user_drop".into(),
                user_id: 3,
                nas_ip: Some("10.20.0.1".into()),
                ..Default::default()
            },
            event("user_add", 999),
            CompactEvent {
                cmd: "user_add".into(),
                user_id: 1,
                nas_ip: Some("10.99.99.99".into()),
                ..Default::default()
            },
        ])
        .await
        .unwrap();
    assert_eq!(ids.len(), 5);
    let (token, handle) = start(&env);
    wait_history(&store, 5, Duration::from_secs(30)).await;
    stop(token, handle).await;

    // What reached the "device", with the variables in its environment.
    let got = env.read("received.log");
    let mut lines: Vec<&str> = got.lines().collect();
    lines.sort();
    assert_eq!(
        lines,
        vec![
            "user_add user_id=1 ip=10.88.0.2 login=user1 nas_ip=10.20.0.1 pw=nas-password-do-not-log",
            "user_drop user_id=3 ip=10.88.0.4 login=user3 nas_ip=10.20.0.1 pw=nas-password-do-not-log",
            "user_rate_set user_id=2 ip=10.88.0.3 login=user2 nas_ip=10.20.0.1 pw=nas-password-do-not-log",
        ]
    );
    // Final state of the rows: the stacks are empty, history says why.
    let count = store.stack_count().await.unwrap();
    assert_eq!((count.compact_total, count.stack_total), (0, 0));
    let history = store.history(None, 100).await.unwrap();
    let by_compact: HashMap<i64, _> = history.iter().map(|h| (h.compact_id.unwrap(), h)).collect();
    let h1 = by_compact[&ids[0]];
    assert_eq!(h1.outcome, "done");
    assert_eq!(h1.attempts, 1);
    assert_eq!(h1.answer, "ok: user_add 10.88.0.2");
    assert!(
        h1.commands[0].ends_with("session.sh user_add"),
        "{:?}",
        h1.commands
    );
    assert!(h1.commands[0].contains("ip=10.88.0.2"));
    assert!(!h1.commands[0].contains("nas-password-do-not-log"));
    assert_eq!(by_compact[&ids[3]].outcome, "failed");
    assert_eq!(
        by_compact[&ids[3]].error.as_deref(),
        Some("unknown account user_id=999")
    );
    assert_eq!(
        by_compact[&ids[4]].error.as_deref(),
        Some("unknown nas_ip 10.99.99.99")
    );

    // The logs an operator reads.
    let daemon_log = env.read("log/nas_event_daemon.log");
    assert!(
        daemon_log.contains(&format!(
            "Start work with nas nasid=1 nas_ip=10.20.0.1 oss_pathname=<null> script_name={}",
            script.display()
        )),
        "{daemon_log}"
    );
    let nas_log = env.read("log/nas_event_daemon/NAS_1_10.20.0.1.log");
    let send_line = nas_log
        .lines()
        .find(|l| l.contains("cmd=user_add") && l.contains(" send: "))
        .expect("a send line for user_add");
    // Lines start with the date, then the copy-pasteable command follows `send: `.
    assert!(
        send_line.as_bytes()[4] == b'-' && send_line.as_bytes()[10] == b' ',
        "{send_line}"
    );
    let command = send_line.split(" send: ").nth(1).unwrap();
    assert_eq!(command, h1.commands[0]);
    assert!(nas_log.contains("answer: ok: user_add 10.88.0.2"));
    assert!(nas_log.contains("outcome: done ("));
    assert!(!nas_log.contains("nas-password-do-not-log"));
    let account_log = env.read("log/abonents/1001/event_1.log");
    assert!(account_log.contains("cmd=user_add"), "{account_log}");
    assert!(!account_log.contains("user_id=2 "));
}

async fn per_account_order_holds_with_random_retries(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let store = env.store().await;
    let log = env.path().join("attempts.log");
    let script = env.script("flaky.sh", &recorder_script(&log, 20, ""));
    store
        .nas_upsert(&nas(1, Some(&script), None, 8))
        .await
        .unwrap();
    let accounts = 40;
    add_accounts(&store, accounts, &[1]).await;
    let n_events = 2000;
    let cmds = [
        "user_add",
        "user_rate_set",
        "user_drop",
        "user_accept",
        "user_redirect",
    ];
    let events: Vec<CompactEvent> = (0..n_events)
        .map(|i| {
            // A pseudo-random account per event, so lanes have uneven lengths.
            let user = 1 + (i * 7919 + i / 3) % accounts;
            event(cmds[(i % 5) as usize], user)
        })
        .collect();
    for chunk in events.chunks(500) {
        store.enqueue_compact(chunk).await.unwrap();
    }
    let mut cfg_env = env.config();
    cfg_env.daemon.max_attempts = 50;
    let token = CancellationToken::new();
    let handle = tokio::spawn(nasd::daemon::run(cfg_env, token.clone()));
    wait_history(&store, n_events, Duration::from_secs(240)).await;
    stop(token, handle).await;

    let history = store.history(None, n_events * 2).await.unwrap();
    assert_eq!(history.len() as i64, n_events);
    assert!(history.iter().all(|h| h.outcome == "done"), "all done");
    let retried = history.iter().filter(|h| h.attempts > 1).count();
    assert!(retried > 100, "the script retried only {retried} events");

    // Per account: event ids in the order their attempts reached the script.
    let text = env.read("attempts.log");
    let mut per_user: HashMap<i64, Vec<(i64, bool)>> = HashMap::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        per_user
            .entry(f[0].parse().unwrap())
            .or_default()
            .push((f[1].parse().unwrap(), f[4] == "ok"));
    }
    let mut expected: HashMap<i64, Vec<i64>> = HashMap::new();
    let mut sorted = history.clone();
    sorted.sort_by_key(|h| h.event_id);
    for h in &sorted {
        expected
            .entry(h.user_id)
            .or_default()
            .push(h.event_id.unwrap());
    }
    for (user, attempts) in &per_user {
        // No attempt of a later event before the earlier one succeeded.
        let mut current = 0usize;
        let want = &expected[user];
        for (event_id, ok) in attempts {
            assert_eq!(
                *event_id, want[current],
                "account {user}: attempt of event {event_id} while event {} was not done",
                want[current]
            );
            if *ok {
                current += 1;
            }
        }
        assert_eq!(
            current,
            want.len(),
            "account {user}: every event succeeded once"
        );
    }
}

async fn exit_codes_map_to_outcomes(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let store = env.store().await;
    let script = env.script(
        "codes.sh",
        "#!/bin/sh\ncase \"$1\" in\n\
         user_add) echo added; exit 0;;\n\
         user_drop) echo 'nas busy'; exit 254;;\n\
         user_del) exit 143;;\n\
         user_edit) echo 'bad vlan'; echo 'trace here' >&2; exit 3;;\n\
         user_info) exec sleep 10;;\n\
         esac\nexit 9\n",
    );
    store
        .nas_upsert(&nas(1, Some(&script), None, 4))
        .await
        .unwrap();
    add_accounts(&store, 5, &[1]).await;
    store
        .enqueue_compact(&[
            event("user_add", 1),
            event("user_drop", 2),
            event("user_del", 3),
            event("user_edit", 4),
            event("user_info", 5),
        ])
        .await
        .unwrap();
    let mut cfg = env.config();
    cfg.daemon.max_attempts = 3;
    cfg.daemon.exec_timeout = Duration::from_millis(300);
    let token = CancellationToken::new();
    let handle = tokio::spawn(nasd::daemon::run(cfg, token.clone()));
    wait_history(&store, 5, Duration::from_secs(60)).await;
    stop(token, handle).await;
    let history = store.history(None, 10).await.unwrap();
    let by_user: HashMap<i64, _> = history.iter().map(|h| (h.user_id, h)).collect();
    let check = |user: i64, outcome: &str, attempts: i32, error: Option<&str>| {
        let h = by_user[&user];
        assert_eq!(
            (h.outcome.as_str(), h.attempts, h.error.as_deref()),
            (outcome, attempts, error),
            "user {user} ({})",
            h.cmd
        );
    };
    check(1, "done", 1, None);
    check(
        2,
        "failed",
        3,
        Some("gave up after 3 attempts: exit 254 (postpone)"),
    );
    check(
        3,
        "failed",
        3,
        Some("gave up after 3 attempts: exit 143 (terminated)"),
    );
    check(4, "failed", 1, Some("exit 3"));
    check(
        5,
        "failed",
        3,
        Some("gave up after 3 attempts: timeout after 300ms"),
    );
    assert_eq!(by_user[&4].answer, "bad vlan\nstderr: trace here");
    let nas_log = env.read("log/nas_event_daemon/NAS_1_10.20.0.1.log");
    assert!(
        nas_log.contains("cmd=user_drop try=1 outcome: retry in"),
        "{nas_log}"
    );
    assert!(nas_log.contains(
        "cmd=user_drop try=3 outcome: failed: gave up after 3 attempts: exit 254 (postpone)"
    ));
}

async fn bad_templates_and_unknown_cmds_fail_with_reason(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let store = env.store().await;
    env.scheme(
        "ros",
        "transport = \"null\"\ndialect = \"routeros\"\n[commands]\n\
         user_add = [\"/ip firewall address-list add list=allowed address={{ ip }} comment={{ login }}\"]\n\
         user_edit = [\"/queue simple set [find name=crb_{{ ip }}] max-limit={{ no_such_var }}k\"]\n",
    );
    store
        .nas_upsert(&nas(1, None, Some("ros"), 4))
        .await
        .unwrap();
    add_accounts(&store, 3, &[1]).await;
    // Account 3's login tries to inject a second RouterOS command.
    let headers: Vec<String> = ["user_id", "abonent_id", "nas_id", "login", "ip"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let values: Vec<String> = ["3", "1003", "1", "x; /system reset", "10.88.0.4"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    store
        .accounts_upsert(&[nasd::store::AccountRecord::from_fields(&headers, &values).unwrap()])
        .await
        .unwrap();
    store
        .enqueue_compact(&[
            event("user_add", 1),
            event("user_edit", 2),
            event("user_frobnicate", 1),
            event("user_add", 3),
        ])
        .await
        .unwrap();
    let (token, handle) = start(&env);
    wait_history(&store, 4, Duration::from_secs(30)).await;
    stop(token, handle).await;
    let history = store.history(None, 10).await.unwrap();
    let find = |user: i64, cmd: &str| {
        history
            .iter()
            .find(|h| h.user_id == user && h.cmd == cmd)
            .unwrap_or_else(|| panic!("no history for {user} {cmd}"))
    };
    assert_eq!(find(1, "user_add").outcome, "done");
    assert_eq!(
        find(1, "user_add").commands,
        vec!["/ip firewall address-list add list=allowed address=10.88.0.2 comment=user1"]
    );
    assert_eq!(
        find(3, "user_add").commands,
        vec![
            "/ip firewall address-list add list=allowed address=10.88.0.4 comment=\"x; /system reset\""
        ]
    );
    let edit = find(2, "user_edit");
    assert_eq!(edit.outcome, "failed");
    assert_eq!(edit.attempts, 1);
    let why = edit.error.clone().unwrap();
    assert!(
        why.contains("user_edit[0]") && why.contains("no_such_var"),
        "{why}"
    );
    let unknown = find(1, "user_frobnicate");
    assert_eq!(unknown.outcome, "failed");
    assert_eq!(
        unknown.error.as_deref(),
        Some("scheme ros does not define cmd user_frobnicate")
    );
    let nas_log = env.read("log/nas_event_daemon/NAS_1_10.20.0.1.log");
    assert!(
        nas_log.contains("cmd=user_frobnicate try=1 outcome: failed: scheme ros does not define cmd user_frobnicate"),
        "{nas_log}"
    );
    assert!(nas_log.contains("no_such_var"));
    let account_log = env.read("log/abonents/1002/event_2.log");
    assert!(account_log.contains("outcome: failed:") && account_log.contains("no_such_var"));
}

/// Start/end times of each event from a script that sleeps.
fn intervals(text: &str) -> HashMap<i64, (i64, i64)> {
    let mut out: HashMap<i64, (i64, i64)> = HashMap::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        let id: i64 = f[1].parse().unwrap();
        let t: i64 = f[2].parse().unwrap();
        let e = out.entry(id).or_insert((0, 0));
        if f[0] == "start" {
            e.0 = t;
        } else {
            e.1 = t;
        }
    }
    out
}

fn max_overlap(iv: &[(i64, i64)]) -> usize {
    let mut points: Vec<(i64, i32)> = Vec::new();
    for (s, e) in iv {
        points.push((*s, 1));
        points.push((*e, -1));
    }
    points.sort();
    let (mut cur, mut max) = (0i32, 0i32);
    for (_, d) in points {
        cur += d;
        max = max.max(cur);
    }
    max as usize
}

async fn pools_resize_and_nas_come_and_go_without_restart(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let store = env.store().await;
    let log = env.path().join("spans.log");
    let script = env.script(
        "slow.sh",
        &format!(
            "#!/bin/sh\necho \"start $event_id $(date +%s%N)\" >> {log}\nsleep 0.3\necho \"end $event_id $(date +%s%N)\" >> {log}\n",
            log = log.display()
        ),
    );
    store
        .nas_upsert(&nas(1, Some(&script), None, 1))
        .await
        .unwrap();
    add_accounts(&store, 20, &[1]).await;
    let (token, handle) = start(&env);
    let first: Vec<CompactEvent> = (1..=5).map(|u| event("user_add", u)).collect();
    store.enqueue_compact(&first).await.unwrap();
    wait_history(&store, 5, Duration::from_secs(30)).await;
    let spans = intervals(&env.read("spans.log"));
    assert_eq!(max_overlap(&spans.values().copied().collect::<Vec<_>>()), 1);

    // Grow the pool to 4 workers while the daemon runs.
    let mut grown = nas(1, Some(&script), None, 4);
    grown.n_workers = 4;
    store.nas_upsert(&grown).await.unwrap();
    wait_for(
        Duration::from_secs(10),
        "the resize in the daemon log",
        || async {
            env.read("log/nas_event_daemon.log")
                .contains("workers 1 -> 4")
        },
    )
    .await;
    let before: Vec<i64> = spans.keys().copied().collect();
    let second: Vec<CompactEvent> = (6..=17).map(|u| event("user_add", u)).collect();
    store.enqueue_compact(&second).await.unwrap();
    wait_history(&store, 17, Duration::from_secs(30)).await;
    let spans = intervals(&env.read("spans.log"));
    let later: Vec<(i64, i64)> = spans
        .iter()
        .filter(|(id, _)| !before.contains(id))
        .map(|(_, v)| *v)
        .collect();
    let overlap = max_overlap(&later);
    assert!(
        (2..=4).contains(&overlap),
        "overlap after resize: {overlap}"
    );

    // A NAS added while running gets its events.
    let received2 = env.path().join("nas2.log");
    let script2 = env.script(
        "nas2.sh",
        &format!(
            "#!/bin/sh\necho \"$1 $user_id\" >> {}\n",
            received2.display()
        ),
    );
    store
        .nas_upsert(&nas(2, Some(&script2), None, 2))
        .await
        .unwrap();
    store
        .enqueue_compact(&[CompactEvent {
            cmd: "user_accept".into(),
            user_id: 18,
            nas_ip: Some("10.20.0.2".into()),
            ..Default::default()
        }])
        .await
        .unwrap();
    wait_history(&store, 18, Duration::from_secs(30)).await;
    assert_eq!(env.read("nas2.log"), "user_accept 18\n");

    // A removed NAS stops; its new events wait in the stack instead of being lost.
    store.nas_remove(1).await.unwrap();
    wait_for(Duration::from_secs(10), "the stop line", || async {
        env.read("log/nas_event_daemon.log")
            .contains("Stop work with nas nasid=1")
    })
    .await;
    store
        .enqueue_compact(&[CompactEvent {
            cmd: "user_drop".into(),
            user_id: 19,
            nas_ip: Some("10.20.0.2".into()),
            ..Default::default()
        }])
        .await
        .unwrap();
    // Account 20 belongs to NAS 1 (removed): expansion cannot resolve it... it is
    // resolved by the account's nas_id, which no longer exists, so it fails with reason.
    store
        .enqueue_compact(&[event("user_drop", 20)])
        .await
        .unwrap();
    wait_history(&store, 20, Duration::from_secs(30)).await;
    let h = store.history(Some(20), 10).await.unwrap();
    assert_eq!(
        h[0].error.as_deref(),
        Some("account user_id=20 names unknown nas_id 1")
    );
    // Re-add NAS 1 disabled: events addressed to it wait in events_stack.
    let mut disabled = nas(1, Some(&script), None, 4);
    disabled.enabled = false;
    store.nas_upsert(&disabled).await.unwrap();
    store
        .enqueue_compact(&[event("user_rate_set", 5)])
        .await
        .unwrap();
    wait_for(
        Duration::from_secs(10),
        "the event in events_stack",
        || async { store.stack_count().await.unwrap().stack_total == 1 },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let count = store.stack_count().await.unwrap();
    assert_eq!(
        count.by_nas,
        vec![(1, 1)],
        "the event waits for its disabled NAS"
    );
    stop(token, handle).await;
}

async fn user_info_goes_first_but_never_past_the_event_in_flight(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let store = env.store().await;
    let log = env.path().join("order.log");
    let started = env.path().join("started");
    let script = env.script(
        "ordered.sh",
        &format!(
            "#!/bin/sh\nif [ \"$1\" = user_add ]; then touch {started}; sleep 0.7; fi\necho \"$1\" >> {log}\n",
            started = started.display(),
            log = log.display()
        ),
    );
    store
        .nas_upsert(&nas(1, Some(&script), None, 4))
        .await
        .unwrap();
    add_accounts(&store, 1, &[1]).await;
    let (token, handle) = start(&env);
    store
        .enqueue_compact(&[event("user_add", 1)])
        .await
        .unwrap();
    wait_for(Duration::from_secs(10), "user_add in flight", || async {
        started.exists()
    })
    .await;
    store
        .enqueue_compact(&[
            event("user_drop", 1),
            event("user_rate_set", 1),
            event("user_info", 1),
        ])
        .await
        .unwrap();
    wait_history(&store, 4, Duration::from_secs(30)).await;
    stop(token, handle).await;
    assert_eq!(
        env.read("order.log"),
        "user_add\nuser_info\nuser_drop\nuser_rate_set\n"
    );
}

/// The expander looks up a whole batch's accounts at once where it can (PostgreSQL:
/// the query as a LATERAL subquery) and per user otherwise; both give each event the
/// variables its own lookup would, and an account without a row fails with the reason.
async fn params_query_forms_give_the_same_variables(backend: Backend) {
    let mut queries = vec![
        // The default query: batched on PostgreSQL.
        nasd::config::Config::default().database.params_query,
    ];
    if backend == Backend::Postgres {
        // $1 twice, a cast, a literal holding "$1", an ORDER BY: batched too.
        queries.push(
            "SELECT user_id, nas_id, ip, login, '$1' AS tag FROM accounts \
             WHERE user_id = $1::bigint AND abonent_id > 0 AND user_id = $1 ORDER BY ip"
                .to_string(),
        );
        // A data-modifying WITH is refused inside a subquery: run per user.
        queries.push(
            "WITH touched AS (UPDATE accounts SET login = login WHERE user_id = $1 \
             RETURNING *) SELECT user_id, nas_id, ip, login, '$1' AS tag FROM touched"
                .to_string(),
        );
    }
    for (n, query) in queries.iter().enumerate() {
        let env = TestEnv::new(backend).await;
        let store = env.store().await;
        let script = env.path().join("unused.sh");
        store
            .nas_upsert(&nas(1, Some(&script), None, 2))
            .await
            .unwrap();
        add_accounts(&store, 3, &[1]).await;
        // Account 9 has no row; account 2 appears twice in the batch.
        store
            .enqueue_compact(&[
                event("user_add", 1),
                event("user_add", 2),
                event("user_add", 9),
                event("user_drop", 2),
                event("user_add", 3),
            ])
            .await
            .unwrap();
        let report = store
            .expand(query, 100)
            .await
            .unwrap_or_else(|e| panic!("query {n}: {e}"));
        assert_eq!((report.expanded, report.failed), (4, 1), "query {n}");
        let events = store.load_windows(&[(1, 0, 100)]).await.unwrap();
        let seen: Vec<(i64, String, Option<String>, Option<String>)> = events
            .iter()
            .map(|e| {
                let text = |k: &str| {
                    e.params
                        .get(k)
                        .map(|v| v.as_str().unwrap_or("").to_string())
                };
                (e.user_id, e.cmd.clone(), text("ip"), text("login"))
            })
            .collect();
        let want = |u: i64, cmd: &str| {
            (
                u,
                cmd.to_string(),
                Some(format!("10.88.0.{}", u + 1)),
                Some(format!("user{u}")),
            )
        };
        assert_eq!(
            seen,
            vec![
                want(1, "user_add"),
                want(2, "user_add"),
                want(2, "user_drop"),
                want(3, "user_add")
            ],
            "query {n}"
        );
        if n > 0 {
            for e in &events {
                assert_eq!(
                    e.params.get("tag").and_then(|v| v.as_str()),
                    Some("$1"),
                    "query {n}"
                );
            }
        }
        let history = store.history(None, 10).await.unwrap();
        assert_eq!(history.len(), 1, "query {n}");
        assert_eq!(history[0].user_id, 9);
        assert_eq!(
            history[0].error.as_deref(),
            Some("unknown account user_id=9"),
            "query {n}"
        );
    }
}
