//! The one session pool every connection-oriented transport (SSH, telnet, RouterOS API)
//! runs on: at most `max_sessions` sessions per NAS (idle and in use together), idle
//! sessions reused and checked before reuse, a failed session never reused, the connect
//! backoff ([`super::backoff`]), closing, and the counters `/status` shows.
//!
//! The protocol files keep only what differs: how to connect and log in
//! ([`Connector::connect`]), whether an idle session is still alive
//! ([`Session::usable`]), how to say goodbye ([`Session::goodbye`]), and how to run
//! commands on a session they hold through a [`Lease`].
//!
//! Waiting for a free session is queueing inside nasd, not a property of the device: it
//! is not bounded by the connect timeout and never reported as a connect failure or a
//! timeout. The connect deadline starts once a slot is held. The only way a wait ends
//! without a session is the pool being closed ([`SessionError::PoolClosed`]).

use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError};
use tokio::time::Instant;

use super::SessionError;
use super::backoff::ConnectBackoff;

/// The default `[transport] connect_timeout`.
pub use crate::config::DEFAULT_CONNECT_TIMEOUT;

/// One logged-in session of a protocol.
pub trait Session: Send + 'static {
    /// Whether a session taken from the idle list can still be used. It may read (and
    /// answer) what arrived while it sat idle; false drops it without a goodbye.
    fn usable(&mut self) -> impl Future<Output = bool> + Send;
    /// A short, polite goodbye before the session is dropped (bounded by the protocol).
    fn goodbye(&mut self) -> impl Future<Output = ()> + Send;
}

/// How a protocol opens sessions to one NAS.
pub trait Connector: Send + Sync + 'static {
    type Session: Session;
    /// Connects and logs in. The pool also cuts it off at `deadline`.
    fn connect(
        &self,
        deadline: Instant,
    ) -> impl Future<Output = Result<Self::Session, SessionError>> + Send;
}

/// What a pool has done, shared with the statistics (`Arc`) so they need not hold the
/// pool itself.
#[derive(Debug, Default)]
pub struct PoolCounters {
    open: AtomicUsize,
    waits: AtomicU64,
    wait_micros: AtomicU64,
    connects: AtomicU64,
    connect_failures: AtomicU64,
}

/// A copy of [`PoolCounters`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolFigures {
    /// Sessions connected and logged in now, idle or in use.
    pub open_sessions: usize,
    /// Runs that found every slot taken and had to wait for one.
    pub waits: u64,
    /// The time those runs spent waiting, summed.
    pub wait_total: Duration,
    /// Sessions opened (connect and login succeeded).
    pub connects: u64,
    /// Connects or logins that failed (or were not tried because of the backoff).
    pub connect_failures: u64,
}

