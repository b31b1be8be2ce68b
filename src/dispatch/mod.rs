//! One owner task per NAS: the NAS's pending events in memory as per-account FIFO lanes,
//! batched claims, at most `n_workers` attempts in flight, batched completion.
//!
//! Order: a lane starts its next event only after the previous one's result has been
//! committed, and an event waiting for a retry blocks only its own lane. `user_info`
//! goes to the front of its lane, but never past an event in flight.
//!
//! Coalescing (`[coalesce]` in the scheme, `[daemon] coalesce`): a lane head taken with
//! the run it supersedes is claimed with the whole run under one token; the superseded
//! events are recorded as `superseded` (fenced by that token, one completion) before the
//! last event of the run is sent. A run not claimed whole supersedes nothing: what was
//! claimed goes back and the lanes are rebuilt.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::Rng;
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;

pub mod batch;
pub mod breaker;
pub mod lanes;
pub mod outcome;
pub mod retry;

use crate::config::DaemonConfig;
use crate::journal::{AccountTarget, Attempt, Journal, NasTarget};
use crate::model::StackEvent;
use crate::stats::NasStats;
use crate::store::{Finish, Reschedule, Store};
use crate::transport::{Reply, Verdict};
use breaker::{Admit, Breaker, Transition};
use lanes::{Lanes, Take};
use outcome::Plan;

// Sending lives in `transport::send` (the owner and `nasd send` share it); the old
// paths keep working.
pub use crate::transport::send::{NasRuntime, attempt_vars, env_pairs, send_event};

pub use lanes::PRIORITY_CMD;

/// The longest an idle owner sleeps without a wake-up (a timer far away costs nothing;
/// the owner only needs some deadline to wait on).
const IDLE_WAIT: Duration = Duration::from_secs(3600);

/// Daemon-wide parts every owner uses.
pub struct Shared {
    pub store: Store,
    pub journal: Journal,
    pub cfg: DaemonConfig,
    /// Figures per NAS for `/status`, `/metrics` and the API.
    pub stats: Arc<crate::stats::Stats>,
    /// Where NAS down / up transitions are announced (a no-op without `[alerts]`).
    pub alerts: crate::alerts::Alerts,
    /// Claims, completions, lease renewals and window loads, merged across owners into
    /// few statements.
    pub batches: batch::Batches,
    /// This daemon's lease on its NAS: checked before every claim and every send.
    pub fence: Arc<crate::cluster::Fence>,
    /// Asks the supervisor to reread the NAS table now (the console paused or resumed a
    /// NAS) instead of at its next `resync_interval`.
    pub resync: Arc<Notify>,
    /// Retries and the breaker as the config says now (SIGHUP replaces them).
    pub tuning: watch::Receiver<crate::config::Tuning>,
}

/// How an owner is woken: by whoever put work in its stack (the expander after each
/// batch, the daemon-wide safety net) or changed its settings. An idle owner has no
/// timer and makes no query; this is the only way work reaches it.
#[derive(Default)]
pub struct OwnerWake {
    notify: Notify,
    /// The highest event id the owner has read from the table.
    seen_max_id: AtomicI64,
    /// An operator asked for a probe of a down NAS now (the console's "probe now").
    probe: std::sync::atomic::AtomicBool,
}

impl OwnerWake {
    /// Wakes the owner (a wake-up that finds it busy is kept for its next wait).
    pub fn notify(&self) {
        self.notify.notify_one();
    }

    /// Wakes the owner if the table holds an event above what it has read: the safety
    /// net's check, so that it wakes only owners that missed something.
    pub fn notify_if_behind(&self, max_id: i64) {
        if self.seen_max_id.load(Ordering::Relaxed) < max_id {
            self.notify.notify_one();
        }
    }

    /// Asks the owner to probe its NAS now if it is down (the next event is the probe).
    pub fn probe_now(&self) {
        self.probe.store(true, Ordering::Relaxed);
        self.notify.notify_one();
    }

    fn seen(&self, max_id: i64) {
        self.seen_max_id.fetch_max(max_id, Ordering::Relaxed);
    }
}

