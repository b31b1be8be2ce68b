//! The HTTP POST of webhooks and Telegram (http and https), on reqwest: one client per
//! alert sender, so its connections are kept alive between alerts and tries.
//!
//! Errors name the host and port, never the address: webhook addresses often hold a
//! token and the Telegram bot token is in the path.

use std::sync::Arc;
use std::time::Duration;

use crate::config::alerts::Url;
use crate::duration::format_duration;

/// At most this much of an answer's body is read (only the status matters); reading it
/// lets the connection serve the next POST.
const BODY_CAP: usize = 64 * 1024;

/// Posts JSON bodies; cheap to clone (the connection pool is shared).
#[derive(Clone)]
pub struct Poster {
    client: reqwest::Client,
    timeout: Duration,
    /// https destinations are trusted through `alerts.ca_file` and the system store.
    https: bool,
}

impl Poster {
    /// `timeout` bounds each POST, connect to answer. Without `tls` (no https
    /// destination configured, or no CA certificates), https addresses are refused.
    pub fn new(
        timeout: Duration,
        tls: Option<&Arc<rustls::ClientConfig>>,
    ) -> Result<Poster, String> {
        // rustls on ring: our config, or one trusting nothing (reqwest wants a TLS
        // backend even for http, and has no crypto provider of its own here).
        let config = match tls {
            Some(config) => (**config).clone(),
            None => {
                let provider = Arc::new(rustls::crypto::ring::default_provider());
                rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .map_err(|e| format!("TLS settings: {e}"))?
                    .with_root_certificates(rustls::RootCertStore::empty())
                    .with_no_client_auth()
            }
        };
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured(config)
            .http1_only()
            // The destination itself: no proxy from the environment, no redirect (a
            // 3xx is an answer, and a token must not follow it to another host).
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(timeout)
            .user_agent(concat!("nasd/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot set up the HTTP client: {}", chain(e)))?;
        Ok(Poster {
            client,
            timeout,
            https: tls.is_some(),
        })
    }

    /// POSTs a JSON body and returns the HTTP status (redirects are not followed).
    pub async fn post_json(&self, url: &str, body: &str) -> Result<u16, String> {
        let parsed = Url::parse(url)?;
        if parsed.tls && !self.https {
            return Err("https is unavailable: the CA certificates could not be loaded".into());
        }
        let sent = self
            .client
            .post(url.trim())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_string())
            .send()
            .await;
        let mut response = match sent {
            Ok(r) => r,
            Err(e) => return Err(scrub(self.describe(e, &parsed), &parsed)),
        };
        let status = response.status().as_u16();
        // The rest of the answer, within the same deadline; only the status counts.
        let mut read = 0;
        while let Ok(Some(chunk)) = response.chunk().await {
            read += chunk.len();
            if read > BODY_CAP {
                break;
            }
        }
        Ok(status)
    }

    /// What went wrong, naming the host (the URL is dropped from the error).
    fn describe(&self, err: reqwest::Error, url: &Url) -> String {
        let host = &url.host;
        if err.is_timeout() {
            return format!("no answer within {}", format_duration(self.timeout));
        }
        let tls = tls_error(&err).map(|e| e.to_string());
        let connect = err.is_connect();
        let builder = err.is_builder();
        let text = chain(err);
        if let Some(tls) = tls {
            format!("TLS with {host}: {tls}")
        } else if connect {
            format!("cannot connect to {host}:{}: {text}", url.port)
        } else if builder {
            format!("bad address for {host}: {text}")
        } else {
            format!("no HTTP answer from {host}:{}: {text}", url.port)
        }
    }
}

