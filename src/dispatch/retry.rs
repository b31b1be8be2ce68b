//! The retry schedule: exponential backoff with jitter, capped.
//!
//! Attempt n (1-based, the attempt that just failed) waits `base * 2^(n-1)`, capped at
//! `cap`, then multiplied by a jitter factor in [0.8, 1.2] (and capped again), so that a
//! NAS that rejected a burst is not hit by the whole burst again at the same instant.
//! With the defaults (base 1s, cap 5m): ~1s, 2s, 4s, 8s, ... 256s, 300s.

use std::time::Duration;

/// Fraction of the delay by which jitter may move it either way.
pub const JITTER: f64 = 0.2;

/// The delay before the next attempt. `unit` is a random number in [0, 1).
pub fn backoff(attempt: i32, base: Duration, cap: Duration, unit: f64) -> Duration {
    let exp = attempt.saturating_sub(1).clamp(0, 30) as u32;
    let raw = base.as_secs_f64() * f64::from(1u32 << exp);
    let capped = raw.min(cap.as_secs_f64());
    let factor = 1.0 - JITTER + 2.0 * JITTER * unit.clamp(0.0, 1.0);
    Duration::from_secs_f64((capped * factor).min(cap.as_secs_f64()))
}

/// What to do after an attempt that can be retried.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Next {
    RetryAfter(Duration),
    GiveUp,
}

/// Attempt `try_count` failed in a retryable way: retry, or give up at `max_attempts`.
pub fn next_step(
    try_count: i32,
    max_attempts: i32,
    base: Duration,
    cap: Duration,
    unit: f64,
) -> Next {
    if try_count >= max_attempts {
        Next::GiveUp
    } else {
        Next::RetryAfter(backoff(try_count, base, cap, unit))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn schedule_table() {
        let cases = [
            // attempt, unit, expected
            (1, 0.5, Duration::from_secs(1)),
            (2, 0.5, S(2)),
            (3, 0.5, S(4)),
            (9, 0.5, S(256)),
            (10, 0.5, S(300)),
            (50, 0.5, S(300)),
            (1, 0.0, Duration::from_millis(800)),
            (1, 1.0, Duration::from_millis(1200)),
            (10, 1.0, S(300)),
            (0, 0.5, S(1)),
        ];
        for (attempt, unit, want) in cases {
            let got = backoff(attempt, S(1), S(300), unit);
            assert!(
                (got.as_secs_f64() - want.as_secs_f64()).abs() < 1e-9,
                "attempt {attempt} unit {unit}: got {got:?} want {want:?}"
            );
        }
    }

    #[test]
    fn gives_up_at_max() {
        assert_eq!(next_step(10, 10, S(1), S(300), 0.5), Next::GiveUp);
        assert_eq!(next_step(11, 10, S(1), S(300), 0.5), Next::GiveUp);
        assert_eq!(next_step(3, 10, S(1), S(300), 0.5), Next::RetryAfter(S(4)));
    }
}