impl PoolCounters {
    /// Sessions open now, idle or in use.
    pub fn open_sessions(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    pub fn figures(&self) -> PoolFigures {
        PoolFigures {
            open_sessions: self.open_sessions(),
            waits: self.waits.load(Ordering::Relaxed),
            wait_total: Duration::from_micros(self.wait_micros.load(Ordering::Relaxed)),
            connects: self.connects.load(Ordering::Relaxed),
            connect_failures: self.connect_failures.load(Ordering::Relaxed),
        }
    }
}

/// Keeps `PoolCounters::open` equal to the sessions the pool counts as open.
struct OpenGuard(Arc<PoolCounters>);

impl OpenGuard {
    fn new(counters: &Arc<PoolCounters>) -> OpenGuard {
        counters.open.fetch_add(1, Ordering::SeqCst);
        OpenGuard(Arc::clone(counters))
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A session and its place in the open count.
struct Pooled<S> {
    session: S,
    open: OpenGuard,
}

struct Idle<S> {
    sessions: Vec<Pooled<S>>,
    /// Set by `close`, read under the same lock, so a session cannot be parked in a pool
    /// that was just closed.
    closed: bool,
}

/// The sessions to one NAS, shared by its workers (`Arc<...Pool>`).
///
/// A run holds one permit of a semaphore of `max_sessions` for as long as it holds a
/// session, and only a permit holder opens one, so open sessions (idle + in use) never
/// exceed `max_sessions`. A session goes back to the idle list before its permit is
/// released, so the next run finds it instead of opening another; a discarded session
/// keeps its permit until it is gone.
pub struct Pool<C: Connector> {
    connector: C,
    label: String,
    /// Names the protocol in messages: `SSH`, `telnet`, `API`.
    protocol: &'static str,
    max_sessions: usize,
    connect_timeout: Duration,
    permits: Arc<Semaphore>,
    idle: Mutex<Idle<C::Session>>,
    backoff: ConnectBackoff<SessionError>,
    counters: Arc<PoolCounters>,
}

impl<C: Connector> Pool<C> {
    /// A pool that connects lazily, on the first checkout. `max_sessions` 0 counts as 1.
    pub fn new(
        connector: C,
        label: String,
        protocol: &'static str,
        max_sessions: usize,
        connect_timeout: Duration,
    ) -> Pool<C> {
        // Zero would block every run forever; one session is the least that works.
        let max_sessions = max_sessions.max(1);
        Pool {
            connector,
            label,
            protocol,
            max_sessions,
            connect_timeout,
            permits: Arc::new(Semaphore::new(max_sessions)),
            idle: Mutex::new(Idle {
                sessions: Vec::new(),
                closed: false,
            }),
            backoff: ConnectBackoff::default(),
            counters: Arc::new(PoolCounters::default()),
        }
    }

    pub fn connector(&self) -> &C {
        &self.connector
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    /// Sessions open now, idle or in use.
    pub fn open_sessions(&self) -> usize {
        self.counters.open_sessions()
    }

    pub fn counters(&self) -> Arc<PoolCounters> {
        Arc::clone(&self.counters)
    }

    fn lock_idle(&self) -> MutexGuard<'_, Idle<C::Session>> {
        // Every critical section is a push, a pop or a flag: a panic cannot leave the
        // list half-updated.
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A session for one run: an idle one that is still usable, or a new one. Waits for
    /// a free slot as long as it takes (ended only by `close`); then getting the session
    /// (backoff, connect, login) is bounded by the smaller of `connect_timeout` and
    /// `limit` (the run's command timeout).
    pub async fn checkout(&self, limit: Duration) -> Result<Lease<'_, C>, SessionError> {
        if self.lock_idle().closed {
            return Err(SessionError::Closed(
                self.label.clone(),
                format!("the {} pool is closed", self.protocol),
            ));
        }
        let permit = match Arc::clone(&self.permits).try_acquire_owned() {
            Ok(permit) => permit,
            Err(TryAcquireError::Closed) => return Err(self.closed_while_waiting()),
            Err(TryAcquireError::NoPermits) => {
                let started = Instant::now();
                let acquired = Arc::clone(&self.permits).acquire_owned().await;
                let waited = started.elapsed();
                self.counters.waits.fetch_add(1, Ordering::Relaxed);
                self.counters.wait_micros.fetch_add(
                    u64::try_from(waited.as_micros()).unwrap_or(u64::MAX),
                    Ordering::Relaxed,
                );
                match acquired {
                    Ok(permit) => permit,
                    Err(_) => return Err(self.closed_while_waiting()),
                }
            }
        };
        let limit = self.connect_timeout.min(limit);
        loop {
            let candidate = {
                let mut idle = self.lock_idle();
                if idle.closed {
                    return Err(self.closed_while_waiting());
                }
                idle.sessions.pop()
            };
            let Some(mut pooled) = candidate else {
                break;
            };
            if pooled.session.usable().await {
                return Ok(Lease::new(self, pooled, permit, true, limit));
            }
            // Closed by the device (or a keepalive) while idle: nothing was sent on it,
            // dropping it is all that is left to do.
            tracing::debug!(nas = %self.label, protocol = self.protocol, "idle session was closed by the device");
        }
        let pooled = self.open(Instant::now() + limit, limit).await?;
        Ok(Lease::new(self, pooled, permit, false, limit))
    }

    /// Disconnects the idle sessions (after a goodbye) and refuses further runs; runs
    /// waiting for a slot end with `PoolClosed`, sessions in use are dropped when their
    /// run ends.
    pub async fn close(&self) {
        let idle: Vec<Pooled<C::Session>> = {
            let mut idle = self.lock_idle();
            idle.closed = true;
            idle.sessions.drain(..).collect()
        };
        self.permits.close();
        for mut pooled in idle {
            pooled.session.goodbye().await;
        }
    }

    fn closed_while_waiting(&self) -> SessionError {
        SessionError::PoolClosed(
            self.label.clone(),
            format!(
                "the {} session pool was closed (new NAS settings, NAS removed or \
                 shutdown) while this run waited for one of its {} sessions; nothing was sent",
                self.protocol, self.max_sessions
            ),
        )
    }

    /// Opens a session, honouring the backoff after failures: waits it out when it ends
    /// before `deadline`, else fails at once with the failure behind it.
    async fn open(
        &self,
        deadline: Instant,
        limit: Duration,
    ) -> Result<Pooled<C::Session>, SessionError> {
        if let Err(blocked) = self.backoff.wait(deadline).await {
            self.counters
                .connect_failures
                .fetch_add(1, Ordering::Relaxed);
            return Err(with_note(
                blocked.last_error,
                &format!(
                    "after {} failed connects; not retrying yet: next attempt in {} ms",
                    blocked.failures,
                    blocked.remaining.as_millis()
                ),
            ));
        }
        let outcome =
            match tokio::time::timeout_at(deadline, self.connector.connect(deadline)).await {
                Ok(outcome) => outcome,
                Err(_) => Err(SessionError::Connect(
                    self.label.clone(),
                    format!(
                        "no usable {} session within {} (nothing was sent)",
                        self.protocol,
                        seconds(limit)
                    ),
                )),
            };
        match outcome {
            Ok(session) => {
                self.backoff.succeeded();
                self.counters.connects.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(nas = %self.label, protocol = self.protocol, "session opened");
                Ok(Pooled {
                    session,
                    open: OpenGuard::new(&self.counters),
                })
            }
            Err(error @ SessionError::Resource(..)) => {
                // This host's shortage, not the device's: no backoff against the NAS.
                tracing::warn!(nas = %self.label, protocol = self.protocol, %error, "connect failed");
                Err(error)
            }
            Err(error) => {
                let failures = self.backoff.failed(error.clone());
                self.counters
                    .connect_failures
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(nas = %self.label, protocol = self.protocol, %error, failures, "connect failed");
                Err(error)
            }
        }
    }

    fn put_back(&self, pooled: Pooled<C::Session>, permit: OwnedSemaphorePermit) {
        let mut idle = self.lock_idle();
        if idle.closed {
            drop(idle);
            discard(pooled, permit);
            return;
        }
        idle.sessions.push(pooled);
        drop(idle);
        // Released only now that the session is back in the list, so the next run finds
        // it instead of opening another one.
        drop(permit);
    }
}

/// Drops a session that failed (or is not wanted back) after its goodbye, in a task of
/// its own. It no longer counts as open, but it keeps its permit until it is gone, so a
/// replacement opened meanwhile cannot exceed `max_sessions`.
fn discard<S: Session>(pooled: Pooled<S>, permit: OwnedSemaphorePermit) {
    let Pooled { mut session, open } = pooled;
    drop(open);
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => {
            runtime.spawn(async move {
                session.goodbye().await;
                drop(session);
                drop(permit);
            });
        }
        Err(_) => {
            drop(session);
            drop(permit);
        }
    }
}

/// One run's hold on a session and its slot. [`Lease::done`] puts a session that did
/// everything asked back into the pool; dropping the lease any other way (an error, a
/// cancelled run) discards the session, which is never reused.
pub struct Lease<'p, C: Connector> {
    pool: &'p Pool<C>,
    /// Always `Some` until `done` or the drop takes it.
    held: Option<(Pooled<C::Session>, OwnedSemaphorePermit)>,
    reused: bool,
    limit: Duration,
}

impl<'p, C: Connector> Lease<'p, C> {
    fn new(
        pool: &'p Pool<C>,
        pooled: Pooled<C::Session>,
        permit: OwnedSemaphorePermit,
        reused: bool,
        limit: Duration,
    ) -> Lease<'p, C> {
        Lease {
            pool,
            held: Some((pooled, permit)),
            reused,
            limit,
        }
    }

