//! The journal on a real full filesystem: a 2 MB tmpfs filled to the last byte. Each log
//! file is warned about once (not once per flush), the dropped lines are counted, the
//! daemon keeps delivering with `/status` still `OK` plus a warning and `/metrics`
//! counting, and once space is back the files write again and the daemon log says which
//! files failed, since when and how many lines were lost.
//!
//! Needs `mount` (root, or CAP_SYS_ADMIN): without it the tests fail saying so.

mod common;

use std::fs::{self, File};
use std::io::{self, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use common::{Backend, TestEnv, add_accounts, event, nas, wait_for, wait_history};
use nasd::config::ApiConfig;
use nasd::journal::{AccountTarget, Attempt, Journal, NasTarget, format_attempt};
use nasd::tools::http_client::request;
use tokio_util::sync::CancellationToken;

/// A tmpfs of its own, unmounted (and its directory removed) when dropped.
struct Tmpfs {
    /// Holds the mount point; removed after the unmount.
    dir: Option<tempfile::TempDir>,
    mnt: PathBuf,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().expect("temp dir");
        let mnt = dir.path().join("mnt");
        fs::create_dir(&mnt).expect("mount point");
        let how = format!("mount -t tmpfs -o size={size} tmpfs {}", mnt.display());
        match Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&mnt)
            .output()
        {
            Ok(out) if out.status.success() => {}
            Ok(out) => panic!(
                "this test needs a real full filesystem, but `{how}` failed ({}): {}; \
                 run it as root (or with CAP_SYS_ADMIN) where mounting is allowed",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Err(err) => {
                panic!("this test needs a real full filesystem, but `{how}` cannot run: {err}")
            }
        }
        Tmpfs {
            dir: Some(dir),
            mnt,
        }
    }

    fn path(&self) -> &Path {
        &self.mnt
    }

    /// Writes a file until the filesystem is full; returns its path (delete it to give
    /// the space back).
    fn fill(&self) -> PathBuf {
        let path = self.mnt.join("filler");
        let mut file = File::create(&path).expect("create the filler");
        let chunk = vec![0x55u8; 64 << 10];
        loop {
            match file.write(&chunk) {
                Ok(0) => break,
                Ok(_) => {}
                Err(err) if err.kind() == io::ErrorKind::StorageFull => break,
                Err(err) => panic!("filling {}: {err}", self.mnt.display()),
            }
        }
        let probe = self.mnt.join("probe");
        let wrote = fs::write(&probe, b"x");
        let _ = fs::remove_file(&probe);
        assert!(wrote.is_err(), "{} is not full", self.mnt.display());
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let unmounted = Command::new("umount")
            .arg(&self.mnt)
            .status()
            .is_ok_and(|s| s.success());
        if !unmounted {
            // Still busy (a file left open by a failing test): detach it now, the
            // kernel frees it when the last file closes.
            let lazy = Command::new("umount").arg("-l").arg(&self.mnt).status();
            if !lazy.is_ok_and(|s| s.success()) {
                eprintln!("could not unmount {}", self.mnt.display());
                // Never remove files under a mount point that is still mounted.
                std::mem::forget(self.dir.take());
            }
        }
    }
}

