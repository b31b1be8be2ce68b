//! Fuzzing on stable Rust: property tests at scale (proptest) of every decoder that
//! reads what a device or a network peer sends, and of scheme rendering.
//!
//! - telnet: `TelnetStream` (arbitrary bytes and IAC sequences at arbitrary chunk
//!   boundaries), prompt and answer extraction, and a `TelnetPool` against a hostile
//!   telnet device over a real socket;
//! - RADIUS: reply verification (arbitrary bytes, correctly signed replies with every
//!   single-bit mutation rejected), request encoding and checking, the dictionary and
//!   request text parsers, and a `RadiusClient` against a NAS that answers with forged
//!   and garbled datagrams before the real reply;
//! - RouterOS API: `decode_length`, `SentenceDecoder` (chunking, round trip, no
//!   up-front allocation for a huge declared length), `parse_command`, and an `ApiPool`
//!   against a hostile API device (reply rendering, tags, login);
//! - CLI answer classification with the patterns of the shipped schemes;
//! - scheme rendering: random (often malformed) templates and variables of every JSON
//!   type in every dialect, and escaped values read back by the device-side parsers;
//! - the simulator's network-facing parts: the CLI interpreter, and the CoA, API and
//!   telnet servers over real sockets (a panic in a server task is caught by a panic
//!   hook, and the server must still answer afterwards).
//!
//! Every test has a case count sized for CI; `PROPTEST_CASES=N` sets it for all of them
//! (the tests over sockets take a tenth of N, at least 1). A failure prints the minimal
//! input found; nothing is persisted.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, LazyLock, Mutex, Once};
use std::time::Duration;

use nasd::scheme::{Dialect, Scheme, SchemeSet, Vars, escape};
use nasd::store::Secret;
use nasd::transport::radius::{
    self, Dictionary, RadiusClient, RadiusOptions, Value as RadiusValue, describe_reply,
    encode_request, parse_request, verify_reply, verify_request,
};
use nasd::transport::routeros_api::{
    ApiOptions, ApiPool, SentenceDecoder, decode_length, encode_length, encode_sentence,
    parse_command,
};
use nasd::transport::telnet::{TelnetOptions, TelnetPool, TelnetStream, command_output, last_line};
use nasd::transport::{CliResult, Exchange, SessionError, Target, Verdict};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::TestRunner;
use serde_json::Value as Json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

// ---------------------------------------------------------------------------------
// Harness

/// The case count: `PROPTEST_CASES` when set, else the test's default.
fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn config(default: u32) -> ProptestConfig {
    ProptestConfig {
        cases: cases(default),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// For tests that open sockets per case: a tenth of `PROPTEST_CASES`.
fn io_config(default: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .map_or(default, |n| (n / 10).max(1));
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// What one case reached, by name.
type Reach = Vec<&'static str>;

/// Runs `test` on `config.cases` values of `strategy` (plus shrinking on failure).
/// Each case names what it reached; from 100 cases on, every name in `must_reach`
/// has to come up, so a generator that stopped producing interesting input fails the
/// test instead of passing on nothing. Prints the case count and the tally, which is
/// what `--nocapture` shows for a run at scale.
fn fuzz<S: Strategy>(
    name: &str,
    config: ProptestConfig,
    strategy: S,
    must_reach: &[&str],
    test: impl Fn(S::Value, &mut Reach) -> Result<(), TestCaseError>,
) {
    let tally: Mutex<BTreeMap<&'static str, u64>> = Mutex::new(BTreeMap::new());
    let cases = config.cases;
    let started = tokio::time::Instant::now();
    let mut runner = TestRunner::new(config);
    let result = runner.run(&strategy, |value| {
        let mut reach = Reach::new();
        let outcome = test(value, &mut reach);
        let mut tally = tally.lock().unwrap_or_else(|p| p.into_inner());
        for what in reach {
            *tally.entry(what).or_default() += 1;
        }
        outcome
    });
    let tally = tally.into_inner().unwrap_or_else(|p| p.into_inner());
    eprintln!(
        "fuzz {name}: {cases} cases in {:.1} s, reached {tally:?}",
        started.elapsed().as_secs_f64()
    );
    if let Err(e) = result {
        panic!("{name}: {e}");
    }
    if cases >= 100 {
        for what in must_reach {
            assert!(
                tally.contains_key(what),
                "{name}: no case reached `{what}` in {cases} cases: {tally:?}"
            );
        }
    }
}

/// Threads that panicked, by name. Server tasks run on the worker threads of a
/// runtime named after their test (tokio catches their panics, so the test would not
/// see them otherwise).
static PANICKED: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn watch_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let name = std::thread::current().name().unwrap_or("").to_string();
            PANICKED
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(name);
            previous(info);
        }));
    });
}

/// A runtime whose worker threads carry the test's name.
fn runtime(test: &str) -> tokio::runtime::Runtime {
    watch_panics();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(format!("fuzz-{test}"))
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn assert_no_panics(test: &str) {
    let prefix = format!("fuzz-{test}");
    let panicked = PANICKED.lock().unwrap_or_else(|p| p.into_inner());
    assert!(
        !panicked.iter().any(|name| name.starts_with(&prefix)),
        "a task of {test} panicked (see the panic message above)"
    );
}

/// The largest single allocation of the current thread since the last reset, so a
/// decoder that reserves a declared length up front is caught.
struct Tracking;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = LARGEST.try_with(|largest| {
        if size > largest.get() {
            largest.set(size);
        }
    });
}

// SAFETY: every call is forwarded to the system allocator unchanged; the extra work is
// a const-initialised thread-local without a destructor, which never allocates.
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Tracking = Tracking;

/// `data` cut at the given points (sorted, possibly empty pieces).
fn chunks<'a>(data: &'a [u8], cuts: &[Index]) -> Vec<&'a [u8]> {
    let mut points: Vec<usize> = cuts.iter().map(|i| i.index(data.len() + 1)).collect();
    points.sort_unstable();
    let mut out = Vec::with_capacity(points.len() + 1);
    let mut start = 0;
    for point in points {
        out.push(&data[start..point]);
        start = point;
    }
    out.push(&data[start..]);
    out
}

fn cuts() -> impl Strategy<Value = Vec<Index>> {
    prop::collection::vec(any::<Index>(), 0..10)
}

fn target(port: u16) -> Target {
    Target {
        nas_id: 7,
        nas_name: "fuzz".into(),
        host: "127.0.0.1".into(),
        port,
        login: Some("admin".into()),
        password: Some(Secret::new(PASSWORD)),
        secret: Some(Secret::new(RADIUS_SECRET)),
        max_sessions: 1,
    }
}

const PASSWORD: &str = "pw-S3cr3t-fuzz";
const RADIUS_SECRET: &str = "rad-S3cr3t-fuzz";

/// Strings that break naive parsers: quotes, escapes, separators, control characters,
/// template syntax, RouterOS and shell metacharacters, long and non-ASCII text.
fn nasty() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => any::<String>(),
        2 => "[ -~]{0,24}",
        1 => prop::sample::select(vec![
            "", " ", "\"", "'", "\\", "\\\"", "\n", "\r\n", "\t", "\0", "\u{1b}[1m", "\u{85}",
            "\u{2028}", "x; /system reset", "$(reboot)", "`id`", "a\"b", "{{ a }}", "{% if %}",
            "=", "?", ".tag=1", "!done", "0x", "0xzz", "0x00ff", "-1", "4294967296",
            "10.0.0.1", "256.1.1.1", "жжж", "🦀", "%s%n", "\u{feff}", "\u{fffd}",
        ])
        .prop_map(str::to_string),
        1 => (".{0,4}", 0usize..400).prop_map(|(s, n)| s.repeat(n)),
    ]
}

// ---------------------------------------------------------------------------------
// Telnet

/// Bytes a telnet peer sends, biased towards what matters: IAC and the command bytes,
/// option numbers, line ends, prompt characters, UTF-8 lead and continuation bytes.
/// (A table lookup on a random number: much cheaper to generate than a union.)
fn telnet_byte_of(n: u16) -> u8 {
    const SPECIAL: &[u8] = &[
        255, 255, 255, 255, 240, 241, 246, 249, 250, 250, 251, 252, 253, 254, 0, 1, 3, 5, 24, 31,
        34, 39, b'\r', b'\n', 0, b' ', b'a', b'>', b'#', b'$', b':', 0x1b, b'[', 0xd0, 0xb9, 0xe2,
        0x82, 0xac, 0xf0, 0x9f,
    ];
    let [high, low] = n.to_be_bytes();
    if high < 100 {
        low
    } else {
        SPECIAL[usize::from(low) % SPECIAL.len()]
    }
}

fn telnet_bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u16>(), 0..max)
        .prop_map(|v| v.into_iter().map(telnet_byte_of).collect())
}

fn feed_all(pieces: &[&[u8]]) -> (String, Vec<u8>) {
    let mut stream = TelnetStream::new();
    let mut text = String::new();
    let mut reply = Vec::new();
    for piece in pieces {
        let fed = stream.feed(piece);
        text.push_str(&fed.text);
        reply.extend_from_slice(&fed.reply);
    }
    (text, reply)
}

/// Our negotiation answers: only `IAC WILL|WONT|DO|DONT opt` and the NAWS size.
fn replies_well_formed(mut reply: &[u8]) -> bool {
    while !reply.is_empty() {
        match reply {
            [255, 251..=254, _, rest @ ..] => reply = rest,
            [255, 250, 31, _, _, _, _, 255, 240, rest @ ..] => reply = rest,
            _ => return false,
        }
    }
    true
}

/// What the client must see of server data: a NUL after CR dropped, UTF-8 decoded
/// with invalid sequences replaced.
fn telnet_text(data: &[u8]) -> String {
    let mut out = Vec::with_capacity(data.len());
    let mut after_cr = false;
    for &byte in data {
        if !(after_cr && byte == 0) {
            out.push(byte);
        }
        after_cr = byte == b'\r';
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[derive(Debug, Clone)]
enum TelnetPiece {
    Data(Vec<u8>),
    Command(Vec<u8>),
}

fn telnet_command() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        (251u8..=254, any::<u8>()).prop_map(|(c, o)| vec![255, c, o]),
        prop::sample::select(vec![
            0u8, 1, 100, 239, 240, 241, 242, 243, 244, 245, 246, 247, 248, 249
        ])
        .prop_map(|c| vec![255, c]),
        (0u8..255, prop::collection::vec(0u8..255, 0..40)).prop_map(|(option, payload)| {
            let mut v = vec![255, 250, option];
            v.extend(payload);
            v.extend([255, 240]);
            v
        }),
    ]
}

fn telnet_pieces() -> impl Strategy<Value = Vec<TelnetPiece>> {
    prop::collection::vec(
        prop_oneof![
            3 => telnet_bytes(40).prop_map(TelnetPiece::Data),
            1 => telnet_command().prop_map(TelnetPiece::Command),
        ],
        0..12,
    )
}