/// The supervisor's handle on a running owner.
pub struct OwnerHandle {
    pub wake: Arc<OwnerWake>,
    pub config: watch::Sender<Arc<NasRuntime>>,
    /// Stop claiming; finish what is in flight (within the shutdown grace), then end.
    pub stop: CancellationToken,
    pub join: tokio::task::JoinHandle<()>,
}

pub fn spawn_owner(shared: Arc<Shared>, runtime: NasRuntime) -> OwnerHandle {
    let wake = Arc::new(OwnerWake::default());
    let (config, config_rx) = watch::channel(Arc::new(runtime));
    let stop = CancellationToken::new();
    let owner = Owner::new(shared, config_rx, wake.clone(), stop.clone());
    let join = tokio::spawn(owner.run());
    OwnerHandle {
        wake,
        config,
        stop,
        join,
    }
}

/// Converts a database time to a tokio instant (None when it is already past).
fn instant_at(t: Option<DateTime<Utc>>) -> Option<Instant> {
    let t = t?;
    let delta = (t - Utc::now()).to_std().ok()?;
    Some(Instant::now() + delta)
}

struct AttemptResult {
    user_id: i64,
    event: StackEvent,
    token: i64,
    reply: Reply,
    duration: Duration,
}

struct Owner {
    shared: Arc<Shared>,
    config_rx: watch::Receiver<Arc<NasRuntime>>,
    runtime: Arc<NasRuntime>,
    wake: Arc<OwnerWake>,
    stop: CancellationToken,
    /// The pending events as per-account lanes (the ordering rules live there).
    lanes: Lanes,
    /// Event id -> claim token, for attempts running now.
    in_flight: HashMap<i64, i64>,
    /// Results whose commit failed (database away); retried, lanes stay blocked.
    uncommitted: Vec<AttemptResult>,
    max_id: i64,
    want_refill: bool,
    want_reload: bool,
    /// Results come boxed: the channel allocates its first block of slots up front, and
    /// with ten thousand owners a block of whole results would cost ~12 KB each.
    results_tx: mpsc::UnboundedSender<Box<AttemptResult>>,
    results_rx: mpsc::UnboundedReceiver<Box<AttemptResult>>,
    workers: JoinSet<()>,
    db_retry_at: Option<Instant>,
    stats: Arc<NasStats>,
    stats_generation: u64,
    /// Highest event id counted as enqueued (not reset by a reload).
    counted_max_id: i64,
    breaker: Breaker,
    /// This owner's view of `Shared::tuning` (it notices a change at its next turn).
    tuning: watch::Receiver<crate::config::Tuning>,
}

impl Drop for Owner {
    /// Also when the supervisor aborts the owner (its lease was lost): the figures stop
    /// showing it as running, and dropping the `JoinSet` aborts its workers.
    fn drop(&mut self) {
        self.stats.stopped(self.stats_generation);
    }
}

impl Owner {
    fn new(
        shared: Arc<Shared>,
        config_rx: watch::Receiver<Arc<NasRuntime>>,
        wake: Arc<OwnerWake>,
        stop: CancellationToken,
    ) -> Owner {
        let runtime = config_rx.borrow().clone();
        let (results_tx, results_rx) = mpsc::unbounded_channel();
        let stats = shared.stats.nas(runtime.nas.id);
        let stats_generation = stats.start();
        record_runtime(&stats, &runtime);
        let mut tuning = shared.tuning.clone();
        let breaker = Breaker::new(tuning.borrow_and_update().breaker.clone());
        Owner {
            shared,
            config_rx,
            runtime,
            wake,
            stop,
            lanes: Lanes::default(),
            in_flight: HashMap::new(),
            uncommitted: Vec::new(),
            max_id: 0,
            want_refill: true,
            want_reload: false,
            results_tx,
            results_rx,
            workers: JoinSet::new(),
            db_retry_at: None,
            stats,
            stats_generation,
            counted_max_id: 0,
            breaker,
            tuning,
        }
    }

    fn nas_id(&self) -> i64 {
        self.runtime.nas.id
    }

