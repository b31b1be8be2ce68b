//! The connect backoff every connection pool (SSH, telnet, RouterOS API) shares: after
//! a failed connect, the next one waits 100 ms, doubled per further failure up to 5 s,
//! so a dead device is not hammered by every worker. The first connect that succeeds
//! ends the backoff and wakes every run waiting it out, so a device that is back is
//! used at once.

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// First delay after a failed connect; doubled per further failure.
pub const BACKOFF_START: Duration = Duration::from_millis(100);
/// Longest delay between connect attempts.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// The delay after `failures` failed connects in a row (pure).
pub fn backoff_delay(failures: u32) -> Duration {
    let shift = failures.saturating_sub(1).min(16);
    BACKOFF_START.saturating_mul(1 << shift).min(BACKOFF_MAX)
}

/// Why a connect was not even tried: the backoff ends after the caller's deadline.
#[derive(Debug, Clone, PartialEq)]
pub struct BackingOff<E> {
    /// The failure that started (or prolonged) the backoff.
    pub last_error: E,
    /// Failed connects in a row.
    pub failures: u32,
    /// Until the next connect may be tried.
    pub remaining: Duration,
}

struct State<E> {
    failures: u32,
    not_before: Option<Instant>,
    last_error: Option<E>,
}

/// One pool's backoff; `E` is what the pool remembers of the last failure.
pub struct ConnectBackoff<E> {
    state: Mutex<State<E>>,
    reconnected: Notify,
}

impl<E: Clone> Default for ConnectBackoff<E> {
    fn default() -> Self {
        ConnectBackoff {
            state: Mutex::new(State {
                failures: 0,
                not_before: None,
                last_error: None,
            }),
            reconnected: Notify::new(),
        }
    }
}

impl<E: Clone> ConnectBackoff<E> {
    fn lock(&self) -> MutexGuard<'_, State<E>> {
        // Plain values: a panic while holding the lock cannot leave them half-updated.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until a connect may be tried: at once when there is no backoff, else until
    /// it ends or another connect succeeds. When it would end after `deadline`, returns
    /// the failure behind it without waiting.
    pub async fn wait(&self, deadline: Instant) -> Result<(), BackingOff<E>> {
        let until = {
            let state = self.lock();
            let now = Instant::now();
            match (state.not_before, &state.last_error) {
                (Some(at), Some(last_error)) if at > now => {
                    if at > deadline {
                        return Err(BackingOff {
                            last_error: last_error.clone(),
                            failures: state.failures,
                            remaining: at - now,
                        });
                    }
                    at
                }
                _ => return Ok(()),
            }
        };
        tokio::select! {
            _ = tokio::time::sleep_until(until) => {}
            _ = self.reconnected.notified() => {}
        }
        Ok(())
    }

    /// A connect succeeded: the backoff ends and runs waiting it out go.
    pub fn succeeded(&self) {
        let mut state = self.lock();
        state.failures = 0;
        state.not_before = None;
        state.last_error = None;
        drop(state);
        self.reconnected.notify_waiters();
    }

    /// A connect failed: the next one waits longer. Returns the failures in a row.
    pub fn failed(&self, error: E) -> u32 {
        let mut state = self.lock();
        state.failures = state.failures.saturating_add(1);
        state.not_before = Some(Instant::now() + backoff_delay(state.failures));
        state.last_error = Some(error);
        state.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let cases = [(1, 100), (2, 200), (3, 400), (7, 5000), (100, 5000)];
        for (failures, ms) in cases {
            assert_eq!(
                backoff_delay(failures),
                Duration::from_millis(ms),
                "{failures}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn waits_out_the_delay_refuses_past_the_deadline_and_wakes_on_success() {
        let b: ConnectBackoff<&str> = ConnectBackoff::default();
        let far = Instant::now() + Duration::from_secs(60);
        assert_eq!(b.wait(far).await, Ok(()));
        assert_eq!(b.failed("refused"), 1);
        assert_eq!(b.failed("refused again"), 2);
        // 200 ms left, the deadline in 50 ms: not waited for.
        let refused = b.wait(Instant::now() + Duration::from_millis(50)).await;
        assert_eq!(
            refused,
            Err(BackingOff {
                last_error: "refused again",
                failures: 2,
                remaining: Duration::from_millis(200),
            })
        );
        // Within the deadline: waits the delay out.
        let started = Instant::now();
        assert_eq!(b.wait(far).await, Ok(()));
        assert_eq!(started.elapsed(), Duration::from_millis(200));
        // A success ends a wait early.
        b.failed("refused");
        let b = std::sync::Arc::new(b);
        let waiter = tokio::spawn({
            let b = b.clone();
            async move {
                let started = Instant::now();
                b.wait(far).await.map(|()| started.elapsed())
            }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        b.succeeded();
        assert_eq!(waiter.await.unwrap(), Ok(Duration::from_millis(10)));
        assert_eq!(b.wait(Instant::now()).await, Ok(()));
    }
}