/// `(text as typed, telnet stream)`: IAC doubled in data, commands as they are.
fn telnet_server_stream(pieces: &[TelnetPiece]) -> (Vec<u8>, Vec<u8>) {
    let mut data = Vec::new();
    let mut wire = Vec::new();
    for piece in pieces {
        match piece {
            TelnetPiece::Data(bytes) => {
                data.extend_from_slice(bytes);
                for &b in bytes {
                    wire.push(b);
                    if b == 255 {
                        wire.push(255);
                    }
                }
            }
            TelnetPiece::Command(bytes) => wire.extend_from_slice(bytes),
        }
    }
    // A final plain byte, so a UTF-8 sequence cut at the very end is judged.
    data.push(b'\n');
    wire.push(b'\n');
    (data, wire)
}

/// Any bytes, any chunking: no panic, and the text and the answers do not depend on
/// where the reads were cut.
#[test]
fn telnet_stream_any_bytes_any_chunking() {
    fuzz(
        "telnet_stream_any_bytes_any_chunking",
        config(3000),
        (telnet_bytes(400), cuts()),
        &["text", "negotiation answered"],
        |(data, cuts), reach| {
            let whole = feed_all(&[&data]);
            let split = feed_all(&chunks(&data, &cuts));
            prop_assert_eq!(&whole, &split);
            prop_assert!(replies_well_formed(&whole.1), "reply {:?}", whole.1);
            if !whole.0.is_empty() {
                reach.push("text");
            }
            if !whole.1.is_empty() {
                reach.push("negotiation answered");
            }
            Ok(())
        },
    );
}

/// Text without IAC arrives unchanged whatever the chunking (bar telnet's CR NUL).
#[test]
fn telnet_plain_text_arrives_unchanged() {
    fuzz(
        "telnet_plain_text_arrives_unchanged",
        config(3000),
        (any::<String>(), cuts()),
        &["multi-byte text"],
        |(text, cuts), reach| {
            let (got, reply) = feed_all(&chunks(text.as_bytes(), &cuts));
            prop_assert_eq!(got, text.replace("\r\0", "\r"));
            prop_assert!(reply.is_empty());
            if !text.is_ascii() {
                reach.push("multi-byte text");
            }
            Ok(())
        },
    );
}

/// Data with doubled IACs, and negotiations, subnegotiations and commands anywhere in
/// it: the data arrives intact and every answer is a well-formed negotiation.
#[test]
fn telnet_data_survives_interleaved_commands() {
    fuzz(
        "telnet_data_survives_interleaved_commands",
        config(3000),
        (telnet_pieces(), cuts()),
        &[
            "escaped IAC in data",
            "subnegotiation",
            "negotiation answered",
        ],
        |(pieces, cuts), reach| {
            let (data, wire) = telnet_server_stream(&pieces);
            let (text, reply) = feed_all(&chunks(&wire, &cuts));
            prop_assert_eq!(text, telnet_text(&data));
            prop_assert!(replies_well_formed(&reply), "reply {:?}", reply);
            if data.contains(&255) {
                reach.push("escaped IAC in data");
            }
            if wire.windows(2).any(|w| w == [255, 250]) {
                reach.push("subnegotiation");
            }
            if !reply.is_empty() {
                reach.push("negotiation answered");
            }
            Ok(())
        },
    );
}

/// Prompt and answer extraction on anything: no panic, no CR left.
#[test]
fn telnet_answer_extraction() {
    fuzz(
        "telnet_answer_extraction",
        config(3000),
        (nasty(), nasty(), nasty()),
        &["output"],
        |(raw, extra, command), reach| {
            let raw = format!("{raw}\r\n{extra}");
            let output = command_output(&raw, &command);
            prop_assert!(!output.contains('\r'));
            let last = last_line(&raw);
            prop_assert!(!last.contains('\n') && !last.contains('\r'));
            if !output.is_empty() {
                reach.push("output");
            }
            Ok(())
        },
    );
}

/// The echo and the prompt are removed and the device's lines kept.
#[test]
fn telnet_answer_round_trip() {
    fuzz(
        "telnet_answer_round_trip",
        config(2000),
        ("[a-z/ =]{1,30}", prop::collection::vec("[ -~]{0,40}", 0..6)),
        &["output"],
        |(command, lines), reach| {
            let body: Vec<String> = lines.iter().map(|l| l.trim().to_string()).collect();
            let raw = format!("{command}\r\n{}\r\n[admin@sim] > ", body.join("\r\n"));
            let expected = body.join("\n");
            let expected = expected.trim_end().trim_start_matches('\n');
            prop_assert_eq!(command_output(&raw, &command), expected);
            if !expected.is_empty() {
                reach.push("output");
            }
            Ok(())
        },
    );
}

/// One turn of a hostile telnet device.
#[derive(Debug, Clone)]
enum DeviceStep {
    /// Ends with a line the client answers (login, password or command prompt):
    /// the device waits briefly for that line before going on.
    Prompt {
        before: Vec<u8>,
        prompt: &'static str,
        echo_back: bool,
    },
    /// Negotiation, garbage, partial sequences: the device goes on at once.
    Noise(Vec<u8>),
}

/// A device session: mostly a well-behaved login and command exchange (login,
/// password, prompt, output and prompt), with steps replaced by random ones and noise
/// (negotiation, garbage, cut sequences) in between.
fn device_session() -> impl Strategy<Value = Vec<DeviceStep>> {
    let noise = prop_oneof![
        telnet_bytes(60).prop_map(DeviceStep::Noise),
        telnet_command().prop_map(DeviceStep::Noise),
    ];
    let output = prop::collection::vec("[ -~]{0,30}", 0..4).prop_map(|lines| {
        let mut text = b"/ip address print\r\n".to_vec();
        text.extend_from_slice(lines.join("\r\n").as_bytes());
        text
    });
    (
        prop::collection::vec(
            (
                prop::option::weighted(0.15, device_step()),
                prop::option::weighted(0.3, noise.clone()),
            ),
            4,
        ),
        output,
        prop::collection::vec(noise, 0..2),
    )
        .prop_map(|(changes, output, tail)| {
            let canonical = [
                (b"\xff\xfb\x01\xff\xfb\x03MikroTik".to_vec(), "Login: "),
                (Vec::new(), "Password: "),
                (b"  MikroTik RouterOS".to_vec(), "[admin@sim] > "),
                (output, "[admin@sim] > "),
            ];
            let mut steps = Vec::new();
            for ((before, prompt), (replacement, noise)) in canonical.into_iter().zip(changes) {
                steps.extend(noise);
                steps.push(replacement.unwrap_or(DeviceStep::Prompt {
                    before,
                    prompt,
                    echo_back: false,
                }));
            }
            steps.extend(tail);
            steps
        })
}

fn device_step() -> impl Strategy<Value = DeviceStep> {
    let prompts = vec![
        "Login: ",
        "Username:",
        "Password: ",
        "[admin@sim] > ",
        "router#",
        "Login incorrect\r\nLogin: ",
        "% Bad passwords\r\nPassword: ",
        "",
    ];
    prop_oneof![
        3 => (
            prop::collection::vec(
                prop::sample::select(b"abc 123:>#$\r\n\t\x1b[0m%-".to_vec()),
                0..40
            ),
            prop::sample::select(prompts),
            prop::bool::weighted(0.2),
        )
            .prop_map(|(before, prompt, echo_back)| DeviceStep::Prompt {
                before,
                prompt,
                echo_back,
            }),
        1 => telnet_bytes(60).prop_map(DeviceStep::Noise),
        1 => telnet_command().prop_map(DeviceStep::Noise),
    ]
}

/// The device: writes each step, waiting up to 10 ms for the client's line after a
/// prompt (the wait only shapes the conversation; nothing is asserted on time), then
/// closes and reads until the client goes away.
async fn hostile_telnet_device(listener: TcpListener, steps: Vec<DeviceStep>) {
    let Ok((mut socket, _)) = listener.accept().await else {
        return;
    };
    // Steps go out in small writes; Nagle would hold each for a delayed ACK.
    let _ = socket.set_nodelay(true);
    let mut received: Vec<u8> = Vec::new();
    let mut buf = [0u8; 4096];
    let mut last_line = Vec::new();
    for step in steps {
        let (bytes, wait) = match step {
            DeviceStep::Prompt {
                mut before,
                prompt,
                echo_back,
            } => {
                if echo_back {
                    before.extend_from_slice(&last_line);
                }
                before.extend_from_slice(b"\r\n");
                before.extend_from_slice(prompt.as_bytes());
                (before, true)
            }
            DeviceStep::Noise(bytes) => (bytes, false),
        };
        let half = bytes.len() / 2;
        for part in [&bytes[..half], &bytes[half..]] {
            if socket.write_all(part).await.is_err() {
                return;
            }
        }
        if wait {
            let deadline = tokio::time::Instant::now() + Duration::from_millis(10);
            loop {
                if let Some(end) = received.iter().position(|&b| b == b'\n') {
                    last_line = received.drain(..=end).collect();
                    break;
                }
                match tokio::time::timeout_at(deadline, socket.read(&mut buf)).await {
                    Ok(Ok(n)) if n > 0 => received.extend_from_slice(&buf[..n]),
                    Ok(_) => return,
                    Err(_) => break,
                }
            }
        }
    }
    let _ = socket.shutdown().await;
    while let Ok(n) = socket.read(&mut buf).await {
        if n == 0 {
            break;
        }
    }
}

/// What every CLI-like result must satisfy, whatever the device did.
fn check_cli_result(result: &CliResult, commands: &[String]) -> Result<(), TestCaseError> {
    prop_assert!(result.exchanges.len() <= commands.len());
    if result.error.is_none() {
        prop_assert_eq!(result.exchanges.len(), commands.len());
    }
    for (exchange, command) in result.exchanges.iter().zip(commands) {
        prop_assert_eq!(&exchange.command, command);
    }
    if let Some(error) = &result.error {
        let text = error.to_string();
        prop_assert!(
            !text.contains(PASSWORD) && !text.contains(RADIUS_SECRET),
            "secret in error: {}",
            text
        );
    }
    Ok(())
}

#[test]
fn telnet_pool_against_a_hostile_device() {
    let rt = runtime("telnet_pool_against_a_hostile_device");
    fuzz(
        "telnet_pool_against_a_hostile_device",
        io_config(150),
        device_session(),
        &["done", "login rejected", "closed"],
        |steps, reach| {
            rt.block_on(async {
                let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
                let port = listener.local_addr().expect("addr").port();
                let device = tokio::spawn(hostile_telnet_device(listener, steps));
                // The prompt of the shipped mikrotik-telnet scheme.
                let prompt = SHIPPED
                    .get("mikrotik-telnet")
                    .and_then(|s| s.cli.prompt.clone());
                let options = TelnetOptions {
                    connect_timeout: Duration::from_secs(5),
                    prompt: prompt.expect("mikrotik-telnet has a prompt"),
                    ..TelnetOptions::default()
                };
                let pool = TelnetPool::new(target(port), options);
                let commands = vec!["/ip address print".to_string()];
                let result = pool.run(&commands, Duration::from_secs(3)).await;
                pool.close().await;
                drop(pool);
                device.await.expect("device task");
                check_cli_result(&result, &commands)?;
                for exchange in &result.exchanges {
                    prop_assert!(!exchange.output.contains('\r'));
                }
                reach.push(cli_outcome(&result));
                Ok(())
            })
        },
    );
    assert_no_panics("telnet_pool_against_a_hostile_device");
}

