//! The owner's pending events in memory (pure): one FIFO lane per account, the queue of
//! accounts whose head may start now, and the timers of heads that wait (a retry delay,
//! another owner's lease).
//!
//! The rules, each with a table test below:
//! - per account, one event at a time and in order: a lane starts its next event only
//!   after the previous one's result is recorded;
//! - an event waiting for a retry holds only its own lane, never another account's;
//! - `user_info` goes to the front of its lane (behind earlier `user_info`s), but never
//!   past an event in flight, also when the lanes are rebuilt while it runs;
//! - coalescing: when a head is taken, the events of its run (the head and the events
//!   right behind it whose cmds are in one `[coalesce]` group of the scheme, none tried
//!   yet) give way to the last of them: that one is sent, the others are superseded.
//!   A run never includes an event in flight (a busy lane gives no head), never crosses
//!   an event outside the group nor a cmd that is never coalesced (`user_info`, which
//!   also sits in front of the waiting events), and never takes an event that was
//!   already claimed or tried (`try_count > 0`, a foreign lease).
//!
//! Nothing here does I/O or reads a clock: `now` is passed in.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};

use tokio::time::Instant;

use crate::model::StackEvent;

/// The cmd that jumps the queue of its account (an operator waits for it in the UI).
pub const PRIORITY_CMD: &str = "user_info";

/// A lane head taken to start: the event to send and the events it supersedes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Take {
    pub user_id: i64,
    /// The event to send: the head, or the last event of the head's run.
    pub event_id: i64,
    /// The events before it in its run, head first: recorded as superseded, never sent.
    /// Empty when the head runs alone.
    pub supersedes: Vec<i64>,
}

impl Take {
    /// Every event of the take in lane order: the superseded ones, then the one to send.
    /// All of them are claimed together.
    pub fn ids(&self) -> impl Iterator<Item = i64> + '_ {
        self.supersedes
            .iter()
            .copied()
            .chain(std::iter::once(self.event_id))
    }
}

/// Whether an event may be part of a run: waiting in this lane, claimed by nobody, never
/// tried (a refunded attempt, which reached nothing, does not count).
fn untried(p: &Pending) -> bool {
    !p.running && p.event.state == "ready" && p.event.try_count == 0
}

/// The run at the head of `events` (a lane with no event in flight): the head and the
/// untried events right behind it in the head's `[coalesce]` group. Returns the event
/// to send (the last of the run) and the ones before it; the head alone with nothing
/// superseded when the run is one event. None for an empty lane.
fn run_at_head<'g>(
    events: &VecDeque<Pending>,
    group: &impl Fn(&str) -> Option<&'g str>,
) -> Option<(i64, Vec<i64>)> {
    let head = events.front()?;
    // A cmd that is never coalesced stays out of any run, whatever the scheme says.
    let group_of = |p: &Pending| {
        if crate::scheme::never_coalesced(&p.event.cmd) || !untried(p) {
            None
        } else {
            group(&p.event.cmd)
        }
    };
    let Some(first) = group_of(head) else {
        return Some((head.event.id, Vec::new()));
    };
    let run: Vec<i64> = events
        .iter()
        .take_while(|p| group_of(p) == Some(first))
        .map(|p| p.event.id)
        .collect();
    let (last, before) = run.split_last()?;
    Some((*last, before.to_vec()))
}

struct Pending {
    event: StackEvent,
    /// Not to be started before this instant (retry time, or a foreign lease).
    not_before: Option<Instant>,
    /// Claimed by this owner and running now.
    running: bool,
}

#[derive(Default)]
struct Lane {
    events: VecDeque<Pending>,
    /// The account is in the ready queue.
    queued: bool,
}

impl Lane {
    fn busy(&self) -> bool {
        self.events.front().is_some_and(|p| p.running)
    }
}

/// Every lane of one NAS.
#[derive(Default)]
pub struct Lanes {
    lanes: HashMap<i64, Lane>,
    ready: VecDeque<i64>,
    timers: BinaryHeap<Reverse<(Instant, i64)>>,
    /// Accounts with an attempt running now. Kept across [`Lanes::clear`]: an attempt
    /// outlives a rebuild of the lanes.
    busy_users: HashSet<i64>,
    loaded: usize,
}

