//! `nasd stack count` and `nasd history`: what waits in the stacks and what finished.

use clap::Subcommand;

use crate::config::Config;

#[derive(Subcommand)]
pub enum StackCommand {
    /// Compact total, main-stack count per cmd and per NAS, age of the oldest event.
    Count {
        #[arg(long)]
        json: bool,
    },
}

/// `nasd stack count [--json]`.
pub async fn run(cmd: StackCommand, cfg: &Config) -> anyhow::Result<()> {
    let StackCommand::Count { json } = cmd;
    let store = crate::daemon::open_store(cfg).await?;
    let count = store.stack_count().await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&count)?);
        return Ok(());
    }
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
    Ok(())
}

/// `nasd history [--user-id N] [--limit N] [--json]`: finished events, newest last.
pub async fn history(
    cfg: &Config,
    user_id: Option<i64>,
    limit: i64,
    json: bool,
) -> anyhow::Result<()> {
    let store = crate::daemon::open_store(cfg).await?;
    let rows = store.history(user_id, limit).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
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
    Ok(())
}
