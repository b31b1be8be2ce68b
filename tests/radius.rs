//! The RADIUS CoA / Disconnect transport against peers nasd did not write: a pyrad 2.6
//! NAS (`tests/peers/radius/coa_nas.py`, which records every request it accepts and
//! checks our Message-Authenticator itself) and FreeRADIUS's `radclient`, whose
//! packets ours must match.

use std::sync::Arc;
use std::time::Duration;

use nasd::store::Secret;
use nasd::transport::radius::{
    Dictionary, RadiusClient, RadiusOptions, encode_request, parse_request, verify_request,
};
use nasd::transport::{Target, Verdict};
use serde_json::Value;

mod common;

use common::pyrad::SECRET;

use common::pyrad::PyradNas as Nas;

impl Nas {
    fn client(&self, secret: Option<&str>, timeout_ms: u64, tries: u32) -> RadiusClient {
        RadiusClient::new(
            target(self.port, secret),
            RadiusOptions {
                timeout: Duration::from_millis(timeout_ms),
                tries,
                dictionary: Arc::new(Dictionary::builtin()),
            },
        )
    }
}

fn target(port: u16, secret: Option<&str>) -> Target {
    Target {
        nas_id: 7,
        nas_name: "pyrad".into(),
        host: "127.0.0.1".into(),
        port,
        login: None,
        password: None,
        secret: secret.map(Secret::new),
        max_sessions: 4,
    }
}

fn pairs(record: &Value) -> Vec<(String, String)> {
    record["attributes"]
        .as_array()
        .expect("attributes")
        .iter()
        .map(|p| {
            (
                p[0].as_str().expect("name").to_string(),
                p[1].as_str().expect("value").to_string(),
            )
        })
        .collect()
}

fn owned(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

#[tokio::test]
async fn ack_is_done_and_the_nas_gets_exactly_what_we_sent() {
    let nas = Nas::start();
    let client = nas.client(Some(SECRET), 1000, 3);
    let reply = client
        .send(
            "coa User-Name = \"user1\", Acct-Session-Id = \"81200003\",\n\
             Mikrotik-Rate-Limit = \"10240k/5120k\"\n\
             Framed-IP-Address = 10.88.0.2, Session-Timeout = 3600\n\
             Cisco-AVPair = \"subscriber:command=reauthenticate\"",
        )
        .await;
    assert_eq!(reply.verdict, Verdict::Done, "{reply:?}");
    assert_eq!(reply.answer, "CoA-ACK\nReply-Message = \"81200003\"");
    assert_eq!(reply.commands.len(), 1);
    assert!(
        reply.commands[0].contains("radclient -x 127.0.0.1:"),
        "{reply:?}"
    );
    assert!(
        !format!("{reply:?}").contains(SECRET),
        "secret leaked: {reply:?}"
    );

    let records = nas.records();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0]["code"], 43);
    assert_eq!(records[0]["ma_ok"], true, "pyrad side MA check");
    assert_eq!(
        pairs(&records[0]),
        owned(&[
            ("User-Name", "user1"),
            ("Acct-Session-Id", "81200003"),
            ("Mikrotik-Rate-Limit", "10240k/5120k"),
            ("Framed-IP-Address", "10.88.0.2"),
            ("Session-Timeout", "3600"),
            ("Cisco-AVPair", "subscriber:command=reauthenticate"),
        ])
    );
}

