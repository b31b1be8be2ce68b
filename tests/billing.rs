//! `[billing]` against real billing databases: MariaDB (127.0.0.1:3306, root without a
//! password; `scripts/test-setup.sh` installs it) and PostgreSQL as a billing database
//! of its own beside nasd's. Each test creates its own billing database (and drops it).
//!
//! - variables from the billing reach the device, and a change made in the billing is
//!   seen by the next event without any import (the ABillS-like example);
//! - events from the billing's own table move exactly once (the Carbon-like example),
//!   also when the daemon is killed with SIGKILL between reading them and committing,
//!   and between committing and deleting them from the billing;
//! - a billing database that stops: events wait, `/status` and an alert name it, and
//!   delivery resumes by itself when it is back (a private `mariadbd` started and
//!   killed by the test: the machine's shared server is never stopped);
//! - `nasd check` and the daemon's start refuse a wrong query with MariaDB's message.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{Backend, TestEnv, event, nas, wait_for, wait_history};
use nasd::config::Config;
use sqlx::{Connection, Executor};
use tokio_util::sync::CancellationToken;

fn mysql_admin_url() -> String {
    std::env::var("NASD_TEST_MYSQL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306".into())
}

fn suffix() -> String {
    use rand::Rng;
    let n: u32 = rand::rng().random();
    format!("{n:08x}")
}

/// A database of its own on a MariaDB server, dropped with it.
struct MariaDb {
    admin: String,
    name: String,
}

impl MariaDb {
    async fn create(admin: &str) -> MariaDb {
        let name = format!("nasd_billing_{}", suffix());
        let mut conn = sqlx::MySqlConnection::connect(admin)
            .await
            .expect("MariaDB must run on 127.0.0.1:3306 (bash scripts/test-setup.sh)");
        conn.execute(format!("CREATE DATABASE {name}").as_str())
            .await
            .expect("create billing database");
        MariaDb {
            admin: admin.to_string(),
            name,
        }
    }

    fn url(&self) -> String {
        format!("{}/{}", self.admin.trim_end_matches('/'), self.name)
    }

    async fn conn(&self) -> sqlx::MySqlConnection {
        sqlx::MySqlConnection::connect(&self.url())
            .await
            .expect("connect billing")
    }

    /// Runs each statement of a schema file (statements end with `;` at a line end).
    async fn load(&self, sql: &str) {
        let mut conn = self.conn().await;
        for statement in split_sql(sql) {
            conn.execute(statement.as_str()).await.expect("schema");
        }
    }

    async fn exec(&self, sql: &str) {
        self.conn().await.execute(sql).await.expect(sql);
    }
}

impl Drop for MariaDb {
    fn drop(&mut self) {
        let (admin, name) = (self.admin.clone(), self.name.clone());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            if let Ok(rt) = rt {
                rt.block_on(async {
                    if let Ok(mut conn) = sqlx::MySqlConnection::connect(&admin).await {
                        let _ = conn
                            .execute(format!("DROP DATABASE IF EXISTS {name}").as_str())
                            .await;
                    }
                });
            }
        })
        .join();
    }
}

