//! The daemon's log files on disk: the daemon log, one log per NAS and one per account.
//!
//! Layout under `log_dir` (the same as Carbon Billing's `nas_event_daemon`, so operators'
//! habits and scripts keep working):
//! - `nas_event_daemon.log`: syslog-like lines
//!   (`2019-08-27 10:57:41 HOST nas_event_daemon[PID]: MESSAGE`);
//! - `nas_event_daemon/<nas name>_<nas ip>.log`: every attempt for that NAS;
//! - `abonents/<abonent_id>/event_<user_id>.log`: the same lines for one account alone.
//!
//! With `[log] format = "json"` the same files hold one JSON object per line instead
//! ([`attempt_json`], [`daemon_json`]), for Filebeat and Logstash.
//!
//! All writes happen on one dedicated OS thread fed by an unbounded channel, so a slow or
//! full disk never blocks the async send path. Callers format and timestamp lines
//! themselves (the time is when the event happened, not when the disk got to it); the
//! writer only appends. An I/O error is reported once per file with `tracing::warn!`
//! and the affected lines are dropped: losing a log line is better than stopping
//! delivery. The file stays "failing" (see `health`) until lines reach it again; then
//! one more warning says so with the number of lines dropped, and the daemon log gets a
//! line naming the files, since when they failed and the lines lost. [`Journal::health`]
//! gives `/status` and `/metrics` the count of dropped lines and of failing files.
//!
//! Rotation by size happens on the writer thread too: before a write would take a file
//! past its limit, `file.N-1 -> file.N, ..., file -> file.1` and the file starts empty.
//! One write (all lines of one attempt) always lands in one file. With `gzip`, `file.1`
//! is compressed to `file.1.gz` by a helper thread. Each open file's size is read from
//! the OS when it is opened (so the bounded handle cache can close and reopen files at
//! will) and again just before rotating (so a `copytruncate` by logrotate is seen). A file
//! moved or deleted by another program is noticed within [`RECHECK_INTERVAL`] and
//! reopened by its path.
//!
//! `format` holds the lines as pure functions, `writer` the OS thread with its handle
//! cache and rotation, `health` the per-file failure states (pure), `config` the `[log]`
//! settings; this file is the `Journal` API that ties them together.

mod config;
#[cfg(test)]
mod fixtures;
mod format;
mod health;
mod writer;

use std::fmt::Write as _;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{self, Sender};
use std::thread::JoinHandle;

use chrono::Local;

pub use config::{
    DEFAULT_ACCOUNT_MAX_SIZE, DEFAULT_BACKUPS, DEFAULT_MAX_SIZE, LogConfig, LogFormat, parse_size,
};
pub use format::{
    AccountTarget, Attempt, DISCARDED_REASON, NasTarget, PROGRAM, TIME_FORMAT, attempt_json,
    classify_outcome, daemon_json, discarded_json, format_attempt, format_discarded,
    sanitize_file_part,
};
use format::{nas_file_stem, one_line};
pub use health::{FailingFile, JournalHealth, JournalStatus, local_time};
use writer::{DaemonLog, Msg, Target, Writer, open_append};
pub use writer::{MAX_OPEN_FILES, RECHECK_INTERVAL};

/// Handle to the log files. Cheap to clone; all clones feed the same writer thread.
///
/// When the last clone is dropped, the writer thread writes and flushes everything queued
/// (and finishes compressing rotated files) and the drop waits for it (briefly blocking
/// the dropping thread).
#[derive(Clone)]
pub struct Journal {
    inner: Arc<Inner>,
}

struct Inner {
    /// `Option` only so that `Drop` can close the channel before joining the thread.
    tx: Option<Sender<Msg>>,
    thread: Option<JoinHandle<()>>,
    log_dir: PathBuf,
    hostname: String,
    pid: u32,
    /// What a SIGHUP may change (see [`Journal::reconfigure`]).
    settings: std::sync::RwLock<Settings>,
    health: JournalHealth,
}

/// The `[log]` settings read per line.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Settings {
    pub(crate) format: LogFormat,
    pub(crate) max_size: u64,
    pub(crate) account_max_size: u64,
}

