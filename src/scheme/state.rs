//! `[state]` of a scheme (pure): how to read what a NAS holds, how an account's
//! variables say what it should hold, and the comparison of the two (`nasd reconcile`).
//!
//! ```toml
//! [state]
//! key = "{{ ip }}"                 # what names an account in the NAS's entries
//!
//! [[state.read]]
//! command = "/ip firewall address-list print terse"
//! [[state.read.fact]]
//! fact = "allowed"
//! where = { list = "^allowed$" }   # key=value words of a line (RouterOS terse, API)
//! key = "address"                  # the word holding the account key
//!
//! [state.facts.allowed]
//! expect = "{{ not (blocked | default(false) | truthy) }}"
//! missing = "user_accept"          # expected, the NAS lacks it
//! extra = "user_drop"              # the NAS has it, not expected
//! ```
//!
//! A read rule either names words (`where`, `key`, `key_regex`, `value`) or matches the
//! whole line with `line`, a regex with the named groups `key` and optionally `value`
//! (`ipset save`, `show sessions`). A fact without `value` is a flag: present or not.
//! An `expect` template renders to `true`/`yes`/`1`/`on` (present), `false`/`no`/`0`/
//! `off`/`none`/empty (absent) or any other text (the value the NAS should hold).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use minijinja::value::Value;
use minijinja::{Environment, UndefinedBehavior};
use serde::Deserialize;

use crate::model::Vars;
use crate::scheme::Dialect;

/// How long one state command may take when `[state] timeout` is not set: a NAS
/// printing 10,000 entries takes seconds, not the per-command timeout of an event.
pub const DEFAULT_STATE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    key: String,
    timeout: Option<String>,
    read: Vec<ReadFile>,
    facts: BTreeMap<String, FactFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReadFile {
    command: String,
    fact: Vec<RuleFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    fact: String,
    #[serde(default, rename = "where")]
    where_: BTreeMap<String, String>,
    key: Option<String>,
    key_regex: Option<String>,
    value: Option<String>,
    line: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FactFile {
    expect: String,
    missing: Option<String>,
    extra: Option<String>,
    differs: Option<String>,
    #[serde(default)]
    compare: Compare,
}

/// How a fact's values are compared.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compare {
    /// As text.
    #[default]
    Text,
    /// Rates such as `10M/10M`, `10000k/10000k` and `10000000/10000000` are equal
    /// (RouterOS prints its own units; k = 1000).
    Bitrate,
}

/// How one answer line becomes a fact of an account.
#[derive(Debug, Clone)]
pub enum Matcher {
    /// `key=value` words: each `where` word must be there and match; the key (and the
    /// value) come from named words.
    Words {
        conditions: Vec<(String, regex::Regex)>,
        key: String,
        key_regex: Option<regex::Regex>,
        value: Option<String>,
    },
    /// A regex over the whole line with the groups `key` and optionally `value`.
    Line(regex::Regex),
}

#[derive(Debug, Clone)]
pub struct Rule {
    pub fact: String,
    pub matcher: Matcher,
}

/// One command that prints (part of) the NAS's state, and the rules for its lines.
#[derive(Debug, Clone)]
pub struct Read {
    pub command: String,
    pub rules: Vec<Rule>,
}

/// A fact an account should have, and the cmds that fix each kind of difference.
#[derive(Debug, Clone)]
pub struct Fact {
    pub name: String,
    pub expect: String,
    pub missing: Option<String>,
    pub extra: Option<String>,
    pub differs: Option<String>,
    pub compare: Compare,
    /// Whether a read rule gives it a value (otherwise it is a flag).
    pub valued: bool,
}

/// The parsed `[state]` section.
pub struct StateSpec {
    pub key: String,
    pub timeout: std::time::Duration,
    pub reads: Vec<Read>,
    pub facts: Vec<Fact>,
    env: Environment<'static>,
}

impl fmt::Debug for StateSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StateSpec")
            .field("key", &self.key)
            .field("reads", &self.reads)
            .field("facts", &self.facts)
            .finish()
    }
}

const KEY_TEMPLATE: &str = "key";

fn expect_template(fact: &str) -> String {
    format!("facts.{fact}.expect")
}

