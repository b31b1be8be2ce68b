//! The console's JSON API over real HTTP against the daemon started in-process, on
//! SQLite and a real PostgreSQL: sessions, roles, CSRF and cross-site refusal; pause and
//! resume seen by the device; probe and send against the simulator's SSH server; bulk
//! retry and cancel by filter ending in the rows' final states; account search; the
//! audit log; the live stream. (The page itself is driven in tests/console_ui.rs.)

#[macro_use]
mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use common::{Backend, TestEnv, add_accounts, event, nas, wait_for};
use nasd::config::{ApiConfig, ApiToken, Role};
use nasd::sim::{self, SimOptions};
use nasd::store::{Secret, Store};
use nasd::tools::http_client::{HttpResponse, request};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

both_backends!(
    sessions_roles_csrf_and_cross_site,
    pause_probe_and_send_reach_the_simulator,
    bulk_retry_and_cancel_by_filter,
    account_search_timeline_and_live_stream,
);

const ADMIN: &str = "console-admin-token-0f3a9c";
const HELPDESK: &str = "console-helpdesk-token-77b1e2";

struct Daemon {
    addr: SocketAddr,
    token: CancellationToken,
    running: nasd::daemon::Running,
}

impl Daemon {
    async fn stop(self) {
        self.token.cancel();
        tokio::time::timeout(Duration::from_secs(20), self.running.wait())
            .await
            .expect("daemon stops in time")
            .expect("daemon run");
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &Value,
    ) -> HttpResponse {
        let bytes = if body.is_null() {
            Vec::new()
        } else {
            body.to_string().into_bytes()
        };
        let mut h: Vec<(&str, &str)> = headers.to_vec();
        if !bytes.is_empty() {
            h.push(("Content-Type", "application/json"));
        }
        request(self.addr, method, path, &h, &bytes)
            .await
            .expect("http")
    }

    /// With the admin's bearer token.
    async fn get(&self, path: &str) -> Value {
        let r = self
            .call(
                "GET",
                path,
                &[("Authorization", &format!("Bearer {ADMIN}"))],
                &Value::Null,
            )
            .await;
        assert_eq!(
            r.status,
            200,
            "GET {path}: {}",
            String::from_utf8_lossy(&r.body)
        );
        r.json()
    }

    async fn post(&self, path: &str, body: &Value) -> HttpResponse {
        self.call(
            "POST",
            path,
            &[("Authorization", &format!("Bearer {ADMIN}"))],
            body,
        )
        .await
    }

    /// Logs in with `token`: (cookie header value, csrf).
    async fn login(&self, token: &str) -> (String, String) {
        let r = self
            .call("POST", "/ui/login", &[], &json!({ "token": token }))
            .await;
        assert_eq!(r.status, 200, "login: {}", String::from_utf8_lossy(&r.body));
        let set = r
            .header("set-cookie")
            .expect("a session cookie")
            .to_string();
        assert!(set.contains("HttpOnly"), "{set}");
        assert!(set.contains("SameSite=Strict"), "{set}");
        let cookie = set.split(';').next().unwrap().to_string();
        let csrf = r.json()["csrf"].as_str().expect("csrf").to_string();
        (cookie, csrf)
    }
}

fn api_config() -> ApiConfig {
    ApiConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        tokens: vec![
            ApiToken {
                name: "noc".into(),
                role: Role::Admin,
                secret: Secret::new(ADMIN),
            },
            ApiToken {
                name: "helpdesk".into(),
                role: Role::ReadOnly,
                secret: Secret::new(HELPDESK),
            },
        ]
        .into(),
        ..ApiConfig::default()
    }
}

async fn start(env: &TestEnv, tune: impl FnOnce(&mut nasd::config::Config)) -> Daemon {
    let mut cfg = env.config();
    cfg.api = Some(api_config());
    tune(&mut cfg);
    let token = CancellationToken::new();
    let running = nasd::daemon::start(cfg, token.clone())
        .await
        .expect("daemon starts");
    let addr = running.api_addr.expect("api listens");
    Daemon {
        addr,
        token,
        running,
    }
}

async fn paused(store: &Store, id: i64) -> bool {
    store.nas_get(id).await.unwrap().unwrap().paused
}

