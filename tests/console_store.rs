//! The operator console's store calls (issue 14), on SQLite and a real PostgreSQL:
//! events listed per state and filter, keyset pages that give every event once, bulk
//! retry and cancel with the single-event rules, account search, the audit log, a
//! paused NAS, and the new table carried by a copy.

#[macro_use]
mod common;

use std::collections::BTreeSet;

use chrono::{Duration, Utc};
use common::{Backend, TestEnv, add_accounts, event, nas};
use nasd::store::copy::{self, Db};
use nasd::store::{
    AccountRecord, AuditEntry, CANCELLED, ConnectOptions, EventQuery, EventState, Filter, Finish,
    Outcome, Reschedule, Store,
};

both_backends!(console_lists_acts_and_searches);

const PARAMS: &str =
    "SELECT user_id, abonent_id, nas_id, login, ip FROM accounts WHERE user_id = $1";

/// Every event of `query` through its pages of `page` events; panics on a repeat.
async fn all_pages(store: &Store, query: &EventQuery, page: i64) -> Vec<i64> {
    let mut q = query.clone();
    q.limit = page;
    q.before_id = None;
    let mut ids = Vec::new();
    for _ in 0..1000 {
        let p = store.events_list(&q).await.expect("events_list");
        assert!(p.events.len() as i64 <= page);
        for e in &p.events {
            assert_eq!(e.state, query.state.as_str(), "{e:?}");
            assert!(!ids.contains(&e.id), "event {} listed twice", e.id);
            ids.push(e.id);
        }
        match p.next_before {
            Some(b) => q.before_id = Some(b),
            None => return ids,
        }
    }
    panic!("paging did not end");
}

async fn listed(store: &Store, query: &EventQuery) -> BTreeSet<i64> {
    let mut q = query.clone();
    q.limit = 500;
    let page = store.events_list(&q).await.expect("events_list");
    assert_eq!(page.next_before, None);
    assert!(!page.scanned_capped);
    page.events.iter().map(|e| e.id).collect()
}

fn set(ids: &[i64]) -> BTreeSet<i64> {
    ids.iter().copied().collect()
}

async fn console_lists_acts_and_searches(backend: Backend) {
    scenario(backend, false).await;
}

/// The same on PostgreSQL in pooled mode (`statement_cache = false`): every call a
/// transaction of its own with unnamed statements, bulk chunks as savepoints.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_pooled_mode() {
    scenario(Backend::Postgres, true).await;
}