    /// The owner loop. The database calls it awaits are boxed, so that the loop's own
    /// future stays small: ten thousand idle owners hold it the whole time, the boxed
    /// futures exist only while a call runs.
    async fn run(mut self) {
        let cfg = self.shared.cfg.clone();
        let mut next_heartbeat = Instant::now() + cfg.lease / 3;
        let mut stopping_since: Option<Instant> = None;
        loop {
            while self.workers.try_join_next().is_some() {}
            if self.tuning.has_changed().unwrap_or(false) {
                let breaker = self.tuning.borrow_and_update().breaker.clone();
                self.breaker.reconfigure(breaker);
            }
            let now = Instant::now();
            if stopping_since.is_none() && self.stop.is_cancelled() {
                stopping_since = Some(now);
            }
            if let Some(since) = stopping_since {
                if self.in_flight.is_empty() && self.uncommitted.is_empty() {
                    break;
                }
                if now >= since + cfg.shutdown_grace {
                    Box::pin(self.give_up_in_flight()).await;
                    break;
                }
            }
            if self.in_flight.is_empty() {
                // Nothing to renew: the first lease renewal comes a third of a lease
                // after the next claim, and an idle owner keeps no timer for it.
                next_heartbeat = now + cfg.lease / 3;
            } else if now >= next_heartbeat {
                next_heartbeat = now + cfg.lease / 3;
                Box::pin(self.heartbeat()).await;
            }
            if !self.uncommitted.is_empty() && self.db_retry_at.is_none_or(|t| t <= now) {
                let results = std::mem::take(&mut self.uncommitted);
                Box::pin(self.complete(results)).await;
            }
            if stopping_since.is_none() && self.db_retry_at.is_none_or(|t| t <= now) {
                if self.want_reload {
                    Box::pin(self.reload()).await;
                } else if self.want_refill {
                    Box::pin(self.refill()).await;
                }
                self.lanes.fire_timers(Instant::now());
                Box::pin(self.start_ready()).await;
            }

            // Only what is due wakes the owner: lease renewals while attempts run, a
            // head's retry time or foreign lease, a database retry, a breaker probe.
            let mut deadline = if self.in_flight.is_empty() {
                now + IDLE_WAIT
            } else {
                next_heartbeat
            };
            if let Some(t) = self.lanes.next_timer() {
                deadline = deadline.min(t);
            }
            if let Some(t) = self.db_retry_at {
                deadline = deadline.min(t);
            }
            if let Some(t) = self.breaker.wake_at() {
                deadline = deadline.min(t);
            }
            if let Some(since) = stopping_since {
                deadline = deadline.min(since + cfg.shutdown_grace);
            }
            tokio::select! {
                biased;
                _ = self.stop.cancelled(), if stopping_since.is_none() => {}
                Some(first) = self.results_rx.recv() => {
                    // Attempts started together tend to end together: let the workers
                    // that are about to report do so, so that their results share this
                    // completion instead of waiting for the next one.
                    tokio::task::yield_now().await;
                    let mut batch = vec![*first];
                    while let Ok(more) = self.results_rx.try_recv() {
                        batch.push(*more);
                    }
                    Box::pin(self.complete(batch)).await;
                }
                changed = self.config_rx.changed() => {
                    if changed.is_ok() {
                        self.runtime = self.config_rx.borrow_and_update().clone();
                        record_runtime(&self.stats, &self.runtime);
                        // New settings may be the fix: a down NAS is probed at once.
                        self.breaker.probe_now(Instant::now());
                    }
                }
                _ = self.wake.notify.notified() => {
                    self.want_refill = true;
                    if self.wake.probe.swap(false, Ordering::Relaxed) {
                        self.breaker.probe_now(Instant::now());
                    }
                }
                _ = sleep_until(deadline) => {}
            }
        }
        self.workers.abort_all();
    }

    /// Extends the leases of the attempts in flight, each under its claim token. A claim
    /// that is no longer ours is not extended; its result will be discarded by the same
    /// fence when it arrives.
    async fn heartbeat(&mut self) {
        // A daemon whose lease may have run out extends nothing: the next owner may
        // claim these events once their leases end.
        if !self.shared.fence.holds() {
            return;
        }
        let claims: Vec<(i64, i64)> = self.in_flight.iter().map(|(id, t)| (*id, *t)).collect();
        match self.shared.batches.renew(claims.clone()).await {
            Ok(extended) => {
                if extended.len() < claims.len() {
                    let extended: HashSet<i64> = extended.into_iter().collect();
                    for (id, _) in claims.iter().filter(|(id, _)| !extended.contains(id)) {
                        tracing::warn!(
                            nas_id = self.nas_id(),
                            event_id = id,
                            "lease not extended: the claim went stale; its result will be discarded"
                        );
                    }
                }
            }
            Err(e) => tracing::warn!(nas_id = self.nas_id(), "extending leases: {e}"),
        }
    }

