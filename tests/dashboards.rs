//! The Grafana dashboard (`contrib/grafana/nasd.json`) and the Prometheus alert rules
//! (`contrib/prometheus/nasd-rules.yml`) name only what `/metrics` exposes.
//!
//! `dashboards_and_rules_name_exposed_metrics` (SQLite and a real PostgreSQL) starts the
//! daemon with `[api]`, has it deliver, fail and retry events on one NAS while another
//! (disabled) NAS keeps one waiting, scrapes `/metrics` over a real socket, then takes
//! every PromQL expression of the dashboard (panel targets, nested rows, templating
//! queries) and of the rules, and checks that each metric it names is exposed (a series
//! or a `# TYPE` family, with `_bucket`/`_sum`/`_count` of a histogram and `_total` of a
//! counter), that each label it selects or groups by is on that metric, that legends
//! and annotations name only labels the expression keeps, that the dashboard covers the
//! required areas per NAS, and that every family `/metrics` exposes is on the dashboard.
//!
//! The rest needs no daemon: the PromQL tokenizer's table, the exposition parser, the
//! dashboard's import shape, the rules' fields, and `promtool check rules` / `promtool
//! test rules` when promtool is installed (Debian: `apt-get install prometheus`).
//!
//! The rules file is read line by line (no YAML crate among the dev-dependencies): it
//! is ours, written in the plain subset `rule_fields` understands; promtool checks it as
//! real YAML.

#[macro_use]
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{Backend, TestEnv, add_accounts, event, nas, wait_for};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

both_backends!(dashboards_and_rules_name_exposed_metrics);

const LIMIT: Duration = Duration::from_secs(60);

fn contrib(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("contrib")
        .join(relative)
}

const DASHBOARD: &str = "grafana/nasd.json";
const RULES: &str = "prometheus/nasd-rules.yml";
const RULES_TEST: &str = "prometheus/nasd-rules.test.yml";

/// Labels Prometheus puts on every scraped series itself.
const TARGET_LABELS: [&str; 2] = ["instance", "job"];

/// Series Prometheus makes per target, not in `/metrics`, with their labels.
const SYNTHETIC: [(&str, &[&str]); 1] = [("up", &["instance", "job"])];

/// Families `/metrics` has only on PostgreSQL (SQLite cannot tell one table's size).
const POSTGRES_ONLY: [&str; 1] = ["nasd_history_bytes"];

/// What the dashboard must show: (area, metrics it needs, grouped by NAS somewhere).
const DASHBOARD_AREAS: [(&str, &[&str], bool); 11] = [
    (
        "per-NAS up/down",
        &["nasd_nas_up", "nasd_nas_reachable"],
        true,
    ),
    ("queue depth", &["nasd_queue_depth"], true),
    ("oldest event age", &["nasd_oldest_event_age_seconds"], true),
    (
        "throughput per NAS",
        &["nasd_events_finished_total", "nasd_events_retried_total"],
        true,
    ),
    ("throughput in", &["nasd_events_enqueued_total"], false),
    (
        "command latency",
        &["nasd_command_duration_seconds_bucket"],
        true,
    ),
    ("open sessions", &["nasd_open_sessions"], true),
    ("commands in flight", &["nasd_in_flight"], true),
    (
        "journal failures",
        &[
            "nasd_journal_files_failing",
            "nasd_journal_lines_dropped_total",
        ],
        false,
    ),
    ("history rows", &["nasd_history_rows"], false),
    ("history bytes", &["nasd_history_bytes"], false),
];

/// What the rules must watch: (area, a metric its expression names).
const RULE_AREAS: [(&str, &str); 6] = [
    ("daemon absent (up == 0)", "up"),
    ("NAS down", "nasd_nas_reachable"),
    ("queue oldest age", "nasd_oldest_event_age_seconds"),
    ("failure ratio", "nasd_events_finished_total"),
    ("journal failing files", "nasd_journal_files_failing"),
    ("history size", "nasd_history_rows"),
];

// ---- PromQL ------------------------------------------------------------------------

/// What one PromQL expression names.
#[derive(Debug, Default, Clone, PartialEq)]
struct Refs {
    /// Metric names, in order of first appearance.
    metrics: Vec<String>,
    /// (metric, label) for each matcher of a selector; metric "" for a selector without
    /// a name.
    selector_labels: Vec<(String, String)>,
    /// (modifier, labels) for `by`, `without`, `on`, `ignoring`, `group_left`,
    /// `group_right` with a label list.
    groupings: Vec<(String, Vec<String>)>,
    /// Aggregation operators (`sum`, `max`, `topk`, ...).
    aggregations: usize,
}