impl Journal {
    /// [`Journal::open_with`] the default `[log]` settings (text, rotation at the default
    /// sizes, no gzip).
    pub fn open(log_dir: &Path) -> io::Result<Journal> {
        Journal::open_with(log_dir, &LogConfig::default())
    }

    /// Creates the directory tree, opens the daemon log (so an unwritable `log_dir` fails
    /// here, at startup, rather than silently later) and spawns the writer thread.
    pub fn open_with(log_dir: &Path, cfg: &LogConfig) -> io::Result<Journal> {
        fs::create_dir_all(log_dir)?;
        fs::create_dir_all(log_dir.join(PROGRAM))?;
        fs::create_dir_all(log_dir.join("abonents"))?;
        let daemon_path = daemon_log_path_in(log_dir);
        let daemon_file = open_append(&daemon_path)?;

        let hostname = read_hostname();
        let pid = std::process::id();
        let mut writer = Writer::new(cfg.backups, cfg.gzip)?;
        writer.insert(daemon_path.clone(), daemon_file);
        let (format, host) = (cfg.format, hostname.clone());
        writer.set_daemon_log(DaemonLog {
            path: daemon_path,
            max_size: cfg.max_size,
            line: Box::new(move |message| daemon_line(format, &host, pid, message)),
        });
        let health = writer.health();
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("nasd-journal".to_owned())
            .spawn(move || writer.run(rx))?;

        Ok(Journal {
            inner: Arc::new(Inner {
                tx: Some(tx),
                thread: Some(thread),
                log_dir: log_dir.to_path_buf(),
                hostname,
                pid,
                settings: std::sync::RwLock::new(Settings {
                    format: cfg.format,
                    max_size: cfg.max_size,
                    account_max_size: cfg.account_max_size,
                }),
                health,
            }),
        })
    }