/// A name for how a CLI-like run ended.
fn cli_outcome(result: &CliResult) -> &'static str {
    match &result.error {
        None => "done",
        Some(SessionError::Auth(..)) => "login rejected",
        Some(SessionError::Closed(..)) => "closed",
        Some(SessionError::Timeout(..)) => "timeout",
        Some(SessionError::Protocol(..)) => "protocol error",
        Some(_) => "other error",
    }
}

// ---------------------------------------------------------------------------------
// RADIUS

fn hmac_md5(key: &[u8], data: &[u8]) -> [u8; 16] {
    use hmac::{Hmac, Mac};
    let mut mac = <Hmac<md5::Md5> as Mac>::new_from_slice(key).expect("any key length");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

fn md5_of(parts: &[&[u8]]) -> [u8; 16] {
    use md5::{Digest, Md5};
    let mut md5 = Md5::new();
    for part in parts {
        md5.update(part);
    }
    md5.finalize().into()
}

/// A reply as a NAS signs it: attributes (raw, so malformed ones can be signed too),
/// an optional Message-Authenticator at `ma_at` (computed unless `bad_ma`), then the
/// response authenticator over everything.
fn signed_reply(
    code: u8,
    id: u8,
    request_authenticator: &[u8; 16],
    attributes: &[(u8, Vec<u8>)],
    ma_at: Option<usize>,
    bad_ma: bool,
    secret: &[u8],
) -> Vec<u8> {
    let mut packet = vec![code, id, 0, 0];
    packet.extend_from_slice(request_authenticator);
    let mut ma_offset = None;
    for (i, (kind, value)) in attributes.iter().enumerate() {
        if ma_at == Some(i) {
            ma_offset = Some(packet.len() + 2);
            packet.extend_from_slice(&[80, 18]);
            packet.extend_from_slice(&[0; 16]);
        }
        packet.push(*kind);
        packet.push((value.len() + 2) as u8);
        packet.extend_from_slice(value);
    }
    if ma_at.is_some_and(|at| at >= attributes.len()) {
        ma_offset = Some(packet.len() + 2);
        packet.extend_from_slice(&[80, 18]);
        packet.extend_from_slice(&[0; 16]);
    }
    let len = packet.len() as u16;
    packet[2..4].copy_from_slice(&len.to_be_bytes());
    if let Some(offset) = ma_offset {
        let mut ma = hmac_md5(secret, &packet);
        if bad_ma {
            ma[0] ^= 1;
        }
        packet[offset..offset + 16].copy_from_slice(&ma);
    }
    let response = md5_of(&[&packet[..4], request_authenticator, &packet[20..], secret]);
    packet[4..20].copy_from_slice(&response);
    packet
}

/// Reply attributes: plain, Error-Cause, well-formed and malformed Vendor-Specific.
fn reply_attribute() -> impl Strategy<Value = (u8, Vec<u8>)> {
    let cause = prop_oneof![
        prop::sample::select(vec![201u32, 401, 402, 404, 503, 505, 506, 507, 508]),
        any::<u32>(),
    ];
    prop_oneof![
        3 => ((1u8..=255).prop_filter("not MA", |k| *k != 80), prop::collection::vec(any::<u8>(), 0..60)),
        2 => cause.prop_map(|c| (101u8, c.to_be_bytes().to_vec())),
        1 => prop::collection::vec(any::<u8>(), 0..8).prop_map(|v| (101u8, v)),
        2 => (
            prop::sample::select(vec![0u32, 9, 14988, 2011, u32::MAX]),
            prop::collection::vec((any::<u8>(), prop::collection::vec(any::<u8>(), 0..30)), 0..4),
        )
            .prop_map(|(vendor, subs)| {
                let mut v = vendor.to_be_bytes().to_vec();
                for (kind, data) in subs {
                    v.push(kind);
                    v.push((data.len() + 2) as u8);
                    v.extend(data);
                }
                (26u8, v)
            }),
        1 => prop::collection::vec(any::<u8>(), 0..20).prop_map(|v| (26u8, v)),
    ]
}

/// How `verify_reply` must flatten attributes: a well-formed Vendor-Specific becomes
/// its sub-attributes, anything else stays (vendor 0).
fn flatten(attributes: &[(u8, Vec<u8>)]) -> Vec<(u32, u8, Vec<u8>)> {
    let mut out = Vec::new();
    for (kind, value) in attributes {
        if *kind == 26 && value.len() >= 6 {
            let vendor = u32::from_be_bytes([value[0], value[1], value[2], value[3]]);
            let mut subs = Vec::new();
            let mut rest = &value[4..];
            let mut ok = true;
            while !rest.is_empty() {
                match rest.get(1).map(|l| *l as usize) {
                    Some(len) if len >= 2 && len <= rest.len() => {
                        subs.push((vendor, rest[0], rest[2..len].to_vec()));
                        rest = &rest[len..];
                    }
                    _ => {
                        ok = false;
                        break;
                    }
                }
            }
            if ok {
                out.extend(subs);
                continue;
            }
        }
        out.push((0, *kind, value.clone()));
    }
    out
}

static DICTIONARY: LazyLock<Dictionary> = LazyLock::new(Dictionary::builtin);

/// Attribute names of the shipped dictionary.
static ATTRIBUTE_NAMES: LazyLock<Vec<String>> = LazyLock::new(|| dictionary_words("ATTRIBUTE", 1));
/// Value names (`Session-Context-Not-Found`, ...) of the shipped dictionary.
static VALUE_NAMES: LazyLock<Vec<String>> = LazyLock::new(|| dictionary_words("VALUE", 2));

fn dictionary_words(keyword: &str, column: usize) -> Vec<String> {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("dictionaries/dictionary.nasd"),
    )
    .expect("shipped dictionary");
    let mut words: Vec<String> = text
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            (w.first() == Some(&keyword))
                .then(|| w.get(column).map(|s| s.to_string()))
                .flatten()
        })
        .collect();
    words.sort();
    words.dedup();
    words
}

/// A double-quoted value with arbitrary content, escapes valid or not.
fn quoted_value() -> impl Strategy<Value = String> {
    let part = prop_oneof![
        3 => "[ !#-\\[\\]-~]{0,12}",
        1 => prop::sample::select(vec![
            "\\\"", "\\\\", "\\n", "\\t", "\\r", "\\$", "\\?", "\\q", "\\", "\"", "ж", "\u{0}",
        ])
        .prop_map(str::to_string),
        1 => nasty(),
    ];
    prop::collection::vec(part, 0..4).prop_map(|p| format!("\"{}\"", p.concat()))
}

fn request_text() -> impl Strategy<Value = String> {
    let value = prop_oneof![
        3 => "[a-zA-Z0-9._:/-]{1,12}",
        2 => quoted_value(),
        1 => prop::sample::select(VALUE_NAMES.clone()),
        1 => prop::sample::select(vec![
            "0", "1", "4294967295", "4294967296", "-1", "0x10", "10.0.0.1", "1.2.3", "0x",
            "0x0a0b", "0xZZ", "0x+1", "", " ",
        ])
        .prop_map(str::to_string),
        1 => nasty(),
    ];
    let pair = (
        prop_oneof![
            6 => prop::sample::select(ATTRIBUTE_NAMES.clone()),
            1 => "[A-Za-z-]{1,10}",
        ],
        prop::sample::select(vec![" = ", "=", " =", "= ", " ", " == "]),
        value,
    )
        .prop_map(|(name, eq, value)| format!("{name}{eq}{value}"));
    (
        prop::sample::select(vec![
            "coa ",
            "disconnect ",
            "COA\n",
            "",
            "nope ",
            " coa\t",
            "coa",
        ]),
        prop::collection::vec(pair, 0..6),
        prop::sample::select(vec![", ", ",", "\n", " , ", ",\n", " "]),
        prop::option::weighted(0.1, nasty()),
    )
        .prop_map(|(start, pairs, separator, tail)| {
            format!(
                "{start}{}{}",
                pairs.join(separator),
                tail.unwrap_or_default()
            )
        })
}

fn dictionary_text() -> impl Strategy<Value = String> {
    let word = prop_oneof![
        prop::sample::select(vec![
            "ATTRIBUTE",
            "VALUE",
            "VENDOR",
            "BEGIN-VENDOR",
            "END-VENDOR",
            "$INCLUDE",
            "$INCLUDE-",
            "Mikrotik",
            "Cisco",
            "X-Attr",
            "User-Name",
            "Error-Cause",
            "string",
            "octets",
            "integer",
            "date",
            "ipaddr",
            "ipv6addr",
            "tlv",
            "has_tag",
            "encrypt=1",
            "has_tag,encrypt=2",
            "format=1,1",
            "format=2,1",
            "format=4,0",
            "0",
            "1",
            "255",
            "256",
            "0x1a",
            "0xffffffff",
            "0x100000000",
            "-1",
            "14988",
            "#",
            "dictionary.x",
            "/etc/passwd",
        ])
        .prop_map(str::to_string),
        "[A-Za-z0-9._-]{1,12}",
        nasty(),
    ];
    let line = prop::collection::vec(word, 0..7).prop_map(|w| w.join(" "));
    prop::collection::vec(line, 0..12).prop_map(|l| l.join("\n"))
}

