//! A NAS's connection to its device: the transport pool (SSH, telnet, RouterOS API) or
//! RADIUS client built from the `nas` row and its scheme, kept across resyncs while
//! those settings do not change, so sessions stay open between events; for exec and
//! null schemes and a NAS's own script, the local equivalent. Every kind is sent to
//! through [`Device::send`], so the dispatcher never knows a protocol.

use std::sync::Arc;

use crate::config::TransportConfig;
use crate::model::{Nas, Vars};
use crate::scheme::{Scheme, TransportKind};
use crate::transport::exec::Script;
use crate::transport::pool::PoolCounters;
use crate::transport::radius::{Dictionary, RadiusClient, RadiusOptions};
use crate::transport::routeros_api::{
    ApiOptions, ApiPool, ApiTls, CertPolicy, known_certs_path, load_ca_file, normalize_fingerprint,
};
use crate::transport::ssh::{HostKeyPolicy, SshMode, SshOptions, SshPool};
use crate::transport::telnet::{TelnetOptions, TelnetPool};
use crate::transport::{Reply, Target, Verdict, exec, null};

#[derive(Clone)]
pub enum Device {
    Ssh(Arc<SshPool>),
    Telnet(Arc<TelnetPool>),
    Radius(Arc<RadiusClient>),
    Api(Arc<ApiPool>),
    /// An exec scheme: its script (read from the scheme at send time) runs locally.
    Exec,
    /// A null scheme: the rendered commands go nowhere.
    Null,
    /// A NAS's own `script_name` (the legacy per-NAS script), no scheme.
    Script(Script),
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Device::Ssh(_) => "Device::Ssh",
            Device::Telnet(_) => "Device::Telnet",
            Device::Radius(_) => "Device::Radius",
            Device::Api(_) => "Device::Api",
            Device::Exec => "Device::Exec",
            Device::Null => "Device::Null",
            Device::Script(_) => "Device::Script",
        })
    }
}

/// What decides whether an existing pool can be kept: the NAS row (secrets included)
/// and the scheme's session settings. Any change builds a new pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceKey {
    nas: Nas,
    scheme: String,
}

pub fn device_key(nas: &Nas, scheme: &Scheme) -> DeviceKey {
    DeviceKey {
        nas: nas.clone(),
        scheme: format!(
            "{}|{}|{:?}|{}|{:?}|{}|{}",
            scheme.name,
            scheme.transport,
            scheme.cli.prompt.as_ref().map(|r| r.as_str()),
            scheme.cli.shell,
            scheme.cli.setup,
            scheme.cli.enable,
            scheme.tls,
        ),
    }
}

pub fn target(nas: &Nas, kind: TransportKind) -> Target {
    target_on(nas, kind.default_port())
}

/// The port a scheme talks to when the NAS row does not set one (API over TLS: 8729).
fn scheme_port(scheme: &Scheme) -> Option<u16> {
    match scheme.transport {
        TransportKind::Api if scheme.tls => Some(API_TLS_PORT),
        kind => kind.default_port(),
    }
}

/// RouterOS' `api-ssl` service port.
pub const API_TLS_PORT: u16 = 8729;

fn target_on(nas: &Nas, default_port: Option<u16>) -> Target {
    let port = nas
        .port
        .and_then(|p| u16::try_from(p).ok())
        .or(default_port)
        .unwrap_or(22);
    Target {
        nas_id: nas.id,
        nas_name: nas.name.clone(),
        host: nas.ip.clone(),
        port,
        login: nas.login.clone(),
        password: nas.password.clone(),
        secret: nas.secret.clone(),
        max_sessions: nas.max_sessions.max(1) as usize,
    }
}

/// A mistake in the NAS row that keeps its transport from ever reaching the device: an
/// SSH or RouterOS API NAS without a login, a RADIUS NAS without its secret. Reported as
/// a configuration error (the owner sends nothing and the NAS is not counted as down)
/// rather than found by failing every event. Telnet may log in without a user name and
/// SSH without a password (a key, or none), so those are not mistakes here. Pure.
pub fn config_problem(nas: &Nas, kind: TransportKind, scheme: &str) -> Option<String> {
    let unset = |v: &Option<String>| v.as_deref().is_none_or(|v| v.trim().is_empty());
    match kind {
        TransportKind::Ssh | TransportKind::Api if unset(&nas.login) => Some(format!(
            "login is not set for its {kind} scheme {scheme} (nasd nas set {} --login NAME)",
            nas.id
        )),
        TransportKind::Radius if nas.secret.as_ref().is_none_or(|s| s.expose().is_empty()) => {
            Some(format!(
                "the RADIUS secret is not set for its {kind} scheme {scheme} \
                 (nasd nas set {} --secret SECRET)",
                nas.id
            ))
        }
        _ => None,
    }
}

