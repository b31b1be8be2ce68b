//! The Debian package (`scripts/package.sh`, cargo-deb) and the config it ships
//! (`contrib/nasd.toml`, installed as /etc/nasd/nasd.toml).
//!
//! `example_config_*`: the shipped config loads with nasd's own loader, names every key
//! the loader knows, and each commented `# key = value` line is the key's real default.
//!
//! `debian_package_installs_runs_and_removes` (root only, skipped otherwise): packages
//! the debug binary `cargo test` already built (no release build: `package.sh --binary`
//! hands it to cargo-deb under a profile name of its own), installs the .deb with dpkg
//! on this machine, checks the files, the `nasd` user and its directories, runs `nasd
//! check` and the daemon as `nasd` with the installed config against `nasd sim` until an
//! event is done, then removes and purges the package and checks nothing is left. It
//! is skipped when a nasd package, /etc/nasd or /var/lib/nasd is already there (not
//! ours to touch), and when cargo-deb is missing outside CI (`bash scripts/package.sh
//! --setup` installs it; `scripts/test.sh` does). Runs of it on one machine take turns
//! through a lock file.

use std::io::Read as _;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nasd::config::Config;

const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/contrib/nasd.toml");
const CONF: &str = "/etc/nasd/nasd.toml";

fn example_text() -> String {
    std::fs::read_to_string(EXAMPLE).expect("read contrib/nasd.toml")
}

// ---- the shipped config ------------------------------------------------------------