const GROUPING: [&str; 6] = [
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];
const AGGREGATIONS: [&str; 14] = [
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
];
const KEYWORDS: [&str; 10] = [
    "and", "or", "unless", "offset", "bool", "atan2", "inf", "nan", "start", "end",
];
const FUNCTIONS: [&str; 77] = [
    "abs",
    "absent",
    "absent_over_time",
    "acos",
    "acosh",
    "asin",
    "asinh",
    "atan",
    "atanh",
    "avg_over_time",
    "ceil",
    "changes",
    "clamp",
    "clamp_max",
    "clamp_min",
    "cos",
    "cosh",
    "count_over_time",
    "day_of_month",
    "day_of_week",
    "day_of_year",
    "days_in_month",
    "deg",
    "delta",
    "deriv",
    "double_exponential_smoothing",
    "exp",
    "floor",
    "histogram_avg",
    "histogram_count",
    "histogram_fraction",
    "histogram_quantile",
    "histogram_stddev",
    "histogram_stdvar",
    "histogram_sum",
    "holt_winters",
    "hour",
    "idelta",
    "increase",
    "info",
    "irate",
    "label_join",
    "label_replace",
    "last_over_time",
    "ln",
    "log10",
    "log2",
    "mad_over_time",
    "max_over_time",
    "min_over_time",
    "minute",
    "month",
    "pi",
    "predict_linear",
    "present_over_time",
    "quantile_over_time",
    "rad",
    "rate",
    "resets",
    "round",
    "scalar",
    "sgn",
    "sin",
    "sinh",
    "sort",
    "sort_by_label",
    "sort_by_label_desc",
    "sort_desc",
    "sqrt",
    "stddev_over_time",
    "stdvar_over_time",
    "sum_over_time",
    "tan",
    "tanh",
    "time",
    "timestamp",
    "vector",
];

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// A small PromQL tokenizer: the metric names, selector labels and grouping labels of
/// `expr`. Skips strings, numbers and durations, range and subquery brackets, Grafana
/// variables (`$nas`, `${nas}`, `$__rate_interval`), functions, keywords and
/// aggregation operators; `{__name__="x"}` names `x`. Any other identifier is a metric
/// name, so a misspelt function shows up as a metric nobody exposes. Pure.
fn promql_refs(expr: &str) -> Refs {
    let chars: Vec<char> = expr.chars().collect();
    let mut refs = Refs::default();
    let mut i = 0;
    // The metric a following `{...}` belongs to.
    let mut last_metric: Option<String> = None;
    let skip_ws = |i: &mut usize| {
        while *i < chars.len() && chars[*i].is_whitespace() {
            *i += 1;
        }
    };
    let read_ident = |i: &mut usize| {
        let start = *i;
        while *i < chars.len() && is_ident(chars[*i]) {
            *i += 1;
        }
        chars[start..*i].iter().collect::<String>()
    };
    // A quoted string starting at `i`, returned unescaped.
    let read_string = |i: &mut usize| {
        let quote = chars[*i];
        *i += 1;
        let mut s = String::new();
        while *i < chars.len() && chars[*i] != quote {
            if chars[*i] == '\\' && quote != '`' && *i + 1 < chars.len() {
                *i += 1;
            }
            s.push(chars[*i]);
            *i += 1;
        }
        *i += 1;
        s
    };
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        if c == '"' || c == '\'' || c == '`' {
            read_string(&mut i);
            last_metric = None;
            continue;
        }
        if c == '[' {
            // A range or subquery: durations, `:`, variables.
            while i < chars.len() && chars[i] != ']' {
                i += 1;
            }
            i += 1;
            last_metric = None;
            continue;
        }
        if c == '$' {
            i += 1;
            if chars.get(i) == Some(&'{') {
                while i < chars.len() && chars[i] != '}' {
                    i += 1;
                }
                i += 1;
            } else {
                read_ident(&mut i);
            }
            last_metric = None;
            continue;
        }
        if c.is_ascii_digit() || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit)) {
            // A number (1, 0.99, 1e-3, 0x1f) or a duration (5m, 1h30m).
            let start = i;
            while i < chars.len() {
                let d = chars[i];
                let exponent_sign = (d == '+' || d == '-')
                    && matches!(chars[i - 1], 'e' | 'E')
                    && !chars[start..i].contains(&'x');
                if d.is_ascii_alphanumeric() || d == '.' || d == '_' || exponent_sign {
                    i += 1;
                } else {
                    break;
                }
            }
            last_metric = None;
            continue;
        }
        if c == '{' {
            i += 1;
            let mut labels = Vec::new();
            let mut named = last_metric.take();
            loop {
                skip_ws(&mut i);
                match chars.get(i) {
                    None => break,
                    Some('}') => {
                        i += 1;
                        break;
                    }
                    Some(',') => {
                        i += 1;
                        continue;
                    }
                    _ => {}
                }
                let label = if chars[i] == '"' {
                    read_string(&mut i)
                } else {
                    read_ident(&mut i)
                };
                skip_ws(&mut i);
                let op_start = i;
                while i < chars.len() && matches!(chars[i], '=' | '!' | '~') {
                    i += 1;
                }
                let op: String = chars[op_start..i].iter().collect();
                skip_ws(&mut i);
                let value = if i < chars.len() && matches!(chars[i], '"' | '\'' | '`') {
                    read_string(&mut i)
                } else {
                    String::new()
                };
                if label.is_empty() && op.is_empty() {
                    // Not a matcher: step over whatever it is.
                    i += 1;
                    continue;
                }
                if label == "__name__" && op == "=" {
                    if !refs.metrics.contains(&value) {
                        refs.metrics.push(value.clone());
                    }
                    named = Some(value);
                }
                labels.push(label);
            }
            let metric = named.unwrap_or_default();
            for label in labels {
                refs.selector_labels.push((metric.clone(), label));
            }
            continue;
        }
        if is_ident_start(c) {
            let word = read_ident(&mut i);
            let lower = word.to_ascii_lowercase();
            last_metric = None;
            if GROUPING.contains(&lower.as_str()) {
                skip_ws(&mut i);
                if chars.get(i) == Some(&'(') {
                    i += 1;
                    let mut labels = Vec::new();
                    while i < chars.len() && chars[i] != ')' {
                        if is_ident_start(chars[i]) {
                            labels.push(read_ident(&mut i));
                        } else if chars[i] == '"' {
                            labels.push(read_string(&mut i));
                        } else {
                            i += 1;
                        }
                    }
                    i += 1;
                    refs.groupings.push((lower, labels));
                }
            } else if AGGREGATIONS.contains(&lower.as_str()) {
                refs.aggregations += 1;
            } else if !FUNCTIONS.contains(&word.as_str()) && !KEYWORDS.contains(&lower.as_str()) {
                if !refs.metrics.contains(&word) {
                    refs.metrics.push(word.clone());
                }
                last_metric = Some(word);
            }
            continue;
        }
        // Operators, parentheses, commas, `@`.
        i += 1;
        last_metric = None;
    }
    refs
}

impl Refs {
    /// Every label the expression groups or matches on.
    fn grouping_labels(&self) -> impl Iterator<Item = &String> {
        self.groupings.iter().flat_map(|(_, labels)| labels)
    }
}

// ---- the scrape --------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A `/metrics` text: its `# TYPE` families and its samples (format 0.0.4 or
/// OpenMetrics).
#[derive(Debug, Default)]
struct Exposition {
    families: BTreeMap<String, String>,
    samples: Vec<Sample>,
}

