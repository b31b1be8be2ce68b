//! SQLite is one daemon: a second `nasd run` on the same SQLite file is refused at start,
//! naming the database, the running daemon's pid and PostgreSQL, while the first keeps
//! running; and the lock belongs to the live daemon alone: once it has stopped, a new
//! one starts, in another process or in the same one, even while a child forked before
//! the stop still holds copies of the daemon's file descriptors.

mod common;

use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::{Backend, TestEnv};
use tokio::net::UnixDatagram;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

/// Generous bounds against a hung test, not measurements.
const START: Duration = Duration::from_secs(30);
const EXIT: Duration = Duration::from_secs(20);

fn write_config(env: &TestEnv) -> PathBuf {
    let config = env.path().join("nasd.toml");
    std::fs::write(
        &config,
        format!(
            "[database]\nurl = \"{}\"\n[daemon]\nlog_dir = \"{}\"\nschemes_dir = \"{}\"\n\
             resync_interval = \"300ms\"\npoll_interval = \"50ms\"\n",
            env.url,
            env.log_dir().display(),
            env.schemes_dir().display()
        ),
    )
    .expect("write nasd.toml");
    config
}

/// A `nasd run` of the real binary; it says READY=1 on its own notify socket once it
/// serves, and its stderr goes to a file that failures print.
struct Daemon {
    child: Child,
    notify: UnixDatagram,
    stderr: PathBuf,
}

