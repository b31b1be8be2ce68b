//! The operator console's queries (issue 14): events listed by state with filters and
//! keyset pages, bulk retry and cancel, account search, the audit log, pausing a NAS.
//!
//! The pure parts (state names, what a search text is, the `WHERE` of a filter, what a
//! bulk action does with the rows it found) are plain functions, table-tested below;
//! the two backends only run the SQL they build.
//!
//! Every list is bounded on a big history (1M rows): the console's filters have indexes
//! (migration 0004), pages are keyset pages (`id < before ORDER BY id DESC LIMIT n`),
//! and a history filter that may be rare and has no index of its own (error text, or a
//! NAS or command together with the outcome) examines at most [`SCAN_CAP`] ids below
//! the cursor per page: the page then says `scanned_capped` and its `next_before` lets
//! the operator go on searching older rows. A history time range becomes an id range
//! first (two probes of the finish-time index, see [`history_bounds`]), since the
//! planner cannot know that ids follow finish times.
//!
//! Cursors (`EventQuery::before_id`, `EventPage::next_before`): for `queued`,
//! `retrying` and `running` the event id (`EventStatus::id`, the compact id, which the
//! main stack keeps in `compact_id` in the same order); queued lists the compact stack
//! and the main stack's unclaimed first attempts merged by that id. For `failed` and
//! `done` the id of the `events_history` row (history is in finish order), which the
//! page does not show: pass `next_before` back as it is.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, TimeZone, Utc};
use serde::Serialize;

use super::{CompactEvent, EventStatus, Store, StoreError};

/// Most events on one page.
pub const MAX_PAGE: i64 = 500;
/// Most history ids one page examines for a filter without an index of its own.
pub const SCAN_CAP: i64 = 50_000;
/// Events per transaction of a bulk action.
pub const BULK_CHUNK: usize = 1000;

/// The state an operator lists events by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EventState {
    /// Not tried yet: in the compact stack, or in the main stack unclaimed with no attempt.
    Queued,
    /// In the main stack, waiting for another attempt.
    Retrying,
    /// Claimed by an owner, being sent.
    Running,
    /// In history, failed (including cancelled).
    Failed,
    /// In history, done.
    Done,
    /// In history, never sent: a later event of its coalesce group replaced it.
    Superseded,
}

impl EventState {
    pub const ALL: [EventState; 6] = [
        EventState::Queued,
        EventState::Retrying,
        EventState::Running,
        EventState::Failed,
        EventState::Done,
        EventState::Superseded,
    ];

    /// `queued`, `retrying`, `running`, `failed`, `done` or `superseded` (case and
    /// spaces ignored).
    pub fn parse(text: &str) -> Result<EventState, String> {
        let t = text.trim().to_ascii_lowercase();
        EventState::ALL
            .into_iter()
            .find(|s| s.as_str() == t)
            .ok_or_else(|| {
                format!(
                    "unknown event state `{}` (expected queued, retrying, running, failed, done or superseded)",
                    text.trim()
                )
            })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            EventState::Queued => "queued",
            EventState::Retrying => "retrying",
            EventState::Running => "running",
            EventState::Failed => "failed",
            EventState::Done => "done",
            EventState::Superseded => "superseded",
        }
    }

    fn in_history(self) -> bool {
        matches!(
            self,
            EventState::Failed | EventState::Done | EventState::Superseded
        )
    }
}

impl std::str::FromStr for EventState {
    type Err = String;
    fn from_str(s: &str) -> Result<EventState, String> {
        EventState::parse(s)
    }
}

impl std::fmt::Display for EventState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which events to list (`Store::events_list`) or act on (`Store::events_match_ids`).
#[derive(Debug, Clone, PartialEq)]
pub struct EventQuery {
    pub state: EventState,
    pub nas_id: Option<i64>,
    pub cmd: Option<String>,
    pub user_id: Option<i64>,
    /// Case-insensitive substring of the error text (`last_error` in the stack, `error`
    /// in history). Queued events have none, so it matches no queued event.
    pub error_like: Option<String>,
    /// `enqueued_at` for queued/retrying/running, `finished_at` for failed/done: from
    /// `since` (inclusive) to `until` (exclusive).
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    /// Keyset cursor: the page after the one whose `next_before` this is.
    pub before_id: Option<i64>,
    /// 1..=500 (clamped).
    pub limit: i64,
}

impl EventQuery {
    /// Every event of `state`, the first page of 50.
    pub fn new(state: EventState) -> EventQuery {
        EventQuery {
            state,
            nas_id: None,
            cmd: None,
            user_id: None,
            error_like: None,
            since: None,
            until: None,
            before_id: None,
            limit: 50,
        }
    }
}

/// One page of `Store::events_list`, newest first.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EventPage {
    pub events: Vec<EventStatus>,
    /// The cursor of the next page (None: this was the last).
    pub next_before: Option<i64>,
    /// The page examined only the newest [`SCAN_CAP`] history ids below its cursor and
    /// found fewer events than it could hold: older ones may match (`next_before` goes on
    /// from where it stopped).
    pub scanned_capped: bool,
}

/// What a bulk action did: each id acted on (with the retry's new event id), and each
/// id left alone with the reason.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct BulkOutcome {
    pub done: Vec<(i64, Option<i64>)>,
    pub skipped: Vec<(i64, String)>,
}

/// An account found by `Store::account_search`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AccountHit {
    pub user_id: i64,
    pub abonent_id: i64,
    pub nas_id: i64,
    pub login: Option<String>,
    pub ip: Option<String>,
    pub mac: Option<String>,
}

/// An operator action to record (`Store::audit_insert`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditEntry {
    /// The token name (or `anonymous`).
    pub who: String,
    /// What was done: `retry`, `cancel`, `pause`, `resume`, `send`, ...
    pub action: String,
    /// What it was done to: `event 12`, `nas 3`, a filter, ...
    pub target: String,
    pub detail: String,
    /// Events concerned (bulk actions).
    pub count: i64,
}

/// A row of `nasd_audit`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditRow {
    pub id: i64,
    pub at: DateTime<Utc>,
    pub who: String,
    pub action: String,
    pub target: String,
    pub detail: String,
    pub count: i64,
}

// ---------------------------------------------------------------------------------
// Pure parts.

/// What an account search text is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SearchKind {
    /// Digits: a user id (or an abonent id).
    Id(i64),
    /// An IP address: as typed and in its canonical form (they differ for IPv6).
    Ip(String, String),
    /// A MAC address in any notation, as 12 lowercase hex digits.
    Mac(String),
    /// Anything else: a login, exact or prefix, lowercased.
    Login(String),
}

/// Classifies a search text; None when it is blank.
pub fn classify_search(text: &str) -> Option<SearchKind> {
    let t = text.trim();
    if t.is_empty() {
        return None;
    }
    if t.bytes().all(|b| b.is_ascii_digit())
        && let Ok(id) = t.parse::<i64>()
    {
        return Some(SearchKind::Id(id));
    }
    if let Ok(ip) = t.parse::<std::net::IpAddr>() {
        return Some(SearchKind::Ip(t.to_string(), ip.to_string()));
    }
    if let Some(mac) = normalize_mac(t) {
        return Some(SearchKind::Mac(mac));
    }
    Some(SearchKind::Login(t.to_lowercase()))
}

/// `aa:bb:cc:dd:ee:ff`, `aa-bb-cc-dd-ee-ff` or `aabb.ccdd.eeff` (any case) as 12
/// lowercase hex digits; None for anything else (bare hex digits are taken for a login).
pub fn normalize_mac(text: &str) -> Option<String> {
    let t = text.trim();
    let groups: Vec<&str> = if t.contains(':') {
        t.split(':').collect()
    } else if t.contains('-') {
        t.split('-').collect()
    } else if t.contains('.') {
        t.split('.').collect()
    } else {
        return None;
    };
    let sizes_ok = match groups.len() {
        6 => groups.iter().all(|g| g.len() == 2),
        3 => groups.iter().all(|g| g.len() == 4),
        _ => false,
    };
    if !sizes_ok
        || !groups
            .iter()
            .all(|g| g.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        return None;
    }
    Some(groups.concat().to_ascii_lowercase())
}

/// The range `[low, high)` of lowercased logins that start with `prefix` (compared in
/// byte order; `prefix` itself sorts first, so an exact match comes first).
pub fn login_range(prefix: &str) -> (String, String) {
    let low = prefix.to_lowercase();
    let mut high = low.clone();
    high.push(char::MAX);
    (low, high)
}

/// The SQL text that turns `mac` into 12 lowercase hex digits (the index of migration
/// 0004 is on exactly this expression).
pub const MAC_EXPR: &str = "lower(replace(replace(replace(mac, ':', ''), '-', ''), '.', ''))";

/// `text` as a `LIKE ... ESCAPE '\'` pattern matching it anywhere, lowercased.
pub fn like_pattern(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('%');
    for c in text.to_lowercase().chars() {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('%');
    out
}

/// A value bound to a statement of the console.
#[derive(Debug, Clone, PartialEq)]
pub enum Bind {
    Int(i64),
    Text(String),
    /// TIMESTAMPTZ on PostgreSQL, epoch milliseconds on SQLite.
    Time(DateTime<Utc>),
}

/// The SQL dialect of placeholders.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// `$1, $2, ...`
    Postgres,
    /// `?1, ?2, ...`
    Sqlite,
}

/// The table a state lives in (`s` and `h` are the aliases the statements use).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// `events_stack_compact`, no alias.
    Compact,
    /// `events_stack s`.
    Stack,
    /// `events_history h`.
    History,
}

impl Source {
    /// The tables `state` lives in.
    pub fn of(state: EventState) -> &'static [Source] {
        match state {
            EventState::Queued => &[Source::Compact, Source::Stack],
            EventState::Retrying | EventState::Running => &[Source::Stack],
            EventState::Failed | EventState::Done | EventState::Superseded => &[Source::History],
        }
    }

    /// The keyset column (pages are `key < before ORDER BY key DESC`).
    pub fn key(self) -> &'static str {
        match self {
            Source::Compact => "id",
            Source::Stack => "s.compact_id",
            Source::History => "h.id",
        }
    }

    /// The event id (`EventStatus::id`) of a row.
    pub fn event_id(self) -> &'static str {
        match self {
            Source::Compact => "id",
            Source::Stack => "s.compact_id",
            Source::History => "h.compact_id",
        }
    }
}

