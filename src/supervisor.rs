//! The supervisor: every `resync_interval` it rereads the `nas` table and the schemes,
//! and starts, updates or stops one owner per enabled NAS.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

use crate::cluster::{Assignment, Devices, Link, Report};
use crate::dispatch::{NasRuntime, OwnerHandle, OwnerWake, Shared, spawn_owner};
use crate::scheme::SchemeSet;
use crate::store::Nas;
use crate::transport::device::{Device, DeviceKey, device_key};
use crate::transport::send::Tenure;

/// What one resync must do to make the running owners match the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Start(i64),
    /// Settings changed; the text says which, for the daemon log.
    Update(i64, String),
    Stop(i64),
}

/// Desired (the table) against running (the settings each owner has now). Disabled and
/// paused NAS are not desired. Pure, so it is table-tested.
pub fn plan(desired: &[Nas], running: &HashMap<i64, Nas>) -> Vec<Action> {
    let mut actions = Vec::new();
    for nas in desired.iter().filter(|n| n.enabled && !n.paused) {
        match running.get(&nas.id) {
            None => actions.push(Action::Start(nas.id)),
            Some(old) if old != nas => {
                actions.push(Action::Update(nas.id, describe_change(old, nas)))
            }
            Some(_) => {}
        }
    }
    let mut stopped: Vec<i64> = running
        .keys()
        .filter(|id| {
            !desired
                .iter()
                .any(|n| n.id == **id && n.enabled && !n.paused)
        })
        .copied()
        .collect();
    stopped.sort_unstable();
    actions.extend(stopped.into_iter().map(Action::Stop));
    actions
}

fn describe_change(old: &Nas, new: &Nas) -> String {
    let mut parts = Vec::new();
    let mut diff = |name: &str, a: String, b: String| {
        if a != b {
            parts.push(format!("{name} {a} -> {b}"));
        }
    };
    let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "<null>".into());
    diff("name", old.name.clone(), new.name.clone());
    diff("ip", old.ip.clone(), new.ip.clone());
    diff("scheme", opt(&old.scheme), opt(&new.scheme));
    diff("script_name", opt(&old.script_name), opt(&new.script_name));
    diff(
        "workers",
        old.n_workers.to_string(),
        new.n_workers.to_string(),
    );
    diff("protocol", opt(&old.protocol), opt(&new.protocol));
    diff("port", format!("{:?}", old.port), format!("{:?}", new.port));
    diff("login", opt(&old.login), opt(&new.login));
    diff(
        "max_sessions",
        old.max_sessions.to_string(),
        new.max_sessions.to_string(),
    );
    if old.password != new.password {
        parts.push("password changed".into());
    }
    if old.secret != new.secret {
        parts.push("secret changed".into());
    }
    parts.join(", ")
}

/// The `[daemon] schemes_dir` directories that do not exist (or are not directories),
/// as a message naming each: `/etc/nasd/schemes does not exist`. None when all are.
pub fn missing_schemes_dirs(dirs: &[std::path::PathBuf]) -> Option<String> {
    let missing: Vec<String> = dirs
        .iter()
        .filter(|d| !d.is_dir())
        .map(|d| {
            if d.exists() {
                format!("{} is not a directory", d.display())
            } else {
                format!("{} does not exist", d.display())
            }
        })
        .collect();
    (!missing.is_empty()).then(|| missing.join(", "))
}

/// Why the daemon must not start: a `schemes_dir` directory is missing and an enabled
/// NAS needs a scheme found in none of them (`set`, loaded from the directories that
/// are there), so its events would only wait. A NAS with its own script needs no
/// scheme, so a daemon of scripts alone starts without the directory.
pub fn schemes_dirs_problem(
    dirs: &[std::path::PathBuf],
    set: &SchemeSet,
    nas: &[Nas],
) -> Option<String> {
    let missing = missing_schemes_dirs(dirs)?;
    let needing: Vec<String> = nas
        .iter()
        .filter(|n| n.enabled && n.script_name.is_none())
        .filter_map(|n| {
            let scheme = n.scheme.as_deref().unwrap_or_default();
            set.get(scheme)
                .is_none()
                .then(|| format!("nas {} ({}, {}): {scheme}", n.id, n.name, n.ip))
        })
        .collect();
    if needing.is_empty() {
        return None;
    }
    Some(format!(
        "config key daemon.schemes_dir: {missing}; no schemes directory has the scheme of {} \
         (its events would only wait)",
        needing.join(", ")
    ))
}

