//! The exec transport, compatible with existing OSS scripts: run a local script with the
//! cmd as its first argument and every variable in the environment, under a timeout.
//!
//! Exit 0 is done; exit 254 ("postpone"), exit 143 (killed by SIGTERM), death by a
//! signal and the timeout mean retry later; any other exit fails the event.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

use super::{Reply, Verdict, truncate_answer};
use crate::duration::format_duration;
use crate::model::Vars;
use crate::scheme::{Dialect, escape};

/// Device output kept per attempt.
const MAX_ANSWER: usize = 64 * 1024;

/// How a finished script maps to a verdict. `code` is None when a signal killed it.
pub fn classify(code: Option<i32>) -> Verdict {
    match code {
        Some(0) => Verdict::Done,
        Some(254) => Verdict::Retry("exit 254 (postpone)".into()),
        Some(143) => Verdict::Retry("exit 143 (terminated)".into()),
        Some(other) => Verdict::Failed(format!("exit {other}")),
        None => Verdict::Retry("killed by a signal".into()),
    }
}

/// The command as an operator would type it: `VAR=value ... /path/script cmd`,
/// shell-quoted. Secret variables are passed to the script but left out of this line.
pub fn command_line(script: &Path, cmd: &str, env: &[(String, String)]) -> String {
    let mut parts: Vec<String> = env
        .iter()
        .filter(|(k, _)| is_env_name(k))
        .map(|(k, v)| {
            format!(
                "{k}={}",
                escape(Dialect::Shell, v).unwrap_or_else(|_| "''".into())
            )
        })
        .collect();
    parts.push(escape(Dialect::Shell, &script.display().to_string()).unwrap_or_default());
    parts.push(escape(Dialect::Shell, cmd).unwrap_or_default());
    parts.join(" ")
}

/// Only names a shell accepts as variables are passed (a params column such as `a-b`
/// would not be reachable from a script anyway).
fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A local script with its deadline: a NAS's own `script_name` (the legacy per-NAS
/// script, run under the daemon's `exec_timeout`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Script {
    pub path: PathBuf,
    pub timeout: Duration,
}

impl Script {
    /// Runs `script cmd` with the variables in the environment, secrets unlogged.
    pub async fn run(&self, cmd: &str, vars: &Vars, secrets: &Vars) -> Reply {
        run_vars(&self.path, cmd, vars, secrets, self.timeout).await
    }
}

