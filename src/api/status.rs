//! `GET /status`: `OK` (200) when the database answers, every enabled NAS is served
//! and reachable, and no event waits too long; otherwise 503 and one line per problem.
//! Then `warning:` lines (an enabled NAS no daemon validly owns; log files that cannot
//! be written, whose lines are dropped while delivery goes on), and after a blank line
//! the cluster: this daemon, the daemons sharing the database, and each NAS's owner.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};

use super::ApiState;
use super::json::{Owners, SQLITE_CLUSTER_NOTE, seconds};
use crate::journal::JournalStatus;
use crate::stats::NasSnapshot;
use crate::store::Nas;
use crate::store::cluster::Member;

pub async fn handle(State(state): State<Arc<ApiState>>) -> Response {
    let report = report(&state).await;
    let (status, mut body) = if report.problems.is_empty() {
        (StatusCode::OK, "OK\n".to_string())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("FAIL\n{}\n", report.problems.join("\n")),
        )
    };
    for warning in &report.warnings {
        body.push_str("warning: ");
        body.push_str(warning);
        body.push('\n');
    }
    // A blank line first, so that a script reading the problems up to the first blank
    // line never takes the cluster's description for one.
    if !report.cluster.is_empty() {
        body.push('\n');
        for line in &report.cluster {
            body.push_str(line);
            body.push('\n');
        }
    }
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body,
    )
        .into_response()
}

/// What `/status` says.
#[derive(Debug, Default)]
pub struct Report {
    /// Everything that is wrong now, one sentence each (any makes the answer 503).
    pub problems: Vec<String>,
    /// What an operator should look at without it failing the check: an enabled NAS
    /// without a valid owner is normal for a moment during a handover or a takeover;
    /// log files that cannot be written lose lines, but events are still delivered.
    pub warnings: Vec<String>,
    /// The cluster block: this daemon, the daemons, and the owner of each NAS.
    pub cluster: Vec<String>,
}

/// Failing log files named by `/status`; the rest are counted.
pub const JOURNAL_FILES_LISTED: usize = 10;

/// The state of the daemon: problems, warnings and the cluster block. Database work is
/// a fixed number of queries, whatever the number of NAS.
pub async fn report(state: &ApiState) -> Report {
    let mut report = database_report(state).await;
    // `[billing]`: an unreachable billing database holds every new event back.
    report.problems.extend(state.stats.billing_problems());
    // A warning, never a problem: lines are lost but delivery goes on, so nothing pages.
    report
        .warnings
        .extend(journal_warning(&state.stats.journal(JOURNAL_FILES_LISTED)));
    report
}

/// The warning for log files that cannot be written, if any. Pure, for tests.
pub fn journal_warning(journal: &JournalStatus) -> Option<String> {
    if journal.files_failing == 0 {
        return None;
    }
    let files: Vec<String> = journal
        .failing
        .iter()
        .map(|f| {
            format!(
                "{} since {} ({} line(s); {})",
                f.path.display(),
                crate::journal::local_time(f.since),
                f.dropped,
                f.error
            )
        })
        .collect();
    let more = journal.files_failing.saturating_sub(journal.failing.len());
    Some(format!(
        "journal: {} log file(s) cannot be written, {} line(s) dropped (events are still delivered): {}{}",
        journal.files_failing,
        journal.dropped_failing,
        files.join(", "),
        if more > 0 {
            format!(", and {more} more file(s)")
        } else {
            String::new()
        }
    ))
}

