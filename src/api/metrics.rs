//! `GET /metrics`: Prometheus text exposition (format 0.0.4), encoded by
//! `prometheus-client` from the daemon's own `Stats` and a few cheap database queries at
//! scrape time. Each scrape gathers its figures in a [`Figures`], registers it as the one
//! collector of a fresh `Registry` (no global registry) and encodes that: the crate
//! writes the names (a counter's `_total` included), the HELP and TYPE lines, the label
//! escaping and the histogram's cumulative buckets. Labels are only `nas` (the NAS id),
//! `cmd` (bounded per NAS by `stats::MAX_CMDS`), `outcome`, and for the cluster `state`
//! (four values) and `daemon` (one per live daemon); never an account id or an address.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet, prometheus_text,
};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

use super::ApiState;
use super::json::Owners;
use crate::journal::JournalStatus;
use crate::stats::{LATENCY_BUCKETS, NasSnapshot};
use crate::store::cluster::Member;
use crate::store::{Nas, NasQueue, PoolFigures};

pub async fn handle(State(state): State<Arc<ApiState>>) -> Response {
    let snaps = state.stats.snapshot();
    let db = async {
        let queues = state.store.queue_by_nas().await?;
        let count = state.store.stack_count().await?;
        let nas = state.store.nas_list().await?;
        let members = state.store.cluster_members().await?;
        let owners = Owners::load(&state.store, Some(&state.daemon_id)).await?;
        let cluster = ClusterFigures::new(&state.daemon_id, &members, &nas, &owners);
        let (history_rows, history_bytes) = state.store.history_size().await?;
        Ok::<_, crate::store::StoreError>(DbFigures {
            queues,
            compact_depth: count.compact_total,
            cluster,
            history_rows,
            history_bytes,
        })
    };
    let db = match tokio::time::timeout(std::time::Duration::from_secs(5), db).await {
        Ok(Ok(db)) => Some(db),
        Ok(Err(e)) => {
            tracing::warn!("metrics: {e}");
            None
        }
        Err(_) => None,
    };
    let figures = Figures {
        snaps,
        db,
        pool: state.store.pool_figures(),
        api_enqueued: state.stats.api_enqueued.load(Ordering::Relaxed),
        journal: state.stats.journal(0),
        now: Utc::now(),
    };
    match render(figures) {
        Ok(text) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, prometheus_text::CONTENT_TYPE)],
            text,
        )
            .into_response(),
        // Writing into a `String` does not fail; an encoder refusing the figures would.
        Err(fmt::Error) => {
            tracing::warn!("metrics: the exposition could not be encoded");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

/// Everything one scrape shows, read before encoding.
#[derive(Debug, Clone)]
pub struct Figures {
    /// The owners' figures, one per NAS.
    pub snaps: Vec<NasSnapshot>,
    /// The database's figures; `None` when a query failed or the 5 s ran out
    /// (`nasd_db_up 0`, and their series are left out).
    pub db: Option<DbFigures>,
    pub pool: PoolFigures,
    /// Events accepted by the HTTP API.
    pub api_enqueued: i64,
    pub journal: JournalStatus,
    /// The scrape's time, for the age of the oldest event.
    pub now: DateTime<Utc>,
}

/// What the scrape's database queries read.
#[derive(Debug, Clone)]
pub struct DbFigures {
    pub queues: Vec<NasQueue>,
    /// Rows in `events_stack_compact`.
    pub compact_depth: i64,
    pub cluster: ClusterFigures,
    /// The size of `events_history` (estimates, see `Store::history_size`); the bytes
    /// on PostgreSQL only.
    pub history_rows: i64,
    pub history_bytes: Option<i64>,
}

/// The exposition text of `figures`, through a registry of its own. Pure, for tests.
pub fn render(figures: Figures) -> Result<String, fmt::Error> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(figures));
    let mut text = String::with_capacity(4096);
    prometheus_text::encode(&mut text, &registry)?;
    Ok(text)
}

