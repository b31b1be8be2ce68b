//! A small HTTP/1.1 client on reqwest for `nasd bench-api`, `nasd bench-console` and the
//! API's integration tests: plain http to one address, connections kept alive.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

/// A response: status, headers (names lowercased) and body.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    /// The body as JSON (`Null` when it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// One reqwest client (its pool keeps the connection alive between requests) for one
/// address. No redirects are followed and no proxy is used: the answer is the server's.
pub struct HttpClient {
    base: String,
    /// The error, should the client not build (it is reported by every request).
    client: Result<reqwest::Client, String>,
    /// The last answer left the connection open, so the next request may reuse it.
    kept: bool,
}

impl HttpClient {
    pub fn new(addr: SocketAddr) -> HttpClient {
        let client = no_trust_tls().and_then(|tls| {
            reqwest::Client::builder()
                .tls_backend_preconfigured(tls)
                .http1_only()
                .no_proxy()
                .redirect(reqwest::redirect::Policy::none())
                .tcp_nodelay(true)
                .build()
                .map_err(|e| describe(&e))
        });
        HttpClient {
            base: format!("http://{addr}"),
            client,
            kept: false,
        }
    }

    /// Sends one request; `headers` are added as given (Host and Content-Length are
    /// set here). Retries once on a fresh connection when a kept-alive one was closed.
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> io::Result<HttpResponse> {
        let kept = std::mem::replace(&mut self.kept, false);
        let mut answer = self.try_request(method, path, headers, body).await;
        if kept && answer.is_err() {
            answer = self.try_request(method, path, headers, body).await;
        }
        if let Ok(r) = &answer {
            self.kept = r.header("connection") != Some("close");
        }
        answer
    }

    async fn try_request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> io::Result<HttpResponse> {
        let client = self
            .client
            .as_ref()
            .map_err(|e| io::Error::other(e.clone()))?;
        let method = reqwest::Method::from_bytes(method.as_bytes())
            .map_err(|_| invalid_input(format!("bad method `{method}`")))?;
        let mut req = client.request(method, format!("{}{path}", self.base));
        for (k, v) in headers {
            let name = reqwest::header::HeaderName::from_bytes(k.as_bytes())
                .map_err(|_| invalid_input(format!("bad header name `{k}`")))?;
            let value = reqwest::header::HeaderValue::from_str(v)
                .map_err(|_| invalid_input(format!("bad value of header {k}")))?;
            req = req.header(name, value);
        }
        let resp = req.body(body.to_vec()).send().await.map_err(io_error)?;
        let status = resp.status().as_u16();
        let headers = resp
            .headers()
            .iter()
            .map(|(k, v)| {
                // HeaderName is lowercase already.
                (
                    k.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        let body = resp.bytes().await.map_err(io_error)?.to_vec();
        Ok(HttpResponse {
            status,
            headers,
            body,
        })
    }
}

/// One request on a fresh connection.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> io::Result<HttpResponse> {
    HttpClient::new(addr)
        .request(method, path, headers, body)
        .await
}

/// The TLS settings handed to reqwest, which wants a TLS backend even for plain http
/// (with `rustls-no-provider` its own would need a process-wide crypto provider): rustls
/// on ring trusting no certificate, so an https address is refused.
fn no_trust_tls() -> Result<rustls::ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth())
}

fn invalid_input(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// A reqwest error as an I/O error: the kind of the I/O error beneath when there is one,
/// the message every cause in the chain.
fn io_error(err: reqwest::Error) -> io::Error {
    let mut kind = if err.is_timeout() {
        io::ErrorKind::TimedOut
    } else {
        io::ErrorKind::Other
    };
    let mut source = std::error::Error::source(&err);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            kind = io.kind();
            break;
        }
        source = e.source();
    }
    io::Error::new(kind, describe(&err))
}

/// "error sending request: client error (Connect): tcp connect error: Connection
/// refused": the error and its causes, each once.
fn describe(err: &reqwest::Error) -> String {
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(e) = source {
        let part = e.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// Answers each request (a head without a body) with a chunked body; counts the
    /// connections it accepted.
    async fn server() -> (SocketAddr, Arc<AtomicU32>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicU32::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    let mut got = Vec::new();
                    let mut buf = [0u8; 4096];
                    loop {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                        while let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                            got.drain(..end + 4);
                            let answer = b"HTTP/1.1 201 Created\r\nX-Thing: One\r\n\
                                Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
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
    async fn answers_on_one_kept_connection() {
        let (addr, accepted) = server().await;
        let mut client = HttpClient::new(addr);
        for _ in 0..3 {
            let r = client
                .request("GET", "/x?q=1", &[("Authorization", "Bearer t")], b"")
                .await
                .expect("answer");
            assert_eq!(r.status, 201);
            assert_eq!(r.header("X-Thing"), Some("One"));
            assert!(r.headers.iter().any(|(k, _)| k == "x-thing"));
            assert_eq!(r.text(), "abcde");
        }
        assert_eq!(accepted.load(Ordering::Relaxed), 1);
        let e = client
            .request("GET", "/", &[("Bad Name", "v")], b"")
            .await
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }

    #[tokio::test]
    async fn a_refused_connection_is_an_io_error_of_that_kind() {
        let closed = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = closed.local_addr().expect("addr");
        drop(closed);
        let e = request(addr, "GET", "/status", &[], b"").await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused, "{e}");
    }
}
