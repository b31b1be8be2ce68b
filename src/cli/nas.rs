//! `nasd nas add|set|remove|list`: the NAS table as an operator edits it, with the
//! owner of each NAS when several daemons share a PostgreSQL database.

use anyhow::bail;
use clap::{Args, Subcommand};

use crate::api::json::Owners;
use crate::config::Config;
use crate::store::{Nas, Secret};

#[derive(Subcommand)]
pub enum NasCommand {
    /// Add a NAS.
    Add {
        #[arg(long)]
        id: i64,
        #[command(flatten)]
        fields: NasFields,
    },
    /// Change settings of a NAS (only the options given).
    Set {
        id: i64,
        #[command(flatten)]
        fields: NasFields,
    },
    /// Remove a NAS (its queued events stay in the stack).
    Remove { id: i64 },
    /// Stop claiming its events (they wait in the stack); the NAS stays configured.
    /// The daemon stops its owner at its next resync (the console's pause is at once).
    Pause { id: i64 },
    /// Claim its events again after `pause`.
    Resume { id: i64 },
    /// Log in to the NAS now with a session of its own and print the time it took.
    Probe { id: i64 },
    /// List NAS.
    List {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Default)]
pub struct NasFields {
    #[arg(long)]
    name: Option<String>,
    #[arg(long)]
    ip: Option<String>,
    /// OSS scheme: a directory name under schemes_dir.
    #[arg(long)]
    scheme: Option<String>,
    /// Legacy script run as `SCRIPT CMD` with the variables in its environment.
    #[arg(long)]
    script: Option<String>,
    /// Commands in flight at once for this NAS (1..100).
    #[arg(long)]
    workers: Option<i32>,
    #[arg(long)]
    login: Option<String>,
    #[arg(long)]
    password: Option<String>,
    /// RADIUS shared secret (coa_psw).
    #[arg(long)]
    secret: Option<String>,
    #[arg(long)]
    port: Option<i32>,
    /// Transport protocol override for device transports (ssh, telnet, ...).
    #[arg(long)]
    protocol: Option<String>,
    /// Connections to the device at once (1..100).
    #[arg(long)]
    max_sessions: Option<i32>,
    /// SSH host key policy: strict (key must be in nasd's known_hosts) or accept-new.
    #[arg(long)]
    host_key_policy: Option<String>,
    /// SSH: pin the host key fingerprint (SHA256:..., as `ssh-keygen -lf` prints it).
    #[arg(long)]
    host_key: Option<String>,
    /// SSH: also offer legacy key exchange and ciphers (old devices).
    #[arg(long)]
    legacy_crypto: Option<bool>,
    #[arg(long, conflicts_with = "disable")]
    enable: bool,
    #[arg(long)]
    disable: bool,
}

impl NasFields {
    pub fn apply(self, nas: &mut Nas) {
        if let Some(v) = self.name {
            nas.name = v;
        }
        if let Some(v) = self.ip {
            nas.ip = v;
        }
        if let Some(v) = self.scheme {
            nas.scheme = Some(v);
            nas.script_name = None;
        }
        if let Some(v) = self.script {
            nas.script_name = Some(v);
        }
        if let Some(v) = self.workers {
            nas.n_workers = v;
        }
        if let Some(v) = self.login {
            nas.login = Some(v);
        }
        if let Some(v) = self.password {
            nas.password = Some(Secret::new(v));
        }
        if let Some(v) = self.secret {
            nas.secret = Some(Secret::new(v));
        }
        if let Some(v) = self.port {
            nas.port = Some(v);
        }
        if let Some(v) = self.protocol {
            nas.protocol = Some(v);
        }
        if let Some(v) = self.max_sessions {
            nas.max_sessions = v;
        }
        if let Some(v) = self.host_key_policy {
            nas.host_key_policy = v;
        }
        if let Some(v) = self.host_key {
            nas.host_key = Some(v);
        }
        if let Some(v) = self.legacy_crypto {
            nas.legacy_crypto = v;
        }
        if self.enable {
            nas.enabled = true;
        }
        if self.disable {
            nas.enabled = false;
        }
    }
}

