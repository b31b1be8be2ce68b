//! One event rendered and sent now, outside the queue, through the same send routine
//! the owners use: `nasd send` and the console's "send a test command" (`POST
//! /api/v1/nas/{id}/send`). A dry run only renders. The attempt is journaled like the
//! daemon's (event 0 marks it as manual), so the NAS and account logs stay the whole
//! story of what reached the device. Also the login probe of a NAS (`probe`).

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::billing::Billing;
use crate::config::DaemonConfig;
use crate::journal::{AccountTarget, Attempt, Journal, NasTarget};
use crate::model::{Nas, StackEvent};
use crate::scheme::{Scheme, SchemeSet, TransportKind};
use crate::store::Store;
use crate::transport::exec::command_line;
use crate::transport::send::{NasRuntime, Tenure, attempt_vars, env_pairs, send_event};
use crate::transport::{Verdict, mask_secrets};

/// What to send.
#[derive(Debug, Clone, Default)]
pub struct ManualSend {
    pub nas_id: i64,
    pub cmd: String,
    pub user_id: i64,
    pub acct_session_id: Option<String>,
    pub usluga_id: Option<i64>,
    /// Extra variables for the templates (`--param NAME=VALUE`), over the account's.
    pub params: Vec<(String, String)>,
    pub dry_run: bool,
    /// Who asked (the console's token name, `nasd send`), for the logs.
    pub by: String,
}

/// What happened: the commands (secrets masked), the answer and the outcome.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Sent {
    pub commands: Vec<String>,
    pub answer: String,
    /// `done`, `retry`, `failed` or `dry_run`.
    pub outcome: &'static str,
    pub error: Option<String>,
    pub ms: u64,
}

/// The NAS, its scheme (None for a NAS with its own script) and the account's variables.
async fn prepare(
    cfg: &DaemonConfig,
    store: &Store,
    params_query: &str,
    billing: Option<&Billing>,
    req: &ManualSend,
) -> Result<(Nas, Option<Arc<Scheme>>, StackEvent), String> {
    let nas = store
        .nas_get(req.nas_id)
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("nas {} does not exist", req.nas_id))?;
    // With `[billing]` the account's variables live in the billing database.
    let found = match billing {
        Some(b) => b.params_one(req.user_id).await.map_err(|e| e.to_string())?,
        None => store
            .account_params(params_query, req.user_id)
            .await
            .map_err(|e| e.to_string())?,
    };
    let mut params = found.ok_or_else(|| {
        format!(
            "unknown account user_id={} (params_query returned no row)",
            req.user_id
        )
    })?;
    for (k, v) in &req.params {
        params.insert(k.clone(), v.clone().into());
    }
    let scheme = scheme_of(cfg, &nas)?;
    let event = StackEvent {
        id: 0,
        compact_id: None,
        event_date: chrono::Utc::now(),
        enqueued_at: chrono::Utc::now(),
        cmd: req.cmd.clone(),
        user_id: req.user_id,
        abonent_id: params.get("abonent_id").and_then(|v| v.as_i64()),
        nas_id: nas.id,
        usluga_id: req.usluga_id,
        acct_session_id: req.acct_session_id.clone(),
        params,
        try_count: 1,
        state: "running".into(),
        retry_at: None,
        claim_token: None,
        lease_until: None,
        last_error: None,
    };
    Ok((nas, scheme, event))
}

/// The scheme of a NAS from the schemes directory (None: the NAS runs its own script).
pub fn scheme_of(cfg: &DaemonConfig, nas: &Nas) -> Result<Option<Arc<Scheme>>, String> {
    match (&nas.script_name, &nas.scheme) {
        (Some(_), _) => Ok(None),
        (None, Some(name)) => {
            let (schemes, _) = SchemeSet::load_dirs(&cfg.schemes_dirs());
            schemes.get(name).map(Some).ok_or_else(|| {
                format!(
                    "scheme {name} of nas {} not found (or broken) under {}",
                    nas.id,
                    cfg.schemes_shown()
                )
            })
        }
        (None, None) => Err(format!("nas {} has neither scheme nor script", nas.id)),
    }
}

fn secrets_of(nas: &Nas) -> Vec<&str> {
    [&nas.password, &nas.secret]
        .into_iter()
        .flatten()
        .map(|s| s.expose())
        .collect()
}

