//! Completions of every owner merged into few transactions: an owner hands its batch of
//! results to the completer and waits for the ids the fence let through; the completer
//! takes whatever batches are waiting (up to `max_rows` rows), writes them in one
//! `Store::complete` and answers each owner with its own applied ids.
//!
//! Each row is fenced by its own claim token, so rows of different NAS go into one
//! transaction without giving up per-NAS ownership: a stale row is left out exactly as
//! it would be in a transaction of its own. An owner still waits for its results to be
//! committed before its lanes move, so per-account order holds. With a thousand busy NAS
//! this turns a thousand small commits (each its own fsync) into a few large ones. Up
//! to `IN_FLIGHT` transactions run at once (no owner has two batches waiting, so their
//! rows never overlap), so a few busy NAS still commit side by side as before.

use std::collections::HashSet;

use chrono::Utc;
use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::store::{Finish, Reschedule, Store, StoreError};

/// Completion transactions that may run at the same time.
const IN_FLIGHT: usize = 4;

/// Where an owner waits for the ids of its rows that were applied.
type Reply = oneshot::Sender<Result<Vec<i64>, String>>;

struct Request {
    finishes: Vec<Finish>,
    reschedules: Vec<Reschedule>,
    reply: Reply,
}

/// The handle owners complete through; cheap to clone. The task ends when every
/// handle is dropped.
#[derive(Clone)]
pub struct Completer {
    tx: mpsc::UnboundedSender<Request>,
}

impl Completer {
    /// Starts the completer task on `store`; one transaction carries at most `max_rows`
    /// rows (more when a single owner's batch is larger).
    pub fn start(store: Store, max_rows: usize) -> Completer {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(store, rx, max_rows.max(1)));
        Completer { tx }
    }

    /// Records these results (fenced by their claim tokens) and returns the ids that
    /// were applied; an error means none was.
    pub async fn complete(
        &self,
        finishes: Vec<Finish>,
        reschedules: Vec<Reschedule>,
    ) -> Result<Vec<i64>, StoreError> {
        if finishes.is_empty() && reschedules.is_empty() {
            return Ok(Vec::new());
        }
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Request {
                finishes,
                reschedules,
                reply,
            })
            .map_err(|_| StoreError::Invalid("the completer has stopped".into()))?;
        answer
            .await
            .map_err(|_| StoreError::Invalid("the completer has stopped".into()))?
            .map_err(StoreError::Invalid)
    }
}

async fn run(store: Store, mut rx: mpsc::UnboundedReceiver<Request>, max_rows: usize) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    while let Some(first) = rx.recv().await {
        // Wait for a free slot first: batches that arrive meanwhile join this one.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut rows = first.finishes.len() + first.reschedules.len();
        let mut batch = vec![first];
        while rows < max_rows {
            match rx.try_recv() {
                Ok(more) => {
                    rows += more.finishes.len() + more.reschedules.len();
                    batch.push(more);
                }
                Err(_) => break,
            }
        }
        let mut finishes = Vec::with_capacity(rows);
        let mut reschedules = Vec::new();
        let mut waiting = Vec::with_capacity(batch.len());
        for request in batch {
            let ids: Vec<i64> = request
                .finishes
                .iter()
                .map(|f| f.id)
                .chain(request.reschedules.iter().map(|r| r.id))
                .collect();
            finishes.extend(request.finishes);
            reschedules.extend(request.reschedules);
            waiting.push((ids, request.reply));
        }
        let store = store.clone();
        tokio::spawn(async move {
            let result = store.complete(&finishes, &reschedules, Utc::now()).await;
            drop(slot);
            answer(result, waiting);
        });
    }
}

/// Gives each waiting owner its own applied ids, or the error.
fn answer(result: Result<Vec<i64>, StoreError>, waiting: Vec<(Vec<i64>, Reply)>) {
    match result {
        Ok(applied) => {
            let applied: HashSet<i64> = applied.into_iter().collect();
            for (ids, reply) in waiting {
                let mine = ids.into_iter().filter(|id| applied.contains(id)).collect();
                let _ = reply.send(Ok(mine));
            }
        }
        Err(e) => {
            let message = e.to_string();
            for (_, reply) in waiting {
                let _ = reply.send(Err(message.clone()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_owner_gets_only_its_applied_ids() {
        let (a, mut a_rx) = oneshot::channel();
        let (b, mut b_rx) = oneshot::channel();
        // Event 2 was stale (the fence left it out); 9 belongs to nobody here.
        answer(Ok(vec![1, 3, 9]), vec![(vec![1, 2], a), (vec![3, 4], b)]);
        assert_eq!(a_rx.try_recv().unwrap(), Ok(vec![1]));
        assert_eq!(b_rx.try_recv().unwrap(), Ok(vec![3]));
    }

    #[test]
    fn an_error_reaches_every_owner_of_the_transaction() {
        let (a, mut a_rx) = oneshot::channel();
        let (b, mut b_rx) = oneshot::channel();
        answer(
            Err(StoreError::Invalid("connection reset".into())),
            vec![(vec![1], a), (vec![2], b)],
        );
        assert_eq!(
            a_rx.try_recv().unwrap(),
            Err("connection reset".to_string())
        );
        assert_eq!(
            b_rx.try_recv().unwrap(),
            Err("connection reset".to_string())
        );
    }
}