/// A correctly signed reply is accepted with exactly its attributes; every single-bit
/// change, a cut, the wrong secret, identifier or request authenticator, a bad
/// Message-Authenticator and malformed attributes are rejected.
#[test]
fn radius_reply_verification() {
    let strategy = (
        (
            prop_oneof![prop::sample::select(vec![41u8, 42, 44, 45]), any::<u8>()],
            any::<u8>(),
            any::<[u8; 16]>(),
            prop::collection::vec(reply_attribute(), 0..10),
            prop::option::of(0usize..11),
            prop::collection::vec(any::<u8>(), 1..40),
        ),
        (
            prop::collection::vec(any::<u8>(), 0..30),
            any::<Index>(),
            1u8..=255,
            any::<Index>(),
        ),
    );
    fuzz(
        "radius_reply_verification",
        config(3000),
        strategy,
        &[
            "error cause",
            "vendor attributes",
            "message authenticator",
            "done",
        ],
        |(
            (code, id, request_authenticator, attributes, ma_at, secret),
            (padding, flip_at, flip_mask, cut_at),
        ),
         reach| {
            let packet = signed_reply(
                code,
                id,
                &request_authenticator,
                &attributes,
                ma_at,
                false,
                &secret,
            );
            let reply = verify_reply(&packet, id, &request_authenticator, &secret);
            prop_assert!(reply.is_ok(), "{:?}", reply);
            let reply = reply.expect("checked");
            prop_assert_eq!(reply.code, code);
            // Compare without the Message-Authenticator (its bytes are computed).
            let strip = |list: Vec<(u32, u8, Vec<u8>)>| -> Vec<(u32, u8, Vec<u8>)> {
                list.into_iter()
                    .filter(|(v, k, _)| !(*v == 0 && *k == 80))
                    .collect()
            };
            let expected = flatten(&attributes);
            prop_assert_eq!(strip(reply.attributes.clone()), strip(expected.clone()));
            let described = describe_reply(&reply, &DICTIONARY);
            prop_assert!(described.starts_with(&radius::code_name(code)));
            for disconnect in [false, true] {
                let verdict = radius::classify(code, disconnect, reply.error_cause());
                let ack = if disconnect { 41 } else { 44 };
                if verdict == Verdict::Done {
                    reach.push("done");
                    prop_assert!(
                        code == ack
                            || (disconnect && code == 42 && reply.error_cause() == Some(503))
                    );
                }
            }
            if reply.error_cause().is_some() {
                reach.push("error cause");
            }
            if expected.iter().any(|(vendor, _, _)| *vendor != 0) {
                reach.push("vendor attributes");
            }
            if ma_at.is_some() {
                reach.push("message authenticator");
            }

            // Padding after the length is allowed (RFC 2865 section 3).
            let mut padded = packet.clone();
            padded.extend_from_slice(&padding);
            prop_assert!(verify_reply(&padded, id, &request_authenticator, &secret).is_ok());

            let mut flipped = packet.clone();
            let at = flip_at.index(packet.len());
            flipped[at] ^= flip_mask;
            prop_assert!(
                verify_reply(&flipped, id, &request_authenticator, &secret).is_err(),
                "a change of byte {} was accepted",
                at
            );
            let cut = cut_at.index(packet.len());
            prop_assert!(
                verify_reply(&packet[..cut], id, &request_authenticator, &secret).is_err()
            );
            let mut wrong_secret = secret.clone();
            wrong_secret.push(b'x');
            prop_assert!(verify_reply(&packet, id, &request_authenticator, &wrong_secret).is_err());
            prop_assert!(
                verify_reply(&packet, id.wrapping_add(1), &request_authenticator, &secret).is_err()
            );
            let mut other_authenticator = request_authenticator;
            other_authenticator[15] ^= 0x80;
            prop_assert!(verify_reply(&packet, id, &other_authenticator, &secret).is_err());
            if ma_at.is_some() {
                let bad = signed_reply(
                    code,
                    id,
                    &request_authenticator,
                    &attributes,
                    ma_at,
                    true,
                    &secret,
                );
                prop_assert!(verify_reply(&bad, id, &request_authenticator, &secret).is_err());
            }
            // A NAS that knows the secret still cannot make us read malformed attributes:
            // the last attribute claims more bytes than there are, signed correctly.
            let mut malformed = attributes.clone();
            malformed.push((1, vec![0; 3]));
            let mut broken = signed_reply(
                code,
                id,
                &request_authenticator,
                &malformed,
                None,
                false,
                &secret,
            );
            let last_len = broken.len() - 4;
            broken[last_len] = 40;
            let resigned = md5_of(&[&broken[..4], &request_authenticator, &broken[20..], &secret]);
            broken[4..20].copy_from_slice(&resigned);
            prop_assert!(verify_reply(&broken, id, &request_authenticator, &secret).is_err());
            Ok(())
        },
    );
}

/// Arbitrary datagrams are never accepted, as replies or as requests.
#[test]
fn radius_arbitrary_datagrams_are_rejected() {
    let datagram = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..64),
        prop::collection::vec(any::<u8>(), 0..5000),
        // A plausible header with a length that fits, and random attributes.
        (
            any::<[u8; 2]>(),
            20u16..300,
            prop::collection::vec(any::<u8>(), 0..300)
        )
            .prop_map(|(header, len, rest)| {
                let mut v = header.to_vec();
                v.extend_from_slice(&len.to_be_bytes());
                v.extend(rest);
                v
            }),
    ];
    fuzz(
        "radius_arbitrary_datagrams_are_rejected",
        config(3000),
        (
            datagram,
            any::<u8>(),
            any::<[u8; 16]>(),
            prop::collection::vec(any::<u8>(), 1..40),
        ),
        &["framed"],
        |(datagram, id, request_authenticator, secret), reach| {
            prop_assert!(verify_reply(&datagram, id, &request_authenticator, &secret).is_err());
            prop_assert!(verify_request(&datagram, &secret).is_err());
            if datagram.len() >= 20
                && usize::from(u16::from_be_bytes([datagram[2], datagram[3]])) <= datagram.len()
            {
                reach.push("framed");
            }
            Ok(())
        },
    );
}

/// Request text: no panic; what parses encodes into a packet a NAS accepts, and a
/// single changed bit makes the NAS reject it.
#[test]
fn radius_request_text() {
    fuzz(
        "radius_request_text",
        config(3000),
        (
            request_text(),
            any::<u8>(),
            prop::collection::vec(any::<u8>(), 1..40),
            any::<Index>(),
            1u8..=255,
        ),
        &["parsed", "refused", "encoded"],
        |(text, id, secret, flip_at, flip_mask), reach| {
            let Ok(request) = parse_request(&text, &DICTIONARY) else {
                reach.push("refused");
                return Ok(());
            };
            reach.push("parsed");
            prop_assert!(!request.attributes.is_empty());
            let line = radius::radclient_line(&request, "10.0.0.1", 3799);
            prop_assert!(line.contains("$SECRET"));
            let Ok((packet, _)) = encode_request(&request, id, &secret) else {
                return Ok(());
            };
            reach.push("encoded");
            prop_assert!(verify_request(&packet, &secret).is_ok());
            let mut flipped = packet.clone();
            flipped[flip_at.index(packet.len())] ^= flip_mask;
            prop_assert!(verify_request(&flipped, &secret).is_err());
            Ok(())
        },
    );
}

/// Any value the radius dialect lets through reads back as exactly that value.
#[test]
fn radius_dialect_values_read_back() {
    fuzz(
        "radius_dialect_values_read_back",
        config(3000),
        nasty(),
        &["bare", "quoted", "refused"],
        |value, reach| {
            let Ok(escaped) = escape(Dialect::Radius, &value) else {
                reach.push("refused");
                prop_assert!(value.chars().any(char::is_control));
                return Ok(());
            };
            reach.push(if escaped == value { "bare" } else { "quoted" });
            let text = format!("coa User-Name = {escaped}, Acct-Session-Id = 1");
            match parse_request(&text, &DICTIONARY) {
                Ok(request) => {
                    prop_assert_eq!(request.attributes.len(), 2);
                    prop_assert_eq!(
                        &request.attributes[0].value,
                        &RadiusValue::Text(value.clone())
                    );
                }
                Err(e) => prop_assert!(value.is_empty() || value.len() > 253, "{}: {}", text, e),
            }
            Ok(())
        },
    );
}

/// Dictionary text: no panic, and a file that fails adds nothing.
#[test]
fn radius_dictionary_text() {
    fuzz(
        "radius_dictionary_text",
        config(1000),
        dictionary_text(),
        &["loaded", "refused"],
        |text, reach| {
            let mut dict = DICTIONARY.clone();
            let names: Vec<String> = text
                .lines()
                .filter_map(|l| {
                    let w: Vec<&str> = l.split_whitespace().collect();
                    (w.first() == Some(&"ATTRIBUTE"))
                        .then(|| w.get(1).map(|s| s.to_string()))
                        .flatten()
                })
                .collect();
            let before: Vec<_> = names.iter().map(|n| dict.attribute(n).cloned()).collect();
            if dict.parse_text(&text, "fuzz").is_err() {
                reach.push("refused");
                let after: Vec<_> = names.iter().map(|n| dict.attribute(n).cloned()).collect();
                prop_assert_eq!(before, after);
            } else {
                reach.push("loaded");
            }
            Ok(())
        },
    );
}

/// What a hostile NAS sends before the real reply.
#[derive(Debug, Clone)]
enum Forgery {
    Garbage(Vec<u8>),
    /// The real reply with one byte changed.
    Flipped(Index, u8),
    WrongSecret,
    WrongId,
    /// The real reply cut short.
    Cut(Index),
}

fn forgery() -> impl Strategy<Value = Forgery> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..80).prop_map(Forgery::Garbage),
        (any::<Index>(), 1u8..=255).prop_map(|(i, m)| Forgery::Flipped(i, m)),
        Just(Forgery::WrongSecret),
        Just(Forgery::WrongId),
        any::<Index>().prop_map(Forgery::Cut),
    ]
}

#[test]
fn radius_client_against_a_forging_nas() {
    let rt = runtime("radius_client_against_a_forging_nas");
    let strategy = (
        any::<bool>(),
        prop::sample::select(vec![41u8, 42, 44, 45, 2, 3]),
        prop::option::of(prop::sample::select(vec![402u32, 404, 503, 505, 506, 999])),
        prop::collection::vec(reply_attribute(), 0..4),
        prop::collection::vec(forgery(), 0..6),
    );
    fuzz(
        "radius_client_against_a_forging_nas",
        io_config(300),
        strategy,
        &["done", "failed", "retry", "forgeries ignored"],
        |(disconnect, code, cause, extra, forgeries), reach| {
            rt.block_on(async {
                let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
                let port = socket.local_addr().expect("addr").port();
                let mut attributes = extra.clone();
                if let Some(cause) = cause {
                    attributes.push((101, cause.to_be_bytes().to_vec()));
                }
                let forged = !forgeries.is_empty();
                let nas = tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let (n, peer) = socket.recv_from(&mut buf).await.expect("request");
                    let request = &buf[..n];
                    let id = request[1];
                    let mut authenticator = [0u8; 16];
                    authenticator.copy_from_slice(&request[4..20]);
                    let secret = RADIUS_SECRET.as_bytes();
                    let real = signed_reply(
                        code,
                        id,
                        &authenticator,
                        &attributes,
                        Some(0),
                        false,
                        secret,
                    );
                    for forgery in forgeries {
                        let datagram = match forgery {
                            Forgery::Garbage(bytes) => bytes,
                            Forgery::Flipped(at, mask) => {
                                let mut v = real.clone();
                                let at = at.index(v.len());
                                v[at] ^= mask;
                                v
                            }
                            Forgery::WrongSecret => signed_reply(
                                code,
                                id,
                                &authenticator,
                                &attributes,
                                Some(0),
                                false,
                                b"not-the-secret",
                            ),
                            Forgery::WrongId => signed_reply(
                                code,
                                id.wrapping_add(1),
                                &authenticator,
                                &attributes,
                                Some(0),
                                false,
                                secret,
                            ),
                            Forgery::Cut(at) => real[..at.index(real.len())].to_vec(),
                        };
                        let _ = socket.send_to(&datagram, peer).await;
                    }
                    let _ = socket.send_to(&real, peer).await;
                    flatten(&attributes)
                });
                let options = RadiusOptions {
                    timeout: Duration::from_secs(5),
                    tries: 1,
                    dictionary: Arc::new(Dictionary::builtin()),
                };
                let client = RadiusClient::new(target(port), options);
                let text = if disconnect {
                    "disconnect User-Name = \"u1\""
                } else {
                    "coa User-Name = \"u1\", Filter-Id = \"gold\""
                };
                let reply = client.send(text).await;
                let sent = nas.await.expect("nas task");
                let cause_sent = sent.iter().find_map(|(v, k, value)| {
                    (*v == 0 && *k == 101)
                        .then(|| <[u8; 4]>::try_from(value.as_slice()).ok())
                        .flatten()
                        .map(u32::from_be_bytes)
                });
                // Only the correctly signed reply decides, whatever came before it.
                let expected = radius::classify(code, disconnect, cause_sent);
                prop_assert_eq!(&reply.verdict, &expected);
                prop_assert!(
                    reply.answer.starts_with(&radius::code_name(code)),
                    "{}",
                    reply.answer
                );
                for line in reply.commands.iter().chain([&reply.answer]) {
                    prop_assert!(!line.contains(RADIUS_SECRET));
                }
                reach.push(match expected {
                    Verdict::Done => "done",
                    Verdict::Failed(_) => "failed",
                    Verdict::Retry(_) => "retry",
                    Verdict::Unreachable(_) => "unreachable",
                    Verdict::Requeue(_) => "requeue",
                });
                if forged {
                    reach.push("forgeries ignored");
                }
                Ok(())
            })
        },
    );
    assert_no_panics("radius_client_against_a_forging_nas");
}

