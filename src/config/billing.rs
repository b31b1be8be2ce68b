//! `[billing]`: the billing's own database (MySQL/MariaDB or PostgreSQL), where the
//! account variables are read (`params_query`) and, optionally, where new events are
//! taken from (`events_table` or `events_query`). Parsed and checked here, errors
//! naming the key; `crate::billing` connects and runs what this describes.

use std::time::Duration;

use serde::Deserialize;

use super::keys::{ConfigError, duration_key};

/// Which server the billing database is; decides the placeholder style.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BillingKind {
    /// `mysql://` (MySQL and MariaDB): parameters are `?`.
    MySql,
    /// `postgres://`: parameters are `$1`, `$2`, ...
    Postgres,
}

impl BillingKind {
    /// The placeholder of the one parameter of a query, as an operator writes it.
    pub fn placeholder(self) -> &'static str {
        match self {
            BillingKind::MySql => "?",
            BillingKind::Postgres => "$1",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            BillingKind::MySql => "mysql",
            BillingKind::Postgres => "postgres",
        }
    }
}

/// `[billing]`.
#[derive(Debug, Clone)]
pub struct BillingConfig {
    /// `mysql://USER:PASSWORD@HOST/DB` or `postgres://...`. It holds a password: show it
    /// only through [`BillingConfig::shown_url`].
    pub url: String,
    pub kind: BillingKind,
    /// One account's variables; the user id is its one parameter.
    pub params_query: String,
    /// Connections to the billing database.
    pub max_connections: u32,
    /// The longest a connection (or a free pooled one) may take before the billing
    /// database counts as unreachable.
    pub connect_timeout: Duration,
    /// Events read from a table of the billing database, if configured.
    pub events: Option<EventsSource>,
}

/// Where new events are read in the billing database, and what is done with a row once
/// it is in nasd's compact stack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventsSource {
    /// Rows with an id above the cursor (its one parameter); columns `id`, `cmd`,
    /// `user_id` and optionally `abonent_id`, `nas_ip`, `usluga_id`, `acct_session_id`.
    pub query: String,
    /// Run for each moved row with its billing id as the one parameter (a DELETE or an
    /// UPDATE that marks it); None leaves the rows where they are.
    pub after_move: Option<String>,
    /// Rows moved per transaction.
    pub batch: i64,
    /// How often the source is read.
    pub poll_interval: Duration,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawBilling {
    url: Option<String>,
    params_query: Option<String>,
    max_connections: Option<u32>,
    connect_timeout: Option<String>,
    events_table: Option<String>,
    events_query: Option<String>,
    after_move: Option<String>,
    events_batch: Option<i64>,
    events_poll: Option<String>,
}

fn key_error(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Key {
        key,
        message: message.into(),
    }
}

/// The columns an events source returns, in the order `events_table` selects them.
pub const EVENT_COLUMNS: &[&str] = &[
    "id",
    "cmd",
    "user_id",
    "abonent_id",
    "nas_ip",
    "usluga_id",
    "acct_session_id",
];

/// Parses and checks `[billing]`.
pub fn billing_section(raw: RawBilling) -> Result<BillingConfig, ConfigError> {
    let url = raw
        .url
        .ok_or_else(|| key_error("billing.url", "is required in [billing]"))?;
    let kind = if url.starts_with("mysql://") || url.starts_with("mariadb://") {
        BillingKind::MySql
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        BillingKind::Postgres
    } else {
        return Err(key_error(
            "billing.url",
            format!(
                "`{}` is not supported: expected mysql://USER@HOST/DB or postgres://USER@HOST/DB",
                shown_url(&url)
            ),
        ));
    };
    // sqlx knows MariaDB as mysql://.
    let url = match url.strip_prefix("mariadb://") {
        Some(rest) => format!("mysql://{rest}"),
        None => url,
    };
    let params_query = raw
        .params_query
        .ok_or_else(|| key_error("billing.params_query", "is required in [billing]"))?;
    one_parameter("billing.params_query", &params_query, kind, "the user id")?;
    let max_connections = raw.max_connections.unwrap_or(4);
    if !(1..=64).contains(&max_connections) {
        return Err(key_error(
            "billing.max_connections",
            format!("{max_connections} is out of range (1 to 64)"),
        ));
    }
    let connect_timeout = duration_key(
        "billing.connect_timeout",
        raw.connect_timeout.as_ref(),
        Duration::from_secs(5),
    )?;
    if connect_timeout < Duration::from_millis(100) {
        return Err(key_error(
            "billing.connect_timeout",
            "must be at least 100ms",
        ));
    }
    let events = events_source(
        kind,
        raw.events_table,
        raw.events_query,
        raw.after_move,
        raw.events_batch,
        raw.events_poll,
    )?;
    Ok(BillingConfig {
        url,
        kind,
        params_query,
        max_connections,
        connect_timeout,
        events,
    })
}

