//! Secrets never leak: NAS passwords, RADIUS secrets and API tokens appear in no log
//! file, no output of the daemon or the CLI, and no API answer.
//!
//! Runs the real `nasd` binary: two simulators (`nasd sim`, one with
//! `--fault refuse-auth`), the daemon with `NASD_LOG=trace`, and the CLI, on SQLite in
//! a temp dir. The NAS reach the simulator over SSH, telnet, the RouterOS API and RADIUS
//! CoA with the right and a wrong password or secret, one NAS is unreachable, and a
//! script prints the secrets it gets in its environment. The API is asked with the
//! right token, a wrong one and none, with good and malformed requests. Then every
//! byte written is searched for each secret as it is, in base64 and in hex, and every
//! path the test meant to take is checked to have been taken.

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nasd::tools::http_client::{HttpResponse, request};

const NAS_PASSWORD: &str = "S3cr3t-nas-pass-7f1c";
const WRONG_PASSWORD: &str = "S3cr3t-wrong-pass-2e6a";
const RADIUS_SECRET: &str = "S3cr3t-radius-9a2b";
const WRONG_RADIUS_SECRET: &str = "S3cr3t-wrong-radius-5c3d";
const API_TOKEN: &str = "S3cr3t-token-4d8e";
const WRONG_TOKEN: &str = "S3cr3t-wrong-token-8b7f";

const SECRETS: [&str; 6] = [
    NAS_PASSWORD,
    WRONG_PASSWORD,
    RADIUS_SECRET,
    WRONG_RADIUS_SECRET,
    API_TOKEN,
    WRONG_TOKEN,
];

/// A child process of this test whose stdout and stderr are collected by threads;
/// killed (by its own pid) if still running when dropped.
struct Proc {
    child: Child,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    name: String,
}

impl Proc {
    fn spawn(name: &str, command: &mut Command) -> Proc {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        let stdout = collect(child.stdout.take().expect("stdout"));
        let stderr = collect(child.stderr.take().expect("stderr"));
        Proc {
            child,
            stdout,
            stderr,
            name: name.to_string(),
        }
    }

    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout.lock().expect("stdout")).into_owned()
    }

    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().expect("stderr")).into_owned()
    }

    /// SIGTERM, then waits for the exit.
    fn stop(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        self.child.wait().expect("wait")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn collect(mut pipe: impl Read + Send + 'static) -> Arc<Mutex<Vec<u8>>> {
    let out = Arc::new(Mutex::new(Vec::new()));
    let sink = out.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        while let Ok(n) = pipe.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock().expect("sink").extend_from_slice(&buf[..n]);
        }
    });
    out
}

