//! A minimal HTTP/1.1 POST (http and https), one connection per call, for webhooks and
//! Telegram.

use std::sync::Arc;
use std::time::Duration;

use crate::config::alerts::Url;
use crate::duration::format_duration;

/// POSTs a JSON body and returns the HTTP status. One connection per call.
pub async fn post_json(
    url: &str,
    body: &str,
    timeout: Duration,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> Result<u16, String> {
    let url = Url::parse(url)?;
    let host_header = if url.host.contains(':') {
        format!("[{}]", url.host)
    } else {
        url.host.clone()
    };
    let request = format!(
        "POST {} HTTP/1.1\r\nHost: {host_header}\r\nUser-Agent: nasd/{}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        url.path,
        env!("CARGO_PKG_VERSION"),
        body.len()
    );
    let exchange = async {
        let tcp = tokio::net::TcpStream::connect((url.host.as_str(), url.port))
            .await
            .map_err(|e| format!("cannot connect to {}:{}: {e}", url.host, url.port))?;
        if url.tls {
            let stream = tls_connect(&url.host, tcp, tls).await?;
            exchange(stream, request.as_bytes()).await
        } else {
            exchange(tcp, request.as_bytes()).await
        }
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| format!("no answer within {}", format_duration(timeout)))?
}

async fn exchange<S>(mut stream: S, request: &[u8]) -> Result<u16, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream
        .write_all(request)
        .await
        .map_err(|e| format!("sending: {e}"))?;
    stream.flush().await.map_err(|e| format!("sending: {e}"))?;
    // Only the status line matters; read until it is complete.
    let mut head = Vec::with_capacity(256);
    let mut buf = [0u8; 1024];
    loop {
        let n = stream
            .read(&mut buf)
            .await
            .map_err(|e| format!("reading the answer: {e}"))?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
        if head.windows(2).any(|w| w == b"\r\n") || head.len() > 8192 {
            break;
        }
    }
    parse_status(&head)
}

/// The status code of an HTTP/1.x status line.
pub fn parse_status(head: &[u8]) -> Result<u16, String> {
    let line_end = head
        .windows(2)
        .position(|w| w == b"\r\n")
        .ok_or_else(|| "the server closed without an HTTP answer".to_string())?;
    let line = String::from_utf8_lossy(&head[..line_end]);
    let mut parts = line.split(' ');
    match (parts.next(), parts.next()) {
        (Some(v), Some(code)) if v.starts_with("HTTP/1.") => code
            .parse::<u16>()
            .map_err(|_| format!("bad HTTP status line `{line}`")),
        _ => Err(format!("bad HTTP status line `{line}`")),
    }
}

async fn tls_connect(
    host: &str,
    tcp: tokio::net::TcpStream,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
    let Some(config) = tls else {
        return Err("https is unavailable: the CA certificates could not be loaded".into());
    };
    let name = rustls::pki_types::ServerName::try_from(host.to_string())
        .map_err(|e| format!("bad TLS server name {host}: {e}"))?;
    tokio_rustls::TlsConnector::from(config.clone())
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS with {host}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines() {
        assert_eq!(parse_status(b"HTTP/1.1 200 OK\r\n"), Ok(200));
        assert_eq!(
            parse_status(b"HTTP/1.0 404 Not Found\r\nX: y\r\n\r\n"),
            Ok(404)
        );
        assert!(parse_status(b"").is_err());
        assert!(parse_status(b"SSH-2.0-x\r\n").is_err());
        assert!(parse_status(b"HTTP/1.1 abc\r\n").is_err());
    }
}
