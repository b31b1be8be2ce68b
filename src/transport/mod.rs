//! Ways of reaching a device. Each protocol is one file; the dispatcher sees only
//! `Reply` and its `Verdict`. Nothing here touches the database.

pub mod exec;
pub mod null;

/// What the device's answer means for the event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Applied: the event is done.
    Done,
    /// Not applied now but may be later (timeout, "postpone"): try again after a backoff.
    Retry(String),
    /// Will not succeed by repeating it: the event fails with this reason.
    Failed(String),
}

/// The result of sending one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The commands exactly as sent, copy-pasteable.
    pub commands: Vec<String>,
    /// What the device answered (stdout and stderr for scripts).
    pub answer: String,
    pub verdict: Verdict,
}

/// Keeps at most `max` bytes of device output, cut at a character boundary, so one
/// chatty device cannot fill the history table.
pub fn truncate_answer(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut cut = max;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push_str("\n[answer truncated]");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncates_on_char_boundary() {
        assert_eq!(truncate_answer("abc".into(), 10), "abc");
        assert_eq!(
            truncate_answer("abcdef".into(), 3),
            "abc\n[answer truncated]"
        );
        assert_eq!(truncate_answer("жжж".into(), 3), "ж\n[answer truncated]");
    }
}
