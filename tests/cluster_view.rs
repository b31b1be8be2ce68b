//! What an operator sees of a cluster: two daemons on one PostgreSQL, in one process
//! (each with its own `[cluster] name` and HTTP API), and the real `nasd` binary run
//! against the same database. `/api/v1/nas`, `/api/v1/cluster`, `/status`, `/metrics`,
//! `nasd cluster status` and `nasd nas list` must all name the owner rendezvous hashing
//! gives each NAS; a daemon that joins and takes nothing leaves its NAS without an
//! owner, which every view names; once both daemons have left, `nasd cluster status`
//! says so.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use common::{Backend, TestEnv, nas, wait_for};
use nasd::cluster::plan::owner_of;
use nasd::config::{ApiConfig, Config};
use nasd::store::{Secret, Store};
use nasd::tools::http_client::{HttpResponse, request};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// Enabled NAS 1..=N_NAS; NAS `DISABLED` exists but is disabled.
const N_NAS: i64 = 6;
const DISABLED: i64 = 7;
const A: &str = "view-a";
const B: &str = "view-b";
const GHOST: &str = "view-ghost";
const BEARER: &str = "Bearer cluster-view-token-7d2e91";

fn config(env: &TestEnv, name: &str) -> Config {
    let mut cfg = env.config();
    cfg.cluster.name = Some(name.to_string());
    cfg.cluster.lease = Duration::from_secs(3);
    cfg.cluster.heartbeat = Duration::from_millis(200);
    cfg.api = Some(ApiConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        tokens: vec![nasd::config::ApiToken {
            name: "test".into(),
            role: nasd::config::Role::Admin,
            secret: Secret::new("cluster-view-token-7d2e91"),
        }]
        .into(),
        ..ApiConfig::default()
    });
    cfg.validate().expect("config");
    cfg
}

struct Daemon {
    addr: SocketAddr,
    stop: CancellationToken,
    running: nasd::daemon::Running,
}

impl Daemon {
    async fn start(env: &TestEnv, name: &str) -> Daemon {
        let stop = CancellationToken::new();
        let running = nasd::daemon::start(config(env, name), stop.clone())
            .await
            .expect("daemon starts");
        Daemon {
            addr: running.api_addr.expect("api listens"),
            stop,
            running,
        }
    }

    async fn get(&self, path: &str) -> HttpResponse {
        request(self.addr, "GET", path, &[("Authorization", BEARER)], b"")
            .await
            .expect("http")
    }

