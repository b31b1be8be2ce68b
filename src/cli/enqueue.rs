//! `nasd enqueue`: one event into the compact stack, or many from a CSV or JSON-lines
//! file (`--from-file`), checked line by line as the HTTP API checks them.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Args;
use tokio::time::Instant;

use crate::api::EventInput;
use crate::config::Config;
use crate::store::CompactEvent;

#[derive(Args)]
pub struct EnqueueArgs {
    #[arg(long, required_unless_present = "from_file")]
    pub cmd: Option<String>,
    #[arg(long, required_unless_present = "from_file")]
    pub user_id: Option<i64>,
    #[arg(long)]
    pub abonent_id: Option<i64>,
    #[arg(long)]
    pub nas_ip: Option<String>,
    #[arg(long)]
    pub usluga_id: Option<i64>,
    #[arg(long)]
    pub acct_session_id: Option<String>,
    /// Enqueue every line of FILE: CSV with a header row (cmd, user_id, abonent_id,
    /// nas_ip, usluga_id, acct_session_id) or JSON lines (one object per line). A bad
    /// line is reported with its number and skipped; exit code 1 when any was skipped.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["cmd", "user_id", "abonent_id", "nas_ip", "usluga_id", "acct_session_id"])]
    pub from_file: Option<PathBuf>,
    /// Events per transaction with --from-file.
    #[arg(long, default_value_t = 1000, requires = "from_file")]
    pub batch: usize,
}

/// `nasd enqueue`: prints the id of the event, or with `--from-file` a summary (exit
/// code 1 when a line was skipped).
pub async fn run(args: EnqueueArgs, cfg: &Config) -> anyhow::Result<ExitCode> {
    if let Some(file) = &args.from_file {
        return enqueue_file(cfg, file, args.batch).await;
    }
    let (Some(cmd), Some(user_id)) = (args.cmd, args.user_id) else {
        bail!("enqueue needs --cmd and --user-id (or --from-file FILE)");
    };
    super::validate_cmd(&cmd)?;
    if user_id <= 0 {
        bail!("--user-id must be a positive number, got {user_id}");
    }
    // Checked as the HTTP API and `--from-file` check an event (a nas_ip that is no IP
    // address is refused, naming it); the IP is written as they write it.
    let event = EventInput {
        cmd,
        user_id,
        abonent_id: args.abonent_id,
        nas_ip: args.nas_ip,
        usluga_id: args.usluga_id,
        acct_session_id: args.acct_session_id,
    }
    .validate()
    .map_err(|why| anyhow::Error::msg(option_names(&why)))?;
    let store = crate::daemon::open_store(cfg).await?;
    let ids = store.enqueue_compact(&[event]).await?;
    for id in ids {
        println!("{id}");
    }
    Ok(ExitCode::SUCCESS)
}

/// An event check's message as the command line names things: `nas_ip` becomes
/// `--nas-ip` (and so on) where it starts a message about that field. Pure.
fn option_names(why: &str) -> String {
    for field in [
        "nas_ip",
        "abonent_id",
        "usluga_id",
        "acct_session_id",
        "user_id",
    ] {
        if let Some(rest) = why.strip_prefix(field) {
            return format!("--{}{rest}", field.replace('_', "-"));
        }
    }
    why.to_string()
}

/// One line of an enqueue file, parsed: its line number and the event or why not.
type FileLine = (u64, Result<CompactEvent, String>);

/// Reads an enqueue file and parses it with [`parse_enqueue_file`].
fn read_enqueue_file(file: &Path) -> anyhow::Result<Vec<FileLine>> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    parse_enqueue_file(&text, file)
}

/// Parses the text of an enqueue file: JSON lines when the first non-blank line starts
/// with `{`, else CSV with a header row. Each event is checked as the HTTP API checks it;
/// `file` only names the file in errors about the whole file (a bad header row).
fn parse_enqueue_file(text: &str, file: &Path) -> anyhow::Result<Vec<FileLine>> {
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
            let parsed = serde_json::from_str::<EventInput>(line)
                .map_err(|e| e.to_string())
                .and_then(EventInput::validate);
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
            None => serde_json::from_value::<EventInput>(serde_json::Value::Object(obj))
                .map_err(|e| e.to_string())
                .and_then(EventInput::validate),
        };
        out.push((line, parsed));
    }
    Ok(out)
}