impl Lanes {
    /// Events held in memory (running ones included).
    pub fn loaded(&self) -> usize {
        self.loaded
    }

    /// Whether some account's head may start now.
    pub fn has_ready(&self) -> bool {
        !self.ready.is_empty()
    }

    /// The earliest instant a waiting head may start.
    pub fn next_timer(&self) -> Option<Instant> {
        self.timers.peek().map(|Reverse((t, _))| *t)
    }

    /// Forgets every lane (to rebuild them from the table); running attempts stay
    /// known, so their accounts start nothing else until their results come.
    pub fn clear(&mut self) {
        self.lanes.clear();
        self.ready.clear();
        self.timers.clear();
        self.loaded = 0;
    }

    /// Adds an event read from the table. `running` says it is one of this owner's
    /// attempts in flight; `not_before` when it may start.
    pub fn insert(
        &mut self,
        event: StackEvent,
        not_before: Option<Instant>,
        running: bool,
        now: Instant,
    ) {
        let user_id = event.user_id;
        let is_priority = event.cmd == PRIORITY_CMD;
        let lane = self.lanes.entry(user_id).or_default();
        let pending = Pending {
            event,
            not_before,
            running,
        };
        if running {
            lane.events.push_front(pending);
        } else if is_priority {
            let at = lane
                .events
                .iter()
                .position(|p| !p.running && p.event.cmd != PRIORITY_CMD)
                .unwrap_or(lane.events.len());
            lane.events.insert(at, pending);
        } else {
            lane.events.push_back(pending);
        }
        self.loaded += 1;
        self.schedule(user_id, now);
    }

    /// Puts a lane in the ready queue, or on the timer heap, when its head can start.
    fn schedule(&mut self, user_id: i64, now: Instant) {
        let account_busy = self.busy_users.contains(&user_id);
        let Some(lane) = self.lanes.get_mut(&user_id) else {
            return;
        };
        if lane.busy() || lane.queued || account_busy {
            return;
        }
        let Some(head) = lane.events.front() else {
            self.lanes.remove(&user_id);
            return;
        };
        match head.not_before {
            Some(t) if t > now => self.timers.push(Reverse((t, user_id))),
            _ => {
                lane.queued = true;
                self.ready.push_back(user_id);
            }
        }
    }

    /// Moves the lanes whose wait is over to the ready queue.
    pub fn fire_timers(&mut self, now: Instant) {
        while let Some(Reverse((t, user_id))) = self.timers.peek().copied() {
            if t > now {
                break;
            }
            self.timers.pop();
            self.schedule(user_id, now);
        }
    }