/// One sample line: `name{a="x",b="y"} value [timestamp] [# exemplar]`.
fn parse_sample(line: &str) -> Option<Sample> {
    let chars: Vec<char> = line.chars().collect();
    let mut i = 0;
    while i < chars.len() && is_ident(chars[i]) {
        i += 1;
    }
    let name: String = chars[..i].iter().collect();
    if name.is_empty() {
        return None;
    }
    let mut labels = BTreeMap::new();
    if chars.get(i) == Some(&'{') {
        i += 1;
        loop {
            while i < chars.len() && (chars[i] == ',' || chars[i].is_whitespace()) {
                i += 1;
            }
            match chars.get(i) {
                None => return None,
                Some('}') => {
                    i += 1;
                    break;
                }
                _ => {}
            }
            let start = i;
            while i < chars.len() && chars[i] != '=' {
                i += 1;
            }
            let key: String = chars[start..i].iter().collect();
            i += 1; // '='
            if chars.get(i) != Some(&'"') {
                return None;
            }
            i += 1;
            let mut value = String::new();
            while i < chars.len() && chars[i] != '"' {
                if chars[i] == '\\' && i + 1 < chars.len() {
                    i += 1;
                    value.push(if chars[i] == 'n' { '\n' } else { chars[i] });
                } else {
                    value.push(chars[i]);
                }
                i += 1;
            }
            i += 1;
            labels.insert(key.trim().to_string(), value);
        }
    }
    let rest: String = chars[i..].iter().collect();
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name,
        labels,
        value,
    })
}

fn parse_exposition(text: &str) -> Exposition {
    let mut out = Exposition::default();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut words = rest.split_whitespace();
            if let (Some(name), Some(kind)) = (words.next(), words.next()) {
                out.families.insert(name.to_string(), kind.to_string());
            }
        } else if !line.starts_with('#')
            && !line.trim().is_empty()
            && let Some(sample) = parse_sample(line)
        {
            out.samples.push(sample);
        }
    }
    out
}

impl Exposition {
    /// The series names a `# TYPE` family stands for.
    fn family_names(family: &str, kind: &str) -> Vec<String> {
        match kind {
            "counter" if family.ends_with("_total") => vec![family.to_string()],
            "counter" => vec![format!("{family}_total")],
            "histogram" | "gaugehistogram" => ["_bucket", "_sum", "_count"]
                .iter()
                .map(|s| format!("{family}{s}"))
                .collect(),
            "summary" => vec![
                family.to_string(),
                format!("{family}_sum"),
                format!("{family}_count"),
            ],
            "info" if !family.ends_with("_info") => vec![format!("{family}_info")],
            _ => vec![family.to_string()],
        }
    }

    /// The family a series name belongs to (by `# TYPE`), if any.
    fn family_of(&self, name: &str) -> Option<&str> {
        self.families
            .iter()
            .find(|(family, kind)| Self::family_names(family, kind).iter().any(|n| n == name))
            .map(|(family, _)| family.as_str())
    }

    /// Whether `/metrics` exposes `name`: a series of that name, or a `# TYPE` family
    /// that stands for it.
    fn exposes(&self, name: &str) -> bool {
        self.samples.iter().any(|s| s.name == name) || self.family_of(name).is_some()
    }

    /// The label names on the series named `name` (None when there is none).
    fn labels_of(&self, name: &str) -> Option<BTreeSet<String>> {
        let mut found = false;
        let mut labels = BTreeSet::new();
        for s in self.samples.iter().filter(|s| s.name == name) {
            found = true;
            labels.extend(s.labels.keys().cloned());
        }
        found.then_some(labels)
    }

    fn sum(&self, name: &str, with: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| {
                with.iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
            .sum()
    }
}

// ---- the dashboard -----------------------------------------------------------------

/// One PromQL expression of the dashboard or the rules, with where it is.
#[derive(Debug, Clone)]
struct Query {
    at: String,
    expr: String,
    /// Labels its legend (`{{nas}}`) or annotations (`$labels.nas`) name.
    shown_labels: Vec<String>,
    /// A templating `label_values(selector, label)`: the label.
    label_value: Option<String>,
}

/// `{{ nas }}` names in a Grafana legend.
fn legend_labels(legend: &str) -> Vec<String> {
    legend
        .split("{{")
        .skip(1)
        .filter_map(|rest| rest.split_once("}}"))
        .map(|(name, _)| name.trim().to_string())
        .collect()
}

/// `$labels.nas` names in an alert annotation.
fn annotation_labels(text: &str) -> Vec<String> {
    text.split("$labels.")
        .skip(1)
        .map(|rest| rest.chars().take_while(|c| is_ident(*c)).collect())
        .collect()
}

fn collect_panels<'a>(panels: &'a [Value], out: &mut Vec<&'a Value>) {
    for p in panels {
        out.push(p);
        if let Some(inner) = p["panels"].as_array() {
            collect_panels(inner, out);
        }
    }
}

/// Every panel of the dashboard, rows' nested panels included.
fn all_panels(dashboard: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    collect_panels(
        dashboard["panels"]
            .as_array()
            .map_or(&[][..], Vec::as_slice),
        &mut out,
    );
    out
}

/// Every expression of the dashboard: panel targets and templating queries.
fn dashboard_queries(dashboard: &Value) -> Vec<Query> {
    let mut out = Vec::new();
    for panel in all_panels(dashboard) {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let Some(expr) = target["expr"].as_str() else {
                continue;
            };
            out.push(Query {
                at: format!(
                    "{DASHBOARD}: panel {:?} (id {}), target {}",
                    panel["title"].as_str().unwrap_or(""),
                    panel["id"],
                    target["refId"].as_str().unwrap_or("?")
                ),
                expr: expr.to_string(),
                shown_labels: legend_labels(target["legendFormat"].as_str().unwrap_or("")),
                label_value: None,
            });
        }
    }
    for var in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if var["type"] != "query" {
            continue;
        }
        let query = var["query"]["query"]
            .as_str()
            .or_else(|| var["query"].as_str())
            .unwrap_or("");
        let at = format!(
            "{DASHBOARD}: templating variable {:?}",
            var["name"].as_str().unwrap_or("")
        );
        let inner = |prefix: &str| {
            query
                .trim()
                .strip_prefix(prefix)
                .and_then(|r| r.strip_suffix(')'))
        };
        let (expr, label_value) = if let Some(args) = inner("label_values(") {
            match args.rsplit_once(',') {
                Some((selector, label)) => (selector.to_string(), Some(label.trim().to_string())),
                None => (String::new(), Some(args.trim().to_string())),
            }
        } else if let Some(expr) = inner("query_result(") {
            (expr.to_string(), None)
        } else {
            (query.to_string(), None)
        };
        out.push(Query {
            at,
            expr,
            shown_labels: Vec::new(),
            label_value,
        });
    }
    out
}

// ---- the rules ---------------------------------------------------------------------

