//! `nasd accounts import`: the reference accounts table from a CSV file.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Subcommand;

use crate::config::Config;
use crate::store::AccountRecord;

#[derive(Subcommand)]
pub enum AccountsCommand {
    /// Import (insert or update) accounts from a CSV file with a header row of variable
    /// names; user_id, abonent_id and nas_id are required; other columns become variables.
    Import { file: PathBuf },
    /// Find accounts by user id, login (exact or prefix), IP or MAC.
    Search {
        query: String,
        #[arg(long, default_value_t = 20)]
        limit: i64,
    },
}

/// `nasd accounts import FILE`.
pub async fn run(cmd: AccountsCommand, cfg: &Config) -> anyhow::Result<()> {
    match cmd {
        AccountsCommand::Import { file } => {
            let store = crate::daemon::open_store(cfg).await?;
            let records = read_accounts_csv(&file)?;
            let n = store.accounts_upsert(&records).await?;
            println!("imported {n} accounts from {}", file.display());
        }
        AccountsCommand::Search { query, limit } => {
            if !(1..=500).contains(&limit) {
                bail!("--limit must be 1..500, got {limit}");
            }
            if query.trim().is_empty() {
                bail!("give a user id, login, IP or MAC to search for");
            }
            let store = crate::daemon::open_store(cfg).await?;
            let hits = store.account_search(query.trim(), limit).await?;
            if hits.is_empty() {
                println!("no account matches `{}`", query.trim());
            }
            for h in hits {
                println!(
                    "user_id={} abonent_id={} nas={} login={} ip={} mac={}",
                    h.user_id,
                    h.abonent_id,
                    h.nas_id,
                    h.login.as_deref().unwrap_or("-"),
                    h.ip.as_deref().unwrap_or("-"),
                    h.mac.as_deref().unwrap_or("-")
                );
            }
        }
    }
    Ok(())
}

fn read_accounts_csv(file: &Path) -> anyhow::Result<Vec<AccountRecord>> {
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
