//! `[log]` settings: the line format and rotation sizes, and the size syntax they use.

/// Default `[log] max_size`: the daemon log and each NAS log (50 MiB).
pub const DEFAULT_MAX_SIZE: u64 = 50 << 20;
/// Default `[log] account_max_size`: each account log (1 MiB).
pub const DEFAULT_ACCOUNT_MAX_SIZE: u64 = 1 << 20;
/// Default `[log] backups`: rotated files kept per log.
pub const DEFAULT_BACKUPS: u32 = 5;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// The Carbon-compatible text lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl LogFormat {
    /// `"text"` or `"json"`.
    pub fn parse(text: &str) -> Result<LogFormat, String> {
        match text.trim() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!(
                "`{other}` is not a log format: use \"text\" or \"json\""
            )),
        }
    }
}

/// `[log]`: format and rotation of the log files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    pub format: LogFormat,
    /// Rotate the daemon log and each NAS log before it would exceed this many bytes
    /// (0: never).
    pub max_size: u64,
    /// The same for each account log (0: never).
    pub account_max_size: u64,
    /// Rotated files kept per log: `file.1` (newest) .. `file.N`. 0: a full log is
    /// simply started again.
    pub backups: u32,
    /// Compress rotated files to `file.1.gz` ...
    pub gzip: bool,
    /// Format of the daemon's own diagnostics on stderr (tracing).
    pub stderr_format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> LogConfig {
        LogConfig {
            format: LogFormat::Text,
            max_size: DEFAULT_MAX_SIZE,
            account_max_size: DEFAULT_ACCOUNT_MAX_SIZE,
            backups: DEFAULT_BACKUPS,
            gzip: false,
            stderr_format: LogFormat::Text,
        }
    }
}

/// A size such as `512KB`, `10MB`, `1GB` or a plain number of bytes. Units are binary
/// (`KB` = `K` = `KiB` = 1024) and case-insensitive.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let bad = || format!("`{text}` is not a size such as 512KB, 10MB or a number of bytes");
    let t = text.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(digits);
    if number.is_empty() {
        return Err(bad());
    }
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return Err(bad()),
    };
    number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(multiplier))
        .ok_or_else(|| format!("`{text}` is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_size_table() {
        let ok = [
            ("0", 0),
            ("4096", 4096),
            ("100B", 100),
            ("512KB", 512 << 10),
            ("512kb", 512 << 10),
            ("1k", 1024),
            ("2KiB", 2048),
            ("10MB", 10 << 20),
            (" 10 MB ", 10 << 20),
            ("1GB", 1 << 30),
            ("3gib", 3 << 30),
        ];
        for (text, want) in ok {
            assert_eq!(parse_size(text), Ok(want), "{text:?}");
        }
        for bad in [
            "",
            "MB",
            "ten",
            "1.5MB",
            "-1",
            "10TB",
            "10 M B",
            "99999999999999999999",
        ] {
            let err = parse_size(bad).unwrap_err();
            assert!(err.contains(&format!("`{bad}`")), "{bad:?}: {err}");
        }
        assert!(
            parse_size("99999999999GB")
                .unwrap_err()
                .contains("too large")
        );
        assert_eq!(LogFormat::parse("text"), Ok(LogFormat::Text));
        assert_eq!(LogFormat::parse("json"), Ok(LogFormat::Json));
        assert!(LogFormat::parse("JSON").unwrap_err().contains("\"json\""));
    }
}