impl StateSpec {
    /// Parses and checks `[state]`: every template compiles, every regex is valid,
    /// every read rule names a declared fact, every fix cmd is one the scheme defines.
    pub fn parse(
        raw: toml::Value,
        _dialect: Dialect,
        defined: impl Fn(&str) -> bool,
    ) -> Result<StateSpec, String> {
        let file: StateFile = raw
            .try_into()
            .map_err(|e: toml::de::Error| e.message().trim().to_string())?;
        let timeout = match &file.timeout {
            None => DEFAULT_STATE_TIMEOUT,
            Some(t) => crate::duration::parse_duration(t).map_err(|e| format!("timeout: {e}"))?,
        };
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.add_filter("truthy", truthy);
        env.add_template_owned(KEY_TEMPLATE.to_string(), file.key.clone())
            .map_err(|e| format!("key: {}", template_message(&e)))?;
        if file.read.is_empty() {
            return Err("needs at least one [[state.read]]".to_string());
        }
        let mut valued: BTreeSet<String> = BTreeSet::new();
        let mut reads = Vec::new();
        for (index, read) in file.read.into_iter().enumerate() {
            let at = format!("read[{index}]");
            if read.command.trim().is_empty() {
                return Err(format!("{at}: command is empty"));
            }
            if read.fact.is_empty() {
                return Err(format!("{at}: needs at least one [[state.read.fact]]"));
            }
            let mut rules = Vec::new();
            for (r, rule) in read.fact.into_iter().enumerate() {
                let at = format!("{at}.fact[{r}]");
                if !file.facts.contains_key(&rule.fact) {
                    return Err(format!(
                        "{at}: fact {} is not declared in [state.facts]",
                        rule.fact
                    ));
                }
                let matcher = rule_matcher(&at, &rule)?;
                let gives_value = match &matcher {
                    Matcher::Words { value, .. } => value.is_some(),
                    Matcher::Line(re) => re.capture_names().any(|n| n == Some("value")),
                };
                if gives_value {
                    valued.insert(rule.fact.clone());
                }
                rules.push(Rule {
                    fact: rule.fact,
                    matcher,
                });
            }
            reads.push(Read {
                command: read.command,
                rules,
            });
        }
        let mut facts = Vec::new();
        for (name, fact) in file.facts {
            let at = format!("facts.{name}");
            env.add_template_owned(expect_template(&name), fact.expect.clone())
                .map_err(|e| format!("{at}.expect: {}", template_message(&e)))?;
            for (what, cmd) in [
                ("missing", &fact.missing),
                ("extra", &fact.extra),
                ("differs", &fact.differs),
            ] {
                if let Some(cmd) = cmd
                    && !defined(cmd)
                {
                    return Err(format!(
                        "{at}.{what}: cmd {cmd} has no template in [commands]"
                    ));
                }
            }
            if !reads
                .iter()
                .any(|r| r.rules.iter().any(|rule| rule.fact == name))
            {
                return Err(format!("{at}: no [[state.read.fact]] reads it"));
            }
            facts.push(Fact {
                valued: valued.contains(&name),
                name,
                expect: fact.expect,
                missing: fact.missing,
                extra: fact.extra,
                differs: fact.differs,
                compare: fact.compare,
            });
        }
        Ok(StateSpec {
            key: file.key,
            timeout,
            reads,
            facts,
            env,
        })
    }

    /// The commands that read the state, in order.
    pub fn commands(&self) -> Vec<String> {
        self.reads.iter().map(|r| r.command.clone()).collect()
    }

    /// The answers of [`StateSpec::commands`] (same order) -> the facts per key.
    pub fn parse_answers(&self, answers: &[String]) -> NasState {
        let mut state = NasState::default();
        for (read, answer) in self.reads.iter().zip(answers) {
            for line in answer.lines() {
                let line = line.trim_end_matches('\r');
                if line.trim().is_empty() {
                    continue;
                }
                let words = OnceWords::new(line);
                for rule in &read.rules {
                    if let Some((key, value)) = rule.matcher.apply(line, &words) {
                        state.add(&key, &rule.fact, value);
                    }
                }
            }
            state.lines += answer.lines().count();
        }
        state
    }

    /// What an account with `vars` should have: its key and each fact (None: absent).
    pub fn expected(&self, vars: &Vars) -> Result<Expected, String> {
        let ctx = Value::from_serialize(vars);
        let key = self
            .env
            .get_template(KEY_TEMPLATE)
            .and_then(|t| t.render(&ctx))
            .map_err(|e| format!("key: {}", template_message(&e)))?
            .trim()
            .to_string();
        let mut facts = BTreeMap::new();
        for fact in &self.facts {
            let text = self
                .env
                .get_template(&expect_template(&fact.name))
                .and_then(|t| t.render(&ctx))
                .map_err(|e| format!("facts.{}.expect: {}", fact.name, template_message(&e)))?;
            facts.insert(fact.name.clone(), expectation(&text));
        }
        Ok(Expected { key, facts })
    }

