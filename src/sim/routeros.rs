//! A RouterOS-like CLI interpreter over in-memory state, and the `Device` every simulator session shares.
//!
//! The interpreter is pure: `execute(state, line)` parses the whole line first (so a syntax
//! error anywhere runs nothing, as on RouterOS), then runs its commands in order and stops
//! at the first runtime error. Only the menus nasd's schemes touch are modelled: firewall
//! address lists, simple queues and the system identity.
//!
//! The `Device` also keeps the subscriber sessions a RADIUS CoA / Disconnect server
//! acts on (`sessions`), so the CoA side and the CLI/API side show in one snapshot.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;

/// One `/ip firewall address-list` entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AddressListEntry {
    pub id: u32,
    pub list: String,
    pub address: String,
    pub comment: String,
    pub disabled: bool,
}

/// One `/queue simple` entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SimpleQueue {
    pub id: u32,
    pub name: String,
    pub target: String,
    pub max_limit: String,
    pub comment: String,
    pub disabled: bool,
}

/// One subscriber session (PPPoE / hotspot) as the CoA server sees it, with what the
/// last CoA requests set on it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RadiusSession {
    pub user: String,
    pub acct_session_id: String,
    pub ip: String,
    /// `Mikrotik-Rate-Limit` (vendor 14988, attribute 8), e.g. `10M/10M`.
    pub rate_limit: String,
    /// `Mikrotik-Address-List` (14988/19).
    pub address_list: String,
    pub filter_id: String,
    /// The last `Cisco-AVPair` (9/1) received, e.g. `subscriber:command=account-logon`.
    pub cisco_avpair: String,
    /// CoA requests applied to this session.
    pub coa_count: u64,
}

/// The configuration a RouterOS box would hold, as far as the simulator models it.
#[derive(Clone, Debug, Serialize)]
pub struct RouterState {
    pub identity: String,
    pub address_list: Vec<AddressListEntry>,
    pub queues: Vec<SimpleQueue>,
    /// Active subscriber sessions, keyed by Acct-Session-Id (by user name for a session
    /// added without one).
    pub sessions: BTreeMap<String, RadiusSession>,
    /// RouterOS internal ids (`*1`, `*2`, ...) are unique across menus and never reused.
    #[serde(skip)]
    next_id: u32,
}

impl RouterState {
    pub fn new(identity: &str) -> Self {
        Self {
            identity: identity.to_string(),
            address_list: Vec::new(),
            queues: Vec::new(),
            sessions: BTreeMap::new(),
            next_id: 1,
        }
    }

    fn allocate_id(&mut self) -> u32 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        id
    }
}

/// Which protocol a session came in on; session limits are per protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Ssh,
    Telnet,
    /// The RouterOS API (TCP 8728).
    Api,
}

/// Counters a test or the demo reads to see what the device went through.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DeviceCounters {
    /// CLI lines handed to the interpreter (one line may hold several `;`-separated
    /// commands), API sentences and verified CoA / Disconnect requests applied.
    pub commands_executed: u64,
    /// Connections accepted under the session limit.
    pub sessions_opened: u64,
    /// Connections turned away because the protocol's session limit was reached.
    pub sessions_refused: u64,
    /// Rejected logins (wrong credentials or the `refuse-auth` fault).
    pub auth_failures: u64,
    /// Connections open right now, all protocols together.
    pub live_sessions: u64,
    /// The highest `live_sessions` seen.
    pub max_concurrent_sessions: u64,
    /// CoA / Disconnect requests answered with an ACK.
    pub coa_acks: u64,
    /// CoA / Disconnect requests answered with a NAK.
    pub coa_naks: u64,
    /// Datagrams dropped unanswered because they failed verification (wrong secret, bad
    /// Message-Authenticator, malformed) or were not a CoA / Disconnect request.
    pub coa_dropped: u64,
}

#[derive(Default)]
struct LiveSessions {
    ssh: usize,
    telnet: usize,
    api: usize,
    max_total: usize,
}

impl LiveSessions {
    fn slot(&mut self, protocol: Protocol) -> &mut usize {
        match protocol {
            Protocol::Ssh => &mut self.ssh,
            Protocol::Telnet => &mut self.telnet,
            Protocol::Api => &mut self.api,
        }
    }

    fn total(&self) -> usize {
        self.ssh + self.telnet + self.api
    }
}

/// What became of one CoA / Disconnect datagram, for the counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CoaOutcome {
    Ack,
    Nak,
    Dropped,
}

#[derive(Default)]
struct Counters {
    commands_executed: AtomicU64,
    sessions_opened: AtomicU64,
    sessions_refused: AtomicU64,
    auth_failures: AtomicU64,
    coa_acks: AtomicU64,
    coa_naks: AtomicU64,
    coa_dropped: AtomicU64,
    live: Mutex<LiveSessions>,
}

impl Counters {
    fn live(&self) -> MutexGuard<'_, LiveSessions> {
        // The guarded data is plain counters, always consistent, so a poisoned lock is usable.
        self.live
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The simulated NAS: state and counters shared by every session of every protocol.
#[derive(Clone)]
pub struct Device {
    state: Arc<Mutex<RouterState>>,
    counters: Arc<Counters>,
}

/// Holds one session slot; dropping it frees the slot.
pub struct SessionGuard {
    counters: Arc<Counters>,
    protocol: Protocol,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        let mut live = self.counters.live();
        let slot = live.slot(self.protocol);
        *slot = slot.saturating_sub(1);
    }
}

