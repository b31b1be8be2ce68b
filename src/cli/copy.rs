//! `nasd copy --to URL`, `nasd backup FILE` and `nasd restore FILE`: moving nasd's
//! tables between databases and keeping a snapshot of them (see `store::copy`).
//!
//! - `copy` refuses while a daemon works on the source (SQLite: its lock is held;
//!   PostgreSQL: a daemon's lease is current) and refuses a target that holds rows.
//! - `backup` runs beside a working daemon: SQLite makes an online copy of the file
//!   (`VACUUM INTO`), PostgreSQL writes the snapshot of one repeatable-read transaction
//!   into a new SQLite file. The known_hosts files that pin device identities are copied
//!   beside it (`FILE.known_hosts`, `FILE.known_hosts.tls`).
//! - `restore` copies such a file into the configured database, which must be empty, and
//!   puts the known_hosts files back where the config expects them.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, bail};
use sqlx::ConnectOptions as _;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};

use crate::config::Config;
use crate::store::copy::{self, Backend, Db};

/// `nasd copy --to URL`.
pub async fn copy_to(cfg: &Config, to: &str) -> anyhow::Result<()> {
    let from = cfg.database.url.as_str();
    if same_database(from, to) {
        bail!(
            "copy: the target `{}` is the configured database itself",
            redact(to)
        );
    }
    // Nobody works on the source while it is read (SQLite: the lock stays held).
    let _source_lock = crate::daemon_lock::lock_sqlite(from).context(
        "copy: a daemon is running on the source database; stop it first (systemctl stop nasd)",
    )?;
    let source = open_source(from).await?;
    refuse_live_daemons(&source, "source").await?;
    let (target, _target_lock) = open_target(to, Lock::Take).await?;
    let report = copy::copy(&source, &target, &mut progress()).await?;
    print_report(&report, &redact(from), &redact(to));
    println!(
        "Next: set [database] url = \"{}\" in the config and start nasd on it \
         (the source is left as it was).",
        redact(to)
    );
    Ok(())
}