async fn sessions_roles_csrf_and_cross_site(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let store = env.store().await;
    store
        .nas_upsert(&nas(
            1,
            Some(&env.script("ok.sh", "#!/bin/sh\necho ok\n")),
            None,
            2,
        ))
        .await
        .unwrap();
    let d = start(&env, |_| {}).await;
    let host = d.addr.to_string();
    let own_origin = format!("http://{host}");

    // The page itself needs no credentials; its data does.
    let page = d.call("GET", "/ui", &[], &Value::Null).await;
    assert_eq!(page.status, 200);
    assert!(
        page.header("content-type")
            .unwrap()
            .starts_with("text/html")
    );
    let none = d.call("GET", "/api/v1/overview", &[], &Value::Null).await;
    assert_eq!(none.status, 401, "no cookie, no token: refused");
    let bad = d
        .call(
            "POST",
            "/ui/login",
            &[],
            &json!({"token": "wrong-token-wrong-token"}),
        )
        .await;
    assert_eq!(bad.status, 401);
    assert_eq!(bad.json()["error"], "invalid token");

    // A read-only session sees, and cannot act.
    let (ro_cookie, ro_csrf) = d.login(HELPDESK).await;
    let who = d
        .call(
            "GET",
            "/api/v1/whoami",
            &[("Cookie", &ro_cookie)],
            &Value::Null,
        )
        .await;
    assert_eq!(who.json()["role"], "read-only");
    assert_eq!(who.json()["name"], "helpdesk");
    let seen = d
        .call(
            "GET",
            "/api/v1/overview",
            &[("Cookie", &ro_cookie)],
            &Value::Null,
        )
        .await;
    assert_eq!(seen.status, 200);
    let refused = d
        .call(
            "POST",
            "/api/v1/nas/1/pause",
            &[
                ("Cookie", &ro_cookie),
                ("X-Nasd-Csrf", &ro_csrf),
                ("Origin", &own_origin),
            ],
            &Value::Null,
        )
        .await;
    assert_eq!(refused.status, 403);
    let why = refused.json()["error"].as_str().unwrap().to_string();
    assert!(why.contains("`helpdesk` is read-only"), "{why}");
    // The same with its bearer token.
    let refused = d
        .call(
            "POST",
            "/api/v1/nas/1/pause",
            &[("Authorization", &format!("Bearer {HELPDESK}"))],
            &Value::Null,
        )
        .await;
    assert_eq!(refused.status, 403);
    assert!(!paused(&store, 1).await, "nothing changed");

    // An admin session: the cookie alone (what a cross-site form would carry) is
    // refused, so is a forged Origin; the page's own request goes through.
    let (cookie, csrf) = d.login(ADMIN).await;
    let no_csrf = d
        .call(
            "POST",
            "/api/v1/nas/1/pause",
            &[("Cookie", &cookie), ("Origin", &own_origin)],
            &Value::Null,
        )
        .await;
    assert_eq!(no_csrf.status, 403);
    assert!(
        no_csrf.json()["error"]
            .as_str()
            .unwrap()
            .contains("X-Nasd-Csrf")
    );
    let forged = d
        .call(
            "POST",
            "/api/v1/nas/1/pause",
            &[
                ("Cookie", &cookie),
                ("X-Nasd-Csrf", &csrf),
                ("Origin", "http://evil.example"),
            ],
            &Value::Null,
        )
        .await;
    assert_eq!(forged.status, 403);
    assert!(
        forged.json()["error"]
            .as_str()
            .unwrap()
            .contains("evil.example")
    );
    let forged_bearer = d
        .call(
            "POST",
            "/api/v1/nas/1/pause",
            &[
                ("Authorization", &format!("Bearer {ADMIN}")),
                ("Origin", "http://evil.example"),
            ],
            &Value::Null,
        )
        .await;
    assert_eq!(
        forged_bearer.status, 403,
        "a foreign origin is refused whatever the credentials"
    );
    assert!(!paused(&store, 1).await, "nothing changed");
    let ok = d
        .call(
            "POST",
            "/api/v1/nas/1/pause",
            &[
                ("Cookie", &cookie),
                ("X-Nasd-Csrf", &csrf),
                ("Origin", &own_origin),
            ],
            &Value::Null,
        )
        .await;
    assert_eq!(ok.status, 200, "{}", String::from_utf8_lossy(&ok.body));
    assert!(paused(&store, 1).await);

    // Logged out, the cookie is worth nothing.
    let out = d
        .call(
            "POST",
            "/ui/logout",
            &[("Cookie", &cookie), ("Origin", &own_origin)],
            &Value::Null,
        )
        .await;
    assert_eq!(out.status, 204);
    let after = d
        .call(
            "GET",
            "/api/v1/overview",
            &[("Cookie", &cookie)],
            &Value::Null,
        )
        .await;
    assert_eq!(after.status, 401);

    // The audit log names who did what.
    let audit = d.get("/api/v1/audit").await;
    let entries = audit["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 1, "one action went through: {audit}");
    assert_eq!(entries[0]["who"], "noc");
    assert_eq!(entries[0]["action"], "pause");
    assert!(entries[0]["target"].as_str().unwrap().starts_with("nas 1"));
    let daemon_log = env.log_dir().join("nas_event_daemon.log");
    wait_for(
        Duration::from_secs(10),
        "the audit line in the daemon log",
        || async {
            std::fs::read_to_string(&daemon_log)
                .unwrap_or_default()
                .contains("Audit: noc pause nas 1")
        },
    )
    .await;
    d.stop().await;
}

fn schemes_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("schemes")
}

