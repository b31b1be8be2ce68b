//! Claim fencing beyond completions: a lease heartbeat names the claim token, so a
//! claim that went stale (another owner took the event) is not kept alive by the owner
//! that lost it, and that owner's late result is neither recorded, nor journaled as an
//! outcome, nor counted: the NAS log says it was discarded, with the event id.

#[macro_use]
mod common;

use std::time::Duration;

use common::{Backend, TestEnv, add_accounts, event, nas, wait_for};
use nasd::store::{Finish, Outcome, Store};
use tokio_util::sync::CancellationToken;

both_backends!(
    stale_claim_is_not_extended_and_its_result_is_discarded,
    one_statement_serves_many_owners_each_row_under_its_own_token,
);

/// The token a "foreign owner" takes the event with.
const FOREIGN_TOKEN: i64 = 777_777;

/// Direct SQL on the test database, as another daemon would see the rows.
enum Db {
    Pg(sqlx::PgPool),
    Sqlite(sqlx::SqlitePool),
}

impl Db {
    async fn open(env: &TestEnv) -> Db {
        match env.backend {
            Backend::Postgres => Db::Pg(sqlx::PgPool::connect(&env.url).await.expect("pg")),
            Backend::Sqlite => {
                let opts: sqlx::sqlite::SqliteConnectOptions = env.url.parse().expect("sqlite url");
                Db::Sqlite(
                    sqlx::SqlitePool::connect_with(opts.busy_timeout(Duration::from_secs(10)))
                        .await
                        .expect("sqlite"),
                )
            }
        }
    }

    /// (claim token, lease end in ms since the epoch) of a row of events_stack.
    async fn claim_of(&self, id: i64) -> (Option<i64>, Option<i64>) {
        match self {
            Db::Pg(pool) => sqlx::query_as(
                "SELECT claim_token, (extract(epoch FROM lease_until) * 1000)::bigint \
                 FROM events_stack WHERE id = $1",
            )
            .bind(id)
            .fetch_one(pool)
            .await
            .expect("claim of"),
            Db::Sqlite(pool) => {
                sqlx::query_as("SELECT claim_token, lease_until FROM events_stack WHERE id = ?1")
                    .bind(id)
                    .fetch_one(pool)
                    .await
                    .expect("claim of")
            }
        }
    }

    /// Another owner takes the running event `id` under its own token and lease, as
    /// after this owner's lease ran out.
    async fn steal(&self, id: i64, lease_ms: i64) {
        match self {
            Db::Pg(pool) => {
                sqlx::query(
                    "UPDATE events_stack SET claim_token = $2, \
                     lease_until = to_timestamp($3::double precision / 1000) WHERE id = $1",
                )
                .bind(id)
                .bind(FOREIGN_TOKEN)
                .bind(lease_ms)
                .execute(pool)
                .await
                .expect("steal");
            }
            Db::Sqlite(pool) => {
                sqlx::query(
                    "UPDATE events_stack SET claim_token = ?2, lease_until = ?3 WHERE id = ?1",
                )
                .bind(id)
                .bind(FOREIGN_TOKEN)
                .bind(lease_ms)
                .execute(pool)
                .await
                .expect("steal");
            }
        }
    }

    /// Ids of events_stack rows for an account.
    async fn stack_id(&self, user_id: i64) -> Option<i64> {
        match self {
            Db::Pg(pool) => sqlx::query_scalar("SELECT id FROM events_stack WHERE user_id = $1")
                .bind(user_id)
                .fetch_optional(pool)
                .await
                .expect("stack id"),
            Db::Sqlite(pool) => {
                sqlx::query_scalar("SELECT id FROM events_stack WHERE user_id = ?1")
                    .bind(user_id)
                    .fetch_optional(pool)
                    .await
                    .expect("stack id")
            }
        }
    }
}

