//! `nasd send`: one event rendered and sent now, outside the queue, through the same
//! send routine the daemon's owners use (`dispatch::send_event`).

use std::process::ExitCode;

use anyhow::{Context, bail};
use tokio::time::Instant;

use crate::config::Config;
use crate::dispatch::{NasRuntime, attempt_vars, env_pairs, send_event};
use crate::journal::{AccountTarget, Attempt, Journal, NasTarget};
use crate::scheme::{SchemeSet, TransportKind};
use crate::store::{StackEvent, Store};
use crate::transport::exec::command_line;
use crate::transport::{Verdict, mask_secrets};

/// `nasd send`: renders the event for the NAS and sends it now (or with `--dry-run` only
/// prints the commands), journals the attempt as the daemon does (event 0), prints what
/// was sent and answered. Exit code 0 done, 2 would retry, 1 failed.
pub async fn run(
    cfg: &Config,
    nas_id: i64,
    cmd: &str,
    user_id: i64,
    dry_run: bool,
) -> anyhow::Result<ExitCode> {
    super::validate_cmd(cmd)?;
    let store: Store = crate::daemon::open_store(cfg).await?;
    let Some(nas) = store.nas_get(nas_id).await? else {
        bail!("nas {nas_id} does not exist");
    };
    let Some(params) = store
        .account_params(&cfg.database.params_query, user_id)
        .await?
    else {
        bail!("unknown account user_id={user_id} (params_query returned no row)");
    };
    let (schemes, _) = SchemeSet::load_dir(&cfg.daemon.schemes_dir);
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
        Some(s) => crate::transport::device::build(&nas, s, &cfg.daemon.transport)
            .map_err(anyhow::Error::msg)?,
        None => None,
    };
    let runtime = NasRuntime {
        nas: nas.clone(),
        scheme: scheme.clone(),
        unavailable: None,
        device: device.clone(),
        tenure: crate::transport::send::Tenure::new("nasd send", 0),
    };
    if dry_run {
        let (mut vars, secrets) = attempt_vars(&event, &nas);
        runtime.tenure.add_vars(&mut vars);
        let lines = match (&nas.script_name, &scheme) {
            (Some(script), _) => vec![command_line(
                std::path::Path::new(script),
                cmd,
                &env_pairs(&vars),
            )],
            (None, Some(s)) if s.transport == TransportKind::Exec => {
                if !s.defines(cmd) {
                    bail!("scheme {} does not define cmd {cmd}", s.name);
                }
                let script = s.script.clone().unwrap_or_default();
                vec![command_line(&script, cmd, &env_pairs(&vars))]
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
            println!("{}", mask_secrets(&l, &secrets));
        }
        return Ok(ExitCode::SUCCESS);
    }
    let started = Instant::now();
    let reply = send_event(&runtime, &event, cfg.daemon.exec_timeout).await;
    let took = started.elapsed();
    // A manual send is logged like the daemon's attempts, so the NAS and account logs
    // stay the full story of what reached the device (event=0 marks it as manual).
    if let Ok(journal) = Journal::open_with(&cfg.daemon.log_dir, &cfg.log) {
        journal.attempt(
            &NasTarget {
                id: nas.id,
                name: nas.name.clone(),
                ip: nas.ip.clone(),
            },
            &AccountTarget {
                abonent_id: event.abonent_id,
                user_id,
            },
            &Attempt {
                event_id: 0,
                cmd: cmd.to_string(),
                try_count: 1,
                commands: reply.commands.clone(),
                answer: reply.answer.clone(),
                outcome: match &reply.verdict {
                    Verdict::Done => "done (manual send)".to_string(),
                    Verdict::Retry(w) | Verdict::Unreachable(w) | Verdict::Requeue(w) => {
                        format!("manual send, would retry: {w}")
                    }
                    Verdict::Failed(w) => format!("manual send failed: {w}"),
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
        Verdict::Done => ("done".to_string(), ExitCode::SUCCESS),
        Verdict::Retry(why) | Verdict::Unreachable(why) | Verdict::Requeue(why) => {
            (format!("would retry: {why}"), ExitCode::from(2))
        }
        Verdict::Failed(why) => (format!("failed: {why}"), ExitCode::FAILURE),
    };
    println!("outcome: {text} ({} ms)", took.as_millis());
    Ok(code)
}
