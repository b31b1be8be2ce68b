//! The `nasd` binary: parses the command line, loads the config, sets up tracing and
//! hands the command to the library (`nasd::cli`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory as _, Parser};
use nasd::config::Config;
use nasd::journal::LogFormat;

#[derive(Parser)]
#[command(
    name = "nasd",
    version,
    about = "Delivers ISP billing events to network access servers"
)]
struct Cli {
    /// Configuration file (TOML). Default: nasd.toml in the working directory when present.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: nasd::cli::Command,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let nasd::cli::Command::Generate(args) = &cli.command {
        // Man pages and completions from the clap definitions; needs no config.
        return match nasd::cli::generate::run(Cli::command(), args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("nasd: {}", nasd::cli::error_text(&e));
                ExitCode::FAILURE
            }
        };
    }
    let cfg = match Config::load(cli.config.as_deref()) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("nasd: {e}");
            return ExitCode::from(64);
        }
    };
    // Before the daemon takes its lock beside an SQLite file: a directory that is not
    // there is refused, not created (see `SqliteStore::prepare_dir`).
    if let nasd::cli::Command::Run = &cli.command
        && cfg.database.url.starts_with("sqlite:")
        && let Err(e) = nasd::store::sqlite::SqliteStore::prepare_dir(&cfg.database.url)
    {
        eprintln!("nasd: opening the sqlite database: {e}");
        return ExitCode::FAILURE;
    }
    init_tracing(cfg.log.stderr_format);
    nasd::cli::run(cli.command, cfg, cli.config)
}

/// Log lines to stderr, filtered by `NASD_LOG` (default `warn`), as text or JSON;
/// coloured only on a terminal and never with `NO_COLOR` set.
fn init_tracing(format: LogFormat) {
    use std::io::IsTerminal as _;
    let stderr_log = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("NASD_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_ansi(colours(
            std::io::stderr().is_terminal(),
            std::env::var_os("NO_COLOR").as_deref(),
        ))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => stderr_log.init(),
        LogFormat::Json => stderr_log.json().init(),
    }
}

/// Whether stderr gets ANSI colours: only on a terminal, and not when `NO_COLOR` is set
/// to anything but the empty string (<https://no-color.org>). Pure.
fn colours(stderr_is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|v| v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::colours;
    use std::ffi::OsStr;

    #[test]
    fn colours_only_on_a_terminal_without_no_color() {
        assert!(colours(true, None));
        assert!(colours(true, Some(OsStr::new(""))));
        assert!(!colours(true, Some(OsStr::new("1"))));
        assert!(!colours(false, None));
        assert!(!colours(false, Some(OsStr::new("1"))));
    }
}
