//! The log files through the running daemon: `[log] format = "json"` lines as Filebeat
//! would read them, and size rotation with gzip of an account log.

#[macro_use]
mod common;

use std::io::Read;
use std::path::Path;
use std::time::Duration;

use common::{Backend, TestEnv, add_accounts, event, nas, wait_history};
use nasd::journal::LogFormat;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// Every line of a log file, parsed; fails on a line that is not a JSON object.
fn json_lines(text: &str, what: &str) -> Vec<Value> {
    assert!(
        text.is_empty() || text.ends_with('\n'),
        "{what}: unterminated"
    );
    text.lines()
        .map(|line| {
            let v: Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("{what}: {line:?}: {e}"));
            assert!(v.is_object(), "{what}: {line}");
            v
        })
        .collect()
}

fn gunzip(path: &Path) -> String {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut text = String::new();
    flate2::read::GzDecoder::new(file)
        .read_to_string(&mut text)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_lines_carry_the_attempt_and_account_logs_rotate_with_gzip() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let store = env.store().await;
    let script = env.script(
        "session.sh",
        "#!/bin/sh\n\
         if [ \"$1\" = user_drop ]; then echo 'no such queue'; exit 3; fi\n\
         echo \"ok: $1 $ip\"\necho second line\n",
    );
    store
        .nas_upsert(&nas(1, Some(&script), None, 4))
        .await
        .unwrap();
    add_accounts(&store, 3, &[1]).await;
    // Account 1 gets enough events for its log to pass 1KB several times over.
    let mut events = vec![event("user_rate_set", 2), event("user_drop", 3)];
    events.extend((0..12).map(|_| event("user_add", 1)));
    let n = events.len() as i64;
    store.enqueue_compact(&events).await.unwrap();

    let mut cfg = env.config();
    cfg.log.format = LogFormat::Json;
    cfg.log.account_max_size = 1024;
    cfg.log.backups = 3;
    cfg.log.gzip = true;
    let token = CancellationToken::new();
    let handle = tokio::spawn(nasd::daemon::run(cfg, token.clone()));
    wait_history(&store, n, Duration::from_secs(30)).await;
    token.cancel();
    // `run` returns after the journal is flushed (and rotated files compressed).
    handle.await.expect("daemon task").expect("daemon run");

    let history = store.history(None, 100).await.unwrap();
    let event_id_of = |cmd: &str| {
        history
            .iter()
            .find(|h| h.cmd == cmd)
            .and_then(|h| h.event_id)
            .unwrap_or_else(|| panic!("no {cmd} in history"))
    };

    // One done attempt, as Filebeat sees it in the account log.
    let lines = json_lines(&env.read("log/abonents/1002/event_2.log"), "event_2.log");
    assert_eq!(lines.len(), 1);
    let v = &lines[0];
    chrono::DateTime::parse_from_rfc3339(v["ts"].as_str().unwrap()).expect("ts is RFC 3339");
    for (field, want) in [
        ("kind", Value::from("attempt")),
        ("level", "info".into()),
        ("nas_id", 1.into()),
        ("nas_name", "NAS 1".into()),
        ("nas_ip", "10.20.0.1".into()),
        ("abonent_id", 1002.into()),
        ("user_id", 2.into()),
        ("event_id", event_id_of("user_rate_set").into()),
        ("cmd", "user_rate_set".into()),
        ("try", 1.into()),
        ("outcome", "done".into()),
        ("error", Value::Null),
        ("outcome_text", "done".into()),
        ("answer", "ok: user_rate_set 10.88.0.3\nsecond line".into()),
    ] {
        assert_eq!(v[field], want, "{field} in {v}");
    }
    assert!(v["duration_ms"].is_u64(), "{v}");
    let command = v["commands"][0].as_str().unwrap();
    assert!(command.ends_with("session.sh user_rate_set"), "{command}");
    assert!(command.contains("ip=10.88.0.3"), "{command}");
    let message = v["message"].as_str().unwrap();
    assert!(
        message.contains("user_id=2 cmd=user_rate_set try=1 outcome: done (")
            && message.ends_with(" ms)"),
        "{message}"
    );

    // A failure carries its reason apart.
    let failed = &json_lines(&env.read("log/abonents/1003/event_3.log"), "event_3.log")[0];
    assert_eq!(failed["outcome"], "failed");
    assert_eq!(failed["level"], "error");
    assert_eq!(failed["error"], "exit 3");
    assert_eq!(failed["answer"], "no such queue");

    // The NAS log has every attempt; the daemon log is JSON too.
    let nas_lines = json_lines(
        &env.read("log/nas_event_daemon/NAS_1_10.20.0.1.log"),
        "NAS log",
    );
    assert_eq!(nas_lines.len() as i64, n);
    let daemon = json_lines(&env.read("log/nas_event_daemon.log"), "daemon log");
    assert!(daemon.iter().all(|d| d["kind"] == "daemon"));
    assert!(
        daemon.iter().any(|d| d["message"]
            .as_str()
            .unwrap()
            .starts_with("Start work with nas nasid=1 nas_ip=10.20.0.1")),
        "{daemon:?}"
    );

    // Account 1's log rotated: backups oldest first, then the live file, are whole JSON
    // lines for its user_add events in order, ending with the last one.
    let live = env.log_dir().join("abonents/1001/event_1.log");
    let mut ids = Vec::new();
    let mut backups = 0;
    for k in (1..=3).rev() {
        let gz = live.with_file_name(format!("event_1.log.{k}.gz"));
        assert!(
            !live.with_file_name(format!("event_1.log.{k}")).exists(),
            "uncompressed backup {k} left"
        );
        if gz.exists() {
            backups += 1;
            let text = gunzip(&gz);
            assert!(text.len() <= 1024, "{}: {} bytes", gz.display(), text.len());
            ids.extend(
                json_lines(&text, &gz.display().to_string())
                    .iter()
                    .map(|v| v["event_id"].as_i64().unwrap()),
            );
        }
    }
    assert!(
        !live.with_file_name("event_1.log.4.gz").exists(),
        "only 3 backups are kept"
    );
    assert_eq!(
        backups, 3,
        "12 attempts of ~450 bytes fill more than 4 files of 1KB"
    );
    let live_text = std::fs::read_to_string(&live).unwrap();
    assert!(live_text.len() <= 1024);
    ids.extend(
        json_lines(&live_text, "event_1.log")
            .iter()
            .map(|v| v["event_id"].as_i64().unwrap()),
    );
    let mut user1: Vec<i64> = history
        .iter()
        .filter(|h| h.user_id == 1)
        .filter_map(|h| h.event_id)
        .collect();
    user1.sort();
    assert!(ids.len() >= 4 && ids.len() < user1.len(), "{ids:?}");
    assert_eq!(
        ids,
        user1[user1.len() - ids.len()..],
        "newest attempts, in order"
    );

    // Nothing secret anywhere.
    let all = [
        env.read("log/nas_event_daemon.log"),
        env.read("log/nas_event_daemon/NAS_1_10.20.0.1.log"),
        live_text,
    ]
    .concat();
    assert!(!all.contains("nas-password-do-not-log"));
}
