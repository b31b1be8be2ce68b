//! Progress of the demo and the benchmarks, on stdout (where their other output goes):
//! on a terminal an `indicatif` bar (count of total, done and failed, rate), redrawn in
//! place; in a file or a pipe a plain line every few seconds and a final one, with no
//! carriage return, so that a log of the run reads line by line.

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// How often a plain line is printed when stdout is not a terminal.
pub const LINE_EVERY: Duration = Duration::from_secs(2);

/// What one progress shows: `label: count/total [done D failed F, ]R unit/s, T s`.
#[derive(Debug, Clone)]
pub struct Format {
    pub label: String,
    pub total: u64,
    /// What is counted, in the rate: `events`, `rows`.
    pub unit: &'static str,
    /// Whether done and failed are shown apart (events), or only the count (rows).
    pub failed: bool,
}

impl Format {
    /// Events that end done or failed.
    pub fn events(label: &str, total: u64) -> Format {
        Format {
            label: label.into(),
            total,
            unit: "events",
            failed: true,
        }
    }

    /// A count of `unit` (rows filled, rows pruned).
    pub fn count(label: &str, total: u64, unit: &'static str) -> Format {
        Format {
            label: label.into(),
            total,
            unit,
            failed: false,
        }
    }

    /// Count per second over `elapsed` (0 before any time has passed).
    fn rate(count: u64, elapsed: Duration) -> f64 {
        let secs = elapsed.as_secs_f64();
        if secs <= 0.0 {
            0.0
        } else {
            count as f64 / secs
        }
    }

    /// The bar's message: what the bar itself does not show.
    fn message(&self, done: u64, failed: u64, elapsed: Duration) -> String {
        let rate = Format::rate(done + failed, elapsed);
        if self.failed {
            format!("done {done} failed {failed}  {rate:.0} {}/s", self.unit)
        } else {
            format!("{rate:.0} {}/s", self.unit)
        }
    }

    /// One plain line (no carriage return, no newline): what a file or pipe gets.
    pub fn line(&self, done: u64, failed: u64, elapsed: Duration) -> String {
        let count = done + failed;
        let rate = Format::rate(count, elapsed);
        let secs = elapsed.as_secs_f64();
        if self.failed {
            format!(
                "{}: {count}/{} done {done} failed {failed}, {rate:.0} {}/s, {secs:.1} s",
                self.label, self.total, self.unit
            )
        } else {
            format!(
                "{}: {count}/{}, {rate:.0} {}/s, {secs:.1} s",
                self.label, self.total, self.unit
            )
        }
    }
}

/// The counts a progress shows; shared with the line printer.
#[derive(Default)]
struct Counts {
    done: AtomicU64,
    failed: AtomicU64,
}

enum Shown {
    Bar(ProgressBar),
    /// The task printing a line every `LINE_EVERY`.
    Lines(JoinHandle<()>),
}

/// A progress on stdout; `set` the counts as often as they are known, `finish` at the
/// end (dropping it without `finish` stops it silently).
pub struct Progress {
    format: Arc<Format>,
    counts: Arc<Counts>,
    started: Instant,
    shown: Shown,
}

impl Progress {
    /// Starts showing: a bar when stdout is a terminal, else plain lines every
    /// `LINE_EVERY`. Needs a tokio runtime (the lines are printed by a task).
    pub fn start(format: Format) -> Progress {
        Progress::start_on(format, std::io::stdout().is_terminal(), LINE_EVERY)
    }

    /// `start` with the choice made: a bar on a terminal, or lines every `every`.
    pub fn start_on(format: Format, terminal: bool, every: Duration) -> Progress {
        let format = Arc::new(format);
        let counts = Arc::new(Counts::default());
        let started = Instant::now();
        let shown = if terminal {
            let bar = ProgressBar::with_draw_target(
                Some(format.total),
                ProgressDrawTarget::stdout_with_hz(4),
            );
            let template = format!(
                "  {}: [{{bar:30}}] {{pos}}/{{len}} {{msg}} ({{elapsed}})",
                format.label.trim()
            );
            if let Ok(style) = ProgressStyle::with_template(&template) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_message(format.message(0, 0, Duration::ZERO));
            bar.enable_steady_tick(Duration::from_millis(250));
            Shown::Bar(bar)
        } else {
            let (format, counts) = (format.clone(), counts.clone());
            Shown::Lines(tokio::spawn(async move {
                let mut ticks = tokio::time::interval_at(started + every, every);
                ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    ticks.tick().await;
                    let line = format.line(
                        counts.done.load(Ordering::Relaxed),
                        counts.failed.load(Ordering::Relaxed),
                        started.elapsed(),
                    );
                    print_line(&line);
                }
            }))
        };
        Progress {
            format,
            counts,
            started,
            shown,
        }
    }

    /// The counts so far (done and failed; for a plain count, failed is 0).
    pub fn set(&self, done: u64, failed: u64) {
        self.counts.done.store(done, Ordering::Relaxed);
        self.counts.failed.store(failed, Ordering::Relaxed);
        if let Shown::Bar(bar) = &self.shown {
            bar.set_position(done + failed);
            bar.set_message(self.format.message(done, failed, self.started.elapsed()));
        }
    }

    /// Stops and shows the last counts: the bar stays drawn at its end state, or a
    /// final plain line is printed.
    pub fn finish(self) {
        let done = self.counts.done.load(Ordering::Relaxed);
        let failed = self.counts.failed.load(Ordering::Relaxed);
        let elapsed = self.started.elapsed();
        match &self.shown {
            Shown::Bar(bar) => {
                bar.set_position(done + failed);
                bar.finish_with_message(self.format.message(done, failed, elapsed));
            }
            Shown::Lines(task) => {
                task.abort();
                print_line(&self.format.line(done, failed, elapsed));
            }
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        match &self.shown {
            Shown::Bar(bar) => {
                if !bar.is_finished() {
                    bar.abandon();
                }
            }
            Shown::Lines(task) => task.abort(),
        }
    }
}

/// A whole line on stdout, flushed (a pipe is block-buffered); a closed stdout is not an
/// error of the run.
fn print_line(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_lines_show_done_failed_and_rate() {
        let f = Format::events("  progress", 152);
        assert_eq!(
            f.line(100, 2, Duration::from_secs(2)),
            "  progress: 102/152 done 100 failed 2, 51 events/s, 2.0 s"
        );
        assert_eq!(
            f.line(0, 0, Duration::ZERO),
            "  progress: 0/152 done 0 failed 0, 0 events/s, 0.0 s"
        );
    }

    #[test]
    fn count_lines_show_the_count_and_rate() {
        let f = Format::count("bench-prune: pruning", 10_000_000, "rows");
        assert_eq!(
            f.line(2_500_000, 0, Duration::from_millis(12_500)),
            "bench-prune: pruning: 2500000/10000000, 200000 rows/s, 12.5 s"
        );
    }

    #[test]
    fn lines_have_no_carriage_return() {
        for f in [Format::events("p", 5), Format::count("p", 5, "rows")] {
            let line = f.line(3, 1, Duration::from_secs(1));
            assert!(!line.contains('\r') && !line.contains('\n'), "{line:?}");
        }
    }
}