/// Renders (dry run) or sends one event now, with the account's variables from the
/// billing database when there is one (`[billing]`), else from `params_query`. Errors are what stopped it before anything
/// was sent: an unknown NAS or account, a missing scheme, a template error on a dry run.
pub async fn send(
    cfg: &DaemonConfig,
    store: &Store,
    params_query: &str,
    billing: Option<&Billing>,
    journal: Option<&Journal>,
    req: &ManualSend,
) -> Result<Sent, String> {
    let (nas, scheme, event) = prepare(cfg, store, params_query, billing, req).await?;
    let secrets = secrets_of(&nas);
    let runtime_tenure = Tenure::new(&req.by, 0);
    if req.dry_run {
        let (mut vars, secret_vars) = attempt_vars(&event, &nas);
        runtime_tenure.add_vars(&mut vars);
        let lines = match (&nas.script_name, &scheme) {
            (Some(script), _) => vec![command_line(
                std::path::Path::new(script),
                &req.cmd,
                &env_pairs(&vars),
            )],
            (None, Some(s)) if s.transport == TransportKind::Exec => {
                if !s.defines(&req.cmd) {
                    return Err(format!("scheme {} does not define cmd {}", s.name, req.cmd));
                }
                let script = s.script.clone().unwrap_or_default();
                vec![command_line(&script, &req.cmd, &env_pairs(&vars))]
            }
            (None, Some(s)) => {
                let mut all = vars;
                all.extend(secret_vars);
                s.render(&req.cmd, &all).map_err(|e| e.to_string())?
            }
            (None, None) => vec![],
        };
        return Ok(Sent {
            commands: lines.iter().map(|l| mask_secrets(l, &secrets)).collect(),
            answer: String::new(),
            outcome: "dry_run",
            error: None,
            ms: 0,
        });
    }
    let device = match &scheme {
        Some(s) => crate::transport::device::build(&nas, s, &cfg.transport)?,
        None => None,
    };
    let runtime = NasRuntime {
        nas: nas.clone(),
        scheme: scheme.clone(),
        unavailable: None,
        device: device.clone(),
        tenure: runtime_tenure,
    };
    let started = Instant::now();
    let reply = send_event(&runtime, &event, cfg.exec_timeout).await;
    let took = started.elapsed();
    if let Some(device) = &device {
        device.close().await;
    }
    let (outcome, error) = match &reply.verdict {
        Verdict::Done => ("done", None),
        Verdict::Retry(w) | Verdict::Unreachable(w) | Verdict::Requeue(w) => {
            ("retry", Some(w.clone()))
        }
        Verdict::Failed(w) => ("failed", Some(w.clone())),
    };
    if let Some(journal) = journal {
        journal.attempt(
            &NasTarget {
                id: nas.id,
                name: nas.name.clone(),
                ip: nas.ip.clone(),
            },
            &AccountTarget {
                abonent_id: event.abonent_id,
                user_id: req.user_id,
            },
            &Attempt {
                event_id: 0,
                cmd: req.cmd.clone(),
                try_count: 1,
                commands: reply.commands.clone(),
                answer: reply.answer.clone(),
                outcome: match &reply.verdict {
                    Verdict::Done => format!("done (manual send by {})", req.by),
                    Verdict::Retry(w) | Verdict::Unreachable(w) | Verdict::Requeue(w) => {
                        format!("manual send by {}, would retry: {w}", req.by)
                    }
                    Verdict::Failed(w) => format!("manual send by {} failed: {w}", req.by),
                },
                duration: took,
            },
        );
    }
    Ok(Sent {
        commands: reply
            .commands
            .iter()
            .map(|c| mask_secrets(c, &secrets))
            .collect(),
        answer: mask_secrets(&reply.answer, &secrets),
        outcome,
        error: error.map(|e| mask_secrets(&e, &secrets)),
        ms: took.as_millis() as u64,
    })
}

/// A fresh login to a NAS, timed: a new session (not one of the owner's) is opened and
/// closed. Transports without a session (RADIUS, scripts) have nothing to log in to.
pub async fn probe(cfg: &DaemonConfig, nas: &Nas) -> Result<Duration, String> {
    let scheme = scheme_of(cfg, nas)?.ok_or_else(|| {
        format!(
            "nas {} runs a script: there is nothing to log in to",
            nas.id
        )
    })?;
    let device = crate::transport::device::build(nas, &scheme, &cfg.transport)?
        .ok_or_else(|| format!("nas {}: transport has no device", nas.id))?;
    let started = Instant::now();
    let result = device.login(scheme.timeout).await;
    let took = started.elapsed();
    device.close().await;
    result.map(|()| took).map_err(|e| {
        let secrets = secrets_of(nas);
        mask_secrets(&e, &secrets)
    })
}
