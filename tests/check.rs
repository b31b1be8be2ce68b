//! `nasd check --connect` with the real binary: one login per NAS against the
//! simulator's SSH server, with its time; a NAS nobody answers for is an error naming
//! it, and the exit code says so. Secrets never appear in the report.

use std::process::Command;

use nasd::sim::{self, SimOptions};
use nasd::store::{Nas, Secret, Store};
use tokio_util::sync::CancellationToken;

fn ssh_nas(id: i64, port: u16, password: &str) -> Nas {
    Nas {
        scheme: Some("mikrotik-ssh".into()),
        port: Some(i32::from(port)),
        login: Some("admin".into()),
        password: Some(Secret::new(password)),
        max_sessions: 2,
        host_key_policy: "accept-new".into(),
        ..Nas::new(id, &format!("Router {id}"), "127.0.0.1")
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn connect_logs_in_to_every_nas_and_names_the_one_that_fails() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("nasd.db");
    let url = format!("sqlite://{}", db.display());
    let store = Store::connect(&url, 2).await.unwrap();
    store.migrate().await.unwrap();
    let sim = sim::start(&SimOptions::default(), CancellationToken::new())
        .await
        .unwrap();
    // A port nobody listens on: bound, then released.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    store
        .nas_upsert(&ssh_nas(1, sim.ssh_addr.port(), "admin"))
        .await
        .unwrap();
    let mut gone = ssh_nas(2, closed, "never-printed-secret");
    gone.ip = "127.0.0.2".into();
    store.nas_upsert(&gone).await.unwrap();
    let schemes = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schemes");
    let config = dir.path().join("nasd.toml");
    std::fs::write(
        &config,
        format!(
            "[database]\nurl = \"{url}\"\n[daemon]\nschemes_dir = \"{}\"\nlog_dir = \"{}\"\n\
             [transport]\nknown_hosts = \"{}\"\nconnect_timeout = \"2s\"\n",
            schemes.display(),
            dir.path().join("log").display(),
            dir.path().join("known_hosts").display()
        ),
    )
    .unwrap();
    let bin = env!("CARGO_BIN_EXE_nasd");
    let run = move |args: &[&str]| {
        let out = Command::new(bin)
            .arg("--config")
            .arg(&config)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
        )
    };
    let check = tokio::task::spawn_blocking(move || {
        let plain = run(&["check"]);
        let connect = run(&["check", "--connect"]);
        (plain, connect)
    });
    let ((plain_code, plain), (code, text)) = check.await.unwrap();
    // Without --connect nothing logs in: the rows are fine.
    assert_eq!(plain_code, Some(0), "{plain}");
    assert!(!plain.contains("login"), "{plain}");
    assert_eq!(code, Some(1), "{text}");
    let ok = text
        .lines()
        .find(|l| l.contains("nas 1 (Router 1 127.0.0.1): login ok in"))
        .unwrap_or_else(|| panic!("no login line for nas 1:\n{text}"));
    assert!(ok.starts_with("ok"), "{ok}");
    let failed = text
        .lines()
        .find(|l| l.contains("nas 2 (Router 2 127.0.0.2): login failed"))
        .unwrap_or_else(|| panic!("no failure line for nas 2:\n{text}"));
    assert!(failed.starts_with("error"), "{failed}");
    assert!(
        failed.contains(&closed.to_string()) || failed.contains("connect"),
        "{failed}"
    );
    assert!(!text.contains("never-printed-secret"), "{text}");
    assert!(text.contains("nasd check: 1 error(s)"), "{text}");
    sim.stop().await;
}

/// Polls `check` every 50 ms until it holds; panics naming `what` after 20 s.
async fn wait(what: &str, check: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// SIGHUP (`systemctl reload`) reloads the config: the API tokens and the retries
/// change live, a changed `[database]` is named as needing a restart, a broken config
/// changes nothing; the daemon goes on.
#[tokio::test(flavor = "multi_thread")]
async fn sighup_reloads_the_config_and_the_daemon_goes_on() {
    const OLD: &str = "old-token-0123456789abcdef";
    const NEW: &str = "new-token-fedcba9876543210";
    let dir = tempfile::tempdir().unwrap();
    let log_dir = dir.path().join("log");
    let config = dir.path().join("nasd.toml");
    let write = |token: &str, extra: &str| {
        let text = format!(
            "[database]\nurl = \"sqlite://{}\"\n{extra}[daemon]\nlog_dir = \"{}\"\nschemes_dir = \"{}\"\n\
             [api]\nlisten = \"127.0.0.1:0\"\ntokens = [\"{token}\"]\n",
            dir.path().join("nasd.db").display(),
            log_dir.display(),
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("schemes")
                .display()
        );
        std::fs::write(&config, &text).unwrap();
        text
    };
    let text = write(OLD, "");
    let stderr = dir.path().join("stderr");
    let mut child = Command::new(env!("CARGO_BIN_EXE_nasd"))
        .arg("--config")
        .arg(&config)
        .arg("run")
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    let pid = child.id().to_string();
    let daemon_log = log_dir.join("nas_event_daemon.log");
    let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap_or_default();
    wait("the daemon started", || {
        read(&daemon_log).contains("api on http://")
    })
    .await;
    let log = read(&daemon_log);
    let addr: std::net::SocketAddr = log
        .split("api on http://")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no api address in {log}"));
    let status_with = |token: &'static str| async move {
        let bearer = format!("Bearer {token}");
        nasd::tools::http_client::request(
            addr,
            "GET",
            "/api/v1/nas",
            &[("authorization", bearer.as_str())],
            b"",
        )
        .await
        .unwrap()
        .status
    };
    assert_eq!(status_with(OLD).await, 200);
    assert_eq!(status_with(NEW).await, 401);
    let hup = || {
        assert!(
            Command::new("kill")
                .args(["-HUP", &pid])
                .status()
                .unwrap()
                .success()
        )
    };
    // New token, more attempts, and a database setting that needs a restart.
    write(NEW, "max_connections = 7\n[breaker]\nfailures = 9\n");
    std::fs::write(
        &config,
        read(&config).replace("[daemon]\n", "[daemon]\nmax_attempts = 7\n"),
    )
    .unwrap();
    hup();
    wait("the reload reported", || {
        read(&daemon_log).contains("SIGHUP: changed but kept until a restart")
    })
    .await;
    let log = read(&daemon_log);
    assert!(
        log.contains("SIGHUP: config reloaded: applied retries (max_attempts 7")
            && log.contains("[breaker]")
            && log.contains("API tokens (now: tokens[0] (admin))"),
        "{log}"
    );
    assert!(
        log.contains("changed but kept until a restart: [database] (restart nasd to apply)"),
        "{log}"
    );
    assert!(
        !log.contains(OLD) && !log.contains(NEW),
        "no token in the log"
    );
    assert_eq!(status_with(OLD).await, 401, "the old token is gone");
    assert_eq!(status_with(NEW).await, 200, "the new token works");
    // A broken config is named, nothing changes, and the daemon still runs.
    std::fs::write(&config, format!("{text}[daemon]\n")).unwrap();
    hup();
    wait("the broken config reported", || {
        read(&daemon_log).contains("SIGHUP: the config has an error, nothing was changed")
    })
    .await;
    assert_eq!(status_with(NEW).await, 200, "still the reloaded token");
    assert!(child.try_wait().unwrap().is_none(), "the daemon goes on");
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}: {}", read(&stderr));
}
