//! `nasd bench-prune`, small and on SQLite: every filled row is pruned while events are
//! delivered, the summary says so, and its progress in a pipe comes as plain lines.
//! The timings themselves are not asserted.

use std::process::Command;

#[test]
fn bench_prune_prunes_every_filled_row_and_prints_its_summary() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let out = Command::new(env!("CARGO_BIN_EXE_nasd"))
        .current_dir(dir.path())
        .env("TMPDIR", dir.path())
        .args([
            "bench-prune",
            "--rows",
            "5000",
            "--rate",
            "50",
            "--baseline",
            "1s",
            "--prune-interval",
            "1s",
            "--prune-batch",
            "700",
        ])
        .output()
        .expect("run nasd");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("bench-prune: baseline, no pruning: "),
        "{stdout}"
    );
    assert!(
        stdout.contains("bench-prune: sqlite, 5000 rows pruned in "),
        "{stdout}"
    );
    assert!(stdout.contains("(target <= 100 ms: "), "{stdout}");
    // Not a terminal: the progress is whole lines, never redrawn with a carriage return.
    assert!(stdout.contains("  pruned: 5000/5000"), "{stdout}");
    assert!(!stdout.contains('\r'), "{stdout:?}");
}