/// Builds the device for a NAS with a scheme (always `Some`; the `Option` stays for the
/// callers written when exec and null had none). A mistake in the row
/// ([`config_problem`]) or in the transport settings is the error.
pub fn build(nas: &Nas, scheme: &Scheme, cfg: &TransportConfig) -> Result<Option<Device>, String> {
    if let Some(problem) = config_problem(nas, scheme.transport, &scheme.name) {
        return Err(problem);
    }
    let target = target_on(nas, scheme_port(scheme));
    Ok(Some(match scheme.transport {
        TransportKind::Exec => Device::Exec,
        TransportKind::Null => Device::Null,
        TransportKind::Ssh => {
            let mode = if scheme.cli.shell {
                SshMode::Shell
            } else {
                SshMode::Exec
            };
            let mut opts = SshOptions::new(mode, cfg.known_hosts.clone());
            opts.host_key_policy = match (&nas.host_key, nas.host_key_policy.as_str()) {
                (Some(fp), _) => HostKeyPolicy::Pinned(fp.clone()),
                (None, "accept-new") => HostKeyPolicy::AcceptNew,
                _ => HostKeyPolicy::Strict,
            };
            opts.legacy_crypto = nas.legacy_crypto;
            opts.private_key = cfg.ssh_key.clone();
            opts.key_passphrase = cfg.ssh_key_passphrase.clone();
            if let Some(p) = &scheme.cli.prompt {
                opts.prompt = p.clone();
            }
            opts.enable = scheme.cli.enable;
            opts.setup = scheme.cli.setup.clone();
            opts.connect_timeout = cfg.connect_timeout;
            Device::Ssh(Arc::new(SshPool::new(target, opts)))
        }
        TransportKind::Telnet => {
            let mut opts = TelnetOptions::default();
            if let Some(p) = &scheme.cli.prompt {
                opts.prompt = p.clone();
            }
            opts.enable = scheme.cli.enable;
            opts.setup = scheme.cli.setup.clone();
            opts.connect_timeout = cfg.connect_timeout;
            Device::Telnet(Arc::new(TelnetPool::new(target, opts)))
        }
        TransportKind::Api => {
            let mut opts = ApiOptions {
                connect_timeout: cfg.connect_timeout,
                ..ApiOptions::default()
            };
            if scheme.tls {
                opts.tls = Some(api_tls(nas, cfg)?);
            }
            Device::Api(Arc::new(ApiPool::new(target, opts)))
        }
        TransportKind::Radius => {
            let mut dictionary = Dictionary::builtin();
            for path in &cfg.radius_dictionaries {
                dictionary
                    .load_extra(path)
                    .map_err(|e| format!("radius dictionary {}: {e}", path.display()))?;
            }
            Device::Radius(Arc::new(RadiusClient::new(
                target,
                RadiusOptions {
                    timeout: cfg.radius_timeout,
                    tries: cfg.radius_tries,
                    dictionary: Arc::new(dictionary),
                },
            )))
        }
    }))
}

/// How an API-over-TLS NAS checks its device's certificate, from the same columns as
/// SSH host keys: a `host_key` pins the certificate's fingerprint; `accept-new` trusts
/// on first use; `strict` verifies against `transport.api_tls_ca` when it is set, else
/// needs a fingerprint recorded in the known certificates file.
fn api_tls(nas: &Nas, cfg: &TransportConfig) -> Result<ApiTls, String> {
    let policy = match (&nas.host_key, nas.host_key_policy.as_str(), &cfg.api_tls_ca) {
        (Some(fp), _, _) => CertPolicy::Pinned(
            normalize_fingerprint(fp).map_err(|e| format!("nas {} host_key: {e}", nas.id))?,
        ),
        (None, "accept-new", _) => CertPolicy::AcceptNew,
        (None, _, Some(file)) => CertPolicy::Ca {
            roots: load_ca_file(file).map_err(|e| format!("transport.api_tls_ca: {e}"))?,
            file: file.clone(),
        },
        (None, _, None) => CertPolicy::Strict,
    };
    Ok(ApiTls {
        policy,
        known_certs: known_certs_path(&cfg.known_hosts),
    })
}

