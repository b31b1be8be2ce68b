//! The operator console (issue 14) in a real browser: Debian's Chromium, headless, driven
//! over WebDriver by its chromedriver (`scripts/test-setup.sh` installs both), against the
//! daemon started in-process on SQLite with its `[api]` listener and `nasd sim` routers
//! speaking the RouterOS API. Every check reads what the page shows (the DOM), waiting for
//! it with a deadline; the database is read only to confirm what an action did.
//!
//! Screenshots: the tests take one of each page (overview, nas, events, account, stack,
//! login; 1200x800 PNG) and check it; with `NASD_CONSOLE_SCREENSHOTS=1` they are written
//! to `docs/console/<page>.png` for the README ("Console"), e.g.
//! `NASD_CONSOLE_SCREENSHOTS=1 cargo test --test console_ui -- --test-threads 1`.

#[macro_use]
mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::{Backend, TestEnv, event, wait_for};
use fantoccini::{Client, ClientBuilder, Locator};
use nasd::config::{ApiConfig, ApiToken, Role};
use nasd::sim::{self, Sim, SimOptions};
use nasd::store::{AccountRecord, CompactEvent, Nas, Secret, Store};
use nasd::tools::http_client::{HttpResponse, request};
use serde_json::{Value, json};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

const ADMIN_TOKEN: &str = "console-admin-token-8f2d1c7e";
const HELPDESK_TOKEN: &str = "console-helpdesk-token-3b9e51a0";
/// The routers' password: the console must never show it.
const NAS_PASSWORD: &str = "sim-Pw-7c1e-never-shown";
/// How long the page may take to show something.
const PAGE: Duration = Duration::from_secs(30);
/// How long the charts may take to have two points: two steps of the series at most.
const CHARTS: Duration = Duration::from_secs(125);
const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

// ---------------------------------------------------------------------------------------
// The daemon, its routers and its database