/// Variables as environment pairs: strings as they are, other values as JSON text.
pub fn env_pairs(vars: &Vars) -> Vec<(String, String)> {
    vars.iter()
        .map(|(k, v)| {
            let text = match v {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            (k.clone(), text)
        })
        .collect()
}

/// [`run`] with variables: `vars` logged in the command line, `secrets` not.
pub async fn run_vars(
    script: &Path,
    cmd: &str,
    vars: &Vars,
    secrets: &Vars,
    timeout: Duration,
) -> Reply {
    run(script, cmd, &env_pairs(vars), &env_pairs(secrets), timeout).await
}

/// Runs `script cmd` with `env` (logged) and `secret_env` (not logged) added to the
/// daemon's environment.
pub async fn run(
    script: &Path,
    cmd: &str,
    env: &[(String, String)],
    secret_env: &[(String, String)],
    timeout: Duration,
) -> Reply {
    let line = command_line(script, cmd, env);
    let mut command = Command::new(script);
    command
        .arg(cmd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in env.iter().chain(secret_env) {
        if is_env_name(k) && !v.contains('\0') {
            command.env(k, v);
        }
    }
    let child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            let what = format!("cannot run {}", script.display());
            // Short of descriptors or processes: nothing ran, try again later.
            let verdict = if super::resource::exhausted(&e) {
                Verdict::Requeue(super::resource::describe(&what, &e))
            } else {
                Verdict::Failed(format!("{what}: {e}"))
            };
            return Reply {
                commands: vec![line],
                answer: String::new(),
                verdict,
            };
        }
    };
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Err(_) => Reply {
            commands: vec![line],
            answer: String::new(),
            verdict: Verdict::Retry(format!("timeout after {}", format_duration(timeout))),
        },
        Ok(Err(e)) => Reply {
            commands: vec![line],
            answer: String::new(),
            verdict: Verdict::Retry(format!("waiting for {}: {e}", script.display())),
        },
        Ok(Ok(output)) => {
            let mut answer = String::from_utf8_lossy(&output.stdout)
                .trim_end()
                .to_string();
            let stderr = String::from_utf8_lossy(&output.stderr);
            for l in stderr.lines() {
                if !answer.is_empty() {
                    answer.push('\n');
                }
                answer.push_str("stderr: ");
                answer.push_str(l);
            }
            Reply {
                commands: vec![line],
                answer: truncate_answer(answer, MAX_ANSWER),
                verdict: classify(output.status.code()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_table() {
        let cases = [
            (Some(0), Verdict::Done),
            (Some(254), Verdict::Retry("exit 254 (postpone)".into())),
            (Some(143), Verdict::Retry("exit 143 (terminated)".into())),
            (Some(1), Verdict::Failed("exit 1".into())),
            (Some(2), Verdict::Failed("exit 2".into())),
            (None, Verdict::Retry("killed by a signal".into())),
        ];
        for (code, want) in cases {
            assert_eq!(classify(code), want, "code {code:?}");
        }
    }

    #[test]
    fn command_line_is_quoted_and_skips_bad_names() {
        let env = vec![
            ("user_id".to_string(), "42".to_string()),
            ("login".to_string(), "x; /system reset".to_string()),
            ("bad-name".to_string(), "1".to_string()),
        ];
        assert_eq!(
            command_line(Path::new("/opt/oss/bin/session"), "user_add", &env),
            "user_id=42 login='x; /system reset' /opt/oss/bin/session user_add"
        );
    }

    #[tokio::test]
    async fn runs_a_script_and_maps_exit_codes() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("s.sh");
        std::fs::write(
            &script,
            "#!/bin/sh\necho \"cmd=$1 ip=$ip pw=$telnet_password\"\necho oops >&2\nexit $code\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let env = |code: &str| {
            vec![
                ("ip".to_string(), "10.0.0.1".to_string()),
                ("code".to_string(), code.to_string()),
            ]
        };
        let secret = vec![("telnet_password".to_string(), "s3cret".to_string())];
        let ok = run(
            &script,
            "user_add",
            &env("0"),
            &secret,
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(ok.verdict, Verdict::Done);
        assert_eq!(
            ok.answer,
            "cmd=user_add ip=10.0.0.1 pw=s3cret\nstderr: oops"
        );
        assert!(!ok.commands[0].contains("s3cret"));
        let retry = run(
            &script,
            "user_add",
            &env("254"),
            &[],
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(retry.verdict, Verdict::Retry("exit 254 (postpone)".into()));
        let failed = run(&script, "user_add", &env("3"), &[], Duration::from_secs(5)).await;
        assert_eq!(failed.verdict, Verdict::Failed("exit 3".into()));
    }

    #[tokio::test]
    async fn timeout_means_retry() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("slow.sh");
        std::fs::write(&script, "#!/bin/sh\nexec sleep 5\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let reply = run(&script, "user_add", &[], &[], Duration::from_millis(200)).await;
        assert_eq!(reply.verdict, Verdict::Retry("timeout after 200ms".into()));
    }

    #[tokio::test]
    async fn missing_script_fails_with_reason() {
        let reply = run(
            Path::new("/nonexistent/nasd-script"),
            "user_add",
            &[],
            &[],
            Duration::from_secs(1),
        )
        .await;
        match reply.verdict {
            Verdict::Failed(why) => assert!(why.starts_with("cannot run /nonexistent/nasd-script")),
            other => panic!("unexpected {other:?}"),
        }
    }
}
