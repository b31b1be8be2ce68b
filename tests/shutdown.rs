//! Graceful shutdown and systemd's notify protocol, on the real binary: SIGTERM stops
//! claiming and lets commands in flight finish; a grace period that runs out releases
//! them; a second signal exits at once; READY=1, WATCHDOG=1 and STOPPING=1 reach the
//! socket named by NOTIFY_SOCKET.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio::time::Instant;

use common::{Backend, TestEnv, add_accounts, event, nas};
use sqlx::Row;

/// A script that logs `start <event_id>`, sleeps, then logs `end <event_id>`.
fn slow_script(env: &TestEnv, log: &Path, seconds: &str) -> std::path::PathBuf {
    env.script(
        "slow.sh",
        &format!(
            "#!/bin/sh\necho \"start $event_id\" >> {log}\nsleep {seconds}\necho \"end $event_id\" >> {log}\necho ok\n",
            log = log.display()
        ),
    )
}

fn write_config(env: &TestEnv, grace: &str) -> std::path::PathBuf {
    let config = env.path().join("nasd.toml");
    std::fs::write(
        &config,
        format!(
            "[database]\nurl = \"{}\"\n[daemon]\nlog_dir = \"{}\"\nschemes_dir = \"{}\"\n\
             resync_interval = \"500ms\"\npoll_interval = \"50ms\"\nshutdown_grace = \"{grace}\"\n\
             lease = \"30s\"\n",
            env.url,
            env.log_dir().display(),
            env.schemes_dir().display()
        ),
    )
    .unwrap();
    config
}

fn spawn(config: &Path, notify: Option<&Path>) -> Child {
    let mut command = Command::new(env!("CARGO_BIN_EXE_nasd"));
    command
        .arg("--config")
        .arg(config)
        .arg("run")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(socket) = notify {
        command
            .env("NOTIFY_SOCKET", socket)
            .env("WATCHDOG_USEC", "200000");
    }
    command.spawn().expect("start nasd")
}

fn signal(child: &Child, name: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(child.id().to_string())
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{name}");
}

#[allow(clippy::disallowed_methods)] // a synchronous wait on a process outside the runtime
fn wait_exit(child: &mut Child, limit: Duration) -> (std::process::ExitStatus, Duration) {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return (status, started.elapsed());
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            panic!("nasd did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[allow(clippy::disallowed_methods)] // a synchronous wait on a process outside the runtime
fn wait_lines(log: &Path, prefix: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.lines().filter(|l| l.starts_with(prefix)).count() >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "waiting for {n} `{prefix}` lines: {text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// (state, try_count) of every row left in events_stack, by id.
async fn stack_rows(url: &str) -> Vec<(String, i64)> {
    let pool = sqlx::sqlite::SqlitePoolOptions::new()
        .connect(url)
        .await
        .unwrap();
    let rows = sqlx::query("SELECT state, try_count FROM events_stack ORDER BY id")
        .fetch_all(&pool)
        .await
        .unwrap();
    rows.iter()
        .map(|r| (r.get::<String, _>("state"), r.get::<i64, _>("try_count")))
        .collect()
}

async fn setup(
    seconds: &str,
    grace: &str,
    events: i64,
) -> (TestEnv, std::path::PathBuf, std::path::PathBuf) {
    let env = TestEnv::new(Backend::Sqlite).await;
    let store = env.store().await;
    let log = env.path().join("attempts.log");
    let script = slow_script(&env, &log, seconds);
    store
        .nas_upsert(&nas(1, Some(&script), None, 2))
        .await
        .unwrap();
    add_accounts(&store, events, &[1]).await;
    let batch: Vec<_> = (1..=events).map(|u| event("user_accept", u)).collect();
    store.enqueue_compact(&batch).await.unwrap();
    let config = write_config(&env, grace);
    (env, log, config)
}

fn recv_until(socket: &UnixDatagram, want: &str, limit: Duration) -> Vec<String> {
    let deadline = Instant::now() + limit;
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    while Instant::now() < deadline {
        if let Ok(n) = socket.recv(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]).to_string();
            let done = text.lines().any(|l| l == want);
            got.push(text);
            if done {
                return got;
            }
        }
    }
    panic!("no `{want}` from nasd within {limit:?}; got {got:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_and_notifies_systemd() {
    let (env, log, config) = setup("1.5", "10s", 6).await;
    let socket_path = env.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut child = spawn(&config, Some(&socket_path));

    let got = recv_until(&socket, "READY=1", Duration::from_secs(30));
    assert!(
        got.last().unwrap().contains("STATUS=serving 1 NAS"),
        "{got:?}"
    );
    // The watchdog is fed from the supervisor loop, every WATCHDOG_USEC / 2.
    recv_until(&socket, "WATCHDOG=1", Duration::from_secs(5));
    recv_until(&socket, "WATCHDOG=1", Duration::from_secs(5));

    // Two workers: two commands in flight, then SIGTERM.
    wait_lines(&log, "start", 2);
    signal(&child, "TERM");
    recv_until(&socket, "STOPPING=1", Duration::from_secs(10));
    let (status, _) = wait_exit(&mut child, Duration::from_secs(20));
    assert!(status.success(), "{status:?}");

    let text = std::fs::read_to_string(&log).unwrap();
    let starts: Vec<&str> = text.lines().filter(|l| l.starts_with("start")).collect();
    let ends: Vec<&str> = text.lines().filter(|l| l.starts_with("end")).collect();
    assert_eq!(
        starts.len(),
        2,
        "nothing new is claimed after SIGTERM:\n{text}"
    );
    assert_eq!(ends.len(), 2, "commands in flight finish:\n{text}");
    // Their results were committed; the other four wait untouched.
    let store = env.store().await;
    let (done, failed) = store.history_counts().await.unwrap();
    assert_eq!((done, failed), (2, 0));
    assert_eq!(
        stack_rows(&env.url).await,
        vec![("ready".to_string(), 0); 4]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grace_running_out_releases_and_a_second_signal_exits_at_once() {
    // Grace 500 ms, commands of 30 s: the daemon releases them and exits.
    let (env, log, config) = setup("30", "500ms", 2).await;
    let mut child = spawn(&config, None);
    wait_lines(&log, "start", 2);
    signal(&child, "TERM");
    let (status, took) = wait_exit(&mut child, Duration::from_secs(20));
    assert!(status.success(), "{status:?}");
    assert!(took < Duration::from_secs(20));
    // Released: back to ready, the attempt kept in try_count, nothing in history.
    assert_eq!(
        stack_rows(&env.url).await,
        vec![("ready".to_string(), 1); 2]
    );
    let store = env.store().await;
    assert_eq!(store.history_counts().await.unwrap(), (0, 0));
    let daemon_log = std::fs::read_to_string(env.log_dir().join("nas_event_daemon.log")).unwrap();
    assert!(daemon_log.contains("nasd stopped"), "{daemon_log}");

    // Grace 60 s: the first SIGINT waits for the commands, a second one exits with 130.
    let config = write_config(&env, "60s");
    std::fs::remove_file(&log).unwrap();
    let mut child = spawn(&config, None);
    wait_lines(&log, "start", 2);
    signal(&child, "INT");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "still waiting for the commands"
    );
    signal(&child, "INT");
    let (status, _) = wait_exit(&mut child, Duration::from_secs(5));
    assert_eq!(status.code(), Some(130), "{status:?}");
}