#[tokio::test]
async fn naks_map_to_verdicts_by_error_cause() {
    let nas = Nas::start();
    let client = nas.client(Some(SECRET), 1000, 3);
    let cases = [
        (
            "coa User-Name = nak-busy",
            Verdict::Retry("NAK: Error-Cause = Resources-Unavailable (506)".into()),
            "CoA-NAK\nError-Cause = Resources-Unavailable",
        ),
        (
            "disconnect User-Name = nak-busy",
            Verdict::Retry("NAK: Error-Cause = Resources-Unavailable (506)".into()),
            "Disconnect-NAK\nError-Cause = Resources-Unavailable",
        ),
        (
            "disconnect User-Name = nak-gone, Acct-Session-Id = s1",
            Verdict::Done,
            "Disconnect-NAK\nReply-Message = \"s1\"\nError-Cause = Session-Context-Not-Found",
        ),
        (
            "coa User-Name = nak-gone",
            Verdict::Failed("NAK: Error-Cause = Session-Context-Not-Found (503)".into()),
            "CoA-NAK\nError-Cause = Session-Context-Not-Found",
        ),
        (
            "coa User-Name = nak-plain",
            Verdict::Failed("NAK without Error-Cause".into()),
            "CoA-NAK",
        ),
        (
            "disconnect User-Name = user1",
            Verdict::Done,
            "Disconnect-ACK",
        ),
    ];
    for (text, verdict, answer) in cases {
        let reply = client.send(text).await;
        assert_eq!(reply.verdict, verdict, "{text}");
        assert_eq!(reply.answer, answer, "{text}");
    }
    assert!(nas.records().iter().all(|r| r["ma_ok"] == true));
}

#[tokio::test]
async fn silence_is_retransmitted_as_the_same_packet_then_unreachable() {
    let nas = Nas::start();
    let client = nas.client(Some(SECRET), 200, 3);
    let started = tokio::time::Instant::now();
    let reply = client.send("coa User-Name = silent").await;
    assert_eq!(
        reply.verdict,
        Verdict::Unreachable(format!(
            "no answer from 127.0.0.1:{} after 3 tries",
            nas.port
        ))
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    let records = nas.records();
    assert_eq!(records.len(), 3, "three transmissions");
    // Retransmissions are the same packet: same identifier and authenticator, so a
    // NAS can recognise duplicates.
    assert!(records.iter().all(|r| r["raw"] == records[0]["raw"]));
}

#[tokio::test]
async fn wrong_secret_gets_no_answer() {
    let nas = Nas::start();
    let client = nas.client(Some("not-the-secret"), 200, 2);
    let reply = client.send("coa User-Name = user1").await;
    assert_eq!(
        reply.verdict,
        Verdict::Unreachable(format!(
            "no answer from 127.0.0.1:{} after 2 tries",
            nas.port
        ))
    );
    assert!(nas.records().is_empty(), "pyrad must have dropped it");
    assert!(!format!("{reply:?}").contains("not-the-secret"));
}

#[tokio::test]
async fn forged_and_foreign_replies_are_ignored() {
    let nas = Nas::start();
    let client = nas.client(Some(SECRET), 300, 2);
    // A reply with a bad Message-Authenticator is dropped like no reply at all.
    let reply = client.send("coa User-Name = bad-ma").await;
    assert_eq!(
        reply.verdict,
        Verdict::Unreachable(format!(
            "no answer from 127.0.0.1:{} after 2 tries",
            nas.port
        ))
    );
    // A forged NAK before the real ACK, and a valid NAK from another port: the
    // client keeps waiting and takes the real ACK.
    for user in ["forged-first", "other-port"] {
        let reply = client.send(&format!("coa User-Name = {user}")).await;
        assert_eq!(reply.verdict, Verdict::Done, "{user}");
        assert_eq!(reply.answer, "CoA-ACK", "{user}");
    }
}

#[tokio::test]
async fn bad_request_text_or_missing_secret_fail_without_sending() {
    let nas = Nas::start();
    let client = nas.client(Some(SECRET), 200, 1);
    let reply = client.send("coa User-Name = a, Foo-Bar = 1").await;
    assert_eq!(
        reply.verdict,
        Verdict::Failed("bad RADIUS request: unknown RADIUS attribute Foo-Bar".into())
    );
    let reply = client
        .send("disconnect Framed-IP-Address = 10.0.0.256")
        .await;
    assert!(
        matches!(&reply.verdict, Verdict::Failed(m) if m.contains("is not an IPv4 address")),
        "{reply:?}"
    );
    let client = nas.client(None, 200, 1);
    let reply = client.send("coa User-Name = a").await;
    assert_eq!(
        reply.verdict,
        Verdict::Failed(format!(
            "nas 7 (127.0.0.1:{}) has no RADIUS secret",
            nas.port
        ))
    );
    let client = nas.client(Some(""), 200, 1);
    let reply = client.send("coa User-Name = a").await;
    assert!(matches!(reply.verdict, Verdict::Failed(_)));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(nas.records().is_empty(), "nothing was sent");
}

/// radclient and nasd send the same request to the NAS; both must decode to the same
/// attributes with a valid Message-Authenticator, and given radclient's identifier
/// our encoder must produce radclient's bytes exactly. radclient is run with the
/// very line nasd logs, so that line is known to work when pasted.
#[tokio::test]
async fn same_packet_as_radclient() {
    let nas = Nas::start();
    let client = nas.client(Some(SECRET), 1000, 3);
    let text = "coa User-Name = \"user1\", Acct-Session-Id = \"81200003\", \
                Mikrotik-Rate-Limit = \"10240k/5120k\", Framed-IP-Address = 10.88.0.2, \
                Mikrotik-Address-List = \"blocked\", Cisco-AVPair = \"a=b \\\"c\\\"\"";
    let ours = client.send(text).await;
    assert_eq!(ours.verdict, Verdict::Done, "{ours:?}");

    let line = &ours.commands[0];
    let output = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(line)
        .env("SECRET", SECRET)
        .output()
        .await
        .expect("run radclient");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{line}\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("Received CoA-ACK"), "{stdout}");

    let records = nas.records();
    assert_eq!(records.len(), 2);
    let (mine, theirs) = (&records[0], &records[1]);
    assert_eq!(pairs(mine), pairs(theirs));
    assert_eq!(mine["ma_ok"], true);
    assert_eq!(theirs["ma_ok"], true);

    let raw_theirs = decode_hex(theirs["raw"].as_str().expect("raw"));
    verify_request(&raw_theirs, SECRET.as_bytes()).expect("radclient's packet verifies");
    let request = parse_request(text, &Dictionary::builtin()).expect("parses");
    let (again, _) = encode_request(&request, raw_theirs[1], SECRET.as_bytes()).expect("encodes");
    assert_eq!(again, raw_theirs, "byte for byte radclient's packet");
}