/// A `nasd sim` on its own loopback address (NAS ips are unique), RouterOS API only.
async fn start_sim(ip: &str, api_port: u16, record: &Path) -> Sim {
    let opts = SimOptions {
        listen: ip.to_string(),
        api_port,
        password: NAS_PASSWORD.to_string(),
        identity: format!("sim-{ip}"),
        record: Some(record.to_path_buf()),
        ..SimOptions::default()
    };
    // A port given back a moment ago may take a little while to be free again.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        match sim::start(&opts, CancellationToken::new()).await {
            Ok(sim) => return sim,
            Err(e) if tokio::time::Instant::now() > deadline => {
                panic!("the simulator cannot bind {ip}:{api_port}: {e:#}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

fn api_nas(id: i64, name: &str, ip: &str, port: u16) -> Nas {
    Nas {
        scheme: Some("mikrotik-api".into()),
        n_workers: 2,
        port: Some(i32::from(port)),
        login: Some("admin".into()),
        password: Some(Secret::new(NAS_PASSWORD)),
        max_sessions: 2,
        ..Nas::new(id, name, ip)
    }
}

/// Account `i`: login `user<i>`, ip 10.88.0.<100+i>, MAC 02:00:00:00:00:<i in hex>.
fn account_ip(i: i64) -> String {
    format!("10.88.0.{}", 100 + i)
}

async fn add_accounts(store: &Store, users: impl IntoIterator<Item = (i64, i64)>) {
    let headers: Vec<String> = [
        "user_id",
        "abonent_id",
        "nas_id",
        "login",
        "ip",
        "mac",
        "rate_in",
        "rate_out",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let records: Vec<AccountRecord> = users
        .into_iter()
        .map(|(user, nas)| {
            let values = vec![
                user.to_string(),
                (1000 + user).to_string(),
                nas.to_string(),
                format!("user{user}"),
                account_ip(user),
                format!("02:00:00:00:00:{user:02x}"),
                "10240".into(),
                "5120".into(),
            ];
            AccountRecord::from_fields(&headers, &values).expect("account")
        })
        .collect();
    store.accounts_upsert(&records).await.expect("accounts");
}

struct Daemon {
    addr: SocketAddr,
    shutdown: CancellationToken,
    running: nasd::daemon::Running,
}

impl Daemon {
    async fn start(env: &TestEnv) -> Daemon {
        let mut cfg = env.config();
        cfg.daemon.schemes_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("schemes");
        cfg.daemon.max_attempts = 3;
        cfg.daemon.breaker.failures = 2;
        cfg.daemon.breaker.probe_first = Duration::from_millis(100);
        cfg.daemon.breaker.probe_max = Duration::from_millis(300);
        cfg.api = Some(ApiConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            tokens: vec![
                ApiToken {
                    name: "noc".into(),
                    role: Role::Admin,
                    secret: Secret::new(ADMIN_TOKEN),
                },
                ApiToken {
                    name: "helpdesk".into(),
                    role: Role::ReadOnly,
                    secret: Secret::new(HELPDESK_TOKEN),
                },
            ]
            .into(),
            ..ApiConfig::default()
        });
        let shutdown = CancellationToken::new();
        let running = nasd::daemon::start(cfg, shutdown.clone())
            .await
            .expect("daemon starts");
        Daemon {
            addr: running.api_addr.expect("the api listens"),
            shutdown,
            running,
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(20), self.running.wait())
            .await
            .expect("daemon stops in time")
            .expect("daemon run");
    }

    /// A request from outside the browser, with the given headers.
    async fn http(&self, method: &str, path: &str, headers: &[(&str, &str)]) -> HttpResponse {
        let mut all = headers.to_vec();
        let body: &[u8] = if method == "GET" { b"" } else { b"{}" };
        if method != "GET" {
            all.push(("Content-Type", "application/json"));
        }
        request(self.addr, method, path, &all, body)
            .await
            .expect("http")
    }

    /// GET with the admin token (what the tests check the page against).
    async fn get(&self, path: &str) -> Value {
        let bearer = format!("Bearer {ADMIN_TOKEN}");
        let r = self
            .http("GET", path, &[("Authorization", bearer.as_str())])
            .await;
        assert_eq!(r.status, 200, "GET {path}: {}", r.text());
        r.json()
    }
}

async fn history_of(store: &Store) -> Vec<nasd::store::HistoryRow> {
    store.history(None, 10_000).await.expect("history")
}

async fn wait_history(store: &Store, n: usize) {
    wait_for(PAGE, &format!("{n} events in history"), || async {
        history_of(store).await.len() >= n
    })
    .await;
}

fn events(cmd: &str, users: impl IntoIterator<Item = i64>) -> Vec<CompactEvent> {
    users.into_iter().map(|u| event(cmd, u)).collect()
}

// ---------------------------------------------------------------------------------------
// The browser

/// A chromedriver of our own on a free loopback port, in a process group of its own with
/// the browser it starts: the whole group is killed when dropped, so a failing test
/// leaves no browser behind.
struct Driver {
    child: Child,
    port: u16,
    profile: tempfile::TempDir,
}

impl Driver {
    async fn start() -> Driver {
        for (path, package) in [(CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")] {
            assert!(
                Path::new(path).exists(),
                "{path} is missing: run scripts/test-setup.sh (installs Debian's {package})"
            );
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .expect("start chromedriver");
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        wait_for(
            Duration::from_secs(20),
            "chromedriver to answer",
            || async {
                matches!(request(addr, "GET", "/status", &[], b"").await, Ok(r) if r.status == 200)
            },
        )
        .await;
        Driver {
            child,
            port,
            profile: tempfile::tempdir().expect("profile dir"),
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if let Some(pid) = self.child.id() {
            // SAFETY: kill(2) on the process group this test created; no memory involved.
            unsafe { libc::kill(-(pid as libc::pid_t), libc::SIGKILL) };
        }
    }
}

/// A browser on the console of one daemon.
struct Console {
    c: Client,
    base: String,
    /// Where screenshots go when they are not written to docs/console.
    shots: tempfile::TempDir,
    /// Kept for its drop: the browser ends with the console.
    _driver: Driver,
}

fn t(name: &str) -> String {
    format!("[data-test=\"{name}\"]")
}

/// JavaScript string literal.
fn js(s: &str) -> String {
    serde_json::to_string(s).expect("json string")
}

fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(_) => true,
    }
}

impl Console {
    async fn start(daemon: &Daemon) -> Console {
        let driver = Driver::start().await;
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": CHROMIUM,
                "args": [
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--hide-scrollbars",
                    "--disable-crash-reporter",
                    "--disable-breakpad",
                    "--no-first-run",
                    "--force-device-scale-factor=1",
                    "--window-size=1200,800",
                    "--lang=en-US",
                    format!("--user-data-dir={}", driver.profile.path().display()),
                ],
            }),
        );
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let c = ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{}", driver.port))
            .await
            .expect("a WebDriver session in headless Chromium");
        // --window-size counts the window's frame: make the page itself 1200x800.
        let frame = c
            .execute(
                "return [window.outerWidth - window.innerWidth, window.outerHeight - window.innerHeight];",
                vec![],
            )
            .await
            .expect("window frame");
        let (fw, fh) = (
            frame[0].as_u64().unwrap_or(0),
            frame[1].as_u64().unwrap_or(0),
        );
        c.set_window_size(1200 + fw as u32, 800 + fh as u32)
            .await
            .expect("window size");
        Console {
            c,
            base: format!("http://{}", daemon.addr),
            shots: tempfile::tempdir().expect("screenshot dir"),
            _driver: driver,
        }
    }

    /// Ends the WebDriver session (the browser quits); dropping the driver then ends
    /// chromedriver's process group.
    async fn close(self) {
        let _ = self.c.close().await;
    }

    /// Evaluates a JavaScript expression in the page.
    async fn eval(&self, expr: &str) -> Value {
        self.c
            .execute(&format!("return ({expr});"), vec![])
            .await
            .unwrap_or_else(|e| panic!("script `{expr}` failed: {e}"))
    }

    /// What the page shows, for failure messages.
    async fn page_text(&self) -> String {
        let v = self
            .c
            .execute(
                "return location.hash + '\\n' + (document.body ? document.body.innerText : '');",
                vec![],
            )
            .await
            .unwrap_or(Value::Null);
        let text = v.as_str().unwrap_or("").to_string();
        text.chars().take(4000).collect()
    }

    /// Polls `expr` until it is truthy; panics naming `what`, the last value and the page.
    async fn wait(&self, what: &str, expr: &str) -> Value {
        self.wait_up_to(PAGE, what, expr).await
    }

    async fn wait_up_to(&self, limit: Duration, what: &str, expr: &str) -> Value {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let v = self
                .c
                .execute(&format!("return ({expr});"), vec![])
                .await
                .unwrap_or(Value::Null);
            if truthy(&v) {
                return v;
            }
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "timed out after {limit:?} waiting for {what}\n  ({expr} = {v})\npage:\n{}",
                    self.page_text().await
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Text of the first element matching `css` (empty when there is none).
    async fn text(&self, css: &str) -> String {
        let v = self
            .eval(&format!(
                "(document.querySelector({})||{{}}).textContent||''",
                js(css)
            ))
            .await;
        v.as_str().unwrap_or("").to_string()
    }

    async fn count(&self, css: &str) -> usize {
        self.eval(&format!("document.querySelectorAll({}).length", js(css)))
            .await
            .as_u64()
            .unwrap_or(0) as usize
    }

    /// Waits for `css` to be shown and enabled, brings it to the middle of the window
    /// (clear of the sticky header) and clicks it as a user would.
    async fn click(&self, css: &str) {
        self.wait(
            &format!("{css} to be clickable"),
            &format!(
                "(e => e && !e.disabled && e.offsetParent !== null && (e.scrollIntoView({{block:'center'}}), true))(document.querySelector({}))",
                js(css)
            ),
        )
        .await;
        self.c
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("find {css}: {e}"))
            .click()
            .await
            .unwrap_or_else(|e| panic!("click {css}: {e}"));
    }

    /// Replaces the value of the input `css` by typing `text`.
    async fn type_into(&self, css: &str, text: &str) {
        self.wait(
            &format!("{css} to take input"),
            &format!(
                "(e => e && !e.disabled && e.offsetParent !== null)(document.querySelector({}))",
                js(css)
            ),
        )
        .await;
        let el = self.c.find(Locator::Css(css)).await.expect("input");
        el.clear().await.expect("clear");
        el.send_keys(text).await.expect("type");
    }

    async fn disabled(&self, css: &str) -> bool {
        self.wait(
            &format!("{css} to be on the page"),
            &format!("document.querySelector({})", js(css)),
        )
        .await;
        self.eval(&format!("document.querySelector({}).disabled", js(css)))
            .await
            == Value::Bool(true)
    }

    /// Goes to a route of the console (`overview`, `nas/1`, `events?state=failed`, ...)
    /// and waits until the page has loaded its data.
    async fn open(&self, route: &str) {
        let url = format!("{}/ui/#/{route}", self.base);
        let here = self.c.current_url().await.map(|u| u.to_string());
        if here.as_deref().is_ok_and(|u| u.starts_with(&self.base)) {
            // Same document: the hash router takes it from here, as a link would; the
            // mark keeps the wait below from seeing the previous page as loaded.
            self.eval(&format!(
                "(h => (location.hash !== h && (document.body.dataset.loaded = 'nav', location.hash = h), 1))({})",
                js(&format!("#/{route}"))
            ))
            .await;
        } else {
            self.c.goto(&url).await.expect("goto");
        }
        let page = route.split(['/', '?']).next().unwrap_or("overview");
        self.wait(
            &format!("page {route} to load"),
            &format!(
                "document.body.dataset.page === {} && document.body.dataset.loaded === '1'",
                js(page)
            ),
        )
        .await;
    }

    /// Signs in with `token` through the login form.
    async fn login(&self, token: &str) {
        self.c
            .goto(&format!("{}/ui/", self.base))
            .await
            .expect("goto");
        self.wait(
            "the login form",
            &format!(
                "document.querySelector({}).offsetParent !== null",
                js(&t("login-form"))
            ),
        )
        .await;
        self.type_into(&t("login-token"), token).await;
        self.click(&t("login-submit")).await;
        self.wait(
            "the console after signing in",
            &format!(
                "document.querySelector({}).textContent !== '' && document.body.dataset.loaded === '1'",
                js(&t("whoami"))
            ),
        )
        .await;
    }

    /// `fetch` from the page (same origin, the session cookie and the CSRF header the
    /// console uses, unless `omit_cookie`): (status, JSON body).
    async fn fetch(
        &self,
        method: &str,
        path: &str,
        body: Value,
        omit_cookie: bool,
    ) -> (u16, Value) {
        let script = r#"
            const [method, path, body, omit, done] = arguments;
            (async () => {
              const me = await (await fetch('/api/v1/whoami', {credentials: 'same-origin'})).json().catch(() => ({}));
              const headers = {'Content-Type': 'application/json'};
              if (me.csrf) headers['X-Nasd-Csrf'] = me.csrf;
              const r = await fetch(path, {method, headers, credentials: omit ? 'omit' : 'same-origin',
                                           body: method === 'GET' ? undefined : JSON.stringify(body)});
              const text = await r.text();
              let json = null;
              try { json = JSON.parse(text); } catch (_) { json = text; }
              done([r.status, json]);
            })().catch(e => done([0, String(e)]));
        "#;
        let v = self
            .c
            .execute_async(
                script,
                vec![json!(method), json!(path), body, json!(omit_cookie)],
            )
            .await
            .expect("fetch from the page");
        (v[0].as_u64().unwrap_or(0) as u16, v[1].clone())
    }

    /// Screenshot of the window: checked (a 1200 px wide PNG), written to
    /// docs/console/<name>.png with NASD_CONSOLE_SCREENSHOTS=1.
    async fn shot(&self, name: &str) {
        // Toasts are transient; the page is what the picture is about, from its top.
        self.eval(
            "(document.getElementById('toasts').replaceChildren(), window.scrollTo(0, 0), 1)",
        )
        .await;
        let png = self.c.screenshot().await.expect("screenshot");
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "{name}: not a PNG");
        let width = u32::from_be_bytes(png[16..20].try_into().unwrap());
        let height = u32::from_be_bytes(png[20..24].try_into().unwrap());
        assert_eq!((width, height), (1200, 800), "{name}: the picture's size");
        let dir = if std::env::var_os("NASD_CONSOLE_SCREENSHOTS").is_some() {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/console")
        } else {
            self.shots.path().to_path_buf()
        };
        std::fs::create_dir_all(&dir).expect("screenshot dir");
        std::fs::write(dir.join(format!("{name}.png")), &png).expect("write screenshot");
    }
}

