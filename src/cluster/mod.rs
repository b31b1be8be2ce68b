//! Several daemons on one PostgreSQL: membership, one owner per NAS, takeover and
//! handover. The I/O shell around [`plan`] (pure).
//!
//! Each daemon has a row in `nasd_daemons` with a lease renewed by its heartbeat in
//! database time, and owns NAS through rows of `nas_owner` (daemon, session, epoch).
//! Every heartbeat the daemon reads the member list, computes which NAS it should own
//! (rendezvous hashing over the live daemons), takes the ones nobody validly owns, and
//! hands over the ones another daemon should have: their owners stop claiming, finish
//! what is in flight, and the row is released for the other daemon to take.
//!
//! A daemon trusts its lease only until a local deadline kept on the monotonic clock
//! ([`Fence`]): the moment the renewal was sent plus the lease minus a safety margin.
//! Owners check it before every claim and every send. When it passes (the daemon was
//! frozen, or the database did not answer), the daemon stops every owner at once
//! (in-flight sends are abandoned and the device sessions closed, before its lease ends
//! in the database), then joins again with a new session, and only then takes NAS
//! again. So a new owner may start as soon as the old lease has run out: by then the
//! old owner has dropped its sessions, unless it is frozen mid-send (see README).
//!
//! SQLite is one daemon: no cluster task runs, the fence always holds and the
//! supervisor serves every enabled NAS.

pub mod plan;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::alerts::{Alert, AlertKind, Alerts};
use crate::config::ClusterConfig;
use crate::journal::Journal;
use crate::store::cluster::{Joined, Member};
use crate::store::{Store, StoreError};

/// The local deadline of this daemon's lease: owners claim and send only before it.
pub struct Fence {
    /// None: the lease is not held (not joined yet, or lost).
    deadline: Mutex<Option<Instant>>,
    /// One daemon on SQLite: nothing to fence.
    always: bool,
    /// Counts the times the lease was lost: a send in progress watches it and is
    /// abandoned when it moves.
    losses: watch::Sender<u64>,
}

impl Fence {
    /// A fence that always holds (SQLite, `nasd send`, tests of one daemon).
    pub fn always() -> Arc<Fence> {
        Arc::new(Fence {
            deadline: Mutex::new(None),
            always: true,
            losses: watch::Sender::new(0),
        })
    }

    /// A fence that holds only while a renewed lease says so.
    pub fn leased() -> Arc<Fence> {
        Arc::new(Fence {
            deadline: Mutex::new(None),
            always: false,
            losses: watch::Sender::new(0),
        })
    }

    /// Whether this daemon may claim or send now.
    pub fn holds(&self) -> bool {
        self.always || self.deadline().is_some_and(|d| Instant::now() < d)
    }

    pub fn deadline(&self) -> Option<Instant> {
        *self.deadline.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set(&self, deadline: Option<Instant>) {
        *self.deadline.lock().unwrap_or_else(|p| p.into_inner()) = deadline;
    }

    /// The lease is lost: no claim or send starts any more, and sends in progress are
    /// abandoned (their futures dropped, which closes their sessions).
    fn revoke(&self) {
        self.set(None);
        self.losses.send_modify(|n| *n += 1);
    }

    /// A watch on losses, taken before a send: [`Fence::revoked`] completes once the
    /// lease is lost after this point.
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.losses.subscribe()
    }