fn events_source(
    kind: BillingKind,
    table: Option<String>,
    query: Option<String>,
    after_move: Option<String>,
    batch: Option<i64>,
    poll: Option<String>,
) -> Result<Option<EventsSource>, ConfigError> {
    let query = match (&table, query) {
        (None, None) => {
            for (key, set) in [
                ("billing.after_move", after_move.is_some()),
                ("billing.events_batch", batch.is_some()),
                ("billing.events_poll", poll.is_some()),
            ] {
                if set {
                    return Err(key_error(key, "needs events_table or events_query"));
                }
            }
            return Ok(None);
        }
        (Some(_), Some(_)) => {
            return Err(key_error(
                "billing.events_query",
                "give events_table or events_query, not both",
            ));
        }
        (Some(t), None) => {
            if !is_table_name(t) {
                return Err(key_error(
                    "billing.events_table",
                    format!(
                        "`{t}` is not a table name (letters, digits, _ and one optional schema.)"
                    ),
                ));
            }
            format!(
                "SELECT {} FROM {t} WHERE id > {}",
                EVENT_COLUMNS.join(", "),
                kind.placeholder()
            )
        }
        (None, Some(q)) => {
            one_parameter(
                "billing.events_query",
                &q,
                kind,
                "the cursor (the last id moved)",
            )?;
            q
        }
    };
    let after_move = match after_move.as_deref().map(str::trim) {
        None | Some("keep") => None,
        Some("delete") => match &table {
            Some(t) => Some(format!("DELETE FROM {t} WHERE id = {}", kind.placeholder())),
            None => {
                return Err(key_error(
                    "billing.after_move",
                    "\"delete\" needs events_table; with events_query give the statement itself \
                     (e.g. DELETE FROM events WHERE id = ?)",
                ));
            }
        },
        Some(statement) => {
            one_parameter(
                "billing.after_move",
                statement,
                kind,
                "the billing id of the row",
            )?;
            Some(statement.to_string())
        }
    };
    let batch = batch.unwrap_or(500);
    if !(1..=10_000).contains(&batch) {
        return Err(key_error(
            "billing.events_batch",
            format!("{batch} is out of range (1 to 10000)"),
        ));
    }
    let poll_interval = duration_key("billing.events_poll", poll.as_ref(), Duration::from_secs(1))?;
    if poll_interval < Duration::from_millis(10) {
        return Err(key_error("billing.events_poll", "must be at least 10ms"));
    }
    Ok(Some(EventsSource {
        query,
        after_move,
        batch,
        poll_interval,
    }))
}

/// `name` or `schema.name`, each of ASCII letters, digits and `_`, not starting with a digit.
fn is_table_name(name: &str) -> bool {
    let parts: Vec<&str> = name.split('.').collect();
    parts.len() <= 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && !p.starts_with(|c: char| c.is_ascii_digit())
                && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        })
}

/// Refuses a query that does not take exactly one parameter in `kind`'s style.
fn one_parameter(
    key: &'static str,
    query: &str,
    kind: BillingKind,
    what: &str,
) -> Result<(), ConfigError> {
    let found = placeholders(query, kind);
    let ok = match kind {
        BillingKind::MySql => found.len() == 1,
        BillingKind::Postgres => !found.is_empty() && found.iter().all(|p| p == "$1"),
    };
    if ok {
        return Ok(());
    }
    Err(key_error(
        key,
        format!(
            "must take {what} as its one parameter, written {} on {} (found {})",
            kind.placeholder(),
            kind.name(),
            if found.is_empty() {
                "none".to_string()
            } else {
                found.join(" ")
            }
        ),
    ))
}

/// The placeholders of `query` outside quotes and comments: every `?` (MySQL) or every
/// `$N` (PostgreSQL). Pure.
pub fn placeholders(query: &str, kind: BillingKind) -> Vec<String> {
    let bytes = query.as_bytes();
    let mut out = Vec::new();
    let mut quote: Option<u8> = None;
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        match quote {
            Some(q) if c == b'\\' && q != b'"' && kind == BillingKind::MySql => i += 1,
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == b'\'' || c == b'"' || c == b'`' => quote = Some(c),
            None if c == b'-' && bytes.get(i + 1) == Some(&b'-') => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
            }
            None if c == b'#' && kind == BillingKind::MySql => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
            }
            None if c == b'?' && kind == BillingKind::MySql => out.push("?".to_string()),
            None if c == b'$' && kind == BillingKind::Postgres => {
                let digits = bytes[i + 1..]
                    .iter()
                    .take_while(|b| b.is_ascii_digit())
                    .count();
                if digits > 0 {
                    out.push(query[i..i + 1 + digits].to_string());
                    i += digits;
                }
            }
            None => {}
        }
        i += 1;
    }
    out
}

/// `url` without its password, for messages.
pub fn shown_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

