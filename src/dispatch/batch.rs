//! Statements shared by every owner: claims, completions, lease renewals and window
//! loads of all NAS merged into few statements. An owner hands its rows to a batcher and waits for the
//! rows of its own that the statement took; the batcher takes whatever requests are
//! waiting (up to `max_rows` rows), runs one statement for all of them and answers each
//! owner with its own part of the result.
//!
//! Each row carries its own claim token, so rows of different NAS go into one statement
//! without giving up per-NAS ownership: a row whose claim went stale is left out exactly
//! as it would be in a statement of its own, and a claim takes only rows that are ready
//! (or whose lease ran out). An owner still waits for its answer before its lanes move,
//! so per-account order holds. No owner has two requests waiting in one batcher; requests
//! whose keys overlap (an aborted owner's and its successor's, for one NAS) never share a
//! statement, and requests nobody waits for any more are not run. There is no batching timer: a
//! request that finds the batcher idle runs at once, alone; requests pile up only while
//! earlier statements run, which is exactly when merging them pays. With a thousand busy
//! NAS this turns a thousand small commits (each its own fsync) into a few large ones.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::model::StackEvent;
use crate::store::{Claimed, Finish, Reschedule, Store, StoreError};

/// A row of a statement's answer, known by the key its request asked for: the event
/// id for claims, completions and renewals, the NAS id for loaded windows (many rows).
pub trait Keyed {
    fn key(&self) -> i64;
}

impl Keyed for i64 {
    fn key(&self) -> i64 {
        *self
    }
}

impl Keyed for Claimed {
    fn key(&self) -> i64 {
        self.id
    }
}

impl Keyed for StackEvent {
    fn key(&self) -> i64 {
        self.nas_id
    }
}

/// Where an owner waits for its part of the answer.
type Reply<T> = oneshot::Sender<Result<Vec<T>, String>>;

struct Request<P, T> {
    payload: P,
    /// The keys of this request: what its part of the answer may hold.
    keys: Vec<i64>,
    reply: Reply<T>,
}

/// A task merging requests of payload `P` into statements answering rows `T`; cheap to
/// clone. The task ends when every handle is dropped.
pub struct Batcher<P, T> {
    tx: mpsc::UnboundedSender<Request<P, T>>,
    what: &'static str,
}

impl<P, T> Clone for Batcher<P, T> {
    fn clone(&self) -> Self {
        Batcher {
            tx: self.tx.clone(),
            what: self.what,
        }
    }
}

impl<P: Send + 'static, T: Keyed + Send + 'static> Batcher<P, T> {
    /// Starts the task: `work` runs one statement for the payloads of a batch, at most
    /// `in_flight` at the same time, each with at most `max_rows` rows (more when one
    /// request alone is larger). `what` names the batcher in errors.
    pub fn start<W, F>(what: &'static str, max_rows: usize, in_flight: usize, work: W) -> Self
    where
        W: Fn(Vec<P>) -> F + Send + 'static,
        F: Future<Output = Result<Vec<T>, StoreError>> + Send + 'static,
    {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(rx, max_rows.max(1), in_flight.max(1), work));
        Batcher { tx, what }
    }

    /// Runs `payload` (whose rows have the keys `keys`) in the next statement and
    /// returns the answer's rows with those keys, in the answer's order; an error means
    /// the statement did nothing.
    pub async fn ask(&self, payload: P, keys: Vec<i64>) -> Result<Vec<T>, StoreError> {
        let (reply, answer) = oneshot::channel();
        let stopped = || StoreError::Invalid(format!("the {} batcher has stopped", self.what));
        self.tx
            .send(Request {
                payload,
                keys,
                reply,
            })
            .map_err(|_| stopped())?;
        answer
            .await
            .map_err(|_| stopped())?
            .map_err(StoreError::Invalid)
    }
}

async fn run<P, T, W, F>(
    mut rx: mpsc::UnboundedReceiver<Request<P, T>>,
    max_rows: usize,
    in_flight: usize,
    work: W,
) where
    P: Send + 'static,
    T: Keyed + Send + 'static,
    W: Fn(Vec<P>) -> F,
    F: Future<Output = Result<Vec<T>, StoreError>> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(in_flight));
    // A request left out of the last batch (its keys overlapped it): first of the next.
    let mut carry: Option<Request<P, T>> = None;
    loop {
        let first = match carry.take() {
            Some(request) => request,
            None => match rx.recv().await {
                Some(request) => request,
                None => return,
            },
        };
        // Wait for a free slot first: requests that arrive meanwhile join this batch.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let (batch, left) = take_batch(first, || rx.try_recv().ok(), max_rows);
        carry = left;
        if batch.is_empty() {
            continue;
        }
        let mut payloads = Vec::with_capacity(batch.len());
        let mut waiting = Vec::with_capacity(batch.len());
        for request in batch {
            payloads.push(request.payload);
            waiting.push((request.keys, request.reply));
        }
        let statement = work(payloads);
        tokio::spawn(async move {
            let result = statement.await;
            drop(slot);
            answer(result, waiting);
        });
    }
}

