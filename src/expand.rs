//! The expander: moves compact rows into the main stack in batches and tells whoever
//! started it which NAS received events (the daemon passes a callback that wakes their
//! owners, so the expander knows neither the dispatcher nor the supervisor). PostgreSQL
//! NOTIFY is only a wake-up; it polls too. Every few polls it is also the daemon-wide
//! safety net: one statement lists the NAS with events above what it last saw, and the
//! callback wakes those owners that have not read that far. Idle owners keep no timer
//! and make no query of their own, so an idle daemon's queries do not grow with the
//! number of NAS.
//!
//! With `[billing]` the variables come from the billing database: the users of the next
//! batch are read first, their variables looked up in the billing (outside nasd's
//! transaction), then the batch is expanded with them. While the billing database does
//! not answer the compact rows stay where they are (events wait, nothing fails), the
//! outage is logged, shown by `/status` and alerted, and the expander tries again with
//! a growing pause until it answers.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::billing::{Billing, BillingError, Health, Part};
use crate::journal::{AccountTarget, Journal};
use crate::store::{EventQuery, EventState, EventStatus, ExpandReport, Store, StoreError};

/// What the expander needs: where the stacks are, where to report, how much to move
/// per statement and how often to look when nothing announces work.
pub struct Expander {
    pub store: Store,
    pub journal: Journal,
    /// The query that fills the `params` of expanded events (`[database] params_query`).
    pub params_query: String,
    /// Compact rows moved per statement (`[daemon] expand_batch`).
    pub batch: i64,
    /// How often to look without a NOTIFY (`[daemon] poll_interval`).
    pub poll: Duration,
    /// PostgreSQL: LISTEN for the compact stack's NOTIFY (`[database] listen`). Off, no
    /// LISTEN connection is opened and the poll alone finds new events.
    pub listen: bool,
    /// `[billing]`: the billing database the variables come from instead of
    /// `params_query` on nasd's own database, and where its outages are reported.
    pub billing: Option<(Billing, Health)>,
}

#[derive(Debug, thiserror::Error)]
enum ExpandError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Billing(#[from] BillingError),
}

/// One expansion of up to `batch` rows, the variables from `params_query` on nasd's
/// database or, with `[billing]`, looked up in the billing database first.
async fn expand_once(
    store: &Store,
    params_query: &str,
    billing: Option<&Billing>,
    batch: i64,
) -> Result<ExpandReport, ExpandError> {
    let Some(billing) = billing else {
        return Ok(store.expand(params_query, batch).await?);
    };
    let Some((users, up_to)) = store.compact_users(batch).await? else {
        return Ok(ExpandReport::default());
    };
    let params = billing.params(&users).await?;
    Ok(store.expand_given(&params, up_to, batch).await?)
}

/// Pages of failed events (500 each, newest first) read back at most to find those of
/// one expansion among the failures of attempts finished meanwhile.
const NOT_EXPANDED_PAGES: usize = 4;

/// Writes each event the last expansion failed (no account for its user, no NAS for
/// it) to the daemon log and to its account's log, with the reason. The expansion
/// reports only how many failed (`failed`), so they are read back from
/// `events_history`: the newest failed events that never reached the main stack and
/// were enqueued after the last one written (`written_up_to`, an enqueued id).
async fn journal_not_expanded(
    store: &Store,
    journal: &Journal,
    failed: usize,
    written_up_to: &mut i64,
) -> Result<(), StoreError> {
    let mut found: Vec<EventStatus> = Vec::new();
    let mut query = EventQuery {
        limit: 500,
        ..EventQuery::new(EventState::Failed)
    };
    for _ in 0..NOT_EXPANDED_PAGES {
        let page = store.events_list(&query).await?;
        found.extend(
            page.events
                .into_iter()
                .filter(|e| not_expanded(e, *written_up_to)),
        );
        match page.next_before {
            Some(before) if found.len() < failed => query.before_id = Some(before),
            _ => break,
        }
    }
    found.truncate(failed);
    // In the order they were enqueued.
    found.sort_by_key(|e| e.id);
    for e in &found {
        let account = AccountTarget {
            abonent_id: e.abonent_id,
            user_id: e.user_id,
        };
        journal.not_expanded(&account, e.id, &e.cmd, e.error.as_deref().unwrap_or("-"));
    }
    if let Some(last) = found.last() {
        *written_up_to = (*written_up_to).max(last.id);
    }
    if found.len() < failed {
        journal.daemon(&format!(
            "{} more compact event(s) could not be expanded and went to events_history as \
             failed (see its error column)",
            failed - found.len()
        ));
    }
    Ok(())
}

