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
                eprintln!("nasd: {e:#}");
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
    init_tracing(cfg.log.stderr_format);
    nasd::cli::run(cli.command, cfg, cli.config)
}

/// Log lines to stderr, filtered by `NASD_LOG` (default `warn`), as text or JSON.
fn init_tracing(format: LogFormat) {
    let stderr_log = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("NASD_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => stderr_log.init(),
        LogFormat::Json => stderr_log.json().init(),
    }
}
