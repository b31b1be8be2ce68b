//! `nasd send`: one event rendered and sent now, outside the queue, through the same
//! send routine the daemon's owners use (`dispatch::manual`).

use std::process::ExitCode;

use crate::config::Config;
use crate::journal::Journal;
use crate::manual::{self, ManualSend};
use crate::store::Store;

/// `nasd send`: renders the event for the NAS and sends it now (or with `--dry-run` only
/// prints the commands), journals the attempt as the daemon does (event 0), prints what
/// was sent and answered. Exit code 0 done, 2 would retry, 1 failed.
pub async fn run(cfg: &Config, req: ManualSend) -> anyhow::Result<ExitCode> {
    super::validate_cmd(&req.cmd)?;
    let store: Store = crate::daemon::open_store(cfg).await?;
    let journal = if req.dry_run {
        None
    } else {
        Journal::open_with(&cfg.daemon.log_dir, &cfg.log).ok()
    };
    let billing = match &cfg.billing {
        Some(b) => Some(
            crate::billing::Billing::connect_lazy(b)
                .map_err(|e| anyhow::anyhow!("[billing] {}: {e}", b.shown_url()))?,
        ),
        None => None,
    };
    let sent = manual::send(
        &cfg.daemon,
        &store,
        &cfg.database.params_query,
        billing.as_ref(),
        journal.as_ref(),
        &req,
    )
    .await
    .map_err(anyhow::Error::msg)?;
    if let Some(b) = &billing {
        b.close().await;
    }
    if let Some(j) = &journal {
        j.flush();
    }
    if sent.outcome == "dry_run" {
        for l in &sent.commands {
            println!("{l}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    for c in &sent.commands {
        println!("send: {c}");
    }
    for l in sent.answer.lines() {
        println!("answer: {l}");
    }
    let why = sent.error.clone().unwrap_or_default();
    let (text, code) = match sent.outcome {
        "done" => ("done".to_string(), ExitCode::SUCCESS),
        "retry" => (format!("would retry: {why}"), ExitCode::from(2)),
        _ => (format!("failed: {why}"), ExitCode::FAILURE),
    };
    println!("outcome: {text} ({} ms)", sent.ms);
    Ok(code)
}
