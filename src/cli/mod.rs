//! The operator commands of `nasd`: the parsed command (clap) and what each one does.
//! `main.rs` parses the command line, loads the config, sets up tracing and calls
//! [`run`]; one file here per command group.

pub mod accounts;
pub mod check;
pub mod cluster;
pub mod copy;
pub mod enqueue;
pub mod events;
pub mod generate;
pub mod nas;
pub mod reconcile;
pub mod send;
pub mod stack;

use std::process::ExitCode;

use anyhow::bail;
use clap::Subcommand;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::tools;

#[derive(Subcommand)]
pub enum Command {
    /// Run the daemon: expand the compact stack and send events to every enabled NAS.
    Run,
    /// Apply the database migrations and exit.
    Migrate,
    /// Check the config, every scheme (each cmd rendered), the database and every NAS
    /// row; exit 0 without errors, 1 with.
    Check {
        /// Also log in to every enabled NAS once (a session of its own), timed.
        #[arg(long)]
        connect: bool,
    },
    /// Manage network access servers.
    #[command(subcommand)]
    Nas(nas::NasCommand),
    /// Manage the reference accounts table.
    #[command(subcommand)]
    Accounts(accounts::AccountsCommand),
    /// The daemons sharing the PostgreSQL database and the NAS each owns.
    #[command(subcommand)]
    Cluster(cluster::ClusterCommand),
    /// Append one event to the compact stack and print its id, or many from a file
    /// (--from-file: CSV with a header row, or JSON lines).
    Enqueue(enqueue::EnqueueArgs),
    /// Inspect the event stacks.
    #[command(subcommand)]
    Stack(stack::StackCommand),
    /// Browse events by state and filter; retry or cancel them in bulk.
    #[command(subcommand)]
    Events(events::EventsCommand),
    /// Operator actions (console, API, CLI), newest first.
    Audit {
        #[arg(long, default_value_t = 50)]
        limit: i64,
        #[arg(long)]
        json: bool,
    },
    /// Show finished events (events_history), newest last.
    History {
        #[arg(long)]
        user_id: Option<i64>,
        #[arg(long, default_value_t = 50)]
        limit: i64,
        #[arg(long)]
        json: bool,
    },
    /// Render and send one event now, printing each command, the answer and the time.
    Send {
        #[arg(long)]
        nas: i64,
        #[arg(long)]
        cmd: String,
        #[arg(long)]
        user_id: i64,
        /// The event's acct_session_id (CoA and disconnects name the session).
        #[arg(long)]
        acct_session_id: Option<String>,
        /// The event's usluga_id (the service).
        #[arg(long)]
        usluga_id: Option<i64>,
        /// A template variable over the account's (repeatable): NAME=VALUE.
        #[arg(long = "param", value_name = "NAME=VALUE")]
        params: Vec<String>,
        /// Only render the commands; send nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Compare what a NAS holds with what its accounts should have (the scheme's
    /// [state]); print the differences and the events that would fix them.
    Reconcile {
        /// The NAS to read.
        #[arg(long)]
        nas: i64,
        /// Only this account (user_id).
        #[arg(long)]
        account: Option<i64>,
        /// Enqueue the fixing events (they go through the normal pipeline).
        #[arg(long)]
        apply: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// Read through a session of this process even when the daemon's API answers.
        #[arg(long)]
        local: bool,
    },
    /// Copy every table (NAS, accounts, both stacks, history) to another, empty
    /// database, keeping ids, states and try counts; verified by row counts and
    /// checksums. Refused while a daemon works on the source.
    Copy {
        /// The target database URL (sqlite://FILE or postgres://...).
        #[arg(long)]
        to: String,
    },
    /// Write a consistent snapshot of nasd's tables to a new file (SQLite format) while
    /// the daemon runs, with the known_hosts files beside it.
    Backup { file: std::path::PathBuf },
    /// Restore a backup file into the configured database, which must be empty.
    Restore { file: std::path::PathBuf },
    /// A self-contained demonstration on a fresh embedded SQLite database.
    Demo(tools::demo::DemoOptions),
    /// Measure events/s and enqueue-to-done latency through the whole pipeline.
    Bench(tools::bench::BenchOptions),
    /// Run the NAS simulator: a RouterOS-like router on loopback SSH and telnet ports.
    Sim(crate::sim::SimOptions),
    /// Measure enqueue throughput over HTTP (single events and batches) against the
    /// daemon started in-process on a fresh database.
    BenchApi(tools::bench_api::BenchApiOptions),
    /// Time the operator console's data requests on big tables (1M history rows, 100k
    /// queued) against the daemon started in-process on a fresh database.
    BenchConsole(tools::bench_console::BenchConsoleOptions),
    /// Prune `[history] keep` from a big history (10 million rows) while events are
    /// delivered, and print the longest delivery pause.
    BenchPrune(tools::bench_prune::BenchPruneOptions),
    /// Carbon's reboot storm: a backlog of events per account on one simulated NAS
    /// (SSH, 300 ms per command), drained without and with coalescing.
    BenchStorm(tools::bench_storm::BenchStormOptions),
    /// Write the man pages or a shell's completions (for the Debian package).
    #[command(hide = true)]
    Generate(generate::GenerateArgs),
}

/// Runs one command to its end and returns the process exit code; an error is printed
/// as `nasd: ...` and exits 1.
///
/// This is the binary's entry point: call it once, from `main`, before any other thread
/// exists. It builds the tokio runtime itself, and for `nasd demo` it first sets
/// `NASD_DEMO_STATE` in the process environment, which is only sound while the process
/// has a single thread.
pub fn run(mut command: Command, cfg: Config, config_path: Option<std::path::PathBuf>) -> ExitCode {
    if let Command::Demo(opts) = &mut command {
        let dir = tools::demo::choose_dir(opts);
        // SAFETY: no other thread exists yet (the runtime starts below, and `run` is
        // called by main before anything else), so changing the environment cannot race
        // a reader. The demo's device script records what it receives in this file.
        #[allow(clippy::disallowed_methods)] // single-threaded here, see SAFETY above
        unsafe {
            std::env::set_var("NASD_DEMO_STATE", dir.join("device.log"))
        };
        opts.dir = Some(dir);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("nasd: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(execute(command, cfg, config_path)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("nasd: {}", error_text(&e));
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line, each cause once: a context that already
/// quotes its source's text (`migration failed: X` over `X`) does not repeat it.
pub fn error_text(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if text.is_empty() || line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// Dispatches the parsed command to the code that carries it out.
async fn execute(
    command: Command,
    cfg: Config,
    config_path: Option<std::path::PathBuf>,
) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run => run_daemon(cfg, config_path).await?,
        Command::Migrate => migrate(&cfg).await?,
        Command::Check { connect } => return check::run(&cfg, connect).await,
        Command::Nas(cmd) => nas::run(cmd, &cfg).await?,
        Command::Accounts(cmd) => accounts::run(cmd, &cfg).await?,
        Command::Cluster(cmd) => cluster::run(cmd, &cfg).await?,
        Command::Enqueue(args) => return enqueue::run(args, &cfg).await,
        Command::Stack(cmd) => stack::run(cmd, &cfg).await?,
        Command::Events(cmd) => events::run(cmd, &cfg).await?,
        Command::Audit { limit, json } => events::audit(&cfg, limit, json).await?,
        Command::History {
            user_id,
            limit,
            json,
        } => stack::history(&cfg, user_id, limit, json).await?,
        Command::Send {
            nas,
            cmd,
            user_id,
            acct_session_id,
            usluga_id,
            params,
            dry_run,
        } => {
            let params = params
                .iter()
                .map(|p| match p.split_once('=') {
                    Some((k, v)) if !k.trim().is_empty() => {
                        Ok((k.trim().to_string(), v.to_string()))
                    }
                    _ => Err(anyhow::anyhow!(
                        "--param `{p}` is not NAME=VALUE (e.g. --param rate_in=10240)"
                    )),
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let req = crate::manual::ManualSend {
                nas_id: nas,
                cmd,
                user_id,
                acct_session_id,
                usluga_id,
                params,
                dry_run,
                by: "nasd send".into(),
            };
            return send::run(&cfg, req).await;
        }
        Command::Reconcile {
            nas,
            account,
            apply,
            json,
            local,
        } => {
            let req = crate::reconcile::Request {
                nas_id: nas,
                account,
                apply,
                by: "nasd reconcile".into(),
            };
            return reconcile::run(&cfg, req, json, local).await;
        }
        Command::Copy { to } => copy::copy_to(&cfg, &to).await?,
        Command::Backup { file } => copy::backup(&cfg, &file).await?,
        Command::Restore { file } => copy::restore(&cfg, &file).await?,
        Command::Demo(opts) => tools::demo::run(opts).await?,
        Command::Bench(opts) => tools::bench::run(opts).await?,
        Command::Sim(opts) => crate::sim::run(opts).await?,
        Command::BenchApi(opts) => tools::bench_api::run(opts).await?,
        Command::BenchConsole(opts) => tools::bench_console::run(opts).await?,
        Command::BenchPrune(opts) => tools::bench_prune::run(opts).await?,
        Command::BenchStorm(opts) => tools::bench_storm::run(opts).await?,
        // main.rs runs it before the config is loaded: it needs the whole clap command.
        Command::Generate(_) => bail!("nasd generate runs from main, with the clap command"),
    }
    Ok(ExitCode::SUCCESS)
}

/// `nasd run`: the daemon until SIGTERM or SIGINT (a second signal exits at once).
/// SIGHUP reloads the config file (see `reload_on_hup`).
async fn run_daemon(cfg: Config, config_path: Option<std::path::PathBuf>) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        signal.cancel();
        wait_for_signal().await;
        eprintln!("nasd: second signal, exiting at once");
        std::process::exit(130);
    });
    let running = crate::daemon::start(cfg, shutdown).await?;
    tokio::spawn(reload_on_hup(config_path, running.reloader.clone()));
    running.wait().await
}

/// SIGHUP (`systemctl reload nasd`): the config file is read and checked again; what
/// can change live is applied and what needs a restart is named in the daemon log
/// (see `reload.rs`). A config with an error changes nothing. Without this handler
/// SIGHUP would end the process.
async fn reload_on_hup(
    config_path: Option<std::path::PathBuf>,
    reloader: std::sync::Arc<std::sync::Mutex<crate::reload::Reloader>>,
) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        return;
    };
    while hup.recv().await.is_some() {
        let loaded = Config::load(config_path.as_deref());
        let Ok(mut r) = reloader.lock() else {
            return;
        };
        match loaded {
            Ok(cfg) => {
                r.apply(cfg);
            }
            Err(e) => r.refused(&e.to_string()),
        }
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// `nasd migrate`.
async fn migrate(cfg: &Config) -> anyhow::Result<()> {
    crate::daemon::open_store(cfg).await?;
    println!("migrations applied to {}", redact_url(&cfg.database.url));
    Ok(())
}

/// A cmd is a name such as `user_add`: lowercase letters, digits and underscores, as the
/// HTTP API accepts it.
fn validate_cmd(cmd: &str) -> anyhow::Result<()> {
    if !crate::api::valid_cmd(cmd) {
        bail!("--cmd `{cmd}` is not a cmd name (lowercase letters, digits and _, e.g. user_add)");
    }
    Ok(())
}

fn redact_url(url: &str) -> String {
    // postgres://user:password@host/db -> postgres://user:***@host/db
    if let Some((scheme, rest)) = url.split_once("://")
        && let Some((auth, host)) = rest.split_once('@')
        && let Some((user, _)) = auth.split_once(':')
    {
        return format!("{scheme}://{user}:***@{host}");
    }
    url.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_cause_is_printed_once() {
        let repeated = anyhow::Error::new(std::io::Error::other("boom")).context("reading x: boom");
        assert_eq!(error_text(&repeated), "reading x: boom");
        let chained = anyhow::Error::new(std::io::Error::other("connection refused"))
            .context("opening the database");
        assert_eq!(
            error_text(&chained),
            "opening the database: connection refused"
        );
    }

    #[test]
    fn cmd_names() {
        let long = "a".repeat(65);
        for (cmd, ok) in [
            ("user_add", true),
            ("user_rate_set2", true),
            ("u", true),
            ("", false),
            ("user add", false),
            ("User_add", false),
            ("_user", false),
            ("2user", false),
            ("user-add", false),
            (long.as_str(), false),
        ] {
            assert_eq!(validate_cmd(cmd).is_ok(), ok, "{cmd:?}");
        }
    }

    #[test]
    fn passwords_are_redacted_from_urls() {
        for (url, shown) in [
            (
                "postgres://nasd:secret@db:5432/nasd",
                "postgres://nasd:***@db:5432/nasd",
            ),
            ("postgres://nasd@db/nasd", "postgres://nasd@db/nasd"),
            ("sqlite:///var/lib/nasd.db", "sqlite:///var/lib/nasd.db"),
        ] {
            assert_eq!(redact_url(url), shown);
        }
    }
}
