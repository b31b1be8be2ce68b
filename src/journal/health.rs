//! Whether each log file can be written (pure, no I/O, time passed in): a file is ok,
//! or failing since its first failed open / write / flush (with the lines dropped since),
//! until its next successful write, which yields one [`Recovered`] report. The writer
//! thread drives it; `/status` and `/metrics` read a [`JournalStatus`] of it through
//! [`JournalHealth`].
//!
//! One warning per file: [`FileStates::failed`] answers `true` only for the failure that
//! starts an episode, and only [`FileStates::wrote`] (lines that reached the OS, not
//! lines that were merely buffered) ends it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use chrono::{DateTime, Local, Utc};

use super::format::SECONDS_FORMAT;

/// Recovered files named one by one in a daemon-log report; the rest are counted.
pub const MAX_REPORTED: usize = 20;

/// A file that cannot be written now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The first failure of this episode.
    pub since: DateTime<Utc>,
    /// What failed first (`open`, `flush`, ...) and the OS error, e.g.
    /// `flush: No space left on device (os error 28)`.
    pub error: String,
    /// Lines that were meant for this file and are lost, since `since`.
    pub dropped: u64,
}

/// A file that wrote again after failing: the episode that ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovered {
    pub path: PathBuf,
    pub since: DateTime<Utc>,
    pub until: DateTime<Utc>,
    pub error: String,
    pub dropped: u64,
}

/// The state of every log file that is failing, and the lines dropped since start.
#[derive(Debug, Default)]
pub struct FileStates {
    failing: HashMap<PathBuf, Failure>,
    dropped_total: u64,
}

impl FileStates {
    /// `op` on `path` failed with `error` at `now` and `lines` lines meant for it are
    /// lost. Returns `true` when this starts an episode (the one time to warn); a file
    /// already failing only adds to its count.
    pub fn failed(
        &mut self,
        path: &Path,
        now: DateTime<Utc>,
        op: &str,
        error: &str,
        lines: u64,
    ) -> bool {
        self.dropped_total = self.dropped_total.saturating_add(lines);
        if let Some(failure) = self.failing.get_mut(path) {
            failure.dropped = failure.dropped.saturating_add(lines);
            return false;
        }
        self.failing.insert(
            path.to_path_buf(),
            Failure {
                since: now,
                error: format!("{op}: {error}"),
                dropped: lines,
            },
        );
        true
    }

    /// Lines reached `path` at `now`: ends its episode if it was failing.
    pub fn wrote(&mut self, path: &Path, now: DateTime<Utc>) -> Option<Recovered> {
        if self.failing.is_empty() {
            return None;
        }
        let failure = self.failing.remove(path)?;
        Some(recovered(path, &failure, now))
    }

    /// The episode `path` is in, if it is failing.
    pub fn failure(&self, path: &Path) -> Option<&Failure> {
        self.failing.get(path)
    }

    /// What `/status` and `/metrics` show: the totals and up to `max_listed` failing
    /// files, the oldest failure first (then by path).
    pub fn status(&self, max_listed: usize) -> JournalStatus {
        let dropped_failing = self.failing.values().map(|f| f.dropped).sum();
        // `/metrics` asks for none: no list to build on every scrape.
        let mut failing: Vec<FailingFile> = if max_listed == 0 {
            Vec::new()
        } else {
            self.failing
                .iter()
                .map(|(path, f)| FailingFile {
                    path: path.clone(),
                    since: f.since,
                    error: f.error.clone(),
                    dropped: f.dropped,
                })
                .collect()
        };
        failing.sort_by(|a, b| a.since.cmp(&b.since).then_with(|| a.path.cmp(&b.path)));
        failing.truncate(max_listed);
        JournalStatus {
            lines_dropped_total: self.dropped_total,
            files_failing: self.failing.len(),
            dropped_failing,
            failing,
        }
    }
}

/// The report of `path`'s episode ending at `until`.
pub fn recovered(path: &Path, failure: &Failure, until: DateTime<Utc>) -> Recovered {
    Recovered {
        path: path.to_path_buf(),
        since: failure.since,
        until,
        error: failure.error.clone(),
        dropped: failure.dropped,
    }
}

/// One failing file as `/status` names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailingFile {
    pub path: PathBuf,
    pub since: DateTime<Utc>,
    pub error: String,
    pub dropped: u64,
}

