//! Reconciliation: what a NAS really holds against what its accounts' variables say it
//! should hold (`[state]` of its scheme, compared by `scheme::state`), and the events
//! that fix the differences, enqueued through the normal pipeline (the compact stack:
//! they expand after what is already queued, are sent in order per account, logged and
//! kept in history like any billing event).
//!
//! Run by `nasd reconcile` (a device of its own, one session), and by the daemon
//! (`[reconcile] every` and when a NAS comes back after being down) through the
//! owner's device, so that reading borrows one of the NAS's `max_sessions` sessions and
//! the queue keeps moving on the others.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::billing::Billing;
use crate::config::{DaemonConfig, ReconcileConfig};
use crate::journal::Journal;
use crate::model::{CompactEvent, Nas, Vars};
use crate::scheme::Scheme;
use crate::scheme::state::{AccountExpectation, Comparison, NasState, StateSpec};
use crate::stats::Stats;
use crate::store::Store;
use crate::transport::device::Device;
use crate::transport::mask_secrets;

/// What to reconcile.
#[derive(Debug, Clone)]
pub struct Request {
    pub nas_id: i64,
    /// One account only (strays are then not reported).
    pub account: Option<i64>,
    /// Enqueue the fixing events.
    pub apply: bool,
    /// Who asked, for the logs (`nasd reconcile`, `schedule`, `nas back up`).
    pub by: String,
}

/// What a run found (and enqueued).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub nas_id: i64,
    pub nas_name: String,
    pub nas_ip: String,
    pub scheme: String,
    /// Commands sent to read the state.
    pub commands: Vec<String>,
    pub read_ms: u64,
    /// Answer lines read and facts found in them.
    pub read_lines: usize,
    pub facts: usize,
    /// Accounts of the NAS (or the one asked) and how many were compared.
    pub accounts: usize,
    #[serde(flatten)]
    pub comparison: Comparison,
    /// The events that fix the differences: (user_id, cmd).
    pub fixes: Vec<(i64, String)>,
    /// With `apply`: the compact stack ids of the enqueued fixes, in the order of `fixes`.
    pub enqueued: Vec<i64>,
}

impl Report {
    /// One line for the daemon log.
    pub fn summary(&self, by: &str, applied: bool) -> String {
        let fixes = if applied {
            format!("{} events enqueued", self.enqueued.len())
        } else {
            format!("{} events would fix them", self.fixes.len())
        };
        format!(
            "reconcile nas {} ({} {}) by {by}: read {} lines in {} ms, {} accounts compared, \
             {} differences, {} strays, {} problems; {fixes}",
            self.nas_id,
            self.nas_name,
            self.nas_ip,
            self.read_lines,
            self.read_ms,
            self.comparison.compared,
            self.comparison.differences.len(),
            self.comparison.strays.len(),
            self.comparison.problems.len(),
        )
    }

