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
//! writer only appends. An I/O error is reported once with `tracing::warn!` and the
//! affected lines are dropped: losing a log line is better than stopping delivery.
//!
//! Rotation by size happens on the writer thread too: before a write would take a file
//! past its limit, `file.N-1 -> file.N, ..., file -> file.1` and the file starts empty.
//! One write (all lines of one attempt) always lands in one file. With `gzip`, `file.1`
//! is compressed to `file.1.gz` by a helper thread. Each open file's size is read from
//! the OS when it is opened (so the bounded handle cache can close and reopen files at
//! will) and again just before rotating (so a `copytruncate` by logrotate is seen). A file
//! moved or deleted by another program is noticed within [`RECHECK_INTERVAL`] and
//! reopened by its path.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use chrono::{DateTime, Local, SecondsFormat};
use serde::Serialize;

/// Program name in daemon-log lines: operators grep for it, as with the old daemon.
pub const PROGRAM: &str = "nas_event_daemon";
/// At most this many files are kept open by the writer thread (least recently used go).
pub const MAX_OPEN_FILES: usize = 256;
/// Timestamp format that starts every line.
pub const TIME_FORMAT: &str = "%Y-%m-%d %H:%M:%S";
/// An open file whose path was last checked this long ago is checked again (by `stat`)
/// before the next write, so a file moved away by logrotate is reopened by its path.
pub const RECHECK_INTERVAL: Duration = Duration::from_secs(1);
/// Default `[log] max_size`: the daemon log and each NAS log (50 MiB).
pub const DEFAULT_MAX_SIZE: u64 = 50 << 20;
/// Default `[log] account_max_size`: each account log (1 MiB).
pub const DEFAULT_ACCOUNT_MAX_SIZE: u64 = 1 << 20;
/// Default `[log] backups`: rotated files kept per log.
pub const DEFAULT_BACKUPS: u32 = 5;
/// The writer flushes at least every this many messages even when the queue never
/// empties, so a sustained burst still reaches the OS promptly.
const MAX_BATCH: usize = 4096;
/// Longest sanitized NAS name kept in a file name, well below the usual 255-byte limit.
const MAX_NAME_LEN: usize = 100;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// The Carbon-compatible text lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl LogFormat {
    /// `"text"` or `"json"`.
    pub fn parse(text: &str) -> Result<LogFormat, String> {
        match text.trim() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!(
                "`{other}` is not a log format: use \"text\" or \"json\""
            )),
        }
    }
}

/// `[log]`: format and rotation of the log files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    pub format: LogFormat,
    /// Rotate the daemon log and each NAS log before it would exceed this many bytes
    /// (0: never).
    pub max_size: u64,
    /// The same for each account log (0: never).
    pub account_max_size: u64,
    /// Rotated files kept per log: `file.1` (newest) .. `file.N`. 0: a full log is
    /// simply started again.
    pub backups: u32,
    /// Compress rotated files to `file.1.gz` ...
    pub gzip: bool,
    /// Format of the daemon's own diagnostics on stderr (tracing).
    pub stderr_format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> LogConfig {
        LogConfig {
            format: LogFormat::Text,
            max_size: DEFAULT_MAX_SIZE,
            account_max_size: DEFAULT_ACCOUNT_MAX_SIZE,
            backups: DEFAULT_BACKUPS,
            gzip: false,
            stderr_format: LogFormat::Text,
        }
    }
}

/// A size such as `512KB`, `10MB`, `1GB` or a plain number of bytes. Units are binary
/// (`KB` = `K` = `KiB` = 1024) and case-insensitive.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let bad = || format!("`{text}` is not a size such as 512KB, 10MB or a number of bytes");
    let t = text.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(digits);
    if number.is_empty() {
        return Err(bad());
    }
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return Err(bad()),
    };
    number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(multiplier))
        .ok_or_else(|| format!("`{text}` is too large"))
}

/// The NAS an attempt went to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NasTarget {
    pub id: i64,
    pub name: String,
    pub ip: String,
}

/// The account an attempt was for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AccountTarget {
    pub abonent_id: Option<i64>,
    pub user_id: i64,
}

/// One try of one event, as the dispatcher saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    pub event_id: i64,
    pub cmd: String,
    pub try_count: i32,
    /// Exactly as sent, so an operator can copy-paste them into a shell.
    pub commands: Vec<String>,
    /// Device output (may be multi-line, may be empty).
    pub answer: String,
    /// E.g. "done", "retry in 2s: exit 254", "failed: scheme x does not define cmd y".
    pub outcome: String,
    pub duration: Duration,
}

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
    format: LogFormat,
    max_size: u64,
    account_max_size: u64,
}

/// A file to append to and the size it may grow to (0: no limit).
struct Target {
    path: PathBuf,
    max_size: u64,
}

enum Msg {
    /// Append `text` (complete lines, each ending in `\n`) to every target.
    Write {
        targets: Vec<Target>,
        text: Arc<str>,
    },
    /// Answer once everything queued before this message is flushed to the OS and every
    /// rotated file is compressed.
    Flush(Sender<()>),
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

        let mut writer = Writer::new(cfg.backups, cfg.gzip)?;
        writer.insert(daemon_path, daemon_file);
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("nasd-journal".to_owned())
            .spawn(move || writer.run(rx))?;