/// The states a daemon row can have, each always exposed (0 when none) so that an
/// alert on one of them has a series to compare.
const DAEMON_STATES: [&str; 4] = ["live", "draining", "left", "lost"];

/// What `/metrics` shows of the cluster, computed at scrape time.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ClusterFigures {
    /// Each enabled NAS with whether this daemon validly owns it.
    pub owned_here: Vec<(i64, bool)>,
    /// Daemons per state, in the order of `DAEMON_STATES`.
    pub daemons: [usize; 4],
    /// Each live daemon with the NAS it owns.
    pub owned_by: Vec<(String, i64)>,
}

impl ClusterFigures {
    /// From the scrape's rows. A daemon marked `live` or `draining` whose lease has run
    /// out counts as `lost`: the others stop counting it at once, even before one of
    /// them marks it. On SQLite the one daemon is live and owns every enabled NAS.
    pub fn new(me: &str, members: &[Member], nas: &[Nas], owners: &Owners) -> ClusterFigures {
        let enabled = || nas.iter().filter(|n| n.enabled);
        let owned_here: Vec<(i64, bool)> = enabled()
            .map(|n| (n.id, owners.of(n).is_some_and(|(d, _)| d == me)))
            .collect();
        if owners.sqlite() {
            return ClusterFigures {
                daemons: [1, 0, 0, 0],
                owned_by: vec![(me.to_string(), enabled().count() as i64)],
                owned_here,
            };
        }
        let mut daemons = [0; 4];
        for m in members {
            let state = if !m.alive && (m.state == "live" || m.state == "draining") {
                "lost"
            } else {
                m.state.as_str()
            };
            if let Some(i) = DAEMON_STATES.iter().position(|s| *s == state) {
                daemons[i] += 1;
            }
        }
        ClusterFigures {
            owned_here,
            daemons,
            owned_by: members
                .iter()
                .filter(|m| m.is_live())
                .map(|m| (m.id.clone(), m.owned))
                .collect(),
        }
    }
}

