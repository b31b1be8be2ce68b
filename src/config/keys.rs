//! The building blocks of config parsing: the error that names the key, and the
//! readers of durations ("30s", "5m") and sizes ("10MB" or a number of bytes).

use std::time::Duration;

use crate::duration::parse_duration;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config {path}: {message}")]
    File { path: String, message: String },
    #[error("config key {key}: {message}")]
    Key { key: &'static str, message: String },
}

pub fn duration_key(
    key: &'static str,
    raw: Option<&String>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match raw {
        None => Ok(default),
        Some(text) => parse_duration(text).map_err(|message| ConfigError::Key { key, message }),
    }
}

pub fn size_key(
    key: &'static str,
    raw: Option<&toml::Value>,
    default: u64,
) -> Result<u64, ConfigError> {
    let message = match raw {
        None => return Ok(default),
        Some(toml::Value::Integer(n)) => match u64::try_from(*n) {
            Ok(n) => return Ok(n),
            Err(_) => format!("{n} is negative"),
        },
        Some(toml::Value::String(text)) => match crate::journal::parse_size(text) {
            Ok(n) => return Ok(n),
            Err(message) => message,
        },
        Some(other) => format!("expected a size such as \"10MB\", got {other}"),
    };
    Err(ConfigError::Key { key, message })
}
