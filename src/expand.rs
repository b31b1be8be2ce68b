//! The expander: moves compact rows into the main stack in batches and tells whoever
//! started it which NAS received events (the daemon passes a callback that wakes their
//! owners, so the expander knows neither the dispatcher nor the supervisor). PostgreSQL
//! NOTIFY is only a wake-up; it polls too.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::journal::Journal;
use crate::store::Store;

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
}

/// Runs until `shutdown` fires; after every batch `wake` gets the NAS ids that received
/// events.
pub async fn run(expander: Expander, wake: impl Fn(&[i64]) + Send, shutdown: CancellationToken) {
    let Expander {
        store,
        journal,
        params_query,
        batch,
        poll,
    } = expander;
    let mut listener = None;
    loop {
        if listener.is_none()
            && let Store::Postgres(pg) = &store
        {
            listener = pg.listen_compact().await.ok();
        }
        let full = match store.expand(&params_query, batch).await {
            Ok(report) => {
                if report.failed > 0 {
                    journal.daemon(&format!(
                        "{} compact event(s) could not be expanded and went to events_history as failed (see its error column)",
                        report.failed
                    ));
                }
                if !report.nas_ids.is_empty() {
                    wake(&report.nas_ids);
                }
                (report.expanded + report.failed) as i64 >= batch
            }
            Err(e) => {
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
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(poll) => {}
            notified = async {
                match listener.as_mut() {
                    Some(l) => l.recv().await.map(|_| ()),
                    None => std::future::pending().await,
                }
            } => {
                if notified.is_err() {
                    listener = None;
                }
            }
        }
    }
}
