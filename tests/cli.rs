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
        assert_eq!(log.matches("outcome: done").count(), 30, "{file}:\n{log}");
        assert!(log.contains(proof), "{file}:\n{log}");
    }
    let coa = std::fs::read_to_string(logs.join("Sim_CoA_127.0.0.3.log")).unwrap();
    assert!(coa.contains("answer: CoA-ACK"), "{coa}");
    assert!(
        !coa.contains("testing123"),
        "the RADIUS secret must not be logged"
    );
}