    /// Completes when the lease is lost after `watch` was taken (never for a fence that
    /// always holds).
    pub async fn revoked(mut watch: watch::Receiver<u64>) {
        let seen = *watch.borrow_and_update();
        if watch.wait_for(|n| *n != seen).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// What the supervisor runs owners for.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Assignment {
    /// NAS id -> ownership epoch. None: every enabled NAS, epoch 0 (one daemon).
    pub serve: Option<HashMap<i64, i64>>,
    /// Owners no longer in `serve` stop at once, abandoning what is in flight: the
    /// lease was lost. Otherwise they finish in-flight commands first (handover).
    pub hard_stop: bool,
    /// NAS being handed over (NAS id -> epoch): the supervisor reports each stopped as
    /// soon as no owner of it runs, also when it never started one (a NAS taken and
    /// handed over again before the supervisor got to it).
    pub handing: HashMap<i64, i64>,
}

/// The enabled NAS (id, ip) as the supervisor last read them; None before its first
/// resync.
pub type EnabledNas = Option<Arc<Vec<(i64, String)>>>;

/// The device of every NAS this daemon runs an owner for (kept by the supervisor): when
/// the lease is lost the cluster task closes them all at once, so no session of this
/// daemon outlives its lease, whatever the supervisor is busy with.
pub type Devices = Arc<Mutex<HashMap<i64, crate::transport::device::Device>>>;

/// What the supervisor tells the cluster task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    /// The owner of this NAS under this epoch has stopped (nothing of it is in flight).
    Stopped { nas_id: i64, epoch: i64 },
    /// After a hard stop or at shutdown: no owner runs any more.
    AllStopped,
}

/// The supervisor's side of the cluster.
pub struct Link {
    pub assignment: watch::Receiver<Arc<Assignment>>,
    pub reports: mpsc::UnboundedSender<Report>,
    /// The enabled NAS (id, ip) after each resync.
    pub nas: watch::Sender<EnabledNas>,
    /// One daemon: the assignment's sender, kept so that it never reads as closed.
    _single: Option<watch::Sender<Arc<Assignment>>>,
}

impl Link {
    /// One daemon: every enabled NAS, nobody listening to reports.
    pub fn single() -> Link {
        let (single, assignment) = watch::channel(Arc::new(Assignment::default()));
        let (reports, _) = mpsc::unbounded_channel();
        let (nas, _) = watch::channel(None);
        Link {
            assignment,
            reports,
            nas,
            _single: Some(single),
        }
    }
}

/// This daemon's identity in the cluster.
#[derive(Debug, Clone)]
pub struct Identity {
    pub id: String,
    pub host: String,
    pub pid: i32,
    pub api: Option<String>,
}

impl Identity {
    /// `[cluster] name`, or `<hostname>:<pid>`.
    pub fn new(cfg: &ClusterConfig, api: Option<String>) -> Identity {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".into());
        let pid = std::process::id() as i32;
        Identity {
            id: cfg.name.clone().unwrap_or_else(|| format!("{host}:{pid}")),
            host,
            pid,
            api,
        }
    }
}

/// A fresh session number (never 0, so it cannot match a released row).
fn new_session() -> i64 {
    loop {
        let s: i64 = rand::random();
        if s != 0 {
            return s;
        }
    }
}

/// The cluster task of one daemon.
pub struct Cluster {
    store: Store,
    cfg: ClusterConfig,
    me: Identity,
    session: i64,
    fence: Arc<Fence>,
    journal: Journal,
    alerts: Alerts,
    assignment: watch::Sender<Arc<Assignment>>,
    reports: mpsc::UnboundedReceiver<Report>,
    nas: watch::Receiver<EnabledNas>,
    /// NAS whose rows name this session, with their epoch.
    held: HashMap<i64, i64>,
    /// NAS being handed over: epoch and the daemon that should get it.
    handing: HashMap<i64, (i64, Option<String>)>,
    /// Owners the supervisor reported stopped, not yet released.
    stopped: HashSet<(i64, i64)>,
    /// The members as the last heartbeat saw them (shared with the API).
    members: Arc<Mutex<Vec<Member>>>,
    /// Take again soon: a NAS we should own is still held by a daemon handing it over.
    retry_take_at: Option<Instant>,
    devices: Devices,
}

/// What `daemon::start` gets from joining: the cluster task to run, the supervisor's
/// link and the fence every owner checks.
pub struct Joining {
    pub cluster: Cluster,
    pub link: Link,
    pub fence: Arc<Fence>,
    pub members: Arc<Mutex<Vec<Member>>>,
}