    /// Shutdown grace ran out: the attempts still running are released (back to ready,
    /// try count kept) so that the next start sends them again.
    async fn give_up_in_flight(&mut self) {
        let held: Vec<(i64, i64)> = self.in_flight.iter().map(|(id, t)| (*id, *t)).collect();
        if held.is_empty() {
            return;
        }
        tracing::warn!(
            nas_id = self.nas_id(),
            n = held.len(),
            "shutdown grace ran out; releasing attempts still in flight"
        );
        if let Err(e) = self.shared.store.release(&held).await {
            tracing::warn!(
                nas_id = self.nas_id(),
                "releasing events: {e}; their leases will expire"
            );
        }
    }

    fn insert(&mut self, event: StackEvent) {
        // An attempt whose result waits to be recorded (the database was away) is still
        // this owner's: after a rebuild of the lanes its expired lease must not make it
        // look free, or it would be claimed and sent again before its result lands.
        let running = self.in_flight.contains_key(&event.id)
            || self.uncommitted.iter().any(|r| r.event.id == event.id);
        let not_before = if event.state == "running" && !running {
            instant_at(event.lease_until)
        } else {
            instant_at(event.retry_at)
        };
        self.lanes
            .insert(event, not_before, running, Instant::now());
    }

    async fn refill(&mut self) {
        let window = self.shared.cfg.window;
        if self.lanes.loaded() >= window / 2 {
            // The window is full enough: the table is read again once it drains below
            // half (want_refill stays set, so no wake-up is lost meanwhile).
            return;
        }
        let limit = (window - self.lanes.loaded()) as i64;
        // Through the load batcher: the owners one expansion woke load together.
        match self
            .shared
            .batches
            .load_window(self.nas_id(), self.max_id, limit)
            .await
        {
            Ok(rows) => {
                self.want_refill = rows.len() as i64 == limit;
                let counted = self.counted_max_id;
                self.stats.enqueued(
                    rows.iter()
                        .filter(|r| r.id > counted)
                        .map(|r| r.cmd.as_str()),
                );
                if let Some(last) = rows.last() {
                    self.counted_max_id = self.counted_max_id.max(last.id);
                    self.wake.seen(last.id);
                }
                self.stats
                    .set_load(self.in_flight.len(), self.lanes.loaded() + rows.len());
                for row in rows {
                    self.max_id = self.max_id.max(row.id);
                    self.insert(row);
                }
            }
            Err(e) => self.db_failed("loading events", e),
        }
    }

    /// Rebuilds the lanes from the table, keeping what is in flight: used when a claim
    /// or a completion shows that memory and table disagree.
    async fn reload(&mut self) {
        self.lanes.clear();
        self.max_id = 0;
        self.want_reload = false;
        self.want_refill = true;
        self.refill().await;
    }

    fn db_failed(&mut self, what: &str, e: crate::store::StoreError) {
        tracing::warn!(nas_id = self.nas_id(), "{what}: {e}; retrying in 1s");
        self.db_retry_at = Some(Instant::now() + Duration::from_secs(1));
    }