/// A `WHERE` clause and its values in placeholder order.
#[derive(Debug, Clone, PartialEq)]
pub struct Where {
    /// ` WHERE ...`, or empty when nothing is to be checked.
    pub sql: String,
    pub binds: Vec<Bind>,
}

struct Conds {
    dialect: Dialect,
    parts: Vec<String>,
    binds: Vec<Bind>,
}

impl Conds {
    /// Adds `sql` with its `{}` replaced by the next placeholder, bound to `value`.
    fn bind(&mut self, sql: &str, value: Bind) {
        let n = self.binds.len() + 1;
        let ph = match self.dialect {
            Dialect::Postgres => format!("${n}"),
            Dialect::Sqlite => format!("?{n}"),
        };
        self.parts.push(sql.replace("{}", &ph));
        self.binds.push(value);
    }

    fn raw(&mut self, sql: &str) {
        self.parts.push(sql.to_string());
    }
}

/// The `WHERE` of `query` on `source`: the state, the filters, the cursor (`before`,
/// exclusive) and the scan floor (`floor`, inclusive: history ids below it are not
/// examined). None when `source` holds no event that could match (queued events have
/// no error; the compact stack holds only queued events). `for_ids`: rows without an
/// event id are left out (bulk actions name events by that id).
pub fn event_where(
    query: &EventQuery,
    source: Source,
    dialect: Dialect,
    before: Option<i64>,
    floor: Option<i64>,
    for_ids: bool,
) -> Option<Where> {
    if !Source::of(query.state).contains(&source) {
        return None;
    }
    let mut c = Conds {
        dialect,
        parts: Vec::new(),
        binds: Vec::new(),
    };
    let (prefix, time_col, error_col) = match source {
        Source::Compact => ("", "created_at", None),
        Source::Stack => ("s.", "s.enqueued_at", Some("s.last_error")),
        Source::History => ("h.", "h.finished_at", Some("h.error")),
    };
    // The state, as literals, so that a partial index can serve it.
    match (source, query.state) {
        (Source::Stack, EventState::Queued) => {
            c.raw("s.state = 'ready'");
            c.raw("s.try_count = 0");
        }
        (Source::Stack, EventState::Retrying) => {
            c.raw("s.state = 'ready'");
            c.raw("s.try_count > 0");
        }
        (Source::Stack, EventState::Running) => c.raw("s.state = 'running'"),
        (Source::History, EventState::Failed) => c.raw("h.outcome = 'failed'"),
        (Source::History, EventState::Done) => c.raw("h.outcome = 'done'"),
        (Source::History, EventState::Superseded) => c.raw("h.outcome = 'superseded'"),
        _ => {}
    }
    if source == Source::Stack {
        c.raw("s.compact_id IS NOT NULL");
    }
    if for_ids && source == Source::History {
        c.raw("h.compact_id IS NOT NULL");
    }
    if let Some(b) = before {
        c.bind(&format!("{} < {{}}", source.key()), Bind::Int(b));
    }
    if let Some(f) = floor {
        c.bind(&format!("{} >= {{}}", source.key()), Bind::Int(f));
    }
    if let Some(nas) = query.nas_id {
        if source == Source::Compact {
            // Not expanded yet: only an event that names the NAS's ip belongs to it.
            c.bind(
                "nas_ip = (SELECT ip FROM nas WHERE id = {})",
                Bind::Int(nas),
            );
        } else {
            c.bind(&format!("{prefix}nas_id = {{}}"), Bind::Int(nas));
        }
    }
    if let Some(cmd) = &query.cmd {
        c.bind(&format!("{prefix}cmd = {{}}"), Bind::Text(cmd.clone()));
    }
    if let Some(user) = query.user_id {
        c.bind(&format!("{prefix}user_id = {{}}"), Bind::Int(user));
    }
    if let Some(since) = query.since {
        c.bind(&format!("{time_col} >= {{}}"), Bind::Time(since));
    }
    if let Some(until) = query.until {
        c.bind(&format!("{time_col} < {{}}"), Bind::Time(until));
    }
    if let Some(text) = query.error_like.as_deref().filter(|t| !t.is_empty()) {
        let col = error_col?;
        c.bind(
            &format!("lower({col}) LIKE {{}} ESCAPE '\\'"),
            Bind::Text(like_pattern(text)),
        );
    }
    Some(Where {
        sql: if c.parts.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", c.parts.join(" AND "))
        },
        binds: c.binds,
    })
}

/// How far the finish times of history may run out of id order (clocks of several
/// daemons): a time range is turned into an id range this much wider.
pub const TIME_SLACK_SECONDS: i64 = 3600;

/// The history ids a page of `query` looks at: below `before`, from `floor` up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HistoryBounds {
    pub before: Option<i64>,
    pub floor: Option<i64>,
    /// The floor set by the scan cap: a page that does not fill says `scanned_capped`
    /// and goes on from here.
    pub window: Option<i64>,
    /// Nothing can match: the table is empty, or no row finished in the time range.
    pub empty: bool,
}

/// The id range of a history page. `ids`: the table's lowest and highest id;
/// `since_id`: when `since` is set, the id of the first row (in finish order) finished
/// at or after `since` - [`TIME_SLACK_SECONDS`], None when there is none; `until_id`:
/// when `until` is set, the id of the last row finished before `until` + the slack.
/// History ids follow finish order (up to the slack), so a time range becomes an id
/// range the primary key or a partial index walks, the times still checked exactly.
///
/// A filter whose rows may be rare and that has no index of its own (an error text; a
/// NAS or a command, indexed without the outcome) examines at most [`SCAN_CAP`] ids
/// below the cursor; an account's events (indexed by user) are not capped.
pub fn history_bounds(
    query: &EventQuery,
    ids: (Option<i64>, Option<i64>),
    since_id: Option<i64>,
    until_id: Option<i64>,
) -> HistoryBounds {
    let empty = HistoryBounds {
        empty: true,
        ..HistoryBounds::default()
    };
    let (Some(min_id), Some(max_id)) = ids else {
        return empty;
    };
    if (query.since.is_some() && since_id.is_none())
        || (query.until.is_some() && until_id.is_none())
    {
        return empty;
    }
    let mut before = query.before_id;
    if let (Some(_), Some(last)) = (query.until, until_id) {
        let top = last.saturating_add(1);
        before = Some(before.map_or(top, |b| b.min(top)));
    }
    let time_floor = query.since.and(since_id);
    let risky = query.error_like.as_deref().is_some_and(|t| !t.is_empty())
        || query.nas_id.is_some()
        || query.cmd.is_some();
    let window = if risky && query.user_id.is_none() {
        let top = before
            .unwrap_or(max_id.saturating_add(1))
            .min(max_id.saturating_add(1));
        let floor = top.saturating_sub(SCAN_CAP);
        (floor > time_floor.unwrap_or(min_id).max(min_id)).then_some(floor)
    } else {
        None
    };
    HistoryBounds {
        before,
        floor: window.or(time_floor),
        window,
        empty: false,
    }
}

/// The page from rows fetched newest first from each source (each up to `limit + 1`,
/// with their keys): merged by key, cut at `limit`.
pub fn assemble_page(
    mut rows: Vec<(i64, EventStatus)>,
    limit: i64,
    floor: Option<i64>,
) -> EventPage {
    rows.sort_by_key(|(key, _)| std::cmp::Reverse(*key));
    let limit = limit.clamp(1, MAX_PAGE) as usize;
    let more = rows.len() > limit;
    rows.truncate(limit);
    let next_before = if more {
        rows.last().map(|(key, _)| *key)
    } else {
        floor
    };
    EventPage {
        events: rows.into_iter().map(|(_, e)| e).collect(),
        next_before,
        scanned_capped: !more && floor.is_some(),
    }
}

/// Where an event named by its id was found (looked for in the order events move, the
/// earliest place winning, as `event_status` does).
#[derive(Debug, Clone, PartialEq)]
pub enum Found {
    Compact,
    /// In the main stack, with its state (`queued`, `retrying`, `running`).
    Stack(String),
    /// In history: its outcome and what a retry copies.
    History {
        outcome: String,
        nas_id: Option<i64>,
        /// The ip of its NAS now (None: no NAS, or the NAS was removed).
        nas_ip: Option<String>,
        event: CompactEvent,
    },
}

impl Found {
    fn state(&self) -> &str {
        match self {
            Found::Compact => "queued",
            Found::Stack(state) => state,
            Found::History { outcome, .. } => outcome,
        }
    }
}

/// The state of a main-stack row as the console names it.
pub fn stack_state(state: &str, try_count: i32) -> &'static str {
    if state == "running" {
        "running"
    } else if try_count > 0 {
        "retrying"
    } else {
        "queued"
    }
}

/// `ids` without repeats, in their first order.
pub fn dedup_ids(ids: &[i64]) -> Vec<i64> {
    let mut seen = HashSet::with_capacity(ids.len());
    ids.iter().copied().filter(|id| seen.insert(*id)).collect()
}

/// What a retry does with each id, as `Store::retry_event` decides for one: the copies
/// to enqueue (id, event) and the ids skipped with the reason.
#[allow(clippy::type_complexity)]
pub fn plan_retry(
    ids: &[i64],
    found: &HashMap<i64, Found>,
) -> (Vec<(i64, CompactEvent)>, Vec<(i64, String)>) {
    let mut copies = Vec::new();
    let mut skipped = Vec::new();
    for &id in ids {
        match found.get(&id) {
            None => skipped.push((id, "does not exist".to_string())),
            Some(Found::History {
                outcome,
                nas_id,
                nas_ip,
                event,
            }) if outcome == "failed" => match (nas_id, nas_ip) {
                (Some(nas), None) => {
                    skipped.push((id, format!("was for nas {nas}, which no longer exists")))
                }
                _ => copies.push((
                    id,
                    CompactEvent {
                        nas_ip: nas_ip.clone(),
                        ..event.clone()
                    },
                )),
            },
            Some(f) => skipped.push((
                id,
                format!("is {}: only failed events can be retried", f.state()),
            )),
        }
    }
    (copies, skipped)
}

