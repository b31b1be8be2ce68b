//! The writer thread: appends to the log files through a bounded least-recently-used
//! cache of open handles, rotates a file before a write would take it past its limit
//! (gzip on a helper thread), notices files moved or truncated by other programs, and
//! warns once per failing file (see `health`): a file counts as written again only when
//! its lines reach the OS, never when they are merely buffered. When a failing file
//! writes again, that is said on stderr and, as soon as it can be written, in the daemon
//! log (which files, since when, how many lines were dropped).

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use super::health::{self, JournalHealth, RecoveryReport};

/// At most this many files are kept open by the writer thread (least recently used go).
pub const MAX_OPEN_FILES: usize = 256;
/// An open file whose path was last checked this long ago is checked again (by `stat`)
/// before the next write, so a file moved away by logrotate is reopened by its path.
pub const RECHECK_INTERVAL: Duration = Duration::from_secs(1);
/// The writer flushes at least every this many messages even when the queue never
/// empties, so a sustained burst still reaches the OS promptly.
const MAX_BATCH: usize = 4096;

/// A file to append to and the size it may grow to (0: no limit).
pub(super) struct Target {
    pub(super) path: PathBuf,
    pub(super) max_size: u64,
}

pub(super) enum Msg {
    /// Append `text` (complete lines, each ending in `\n`) to every target.
    Write {
        targets: Vec<Target>,
        text: Arc<str>,
    },
    /// Answer once everything queued before this message is flushed to the OS and every
    /// rotated file is compressed.
    Flush(Sender<()>),
    /// New `[log]` settings (SIGHUP): backups and gzip for the next rotation, the daemon
    /// log's size and line format.
    Configure {
        backups: u32,
        gzip: bool,
        daemon_max_size: u64,
        daemon_line: Box<dyn Fn(&str) -> String + Send>,
    },
}

