//! The per-NAS circuit breaker (pure): after `failures` attempts in a row that could not
//! reach the device, the NAS is *down*; while it is down its events wait and only one
//! probe attempt at a time is let through, at capped exponentially growing intervals.
//! The first attempt that reaches the device again closes the breaker.
//!
//! The owner of the NAS feeds it every attempt's reach ([`Breaker::record`]) and asks it
//! before starting attempts ([`Breaker::admit`]); transitions come back as
//! [`Transition`]s, which become a log line, a stats change and an alert.

use std::time::Duration;

use tokio::time::Instant;

/// `[breaker]` settings live with the rest of the config.
pub use crate::config::BreakerConfig;

/// Whether an attempt got to the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reach {
    /// The device answered (whatever it said).
    Reached,
    /// Nothing reached it: connection refused, timed out, login rejected, no RADIUS answer.
    Unreachable(String),
    /// Says nothing about the device (a bad template, a local script, shutdown).
    Unknown,
}

/// What the owner may start now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Up to the pool size.
    All,
    /// One probe attempt (the caller then calls [`Breaker::probe_started`]).
    Probe,
    /// Nothing before this instant (None: wait for the probe in flight).
    Wait(Option<Instant>),
}

/// A change of the NAS's state, reported once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    Down {
        reason: String,
        failures: u32,
    },
    Up {
        /// How long it was down.
        down_for: Duration,
        /// Probes that failed meanwhile.
        probes: u32,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Closed {
        streak: u32,
    },
    Open {
        since: Instant,
        next_probe: Instant,
        /// The wait before `next_probe`, doubled per failed probe.
        interval: Duration,
        probing: bool,
        probes: u32,
    },
}

#[derive(Debug, Clone)]
pub struct Breaker {
    config: BreakerConfig,
    state: State,
}

impl Breaker {
    pub fn new(config: BreakerConfig) -> Breaker {
        Breaker {
            config,
            state: State::Closed { streak: 0 },
        }
    }

    /// New settings (a resync): kept state, new thresholds; turning it off closes it.
    pub fn reconfigure(&mut self, config: BreakerConfig) {
        if !config.enabled() {
            self.state = State::Closed { streak: 0 };
        }
        self.config = config;
    }

    pub fn is_down(&self) -> bool {
        matches!(self.state, State::Open { .. })
    }

    pub fn admit(&self, now: Instant) -> Admit {
        match &self.state {
            State::Closed { .. } => Admit::All,
            State::Open { probing: true, .. } => Admit::Wait(None),
            State::Open { next_probe, .. } if *next_probe > now => Admit::Wait(Some(*next_probe)),
            State::Open { .. } => Admit::Probe,
        }
    }

    /// The probe attempt has been started.
    pub fn probe_started(&mut self) {
        if let State::Open { probing, .. } = &mut self.state {
            *probing = true;
        }
    }

    /// When the owner must look again (the next probe), if it waits for one.
    pub fn wake_at(&self) -> Option<Instant> {
        match &self.state {
            State::Open {
                next_probe,
                probing: false,
                ..
            } => Some(*next_probe),
            _ => None,
        }
    }

    /// Probe at once (the NAS's settings changed, which may be the fix).
    pub fn probe_now(&mut self, now: Instant) {
        if let State::Open {
            next_probe,
            probing: false,
            ..
        } = &mut self.state
        {
            *next_probe = now;
        }
    }

    /// A probe that was started could not run (its claim missed): allow another.
    pub fn probe_abandoned(&mut self) {
        if let State::Open { probing, .. } = &mut self.state {
            *probing = false;
        }
    }

