//! The one-daemon lock of an SQLite database: `nasd run` holds `<database>.daemon.lock`
//! (its pid inside) while it runs, and a second daemon on the same file is refused.
//!
//! Two locks, each for what the other cannot see. Other processes are kept out by a
//! POSIX record lock (`fcntl(F_SETLK)`): it belongs to the process, so a child forked
//! by any thread neither inherits it nor keeps it alive, and the kernel drops it when
//! the process ends, however it ends. The first version used `flock`, which belongs to
//! the open file description instead: a child forked (or `posix_spawn`ed) by another
//! thread holds a copy of that description until its `exec`, so a daemon that had
//! stopped still looked alive to the next one (the fresh-clone CI failure of
//! tests/api.rs). Record locks never conflict inside one process, so daemons started
//! in-process (tests, `nasd demo`, benchmarks) are kept apart by a process-wide
//! registry of the lock files held.
//!
//! A POSIX lock also ends when its process closes any descriptor of the file, so only
//! this module opens lock files, and only while it holds the registry's mutex.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use anyhow::Context;

/// The lock files held by daemons of this process (canonical paths).
static HELD: Mutex<BTreeSet<PathBuf>> = Mutex::new(BTreeSet::new());

fn held() -> MutexGuard<'static, BTreeSet<PathBuf>> {
    // The set is changed by single inserts and removes, so a panic elsewhere while the
    // mutex was held cannot have left it half-written.
    HELD.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The lock of one SQLite database, held by the live daemon; dropping it releases it.
#[derive(Debug)]
pub struct DaemonLock {
    /// Always `Some` until `drop` closes it.
    file: Option<File>,
    path: PathBuf,
}

impl DaemonLock {
    /// The lock file (`<database>.daemon.lock`, canonical).
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for DaemonLock {
    fn drop(&mut self) {
        // The file closes before the registry lets another in-process daemon open its
        // own descriptor; closing ours after that would drop the lock it had just taken.
        // The file itself stays: removing it could let a newcomer lock a new file of
        // the same name while a slower one still holds the old one.
        let mut held = held();
        drop(self.file.take());
        held.remove(&self.path);
    }
}

/// Takes the one-daemon lock of the SQLite database in `url`: `None` for PostgreSQL and
/// in-memory databases, an error naming the running daemon's pid when another daemon
/// (in this process or another one) serves the same file.
pub fn lock_sqlite(url: &str) -> anyhow::Result<Option<DaemonLock>> {
    let Some(database) = sqlite_file(url)? else {
        return Ok(None);
    };
    let path = lock_path(&database)?;
    let mut held = held();
    if held.contains(&path) {
        return Err(in_use(&database, &path, &std::process::id().to_string()));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("opening the daemon lock {}", path.display()))?;
    if !try_lock(&file).with_context(|| format!("locking {}", path.display()))? {
        return Err(in_use(&database, &path, &holder(&file)));
    }
    let pid = format!("{}\n", std::process::id());
    file.set_len(0)
        .and_then(|()| file.write_all_at(pid.as_bytes(), 0))
        .with_context(|| format!("writing the pid into {}", path.display()))?;
    held.insert(path.clone());
    Ok(Some(DaemonLock {
        file: Some(file),
        path,
    }))
}

/// The database file an `sqlite:` url names; `None` for other urls and for databases
/// that live in memory (or in a private temporary file), which no other daemon can open.
fn sqlite_file(url: &str) -> anyhow::Result<Option<PathBuf>> {
    if !url.starts_with("sqlite:") {
        return Ok(None);
    }
    let opts: sqlx::sqlite::SqliteConnectOptions = url
        .parse()
        .with_context(|| format!("parsing [database] url `{url}`"))?;
    let file = opts.get_filename();
    let in_memory = url
        .split_once('?')
        .is_some_and(|(_, query)| query.split('&').any(|pair| pair == "mode=memory"))
        // sqlx names `sqlite::memory:` this way.
        || file.to_string_lossy().starts_with("file:sqlx-in-memory-");
    if in_memory || file.as_os_str().is_empty() {
        return Ok(None);
    }
    Ok(Some(file.to_path_buf()))
}

/// `<database>.daemon.lock` beside the database, canonical, so that two spellings of
/// one file (relative, through a symlink) meet at one lock. The directory is created
/// as the store would create it.
fn lock_path(database: &Path) -> anyhow::Result<PathBuf> {
    let canonical = match std::fs::canonicalize(database) {
        Ok(file) => file,
        // The first start: the database does not exist yet, its directory may not.
        Err(_) => {
            let name = database.file_name().with_context(|| {
                format!("the sqlite database {} names no file", database.display())
            })?;
            let dir = match database.parent() {
                Some(dir) if !dir.as_os_str().is_empty() => dir,
                _ => Path::new("."),
            };
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            std::fs::canonicalize(dir)
                .with_context(|| format!("resolving {}", dir.display()))?
                .join(name)
        }
    };
    let mut name = canonical.into_os_string();
    name.push(".daemon.lock");
    Ok(PathBuf::from(name))
}

/// A write lock on the whole file: `Ok(false)` when another process holds it.
fn try_lock(file: &File) -> std::io::Result<bool> {
    let lock = whole_file(libc::F_WRLCK);
    // SAFETY: `file` is an open descriptor for the duration of the call and `lock` is a
    // valid `struct flock` that F_SETLK only reads.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLK, &lock) } == 0 {
        return Ok(true);
    }
    let error = std::io::Error::last_os_error();
    match error.raw_os_error() {
        Some(libc::EACCES | libc::EAGAIN) => Ok(false),
        _ => Err(error),
    }
}

