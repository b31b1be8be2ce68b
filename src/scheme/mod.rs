//! OSS schemes: per-vendor command templates loaded from `schemes/<name>/scheme.toml`,
//! and the rendering of an event's variables into device commands, escaped per dialect.
//!
//! Pure code: no sockets, no database, no async. The transports decide how the
//! rendered commands travel; this module only guarantees that a value coming from
//! billing data can never break out of the argument it was put into.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use minijinja::value::{Value, ValueKind};
use minijinja::{Environment, ErrorKind, UndefinedBehavior};
use serde::Deserialize;

use crate::duration::parse_duration;

pub mod state;

pub use crate::model::Vars;

/// The file every scheme directory holds.
pub const SCHEME_FILE: &str = "scheme.toml";

/// Per-command timeout when `scheme.toml` does not set one.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// How the rendered commands reach the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportKind {
    /// Run the scheme's script with the cmd as argument and the variables in the
    /// environment (compatible with existing OSS `bin/session` scripts).
    Exec,
    /// Render the templates and send them nowhere (benchmarks, tests).
    Null,
    /// SSH: an exec channel per command, or a PTY shell driven by the prompt.
    Ssh,
    /// Telnet: login and password prompts, then commands driven by the prompt.
    Telnet,
    /// RADIUS CoA / Disconnect-Request (RFC 5176): each template is one request.
    Radius,
    /// MikroTik RouterOS API (TCP 8728): each template is one API sentence.
    Api,
}

impl TransportKind {
    /// Whether commands come from `[commands]` templates (everything but exec).
    pub fn uses_templates(self) -> bool {
        self != TransportKind::Exec
    }

    /// The port used when the NAS row does not set one.
    pub fn default_port(self) -> Option<u16> {
        match self {
            TransportKind::Ssh => Some(22),
            TransportKind::Telnet => Some(23),
            TransportKind::Radius => Some(3799),
            TransportKind::Api => Some(8728),
            TransportKind::Exec | TransportKind::Null => None,
        }
    }
}

impl fmt::Display for TransportKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TransportKind::Exec => "exec",
            TransportKind::Null => "null",
            TransportKind::Ssh => "ssh",
            TransportKind::Telnet => "telnet",
            TransportKind::Radius => "radius",
            TransportKind::Api => "api",
        })
    }
}

/// The command language of the device, which decides how values are escaped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dialect {
    /// POSIX sh.
    Shell,
    /// MikroTik RouterOS CLI.
    Routeros,
    /// Cisco IOS CLI: no quoting exists, so unsafe values are refused.
    Cisco,
    /// No quoting; only control characters are refused.
    Plain,
    /// RADIUS request text (radclient style): plain words as they are, anything else
    /// double-quoted with `\\` and `\"` escapes; control characters refused.
    Radius,
}

impl fmt::Display for Dialect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Dialect::Shell => "shell",
            Dialect::Routeros => "routeros",
            Dialect::Cisco => "cisco",
            Dialect::Plain => "plain",
            Dialect::Radius => "radius",
        })
    }
}

/// Why a scheme could not be loaded. Every message names the scheme directory.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchemeError {
    /// The schemes directory itself could not be listed.
    #[error("schemes dir {}: {message}", dir.display())]
    Dir { dir: PathBuf, message: String },
    /// `scheme.toml` is missing, unreadable or not valid TOML for a scheme.
    #[error("scheme {scheme}: scheme.toml: {message}")]
    File { scheme: String, message: String },
    /// The settings contradict each other or point at something that is not there.
    #[error("scheme {scheme}: {message}")]
    Invalid { scheme: String, message: String },
    /// A template does not compile.
    #[error("scheme {scheme}: template {cmd}[{index}]: {message}")]
    Template {
        scheme: String,
        cmd: String,
        index: usize,
        message: String,
    },
}

impl SchemeError {
    /// The scheme the error is about (None for an unreadable schemes directory).
    pub fn scheme(&self) -> Option<&str> {
        match self {
            SchemeError::Dir { .. } => None,
            SchemeError::File { scheme, .. }
            | SchemeError::Invalid { scheme, .. }
            | SchemeError::Template { scheme, .. } => Some(scheme),
        }
    }
}

/// Why an event could not be turned into commands. Nothing was sent in any case.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    #[error("scheme {scheme} does not define cmd {cmd}")]
    UnknownCmd { scheme: String, cmd: String },
    /// The template failed, e.g. `undefined variable ip`.
    #[error("scheme {scheme}: template {cmd}[{index}]: {message}")]
    Template {
        scheme: String,
        cmd: String,
        index: usize,
        message: String,
    },
    /// A value cannot be written safely in the dialect. The value itself is not part of
    /// the message: it may be a secret (passwords are template variables too).
    #[error(
        "scheme {scheme}: template {cmd}[{index}]: value of {{{{ {expr} }}}} cannot be sent in dialect {dialect}: {reason}"
    )]
    Unsafe {
        scheme: String,
        cmd: String,
        index: usize,
        /// The expression between `{{` and `}}`, as written in the template.
        expr: String,
        dialect: Dialect,
        reason: String,
    },
}

/// `scheme.toml` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SchemeFile {
    #[serde(default)]
    description: String,
    transport: TransportKind,
    #[serde(default = "default_dialect")]
    dialect: Dialect,
    timeout: Option<String>,
    script: Option<PathBuf>,
    cmds: Option<Vec<String>>,
    commands: Option<BTreeMap<String, Vec<String>>>,
    /// ssh: `exec` (a channel per command) or `shell` (PTY, prompt-driven).
    mode: Option<String>,
    /// ssh shell mode and telnet: the device prompt, an anchored regex.
    prompt: Option<String>,
    /// ssh shell mode and telnet: send `enable` after login (password: the NAS secret).
    #[serde(default)]
    enable: bool,
    /// ssh shell mode and telnet: commands sent once per session (paging off).
    #[serde(default)]
    setup: Vec<String>,
    #[serde(default)]
    answers: AnswersFile,
    /// api: speak TLS (RouterOS `api-ssl`, default port 8729).
    #[serde(default)]
    tls: bool,
    /// Groups of cmds that set the same piece of state: of several queued events of
    /// one group in a row for an account, only the last is sent.
    #[serde(default)]
    coalesce: BTreeMap<String, Vec<String>>,
    /// How to read what the NAS holds and what it should hold (`nasd reconcile`).
    state: Option<toml::Value>,
}

/// `[answers]`: how device output is judged, per command.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AnswersFile {
    /// Output matching one of these fails the event (e.g. `^failure:`).
    #[serde(default)]
    failure: Vec<String>,
    /// Output matching one of these means try again later (e.g. a busy device).
    #[serde(default)]
    retry: Vec<String>,
    /// Per cmd: output that looks like a failure but means the wanted state is already
    /// there (e.g. `already have such entry` on an add).
    #[serde(default)]
    benign: BTreeMap<String, Vec<String>>,
}

/// How a device's answers are judged (compiled `[answers]`).
#[derive(Debug, Clone, Default)]
pub struct AnswerPatterns {
    pub failure: Vec<regex::Regex>,
    pub retry: Vec<regex::Regex>,
    pub benign: BTreeMap<String, Vec<regex::Regex>>,
}

/// Settings of the interactive CLI transports (ssh, telnet).
#[derive(Debug, Clone, Default)]
pub struct CliSettings {
    /// ssh: true for PTY shell mode, false for an exec channel per command.
    pub shell: bool,
    pub prompt: Option<regex::Regex>,
    pub enable: bool,
    pub setup: Vec<String>,
}

/// Cmds that are never coalesced: an operator waits for their answer (`user_info`,
/// `user_test`) or they act on a session, not on a piece of state (disconnects).
pub fn never_coalesced(cmd: &str) -> bool {
    cmd == "user_info" || cmd == "user_test" || cmd.contains("disconnect")
}

/// `[coalesce]` as written -> cmd -> group, refusing unknown cmds, a cmd in two groups
/// and the cmds that are never coalesced.
fn coalesce_groups(
    groups: &BTreeMap<String, Vec<String>>,
    defined: impl Fn(&str) -> bool,
) -> Result<BTreeMap<String, String>, String> {
    let mut out: BTreeMap<String, String> = BTreeMap::new();
    for (group, cmds) in groups {
        if cmds.len() < 2 {
            return Err(format!(
                "coalesce.{group}: a group needs at least two cmds, got {}",
                cmds.len()
            ));
        }
        for cmd in cmds {
            if never_coalesced(cmd) {
                return Err(format!(
                    "coalesce.{group}: {cmd} is never coalesced (user_info, user_test and disconnects always run)"
                ));
            }
            if !defined(cmd) {
                return Err(format!(
                    "coalesce.{group}: cmd {cmd} has no template in [commands]"
                ));
            }
            if let Some(other) = out.insert(cmd.clone(), group.clone()) {
                return Err(format!(
                    "coalesce: cmd {cmd} is in two groups ({other} and {group})"
                ));
            }
        }
    }
    Ok(out)
}

fn compile_patterns(what: &str, list: &[String]) -> Result<Vec<regex::Regex>, String> {
    list.iter()
        .map(|p| regex::Regex::new(p).map_err(|e| format!("{what}: bad regex `{p}`: {e}")))
        .collect()
}

fn default_dialect() -> Dialect {
    Dialect::Plain
}