    /// Compares the NAS's state with the accounts' expected state. `accounts` are the
    /// accounts compared (all of the NAS, or one); `whole_nas` says whether entries
    /// that belong to no account are to be reported (not when one account is asked).
    pub fn compare(
        &self,
        nas: &NasState,
        accounts: &[AccountExpectation],
        whole_nas: bool,
    ) -> Comparison {
        let mut out = Comparison::default();
        let mut by_key: BTreeMap<&str, Vec<i64>> = BTreeMap::new();
        for account in accounts {
            match &account.expected {
                Ok(e) if !e.key.is_empty() => by_key
                    .entry(e.key.as_str())
                    .or_default()
                    .push(account.user_id),
                Ok(_) => out.problems.push(Problem {
                    user_id: Some(account.user_id),
                    message: "its key renders empty (no address?): not compared".to_string(),
                }),
                Err(message) => out.problems.push(Problem {
                    user_id: Some(account.user_id),
                    message: format!("expected state not computed: {message}"),
                }),
            }
        }
        for (key, users) in &by_key {
            if users.len() > 1 {
                out.problems.push(Problem {
                    user_id: None,
                    message: format!(
                        "key {key} belongs to {} accounts ({}): not compared",
                        users.len(),
                        users
                            .iter()
                            .map(|u| u.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                });
            }
        }
        let empty = BTreeMap::new();
        for account in accounts {
            let Ok(expected) = &account.expected else {
                continue;
            };
            if expected.key.is_empty()
                || by_key
                    .get(expected.key.as_str())
                    .is_some_and(|u| u.len() > 1)
            {
                continue;
            }
            out.compared += 1;
            let held = nas.entries.get(&expected.key).unwrap_or(&empty);
            for fact in &self.facts {
                let want = expected.facts.get(&fact.name).cloned().flatten();
                let have = held.get(&fact.name);
                let kind = match (&want, have) {
                    (None, None) => continue,
                    (Some(_), None) => Kind::Missing,
                    (None, Some(_)) => Kind::Extra,
                    (Some(w), Some(h)) => {
                        if h.len() == 1 && same(fact, w, &h[0]) {
                            continue;
                        }
                        Kind::Differs
                    }
                };
                let fix = match kind {
                    Kind::Missing => fact.missing.clone(),
                    Kind::Extra => fact.extra.clone(),
                    Kind::Differs => fact.differs.clone(),
                };
                out.differences.push(Difference {
                    user_id: account.user_id,
                    key: expected.key.clone(),
                    fact: fact.name.clone(),
                    kind,
                    expected: want,
                    found: have.map(|h| h.join(", ")),
                    fix,
                });
            }
        }
        if whole_nas {
            for (key, facts) in &nas.entries {
                if !by_key.contains_key(key.as_str()) {
                    out.strays.push(Stray {
                        key: key.clone(),
                        facts: facts.keys().cloned().collect(),
                    });
                }
            }
        }
        out
    }
}

fn rule_matcher(at: &str, rule: &RuleFile) -> Result<Matcher, String> {
    let regex = |what: &str, p: &str| {
        regex::Regex::new(p).map_err(|e| format!("{at}.{what}: bad regex `{p}`: {e}"))
    };
    match (&rule.line, &rule.key) {
        (Some(_), Some(_)) => Err(format!("{at}: give either `line` or `key`, not both")),
        (None, None) => Err(format!(
            "{at}: needs `key` (the word holding the account key) or `line` (a regex with a `key` group)"
        )),
        (Some(line), None) => {
            if !rule.where_.is_empty() || rule.key_regex.is_some() || rule.value.is_some() {
                return Err(format!(
                    "{at}: `line` takes its key and value from its groups: drop `where`, `key_regex` and `value`"
                ));
            }
            let re = regex("line", line)?;
            if !re.capture_names().any(|n| n == Some("key")) {
                return Err(format!("{at}.line: the regex needs a group (?P<key>...)"));
            }
            Ok(Matcher::Line(re))
        }
        (None, Some(key)) => {
            let conditions = rule
                .where_
                .iter()
                .map(|(word, p)| regex(&format!("where.{word}"), p).map(|re| (word.clone(), re)))
                .collect::<Result<Vec<_>, _>>()?;
            let key_regex = match &rule.key_regex {
                None => None,
                Some(p) => {
                    let re = regex("key_regex", p)?;
                    if re.captures_len() < 2 {
                        return Err(format!(
                            "{at}.key_regex: the regex needs a group: the key is its first group"
                        ));
                    }
                    Some(re)
                }
            };
            Ok(Matcher::Words {
                conditions,
                key: key.clone(),
                key_regex,
                value: rule.value.clone(),
            })
        }
    }
}

/// A line's `key=value` words, split on first use.
struct OnceWords<'a> {
    line: &'a str,
    words: std::cell::OnceCell<BTreeMap<String, String>>,
}

impl<'a> OnceWords<'a> {
    fn new(line: &'a str) -> Self {
        OnceWords {
            line,
            words: std::cell::OnceCell::new(),
        }
    }