impl Device {
    pub fn new(identity: &str) -> Self {
        Self {
            state: Arc::new(Mutex::new(RouterState::new(identity))),
            counters: Arc::new(Counters::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, RouterState> {
        // Every mutation completes inside one `execute` call without panicking paths, so the
        // state behind a poisoned lock is still a consistent configuration.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs one CLI line against the shared state and counts it.
    pub fn execute(&self, line: &str) -> String {
        self.counters
            .commands_executed
            .fetch_add(1, Ordering::Relaxed);
        execute(&mut self.lock(), line)
    }

    /// Runs one non-CLI command (an API sentence, a CoA request) against the state under
    /// the lock, so it is atomic with respect to every other session, and counts it.
    pub fn apply<R>(&self, command: impl FnOnce(&mut RouterState) -> R) -> R {
        self.counters
            .commands_executed
            .fetch_add(1, Ordering::Relaxed);
        command(&mut self.lock())
    }

    /// Preloads an active subscriber session for the CoA server (tests, bench, demo).
    /// It is keyed by `acct_session_id`, or by `user` when that is empty; an existing
    /// session under the same key is replaced.
    pub fn add_session(&self, user: &str, acct_session_id: &str, ip: &str) {
        let key = if acct_session_id.is_empty() {
            user
        } else {
            acct_session_id
        };
        self.lock().sessions.insert(
            key.to_string(),
            RadiusSession {
                user: user.to_string(),
                acct_session_id: acct_session_id.to_string(),
                ip: ip.to_string(),
                ..RadiusSession::default()
            },
        );
    }

    /// The session stored under `key` (its Acct-Session-Id, or user name).
    pub fn session(&self, key: &str) -> Option<RadiusSession> {
        self.lock().sessions.get(key).cloned()
    }

    pub fn record_coa(&self, outcome: CoaOutcome) {
        let counter = match outcome {
            CoaOutcome::Ack => &self.counters.coa_acks,
            CoaOutcome::Nak => &self.counters.coa_naks,
            CoaOutcome::Dropped => &self.counters.coa_dropped,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// A copy of the current configuration.
    pub fn state(&self) -> RouterState {
        self.lock().clone()
    }

    /// The identity shown in the prompt (`/system identity set` changes it, as on RouterOS).
    pub fn identity(&self) -> String {
        self.lock().identity.clone()
    }

    pub fn counters(&self) -> DeviceCounters {
        let live = self.counters.live();
        DeviceCounters {
            commands_executed: self.counters.commands_executed.load(Ordering::Relaxed),
            sessions_opened: self.counters.sessions_opened.load(Ordering::Relaxed),
            sessions_refused: self.counters.sessions_refused.load(Ordering::Relaxed),
            auth_failures: self.counters.auth_failures.load(Ordering::Relaxed),
            live_sessions: live.total() as u64,
            max_concurrent_sessions: live.max_total as u64,
            coa_acks: self.counters.coa_acks.load(Ordering::Relaxed),
            coa_naks: self.counters.coa_naks.load(Ordering::Relaxed),
            coa_dropped: self.counters.coa_dropped.load(Ordering::Relaxed),
        }
    }

    /// Takes a session slot for `protocol` unless `max` sessions of it are already open;
    /// counts the session as opened or refused.
    pub fn try_open_session(&self, protocol: Protocol, max: usize) -> Option<SessionGuard> {
        let mut live = self.counters.live();
        let slot = live.slot(protocol);
        if *slot >= max {
            self.counters
                .sessions_refused
                .fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *slot += 1;
        live.max_total = live.max_total.max(live.total());
        self.counters
            .sessions_opened
            .fetch_add(1, Ordering::Relaxed);
        Some(SessionGuard {
            counters: self.counters.clone(),
            protocol,
        })
    }

    pub fn record_auth_failure(&self) {
        self.counters.auth_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Configuration and counters as JSON, for tests and the demo.
    pub fn snapshot(&self) -> serde_json::Value {
        let state = self.state();
        serde_json::json!({
            "identity": state.identity,
            "address_list": state.address_list,
            "queues": state.queues,
            "sessions": state.sessions,
            "counters": self.counters(),
        })
    }
}

// ---------------------------------------------------------------------------------------
// Lexer

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Pos {
    line: usize,
    col: usize,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Tok {
    /// A bare word; never contains whitespace, `=`, `;`, brackets or quotes.
    Word(String),
    /// A double-quoted string with its escapes already resolved.
    Str(String),
    Eq,
    /// `;` or a newline: ends a command.
    Semi,
    Open,
    Close,
}

#[derive(Clone, Debug)]
struct Token {
    tok: Tok,
    pos: Pos,
    /// Whitespace (or the start of the line) comes right before this token; RouterOS
    /// glues `key=value` only when nothing separates the parts.
    spaced: bool,
}

fn syntax_error(pos: Pos) -> String {
    format!("syntax error (line {} column {})", pos.line, pos.col)
}

fn at(message: &str, pos: Pos) -> String {
    format!("{message} (line {} column {})", pos.line, pos.col)
}

fn is_word_char(c: char) -> bool {
    // `$`, `{`, `}`, `(`, `)`, `\` and `?` start scripting constructs (variables, blocks,
    // expressions, help) the simulator does not model; refusing them keeps a value that
    // was meant to be quoted from silently meaning something else.
    !(c.is_whitespace() || "=;[]\"$\\{}()?".contains(c))
}

fn lex(text: &str) -> Result<Vec<Token>, String> {
    let mut tokens = Vec::new();
    let mut chars = text.chars().peekable();
    let mut pos = Pos { line: 1, col: 1 };
    let mut spaced = true;
    // A `#` that starts a command begins a comment, as in RouterOS scripts.
    let mut at_command_start = true;
    while let Some(&c) = chars.peek() {
        let start = pos;
        match c {
            '\n' => {
                chars.next();
                tokens.push(Token {
                    tok: Tok::Semi,
                    pos: start,
                    spaced,
                });
                pos = Pos {
                    line: pos.line + 1,
                    col: 1,
                };
                spaced = true;
                at_command_start = true;
                continue;
            }
            c if c.is_whitespace() => {
                chars.next();
                pos.col += 1;
                spaced = true;
                continue;
            }
            '#' if at_command_start => {
                while chars.peek().is_some_and(|&c| c != '\n') {
                    chars.next();
                    pos.col += 1;
                }
                continue;
            }
            ';' | '=' | '[' | ']' => {
                chars.next();
                pos.col += 1;
                let tok = match c {
                    ';' => Tok::Semi,
                    '=' => Tok::Eq,
                    '[' => Tok::Open,
                    _ => Tok::Close,
                };
                at_command_start = matches!(tok, Tok::Semi | Tok::Open);
                tokens.push(Token {
                    tok,
                    pos: start,
                    spaced,
                });
            }
            '"' => {
                chars.next();
                pos.col += 1;
                let value = lex_string(&mut chars, &mut pos)?;
                at_command_start = false;
                tokens.push(Token {
                    tok: Tok::Str(value),
                    pos: start,
                    spaced,
                });
            }
            c if is_word_char(c) => {
                let mut word = String::new();
                while let Some(&c) = chars.peek() {
                    if !is_word_char(c) {
                        break;
                    }
                    word.push(c);
                    chars.next();
                    pos.col += 1;
                }
                at_command_start = false;
                tokens.push(Token {
                    tok: Tok::Word(word),
                    pos: start,
                    spaced,
                });
            }
            _ => return Err(syntax_error(start)),
        }
        spaced = false;
    }
    Ok(tokens)
}

/// Reads a double-quoted string after its opening quote. Everything up to the closing
/// quote is one value: a `;` or `[` inside it can never start a command.
fn lex_string(
    chars: &mut std::iter::Peekable<std::str::Chars<'_>>,
    pos: &mut Pos,
) -> Result<String, String> {
    let mut value = String::new();
    loop {
        let here = *pos;
        let Some(c) = chars.next() else {
            return Err(syntax_error(here));
        };
        pos.col += 1;
        match c {
            '"' => return Ok(value),
            // Variable substitution is not modelled; an unescaped `$` would expand on a
            // real router, so refuse it rather than store text the router would not.
            '$' => return Err(syntax_error(here)),
            '\n' => return Err(syntax_error(here)),
            '\\' => {
                let Some(escaped) = chars.next() else {
                    return Err(syntax_error(here));
                };
                pos.col += 1;
                match escaped {
                    '"' | '\\' | '$' | '?' => value.push(escaped),
                    'n' => value.push('\n'),
                    'r' => value.push('\r'),
                    't' => value.push('\t'),
                    '_' => value.push(' '),
                    'a' => value.push('\u{7}'),
                    'b' => value.push('\u{8}'),
                    'f' => value.push('\u{c}'),
                    'v' => value.push('\u{b}'),
                    high if high.is_ascii_hexdigit() => {
                        let low = chars.next().filter(char::is_ascii_hexdigit);
                        let Some(low) = low else {
                            return Err(syntax_error(here));
                        };
                        pos.col += 1;
                        let byte = u8::from_str_radix(&format!("{high}{low}"), 16)
                            .map_err(|_| syntax_error(here))?;
                        value.push(char::from(byte));
                    }
                    _ => return Err(syntax_error(here)),
                }
            }
            c => value.push(c),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Parser

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Node {
    Root,
    Ip,
    Firewall,
    Queue,
    System,
    Menu(Menu),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Menu {
    AddressList,
    SimpleQueue,
    Identity,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verb {
    Add,
    Remove,
    Set,
    Print,
    Find,
    Enable,
    Disable,
}

impl Node {
    fn child(self, word: &str) -> Option<Node> {
        Some(match (self, word) {
            (Node::Root, "ip") => Node::Ip,
            (Node::Root, "queue") => Node::Queue,
            (Node::Root, "system") => Node::System,
            (Node::Ip, "firewall") => Node::Firewall,
            (Node::Firewall, "address-list") => Node::Menu(Menu::AddressList),
            (Node::Queue, "simple") => Node::Menu(Menu::SimpleQueue),
            (Node::System, "identity") => Node::Menu(Menu::Identity),
            _ => return None,
        })
    }
}

impl Menu {
    fn verb(self, word: &str) -> Option<Verb> {
        let verb = match word {
            "add" => Verb::Add,
            "remove" => Verb::Remove,
            "set" => Verb::Set,
            "print" => Verb::Print,
            "find" => Verb::Find,
            "enable" => Verb::Enable,
            "disable" => Verb::Disable,
            _ => return None,
        };
        match (self, verb) {
            (Menu::Identity, Verb::Print | Verb::Set) => Some(verb),
            (Menu::Identity, _) => None,
            _ => Some(verb),
        }
    }

    /// Properties `add`/`set` accept.
    fn settable(self) -> &'static [&'static str] {
        match self {
            Menu::AddressList => &["list", "address", "comment", "disabled", "timeout"],
            Menu::SimpleQueue => &[
                "name",
                "target",
                "max-limit",
                "comment",
                "disabled",
                "limit-at",
                "parent",
                "priority",
                "queue",
                "burst-limit",
                "burst-threshold",
                "burst-time",
                "packet-marks",
            ],
            Menu::Identity => &["name"],
        }
    }

    /// Properties `find` and `print where` can compare.
    fn searchable(self) -> &'static [&'static str] {
        match self {
            Menu::AddressList => &["list", "address", "comment", "disabled"],
            Menu::SimpleQueue => &["name", "target", "max-limit", "comment", "disabled"],
            Menu::Identity => &[],
        }
    }
}

#[derive(Clone, Debug)]
enum Value {
    Text(String),
    /// A `[find ...]` sub-command: the items it matches.
    Find(Box<Command>),
}

#[derive(Clone, Debug)]
struct Named {
    key: String,
    value: Value,
}

#[derive(Clone, Debug)]
struct Command {
    menu: Menu,
    verb: Verb,
    /// `key=value` arguments (properties to set, or `numbers=`).
    named: Vec<Named>,
    /// The unnamed item list (`remove 0`, `remove [find ...]`).
    items: Option<Value>,
    /// `find key=value` / `print where key=value` conditions.
    conditions: Vec<(String, String)>,
    /// Bare flags such as `count-only`.
    flags: Vec<String>,
}

struct Parser {
    tokens: Vec<Token>,
    index: usize,
    end: Pos,
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.index)
    }

    fn next(&mut self) -> Option<Token> {
        let token = self.tokens.get(self.index).cloned();
        self.index += 1;
        token
    }

    fn here(&self) -> Pos {
        self.peek().map_or(self.end, |t| t.pos)
    }

    fn ends_command(&self, in_bracket: bool) -> bool {
        match self.peek() {
            None => true,
            Some(token) => token.tok == Tok::Semi || (in_bracket && token.tok == Tok::Close),
        }
    }

    /// Parses one command; `Ok(None)` for an empty one (`;;`, blank line, comment).
    fn command(&mut self, base: Node, in_bracket: bool) -> Result<Option<Command>, String> {
        let (menu, verb) = match self.path(base, in_bracket)? {
            Some(found) => found,
            None => return Ok(None),
        };
        let mut command = Command {
            menu,
            verb,
            named: Vec::new(),
            items: None,
            conditions: Vec::new(),
            flags: Vec::new(),
        };
        let mut in_where = false;
        while !self.ends_command(in_bracket) {
            let Some(token) = self.next() else { break };
            let glued_eq = self
                .peek()
                .is_some_and(|next| next.tok == Tok::Eq && !next.spaced);
            match token.tok {
                Tok::Word(word) if glued_eq => {
                    self.next();
                    let value = self.value(menu)?;
                    self.add_named(&mut command, word, value, token.pos, in_where)?;
                }
                Tok::Word(word) if word == "where" && matches!(verb, Verb::Print | Verb::Find) => {
                    in_where = true;
                }
                Tok::Word(word) if in_where && word == "and" => {}
                Tok::Word(word) if verb == Verb::Print && !in_where => {
                    if !["count-only", "detail", "terse", "without-paging", "brief"]
                        .contains(&word.as_str())
                    {
                        return Err(at("expected end of command", token.pos));
                    }
                    command.flags.push(word);
                }
                Tok::Word(word) | Tok::Str(word) => {
                    self.set_items(&mut command, Value::Text(word), token.pos, in_where)?;
                }
                Tok::Open => {
                    let sub = self.bracket(menu, token.pos)?;
                    self.set_items(&mut command, sub, token.pos, in_where)?;
                }
                Tok::Eq | Tok::Close | Tok::Semi => return Err(syntax_error(token.pos)),
            }
        }
        Ok(Some(command))
    }

    /// Resolves the menu path and the command name.
    fn path(&mut self, base: Node, in_bracket: bool) -> Result<Option<(Menu, Verb)>, String> {
        let mut node = base;
        let mut seen_any = false;
        loop {
            if self.ends_command(in_bracket) {
                return if seen_any {
                    Err(at("expected command name", self.here()))
                } else {
                    Ok(None)
                };
            }
            let Some(token) = self.next() else {
                return Ok(None);
            };
            let Tok::Word(word) = &token.tok else {
                return Err(if seen_any {
                    at("expected command name", token.pos)
                } else {
                    syntax_error(token.pos)
                });
            };
            let mut segments: Vec<(&str, Pos)> = Vec::new();
            if let Some(rest) = word.strip_prefix('/') {
                node = Node::Root;
                // `/ip/firewall/address-list/add` is the RouterOS v7 spelling of a path.
                let mut col = token.pos.col + 1;
                for segment in rest.split('/') {
                    if !segment.is_empty() {
                        segments.push((
                            segment,
                            Pos {
                                line: token.pos.line,
                                col,
                            },
                        ));
                    }
                    col += segment.chars().count() + 1;
                }
            } else {
                segments.push((word, token.pos));
            }
            seen_any = true;
            for (index, (segment, pos)) in segments.iter().enumerate() {
                if let Node::Menu(menu) = node
                    && let Some(verb) = menu.verb(segment)
                {
                    if let Some((extra, extra_pos)) = segments.get(index + 1) {
                        return Err(format!(
                            "bad command name {extra} (line {} column {})",
                            extra_pos.line, extra_pos.col
                        ));
                    }
                    return Ok(Some((menu, verb)));
                }
                match node.child(segment) {
                    Some(child) => node = child,
                    None => {
                        return Err(format!(
                            "bad command name {segment} (line {} column {})",
                            pos.line, pos.col
                        ));
                    }
                }
            }
        }
    }

    fn value(&mut self, menu: Menu) -> Result<Value, String> {
        let glued = self.peek().is_some_and(|t| !t.spaced);
        if !glued {
            return Ok(Value::Text(String::new()));
        }
        let Some(token) = self.peek().cloned() else {
            return Ok(Value::Text(String::new()));
        };
        match token.tok {
            Tok::Word(text) | Tok::Str(text) => {
                self.next();
                Ok(Value::Text(text))
            }
            Tok::Open => {
                self.next();
                self.bracket(menu, token.pos)
            }
            Tok::Semi | Tok::Close => Ok(Value::Text(String::new())),
            Tok::Eq => Err(syntax_error(token.pos)),
        }
    }

    /// Parses `[ ... ]` after its `[`; only `find` is supported inside brackets because
    /// it is the only sub-command schemes use to pick items.
    fn bracket(&mut self, menu: Menu, open: Pos) -> Result<Value, String> {
        let inner = self.command(Node::Menu(menu), true)?;
        match self.next() {
            Some(Token {
                tok: Tok::Close, ..
            }) => {}
            Some(token) => return Err(syntax_error(token.pos)),
            None => return Err(syntax_error(self.end)),
        }
        match inner {
            Some(command) if command.verb == Verb::Find => Ok(Value::Find(Box::new(command))),
            _ => Err(syntax_error(open)),
        }
    }

    fn add_named(
        &self,
        command: &mut Command,
        key: String,
        value: Value,
        pos: Pos,
        in_where: bool,
    ) -> Result<(), String> {
        let menu = command.menu;
        let is_condition = in_where || command.verb == Verb::Find;
        if is_condition {
            let Value::Text(text) = value else {
                return Err(syntax_error(pos));
            };
            if !menu.searchable().contains(&key.as_str()) {
                return Err(at("expected end of command", pos));
            }
            command.conditions.push((key, text));
            return Ok(());
        }
        let allowed = match command.verb {
            Verb::Add => menu.settable().contains(&key.as_str()),
            Verb::Set => {
                key == "numbers" && menu != Menu::Identity
                    || menu.settable().contains(&key.as_str())
            }
            Verb::Remove | Verb::Enable | Verb::Disable => key == "numbers",
            Verb::Print | Verb::Find => false,
        };
        if !allowed {
            return Err(at("expected end of command", pos));
        }
        if key == "numbers" {
            if command.items.is_some() {
                return Err(at("expected end of command", pos));
            }
            command.items = Some(value);
        } else {
            if matches!(value, Value::Find(_)) {
                // Only item lists take `[find]`; a property wants plain text.
                return Err(syntax_error(pos));
            }
            command.named.push(Named { key, value });
        }
        Ok(())
    }

    fn set_items(
        &self,
        command: &mut Command,
        value: Value,
        pos: Pos,
        in_where: bool,
    ) -> Result<(), String> {
        let takes_items = matches!(
            command.verb,
            Verb::Remove | Verb::Set | Verb::Enable | Verb::Disable
        ) && command.menu != Menu::Identity;
        if in_where || !takes_items || command.items.is_some() {
            return Err(at("expected end of command", pos));
        }
        command.items = Some(value);
        Ok(())
    }
}

fn parse(line: &str) -> Result<Vec<Command>, String> {
    let tokens = lex(line)?;
    let end = Pos {
        line: line.matches('\n').count() + 1,
        col: line.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1,
    };
    let mut parser = Parser {
        tokens,
        index: 0,
        end,
    };
    let mut commands = Vec::new();
    while parser.peek().is_some() {
        if let Some(command) = parser.command(Node::Root, false)? {
            commands.push(command);
        }
        match parser.next() {
            None => break,
            Some(Token { tok: Tok::Semi, .. }) => {}
            Some(token) => return Err(syntax_error(token.pos)),
        }
    }
    Ok(commands)
}

// ---------------------------------------------------------------------------------------
// Execution

/// Runs one CLI line and returns what RouterOS would print (possibly nothing).
///
/// The whole line is parsed before anything runs; commands separated by an unquoted `;`
/// (or a newline) then run in order, and the first failing one stops the rest.
pub fn execute(state: &mut RouterState, line: &str) -> String {
    let commands = match parse(line) {
        Ok(commands) => commands,
        Err(error) => return error,
    };
    let mut output = Vec::new();
    for command in &commands {
        match run(state, command) {
            Ok(text) => {
                if !text.is_empty() {
                    output.push(text);
                }
            }
            Err(error) => {
                output.push(error);
                break;
            }
        }
    }
    output.join("\n")
}

fn run(state: &mut RouterState, command: &Command) -> Result<String, String> {
    match (command.menu, command.verb) {
        (Menu::Identity, Verb::Print) => Ok(format!("  name: {}", state.identity)),
        (Menu::Identity, _) => {
            for named in &command.named {
                if let (true, Value::Text(name)) = (named.key == "name", &named.value) {
                    state.identity = name.clone();
                }
            }
            Ok(String::new())
        }
        (_, Verb::Find) => Ok(String::new()),
        (menu, Verb::Print) => Ok(print(state, menu, command)),
        (menu, Verb::Add) => add(state, menu, &properties(command)),
        (menu, Verb::Remove) => {
            let ids = resolve_items(state, menu, command.items.as_ref())?;
            match menu {
                Menu::AddressList => state.address_list.retain(|e| !ids.contains(&e.id)),
                _ => state.queues.retain(|q| !ids.contains(&q.id)),
            }
            Ok(String::new())
        }
        (menu, Verb::Enable | Verb::Disable) => {
            let ids = resolve_items(state, menu, command.items.as_ref())?;
            let disabled = command.verb == Verb::Disable;
            for entry in &mut state.address_list {
                if ids.contains(&entry.id) {
                    entry.disabled = disabled;
                }
            }
            for queue in &mut state.queues {
                if ids.contains(&queue.id) {
                    queue.disabled = disabled;
                }
            }
            Ok(String::new())
        }
        (menu, Verb::Set) => {
            let ids = resolve_items(state, menu, command.items.as_ref())?;
            set(state, menu, &ids, &properties(command))
        }
    }
}

fn properties(command: &Command) -> Vec<(&str, &str)> {
    command
        .named
        .iter()
        .filter_map(|named| match &named.value {
            Value::Text(text) => Some((named.key.as_str(), text.as_str())),
            Value::Find(_) => None,
        })
        .collect()
}

fn property<'a>(props: &[(&str, &'a str)], key: &str) -> Option<&'a str> {
    props.iter().rev().find(|(k, _)| *k == key).map(|(_, v)| *v)
}

fn parse_bool(key: &str, value: &str) -> Result<bool, String> {
    match value {
        "yes" | "true" => Ok(true),
        "no" | "false" => Ok(false),
        _ => Err(format!("invalid value for argument {key}")),
    }
}

/// RouterOS shows a single IPv4 host without its `/32`.
fn normalize_address(address: &str) -> String {
    address.strip_suffix("/32").unwrap_or(address).to_string()
}

/// RouterOS stores a queue target host with an explicit `/32`.
fn normalize_target(target: &str) -> String {
    target
        .split(',')
        .map(|part| {
            let part = part.trim();
            if part.contains('/')
                || part.contains(':')
                || part.parse::<std::net::Ipv4Addr>().is_err()
            {
                part.to_string()
            } else {
                format!("{part}/32")
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn valid_address(address: &str) -> bool {
    !address.is_empty()
        && address
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ".:/-_".contains(c))
}

fn valid_rate_pair(value: &str) -> bool {
    fn rate(text: &str) -> bool {
        let digits = text.trim_end_matches(['k', 'M', 'G']);
        text.len() - digits.len() <= 1
            && !digits.is_empty()
            && digits.chars().all(|c| c.is_ascii_digit() || c == '.')
            && digits.parse::<f64>().is_ok()
    }
    match value.split_once('/') {
        Some((upload, download)) => rate(upload) && rate(download),
        None => rate(value),
    }
}

fn missing(names: &[&str]) -> Result<(), String> {
    if names.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "missing value(s) of argument(s) {}",
            names.join(", ")
        ))
    }
}

fn add(state: &mut RouterState, menu: Menu, props: &[(&str, &str)]) -> Result<String, String> {
    let disabled = match property(props, "disabled") {
        Some(value) => parse_bool("disabled", value)?,
        None => false,
    };
    let comment = property(props, "comment").unwrap_or_default().to_string();
    match menu {
        Menu::AddressList => {
            let list = property(props, "list").filter(|v| !v.is_empty());
            let address = property(props, "address").filter(|v| !v.is_empty());
            let (Some(list), Some(address)) = (list, address) else {
                let mut names = Vec::new();
                if list.is_none() {
                    names.push("list");
                }
                if address.is_none() {
                    names.push("address");
                }
                missing(&names)?;
                return Ok(String::new());
            };
            if !valid_address(address) {
                return Err("invalid value for argument address".to_string());
            }
            let address = normalize_address(address);
            if state
                .address_list
                .iter()
                .any(|e| e.list == list && e.address == address)
            {
                return Err("failure: already have such entry".to_string());
            }
            let id = state.allocate_id();
            state.address_list.push(AddressListEntry {
                id,
                list: list.to_string(),
                address,
                comment,
                disabled,
            });
        }
        Menu::SimpleQueue => {
            let Some(target) = property(props, "target").filter(|v| !v.is_empty()) else {
                missing(&["target"])?;
                return Ok(String::new());
            };
            if !target.split(',').all(|part| valid_address(part.trim())) {
                return Err("invalid value for argument target".to_string());
            }
            let max_limit = property(props, "max-limit").unwrap_or("0/0");
            if !valid_rate_pair(max_limit) {
                return Err("invalid value for argument max-limit".to_string());
            }
            let id = state.allocate_id();
            let name = match property(props, "name") {
                Some(name) if !name.is_empty() => name.to_string(),
                // RouterOS names unnamed queues `queue1`, `queue2`, ...
                _ => format!("queue{}", state.queues.len() + 1),
            };
            if state.queues.iter().any(|q| q.name == name) {
                return Err("failure: already have such entry".to_string());
            }
            state.queues.push(SimpleQueue {
                id,
                name,
                target: normalize_target(target),
                max_limit: max_limit.to_string(),
                comment,
                disabled,
            });
        }
        Menu::Identity => {}
    }
    Ok(String::new())
}

fn set(
    state: &mut RouterState,
    menu: Menu,
    ids: &[u32],
    props: &[(&str, &str)],
) -> Result<String, String> {
    let disabled = property(props, "disabled")
        .map(|value| parse_bool("disabled", value))
        .transpose()?;
    match menu {
        Menu::AddressList => {
            if let Some(address) = property(props, "address")
                && !valid_address(address)
            {
                return Err("invalid value for argument address".to_string());
            }
            // Check every change before applying any, so a failing `set` changes nothing.
            let mut updated = state.address_list.clone();
            for entry in updated.iter_mut().filter(|e| ids.contains(&e.id)) {
                if let Some(list) = property(props, "list") {
                    entry.list = list.to_string();
                }
                if let Some(address) = property(props, "address") {
                    entry.address = normalize_address(address);
                }
                if let Some(comment) = property(props, "comment") {
                    entry.comment = comment.to_string();
                }
                if let Some(disabled) = disabled {
                    entry.disabled = disabled;
                }
            }
            for (index, entry) in updated.iter().enumerate() {
                if updated[..index]
                    .iter()
                    .any(|e| e.list == entry.list && e.address == entry.address)
                {
                    return Err("failure: already have such entry".to_string());
                }
            }
            state.address_list = updated;
        }
        Menu::SimpleQueue => {
            if let Some(limit) = property(props, "max-limit")
                && !valid_rate_pair(limit)
            {
                return Err("invalid value for argument max-limit".to_string());
            }
            let mut updated = state.queues.clone();
            for queue in updated.iter_mut().filter(|q| ids.contains(&q.id)) {
                if let Some(name) = property(props, "name") {
                    queue.name = name.to_string();
                }
                if let Some(target) = property(props, "target") {
                    queue.target = normalize_target(target);
                }
                if let Some(limit) = property(props, "max-limit") {
                    queue.max_limit = limit.to_string();
                }
                if let Some(comment) = property(props, "comment") {
                    queue.comment = comment.to_string();
                }
                if let Some(disabled) = disabled {
                    queue.disabled = disabled;
                }
            }
            for (index, queue) in updated.iter().enumerate() {
                if updated[..index].iter().any(|q| q.name == queue.name) {
                    return Err("failure: already have such entry".to_string());
                }
            }
            state.queues = updated;
        }
        Menu::Identity => {}
    }
    Ok(String::new())
}

/// The ids (in table order) an item list names. `[find ...]` matching nothing is an empty
/// list, not an error; a number, `*id` or name that names nothing is `no such item`.
fn resolve_items(
    state: &RouterState,
    menu: Menu,
    items: Option<&Value>,
) -> Result<Vec<u32>, String> {
    let ids: Vec<(u32, String)> = match menu {
        Menu::AddressList => state
            .address_list
            .iter()
            .map(|e| (e.id, String::new()))
            .collect(),
        _ => state
            .queues
            .iter()
            .map(|q| (q.id, q.name.clone()))
            .collect(),
    };
    match items {
        None => Err("missing value(s) of argument(s) numbers".to_string()),
        Some(Value::Find(find)) => Ok(find_ids(state, find)),
        Some(Value::Text(text)) => {
            let mut found = Vec::new();
            for item in text.split(',').map(str::trim) {
                let id = if let Some(hex) = item.strip_prefix('*') {
                    u32::from_str_radix(hex, 16)
                        .ok()
                        .filter(|id| ids.iter().any(|(known, _)| known == id))
                } else if let Ok(index) = item.parse::<usize>() {
                    ids.get(index).map(|(id, _)| *id)
                } else {
                    ids.iter()
                        .find(|(_, name)| !name.is_empty() && name == item)
                        .map(|(id, _)| *id)
                };
                match id {
                    Some(id) => found.push(id),
                    None => return Err("no such item".to_string()),
                }
            }
            Ok(found)
        }
    }
}

fn find_ids(state: &RouterState, find: &Command) -> Vec<u32> {
    match find.menu {
        Menu::AddressList => state
            .address_list
            .iter()
            .filter(|e| matches_address_entry(e, &find.conditions))
            .map(|e| e.id)
            .collect(),
        Menu::SimpleQueue => state
            .queues
            .iter()
            .filter(|q| matches_queue(q, &find.conditions))
            .map(|q| q.id)
            .collect(),
        Menu::Identity => Vec::new(),
    }
}

fn yes_no(flag: bool) -> &'static str {
    if flag { "yes" } else { "no" }
}

fn matches_address_entry(entry: &AddressListEntry, conditions: &[(String, String)]) -> bool {
    conditions.iter().all(|(key, want)| match key.as_str() {
        "list" => entry.list == *want,
        "address" => entry.address == normalize_address(want),
        "comment" => entry.comment == *want,
        "disabled" => yes_no(entry.disabled) == want || entry.disabled.to_string() == *want,
        _ => false,
    })
}

fn matches_queue(queue: &SimpleQueue, conditions: &[(String, String)]) -> bool {
    conditions.iter().all(|(key, want)| match key.as_str() {
        "name" => queue.name == *want,
        "target" => queue.target == normalize_target(want),
        "max-limit" => queue.max_limit == *want,
        "comment" => queue.comment == *want,
        "disabled" => yes_no(queue.disabled) == want || queue.disabled.to_string() == *want,
        _ => false,
    })
}

fn quote_if_needed(value: &str) -> String {
    if !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_./:-".contains(c))
    {
        value.to_string()
    } else {
        let mut out = String::from("\"");
        for c in value.chars() {
            match c {
                '"' | '\\' | '$' | '?' => {
                    out.push('\\');
                    out.push(c);
                }
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                c => out.push(c),
            }
        }
        out.push('"');
        out
    }
}

fn print(state: &RouterState, menu: Menu, command: &Command) -> String {
    let count_only = command.flags.iter().any(|f| f == "count-only");
    // `terse`: one line of key=value words per entry, what scripts (and `[state]`) read.
    let terse = command.flags.iter().any(|f| f == "terse");
    match menu {
        Menu::AddressList => {
            let rows: Vec<(usize, &AddressListEntry)> = state
                .address_list
                .iter()
                .enumerate()
                .filter(|(_, e)| matches_address_entry(e, &command.conditions))
                .collect();
            if count_only {
                return rows.len().to_string();
            }
            if terse {
                return rows
                    .iter()
                    .map(|(index, e)| {
                        let flag = if e.disabled { 'X' } else { ' ' };
                        let mut line = format!(
                            "{index:>2} {flag} list={} address={}",
                            quote_if_needed(&e.list),
                            e.address
                        );
                        if !e.comment.is_empty() {
                            line.push_str(&format!(" comment={}", quote_if_needed(&e.comment)));
                        }
                        line
                    })
                    .collect::<Vec<_>>()
                    .join("\n");
            }
            let list_width = rows
                .iter()
                .map(|(_, e)| e.list.chars().count())
                .max()
                .unwrap_or(0)
                .max(4);
            let address_width = rows
                .iter()
                .map(|(_, e)| e.address.chars().count())
                .max()
                .unwrap_or(0)
                .max(7);
            let mut lines = vec![
                "Flags: X - disabled, D - dynamic".to_string(),
                format!(
                    " #   {:list_width$}  {:address_width$}  COMMENT",
                    "LIST", "ADDRESS"
                )
                .trim_end()
                .to_string(),
            ];
            for (index, entry) in rows {
                let flag = if entry.disabled { 'X' } else { ' ' };
                lines.push(
                    format!(
                        "{index:>2} {flag}  {:list_width$}  {:address_width$}  {}",
                        entry.list, entry.address, entry.comment
                    )
                    .trim_end()
                    .to_string(),
                );
            }
            lines.join("\n")
        }
        Menu::SimpleQueue => {
            let rows: Vec<(usize, &SimpleQueue)> = state
                .queues
                .iter()
                .enumerate()
                .filter(|(_, q)| matches_queue(q, &command.conditions))
                .collect();
            if count_only {
                return rows.len().to_string();
            }
            if terse {
                return rows
                    .iter()
                    .map(|(index, q)| {
                        let flag = if q.disabled { 'X' } else { ' ' };
                        let mut line = format!(
                            "{index:>2} {flag} name={} target={} max-limit={}",
                            quote_if_needed(&q.name),
                            q.target,
                            q.max_limit
                        );
                        if !q.comment.is_empty() {
                            line.push_str(&format!(" comment={}", quote_if_needed(&q.comment)));
                        }
                        line
                    })
                    .collect::<Vec<_>>()
                    .join("\n");
            }
            let mut lines = vec!["Flags: X - disabled, I - invalid, D - dynamic".to_string()];
            for (index, queue) in rows {
                let flag = if queue.disabled { 'X' } else { ' ' };
                let mut prefix = format!("{index:>2} {flag}   ");
                if !queue.comment.is_empty() {
                    lines.push(format!("{prefix};;; {}", queue.comment));
                    prefix = " ".repeat(prefix.len());
                }
                lines.push(format!(
                    "{prefix}name={} target={} max-limit={}",
                    quote_if_needed(&queue.name),
                    queue.target,
                    queue.max_limit
                ));
            }
            lines.join("\n")
        }
        Menu::Identity => format!("  name: {}", state.identity),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_all(state: &mut RouterState, lines: &[&str]) -> Vec<String> {
        lines.iter().map(|line| execute(state, line)).collect()
    }

    #[test]
    fn answers_table() {
        // Each case runs on a fresh state after the setup lines; only the last answer is checked.
        let setup = [
            "/ip firewall address-list add list=negbal address=10.88.0.15 comment=crb_10.88.0.15",
            "/queue simple add name=crb_10.88.0.15 target=10.88.0.15/32 max-limit=10M/10M comment=crb_10.88.0.15",
        ];
        let cases: &[(&str, &str)] = &[
            (
                "/ip firewall address-list add list=negbal address=10.88.0.15",
                "failure: already have such entry",
            ),
            (
                "/ip firewall address-list add list=negbal address=10.88.0.15/32",
                "failure: already have such entry",
            ),
            (
                "/ip firewall address-list add list=other address=10.88.0.15",
                "",
            ),
            (
                "/ip firewall address-list add list=negbal",
                "missing value(s) of argument(s) address",
            ),
            (
                "/ip firewall address-list add list=negbal address=1.2.3.4 colour=red",
                "expected end of command (line 1 column 59)",
            ),
            (
                "/ip firewall address-list remove [find comment=nothing]",
                "",
            ),
            (
                "/ip firewall address-list remove [find list=negbal address=9.9.9.9]",
                "",
            ),
            ("/ip firewall address-list remove numbers=5", "no such item"),
            ("/ip firewall address-list remove 5", "no such item"),
            ("/ip firewall address-list remove *ff", "no such item"),
            (
                "/ip firewall address-list remove",
                "missing value(s) of argument(s) numbers",
            ),
            ("/ip firewall address-list remove 0", ""),
            (
                "/queue simple add name=crb_10.88.0.15 target=10.88.0.15",
                "failure: already have such entry",
            ),
            (
                "/queue simple add name=q2 target=10.0.0.2 max-limit=fast",
                "invalid value for argument max-limit",
            ),
            (
                "/queue simple set [find name=crb_10.88.0.15] max-limit=5M/5M",
                "",
            ),
            ("/queue simple set [find name=nobody] max-limit=5M/5M", ""),
            ("/queue simple remove crb_10.88.0.15", ""),
            ("/queue simple remove nobody", "no such item"),
            ("/system identity print", "  name: sim"),
            ("/system reset", "bad command name reset (line 1 column 9)"),
            (
                "/interface print",
                "bad command name interface (line 1 column 2)",
            ),
            ("/ip/firewall/address-list/print count-only", "1"),
            (
                "/ip firewall address-list",
                "expected command name (line 1 column 26)",
            ),
            (
                "/ip firewall address-list add list=a address=\"1.2.3.4",
                "syntax error (line 1 column 54)",
            ),
            (
                "/ip firewall address-list add list=a address=$x",
                "syntax error (line 1 column 46)",
            ),
            (
                "/ip firewall address-list add list=a comment=\"$x\" address=1.1.1.1",
                "syntax error (line 1 column 47)",
            ),
            (
                "/ip firewall address-list remove [/system reset]",
                "bad command name reset (line 1 column 43)",
            ),
            ("", ""),
            ("# just a comment", ""),
        ];
        for (line, want) in cases {
            let mut state = RouterState::new("sim");
            run_all(&mut state, &setup);
            assert_eq!(execute(&mut state, line), *want, "line {line:?}");
        }
    }

    #[test]
    fn quoted_semicolon_stays_inside_the_value() {
        let mut state = RouterState::new("sim");
        let answer = execute(
            &mut state,
            r#"/ip firewall address-list add list=a address=1.2.3.4 comment="x; /system reset""#,
        );
        assert_eq!(answer, "");
        assert_eq!(state.address_list.len(), 1);
        assert_eq!(state.address_list[0].comment, "x; /system reset");
        assert_eq!(state.identity, "sim");
    }

    #[test]
    fn escapes_in_quoted_values() {
        let cases: &[(&str, &str)] = &[
            (r#""a\"b""#, "a\"b"),
            (r#""a\\b""#, "a\\b"),
            (r#""\$(reboot)""#, "$(reboot)"),
            (r#""what\?""#, "what?"),
            (r#""a\n/system reset""#, "a\n/system reset"),
            (r#""a\r\tb""#, "a\r\tb"),
            (r#""[/system reboot]""#, "[/system reboot]"),
            (r#""a=b""#, "a=b"),
            (r#""""#, ""),
            (r#""Иван""#, "Иван"),
            (r#""\41\_b""#, "A b"),
        ];
        for (quoted, want) in cases {
            let mut state = RouterState::new("sim");
            let line =
                format!("/ip firewall address-list add list=a address=1.2.3.4 comment={quoted}");
            assert_eq!(execute(&mut state, &line), "", "line {line:?}");
            assert_eq!(state.address_list[0].comment, *want, "line {line:?}");
        }
    }

    #[test]
    fn unquoted_semicolon_runs_two_commands() {
        let mut state = RouterState::new("sim");
        let answer = execute(
            &mut state,
            "/ip firewall address-list add list=a address=1.1.1.1; /queue simple add name=q target=1.1.1.1 max-limit=1M/1M",
        );
        assert_eq!(answer, "");
        assert_eq!(state.address_list.len(), 1);
        assert_eq!(state.queues.len(), 1);
        assert_eq!(state.queues[0].target, "1.1.1.1/32");
    }

    #[test]
    fn first_failure_stops_the_line_and_syntax_errors_run_nothing() {
        let mut state = RouterState::new("sim");
        execute(
            &mut state,
            "/ip firewall address-list add list=a address=1.1.1.1",
        );
        let answer = execute(
            &mut state,
            "/ip firewall address-list add list=a address=1.1.1.1; /ip firewall address-list add list=a address=2.2.2.2",
        );
        assert_eq!(answer, "failure: already have such entry");
        assert_eq!(state.address_list.len(), 1);

        let answer = execute(
            &mut state,
            "/ip firewall address-list add list=a address=3.3.3.3; /ip firewall address-list add list=a address=\"",
        );
        assert!(answer.starts_with("syntax error"), "{answer}");
        assert_eq!(state.address_list.len(), 1);
    }

    #[test]
    fn remove_by_find_variants() {
        let setup = [
            "/ip firewall address-list add list=a address=1.1.1.1 comment=c1",
            "/ip firewall address-list add list=b address=1.1.1.1 comment=c1",
            "/ip firewall address-list add list=a address=2.2.2.2 comment=c2",
        ];
        let cases: &[(&str, &[&str])] = &[
            ("remove [find comment=c1]", &["2.2.2.2"]),
            ("remove [find list=a comment=c1]", &["1.1.1.1", "2.2.2.2"]),
            ("remove [find address=1.1.1.1]", &["2.2.2.2"]),
            (
                "remove [find list=b address=1.1.1.1/32]",
                &["1.1.1.1", "2.2.2.2"],
            ),
            (
                "remove [find where list=a and comment=c2]",
                &["1.1.1.1", "1.1.1.1"],
            ),
            ("remove [find]", &[]),
            ("remove numbers=0,2", &["1.1.1.1"]),
        ];
        for (command, remaining) in cases {
            let mut state = RouterState::new("sim");
            run_all(&mut state, &setup);
            let line = format!("/ip firewall address-list {command}");
            assert_eq!(execute(&mut state, &line), "", "{line}");
            let left: Vec<&str> = state
                .address_list
                .iter()
                .map(|e| e.address.as_str())
                .collect();
            assert_eq!(left, *remaining, "{line}");
        }
    }

    #[test]
    fn print_tables() {
        let mut state = RouterState::new("sim");
        run_all(
            &mut state,
            &[
                "/ip firewall address-list add list=negbal address=10.88.0.15 comment=crb_10.88.0.15",
                "/ip firewall address-list add list=blocked address=10.0.0.2 disabled=yes",
                "/queue simple add name=crb_10.88.0.15 target=10.88.0.15 max-limit=10M/10M comment=crb",
                "/queue simple set [find comment=crb] max-limit=20M/20M",
            ],
        );
        assert_eq!(
            execute(&mut state, "/ip firewall address-list print"),
            "Flags: X - disabled, D - dynamic\n \
             #   LIST     ADDRESS     COMMENT\n \
             0    negbal   10.88.0.15  crb_10.88.0.15\n \
             1 X  blocked  10.0.0.2"
        );
        assert_eq!(
            execute(
                &mut state,
                "/ip firewall address-list print where address=10.0.0.2"
            ),
            "Flags: X - disabled, D - dynamic\n \
             #   LIST     ADDRESS   COMMENT\n \
             1 X  blocked  10.0.0.2"
        );
        assert_eq!(
            execute(&mut state, "/queue simple print"),
            concat!(
                "Flags: X - disabled, I - invalid, D - dynamic\n",
                " 0     ;;; crb\n",
                "       name=crb_10.88.0.15 target=10.88.0.15/32 max-limit=20M/20M",
            )
        );
    }

    #[test]
    fn print_terse_is_one_line_of_words_per_entry() {
        let mut state = RouterState::new("sim");
        run_all(
            &mut state,
            &[
                "/ip firewall address-list add list=allowed address=10.0.0.1 comment=crb_10.0.0.1",
                "/ip firewall address-list add list=negbal address=10.0.0.2 disabled=yes",
                "/queue simple add name=crb_10.0.0.1 target=10.0.0.1 max-limit=10M/10M comment=\"a b\"",
            ],
        );
        assert_eq!(
            execute(&mut state, "/ip firewall address-list print terse"),
            " 0   list=allowed address=10.0.0.1 comment=crb_10.0.0.1\n 1 X list=negbal address=10.0.0.2"
        );
        assert_eq!(
            execute(
                &mut state,
                "/queue simple print terse where target=10.0.0.1/32"
            ),
            " 0   name=crb_10.0.0.1 target=10.0.0.1/32 max-limit=10M/10M comment=\"a b\""
        );
    }

    #[test]
    fn identity_set_changes_print() {
        let mut state = RouterState::new("sim");
        assert_eq!(execute(&mut state, "/system identity set name=core-1"), "");
        assert_eq!(
            execute(&mut state, "/system identity print"),
            "  name: core-1"
        );
    }

    #[test]
    fn session_limits_are_per_protocol() {
        let device = Device::new("sim");
        let first = device.try_open_session(Protocol::Ssh, 1);
        assert!(first.is_some());
        assert!(device.try_open_session(Protocol::Ssh, 1).is_none());
        let telnet = device.try_open_session(Protocol::Telnet, 1);
        assert!(telnet.is_some());
        let counters = device.counters();
        assert_eq!(counters.sessions_opened, 2);
        assert_eq!(counters.sessions_refused, 1);
        assert_eq!(counters.live_sessions, 2);
        drop(first);
        drop(telnet);
        let counters = device.counters();
        assert_eq!(counters.live_sessions, 0);
        assert_eq!(counters.max_concurrent_sessions, 2);
        assert!(device.try_open_session(Protocol::Ssh, 1).is_some());
    }

    #[test]
    fn snapshot_shows_state_and_counters() {
        let device = Device::new("sim");
        device.execute("/ip firewall address-list add list=a address=1.2.3.4 comment=c");
        let snapshot = device.snapshot();
        assert_eq!(snapshot["identity"], "sim");
        assert_eq!(snapshot["address_list"][0]["address"], "1.2.3.4");
        assert_eq!(snapshot["address_list"][0]["comment"], "c");
        assert_eq!(snapshot["counters"]["commands_executed"], 1);
    }
}