/// The owners' wake-up handles, shared with the expander.
pub type Wakers = Arc<Mutex<HashMap<i64, Arc<OwnerWake>>>>;

/// A running owner: the settings it has, its handle, and the ownership epoch it
/// serves under (0 for one daemon).
struct Running {
    nas: Nas,
    handle: OwnerHandle,
    epoch: i64,
}

pub struct Supervisor {
    shared: Arc<Shared>,
    owners: HashMap<i64, Running>,
    /// The cluster's side: which NAS to serve under which epoch, and where to report
    /// owners that stopped.
    link: Link,
    /// The daemon's id, for the `daemon` variable of templates.
    daemon_id: Arc<str>,
    /// The NAS table and schemes as the last resync read them.
    last_nas: Vec<Nas>,
    schemes: SchemeSet,
    wakers: Wakers,
    /// Last "cannot serve" reason per NAS, so it is logged once, not every resync.
    reported: HashMap<i64, String>,
    /// Owners stopped gracefully, still finishing their in-flight commands.
    stopping: Vec<tokio::task::JoinHandle<()>>,
    /// The (NAS, epoch) of those owners: removed by their task before it reports them
    /// stopped.
    stopping_ids: Arc<Mutex<HashSet<(i64, i64)>>>,
    /// Device pools per NAS, kept while their settings do not change.
    devices: HashMap<i64, (DeviceKey, Device)>,
    /// The same devices, shared with the cluster task (which closes them all when the
    /// lease is lost).
    registry: Devices,
}

impl Supervisor {
    pub fn new(
        shared: Arc<Shared>,
        wakers: Wakers,
        link: Link,
        daemon_id: &str,
        registry: Devices,
    ) -> Supervisor {
        Supervisor {
            shared,
            owners: HashMap::new(),
            link,
            daemon_id: Arc::from(daemon_id),
            last_nas: Vec::new(),
            schemes: SchemeSet::default(),
            wakers,
            reported: HashMap::new(),
            stopping: Vec::new(),
            stopping_ids: Arc::default(),
            devices: HashMap::new(),
            registry,
        }
    }

    /// Copies the device map into the registry the cluster task sees.
    fn sync_registry(&self) {
        if let Ok(mut registry) = self.registry.lock() {
            *registry = self
                .devices
                .iter()
                .map(|(id, (_, device))| (*id, device.clone()))
                .collect();
        }
    }

    fn runtime_for(&mut self, nas: &Nas, epoch: i64) -> NasRuntime {
        let schemes = &self.schemes;
        let mut runtime = NasRuntime {
            nas: nas.clone(),
            scheme: None,
            unavailable: None,
            device: None,
            tenure: Tenure {
                daemon: self.daemon_id.clone(),
                epoch,
            },
        };
        if nas.script_name.is_some() {
            return runtime;
        }
        let name = nas.scheme.clone().unwrap_or_default();
        let Some(scheme) = schemes.get(&name) else {
            let missing = missing_schemes_dirs(&self.shared.cfg.schemes_dirs())
                .map(|m| format!(" ({m})"))
                .unwrap_or_default();
            runtime.unavailable = Some(format!(
                "scheme {name} not found (or broken) under {}{missing}",
                self.shared.cfg.schemes_shown()
            ));
            return runtime;
        };
        let key = device_key(nas, &scheme);
        match self.devices.get(&nas.id) {
            Some((k, device)) if *k == key => runtime.device = Some(device.clone()),
            _ => match crate::transport::device::build(nas, &scheme, &self.shared.cfg.transport) {
                Ok(Some(device)) => {
                    if let Some((_, old)) = self.devices.insert(nas.id, (key, device.clone())) {
                        tokio::spawn(async move { old.close().await });
                    }
                    runtime.device = Some(device);
                }
                Ok(None) => {}
                // A mistake in the NAS row or the config (no login, no secret, a bad
                // fingerprint): nothing would reach the device, so nothing is sent and
                // the NAS is not counted as down; its events wait until it is fixed.
                Err(why) => {
                    if let Some((_, old)) = self.devices.remove(&nas.id) {
                        tokio::spawn(async move { old.close().await });
                    }
                    runtime.unavailable = Some(why);
                }
            },
        }
        runtime.scheme = Some(scheme);
        runtime
    }

