//! The lines themselves, as pure functions: the text lines of an attempt or a
//! discarded result, their JSON records, and the file-name form of a NAS.

use std::time::Duration;

use chrono::{DateTime, Local, SecondsFormat};
use serde::Serialize;

/// Program name in daemon-log lines: operators grep for it, as with the old daemon.
pub const PROGRAM: &str = "nas_event_daemon";
/// Timestamp format that starts every line: Carbon's `YYYY-MM-DD HH:MM:SS` (what
/// operators' scripts cut at) with the milliseconds after it, `2026-12-03 10:11:12.345`.
pub const TIME_FORMAT: &str = "%Y-%m-%d %H:%M:%S%.3f";
/// A moment named inside a message (`since 2026-12-03 10:11:12`): to the second.
pub const SECONDS_FORMAT: &str = "%Y-%m-%d %H:%M:%S";
/// Longest sanitized NAS name kept in a file name, well below the usual 255-byte limit.
const MAX_NAME_LEN: usize = 100;

/// The NAS an attempt went to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NasTarget {
    pub id: i64,
    pub name: String,
    pub ip: String,
}

/// The account an attempt was for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AccountTarget {
    pub abonent_id: Option<i64>,
    pub user_id: i64,
}

/// One try of one event, as the dispatcher saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    pub event_id: i64,
    pub cmd: String,
    pub try_count: i32,
    /// Exactly as sent, so an operator can copy-paste them into a shell.
    pub commands: Vec<String>,
    /// Device output (may be multi-line, may be empty).
    pub answer: String,
    /// E.g. "done", "retry in 2s: exit 254", "failed: scheme x does not define cmd y".
    pub outcome: String,
    pub duration: Duration,
}

fn attempt_prefix(nas: &NasTarget, account: &AccountTarget, attempt: &Attempt) -> String {
    format!(
        "nas={} event={} user_id={} cmd={} try={}",
        nas.id,
        attempt.event_id,
        account.user_id,
        one_line(&attempt.cmd),
        attempt.try_count
    )
}

fn outcome_line(prefix: &str, attempt: &Attempt) -> String {
    format!(
        "{prefix} outcome: {} ({} ms)",
        one_line(&attempt.outcome),
        attempt.duration.as_millis()
    )
}

/// The lines of one attempt, without timestamps: one `send:` line per command line, one
/// `answer:` line per non-empty answer line, then the `outcome:` line.
pub fn format_attempt(nas: &NasTarget, account: &AccountTarget, attempt: &Attempt) -> Vec<String> {
    let prefix = attempt_prefix(nas, account, attempt);
    let mut lines = Vec::new();
    for command in &attempt.commands {
        for part in split_lines(command) {
            lines.push(format!("{prefix} send: {part}"));
        }
    }
    for part in split_lines(&attempt.answer) {
        lines.push(format!("{prefix} answer: {part}"));
    }
    lines.push(outcome_line(&prefix, attempt));
    lines
}

/// Why a discarded result is not recorded (the text after `discarded:`).
pub const DISCARDED_REASON: &str =
    "the claim went stale (another owner holds the event); the result was not recorded";

/// The NAS-log line (without timestamp) for a result discarded by the claim fence:
/// `nas=N event=E user_id=U cmd=C try=T discarded: the claim went stale ... (D ms)`.
pub fn format_discarded(nas: &NasTarget, account: &AccountTarget, attempt: &Attempt) -> String {
    format!(
        "{} discarded: {DISCARDED_REASON} ({} ms)",
        attempt_prefix(nas, account, attempt),
        attempt.duration.as_millis()
    )
}

/// One JSON record for a discarded result (no trailing newline).
#[derive(Serialize)]
struct DiscardedRecord<'a> {
    ts: String,
    kind: &'static str,
    level: &'static str,
    nas_id: i64,
    nas_name: &'a str,
    nas_ip: &'a str,
    abonent_id: Option<i64>,
    user_id: i64,
    event_id: i64,
    cmd: String,
    #[serde(rename = "try")]
    try_count: i32,
    reason: &'static str,
    message: String,
}

