//! In-memory figures per NAS, updated by the owners and read by `/status`, `/metrics`
//! and the NAS list of the JSON API: pool size, in flight, window, last error and
//! success, consecutive failures, per-cmd outcome counters and a latency histogram.
//!
//! Writers (one owner per NAS) take a short `std::sync::Mutex` once per batch of
//! results, never across an await. Labels stay bounded: NAS id and cmd, and cmds beyond
//! `MAX_CMDS` distinct names per NAS are counted under `other`.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock};
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::journal::{JournalHealth, JournalStatus};
use crate::transport::pool::{PoolCounters, PoolFigures};

/// Distinct cmd labels kept per NAS; the rest are counted as `other`.
pub const MAX_CMDS: usize = 64;

/// Upper bounds (seconds) of the command latency histogram buckets.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Outcome counters of one cmd on one NAS.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CmdCounters {
    /// Events that entered the NAS's queue (first seen by its owner).
    pub enqueued: u64,
    pub done: u64,
    pub failed: u64,
    /// Attempts that ended in "try again later".
    pub retried: u64,
    /// Events never sent: a later event of their `[coalesce]` group replaced them.
    pub superseded: u64,
}

/// A cumulative histogram of attempt durations.
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    /// Count per bucket of `LATENCY_BUCKETS` (not cumulative; the exporter sums).
    pub buckets: [u64; LATENCY_BUCKETS.len()],
    pub count: u64,
    pub sum_seconds: f64,
}

impl Default for Histogram {
    fn default() -> Histogram {
        Histogram {
            buckets: [0; LATENCY_BUCKETS.len()],
            count: 0,
            sum_seconds: 0.0,
        }
    }
}

impl Histogram {
    pub fn observe(&mut self, d: Duration) {
        let s = d.as_secs_f64();
        if let Some(i) = LATENCY_BUCKETS.iter().position(|b| s <= *b) {
            self.buckets[i] += 1;
        }
        self.count += 1;
        self.sum_seconds += s;
    }
}

/// How one attempt ended, as far as the statistics care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptKind {
    Done,
    /// Final failure; `reached` tells whether the device was reached (commands sent).
    Failed {
        reached: bool,
    },
    /// To be tried again (timeout, no answer, postponed): counts as a NAS failure.
    Retry,
    /// A retryable result after the last allowed attempt: a final failure that also
    /// counts as a NAS failure.
    GaveUp,
}

#[derive(Default)]
struct Inner {
    by_cmd: BTreeMap<String, CmdCounters>,
    latency: Histogram,
    last_error: Option<String>,
    last_error_at: Option<DateTime<Utc>>,
    last_success_at: Option<DateTime<Utc>>,
    consecutive_failures: u64,
    failing_since: Option<DateTime<Utc>>,
    unavailable: Option<String>,
    /// The counters of the NAS's session pool (SSH, telnet, API); none for the others.
    pool: Option<Arc<PoolCounters>>,
    down: Option<(DateTime<Utc>, String)>,
}

/// The figures of one NAS.
#[derive(Default)]
pub struct NasStats {
    pool_size: AtomicI64,
    in_flight: AtomicI64,
    window: AtomicI64,
    running: AtomicBool,
    enabled: AtomicBool,
    /// Incremented by each owner start, so a late `stopped` of an old owner of the same
    /// NAS does not mark the new one stopped.
    generation: AtomicU64,
    /// Times the breaker closed after being open (the NAS came back), for the
    /// reconciliation run on return, which must not miss a short outage.
    returns: AtomicU64,
    inner: Mutex<Inner>,
}

