//! Helpers shared by the integration tests: fresh databases on the real PostgreSQL
//! server and on SQLite files, scripts that record what they receive, polling.
#![allow(dead_code)]

pub mod harness;
pub mod pgbouncer;
pub mod pyrad;
pub mod sshd;
pub mod webhook;

/// Declares each named `async fn NAME(backend: Backend)` of the calling file as two
/// tests, `postgres::NAME` and `sqlite::NAME`.
#[allow(unused_macros)]
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() { super::$name(super::Backend::Postgres).await }
            )*
        }
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() { super::$name(super::Backend::Sqlite).await }
            )*
        }
    };
}

use std::path::{Path, PathBuf};
use std::time::Duration;

use nasd::config::Config;
use nasd::store::{AccountRecord, CompactEvent, Nas, Store};
use sqlx::Connection;

/// The PostgreSQL server the tests use (the README's test command starts it).
pub fn pg_admin_url() -> String {
    std::env::var("NASD_TEST_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

/// A fresh database and a work directory, removed when dropped.
pub struct TestEnv {
    pub backend: Backend,
    pub url: String,
    pub dir: tempfile::TempDir,
    pg_name: Option<String>,
}

impl TestEnv {
    pub async fn new(backend: Backend) -> TestEnv {
        let dir = tempfile::tempdir().expect("temp dir");
        match backend {
            Backend::Sqlite => TestEnv {
                backend,
                url: format!("sqlite://{}", dir.path().join("nasd.db").display()),
                dir,
                pg_name: None,
            },
            Backend::Postgres => {
                let name = format!("nasd_t_{}", rand_suffix());
                let mut admin = sqlx::PgConnection::connect(&pg_admin_url())
                    .await
                    .expect("PostgreSQL must run on 127.0.0.1:5432 (bash scripts/test-setup.sh)");
                sqlx::query(&format!("CREATE DATABASE {name}"))
                    .execute(&mut admin)
                    .await
                    .expect("create test database");
                TestEnv {
                    backend,
                    url: nasd::bench::replace_db_name(&pg_admin_url(), &name),
                    dir,
                    pg_name: Some(name),
                }
            }
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn schemes_dir(&self) -> PathBuf {
        self.path().join("schemes")
    }

    pub fn log_dir(&self) -> PathBuf {
        self.path().join("log")
    }

    /// A config with short intervals so tests run in seconds.
    pub fn config(&self) -> Config {
        let mut cfg = Config::default();
        cfg.database.url = self.url.clone();
        cfg.daemon.log_dir = self.log_dir();
        cfg.daemon.schemes_dir = self.schemes_dir();
        cfg.daemon.resync_interval = Duration::from_millis(300);
        cfg.daemon.poll_interval = Duration::from_millis(50);
        cfg.daemon.retry_base = Duration::from_millis(20);
        cfg.daemon.retry_cap = Duration::from_millis(200);
        cfg.daemon.lease = Duration::from_secs(3);
        cfg.daemon.shutdown_grace = Duration::from_secs(5);
        cfg.validate().expect("valid test config");
        cfg
    }

    pub async fn store(&self) -> Store {
        let store = Store::connect(&self.url, 4).await.expect("connect");
        store.migrate().await.expect("migrate");
        store
    }

    /// Writes an executable script into the work dir and returns its path.
    pub fn script(&self, name: &str, body: &str) -> PathBuf {
        let path = self.path().join(name);
        std::fs::write(&path, body).expect("write script");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        path
    }

    /// Writes `schemes/<name>/scheme.toml`.
    pub fn scheme(&self, name: &str, toml: &str) {
        let dir = self.schemes_dir().join(name);
        std::fs::create_dir_all(&dir).expect("scheme dir");
        std::fs::write(dir.join("scheme.toml"), toml).expect("scheme.toml");
    }

    pub fn read(&self, relative: &str) -> String {
        std::fs::read_to_string(self.path().join(relative)).unwrap_or_default()
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        if let Some(name) = self.pg_name.take() {
            // Best effort: a leftover test database is harmless but untidy.
            let url = pg_admin_url();
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build();
                if let Ok(rt) = rt {
                    rt.block_on(async {
                        if let Ok(mut admin) = sqlx::PgConnection::connect(&url).await {
                            let _ = sqlx::query(&format!(
                                "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                            ))
                            .execute(&mut admin)
                            .await;
                        }
                    });
                }
            })
            .join();
        }
    }
}

fn rand_suffix() -> String {
    use rand::Rng;
    let n: u64 = rand::rng().random();
    format!("{n:016x}")
}

pub fn nas(id: i64, script: Option<&Path>, scheme: Option<&str>, workers: i32) -> Nas {
    Nas {
        id,
        name: format!("NAS {id}"),
        ip: format!("10.20.0.{id}"),
        scheme: scheme.map(str::to_string),
        script_name: script.map(|p| p.display().to_string()),
        n_workers: workers,
        protocol: None,
        port: None,
        login: Some("admin".into()),
        password: Some(nasd::store::Secret::new("nas-password-do-not-log")),
        secret: None,
        max_sessions: 4,
        enabled: true,
        host_key_policy: "strict".into(),
        host_key: None,
        legacy_crypto: false,
        paused: false,
    }
}

/// Accounts 1..=n on the given NAS (round-robin), abonent_id = 1000 + user_id.
pub async fn add_accounts(store: &Store, n: i64, nas_ids: &[i64]) {
    let headers: Vec<String> = [
        "user_id",
        "abonent_id",
        "nas_id",
        "login",
        "ip",
        "rate_in",
        "rate_out",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let records: Vec<AccountRecord> = (1..=n)
        .map(|i| {
            let values = vec![
                i.to_string(),
                (1000 + i).to_string(),
                nas_ids[(i as usize - 1) % nas_ids.len()].to_string(),
                format!("user{i}"),
                format!("10.88.{}.{}", i / 250, i % 250 + 1),
                "10240".into(),
                "5120".into(),
            ];
            AccountRecord::from_fields(&headers, &values).expect("account")
        })
        .collect();
    store.accounts_upsert(&records).await.expect("accounts");
}

pub fn event(cmd: &str, user_id: i64) -> CompactEvent {
    CompactEvent {
        cmd: cmd.into(),
        user_id,
        ..Default::default()
    }
}

/// Polls `check` every 50 ms until it returns true; panics with `what` after `limit`.
pub async fn wait_for<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if check().await {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `n` events are in history.
pub async fn wait_history(store: &Store, n: i64, limit: Duration) {
    wait_for(limit, &format!("{n} events in history"), || async {
        let (done, failed) = store.history_counts().await.expect("history counts");
        done + failed >= n
    })
    .await;
}

/// A script that appends `<user_id> <event_id> <cmd> <try_count> <outcome>` to `log`,
/// where outcome is `ok`, or `retry` with probability `retry_percent`.
pub fn recorder_script(log: &Path, retry_percent: u32, sleep: &str) -> String {
    format!(
        "#!/bin/sh\n\
         r=$(od -An -N2 -tu2 /dev/urandom | tr -d ' ')\n\
         {sleep}\n\
         if [ $((r % 100)) -lt {retry_percent} ]; then\n\
           echo \"$user_id $event_id $1 $try_count retry\" >> {log}\n\
           echo 'postponed by the test'\n\
           exit 254\n\
         fi\n\
         echo \"$user_id $event_id $1 $try_count ok\" >> {log}\n\
         echo \"done $1 for $login ip=$ip\"\n",
        log = log.display()
    )
}
