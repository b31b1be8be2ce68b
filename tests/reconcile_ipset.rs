//! `nasd reconcile` with the shipped `linux-ipset` scheme against this Linux host's own
//! kernel ipsets, reached over a real OpenSSH sshd on loopback that runs each command in
//! root's shell (no recorder): the sets in the expected state read as no difference;
//! members changed by hand read as exactly those differences and the one stray; the
//! fixes enqueued with `apply` go through the running daemon to the host, which then
//! holds what the accounts say (the stray left alone); the binary prints the same and
//! exits 3.
//!
//! Needs root and kernel ipset support; without them it says why and skips. ipsets are
//! global kernel state and the tests of a run share one process: each test makes sets
//! of its own (`nt<pid><backend>a` / `...n`) in a copy of the scheme, and destroys them
//! when it ends, also on a panic.

#[macro_use]
mod common;

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::{Backend, TestEnv, wait_for};
use nasd::reconcile::{Context, Report, Request};
use nasd::scheme::state::{Kind, Stray};
use nasd::store::{AccountRecord, Nas, Store};
use tokio_util::sync::CancellationToken;

both_backends!(reconcile_reads_and_fixes_the_host_ipsets);

const ACCOUNTS: i64 = 30;
/// `blocked` truthy (1, true, "1"): not in the allowed set.
const BLOCKED: [i64; 3] = [3, 17, 22];
/// `negbal` truthy (true, "1", 1): in the negbal set (and allowed). Accounts 8, 9 and
/// 10 say `blocked` and `negbal` are false ("0", "false", 0 / false): allowed, not negbal.
const NEGBAL: [i64; 3] = [5, 11, 26];
/// In the host's allowed set, of no account.
const STRAY: &str = "10.99.0.1";

/// Account i's address (as in common::add_accounts).
fn ip_of(user: i64) -> String {
    format!("10.88.{}.{}", user / 250, user % 250 + 1)
}

fn expected_allowed() -> BTreeSet<String> {
    (1..=ACCOUNTS)
        .filter(|u| !BLOCKED.contains(u))
        .map(ip_of)
        .collect()
}