/// Polls `check` every 100 ms; panics naming `what` after `limit`.
#[allow(clippy::disallowed_methods)] // a synchronous wait on a process outside the runtime
fn wait_until(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The simulator's listening addresses, read from what it prints at start.
struct SimAddrs {
    ssh: String,
    telnet: String,
    api: String,
    coa: String,
}

fn start_sim(extra: &[&str]) -> (Proc, SimAddrs) {
    // On every loopback address: each NAS needs an IP of its own.
    let mut args = vec![
        "sim",
        "--listen",
        "0.0.0.0",
        "--password",
        NAS_PASSWORD,
        "--secret",
        RADIUS_SECRET,
    ];
    args.extend_from_slice(extra);
    let proc = Proc::spawn(
        "nasd sim",
        Command::new(env!("CARGO_BIN_EXE_nasd"))
            .args(&args)
            .env("NASD_LOG", "trace"),
    );
    let mut addrs = None;
    wait_until(Duration::from_secs(30), "the simulator to start", || {
        let text = proc.stdout();
        let find = |label: &str| {
            text.split(label)
                .nth(1)
                .and_then(|rest| rest.split([',', ' ', '\n']).next())
                .map(str::to_string)
        };
        if let (Some(ssh), Some(telnet), Some(api), Some(coa)) = (
            find("ssh on "),
            find("telnet on "),
            find("api on "),
            find("coa on "),
        ) {
            addrs = Some(SimAddrs {
                ssh,
                telnet,
                api,
                coa,
            });
        }
        addrs.is_some()
    });
    (proc, addrs.expect("addresses"))
}

fn port(addr: &str) -> &str {
    addr.rsplit(':').next().expect("port")
}

/// A port nothing listens on.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

struct Run {
    dir: tempfile::TempDir,
    /// Everything the CLI printed, for the final search.
    cli_output: Vec<String>,
}

impl Run {
    fn config(&self) -> PathBuf {
        self.dir.path().join("nasd.toml")
    }

    fn log_dir(&self) -> PathBuf {
        self.dir.path().join("log")
    }

    fn nasd(&mut self, args: &[&str]) -> Output {
        let out = Command::new(env!("CARGO_BIN_EXE_nasd"))
            .arg("--config")
            .arg(self.config())
            .args(args)
            .env("NASD_LOG", "trace")
            .output()
            .expect("run nasd");
        // Only what nasd printed: the arguments hold secrets by design (`--password`).
        self.cli_output.push(format!(
            "$ nasd {}\n{}{}",
            args.first().unwrap_or(&""),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
        out
    }

    fn nasd_ok(&mut self, args: &[&str]) -> String {
        let out = self.nasd(args);
        assert!(
            out.status.success(),
            "nasd {args:?}: {}",
            self.cli_output.last().expect("output")
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn nas_log(&self, name: &str) -> String {
        let dir = self.log_dir().join("nas_event_daemon");
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return String::new();
        };
        entries
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(&format!("{name}_"))
            })
            .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
            .collect()
    }
}

/// Every file under `dir`, recursively, as (path, text).
fn files_under(dir: &Path) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            let bytes = std::fs::read(&path).unwrap_or_default();
            out.push((path, String::from_utf8_lossy(&bytes).into_owned()));
        }
    }
    out
}

