//! The owner's pending events in memory (pure): one FIFO lane per account, the queue of
//! accounts whose head may start now, and the timers of heads that wait (a retry delay,
//! another owner's lease).
//!
//! The rules, each with a table test below:
//! - per account, one event at a time and in order: a lane starts its next event only
//!   after the previous one's result is recorded;
//! - an event waiting for a retry holds only its own lane, never another account's;
//! - `user_info` goes to the front of its lane (behind earlier `user_info`s), but never
//!   past an event in flight, also when the lanes are rebuilt while it runs.
//!
//! Nothing here does I/O or reads a clock: `now` is passed in.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};

use tokio::time::Instant;

use crate::model::StackEvent;

/// The cmd that jumps the queue of its account (an operator waits for it in the UI).
pub const PRIORITY_CMD: &str = "user_info";

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

    /// Up to `max` heads that may start now, as (user_id, event id), oldest ready first.
    /// Each must then be [`started`](Lanes::started), [`held_off`](Lanes::held_off) or
    /// [`put_back`](Lanes::put_back).
    pub fn take_ready(&mut self, max: usize) -> Vec<(i64, i64)> {
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
            if let Some(head) = lane.events.front() {
                heads.push((user_id, head.event.id));
            }
        }
        heads
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

    /// A taken head was claimed: it runs now, and its account starts nothing else.
    /// Returns the event as claimed (try count, state and token set).
    pub fn started(&mut self, user_id: i64, try_count: i32, token: i64) -> Option<StackEvent> {
        let head = self.lanes.get_mut(&user_id)?.events.front_mut()?;
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
        /// take up to n ready heads and start them all; expect these event ids
        Start(usize, &'static [i64]),
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

    fn run(steps: &[Step]) {
        let mut lanes = Lanes::default();
        let t0 = Instant::now();
        let mut now = t0;
        for (i, step) in steps.iter().enumerate() {
            lanes.fire_timers(now);
            match *step {
                Step::Add(id, user, cmd) => lanes.insert(ev(id, user, cmd), None, false, now),
                Step::AddRunning(id, user, cmd) => {
                    let mut e = ev(id, user, cmd);
                    e.state = "running".into();
                    lanes.insert(e, None, true, now)
                }
                Step::AddWaiting(id, user, cmd, secs) => lanes.insert(
                    ev(id, user, cmd),
                    Some(now + Duration::from_secs(secs)),
                    false,
                    now,
                ),
                Step::Start(n, want) => {
                    let heads = lanes.take_ready(n);
                    let ids: Vec<i64> = heads.iter().map(|(_, id)| *id).collect();
                    assert_eq!(ids, want, "step {i}: {step:?}");
                    for (user, _) in heads {
                        assert!(lanes.started(user, 1, 7).is_some(), "step {i}");
                    }
                }
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
    fn a_foreign_lease_is_not_released_by_the_nas_coming_up() {
        let mut lanes = Lanes::default();
        let now = Instant::now();
        let mut held = ev(1, 10, "block");
        held.state = "running".into();
        lanes.insert(held, Some(now + Duration::from_secs(30)), false, now);
        lanes.release_waiting_heads(now);
        assert!(lanes.take_ready(5).is_empty());
        lanes.fire_timers(now + Duration::from_secs(30));
        assert_eq!(lanes.take_ready(5), vec![(10, 1)]);
    }

    #[test]
    fn a_head_held_off_waits_then_starts() {
        let mut lanes = Lanes::default();
        let now = Instant::now();
        lanes.insert(ev(1, 10, "block"), None, false, now);
        assert_eq!(lanes.take_ready(5), vec![(10, 1)]);
        lanes.held_off(10, now + Duration::from_secs(5), now);
        assert!(lanes.take_ready(5).is_empty());
        assert_eq!(lanes.next_timer(), Some(now + Duration::from_secs(5)));
        lanes.fire_timers(now + Duration::from_secs(5));
        assert_eq!(lanes.take_ready(5), vec![(10, 1)]);
        // The database was away: put back, taken again.
        lanes.put_back(10, now + Duration::from_secs(5));
        assert_eq!(lanes.take_ready(5), vec![(10, 1)]);
    }

    #[test]
    fn loaded_counts_what_is_held() {
        let mut lanes = Lanes::default();
        let now = Instant::now();
        lanes.insert(ev(1, 10, "block"), None, false, now);
        lanes.insert(ev(2, 10, "unblock"), None, false, now);
        assert_eq!(lanes.loaded(), 2);
        lanes.take_ready(1);
        let started = lanes.started(10, 3, 99).unwrap();
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
        lanes.take_ready(1);
        lanes.started(10, 1, 5);
        lanes.discarded(10, 2);
        assert_eq!(lanes.loaded(), 1);
        assert_eq!(lanes.lane(10), vec![2]);
    }
}