/// Both charts on the page have at least two points (a line): the series gains one
/// point per step (`/api/v1/series` `step_seconds`), and the page fetches it again once
/// per step.
fn charts_drawn() -> String {
    format!(
        "[{}, {}].every(s => (document.querySelector(s) || {{dataset: {{}}}}).dataset.points >= 2)",
        js(&t("chart-throughput")),
        js(&t("chart-queue"))
    )
}

/// The state the overview shows for NAS `id` (`up`, `down`, ...).
fn row_state(id: i64) -> String {
    format!(
        "(document.querySelector('[data-test=nas-row][data-nas-id=\"{id}\"]')||{{dataset:{{}}}}).dataset.state"
    )
}

// ---------------------------------------------------------------------------------------
// The scenarios

/// The console tests run on SQLite only: what they check is the page and the console's
/// endpoints; both backends are covered under them by tests/api.rs and the store tests.
macro_rules! sqlite_only {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() { super::$name(super::Backend::Sqlite).await }
            )*
        }
    };
}

sqlite_only!(
    overview_shows_a_nas_going_down_and_coming_back,
    overview_counts_what_was_delivered_in_the_last_minute,
    nas_page_shows_masked_settings_its_log_and_acts,
    account_search_finds_the_timeline_and_enqueues,
    failed_event_retried_from_the_page_ends_done,
    bulk_cancel_by_filter_names_the_count_first,
    read_only_token_sees_but_cannot_act,
    requests_without_the_cookie_or_from_another_origin_are_refused,
);