    pub(crate) fn settings(&self) -> Settings {
        *self
            .inner
            .settings
            .read()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// New `[log]` settings (SIGHUP): the format and the rotation sizes apply to the
    /// next line, the backups and gzip to the next rotation. `stderr_format` and the
    /// directory need a restart.
    pub fn reconfigure(&self, cfg: &LogConfig) {
        *self
            .inner
            .settings
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Settings {
            format: cfg.format,
            max_size: cfg.max_size,
            account_max_size: cfg.account_max_size,
        };
        let (format, host, pid) = (cfg.format, self.inner.hostname.clone(), self.inner.pid);
        if let Some(tx) = &self.inner.tx {
            let _ = tx.send(Msg::Configure {
                backups: cfg.backups,
                gzip: cfg.gzip,
                daemon_max_size: cfg.max_size,
                daemon_line: Box::new(move |message| daemon_line(format, &host, pid, message)),
            });
        }
    }

    /// Appends one daemon-log line; newlines in `message` become spaces.
    pub fn daemon(&self, message: &str) {
        let settings = self.settings();
        let line = daemon_line(
            settings.format,
            &self.inner.hostname,
            self.inner.pid,
            message,
        );
        self.send(
            vec![Target {
                path: self.daemon_log_path(),
                max_size: settings.max_size,
            }],
            line,
        );
    }

    /// Appends the lines of one attempt (see [`format_attempt`], or one [`attempt_json`]
    /// line) to the NAS log and to the account log, all with the same timestamp.
    pub fn attempt(&self, nas: &NasTarget, account: &AccountTarget, attempt: &Attempt) {
        let now = Local::now();
        let settings = self.settings();
        let text = match settings.format {
            LogFormat::Text => {
                let ts = now.format(TIME_FORMAT).to_string();
                let mut text = String::new();
                for line in format_attempt(nas, account, attempt) {
                    // Writing to a String cannot fail.
                    let _ = writeln!(text, "{ts} {line}");
                }
                text
            }
            LogFormat::Json => attempt_json(&now, nas, account, attempt) + "\n",
        };
        self.send(
            vec![
                Target {
                    path: self.nas_log_path(nas),
                    max_size: settings.max_size,
                },
                Target {
                    path: self.account_log_path(account),
                    max_size: settings.account_max_size,
                },
            ],
            text,
        );
    }

    /// Appends to the NAS log (only there) that the result of `attempt` was discarded
    /// because its claim went stale: another owner holds the event, so this result is
    /// not an outcome (see [`format_discarded`], or one [`discarded_json`] line).
    pub fn discarded(&self, nas: &NasTarget, account: &AccountTarget, attempt: &Attempt) {
        let now = Local::now();
        let settings = self.settings();
        let text = match settings.format {
            LogFormat::Text => format!(
                "{} {}\n",
                now.format(TIME_FORMAT),
                format_discarded(nas, account, attempt)
            ),
            LogFormat::Json => discarded_json(&now, nas, account, attempt) + "\n",
        };
        self.send(
            vec![Target {
                path: self.nas_log_path(nas),
                max_size: settings.max_size,
            }],
            text,
        );
    }

    /// Blocks until everything queued before the call is written and flushed to the OS
    /// (not fsynced) and every rotated file is compressed. Used by tests and at shutdown;
    /// from async code call it through
    /// `tokio::task::spawn_blocking(move || journal.flush())`, since it waits on the disk.
    pub fn flush(&self) {
        let (ack_tx, ack_rx) = mpsc::channel();
        if let Some(tx) = &self.inner.tx
            && tx.send(Msg::Flush(ack_tx)).is_ok()
        {
            // An error here means the writer is gone; there is nothing left to wait for.
            let _ = ack_rx.recv();
        }
    }

    /// Which log files cannot be written and how many lines were dropped, shared with
    /// the writer thread (for `/status` and `/metrics`).
    pub fn health(&self) -> JournalHealth {
        self.inner.health.clone()
    }

    /// `<log_dir>/nas_event_daemon/<sanitized name>_<sanitized ip>.log`.
    pub fn nas_log_path(&self, nas: &NasTarget) -> PathBuf {
        self.inner
            .log_dir
            .join(PROGRAM)
            .join(format!("{}.log", nas_file_stem(nas)))
    }

    /// `<log_dir>/abonents/<abonent_id or 0>/event_<user_id>.log`.
    pub fn account_log_path(&self, account: &AccountTarget) -> PathBuf {
        self.inner
            .log_dir
            .join("abonents")
            .join(account.abonent_id.unwrap_or(0).to_string())
            .join(format!("event_{}.log", account.user_id))
    }

    /// `<log_dir>/nas_event_daemon.log`.
    pub fn daemon_log_path(&self) -> PathBuf {
        daemon_log_path_in(&self.inner.log_dir)
    }

    fn send(&self, targets: Vec<Target>, text: String) {
        if let Some(tx) = &self.inner.tx {
            // Fails only if the writer thread died; there is nowhere left to log to.
            let _ = tx.send(Msg::Write {
                targets,
                text: text.into(),
            });
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the channel makes the writer drain, flush and exit; waiting for it
        // means nothing queued is lost when the daemon shuts down.
        drop(self.tx.take());
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::warn!("journal writer thread panicked; some log lines may be lost");
        }
    }
}

/// One daemon-log line stamped now, `\n` included; newlines in `message` become spaces.
fn daemon_line(format: LogFormat, hostname: &str, pid: u32, message: &str) -> String {
    let now = Local::now();
    match format {
        LogFormat::Text => format!(
            "{} {hostname} {PROGRAM}[{pid}]: {}\n",
            now.format(TIME_FORMAT),
            one_line(message)
        ),
        LogFormat::Json => daemon_json(&now, hostname, pid, message) + "\n",
    }
}

fn daemon_log_path_in(log_dir: &Path) -> PathBuf {
    log_dir.join(format!("{PROGRAM}.log"))
}

fn read_hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::fixtures::{attempt, gunzip, nas, read_lines};
    use crate::journal::writer::backup_path;
    use std::collections::HashMap;

    #[test]
    fn discarded_goes_to_the_nas_log_only_and_names_the_event() {
        let dir = tempfile::tempdir().expect("temp dir");
        let journal = Journal::open(dir.path()).expect("journal");
        let n = nas(7, "Test NAS", "10.20.11.15");
        let acc = AccountTarget {
            abonent_id: Some(3),
            user_id: 42,
        };
        journal.discarded(&n, &acc, &attempt(99, &["/ip x"], "ok", "done"));
        journal.flush();
        assert_eq!(
            read_lines(&journal.nas_log_path(&n)),
            vec![
                "nas=7 event=99 user_id=42 cmd=user_add try=1 discarded: the claim went stale \
                 (another owner holds the event); the result was not recorded (42 ms)"
            ]
        );
        assert!(!journal.account_log_path(&acc).exists());
        let json = discarded_json(&Local::now(), &n, &acc, &attempt(99, &[], "", "done"));
        let v: serde_json::Value = serde_json::from_str(&json).expect("json");
        assert_eq!(v["kind"], "discarded");
        assert_eq!(v["event_id"], 99);
        assert_eq!(v["level"], "warn");
    }