/// Checks `--ip`: an IP address (written as the API writes event `nas_ip`s, so that
/// they match: `2001:DB8::1` becomes `2001:db8::1`), or a host name, accepted with a
/// warning (it is resolved at each connect, and no event names its NAS by a host
/// name). Anything else, `10.0.0.999` included, is refused naming the value. Pure.
pub fn check_ip(value: &str) -> Result<(String, Option<String>), String> {
    let value = value.trim();
    if let Ok(addr) = value.parse::<std::net::IpAddr>() {
        return Ok((addr.to_string(), None));
    }
    let refused = || format!("--ip `{}` is not an IP address", value.escape_debug());
    // Digits and dots only (a mistyped IPv4 address) or a colon (IPv6) is no host name.
    let numeric = value.chars().all(|c| c.is_ascii_digit() || c == '.');
    if value.is_empty() || numeric || value.contains(':') || !is_host_name(value) {
        return Err(refused());
    }
    Ok((
        value.to_string(),
        Some(format!(
            "--ip `{value}` is not an IP address: it is resolved at each connect, and events \
             that name their NAS by nas_ip (an IP address) never match it"
        )),
    ))
}

/// RFC 1123 host name syntax: dot-separated labels of letters, digits and inner hyphens.
fn is_host_name(s: &str) -> bool {
    s.len() <= 253
        && s.trim_end_matches('.').split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

/// A warning when the NAS's scheme is not in any schemes directory of the config, naming
/// the scheme and where it was looked for (its events would wait until it exists).
fn missing_scheme(nas: &Nas, cfg: &Config) -> Option<String> {
    let name = nas
        .scheme
        .as_deref()
        .filter(|_| nas.script_name.is_none())?;
    let (set, _) = crate::scheme::SchemeSet::load_dirs(&cfg.daemon.schemes_dirs());
    if set.get(name).is_some() {
        return None;
    }
    Some(scheme_warning(
        name,
        &cfg.daemon.schemes_shown(),
        &set.names(),
    ))
}

/// The text of [`missing_scheme`]. Pure.
pub fn scheme_warning(name: &str, looked_in: &str, found: &[String]) -> String {
    let known = if found.is_empty() {
        "no scheme there".to_string()
    } else {
        format!("schemes there: {}", found.join(", "))
    };
    format!(
        "scheme {name} was not found in {looked_in} ({known}); the NAS is saved, but its \
         events wait until the scheme exists"
    )
}

/// `nas pause` / `nas resume`, with an audit row.
async fn set_paused(store: &crate::store::Store, id: i64, paused: bool) -> anyhow::Result<()> {
    if !store.nas_set_paused(id, paused).await? {
        bail!("nas {id} does not exist");
    }
    let action = if paused { "pause" } else { "resume" };
    store
        .audit_insert(&crate::store::AuditEntry {
            who: super::events::cli_user(),
            action: action.into(),
            target: format!("nas {id}"),
            detail: String::new(),
            count: 1,
        })
        .await?;
    println!(
        "nas {id} {}: the daemon applies it at its next resync (within [daemon] resync_interval)",
        if paused { "paused" } else { "resumed" }
    );
    Ok(())
}

pub async fn run(cmd: NasCommand, cfg: &Config) -> anyhow::Result<()> {
    let store = crate::daemon::open_store(cfg).await?;
    match cmd {
        NasCommand::Add { id, fields } => {
            if store.nas_get(id).await?.is_some() {
                bail!("nas {id} already exists (use `nasd nas set {id} ...` to change it)");
            }
            let (Some(name), Some(ip)) = (fields.name.clone(), fields.ip.clone()) else {
                bail!("nas add needs --name and --ip");
            };
            if fields.scheme.is_some() == fields.script.is_some() {
                bail!("nas add needs exactly one of --scheme or --script");
            }
            let (ip, ip_warning) = check_ip(&ip).map_err(anyhow::Error::msg)?;
            let mut nas = Nas::new(id, &name, &ip);
            fields.apply(&mut nas);
            nas.ip = ip;
            store.nas_upsert(&nas).await?;
            println!("nas {id} added");
            for warning in ip_warning.into_iter().chain(missing_scheme(&nas, cfg)) {
                eprintln!("warning: {warning}");
            }
        }
        NasCommand::Set { id, mut fields } => {
            let Some(mut nas) = store.nas_get(id).await? else {
                bail!("nas {id} does not exist");
            };
            let mut ip_warning = None;
            if let Some(ip) = &fields.ip {
                let (ip, warning) = check_ip(ip).map_err(anyhow::Error::msg)?;
                fields.ip = Some(ip);
                ip_warning = warning;
            }
            let scheme_given = fields.scheme.is_some();
            if fields.script.is_some() {
                nas.scheme = None;
            }
            fields.apply(&mut nas);
            store.nas_upsert(&nas).await?;
            println!("nas {id} updated (the daemon applies it at its next resync)");
            let scheme_warning = if scheme_given {
                missing_scheme(&nas, cfg)
            } else {
                None
            };
            for warning in ip_warning.into_iter().chain(scheme_warning) {
                eprintln!("warning: {warning}");
            }
        }
        NasCommand::Remove { id } => {
            if !store.nas_remove(id).await? {
                bail!("nas {id} does not exist");
            }
            println!("nas {id} removed (its queued events stay in events_stack)");
        }
        NasCommand::Pause { id } => set_paused(&store, id, true).await?,
        NasCommand::Resume { id } => set_paused(&store, id, false).await?,
        NasCommand::Probe { id } => {
            let Some(nas) = store.nas_get(id).await? else {
                bail!("nas {id} does not exist");
            };
            match crate::manual::probe(&cfg.daemon, &nas).await {
                Ok(took) => println!("nas {id} ({}): login ok in {} ms", nas.ip, took.as_millis()),
                Err(e) => bail!("nas {id} ({}): login failed: {e}", nas.ip),
            }
        }
        NasCommand::List { json } => {
            let list = store.nas_list().await?;
            // The command is not a daemon: on SQLite it cannot name the one daemon
            // that serves every NAS, so the owner stays empty there.
            let owners = Owners::load(&store, None).await?;
            if json {
                let rows: Vec<serde_json::Value> = list
                    .iter()
                    .map(|n| {
                        let owner = owners.of(n);
                        serde_json::json!({
                            "id": n.id, "name": n.name, "ip": n.ip, "scheme": n.scheme,
                            "script_name": n.script_name, "n_workers": n.n_workers,
                            "protocol": n.protocol, "port": n.port, "login": n.login,
                            "password_set": n.password.is_some(), "secret_set": n.secret.is_some(),
                            "max_sessions": n.max_sessions, "enabled": n.enabled,
                            "owner": owner.map(|(d, _)| d), "owner_epoch": owner.map(|(_, e)| e),
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!(
                    "{:<6} {:<20} {:<16} {:<20} {:>7} {:>8} {:<7} owner",
                    "id", "name", "ip", "scheme/script", "workers", "sessions", "enabled"
                );
                for n in &list {
                    println!(
                        "{:<6} {:<20} {:<16} {:<20} {:>7} {:>8} {:<7} {}",
                        n.id,
                        n.name,
                        n.ip,
                        n.scheme
                            .clone()
                            .or(n.script_name.clone())
                            .unwrap_or_default(),
                        n.n_workers,
                        n.max_sessions,
                        if n.enabled { "yes" } else { "no" },
                        owner_text(owners.of(n))
                    );
                }
            }
        }
    }
    Ok(())
}

/// The OWNER column: `d1 (epoch 3)`, or `-` without a valid owner (and always on
/// SQLite, where one daemon serves every enabled NAS).
pub fn owner_text(owner: Option<(&str, i64)>) -> String {
    match owner {
        Some((daemon, epoch)) => format!("{daemon} (epoch {epoch})"),
        None => "-".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a case changes in the row by hand, to compare with `apply`.
    type Change = fn(&mut Nas);

    #[test]
    fn only_the_given_fields_change() {
        let before = Nas {
            scheme: Some("mikrotik-ssh".into()),
            login: Some("admin".into()),
            password: Some(Secret::new("old")),
            ..Nas::new(7, "core", "10.0.0.7")
        };
        let cases: [(NasFields, Change); 5] = [
            (NasFields::default(), |_| {}),
            (
                NasFields {
                    workers: Some(16),
                    ip: Some("10.0.0.8".into()),
                    ..Default::default()
                },
                |n| {
                    n.n_workers = 16;
                    n.ip = "10.0.0.8".into();
                },
            ),
            (
                NasFields {
                    scheme: Some("mikrotik-api".into()),
                    ..Default::default()
                },
                |n| n.scheme = Some("mikrotik-api".into()),
            ),
            (
                NasFields {
                    password: Some("new".into()),
                    secret: Some("radius".into()),
                    disable: true,
                    ..Default::default()
                },
                |n| {
                    n.password = Some(Secret::new("new"));
                    n.secret = Some(Secret::new("radius"));
                    n.enabled = false;
                },
            ),
            (
                NasFields {
                    legacy_crypto: Some(true),
                    host_key_policy: Some("accept-new".into()),
                    ..Default::default()
                },
                |n| {
                    n.legacy_crypto = true;
                    n.host_key_policy = "accept-new".into();
                },
            ),
        ];
        for (fields, change) in cases {
            let mut got = before.clone();
            fields.apply(&mut got);
            let mut want = before.clone();
            change(&mut want);
            assert_eq!(got, want);
        }
    }

    #[test]
    fn an_ip_is_checked_and_written_as_events_write_it() {
        let ok = |v: &str| check_ip(v).map(|(ip, warning)| (ip, warning.is_some()));
        assert_eq!(ok("10.0.0.1"), Ok(("10.0.0.1".into(), false)));
        assert_eq!(ok(" 10.0.0.1 "), Ok(("10.0.0.1".into(), false)));
        assert_eq!(ok("2001:DB8::1"), Ok(("2001:db8::1".into(), false)));
        for bad in [
            "10.0.0.999",
            "10.0.0",
            "1.2.3.4.5",
            "2001:db8::g",
            "",
            "nas one",
            "-nas",
            "nas_1",
        ] {
            assert_eq!(
                check_ip(bad),
                Err(format!("--ip `{}` is not an IP address", bad.trim())),
                "{bad}"
            );
        }
        assert_eq!(
            check_ip("bras-1.example.net"),
            Ok((
                "bras-1.example.net".into(),
                Some(
                    "--ip `bras-1.example.net` is not an IP address: it is resolved at each \
                     connect, and events that name their NAS by nas_ip (an IP address) never \
                     match it"
                        .into()
                )
            ))
        );
    }

    #[test]
    fn a_missing_scheme_is_named_with_where_it_was_looked_for() {
        assert_eq!(
            scheme_warning(
                "mikrotik-sssh",
                "/etc/nasd/schemes, /usr/share/nasd/schemes",
                &["mikrotik-api".into(), "mikrotik-ssh".into()]
            ),
            "scheme mikrotik-sssh was not found in /etc/nasd/schemes, /usr/share/nasd/schemes \
             (schemes there: mikrotik-api, mikrotik-ssh); the NAS is saved, but its events \
             wait until the scheme exists"
        );
        assert!(scheme_warning("x", "schemes", &[]).contains("(no scheme there)"));
    }

    #[test]
    fn a_scheme_replaces_a_script() {
        let mut nas = Nas {
            script_name: Some("/opt/oss/session".into()),
            ..Nas::new(1, "legacy", "10.0.0.1")
        };
        NasFields {
            scheme: Some("cisco-ios".into()),
            ..Default::default()
        }
        .apply(&mut nas);
        assert_eq!(nas.scheme.as_deref(), Some("cisco-ios"));
        assert_eq!(nas.script_name, None);
    }
}
