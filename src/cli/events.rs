//! `nasd events list|retry|cancel` and `nasd audit`: the console's event browser and
//! bulk actions for scripts, on the database directly. A bulk action without `--yes`
//! only prints how many events match (and the first of them); with `--yes` it acts and
//! writes an audit row (`cli:<user>`).

use anyhow::bail;
use clap::{Args, Subcommand};

use crate::api::console::{BULK_MAX, FilterInput};
use crate::config::Config;
use crate::store::{AuditEntry, EventStatus, Store};

#[derive(Args, Debug, Default, Clone)]
pub struct FilterArgs {
    /// queued, retrying, running, failed (default), done or superseded.
    #[arg(long)]
    state: Option<String>,
    #[arg(long)]
    nas: Option<i64>,
    #[arg(long)]
    cmd: Option<String>,
    /// Case-insensitive part of the error text.
    #[arg(long = "error-like")]
    error_like: Option<String>,
    /// RFC 3339, or a duration back from now (15m, 1h, 2d).
    #[arg(long)]
    since: Option<String>,
    #[arg(long)]
    until: Option<String>,
    #[arg(long)]
    user_id: Option<i64>,
}

impl FilterArgs {
    fn input(&self) -> FilterInput {
        FilterInput {
            state: self.state.clone(),
            nas: self.nas,
            cmd: self.cmd.clone(),
            error: self.error_like.clone(),
            since: self.since.clone(),
            until: self.until.clone(),
            user_id: self.user_id,
        }
    }
}

#[derive(Subcommand)]
pub enum EventsCommand {
    /// List events in one state, newest first.
    List {
        #[command(flatten)]
        filter: FilterArgs,
        #[arg(long, default_value_t = 50)]
        limit: i64,
        #[arg(long)]
        json: bool,
    },
    /// Put failed events matching the filter into the queue again (`--yes` to act).
    Retry {
        #[command(flatten)]
        filter: FilterArgs,
        #[arg(long)]
        yes: bool,
    },
    /// Cancel queued or retrying events matching the filter (`--yes` to act).
    Cancel {
        #[command(flatten)]
        filter: FilterArgs,
        #[arg(long)]
        yes: bool,
    },
}

/// Who runs the CLI, for the audit log.
pub fn cli_user() -> String {
    let user = std::env::var("SUDO_USER")
        .or_else(|_| std::env::var("USER"))
        .unwrap_or_else(|_| "unknown".into());
    format!("cli:{user}")
}

fn line(e: &EventStatus) -> String {
    let when = e.finished_at.unwrap_or(e.enqueued_at);
    format!(
        "{:>10}  {}  {:<9} nas={:<5} user_id={:<8} {:<20} tries={}{}",
        e.id,
        when.format("%Y-%m-%d %H:%M:%S"),
        e.state,
        e.nas_id.map_or("-".to_string(), |n| n.to_string()),
        e.user_id,
        e.cmd,
        e.try_count,
        e.error
            .as_deref()
            .map(|x| format!("  error: {x}"))
            .unwrap_or_default()
    )
}

/// `nasd events ...`.
pub async fn run(cmd: EventsCommand, cfg: &Config) -> anyhow::Result<()> {
    let store: Store = crate::daemon::open_store(cfg).await?;
    let now = chrono::Utc::now();
    match cmd {
        EventsCommand::List {
            filter,
            limit,
            json,
        } => {
            if !(1..=500).contains(&limit) {
                bail!("--limit must be 1..500, got {limit}");
            }
            let mut q = filter.input().query(now).map_err(anyhow::Error::msg)?;
            q.limit = limit;
            let page = store.events_list(&q).await?;
            if json {
                for e in &page.events {
                    println!("{}", serde_json::to_string(e)?);
                }
            } else {
                for e in &page.events {
                    println!("{}", line(e));
                }
                if page.next_before.is_some() {
                    println!("(more: raise --limit or narrow the filter)");
                }
            }
        }
        EventsCommand::Retry { filter, yes } => bulk(&store, &filter, yes, true).await?,
        EventsCommand::Cancel { filter, yes } => bulk(&store, &filter, yes, false).await?,
    }
    Ok(())
}

async fn bulk(store: &Store, filter: &FilterArgs, yes: bool, retry: bool) -> anyhow::Result<()> {
    let input = filter.input();
    let q = input
        .query(chrono::Utc::now())
        .map_err(anyhow::Error::msg)?;
    let what = if retry { "retry" } else { "cancel" };
    let ids = store.events_match_ids(&q, BULK_MAX + 1).await?;
    if ids.len() as i64 > BULK_MAX {
        bail!(
            "more than {BULK_MAX} events match {}: narrow the filter",
            input.describe()
        );
    }
    if !yes {
        println!(
            "{} events match {} (nothing done: add --yes to {what} them)",
            ids.len(),
            input.describe()
        );
        return Ok(());
    }
    let outcome = if retry {
        store.bulk_retry(&ids).await?
    } else {
        store.bulk_cancel(&ids).await?
    };
    for (id, why) in &outcome.skipped {
        println!("skipped {id}: {why}");
    }
    println!(
        "{what}: {} of {} events{}",
        outcome.done.len(),
        ids.len(),
        if retry { " queued again" } else { " cancelled" }
    );
    store
        .audit_insert(&AuditEntry {
            who: cli_user(),
            action: what.into(),
            target: format!("filter {}", input.describe()),
            detail: format!("{} matched, {} skipped", ids.len(), outcome.skipped.len()),
            count: outcome.done.len() as i64,
        })
        .await?;
    Ok(())
}

/// `nasd audit`: operator actions, newest first.
pub async fn audit(cfg: &Config, limit: i64, json: bool) -> anyhow::Result<()> {
    if !(1..=1000).contains(&limit) {
        bail!("--limit must be 1..1000, got {limit}");
    }
    let store: Store = crate::daemon::open_store(cfg).await?;
    for row in store.audit_list(None, limit).await? {
        if json {
            println!("{}", serde_json::to_string(&row)?);
        } else {
            println!(
                "{}  {:<16} {:<16} {:<30} count={} {}",
                row.at.format("%Y-%m-%d %H:%M:%S"),
                row.who,
                row.action,
                row.target,
                row.count,
                row.detail
            );
        }
    }
    Ok(())
}
