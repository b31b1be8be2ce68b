//! Sending one event the way its NAS is configured: the attempt's variables, the NAS's
//! device, and the NAS's secrets masked out of the reply. The owner's workers and
//! `nasd send` both go through [`send_event`]; nothing here touches the database.

use std::sync::Arc;
use std::time::Duration;

use super::{Reply, Verdict};
use crate::model::{Nas, StackEvent, Vars};
use crate::scheme::Scheme;
use crate::transport::device::Device;

pub use super::exec::env_pairs;

/// What sending to a NAS needs to know; an owner's copy is replaced whole when the
/// settings change.
#[derive(Debug, Clone)]
pub struct NasRuntime {
    pub nas: Nas,
    /// The scheme, for a NAS without `script_name`.
    pub scheme: Option<Arc<Scheme>>,
    /// Why the NAS cannot be served now (e.g. its scheme is missing); its events wait.
    pub unavailable: Option<String>,
    /// How the NAS's scheme reaches the device: a pool, a client, or a local script.
    pub device: Option<Device>,
    /// Who sends, under which ownership of the NAS.
    pub tenure: Tenure,
}

/// The daemon that sends to a NAS and the epoch of its ownership: templates and
/// scripts see them as `daemon` and `nas_epoch`, so a device (or a test) can tell which
/// owner sent a command. The epoch grows at every change of owner; it is 0 where there
/// is no cluster (SQLite, `nasd send`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenure {
    pub daemon: Arc<str>,
    pub epoch: i64,
}

impl Tenure {
    pub fn new(daemon: &str, epoch: i64) -> Tenure {
        Tenure {
            daemon: Arc::from(daemon),
            epoch,
        }
    }

    /// Adds `daemon` and `nas_epoch` to an attempt's variables.
    pub fn add_vars(&self, vars: &mut Vars) {
        vars.insert("daemon".into(), self.daemon.as_ref().into());
        vars.insert("nas_epoch".into(), self.epoch.into());
    }
}

impl Reply {
    /// The reply of an attempt that sent nothing.
    pub fn unsent(verdict: Verdict) -> Reply {
        Reply {
            commands: vec![],
            answer: String::new(),
            verdict,
        }
    }
}

/// The variables an attempt sees: the event's params, the event itself and the NAS.
/// Secrets are returned apart so that they are passed on but never logged.
pub fn attempt_vars(event: &StackEvent, nas: &Nas) -> (Vars, Vars) {
    let mut vars = event.params.clone();
    vars.insert("cmd".into(), event.cmd.clone().into());
    vars.insert("event_id".into(), event.id.into());
    vars.insert("try_count".into(), event.try_count.into());
    vars.insert("user_id".into(), event.user_id.into());
    if let Some(a) = event.abonent_id {
        vars.insert("abonent_id".into(), a.into());
    }
    vars.insert("nas_id".into(), nas.id.into());
    vars.insert("nas_ip".into(), nas.ip.clone().into());
    vars.insert("nas_name".into(), nas.name.clone().into());
    if let Some(port) = nas.port {
        vars.insert("telnet_port".into(), port.into());
        vars.insert("nas_port".into(), port.into());
    }
    if let Some(login) = &nas.login {
        vars.insert("telnet_login".into(), login.clone().into());
        vars.insert("nas_login".into(), login.clone().into());
    }
    let mut secrets = Vars::new();
    if let Some(p) = &nas.password {
        secrets.insert("telnet_password".into(), p.expose().into());
        secrets.insert("nas_password".into(), p.expose().into());
    }
    if let Some(s) = &nas.secret {
        secrets.insert("coa_psw".into(), s.expose().into());
    }
    (vars, secrets)
}

/// Sends one event the way its NAS is configured, and returns the reply with the NAS's
/// password and secret masked (see [`Reply::redacted`]). A NAS with `script_name` runs
/// that script under `exec_timeout`, whatever its scheme.
pub async fn send_event(runtime: &NasRuntime, event: &StackEvent, exec_timeout: Duration) -> Reply {
    send_unmasked(runtime, event, exec_timeout)
        .await
        .redacted(&[runtime.nas.password.as_ref(), runtime.nas.secret.as_ref()])
}

async fn send_unmasked(runtime: &NasRuntime, event: &StackEvent, exec_timeout: Duration) -> Reply {
    let (mut vars, secrets) = attempt_vars(event, &runtime.nas);
    runtime.tenure.add_vars(&mut vars);
    if let Some(script) = &runtime.nas.script_name {
        return Device::script(script, exec_timeout)
            .send(None, &event.cmd, vars, secrets)
            .await;
    }
    let Some(scheme) = &runtime.scheme else {
        return Reply::unsent(Verdict::Retry(
            runtime
                .unavailable
                .clone()
                .unwrap_or_else(|| "no scheme".into()),
        ));
    };
    match &runtime.device {
        Some(device) => device.send(Some(scheme), &event.cmd, vars, secrets).await,
        None => Reply::unsent(Verdict::Retry(format!(
            "nas {}: no {} connection configured",
            runtime.nas.id, scheme.transport
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Secret;

    fn nas() -> Nas {
        Nas {
            id: 7,
            name: "Test NAS".into(),
            ip: "10.0.0.1".into(),
            scheme: Some("null-routeros".into()),
            script_name: None,
            n_workers: 4,
            protocol: None,
            port: Some(23),
            login: Some("admin".into()),
            password: Some(Secret::new("pw")),
            secret: Some(Secret::new("coa")),
            max_sessions: 2,
            enabled: true,
            host_key_policy: "strict".into(),
            host_key: None,
            legacy_crypto: false,
            paused: false,
        }
    }

    #[test]
    fn vars_keep_secrets_apart() {
        let mut params = Vars::new();
        params.insert("ip".into(), "10.1.1.1".into());
        let event = StackEvent {
            id: 5,
            compact_id: None,
            event_date: chrono::Utc::now(),
            enqueued_at: chrono::Utc::now(),
            cmd: "user_add".into(),
            user_id: 42,
            abonent_id: Some(4),
            nas_id: 7,
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
        let (vars, secrets) = attempt_vars(&event, &nas());
        assert_eq!(vars["ip"], "10.1.1.1");
        assert_eq!(vars["nas_ip"], "10.0.0.1");
        assert_eq!(vars["telnet_login"], "admin");
        assert_eq!(vars["event_id"], 5);
        assert!(!vars.contains_key("telnet_password"));
        assert!(!vars.values().any(|v| v == "pw" || v == "coa"));
        assert_eq!(secrets["telnet_password"], "pw");
        assert_eq!(secrets["coa_psw"], "coa");
    }
}