fn decode_hex(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).expect("hex"))
        .collect()
}

/// Requests to one NAS run in parallel over one socket; each must get its own reply
/// (the NAS echoes Acct-Session-Id as Reply-Message). More than 256 at once also
/// exercises waiting for a free identifier.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_parallel_requests_get_their_own_replies() {
    let nas = Nas::start();
    let client = Arc::new(nas.client(Some(SECRET), 3000, 3));
    let mut tasks = Vec::new();
    for n in 0..300 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let user = if n % 3 == 0 { "nak-busy" } else { "user" };
            let reply = client
                .send(&format!(
                    "coa User-Name = {user}, Acct-Session-Id = \"sess-{n}\""
                ))
                .await;
            (n, user, reply)
        }));
    }
    for task in tasks {
        let (n, user, reply) = task.await.expect("task");
        let echo = format!("Reply-Message = \"sess-{n}\"");
        assert!(reply.answer.contains(&echo), "{n}: {reply:?}");
        if user == "user" {
            assert_eq!(reply.verdict, Verdict::Done, "{n}");
        } else {
            assert!(matches!(reply.verdict, Verdict::Retry(_)), "{n}: {reply:?}");
        }
    }
    let records = nas.records();
    assert_eq!(records.len(), 300, "no retransmissions needed");
    assert!(records.iter().all(|r| r["ma_ok"] == true));
}
