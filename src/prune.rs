//! The history pruner: every `[history] prune_interval` it deletes the rows of
//! `events_history` finished more than `[history] keep` ago, oldest first, a batch of
//! `prune_batch` rows per statement with a pause between statements (at least 20 ms,
//! at least the statement's own time, and paced to at most 20,000 rows/s), so that
//! neither a statement nor the writing it causes stalls delivery. `keep = "0s"` keeps
//! history forever (the pruner does not run).

use std::time::Duration;

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use crate::config::HistoryConfig;
use crate::journal::Journal;
use crate::store::Store;

/// The shortest pause between two delete statements: delivery gets the database
/// meanwhile.
const PAUSE: Duration = Duration::from_millis(20);

/// The most rows a round deletes per second. Deleting writes the table's pages again
/// (PostgreSQL logs a whole page image per heap page after each checkpoint): faster,
/// checkpoints come every few seconds and their syncs stall every commit, delivery's
/// too, for 100 to 200 ms (10 million rows at 75,000 rows/s); at this pace 10 million
/// rows go in under 9 minutes, and a day of any ISP's events in seconds.
const MAX_ROWS_PER_SEC: f64 = 20_000.0;

/// The first look, soon after the start.
const FIRST: Duration = Duration::from_secs(5);

/// The pause after a statement that deleted `deleted` rows in `took`: at least
/// `PAUSE`; at least as long as the statement, so that the pruner holds the database
/// at most half of the time even when a statement is slow (a checkpoint's sync, a busy
/// disk; SQLite has one writer and the daemon one connection to it); and long enough
/// to keep to `MAX_ROWS_PER_SEC`.
pub fn pause_after(took: Duration, deleted: u64) -> Duration {
    let paced = Duration::from_secs_f64(deleted as f64 / MAX_ROWS_PER_SEC).saturating_sub(took);
    PAUSE.max(took).max(paced)
}

/// Whether one round goes on after a statement that deleted `deleted` rows.
pub fn more_after(deleted: u64, batch: i64) -> bool {
    deleted as i64 >= batch
}

/// Runs until `shutdown`.
pub async fn run(store: Store, journal: Journal, cfg: HistoryConfig, shutdown: CancellationToken) {
    if cfg.keep.is_zero() {
        return;
    }
    let Ok(keep) = chrono::Duration::from_std(cfg.keep) else {
        return;
    };
    let mut next = tokio::time::Instant::now() + FIRST.min(cfg.prune_interval);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep_until(next) => {}
        }
        let cutoff = Utc::now() - keep;
        let mut total = 0u64;
        let started = tokio::time::Instant::now();
        let mut slowest = Duration::ZERO;
        let mut from = 0;
        loop {
            let statement = tokio::time::Instant::now();
            let pruned = store.prune_history(cutoff, cfg.prune_batch, from).await;
            let took = statement.elapsed();
            slowest = slowest.max(took);
            let pause = match pruned {
                Ok(step) => {
                    let deleted = step.deleted;
                    from = step.next;
                    total += deleted;
                    if !more_after(deleted, cfg.prune_batch) {
                        break;
                    }
                    pause_after(took, deleted)
                }
                Err(e) => {
                    tracing::warn!(
                        "pruning history: {e}; tried again in {}",
                        crate::duration::format_duration(cfg.prune_interval)
                    );
                    break;
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(pause) => {}
            }
        }
        if total > 0 {
            journal.daemon(&format!(
                "History pruned: {total} event(s) finished before {} deleted ([history] keep = {}) in {:.1} s, the slowest statement {} ms",
                cutoff.format("%Y-%m-%d %H:%M:%S"),
                crate::duration::format_duration(cfg.keep),
                started.elapsed().as_secs_f64(),
                slowest.as_millis()
            ));
        }
        if shutdown.is_cancelled() {
            return;
        }
        next = tokio::time::Instant::now() + cfg.prune_interval;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pause_keeps_the_pace_and_gives_delivery_its_turn() {
        let ms = Duration::from_millis;
        for (took, deleted, pause) in [
            // 2000 rows in 7 ms: 93 ms more make 20,000 rows/s.
            (ms(7), 2000, ms(93)),
            // A slow statement: as long again.
            (ms(150), 2000, ms(150)),
            // Few rows: the shortest pause.
            (ms(1), 100, PAUSE),
            (ms(3), 0, PAUSE),
        ] {
            assert_eq!(pause_after(took, deleted), pause, "{took:?} {deleted}");
        }
    }

    #[test]
    fn a_round_ends_at_the_first_short_batch() {
        for (deleted, batch, more) in [
            (2000, 2000, true),
            (1999, 2000, false),
            (0, 2000, false),
            (1, 1, true),
        ] {
            assert_eq!(more_after(deleted, batch), more, "{deleted}/{batch}");
        }
    }
}