/// One loaded scheme: settings plus compiled templates. Immutable once loaded, so it is
/// shared between workers behind an `Arc`.
pub struct Scheme {
    /// The directory name, which is what a NAS refers to.
    pub name: String,
    pub dir: PathBuf,
    pub description: String,
    pub transport: TransportKind,
    pub dialect: Dialect,
    /// Per command.
    pub timeout: Duration,
    /// Exec only: the scheme directory joined with `script`.
    pub script: Option<PathBuf>,
    /// Exec only: the cmds the script handles; None means every cmd.
    allowed: Option<BTreeSet<String>>,
    /// Template schemes: the sources per cmd, in sending order.
    commands: BTreeMap<String, Vec<String>>,
    /// How device answers are judged.
    pub answers: AnswerPatterns,
    /// ssh / telnet session settings.
    pub cli: CliSettings,
    /// api: TLS (RouterOS `api-ssl`) instead of plain TCP.
    pub tls: bool,
    /// `[coalesce]`: cmd -> the name of its group.
    coalesce: BTreeMap<String, String>,
    /// `[state]`: reading the NAS's state and the expected facts (`nasd reconcile`).
    pub state: Option<state::StateSpec>,
    /// Holds every template compiled, named `cmd[index]`.
    env: Environment<'static>,
    /// The text of scheme.toml as loaded, to tell an edited scheme from a reloaded one.
    source: String,
}

impl fmt::Debug for Scheme {
    // The environment is left out: it repeats the templates and is noisy.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scheme")
            .field("name", &self.name)
            .field("dir", &self.dir)
            .field("description", &self.description)
            .field("transport", &self.transport)
            .field("dialect", &self.dialect)
            .field("timeout", &self.timeout)
            .field("script", &self.script)
            .field("allowed", &self.allowed)
            .field("commands", &self.commands)
            .finish()
    }
}

impl Scheme {
    /// Loads `dir/scheme.toml`, checks it and compiles every template, so that a broken
    /// scheme is reported when it is loaded rather than when an event needs it.
    pub fn load(dir: &Path) -> Result<Scheme, SchemeError> {
        let name = scheme_name(dir);
        let invalid = |message: String| SchemeError::Invalid {
            scheme: name.clone(),
            message,
        };
        let path = dir.join(SCHEME_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| SchemeError::File {
            scheme: name.clone(),
            message: match e.kind() {
                std::io::ErrorKind::NotFound => "not found".to_string(),
                _ => format!("cannot read: {e}"),
            },
        })?;
        let file: SchemeFile = toml::from_str(&text).map_err(|e| SchemeError::File {
            scheme: name.clone(),
            message: toml_message(&text, &e),
        })?;

        let timeout = match &file.timeout {
            None => DEFAULT_TIMEOUT,
            Some(t) => parse_duration(t).map_err(|e| invalid(format!("timeout: {e}")))?,
        };
        if timeout.is_zero() {
            return Err(invalid("timeout must be more than 0".to_string()));
        }

        let mut script = None;
        let mut allowed = None;
        let mut commands = BTreeMap::new();
        match file.transport {
            TransportKind::Exec => {
                let Some(rel) = &file.script else {
                    return Err(invalid("transport exec needs `script`".to_string()));
                };
                if file.commands.is_some() {
                    return Err(invalid(
                        "transport exec does not use [commands] (the script gets the cmd as its argument)"
                            .to_string(),
                    ));
                }
                let resolved = dir.join(rel);
                check_script(&resolved, rel).map_err(invalid)?;
                script = Some(resolved);
                if let Some(cmds) = file.cmds {
                    for cmd in &cmds {
                        check_cmd_name(cmd).map_err(invalid)?;
                    }
                    allowed = Some(cmds.into_iter().collect());
                }
            }
            _ => {
                let transport = file.transport;
                if file.script.is_some() {
                    return Err(invalid(format!(
                        "transport {transport} does not use `script`"
                    )));
                }
                if file.cmds.is_some() {
                    return Err(invalid(format!(
                        "transport {transport} does not use `cmds` (the cmds are the keys of [commands])"
                    )));
                }
                let Some(cmds) = file.commands else {
                    return Err(invalid(format!("transport {transport} needs [commands]")));
                };
                for cmd in cmds.keys() {
                    check_cmd_name(cmd).map_err(invalid)?;
                }
                commands = cmds;
            }
        }

        let answers = AnswerPatterns {
            failure: compile_patterns("answers.failure", &file.answers.failure).map_err(invalid)?,
            retry: compile_patterns("answers.retry", &file.answers.retry).map_err(invalid)?,
            benign: file
                .answers
                .benign
                .iter()
                .map(|(cmd, list)| {
                    compile_patterns(&format!("answers.benign.{cmd}"), list)
                        .map(|p| (cmd.clone(), p))
                })
                .collect::<Result<_, _>>()
                .map_err(invalid)?,
        };
        let shell = match file.mode.as_deref() {
            None | Some("exec") => false,
            Some("shell") => true,
            Some(other) => {
                return Err(invalid(format!("mode must be exec or shell, got {other}")));
            }
        };
        if shell && file.transport != TransportKind::Ssh {
            return Err(invalid("mode = \"shell\" is for transport ssh".to_string()));
        }
        let prompt = match &file.prompt {
            None => None,
            Some(p) => Some(
                regex::Regex::new(p)
                    .map_err(|e| invalid(format!("prompt: bad regex `{p}`: {e}")))?,
            ),
        };
        let cli = CliSettings {
            shell,
            prompt,
            enable: file.enable,
            setup: file.setup,
        };
        if file.tls && file.transport != TransportKind::Api {
            return Err(invalid("tls = true is for transport api".to_string()));
        }
        let defined = |cmd: &str| match file.transport {
            TransportKind::Exec => allowed
                .as_ref()
                .is_none_or(|a: &BTreeSet<String>| a.contains(cmd)),
            _ => commands.contains_key(cmd),
        };
        let coalesce = coalesce_groups(&file.coalesce, defined).map_err(invalid)?;
        let state = match &file.state {
            None => None,
            Some(raw) => Some(
                state::StateSpec::parse(raw.clone(), file.dialect, defined)
                    .map_err(|e| invalid(format!("[state]: {e}")))?,
            ),
        };
        let env = build_env(file.dialect, &name, &commands)?;
        Ok(Scheme {
            coalesce,
            state,
            answers,
            cli,
            tls: file.tls,
            name,
            dir: dir.to_path_buf(),
            description: file.description,
            transport: file.transport,
            dialect: file.dialect,
            timeout,
            script,
            allowed,
            commands,
            env,
            source: text,
        })
    }

    /// Whether `other` was loaded from the same directory and the same scheme.toml text
    /// (a resync reloads every scheme; only an edit makes it a different one).
    pub fn same_as(&self, other: &Scheme) -> bool {
        self.dir == other.dir && self.source == other.source
    }

    /// The `[coalesce]` group `cmd` belongs to, if any.
    pub fn coalesce_group(&self, cmd: &str) -> Option<&str> {
        self.coalesce.get(cmd).map(String::as_str)
    }

    /// Whether the scheme handles `cmd`: it has templates for it, or (exec) the script is
    /// allowed to get it. An exec scheme without a `cmds` list allows every cmd.
    pub fn defines(&self, cmd: &str) -> bool {
        match self.transport {
            TransportKind::Exec => self.allowed.as_ref().is_none_or(|a| a.contains(cmd)),
            _ => self.commands.contains_key(cmd),
        }
    }

    /// Sorted names of the cmds with templates (or of the exec allow-list; empty for an
    /// exec scheme that allows everything).
    pub fn cmds(&self) -> Vec<String> {
        match self.transport {
            TransportKind::Exec => self
                .allowed
                .as_ref()
                .map(|a| a.iter().cloned().collect())
                .unwrap_or_default(),
            _ => self.commands.keys().cloned().collect(),
        }
    }

    /// The template sources of `cmd` as written, for showing a scheme to an operator.
    pub fn templates(&self, cmd: &str) -> Option<&[String]> {
        self.commands.get(cmd).map(Vec::as_slice)
    }

    /// Renders the templates of `cmd` in order with `vars`. Every value inserted by
    /// `{{ }}` is escaped for the scheme's dialect.
    ///
    /// An exec scheme has no templates: for a cmd it allows, this returns no commands
    /// (the exec transport builds its own command line).
    pub fn render(&self, cmd: &str, vars: &Vars) -> Result<Vec<String>, RenderError> {
        let Some(sources) = self.commands.get(cmd) else {
            if self.transport == TransportKind::Exec && self.defines(cmd) {
                return Ok(Vec::new());
            }
            return Err(RenderError::UnknownCmd {
                scheme: self.name.clone(),
                cmd: cmd.to_string(),
            });
        };
        let ctx = Value::from_serialize(vars);
        let mut out = Vec::with_capacity(sources.len());
        for index in 0..sources.len() {
            let template = self
                .env
                .get_template(&template_name(cmd, index))
                .map_err(|e| self.template_error(cmd, index, error_text(&e)))?;
            let text = template
                .render(&ctx)
                .map_err(|e| self.error_without_secrets(cmd, index, &template, vars, &e))?;
            out.push(text);
        }
        Ok(out)
    }