    async fn start_ready(&mut self) {
        if self.runtime.unavailable.is_some() || !self.runtime.nas.enabled {
            return;
        }
        let cap = self.runtime.nas.n_workers.max(1) as usize;
        let admit = self.breaker.admit(Instant::now());
        let free = match admit {
            Admit::All => cap.saturating_sub(self.in_flight.len()),
            Admit::Probe => 1,
            Admit::Wait(_) => 0,
        };
        if free == 0 || !self.lanes.has_ready() {
            return;
        }
        // A daemon whose lease may have run out claims nothing (its local deadline,
        // a margin before the lease ends in the database).
        if !self.shared.fence.holds() {
            return;
        }
        // Coalescing: each take may carry the run its event supersedes (see `lanes`).
        let scheme = self.runtime.scheme.clone();
        let coalesce = self.tuning.borrow().coalesce;
        let takes = self.lanes.take_ready(free, |cmd: &str| {
            scheme
                .as_deref()
                .filter(|_| coalesce)
                .and_then(|s| s.coalesce_group(cmd))
        });
        if takes.is_empty() {
            return;
        }
        let token = loop {
            let t: i64 = rand::rng().random();
            if t != 0 {
                break t;
            }
        };
        // Through the claim batcher: other owners' claims go into the same statement,
        // each row under its own owner's token. A run is claimed whole, under the token
        // of the event that supersedes it, so no other owner can send any of it.
        let epoch = self.runtime.tenure.epoch;
        let claims: Vec<(i64, i64, i64)> = takes
            .iter()
            .flat_map(Take::ids)
            .map(|id| (id, token, epoch))
            .collect();
        let claimed = match self.shared.batches.claim(claims).await {
            Ok(c) => c,
            Err(e) => {
                let now = Instant::now();
                for take in takes {
                    self.lanes.put_back(take.user_id, now);
                }
                self.db_failed("claiming events", e);
                return;
            }
        };
        let claimed: HashMap<i64, i32> = claimed.into_iter().map(|c| (c.id, c.try_count)).collect();
        // (user_id, event id, try count) of the events to send now.
        let mut starts: Vec<(i64, i64, i32)> = Vec::with_capacity(takes.len());
        let mut runs: Vec<(Take, i32)> = Vec::new();
        let mut supersede: Vec<Finish> = Vec::new();
        let mut unclaim: Vec<Reschedule> = Vec::new();
        for take in takes {
            let Some(try_count) = claimed.get(&take.event_id).copied() else {
                // Someone else holds it (a lease that has not expired) or it is gone:
                // look again later and rebuild from the table. What of its run was
                // claimed goes back (ready, the claim's attempt refunded).
                self.unclaim(&take, &claimed, token, &mut unclaim);
                self.hold_off(take.user_id);
                continue;
            };
            if take.supersedes.is_empty() {
                starts.push((take.user_id, take.event_id, try_count));
            } else if take.supersedes.iter().all(|id| claimed.contains_key(id)) {
                let cmd = self
                    .lanes
                    .get(take.user_id, take.event_id)
                    .map(|e| e.cmd.clone())
                    .unwrap_or_default();
                let error = superseded_text(take.event_id, &cmd);
                supersede.extend(take.supersedes.iter().map(|id| Finish {
                    id: *id,
                    claim_token: token,
                    outcome: crate::model::Outcome::Superseded,
                    commands: Vec::new(),
                    answer: String::new(),
                    error: Some(error.clone()),
                    duration_ms: 0,
                }));
                runs.push((take, try_count));
            } else {
                // Part of the run is held by someone else or gone (cancelled): nothing
                // is superseded. What was claimed goes back (ready, the claim's attempt
                // refunded) and the run is planned again from the table.
                self.unclaim(&take, &claimed, token, &mut unclaim);
                self.hold_off(take.user_id);
            }
        }
        if !supersede.is_empty() || !unclaim.is_empty() {
            // The superseded events are recorded (fenced by the run's claim token, in
            // one transaction) before the event that replaces them is sent: should this
            // fail, nothing of the run is sent now.
            match self.shared.batches.complete(supersede, unclaim).await {
                Ok(applied) => {
                    let applied: HashSet<i64> = applied.into_iter().collect();
                    for (take, try_count) in runs {
                        if take.supersedes.iter().all(|id| applied.contains(id)) {
                            self.record_superseded(&take);
                            starts.push((take.user_id, take.event_id, try_count));
                        } else {
                            // The claim went stale meanwhile (another owner took the
                            // NAS): the run is that owner's now.
                            if take.supersedes.iter().any(|id| applied.contains(id)) {
                                self.record_superseded_of(&take, &applied);
                            }
                            self.hold_off(take.user_id);
                        }
                    }
                }
                Err(e) => {
                    // Nothing was recorded: the runs stay claimed until their leases
                    // end, then are claimed again and sent one by one, in order.
                    for (take, _) in runs {
                        self.hold_off(take.user_id);
                    }
                    self.db_failed("recording superseded events", e);
                }
            }
        }
        for (user_id, id, try_count) in starts {
            self.spawn_attempt(user_id, id, try_count, token, admit);
        }
        self.stats
            .set_load(self.in_flight.len(), self.lanes.loaded());
    }

