//! One owner task per NAS: the NAS's pending events in memory as per-account FIFO lanes,
//! batched claims, at most `n_workers` attempts in flight, batched completion.
//!
//! Order: a lane starts its next event only after the previous one's result has been
//! committed, and an event waiting for a retry blocks only its own lane. `user_info`
//! goes to the front of its lane, but never past an event in flight.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::Rng;
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;

pub mod breaker;
pub mod outcome;
pub mod retry;

use crate::config::DaemonConfig;
use crate::journal::{AccountTarget, Attempt, Journal, NasTarget};
use crate::model::StackEvent;
use crate::stats::NasStats;
use crate::store::{Finish, Reschedule, Store};
use crate::transport::Reply;
use breaker::{Admit, Breaker, Transition};
use outcome::Plan;

// Sending lives in `transport::send` (the owner and `nasd send` share it); the old
// paths keep working.
pub use crate::transport::send::{NasRuntime, attempt_vars, env_pairs, send_event};

/// The cmd that jumps the queue of its account (an operator waits for it in the UI).
pub const PRIORITY_CMD: &str = "user_info";

/// Daemon-wide parts every owner uses.
pub struct Shared {
    pub store: Store,
    pub journal: Journal,
    pub cfg: DaemonConfig,
    /// Figures per NAS for `/status`, `/metrics` and the API.
    pub stats: Arc<crate::stats::Stats>,
    /// Where NAS down / up transitions are announced (a no-op without `[alerts]`).
    pub alerts: crate::alerts::Alerts,
}

/// The supervisor's handle on a running owner.
pub struct OwnerHandle {
    pub wake: Arc<Notify>,
    pub config: watch::Sender<Arc<NasRuntime>>,
    pub stop: CancellationToken,
    pub join: tokio::task::JoinHandle<()>,
}