/// A discarded result as JSON: `kind` = `discarded`, `level` = `warn`, the NAS, account
/// and event fields of an attempt record, `reason`, and the text line as `message`.
pub fn discarded_json(
    ts: &DateTime<Local>,
    nas: &NasTarget,
    account: &AccountTarget,
    attempt: &Attempt,
) -> String {
    to_json(&DiscardedRecord {
        ts: rfc3339(ts),
        kind: "discarded",
        level: "warn",
        nas_id: nas.id,
        nas_name: &nas.name,
        nas_ip: &nas.ip,
        abonent_id: account.abonent_id,
        user_id: account.user_id,
        event_id: attempt.event_id,
        cmd: one_line(&attempt.cmd),
        try_count: attempt.try_count,
        reason: DISCARDED_REASON,
        message: format_discarded(nas, account, attempt),
    })
}

/// What an outcome text says, for the JSON `outcome` field and its reason (`error`):
/// `done`, `retry` (will be tried again), `failed` (for good), `superseded` (never sent:
/// a later event of its coalesce group replaced it), or `other` for a text this
/// function does not know (the full text is always in `outcome_text`).
pub fn classify_outcome(text: &str) -> (&'static str, Option<&str>) {
    let (head, reason) = match text.split_once(": ") {
        Some((head, reason)) => (head, Some(reason)),
        None => (text, None),
    };
    if head.starts_with("done") {
        ("done", None)
    } else if head.starts_with("superseded") {
        ("superseded", None)
    } else if head.starts_with("retry") || head.ends_with("would retry") {
        ("retry", reason)
    } else if head.starts_with("failed") || head.ends_with("failed") {
        ("failed", reason)
    } else {
        ("other", None)
    }
}

fn rfc3339(ts: &DateTime<Local>) -> String {
    ts.to_rfc3339_opts(SecondsFormat::Millis, false)
}

/// One JSON daemon-log record (no trailing newline).
#[derive(Serialize)]
struct DaemonRecord<'a> {
    ts: String,
    kind: &'static str,
    level: &'static str,
    host: &'a str,
    program: &'static str,
    pid: u32,
    message: String,
}

/// One JSON attempt record (no trailing newline). Field names are part of the interface
/// (README "Logs"): add fields, never rename them.
#[derive(Serialize)]
struct AttemptRecord<'a> {
    ts: String,
    kind: &'static str,
    level: &'static str,
    nas_id: i64,
    nas_name: &'a str,
    nas_ip: &'a str,
    abonent_id: Option<i64>,
    user_id: i64,
    event_id: i64,
    cmd: String,
    #[serde(rename = "try")]
    try_count: i32,
    outcome: &'static str,
    error: Option<String>,
    outcome_text: String,
    duration_ms: u64,
    commands: &'a [String],
    answer: String,
    message: String,
}

/// A daemon-log line as JSON: `ts`, `kind` = `daemon`, `level`, `host`, `program`, `pid`,
/// `message`.
pub fn daemon_json(ts: &DateTime<Local>, host: &str, pid: u32, message: &str) -> String {
    to_json(&DaemonRecord {
        ts: rfc3339(ts),
        kind: "daemon",
        level: "info",
        host,
        program: PROGRAM,
        pid,
        message: one_line(message),
    })
}

/// One attempt as a JSON line: the same information as [`format_attempt`]'s lines, with
/// the commands as an array (exactly as sent) and the answer as one string (lines joined
/// by `\n`, empty lines dropped). `message` is the text format's `outcome:` line.
pub fn attempt_json(
    ts: &DateTime<Local>,
    nas: &NasTarget,
    account: &AccountTarget,
    attempt: &Attempt,
) -> String {
    let outcome_text = one_line(&attempt.outcome);
    let (outcome, error) = classify_outcome(&outcome_text);
    let level = match outcome {
        "retry" => "warn",
        "failed" => "error",
        _ => "info",
    };
    to_json(&AttemptRecord {
        ts: rfc3339(ts),
        kind: "attempt",
        level,
        nas_id: nas.id,
        nas_name: &nas.name,
        nas_ip: &nas.ip,
        abonent_id: account.abonent_id,
        user_id: account.user_id,
        event_id: attempt.event_id,
        cmd: one_line(&attempt.cmd),
        try_count: attempt.try_count,
        outcome,
        error: error.map(str::to_owned),
        duration_ms: u64::try_from(attempt.duration.as_millis()).unwrap_or(u64::MAX),
        commands: &attempt.commands,
        answer: split_lines(&attempt.answer).collect::<Vec<_>>().join("\n"),
        message: outcome_line(&attempt_prefix(nas, account, attempt), attempt),
        outcome_text,
    })
}