/// A copy of one NAS's figures at one moment.
#[derive(Debug, Clone, Default)]
pub struct NasSnapshot {
    pub nas_id: i64,
    pub running: bool,
    pub enabled: bool,
    pub pool_size: i64,
    pub in_flight: i64,
    /// Events of this NAS held in the owner's memory now.
    pub window: i64,
    pub open_sessions: i64,
    /// The session pool's figures (zero for transports without sessions).
    pub pool: PoolFigures,
    pub last_error: Option<String>,
    pub last_error_at: Option<DateTime<Utc>>,
    pub last_success_at: Option<DateTime<Utc>>,
    pub consecutive_failures: u64,
    /// When the current run of failures began (None when the last attempt worked).
    pub failing_since: Option<DateTime<Utc>>,
    /// Why the owner cannot send now (e.g. its scheme is missing).
    pub unavailable: Option<String>,
    /// The circuit breaker marked the NAS down: since when, and the last error.
    pub down_since: Option<DateTime<Utc>>,
    pub down_reason: Option<String>,
    pub by_cmd: Vec<(String, CmdCounters)>,
    pub latency: Histogram,
}

impl NasStats {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the figures inconsistent in a
        // way that matters; keep serving them.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An owner starts; returns its generation for `stopped`.
    pub fn start(&self) -> u64 {
        self.running.store(true, Ordering::Relaxed);
        self.generation.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// The owner's settings changed (or it started).
    pub fn set_runtime(
        &self,
        pool_size: i32,
        enabled: bool,
        unavailable: Option<String>,
        pool: Option<Arc<PoolCounters>>,
    ) {
        self.pool_size.store(pool_size.into(), Ordering::Relaxed);
        self.enabled.store(enabled, Ordering::Relaxed);
        let mut inner = self.lock();
        inner.unavailable = unavailable;
        inner.pool = pool;
    }

    /// The owner of generation `generation` stopped (NAS removed or disabled, or
    /// shutdown).
    pub fn stopped(&self, generation: u64) {
        if self.generation.load(Ordering::Relaxed) != generation {
            return;
        }
        self.running.store(false, Ordering::Relaxed);
        self.in_flight.store(0, Ordering::Relaxed);
        self.window.store(0, Ordering::Relaxed);
        let mut inner = self.lock();
        inner.pool = None;
        inner.down = None;
    }

    /// The circuit breaker opened (`Some`: since when, why) or closed (`None`).
    pub fn set_down(&self, down: Option<(DateTime<Utc>, String)>) {
        let mut inner = self.lock();
        if inner.down.is_some() && down.is_none() {
            self.returns.fetch_add(1, Ordering::Relaxed);
        }
        inner.down = down;
    }

    /// How many times the NAS came back after being down.
    pub fn returns(&self) -> u64 {
        self.returns.load(Ordering::Relaxed)
    }

    pub fn set_load(&self, in_flight: usize, window: usize) {
        self.in_flight.store(in_flight as i64, Ordering::Relaxed);
        self.window.store(window as i64, Ordering::Relaxed);
    }

    /// Events that entered the owner's queue, by cmd.
    pub fn enqueued<'a>(&self, cmds: impl IntoIterator<Item = &'a str>) {
        let mut inner = self.lock();
        for cmd in cmds {
            counters(&mut inner.by_cmd, cmd).enqueued += 1;
        }
    }