/// The journal's health at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JournalStatus {
    /// Lines dropped since the journal was opened (`nasd_journal_lines_dropped_total`).
    pub lines_dropped_total: u64,
    /// Files failing now (`nasd_journal_files_failing`).
    pub files_failing: usize,
    /// Lines dropped by the files failing now, during their current episodes.
    pub dropped_failing: u64,
    /// Some of the files failing now, the oldest failure first.
    pub failing: Vec<FailingFile>,
}

/// The writer thread's [`FileStates`], shared with whoever reports on the journal.
/// Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct JournalHealth(Arc<Mutex<FileStates>>);

impl JournalHealth {
    pub(super) fn lock(&self) -> MutexGuard<'_, FileStates> {
        // The states stay consistent even if a holder panicked.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The totals and up to `max_listed` failing files.
    pub fn status(&self, max_listed: usize) -> JournalStatus {
        self.lock().status(max_listed)
    }
}

/// Recoveries waiting to be written to the daemon log (which may itself be failing):
/// the first [`MAX_REPORTED`] files by name, the others counted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    listed: Vec<Recovered>,
    more_files: u64,
    more_dropped: u64,
}

impl RecoveryReport {
    pub fn push(&mut self, r: Recovered) {
        if self.listed.len() < MAX_REPORTED {
            self.listed.push(r);
        } else {
            self.more_files += 1;
            self.more_dropped = self.more_dropped.saturating_add(r.dropped);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.listed.is_empty()
    }

    /// The daemon-log message, one line:
    /// `journal: log files could not be written, lines were dropped: PATH from T1 to T2
    /// (N lines dropped; flush: ERROR); ...`, times in local time.
    pub fn message(&self) -> String {
        let mut text =
            String::from("journal: log files could not be written, lines were dropped: ");
        let parts: Vec<String> = self
            .listed
            .iter()
            .map(|r| {
                format!(
                    "{} from {} to {} ({} line(s) dropped; {})",
                    r.path.display(),
                    local_time(r.since),
                    local_time(r.until),
                    r.dropped,
                    r.error
                )
            })
            .collect();
        text.push_str(&parts.join("; "));
        if self.more_files > 0 {
            text.push_str(&format!(
                "; and {} more file(s) ({} line(s) dropped)",
                self.more_files, self.more_dropped
            ));
        }
        text
    }
}

/// `2026-11-22 00:03:10`, local time to the second, as messages name a moment (log
/// lines start with the milliseconds too, see `TIME_FORMAT`).
pub fn local_time(t: DateTime<Utc>) -> String {
    t.with_timezone(&Local).format(SECONDS_FORMAT).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + s, 0).expect("valid time")
    }

    enum Step {
        Fail(&'static str, i64, u64),
        Wrote(&'static str, i64),
    }

    /// Each step with what it must answer: `Some(true/false)` for a failure (warn or
    /// not), the recovered episode's (since, until, dropped) for a write.
    #[test]
    fn warns_once_per_episode_and_reports_each_recovery() {
        use Step::*;
        /// (since, until, dropped) of the episode a write ends.
        type Want = Option<(i64, i64, u64)>;
        /// A step, whether it warns (failures), what it ends (writes).
        type Row = (Step, Option<bool>, Want);
        // Name, steps, then (lines dropped in all, files failing at the end).
        let cases: Vec<(&str, Vec<Row>, (u64, usize))> = vec![
            (
                "ok stays ok",
                vec![(Wrote("a", 1), None, None), (Wrote("a", 2), None, None)],
                (0, 0),
            ),
            (
                "many failures, one warning, then one recovery",
                vec![
                    (Fail("a", 1, 3), Some(true), None),
                    (Fail("a", 2, 3), Some(false), None),
                    (Fail("a", 3, 0), Some(false), None),
                    (Fail("a", 4, 4), Some(false), None),
                    (Wrote("a", 5), None, Some((1, 5, 10))),
                    (Wrote("a", 6), None, None),
                ],
                (10, 0),
            ),
            (
                "files are independent",
                vec![
                    (Fail("a", 1, 1), Some(true), None),
                    (Fail("b", 2, 2), Some(true), None),
                    (Fail("a", 3, 1), Some(false), None),
                    (Wrote("b", 4), None, Some((2, 4, 2))),
                    (Fail("b", 5, 1), Some(true), None),
                ],
                (5, 2),
            ),
            (
                "a new episode after a recovery warns again and counts afresh",
                vec![
                    (Fail("a", 1, 2), Some(true), None),
                    (Wrote("a", 2), None, Some((1, 2, 2))),
                    (Fail("a", 3, 5), Some(true), None),
                    (Wrote("a", 9), None, Some((3, 9, 5))),
                ],
                (7, 0),
            ),
        ];
        for (name, steps, (total, failing)) in cases {
            let mut states = FileStates::default();
            for (i, (step, warn, want)) in steps.into_iter().enumerate() {
                match step {
                    Fail(p, t, lines) => {
                        let first = states.failed(Path::new(p), at(t), "flush", "disk full", lines);
                        assert_eq!(Some(first), warn, "{name}: step {i}");
                    }
                    Wrote(p, t) => {
                        let got = states
                            .wrote(Path::new(p), at(t))
                            .map(|r| (r.since, r.until, r.dropped));
                        let want = want.map(|(s, u, d)| (at(s), at(u), d));
                        assert_eq!(got, want, "{name}: step {i}");
                    }
                }
            }
            let status = states.status(10);
            assert_eq!(
                (status.lines_dropped_total, status.files_failing),
                (total, failing),
                "{name}"
            );
        }
    }

    #[test]
    fn the_first_error_of_an_episode_is_kept() {
        let mut states = FileStates::default();
        assert!(states.failed(Path::new("a"), at(0), "open", "permission denied", 1));
        assert!(!states.failed(Path::new("a"), at(1), "flush", "disk full", 1));
        let failure = states.failure(Path::new("a")).expect("failing");
        assert_eq!(failure.error, "open: permission denied");
        assert_eq!(failure.since, at(0));
        assert_eq!(failure.dropped, 2);
        assert_eq!(states.failure(Path::new("b")), None);
    }

    #[test]
    fn status_lists_the_oldest_failures_first_and_sums_the_rest() {
        let mut states = FileStates::default();
        for (p, t, n) in [("c", 3, 1), ("b", 1, 2), ("a", 1, 4), ("d", 7, 8)] {
            states.failed(Path::new(p), at(t), "flush", "disk full", n);
        }
        let status = states.status(2);
        assert_eq!(status.files_failing, 4);
        assert_eq!(status.dropped_failing, 15);
        assert_eq!(status.lines_dropped_total, 15);
        let listed: Vec<(&str, u64)> = status
            .failing
            .iter()
            .map(|f| (f.path.to_str().expect("utf-8"), f.dropped))
            .collect();
        assert_eq!(listed, [("a", 4), ("b", 2)]);
        states.wrote(Path::new("a"), at(9));
        let status = states.status(10);
        assert_eq!((status.files_failing, status.dropped_failing), (3, 11));
        // The total never goes back.
        assert_eq!(status.lines_dropped_total, 15);
    }

    #[test]
    fn the_report_names_each_file_then_counts_the_rest() {
        let r = |p: &str, dropped| Recovered {
            path: PathBuf::from(p),
            since: at(0),
            until: at(65),
            error: "flush: disk full".into(),
            dropped,
        };
        let mut report = RecoveryReport::default();
        assert!(report.is_empty());
        report.push(r("/log/nas_event_daemon.log", 3));
        report.push(r("/log/nas_event_daemon/a_1.log", 0));
        assert_eq!(
            report.message(),
            format!(
                "journal: log files could not be written, lines were dropped: \
                 /log/nas_event_daemon.log from {0} to {1} (3 line(s) dropped; flush: disk full); \
                 /log/nas_event_daemon/a_1.log from {0} to {1} (0 line(s) dropped; flush: disk full)",
                local_time(at(0)),
                local_time(at(65))
            )
        );
        for i in 0..MAX_REPORTED + 3 {
            report.push(r(&format!("/log/abonents/1/event_{i}.log"), 2));
        }
        let text = report.message();
        assert_eq!(text.matches(" from ").count(), MAX_REPORTED);
        assert!(
            text.ends_with("; and 5 more file(s) (10 line(s) dropped)"),
            "{text}"
        );
        assert!(!text.contains('\n'));
    }
}