    /// Records one finished attempt; returns the transition it caused, if any.
    pub fn record(&mut self, now: Instant, reach: &Reach) -> Option<Transition> {
        if !self.config.enabled() {
            return None;
        }
        match (&mut self.state, reach) {
            (_, Reach::Unknown) => None,
            (State::Closed { streak }, Reach::Reached) => {
                *streak = 0;
                None
            }
            (State::Closed { streak }, Reach::Unreachable(reason)) => {
                *streak += 1;
                if *streak < self.config.failures {
                    return None;
                }
                let failures = *streak;
                let interval = self.config.probe_first.min(self.config.probe_max);
                self.state = State::Open {
                    since: now,
                    next_probe: now + interval,
                    interval,
                    probing: false,
                    probes: 0,
                };
                Some(Transition::Down {
                    reason: reason.clone(),
                    failures,
                })
            }
            (State::Open { since, probes, .. }, Reach::Reached) => {
                let t = Transition::Up {
                    down_for: now.saturating_duration_since(*since),
                    probes: *probes,
                };
                self.state = State::Closed { streak: 0 };
                Some(t)
            }
            (
                State::Open {
                    next_probe,
                    interval,
                    probing,
                    probes,
                    ..
                },
                Reach::Unreachable(_),
            ) => {
                // Attempts started before the NAS went down also end here; only the
                // probe's failure moves the schedule on.
                if *probing {
                    *probing = false;
                    *probes += 1;
                    *interval = (*interval * 2).min(self.config.probe_max);
                    *next_probe = now + *interval;
                }
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(failures: u32) -> BreakerConfig {
        BreakerConfig {
            failures,
            probe_first: Duration::from_secs(1),
            probe_max: Duration::from_secs(4),
            hold_attempts: true,
        }
    }

    fn down(why: &str) -> Reach {
        Reach::Unreachable(why.into())
    }

    #[test]
    fn opens_after_threshold_and_probes_with_capped_backoff() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut b = Breaker::new(cfg(3));
        assert_eq!(b.record(t0, &down("refused")), None);
        assert_eq!(b.record(t0, &down("refused")), None);
        assert_eq!(b.admit(t0), Admit::All);
        assert_eq!(
            b.record(t0, &down("refused")),
            Some(Transition::Down {
                reason: "refused".into(),
                failures: 3
            })
        );
        assert!(b.is_down());
        assert_eq!(b.admit(t0), Admit::Wait(Some(t0 + s(1))));
        assert_eq!(b.wake_at(), Some(t0 + s(1)));
        // Late failures of attempts started before the trip do not move the schedule.
        assert_eq!(b.record(t0 + s(0), &down("refused")), None);
        assert_eq!(b.admit(t0 + s(1)), Admit::Probe);
        b.probe_started();
        assert_eq!(b.admit(t0 + s(1)), Admit::Wait(None));
        assert_eq!(b.wake_at(), None);
        // Failed probes: 2 s, 4 s, then capped at 4 s.
        let mut now = t0 + s(1);
        for wait in [2, 4, 4, 4] {
            assert_eq!(b.record(now, &down("refused")), None);
            assert_eq!(b.admit(now), Admit::Wait(Some(now + s(wait))));
            now += s(wait);
            assert_eq!(b.admit(now), Admit::Probe);
            b.probe_started();
        }
        assert_eq!(
            b.record(now, &Reach::Reached),
            Some(Transition::Up {
                down_for: now - t0,
                probes: 4
            })
        );
        assert_eq!(b.admit(now), Admit::All);
        assert!(!b.is_down());
    }

    #[test]
    fn a_success_resets_the_streak() {
        let t0 = Instant::now();
        let mut b = Breaker::new(cfg(2));
        assert_eq!(b.record(t0, &down("x")), None);
        assert_eq!(b.record(t0, &Reach::Reached), None);
        assert_eq!(b.record(t0, &down("x")), None);
        assert_eq!(b.record(t0, &Reach::Unknown), None);
        assert!(matches!(
            b.record(t0, &down("y")),
            Some(Transition::Down { failures: 2, .. })
        ));
    }

    #[test]
    fn turned_off_never_opens() {
        let t0 = Instant::now();
        let mut b = Breaker::new(cfg(0));
        for _ in 0..100 {
            assert_eq!(b.record(t0, &down("x")), None);
        }
        assert_eq!(b.admit(t0), Admit::All);
        // Turning it off while open closes it.
        let mut b = Breaker::new(cfg(1));
        assert!(b.record(t0, &down("x")).is_some());
        b.reconfigure(cfg(0));
        assert_eq!(b.admit(t0), Admit::All);
    }

    #[test]
    fn an_abandoned_probe_allows_another() {
        let t0 = Instant::now();
        let mut b = Breaker::new(cfg(1));
        b.record(t0, &down("x"));
        let later = t0 + Duration::from_secs(1);
        assert_eq!(b.admit(later), Admit::Probe);
        b.probe_started();
        b.probe_abandoned();
        assert_eq!(b.admit(later), Admit::Probe);
    }

    #[test]
    fn probe_now_skips_the_wait() {
        let t0 = Instant::now();
        let mut b = Breaker::new(cfg(1));
        b.record(t0, &down("x"));
        assert_eq!(b.admit(t0), Admit::Wait(Some(t0 + Duration::from_secs(1))));
        b.probe_now(t0);
        assert_eq!(b.admit(t0), Admit::Probe);
    }
}