/// Joins the cluster (PostgreSQL). Fails when the database cannot be reached or when
/// a live daemon already uses this daemon's id.
pub async fn join(
    store: Store,
    cfg: ClusterConfig,
    me: Identity,
    journal: Journal,
    alerts: Alerts,
    devices: Devices,
) -> anyhow::Result<Joining> {
    let fence = Fence::leased();
    let session = new_session();
    end_dead_local_leases(&store, &me, &journal).await;
    let started = Instant::now();
    let joined = store
        .cluster_join(
            &me.id,
            session,
            None,
            &me.host,
            me.pid,
            me.api.as_deref(),
            cfg.lease,
        )
        .await?;
    let previous = match joined {
        Joined::Joined { previous } => previous,
        Joined::InUse {
            host,
            pid,
            lease_until,
        } => anyhow::bail!(
            "cluster: the daemon id `{}` is in use by a live daemon (host {host}, pid {pid}, \
             lease until {}): give each daemon its own [cluster] name, or leave it unset \
             for <hostname>:<pid>",
            me.id,
            lease_until.format("%H:%M:%S")
        ),
    };
    fence.set(Some(started + cfg.lease - cfg.safety_margin()));
    let (assignment_tx, assignment_rx) = watch::channel(Arc::new(Assignment {
        serve: Some(HashMap::new()),
        hard_stop: false,
        handing: HashMap::new(),
    }));
    let (reports_tx, reports_rx) = mpsc::unbounded_channel();
    let (nas_tx, nas_rx) = watch::channel(None);
    let members = Arc::new(Mutex::new(Vec::new()));
    let cluster = Cluster {
        store,
        cfg,
        me,
        session,
        fence: fence.clone(),
        journal,
        alerts,
        assignment: assignment_tx,
        reports: reports_rx,
        nas: nas_rx,
        held: HashMap::new(),
        handing: HashMap::new(),
        stopped: HashSet::new(),
        members: members.clone(),
        retry_take_at: None,
        devices,
    };
    cluster.log(&format!(
        "Joined the cluster as daemon {} (lease {}, heartbeat {})",
        cluster.me.id,
        crate::duration::format_duration(cluster.cfg.lease),
        crate::duration::format_duration(cluster.cfg.heartbeat)
    ));
    if previous.as_deref() == Some("lost") {
        cluster.back();
    }
    Ok(Joining {
        cluster,
        link: Link {
            assignment: assignment_rx,
            reports: reports_tx,
            nas: nas_tx,
            _single: None,
        },
        fence,
        members,
    })
}

/// Whether process `pid` of this host is another nasd: it runs and has the same
/// executable name as this process (a pid reused by another program does not count).
fn nasd_runs(pid: i32) -> bool {
    let comm = |p: &str| std::fs::read_to_string(format!("/proc/{p}/comm")).ok();
    match (comm(&pid.to_string()), comm("self")) {
        (Some(theirs), Some(ours)) => theirs == ours,
        (Some(_), None) => true,
        (None, _) => false,
    }
}

/// A daemon restarted on the same host (a crash, `systemctl restart` after SIGKILL)
/// need not wait out the lease of its previous life: a daemon row of this host whose
/// process no longer runs is dead for certain, its sessions closed with it. Its lease
/// is ended now; the NAS it held are then taken over at once.
async fn end_dead_local_leases(store: &Store, me: &Identity, journal: &Journal) {
    let Ok(members) = store.cluster_members().await else {
        return;
    };
    let dead: Vec<String> = members
        .iter()
        .filter(|m| m.alive && matches!(m.state.as_str(), "live" | "draining"))
        .filter(|m| m.host == me.host && m.pid != me.pid && !nasd_runs(m.pid))
        .map(|m| m.id.clone())
        .collect();
    if dead.is_empty() {
        return;
    }
    match store.cluster_expire(&dead).await {
        Ok(ended) => {
            for id in ended {
                let line = format!(
                    "Daemon {id} of this host no longer runs: its lease is ended now instead of \
                     when it runs out"
                );
                tracing::warn!("{line}");
                journal.daemon(&line);
            }
        }
        Err(e) => tracing::warn!("cluster: ending the leases of dead daemons: {e}"),
    }
}