/// An event that failed before it reached any NAS: expansion found no account for its
/// user, or no NAS for its `nas_ip` / the account's `nas_id`. `id` is the id it was
/// enqueued under (what `nasd enqueue` and the API answered).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct NotExpanded<'a> {
    pub id: i64,
    pub cmd: &'a str,
    pub reason: &'a str,
}

/// The account-log line (without timestamp) of an event that failed at expansion, in
/// the shape of an attempt's `outcome:` line: `nas=- event=- user_id=U cmd=C try=0
/// outcome: failed (not expanded, nothing was sent; enqueued as id I): REASON`. Pure.
pub(super) fn format_not_expanded(account: &AccountTarget, event: &NotExpanded<'_>) -> String {
    format!(
        "nas=- event=- user_id={} cmd={} try=0 outcome: failed (not expanded, nothing was sent; \
         enqueued as id {}): {}",
        account.user_id,
        one_line(event.cmd),
        event.id,
        one_line(event.reason)
    )
}

/// The daemon-log message of an event that failed at expansion. Pure.
pub(super) fn not_expanded_message(account: &AccountTarget, event: &NotExpanded<'_>) -> String {
    format!(
        "event id={} user_id={} abonent_id={} cmd={} failed at expansion, nothing was sent: {}",
        event.id,
        account.user_id,
        account
            .abonent_id
            .map_or_else(|| "-".to_string(), |a| a.to_string()),
        one_line(event.cmd),
        one_line(event.reason)
    )
}

/// One JSON record for an event that failed at expansion (no trailing newline).
#[derive(Serialize)]
struct NotExpandedRecord<'a> {
    ts: String,
    kind: &'static str,
    level: &'static str,
    abonent_id: Option<i64>,
    user_id: i64,
    id: i64,
    cmd: String,
    outcome: &'static str,
    error: &'a str,
    message: String,
}

/// An event that failed at expansion as JSON: `kind` = `not_expanded`, `level` =
/// `error`, `outcome` = `failed`, the account, the enqueued `id`, `cmd`, the reason as
/// `error` and the text line as `message`.
pub(super) fn not_expanded_json(
    ts: &DateTime<Local>,
    account: &AccountTarget,
    event: &NotExpanded<'_>,
) -> String {
    to_json(&NotExpandedRecord {
        ts: rfc3339(ts),
        kind: "not_expanded",
        level: "error",
        abonent_id: account.abonent_id,
        user_id: account.user_id,
        id: event.id,
        cmd: one_line(event.cmd),
        outcome: "failed",
        error: event.reason,
        message: format_not_expanded(account, event),
    })
}

// Kept beside its lines while `journal/mod.rs` is being changed elsewhere; it belongs
// with `Journal::attempt` there.
impl super::Journal {
    /// Writes that an event failed at expansion (no account for its user, no NAS for
    /// it) to the daemon log ([`not_expanded_message`]) and to the account's log, only
    /// there of the attempt logs since no NAS was involved ([`format_not_expanded`], or
    /// one [`not_expanded_json`] line). `id` is the id it was enqueued under.
    pub fn not_expanded(&self, account: &AccountTarget, id: i64, cmd: &str, reason: &str) {
        let event = NotExpanded { id, cmd, reason };
        self.daemon(&not_expanded_message(account, &event));
        let now = Local::now();
        let settings = self.settings();
        let text = match settings.format {
            super::LogFormat::Text => format!(
                "{} {}\n",
                now.format(TIME_FORMAT),
                format_not_expanded(account, &event)
            ),
            super::LogFormat::Json => not_expanded_json(&now, account, &event) + "\n",
        };
        self.send(
            vec![super::writer::Target {
                path: self.account_log_path(account),
                max_size: settings.account_max_size,
            }],
            text,
        );
    }
}