    /// NAS id -> (owner, owner_epoch) as `/api/v1/nas` shows it.
    async fn owners(&self) -> BTreeMap<i64, (Option<String>, Option<i64>)> {
        let list = self.get("/api/v1/nas").await.json();
        list["nas"]
            .as_array()
            .map(|all| {
                all.iter()
                    .map(|n| {
                        (
                            n["id"].as_i64().expect("id"),
                            (
                                n["owner"].as_str().map(str::to_string),
                                n["owner_epoch"].as_i64(),
                            ),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(20), self.running.wait())
            .await
            .expect("daemon stops in time")
            .expect("daemon run");
    }
}

/// The owner rendezvous hashing gives each enabled NAS over these daemons.
fn expected(live: &[&str]) -> BTreeMap<i64, String> {
    let live: Vec<String> = live.iter().map(|s| s.to_string()).collect();
    (1..=N_NAS)
        .map(|n| (n, owner_of(n, &live).expect("owner").to_string()))
        .collect()
}

fn count(owners: &BTreeMap<i64, String>, daemon: &str) -> usize {
    owners.values().filter(|d| *d == daemon).count()
}

/// Waits until both daemons' `/api/v1/nas` name `want` as the owners (and nobody for
/// the NAS not in it).
async fn wait_owners(daemons: &[&Daemon], want: &BTreeMap<i64, String>, what: &str) {
    wait_for(Duration::from_secs(30), what, || async {
        for d in daemons {
            let got = d.owners().await;
            for id in 1..=DISABLED {
                let owner = got.get(&id).and_then(|(o, _)| o.as_deref());
                if owner != want.get(&id).map(String::as_str) {
                    return false;
                }
            }
        }
        true
    })
    .await;
}

/// The value of one series in a `/metrics` text.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Runs the real binary with a config file that points at the test database.
async fn nasd(env: &TestEnv, args: &[&str]) -> String {
    let config = env.path().join("cli.toml");
    std::fs::write(
        &config,
        format!("[database]\nurl = \"{}\"\nmax_connections = 2\n", env.url),
    )
    .expect("write cli.toml");
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_nasd"))
        .arg("--config")
        .arg(&config)
        .args(args)
        .current_dir(env.path())
        .output()
        .await
        .expect("run nasd");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "nasd {args:?}: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The rows of `nasd cluster status`, by daemon id: the line split on blanks.
fn status_rows(text: &str) -> BTreeMap<String, Vec<String>> {
    let mut lines = text.lines();
    let header = lines.next().unwrap_or_default();
    assert!(
        header.split_whitespace().collect::<Vec<_>>()
            == [
                "ID",
                "HOST",
                "PID",
                "STATE",
                "HEARTBEAT",
                "LEASE",
                "NAS",
                "VERSION",
                "API"
            ],
        "header of\n{text}"
    );
    lines
        .take_while(|l| l.starts_with("view-"))
        .map(|l| {
            let fields: Vec<String> = l.split_whitespace().map(str::to_string).collect();
            (fields[0].clone(), fields)
        })
        .collect()
}

/// Checks a `nasd cluster status` row: state, heartbeat, lease and NAS owned. The
/// fields are ID HOST PID STATE `<age> ago` `<left> left`|expired NAS VERSION API.
fn check_row(row: &[String], state: &str, alive: bool, owned: usize) {
    assert_eq!(row[3], state, "{row:?}");
    assert_eq!(row[5], "ago", "{row:?}");
    if alive {
        assert_eq!(row[7], "left", "{row:?}");
        assert_eq!(row[8], owned.to_string(), "{row:?}");
    } else {
        assert_eq!(row[6], "expired", "{row:?}");
        assert_eq!(row[7], owned.to_string(), "{row:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_view_names_the_owner_of_each_nas() {
    let env = TestEnv::new(Backend::Postgres).await;
    let script = env.script("ok.sh", "#!/bin/sh\necho ok\n");
    let store = env.store().await;
    for id in 1..=N_NAS {
        store
            .nas_upsert(&nas(id, Some(&script), None, 2))
            .await
            .expect("nas");
    }
    let mut off = nas(DISABLED, Some(&script), None, 2);
    off.enabled = false;
    store.nas_upsert(&off).await.expect("disabled nas");

    let both = expected(&[A, B]);
    let (on_a, on_b) = (count(&both, A), count(&both, B));
    assert!(
        on_a > 0 && on_b > 0,
        "the test needs NAS on both daemons: {both:?}"
    );
    let a = Daemon::start(&env, A).await;
    let b = Daemon::start(&env, B).await;
    wait_owners(&[&a, &b], &both, "both daemons showing the spread owners").await;

    // /api/v1/nas: the owner and its epoch; nobody owns the disabled NAS.
    let owners = a.owners().await;
    assert_eq!(owners, b.owners().await, "both daemons tell the same");
    for (id, owner) in &both {
        let (got, epoch) = &owners[id];
        assert_eq!(got.as_deref(), Some(owner.as_str()), "nas {id}");
        assert!(epoch.is_some_and(|e| e >= 1), "nas {id} epoch {epoch:?}");
    }
    assert_eq!(owners[&DISABLED], (None, None));
    let one = a.get("/api/v1/nas/1").await.json();
    assert_eq!(one["owner"], both[&1].as_str());

    // /api/v1/cluster: both daemons live, each with the NAS it won.
    let cluster = a.get("/api/v1/cluster").await;
    assert_eq!(cluster.status, 200, "{}", cluster.text());
    let cluster = cluster.json();
    assert_eq!(cluster["backend"], "postgres");
    assert_eq!(cluster["daemon_id"], A);
    assert_eq!(cluster["live"], 2);
    assert_eq!(cluster["unowned"], Value::Array(vec![]));
    let daemons = cluster["daemons"].as_array().expect("daemons");
    let ids: Vec<&str> = daemons.iter().filter_map(|d| d["id"].as_str()).collect();
    assert_eq!(ids, [A, B]);
    for (d, owned, this) in [(&daemons[0], on_a, true), (&daemons[1], on_b, false)] {
        assert_eq!(d["state"], "live", "{d}");
        assert_eq!(d["alive"], true, "{d}");
        assert_eq!(d["owned"], owned, "{d}");
        assert_eq!(d["this"], this, "{d}");
        assert_eq!(d["pid"], std::process::id(), "{d}");
        let age = d["heartbeat_age_seconds"].as_f64().expect("age");
        assert!((0.0..3.0).contains(&age), "heartbeat age {age} in {d}");
        assert!(
            d["lease_left_seconds"].as_f64().expect("lease") > 0.0,
            "{d}"
        );
    }

    // /status: still OK, then the cluster block naming every owner.
    let status = a.get("/status").await;
    let text = status.text();
    assert_eq!(status.status, 200, "{text}");
    assert!(text.starts_with("OK\n\n"), "{text}");
    assert!(!text.contains("warning:"), "{text}");
    assert!(
        text.contains(&format!(
            "cluster: this daemon is {A}; 2 of 2 daemon(s) live\n"
        )),
        "{text}"
    );
    for (d, owned, this) in [(A, on_a, " (this one)"), (B, on_b, "")] {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("daemon {d}{this}: host ")))
            .unwrap_or_else(|| panic!("no line for daemon {d} in\n{text}"));
        assert!(line.contains(", live, heartbeat "), "{line}");
        assert!(line.ends_with(&format!(", owns {owned} NAS")), "{line}");
    }
    for (id, owner) in &both {
        let epoch = owners[id].1.expect("epoch");
        let line = format!("nas {id} (NAS {id}, 10.20.0.{id}): owner {owner}, epoch {epoch}\n");
        assert!(text.contains(&line), "missing {line:?} in\n{text}");
    }
    assert!(
        text.contains(&format!(
            "nas {DISABLED} (NAS {DISABLED}, 10.20.0.{DISABLED}): disabled, no owner\n"
        )),
        "{text}"
    );

    // /metrics on each daemon: which NAS it owns, and the cluster's counts.
    for (d, me) in [(&a, A), (&b, B)] {
        let text = d.get("/metrics").await.text();
        for (id, owner) in &both {
            let here = metric(&text, &format!("nasd_nas_owned_here{{nas=\"{id}\"}}"));
            assert_eq!(
                here,
                Some(if owner == me { 1.0 } else { 0.0 }),
                "nas {id} on {me}:\n{text}"
            );
        }
        assert_eq!(
            metric(&text, &format!("nasd_nas_owned_here{{nas=\"{DISABLED}\"}}")),
            None,
            "a disabled NAS has no series"
        );
        assert_eq!(
            metric(&text, "nasd_cluster_daemons{state=\"live\"}"),
            Some(2.0)
        );
        assert_eq!(
            metric(&text, "nasd_cluster_daemons{state=\"lost\"}"),
            Some(0.0)
        );
        for (daemon, owned) in [(A, on_a), (B, on_b)] {
            assert_eq!(
                metric(
                    &text,
                    &format!("nasd_cluster_nas_owned{{daemon=\"{daemon}\"}}")
                ),
                Some(owned as f64),
                "{text}"
            );
        }
    }

    // The CLI against the same database: the daemons, then every owner.
    let text = nasd(&env, &["cluster", "status"]).await;
    let rows = status_rows(&text);
    assert_eq!(rows.keys().collect::<Vec<_>>(), [A, B], "{text}");
    check_row(&rows[A], "live", true, on_a);
    check_row(&rows[B], "live", true, on_b);
    assert!(
        text.ends_with(&format!("every enabled NAS ({N_NAS}) has a valid owner\n")),
        "{text}"
    );
    let json: Value =
        serde_json::from_str(&nasd(&env, &["cluster", "status", "--json"]).await).expect("json");
    assert_eq!(json["live"], 2);
    assert_eq!(json["daemon_id"], Value::Null, "the CLI is no daemon");
    let text = nasd(&env, &["nas", "list"]).await;
    assert!(
        text.lines().next().is_some_and(|h| h.ends_with(" owner")),
        "{text}"
    );
    for (id, owner) in &both {
        let epoch = owners[id].1.expect("epoch");
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("{id} ")))
            .unwrap_or_else(|| panic!("no nas {id} in\n{text}"));
        assert!(
            line.ends_with(&format!(" {owner} (epoch {epoch})")),
            "{line}"
        );
    }
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("{DISABLED} ")))
        .expect("disabled nas listed");
    assert!(line.ends_with(" no      -"), "{line}");
    let json: Value =
        serde_json::from_str(&nasd(&env, &["nas", "list", "--json"]).await).expect("json");
    assert_eq!(json[0]["owner"], both[&1].as_str());
    assert_eq!(json[0]["owner_epoch"], owners[&1].1.expect("epoch"));

    // A third daemon joins and never takes what it wins: those NAS are handed over
    // to it and then wait without an owner. Every view names them, /status warns but
    // stays OK (a handover is normal), and nobody's metrics claim them.
    join_ghost(&store).await;
    let three = expected(&[A, B, GHOST]);
    let ghost_nas: BTreeSet<i64> = three
        .iter()
        .filter(|(_, d)| *d == GHOST)
        .map(|(id, _)| *id)
        .collect();
    assert!(
        !ghost_nas.is_empty(),
        "the test needs NAS on the ghost: {three:?}"
    );
    let kept: BTreeMap<i64, String> = three
        .iter()
        .filter(|(_, d)| *d != GHOST)
        .map(|(id, d)| (*id, d.clone()))
        .collect();
    wait_owners(&[&a, &b], &kept, "the ghost's NAS released").await;
    let unowned: BTreeSet<i64> = a.get("/api/v1/cluster").await.json()["unowned"]
        .as_array()
        .expect("unowned")
        .iter()
        .filter_map(|n| n["id"].as_i64())
        .collect();
    assert_eq!(unowned, ghost_nas);
    let status = a.get("/status").await;
    let text = status.text();
    assert_eq!(status.status, 200, "{text}");
    for id in &ghost_nas {
        let warning =
            format!("warning: nas {id} (NAS {id}, 10.20.0.{id}) has no valid owner (last owner ");
        assert!(text.contains(&warning), "missing {warning:?} in\n{text}");
        let line = format!("nas {id} (NAS {id}, 10.20.0.{id}): no valid owner\n");
        assert!(text.contains(&line), "missing {line:?} in\n{text}");
    }
    let (ma, mb) = (
        a.get("/metrics").await.text(),
        b.get("/metrics").await.text(),
    );
    for id in &ghost_nas {
        let series = format!("nasd_nas_owned_here{{nas=\"{id}\"}}");
        assert_eq!(metric(&ma, &series), Some(0.0), "{series} on {A}");
        assert_eq!(metric(&mb, &series), Some(0.0), "{series} on {B}");
    }
    assert_eq!(
        metric(&ma, "nasd_cluster_daemons{state=\"live\"}"),
        Some(3.0)
    );
    assert_eq!(
        metric(
            &ma,
            &format!("nasd_cluster_nas_owned{{daemon=\"{GHOST}\"}}")
        ),
        Some(0.0)
    );
    let text = nasd(&env, &["cluster", "status"]).await;
    let rows = status_rows(&text);
    check_row(&rows[GHOST], "live", true, 0);
    let names: Vec<String> = ghost_nas
        .iter()
        .map(|id| format!("{id} (NAS {id}, 10.20.0.{id})"))
        .collect();
    assert!(
        text.ends_with(&format!(
            "{} of {N_NAS} enabled NAS without a valid owner (their events wait): {}\n",
            ghost_nas.len(),
            names.join(", ")
        )),
        "{text}"
    );

    // The ghost's lease runs out: the two daemons take its NAS back, and the metrics
    // count it as lost at once.
    expire(&store, GHOST).await;
    wait_owners(&[&a, &b], &both, "the ghost's NAS taken back").await;
    let text = a.get("/metrics").await.text();
    assert_eq!(
        metric(&text, "nasd_cluster_daemons{state=\"live\"}"),
        Some(2.0)
    );
    assert_eq!(
        metric(&text, "nasd_cluster_daemons{state=\"lost\"}"),
        Some(1.0)
    );
    assert!(!a.get("/status").await.text().contains("warning:"));

    // Both daemons leave: the CLI shows them left, with nothing owned, and names every
    // enabled NAS as waiting.
    a.stop().await;
    b.stop().await;
    let text = nasd(&env, &["cluster", "status"]).await;
    let rows = status_rows(&text);
    check_row(&rows[A], "left", false, 0);
    check_row(&rows[B], "left", false, 0);
    assert!(
        text.contains(&format!(
            "{N_NAS} of {N_NAS} enabled NAS without a valid owner (their events wait): 1 (NAS 1, 10.20.0.1), "
        )),
        "{text}"
    );
    let text = nasd(&env, &["nas", "list"]).await;
    assert!(
        text.lines().skip(1).all(|l| l.ends_with(" -")),
        "no owner once every daemon left:\n{text}"
    );
}

/// A daemon row with a long lease that never heartbeats nor takes anything.
async fn join_ghost(store: &Store) {
    store
        .cluster_join(
            GHOST,
            4242,
            None,
            "ghost-host",
            1,
            None,
            Duration::from_secs(120),
        )
        .await
        .expect("ghost joins");
}

/// Ends a daemon's lease now, as if it had stopped renewing it (the call a daemon makes
/// for a dead daemon of its own host).
async fn expire(store: &Store, id: &str) {
    let ended = store
        .cluster_expire(&[id.to_string()])
        .await
        .expect("expire lease");
    assert_eq!(ended, vec![id.to_string()], "lease of {id} ended");
}
