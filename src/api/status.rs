//! `GET /status`: `OK` (200) when the database answers, every enabled NAS is served
//! and reachable, and no event waits too long; otherwise 503 and one line per problem.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};

use super::ApiState;
use crate::stats::NasSnapshot;
use crate::store::Nas;

pub async fn handle(State(state): State<Arc<ApiState>>) -> Response {
    let problems = problems(&state).await;
    let (status, body) = if problems.is_empty() {
        (StatusCode::OK, "OK\n".to_string())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("FAIL\n{}\n", problems.join("\n")),
        )
    };
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body,
    )
        .into_response()
}

/// Everything that is wrong now, one sentence each.
pub async fn problems(state: &ApiState) -> Vec<String> {
    let mut out = Vec::new();
    let now = Utc::now();
    let ping = tokio::time::timeout(Duration::from_secs(3), state.store.ping()).await;
    match ping {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            out.push(format!("database unreachable: {e}"));
            return out;
        }
        Err(_) => {
            out.push("database unreachable: no answer to a ping within 3s".to_string());
            return out;
        }
    }
    let nas = match state.store.nas_list().await {
        Ok(list) => list,
        Err(e) => {
            out.push(format!("database unreachable: {e}"));
            return out;
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
    out
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
    let who = format!("nas {} ({}, {})", nas.id, nas.name, nas.ip);
    if let Some(why) = &snap.unavailable {
        return Some(format!("{who} cannot be served: {why}"));
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
            "nas 3 (Core, 10.0.0.3) cannot be served: scheme x not found"
        );
    }
}