    #[test]
    fn paths() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        assert_eq!(j.daemon_log_path(), dir.path().join("nas_event_daemon.log"));
        assert_eq!(
            j.nas_log_path(&nas(1, "Test_NAS", "10.20.11.15")),
            dir.path().join("nas_event_daemon/Test_NAS_10.20.11.15.log")
        );
        let evil = j.nas_log_path(&nas(1, "../evil nas", "1.2.3.4"));
        assert_eq!(
            evil,
            dir.path().join("nas_event_daemon/.._evil_nas_1.2.3.4.log")
        );
        assert_eq!(evil.parent().unwrap(), dir.path().join("nas_event_daemon"));
        assert_eq!(
            j.nas_log_path(&nas(1, "..", "/")),
            dir.path().join("nas_event_daemon/____.log")
        );
        assert_eq!(
            j.account_log_path(&AccountTarget {
                abonent_id: Some(12),
                user_id: 345
            }),
            dir.path().join("abonents/12/event_345.log")
        );
        assert_eq!(
            j.account_log_path(&AccountTarget {
                abonent_id: None,
                user_id: 345
            }),
            dir.path().join("abonents/0/event_345.log")
        );
        // open() created the tree up front.
        assert!(dir.path().join("nas_event_daemon").is_dir());
        assert!(dir.path().join("abonents").is_dir());
        assert!(j.daemon_log_path().is_file());
    }

    #[test]
    fn many_accounts_beyond_handle_cap() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let nases = [
            nas(1, "Test NAS", "10.20.11.15"),
            nas(2, "../evil nas", "10.0.0.2"),
        ];
        let accounts: Vec<AccountTarget> = (0..300)
            .map(|i| AccountTarget {
                abonent_id: if i % 10 == 0 { None } else { Some(i / 3) },
                user_id: 1000 + i,
            })
            .collect();
        // Two rounds, so every account file is evicted and reopened (append, not truncate).
        let mut want_nas: Vec<Vec<String>> = vec![Vec::new(); 2];
        let mut want_acc: HashMap<i64, Vec<String>> = HashMap::new();
        let j2 = j.clone();
        for round in 0..2 {
            for (i, acc) in accounts.iter().enumerate() {
                let n = &nases[i % 2];
                let att = Attempt {
                    try_count: round + 1,
                    ..attempt(
                        i as i64,
                        &[&format!("cmd {i}\nsecond {i}")],
                        &format!("answer {i}\r\nmore {round}"),
                        "done",
                    )
                };
                // Clones share the writer; use one for half the calls.
                let target = if i % 2 == 0 { &j } else { &j2 };
                target.attempt(n, acc, &att);
                let lines = format_attempt(n, acc, &att);
                assert_eq!(lines.len(), 5);
                want_nas[i % 2].extend(lines.iter().cloned());
                want_acc.entry(acc.user_id).or_default().extend(lines);
            }
        }
        j.flush();
        for (k, n) in nases.iter().enumerate() {
            assert_eq!(read_lines(&j.nas_log_path(n)), want_nas[k]);
        }
        for acc in &accounts {
            assert_eq!(
                read_lines(&j.account_log_path(acc)),
                want_acc[&acc.user_id],
                "{acc:?}"
            );
        }
        let nas_files = fs::read_dir(dir.path().join("nas_event_daemon"))
            .unwrap()
            .count();
        assert_eq!(nas_files, 2);
        assert!(
            dir.path()
                .join("nas_event_daemon/.._evil_nas_10.0.0.2.log")
                .is_file()
        );
    }

    #[test]
    fn daemon_line_shape() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        j.daemon("Start work with nas nasid=1116 nas_ip=10.90.185.2");
        j.daemon("two\r\nlines\n");
        j.flush();
        let lines = read_lines(&j.daemon_log_path());
        assert_eq!(lines.len(), 2);
        let host = read_hostname();
        let tag = format!("{PROGRAM}[{}]: ", std::process::id());
        let want = [
            "Start work with nas nasid=1116 nas_ip=10.90.185.2",
            "two lines",
        ];
        for (line, want) in lines.iter().zip(want) {
            let (h, rest) = line.split_once(' ').unwrap();
            assert_eq!(h, host);
            assert!(!h.is_empty());
            assert_eq!(rest.strip_prefix(&tag), Some(want), "{line:?}");
        }
    }

    #[test]
    fn flush_makes_lines_visible_and_drop_flushes() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let n = nas(1, "n", "1.1.1.1");
        let acc = AccountTarget {
            abonent_id: Some(1),
            user_id: 1,
        };
        j.flush(); // Nothing queued: returns at once.
        for i in 0..1000 {
            j.attempt(&n, &acc, &attempt(i, &["c"], "", "done"));
        }
        j.flush();
        // Everything queued before flush() is in the files while the journal is alive.
        assert_eq!(read_lines(&j.nas_log_path(&n)).len(), 2000);
        assert_eq!(read_lines(&j.account_log_path(&acc)).len(), 2000);

        // Dropping the last clone writes what is still queued.
        let path = j.nas_log_path(&n);
        let clone = j.clone();
        drop(j);
        clone.attempt(&n, &acc, &attempt(1000, &["c"], "", "done"));
        drop(clone);
        let lines = read_lines(&path);
        assert_eq!(lines.len(), 2002);
        assert!(lines[2001].starts_with("nas=1 event=1000 "));
    }

    #[tokio::test]
    async fn flush_from_async_via_spawn_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        j.daemon("from async");
        let j2 = j.clone();
        tokio::task::spawn_blocking(move || j2.flush())
            .await
            .unwrap();
        assert_eq!(read_lines(&j.daemon_log_path()).len(), 1);
    }

    #[test]
    fn open_fails_when_dir_cannot_be_created() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("plain-file");
        fs::write(&file, "x").unwrap();
        // A regular file in the path: fails even when running as root.
        assert!(Journal::open(&file.join("logs")).is_err());
        assert!(Journal::open(&file).is_err());
    }

    #[test]
    fn write_error_drops_lines_without_panicking() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        // abonents/5 is a file, so the account log cannot be created.
        fs::write(dir.path().join("abonents/5"), "").unwrap();
        let n = nas(1, "n", "1.1.1.1");
        let bad = AccountTarget {
            abonent_id: Some(5),
            user_id: 9,
        };
        for i in 0..3 {
            j.attempt(&n, &bad, &attempt(i, &["c"], "", "done"));
        }
        j.flush();
        // The NAS log still gets every line; the writer keeps running.
        assert_eq!(read_lines(&j.nas_log_path(&n)).len(), 6);
        assert!(!j.account_log_path(&bad).exists());
        j.daemon("still alive");
        j.flush();
        assert_eq!(read_lines(&j.daemon_log_path()).len(), 1);
    }

    #[test]
    fn reconfigure_changes_the_format_and_rotation_of_the_next_lines() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open_with(dir.path(), &LogConfig::default()).unwrap();
        j.daemon("before");
        j.flush();
        j.reconfigure(&LogConfig {
            format: LogFormat::Json,
            max_size: 200,
            backups: 1,
            ..LogConfig::default()
        });
        for i in 0..4 {
            j.daemon(&format!("after {i}"));
        }
        j.flush();
        let now = fs::read_to_string(j.daemon_log_path()).unwrap();
        let rotated =
            fs::read_to_string(writer::backup_path(&j.daemon_log_path(), 1, false)).unwrap();
        // Each JSON line is over half of 200 bytes: every line starts a new file, the
        // one before it is the one backup kept.
        assert!(rotated.contains("after 2"), "{rotated}");
        assert!(!now.contains("before") && !rotated.contains("before"));
        let last = now.lines().last().unwrap();
        let v: serde_json::Value = serde_json::from_str(last).unwrap();
        assert_eq!(v["message"], "after 3");
        assert!(now.len() <= 200 + last.len() + 1, "rotated at the new size");
    }

    #[test]
    fn json_format_writes_one_object_per_line_to_both_logs() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = LogConfig {
            format: LogFormat::Json,
            ..LogConfig::default()
        };
        let j = Journal::open_with(dir.path(), &cfg).unwrap();
        let n = nas(1, "Test NAS", "10.0.0.1");
        let acc = AccountTarget {
            abonent_id: Some(2),
            user_id: 3,
        };
        j.daemon("started");
        for i in 0..3 {
            j.attempt(&n, &acc, &attempt(i, &["a\nb"], "ok\r\nmore", "done"));
        }
        j.flush();
        let parse = |path: PathBuf| -> Vec<serde_json::Value> {
            let text = fs::read_to_string(&path).unwrap();
            assert!(text.ends_with('\n'));
            text.lines()
                .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
                .collect()
        };
        let daemon = parse(j.daemon_log_path());
        assert_eq!(daemon.len(), 1);
        assert_eq!(daemon[0]["kind"], "daemon");
        assert_eq!(daemon[0]["message"], "started");
        assert_eq!(daemon[0]["pid"], std::process::id());
        let nas_lines = parse(j.nas_log_path(&n));
        assert_eq!(nas_lines, parse(j.account_log_path(&acc)));
        assert_eq!(nas_lines.len(), 3);
        for (i, v) in nas_lines.iter().enumerate() {
            assert_eq!(v["event_id"], i);
            assert_eq!(v["nas_name"], "Test NAS");
            assert_eq!(v["user_id"], 3);
            assert_eq!(v["commands"], serde_json::json!(["a\nb"]));
            assert_eq!(v["answer"], "ok\nmore");
        }
    }

    #[test]
    fn journal_rotates_account_logs_beyond_the_handle_cap_without_losing_lines() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = LogConfig {
            max_size: 64 << 10,
            account_max_size: 1024,
            backups: 50,
            gzip: true,
            ..LogConfig::default()
        };
        let j = Journal::open_with(dir.path(), &cfg).unwrap();
        let n = nas(1, "n", "10.0.0.1");
        let accounts: Vec<AccountTarget> = (0..MAX_OPEN_FILES as i64 + 20)
            .map(|i| AccountTarget {
                abonent_id: Some(i % 9),
                user_id: i,
            })
            .collect();
        let mut want_acc: HashMap<i64, Vec<String>> = HashMap::new();
        let mut want_nas = Vec::new();
        for round in 0..12 {
            for acc in &accounts {
                let att = attempt(round, &["add\nset"], "ok", "done");
                j.attempt(&n, acc, &att);
                let lines = format_attempt(&n, acc, &att);
                want_nas.extend(lines.iter().cloned());
                want_acc.entry(acc.user_id).or_default().extend(lines);
            }
        }
        j.flush();
        // Every log reads back whole from its backups (oldest first) and the live file;
        // each file is within its limit and starts with the first line of an attempt.
        let read_all = |path: &Path, max: u64| -> (Vec<String>, usize) {
            let mut lines = Vec::new();
            let mut rotated = 0;
            for k in (1..=50).rev() {
                let gz = backup_path(path, k, true);
                if gz.exists() {
                    rotated += 1;
                    let text = gunzip(&gz);
                    assert!(text.len() as u64 <= max, "{}", gz.display());
                    let decoded = dir.path().join("decoded");
                    fs::write(&decoded, &text).unwrap();
                    let part = read_lines(&decoded);
                    assert!(part[0].contains(" send: add"), "{}: {part:?}", gz.display());
                    lines.extend(part);
                }
                assert!(!backup_path(path, k, false).exists());
            }
            assert!(fs::metadata(path).unwrap().len() <= max);
            lines.extend(read_lines(path));
            (lines, rotated)
        };
        let (nas_lines, nas_rotated) = read_all(&j.nas_log_path(&n), 64 << 10);
        assert_eq!(nas_lines, want_nas);
        assert!(nas_rotated > 10, "{nas_rotated}");
        for acc in &accounts {
            let (lines, rotated) = read_all(&j.account_log_path(acc), 1024);
            assert_eq!(lines, want_acc[&acc.user_id], "{acc:?}");
            assert!(rotated >= 1, "{acc:?}");
        }
    }
}