    fn get(&self) -> &BTreeMap<String, String> {
        self.words.get_or_init(|| words(self.line))
    }
}

/// `key=value` words of a line as RouterOS prints them (`print terse`, API replies):
/// values may be double-quoted with backslash escapes; words without `=` are skipped
/// (item numbers, flags).
pub fn words(line: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut chars = line.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            break;
        }
        // API replies name their words `=name=value`: that first `=` is not a name.
        if chars.peek() == Some(&'=') {
            chars.next();
        }
        let mut name = String::new();
        let mut has_eq = false;
        while let Some(&c) = chars.peek() {
            if c.is_whitespace() {
                break;
            }
            chars.next();
            if c == '=' {
                has_eq = true;
                break;
            }
            name.push(c);
        }
        if !has_eq {
            continue;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => {
                        if let Some(n) = chars.next() {
                            value.push(n);
                        }
                    }
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                value.push(c);
                chars.next();
            }
        }
        if !name.is_empty() {
            out.insert(name, value);
        }
    }
    out
}

impl Matcher {
    fn apply(&self, line: &str, words: &OnceWords<'_>) -> Option<(String, Option<String>)> {
        match self {
            Matcher::Line(re) => {
                let caps = re.captures(line)?;
                let key = caps.name("key")?.as_str().to_string();
                let value = caps.name("value").map(|m| m.as_str().to_string());
                Some((key, value))
            }
            Matcher::Words {
                conditions,
                key,
                key_regex,
                value,
            } => {
                let words = words.get();
                for (word, re) in conditions {
                    if !words.get(word).is_some_and(|v| re.is_match(v)) {
                        return None;
                    }
                }
                let raw = words.get(key)?;
                let key = match key_regex {
                    None => raw.clone(),
                    Some(re) => re.captures(raw)?.get(1)?.as_str().to_string(),
                };
                let value = match value {
                    None => None,
                    Some(name) => Some(words.get(name)?.clone()),
                };
                Some((key, value))
            }
        }
    }
}

/// The `truthy` filter: billing flags arrive as booleans, numbers or text (a CSV
/// import makes `"0"` a string, which Jinja itself would call true).
fn truthy(value: Value) -> bool {
    if let Some(s) = value.as_str() {
        return matches!(
            s.trim().to_ascii_lowercase().as_str(),
            "1" | "true" | "yes" | "on" | "y" | "t"
        );
    }
    if let Ok(n) = f64::try_from(value.clone()) {
        return n != 0.0;
    }
    value.is_true()
}

/// What `expect` rendered to: None for absent, `yes` for a flag that is present.
fn expectation(text: &str) -> Option<String> {
    let t = text.trim();
    match t.to_ascii_lowercase().as_str() {
        "" | "false" | "no" | "0" | "off" | "none" => None,
        "true" | "yes" | "1" | "on" => Some(FLAG.to_string()),
        _ => Some(t.to_string()),
    }
}

/// The value of a flag fact (present).
pub const FLAG: &str = "yes";

fn same(fact: &Fact, want: &str, have: &str) -> bool {
    if !fact.valued {
        return true;
    }
    match fact.compare {
        Compare::Text => want == have,
        Compare::Bitrate => match (bitrate(want), bitrate(have)) {
            (Some(a), Some(b)) => a == b,
            _ => want == have,
        },
    }
}