fn split_sql(sql: &str) -> Vec<String> {
    let without_comments: String = sql
        .lines()
        .filter(|l| !l.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n");
    without_comments
        .split(";\n")
        .map(|s| s.trim().trim_end_matches(';').to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

fn contrib(name: &str) -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("contrib/billing")
            .join(name),
    )
    .expect("contrib file")
}

/// The `[billing]` section of a contrib example with its url replaced.
fn example_section(name: &str, url: &str) -> String {
    let text = contrib(name);
    let line = text
        .lines()
        .find(|l| l.starts_with("url = "))
        .expect("url line");
    text.replace(line, &format!("url = \"{url}\""))
}

/// The test config (short intervals) as TOML text, plus `extra` sections.
fn config_text(env: &TestEnv, extra: &str) -> String {
    format!(
        "[database]\nurl = \"{}\"\n[daemon]\nlog_dir = \"{}\"\nschemes_dir = \"{}\"\n\
         resync_interval = \"300ms\"\npoll_interval = \"50ms\"\nretry_base = \"20ms\"\n\
         retry_cap = \"200ms\"\nlease = \"3s\"\nshutdown_grace = \"5s\"\n{extra}\n",
        env.url,
        env.log_dir().display(),
        env.schemes_dir().display()
    )
}

/// A device that records what it got: one line per attempt with the variables the
/// test looks at.
fn device_script(env: &TestEnv) -> (PathBuf, PathBuf) {
    let log = env.path().join("device.log");
    let script = env.script(
        "device.sh",
        &format!(
            "#!/bin/sh\necho \"$1 user=$user_id event=$event_id session=$acct_session_id login=$login \
             ip=$ip rate_in=$rate_in tariff=$tariff deposit=$deposit balance=$balance nas_id=$nas_id\" >> {}\n\
             echo ok\n",
            log.display()
        ),
    );
    (script, log)
}

fn device_lines(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

async fn start(cfg: Config) -> (CancellationToken, nasd::daemon::Running) {
    let token = CancellationToken::new();
    let running = nasd::daemon::start(cfg, token.clone())
        .await
        .expect("daemon starts");
    (token, running)
}

async fn stop(token: CancellationToken, running: nasd::daemon::Running) {
    token.cancel();
    tokio::time::timeout(Duration::from_secs(30), running.wait())
        .await
        .expect("daemon stops in time")
        .expect("daemon run");
}

async fn abills_users(billing: &MariaDb) {
    billing.load(&contrib("abills.sql")).await;
    billing
        .exec(
            "INSERT INTO tarif_plans VALUES (1, 'home-50', 51200, 25600), (2, 'home-100', 102400, 51200)",
        )
        .await;
    billing
        .exec("INSERT INTO users VALUES (1, 'alice', NULL, 0, 12.50), (2, 'bob', 900, 0, 0), (3, 'carol', NULL, 1, 0)")
        .await;
    billing
        .exec(
            "INSERT INTO internet_main VALUES (1, 1, INET_ATON('10.88.0.11'), 'aa:bb:cc:00:00:01', 1, 101), \
             (2, 2, INET_ATON('10.88.0.12'), '', 1, NULL), (3, 1, INET_ATON('10.88.0.13'), '', 1, NULL)",
        )
        .await;
}

async fn abills_variables(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let store = env.store().await;
    let billing = MariaDb::create(&mysql_admin_url()).await;
    abills_users(&billing).await;
    let (script, log) = device_script(&env);
    store
        .nas_upsert(&nas(1, Some(&script), None, 2))
        .await
        .unwrap();
    let cfg = Config::from_toml(&config_text(
        &env,
        &example_section("abills.toml", &billing.url()),
    ))
    .expect("the example config is valid");
    let (token, running) = start(cfg).await;

    // Nothing in nasd's own accounts table: the variables come from the billing.
    store
        .enqueue_compact(&[event("user_add", 1), event("user_add", 2)])
        .await
        .unwrap();
    wait_history(&store, 2, Duration::from_secs(30)).await;
    let lines = device_lines(&log);
    assert!(
        lines.iter().any(|l| l.contains(
            "user_add user=1 event=1 session= login=alice ip=10.88.0.11 rate_in=51200 tariff=home-50 deposit=12.50"
        )),
        "{lines:#?}"
    );
    assert!(
        lines.iter().any(|l| l.contains("user=2 ")
            && l.contains("rate_in=102400")
            && l.contains("deposit=0 ")),
        "{lines:#?}"
    );
    let history = store.history(None, 10).await.unwrap();
    let bob = history.iter().find(|h| h.user_id == 2).unwrap();
    let abonent = store
        .event_status(bob.compact_id.unwrap())
        .await
        .unwrap()
        .unwrap()
        .abonent_id;
    assert_eq!(abonent, Some(900), "abonent_id from the billing");

    // A change made in the billing is seen by the next event, with no import.
    billing
        .exec("UPDATE internet_main SET tp_id = 2 WHERE uid = 1")
        .await;
    store
        .enqueue_compact(&[event("user_rate_set", 1)])
        .await
        .unwrap();
    wait_history(&store, 3, Duration::from_secs(30)).await;
    let lines = device_lines(&log);
    assert!(
        lines.iter().any(|l| l.starts_with("user_rate_set user=1 ")
            && l.contains("rate_in=102400 tariff=home-100")),
        "{lines:#?}"
    );

    // No row (a disabled user, an unknown one): the event fails with the reason.
    store
        .enqueue_compact(&[event("user_add", 3), event("user_add", 77)])
        .await
        .unwrap();
    wait_history(&store, 5, Duration::from_secs(30)).await;
    let history = store.history(None, 10).await.unwrap();
    for user in [3, 77] {
        let h = history.iter().find(|h| h.user_id == user).unwrap();
        assert_eq!(h.outcome, "failed");
        assert_eq!(
            h.error.as_deref(),
            Some(format!("unknown account user_id={user}").as_str())
        );
    }
    stop(token, running).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_abills_variables_reach_the_device_and_changes_are_seen() {
    abills_variables(Backend::Sqlite).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_abills_variables_reach_the_device_and_changes_are_seen() {
    abills_variables(Backend::Postgres).await
}

async fn carbon_users(billing: &MariaDb, n: i64) {
    billing.load(&contrib("carbon.sql")).await;
    let values: Vec<String> = (1..=n)
        .map(|i| {
            format!(
                "({i}, {}, 'user{i}', '10.77.0.{i}', 1, {}, 1024, 3.25)",
                5000 + i,
                1000 * i
            )
        })
        .collect();
    billing
        .exec(&format!("INSERT INTO USERS VALUES {}", values.join(", ")))
        .await;
}

/// Billing events: `n` rows of EVENTS_STACK_COMPACT, session `b<k>` to tell them apart.
async fn carbon_events(billing: &MariaDb, from: i64, n: i64, users: i64) {
    let values: Vec<String> = (from..from + n)
        .map(|k| format!("('user_add', {}, 'b{k}')", 1 + k % users))
        .collect();
    billing
        .exec(&format!(
            "INSERT INTO EVENTS_STACK_COMPACT (CMD, USER_ID, ACCT_SESSION_ID) VALUES {}",
            values.join(", ")
        ))
        .await;
}

async fn billing_rows_left(billing: &MariaDb) -> i64 {
    sqlx::query_scalar("SELECT COUNT(*) FROM EVENTS_STACK_COMPACT")
        .fetch_one(&mut billing.conn().await)
        .await
        .unwrap()
}

async fn carbon_events_move_once(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let store = env.store().await;
    let billing = MariaDb::create(&mysql_admin_url()).await;
    carbon_users(&billing, 5).await;
    carbon_events(&billing, 1, 30, 5).await;
    let (script, log) = device_script(&env);
    store
        .nas_upsert(&nas(1, Some(&script), None, 2))
        .await
        .unwrap();
    let section = example_section("carbon.toml", &billing.url())
        .replace("events_poll = \"1s\"", "events_poll = \"50ms\"");
    let cfg = Config::from_toml(&config_text(&env, &section)).expect("the example config is valid");
    let (token, running) = start(cfg).await;
    wait_history(&store, 30, Duration::from_secs(60)).await;
    carbon_events(&billing, 31, 10, 5).await;
    wait_history(&store, 40, Duration::from_secs(60)).await;
    wait_for(Duration::from_secs(20), "billing rows deleted", || async {
        billing_rows_left(&billing).await == 0
    })
    .await;
    stop(token, running).await;
    let lines = device_lines(&log);
    let mut sessions: Vec<&str> = lines
        .iter()
        .filter_map(|l| l.split(' ').find(|w| w.starts_with("session=")))
        .collect();
    sessions.sort();
    sessions.dedup();
    assert_eq!(sessions.len(), 40, "{lines:#?}");
    assert!(
        lines.iter().any(|l| l.contains("session=b7 ")
            && l.contains("login=user3 ip=10.77.0.3 rate_in=3000")
            && l.contains("balance=3.25")),
        "{lines:#?}"
    );
    let moved = store.billing_moved().await.unwrap();
    assert_eq!(moved.len(), 40);
    assert!(moved.iter().all(|(_, compact, done)| *compact > 0 && *done));
    assert_eq!(store.billing_cursor().await.unwrap(), 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_carbon_events_move_exactly_once() {
    carbon_events_move_once(Backend::Sqlite).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_carbon_events_move_exactly_once() {
    carbon_events_move_once(Backend::Postgres).await
}

/// PostgreSQL as the billing database, a database of its own beside nasd's (also on
/// PostgreSQL): variables (numeric, inet, an `extra` JSON column) and events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_billing_database_of_its_own() {
    let env = TestEnv::new(Backend::Postgres).await;
    let billing_env = TestEnv::new(Backend::Postgres).await;
    let store = env.store().await;
    let mut conn = sqlx::PgConnection::connect(&billing_env.url).await.unwrap();
    for statement in [
        "CREATE TABLE subscribers (uid BIGINT PRIMARY KEY, login TEXT NOT NULL, addr INET, nas INT, \
         speed NUMERIC(12,0), deposit NUMERIC(12,2), options JSONB)",
        "INSERT INTO subscribers VALUES (1, 'pg-one', '10.66.0.1', 1, 20480, 7.10, '{\"tariff\": \"pg-gold\"}'), \
         (2, 'pg-two', '10.66.0.2', 1, 4096, -1.5, NULL)",
        "CREATE TABLE nas_events (id BIGSERIAL PRIMARY KEY, cmd TEXT NOT NULL, user_id BIGINT NOT NULL, \
         acct_session_id TEXT, moved BOOLEAN NOT NULL DEFAULT false)",
        "INSERT INTO nas_events (cmd, user_id, acct_session_id) VALUES ('user_add', 1, 'p1'), ('user_add', 2, 'p2')",
    ] {
        conn.execute(statement).await.unwrap();
    }
    let (script, log) = device_script(&env);
    store
        .nas_upsert(&nas(1, Some(&script), None, 2))
        .await
        .unwrap();
    let section = format!(
        "[billing]\nurl = \"{}\"\n\
         params_query = \"SELECT uid AS user_id, nas AS nas_id, login, addr AS ip, speed AS rate_in, \
         deposit, options AS extra FROM subscribers WHERE uid = $1\"\n\
         events_query = \"SELECT id, cmd, user_id, acct_session_id FROM nas_events WHERE id > $1 AND NOT moved\"\n\
         after_move = \"UPDATE nas_events SET moved = true WHERE id = $1\"\nevents_poll = \"50ms\"\n",
        billing_env.url
    );
    let cfg = Config::from_toml(&config_text(&env, &section)).unwrap();
    let (token, running) = start(cfg).await;
    wait_history(&store, 2, Duration::from_secs(30)).await;
    // Events from nasd's own compact stack take their variables from the billing too.
    store
        .enqueue_compact(&[event("user_drop", 2)])
        .await
        .unwrap();
    wait_history(&store, 3, Duration::from_secs(30)).await;
    let lines = device_lines(&log);
    assert!(
        lines.iter().any(|l| l.contains(
            "session=p1 login=pg-one ip=10.66.0.1 rate_in=20480 tariff=pg-gold deposit=7.10"
        )),
        "{lines:#?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("user_drop user=2 ") && l.contains("deposit=-1.50")),
        "{lines:#?}"
    );
    wait_for(Duration::from_secs(10), "billing rows marked", || async {
        let mut conn = sqlx::PgConnection::connect(&billing_env.url).await.unwrap();
        sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM nas_events WHERE moved")
            .fetch_one(&mut conn)
            .await
            .unwrap()
            == 2
    })
    .await;
    stop(token, running).await;
    drop(conn);
}

fn spawn_daemon(config: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_nasd"))
        .arg("--config")
        .arg(config)
        .arg("run")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start nasd")
}

/// Waits until a server process of nasd's PostgreSQL waits for a lock in a statement
/// naming `table`.
async fn waiting_on(database: &str, table: &str) {
    wait_for(
        Duration::from_secs(30),
        &format!("nasd waiting on {table}"),
        || async {
            let mut admin = sqlx::PgConnection::connect(&common::pg_admin_url())
                .await
                .unwrap();
            let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = $1 AND wait_event_type = 'Lock' \
             AND query LIKE '%' || $2 || '%'",
        )
        .bind(database)
        .bind(table)
        .fetch_one(&mut admin)
        .await
        .unwrap();
            n > 0
        },
    )
    .await;
}

/// The events source survives a SIGKILL of the real daemon (1) after it read the
/// billing rows and before its transaction committed, (2) after the commit and before
/// the rows were deleted from the billing: nothing is lost and nothing moves twice.
/// The test holds a lock each time (nasd's cursor row, then the billing rows) so that
/// the daemon is certainly inside that window when it is killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_events_source_survives_sigkill() {
    let env = TestEnv::new(Backend::Postgres).await;
    let store = env.store().await;
    let billing = MariaDb::create(&mysql_admin_url()).await;
    carbon_users(&billing, 5).await;
    carbon_events(&billing, 1, 20, 5).await;
    let (script, log) = device_script(&env);
    store
        .nas_upsert(&nas(1, Some(&script), None, 2))
        .await
        .unwrap();
    let section = example_section("carbon.toml", &billing.url())
        .replace("events_poll = \"1s\"", "events_poll = \"50ms\"");
    let config = env.path().join("nasd.toml");
    std::fs::write(&config, config_text(&env, &section)).unwrap();
    let database = env.url.rsplit('/').next().unwrap().to_string();

    // (1) Killed between reading the billing and committing the move.
    let mut nasd_db = sqlx::PgConnection::connect(&env.url).await.unwrap();
    nasd_db
        .execute("INSERT INTO billing_cursor (id, last_id) VALUES (1, 0)")
        .await
        .unwrap();
    let mut held = nasd_db.begin().await.unwrap();
    held.execute("SELECT * FROM billing_cursor WHERE id = 1 FOR UPDATE")
        .await
        .unwrap();
    let mut child = spawn_daemon(&config);
    waiting_on(&database, "billing_cursor").await;
    child.kill().expect("SIGKILL");
    child.wait().expect("reap");
    held.rollback().await.unwrap();
    drop(nasd_db);
    assert_eq!(
        store.billing_cursor().await.unwrap(),
        0,
        "nothing committed"
    );
    assert!(store.billing_moved().await.unwrap().is_empty());
    assert_eq!(store.stack_count().await.unwrap().compact_total, 0);
    assert_eq!(
        billing_rows_left(&billing).await,
        20,
        "nothing deleted in the billing"
    );

    // (2) Killed after the commit, before the billing rows were deleted.
    let mut billing_conn = billing.conn().await;
    let mut billing_held = billing_conn.begin().await.unwrap();
    billing_held
        .execute("SELECT * FROM EVENTS_STACK_COMPACT FOR UPDATE")
        .await
        .unwrap();
    let mut child = spawn_daemon(&config);
    wait_for(Duration::from_secs(30), "the rows moved", || async {
        store.billing_moved().await.unwrap().len() == 20
    })
    .await;
    // The DELETE of `after_move` now waits for the test's lock.
    tokio::time::sleep(Duration::from_millis(300)).await;
    child.kill().expect("SIGKILL");
    child.wait().expect("reap");
    billing_held.rollback().await.unwrap();
    drop(billing_conn);
    assert_eq!(
        billing_rows_left(&billing).await,
        20,
        "the delete did not commit"
    );
    assert!(
        store
            .billing_moved()
            .await
            .unwrap()
            .iter()
            .all(|(_, _, done)| !done)
    );

    // Restarted: the rows are deleted, none moves again, every event is delivered.
    carbon_events(&billing, 21, 5, 5).await;
    let mut child = spawn_daemon(&config);
    wait_history(&store, 25, Duration::from_secs(60)).await;
    wait_for(Duration::from_secs(30), "billing rows deleted", || async {
        billing_rows_left(&billing).await == 0
    })
    .await;
    child.kill().ok();
    child.wait().ok();
    let history = store.history(None, 100).await.unwrap();
    assert_eq!(history.len(), 25, "each billing row became one event");
    assert!(history.iter().all(|h| h.outcome == "done"));
    let moved = store.billing_moved().await.unwrap();
    assert_eq!(moved.len(), 25);
    assert!(moved.iter().all(|(_, _, done)| *done));
    let lines = device_lines(&log);
    let mut sessions: Vec<&str> = lines
        .iter()
        .filter_map(|l| l.split(' ').find(|w| w.starts_with("session=")))
        .collect();
    sessions.sort();
    sessions.dedup();
    assert_eq!(sessions.len(), 25, "{lines:#?}");
}

/// A MariaDB server of the test's own, on a free port, that the test can kill and
/// start again (the machine's shared server is never stopped).
struct OwnMariaDb {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
}

impl OwnMariaDb {
    async fn start() -> OwnMariaDb {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mariadb-install-db")
            .arg("--no-defaults")
            .arg(format!("--datadir={}", dir.path().join("data").display()))
            .arg("--auth-root-authentication-method=normal")
            .arg("--skip-test-db")
            .arg("--user=root")
            .output()
            .expect("mariadb-install-db (scripts/test-setup.sh installs mariadb-server)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut db = OwnMariaDb {
            dir,
            port,
            child: None,
        };
        db.run().await;
        db
    }

    async fn run(&mut self) {
        let d = self.dir.path();
        let child = Command::new("mariadbd")
            .arg("--no-defaults")
            .arg(format!("--datadir={}", d.join("data").display()))
            .arg(format!("--port={}", self.port))
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--socket={}", d.join("sock").display()))
            .arg(format!("--pid-file={}", d.join("pid").display()))
            .arg("--skip-grant-tables")
            .arg("--user=root")
            .arg("--skip-log-bin")
            .arg("--innodb-buffer-pool-size=16M")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mariadbd");
        self.child = Some(child);
        let url = self.admin_url();
        wait_for(Duration::from_secs(60), "private mariadbd up", || async {
            sqlx::MySqlConnection::connect(&url).await.is_ok()
        })
        .await;
    }

    fn admin_url(&self) -> String {
        format!("mysql://root@127.0.0.1:{}", self.port)
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().ok();
            child.wait().ok();
        }
    }
}

impl Drop for OwnMariaDb {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The billing database stops (SIGKILL of its server) and starts again: events wait
/// (none fails), `/status` and a `billing_down` alert name it, and delivery resumes by
/// itself (`billing_up`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_billing_stopped_and_started_again() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let store = env.store().await;
    let mut server = OwnMariaDb::start().await;
    let billing = MariaDb::create(&server.admin_url()).await;
    carbon_users(&billing, 5).await;
    carbon_events(&billing, 1, 3, 5).await;
    let (script, log) = device_script(&env);
    store
        .nas_upsert(&nas(1, Some(&script), None, 2))
        .await
        .unwrap();
    let receiver = common::webhook::Receiver::start().await;
    let section = example_section("carbon.toml", &billing.url())
        .replace("events_poll = \"1s\"", "events_poll = \"50ms\"")
        .replace("connect_timeout = \"5s\"", "")
        + "connect_timeout = \"1s\"\n";
    let text = config_text(
        &env,
        &format!(
            "[api]\nlisten = \"127.0.0.1:0\"\n[alerts]\nwebhooks = [\"http://{}/hook\"]\ncheck_interval = \"100ms\"\ntimeout = \"2s\"\n{section}",
            receiver.addr
        ),
    );
    let cfg = Config::from_toml(&text).unwrap();
    let (token, running) = start(cfg).await;
    let addr = running.api_addr.unwrap();
    wait_history(&store, 3, Duration::from_secs(30)).await;

    server.kill();
    // Events of nasd's own stack and of the billing's table wait.
    store
        .enqueue_compact(&[event("user_add", 1), event("user_drop", 2)])
        .await
        .unwrap();
    wait_for(
        Duration::from_secs(30),
        "/status names the billing",
        || async {
            let r = nasd::tools::http_client::request(addr, "GET", "/status", &[], b"")
                .await
                .unwrap();
            r.status == 503
                && r.text()
                    .contains("billing database mysql://root@127.0.0.1:")
        },
    )
    .await;
    wait_for(Duration::from_secs(30), "billing_down alert", || async {
        !receiver.hooks("billing_down").is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (done, failed) = store.history_counts().await.unwrap();
    assert_eq!((done, failed), (3, 0), "the events wait, none fails");
    assert_eq!(store.stack_count().await.unwrap().compact_total, 2);
    let daemon_log =
        std::fs::read_to_string(env.log_dir().join("nas_event_daemon.log")).unwrap_or_default();
    assert!(
        daemon_log.contains("events wait until it answers again"),
        "{daemon_log}"
    );

    server.run().await;
    carbon_events(&billing, 4, 2, 5).await;
    wait_history(&store, 7, Duration::from_secs(60)).await;
    wait_for(
        Duration::from_secs(30),
        "billing_up alert and /status OK",
        || async {
            let r = nasd::tools::http_client::request(addr, "GET", "/status", &[], b"")
                .await
                .unwrap();
            !receiver.hooks("billing_up").is_empty() && r.status == 200
        },
    )
    .await;
    let (done, failed) = store.history_counts().await.unwrap();
    assert_eq!((done, failed), (7, 0));
    assert_eq!(device_lines(&log).len(), 7);
    stop(token, running).await;
}

/// `nasd check` and `nasd run` refuse a query the billing refuses, with its message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_query_is_refused_by_check_and_at_start() {
    let env = TestEnv::new(Backend::Sqlite).await;
    env.store().await;
    std::fs::create_dir_all(env.schemes_dir()).unwrap();
    let billing = MariaDb::create(&mysql_admin_url()).await;
    abills_users(&billing).await;
    let config = env.path().join("nasd.toml");
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_nasd"))
            .arg("--config")
            .arg(&config)
            .args(args)
            .output()
            .expect("nasd")
    };
    // The example is accepted.
    std::fs::write(
        &config,
        config_text(&env, &example_section("abills.toml", &billing.url())),
    )
    .unwrap();
    let out = run(&["check"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{text}");
    assert!(text.contains("ok       billing: mysql database"), "{text}");
    // `nasd send` takes the account's variables from the billing too (nothing of
    // alice is in nasd's own accounts table).
    let store = env.store().await;
    let script = env.script(
        "dev.sh",
        "#!/bin/sh
echo ok\n",
    );
    store
        .nas_upsert(&nas(1, Some(&script), None, 1))
        .await
        .unwrap();
    let out = run(&[
        "send",
        "--nas",
        "1",
        "--cmd",
        "user_add",
        "--user-id",
        "1",
        "--dry-run",
    ]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("10.88.0.11"), "{text}");
    // A column that does not exist: MariaDB's own message.
    let wrong =
        example_section("abills.toml", &billing.url()).replace("i.cid AS mac", "i.no_such AS mac");
    std::fs::write(&config, config_text(&env, &wrong)).unwrap();
    let out = run(&["check"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("Unknown column 'i.no_such'"), "{text}");
    let out = run(&["run"]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success());
    assert!(err.contains("Unknown column 'i.no_such'"), "{err}");
    // A column of a type nasd cannot use is named.
    let geometry = example_section("abills.toml", &billing.url())
        .replace("u.deposit AS deposit", "POINT(1, 2) AS spot");
    std::fs::write(&config, config_text(&env, &geometry)).unwrap();
    let out = run(&["check"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("column spot has type GEOMETRY that nasd cannot use"),
        "{text}"
    );
}