// ---------------------------------------------------------------------------------
// RouterOS API

/// Bytes of an API stream, biased towards short lengths, the length-class boundaries,
/// control bytes and reply words.
fn api_byte_of(n: u16) -> u8 {
    const SPECIAL: &[u8] = &[
        0x7f, 0x80, 0xbf, 0xc0, 0xdf, 0xe0, 0xef, 0xf0, 0xf7, 0xf8, 0xff, b'!', b'r', b'e', b'=',
        b'.', b't', b'a', b'g', b'?', b'd', b'o', b'n',
    ];
    let [high, low] = n.to_be_bytes();
    match high {
        0..=95 => low % 0x10,
        96..=159 => low,
        _ => SPECIAL[usize::from(low) % SPECIAL.len()],
    }
}

fn api_bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u16>(), 0..max)
        .prop_map(|v| v.into_iter().map(api_byte_of).collect())
}

fn api_stream() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        3 => api_bytes(40),
        // Huge declared lengths, followed by a little data.
        1 => prop::sample::select(vec![
            vec![0xE0u8, 0xFF, 0xFF, 0xFF],
            vec![0xDF, 0xFF, 0xFF],
            vec![0xF0, 0x00, 0xFF, 0xFF, 0xFF],
            vec![0xF0, 0x01, 0x00, 0x00, 0x00],
            vec![0xF0, 0xFF, 0xFF, 0xFF, 0xFF],
            vec![0xEF, 0xFF, 0xFF, 0xFF],
        ]),
        2 => prop::collection::vec(prop::collection::vec("[!=.a-z0-9]{0,12}", 0..5), 0..3)
            .prop_map(|sentences| sentences.iter().flat_map(|s| encode_sentence(s)).collect()),
    ];
    prop::collection::vec(piece, 0..10).prop_map(|p| p.concat())
}

/// Everything the decoder makes of `pieces`: the sentences and the error that
/// stopped it, if any.
fn decode_all(pieces: &[&[u8]]) -> (Vec<Vec<String>>, Option<String>) {
    let mut decoder = SentenceDecoder::new();
    let mut sentences = Vec::new();
    for piece in pieces {
        decoder.push(piece);
        loop {
            match decoder.next_sentence() {
                Ok(Some(sentence)) => sentences.push(sentence),
                Ok(None) => break,
                Err(e) => return (sentences, Some(e)),
            }
        }
    }
    (sentences, None)
}

fn api_words() -> impl Strategy<Value = Vec<String>> {
    let word = prop_oneof![
        4 => any::<String>().prop_filter("non-empty", |s| !s.is_empty()),
        1 => (1usize..20_000).prop_map(|n| "w".repeat(n)),
        1 => prop::sample::select(vec!["!re", "!done", "=.id=*1", ".tag=5", "=message=x"]).prop_map(str::to_string),
    ];
    prop::collection::vec(word, 0..6)
}

fn command_text() -> impl Strategy<Value = String> {
    let first = prop_oneof![
        4 => prop::sample::select(vec![
            "/ip/firewall/address-list/add", "/queue/simple/set", "/system/identity/print",
            "/x", "/", "ip/x", "/a b",
        ])
        .prop_map(str::to_string),
        1 => nasty(),
    ];
    let value = prop_oneof![
        3 => "[a-z0-9./*,:-]{0,10}",
        2 => quoted_value(),
        1 => nasty(),
    ];
    let word = (
        prop::sample::select(vec!["=", "=", "?", ".", "=.id=", "?#", "", ".tag="]),
        "[a-z.-]{0,8}",
        prop::sample::select(vec!["=", "=", ""]),
        value,
    )
        .prop_map(|(a, b, c, d)| format!("{a}{b}{c}{d}"));
    (
        first,
        prop::collection::vec(word, 0..6),
        prop::sample::select(vec![" ", " ", "  ", "\t", "\n", "\u{3000}"]),
    )
        .prop_map(|(first, words, separator)| {
            let mut all = vec![first];
            all.extend(words);
            all.join(separator)
        })
}

#[test]
fn api_length_any_prefix() {
    fuzz(
        "api_length_any_prefix",
        config(3000),
        prop::collection::vec(any::<u8>(), 0..8),
        &["length", "more needed", "refused"],
        |bytes, reach| {
            match decode_length(&bytes) {
                Ok(Some((_, used))) => {
                    reach.push("length");
                    prop_assert!((1..=5).contains(&used) && used <= bytes.len());
                }
                Ok(None) => reach.push("more needed"),
                Err(_) => reach.push("refused"),
            }
            Ok(())
        },
    );
}

#[test]
fn api_length_round_trip() {
    fuzz(
        "api_length_round_trip",
        config(3000),
        prop_oneof![0usize..0x200, 0usize..0x30_0000, 0usize..=u32::MAX as usize],
        &["1 byte", "2 bytes", "3 bytes", "4 bytes", "5 bytes"],
        |n, reach| {
            let encoded = encode_length(n);
            prop_assert_eq!(decode_length(&encoded), Ok(Some((n, encoded.len()))));
            // Any proper prefix asks for more bytes.
            for cut in 0..encoded.len() {
                prop_assert_eq!(decode_length(&encoded[..cut]), Ok(None));
            }
            reach.push(["", "1 byte", "2 bytes", "3 bytes", "4 bytes", "5 bytes"][encoded.len()]);
            Ok(())
        },
    );
}

/// Any bytes, any chunking: the same sentences and error as in one read, and nothing
/// allocated beyond a small multiple of what arrived, whatever length a prefix
/// declares.
#[test]
fn api_decoder_any_bytes_any_chunking() {
    fuzz(
        "api_decoder_any_bytes_any_chunking",
        config(3000),
        (api_stream(), cuts()),
        &["sentences", "refused", "huge length waiting"],
        |(data, cuts), reach| {
            let pieces = chunks(&data, &cuts);
            LARGEST.with(|l| l.set(0));
            let split = decode_all(&pieces);
            let largest = LARGEST.with(Cell::get);
            let whole = decode_all(&[&data]);
            prop_assert_eq!(&split, &whole);
            prop_assert!(
                largest <= 64 * data.len() + 64 * 1024,
                "{} bytes allocated at once for {} bytes of input",
                largest,
                data.len()
            );
            if !whole.0.is_empty() {
                reach.push("sentences");
            }
            if whole.1.is_some() {
                reach.push("refused");
            }
            if whole.1.is_none() && data.windows(4).any(|w| w == [0xE0, 0xFF, 0xFF, 0xFF]) {
                reach.push("huge length waiting");
            }
            Ok(())
        },
    );
}

/// encode -> decode is the identity for sentences split anywhere.
#[test]
fn api_sentences_round_trip() {
    fuzz(
        "api_sentences_round_trip",
        config(1000),
        (prop::collection::vec(api_words(), 0..5), cuts()),
        &["long word"],
        |(sentences, cuts), reach| {
            let wire: Vec<u8> = sentences.iter().flat_map(|s| encode_sentence(s)).collect();
            let (decoded, error) = decode_all(&chunks(&wire, &cuts));
            prop_assert_eq!(error, None);
            prop_assert_eq!(&decoded, &sentences);
            if sentences.iter().flatten().any(|w| w.len() >= 0x4000) {
                reach.push("long word");
            }
            Ok(())
        },
    );
}

/// Command text: no panic; what parses is a command word and attribute, query or API
/// words, never `.tag` or an empty word, and survives the wire.
#[test]
fn api_parse_command() {
    fuzz(
        "api_parse_command",
        config(3000),
        command_text(),
        &["parsed", "refused"],
        |text, reach| {
            let Ok(words) = parse_command(&text) else {
                reach.push("refused");
                return Ok(());
            };
            reach.push("parsed");
            prop_assert!(words[0].starts_with('/') && words[0].len() > 1);
            for word in &words[1..] {
                prop_assert!(!word.is_empty() && !word.starts_with(".tag="));
                prop_assert!(matches!(word.as_bytes()[0], b'=' | b'?' | b'.'));
            }
            let (decoded, error) = decode_all(&[&encode_sentence(&words)]);
            prop_assert_eq!(error, None);
            prop_assert_eq!(decoded, vec![words]);
            Ok(())
        },
    );
}

/// Any value the routeros dialect lets through is one attribute word with exactly that
/// value.
#[test]
fn routeros_dialect_values_read_back() {
    fuzz(
        "routeros_dialect_values_read_back",
        config(3000),
        nasty(),
        &["bare", "quoted", "refused"],
        |value, reach| {
            let Ok(escaped) = escape(Dialect::Routeros, &value) else {
                reach.push("refused");
                prop_assert!(value.chars().any(char::is_control));
                return Ok(());
            };
            reach.push(if escaped == value { "bare" } else { "quoted" });
            let words = parse_command(&format!(
                "/ip/firewall/address-list/add =comment={escaped} =list=x"
            ));
            prop_assert_eq!(
                words,
                Ok(vec![
                    "/ip/firewall/address-list/add".to_string(),
                    format!("=comment={value}"),
                    "=list=x".to_string(),
                ])
            );
            Ok(())
        },
    );
}

/// A word of a reply sentence from the hostile API device.
#[derive(Debug, Clone)]
enum ReplyWord {
    Text(String),
    /// `.tag=` of the sentence being answered.
    Tag,
    WrongTag,
    /// `.tag=` if the client's sentence had one (commands do, login does not), so that
    /// a proper answer really ends what the client waits for.
    TagIfAsked,
}

#[derive(Debug, Clone)]
enum ReplyItem {
    Sentence(Vec<ReplyWord>),
    Raw(Vec<u8>),
}

/// The device's answer to one client sentence. `proper` answers end with the `!done`
/// the client waits for (tagged, or untagged at login) and hold whole sentences only;
/// after any other answer the device hangs up, so no case waits on a timeout.
#[derive(Debug, Clone)]
struct ApiTurn {
    items: Vec<ReplyItem>,
    proper: bool,
}