async fn pause_probe_and_send_reach_the_simulator(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let store = env.store().await;
    let sim = sim::start(&SimOptions::default(), CancellationToken::new())
        .await
        .expect("simulator");
    let router = nasd::store::Nas {
        scheme: Some("mikrotik-ssh".into()),
        n_workers: 2,
        port: Some(i32::from(sim.ssh_addr.port())),
        login: Some("admin".into()),
        password: Some(Secret::new("admin")),
        max_sessions: 2,
        host_key_policy: "accept-new".into(),
        ..nasd::store::Nas::new(1, "Router 1", "127.0.0.1")
    };
    store.nas_upsert(&router).await.unwrap();
    add_accounts(&store, 5, &[1]).await;
    let d = start(&env, |cfg| {
        cfg.daemon.schemes_dir = schemes_dir();
        cfg.daemon.transport.known_hosts = env.path().join("known_hosts");
        // Only the console's resync request applies a pause quickly.
        cfg.daemon.resync_interval = Duration::from_secs(3600);
    })
    .await;
    let in_list = |user: i64| {
        let ip = format!("10.88.0.{}", user + 1);
        sim.device
            .state()
            .address_list
            .iter()
            .any(|e| e.address == ip)
    };

    // Paused: the event waits in the stack and nothing reaches the device.
    let daemon_log = env.log_dir().join("nas_event_daemon.log");
    wait_for(Duration::from_secs(10), "the owner started", || async {
        std::fs::read_to_string(&daemon_log)
            .unwrap_or_default()
            .contains("Start work with nas nasid=1")
    })
    .await;
    let r = d.post("/api/v1/nas/1/pause", &Value::Null).await;
    assert_eq!(r.status, 200);
    wait_for(
        Duration::from_secs(10),
        "the owner stopped for the pause",
        || async {
            std::fs::read_to_string(&daemon_log)
                .unwrap_or_default()
                .contains("paused by an operator")
        },
    )
    .await;
    let ov = d.get("/api/v1/overview").await;
    assert_eq!(ov["nas"][0]["state"], "paused", "{ov}");
    store
        .enqueue_compact(&[event("user_add", 1)])
        .await
        .unwrap();
    wait_for(Duration::from_secs(10), "the event expanded", || async {
        store.stack_count().await.unwrap().stack_total == 1
    })
    .await;
    let queued = d.get("/api/v1/events?state=queued&nas=1").await;
    assert_eq!(queued["events"].as_array().unwrap().len(), 1, "{queued}");
    assert!(!in_list(1));

    // Resumed: it is delivered.
    let r = d.post("/api/v1/nas/1/resume", &Value::Null).await;
    assert_eq!(r.status, 200);
    wait_for(
        Duration::from_secs(20),
        "user 1 in the address list",
        || async { in_list(1) },
    )
    .await;

    // Probe: a fresh login, timed.
    let probe = d.post("/api/v1/nas/1/probe", &Value::Null).await.json();
    assert_eq!(probe["ok"], true, "{probe}");
    assert!(probe["ms"].as_u64().is_some());

    // A dry run renders and sends nothing; a real send reaches the device.
    let dry = d
        .post(
            "/api/v1/nas/1/send",
            &json!({"cmd": "user_add", "user_id": 2, "dry_run": true}),
        )
        .await;
    assert_eq!(dry.status, 200, "{}", String::from_utf8_lossy(&dry.body));
    let dry = dry.json();
    assert_eq!(dry["outcome"], "dry_run");
    let first = dry["commands"][0]["command"].as_str().unwrap().to_string();
    assert!(first.contains("10.88.0.3"), "{dry}");
    assert!(!in_list(2));
    let real = d
        .post(
            "/api/v1/nas/1/send",
            &json!({"cmd": "user_add", "user_id": 2}),
        )
        .await
        .json();
    assert_eq!(real["outcome"], "done", "{real}");
    assert_eq!(real["commands"][0]["command"], first.as_str());
    assert!(in_list(2));
    // Bad input names the problem.
    let bad = d
        .post(
            "/api/v1/nas/1/send",
            &json!({"cmd": "user_add", "user_id": 999}),
        )
        .await;
    assert_eq!(bad.status, 422);
    assert!(
        bad.json()["error"]
            .as_str()
            .unwrap()
            .contains("user_id=999")
    );
    let missing = d.post("/api/v1/nas/77/probe", &Value::Null).await;
    assert_eq!(missing.status, 404);

    // The journal writes on its own thread: the line arrives shortly after the answer.
    wait_for(
        Duration::from_secs(10),
        "the manual send in the NAS log",
        || async {
            let nas_log = d.get("/api/v1/nas/1/log?lines=50").await;
            let lines: Vec<String> = serde_json::from_value(nas_log["lines"].clone()).unwrap();
            lines.iter().any(|l| l.contains("manual send by noc"))
        },
    )
    .await;
    let detail = d.get("/api/v1/nas/1").await;
    assert_eq!(detail["settings"]["password"], "••••");
    assert!(
        !serde_json::to_string(&detail)
            .unwrap()
            .contains("\"password\":\"admin\"")
    );

    let audit = d.get("/api/v1/audit").await;
    let actions: Vec<&str> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        vec!["send", "send (dry run)", "probe", "resume", "pause"]
    );
    d.stop().await;
    sim.stop().await;
}