/// `10M/5M`, `10000k/5000k`, `10000000` -> bits per second, each part.
pub fn bitrate(text: &str) -> Option<Vec<u64>> {
    text.split('/')
        .map(|part| {
            let part = part.trim();
            let (digits, unit) = match part
                .char_indices()
                .find(|(_, c)| !c.is_ascii_digit() && *c != '.')
            {
                Some((at, _)) => (&part[..at], &part[at..]),
                None => (part, ""),
            };
            let number: f64 = digits.parse().ok()?;
            let factor = match unit
                .to_ascii_lowercase()
                .trim_end_matches("bit")
                .trim_end_matches("bps")
            {
                "" => 1.0,
                "k" => 1e3,
                "m" => 1e6,
                "g" => 1e9,
                _ => return None,
            };
            Some((number * factor).round() as u64)
        })
        .collect()
}

fn template_message(e: &minijinja::Error) -> String {
    match e.detail() {
        Some(detail) => format!("{}: {detail}", e.kind()),
        None => e.to_string(),
    }
}

/// The facts found on the NAS: key -> fact -> values (one per entry; a flag's value is
/// `yes`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NasState {
    pub entries: BTreeMap<String, BTreeMap<String, Vec<String>>>,
    /// Lines read, for the report.
    pub lines: usize,
}

impl NasState {
    fn add(&mut self, key: &str, fact: &str, value: Option<String>) {
        self.entries
            .entry(key.to_string())
            .or_default()
            .entry(fact.to_string())
            .or_default()
            .push(value.unwrap_or_else(|| FLAG.to_string()));
    }

    /// Facts found, all keys together.
    pub fn facts(&self) -> usize {
        self.entries
            .values()
            .map(|f| f.values().map(Vec::len).sum::<usize>())
            .sum()
    }
}

/// An account's expected key and facts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected {
    pub key: String,
    pub facts: BTreeMap<String, Option<String>>,
}

/// One account to compare: its id and what [`StateSpec::expected`] gave.
#[derive(Debug, Clone)]
pub struct AccountExpectation {
    pub user_id: i64,
    pub expected: Result<Expected, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Expected, the NAS lacks it.
    Missing,
    /// The NAS has it, not expected.
    Extra,
    /// Both have it with different values (or the NAS has several entries).
    Differs,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Missing => "missing",
            Kind::Extra => "extra",
            Kind::Differs => "differs",
        })
    }
}

/// One fact of one account that the NAS does not hold as expected.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Difference {
    pub user_id: i64,
    pub key: String,
    pub fact: String,
    pub kind: Kind,
    pub expected: Option<String>,
    pub found: Option<String>,
    /// The cmd that fixes it (None: the scheme declares none for this kind).
    pub fix: Option<String>,
}

/// Entries on the NAS for a key that no account of the NAS has.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Stray {
    pub key: String,
    pub facts: Vec<String>,
}

/// An account that could not be compared, or a key shared by accounts.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Problem {
    pub user_id: Option<i64>,
    pub message: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Comparison {
    /// Accounts compared.
    pub compared: usize,
    pub differences: Vec<Difference>,
    pub strays: Vec<Stray>,
    pub problems: Vec<Problem>,
}