/// Two routers and a disabled NAS; the overview lists all three, filters and sorts them,
/// and shows the second going down when its simulator stops and coming back when it
/// returns (over the live stream, without a reload). The live stream closes while the tab
/// is hidden and opens again when it is shown.
async fn overview_shows_a_nas_going_down_and_coming_back(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let store = env.store().await;
    let record = env.path().join("sim.log");
    let core = start_sim("127.0.0.1", 0, &record).await;
    let edge = start_sim("127.0.0.2", 0, &record).await;
    let edge_port = edge.api_addr.port();
    store
        .nas_upsert(&api_nas(1, "Core", "127.0.0.1", core.api_addr.port()))
        .await
        .unwrap();
    store
        .nas_upsert(&api_nas(2, "Edge", "127.0.0.2", edge_port))
        .await
        .unwrap();
    store
        .nas_upsert(&Nas {
            enabled: false,
            ..api_nas(3, "Lab", "127.0.0.3", 9)
        })
        .await
        .unwrap();
    add_accounts(&store, (1..=20).map(|u| (u, 1 + (u + 1) % 2))).await;
    let daemon = Daemon::start(&env).await;
    store
        .enqueue_compact(&events("user_accept", 1..=20))
        .await
        .unwrap();
    wait_history(&store, 20).await;

    let ui = Console::start(&daemon).await;
    ui.login(ADMIN_TOKEN).await;
    ui.open("overview").await;
    ui.wait(
        "three NAS rows",
        &format!(
            "document.querySelectorAll({}).length === 3",
            js(&t("nas-row"))
        ),
    )
    .await;
    ui.wait(
        "Core and Edge up",
        &format!("{} === 'up' && {} === 'up'", row_state(1), row_state(2)),
    )
    .await;
    ui.wait("Lab disabled", &format!("{} === 'disabled'", row_state(3)))
        .await;
    assert!(
        ui.text(&t("total-nas")).await.starts_with('3'),
        "{}",
        ui.page_text().await
    );
    ui.wait(
        "the live stream",
        "document.getElementById('live').dataset.live === 'open'",
    )
    .await;

    // Filter by name, then by state.
    ui.type_into(&t("nas-filter"), "edg").await;
    ui.wait(
        "only Edge left",
        &format!(
            "[...document.querySelectorAll({})].map(r => r.dataset.nasId).join() === '2'",
            js(&t("nas-row"))
        ),
    )
    .await;
    ui.type_into(&t("nas-filter"), "").await;
    ui.eval(&format!(
        "(s => (s.value = 'disabled', s.dispatchEvent(new Event('change')), 1))(document.querySelector({}))",
        js(&t("nas-state-filter"))
    ))
    .await;
    ui.wait(
        "only Lab left",
        &format!(
            "[...document.querySelectorAll({})].map(r => r.dataset.nasId).join() === '3'",
            js(&t("nas-row"))
        ),
    )
    .await;
    ui.eval(&format!(
        "(s => (s.value = '', s.dispatchEvent(new Event('change')), 1))(document.querySelector({}))",
        js(&t("nas-state-filter"))
    ))
    .await;
    // Sort: by name ascending first; a click on the header turns it round.
    let order = format!(
        "[...document.querySelectorAll({})].map(r => r.dataset.nasId).join()",
        js(&t("nas-row"))
    );
    ui.wait("sorted by name", &format!("{order} === '1,2,3'"))
        .await;
    ui.click("[data-test=nas-table] th[data-sort=name]").await;
    ui.wait(
        "sorted by name, descending",
        &format!("{order} === '3,2,1'"),
    )
    .await;
    ui.click("[data-test=nas-table] th[data-sort=name]").await;

    // Edge goes away while events for it keep coming.
    edge.stop().await;
    store
        .enqueue_compact(&events("user_drop", (2..=20).step_by(2)))
        .await
        .unwrap();
    ui.wait(
        "Edge down on the overview",
        &format!("{} === 'down'", row_state(2)),
    )
    .await;
    let reason = ui
        .text("[data-test=nas-row][data-nas-id=\"2\"] [data-test=down-reason]")
        .await;
    assert!(
        reason.contains("since") && reason.len() > 10,
        "the down reason and since: {reason:?}"
    );
    assert_eq!(ui.eval(&row_state(1)).await, json!("up"));
    // Its ten events wait: the row and the totals show them.
    ui.wait(
        "Edge's queue of 10 on the overview",
        "(document.querySelector('[data-test=nas-row][data-nas-id=\"2\"]')||{dataset:{}}).dataset.queue === '10'",
    )
    .await;
    ui.wait(
        "a queue of 10 in the totals",
        &format!(
            "document.querySelector({}).textContent.startsWith('10')",
            js(&t("total-queue"))
        ),
    )
    .await;
    ui.wait(
        "one down in the totals",
        &format!(
            "document.querySelector({}).textContent.startsWith('1')",
            js(&t("total-down"))
        ),
    )
    .await;
    ui.wait_up_to(CHARTS, "both charts with a line", &charts_drawn())
        .await;
    ui.shot("overview").await;

    // Hidden tab: the stream is closed; shown again: reopened.
    ui.eval(
        "(Object.defineProperty(document, 'visibilityState', {value: 'hidden', configurable: true}), \
          document.dispatchEvent(new Event('visibilitychange')), 1)",
    )
    .await;
    ui.wait(
        "the stream paused",
        "document.getElementById('live').dataset.live === 'paused'",
    )
    .await;
    ui.eval(
        "(Object.defineProperty(document, 'visibilityState', {value: 'visible', configurable: true}), \
          document.dispatchEvent(new Event('visibilitychange')), 1)",
    )
    .await;
    ui.wait(
        "the stream open again",
        "document.getElementById('live').dataset.live === 'open'",
    )
    .await;

    // Edge is back on the same port: the page shows it up again without a reload.
    let edge = start_sim("127.0.0.2", edge_port, &record).await;
    ui.wait("Edge up again", &format!("{} === 'up'", row_state(2)))
        .await;
    wait_history(&store, 30).await;
    assert!(
        history_of(&store).await.iter().all(|h| h.outcome == "done"),
        "every event was delivered"
    );

    ui.close().await;
    daemon.stop().await;
    core.stop().await;
    edge.stop().await;
}

/// Twenty events delivered right after the start count in the overview's rates: done
/// per minute in the totals and in the NAS's row, a peak on the throughput chart, and a
/// command latency for the row.
async fn overview_counts_what_was_delivered_in_the_last_minute(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let store = env.store().await;
    let record = env.path().join("sim.log");
    let core = start_sim("127.0.0.1", 0, &record).await;
    store
        .nas_upsert(&api_nas(1, "Core", "127.0.0.1", core.api_addr.port()))
        .await
        .unwrap();
    add_accounts(&store, (1..=20).map(|u| (u, 1))).await;
    let daemon = Daemon::start(&env).await;
    store
        .enqueue_compact(&events("user_accept", 1..=20))
        .await
        .unwrap();
    wait_history(&store, 20).await;

    let ui = Console::start(&daemon).await;
    ui.login(ADMIN_TOKEN).await;
    ui.open("overview").await;
    let row = "document.querySelector('[data-test=nas-row][data-nas-id=\"1\"]').dataset";
    ui.wait_up_to(
        CHARTS,
        "20 done per minute on the row and in the totals",
        &format!(
            "{row}.done >= 20 && parseFloat(document.querySelector({}).textContent) >= 20",
            js(&format!("{} b", t("total-done")))
        ),
    )
    .await;
    ui.wait_up_to(
        CHARTS,
        "the deliveries on the throughput chart",
        &format!(
            "document.querySelector({}).dataset.max >= 20",
            js(&t("chart-throughput"))
        ),
    )
    .await;
    ui.wait("a latency for the row", &format!("{row}.p50 > 0"))
        .await;

    ui.close().await;
    daemon.stop().await;
    core.stop().await;
}

