//! The HTTP API over real HTTP against the daemon started in-process on 127.0.0.1:0,
//! on SQLite and a real PostgreSQL: the billing-compatible endpoint (with the exact curl
//! line of the domain docs, run by the real curl), the JSON API, auth, bad input that
//! writes nothing, /status, /metrics, `nasd enqueue --from-file`, and a schemathesis
//! run against the OpenAPI document.

#[macro_use]
mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use common::{Backend, TestEnv, add_accounts, nas, wait_for};
use nasd::config::ApiConfig;
use nasd::store::{Secret, Store};
use nasd::tools::http_client::{HttpResponse, request};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

both_backends!(
    billing_curl_line_enqueues_and_the_event_is_delivered,
    billing_filter_and_get_on_both_models,
    json_api_follows_an_event_from_enqueue_to_history,
    missing_token_and_bad_input_write_nothing,
    status_names_an_unreachable_nas_and_an_old_event,
    metrics_expose_counters_latency_and_queues,
    enqueue_from_file_skips_bad_lines_with_their_number,
    schemathesis_finds_no_server_error,
);

const TOKEN: &str = "test-token-5f1c0a9e7b3d4c21";
const BEARER: &str = "Bearer test-token-5f1c0a9e7b3d4c21";

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

    async fn get(&self, path: &str) -> HttpResponse {
        request(self.addr, "GET", path, &[("Authorization", BEARER)], b"")
            .await
            .expect("http")
    }

    async fn post_json(&self, path: &str, body: &Value) -> HttpResponse {
        request(
            self.addr,
            "POST",
            path,
            &[
                ("Authorization", BEARER),
                ("Content-Type", "application/json"),
            ],
            body.to_string().as_bytes(),
        )
        .await
        .expect("http")
    }

    async fn post(&self, path: &str) -> HttpResponse {
        request(self.addr, "POST", path, &[("Authorization", BEARER)], b"")
            .await
            .expect("http")
    }

    async fn form(&self, model: &str, body: &str) -> HttpResponse {
        request(
            self.addr,
            "POST",
            &format!("/rest_api/v2/{model}/"),
            &[
                ("Authorization", BEARER),
                ("Content-Type", "application/x-www-form-urlencoded"),
            ],
            body.as_bytes(),
        )
        .await
        .expect("http")
    }
}

fn api_config() -> ApiConfig {
    ApiConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        tokens: vec![nasd::config::ApiToken {
            name: "test".into(),
            role: nasd::config::Role::Admin,
            secret: Secret::new(TOKEN),
        }]
        .into(),
        ..ApiConfig::default()
    }
}