async fn stale_claim_is_not_extended_and_its_result_is_discarded(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let store: Store = env.store().await;
    let received = env.path().join("received.log");
    let go = env.path().join("go");
    // The first try of every event is held until the test says go; later tries answer
    // at once.
    let script = env.script(
        "session.sh",
        &format!(
            "#!/bin/sh\necho \"$1 user_id=$user_id event=$event_id try=$try_count\" >> {rec}\n\
             if [ \"$try_count\" = 1 ]; then while [ ! -e {go} ]; do sleep 0.02; done; fi\n\
             echo \"ok: $1\"\n",
            rec = received.display(),
            go = go.display()
        ),
    );
    store
        .nas_upsert(&nas(1, Some(&script), None, 2))
        .await
        .unwrap();
    add_accounts(&store, 2, &[1]).await;
    store
        .enqueue_compact(&[event("user_add", 1), event("user_add", 2)])
        .await
        .unwrap();
    let mut cfg = env.config();
    // Heartbeats every lease/3 = 400 ms.
    cfg.daemon.lease = Duration::from_millis(1200);
    let token = CancellationToken::new();
    let handle = tokio::spawn(nasd::daemon::run(cfg, token.clone()));

    // Both first tries are provably in flight: the "device" has them and holds them.
    wait_for(Duration::from_secs(30), "both events in flight", || async {
        std::fs::read_to_string(&received)
            .unwrap_or_default()
            .lines()
            .count()
            == 2
    })
    .await;
    let db = Db::open(&env).await;
    let stolen = db.stack_id(1).await.expect("event of account 1");
    let kept = db.stack_id(2).await.expect("event of account 2");
    // Another owner takes account 1's event with a lease of its own, 4 s from now.
    let foreign_lease = chrono::Utc::now().timestamp_millis() + 4_000;
    db.steal(stolen, foreign_lease).await;

    // Two heartbeats after the steal, seen on the event this owner still holds...
    let (_, mut last) = db.claim_of(kept).await;
    for n in 0..2 {
        wait_for(
            Duration::from_secs(30),
            &format!("heartbeat {n} on the kept claim"),
            || async {
                let (_, lease) = db.claim_of(kept).await;
                lease > last
            },
        )
        .await;
        last = db.claim_of(kept).await.1;
    }
    // ...left the stolen claim as the other owner set it.
    assert_eq!(
        db.claim_of(stolen).await,
        (Some(FOREIGN_TOKEN), Some(foreign_lease)),
        "a heartbeat extended a claim this owner no longer holds"
    );

    // The held tries answer now: the kept one is recorded, the stolen one discarded.
    std::fs::write(&go, "").unwrap();
    wait_for(Duration::from_secs(30), "the kept event done", || async {
        store.history_counts().await.unwrap().0 >= 1
    })
    .await;
    let nas_log = env.path().join("log/nas_event_daemon/NAS_1_10.20.0.1.log");
    wait_for(Duration::from_secs(30), "the discarded line", || async {
        std::fs::read_to_string(&nas_log)
            .unwrap_or_default()
            .contains(&format!("event={stolen} "))
    })
    .await;
    let history = store.history(None, 10).await.unwrap();
    assert_eq!(
        history.len(),
        1,
        "only the kept event is recorded: {history:?}"
    );
    assert_eq!(history[0].user_id, 2);
    let log = std::fs::read_to_string(&nas_log).unwrap();
    let stolen_lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(&format!("event={stolen} ")))
        .collect();
    assert_eq!(stolen_lines.len(), 1, "{log}");
    assert!(
        stolen_lines[0].contains(&format!(
            "nas=1 event={stolen} user_id=1 cmd=user_add try=1 discarded: the claim went stale \
             (another owner holds the event); the result was not recorded ("
        )),
        "{}",
        stolen_lines[0]
    );
    // The account's own log shows no outcome for the discarded try.
    let account_log = env.read("log/abonents/1001/event_1.log");
    assert!(
        !account_log.contains(&format!("event={stolen} ")),
        "{account_log}"
    );

    // When the foreign lease runs out, the event is claimed again (try count kept) and
    // delivered once more: nothing is lost.
    wait_for(Duration::from_secs(30), "the stolen event done", || async {
        store.history_counts().await.unwrap().0 >= 2
    })
    .await;
    token.cancel();
    handle.await.unwrap().unwrap();
    let history = store.history(None, 10).await.unwrap();
    let again = history.iter().find(|h| h.user_id == 1).expect("account 1");
    assert_eq!(again.outcome, "done");
    assert_eq!(again.attempts, 2);
    let log = std::fs::read_to_string(&nas_log).unwrap();
    assert!(
        log.contains(&format!(
            "event={stolen} user_id=1 cmd=user_add try=2 outcome: done"
        )),
        "{log}"
    );
    assert!(
        !log.contains(&format!(
            "event={stolen} user_id=1 cmd=user_add try=1 outcome:"
        )),
        "{log}"
    );
}

fn sorted<T: Ord>(mut v: Vec<T>) -> Vec<T> {
    v.sort();
    v
}

