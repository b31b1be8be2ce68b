//! What one attempt's result means for its event (pure): finish it (done or failed) or
//! put it back for a later attempt, with the outcome text the NAS and account logs
//! show, the kind the statistics count, and what the circuit breaker learns from it.
//!
//! The owner calls [`decide`] for every result of a completion batch and turns the
//! plans into one fenced database transaction; nothing here does I/O or reads a clock
//! (the random unit for the jitter is passed in).

use std::time::Duration;

use super::breaker::Reach;
use super::retry::{Next, next_step};
use crate::config::Tuning;
use crate::duration::format_duration;
use crate::model::Outcome;
use crate::scheme::AnswerPatterns;
use crate::stats::AttemptKind;
use crate::transport::Verdict;

/// The settings that decide between retrying and giving up.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub max_attempts: i32,
    pub retry_base: Duration,
    pub retry_cap: Duration,
    /// An attempt that did not reach the device is not counted (`[breaker]`
    /// `hold_attempts`, and the breaker on): the event waits for the NAS.
    pub hold_attempts: bool,
}

impl Policy {
    pub fn from_config(cfg: &Tuning) -> Policy {
        Policy {
            max_attempts: cfg.max_attempts,
            retry_base: cfg.retry_base,
            retry_cap: cfg.retry_cap,
            hold_attempts: cfg.breaker.enabled() && cfg.breaker.hold_attempts,
        }
    }
}

/// The next step of an event after an attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// The event leaves the stack for the history with this outcome.
    Finish {
        outcome: Outcome,
        error: Option<String>,
    },
    /// The event goes back to its lane and is tried again after `delay`; with `refund`
    /// the attempt is not counted (its try count goes back down by one).
    Reschedule {
        delay: Duration,
        error: String,
        refund: bool,
    },
}

/// [`Plan`] with what the logs and the statistics say about it.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub plan: Plan,
    /// The outcome as the NAS and account logs write it (`done`, `failed: ...`,
    /// `retry in 2s: ...`).
    pub text: String,
    pub kind: AttemptKind,
}

impl Decision {
    /// The event's try count once this decision is recorded: one less when the attempt
    /// is refunded.
    pub fn try_count_after(&self, try_count: i32) -> i32 {
        match self.plan {
            Plan::Reschedule { refund: true, .. } => try_count - 1,
            _ => try_count,
        }
    }
}

impl Decision {
    /// A done attempt whose answer matched one of the scheme's benign patterns for its
    /// cmd ([`benign_match`]) says so in its outcome, `done (benign: already have such
    /// entry)`, so that the logs tell a real change from a state that was already there.
    /// Any other decision is kept as it is.
    pub fn benign(mut self, matched: Option<&str>) -> Decision {
        if let (
            Plan::Finish {
                outcome: Outcome::Done,
                ..
            },
            Some(matched),
        ) = (&self.plan, matched)
        {
            self.text = format!("done (benign: {matched})");
        }
        self
    }
}

/// The text of `answer` that one of the scheme's benign patterns for `cmd` matched (an
/// answer that reads like a failure but means the wanted state is already there, e.g.
/// `already have such entry` on an add), on one line; None when none matched. Pure.
pub fn benign_match(cmd: &str, answer: &str, patterns: &AnswerPatterns) -> Option<String> {
    patterns
        .benign
        .get(cmd)?
        .iter()
        .find_map(|re| re.find(answer))
        .map(|m| m.as_str().split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|text| !text.is_empty())
}

