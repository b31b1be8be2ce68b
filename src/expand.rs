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
use crate::journal::Journal;
use crate::store::{ExpandReport, Store, StoreError};

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
                if report.failed > 0 {
                    journal.daemon(&format!(
                        "{} compact event(s) could not be expanded and went to events_history as failed (see its error column)",
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
