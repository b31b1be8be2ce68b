//! The `nasd` command line as an operator uses it, on an SQLite database in a temp dir.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

fn nasd(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nasd"))
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run nasd")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).to_string(),
        String::from_utf8_lossy(&o.stderr).to_string(),
    )
}

fn setup() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("nasd.toml"),
        format!(
            "[database]\nurl = \"sqlite://{}/nasd.db\"\n[daemon]\nlog_dir = \"log\"\nschemes_dir = \"{}/schemes\"\nresync_interval = \"200ms\"\npoll_interval = \"50ms\"\n",
            dir.path().display(),
            env!("CARGO_MANIFEST_DIR")
        ),
    )
    .unwrap();
    let script = dir.path().join("session.sh");
    std::fs::write(&script, "#!/bin/sh\necho \"applied $1 to $ip\"\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

#[test]
fn invalid_config_is_refused_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("bad.toml"),
        "[daemon]\nresync_interval = \"soon\"\n",
    )
    .unwrap();
    let out = nasd(dir.path(), &["--config", "bad.toml", "run"]);
    assert_eq!(out.status.code(), Some(64));
    let (_, err) = text(&out);
    assert!(err.contains("config key daemon.resync_interval"), "{err}");
    std::fs::write(dir.path().join("typo.toml"), "[daemon]\nmax_atempts = 3\n").unwrap();
    let out = nasd(dir.path(), &["--config", "typo.toml", "migrate"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(text(&out).1.contains("max_atempts"));
}

#[test]
#[allow(clippy::disallowed_methods)] // a synchronous wait on a process outside the runtime
fn operator_workflow() {
    let dir = setup();
    let d = dir.path();
    let script = d.join("session.sh").display().to_string();
    let out = nasd(
        d,
        &[
            "nas",
            "add",
            "--id",
            "1",
            "--name",
            "Test NAS",
            "--ip",
            "10.20.11.15",
            "--script",
            &script,
            "--workers",
            "2",
            "--password",
            "topsecret",
        ],
    );
    assert!(out.status.success(), "{:?}", text(&out));
    let out = nasd(
        d,
        &[
            "nas", "add", "--id", "1", "--name", "x", "--ip", "10.0.0.9", "--script", &script,
        ],
    );
    assert!(!out.status.success());
    assert!(text(&out).1.contains("nas 1 already exists"));
    let out = nasd(d, &["nas", "set", "1", "--workers", "200"]);
    assert!(!out.status.success());
    assert!(
        text(&out).1.contains("workers must be 1..100, got 200"),
        "{:?}",
        text(&out)
    );
    nasd(
        d,
        &[
            "nas",
            "add",
            "--id",
            "2",
            "--name",
            "Ros",
            "--ip",
            "10.20.11.16",
            "--scheme",
            "null-routeros",
        ],
    );
    let out = nasd(d, &["nas", "list", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list[0]["name"], "Test NAS");
    assert_eq!(list[0]["n_workers"], 2);
    assert_eq!(list[0]["password_set"], true);
    assert!(!String::from_utf8_lossy(&out.stdout).contains("topsecret"));
    // SQLite runs one daemon: no cluster to show, and no owner the command could name.
    assert_eq!(list[0]["owner"], serde_json::Value::Null);
    let out = nasd(d, &["nas", "list"]);
    let (listed, _) = text(&out);
    let lines: Vec<&str> = listed.lines().collect();
    assert!(lines[0].ends_with(" enabled owner"), "{listed}");
    assert!(
        lines[1..].iter().all(|l| l.ends_with(" yes     -")),
        "{listed}"
    );
    let out = nasd(d, &["cluster", "status"]);
    assert!(out.status.success(), "{:?}", text(&out));
    assert_eq!(
        text(&out).0,
        "SQLite runs one daemon, which owns every enabled NAS; several daemons need \
         PostgreSQL (set [database] url to a postgres:// database)\n"
    );
    let out = nasd(d, &["cluster", "status", "--json"]);
    let cluster: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(cluster["backend"], "sqlite");
    assert_eq!(cluster["daemons"], serde_json::json!([]));

    std::fs::write(d.join("acc.csv"), "user_id,abonent_id,nas_id,login,ip,rate_in,rate_out,tariff\n1,101,1,alice,10.88.0.1,1024,512,gold\n2,102,2,bob,10.88.0.2,2048,1024,\n").unwrap();
    let out = nasd(d, &["accounts", "import", "acc.csv"]);
    assert!(out.status.success(), "{:?}", text(&out));
    assert!(text(&out).0.contains("imported 2 accounts"));
    std::fs::write(
        d.join("bad.csv"),
        "user_id,abonent_id,nas_id\n3,103,1\nx,104,1\n",
    )
    .unwrap();
    let out = nasd(d, &["accounts", "import", "bad.csv"]);
    assert!(!out.status.success());
    assert!(
        text(&out)
            .1
            .contains("bad.csv: line 3: column user_id: `x` is not an integer"),
        "{:?}",
        text(&out)
    );

    let out = nasd(
        d,
        &[
            "send",
            "--nas",
            "2",
            "--cmd",
            "user_rate_set",
            "--user-id",
            "2",
            "--dry-run",
        ],
    );
    assert!(out.status.success(), "{:?}", text(&out));
    assert!(
        text(&out).0.contains("target=10.88.0.2/32"),
        "{:?}",
        text(&out)
    );
    let out = nasd(
        d,
        &["send", "--nas", "1", "--cmd", "user_add", "--user-id", "1"],
    );
    let (stdout, _) = text(&out);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("answer: applied user_add to 10.88.0.1"),
        "{stdout}"
    );
    assert!(stdout.contains("outcome: done ("));
    assert!(
        stdout.contains("tariff=gold"),
        "extra CSV columns become variables: {stdout}"
    );

    let out = nasd(d, &["enqueue", "--cmd", "user add", "--user-id", "1"]);
    assert!(!out.status.success());
    assert!(text(&out).1.contains("is not a cmd name"));
    let out = nasd(d, &["enqueue", "--cmd", "user_drop", "--user-id", "1"]);
    assert!(out.status.success());
    let id: i64 = text(&out).0.trim().parse().expect("enqueue prints the id");
    assert!(id > 0);
    let out = nasd(d, &["stack", "count", "--json"]);
    let count: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(count["compact_total"], 1);
    let out = nasd(d, &["stack", "count"]);
    assert!(
        text(&out)
            .0
            .starts_with("1 events_stack_compact\n0 events_stack\n"),
        "{:?}",
        text(&out)
    );

    // The daemon delivers it and stops cleanly on SIGTERM.
    let mut child = Command::new(env!("CARGO_BIN_EXE_nasd"))
        .current_dir(d)
        .arg("run")
        .spawn()
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let out = nasd(d, &["history", "--json"]);
        let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if rows.as_array().is_some_and(|r| r.len() == 1) {
            assert_eq!(rows[0]["outcome"], "done");
            assert_eq!(rows[0]["compact_id"], id);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "event not delivered"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let kill = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(kill.success());
    let status = child.wait().unwrap();
    assert!(status.success(), "graceful stop exits 0: {status:?}");
    let daemon_log = std::fs::read_to_string(d.join("log/nas_event_daemon.log")).unwrap();
    assert!(daemon_log.contains("nasd stopped"));
    let nas_log =
        std::fs::read_to_string(d.join("log/nas_event_daemon/Test_NAS_10.20.11.15.log")).unwrap();
    assert!(nas_log.contains("cmd=user_drop try=1 answer: applied user_drop to 10.88.0.1"));
    assert!(!nas_log.contains("topsecret"));
}

/// The newcomer's first command (`cargo run --release -- demo`), smaller: five NAS over
/// SSH, telnet, a local script, RADIUS CoA and the RouterOS API, each reaching a
/// simulated router (or the script) over real sockets.
#[test]
fn demo_drives_every_transport_and_reports_the_mistakes() {
    let dir = tempfile::tempdir().unwrap();
    let out = nasd(
        dir.path(),
        &[
            "demo",
            "--dir",
            "demo",
            "--accounts",
            "50",
            "--events-per-account",
            "3",
            "--workers",
            "4",
        ],
    );
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    // 50 accounts x 3 events plus the two deliberate mistakes.
    assert!(
        stdout.contains("50 accounts on 5 NAS, 152 events"),
        "{stdout}"
    );
    assert!(stdout.contains("150 done, 2 failed"), "{stdout}");
    assert!(
        stdout
            .contains("failed: event for user_id=1050 cmd=user_add: unknown account user_id=1050"),
        "{stdout}"
    );
    assert!(
        stdout.contains("scheme mikrotik-telnet does not define cmd user_frobnicate"),
        "{stdout}"
    );
    // Accounts are spread over the NAS by user_id % 5: ten accounts, 30 events each.
    assert!(
        stdout.contains("router-coa answered 30 CoA/Disconnect requests"),
        "{stdout}"
    );
    let logs = dir.path().join("demo/log/nas_event_daemon");
    for (file, proof) in [
        ("Sim_SSH_127.0.0.1.log", "send: /ip firewall"),
        ("Sim_Telnet_127.0.0.2.log", "send: /ip firewall"),
        ("Legacy_Script_10.255.0.3.log", "send: "),
        ("Sim_CoA_127.0.0.3.log", "radclient -x 127.0.0.3:"),
        ("Sim_API_127.0.0.4.log", "send: /ip/firewall/address-list/"),
    ] {
        let log =
            std::fs::read_to_string(logs.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        // Coalescing may supersede a queued `user_redirect` by the `user_redirect_cancel`
        // behind it (MikroTik schemes): each event is either done or superseded.
        assert_eq!(
            log.matches("outcome: done").count() + log.matches("outcome: superseded").count(),
            30,
            "{file}:\n{log}"
        );
        assert!(log.contains(proof), "{file}:\n{log}");
    }
    let coa = std::fs::read_to_string(logs.join("Sim_CoA_127.0.0.3.log")).unwrap();
    assert!(coa.contains("answer: CoA-ACK"), "{coa}");
    assert!(
        !coa.contains("testing123"),
        "the RADIUS secret must not be logged"
    );
}

/// `nasd` with extra environment variables.
fn nasd_env(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nasd"))
        .current_dir(dir)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run nasd")
}

/// A loopback port nothing listens on (bound, then let go).
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a port");
    listener.local_addr().expect("its address").port()
}

/// Starts `nasd run` in `dir`; stop it with [`stop_daemon`].
fn start_daemon(dir: &Path) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_nasd"))
        .current_dir(dir)
        .arg("run")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start nasd run")
}

/// SIGTERM, then waits: the daemon stops cleanly (its logs flushed); returns its stderr.
#[allow(clippy::disallowed_methods)] // a synchronous wait on a process outside the runtime
fn stop_daemon(child: std::process::Child) -> String {
    let kill = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .expect("kill");
    assert!(kill.success());
    let out = child.wait_with_output().expect("wait for nasd run");
    assert!(out.status.success(), "graceful stop exits 0: {out:?}");
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// Polls `probe` every 100 ms for up to 20 s until it gives a value.
#[allow(clippy::disallowed_methods)] // polls a process outside the runtime
fn wait_for<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The lines of a log file, each checked to start with `YYYY-MM-DD HH:MM:SS.mmm ` (Carbon's
/// time and the milliseconds) and returned without it.
fn log_lines(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .map(|line| {
            let (ts, rest) = line.split_at("2026-12-03 10:11:12.345".len());
            chrono::NaiveDateTime::parse_from_str(ts, "%Y-%m-%d %H:%M:%S%.3f")
                .unwrap_or_else(|e| panic!("{}: bad time in {line:?}: {e}", path.display()));
            assert_eq!(ts.as_bytes()[19], b'.', "milliseconds: {line:?}");
            rest.strip_prefix(' ')
                .unwrap_or_else(|| panic!("no space after the time: {line:?}"))
                .to_string()
        })
        .collect()
}

/// An event that fails before any NAS (no such account, no such NAS) is told in the
/// daemon log and in its account's log, with the reason, not only in events_history.
#[test]
fn an_event_that_fails_at_expansion_is_in_the_daemon_and_account_logs() {
    let dir = setup();
    let d = dir.path();
    let script = d.join("session.sh").display().to_string();
    let out = nasd(
        d,
        &[
            "nas", "add", "--id", "1", "--name", "Core", "--ip", "10.0.0.1", "--script", &script,
        ],
    );
    assert!(out.status.success(), "{:?}", text(&out));
    std::fs::write(d.join("acc.csv"), "user_id,abonent_id,nas_id\n1,101,1\n").unwrap();
    assert!(nasd(d, &["accounts", "import", "acc.csv"]).status.success());
    let enqueue = |args: &[&str]| -> i64 {
        let out = nasd(d, &[&["enqueue", "--cmd", "user_add"], args].concat());
        assert!(out.status.success(), "{:?}", text(&out));
        text(&out).0.trim().parse().expect("enqueue prints the id")
    };
    let unknown_account = enqueue(&["--user-id", "77"]);
    let unknown_nas = enqueue(&[
        "--user-id",
        "1",
        "--abonent-id",
        "101",
        "--nas-ip",
        "10.9.9.9",
    ]);
    let delivered = enqueue(&["--user-id", "1"]);

    let daemon = start_daemon(d);
    wait_for("three events in history", || {
        let out = nasd(d, &["history", "--json"]);
        let rows: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        (rows.as_array()?.len() == 3).then_some(())
    });
    stop_daemon(daemon);

    let daemon_log = log_lines(&d.join("log/nas_event_daemon.log"));
    for want in [
        format!(
            "event id={unknown_account} user_id=77 abonent_id=- cmd=user_add failed at \
             expansion, nothing was sent: unknown account user_id=77"
        ),
        format!(
            "event id={unknown_nas} user_id=1 abonent_id=101 cmd=user_add failed at \
             expansion, nothing was sent: unknown nas_ip 10.9.9.9"
        ),
    ] {
        assert!(
            daemon_log.iter().any(|l| l.ends_with(&want)),
            "{want}\n{daemon_log:#?}"
        );
    }
    assert_eq!(
        log_lines(&d.join("log/abonents/0/event_77.log")),
        [format!(
            "nas=- event=- user_id=77 cmd=user_add try=0 outcome: failed (not expanded, \
             nothing was sent; enqueued as id {unknown_account}): unknown account user_id=77"
        )]
    );
    // The account's log holds its failure beside the attempt that was delivered.
    let account = log_lines(&d.join("log/abonents/101/event_1.log"));
    assert_eq!(
        account[0],
        format!(
            "nas=- event=- user_id=1 cmd=user_add try=0 outcome: failed (not expanded, \
             nothing was sent; enqueued as id {unknown_nas}): unknown nas_ip 10.9.9.9"
        ),
        "{account:#?}"
    );
    assert!(
        account[1..]
            .iter()
            .any(|l| l.contains("cmd=user_add try=1 outcome: done (")),
        "{account:#?}"
    );
    assert!(delivered > unknown_nas);
}

/// A NAS that cannot work as configured (an SSH NAS without a login, a RADIUS NAS
/// without its secret) is a configuration error in `/status` and the daemon log, not a
/// NAS that is down: nothing is sent, the circuit breaker counts nothing.
#[test]
fn a_nas_configured_wrong_is_a_configuration_error_not_down() {
    let dir = setup();
    let d = dir.path();
    let port = free_port();
    let mut config = std::fs::read_to_string(d.join("nasd.toml")).unwrap();
    config.push_str(&format!(
        "[api]\nlisten = \"127.0.0.1:{port}\"\nnas_down_after = \"1s\"\n[breaker]\nfailures = 1\n"
    ));
    std::fs::write(d.join("nasd.toml"), config).unwrap();
    for args in [
        &[
            "--id",
            "1",
            "--name",
            "Ssh",
            "--ip",
            "127.0.0.1",
            "--scheme",
            "mikrotik-ssh",
        ][..],
        &[
            "--id",
            "2",
            "--name",
            "Coa",
            "--ip",
            "127.0.0.2",
            "--scheme",
            "mikrotik-coa",
        ][..],
    ] {
        let out = nasd(d, &[&["nas", "add"], args].concat());
        assert!(out.status.success(), "{:?}", text(&out));
    }
    std::fs::write(
        d.join("acc.csv"),
        "user_id,abonent_id,nas_id,login,ip\n1,101,1,alice,10.88.0.1\n2,102,2,bob,10.88.0.2\n",
    )
    .unwrap();
    assert!(nasd(d, &["accounts", "import", "acc.csv"]).status.success());
    for args in [
        &["--cmd", "user_del", "--user-id", "1"][..],
        &[
            "--cmd",
            "user_disconnect",
            "--user-id",
            "2",
            "--acct-session-id",
            "s1",
        ][..],
    ] {
        assert!(nasd(d, &[&["enqueue"], args].concat()).status.success());
    }

    let daemon = start_daemon(d);
    let ssh = "nas 1 (Ssh, 127.0.0.1) config_error: login is not set for its ssh scheme \
               mikrotik-ssh (nasd nas set 1 --login NAME); its events wait until this is \
               fixed (not counted as the NAS being down)";
    let coa = "nas 2 (Coa, 127.0.0.2) config_error: the RADIUS secret is not set for its \
               radius scheme mikrotik-coa (nasd nas set 2 --secret SECRET); its events wait \
               until this is fixed (not counted as the NAS being down)";
    let status = wait_for("both NAS named in /status", || {
        use std::io::{Read, Write};
        let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        conn.write_all(b"GET /status HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .ok()?;
        let mut answer = String::new();
        conn.read_to_string(&mut answer).ok()?;
        (answer.contains(ssh) && answer.contains(coa)).then_some(answer)
    });
    assert!(
        status.starts_with("HTTP/1.0 503") || status.starts_with("HTTP/1.1 503"),
        "{status}"
    );
    assert!(!status.contains("down for"), "{status}");
    // The events wait in the stack: nothing was tried, nothing failed.
    let out = nasd(d, &["stack", "count", "--json"]);
    let count: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(count["stack_total"], 2, "{count}");
    let stderr = stop_daemon(daemon);

    let daemon_log = log_lines(&d.join("log/nas_event_daemon.log"));
    for want in [
        "nas nasid=1 nas_ip=127.0.0.1: configuration error: login is not set for its ssh \
         scheme mikrotik-ssh (nasd nas set 1 --login NAME); its events wait until this is \
         fixed (the NAS is not counted as down)",
        "nas nasid=2 nas_ip=127.0.0.2: configuration error: the RADIUS secret is not set for \
         its radius scheme mikrotik-coa (nasd nas set 2 --secret SECRET); its events wait \
         until this is fixed (the NAS is not counted as down)",
    ] {
        assert!(
            daemon_log.iter().filter(|l| l.ends_with(want)).count() == 1,
            "once: {want}\n{daemon_log:#?}"
        );
    }
    assert!(
        !daemon_log.iter().any(|l| l.contains("NAS down")),
        "{daemon_log:#?}"
    );
    assert!(!stderr.contains("NAS down"), "{stderr}");
    assert!(nasd(d, &["history", "--json"]).stdout.starts_with(b"[]"));
}

/// A database that cannot be reached is named with its address and the cause, once,
/// without the password; so is one the server does not have.
#[test]
fn an_unreachable_database_is_named_once_with_its_cause() {
    let dir = setup();
    let d = dir.path();
    let port = free_port();
    std::fs::write(
        d.join("pg.toml"),
        format!(
            "[database]\nurl = \"postgres://postgres:hunter2@127.0.0.1:{port}/test\"\n\
             [daemon]\nlog_dir = \"log\"\nschemes_dir = \"{}/schemes\"\n",
            env!("CARGO_MANIFEST_DIR")
        ),
    )
    .unwrap();
    let refused = format!(
        "nasd: opening the postgres database: cannot connect to PostgreSQL at 127.0.0.1:{port}: \
         connection refused\n"
    );
    for command in [&["migrate"][..], &["run"], &["nas", "list"]] {
        let out = nasd(d, &[&["--config", "pg.toml"], command].concat());
        assert_eq!(out.status.code(), Some(1), "{command:?}");
        assert_eq!(text(&out).1, refused, "{command:?}");
    }
    let out = nasd(d, &["--config", "pg.toml", "check"]);
    assert_eq!(out.status.code(), Some(1));
    let (stdout, stderr) = text(&out);
    assert!(
        stdout.contains(&format!(
            "error    database: cannot connect to PostgreSQL at 127.0.0.1:{port}: connection refused\n"
        )),
        "{stdout}"
    );
    assert!(!stdout.contains("hunter2") && !stderr.contains("hunter2"));

    // The real server, a database it does not have: the server's own words.
    let admin = std::env::var("NASD_TEST_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string());
    let (server, _) = admin.rsplit_once('/').expect("a database url");
    std::fs::write(
        d.join("nodb.toml"),
        format!("[database]\nurl = \"{server}/nasd_no_such_database\"\n"),
    )
    .unwrap();
    let out = nasd(d, &["--config", "nodb.toml", "nas", "list"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out).1;
    assert!(
        stderr.starts_with("nasd: opening the postgres database: cannot connect to PostgreSQL at ")
            && stderr.ends_with(": database \"nasd_no_such_database\" does not exist\n"),
        "{stderr}"
    );
}

/// An SQLite file in a directory that does not exist is refused naming the directory,
/// which is not created; one missing level (the default `var/nasd.db`) is created.
#[test]
fn an_sqlite_file_in_a_missing_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let missing = d.join("nonexistent/dir");
    std::fs::write(
        d.join("nasd.toml"),
        format!(
            "[database]\nurl = \"sqlite://{}/x.db\"\n[daemon]\nschemes_dir = \"{}/schemes\"\n",
            missing.display(),
            env!("CARGO_MANIFEST_DIR")
        ),
    )
    .unwrap();
    // `run` too, which takes its lock beside the file before opening it.
    for command in [&["migrate"][..], &["nas", "list"], &["run"]] {
        let out = nasd(d, command);
        assert_eq!(out.status.code(), Some(1), "{command:?}");
        assert_eq!(
            text(&out).1,
            format!(
                "nasd: opening the sqlite database: cannot open the SQLite database {}/x.db: \
                 directory {} does not exist (create it first)\n",
                missing.display(),
                missing.display()
            )
        );
    }
    assert!(!d.join("nonexistent").exists(), "nothing was created");
    std::fs::write(
        d.join("nasd.toml"),
        "[database]\nurl = \"sqlite://var/x.db\"\n",
    )
    .unwrap();
    let out = nasd(d, &["migrate"]);
    assert!(out.status.success(), "{:?}", text(&out));
    assert!(d.join("var/x.db").is_file());
}

/// A schemes_dir that does not exist is named: an error of `nasd check`, and for the
/// daemon a configuration error of each NAS whose scheme is therefore missing.
#[test]
fn a_missing_schemes_dir_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let schemes = d.join("no-schemes");
    std::fs::write(
        d.join("nasd.toml"),
        format!(
            "[database]\nurl = \"sqlite://{}/nasd.db\"\n[daemon]\nlog_dir = \"log\"\n\
             schemes_dir = \"{}\"\nresync_interval = \"200ms\"\n",
            d.display(),
            schemes.display()
        ),
    )
    .unwrap();
    let out = nasd(
        d,
        &[
            "nas",
            "add",
            "--id",
            "1",
            "--name",
            "Core",
            "--ip",
            "10.0.0.1",
            "--scheme",
            "null-routeros",
        ],
    );
    assert!(out.status.success(), "{:?}", text(&out));
    assert!(
        text(&out).1.contains(&format!(
            "warning: scheme null-routeros was not found in {} (no scheme there)",
            schemes.display()
        )),
        "{:?}",
        text(&out)
    );
    let out = nasd(d, &["check"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).0.contains(&format!(
            "error    schemes dir {}: cannot read: No such file or directory",
            schemes.display()
        )),
        "{:?}",
        text(&out)
    );

    // The NAS needs a scheme that no directory has: `nasd run` refuses to start.
    let out = nasd(d, &["run"]);
    assert_eq!(out.status.code(), Some(1), "{:?}", text(&out));
    assert!(
        text(&out).1.contains(&format!(
            "config key daemon.schemes_dir: {} does not exist; no schemes directory has the \
             scheme of nas 1 (Core, 10.0.0.1): null-routeros (its events would only wait)",
            schemes.display()
        )),
        "{:?}",
        text(&out)
    );
}

/// `nas add`/`nas set` refuse an IP that is none and warn of a scheme that is not there;
/// `enqueue --nas-ip` refuses an IP that is none, as `--from-file` does.
#[test]
fn bad_ips_are_refused_and_a_missing_scheme_is_named() {
    let dir = setup();
    let d = dir.path();
    let add = |ip: &str, scheme: &str| {
        nasd(
            d,
            &[
                "nas", "add", "--id", "1", "--name", "Core", "--ip", ip, "--scheme", scheme,
            ],
        )
    };
    let out = add("10.0.0.999", "null-routeros");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out).1,
        "nasd: --ip `10.0.0.999` is not an IP address\n"
    );
    let out = add("10.0.0.1", "mikrotik-sssh");
    assert!(out.status.success(), "{:?}", text(&out));
    assert_eq!(
        text(&out).1,
        format!(
            "warning: scheme mikrotik-sssh was not found in {}/schemes (schemes there: \
             accel-ppp, cisco-ios, cisco-isg, demo-exec, linux-ipset, mikrotik-api, \
             mikrotik-api-ssl, mikrotik-coa, mikrotik-ssh, mikrotik-telnet, null-routeros); \
             the NAS is saved, but its events wait until the scheme exists\n",
            env!("CARGO_MANIFEST_DIR")
        )
    );
    let out = nasd(d, &["nas", "set", "1", "--ip", "10.0.0.256"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out).1,
        "nasd: --ip `10.0.0.256` is not an IP address\n"
    );
    let out = nasd(d, &["nas", "set", "1", "--scheme", "mikrotik-ssh"]);
    assert!(out.status.success(), "{:?}", text(&out));
    assert_eq!(text(&out).1, "", "the scheme exists: no warning");
    let out = nasd(d, &["nas", "list", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list[0]["ip"], "10.0.0.1");

    let out = nasd(
        d,
        &[
            "enqueue",
            "--cmd",
            "user_add",
            "--user-id",
            "1",
            "--nas-ip",
            "10.0.0.999",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out).1,
        "nasd: --nas-ip `10.0.0.999` is not an IP address\n"
    );
    let out = nasd(d, &["stack", "count", "--json"]);
    let count: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(count["compact_total"], 0);
}

/// Diagnostics on stderr are plain text when stderr is not a terminal.
#[test]
fn stderr_has_no_colours_when_it_is_not_a_terminal() {
    let dir = setup();
    let out = nasd_env(dir.path(), &["nas", "list"], &[("NASD_LOG", "debug")]);
    assert!(out.status.success(), "{:?}", text(&out));
    let stderr = text(&out).1;
    assert!(stderr.contains("DEBUG"), "debug lines expected: {stderr}");
    assert!(!stderr.contains('\u{1b}'), "no ANSI escapes: {stderr:?}");
}