    /// `render_error`, with nothing of a secret variable's value in it. minijinja
    /// repeats values in some messages (`unable to calculate <a> - <b>`, an `include`
    /// name), quoted, escaped or filtered in ways no search for the value would find;
    /// so the failing template is rendered again with the secrets replaced by `***`,
    /// and that error is reported. `Unsafe` errors never carry values and stay.
    fn error_without_secrets(
        &self,
        cmd: &str,
        index: usize,
        template: &minijinja::Template<'_, '_>,
        vars: &Vars,
        err: &minijinja::Error,
    ) -> RenderError {
        let error = self.render_error(cmd, index, template, vars, err);
        if !matches!(error, RenderError::Template { .. })
            || !SECRET_VARS.iter().any(|name| vars.contains_key(*name))
        {
            return error;
        }
        let mut masked = vars.clone();
        for name in SECRET_VARS {
            if let Some(value) = masked.get_mut(name) {
                *value = "***".into();
            }
        }
        match template.render(Value::from_serialize(&masked)) {
            Err(e) => match self.render_error(cmd, index, template, &masked, &e) {
                masked_error @ RenderError::Template { .. } => masked_error,
                _ => self.template_error(cmd, index, SECRET_WITHHELD.to_string()),
            },
            Ok(_) => self.template_error(cmd, index, SECRET_WITHHELD.to_string()),
        }
    }

    fn template_error(&self, cmd: &str, index: usize, message: String) -> RenderError {
        RenderError::Template {
            scheme: self.name.clone(),
            cmd: cmd.to_string(),
            index,
            message,
        }
    }

    /// Turns a minijinja error into a message an operator can act on: which variable is
    /// missing, or which expression produced a value the dialect cannot carry.
    fn render_error(
        &self,
        cmd: &str,
        index: usize,
        template: &minijinja::Template<'_, '_>,
        vars: &Vars,
        err: &minijinja::Error,
    ) -> RenderError {
        let expr = failing_expr(err);
        match format_failure(err) {
            Some(FormatFailure::Unsafe(reason)) => {
                return RenderError::Unsafe {
                    scheme: self.name.clone(),
                    cmd: cmd.to_string(),
                    index,
                    expr: expr.unwrap_or_else(|| "?".to_string()),
                    dialect: self.dialect,
                    reason: reason.clone(),
                };
            }
            Some(FormatFailure::None) => {
                let what = expr.map_or_else(|| "a value".to_string(), |e| format!("{{{{ {e} }}}}"));
                return self.template_error(
                    cmd,
                    index,
                    format!("{what} is none (null in the event variables)"),
                );
            }
            None => {}
        }
        if err.kind() != ErrorKind::UndefinedError {
            return self.template_error(cmd, index, error_text(err));
        }
        // minijinja says only "undefined value"; the span and the template's free
        // variables tell which name is missing.
        let globals: HashSet<&str> = self.env.globals().map(|(name, _)| name).collect();
        let mut missing: Vec<String> = template
            .undeclared_variables(false)
            .into_iter()
            .filter(|v| !vars.contains_key(v) && !globals.contains(v.as_str()))
            .collect();
        missing.sort();
        let span = span_text(err);
        let message = match span {
            Some(s) if is_identifier(&s) && missing.contains(&s) => {
                format!("undefined variable {s}")
            }
            _ if missing.len() == 1 => format!("undefined variable {}", missing[0]),
            _ if missing.len() > 1 => format!("undefined variables {}", missing.join(", ")),
            _ => match expr {
                Some(e) => format!("undefined value in {{{{ {e} }}}}"),
                None => "undefined value".to_string(),
            },
        };
        self.template_error(cmd, index, message)
    }
}

/// All schemes of the schemes directory, by name.
#[derive(Debug, Clone, Default)]
pub struct SchemeSet {
    schemes: BTreeMap<String, Arc<Scheme>>,
}

impl SchemeSet {
    /// Loads every subdirectory of `dir` containing scheme.toml. A broken scheme does not
    /// stop the others: it is returned in the error list.
    pub fn load_dir(dir: &Path) -> (SchemeSet, Vec<SchemeError>) {
        SchemeSet::load_dirs(&[dir.to_path_buf()])
    }

    /// Loads the schemes of several directories (`[daemon] schemes_dir` as a list): a
    /// scheme name is taken from the first directory that has it, even when that copy
    /// is broken (it is reported, and the later copy is not used in its place), so an
    /// operator's scheme in /etc/nasd/schemes hides the packaged one of the same name.
    pub fn load_dirs(dirs: &[PathBuf]) -> (SchemeSet, Vec<SchemeError>) {
        let mut set = SchemeSet::empty();
        let mut errors = Vec::new();
        let mut taken = HashSet::new();
        for dir in dirs {
            for path in scheme_dirs_in(dir, &mut errors) {
                if !taken.insert(scheme_name(&path)) {
                    continue;
                }
                match Scheme::load(&path) {
                    Ok(scheme) => {
                        set.insert(scheme);
                    }
                    Err(e) => errors.push(e),
                }
            }
        }
        (set, errors)
    }

    pub fn get(&self, name: &str) -> Option<Arc<Scheme>> {
        self.schemes.get(name).cloned()
    }

    /// Sorted scheme names.
    pub fn names(&self) -> Vec<String> {
        self.schemes.keys().cloned().collect()
    }

    pub fn empty() -> SchemeSet {
        SchemeSet::default()
    }

    /// Adds (or replaces) a scheme under its name.
    pub fn insert(&mut self, scheme: Scheme) -> Arc<Scheme> {
        let scheme = Arc::new(scheme);
        self.schemes
            .insert(scheme.name.clone(), Arc::clone(&scheme));
        scheme
    }

    pub fn len(&self) -> usize {
        self.schemes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.schemes.is_empty()
    }
}

/// The subdirectories of `dir` holding a scheme.toml, sorted (so that errors come out
/// in the same order on every reload); what cannot be read is added to `errors`.
fn scheme_dirs_in(dir: &Path, errors: &mut Vec<SchemeError>) -> Vec<PathBuf> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => {
            errors.push(SchemeError::Dir {
                dir: dir.to_path_buf(),
                message: format!("cannot read: {e}"),
            });
            return Vec::new();
        }
    };
    let mut dirs = Vec::new();
    for entry in entries {
        match entry {
            Ok(entry) => {
                let path = entry.path();
                // Hidden directories are editor or VCS leftovers, not schemes.
                let hidden = entry.file_name().to_string_lossy().starts_with('.');
                if !hidden && path.is_dir() && path.join(SCHEME_FILE).exists() {
                    dirs.push(path);
                }
            }
            Err(e) => errors.push(SchemeError::Dir {
                dir: dir.to_path_buf(),
                message: format!("cannot read an entry: {e}"),
            }),
        }
    }
    dirs.sort();
    dirs
}

/// Escapes `value` so that the device reads it back as exactly one argument equal to
/// `value`. `Err` carries the reason when the dialect cannot carry the value at all; the
/// reason never repeats the value, which may be a secret.
pub fn escape(dialect: Dialect, value: &str) -> Result<String, String> {
    match dialect {
        Dialect::Shell => escape_shell(value),
        Dialect::Routeros => escape_routeros(value),
        Dialect::Cisco => escape_cisco(value),
        Dialect::Plain => escape_plain(value),
        Dialect::Radius => escape_radius(value),
    }
}

fn all_in(value: &str, extra: &str) -> bool {
    !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || extra.contains(c))
}

fn describe(c: char) -> String {
    match c {
        ' ' => "a space".to_string(),
        '\n' => "a newline".to_string(),
        '\r' => "a carriage return".to_string(),
        '\t' => "a tab".to_string(),
        '\0' => "a NUL byte".to_string(),
        c if c.is_control() => format!("control character U+{:04X}", u32::from(c)),
        c => format!("`{c}`"),
    }
}

fn escape_shell(value: &str) -> Result<String, String> {
    if value.contains('\0') {
        return Err("contains a NUL byte, which no shell argument can hold".to_string());
    }
    // Leaving plain words unquoted keeps the logged command lines readable.
    if all_in(value, "_./:@%+=,-") {
        return Ok(value.to_string());
    }
    // Inside single quotes nothing is special except the closing quote itself.
    let mut out = String::with_capacity(value.len() + 2);
    out.push('\'');
    for c in value.chars() {
        if c == '\'' {
            out.push_str("'\\''");
        } else {
            out.push(c);
        }
    }
    out.push('\'');
    Ok(out)
}