    /// A taken lane whose event could not start now: it waits a little (a foreign lease
    /// or a row gone), and the lanes are rebuilt from the table.
    fn hold_off(&mut self, user_id: i64) {
        let now = Instant::now();
        let until = now + self.shared.cfg.lease.min(Duration::from_secs(5));
        self.lanes.held_off(user_id, until, now);
        self.want_reload = true;
    }

    /// Gives back what this owner claimed of `take` without sending it: ready again,
    /// the claim's attempt refunded (through the completion, fenced by the token).
    fn unclaim(
        &self,
        take: &Take,
        claimed: &HashMap<i64, i32>,
        token: i64,
        out: &mut Vec<Reschedule>,
    ) {
        let now = Utc::now();
        out.extend(take.ids().filter(|id| claimed.contains_key(id)).map(|id| {
            Reschedule {
                id,
                claim_token: token,
                retry_at: now,
                error: "not sent: claimed with a run to coalesce that changed meanwhile \
                            (an event of it was cancelled or is held elsewhere)"
                    .into(),
                refund: true,
            }
        }));
    }

    /// The run of `take` was recorded as superseded: it leaves the lanes; the figures
    /// and the NAS and account logs say so, one line per event.
    fn record_superseded(&mut self, take: &Take) {
        let applied: HashSet<i64> = take.supersedes.iter().copied().collect();
        self.record_superseded_of(take, &applied);
    }

    fn record_superseded_of(&mut self, take: &Take, applied: &HashSet<i64>) {
        let by_cmd = self
            .lanes
            .get(take.user_id, take.event_id)
            .map(|e| e.cmd.clone())
            .unwrap_or_default();
        let ids: Vec<i64> = take
            .supersedes
            .iter()
            .copied()
            .filter(|id| applied.contains(id))
            .collect();
        let gone = self.lanes.superseded(take.user_id, &ids);
        self.stats.superseded(gone.iter().map(|e| e.cmd.as_str()));
        let nas_target = NasTarget {
            id: self.runtime.nas.id,
            name: self.runtime.nas.name.clone(),
            ip: self.runtime.nas.ip.clone(),
        };
        for event in gone {
            let account = AccountTarget {
                abonent_id: event.abonent_id,
                user_id: event.user_id,
            };
            let attempt = Attempt {
                event_id: event.id,
                cmd: event.cmd,
                try_count: 0,
                commands: Vec::new(),
                answer: String::new(),
                outcome: format!("{}: not sent", superseded_text(take.event_id, &by_cmd)),
                duration: Duration::ZERO,
            };
            self.shared.journal.attempt(&nas_target, &account, &attempt);
        }
    }

    /// Sends a claimed event on a worker: it runs now and its account starts nothing
    /// else until its result is recorded.
    fn spawn_attempt(&mut self, user_id: i64, id: i64, try_count: i32, token: i64, admit: Admit) {
        let Some(event) = self.lanes.started(user_id, id, try_count, token) else {
            return;
        };
        self.in_flight.insert(id, token);
        if admit == Admit::Probe {
            self.breaker.probe_started();
            tracing::info!(nas_id = self.nas_id(), event_id = id, "probing the NAS");
        }
        let runtime = self.runtime.clone();
        let tx = self.results_tx.clone();
        let exec_timeout = self.shared.cfg.exec_timeout;
        let max_attempts = self.tuning.borrow().max_attempts;
        let fence = self.shared.fence.clone();
        let gate = fence.clone();
        self.workers.spawn(async move {
            let started = Instant::now();
            let losses = fence.watch();
            let reply = match outcome::before_attempt(event.try_count, max_attempts) {
                Some(verdict) => Reply::unsent(verdict),
                // The lease is checked again right before the send: the claim may
                // have waited for a free session past the local deadline.
                None if !fence.holds() => Reply::unsent(crate::transport::Verdict::Requeue(
                    "this daemon's lease on the NAS may have run out; not sent".into(),
                )),
                // A send still running when the lease is lost is abandoned (its
                // session closes), before the lease ends in the database and a new
                // owner may connect.
                // The gate asks the lease again before every command written.
                None => tokio::select! {
                    reply = crate::transport::gate::scope(
                        Arc::new(move || gate.holds()),
                        send_event(&runtime, &event, exec_timeout),
                    ) => reply,
                    _ = crate::cluster::Fence::revoked(losses) => Reply::unsent(
                        crate::transport::Verdict::Requeue(
                            "abandoned: this daemon lost its lease on the NAS during the send"
                                .into(),
                        ),
                    ),
                },
            };
            let _ = tx.send(Box::new(AttemptResult {
                user_id,
                event,
                token,
                reply,
                duration: started.elapsed(),
            }));
        });
    }