        Ok(Journal {
            inner: Arc::new(Inner {
                tx: Some(tx),
                thread: Some(thread),
                log_dir: log_dir.to_path_buf(),
                hostname: read_hostname(),
                pid: std::process::id(),
                format: cfg.format,
                max_size: cfg.max_size,
                account_max_size: cfg.account_max_size,
            }),
        })
    }

    /// Appends one daemon-log line; newlines in `message` become spaces.
    pub fn daemon(&self, message: &str) {
        let now = Local::now();
        let line = match self.inner.format {
            LogFormat::Text => format!(
                "{} {} {}[{}]: {}\n",
                now.format(TIME_FORMAT),
                self.inner.hostname,
                PROGRAM,
                self.inner.pid,
                one_line(message)
            ),
            LogFormat::Json => {
                daemon_json(&now, &self.inner.hostname, self.inner.pid, message) + "\n"
            }
        };
        self.send(
            vec![Target {
                path: self.daemon_log_path(),
                max_size: self.inner.max_size,
            }],
            line,
        );
    }

    /// Appends the lines of one attempt (see [`format_attempt`], or one [`attempt_json`]
    /// line) to the NAS log and to the account log, all with the same timestamp.
    pub fn attempt(&self, nas: &NasTarget, account: &AccountTarget, attempt: &Attempt) {
        let now = Local::now();
        let text = match self.inner.format {
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
                    max_size: self.inner.max_size,
                },
                Target {
                    path: self.account_log_path(account),
                    max_size: self.inner.account_max_size,
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
        let text = match self.inner.format {
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
                max_size: self.inner.max_size,
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

fn attempt_prefix(nas: &NasTarget, account: &AccountTarget, attempt: &Attempt) -> String {
    format!(
        "nas={} event={} user_id={} cmd={} try={}",
        nas.id,
        attempt.event_id,
        account.user_id,
        one_line(&attempt.cmd),
        attempt.try_count
    )
}

fn outcome_line(prefix: &str, attempt: &Attempt) -> String {
    format!(
        "{prefix} outcome: {} ({} ms)",
        one_line(&attempt.outcome),
        attempt.duration.as_millis()
    )
}

/// The lines of one attempt, without timestamps: one `send:` line per command line, one
/// `answer:` line per non-empty answer line, then the `outcome:` line.
pub fn format_attempt(nas: &NasTarget, account: &AccountTarget, attempt: &Attempt) -> Vec<String> {
    let prefix = attempt_prefix(nas, account, attempt);
    let mut lines = Vec::new();
    for command in &attempt.commands {
        for part in split_lines(command) {
            lines.push(format!("{prefix} send: {part}"));
        }
    }
    for part in split_lines(&attempt.answer) {
        lines.push(format!("{prefix} answer: {part}"));
    }
    lines.push(outcome_line(&prefix, attempt));
    lines
}

/// Why a discarded result is not recorded (the text after `discarded:`).
pub const DISCARDED_REASON: &str =
    "the claim went stale (another owner holds the event); the result was not recorded";

/// The NAS-log line (without timestamp) for a result discarded by the claim fence:
/// `nas=N event=E user_id=U cmd=C try=T discarded: the claim went stale ... (D ms)`.
pub fn format_discarded(nas: &NasTarget, account: &AccountTarget, attempt: &Attempt) -> String {
    format!(
        "{} discarded: {DISCARDED_REASON} ({} ms)",
        attempt_prefix(nas, account, attempt),
        attempt.duration.as_millis()
    )
}

/// One JSON record for a discarded result (no trailing newline).
#[derive(Serialize)]
struct DiscardedRecord<'a> {
    ts: String,
    kind: &'static str,
    level: &'static str,
    nas_id: i64,
    nas_name: &'a str,
    nas_ip: &'a str,
    abonent_id: Option<i64>,
    user_id: i64,
    event_id: i64,
    cmd: String,
    #[serde(rename = "try")]
    try_count: i32,
    reason: &'static str,
    message: String,
}

/// A discarded result as JSON: `kind` = `discarded`, `level` = `warn`, the NAS, account
/// and event fields of an attempt record, `reason`, and the text line as `message`.
pub fn discarded_json(
    ts: &DateTime<Local>,
    nas: &NasTarget,
    account: &AccountTarget,
    attempt: &Attempt,
) -> String {
    to_json(&DiscardedRecord {
        ts: rfc3339(ts),
        kind: "discarded",
        level: "warn",
        nas_id: nas.id,
        nas_name: &nas.name,
        nas_ip: &nas.ip,
        abonent_id: account.abonent_id,
        user_id: account.user_id,
        event_id: attempt.event_id,
        cmd: one_line(&attempt.cmd),
        try_count: attempt.try_count,
        reason: DISCARDED_REASON,
        message: format_discarded(nas, account, attempt),
    })
}

/// What an outcome text says, for the JSON `outcome` field and its reason (`error`):
/// `done`, `retry` (will be tried again), `failed` (for good), or `other` for a text this
/// function does not know (the full text is always in `outcome_text`).
pub fn classify_outcome(text: &str) -> (&'static str, Option<&str>) {
    let (head, reason) = match text.split_once(": ") {
        Some((head, reason)) => (head, Some(reason)),
        None => (text, None),
    };
    if head.starts_with("done") {
        ("done", None)
    } else if head.starts_with("retry") || head.ends_with("would retry") {
        ("retry", reason)
    } else if head.starts_with("failed") || head.ends_with("failed") {
        ("failed", reason)
    } else {
        ("other", None)
    }
}

fn rfc3339(ts: &DateTime<Local>) -> String {
    ts.to_rfc3339_opts(SecondsFormat::Millis, false)
}

/// One JSON daemon-log record (no trailing newline).
#[derive(Serialize)]
struct DaemonRecord<'a> {
    ts: String,
    kind: &'static str,
    level: &'static str,
    host: &'a str,
    program: &'static str,
    pid: u32,
    message: String,
}

/// One JSON attempt record (no trailing newline). Field names are part of the interface
/// (README "Logs"): add fields, never rename them.
#[derive(Serialize)]
struct AttemptRecord<'a> {
    ts: String,
    kind: &'static str,
    level: &'static str,
    nas_id: i64,
    nas_name: &'a str,
    nas_ip: &'a str,
    abonent_id: Option<i64>,
    user_id: i64,
    event_id: i64,
    cmd: String,
    #[serde(rename = "try")]
    try_count: i32,
    outcome: &'static str,
    error: Option<String>,
    outcome_text: String,
    duration_ms: u64,
    commands: &'a [String],
    answer: String,
    message: String,
}