fn to_json<T: Serialize>(record: &T) -> String {
    // Serializing plain strings and numbers into a String cannot fail; an empty object
    // keeps the line valid JSON should it ever do so.
    serde_json::to_string(record).unwrap_or_else(|_| "{}".to_owned())
}

/// File-name-safe form of a NAS name or IP: every char outside `[A-Za-z0-9._-]` becomes
/// `_`, and a name of dots only (`.`, `..`) becomes underscores, so it can never name a
/// directory. Truncated to keep file names within filesystem limits.
pub fn sanitize_file_part(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .take(MAX_NAME_LEN)
        .collect();
    if !out.is_empty() && out.chars().all(|c| c == '.') {
        out = "_".repeat(out.len());
    }
    out
}

pub(super) fn nas_file_stem(nas: &NasTarget) -> String {
    format!(
        "{}_{}",
        sanitize_file_part(&nas.name),
        sanitize_file_part(&nas.ip)
    )
}

/// Splits device output or a command on `\n`, `\r\n` and lone `\r` (telnet sessions
/// produce all three), dropping empty lines: no log line may contain a raw line break.
pub(super) fn split_lines(text: &str) -> impl Iterator<Item = &str> {
    text.split(['\n', '\r']).filter(|part| !part.is_empty())
}

/// `text` on one line: line breaks become single spaces.
pub(super) fn one_line(text: &str) -> String {
    split_lines(text).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::fixtures::{attempt, nas, read_lines};

    #[test]
    fn lines_start_with_carbons_time_and_the_milliseconds() {
        use chrono::Timelike as _;
        let t = chrono::NaiveDate::from_ymd_opt(2026, 12, 3)
            .and_then(|d| d.and_hms_milli_opt(10, 11, 12, 345))
            .expect("a valid time");
        assert_eq!(t.format(TIME_FORMAT).to_string(), "2026-12-03 10:11:12.345");
        assert_eq!(t.format(SECONDS_FORMAT).to_string(), "2026-12-03 10:11:12");
        let whole = t.with_nanosecond(0).expect("a valid time");
        assert_eq!(
            whole.format(TIME_FORMAT).to_string(),
            "2026-12-03 10:11:12.000"
        );
    }

    #[test]
    fn an_event_not_expanded_goes_to_its_account_log() {
        let dir = tempfile::tempdir().expect("temp dir");
        let event = NotExpanded {
            id: 5,
            cmd: "user_add",
            reason: "unknown account user_id=77",
        };
        let line = "nas=- event=- user_id=77 cmd=user_add try=0 outcome: failed (not expanded, \
                    nothing was sent; enqueued as id 5): unknown account user_id=77";
        for (abonent_id, dir_name) in [(None, "0"), (Some(12), "12")] {
            let account = AccountTarget {
                abonent_id,
                user_id: 77,
            };
            let journal = crate::journal::Journal::open(dir.path()).expect("journal");
            journal.not_expanded(&account, 5, "user_add", "unknown account user_id=77");
            journal.flush();
            let path = dir.path().join(format!("abonents/{dir_name}/event_77.log"));
            assert_eq!(read_lines(&path), vec![line.to_string()]);
            let daemon = read_lines(&journal.daemon_log_path());
            let message = not_expanded_message(&account, &event);
            assert!(
                daemon.last().is_some_and(|l| l.ends_with(&message)),
                "{daemon:?}"
            );
        }
        let account = AccountTarget {
            abonent_id: None,
            user_id: 77,
        };
        assert_eq!(
            not_expanded_message(&account, &event),
            "event id=5 user_id=77 abonent_id=- cmd=user_add failed at expansion, nothing was \
             sent: unknown account user_id=77"
        );
        let json: serde_json::Value =
            serde_json::from_str(&not_expanded_json(&Local::now(), &account, &event))
                .expect("json");
        assert_eq!(json["kind"], "not_expanded");
        assert_eq!(json["level"], "error");
        assert_eq!(json["outcome"], "failed");
        assert_eq!(json["id"], 5);
        assert_eq!(json["abonent_id"], serde_json::Value::Null);
        assert_eq!(json["error"], "unknown account user_id=77");
        assert_eq!(json["message"], line);
        // The JSON `outcome` of the text line reads as a failure with its reason.
        let outcome = line
            .split_once(" outcome: ")
            .map(|(_, o)| o)
            .unwrap_or_default();
        assert_eq!(
            classify_outcome(outcome),
            ("failed", Some("unknown account user_id=77"))
        );
    }

    #[test]
    fn format_attempt_table() {
        let n = nas(7, "Test NAS", "10.20.11.15");
        let acc = AccountTarget {
            abonent_id: Some(3),
            user_id: 42,
        };
        let p = "nas=7 event=100 user_id=42 cmd=user_add try=1";
        let cases: Vec<(Attempt, Vec<String>)> = vec![
            (
                attempt(
                    100,
                    &["/ip firewall address-list add list=allow address=10.0.0.2"],
                    "",
                    "done",
                ),
                vec![
                    format!("{p} send: /ip firewall address-list add list=allow address=10.0.0.2"),
                    format!("{p} outcome: done (42 ms)"),
                ],
            ),
            (
                attempt(
                    100,
                    &["a", "b\nc\r\n"],
                    "line1\r\nline2\n\nline3\r",
                    "retry in 2s: exit 254",
                ),
                vec![
                    format!("{p} send: a"),
                    format!("{p} send: b"),
                    format!("{p} send: c"),
                    format!("{p} answer: line1"),
                    format!("{p} answer: line2"),
                    format!("{p} answer: line3"),
                    format!("{p} outcome: retry in 2s: exit 254 (42 ms)"),
                ],
            ),
            (
                attempt(100, &[], "\r\n", "failed: scheme x\ndoes not define cmd y"),
                vec![format!(
                    "{p} outcome: failed: scheme x does not define cmd y (42 ms)"
                )],
            ),
            (
                // Quoting and shell metacharacters stay exactly as sent (copy-pasteable).
                attempt(
                    100,
                    &["ssh admin@10.0.0.1 '/queue simple remove [find name=\"u 42\"]'"],
                    "ok",
                    "done",
                ),
                vec![
                    format!(
                        "{p} send: ssh admin@10.0.0.1 '/queue simple remove [find name=\"u 42\"]'"
                    ),
                    format!("{p} answer: ok"),
                    format!("{p} outcome: done (42 ms)"),
                ],
            ),
        ];
        for (i, (att, want)) in cases.iter().enumerate() {
            assert_eq!(&format_attempt(&n, &acc, att), want, "case {i}");
        }

        let mut att = attempt(5, &["x"], "", "done");
        att.try_count = 3;
        att.cmd = "user_redirect\ncancel".to_owned();
        att.duration = Duration::from_micros(1_999_999);
        let acc = AccountTarget {
            abonent_id: None,
            user_id: -1,
        };
        assert_eq!(
            format_attempt(&nas(-2, "", ""), &acc, &att),
            vec![
                "nas=-2 event=5 user_id=-1 cmd=user_redirect cancel try=3 send: x".to_owned(),
                "nas=-2 event=5 user_id=-1 cmd=user_redirect cancel try=3 outcome: done (1999 ms)"
                    .to_owned(),
            ]
        );
    }

    #[test]
    fn sanitize_table() {
        let cases = [
            ("Test_NAS", "Test_NAS"),
            ("Test NAS", "Test_NAS"),
            ("../evil nas", ".._evil_nas"),
            ("..", "__"),
            (".", "_"),
            ("a/b\\c", "a_b_c"),
            ("Мтс-1", "___-1"),
            ("", ""),
            ("fe80::1", "fe80__1"),
            ("10.20.11.15", "10.20.11.15"),
        ];
        for (input, want) in cases {
            assert_eq!(sanitize_file_part(input), want, "input {input:?}");
        }
        assert_eq!(sanitize_file_part(&"x".repeat(1000)).len(), MAX_NAME_LEN);
    }

    #[test]
    fn classify_outcome_table() {
        let cases = [
            ("done", ("done", None)),
            ("done (manual send)", ("done", None)),
            (
                "superseded by event 15 (user_accept): not sent",
                ("superseded", None),
            ),
            (
                "retry in 2s: exit 254 (postpone)",
                ("retry", Some("exit 254 (postpone)")),
            ),
            (
                "failed: scheme x: no cmd y",
                ("failed", Some("scheme x: no cmd y")),
            ),
            ("failed", ("failed", None)),
            (
                "manual send, would retry: timeout",
                ("retry", Some("timeout")),
            ),
            ("manual send failed: auth", ("failed", Some("auth"))),
            ("something new: x", ("other", None)),
        ];
        for (text, want) in cases {
            assert_eq!(classify_outcome(text), want, "{text:?}");
        }
    }

    fn fixed_time() -> DateTime<Local> {
        use chrono::TimeZone;
        Local
            .with_ymd_and_hms(2026, 11, 22, 0, 3, 10)
            .single()
            .expect("unambiguous local time")
            + chrono::Duration::milliseconds(45)
    }

    #[test]
    fn attempt_json_fields() {
        let ts = fixed_time();
        let mut att = attempt(
            100,
            &[
                "/ip firewall address-list add list=allow address=10.0.0.2",
                "b\nc",
            ],
            "line1\r\nline2\n\n",
            "retry in 2s: exit\n254",
        );
        att.try_count = 3;
        let line = attempt_json(
            &ts,
            &nas(7, "Test NAS", "10.20.11.15"),
            &AccountTarget {
                abonent_id: Some(3),
                user_id: 42,
            },
            &att,
        );
        assert!(!line.contains('\n'), "{line}");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        let parsed = DateTime::parse_from_rfc3339(v["ts"].as_str().unwrap()).unwrap();
        assert_eq!(parsed, ts);
        assert!(v["ts"].as_str().unwrap().contains(":10.045"), "{v}");
        let want = serde_json::json!({
            "ts": v["ts"],
            "kind": "attempt",
            "level": "warn",
            "nas_id": 7,
            "nas_name": "Test NAS",
            "nas_ip": "10.20.11.15",
            "abonent_id": 3,
            "user_id": 42,
            "event_id": 100,
            "cmd": "user_add",
            "try": 3,
            "outcome": "retry",
            "error": "exit 254",
            "outcome_text": "retry in 2s: exit 254",
            "duration_ms": 42,
            "commands": ["/ip firewall address-list add list=allow address=10.0.0.2", "b\nc"],
            "answer": "line1\nline2",
            "message": "nas=7 event=100 user_id=42 cmd=user_add try=3 outcome: retry in 2s: exit 254 (42 ms)",
        });
        assert_eq!(v, want);

        // Done, no abonent, no answer: `error` and `abonent_id` are null, not missing.
        let v: serde_json::Value = serde_json::from_str(&attempt_json(
            &ts,
            &nas(1, "n", "1.1.1.1"),
            &AccountTarget {
                abonent_id: None,
                user_id: 5,
            },
            &attempt(1, &[], "", "done"),
        ))
        .unwrap();
        assert_eq!(v["level"], "info");
        assert_eq!(v["outcome"], "done");
        assert!(v["error"].is_null() && v["abonent_id"].is_null());
        assert_eq!(v["commands"], serde_json::json!([]));
        assert_eq!(v["answer"], "");
        let v: serde_json::Value = serde_json::from_str(&attempt_json(
            &ts,
            &nas(1, "n", "1.1.1.1"),
            &AccountTarget {
                abonent_id: None,
                user_id: 5,
            },
            &attempt(1, &["x"], "", "failed: gave up after 10 attempts: exit 1"),
        ))
        .unwrap();
        assert_eq!(v["level"], "error");
        assert_eq!(v["error"], "gave up after 10 attempts: exit 1");

        let v: serde_json::Value =
            serde_json::from_str(&daemon_json(&ts, "host1", 77, "two\nlines \"quoted\"")).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "ts": v["ts"],
                "kind": "daemon",
                "level": "info",
                "host": "host1",
                "program": PROGRAM,
                "pid": 77,
                "message": "two lines \"quoted\"",
            })
        );
    }
}