    /// Feeds one result to the circuit breaker and announces a transition: the daemon
    /// and NAS logs, the figures, an alert. Returns true when the NAS came back up.
    fn breaker_record(&mut self, r: &AttemptResult) -> bool {
        let remote = self.runtime.device.as_ref().is_some_and(|d| d.is_remote());
        let reach = outcome::reach(&r.reply.verdict, !r.reply.commands.is_empty(), remote);
        let Some(transition) = self.breaker.record(Instant::now(), &reach) else {
            return false;
        };
        let nas = &self.runtime.nas;
        let (line, alert) = match &transition {
            Transition::Down { reason, failures } => {
                self.stats.set_down(Some((Utc::now(), reason.clone())));
                let mut fields = std::collections::BTreeMap::new();
                fields.insert("reason".to_string(), reason.clone().into());
                fields.insert("failures".to_string(), (*failures).into());
                (
                    format!(
                        "NAS down nasid={} ip={}: {failures} attempts in a row did not reach it \
                         (last: {reason}); its events wait, probing every {} at most",
                        nas.id,
                        nas.ip,
                        crate::duration::format_duration(self.tuning.borrow().breaker.probe_max)
                    ),
                    (crate::alerts::AlertKind::NasDown, fields),
                )
            }
            Transition::Up { down_for, probes } => {
                self.stats.set_down(None);
                let mut fields = std::collections::BTreeMap::new();
                fields.insert(
                    "down_for".to_string(),
                    crate::duration::format_duration(*down_for).into(),
                );
                fields.insert("down_for_seconds".to_string(), down_for.as_secs().into());
                fields.insert("probes".to_string(), (*probes).into());
                (
                    format!(
                        "NAS up nasid={} ip={}: reached again after {} down ({probes} failed probes)",
                        nas.id,
                        nas.ip,
                        crate::duration::format_duration(*down_for)
                    ),
                    (crate::alerts::AlertKind::NasUp, fields),
                )
            }
        };
        tracing::warn!(nas_id = nas.id, "{line}");
        self.shared.journal.daemon(&line);
        self.shared.alerts.send(crate::alerts::Alert {
            kind: alert.0,
            nas_id: nas.id,
            nas_name: nas.name.clone(),
            nas_ip: nas.ip.clone(),
            at: Utc::now(),
            fields: alert.1,
        });
        matches!(transition, Transition::Up { .. })
    }