fn escape_routeros(value: &str) -> Result<String, String> {
    // `=` is not safe unquoted: it would split `name=value` arguments.
    if all_in(value, "_./:@%+,-") {
        return Ok(value.to_string());
    }
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            // `$` starts variable substitution and `?` asks for help inside strings.
            '$' => out.push_str("\\$"),
            '?' => out.push_str("\\?"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => {
                return Err(format!("contains {}", describe(c)));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    Ok(out)
}

fn escape_cisco(value: &str) -> Result<String, String> {
    if value.is_empty() {
        return Err("empty value (the cisco CLI has no quoting)".to_string());
    }
    if let Some(c) = value
        .chars()
        .find(|&c| !(c.is_ascii_alphanumeric() || "_./:@%+,=-".contains(c)))
    {
        return Err(format!(
            "contains {} (the cisco CLI has no quoting; allowed are letters, digits and _./:@%+,=-)",
            describe(c)
        ));
    }
    Ok(value.to_string())
}

fn escape_radius(value: &str) -> Result<String, String> {
    if let Some(c) = value.chars().find(|c| c.is_control()) {
        return Err(format!("contains {}", describe(c)));
    }
    if all_in(value, "_./:@%+-") {
        return Ok(value.to_string());
    }
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    Ok(out)
}

fn escape_plain(value: &str) -> Result<String, String> {
    // C1 controls (U+0080..U+009F) are refused too: no attribute value needs them.
    match value.chars().find(|c| c.is_control()) {
        Some(c) => Err(format!("contains {}", describe(c))),
        None => Ok(value.to_string()),
    }
}

/// Why the formatter refused a value; carried as the source of the minijinja error so
/// that `render` can tell it from template errors.
#[derive(Debug)]
enum FormatFailure {
    Unsafe(String),
    None,
}

impl fmt::Display for FormatFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FormatFailure::Unsafe(reason) => f.write_str(reason),
            FormatFailure::None => f.write_str("value is none"),
        }
    }
}

impl std::error::Error for FormatFailure {}

fn format_failure(err: &minijinja::Error) -> Option<&FormatFailure> {
    let mut source = std::error::Error::source(err);
    while let Some(e) = source {
        if let Some(f) = e.downcast_ref::<FormatFailure>() {
            return Some(f);
        }
        source = e.source();
    }
    None
}

fn build_env(
    dialect: Dialect,
    scheme: &str,
    commands: &BTreeMap<String, Vec<String>>,
) -> Result<Environment<'static>, SchemeError> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    // Debug mode keeps the span of a failing expression, which names it in errors.
    env.set_debug(true);
    // `debug()` prints the whole context, secrets included, into a command or (as an
    // `include` name) into an error message; no scheme needs it.
    env.remove_global("debug");
    // Every `{{ }}` output goes through here. Safe-marking (`|safe`, `|e`) is ignored on
    // purpose: values come from billing data and must never escape their argument.
    env.set_formatter(move |out, _state, value| {
        if value.is_undefined() {
            // Strict mode has already refused real undefined values; what is left is the
            // missing `else` of `{{ x if cond }}`, which prints nothing as in Jinja.
            return Ok(());
        }
        if value.is_none() {
            // "none" sent to a device is never what the scheme author meant.
            return Err(
                minijinja::Error::new(ErrorKind::InvalidOperation, "value is none")
                    .with_source(FormatFailure::None),
            );
        }
        let text: Cow<'_, str> = match (value.as_str(), value.kind()) {
            (Some(s), _) => Cow::Borrowed(s),
            // minijinja prints Python's `True`; the variables came from JSON, so write
            // them back the way billing wrote them.
            (None, ValueKind::Bool) => {
                Cow::Borrowed(if value.is_true() { "true" } else { "false" })
            }
            (None, _) => Cow::Owned(value.to_string()),
        };
        match escape(dialect, &text) {
            Ok(escaped) => out.write_str(&escaped).map_err(minijinja::Error::from),
            Err(reason) => Err(
                minijinja::Error::new(ErrorKind::InvalidOperation, reason.clone())
                    .with_source(FormatFailure::Unsafe(reason)),
            ),
        }
    });
    for (cmd, sources) in commands {
        for (index, source) in sources.iter().enumerate() {
            env.add_template_owned(template_name(cmd, index), source.clone())
                .map_err(|e| SchemeError::Template {
                    scheme: scheme.to_string(),
                    cmd: cmd.clone(),
                    index,
                    message: error_text(&e),
                })?;
        }
    }
    Ok(env)
}

/// Variables that hold secrets (see `dispatch::attempt_vars`). Templates may use them;
/// render errors never show their values (`Scheme::error_without_secrets`).
pub const SECRET_VARS: [&str; 3] = ["nas_password", "telnet_password", "coa_psw"];

/// The message of a render error that only the real value of a secret causes.
const SECRET_WITHHELD: &str =
    "fails on the value of a secret variable (message withheld: it would show the value)";

/// Unique per (cmd, index): the suffix is always one `[n]`.
fn template_name(cmd: &str, index: usize) -> String {
    format!("{cmd}[{index}]")
}

/// The directory name; for paths such as `.` the canonical path's last component.
fn scheme_name(dir: &Path) -> String {
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .or_else(|| {
            dir.canonicalize()
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        })
        .unwrap_or_else(|| dir.display().to_string())
}

/// Cmd names travel as a script argument and into logs: keep them plain words.
fn check_cmd_name(cmd: &str) -> Result<(), String> {
    if all_in(cmd, "_.-") {
        Ok(())
    } else {
        Err(format!(
            "cmd name `{cmd}` is not valid (letters, digits, _ . - only)"
        ))
    }
}

fn check_script(path: &Path, as_written: &Path) -> Result<(), String> {
    let shown = as_written.display();
    let meta = match std::fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(format!("script {shown} not found"));
        }
        Err(e) => return Err(format!("script {shown}: {e}")),
    };
    if !meta.is_file() {
        return Err(format!("script {shown} is not a file"));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if meta.permissions().mode() & 0o111 == 0 {
            return Err(format!("script {shown} is not executable (chmod +x)"));
        }
    }
    Ok(())
}

/// The TOML error message on one line, with the line number (toml's own Display draws a
/// multi-line source excerpt, which does not fit a log line).
fn toml_message(text: &str, err: &toml::de::Error) -> String {
    let message = err.message().trim_end().replace('\n', " ");
    match err.span() {
        Some(span) => {
            let line = text
                .get(..span.start)
                .map_or(0, |before| before.matches('\n').count())
                + 1;
            format!("{message} (line {line})")
        }
        None => message,
    }
}

/// `kind: detail` without minijinja's `(in name:line)` suffix: our messages already
/// name the template.
fn error_text(err: &minijinja::Error) -> String {
    match err.detail() {
        Some(detail) => format!("{}: {detail}", err.kind()),
        None => err.kind().to_string(),
    }
}

fn span_text(err: &minijinja::Error) -> Option<String> {
    let source = err.template_source()?;
    let range = err.range()?;
    source.get(range).map(|s| s.trim().to_string())
}