impl Comparison {
    /// The events that fix the differences: per account its cmds in the order of the
    /// facts, each cmd once.
    pub fn fixes(&self) -> Vec<(i64, String)> {
        let mut out: Vec<(i64, String)> = Vec::new();
        for d in &self.differences {
            if let Some(cmd) = &d.fix
                && !out.iter().any(|(u, c)| *u == d.user_id && c == cmd)
            {
                out.push((d.user_id, cmd.clone()));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROUTEROS: &str = r#"
key = "{{ ip }}"

[[read]]
command = "/ip firewall address-list print terse"
[[read.fact]]
fact = "allowed"
where = { list = "^allowed$", comment = "^crb_" }
key = "address"
[[read.fact]]
fact = "negbal"
where = { list = "^negbal$" }
key = "address"

[[read]]
command = "/queue simple print terse"
[[read.fact]]
fact = "rate"
where = { comment = "^crb_" }
key = "target"
key_regex = "^([^/]+)"
value = "max-limit"

[facts.allowed]
expect = "{{ not (blocked | default(false) | truthy) }}"
missing = "user_accept"
extra = "user_drop"

[facts.negbal]
expect = "{{ negbal | default(false) | truthy }}"
missing = "user_redirect"
extra = "user_redirect_cancel"

[facts.rate]
expect = "{% if rate_in | default(0) %}{{ rate_in }}k/{{ rate_out }}k{% endif %}"
missing = "user_rate_set"
extra = "user_rate_set_cancel"
differs = "user_rate_set"
compare = "bitrate"
"#;

    fn spec(text: &str) -> Result<StateSpec, String> {
        let raw: toml::Value = toml::from_str(text).map_err(|e| e.to_string())?;
        StateSpec::parse(raw, Dialect::Routeros, |cmd| cmd.starts_with("user_"))
    }

    fn vars(json: serde_json::Value) -> Vars {
        json.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn words_table() {
        let cases: &[(&str, &[(&str, &str)])] = &[
            (
                " 0   list=allowed address=10.0.0.1 comment=crb_10.0.0.1",
                &[
                    ("list", "allowed"),
                    ("address", "10.0.0.1"),
                    ("comment", "crb_10.0.0.1"),
                ],
            ),
            (
                " 1 X name=\"a b\\\"c\" target=10.0.0.2/32",
                &[("name", "a b\"c"), ("target", "10.0.0.2/32")],
            ),
            (
                "=.id=*1 =list=negbal =address=10.0.0.3",
                &[(".id", "*1"), ("list", "negbal"), ("address", "10.0.0.3")],
            ),
            (".id=*1 list=negbal", &[(".id", "*1"), ("list", "negbal")]),
            ("Flags: X - disabled", &[]),
            ("comment= list=x", &[("comment", ""), ("list", "x")]),
        ];
        for (line, want) in cases {
            let got = words(line);
            let want: BTreeMap<String, String> = want
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            assert_eq!(got, want, "{line}");
        }
    }

    #[test]
    fn bitrate_table() {
        let cases: &[(&str, Option<Vec<u64>>)] = &[
            ("10M/10M", Some(vec![10_000_000, 10_000_000])),
            ("10000k/5000k", Some(vec![10_000_000, 5_000_000])),
            ("1.5M/512k", Some(vec![1_500_000, 512_000])),
            ("10000000/10000000", Some(vec![10_000_000, 10_000_000])),
            ("10Mbit", Some(vec![10_000_000])),
            ("fast", None),
            ("10Q/1M", None),
        ];
        for (text, want) in cases {
            assert_eq!(&bitrate(text), want, "{text}");
        }
    }

    #[test]
    fn expectation_table() {
        let cases: &[(&str, Option<&str>)] = &[
            ("true", Some("yes")),
            ("True", Some("yes")),
            (" 1 ", Some("yes")),
            ("false", None),
            ("", None),
            ("none", None),
            ("10000k/10000k", Some("10000k/10000k")),
        ];
        for (text, want) in cases {
            assert_eq!(expectation(text).as_deref(), *want, "{text:?}");
        }
    }

    #[test]
    fn parse_errors_name_the_problem() {
        let cases: &[(&str, &str)] = &[
            ("key = \"{{ ip\"\nread = []\n[facts]", "key: syntax error"),
            (
                "key = \"{{ ip }}\"\nread = []\n[facts]",
                "needs at least one [[state.read]]",
            ),
            (
                "key = \"x\"\n[[read]]\ncommand = \"p\"\n[[read.fact]]\nfact = \"nope\"\nkey = \"a\"\n[facts]",
                "read[0].fact[0]: fact nope is not declared",
            ),
            (
                "key = \"x\"\n[[read]]\ncommand = \"p\"\n[[read.fact]]\nfact = \"f\"\nline = \"^add (\\\\S+)\"\n[facts.f]\nexpect = \"1\"",
                "read[0].fact[0].line: the regex needs a group (?P<key>...)",
            ),
            (
                "key = \"x\"\n[[read]]\ncommand = \"p\"\n[[read.fact]]\nfact = \"f\"\nkey = \"a\"\nline = \"(?P<key>x)\"\n[facts.f]\nexpect = \"1\"",
                "give either `line` or `key`",
            ),
            (
                "key = \"x\"\n[[read]]\ncommand = \"p\"\n[[read.fact]]\nfact = \"f\"\nkey = \"a\"\n[facts.f]\nexpect = \"1\"\nmissing = \"reboot\"",
                "facts.f.missing: cmd reboot has no template",
            ),
            (
                "key = \"x\"\n[[read]]\ncommand = \"p\"\n[[read.fact]]\nfact = \"f\"\nkey = \"a\"\nwhere = { list = \"(\" }\n[facts.f]\nexpect = \"1\"",
                "read[0].fact[0].where.list: bad regex `(`",
            ),
            (
                "key = \"x\"\n[[read]]\ncommand = \"p\"\n[[read.fact]]\nfact = \"f\"\nkey = \"a\"\n[facts.f]\nexpect = \"1\"\n[facts.g]\nexpect = \"1\"",
                "facts.g: no [[state.read.fact]] reads it",
            ),
            (
                "key = \"x\"\ncolour = 1\n[[read]]\ncommand = \"p\"\n[[read.fact]]\nfact = \"f\"\nkey = \"a\"\n[facts.f]\nexpect = \"1\"",
                "unknown field `colour`",
            ),
        ];
        for (text, want) in cases {
            let err = spec(text).expect_err(text);
            assert!(err.contains(want), "{text}\n got: {err}\nwant: {want}");
        }
    }

    #[test]
    fn answers_become_facts() {
        let spec = spec(ROUTEROS).expect("spec");
        let state = spec.parse_answers(&[
            "Flags: X - disabled, D - dynamic\n 0   list=allowed address=10.0.0.1 comment=crb_10.0.0.1\n 1   list=negbal address=10.0.0.2 comment=crb_10.0.0.2\n 2   list=allowed address=10.0.0.9 comment=manual\n".into(),
            " 0   name=crb_10.0.0.1 target=10.0.0.1/32 max-limit=10M/10M comment=crb_10.0.0.1\n".into(),
        ]);
        let mut want: BTreeMap<String, BTreeMap<String, Vec<String>>> = BTreeMap::new();
        want.entry("10.0.0.1".into())
            .or_default()
            .insert("allowed".into(), vec!["yes".into()]);
        want.entry("10.0.0.1".into())
            .or_default()
            .insert("rate".into(), vec!["10M/10M".into()]);
        want.entry("10.0.0.2".into())
            .or_default()
            .insert("negbal".into(), vec!["yes".into()]);
        assert_eq!(state.entries, want);
        assert_eq!(state.facts(), 3);
    }

    #[test]
    fn line_rules_read_ipset_save() {
        let text = r#"
key = "{{ ip }}"
[[read]]
command = "ipset save nasd_allowed"
[[read.fact]]
fact = "allowed"
line = '^add nasd_allowed (?P<key>[0-9.]+)'
[facts.allowed]
expect = "{{ not blocked }}"
missing = "user_accept"
extra = "user_drop"
"#;
        let spec = spec(text).expect("spec");
        let state = spec.parse_answers(&[
            "create nasd_allowed hash:ip family inet hashsize 1024 maxelem 65536\nadd nasd_allowed 10.0.0.1\nadd nasd_allowed 10.0.0.7\n".into(),
        ]);
        assert_eq!(
            state.entries.keys().cloned().collect::<Vec<_>>(),
            vec!["10.0.0.1".to_string(), "10.0.0.7".to_string()]
        );
    }

    #[test]
    fn truthy_table() {
        let spec = spec(ROUTEROS).expect("spec");
        let cases: &[(serde_json::Value, Option<&str>)] = &[
            (serde_json::json!(1), None),
            (serde_json::json!(0), Some("yes")),
            (serde_json::json!("1"), None),
            (serde_json::json!("0"), Some("yes")),
            (serde_json::json!("yes"), None),
            (serde_json::json!(""), Some("yes")),
            (serde_json::json!(true), None),
            (serde_json::json!(false), Some("yes")),
            (serde_json::json!(null), Some("yes")),
        ];
        for (blocked, allowed) in cases {
            let e = spec
                .expected(&vars(
                    serde_json::json!({"ip": "10.0.0.1", "blocked": blocked}),
                ))
                .expect("expected");
            assert_eq!(
                e.facts["allowed"].as_deref(),
                *allowed,
                "blocked = {blocked}"
            );
        }
    }

    #[test]
    fn comparison_table() {
        let spec = spec(ROUTEROS).expect("spec");
        let nas = spec.parse_answers(&[
            concat!(
                " 0   list=allowed address=10.0.0.1 comment=crb_10.0.0.1\n",
                " 1   list=allowed address=10.0.0.2 comment=crb_10.0.0.2\n",
                " 2   list=negbal address=10.0.0.3 comment=crb_10.0.0.3\n",
                " 3   list=allowed address=10.9.9.9 comment=crb_10.9.9.9\n",
            )
            .into(),
            concat!(
                " 0   name=crb_10.0.0.1 target=10.0.0.1/32 max-limit=10M/10M comment=crb_10.0.0.1\n",
                " 1   name=crb_10.0.0.2 target=10.0.0.2/32 max-limit=5M/5M comment=crb_10.0.0.2\n",
            )
            .into(),
        ]);
        let account = |user_id: i64, v: serde_json::Value| AccountExpectation {
            user_id,
            expected: spec.expected(&vars(v)),
        };
        let accounts = vec![
            // In order: allowed, 10M as 10000k.
            account(
                1,
                serde_json::json!({"ip": "10.0.0.1", "rate_in": 10000, "rate_out": 10000}),
            ),
            // Blocked but allowed on the NAS; rate 5M expected 2M.
            account(
                2,
                serde_json::json!({"ip": "10.0.0.2", "blocked": 1, "rate_in": 2000, "rate_out": 2000}),
            ),
            // Allowed but missing; negbal on the NAS, not expected; no rate expected.
            account(3, serde_json::json!({"ip": "10.0.0.3"})),
            // Negbal expected, missing; allowed missing; rate missing.
            account(
                4,
                serde_json::json!({"ip": "10.0.0.4", "negbal": true, "rate_in": 1000, "rate_out": 1000}),
            ),
            // Undefined variable in key.
            account(5, serde_json::json!({"login": "x"})),
        ];
        let got = spec.compare(&nas, &accounts, true);
        let rows: Vec<(i64, &str, Kind, Option<&str>)> = got
            .differences
            .iter()
            .map(|d| (d.user_id, d.fact.as_str(), d.kind, d.fix.as_deref()))
            .collect();
        assert_eq!(
            rows,
            vec![
                (2, "allowed", Kind::Extra, Some("user_drop")),
                (2, "rate", Kind::Differs, Some("user_rate_set")),
                (3, "allowed", Kind::Missing, Some("user_accept")),
                (3, "negbal", Kind::Extra, Some("user_redirect_cancel")),
                (4, "allowed", Kind::Missing, Some("user_accept")),
                (4, "negbal", Kind::Missing, Some("user_redirect")),
                (4, "rate", Kind::Missing, Some("user_rate_set")),
            ]
        );
        assert_eq!(got.compared, 4);
        assert_eq!(
            got.strays,
            vec![Stray {
                key: "10.9.9.9".into(),
                facts: vec!["allowed".into()]
            }]
        );
        assert_eq!(got.problems.len(), 1);
        assert!(
            got.problems[0].message.contains("undefined"),
            "{:?}",
            got.problems
        );
        assert_eq!(
            got.fixes(),
            vec![
                (2, "user_drop".to_string()),
                (2, "user_rate_set".to_string()),
                (3, "user_accept".to_string()),
                (3, "user_redirect_cancel".to_string()),
                (4, "user_accept".to_string()),
                (4, "user_redirect".to_string()),
                (4, "user_rate_set".to_string()),
            ]
        );
        // One account asked: strays are not reported.
        let one = spec.compare(&nas, &accounts[..1], false);
        assert!(
            one.differences.is_empty() && one.strays.is_empty(),
            "{one:?}"
        );
    }

    #[test]
    fn shared_key_and_duplicate_entries() {
        let spec = spec(ROUTEROS).expect("spec");
        let nas = spec.parse_answers(&[
            " 0   list=allowed address=10.0.0.1 comment=crb_10.0.0.1\n".into(),
            concat!(
                " 0   name=crb_10.0.0.1 target=10.0.0.1/32 max-limit=1M/1M comment=crb_10.0.0.1\n",
                " 1   name=crb_10.0.0.1b target=10.0.0.1/32 max-limit=1M/1M comment=crb_10.0.0.1\n",
            )
            .into(),
        ]);
        let a = |user_id, ip: &str| AccountExpectation {
            user_id,
            expected: spec.expected(&vars(
                serde_json::json!({"ip": ip, "rate_in": 1000, "rate_out": 1000}),
            )),
        };
        let got = spec.compare(&nas, &[a(1, "10.0.0.1")], true);
        assert_eq!(got.differences.len(), 1);
        assert_eq!(got.differences[0].kind, Kind::Differs);
        assert_eq!(got.differences[0].found.as_deref(), Some("1M/1M, 1M/1M"));
        let got = spec.compare(&nas, &[a(1, "10.0.0.1"), a(2, "10.0.0.1")], true);
        assert!(got.differences.is_empty());
        assert!(
            got.problems[0]
                .message
                .contains("belongs to 2 accounts (1, 2)"),
            "{:?}",
            got.problems
        );
    }
}