impl BillingConfig {
    /// The url without its password.
    pub fn shown_url(&self) -> String {
        shown_url(&self.url)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<BillingConfig, String> {
        let raw: RawBilling = toml::from_str(text).map_err(|e| e.to_string())?;
        billing_section(raw).map_err(|e| e.to_string())
    }

    #[test]
    fn placeholders_outside_quotes_and_comments() {
        use BillingKind::{MySql, Postgres};
        for (query, kind, want) in [
            ("SELECT * FROM a WHERE id = ?", MySql, vec!["?"]),
            (
                "SELECT '?' , \"?\", `?` FROM a WHERE id = ?",
                MySql,
                vec!["?"],
            ),
            ("SELECT 'it\\'s ?' FROM a WHERE id = ?", MySql, vec!["?"]),
            ("SELECT 1 -- ?\nFROM a WHERE id = ? # ?", MySql, vec!["?"]),
            (
                "SELECT * FROM a WHERE id = ? OR b = ?",
                MySql,
                vec!["?", "?"],
            ),
            ("SELECT * FROM a WHERE id = $1", Postgres, vec!["$1"]),
            (
                "SELECT '$2' FROM a WHERE id = $1 AND b = $1",
                Postgres,
                vec!["$1", "$1"],
            ),
            (
                "SELECT * FROM a WHERE id = $1 AND b = $2",
                Postgres,
                vec!["$1", "$2"],
            ),
            ("SELECT * FROM a WHERE id = ?", Postgres, vec![]),
        ] {
            assert_eq!(placeholders(query, kind), want, "{query}");
        }
    }

    #[test]
    fn keys_and_their_errors() {
        let ok = parse(
            "url = \"mysql://root:pw@127.0.0.1/b\"\nparams_query = \"SELECT * FROM u WHERE id = ?\"\n\
             events_table = \"events_stack_compact\"\nafter_move = \"delete\"\n",
        )
        .unwrap();
        assert_eq!(ok.kind, BillingKind::MySql);
        let events = ok.events.unwrap();
        assert_eq!(
            events.query,
            "SELECT id, cmd, user_id, abonent_id, nas_ip, usluga_id, acct_session_id FROM events_stack_compact WHERE id > ?"
        );
        assert_eq!(
            events.after_move.as_deref(),
            Some("DELETE FROM events_stack_compact WHERE id = ?")
        );
        let pg =
            parse("url = \"postgres://b@h/b\"\nparams_query = \"SELECT 1 AS a WHERE $1 > 0\"\n")
                .unwrap();
        assert_eq!(pg.kind, BillingKind::Postgres);
        assert!(pg.events.is_none());
        assert_eq!(
            parse("url = \"mariadb://u:secret@h/b\"\nparams_query = \"SELECT ?\"")
                .unwrap()
                .url,
            "mysql://u:secret@h/b"
        );
        for (text, want) in [
            (
                "params_query = \"SELECT ?\"",
                "config key billing.url: is required",
            ),
            (
                "url = \"oracle://u:secret@h/b\"\nparams_query = \"SELECT ?\"",
                "config key billing.url: `oracle://u:***@h/b` is not supported",
            ),
            (
                "url = \"mysql://h/b\"",
                "config key billing.params_query: is required",
            ),
            (
                "url = \"mysql://h/b\"\nparams_query = \"SELECT * FROM u WHERE id = $1\"",
                "config key billing.params_query: must take the user id as its one parameter, written ? on mysql (found none)",
            ),
            (
                "url = \"postgres://h/b\"\nparams_query = \"SELECT * FROM u WHERE id = ?\"",
                "written $1 on postgres",
            ),
            (
                "url = \"mysql://h/b\"\nparams_query = \"SELECT ?\"\nevents_table = \"a b\"",
                "config key billing.events_table: `a b` is not a table name",
            ),
            (
                "url = \"mysql://h/b\"\nparams_query = \"SELECT ?\"\nevents_query = \"SELECT 1\"",
                "config key billing.events_query: must take the cursor",
            ),
            (
                "url = \"mysql://h/b\"\nparams_query = \"SELECT ?\"\nevents_query = \"SELECT * FROM e WHERE id > ?\"\nafter_move = \"delete\"",
                "config key billing.after_move: \"delete\" needs events_table",
            ),
            (
                "url = \"mysql://h/b\"\nparams_query = \"SELECT ?\"\nafter_move = \"delete\"",
                "config key billing.after_move: needs events_table or events_query",
            ),
            (
                "url = \"mysql://h/b\"\nparams_query = \"SELECT ?\"\nevents_table = \"e\"\nevents_batch = 0",
                "config key billing.events_batch: 0 is out of range",
            ),
            (
                "url = \"mysql://h/b\"\nparams_query = \"SELECT ?\"\nmax_connections = 0",
                "config key billing.max_connections: 0 is out of range",
            ),
        ] {
            let got = parse(text).unwrap_err();
            assert!(got.contains(want), "{text}\n{got}\nshould contain {want}");
            assert!(!got.contains("secret"), "{got}");
        }
    }
}
