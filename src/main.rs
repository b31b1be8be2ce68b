//! The `nasd` command line: parses arguments, loads the config, calls into the library.

use std::path::PathBuf;
use std::process::ExitCode;
use tokio::time::Instant;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use nasd::config::Config;
use nasd::store::{AccountRecord, CompactEvent, Nas, Secret, StackEvent, Store};
use tokio_util::sync::CancellationToken;

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
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: expand the compact stack and send events to every enabled NAS.
    Run,
    /// Apply the database migrations and exit.
    Migrate,
    /// Manage network access servers.
    #[command(subcommand)]
    Nas(NasCommand),
    /// Manage the reference accounts table.
    #[command(subcommand)]
    Accounts(AccountsCommand),
    /// Append one event to the compact stack and print its id, or many from a file
    /// (--from-file: CSV with a header row, or JSON lines).
    Enqueue(EnqueueArgs),
    /// Inspect the event stacks.
    #[command(subcommand)]
    Stack(StackCommand),
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
        /// Only render the commands; send nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// A self-contained demonstration on a fresh embedded SQLite database.
    Demo(nasd::tools::demo::DemoOptions),
    /// Measure events/s and enqueue-to-done latency through the whole pipeline.
    Bench(nasd::tools::bench::BenchOptions),
    /// Run the NAS simulator: a RouterOS-like router on loopback SSH and telnet ports.
    Sim(nasd::sim::SimOptions),
    /// Measure enqueue throughput over HTTP (single events and batches) against the
    /// daemon started in-process on a fresh database.
    BenchApi(nasd::tools::bench_api::BenchApiOptions),
}

#[derive(Subcommand)]
enum NasCommand {
    /// Add a NAS.
    Add {
        #[arg(long)]
        id: i64,
        #[command(flatten)]
        fields: NasFields,
    },
    /// Change settings of a NAS (only the options given).
    Set {
        id: i64,
        #[command(flatten)]
        fields: NasFields,
    },
    /// Remove a NAS (its queued events stay in the stack).
    Remove { id: i64 },
    /// List NAS.
    List {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Default)]
struct NasFields {
    #[arg(long)]
    name: Option<String>,
    #[arg(long)]
    ip: Option<String>,
    /// OSS scheme: a directory name under schemes_dir.
    #[arg(long)]
    scheme: Option<String>,
    /// Legacy script run as `SCRIPT CMD` with the variables in its environment.
    #[arg(long)]
    script: Option<String>,
    /// Commands in flight at once for this NAS (1..100).
    #[arg(long)]
    workers: Option<i32>,
    #[arg(long)]
    login: Option<String>,
    #[arg(long)]
    password: Option<String>,
    /// RADIUS shared secret (coa_psw).
    #[arg(long)]
    secret: Option<String>,
    #[arg(long)]
    port: Option<i32>,
    /// Transport protocol override for device transports (ssh, telnet, ...).
    #[arg(long)]
    protocol: Option<String>,
    /// Connections to the device at once (1..100).
    #[arg(long)]
    max_sessions: Option<i32>,
    /// SSH host key policy: strict (key must be in nasd's known_hosts) or accept-new.
    #[arg(long)]
    host_key_policy: Option<String>,
    /// SSH: pin the host key fingerprint (SHA256:..., as `ssh-keygen -lf` prints it).
    #[arg(long)]
    host_key: Option<String>,
    /// SSH: also offer legacy key exchange and ciphers (old devices).
    #[arg(long)]
    legacy_crypto: Option<bool>,
    #[arg(long, conflicts_with = "disable")]
    enable: bool,
    #[arg(long)]
    disable: bool,
}

impl NasFields {
    fn apply(self, nas: &mut Nas) {
        if let Some(v) = self.name {
            nas.name = v;
        }
        if let Some(v) = self.ip {
            nas.ip = v;
        }
        if let Some(v) = self.scheme {
            nas.scheme = Some(v);
            nas.script_name = None;
        }
        if let Some(v) = self.script {
            nas.script_name = Some(v);
        }
        if let Some(v) = self.workers {
            nas.n_workers = v;
        }
        if let Some(v) = self.login {
            nas.login = Some(v);
        }
        if let Some(v) = self.password {
            nas.password = Some(Secret::new(v));
        }
        if let Some(v) = self.secret {
            nas.secret = Some(Secret::new(v));
        }
        if let Some(v) = self.port {
            nas.port = Some(v);
        }
        if let Some(v) = self.protocol {
            nas.protocol = Some(v);
        }
        if let Some(v) = self.max_sessions {
            nas.max_sessions = v;
        }
        if let Some(v) = self.host_key_policy {
            nas.host_key_policy = v;
        }
        if let Some(v) = self.host_key {
            nas.host_key = Some(v);
        }
        if let Some(v) = self.legacy_crypto {
            nas.legacy_crypto = v;
        }
        if self.enable {
            nas.enabled = true;
        }
        if self.disable {
            nas.enabled = false;
        }
    }
}