    /// The report as an operator reads it: one line per difference, stray and problem,
    /// then the totals.
    pub fn lines(&self, applied: bool) -> Vec<String> {
        let mut out = vec![format!(
            "nas {} ({}, {}), scheme {}: read {} lines, {} facts in {} ms; {} of {} accounts compared",
            self.nas_id,
            self.nas_name,
            self.nas_ip,
            self.scheme,
            self.read_lines,
            self.facts,
            self.read_ms,
            self.comparison.compared,
            self.accounts,
        )];
        for d in &self.comparison.differences {
            let what = match d.kind {
                crate::scheme::state::Kind::Missing => format!(
                    "missing on the NAS (expected {})",
                    d.expected.as_deref().unwrap_or("")
                ),
                crate::scheme::state::Kind::Extra => format!(
                    "on the NAS ({}) but not expected",
                    d.found.as_deref().unwrap_or("")
                ),
                crate::scheme::state::Kind::Differs => format!(
                    "differs: expected {}, found {}",
                    d.expected.as_deref().unwrap_or(""),
                    d.found.as_deref().unwrap_or("")
                ),
            };
            let fix = match &d.fix {
                Some(cmd) => format!(" -> {cmd}"),
                None => " (the scheme names no cmd to fix it)".to_string(),
            };
            out.push(format!(
                "user {} ({}): {} {what}{fix}",
                d.user_id, d.key, d.fact
            ));
        }
        for s in &self.comparison.strays {
            out.push(format!(
                "stray: {} ({}) on the NAS belongs to no account of nas {}: left alone",
                s.key,
                s.facts.join(", "),
                self.nas_id
            ));
        }
        for p in &self.comparison.problems {
            match p.user_id {
                Some(u) => out.push(format!("problem: user {u}: {}", p.message)),
                None => out.push(format!("problem: {}", p.message)),
            }
        }
        let tail = if applied {
            format!(
                "{} events enqueued{}",
                self.enqueued.len(),
                match (self.enqueued.first(), self.enqueued.last()) {
                    (Some(a), Some(b)) if a != b => format!(" (compact ids {a}-{b})"),
                    (Some(a), _) => format!(" (compact id {a})"),
                    _ => String::new(),
                }
            )
        } else if self.fixes.is_empty() {
            "nothing to fix".to_string()
        } else {
            format!(
                "{} events would fix them (run with --apply to enqueue them)",
                self.fixes.len()
            )
        };
        out.push(format!(
            "{} differences, {} strays, {} problems; {tail}",
            self.comparison.differences.len(),
            self.comparison.strays.len(),
            self.comparison.problems.len(),
        ));
        out
    }
}

/// The NAS's `[state]` spec, or why it has none.
fn spec_of(scheme: &Scheme) -> Result<&StateSpec, String> {
    scheme.state.as_ref().ok_or_else(|| {
        format!(
            "scheme {} declares no [state]: nasd cannot read what the NAS holds (see README, Reconciliation)",
            scheme.name
        )
    })
}

/// Reads the NAS's state through `device` (one session of its pool): every `[state]`
/// command in order; an answer matching the scheme's failure patterns stops the read.
pub async fn read_state(
    device: &Device,
    scheme: &Scheme,
    spec: &StateSpec,
) -> Result<NasState, String> {
    let commands = spec.commands();
    let answers = device.read(&commands, spec.timeout).await?;
    if answers.len() != commands.len() {
        return Err(format!(
            "the NAS answered {} of {} state commands",
            answers.len(),
            commands.len()
        ));
    }
    for (command, answer) in commands.iter().zip(&answers) {
        for line in answer.lines() {
            if scheme.answers.failure.iter().any(|re| re.is_match(line)) {
                return Err(format!("the NAS refused `{command}`: {}", line.trim()));
            }
        }
    }
    Ok(spec.parse_answers(&answers))
}

/// The variables of `users`: from the billing database (`[billing]`), else from
/// `params_query` on nasd's database. An account without a row is left out.
async fn variables(
    store: &Store,
    params_query: &str,
    billing: Option<&Billing>,
    users: &[i64],
) -> Result<HashMap<i64, Vars>, String> {
    let mut out = HashMap::with_capacity(users.len());
    match billing {
        Some(b) => {
            for chunk in users.chunks(1000) {
                let found = b.params(chunk).await.map_err(|e| e.to_string())?;
                out.extend(found.into_iter().filter_map(|(u, v)| v.map(|v| (u, v))));
            }
        }
        None => {
            for &user in users {
                if let Some(v) = store
                    .account_params(params_query, user)
                    .await
                    .map_err(|e| e.to_string())?
                {
                    out.insert(user, v);
                }
            }
        }
    }
    Ok(out)
}

/// Everything a run needs besides the request.
pub struct Context<'a> {
    pub cfg: &'a DaemonConfig,
    pub store: &'a Store,
    pub params_query: &'a str,
    pub billing: Option<&'a Billing>,
    pub journal: Option<&'a Journal>,
}