impl Device {
    /// The device of a NAS with its own `script_name`, run under `timeout`.
    pub fn script(path: &str, timeout: std::time::Duration) -> Device {
        Device::Script(Script {
            path: path.into(),
            timeout,
        })
    }

    /// Whether sending goes over the network to the NAS, so that an answer proves the
    /// device reachable (a local script or the null transport says nothing about it).
    pub fn is_remote(&self) -> bool {
        match self {
            Device::Ssh(_) | Device::Telnet(_) | Device::Radius(_) | Device::Api(_) => true,
            Device::Exec | Device::Null | Device::Script(_) => false,
        }
    }

    /// Sends one event: `cmd` with its variables (`secrets` apart, so that a script's
    /// printed command line leaves them out). Template schemes render first; a
    /// rendering error fails the event before anything is sent. `scheme` is None only
    /// for [`Device::Script`].
    pub async fn send(
        &self,
        scheme: Option<&Scheme>,
        cmd: &str,
        vars: Vars,
        secrets: Vars,
    ) -> Reply {
        let scheme = match (self, scheme) {
            (Device::Script(script), _) => return script.run(cmd, &vars, &secrets).await,
            (_, Some(scheme)) => scheme,
            (_, None) => return Reply::unsent(Verdict::Retry("no scheme".into())),
        };
        if let Device::Exec = self {
            if !scheme.defines(cmd) {
                return Reply::unsent(Verdict::Failed(format!(
                    "scheme {} does not define cmd {cmd}",
                    scheme.name
                )));
            }
            let Some(script) = &scheme.script else {
                return Reply::unsent(Verdict::Failed(format!(
                    "scheme {} has no script",
                    scheme.name
                )));
            };
            return exec::run_vars(script, cmd, &vars, &secrets, scheme.timeout).await;
        }
        let mut all = vars;
        all.extend(secrets);
        match scheme.render(cmd, &all) {
            Ok(commands) => self.send_rendered(scheme, cmd, commands).await,
            Err(e) => Reply::unsent(Verdict::Failed(e.to_string())),
        }
    }

    /// Sends the rendered commands of one event and judges the answers.
    async fn send_rendered(&self, scheme: &Scheme, cmd: &str, commands: Vec<String>) -> Reply {
        match self {
            // Not reached: `send` runs scripts itself, they take no rendered commands.
            Device::Exec | Device::Script(_) => Reply::unsent(Verdict::Failed(format!(
                "{self:?} does not send rendered commands"
            ))),
            Device::Null => null::send(commands),
            Device::Ssh(pool) => {
                let result = pool.run(&commands, scheme.timeout).await;
                crate::transport::answer::reply(cmd, &commands, &result, &scheme.answers)
            }
            Device::Telnet(pool) => {
                let result = pool.run(&commands, scheme.timeout).await;
                crate::transport::answer::reply(cmd, &commands, &result, &scheme.answers)
            }
            Device::Api(pool) => {
                let result = pool.run(&commands, scheme.timeout).await;
                crate::transport::answer::reply(cmd, &commands, &result, &scheme.answers)
            }
            Device::Radius(client) => {
                // One request per template; the event is done when every request is.
                let mut all = Reply {
                    commands: Vec::new(),
                    answer: String::new(),
                    verdict: Verdict::Done,
                };
                for request in &commands {
                    let reply = client.send(request).await;
                    all.commands.extend(reply.commands);
                    if !reply.answer.is_empty() {
                        if !all.answer.is_empty() {
                            all.answer.push('\n');
                        }
                        all.answer.push_str(&reply.answer);
                    }
                    if reply.verdict != Verdict::Done {
                        all.verdict = reply.verdict;
                        break;
                    }
                }
                all
            }
        }
    }