/// The pid of the process holding the lock: the kernel's answer, else the pid the
/// holder wrote (the kernel says 0 for a holder in another pid namespace, and nothing
/// if it has just ended), else "unknown".
fn holder(file: &File) -> String {
    let mut lock = whole_file(libc::F_WRLCK);
    // SAFETY: as in `try_lock`; F_GETLK writes the conflicting lock into `lock`.
    let asked = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETLK, &mut lock) } == 0;
    if asked && i32::from(lock.l_type) != libc::F_UNLCK && lock.l_pid > 0 {
        return lock.l_pid.to_string();
    }
    let mut written = String::new();
    // Read through the descriptor already open: opening a second one would be harmless
    // here (this process holds no lock on the file), but this module keeps to one.
    let mut reader = file;
    match reader.read_to_string(&mut written) {
        Ok(_) if written.trim().parse::<u32>().is_ok() => written.trim().to_string(),
        _ => "unknown".to_string(),
    }
}

fn whole_file(kind: i32) -> libc::flock {
    // SAFETY: `struct flock` is plain data; all zeroes is a valid value (offset 0,
    // length 0 = to the end of the file, however it grows).
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = kind as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    lock
}

fn in_use(database: &Path, lock: &Path, pid: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "database {} is in use by another `nasd run` (pid {pid}, lock {}): one SQLite \
         database serves one daemon; to run several daemons on one queue, put them on \
         PostgreSQL ([database] url = \"postgres://...\")",
        database.display(),
        lock.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(dir: &Path, name: &str) -> String {
        format!("sqlite://{}", dir.join(name).display())
    }

    #[test]
    fn a_second_lock_in_this_process_is_refused_naming_the_pid() {
        let dir = tempfile::tempdir().expect("temp dir");
        let first = lock_sqlite(&url(dir.path(), "nasd.db"))
            .expect("first lock")
            .expect("an sqlite file is locked");
        let refused = lock_sqlite(&url(dir.path(), "nasd.db")).expect_err("second lock");
        let text = format!("{refused:#}");
        assert!(
            text.contains(&format!(
                "database {} is in use by another `nasd run` (pid {}, lock {})",
                dir.path().join("nasd.db").display(),
                std::process::id(),
                first.path().display()
            )) && text.contains("one SQLite database serves one daemon")
                && text.contains("[database] url = \"postgres://...\""),
            "{text}"
        );
        // The pid is in the file for the operator who looks.
        let written = std::fs::read_to_string(first.path()).expect("lock file");
        assert_eq!(written, format!("{}\n", std::process::id()));
    }

    #[test]
    fn the_lock_is_released_when_dropped() {
        let dir = tempfile::tempdir().expect("temp dir");
        let first = lock_sqlite(&url(dir.path(), "nasd.db")).expect("first lock");
        drop(first);
        let again = lock_sqlite(&url(dir.path(), "nasd.db")).expect("locked again after the drop");
        assert!(again.is_some());
    }

    #[test]
    fn two_spellings_of_one_file_meet_at_one_lock() {
        let dir = tempfile::tempdir().expect("temp dir");
        let sub = dir.path().join("var");
        let _first = lock_sqlite(&url(&sub, "nasd.db")).expect("first lock");
        let other = format!("sqlite://{}/../var/nasd.db", sub.display());
        assert!(lock_sqlite(&other).is_err(), "{other} is the same file");
    }

    #[test]
    fn another_file_is_another_lock() {
        let dir = tempfile::tempdir().expect("temp dir");
        let _first = lock_sqlite(&url(dir.path(), "a.db")).expect("first lock");
        let second = lock_sqlite(&url(dir.path(), "b.db")).expect("another database");
        assert!(second.is_some());
    }

    #[test]
    fn postgres_and_in_memory_databases_take_no_lock() {
        for url in [
            "postgres://nasd@127.0.0.1/nasd",
            "sqlite::memory:",
            "sqlite://shared.db?mode=memory",
        ] {
            assert!(lock_sqlite(url).expect(url).is_none(), "{url}");
        }
    }
}