impl Cluster {
    pub fn id(&self) -> &str {
        &self.me.id
    }

    fn log(&self, line: &str) {
        tracing::info!("{line}");
        self.journal.daemon(line);
    }

    fn warn(&self, line: &str) {
        tracing::warn!("{line}");
        self.journal.daemon(line);
    }

    fn daemon_alert(&self, kind: AlertKind, daemon: &str, fields: Vec<(&str, serde_json::Value)>) {
        let mut map = std::collections::BTreeMap::new();
        map.insert("daemon".to_string(), daemon.into());
        map.insert("reporter".to_string(), self.me.id.clone().into());
        for (k, v) in fields {
            map.insert(k.to_string(), v);
        }
        self.alerts.send(Alert {
            kind,
            nas_id: 0,
            nas_name: String::new(),
            nas_ip: String::new(),
            at: Utc::now(),
            fields: map,
        });
    }

    fn back(&self) {
        self.warn(&format!(
            "Daemon {} is back in the cluster after its NAS were taken over",
            self.me.id
        ));
        self.daemon_alert(AlertKind::DaemonBack, &self.me.id, vec![]);
    }

    fn publish(&self, hard_stop: bool) {
        let serve: HashMap<i64, i64> = self
            .held
            .iter()
            .filter(|(id, _)| !self.handing.contains_key(id))
            .map(|(id, epoch)| (*id, *epoch))
            .collect();
        let next = Assignment {
            serve: Some(serve),
            hard_stop,
            handing: self
                .handing
                .iter()
                .map(|(id, (epoch, _))| (*id, *epoch))
                .collect(),
        };
        self.assignment.send_if_modified(|current| {
            if **current == next {
                false
            } else {
                *current = Arc::new(next.clone());
                true
            }
        });
    }

    fn nas_ip(&self, nas_id: i64) -> String {
        self.nas
            .borrow()
            .as_ref()
            .and_then(|list| {
                list.iter()
                    .find(|(id, _)| *id == nas_id)
                    .map(|(_, ip)| ip.clone())
            })
            .unwrap_or_else(|| "?".into())
    }

    /// Runs a database call, but not past the fence's deadline: a call that is still
    /// waiting then gives `None` (the lease is as good as lost).
    async fn bounded<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Option<Result<T, StoreError>> {
        match self.fence.deadline() {
            Some(deadline) => tokio::time::timeout_at(deadline, call).await.ok(),
            None => Some(call.await),
        }
    }

