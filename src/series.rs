//! The console's recent history, kept in memory: every `STEP` the sampler reads the
//! cumulative counters of every NAS (`Stats`) and the queue depths (one query for all
//! NAS), and appends one point per NAS: done, failed and retried in that step and the
//! queue depth at its end. An hour of points is kept (`POINTS`); rates per minute and
//! latency quantiles are derived from them.
//!
//! The sampler is the only reader of the database for the console's live view: what
//! an open page asks every few seconds is answered from here and from `Stats`, so the
//! queries do not grow with the number of open pages.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use crate::model::Nas;
use crate::stats::{Histogram, LATENCY_BUCKETS, NasSnapshot, Stats};
use crate::store::cluster::NasOwner;
use crate::store::{NasQueue, Store};

/// The interval between two points.
pub const STEP: Duration = Duration::from_secs(10);
/// Points kept per NAS: one hour.
pub const POINTS: usize = 360;
/// Histogram snapshots kept per NAS for the latency quantiles (one per minute, five
/// minutes back).
const LATENCY_SNAPSHOTS: usize = 6;

/// One point of a chart: what happened during one step, and the queue at its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Point {
    pub at: DateTime<Utc>,
    pub done: u64,
    pub failed: u64,
    pub retried: u64,
    pub queue_depth: i64,
}

/// The cumulative counters of one NAS at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub done: u64,
    pub failed: u64,
    pub retried: u64,
}

impl Totals {
    pub fn of(snapshot: &NasSnapshot) -> Totals {
        snapshot
            .by_cmd
            .iter()
            .fold(Totals::default(), |t, (_, c)| Totals {
                done: t.done + c.done,
                failed: t.failed + c.failed,
                retried: t.retried + c.retried,
            })
    }

    /// What happened since `before` (a restarted owner's counters do not go back: the
    /// statistics live as long as the daemon, so a smaller value is treated as 0).
    fn since(self, before: Totals) -> Totals {
        Totals {
            done: self.done.saturating_sub(before.done),
            failed: self.failed.saturating_sub(before.failed),
            retried: self.retried.saturating_sub(before.retried),
        }
    }
}

#[derive(Debug, Default)]
struct NasSeries {
    points: VecDeque<Point>,
    last: Option<Totals>,
    latency: VecDeque<Histogram>,
}

/// What the sampler last read from the database, shared with the pages.
#[derive(Debug, Clone, Default)]
pub struct Cached {
    /// When it was read (None: not yet).
    pub at: Option<DateTime<Utc>>,
    pub nas: Vec<Nas>,
    pub queue: HashMap<i64, NasQueue>,
    /// PostgreSQL: the rows of `nas_owner` (SQLite has none).
    pub owners: Vec<NasOwner>,
    /// The reason the last read failed, if it did.
    pub error: Option<String>,
}

/// The series of every NAS and the cached reads.
#[derive(Default)]
pub struct Series {
    inner: Mutex<Inner>,
    /// Asks the sampler to reread the database now (a NAS was paused, say).
    refresh: tokio::sync::Notify,
}

#[derive(Default)]
struct Inner {
    nas: HashMap<i64, NasSeries>,
    samples: u64,
    cached: Cached,
}