    /// Events recorded as superseded (not attempts: no latency, no failure streak), by
    /// cmd.
    pub fn superseded<'a>(&self, cmds: impl IntoIterator<Item = &'a str>) {
        let mut inner = self.lock();
        for cmd in cmds {
            counters(&mut inner.by_cmd, cmd).superseded += 1;
        }
    }

    /// Records the attempts of one completion batch: (cmd, kind, duration, error).
    pub fn attempts<'a>(
        &self,
        results: impl IntoIterator<Item = (&'a str, AttemptKind, Duration, Option<&'a str>)>,
    ) {
        let now = Utc::now();
        let mut inner = self.lock();
        for (cmd, kind, duration, error) in results {
            inner.latency.observe(duration);
            let c = counters(&mut inner.by_cmd, cmd);
            match kind {
                AttemptKind::Done => c.done += 1,
                AttemptKind::Failed { .. } | AttemptKind::GaveUp => c.failed += 1,
                AttemptKind::Retry => c.retried += 1,
            }
            if let Some(e) = error {
                inner.last_error = Some(e.to_string());
                inner.last_error_at = Some(now);
            }
            match kind {
                AttemptKind::Done | AttemptKind::Failed { reached: true } => {
                    if kind == AttemptKind::Done {
                        inner.last_success_at = Some(now);
                    }
                    inner.consecutive_failures = 0;
                    inner.failing_since = None;
                }
                AttemptKind::Failed { reached: false } => {}
                AttemptKind::Retry | AttemptKind::GaveUp => {
                    inner.consecutive_failures += 1;
                    inner.failing_since.get_or_insert(now);
                }
            }
        }
    }

    pub fn snapshot(&self, nas_id: i64) -> NasSnapshot {
        let inner = self.lock();
        let pool = inner.pool.as_ref().map(|p| p.figures()).unwrap_or_default();
        NasSnapshot {
            nas_id,
            running: self.running.load(Ordering::Relaxed),
            enabled: self.enabled.load(Ordering::Relaxed),
            pool_size: self.pool_size.load(Ordering::Relaxed),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            window: self.window.load(Ordering::Relaxed),
            open_sessions: pool.open_sessions as i64,
            pool,
            last_error: inner.last_error.clone(),
            last_error_at: inner.last_error_at,
            last_success_at: inner.last_success_at,
            consecutive_failures: inner.consecutive_failures,
            failing_since: inner.failing_since,
            unavailable: inner.unavailable.clone(),
            down_since: inner.down.as_ref().map(|d| d.0),
            down_reason: inner.down.as_ref().map(|d| d.1.clone()),
            by_cmd: inner.by_cmd.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            latency: inner.latency.clone(),
        }
    }
}

fn counters<'m>(map: &'m mut BTreeMap<String, CmdCounters>, cmd: &str) -> &'m mut CmdCounters {
    let key = if map.contains_key(cmd) || map.len() < MAX_CMDS {
        cmd
    } else {
        "other"
    };
    map.entry(key.to_string()).or_default()
}

/// Daemon-wide figures: one `NasStats` per NAS that has had an owner, plus the API's
/// own counters.
#[derive(Default)]
pub struct Stats {
    nas: RwLock<HashMap<i64, Arc<NasStats>>>,
    /// Events accepted by the HTTP API (both the billing-compatible and the JSON one).
    pub api_enqueued: AtomicI64,
    /// The daemon's log files: which cannot be written, lines dropped.
    journal: OnceLock<JournalHealth>,
    /// `[billing]`: what is wrong with the billing database now, per part.
    billing: std::sync::Mutex<std::collections::BTreeMap<&'static str, String>>,
}

impl Stats {
    pub fn new() -> Arc<Stats> {
        Arc::new(Stats::default())
    }

    /// Has `/status` and `/metrics` report on the daemon's journal (the first call wins).
    pub fn attach_journal(&self, health: JournalHealth) {
        let _ = self.journal.set(health);
    }

    /// The journal's dropped lines and failing files (up to `max_listed` of them by
    /// name); all zero before a journal is attached.
    pub fn journal(&self, max_listed: usize) -> JournalStatus {
        self.journal
            .get()
            .map(|h| h.status(max_listed))
            .unwrap_or_default()
    }

    /// Sets (or clears, with None) what is wrong with one part of the billing database.
    pub fn set_billing_problem(&self, part: &'static str, problem: Option<String>) {
        let mut map = self.billing.lock().unwrap_or_else(|p| p.into_inner());
        match problem {
            Some(text) => map.insert(part, text),
            None => map.remove(part),
        };
    }

    /// What is wrong with the billing database now, one line per part.
    pub fn billing_problems(&self) -> Vec<String> {
        let map = self.billing.lock().unwrap_or_else(|p| p.into_inner());
        map.values().cloned().collect()
    }