/// Why a cancel left `id` alone (it was not queued or retrying when the cancel ran).
pub fn cancel_skip_reason(found: Option<&Found>) -> String {
    match found {
        None => "does not exist".to_string(),
        Some(f) => format!(
            "is {}: only queued or retrying events can be cancelled",
            f.state()
        ),
    }
}

/// An `accounts` row as the search reads it.
type AccountTuple = (
    i64,
    i64,
    i64,
    Option<String>,
    Option<String>,
    Option<String>,
);
/// A `nasd_audit` row as read, with the time as the backend stores it.
type AuditTuple<T> = (i64, T, String, String, String, String, i64);

fn from_ms(v: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(v).single().unwrap_or_default()
}

/// Counts the call and runs `$body` on the backend.
macro_rules! on_store {
    ($self:expr, $s:ident => $body:expr) => {
        match $self {
            Store::Postgres($s) => {
                $s.calls.count();
                $body
            }
            Store::Sqlite($s) => {
                $s.calls.count();
                $body
            }
        }
    };
}

impl Store {
    /// A page of events of one state matching the filters, newest first (see the module
    /// documentation for the cursor and the scan cap).
    pub async fn events_list(&self, query: &EventQuery) -> Result<EventPage, StoreError> {
        on_store!(self, s => s.console_events_list(query).await)
    }

    /// The event ids (`EventStatus::id`) of every event matching `query` (its cursor and
    /// limit ignored), newest first, at most `cap`. Events without an event id (none
    /// that nasd writes) are left out.
    pub async fn events_match_ids(
        &self,
        query: &EventQuery,
        cap: i64,
    ) -> Result<Vec<i64>, StoreError> {
        if cap <= 0 {
            return Ok(Vec::new());
        }
        on_store!(self, s => s.console_match_ids(query, cap).await)
    }

    /// `retry_event` for many ids: each failed event gets a copy in the compact stack
    /// (a new event id); others are skipped with the reason. One transaction per
    /// [`BULK_CHUNK`] ids.
    pub async fn bulk_retry(&self, ids: &[i64]) -> Result<BulkOutcome, StoreError> {
        let ids = dedup_ids(ids);
        let mut out = BulkOutcome::default();
        for chunk in ids.chunks(BULK_CHUNK) {
            let part = on_store!(self, s => s.console_retry_chunk(chunk).await)?;
            out.done.extend(part.done);
            out.skipped.extend(part.skipped);
        }
        Ok(out)
    }

    /// `cancel_event` for many ids: each queued or retrying event that is not claimed
    /// moves to history as failed with [`super::CANCELLED`]; running and finished ones
    /// are skipped with the reason. One transaction per [`BULK_CHUNK`] ids.
    pub async fn bulk_cancel(&self, ids: &[i64]) -> Result<BulkOutcome, StoreError> {
        let ids = dedup_ids(ids);
        let mut out = BulkOutcome::default();
        let now = Utc::now();
        for chunk in ids.chunks(BULK_CHUNK) {
            let part = on_store!(self, s => s.console_cancel_chunk(chunk, now).await)?;
            out.done.extend(part.done);
            out.skipped.extend(part.skipped);
        }
        Ok(out)
    }

    /// Accounts matching a search text (see [`classify_search`]): digits are a user id
    /// or an abonent id, an IP address the account's ip, a MAC address (any notation)
    /// the account's MAC, anything else a login, exact or prefix, case-insensitive
    /// (the exact one first).
    pub async fn account_search(
        &self,
        text: &str,
        limit: i64,
    ) -> Result<Vec<AccountHit>, StoreError> {
        let Some(kind) = classify_search(text) else {
            return Ok(Vec::new());
        };
        let limit = limit.clamp(1, MAX_PAGE);
        on_store!(self, s => s.console_account_search(&kind, limit).await)
    }

    /// An account's events, newest first: queued, running and finished, at most `limit`.
    pub async fn account_timeline(
        &self,
        user_id: i64,
        limit: i64,
    ) -> Result<Vec<EventStatus>, StoreError> {
        let limit = limit.clamp(1, MAX_PAGE);
        let mut all = self.account_events(user_id, limit).await?;
        all.truncate(limit as usize);
        Ok(all)
    }

    /// Records an operator action; returns its id.
    pub async fn audit_insert(&self, entry: &AuditEntry) -> Result<i64, StoreError> {
        on_store!(self, s => s.console_audit_insert(entry).await)
    }

    /// Audit rows with an id below `before_id` (all when None), newest first.
    pub async fn audit_list(
        &self,
        before_id: Option<i64>,
        limit: i64,
    ) -> Result<Vec<AuditRow>, StoreError> {
        let limit = limit.clamp(1, MAX_PAGE);
        on_store!(self, s => s.console_audit_list(before_id, limit).await)
    }

    /// Pauses or resumes a NAS; false when there is no such NAS.
    pub async fn nas_set_paused(&self, id: i64, paused: bool) -> Result<bool, StoreError> {
        on_store!(self, s => s.console_nas_set_paused(id, paused).await)
    }
}

/// The PostgreSQL side. Every call runs in the `Session` of `PgStore::open` and every
/// statement says `.persistent(self.persistent)` (pooled mode), as in `postgres.rs`;
/// a transaction is begun on the session's connection (a savepoint in pooled mode).
mod pg {
    use std::collections::HashMap;

    use chrono::{DateTime, Utc};
    use sqlx::postgres::{PgArguments, PgRow};
    use sqlx::query::Query;
    use sqlx::{Connection, PgConnection, Postgres, Row};

    use super::super::postgres::{
        COMPACT_COLUMNS, HISTORY_COLUMNS, PgStore, STACK_COLUMNS, compact_from_row, history_status,
        stack_from_row,
    };
    use super::super::{CANCELLED, CompactEvent, EventStatus, SqlContext, StoreError};
    use super::{
        AccountHit, AuditEntry, AuditRow, Bind, BulkOutcome, Dialect, EventPage, EventQuery, Found,
        HistoryBounds, MAC_EXPR, SearchKind, Source, assemble_page, cancel_skip_reason,
        event_where, history_bounds, login_range, plan_retry, stack_state,
    };