    /// Runs until `shutdown`; then hands every NAS over (owners finish in flight) and
    /// leaves.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut next_beat = Instant::now();
        let mut supervisor_up = true;
        loop {
            let deadline = self.fence.deadline();
            let mut wake = next_beat;
            if let Some(t) = self.retry_take_at {
                wake = wake.min(t);
            }
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                Some(report) = self.reports.recv() => self.on_report(report).await,
                _ = sleep_until_opt(deadline) => {
                    self.lose("let its lease run out before a heartbeat was answered").await;
                    self.rejoin(&shutdown).await;
                    next_beat = Instant::now();
                }
                changed = self.nas.changed(), if supervisor_up => {
                    if changed.is_ok() {
                        self.act().await;
                    } else {
                        // The supervisor is gone (the daemon is stopping).
                        supervisor_up = false;
                    }
                }
                _ = tokio::time::sleep_until(wake) => {
                    if Instant::now() >= next_beat {
                        next_beat = Instant::now() + self.cfg.heartbeat;
                        if !self.beat(&shutdown).await {
                            next_beat = Instant::now();
                            continue;
                        }
                    }
                    self.retry_take_at = None;
                    self.act().await;
                }
            }
        }
        self.leave().await;
    }

    /// One heartbeat. Returns false when the lease was lost (and the daemon rejoined).
    async fn beat(&mut self, shutdown: &CancellationToken) -> bool {
        let started = Instant::now();
        let answer = self
            .bounded(
                self.store
                    .cluster_heartbeat(&self.me.id, self.session, self.cfg.lease),
            )
            .await;
        match answer {
            None => {
                self.lose("got no answer to its heartbeat before the lease ran out")
                    .await;
                self.rejoin(shutdown).await;
                false
            }
            Some(Err(e)) => {
                // The fence runs out by itself if this goes on.
                tracing::warn!("cluster heartbeat: {e}");
                true
            }
            Some(Ok(beat)) => {
                if !beat.renewed {
                    self.lose("found its row in nasd_daemons replaced or removed")
                        .await;
                    self.rejoin(shutdown).await;
                    return false;
                }
                if beat.held != self.held.len() as i64 {
                    self.lose(&format!(
                        "found nas_owner naming it for {} NAS where it holds {}",
                        beat.held,
                        self.held.len()
                    ))
                    .await;
                    self.rejoin(shutdown).await;
                    return false;
                }
                if self.fence.deadline().is_none() {
                    // Lost while the call ran (the deadline passed first).
                    return true;
                }
                self.fence
                    .set(Some(started + self.cfg.lease - self.cfg.safety_margin()));
                if let Ok(mut m) = self.members.lock() {
                    *m = beat.members;
                }
                self.release_stopped().await;
                true
            }
        }
    }

    /// The live daemons NAS are spread over: those whose lease is current and that are
    /// not stopping, and this one.
    fn live(&self) -> Vec<String> {
        let mut live: Vec<String> = self
            .members
            .lock()
            .map(|m| {
                m.iter()
                    .filter(|m| m.is_live() && m.id != self.me.id)
                    .map(|m| m.id.clone())
                    .collect()
            })
            .unwrap_or_default();
        live.push(self.me.id.clone());
        live
    }

    /// Takes and hands over what the plan says.
    async fn act(&mut self) {
        if !self.fence.holds() {
            return;
        }
        let Some(nas) = self.nas.borrow().clone() else {
            // The supervisor has not read the NAS table yet.
            return;
        };
        let ids: Vec<i64> = nas.iter().map(|(id, _)| *id).collect();
        let held: HashSet<i64> = self.held.keys().copied().collect();
        let steps = plan::steps(&ids, &self.live(), &self.me.id, &held);
        let mut changed = false;
        for (nas_id, to) in steps.hand_over {
            if self.handing.contains_key(&nas_id) {
                continue;
            }
            let Some(epoch) = self.held.get(&nas_id).copied() else {
                continue;
            };
            self.log(&format!(
                "Hand over nas nasid={nas_id} nas_ip={} epoch={epoch} to {}: in-flight commands finish first",
                self.nas_ip(nas_id),
                to.as_deref()
                    .map_or("nobody (disabled or removed)".to_string(), |d| format!("daemon {d}"))
            ));
            self.handing.insert(nas_id, (epoch, to));
            changed = true;
        }
        let take: Vec<i64> = steps
            .take
            .into_iter()
            .filter(|id| !self.handing.contains_key(id))
            .collect();
        if !take.is_empty() {
            match self
                .bounded(self.store.cluster_take(&self.me.id, self.session, &take))
                .await
            {
                Some(Ok(taken)) => {
                    let mut expired: HashMap<String, usize> = HashMap::new();
                    for t in &taken {
                        self.held.insert(t.nas_id, t.epoch);
                        changed = true;
                        let from = match &t.from {
                            Some(d) => format!(" from daemon {d} ({})", t.why),
                            None => " (free)".to_string(),
                        };
                        let reset = if t.reset > 0 {
                            format!("; {} event(s) it left running are ready again", t.reset)
                        } else {
                            String::new()
                        };
                        self.log(&format!(
                            "Take over nas nasid={} nas_ip={} epoch={}{from}{reset}",
                            t.nas_id,
                            self.nas_ip(t.nas_id),
                            t.epoch
                        ));
                        if t.why == "lease expired"
                            && let Some(d) = &t.from
                        {
                            *expired.entry(d.clone()).or_default() += 1;
                        }
                    }
                    if taken.len() < take.len() {
                        // Still held by a daemon that is handing them over: look again
                        // soon rather than a whole heartbeat later.
                        self.retry_take_at = Some(Instant::now() + self.cfg.heartbeat / 5);
                    }
                    if !expired.is_empty() {
                        self.mark_lost(expired).await;
                    }
                }
                Some(Err(e)) => tracing::warn!("cluster: taking nas: {e}"),
                None => {}
            }
        }
        if changed {
            self.publish(false);
        }
        self.release_stopped().await;
    }

    async fn mark_lost(&mut self, taken_from: HashMap<String, usize>) {
        let ids: Vec<String> = taken_from.keys().cloned().collect();
        match self.store.cluster_mark_lost(&ids).await {
            Ok(marked) => {
                for id in marked {
                    let n = taken_from.get(&id).copied().unwrap_or(0);
                    self.warn(&format!(
                        "Daemon {id} lost: its lease ran out; its NAS are being taken over \
                         ({n} by this daemon)"
                    ));
                    self.daemon_alert(AlertKind::DaemonLost, &id, vec![("taken", n.into())]);
                }
            }
            Err(e) => tracing::warn!("cluster: marking lost daemons: {e}"),
        }
    }

    async fn on_report(&mut self, report: Report) {
        match report {
            Report::Stopped { nas_id, epoch } => {
                if self.held.get(&nas_id) == Some(&epoch) {
                    self.stopped.insert((nas_id, epoch));
                    self.release_stopped().await;
                }
            }
            Report::AllStopped => {}
        }
    }

    /// Releases the NAS being handed over whose owners have stopped.
    async fn release_stopped(&mut self) {
        let ready: Vec<i64> = self
            .handing
            .iter()
            .filter(|(id, (epoch, _))| self.stopped.contains(&(**id, *epoch)))
            .map(|(id, _)| *id)
            .collect();
        if ready.is_empty() {
            return;
        }
        match self
            .bounded(
                self.store
                    .cluster_release(&self.me.id, self.session, &ready),
            )
            .await
        {
            Some(Ok(_)) => {
                for id in ready {
                    if let Some((epoch, _)) = self.handing.remove(&id) {
                        self.stopped.remove(&(id, epoch));
                    }
                    self.held.remove(&id);
                    self.log(&format!(
                        "Released nas nasid={id} nas_ip={}",
                        self.nas_ip(id)
                    ));
                }
            }
            Some(Err(e)) => tracing::warn!("cluster: releasing nas: {e}; retried"),
            None => {}
        }
    }

    /// The lease is lost: stop every owner at once and wait until they have stopped.
    async fn lose(&mut self, why: &str) {
        self.fence.revoke();
        self.warn(&format!(
            "Lease lost: daemon {} {why}; stopping its {} NAS at once (in-flight commands \
             abandoned), then rejoining",
            self.me.id,
            self.held.len()
        ));
        self.close_devices().await;
        self.held.clear();
        self.handing.clear();
        self.stopped.clear();
        // Reports of earlier stops say nothing about the stop asked for now.
        while self.reports.try_recv().is_ok() {}
        self.publish(true);
        // Until the supervisor has stopped everything, nothing is taken again.
        while let Some(report) = self.reports.recv().await {
            if report == Report::AllStopped {
                break;
            }
        }
    }

    /// Closes every device session of this daemon now (a polite goodbye where it is
    /// quick; after a second the sessions are simply dropped, which closes them).
    async fn close_devices(&self) {
        let devices: Vec<crate::transport::device::Device> = self
            .devices
            .lock()
            .map(|d| d.values().cloned().collect())
            .unwrap_or_default();
        let mut closing = tokio::task::JoinSet::new();
        for device in devices {
            closing.spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(1), device.close()).await;
            });
        }
        while closing.join_next().await.is_some() {}
    }

    /// Joins again under a new session, after `lose`.
    async fn rejoin(&mut self, shutdown: &CancellationToken) {
        let previous = self.session;
        loop {
            if shutdown.is_cancelled() {
                return;
            }
            let session = new_session();
            let started = Instant::now();
            match self
                .store
                .cluster_join(
                    &self.me.id,
                    session,
                    Some(previous),
                    &self.me.host,
                    self.me.pid,
                    self.me.api.as_deref(),
                    self.cfg.lease,
                )
                .await
            {
                Ok(Joined::Joined { previous }) => {
                    self.session = session;
                    self.fence
                        .set(Some(started + self.cfg.lease - self.cfg.safety_margin()));
                    self.log(&format!(
                        "Rejoined the cluster as daemon {} (new session)",
                        self.me.id
                    ));
                    if previous.as_deref() == Some("lost") {
                        self.back();
                    }
                    self.publish(false);
                    return;
                }
                Ok(Joined::InUse { host, pid, .. }) => self.warn(&format!(
                    "cluster: cannot rejoin: the id {} is used by a live daemon (host {host}, \
                     pid {pid}); retrying",
                    self.me.id
                )),
                Err(e) => tracing::warn!("cluster: rejoining: {e}; retrying"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// Shutdown: marks this daemon draining (the others stop counting it), releases
    /// each NAS as soon as its owner has stopped, then leaves.
    async fn leave(&mut self) {
        // A database that is away must not hold the stop up: the lease then simply
        // runs out and the others take over.
        let draining = self
            .store
            .cluster_set_state(&self.me.id, self.session, "draining");
        match tokio::time::timeout(LEAVE_CALL, draining).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("cluster: marking this daemon draining: {e}"),
            Err(_) => tracing::warn!("cluster: marking this daemon draining: no answer"),
        }
        // Owners that stopped before the shutdown was seen: their reports count, an
        // earlier "all stopped" does not.
        while let Ok(report) = self.reports.try_recv() {
            if report != Report::AllStopped {
                self.on_report(report).await;
            }
        }
        for (id, epoch) in self.held.clone() {
            self.handing.entry(id).or_insert((epoch, None));
        }
        if !self.held.is_empty() {
            self.log(&format!(
                "Stopping: handing over {} NAS as their in-flight commands finish",
                self.held.len()
            ));
        }
        self.publish(false);
        // The lease is still renewed while the owners finish what is in flight (that
        // may take up to `shutdown_grace`, longer than a lease): the NAS are ours until
        // released.
        let mut next_beat = Instant::now() + self.cfg.heartbeat;
        loop {
            let deadline = self.fence.deadline();
            tokio::select! {
                // The lease ran out during the stop (the database is away): what is
                // still being sent is abandoned, as after any loss of the lease.
                _ = sleep_until_opt(deadline) => {
                    self.warn("Lease lost while stopping: sends still in progress are abandoned");
                    self.fence.revoke();
                    self.close_devices().await;
                }
                report = self.reports.recv() => match report {
                    None | Some(Report::AllStopped) => break,
                    Some(other) => self.on_report(other).await,
                },
                _ = tokio::time::sleep_until(next_beat) => {
                    next_beat = Instant::now() + self.cfg.heartbeat;
                    let started = Instant::now();
                    if let Some(Ok(beat)) = self
                        .bounded(self.store.cluster_heartbeat(&self.me.id, self.session, self.cfg.lease))
                        .await
                        && beat.renewed
                        && self.fence.deadline().is_some()
                    {
                        self.fence
                            .set(Some(started + self.cfg.lease - self.cfg.safety_margin()));
                    }
                }
            }
        }
        let _ = tokio::time::timeout(LEAVE_CALL, self.release_stopped()).await;
        let left = self
            .store
            .cluster_set_state(&self.me.id, self.session, "left");
        match tokio::time::timeout(LEAVE_CALL, left).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("cluster: marking this daemon left: {e}"),
            Err(_) => tracing::warn!("cluster: marking this daemon left: no answer"),
        }
        self.fence.set(None);
        self.log(&format!("Left the cluster: daemon {}", self.me.id));
    }
}

/// The longest each database call of a stop may take.
const LEAVE_CALL: Duration = Duration::from_secs(5);

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