    /// The figures of a NAS, created on first use. Kept after its owner stops so that
    /// counters do not go backwards.
    pub fn nas(&self, nas_id: i64) -> Arc<NasStats> {
        if let Ok(map) = self.nas.read()
            && let Some(s) = map.get(&nas_id)
        {
            return s.clone();
        }
        let mut map = self.nas.write().unwrap_or_else(|p| p.into_inner());
        map.entry(nas_id).or_default().clone()
    }

    /// Every NAS's figures, by NAS id.
    pub fn snapshot(&self) -> Vec<NasSnapshot> {
        let map: Vec<(i64, Arc<NasStats>)> = match self.nas.read() {
            Ok(m) => m.iter().map(|(k, v)| (*k, v.clone())).collect(),
            Err(p) => p
                .into_inner()
                .iter()
                .map(|(k, v)| (*k, v.clone()))
                .collect(),
        };
        let mut out: Vec<NasSnapshot> = map.iter().map(|(id, s)| s.snapshot(*id)).collect();
        out.sort_by_key(|s| s.nas_id);
        out
    }

    pub fn get(&self, nas_id: i64) -> Option<NasSnapshot> {
        let s = self.nas.read().ok()?.get(&nas_id).cloned()?;
        Some(s.snapshot(nas_id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_streak_and_reset() {
        let stats = Stats::new();
        let n = stats.nas(1);
        n.attempts([(
            "user_add",
            AttemptKind::Retry,
            Duration::from_millis(3),
            Some("timeout"),
        )]);
        n.attempts([(
            "user_add",
            AttemptKind::Retry,
            Duration::from_millis(30),
            Some("timeout"),
        )]);
        let s = stats.get(1).unwrap();
        assert_eq!(s.consecutive_failures, 2);
        assert!(s.failing_since.is_some());
        assert_eq!(s.last_error.as_deref(), Some("timeout"));
        assert_eq!(
            s.by_cmd,
            vec![(
                "user_add".into(),
                CmdCounters {
                    retried: 2,
                    ..Default::default()
                }
            )]
        );
        // A failure before anything was sent says nothing about the device.
        n.attempts([(
            "user_x",
            AttemptKind::Failed { reached: false },
            Duration::ZERO,
            Some("no cmd"),
        )]);
        assert_eq!(stats.get(1).unwrap().consecutive_failures, 2);
        n.attempts([(
            "user_add",
            AttemptKind::Done,
            Duration::from_millis(2),
            None,
        )]);
        let s = stats.get(1).unwrap();
        assert_eq!(s.consecutive_failures, 0);
        assert!(s.failing_since.is_none());
        assert!(s.last_success_at.is_some());
        assert_eq!(s.latency.count, 4);
        assert_eq!(s.latency.buckets[0], 3, "0, 2 and 3 ms are <= 5 ms");
        assert_eq!(s.latency.buckets[3], 1, "30 ms is <= 50 ms");
    }

    #[test]
    fn cmd_labels_are_bounded() {
        let stats = Stats::new();
        let n = stats.nas(1);
        let names: Vec<String> = (0..MAX_CMDS + 10).map(|i| format!("cmd_{i}")).collect();
        n.enqueued(names.iter().map(String::as_str));
        n.superseded(["cmd_0", "cmd_0", "cmd_70"]);
        let s = stats.get(1).unwrap();
        assert_eq!(s.by_cmd.len(), MAX_CMDS + 1);
        let first = s.by_cmd.iter().find(|(k, _)| k == "cmd_0").unwrap();
        assert_eq!((first.1.enqueued, first.1.superseded), (1, 2));
        assert_eq!(s.latency.count, 0, "a superseded event is no attempt");
        let other = s.by_cmd.iter().find(|(k, _)| k == "other").unwrap();
        assert_eq!((other.1.enqueued, other.1.superseded), (10, 1));
    }
}