/// What to do with an event whose attempt number `try_count` ended with `verdict`.
/// `sent` tells whether any command went out (the reply lists commands); `unit` is a
/// random number in [0, 1) for the jitter.
pub fn decide(
    verdict: &Verdict,
    sent: bool,
    try_count: i32,
    policy: &Policy,
    unit: f64,
) -> Decision {
    let finish = |outcome, error: Option<String>, kind| {
        let text = match (&outcome, &error) {
            (Outcome::Done, _) => "done".to_string(),
            (Outcome::Failed, Some(why)) => format!("failed: {why}"),
            (Outcome::Failed, None) => "failed".to_string(),
            // `decide` judges an attempt; a superseded event never had one.
            (Outcome::Superseded, _) => "superseded".to_string(),
        };
        Decision {
            plan: Plan::Finish { outcome, error },
            text,
            kind,
        }
    };
    let reschedule = |delay: Duration, why: &str, refund: bool, note: &str| Decision {
        text: format!("retry in {}{note}: {why}", format_duration(delay)),
        plan: Plan::Reschedule {
            delay,
            error: why.to_string(),
            refund,
        },
        kind: AttemptKind::Retry,
    };
    // A refunded attempt waits about one base delay; the breaker, not the retry
    // schedule, decides when a down NAS is tried again.
    let short_wait = || policy.retry_base.mul_f64(0.8 + 0.4 * unit);
    match verdict {
        Verdict::Done => finish(Outcome::Done, None, AttemptKind::Done),
        Verdict::Failed(why) => finish(
            Outcome::Failed,
            Some(why.clone()),
            AttemptKind::Failed { reached: sent },
        ),
        // Nothing was attempted: back to the lane, the attempt not counted, whatever
        // the breaker settings.
        Verdict::Requeue(why) => reschedule(
            short_wait(),
            why,
            true,
            " (nothing was sent, attempt not counted)",
        ),
        Verdict::Unreachable(why) if policy.hold_attempts => reschedule(
            short_wait(),
            why,
            true,
            " (NAS unreachable, attempt not counted)",
        ),
        Verdict::Retry(why) | Verdict::Unreachable(why) => match next_step(
            try_count,
            policy.max_attempts,
            policy.retry_base,
            policy.retry_cap,
            unit,
        ) {
            Next::GiveUp => finish(
                Outcome::Failed,
                Some(format!("gave up after {try_count} attempts: {why}")),
                AttemptKind::GaveUp,
            ),
            Next::RetryAfter(delay) => reschedule(delay, why, false, ""),
        },
    }
}

/// The verdict of an attempt that must not run: an event claimed again after its last
/// allowed attempt (attempts interrupted by restarts or expired leases) fails without
/// being sent.
pub fn before_attempt(try_count: i32, max_attempts: i32) -> Option<Verdict> {
    (try_count > max_attempts).then(|| {
        Verdict::Failed(format!(
            "gave up: attempt {try_count} is over max_attempts {max_attempts} (attempts were interrupted)"
        ))
    })
}

