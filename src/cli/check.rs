//! `nasd check`: what an operator (or `ExecStartPre=`) wants to know before starting the
//! daemon: the config is valid (it was parsed to get here), every scheme loads and every
//! cmd of it renders against sample variables, the database answers and its migrations
//! are applied or pending, and every NAS row is usable (valid, its scheme exists, its
//! script is executable, the credentials its transport needs are set). One line per
//! finding, `ok`, `warning` or `error`; exit 0 without errors, 1 with.
//!
//! The findings about NAS rows are pure ([`nas_findings`], table-tested).

use std::process::ExitCode;

use crate::config::Config;
use crate::model::{Nas, Vars};
use crate::scheme::{SchemeSet, TransportKind};

/// One finding of the check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    Ok(String),
    Warning(String),
    Error(String),
}

impl Finding {
    fn line(&self) -> String {
        match self {
            Finding::Ok(t) => format!("ok       {t}"),
            Finding::Warning(t) => format!("warning  {t}"),
            Finding::Error(t) => format!("error    {t}"),
        }
    }
}

/// Variables a template may use, for rendering every cmd once: an account's columns
/// with plausible values, the event's and the NAS's own (as an attempt gets them).
pub fn sample_vars() -> Vars {
    let mut v = Vars::new();
    let text = [
        ("login", "sample-login"),
        ("ip", "10.88.0.15"),
        ("mac", "00:11:22:33:44:55"),
        ("auth_type", "ipoe"),
        ("snat_ip", "192.0.2.15"),
        ("cmd", "user_add"),
        ("nas_ip", "10.0.0.1"),
        ("nas_name", "sample-nas"),
        ("nas_login", "admin"),
        ("telnet_login", "admin"),
        ("nas_password", "sample-password"),
        ("telnet_password", "sample-password"),
        ("coa_psw", "sample-secret"),
        ("acct_session_id", "00000001"),
        ("daemon", "check"),
    ];
    for (k, val) in text {
        v.insert(k.into(), val.into());
    }
    let numbers = [
        ("user_id", 42),
        ("abonent_id", 1042),
        ("nas_id", 1),
        ("vlan", 100),
        ("rate_in", 10240),
        ("rate_out", 10240),
        ("ceil_in", 20480),
        ("ceil_out", 20480),
        ("burst_in", 40960),
        ("burst_out", 40960),
        ("event_id", 1),
        ("try_count", 1),
        ("usluga_id", 7),
        ("nas_port", 22),
        ("telnet_port", 23),
        ("nas_epoch", 0),
    ];
    for (k, n) in numbers {
        v.insert(k.into(), n.into());
    }
    v
}

/// Renders every cmd of every scheme with `vars`.
pub fn scheme_findings(set: &SchemeSet, vars: &Vars) -> Vec<Finding> {
    let mut out = Vec::new();
    for name in set.names() {
        let Some(scheme) = set.get(&name) else {
            continue;
        };
        if scheme.transport == TransportKind::Exec {
            let ok = scheme.script.as_ref().is_some_and(|s| is_executable(s));
            out.push(if ok {
                Finding::Ok(format!("scheme {name}: exec script present"))
            } else {
                Finding::Error(format!(
                    "scheme {name}: its script {} is missing or not executable",
                    scheme
                        .script
                        .as_ref()
                        .map_or("(none)".to_string(), |s| s.display().to_string())
                ))
            });
            continue;
        }
        let mut failed = false;
        for cmd in scheme.cmds() {
            if let Err(e) = scheme.render(&cmd, vars) {
                failed = true;
                out.push(Finding::Error(format!("scheme {name}: cmd {cmd}: {e}")));
            }
        }
        if !failed {
            out.push(Finding::Ok(format!(
                "scheme {name}: {} cmd(s) render",
                scheme.cmds().len()
            )));
        }
    }
    out
}