/// `nasd enqueue --from-file`: enqueues the good lines in transactions of `batch`,
/// reports bad lines with their number, shows progress and a summary.
async fn enqueue_file(cfg: &Config, file: &Path, batch: usize) -> anyhow::Result<ExitCode> {
    use std::io::{IsTerminal, Write};
    if batch == 0 {
        bail!("--batch must be at least 1");
    }
    let lines = read_enqueue_file(file)?;
    let store = crate::daemon::open_store(cfg).await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_nas_ip_is_named_as_the_option() {
        let why = EventInput {
            cmd: "user_add".into(),
            user_id: 1,
            abonent_id: None,
            nas_ip: Some("10.0.0.999".into()),
            usluga_id: None,
            acct_session_id: None,
        }
        .validate()
        .expect_err("10.0.0.999 is no IP address");
        assert_eq!(
            option_names(&why),
            "--nas-ip `10.0.0.999` is not an IP address"
        );
        assert_eq!(
            option_names("abonent_id must be a positive integer, got 0"),
            "--abonent-id must be a positive integer, got 0"
        );
        assert_eq!(
            option_names("cmd `x y` is not a cmd name"),
            "cmd `x y` is not a cmd name"
        );
    }

    fn event(cmd: &str, user_id: i64) -> CompactEvent {
        CompactEvent {
            cmd: cmd.into(),
            user_id,
            ..Default::default()
        }
    }

    /// Each line's number and either the event or a part of the reason it was refused.
    fn parsed(text: &str) -> Vec<(u64, Result<CompactEvent, String>)> {
        parse_enqueue_file(text, Path::new("events.csv")).expect("the file as a whole is read")
    }

    fn check(text: &str, expect: &[(u64, Result<CompactEvent, &str>)]) {
        let got = parsed(text);
        assert_eq!(got.len(), expect.len(), "{text:?}: {got:?}");
        for ((line, got), (want_line, want)) in got.iter().zip(expect) {
            assert_eq!(line, want_line, "{text:?}");
            match (got, want) {
                (Ok(g), Ok(w)) => assert_eq!(g, w, "{text:?} line {line}"),
                (Err(g), Err(w)) => assert!(g.contains(w), "{text:?} line {line}: {g}"),
                _ => panic!("{text:?} line {line}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn json_lines_are_numbered_and_checked_one_by_one() {
        check(
            "{\"cmd\":\"user_add\",\"user_id\":1}\n\n{\"cmd\":\"User add\",\"user_id\":2}\n{\"cmd\":\"user_drop\"}\n{\"cmd\":\"user_drop\",\"user_id\":3,\"nas_ip\":\"10.0.0.1\"}\n",
            &[
                (1, Ok(event("user_add", 1))),
                (3, Err("is not a cmd name")),
                (4, Err("user_id")),
                (
                    5,
                    Ok(CompactEvent {
                        nas_ip: Some("10.0.0.1".into()),
                        ..event("user_drop", 3)
                    }),
                ),
            ],
        );
    }

    #[test]
    fn csv_rows_are_numbered_and_checked_one_by_one() {
        check(
            "cmd,user_id,abonent_id,acct_session_id\nuser_add, 1 ,,\nuser_drop,x,,\nuser_drop,2\nuser_info,0,,\nuser_drop,4,40,s-4\n",
            &[
                (2, Ok(event("user_add", 1))),
                (3, Err("column user_id: `x` is not an integer")),
                (4, Err("2 fields, the header has 4")),
                (5, Err("user_id must be a positive integer")),
                (
                    6,
                    Ok(CompactEvent {
                        abonent_id: Some(40),
                        acct_session_id: Some("s-4".into()),
                        ..event("user_drop", 4)
                    }),
                ),
            ],
        );
    }

    #[test]
    fn a_bad_csv_header_refuses_the_whole_file() {
        for (text, why) in [
            (
                "cmd,user_id,colour\nuser_add,1,red\n",
                "unknown column `colour`",
            ),
            ("cmd,abonent_id\nuser_add,1\n", "has no user_id column"),
            ("user_id\n1\n", "has no cmd column"),
        ] {
            let err = parse_enqueue_file(text, Path::new("events.csv"))
                .expect_err(text)
                .to_string();
            assert!(err.starts_with("events.csv: line 1: "), "{err}");
            assert!(err.contains(why), "{err}");
        }
    }
}