/// Whether a failed event failed at expansion (it never reached the main stack nor a
/// NAS, no attempt was made) and was enqueued after `written_up_to`. Pure.
fn not_expanded(e: &EventStatus, written_up_to: i64) -> bool {
    e.stack_id.is_none() && e.nas_id.is_none() && e.try_count == 0 && e.id > written_up_to
}

/// Whom to wake, as the expander reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake<'a> {
    /// These NAS just received events from this expander.
    Got(&'a [i64]),
    /// The safety net: per NAS, the highest event id in the stack above what it last
    /// looked at. Wake the owners that have not read up to it (another writer, a lost
    /// wake-up).
    Behind(&'a [(i64, i64)]),
}

/// The safety net runs once every this many polls.
const SAFETY_NET_POLLS: u32 = 4;

/// Runs until `shutdown` fires; after every batch `wake` gets the NAS ids that received
/// events, and every few polls the safety net's findings.
pub async fn run(expander: Expander, wake: impl Fn(Wake<'_>) + Send, shutdown: CancellationToken) {
    let Expander {
        store,
        journal,
        params_query,
        batch,
        poll,
        listen,
        billing,
    } = expander;
    // Failures of the billing database in a row (each doubles the pause, up to 10 s).
    let mut billing_failures = 0u32;
    let mut listener = None;
    // Cleared for good when the connection turns out not to be a server session of its
    // own (a pooler in transaction mode): LISTEN cannot work there until a restart with
    // another setup, and every try would cost a connection and a few statements.
    let mut try_listen = listen;
    // The safety net's position: the highest event id it has looked at.
    let mut looked_up_to = 0i64;
    let mut polls = 0u32;
    // The highest enqueued id of an event not expanded that the logs were told of.
    let mut not_expanded_up_to = 0i64;
    // The server processes that sent this daemon's own `nasd_stack` notifications.
    let mut own_notifiers: std::collections::VecDeque<i32> = std::collections::VecDeque::new();
    loop {
        if try_listen
            && listener.is_none()
            && let Store::Postgres(pg) = &store
        {
            match pg.listen_compact().await {
                Ok(Some(l)) => listener = Some(l),
                Ok(None) => {
                    try_listen = false;
                    journal.daemon(&format!(
                        "LISTEN is off: the database connection is not a server session of its own \
                         (a pooler in transaction mode?), so no notification could arrive; new events \
                         are found by polling every {}. Set [database] listen = false to skip this check",
                        crate::duration::format_duration(poll)
                    ));
                }
                // The database being away: the expansion below fails too and waits;
                // LISTEN is tried again on the next round.
                Err(e) => tracing::debug!("listening for new compact events: {e}"),
            }
        }
        let full = match expand_once(
            &store,
            &params_query,
            billing.as_ref().map(|(b, _)| b),
            batch,
        )
        .await
        {
            Ok(report) => {
                if let Some((_, health)) = &billing {
                    billing_failures = 0;
                    health.ok(Part::Params);
                }
                if report.failed > 0
                    && let Err(e) = journal_not_expanded(
                        &store,
                        &journal,
                        report.failed,
                        &mut not_expanded_up_to,
                    )
                    .await
                {
                    journal.daemon(&format!(
                        "{} compact event(s) could not be expanded and went to events_history \
                         as failed (see its error column; reading them back for the logs \
                         failed: {e})",
                        report.failed
                    ));
                }
                if !report.nas_ids.is_empty() {
                    wake(Wake::Got(&report.nas_ids));
                }
                if let Some(pid) = report.notified_by {
                    own_notifiers.push_back(pid);
                    if own_notifiers.len() > 32 {
                        own_notifiers.pop_front();
                    }
                }
                (report.expanded + report.failed) as i64 >= batch
            }
            Err(ExpandError::Billing(e)) => {
                // The compact rows stay: the events wait for the billing database.
                let pause = match &billing {
                    Some((_, health)) => {
                        health.failed(Part::Params, &e);
                        billing_failures = billing_failures.saturating_add(1);
                        crate::billing::backoff(billing_failures)
                    }
                    None => Duration::from_secs(1),
                };
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(pause) => {}
                }
                continue;
            }
            Err(ExpandError::Store(e)) => {
                tracing::warn!("expanding compact events: {e}");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                continue;
            }
        };
        if full {
            if shutdown.is_cancelled() {
                return;
            }
            continue;
        }
        polls += 1;
        // Without LISTEN nothing tells this daemon about events another daemon of the
        // cluster expanded: the safety net looks at every poll then.
        if polls >= SAFETY_NET_POLLS || (listener.is_none() && matches!(store, Store::Postgres(_)))
        {
            polls = 0;
            // One statement for the whole daemon, reading only rows it has not seen.
            match store.stack_heads_after(looked_up_to).await {
                Ok(heads) => {
                    if let Some(max) = heads.iter().map(|(_, id)| *id).max() {
                        looked_up_to = looked_up_to.max(max);
                        wake(Wake::Behind(&heads));
                    }
                }
                Err(e) => tracing::warn!("looking for events no wake-up announced: {e}"),
            }
        }
        // Waits for the next poll or a notification; a `nasd_stack` notification from
        // another daemon wakes the owners of its NAS and keeps waiting (nothing to
        // expand), anything else expands at once.
        let next_poll = tokio::time::Instant::now() + poll;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep_until(next_poll) => break,
                notified = async {
                    match listener.as_mut() {
                        Some(l) => l.recv().await.map(Some),
                        None => std::future::pending().await,
                    }
                } => match notified {
                    Ok(Some(n)) if n.channel() == "nasd_stack" => {
                        if !own_notifiers.contains(&(n.process_id() as i32)) {
                            let ids = crate::store::postgres::parse_stack_notice(n.payload());
                            if !ids.is_empty() {
                                wake(Wake::Got(&ids));
                            }
                        }
                    }
                    Ok(_) => break,
                    Err(_) => {
                        listener = None;
                        break;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed(id: i64, stack_id: Option<i64>, nas_id: Option<i64>, try_count: i32) -> EventStatus {
        EventStatus {
            id,
            state: "failed".into(),
            stage: "history".into(),
            stack_id,
            cmd: "user_add".into(),
            user_id: 77,
            abonent_id: None,
            nas_id,
            nas_ip: None,
            usluga_id: None,
            acct_session_id: None,
            enqueued_at: chrono::DateTime::default(),
            try_count,
            next_try_at: None,
            error: Some("unknown account user_id=77".into()),
            commands: Vec::new(),
            answer: None,
            finished_at: None,
            duration_ms: None,
            params: None,
        }
    }

    #[test]
    fn only_events_that_failed_at_expansion_are_read_back() {
        // Failed at expansion, enqueued after what was written: taken.
        assert!(not_expanded(&failed(5, None, None, 0), 4));
        // Already written.
        assert!(!not_expanded(&failed(4, None, None, 0), 4));
        // Failed on its NAS (expanded, tried).
        assert!(!not_expanded(&failed(6, Some(3), Some(1), 2), 4));
        assert!(!not_expanded(&failed(6, None, Some(1), 0), 4));
        assert!(!not_expanded(&failed(6, None, None, 1), 4));
    }
}