/// The NAS page: settings with the password masked, the NAS log, figures and charts;
/// a test command as a dry run (nothing reaches the router) and for real (it does);
/// probe; pause and resume (an event enqueued meanwhile is delivered after resume).
async fn nas_page_shows_masked_settings_its_log_and_acts(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let store = env.store().await;
    let record = env.path().join("sim.log");
    let core = start_sim("127.0.0.1", 0, &record).await;
    store
        .nas_upsert(&api_nas(1, "Core", "127.0.0.1", core.api_addr.port()))
        .await
        .unwrap();
    add_accounts(&store, (1..=5).map(|u| (u, 1))).await;
    let daemon = Daemon::start(&env).await;
    store
        .enqueue_compact(&events("user_accept", [1, 2]))
        .await
        .unwrap();
    wait_history(&store, 2).await;

    let ui = Console::start(&daemon).await;
    ui.login(ADMIN_TOKEN).await;
    ui.open("overview").await;
    ui.click("[data-test=nas-row][data-nas-id=\"1\"] [data-test=nas-link]")
        .await;
    ui.wait(
        "the NAS page",
        "document.body.dataset.page === 'nas' && document.body.dataset.loaded === '1'",
    )
    .await;
    assert!(ui.text(&t("nas-title")).await.contains("Core"));
    let settings = ui.text(&t("nas-settings")).await;
    assert!(settings.contains("127.0.0.1"), "{settings}");
    assert!(
        settings.contains("••••"),
        "the password shown masked: {settings}"
    );
    ui.wait(
        "the NAS log with the deliveries",
        &format!(
            "document.querySelector({}).textContent.includes('user_accept')",
            js(&t("nas-log"))
        ),
    )
    .await;
    ui.wait(
        "the state up",
        &format!(
            "document.querySelector({}).dataset.state === 'up'",
            js(&t("nas-state"))
        ),
    )
    .await;

    // A dry run renders the commands and sends nothing.
    let ip3 = account_ip(3);
    ui.type_into(&t("send-cmd"), "user_accept").await;
    ui.type_into(&t("send-user"), "3").await;
    ui.click(&t("send-submit")).await;
    ui.wait(
        "the dry run's result",
        &format!(
            "document.querySelector('{}[data-outcome=dry_run]')",
            t("send-result")
        ),
    )
    .await;
    let shown = ui.text(&t("send-result")).await;
    assert!(
        shown.contains("/ip/firewall/address-list/add") && shown.contains(&ip3),
        "the dry run shows the rendered command: {shown}"
    );
    let reached = || std::fs::read_to_string(&record).unwrap_or_default();
    assert!(!reached().contains(&ip3), "a dry run reached the router");

    // For real, after a confirmation.
    ui.click(&t("send-dry")).await;
    ui.click(&t("send-submit")).await;
    ui.wait(
        "the confirmation",
        "document.getElementById('confirm').open",
    )
    .await;
    assert!(ui.text(&t("confirm-text")).await.contains("user_accept"));
    ui.click(&t("confirm-ok")).await;
    ui.wait(
        "the real send's result",
        &format!(
            "document.querySelector('{}[data-outcome=done]')",
            t("send-result")
        ),
    )
    .await;
    let shown = ui.text(&t("send-result")).await;
    assert!(shown.contains(&ip3), "command and answer shown: {shown}");
    assert!(reached().contains(&ip3), "the real send reached the router");
    assert_eq!(ui.count(&t("send-result")).await, 2, "each send is listed");

    // Probe now.
    ui.click(&t("btn-probe")).await;
    ui.wait(
        "the probe's answer",
        &format!(
            "document.querySelector({}).dataset.ok === 'true'",
            js(&t("probe-result"))
        ),
    )
    .await;

    // Pause: the page shows it; an event enqueued meanwhile is delivered after resume.
    ui.click(&t("btn-pause")).await;
    ui.wait(
        "paused",
        &format!(
            "document.querySelector({}).dataset.state === 'paused'",
            js(&t("nas-state"))
        ),
    )
    .await;
    assert_eq!(daemon.get("/api/v1/nas/1").await["paused"], json!(true));
    store
        .enqueue_compact(&[event("user_drop", 4)])
        .await
        .unwrap();
    ui.click(&t("btn-resume")).await;
    ui.wait(
        "up again",
        &format!(
            "document.querySelector({}).dataset.state === 'up'",
            js(&t("nas-state"))
        ),
    )
    .await;
    assert_eq!(daemon.get("/api/v1/nas/1").await["paused"], json!(false));
    wait_history(&store, 3).await;
    ui.wait_up_to(CHARTS, "both charts with a line", &charts_drawn())
        .await;
    ui.shot("nas").await;
    assert!(
        !ui.page_text().await.contains(NAS_PASSWORD),
        "the NAS password is on the page"
    );

    ui.close().await;
    daemon.stop().await;
    core.stop().await;
}

