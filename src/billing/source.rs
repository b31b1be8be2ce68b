//! The events source: new rows of a compact stack kept in the billing's own database
//! (`[billing] events_table` or `events_query`) move into nasd's compact stack exactly
//! once, across crashes and restarts.
//!
//! Each round: read up to `events_batch` rows above the cursor (billing), then in one
//! transaction of nasd's database set the cursor to the highest id read (only if it
//! still is where the rows were read from) and insert the rows whose billing id was not
//! moved before (`Store::billing_move`). A crash before that commit moved nothing and
//! the rows are read again; after it, the cursor and the recorded ids keep them from
//! moving twice. With `after_move` the billing rows are then deleted or marked, and
//! nasd records that they were; one left undone by a crash is done at the next round.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{Billing, BillingError, Health, Part, backoff};
use crate::store::billing::Moved;
use crate::store::{Store, StoreError};

/// What the events source needs.
pub struct Source {
    pub store: Store,
    pub billing: Billing,
    pub health: Health,
}

#[derive(Debug, thiserror::Error)]
enum RoundError {
    #[error(transparent)]
    Billing(#[from] BillingError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Billing ids moved long ago are forgotten after this (the cursor keeps them from
/// being read again).
const KEEP_MOVED: chrono::TimeDelta = chrono::TimeDelta::days(1);
/// Rounds between two prunes of the moved ids.
const PRUNE_EVERY: u32 = 3600;

/// Runs until `shutdown` fires.
pub async fn run(source: Source, shutdown: CancellationToken) {
    let Some(events) = source.billing.config().events.clone() else {
        return;
    };
    let mut failures = 0u32;
    let mut rounds = 0u32;
    loop {
        let wait = match round(&source).await {
            Ok(read) => {
                failures = 0;
                source.health.ok(Part::Events);
                if read as i64 >= events.batch {
                    Duration::ZERO
                } else {
                    events.poll_interval
                }
            }
            Err(RoundError::Billing(e)) => {
                source.health.failed(Part::Events, &e);
                failures = failures.saturating_add(1);
                backoff(failures).max(events.poll_interval)
            }
            Err(RoundError::Store(e)) => {
                tracing::warn!("billing events source: {e}");
                failures = failures.saturating_add(1);
                backoff(failures).max(events.poll_interval)
            }
        };
        rounds = rounds.wrapping_add(1);
        if rounds.is_multiple_of(PRUNE_EVERY)
            && let Err(e) = source
                .store
                .billing_prune(chrono::Utc::now() - KEEP_MOVED)
                .await
        {
            tracing::warn!("billing events source: {e}");
        }
        if shutdown.is_cancelled() {
            return;
        }
        if !wait.is_zero() {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}

/// One round; returns how many rows were read.
async fn round(source: &Source) -> Result<usize, RoundError> {
    let Some(events) = source.billing.config().events.as_ref() else {
        return Ok(0);
    };
    if let Some(statement) = &events.after_move {
        finish_moved(source, statement, events.batch).await?;
    }
    let cursor = source.store.billing_cursor().await?;
    let rows = source.billing.read_events(cursor, events.batch).await?;
    if rows.is_empty() {
        return Ok(0);
    }
    match source
        .store
        .billing_move(cursor, &rows, events.after_move.is_none())
        .await?
    {
        Moved::Done { moved, skipped } => {
            tracing::debug!("billing events source: {moved} moved, {skipped} moved before");
            if skipped > 0 {
                source.health.journal.daemon(&format!(
                    "billing events source: {skipped} row(s) above the cursor had been moved before (same billing id): not moved again"
                ));
            }
        }
        Moved::CursorMoved => {
            tracing::debug!("billing events source: the cursor moved meanwhile; reading again");
        }
    }
    if let Some(statement) = &events.after_move {
        finish_moved(source, statement, events.batch).await?;
    }
    Ok(rows.len())
}

/// Runs `after_move` on the billing for the rows moved and not yet done with, then
/// records them done.
async fn finish_moved(source: &Source, statement: &str, batch: i64) -> Result<(), RoundError> {
    loop {
        let pending = source.store.billing_pending(batch).await?;
        if pending.is_empty() {
            return Ok(());
        }
        source.billing.after_move(statement, &pending).await?;
        source.store.billing_done(&pending).await?;
        if (pending.len() as i64) < batch {
            return Ok(());
        }
    }
}
