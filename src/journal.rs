//! The daemon's log files on disk: the daemon log, one log per NAS and one per account.
//!
//! Layout under `log_dir` (the same as Carbon Billing's `nas_event_daemon`, so operators'
//! habits and scripts keep working):
//! - `nas_event_daemon.log`: syslog-like lines
//!   (`2019-08-27 10:57:41 HOST nas_event_daemon[PID]: MESSAGE`);
//! - `nas_event_daemon/<nas name>_<nas ip>.log`: every attempt for that NAS;
//! - `abonents/<abonent_id>/event_<user_id>.log`: the same lines for one account alone.
//!
//! All writes happen on one dedicated OS thread fed by an unbounded channel, so a slow or
//! full disk never blocks the async send path. Callers format and timestamp lines
//! themselves (the time is when the event happened, not when the disk got to it); the
//! writer only appends. An I/O error is reported once with `tracing::warn!` and the
//! affected lines are dropped: losing a log line is better than stopping delivery.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread::JoinHandle;
use std::time::Duration;

use chrono::Local;

/// Program name in daemon-log lines: operators grep for it, as with the old daemon.
pub const PROGRAM: &str = "nas_event_daemon";
/// At most this many files are kept open by the writer thread (least recently used go).
pub const MAX_OPEN_FILES: usize = 256;
/// Timestamp format that starts every line.
pub const TIME_FORMAT: &str = "%Y-%m-%d %H:%M:%S";
/// The writer flushes at least every this many messages even when the queue never
/// empties, so a sustained burst still reaches the OS promptly.
const MAX_BATCH: usize = 4096;
/// Longest sanitized NAS name kept in a file name, well below the usual 255-byte limit.
const MAX_NAME_LEN: usize = 100;

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
/// and the drop waits for it (briefly blocking the dropping thread).
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
}

enum Msg {
    /// Append `text` (complete lines, each ending in `\n`) to every file in `paths`.
    Write { paths: Vec<PathBuf>, text: Arc<str> },
    /// Answer once everything queued before this message is flushed to the OS.
    Flush(Sender<()>),
}