/// The whole `{{ ... }}` expression around the error span (the span alone may be just
/// the last filter, e.g. `safe` in `{{ login|safe }}`).
fn failing_expr(err: &minijinja::Error) -> Option<String> {
    let source = err.template_source()?;
    let range = err.range()?;
    let before = source.get(..range.start)?;
    let open = before.rfind("{{")?;
    if before.rfind("}}").is_some_and(|close| close > open) {
        // The span is not inside an expression block (e.g. `{% if x %}`).
        return span_text(err);
    }
    let after = source.get(range.end..)?;
    let close = range.end + after.find("}}")?;
    let inner = source.get(open + 2..close)?;
    // Whitespace control markers (`{{-`, `-}}`) are not part of the expression.
    let inner = inner
        .trim()
        .trim_start_matches(['-', '+'])
        .trim_end_matches(['-', '+'])
        .trim();
    Some(inner.to_string())
}

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn vars(v: serde_json::Value) -> Vars {
        match v {
            serde_json::Value::Object(map) => map,
            other => panic!("vars must be an object, got {other}"),
        }
    }

    /// Writes a scheme directory `root/name` with `toml` and optional files.
    fn write_scheme(root: &Path, name: &str, toml: &str) -> PathBuf {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).expect("create scheme dir");
        std::fs::write(dir.join(SCHEME_FILE), toml).expect("write scheme.toml");
        dir
    }

    fn write_script(dir: &Path, rel: &str, mode: u32) {
        let path = dir.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("create script dir");
        }
        std::fs::write(&path, "#!/bin/sh\necho \"$1\"\n").expect("write script");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
                .expect("chmod script");
        }
    }

    fn load_err(toml: &str) -> String {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = write_scheme(root.path(), "x", toml);
        match Scheme::load(&dir) {
            Ok(s) => panic!("expected an error, loaded {s:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn null_scheme(dialect: &str, commands: &str) -> Scheme {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = write_scheme(
            root.path(),
            "x",
            &format!("transport = \"null\"\ndialect = \"{dialect}\"\n[commands]\n{commands}"),
        );
        Scheme::load(&dir).expect("scheme loads")
    }

    // ---- escape tables -------------------------------------------------------------

    #[test]
    fn escape_shell_table() {
        let cases: &[(&str, Result<&str, ()>)] = &[
            ("10.0.0.1", Ok("10.0.0.1")),
            ("user@example.com", Ok("user@example.com")),
            ("a=b,c", Ok("a=b,c")),
            ("", Ok("''")),
            ("x; /system reset", Ok("'x; /system reset'")),
            ("a\"b", Ok("'a\"b'")),
            ("$(reboot)", Ok("'$(reboot)'")),
            ("`id`", Ok("'`id`'")),
            ("it's", Ok("'it'\\''s'")),
            ("a\nreboot", Ok("'a\nreboot'")),
            ("a\\b", Ok("'a\\b'")),
            ("~root", Ok("'~root'")),
            ("*", Ok("'*'")),
            ("Иван", Ok("'Иван'")),
            ("a\0b", Err(())),
        ];
        for (input, want) in cases {
            let got = escape(Dialect::Shell, input).map_err(|_| ());
            assert_eq!(got.as_deref(), want.as_deref(), "input {input:?}");
        }
    }

    #[test]
    fn escape_routeros_table() {
        let cases: &[(&str, Result<&str, ()>)] = &[
            ("10.0.0.1", Ok("10.0.0.1")),
            ("10M/10M", Ok("10M/10M")),
            ("crb_10.0.0.1", Ok("crb_10.0.0.1")),
            ("a=b", Ok("\"a=b\"")),
            ("", Ok("\"\"")),
            ("x; /system reset", Ok("\"x; /system reset\"")),
            ("a\"b", Ok("\"a\\\"b\"")),
            ("$(reboot)", Ok("\"\\$(reboot)\"")),
            ("`id`", Ok("\"`id`\"")),
            ("[/system reboot]", Ok("\"[/system reboot]\"")),
            ("what?", Ok("\"what\\?\"")),
            ("a\\b", Ok("\"a\\\\b\"")),
            ("a\n/system reset", Ok("\"a\\n/system reset\"")),
            ("a\r\tb", Ok("\"a\\r\\tb\"")),
            ("Иван", Ok("\"Иван\"")),
            ("a\u{1b}b", Err(())),
            ("a\0b", Err(())),
            ("a\u{7f}", Err(())),
        ];
        for (input, want) in cases {
            let got = escape(Dialect::Routeros, input).map_err(|_| ());
            assert_eq!(got.as_deref(), want.as_deref(), "input {input:?}");
        }
    }

    #[test]
    fn escape_cisco_table() {
        let cases: &[(&str, Result<&str, ()>)] = &[
            ("10.0.0.1", Ok("10.0.0.1")),
            (
                "subscriber:service-name=RATE_10M",
                Ok("subscriber:service-name=RATE_10M"),
            ),
            ("Gi0/0/1.100", Ok("Gi0/0/1.100")),
            ("", Err(())),
            ("x; reload", Err(())),
            ("a b", Err(())),
            ("a\"b", Err(())),
            ("$(reboot)", Err(())),
            ("`id`", Err(())),
            ("a\nreload", Err(())),
            ("Иван", Err(())),
            ("a?", Err(())),
        ];
        for (input, want) in cases {
            let got = escape(Dialect::Cisco, input).map_err(|_| ());
            assert_eq!(got.as_deref(), want.as_deref(), "input {input:?}");
        }
    }

    #[test]
    fn escape_plain_table() {
        let cases: &[(&str, Result<&str, ()>)] = &[
            ("10M/10M", Ok("10M/10M")),
            ("", Ok("")),
            ("x; /system reset", Ok("x; /system reset")),
            ("a\"b", Ok("a\"b")),
            ("$(reboot)", Ok("$(reboot)")),
            ("`id`", Ok("`id`")),
            ("Иван 😀", Ok("Иван 😀")),
            ("a\nb", Err(())),
            ("a\rb", Err(())),
            ("a\tb", Err(())),
            ("a\0b", Err(())),
            ("a\u{7f}", Err(())),
            ("a\u{85}", Err(())),
        ];
        for (input, want) in cases {
            let got = escape(Dialect::Plain, input).map_err(|_| ());
            assert_eq!(got.as_deref(), want.as_deref(), "input {input:?}");
        }
    }

    #[test]
    fn escape_reasons_do_not_repeat_the_value() {
        let cases = [
            (Dialect::Cisco, "s3cret pass", "a space"),
            (
                Dialect::Routeros,
                "s3cret\u{1b}",
                "control character U+001B",
            ),
            (Dialect::Plain, "s3cret\n", "a newline"),
            (Dialect::Shell, "s3cret\0", "NUL"),
        ];
        for (dialect, secret, want) in cases {
            let reason = escape(dialect, secret).expect_err("refused");
            assert!(!reason.contains("s3cret"), "{reason}");
            assert!(reason.contains(want), "{dialect}: {reason}");
        }
    }

    // ---- property-style checks -----------------------------------------------------

    /// xorshift64: deterministic, no extra crate.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    const NASTY: &[char] = &[
        'a', 'Z', '0', '9', '_', '-', '.', '/', ':', '@', '%', '+', '=', ',', '\'', '"', '\\', '$',
        ';', '|', '&', ' ', '\n', '\r', '\t', '[', ']', '{', '}', '(', ')', '`', '*', '?', '#',
        '~', '!', '<', '>', 'ж', '€', '😀', '\u{7f}', '\u{1}', '\u{85}', '\0',
    ];

    fn nasty_strings(seed: u64, count: usize) -> Vec<String> {
        let mut rng = Rng(seed);
        (0..count)
            .map(|_| {
                let len = rng.below(12);
                (0..len).map(|_| NASTY[rng.below(NASTY.len())]).collect()
            })
            .collect()
    }

    /// A POSIX-ish word splitter: single quotes, double quotes, backslash. It refuses any
    /// unquoted character the shell would treat specially, so a passing value cannot
    /// start a new command, a substitution, a redirection or a glob.
    fn shell_words(line: &str) -> Result<Vec<String>, String> {
        let mut words = Vec::new();
        let mut word = String::new();
        let mut in_word = false;
        let mut chars = line.chars();
        while let Some(c) = chars.next() {
            match c {
                ' ' | '\t' => {
                    if in_word {
                        words.push(std::mem::take(&mut word));
                        in_word = false;
                    }
                }
                '\'' => {
                    in_word = true;
                    loop {
                        match chars.next() {
                            Some('\'') => break,
                            Some(c) => word.push(c),
                            None => return Err("unterminated single quote".into()),
                        }
                    }
                }
                '"' => {
                    in_word = true;
                    loop {
                        match chars.next() {
                            Some('"') => break,
                            Some('\\') => match chars.next() {
                                Some(c @ ('$' | '`' | '"' | '\\')) => word.push(c),
                                Some('\n') => {}
                                Some(c) => {
                                    word.push('\\');
                                    word.push(c);
                                }
                                None => return Err("unterminated double quote".into()),
                            },
                            Some(c @ ('$' | '`')) => {
                                return Err(format!("expansion {c:?} inside double quotes"));
                            }
                            Some(c) => word.push(c),
                            None => return Err("unterminated double quote".into()),
                        }
                    }
                }
                '\\' => match chars.next() {
                    Some('\n') => {}
                    Some(c) => {
                        in_word = true;
                        word.push(c);
                    }
                    None => return Err("trailing backslash".into()),
                },
                c if c.is_ascii_alphanumeric() || "_./:@%+=,-".contains(c) => {
                    in_word = true;
                    word.push(c);
                }
                // Command separators written in a template's literal text are words of
                // their own, so a value that adds one changes the word count.
                c @ (';' | '&' | '|') => {
                    if in_word {
                        words.push(std::mem::take(&mut word));
                        in_word = false;
                    }
                    words.push(c.to_string());
                }
                c => return Err(format!("unquoted special character {c:?}")),
            }
        }
        if in_word {
            words.push(word);
        }
        Ok(words)
    }

    #[test]
    fn shell_escape_survives_a_tokenizer() {
        for input in nasty_strings(0x9E37_79B9_7F4A_7C15, 20_000) {
            match escape(Dialect::Shell, &input) {
                Ok(escaped) => {
                    let words = shell_words(&format!("echo {escaped}"))
                        .unwrap_or_else(|e| panic!("{input:?} -> {escaped:?}: {e}"));
                    assert_eq!(
                        words,
                        vec!["echo".to_string(), input.clone()],
                        "{escaped:?}"
                    );
                }
                Err(_) => assert!(input.contains('\0'), "refused {input:?}"),
            }
        }
    }

    /// Reads back a RouterOS value: a bare word, or a double-quoted string with the
    /// escapes RouterOS understands. Refuses an unescaped `"` or `$` inside the quotes.
    fn routeros_unquote(text: &str) -> Result<String, String> {
        let Some(inner) = text.strip_prefix('"') else {
            if text.is_empty() || text.contains(|c: char| " \"\\$?;[]{}=\n".contains(c)) {
                return Err(format!("bare word {text:?} is not plain"));
            }
            return Ok(text.to_string());
        };
        let mut out = String::new();
        let mut chars = inner.chars();
        loop {
            match chars.next() {
                None => return Err("unterminated string".into()),
                Some('"') => break,
                Some('\\') => match chars.next() {
                    Some('\\') => out.push('\\'),
                    Some('"') => out.push('"'),
                    Some('$') => out.push('$'),
                    Some('?') => out.push('?'),
                    Some('n') => out.push('\n'),
                    Some('r') => out.push('\r'),
                    Some('t') => out.push('\t'),
                    other => return Err(format!("unknown escape {other:?}")),
                },
                Some('$') => return Err("unescaped $".into()),
                Some('?') => return Err("unescaped ?".into()),
                Some(c) if c.is_control() => return Err(format!("raw control {c:?}")),
                Some(c) => out.push(c),
            }
        }
        if chars.next().is_some() {
            return Err("text after the closing quote".into());
        }
        Ok(out)
    }

    #[test]
    fn routeros_escape_round_trips() {
        for input in nasty_strings(0xD1B5_4A32_D192_ED03, 20_000) {
            match escape(Dialect::Routeros, &input) {
                Ok(escaped) => {
                    let back = routeros_unquote(&escaped)
                        .unwrap_or_else(|e| panic!("{input:?} -> {escaped:?}: {e}"));
                    assert_eq!(back, input, "{escaped:?}");
                }
                Err(_) => assert!(
                    input
                        .chars()
                        .any(|c| c.is_control() && !"\n\r\t".contains(c)),
                    "refused {input:?}"
                ),
            }
        }
    }

    #[test]
    fn cisco_accepts_only_safe_chars() {
        let safe = |c: char| c.is_ascii_alphanumeric() || "_./:@%+,=-".contains(c);
        let mut accepted = 0;
        for input in nasty_strings(0x2545_F491_4F6C_DD1D, 20_000) {
            match escape(Dialect::Cisco, &input) {
                Ok(out) => {
                    accepted += 1;
                    assert_eq!(out, input);
                    assert!(!input.is_empty() && input.chars().all(safe), "{input:?}");
                }
                Err(_) => assert!(input.is_empty() || !input.chars().all(safe), "{input:?}"),
            }
        }
        // The generator must exercise both branches.
        assert!(accepted > 0);
    }

    // ---- loading -------------------------------------------------------------------

    #[test]
    fn loads_a_null_scheme() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = write_scheme(
            root.path(),
            "mt",
            r#"
description = "test"
transport = "null"
dialect = "routeros"
timeout = "250ms"
[commands]
user_add = ["/a {{ ip }}", "/b {{ ip }}"]
user_del = ["/c {{ ip }}"]
"#,
        );
        let s = Scheme::load(&dir).expect("loads");
        assert_eq!(s.name, "mt");
        assert_eq!(s.description, "test");
        assert_eq!(s.transport, TransportKind::Null);
        assert_eq!(s.dialect, Dialect::Routeros);
        assert_eq!(s.timeout, Duration::from_millis(250));
        assert_eq!(s.script, None);
        assert_eq!(s.cmds(), vec!["user_add", "user_del"]);
        assert!(s.defines("user_add"));
        assert!(!s.defines("user_drop"));
        assert_eq!(
            s.templates("user_add"),
            Some(&["/a {{ ip }}".to_string(), "/b {{ ip }}".to_string()][..])
        );
    }

    #[test]
    fn loads_an_exec_scheme_with_defaults() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = write_scheme(
            root.path(),
            "ex",
            "transport = \"exec\"\nscript = \"bin/session\"\n",
        );
        write_script(&dir, "bin/session", 0o755);
        let s = Scheme::load(&dir).expect("loads");
        assert_eq!(s.dialect, Dialect::Plain);
        assert_eq!(s.timeout, DEFAULT_TIMEOUT);
        assert_eq!(s.script, Some(dir.join("bin/session")));
        assert!(s.defines("anything"));
        assert!(s.cmds().is_empty());
        assert_eq!(s.render("user_add", &Vars::new()), Ok(vec![]));
    }

    #[test]
    fn exec_allow_list() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = write_scheme(
            root.path(),
            "ex",
            "transport = \"exec\"\nscript = \"s.sh\"\ncmds = [\"user_del\", \"user_add\"]\n",
        );
        write_script(&dir, "s.sh", 0o755);
        let s = Scheme::load(&dir).expect("loads");
        assert_eq!(s.cmds(), vec!["user_add", "user_del"]);
        assert!(s.defines("user_add"));
        assert!(!s.defines("user_drop"));
        assert_eq!(
            s.render("user_drop", &Vars::new())
                .map_err(|e| e.to_string()),
            Err("scheme ex does not define cmd user_drop".to_string())
        );
    }

    #[test]
    fn load_errors() {
        let cases = [
            (
                "transport = \"null\"\ntimout = \"5s\"\n[commands]\n",
                "scheme x: scheme.toml: unknown field `timout`",
            ),
            (
                "transport = \"ssh\"\n",
                "scheme x: transport ssh needs [commands]",
            ),
            (
                "transport = \"pigeon\"\n",
                "scheme x: scheme.toml: unknown variant `pigeon`",
            ),
            (
                "transport = \"telnet\"\nmode = \"shell\"\n[commands]\nuser_add = [\"x\"]\n",
                "scheme x: mode = \"shell\" is for transport ssh",
            ),
            (
                "transport = \"ssh\"\ntls = true\n[commands]\nuser_add = [\"x\"]\n",
                "scheme x: tls = true is for transport api",
            ),
            (
                "transport = \"ssh\"\n[answers]\nfailure = [\"(\"]\n[commands]\nuser_add = [\"x\"]\n",
                "scheme x: answers.failure: bad regex `(`",
            ),
            (
                "dialect = \"shell\"\n",
                "scheme x: scheme.toml: missing field `transport`",
            ),
            (
                "transport = \"exec\"\n",
                "scheme x: transport exec needs `script`",
            ),
            (
                "transport = \"exec\"\nscript = \"bin/session\"\n",
                "scheme x: script bin/session not found",
            ),
            (
                "transport = \"null\"\n",
                "scheme x: transport null needs [commands]",
            ),
            (
                "transport = \"null\"\nscript = \"s\"\n[commands]\n",
                "scheme x: transport null does not use `script`",
            ),
            (
                "transport = \"null\"\ncmds = [\"a\"]\n[commands]\n",
                "scheme x: transport null does not use `cmds`",
            ),
            (
                "transport = \"null\"\n[commands]\nuser_add = [\"ok {{ ip }}\", \"bad {{ ip \"]\n",
                "scheme x: template user_add[1]: syntax error: unexpected end of input",
            ),
            (
                "transport = \"null\"\ntimeout = \"soon\"\n[commands]\n",
                "scheme x: timeout: `soon` is not a duration",
            ),
            (
                "transport = \"null\"\ntimeout = \"0s\"\n[commands]\n",
                "scheme x: timeout must be more than 0",
            ),
            (
                "transport = \"null\"\n[commands]\n\"user add\" = [\"x\"]\n",
                "scheme x: cmd name `user add` is not valid",
            ),
        ];
        for (toml, want) in cases {
            let got = load_err(toml);
            assert!(
                got.starts_with(want),
                "toml {toml:?}: got {got:?}, want {want:?}"
            );
        }
    }

    #[test]
    fn unknown_field_names_the_line() {
        let got = load_err("transport = \"null\"\n\ntimout = \"5s\"\n[commands]\n");
        assert!(got.ends_with("(line 3)"), "{got}");
        assert!(!got.contains('\n'), "{got}");
    }

    #[test]
    fn script_must_be_a_file_and_executable() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = write_scheme(root.path(), "x", "transport = \"exec\"\nscript = \"bin\"\n");
        write_script(&dir, "bin/session", 0o755);
        let err = Scheme::load(&dir).expect_err("a directory is not a script");
        assert_eq!(err.to_string(), "scheme x: script bin is not a file");
        #[cfg(unix)]
        {
            let dir = write_scheme(
                root.path(),
                "y",
                "transport = \"exec\"\nscript = \"s.sh\"\n",
            );
            write_script(&dir, "s.sh", 0o644);
            let err = Scheme::load(&dir).expect_err("not executable");
            assert_eq!(
                err.to_string(),
                "scheme y: script s.sh is not executable (chmod +x)"
            );
        }
    }

    #[test]
    fn exec_with_commands_is_refused() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = write_scheme(
            root.path(),
            "x",
            "transport = \"exec\"\nscript = \"s.sh\"\n[commands]\nuser_add = [\"a\"]\n",
        );
        write_script(&dir, "s.sh", 0o755);
        let err = Scheme::load(&dir).expect_err("refused");
        assert!(
            err.to_string()
                .starts_with("scheme x: transport exec does not use [commands]"),
            "{err}"
        );
        assert_eq!(err.scheme(), Some("x"));
    }

    #[test]
    fn missing_scheme_file() {
        let root = tempfile::tempdir().expect("tempdir");
        let err = Scheme::load(&root.path().join("nope")).expect_err("missing");
        assert_eq!(err.to_string(), "scheme nope: scheme.toml: not found");
    }

    // ---- rendering -----------------------------------------------------------------

    #[test]
    fn renders_a_multi_command_cmd_in_order() {
        let s = null_scheme(
            "routeros",
            r#"user_add = [
  "/ip firewall address-list add list=allowed address={{ ip }} comment=crb_{{ ip }}",
  "/queue simple add name=crb_{{ ip }} target={{ ip }}/32 max-limit={{ rate_in }}k/{{ rate_out }}k",
]"#,
        );
        let got = s
            .render(
                "user_add",
                &vars(json!({"ip": "10.88.0.15", "rate_in": 10240, "rate_out": 5120})),
            )
            .expect("renders");
        assert_eq!(
            got,
            vec![
                "/ip firewall address-list add list=allowed address=10.88.0.15 comment=crb_10.88.0.15",
                "/queue simple add name=crb_10.88.0.15 target=10.88.0.15/32 max-limit=10240k/5120k",
            ]
        );
    }

    #[test]
    fn unknown_cmd() {
        let s = null_scheme("plain", "user_add = [\"x\"]\n");
        let err = s.render("user_del", &Vars::new()).expect_err("unknown");
        assert_eq!(
            err,
            RenderError::UnknownCmd {
                scheme: "x".into(),
                cmd: "user_del".into()
            }
        );
        assert_eq!(err.to_string(), "scheme x does not define cmd user_del");
    }

    #[test]
    fn undefined_variable_is_named() {
        let s = null_scheme(
            "routeros",
            "user_add = [\"/a {{ ip }}\", \"/b {{ ip }} {{ login|upper }}\", \"/c {{ ip.x }}\"]\n",
        );
        let err = s.render("user_add", &Vars::new()).expect_err("undefined");
        assert_eq!(
            err.to_string(),
            "scheme x: template user_add[0]: undefined variable ip"
        );
        // The span points at the filter here; the free variables still name it.
        let err = s
            .render("user_add", &vars(json!({"ip": "1.2.3.4"})))
            .expect_err("undefined");
        assert_eq!(
            err.to_string(),
            "scheme x: template user_add[1]: undefined variable login"
        );
        let err = s
            .render("user_add", &vars(json!({"ip": "1.2.3.4", "login": "a"})))
            .expect_err("undefined attribute");
        assert_eq!(
            err.to_string(),
            "scheme x: template user_add[2]: undefined value in {{ ip.x }}"
        );
    }

    #[test]
    fn render_errors_never_show_secret_values() {
        // Found by tests/fuzz.rs: `debug()` dumped the context (secrets included) into an
        // `include` error, and minijinja repeats values in some messages, escaped or
        // filtered (`pprint` quotes twice).
        let s = null_scheme(
            "plain",
            "c = [\"{{ nas_password - 1 }}\", \"{% include coa_psw %}\", \"{{ debug() }}\", \
             \"{% include nas_password|pprint %}\", \"{% include nas_password|tojson|upper %}\"]\n",
        );
        let secrets = vars(json!({"nas_password": "pw\"S3cret'", "coa_psw": "coa-S3cret"}));
        for index in 0..5 {
            let only = null_scheme(
                "plain",
                &format!("c = [{:?}]\n", s.templates("c").expect("c")[index]),
            );
            let err = only.render("c", &secrets).expect_err("fails").to_string();
            assert!(!err.to_lowercase().contains("s3cret"), "{err}");
        }
    }

    #[test]
    fn values_are_escaped_and_safe_does_not_bypass() {
        let s = null_scheme(
            "routeros",
            "user_edit = [\"/log info message={{ login }}\", \"/log info message={{ login|safe }}\", \"/x {{ login|safe|safe }}\"]\n",
        );
        let got = s
            .render("user_edit", &vars(json!({"login": "x\"; /system reset"})))
            .expect("renders");
        for line in &got {
            assert!(line.ends_with("\"x\\\"; /system reset\""), "{line}");
        }
    }

    #[test]
    fn numbers_and_bools_render_as_text() {
        let s = null_scheme("cisco", "a = [\"rate {{ r }} {{ f }} {{ b }}\"]\n");
        let got = s
            .render("a", &vars(json!({"r": 1024, "f": 1.5, "b": true})))
            .expect("renders");
        assert_eq!(got, vec!["rate 1024 1.5 true"]);
    }

    #[test]
    fn unsafe_value_is_refused_with_the_expression() {
        let s = null_scheme(
            "cisco",
            "user_rate_set = [\"interface {{ ifname }}\", \"service-policy {{- login|safe -}}\"]\n",
        );
        let err = s
            .render(
                "user_rate_set",
                &vars(json!({"ifname": "Gi0/1", "login": "x; reload"})),
            )
            .expect_err("unsafe");
        match &err {
            RenderError::Unsafe {
                index,
                expr,
                dialect,
                ..
            } => {
                assert_eq!(*index, 1);
                assert_eq!(expr, "login|safe");
                assert_eq!(*dialect, Dialect::Cisco);
            }
            other => panic!("unexpected {other:?}"),
        }
        let text = err.to_string();
        assert!(
            text.starts_with(
                "scheme x: template user_rate_set[1]: value of {{ login|safe }} cannot be sent in dialect cisco: contains `;`"
            ),
            "{text}"
        );
        assert!(!text.contains("reload"), "{text}");
    }

    #[test]
    fn none_is_refused_but_optional_parts_print_nothing() {
        let s = null_scheme(
            "shell",
            "a = [\"x {{ mac }}\"]\nb = [\"x{{ ' ' ~ mac if mac }}\"]\n",
        );
        let err = s
            .render("a", &vars(json!({"mac": null})))
            .expect_err("none");
        assert_eq!(
            err.to_string(),
            "scheme x: template a[0]: {{ mac }} is none (null in the event variables)"
        );
        assert_eq!(
            s.render("b", &vars(json!({"mac": null}))),
            Ok(vec!["x".to_string()])
        );
    }

    #[test]
    fn shell_dialect_quotes_in_templates() {
        let s = null_scheme("shell", "a = [\"echo {{ login }} {{ ip }}\"]\n");
        let got = s
            .render(
                "a",
                &vars(json!({"login": "$(reboot) it's", "ip": "10.0.0.1"})),
            )
            .expect("renders");
        assert_eq!(got, vec!["echo '$(reboot) it'\\''s' 10.0.0.1"]);
    }

    #[test]
    fn empty_command_list_renders_nothing() {
        let s = null_scheme("plain", "user_edit = []\n");
        assert!(s.defines("user_edit"));
        assert_eq!(s.render("user_edit", &Vars::new()), Ok(vec![]));
    }

    #[test]
    fn schemes_can_be_shared_between_workers() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Scheme>();
        assert_send_sync::<SchemeSet>();
    }

    // ---- scheme sets ---------------------------------------------------------------

    #[test]
    fn load_dir_keeps_good_schemes_and_reports_broken_ones() {
        let root = tempfile::tempdir().expect("tempdir");
        write_scheme(
            root.path(),
            "good",
            "transport = \"null\"\n[commands]\nuser_add = [\"a {{ ip }}\"]\n",
        );
        write_scheme(
            root.path(),
            "broken",
            "transport = \"null\"\ntimout = \"1s\"\n",
        );
        std::fs::create_dir_all(root.path().join("not-a-scheme")).expect("mkdir");
        std::fs::write(root.path().join("README"), "x").expect("write");
        let (set, errors) = SchemeSet::load_dir(root.path());
        assert_eq!(set.names(), vec!["good"]);
        assert_eq!(set.len(), 1);
        assert!(set.get("good").is_some_and(|s| s.defines("user_add")));
        assert!(set.get("broken").is_none());
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].scheme(), Some("broken"));
        assert!(
            errors[0]
                .to_string()
                .starts_with("scheme broken: scheme.toml: unknown field `timout`"),
            "{}",
            errors[0]
        );
    }

    #[test]
    fn the_first_dir_holding_a_scheme_name_wins() {
        let etc = tempfile::tempdir().expect("tempdir");
        let share = tempfile::tempdir().expect("tempdir");
        let scheme = |cmd: &str| format!("transport = \"null\"\n[commands]\n{cmd} = [\"x\"]\n");
        write_scheme(share.path(), "packaged", &scheme("user_add"));
        write_scheme(share.path(), "edited", &scheme("user_add"));
        write_scheme(share.path(), "broken-override", &scheme("user_add"));
        write_scheme(etc.path(), "edited", &scheme("user_del"));
        write_scheme(
            etc.path(),
            "broken-override",
            "transport = \"null\"\ntimout = 1\n",
        );
        write_scheme(etc.path(), "local", &scheme("user_add"));
        let dirs = [etc.path().to_path_buf(), share.path().to_path_buf()];
        let (set, errors) = SchemeSet::load_dirs(&dirs);
        assert_eq!(set.names(), vec!["edited", "local", "packaged"]);
        let edited = set.get("edited").expect("edited");
        assert!(edited.defines("user_del") && !edited.defines("user_add"));
        assert_eq!(edited.dir, etc.path().join("edited"));
        assert_eq!(
            set.get("packaged").expect("packaged").dir,
            share.path().join("packaged")
        );
        // A broken override is reported and not replaced by the packaged copy.
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].scheme(), Some("broken-override"));
        assert!(set.get("broken-override").is_none());
        // A missing directory is reported; the others still load.
        let missing = etc.path().join("missing");
        let (set, errors) = SchemeSet::load_dirs(&[missing, share.path().to_path_buf()]);
        assert_eq!(set.len(), 3);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].scheme(), None);
    }

    #[test]
    fn load_dir_of_a_missing_dir() {
        let missing = std::env::temp_dir().join(format!(
            "nasd-scheme-missing-{}-{:?}",
            std::process::id(),
            std::time::SystemTime::now()
        ));
        let (set, errors) = SchemeSet::load_dir(&missing);
        assert!(set.is_empty());
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0].to_string().starts_with("schemes dir "),
            "{}",
            errors[0]
        );
        assert_eq!(errors[0].scheme(), None);
        assert!(SchemeSet::empty().names().is_empty());
    }

    /// The schemes shipped in the repository load and render.
    #[test]
    fn shipped_schemes_declare_state_and_coalescing() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemes");
        let (set, errors) = SchemeSet::load_dir(&dir);
        assert!(errors.is_empty(), "{errors:?}");
        for name in [
            "mikrotik-ssh",
            "mikrotik-telnet",
            "mikrotik-api",
            "mikrotik-api-ssl",
        ] {
            let scheme = set.get(name).expect(name);
            let state = scheme.state.as_ref().expect("[state]");
            let e = state
                .expected(&vars(
                    json!({"ip": "10.0.0.1", "blocked": 1, "rate_in": 2048, "rate_out": 1024}),
                ))
                .expect("expected");
            assert_eq!(e.key, "10.0.0.1", "{name}");
            assert_eq!(e.facts["allowed"], None, "{name}");
            assert_eq!(e.facts["negbal"], None, "{name}");
            assert_eq!(e.facts["rate"].as_deref(), Some("2048k/1024k"), "{name}");
            let e = state
                .expected(&vars(
                    json!({"ip": "10.0.0.1", "negbal": true, "rate_in": null}),
                ))
                .expect("expected");
            assert_eq!(e.facts["allowed"].as_deref(), Some("yes"), "{name}");
            assert_eq!(e.facts["negbal"].as_deref(), Some("yes"), "{name}");
            assert_eq!(e.facts["rate"], None, "{name}");
            assert_eq!(
                scheme.coalesce_group("user_drop"),
                Some("allowed"),
                "{name}"
            );
            assert_eq!(
                scheme.coalesce_group("user_redirect"),
                Some("negbal"),
                "{name}"
            );
            assert_eq!(
                scheme.coalesce_group("user_rate_set"),
                Some("speed"),
                "{name}"
            );
            assert_eq!(scheme.coalesce_group("user_info"), None, "{name}");
            assert_eq!(scheme.coalesce_group("user_add"), None, "{name}");
        }
        let ipset = set.get("linux-ipset").expect("linux-ipset");
        assert!(ipset.state.is_some());
        assert_eq!(ipset.coalesce_group("user_rate_set"), None);
        assert_eq!(ipset.coalesce_group("user_accept"), Some("allowed"));
        // Off by default: a scheme without [coalesce] and the render-only scheme.
        let null = set.get("null-routeros").expect("null-routeros");
        assert_eq!(null.coalesce_group("user_drop"), None);
        assert!(null.state.is_none());
    }

    #[test]
    fn coalesce_groups_are_checked() {
        let defined = |cmd: &str| cmd.starts_with("user_");
        let group = |pairs: &[(&str, &[&str])]| -> BTreeMap<String, Vec<String>> {
            pairs
                .iter()
                .map(|(g, cmds)| (g.to_string(), cmds.iter().map(|c| c.to_string()).collect()))
                .collect()
        };
        type Groups<'a> = &'a [(&'a str, &'a [&'a str])];
        let cases: &[(Groups, Result<(), &str>)] = &[
            (&[("a", &["user_accept", "user_drop"])], Ok(())),
            (
                &[("a", &["user_accept"])],
                Err("coalesce.a: a group needs at least two cmds, got 1"),
            ),
            (
                &[("a", &["user_accept", "user_info"])],
                Err("coalesce.a: user_info is never coalesced"),
            ),
            (
                &[("a", &["user_accept", "user_disconnect"])],
                Err("user_disconnect is never coalesced"),
            ),
            (
                &[("a", &["user_accept", "reboot"])],
                Err("coalesce.a: cmd reboot has no template"),
            ),
            (
                &[
                    ("a", &["user_accept", "user_drop"]),
                    ("b", &["user_drop", "user_redirect"]),
                ],
                Err("coalesce: cmd user_drop is in two groups (a and b)"),
            ),
        ];
        for (groups, want) in cases {
            let got = coalesce_groups(&group(groups), defined);
            match (got, want) {
                (Ok(_), Ok(())) => {}
                (Err(e), Err(w)) => assert!(e.contains(w), "{e} / {w}"),
                (got, want) => panic!("{groups:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn shipped_schemes_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemes");
        let (set, errors) = SchemeSet::load_dir(&dir);
        assert!(errors.is_empty(), "{errors:?}");
        let null = set.get("null-routeros").expect("null-routeros");
        assert_eq!(null.transport, TransportKind::Null);
        let v = vars(json!({
            "ip": "10.88.0.15", "rate_in": 10240, "rate_out": 10240, "login": "ivan petrov",
        }));
        for cmd in [
            "user_add",
            "user_del",
            "user_accept",
            "user_drop",
            "user_redirect",
            "user_redirect_cancel",
            "user_rate_set",
            "user_rate_set_cancel",
            "user_edit",
            "user_info",
            "own_disabled",
            "own_disabled_cancel",
        ] {
            let lines = null.render(cmd, &v).unwrap_or_else(|e| panic!("{e}"));
            assert!(!lines.is_empty(), "{cmd}");
            if cmd == "user_edit" {
                assert_eq!(
                    lines[1],
                    "/log info message=\"nasd user_edit login=ivan petrov ip=10.88.0.15\""
                );
            }
            if cmd == "user_del" {
                assert_eq!(
                    lines,
                    vec![
                        "/ip firewall address-list remove [find comment=crb_10.88.0.15]",
                        "/queue simple remove [find comment=crb_10.88.0.15]",
                    ]
                );
            }
        }
        let exec = set.get("demo-exec").expect("demo-exec");
        assert_eq!(exec.transport, TransportKind::Exec);
        assert_eq!(exec.dialect, Dialect::Shell);
        assert!(
            exec.script
                .as_ref()
                .is_some_and(|p| p.ends_with("bin/session"))
        );
    }

    /// Splits a RouterOS CLI line into words the way the CLI does: whitespace outside
    /// double quotes separates words; `;` outside quotes would start a second command,
    /// so it is returned as a word of its own.
    fn routeros_words(line: &str) -> Vec<String> {
        let mut words = Vec::new();
        let mut cur = String::new();
        let mut quoted = false;
        let mut chars = line.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' if quoted => {
                    cur.push(c);
                    if let Some(n) = chars.next() {
                        cur.push(n);
                    }
                }
                '"' => {
                    quoted = !quoted;
                    cur.push(c);
                }
                ';' if !quoted => {
                    if !cur.is_empty() {
                        words.push(std::mem::take(&mut cur));
                    }
                    words.push(";".into());
                }
                c if c.is_whitespace() && !quoted => {
                    if !cur.is_empty() {
                        words.push(std::mem::take(&mut cur));
                    }
                }
                c => cur.push(c),
            }
        }
        if !cur.is_empty() {
            words.push(cur);
        }
        words
    }

    /// Counts the `Name = value` pairs of a RADIUS request line: commas and `=` outside
    /// double quotes; a value that adds either would add or break a pair.
    fn radius_pairs(line: &str) -> usize {
        let (mut commas, mut equals, mut quoted, mut escaped) = (0, 0, false, false);
        for c in line.chars() {
            match c {
                _ if escaped => escaped = false,
                '\\' if quoted => escaped = true,
                '"' => quoted = !quoted,
                ',' if !quoted => commas += 1,
                '=' if !quoted => equals += 1,
                _ => {}
            }
        }
        (commas + 1) * 1000 + equals
    }

    #[test]
    fn shipped_schemes_resist_injection() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemes");
        let (set, errors) = SchemeSet::load_dir(&dir);
        assert!(errors.is_empty(), "{errors:?}");
        let base = vars(json!({
            "ip": "10.88.0.15", "login": "ivan", "rate_in": 10240, "rate_out": 5120,
            "vlan": 101, "user_id": 42, "abonent_id": 7, "acct_session_id": "81200003",
            "shaper_dev": "ifb0", "mac": "00:11:22:33:44:55", "nas_ip": "10.0.0.1",
            "usluga_id": 5,
        }));
        let nasty = nasty_strings(0x5eed, 60);
        let mut checked = 0usize;
        for name in set.names() {
            let Some(scheme) = set.get(&name) else {
                continue;
            };
            if !scheme.transport.uses_templates() {
                continue;
            }
            for cmd in scheme.cmds() {
                let Ok(reference) = scheme.render(&cmd, &base) else {
                    panic!("{name} {cmd} does not render with the base variables");
                };
                for key in base.keys() {
                    for value in &nasty {
                        let mut v = base.clone();
                        v.insert(key.clone(), value.clone().into());
                        let rendered = match scheme.render(&cmd, &v) {
                            Ok(r) => r,
                            // Refused before anything is sent: safe by construction.
                            Err(RenderError::Unsafe { .. }) => continue,
                            Err(e) => panic!("{name} {cmd}: {e}"),
                        };
                        assert_eq!(rendered.len(), reference.len());
                        for (line, want) in rendered.iter().zip(&reference) {
                            let (got_n, want_n) = match scheme.dialect {
                                Dialect::Shell => (
                                    shell_words(line).map(|w| w.len()).unwrap_or(usize::MAX),
                                    shell_words(want).map(|w| w.len()).unwrap_or(0),
                                ),
                                Dialect::Routeros => {
                                    (routeros_words(line).len(), routeros_words(want).len())
                                }
                                Dialect::Radius => (radius_pairs(line), radius_pairs(want)),
                                _ => (
                                    line.split_whitespace().count(),
                                    want.split_whitespace().count(),
                                ),
                            };
                            assert_eq!(
                                got_n, want_n,
                                "{name} {cmd}: {key}={value:?} changed the words of `{line}`"
                            );
                            // Inside single quotes a newline is part of the one shell word
                            // (the tokenizer above proves it); elsewhere it would end the line.
                            if scheme.dialect != Dialect::Shell {
                                assert!(!line.contains('\n'), "{name} {cmd}: newline in `{line}`");
                            }
                            checked += 1;
                        }
                    }
                }
            }
        }
        assert!(checked > 10_000, "only {checked} renders checked");
    }
}
