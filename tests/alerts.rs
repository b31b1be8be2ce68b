//! The per-NAS circuit breaker and the alerts, through the whole daemon: a NAS over SSH
//! to the simulator goes away and comes back; a local HTTP receiver plays the webhook
//! and the Telegram Bot API and records what arrives.

#[macro_use]
mod common;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Backend, TestEnv, add_accounts, event, wait_for};
use nasd::alerts::{RawAlerts, alerts_section};
use nasd::sim::{self, Sim, SimOptions};
use nasd::store::Store;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const TELEGRAM_TOKEN: &str = "4242:tg-token-never-logged";
const HOOK_TOKEN: &str = "hook-token-never-logged";

use common::webhook::Receiver;

fn schemes_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("schemes")
}

async fn start_sim(port: u16, host_key: PathBuf) -> Sim {
    let opts = SimOptions {
        ssh_port: port,
        host_key: Some(host_key),
        ..SimOptions::default()
    };
    // The port was ours a moment ago; a few tries cover a slow release.
    for _ in 0..50 {
        if let Ok(sim) = sim::start(&opts, CancellationToken::new()).await {
            return sim;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the simulator cannot bind port {port} again");
}

fn ssh_nas(id: i64, port: u16) -> nasd::store::Nas {
    nasd::store::Nas {
        scheme: Some("mikrotik-ssh".into()),
        n_workers: 4,
        port: Some(i32::from(port)),
        login: Some("admin".into()),
        password: Some(nasd::store::Secret::new("admin")),
        max_sessions: 2,
        host_key_policy: "accept-new".into(),
        ..nasd::store::Nas::new(id, &format!("Router {id}"), "127.0.0.1")
    }
}

async fn history_of(store: &Store) -> Vec<nasd::store::HistoryRow> {
    store.history(None, 10_000).await.expect("history")
}

async fn nas_down_waits_and_alerts_once(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let store = env.store().await;
    let receiver = Receiver::start().await;
    let host_key = env.path().join("sim_host_key");
    let sim = start_sim(0, host_key.clone()).await;
    let port = sim.ssh_addr.port();
    store.nas_upsert(&ssh_nas(1, port)).await.unwrap();
    add_accounts(&store, 10, &[1]).await;

    let mut cfg = env.config();
    cfg.daemon.schemes_dir = schemes_dir();
    cfg.daemon.transport.known_hosts = env.path().join("known_hosts");
    cfg.daemon.max_attempts = 3;
    // The events queued during the outage are to wait, all of them: no `[coalesce]`
    // run is merged (that would finish some as superseded while the NAS is down).
    cfg.daemon.coalesce = false;
    cfg.daemon.breaker.failures = 3;
    cfg.daemon.breaker.probe_first = Duration::from_millis(100);
    cfg.daemon.breaker.probe_max = Duration::from_millis(300);
    let raw: RawAlerts = toml::from_str(&format!(
        "webhooks = [\"http://{addr}/hook?token={HOOK_TOKEN}\"]\n\
         telegram_api = \"http://{addr}\"\ntelegram_bot_token = \"{TELEGRAM_TOKEN}\"\n\
         telegram_chat_id = -100777\ncheck_interval = \"100ms\"\nqueue_threshold = 5\n\
         queue_for = \"300ms\"\nstall_for = \"2s\"\ntimeout = \"2s\"\n\
         [templates]\nnas_down = \"DOWN {{{{ nas_name }}}}: {{{{ reason }}}}\"\n",
        addr = receiver.addr
    ))
    .unwrap();
    cfg.alerts = Some(alerts_section(raw).unwrap());
    let shutdown = CancellationToken::new();
    let daemon = nasd::daemon::start(cfg, shutdown.clone()).await.unwrap();

    // Up: the first events go through, never more waiting than the queue threshold (5),
    // so however slow the machine, the only queue_high is the one of the outage below.
    for half in [1..=5, 6..=10] {
        let done = *half.end() as usize;
        let first: Vec<_> = half.map(|u| event("user_accept", u)).collect();
        store.enqueue_compact(&first).await.unwrap();
        wait_for(Duration::from_secs(30), &format!("{done} done"), || async {
            history_of(&store).await.len() == done
        })
        .await;
    }

    // Down: the router goes away while events keep coming.
    sim.stop().await;
    let second: Vec<_> = (0..30)
        .map(|i| event(["user_drop", "user_accept"][i % 2], 1 + (i as i64) % 10))
        .collect();
    store.enqueue_compact(&second).await.unwrap();
    wait_for(Duration::from_secs(30), "the nas_down webhook", || async {
        !receiver.hooks("nas_down").is_empty()
    })
    .await;
    wait_for(
        Duration::from_secs(30),
        "queue_high and queue_stalled",
        || async {
            !receiver.hooks("queue_high").is_empty() && !receiver.hooks("queue_stalled").is_empty()
        },
    )
    .await;
    let snap = daemon.stats.get(1).expect("stats of nas 1");
    assert!(snap.down_since.is_some(), "{snap:?}");
    assert!(
        snap.down_reason
            .as_deref()
            .unwrap_or("")
            .contains("cannot connect"),
        "{snap:?}"
    );
    // Held for longer than max_attempts (3) probes would allow: nothing failed.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        history_of(&store).await.iter().all(|h| h.outcome == "done"),
        "an event failed while the NAS was down"
    );

    // Back: the same router (same host key) on the same port.
    let sim = start_sim(port, host_key).await;
    wait_for(Duration::from_secs(60), "40 events done", || async {
        history_of(&store).await.len() == 40
    })
    .await;
    wait_for(
        Duration::from_secs(30),
        "nas_up, queue_ok, queue_moving",
        || async {
            !receiver.hooks("nas_up").is_empty()
                && !receiver.hooks("queue_ok").is_empty()
                && !receiver.hooks("queue_moving").is_empty()
        },
    )
    .await;
    assert!(daemon.stats.get(1).unwrap().down_since.is_none());

    // A permanent failure: one events_failed message for a run of them.
    store
        .enqueue_compact(&[event("no_such_cmd", 1), event("no_such_cmd", 2)])
        .await
        .unwrap();
    wait_for(Duration::from_secs(30), "events_failed", || async {
        !receiver.hooks("events_failed").is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    shutdown.cancel();
    daemon.wait().await.unwrap();
    sim.stop().await;

    let history = history_of(&store).await;
    assert_eq!(history.iter().filter(|h| h.outcome == "done").count(), 40);
    assert_eq!(history.iter().filter(|h| h.outcome == "failed").count(), 2);
    // Attempts that did not reach the router were not counted: every event finished
    // within max_attempts although the router was down for many probe intervals.
    assert!(history.iter().all(|h| h.attempts <= 3), "{history:?}");
    let journal = nasd::journal::Journal::open(&env.log_dir()).unwrap();
    let nas_log = std::fs::read_to_string(journal.nas_log_path(&nasd::journal::NasTarget {
        id: 1,
        name: "Router 1".into(),
        ip: "127.0.0.1".into(),
    }))
    .unwrap();
    let not_counted = nas_log.matches("attempt not counted").count();
    assert!(
        not_counted > 3,
        "expected the unreachable attempts to be held, got {not_counted}:\n{nas_log}"
    );

    // One message per transition, on both channels; the first (503) was retried.
    for kind in [
        "nas_down",
        "nas_up",
        "queue_high",
        "queue_ok",
        "queue_stalled",
        "queue_moving",
        "events_failed",
    ] {
        assert_eq!(
            receiver.hooks(kind).len(),
            1,
            "{kind}: {:?}\nNAS log:\n{nas_log}",
            receiver.got
        );
    }
    let down = &receiver.hooks("nas_down")[0];
    assert_eq!(down["nas_id"], 1);
    assert_eq!(down["nas_name"], "Router 1");
    assert!(
        down["text"]
            .as_str()
            .unwrap()
            .starts_with("DOWN Router 1: "),
        "{down}"
    );
    // The two failures come from one claim but may finish in two completions, so the
    // watcher may see the first alone (failed 1) and the second while the run goes on
    // (no second message); either way the message counts from a clean start.
    let failed = &receiver.hooks("events_failed")[0];
    assert_eq!(failed["failed"], failed["failed_total"], "{failed}");
    assert!(failed["failed"] == 1 || failed["failed"] == 2, "{failed}");
    assert!(
        failed["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("no_such_cmd")),
        "{failed}"
    );
    let telegram = receiver.telegram();
    assert_eq!(telegram.len(), 7, "{telegram:?}");
    assert!(telegram.iter().any(|t| t.starts_with("DOWN Router 1")));
    assert!(telegram.iter().any(|t| t.contains("is UP again")));
    let tg_paths: Vec<String> = receiver
        .got
        .lock()
        .unwrap()
        .iter()
        .filter(|r| r.path.contains("sendMessage"))
        .map(|r| r.path.clone())
        .collect();
    assert!(
        tg_paths
            .iter()
            .all(|p| p == &format!("/bot{TELEGRAM_TOKEN}/sendMessage"))
    );
    assert!(receiver.got.lock().unwrap().iter().any(|r| r.status == 503));

    // The daemon log tells the story without the tokens.
    let daemon_log = std::fs::read_to_string(journal.daemon_log_path()).unwrap();
    assert!(daemon_log.contains("NAS down nasid=1"), "{daemon_log}");
    assert!(daemon_log.contains("NAS up nasid=1"), "{daemon_log}");
    assert!(daemon_log.contains("answered HTTP 503"), "{daemon_log}");
    for secret in [TELEGRAM_TOKEN, HOOK_TOKEN] {
        assert!(!daemon_log.contains(secret), "{secret} in the daemon log");
    }
}

/// With the breaker off, unreachable attempts count: the events fail after max_attempts.
async fn breaker_off_burns_attempts(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let store = env.store().await;
    // A port nothing listens on.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    store.nas_upsert(&ssh_nas(1, port)).await.unwrap();
    add_accounts(&store, 2, &[1]).await;
    let mut cfg = env.config();
    cfg.daemon.schemes_dir = schemes_dir();
    cfg.daemon.transport.known_hosts = env.path().join("known_hosts");
    cfg.daemon.max_attempts = 2;
    cfg.daemon.breaker.failures = 0;
    let shutdown = CancellationToken::new();
    let daemon = nasd::daemon::start(cfg, shutdown.clone()).await.unwrap();
    store
        .enqueue_compact(&[event("user_accept", 1), event("user_accept", 2)])
        .await
        .unwrap();
    wait_for(Duration::from_secs(30), "2 failed", || async {
        history_of(&store).await.len() == 2
    })
    .await;
    shutdown.cancel();
    daemon.wait().await.unwrap();
    for h in history_of(&store).await {
        assert_eq!(h.outcome, "failed");
        assert_eq!(h.attempts, 2);
        let error = h.error.unwrap_or_default();
        assert!(error.contains("gave up after 2 attempts"), "{error}");
        assert!(error.contains("cannot connect"), "{error}");
    }
}

both_backends!(nas_down_waits_and_alerts_once, breaker_off_burns_attempts);

/// Alerts over https: a receiver with a certificate from `alerts.ca_file` is trusted; the
/// same receiver without it is refused with a TLS error.
#[tokio::test]
async fn https_destinations_check_the_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let generated = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, generated.cert.pem()).unwrap();
    let cert = rustls::pki_types::CertificateDer::from(generated.cert.der().to_vec());
    let key =
        rustls::pki_types::PrivateKeyDer::try_from(generated.signing_key.serialize_der()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let bodies: Arc<Mutex<Vec<String>>> = Arc::default();
    let log = bodies.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let log = log.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut buf = vec![0u8; 4096];
                let mut got = Vec::new();
                while !String::from_utf8_lossy(&got).contains("\"hello\"") {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                log.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&got).to_string());
                let _ = tls
                    .write_all(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
                    .await;
                let _ = tls.shutdown().await;
            });
        }
    });
    let url = format!("https://localhost:{port}/hook");
    let body = "{\"text\":\"hello\"}";
    let trusted = nasd::alerts::tls_config(Some(&ca)).unwrap();
    let status = nasd::alerts::post_json(&url, body, Duration::from_secs(10), Some(&trusted))
        .await
        .unwrap();
    assert_eq!(status, 204);
    assert!(bodies.lock().unwrap()[0].starts_with("POST /hook HTTP/1.1\r\n"));
    // The system store alone does not know this self-signed certificate.
    if let Ok(system) = nasd::alerts::tls_config(None) {
        let e = nasd::alerts::post_json(&url, body, Duration::from_secs(10), Some(&system))
            .await
            .unwrap_err();
        assert!(e.contains("TLS with localhost"), "{e}");
        assert!(e.to_lowercase().contains("certificate"), "{e}");
    }
    assert_eq!(bodies.lock().unwrap().len(), 1);
    // A bad CA file is named.
    let bad = dir.path().join("bad.pem");
    std::fs::write(&bad, "not a certificate").unwrap();
    let e = nasd::alerts::tls_config(Some(&bad)).unwrap_err();
    assert!(e.contains("bad.pem"), "{e}");
}