/// Search by login, IP and MAC finds the account; its timeline holds delivered events
/// with their commands and answers, and an event still retrying while the router is away;
/// an event enqueued from the page appears on it.
async fn account_search_finds_the_timeline_and_enqueues(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let store = env.store().await;
    let record = env.path().join("sim.log");
    let core = start_sim("127.0.0.1", 0, &record).await;
    let port = core.api_addr.port();
    store
        .nas_upsert(&api_nas(1, "Core", "127.0.0.1", port))
        .await
        .unwrap();
    add_accounts(&store, (1..=10).map(|u| (u, 1))).await;
    let daemon = Daemon::start(&env).await;
    store
        .enqueue_compact(&[
            event("user_accept", 7),
            event("user_rate_set", 7),
            event("user_accept", 8),
        ])
        .await
        .unwrap();
    wait_history(&store, 3).await;

    let ui = Console::start(&daemon).await;
    ui.login(ADMIN_TOKEN).await;
    ui.click(&t("nav-account")).await;
    ui.type_into(&t("account-q"), "user7").await;
    ui.click(&t("account-go")).await;
    ui.wait("account 7's page", "location.hash === '#/account/7'")
        .await;
    ui.wait(
        "two delivered events on the timeline",
        &format!(
            "document.querySelectorAll('{}[data-state=done]').length === 2",
            t("timeline-item")
        ),
    )
    .await;
    let timeline = ui.text(&t("timeline")).await;
    assert!(
        timeline.contains("user_accept") && timeline.contains("user_rate_set"),
        "{timeline}"
    );
    assert!(
        !timeline.contains("user8"),
        "another account's event: {timeline}"
    );
    let commands = ui
        .eval(&format!(
            "[...document.querySelectorAll({})].map(e => e.textContent).join('\\n')",
            js(&t("timeline-commands"))
        ))
        .await;
    let ip7 = account_ip(7);
    assert!(
        commands
            .as_str()
            .unwrap_or("")
            .contains(&format!("=address={ip7}")),
        "the commands as sent: {commands}"
    );
    assert!(ui.text(&t("account-facts")).await.contains(&ip7));

    // By IP and by MAC (written another way than stored).
    for q in [ip7.clone(), "02-00-00-00-00-07".to_string()] {
        ui.open("account").await;
        ui.type_into(&t("account-q"), &q).await;
        ui.click(&t("account-go")).await;
        ui.wait(
            &format!("account 7 found by {q}"),
            "location.hash === '#/account/7'",
        )
        .await;
        ui.wait(
            "its timeline",
            &format!(
                "document.querySelectorAll({}).length >= 2",
                js(&t("timeline-item"))
            ),
        )
        .await;
    }

    // The router goes away: a new event for 7 waits in the stack, retrying.
    core.stop().await;
    ui.type_into(&t("enqueue-cmd"), "user_drop").await;
    ui.click(&t("enqueue-submit")).await;
    ui.wait(
        "the enqueued event, waiting",
        &format!(
            "[...document.querySelectorAll({})].some(e => e.dataset.cmd === 'user_drop' && ['queued','retrying','running'].includes(e.dataset.state))",
            js(&t("timeline-item"))
        ),
    )
    .await;
    // Back: it is delivered, and the timeline follows.
    let core = start_sim("127.0.0.1", port, &record).await;
    ui.wait(
        "the enqueued event done",
        &format!(
            "[...document.querySelectorAll({})].some(e => e.dataset.cmd === 'user_drop' && e.dataset.state === 'done')",
            js(&t("timeline-item"))
        ),
    )
    .await;
    ui.eval("(document.querySelector('[data-test=timeline-item] details') || {}).open = true")
        .await;
    ui.shot("account").await;

    ui.close().await;
    daemon.stop().await;
    core.stop().await;
}

/// An event fails (its account is unknown); once the account exists, Retry on the event's
/// detail enqueues it again and the page follows the new event until it is done.
async fn failed_event_retried_from_the_page_ends_done(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let store = env.store().await;
    let record = env.path().join("sim.log");
    let core = start_sim("127.0.0.1", 0, &record).await;
    store
        .nas_upsert(&api_nas(1, "Core", "127.0.0.1", core.api_addr.port()))
        .await
        .unwrap();
    add_accounts(&store, (1..=5).map(|u| (u, 1))).await;
    let daemon = Daemon::start(&env).await;
    let ids = store
        .enqueue_compact(&[event("user_accept", 1), event("user_accept", 42)])
        .await
        .unwrap();
    let failed_id = ids[1];
    wait_history(&store, 2).await;
    add_accounts(&store, [(42, 1)]).await;

    let ui = Console::start(&daemon).await;
    ui.login(ADMIN_TOKEN).await;
    ui.click(&t("nav-events")).await;
    ui.wait(
        "the failed tab",
        "location.hash.includes('state=failed') && document.body.dataset.loaded === '1'",
    )
    .await;
    let row = format!("[data-test=event-row][data-id=\"{failed_id}\"]");
    ui.wait(
        "the failed event listed",
        &format!("document.querySelector({})", js(&row)),
    )
    .await;
    assert!(
        ui.text(&row).await.contains("unknown account"),
        "{}",
        ui.text(&row).await
    );
    // Only the failed one is in the failed tab.
    assert_eq!(ui.count(&t("event-row")).await, 1);
    // Filtered by error text and time range: found; by another text: not.
    ui.type_into(&t("filter-error"), "UNKNOWN account").await;
    ui.type_into(&t("filter-since"), "1h").await;
    ui.click(&t("filter-apply")).await;
    ui.wait(
        "the event found by its error",
        &format!(
            "location.hash.includes('error=') && document.body.dataset.loaded === '1' && !!document.querySelector({})",
            js(&row)
        ),
    )
    .await;
    ui.type_into(&t("filter-error"), "no such text anywhere")
        .await;
    ui.click(&t("filter-apply")).await;
    ui.wait(
        "nothing found by another text",
        &format!(
            "location.hash.includes('anywhere') && document.body.dataset.loaded === '1' && !!document.querySelector({})",
            js(&t("empty"))
        ),
    )
    .await;
    ui.click(&t("nav-events")).await;
    ui.wait(
        "the failed event listed",
        &format!("document.querySelector({})", js(&row)),
    )
    .await;
    ui.click(&format!("{row} td:nth-child(3)")).await;
    ui.wait(
        "its detail",
        &format!(
            "(d => d && d.dataset.id === '{failed_id}' && d.dataset.state === 'failed')(document.querySelector({}))",
            js(&t("event-detail"))
        ),
    )
    .await;
    assert!(
        ui.text(&t("event-error"))
            .await
            .contains("unknown account user_id=42")
    );
    assert!(ui.text(&t("event-params")).await.contains("42"));
    ui.shot("events").await;

    ui.click(&t("btn-retry-one")).await;
    let new_id = ui
        .wait(
            "the detail of the new event",
            &format!(
                "(d => d && d.dataset.id !== '{failed_id}' && d.dataset.id)(document.querySelector({}))",
                js(&t("event-detail"))
            ),
        )
        .await;
    let new_id: i64 = new_id.as_str().unwrap().parse().unwrap();
    ui.wait(
        "the new event done",
        &format!(
            "document.querySelector({}).dataset.state === 'done'",
            js(&t("event-detail"))
        ),
    )
    .await;
    let commands = ui.text(&t("event-commands")).await;
    assert!(commands.contains(&account_ip(42)), "{commands}");
    let status = daemon.get(&format!("/api/v1/events/{new_id}")).await;
    assert_eq!(status["state"], json!("done"), "{status}");
    let old = daemon.get(&format!("/api/v1/events/{failed_id}")).await;
    assert_eq!(
        old["state"],
        json!("failed"),
        "the original stays failed: {old}"
    );

    ui.close().await;
    daemon.stop().await;
    core.stop().await;
}