async fn bulk_retry_and_cancel_by_filter(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let store = env.store().await;
    // NAS 1 refuses everything until the flag file exists; NAS 2 is paused.
    let flag = env.path().join("fixed");
    let script = env.script(
        "flaky.sh",
        &format!(
            "#!/bin/sh\nif [ -e {} ]; then echo ok; exit 0; fi\necho 'no such user: refused'\nexit 1\n",
            flag.display()
        ),
    );
    store
        .nas_upsert(&nas(1, Some(&script), None, 2))
        .await
        .unwrap();
    let mut two = nas(2, Some(&script), None, 2);
    two.paused = true;
    store.nas_upsert(&two).await.unwrap();
    add_accounts(&store, 20, &[1, 2]).await;
    let d = start(&env, |cfg| cfg.daemon.max_attempts = 1).await;

    let odd: Vec<_> = (1..=20)
        .filter(|u| u % 2 == 1)
        .map(|u| event("user_add", u))
        .collect();
    store.enqueue_compact(&odd).await.unwrap();
    common::wait_history(&store, 10, Duration::from_secs(20)).await;
    let failed = d
        .get("/api/v1/events?state=failed&nas=1&error=EXIT%201")
        .await;
    assert_eq!(failed["events"].as_array().unwrap().len(), 10, "{failed}");

    // Retry by filter: the count first, then the confirmed count.
    let filter = json!({"state": "failed", "nas": 1, "error": "exit 1", "since": "1h"});
    let dry = d
        .post(
            "/api/v1/events/retry",
            &json!({"filter": filter, "dry_run": true}),
        )
        .await
        .json();
    assert_eq!(dry["matched"], 10);
    let stale = d
        .post(
            "/api/v1/events/retry",
            &json!({"filter": filter, "expect": 9}),
        )
        .await;
    assert_eq!(stale.status, 409, "a count that changed is not acted on");
    assert_eq!(stale.json()["matched"], 10);
    std::fs::write(&flag, "").unwrap();
    let done = d
        .post(
            "/api/v1/events/retry",
            &json!({"filter": filter, "expect": 10}),
        )
        .await;
    assert_eq!(done.status, 200, "{}", String::from_utf8_lossy(&done.body));
    assert_eq!(done.json()["done"], 10);
    wait_for(
        Duration::from_secs(20),
        "the retried events done",
        || async { store.history_counts().await.unwrap().0 == 10 },
    )
    .await;

    // Cancel by filter the queued events of the paused NAS.
    let even: Vec<_> = (1..=20)
        .filter(|u| u % 2 == 0)
        .map(|u| event("user_drop", u))
        .collect();
    store.enqueue_compact(&even).await.unwrap();
    wait_for(Duration::from_secs(10), "expanded", || async {
        store.stack_count().await.unwrap().stack_total == 10
    })
    .await;
    let filter = json!({"state": "queued", "nas": 2});
    let dry = d
        .post(
            "/api/v1/events/cancel",
            &json!({"filter": filter, "dry_run": true}),
        )
        .await
        .json();
    assert_eq!(dry["matched"], 10);
    let cancelled = d
        .post(
            "/api/v1/events/cancel",
            &json!({"filter": filter, "expect": 10}),
        )
        .await
        .json();
    assert_eq!(cancelled["done"], 10, "{cancelled}");
    assert_eq!(store.stack_count().await.unwrap().stack_total, 0);
    let gone = d
        .get("/api/v1/events?state=failed&nas=2&error=cancelled")
        .await;
    assert_eq!(gone["events"].as_array().unwrap().len(), 10, "{gone}");

    // Bad filters name the field.
    let bad = d
        .post(
            "/api/v1/events/cancel",
            &json!({"filter": {"state": "lost"}}),
        )
        .await;
    assert_eq!(bad.status, 400);
    assert!(bad.json()["error"].as_str().unwrap().contains("`lost`"));
    let both = d
        .post("/api/v1/events/cancel", &json!({"ids": [1], "filter": {}}))
        .await;
    assert_eq!(both.status, 400);
    let audit = d.get("/api/v1/audit").await;
    let counts: Vec<(String, i64)> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap().to_string(),
                e["count"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        counts,
        vec![("cancel".to_string(), 10), ("retry".to_string(), 10)]
    );
    d.stop().await;
}