/// The keys the loader accepts where `prefix` (a section header, or nothing for the top
/// level) opens: read from its own "unknown field" error, which lists them.
fn known_keys(prefix: &str) -> Vec<String> {
    let err = Config::from_toml(&format!("{prefix}nasd_no_such_key = 1\n"))
        .expect_err("an unknown key is refused")
        .to_string();
    let listed = err
        .split_once("expected one of ")
        .or_else(|| err.split_once("expected "))
        .map(|(_, rest)| rest)
        .unwrap_or_else(|| panic!("{prefix:?}: no list of keys in {err:?}"));
    listed
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

/// A section header, commented or not: `[api]`, `# [[api.token]]` -> `api.token`.
fn header(line: &str) -> Option<String> {
    let t = line.trim_start_matches('#').trim();
    let inner = t.strip_prefix('[')?.strip_suffix(']')?;
    let inner = inner.trim_start_matches('[').trim_end_matches(']');
    inner
        .chars()
        .all(|c| c.is_ascii_lowercase() || c == '_' || c == '.')
        .then(|| inner.to_string())
}

/// A key line, commented (`# key = value`) or not: (key, commented).
fn key_line(line: &str) -> Option<(String, bool)> {
    let commented = line.starts_with('#');
    let t = line.strip_prefix("# ").unwrap_or(line);
    let (key, _) = t.split_once(" = ")?;
    (!key.is_empty() && key.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
        .then(|| (key.to_string(), commented))
}

/// (line index, section, key, commented) of every key line.
fn key_lines(text: &str) -> Vec<(usize, String, String, bool)> {
    let mut section = String::new();
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if let Some(h) = header(line) {
            section = h;
        } else if let Some((key, commented)) = key_line(line) {
            out.push((i, section.clone(), key, commented));
        }
    }
    out
}

#[test]
fn example_config_loads_with_the_package_paths() {
    let cfg = Config::from_toml(&example_text()).expect("contrib/nasd.toml is valid");
    assert_eq!(cfg.database.url, "sqlite:///var/lib/nasd/nasd.db");
    assert_eq!(cfg.daemon.log_dir, PathBuf::from("/var/log/nasd"));
    assert_eq!(
        cfg.daemon.schemes_dirs(),
        vec![
            PathBuf::from("/etc/nasd/schemes"),
            PathBuf::from("/usr/share/nasd/schemes")
        ]
    );
    assert_eq!(
        cfg.daemon.transport.known_hosts,
        PathBuf::from("/var/lib/nasd/known_hosts")
    );
    assert!(cfg.api.is_none() && cfg.alerts.is_none() && cfg.billing.is_none());
    // Everything else is the default.
    let d = Config::default();
    assert_eq!(cfg.daemon.max_attempts, d.daemon.max_attempts);
    assert_eq!(cfg.history, d.history);
    assert_eq!(cfg.cluster, d.cluster);
}

#[test]
fn example_config_names_every_key() {
    let text = example_text();
    let lines = key_lines(&text);
    let sections = known_keys("");
    assert!(sections.contains(&"daemon".to_string()), "{sections:?}");
    let mut wanted: Vec<(String, Vec<String>)> = sections
        .iter()
        .map(|s| (s.clone(), known_keys(&format!("[{s}]\n"))))
        .collect();
    wanted.push(("api.token".into(), known_keys("[[api.token]]\n")));
    wanted.push((
        "alerts.templates".into(),
        nasd::config::alerts::AlertKind::ALL
            .iter()
            .map(|k| k.name().to_string())
            .collect(),
    ));
    let mut missing = Vec::new();
    for (section, keys) in &wanted {
        for key in keys {
            // Tables of their own are named by their header.
            if (section == "api" && key == "token") || (section == "alerts" && key == "templates") {
                assert!(
                    text.contains(&format!("[{section}.{key}]")),
                    "[{section}.{key}]"
                );
                continue;
            }
            if !lines.iter().any(|(_, s, k, _)| s == section && k == key) {
                missing.push(format!("{section}.{key}"));
            }
        }
    }
    assert!(missing.is_empty(), "contrib/nasd.toml lacks {missing:?}");
    let unknown: Vec<String> = lines
        .iter()
        .filter(|(_, s, k, _)| {
            !wanted
                .iter()
                .any(|(section, keys)| section == s && keys.contains(k))
        })
        .map(|(i, s, k, _)| format!("line {}: {s}.{k}", i + 1))
        .collect();
    assert!(unknown.is_empty(), "keys nasd does not know: {unknown:?}");
}

/// Keys whose commented line is an example, not a default (they have none, or need
/// other keys beside them).
const NO_DEFAULT: &[&str] = &[
    "transport.ssh_key",
    "reconcile.every",
    "transport.ssh_key_passphrase",
    "transport.ssh_key_passphrase_file",
    "transport.ssh_key_passphrase_env",
    "transport.ssh_key_passphrase_credential",
    "api.token.secret_credential",
    "alerts.webhooks_file",
    "alerts.webhooks_env",
    "alerts.webhooks_credential",
    "alerts.telegram_bot_token_file",
    "alerts.telegram_bot_token_env",
    "alerts.telegram_bot_token_credential",
    "transport.api_tls_ca",
    "cluster.name",
    "alerts.telegram_bot_token",
    "alerts.telegram_chat_id",
    "alerts.telegram_api",
    "alerts.ca_file",
];

#[test]
fn example_config_comments_show_the_defaults() {
    let text = example_text();
    let all: Vec<&str> = text.lines().collect();
    let with = |uncomment: &[usize]| -> String {
        all.iter()
            .enumerate()
            .map(|(i, l)| {
                if uncomment.contains(&i) {
                    l.trim_start_matches('#').trim_start()
                } else {
                    l
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    let mut checked = 0;
    for (i, section, key, commented) in key_lines(&text) {
        let name = format!("{section}.{key}");
        if !commented
            || NO_DEFAULT.contains(&name.as_str())
            || section == "api.token"
            || section == "billing"
        {
            continue;
        }
        // The line's own section header, uncommented when it is commented.
        let head = (0..i)
            .rev()
            .find(|h| header(all[*h]).is_some())
            .expect("a section above");
        let base = with(&[head]);
        let changed = with(&[head, i]);
        let base_cfg = Config::from_toml(&base).unwrap_or_else(|e| panic!("{name}: base: {e}"));
        let cfg = Config::from_toml(&changed)
            .unwrap_or_else(|e| panic!("line {}: {name} uncommented: {e}", i + 1));
        assert_eq!(
            format!("{cfg:?}"),
            format!("{base_cfg:?}"),
            "line {}: `{}` is not the default of {name}",
            i + 1,
            all[i]
        );
        checked += 1;
    }
    assert!(checked > 60, "only {checked} defaults checked");
}

// ---- the package -------------------------------------------------------------------

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"))
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn ok(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    assert!(out.status.success(), "{program} {args:?}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `/usr/bin/nasd --config /etc/nasd/nasd.toml ARGS` as the nasd user.
fn as_nasd(args: &[&str]) -> Output {
    let mut all = vec!["-u", "nasd", "--", "/usr/bin/nasd", "--config", CONF];
    all.extend_from_slice(args);
    Command::new("runuser")
        .args(&all)
        .current_dir("/")
        .stdin(Stdio::null())
        .output()
        .expect("run runuser")
}

fn as_nasd_ok(args: &[&str]) -> String {
    let out = as_nasd(args);
    assert!(
        out.status.success(),
        "nasd {args:?} as nasd: {}",
        text(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn installed() -> bool {
    let out = run("dpkg-query", &["-W", "-f=${Status}", "nasd"]);
    out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("not-installed")
}

fn user_exists(name: &str) -> bool {
    run("getent", &["passwd", name]).status.success()
}

#[allow(clippy::disallowed_methods)] // a synchronous wait outside any runtime
fn wait_until(limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?}: {what}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A child process whose stdout and stderr are collected; killed when dropped.
struct Proc {
    child: Child,
    output: Arc<Mutex<String>>,
}

impl Proc {
    fn spawn(command: &mut Command) -> Proc {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let output = Arc::new(Mutex::new(String::new()));
        let pipes: Vec<Box<dyn std::io::Read + Send>> = vec![
            Box::new(child.stdout.take().expect("stdout")),
            Box::new(child.stderr.take().expect("stderr")),
        ];
        for mut pipe in pipes {
            let output = Arc::clone(&output);
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = pipe.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    if let Ok(mut out) = output.lock() {
                        out.push_str(&String::from_utf8_lossy(&buf[..n]));
                    }
                }
            });
        }
        Proc { child, output }
    }

    fn output(&self) -> String {
        self.output.lock().map(|o| o.clone()).unwrap_or_default()
    }

    /// SIGTERM, then the exit status within `limit`.
    #[allow(clippy::disallowed_methods)] // a synchronous wait outside any runtime
    fn terminate(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let pid = self.child.id().to_string();
        run("kill", &["-TERM", &pid]);
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Puts the machine back as it was, whatever the test reached: the package purged,
/// the user and group removed when the test made them, the operator scheme removed.
struct Cleanup {
    user_existed: bool,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all("/etc/nasd/schemes/mikrotik-api");
        if installed() {
            let out = run("dpkg", &["--purge", "nasd"]);
            if !out.status.success() {
                eprintln!("package test cleanup: dpkg --purge nasd: {}", text(&out));
            }
        }
        if !self.user_existed && user_exists("nasd") {
            run("userdel", &["nasd"]);
        }
        if !self.user_existed && run("getent", &["group", "nasd"]).status.success() {
            run("groupdel", &["nasd"]);
        }
    }
}

fn mode(path: &str) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .permissions()
        .mode()
        & 0o7777
}

#[test]
#[allow(clippy::disallowed_methods)] // synchronous waits on processes, no runtime here
fn debian_package_installs_runs_and_removes() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED debian_package_installs_runs_and_removes: needs root (dpkg -i)");
        return;
    }
    if !run(
        "sh",
        &[
            "-c",
            "command -v dpkg && command -v runuser && command -v setpriv",
        ],
    )
    .status
    .success()
    {
        eprintln!("SKIPPED debian_package_installs_runs_and_removes: no dpkg, runuser or setpriv");
        return;
    }
    let ci = std::env::var_os("CI").is_some();
    if !ci && !run("cargo", &["deb", "--version"]).status.success() {
        eprintln!(
            "SKIPPED debian_package_installs_runs_and_removes: cargo-deb is not installed \
             (`bash scripts/package.sh --setup` installs it; scripts/test.sh does)"
        );
        return;
    }
    // One run at a time on this machine (dpkg has one lock, and the paths are fixed).
    let lock = std::fs::File::create("/run/lock/nasd-package-test.lock").expect("lock file");
    lock.lock().expect("lock");
    for there in ["/etc/nasd", "/var/lib/nasd", "/var/log/nasd"] {
        if Path::new(there).exists() || installed() {
            eprintln!(
                "SKIPPED debian_package_installs_runs_and_removes: a nasd package or {there} \
                 is already on this machine; the test only runs where it leaves nothing"
            );
            return;
        }
    }
    let cleanup = Cleanup {
        user_existed: user_exists("nasd"),
    };

    // Build: the debug binary cargo test built, packaged as it is (fast compression).
    let started = Instant::now();
    let out = Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/package.sh"))
        .args(["--binary", env!("CARGO_BIN_EXE_nasd")])
        .stdin(Stdio::null())
        .output()
        .expect("run package.sh");
    assert!(out.status.success(), "package.sh: {}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let deb = stdout
        .lines()
        .last()
        .expect("package path")
        .trim()
        .to_string();
    assert!(deb.ends_with(".deb") && Path::new(&deb).exists(), "{deb}");
    eprintln!("package {deb} built in {:?}", started.elapsed());

    ok("dpkg", &["-i", &deb]);
    assert!(installed());

    // Files.
    assert_eq!(mode("/usr/bin/nasd"), 0o755);
    let version = ok("/usr/bin/nasd", &["--version"]);
    assert!(version.starts_with("nasd "), "{version}");
    let unit = std::fs::read_to_string("/lib/systemd/system/nasd.service").expect("unit");
    for line in [
        "Type=notify",
        "User=nasd",
        "ExecStartPre=/usr/bin/nasd --config /etc/nasd/nasd.toml check",
        "ExecStart=/usr/bin/nasd --config /etc/nasd/nasd.toml run",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ReadWritePaths=/var/lib/nasd /var/log/nasd",
    ] {
        assert!(unit.lines().any(|l| l == line), "the unit lacks {line}");
    }
    if run("sh", &["-c", "command -v systemd-analyze"])
        .status
        .success()
    {
        let out = run(
            "systemd-analyze",
            &["verify", "/lib/systemd/system/nasd.service"],
        );
        assert!(
            out.status.success(),
            "systemd-analyze verify: {}",
            text(&out)
        );
    }
    assert_eq!(
        std::fs::read_to_string(CONF).expect("installed config"),
        example_text()
    );
    let conffiles = ok("dpkg-query", &["-W", "-f=${Conffiles}", "nasd"]);
    assert!(conffiles.contains(CONF), "{conffiles}");
    for file in [
        "/usr/share/nasd/schemes/mikrotik-api/scheme.toml",
        "/usr/share/nasd/schemes/null-routeros/scheme.toml",
        "/usr/share/nasd/contrib/grafana/nasd.json",
        "/usr/share/nasd/contrib/prometheus/nasd-rules.yml",
        "/usr/share/man/man1/nasd.1.gz",
        "/usr/share/man/man1/nasd-nas-add.1.gz",
        "/usr/share/bash-completion/completions/nasd",
        "/usr/share/zsh/vendor-completions/_nasd",
    ] {
        assert!(Path::new(file).is_file(), "{file} is not installed");
    }
    assert_eq!(mode("/usr/share/nasd/schemes/demo-exec/bin/session"), 0o755);
    assert!(Path::new("/etc/nasd/schemes").is_dir());

    // The user and its directories; the config readable by its group only.
    let passwd = ok("getent", &["passwd", "nasd"]);
    let fields: Vec<&str> = passwd.trim().split(':').collect();
    assert_eq!(fields.get(5), Some(&"/var/lib/nasd"), "{passwd}");
    assert_eq!(fields.get(6), Some(&"/usr/sbin/nologin"), "{passwd}");
    let uid: u32 = fields[2].parse().expect("uid");
    let gid: u32 = fields[3].parse().expect("gid");
    assert!(uid < 1000, "a system user: {passwd}");
    for dir in ["/var/lib/nasd", "/var/log/nasd"] {
        let m = std::fs::metadata(dir).unwrap_or_else(|e| panic!("{dir}: {e}"));
        assert_eq!((m.uid(), m.gid(), mode(dir)), (uid, gid, 0o750), "{dir}");
    }
    let m = std::fs::metadata(CONF).expect("config");
    assert_eq!((m.uid(), m.gid(), mode(CONF)), (0, gid, 0o640));

    // `nasd check` as the unit's ExecStartPre runs it, on the fresh install.
    let checked = as_nasd_ok(&["check"]);
    assert!(
        checked.contains("/etc/nasd/schemes, /usr/share/nasd/schemes"),
        "{checked}"
    );

    // An operator scheme of the same name hides the packaged one.
    std::fs::create_dir_all("/etc/nasd/schemes/mikrotik-api").expect("operator scheme");
    std::fs::copy(
        "/usr/share/nasd/schemes/mikrotik-api/scheme.toml",
        "/etc/nasd/schemes/mikrotik-api/scheme.toml",
    )
    .expect("copy scheme");

    // A simulated RouterOS router on loopback, a NAS for it, one account, one event.
    let sim = Proc::spawn(Command::new("/usr/bin/nasd").args([
        "sim",
        "--listen",
        "127.0.0.1",
        "--password",
        "pkg-test-pw",
    ]));
    let mut api = String::new();
    wait_until(Duration::from_secs(30), "the simulator to start", || {
        let out = sim.output();
        if let Some(rest) = out.split("api on ").nth(1) {
            api = rest
                .split([',', ' ', '\n'])
                .next()
                .unwrap_or("")
                .to_string();
        }
        api.contains(':')
    });
    let port = api.rsplit(':').next().expect("port").to_string();
    as_nasd_ok(&[
        "nas",
        "add",
        "--id",
        "1",
        "--name",
        "pkg-sim",
        "--ip",
        "127.0.0.1",
        "--scheme",
        "mikrotik-api",
        "--port",
        &port,
        "--login",
        "admin",
        "--password",
        "pkg-test-pw",
    ]);
    let tmp = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let csv = tmp.path().join("accounts.csv");
    std::fs::write(
        &csv,
        "user_id,abonent_id,nas_id,login,ip,rate_in,rate_out\n1,101,1,pkguser,10.88.0.1,1024,512\n",
    )
    .expect("csv");
    std::fs::set_permissions(&csv, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    as_nasd_ok(&["accounts", "import", &csv.display().to_string()]);
    let id = as_nasd_ok(&["enqueue", "--cmd", "user_add", "--user-id", "1"]);
    let id: i64 = id
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("event id: {id}"));

    // The daemon as the nasd user with the installed config. setpriv execs nasd itself
    // (runuser would stay its parent and kill it on SIGTERM), so the signal reaches the
    // daemon as systemd's would.
    let mut daemon = Proc::spawn(
        Command::new("setpriv")
            .args(["--reuid=nasd", "--regid=nasd", "--init-groups", "--"])
            .args(["/usr/bin/nasd", "--config", CONF, "run"])
            .current_dir("/"),
    );
    let mut history = String::new();
    wait_until(Duration::from_secs(60), "the event to be done", || {
        history = String::from_utf8_lossy(&as_nasd(&["history", "--json"]).stdout).into_owned();
        let rows: serde_json::Value = serde_json::from_str(&history).unwrap_or_default();
        rows.as_array().is_some_and(|rows| {
            rows.iter()
                .any(|r| r["event_id"] == id && r["outcome"] == "done")
        })
    });
    let status = daemon.terminate(Duration::from_secs(30));
    assert!(
        status.is_some_and(|s| s.success()),
        "the daemon stops on SIGTERM: {status:?}\n{}",
        daemon.output()
    );
    drop(sim);
    // Its logs, written as nasd, say which scheme directory won.
    let daemon_log = std::fs::read_dir("/var/log/nasd")
        .expect("log dir")
        .flatten()
        .filter(|e| e.path().is_file())
        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
        .collect::<String>();
    assert!(
        daemon_log.contains("oss_pathname=/etc/nasd/schemes/mikrotik-api"),
        "{daemon_log}"
    );
    std::fs::remove_dir_all("/etc/nasd/schemes/mikrotik-api").expect("remove operator scheme");

    // Remove: the program goes, the config and the state stay; purge: all of it.
    ok("dpkg", &["--remove", "nasd"]);
    assert!(!Path::new("/usr/bin/nasd").exists());
    assert!(!Path::new("/lib/systemd/system/nasd.service").exists());
    assert!(Path::new(CONF).exists() && Path::new("/var/lib/nasd/nasd.db").exists());
    ok("dpkg", &["--purge", "nasd"]);
    assert!(!installed());
    for gone in [
        "/etc/nasd",
        "/var/lib/nasd",
        "/var/log/nasd",
        "/usr/share/nasd",
        "/etc/systemd/system/multi-user.target.wants/nasd.service",
        "/etc/systemd/system/nasd.service",
    ] {
        assert!(
            std::fs::symlink_metadata(gone).is_err(),
            "{gone} is left after purge"
        );
    }
    let overrides = run("dpkg-statoverride", &["--list", CONF]);
    assert!(!overrides.status.success(), "{}", text(&overrides));
    // The user stays after a purge (Debian policy); the cleanup removes it when the test
    // made it.
    assert!(user_exists("nasd"));
    let user_existed = cleanup.user_existed;
    drop(cleanup);
    assert_eq!(user_exists("nasd"), user_existed);
    drop(lock);
}