/// Problems, cluster warnings and the cluster block, from the database.
async fn database_report(state: &ApiState) -> Report {
    let mut report = Report::default();
    let out = &mut report.problems;
    let now = Utc::now();
    let ping = tokio::time::timeout(Duration::from_secs(3), state.store.ping()).await;
    match ping {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            out.push(format!("database unreachable: {e}"));
            return report;
        }
        Err(_) => {
            out.push("database unreachable: no answer to a ping within 3s".to_string());
            return report;
        }
    }
    let nas = match state.store.nas_list().await {
        Ok(list) => list,
        Err(e) => {
            out.push(format!("database unreachable: {e}"));
            return report;
        }
    };
    for n in nas.iter().filter(|n| n.enabled) {
        if let Some(snap) = state.stats.get(n.id) {
            out.extend(nas_problem(n, &snap, now, state.cfg.nas_down_after));
        }
    }
    match state.store.stack_count().await {
        Ok(c) => {
            if let Some(oldest) = c.oldest
                && let Ok(age) = (now - oldest).to_std()
                && age > state.cfg.oldest_event_alert
            {
                out.push(format!(
                    "oldest event waits for {} (api.oldest_event_alert {}); {} in events_stack, {} in events_stack_compact",
                    human(age),
                    human(state.cfg.oldest_event_alert),
                    c.stack_total,
                    c.compact_total
                ));
            }
        }
        Err(e) => out.push(format!("database unreachable: {e}")),
    }
    let cluster = async {
        let members = state.store.cluster_members().await?;
        let owners = Owners::load(&state.store, Some(&state.daemon_id)).await?;
        Ok::<_, crate::store::StoreError>((members, owners))
    };
    match cluster.await {
        Ok((members, owners)) => {
            let (lines, warnings) = cluster_lines(&state.daemon_id, &members, &nas, &owners, now);
            report.cluster = lines;
            report.warnings.extend(warnings);
        }
        Err(e) => report.problems.push(format!("database unreachable: {e}")),
    }
    report
}

/// An age or a time left for people: `0.4s` under a minute, else as [`human`].
pub fn short_age(secs: f64) -> String {
    if secs < 60.0 {
        format!("{secs:.1}s")
    } else {
        human(Duration::from_secs_f64(secs))
    }
}

/// `nas 3 (Core, 10.0.0.3)`: how `/status` names a NAS.
fn who(nas: &Nas) -> String {
    format!("nas {} ({}, {})", nas.id, nas.name, nas.ip)
}

/// The cluster block of `/status` and its warnings (an enabled NAS without a valid
/// owner). Pure, for tests.
pub fn cluster_lines(
    me: &str,
    members: &[Member],
    nas: &[Nas],
    owners: &Owners,
    now: DateTime<Utc>,
) -> (Vec<String>, Vec<String>) {
    let mut lines = Vec::with_capacity(members.len() + nas.len() + 1);
    let mut warnings = Vec::new();
    if owners.sqlite() {
        lines.push(format!(
            "cluster: this daemon is {me}; {SQLITE_CLUSTER_NOTE}"
        ));
    } else {
        let live = members.iter().filter(|m| m.is_live()).count();
        lines.push(format!(
            "cluster: this daemon is {me}; {live} of {} daemon(s) live",
            members.len()
        ));
        for m in members {
            let lease = if m.alive {
                format!("lease {} left", short_age(seconds(m.lease_until - now)))
            } else {
                "lease expired".to_string()
            };
            lines.push(format!(
                "daemon {}{}: host {} pid {}, {}, heartbeat {} ago, {lease}, owns {} NAS",
                m.id,
                if m.id == me { " (this one)" } else { "" },
                m.host,
                m.pid,
                m.state,
                short_age(seconds(now - m.heartbeat_at)),
                m.owned
            ));
        }
    }
    for n in nas {
        match owners.of(n) {
            // SQLite has no epochs: one daemon, which never hands a NAS over.
            Some((daemon, _)) if owners.sqlite() => {
                lines.push(format!("{}: owner {daemon}", who(n)));
            }
            Some((daemon, epoch)) => {
                lines.push(format!("{}: owner {daemon}, epoch {epoch}", who(n)));
            }
            None if !n.enabled => lines.push(format!("{}: disabled, no owner", who(n))),
            None => {
                lines.push(format!("{}: no valid owner", who(n)));
                let last = match owners.row(n.id) {
                    Some(row) => match &row.daemon_id {
                        Some(d) => format!("last owner {d}, epoch {}", row.epoch),
                        None => "never owned".to_string(),
                    },
                    None => "not taken by any daemon yet".to_string(),
                };
                warnings.push(format!(
                    "{} has no valid owner ({last}): its events wait until a live daemon takes it",
                    who(n)
                ));
            }
        }
    }
    (lines, warnings)
}

/// `45s`, `6m40s`, `2h5m`.
pub fn human(d: Duration) -> String {
    let s = d.as_secs();
    if s < 60 {
        format!("{}s", s.max(if d.is_zero() { 0 } else { 1 }))
    } else if s < 3600 {
        format!("{}m{}s", s / 60, s % 60)
    } else {
        format!("{}h{}m", s / 3600, s % 3600 / 60)
    }
}