/// One reconciliation of one NAS: read, compare, and with `apply` enqueue the fixes.
/// `device`: the owner's (daemon) or None to open one of its own (`nasd reconcile`,
/// closed afterwards). Errors are what stopped it before anything was enqueued.
pub async fn run(
    ctx: &Context<'_>,
    device: Option<Device>,
    req: &Request,
) -> Result<Report, String> {
    let nas = ctx
        .store
        .nas_get(req.nas_id)
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("nas {} does not exist", req.nas_id))?;
    let scheme = crate::manual::scheme_of(ctx.cfg, &nas)?.ok_or_else(|| {
        format!(
            "nas {} runs its own script {}: it has no scheme to read its state with",
            nas.id,
            nas.script_name.as_deref().unwrap_or("")
        )
    })?;
    let spec = spec_of(&scheme)?;
    let secrets = secrets_of(&nas);
    let accounts = ctx
        .store
        .accounts_of_nas(nas.id, req.account)
        .await
        .map_err(|e| e.to_string())?;
    if let Some(user) = req.account
        && accounts.is_empty()
    {
        return Err(format!(
            "account user_id={user} is not an account of nas {} (accounts.nas_id)",
            nas.id
        ));
    }
    let users: Vec<i64> = accounts.iter().map(|(u, _)| *u).collect();
    let vars = variables(ctx.store, ctx.params_query, ctx.billing, &users).await?;

    let (device, own) = match device {
        Some(d) => (d, false),
        None => (
            crate::transport::device::build(&nas, &scheme, &ctx.cfg.transport)?
                .ok_or_else(|| format!("nas {}: transport has no device", nas.id))?,
            true,
        ),
    };
    let started = Instant::now();
    let read = read_state(&device, &scheme, spec).await;
    let read_ms = started.elapsed().as_millis() as u64;
    if own {
        device.close().await;
    }
    let state = read.map_err(|e| {
        format!(
            "nas {} ({}): {}",
            nas.id,
            nas.ip,
            mask_secrets(&e, &secrets)
        )
    })?;

    let expectations: Vec<AccountExpectation> = users
        .iter()
        .map(|&user_id| AccountExpectation {
            user_id,
            expected: match vars.get(&user_id) {
                Some(v) => spec.expected(v),
                None => Err("params_query returned no row".to_string()),
            },
        })
        .collect();
    let comparison = spec.compare(&state, &expectations, req.account.is_none());
    let fixes = comparison.fixes();
    let mut report = Report {
        nas_id: nas.id,
        nas_name: nas.name.clone(),
        nas_ip: nas.ip.clone(),
        scheme: scheme.name.clone(),
        commands: spec.commands(),
        read_ms,
        read_lines: state.lines,
        facts: state.facts(),
        accounts: accounts.len(),
        comparison,
        fixes,
        enqueued: Vec::new(),
    };
    if req.apply && !report.fixes.is_empty() {
        let abonents: HashMap<i64, i64> = accounts.iter().copied().collect();
        let events: Vec<CompactEvent> = report
            .fixes
            .iter()
            .map(|(user_id, cmd)| CompactEvent {
                cmd: cmd.clone(),
                user_id: *user_id,
                abonent_id: abonents.get(user_id).copied(),
                nas_ip: Some(nas.ip.clone()),
                usluga_id: None,
                acct_session_id: None,
            })
            .collect();
        report.enqueued = ctx
            .store
            .enqueue_compact(&events)
            .await
            .map_err(|e| format!("enqueue the fixes: {e}"))?;
    }
    if let Some(journal) = ctx.journal {
        journal.daemon(&report.summary(&req.by, req.apply));
        let enqueued: BTreeSet<usize> = (0..report.enqueued.len()).collect();
        for d in &report.comparison.differences {
            let fix = match &d.fix {
                Some(cmd) if !enqueued.is_empty() => format!(", enqueued {cmd}"),
                Some(cmd) => format!(", {cmd} would fix it"),
                None => String::new(),
            };
            journal.daemon(&format!(
                "reconcile nas {} user {} ({}): {} {}{fix}",
                nas.id, d.user_id, d.key, d.fact, d.kind
            ));
        }
        for s in &report.comparison.strays {
            journal.daemon(&format!(
                "reconcile nas {}: stray {} ({}) belongs to no account, left alone",
                nas.id,
                s.key,
                s.facts.join(", ")
            ));
        }
    }
    Ok(report)
}

