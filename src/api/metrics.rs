//! `GET /metrics`: Prometheus text exposition (format 0.0.4), written from the daemon's
//! own `Stats` and a few cheap database queries at scrape time. Labels are only `nas`
//! (the NAS id), `cmd` (bounded per NAS by `stats::MAX_CMDS`), `outcome`, and for the
//! cluster `state` (four values) and `daemon` (one per live daemon); never an account
//! id or an address.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::Utc;

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
        let history = state.store.history_size().await?;
        Ok::<_, crate::store::StoreError>((queues, count.compact_total, cluster, history))
    };
    let db = tokio::time::timeout(std::time::Duration::from_secs(5), db).await;
    let (queues, compact, cluster, history, db_up) = match db {
        Ok(Ok((q, c, cl, h))) => (Some(q), Some(c), Some(cl), Some(h), true),
        Ok(Err(e)) => {
            tracing::warn!("metrics: {e}");
            (None, None, None, None, false)
        }
        Err(_) => (None, None, None, None, false),
    };
    let mut text = render(
        &snaps,
        queues.as_deref(),
        compact,
        cluster.as_ref(),
        db_up,
        state.store.pool_figures(),
        state.stats.api_enqueued.load(Ordering::Relaxed),
    );
    render_journal(&mut text, &state.stats.journal(0));
    if let Some((rows, bytes)) = history {
        render_history(&mut text, rows, bytes);
    }
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// The size of `events_history` (estimates, see `Store::history_size`). Pure.
pub fn render_history(out: &mut String, rows: i64, bytes: Option<i64>) {
    head(
        out,
        "nasd_history_rows",
        "gauge",
        "Rows in events_history, estimated (PostgreSQL: the planner's estimate; SQLite: the span of ids).",
    );
    let _ = writeln!(out, "nasd_history_rows {rows}");
    if let Some(bytes) = bytes {
        head(
            out,
            "nasd_history_bytes",
            "gauge",
            "Size of events_history with its indexes, in bytes (PostgreSQL only).",
        );
        let _ = writeln!(out, "nasd_history_bytes {bytes}");
    }
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

/// A label value with `\`, `"` and newlines escaped.
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn head(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// The exposition text. Pure, for tests.
pub fn render(
    snaps: &[NasSnapshot],
    queues: Option<&[NasQueue]>,
    compact_depth: Option<i64>,
    cluster: Option<&ClusterFigures>,
    db_up: bool,
    pool: PoolFigures,
    api_enqueued: i64,
) -> String {
    let mut out = String::with_capacity(4096);
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
        head(&mut out, name, "counter", help);
        for s in snaps {
            for (cmd, c) in &s.by_cmd {
                let _ = writeln!(
                    out,
                    "{name}{{nas=\"{}\",cmd=\"{}\"}} {}",
                    s.nas_id,
                    esc(cmd),
                    pick(c)
                );
            }
        }
    }
    head(
        &mut out,
        "nasd_events_finished_total",
        "counter",
        "Events that left the stack for history, by NAS, cmd and outcome (done or failed).",
    );
    for s in snaps {
        for (cmd, c) in &s.by_cmd {
            for (outcome, n) in [("done", c.done), ("failed", c.failed)] {
                let _ = writeln!(
                    out,
                    "nasd_events_finished_total{{nas=\"{}\",cmd=\"{}\",outcome=\"{outcome}\"}} {n}",
                    s.nas_id,
                    esc(cmd)
                );
            }
        }
    }
    head(
        &mut out,
        "nasd_command_duration_seconds",
        "histogram",
        "Time one attempt took (all commands of an event, answer included), by NAS.",
    );
    for s in snaps {
        let mut cumulative = 0;
        for (i, le) in LATENCY_BUCKETS.iter().enumerate() {
            cumulative += s.latency.buckets[i];
            let _ = writeln!(
                out,
                "nasd_command_duration_seconds_bucket{{nas=\"{}\",le=\"{le}\"}} {cumulative}",
                s.nas_id
            );
        }
        let _ = writeln!(
            out,
            "nasd_command_duration_seconds_bucket{{nas=\"{}\",le=\"+Inf\"}} {}",
            s.nas_id, s.latency.count
        );
        let _ = writeln!(
            out,
            "nasd_command_duration_seconds_sum{{nas=\"{}\"}} {}",
            s.nas_id, s.latency.sum_seconds
        );
        let _ = writeln!(
            out,
            "nasd_command_duration_seconds_count{{nas=\"{}\"}} {}",
            s.nas_id, s.latency.count
        );
    }
    type Gauge = fn(&NasSnapshot) -> f64;
    let gauges: [(&str, &str, Gauge); 7] = [
        (
            "nasd_nas_up",
            "1 while the NAS has a running owner that can send (enabled, scheme found).",
            |s| f64::from(u8::from(s.running && s.enabled && s.unavailable.is_none())),
        ),
        (
            "nasd_pool_size",
            "Commands a NAS may have in flight at once (n_workers).",
            |s| s.pool_size as f64,
        ),
        ("nasd_in_flight", "Commands in flight now, by NAS.", |s| {
            s.in_flight as f64
        }),
        (
            "nasd_open_sessions",
            "Open connections to the device, by NAS.",
            |s| s.open_sessions as f64,
        ),
        (
            "nasd_nas_reachable",
            "0 while the circuit breaker holds the NAS down (its events wait), else 1.",
            |s| if s.down_since.is_some() { 0.0 } else { 1.0 },
        ),
        (
            "nasd_consecutive_failures",
            "Attempts in a row that did not reach the NAS (0 after a success).",
            |s| s.consecutive_failures as f64,
        ),
        (
            "nasd_last_success_timestamp_seconds",
            "Unix time of the last successful attempt, by NAS (0: none since start).",
            |s| {
                s.last_success_at
                    .map_or(0.0, |t| t.timestamp_millis() as f64 / 1000.0)
            },
        ),
    ];
    for (name, help, pick) in gauges {
        head(&mut out, name, "gauge", help);
        for s in snaps {
            let _ = writeln!(out, "{name}{{nas=\"{}\"}} {}", s.nas_id, pick(s));
        }
    }
    if let Some(queues) = queues {
        let by_nas: HashMap<i64, &NasQueue> = queues.iter().map(|q| (q.nas_id, q)).collect();
        let mut ids: Vec<i64> = snaps.iter().map(|s| s.nas_id).collect();
        ids.extend(queues.iter().map(|q| q.nas_id));
        ids.sort_unstable();
        ids.dedup();
        let now = Utc::now();
        head(
            &mut out,
            "nasd_queue_depth",
            "gauge",
            "Events waiting or running in events_stack, by NAS.",
        );
        for id in &ids {
            let depth = by_nas.get(id).map_or(0, |q| q.depth);
            let _ = writeln!(out, "nasd_queue_depth{{nas=\"{id}\"}} {depth}");
        }
        head(
            &mut out,
            "nasd_oldest_event_age_seconds",
            "gauge",
            "Age of the oldest event in events_stack, by NAS (0 when empty).",
        );
        for id in &ids {
            let age = by_nas
                .get(id)
                .and_then(|q| q.oldest)
                .map_or(0.0, |t| (now - t).num_milliseconds().max(0) as f64 / 1000.0);
            let _ = writeln!(out, "nasd_oldest_event_age_seconds{{nas=\"{id}\"}} {age}");
        }
    }
    if let Some(c) = compact_depth {
        head(
            &mut out,
            "nasd_compact_queue_depth",
            "gauge",
            "Rows in events_stack_compact not yet expanded.",
        );
        let _ = writeln!(out, "nasd_compact_queue_depth {c}");
    }
    if let Some(c) = cluster {
        head(
            &mut out,
            "nasd_nas_owned_here",
            "gauge",
            "1 while this daemon validly owns the NAS (SQLite: every enabled NAS), else 0; enabled NAS only.",
        );
        for (id, here) in &c.owned_here {
            let _ = writeln!(
                out,
                "nasd_nas_owned_here{{nas=\"{id}\"}} {}",
                u8::from(*here)
            );
        }
        head(
            &mut out,
            "nasd_cluster_daemons",
            "gauge",
            "Daemons sharing the database, by state (a live daemon whose lease ran out counts as lost).",
        );
        for (state, n) in DAEMON_STATES.iter().zip(c.daemons) {
            let _ = writeln!(out, "nasd_cluster_daemons{{state=\"{state}\"}} {n}");
        }
        head(
            &mut out,
            "nasd_cluster_nas_owned",
            "gauge",
            "NAS each live daemon owns now.",
        );
        for (daemon, n) in &c.owned_by {
            let _ = writeln!(
                out,
                "nasd_cluster_nas_owned{{daemon=\"{}\"}} {n}",
                esc(daemon)
            );
        }
    }
    head(
        &mut out,
        "nasd_api_events_enqueued_total",
        "counter",
        "Events accepted by the HTTP API (billing-compatible and JSON).",
    );
    let _ = writeln!(out, "nasd_api_events_enqueued_total {api_enqueued}");
    head(
        &mut out,
        "nasd_db_up",
        "gauge",
        "1 when the last scrape's database queries succeeded.",
    );
    let _ = writeln!(out, "nasd_db_up {}", u8::from(db_up));
    head(
        &mut out,
        "nasd_db_pool_connections",
        "gauge",
        "Database pool connections by state (idle, in_use).",
    );
    let _ = writeln!(
        out,
        "nasd_db_pool_connections{{state=\"idle\"}} {}",
        pool.idle
    );
    let _ = writeln!(
        out,
        "nasd_db_pool_connections{{state=\"in_use\"}} {}",
        pool.size.saturating_sub(pool.idle)
    );
    head(
        &mut out,
        "nasd_db_pool_max_connections",
        "gauge",
        "Largest size of the database pool.",
    );
    let _ = writeln!(out, "nasd_db_pool_max_connections {}", pool.max);
    out
}

/// The journal's series, appended to `out`: lines dropped and files failing, both
/// always present (0 when all is well) so that an alert has a series to compare. Pure.
pub fn render_journal(out: &mut String, journal: &JournalStatus) {
    head(
        out,
        "nasd_journal_lines_dropped_total",
        "counter",
        "Log lines that could not be written (full disk, unwritable file) and were dropped.",
    );
    let _ = writeln!(
        out,
        "nasd_journal_lines_dropped_total {}",
        journal.lines_dropped_total
    );
    head(
        out,
        "nasd_journal_files_failing",
        "gauge",
        "Log files whose last write failed (until one succeeds again).",
    );
    let _ = writeln!(out, "nasd_journal_files_failing {}", journal.files_failing);
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

    #[test]
    fn exposition_has_counters_histograms_and_gauges() {
        let stats = Stats::new();
        let n = stats.nas(7);
        n.start();
        n.set_runtime(4, true, None, None);
        n.enqueued(["user_add", "user_add", "we\"ird"]);
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
        let mut text = render(
            &stats.snapshot(),
            Some(&[NasQueue {
                nas_id: 7,
                depth: 3,
                oldest: Some(Utc::now() - chrono::Duration::seconds(10)),
            }]),
            Some(2),
            Some(&ClusterFigures {
                owned_here: vec![(7, true), (8, false)],
                daemons: [2, 0, 1, 1],
                owned_by: vec![("d1".into(), 1), ("d\"2".into(), 1)],
            }),
            true,
            PoolFigures {
                size: 3,
                idle: 1,
                max: 8,
            },
            5,
        );
        render_journal(
            &mut text,
            &JournalStatus {
                lines_dropped_total: 1234,
                files_failing: 2,
                ..JournalStatus::default()
            },
        );
        for line in [
            "nasd_events_enqueued_total{nas=\"7\",cmd=\"user_add\"} 2",
            "nasd_events_enqueued_total{nas=\"7\",cmd=\"we\\\"ird\"} 1",
            "nasd_events_finished_total{nas=\"7\",cmd=\"user_add\",outcome=\"done\"} 1",
            "nasd_events_retried_total{nas=\"7\",cmd=\"user_add\"} 1",
            "nasd_command_duration_seconds_bucket{nas=\"7\",le=\"0.025\"} 1",
            "nasd_command_duration_seconds_bucket{nas=\"7\",le=\"2.5\"} 2",
            "nasd_command_duration_seconds_bucket{nas=\"7\",le=\"+Inf\"} 2",
            "nasd_command_duration_seconds_count{nas=\"7\"} 2",
            "nasd_queue_depth{nas=\"7\"} 3",
            "nasd_pool_size{nas=\"7\"} 4",
            "nasd_nas_up{nas=\"7\"} 1",
            "nasd_consecutive_failures{nas=\"7\"} 1",
            "nasd_compact_queue_depth 2",
            "nasd_api_events_enqueued_total 5",
            "nasd_db_pool_connections{state=\"in_use\"} 2",
            "nasd_db_pool_max_connections 8",
            "nasd_nas_owned_here{nas=\"7\"} 1",
            "nasd_nas_owned_here{nas=\"8\"} 0",
            "nasd_cluster_daemons{state=\"live\"} 2",
            "nasd_cluster_daemons{state=\"draining\"} 0",
            "nasd_cluster_daemons{state=\"left\"} 1",
            "nasd_cluster_daemons{state=\"lost\"} 1",
            "nasd_cluster_nas_owned{daemon=\"d1\"} 1",
            "nasd_cluster_nas_owned{daemon=\"d\\\"2\"} 1",
            "nasd_journal_lines_dropped_total 1234",
            "nasd_journal_files_failing 2",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line} in\n{text}");
        }
        let age = text
            .lines()
            .find_map(|l| l.strip_prefix("nasd_oldest_event_age_seconds{nas=\"7\"} "))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap();
        assert!((9.0..60.0).contains(&age), "{age}");
    }

    #[test]
    fn history_size_series() {
        let mut with_size = String::new();
        render_history(&mut with_size, 45, Some(8192));
        assert!(
            with_size.lines().any(|l| l == "nasd_history_rows 45"),
            "{with_size}"
        );
        assert!(
            with_size.lines().any(|l| l == "nasd_history_bytes 8192"),
            "{with_size}"
        );
        let mut sqlite = String::new();
        render_history(&mut sqlite, 3, None);
        assert!(sqlite.contains("nasd_history_rows 3"));
        assert!(!sqlite.contains("nasd_history_bytes"), "{sqlite}");
    }
}
