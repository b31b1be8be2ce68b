//! Running out of something is a condition to wait out, not a verdict.
//!
//! - The real `nasd run` under an open files limit of 256 (soft and hard, so it cannot
//!   raise it), with the API allowed more connections than that: 300 idle connections to
//!   the API port take every descriptor, events for a local-script NAS find none to run
//!   their script with, and go back to their lane (the error names the shortage); once
//!   the connections close, every event is delivered exactly once and none failed. The
//!   daemon warned at start that the limit is short.
//! - The API's limits, in process: more idle connections than `max_connections` (silent,
//!   half a header, idle keep-alive, half a body) do not keep a normal client from its
//!   answer, and every one of them is closed by the header or body timeout.

mod common;

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::{Backend, TestEnv, add_accounts, event, nas, wait_for};
use nasd::config::ApiConfig;
use nasd::tools::http_client::request;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// Generous bounds against a hung test, not measurements.
const LIMIT: Duration = Duration::from_secs(60);

/// The open files limit the daemon runs under.
const NOFILE: u64 = 256;

/// A free port on 127.0.0.1 for the daemon's API.
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

fn write_config(env: &TestEnv, port: u16) -> std::path::PathBuf {
    let config = env.path().join("nasd.toml");
    std::fs::write(
        &config,
        format!(
            "[database]\nurl = \"{}\"\n[daemon]\nlog_dir = \"{}\"\nschemes_dir = \"{}\"\n\
             resync_interval = \"300ms\"\npoll_interval = \"50ms\"\nretry_base = \"100ms\"\n\
             retry_cap = \"500ms\"\nmax_attempts = 3\n\
             [api]\nlisten = \"127.0.0.1:{port}\"\nmax_connections = 1000\n\
             header_timeout = \"10m\"\n",
            env.url,
            env.log_dir().display(),
            env.schemes_dir().display()
        ),
    )
    .expect("write nasd.toml");
    config
}

/// Every line of the recorder: `<event_id> <cmd>`.
fn recorded(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

async fn last_errors(db: &sqlx::SqlitePool) -> Vec<String> {
    sqlx::query_scalar::<_, Option<String>>("SELECT last_error FROM events_stack")
        .fetch_all(db)
        .await
        .expect("read the stack")
        .into_iter()
        .flatten()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_events_wait_and_are_delivered_once() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let store = env.store().await;
    let db = sqlx::SqlitePool::connect(&env.url)
        .await
        .expect("open the database");
    let record = env.path().join("record.txt");
    let script = env.script(
        "rec.sh",
        &format!(
            "#!/bin/sh\necho \"$event_id $1\" >> {}\necho ok\n",
            record.display()
        ),
    );
    store
        .nas_upsert(&nas(1, Some(&script), None, 2))
        .await
        .expect("nas");
    add_accounts(&store, 10, &[1]).await;
    let port = free_port();
    let config = write_config(&env, port);
    let stderr = env.path().join("nasd.stderr");
    let mut daemon = tokio::process::Command::new(env!("CARGO_BIN_EXE_nasd"));
    daemon
        .arg("--config")
        .arg(&config)
        .arg("run")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr).expect("stderr file"))
        .kill_on_drop(true);
    // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        daemon.as_std_mut().pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: NOFILE,
                rlim_max: NOFILE,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = daemon.spawn().expect("start nasd run");
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    wait_for(LIMIT, "the API to answer", || async {
        request(addr, "GET", "/status", &[], b"").await.is_ok()
    })
    .await;
    let journal = env.log_dir().join("nas_event_daemon.log");
    let text = std::fs::read_to_string(&journal).unwrap_or_default();
    assert!(
        text.contains(&format!("the open files limit (RLIMIT_NOFILE) is {NOFILE}")),
        "the start warning names the limit:\n{text}"
    );

    // Every descriptor the daemon has left goes to an idle API connection.
    let mut held = Vec::new();
    for _ in 0..300 {
        match TcpStream::connect(addr).await {
            Ok(s) => held.push(s),
            Err(e) => panic!("connect {}: {e}", held.len()),
        }
    }
    let ids = store
        .enqueue_compact(&(1..=10).map(|u| event("user_add", u)).collect::<Vec<_>>())
        .await
        .expect("enqueue");
    assert_eq!(ids.len(), 10);
    wait_for(
        LIMIT,
        "an attempt to fail for want of descriptors",
        || async {
            last_errors(&db)
                .await
                .iter()
                .any(|e| e.contains("Too many open files"))
        },
    )
    .await;
    let errors = last_errors(&db).await;
    assert!(
        errors
            .iter()
            .filter(|e| e.contains("Too many open files"))
            .all(|e| e.contains("attempt not counted")),
        "a shortage is no attempt: {errors:?}"
    );
    let (_, failed) = store.history_counts().await.expect("history");
    assert_eq!(failed, 0, "nothing failed while descriptors were short");

    // Descriptors come back: everything is delivered, once, and nothing failed.
    drop(held);
    wait_for(LIMIT, "10 events done", || async {
        store.history_counts().await.expect("history").0 >= 10
    })
    .await;
    let (done, failed) = store.history_counts().await.expect("history");
    assert_eq!((done, failed), (10, 0));
    let mut lines = recorded(&record);
    lines.sort();
    lines.dedup();
    assert_eq!(
        recorded(&record).len(),
        10,
        "each event ran its script once: {:?}",
        recorded(&record)
    );
    assert_eq!(lines.len(), 10);
    let _ = child.start_kill();
    let _ = child.wait().await;
}

