//! A local HTTP/1.1 receiver that plays a webhook and the Telegram Bot API in tests:
//! it answers 503 to the first request (so senders must retry) and 200 to the rest, and
//! records what arrives.

use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// One request the receiver got.
#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    pub body: serde_json::Value,
    pub status: u16,
}

/// An HTTP/1.1 server answering 503 to the first request and 200 to the rest.
pub struct Receiver {
    pub addr: std::net::SocketAddr,
    pub got: Arc<Mutex<Vec<Received>>>,
}

impl Receiver {
    pub async fn start() -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let got: Arc<Mutex<Vec<Received>>> = Arc::default();
        let log = got.clone();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let log = log.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    let (head_end, length) = loop {
                        let Ok(n) = conn.read(&mut chunk).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                            let length = head
                                .lines()
                                .find_map(|l| l.strip_prefix("content-length:"))
                                .and_then(|v| v.trim().parse::<usize>().ok())
                                .unwrap_or(0);
                            break (end + 4, length);
                        }
                    };
                    while buf.len() < head_end + length {
                        let Ok(n) = conn.read(&mut chunk).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                    }
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
                    let path = head.split(' ').nth(1).unwrap_or("").to_string();
                    let body = serde_json::from_slice(&buf[head_end..head_end + length])
                        .unwrap_or(serde_json::Value::Null);
                    let status = {
                        let mut log = log.lock().unwrap();
                        let status = if log.is_empty() { 503 } else { 200 };
                        log.push(Received { path, body, status });
                        status
                    };
                    let answer = format!(
                        "HTTP/1.1 {status} X\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
                    );
                    let _ = conn.write_all(answer.as_bytes()).await;
                });
            }
        });
        Receiver { addr, got }
    }

    /// Delivered (200) webhook bodies of `kind`.
    pub fn hooks(&self, kind: &str) -> Vec<serde_json::Value> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.status == 200 && r.path.starts_with("/hook") && r.body["kind"] == kind)
            .map(|r| r.body.clone())
            .collect()
    }

    /// Delivered Telegram message texts.
    pub fn telegram(&self) -> Vec<String> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.status == 200 && r.path.contains("/sendMessage"))
            .map(|r| r.body["text"].as_str().unwrap_or("").to_string())
            .collect()
    }
}