    fn bind_all<'q>(
        mut q: Query<'q, Postgres, PgArguments>,
        binds: &'q [Bind],
    ) -> Query<'q, Postgres, PgArguments> {
        for b in binds {
            q = match b {
                Bind::Int(i) => q.bind(*i),
                Bind::Text(t) => q.bind(t.as_str()),
                Bind::Time(t) => q.bind(*t),
            };
        }
        q
    }

    fn select(source: Source) -> String {
        match source {
            Source::Compact => format!("SELECT {COMPACT_COLUMNS} FROM events_stack_compact"),
            Source::Stack => format!(
                "SELECT {STACK_COLUMNS} FROM events_stack s LEFT JOIN nas n ON n.id = s.nas_id"
            ),
            Source::History => format!(
                "SELECT h.id AS hid, {HISTORY_COLUMNS} FROM events_history h \
                 LEFT JOIN nas n ON n.id = h.nas_id"
            ),
        }
    }

    fn status(source: Source, r: &PgRow) -> Result<(i64, EventStatus), sqlx::Error> {
        Ok(match source {
            Source::Compact => {
                let row = compact_from_row(r)?;
                (row.id, EventStatus::from_compact(&row))
            }
            Source::Stack => {
                let e = stack_from_row(r)?;
                let ip: Option<String> = r.try_get("nas_ip")?;
                (
                    e.compact_id.unwrap_or_default(),
                    EventStatus::from_stack(&e, ip),
                )
            }
            Source::History => (r.try_get("hid")?, history_status(r)?),
        })
    }

    fn table(source: Source) -> &'static str {
        match source {
            Source::Compact => "events_stack_compact",
            Source::Stack => "events_stack s",
            Source::History => "events_history h",
        }
    }

    impl PgStore {
        pub(in crate::store) async fn console_events_list(
            &self,
            query: &EventQuery,
        ) -> Result<EventPage, StoreError> {
            const WHAT: &str = "list events";
            let limit = query.limit.clamp(1, super::MAX_PAGE);
            let mut db = self.open().await.ctx(WHAT)?;
            let bounds = if query.state.in_history() {
                let ids: (Option<i64>, Option<i64>) = sqlx::query_as(
                    "SELECT (SELECT min(id) FROM events_history), (SELECT max(id) FROM events_history)",
                )
                .persistent(self.persistent)
                .fetch_one(db.exec())
                .await
                .ctx("list events: history bounds")?;
                let slack = chrono::Duration::seconds(super::TIME_SLACK_SECONDS);
                let mut since_id = None;
                if let Some(since) = query.since {
                    since_id = sqlx::query_scalar(
                        "SELECT id FROM events_history WHERE finished_at >= $1 \
                         ORDER BY finished_at LIMIT 1",
                    )
                    .persistent(self.persistent)
                    .bind(since - slack)
                    .fetch_optional(db.exec())
                    .await
                    .ctx("list events: history time range")?;
                }
                let mut until_id = None;
                if let Some(until) = query.until {
                    until_id = sqlx::query_scalar(
                        "SELECT id FROM events_history WHERE finished_at < $1 \
                         ORDER BY finished_at DESC LIMIT 1",
                    )
                    .persistent(self.persistent)
                    .bind(until + slack)
                    .fetch_optional(db.exec())
                    .await
                    .ctx("list events: history time range")?;
                }
                history_bounds(query, ids, since_id, until_id)
            } else {
                HistoryBounds {
                    before: query.before_id,
                    ..HistoryBounds::default()
                }
            };
            if bounds.empty {
                db.done().await.ctx(WHAT)?;
                return Ok(assemble_page(Vec::new(), limit, None));
            }
            let mut rows = Vec::new();
            for &source in Source::of(query.state) {
                let Some(w) = event_where(
                    query,
                    source,
                    Dialect::Postgres,
                    bounds.before,
                    bounds.floor,
                    false,
                ) else {
                    continue;
                };
                let sql = format!(
                    "{}{} ORDER BY {} DESC LIMIT {}",
                    select(source),
                    w.sql,
                    source.key(),
                    limit + 1
                );
                let found = bind_all(sqlx::query(&sql).persistent(self.persistent), &w.binds)
                    .fetch_all(db.exec())
                    .await
                    .ctx(WHAT)?;
                for r in &found {
                    rows.push(status(source, r).ctx(WHAT)?);
                }
            }
            db.done().await.ctx(WHAT)?;
            Ok(assemble_page(rows, limit, bounds.window))
        }

        pub(in crate::store) async fn console_match_ids(
            &self,
            query: &EventQuery,
            cap: i64,
        ) -> Result<Vec<i64>, StoreError> {
            const WHAT: &str = "match events";
            let mut db = self.open().await.ctx(WHAT)?;
            let mut ids = Vec::new();
            for &source in Source::of(query.state) {
                let Some(w) = event_where(query, source, Dialect::Postgres, None, None, true)
                else {
                    continue;
                };
                let sql = format!(
                    "SELECT {} FROM {}{} ORDER BY {} DESC LIMIT {cap}",
                    source.event_id(),
                    table(source),
                    w.sql,
                    source.key()
                );
                let found: Vec<i64> = bind_all_scalar(
                    sqlx::query_scalar(&sql).persistent(self.persistent),
                    &w.binds,
                )
                .fetch_all(db.exec())
                .await
                .ctx(WHAT)?;
                ids.extend(found);
            }
            db.done().await.ctx(WHAT)?;
            ids.sort_unstable_by(|a, b| b.cmp(a));
            ids.dedup();
            ids.truncate(cap as usize);
            Ok(ids)
        }

        pub(in crate::store) async fn console_retry_chunk(
            &self,
            ids: &[i64],
        ) -> Result<BulkOutcome, StoreError> {
            const WHAT: &str = "bulk retry";
            let mut db = self.open().await.ctx(WHAT)?;
            let mut tx = db.exec().begin().await.ctx(WHAT)?;
            let found = self.lookup(&mut tx, ids).await?;
            let (copies, skipped) = plan_retry(ids, &found);
            let mut done = Vec::with_capacity(copies.len());
            if !copies.is_empty() {
                let events: Vec<&CompactEvent> = copies.iter().map(|(_, e)| e).collect();
                let new_ids: Vec<i64> = sqlx::query_scalar(
                    "INSERT INTO events_stack_compact (cmd, user_id, abonent_id, nas_ip, usluga_id, acct_session_id) \
                     SELECT cmd, user_id, abonent_id, nas_ip, usluga_id, acct_session_id FROM \
                     unnest($1::text[], $2::bigint[], $3::bigint[], $4::text[], $5::bigint[], $6::text[]) \
                     WITH ORDINALITY AS t(cmd, user_id, abonent_id, nas_ip, usluga_id, acct_session_id, ord) \
                     ORDER BY ord RETURNING id",
                )
                .persistent(self.persistent)
                .bind(events.iter().map(|e| e.cmd.as_str()).collect::<Vec<_>>())
                .bind(events.iter().map(|e| e.user_id).collect::<Vec<_>>())
                .bind(events.iter().map(|e| e.abonent_id).collect::<Vec<_>>())
                .bind(events.iter().map(|e| e.nas_ip.as_deref()).collect::<Vec<_>>())
                .bind(events.iter().map(|e| e.usluga_id).collect::<Vec<_>>())
                .bind(
                    events
                        .iter()
                        .map(|e| e.acct_session_id.as_deref())
                        .collect::<Vec<_>>(),
                )
                .fetch_all(&mut *tx)
                .await
                .ctx("bulk retry: enqueue the copies")?;
                // The ids come back in insertion order (ordinality, one statement).
                done.extend(
                    copies
                        .iter()
                        .zip(new_ids)
                        .map(|((id, _), new)| (*id, Some(new))),
                );
            }
            tx.commit().await.ctx("bulk retry: commit")?;
            db.done().await.ctx(WHAT)?;
            Ok(BulkOutcome { done, skipped })
        }

        pub(in crate::store) async fn console_cancel_chunk(
            &self,
            ids: &[i64],
            now: DateTime<Utc>,
        ) -> Result<BulkOutcome, StoreError> {
            const WHAT: &str = "bulk cancel";
            let mut db = self.open().await.ctx(WHAT)?;
            let mut tx = db.exec().begin().await.ctx(WHAT)?;
            let mut moved: Vec<i64> = sqlx::query_scalar(
                "WITH moved AS (DELETE FROM events_stack_compact WHERE id = ANY($1) RETURNING *) \
                 INSERT INTO events_history (compact_id, enqueued_at, cmd, user_id, abonent_id, \
                 usluga_id, acct_session_id, outcome, attempts, error, finished_at) \
                 SELECT id, created_at, cmd, user_id, abonent_id, usluga_id, acct_session_id, \
                 'failed', 0, $2, $3 FROM moved ORDER BY id RETURNING compact_id",
            )
            .persistent(self.persistent)
            .bind(ids)
            .bind(CANCELLED)
            .bind(now)
            .fetch_all(&mut *tx)
            .await
            .ctx("bulk cancel: compact stack")?;
            let rest: Vec<i64> = ids
                .iter()
                .copied()
                .filter(|id| !moved.contains(id))
                .collect();
            if !rest.is_empty() {
                let from_stack: Vec<i64> = sqlx::query_scalar(
                    "WITH moved AS (DELETE FROM events_stack WHERE compact_id = ANY($1) \
                     AND state = 'ready' RETURNING *) \
                     INSERT INTO events_history (event_id, compact_id, event_date, enqueued_at, cmd, \
                     user_id, abonent_id, nas_id, usluga_id, acct_session_id, params, outcome, attempts, \
                     commands, answer, error, duration_ms, finished_at) \
                     SELECT id, compact_id, event_date, enqueued_at, cmd, user_id, abonent_id, nas_id, \
                     usluga_id, acct_session_id, params, 'failed', try_count, '[]', '', \
                     $2 || coalesce(' (last error: ' || last_error || ')', ''), 0, $3 FROM moved \
                     ORDER BY id RETURNING compact_id",
                )
                .persistent(self.persistent)
                .bind(&rest)
                .bind(CANCELLED)
                .bind(now)
                .fetch_all(&mut *tx)
                .await
                .ctx("bulk cancel: stack")?;
                moved.extend(from_stack);
            }
            let left: Vec<i64> = ids
                .iter()
                .copied()
                .filter(|id| !moved.contains(id))
                .collect();
            let found = if left.is_empty() {
                HashMap::new()
            } else {
                self.lookup(&mut tx, &left).await?
            };
            tx.commit().await.ctx("bulk cancel: commit")?;
            db.done().await.ctx(WHAT)?;
            Ok(BulkOutcome {
                done: ids
                    .iter()
                    .filter(|id| moved.contains(id))
                    .map(|id| (*id, None))
                    .collect(),
                skipped: left
                    .iter()
                    .map(|id| (*id, cancel_skip_reason(found.get(id))))
                    .collect(),
            })
        }

        /// Where each of `ids` is (history, then the stack, then the compact stack
        /// overriding: the earliest place an event can be wins, as in `event_status`).
        async fn lookup(
            &self,
            conn: &mut PgConnection,
            ids: &[i64],
        ) -> Result<HashMap<i64, Found>, StoreError> {
            let mut found = HashMap::with_capacity(ids.len());
            let history = sqlx::query(
                "SELECT h.compact_id, h.outcome, h.nas_id, n.ip AS nas_ip, h.cmd, h.user_id, \
                 h.abonent_id, h.usluga_id, h.acct_session_id FROM events_history h \
                 LEFT JOIN nas n ON n.id = h.nas_id WHERE h.compact_id = ANY($1) ORDER BY h.id",
            )
            .persistent(self.persistent)
            .bind(ids)
            .fetch_all(&mut *conn)
            .await
            .ctx("look up events: history")?;
            for r in &history {
                let row = || -> Result<(i64, Found), sqlx::Error> {
                    Ok((
                        r.try_get("compact_id")?,
                        Found::History {
                            outcome: r.try_get("outcome")?,
                            nas_id: r.try_get("nas_id")?,
                            nas_ip: r.try_get("nas_ip")?,
                            event: CompactEvent {
                                cmd: r.try_get("cmd")?,
                                user_id: r.try_get("user_id")?,
                                abonent_id: r.try_get("abonent_id")?,
                                nas_ip: None,
                                usluga_id: r.try_get("usluga_id")?,
                                acct_session_id: r.try_get("acct_session_id")?,
                            },
                        },
                    ))
                };
                let (id, f) = row().ctx("look up events: history")?;
                found.insert(id, f);
            }
            let stack: Vec<(i64, String, i32)> = sqlx::query_as(
                "SELECT compact_id, state, try_count FROM events_stack \
                 WHERE compact_id = ANY($1) ORDER BY id",
            )
            .persistent(self.persistent)
            .bind(ids)
            .fetch_all(&mut *conn)
            .await
            .ctx("look up events: stack")?;
            for (id, state, tries) in stack {
                found.insert(id, Found::Stack(stack_state(&state, tries).to_string()));
            }
            let compact: Vec<i64> =
                sqlx::query_scalar("SELECT id FROM events_stack_compact WHERE id = ANY($1)")
                    .persistent(self.persistent)
                    .bind(ids)
                    .fetch_all(&mut *conn)
                    .await
                    .ctx("look up events: compact stack")?;
            for id in compact {
                found.insert(id, Found::Compact);
            }
            Ok(found)
        }

        pub(in crate::store) async fn console_account_search(
            &self,
            kind: &SearchKind,
            limit: i64,
        ) -> Result<Vec<AccountHit>, StoreError> {
            const WHAT: &str = "search accounts";
            const COLUMNS: &str =
                "SELECT user_id, abonent_id, nas_id, login, ip, mac FROM accounts";
            let (sql, binds) = match kind {
                SearchKind::Id(id) => (
                    format!(
                        "{COLUMNS} WHERE user_id = $1 OR abonent_id = $1 ORDER BY user_id LIMIT {limit}"
                    ),
                    vec![Bind::Int(*id)],
                ),
                SearchKind::Ip(typed, canonical) => (
                    format!("{COLUMNS} WHERE ip = $1 OR ip = $2 ORDER BY user_id LIMIT {limit}"),
                    vec![Bind::Text(typed.clone()), Bind::Text(canonical.clone())],
                ),
                SearchKind::Mac(mac) => (
                    format!("{COLUMNS} WHERE {MAC_EXPR} = $1 ORDER BY user_id LIMIT {limit}"),
                    vec![Bind::Text(mac.clone())],
                ),
                SearchKind::Login(prefix) => {
                    let (low, high) = login_range(prefix);
                    (
                        format!(
                            "{COLUMNS} WHERE lower(login) COLLATE \"C\" >= $1 \
                             AND lower(login) COLLATE \"C\" < $2 \
                             ORDER BY lower(login) COLLATE \"C\", user_id LIMIT {limit}"
                        ),
                        vec![Bind::Text(low), Bind::Text(high)],
                    )
                }
            };
            let mut db = self.open().await.ctx(WHAT)?;
            let rows: Vec<super::AccountTuple> =
                bind_all_as(sqlx::query_as(&sql).persistent(self.persistent), &binds)
                    .fetch_all(db.exec())
                    .await
                    .ctx(WHAT)?;
            db.done().await.ctx(WHAT)?;
            Ok(rows
                .into_iter()
                .map(|(user_id, abonent_id, nas_id, login, ip, mac)| AccountHit {
                    user_id,
                    abonent_id,
                    nas_id,
                    login,
                    ip,
                    mac,
                })
                .collect())
        }

        pub(in crate::store) async fn console_audit_insert(
            &self,
            entry: &AuditEntry,
        ) -> Result<i64, StoreError> {
            const WHAT: &str = "record an operator action";
            let mut db = self.open().await.ctx(WHAT)?;
            let id: i64 = sqlx::query_scalar(
                "INSERT INTO nasd_audit (who, action, target, detail, count) \
                 VALUES ($1, $2, $3, $4, $5) RETURNING id",
            )
            .persistent(self.persistent)
            .bind(&entry.who)
            .bind(&entry.action)
            .bind(&entry.target)
            .bind(&entry.detail)
            .bind(entry.count)
            .fetch_one(db.exec())
            .await
            .ctx(WHAT)?;
            db.done().await.ctx(WHAT)?;
            Ok(id)
        }

        pub(in crate::store) async fn console_audit_list(
            &self,
            before_id: Option<i64>,
            limit: i64,
        ) -> Result<Vec<AuditRow>, StoreError> {
            const WHAT: &str = "read the audit log";
            let sql = format!(
                "SELECT id, at, who, action, target, detail, count FROM nasd_audit{} \
                 ORDER BY id DESC LIMIT {limit}",
                if before_id.is_some() {
                    " WHERE id < $1"
                } else {
                    ""
                }
            );
            let mut db = self.open().await.ctx(WHAT)?;
            let mut q = sqlx::query_as(&sql).persistent(self.persistent);
            if let Some(b) = before_id {
                q = q.bind(b);
            }
            let rows: Vec<super::AuditTuple<DateTime<Utc>>> =
                q.fetch_all(db.exec()).await.ctx(WHAT)?;
            db.done().await.ctx(WHAT)?;
            Ok(rows
                .into_iter()
                .map(|(id, at, who, action, target, detail, count)| AuditRow {
                    id,
                    at,
                    who,
                    action,
                    target,
                    detail,
                    count,
                })
                .collect())
        }

        pub(in crate::store) async fn console_nas_set_paused(
            &self,
            id: i64,
            paused: bool,
        ) -> Result<bool, StoreError> {
            const WHAT: &str = "pause nas";
            let mut db = self.open().await.ctx(WHAT)?;
            let done = sqlx::query(
                "UPDATE nas SET paused = $2, updated_at = clock_timestamp() WHERE id = $1",
            )
            .persistent(self.persistent)
            .bind(id)
            .bind(paused)
            .execute(db.exec())
            .await
            .ctx(WHAT)?;
            db.done().await.ctx(WHAT)?;
            Ok(done.rows_affected() > 0)
        }
    }

    fn bind_all_scalar<'q, O>(
        mut q: sqlx::query::QueryScalar<'q, Postgres, O, PgArguments>,
        binds: &'q [Bind],
    ) -> sqlx::query::QueryScalar<'q, Postgres, O, PgArguments> {
        for b in binds {
            q = match b {
                Bind::Int(i) => q.bind(*i),
                Bind::Text(t) => q.bind(t.as_str()),
                Bind::Time(t) => q.bind(*t),
            };
        }
        q
    }

    fn bind_all_as<'q, O>(
        mut q: sqlx::query::QueryAs<'q, Postgres, O, PgArguments>,
        binds: &'q [Bind],
    ) -> sqlx::query::QueryAs<'q, Postgres, O, PgArguments> {
        for b in binds {
            q = match b {
                Bind::Int(i) => q.bind(*i),
                Bind::Text(t) => q.bind(t.as_str()),
                Bind::Time(t) => q.bind(*t),
            };
        }
        q
    }
}