fn expected_negbal() -> BTreeSet<String> {
    NEGBAL.iter().copied().map(ip_of).collect()
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

// ---------------------------------------------------------------------------------
// The host's sets.

async fn ipset(args: &[&str]) -> std::process::Output {
    tokio::process::Command::new("ipset")
        .args(args)
        .output()
        .await
        .expect("run ipset (package ipset; bash scripts/test-setup.sh)")
}

async fn ipset_ok(args: &[&str]) {
    let out = ipset(args).await;
    assert!(
        out.status.success(),
        "ipset {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The members of a set, from `ipset save` as the scheme reads it.
async fn members(set: &str) -> BTreeSet<String> {
    let out = ipset(&["save", set]).await;
    assert!(out.status.success(), "ipset save {set}");
    let prefix = format!("add {set} ");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .map(|m| m.trim().to_string())
        .collect()
}

/// Adds many members in one `ipset restore`.
async fn add_all(set: &str, ips: &BTreeSet<String>) {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new("ipset")
        .arg("restore")
        .stdin(Stdio::piped())
        .spawn()
        .expect("ipset restore");
    let batch: String = ips.iter().map(|ip| format!("add {set} {ip}\n")).collect();
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(batch.as_bytes()).await.expect("write");
    drop(stdin);
    assert!(child.wait().await.expect("wait").success(), "ipset restore");
}

/// This test's two sets; destroyed when dropped (also when the test panics).
struct Sets {
    allowed: String,
    negbal: String,
}

impl Sets {
    /// Creates both sets (empty). Err: the kernel refused (no ipset support here).
    async fn create(tag: char) -> Result<Sets, String> {
        let pid = std::process::id();
        let sets = Sets {
            allowed: format!("nt{pid}{tag}a"),
            negbal: format!("nt{pid}{tag}n"),
        };
        for name in [&sets.allowed, &sets.negbal] {
            // `-exist`: a set left by a killed earlier process of the same pid is reused.
            let out = ipset(&["-exist", "create", name, "hash:ip"]).await;
            if !out.status.success() {
                return Err(format!(
                    "ipset create {name} hash:ip: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
            ipset_ok(&["flush", name]).await;
        }
        Ok(sets)
    }
}

impl Drop for Sets {
    fn drop(&mut self) {
        for name in [&self.allowed, &self.negbal] {
            let _ = std::process::Command::new("ipset")
                .args(["destroy", name])
                .stderr(Stdio::null())
                .status();
        }
    }
}

// ---------------------------------------------------------------------------------
// An OpenSSH sshd that runs each command in root's shell (tests/common/sshd.rs records
// them instead).

struct RootSshd {
    port: u16,
    client_key: PathBuf,
    child: std::process::Child,
}

fn keygen(path: &Path) {
    let status = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(path)
        .status()
        .expect("ssh-keygen (openssh-client; bash scripts/test-setup.sh)");
    assert!(status.success());
}

impl RootSshd {
    async fn start(dir: &Path) -> RootSshd {
        std::fs::create_dir_all(dir).expect("sshd dir");
        let host_key = dir.join("host_key");
        keygen(&host_key);
        let client_key = dir.join("client_key");
        keygen(&client_key);
        std::fs::copy(
            client_key.with_extension("pub"),
            dir.join("authorized_keys"),
        )
        .expect("authorized_keys");
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("free port");
        let config = dir.join("sshd_config");
        // SetEnv SHLVL=1: Debian's bash reads ~/.bashrc for every command sshd runs
        // unless it is a nested shell; root's .bashrc on these machines runs
        // `pyenv init` (a third of a second per command, a minute behind a stale lock).
        std::fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {hk}\nPidFile {dir}/sshd.pid\n\
                 AuthorizedKeysFile {dir}/authorized_keys\nUsePAM no\nStrictModes no\n\
                 PasswordAuthentication no\nKbdInteractiveAuthentication no\n\
                 PermitRootLogin prohibit-password\nAllowUsers root\nSetEnv SHLVL=1\n\
                 MaxStartups 50\nMaxSessions 20\nLogLevel ERROR\n",
                hk = host_key.display(),
                dir = dir.display(),
            ),
        )
        .expect("sshd_config");
        std::fs::create_dir_all("/run/sshd").expect("/run/sshd");
        let child = std::process::Command::new("/usr/sbin/sshd")
            .arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("sshd (openssh-server; bash scripts/test-setup.sh)");
        let sshd = RootSshd {
            port,
            client_key,
            child,
        };
        wait_for(Duration::from_secs(10), "sshd to listen", || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        })
        .await;
        sshd
    }
}

impl Drop for RootSshd {
    fn drop(&mut self) {
        // Only the listener is ours to kill: each session's process ends with its
        // connection, which nasd closes.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------
// Database, config and runs.

/// The flags of account i: `blocked` and `negbal` columns as a CSV import gives them
/// (text, kept in `extra` as strings), then `extra` JSON (booleans and numbers).
fn flags(i: i64) -> (&'static str, &'static str, serde_json::Value) {
    match i {
        3 => ("", "", serde_json::json!({"blocked": 1})),
        17 => ("", "", serde_json::json!({"blocked": true})),
        22 => ("1", "", serde_json::json!({})),
        5 => ("", "", serde_json::json!({"negbal": true})),
        11 => ("", "1", serde_json::json!({})),
        26 => ("", "", serde_json::json!({"negbal": 1})),
        8 => ("0", "0", serde_json::json!({})),
        9 => ("false", "false", serde_json::json!({})),
        10 => ("", "", serde_json::json!({"blocked": 0, "negbal": false})),
        _ => ("", "", serde_json::json!({})),
    }
}

/// Accounts 1..=ACCOUNTS on NAS 1 with their flags (see [`flags`]).
async fn add_accounts(store: &Store) {
    let headers: Vec<String> = [
        "user_id",
        "abonent_id",
        "nas_id",
        "login",
        "ip",
        "blocked",
        "negbal",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let records: Vec<AccountRecord> = (1..=ACCOUNTS)
        .map(|i| {
            let (blocked, negbal, json) = flags(i);
            let values = vec![
                i.to_string(),
                (1000 + i).to_string(),
                "1".to_string(),
                format!("user{i}"),
                ip_of(i),
                blocked.to_string(),
                negbal.to_string(),
            ];
            let mut rec = AccountRecord::from_fields(&headers, &values).expect("account");
            rec.extra.extend(json.as_object().cloned().expect("object"));
            rec
        })
        .collect();
    store.accounts_upsert(&records).await.expect("accounts");
}

fn nas(sshd: &RootSshd) -> Nas {
    let mut nas = Nas::new(1, "ipset host", "127.0.0.1");
    nas.scheme = Some("linux-ipset".into());
    nas.port = Some(i32::from(sshd.port));
    nas.login = Some("root".into());
    nas.host_key_policy = "accept-new".into();
    nas.n_workers = 2;
    nas.max_sessions = 2;
    nas
}

/// The shipped scheme with this test's set names.
fn scheme_text(sets: &Sets) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemes/linux-ipset/scheme.toml");
    let shipped = std::fs::read_to_string(&path).expect("shipped linux-ipset scheme");
    assert!(
        shipped.contains("ipset save nasd_allowed") && shipped.contains("ipset save nasd_negbal"),
        "the shipped scheme reads nasd_allowed and nasd_negbal"
    );
    let text = shipped
        .replace("nasd_allowed", &sets.allowed)
        .replace("nasd_negbal", &sets.negbal);
    assert!(!text.contains("nasd_"), "a set name left unreplaced");
    text
}

fn config(env: &TestEnv, sshd: &RootSshd) -> nasd::config::Config {
    let mut cfg = env.config();
    cfg.daemon.transport.known_hosts = env.path().join("known_hosts");
    cfg.daemon.transport.ssh_key = Some(sshd.client_key.clone());
    cfg
}

async fn reconcile(cfg: &nasd::config::Config, store: &Store, apply: bool) -> Report {
    let ctx = Context {
        cfg: &cfg.daemon,
        store,
        params_query: &cfg.database.params_query,
        billing: None,
        journal: None,
    };
    let req = Request {
        nas_id: 1,
        account: None,
        apply,
        by: "tests/reconcile_ipset.rs".into(),
    };
    nasd::reconcile::run(&ctx, None, &req)
        .await
        .expect("reconcile")
}

type Row = (
    i64,
    String,
    String,
    Kind,
    Option<String>,
    Option<String>,
    Option<String>,
);

fn rows(report: &Report) -> Vec<Row> {
    report
        .comparison
        .differences
        .iter()
        .map(|d| {
            (
                d.user_id,
                d.key.clone(),
                d.fact.clone(),
                d.kind,
                d.expected.clone(),
                d.found.clone(),
                d.fix.clone(),
            )
        })
        .collect()
}

fn row(user: i64, fact: &str, kind: Kind, fix: &str) -> Row {
    let (expected, found) = match kind {
        Kind::Missing => (Some("yes".to_string()), None),
        Kind::Extra => (None, Some("yes".to_string())),
        Kind::Differs => unreachable!("flags do not differ"),
    };
    (
        user,
        ip_of(user),
        fact.to_string(),
        kind,
        expected,
        found,
        Some(fix.to_string()),
    )
}

fn stray() -> Vec<Stray> {
    vec![Stray {
        key: STRAY.into(),
        facts: vec!["allowed".into()],
    }]
}

/// `nasd --config FILE reconcile --nas 1` as an operator runs it.
async fn run_binary(env: &TestEnv, cfg: &nasd::config::Config) -> std::process::Output {
    let file = env.path().join("nasd.toml");
    std::fs::write(
        &file,
        format!(
            "[database]\nurl = \"{url}\"\n[daemon]\nlog_dir = \"{log}\"\nschemes_dir = \"{schemes}\"\n\
             [transport]\nknown_hosts = \"{kh}\"\nssh_key = \"{key}\"\n",
            url = env.url,
            log = env.log_dir().display(),
            schemes = env.schemes_dir().display(),
            kh = cfg.daemon.transport.known_hosts.display(),
            key = cfg
                .daemon
                .transport
                .ssh_key
                .as_ref()
                .expect("ssh_key")
                .display(),
        ),
    )
    .expect("nasd.toml");
    tokio::process::Command::new(env!("CARGO_BIN_EXE_nasd"))
        .current_dir(env.path())
        .arg("--config")
        .arg(&file)
        .args(["reconcile", "--nas", "1"])
        .output()
        .await
        .expect("run nasd")
}

async fn reconcile_reads_and_fixes_the_host_ipsets(backend: Backend) {
    if !is_root() {
        eprintln!(
            "SKIPPED reconcile_ipset ({backend:?}): not root; kernel ipsets and a root login need root"
        );
        return;
    }
    let tag = match backend {
        Backend::Postgres => 'p',
        Backend::Sqlite => 's',
    };
    let sets = match Sets::create(tag).await {
        Ok(s) => s,
        Err(why) => {
            eprintln!("SKIPPED reconcile_ipset ({backend:?}): no kernel ipset support: {why}");
            return;
        }
    };
    let env = TestEnv::new(backend).await;
    env.scheme("linux-ipset", &scheme_text(&sets));
    let sshd = RootSshd::start(&env.path().join("sshd")).await;
    let store = env.store().await;
    store.nas_upsert(&nas(&sshd)).await.expect("nas");
    add_accounts(&store).await;
    let cfg = config(&env, &sshd);

    // The host as the accounts say: nothing to fix.
    add_all(&sets.allowed, &expected_allowed()).await;
    add_all(&sets.negbal, &expected_negbal()).await;
    let report = reconcile(&cfg, &store, false).await;
    assert_eq!(
        report.commands,
        vec![
            format!("ipset save {}", sets.allowed),
            format!("ipset save {}", sets.negbal)
        ]
    );
    assert_eq!(report.accounts, ACCOUNTS as usize);
    assert_eq!(report.comparison.compared, ACCOUNTS as usize);
    assert_eq!(
        report.facts,
        expected_allowed().len() + expected_negbal().len()
    );
    assert!(
        report.comparison.differences.is_empty()
            && report.comparison.strays.is_empty()
            && report.comparison.problems.is_empty()
            && report.fixes.is_empty()
            && report.enqueued.is_empty(),
        "{:#?}",
        report
    );

    // Changed by hand: each kind of difference once, and a stray.
    ipset_ok(&["del", &sets.allowed, &ip_of(1)]).await; // active, not allowed
    ipset_ok(&["add", &sets.allowed, &ip_of(BLOCKED[0])]).await; // blocked, allowed
    ipset_ok(&["del", &sets.negbal, &ip_of(NEGBAL[0])]).await; // negbal expected
    ipset_ok(&["add", &sets.negbal, &ip_of(7)]).await; // negbal not expected
    ipset_ok(&["add", &sets.allowed, STRAY]).await;
    let want = vec![
        row(1, "allowed", Kind::Missing, "user_accept"),
        row(BLOCKED[0], "allowed", Kind::Extra, "user_drop"),
        row(NEGBAL[0], "negbal", Kind::Missing, "user_redirect"),
        row(7, "negbal", Kind::Extra, "user_redirect_cancel"),
    ];
    let want_fixes: Vec<(i64, String)> = want.iter().map(|r| (r.0, r.6.clone().unwrap())).collect();
    let report = reconcile(&cfg, &store, false).await;
    assert_eq!(rows(&report), want, "{:#?}", report.comparison);
    assert_eq!(report.comparison.strays, stray());
    assert!(report.comparison.problems.is_empty(), "{report:#?}");
    assert_eq!(report.comparison.compared, ACCOUNTS as usize);
    assert_eq!(report.fixes, want_fixes);
    assert!(report.enqueued.is_empty());

    // The binary prints the same and exits 3 (differences, not applied).
    let out = run_binary(&env, &cfg).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(3),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let printed: Vec<&str> = stdout.lines().collect();
    for line in [
        format!(
            "user 1 ({}): allowed missing on the NAS (expected yes) -> user_accept",
            ip_of(1)
        ),
        format!(
            "user {} ({}): allowed on the NAS (yes) but not expected -> user_drop",
            BLOCKED[0],
            ip_of(BLOCKED[0])
        ),
        format!("stray: {STRAY} (allowed) on the NAS belongs to no account of nas 1: left alone"),
        "4 differences, 1 strays, 0 problems; 4 events would fix them (run with --apply to enqueue them)"
            .to_string(),
    ] {
        assert!(
            printed.contains(&line.as_str()),
            "missing line {line:?} in:\n{stdout}\nstderr:\n{stderr}"
        );
    }
    assert_eq!(
        printed.len(),
        1 + 4 + 1 + 1,
        "header, 4 differences, 1 stray, totals:\n{stdout}"
    );
    assert_eq!(
        store
            .stack_count()
            .await
            .expect("stack count")
            .compact_total,
        0,
        "without --apply nothing is enqueued"
    );

    // Applied while the daemon runs: the fixes go through the pipeline to the host.
    let token = CancellationToken::new();
    let daemon = nasd::daemon::start(cfg.clone(), token.clone())
        .await
        .expect("daemon start");
    let report = reconcile(&cfg, &store, true).await;
    assert_eq!(rows(&report), want);
    assert_eq!(report.fixes, want_fixes);
    assert_eq!(report.enqueued.len(), want.len(), "{report:#?}");
    let db = &store;
    for &id in &report.enqueued {
        wait_for(
            Duration::from_secs(60),
            &format!("fix {id} done"),
            || async move {
                let status = db.event_status(id).await.expect("event status");
                let state = status.as_ref().map(|s| s.state.as_str());
                assert_ne!(state, Some("failed"), "{status:?}");
                state == Some("done")
            },
        )
        .await;
    }
    let history = store.history(None, 100).await.expect("history");
    let mut done: Vec<(i64, String)> = history
        .iter()
        .filter(|h| h.compact_id.is_some_and(|c| report.enqueued.contains(&c)))
        .map(|h| {
            assert_eq!(h.outcome, "done", "{h:?}");
            (h.user_id, h.cmd.clone())
        })
        .collect();
    done.sort();
    assert_eq!(done, want_fixes);
    let sent: Vec<&String> = history.iter().flat_map(|h| &h.commands).collect();
    assert!(
        sent.contains(&&format!("ipset -exist add {} {}", sets.allowed, ip_of(1))),
        "{sent:?}"
    );

    let mut allowed_now = expected_allowed();
    allowed_now.insert(STRAY.to_string());
    assert_eq!(members(&sets.allowed).await, allowed_now);
    assert_eq!(members(&sets.negbal).await, expected_negbal());

    // Reconciled: only the stray again.
    let report = reconcile(&cfg, &store, false).await;
    assert!(
        report.comparison.differences.is_empty() && report.fixes.is_empty(),
        "{:#?}",
        report.comparison
    );
    assert_eq!(report.comparison.strays, stray());
    assert!(report.comparison.problems.is_empty());

    token.cancel();
    daemon.wait().await.expect("daemon stopped");
}