/// A daemon-log line as JSON: `ts`, `kind` = `daemon`, `level`, `host`, `program`, `pid`,
/// `message`.
pub fn daemon_json(ts: &DateTime<Local>, host: &str, pid: u32, message: &str) -> String {
    to_json(&DaemonRecord {
        ts: rfc3339(ts),
        kind: "daemon",
        level: "info",
        host,
        program: PROGRAM,
        pid,
        message: one_line(message),
    })
}

/// One attempt as a JSON line: the same information as [`format_attempt`]'s lines, with
/// the commands as an array (exactly as sent) and the answer as one string (lines joined
/// by `\n`, empty lines dropped). `message` is the text format's `outcome:` line.
pub fn attempt_json(
    ts: &DateTime<Local>,
    nas: &NasTarget,
    account: &AccountTarget,
    attempt: &Attempt,
) -> String {
    let outcome_text = one_line(&attempt.outcome);
    let (outcome, error) = classify_outcome(&outcome_text);
    let level = match outcome {
        "retry" => "warn",
        "failed" => "error",
        _ => "info",
    };
    to_json(&AttemptRecord {
        ts: rfc3339(ts),
        kind: "attempt",
        level,
        nas_id: nas.id,
        nas_name: &nas.name,
        nas_ip: &nas.ip,
        abonent_id: account.abonent_id,
        user_id: account.user_id,
        event_id: attempt.event_id,
        cmd: one_line(&attempt.cmd),
        try_count: attempt.try_count,
        outcome,
        error: error.map(str::to_owned),
        duration_ms: u64::try_from(attempt.duration.as_millis()).unwrap_or(u64::MAX),
        commands: &attempt.commands,
        answer: split_lines(&attempt.answer).collect::<Vec<_>>().join("\n"),
        message: outcome_line(&attempt_prefix(nas, account, attempt), attempt),
        outcome_text,
    })
}

fn to_json<T: Serialize>(record: &T) -> String {
    // Serializing plain strings and numbers into a String cannot fail; an empty object
    // keeps the line valid JSON should it ever do so.
    serde_json::to_string(record).unwrap_or_else(|_| "{}".to_owned())
}

/// File-name-safe form of a NAS name or IP: every char outside `[A-Za-z0-9._-]` becomes
/// `_`, and a name of dots only (`.`, `..`) becomes underscores, so it can never name a
/// directory. Truncated to keep file names within filesystem limits.
pub fn sanitize_file_part(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .take(MAX_NAME_LEN)
        .collect();
    if !out.is_empty() && out.chars().all(|c| c == '.') {
        out = "_".repeat(out.len());
    }
    out
}

fn nas_file_stem(nas: &NasTarget) -> String {
    format!(
        "{}_{}",
        sanitize_file_part(&nas.name),
        sanitize_file_part(&nas.ip)
    )
}

fn daemon_log_path_in(log_dir: &Path) -> PathBuf {
    log_dir.join(format!("{PROGRAM}.log"))
}

/// Splits device output or a command on `\n`, `\r\n` and lone `\r` (telnet sessions
/// produce all three), dropping empty lines: no log line may contain a raw line break.
fn split_lines(text: &str) -> impl Iterator<Item = &str> {
    text.split(['\n', '\r']).filter(|part| !part.is_empty())
}

/// `text` on one line: line breaks become single spaces.
fn one_line(text: &str) -> String {
    split_lines(text).collect::<Vec<_>>().join(" ")
}

fn read_hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// `path` with `suffix` appended to its file name: `x.log` + `.1.gz` = `x.log.1.gz`.
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// `file.i` or `file.i.gz`.
fn backup_path(path: &Path, i: u32, gz: bool) -> PathBuf {
    with_suffix(path, &format!(".{i}{}", if gz { ".gz" } else { "" }))
}