    /// Open device sessions per NAS, for status pages and tests.
    pub fn open_sessions(&self) -> Vec<(i64, usize)> {
        self.devices
            .iter()
            .map(|(id, (_, d))| (*id, d.open_sessions()))
            .collect()
    }

    fn oss_pathname(&self, nas: &Nas) -> String {
        match &nas.scheme {
            Some(s) => match self.schemes.get(s) {
                Some(scheme) => scheme.dir.display().to_string(),
                None => self.shared.cfg.schemes_dir.join(s).display().to_string(),
            },
            None => "<null>".into(),
        }
    }

    /// One pass: reread NAS and schemes, tell the cluster which NAS are enabled, and
    /// apply the plan. A database error leaves the running owners as they are.
    pub async fn resync(&mut self) {
        let desired = match self.shared.store.nas_list().await {
            Ok(list) => list,
            Err(e) => {
                tracing::warn!("resync: {e}");
                self.shared.journal.daemon(&format!("resync failed: {e}"));
                return;
            }
        };
        let (schemes, errors) = SchemeSet::load_dirs(&self.shared.cfg.schemes_dirs());
        for e in &errors {
            tracing::warn!("{e}");
        }
        self.schemes = schemes;
        let enabled: Vec<(i64, String)> = desired
            .iter()
            .filter(|n| n.enabled)
            .map(|n| (n.id, n.ip.clone()))
            .collect();
        self.last_nas = desired;
        self.link.nas.send_if_modified(|current| {
            if current.as_deref() == Some(&enabled) {
                false
            } else {
                *current = Some(Arc::new(enabled));
                true
            }
        });
        self.apply(false).await;
    }

    /// The epoch this daemon serves a NAS under, if it serves it.
    fn served(assignment: &Assignment, nas_id: i64) -> Option<i64> {
        match &assignment.serve {
            None => Some(0),
            Some(serve) => serve.get(&nas_id).copied(),
        }
    }