// ---------------------------------------------------------------------------------------
// The API's limits

const CAP: usize = 8;

async fn api_daemon(env: &TestEnv) -> (SocketAddr, CancellationToken, nasd::daemon::Running) {
    let mut cfg = env.config();
    cfg.api = Some(ApiConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        header_timeout: Duration::from_secs(1),
        body_timeout: Duration::from_secs(1),
        max_connections: CAP,
        ..ApiConfig::default()
    });
    let token = CancellationToken::new();
    let running = nasd::daemon::start(cfg, token.clone())
        .await
        .expect("start daemon");
    let addr = running.api_addr.expect("api address");
    (addr, token, running)
}

/// Waits until the server closes `stream` (reads EOF or an error), reading whatever it
/// answers meanwhile.
async fn closed_by_server(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(LIMIT, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_and_a_client_still_gets_answers() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let (addr, token, running) = api_daemon(&env).await;
    let mut held: Vec<(&str, TcpStream)> = Vec::new();
    // Three of each kind: 12 connections, more than the cap of 8.
    for _ in 0..3 {
        let silent = TcpStream::connect(addr).await.expect("connect");
        held.push(("silent", silent));

        let mut half_header = TcpStream::connect(addr).await.expect("connect");
        half_header
            .write_all(b"GET /status HTTP/1.1\r\nHost: x\r\n")
            .await
            .expect("write");
        held.push(("half a header", half_header));

        let mut keep_alive = TcpStream::connect(addr).await.expect("connect");
        keep_alive
            .write_all(b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        let mut answer = [0u8; 64];
        let n = keep_alive.read(&mut answer).await.expect("answer");
        assert!(
            answer[..n].starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&answer[..n])
        );
        held.push(("idle keep-alive", keep_alive));

        let mut half_body = TcpStream::connect(addr).await.expect("connect");
        half_body
            .write_all(
                b"POST /api/v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
                  Content-Length: 100\r\n\r\n{\"cmd\":",
            )
            .await
            .expect("write");
        held.push(("half a body", half_body));
    }
    // A normal client is answered while they are all held.
    let status = request(addr, "GET", "/status", &[], b"")
        .await
        .expect("status answered past the cap");
    assert_eq!(status.status, 200, "{}", status.text());
    // And every held connection is closed by the server.
    for (kind, stream) in &mut held {
        assert!(
            closed_by_server(stream).await,
            "a connection with {kind} was not closed"
        );
    }
    // Nothing was half-written by the half body.
    let db = sqlx::SqlitePool::connect(&env.url)
        .await
        .expect("open the database");
    let queued: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM events_stack) + (SELECT count(*) FROM events_stack_compact)",
    )
    .fetch_one(&db)
    .await
    .expect("count");
    assert_eq!(queued, 0, "no event from a body that never arrived");
    token.cancel();
    tokio::time::timeout(LIMIT, running.wait())
        .await
        .expect("daemon stops in time")
        .expect("daemon run");
}
