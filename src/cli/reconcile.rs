//! `nasd reconcile`: what a NAS holds against what its accounts should have
//! (`crate::reconcile`). With `[api]` in the config and the daemon answering there,
//! the daemon runs it (`POST /api/v1/nas/{id}/reconcile`), so the read borrows one of
//! the owner's sessions and stays within the NAS's `max_sessions`; otherwise (or with
//! `--local`) this process reads through a session of its own.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::ExitCode;

use crate::config::{Config, Role};
use crate::journal::Journal;
use crate::reconcile::{Context, Request};
use crate::store::Store;

/// Exit code 0: nothing to fix (or the fixes were enqueued); 3: differences found and
/// not applied (for scripts and monitoring); errors exit 1.
pub async fn run(cfg: &Config, req: Request, json: bool, local: bool) -> anyhow::Result<ExitCode> {
    if !local && let Some((addr, token)) = daemon_api(cfg) {
        match through_daemon(addr, token.as_deref(), &req).await {
            Ok(Some(body)) => return Ok(print(&body, &req, json)),
            Ok(None) => {}
            Err(e) => anyhow::bail!("{e}"),
        }
    }
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
    let mut body = serde_json::to_value(&report)?;
    if let Some(map) = body.as_object_mut() {
        map.insert("lines".into(), serde_json::json!(report.lines(req.apply)));
        map.insert("owner_session".into(), serde_json::json!(false));
    }
    Ok(print(&body, &req, json))
}

/// Prints the report (its lines, or the JSON) and picks the exit code.
fn print(body: &serde_json::Value, req: &Request, json: bool) -> ExitCode {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(body).unwrap_or_else(|_| body.to_string())
        );
    } else {
        for line in body["lines"].as_array().into_iter().flatten() {
            println!("{}", line.as_str().unwrap_or_default());
        }
        if body["owner_session"] == serde_json::json!(true) {
            println!("(read by the daemon through one of the owner's sessions)");
        }
    }
    let fixes = body["fixes"].as_array().map_or(0, Vec::len);
    if !req.apply && fixes > 0 {
        ExitCode::from(3)
    } else {
        ExitCode::SUCCESS
    }
}

/// Where the daemon's API answers on this host and an admin token for it (None: no
/// `[api]`, a port picked at random, or tokens but no admin among them).
fn daemon_api(cfg: &Config) -> Option<(SocketAddr, Option<String>)> {
    let api = cfg.api.as_ref()?;
    if api.listen.port() == 0 {
        return None;
    }
    let ip = match api.listen.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    let tokens = api.tokens.get();
    let token = if tokens.is_empty() {
        None
    } else {
        Some(
            tokens
                .iter()
                .find(|t| t.role == Role::Admin)?
                .secret
                .expose()
                .to_string(),
        )
    };
    Some((SocketAddr::new(ip, api.listen.port()), token))
}

/// Asks the daemon. `Ok(None)`: nobody listens there (no daemon running), run here.
async fn through_daemon(
    addr: SocketAddr,
    token: Option<&str>,
    req: &Request,
) -> Result<Option<serde_json::Value>, String> {
    let body = serde_json::json!({ "account": req.account, "apply": req.apply }).to_string();
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("content-type", "application/json")];
    if let Some(auth) = &auth {
        headers.push(("authorization", auth.as_str()));
    }
    let path = format!("/api/v1/nas/{}/reconcile", req.nas_id);
    let answer =
        match crate::tools::http_client::request(addr, "POST", &path, &headers, body.as_bytes())
            .await
        {
            Ok(answer) => answer,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return Ok(None),
            Err(e) => return Err(format!("the daemon's API at {addr}: {e}")),
        };
    let json = answer.json();
    if answer.status == 200 {
        return Ok(Some(json));
    }
    let why = json["error"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| answer.text());
    Err(format!(
        "the daemon's API at {addr} answered {}: {why}",
        answer.status
    ))
}