fn reply_word() -> impl Strategy<Value = ReplyWord> {
    prop_oneof![
        4 => prop::sample::select(vec![
            "!re", "!done", "!trap", "!fatal", "!empty", "!weird", "=ret=", "=ret=*1",
            "=ret=00112233445566778899aabbccddeeff", "=ret=zz", "=message=failure: x",
            "=message=", "=.id=*1", "=.id=*A", "=list=allowed", "=address=10.0.0.1",
            "=comment=x y", "=", "==", "x", ".id=*1", "=category=1",
        ])
        .prop_map(|s| ReplyWord::Text(s.to_string())),
        2 => Just(ReplyWord::Tag),
        1 => Just(ReplyWord::WrongTag),
        1 => nasty().prop_filter("non-empty", |s| !s.is_empty()).prop_map(ReplyWord::Text),
    ]
}

fn api_turn() -> impl Strategy<Value = ApiTurn> {
    let sentence = prop::collection::vec(reply_word(), 0..6)
        .prop_map(ReplyItem::Sentence)
        .boxed();
    prop_oneof![
        3 => (prop::collection::vec(sentence.clone(), 0..4), any::<bool>(), prop::option::of("=ret=[*0-9A-F]{1,4}"))
            .prop_map(|(mut items, tagged, ret)| {
                let mut done = vec![ReplyWord::Text("!done".into())];
                done.extend(ret.map(ReplyWord::Text));
                done.push(if tagged { ReplyWord::Tag } else { ReplyWord::TagIfAsked });
                items.push(ReplyItem::Sentence(done));
                ApiTurn { items, proper: true }
            }),
        1 => prop::collection::vec(
            prop_oneof![
                2 => sentence,
                1 => api_bytes(30).prop_map(ReplyItem::Raw),
            ],
            0..5,
        )
        .prop_map(|items| ApiTurn { items, proper: false }),
    ]
}

async fn hostile_api_device(listener: TcpListener, turns: Vec<ApiTurn>) {
    let Ok((mut socket, _)) = listener.accept().await else {
        return;
    };
    let _ = socket.set_nodelay(true);
    let mut decoder = SentenceDecoder::new();
    let mut buf = [0u8; 4096];
    'turns: for turn in turns {
        // The client's next sentence.
        let sentence = loop {
            match decoder.next_sentence() {
                Ok(Some(s)) if !s.is_empty() => break s,
                Ok(Some(_)) => continue,
                Ok(None) => {}
                Err(_) => break 'turns,
            }
            match socket.read(&mut buf).await {
                Ok(n) if n > 0 => decoder.push(&buf[..n]),
                _ => break 'turns,
            }
        };
        let asked = sentence.iter().find_map(|w| w.strip_prefix(".tag="));
        let tag = asked.unwrap_or("").to_string();
        let mut bytes = Vec::new();
        for item in &turn.items {
            match item {
                ReplyItem::Raw(raw) => bytes.extend_from_slice(raw),
                ReplyItem::Sentence(words) => {
                    let words: Vec<String> = words
                        .iter()
                        .map(|w| match w {
                            ReplyWord::Text(t) => t.clone(),
                            ReplyWord::Tag => format!(".tag={tag}"),
                            ReplyWord::WrongTag => format!(".tag={tag}9"),
                            ReplyWord::TagIfAsked => match asked {
                                Some(_) => format!(".tag={tag}"),
                                None => String::new(),
                            },
                        })
                        .filter(|w| !w.is_empty())
                        .collect();
                    bytes.extend(encode_sentence(&words));
                }
            }
        }
        if socket.write_all(&bytes).await.is_err() || !turn.proper {
            break;
        }
    }
    let _ = socket.shutdown().await;
    while let Ok(n) = socket.read(&mut buf).await {
        if n == 0 {
            break;
        }
    }
}

#[test]
fn api_pool_against_a_hostile_device() {
    let rt = runtime("api_pool_against_a_hostile_device");
    let commands = prop::collection::vec(
        prop::sample::select(vec![
            "/ip/firewall/address-list/add =list=a =address=10.0.0.1",
            "/ip/firewall/address-list/remove ?comment=crb_1",
            "/queue/simple/set =max-limit=1k/1k ?name=q",
            "/system/identity/print",
        ])
        .prop_map(str::to_string),
        1..3,
    );
    fuzz(
        "api_pool_against_a_hostile_device",
        io_config(300),
        (
            prop::collection::vec(api_turn(), 0..6),
            commands,
            any::<bool>(),
        ),
        &["done", "login rejected", "closed", "protocol error"],
        |(turns, commands, legacy_login), reach| {
            rt.block_on(async {
                let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
                let port = listener.local_addr().expect("addr").port();
                let device = tokio::spawn(hostile_api_device(listener, turns));
                let options = ApiOptions {
                    connect_timeout: Duration::from_secs(5),
                    legacy_login,
                    ..ApiOptions::default()
                };
                let pool = ApiPool::new(target(port), options);
                let result = pool.run(&commands, Duration::from_secs(5)).await;
                pool.close().await;
                drop(pool);
                device.await.expect("device task");
                check_cli_result(&result, &commands)?;
                reach.push(cli_outcome(&result));
                Ok(())
            })
        },
    );
    assert_no_panics("api_pool_against_a_hostile_device");
}

// ---------------------------------------------------------------------------------
// CLI answer classification

static SHIPPED: LazyLock<SchemeSet> = LazyLock::new(|| {
    let (set, errors) = SchemeSet::load_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("schemes"));
    assert!(errors.is_empty(), "shipped schemes load: {errors:?}");
    set
});

fn device_output() -> impl Strategy<Value = String> {
    let line = prop_oneof![
        3 => prop::sample::select(vec![
            "failure: already have such entry", "no such item", "failure: no such item",
            "% Invalid input detected at '^' marker.", "input does not match any value",
            "expected end of command (line 1 column 5)", "bad command name x", "ok",
            "Device busy", "syntax error (line 1 column 1)", "% Incomplete command.",
            "ipset v7.1: Element cannot be added to the set: it's already added",
            "ipset v7.1: Element cannot be deleted from the set: it's not added",
            "RTNETLINK answers: File exists", "Error: Exclusivity flag on, cannot modify.",
            "", " ", "ret=*1", "stderr: x",
        ])
        .prop_map(str::to_string),
        1 => nasty(),
    ];
    prop::collection::vec(line, 0..4).prop_map(|l| l.join("\n"))
}

fn session_error() -> impl Strategy<Value = Option<SessionError>> {
    let label = Just("nas 1 (10.0.0.1:22)".to_string());
    prop::option::of(prop_oneof![
        (label.clone(), nasty()).prop_map(|(l, m)| SessionError::Connect(l, m)),
        (label.clone(), nasty()).prop_map(|(l, m)| SessionError::Auth(l, m)),
        (label.clone(), nasty()).prop_map(|(l, m)| SessionError::Timeout(l, m)),
        (label.clone(), nasty()).prop_map(|(l, m)| SessionError::Closed(l, m)),
        (label, nasty()).prop_map(|(l, m)| SessionError::Protocol(l, m)),
    ])
}

#[test]
fn answers_are_classified_without_surprises() {
    let strategy = (
        any::<Index>(),
        prop::sample::select(vec![
            "user_add",
            "user_del",
            "user_drop",
            "user_accept",
            "user_rate_set",
            "other",
        ]),
        prop::collection::vec(device_output(), 0..4),
        0usize..3,
        session_error(),
    );
    fuzz(
        "answers_are_classified_without_surprises",
        config(3000),
        strategy,
        &["done", "failed", "retry", "unreachable", "benign"],
        |(scheme, cmd, outputs, commands_extra, error), reach| {
            let names = SHIPPED.names();
            let scheme = SHIPPED
                .get(&names[scheme.index(names.len())])
                .expect("scheme");
            let patterns = &scheme.answers;
            let result = CliResult {
                exchanges: outputs
                    .iter()
                    .enumerate()
                    .map(|(i, o)| Exchange {
                        command: format!("c{i}"),
                        output: o.clone(),
                    })
                    .collect(),
                error: error.clone(),
            };
            let commands: Vec<String> = (0..outputs.len() + commands_extra)
                .map(|i| format!("c{i}"))
                .collect();
            let reply = nasd::answer::reply(cmd, &commands, &result, patterns);
            prop_assert_eq!(&reply.answer, &nasd::answer::answer_text(&result));
            prop_assert!(commands.starts_with(&reply.commands));
            if error.is_none() {
                prop_assert_eq!(reply.commands.len(), commands.len());
            }
            let matched = outputs.iter().flat_map(|o| o.lines()).any(|line| {
                patterns
                    .failure
                    .iter()
                    .chain(&patterns.retry)
                    .any(|re| re.is_match(line))
            });
            match &reply.verdict {
                Verdict::Done => {
                    prop_assert!(error.is_none());
                    reach.push(if matched { "benign" } else { "done" });
                }
                Verdict::Failed(why) => {
                    reach.push("failed");
                    prop_assert!(matched && why.starts_with("device refused `c"), "{}", why);
                }
                Verdict::Retry(_) => {
                    reach.push("retry");
                    prop_assert!(matched || error.is_some());
                }
                Verdict::Unreachable(_) => {
                    reach.push("unreachable");
                    prop_assert!(error.is_some());
                }
                Verdict::Requeue(why) => prop_assert!(false, "requeue from a CLI answer: {}", why),
            }
            if error.is_none() && !matched {
                prop_assert_eq!(&reply.verdict, &Verdict::Done);
            }
            Ok(())
        },
    );
}

// ---------------------------------------------------------------------------------
// Scheme rendering

const DIALECTS: [&str; 5] = ["shell", "routeros", "cisco", "plain", "radius"];

/// An expression: a variable, literal or call, filters, maybe an operator and another.
fn expression() -> impl Strategy<Value = String> {
    let atom = prop::sample::select(vec![
        "a",
        "b",
        "login",
        "ip",
        "x",
        "nas_password",
        "missing",
        "loop",
        "'s'",
        "\"q\"",
        "1",
        "2",
        "-1",
        "1.5",
        "none",
        "true",
        "[1, 2]",
        "{'k': 1}",
        "range(3)",
        "a.b",
        "a[0]",
        "a['k']",
        "nas_password[0]",
        "nas_password[1:4]",
        "(a)",
        "namespace()",
        "18446744073709551616",
        "'\\u{1b}'",
        "'\\x00'",
        "debug()",
        "self",
        "super()",
    ]);
    let filter = prop::sample::select(vec![
        "upper",
        "lower",
        "safe",
        "e",
        "escape",
        "int",
        "float",
        "string",
        "length",
        "first",
        "last",
        "list",
        "trim",
        "join(',')",
        "default('d')",
        "replace('a','b')",
        "tojson",
        "urlencode",
        "abs",
        "round",
        "batch(2)",
        "items",
        "reverse",
        "sort",
        "unique",
        "title",
        "capitalize",
        "indent(2)",
        "pprint",
        "bool",
        "dictsort",
        "attr('x')",
        "map('upper')",
        "select",
        "reject",
        "slice(2)",
        "min",
        "max",
        "sum",
        "split",
        "lines",
        "format(1)",
        "nope",
    ]);
    let operator = prop::sample::select(vec![
        " + ", " - ", " * ", " / ", " // ", " % ", " ~ ", " == ", " != ", " < ", " and ", " or ",
        " in ", " is ", " is not ", " if ", " else ", "(", ")", ", ", ".", "|",
    ]);
    (
        atom.clone(),
        prop::collection::vec(filter, 0..3),
        prop::option::of((operator, atom)),
    )
        .prop_map(|(atom, filters, rest)| {
            let mut e = atom.to_string();
            for f in filters {
                e.push('|');
                e.push_str(f);
            }
            if let Some((op, other)) = rest {
                e.push_str(op);
                e.push_str(other);
            }
            e
        })
}

