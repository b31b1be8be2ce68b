//! The history pruner: every `[history] prune_interval` it deletes the rows of
//! `events_history` finished more than `[history] keep` ago, oldest first, a batch of
//! `prune_batch` rows per statement with a pause between statements, so that no
//! statement holds the table long enough to stall delivery. `keep = "0s"` keeps
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

/// The first look, soon after the start.
const FIRST: Duration = Duration::from_secs(5);

/// The pause after a statement that took `took`: at least as long, so that the pruner
/// holds the database at most half of the time even when a statement is slow (a
/// checkpoint's sync, a busy disk; SQLite has one writer and the daemon one connection
/// to it).
pub fn pause_after(took: Duration) -> Duration {
    PAUSE.max(took)
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
        loop {
            let statement = tokio::time::Instant::now();
            let pruned = store.prune_history(cutoff, cfg.prune_batch).await;
            let took = statement.elapsed();
            slowest = slowest.max(took);
            match pruned {
                Ok(deleted) => {
                    total += deleted;
                    if !more_after(deleted, cfg.prune_batch) {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(
                        "pruning history: {e}; tried again in {}",
                        crate::duration::format_duration(cfg.prune_interval)
                    );
                    break;
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(pause_after(took)) => {}
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
    fn the_pause_is_at_least_as_long_as_the_statement() {
        assert_eq!(pause_after(Duration::from_millis(3)), PAUSE);
        assert_eq!(
            pause_after(Duration::from_millis(120)),
            Duration::from_millis(120)
        );
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