    /// Up to `max` heads that may start now, oldest ready first, each with the run it
    /// supersedes: `group` names the `[coalesce]` group of a cmd (None: the cmd is in no
    /// group, or coalescing is off). Each take must then be
    /// [`started`](Lanes::started) (after [`superseded`](Lanes::superseded) when its
    /// run was), [`held_off`](Lanes::held_off) or [`put_back`](Lanes::put_back).
    pub fn take_ready<'g>(
        &mut self,
        max: usize,
        group: impl Fn(&str) -> Option<&'g str>,
    ) -> Vec<Take> {
        let mut heads = Vec::with_capacity(max.min(self.ready.len()));
        while heads.len() < max {
            let Some(user_id) = self.ready.pop_front() else {
                break;
            };
            let Some(lane) = self.lanes.get_mut(&user_id) else {
                continue;
            };
            lane.queued = false;
            if lane.busy() || self.busy_users.contains(&user_id) {
                continue;
            }
            if let Some((event_id, supersedes)) = run_at_head(&lane.events, &group) {
                heads.push(Take {
                    user_id,
                    event_id,
                    supersedes,
                });
            }
        }
        heads
    }

    /// The event `event_id` of an account's lane, as held now.
    pub fn get(&self, user_id: i64, event_id: i64) -> Option<&StackEvent> {
        self.lanes
            .get(&user_id)?
            .events
            .iter()
            .find(|p| p.event.id == event_id)
            .map(|p| &p.event)
    }

    /// The events `ids` of a taken lane were recorded as superseded: they leave the lane,
    /// whose head is then the event that replaced them (to be [`started`](Lanes::started)).
    /// Returns them as they were held, in lane order.
    pub fn superseded(&mut self, user_id: i64, ids: &[i64]) -> Vec<StackEvent> {
        let Some(lane) = self.lanes.get_mut(&user_id) else {
            return Vec::new();
        };
        let mut gone = Vec::with_capacity(ids.len());
        lane.events.retain(|p| {
            if !p.running && ids.contains(&p.event.id) {
                gone.push(p.event.clone());
                false
            } else {
                true
            }
        });
        self.loaded = self.loaded.saturating_sub(gone.len());
        gone
    }

    /// A taken head was not claimed (the database was away): it may be taken again.
    pub fn put_back(&mut self, user_id: i64, now: Instant) {
        self.schedule(user_id, now);
    }

    /// A taken head is held by someone else (a lease not yet expired) or gone: it waits
    /// until `until`.
    pub fn held_off(&mut self, user_id: i64, until: Instant, now: Instant) {
        if let Some(head) = self
            .lanes
            .get_mut(&user_id)
            .and_then(|l| l.events.front_mut())
        {
            head.not_before = Some(until);
        }
        self.schedule(user_id, now);
    }

    /// A taken head `event_id` was claimed: it runs now, and its account starts nothing
    /// else. Returns the event as claimed (try count, state and token set); None when it
    /// is not the lane's head (the events it supersedes are still there).
    pub fn started(
        &mut self,
        user_id: i64,
        event_id: i64,
        try_count: i32,
        token: i64,
    ) -> Option<StackEvent> {
        let head = self.lanes.get_mut(&user_id)?.events.front_mut()?;
        if head.event.id != event_id || head.running {
            return None;
        }
        head.running = true;
        head.event.try_count = try_count;
        head.event.state = "running".into();
        head.event.claim_token = Some(token);
        self.busy_users.insert(user_id);
        Some(head.event.clone())
    }

    /// The attempt on `event_id` is over and recorded as finished: it leaves its lane,
    /// and the lane's next event may start.
    pub fn finished(&mut self, user_id: i64, event_id: i64, now: Instant) {
        self.busy_users.remove(&user_id);
        let Some(lane) = self.lanes.get_mut(&user_id) else {
            return;
        };
        let before = lane.events.len();
        lane.events.retain(|p| p.event.id != event_id);
        if lane.events.len() < before {
            self.loaded = self.loaded.saturating_sub(1);
        }
        self.schedule(user_id, now);
    }

    /// The attempt on `event_id` is over and the event is tried again at `not_before`
    /// with `try_count`: it stays at the head of its lane, which waits for it.
    pub fn rescheduled(
        &mut self,
        user_id: i64,
        event_id: i64,
        try_count: i32,
        not_before: Instant,
        now: Instant,
    ) {
        self.busy_users.remove(&user_id);
        let Some(lane) = self.lanes.get_mut(&user_id) else {
            return;
        };
        if let Some(p) = lane.events.iter_mut().find(|p| p.event.id == event_id) {
            p.running = false;
            p.event.state = "ready".into();
            p.event.claim_token = None;
            p.event.try_count = try_count;
            p.not_before = Some(not_before);
        }
        self.schedule(user_id, now);
    }

    /// The attempt's result was discarded (the claim went stale): the account is free
    /// again; the caller rebuilds the lanes from the table.
    pub fn discarded(&mut self, user_id: i64, event_id: i64) {
        self.busy_users.remove(&user_id);
        if let Some(p) = self
            .lanes
            .get_mut(&user_id)
            .and_then(|l| l.events.iter_mut().find(|p| p.event.id == event_id))
        {
            p.running = false;
        }
    }

    /// The NAS is reachable again: every head that waits for a retry may start now.
    /// Heads held by another owner's lease (state `running`) keep waiting.
    pub fn release_waiting_heads(&mut self, now: Instant) {
        let mut released = Vec::new();
        for (user_id, lane) in &mut self.lanes {
            if lane.busy() || lane.queued {
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
        // In account order, so that the ready queue does not depend on hashing.
        released.sort_unstable();
        for user_id in released {
            self.schedule(user_id, now);
        }
    }

    /// The event ids of an account's lane, head first (for tests and diagnostics).
    pub fn lane(&self, user_id: i64) -> Vec<i64> {
        self.lanes
            .get(&user_id)
            .map(|l| l.events.iter().map(|p| p.event.id).collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn ev(id: i64, user_id: i64, cmd: &str) -> StackEvent {
        StackEvent {
            id,
            compact_id: None,
            event_date: chrono::DateTime::UNIX_EPOCH,
            enqueued_at: chrono::DateTime::UNIX_EPOCH,
            cmd: cmd.into(),
            user_id,
            abonent_id: None,
            nas_id: 1,
            usluga_id: None,
            acct_session_id: None,
            params: Default::default(),
            try_count: 0,
            state: "ready".into(),
            retry_at: None,
            claim_token: None,
            lease_until: None,
            last_error: None,
        }
    }

    /// One step of a scenario, applied to the lanes at `now`.
    #[derive(Debug, Clone, Copy)]
    enum Step {
        /// insert (id, user, cmd) ready now
        Add(i64, i64, &'static str),
        /// insert (id, user, cmd) running (one of ours, as after a rebuild)
        AddRunning(i64, i64, &'static str),
        /// insert (id, user, cmd) waiting for `secs`
        AddWaiting(i64, i64, &'static str, u64),
        /// insert (id, user, cmd) ready now, tried once already
        AddTried(i64, i64, &'static str),
        /// take up to n ready heads and start them all; expect these event ids, none
        /// superseding anything
        Start(usize, &'static [i64]),
        /// take up to n ready heads; expect these (event to send, events it supersedes);
        /// record the superseded ones and start the rest
        Runs(usize, &'static [(i64, &'static [i64])]),
        /// turn coalescing off (the `[daemon] coalesce = false` switch) or on again
        Coalesce(bool),
        /// the attempt on (user, id) finished
        Finish(i64, i64),
        /// the attempt on (user, id) retries after `secs`
        Retry(i64, i64, u64),
        /// the clock moves on
        Wait(u64),
        /// forget every lane (a rebuild from the table follows)
        Clear,
        /// the NAS came back up
        Up,
        /// the lane of this user holds these ids, head first
        Lane(i64, &'static [i64]),
    }

    /// The `[coalesce]` groups of the shipped mikrotik schemes; `user_info` is given a
    /// group on purpose (a scheme cannot, the loader refuses it): the lanes must still
    /// never coalesce it.
    fn group(cmd: &str) -> Option<&'static str> {
        match cmd {
            "user_accept" | "user_drop" | "own_disabled" | "own_disabled_cancel" => Some("allowed"),
            "user_redirect" | "user_redirect_cancel" => Some("negbal"),
            "user_rate_set" | "user_rate_set_cancel" => Some("speed"),
            "user_info" => Some("allowed"),
            _ => None,
        }
    }

    fn run(steps: &[Step]) {
        let mut lanes = Lanes::default();
        let t0 = Instant::now();
        let mut now = t0;
        let mut coalesce = true;
        for (i, step) in steps.iter().enumerate() {
            lanes.fire_timers(now);
            let on = coalesce;
            let groups = move |cmd: &str| if on { group(cmd) } else { None };
            match *step {
                Step::Add(id, user, cmd) => lanes.insert(ev(id, user, cmd), None, false, now),
                Step::AddRunning(id, user, cmd) => {
                    let mut e = ev(id, user, cmd);
                    e.state = "running".into();
                    lanes.insert(e, None, true, now)
                }
                Step::AddTried(id, user, cmd) => {
                    let mut e = ev(id, user, cmd);
                    e.try_count = 1;
                    lanes.insert(e, None, false, now)
                }
                Step::AddWaiting(id, user, cmd, secs) => lanes.insert(
                    ev(id, user, cmd),
                    Some(now + Duration::from_secs(secs)),
                    false,
                    now,
                ),
                Step::Start(n, want) => {
                    let heads = lanes.take_ready(n, groups);
                    let ids: Vec<i64> = heads.iter().map(|t| t.event_id).collect();
                    assert_eq!(ids, want, "step {i}: {step:?}");
                    for take in heads {
                        assert_eq!(take.supersedes, Vec::<i64>::new(), "step {i}: {step:?}");
                        assert!(
                            lanes.started(take.user_id, take.event_id, 1, 7).is_some(),
                            "step {i}"
                        );
                    }
                }
                Step::Runs(n, want) => {
                    let heads = lanes.take_ready(n, groups);
                    let got: Vec<(i64, Vec<i64>)> = heads
                        .iter()
                        .map(|t| (t.event_id, t.supersedes.clone()))
                        .collect();
                    let want: Vec<(i64, Vec<i64>)> =
                        want.iter().map(|(id, s)| (*id, s.to_vec())).collect();
                    assert_eq!(got, want, "step {i}: {step:?}");
                    for take in heads {
                        // All of the take is claimed under one token; before the
                        // superseded ones are recorded, the one to send is not the head.
                        let ids: Vec<i64> = take.ids().collect();
                        assert_eq!(ids.last(), Some(&take.event_id), "step {i}");
                        if !take.supersedes.is_empty() {
                            assert!(
                                lanes.started(take.user_id, take.event_id, 1, 7).is_none(),
                                "step {i}: started before its run was recorded"
                            );
                        }
                        let gone = lanes.superseded(take.user_id, &take.supersedes);
                        let gone: Vec<i64> = gone.iter().map(|e| e.id).collect();
                        assert_eq!(gone, take.supersedes, "step {i}");
                        assert!(
                            lanes.started(take.user_id, take.event_id, 1, 7).is_some(),
                            "step {i}"
                        );
                    }
                }
                Step::Coalesce(on) => coalesce = on,
                Step::Finish(user, id) => lanes.finished(user, id, now),
                Step::Retry(user, id, secs) => {
                    lanes.rescheduled(user, id, 1, now + Duration::from_secs(secs), now)
                }
                Step::Wait(secs) => now += Duration::from_secs(secs),
                Step::Clear => lanes.clear(),
                Step::Up => lanes.release_waiting_heads(now),
                Step::Lane(user, want) => assert_eq!(lanes.lane(user), want, "step {i}"),
            }
        }
    }

    use Step::*;

    /// (user, event to send) of each take.
    fn heads(takes: Vec<Take>) -> Vec<(i64, i64)> {
        takes.iter().map(|t| (t.user_id, t.event_id)).collect()
    }

    #[test]
    fn one_event_per_account_in_order() {
        run(&[
            Add(1, 10, "block"),
            Add(2, 10, "unblock"),
            Add(3, 20, "block"),
            // Two accounts: both heads start, the second event of 10 waits.
            Start(5, &[1, 3]),
            Start(5, &[]),
            Finish(10, 1),
            Start(5, &[2]),
            Finish(20, 3),
            Finish(10, 2),
            Start(5, &[]),
            Lane(10, &[]),
        ]);
    }

    #[test]
    fn the_worker_cap_is_taken_oldest_ready_first() {
        run(&[
            Add(1, 10, "block"),
            Add(2, 20, "block"),
            Add(3, 30, "block"),
            Start(2, &[1, 2]),
            Start(2, &[3]),
        ]);
    }

    #[test]
    fn a_retry_holds_only_its_own_lane() {
        run(&[
            Add(1, 10, "block"),
            Add(2, 10, "unblock"),
            Add(3, 20, "block"),
            Start(1, &[1]),
            Retry(10, 1, 5),
            // 10 waits for its retry (2 stays behind it); 20 goes on.
            Start(5, &[3]),
            Wait(4),
            Start(5, &[]),
            Wait(1),
            Start(5, &[1]),
            Finish(10, 1),
            Start(5, &[2]),
        ]);
    }

    #[test]
    fn user_info_jumps_its_lane_but_not_the_event_in_flight() {
        run(&[
            Add(1, 10, "block"),
            Add(2, 10, "unblock"),
            Start(1, &[1]),
            Add(3, 10, "user_info"),
            Add(4, 10, "user_info"),
            // Behind the running event, ahead of the waiting one, in their own order.
            Lane(10, &[1, 3, 4, 2]),
            Start(5, &[]),
            Finish(10, 1),
            Start(5, &[3]),
        ]);
    }

    #[test]
    fn user_info_on_an_idle_lane_goes_first() {
        run(&[
            Add(1, 10, "block"),
            Add(2, 10, "user_info"),
            Lane(10, &[2, 1]),
            Start(5, &[2]),
        ]);
    }

    #[test]
    fn a_rebuild_keeps_user_info_behind_the_running_event() {
        // The lanes are rebuilt from the table while event 5 (a user_info that jumped
        // ahead of 1) runs; the table returns rows by id, so 5 comes after 1 and 6.
        run(&[
            Add(1, 10, "block"),
            Add(5, 10, "user_info"),
            Start(1, &[5]),
            Add(6, 10, "user_info"),
            Clear,
            Add(1, 10, "block"),
            AddRunning(5, 10, "user_info"),
            Add(6, 10, "user_info"),
            Lane(10, &[5, 6, 1]),
            Start(5, &[]),
            Finish(10, 5),
            Start(5, &[6]),
        ]);
    }

    #[test]
    fn a_rebuild_does_not_start_a_busy_account_twice() {
        run(&[
            Add(1, 10, "block"),
            Add(2, 10, "unblock"),
            Start(1, &[1]),
            Clear,
            // The running event came back as ready (say the rebuild missed it): the
            // account is still busy, so nothing of it starts.
            Add(2, 10, "unblock"),
            Start(5, &[]),
            Finish(10, 1),
            Start(5, &[2]),
        ]);
    }

    #[test]
    fn the_nas_coming_up_releases_waiting_heads() {
        run(&[
            Add(1, 10, "block"),
            AddWaiting(2, 20, "block", 60),
            Start(1, &[1]),
            Retry(10, 1, 30),
            Start(5, &[]),
            Up,
            Start(5, &[1, 2]),
        ]);
    }

    #[test]
    fn a_run_gives_way_to_its_last_event() {
        run(&[
            Add(1, 10, "user_accept"),
            Add(2, 10, "user_drop"),
            Add(3, 10, "own_disabled_cancel"),
            Add(4, 10, "own_disabled"),
            Add(5, 20, "user_rate_set"),
            Add(6, 20, "user_rate_set_cancel"),
            Add(7, 20, "user_rate_set"),
            Add(8, 30, "user_redirect"),
            Add(9, 30, "user_redirect_cancel"),
            Runs(5, &[(4, &[1, 2, 3]), (7, &[5, 6]), (9, &[8])]),
            Lane(10, &[4]),
            Lane(20, &[7]),
            Runs(5, &[]),
            Finish(10, 4),
            Finish(20, 7),
            Finish(30, 9),
            Lane(10, &[]),
            Runs(5, &[]),
        ]);
        // The loaded count follows: superseded events leave memory.
        let mut lanes = Lanes::default();
        let now = Instant::now();
        for (id, cmd) in [(1, "user_accept"), (2, "user_drop"), (3, "user_accept")] {
            lanes.insert(ev(id, 10, cmd), None, false, now);
        }
        let take = lanes.take_ready(1, group).pop().unwrap();
        assert_eq!(
            lanes.get(10, 3).map(|e| e.cmd.as_str()),
            Some("user_accept")
        );
        lanes.superseded(10, &take.supersedes);
        assert_eq!(lanes.loaded(), 1);
    }

    #[test]
    fn the_event_in_flight_is_never_superseded() {
        run(&[
            Add(1, 10, "user_accept"),
            Start(5, &[1]),
            Add(2, 10, "user_drop"),
            Add(3, 10, "user_accept"),
            // 1 runs: its lane gives nothing; the run starts after it.
            Runs(5, &[]),
            Finish(10, 1),
            Runs(5, &[(3, &[2])]),
            Finish(10, 3),
            // Rebuilt while an event runs: it comes back running, at the head.
            Add(4, 10, "user_drop"),
            Start(5, &[4]),
            Add(5, 10, "user_accept"),
            Add(6, 10, "user_drop"),
            Clear,
            AddRunning(4, 10, "user_drop"),
            Add(5, 10, "user_accept"),
            Add(6, 10, "user_drop"),
            Runs(5, &[]),
            Finish(10, 4),
            Runs(5, &[(6, &[5])]),
        ]);
    }

    #[test]
    fn another_cmd_ends_the_run() {
        run(&[
            Add(1, 10, "user_accept"),
            Add(2, 10, "user_drop"),
            // Another group, then no group at all.
            Add(3, 10, "user_redirect"),
            Add(4, 10, "user_accept"),
            Add(5, 10, "user_add"),
            Add(6, 10, "user_drop"),
            Add(7, 10, "user_accept"),
            Runs(5, &[(2, &[1])]),
            Finish(10, 2),
            Runs(5, &[(3, &[])]),
            Finish(10, 3),
            Runs(5, &[(4, &[])]),
            Finish(10, 4),
            Runs(5, &[(5, &[])]),
            Finish(10, 5),
            Runs(5, &[(7, &[6])]),
        ]);
    }

    #[test]
    fn user_info_neither_breaks_nor_joins_a_run() {
        run(&[
            // In id order it sits inside the run; it jumped ahead of it.
            Add(1, 10, "user_accept"),
            Add(2, 10, "user_info"),
            Add(3, 10, "user_drop"),
            Lane(10, &[2, 1, 3]),
            // Alone, although `group` gives it the run's group.
            Runs(5, &[(2, &[])]),
            Finish(10, 2),
            Runs(5, &[(3, &[1])]),
            Finish(10, 3),
            // Arriving while an event runs: behind it, ahead of the waiting run.
            Add(4, 10, "user_drop"),
            Start(5, &[4]),
            Add(5, 10, "user_accept"),
            Add(6, 10, "user_info"),
            Add(7, 10, "user_drop"),
            Lane(10, &[4, 6, 5, 7]),
            Finish(10, 4),
            Runs(5, &[(6, &[])]),
            Finish(10, 6),
            Runs(5, &[(7, &[5])]),
        ]);
    }

    #[test]
    fn tried_events_are_never_coalesced() {
        run(&[
            Add(1, 10, "user_accept"),
            Start(5, &[1]),
            Add(2, 10, "user_drop"),
            Add(3, 10, "user_accept"),
            // 1 waits for a retry: when its time comes it is sent, not superseded, and
            // the run behind it waits its turn.
            Retry(10, 1, 5),
            Runs(5, &[]),
            Wait(5),
            Runs(5, &[(1, &[])]),
            Finish(10, 1),
            Runs(5, &[(3, &[2])]),
            // The survivor retries: it is sent again, and what came meanwhile waits.
            Retry(10, 3, 5),
            Add(4, 10, "user_drop"),
            Wait(5),
            Runs(5, &[(3, &[])]),
            Finish(10, 3),
            Runs(5, &[(4, &[])]),
            Finish(10, 4),
            // An event tried before (a rebuild read it with its try count) ends a run.
            Add(5, 10, "user_accept"),
            AddTried(6, 10, "user_drop"),
            Add(7, 10, "user_accept"),
            Runs(5, &[(5, &[])]),
            Finish(10, 5),
            Runs(5, &[(6, &[])]),
            Finish(10, 6),
            Runs(5, &[(7, &[])]),
        ]);
    }

    #[test]
    fn a_foreign_lease_ends_a_run() {
        let mut lanes = Lanes::default();
        let now = Instant::now();
        lanes.insert(ev(1, 10, "user_accept"), None, false, now);
        let mut held = ev(2, 10, "user_drop");
        held.state = "running".into();
        lanes.insert(held, Some(now + Duration::from_secs(30)), false, now);
        lanes.insert(ev(3, 10, "user_accept"), None, false, now);
        let takes = lanes.take_ready(5, group);
        assert_eq!(
            takes,
            vec![Take {
                user_id: 10,
                event_id: 1,
                supersedes: vec![]
            }]
        );
    }

    #[test]
    fn a_group_of_one_and_coalescing_off_send_everything() {
        run(&[
            Add(1, 10, "user_accept"),
            Add(2, 10, "user_rate_set"),
            Add(3, 10, "user_redirect"),
            Runs(5, &[(1, &[])]),
            Finish(10, 1),
            Runs(5, &[(2, &[])]),
            Finish(10, 2),
            Runs(5, &[(3, &[])]),
            Finish(10, 3),
            Coalesce(false),
            Add(4, 20, "user_accept"),
            Add(5, 20, "user_drop"),
            Add(6, 20, "user_accept"),
            Start(5, &[4]),
            Finish(20, 4),
            Start(5, &[5]),
            // Turned on again: what is queued coalesces at the next take.
            Add(7, 20, "user_drop"),
            Finish(20, 5),
            Coalesce(true),
            Runs(5, &[(7, &[6])]),
        ]);
    }

    #[test]
    fn a_foreign_lease_is_not_released_by_the_nas_coming_up() {
        let mut lanes = Lanes::default();
        let now = Instant::now();
        let mut held = ev(1, 10, "block");
        held.state = "running".into();
        lanes.insert(held, Some(now + Duration::from_secs(30)), false, now);
        lanes.release_waiting_heads(now);
        assert!(lanes.take_ready(5, group).is_empty());
        lanes.fire_timers(now + Duration::from_secs(30));
        assert_eq!(heads(lanes.take_ready(5, group)), vec![(10, 1)]);
    }

    #[test]
    fn a_head_held_off_waits_then_starts() {
        let mut lanes = Lanes::default();
        let now = Instant::now();
        lanes.insert(ev(1, 10, "block"), None, false, now);
        assert_eq!(heads(lanes.take_ready(5, group)), vec![(10, 1)]);
        lanes.held_off(10, now + Duration::from_secs(5), now);
        assert!(lanes.take_ready(5, group).is_empty());
        assert_eq!(lanes.next_timer(), Some(now + Duration::from_secs(5)));
        lanes.fire_timers(now + Duration::from_secs(5));
        assert_eq!(heads(lanes.take_ready(5, group)), vec![(10, 1)]);
        // The database was away: put back, taken again.
        lanes.put_back(10, now + Duration::from_secs(5));
        assert_eq!(heads(lanes.take_ready(5, group)), vec![(10, 1)]);
    }

    #[test]
    fn loaded_counts_what_is_held() {
        let mut lanes = Lanes::default();
        let now = Instant::now();
        lanes.insert(ev(1, 10, "block"), None, false, now);
        lanes.insert(ev(2, 10, "unblock"), None, false, now);
        assert_eq!(lanes.loaded(), 2);
        lanes.take_ready(1, group);
        let started = lanes.started(10, 1, 3, 99).unwrap();
        assert_eq!(
            (
                started.try_count,
                started.claim_token,
                started.state.as_str()
            ),
            (3, Some(99), "running")
        );
        lanes.finished(10, 1, now);
        assert_eq!(lanes.loaded(), 1);
        // A discarded result frees the account but leaves the event for the rebuild.
        lanes.take_ready(1, group);
        lanes.started(10, 2, 1, 5);
        lanes.discarded(10, 2);
        assert_eq!(lanes.loaded(), 1);
        assert_eq!(lanes.lane(10), vec![2]);
    }
}
