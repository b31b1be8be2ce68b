//! Judging what a CLI-like device answered (SSH, telnet, RouterOS API): the scheme's
//! failure, retry and benign patterns applied to each command's output. Pure.

use crate::scheme::AnswerPatterns;
use crate::transport::{CliResult, Reply, SessionError, Verdict};

/// The answer text for logs and history: each command's output, in order.
pub fn answer_text(result: &CliResult) -> String {
    let mut out = String::new();
    for ex in &result.exchanges {
        if ex.output.is_empty() {
            continue;
        }
        if !out.is_empty() {
            out.push('\n');
        }
        out.push_str(&ex.output);
    }
    out
}

/// What a session error means for the event: errors before anything reached the device
/// (connect, login, host key) make it `Unreachable`, which the NAS's circuit breaker
/// counts; the others (timeout, closed mid-way, protocol) are retried. A pool closed
/// while the run queued for a free session says nothing about the device: the event goes
/// back to its lane with the attempt not counted (`Requeue`).
pub fn session_error_verdict(error: &SessionError) -> Verdict {
    match error {
        SessionError::Connect(..)
        | SessionError::Auth(..)
        | SessionError::HostKeyChanged { .. }
        | SessionError::HostKeyUnknown { .. } => Verdict::Unreachable(error.to_string()),
        SessionError::Timeout(..) | SessionError::Closed(..) | SessionError::Protocol(..) => {
            Verdict::Retry(error.to_string())
        }
        SessionError::PoolClosed(..) | SessionError::LeaseLost(..) | SessionError::Resource(..) => {
            Verdict::Requeue(error.to_string())
        }
    }
}

/// Judges `result` for event cmd `cmd`: the first command whose output matches a
/// failure pattern (and no benign pattern of this cmd) fails the event; a retry pattern
/// or a session error retries it; otherwise it is done.
pub fn classify(cmd: &str, result: &CliResult, patterns: &AnswerPatterns) -> Verdict {
    let benign = patterns.benign.get(cmd);
    for ex in &result.exchanges {
        if benign.is_some_and(|list| list.iter().any(|re| re.is_match(&ex.output))) {
            continue;
        }
        for line in ex.output.lines() {
            if patterns.failure.iter().any(|re| re.is_match(line)) {
                return Verdict::Failed(format!(
                    "device refused `{}`: {}",
                    ex.command,
                    line.trim()
                ));
            }
            if patterns.retry.iter().any(|re| re.is_match(line)) {
                return Verdict::Retry(format!(
                    "device asked to retry `{}`: {}",
                    ex.command,
                    line.trim()
                ));
            }
        }
    }
    match &result.error {
        Some(e) => session_error_verdict(e),
        None => Verdict::Done,
    }
}