/// A template: literal text, `{{ }}` expressions and tags (balanced or not), and loose
/// template tokens that make it malformed. Literal text has no control characters,
/// and nothing repeats or ranges far enough to make a case slow.
fn template() -> impl Strategy<Value = String> {
    let part = prop_oneof![
        3 => "[ -~]{0,8}".prop_map(|s| s.replace(['{', '}', '%', '#'], "")),
        6 => expression().prop_map(|e| format!("{{{{ {e} }}}}")),
        1 => (expression(), expression())
            .prop_map(|(c, e)| format!("{{% if {c} %}}{{{{ {e} }}}}{{% else %}}-{{% endif %}}")),
        1 => expression().prop_map(|e| format!("{{% for i in {e} %}}{{{{ i }}}}{{% endfor %}}")),
        1 => expression().prop_map(|e| format!("{{% set y = {e} %}}{{{{ y }}}}")),
        1 => expression()
            .prop_map(|e| format!("{{% filter upper %}}{{{{ {e} }}}}{{% endfilter %}}")),
        1 => expression().prop_map(|e| format!("{{% include {e} %}}")),
        1 => expression().prop_map(|e| {
            format!("{{% macro m(v) %}}{{{{ v }}}}{{% endmacro %}}{{{{ m({e}) }}}}")
        }),
        1 => prop::sample::select(vec![
            "{{", "}}", "{%", "%}", "{#", "#}", "{{-", "-}}", "{% raw %}", "{% endraw %}",
            "{% autoescape false %}", "{% endautoescape %}", "{% with z = 1 %}",
            "{% endwith %}", "{% extends 'x' %}", "{% block b %}", "{% endblock %}",
            "{% import 'x' as y %}", "{{ caller() }}", "{% call m(1) %}", "{% endcall %}",
            "{{ loop.index }}", "{% for %}", "{% if %}", "{{ }}", "{{ a b }}", "{% else %}",
            "{% endif %}", "{% endfor %}",
        ])
        .prop_map(str::to_string),
    ];
    prop::collection::vec(part, 0..6).prop_map(|p| p.concat())
}

fn json_value() -> impl Strategy<Value = Json> {
    let leaf = prop_oneof![
        Just(Json::Null),
        any::<bool>().prop_map(Json::from),
        any::<i64>().prop_map(Json::from),
        any::<u64>().prop_map(Json::from),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(Json::Null, Json::Number)),
        nasty().prop_map(Json::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Json::Array),
            prop::collection::btree_map("[a-z]{1,3}", inner, 0..4)
                .prop_map(|m| Json::Object(m.into_iter().collect())),
        ]
    })
}

fn vars() -> impl Strategy<Value = Vars> {
    prop::collection::btree_map(
        prop::sample::select(vec!["a", "b", "login", "ip", "x", "loop"]).prop_map(str::to_string),
        json_value(),
        0..6,
    )
    .prop_map(|m: BTreeMap<String, Json>| m.into_iter().collect())
}

/// The NAS password as templates see it; never in an error.
const TEMPLATE_SECRET: &str = "S3cr3t-template-9c1d";

fn write_scheme(dir: &Path, dialect: &str, templates: &[String]) -> std::path::PathBuf {
    let scheme_dir = dir.join("fuzz");
    std::fs::create_dir_all(&scheme_dir).expect("scheme dir");
    let list: Vec<String> = templates
        .iter()
        .map(|t| toml::Value::String(t.clone()).to_string())
        .collect();
    let text = format!(
        "transport = \"null\"\ndialect = \"{dialect}\"\n[commands]\nc = [{}]\n",
        list.join(", ")
    );
    std::fs::write(scheme_dir.join("scheme.toml"), text).expect("scheme.toml");
    scheme_dir
}

#[test]
fn scheme_rendering_never_panics() {
    let dir = tempfile::tempdir().expect("temp dir");
    let strategy = (
        prop::sample::select(DIALECTS.to_vec()),
        prop::collection::vec(template(), 1..3),
        vars(),
        prop::option::of(nasty()),
    );
    fuzz(
        "scheme_rendering_never_panics",
        config(1500),
        strategy,
        &["rendered", "render refused", "template refused"],
        |(dialect, templates, mut vars, password_suffix), reach| {
            let scheme_dir = write_scheme(dir.path(), dialect, &templates);
            let scheme = match Scheme::load(&scheme_dir) {
                Ok(scheme) => scheme,
                Err(e) => {
                    reach.push("template refused");
                    prop_assert!(e.scheme() == Some("fuzz"), "{}", e);
                    return Ok(());
                }
            };
            let secret = format!("{TEMPLATE_SECRET}{}", password_suffix.unwrap_or_default());
            vars.insert("nas_password".into(), Json::from(secret));
            match scheme.render("c", &vars) {
                Ok(commands) => {
                    reach.push("rendered");
                    prop_assert_eq!(commands.len(), templates.len());
                    // Literal template text has no control characters here, so any in
                    // the output would come from a value that escaped its dialect.
                    if dialect != "shell" {
                        for command in &commands {
                            prop_assert!(
                                !command.chars().any(|c| c.is_control()),
                                "control character in {:?}",
                                command
                            );
                        }
                    }
                }
                Err(e) => {
                    reach.push("render refused");
                    let text = e.to_string();
                    prop_assert!(
                        !text
                            .to_lowercase()
                            .contains(&TEMPLATE_SECRET.to_lowercase()),
                        "secret in error: {}",
                        text
                    );
                }
            }
            prop_assert!(scheme.render("nope", &vars).is_err());
            Ok(())
        },
    );
}

/// `{{ v }}` in each dialect: a value either renders so that the device reads it back
/// whole, or is refused with a reason that does not repeat it.
#[test]
fn scheme_values_in_every_dialect() {
    let dir = tempfile::tempdir().expect("temp dir");
    let schemes: Vec<Scheme> = DIALECTS
        .iter()
        .map(|d| {
            let sub = dir.path().join(d);
            std::fs::create_dir_all(&sub).expect("dir");
            Scheme::load(&write_scheme(&sub, d, &["{{ v }}".to_string()])).expect("scheme")
        })
        .collect();
    fuzz(
        "scheme_values_in_every_dialect",
        config(3000),
        (json_value(), 0..DIALECTS.len()),
        &["rendered", "refused"],
        |(value, index), reach| {
            let dialect = DIALECTS[index];
            let mut vars = Vars::new();
            vars.insert("v".into(), value.clone());
            match schemes[index].render("c", &vars) {
                Ok(commands) => {
                    reach.push("rendered");
                    let out = &commands[0];
                    prop_assert!(!value.is_null());
                    if let Json::String(s) = &value {
                        match dialect {
                            "cisco" | "plain" => prop_assert_eq!(out, s),
                            "routeros" => prop_assert_eq!(
                                parse_command(&format!("/x =v={out}")),
                                Ok(vec!["/x".to_string(), format!("=v={s}")])
                            ),
                            "shell" => prop_assert!(
                                out == s || (out.starts_with('\'') && out.ends_with('\''))
                            ),
                            _ => {}
                        }
                    }
                }
                Err(e) => {
                    reach.push("refused");
                    if let Json::String(s) = &value
                        && s.chars().count() >= 4
                    {
                        prop_assert!(
                            !e.to_string().contains(s.as_str()),
                            "value repeated in {}",
                            e
                        );
                    }
                }
            }
            Ok(())
        },
    );
}

// ---------------------------------------------------------------------------------
// The simulator's network-facing parts

fn cli_line() -> impl Strategy<Value = String> {
    let token = prop_oneof![
        6 => prop::sample::select(vec![
            "/ip firewall address-list ", "/queue simple ", "/system identity ", "/ip ",
            "firewall ", "address-list ", "/queue ", "simple ", "add ", "remove ", "set ",
            "print ", "enable ", "disable ", "find ", "[", "]", "[find ", "where ", "list=",
            "address=", "comment=", "name=", "target=", "max-limit=", "disabled=", "yes",
            "no", "numbers=", "0", "1", "*1", "*FFFFFFFF", "10.0.0.1", "10.0.0.0/8",
            "1k/1k", "10M/10M", "\"", "\\", "\\\"", "\\n", "\\$", ";", " ", "=", "..", "/",
            "detail ", "terse ", "as-value ", "count-only ", "from=", "timeout=", "1d",
            "~", "!", "&&", "||", "(", ")", "$x", ":put ", ":local ", "{", "}",
        ])
        .prop_map(str::to_string),
        1 => nasty(),
    ];
    prop::collection::vec(token, 0..14).prop_map(|t| t.concat())
}

/// The simulated router's CLI interpreter: any lines, in sequence on one state.
#[test]
fn sim_cli_interpreter_survives_any_line() {
    fuzz(
        "sim_cli_interpreter_survives_any_line",
        config(3000),
        prop::collection::vec(cli_line(), 1..8),
        &["applied", "answered", "syntax error"],
        |lines, reach| {
            let mut state = nasd::sim::RouterState::new("fuzz");
            for line in &lines {
                let answer = nasd::sim::execute(&mut state, line);
                reach.push(if answer.is_empty() {
                    "applied"
                } else if answer.contains("syntax error") {
                    "syntax error"
                } else {
                    "answered"
                });
            }
            Ok(())
        },
    );
}

/// A simulator for the socket tests, with the RADIUS secret and the password above.
fn start_sim(
    rt: &tokio::runtime::Runtime,
) -> (nasd::sim::Sim, tokio_util::sync::CancellationToken) {
    let options = nasd::sim::SimOptions {
        secret: RADIUS_SECRET.into(),
        password: PASSWORD.into(),
        ..nasd::sim::SimOptions::default()
    };
    let token = tokio_util::sync::CancellationToken::new();
    let sim = rt
        .block_on(nasd::sim::start(&options, token.clone()))
        .expect("sim starts");
    (sim, token)
}