fn base64(data: &[u8], alphabet: &[u8; 64], pad: bool) -> String {
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(alphabet[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
        if pad {
            for _ in chunk.len()..3 {
                out.push('=');
            }
        }
    }
    out
}

/// A secret as it is, in base64 (standard and URL alphabets, with and without
/// padding), in hex (both cases) and percent-encoded.
fn forms(secret: &str) -> Vec<String> {
    const STANDARD: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    const URL: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let bytes = secret.as_bytes();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let mut forms = vec![
        secret.to_string(),
        base64(bytes, STANDARD, true),
        base64(bytes, STANDARD, false),
        base64(bytes, URL, false),
        hex.to_uppercase(),
        hex,
        secret.replace('-', "%2D"),
    ];
    forms.sort();
    forms.dedup();
    forms
}

/// Where a form of a secret shows in `text`, with some context.
fn secrets_in(place: &str, text: &str) -> Vec<String> {
    let mut found = Vec::new();
    for secret in SECRETS {
        for form in forms(secret) {
            if let Some(at) = text.find(&form) {
                let start = text[..at]
                    .char_indices()
                    .rev()
                    .nth(80)
                    .map_or(0, |(i, _)| i);
                let end = (at + form.len() + 80..=text.len())
                    .find(|i| text.is_char_boundary(*i))
                    .unwrap_or(text.len());
                found.push(format!(
                    "{place} contains {form:?} (a form of {secret:?}):\n    ...{}...",
                    &text[start..end]
                ));
            }
        }
    }
    found
}

fn scheme_copy(from: &Path, to: &Path, name: &str) {
    std::fs::create_dir_all(to.join(name)).expect("scheme dir");
    std::fs::copy(
        from.join(name).join("scheme.toml"),
        to.join(name).join("scheme.toml"),
    )
    .expect("copy scheme");
}

#[test]
fn secrets_appear_in_no_log_output_or_answer() {
    let dir = tempfile::tempdir().expect("temp dir");
    let d = dir.path().to_path_buf();
    let mut run = Run {
        dir,
        cli_output: Vec::new(),
    };

    // Schemes: the shipped ones for each protocol, and one whose template puts the NAS
    // password and secret into a command (the scheme author's choice, which nasd must
    // still keep out of its logs).
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemes");
    let schemes = d.join("schemes");
    for name in [
        "mikrotik-ssh",
        "mikrotik-telnet",
        "mikrotik-api",
        "mikrotik-coa",
    ] {
        scheme_copy(&shipped, &schemes, name);
    }
    std::fs::create_dir_all(schemes.join("password-in-template")).expect("dir");
    std::fs::write(
        schemes.join("password-in-template/scheme.toml"),
        "transport = \"null\"\ndialect = \"plain\"\n[commands]\n\
         user_rate_set = [\"/user set admin password={{ nas_password }} secret={{ coa_psw }} rate={{ rate_in }}\"]\n",
    )
    .expect("scheme");
    // A script that prints every secret it is given, on stdout and stderr.
    let script = d.join("echo-secrets.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\necho \"cmd=$1 pw=$nas_password telnet=$telnet_password coa=$coa_psw\"\n\
         echo \"stderr pw=$nas_password\" >&2\n",
    )
    .expect("script");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");

    let (mut sim, addrs) = start_sim(&[]);
    let (mut refusing_sim, refusing) = start_sim(&["--fault", "refuse-auth"]);

    std::fs::write(
        run.config(),
        format!(
            "[database]\nurl = \"sqlite://{d}/nasd.db\"\n\
             [daemon]\nlog_dir = \"{d}/log\"\nschemes_dir = \"{d}/schemes\"\n\
             resync_interval = \"200ms\"\npoll_interval = \"50ms\"\nretry_base = \"50ms\"\n\
             retry_cap = \"200ms\"\nmax_attempts = 2\n\
             [transport]\nknown_hosts = \"{d}/known_hosts\"\nradius_timeout = \"200ms\"\n\
             radius_tries = 2\n\
             [api]\nlisten = \"127.0.0.1:0\"\ntokens = [\"{API_TOKEN}\"]\n\
             open_status = false\nopen_metrics = false\n",
            d = d.display()
        ),
    )
    .expect("config");

    // (id, name, scheme or script, port, password, secret)
    let unreachable = closed_port().to_string();
    let script_path = script.display().to_string();
    let nas: Vec<(&str, &str, &str, &str, &str, &str)> = vec![
        (
            "1",
            "ssh-ok",
            "mikrotik-ssh",
            port(&addrs.ssh),
            NAS_PASSWORD,
            RADIUS_SECRET,
        ),
        (
            "2",
            "ssh-wrong",
            "mikrotik-ssh",
            port(&addrs.ssh),
            WRONG_PASSWORD,
            RADIUS_SECRET,
        ),
        (
            "3",
            "ssh-refused",
            "mikrotik-ssh",
            port(&refusing.ssh),
            NAS_PASSWORD,
            RADIUS_SECRET,
        ),
        (
            "4",
            "ssh-unreachable",
            "mikrotik-ssh",
            &unreachable,
            NAS_PASSWORD,
            RADIUS_SECRET,
        ),
        (
            "5",
            "telnet-ok",
            "mikrotik-telnet",
            port(&addrs.telnet),
            NAS_PASSWORD,
            RADIUS_SECRET,
        ),
        (
            "6",
            "telnet-wrong",
            "mikrotik-telnet",
            port(&addrs.telnet),
            WRONG_PASSWORD,
            RADIUS_SECRET,
        ),
        (
            "7",
            "api-ok",
            "mikrotik-api",
            port(&addrs.api),
            NAS_PASSWORD,
            RADIUS_SECRET,
        ),
        (
            "8",
            "api-wrong",
            "mikrotik-api",
            port(&addrs.api),
            WRONG_PASSWORD,
            RADIUS_SECRET,
        ),
        (
            "9",
            "api-refused",
            "mikrotik-api",
            port(&refusing.api),
            NAS_PASSWORD,
            RADIUS_SECRET,
        ),
        (
            "10",
            "coa-ok",
            "mikrotik-coa",
            port(&addrs.coa),
            NAS_PASSWORD,
            RADIUS_SECRET,
        ),
        (
            "11",
            "coa-wrong",
            "mikrotik-coa",
            port(&addrs.coa),
            NAS_PASSWORD,
            WRONG_RADIUS_SECRET,
        ),
        ("12", "script", "", "0", NAS_PASSWORD, RADIUS_SECRET),
        (
            "13",
            "template",
            "password-in-template",
            "0",
            NAS_PASSWORD,
            RADIUS_SECRET,
        ),
    ];
    for (id, name, scheme, port, password, secret) in &nas {
        // NAS IPs are unique; replies to CoA must come from the NAS's own address, which
        // for the simulator on 0.0.0.0 is 127.0.0.1.
        let ip = if *name == "coa-ok" {
            "127.0.0.1".to_string()
        } else {
            format!("127.0.0.{}", id.parse::<u8>().expect("id") + 1)
        };
        let mut args = vec![
            "nas",
            "add",
            "--id",
            id,
            "--name",
            name,
            "--ip",
            &ip,
            "--login",
            "admin",
            "--password",
            password,
            "--secret",
            secret,
            "--workers",
            "1",
            "--max-sessions",
            "1",
            "--host-key-policy",
            "accept-new",
        ];
        if scheme.is_empty() {
            args.extend(["--script", &script_path]);
        } else {
            args.extend(["--scheme", scheme]);
            if *port != "0" {
                args.extend(["--port", port]);
            }
        }
        run.nasd_ok(&args);
    }
    let mut csv =
        "user_id,abonent_id,nas_id,login,ip,rate_in,rate_out,acct_session_id\n".to_string();
    for (id, ..) in &nas {
        csv.push_str(&format!(
            "{id},10{id},{id},user{id},10.88.0.{id},1024,512,sess{id}\n"
        ));
    }
    std::fs::write(d.join("accounts.csv"), csv).expect("csv");
    let accounts = d.join("accounts.csv").display().to_string();
    run.nasd_ok(&["accounts", "import", &accounts]);
    for (id, ..) in &nas {
        run.nasd_ok(&["enqueue", "--cmd", "user_rate_set", "--user-id", id]);
    }

    let mut daemon = Proc::spawn(
        "nasd run",
        Command::new(env!("CARGO_BIN_EXE_nasd"))
            .arg("--config")
            .arg(run.config())
            .arg("run")
            .env("NASD_LOG", "trace"),
    );

    // Each path was really taken: what a user would check in the NAS logs.
    let expectations: Vec<(&str, &str)> = vec![
        ("ssh-ok", "outcome: done"),
        ("ssh-wrong", "authentication rejected for user admin"),
        ("ssh-refused", "authentication rejected for user admin"),
        ("ssh-unreachable", "cannot connect"),
        ("telnet-ok", "outcome: done"),
        ("telnet-wrong", "authentication rejected for user admin"),
        ("api-ok", "outcome: done"),
        ("api-wrong", "authentication rejected for user admin"),
        ("api-refused", "authentication rejected for user admin"),
        ("coa-ok", "answer: CoA-ACK"),
        ("coa-wrong", "no answer from 127.0.0.1"),
        ("script", "answer: cmd=user_rate_set pw="),
        ("script", "answer: stderr: stderr pw="),
        ("template", "send: /user set admin password="),
    ];
    for (name, line) in &expectations {
        wait_until(
            Duration::from_secs(90),
            &format!("`{line}` in the log of NAS {name}"),
            || run.nas_log(name).contains(line),
        );
    }
    // The events of the working NAS are in history; the others are retried (an
    // unreachable NAS does not use up attempts) and stay in the stack.
    wait_until(Duration::from_secs(90), "6 events in history", || {
        let out = run.nasd(&["history", "--json"]);
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .ok()
            .and_then(|v| v.as_array().map(Vec::len))
            == Some(6)
    });

    // The API, with the right token, a wrong one and none.
    let daemon_log =
        std::fs::read_to_string(run.log_dir().join("nas_event_daemon.log")).expect("daemon log");
    let api: SocketAddr = daemon_log
        .split("api on http://")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .expect("the daemon log names the API address");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let bearer = format!("Bearer {API_TOKEN}");
    let wrong = format!("Bearer {WRONG_TOKEN}");
    let mut answers: Vec<(String, HttpResponse)> = Vec::new();
    let mut ask =
        |method: &str, path: &str, auth: Option<&str>, content_type: &str, body: &[u8]| {
            let mut headers = vec![("Content-Type", content_type)];
            if let Some(auth) = auth {
                headers.push(("Authorization", auth));
            }
            let response = rt
                .block_on(request(api, method, path, &headers, body))
                .expect("http");
            answers.push((format!("{method} {path} ({auth:?})"), response.clone()));
            response
        };
    let json = "application/json";
    let form = "application/x-www-form-urlencoded";
    for path in [
        "/api/v1/nas",
        "/api/v1/nas/1",
        "/api/v1/nas/11",
        "/api/v1/nas/12",
        "/status",
        "/metrics",
        "/api/v1/openapi.json",
        "/api/v1/stack",
        "/api/v1/accounts/2/events",
        "/api/v1/accounts/12/events",
        "/api/v1/accounts/13/events",
        "/api/v1/events/1",
        "/api/v1/events/2",
        "/api/v1/events/11",
        "/api/v1/events/12",
        "/api/v1/events/999999",
        "/api/v1/nas/abc",
        "/nope",
    ] {
        ask("GET", path, Some(&bearer), json, b"");
        let wrong_answer = ask("GET", path, Some(&wrong), json, b"");
        let missing = ask("GET", path, None, json, b"");
        if path != "/api/v1/openapi.json" {
            assert_eq!(wrong_answer.status, 401, "{path} with a wrong token");
            assert_eq!(missing.status, 401, "{path} without a token");
        }
    }
    let ok = ask("GET", "/api/v1/nas", Some(&bearer), json, b"");
    assert_eq!(ok.status, 200, "{}", ok.text());
    assert!(ok.text().contains("ssh-wrong"), "{}", ok.text());
    let status = ask("GET", "/status", Some(&bearer), json, b"");
    assert_eq!(status.status, 200, "{}", status.text());
    let metrics = ask("GET", "/metrics", Some(&bearer), json, b"");
    assert_eq!(metrics.status, 200, "{}", metrics.text());
    for (method, path, content_type, body) in [
        ("POST", "/api/v1/events", json, &b"{"[..]),
        (
            "POST",
            "/api/v1/events",
            json,
            b"{\"cmd\": 5, \"user_id\": \"x\"}",
        ),
        ("POST", "/api/v1/events", json, b"{\"cmd\": \"user_add\"}"),
        ("POST", "/api/v1/events", form, b"cmd=user_add"),
        (
            "POST",
            "/api/v1/events/batch",
            json,
            b"[{\"cmd\": \"user_add\", \"user_id\": 1}, 7]",
        ),
        ("POST", "/api/v1/events/999999/retry", json, b""),
        ("POST", "/api/v1/events/abc/cancel", json, b""),
        ("DELETE", "/api/v1/nas/1", json, b""),
        (
            "POST",
            "/rest_api/v2/EventsStackCompact/",
            form,
            b"method1=objects.nope&arg1={",
        ),
        ("POST", "/rest_api/v2/Nope/", form, b"x"),
    ] {
        let response = ask(method, path, Some(&bearer), content_type, body);
        assert!(
            response.status >= 400,
            "{method} {path}: {}",
            response.status
        );
        ask(method, path, Some(&wrong), content_type, body);
        ask(method, path, None, content_type, body);
    }
    // Too large a body: the server may answer 413 or close while it is still sent.
    let big = vec![b'x'; 4 * 1024 * 1024];
    let headers = [("Content-Type", json), ("Authorization", bearer.as_str())];
    if let Ok(response) = rt.block_on(request(api, "POST", "/api/v1/events", &headers, &big)) {
        answers.push(("POST /api/v1/events (4 MiB)".into(), response));
    }

    // The CLI an operator uses to look around.
    run.nasd_ok(&["nas", "list"]);
    run.nasd_ok(&["nas", "list", "--json"]);
    for (id, ..) in &nas {
        run.nasd_ok(&[
            "send",
            "--nas",
            id,
            "--cmd",
            "user_rate_set",
            "--user-id",
            id,
            "--dry-run",
        ]);
    }
    run.nasd_ok(&["history"]);
    run.nasd_ok(&["history", "--json"]);
    run.nasd_ok(&["stack", "count"]);
    // Manual sends print the answer and log like the daemon.
    let sent = run.nasd(&[
        "send",
        "--nas",
        "12",
        "--cmd",
        "user_rate_set",
        "--user-id",
        "12",
    ]);
    assert!(
        String::from_utf8_lossy(&sent.stdout).contains("answer: cmd=user_rate_set pw="),
        "{}",
        run.cli_output.last().expect("output")
    );
    run.nasd(&[
        "send",
        "--nas",
        "2",
        "--cmd",
        "user_rate_set",
        "--user-id",
        "2",
    ]);
    run.nasd(&[
        "send",
        "--nas",
        "13",
        "--cmd",
        "user_rate_set",
        "--user-id",
        "13",
    ]);
    run.nasd(&[
        "send",
        "--nas",
        "11",
        "--cmd",
        "user_rate_set",
        "--user-id",
        "11",
    ]);
    assert!(
        run.cli_output
            .iter()
            .any(|o| o.contains("authentication rejected for user admin")),
        "a manual send to a NAS with a wrong password says so"
    );

    let status = daemon.stop();
    assert!(
        status.success(),
        "daemon exit: {status:?}\n{}",
        daemon.stderr()
    );
    sim.stop();
    refusing_sim.stop();

    // Where nothing may show a secret.
    let mut places: Vec<(String, String)> = Vec::new();
    for (path, text) in files_under(&run.log_dir()) {
        places.push((path.display().to_string(), text));
    }
    assert!(
        places
            .iter()
            .any(|(p, _)| p.ends_with("nas_event_daemon.log")),
        "the daemon log was written"
    );
    assert!(
        places
            .iter()
            .any(|(p, t)| p.contains("abonents") && t.contains("cmd=user_rate_set")),
        "account logs were written"
    );
    places.push(("daemon stdout".into(), daemon.stdout()));
    places.push(("daemon stderr".into(), daemon.stderr()));
    assert!(
        daemon.stderr().contains("TRACE"),
        "the daemon logged at trace level"
    );
    for proc in [&sim, &refusing_sim] {
        places.push((format!("{} stdout", proc.name), proc.stdout()));
        places.push((format!("{} stderr", proc.name), proc.stderr()));
    }
    for (i, output) in run.cli_output.iter().enumerate() {
        places.push((format!("CLI output {i}"), output.clone()));
    }
    for (what, response) in &answers {
        let headers: String = response
            .headers
            .iter()
            .map(|(k, v)| format!("{k}: {v}\n"))
            .collect();
        places.push((format!("API answer to {what}"), headers + &response.text()));
    }
    let leaks: Vec<String> = places
        .iter()
        .flat_map(|(place, text)| secrets_in(place, text))
        .collect();
    assert!(leaks.is_empty(), "secrets leaked:\n{}", leaks.join("\n"));
    // The secrets were in play: the script printed them (masked now), and the
    // template put them into a command (masked in the log).
    let script_log = run.nas_log("script");
    assert!(
        script_log.contains("pw=*** telnet=*** coa=***"),
        "{script_log}"
    );
    let template_log = run.nas_log("template");
    assert!(
        template_log.contains("password=*** secret=***"),
        "{template_log}"
    );
}