async fn account_search_timeline_and_live_stream(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let store = env.store().await;
    let script = env.script("ok.sh", "#!/bin/sh\necho ok\n");
    store
        .nas_upsert(&nas(1, Some(&script), None, 2))
        .await
        .unwrap();
    add_accounts(&store, 30, &[1]).await;
    let d = start(&env, |_| {}).await;
    store
        .enqueue_compact(&[event("user_add", 7), event("user_drop", 7)])
        .await
        .unwrap();
    common::wait_history(&store, 2, Duration::from_secs(20)).await;

    for q in ["7", "user7", "10.88.0.8"] {
        let found = d.get(&format!("/api/v1/accounts?q={q}")).await;
        let ids: Vec<i64> = found["accounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["user_id"].as_i64().unwrap())
            .collect();
        assert!(ids.contains(&7), "{q}: {found}");
    }
    let none = d
        .call(
            "GET",
            "/api/v1/accounts?q=",
            &[("Authorization", &format!("Bearer {ADMIN}"))],
            &Value::Null,
        )
        .await;
    assert_eq!(none.status, 400);
    let timeline = d.get("/api/v1/accounts/7/events").await;
    let cmds: Vec<&str> = timeline["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["cmd"].as_str().unwrap())
        .collect();
    assert_eq!(cmds, vec!["user_drop", "user_add"], "{timeline}");

    // The live stream sends the overview at once.
    let mut s = tokio::net::TcpStream::connect(d.addr).await.unwrap();
    s.write_all(
        format!(
            "GET /api/v1/live HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {ADMIN}\r\n\r\n",
            d.addr
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(Duration::from_secs(10), async {
        while !String::from_utf8_lossy(&got).contains("\"nas\":[") {
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0, "stream closed: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("an overview event within 10 s");
    let text = String::from_utf8_lossy(&got);
    assert!(text.contains("text/event-stream"), "{text}");
    assert!(text.contains("event: overview"), "{text}");
    // The daemon stops with a stream open.
    d.stop().await;
}
