//! `[reconcile]`: the daemon's own reconciliation runs (`nasd reconcile` needs none of
//! it). Without the section the daemon never reconciles by itself.

use std::time::Duration;

use serde::Deserialize;

use super::keys::{ConfigError, duration_key};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReconcileConfig {
    /// Reconcile every NAS this daemon serves this often (None: no scheduled runs).
    pub every: Option<Duration>,
    /// Reconcile a NAS when it comes back after being down (the breaker closed).
    pub on_return: bool,
    /// Enqueue the fixing events (false: only report the differences in the daemon log).
    pub apply: bool,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawReconcile {
    every: Option<String>,
    #[serde(default)]
    on_return: bool,
    #[serde(default)]
    apply: bool,
}

pub(super) fn reconcile_section(raw: RawReconcile) -> Result<ReconcileConfig, ConfigError> {
    let every = match &raw.every {
        None => None,
        Some(_) => Some(duration_key(
            "reconcile.every",
            raw.every.as_ref(),
            Duration::ZERO,
        )?),
    };
    if every.is_some_and(|e| e < Duration::from_secs(60)) {
        return Err(ConfigError::Key {
            key: "reconcile.every",
            message: format!(
                "{} is too often: at least 1m (each run reads the whole state of every NAS)",
                raw.every.unwrap_or_default()
            ),
        });
    }
    Ok(ReconcileConfig {
        every,
        on_return: raw.on_return,
        apply: raw.apply,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconcile_section_table() {
        let cases: &[(&str, Result<ReconcileConfig, &str>)] = &[
            ("", Ok(ReconcileConfig::default())),
            (
                "every = \"6h\"\napply = true",
                Ok(ReconcileConfig {
                    every: Some(Duration::from_secs(6 * 3600)),
                    on_return: false,
                    apply: true,
                }),
            ),
            (
                "on_return = true",
                Ok(ReconcileConfig {
                    every: None,
                    on_return: true,
                    apply: false,
                }),
            ),
            ("every = \"10s\"", Err("reconcile.every: 10s is too often")),
            ("every = \"soon\"", Err("reconcile.every")),
        ];
        for (text, want) in cases {
            let raw: RawReconcile = toml::from_str(text).expect("toml");
            let got = reconcile_section(raw);
            match (got, want) {
                (Ok(g), Ok(w)) => assert_eq!(&g, w, "{text}"),
                (Err(e), Err(w)) => assert!(e.to_string().contains(w), "{text}: {e}"),
                (g, w) => panic!("{text}: got {g:?}, want {w:?}"),
            }
        }
    }
}