    /// The session, for running commands on.
    pub fn session(&mut self) -> &mut C::Session {
        match &mut self.held {
            Some((pooled, _)) => &mut pooled.session,
            // `held` is only taken by `done` and `drop`, which consume the lease.
            None => unreachable!("a lease holds its session until it is consumed"),
        }
    }

    /// Whether the session came from the idle list (it may have died there unnoticed).
    pub fn reused(&self) -> bool {
        self.reused
    }

    /// The session sat idle and turned out dead on first use, before anything reached
    /// the device: drops it and opens a fresh one in the same slot (the backoff and a
    /// new connect deadline apply). On failure the slot is released.
    pub async fn reconnect(mut self) -> Result<Lease<'p, C>, SessionError> {
        let Some((dead, permit)) = self.held.take() else {
            unreachable!("a lease holds its session until it is consumed");
        };
        // Dead already: no goodbye, and it stops counting as open at once.
        drop(dead);
        let pool = self.pool;
        let limit = self.limit;
        let fresh = pool.open(Instant::now() + limit, limit).await?;
        Ok(Lease::new(pool, fresh, permit, false, limit))
    }

    /// The run is over and the session is in a known state: back to the idle list.
    pub fn done(mut self) {
        if let Some((pooled, permit)) = self.held.take() {
            self.pool.put_back(pooled, permit);
        }
    }
}

