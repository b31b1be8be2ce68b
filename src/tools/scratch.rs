//! What the demo and the benchmarks share around a fresh database: a temporary
//! directory, a scratch database (an SQLite file, or a PostgreSQL database created on a
//! server and dropped afterwards), accounts from rows of values, the wait until the
//! daemon has drained the stack, and the enqueue-to-done percentiles read back.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use sqlx::Connection;
use tokio::task::JoinHandle;

use crate::store::{AccountRecord, Store};

/// A directory under the system's temporary directory, named for the tool and the
/// process, removed with everything in it when dropped.
pub struct ScratchDir(PathBuf);

impl ScratchDir {
    /// `$TMPDIR/PREFIX-PID`, created if it is not there.
    pub fn create(prefix: &str) -> anyhow::Result<ScratchDir> {
        let dir = std::env::temp_dir().join(format!("{prefix}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(ScratchDir(dir))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A database that exists for one run: its URL, and for PostgreSQL what to drop.
pub struct ScratchDb {
    pub url: String,
    /// The server URL the database was created through, and its name.
    postgres: Option<(String, String)>,
}

impl ScratchDb {
    /// `database` is `sqlite` (then the database is the file `sqlite_file`) or a
    /// PostgreSQL server URL: a database `name` is created on that server (one of that
    /// name left by an earlier run is dropped first); the database the URL names is not
    /// touched.
    pub async fn create(
        database: &str,
        sqlite_file: &Path,
        name: &str,
    ) -> anyhow::Result<ScratchDb> {
        if database == "sqlite" {
            return Ok(ScratchDb {
                url: format!("sqlite://{}", sqlite_file.display()),
                postgres: None,
            });
        }
        if !database.starts_with("postgres") {
            anyhow::bail!("--database must be `sqlite` or a postgres:// URL");
        }
        let mut admin = sqlx::PgConnection::connect(database)
            .await
            .context("connecting to the PostgreSQL server for the benchmark")?;
        sqlx::query(&format!("DROP DATABASE IF EXISTS {name}"))
            .execute(&mut admin)
            .await?;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await?;
        Ok(ScratchDb {
            url: replace_db_name(database, name),
            postgres: Some((database.to_string(), name.to_string())),
        })
    }

    /// Drops a PostgreSQL database, even while connections are open (best effort: a
    /// server that went away keeps it). An SQLite file goes with its directory.
    pub async fn remove(self) {
        if let Some((admin_url, name)) = self.postgres
            && let Ok(mut admin) = sqlx::PgConnection::connect(&admin_url).await
        {
            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .execute(&mut admin)
                .await;
        }
    }
}

/// postgres://u@h:5432/test -> postgres://u@h:5432/NAME (query string kept).
pub fn replace_db_name(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (url, String::new()),
    };
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    match base[scheme_end..].find('/') {
        Some(slash) => format!("{}/{name}{query}", &base[..scheme_end + slash]),
        None => format!("{base}/{name}{query}"),
    }
}

/// Account rows as `accounts import` reads them: a header of variable names and one
/// row of values per account.
pub fn accounts(
    headers: &[&str],
    rows: impl IntoIterator<Item = Vec<String>>,
) -> anyhow::Result<Vec<AccountRecord>> {
    let headers: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    rows.into_iter()
        .map(|values| AccountRecord::from_fields(&headers, &values).map_err(anyhow::Error::msg))
        .collect()
}

/// Polls history every `poll` until `total` events are in it and returns how many were
/// done and failed; `progress` sees the counts after every poll. An error if the daemon
/// stopped first.
pub async fn wait_drained(
    store: &Store,
    total: i64,
    daemon: &JoinHandle<anyhow::Result<()>>,
    poll: Duration,
    mut progress: impl FnMut(i64, i64),
) -> anyhow::Result<(i64, i64)> {
    loop {
        tokio::time::sleep(poll).await;
        let (done, failed) = store.history_counts().await?;
        progress(done, failed);
        if done + failed >= total {
            return Ok((done, failed));
        }
        if daemon.is_finished() {
            anyhow::bail!("the daemon stopped before the stack was drained");
        }
    }
}

/// Enqueue-to-done latency of the events in history: p50 and p99 in milliseconds.
pub async fn latency_percentiles(store: &Store) -> anyhow::Result<(f64, f64)> {
    let mut lat = store.latencies_ms().await?;
    lat.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 - 1.0) * p) as usize)
            .copied()
            .unwrap_or(0.0)
    };
    Ok((pct(0.5), pct(0.99)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn db_name_replaced() {
        assert_eq!(
            replace_db_name("postgres://postgres@127.0.0.1:5432/test", "x"),
            "postgres://postgres@127.0.0.1:5432/x"
        );
        assert_eq!(replace_db_name("postgres://h", "x"), "postgres://h/x");
        assert_eq!(
            replace_db_name("postgres://h/db?sslmode=disable", "x"),
            "postgres://h/x?sslmode=disable"
        );
    }
}