    /// Runs read-only commands on one session of the pool (so within `max_sessions`,
    /// beside the events in flight) and returns each command's output, in order. For
    /// `nasd reconcile`: only the CLI-like transports can print their state.
    pub async fn read(
        &self,
        commands: &[String],
        timeout: std::time::Duration,
    ) -> Result<Vec<String>, String> {
        let result = match self {
            Device::Ssh(p) => p.run(commands, timeout).await,
            Device::Telnet(p) => p.run(commands, timeout).await,
            Device::Api(p) => p.run(commands, timeout).await,
            Device::Radius(_) | Device::Exec | Device::Null | Device::Script(_) => {
                return Err(format!(
                    "{self:?} cannot read the NAS's state (ssh, telnet and api can)"
                ));
            }
        };
        if let Some(error) = result.error {
            return Err(error.to_string());
        }
        Ok(result.exchanges.into_iter().map(|ex| ex.output).collect())
    }

    /// Opens a session and logs in without sending a command (a pooled idle session is
    /// reused, so probe with a device of its own). RADIUS, scripts and the null
    /// transport have no login: an error says so.
    pub async fn login(&self, timeout: std::time::Duration) -> Result<(), String> {
        let result = match self {
            Device::Ssh(p) => p.run(&[], timeout).await,
            Device::Telnet(p) => p.run(&[], timeout).await,
            Device::Api(p) => p.run(&[], timeout).await,
            Device::Radius(_) => {
                return Err("RADIUS has no login: its next event is the probe".into());
            }
            Device::Exec | Device::Null | Device::Script(_) => {
                return Err("a local script has no login to probe".into());
            }
        };
        match result.error {
            None => Ok(()),
            Some(e) => Err(e.to_string()),
        }
    }

    /// Connections open to the device now (RADIUS: 0, it is connectionless).
    pub fn open_sessions(&self) -> usize {
        self.pool_counters().map_or(0, |c| c.open_sessions())
    }

    /// The session pool's counters, for the statistics (RADIUS has no sessions).
    pub fn pool_counters(&self) -> Option<Arc<PoolCounters>> {
        match self {
            Device::Ssh(p) => Some(p.counters()),
            Device::Telnet(p) => Some(p.counters()),
            Device::Api(p) => Some(p.counters()),
            Device::Radius(_) | Device::Exec | Device::Null | Device::Script(_) => None,
        }
    }

    pub async fn close(&self) {
        match self {
            Device::Ssh(p) => p.close().await,
            Device::Telnet(p) => p.close().await,
            Device::Api(p) => p.close().await,
            Device::Radius(_) | Device::Exec | Device::Null | Device::Script(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Secret;

    #[test]
    fn a_missing_login_or_secret_is_a_configuration_error() {
        let bare = Nas::new(7, "core", "10.0.0.7");
        let with = Nas {
            login: Some("admin".into()),
            secret: Some(Secret::new("s3cret")),
            ..bare.clone()
        };
        let blank = Nas {
            login: Some(" ".into()),
            secret: Some(Secret::new("")),
            ..bare.clone()
        };
        let login =
            "login is not set for its ssh scheme mikrotik-ssh (nasd nas set 7 --login NAME)";
        let secret = "the RADIUS secret is not set for its radius scheme mikrotik-coa \
                      (nasd nas set 7 --secret SECRET)";
        for (nas, kind, scheme, want) in [
            (
                &bare,
                TransportKind::Ssh,
                "mikrotik-ssh",
                Some(login.to_string()),
            ),
            (
                &blank,
                TransportKind::Ssh,
                "mikrotik-ssh",
                Some(login.to_string()),
            ),
            (&with, TransportKind::Ssh, "mikrotik-ssh", None),
            (
                &bare,
                TransportKind::Api,
                "mikrotik-api",
                Some(
                    "login is not set for its api scheme mikrotik-api \
                     (nasd nas set 7 --login NAME)"
                        .to_string(),
                ),
            ),
            (&with, TransportKind::Api, "mikrotik-api", None),
            (
                &bare,
                TransportKind::Radius,
                "mikrotik-coa",
                Some(secret.to_string()),
            ),
            (
                &blank,
                TransportKind::Radius,
                "mikrotik-coa",
                Some(secret.to_string()),
            ),
            (&with, TransportKind::Radius, "mikrotik-coa", None),
            // Telnet may log in without a user name; exec and null need nothing.
            (&bare, TransportKind::Telnet, "mikrotik-telnet", None),
            (&bare, TransportKind::Exec, "demo-exec", None),
            (&bare, TransportKind::Null, "null-routeros", None),
        ] {
            assert_eq!(
                config_problem(nas, kind, scheme),
                want,
                "{kind} {scheme} {nas:?}"
            );
        }
    }
}