    /// Makes the running owners match the last NAS table and the cluster's assignment:
    /// starts, updates and stops owners. `fresh` is true when only the assignment
    /// changed (owners that keep running get no new settings then).
    async fn apply(&mut self, fresh: bool) {
        self.stopping.retain(|join| !join.is_finished());
        let shared = self.shared.clone();
        let journal = &shared.journal;
        let assignment = self.link.assignment.borrow_and_update().clone();
        // An owner serving under another epoch than the one now held (the NAS was lost
        // and taken again) is replaced.
        let mut hard: Vec<i64> = self
            .owners
            .iter()
            .filter(|(id, r)| Self::served(&assignment, **id).is_some_and(|epoch| epoch != r.epoch))
            .map(|(id, _)| *id)
            .collect();
        let desired: Vec<Nas> = self
            .last_nas
            .iter()
            .filter(|n| n.enabled && !n.paused && Self::served(&assignment, n.id).is_some())
            .cloned()
            .collect();
        let running: HashMap<i64, Nas> = self
            .owners
            .iter()
            .filter(|(id, _)| !hard.contains(id))
            .map(|(id, r)| (*id, r.nas.clone()))
            .collect();
        let actions = plan(&desired, &running);
        if assignment.hard_stop {
            hard.extend(actions.iter().filter_map(|a| match a {
                Action::Stop(id) => Some(*id),
                _ => None,
            }));
        }
        hard.sort_unstable();
        hard.dedup();
        // Hard stops first: the lease is lost, nothing of these owners may go on.
        let mut aborted = Vec::new();
        for id in &hard {
            if let Some(r) = self.owners.remove(id) {
                // Everything of the owner ends at once: its sends in progress are
                // dropped (those events are sent again by the NAS's next owner).
                r.handle.join.abort();
                if let Ok(mut w) = self.wakers.lock() {
                    w.remove(id);
                }
                aborted.push((r, self.devices.remove(id)));
                self.reported.remove(id);
            }
        }
        for (r, device) in aborted {
            let _ = r.handle.join.await;
            if let Some((_, device)) = device {
                device.close().await;
            }
            journal.daemon(&format!(
                "Stopped work with nas nasid={} nas_ip={} at once (lease lost; commands in progress abandoned)",
                r.nas.id, r.nas.ip
            ));
            let _ = self.link.reports.send(Report::Stopped {
                nas_id: r.nas.id,
                epoch: r.epoch,
            });
        }
        if assignment.hard_stop {
            let _ = self.link.reports.send(Report::AllStopped);
        }
        for action in actions {
            match action {
                Action::Start(id) => {
                    let Some(nas) = desired.iter().find(|n| n.id == id).cloned() else {
                        continue;
                    };
                    let epoch = Self::served(&assignment, id).unwrap_or(0);
                    journal.daemon(&format!(
                        "Start work with nas nasid={} nas_ip={} oss_pathname={} script_name={}{}",
                        nas.id,
                        nas.ip,
                        self.oss_pathname(&nas),
                        nas.script_name.as_deref().unwrap_or("<null>"),
                        if assignment.serve.is_some() {
                            format!(" epoch={epoch}")
                        } else {
                            String::new()
                        }
                    ));
                    let runtime = self.runtime_for(&nas, epoch);
                    let handle = spawn_owner(self.shared.clone(), runtime);
                    if let Ok(mut w) = self.wakers.lock() {
                        w.insert(id, handle.wake.clone());
                    }
                    self.owners.insert(id, Running { nas, handle, epoch });
                }
                Action::Update(id, change) => {
                    if let Some(r) = self.owners.get(&id) {
                        journal.daemon(&format!(
                            "Update settings of nas nasid={} nas_ip={}: {change}",
                            id, r.nas.ip
                        ));
                    }
                }
                Action::Stop(id) => {
                    let Some(r) = self.owners.remove(&id) else {
                        continue;
                    };
                    let now = self.last_nas.iter().find(|n| n.id == id);
                    let why = match now {
                        Some(n) if n.enabled && n.paused => "paused by an operator",
                        Some(n) if n.enabled => "handed over",
                        _ => "removed or disabled",
                    };
                    journal.daemon(&format!(
                        "Stop work with nas nasid={} nas_ip={} ({why}; in-flight commands finish first)",
                        r.nas.id, r.nas.ip
                    ));
                    if let Ok(mut w) = self.wakers.lock() {
                        w.remove(&id);
                    }
                    r.handle.stop.cancel();
                    let device = self.devices.remove(&id).map(|(_, d)| d);
                    let reports = self.link.reports.clone();
                    let (nas_id, epoch) = (r.nas.id, r.epoch);
                    if let Ok(mut ids) = self.stopping_ids.lock() {
                        ids.insert((nas_id, epoch));
                    }
                    let stopping_ids = self.stopping_ids.clone();
                    // The device closes once the owner has let its in-flight commands
                    // finish, and only then is the NAS reported stopped: the next owner
                    // never finds this daemon's sessions still open.
                    self.stopping.push(tokio::spawn(async move {
                        let _ = r.handle.join.await;
                        if let Some(device) = device {
                            device.close().await;
                        }
                        if let Ok(mut ids) = stopping_ids.lock() {
                            ids.remove(&(nas_id, epoch));
                        }
                        let _ = reports.send(Report::Stopped { nas_id, epoch });
                    }));
                    self.reported.remove(&id);
                }
            }
        }
        self.sync_registry();
        // A NAS handed over that has no owner here (never started, or already stopped
        // and reported) is stopped now: without this report the cluster would hold it
        // forever, serving it nowhere. A second report of one stop is harmless.
        let running: HashMap<i64, i64> = self.owners.iter().map(|(id, r)| (*id, r.epoch)).collect();
        let stopping = self
            .stopping_ids
            .lock()
            .map(|ids| ids.clone())
            .unwrap_or_default();
        for (nas_id, epoch) in ownerless_handovers(&assignment.handing, &running, &stopping) {
            let _ = self.link.reports.send(Report::Stopped { nas_id, epoch });
        }
        if fresh {
            return;
        }
        // Every owner gets the fresh settings and schemes (schemes may have been edited).
        for nas in desired {
            let epoch = Self::served(&assignment, nas.id).unwrap_or(0);
            let runtime = self.runtime_for(&nas, epoch);
            if let Some(why) = &runtime.unavailable {
                if self.reported.get(&nas.id) != Some(why) {
                    // A configuration error, not the NAS being down: nothing is sent,
                    // so the circuit breaker never counts it.
                    journal.daemon(&format!(
                        "nas nasid={} nas_ip={}: configuration error: {why}; its events wait \
                         until this is fixed (the NAS is not counted as down)",
                        nas.id, nas.ip
                    ));
                    self.reported.insert(nas.id, why.clone());
                }
            } else {
                self.reported.remove(&nas.id);
            }
            if let Some(r) = self.owners.get_mut(&nas.id) {
                r.nas = nas.clone();
                // Only a change reaches the owner: a resync of ten thousand unchanged
                // NAS wakes none of them.
                if !same_runtime(&r.handle.config.borrow(), &runtime) {
                    r.handle.config.send_replace(Arc::new(runtime));
                    r.handle.wake.notify();
                }
            }
        }
        self.sync_registry();
    }

