//! The watcher (pure): queue and failure transitions per NAS, fed one observation per
//! NAS per check; table-tested without a clock of its own (`now` is passed in).

use std::collections::{BTreeMap, HashMap};

use tokio::time::Instant;

use crate::config::alerts::{AlertKind, WatchConfig};
use crate::duration::format_duration;

/// One NAS as seen at one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    pub nas_id: i64,
    /// Events waiting in `events_stack` for this NAS.
    pub depth: i64,
    /// Events of this NAS finished (done or failed) since the daemon started.
    pub finished: u64,
    /// Of those, failed permanently.
    pub failed: u64,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone)]
struct NasWatch {
    above_since: Option<Instant>,
    high: bool,
    finished: u64,
    progress_at: Instant,
    stalled: bool,
    failed: u64,
    failing: bool,
}

/// Queue and failure transitions per NAS, fed one [`Observation`] per NAS per check.
#[derive(Debug, Default)]
pub struct Watcher {
    nas: HashMap<i64, NasWatch>,
}

/// A transition found by the watcher: the NAS, the kind and its fields.
pub type Found = (i64, AlertKind, BTreeMap<String, serde_json::Value>);

impl Watcher {
    pub fn step(&mut self, cfg: &WatchConfig, now: Instant, seen: &[Observation]) -> Vec<Found> {
        let mut found = Vec::new();
        self.nas
            .retain(|id, _| seen.iter().any(|o| o.nas_id == *id));
        for o in seen {
            let w = self.nas.entry(o.nas_id).or_insert(NasWatch {
                above_since: None,
                high: false,
                finished: o.finished,
                progress_at: now,
                stalled: false,
                failed: o.failed,
                failing: false,
            });
            let fields = |pairs: &[(&str, serde_json::Value)]| {
                pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.clone()))
                    .collect::<BTreeMap<_, _>>()
            };
            // Queue above the threshold for queue_for.
            if cfg.queue_threshold > 0 && o.depth > cfg.queue_threshold {
                let since = *w.above_since.get_or_insert(now);
                let lasted = now.saturating_duration_since(since);
                if !w.high && lasted >= cfg.queue_for {
                    w.high = true;
                    found.push((
                        o.nas_id,
                        AlertKind::QueueHigh,
                        fields(&[
                            ("queue", o.depth.into()),
                            ("threshold", cfg.queue_threshold.into()),
                            ("duration", format_duration(lasted).into()),
                        ]),
                    ));
                }
            } else {
                w.above_since = None;
                if w.high {
                    w.high = false;
                    found.push((
                        o.nas_id,
                        AlertKind::QueueOk,
                        fields(&[
                            ("queue", o.depth.into()),
                            ("threshold", cfg.queue_threshold.into()),
                            ("duration", "0s".into()),
                        ]),
                    ));
                }
            }
            // A queue that does not drain: events waiting, none finished for stall_for.
            if o.depth == 0 || o.finished > w.finished {
                w.progress_at = now;
                if w.stalled {
                    w.stalled = false;
                    found.push((
                        o.nas_id,
                        AlertKind::QueueMoving,
                        fields(&[("queue", o.depth.into()), ("duration", "0s".into())]),
                    ));
                }
            } else if !cfg.stall_for.is_zero() && !w.stalled {
                let lasted = now.saturating_duration_since(w.progress_at);
                if lasted >= cfg.stall_for {
                    w.stalled = true;
                    found.push((
                        o.nas_id,
                        AlertKind::QueueStalled,
                        fields(&[
                            ("queue", o.depth.into()),
                            ("duration", format_duration(lasted).into()),
                        ]),
                    ));
                }
            }
            w.finished = o.finished;
            // Permanent failures: one message when they start, none while they go on,
            // rearmed by a check without new failures.
            if o.failed > w.failed {
                if cfg.failures && !w.failing {
                    found.push((
                        o.nas_id,
                        AlertKind::EventsFailed,
                        fields(&[
                            ("failed", (o.failed - w.failed).into()),
                            ("failed_total", o.failed.into()),
                            (
                                "last_error",
                                o.last_error.clone().unwrap_or_default().into(),
                            ),
                        ]),
                    ));
                }
                w.failing = true;
            } else {
                w.failing = false;
            }
            w.failed = o.failed;
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn obs(nas_id: i64, depth: i64, finished: u64, failed: u64) -> Observation {
        Observation {
            nas_id,
            depth,
            finished,
            failed,
            last_error: Some("boom".into()),
        }
    }