async fn scenario(backend: Backend, pooled: bool) {
    let env = TestEnv::new(backend).await;
    let store = Store::connect_with(
        &env.url,
        &ConnectOptions {
            max_connections: 4,
            statement_cache: !pooled,
        },
    )
    .await
    .expect("connect");
    store.migrate().await.expect("migrate");
    let start = Utc::now() - Duration::seconds(1);
    for id in [1, 2] {
        store
            .nas_upsert(&nas(id, None, Some("null"), 4))
            .await
            .expect("nas");
    }
    // Users 1..=20 (odd on NAS 1, even on NAS 2), and one with a MAC.
    add_accounts(&store, 20, &[1, 2]).await;
    let headers: Vec<String> = ["user_id", "abonent_id", "nas_id", "login", "ip", "mac"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let values: Vec<String> = [
        "100",
        "5000",
        "1",
        "Ivanov",
        "10.99.0.1",
        "AA:BB:CC:DD:EE:01",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    store
        .accounts_upsert(&[AccountRecord::from_fields(&headers, &values).expect("record")])
        .await
        .expect("account with a MAC");

    // 60 events, expanded into the main stack.
    let cmds = ["user_add", "user_drop", "user_rate_set"];
    let events: Vec<_> = (0..60)
        .map(|i| event(cmds[i % 3], 1 + (i as i64) % 20))
        .collect();
    let compact_ids = store.enqueue_compact(&events).await.expect("enqueue");
    let report = store.expand(PARAMS, 1000).await.expect("expand");
    assert_eq!((report.expanded, report.failed), (60, 0));
    let stack = store
        .stack_filter(&Filter {
            conds: vec![],
            order_by: "id",
            descending: false,
            limit: 1000,
        })
        .await
        .expect("stack");
    assert_eq!(stack.len(), 60);
    let by_compact = |cid: i64| {
        stack
            .iter()
            .find(|e| e.compact_id == Some(cid))
            .expect("row")
    };
    // Claim 50: 20 done, 20 failed, 5 back for a retry, 5 left running.
    let now = Utc::now();
    let claims: Vec<(i64, i64, i64)> = compact_ids[..50]
        .iter()
        .map(|c| (by_compact(*c).id, 77, 0))
        .collect();
    let claimed = store
        .claim(&claims, now, now + Duration::seconds(600))
        .await
        .expect("claim");
    assert_eq!(claimed.len(), 50);
    let finish = |cid: i64, outcome: Outcome, error: Option<&str>| Finish {
        id: by_compact(cid).id,
        claim_token: 77,
        outcome,
        commands: vec![format!("/ppp secret add name=u{cid}")],
        answer: "ok".into(),
        error: error.map(str::to_string),
        duration_ms: 5,
    };
    let mut finishes = Vec::new();
    let done: Vec<i64> = compact_ids[..20].to_vec();
    let failed: Vec<i64> = compact_ids[20..40].to_vec();
    let retrying: Vec<i64> = compact_ids[40..45].to_vec();
    let running: Vec<i64> = compact_ids[45..50].to_vec();
    let queued_stack: Vec<i64> = compact_ids[50..60].to_vec();
    for c in &done {
        finishes.push(finish(*c, Outcome::Done, None));
    }
    for (i, c) in failed.iter().enumerate() {
        let error = if i % 2 == 0 {
            "Timeout waiting for the prompt"
        } else {
            "auth_failed: bad password"
        };
        finishes.push(finish(*c, Outcome::Failed, Some(error)));
    }
    let reschedules: Vec<Reschedule> = retrying
        .iter()
        .map(|c| Reschedule {
            id: by_compact(*c).id,
            claim_token: 77,
            retry_at: now + Duration::seconds(3600),
            error: "connection refused".into(),
            refund: false,
        })
        .collect();
    let applied = store
        .complete(&finishes, &reschedules, Utc::now())
        .await
        .expect("complete");
    assert_eq!(applied.len(), 45);
    // 5 more enqueued, not expanded: queued in the compact stack.
    let queued_compact = store
        .enqueue_compact(&(1..=5).map(|u| event("user_info", u)).collect::<Vec<_>>())
        .await
        .expect("enqueue");

    // Every state lists exactly its events.
    let mut queued = queued_stack.clone();
    queued.extend(&queued_compact);
    let q = EventQuery::new;
    assert_eq!(listed(&store, &q(EventState::Queued)).await, set(&queued));
    assert_eq!(
        listed(&store, &q(EventState::Retrying)).await,
        set(&retrying)
    );
    assert_eq!(listed(&store, &q(EventState::Running)).await, set(&running));
    assert_eq!(listed(&store, &q(EventState::Failed)).await, set(&failed));
    assert_eq!(listed(&store, &q(EventState::Done)).await, set(&done));

    // What the rows show: history has the commands and answer, retrying its next try.
    let page = store
        .events_list(&q(EventState::Failed))
        .await
        .expect("list");
    let first = &page.events[0];
    assert_eq!(first.id, *failed.last().expect("failed"));
    assert_eq!(first.stage, "history");
    assert_eq!(
        first.commands,
        vec![format!("/ppp secret add name=u{}", first.id)]
    );
    assert_eq!(first.answer.as_deref(), Some("ok"));
    assert_eq!(
        first.nas_ip.as_deref(),
        Some(if first.user_id % 2 == 1 {
            "10.20.0.1"
        } else {
            "10.20.0.2"
        })
    );
    let page = store
        .events_list(&q(EventState::Retrying))
        .await
        .expect("list");
    assert!(page.events.iter().all(|e| e.try_count == 1
        && e.next_try_at.is_some()
        && e.error.as_deref() == Some("connection refused")));

    // Filters.
    let user_of =
        |cid: i64| events[compact_ids.iter().position(|c| *c == cid).expect("id")].user_id;
    let cmd_of = |cid: i64| {
        events[compact_ids.iter().position(|c| *c == cid).expect("id")]
            .cmd
            .clone()
    };
    let on_nas1: Vec<i64> = failed
        .iter()
        .copied()
        .filter(|c| user_of(*c) % 2 == 1)
        .collect();
    assert!(!on_nas1.is_empty());
    let filter = EventQuery {
        nas_id: Some(1),
        ..q(EventState::Failed)
    };
    assert_eq!(listed(&store, &filter).await, set(&on_nas1));
    let drops: Vec<i64> = done
        .iter()
        .copied()
        .filter(|c| cmd_of(*c) == "user_drop")
        .collect();
    let filter = EventQuery {
        cmd: Some("user_drop".into()),
        ..q(EventState::Done)
    };
    assert_eq!(listed(&store, &filter).await, set(&drops));
    let user = user_of(failed[0]);
    let of_user: Vec<i64> = failed
        .iter()
        .copied()
        .filter(|c| user_of(*c) == user)
        .collect();
    let filter = EventQuery {
        user_id: Some(user),
        ..q(EventState::Failed)
    };
    assert_eq!(listed(&store, &filter).await, set(&of_user));
    let timeouts: Vec<i64> = failed.iter().step_by(2).copied().collect();
    let filter = EventQuery {
        error_like: Some("TIMEOUT".into()),
        ..q(EventState::Failed)
    };
    assert_eq!(listed(&store, &filter).await, set(&timeouts));
    // `_` is a character, not a wildcard.
    let filter = EventQuery {
        error_like: Some("auth_f".into()),
        ..q(EventState::Failed)
    };
    assert_eq!(listed(&store, &filter).await.len(), 10);
    let filter = EventQuery {
        error_like: Some("auth%f".into()),
        ..q(EventState::Failed)
    };
    assert!(listed(&store, &filter).await.is_empty());
    let filter = EventQuery {
        error_like: Some("refused".into()),
        ..q(EventState::Retrying)
    };
    assert_eq!(listed(&store, &filter).await, set(&retrying));
    let filter = EventQuery {
        error_like: Some("x".into()),
        ..q(EventState::Queued)
    };
    assert!(listed(&store, &filter).await.is_empty());
    // Queued on NAS 1: its stack rows (compact rows name no NAS ip here).
    let filter = EventQuery {
        nas_id: Some(1),
        ..q(EventState::Queued)
    };
    let want: Vec<i64> = queued_stack
        .iter()
        .copied()
        .filter(|c| user_of(*c) % 2 == 1)
        .collect();
    assert_eq!(listed(&store, &filter).await, set(&want));
    // Time ranges: finished since the start; nothing before it.
    let filter = EventQuery {
        since: Some(start),
        ..q(EventState::Done)
    };
    assert_eq!(listed(&store, &filter).await, set(&done));
    let filter = EventQuery {
        until: Some(start),
        ..q(EventState::Done)
    };
    assert!(listed(&store, &filter).await.is_empty());
    let filter = EventQuery {
        since: Some(Utc::now() + Duration::seconds(60)),
        ..q(EventState::Queued)
    };
    assert!(listed(&store, &filter).await.is_empty());

    // Keyset pages give every event exactly once, newest first.
    for (state, want, size) in [
        (EventState::Queued, &queued, 4),
        (EventState::Failed, &failed, 7),
        (EventState::Done, &done, 3),
        (EventState::Running, &running, 2),
    ] {
        let ids = all_pages(&store, &q(state), size).await;
        let mut sorted = want.clone();
        sorted.sort_unstable_by(|a, b| b.cmp(a));
        assert_eq!(ids, sorted, "{state}");
    }

    // The ids a bulk action would take: every match, newest first, up to the cap.
    let filter = EventQuery {
        error_like: Some("timeout".into()),
        ..q(EventState::Failed)
    };
    let mut want = timeouts.clone();
    want.sort_unstable_by(|a, b| b.cmp(a));
    assert_eq!(
        store
            .events_match_ids(&filter, 10_000)
            .await
            .expect("match"),
        want
    );
    assert_eq!(
        store.events_match_ids(&filter, 3).await.expect("match"),
        want[..3]
    );
    let mut want = queued.clone();
    want.sort_unstable_by(|a, b| b.cmp(a));
    assert_eq!(
        store
            .events_match_ids(&q(EventState::Queued), 10_000)
            .await
            .expect("match"),
        want
    );

    // Bulk retry: failed events get compact copies; others are skipped with the reason.
    let mut ask = timeouts.clone();
    ask.extend([done[0], running[0], queued_compact[0], 999_999, timeouts[0]]);
    let out = store.bulk_retry(&ask).await.expect("bulk retry");
    assert_eq!(out.done.iter().map(|d| d.0).collect::<Vec<_>>(), timeouts);
    assert_eq!(
        out.skipped,
        vec![
            (
                done[0],
                "is done: only failed events can be retried".to_string()
            ),
            (
                running[0],
                "is running: only failed events can be retried".to_string()
            ),
            (
                queued_compact[0],
                "is queued: only failed events can be retried".to_string()
            ),
            (999_999, "does not exist".to_string()),
        ]
    );
    for (old, new) in &out.done {
        let new = new.expect("a new id");
        assert!(new > *old);
        let st = store
            .event_status(new)
            .await
            .expect("status")
            .expect("copy");
        assert_eq!(
            (st.state.as_str(), st.stage.as_str()),
            ("queued", "compact")
        );
        assert_eq!((st.cmd.clone(), st.user_id), (cmd_of(*old), user_of(*old)));
        // The copy names the NAS by its current ip, as `retry_event` does.
        let nas_ip = if user_of(*old) % 2 == 1 {
            "10.20.0.1"
        } else {
            "10.20.0.2"
        };
        assert_eq!(st.nas_ip.as_deref(), Some(nas_ip));
    }
    let retried: Vec<i64> = out.done.iter().filter_map(|d| d.1).collect();
    let mut queued_now = queued.clone();
    queued_now.extend(&retried);
    assert_eq!(
        listed(&store, &q(EventState::Queued)).await,
        set(&queued_now)
    );

    // Bulk cancel: queued (both stacks) and retrying events move to history as failed
    // with the cancel error; running and finished ones are skipped.
    let mut ask: Vec<i64> = vec![queued_compact[1], queued_stack[0], retrying[0], retried[0]];
    ask.extend([running[1], done[1], 888_888]);
    let out = store.bulk_cancel(&ask).await.expect("bulk cancel");
    assert_eq!(
        out.done,
        vec![
            (queued_compact[1], None),
            (queued_stack[0], None),
            (retrying[0], None),
            (retried[0], None)
        ]
    );
    assert_eq!(
        out.skipped,
        vec![
            (
                running[1],
                "is running: only queued or retrying events can be cancelled".to_string()
            ),
            (
                done[1],
                "is done: only queued or retrying events can be cancelled".to_string()
            ),
            (888_888, "does not exist".to_string()),
        ]
    );
    for id in [queued_compact[1], queued_stack[0], retried[0]] {
        let st = store
            .event_status(id)
            .await
            .expect("status")
            .expect("event");
        assert_eq!(
            (st.state.as_str(), st.stage.as_str()),
            ("failed", "history")
        );
        assert_eq!(st.error.as_deref(), Some(CANCELLED));
    }
    let st = store
        .event_status(retrying[0])
        .await
        .expect("status")
        .expect("event");
    assert_eq!(st.state, "failed");
    assert_eq!(
        st.error.as_deref(),
        Some(format!("{CANCELLED} (last error: connection refused)").as_str())
    );
    assert_eq!(st.try_count, 1);
    // The running ones are still running; the cancelled ones are listed as failed.
    assert_eq!(listed(&store, &q(EventState::Running)).await, set(&running));
    let filter = EventQuery {
        error_like: Some(CANCELLED.into()),
        ..q(EventState::Failed)
    };
    assert_eq!(
        listed(&store, &filter).await,
        set(&[queued_compact[1], queued_stack[0], retrying[0], retried[0]])
    );
    // A second cancel finds them failed.
    let again = store.bulk_cancel(&[queued_stack[0]]).await.expect("cancel");
    assert!(again.done.is_empty());
    assert_eq!(
        again.skipped,
        vec![(
            queued_stack[0],
            "is failed: only queued or retrying events can be cancelled".to_string()
        )]
    );

    // Account search by user id, abonent id, ip, MAC in any notation, login.
    let search = |text: &'static str| {
        let store = store.clone();
        async move {
            store
                .account_search(text, 50)
                .await
                .expect("search")
                .iter()
                .map(|a| a.user_id)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(search("3").await, vec![3]);
    assert_eq!(search(" 1003 ").await, vec![3]);
    assert_eq!(search("5000").await, vec![100]);
    assert_eq!(search("10.88.0.4").await, vec![3]);
    assert_eq!(search("aa-bb-cc-dd-ee-01").await, vec![100]);
    assert_eq!(search("aabb.ccdd.ee01").await, vec![100]);
    assert_eq!(search("AA:BB:CC:DD:EE:01").await, vec![100]);
    assert_eq!(search("ivanov").await, vec![100]);
    assert_eq!(search("IVA").await, vec![100]);
    assert_eq!(
        search("user1").await,
        vec![1, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]
    );
    assert_eq!(search("user2").await, vec![2, 20]);
    assert!(search("nobody").await.is_empty());
    assert!(search("").await.is_empty());
    let hit = &store.account_search("ivanov", 5).await.expect("search")[0];
    assert_eq!(
        (
            hit.abonent_id,
            hit.nas_id,
            hit.login.as_deref(),
            hit.ip.as_deref(),
            hit.mac.as_deref()
        ),
        (
            5000,
            1,
            Some("Ivanov"),
            Some("10.99.0.1"),
            Some("AA:BB:CC:DD:EE:01")
        )
    );

    // An account's timeline: its events, newest first, in every state.
    let timeline = store.account_timeline(1, 100).await.expect("timeline");
    // Its share of the 60, its user_info (the first of the 5 queued), its retry copies.
    let mut want: Vec<i64> = compact_ids
        .iter()
        .copied()
        .filter(|c| user_of(*c) == 1)
        .collect();
    want.push(queued_compact[0]);
    for (old, new) in timeouts.iter().zip(&retried) {
        if user_of(*old) == 1 {
            want.push(*new);
        }
    }
    want.sort_unstable_by(|a, b| b.cmp(a));
    assert_eq!(timeline.iter().map(|e| e.id).collect::<Vec<_>>(), want);
    assert!(timeline.iter().all(|e| e.user_id == 1));
    assert_eq!(
        store.account_timeline(1, 2).await.expect("timeline").len(),
        2
    );

    // The audit log, newest first, paged by id.
    let mut ids = Vec::new();
    for (i, action) in ["retry", "cancel", "pause"].iter().enumerate() {
        ids.push(
            store
                .audit_insert(&AuditEntry {
                    who: "helpdesk".into(),
                    action: action.to_string(),
                    target: format!("nas {i}"),
                    detail: "from the console".into(),
                    count: i as i64 * 10,
                })
                .await
                .expect("audit"),
        );
    }
    let rows = store.audit_list(None, 2).await.expect("audit list");
    assert_eq!(
        rows.iter().map(|r| r.id).collect::<Vec<_>>(),
        vec![ids[2], ids[1]]
    );
    assert_eq!(
        (
            rows[0].who.as_str(),
            rows[0].action.as_str(),
            rows[0].target.as_str()
        ),
        ("helpdesk", "pause", "nas 2")
    );
    assert_eq!(
        (rows[0].detail.as_str(), rows[0].count),
        ("from the console", 20)
    );
    assert!(
        (Utc::now() - rows[0].at).num_seconds().abs() < 60,
        "{:?}",
        rows[0].at
    );
    let older = store
        .audit_list(Some(ids[1]), 10)
        .await
        .expect("audit list");
    assert_eq!(older.iter().map(|r| r.id).collect::<Vec<_>>(), vec![ids[0]]);

    // Paused round-trips through nas_set_paused and nas_upsert.
    assert!(!store.nas_get(1).await.expect("nas").expect("nas 1").paused);
    assert!(store.nas_set_paused(1, true).await.expect("pause"));
    assert!(store.nas_get(1).await.expect("nas").expect("nas 1").paused);
    assert!(!store.nas_get(2).await.expect("nas").expect("nas 2").paused);
    assert!(!store.nas_set_paused(99, true).await.expect("pause"));
    let mut n2 = store.nas_get(2).await.expect("nas").expect("nas 2");
    n2.paused = true;
    store.nas_upsert(&n2).await.expect("upsert");
    assert!(store.nas_get(2).await.expect("nas").expect("nas 2").paused);
    n2.paused = false;
    store.nas_upsert(&n2).await.expect("upsert");
    assert!(!store.nas_get(2).await.expect("nas").expect("nas 2").paused);

    // A copy carries the audit log and the paused flag.
    let target_env = TestEnv::new(Backend::Sqlite).await;
    let target = target_env.store().await;
    let db = |s: &Store| match s {
        Store::Postgres(p) => Db::Postgres(p.pool().clone()),
        Store::Sqlite(s) => Db::Sqlite(s.pool().clone()),
    };
    let report = copy::copy(&db(&store), &db(&target), &mut |_, _| {})
        .await
        .expect("copy");
    assert!(
        report
            .tables
            .iter()
            .any(|(t, n, _)| t == "nasd_audit" && *n == 3),
        "{:?}",
        report.tables
    );
    let copied = target.audit_list(None, 10).await.expect("audit list");
    assert_eq!(
        copied.iter().map(|r| r.id).collect::<Vec<_>>(),
        vec![ids[2], ids[1], ids[0]]
    );
    assert_eq!(
        copied[0].at.timestamp_millis(),
        rows[0].at.timestamp_millis()
    );
    assert!(target.nas_get(1).await.expect("nas").expect("nas 1").paused);
}