    async fn complete(&mut self, results: Vec<AttemptResult>) {
        let policy = outcome::Policy::from_config(&self.tuning.borrow());
        let now = Utc::now();
        let mut finishes = Vec::new();
        let mut reschedules = Vec::new();
        let decisions: Vec<outcome::Decision> = results
            .iter()
            .map(|r| {
                let unit: f64 = rand::rng().random();
                // A done answer that matched one of the scheme's benign patterns says so
                // in the logs: `done (benign: already have such entry)`.
                let benign = match (&r.reply.verdict, &self.runtime.scheme) {
                    (Verdict::Done, Some(scheme)) => {
                        outcome::benign_match(&r.event.cmd, &r.reply.answer, &scheme.answers)
                    }
                    _ => None,
                };
                outcome::decide(
                    &r.reply.verdict,
                    !r.reply.commands.is_empty(),
                    r.event.try_count,
                    &policy,
                    unit,
                )
                .benign(benign.as_deref())
            })
            .collect();
        for (r, decision) in results.iter().zip(&decisions) {
            match &decision.plan {
                Plan::Reschedule {
                    delay,
                    error,
                    refund,
                } => reschedules.push(Reschedule {
                    id: r.event.id,
                    claim_token: r.token,
                    retry_at: now + *delay,
                    error: error.clone(),
                    refund: *refund,
                }),
                Plan::Finish { outcome, error } => finishes.push(Finish {
                    id: r.event.id,
                    claim_token: r.token,
                    outcome: *outcome,
                    commands: r.reply.commands.clone(),
                    answer: r.reply.answer.clone(),
                    error: error.clone(),
                    duration_ms: r.duration.as_millis() as i64,
                }),
            }
        }
        // Through the completion batcher: other owners' results go into the same
        // transaction.
        let applied: HashSet<i64> = match self.shared.batches.complete(finishes, reschedules).await
        {
            Ok(ids) => ids.into_iter().collect(),
            Err(e) => {
                self.uncommitted.extend(results);
                self.db_failed("recording results", e);
                return;
            }
        };
        self.db_retry_at = None;
        // A result the fence discarded is no outcome: it is neither counted nor fed to
        // the breaker nor journaled as one.
        self.stats.attempts(
            results
                .iter()
                .zip(&decisions)
                .filter(|(r, _)| applied.contains(&r.event.id))
                .map(|(r, decision)| {
                    (
                        r.event.cmd.as_str(),
                        decision.kind,
                        r.duration,
                        r.reply.verdict.reason(),
                    )
                }),
        );
        let mut came_up = false;
        for r in results.iter().filter(|r| applied.contains(&r.event.id)) {
            came_up |= self.breaker_record(r);
        }
        let nas_target = NasTarget {
            id: self.runtime.nas.id,
            name: self.runtime.nas.name.clone(),
            ip: self.runtime.nas.ip.clone(),
        };
        for (r, decision) in results.into_iter().zip(decisions) {
            self.in_flight.remove(&r.event.id);
            let stale = !applied.contains(&r.event.id);
            let account = AccountTarget {
                abonent_id: r.event.abonent_id,
                user_id: r.user_id,
            };
            let attempt = Attempt {
                event_id: r.event.id,
                cmd: r.event.cmd.clone(),
                try_count: r.event.try_count,
                commands: r.reply.commands.clone(),
                answer: r.reply.answer.clone(),
                outcome: decision.text.clone(),
                duration: r.duration,
            };
            if stale {
                // The claim went stale (another owner took the event): our result is
                // discarded, and the NAS log says so instead of showing an outcome.
                tracing::warn!(
                    nas_id = self.runtime.nas.id,
                    event_id = r.event.id,
                    "claim went stale; result discarded"
                );
                self.shared
                    .journal
                    .discarded(&nas_target, &account, &attempt);
            } else {
                self.shared.journal.attempt(&nas_target, &account, &attempt);
            }
            let now = Instant::now();
            if stale {
                self.lanes.discarded(r.user_id, r.event.id);
                self.want_reload = true;
                continue;
            }
            match decision.plan {
                Plan::Finish { .. } => self.lanes.finished(r.user_id, r.event.id, now),
                Plan::Reschedule { delay, .. } => self.lanes.rescheduled(
                    r.user_id,
                    r.event.id,
                    decision.try_count_after(r.event.try_count),
                    now + delay,
                    now,
                ),
            }
        }
        if came_up {
            // A retry delay that ran up during an outage says nothing about the
            // device: every head waiting for one starts now (attempts still count).
            self.lanes.release_waiting_heads(Instant::now());
        }
        self.stats
            .set_load(self.in_flight.len(), self.lanes.loaded());
    }
}

/// What history and the logs say of an event replaced by event `by_id` (cmd `by_cmd`).
pub fn superseded_text(by_id: i64, by_cmd: &str) -> String {
    format!("superseded by event {by_id} ({by_cmd})")
}

/// Copies what the statistics show of a NAS's settings.
fn record_runtime(stats: &NasStats, runtime: &NasRuntime) {
    stats.set_runtime(
        runtime.nas.n_workers,
        runtime.nas.enabled,
        runtime.unavailable.clone(),
        runtime.device.as_ref().and_then(|d| d.pool_counters()),
    );
}
