//! The sender's permission to write to a device, asked right before every command goes
//! out (each CLI or API command, each RADIUS request and retransmission), not only once
//! before the event: a daemon frozen in the middle of an event (SIGSTOP, a paused VM)
//! must not write the rest of it once it wakes after its lease on the NAS ran out.
//!
//! The owner's worker runs its send inside [`scope`] with a check of the daemon's lease
//! (a comparison with a monotonic deadline, no I/O). Sends outside a scope (`nasd
//! send`, the demo, tests of one transport) are always allowed.

use std::future::Future;
use std::sync::Arc;

use super::SessionError;

/// Whether the sender may write to the device now.
pub type Check = Arc<dyn Fn() -> bool + Send + Sync>;

tokio::task_local! {
    static GATE: Check;
}

/// Runs `send` with `check` asked before each command it writes.
pub async fn scope<F: Future>(check: Check, send: F) -> F::Output {
    GATE.scope(check, send).await
}

/// Whether the current send may write now (true outside a [`scope`]).
pub fn open() -> bool {
    GATE.try_with(|check| check()).unwrap_or(true)
}

/// The error of a run stopped by a closed gate before command `index` (0-based): the
/// event goes back to its lane (see `answer::session_error_verdict`).
pub fn closed(label: &str, index: usize) -> SessionError {
    SessionError::LeaseLost(
        label.to_string(),
        format!(
            "command {} not sent: this daemon's lease on the NAS may have run out",
            index + 1
        ),
    )
}

/// The error of a command stopped by a closed gate after a round trip that wrote
/// nothing of it (an SSH channel opened for it, a RouterOS `print` before its `set`).
pub fn closed_before(label: &str, command: &str) -> SessionError {
    SessionError::LeaseLost(
        label.to_string(),
        format!("`{command}` not sent: this daemon's lease on the NAS may have run out"),
    )
}

/// `Err(closed(..))` when the gate is closed before command `index`.
pub fn check(label: &str, index: usize) -> Result<(), SessionError> {
    if open() {
        Ok(())
    } else {
        Err(closed(label, index))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[tokio::test]
    async fn open_outside_a_scope_and_as_the_check_says_inside() {
        assert!(open());
        let flag = Arc::new(AtomicBool::new(true));
        let seen = flag.clone();
        let lease: Check = Arc::new(move || seen.load(Ordering::SeqCst));
        let answers = scope(lease, async {
            let first = open();
            flag.store(false, Ordering::SeqCst);
            let second = check("nas 1 (h:22)", 2);
            (first, second)
        })
        .await;
        assert!(answers.0);
        let err = answers.1.expect_err("closed");
        assert!(matches!(err, SessionError::LeaseLost(..)));
        assert_eq!(
            err.to_string(),
            "nas 1 (h:22): command 3 not sent: this daemon's lease on the NAS may have run out"
        );
        assert!(open(), "the scope ended");
    }
}