/// The requests of one statement, and the request left for the next one.
type Batch<P, T> = (Vec<Request<P, T>>, Option<Request<P, T>>);

/// The requests of one statement: `first` and whatever `next` has waiting, up to
/// `max_rows` rows. Requests nobody waits for any more (their owner was aborted: the
/// lease on its NAS was lost) are dropped unrun. A request whose keys overlap the
/// batch's is left for the next one (returned apart): the answer's rows are handed out
/// by key, so two requests with one key in one statement (a stopped owner's load of a
/// NAS and its successor's) would let the first take the rows the other needs.
fn take_batch<P, T>(
    first: Request<P, T>,
    mut next: impl FnMut() -> Option<Request<P, T>>,
    max_rows: usize,
) -> Batch<P, T> {
    let mut keys: std::collections::HashSet<i64> = std::collections::HashSet::new();
    let mut rows = 0;
    let mut batch = Vec::new();
    let mut candidate = Some(first);
    loop {
        let Some(request) = candidate.take() else {
            break;
        };
        if !request.reply.is_closed() {
            if request.keys.iter().any(|k| keys.contains(k)) {
                return (batch, Some(request));
            }
            keys.extend(request.keys.iter().copied());
            rows += request.keys.len();
            batch.push(request);
        }
        if rows >= max_rows {
            break;
        }
        candidate = next();
    }
    (batch, None)
}

