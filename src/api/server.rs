//! The API's accept loop: HTTP/1 with every wait bounded, so that nobody who can reach
//! the port can hold the daemon's descriptors.
//!
//! - A request's head must arrive within `[api] header_timeout`, counted from when the
//!   connection is ready for a request (after it opens, after each answer): a silent
//!   connection, half a header and an idle keep-alive connection are all closed by it.
//! - A request body may pause at most `[api] body_timeout` between two pieces.
//! - At most `[api] max_connections` connections are served at once. A connection past
//!   the cap asks the oldest one to close (hyper's graceful shutdown: at once when it
//!   waits for a request, after its answer when busy) and waits for its place, at most
//!   `header_timeout`; meanwhile no other connection is accepted (they wait in the
//!   kernel's backlog), so the daemon never holds more than the cap plus one.
//!
//! Which connection gives way is pure ([`Open::oldest`]); the rest is a thin shell.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower_http::timeout::RequestBodyTimeout;

/// How long a connection asked to close (cap reached, daemon stopping) may take to
/// finish the answer it is busy with.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Accept errors (out of descriptors) are logged at most this often.
const ACCEPT_ERROR_EVERY: Duration = Duration::from_secs(10);

/// The limits of the accept loop (from `[api]`).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub max_connections: usize,
}

/// The connections being served, oldest first, each with the token that asks it to
/// close.
#[derive(Default)]
struct Open {
    next: u64,
    conns: BTreeMap<u64, CancellationToken>,
}

impl Open {
    fn add(&mut self) -> (u64, CancellationToken) {
        let id = self.next;
        self.next += 1;
        let token = CancellationToken::new();
        self.conns.insert(id, token.clone());
        (id, token)
    }

    /// The connection to ask to close when a new one needs its place: the oldest not
    /// already asked. It leaves the list (asked once).
    fn oldest(&mut self) -> Option<(u64, CancellationToken)> {
        self.conns.pop_first()
    }
}

/// Serves `app` on `listener` until `shutdown`; then asks every connection to close
/// and waits for their answers (at most [`CLOSE_GRACE`]).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let open = Arc::new(Mutex::new(Open::default()));
    let mut running = tokio::task::JoinSet::new();
    let mut last_accept_error: Option<tokio::time::Instant> = None;
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        while running.try_join_next().is_some() {}
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors (or memory): wait a moment rather than spin; the
                // connection stays in the kernel's backlog.
                let now = tokio::time::Instant::now();
                if last_accept_error.is_none_or(|t| now.duration_since(t) >= ACCEPT_ERROR_EVERY) {
                    last_accept_error = Some(now);
                    tracing::warn!("api: cannot accept a connection: {e}; retrying");
                }
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
                continue;
            }
        };
        let permit = match slots.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                // Full: the oldest connection gives way; this one waits for its place.
                if let Some((_, token)) = open.lock().ok().and_then(|mut o| o.oldest()) {
                    token.cancel();
                }
                let waited = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    waited = tokio::time::timeout(limits.header_timeout, slots.clone().acquire_owned()) => waited,
                };
                match waited {
                    Ok(Ok(permit)) => permit,
                    _ => {
                        tracing::warn!(
                            "api: {} connections are busy; a new connection was closed unserved",
                            limits.max_connections
                        );
                        drop(stream);
                        continue;
                    }
                }
            }
        };
        let Ok((id, token)) = open.lock().map(|mut o| o.add()) else {
            continue;
        };
        let service =
            TowerToHyperService::new(RequestBodyTimeout::new(app.clone(), limits.body_timeout));
        let open = open.clone();
        let stopping = shutdown.clone();
        running.spawn(async move {
            let mut builder = http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .keep_alive(true);
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = token.cancelled() => close(conn.as_mut()).await,
                _ = stopping.cancelled() => close(conn.as_mut()).await,
            }
            if let Ok(mut o) = open.lock() {
                o.conns.remove(&id);
            }
            drop(permit);
        });
    }
    // Stopping: every connection answers what it is busy with, then closes.
    if let Ok(mut o) = open.lock() {
        for (_, token) in std::mem::take(&mut o.conns) {
            token.cancel();
        }
    }
    let _ = tokio::time::timeout(CLOSE_GRACE * 2, async {
        while running.join_next().await.is_some() {}
    })
    .await;
}

/// Asks a connection to close: at once when it waits for a request, after its answer
/// when busy (at most [`CLOSE_GRACE`]).
async fn close<C>(mut conn: std::pin::Pin<&mut C>)
where
    C: std::future::Future + GracefulConnection,
{
    conn.as_mut().shut_down();
    let _ = tokio::time::timeout(CLOSE_GRACE, conn).await;
}

/// hyper's connection, as far as [`close`] needs it.
trait GracefulConnection {
    fn shut_down(self: std::pin::Pin<&mut Self>);
}

impl<I, S> GracefulConnection for http1::Connection<I, S>
where
    S: hyper::service::HttpService<hyper::body::Incoming>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    S::ResBody: hyper::body::Body + 'static,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn shut_down(self: std::pin::Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_gives_way_once() {
        let mut open = Open::default();
        let (a, _) = open.add();
        let (b, _) = open.add();
        let (c, _) = open.add();
        assert_eq!(open.oldest().map(|(id, _)| id), Some(a));
        assert_eq!(open.oldest().map(|(id, _)| id), Some(b));
        open.conns.remove(&c);
        assert!(open.oldest().is_none());
        let (d, _) = open.add();
        assert!(d > c, "ids keep growing: {d} after {c}");
        assert_eq!(open.oldest().map(|(id, _)| id), Some(d));
    }
}
