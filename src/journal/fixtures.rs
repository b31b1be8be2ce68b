//! Test fixtures shared by the journal's test modules.

use std::fs::{self, File};
use std::io::Read;
use std::path::Path;
use std::time::Duration;

use chrono::NaiveDateTime;

use super::{Attempt, NasTarget, TIME_FORMAT};

pub(super) fn nas(id: i64, name: &str, ip: &str) -> NasTarget {
    NasTarget {
        id,
        name: name.to_owned(),
        ip: ip.to_owned(),
    }
}

pub(super) fn attempt(event_id: i64, commands: &[&str], answer: &str, outcome: &str) -> Attempt {
    Attempt {
        event_id,
        cmd: "user_add".to_owned(),
        try_count: 1,
        commands: commands.iter().map(|c| (*c).to_owned()).collect(),
        answer: answer.to_owned(),
        outcome: outcome.to_owned(),
        duration: Duration::from_millis(42),
    }
}

/// Lines of a log file with the timestamp checked and stripped.
pub(super) fn read_lines(path: &Path) -> Vec<String> {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        text.ends_with('\n'),
        "{}: last line unterminated",
        path.display()
    );
    text.lines()
        .map(|line| {
            // `2026-12-03 10:11:12.345`: Carbon's prefix and the milliseconds.
            let (ts, rest) = line.split_at("2026-12-03 10:11:12.345".len());
            NaiveDateTime::parse_from_str(ts, TIME_FORMAT)
                .unwrap_or_else(|e| panic!("bad timestamp in {line:?}: {e}"));
            rest.strip_prefix(' ')
                .unwrap_or_else(|| panic!("no space after timestamp: {line:?}"))
                .to_owned()
        })
        .collect()
}

pub(super) fn gunzip(path: &Path) -> String {
    let file = File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut text = String::new();
    flate2::read::GzDecoder::new(file)
        .read_to_string(&mut text)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text
}