    /// Stops every owner and waits for them (each finishes in-flight work within the
    /// shutdown grace, then releases what is left).
    pub async fn shutdown(&mut self) {
        for r in self.owners.values() {
            r.handle.stop.cancel();
        }
        // Each NAS is reported stopped as soon as its own owner has finished (and its
        // sessions are closed), so the cluster hands it over without waiting for the
        // slowest owner.
        let mut finishing = tokio::task::JoinSet::new();
        for (id, r) in self.owners.drain() {
            let device = self.devices.remove(&id).map(|(_, d)| d);
            let reports = self.link.reports.clone();
            finishing.spawn(async move {
                let _ = r.handle.join.await;
                if let Some(device) = device {
                    device.close().await;
                }
                let _ = reports.send(Report::Stopped {
                    nas_id: id,
                    epoch: r.epoch,
                });
            });
        }
        while finishing.join_next().await.is_some() {}
        for join in self.stopping.drain(..) {
            let _ = join.await;
        }
        for (_, (_, device)) in self.devices.drain() {
            device.close().await;
        }
        let _ = self.link.reports.send(Report::AllStopped);
    }

    /// Resyncs every `resync_interval` until `shutdown`. Under systemd it sends
    /// `READY=1` after the first resync (migrations done, pools up) and `WATCHDOG=1`
    /// from this loop, so a stuck supervisor gets the daemon restarted.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let interval = self.shared.cfg.resync_interval;
        let watchdog = crate::systemd::watchdog_interval();
        let mut next_resync = tokio::time::Instant::now();
        let mut ready = false;
        loop {
            let now = tokio::time::Instant::now();
            if now >= next_resync {
                self.resync().await;
                next_resync = tokio::time::Instant::now() + interval;
                if !ready {
                    ready = true;
                    crate::systemd::notify_or_log(&format!(
                        "READY=1\nSTATUS=serving {} NAS",
                        self.owners.len()
                    ));
                }
            }
            let mut wake = next_resync;
            if let Some(every) = watchdog {
                crate::systemd::notify_or_log("WATCHDOG=1");
                wake = wake.min(tokio::time::Instant::now() + every);
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                changed = self.link.assignment.changed() => {
                    if changed.is_ok() {
                        self.apply(true).await;
                    }
                }
                _ = self.shared.resync.notified() => {
                    next_resync = tokio::time::Instant::now();
                }
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
        crate::systemd::notify_or_log("STOPPING=1\nSTATUS=stopping: finishing commands in flight");
        self.shutdown().await;
    }
}

/// The NAS being handed over (`handing`: NAS -> epoch) that no owner of that epoch
/// serves here, running or still finishing: they are stopped already. Sorted.
fn ownerless_handovers(
    handing: &HashMap<i64, i64>,
    running: &HashMap<i64, i64>,
    stopping: &HashSet<(i64, i64)>,
) -> Vec<(i64, i64)> {
    let mut out: Vec<(i64, i64)> = handing
        .iter()
        .filter(|(id, epoch)| {
            running.get(id) != Some(epoch) && !stopping.contains(&(**id, **epoch))
        })
        .map(|(id, epoch)| (*id, *epoch))
        .collect();
    out.sort_unstable();
    out
}

/// Whether an owner running with `old` would behave the same with `new`: the same row,
/// the same scheme text, the same reason to wait (the device is reused exactly when the
/// row and scheme are the same).
fn same_runtime(old: &NasRuntime, new: &NasRuntime) -> bool {
    let same_scheme = match (&old.scheme, &new.scheme) {
        (None, None) => true,
        (Some(a), Some(b)) => a.same_as(b),
        _ => false,
    };
    old.nas == new.nas
        && old.unavailable == new.unavailable
        && same_scheme
        && old.device.is_some() == new.device.is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nas(id: i64, workers: i32, enabled: bool) -> Nas {
        Nas {
            id,
            name: format!("nas{id}"),
            ip: format!("10.0.0.{id}"),
            scheme: Some("demo-exec".into()),
            script_name: None,
            n_workers: workers,
            protocol: None,
            port: None,
            login: None,
            password: None,
            secret: None,
            max_sessions: 4,
            enabled,
            host_key_policy: "strict".into(),
            host_key: None,
            legacy_crypto: false,
            paused: false,
        }
    }

    #[test]
    fn a_missing_schemes_dir_is_named_when_a_nas_needs_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        let here = dir.path().to_path_buf();
        let file = here.join("file");
        std::fs::write(&file, "").expect("file");
        let gone = here.join("no-schemes");
        assert_eq!(missing_schemes_dirs(std::slice::from_ref(&here)), None);
        let dirs = [here.clone(), gone.clone(), file.clone()];
        assert_eq!(
            missing_schemes_dirs(&dirs),
            Some(format!(
                "{} does not exist, {} is not a directory",
                gone.display(),
                file.display()
            ))
        );
        let set = SchemeSet::default();
        let scripted = Nas {
            script_name: Some("/opt/oss/session".into()),
            ..nas(1, 4, true)
        };
        // Only NAS with their own script, or the scheme's NAS disabled: nothing waits.
        assert_eq!(
            schemes_dirs_problem(&dirs, &set, std::slice::from_ref(&scripted)),
            None
        );
        assert_eq!(schemes_dirs_problem(&dirs, &set, &[nas(2, 4, false)]), None);
        assert_eq!(
            schemes_dirs_problem(&dirs, &set, &[scripted, nas(2, 4, true)]),
            Some(format!(
                "config key daemon.schemes_dir: {} does not exist, {} is not a directory; no \
                 schemes directory has the scheme of nas 2 (nas2, 10.0.0.2): demo-exec (its \
                 events would only wait)",
                gone.display(),
                file.display()
            ))
        );
        // Every directory there: the daemon starts (a scheme missing from them is a
        // configuration error of that NAS, see `/status`).
        assert_eq!(
            schemes_dirs_problem(std::slice::from_ref(&here), &set, &[nas(2, 4, true)]),
            None
        );
    }

