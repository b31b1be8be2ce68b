//! Claim fencing beyond completions: a lease heartbeat names the claim token, so a
//! claim that went stale (another owner took the event) is not kept alive by the owner
//! that lost it, and that owner's late result is neither recorded, nor journaled as an
//! outcome, nor counted: the NAS log says it was discarded, with the event id.

#[macro_use]
mod common;

use std::time::Duration;

use common::{Backend, TestEnv, add_accounts, event, nas, wait_for};
use nasd::store::Store;
use tokio_util::sync::CancellationToken;

both_backends!(stale_claim_is_not_extended_and_its_result_is_discarded);

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