/// Gives each waiting owner the rows of the answer that are its own (in the answer's
/// order), or the error.
fn answer<T: Keyed>(result: Result<Vec<T>, StoreError>, waiting: Vec<(Vec<i64>, Reply<T>)>) {
    match result {
        Ok(rows) => {
            let mut by_key: HashMap<i64, Vec<T>> = HashMap::with_capacity(rows.len());
            for row in rows {
                by_key.entry(row.key()).or_default().push(row);
            }
            for (keys, reply) in waiting {
                let mut part = Vec::new();
                for key in keys {
                    if let Some(rows) = by_key.remove(&key) {
                        part.extend(rows);
                    }
                }
                let _ = reply.send(Ok(part));
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

/// Rows merged into one completion transaction.
const COMPLETE_ROWS: usize = 2000;
/// Rows merged into one claim or lease renewal.
const CLAIM_ROWS: usize = 2000;
/// NAS whose windows one statement loads.
const LOAD_NAS: usize = 500;

/// The statements every owner shares.
#[derive(Clone)]
pub struct Batches {
    /// Results, fenced by claim token; answers the ids applied.
    complete: Batcher<(Vec<Finish>, Vec<Reschedule>), i64>,
    /// Claims `(id, token, epoch)` of ready rows; answers what was taken.
    claim: Batcher<Vec<(i64, i64, i64)>, Claimed>,
    /// Lease renewals `(id, token)`; answers the ids extended.
    renew: Batcher<Vec<(i64, i64)>, i64>,
    /// Windows `(nas_id, after_id, limit)`; answers the events, keyed by NAS.
    load: Batcher<(i64, i64, i64), StackEvent>,
}

impl Batches {
    /// Starts the batchers on `store`; claims and renewals hold a row for `lease`
    /// from the moment their statement runs.
    pub fn start(store: Store, lease: Duration) -> Batches {
        let s = store.clone();
        // Up to four completions at once, so a few busy NAS still commit side by side.
        let complete = Batcher::start("completion", COMPLETE_ROWS, 4, move |parts| {
            let store = s.clone();
            async move {
                let (finishes, reschedules) = merge(parts);
                store.complete(&finishes, &reschedules, Utc::now()).await
            }
        });
        let s = store.clone();
        let claim = Batcher::start("claim", CLAIM_ROWS, 2, move |parts: Vec<Vec<_>>| {
            let store = s.clone();
            async move {
                let claims: Vec<(i64, i64, i64)> = parts.into_iter().flatten().collect();
                let now = Utc::now();
                store.claim(&claims, now, now + lease).await
            }
        });
        let s = store.clone();
        let renew = Batcher::start("lease renewal", CLAIM_ROWS, 1, move |parts: Vec<Vec<_>>| {
            let store = s.clone();
            async move {
                let claims: Vec<(i64, i64)> = parts.into_iter().flatten().collect();
                store.extend_leases(&claims, Utc::now() + lease).await
            }
        });
        // After an expansion every owner it woke loads its window: one statement for
        // hundreds of NAS instead of one each.
        let load = Batcher::start("window load", LOAD_NAS, 2, move |windows| {
            let store = store.clone();
            async move { store.load_windows(&windows).await }
        });
        Batches {
            complete,
            claim,
            renew,
            load,
        }
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
        let ids = finishes
            .iter()
            .map(|f| f.id)
            .chain(reschedules.iter().map(|r| r.id))
            .collect();
        self.complete.ask((finishes, reschedules), ids).await
    }

    /// Claims these `(id, token, epoch)` rows where they are ready (or their lease ran
    /// out) and their NAS is still owned under that epoch; returns what was taken, each
    /// row now held under its own token.
    pub async fn claim(&self, claims: Vec<(i64, i64, i64)>) -> Result<Vec<Claimed>, StoreError> {
        if claims.is_empty() {
            return Ok(Vec::new());
        }
        let ids = claims.iter().map(|c| c.0).collect();
        self.claim.ask(claims, ids).await
    }

    /// Extends the lease of each `(id, token)` still held; returns the ids extended.
    pub async fn renew(&self, claims: Vec<(i64, i64)>) -> Result<Vec<i64>, StoreError> {
        if claims.is_empty() {
            return Ok(Vec::new());
        }
        let ids = claims.iter().map(|(id, _)| *id).collect();
        self.renew.ask(claims, ids).await
    }

    /// Up to `limit` events of NAS `nas_id` with id > `after_id`, in id order.
    pub async fn load_window(
        &self,
        nas_id: i64,
        after_id: i64,
        limit: i64,
    ) -> Result<Vec<StackEvent>, StoreError> {
        self.load.ask((nas_id, after_id, limit), vec![nas_id]).await
    }
}

fn merge(parts: Vec<(Vec<Finish>, Vec<Reschedule>)>) -> (Vec<Finish>, Vec<Reschedule>) {
    let mut finishes = Vec::new();
    let mut reschedules = Vec::new();
    for (f, r) in parts {
        finishes.extend(f);
        reschedules.extend(r);
    }
    (finishes, reschedules)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sorted<T: Keyed>(r: Result<Vec<T>, String>) -> Result<Vec<i64>, String> {
        r.map(|rows| {
            let mut ids: Vec<i64> = rows.iter().map(Keyed::key).collect();
            ids.sort();
            ids
        })
    }

    #[test]
    fn each_owner_gets_only_its_own_rows() {
        let (a, mut a_rx) = oneshot::channel();
        let (b, mut b_rx) = oneshot::channel();
        // Event 2 was stale (the fence left it out); 9 belongs to nobody here.
        answer(
            Ok(vec![1i64, 3, 9, 4]),
            vec![(vec![1, 2], a), (vec![3, 4], b)],
        );
        assert_eq!(sorted(a_rx.try_recv().unwrap()), Ok(vec![1]));
        assert_eq!(sorted(b_rx.try_recv().unwrap()), Ok(vec![3, 4]));
    }

    #[test]
    fn claimed_rows_keep_their_try_count() {
        let (a, mut a_rx) = oneshot::channel();
        let (b, mut b_rx) = oneshot::channel();
        let claimed = |id, try_count| Claimed { id, try_count };
        answer(
            Ok(vec![claimed(5, 3), claimed(7, 1)]),
            vec![(vec![7], a), (vec![5, 6], b)],
        );
        let a = a_rx.try_recv().unwrap().unwrap();
        let b = b_rx.try_recv().unwrap().unwrap();
        assert_eq!((a[0].id, a[0].try_count), (7, 1));
        assert_eq!(b.len(), 1);
        assert_eq!((b[0].id, b[0].try_count), (5, 3));
    }

    #[test]
    fn loaded_windows_go_to_their_nas_in_the_answers_order() {
        let event = |id, nas_id| StackEvent {
            id,
            nas_id,
            ..StackEvent::default()
        };
        let (a, mut a_rx) = oneshot::channel();
        let (b, mut b_rx) = oneshot::channel();
        answer(
            Ok(vec![event(1, 7), event(2, 8), event(3, 7), event(4, 7)]),
            vec![(vec![7], a), (vec![8], b)],
        );
        let ids = |rows: Vec<StackEvent>| rows.iter().map(|e| e.id).collect::<Vec<_>>();
        assert_eq!(ids(a_rx.try_recv().unwrap().unwrap()), vec![1, 3, 4]);
        assert_eq!(ids(b_rx.try_recv().unwrap().unwrap()), vec![2]);
    }

    #[test]
    fn an_error_reaches_every_owner_of_the_statement() {
        let (a, mut a_rx) = oneshot::channel::<Result<Vec<i64>, String>>();
        let (b, mut b_rx) = oneshot::channel();
        answer(
            Err(StoreError::Invalid("connection reset".into())),
            vec![(vec![1], a), (vec![2], b)],
        );
        assert_eq!(a_rx.try_recv().unwrap(), Err("connection reset".into()));
        assert_eq!(b_rx.try_recv().unwrap(), Err("connection reset".into()));
    }

    /// A request with `keys`, and the receiver of its answer (None: dropped, its owner
    /// gone).
    type Answer = oneshot::Receiver<Result<Vec<i64>, String>>;

    fn request(keys: &[i64], waiting: bool) -> (Request<(), i64>, Option<Answer>) {
        let (reply, rx) = oneshot::channel();
        let request = Request {
            payload: (),
            keys: keys.to_vec(),
            reply,
        };
        (request, waiting.then_some(rx))
    }

    #[test]
    fn batches_leave_out_abandoned_and_overlapping_requests() {
        // (first, queued after it, max rows) -> (keys of the batch, keys carried over,
        // keys still queued)
        type Case = (
            (&'static [i64], bool),
            Vec<(&'static [i64], bool)>,
            usize,
            Vec<Vec<i64>>,
            Option<Vec<i64>>,
            usize,
        );
        let cases: Vec<Case> = vec![
            // Distinct keys share the statement.
            (
                (&[1], true),
                vec![(&[2, 3], true), (&[4], true)],
                100,
                vec![vec![1], vec![2, 3], vec![4]],
                None,
                0,
            ),
            // A stopped owner's request is dropped unrun, the live one after it runs.
            (
                (&[7], false),
                vec![(&[7], true)],
                100,
                vec![vec![7]],
                None,
                0,
            ),
            // Two live requests for NAS 7: the second waits for the next statement,
            // and what is queued behind it stays queued.
            (
                (&[7], true),
                vec![(&[8], true), (&[7], true), (&[9], true)],
                100,
                vec![vec![7], vec![8]],
                Some(vec![7]),
                1,
            ),
            // The row cap ends the batch; the rest stays queued.
            (
                (&[1, 2], true),
                vec![(&[3], true), (&[4], true)],
                3,
                vec![vec![1, 2], vec![3]],
                None,
                1,
            ),
            // Nothing left when everyone is gone.
            ((&[1], false), vec![(&[2], false)], 100, vec![], None, 0),
        ];
        for (first, queued, max_rows, want_batch, want_carry, want_queued) in cases {
            let mut receivers = Vec::new();
            let (first, rx) = request(first.0, first.1);
            receivers.push(rx);
            let mut queue: std::collections::VecDeque<Request<(), i64>> = queued
                .iter()
                .map(|(keys, waiting)| {
                    let (r, rx) = request(keys, *waiting);
                    receivers.push(rx);
                    r
                })
                .collect();
            let (batch, carry) = take_batch(first, || queue.pop_front(), max_rows);
            let keys: Vec<Vec<i64>> = batch.iter().map(|r| r.keys.clone()).collect();
            assert_eq!(keys, want_batch, "batch of {queued:?}");
            assert_eq!(carry.map(|r| r.keys), want_carry, "carried of {queued:?}");
            assert_eq!(queue.len(), want_queued, "still queued of {queued:?}");
        }
    }

    #[tokio::test]
    async fn requests_waiting_behind_a_statement_share_the_next_one() {
        // One slot: the first request runs alone, the two that arrive while it runs go
        // into one statement together.
        let (gate_tx, gate_rx) = tokio::sync::watch::channel(false);
        let (seen_tx, mut seen_rx) = mpsc::unbounded_channel::<Vec<i64>>();
        let batcher: Batcher<Vec<i64>, i64> = Batcher::start("test", 100, 1, move |parts| {
            let rows: Vec<i64> = parts.into_iter().flatten().collect();
            let _ = seen_tx.send(rows.clone());
            let mut gate = gate_rx.clone();
            async move {
                let _ = gate.wait_for(|open| *open).await;
                Ok(rows)
            }
        });
        let first = tokio::spawn({
            let b = batcher.clone();
            async move { b.ask(vec![1], vec![1]).await }
        });
        assert_eq!(seen_rx.recv().await, Some(vec![1]));
        // Both are queued before the first statement finishes.
        let (second, second_rx) = oneshot::channel();
        let (third, third_rx) = oneshot::channel();
        for (rows, reply) in [(vec![2, 3], second), (vec![4], third)] {
            let request = Request {
                payload: rows.clone(),
                keys: rows,
                reply,
            };
            assert!(batcher.tx.send(request).is_ok());
        }
        gate_tx.send_replace(true);
        let mut merged = seen_rx.recv().await.unwrap();
        merged.sort();
        assert_eq!(merged, vec![2, 3, 4]);
        assert_eq!(first.await.unwrap().unwrap(), vec![1]);
        assert_eq!(sorted(second_rx.await.unwrap()), Ok(vec![2, 3]));
        assert_eq!(sorted(third_rx.await.unwrap()), Ok(vec![4]));
    }
}
