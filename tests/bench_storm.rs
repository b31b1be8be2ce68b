//! `nasd bench-storm`, small and on SQLite: 20 accounts with the default storm mix on the
//! in-process simulator at 20 ms per command. The report must add up: every event is
//! sent or superseded, the simulator saw the commands history says were sent, the two
//! runs leave the NAS in the same state, and coalescing sends fewer events (exactly
//! what the scheme's `[coalesce]` groups predict). The timings are not asserted.

use std::process::Command;

/// One run's figures from its `bench-storm: coalescing off:` / `on:` line.
#[derive(Debug)]
struct Run {
    events: u64,
    sent: u64,
    done: u64,
    failed: u64,
    superseded: u64,
    sim_commands: u64,
    history_commands: u64,
    refused: u64,
}

/// The number right before `word` in `line` (`... 140 commands reached ...`).
fn before(line: &str, word: &str) -> u64 {
    let at = line
        .find(word)
        .unwrap_or_else(|| panic!("no {word:?} in {line:?}"));
    line[..at]
        .trim_end()
        .rsplit([' ', '(', '='])
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number before {word:?} in {line:?}"))
}

/// The number right after `word` in `line` (`done 100`).
fn after(line: &str, word: &str) -> u64 {
    let at = line
        .find(word)
        .unwrap_or_else(|| panic!("no {word:?} in {line:?}"));
    line[at + word.len()..]
        .trim_start()
        .split([' ', ',', ')'])
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number after {word:?} in {line:?}"))
}

fn run_of(stdout: &str, label: &str) -> Run {
    let line = stdout
        .lines()
        .find(|l| l.starts_with(&format!("bench-storm: coalescing {label}")))
        .unwrap_or_else(|| panic!("no `coalescing {label}` line in:\n{stdout}"));
    Run {
        events: before(line, " events ="),
        sent: before(line, " sent "),
        done: after(line, "(done"),
        failed: after(line, "failed"),
        superseded: before(line, " superseded"),
        sim_commands: before(line, " commands reached the sim"),
        history_commands: before(line, " in history"),
        refused: before(line, " refused"),
    }
}

#[test]
fn bench_storm_report_adds_up_and_both_runs_end_in_the_same_state() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let out = Command::new(env!("CARGO_BIN_EXE_nasd"))
        .current_dir(dir.path())
        .env("TMPDIR", dir.path())
        .args(["bench-storm", "--accounts", "20", "--latency", "20ms"])
        .output()
        .expect("run nasd");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");

    // The default mix: 5 events and 7 commands per account, 2 and 3 coalesced.
    assert!(
        stdout.contains(
            "bench-storm: per account 5 events, 7 commands; coalesced by [coalesce] 2 events, 3 commands (in all 100 and 140; coalesced 40 and 60)"
        ),
        "{stdout}"
    );
    let off = run_of(&stdout, "off:");
    let on = run_of(&stdout, "on:");
    for run in [&off, &on] {
        assert_eq!(run.events, 100, "{run:?}\n{stdout}");
        assert_eq!(run.sent + run.superseded, run.events, "{run:?}\n{stdout}");
        assert_eq!(run.done + run.failed, run.sent, "{run:?}\n{stdout}");
        assert_eq!(run.failed, 0, "{run:?}\n{stdout}");
        assert!(run.sim_commands > 0, "{run:?}\n{stdout}");
        assert_eq!(run.sim_commands, run.history_commands, "{run:?}\n{stdout}");
        assert_eq!(run.refused, 0, "{run:?}\n{stdout}");
    }
    assert_eq!(off.superseded, 0, "{stdout}");
    assert_eq!(off.sim_commands, 140, "{stdout}");
    // Coalescing: of drop + accept the accept, of set + cancel + set the last set.
    assert_eq!(on.sent, 40, "{stdout}");
    assert_eq!(on.superseded, 60, "{stdout}");
    assert_eq!(on.sim_commands, 60, "{stdout}");
    assert!(
        stdout.contains(
            "bench-storm: final state identical: yes (address lists 20 and 20 entries, queues 20 and 20)"
        ),
        "{stdout}"
    );
    // Not a terminal: the progress is whole lines, never redrawn with a carriage return.
    assert!(stdout.contains("  coalescing off: 100/100"), "{stdout}");
    assert!(!stdout.contains('\r'), "{stdout:?}");
}