    #[test]
    fn plan_table() {
        let running: HashMap<i64, Nas> = [
            (1, nas(1, 4, true)),
            (2, nas(2, 4, true)),
            (3, nas(3, 4, true)),
        ]
        .into();
        let desired = vec![
            nas(1, 4, true),
            nas(2, 8, true),
            nas(3, 4, false),
            nas(4, 2, true),
        ];
        assert_eq!(
            plan(&desired, &running),
            vec![
                Action::Update(2, "workers 4 -> 8".into()),
                Action::Start(4),
                Action::Stop(3),
            ]
        );
        assert_eq!(
            plan(&[], &running),
            vec![Action::Stop(1), Action::Stop(2), Action::Stop(3)]
        );
        assert_eq!(plan(&desired[..1], &[(1, nas(1, 4, true))].into()), vec![]);
    }

    #[test]
    fn handovers_without_an_owner_are_stopped_at_once() {
        let handing: HashMap<i64, i64> = [(2, 1), (4, 1), (12, 3), (7, 5)].into();
        // NAS 4 runs under epoch 1 (it finishes first); 12 runs under another epoch (not
        // this handover's owner); 7 is still finishing its in-flight commands; 2 never
        // got an owner here (taken and handed over before the supervisor started it).
        let running: HashMap<i64, i64> = [(4, 1), (12, 2), (1, 1)].into();
        let stopping: HashSet<(i64, i64)> = [(7, 5)].into();
        assert_eq!(
            ownerless_handovers(&handing, &running, &stopping),
            vec![(2, 1), (12, 3)]
        );
        assert!(ownerless_handovers(&HashMap::new(), &running, &stopping).is_empty());
    }

    #[test]
    fn change_description_hides_secrets() {
        let old = nas(1, 4, true);
        let mut new = old.clone();
        new.password = Some(crate::store::Secret::new("hunter2"));
        let text = describe_change(&old, &new);
        assert_eq!(text, "password changed");
    }
}