impl<C: Connector> Drop for Lease<'_, C> {
    fn drop(&mut self) {
        if let Some((pooled, permit)) = self.held.take() {
            discard(pooled, permit);
        }
    }
}

/// `1.5s` style, for messages.
fn seconds(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

/// The failure behind a backoff, repeated with a note saying so; its kind is kept so the
/// run is judged as that failure was (an auth rejection stays one).
fn with_note(error: SessionError, note: &str) -> SessionError {
    match error {
        SessionError::Connect(l, m) => SessionError::Connect(l, format!("{m} ({note})")),
        SessionError::Timeout(l, m) => SessionError::Timeout(l, format!("{m} ({note})")),
        SessionError::Closed(l, m) => SessionError::Closed(l, format!("{m} ({note})")),
        SessionError::Protocol(l, m) => SessionError::Protocol(l, format!("{m} ({note})")),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    /// A fake device: counts sessions, can refuse connects, can take time to connect.
    #[derive(Default)]
    struct Fake {
        live: Arc<AtomicUsize>,
        max_live: Arc<AtomicUsize>,
        connects: AtomicUsize,
        goodbyes: Arc<AtomicUsize>,
        refuse: AtomicBool,
        connect_time: Mutex<Duration>,
        /// Connect attempts, as offsets from the test's start.
        attempts: Mutex<Vec<Instant>>,
    }

    struct FakeSession {
        id: usize,
        alive: Arc<AtomicBool>,
        live: Arc<AtomicUsize>,
        goodbyes: Arc<AtomicUsize>,
    }

    impl Drop for FakeSession {
        fn drop(&mut self) {
            self.live.fetch_sub(1, Ordering::SeqCst);
        }
    }

    impl Session for FakeSession {
        async fn usable(&mut self) -> bool {
            self.alive.load(Ordering::SeqCst)
        }
        async fn goodbye(&mut self) {
            self.goodbyes.fetch_add(1, Ordering::SeqCst);
        }
    }

    impl Connector for Arc<Fake> {
        type Session = FakeSession;
        async fn connect(&self, _deadline: Instant) -> Result<FakeSession, SessionError> {
            self.attempts.lock().unwrap().push(Instant::now());
            let wait = *self.connect_time.lock().unwrap();
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
            if self.refuse.load(Ordering::SeqCst) {
                return Err(SessionError::Connect("nas 1".into(), "refused".into()));
            }
            let id = self.connects.fetch_add(1, Ordering::SeqCst) + 1;
            let live = self.live.fetch_add(1, Ordering::SeqCst) + 1;
            self.max_live.fetch_max(live, Ordering::SeqCst);
            Ok(FakeSession {
                id,
                alive: Arc::new(AtomicBool::new(true)),
                live: Arc::clone(&self.live),
                goodbyes: Arc::clone(&self.goodbyes),
            })
        }
    }

    const CONNECT_TIMEOUT: Duration = Duration::from_millis(200);
    const RUN_TIMEOUT: Duration = Duration::from_secs(10);

    fn pool(max_sessions: usize) -> (Arc<Fake>, Arc<Pool<Arc<Fake>>>) {
        pool_with(max_sessions, CONNECT_TIMEOUT)
    }

    fn pool_with(
        max_sessions: usize,
        connect_timeout: Duration,
    ) -> (Arc<Fake>, Arc<Pool<Arc<Fake>>>) {
        let fake = Arc::new(Fake::default());
        let pool = Pool::new(
            Arc::clone(&fake),
            "nas 1".into(),
            "fake",
            max_sessions,
            connect_timeout,
        );
        (fake, Arc::new(pool))
    }

    /// A run that holds a session for `busy` (a slow command), then gives it back.
    async fn slow_run(pool: &Pool<Arc<Fake>>, busy: Duration) -> Result<usize, SessionError> {
        let mut lease = pool.checkout(RUN_TIMEOUT).await?;
        tokio::time::sleep(busy).await;
        let id = lease.session().id;
        lease.done();
        Ok(id)
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_for_a_slot_is_unbounded_and_never_exceeds_max_sessions() {
        // 16 runs, 2 sessions, each command 600 ms: the last run waits 4.2 s for a slot,
        // far past the 200 ms connect timeout, and still gets a session.
        let (fake, pool) = pool(2);
        let mut runs = tokio::task::JoinSet::new();
        for _ in 0..16 {
            let pool = Arc::clone(&pool);
            runs.spawn(async move { slow_run(&pool, Duration::from_millis(600)).await });
        }
        let started = Instant::now();
        let mut ids = Vec::new();
        while let Some(result) = runs.join_next().await {
            ids.push(result.unwrap().expect("every run gets a session"));
        }
        assert_eq!(started.elapsed(), Duration::from_millis(8 * 600));
        ids.sort();
        ids.dedup();
        assert_eq!(ids, [1, 2], "two sessions, reused");
        assert_eq!(fake.max_live.load(Ordering::SeqCst), 2);
        assert_eq!(pool.open_sessions(), 2);
        let figures = pool.counters().figures();
        assert_eq!(figures.connects, 2);
        assert_eq!(figures.connect_failures, 0);
        assert_eq!(figures.waits, 14);
        // Waits of 600 ms (2 runs), 1200 ms (2), ... 4200 ms (2).
        let total: u64 = (1..=7).map(|round| 2 * 600 * round).sum();
        assert_eq!(figures.wait_total, Duration::from_millis(total));
    }

    #[tokio::test(start_paused = true)]
    async fn the_connect_deadline_starts_once_a_slot_is_held() {
        // Each connect takes 150 ms (under the 200 ms timeout); the second run waits 1 s
        // for the slot first and its connect still has the whole 200 ms.
        let (fake, pool) = pool(1);
        *fake.connect_time.lock().unwrap() = Duration::from_millis(150);
        let first = {
            let pool = Arc::clone(&pool);
            tokio::spawn(async move {
                let lease = pool.checkout(RUN_TIMEOUT).await?;
                tokio::time::sleep(Duration::from_secs(1)).await;
                // Failed: dropped, not reused, so the next run must connect anew.
                drop(lease);
                Ok::<(), SessionError>(())
            })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        let mut second = pool.checkout(RUN_TIMEOUT).await.expect("a session");
        assert_eq!(second.session().id, 2);
        assert!(!second.reused());
        second.done();
        first.await.unwrap().unwrap();
        // Only sessions that completed are reused.
        let mut third = pool.checkout(RUN_TIMEOUT).await.expect("a session");
        assert!(third.reused());
        assert_eq!(third.session().id, 2);
        third.done();
    }

    #[tokio::test(start_paused = true)]
    async fn a_connect_slower_than_the_timeout_is_a_connect_error() {
        let (fake, pool) = pool(1);
        *fake.connect_time.lock().unwrap() = Duration::from_secs(1);
        let error = pool.checkout(RUN_TIMEOUT).await.err();
        assert_eq!(
            error,
            Some(SessionError::Connect(
                "nas 1".into(),
                "no usable fake session within 0.2s (nothing was sent)".into()
            ))
        );
        // The run's own timeout bounds the setup too when it is shorter.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let started = Instant::now();
        let error = pool.checkout(Duration::from_millis(100)).await.err();
        assert_eq!(started.elapsed(), Duration::from_millis(100));
        assert_eq!(
            error,
            Some(SessionError::Connect(
                "nas 1".into(),
                "no usable fake session within 0.1s (nothing was sent)".into()
            ))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_dead_idle_session_is_dropped_not_reused() {
        let (fake, pool) = pool(2);
        let mut lease = pool.checkout(RUN_TIMEOUT).await.unwrap();
        let alive = Arc::clone(&lease.session().alive);
        lease.done();
        assert_eq!(pool.open_sessions(), 1);
        alive.store(false, Ordering::SeqCst);
        let mut lease = pool.checkout(RUN_TIMEOUT).await.unwrap();
        assert_eq!(lease.session().id, 2, "a new session");
        assert!(!lease.reused());
        assert_eq!(fake.live.load(Ordering::SeqCst), 1, "the dead one is gone");
        assert_eq!(
            fake.goodbyes.load(Ordering::SeqCst),
            0,
            "nobody to say it to"
        );
        assert_eq!(pool.open_sessions(), 1);
        lease.done();
    }

    #[tokio::test(start_paused = true)]
    async fn reconnect_replaces_a_session_in_the_same_slot() {
        let (fake, pool) = pool(1);
        pool.checkout(RUN_TIMEOUT).await.unwrap().done();
        let lease = pool.checkout(RUN_TIMEOUT).await.unwrap();
        assert!(lease.reused());
        let mut lease = lease.reconnect().await.expect("a fresh session");
        assert!(!lease.reused());
        assert_eq!(lease.session().id, 2);
        assert_eq!(fake.live.load(Ordering::SeqCst), 1);
        assert_eq!(pool.open_sessions(), 1);
        lease.done();
        assert_eq!(fake.max_live.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_session_keeps_its_slot_until_it_is_gone() {
        let (fake, pool) = pool(1);
        let lease = pool.checkout(RUN_TIMEOUT).await.unwrap();
        drop(lease);
        assert_eq!(pool.open_sessions(), 0, "a discarded session is not open");
        // The discard task says goodbye and then frees the slot; the next run gets it.
        let mut next = pool.checkout(RUN_TIMEOUT).await.unwrap();
        assert_eq!(next.session().id, 2);
        assert_eq!(fake.max_live.load(Ordering::SeqCst), 1);
        assert_eq!(fake.goodbyes.load(Ordering::SeqCst), 1);
        next.done();
    }

    #[tokio::test(start_paused = true)]
    async fn close_wakes_waiters_with_pool_closed() {
        let (fake, pool) = pool(1);
        let holder = pool.checkout(RUN_TIMEOUT).await.unwrap();
        let waiter = {
            let pool = Arc::clone(&pool);
            tokio::spawn(async move { pool.checkout(RUN_TIMEOUT).await.err() })
        };
        // Waiting far longer than any timeout: still waiting, no error.
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!waiter.is_finished());
        pool.close().await;
        let error = waiter.await.unwrap();
        assert!(
            matches!(&error, Some(SessionError::PoolClosed(label, m)) if label == "nas 1" && m.contains("nothing was sent")),
            "{error:?}"
        );
        assert_eq!(
            crate::transport::answer::session_error_verdict(&error.unwrap()),
            crate::transport::Verdict::Requeue(
                "nas 1: the fake session pool was closed (new NAS settings, NAS removed or \
                 shutdown) while this run waited for one of its 1 sessions; nothing was sent"
                    .into()
            )
        );
        // The session in use is dropped when its run ends, not parked.
        holder.done();
        tokio::task::yield_now().await;
        assert_eq!(pool.open_sessions(), 0);
        assert_eq!(fake.live.load(Ordering::SeqCst), 0);
        // A run that starts on the closed pool is told so.
        assert!(matches!(
            pool.checkout(RUN_TIMEOUT).await.err(),
            Some(SessionError::Closed(..))
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn close_says_goodbye_to_idle_sessions() {
        let (fake, pool) = pool(2);
        let a = pool.checkout(RUN_TIMEOUT).await.unwrap();
        let b = pool.checkout(RUN_TIMEOUT).await.unwrap();
        a.done();
        b.done();
        assert_eq!(pool.open_sessions(), 2);
        pool.close().await;
        assert_eq!(pool.open_sessions(), 0);
        assert_eq!(fake.live.load(Ordering::SeqCst), 0);
        assert_eq!(fake.goodbyes.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn failed_connects_back_off_and_a_wait_past_the_deadline_fails_at_once() {
        let (fake, pool) = pool_with(1, Duration::from_secs(1));
        fake.refuse.store(true, Ordering::SeqCst);
        let started = Instant::now();
        for _ in 0..4 {
            let error = pool.checkout(RUN_TIMEOUT).await.err();
            assert_eq!(
                error,
                Some(SessionError::Connect("nas 1".into(), "refused".into()))
            );
        }
        // The first connect at once, then after 100, 200 and 400 ms.
        let offsets: Vec<Duration> = fake
            .attempts
            .lock()
            .unwrap()
            .iter()
            .map(|at| *at - started)
            .collect();
        let ms = Duration::from_millis;
        assert_eq!(offsets, [ms(0), ms(100), ms(300), ms(700)]);
        // The next wait (800 ms) would overrun a 150 ms deadline: the run fails at once
        // with the last connect error, without trying.
        let started = Instant::now();
        let error = pool.checkout(ms(150)).await.err();
        assert_eq!(started.elapsed(), Duration::ZERO);
        assert_eq!(fake.attempts.lock().unwrap().len(), 4);
        assert_eq!(
            error,
            Some(SessionError::Connect(
                "nas 1".into(),
                "refused (after 4 failed connects; not retrying yet: next attempt in 800 ms)"
                    .into()
            ))
        );
        assert_eq!(pool.counters().figures().connect_failures, 5);
        // The device is back: the next connect (after the backoff) succeeds and ends it.
        fake.refuse.store(false, Ordering::SeqCst);
        tokio::time::sleep(ms(800)).await;
        pool.checkout(RUN_TIMEOUT).await.expect("connected").done();
        let started = Instant::now();
        drop(pool.checkout(RUN_TIMEOUT).await.unwrap());
        // Reused at once; the discarded session is replaced with no backoff.
        tokio::task::yield_now().await;
        pool.checkout(RUN_TIMEOUT)
            .await
            .expect("reconnected")
            .done();
        assert_eq!(started.elapsed(), Duration::ZERO);
    }
}