/// POSTs a JSON body and returns the HTTP status, with a client of its own (the alert
/// sender keeps one [`Poster`] instead).
pub async fn post_json(
    url: &str,
    body: &str,
    timeout: Duration,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> Result<u16, String> {
    Poster::new(timeout, tls)?.post_json(url, body).await
}

/// The rustls error beneath a reqwest error. It comes up inside I/O errors (one in
/// another), whose `source` skips the error they hold, so those are opened.
fn tls_error(err: &reqwest::Error) -> Option<&rustls::Error> {
    let mut next = std::error::Error::source(err);
    while let Some(e) = next {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        next = match e.downcast_ref::<std::io::Error>() {
            Some(io) => io
                .get_ref()
                .map(|inner| inner as &(dyn std::error::Error + 'static)),
            None => e.source(),
        };
    }
    None
}

/// The causes of a reqwest error, without its URL ("client error (Connect): tcp connect
/// error: Connection refused (os error 111)").
fn chain(err: reqwest::Error) -> String {
    let err = err.without_url();
    let mut text = String::new();
    let mut source = std::error::Error::source(&err);
    while let Some(e) = source {
        let part = e.to_string();
        if !text.contains(&part) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&part);
        }
        source = e.source();
    }
    if text.is_empty() {
        err.to_string()
    } else {
        text
    }
}

/// Belt and braces: should a cause ever quote the path (where tokens live), it is cut.
fn scrub(text: String, url: &Url) -> String {
    let path = url.path.trim_end_matches('/');
    if path.is_empty() {
        return text;
    }
    text.replace(path, "/…")
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    const TOKEN: &str = "4242:secret-bot-token";

    /// A server answering every request on a connection with `answer`; returns its
    /// address and a counter of the connections it accepted.
    async fn server(answer: &'static [u8]) -> (std::net::SocketAddr, Arc<std::sync::Mutex<u32>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted: Arc<std::sync::Mutex<u32>> = Arc::default();
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                *count.lock().expect("lock") += 1;
                tokio::spawn(async move {
                    let mut got = Vec::new();
                    let mut buf = [0u8; 4096];
                    loop {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                        // Every test body ends with `}`, and is sent whole.
                        while let Some(end) = got.iter().position(|b| *b == b'}') {
                            got.drain(..=end);
                            if answer.is_empty() {
                                continue;
                            }
                            if conn.write_all(answer).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (addr, accepted)
    }

    #[tokio::test]
    async fn statuses_and_a_kept_connection() {
        let (addr, accepted) = server(b"HTTP/1.1 503 Busy\r\nContent-Length: 4\r\n\r\nbusy").await;
        let poster = Poster::new(Duration::from_secs(10), None).expect("client");
        let url = format!("http://{addr}/bot{TOKEN}/sendMessage");
        for _ in 0..3 {
            assert_eq!(poster.post_json(&url, "{\"a\":1}").await, Ok(503));
        }
        assert_eq!(
            *accepted.lock().expect("lock"),
            1,
            "one kept-alive connection"
        );
    }

    #[tokio::test]
    async fn errors_name_the_host_never_the_path() {
        let poster = Poster::new(Duration::from_millis(300), None).expect("client");
        // Nothing listens.
        let closed = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = closed.local_addr().expect("addr").port();
        drop(closed);
        let e = poster
            .post_json(&format!("http://127.0.0.1:{port}/bot{TOKEN}/x"), "{}")
            .await
            .unwrap_err();
        assert!(
            e.starts_with(&format!("cannot connect to 127.0.0.1:{port}: ")),
            "{e}"
        );
        // Not HTTP.
        let (addr, _) = server(b"SSH-2.0-x\r\n").await;
        let e = poster
            .post_json(&format!("http://{addr}/hook?token={TOKEN}"), "{}")
            .await
            .unwrap_err();
        assert!(e.starts_with("no HTTP answer from 127.0.0.1:"), "{e}");
        // No answer.
        let (addr, _) = server(b"").await;
        let e = poster
            .post_json(&format!("http://{addr}/bot{TOKEN}/x"), "{}")
            .await
            .unwrap_err();
        assert_eq!(e, "no answer within 300ms");
        // https without CA certificates.
        let e = poster
            .post_json(&format!("https://{addr}/bot{TOKEN}/x"), "{}")
            .await
            .unwrap_err();
        assert!(e.starts_with("https is unavailable"), "{e}");
        let e = poster.post_json("ftp://x/", "{}").await.unwrap_err();
        assert!(e.contains("http://"), "{e}");
    }

    #[test]
    fn scrub_cuts_the_path() {
        let url = Url::parse(&format!("https://api.example/bot{TOKEN}/sendMessage")).expect("url");
        let text = scrub(format!("oops at /bot{TOKEN}/sendMessage"), &url);
        assert!(!text.contains(TOKEN), "{text}");
        let root = Url::parse("http://h").expect("url");
        assert_eq!(scrub("as is".into(), &root), "as is");
    }
}