/// The `nas` label.
fn nas(id: i64) -> [(&'static str, i64); 1] {
    [("nas", id)]
}

/// The name to give the crate for the exposed `name`: it appends `_total` to a
/// counter's name itself, so the suffix is taken off here.
fn base_name(name: &str, metric_type: MetricType) -> &str {
    match metric_type {
        MetricType::Counter => name.strip_suffix("_total").unwrap_or(name),
        _ => name,
    }
}

/// One metric family under its exposed `name`: the HELP and TYPE lines, then one series
/// per label set, in the order given.
fn family<L, M>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (L, M)>,
) -> fmt::Result
where
    L: EncodeLabelSet,
    M: EncodeMetric + TypedMetric,
{
    let mut metric = encoder.encode_descriptor(base_name(name, M::TYPE), help, None, M::TYPE)?;
    for (labels, value) in series {
        value.encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

/// A family of one series without labels.
fn single<M>(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: M) -> fmt::Result
where
    M: EncodeMetric + TypedMetric,
{
    value.encode(encoder.encode_descriptor(base_name(name, M::TYPE), help, None, M::TYPE)?)
}

/// One NAS's command latency as a Prometheus histogram: the buckets of
/// `LATENCY_BUCKETS` (the crate sums them and adds `+Inf`, the count), sum and count.
struct Latency<'a>(&'a crate::stats::Histogram);

impl TypedMetric for Latency<'_> {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Latency<'_> {
    fn encode(&self, mut encoder: MetricEncoder) -> fmt::Result {
        let mut buckets = [(0.0, 0); LATENCY_BUCKETS.len()];
        for ((bucket, le), n) in buckets.iter_mut().zip(LATENCY_BUCKETS).zip(self.0.buckets) {
            *bucket = (le, n);
        }
        encoder.encode_histogram::<NoLabelSet>(self.0.sum_seconds, self.0.count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

impl Collector for Figures {
    /// The families in a fixed order (the owners' figures, the database's, the daemon's,
    /// the journal's, the history's), each series in the order of `snaps` and the rows.
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let e = &mut encoder;
        let snaps = &self.snaps;
        type Pick = fn(&crate::stats::CmdCounters) -> u64;
        let counters: [(&str, &str, Pick); 2] = [
            (
                "nasd_events_enqueued_total",
                "Events that entered a NAS queue (first seen by its owner), by NAS and cmd.",
                |c| c.enqueued,
            ),
            (
                "nasd_events_retried_total",
                "Attempts that ended in a retry later (timeout, no answer, postponed), by NAS and cmd.",
                |c| c.retried,
            ),
        ];
        for (name, help, pick) in counters {
            family(
                e,
                name,
                help,
                snaps.iter().flat_map(|s| {
                    s.by_cmd.iter().map(move |(cmd, c)| {
                        (
                            (nas(s.nas_id), [("cmd", cmd.as_str())]),
                            ConstCounter::new(pick(c)),
                        )
                    })
                }),
            )?;
        }
        family(
            e,
            "nasd_events_finished_total",
            "Events that left the stack for history, by NAS, cmd and outcome (done, failed, or superseded: replaced by a later event of its coalesce group, never sent).",
            // `superseded` only for the cmds that had one: most schemes coalesce
            // nothing, and the family's series stay two per cmd there.
            snaps.iter().flat_map(|s| {
                s.by_cmd.iter().flat_map(move |(cmd, c)| {
                    [
                        ("done", Some(c.done)),
                        ("failed", Some(c.failed)),
                        ("superseded", (c.superseded > 0).then_some(c.superseded)),
                    ]
                    .into_iter()
                    .filter_map(move |(outcome, n)| {
                        Some((
                            (nas(s.nas_id), [("cmd", cmd.as_str()), ("outcome", outcome)]),
                            ConstCounter::new(n?),
                        ))
                    })
                })
            }),
        )?;
        family(
            e,
            "nasd_command_duration_seconds",
            "Time one attempt took (all commands of an event, answer included), by NAS.",
            snaps.iter().map(|s| (nas(s.nas_id), Latency(&s.latency))),
        )?;
        type Gauge = fn(&NasSnapshot) -> i64;
        let gauges: [(&str, &str, Gauge); 6] = [
            (
                "nasd_nas_up",
                "1 while the NAS has a running owner that can send (enabled, scheme found).",
                |s| i64::from(s.running && s.enabled && s.unavailable.is_none()),
            ),
            (
                "nasd_pool_size",
                "Commands a NAS may have in flight at once (n_workers).",
                |s| s.pool_size,
            ),
            ("nasd_in_flight", "Commands in flight now, by NAS.", |s| {
                s.in_flight
            }),
            (
                "nasd_open_sessions",
                "Open connections to the device, by NAS.",
                |s| s.open_sessions,
            ),
            (
                "nasd_nas_reachable",
                "0 while the circuit breaker holds the NAS down (its events wait), else 1.",
                |s| i64::from(s.down_since.is_none()),
            ),
            (
                "nasd_consecutive_failures",
                "Attempts in a row that did not reach the NAS (0 after a success).",
                |s| i64::try_from(s.consecutive_failures).unwrap_or(i64::MAX),
            ),
        ];
        for (name, help, pick) in gauges {
            family(
                e,
                name,
                help,
                snaps
                    .iter()
                    .map(|s| (nas(s.nas_id), ConstGauge::new(pick(s)))),
            )?;
        }
        family(
            e,
            "nasd_last_success_timestamp_seconds",
            "Unix time of the last successful attempt, by NAS (0: none since start).",
            snaps.iter().map(|s| {
                let at = s
                    .last_success_at
                    .map_or(0.0, |t| t.timestamp_millis() as f64 / 1000.0);
                (nas(s.nas_id), ConstGauge::new(at))
            }),
        )?;
        if let Some(db) = &self.db {
            db.encode_queues(e, snaps, self.now)?;
        }
        single(
            e,
            "nasd_api_events_enqueued_total",
            "Events accepted by the HTTP API (billing-compatible and JSON).",
            ConstCounter::new(u64::try_from(self.api_enqueued).unwrap_or(0)),
        )?;
        single(
            e,
            "nasd_db_up",
            "1 when the last scrape's database queries succeeded.",
            ConstGauge::new(i64::from(self.db.is_some())),
        )?;
        let pool = self.pool;
        family(
            e,
            "nasd_db_pool_connections",
            "Database pool connections by state (idle, in_use).",
            [
                ([("state", "idle")], ConstGauge::new(pool.idle)),
                (
                    [("state", "in_use")],
                    ConstGauge::new(pool.size.saturating_sub(pool.idle)),
                ),
            ],
        )?;
        single(
            e,
            "nasd_db_pool_max_connections",
            "Largest size of the database pool.",
            ConstGauge::new(pool.max),
        )?;
        // The journal's series, both always present (0 when all is well) so that an
        // alert has a series to compare.
        single(
            e,
            "nasd_journal_lines_dropped_total",
            "Log lines that could not be written (full disk, unwritable file) and were dropped.",
            ConstCounter::new(self.journal.lines_dropped_total),
        )?;
        single(
            e,
            "nasd_journal_files_failing",
            "Log files whose last write failed (until one succeeds again).",
            ConstGauge::new(self.journal.files_failing),
        )?;
        if let Some(db) = &self.db {
            db.encode_history(e)?;
        }
        Ok(())
    }
}

impl DbFigures {
    /// The queues (by NAS: every NAS with an owner or with rows) and the cluster.
    fn encode_queues(
        &self,
        e: &mut DescriptorEncoder,
        snaps: &[NasSnapshot],
        now: DateTime<Utc>,
    ) -> fmt::Result {
        let by_nas: HashMap<i64, &NasQueue> = self.queues.iter().map(|q| (q.nas_id, q)).collect();
        let mut ids: Vec<i64> = snaps.iter().map(|s| s.nas_id).collect();
        ids.extend(self.queues.iter().map(|q| q.nas_id));
        ids.sort_unstable();
        ids.dedup();
        family(
            e,
            "nasd_queue_depth",
            "Events waiting or running in events_stack, by NAS.",
            ids.iter().map(|id| {
                let depth = by_nas.get(id).map_or(0, |q| q.depth);
                (nas(*id), ConstGauge::new(depth))
            }),
        )?;
        family(
            e,
            "nasd_oldest_event_age_seconds",
            "Age of the oldest event in events_stack, by NAS (0 when empty).",
            ids.iter().map(|id| {
                let age = by_nas
                    .get(id)
                    .and_then(|q| q.oldest)
                    .map_or(0.0, |t| (now - t).num_milliseconds().max(0) as f64 / 1000.0);
                (nas(*id), ConstGauge::new(age))
            }),
        )?;
        single(
            e,
            "nasd_compact_queue_depth",
            "Rows in events_stack_compact not yet expanded.",
            ConstGauge::new(self.compact_depth),
        )?;
        let c = &self.cluster;
        family(
            e,
            "nasd_nas_owned_here",
            "1 while this daemon validly owns the NAS (SQLite: every enabled NAS), else 0; enabled NAS only.",
            c.owned_here
                .iter()
                .map(|(id, here)| (nas(*id), ConstGauge::new(i64::from(*here)))),
        )?;
        family(
            e,
            "nasd_cluster_daemons",
            "Daemons sharing the database, by state (a live daemon whose lease ran out counts as lost).",
            DAEMON_STATES
                .iter()
                .zip(c.daemons)
                .map(|(state, n)| ([("state", *state)], ConstGauge::new(n))),
        )?;
        family(
            e,
            "nasd_cluster_nas_owned",
            "NAS each live daemon owns now.",
            c.owned_by
                .iter()
                .map(|(daemon, n)| ([("daemon", daemon.as_str())], ConstGauge::new(*n))),
        )
    }

    /// The size of `events_history`.
    fn encode_history(&self, e: &mut DescriptorEncoder) -> fmt::Result {
        single(
            e,
            "nasd_history_rows",
            "Rows in events_history, estimated (PostgreSQL: the planner's estimate; SQLite: the span of ids).",
            ConstGauge::new(self.history_rows),
        )?;
        if let Some(bytes) = self.history_bytes {
            single(
                e,
                "nasd_history_bytes",
                "Size of events_history with its indexes, in bytes (PostgreSQL only).",
                ConstGauge::new(bytes),
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::{AttemptKind, Stats};
    use std::time::Duration;

    #[test]
    fn cluster_figures_count_an_expired_live_daemon_as_lost() {
        let now = Utc::now();
        let member = |id: &str, state: &str, alive: bool, owned: i64| Member {
            id: id.into(),
            session: 1,
            host: "h".into(),
            pid: 1,
            version: "0.1.0".into(),
            api: None,
            state: state.into(),
            alive,
            started_at: now,
            heartbeat_at: now,
            lease_until: now,
            owned,
        };
        let members = [
            member("a", "live", true, 2),
            member("b", "live", false, 1),
            member("c", "left", false, 0),
        ];
        let mut nas: Vec<Nas> = (1..=4).map(|i| Nas::new(i, "n", "10.0.0.1")).collect();
        nas[3].enabled = false;
        let owner = |nas_id: i64, daemon: &str, valid: bool| crate::store::cluster::NasOwner {
            nas_id,
            daemon_id: Some(daemon.into()),
            epoch: 1,
            valid,
            since: None,
        };
        let owners = Owners::new(
            false,
            Some("a"),
            vec![
                owner(1, "a", true),
                owner(2, "a", true),
                owner(3, "b", false),
            ],
        );
        let figures = ClusterFigures::new("a", &members, &nas, &owners);
        assert_eq!(figures.owned_here, [(1, true), (2, true), (3, false)]);
        assert_eq!(figures.daemons, [1, 0, 1, 1]);
        assert_eq!(figures.owned_by, [("a".to_string(), 2)]);
        let single =
            ClusterFigures::new("solo", &[], &nas, &Owners::new(true, Some("solo"), vec![]));
        assert_eq!(single.owned_here, [(1, true), (2, true), (3, true)]);
        assert_eq!(single.daemons, [1, 0, 0, 0]);
        assert_eq!(single.owned_by, [("solo".to_string(), 3)]);
    }

    /// A scrape with every family: NAS 7 and 9 with an owner (7 with a queue), NAS 8
    /// only in the cluster; `cmd` is one of NAS 7's cmds, `daemon` a live daemon.
    fn sample(cmd: &str, daemon: &str) -> Figures {
        let stats = Stats::new();
        let n = stats.nas(7);
        n.start();
        n.set_runtime(4, true, None, None);
        n.enqueued(["user_add", "user_add", cmd]);
        n.attempts([
            (
                "user_add",
                AttemptKind::Done,
                Duration::from_millis(20),
                None,
            ),
            (
                "user_add",
                AttemptKind::Retry,
                Duration::from_secs(2),
                Some("timeout"),
            ),
        ]);
        stats.nas(9).attempts([(
            "user_drop",
            AttemptKind::Done,
            Duration::from_millis(3),
            None,
        )]);
        stats.nas(9).superseded(["user_drop", "user_drop"]);
        let now = Utc::now();
        Figures {
            snaps: stats.snapshot(),
            db: Some(DbFigures {
                queues: vec![NasQueue {
                    nas_id: 7,
                    depth: 3,
                    oldest: Some(now - chrono::Duration::milliseconds(10_250)),
                }],
                compact_depth: 2,
                cluster: ClusterFigures {
                    owned_here: vec![(7, true), (8, false)],
                    daemons: [2, 0, 1, 1],
                    owned_by: vec![("d1".into(), 1), (daemon.into(), 1)],
                },
                history_rows: 45,
                history_bytes: Some(8192),
            }),
            pool: PoolFigures {
                size: 3,
                idle: 1,
                max: 8,
            },
            api_enqueued: 5,
            journal: JournalStatus {
                lines_dropped_total: 1234,
                files_failing: 2,
                ..JournalStatus::default()
            },
            now,
        }
    }

    fn text(figures: Figures) -> String {
        render(figures).expect("encodes")
    }

    fn assert_lines(text: &str, lines: &[&str]) {
        for line in lines {
            assert!(
                text.lines().any(|l| l == *line),
                "missing {line} in\n{text}"
            );
        }
    }

    /// The names, types and HELP texts dashboards and alerts know, in their order:
    /// the crate's counters keep the `_total` the names had before it.
    #[test]
    fn families_keep_their_names_types_and_help() {
        let families = [
            (
                "nasd_events_enqueued_total",
                "counter",
                "Events that entered a NAS queue (first seen by its owner), by NAS and cmd.",
            ),
            (
                "nasd_events_retried_total",
                "counter",
                "Attempts that ended in a retry later (timeout, no answer, postponed), by NAS and cmd.",
            ),
            (
                "nasd_events_finished_total",
                "counter",
                "Events that left the stack for history, by NAS, cmd and outcome (done, failed, or superseded: replaced by a later event of its coalesce group, never sent).",
            ),
            (
                "nasd_command_duration_seconds",
                "histogram",
                "Time one attempt took (all commands of an event, answer included), by NAS.",
            ),
            (
                "nasd_nas_up",
                "gauge",
                "1 while the NAS has a running owner that can send (enabled, scheme found).",
            ),
            (
                "nasd_pool_size",
                "gauge",
                "Commands a NAS may have in flight at once (n_workers).",
            ),
            ("nasd_in_flight", "gauge", "Commands in flight now, by NAS."),
            (
                "nasd_open_sessions",
                "gauge",
                "Open connections to the device, by NAS.",
            ),
            (
                "nasd_nas_reachable",
                "gauge",
                "0 while the circuit breaker holds the NAS down (its events wait), else 1.",
            ),
            (
                "nasd_consecutive_failures",
                "gauge",
                "Attempts in a row that did not reach the NAS (0 after a success).",
            ),
            (
                "nasd_last_success_timestamp_seconds",
                "gauge",
                "Unix time of the last successful attempt, by NAS (0: none since start).",
            ),
            (
                "nasd_queue_depth",
                "gauge",
                "Events waiting or running in events_stack, by NAS.",
            ),
            (
                "nasd_oldest_event_age_seconds",
                "gauge",
                "Age of the oldest event in events_stack, by NAS (0 when empty).",
            ),
            (
                "nasd_compact_queue_depth",
                "gauge",
                "Rows in events_stack_compact not yet expanded.",
            ),
            (
                "nasd_nas_owned_here",
                "gauge",
                "1 while this daemon validly owns the NAS (SQLite: every enabled NAS), else 0; enabled NAS only.",
            ),
            (
                "nasd_cluster_daemons",
                "gauge",
                "Daemons sharing the database, by state (a live daemon whose lease ran out counts as lost).",
            ),
            (
                "nasd_cluster_nas_owned",
                "gauge",
                "NAS each live daemon owns now.",
            ),
            (
                "nasd_api_events_enqueued_total",
                "counter",
                "Events accepted by the HTTP API (billing-compatible and JSON).",
            ),
            (
                "nasd_db_up",
                "gauge",
                "1 when the last scrape's database queries succeeded.",
            ),
            (
                "nasd_db_pool_connections",
                "gauge",
                "Database pool connections by state (idle, in_use).",
            ),
            (
                "nasd_db_pool_max_connections",
                "gauge",
                "Largest size of the database pool.",
            ),
            (
                "nasd_journal_lines_dropped_total",
                "counter",
                "Log lines that could not be written (full disk, unwritable file) and were dropped.",
            ),
            (
                "nasd_journal_files_failing",
                "gauge",
                "Log files whose last write failed (until one succeeds again).",
            ),
            (
                "nasd_history_rows",
                "gauge",
                "Rows in events_history, estimated (PostgreSQL: the planner's estimate; SQLite: the span of ids).",
            ),
            (
                "nasd_history_bytes",
                "gauge",
                "Size of events_history with its indexes, in bytes (PostgreSQL only).",
            ),
        ];
        let expected: Vec<String> = families
            .iter()
            .flat_map(|(name, kind, help)| {
                [
                    format!("# HELP {name} {help}"),
                    format!("# TYPE {name} {kind}"),
                ]
            })
            .collect();
        let text = text(sample("user_del", "d2"));
        let headers: Vec<&str> = text.lines().filter(|l| l.starts_with('#')).collect();
        assert_eq!(headers, expected, "\n{text}");
        // Every series belongs to the family above it (a histogram's by its suffixes).
        let mut family = "";
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                family = rest.split(' ').next().unwrap_or("");
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap_or("");
                let name = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s).filter(|n| *n == family))
                    .unwrap_or(name);
                assert_eq!(name, family, "{line}");
            }
        }
    }

    #[test]
    fn exposition_has_counters_histograms_and_gauges() {
        let text = text(sample("user_del", "d2"));
        assert!(
            !text.contains("cmd=\"user_add\",outcome=\"superseded\""),
            "no superseded series for a cmd that never had one:\n{text}"
        );
        assert_lines(
            &text,
            &[
                "nasd_events_enqueued_total{nas=\"7\",cmd=\"user_add\"} 2",
                "nasd_events_enqueued_total{nas=\"7\",cmd=\"user_del\"} 1",
                "nasd_events_enqueued_total{nas=\"9\",cmd=\"user_drop\"} 0",
                "nasd_events_finished_total{nas=\"7\",cmd=\"user_add\",outcome=\"done\"} 1",
                "nasd_events_finished_total{nas=\"7\",cmd=\"user_add\",outcome=\"failed\"} 0",
                "nasd_events_finished_total{nas=\"9\",cmd=\"user_drop\",outcome=\"done\"} 1",
                "nasd_events_finished_total{nas=\"9\",cmd=\"user_drop\",outcome=\"superseded\"} 2",
                "nasd_events_retried_total{nas=\"7\",cmd=\"user_add\"} 1",
                "nasd_command_duration_seconds_bucket{nas=\"7\",le=\"0.005\"} 0",
                "nasd_command_duration_seconds_bucket{nas=\"7\",le=\"0.025\"} 1",
                "nasd_command_duration_seconds_bucket{nas=\"7\",le=\"1\"} 1",
                "nasd_command_duration_seconds_bucket{nas=\"7\",le=\"2.5\"} 2",
                "nasd_command_duration_seconds_bucket{nas=\"7\",le=\"30\"} 2",
                "nasd_command_duration_seconds_bucket{nas=\"7\",le=\"+Inf\"} 2",
                "nasd_command_duration_seconds_sum{nas=\"7\"} 2.02",
                "nasd_command_duration_seconds_count{nas=\"7\"} 2",
                "nasd_command_duration_seconds_bucket{nas=\"9\",le=\"0.005\"} 1",
                "nasd_command_duration_seconds_count{nas=\"9\"} 1",
                "nasd_queue_depth{nas=\"7\"} 3",
                "nasd_queue_depth{nas=\"9\"} 0",
                "nasd_oldest_event_age_seconds{nas=\"7\"} 10.25",
                "nasd_oldest_event_age_seconds{nas=\"9\"} 0.0",
                "nasd_pool_size{nas=\"7\"} 4",
                "nasd_in_flight{nas=\"7\"} 0",
                "nasd_open_sessions{nas=\"7\"} 0",
                "nasd_nas_up{nas=\"7\"} 1",
                "nasd_nas_up{nas=\"9\"} 0",
                "nasd_nas_reachable{nas=\"7\"} 1",
                "nasd_consecutive_failures{nas=\"7\"} 1",
                "nasd_compact_queue_depth 2",
                "nasd_api_events_enqueued_total 5",
                "nasd_db_up 1",
                "nasd_db_pool_connections{state=\"idle\"} 1",
                "nasd_db_pool_connections{state=\"in_use\"} 2",
                "nasd_db_pool_max_connections 8",
                "nasd_nas_owned_here{nas=\"7\"} 1",
                "nasd_nas_owned_here{nas=\"8\"} 0",
                "nasd_cluster_daemons{state=\"live\"} 2",
                "nasd_cluster_daemons{state=\"draining\"} 0",
                "nasd_cluster_daemons{state=\"left\"} 1",
                "nasd_cluster_daemons{state=\"lost\"} 1",
                "nasd_cluster_nas_owned{daemon=\"d1\"} 1",
                "nasd_cluster_nas_owned{daemon=\"d2\"} 1",
                "nasd_journal_lines_dropped_total 1234",
                "nasd_journal_files_failing 2",
                "nasd_history_rows 45",
                "nasd_history_bytes 8192",
            ],
        );
        // A success on NAS 7 just now: its time in seconds, not 0.
        let at = text
            .lines()
            .find_map(|l| l.strip_prefix("nasd_last_success_timestamp_seconds{nas=\"7\"} "))
            .and_then(|v| v.parse::<f64>().ok());
        assert!(at.is_some_and(|t| t > 1.7e9), "{text}");
        // The 0.0.4 text format: no OpenMetrics end marker.
        assert!(!text.contains("# EOF"), "{text}");
    }

    /// Label values come from the operator (cmd names, daemon ids): the crate escapes
    /// `\`, `"` and newlines as the text format requires.
    #[test]
    fn label_values_are_escaped() {
        let text = text(sample("we\"ird\\cmd\nx", "d\"2\\\n"));
        assert_lines(
            &text,
            &[
                r#"nasd_events_enqueued_total{nas="7",cmd="we\"ird\\cmd\nx"} 1"#,
                r#"nasd_events_finished_total{nas="7",cmd="we\"ird\\cmd\nx",outcome="failed"} 0"#,
                r#"nasd_cluster_nas_owned{daemon="d\"2\\\n"} 1"#,
            ],
        );
        // No raw newline made it into a series: every line is a comment or a sample.
        for line in text.lines() {
            assert!(
                line.starts_with("# ") || line.starts_with("nasd_"),
                "{line:?} in\n{text}"
            );
        }
    }

    /// The database's series (queues, cluster, history) are left out when its queries
    /// fail; the rest stays, with `nasd_db_up 0`.
    #[test]
    fn without_the_database_its_series_are_left_out() {
        let text = text(Figures {
            db: None,
            ..sample("user_del", "d2")
        });
        assert_lines(
            &text,
            &[
                "nasd_db_up 0",
                "nasd_nas_up{nas=\"7\"} 1",
                "nasd_api_events_enqueued_total 5",
                "nasd_journal_lines_dropped_total 1234",
                "nasd_journal_files_failing 2",
            ],
        );
        for gone in [
            "nasd_queue_depth",
            "nasd_oldest_event_age_seconds",
            "nasd_compact_queue_depth",
            "nasd_nas_owned_here",
            "nasd_cluster_daemons",
            "nasd_cluster_nas_owned",
            "nasd_history_rows",
            "nasd_history_bytes",
        ] {
            assert!(!text.contains(gone), "{gone} in\n{text}");
        }
    }

    #[test]
    fn history_size_series() {
        let mut figures = sample("user_del", "d2");
        if let Some(db) = &mut figures.db {
            db.history_rows = 3;
            db.history_bytes = None;
        }
        let sqlite = text(figures);
        assert!(
            sqlite.lines().any(|l| l == "nasd_history_rows 3"),
            "{sqlite}"
        );
        assert!(!sqlite.contains("nasd_history_bytes"), "{sqlite}");
    }
}