/// Queued events of a disabled NAS: "Cancel all matching" for cmd=user_drop asks first,
/// naming the count (declining changes nothing), then cancels exactly those; "Cancel
/// selected" cancels two picked rows. The Stack page shows what is left and the audit
/// log the cancellations.
async fn bulk_cancel_by_filter_names_the_count_first(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let store = env.store().await;
    store
        .nas_upsert(&Nas {
            enabled: false,
            ..api_nas(1, "Core", "127.0.0.1", 9)
        })
        .await
        .unwrap();
    add_accounts(&store, (1..=40).map(|u| (u, 1))).await;
    let daemon = Daemon::start(&env).await;
    store
        .enqueue_compact(&events("user_drop", 1..=30))
        .await
        .unwrap();
    store
        .enqueue_compact(&events("user_accept", 31..=40))
        .await
        .unwrap();

    let ui = Console::start(&daemon).await;
    ui.login(ADMIN_TOKEN).await;
    ui.open("events?state=queued").await;
    ui.wait(
        "40 queued events",
        &format!(
            "document.querySelectorAll({}).length === 40",
            js(&t("event-row"))
        ),
    )
    .await;
    ui.type_into(&t("filter-cmd"), "user_drop").await;
    ui.click(&t("filter-apply")).await;
    ui.wait(
        "30 user_drop events",
        &format!(
            "location.hash.includes('cmd=user_drop') && document.body.dataset.loaded === '1' && document.querySelectorAll({}).length === 30",
            js(&t("event-row"))
        ),
    )
    .await;

    // Declined: nothing changes.
    ui.click(&t("btn-cancel-matching")).await;
    ui.wait(
        "the confirmation",
        "document.getElementById('confirm').open",
    )
    .await;
    let text = ui.text(&t("confirm-text")).await;
    assert!(
        text.contains("30 events") && text.contains("user_drop") && text.contains("queued"),
        "the confirmation names the count and the filter: {text}"
    );
    ui.click(&t("confirm-cancel")).await;
    ui.wait(
        "the dialog closed",
        "!document.getElementById('confirm').open",
    )
    .await;
    assert_eq!(
        history_of(&store).await.len(),
        0,
        "declining cancelled something"
    );

    // Confirmed.
    ui.click(&t("btn-cancel-matching")).await;
    ui.wait(
        "the confirmation",
        "document.getElementById('confirm').open",
    )
    .await;
    assert!(ui.text("#confirm-ok").await.contains("30"));
    ui.click(&t("confirm-ok")).await;
    ui.wait(
        "the list empty",
        &format!(
            "document.querySelectorAll({}).length === 0 && document.querySelector({})",
            js(&t("event-row")),
            js(&t("empty"))
        ),
    )
    .await;
    let history = history_of(&store).await;
    assert_eq!(history.len(), 30, "{history:?}");
    assert!(
        history.iter().all(|h| h.cmd == "user_drop"
            && h.outcome == "failed"
            && h.error.as_deref().unwrap_or("").contains("cancelled")),
        "{history:?}"
    );

    // Two picked rows of what is left.
    ui.open("events?state=queued").await;
    ui.wait(
        "10 queued events left",
        &format!(
            "document.querySelectorAll({}).length === 10",
            js(&t("event-row"))
        ),
    )
    .await;
    ui.click("[data-test=event-row]:nth-child(1) [data-test=event-check]")
        .await;
    ui.click("[data-test=event-row]:nth-child(2) [data-test=event-check]")
        .await;
    ui.wait(
        "2 selected",
        &format!(
            "document.querySelector({}).textContent.startsWith('2')",
            js(&t("sel-count"))
        ),
    )
    .await;
    ui.click(&t("btn-cancel-selected")).await;
    ui.wait(
        "the confirmation",
        "document.getElementById('confirm').open",
    )
    .await;
    assert!(
        ui.text(&t("confirm-text"))
            .await
            .contains("2 selected events")
    );
    ui.click(&t("confirm-ok")).await;
    ui.wait(
        "8 queued events left",
        &format!(
            "document.querySelectorAll({}).length === 8",
            js(&t("event-row"))
        ),
    )
    .await;
    assert_eq!(history_of(&store).await.len(), 32);

    // The Stack page: what waits, and the audit log names both actions.
    ui.open("stack").await;
    ui.wait(
        "user_accept 8 in the stack",
        &format!(
            "[...document.querySelectorAll({} + ' tbody tr')].some(r => r.textContent.includes('user_accept') && r.textContent.includes('8'))",
            js(&t("stack-by-cmd"))
        ),
    )
    .await;
    // Columns: at, who, action, target, count, detail.
    ui.wait(
        "both cancellations in the audit log, by noc, with their counts",
        &format!(
            "(c => c.includes('noc 30') && c.includes('noc 2'))([...document.querySelectorAll({})]\
               .filter(r => r.dataset.action.includes('cancel'))\
               .map(r => r.children[1].textContent + ' ' + r.children[4].textContent))",
            js(&t("audit-row"))
        ),
    )
    .await;
    ui.shot("stack").await;

    ui.close().await;
    daemon.stop().await;
}