/// What is wrong with one enabled NAS, if anything. Pure, for tests.
pub fn nas_problem(
    nas: &Nas,
    snap: &NasSnapshot,
    now: DateTime<Utc>,
    down_after: Duration,
) -> Option<String> {
    let who = who(nas);
    // A mistake in the NAS row, its scheme or the config: nothing is sent, so this is
    // never the NAS being down (the circuit breaker does not count it).
    if let Some(why) = &snap.unavailable {
        return Some(format!(
            "{who} config_error: {why}; its events wait until this is fixed (not counted as the NAS being down)"
        ));
    }
    if let (Some(since), Some(why)) = (snap.down_since, &snap.down_reason)
        && let Ok(down_for) = (now - since).to_std()
        && down_for >= down_after
    {
        return Some(format!(
            "{who} down for {} (circuit breaker; its events wait): {why}",
            human(down_for)
        ));
    }
    let since = snap.failing_since?;
    let down_for = (now - since).to_std().ok()?;
    if snap.consecutive_failures == 0 || down_for < down_after {
        return None;
    }
    Some(format!(
        "{who} unreachable for {}: {} failed attempts in a row, last error: {}; last success: {}",
        human(down_for),
        snap.consecutive_failures,
        snap.last_error.as_deref().unwrap_or("-"),
        snap.last_success_at
            .map(|t| t
                .with_timezone(&chrono::Local)
                .format("%Y-%m-%d %H:%M:%S")
                .to_string())
            .unwrap_or_else(|| "never".into())
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::cluster::NasOwner;

    fn member(id: &str, state: &str, alive: bool, owned: i64, now: DateTime<Utc>) -> Member {
        Member {
            id: id.into(),
            session: 1,
            host: "h".into(),
            pid: 7,
            version: "0.1.0".into(),
            api: None,
            state: state.into(),
            alive,
            started_at: now - chrono::Duration::seconds(60),
            heartbeat_at: now - chrono::Duration::milliseconds(if alive { 500 } else { 90_000 }),
            lease_until: if alive {
                now + chrono::Duration::milliseconds(2500)
            } else {
                now - chrono::Duration::seconds(80)
            },
            owned,
        }
    }

    fn owner(nas_id: i64, daemon: &str, epoch: i64, valid: bool) -> NasOwner {
        NasOwner {
            nas_id,
            daemon_id: Some(daemon.into()),
            epoch,
            valid,
            since: None,
        }
    }

    #[test]
    fn the_cluster_block_names_each_owner_and_warns_of_an_unowned_nas() {
        let now = Utc::now();
        let members = [
            member("a", "live", true, 1, now),
            member("b", "lost", false, 0, now),
        ];
        let mut nas = vec![
            Nas::new(1, "Core", "10.0.0.1"),
            Nas::new(2, "Edge", "10.0.0.2"),
            Nas::new(3, "Old", "10.0.0.3"),
            Nas::new(4, "New", "10.0.0.4"),
        ];
        nas[2].enabled = false;
        let owners = Owners::new(
            false,
            Some("a"),
            vec![owner(1, "a", 3, true), owner(2, "b", 2, false)],
        );
        let (lines, warnings) = cluster_lines("a", &members, &nas, &owners, now);
        assert_eq!(
            lines,
            [
                "cluster: this daemon is a; 1 of 2 daemon(s) live",
                "daemon a (this one): host h pid 7, live, heartbeat 0.5s ago, lease 2.5s left, owns 1 NAS",
                "daemon b: host h pid 7, lost, heartbeat 1m30s ago, lease expired, owns 0 NAS",
                "nas 1 (Core, 10.0.0.1): owner a, epoch 3",
                "nas 2 (Edge, 10.0.0.2): no valid owner",
                "nas 3 (Old, 10.0.0.3): disabled, no owner",
                "nas 4 (New, 10.0.0.4): no valid owner",
            ]
        );
        assert_eq!(
            warnings,
            [
                "nas 2 (Edge, 10.0.0.2) has no valid owner (last owner b, epoch 2): its events wait until a live daemon takes it",
                "nas 4 (New, 10.0.0.4) has no valid owner (not taken by any daemon yet): its events wait until a live daemon takes it",
            ]
        );
    }

    #[test]
    fn on_sqlite_the_daemon_owns_every_enabled_nas() {
        let mut nas = vec![
            Nas::new(1, "Core", "10.0.0.1"),
            Nas::new(2, "Off", "10.0.0.2"),
        ];
        nas[1].enabled = false;
        let owners = Owners::new(true, Some("solo"), Vec::new());
        let (lines, warnings) = cluster_lines("solo", &[], &nas, &owners, Utc::now());
        assert_eq!(
            lines,
            [
                format!("cluster: this daemon is solo; {SQLITE_CLUSTER_NOTE}"),
                "nas 1 (Core, 10.0.0.1): owner solo".to_string(),
                "nas 2 (Off, 10.0.0.2): disabled, no owner".to_string(),
            ]
        );
        assert!(warnings.is_empty());
    }

    #[test]
    fn failing_log_files_are_one_warning_naming_them() {
        use crate::journal::FailingFile;
        use std::path::PathBuf;
        assert_eq!(journal_warning(&JournalStatus::default()), None);
        // Lines dropped before, nothing failing now: no warning.
        let healed = JournalStatus {
            lines_dropped_total: 40,
            ..JournalStatus::default()
        };
        assert_eq!(journal_warning(&healed), None);
        let since = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let file = |path: &str, dropped| FailingFile {
            path: PathBuf::from(path),
            since,
            error: "write: No space left on device (os error 28)".into(),
            dropped,
        };
        let t = crate::journal::local_time(since);
        let mut journal = JournalStatus {
            lines_dropped_total: 900,
            files_failing: 2,
            dropped_failing: 812,
            failing: vec![
                file("/var/log/nasd/nas_event_daemon.log", 12),
                file("/var/log/nasd/nas_event_daemon/Core_10.0.0.1.log", 800),
            ],
        };
        assert_eq!(
            journal_warning(&journal).unwrap(),
            format!(
                "journal: 2 log file(s) cannot be written, 812 line(s) dropped (events are still delivered): \
                 /var/log/nasd/nas_event_daemon.log since {t} (12 line(s); write: No space left on device (os error 28)), \
                 /var/log/nasd/nas_event_daemon/Core_10.0.0.1.log since {t} (800 line(s); write: No space left on device (os error 28))"
            )
        );
        journal.files_failing = 5;
        assert!(journal_warning(&journal).unwrap().ends_with(
            "(800 line(s); write: No space left on device (os error 28)), and 3 more file(s)"
        ));
    }

    #[test]
    fn nas_down_only_after_the_threshold() {
        let nas = Nas::new(3, "Core", "10.0.0.3");
        let now = Utc::now();
        let mut snap = NasSnapshot {
            consecutive_failures: 4,
            failing_since: Some(now - chrono::Duration::seconds(400)),
            last_error: Some("connect: connection refused".into()),
            ..Default::default()
        };
        let text = nas_problem(&nas, &snap, now, Duration::from_secs(300)).unwrap();
        assert!(
            text.starts_with("nas 3 (Core, 10.0.0.3) unreachable for 6m"),
            "{text}"
        );
        assert!(text.contains("4 failed attempts"));
        assert!(text.contains("last success: never"));
        assert_eq!(
            nas_problem(&nas, &snap, now, Duration::from_secs(600)),
            None
        );
        snap.unavailable = Some("scheme x not found".into());
        assert_eq!(
            nas_problem(&nas, &snap, now, Duration::from_secs(600)).unwrap(),
            "nas 3 (Core, 10.0.0.3) config_error: scheme x not found; its events wait until \
             this is fixed (not counted as the NAS being down)"
        );
        // A configuration error is named as one, whatever the failures before it.
        snap.unavailable = Some(
            "login is not set for its ssh scheme mikrotik-ssh (nasd nas set 3 --login NAME)".into(),
        );
        snap.down_since = Some(now - chrono::Duration::seconds(900));
        snap.down_reason = Some("connect: connection refused".into());
        assert_eq!(
            nas_problem(&nas, &snap, now, Duration::from_secs(60)).unwrap(),
            "nas 3 (Core, 10.0.0.3) config_error: login is not set for its ssh scheme \
             mikrotik-ssh (nasd nas set 3 --login NAME); its events wait until this is fixed \
             (not counted as the NAS being down)"
        );
    }
}