/// `nasd backup FILE`.
pub async fn backup(cfg: &Config, file: &Path) -> anyhow::Result<()> {
    if file.exists() {
        bail!("backup: {} exists already; name a new file", file.display());
    }
    if let Some(dir) = file.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("backup: cannot create {}", dir.display()))?;
    }
    let from = cfg.database.url.as_str();
    let started = tokio::time::Instant::now();
    match backend_of(from)? {
        Backend::Sqlite => {
            // An online backup: one read transaction, beside a working daemon.
            let source = open_source(from).await?;
            let Db::Sqlite(pool) = &source else {
                bail!("backup: the source is not SQLite");
            };
            let target = file
                .to_str()
                .with_context(|| format!("backup: {} is not a UTF-8 path", file.display()))?;
            sqlx::query("VACUUM INTO ?1")
                .bind(target)
                .execute(pool)
                .await
                .with_context(|| format!("backup: VACUUM INTO {}", file.display()))?;
        }
        Backend::Postgres => {
            let source = open_source(from).await?;
            let url = format!("sqlite://{}", file.display());
            let (target, _lock) = open_target(&url, Lock::NewFile).await?;
            let report = copy::copy(&source, &target, &mut progress()).await?;
            print_report(&report, &redact(from), &url);
            println!(
                "For a backup of the whole PostgreSQL database (roles, the cluster tables, point in \
                 time recovery) use its own tools: pg_dump -Fc -f nasd.dump <database>, or \
                 pg_basebackup with WAL archiving."
            );
        }
    }
    let copied = copy_known_hosts(&cfg.daemon.transport.known_hosts, file, Direction::Out)?;
    let size = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
    println!(
        "Backup written to {} ({} bytes) in {:.1}s{}",
        file.display(),
        size,
        started.elapsed().as_secs_f64(),
        if copied.is_empty() {
            String::new()
        } else {
            format!(
                "; device identities in {}",
                copied
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
    );
    Ok(())
}

/// `nasd restore FILE`.
pub async fn restore(cfg: &Config, file: &Path) -> anyhow::Result<()> {
    if !file.is_file() {
        bail!(
            "restore: {} is not a backup file (it does not exist)",
            file.display()
        );
    }
    let from = format!("sqlite://{}", file.display());
    let source = open_source(&from).await?;
    let to = cfg.database.url.as_str();
    let (target, _lock) = open_target(to, Lock::Take).await?;
    let report = copy::copy(&source, &target, &mut progress()).await?;
    print_report(&report, &file.display().to_string(), &redact(to));
    for placed in copy_known_hosts(&cfg.daemon.transport.known_hosts, file, Direction::In)? {
        println!("Device identities restored to {}", placed.display());
    }
    Ok(())
}

/// Progress on stderr: a line every 100,000 rows of a table.
fn progress() -> impl FnMut(&str, u64) + Send {
    let mut last = 0u64;
    move |table: &str, rows: u64| {
        if rows < last {
            last = 0;
        }
        if rows / 100_000 != last / 100_000 {
            eprintln!("  {table}: {rows} rows copied");
        }
        last = rows;
    }
}

fn print_report(report: &copy::Report, from: &str, to: &str) {
    println!("Copied {from} -> {to}:");
    for (table, rows, sum) in &report.tables {
        println!("  {table:<22} {rows:>10} rows  sha256 {}", &sum[..16]);
    }
    if report.released > 0 {
        println!(
            "  {} claimed event(s) copied as ready, their try counts kept",
            report.released
        );
    }
    println!("Verified: every table's row count and checksum match the source's snapshot.");
}

/// A URL without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

fn same_database(a: &str, b: &str) -> bool {
    a.trim_end_matches('/') == b.trim_end_matches('/')
}

/// The source, opened for reading only (no migration, nothing written).
async fn open_source(url: &str) -> anyhow::Result<Db> {
    match backend_of(url)? {
        Backend::Postgres => {
            // Whole-table reads are slow statements by design: not worth a warning each.
            let opts = sqlx::postgres::PgConnectOptions::from_str(url)
                .with_context(|| format!("parsing {}", redact(url)))?
                .disable_statement_logging();
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(2)
                .acquire_timeout(Duration::from_secs(30))
                .connect_with(opts)
                .await
                .with_context(|| format!("opening the source {}", redact(url)))?;
            Ok(Db::Postgres(pool))
        }
        Backend::Sqlite => {
            let opts = SqliteConnectOptions::from_str(url)
                .with_context(|| format!("parsing {url}"))?
                .create_if_missing(false)
                .busy_timeout(Duration::from_secs(30))
                .disable_statement_logging();
            let pool = SqlitePoolOptions::new()
                .max_connections(1)
                .connect_with(opts)
                .await
                .with_context(|| format!("opening the source {url}"))?;
            Ok(Db::Sqlite(pool))
        }
    }
}

/// The target: created and migrated, locked against a daemon starting on it (SQLite),
/// refused when a daemon works on it or when it holds rows.
/// Whether the target is locked against a daemon starting on it while it is written.
enum Lock {
    Take,
    /// A file this command creates: no daemon can be using it, and no lock file is
    /// left beside a backup.
    NewFile,
}

/// The backend of `url`; an unsupported one is named without its password.
fn backend_of(url: &str) -> anyhow::Result<Backend> {
    Backend::of(url).map_err(|_| {
        anyhow::anyhow!(
            "`{}` is not a database URL nasd uses (sqlite://FILE or postgres://...)",
            redact(url)
        )
    })
}

async fn open_target(
    url: &str,
    lock: Lock,
) -> anyhow::Result<(Db, Option<crate::daemon_lock::DaemonLock>)> {
    backend_of(url)?;
    let lock = match lock {
        Lock::Take => crate::daemon_lock::lock_sqlite(url)
            .context("a daemon is running on the target database; stop it first")?,
        Lock::NewFile => None,
    };
    let store = crate::store::Store::connect(url, 2)
        .await
        .with_context(|| format!("opening the target {}", redact(url)))?;
    store
        .migrate()
        .await
        .with_context(|| format!("creating nasd's tables in the target {}", redact(url)))?;
    let db = match &store {
        crate::store::Store::Postgres(pg) => Db::Postgres(pg.pool().clone()),
        crate::store::Store::Sqlite(s) => Db::Sqlite(s.pool().clone()),
    };
    refuse_live_daemons(&db, "target").await?;
    let full: Vec<String> = copy::counts(&db)
        .await?
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .map(|(t, n)| format!("{t} has {n} rows"))
        .collect();
    if !full.is_empty() {
        bail!(
            "the target {} is not empty ({}): copy only into an empty database (drop and \
             create it again, or name a new SQLite file)",
            redact(url),
            full.join(", ")
        );
    }
    Ok((db, lock))
}

/// PostgreSQL: refuses when a daemon's lease on `db` is current.
async fn refuse_live_daemons(db: &Db, which: &str) -> anyhow::Result<()> {
    let Db::Postgres(pool) = db else {
        return Ok(());
    };
    let live: Vec<(String, String, i32)> = match sqlx::query_as(
        "SELECT id, host, pid FROM nasd_daemons WHERE state IN ('live', 'draining') \
         AND lease_until > now() ORDER BY id",
    )
    .fetch_all(pool)
    .await
    {
        Ok(rows) => rows,
        // A database that never ran a daemon may not have the table yet.
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P01") => Vec::new(),
        Err(e) => return Err(e).context("reading nasd_daemons"),
    };
    if !live.is_empty() {
        bail!(
            "a daemon is working on the {which} database ({}): stop every daemon first \
             (systemctl stop nasd), then copy",
            live.iter()
                .map(|(id, host, pid)| format!("{id} on {host}, pid {pid}"))
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
    Ok(())
}

enum Direction {
    /// From the config's paths to beside the backup file.
    Out,
    /// From beside the backup file to the config's paths.
    In,
}

/// The known_hosts files (SSH, and `.tls` for api-ssl certificates) copied between the
/// config's path and `FILE.known_hosts` / `FILE.known_hosts.tls`. Restoring never
/// overwrites a file that exists and differs: it is written as `<path>.restored` then.
fn copy_known_hosts(
    known_hosts: &Path,
    file: &Path,
    direction: Direction,
) -> anyhow::Result<Vec<PathBuf>> {
    let tls = crate::transport::routeros_api::known_certs_path(known_hosts);
    let pairs = [
        (known_hosts.to_path_buf(), beside(file, "known_hosts")),
        (tls, beside(file, "known_hosts.tls")),
    ];
    let mut placed = Vec::new();
    for (configured, saved) in pairs {
        let (from, mut to) = match direction {
            Direction::Out => (configured, saved),
            Direction::In => (saved, configured),
        };
        let Ok(text) = std::fs::read(&from) else {
            continue;
        };
        if matches!(direction, Direction::In)
            && let Ok(existing) = std::fs::read(&to)
        {
            if existing == text {
                continue;
            }
            to = beside(&to, "restored");
        }
        if let Some(dir) = to.parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        std::fs::write(&to, text).with_context(|| format!("cannot write {}", to.display()))?;
        placed.push(to);
    }
    Ok(placed)
}

/// `FILE.suffix`.
fn beside(file: &Path, suffix: &str) -> PathBuf {
    let mut name = file.as_os_str().to_os_string();
    name.push(".");
    name.push(suffix);
    PathBuf::from(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_password_in_messages() {
        let cases = [
            (
                "postgres://nasd:s3cret@db:5432/nasd",
                "postgres://nasd:***@db:5432/nasd",
            ),
            ("postgres://nasd@db/nasd", "postgres://nasd@db/nasd"),
            ("sqlite://var/nasd.db", "sqlite://var/nasd.db"),
        ];
        for (url, want) in cases {
            assert_eq!(redact(url), want);
        }
        let refused = backend_of("mysql://root:hunter2@db/billing")
            .expect_err("not a nasd database")
            .to_string();
        assert!(refused.contains("mysql://root:***@db/billing"), "{refused}");
        assert!(!refused.contains("hunter2"), "{refused}");
    }

    #[test]
    fn files_beside_the_backup() {
        assert_eq!(
            beside(Path::new("/b/nasd.db"), "known_hosts"),
            PathBuf::from("/b/nasd.db.known_hosts")
        );
        assert!(same_database("sqlite://a.db", "sqlite://a.db/"));
        assert!(!same_database("sqlite://a.db", "sqlite://b.db"));
    }
}