/// One alerting rule: its fields as `expr`, `for`, `labels.severity`,
/// `annotations.summary`, ...
#[derive(Debug, Default, Clone, PartialEq)]
struct Rule {
    alert: String,
    line: usize,
    fields: BTreeMap<String, String>,
}

fn unquote(v: &str) -> String {
    let v = v.trim();
    if v.len() >= 2 && v.starts_with('"') && v.ends_with('"') {
        v[1..v.len() - 1]
            .replace("\\\"", "\"")
            .replace("\\\\", "\\")
    } else if v.len() >= 2 && v.starts_with('\'') && v.ends_with('\'') {
        v[1..v.len() - 1].replace("''", "'")
    } else {
        v.to_string()
    }
}

fn indent_of(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

/// The alerting rules of a rules file, read line by line. Understands the subset
/// `nasd-rules.yml` is written in: `- alert:` items whose keys are plain or quoted
/// scalars, `|`/`>` block scalars, and one level of nested maps (`labels`,
/// `annotations`). Pure.
fn rule_fields(yaml: &str) -> Vec<Rule> {
    let mut rules: Vec<Rule> = Vec::new();
    let mut current: Option<(Rule, usize)> = None; // the rule and its keys' indent
    let mut section: Option<String> = None;
    // A block scalar being read: its key, the key's indent, the lines so far.
    let mut block: Option<(String, usize, Vec<String>)> = None;
    for (n, line) in yaml.lines().enumerate() {
        if let Some((key, key_indent, lines)) = &mut block {
            if line.trim().is_empty() || indent_of(line) > *key_indent {
                lines.push(line.trim().to_string());
                continue;
            }
            let text = lines.join("\n").trim().to_string();
            if let Some((rule, _)) = &mut current {
                rule.fields.insert(key.clone(), text);
            }
            block = None;
        }
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let indent = indent_of(line);
        if let Some(name) = trimmed.strip_prefix("- alert:") {
            rules.extend(current.take().map(|(r, _)| r));
            current = Some((
                Rule {
                    alert: unquote(name),
                    line: n + 1,
                    ..Rule::default()
                },
                indent + 2,
            ));
            section = None;
            continue;
        }
        if trimmed.starts_with("- ") || indent == 0 {
            rules.extend(current.take().map(|(r, _)| r));
            continue;
        }
        let Some((rule, rule_indent)) = &mut current else {
            continue;
        };
        let Some((key, value)) = trimmed.split_once(':') else {
            continue;
        };
        let (key, value) = (key.trim().to_string(), value.trim());
        let path = if indent <= *rule_indent {
            section = None;
            key.clone()
        } else if let Some(s) = &section {
            format!("{s}.{key}")
        } else {
            continue;
        };
        if value.is_empty() {
            section = Some(key);
        } else if matches!(value, "|" | "|-" | "|+" | ">" | ">-" | ">+") {
            block = Some((path, indent, Vec::new()));
        } else {
            rule.fields.insert(path, unquote(value));
        }
    }
    if let Some((key, _, lines)) = block
        && let Some((rule, _)) = &mut current
    {
        rule.fields.insert(key, lines.join("\n").trim().to_string());
    }
    rules.extend(current.map(|(r, _)| r));
    rules
}

fn rule_queries(rules: &[Rule]) -> Vec<Query> {
    rules
        .iter()
        .map(|r| Query {
            at: format!("{RULES}:{}: alert {}", r.line, r.alert),
            expr: r.fields.get("expr").cloned().unwrap_or_default(),
            shown_labels: r
                .fields
                .iter()
                .filter(|(k, _)| k.starts_with("annotations.") || k.starts_with("labels."))
                .flat_map(|(_, v)| annotation_labels(v))
                .collect(),
            label_value: None,
        })
        .collect()
}

// ---- the checks --------------------------------------------------------------------

/// The labels `name` carries in Prometheus: its scrape labels plus the target's, or a
/// synthetic series' own. None when there is no series to tell.
fn labels_in_prometheus(expo: &Exposition, name: &str) -> Option<BTreeSet<String>> {
    if let Some((_, labels)) = SYNTHETIC.iter().find(|(n, _)| *n == name) {
        return Some(labels.iter().map(|l| l.to_string()).collect());
    }
    let mut labels = expo.labels_of(name)?;
    labels.extend(TARGET_LABELS.iter().map(|l| l.to_string()));
    Some(labels)
}

/// The labels an expression's result keeps, roughly: everything its metrics carry when
/// it does not aggregate, else what its `by` lists keep and its `without` lists leave.
fn result_labels(refs: &Refs, expo: &Exposition) -> BTreeSet<String> {
    let all: BTreeSet<String> = refs
        .metrics
        .iter()
        .filter_map(|m| labels_in_prometheus(expo, m))
        .flatten()
        .collect();
    if refs.aggregations == 0 {
        return all;
    }
    let mut out = BTreeSet::new();
    for (modifier, labels) in &refs.groupings {
        match modifier.as_str() {
            "by" => out.extend(labels.iter().cloned()),
            "without" => out.extend(all.iter().filter(|l| !labels.contains(l)).cloned()),
            _ => {}
        }
    }
    out
}

/// Problems of one expression against the scrape: metrics not exposed, labels not on
/// their metric, legend or annotation labels the result does not keep. `skipped`:
/// metrics this backend does not expose (their labels are not checked either).
fn check_query(q: &Query, expo: &Exposition, skipped: &[&str]) -> Vec<String> {
    let mut problems = Vec::new();
    if q.expr.trim().is_empty() {
        problems.push(match &q.label_value {
            Some(_) => format!(
                "{}: label_values without a metric: name one, so that its label can be checked",
                q.at
            ),
            None => format!("{}: no expression", q.at),
        });
        return problems;
    }
    let refs = promql_refs(&q.expr);
    if refs.metrics.is_empty() {
        problems.push(format!("{}: names no metric in `{}`", q.at, q.expr));
    }
    let exposed = |m: &str| SYNTHETIC.iter().any(|(n, _)| *n == m) || expo.exposes(m);
    for m in &refs.metrics {
        if skipped.contains(&m.as_str()) {
            continue;
        }
        if !exposed(m) {
            problems.push(format!(
                "{}: metric `{m}` is not exposed by /metrics (in `{}`)",
                q.at, q.expr
            ));
        } else if labels_in_prometheus(expo, m).is_none() {
            problems.push(format!(
                "{}: metric `{m}` has no series in the scrape, so its labels cannot be \
                 checked: make the test produce one",
                q.at
            ));
        }
    }
    let checked: Vec<&String> = refs
        .metrics
        .iter()
        .filter(|m| !skipped.contains(&m.as_str()) && exposed(m))
        .collect();
    let any_labels: BTreeSet<String> = checked
        .iter()
        .filter_map(|m| labels_in_prometheus(expo, m))
        .flatten()
        .collect();
    // Grouping and shown labels are held against the expression's metrics together:
    // only when all of them are known here.
    let some_unknown = refs
        .metrics
        .iter()
        .any(|m| skipped.contains(&m.as_str()) || labels_in_prometheus(expo, m).is_none());
    for (metric, label) in &refs.selector_labels {
        if label == "__name__" || skipped.contains(&metric.as_str()) {
            continue;
        }
        let on_metric = if metric.is_empty() {
            Some(any_labels.clone())
        } else {
            labels_in_prometheus(expo, metric)
        };
        if let Some(labels) = on_metric
            && !labels.contains(label)
        {
            problems.push(format!(
                "{}: label `{label}` is not on `{}` (it has {labels:?}) in `{}`",
                q.at,
                if metric.is_empty() {
                    "any metric"
                } else {
                    metric
                },
                q.expr
            ));
        }
    }
    if !some_unknown {
        for label in refs.grouping_labels() {
            if !any_labels.contains(label) {
                problems.push(format!(
                    "{}: grouping label `{label}` is on none of {:?} in `{}`",
                    q.at, refs.metrics, q.expr
                ));
            }
        }
        let kept = result_labels(&refs, expo);
        for label in &q.shown_labels {
            if !kept.contains(label) {
                problems.push(format!(
                    "{}: shows label `{label}`, which the result of `{}` does not keep \
                     (it keeps {kept:?})",
                    q.at, q.expr
                ));
            }
        }
    }
    if let Some(label) = &q.label_value
        && !any_labels.contains(label)
    {
        problems.push(format!(
            "{}: label_values of `{label}`, which is on none of {:?}",
            q.at, refs.metrics
        ));
    }
    problems
}

/// Problems of the dashboard and the rules against one scrape.
fn check_against(expo: &Exposition, backend: Backend) -> Vec<String> {
    let skipped: &[&str] = match backend {
        Backend::Postgres => &[],
        Backend::Sqlite => &POSTGRES_ONLY,
    };
    let dashboard = read_dashboard();
    let rules = rule_fields(&read(RULES));
    let dash_queries = dashboard_queries(&dashboard);
    let rules_queries = rule_queries(&rules);
    let mut problems: Vec<String> = dash_queries
        .iter()
        .chain(&rules_queries)
        .flat_map(|q| check_query(q, expo, skipped))
        .collect();
    // The required areas, per NAS where it matters.
    let dash_refs: Vec<Refs> = dash_queries.iter().map(|q| promql_refs(&q.expr)).collect();
    for (area, metrics, per_nas) in DASHBOARD_AREAS {
        for m in metrics {
            let using: Vec<&Refs> = dash_refs
                .iter()
                .filter(|r| r.metrics.iter().any(|x| x == m))
                .collect();
            if using.is_empty() {
                problems.push(format!(
                    "{DASHBOARD}: no panel shows `{m}` (required area: {area})"
                ));
            } else if per_nas
                && !using.iter().any(|r| {
                    r.groupings
                        .iter()
                        .any(|(k, l)| k == "by" && l.iter().any(|x| x == "nas"))
                })
            {
                problems.push(format!(
                    "{DASHBOARD}: no panel shows `{m}` per NAS (`by (nas)`; required area: \
                     {area})"
                ));
            }
        }
    }
    if !dash_queries
        .iter()
        .any(|q| q.expr.contains("nasd_events_finished_total") && q.expr.contains("\"failed\""))
    {
        problems.push(format!(
            "{DASHBOARD}: no panel shows failed events (outcome=\"failed\")"
        ));
    }
    // Every family /metrics exposes is somewhere on the dashboard.
    let named: BTreeSet<&String> = dash_refs.iter().flat_map(|r| &r.metrics).collect();
    for (family, kind) in &expo.families {
        let names = Exposition::family_names(family, kind);
        if !names.iter().any(|n| named.contains(n)) {
            problems.push(format!(
                "{DASHBOARD}: /metrics exposes `{family}` ({kind}: {names:?}) but no panel \
                 shows it; add a panel (or a target to one)"
            ));
        }
    }
    let rule_refs: Vec<(&Rule, Refs)> = rules
        .iter()
        .map(|r| {
            (
                r,
                promql_refs(r.fields.get("expr").map_or("", String::as_str)),
            )
        })
        .collect();
    for (area, metric) in RULE_AREAS {
        if !rule_refs
            .iter()
            .any(|(_, refs)| refs.metrics.iter().any(|m| m == metric))
        {
            problems.push(format!(
                "{RULES}: no rule watches `{metric}` (required: {area})"
            ));
        }
    }
    // A rule whose result keeps the NAS names it in its summary or description; a rule
    // on `up` is about the nasd job.
    for (rule, refs) in &rule_refs {
        if skipped.iter().any(|s| refs.metrics.iter().any(|m| m == s)) {
            continue;
        }
        let text = format!(
            "{} {}",
            rule.fields
                .get("annotations.summary")
                .map_or("", String::as_str),
            rule.fields
                .get("annotations.description")
                .map_or("", String::as_str)
        );
        if result_labels(refs, expo).contains("nas") && !text.contains("$labels.nas") {
            problems.push(format!(
                "{RULES}:{}: alert {} is per NAS but its summary and description do not name \
                 {{{{ $labels.nas }}}}",
                rule.line, rule.alert
            ));
        }
        if refs.metrics.iter().any(|m| m == "up")
            && !rule
                .fields
                .get("expr")
                .is_some_and(|e| e.contains("up{job=\"nasd\"}"))
        {
            problems.push(format!(
                "{RULES}:{}: alert {} looks at `up` of some other job than nasd",
                rule.line, rule.alert
            ));
        }
    }
    problems
}

fn read(relative: &str) -> String {
    let path = contrib(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn read_dashboard() -> Value {
    serde_json::from_str(&read(DASHBOARD)).unwrap_or_else(|e| panic!("{DASHBOARD}: {e}"))
}

// ---- the daemon --------------------------------------------------------------------

/// NAS 1 answers `user_drop` with a permanent failure and `user_block` with "retry
/// later" on the first try; NAS 2 is disabled, so its event waits.
async fn dashboards_and_rules_name_exposed_metrics(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let store = env.store().await;
    let script = env.script(
        "nas.sh",
        "#!/bin/sh\n\
         case \"$1\" in\n\
         user_drop) echo 'no such user'; exit 1 ;;\n\
         user_block) if [ \"$try_count\" -lt 2 ]; then echo 'busy, later'; exit 254; fi ;;\n\
         esac\n\
         echo ok\n",
    );
    store
        .nas_upsert(&nas(1, Some(&script), None, 2))
        .await
        .expect("nas 1");
    let mut second = nas(2, Some(&script), None, 1);
    second.enabled = false;
    store.nas_upsert(&second).await.expect("nas 2");
    add_accounts(&store, 4, &[1, 2]).await; // users 1, 3 on NAS 1; 2, 4 on NAS 2
    store
        .enqueue_compact(&[
            event("user_add", 1),
            event("user_add", 3),
            event("user_drop", 1),
            event("user_block", 3),
            event("user_add", 2),
        ])
        .await
        .expect("enqueue");
    let mut cfg = env.config();
    cfg.api = Some(nasd::config::ApiConfig {
        listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        ..nasd::config::ApiConfig::default()
    });
    let token = CancellationToken::new();
    let running = nasd::daemon::start(cfg, token.clone())
        .await
        .expect("daemon starts");
    let addr = running.api_addr.expect("api listens");
    let scrape = || async move {
        let r = nasd::tools::http_client::request(addr, "GET", "/metrics", &[], b"")
            .await
            .expect("GET /metrics");
        assert_eq!(r.status, 200, "{}", r.text());
        r.text()
    };
    // Done, failed and retried on NAS 1, one event waiting on NAS 2.
    let finished = "nasd_events_finished_total";
    wait_for(
        LIMIT,
        "done, failed and retried events in /metrics",
        || async {
            let expo = parse_exposition(&scrape().await);
            expo.sum(finished, &[("nas", "1"), ("outcome", "done")]) >= 3.0
                && expo.sum(finished, &[("nas", "1"), ("outcome", "failed")]) >= 1.0
                && expo.sum("nasd_events_retried_total", &[("nas", "1")]) >= 1.0
                && expo.sum("nasd_queue_depth", &[("nas", "2")]) >= 1.0
        },
    )
    .await;
    let text = scrape().await;
    let expo = parse_exposition(&text);
    token.cancel();
    tokio::time::timeout(LIMIT, running.wait())
        .await
        .expect("daemon stops in time")
        .expect("daemon run");

    assert!(
        expo.families.len() >= 20 && expo.samples.len() >= 40,
        "the scrape did not parse:\n{text}"
    );
    if backend == Backend::Postgres {
        for name in POSTGRES_ONLY {
            assert!(expo.exposes(name), "PostgreSQL exposes {name}:\n{text}");
        }
    }
    let problems = check_against(&expo, backend);
    assert!(
        problems.is_empty(),
        "the dashboard or the rules name what /metrics does not expose ({backend:?}):\n  {}\n\n\
         exposed families: {:?}\n\nthe scrape:\n{text}",
        problems.join("\n  "),
        expo.families
    );
}

// ---- without a daemon ----------------------------------------------------------------

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// (expression, metrics, selector labels as "metric.label", grouping labels,
/// aggregations)
type TokenizerCase = (
    &'static str,
    &'static [&'static str],
    &'static [&'static str],
    &'static [&'static str],
    usize,
);