    /// (seconds from the start, depth, finished, the transitions expected)
    type Step = (u64, i64, u64, Vec<(i64, AlertKind)>);

    fn kinds(found: &[Found]) -> Vec<(i64, AlertKind)> {
        found.iter().map(|(n, k, _)| (*n, *k)).collect()
    }

    #[test]
    fn queue_high_once_then_ok() {
        let cfg = WatchConfig {
            check_interval: Duration::from_secs(1),
            queue_threshold: 100,
            queue_for: Duration::from_secs(60),
            stall_for: Duration::ZERO,
            failures: true,
        };
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut w = Watcher::default();
        // (seconds, depth, finished, expected)
        let steps: Vec<Step> = vec![
            (0, 150, 0, vec![]),
            (30, 400, 10, vec![]),
            (60, 300, 20, vec![(1, AlertKind::QueueHigh)]),
            (90, 500, 30, vec![]),
            (120, 80, 40, vec![(1, AlertKind::QueueOk)]),
            (150, 90, 50, vec![]),
            // Above again: the 60 s count starts over.
            (180, 200, 60, vec![]),
            (200, 200, 70, vec![]),
            (240, 200, 80, vec![(1, AlertKind::QueueHigh)]),
        ];
        for (at, depth, finished, want) in steps {
            let found = w.step(&cfg, t0 + s(at), &[obs(1, depth, finished, 0)]);
            assert_eq!(kinds(&found), want, "at {at}s depth {depth}");
        }
    }

    #[test]
    fn stall_needs_waiting_events_and_no_finished_ones() {
        let cfg = WatchConfig {
            check_interval: Duration::from_secs(1),
            queue_threshold: 0,
            queue_for: Duration::ZERO,
            stall_for: Duration::from_secs(600),
            failures: true,
        };
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut w = Watcher::default();
        let steps: Vec<Step> = vec![
            (0, 5, 0, vec![]),
            (300, 5, 0, vec![]),
            (600, 7, 0, vec![(1, AlertKind::QueueStalled)]),
            (900, 9, 0, vec![]),
            (960, 8, 1, vec![(1, AlertKind::QueueMoving)]),
            // An empty queue is never stalled.
            (2000, 0, 1, vec![]),
            (3000, 0, 1, vec![]),
        ];
        for (at, depth, finished, want) in steps {
            let found = w.step(&cfg, t0 + s(at), &[obs(1, depth, finished, 0)]);
            assert_eq!(kinds(&found), want, "at {at}s");
        }
    }

    #[test]
    fn failures_alert_once_per_run_of_failures() {
        let cfg = WatchConfig {
            queue_threshold: 0,
            stall_for: Duration::ZERO,
            ..WatchConfig::default()
        };
        let t0 = Instant::now();
        let mut w = Watcher::default();
        // First sight only sets the baseline.
        assert!(w.step(&cfg, t0, &[obs(1, 0, 10, 2)]).is_empty());
        let found = w.step(&cfg, t0, &[obs(1, 0, 20, 5)]);
        assert_eq!(kinds(&found), vec![(1, AlertKind::EventsFailed)]);
        assert_eq!(found[0].2["failed"], 3);
        assert_eq!(found[0].2["last_error"], "boom");
        // Still failing: quiet.
        assert!(w.step(&cfg, t0, &[obs(1, 0, 30, 9)]).is_empty());
        // A check without failures rearms it.
        assert!(w.step(&cfg, t0, &[obs(1, 0, 40, 9)]).is_empty());
        assert_eq!(
            kinds(&w.step(&cfg, t0, &[obs(1, 0, 50, 10)])),
            vec![(1, AlertKind::EventsFailed)]
        );
        // Two NAS are independent; a NAS that disappears is forgotten.
        let found = w.step(&cfg, t0, &[obs(1, 0, 50, 11), obs(2, 0, 0, 0)]);
        assert!(found.is_empty());
        let found = w.step(&cfg, t0, &[obs(2, 0, 1, 1)]);
        assert_eq!(kinds(&found), vec![(2, AlertKind::EventsFailed)]);
    }
}