impl Daemon {
    fn spawn(env: &TestEnv, config: &Path, name: &str) -> Daemon {
        let socket = env.path().join(format!("{name}.notify"));
        let notify = UnixDatagram::bind(&socket).expect("bind the notify socket");
        let stderr = env.path().join(format!("{name}.stderr"));
        let child = Command::new(env!("CARGO_BIN_EXE_nasd"))
            .arg("--config")
            .arg(config)
            .arg("run")
            .env("NOTIFY_SOCKET", &socket)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).expect("stderr file"))
            .kill_on_drop(true)
            .spawn()
            .expect("start nasd run");
        Daemon {
            child,
            notify,
            stderr,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id().expect("nasd run is still running")
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits for READY=1; a daemon that exits first fails the test with its stderr.
    async fn ready(&mut self) {
        let mut buf = [0u8; 512];
        let waiting = async {
            loop {
                tokio::select! {
                    got = self.notify.recv(&mut buf) => {
                        let n = got.expect("read the notify socket");
                        if String::from_utf8_lossy(&buf[..n]).lines().any(|l| l == "READY=1") {
                            return;
                        }
                    }
                    status = self.child.wait() => {
                        panic!("nasd run exited before READY=1 ({status:?}): {}", self.stderr());
                    }
                }
            }
        };
        tokio::time::timeout(START, waiting)
            .await
            .unwrap_or_else(|_| panic!("no READY=1 within {START:?}: {}", self.stderr()));
    }

    /// SIGTERM, then a clean exit.
    async fn stop(mut self) {
        let pid = self.pid().to_string();
        let sent = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .await
            .expect("run kill");
        assert!(sent.success(), "kill -TERM {pid}");
        let status = tokio::time::timeout(EXIT, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("nasd run {pid} did not stop within {EXIT:?}"))
            .expect("wait for nasd run");
        assert!(status.success(), "{status:?}: {}", self.stderr());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_nasd_run_on_one_sqlite_file_is_refused_until_the_first_stops() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let config = write_config(&env);
    let mut first = Daemon::spawn(&env, &config, "first");
    first.ready().await;

    let second = tokio::time::timeout(
        EXIT,
        Command::new(env!("CARGO_BIN_EXE_nasd"))
            .arg("--config")
            .arg(&config)
            .arg("run")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the second nasd run exits at once")
    .expect("run the second nasd run");
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "{stderr}");
    let database = env.path().join("nasd.db").canonicalize().expect("nasd.db");
    for needle in [
        format!(
            "nasd: database {} is in use by another `nasd run` (pid {}, lock {}.daemon.lock)",
            env.path().join("nasd.db").display(),
            first.pid(),
            database.display()
        ),
        "one SQLite database serves one daemon".to_string(),
        "PostgreSQL ([database] url = \"postgres://...\")".to_string(),
    ] {
        assert!(stderr.contains(&needle), "missing `{needle}` in {stderr}");
    }
    assert!(
        first.child.try_wait().expect("poll the first").is_none(),
        "the first daemon keeps running: {}",
        first.stderr()
    );

    first.stop().await;
    let mut third = Daemon::spawn(&env, &config, "third");
    third.ready().await;
    third.stop().await;
}

/// A child forked by another thread while a daemon runs, parked between its fork and
/// its exec until released: it holds copies of every descriptor the process had at the
/// fork, the daemon's lock file among them. In the fresh-clone CI the children were
/// other tests' scripts (posix_spawn copies the table the same way, for a shorter
/// while) and the flock of the first version stayed held by such a copy after its
/// daemon had stopped; parking the child holds that window open instead of hoping to
/// hit it.
struct ParkedChild {
    /// Dropping it ends the child's wait: it then execs `true` and exits.
    release: std::io::PipeWriter,
    spawner: std::thread::JoinHandle<std::io::Result<std::process::ExitStatus>>,
}

impl ParkedChild {
    /// Returns once the child exists (blocking: call it from `spawn_blocking`).
    fn fork() -> ParkedChild {
        let (mut forked, forked_writer) = std::io::pipe().expect("pipe");
        let (release_reader, release) = std::io::pipe().expect("pipe");
        let forked_fd = forked_writer.as_raw_fd();
        let release_fd = release_reader.as_raw_fd();
        let release_writer_fd = release.as_raw_fd();
        let spawner = std::thread::spawn(move || {
            let mut command = std::process::Command::new("true");
            // SAFETY: the closure runs in the forked child before exec and makes only
            // close, write and read calls, which are async-signal-safe.
            unsafe {
                command.pre_exec(move || {
                    // Its own copy of the write end would keep it waiting for ever.
                    libc::close(release_writer_fd);
                    libc::write(forked_fd, b"f".as_ptr().cast(), 1);
                    let mut byte = 0u8;
                    libc::read(release_fd, (&raw mut byte).cast(), 1);
                    Ok(())
                });
            }
            // Returns once the child has exec'd, i.e. after `release` is dropped.
            let status = command.status();
            drop((forked_writer, release_reader));
            status
        });
        let mut byte = [0u8; 1];
        forked
            .read_exact(&mut byte)
            .expect("the parked child was forked");
        ParkedChild { release, spawner }
    }

    /// Lets the child exec and waits for it (blocking: call it from `spawn_blocking`).
    fn release(self) {
        drop(self.release);
        let status = self
            .spawner
            .join()
            .expect("spawner thread")
            .expect("the parked child ran");
        assert!(status.success(), "{status:?}");
    }
}

/// The fresh-clone CI failure of tests/api.rs: a daemon started, stopped and awaited in
/// this process, then started again on the same file, was refused because a child
/// forked by another thread still held the lock. The lock must belong to the live
/// daemon alone, for a daemon of this process as for one of another process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_forked_while_a_daemon_ran_does_not_keep_its_lock() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let stop = CancellationToken::new();
    let first = nasd::daemon::start(env.config(), stop.clone())
        .await
        .expect("the first daemon starts");
    let parked = tokio::task::spawn_blocking(ParkedChild::fork)
        .await
        .expect("fork the parked child");
    stop.cancel();
    tokio::time::timeout(EXIT, first.wait())
        .await
        .expect("the first daemon stops in time")
        .expect("the first daemon stops");

    let stop = CancellationToken::new();
    let again = nasd::daemon::start(env.config(), stop.clone())
        .await
        .expect("a daemon starts again in this process while the forked child lives");
    stop.cancel();
    tokio::time::timeout(EXIT, again.wait())
        .await
        .expect("the second daemon stops in time")
        .expect("the second daemon stops");

    let config = write_config(&env);
    let mut other = Daemon::spawn(&env, &config, "other");
    other.ready().await;
    other.stop().await;

    tokio::task::spawn_blocking(|| parked.release())
        .await
        .expect("release the parked child");
}
