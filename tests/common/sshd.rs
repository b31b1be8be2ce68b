//! A real OpenSSH sshd on a loopback port, started per test, whose ForceCommand records
//! every command it receives (one line each, with the client's source port) and answers
//! like RouterOS. Killed when dropped.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The account the tests log in as (made by scripts/test-setup.sh): its shell is
/// /bin/sh, so no login script of root's runs before each recorded command.
pub const USER: &str = "nasdpeer";

pub struct Sshd {
    pub port: u16,
    pub dir: PathBuf,
    pub record: PathBuf,
    pub client_key: PathBuf,
    child: Option<Child>,
    config: PathBuf,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn keygen(path: &Path) {
    let _ = std::fs::remove_file(path);
    let _ = std::fs::remove_file(path.with_extension("pub"));
    let status = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(path)
        .status()
        .expect("ssh-keygen (openssh-client; bash scripts/test-setup.sh)");
    assert!(status.success());
}

impl Sshd {
    /// Starts sshd in `dir` (created). `latency` is added to each command by the recorder.
    pub fn start(dir: &Path, latency: &str) -> Sshd {
        std::fs::create_dir_all(dir).expect("sshd dir");
        // The login user must reach the recorder and write its record.
        use std::os::unix::fs::PermissionsExt;
        if let Some(parent) = dir.parent() {
            let _ = std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o755));
        }
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).expect("chmod dir");
        let host_key = dir.join("host_key");
        keygen(&host_key);
        let client_key = dir.join("client_key");
        keygen(&client_key);
        std::fs::copy(
            client_key.with_extension("pub"),
            dir.join("authorized_keys"),
        )
        .expect("authorized_keys");
        let record = dir.join("record.log");
        std::fs::write(&record, "").expect("record file");
        std::fs::set_permissions(&record, std::fs::Permissions::from_mode(0o666))
            .expect("chmod record");
        let recorder = dir.join("recorder.sh");
        std::fs::write(
            &recorder,
            format!(
                "#!/bin/sh\n\
                 port=$(echo \"$SSH_CLIENT\" | cut -d' ' -f2)\n\
                 printf '%s %s\\n' \"$port\" \"$SSH_ORIGINAL_COMMAND\" >> {record}\n\
                 if [ -e {dir}/hold ]; then : > {dir}/held.$$; while [ -e {dir}/hold ]; do sleep 0.02; done; fi\n\
                 {sleep}\n\
                 case \"$SSH_ORIGINAL_COMMAND\" in\n\
                   *dup*) echo 'failure: already have such entry' ;;\n\
                   *print*) echo 'Flags: X - disabled, D - dynamic' ;;\n\
                 esac\n",
                record = record.display(),
                dir = dir.display(),
                sleep = if latency.is_empty() {
                    String::new()
                } else {
                    format!("sleep {latency}")
                },
            ),
        )
        .expect("recorder");
        std::fs::set_permissions(&recorder, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let mut sshd = Sshd {
            port: free_port(),
            dir: dir.to_path_buf(),
            record,
            client_key,
            child: None,
            config: dir.join("sshd_config"),
        };
        sshd.write_config(&host_key, &recorder);
        sshd.spawn();
        sshd
    }

    fn write_config(&self, host_key: &Path, recorder: &Path) {
        std::fs::write(
            &self.config,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {hk}\nPidFile {dir}/sshd.pid\n\
                 AuthorizedKeysFile {dir}/authorized_keys\nUsePAM no\nStrictModes no\n\
                 PasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin yes\n\
                 ForceCommand {rec}\nMaxStartups 200\nMaxSessions 50\nLogLevel ERROR\n",
                port = self.port,
                hk = host_key.display(),
                dir = self.dir.display(),
                rec = recorder.display()
            ),
        )
        .expect("sshd_config");
    }

    #[allow(clippy::disallowed_methods)] // a synchronous wait on a process outside the runtime
    fn spawn(&mut self) {
        let child = Command::new("/usr/sbin/sshd")
            .arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("sshd (openssh-server; bash scripts/test-setup.sh)");
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(tokio::time::Instant::now() < deadline, "sshd did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills sshd and every per-connection process it forked, so open sessions drop
    /// as they would when a device reboots. The sshd processes go first (parents before
    /// children): killed the other way round, a session's sshd could see its command
    /// die and report an exit status to the client, which would then read a command in
    /// flight as finished instead of as a dropped connection.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let mut pids = vec![c.id()];
            let mut i = 0;
            while i < pids.len() {
                let more = children(pids[i]);
                pids.extend(more);
                i += 1;
            }
            for pid in &pids {
                let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            }
            let _ = c.wait();
        }
    }

    /// Restarts on the same port, with a new host key when `new_key` is true.
    pub fn restart(&mut self, new_key: bool) {
        self.stop();
        let host_key = self.dir.join("host_key");
        if new_key {
            keygen(&host_key);
        }
        self.write_config(&host_key, &self.dir.join("recorder.sh"));
        self.spawn();
    }

    /// From now on every command the recorder receives is recorded and then held (not
    /// answered) until [`Sshd::release`]; returns once one command is provably held, so
    /// a test can cut connections while a command is in flight, as the device saw it.
    pub async fn hold_next_command(&self, deadline: Duration) {
        std::fs::write(self.dir.join("hold"), "").expect("hold file");
        let until = tokio::time::Instant::now() + deadline;
        loop {
            let held = std::fs::read_dir(&self.dir)
                .map(|d| {
                    d.filter_map(Result::ok)
                        .any(|e| e.file_name().to_string_lossy().starts_with("held."))
                })
                .unwrap_or(false);
            if held {
                return;
            }
            assert!(
                tokio::time::Instant::now() < until,
                "no command reached the recorder within {deadline:?} of the hold"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Ends a hold: commands are answered again.
    pub fn release(&self) {
        let _ = std::fs::remove_file(self.dir.join("hold"));
    }

    /// The `SHA256:...` fingerprint of the current host key.
    pub fn fingerprint(&self) -> String {
        let out = Command::new("ssh-keygen")
            .arg("-lf")
            .arg(self.dir.join("host_key.pub"))
            .output()
            .expect("ssh-keygen -lf");
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .nth(1)
            .unwrap_or_default()
            .to_string()
    }

    /// Recorded lines: (client source port, command).
    pub fn received(&self) -> Vec<(u16, String)> {
        std::fs::read_to_string(&self.record)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let (port, cmd) = l.split_once(' ')?;
                Some((port.parse().ok()?, cmd.to_string()))
            })
            .collect()
    }
}

fn children(pid: u32) -> Vec<u32> {
    Command::new("pgrep")
        .arg("-P")
        .arg(pid.to_string())
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

impl Drop for Sshd {
    fn drop(&mut self) {
        self.stop();
    }
}