/// The batchers merge the requests of many owners into one statement: each row must
/// still be fenced by its own owner's token, exactly as in a statement of its own.
async fn one_statement_serves_many_owners_each_row_under_its_own_token(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let store: Store = env.store().await;
    let db = Db::open(&env).await;
    for id in [1, 2] {
        let script = env.path().join("unused.sh");
        store
            .nas_upsert(&nas(id, Some(&script), None, 2))
            .await
            .unwrap();
    }
    // Accounts 1 and 3 on NAS 1, 2 and 4 on NAS 2.
    add_accounts(&store, 4, &[1, 2]).await;
    store
        .enqueue_compact(&(1..=4).map(|u| event("user_add", u)).collect::<Vec<_>>())
        .await
        .unwrap();
    let params_query = nasd::config::Config::default().database.params_query;
    store.expand(&params_query, 100).await.unwrap();

    // Two owners' windows in one call: each NAS's events, in id order.
    let loaded = store
        .load_windows(&[(2, 0, 100), (1, 0, 100)])
        .await
        .unwrap();
    let of = |nas_id: i64| -> Vec<(i64, i64)> {
        loaded
            .iter()
            .filter(|e| e.nas_id == nas_id)
            .map(|e| (e.user_id, e.id))
            .collect()
    };
    let (nas1, nas2) = (of(1), of(2));
    assert_eq!(nas1.iter().map(|e| e.0).collect::<Vec<_>>(), vec![1, 3]);
    assert_eq!(nas2.iter().map(|e| e.0).collect::<Vec<_>>(), vec![2, 4]);
    assert!(nas1[0].1 < nas1[1].1 && nas2[0].1 < nas2[1].1);
    // A window's limit holds per NAS, and `after_id` skips what the owner has read.
    let again = store
        .load_windows(&[(1, nas1[0].1, 100), (2, 0, 1)])
        .await
        .unwrap();
    assert_eq!(
        sorted(again.iter().map(|e| e.id).collect()),
        sorted(vec![nas1[1].1, nas2[0].1])
    );

    // Event of account 4 is held by a third owner whose lease has not run out.
    let held = nas2[1].1;
    let future_ms = chrono::Utc::now().timestamp_millis() + 600_000;
    match &db {
        Db::Pg(pool) => {
            sqlx::query("UPDATE events_stack SET state = 'running' WHERE id = $1")
                .bind(held)
                .execute(pool)
                .await
                .unwrap();
        }
        Db::Sqlite(pool) => {
            sqlx::query("UPDATE events_stack SET state = 'running' WHERE id = ?1")
                .bind(held)
                .execute(pool)
                .await
                .unwrap();
        }
    }
    db.steal(held, future_ms).await;

    // One claim statement for owner A (NAS 1, token 11) and owner B (NAS 2, token 22).
    let (a, b) = (11i64, 22i64);
    let now = chrono::Utc::now();
    let claims = [
        (nas1[0].1, a, 0),
        (nas1[1].1, a, 0),
        (nas2[0].1, b, 0),
        (held, b, 0),
    ];
    let claimed = store
        .claim(&claims, now, now + chrono::Duration::seconds(60))
        .await
        .unwrap();
    assert_eq!(
        sorted(claimed.iter().map(|c| (c.id, c.try_count)).collect()),
        sorted(vec![(nas1[0].1, 1), (nas1[1].1, 1), (nas2[0].1, 1)]),
        "the held row must be left out, the rest taken once"
    );
    assert_eq!(db.claim_of(nas1[0].1).await.0, Some(a));
    assert_eq!(db.claim_of(nas1[1].1).await.0, Some(a));
    assert_eq!(db.claim_of(nas2[0].1).await.0, Some(b));
    assert_eq!(
        db.claim_of(held).await,
        (Some(FOREIGN_TOKEN), Some(future_ms))
    );

    // One renewal for both owners: B's claim on the held row is not its own.
    let renewed = store
        .extend_leases(
            &[(nas1[0].1, a), (nas2[0].1, b), (held, b)],
            now + chrono::Duration::seconds(120),
        )
        .await
        .unwrap();
    assert_eq!(sorted(renewed), sorted(vec![nas1[0].1, nas2[0].1]));
    assert_eq!(
        db.claim_of(held).await,
        (Some(FOREIGN_TOKEN), Some(future_ms))
    );

    // One completion for both owners, one row with the wrong token: only the rows
    // fenced by their own token are applied.
    let finish = |id: i64, claim_token: i64| Finish {
        id,
        claim_token,
        outcome: Outcome::Done,
        commands: vec![format!("cmd {id}")],
        answer: "ok".into(),
        error: None,
        duration_ms: 1,
    };
    let applied = store
        .complete(
            &[
                finish(nas1[0].1, a),
                finish(nas2[0].1, b),
                finish(nas1[1].1, b),
            ],
            &[],
            chrono::Utc::now(),
        )
        .await
        .unwrap();
    assert_eq!(sorted(applied), sorted(vec![nas1[0].1, nas2[0].1]));
    assert_eq!(
        db.claim_of(nas1[1].1).await.0,
        Some(a),
        "a foreign token finished a row"
    );
    assert_eq!(
        db.stack_id(1).await,
        None,
        "account 1's event left the stack"
    );
    assert_eq!(db.stack_id(3).await, Some(nas1[1].1));
}