#[derive(Subcommand)]
enum AccountsCommand {
    /// Import (insert or update) accounts from a CSV file with a header row of variable
    /// names; user_id, abonent_id and nas_id are required; other columns become variables.
    Import { file: PathBuf },
}

#[derive(Args)]
struct EnqueueArgs {
    #[arg(long, required_unless_present = "from_file")]
    cmd: Option<String>,
    #[arg(long, required_unless_present = "from_file")]
    user_id: Option<i64>,
    #[arg(long)]
    abonent_id: Option<i64>,
    #[arg(long)]
    nas_ip: Option<String>,
    #[arg(long)]
    usluga_id: Option<i64>,
    #[arg(long)]
    acct_session_id: Option<String>,
    /// Enqueue every line of FILE: CSV with a header row (cmd, user_id, abonent_id,
    /// nas_ip, usluga_id, acct_session_id) or JSON lines (one object per line). A bad
    /// line is reported with its number and skipped; exit code 1 when any was skipped.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["cmd", "user_id", "abonent_id", "nas_ip", "usluga_id", "acct_session_id"])]
    from_file: Option<PathBuf>,
    /// Events per transaction with --from-file.
    #[arg(long, default_value_t = 1000, requires = "from_file")]
    batch: usize,
}

#[derive(Subcommand)]
enum StackCommand {
    /// Compact total, main-stack count per cmd and per NAS, age of the oldest event.
    Count {
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let cfg = match Config::load(cli.config.as_deref()) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("nasd: {e}");
            return ExitCode::from(64);
        }
    };
    let stderr_log = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("NASD_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr);
    match cfg.log.stderr_format {
        nasd::journal::LogFormat::Text => stderr_log.init(),
        nasd::journal::LogFormat::Json => stderr_log.json().init(),
    }
    let mut cli = cli;
    if let Command::Demo(opts) = &mut cli.command {
        let dir = nasd::tools::demo::choose_dir(opts);
        // SAFETY: no other thread exists yet (the runtime starts below), so changing the
        // environment cannot race a reader. The demo's device script records what it
        // receives in this file.
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
    match runtime.block_on(dispatch(cli.command, cfg)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("nasd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(command: Command, cfg: Config) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run => {
            let shutdown = CancellationToken::new();
            let signal = shutdown.clone();
            tokio::spawn(async move {
                wait_for_signal().await;
                signal.cancel();
                wait_for_signal().await;
                eprintln!("nasd: second signal, exiting at once");
                std::process::exit(130);
            });
            nasd::daemon::run(cfg, shutdown).await?;
        }
        Command::Migrate => {
            nasd::daemon::open_store(&cfg).await?;
            println!("migrations applied to {}", redact_url(&cfg.database.url));
        }
        Command::Nas(cmd) => nas_command(cmd, &cfg).await?,
        Command::Accounts(AccountsCommand::Import { file }) => {
            let store = nasd::daemon::open_store(&cfg).await?;
            let records = read_accounts_csv(&file)?;
            let n = store.accounts_upsert(&records).await?;
            println!("imported {n} accounts from {}", file.display());
        }
        Command::Enqueue(args) => {
            if let Some(file) = &args.from_file {
                return enqueue_file(&cfg, file, args.batch).await;
            }
            let (Some(cmd), Some(user_id)) = (args.cmd, args.user_id) else {
                bail!("enqueue needs --cmd and --user-id (or --from-file FILE)");
            };
            validate_cmd(&cmd)?;
            if user_id <= 0 {
                bail!("--user-id must be a positive number, got {user_id}");
            }
            let store = nasd::daemon::open_store(&cfg).await?;
            let ids = store
                .enqueue_compact(&[CompactEvent {
                    cmd,
                    user_id,
                    abonent_id: args.abonent_id,
                    nas_ip: args.nas_ip,
                    usluga_id: args.usluga_id,
                    acct_session_id: args.acct_session_id,
                }])
                .await?;
            for id in ids {
                println!("{id}");
            }
        }
        Command::Stack(StackCommand::Count { json }) => {
            let store = nasd::daemon::open_store(&cfg).await?;
            let count = store.stack_count().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&count)?);
            } else {
                println!("{} events_stack_compact", count.compact_total);
                println!("{} events_stack", count.stack_total);
                for (cmd, n) in &count.by_cmd {
                    println!("{n} {cmd}");
                }
                for (nas, n) in &count.by_nas {
                    println!("{n} nas_id={nas}");
                }
                match count.oldest {
                    Some(t) => println!(
                        "oldest event: {} ({}s ago)",
                        t.with_timezone(&chrono::Local).format("%Y-%m-%d %H:%M:%S"),
                        (chrono::Utc::now() - t).num_seconds().max(0)
                    ),
                    None => println!("oldest event: none (stacks are empty)"),
                }
            }
        }
        Command::History {
            user_id,
            limit,
            json,
        } => {
            let store = nasd::daemon::open_store(&cfg).await?;
            let rows = store.history(user_id, limit).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                for r in rows {
                    println!(
                        "{} event={} user_id={} nas_id={} cmd={} {} attempts={} {}ms{}",
                        r.finished_at
                            .with_timezone(&chrono::Local)
                            .format("%Y-%m-%d %H:%M:%S"),
                        r.event_id.map_or("-".to_string(), |v| v.to_string()),
                        r.user_id,
                        r.nas_id.map_or("-".to_string(), |v| v.to_string()),
                        r.cmd,
                        r.outcome,
                        r.attempts,
                        r.duration_ms,
                        r.error.map(|e| format!(" error: {e}")).unwrap_or_default()
                    );
                }
            }
        }
        Command::Send {
            nas,
            cmd,
            user_id,
            dry_run,
        } => return send_now(&cfg, nas, &cmd, user_id, dry_run).await,
        Command::Demo(opts) => nasd::tools::demo::run(opts).await?,
        Command::Bench(opts) => nasd::tools::bench::run(opts).await?,
        Command::Sim(opts) => nasd::sim::run(opts).await?,
        Command::BenchApi(opts) => nasd::tools::bench_api::run(opts).await?,
    }
    Ok(ExitCode::SUCCESS)
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