fn ignore_missing(result: io::Result<()>) -> io::Result<()> {
    match result {
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Shifts the backups of `path` (`file.N` is dropped, `file.i -> file.i+1`, compressed or
/// not) and renames `path` to `file.1`, which it returns; with no backups `path` is just
/// removed. An error leaves `path` where it was (the shifts before it only renamed
/// backups into free names), so appending to it goes on.
fn shift_backups(path: &Path, backups: u32) -> io::Result<Option<PathBuf>> {
    if backups == 0 {
        ignore_missing(fs::remove_file(path))?;
        return Ok(None);
    }
    for gz in [false, true] {
        ignore_missing(fs::remove_file(backup_path(path, backups, gz)))?;
    }
    for i in (1..backups).rev() {
        for gz in [false, true] {
            ignore_missing(fs::rename(
                backup_path(path, i, gz),
                backup_path(path, i + 1, gz),
            ))?;
        }
    }
    let first = backup_path(path, 1, false);
    fs::rename(path, &first)?;
    Ok(Some(first))
}

/// Compresses `src` to `src.gz` (through `src.gz.tmp`, so a crash of nasd never leaves
/// a truncated `.gz`), then removes `src`. On error `src` is kept as it was. Not fsynced,
/// like the logs themselves: a backup is not worth a disk flush per rotation.
fn gzip_file(src: &Path) -> io::Result<()> {
    let tmp = with_suffix(src, ".gz.tmp");
    let written = (|| {
        let mut input = File::open(src)?;
        let out = BufWriter::new(File::create(&tmp)?);
        let mut encoder = flate2::write::GzEncoder::new(out, flate2::Compression::default());
        io::copy(&mut input, &mut encoder)?;
        let out = encoder.finish()?;
        out.into_inner().map_err(|e| e.into_error())?;
        fs::rename(&tmp, with_suffix(src, ".gz"))
    })();
    if let Err(err) = written {
        let _ = fs::remove_file(&tmp);
        return Err(err);
    }
    fs::remove_file(src)
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded sets stay consistent even if a holder panicked.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Rotated files waiting for (or under) compression.
#[derive(Default)]
struct Pending {
    paths: Mutex<HashSet<PathBuf>>,
    changed: Condvar,
}

/// Removes a path from `Pending` when dropped, even if compressing it panicked.
struct PendingDone<'a>(&'a Pending, PathBuf);

impl Drop for PendingDone<'_> {
    fn drop(&mut self) {
        lock(&self.0.paths).remove(&self.1);
        self.0.changed.notify_all();
    }
}

/// The gzip helper thread: compresses rotated files in the order they were rotated, so
/// the writer thread only ever waits for it when a file fills up again before its
/// previous backup is compressed.
struct Compressor {
    tx: Option<Sender<PathBuf>>,
    pending: Arc<Pending>,
    thread: Option<JoinHandle<()>>,
}

impl Compressor {
    fn spawn() -> io::Result<Compressor> {
        let (tx, rx) = mpsc::channel::<PathBuf>();
        let pending = Arc::new(Pending::default());
        let shared = pending.clone();
        let thread = std::thread::Builder::new()
            .name("nasd-journal-gzip".to_owned())
            .spawn(move || {
                while let Ok(path) = rx.recv() {
                    let _done = PendingDone(&shared, path.clone());
                    if let Err(err) = gzip_file(&path) {
                        tracing::warn!(path = %path.display(), "journal: cannot compress rotated log, kept uncompressed: {err}");
                    }
                }
            })?;
        Ok(Compressor {
            tx: Some(tx),
            pending,
            thread: Some(thread),
        })
    }

    fn submit(&self, path: PathBuf) {
        lock(&self.pending.paths).insert(path.clone());
        let sent = self
            .tx
            .as_ref()
            .is_some_and(|tx| tx.send(path.clone()).is_ok());
        if !sent {
            // The helper is gone: the file stays uncompressed rather than blocking.
            lock(&self.pending.paths).remove(&path);
        }
    }

    /// Waits until `done` holds for the pending set, or the helper thread has died.
    fn wait_until(&self, done: impl Fn(&HashSet<PathBuf>) -> bool) {
        let mut paths = lock(&self.pending.paths);
        while !done(&paths) {
            if self.thread.as_ref().is_none_or(|t| t.is_finished()) {
                paths.clear();
                return;
            }
            paths = match self
                .pending
                .changed
                .wait_timeout(paths, Duration::from_millis(100))
            {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
    }
}

impl Drop for Compressor {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::warn!("journal gzip thread panicked; a rotated log may be uncompressed");
        }
    }
}

struct OpenFile {
    out: BufWriter<File>,
    last_used: u64,
    /// Bytes in the file including those still buffered, as far as this writer knows.
    size: u64,
    /// Device and inode, to notice the file being moved away under its path.
    id: (u64, u64),
    /// When the path was last checked to still name this file.
    checked: Instant,
}

/// State of the writer thread: the open-file cache, rotation and error bookkeeping.
struct Writer {
    files: HashMap<PathBuf, OpenFile>,
    /// Monotonic use counter for least-recently-used eviction.
    clock: u64,
    /// Paths whose last operation failed and was already reported; cleared on success,
    /// so a full disk gives one warning per file rather than one per line.
    failing: HashSet<PathBuf>,
    /// Paths whose last rotation failed (reported once until one succeeds), with the size
    /// at which to try again, so a failing rename is not retried on every write.
    rotate_held: HashMap<PathBuf, u64>,
    backups: u32,
    /// With `gzip`.
    compressor: Option<Compressor>,
    recheck: Duration,
    /// The time of the current batch (one `Instant::now()` per batch, not per write).
    now: Instant,
}

impl Writer {
    fn new(backups: u32, gzip: bool) -> io::Result<Writer> {
        Ok(Writer {
            files: HashMap::new(),
            clock: 0,
            failing: HashSet::new(),
            rotate_held: HashMap::new(),
            backups,
            compressor: if gzip && backups > 0 {
                Some(Compressor::spawn()?)
            } else {
                None
            },
            recheck: RECHECK_INTERVAL,
            now: thread_now(),
        })
    }

    fn run(mut self, rx: Receiver<Msg>) {
        // `recv` fails once every `Journal` clone is gone: then flush and exit.
        while let Ok(first) = rx.recv() {
            self.now = thread_now();
            let mut touched = HashSet::new();
            let mut waiters = Vec::new();
            self.handle(first, &mut touched, &mut waiters);
            // Drain what else is queued so a burst costs one flush per file, not per line.
            for _ in 1..MAX_BATCH {
                match rx.try_recv() {
                    Ok(msg) => self.handle(msg, &mut touched, &mut waiters),
                    Err(_) => break,
                }
            }
            for path in touched {
                self.flush_one(&path);
            }
            if !waiters.is_empty()
                && let Some(compressor) = &self.compressor
            {
                compressor.wait_until(HashSet::is_empty);
            }
            for waiter in waiters {
                // The caller may have given up waiting; nothing to do then.
                let _ = waiter.send(());
            }
        }
        let paths: Vec<PathBuf> = self.files.keys().cloned().collect();
        for path in paths {
            self.flush_one(&path);
        }
        // Dropping `self` joins the gzip helper after it has compressed what is queued.
    }

    fn handle(&mut self, msg: Msg, touched: &mut HashSet<PathBuf>, waiters: &mut Vec<Sender<()>>) {
        match msg {
            Msg::Write { targets, text } => {
                for Target { path, max_size } in targets {
                    if self.write(&path, text.as_bytes(), max_size) {
                        touched.insert(path);
                    }
                }
            }
            Msg::Flush(waiter) => waiters.push(waiter),
        }
    }

    /// Appends `bytes` to `path`, rotating it first if they would take it past
    /// `max_size` (0: no limit); returns whether they are now buffered there.
    fn write(&mut self, path: &Path, bytes: &[u8], max_size: u64) -> bool {
        let len = bytes.len() as u64;
        if max_size > 0 {
            self.rotate_if_full(path, len, max_size);
        }
        let Some(file) = self.get(path) else {
            return false;
        };
        match file.out.write_all(bytes) {
            Ok(()) => {
                file.size += len;
                self.failing.remove(path);
                true
            }
            Err(err) => {
                // Reopen next time: the buffered state of this handle is unknown.
                self.files.remove(path);
                self.report(path, "write", &err);
                false
            }
        }
    }

    /// Rotates `path` if appending `len` bytes would take it past `max_size`. A file that
    /// is empty is never rotated, so one write larger than the limit still lands whole.
    fn rotate_if_full(&mut self, path: &Path, len: u64, max_size: u64) {
        let held = self.rotate_held.get(path).copied();
        let Some(file) = self.get(path) else {
            return;
        };
        let full = |size: u64| size > 0 && size.saturating_add(len) > held.unwrap_or(max_size);
        if !full(file.size) {
            return;
        }
        // Our count may be stale: another program may have truncated the file
        // (logrotate's copytruncate). Flush and ask the OS.
        let flushed = file.out.flush();
        if let Ok(meta) = file.out.get_ref().metadata() {
            file.size = meta.len();
        }
        let size = file.size;
        if let Err(err) = flushed {
            self.files.remove(path);
            self.report(path, "flush", &err);
            return;
        }
        if !full(size) {
            return;
        }
        if let Some(compressor) = &self.compressor {
            // The previous `file.1` must be `file.1.gz` before it is shifted.
            let first = backup_path(path, 1, false);
            compressor.wait_until(|pending| !pending.contains(&first));
        }
        // Renaming a file that is open is fine on Unix: on failure the handle is kept
        // and appending goes on.
        match shift_backups(path, self.backups) {
            Ok(rotated) => {
                // Already flushed: closing loses nothing. The next `get` opens a new file.
                self.files.remove(path);
                self.rotate_held.remove(path);
                if let (Some(rotated), Some(compressor)) = (rotated, &self.compressor) {
                    compressor.submit(rotated);
                }
            }
            Err(err) => {
                if !self.rotate_held.contains_key(path) {
                    tracing::warn!(path = %path.display(), "journal: cannot rotate log file, appending to it instead: {err}");
                }
                self.rotate_held
                    .insert(path.to_path_buf(), size.saturating_add(max_size));
            }
        }
    }

    fn flush_one(&mut self, path: &Path) {
        // A file evicted since it was written was flushed on eviction.
        let Some(file) = self.files.get_mut(path) else {
            return;
        };
        if let Err(err) = file.out.flush() {
            self.files.remove(path);
            self.report(path, "flush", &err);
        }
    }

    /// The cached handle for `path`, opening it (and its parent directories) if needed,
    /// or again if another program moved or deleted the file since it was opened.
    fn get(&mut self, path: &Path) -> Option<&mut OpenFile> {
        self.clock += 1;
        let (now, recheck) = (self.now, self.recheck);
        let moved = match self.files.get_mut(path) {
            Some(file) if now.saturating_duration_since(file.checked) >= recheck => {
                file.checked = now;
                fs::metadata(path).map_or(true, |m| (m.dev(), m.ino()) != file.id)
            }
            _ => false,
        };
        if moved
            && let Some(mut old) = self.files.remove(path)
            && let Err(err) = old.out.flush()
        {
            // What was buffered belonged to the moved file; it may be gone.
            self.report(path, "flush", &err);
        }
        if !self.files.contains_key(path) {
            // Most opens are reopens after an eviction: try the file first and make
            // its directories only when they are missing.
            let opened = match open_append(path) {
                Err(err) if err.kind() == io::ErrorKind::NotFound => path
                    .parent()
                    .map_or(Ok(()), fs::create_dir_all)
                    .and_then(|()| open_append(path)),
                other => other,
            };
            match opened {
                Ok(file) => self.insert(path.to_path_buf(), file),
                Err(err) => {
                    self.report(path, "open", &err);
                    return None;
                }
            }
        }
        let file = self.files.get_mut(path)?;
        file.last_used = self.clock;
        Some(file)
    }

    fn insert(&mut self, path: PathBuf, file: File) {
        while self.files.len() >= MAX_OPEN_FILES {
            self.evict_oldest();
        }
        // The size on disk, so rotation stays right across evictions and reopening.
        let (size, id) = file
            .metadata()
            .map_or((0, (0, 0)), |m| (m.len(), (m.dev(), m.ino())));
        self.files.insert(
            path,
            OpenFile {
                out: BufWriter::new(file),
                last_used: self.clock,
                size,
                id,
                checked: self.now,
            },
        );
    }

    /// Closes the least recently used file after flushing it. A linear scan is fine: it
    /// runs only on a cache miss, over at most `MAX_OPEN_FILES` entries, far cheaper than
    /// the `open` it accompanies.
    fn evict_oldest(&mut self) {
        let Some(oldest) = self
            .files
            .iter()
            .min_by_key(|(_, file)| file.last_used)
            .map(|(path, _)| path.clone())
        else {
            return;
        };
        if let Some(mut file) = self.files.remove(&oldest)
            && let Err(err) = file.out.flush()
        {
            self.report(&oldest, "flush", &err);
        }
    }

    fn report(&mut self, path: &Path, op: &str, err: &io::Error) {
        // Only the first failure per file is reported; this also keeps a failing daemon
        // log from feeding warnings back into itself if tracing is routed there.
        if self.failing.insert(path.to_path_buf()) {
            tracing::warn!(path = %path.display(), "journal: cannot {op} log file, dropping lines: {err}");
        }
    }
}

/// The writer thread's clock: an OS thread outside the runtime, whose recheck timing
/// tests drive through `Writer::now` directly, not through tokio's paused time.
#[allow(clippy::disallowed_methods)]
fn thread_now() -> Instant {
    Instant::now()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::NaiveDateTime;
    use std::io::Read;

    fn nas(id: i64, name: &str, ip: &str) -> NasTarget {
        NasTarget {
            id,
            name: name.to_owned(),
            ip: ip.to_owned(),
        }
    }

    fn attempt(event_id: i64, commands: &[&str], answer: &str, outcome: &str) -> Attempt {
        Attempt {
            event_id,
            cmd: "user_add".to_owned(),
            try_count: 1,
            commands: commands.iter().map(|c| (*c).to_owned()).collect(),
            answer: answer.to_owned(),
            outcome: outcome.to_owned(),
            duration: Duration::from_millis(42),
        }
    }

    /// Lines of a log file with the timestamp checked and stripped.
    fn read_lines(path: &Path) -> Vec<String> {
        let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(
            text.ends_with('\n'),
            "{}: last line unterminated",
            path.display()
        );
        text.lines()
            .map(|line| {
                let (ts, rest) = line.split_at(19);
                NaiveDateTime::parse_from_str(ts, TIME_FORMAT)
                    .unwrap_or_else(|e| panic!("bad timestamp in {line:?}: {e}"));
                rest.strip_prefix(' ')
                    .unwrap_or_else(|| panic!("no space after timestamp: {line:?}"))
                    .to_owned()
            })
            .collect()
    }

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
    fn format_attempt_table() {
        let n = nas(7, "Test NAS", "10.20.11.15");
        let acc = AccountTarget {
            abonent_id: Some(3),
            user_id: 42,
        };
        let p = "nas=7 event=100 user_id=42 cmd=user_add try=1";
        let cases: Vec<(Attempt, Vec<String>)> = vec![
            (
                attempt(
                    100,
                    &["/ip firewall address-list add list=allow address=10.0.0.2"],
                    "",
                    "done",
                ),
                vec![
                    format!("{p} send: /ip firewall address-list add list=allow address=10.0.0.2"),
                    format!("{p} outcome: done (42 ms)"),
                ],
            ),
            (
                attempt(
                    100,
                    &["a", "b\nc\r\n"],
                    "line1\r\nline2\n\nline3\r",
                    "retry in 2s: exit 254",
                ),
                vec![
                    format!("{p} send: a"),
                    format!("{p} send: b"),
                    format!("{p} send: c"),
                    format!("{p} answer: line1"),
                    format!("{p} answer: line2"),
                    format!("{p} answer: line3"),
                    format!("{p} outcome: retry in 2s: exit 254 (42 ms)"),
                ],
            ),
            (
                attempt(100, &[], "\r\n", "failed: scheme x\ndoes not define cmd y"),
                vec![format!(
                    "{p} outcome: failed: scheme x does not define cmd y (42 ms)"
                )],
            ),
            (
                // Quoting and shell metacharacters stay exactly as sent (copy-pasteable).
                attempt(
                    100,
                    &["ssh admin@10.0.0.1 '/queue simple remove [find name=\"u 42\"]'"],
                    "ok",
                    "done",
                ),
                vec![
                    format!(
                        "{p} send: ssh admin@10.0.0.1 '/queue simple remove [find name=\"u 42\"]'"
                    ),
                    format!("{p} answer: ok"),
                    format!("{p} outcome: done (42 ms)"),
                ],
            ),
        ];
        for (i, (att, want)) in cases.iter().enumerate() {
            assert_eq!(&format_attempt(&n, &acc, att), want, "case {i}");
        }

        let mut att = attempt(5, &["x"], "", "done");
        att.try_count = 3;
        att.cmd = "user_redirect\ncancel".to_owned();
        att.duration = Duration::from_micros(1_999_999);
        let acc = AccountTarget {
            abonent_id: None,
            user_id: -1,
        };
        assert_eq!(
            format_attempt(&nas(-2, "", ""), &acc, &att),
            vec![
                "nas=-2 event=5 user_id=-1 cmd=user_redirect cancel try=3 send: x".to_owned(),
                "nas=-2 event=5 user_id=-1 cmd=user_redirect cancel try=3 outcome: done (1999 ms)"
                    .to_owned(),
            ]
        );
    }

    #[test]
    fn sanitize_table() {
        let cases = [
            ("Test_NAS", "Test_NAS"),
            ("Test NAS", "Test_NAS"),
            ("../evil nas", ".._evil_nas"),
            ("..", "__"),
            (".", "_"),
            ("a/b\\c", "a_b_c"),
            ("Мтс-1", "___-1"),
            ("", ""),
            ("fe80::1", "fe80__1"),
            ("10.20.11.15", "10.20.11.15"),
        ];
        for (input, want) in cases {
            assert_eq!(sanitize_file_part(input), want, "input {input:?}");
        }
        assert_eq!(sanitize_file_part(&"x".repeat(1000)).len(), MAX_NAME_LEN);
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
    fn writer_cache_is_bounded_and_evicts_least_recently_used() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = Writer::new(0, false).unwrap();
        let path = |i: usize| dir.path().join(format!("sub/{i}.log"));
        for i in 0..MAX_OPEN_FILES {
            assert!(w.write(&path(i), b"a\n", 0));
        }
        // Touch file 0 so that file 1 is now the least recently used.
        assert!(w.write(&path(0), b"b\n", 0));
        assert!(w.write(&path(MAX_OPEN_FILES), b"c\n", 0));
        assert_eq!(w.files.len(), MAX_OPEN_FILES);
        assert!(w.files.contains_key(&path(0)));
        assert!(!w.files.contains_key(&path(1)));
        // Eviction flushed file 1 before closing it; file 0 is still buffered.
        assert_eq!(fs::read_to_string(path(1)).unwrap(), "a\n");
        assert_eq!(fs::read_to_string(path(0)).unwrap(), "");
        assert!(w.write(&path(1), b"d\n", 0));
        drop(w);
        assert_eq!(fs::read_to_string(path(1)).unwrap(), "a\nd\n");
        assert_eq!(fs::read_to_string(path(0)).unwrap(), "a\nb\n");
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
    fn parse_size_table() {
        let ok = [
            ("0", 0),
            ("4096", 4096),
            ("100B", 100),
            ("512KB", 512 << 10),
            ("512kb", 512 << 10),
            ("1k", 1024),
            ("2KiB", 2048),
            ("10MB", 10 << 20),
            (" 10 MB ", 10 << 20),
            ("1GB", 1 << 30),
            ("3gib", 3 << 30),
        ];
        for (text, want) in ok {
            assert_eq!(parse_size(text), Ok(want), "{text:?}");
        }
        for bad in [
            "",
            "MB",
            "ten",
            "1.5MB",
            "-1",
            "10TB",
            "10 M B",
            "99999999999999999999",
        ] {
            let err = parse_size(bad).unwrap_err();
            assert!(err.contains(&format!("`{bad}`")), "{bad:?}: {err}");
        }
        assert!(
            parse_size("99999999999GB")
                .unwrap_err()
                .contains("too large")
        );
        assert_eq!(LogFormat::parse("text"), Ok(LogFormat::Text));
        assert_eq!(LogFormat::parse("json"), Ok(LogFormat::Json));
        assert!(LogFormat::parse("JSON").unwrap_err().contains("\"json\""));
    }

    #[test]
    fn classify_outcome_table() {
        let cases = [
            ("done", ("done", None)),
            ("done (manual send)", ("done", None)),
            (
                "retry in 2s: exit 254 (postpone)",
                ("retry", Some("exit 254 (postpone)")),
            ),
            (
                "failed: scheme x: no cmd y",
                ("failed", Some("scheme x: no cmd y")),
            ),
            ("failed", ("failed", None)),
            (
                "manual send, would retry: timeout",
                ("retry", Some("timeout")),
            ),
            ("manual send failed: auth", ("failed", Some("auth"))),
            ("something new: x", ("other", None)),
        ];
        for (text, want) in cases {
            assert_eq!(classify_outcome(text), want, "{text:?}");
        }
    }

    fn fixed_time() -> DateTime<Local> {
        use chrono::TimeZone;
        Local
            .with_ymd_and_hms(2026, 11, 22, 0, 3, 10)
            .single()
            .expect("unambiguous local time")
            + chrono::Duration::milliseconds(45)
    }

    #[test]
    fn attempt_json_fields() {
        let ts = fixed_time();
        let mut att = attempt(
            100,
            &[
                "/ip firewall address-list add list=allow address=10.0.0.2",
                "b\nc",
            ],
            "line1\r\nline2\n\n",
            "retry in 2s: exit\n254",
        );
        att.try_count = 3;
        let line = attempt_json(
            &ts,
            &nas(7, "Test NAS", "10.20.11.15"),
            &AccountTarget {
                abonent_id: Some(3),
                user_id: 42,
            },
            &att,
        );
        assert!(!line.contains('\n'), "{line}");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        let parsed = DateTime::parse_from_rfc3339(v["ts"].as_str().unwrap()).unwrap();
        assert_eq!(parsed, ts);
        assert!(v["ts"].as_str().unwrap().contains(":10.045"), "{v}");
        let want = serde_json::json!({
            "ts": v["ts"],
            "kind": "attempt",
            "level": "warn",
            "nas_id": 7,
            "nas_name": "Test NAS",
            "nas_ip": "10.20.11.15",
            "abonent_id": 3,
            "user_id": 42,
            "event_id": 100,
            "cmd": "user_add",
            "try": 3,
            "outcome": "retry",
            "error": "exit 254",
            "outcome_text": "retry in 2s: exit 254",
            "duration_ms": 42,
            "commands": ["/ip firewall address-list add list=allow address=10.0.0.2", "b\nc"],
            "answer": "line1\nline2",
            "message": "nas=7 event=100 user_id=42 cmd=user_add try=3 outcome: retry in 2s: exit 254 (42 ms)",
        });
        assert_eq!(v, want);

        // Done, no abonent, no answer: `error` and `abonent_id` are null, not missing.
        let v: serde_json::Value = serde_json::from_str(&attempt_json(
            &ts,
            &nas(1, "n", "1.1.1.1"),
            &AccountTarget {
                abonent_id: None,
                user_id: 5,
            },
            &attempt(1, &[], "", "done"),
        ))
        .unwrap();
        assert_eq!(v["level"], "info");
        assert_eq!(v["outcome"], "done");
        assert!(v["error"].is_null() && v["abonent_id"].is_null());
        assert_eq!(v["commands"], serde_json::json!([]));
        assert_eq!(v["answer"], "");
        let v: serde_json::Value = serde_json::from_str(&attempt_json(
            &ts,
            &nas(1, "n", "1.1.1.1"),
            &AccountTarget {
                abonent_id: None,
                user_id: 5,
            },
            &attempt(1, &["x"], "", "failed: gave up after 10 attempts: exit 1"),
        ))
        .unwrap();
        assert_eq!(v["level"], "error");
        assert_eq!(v["error"], "gave up after 10 attempts: exit 1");

        let v: serde_json::Value =
            serde_json::from_str(&daemon_json(&ts, "host1", 77, "two\nlines \"quoted\"")).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "ts": v["ts"],
                "kind": "daemon",
                "level": "info",
                "host": "host1",
                "program": PROGRAM,
                "pid": 77,
                "message": "two lines \"quoted\"",
            })
        );
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

    /// A record of exactly `len` bytes (newline included) that names its number.
    fn record(i: usize, len: usize) -> String {
        let head = format!("r{i:04}");
        format!("{head}{}\n", "x".repeat(len.saturating_sub(head.len() + 1)))
    }

    /// What rotation must leave after records `0..n`, `per_file` of them to a file, with
    /// `backups` kept: index 0 is the live file, 1 is `file.1` and so on.
    fn layout(n: usize, per_file: usize, backups: usize, len: usize) -> Vec<String> {
        let all: Vec<usize> = (0..n).collect();
        all.chunks(per_file)
            .rev()
            .take(backups + 1)
            .map(|chunk| chunk.iter().map(|&i| record(i, len)).collect())
            .collect()
    }

    fn read(path: &Path) -> String {
        fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    fn gunzip(path: &Path) -> String {
        let file = File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let mut text = String::new();
        flate2::read::GzDecoder::new(file)
            .read_to_string(&mut text)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        text
    }

    /// Names in `dir`, sorted.
    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn rotation_at_the_threshold_keeps_n_backups_in_order() {
        // (record length, max_size, backups, records, records per file)
        let cases = [
            (30, 100, 3, 20, 3),
            (25, 100, 3, 20, 4), // exactly max_size fits
            (50, 100, 2, 9, 2),
            (101, 100, 2, 5, 1), // larger than the limit: one whole record per file
            (30, 100, 0, 10, 3), // no backups: a full file starts over
            (30, 100, 5, 6, 3),  // fewer rotations than backups
        ];
        for (case, &(len, max, backups, n, per_file)) in cases.iter().enumerate() {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("a.log");
            let mut w = Writer::new(backups, false).unwrap();
            for i in 0..n {
                assert!(w.write(&path, record(i, len).as_bytes(), max));
            }
            drop(w);
            let want = layout(n, per_file, backups as usize, len);
            assert_eq!(read(&path), want[0], "case {case}");
            for (k, chunk) in want.iter().enumerate().skip(1) {
                let backup = backup_path(&path, k as u32, false);
                assert_eq!(&read(&backup), chunk, "case {case}: {}", backup.display());
            }
            assert_eq!(
                names(dir.path()).len(),
                want.len(),
                "case {case}: {:?}",
                names(dir.path())
            );
        }
    }

    #[test]
    fn rotation_stays_right_when_the_cache_closes_and_reopens_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = Writer::new(2, false).unwrap();
        let files = MAX_OPEN_FILES + 4;
        let path = |i: usize| dir.path().join(format!("{}/{i}.log", i % 7));
        // Round robin over more files than the cache holds: every write is a miss, so each
        // file is reopened (and its size read from disk) before each write.
        for round in 0..10 {
            for f in 0..files {
                assert!(w.write(&path(f), record(round, 30).as_bytes(), 100));
            }
            assert!(w.files.len() <= MAX_OPEN_FILES);
        }
        drop(w);
        let want = layout(10, 3, 2, 30);
        for f in 0..files {
            assert_eq!(read(&path(f)), want[0], "file {f}");
            assert_eq!(read(&backup_path(&path(f), 1, false)), want[1]);
            assert_eq!(read(&backup_path(&path(f), 2, false)), want[2]);
            assert!(!backup_path(&path(f), 3, false).exists());
        }
    }

    #[test]
    fn gzip_backups_decompress_to_the_exact_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.log");
        let mut w = Writer::new(3, true).unwrap();
        for i in 0..20 {
            assert!(w.write(&path, record(i, 30).as_bytes(), 100));
        }
        // Dropping the writer waits for the gzip helper.
        drop(w);
        let want = layout(20, 3, 3, 30);
        assert_eq!(read(&path), want[0]);
        for (k, chunk) in want.iter().enumerate().skip(1) {
            assert_eq!(
                &gunzip(&backup_path(&path, k as u32, true)),
                chunk,
                ".{k}.gz"
            );
        }
        assert_eq!(
            names(dir.path()),
            ["a.log", "a.log.1.gz", "a.log.2.gz", "a.log.3.gz"]
        );
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

    #[test]
    fn copytruncate_by_another_program_is_seen_before_rotating() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.log");
        let mut w = Writer::new(2, false).unwrap();
        for i in 0..3 {
            assert!(w.write(&path, record(i, 30).as_bytes(), 100));
        }
        w.flush_one(&path);
        // logrotate's copytruncate: copies the file away and truncates it in place.
        fs::copy(&path, dir.path().join("copy")).unwrap();
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(0)
            .unwrap();
        for i in 3..7 {
            assert!(w.write(&path, record(i, 30).as_bytes(), 100));
        }
        drop(w);
        // Records 3..5 fit after the truncation; record 6 rotated them.
        assert_eq!(read(&path), record(6, 30));
        assert_eq!(
            read(&backup_path(&path, 1, false)),
            (3..6).map(|i| record(i, 30)).collect::<String>()
        );
        assert!(!backup_path(&path, 2, false).exists());
    }

    #[test]
    fn a_file_moved_away_is_reopened_by_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.log");
        let moved = dir.path().join("a.log-20261122");
        let mut w = Writer::new(0, false).unwrap();
        w.recheck = Duration::ZERO;
        assert!(w.write(&path, b"one\n", 0));
        w.flush_one(&path);
        // logrotate without copytruncate: rename, then (with `create`) a new empty file.
        fs::rename(&path, &moved).unwrap();
        assert!(w.write(&path, b"two\n", 0));
        w.flush_one(&path);
        fs::rename(&path, dir.path().join("second")).unwrap();
        fs::write(&path, "").unwrap();
        assert!(w.write(&path, b"three\n", 0));
        drop(w);
        assert_eq!(read(&moved), "one\n");
        assert_eq!(read(&dir.path().join("second")), "two\n");
        assert_eq!(read(&path), "three\n");
    }

    #[test]
    fn failed_rotation_keeps_appending_and_retries_later() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.log");
        // `a.log.1` is a directory with something in it: neither removing nor replacing it
        // works, even for root.
        let blocker = backup_path(&path, 1, false);
        fs::create_dir(&blocker).unwrap();
        fs::write(blocker.join("x"), "").unwrap();
        let mut w = Writer::new(1, false).unwrap();
        for i in 0..6 {
            assert!(w.write(&path, record(i, 30).as_bytes(), 100));
        }
        // The failure at record 3 (90 + 30 > 100) holds further tries until another
        // max_size has been written.
        assert_eq!(w.rotate_held.get(&path), Some(&190));
        fs::remove_dir_all(&blocker).unwrap();
        assert!(w.write(&path, record(6, 30).as_bytes(), 100));
        assert!(w.rotate_held.is_empty());
        drop(w);
        assert_eq!(
            read(&blocker),
            (0..6).map(|i| record(i, 30)).collect::<String>()
        );
        assert_eq!(read(&path), record(6, 30));
    }
}