/// Everything `tracing` prints in this test binary (the journal's writer thread is
/// not the test's thread, so the subscriber is the global one).
fn traced() -> &'static Arc<Mutex<Vec<u8>>> {
    static TEXT: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    TEXT.get_or_init(|| {
        #[derive(Clone)]
        struct Sink(Arc<Mutex<Vec<u8>>>);
        impl Write for Sink {
            fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
                self.0
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend_from_slice(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let text = Arc::new(Mutex::new(Vec::new()));
        let sink = Sink(text.clone());
        tracing_subscriber::fmt()
            .with_writer(move || sink.clone())
            .with_ansi(false)
            .try_init()
            .expect("the first subscriber of this binary");
        text
    })
}

/// The traced lines about `path` that contain `needle`.
fn traced_about(path: &Path, needle: &str) -> Vec<String> {
    let field = format!("path={}", path.display());
    let text = traced().lock().unwrap_or_else(|p| p.into_inner()).clone();
    String::from_utf8_lossy(&text)
        .lines()
        .filter(|l| l.contains(needle) && l.split_whitespace().any(|w| w == field))
        .map(str::to_owned)
        .collect()
}

fn attempt(event_id: i64) -> Attempt {
    Attempt {
        event_id,
        cmd: "user_add".into(),
        try_count: 1,
        commands: vec!["/ip firewall address-list add list=allow address=10.0.0.2".into()],
        answer: "ok".into(),
        outcome: "done".into(),
        duration: Duration::from_millis(7),
    }
}

/// The entries of the recovery report in the daemon log that name `path`, each as
/// `PATH from T1 to T2 (N line(s) dropped; ERROR)`.
fn reported(daemon_log: &str, path: &Path) -> Vec<String> {
    const REPORT: &str = "journal: log files could not be written, lines were dropped";
    let mut found = Vec::new();
    for line in daemon_log.lines().filter(|l| l.contains(REPORT)) {
        // An entry starts after the report's colon or after the previous entry.
        for before in [": ", "); "] {
            let needle = format!("{before}{} from ", path.display());
            let mut rest = line;
            while let Some(i) = rest.find(&needle) {
                let tail = &rest[i + before.len()..];
                let end = tail.find("); /").map_or(tail.len(), |e| e + 1);
                found.push(tail[..end].to_owned());
                rest = &tail[end..];
            }
        }
    }
    found
}

#[test]
fn a_full_disk_warns_once_per_file_counts_the_lines_and_reports_the_recovery() {
    traced();
    let disk = Tmpfs::mount("2m");
    let journal = Journal::open(&disk.path().join("log")).expect("journal");
    let core = NasTarget {
        id: 1,
        name: "Core".into(),
        ip: "10.0.0.1".into(),
    };
    let accounts: Vec<AccountTarget> = (1..=3)
        .map(|user_id| AccountTarget {
            abonent_id: Some(1000 + user_id),
            user_id,
        })
        .collect();
    let daemon_log = journal.daemon_log_path();
    let nas_log = journal.nas_log_path(&core);
    let account_logs: Vec<PathBuf> = accounts
        .iter()
        .map(|a| journal.account_log_path(a))
        .collect();
    let mut files = vec![daemon_log.clone(), nas_log.clone()];
    files.extend(account_logs.iter().cloned());
    let per_attempt = format_attempt(&core, &accounts[0], &attempt(0)).len() as u64;

    let filler = disk.fill();
    // One flush per round, as a daemon under steady load does: the flood came from
    // every flush warning again.
    const ROUNDS: u64 = 200;
    let mut sent = 0;
    let mut halfway = 0;
    for round in 0..ROUNDS {
        journal.daemon(&format!("round {round}"));
        sent += 1;
        for account in &accounts {
            journal.attempt(&core, account, &attempt(round as i64));
            sent += 2 * per_attempt;
        }
        journal.flush();
        if round == ROUNDS / 2 {
            halfway = journal.health().status(0).lines_dropped_total;
            assert!(halfway > 0, "no line dropped on a full disk");
        }
    }
    let status = journal.health().status(10);
    // The disk was full from the first line on: every line was dropped and counted.
    assert!(status.lines_dropped_total > halfway);
    assert_eq!(status.lines_dropped_total, sent);
    assert_eq!(status.files_failing, files.len(), "{status:?}");
    assert_eq!(status.dropped_failing, sent);
    for path in &files {
        let warned = traced_about(path, "journal: cannot ");
        assert_eq!(warned.len(), 1, "{}: {warned:#?}", path.display());
        assert!(
            warned[0].contains("No space left on device"),
            "{}",
            warned[0]
        );
        assert_eq!(fs::metadata(path).map_or(0, |m| m.len()), 0);
    }
    let failing: Vec<&Path> = status.failing.iter().map(|f| f.path.as_path()).collect();
    for path in &files {
        assert!(failing.contains(&path.as_path()), "{}", path.display());
    }

    // Space is back: the next lines are written, each file says once that it writes
    // again, and the daemon log names every file with its dropped lines.
    fs::remove_file(&filler).expect("free the space");
    for (i, account) in accounts.iter().enumerate() {
        journal.attempt(&core, account, &attempt(1000 + i as i64));
    }
    journal.daemon("space is back");
    journal.flush();
    let nas_lines = fs::read_to_string(&nas_log).expect("NAS log");
    assert_eq!(nas_lines.lines().count() as u64, 3 * per_attempt);
    for path in &account_logs {
        let lines = fs::read_to_string(path).expect("account log");
        assert_eq!(
            lines.lines().count() as u64,
            per_attempt,
            "{}",
            path.display()
        );
    }
    let status = journal.health().status(10);
    assert_eq!(status.files_failing, 0, "{status:?}");
    assert_eq!(status.lines_dropped_total, sent);
    let text = fs::read_to_string(&daemon_log).expect("daemon log");
    assert!(text.contains("space is back"), "{text}");
    let want = [
        (&daemon_log, ROUNDS),
        (&nas_log, ROUNDS * 3 * per_attempt),
        (&account_logs[0], ROUNDS * per_attempt),
        (&account_logs[1], ROUNDS * per_attempt),
        (&account_logs[2], ROUNDS * per_attempt),
    ];
    for (path, dropped) in want {
        let parts = reported(&text, path);
        assert_eq!(parts.len(), 1, "{}: {text}", path.display());
        assert!(
            parts[0].contains(&format!(
                "({dropped} line(s) dropped; write: No space left on device (os error 28))"
            )),
            "{}: {}",
            path.display(),
            parts[0]
        );
        let back = traced_about(path, "journal: log file can be written again");
        assert_eq!(back.len(), 1, "{}: {back:#?}", path.display());
        assert!(
            back[0].contains(&format!("{dropped} line(s) were dropped since")),
            "{}",
            back[0]
        );
    }
    // Every line of the daemon log is whole (nothing torn by the full disk).
    for line in text.lines() {
        assert!(line.contains("nas_event_daemon["), "{line:?}");
    }
    drop(journal);
}

async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let r = request(addr, "GET", path, &[], b"").await.expect("http");
    (r.status, r.text())
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_delivers_on_a_full_disk_and_says_so_without_failing_the_status() {
    traced();
    let disk = Tmpfs::mount("2m");
    let env = TestEnv::new(Backend::Sqlite).await;
    let store = env.store().await;
    let script = env.script("ok.sh", "#!/bin/sh\necho \"ok $1\"\n");
    store
        .nas_upsert(&nas(1, Some(&script), None, 2))
        .await
        .expect("nas");
    add_accounts(&store, 3, &[1]).await;
    let log_dir = disk.path().join("log");
    let mut cfg = env.config();
    cfg.daemon.log_dir = log_dir.clone();
    cfg.api = Some(ApiConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        ..ApiConfig::default()
    });
    let token = CancellationToken::new();
    let running = nasd::daemon::start(cfg, token.clone())
        .await
        .expect("daemon starts");
    let addr = running.api_addr.expect("api listens");

    let filler = disk.fill();
    let events: Vec<_> = (1..=3).map(|u| event("user_add", u)).collect();
    store.enqueue_compact(&events).await.expect("enqueue");
    // Delivery goes on.
    wait_history(&store, 3, Duration::from_secs(30)).await;
    wait_for(
        Duration::from_secs(10),
        "a journal warning in /status",
        || async { get(addr, "/status").await.1.contains("warning: journal: ") },
    )
    .await;
    let (code, status) = get(addr, "/status").await;
    assert_eq!(code, 200, "{status}");
    assert!(status.starts_with("OK\n"), "{status}");
    let warning = status
        .lines()
        .find(|l| l.starts_with("warning: journal: "))
        .expect("journal warning");
    let nas_log = log_dir.join("nas_event_daemon/NAS_1_10.20.0.1.log");
    assert!(
        warning.contains(&format!("{} since ", nas_log.display())),
        "{warning}"
    );
    assert!(warning.contains("No space left on device"), "{warning}");
    let (_, metrics) = get(addr, "/metrics").await;
    assert!(metric(&metrics, "nasd_journal_lines_dropped_total") > 0);
    // The NAS log and the three account logs at least.
    assert!(
        metric(&metrics, "nasd_journal_files_failing") >= 4,
        "{metrics}"
    );

    // Space is back: the same accounts get events again, every log writes again and
    // the warning goes away.
    fs::remove_file(&filler).expect("free the space");
    store.enqueue_compact(&events).await.expect("enqueue");
    wait_history(&store, 6, Duration::from_secs(30)).await;
    wait_for(
        Duration::from_secs(10),
        "every log file written again",
        || async { metric(&get(addr, "/metrics").await.1, "nasd_journal_files_failing") == 0 },
    )
    .await;
    let (code, status) = get(addr, "/status").await;
    assert_eq!(code, 200, "{status}");
    assert!(!status.contains("warning: journal: "), "{status}");
    let text = fs::read_to_string(log_dir.join("nas_event_daemon.log")).expect("daemon log");
    assert_eq!(reported(&text, &nas_log).len(), 1, "{text}");
    assert!(
        fs::read_to_string(&nas_log)
            .expect("NAS log")
            .contains("outcome: done")
    );
    assert_eq!(traced_about(&nas_log, "journal: cannot ").len(), 1);

    token.cancel();
    tokio::time::timeout(Duration::from_secs(20), running.wait())
        .await
        .expect("daemon stops in time")
        .expect("daemon run");
}
