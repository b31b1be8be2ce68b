//! The writer thread: appends to the log files through a bounded least-recently-used
//! cache of open handles, rotates a file before a write would take it past its limit
//! (gzip on a helper thread), notices files moved or truncated by other programs, and
//! warns once per failing file.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

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
pub(super) struct Writer {
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
    pub(super) fn new(backups: u32, gzip: bool) -> io::Result<Writer> {
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

    pub(super) fn run(mut self, rx: Receiver<Msg>) {
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

    pub(super) fn insert(&mut self, path: PathBuf, file: File) {
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