impl Journal {
    /// Creates the directory tree, opens the daemon log (so an unwritable `log_dir` fails
    /// here, at startup, rather than silently later) and spawns the writer thread.
    pub fn open(log_dir: &Path) -> io::Result<Journal> {
        fs::create_dir_all(log_dir)?;
        fs::create_dir_all(log_dir.join(PROGRAM))?;
        fs::create_dir_all(log_dir.join("abonents"))?;
        let daemon_path = daemon_log_path_in(log_dir);
        let daemon_file = open_append(&daemon_path)?;

        let mut writer = Writer::new();
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
            }),
        })
    }

    /// Appends one daemon-log line; newlines in `message` become spaces.
    pub fn daemon(&self, message: &str) {
        let line = format!(
            "{} {} {}[{}]: {}\n",
            timestamp(),
            self.inner.hostname,
            PROGRAM,
            self.inner.pid,
            one_line(message)
        );
        self.send(vec![self.daemon_log_path()], line);
    }

    /// Appends the lines of one attempt (see [`format_attempt`]) to the NAS log and to
    /// the account log, all with the same timestamp.
    pub fn attempt(&self, nas: &NasTarget, account: &AccountTarget, attempt: &Attempt) {
        let ts = timestamp();
        let mut text = String::new();
        for line in format_attempt(nas, account, attempt) {
            // Writing to a String cannot fail.
            let _ = writeln!(text, "{ts} {line}");
        }
        self.send(
            vec![self.nas_log_path(nas), self.account_log_path(account)],
            text,
        );
    }

    /// Blocks until everything queued before the call is written and flushed to the OS
    /// (not fsynced). Used by tests and at shutdown; from async code call it through
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

    fn send(&self, paths: Vec<PathBuf>, text: String) {
        if let Some(tx) = &self.inner.tx {
            // Fails only if the writer thread died; there is nowhere left to log to.
            let _ = tx.send(Msg::Write {
                paths,
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

/// The lines of one attempt, without timestamps: one `send:` line per command line, one
/// `answer:` line per non-empty answer line, then the `outcome:` line.
pub fn format_attempt(nas: &NasTarget, account: &AccountTarget, attempt: &Attempt) -> Vec<String> {
    let prefix = format!(
        "nas={} event={} user_id={} cmd={} try={}",
        nas.id,
        attempt.event_id,
        account.user_id,
        one_line(&attempt.cmd),
        attempt.try_count
    );
    let mut lines = Vec::new();
    for command in &attempt.commands {
        for part in split_lines(command) {
            lines.push(format!("{prefix} send: {part}"));
        }
    }
    for part in split_lines(&attempt.answer) {
        lines.push(format!("{prefix} answer: {part}"));
    }
    lines.push(format!(
        "{prefix} outcome: {} ({} ms)",
        one_line(&attempt.outcome),
        attempt.duration.as_millis()
    ));
    lines
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

fn timestamp() -> String {
    Local::now().format(TIME_FORMAT).to_string()
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

struct OpenFile {
    out: BufWriter<File>,
    last_used: u64,
}

/// State of the writer thread: the open-file cache and error bookkeeping.
struct Writer {
    files: HashMap<PathBuf, OpenFile>,
    /// Monotonic use counter for least-recently-used eviction.
    clock: u64,
    /// Paths whose last operation failed and was already reported; cleared on success,
    /// so a full disk gives one warning per file rather than one per line.
    failing: HashSet<PathBuf>,
}

impl Writer {
    fn new() -> Writer {
        Writer {
            files: HashMap::new(),
            clock: 0,
            failing: HashSet::new(),
        }
    }

    fn run(mut self, rx: Receiver<Msg>) {
        // `recv` fails once every `Journal` clone is gone: then flush and exit.
        while let Ok(first) = rx.recv() {
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
            for waiter in waiters {
                // The caller may have given up waiting; nothing to do then.
                let _ = waiter.send(());
            }
        }
        let paths: Vec<PathBuf> = self.files.keys().cloned().collect();
        for path in paths {
            self.flush_one(&path);
        }
    }

    fn handle(&mut self, msg: Msg, touched: &mut HashSet<PathBuf>, waiters: &mut Vec<Sender<()>>) {
        match msg {
            Msg::Write { paths, text } => {
                for path in paths {
                    if self.write(&path, text.as_bytes()) {
                        touched.insert(path);
                    }
                }
            }
            Msg::Flush(waiter) => waiters.push(waiter),
        }
    }

    /// Appends `bytes` to `path`; returns whether it is now buffered there.
    fn write(&mut self, path: &Path, bytes: &[u8]) -> bool {
        let Some(file) = self.get(path) else {
            return false;
        };
        match file.out.write_all(bytes) {
            Ok(()) => {
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

    /// The cached handle for `path`, opening it (and its parent directories) if needed.
    fn get(&mut self, path: &Path) -> Option<&mut OpenFile> {
        self.clock += 1;
        if !self.files.contains_key(path) {
            let opened = path
                .parent()
                .map_or(Ok(()), fs::create_dir_all)
                .and_then(|()| open_append(path));
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
        self.files.insert(
            path,
            OpenFile {
                out: BufWriter::new(file),
                last_used: self.clock,
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

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::NaiveDateTime;

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
        let mut w = Writer::new();
        let path = |i: usize| dir.path().join(format!("sub/{i}.log"));
        for i in 0..MAX_OPEN_FILES {
            assert!(w.write(&path(i), b"a\n"));
        }
        // Touch file 0 so that file 1 is now the least recently used.
        assert!(w.write(&path(0), b"b\n"));
        assert!(w.write(&path(MAX_OPEN_FILES), b"c\n"));
        assert_eq!(w.files.len(), MAX_OPEN_FILES);
        assert!(w.files.contains_key(&path(0)));
        assert!(!w.files.contains_key(&path(1)));
        // Eviction flushed file 1 before closing it; file 0 is still buffered.
        assert_eq!(fs::read_to_string(path(1)).unwrap(), "a\n");
        assert_eq!(fs::read_to_string(path(0)).unwrap(), "");
        assert!(w.write(&path(1), b"d\n"));
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
}