/// The whole reply of a CLI-like transport: the commands that reached the device (a
/// command that was in flight when the session broke is listed too, since the device
/// may have applied it), the answers, the verdict.
pub fn reply(
    cmd: &str,
    commands: &[String],
    result: &CliResult,
    patterns: &AnswerPatterns,
) -> Reply {
    let sent = if result.error.is_some() {
        commands
            .iter()
            .take((result.exchanges.len() + 1).min(commands.len()))
            .cloned()
            .collect()
    } else {
        commands.to_vec()
    };
    Reply {
        commands: sent,
        answer: answer_text(result),
        verdict: classify(cmd, result, patterns),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::Exchange;
    use std::collections::BTreeMap;

    fn patterns() -> AnswerPatterns {
        let re = |s: &str| regex::Regex::new(s).unwrap();
        let mut benign = BTreeMap::new();
        benign.insert("user_add".to_string(), vec![re("already have such entry")]);
        benign.insert("user_del".to_string(), vec![re("no such item")]);
        AnswerPatterns {
            failure: vec![re("^failure:"), re("no such item"), re("^% Invalid input")],
            retry: vec![re("(?i)device busy")],
            benign,
        }
    }

    fn result(outputs: &[&str], error: Option<SessionError>) -> CliResult {
        CliResult {
            exchanges: outputs
                .iter()
                .enumerate()
                .map(|(i, o)| Exchange {
                    command: format!("c{i}"),
                    output: o.to_string(),
                })
                .collect(),
            error,
        }
    }

    #[test]
    fn classify_table() {
        let p = patterns();
        let closed = SessionError::Closed("nas 1 (10.0.0.1:22)".into(), "eof".into());
        let refused =
            SessionError::Connect("nas 1 (10.0.0.1:22)".into(), "Connection refused".into());
        let rejected = SessionError::Auth("nas 1 (10.0.0.1:22)".into(), "admin".into());
        let pool_closed = SessionError::PoolClosed(
            "nas 1 (10.0.0.1:22)".into(),
            "the SSH session pool was closed".into(),
        );
        let short = SessionError::connect(
            "nas 1 (10.0.0.1:22)",
            &std::io::Error::from_raw_os_error(libc::EMFILE),
        );
        let lease_lost = crate::transport::gate::closed("nas 1 (10.0.0.1:22)", 1);
        let cases: Vec<(&str, CliResult, Verdict)> = vec![
            (
                "user_add",
                result(&[], Some(short.clone())),
                Verdict::Requeue(short.to_string()),
            ),
            (
                "user_add",
                result(&[""], Some(lease_lost.clone())),
                Verdict::Requeue(lease_lost.to_string()),
            ),
            ("user_add", result(&["", ""], None), Verdict::Done),
            (
                "user_add",
                result(&["failure: already have such entry"], None),
                Verdict::Done,
            ),
            (
                "user_drop",
                result(&["", "failure: already have such entry"], None),
                Verdict::Failed("device refused `c1`: failure: already have such entry".into()),
            ),
            ("user_del", result(&["no such item"], None), Verdict::Done),
            (
                "user_edit",
                result(&["no such item"], None),
                Verdict::Failed("device refused `c0`: no such item".into()),
            ),
            (
                "user_info",
                result(&["ok\n% Invalid input detected at '^' marker."], None),
                Verdict::Failed(
                    "device refused `c0`: % Invalid input detected at '^' marker.".into(),
                ),
            ),
            (
                "user_add",
                result(&["Device busy, try later"], None),
                Verdict::Retry("device asked to retry `c0`: Device busy, try later".into()),
            ),
            (
                "user_add",
                result(&[""], Some(closed.clone())),
                Verdict::Retry(closed.to_string()),
            ),
            (
                "user_add",
                result(&[], Some(refused.clone())),
                Verdict::Unreachable(refused.to_string()),
            ),
            (
                "user_add",
                result(&[], Some(rejected.clone())),
                Verdict::Unreachable(rejected.to_string()),
            ),
            (
                "user_add",
                result(&[], Some(pool_closed.clone())),
                Verdict::Requeue(pool_closed.to_string()),
            ),
        ];
        for (cmd, r, want) in cases {
            assert_eq!(classify(cmd, &r, &p), want, "{cmd} {r:?}");
        }
    }

    #[test]
    fn reply_lists_the_command_in_flight_when_the_session_broke() {
        let p = patterns();
        let commands = vec!["a".to_string(), "b".to_string(), "c".to_string()];
        let broken = result(
            &["ok"],
            Some(SessionError::Timeout(
                "nas 1".into(),
                "waiting for the prompt".into(),
            )),
        );
        let r = reply("user_add", &commands, &broken, &p);
        assert_eq!(r.commands, vec!["a", "b"]);
        assert_eq!(r.answer, "ok");
        assert!(matches!(r.verdict, Verdict::Retry(_)));
        let whole = reply("user_add", &commands, &result(&["x", "", "y"], None), &p);
        assert_eq!(whole.commands, commands);
        assert_eq!(whole.answer, "x\ny");
    }
}
