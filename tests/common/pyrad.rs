//! A pyrad 2.6 RADIUS NAS (tests/peers/radius/coa_nas.py) on a free UDP port: it
//! records every CoA / Disconnect request it accepts and answers by User-Name.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

/// The shared secret the peer is started with.
pub const SECRET: &str = "testing123";

/// A running pyrad NAS on a free port; killed when dropped.
pub struct PyradNas {
    child: Child,
    pub port: u16,
    pub record: PathBuf,
    _dir: tempfile::TempDir,
}

impl PyradNas {
    pub fn start() -> PyradNas {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let dir = tempfile::tempdir().expect("temp dir");
        let record = dir.path().join("requests.jsonl");
        let mut child = Command::new(root.join(".venv-peers/bin/python"))
            .arg(root.join("tests/peers/radius/coa_nas.py"))
            .arg(SECRET)
            .arg(root.join("tests/peers/radius/dictionary"))
            .arg(&record)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the pyrad NAS (scripts/test-setup.sh installs .venv-peers)");
        let stdout = child.stdout.take().expect("stdout");
        // The peer binds port 0 and says which port it got, so tests never race for
        // a port. Read in a thread to put a deadline on a peer that hangs.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("pyrad NAS did not get ready");
        let port = line
            .strip_prefix("READY ")
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("pyrad NAS said {line:?}"));
        PyradNas {
            child,
            port,
            record,
            _dir: dir,
        }
    }

    /// The requests the NAS accepted, in arrival order.
    pub fn records(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.record)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("record is JSON"))
            .collect()
    }
}

impl Drop for PyradNas {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