impl Series {
    pub fn new() -> Arc<Series> {
        Arc::new(Series::default())
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Asks for a fresh read of the NAS table and the queues.
    pub fn refresh(&self) {
        self.refresh.notify_one();
    }

    pub fn cached(&self) -> Cached {
        self.lock().cached.clone()
    }

    /// Adds one point per NAS from `snapshots` (cumulative counters) and `queue`.
    pub fn record(
        &self,
        at: DateTime<Utc>,
        snapshots: &[NasSnapshot],
        queue: &HashMap<i64, NasQueue>,
    ) {
        let mut inner = self.lock();
        inner.samples += 1;
        let minute_mark = inner.samples % (60 / STEP.as_secs()).max(1) == 1;
        for s in snapshots {
            let series = inner.nas.entry(s.nas_id).or_default();
            let now = Totals::of(s);
            // A NAS's counters start at zero with its first owner, so its first point
            // counts everything since then (at most one step before the sample).
            let delta = now.since(series.last.unwrap_or_default());
            series.last = Some(now);
            series.points.push_back(Point {
                at,
                done: delta.done,
                failed: delta.failed,
                retried: delta.retried,
                queue_depth: queue.get(&s.nas_id).map_or(0, |q| q.depth),
            });
            while series.points.len() > POINTS {
                series.points.pop_front();
            }
            if series.latency.is_empty() {
                series.latency.push_back(Histogram::default());
            }
            if minute_mark {
                series.latency.push_back(s.latency.clone());
                while series.latency.len() > LATENCY_SNAPSHOTS {
                    series.latency.pop_front();
                }
            }
        }
    }

    /// Stores what the sampler read from the database.
    pub fn set_cached(&self, cached: Cached) {
        self.lock().cached = cached;
    }

    /// The points of one NAS, oldest first.
    pub fn points(&self, nas_id: i64) -> Vec<Point> {
        self.lock()
            .nas
            .get(&nas_id)
            .map(|s| s.points.iter().copied().collect())
            .unwrap_or_default()
    }

    /// The points of every NAS summed per step, oldest first.
    pub fn total_points(&self) -> Vec<Point> {
        let inner = self.lock();
        sum_points(inner.nas.values().map(|s| &s.points))
    }

    /// Done, failed and retried over the last minute of points.
    pub fn per_minute(&self, nas_id: i64) -> Totals {
        self.lock()
            .nas
            .get(&nas_id)
            .map(|s| last_minute(&s.points))
            .unwrap_or_default()
    }

    /// Latency p50 and p99 in milliseconds over the last few minutes, from the
    /// difference of the histogram now and the oldest snapshot kept.
    pub fn latency_ms(&self, nas_id: i64, now: &Histogram) -> (Option<f64>, Option<f64>) {
        let inner = self.lock();
        let before = inner.nas.get(&nas_id).and_then(|s| s.latency.front());
        let delta = match before {
            Some(b) => histogram_since(now, b),
            None => now.clone(),
        };
        (quantile_ms(&delta, 0.5), quantile_ms(&delta, 0.99))
    }
}

/// Sums per step the series of several NAS, aligned on the newest point (NAS that
/// started later have fewer points).
pub fn sum_points<'a>(all: impl Iterator<Item = &'a VecDeque<Point>>) -> Vec<Point> {
    let all: Vec<&VecDeque<Point>> = all.collect();
    let len = all.iter().map(|p| p.len()).max().unwrap_or(0);
    let mut out: Vec<Option<Point>> = vec![None; len];
    for points in all {
        let offset = len - points.len();
        for (i, p) in points.iter().enumerate() {
            match &mut out[offset + i] {
                Some(o) => {
                    o.done += p.done;
                    o.failed += p.failed;
                    o.retried += p.retried;
                    o.queue_depth += p.queue_depth;
                }
                slot @ None => *slot = Some(*p),
            }
        }
    }
    out.into_iter().flatten().collect()
}

fn last_minute(points: &VecDeque<Point>) -> Totals {
    let n = (60 / STEP.as_secs()).max(1) as usize;
    points
        .iter()
        .rev()
        .take(n)
        .fold(Totals::default(), |t, p| Totals {
            done: t.done + p.done,
            failed: t.failed + p.failed,
            retried: t.retried + p.retried,
        })
}

/// `now - before`, bucket by bucket.
pub fn histogram_since(now: &Histogram, before: &Histogram) -> Histogram {
    let mut out = Histogram::default();
    for (i, b) in out.buckets.iter_mut().enumerate() {
        *b = now.buckets[i].saturating_sub(before.buckets[i]);
    }
    out.count = now.count.saturating_sub(before.count);
    out.sum_seconds = (now.sum_seconds - before.sum_seconds).max(0.0);
    out
}

/// The `q` quantile of a histogram in milliseconds, interpolated linearly inside its
/// bucket (as Prometheus's `histogram_quantile` does); None when it is empty. Values
/// above the last bucket are reported as that bucket's bound.
pub fn quantile_ms(h: &Histogram, q: f64) -> Option<f64> {
    let counted: u64 = h.buckets.iter().sum();
    if counted == 0 {
        return None;
    }
    let rank = q * counted as f64;
    let mut seen = 0u64;
    let mut lower = 0.0;
    for (i, n) in h.buckets.iter().enumerate() {
        let upper = LATENCY_BUCKETS[i];
        if *n > 0 && (seen + n) as f64 >= rank {
            let within = (rank - seen as f64) / *n as f64;
            return Some((lower + (upper - lower) * within.clamp(0.0, 1.0)) * 1000.0);
        }
        seen += n;
        lower = upper;
    }
    Some(LATENCY_BUCKETS[LATENCY_BUCKETS.len() - 1] * 1000.0)
}

