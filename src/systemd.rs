//! systemd's notify protocol (`Type=notify`): `READY=1` once the daemon serves,
//! `WATCHDOG=1` from the supervisor loop, `STOPPING=1` on shutdown. A datagram to the
//! socket named by `$NOTIFY_SOCKET`; without it (not under systemd) nothing is sent.
//! No crate needed: the protocol is one datagram of `KEY=value` lines.

use std::time::Duration;

/// Sends `state` (e.g. `"READY=1\nSTATUS=serving 3 NAS"`) to systemd. Errors are
/// returned for the caller to log once; without `$NOTIFY_SOCKET` it is a no-op.
pub fn notify(state: &str) -> std::io::Result<bool> {
    notify_to(std::env::var_os("NOTIFY_SOCKET").as_deref(), state)
}

/// Sends `state` to the socket `path` (`@name` for an abstract one).
pub fn notify_to(path: Option<&std::ffi::OsStr>, state: &str) -> std::io::Result<bool> {
    let Some(path) = path else {
        return Ok(false);
    };
    let socket = std::os::unix::net::UnixDatagram::unbound()?;
    let bytes = path.as_encoded_bytes();
    if let Some(name) = bytes.strip_prefix(b"@") {
        // An abstract socket (Linux): `@name`.
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        socket.send_to_addr(state.as_bytes(), &addr)?;
    } else {
        socket.send_to(state.as_bytes(), path)?;
    }
    Ok(true)
}

/// Sends and logs a failure (never fatal: the daemon works without systemd).
pub fn notify_or_log(state: &str) {
    if let Err(e) = notify(state) {
        tracing::warn!(
            "systemd notify ({}): {e}",
            state.lines().next().unwrap_or("")
        );
    }
}

/// How often to send `WATCHDOG=1`: half of `$WATCHDOG_USEC`, when systemd asks for it
/// and `$WATCHDOG_PID` (if set) is this process.
pub fn watchdog_interval() -> Option<Duration> {
    watchdog_from(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
        std::process::id(),
    )
}

/// The pure part of [`watchdog_interval`].
pub fn watchdog_from(usec: Option<&str>, pid: Option<&str>, own_pid: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok()?;
    if usec == 0 {
        return None;
    }
    if let Some(pid) = pid
        && pid.trim().parse::<u32>().ok() != Some(own_pid)
    {
        return None;
    }
    Some(Duration::from_micros(usec / 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_table() {
        let cases: &[(Option<&str>, Option<&str>, Option<Duration>)] = &[
            (None, None, None),
            (Some("30000000"), None, Some(Duration::from_secs(15))),
            (Some("30000000"), Some("77"), Some(Duration::from_secs(15))),
            (Some("30000000"), Some("78"), None),
            (Some("0"), None, None),
            (Some("soon"), None, None),
        ];
        for (usec, pid, want) in cases {
            assert_eq!(watchdog_from(*usec, *pid, 77), *want, "{usec:?} {pid:?}");
        }
    }

    #[test]
    fn notify_reaches_a_datagram_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let server = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        assert!(notify_to(Some(path.as_os_str()), "READY=1\nSTATUS=test").unwrap());
        let mut buf = [0u8; 64];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=test");
        assert!(!notify_to(None, "READY=1").unwrap());
        let missing = dir.path().join("missing.sock");
        assert!(notify_to(Some(missing.as_os_str()), "READY=1").is_err());
    }
}
