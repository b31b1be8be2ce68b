//! The layout ARCHITECTURE.md promises, checked on the source: no import cycle between
//! the crate's top-level modules (nor between the modules inside `transport/`), and the
//! arrows it names point one way (`api` never reaches the daemon or the tools,
//! `transport` never the store, `store` never a protocol, the dispatcher no protocol).
//! Test code (`#[cfg(test)]` modules) is left out: a unit test may use anything.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The module path of a file under src/, e.g. `transport::routeros_api::codec`.
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).expect("under src");
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    if parts
        .last()
        .is_some_and(|p| p == "mod" || p == "lib" || p == "main")
    {
        parts.pop();
    }
    parts
}

/// The source without its test modules (everything from a `#[cfg(test)]` line on that
/// opens a `mod`).
fn without_tests(text: &str) -> String {
    let mut out = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        if line.trim() == "#[cfg(test)]"
            && lines
                .peek()
                .is_some_and(|next| next.trim_start().starts_with("mod "))
        {
            break;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Paths that lib.rs re-exports at the crate root, resolved to the module that holds
/// them, so that `crate::breaker::X` counts as an arrow to `dispatch`.
const ROOT_ALIASES: &[(&str, &[&str])] = &[
    ("breaker", &["dispatch", "breaker"]),
    ("retry", &["dispatch", "retry"]),
    ("answer", &["transport", "answer"]),
    ("device", &["transport", "device"]),
    ("bench", &["tools", "bench"]),
    ("demo", &["tools", "demo"]),
];

fn resolve(mut parts: Vec<String>) -> Vec<String> {
    if let Some((_, real)) = ROOT_ALIASES.iter().find(|(alias, _)| parts[0] == *alias) {
        let depth = parts.len();
        let mut full: Vec<String> = real.iter().map(|p| p.to_string()).collect();
        full.extend(parts.drain(1..));
        full.truncate(depth.max(1));
        return full;
    }
    parts
}

/// The `crate::a::b` paths a file names, as module paths of depth `depth` (or less).
fn crate_refs(text: &str, depth: usize) -> BTreeSet<Vec<String>> {
    let mut refs = BTreeSet::new();
    let code: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n");
    let mut rest = code.as_str();
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        let path: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
            .collect();
        let parts: Vec<String> = path
            .split("::")
            .filter(|p| !p.is_empty())
            .take(depth)
            .map(str::to_string)
            .collect();
        if !parts.is_empty() {
            refs.insert(resolve(parts));
        }
    }
    // `use crate::{a, b::c}` groups.
    let mut rest = code.as_str();
    while let Some(at) = rest.find("crate::{") {
        rest = &rest[at + "crate::{".len()..];
        let group: String = rest.chars().take_while(|c| *c != ';').collect();
        for item in group.split(',') {
            let first = item
                .trim()
                .trim_start_matches('{')
                .split("::")
                .next()
                .unwrap_or("")
                .trim()
                .to_string();
            if !first.is_empty() && first.chars().all(|c| c.is_alphanumeric() || c == '_') {
                refs.insert(resolve(vec![first]));
            }
        }
    }
    refs
}

/// Edges between modules at `depth` levels (within `prefix`), from every non-test file.
fn graph(prefix: &[&str], depth: usize) -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let module = module_of(&src, &file);
        if module.is_empty() || module[0] == "main" {
            continue;
        }
        if module.len() < prefix.len() + 1 || module[..prefix.len()] != *prefix {
            continue;
        }
        let from = module[prefix.len()..prefix.len() + 1].join("::");
        let text = without_tests(&std::fs::read_to_string(&file).expect("read"));
        for to in crate_refs(&text, prefix.len() + depth) {
            if to.len() < prefix.len() + 1 || to[..prefix.len()] != *prefix {
                continue;
            }
            let to = to[prefix.len()..prefix.len() + 1].join("::");
            if to != from {
                edges.entry(from.clone()).or_default().insert(to);
            }
        }
    }
    edges
}

/// One cycle in the graph, if any, as the list of its modules.
fn find_cycle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(node.to_string(), 1);
        stack.push(node.to_string());
        for next in edges.get(node).into_iter().flatten() {
            match state.get(next.as_str()).copied().unwrap_or(0) {
                1 => {
                    let start = stack.iter().position(|n| n == next).unwrap_or(0);
                    let mut cycle = stack[start..].to_vec();
                    cycle.push(next.clone());
                    return Some(cycle);
                }
                0 => {
                    if let Some(c) = visit(next, edges, state, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(node.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for node in edges.keys() {
        if state.get(node.as_str()).copied().unwrap_or(0) == 0 {
            let mut stack = Vec::new();
            if let Some(c) = visit(node, edges, &mut state, &mut stack) {
                return Some(c);
            }
        }
    }
    None
}

#[test]
fn top_level_modules_form_no_cycle() {
    let edges = graph(&[], 1);
    assert!(
        edges.contains_key("dispatch"),
        "the graph is empty: {edges:?}"
    );
    if let Some(cycle) = find_cycle(&edges) {
        panic!("import cycle: {}\n{edges:#?}", cycle.join(" -> "));
    }
}

#[test]
fn transport_modules_form_no_cycle() {
    let edges = graph(&["transport"], 1);
    if let Some(cycle) = find_cycle(&edges) {
        panic!(
            "import cycle inside transport: {}\n{edges:#?}",
            cycle.join(" -> ")
        );
    }
}

#[test]
fn arrows_point_one_way() {
    let edges = graph(&[], 1);
    let deps = |m: &str| edges.get(m).cloned().unwrap_or_default();
    let forbidden: &[(&str, &[&str])] = &[
        ("api", &["daemon", "tools", "cli", "supervisor", "dispatch"]),
        ("daemon", &["tools", "cli"]),
        (
            "transport",
            &["store", "dispatch", "daemon", "api", "supervisor"],
        ),
        ("store", &["transport", "scheme", "dispatch"]),
        ("scheme", &["store", "transport", "dispatch"]),
        ("expand", &["dispatch", "supervisor"]),
        ("stats", &["config"]),
        // config describes the settings; the modules they configure read it, never the
        // other way round (so `[alerts]` and `[breaker]` types live in config).
        (
            "config",
            &[
                "alerts",
                "dispatch",
                "transport",
                "store",
                "daemon",
                "api",
                "supervisor",
                "expand",
            ],
        ),
    ];
    let mut wrong = Vec::new();
    for (from, not) in forbidden {
        for to in deps(from) {
            if not.contains(&to.as_str()) {
                wrong.push(format!("{from} -> {to}"));
            }
        }
    }
    assert!(wrong.is_empty(), "arrows that run back up: {wrong:?}");
}

#[test]
fn the_dispatcher_knows_no_protocol() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    let dir = src.join("dispatch");
    if dir.is_dir() {
        rust_files(&dir, &mut files);
    } else {
        files.push(src.join("dispatch.rs"));
    }
    for file in files {
        let text = without_tests(&std::fs::read_to_string(&file).expect("read"));
        for word in [
            "TransportKind",
            "transport::exec",
            "transport::null",
            "transport::ssh",
            "transport::telnet",
            "transport::radius",
            "transport::routeros_api",
        ] {
            assert!(
                !text.contains(word),
                "{} names {word}: the dispatcher must only call Device::send",
                file.display()
            );
        }
    }
}
