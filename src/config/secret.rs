//! Secrets kept outside the TOML. A secret key `X` may instead be given as `X_file` (the
//! file's content, trailing newline dropped), `X_env` (an environment variable) or
//! `X_credential` (a systemd credential: the file `$CREDENTIALS_DIRECTORY/<name>`, from
//! `LoadCredential=` or `LoadCredentialEncrypted=` in the unit). At most one of the four
//! is given. Errors name the key and where the value was looked for, never the value.

use std::path::PathBuf;

/// Where one secret may come from.
#[derive(Debug, Default, Clone)]
pub struct Sources {
    pub value: Option<String>,
    pub file: Option<PathBuf>,
    pub env: Option<String>,
    pub credential: Option<String>,
}

/// The environment as the config sees it (a function, so tests need not touch the
/// process's own).
pub type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The process environment.
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// The secret `key` from the one source given, or `None` when none is.
pub fn resolve(key: &str, src: Sources, env: Env<'_>) -> Result<Option<String>, String> {
    let given = [
        src.value.is_some(),
        src.file.is_some(),
        src.env.is_some(),
        src.credential.is_some(),
    ]
    .iter()
    .filter(|g| **g)
    .count();
    if given > 1 {
        return Err(format!(
            "give only one of {key}, {key}_file, {key}_env, {key}_credential"
        ));
    }
    if let Some(value) = src.value {
        return Ok(Some(value));
    }
    if let Some(path) = src.file {
        return read(&path)
            .map(Some)
            .map_err(|e| format!("cannot read {key}_file {}: {e}", path.display()));
    }
    if let Some(var) = src.env {
        return env(&var)
            .map(Some)
            .ok_or_else(|| format!("environment variable {var} ({key}_env) is not set"));
    }
    if let Some(name) = src.credential {
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(format!(
                "{key}_credential `{}` is not a credential name",
                name.escape_default()
            ));
        }
        let Some(dir) = env("CREDENTIALS_DIRECTORY") else {
            return Err(format!(
                "{key}_credential `{name}`: $CREDENTIALS_DIRECTORY is not set (systemd sets it \
                 for a unit with LoadCredential={name}:...)"
            ));
        };
        let path = PathBuf::from(dir).join(&name);
        return read(&path).map(Some).map_err(|e| {
            format!(
                "{key}_credential `{name}`: cannot read {}: {e}",
                path.display()
            )
        });
    }
    Ok(None)
}

fn read(path: &std::path::Path) -> std::io::Result<String> {
    Ok(std::fs::read_to_string(path)?
        .trim_end_matches(['\n', '\r'])
        .to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_source_and_its_errors() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), "from-file\n").unwrap();
        std::fs::write(dir.path().join("cred"), "from-credential\n").unwrap();
        let creds = dir.path().to_string_lossy().into_owned();
        let with_creds = |name: &str| match name {
            "CREDENTIALS_DIRECTORY" => Some(creds.clone()),
            "NOC" => Some("from-env".to_string()),
            _ => None,
        };
        let bare = |_: &str| None;
        let file = dir.path().join("token");
        let missing = dir.path().join("gone");
        type Case<'a> = (Sources, Env<'a>, Result<Option<&'a str>, String>);
        let cases: Vec<Case<'_>> = vec![
            (Sources::default(), &bare, Ok(None)),
            (
                Sources {
                    value: Some("plain".into()),
                    ..Sources::default()
                },
                &bare,
                Ok(Some("plain")),
            ),
            (
                Sources {
                    file: Some(file.clone()),
                    ..Sources::default()
                },
                &bare,
                Ok(Some("from-file")),
            ),
            (
                Sources {
                    file: Some(missing.clone()),
                    ..Sources::default()
                },
                &bare,
                Err(format!(
                    "cannot read k_file {}: No such file or directory (os error 2)",
                    missing.display()
                )),
            ),
            (
                Sources {
                    env: Some("NOC".into()),
                    ..Sources::default()
                },
                &with_creds,
                Ok(Some("from-env")),
            ),
            (
                Sources {
                    env: Some("NOC".into()),
                    ..Sources::default()
                },
                &bare,
                Err("environment variable NOC (k_env) is not set".into()),
            ),
            (
                Sources {
                    credential: Some("cred".into()),
                    ..Sources::default()
                },
                &with_creds,
                Ok(Some("from-credential")),
            ),
            (
                Sources {
                    credential: Some("cred".into()),
                    ..Sources::default()
                },
                &bare,
                Err(
                    "k_credential `cred`: $CREDENTIALS_DIRECTORY is not set (systemd sets it \
                     for a unit with LoadCredential=cred:...)"
                        .into(),
                ),
            ),
            (
                Sources {
                    credential: Some("../etc/passwd".into()),
                    ..Sources::default()
                },
                &with_creds,
                Err("k_credential `../etc/passwd` is not a credential name".into()),
            ),
            (
                Sources {
                    value: Some("plain".into()),
                    env: Some("NOC".into()),
                    ..Sources::default()
                },
                &with_creds,
                Err("give only one of k, k_file, k_env, k_credential".into()),
            ),
        ];
        for (src, env, want) in cases {
            let got = resolve("k", src.clone(), env);
            assert_eq!(got, want.map(|o| o.map(str::to_string)), "{src:?}");
        }
    }
}