pub fn spawn_owner(shared: Arc<Shared>, runtime: NasRuntime) -> OwnerHandle {
    let wake = Arc::new(Notify::new());
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

struct Pending {
    event: StackEvent,
    /// Not to be started before this instant (retry time, or a foreign lease).
    not_before: Option<Instant>,
}

#[derive(Default)]
struct Lane {
    events: VecDeque<Pending>,
    /// The head is in flight.
    busy: bool,
    /// The account is in the ready queue.
    queued: bool,
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
    wake: Arc<Notify>,
    stop: CancellationToken,
    lanes: HashMap<i64, Lane>,
    ready: VecDeque<i64>,
    timers: BinaryHeap<Reverse<(Instant, i64)>>,
    /// Event id -> claim token, for attempts running now.
    in_flight: HashMap<i64, i64>,
    /// Accounts with an attempt running now: their lanes may not start anything else.
    busy_users: HashSet<i64>,
    /// Results whose commit failed (database away); retried, lanes stay blocked.
    uncommitted: Vec<AttemptResult>,
    loaded: usize,
    max_id: i64,
    want_refill: bool,
    want_reload: bool,
    results_tx: mpsc::UnboundedSender<AttemptResult>,
    results_rx: mpsc::UnboundedReceiver<AttemptResult>,
    workers: JoinSet<()>,
    db_retry_at: Option<Instant>,
    stats: Arc<NasStats>,
    stats_generation: u64,
    /// Highest event id counted as enqueued (not reset by a reload).
    counted_max_id: i64,
    breaker: Breaker,
}

impl Owner {
    fn new(
        shared: Arc<Shared>,
        config_rx: watch::Receiver<Arc<NasRuntime>>,
        wake: Arc<Notify>,
        stop: CancellationToken,
    ) -> Owner {
        let runtime = config_rx.borrow().clone();
        let (results_tx, results_rx) = mpsc::unbounded_channel();
        let stats = shared.stats.nas(runtime.nas.id);
        let stats_generation = stats.start();
        record_runtime(&stats, &runtime);
        let breaker = Breaker::new(shared.cfg.breaker.clone());
        Owner {
            shared,
            config_rx,
            runtime,
            wake,
            stop,
            lanes: HashMap::new(),
            ready: VecDeque::new(),
            timers: BinaryHeap::new(),
            in_flight: HashMap::new(),
            busy_users: HashSet::new(),
            uncommitted: Vec::new(),
            loaded: 0,
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
        }
    }

    fn nas_id(&self) -> i64 {
        self.runtime.nas.id
    }

    async fn run(mut self) {
        let cfg = self.shared.cfg.clone();
        let mut next_poll = Instant::now();
        let mut next_heartbeat = Instant::now() + cfg.lease / 3;
        let mut stopping_since: Option<Instant> = None;
        loop {
            while self.workers.try_join_next().is_some() {}
            let now = Instant::now();
            if stopping_since.is_none() && self.stop.is_cancelled() {
                stopping_since = Some(now);
            }
            if let Some(since) = stopping_since {
                if self.in_flight.is_empty() && self.uncommitted.is_empty() {
                    break;
                }
                if now >= since + cfg.shutdown_grace {
                    self.give_up_in_flight().await;
                    break;
                }
            }
            if now >= next_poll {
                self.want_refill = true;
                next_poll = now + cfg.poll_interval;
            }
            if now >= next_heartbeat {
                next_heartbeat = now + cfg.lease / 3;
                self.heartbeat().await;
            }
            if !self.uncommitted.is_empty() && self.db_retry_at.is_none_or(|t| t <= now) {
                let results = std::mem::take(&mut self.uncommitted);
                self.complete(results).await;
            }
            if stopping_since.is_none() && self.db_retry_at.is_none_or(|t| t <= now) {
                if self.want_reload {
                    self.reload().await;
                } else if self.want_refill {
                    self.refill().await;
                }
                self.fire_timers();
                self.start_ready().await;
            }

            let mut deadline = next_poll.min(next_heartbeat);
            if let Some(Reverse((t, _))) = self.timers.peek() {
                deadline = deadline.min(*t);
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
                    let mut batch = vec![first];
                    while let Ok(more) = self.results_rx.try_recv() {
                        batch.push(more);
                    }
                    self.complete(batch).await;
                }
                changed = self.config_rx.changed() => {
                    if changed.is_ok() {
                        self.runtime = self.config_rx.borrow_and_update().clone();
                        record_runtime(&self.stats, &self.runtime);
                        // New settings may be the fix: a down NAS is probed at once.
                        self.breaker.probe_now(Instant::now());
                    }
                }
                _ = self.wake.notified() => { self.want_refill = true; }
                _ = sleep_until(deadline) => {}
            }
        }
        self.workers.abort_all();
        self.stats.stopped(self.stats_generation);
    }

    /// Extends the leases of the attempts in flight, each under its claim token. A claim
    /// that is no longer ours is not extended; its result will be discarded by the same
    /// fence when it arrives.
    async fn heartbeat(&mut self) {
        let claims: Vec<(i64, i64)> = self.in_flight.iter().map(|(id, t)| (*id, *t)).collect();
        let until = Utc::now() + self.shared.cfg.lease;
        match self.shared.store.extend_leases(&claims, until).await {
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
        let not_before = if event.state == "running" && !self.in_flight.contains_key(&event.id) {
            instant_at(event.lease_until)
        } else {
            instant_at(event.retry_at)
        };
        let in_flight = self.in_flight.contains_key(&event.id);
        let user_id = event.user_id;
        let is_priority = event.cmd == PRIORITY_CMD;
        let account_busy = self.busy_users.contains(&user_id);
        let lane = self.lanes.entry(user_id).or_default();
        lane.busy |= account_busy;
        let pending = Pending { event, not_before };
        if in_flight {
            lane.events.push_front(pending);
        } else if is_priority {
            let mut at = usize::from(lane.busy);
            while at < lane.events.len() && lane.events[at].event.cmd == PRIORITY_CMD {
                at += 1;
            }
            lane.events.insert(at, pending);
        } else {
            lane.events.push_back(pending);
        }
        self.loaded += 1;
        self.schedule(user_id);
    }

    /// Puts a lane in the ready queue, or on the timer heap, when its head can start.
    fn schedule(&mut self, user_id: i64) {
        let Some(lane) = self.lanes.get_mut(&user_id) else {
            return;
        };
        if lane.busy || lane.queued {
            return;
        }
        let Some(head) = lane.events.front() else {
            self.lanes.remove(&user_id);
            return;
        };
        match head.not_before {
            Some(t) if t > Instant::now() => self.timers.push(Reverse((t, user_id))),
            _ => {
                lane.queued = true;
                self.ready.push_back(user_id);
            }
        }
    }

    fn fire_timers(&mut self) {
        let now = Instant::now();
        while let Some(Reverse((t, user_id))) = self.timers.peek().copied() {
            if t > now {
                break;
            }
            self.timers.pop();
            self.schedule(user_id);
        }
    }

    async fn refill(&mut self) {
        let window = self.shared.cfg.window;
        if self.loaded >= window / 2 {
            self.want_refill = false;
            return;
        }
        let limit = (window - self.loaded) as i64;
        match self
            .shared
            .store
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
                }
                self.stats
                    .set_load(self.in_flight.len(), self.loaded + rows.len());
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
        self.ready.clear();
        self.timers.clear();
        self.loaded = 0;
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
        if free == 0 || self.ready.is_empty() {
            return;
        }
        let mut heads: Vec<(i64, i64)> = Vec::with_capacity(free);
        while heads.len() < free {
            let Some(user_id) = self.ready.pop_front() else {
                break;
            };
            let Some(lane) = self.lanes.get_mut(&user_id) else {
                continue;
            };
            lane.queued = false;
            if lane.busy {
                continue;
            }
            if let Some(head) = lane.events.front() {
                heads.push((user_id, head.event.id));
            }
        }
        if heads.is_empty() {
            return;
        }
        let token = loop {
            let t: i64 = rand::rng().random();
            if t != 0 {
                break t;
            }
        };
        let now = Utc::now();
        let ids: Vec<i64> = heads.iter().map(|(_, id)| *id).collect();
        let claimed = match self
            .shared
            .store
            .claim(&ids, token, now, now + self.shared.cfg.lease)
            .await
        {
            Ok(c) => c,
            Err(e) => {
                for (user_id, _) in heads {
                    self.schedule(user_id);
                }
                self.db_failed("claiming events", e);
                return;
            }
        };
        let claimed: HashMap<i64, i32> = claimed.into_iter().map(|c| (c.id, c.try_count)).collect();
        for (user_id, id) in heads {
            let Some(try_count) = claimed.get(&id).copied() else {
                // Someone else holds it (a lease that has not expired) or it is gone:
                // look again later and rebuild from the table.
                if let Some(head) = self
                    .lanes
                    .get_mut(&user_id)
                    .and_then(|l| l.events.front_mut())
                {
                    head.not_before =
                        Some(Instant::now() + self.shared.cfg.lease.min(Duration::from_secs(5)));
                }
                self.want_reload = true;
                self.schedule(user_id);
                continue;
            };
            let Some(lane) = self.lanes.get_mut(&user_id) else {
                continue;
            };
            lane.busy = true;
            let Some(head) = lane.events.front_mut() else {
                continue;
            };
            head.event.try_count = try_count;
            head.event.state = "running".into();
            head.event.claim_token = Some(token);
            let event = head.event.clone();
            self.in_flight.insert(id, token);
            self.busy_users.insert(user_id);
            if admit == Admit::Probe {
                self.breaker.probe_started();
                tracing::info!(nas_id = self.nas_id(), event_id = id, "probing the NAS");
            }
            let runtime = self.runtime.clone();
            let tx = self.results_tx.clone();
            let exec_timeout = self.shared.cfg.exec_timeout;
            let max_attempts = self.shared.cfg.max_attempts;
            self.workers.spawn(async move {
                let started = Instant::now();
                let reply = match outcome::before_attempt(event.try_count, max_attempts) {
                    Some(verdict) => Reply::unsent(verdict),
                    None => send_event(&runtime, &event, exec_timeout).await,
                };
                let _ = tx.send(AttemptResult {
                    user_id,
                    event,
                    token,
                    reply,
                    duration: started.elapsed(),
                });
            });
        }
        self.stats.set_load(self.in_flight.len(), self.loaded);
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
                        crate::duration::format_duration(self.shared.cfg.breaker.probe_max)
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

    /// The NAS is reachable again: every account whose head waits for a retry starts
    /// now instead of sitting out the delay it got while the NAS was away (a retry
    /// delay that ran up during an outage says nothing about the device). Attempts are
    /// still counted, so an event that fails for its own reasons still gives up.
    /// Heads held by another owner's lease keep waiting for it.
    fn release_waiting_heads(&mut self) {
        let now = Instant::now();
        let mut released = Vec::new();
        for (user_id, lane) in &mut self.lanes {
            if lane.busy || lane.queued {
                continue;
            }
            if let Some(head) = lane.events.front_mut()
                && head.event.state == "ready"
                && head.not_before.is_some_and(|t| t > now)
            {
                head.not_before = None;
                released.push(*user_id);
            }
        }
        for user_id in released {
            self.schedule(user_id);
        }
    }

    async fn complete(&mut self, results: Vec<AttemptResult>) {
        let policy = outcome::Policy::from_config(&self.shared.cfg);
        let now = Utc::now();
        let mut finishes = Vec::new();
        let mut reschedules = Vec::new();
        let decisions: Vec<outcome::Decision> = results
            .iter()
            .map(|r| {
                let unit: f64 = rand::rng().random();
                outcome::decide(
                    &r.reply.verdict,
                    !r.reply.commands.is_empty(),
                    r.event.try_count,
                    &policy,
                    unit,
                )
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
        let applied: HashSet<i64> = match self
            .shared
            .store
            .complete(&finishes, &reschedules, now)
            .await
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
            self.busy_users.remove(&r.user_id);
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
            let Some(lane) = self.lanes.get_mut(&r.user_id) else {
                continue;
            };
            lane.busy = false;
            let head_matches = lane
                .events
                .front()
                .is_some_and(|p| p.event.id == r.event.id);
            if stale {
                self.want_reload = true;
                continue;
            }
            match decision.plan {
                Plan::Finish { .. } => {
                    if head_matches {
                        lane.events.pop_front();
                    } else {
                        lane.events.retain(|p| p.event.id != r.event.id);
                    }
                    self.loaded = self.loaded.saturating_sub(1);
                }
                Plan::Reschedule { delay, .. } => {
                    if let Some(head) = lane.events.iter_mut().find(|p| p.event.id == r.event.id) {
                        head.event.state = "ready".into();
                        head.event.claim_token = None;
                        head.event.try_count = decision.try_count_after(r.event.try_count);
                        head.not_before = Some(Instant::now() + delay);
                    }
                }
            }
            self.schedule(r.user_id);
        }
        if came_up {
            self.release_waiting_heads();
        }
        self.stats.set_load(self.in_flight.len(), self.loaded);
    }
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