/// A cmd is a name such as `user_add`: lowercase letters, digits and underscores.
fn validate_cmd(cmd: &str) -> anyhow::Result<()> {
    let ok = cmd.chars().next().is_some_and(|c| c.is_ascii_lowercase())
        && cmd
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && cmd.len() <= 64;
    if !ok {
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

fn read_accounts_csv(file: &PathBuf) -> anyhow::Result<Vec<AccountRecord>> {
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .from_path(file)
        .with_context(|| format!("opening {}", file.display()))?;
    let headers: Vec<String> = reader
        .headers()
        .with_context(|| format!("{}: reading the header row", file.display()))?
        .iter()
        .map(str::to_string)
        .collect();
    for required in ["user_id", "abonent_id", "nas_id"] {
        if !headers.iter().any(|h| h == required) {
            bail!(
                "{}: the header row has no {required} column",
                file.display()
            );
        }
    }
    let mut records = Vec::new();
    for (i, row) in reader.records().enumerate() {
        let line = i + 2;
        let row = row.with_context(|| format!("{}: line {line}", file.display()))?;
        let values: Vec<String> = row.iter().map(str::to_string).collect();
        let rec = AccountRecord::from_fields(&headers, &values)
            .map_err(|e| anyhow::anyhow!("{}: line {line}: {e}", file.display()))?;
        records.push(rec);
    }
    Ok(records)
}

async fn nas_command(cmd: NasCommand, cfg: &Config) -> anyhow::Result<()> {
    let store = nasd::daemon::open_store(cfg).await?;
    match cmd {
        NasCommand::Add { id, fields } => {
            if store.nas_get(id).await?.is_some() {
                bail!("nas {id} already exists (use `nasd nas set {id} ...` to change it)");
            }
            let (Some(name), Some(ip)) = (fields.name.clone(), fields.ip.clone()) else {
                bail!("nas add needs --name and --ip");
            };
            if fields.scheme.is_some() == fields.script.is_some() {
                bail!("nas add needs exactly one of --scheme or --script");
            }
            let mut nas = Nas {
                id,
                name,
                ip,
                scheme: None,
                script_name: None,
                n_workers: 4,
                protocol: None,
                port: None,
                login: None,
                password: None,
                secret: None,
                max_sessions: 4,
                enabled: true,
                host_key_policy: "strict".into(),
                host_key: None,
                legacy_crypto: false,
            };
            fields.apply(&mut nas);
            store.nas_upsert(&nas).await?;
            println!("nas {id} added");
        }
        NasCommand::Set { id, fields } => {
            let Some(mut nas) = store.nas_get(id).await? else {
                bail!("nas {id} does not exist");
            };
            if fields.script.is_some() {
                nas.scheme = None;
            }
            fields.apply(&mut nas);
            store.nas_upsert(&nas).await?;
            println!("nas {id} updated (the daemon applies it at its next resync)");
        }
        NasCommand::Remove { id } => {
            if !store.nas_remove(id).await? {
                bail!("nas {id} does not exist");
            }
            println!("nas {id} removed (its queued events stay in events_stack)");
        }
        NasCommand::List { json } => {
            let list = store.nas_list().await?;
            if json {
                let rows: Vec<serde_json::Value> = list
                    .iter()
                    .map(|n| {
                        serde_json::json!({
                            "id": n.id, "name": n.name, "ip": n.ip, "scheme": n.scheme,
                            "script_name": n.script_name, "n_workers": n.n_workers,
                            "protocol": n.protocol, "port": n.port, "login": n.login,
                            "password_set": n.password.is_some(), "secret_set": n.secret.is_some(),
                            "max_sessions": n.max_sessions, "enabled": n.enabled,
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!(
                    "{:<6} {:<20} {:<16} {:<20} {:>7} {:>8} enabled",
                    "id", "name", "ip", "scheme/script", "workers", "sessions"
                );
                for n in list {
                    println!(
                        "{:<6} {:<20} {:<16} {:<20} {:>7} {:>8} {}",
                        n.id,
                        n.name,
                        n.ip,
                        n.scheme
                            .clone()
                            .or(n.script_name.clone())
                            .unwrap_or_default(),
                        n.n_workers,
                        n.max_sessions,
                        if n.enabled { "yes" } else { "no" }
                    );
                }
            }
        }
    }
    Ok(())
}

async fn send_now(
    cfg: &Config,
    nas_id: i64,
    cmd: &str,
    user_id: i64,
    dry_run: bool,
) -> anyhow::Result<ExitCode> {
    validate_cmd(cmd)?;
    let store: Store = nasd::daemon::open_store(cfg).await?;
    let Some(nas) = store.nas_get(nas_id).await? else {
        bail!("nas {nas_id} does not exist");
    };
    let Some(params) = store
        .account_params(&cfg.database.params_query, user_id)
        .await?
    else {
        bail!("unknown account user_id={user_id} (params_query returned no row)");
    };
    let (schemes, _) = nasd::scheme::SchemeSet::load_dir(&cfg.daemon.schemes_dir);
    let scheme = match (&nas.script_name, &nas.scheme) {
        (Some(_), _) => None,
        (None, Some(name)) => Some(schemes.get(name).with_context(|| {
            format!(
                "scheme {name} of nas {nas_id} not found (or broken) under {}",
                cfg.daemon.schemes_dir.display()
            )
        })?),
        (None, None) => bail!("nas {nas_id} has neither scheme nor script"),
    };
    let event = StackEvent {
        id: 0,
        compact_id: None,
        event_date: chrono::Utc::now(),
        enqueued_at: chrono::Utc::now(),
        cmd: cmd.to_string(),
        user_id,
        abonent_id: params.get("abonent_id").and_then(|v| v.as_i64()),
        nas_id,
        usluga_id: None,
        acct_session_id: None,
        params,
        try_count: 1,
        state: "running".into(),
        retry_at: None,
        claim_token: None,
        lease_until: None,
        last_error: None,
    };
    let device = match &scheme {
        Some(s) => {
            nasd::device::build(&nas, s, &cfg.daemon.transport).map_err(anyhow::Error::msg)?
        }
        None => None,
    };
    let runtime = nasd::dispatch::NasRuntime {
        nas: nas.clone(),
        scheme: scheme.clone(),
        unavailable: None,
        device: device.clone(),
    };
    if dry_run {
        let (vars, secrets) = nasd::dispatch::attempt_vars(&event, &nas);
        let lines = match (&nas.script_name, &scheme) {
            (Some(script), _) => vec![nasd::transport::exec::command_line(
                std::path::Path::new(script),
                cmd,
                &nasd::dispatch::env_pairs(&vars),
            )],
            (None, Some(s)) if s.transport == nasd::scheme::TransportKind::Exec => {
                if !s.defines(cmd) {
                    bail!("scheme {} does not define cmd {cmd}", s.name);
                }
                let script = s.script.clone().unwrap_or_default();
                vec![nasd::transport::exec::command_line(
                    &script,
                    cmd,
                    &nasd::dispatch::env_pairs(&vars),
                )]
            }
            (None, Some(s)) => {
                let mut all = vars;
                all.extend(secrets);
                s.render(cmd, &all)?
            }
            (None, None) => vec![],
        };
        // A template may put the NAS password or secret into a command: never print it.
        let secrets: Vec<&str> = [&nas.password, &nas.secret]
            .into_iter()
            .flatten()
            .map(|s| s.expose())
            .collect();
        for l in lines {
            println!("{}", nasd::transport::mask_secrets(&l, &secrets));
        }
        return Ok(ExitCode::SUCCESS);
    }
    let started = Instant::now();
    let reply = nasd::dispatch::send_event(&runtime, &event, cfg.daemon.exec_timeout).await;
    let took = started.elapsed();
    // A manual send is logged like the daemon's attempts, so the NAS and account logs
    // stay the full story of what reached the device (event=0 marks it as manual).
    if let Ok(journal) = nasd::journal::Journal::open_with(&cfg.daemon.log_dir, &cfg.log) {
        journal.attempt(
            &nasd::journal::NasTarget {
                id: nas.id,
                name: nas.name.clone(),
                ip: nas.ip.clone(),
            },
            &nasd::journal::AccountTarget {
                abonent_id: event.abonent_id,
                user_id,
            },
            &nasd::journal::Attempt {
                event_id: 0,
                cmd: cmd.to_string(),
                try_count: 1,
                commands: reply.commands.clone(),
                answer: reply.answer.clone(),
                outcome: match &reply.verdict {
                    nasd::transport::Verdict::Done => "done (manual send)".to_string(),
                    nasd::transport::Verdict::Retry(w)
                    | nasd::transport::Verdict::Unreachable(w)
                    | nasd::transport::Verdict::Requeue(w) => {
                        format!("manual send, would retry: {w}")
                    }
                    nasd::transport::Verdict::Failed(w) => format!("manual send failed: {w}"),
                },
                duration: took,
            },
        );
        journal.flush();
    }
    for c in &reply.commands {
        println!("send: {c}");
    }
    for l in reply.answer.lines() {
        println!("answer: {l}");
    }
    let (text, code) = match &reply.verdict {
        nasd::transport::Verdict::Done => ("done".to_string(), ExitCode::SUCCESS),
        nasd::transport::Verdict::Retry(why)
        | nasd::transport::Verdict::Unreachable(why)
        | nasd::transport::Verdict::Requeue(why) => {
            (format!("would retry: {why}"), ExitCode::from(2))
        }
        nasd::transport::Verdict::Failed(why) => (format!("failed: {why}"), ExitCode::FAILURE),
    };
    println!("outcome: {text} ({} ms)", took.as_millis());
    Ok(code)
}

/// One line of an enqueue file, parsed: its line number and the event or why not.
type FileLine = (u64, Result<CompactEvent, String>);

/// Reads an enqueue file: JSON lines when the first non-blank line starts with `{`,
/// else CSV with a header row. Each event is checked as the HTTP API checks it.
fn read_enqueue_file(file: &PathBuf) -> anyhow::Result<Vec<FileLine>> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let json_lines = text
        .lines()
        .find(|l| !l.trim().is_empty())
        .is_some_and(|l| l.trim_start().starts_with('{'));
    let mut out = Vec::new();
    if json_lines {
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let parsed = serde_json::from_str::<nasd::api::EventInput>(line)
                .map_err(|e| e.to_string())
                .and_then(nasd::api::EventInput::validate);
            out.push((i as u64 + 1, parsed));
        }
        return Ok(out);
    }
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .flexible(true)
        .from_reader(text.as_bytes());
    let headers: Vec<String> = reader
        .headers()
        .with_context(|| format!("{}: reading the header row", file.display()))?
        .iter()
        .map(str::to_string)
        .collect();
    const COLUMNS: [&str; 6] = [
        "cmd",
        "user_id",
        "abonent_id",
        "nas_ip",
        "usluga_id",
        "acct_session_id",
    ];
    if let Some(h) = headers.iter().find(|h| !COLUMNS.contains(&h.as_str())) {
        bail!(
            "{}: line 1: unknown column `{h}` (columns: {})",
            file.display(),
            COLUMNS.join(", ")
        );
    }
    for required in ["cmd", "user_id"] {
        if !headers.iter().any(|h| h == required) {
            bail!(
                "{}: line 1: the header row has no {required} column",
                file.display()
            );
        }
    }
    for record in reader.records() {
        let record = match record {
            Ok(r) => r,
            Err(e) => {
                let line = e.position().map_or(0, |p| p.line());
                out.push((line, Err(format!("unreadable CSV: {e}"))));
                continue;
            }
        };
        let line = record.position().map_or(0, |p| p.line());
        if record.len() != headers.len() {
            out.push((
                line,
                Err(format!(
                    "{} fields, the header has {}",
                    record.len(),
                    headers.len()
                )),
            ));
            continue;
        }
        let mut obj = serde_json::Map::new();
        let mut bad = None;
        for (h, v) in headers.iter().zip(record.iter()) {
            if v.is_empty() {
                continue;
            }
            if ["user_id", "abonent_id", "usluga_id"].contains(&h.as_str()) {
                match v.parse::<i64>() {
                    Ok(n) => {
                        obj.insert(h.clone(), n.into());
                    }
                    Err(_) => {
                        bad = Some(format!("column {h}: `{v}` is not an integer"));
                        break;
                    }
                }
            } else {
                obj.insert(h.clone(), v.into());
            }
        }
        let parsed = match bad {
            Some(why) => Err(why),
            None => serde_json::from_value::<nasd::api::EventInput>(serde_json::Value::Object(obj))
                .map_err(|e| e.to_string())
                .and_then(nasd::api::EventInput::validate),
        };
        out.push((line, parsed));
    }
    Ok(out)
}

/// `nasd enqueue --from-file`: enqueues the good lines in transactions of `batch`,
/// reports bad lines with their number, shows progress and a summary.
async fn enqueue_file(cfg: &Config, file: &PathBuf, batch: usize) -> anyhow::Result<ExitCode> {
    use std::io::{IsTerminal, Write};
    if batch == 0 {
        bail!("--batch must be at least 1");
    }
    let lines = read_enqueue_file(file)?;
    let store = nasd::daemon::open_store(cfg).await?;
    let total = lines.len();
    let started = Instant::now();
    let tty = std::io::stderr().is_terminal();
    let (mut enqueued, mut bad, mut done) = (0usize, 0usize, 0usize);
    let (mut first_id, mut last_id) = (None, None);
    let mut pending: Vec<CompactEvent> = Vec::with_capacity(batch);
    let mut last_report = Instant::now();
    let mut iter = lines.into_iter().peekable();
    while let Some((line, parsed)) = iter.next() {
        done += 1;
        match parsed {
            Ok(event) => pending.push(event),
            Err(why) => {
                bad += 1;
                if tty {
                    eprint!("\r\x1b[K");
                }
                eprintln!("{}: line {line}: {why} (skipped)", file.display());
            }
        }
        if pending.len() >= batch || (iter.peek().is_none() && !pending.is_empty()) {
            let ids = store.enqueue_compact(&pending).await.with_context(|| {
                format!(
                    "enqueueing lines up to {line} of {} ({enqueued} events were enqueued before)",
                    file.display()
                )
            })?;
            enqueued += ids.len();
            first_id = first_id.or(ids.first().copied());
            last_id = ids.last().copied().or(last_id);
            pending.clear();
        }
        if last_report.elapsed().as_millis() >= 200 || iter.peek().is_none() {
            last_report = Instant::now();
            let width = 30;
            let filled = (done * width).checked_div(total).unwrap_or(width);
            let msg = format!(
                "[{}{}] {done}/{total} lines, {enqueued} enqueued, {bad} skipped",
                "#".repeat(filled),
                "-".repeat(width - filled)
            );
            if tty {
                eprint!("\r\x1b[K{msg}");
                let _ = std::io::stderr().flush();
            } else if iter.peek().is_none() || done % (batch * 10) == 0 {
                eprintln!("{msg}");
            }
        }
    }
    if tty {
        eprintln!();
    }
    let secs = started.elapsed().as_secs_f64().max(1e-9);
    println!(
        "enqueued {enqueued} events from {} ({total} lines, {bad} skipped) in {secs:.2}s ({:.0} events/s){}",
        file.display(),
        enqueued as f64 / secs,
        match (first_id, last_id) {
            (Some(a), Some(b)) => format!("; ids {a}..{b}"),
            _ => String::new(),
        }
    );
    Ok(if bad > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