/// A read-only token sees every page with its data, every action is disabled, and the
/// server refuses the actions anyway (asked from the page with its session and CSRF).
async fn read_only_token_sees_but_cannot_act(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let store = env.store().await;
    let record = env.path().join("sim.log");
    let core = start_sim("127.0.0.1", 0, &record).await;
    store
        .nas_upsert(&api_nas(1, "Core", "127.0.0.1", core.api_addr.port()))
        .await
        .unwrap();
    add_accounts(&store, (1..=5).map(|u| (u, 1))).await;
    let daemon = Daemon::start(&env).await;
    let ids = store
        .enqueue_compact(&[event("user_accept", 1), event("user_accept", 77)])
        .await
        .unwrap();
    wait_history(&store, 2).await;

    let ui = Console::start(&daemon).await;
    ui.login(HELPDESK_TOKEN).await;
    assert!(ui.text(&t("whoami")).await.contains("helpdesk"));
    ui.wait(
        "the read-only mark",
        &format!("document.querySelector({})", js(&t("read-only"))),
    )
    .await;

    ui.open("overview").await;
    ui.wait("the NAS listed, up", &format!("{} === 'up'", row_state(1)))
        .await;

    ui.open("nas/1").await;
    ui.wait(
        "the settings",
        &format!("document.querySelector({})", js(&t("nas-settings"))),
    )
    .await;
    for b in ["btn-pause", "btn-probe", "send-submit"] {
        assert!(
            ui.disabled(&t(b)).await,
            "{b} is enabled for a read-only token"
        );
    }

    ui.open("events?state=failed").await;
    let row = format!("[data-test=event-row][data-id=\"{}\"]", ids[1]);
    ui.wait(
        "the failed event",
        &format!("document.querySelector({})", js(&row)),
    )
    .await;
    for b in ["btn-retry-matching", "btn-retry-selected"] {
        assert!(
            ui.disabled(&t(b)).await,
            "{b} is enabled for a read-only token"
        );
    }
    ui.click(&format!("{row} td:nth-child(3)")).await;
    assert!(ui.disabled(&t("btn-retry-one")).await);

    ui.open("account/1").await;
    ui.wait(
        "the timeline",
        &format!("document.querySelector({})", js(&t("timeline-item"))),
    )
    .await;
    assert!(ui.disabled(&t("enqueue-submit")).await);

    // The server says no, whatever the page shows.
    for (path, body) in [
        ("/api/v1/nas/1/pause", json!({})),
        ("/api/v1/nas/1/probe", json!({})),
        (
            "/api/v1/nas/1/send",
            json!({"cmd": "user_accept", "user_id": 1, "dry_run": true}),
        ),
        (&*format!("/api/v1/events/{}/retry", ids[1]), json!({})),
        (
            "/api/v1/events/retry",
            json!({"filter": {"state": "failed"}, "dry_run": true}),
        ),
        (
            "/api/v1/events/cancel",
            json!({"filter": {"state": "queued"}}),
        ),
        (
            "/api/v1/events",
            json!({"cmd": "user_accept", "user_id": 1}),
        ),
    ] {
        let (status, answer) = ui.fetch("POST", path, body, false).await;
        assert_eq!(status, 403, "POST {path} as read-only: {answer}");
        let error = answer["error"].as_str().unwrap_or("");
        assert!(
            error.contains("read-only") && error.contains("helpdesk"),
            "POST {path}: {answer}"
        );
    }
    // Reading is allowed.
    let (status, _) = ui
        .fetch("GET", "/api/v1/overview", Value::Null, false)
        .await;
    assert_eq!(status, 200);
    assert_eq!(daemon.get("/api/v1/nas/1").await["paused"], json!(false));
    assert_eq!(
        daemon.get(&format!("/api/v1/events/{}", ids[1])).await["state"],
        json!("failed")
    );
    assert_eq!(
        history_of(&store).await.len(),
        2,
        "nothing was enqueued or retried"
    );

    ui.close().await;
    daemon.stop().await;
    core.stop().await;
}

/// The session cookie is HttpOnly and SameSite=Strict; a wrong token is refused at
/// login; a state-changing request without the cookie, without or with a wrong CSRF
/// header, or from another origin is refused, while the same request done right is
/// accepted; after logout the old cookie opens nothing.
async fn requests_without_the_cookie_or_from_another_origin_are_refused(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let store = env.store().await;
    store
        .nas_upsert(&Nas {
            enabled: false,
            ..api_nas(1, "Core", "127.0.0.1", 9)
        })
        .await
        .unwrap();
    let daemon = Daemon::start(&env).await;
    let ui = Console::start(&daemon).await;

    // A wrong token: the form says so and no cookie is set.
    ui.c.goto(&format!("{}/ui/", ui.base)).await.unwrap();
    ui.type_into(&t("login-token"), "not-the-token-at-all")
        .await;
    ui.click(&t("login-submit")).await;
    ui.wait(
        "the login error",
        &format!(
            "document.querySelector({}).textContent.includes('invalid')",
            js(&t("login-error"))
        ),
    )
    .await;
    assert!(ui.c.get_named_cookie("nasd_session").await.is_err());
    ui.shot("login").await;

    ui.login(ADMIN_TOKEN).await;
    let cookie =
        ui.c.get_named_cookie("nasd_session")
            .await
            .expect("the session cookie");
    assert_eq!(cookie.http_only(), Some(true), "{cookie:?}");
    assert_eq!(
        format!("{:?}", cookie.same_site()),
        "Some(Strict)",
        "{cookie:?}"
    );
    assert_eq!(
        ui.eval("document.cookie.includes('nasd_session')").await,
        json!(false),
        "the page's scripts can read the session cookie"
    );
    let session = format!("nasd_session={}", cookie.value());
    let (_, me) = ui.fetch("GET", "/api/v1/whoami", Value::Null, false).await;
    let csrf = me["csrf"]
        .as_str()
        .expect("whoami names the csrf")
        .to_string();
    assert_eq!(me["role"], json!("admin"));
    let origin = ui.base.clone();

    let pause = "/api/v1/nas/1/pause";
    // No cookie (the page's own fetch without credentials, then from outside).
    let (status, answer) = ui.fetch("POST", pause, json!({}), true).await;
    assert_eq!(status, 401, "without the cookie: {answer}");
    let r = daemon
        .http(
            "POST",
            pause,
            &[("X-Nasd-Csrf", &csrf), ("Origin", &origin)],
        )
        .await;
    assert_eq!(r.status, 401, "without the cookie: {}", r.text());
    let r = daemon.http("GET", "/api/v1/overview", &[]).await;
    assert_eq!(r.status, 401, "reading without the cookie: {}", r.text());
    // A forged origin.
    let r = daemon
        .http(
            "POST",
            pause,
            &[
                ("Cookie", &session),
                ("X-Nasd-Csrf", &csrf),
                ("Origin", "http://evil.example"),
            ],
        )
        .await;
    assert_eq!(r.status, 403, "another origin: {}", r.text());
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap_or("")
            .to_lowercase()
            .contains("origin"),
        "{}",
        r.text()
    );
    // No CSRF header, a wrong one.
    for headers in [
        vec![("Cookie", session.as_str()), ("Origin", origin.as_str())],
        vec![
            ("Cookie", session.as_str()),
            ("Origin", origin.as_str()),
            ("X-Nasd-Csrf", "0000"),
        ],
    ] {
        let r = daemon.http("POST", pause, &headers).await;
        assert_eq!(r.status, 403, "{headers:?}: {}", r.text());
    }
    assert_eq!(daemon.get("/api/v1/nas/1").await["paused"], json!(false));
    // Done right, the same request is accepted.
    let r = daemon
        .http(
            "POST",
            pause,
            &[
                ("Cookie", &session),
                ("X-Nasd-Csrf", &csrf),
                ("Origin", &origin),
            ],
        )
        .await;
    assert_eq!(r.status, 200, "the right request: {}", r.text());
    assert_eq!(daemon.get("/api/v1/nas/1").await["paused"], json!(true));

    // Logout ends the session on the server too.
    ui.click(&t("logout")).await;
    ui.wait(
        "the login form again",
        &format!(
            "document.querySelector({}).offsetParent !== null",
            js(&t("login-form"))
        ),
    )
    .await;
    let r = daemon
        .http("GET", "/api/v1/overview", &[("Cookie", &session)])
        .await;
    assert_eq!(r.status, 401, "the old cookie after logout: {}", r.text());

    ui.close().await;
    daemon.stop().await;
}
