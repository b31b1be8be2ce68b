//! A private PgBouncer (Debian's `pgbouncer`, installed by scripts/test-setup.sh) on a
//! free loopback port, in front of the tests' PostgreSQL on 127.0.0.1:5432 (trust, user
//! postgres) for one database. Started per test, killed when dropped.

use std::io::Read;
use std::net::TcpListener;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use sqlx::{Connection, Executor};

/// PgBouncer's `pool_mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolMode {
    /// A server connection per client connection, for the client's whole session.
    Session,
    /// A server connection per transaction (or per statement outside one).
    Transaction,
}

impl PoolMode {
    fn name(self) -> &'static str {
        match self {
            PoolMode::Session => "session",
            PoolMode::Transaction => "transaction",
        }
    }
}

pub struct PgBouncer {
    pub port: u16,
    pub database: String,
    child: Option<Child>,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Debian installs it in /usr/sbin, which is not on every user's PATH.
fn binary() -> &'static str {
    if std::path::Path::new("/usr/sbin/pgbouncer").exists() {
        "/usr/sbin/pgbouncer"
    } else {
        "pgbouncer"
    }
}

/// `pgbouncer --version` as (major, minor), e.g. (1, 18) on Debian 12.
pub fn version() -> (u32, u32) {
    let out = Command::new(binary())
        .arg("--version")
        .output()
        .expect("pgbouncer (Debian's package; bash scripts/test-setup.sh)");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let number = text
        .split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("pgbouncer --version said {text:?}"));
    let mut parts = number.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

fn running_as_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

impl PgBouncer {
    /// Starts PgBouncer for `database` in `mode` with at most `pool_size` server
    /// connections, and waits until a client gets an answer through it.
    pub async fn start(database: &str, mode: PoolMode, pool_size: u32) -> PgBouncer {
        let dir = tempfile::tempdir().expect("temp dir");
        // PgBouncer refuses to run as root; then it runs as `postgres`, which must
        // read its config and user list.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod the pgbouncer dir");
        let users = dir.path().join("users.txt");
        // auth_type = trust still wants the user listed; the password is not checked.
        std::fs::write(&users, "\"postgres\" \"\"\n").expect("write users.txt");
        let port = free_port();
        // PgBouncer 1.21 and later can carry prepared statements across server
        // connections; 0 turns that off, so these tests see what an older PgBouncer
        // (or one left at its old default) does. Before 1.21 the key does not exist
        // and would be refused.
        let prepared = if version() >= (1, 21) {
            "max_prepared_statements = 0\n"
        } else {
            ""
        };
        let config = dir.path().join("pgbouncer.ini");
        std::fs::write(
            &config,
            format!(
                "[databases]\n\
                 {database} = host=127.0.0.1 port=5432 dbname={database}\n\
                 [pgbouncer]\n\
                 listen_addr = 127.0.0.1\n\
                 listen_port = {port}\n\
                 unix_socket_dir =\n\
                 auth_type = trust\n\
                 auth_file = {users}\n\
                 pool_mode = {mode}\n\
                 default_pool_size = {pool_size}\n\
                 max_client_conn = 200\n\
                 {prepared}\
                 ignore_startup_parameters = extra_float_digits\n",
                users = users.display(),
                mode = mode.name(),
            ),
        )
        .expect("write pgbouncer.ini");
        for file in [&users, &config] {
            std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o644))
                .expect("chmod a pgbouncer file");
        }
        // Its log goes to stderr, into a file this process opened (so the user it runs
        // as needs no write access anywhere).
        let log = dir.path().join("pgbouncer.log");
        let stderr = std::fs::File::create(&log).expect("create the pgbouncer log");
        let mut command = Command::new(binary());
        if running_as_root() {
            command.arg("-u").arg("postgres");
        }
        let child = command
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start pgbouncer (bash scripts/test-setup.sh installs it)");
        let mut bouncer = PgBouncer {
            port,
            database: database.to_string(),
            child: Some(child),
            log,
            _dir: dir,
        };
        bouncer.wait_ready().await;
        bouncer
    }

    /// The URL a client uses to reach `database` through PgBouncer.
    pub fn url(&self) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/{}",
            self.port, self.database
        )
    }

    /// What PgBouncer wrote so far (its log on stderr).
    pub fn log(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut text);
        }
        text
    }

    async fn wait_ready(&mut self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!("pgbouncer exited with {status}:\n{}", self.log());
            }
            // A bare string is a simple query: no prepared statement, so this works in
            // every pool mode.
            let answered = match sqlx::PgConnection::connect(&self.url()).await {
                Ok(mut conn) => conn.execute("SELECT 1").await.is_ok(),
                Err(_) => false,
            };
            if answered {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "pgbouncer on port {} did not answer within 15s:\n{}",
                self.port,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