fn coa_request(id: u8, attributes: &[(u8, Vec<u8>)], code: u8, secret: &[u8]) -> Vec<u8> {
    // A request: Message-Authenticator over a zero authenticator, then the request
    // authenticator MD5(code | id | length | 16 zeros | attributes | secret).
    let mut packet = vec![code, id, 0, 0];
    packet.extend_from_slice(&[0; 16]);
    packet.extend_from_slice(&[80, 18]);
    packet.extend_from_slice(&[0; 16]);
    for (kind, value) in attributes {
        packet.push(*kind);
        packet.push((value.len() + 2) as u8);
        packet.extend_from_slice(value);
    }
    let len = packet.len() as u16;
    packet[2..4].copy_from_slice(&len.to_be_bytes());
    let ma = hmac_md5(secret, &packet);
    packet[22..38].copy_from_slice(&ma);
    let authenticator = md5_of(&[&packet, secret]);
    packet[4..20].copy_from_slice(&authenticator);
    packet
}

fn coa_attribute() -> impl Strategy<Value = (u8, Vec<u8>)> {
    let text = prop::collection::vec(any::<u8>(), 0..40);
    prop_oneof![
        3 => (prop::sample::select(vec![1u8, 8, 11, 33, 44]), text.clone()),
        1 => (prop::sample::select(vec![1u8, 8, 44]), prop::sample::select(vec![b"u1".to_vec(), vec![10, 0, 0, 1], b"s1".to_vec()])),
        2 => (
            prop::sample::select(vec![9u32, 14988, 0]),
            prop::collection::vec((prop::sample::select(vec![1u8, 8, 19, 0, 255]), text.clone()), 0..3),
        )
            .prop_map(|(vendor, subs)| {
                let mut v = vendor.to_be_bytes().to_vec();
                for (kind, data) in subs {
                    v.push(kind);
                    v.push((data.len() + 2) as u8);
                    v.extend(data);
                }
                (26u8, v)
            }),
        1 => (Just(26u8), prop::collection::vec(any::<u8>(), 0..12)),
        1 => (any::<u8>(), prop::collection::vec(any::<u8>(), 0..250)),
    ]
}

/// One datagram at the simulator's CoA port: garbage, or a correctly signed request
/// with random attributes (CoA, Disconnect or another code).
#[derive(Debug, Clone)]
enum CoaDatagram {
    Garbage(Vec<u8>),
    Signed {
        code: u8,
        id: u8,
        attributes: Vec<(u8, Vec<u8>)>,
    },
}

fn coa_datagram() -> impl Strategy<Value = CoaDatagram> {
    prop_oneof![
        1 => prop::collection::vec(any::<u8>(), 0..200).prop_map(CoaDatagram::Garbage),
        3 => (
            prop::sample::select(vec![40u8, 43, 40, 43, 1, 44]),
            any::<u8>(),
            prop::collection::vec(coa_attribute(), 0..8),
        )
            .prop_map(|(code, id, attributes)| CoaDatagram::Signed { code, id, attributes }),
    ]
}

#[test]
fn sim_coa_server_survives_any_datagram() {
    let rt = runtime("sim_coa_server_survives_any_datagram");
    let (sim, token) = start_sim(&rt);
    let coa = sim.coa_addr;
    let socket = rt.block_on(UdpSocket::bind("127.0.0.1:0")).expect("bind");
    let secret = RADIUS_SECRET.as_bytes();
    fuzz(
        "sim_coa_server_survives_any_datagram",
        io_config(500),
        prop::collection::vec(coa_datagram(), 1..6),
        &["answered", "garbage"],
        |datagrams, reach| {
            rt.block_on(async {
                for datagram in datagrams {
                    match datagram {
                        CoaDatagram::Garbage(bytes) => {
                            reach.push("garbage");
                            socket.send_to(&bytes, coa).await.expect("send");
                        }
                        CoaDatagram::Signed {
                            code,
                            id,
                            attributes,
                        } => {
                            let packet = coa_request(id, &attributes, code, secret);
                            if packet.len() > 4096 {
                                continue;
                            }
                            socket.send_to(&packet, coa).await.expect("send");
                            if code != 40 && code != 43 {
                                continue;
                            }
                            // The simulator answers every verified CoA and Disconnect,
                            // with a reply our client accepts.
                            let mut authenticator = [0u8; 16];
                            authenticator.copy_from_slice(&packet[4..20]);
                            let reply = recv_reply(&socket, id, &authenticator, secret).await;
                            prop_assert!(reply.is_some(), "no valid answer to {:?}", attributes);
                            reach.push("answered");
                        }
                    }
                }
                Ok(())
            })
        },
    );
    // Still answering after everything it was sent.
    rt.block_on(async {
        let packet = coa_request(7, &[(1, b"alive".to_vec())], 43, secret);
        socket.send_to(&packet, coa).await.expect("send");
        let mut authenticator = [0u8; 16];
        authenticator.copy_from_slice(&packet[4..20]);
        assert!(
            recv_reply(&socket, 7, &authenticator, secret)
                .await
                .is_some()
        );
    });
    token.cancel();
    rt.block_on(sim.wait());
    assert_no_panics("sim_coa_server_survives_any_datagram");
}

/// The next datagram that verifies as the reply to `id`, skipping stale ones;
/// `None` if none comes (generously bounded: a hang, not a timing check).
async fn recv_reply(
    socket: &UdpSocket,
    id: u8,
    authenticator: &[u8; 16],
    secret: &[u8],
) -> Option<radius::VerifiedReply> {
    let mut buf = vec![0u8; 65536];
    loop {
        let received = tokio::time::timeout(Duration::from_secs(10), socket.recv_from(&mut buf))
            .await
            .ok()?
            .ok()?;
        if let Ok(reply) = verify_reply(&buf[..received.0], id, authenticator, secret) {
            return Some(reply);
        }
    }
}

/// A sentence for the simulator's API port.
fn sim_api_sentence() -> impl Strategy<Value = Vec<String>> {
    let word = prop_oneof![
        4 => prop::sample::select(vec![
            "/ip/firewall/address-list/add", "/ip/firewall/address-list/remove",
            "/ip/firewall/address-list/set", "/ip/firewall/address-list/print",
            "/queue/simple/add", "/queue/simple/print", "/queue/simple/disable",
            "/system/identity/set", "/system/identity/print", "/login", "/quit", "/x",
            "=list=a", "=address=10.0.0.1", "=address=x", "=comment=c", "=name=n",
            "=target=10.0.0.1/32", "=max-limit=1k/1k", "=.id=*1", "=numbers=*1,*2",
            "=disabled=yes", "=.proplist=.id,list", ".proplist=address", "?list=a", "?#|",
            "?#!", "?#&", "?#", "?>comment=", "?-address", ".tag=1", "=name=admin",
            "=password=x", "=response=00", "=", "?", ".", "!", "=x=\"; /system reset",
        ])
        .prop_map(str::to_string),
        1 => nasty().prop_filter("non-empty", |s| !s.is_empty()),
    ];
    prop::collection::vec(word, 0..6)
}

#[test]
fn sim_api_server_survives_any_sentence() {
    let rt = runtime("sim_api_server_survives_any_sentence");
    let (sim, token) = start_sim(&rt);
    let addr = sim.api_addr;
    let strategy = (
        any::<bool>(),
        prop::collection::vec(
            prop_oneof![
                4 => sim_api_sentence().prop_map(|s| encode_sentence(&s)),
                1 => api_bytes(30),
            ],
            0..8,
        ),
    );
    fuzz(
        "sim_api_server_survives_any_sentence",
        io_config(300),
        strategy,
        &["!done", "!trap", "!re"],
        |(login, pieces), reach| {
            rt.block_on(async {
                let mut stream = TcpStream::connect(addr).await.expect("connect");
                if login {
                    stream.write_all(&login_sentence()).await.expect("login");
                }
                for piece in &pieces {
                    if stream.write_all(piece).await.is_err() {
                        break;
                    }
                }
                let _ = stream.shutdown().await;
                let received = read_to_end(&mut stream).await;
                // Whatever it was sent, the simulator answers in whole `!` sentences.
                let (sentences, _) = decode_all(&[&received]);
                for sentence in &sentences {
                    let first = sentence.first().map(String::as_str).unwrap_or("");
                    prop_assert!(first.starts_with('!'), "{:?}", sentence);
                    match first {
                        "!done" => reach.push("!done"),
                        "!trap" => reach.push("!trap"),
                        "!re" => reach.push("!re"),
                        _ => {}
                    }
                }
                Ok(())
            })
        },
    );
    rt.block_on(async {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream.write_all(&login_sentence()).await.expect("login");
        stream.shutdown().await.expect("shutdown");
        let (sentences, _) = decode_all(&[&read_to_end(&mut stream).await]);
        assert_eq!(sentences, vec![vec!["!done".to_string()]], "still serving");
    });
    token.cancel();
    rt.block_on(sim.wait());
    assert_no_panics("sim_api_server_survives_any_sentence");
}

fn login_sentence() -> Vec<u8> {
    let words: Vec<String> = ["/login", "=name=admin", &format!("=password={PASSWORD}")]
        .iter()
        .map(|s| s.to_string())
        .collect();
    encode_sentence(&words)
}

/// Everything until the peer closes (or resets) the connection; bounded generously,
/// as a hang guard.
async fn read_to_end(stream: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match tokio::time::timeout(Duration::from_secs(20), stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => out.extend_from_slice(&buf[..n]),
            Ok(_) => return out,
            Err(_) => panic!("the simulator neither answered nor closed within 20 s"),
        }
    }
}

#[test]
fn sim_telnet_server_survives_any_bytes() {
    let rt = runtime("sim_telnet_server_survives_any_bytes");
    let (sim, token) = start_sim(&rt);
    let addr = sim.telnet_addr;
    let strategy = (
        any::<bool>(),
        prop::collection::vec(
            prop_oneof![
                3 => telnet_bytes(60),
                2 => cli_line().prop_map(|l| format!("{l}\r\n").into_bytes()),
                1 => telnet_command(),
            ],
            0..8,
        ),
    );
    fuzz(
        "sim_telnet_server_survives_any_bytes",
        io_config(300),
        strategy,
        &["logged in", "login failed"],
        |(login, pieces), reach| {
            rt.block_on(async {
                let mut stream = TcpStream::connect(addr).await.expect("connect");
                if login {
                    let line = format!("admin\r\n{PASSWORD}\r\n");
                    stream.write_all(line.as_bytes()).await.expect("login");
                }
                for piece in &pieces {
                    if stream.write_all(piece).await.is_err() {
                        break;
                    }
                }
                let _ = stream.shutdown().await;
                let text = String::from_utf8_lossy(&read_to_end(&mut stream).await).into_owned();
                if text.contains("[admin@sim] >") {
                    reach.push("logged in");
                }
                if text.contains("Login failed") {
                    reach.push("login failed");
                }
                Ok(())
            })
        },
    );
    rt.block_on(async {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let line = format!("admin\r\n{PASSWORD}\r\n/system identity print\r\n/quit\r\n");
        stream.write_all(line.as_bytes()).await.expect("write");
        let text = String::from_utf8_lossy(&read_to_end(&mut stream).await).into_owned();
        assert!(text.contains("name: sim"), "still serving: {text:?}");
    });
    token.cancel();
    rt.block_on(sim.wait());
    assert_no_panics("sim_telnet_server_survives_any_bytes");
}