#[test]
fn promql_tokenizer_finds_metrics_and_labels() {
    let table: [TokenizerCase; 16] = [
        ("nasd_db_up", &["nasd_db_up"], &[], &[], 0),
        ("nasd_db_up == 0", &["nasd_db_up"], &[], &[], 0),
        (r#"up{job="nasd"} == 0"#, &["up"], &["up.job"], &[], 0),
        (r#"absent(up{job="nasd"})"#, &["up"], &["up.job"], &[], 0),
        (
            r#"sum by (nas) (rate(nasd_events_finished_total{instance=~"$instance", nas=~"$nas", outcome="failed"}[$__rate_interval]))"#,
            &["nasd_events_finished_total"],
            &[
                "nasd_events_finished_total.instance",
                "nasd_events_finished_total.nas",
                "nasd_events_finished_total.outcome",
            ],
            &["nas"],
            1,
        ),
        (
            "histogram_quantile(0.99, sum by (nas, le) (rate(nasd_command_duration_seconds_bucket[5m])))",
            &["nasd_command_duration_seconds_bucket"],
            &[],
            &["nas", "le"],
            1,
        ),
        (
            "sum(rate(nasd_command_duration_seconds_sum[1h30m])) / sum(rate(nasd_command_duration_seconds_count[1h30m]))",
            &[
                "nasd_command_duration_seconds_sum",
                "nasd_command_duration_seconds_count",
            ],
            &[],
            &[],
            2,
        ),
        (
            "nasd_nas_reachable == 0 and on (instance, nas) nasd_nas_up == 1",
            &["nasd_nas_reachable", "nasd_nas_up"],
            &[],
            &["instance", "nas"],
            0,
        ),
        (
            r#"max without (instance) (nasd_cluster_daemons{state="lost"} offset 15m) > bool 1e-3"#,
            &["nasd_cluster_daemons"],
            &["nasd_cluster_daemons.state"],
            &["instance"],
            1,
        ),
        (
            "sum(x) by (nas) / ignoring(cmd) group_left(outcome) y",
            &["x", "y"],
            &[],
            &["nas", "cmd", "outcome"],
            1,
        ),
        (
            r#"{__name__="nasd_queue_depth", nas="1"}"#,
            &["nasd_queue_depth"],
            &["nasd_queue_depth.__name__", "nasd_queue_depth.nas"],
            &[],
            0,
        ),
        (
            r#"label_replace(nasd_in_flight, "dst", "$1", "nas", "(.*)")"#,
            &["nasd_in_flight"],
            &[],
            &[],
            0,
        ),
        (
            "time() - max by (nas) (nasd_last_success_timestamp_seconds{nas=~\"${nas}\"} > 0)",
            &["nasd_last_success_timestamp_seconds"],
            &["nasd_last_success_timestamp_seconds.nas"],
            &["nas"],
            1,
        ),
        (
            "count(count by (nas) (a == 0)) or vector(0) + Inf - NaN",
            &["a"],
            &[],
            &["nas"],
            2,
        ),
        (
            "max_over_time(nasd_queue_depth[10m:1m] @ start()) * 2 ^ 3",
            &["nasd_queue_depth"],
            &[],
            &[],
            0,
        ),
        // A misspelt function is a name nobody exposes.
        ("rat(nasd_db_up[5m])", &["rat", "nasd_db_up"], &[], &[], 0),
    ];
    for (expr, metrics, selectors, grouping, aggregations) in table {
        let refs = promql_refs(expr);
        assert_eq!(refs.metrics, strings(metrics), "metrics of {expr}");
        let got: Vec<String> = refs
            .selector_labels
            .iter()
            .map(|(m, l)| format!("{m}.{l}"))
            .collect();
        assert_eq!(got, strings(selectors), "selector labels of {expr}");
        let got: Vec<String> = refs.grouping_labels().cloned().collect();
        assert_eq!(got, strings(grouping), "grouping labels of {expr}");
        assert_eq!(refs.aggregations, aggregations, "aggregations of {expr}");
    }
}

#[test]
fn exposition_parser_reads_both_formats() {
    // Format 0.0.4 as /metrics writes it, and OpenMetrics as prometheus-client does.
    let text = "# HELP nasd_events_finished_total Events.\n\
                # TYPE nasd_events_finished_total counter\n\
                nasd_events_finished_total{nas=\"1\",cmd=\"we\\\"ird, {x}\",outcome=\"done\"} 2\n\
                # TYPE nasd_events_retried counter\n\
                nasd_events_retried_total{nas=\"1\",cmd=\"user_add\"} 1 1700000000\n\
                # TYPE nasd_command_duration_seconds histogram\n\
                nasd_command_duration_seconds_bucket{nas=\"1\",le=\"+Inf\"} 3\n\
                nasd_command_duration_seconds_sum{nas=\"1\"} 0.5\n\
                # TYPE nasd_db_up gauge\n\
                nasd_db_up 1.0\n\
                # TYPE nasd_never_seen gauge\n\
                # EOF\n";
    let expo = parse_exposition(text);
    assert_eq!(expo.samples.len(), 5, "{:?}", expo.samples);
    assert_eq!(
        expo.samples[0].labels["cmd"], "we\"ird, {x}",
        "{:?}",
        expo.samples[0]
    );
    assert_eq!(expo.sum("nasd_events_finished_total", &[("nas", "1")]), 2.0);
    for name in [
        "nasd_events_finished_total",
        "nasd_events_retried_total",
        "nasd_command_duration_seconds_bucket",
        "nasd_command_duration_seconds_count",
        "nasd_db_up",
        "nasd_never_seen",
    ] {
        assert!(expo.exposes(name), "{name}");
    }
    for name in [
        "nasd_events_retried",
        "nasd_command_duration_seconds",
        "nasd_events_finished_total_total",
        "nasd_db",
    ] {
        assert!(!expo.exposes(name), "{name}");
    }
    assert_eq!(
        expo.labels_of("nasd_command_duration_seconds_bucket"),
        Some(strings(&["le", "nas"]).into_iter().collect())
    );
    assert_eq!(expo.labels_of("nasd_never_seen"), None);
}

#[test]
fn check_names_the_missing_metric_and_label() {
    let expo = parse_exposition(
        "# TYPE nasd_queue_depth gauge\nnasd_queue_depth{nas=\"1\"} 3\n\
         # TYPE nasd_history_rows gauge\nnasd_history_rows 3\n",
    );
    let query = |expr: &str, legend: &[&str]| Query {
        at: "here".into(),
        expr: expr.into(),
        shown_labels: strings(legend),
        label_value: None,
    };
    let cases: [(Query, &[&str]); 7] = [
        (query("max by (nas) (nasd_queue_depth)", &["nas"]), &[]),
        (
            query("nasd_queue_dept", &[]),
            &["metric `nasd_queue_dept` is not exposed"],
        ),
        (
            query(r#"nasd_queue_depth{cmd="x"}"#, &[]),
            &["label `cmd` is not on `nasd_queue_depth`"],
        ),
        (
            query("sum by (outcome) (nasd_queue_depth)", &[]),
            &["grouping label `outcome` is on none of"],
        ),
        (
            query("max(nasd_queue_depth)", &["nas"]),
            &["shows label `nas`, which the result"],
        ),
        (query(r#"up{job="nasd"} == 0"#, &["instance"]), &[]),
        // Not on this backend: neither the name nor its labels are held against it.
        (query("max(nasd_history_bytes)", &[]), &[]),
    ];
    for (q, expected) in cases {
        let problems = check_query(&q, &expo, &["nasd_history_bytes"]);
        assert_eq!(problems.len(), expected.len(), "{}: {problems:?}", q.expr);
        for (p, e) in problems.iter().zip(expected) {
            assert!(p.contains(e), "{}: {p:?} should say {e:?}", q.expr);
        }
    }
}

#[test]
fn rules_file_reader_reads_plain_quoted_and_block_values() {
    let yaml = "groups:\n\
                \x20 - name: g\n\
                \x20   rules:\n\
                \x20     - alert: One\n\
                \x20       expr: up{job=\"nasd\"} == 0\n\
                \x20       for: 2m\n\
                \x20       labels:\n\
                \x20         severity: critical\n\
                \x20       annotations:\n\
                \x20         summary: \"nasd {{ $labels.instance }}: \\\"down\\\"\"\n\
                \x20         description: 'it''s down'\n\
                \n\
                \x20     - alert: Two\n\
                \x20       expr: >-\n\
                \x20         sum by (nas) (a)\n\
                \n\
                \x20         > 0\n\
                \x20       for: 5m\n\
                \x20 - name: h\n\
                \x20   rules:\n\
                \x20     - alert: Three\n\
                \x20       expr: |\n\
                \x20         b\n";
    let rules = rule_fields(yaml);
    type Got<'a> = (&'a str, usize, Vec<(&'a str, &'a str)>);
    let got: Vec<Got> = rules
        .iter()
        .map(|r| {
            (
                r.alert.as_str(),
                r.line,
                r.fields
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (
                "One",
                4,
                vec![
                    ("annotations.description", "it's down"),
                    (
                        "annotations.summary",
                        "nasd {{ $labels.instance }}: \"down\""
                    ),
                    ("expr", "up{job=\"nasd\"} == 0"),
                    ("for", "2m"),
                    ("labels.severity", "critical"),
                ]
            ),
            (
                "Two",
                13,
                vec![("expr", "sum by (nas) (a)\n\n> 0"), ("for", "5m")]
            ),
            ("Three", 21, vec![("expr", "b")]),
        ]
    );
}

#[test]
fn dashboard_is_importable() {
    let d = read_dashboard();
    let inputs = d["__inputs"].as_array().expect("__inputs");
    assert!(
        inputs.iter().any(|i| i["name"] == "DS_PROMETHEUS"
            && i["type"] == "datasource"
            && i["pluginId"] == "prometheus"),
        "{DASHBOARD}: __inputs needs the DS_PROMETHEUS datasource: {inputs:?}"
    );
    assert!(
        d["schemaVersion"].as_i64().is_some_and(|v| v >= 36),
        "{DASHBOARD}: schemaVersion {}",
        d["schemaVersion"]
    );
    assert!(
        d["uid"]
            .as_str()
            .is_some_and(|u| !u.is_empty() && u.len() <= 40)
    );
    assert!(d["title"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(
        d["id"].is_null(),
        "{DASHBOARD}: an exported dashboard has id null"
    );
    let ds = serde_json::json!({"type": "prometheus", "uid": "${DS_PROMETHEUS}"});
    let mut ids = BTreeSet::new();
    let panels = all_panels(&d);
    assert!(panels.len() >= 10, "{DASHBOARD}: {} panels", panels.len());
    for p in &panels {
        let title = p["title"].as_str().unwrap_or("");
        assert!(
            !title.is_empty(),
            "{DASHBOARD}: a panel without a title: {p}"
        );
        assert!(
            ids.insert(p["id"].as_i64().expect("panel id")),
            "{DASHBOARD}: panel id {} twice",
            p["id"]
        );
        let grid = &p["gridPos"];
        let (x, w) = (
            grid["x"].as_i64().unwrap_or(-1),
            grid["w"].as_i64().unwrap_or(0),
        );
        assert!(
            x >= 0
                && w > 0
                && x + w <= 24
                && grid["h"].as_i64().is_some()
                && grid["y"].as_i64().is_some(),
            "{DASHBOARD}: panel {title:?} gridPos {grid}"
        );
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"], ds, "{DASHBOARD}: panel {title:?}");
        let targets = p["targets"].as_array().map_or(&[][..], Vec::as_slice);
        assert!(
            !targets.is_empty(),
            "{DASHBOARD}: panel {title:?} has no target"
        );
        let mut refs = BTreeSet::new();
        for t in targets {
            assert_eq!(t["datasource"], ds, "{DASHBOARD}: panel {title:?}");
            assert!(
                refs.insert(t["refId"].as_str().expect("refId")),
                "{DASHBOARD}: panel {title:?}: refId {} twice",
                t["refId"]
            );
            assert!(t["expr"].as_str().is_some_and(|e| !e.trim().is_empty()));
        }
    }
    let vars: Vec<&str> = d["templating"]["list"]
        .as_array()
        .expect("templating")
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    for name in ["instance", "nas"] {
        assert!(
            vars.contains(&name),
            "{DASHBOARD}: no ${name} variable: {vars:?}"
        );
    }
    // Each NAS panel follows the variables.
    for q in dashboard_queries(&d) {
        if q.at.contains("templating") {
            continue;
        }
        assert!(q.expr.contains("$instance"), "{}: ignores $instance", q.at);
        let refs = promql_refs(&q.expr);
        if refs.selector_labels.iter().any(|(_, l)| l == "nas") {
            assert!(q.expr.contains("$nas"), "{}: ignores $nas", q.at);
        }
    }
}

#[test]
fn rules_have_for_severity_and_annotations() {
    let rules = rule_fields(&read(RULES));
    assert!(rules.len() >= 8, "{RULES}: {} rules", rules.len());
    let duration = regex::Regex::new(r"^([0-9]+(ms|s|m|h|d|w|y))+$").unwrap();
    let mut names = BTreeSet::new();
    for r in &rules {
        let at = format!("{RULES}:{}: alert {}", r.line, r.alert);
        assert!(names.insert(&r.alert), "{at}: twice");
        assert!(
            r.alert.starts_with("Nasd") && r.alert.chars().all(|c| c.is_ascii_alphanumeric()),
            "{at}: name"
        );
        for key in [
            "expr",
            "for",
            "annotations.summary",
            "annotations.description",
        ] {
            assert!(
                r.fields.get(key).is_some_and(|v| !v.is_empty()),
                "{at}: no {key}: {:?}",
                r.fields
            );
        }
        assert!(
            duration.is_match(&r.fields["for"]),
            "{at}: for {:?} is not a Prometheus duration",
            r.fields["for"]
        );
        assert!(
            ["critical", "warning", "info"]
                .contains(&r.fields.get("labels.severity").map_or("", String::as_str)),
            "{at}: severity {:?}",
            r.fields.get("labels.severity")
        );
    }
}

/// `promtool check rules` and `promtool test rules` (the unit tests beside the rules),
/// when promtool is installed.
#[test]
fn promtool_checks_and_tests_the_rules() {
    let run = |args: &[&str]| {
        std::process::Command::new("promtool")
            .args(args)
            .current_dir(contrib("prometheus"))
            .output()
    };
    let check = match run(&["check", "rules", "nasd-rules.yml"]) {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!(
                "promtool is not installed (Debian: apt-get install prometheus): \
                 {RULES} checked by the line reader only"
            );
            return;
        }
        Err(e) => panic!("promtool: {e}"),
    };
    assert!(
        check.status.success(),
        "promtool check rules {RULES}:\n{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    let test = run(&["test", "rules", "nasd-rules.test.yml"]).expect("promtool");
    assert!(
        test.status.success(),
        "promtool test rules {RULES_TEST}:\n{}{}",
        String::from_utf8_lossy(&test.stdout),
        String::from_utf8_lossy(&test.stderr)
    );
}