pub(super) fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// `path` with `suffix` appended to its file name: `x.log` + `.1.gz` = `x.log.1.gz`.
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// `file.i` or `file.i.gz`.
pub(super) fn backup_path(path: &Path, i: u32, gz: bool) -> PathBuf {
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
                // Rotated files whose compression failed: warned once until one works.
                let mut failing = HashSet::new();
                while let Ok(path) = rx.recv() {
                    let _done = PendingDone(&shared, path.clone());
                    match gzip_file(&path) {
                        Ok(()) => {
                            failing.remove(&path);
                        }
                        Err(err) => {
                            if failing.insert(path.clone()) {
                                tracing::warn!(path = %path.display(), "journal: cannot compress rotated log, kept uncompressed (reported once): {err}");
                            }
                        }
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
    file: File,
    /// Complete lines not yet written to the OS (the writer flushes once per batch).
    buf: Vec<u8>,
    /// Lines in `buf`, counted as dropped if they cannot be written.
    lines: u64,
    /// Bytes at the start of `buf` that belong to no line of `lines`: the `\n` that
    /// ends a line torn by an earlier failed write.
    lead: usize,
    last_used: u64,
    /// Bytes in the file including those still buffered, as far as this writer knows.
    size: u64,
    /// Device and inode, to notice the file being moved away under its path.
    id: (u64, u64),
    /// When the path was last checked to still name this file.
    checked: Instant,
}

/// What became of the buffered lines of a file.
enum Flushed {
    /// There was nothing to write.
    Nothing,
    /// Everything reached the OS.
    Wrote,
    /// `lost` lines did not; `torn` when the file now ends in part of a line.
    Failed {
        err: io::Error,
        lost: u64,
        torn: bool,
    },
}

/// Writes all of `bytes`; returns how many were written, and the error that stopped it.
fn write_out(file: &mut File, bytes: &[u8]) -> (usize, io::Result<()>) {
    let mut done = 0;
    while done < bytes.len() {
        match file.write(&bytes[done..]) {
            Ok(0) => return (done, Err(io::ErrorKind::WriteZero.into())),
            Ok(n) => done += n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return (done, Err(err)),
        }
    }
    (done, Ok(()))
}

fn count_lines(bytes: &[u8]) -> u64 {
    bytes.iter().filter(|&&b| b == b'\n').count() as u64
}

impl OpenFile {
    /// Writes the buffer out; it is empty afterwards whatever happened (lines that did
    /// not make it are dropped, not retried: a later write must not reorder them).
    fn flush(&mut self) -> Flushed {
        if self.buf.is_empty() {
            return Flushed::Nothing;
        }
        let (done, result) = write_out(&mut self.file, &self.buf);
        let flushed = match result {
            Ok(()) => Flushed::Wrote,
            Err(err) => {
                let written = count_lines(&self.buf[self.lead.min(done)..done]);
                let torn = if done == 0 {
                    // The `\n` that was to end a torn line did not make it either.
                    self.lead > 0
                } else {
                    self.buf[done - 1] != b'\n'
                };
                Flushed::Failed {
                    err,
                    lost: self.lines.saturating_sub(written),
                    torn,
                }
            }
        };
        self.buf.clear();
        self.lines = 0;
        self.lead = 0;
        flushed
    }
}

/// The daemon log, where the writer reports the files that could not be written once
/// they can again.
pub(super) struct DaemonLog {
    pub(super) path: PathBuf,
    pub(super) max_size: u64,
    /// One daemon-log line (timestamp, `\n` and all) for a message.
    pub(super) line: Box<dyn Fn(&str) -> String + Send>,
}

/// State of the writer thread: the open-file cache, rotation and error bookkeeping.
pub(super) struct Writer {
    files: HashMap<PathBuf, OpenFile>,
    /// Monotonic use counter for least-recently-used eviction.
    clock: u64,
    /// Which files are failing, since when, with how many lines dropped (shared with
    /// `/status` and `/metrics`). A file leaves it only when lines reach the OS, so a
    /// full disk gives one warning per file rather than one per flush.
    health: JournalHealth,
    /// Files a failed write left ending in part of a line, as (device, inode, size)
    /// then: if the file is still so when reopened, the next write starts with `\n`.
    torn: HashMap<PathBuf, (u64, u64, u64)>,
    /// Recoveries not yet written to the daemon log.
    report: RecoveryReport,
    /// When writing `report` to a failing daemon log was last tried.
    report_tried: Option<Instant>,
    daemon_log: Option<DaemonLog>,
    /// Paths whose last rotation failed (reported once until one succeeds), with the size
    /// at which to try again, so a failing rename is not retried on every write.
    rotate_held: HashMap<PathBuf, u64>,
    backups: u32,
    /// With `gzip`.
    compressor: Option<Compressor>,
    recheck: Duration,
    /// The time of the current batch (one `Instant::now()` per batch, not per write).
    now: Instant,
    /// The same as wall-clock time, for the failure states.
    wall: DateTime<Utc>,
}

impl Writer {
    pub(super) fn new(backups: u32, gzip: bool) -> io::Result<Writer> {
        Ok(Writer {
            files: HashMap::new(),
            clock: 0,
            health: JournalHealth::default(),
            torn: HashMap::new(),
            report: RecoveryReport::default(),
            report_tried: None,
            daemon_log: None,
            rotate_held: HashMap::new(),
            backups,
            compressor: if gzip && backups > 0 {
                Some(Compressor::spawn()?)
            } else {
                None
            },
            recheck: RECHECK_INTERVAL,
            now: thread_now(),
            wall: Utc::now(),
        })
    }

    /// Where recoveries are reported; without one they are only traced.
    pub(super) fn set_daemon_log(&mut self, log: DaemonLog) {
        self.daemon_log = Some(log);
    }

    pub(super) fn health(&self) -> JournalHealth {
        self.health.clone()
    }

    pub(super) fn run(mut self, rx: Receiver<Msg>) {
        loop {
            // With a recovery report waiting for a failing daemon log, wake up now and
            // then to try again even if nothing else is written.
            let first = if self.report.is_empty() {
                match rx.recv() {
                    Ok(msg) => Some(msg),
                    // Every `Journal` clone is gone: flush and exit.
                    Err(_) => break,
                }
            } else {
                match rx.recv_timeout(RECHECK_INTERVAL) {
                    Ok(msg) => Some(msg),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            };
            self.now = thread_now();
            self.wall = Utc::now();
            let mut touched = HashSet::new();
            let mut waiters = Vec::new();
            if let Some(first) = first {
                self.handle(first, &mut touched, &mut waiters);
                // Drain what else is queued so a burst costs one flush per file, not
                // per line.
                for _ in 1..MAX_BATCH {
                    match rx.try_recv() {
                        Ok(msg) => self.handle(msg, &mut touched, &mut waiters),
                        Err(_) => break,
                    }
                }
            }
            for path in touched {
                self.flush_one(&path);
            }
            self.write_report(false);
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
        self.wall = Utc::now();
        self.flush_all();
        self.write_report(true);
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
            Msg::Configure {
                backups,
                gzip,
                daemon_max_size,
                daemon_line,
            } => {
                self.backups = backups;
                if !(gzip && backups > 0) {
                    // Dropping it finishes what it was compressing.
                    self.compressor = None;
                } else if self.compressor.is_none() {
                    match Compressor::spawn() {
                        Ok(c) => self.compressor = Some(c),
                        Err(e) => tracing::warn!("log gzip helper could not start: {e}"),
                    }
                }
                if let Some(log) = &mut self.daemon_log {
                    log.max_size = daemon_max_size;
                    log.line = daemon_line;
                }
            }
        }
    }

    /// Buffers `bytes` (complete lines) for `path`, rotating it first if they would
    /// take it past `max_size` (0: no limit); returns whether they are now buffered
    /// (they reach the OS at the next flush).
    fn write(&mut self, path: &Path, bytes: &[u8], max_size: u64) -> bool {
        let len = bytes.len() as u64;
        if max_size > 0 {
            self.rotate_if_full(path, len, max_size);
        }
        match self.get(path) {
            Ok(file) => {
                file.buf.extend_from_slice(bytes);
                file.lines += count_lines(bytes);
                file.size += len;
                true
            }
            Err(err) => {
                self.failed(path, "open", &err, count_lines(bytes));
                false
            }
        }
    }

    /// Rotates `path` if appending `len` bytes would take it past `max_size`. A file that
    /// is empty is never rotated, so one write larger than the limit still lands whole.
    fn rotate_if_full(&mut self, path: &Path, len: u64, max_size: u64) {
        let held = self.rotate_held.get(path).copied();
        // An open error is for the write that follows to count.
        let Ok(file) = self.get(path) else {
            return;
        };
        let full = |size: u64| size > 0 && size.saturating_add(len) > held.unwrap_or(max_size);
        if !full(file.size) {
            return;
        }
        // Our count may be stale: another program may have truncated the file
        // (logrotate's copytruncate). Flush and ask the OS.
        if !self.flush_one(path) {
            return;
        }
        let Some(file) = self.files.get_mut(path) else {
            return;
        };
        if let Ok(meta) = file.file.metadata() {
            file.size = meta.len();
        }
        let size = file.size;
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
                self.torn.remove(path);
                if self.rotate_held.remove(path).is_some() {
                    tracing::warn!(path = %path.display(), "journal: log file rotates again");
                }
                if let (Some(rotated), Some(compressor)) = (rotated, &self.compressor) {
                    compressor.submit(rotated);
                }
            }
            Err(err) => {
                if !self.rotate_held.contains_key(path) {
                    tracing::warn!(path = %path.display(), "journal: cannot rotate log file, appending to it instead (reported once): {err}");
                }
                self.rotate_held
                    .insert(path.to_path_buf(), size.saturating_add(max_size));
            }
        }
    }

    /// Writes out what is buffered for `path`; returns `false` if that failed (the
    /// handle is closed then, and the lines counted as dropped).
    fn flush_one(&mut self, path: &Path) -> bool {
        // A file evicted since it was written was flushed on eviction.
        let Some(file) = self.files.get_mut(path) else {
            return true;
        };
        let flushed = file.flush();
        if let Flushed::Failed { .. } = flushed
            && let Some(file) = self.files.remove(path)
        {
            // Reopen next time: the state of this handle is unknown.
            return self.settle(path, &file, flushed);
        }
        self.settle_ok(path, flushed)
    }

    /// Flushes a handle that has left the cache (evicted, or its path now names
    /// another file) and closes it.
    fn close(&mut self, path: &Path, mut file: OpenFile) {
        let flushed = file.flush();
        self.settle(path, &file, flushed);
    }

    fn flush_all(&mut self) {
        let paths: Vec<PathBuf> = self.files.keys().cloned().collect();
        for path in paths {
            self.flush_one(&path);
        }
    }

    /// Records what a flush of `file` (the handle of `path`) came to.
    fn settle(&mut self, path: &Path, file: &OpenFile, flushed: Flushed) -> bool {
        match flushed {
            Flushed::Failed { err, lost, torn } => {
                if torn {
                    if let Ok(meta) = file.file.metadata() {
                        self.torn
                            .insert(path.to_path_buf(), (file.id.0, file.id.1, meta.len()));
                    }
                } else {
                    self.torn.remove(path);
                }
                self.failed(path, "write", &err, lost);
                false
            }
            other => self.settle_ok(path, other),
        }
    }

    fn settle_ok(&mut self, path: &Path, flushed: Flushed) -> bool {
        if let Flushed::Wrote = flushed {
            self.wrote(path);
        }
        true
    }

    /// Lines reached `path`: if it was failing, say so once (stderr now, the daemon
    /// log as soon as it can be written).
    fn wrote(&mut self, path: &Path) {
        self.torn.remove(path);
        let recovered = self.health.lock().wrote(path, self.wall);
        if let Some(r) = recovered {
            tracing::warn!(
                path = %path.display(),
                "journal: log file can be written again; {} line(s) were dropped since {}",
                r.dropped,
                health::local_time(r.since)
            );
            self.report.push(r);
        }
    }

    /// `op` failed on `path` and `lines` lines meant for it are lost. Only the failure
    /// that starts an episode is reported; this also keeps a failing daemon log from
    /// feeding warnings back into itself if tracing is routed there.
    fn failed(&mut self, path: &Path, op: &str, err: &io::Error, lines: u64) {
        let first = self
            .health
            .lock()
            .failed(path, self.wall, op, &err.to_string(), lines);
        if first {
            tracing::warn!(path = %path.display(), "journal: cannot {op} log file, dropping its lines until it can be written again (reported once): {err}");
        }
    }

    /// Writes the recoveries seen so far to the daemon log, including its own if it was
    /// failing. While it still fails this is tried again at most every
    /// `RECHECK_INTERVAL` (unless `force`), and the report is kept.
    fn write_report(&mut self, force: bool) {
        if self.report.is_empty() {
            return;
        }
        let Some(log) = &self.daemon_log else {
            self.report = RecoveryReport::default();
            return;
        };
        let (path, max_size) = (log.path.clone(), log.max_size);
        let own = self.health.lock().failure(&path).cloned();
        if own.is_some()
            && !force
            && self
                .report_tried
                .is_some_and(|t| self.now.saturating_duration_since(t) < self.recheck)
        {
            return;
        }
        self.report_tried = Some(self.now);
        let mut report = self.report.clone();
        if let Some(own) = &own {
            report.push(health::recovered(&path, own, self.wall));
        }
        let text = (log.line)(&report.message());
        // The report's own line is not counted as dropped if it fails: it is kept.
        if self.files.get(&path).is_some_and(|f| f.lines > 0) && !self.flush_one(&path) {
            return;
        }
        if max_size > 0 {
            self.rotate_if_full(&path, text.len() as u64, max_size);
        }
        match self.get(&path) {
            Ok(file) => {
                file.buf.extend_from_slice(text.as_bytes());
                file.size += text.len() as u64;
            }
            Err(err) => {
                self.failed(&path, "open", &err, 0);
                return;
            }
        }
        let report_before = self.report.clone();
        if self.flush_one(&path) {
            // `flush_one` reported the daemon log's own recovery into `self.report`
            // too: it is in the line just written.
            self.report = RecoveryReport::default();
            self.report_tried = None;
        } else {
            self.report = report_before;
        }
    }

    /// The cached handle for `path`, opening it (and its parent directories) if needed,
    /// or again if another program moved or deleted the file since it was opened.
    fn get(&mut self, path: &Path) -> io::Result<&mut OpenFile> {
        self.clock += 1;
        let (now, recheck) = (self.now, self.recheck);
        let moved = match self.files.get_mut(path) {
            Some(file) if now.saturating_duration_since(file.checked) >= recheck => {
                file.checked = now;
                fs::metadata(path).map_or(true, |m| (m.dev(), m.ino()) != file.id)
            }
            _ => false,
        };
        if moved && let Some(old) = self.files.remove(path) {
            // What was buffered belongs to the moved file; it may be gone.
            self.close(path, old);
        }
        if !self.files.contains_key(path) {
            // Most opens are reopens after an eviction: try the file first and make
            // its directories only when they are missing.
            let file = match open_append(path) {
                Err(err) if err.kind() == io::ErrorKind::NotFound => path
                    .parent()
                    .map_or(Ok(()), fs::create_dir_all)
                    .and_then(|()| open_append(path)),
                other => other,
            }?;
            self.insert(path.to_path_buf(), file);
        }
        let file = self
            .files
            .get_mut(path)
            .ok_or_else(|| io::Error::other("log file closed as soon as opened"))?;
        file.last_used = self.clock;
        Ok(file)
    }

    pub(super) fn insert(&mut self, path: PathBuf, file: File) {
        while self.files.len() >= MAX_OPEN_FILES {
            self.evict_oldest();
        }
        // The size on disk, so rotation stays right across evictions and reopening.
        let (size, id) = file
            .metadata()
            .map_or((0, (0, 0)), |m| (m.len(), (m.dev(), m.ino())));
        let mut open = OpenFile {
            file,
            buf: Vec::new(),
            lines: 0,
            lead: 0,
            last_used: self.clock,
            size,
            id,
            checked: self.now,
        };
        // A line torn by a failed write is ended before anything is appended, unless
        // the file has changed since (rotated, truncated, appended to by someone else).
        if self.torn.remove(&path) == Some((id.0, id.1, size)) && size > 0 {
            open.buf.push(b'\n');
            open.lead = 1;
            open.size += 1;
        }
        self.files.insert(path, open);
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
        if let Some(file) = self.files.remove(&oldest) {
            self.close(&oldest, file);
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Buffered lines are written on the way out (tests drop a `Writer` directly).
        self.flush_all();
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
    use crate::journal::fixtures::gunzip;

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

    /// What `tracing` printed while `f` ran on this thread.
    fn traced<T>(f: impl FnOnce() -> T) -> (T, String) {
        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl Write for Buf {
            fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
                lock(&self.0).extend_from_slice(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let writer = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let out = tracing::subscriber::with_default(subscriber, f);
        let text = String::from_utf8_lossy(&lock(&buf.0)).into_owned();
        (out, text)
    }

    /// `path` becomes a link to `/dev/full`, where every write fails with ENOSPC.
    fn full(path: &Path) {
        let _ = fs::remove_file(path);
        std::os::unix::fs::symlink("/dev/full", path).unwrap();
    }

    fn with_daemon_log(w: &mut Writer, path: &Path) {
        w.set_daemon_log(DaemonLog {
            path: path.to_path_buf(),
            max_size: 0,
            line: Box::new(|message| format!("daemon: {message}\n")),
        });
    }

    /// One batch as `run` does it: buffer, flush every file, report recoveries.
    fn batch(w: &mut Writer, writes: &[(&Path, &str)]) {
        w.wall = Utc::now();
        for (path, text) in writes {
            w.write(path, text.as_bytes(), 0);
        }
        for (path, _) in writes {
            w.flush_one(path);
        }
        w.write_report(false);
    }

    #[test]
    fn a_full_disk_warns_once_per_file_and_counts_the_dropped_lines() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, daemon) = (
            dir.path().join("a.log"),
            dir.path().join("b.log"),
            dir.path().join("daemon.log"),
        );
        full(&a);
        full(&b);
        let mut w = Writer::new(0, false).unwrap();
        w.recheck = Duration::ZERO;
        with_daemon_log(&mut w, &daemon);
        let ((), stderr) = traced(|| {
            // Every write only fills the buffer (that always works); each flush fails.
            // The warning flood came from the buffered write counting as a success.
            for _ in 0..50 {
                batch(&mut w, &[(&a, "one\ntwo\n"), (&b, "three\n")]);
            }
        });
        let warned = |path: &Path| {
            stderr
                .lines()
                .filter(|l| {
                    l.contains("cannot write log file") && l.contains(&*path.to_string_lossy())
                })
                .count()
        };
        assert_eq!((warned(&a), warned(&b)), (1, 1), "{stderr}");
        assert!(stderr.contains("No space left on device"), "{stderr}");
        let status = w.health().status(10);
        assert_eq!(status.lines_dropped_total, 150);
        assert_eq!(status.files_failing, 2);
        assert_eq!(status.dropped_failing, 150);
        assert_eq!(
            status.failing[0].error,
            "write: No space left on device (os error 28)"
        );
        assert!(!daemon.exists(), "nothing to report yet");

        // Space is back for a: its next lines are written, it says so once, and the
        // daemon log names it.
        fs::remove_file(&a).unwrap();
        let ((), stderr) = traced(|| {
            batch(&mut w, &[(&a, "four\n"), (&b, "five\n")]);
            batch(&mut w, &[(&a, "six\n"), (&b, "seven\n")]);
        });
        assert_eq!(read(&a), "four\nsix\n");
        let back: Vec<&str> = stderr
            .lines()
            .filter(|l| l.contains("written again"))
            .collect();
        assert_eq!(back.len(), 1, "{stderr}");
        assert!(
            back[0].contains("100 line(s) were dropped since"),
            "{stderr}"
        );
        assert!(!stderr.contains("cannot write"), "b warned again: {stderr}");
        let report = read(&daemon);
        assert_eq!(report.lines().count(), 1, "{report}");
        assert!(
            report.starts_with(&format!(
                "daemon: journal: log files could not be written, lines were dropped: {} from ",
                a.display()
            )),
            "{report}"
        );
        assert!(
            report.contains("(100 line(s) dropped; write: No space left on device (os error 28))"),
            "{report}"
        );
        let status = w.health().status(10);
        assert_eq!((status.lines_dropped_total, status.files_failing), (152, 1));
        assert_eq!(status.failing[0].path, b);
        assert_eq!(status.failing[0].dropped, 52);
    }

    #[test]
    fn a_failing_daemon_log_gets_the_report_including_itself_once_it_writes() {
        let dir = tempfile::tempdir().unwrap();
        let (a, daemon) = (dir.path().join("a.log"), dir.path().join("daemon.log"));
        full(&a);
        full(&daemon);
        let mut w = Writer::new(0, false).unwrap();
        w.recheck = Duration::ZERO;
        with_daemon_log(&mut w, &daemon);
        let ((), stderr) = traced(|| {
            for i in 0..10 {
                batch(&mut w, &[(&a, "x\n"), (&daemon, &format!("d{i}\n"))]);
            }
            fs::remove_file(&a).unwrap();
            // a recovers while the daemon log still fails: the report waits, and the
            // failed tries to write it neither warn again nor count as dropped lines.
            for _ in 0..5 {
                batch(&mut w, &[(&a, "y\n")]);
            }
        });
        assert_eq!(
            stderr.matches("cannot write log file").count(),
            2,
            "{stderr}"
        );
        assert!(!w.report.is_empty());
        assert_eq!(w.health().status(10).lines_dropped_total, 20);
        fs::remove_file(&daemon).unwrap();
        batch(&mut w, &[(&a, "z\n")]);
        assert!(w.report.is_empty());
        let text = read(&daemon);
        assert_eq!(text.lines().count(), 1, "{text}");
        for (path, dropped) in [(&a, 10), (&daemon, 10)] {
            assert!(
                text.contains(&format!("{} from ", path.display()))
                    && text.contains(&format!("({dropped} line(s) dropped; write: No space")),
                "{text}"
            );
        }
        let status = w.health().status(10);
        assert_eq!((status.lines_dropped_total, status.files_failing), (20, 0));
    }

    #[test]
    fn an_open_error_is_reported_once_and_counts_the_lines() {
        let dir = tempfile::tempdir().unwrap();
        // `sub` is a file, so `sub/a.log` cannot be created, even by root.
        fs::write(dir.path().join("sub"), "").unwrap();
        let path = dir.path().join("sub/a.log");
        let mut w = Writer::new(0, false).unwrap();
        let ((), stderr) = traced(|| {
            for _ in 0..20 {
                assert!(!w.write(&path, b"1\n2\n3\n", 0));
            }
        });
        assert_eq!(
            stderr.matches("cannot open log file").count(),
            1,
            "{stderr}"
        );
        assert_eq!(w.health().status(10).lines_dropped_total, 60);
    }

    #[test]
    fn a_partial_write_counts_only_the_lines_that_did_not_make_it() {
        // A non-blocking pipe takes what fits in its buffer, then refuses the rest.
        let (mut reader, writer) = io::pipe().unwrap();
        let file = File::from(std::os::fd::OwnedFd::from(writer));
        use std::os::fd::AsRawFd;
        // SAFETY: fcntl on a descriptor this test owns; no memory is passed.
        let set = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
        assert_eq!(set, 0);
        let line = format!("{}\n", "x".repeat(99));
        let mut open = OpenFile {
            file,
            buf: line.repeat(1000).into_bytes(),
            lines: 1000,
            lead: 0,
            last_used: 0,
            size: 0,
            id: (0, 0),
            checked: thread_now(),
        };
        let Flushed::Failed { err, lost, torn } = open.flush() else {
            panic!("a pipe does not take 100 KB");
        };
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        drop(open);
        let mut got = Vec::new();
        io::Read::read_to_end(&mut reader, &mut got).unwrap();
        assert!(!got.is_empty() && got.len() < 100_000);
        assert_eq!(lost, 1000 - count_lines(&got));
        assert_eq!(torn, got.last() != Some(&b'\n'));
    }

    #[test]
    fn a_line_torn_by_a_failed_write_is_ended_before_the_next_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.log");
        fs::write(&path, "whole\npart").unwrap();
        let meta = fs::metadata(&path).unwrap();
        let mut w = Writer::new(0, false).unwrap();
        w.torn
            .insert(path.clone(), (meta.dev(), meta.ino(), meta.len()));
        assert!(w.write(&path, b"next\n", 0));
        w.flush_one(&path);
        assert_eq!(read(&path), "whole\npart\nnext\n");
        // A file that changed since (here: rotated away) gets no extra newline.
        let other = dir.path().join("b.log");
        fs::write(&other, "part").unwrap();
        w.torn
            .insert(other.clone(), (meta.dev(), meta.ino(), meta.len()));
        assert!(w.write(&other, b"next\n", 0));
        drop(w);
        assert_eq!(read(&other), "partnext\n");
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