/// What the circuit breaker learns from an attempt: `remote` tells whether the NAS's
/// device is reached over the network (a local script's answer proves nothing), `sent`
/// whether any command went out.
pub fn reach(verdict: &Verdict, sent: bool, remote: bool) -> Reach {
    match verdict {
        Verdict::Unreachable(why) => Reach::Unreachable(why.clone()),
        _ if remote && sent => Reach::Reached,
        _ => Reach::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_benign_answer_is_named_in_the_outcome() {
        let re = |p: &str| regex::Regex::new(p).expect("pattern");
        let mut patterns = AnswerPatterns::default();
        patterns.benign.insert(
            "user_add".into(),
            vec![re("no such item"), re("already have such entry")],
        );
        let answer = "failure: already have such entry";
        let matched = benign_match("user_add", answer, &patterns);
        assert_eq!(matched.as_deref(), Some("already have such entry"));
        // Another cmd's patterns, or no match: nothing to say.
        assert_eq!(benign_match("user_del", answer, &patterns), None);
        assert_eq!(benign_match("user_add", "ok", &patterns), None);
        let done = decide(&Verdict::Done, true, 1, &policy(true), 0.5);
        assert_eq!(done.text, "done");
        let benign = done.clone().benign(matched.as_deref());
        assert_eq!(benign.text, "done (benign: already have such entry)");
        assert_eq!(benign.plan, done.plan);
        assert_eq!(benign.kind, done.kind);
        assert_eq!(done.clone().benign(None), done);
        // Only a done attempt is benign.
        let failed = decide(&Verdict::Failed("x".into()), true, 1, &policy(true), 0.5);
        assert_eq!(
            failed.clone().benign(Some("already have such entry")),
            failed
        );
        // The JSON `outcome` still reads it as done.
        assert_eq!(
            crate::journal::classify_outcome(&benign.text),
            ("done", None)
        );
    }

    const S: fn(u64) -> Duration = Duration::from_secs;

    fn policy(hold_attempts: bool) -> Policy {
        Policy {
            max_attempts: 3,
            retry_base: S(1),
            retry_cap: S(300),
            hold_attempts,
        }
    }

    fn finish(outcome: Outcome, error: Option<&str>) -> Plan {
        Plan::Finish {
            outcome,
            error: error.map(String::from),
        }
    }

    fn reschedule(delay: Duration, error: &str, refund: bool) -> Plan {
        Plan::Reschedule {
            delay,
            error: error.to_string(),
            refund,
        }
    }

    #[test]
    fn verdict_to_plan_text_and_kind() {
        let retry = || Verdict::Retry("timeout".into());
        let down = || Verdict::Unreachable("cannot connect".into());
        let cases: Vec<(Verdict, bool, i32, bool, Plan, &str, AttemptKind)> = vec![
            // verdict, sent, try_count, hold_attempts -> plan, log text, stats kind
            (
                Verdict::Done,
                true,
                1,
                true,
                finish(Outcome::Done, None),
                "done",
                AttemptKind::Done,
            ),
            (
                Verdict::Failed("exit 1".into()),
                true,
                1,
                true,
                finish(Outcome::Failed, Some("exit 1")),
                "failed: exit 1",
                AttemptKind::Failed { reached: true },
            ),
            (
                Verdict::Failed("undefined value ip".into()),
                false,
                2,
                false,
                finish(Outcome::Failed, Some("undefined value ip")),
                "failed: undefined value ip",
                AttemptKind::Failed { reached: false },
            ),
            (
                retry(),
                true,
                1,
                true,
                reschedule(S(1), "timeout", false),
                "retry in 1s: timeout",
                AttemptKind::Retry,
            ),
            (
                retry(),
                true,
                2,
                true,
                reschedule(S(2), "timeout", false),
                "retry in 2s: timeout",
                AttemptKind::Retry,
            ),
            // Give-up after max_attempts (3), whatever hold_attempts says.
            (
                retry(),
                true,
                3,
                true,
                finish(Outcome::Failed, Some("gave up after 3 attempts: timeout")),
                "failed: gave up after 3 attempts: timeout",
                AttemptKind::GaveUp,
            ),
            (
                retry(),
                true,
                4,
                false,
                finish(Outcome::Failed, Some("gave up after 4 attempts: timeout")),
                "failed: gave up after 4 attempts: timeout",
                AttemptKind::GaveUp,
            ),
            // Unreachable without hold_attempts: an ordinary retry, and it gives up.
            (
                down(),
                false,
                1,
                false,
                reschedule(S(1), "cannot connect", false),
                "retry in 1s: cannot connect",
                AttemptKind::Retry,
            ),
            (
                down(),
                false,
                3,
                false,
                finish(
                    Outcome::Failed,
                    Some("gave up after 3 attempts: cannot connect"),
                ),
                "failed: gave up after 3 attempts: cannot connect",
                AttemptKind::GaveUp,
            ),
            // With hold_attempts: refunded, and never given up.
            (
                down(),
                false,
                1,
                true,
                reschedule(S(1), "cannot connect", true),
                "retry in 1s (NAS unreachable, attempt not counted): cannot connect",
                AttemptKind::Retry,
            ),
            (
                down(),
                false,
                3,
                true,
                reschedule(S(1), "cannot connect", true),
                "retry in 1s (NAS unreachable, attempt not counted): cannot connect",
                AttemptKind::Retry,
            ),
            // Requeue: refunded whatever the breaker settings, even at the last attempt.
            (
                Verdict::Requeue("pool closed".into()),
                false,
                3,
                false,
                reschedule(S(1), "pool closed", true),
                "retry in 1s (nothing was sent, attempt not counted): pool closed",
                AttemptKind::Retry,
            ),
            (
                Verdict::Requeue("pool closed".into()),
                false,
                1,
                true,
                reschedule(S(1), "pool closed", true),
                "retry in 1s (nothing was sent, attempt not counted): pool closed",
                AttemptKind::Retry,
            ),
        ];
        for (verdict, sent, try_count, hold, plan, text, kind) in cases {
            let got = decide(&verdict, sent, try_count, &policy(hold), 0.5);
            let want = Decision {
                plan,
                text: text.to_string(),
                kind,
            };
            assert_eq!(
                got, want,
                "{verdict:?} sent={sent} try={try_count} hold={hold}"
            );
        }
    }

    #[test]
    fn jitter_moves_the_delay_both_ways() {
        let cases = [
            // verdict, unit -> delay
            (Verdict::Retry("t".into()), 0.0, Duration::from_millis(1600)),
            (Verdict::Retry("t".into()), 1.0, Duration::from_millis(2400)),
            (
                Verdict::Requeue("r".into()),
                0.0,
                Duration::from_millis(800),
            ),
            (
                Verdict::Unreachable("u".into()),
                1.0,
                Duration::from_millis(1200),
            ),
        ];
        for (verdict, unit, want) in cases {
            let got = decide(&verdict, false, 2, &policy(true), unit);
            let Plan::Reschedule { delay, .. } = got.plan else {
                panic!("{verdict:?}: not rescheduled: {got:?}");
            };
            assert!(
                (delay.as_secs_f64() - want.as_secs_f64()).abs() < 1e-9,
                "{verdict:?} unit {unit}: got {delay:?} want {want:?}"
            );
        }
        let text = decide(&Verdict::Requeue("r".into()), false, 1, &policy(true), 0.0).text;
        assert_eq!(
            text,
            "retry in 800ms (nothing was sent, attempt not counted): r"
        );
    }

    #[test]
    fn refund_gives_the_attempt_back() {
        let cases = [
            // verdict, hold_attempts, try_count -> try count after
            (Verdict::Unreachable("u".into()), true, 2, 1),
            (Verdict::Unreachable("u".into()), false, 2, 2),
            (Verdict::Requeue("r".into()), false, 1, 0),
            (Verdict::Retry("t".into()), true, 2, 2),
            (Verdict::Done, true, 1, 1),
        ];
        for (verdict, hold, try_count, want) in cases {
            let d = decide(&verdict, false, try_count, &policy(hold), 0.5);
            assert_eq!(
                d.try_count_after(try_count),
                want,
                "{verdict:?} hold={hold}"
            );
        }
    }

    #[test]
    fn over_max_attempts_fails_unsent() {
        assert_eq!(before_attempt(3, 3), None);
        assert_eq!(
            before_attempt(4, 3),
            Some(Verdict::Failed(
                "gave up: attempt 4 is over max_attempts 3 (attempts were interrupted)".into()
            ))
        );
    }

    #[test]
    fn reach_table() {
        let cases = [
            // verdict, sent, remote -> reach
            (
                Verdict::Unreachable("refused".into()),
                false,
                true,
                Reach::Unreachable("refused".into()),
            ),
            (Verdict::Done, true, true, Reach::Reached),
            (
                Verdict::Failed("no such user".into()),
                true,
                true,
                Reach::Reached,
            ),
            (Verdict::Retry("timeout".into()), true, true, Reach::Reached),
            // A bad template sent nothing: it says nothing about the device.
            (
                Verdict::Failed("render".into()),
                false,
                true,
                Reach::Unknown,
            ),
            // A local script's answer proves nothing about the NAS.
            (Verdict::Done, true, false, Reach::Unknown),
            (
                Verdict::Requeue("closed".into()),
                false,
                true,
                Reach::Unknown,
            ),
        ];
        for (verdict, sent, remote, want) in cases {
            assert_eq!(
                reach(&verdict, sent, remote),
                want,
                "{verdict:?} sent={sent} remote={remote}"
            );
        }
    }
}