/// The SQLite side: one connection; a bulk chunk is one `BEGIN IMMEDIATE` transaction;
/// a list of ids is bound as one JSON array (`json_each`).
mod lite {
    use std::collections::HashMap;

    use chrono::{DateTime, Utc};
    use sqlx::query::{Query, QueryAs, QueryScalar};
    use sqlx::sqlite::{SqliteArguments, SqliteRow};
    use sqlx::{Row, Sqlite, SqliteConnection};

    use super::super::sqlite::{
        COMPACT_COLUMNS, HISTORY_COLUMNS, STACK_COLUMNS, SqliteStore, compact_from_row,
        history_status, stack_from_row,
    };
    use super::super::{CANCELLED, CompactEvent, EventStatus, SqlContext, StoreError};
    use super::{
        AccountHit, AuditEntry, AuditRow, Bind, BulkOutcome, Dialect, EventPage, EventQuery, Found,
        HistoryBounds, MAC_EXPR, SearchKind, Source, assemble_page, cancel_skip_reason,
        event_where, from_ms, history_bounds, login_range, plan_retry, stack_state,
    };

    macro_rules! bind_each {
        ($q:expr, $binds:expr) => {{
            let mut q = $q;
            for b in $binds {
                q = match b {
                    Bind::Int(i) => q.bind(*i),
                    Bind::Text(t) => q.bind(t.clone()),
                    Bind::Time(t) => q.bind(t.timestamp_millis()),
                };
            }
            q
        }};
    }