fn is_executable(path: &std::path::Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// What is wrong with one NAS row: `set` the schemes loaded, `script_ok` whether its
/// `script_name` is an executable file, `ssh_key` whether the config has an SSH key.
pub fn nas_findings(nas: &Nas, set: &SchemeSet, script_ok: bool, ssh_key: bool) -> Vec<Finding> {
    let who = format!("nas {} ({}, {})", nas.id, nas.name, nas.ip);
    let mut out = Vec::new();
    if let Err(e) = nas.validate() {
        out.push(Finding::Error(format!("{who}: {e}")));
    }
    if nas.ip.parse::<std::net::IpAddr>().is_err() {
        out.push(Finding::Warning(format!(
            "{who}: ip `{}` is not an IP address (resolved at each connect)",
            nas.ip
        )));
    }
    if let Some(script) = &nas.script_name {
        if !script_ok {
            out.push(Finding::Error(format!(
                "{who}: script_name {script} is missing or not executable"
            )));
        }
    } else if let Some(name) = &nas.scheme {
        match set.get(name) {
            None => out.push(Finding::Error(format!(
                "{who}: scheme {name} is not in the schemes directory (its events would wait)"
            ))),
            Some(scheme) => {
                let missing = |what: &str| {
                    Finding::Error(format!(
                        "{who}: {what} is not set for its {} scheme {name}",
                        scheme.transport
                    ))
                };
                match scheme.transport {
                    TransportKind::Ssh => {
                        if nas.login.is_none() {
                            out.push(missing("login"));
                        }
                        if nas.password.is_none() && !ssh_key {
                            out.push(missing("password (or [transport] ssh_key)"));
                        }
                    }
                    TransportKind::Telnet | TransportKind::Api => {
                        if nas.login.is_none() {
                            out.push(missing("login"));
                        }
                        if nas.password.is_none() {
                            out.push(missing("password"));
                        }
                    }
                    TransportKind::Radius => {
                        if nas.secret.is_none() {
                            out.push(missing("secret"));
                        }
                    }
                    TransportKind::Exec | TransportKind::Null => {}
                }
            }
        }
    }
    if !nas.enabled {
        out.push(Finding::Warning(format!(
            "{who}: disabled (its events wait)"
        )));
    }
    if !out.iter().any(|f| matches!(f, Finding::Error(_))) {
        out.insert(0, Finding::Ok(who));
    }
    out
}

/// `[billing]`: the billing database answers and accepts every configured query (the
/// database's own message when it does not).
async fn billing_findings(cfg: &crate::config::billing::BillingConfig) -> Vec<Finding> {
    let shown = cfg.shown_url();
    let billing = match crate::billing::Billing::connect_lazy(cfg) {
        Ok(b) => b,
        Err(e) => return vec![Finding::Error(format!("billing {shown}: {e}"))],
    };
    let checked = tokio::time::timeout(
        cfg.connect_timeout + std::time::Duration::from_secs(10),
        billing.check(),
    )
    .await;
    billing.close().await;
    match checked {
        Ok(Ok(lines)) => std::iter::once(Finding::Ok(format!(
            "billing: {} database {shown} answers",
            cfg.kind.name()
        )))
        .chain(lines.into_iter().map(Finding::Ok))
        .collect(),
        Ok(Err(e)) => vec![Finding::Error(format!("billing {shown}: {e}"))],
        Err(_) => vec![Finding::Error(format!(
            "billing {shown}: no answer within {}",
            crate::duration::format_duration(cfg.connect_timeout)
        ))],
    }
}

/// `nasd check`.
/// `--connect`: one login per enabled NAS whose transport has one, at most 8 at once,
/// each with its time or the reason it failed.
async fn connect_findings(cfg: &Config, list: &[Nas], set: &SchemeSet) -> Vec<Finding> {
    let mut out = Vec::new();
    let mut probes = tokio::task::JoinSet::new();
    let limit = std::sync::Arc::new(tokio::sync::Semaphore::new(8));
    for (i, nas) in list.iter().enumerate() {
        let who = format!("nas {} ({} {})", nas.id, nas.name, nas.ip);
        if !nas.enabled {
            continue;
        }
        let kind = match (&nas.script_name, &nas.scheme) {
            (None, Some(name)) => set.get(name).map(|s| s.transport),
            _ => None,
        };
        match kind {
            Some(TransportKind::Ssh | TransportKind::Telnet | TransportKind::Api) => {}
            Some(k) => {
                out.push((
                    i,
                    Finding::Ok(format!("{who}: connect: {k:?} has no login to try")),
                ));
                continue;
            }
            // A script, or a scheme that is missing (reported above).
            None => continue,
        }
        let daemon = cfg.daemon.clone();
        let nas = nas.clone();
        let limit = limit.clone();
        probes.spawn(async move {
            let _permit = limit.acquire_owned().await;
            let finding = match crate::manual::probe(&daemon, &nas).await {
                Ok(took) => Finding::Ok(format!("{who}: login ok in {} ms", took.as_millis())),
                Err(e) => Finding::Error(format!("{who}: login failed: {e}")),
            };
            (i, finding)
        });
    }
    while let Some(done) = probes.join_next().await {
        if let Ok(f) = done {
            out.push(f);
        }
    }
    out.sort_by_key(|(i, _)| *i);
    out.into_iter().map(|(_, f)| f).collect()
}

pub async fn run(cfg: &Config, connect: bool) -> anyhow::Result<ExitCode> {
    let mut findings = vec![Finding::Ok("config: valid".to_string())];
    let (set, errors) = SchemeSet::load_dirs(&cfg.daemon.schemes_dirs());
    for e in errors {
        findings.push(Finding::Error(e.to_string()));
    }
    findings.push(Finding::Ok(format!(
        "schemes: {} loaded from {}",
        set.names().len(),
        cfg.daemon.schemes_shown()
    )));
    findings.extend(scheme_findings(&set, &sample_vars()));
    let options = crate::store::ConnectOptions {
        max_connections: 2,
        statement_cache: cfg.database.statement_cache,
    };
    match crate::store::Store::connect_with(&cfg.database.url, &options).await {
        Err(e) => findings.push(Finding::Error(format!("database: {e}"))),
        Ok(store) => {
            findings.push(Finding::Ok(format!(
                "database: {} answers",
                store.backend_name()
            )));
            match store.pending_migrations().await {
                Ok(p) if p.is_empty() => findings.push(Finding::Ok("migrations: all applied".into())),
                Ok(p) => findings.push(Finding::Warning(format!(
                    "migrations: {} pending ({}); `nasd migrate` or the daemon's start applies them",
                    p.len(),
                    p.join(", ")
                ))),
                Err(e) => findings.push(Finding::Error(format!("migrations: {e}"))),
            }
            match store.nas_list().await {
                Ok(list) => {
                    findings.push(Finding::Ok(format!("nas: {} row(s)", list.len())));
                    let ssh_key = cfg.daemon.transport.ssh_key.is_some();
                    for nas in &list {
                        let script_ok = nas
                            .script_name
                            .as_ref()
                            .is_some_and(|s| is_executable(std::path::Path::new(s)));
                        findings.extend(nas_findings(nas, &set, script_ok, ssh_key));
                    }
                    if connect {
                        findings.extend(connect_findings(cfg, &list, &set).await);
                    }
                }
                // Tables missing: the migrations above say so.
                Err(e) => findings.push(Finding::Warning(format!("nas: cannot list: {e}"))),
            }
        }
    }
    if let Some(billing_cfg) = &cfg.billing {
        findings.extend(billing_findings(billing_cfg).await);
    }
    let errors = findings
        .iter()
        .filter(|f| matches!(f, Finding::Error(_)))
        .count();
    let warnings = findings
        .iter()
        .filter(|f| matches!(f, Finding::Warning(_)))
        .count();
    for f in &findings {
        println!("{}", f.line());
    }
    println!("nasd check: {errors} error(s), {warnings} warning(s)");
    Ok(if errors == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Secret;
    use std::path::Path;

    fn shipped() -> SchemeSet {
        let (set, errors) =
            SchemeSet::load_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("schemes"));
        assert!(errors.is_empty(), "{errors:?}");
        set
    }

    fn nas(scheme: Option<&str>, script: Option<&str>) -> Nas {
        Nas {
            id: 3,
            name: "core".into(),
            ip: "10.0.0.3".into(),
            scheme: scheme.map(str::to_string),
            script_name: script.map(str::to_string),
            n_workers: 4,
            protocol: None,
            port: None,
            login: Some("admin".into()),
            password: Some(Secret::new("pw")),
            secret: None,
            max_sessions: 4,
            enabled: true,
            host_key_policy: "strict".into(),
            host_key: None,
            legacy_crypto: false,
            paused: false,
        }
    }

    fn errors(f: &[Finding]) -> Vec<String> {
        f.iter()
            .filter_map(|f| match f {
                Finding::Error(t) => Some(t.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn every_shipped_scheme_renders_every_cmd_with_the_sample_variables() {
        let found = scheme_findings(&shipped(), &sample_vars());
        assert!(errors(&found).is_empty(), "{:?}", errors(&found));
    }

    #[test]
    fn nas_rows_table() {
        let set = shipped();
        let mut no_secret = nas(Some("mikrotik-coa"), None);
        no_secret.secret = None;
        let mut no_login = nas(Some("mikrotik-ssh"), None);
        no_login.login = None;
        let mut no_password = nas(Some("mikrotik-ssh"), None);
        no_password.password = None;
        // (row, script executable, ssh key configured) -> the errors' parts
        let cases: Vec<(Nas, bool, bool, Vec<&str>)> = vec![
            (nas(Some("mikrotik-ssh"), None), false, false, vec![]),
            (
                nas(Some("no-such"), None),
                false,
                false,
                vec!["scheme no-such is not in"],
            ),
            (
                no_secret,
                false,
                false,
                vec!["secret is not set for its radius scheme"],
            ),
            (no_login, false, false, vec!["login is not set"]),
            (
                no_password.clone(),
                false,
                false,
                vec!["password (or [transport] ssh_key)"],
            ),
            (no_password, false, true, vec![]),
            (
                nas(None, Some("/x.sh")),
                false,
                false,
                vec!["script_name /x.sh is missing"],
            ),
            (nas(None, Some("/x.sh")), true, false, vec![]),
        ];
        for (row, script_ok, key, want) in cases {
            let got = errors(&nas_findings(&row, &set, script_ok, key));
            assert_eq!(got.len(), want.len(), "{row:?}: {got:?}");
            for (g, w) in got.iter().zip(&want) {
                assert!(g.contains(w), "{g} should contain {w}");
                assert!(g.starts_with("nas 3 (core, 10.0.0.3)"), "{g}");
            }
        }
    }
}
