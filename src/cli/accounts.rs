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