fn secrets_of(nas: &Nas) -> Vec<&str> {
    [&nas.password, &nas.secret]
        .into_iter()
        .flatten()
        .map(|s| s.expose())
        .collect()
}

/// Whether a NAS came back since the last look: its count of returns (0 when the
/// daemon started) grew.
pub fn came_back(seen: u64, now: u64) -> bool {
    now > seen
}

/// The daemon's runs: every `[reconcile] every` for each NAS this daemon serves, and
/// (`on_return`) when a NAS it serves comes back after being down. Each run reads
/// through the owner's device; a NAS without `[state]` is skipped without a word after
/// the first time.
/// What the daemon's runs need.
pub struct Scheduler {
    pub cfg: DaemonConfig,
    pub rc: ReconcileConfig,
    pub store: Store,
    pub params_query: String,
    pub billing: Option<Billing>,
    pub journal: Journal,
    /// The owners' devices (the supervisor keeps it): a NAS in it is served here.
    pub devices: crate::cluster::Devices,
    pub stats: Arc<Stats>,
}

pub async fn schedule(s: Scheduler, shutdown: CancellationToken) {
    let Scheduler {
        cfg,
        rc,
        store,
        params_query,
        billing,
        journal,
        devices,
        stats,
    } = s;
    if rc.every.is_none() && !rc.on_return {
        return;
    }
    let look = Duration::from_secs(1);
    let mut next_round = rc.every.map(|every| Instant::now() + every);
    let mut returns: HashMap<i64, u64> = HashMap::new();
    let mut told_no_state: BTreeSet<i64> = BTreeSet::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(look) => {}
        }
        let served: Vec<(i64, Device)> = match devices.lock() {
            Ok(map) => map.iter().map(|(id, d)| (*id, d.clone())).collect(),
            Err(_) => return,
        };
        let mut due: Vec<(i64, Device, &'static str)> = Vec::new();
        if rc.on_return {
            for (id, device) in &served {
                let now = stats.nas(*id).returns();
                if came_back(returns.insert(*id, now).unwrap_or(0), now) {
                    due.push((*id, device.clone(), "nas back up"));
                }
            }
        }
        if let Some(at) = next_round
            && Instant::now() >= at
        {
            next_round = rc.every.map(|every| Instant::now() + every);
            for (id, device) in &served {
                if !due.iter().any(|(d, _, _)| d == id) {
                    due.push((*id, device.clone(), "schedule"));
                }
            }
        }
        for (nas_id, device, by) in due {
            if shutdown.is_cancelled() {
                return;
            }
            let ctx = Context {
                cfg: &cfg,
                store: &store,
                params_query: &params_query,
                billing: billing.as_ref(),
                journal: Some(&journal),
            };
            let req = Request {
                nas_id,
                account: None,
                apply: rc.apply,
                by: by.to_string(),
            };
            let run = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = run(&ctx, Some(device), &req) => r,
            };
            if let Err(e) = run {
                if e.contains("declares no [state]") || e.contains("runs its own script") {
                    if told_no_state.insert(nas_id) {
                        journal.daemon(&format!("reconcile nas {nas_id} ({by}): skipped: {e}"));
                    }
                } else {
                    journal.daemon(&format!("reconcile nas {nas_id} ({by}) failed: {e}"));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn came_back_table() {
        let cases = [(0, 0, false), (0, 1, true), (2, 3, true), (3, 3, false)];
        for (seen, now, want) in cases {
            assert_eq!(came_back(seen, now), want, "{seen} {now}");
        }
    }
}