/// Reads the NAS table and the queue depths now and then, and records a point every
/// `STEP`, until `shutdown`. A failed read keeps the last good one and says why.
pub async fn run(
    series: Arc<Series>,
    stats: Arc<Stats>,
    store: Store,
    shutdown: CancellationToken,
) {
    let mut next = tokio::time::Instant::now();
    loop {
        let now = tokio::time::Instant::now();
        let sample = now >= next;
        let mut cached = series.cached();
        let owners = async {
            match &store {
                Store::Postgres(_) => store.nas_owners().await,
                Store::Sqlite(_) => Ok(Vec::new()),
            }
        };
        match tokio::try_join!(store.nas_list(), store.queue_by_nas(), owners) {
            Ok((nas, queue, owners)) => {
                cached.nas = nas;
                cached.queue = queue.into_iter().map(|q| (q.nas_id, q)).collect();
                cached.owners = owners;
                cached.error = None;
            }
            Err(e) => cached.error = Some(e.to_string()),
        }
        cached.at = Some(Utc::now());
        if sample {
            series.record(Utc::now(), &stats.snapshot(), &cached.queue);
            next = now + STEP;
        }
        series.set_cached(cached);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = series.refresh.notified() => {}
            _ = tokio::time::sleep_until(next) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hist(per_bucket: &[(usize, u64)]) -> Histogram {
        let mut h = Histogram::default();
        for (i, n) in per_bucket {
            h.buckets[*i] = *n;
            h.count += n;
        }
        h
    }

    #[test]
    fn quantiles_interpolate_inside_the_bucket() {
        // 100 observations in (0.05, 0.1]: the median is halfway, 75 ms.
        let h = hist(&[(4, 100)]);
        assert_eq!(quantile_ms(&h, 0.5).map(|v| v.round()), Some(75.0));
        // 99 fast (<= 5 ms) and 1 slow (2.5..5 s): p50 is fast, p99 at the fast bound.
        let h = hist(&[(0, 99), (9, 1)]);
        assert!(quantile_ms(&h, 0.5).unwrap() <= 5.0);
        assert!(quantile_ms(&h, 0.99).unwrap() <= 5.0);
        assert!(quantile_ms(&h, 0.999).unwrap() > 2500.0);
        assert_eq!(quantile_ms(&Histogram::default(), 0.5), None);
    }

    #[test]
    fn histogram_difference_is_per_bucket() {
        let before = hist(&[(1, 5), (2, 1)]);
        let now = hist(&[(1, 7), (2, 1), (3, 4)]);
        let d = histogram_since(&now, &before);
        assert_eq!(d.buckets[1], 2);
        assert_eq!(d.buckets[2], 0);
        assert_eq!(d.buckets[3], 4);
        assert_eq!(d.count, 6);
    }

    fn snap(nas_id: i64, done: u64, failed: u64) -> NasSnapshot {
        NasSnapshot {
            nas_id,
            by_cmd: vec![(
                "user_add".into(),
                crate::stats::CmdCounters {
                    done,
                    failed,
                    ..Default::default()
                },
            )],
            ..Default::default()
        }
    }

    #[test]
    fn points_are_deltas_and_the_ring_is_bounded() {
        let s = Series::default();
        let t = Utc::now();
        let q: HashMap<i64, NasQueue> = [(
            1,
            NasQueue {
                nas_id: 1,
                depth: 7,
                oldest: None,
            },
        )]
        .into();
        s.record(t, &[snap(1, 10, 1)], &q);
        s.record(t, &[snap(1, 15, 1)], &q);
        s.record(t, &[snap(1, 15, 3)], &HashMap::new());
        let p = s.points(1);
        // The first point counts from zero: the counters start with the NAS's owner.
        assert_eq!(
            p.iter()
                .map(|p| (p.done, p.failed, p.queue_depth))
                .collect::<Vec<_>>(),
            vec![(10, 1, 7), (5, 0, 7), (0, 2, 0)]
        );
        assert_eq!(
            s.per_minute(1),
            Totals {
                done: 15,
                failed: 3,
                retried: 0
            }
        );
        for _ in 0..POINTS + 5 {
            s.record(t, &[snap(1, 15, 3)], &HashMap::new());
        }
        assert_eq!(s.points(1).len(), POINTS);
    }

    #[test]
    fn totals_align_on_the_newest_point() {
        let p = |done| Point {
            at: Utc::now(),
            done,
            failed: 0,
            retried: 0,
            queue_depth: 1,
        };
        let a: VecDeque<Point> = [p(1), p(2), p(3)].into();
        let b: VecDeque<Point> = [p(10), p(20)].into();
        let sum = sum_points([&a, &b].into_iter());
        assert_eq!(
            sum.iter().map(|p| p.done).collect::<Vec<_>>(),
            vec![1, 12, 23]
        );
        let sum = sum_points([&b, &a].into_iter());
        assert_eq!(
            sum.iter().map(|p| p.done).collect::<Vec<_>>(),
            vec![1, 12, 23]
        );
        assert_eq!(sum[0].queue_depth, 1);
        assert_eq!(sum[2].queue_depth, 2);
    }
}