async fn start_with(
    env: &TestEnv,
    api: ApiConfig,
    tune: impl FnOnce(&mut nasd::config::Config),
) -> Daemon {
    let mut cfg = env.config();
    cfg.api = Some(api);
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

/// Rows in the three event tables.
async fn table_counts(store: &Store) -> (i64, i64, i64) {
    let c = store.stack_count().await.unwrap();
    let (done, failed) = store.history_counts().await.unwrap();
    (c.compact_total, c.stack_total, done + failed)
}

async fn wait_state(d: &Daemon, id: i64, state: &str) -> Value {
    let mut last = Value::Null;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::time::Instant::now() < deadline {
        last = d.get(&format!("/api/v1/events/{id}")).await.json();
        if last["state"] == state {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("event {id} never reached {state}: {last}");
}

/// Runs a shell line (the curl of the docs) and returns its stdout.
async fn sh(line: String) -> String {
    tokio::task::spawn_blocking(move || {
        let out = Command::new("sh")
            .arg("-c")
            .arg(&line)
            .output()
            .expect("sh");
        assert!(out.status.success(), "{line}: {:?}", out);
        String::from_utf8_lossy(&out.stdout).into_owned()
    })
    .await
    .unwrap()
}

/// The curl line of domain.md ("Mass operations"), with HOST:8082 replaced.
fn docs_curl_line(addr: SocketAddr) -> String {
    let docs = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/docs/domain.md"),
    )
    .ok();
    let line = docs
        .as_deref()
        .and_then(|d| {
            d.lines()
                .find(|l| l.contains("curl -XPOST") && l.contains("EventsStackCompact"))
                .map(|l| l.trim().trim_matches('`').trim_end_matches("`.").to_string())
        })
        .unwrap_or_else(|| {
            "curl -XPOST 'http://HOST:8082/rest_api/v2/EventsStackCompact/' -d 'method1=objects.create&arg1={\"user_id\": 42,\"cmd\":\"user_redirect_cancel\"}'".to_string()
        });
    assert!(line.starts_with("curl -XPOST 'http://HOST:8082/"), "{line}");
    line.replace("HOST:8082", &addr.to_string())
}

fn is_billing_date(v: &Value) -> bool {
    let s = v.as_str().unwrap_or("");
    chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S").is_ok()
}

async fn billing_curl_line_enqueues_and_the_event_is_delivered(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let store = env.store().await;
    let received = env.path().join("received.log");
    let script = env.script(
        "session.sh",
        &format!(
            "#!/bin/sh\necho \"$1 $user_id\" >> {}\necho ok\n",
            received.display()
        ),
    );
    store
        .nas_upsert(&nas(1, Some(&script), None, 2))
        .await
        .unwrap();
    add_accounts(&store, 42, &[1]).await;
    // Tokens are configured, and the billing endpoint is left open for old scripts.
    let d = start_with(
        &env,
        ApiConfig {
            open_rest_compat: true,
            ..api_config()
        },
        |_| {},
    )
    .await;
    let line = docs_curl_line(d.addr);
    let answer: Value = serde_json::from_str(&sh(line).await).expect("json answer");
    assert_eq!(answer["call"], "/rest_api/v2/EventsStackCompact/");
    let result = &answer["result"];
    assert_eq!(result["model"], "EventsStackCompact");
    assert_eq!(result["fields"]["user_id"], 42);
    assert_eq!(result["fields"]["cmd"], "user_redirect_cancel");
    assert!(is_billing_date(&result["fields"]["created_at"]), "{answer}");
    let id = result["pk"].as_i64().expect("pk");
    // The event reaches the device and history under that id.
    let st = wait_state(&d, id, "done").await;
    assert_eq!(st["cmd"], "user_redirect_cancel");
    assert_eq!(st["nas_id"], 1);
    assert_eq!(st["answer"], "ok");
    let history = store.history(Some(42), 10).await.unwrap();
    assert_eq!(history.len(), 1);
    assert_eq!(history[0].compact_id, Some(id));
    assert_eq!(history[0].outcome, "done");
    assert_eq!(env.read("received.log"), "user_redirect_cancel 42\n");
    d.stop().await;

    // Without open_rest_compat the same line is refused and writes nothing; with the
    // token it works.
    let d = start_with(&env, api_config(), |_| {}).await;
    let before = table_counts(&store).await;
    let line = docs_curl_line(d.addr);
    let out = sh(format!("{line} -w '\\n%{{http_code}}'")).await;
    let (body, code) = out.rsplit_once('\n').unwrap();
    assert_eq!(code, "401");
    let answer: Value = serde_json::from_str(body).unwrap();
    assert_eq!(answer["call"], "/rest_api/v2/EventsStackCompact/");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .starts_with("missing bearer token")
    );
    let code = sh(format!("{line} -o /dev/null -w '%{{http_code}}'")).await;
    assert_eq!(code, "401");
    assert_eq!(table_counts(&store).await, before, "nothing written");
    let answer: Value =
        serde_json::from_str(&sh(format!("{line} -H 'Authorization: {BEARER}'")).await).unwrap();
    assert_eq!(answer["result"]["fields"]["user_id"], 42);
    d.stop().await;
}

async fn billing_filter_and_get_on_both_models(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let store = env.store().await;
    let script = env.script("ok.sh", "#!/bin/sh\necho ok\n");
    let mut n1 = nas(1, Some(&script), None, 2);
    n1.enabled = false; // events wait in events_stack
    store.nas_upsert(&n1).await.unwrap();
    add_accounts(&store, 3, &[1]).await;
    let d = start_with(&env, api_config(), |_| {}).await;
    let mut ids = Vec::new();
    for (user, cmd) in [(1, "user_add"), (2, "user_add"), (1, "user_drop")] {
        let r = d
            .form(
                "EventsStackCompact",
                &format!(
                    "method1=objects.create&arg1={{\"user_id\": \"{user}\", \"cmd\": \"{cmd}\"}}"
                ),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        ids.push(r.json()["result"]["pk"].as_i64().unwrap());
    }
    wait_for(Duration::from_secs(20), "expansion", || async {
        let c = store.stack_count().await.unwrap();
        c.compact_total == 0 && c.stack_total == 3
    })
    .await;
    // filter on EventsStack, chained with order_by and count.
    let r = d
        .form(
            "EventsStack",
            "method1=objects.filter&arg1={\"user_id\": 1}&method2=order_by&arg2=\"-id\"",
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let list = r.json()["result"].as_array().unwrap().clone();
    assert_eq!(list.len(), 2);
    assert_eq!(list[0]["model"], "EventsStack");
    assert_eq!(list[0]["fields"]["cmd"], "user_drop");
    assert_eq!(list[0]["fields"]["compact_id"], ids[2]);
    assert_eq!(list[1]["fields"]["compact_id"], ids[0]);
    assert_eq!(list[0]["fields"]["state"], "ready");
    assert_eq!(list[0]["fields"]["params"]["login"], "user1");
    assert!(is_billing_date(&list[0]["fields"]["event_date"]));
    let r = d
        .form(
            "EventsStack",
            "method1=objects.filter&arg1={\"cmd\": \"user_add\"}&method2=count",
        )
        .await;
    assert_eq!(
        r.json(),
        json!({"call": "/rest_api/v2/EventsStack/", "result": 2})
    );
    let pk = list[1]["pk"].as_i64().unwrap();
    let r = d
        .form(
            "EventsStack",
            &format!("method1=objects.get&arg1={{\"pk\": {pk}}}"),
        )
        .await;
    assert_eq!(r.json()["result"]["fields"]["user_id"], 1);
    let r = d
        .form("EventsStack", "method1=objects.get&arg1={\"pk\": 999999}")
        .await;
    assert_eq!(r.status, 404);
    assert_eq!(
        r.json(),
        json!({"call": "/rest_api/v2/EventsStack/", "error": "EventsStack matching query does not exist"})
    );
    let r = d
        .form(
            "EventsStack",
            "method1=objects.get&arg1={\"cmd\": \"user_add\"}",
        )
        .await;
    assert_eq!(r.status, 400);
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("more than one")
    );
    // The compact stack is empty now: filter answers an empty list.
    let r = d
        .form(
            "EventsStackCompact",
            "method1=objects.filter&arg1={\"user_id\": 1}",
        )
        .await;
    assert_eq!(r.json()["result"], json!([]));
    // Mistakes are named and write nothing.
    let before = table_counts(&store).await;
    for (model, body, status, needle) in [
        (
            "EventsStack",
            "method1=objects.create&arg1={\"user_id\": 1, \"cmd\": \"user_add\"}",
            400,
            "read-only",
        ),
        (
            "EventsStackCompact",
            "method1=objects.create&arg1={\"user_id\": 1, \"cmd\": \"user_add\"}&method2=delete",
            400,
            "`delete` is not supported",
        ),
        (
            "EventsStackCompact",
            "method1=objects.create&arg1={\"user_id\": 1, \"cmd\": \"User Add\"}",
            400,
            "cmd `User Add`",
        ),
        (
            "EventsStackCompact",
            "method1=objects.create&arg1={\"user_id\": -3, \"cmd\": \"user_add\"}",
            400,
            "user_id must be a positive integer",
        ),
        (
            "EventsStackCompact",
            "method1=objects.create&arg1={\"user_id\": 1, \"cmd\": \"user_add\", \"tarif\": 5}",
            400,
            "unknown field `tarif`",
        ),
        (
            "EventsStackCompact",
            "method1=objects.create&arg1={\"user_id\": 1,",
            400,
            "arg1: invalid JSON",
        ),
        (
            "EventsStackCompact",
            "method1=objects.frobnicate",
            400,
            "`frobnicate` is not supported",
        ),
        (
            "Abonents",
            "method1=objects.filter&arg1={}",
            404,
            "model `Abonents`",
        ),
    ] {
        let r = d.form(model, body).await;
        assert_eq!(r.status, status, "{body}: {}", r.text());
        let v = r.json();
        assert_eq!(v["call"], format!("/rest_api/v2/{model}/"));
        assert!(v["error"].as_str().unwrap().contains(needle), "{body}: {v}");
    }
    let r = request(
        d.addr,
        "POST",
        "/rest_api/v2/EventsStackCompact/",
        &[
            ("Authorization", BEARER),
            ("Content-Type", "application/json"),
        ],
        b"{\"user_id\": 1}",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 415);
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("application/x-www-form-urlencoded")
    );
    assert_eq!(table_counts(&store).await, before, "nothing written");
    d.stop().await;

    // The API server alone (no expander), so rows stay in the compact stack.
    let state = std::sync::Arc::new(nasd::api::ApiState {
        store: store.clone(),
        stats: nasd::stats::Stats::new(),
        cfg: api_config(),
        daemon_id: "api-only".into(),
        console: nasd::api::console::Console::detached(),
    });
    let listener = nasd::api::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let server = tokio::spawn(nasd::api::serve(listener, state, stop.clone()));
    let form = |body: String| async move {
        request(
            addr,
            "POST",
            "/rest_api/v2/EventsStackCompact/",
            &[
                ("Authorization", BEARER),
                ("Content-Type", "application/x-www-form-urlencoded"),
            ],
            body.as_bytes(),
        )
        .await
        .unwrap()
        .json()
    };
    let mut created = Vec::new();
    for (user, ip) in [(7, "10.20.0.1"), (8, ""), (7, "")] {
        let v = form(format!(
            "method1=objects.create&arg1={{\"user_id\": {user}, \"cmd\": \"user_add\", \"nas_ip\": \"{ip}\", \"acct_session_id\": \"s-{user}\"}}"
        ))
        .await;
        created.push(v["result"]["pk"].as_i64().unwrap());
    }
    let v = form("method1=objects.filter&arg1={\"user_id\": 7}".into()).await;
    let list = v["result"].as_array().unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(list[0]["pk"], created[0]);
    assert_eq!(list[0]["fields"]["nas_ip"], "10.20.0.1");
    assert_eq!(list[1]["fields"]["nas_ip"], Value::Null);
    assert_eq!(list[0]["fields"]["acct_session_id"], "s-7");
    let v = form("method1=objects.filter&arg1={\"nas_ip\": null}&method2=last".into()).await;
    assert_eq!(v["result"]["pk"], created[2]);
    let v = form(format!(
        "method1=objects.get&arg1={{\"id\": {}}}&method2=save&arg2={{}}",
        created[1]
    ))
    .await;
    assert_eq!(v["result"]["fields"]["user_id"], 8);
    let v = form("method1=objects.all&method2=exists".into()).await;
    assert_eq!(v["result"], true);
    let rows = store.stack_count().await.unwrap();
    assert_eq!(rows.compact_total, 3);
    stop.cancel();
    let _ = server.await;
}

async fn json_api_follows_an_event_from_enqueue_to_history(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let store = env.store().await;
    // user_add works, user_drop fails with an answer, user_rate_set is postponed
    // forever, user_info takes 3 s.
    let script = env.script(
        "session.sh",
        "#!/bin/sh\ncase \"$1\" in\n\
         user_add) echo \"added $ip\" ;;\n\
         user_drop) echo 'failure: no such item'; exit 1 ;;\n\
         user_rate_set) echo 'no answer'; exit 254 ;;\n\
         user_info) sleep 3; echo info ;;\n\
         esac\n",
    );
    store
        .nas_upsert(&nas(1, Some(&script), None, 4))
        .await
        .unwrap();
    add_accounts(&store, 4, &[1]).await;
    let d = start_with(&env, api_config(), |c| {
        c.daemon.max_attempts = 1000;
        c.daemon.retry_base = Duration::from_millis(500);
        c.daemon.retry_cap = Duration::from_secs(2);
    })
    .await;

    let r = d
        .post_json("/api/v1/events", &json!({"cmd": "user_add", "user_id": 1}))
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let add = r.json()["id"].as_i64().unwrap();
    assert_eq!(r.json()["status_url"], format!("/api/v1/events/{add}"));
    let r = d
        .post_json(
            "/api/v1/events/batch",
            &json!({"events": [
                {"cmd": "user_drop", "user_id": 2, "abonent_id": 1002},
                {"cmd": "user_rate_set", "user_id": 3, "nas_ip": "10.20.0.1"},
                {"cmd": "user_info", "user_id": 4},
            ]}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let ids: Vec<i64> = serde_json::from_value(r.json()["ids"].clone()).unwrap();
    assert_eq!(ids.len(), 3);
    let (drop, rate, info) = (ids[0], ids[1], ids[2]);

    let done = wait_state(&d, add, "done").await;
    assert_eq!(done["stage"], "history");
    assert_eq!(done["try_count"], 1);
    assert_eq!(done["answer"], "added 10.88.0.2");
    assert!(
        done["commands"][0]
            .as_str()
            .unwrap()
            .ends_with("session.sh user_add")
    );
    let failed = wait_state(&d, drop, "failed").await;
    assert_eq!(failed["answer"], "failure: no such item");
    assert!(
        failed["error"].as_str().unwrap().contains("exit 1"),
        "{failed}"
    );
    let running = wait_state(&d, info, "running").await;
    assert_eq!(running["stage"], "stack");
    let retrying = wait_state(&d, rate, "retrying").await;
    assert!(retrying["try_count"].as_i64().unwrap() >= 1);
    assert!(retrying["next_try_at"].is_string(), "{retrying}");
    assert!(
        retrying["error"].as_str().unwrap().contains("254"),
        "{retrying}"
    );

    // Cancel: running and finished events refuse, a retrying one goes to history.
    let r = d.post(&format!("/api/v1/events/{info}/cancel")).await;
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(r.json()["error"].as_str().unwrap().contains("is running"));
    let r = d.post(&format!("/api/v1/events/{add}/cancel")).await;
    assert_eq!(r.status, 409);
    let r = d.post(&format!("/api/v1/events/{rate}/cancel")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["state"], "failed");
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .starts_with("cancelled by operator (last error: "),
        "{}",
        r.text()
    );
    let h = store.history(Some(3), 10).await.unwrap();
    assert_eq!(h.len(), 1);
    assert_eq!(h[0].compact_id, Some(rate));
    assert_eq!(h[0].outcome, "failed");
    assert_eq!(d.post("/api/v1/events/999999/cancel").await.status, 404);

    // Retry: only failed events; the copy is a new event that runs again.
    let r = d.post(&format!("/api/v1/events/{add}/retry")).await;
    assert_eq!(r.status, 409);
    assert!(r.json()["error"].as_str().unwrap().contains("is done"));
    let r = d.post(&format!("/api/v1/events/{drop}/retry")).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let again = r.json()["id"].as_i64().unwrap();
    assert_eq!(r.json()["retry_of"], drop);
    assert!(again > drop);
    let st = wait_state(&d, again, "failed").await;
    assert_eq!(st["cmd"], "user_drop");
    assert_eq!(st["abonent_id"], 1002);
    assert_eq!(store.history(Some(2), 10).await.unwrap().len(), 2);

    // The account's events, newest first.
    wait_state(&d, info, "done").await;
    let r = d.get("/api/v1/accounts/2/events?limit=10").await;
    assert_eq!(r.status, 200);
    let evs = r.json()["events"].as_array().unwrap().clone();
    let got: Vec<i64> = evs.iter().map(|e| e["id"].as_i64().unwrap()).collect();
    assert_eq!(got, vec![again, drop]);
    assert_eq!(d.get("/api/v1/accounts/2/events?limit=0").await.status, 400);
    assert_eq!(d.get("/api/v1/accounts/2/events?lim=3").await.status, 400);

    // Stack counts and the NAS list with live figures.
    let r = d.get("/api/v1/stack").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["stack_total"], 0);
    assert_eq!(r.json()["compact_total"], 0);
    let r = d.get("/api/v1/nas").await;
    let n = &r.json()["nas"][0];
    assert_eq!(n["id"], 1);
    assert_eq!(n["pool_size"], 4);
    assert_eq!(n["running"], true);
    assert_eq!(n["in_flight"], 0);
    assert_eq!(n["queue_depth"], 0);
    // The daemon that delivered the events owns the NAS (epoch 0 on SQLite, where one
    // daemon serves everything; the first taking on PostgreSQL).
    assert_eq!(n["owner"], d.running.daemon_id.as_str());
    let epoch = if backend == Backend::Sqlite { 0 } else { 1 };
    assert_eq!(n["owner_epoch"], epoch);
    let cluster = d.get("/api/v1/cluster").await.json();
    assert_eq!(cluster["daemon_id"], d.running.daemon_id.as_str());
    assert_eq!(cluster["unowned"], json!([]));
    match backend {
        Backend::Sqlite => assert_eq!(cluster["daemons"], json!([])),
        Backend::Postgres => assert_eq!(cluster["daemons"][0]["owned"], 1),
    }
    assert!(n["last_success_at"].is_string());
    assert!(n["last_error"].is_string());
    assert!(n.get("password").is_none() && !r.text().contains("nas-password-do-not-log"));
    assert_eq!(d.get("/api/v1/nas/1").await.json()["name"], "NAS 1");
    assert_eq!(d.get("/api/v1/nas/7").await.status, 404);
    d.stop().await;
}

async fn missing_token_and_bad_input_write_nothing(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let store = env.store().await;
    let d = start_with(
        &env,
        ApiConfig {
            max_body: 2048,
            max_batch: 3,
            ..api_config()
        },
        |_| {},
    )
    .await;
    let good = json!({"cmd": "user_add", "user_id": 1}).to_string();
    let json_ct = ("Content-Type", "application/json");
    // No token, a wrong one, another scheme: 401 with a JSON error; never echoed.
    for auth in [
        None,
        Some("Bearer wrong-token-000000000000"),
        Some("Basic dXNlcjpwYXNz"),
    ] {
        let mut headers = vec![json_ct];
        if let Some(a) = auth {
            headers.push(("Authorization", a));
        }
        let r = request(d.addr, "POST", "/api/v1/events", &headers, good.as_bytes())
            .await
            .unwrap();
        assert_eq!(r.status, 401, "{auth:?}");
        assert_eq!(r.header("www-authenticate"), Some("Bearer realm=\"nasd\""));
        let msg = r.json()["error"].as_str().unwrap().to_string();
        assert!(msg.contains("token") || msg.contains("Bearer"), "{msg}");
        assert!(!r.text().contains("wrong-token") && !r.text().contains(TOKEN));
    }
    for path in ["/api/v1/events/1", "/api/v1/nas", "/api/v1/stack"] {
        let r = request(d.addr, "GET", path, &[], b"").await.unwrap();
        assert_eq!(r.status, 401, "{path}");
    }
    // /status, /metrics and the OpenAPI document are open by default.
    assert_eq!(
        request(d.addr, "GET", "/status", &[], b"")
            .await
            .unwrap()
            .status,
        200
    );
    assert_eq!(
        request(d.addr, "GET", "/metrics", &[], b"")
            .await
            .unwrap()
            .status,
        200
    );
    assert_eq!(
        request(d.addr, "GET", "/api/v1/openapi.json", &[], b"")
            .await
            .unwrap()
            .status,
        200
    );

    let big = json!({"events": (0..3).map(|_| json!({"cmd": "user_add", "user_id": 1, "acct_session_id": "x".repeat(700)})).collect::<Vec<_>>()}).to_string();
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, String, u16, &'a str);
    let cases: Vec<Case> = vec![
        ("/api/v1/events", vec![json_ct], "{\"cmd\": \"user_add\", ".into(), 400, "invalid JSON body"),
        ("/api/v1/events", vec![json_ct], json!({"cmd": "user_add", "user_id": 1, "speed": 5}).to_string(), 400, "unknown field `speed`"),
        ("/api/v1/events", vec![json_ct], json!({"cmd": "rm -rf", "user_id": 1}).to_string(), 400, "cmd `rm -rf` is not a cmd name"),
        ("/api/v1/events", vec![json_ct], json!({"cmd": "user_add", "user_id": -4}).to_string(), 400, "user_id must be a positive integer, got -4"),
        ("/api/v1/events", vec![json_ct], json!({"cmd": "user_add", "user_id": 0}).to_string(), 400, "user_id must be a positive integer, got 0"),
        ("/api/v1/events", vec![json_ct], json!({"cmd": "user_add", "user_id": 1, "usluga_id": 0}).to_string(), 400, "usluga_id must be a positive integer"),
        ("/api/v1/events", vec![json_ct], json!({"cmd": "user_add", "user_id": 1, "nas_ip": "nas-1"}).to_string(), 400, "nas_ip `nas-1` is not an IP address"),
        ("/api/v1/events", vec![json_ct], json!({"user_id": 1}).to_string(), 400, "missing field `cmd`"),
        ("/api/v1/events", vec![json_ct], json!({"cmd": "user_add", "user_id": "1"}).to_string(), 400, "invalid type"),
        ("/api/v1/events", vec![("Content-Type", "text/plain")], good.clone(), 415, "content type `text/plain` is not supported"),
        ("/api/v1/events", vec![], good.clone(), 415, "content type missing"),
        ("/api/v1/events/batch", vec![json_ct], big, 413, "larger than api.max_body"),
        ("/api/v1/events/batch", vec![json_ct], json!({"events": [{"cmd": "user_add", "user_id": 1}, {"cmd": "user_add", "user_id": -1}]}).to_string(), 400, "events[1]: user_id must be a positive integer"),
        ("/api/v1/events/batch", vec![json_ct], json!({"events": []}).to_string(), 400, "events is empty"),
        ("/api/v1/events/batch", vec![json_ct], json!({"events": (0..4).map(|_| json!({"cmd": "a", "user_id": 1})).collect::<Vec<_>>()}).to_string(), 413, "larger than api.max_batch 3"),
        ("/api/v1/events/abc/retry", vec![], String::new(), 400, "event id must be a positive integer, got `abc`"),
        ("/api/v1/events/-1/cancel", vec![], String::new(), 400, "event id must be a positive integer, got `-1`"),
    ];
    for (path, mut headers, body, status, needle) in cases {
        headers.push(("Authorization", BEARER));
        let r = request(d.addr, "POST", path, &headers, body.as_bytes())
            .await
            .unwrap();
        assert_eq!(r.status, status, "{path} {body:.80}: {}", r.text());
        assert_eq!(r.header("content-type"), Some("application/json"));
        let msg = r.json()["error"].as_str().unwrap_or_default().to_string();
        assert!(msg.contains(needle), "{path} {body:.80}: {msg}");
    }
    let r = d.get("/api/v1/events/0").await;
    assert_eq!(r.status, 400);
    let r = d.get("/api/v1/nowhere").await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"], "no such endpoint: /api/v1/nowhere");
    let r = request(
        d.addr,
        "DELETE",
        "/api/v1/events/1",
        &[("Authorization", BEARER)],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 405);
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("method DELETE is not allowed")
    );

    assert_eq!(table_counts(&store).await, (0, 0, 0), "nothing was written");
    d.stop().await;
    // The token is in no log line.
    for entry in walk(&env.log_dir()) {
        let text = std::fs::read_to_string(&entry).unwrap_or_default();
        assert!(
            !text.contains(TOKEN) && !text.contains("wrong-token"),
            "{}",
            entry.display()
        );
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

async fn status_names_an_unreachable_nas_and_an_old_event(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let store = env.store().await;
    let script = env.script(
        "down.sh",
        "#!/bin/sh\necho 'connect: connection refused'\nexit 254\n",
    );
    store
        .nas_upsert(&nas(1, Some(&script), None, 2))
        .await
        .unwrap();
    let mut n2 = nas(2, Some(&script), None, 2);
    n2.enabled = false;
    store.nas_upsert(&n2).await.unwrap();
    add_accounts(&store, 2, &[1, 2]).await;
    let d = start_with(
        &env,
        ApiConfig {
            nas_down_after: Duration::from_secs(1),
            oldest_event_alert: Duration::from_secs(3),
            ..api_config()
        },
        |c| c.daemon.max_attempts = 1000,
    )
    .await;
    let r = request(d.addr, "GET", "/status", &[], b"").await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().starts_with("OK\n"), "{}", r.text());
    // An event for the NAS that never answers, one for the disabled NAS (it waits).
    for user in [1, 2] {
        let r = d
            .post_json(
                "/api/v1/events",
                &json!({"cmd": "user_add", "user_id": user}),
            )
            .await;
        assert_eq!(r.status, 201);
    }
    let mut text = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while tokio::time::Instant::now() < deadline {
        let r = request(d.addr, "GET", "/status", &[], b"").await.unwrap();
        text = r.text();
        if r.status == 503 && text.contains("unreachable") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(text.starts_with("FAIL\n"), "{text}");
    assert!(
        text.contains("nas 1 (NAS 1, 10.20.0.1) unreachable for "),
        "{text}"
    );
    assert!(text.contains("last error: exit 254"), "{text}");
    assert!(text.contains("last success: never"), "{text}");
    // After the problems, the cluster block names the owner of each NAS.
    assert!(
        text.contains(&format!(
            "\nnas 1 (NAS 1, 10.20.0.1): owner {}",
            d.running.daemon_id
        )),
        "{text}"
    );
    assert!(
        text.contains("\nnas 2 (NAS 2, 10.20.0.2): disabled, no owner\n"),
        "{text}"
    );
    let problems = text.split("\n\n").next().unwrap_or_default();
    assert!(
        !problems.contains("nas 2 "),
        "a disabled NAS is not a problem: {text}"
    );
    wait_for(
        Duration::from_secs(20),
        "status names the old event",
        || {
            let addr = d.addr;
            async move {
                let r = request(addr, "GET", "/status", &[], b"").await.unwrap();
                r.text().contains("oldest event waits for ")
            }
        },
    )
    .await;
    let r = request(d.addr, "GET", "/status", &[], b"").await.unwrap();
    assert!(
        r.text()
            .contains("(api.oldest_event_alert 3s); 2 in events_stack, 0 in events_stack_compact"),
        "{}",
        r.text()
    );
    d.stop().await;

    if backend == Backend::Postgres {
        // The database goes away: /status says so (and the daemon still stops).
        let d = start_with(&env, api_config(), |_| {}).await;
        let name = env.url.rsplit('/').next().unwrap().to_string();
        let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect(&common::pg_admin_url())
            .await
            .unwrap();
        sqlx::query(&format!("DROP DATABASE {name} WITH (FORCE)"))
            .execute(&mut admin)
            .await
            .unwrap();
        let r = request(d.addr, "GET", "/status", &[], b"").await.unwrap();
        assert_eq!(r.status, 503);
        assert!(
            r.text().starts_with("FAIL\ndatabase unreachable: "),
            "{}",
            r.text()
        );
        let m = request(d.addr, "GET", "/metrics", &[], b"").await.unwrap();
        assert!(m.text().contains("\nnasd_db_up 0\n"));
        d.stop().await;
    }
}

async fn metrics_expose_counters_latency_and_queues(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let store = env.store().await;
    let script = env.script(
        "s.sh",
        "#!/bin/sh\ncase \"$1\" in user_drop) echo no; exit 1 ;; esac\necho ok\n",
    );
    store
        .nas_upsert(&nas(1, Some(&script), None, 4))
        .await
        .unwrap();
    let mut n2 = nas(2, Some(&script), None, 2);
    n2.enabled = false;
    store.nas_upsert(&n2).await.unwrap();
    add_accounts(&store, 4, &[1, 2]).await; // users 1, 3 on NAS 1; 2, 4 on NAS 2
    let d = start_with(
        &env,
        ApiConfig {
            open_metrics: false,
            ..api_config()
        },
        |_| {},
    )
    .await;
    let r = d
        .post_json(
            "/api/v1/events/batch",
            &json!({"events": [
                {"cmd": "user_add", "user_id": 1}, {"cmd": "user_add", "user_id": 3},
                {"cmd": "user_drop", "user_id": 1}, {"cmd": "user_add", "user_id": 2},
            ]}),
        )
        .await;
    assert_eq!(r.status, 201);
    common::wait_history(&store, 3, Duration::from_secs(20)).await;
    // open_metrics = false: a token is needed.
    assert_eq!(
        request(d.addr, "GET", "/metrics", &[], b"")
            .await
            .unwrap()
            .status,
        401
    );
    let mut text = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::time::Instant::now() < deadline {
        text = d.get("/metrics").await.text();
        if text.contains(
            "nasd_events_finished_total{nas=\"1\",cmd=\"user_drop\",outcome=\"failed\"} 1",
        ) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for line in [
        "nasd_events_enqueued_total{nas=\"1\",cmd=\"user_add\"} 2",
        "nasd_events_finished_total{nas=\"1\",cmd=\"user_add\",outcome=\"done\"} 2",
        "nasd_events_finished_total{nas=\"1\",cmd=\"user_drop\",outcome=\"failed\"} 1",
        "nasd_events_retried_total{nas=\"1\",cmd=\"user_add\"} 0",
        "nasd_command_duration_seconds_count{nas=\"1\"} 3",
        "nasd_command_duration_seconds_bucket{nas=\"1\",le=\"+Inf\"} 3",
        "nasd_queue_depth{nas=\"2\"} 1",
        "nasd_queue_depth{nas=\"1\"} 0",
        "nasd_pool_size{nas=\"1\"} 4",
        "nasd_in_flight{nas=\"1\"} 0",
        "nasd_open_sessions{nas=\"1\"} 0",
        "nasd_nas_up{nas=\"1\"} 1",
        "nasd_compact_queue_depth 0",
        "nasd_api_events_enqueued_total 4",
        "nasd_db_up 1",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing `{line}` in\n{text}"
        );
    }
    assert!(text.contains("# TYPE nasd_command_duration_seconds histogram"));
    assert!(text.contains("nasd_db_pool_max_connections "));
    let age: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("nasd_oldest_event_age_seconds{nas=\"2\"} "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(age > 0.0);
    // One daemon owns the enabled NAS (the disabled one has no series), on SQLite and
    // as a cluster of one on PostgreSQL.
    for line in [
        "nasd_nas_owned_here{nas=\"1\"} 1".to_string(),
        "nasd_cluster_daemons{state=\"live\"} 1".to_string(),
        "nasd_cluster_daemons{state=\"lost\"} 0".to_string(),
        format!(
            "nasd_cluster_nas_owned{{daemon=\"{}\"}} 1",
            d.running.daemon_id
        ),
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing `{line}` in\n{text}"
        );
    }
    assert!(!text.contains("nasd_nas_owned_here{nas=\"2\"}"), "{text}");
    // Labels: NAS ids, cmds, outcomes, states and daemon ids only; no account ids or
    // addresses.
    for l in text.lines().filter(|l| !l.starts_with('#')) {
        if let Some(labels) = l
            .split_once('{')
            .map(|(_, r)| r.split('}').next().unwrap_or(""))
        {
            for pair in labels.split(',') {
                let key = pair.split('=').next().unwrap();
                assert!(
                    ["nas", "cmd", "outcome", "le", "state", "daemon"].contains(&key),
                    "{l}"
                );
            }
        }
        assert!(
            !l.contains("10.88.") && !l.contains("10.20.") && !l.contains("user_id"),
            "{l}"
        );
    }
    d.stop().await;
}

fn write_config(env: &TestEnv) -> std::path::PathBuf {
    let path = env.path().join("nasd.toml");
    std::fs::write(
        &path,
        format!(
            "[database]\nurl = \"{}\"\n[daemon]\nlog_dir = \"{}\"\n",
            env.url,
            env.log_dir().display()
        ),
    )
    .unwrap();
    path
}

async fn enqueue_from_file_skips_bad_lines_with_their_number(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let store = env.store().await;
    let config = write_config(&env);
    let csv = env.path().join("events.csv");
    std::fs::write(
        &csv,
        "cmd,user_id,abonent_id,nas_ip\n\
         user_add,1,,\n\
         user_add,x,,\n\
         User_Drop,2,,\n\
         user_drop,2,1002,10.20.0.1\n\
         user_rate_set,3,,not-an-ip\n\
         user_accept,4\n\
         user_info,5,,\n",
    )
    .unwrap();
    let jsonl = env.path().join("events.jsonl");
    std::fs::write(
        &jsonl,
        "{\"cmd\": \"user_add\", \"user_id\": 10}\n\n{\"cmd\": \"user_add\", \"user_id\": 11, \"tarif\": 1}\n{broken\n{\"cmd\": \"b_negbal\", \"user_id\": 12, \"usluga_id\": 7}\n",
    )
    .unwrap();
    let run = |file: std::path::PathBuf| {
        let config = config.clone();
        tokio::task::spawn_blocking(move || {
            Command::new(env!("CARGO_BIN_EXE_nasd"))
                .arg("--config")
                .arg(&config)
                .arg("enqueue")
                .arg("--from-file")
                .arg(&file)
                .arg("--batch")
                .arg("2")
                .output()
                .unwrap()
        })
    };
    let out = run(csv.clone()).await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    let name = csv.display().to_string();
    for needle in [
        format!("{name}: line 3: column user_id: `x` is not an integer (skipped)"),
        format!("{name}: line 4: cmd `User_Drop` is not a cmd name"),
        format!("{name}: line 6: nas_ip `not-an-ip` is not an IP address"),
        format!("{name}: line 7: 2 fields, the header has 4"),
    ] {
        assert!(stderr.contains(&needle), "missing {needle} in {stderr}");
    }
    assert!(
        stderr.contains("7/7 lines, 3 enqueued, 4 skipped"),
        "{stderr}"
    );
    assert!(
        stdout.starts_with(&format!(
            "enqueued 3 events from {name} (7 lines, 4 skipped)"
        )),
        "{stdout}"
    );
    let rows = store
        .compact_filter(&nasd::store::Filter {
            conds: vec![],
            order_by: "id",
            descending: false,
            limit: 100,
        })
        .await
        .unwrap();
    let got: Vec<(String, i64, Option<i64>, Option<String>)> = rows
        .iter()
        .map(|r| {
            (
                r.event.cmd.clone(),
                r.event.user_id,
                r.event.abonent_id,
                r.event.nas_ip.clone(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("user_add".into(), 1, None, None),
            ("user_drop".into(), 2, Some(1002), Some("10.20.0.1".into())),
            ("user_info".into(), 5, None, None),
        ]
    );
    let out = run(jsonl.clone()).await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1));
    let name = jsonl.display().to_string();
    assert!(
        stderr.contains(&format!("{name}: line 3: unknown field `tarif`")),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("{name}: line 4: key must be a string")),
        "{stderr}"
    );
    assert_eq!(store.stack_count().await.unwrap().compact_total, 5);
    // The single-event flags still work.
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_nasd"))
            .arg("--config")
            .arg(&config)
            .args(["enqueue", "--cmd", "user_add", "--user-id", "77"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(out.status.success());
    assert_eq!(store.stack_count().await.unwrap().compact_total, 6);
}

async fn schemathesis_finds_no_server_error(backend: Backend) {
    let bin = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv-peers/bin/schemathesis");
    assert!(
        bin.exists(),
        "schemathesis is missing: bash scripts/test-setup.sh installs it into .venv-peers"
    );
    let env = TestEnv::new(backend).await;
    let store = env.store().await;
    let script = env.script("ok.sh", "#!/bin/sh\necho ok\n");
    store
        .nas_upsert(&nas(1, Some(&script), None, 4))
        .await
        .unwrap();
    add_accounts(&store, 5, &[1]).await;
    let d = start_with(&env, api_config(), |_| {}).await;
    let url = format!("http://{}", d.addr);
    let workdir = env.path().to_path_buf();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(bin)
            .current_dir(workdir)
            .arg("run")
            .arg(format!("{url}/api/v1/openapi.json"))
            .args(["--url", &url])
            .args(["--checks", "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"])
            .args(["--max-examples", "25"])
            .args(["--phases", "examples,coverage,fuzzing"])
            .args(["--header", &format!("Authorization: {BEARER}")])
            .args(["--request-timeout", "30"])
            .arg("--no-color")
            .env("SCHEMATHESIS_HOOKS", "")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{text}");
    assert!(out.status.success(), "schemathesis failed:\n{text}");
    assert!(
        text.contains("Tested: 29"),
        "every operation was tested:\n{text}"
    );
    assert!(!text.contains(TOKEN), "the token is not echoed back");
    d.stop().await;
}
