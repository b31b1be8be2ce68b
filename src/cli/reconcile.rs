//! `nasd reconcile`: reads what a NAS holds through a session of its own, compares it
//! with what the NAS's accounts should have, prints the differences and the fixing
//! events, and with `--apply` enqueues them (`crate::reconcile`).

use std::process::ExitCode;

use crate::config::Config;
use crate::journal::Journal;
use crate::reconcile::{Context, Request};
use crate::store::Store;

/// Exit code 0: nothing to fix (or the fixes were enqueued); 3: differences found and
/// not applied (for scripts and monitoring); errors exit 1.
pub async fn run(cfg: &Config, req: Request, json: bool) -> anyhow::Result<ExitCode> {
    let store: Store = crate::daemon::open_store(cfg).await?;
    let journal = Journal::open_with(&cfg.daemon.log_dir, &cfg.log).ok();
    let billing = match &cfg.billing {
        Some(b) => Some(
            crate::billing::Billing::connect_lazy(b)
                .map_err(|e| anyhow::anyhow!("[billing] {}: {e}", b.shown_url()))?,
        ),
        None => None,
    };
    let ctx = Context {
        cfg: &cfg.daemon,
        store: &store,
        params_query: &cfg.database.params_query,
        billing: billing.as_ref(),
        journal: journal.as_ref(),
    };
    let report = crate::reconcile::run(&ctx, None, &req).await;
    if let Some(b) = &billing {
        b.close().await;
    }
    if let Some(j) = &journal {
        j.flush();
    }
    let report = report.map_err(anyhow::Error::msg)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for line in report.lines(req.apply) {
            println!("{line}");
        }
    }
    Ok(if !req.apply && !report.fixes.is_empty() {
        ExitCode::from(3)
    } else {
        ExitCode::SUCCESS
    })
}