    fn bind_all<'q>(
        q: Query<'q, Sqlite, SqliteArguments<'q>>,
        binds: &[Bind],
    ) -> Query<'q, Sqlite, SqliteArguments<'q>> {
        bind_each!(q, binds)
    }

    fn bind_all_scalar<'q, O>(
        q: QueryScalar<'q, Sqlite, O, SqliteArguments<'q>>,
        binds: &[Bind],
    ) -> QueryScalar<'q, Sqlite, O, SqliteArguments<'q>> {
        bind_each!(q, binds)
    }

    fn bind_all_as<'q, O>(
        q: QueryAs<'q, Sqlite, O, SqliteArguments<'q>>,
        binds: &[Bind],
    ) -> QueryAs<'q, Sqlite, O, SqliteArguments<'q>> {
        bind_each!(q, binds)
    }

    /// A list of ids as the JSON array `json_each` reads.
    fn json_ids(ids: &[i64]) -> String {
        serde_json::Value::from(ids.to_vec()).to_string()
    }

    fn select(source: Source) -> String {
        match source {
            Source::Compact => format!("SELECT {COMPACT_COLUMNS} FROM events_stack_compact"),
            Source::Stack => format!(
                "SELECT {STACK_COLUMNS} FROM events_stack s LEFT JOIN nas n ON n.id = s.nas_id"
            ),
            Source::History => format!(
                "SELECT h.id AS hid, {HISTORY_COLUMNS} FROM events_history h \
                 LEFT JOIN nas n ON n.id = h.nas_id"
            ),
        }
    }

    fn status(source: Source, r: &SqliteRow) -> Result<(i64, EventStatus), sqlx::Error> {
        Ok(match source {
            Source::Compact => {
                let row = compact_from_row(r)?;
                (row.id, EventStatus::from_compact(&row))
            }
            Source::Stack => {
                let e = stack_from_row(r)?;
                let ip: Option<String> = r.try_get("nas_ip")?;
                (
                    e.compact_id.unwrap_or_default(),
                    EventStatus::from_stack(&e, ip),
                )
            }
            Source::History => (r.try_get("hid")?, history_status(r)?),
        })
    }

    fn table(source: Source) -> &'static str {
        match source {
            Source::Compact => "events_stack_compact",
            Source::Stack => "events_stack s",
            Source::History => "events_history h",
        }
    }

    impl SqliteStore {
        pub(in crate::store) async fn console_events_list(
            &self,
            query: &EventQuery,
        ) -> Result<EventPage, StoreError> {
            const WHAT: &str = "list events";
            let limit = query.limit.clamp(1, super::MAX_PAGE);
            let mut conn = self.pool().acquire().await.ctx(WHAT)?;
            let bounds = if query.state.in_history() {
                let ids: (Option<i64>, Option<i64>) = sqlx::query_as(
                    "SELECT (SELECT min(id) FROM events_history), (SELECT max(id) FROM events_history)",
                )
                .fetch_one(&mut *conn)
                .await
                .ctx("list events: history bounds")?;
                let slack = super::TIME_SLACK_SECONDS * 1000;
                let mut since_id = None;
                if let Some(since) = query.since {
                    since_id = sqlx::query_scalar(
                        "SELECT id FROM events_history WHERE finished_at >= ?1 \
                         ORDER BY finished_at LIMIT 1",
                    )
                    .bind(since.timestamp_millis() - slack)
                    .fetch_optional(&mut *conn)
                    .await
                    .ctx("list events: history time range")?;
                }
                let mut until_id = None;
                if let Some(until) = query.until {
                    until_id = sqlx::query_scalar(
                        "SELECT id FROM events_history WHERE finished_at < ?1 \
                         ORDER BY finished_at DESC LIMIT 1",
                    )
                    .bind(until.timestamp_millis() + slack)
                    .fetch_optional(&mut *conn)
                    .await
                    .ctx("list events: history time range")?;
                }
                history_bounds(query, ids, since_id, until_id)
            } else {
                HistoryBounds {
                    before: query.before_id,
                    ..HistoryBounds::default()
                }
            };
            if bounds.empty {
                return Ok(assemble_page(Vec::new(), limit, None));
            }
            let mut rows = Vec::new();
            for &source in Source::of(query.state) {
                let Some(w) = event_where(
                    query,
                    source,
                    Dialect::Sqlite,
                    bounds.before,
                    bounds.floor,
                    false,
                ) else {
                    continue;
                };
                let sql = format!(
                    "{}{} ORDER BY {} DESC LIMIT {}",
                    select(source),
                    w.sql,
                    source.key(),
                    limit + 1
                );
                let found = bind_all(sqlx::query(&sql), &w.binds)
                    .fetch_all(&mut *conn)
                    .await
                    .ctx(WHAT)?;
                for r in &found {
                    rows.push(status(source, r).ctx(WHAT)?);
                }
            }
            Ok(assemble_page(rows, limit, bounds.window))
        }

        pub(in crate::store) async fn console_match_ids(
            &self,
            query: &EventQuery,
            cap: i64,
        ) -> Result<Vec<i64>, StoreError> {
            const WHAT: &str = "match events";
            let mut conn = self.pool().acquire().await.ctx(WHAT)?;
            let mut ids = Vec::new();
            for &source in Source::of(query.state) {
                let Some(w) = event_where(query, source, Dialect::Sqlite, None, None, true) else {
                    continue;
                };
                let sql = format!(
                    "SELECT {} FROM {}{} ORDER BY {} DESC LIMIT {cap}",
                    source.event_id(),
                    table(source),
                    w.sql,
                    source.key()
                );
                let found: Vec<i64> = bind_all_scalar(sqlx::query_scalar(&sql), &w.binds)
                    .fetch_all(&mut *conn)
                    .await
                    .ctx(WHAT)?;
                ids.extend(found);
            }
            ids.sort_unstable_by(|a, b| b.cmp(a));
            ids.dedup();
            ids.truncate(cap as usize);
            Ok(ids)
        }

        pub(in crate::store) async fn console_retry_chunk(
            &self,
            ids: &[i64],
        ) -> Result<BulkOutcome, StoreError> {
            const WHAT: &str = "bulk retry";
            let mut tx = self.pool().begin_with("BEGIN IMMEDIATE").await.ctx(WHAT)?;
            let found = lookup(&mut tx, ids).await?;
            let (copies, skipped) = plan_retry(ids, &found);
            let now = Utc::now().timestamp_millis();
            let mut done = Vec::with_capacity(copies.len());
            for (id, e) in &copies {
                let new_id: i64 = sqlx::query_scalar(
                    "INSERT INTO events_stack_compact (cmd, user_id, abonent_id, nas_ip, usluga_id, \
                     acct_session_id, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) RETURNING id",
                )
                .bind(&e.cmd)
                .bind(e.user_id)
                .bind(e.abonent_id)
                .bind(&e.nas_ip)
                .bind(e.usluga_id)
                .bind(&e.acct_session_id)
                .bind(now)
                .fetch_one(&mut *tx)
                .await
                .ctx("bulk retry: enqueue the copies")?;
                done.push((*id, Some(new_id)));
            }
            tx.commit().await.ctx("bulk retry: commit")?;
            Ok(BulkOutcome { done, skipped })
        }

        pub(in crate::store) async fn console_cancel_chunk(
            &self,
            ids: &[i64],
            now: DateTime<Utc>,
        ) -> Result<BulkOutcome, StoreError> {
            const WHAT: &str = "bulk cancel";
            let now = now.timestamp_millis();
            let mut tx = self.pool().begin_with("BEGIN IMMEDIATE").await.ctx(WHAT)?;
            let mut moved: Vec<i64> = sqlx::query_scalar(
                "INSERT INTO events_history (compact_id, enqueued_at, cmd, user_id, abonent_id, \
                 usluga_id, acct_session_id, outcome, attempts, error, finished_at) \
                 SELECT id, created_at, cmd, user_id, abonent_id, usluga_id, acct_session_id, \
                 'failed', 0, ?2, ?3 FROM events_stack_compact \
                 WHERE id IN (SELECT value FROM json_each(?1)) ORDER BY id RETURNING compact_id",
            )
            .bind(json_ids(ids))
            .bind(CANCELLED)
            .bind(now)
            .fetch_all(&mut *tx)
            .await
            .ctx("bulk cancel: compact stack")?;
            if !moved.is_empty() {
                sqlx::query(
                    "DELETE FROM events_stack_compact WHERE id IN (SELECT value FROM json_each(?1))",
                )
                .bind(json_ids(&moved))
                .execute(&mut *tx)
                .await
                .ctx("bulk cancel: compact stack")?;
            }
            let rest: Vec<i64> = ids
                .iter()
                .copied()
                .filter(|id| !moved.contains(id))
                .collect();
            if !rest.is_empty() {
                let from_stack: Vec<i64> = sqlx::query_scalar(
                    "INSERT INTO events_history (event_id, compact_id, event_date, enqueued_at, cmd, \
                     user_id, abonent_id, nas_id, usluga_id, acct_session_id, params, outcome, attempts, \
                     commands, answer, error, duration_ms, finished_at) \
                     SELECT id, compact_id, event_date, enqueued_at, cmd, user_id, abonent_id, nas_id, \
                     usluga_id, acct_session_id, params, 'failed', try_count, '[]', '', \
                     ?2 || coalesce(' (last error: ' || last_error || ')', ''), 0, ?3 \
                     FROM events_stack WHERE compact_id IN (SELECT value FROM json_each(?1)) \
                     AND state = 'ready' ORDER BY id RETURNING compact_id",
                )
                .bind(json_ids(&rest))
                .bind(CANCELLED)
                .bind(now)
                .fetch_all(&mut *tx)
                .await
                .ctx("bulk cancel: stack")?;
                if !from_stack.is_empty() {
                    sqlx::query(
                        "DELETE FROM events_stack WHERE compact_id IN \
                         (SELECT value FROM json_each(?1)) AND state = 'ready'",
                    )
                    .bind(json_ids(&from_stack))
                    .execute(&mut *tx)
                    .await
                    .ctx("bulk cancel: stack")?;
                }
                moved.extend(from_stack);
            }
            let left: Vec<i64> = ids
                .iter()
                .copied()
                .filter(|id| !moved.contains(id))
                .collect();
            let found = if left.is_empty() {
                HashMap::new()
            } else {
                lookup(&mut tx, &left).await?
            };
            tx.commit().await.ctx("bulk cancel: commit")?;
            Ok(BulkOutcome {
                done: ids
                    .iter()
                    .filter(|id| moved.contains(id))
                    .map(|id| (*id, None))
                    .collect(),
                skipped: left
                    .iter()
                    .map(|id| (*id, cancel_skip_reason(found.get(id))))
                    .collect(),
            })
        }

        pub(in crate::store) async fn console_account_search(
            &self,
            kind: &SearchKind,
            limit: i64,
        ) -> Result<Vec<AccountHit>, StoreError> {
            const WHAT: &str = "search accounts";
            const COLUMNS: &str =
                "SELECT user_id, abonent_id, nas_id, login, ip, mac FROM accounts";
            let (sql, binds) = match kind {
                SearchKind::Id(id) => (
                    format!(
                        "{COLUMNS} WHERE user_id = ?1 OR abonent_id = ?1 ORDER BY user_id LIMIT {limit}"
                    ),
                    vec![Bind::Int(*id)],
                ),
                SearchKind::Ip(typed, canonical) => (
                    format!("{COLUMNS} WHERE ip = ?1 OR ip = ?2 ORDER BY user_id LIMIT {limit}"),
                    vec![Bind::Text(typed.clone()), Bind::Text(canonical.clone())],
                ),
                SearchKind::Mac(mac) => (
                    format!("{COLUMNS} WHERE {MAC_EXPR} = ?1 ORDER BY user_id LIMIT {limit}"),
                    vec![Bind::Text(mac.clone())],
                ),
                SearchKind::Login(prefix) => {
                    let (low, high) = login_range(prefix);
                    (
                        format!(
                            "{COLUMNS} WHERE lower(login) >= ?1 AND lower(login) < ?2 \
                             ORDER BY lower(login), user_id LIMIT {limit}"
                        ),
                        vec![Bind::Text(low), Bind::Text(high)],
                    )
                }
            };
            let rows: Vec<super::AccountTuple> = bind_all_as(sqlx::query_as(&sql), &binds)
                .fetch_all(self.pool())
                .await
                .ctx(WHAT)?;
            Ok(rows
                .into_iter()
                .map(|(user_id, abonent_id, nas_id, login, ip, mac)| AccountHit {
                    user_id,
                    abonent_id,
                    nas_id,
                    login,
                    ip,
                    mac,
                })
                .collect())
        }

        pub(in crate::store) async fn console_audit_insert(
            &self,
            entry: &AuditEntry,
        ) -> Result<i64, StoreError> {
            sqlx::query_scalar(
                "INSERT INTO nasd_audit (at, who, action, target, detail, count) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6) RETURNING id",
            )
            .bind(Utc::now().timestamp_millis())
            .bind(&entry.who)
            .bind(&entry.action)
            .bind(&entry.target)
            .bind(&entry.detail)
            .bind(entry.count)
            .fetch_one(self.pool())
            .await
            .ctx("record an operator action")
        }

        pub(in crate::store) async fn console_audit_list(
            &self,
            before_id: Option<i64>,
            limit: i64,
        ) -> Result<Vec<AuditRow>, StoreError> {
            let sql = format!(
                "SELECT id, at, who, action, target, detail, count FROM nasd_audit{} \
                 ORDER BY id DESC LIMIT {limit}",
                if before_id.is_some() {
                    " WHERE id < ?1"
                } else {
                    ""
                }
            );
            let mut q = sqlx::query_as(&sql);
            if let Some(b) = before_id {
                q = q.bind(b);
            }
            let rows: Vec<super::AuditTuple<i64>> =
                q.fetch_all(self.pool()).await.ctx("read the audit log")?;
            Ok(rows
                .into_iter()
                .map(|(id, at, who, action, target, detail, count)| AuditRow {
                    id,
                    at: from_ms(at),
                    who,
                    action,
                    target,
                    detail,
                    count,
                })
                .collect())
        }

        pub(in crate::store) async fn console_nas_set_paused(
            &self,
            id: i64,
            paused: bool,
        ) -> Result<bool, StoreError> {
            let done = sqlx::query("UPDATE nas SET paused = ?2, updated_at = ?3 WHERE id = ?1")
                .bind(id)
                .bind(paused)
                .bind(Utc::now().timestamp_millis())
                .execute(self.pool())
                .await
                .ctx("pause nas")?;
            Ok(done.rows_affected() > 0)
        }
    }

    /// Where each of `ids` is (the earliest place wins, as in `event_status`).
    async fn lookup(
        conn: &mut SqliteConnection,
        ids: &[i64],
    ) -> Result<HashMap<i64, Found>, StoreError> {
        let list = json_ids(ids);
        let mut found = HashMap::with_capacity(ids.len());
        let history = sqlx::query(
            "SELECT h.compact_id, h.outcome, h.nas_id, n.ip AS nas_ip, h.cmd, h.user_id, \
             h.abonent_id, h.usluga_id, h.acct_session_id FROM events_history h \
             LEFT JOIN nas n ON n.id = h.nas_id \
             WHERE h.compact_id IN (SELECT value FROM json_each(?1)) ORDER BY h.id",
        )
        .bind(&list)
        .fetch_all(&mut *conn)
        .await
        .ctx("look up events: history")?;
        for r in &history {
            let row = || -> Result<(i64, Found), sqlx::Error> {
                Ok((
                    r.try_get("compact_id")?,
                    Found::History {
                        outcome: r.try_get("outcome")?,
                        nas_id: r.try_get("nas_id")?,
                        nas_ip: r.try_get("nas_ip")?,
                        event: CompactEvent {
                            cmd: r.try_get("cmd")?,
                            user_id: r.try_get("user_id")?,
                            abonent_id: r.try_get("abonent_id")?,
                            nas_ip: None,
                            usluga_id: r.try_get("usluga_id")?,
                            acct_session_id: r.try_get("acct_session_id")?,
                        },
                    },
                ))
            };
            let (id, f) = row().ctx("look up events: history")?;
            found.insert(id, f);
        }
        let stack: Vec<(i64, String, i32)> = sqlx::query_as(
            "SELECT compact_id, state, try_count FROM events_stack \
             WHERE compact_id IN (SELECT value FROM json_each(?1)) ORDER BY id",
        )
        .bind(&list)
        .fetch_all(&mut *conn)
        .await
        .ctx("look up events: stack")?;
        for (id, state, tries) in stack {
            found.insert(id, Found::Stack(stack_state(&state, tries).to_string()));
        }
        let compact: Vec<i64> = sqlx::query_scalar(
            "SELECT id FROM events_stack_compact WHERE id IN (SELECT value FROM json_each(?1))",
        )
        .bind(&list)
        .fetch_all(&mut *conn)
        .await
        .ctx("look up events: compact stack")?;
        for id in compact {
            found.insert(id, Found::Compact);
        }
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_parse_and_print() {
        for s in EventState::ALL {
            assert_eq!(EventState::parse(s.as_str()), Ok(s));
            assert_eq!(s.to_string().parse::<EventState>(), Ok(s));
        }
        assert_eq!(EventState::parse(" Failed "), Ok(EventState::Failed));
        assert_eq!(
            EventState::parse("stuck"),
            Err(
                "unknown event state `stuck` (expected queued, retrying, running, failed, done or superseded)"
                    .into()
            )
        );
        assert_eq!(
            serde_json::to_string(&EventState::Retrying).unwrap(),
            "\"retrying\""
        );
    }

    #[test]
    fn search_texts_are_classified() {
        let ip = |t: &str, c: &str| Some(SearchKind::Ip(t.into(), c.into()));
        let mac = |m: &str| Some(SearchKind::Mac(m.into()));
        let login = |l: &str| Some(SearchKind::Login(l.into()));
        let cases: &[(&str, Option<SearchKind>)] = &[
            ("", None),
            ("   ", None),
            ("42", Some(SearchKind::Id(42))),
            (" 007 ", Some(SearchKind::Id(7))),
            // Too big for an id: a login.
            ("99999999999999999999", login("99999999999999999999")),
            ("-5", login("-5")),
            ("10.0.0.1", ip("10.0.0.1", "10.0.0.1")),
            ("2001:DB8::1", ip("2001:DB8::1", "2001:db8::1")),
            ("AA:BB:CC:dd:ee:01", mac("aabbccddee01")),
            ("aa-bb-cc-dd-ee-01", mac("aabbccddee01")),
            ("aabb.ccdd.ee01", mac("aabbccddee01")),
            // Bare hex, wrong groups, not hex, too short: logins.
            ("aabbccddee01", login("aabbccddee01")),
            ("aa:bb:cc:dd:ee", login("aa:bb:cc:dd:ee")),
            ("aa:bb:cc:dd:ee:0g", login("aa:bb:cc:dd:ee:0g")),
            ("aab.bccd.dee01", login("aab.bccd.dee01")),
            ("1.2.3", login("1.2.3")),
            ("Ivanov", login("ivanov")),
            ("user_1%", login("user_1%")),
        ];
        for (text, want) in cases {
            assert_eq!(&classify_search(text), want, "{text:?}");
        }
    }

    #[test]
    fn login_prefix_is_a_byte_range() {
        let (low, high) = login_range("User");
        assert_eq!(low, "user");
        for inside in ["user", "user1", "user_zz", "userÿ"] {
            assert!(low.as_str() <= inside && inside < high.as_str(), "{inside}");
        }
        for outside in ["use", "usea", "usf", "v"] {
            assert!(
                !(low.as_str() <= outside && outside < high.as_str()),
                "{outside}"
            );
        }
    }

    #[test]
    fn like_patterns_escape_wildcards() {
        assert_eq!(like_pattern("Timeout"), "%timeout%");
        assert_eq!(like_pattern("50%_a\\b"), "%50\\%\\_a\\\\b%");
    }

    fn query(state: EventState) -> EventQuery {
        EventQuery::new(state)
    }

    #[test]
    fn where_clauses_per_state_and_source() {
        let t = Utc.timestamp_millis_opt(1_700_000_000_000).unwrap();
        let full = EventQuery {
            nas_id: Some(3),
            cmd: Some("user_drop".into()),
            user_id: Some(7),
            error_like: Some("Time_out".into()),
            since: Some(t),
            until: Some(t),
            ..query(EventState::Failed)
        };
        type Case = (
            EventQuery,
            Source,
            Dialect,
            Option<i64>,
            Option<i64>,
            bool,
            Option<(&'static str, usize)>,
        );
        let cases: Vec<Case> = vec![
            (
                query(EventState::Queued),
                Source::Compact,
                Dialect::Postgres,
                None,
                None,
                false,
                Some(("", 0)),
            ),
            (
                query(EventState::Queued),
                Source::Compact,
                Dialect::Postgres,
                Some(10),
                None,
                false,
                Some((" WHERE id < $1", 1)),
            ),
            (
                query(EventState::Queued),
                Source::Stack,
                Dialect::Sqlite,
                Some(10),
                None,
                false,
                Some((
                    " WHERE s.state = 'ready' AND s.try_count = 0 AND s.compact_id IS NOT NULL \
                     AND s.compact_id < ?1",
                    1,
                )),
            ),
            (
                query(EventState::Retrying),
                Source::Stack,
                Dialect::Postgres,
                None,
                None,
                false,
                Some((
                    " WHERE s.state = 'ready' AND s.try_count > 0 AND s.compact_id IS NOT NULL",
                    0,
                )),
            ),
            (
                query(EventState::Running),
                Source::Stack,
                Dialect::Postgres,
                None,
                None,
                false,
                Some((" WHERE s.state = 'running' AND s.compact_id IS NOT NULL", 0)),
            ),
            // Retrying events are never in the compact stack or history.
            (
                query(EventState::Retrying),
                Source::Compact,
                Dialect::Postgres,
                None,
                None,
                false,
                None,
            ),
            (
                query(EventState::Done),
                Source::Stack,
                Dialect::Postgres,
                None,
                None,
                false,
                None,
            ),
            (
                query(EventState::Done),
                Source::History,
                Dialect::Postgres,
                Some(500),
                Some(100),
                true,
                Some((
                    " WHERE h.outcome = 'done' AND h.compact_id IS NOT NULL AND h.id < $1 \
                     AND h.id >= $2",
                    2,
                )),
            ),
            (
                query(EventState::Superseded),
                Source::History,
                Dialect::Sqlite,
                Some(500),
                None,
                false,
                Some((" WHERE h.outcome = 'superseded' AND h.id < ?1", 1)),
            ),
            (
                query(EventState::Superseded),
                Source::Stack,
                Dialect::Postgres,
                None,
                None,
                false,
                None,
            ),
            (
                full.clone(),
                Source::History,
                Dialect::Postgres,
                None,
                None,
                false,
                Some((
                    " WHERE h.outcome = 'failed' AND h.nas_id = $1 AND h.cmd = $2 AND h.user_id = $3 \
                     AND h.finished_at >= $4 AND h.finished_at < $5 \
                     AND lower(h.error) LIKE $6 ESCAPE '\\'",
                    6,
                )),
            ),
            (
                EventQuery {
                    state: EventState::Retrying,
                    ..full.clone()
                },
                Source::Stack,
                Dialect::Sqlite,
                None,
                None,
                false,
                Some((
                    " WHERE s.state = 'ready' AND s.try_count > 0 AND s.compact_id IS NOT NULL \
                     AND s.nas_id = ?1 AND s.cmd = ?2 AND s.user_id = ?3 AND s.enqueued_at >= ?4 \
                     AND s.enqueued_at < ?5 AND lower(s.last_error) LIKE ?6 ESCAPE '\\'",
                    6,
                )),
            ),
            // Queued events carry no error: the compact stack cannot match one.
            (
                EventQuery {
                    state: EventState::Queued,
                    ..full.clone()
                },
                Source::Compact,
                Dialect::Postgres,
                None,
                None,
                false,
                None,
            ),
            (
                EventQuery {
                    state: EventState::Queued,
                    error_like: None,
                    ..full.clone()
                },
                Source::Compact,
                Dialect::Postgres,
                None,
                None,
                false,
                Some((
                    " WHERE nas_ip = (SELECT ip FROM nas WHERE id = $1) AND cmd = $2 \
                     AND user_id = $3 AND created_at >= $4 AND created_at < $5",
                    5,
                )),
            ),
        ];
        for (q, source, dialect, before, floor, for_ids, want) in cases {
            let got = event_where(&q, source, dialect, before, floor, for_ids);
            match (got, want) {
                (None, None) => {}
                (Some(w), Some((sql, n))) => {
                    assert_eq!(w.sql, sql, "{q:?} {source:?}");
                    assert_eq!(w.binds.len(), n, "{q:?} {source:?}");
                }
                (got, want) => panic!("{q:?} {source:?}: got {got:?}, want {want:?}"),
            }
        }
        let w = event_where(&full, Source::History, Dialect::Postgres, None, None, false).unwrap();
        assert_eq!(
            w.binds,
            vec![
                Bind::Int(3),
                Bind::Text("user_drop".into()),
                Bind::Int(7),
                Bind::Time(t),
                Bind::Time(t),
                Bind::Text("%time\\_out%".into()),
            ]
        );
    }

    #[test]
    fn history_bounds_cap_rare_filters_and_turn_times_into_ids() {
        let with = |f: fn(&mut EventQuery)| {
            let mut q = query(EventState::Failed);
            f(&mut q);
            q
        };
        let million = (Some(1), Some(1_000_000));
        let top = 1_000_001 - SCAN_CAP;
        let b = |before: Option<i64>, floor: Option<i64>, window: Option<i64>| HistoryBounds {
            before,
            floor,
            window,
            empty: false,
        };
        let empty = HistoryBounds {
            empty: true,
            ..HistoryBounds::default()
        };
        type Case = (
            EventQuery,
            (Option<i64>, Option<i64>),
            Option<i64>,
            Option<i64>,
            HistoryBounds,
        );
        let cases: Vec<Case> = vec![
            // No filter, an account: indexes serve them.
            (with(|_| {}), million, None, None, b(None, None, None)),
            (
                with(|q| q.user_id = Some(5)),
                million,
                None,
                None,
                b(None, None, None),
            ),
            // An error text, a NAS, a command: the newest SCAN_CAP ids below the cursor.
            (
                with(|q| q.error_like = Some("x".into())),
                million,
                None,
                None,
                b(None, Some(top), Some(top)),
            ),
            (
                with(|q| q.nas_id = Some(1)),
                million,
                None,
                None,
                b(None, Some(top), Some(top)),
            ),
            (
                with(|q| {
                    q.cmd = Some("user_add".into());
                    q.before_id = Some(500_000);
                }),
                million,
                None,
                None,
                b(
                    Some(500_000),
                    Some(500_000 - SCAN_CAP),
                    Some(500_000 - SCAN_CAP),
                ),
            ),
            // A cursor above the table's top counts from the top.
            (
                with(|q| {
                    q.nas_id = Some(1);
                    q.before_id = Some(9_000_000);
                }),
                million,
                None,
                None,
                b(Some(9_000_000), Some(top), Some(top)),
            ),
            // Near the bottom, or a small table: everything.
            (
                with(|q| {
                    q.nas_id = Some(1);
                    q.before_id = Some(50_000);
                }),
                million,
                None,
                None,
                b(Some(50_000), None, None),
            ),
            (
                with(|q| q.nas_id = Some(1)),
                (Some(1), Some(1000)),
                None,
                None,
                b(None, None, None),
            ),
            (
                with(|q| q.nas_id = Some(1)),
                (None, None),
                None,
                None,
                empty,
            ),
            // A NAS together with an account: the account's index.
            (
                with(|q| {
                    q.nas_id = Some(1);
                    q.user_id = Some(2);
                }),
                million,
                None,
                None,
                b(None, None, None),
            ),
            // A time range becomes an id range; the cap starts below its top.
            (
                with(|q| {
                    q.since = Some(Utc::now());
                    q.until = Some(Utc::now());
                }),
                million,
                Some(300_000),
                Some(400_000),
                b(Some(400_001), Some(300_000), None),
            ),
            (
                with(|q| {
                    q.until = Some(Utc::now());
                    q.before_id = Some(350_000);
                    q.error_like = Some("x".into());
                }),
                million,
                None,
                Some(400_000),
                b(
                    Some(350_000),
                    Some(350_000 - SCAN_CAP),
                    Some(350_000 - SCAN_CAP),
                ),
            ),
            // The cap never reaches below the range's start.
            (
                with(|q| {
                    q.since = Some(Utc::now());
                    q.error_like = Some("x".into());
                }),
                million,
                Some(1_000_000 - SCAN_CAP / 2),
                None,
                b(None, Some(1_000_000 - SCAN_CAP / 2), None),
            ),
            // Nothing finished in the range.
            (
                with(|q| q.since = Some(Utc::now())),
                million,
                None,
                None,
                empty,
            ),
            (
                with(|q| q.until = Some(Utc::now())),
                million,
                None,
                None,
                empty,
            ),
        ];
        for (q, ids, since_id, until_id, want) in cases {
            assert_eq!(history_bounds(&q, ids, since_id, until_id), want, "{q:?}");
        }
    }

    fn ev(id: i64) -> EventStatus {
        EventStatus::from_compact(&super::super::CompactRow {
            id,
            event: CompactEvent::default(),
            created_at: Utc::now(),
        })
    }

    #[test]
    fn pages_merge_sources_and_name_the_next_cursor() {
        let ids = |p: &EventPage| p.events.iter().map(|e| e.id).collect::<Vec<_>>();
        // Two sources merged newest first; one row more than the page: a next page.
        let page = assemble_page(
            vec![(9, ev(9)), (5, ev(5)), (8, ev(8)), (7, ev(7))],
            3,
            None,
        );
        assert_eq!(ids(&page), vec![9, 8, 7]);
        assert_eq!(page.next_before, Some(7));
        assert!(!page.scanned_capped);
        // Exactly a page: the last.
        let page = assemble_page(vec![(2, ev(2)), (1, ev(1))], 2, None);
        assert_eq!(page.next_before, None);
        // A capped scan that did not fill the page goes on below its floor.
        let page = assemble_page(vec![(900, ev(1))], 50, Some(700));
        assert_eq!(page.next_before, Some(700));
        assert!(page.scanned_capped);
        // A full page under a cap is not capped.
        let page = assemble_page(vec![(900, ev(1)), (899, ev(2))], 1, Some(700));
        assert_eq!(page.next_before, Some(900));
        assert!(!page.scanned_capped);
        // The limit is clamped.
        let page = assemble_page((1..=3).map(|i| (i, ev(i))).collect(), 0, None);
        assert_eq!(ids(&page), vec![3]);
    }

    #[test]
    fn retry_plan_follows_retry_event() {
        let event = CompactEvent {
            cmd: "user_add".into(),
            user_id: 5,
            abonent_id: Some(50),
            usluga_id: Some(3),
            acct_session_id: Some("s1".into()),
            nas_ip: None,
        };
        let history = |outcome: &str, nas_id: Option<i64>, nas_ip: Option<&str>| Found::History {
            outcome: outcome.into(),
            nas_id,
            nas_ip: nas_ip.map(str::to_string),
            event: event.clone(),
        };
        let found: HashMap<i64, Found> = [
            (1, history("failed", Some(2), Some("10.0.0.2"))),
            (2, history("failed", None, None)),
            (3, history("failed", Some(9), None)),
            (4, history("done", Some(2), Some("10.0.0.2"))),
            (5, Found::Stack("running".into())),
            (6, Found::Compact),
        ]
        .into();
        let (copies, skipped) = plan_retry(&[1, 2, 3, 4, 5, 6, 7], &found);
        assert_eq!(
            copies,
            vec![
                (
                    1,
                    CompactEvent {
                        nas_ip: Some("10.0.0.2".into()),
                        ..event.clone()
                    }
                ),
                (2, event.clone()),
            ]
        );
        assert_eq!(
            skipped,
            vec![
                (3, "was for nas 9, which no longer exists".to_string()),
                (4, "is done: only failed events can be retried".to_string()),
                (
                    5,
                    "is running: only failed events can be retried".to_string()
                ),
                (
                    6,
                    "is queued: only failed events can be retried".to_string()
                ),
                (7, "does not exist".to_string()),
            ]
        );
        assert_eq!(
            cancel_skip_reason(Some(&Found::Stack("running".into()))),
            "is running: only queued or retrying events can be cancelled"
        );
        assert_eq!(cancel_skip_reason(None), "does not exist");
        assert_eq!(stack_state("running", 2), "running");
        assert_eq!(stack_state("ready", 2), "retrying");
        assert_eq!(stack_state("ready", 0), "queued");
        assert_eq!(dedup_ids(&[3, 1, 3, 2, 1]), vec![3, 1, 2]);
    }

    /// As `postgres.rs` checks for its own: every PostgreSQL statement here says
    /// whether it is named, and runs in the call's session, never straight on the pool.
    #[test]
    fn every_postgres_statement_says_if_it_is_named() {
        let text = include_str!("console.rs");
        let start = text.find("\nmod pg {").expect("the pg module");
        let end = text.find("\nmod lite {").expect("the lite module");
        let code = &text[start..end];
        let mut statements = 0;
        for (at, _) in code.match_indices("sqlx::query") {
            let rest = &code[at..];
            if rest.starts_with("sqlx::query::") {
                continue;
            }
            statements += 1;
            let statement = &rest[..rest.find(".await").unwrap_or(rest.len())];
            assert!(
                statement.contains(".persistent("),
                "a statement without .persistent(...): {}",
                statement.lines().take(3).collect::<Vec<_>>().join(" ")
            );
        }
        assert!(statements >= 10, "{statements}");
        assert!(!code.contains("self.pool()") && !code.contains("&self.pool)"));
    }
}
