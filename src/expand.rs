//! The expander: moves compact rows into the main stack in batches and wakes the owners
//! of the NAS that received events. PostgreSQL NOTIFY is only a wake-up; it polls too.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::dispatch::Shared;
use crate::store::Store;
use crate::supervisor::Wakers;

pub async fn run(
    shared: std::sync::Arc<Shared>,
    params_query: String,
    wakers: Wakers,
    shutdown: CancellationToken,
) {
    let batch = shared.cfg.expand_batch;
    let poll = shared.cfg.poll_interval;
    let mut listener = None;
    loop {
        if listener.is_none()
            && let Store::Postgres(pg) = &shared.store
        {
            listener = pg.listen_compact().await.ok();
        }
        let full = match shared.store.expand(&params_query, batch).await {
            Ok(report) => {
                if report.failed > 0 {
                    shared.journal.daemon(&format!(
                        "{} compact event(s) could not be expanded and went to events_history as failed (see its error column)",
                        report.failed
                    ));
                }
                if let Ok(w) = wakers.lock() {
                    for id in &report.nas_ids {
                        if let Some(n) = w.get(id) {
                            n.notify_one();
                        }
                    }
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
