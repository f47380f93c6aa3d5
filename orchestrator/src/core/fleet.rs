//! The orchestrator's state machine: what it knows about apps, devices,
//! desired states and operations, and how each device message or operator
//! request changes that. No I/O: every transition returns the store writes
//! and publications it implies, and `service` carries them out.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};

use drover_shared::codec::MAX_PAYLOAD_BYTES;
use drover_shared::model::{AppPhase, AppSpec, DesiredApp, DesiredState, RunState};
use drover_shared::payload::{
    Ack, AckPhase, Action, Command, DeviceEvent, Heartbeat, Hello, HostMetrics, LogBatch, Op,
    StateReport, Status, Telemetry,
};
use drover_shared::{DeviceId, Name};

use crate::contract::{self, Change, OpStatus};
use crate::core::ops::OpBook;
use crate::core::records::{
    AppRecord, AssignmentRecord, DesiredRecord, DeviceRecord, ImagePlatforms, OperationRecord,
    Placement, ReleaseRecord, Write,
};
use crate::core::selector::{effective_labels, Selector};

/// Releases kept per app (besides any a device's desired state holds).
pub const RELEASES_KEPT: usize = 100;
/// Device events kept per device; older events are dropped first.
pub const EVENTS_PER_DEVICE: usize = 200;

/// A decoded message from a device, keyed by the topic it came on.
#[derive(Debug, Clone)]
pub enum DeviceMessage {
    Hello(Hello),
    Status(Status),
    Heartbeat(Heartbeat),
    State(StateReport),
    Telemetry(Telemetry),
    Logs(LogBatch),
    Ack(Ack),
    Event(DeviceEvent),
}

/// What a transition asks the outside world to do.
#[derive(Debug, Default)]
pub struct Effects {
    pub writes: Vec<Write>,
    /// The device is behind: publish its desired state again.
    pub republish: bool,
    /// The device has applied more than its last state report we hold
    /// says (the report was lost, e.g. dropped by a broker's full queue):
    /// ask it to send its state again.
    pub resync: bool,
    /// What the engine tells its subscribers.
    pub changes: Vec<Change>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FleetError {
    #[error("device {0} is not known")]
    UnknownDevice(DeviceId),
    #[error("app {0} does not exist")]
    UnknownApp(Name),
    #[error("app {app} has no release {release} (latest: {latest})")]
    UnknownRelease {
        app: Name,
        release: u64,
        latest: u64,
    },
    #[error("app {0} has no assignment")]
    NotAssigned(Name),
    #[error("app {0} already exists")]
    AppExists(Name),
    #[error("app {app} is not deployed on device {device}")]
    NotDeployed { device: DeviceId, app: Name },
    #[error("app {app} is not paused on device {device}")]
    NotPaused { device: DeviceId, app: Name },
    #[error(
        "app {app} is {run} on device {device}; only a running app is restarted (start it instead)"
    )]
    NotRunning {
        device: DeviceId,
        app: Name,
        run: &'static str,
    },
    #[error("app {app} is still deployed on {devices:?}; remove it there first")]
    AppInUse { app: Name, devices: Vec<DeviceId> },
    #[error("app {app} publishes host port {port}, which app {other} already publishes on device {device}")]
    PortInUse {
        device: DeviceId,
        app: Name,
        port: String,
        other: Name,
    },
    #[error("app {app} limits container {container} to {cpus} CPUs, but device {device} has {available}; Docker refuses a limit above the device's CPU count")]
    CpusExceedDevice {
        device: DeviceId,
        app: Name,
        container: Name,
        cpus: String,
        available: u32,
    },
    #[error("with this change to app {app}, the desired state of device {device} would be {size} bytes encoded, over the limit of {max} bytes for one message (its apps: {apps}); remove an app from the device or make one smaller")]
    DesiredTooLarge {
        device: DeviceId,
        app: Name,
        size: usize,
        max: usize,
        /// Each app with its encoded size, largest first.
        apps: String,
    },
}

/// One device's next desired state, planned by an assignment or a
/// release change.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceUpdate {
    pub device: DeviceId,
    pub desired: DesiredState,
    pub placement: Placement,
}

/// What `app` should be on one device (`want`: at this release, running or
/// stopped; `None`: not there, if an assignment put it there), from its
/// current state; `None` when nothing changes or the device overrides the
/// app's assignment. A device where the app's host ports are taken by
/// another app is left as it is.
fn plan(
    id: &DeviceId,
    app: &Name,
    want: Option<(&ReleaseRecord, RunState)>,
    mut state: DesiredState,
    mut placement: Placement,
) -> Option<DeviceUpdate> {
    if placement.overrides.contains(app) {
        return None;
    }
    let generation = state.generation + 1;
    let pos = state.apps.iter().position(|a| &a.spec.name == app);
    match (want, pos) {
        (Some((rel, run)), _) => {
            let current = pos.map(|i| &state.apps[i]);
            let same = current
                .is_some_and(|c| c.release == rel.number && c.run == run && c.spec == rel.spec);
            if same && placement.assigned.contains(app) {
                return None;
            }
            let started_at = match current {
                Some(c) if same || (run != RunState::Running) => c.started_at,
                _ if run == RunState::Running => generation,
                _ => 0,
            };
            // A release move keeps the restart mark: carried over, it is
            // neither lost nor, being no newer, carried out again.
            let entry = DesiredApp {
                spec: rel.spec.clone(),
                run,
                started_at,
                release: rel.number,
                restarted_at: current.map_or(0, |c| c.restarted_at),
            };
            match pos {
                Some(i) => state.apps[i] = entry,
                None => state.apps.push(entry),
            }
            if check_host_ports(id, &state, app).is_err() {
                return None;
            }
            placement.assigned.insert(app.clone());
        }
        (None, Some(i)) if placement.assigned.contains(app) => {
            state.apps.remove(i);
            placement.assigned.remove(app);
        }
        (None, _) => {
            if !placement.assigned.remove(app) {
                return None;
            }
        }
    }
    state.generation = generation;
    Some(DeviceUpdate {
        device: id.clone(),
        desired: state,
        placement,
    })
}

/// A device counts as offline once nothing live has come from it for this
/// many of its heartbeat intervals.
pub const MISSED_HEARTBEATS: u64 = 3;

#[derive(Debug)]
struct Device {
    record: DeviceRecord,
    /// How long without a live message before it counts as offline, from
    /// the interval its heartbeats announce.
    offline_after_ms: Option<u64>,
    heartbeat: Option<Heartbeat>,
    telemetry: Option<Telemetry>,
    events: VecDeque<DeviceEvent>,
}

/// Which devices a list asks for, and which page of them
/// (`GET /api/v1/devices?selector=&status=&q=&offset=&limit=`). Every
/// filter given must hold.
#[derive(Debug, Clone, Default)]
pub struct DeviceQuery {
    /// Effective labels match this selector.
    pub selector: Option<Selector>,
    /// Online (`true`) or offline (`false`) only.
    pub online: Option<bool>,
    /// The id or the hostname contains this, ignoring case.
    pub text: Option<String>,
    /// Skip this many matching devices.
    pub offset: usize,
    /// At most this many; `None`: all the rest.
    pub limit: Option<usize>,
}

/// One page of devices and how many matched the query in all.
#[derive(Debug, Clone, Default)]
pub struct DevicePage {
    pub total: usize,
    pub devices: Vec<contract::Device>,
}

/// The fleet's gauges at one moment ([`Fleet::gauges`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FleetGauges {
    pub online: usize,
    pub offline: usize,
    /// Every defined app (and any a device still runs), by name.
    pub apps: BTreeMap<String, AppGauge>,
    /// Empty unless asked for.
    pub devices: Vec<DeviceGauge>,
}

/// Devices that should run an app, and devices where it runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AppGauge {
    pub desired: u64,
    pub running: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DeviceGauge {
    pub id: String,
    pub online: bool,
    /// From its latest telemetry; `None` before the first.
    pub host: Option<HostMetrics>,
}

#[derive(Debug, Default)]
pub struct Fleet {
    devices: BTreeMap<DeviceId, Device>,
    apps: BTreeMap<Name, AppRecord>,
    desired: HashMap<DeviceId, DesiredState>,
    placement: HashMap<DeviceId, Placement>,
    operations: OpBook,
    /// What running rollouts hold, per app (not stored: the engine sets
    /// it again from the rollouts it loads).
    holds: HashMap<Name, Hold>,
}

/// A running rollout's hold on its app: the devices the assignment's
/// reconciliation leaves to the rollout, and the releases that must not
/// be dropped (it may set a device back to one).
#[derive(Debug, Default, Clone)]
pub struct Hold {
    pub devices: HashSet<DeviceId>,
    pub releases: BTreeSet<u64>,
}

impl Fleet {
    /// Rebuilds the state from the store. Every device starts offline: the
    /// broker (embedded or not) tells us who is online as they reconnect.
    pub fn load(
        devices: Vec<DeviceRecord>,
        apps: Vec<AppRecord>,
        desired: Vec<DesiredRecord>,
        operations: Vec<OperationRecord>,
    ) -> Fleet {
        Fleet {
            devices: devices
                .into_iter()
                .map(|mut r| {
                    r.online = false;
                    (
                        r.id.clone(),
                        Device {
                            record: r,
                            offline_after_ms: None,
                            heartbeat: None,
                            telemetry: None,
                            events: VecDeque::new(),
                        },
                    )
                })
                .collect(),
            apps: apps
                .into_iter()
                .map(|a| (a.spec.name.clone(), a.with_first_release()))
                .collect(),
            placement: desired
                .iter()
                .filter(|d| !d.placement.is_empty())
                .map(|d| (d.device.clone(), d.placement.clone()))
                .collect(),
            desired: desired.into_iter().map(|d| (d.device, d.state)).collect(),
            operations: OpBook::load(operations),
            holds: HashMap::new(),
        }
    }

    // ----- device messages -------------------------------------------------

    /// A message the device sent just now (a live publish).
    pub fn on_device_message(&mut self, id: &DeviceId, msg: DeviceMessage, now: u64) -> Effects {
        self.on_message(id, msg, now, true)
    }

    /// A retained message the broker handed over on subscribing: what the
    /// device last said, maybe long ago (a heartbeat kept after its Last
    /// Will, by a broker that keeps both). It updates what is known, but is
    /// no proof that the device is there now: it never makes it online.
    pub fn on_retained_message(&mut self, id: &DeviceId, msg: DeviceMessage, now: u64) -> Effects {
        self.on_message(id, msg, now, false)
    }

    /// Devices that have sent nothing live for too long go offline, in
    /// whatever order their status and heartbeats arrived: `default_after`
    /// applies to devices whose heartbeats announce no interval.
    pub fn expire(&mut self, now: u64, default_after_ms: u64) -> Effects {
        let mut fx = Effects::default();
        for (id, dev) in &mut self.devices {
            let after = dev.offline_after_ms.unwrap_or(default_after_ms);
            if dev.record.online && now.saturating_sub(dev.record.last_seen_ms) > after {
                dev.record.online = false;
                fx.changes.push(Change::Device {
                    device: id.clone(),
                    online: false,
                    at_ms: now,
                });
                fx.writes.push(Write::Device(dev.record.clone()));
            }
        }
        fx
    }

    fn on_message(&mut self, id: &DeviceId, msg: DeviceMessage, now: u64, live: bool) -> Effects {
        let mut fx = Effects::default();
        let known = self.devices.contains_key(id);
        // Only a hello (or a status) makes a device known; other messages from
        // a device we have never heard of are dropped until it says hello.
        if !known
            && !matches!(
                msg,
                DeviceMessage::Hello(_) | DeviceMessage::Status(Status { online: true, .. })
            )
        {
            return fx;
        }
        let dev = self.devices.entry(id.clone()).or_insert_with(|| Device {
            record: DeviceRecord {
                id: id.clone(),
                first_seen_ms: now,
                last_seen_ms: now,
                online: live,
                inventory: None,
                observed: None,
                labels: BTreeMap::new(),
            },
            offline_after_ms: None,
            heartbeat: None,
            telemetry: None,
            events: VecDeque::new(),
        });
        let mut persist = !known;
        match msg {
            DeviceMessage::Hello(h) => {
                dev.record.inventory = Some(h);
                if live && (!dev.record.online || !known) {
                    fx.changes.push(Change::Device {
                        device: id.clone(),
                        online: true,
                        at_ms: now,
                    });
                }
                fx.changes.push(Change::Inventory {
                    device: id.clone(),
                    at_ms: now,
                });
                if live {
                    dev.record.online = true;
                    dev.record.last_seen_ms = now;
                }
                persist = true;
                // A device that just connected gets its desired state again:
                // cheap, and it heals a lost retained message.
                fx.republish = self.desired.contains_key(id);
            }
            // A retained "online" says nothing about now; a retained
            // "offline" (a Last Will) does.
            DeviceMessage::Status(s) if s.online && !live => {}
            DeviceMessage::Status(s) => {
                if dev.record.online != s.online || !known {
                    dev.record.online = s.online;
                    persist = true;
                    fx.changes.push(Change::Device {
                        device: id.clone(),
                        online: s.online,
                        at_ms: now,
                    });
                }
                if s.online {
                    dev.record.last_seen_ms = now;
                }
            }
            DeviceMessage::Heartbeat(h) if !live => {
                dev.heartbeat = Some(h);
            }
            DeviceMessage::Heartbeat(h) => {
                dev.record.last_seen_ms = now;
                if h.interval_ms > 0 {
                    dev.offline_after_ms = Some(h.interval_ms.saturating_mul(MISSED_HEARTBEATS));
                }
                if !dev.record.online {
                    dev.record.online = true;
                    persist = true;
                    fx.changes.push(Change::Device {
                        device: id.clone(),
                        online: true,
                        at_ms: now,
                    });
                }
                let behind =
                    h.applied_generation < self.desired.get(id).map_or(0, |d| d.generation);
                let was_behind = dev
                    .heartbeat
                    .as_ref()
                    .is_some_and(|p| p.applied_generation == h.applied_generation);
                let reported = dev
                    .record
                    .observed
                    .as_ref()
                    .map_or(0, |o| o.applied_generation);
                fx.resync = h.applied_generation > reported;
                dev.heartbeat = Some(h);
                // Behind on two heartbeats in a row with no progress: resend.
                fx.republish = behind && was_behind;
            }
            DeviceMessage::Telemetry(t) => {
                if live {
                    dev.record.last_seen_ms = now;
                }
                fx.changes.push(Change::Telemetry {
                    device: id.clone(),
                    telemetry: Box::new(t.clone()),
                });
                dev.telemetry = Some(t);
            }
            DeviceMessage::State(report) => {
                if live {
                    dev.record.last_seen_ms = now;
                }
                let applied = report.observed.applied_generation;
                let received = report.observed.desired_generation;
                let ours = self.desired.get(id).map_or(0, |d| d.generation);
                dev.record.observed = Some(report.observed);
                persist = true;
                fx.changes.push(Change::State {
                    device: id.clone(),
                    desired_generation: ours,
                    applied_generation: applied,
                    at_ms: now,
                });
                fx.republish = received < ours;
                self.settle_operations(id, applied, now, &mut fx);
            }
            // Kept by the history (`crate::history`), which follows the
            // change stream; the fleet holds no log lines.
            DeviceMessage::Logs(batch) => {
                if live {
                    dev.record.last_seen_ms = now;
                }
                fx.changes.push(Change::Logs {
                    device: id.clone(),
                    batch: Box::new(batch),
                });
            }
            DeviceMessage::Event(ev) => {
                if live {
                    dev.record.last_seen_ms = now;
                }
                if dev.events.len() == EVENTS_PER_DEVICE {
                    dev.events.pop_front();
                }
                fx.changes.push(Change::Event {
                    device: id.clone(),
                    event: Box::new(ev.clone()),
                });
                dev.events.push_back(ev);
            }
            DeviceMessage::Ack(ack) => {
                if live {
                    dev.record.last_seen_ms = now;
                }
                let ours = self
                    .operations
                    .get(&ack.command_id)
                    .is_some_and(|o| &o.device == id);
                if ours {
                    if let Some(op) = self
                        .operations
                        .update(&ack.command_id, |op| apply_ack(op, &ack, now))
                    {
                        fx.changes.push(Change::Operation {
                            operation: Box::new((&op).into()),
                        });
                        fx.writes.push(Write::Operation(op));
                    }
                }
            }
        }
        if persist {
            if let Some(dev) = self.devices.get(id) {
                fx.writes.push(Write::Device(dev.record.clone()));
            }
        }
        fx
    }

    /// Level-triggered completion: once a device reports a generation as
    /// applied, every open operation at or below it is final, with the
    /// outcome read from what actually runs, whether or not its ack arrived.
    fn settle_operations(&mut self, id: &DeviceId, applied: u64, now: u64, fx: &mut Effects) {
        let observed = self
            .devices
            .get(id)
            .and_then(|d| d.record.observed.as_ref());
        for op_id in self.operations.open_up_to(id, applied) {
            let Some(op) = self.operations.get(&op_id) else {
                continue;
            };
            let app = observed.and_then(|o| o.apps.iter().find(|a| a.name == op.app));
            // A newer applied operation on the same app overtook this one,
            // whatever runs now.
            let latest = self.operations.latest_generation(id, &op.app);
            let overtaken = latest > op.generation && latest <= applied;
            let (status, detail) = match (op.op, app) {
                _ if overtaken => (
                    OpStatus::Superseded,
                    "a later operation on the same app was applied first".into(),
                ),
                (_, Some(a)) if a.phase == AppPhase::Failed => (
                    OpStatus::Failed,
                    a.error.clone().unwrap_or_else(|| "failed".into()),
                ),
                (Op::Remove, None) => (OpStatus::Succeeded, String::new()),
                (Op::Remove, Some(_)) => (
                    OpStatus::Superseded,
                    "app deployed again by a later operation".into(),
                ),
                (_, None) => (
                    OpStatus::Superseded,
                    "app removed by a later operation".into(),
                ),
                (_, Some(_)) => (OpStatus::Succeeded, String::new()),
            };
            let updated = self.operations.update(&op_id, |op| {
                op.status = status;
                op.detail = detail;
                op.updated_at_ms = now;
                true
            });
            if let Some(op) = updated {
                fx.changes.push(Change::Operation {
                    operation: Box::new((&op).into()),
                });
                fx.writes.push(Write::Operation(op));
            }
        }
    }

    // ----- operator requests -----------------------------------------------

    /// Checks a new app, which starts at release 1; the caller persists
    /// the write, then [`Fleet::put_app`].
    pub fn create_app(
        &self,
        spec: AppSpec,
        author: &str,
        now: u64,
    ) -> Result<(AppRecord, Vec<Write>), FleetError> {
        if self.apps.contains_key(&spec.name) {
            return Err(FleetError::AppExists(spec.name));
        }
        let rec = AppRecord {
            releases: vec![ReleaseRecord {
                number: 1,
                created_at_ms: now,
                author: author.to_string(),
                spec: spec.clone(),
            }],
            spec,
            created_at_ms: now,
            updated_at_ms: now,
            assignment: None,
        };
        Ok((rec.clone(), vec![Write::App(rec)]))
    }

    /// Checks a replacement spec for an existing app: a spec that differs
    /// makes the next release; the same spec again changes nothing. Devices
    /// keep running the release they have until it is deployed to them
    /// again. The oldest releases beyond [`RELEASES_KEPT`] are dropped,
    /// never one a device's desired state holds.
    pub fn update_app(
        &self,
        spec: AppSpec,
        author: &str,
        now: u64,
    ) -> Result<(AppRecord, Vec<Write>), FleetError> {
        let old = self
            .apps
            .get(&spec.name)
            .ok_or_else(|| FleetError::UnknownApp(spec.name.clone()))?;
        if old.spec == spec {
            return Ok((old.clone(), Vec::new()));
        }
        let mut releases = old.releases.clone();
        releases.push(ReleaseRecord {
            number: old.latest_release() + 1,
            created_at_ms: now,
            author: author.to_string(),
            spec: spec.clone(),
        });
        let in_use = self.releases_in_use(&spec.name);
        let mut excess = releases.len().saturating_sub(RELEASES_KEPT);
        // Oldest first; the newest is never dropped.
        let last = releases.len() - 1;
        let mut i = 0;
        releases.retain(|r| {
            let drop = excess > 0 && i != last && !in_use.contains(&r.number);
            i += 1;
            if drop {
                excess -= 1;
            }
            !drop
        });
        let rec = AppRecord {
            spec,
            created_at_ms: old.created_at_ms,
            updated_at_ms: now,
            releases,
            assignment: old.assignment.clone(),
        };
        Ok((rec.clone(), vec![Write::App(rec)]))
    }

    /// Checks an imported app: new, or with `replace` a replacement for an
    /// existing one (which otherwise is [`FleetError::AppExists`]).
    pub fn import_app(
        &self,
        spec: AppSpec,
        replace: bool,
        author: &str,
        now: u64,
    ) -> Result<(AppRecord, Vec<Write>), FleetError> {
        if replace && self.apps.contains_key(&spec.name) {
            self.update_app(spec, author, now)
        } else {
            self.create_app(spec, author, now)
        }
    }

    /// The releases of `app` that some device's desired state holds, its
    /// assignment names, or a running rollout may set a device back to.
    pub fn releases_in_use(&self, app: &Name) -> std::collections::BTreeSet<u64> {
        let mut used: BTreeSet<u64> = self
            .desired
            .values()
            .filter_map(|d| d.app(app))
            .map(|a| a.release)
            .collect();
        if let Some(a) = self.apps.get(app).and_then(|r| r.assignment.as_ref()) {
            used.insert(a.release);
        }
        if let Some(h) = self.holds.get(app) {
            used.extend(h.releases.iter().copied());
        }
        used
    }

    pub fn put_app(&mut self, rec: AppRecord) {
        self.apps.insert(rec.spec.name.clone(), rec);
    }

    /// Checks a deletion; the caller persists it, then [`Fleet::remove_app`].
    pub fn delete_app(&self, name: &Name) -> Result<Vec<Write>, FleetError> {
        if !self.apps.contains_key(name) {
            return Err(FleetError::UnknownApp(name.clone()));
        }
        let devices: Vec<DeviceId> = self
            .desired
            .iter()
            .filter(|(_, d)| d.app(name).is_some())
            .map(|(id, _)| id.clone())
            .collect();
        if !devices.is_empty() {
            return Err(FleetError::AppInUse {
                app: name.clone(),
                devices,
            });
        }
        Ok(vec![Write::DeleteApp(name.to_string())])
    }

    pub fn remove_app(&mut self, name: &Name) {
        self.apps.remove(name);
    }

    /// Turns an operator request into the device's next desired state and an
    /// operation to follow it. The generation grows by one on every change.
    /// Nothing changes here: the caller persists the writes first, then
    /// calls [`Fleet::commit_request`], so a failed write leaves no trace.
    pub fn request(
        &self,
        device: &DeviceId,
        op: Op,
        app: &Name,
        op_id: String,
        now: u64,
    ) -> Result<(DesiredState, Placement, OperationRecord, Vec<Write>), FleetError> {
        if !self.devices.contains_key(device) {
            return Err(FleetError::UnknownDevice(device.clone()));
        }
        let mut next = self.desired.get(device).cloned().unwrap_or_default();
        next.generation += 1;
        let generation = next.generation;
        let pos = next.apps.iter().position(|a| &a.spec.name == app);
        match (op, pos) {
            (Op::Deploy, _) => {
                let rec = self
                    .apps
                    .get(app)
                    .ok_or_else(|| FleetError::UnknownApp(app.clone()))?;
                let entry = DesiredApp {
                    spec: rec.spec.clone(),
                    run: RunState::Running,
                    started_at: generation,
                    release: rec.latest_release(),
                    restarted_at: pos.map_or(0, |i| next.apps[i].restarted_at),
                };
                match pos {
                    Some(i) => next.apps[i] = entry,
                    None => next.apps.push(entry),
                }
            }
            (_, None) => {
                return Err(FleetError::NotDeployed {
                    device: device.clone(),
                    app: app.clone(),
                })
            }
            (Op::Start, Some(i)) => {
                next.apps[i].run = RunState::Running;
                next.apps[i].started_at = generation;
            }
            (Op::Stop, Some(i)) => next.apps[i].run = RunState::Stopped,
            (Op::Pause, Some(i)) => next.apps[i].run = RunState::Paused,
            // Only a paused app is thawed: unpausing a stopped app must
            // not start it behind the operator's back.
            (Op::Unpause, Some(i)) => {
                if next.apps[i].run != RunState::Paused {
                    return Err(FleetError::NotPaused {
                        device: device.clone(),
                        app: app.clone(),
                    });
                }
                next.apps[i].run = RunState::Running;
            }
            // As `docker restart`, but a stopped or paused app is so by
            // the operator's wish: a restart does not change that.
            (Op::Restart, Some(i)) => {
                let run = match next.apps[i].run {
                    RunState::Running => None,
                    RunState::Stopped => Some("stopped"),
                    RunState::Paused => Some("paused"),
                };
                if let Some(run) = run {
                    return Err(FleetError::NotRunning {
                        device: device.clone(),
                        app: app.clone(),
                        run,
                    });
                }
                next.apps[i].restarted_at = generation;
            }
            (Op::Remove, Some(i)) => {
                next.apps.remove(i);
            }
        }
        if op == Op::Deploy {
            check_host_ports(device, &next, app)?;
            let cpus = self
                .devices
                .get(device)
                .and_then(|d| d.record.inventory.as_ref())
                .map_or(0, |h| h.cpus);
            check_cpus(device, &next, app, cpus)?;
        }
        // The whole desired state travels in one `cmd` (and one `desired`,
        // a little smaller): one that no device and no broker would take
        // must never be stored. A removal is always let through, so a
        // state stored too large before this check can be shrunk.
        let cmd = Command {
            id: op_id.clone(),
            issued_at_ms: now,
            action: Action::Apply {
                op,
                app: app.clone(),
                desired: next,
            },
        };
        let size = drover_shared::encode(&cmd).len();
        let Action::Apply { desired: next, .. } = cmd.action else {
            unreachable!("built as Apply above")
        };
        if size > MAX_PAYLOAD_BYTES && op != Op::Remove {
            let mut apps: Vec<(usize, &Name)> = next
                .apps
                .iter()
                .map(|a| (a.spec.encoded_len(), &a.spec.name))
                .collect();
            apps.sort_by(|a, b| b.cmp(a));
            return Err(FleetError::DesiredTooLarge {
                device: device.clone(),
                app: app.clone(),
                size,
                max: MAX_PAYLOAD_BYTES,
                apps: apps
                    .iter()
                    .map(|(n, name)| format!("{name} {n} bytes"))
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        let operation = OperationRecord {
            id: op_id,
            device: device.clone(),
            app: app.clone(),
            op,
            generation: next.generation,
            status: OpStatus::Pending,
            detail: String::new(),
            progress: None,
            created_at_ms: now,
            updated_at_ms: now,
        };
        // A deploy or removal by hand of an app that has an assignment
        // overrides it on this device until the override is cleared.
        let mut placement = self.placement.get(device).cloned().unwrap_or_default();
        let assigned = self.apps.get(app).is_some_and(|a| a.assignment.is_some());
        if assigned && matches!(op, Op::Deploy | Op::Remove) {
            placement.overrides.insert(app.clone());
            placement.assigned.remove(app);
        }
        if op == Op::Remove {
            placement.assigned.remove(app);
        }
        let writes = vec![
            Write::Desired(DesiredRecord {
                device: device.clone(),
                state: next.clone(),
                placement: placement.clone(),
            }),
            Write::Operation(operation.clone()),
        ];
        Ok((next, placement, operation, writes))
    }

    /// Checks a change of a device's operator-set labels and returns the
    /// record it makes; the caller persists it, then
    /// [`Fleet::put_device_labels`]. `replace`: `set` is the whole new set.
    pub fn set_labels(
        &self,
        device: &DeviceId,
        set: &BTreeMap<String, String>,
        remove: &[String],
        replace: bool,
    ) -> Result<(DeviceRecord, Vec<Write>), FleetError> {
        let dev = self
            .devices
            .get(device)
            .ok_or_else(|| FleetError::UnknownDevice(device.clone()))?;
        let mut rec = dev.record.clone();
        if replace {
            rec.labels.clear();
        }
        for k in remove {
            rec.labels.remove(k);
        }
        rec.labels
            .extend(set.iter().map(|(k, v)| (k.clone(), v.clone())));
        Ok((rec.clone(), vec![Write::Device(rec)]))
    }

    /// Puts a device's operator-set labels as given (a checked change, or
    /// the undo of one).
    pub fn put_device_labels(&mut self, device: &DeviceId, labels: BTreeMap<String, String>) {
        if let Some(d) = self.devices.get_mut(device) {
            d.record.labels = labels;
        }
    }

    /// A device's operator-set labels.
    pub fn operator_labels(&self, device: &DeviceId) -> Option<BTreeMap<String, String>> {
        self.devices.get(device).map(|d| d.record.labels.clone())
    }

    /// Undoes a request whose writes failed: the device's desired state is
    /// what it was, and the operation never existed.
    pub fn undo_request(
        &mut self,
        device: &DeviceId,
        previous: Option<DesiredState>,
        placement: Option<Placement>,
        op_id: &str,
    ) {
        self.restore_device(device, previous, placement);
        self.operations.forget(op_id);
    }

    /// Puts a device's desired state and placement back as they were.
    pub fn restore_device(
        &mut self,
        device: &DeviceId,
        previous: Option<DesiredState>,
        placement: Option<Placement>,
    ) {
        match previous {
            Some(d) => self.desired.insert(device.clone(), d),
            None => self.desired.remove(device),
        };
        match placement {
            Some(p) => self.placement.insert(device.clone(), p),
            None => self.placement.remove(device),
        };
    }

    /// Puts an app back as it was (`None`: it did not exist).
    pub fn restore_app(&mut self, name: &Name, previous: Option<AppRecord>) {
        match previous {
            Some(rec) => self.apps.insert(name.clone(), rec),
            None => self.apps.remove(name),
        };
    }

    pub fn commit_request(
        &mut self,
        desired: DesiredState,
        placement: Placement,
        op: OperationRecord,
    ) {
        self.desired.insert(op.device.clone(), desired);
        self.placement.insert(op.device.clone(), placement);
        self.operations.insert(op);
    }

    pub fn placement(&self, device: &DeviceId) -> Option<&Placement> {
        self.placement.get(device)
    }

    // ----- fleet assignment --------------------------------------------------

    /// Checks an assignment of `app` (its selector already valid, in
    /// canonical form) and returns the app record it makes; the caller
    /// applies it with [`Fleet::put_app`] and then [`Fleet::reconcile_app`].
    /// `release` 0 means the latest.
    #[allow(clippy::too_many_arguments)] // the assignment's fields
    pub fn assign(
        &self,
        app: &Name,
        selector: String,
        release: u64,
        run: RunState,
        author: &str,
        platforms: Vec<ImagePlatforms>,
        now: u64,
    ) -> Result<AppRecord, FleetError> {
        let mut rec = self
            .apps
            .get(app)
            .cloned()
            .ok_or_else(|| FleetError::UnknownApp(app.clone()))?;
        let release = if release == 0 {
            rec.latest_release()
        } else {
            release
        };
        if rec.release(release).is_none() {
            return Err(FleetError::UnknownRelease {
                app: app.clone(),
                release,
                latest: rec.latest_release(),
            });
        }
        rec.assignment = Some(AssignmentRecord {
            selector,
            release,
            run,
            updated_at_ms: now,
            author: author.to_string(),
            platforms,
        });
        Ok(rec)
    }

    /// Makes every device agree with `app`'s assignment (or, with none,
    /// takes the app from the devices an assignment put it on): the
    /// devices to change, each with its next desired state. Nothing
    /// changes here; apply them with [`Fleet::apply_updates`].
    pub fn reconcile_app(&self, app: &Name) -> Vec<DeviceUpdate> {
        let rec = self.apps.get(app);
        let target = rec.and_then(|r| {
            let a = r.assignment.as_ref()?;
            let sel = Selector::parse(&a.selector).ok()?;
            Some((sel, a.release, a.run, &a.platforms))
        });
        let held = self.holds.get(app);
        let mut out = Vec::new();
        for id in self.devices.keys() {
            if held.is_some_and(|h| h.devices.contains(id)) {
                continue;
            }
            let want = match (&target, rec) {
                (Some((sel, release, run, known)), Some(r)) => self
                    .labels_of(id)
                    .filter(|l| sel.matches(l) && self.runs_all(id, known))
                    .and_then(|_| r.release(*release))
                    .map(|rel| (rel, *run)),
                _ => None,
            };
            let (state, placement) = self.current(id);
            if let Some(u) = plan(id, app, want, state, placement) {
                out.push(u);
            }
        }
        out
    }

    /// Makes one device agree with every assignment: after it says hello
    /// (maybe with new labels of its own), or is relabelled.
    pub fn reconcile_device(&self, id: &DeviceId) -> Option<DeviceUpdate> {
        let labels = self.labels_of(id)?;
        let (mut state, mut placement) = self.current(id);
        let mut changed: Option<DeviceUpdate> = None;
        for (name, rec) in &self.apps {
            if self.holds.get(name).is_some_and(|h| h.devices.contains(id)) {
                continue;
            }
            let want = rec.assignment.as_ref().and_then(|a| {
                let sel = Selector::parse(&a.selector).ok()?;
                (sel.matches(&labels) && self.runs_all(id, &a.platforms))
                    .then(|| rec.release(a.release).map(|r| (r, a.run)))
                    .flatten()
            });
            if want.is_none() && !placement.assigned.contains(name) {
                continue;
            }
            if let Some(u) = plan(id, name, want, state.clone(), placement.clone()) {
                state = u.desired.clone();
                placement = u.placement.clone();
                changed = Some(u);
            }
        }
        // One generation step for all of the device's changes.
        changed.map(|mut u| {
            u.desired.generation = self.desired.get(id).map_or(0, |d| d.generation) + 1;
            u
        })
    }

    /// Moves one app on one device to `release` (running or stopped as
    /// `run`; 0: the app goes, if an assignment put it there), as an
    /// assignment does; a rollout drives devices one batch at a time
    /// through this. `None` when it is already so, or the device overrides
    /// the app's assignment. Refused, as a deploy would be, when the release
    /// takes a host port another app on the device publishes or more CPUs
    /// than the device has (an assignment skips such a device silently; a
    /// rollout fails it, saying why).
    pub fn set_device_release(
        &self,
        id: &DeviceId,
        app: &Name,
        release: u64,
        run: RunState,
    ) -> Result<Option<DeviceUpdate>, FleetError> {
        if !self.devices.contains_key(id) {
            return Err(FleetError::UnknownDevice(id.clone()));
        }
        let rec = self
            .apps
            .get(app)
            .ok_or_else(|| FleetError::UnknownApp(app.clone()))?;
        let (state, placement) = self.current(id);
        if release == 0 {
            return Ok(plan(id, app, None, state, placement));
        }
        let rel = rec
            .release(release)
            .ok_or_else(|| FleetError::UnknownRelease {
                app: app.clone(),
                release,
                latest: rec.latest_release(),
            })?;
        if !placement.overrides.contains(app) {
            let mut next = state.clone();
            let entry = DesiredApp {
                spec: rel.spec.clone(),
                run,
                started_at: 0,
                release,
                restarted_at: 0,
            };
            match next.apps.iter().position(|a| &a.spec.name == app) {
                Some(i) => next.apps[i] = entry,
                None => next.apps.push(entry),
            }
            check_host_ports(id, &next, app)?;
            let cpus = self
                .devices
                .get(id)
                .and_then(|d| d.record.inventory.as_ref())
                .map_or(0, |h| h.cpus);
            check_cpus(id, &next, app, cpus)?;
        }
        Ok(plan(id, app, Some((rel, run)), state, placement))
    }

    // ----- rollouts -------------------------------------------------------

    /// The devices a rollout of `app` over `selector` moves, each with the
    /// release of the app it has now (0: none): every device the selector
    /// matches, except those that override the app's assignment (an
    /// operator manages the app there by hand).
    pub fn rollout_targets(&self, app: &Name, selector: &Selector) -> BTreeMap<DeviceId, u64> {
        self.matching(selector)
            .into_iter()
            .filter(|id| {
                !self
                    .placement
                    .get(id)
                    .is_some_and(|p| p.overrides.contains(app))
            })
            .map(|id| {
                let r = self
                    .desired
                    .get(&id)
                    .and_then(|d| d.app(app))
                    .map_or(0, |a| a.release);
                (id, r)
            })
            .collect()
    }

    /// The devices an assignment put `app` on.
    pub fn assigned_devices(&self, app: &Name) -> Vec<DeviceId> {
        self.placement
            .iter()
            .filter(|(_, p)| p.assigned.contains(app))
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Sets (replaces) what a running rollout of `app` holds.
    pub fn hold(&mut self, app: &Name, hold: Hold) {
        self.holds.insert(app.clone(), hold);
    }

    /// A rollout of `app` ended: the assignment reconciles its devices again.
    pub fn release_hold(&mut self, app: &Name) {
        self.holds.remove(app);
    }

    /// One device is no longer the rollout's (it left the selector, or an
    /// operator took the app over by hand).
    pub fn release_held_device(&mut self, app: &Name, id: &DeviceId) {
        if let Some(h) = self.holds.get_mut(app) {
            h.devices.remove(id);
        }
    }

    /// Marks `app` on `devices` as placed by hand, not by the assignment:
    /// `overridden` (an aborted rollout's devices keep the release they
    /// run) or plain (a rollback to no assignment at all). Returns the
    /// writes of the placements that changed.
    pub fn unassign(&mut self, app: &Name, devices: &[DeviceId], overridden: bool) -> Vec<Write> {
        let mut writes = Vec::new();
        for id in devices {
            let Some(state) = self.desired.get(id) else {
                continue;
            };
            let p = self.placement.entry(id.clone()).or_default();
            let before = p.clone();
            p.assigned.remove(app);
            if overridden && state.app(app).is_some() {
                p.overrides.insert(app.clone());
            }
            if *p != before {
                writes.push(Write::Desired(DesiredRecord {
                    device: id.clone(),
                    state: state.clone(),
                    placement: p.clone(),
                }));
            }
        }
        writes
    }

    /// What a device's last state report says of `app`, for a rollout:
    /// the release it runs (0: absent), whether it is ready (the app
    /// running, every container running and healthy where it has a health
    /// check) and why it failed (its phase, or an unhealthy container). A
    /// failure with no release yet (nothing made from the new spec) counts
    /// for the release the device was told, once the report answers the
    /// desired state that told it. `None` before any report.
    pub fn rollout_observation(
        &self,
        id: &DeviceId,
        app: &Name,
    ) -> Option<crate::core::rollout::Observation> {
        let observed = self.devices.get(id)?.record.observed.as_ref()?;
        let desired = self.desired.get(id);
        let ours = desired.map_or(0, |d| d.generation);
        let told = desired.and_then(|d| d.app(app)).map_or(0, |a| a.release);
        Some(crate::core::rollout::observe_app(
            observed.apps.iter().find(|a| &a.name == app),
            observed.desired_generation >= ours,
            told,
        ))
    }

    /// Plans one device's move to another agent binary (`None`: the
    /// packaged one); `None` when it is there already.
    pub fn set_device_agent(
        &self,
        id: &DeviceId,
        target: Option<drover_shared::update::AgentTarget>,
    ) -> Result<Option<DeviceUpdate>, FleetError> {
        if !self.devices.contains_key(id) {
            return Err(FleetError::UnknownDevice(id.clone()));
        }
        let (state, placement) = self.current(id);
        if state.agent == target {
            return Ok(None);
        }
        let mut desired = state;
        desired.generation += 1;
        desired.agent = target;
        Ok(Some(DeviceUpdate {
            device: id.clone(),
            desired,
            placement,
        }))
    }

    /// What an agent rollout needs of each device the selector matches:
    /// its architecture, whether it can replace its binary, and the digest
    /// of the binary it runs.
    pub fn agent_facts(
        &self,
        selector: &Selector,
    ) -> Vec<(DeviceId, String, bool, Option<String>)> {
        self.matching(selector)
            .into_iter()
            .filter_map(|id| {
                let hello = self
                    .devices
                    .get(&id)?
                    .record
                    .inventory
                    .clone()
                    .unwrap_or_default();
                Some((id, hello.arch, hello.self_update, hello.agent_digest))
            })
            .collect()
    }

    /// One device's (architecture, self_update, agent digest).
    pub fn agent_facts_of(&self, id: &DeviceId) -> Option<(String, bool, Option<String>)> {
        let hello = self
            .devices
            .get(id)?
            .record
            .inventory
            .clone()
            .unwrap_or_default();
        Some((hello.arch, hello.self_update, hello.agent_digest))
    }

    /// An agent rollout's view of a device: the release it runs (the one
    /// whose binary has its hello's digest; 0: none of them), ready once
    /// online; failed when its state report says the update to the target
    /// binary failed.
    pub fn agent_observation(
        &self,
        id: &DeviceId,
        binaries: &BTreeMap<u64, BTreeMap<String, drover_shared::update::AgentTarget>>,
        to: u64,
    ) -> Option<crate::core::rollout::Observation> {
        let dev = self.devices.get(id)?;
        let hello = dev.record.inventory.as_ref()?;
        let running = hello.agent_digest.as_deref();
        let release = binaries
            .iter()
            .find(|(_, by_arch)| by_arch.values().any(|t| Some(t.digest.as_str()) == running))
            .map_or(0, |(r, _)| *r);
        let target = binaries.get(&to).and_then(|m| m.get(&hello.arch));
        let failed = dev
            .record
            .observed
            .as_ref()
            .and_then(|o| o.agent_update.as_ref())
            .filter(|u| {
                u.phase == drover_shared::update::AgentUpdatePhase::Failed
                    && target.is_some_and(|t| t.digest == u.digest)
            })
            .map(|u| {
                format!(
                    "the agent update failed: {}",
                    u.error.as_deref().unwrap_or("no reason given")
                )
            });
        Some(crate::core::rollout::Observation {
            release: if failed.is_some() { to } else { release },
            ready: dev.record.online,
            failed,
        })
    }

    /// Clears a device's override of `app`'s assignment; the caller then
    /// reconciles the device.
    pub fn clear_override(&self, id: &DeviceId, app: &Name) -> Result<Placement, FleetError> {
        if !self.devices.contains_key(id) {
            return Err(FleetError::UnknownDevice(id.clone()));
        }
        let mut p = self.placement.get(id).cloned().unwrap_or_default();
        p.overrides.remove(app);
        Ok(p)
    }

    pub fn put_placement(&mut self, id: &DeviceId, placement: Placement) {
        self.placement.insert(id.clone(), placement);
    }

    /// Applies planned updates to memory; returns their writes (one per
    /// device) and what each device had before, to undo them.
    #[allow(clippy::type_complexity)]
    pub fn apply_updates(
        &mut self,
        updates: &[DeviceUpdate],
    ) -> (
        Vec<Write>,
        Vec<(DeviceId, Option<DesiredState>, Option<Placement>)>,
    ) {
        let mut writes = Vec::with_capacity(updates.len());
        let mut previous = Vec::with_capacity(updates.len());
        for u in updates {
            previous.push((
                u.device.clone(),
                self.desired.get(&u.device).cloned(),
                self.placement.get(&u.device).cloned(),
            ));
            self.desired.insert(u.device.clone(), u.desired.clone());
            self.placement.insert(u.device.clone(), u.placement.clone());
            writes.push(Write::Desired(DesiredRecord {
                device: u.device.clone(),
                state: u.desired.clone(),
                placement: u.placement.clone(),
            }));
        }
        (writes, previous)
    }

    /// Whether `id` can run every image of an assignment whose images
    /// provide `known` (a device that said no platform can).
    fn runs_all(&self, id: &DeviceId, known: &[ImagePlatforms]) -> bool {
        known.is_empty()
            || ImagePlatforms::all_run_on(
                known,
                self.inventory(id)
                    .and_then(|h| h.effective_platform())
                    .as_ref(),
            )
    }

    /// The API's view of `app`'s assignment, with the devices it covers.
    pub fn assignment_view(&self, app: &Name) -> Option<contract::Assignment> {
        let rec = self.apps.get(app)?;
        let a = rec.assignment.as_ref()?;
        let matching = Selector::parse(&a.selector)
            .map(|s| self.matching(&s))
            .unwrap_or_default();
        let with = |f: fn(&Placement) -> &std::collections::BTreeSet<Name>| {
            self.placement
                .iter()
                .filter(|(_, p)| f(p).contains(app))
                .map(|(id, _)| id.clone())
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect::<Vec<_>>()
        };
        Some(contract::Assignment {
            app: app.clone(),
            selector: a.selector.clone(),
            release: a.release,
            run: a.run,
            updated_at_ms: a.updated_at_ms,
            author: a.author.clone(),
            assigned: with(|p| &p.assigned),
            overridden: with(|p| &p.overrides),
            unsupported: matching
                .iter()
                .filter(|id| !self.runs_all(id, &a.platforms))
                .cloned()
                .collect(),
            matching,
        })
    }

    fn current(&self, id: &DeviceId) -> (DesiredState, Placement) {
        (
            self.desired.get(id).cloned().unwrap_or_default(),
            self.placement.get(id).cloned().unwrap_or_default(),
        )
    }

    /// Marks an operation as handed to the broker, unless the device already
    /// answered (acks can overtake this bookkeeping).
    pub fn mark_sent(&mut self, op_id: &str, now: u64) -> Option<Write> {
        self.operations
            .update(op_id, |op| {
                if op.status != OpStatus::Pending {
                    return false;
                }
                op.status = OpStatus::Sent;
                op.updated_at_ms = now;
                true
            })
            .map(Write::Operation)
    }

    // ----- reads -----------------------------------------------------------

    pub fn device_ids(&self) -> impl Iterator<Item = &DeviceId> {
        self.devices.keys()
    }

    pub fn device_view(&self, id: &DeviceId) -> Option<contract::Device> {
        let d = self.devices.get(id)?;
        let desired = self.desired.get(id).cloned();
        Some(contract::Device {
            id: id.clone(),
            online: d.record.online,
            first_seen_ms: d.record.first_seen_ms,
            last_seen_ms: d.record.last_seen_ms,
            desired_generation: desired.as_ref().map_or(0, |s| s.generation),
            applied_generation: d
                .record
                .observed
                .as_ref()
                .map_or(0, |o| o.applied_generation),
            inventory: d.record.inventory.clone(),
            platform: d
                .record
                .inventory
                .as_ref()
                .and_then(|h| h.effective_platform())
                .map(|p| p.to_string()),
            desired,
            observed: d.record.observed.clone(),
            heartbeat: d.heartbeat.clone(),
            telemetry: d.telemetry.clone(),
            recent_events: d.events.iter().rev().take(20).cloned().collect(),
            labels: self.labels_of(id).unwrap_or_default(),
            device_labels: d
                .record
                .inventory
                .as_ref()
                .map(|h| h.labels.clone())
                .unwrap_or_default(),
            operator_labels: d.record.labels.clone(),
            credential: None,
            privileges: self
                .desired
                .get(id)
                .map(|s| {
                    s.apps
                        .iter()
                        .map(|a| (a.spec.name.to_string(), a.spec.privileges()))
                        .collect()
                })
                .unwrap_or_default(),
        })
    }

    /// A device's effective labels: device-set overlaid by operator-set.
    pub fn labels_of(&self, id: &DeviceId) -> Option<BTreeMap<String, String>> {
        let d = self.devices.get(id)?;
        let own = d.record.inventory.as_ref().map(|h| &h.labels);
        Some(match own {
            Some(own) => effective_labels(own, &d.record.labels),
            None => d.record.labels.clone(),
        })
    }

    /// The devices whose effective labels match `selector`, in id order.
    pub fn matching(&self, selector: &Selector) -> Vec<DeviceId> {
        self.devices
            .keys()
            .filter(|id| {
                self.labels_of(id)
                    .is_some_and(|labels| selector.matches(&labels))
            })
            .cloned()
            .collect()
    }

    /// Whether the device is known and online.
    pub fn is_online(&self, id: &DeviceId) -> bool {
        self.devices.get(id).is_some_and(|d| d.record.online)
    }

    /// (known, online), without building views.
    pub fn device_counts(&self) -> (usize, usize) {
        (
            self.devices.len(),
            self.devices.values().filter(|d| d.record.online).count(),
        )
    }

    /// What `/metrics` shows of the fleet at a scrape, in one pass over
    /// the devices (no views built): the engine answers it between inputs.
    /// Per-device rows only when `per_device`.
    pub fn gauges(&self, per_device: bool) -> FleetGauges {
        let mut g = FleetGauges::default();
        for app in self.apps.keys() {
            g.apps.insert(app.to_string(), AppGauge::default());
        }
        for (id, d) in &self.devices {
            if d.record.online {
                g.online += 1;
            } else {
                g.offline += 1;
            }
            for a in self.desired.get(id).map_or(&[][..], |s| &s.apps[..]) {
                if a.run == RunState::Running {
                    g.apps.entry(a.spec.name.to_string()).or_default().desired += 1;
                }
            }
            for a in d.record.observed.as_ref().map_or(&[][..], |o| &o.apps[..]) {
                if a.phase == AppPhase::Running {
                    g.apps.entry(a.name.to_string()).or_default().running += 1;
                }
            }
            if per_device {
                g.devices.push(DeviceGauge {
                    id: id.to_string(),
                    online: d.record.online,
                    host: d.telemetry.as_ref().map(|t| t.host.clone()),
                });
            }
        }
        g
    }

    pub fn device_views(&self) -> Vec<contract::Device> {
        self.devices
            .keys()
            .filter_map(|id| self.device_view(id))
            .collect()
    }

    /// One page of the devices a query matches, in id order, and how many
    /// match in all. Filters look at the records; views are built only for
    /// the page, so a page of 50 out of 10,000 costs 50 views.
    pub fn device_page(&self, q: &DeviceQuery) -> DevicePage {
        let text = q.text.as_deref().map(str::to_lowercase);
        let mut total = 0;
        let mut devices = Vec::new();
        for (id, d) in &self.devices {
            if q.online.is_some_and(|o| o != d.record.online) {
                continue;
            }
            if let Some(t) = &text {
                let host = d.record.inventory.as_ref().map(|h| h.hostname.as_str());
                let hit = id.as_str().to_lowercase().contains(t)
                    || host.is_some_and(|h| h.to_lowercase().contains(t));
                if !hit {
                    continue;
                }
            }
            if let Some(sel) = &q.selector {
                if !self.labels_of(id).is_some_and(|l| sel.matches(&l)) {
                    continue;
                }
            }
            if total >= q.offset && q.limit.is_none_or(|l| devices.len() < l) {
                devices.extend(self.device_view(id));
            }
            total += 1;
        }
        DevicePage { total, devices }
    }

    pub fn apps(&self) -> Vec<AppRecord> {
        self.apps.values().cloned().collect()
    }

    pub fn app(&self, name: &Name) -> Option<AppRecord> {
        self.apps.get(name).cloned()
    }

    pub fn desired(&self, id: &DeviceId) -> Option<&DesiredState> {
        self.desired.get(id)
    }

    /// The devices whose desired state names this agent binary.
    pub fn agent_digest_users(&self, digest: &str) -> Vec<DeviceId> {
        let mut ids: Vec<DeviceId> = self
            .desired
            .iter()
            .filter(|(_, d)| d.agent.as_ref().is_some_and(|a| a.digest == digest))
            .map(|(id, _)| id.clone())
            .collect();
        ids.sort();
        ids
    }

    pub fn all_desired(&self) -> impl Iterator<Item = (&DeviceId, &DesiredState)> {
        self.desired.iter()
    }

    pub fn operation(&self, id: &str) -> Option<OperationRecord> {
        self.operations.get(id).cloned()
    }

    /// Newest first, among those in memory (all open ones and the newest
    /// finished ones; see [`crate::core::ops`]).
    pub fn operations(&self, device: Option<&DeviceId>, limit: usize) -> Vec<OperationRecord> {
        self.operations.list(device, limit)
    }

    /// A device's events, newest first.
    pub fn events(&self, device: &DeviceId, limit: usize) -> Option<Vec<DeviceEvent>> {
        Some(
            self.devices
                .get(device)?
                .events
                .iter()
                .rev()
                .take(limit)
                .cloned()
                .collect(),
        )
    }

    /// Whether the device is known (has said hello or come online).
    pub fn has_device(&self, id: &DeviceId) -> bool {
        self.devices.contains_key(id)
    }

    /// The device's latest `hello`, if it has sent one.
    pub fn inventory(&self, id: &DeviceId) -> Option<&drover_shared::payload::Hello> {
        self.devices.get(id)?.record.inventory.as_ref()
    }
}

/// Docker binds a host port once per device: the app being deployed may
/// not publish one that another app in the device's desired state
/// publishes (running or stopped: a stopped app gets its port back when it
/// starts). Within one app, `AppSpec::validate` checks it.
fn check_host_ports(device: &DeviceId, next: &DesiredState, app: &Name) -> Result<(), FleetError> {
    let Some(ours) = next.app(app) else {
        return Ok(());
    };
    for p in ours.spec.containers.iter().flat_map(|c| &c.ports) {
        let taken = next.apps.iter().filter(|a| &a.spec.name != app).find(|a| {
            a.spec
                .containers
                .iter()
                .flat_map(|c| &c.ports)
                .any(|q| q.conflicts_with(p))
        });
        if let Some(other) = taken {
            return Err(FleetError::PortInUse {
                device: device.clone(),
                app: app.clone(),
                port: p.describe_host(),
                other: other.spec.name.clone(),
            });
        }
    }
    Ok(())
}

/// Docker refuses a CPU limit above the host's CPU count, so the app's
/// limits are checked against the device's inventory when it has sent one
/// (`available` 0: not known yet, left to the device).
fn check_cpus(
    device: &DeviceId,
    next: &DesiredState,
    app: &Name,
    available: u32,
) -> Result<(), FleetError> {
    let Some(ours) = next.app(app) else {
        return Ok(());
    };
    if available == 0 {
        return Ok(());
    }
    for c in &ours.spec.containers {
        if let Some(cpus) = c.cpus.filter(|n| *n > f64::from(available)) {
            return Err(FleetError::CpusExceedDevice {
                device: device.clone(),
                app: app.clone(),
                container: c.name.clone(),
                cpus: cpus.to_string(),
                available,
            });
        }
    }
    Ok(())
}

/// Moves an operation forward on an ack. Never moves it back: a late
/// `progress` after `succeeded` changes nothing. Returns whether it changed.
fn apply_ack(op: &mut OperationRecord, ack: &Ack, now: u64) -> bool {
    if op.status.is_final() {
        return false;
    }
    let next = match ack.phase {
        AckPhase::Received => {
            if matches!(op.status, OpStatus::Received | OpStatus::InProgress) {
                return false;
            }
            OpStatus::Received
        }
        AckPhase::Progress => OpStatus::InProgress,
        AckPhase::Succeeded => OpStatus::Succeeded,
        AckPhase::Failed => OpStatus::Failed,
        // The device moved on to a newer generation before finishing this
        // one. Whether this operation's effect holds is decided once that
        // generation is reported applied (`settle_operations`), so the
        // outcome is the same whether or not this ack arrives.
        AckPhase::Superseded => {
            op.detail = "a newer desired state reached the device first; outcome follows from its next state report".into();
            op.updated_at_ms = now;
            if op.status == OpStatus::InProgress {
                return true;
            }
            op.status = OpStatus::InProgress;
            return true;
        }
    };
    op.status = next;
    if !ack.detail.is_empty() || next.is_final() {
        op.detail = ack.detail.clone();
    }
    if ack.progress.is_some() {
        op.progress = ack.progress.clone();
    }
    op.updated_at_ms = now;
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_shared::model::{AppStatus, ObservedState};

    /// A heartbeat that announces a 5 s interval.
    fn hb(g: u64) -> DeviceMessage {
        DeviceMessage::Heartbeat(Heartbeat {
            at_ms: 0,
            seq: 1,
            uptime_s: 1,
            applied_generation: g,
            interval_ms: 5_000,
        })
    }

    fn id(s: &str) -> DeviceId {
        DeviceId::new(s).expect("id")
    }
    fn name(s: &str) -> Name {
        Name::new(s).expect("name")
    }
    fn spec(n: &str) -> AppSpec {
        serde_json::from_value(serde_json::json!({
            "name": n, "containers": [{"name": "main", "image": "busybox:1"}]
        }))
        .expect("spec")
    }

    fn fleet_with_device() -> Fleet {
        let mut f = Fleet::default();
        f.on_device_message(&id("pi"), DeviceMessage::Hello(Hello::default()), 1);
        let (rec, _) = f.create_app(spec("web"), "t", 1).expect("create");
        f.put_app(rec);
        f
    }

    impl Fleet {
        fn req(
            &mut self,
            op: Op,
            app: &str,
            op_id: &str,
            now: u64,
        ) -> Result<(DesiredState, OperationRecord), FleetError> {
            let (d, p, o, _) = self.request(&id("pi"), op, &name(app), op_id.into(), now)?;
            self.commit_request(d.clone(), p, o.clone());
            Ok((d, o))
        }
    }

    fn report(applied: u64, apps: Vec<AppStatus>) -> DeviceMessage {
        DeviceMessage::State(StateReport {
            at_ms: 0,
            observed: ObservedState {
                applied_generation: applied,
                desired_generation: applied,
                apps,
                ..Default::default()
            },
        })
    }

    fn put(f: &mut Fleet, v: serde_json::Value) {
        let mut spec: AppSpec = serde_json::from_value(v).expect("spec");
        spec.validate().expect("valid");
        let (rec, _) = f.create_app(spec, "t", 1).expect("create");
        f.put_app(rec);
    }

    #[test]
    fn an_import_creates_or_with_replace_replaces() {
        let mut f = Fleet::default();
        // New: created either way.
        let (rec, writes) = f.import_app(spec("web"), false, "t", 5).expect("create");
        assert_eq!((rec.created_at_ms, rec.updated_at_ms), (5, 5));
        assert_eq!(writes.len(), 1);
        f.put_app(rec);
        let (rec, _) = f.import_app(spec("db"), true, "t", 6).expect("create");
        f.put_app(rec);
        // Existing: a conflict without replace, a replacement with it.
        assert!(matches!(
            f.import_app(spec("web"), false, "t", 7),
            Err(FleetError::AppExists(_))
        ));
        // (An identical spec would make no new release and change nothing.)
        let mut changed = spec("web");
        changed.containers[0].image = "busybox:2".into();
        let (rec, _) = f.import_app(changed, true, "t", 8).expect("replace");
        assert_eq!((rec.created_at_ms, rec.updated_at_ms), (5, 8));
    }

    #[test]
    fn pause_freezes_and_only_a_paused_app_is_unpaused() {
        let mut f = fleet_with_device();
        put(
            &mut f,
            serde_json::json!({"name": "frozen", "containers": [{"name": "main", "image": "busybox:1"}]}),
        );
        assert!(matches!(
            f.req(Op::Pause, "frozen", "0", 1),
            Err(FleetError::NotDeployed { .. })
        ));
        f.req(Op::Deploy, "frozen", "1", 2).expect("deploy");
        assert!(
            matches!(
                f.req(Op::Unpause, "frozen", "2", 3),
                Err(FleetError::NotPaused { .. })
            ),
            "a running app is not paused"
        );
        let (d, op) = f.req(Op::Pause, "frozen", "3", 4).expect("pause");
        assert_eq!(d.apps[0].run, RunState::Paused);
        assert_eq!(op.op, Op::Pause);
        let started = d.apps[0].started_at;
        let (d, _) = f.req(Op::Unpause, "frozen", "4", 5).expect("unpause");
        assert_eq!(d.apps[0].run, RunState::Running);
        assert_eq!(d.apps[0].started_at, started, "thawing is not a restart");
        f.req(Op::Stop, "frozen", "5", 6).expect("stop");
        assert!(
            matches!(
                f.req(Op::Unpause, "frozen", "6", 7),
                Err(FleetError::NotPaused { .. })
            ),
            "unpausing a stopped app must not start it"
        );
    }

    #[test]
    fn a_host_port_is_published_by_one_app_per_device() {
        let mut f = fleet_with_device();
        let ports = |name: &str, ports: serde_json::Value| {
            serde_json::json!({"name": name, "containers": [
                {"name": "main", "image": "busybox:1", "ports": ports}]})
        };
        put(
            &mut f,
            ports("a", serde_json::json!([{"host": 8080, "container": 80}])),
        );
        put(
            &mut f,
            ports(
                "b",
                serde_json::json!([{"host": 9090, "container": 80},
                                                  {"host": 8080, "container": 80, "host_ip": "127.0.0.1"}]),
            ),
        );
        put(
            &mut f,
            ports(
                "c",
                serde_json::json!([{"host": 8080, "container": 80, "protocol": "udp"}]),
            ),
        );
        f.req(Op::Deploy, "a", "1", 2).expect("deploy a");
        let e = f.req(Op::Deploy, "b", "2", 3).expect_err("8080 is a's");
        assert_eq!(
            e,
            FleetError::PortInUse {
                device: id("pi"),
                app: name("b"),
                port: "127.0.0.1:8080/tcp".into(),
                other: name("a"),
            }
        );
        assert!(
            e.to_string().contains("8080") && e.to_string().contains("app a"),
            "{e}"
        );
        assert_eq!(
            f.desired(&id("pi")).map(|d| d.generation),
            Some(1),
            "nothing changed"
        );
        // Another protocol is another port; redeploying a itself is fine.
        f.req(Op::Deploy, "c", "3", 4).expect("udp 8080 is free");
        f.req(Op::Deploy, "a", "4", 5).expect("redeploy");
        // A stopped app keeps its port; a removed one frees it.
        f.req(Op::Stop, "a", "5", 6).expect("stop");
        assert!(f.req(Op::Deploy, "b", "6", 7).is_err());
        f.req(Op::Remove, "a", "7", 8).expect("remove");
        f.req(Op::Deploy, "b", "8", 9).expect("8080 is free now");
    }

    #[test]
    fn a_cpu_limit_above_the_device_is_refused_once_its_inventory_is_known() {
        let mut f = Fleet::default();
        let app = |cpus: f64| {
            serde_json::json!({"name": format!("c{}", cpus as u32), "containers": [
                {"name": "main", "image": "busybox:1", "cpus": cpus}]})
        };
        put(&mut f, app(4.0));
        put(&mut f, app(5.0));
        // No inventory yet: left to the device.
        f.on_device_message(
            &id("pi"),
            DeviceMessage::Status(Status {
                online: true,
                at_ms: 1,
            }),
            1,
        );
        f.req(Op::Deploy, "c5", "1", 2).expect("cpu count unknown");
        f.on_device_message(
            &id("pi"),
            DeviceMessage::Hello(Hello {
                cpus: 4,
                ..Default::default()
            }),
            3,
        );
        f.req(Op::Deploy, "c4", "2", 4).expect("4 of 4");
        let e = f.req(Op::Deploy, "c5", "3", 5).expect_err("5 of 4");
        assert_eq!(
            e,
            FleetError::CpusExceedDevice {
                device: id("pi"),
                app: name("c5"),
                container: name("main"),
                cpus: "5".into(),
                available: 4,
            }
        );
    }

    #[test]
    fn a_desired_state_too_large_for_one_message_is_refused_before_storing() {
        use drover_shared::model::limits;
        // The outside probe: two 140 KiB apps, each accepted, wedged the
        // MQTT link once both were on one device. Each app now stays under
        // its bound; three of them do not fit in one message together.
        let mut f = fleet_with_device();
        let value = "v".repeat(limits::ENV_VALUE_BYTES);
        for app in ["big1", "big2", "big3"] {
            let env: serde_json::Map<String, serde_json::Value> = (0..3)
                .map(|i| (format!("V{i}"), serde_json::Value::from(value.clone())))
                .collect();
            put(
                &mut f,
                serde_json::json!({"name": app, "containers": [
                {"name": "main", "image": "busybox:1", "env": env}]}),
            );
        }
        f.req(Op::Deploy, "big1", "1", 2).expect("one fits");
        f.req(Op::Deploy, "big2", "2", 3).expect("two fit");
        let before = f.desired(&id("pi")).cloned();
        let e = f
            .request(&id("pi"), Op::Deploy, &name("big3"), "3".into(), 4)
            .expect_err("three do not");
        let FleetError::DesiredTooLarge {
            size,
            max,
            ref apps,
            ..
        } = e
        else {
            panic!("{e:?}")
        };
        assert!(size > max && max == MAX_PAYLOAD_BYTES, "{e}");
        assert!(apps.contains("big1") && apps.contains("big3"), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains("device pi") && msg.contains(&max.to_string()),
            "{msg}"
        );
        assert_eq!(f.desired(&id("pi")).cloned(), before, "nothing changed");
        // What is stored still goes out: the cmd of the last accepted
        // request is within the limit too.
        let (d, o) = f.req(Op::Stop, "big2", "4", 5).expect("stop is fine");
        let cmd = Command {
            id: o.id,
            issued_at_ms: 5,
            action: Action::Apply {
                op: Op::Stop,
                app: name("big2"),
                desired: d,
            },
        };
        assert!(drover_shared::encode(&cmd).len() <= MAX_PAYLOAD_BYTES);
    }

    #[test]
    fn a_state_stored_too_large_can_still_be_shrunk() {
        // A desired state stored before sizes were checked: removing an
        // app must stay possible, or the device could never be repaired.
        let mut f = fleet_with_device();
        let mut spec = spec("huge");
        spec.containers[0]
            .env
            .insert("BIG".into(), "x".repeat(300 * 1024));
        let mut huge = DesiredState {
            generation: 7,
            apps: Vec::new(),
            agent: None,
        };
        huge.apps.push(DesiredApp {
            spec: spec.clone(),
            run: RunState::Running,
            started_at: 7,
            release: 0,
            restarted_at: 0,
        });
        f.desired.insert(id("pi"), huge);
        f.put_app(AppRecord {
            spec,
            created_at_ms: 1,
            updated_at_ms: 1,
            releases: Vec::new(),
            assignment: None,
        });
        assert!(matches!(
            f.req(Op::Start, "huge", "1", 2),
            Err(FleetError::DesiredTooLarge { .. })
        ));
        let (d, _) = f.req(Op::Remove, "huge", "2", 3).expect("remove");
        assert!(d.apps.is_empty());
    }

    #[test]
    fn every_request_bumps_the_generation() {
        let mut f = fleet_with_device();
        let (d1, _) = f.req(Op::Deploy, "web", "a", 2).expect("deploy");
        let (d2, _) = f.req(Op::Stop, "web", "b", 3).expect("stop");
        let (d3, _) = f.req(Op::Remove, "web", "c", 4).expect("remove");
        assert_eq!((d1.generation, d2.generation, d3.generation), (1, 2, 3));
        assert_eq!(d2.apps[0].run, RunState::Stopped);
        assert_eq!(
            (d1.apps[0].started_at, d2.apps[0].started_at),
            (1, 1),
            "a stop keeps the last start"
        );
        assert!(d3.apps.is_empty());
    }

    #[test]
    fn requests_name_what_is_missing() {
        let mut f = fleet_with_device();
        assert_eq!(
            f.request(&id("ghost"), Op::Deploy, &name("web"), "a".into(), 1)
                .err(),
            Some(FleetError::UnknownDevice(id("ghost")))
        );
        assert_eq!(
            f.req(Op::Deploy, "nope", "a", 1).err(),
            Some(FleetError::UnknownApp(name("nope")))
        );
        assert!(matches!(
            f.req(Op::Stop, "web", "a", 1),
            Err(FleetError::NotDeployed { .. })
        ));
    }

    #[test]
    fn acks_move_operations_forward_only() {
        let mut f = fleet_with_device();
        let (_, op) = f.req(Op::Deploy, "web", "a", 2).expect("deploy");
        let ack = |phase, detail: &str| {
            DeviceMessage::Ack(Ack {
                command_id: op.id.clone(),
                at_ms: 0,
                phase,
                detail: detail.into(),
                progress: None,
            })
        };
        f.on_device_message(&id("pi"), ack(AckPhase::Failed, "manifest unknown"), 3);
        f.on_device_message(&id("pi"), ack(AckPhase::Progress, ""), 4);
        let got = f.operation(&op.id).expect("op");
        assert_eq!(
            (got.status, got.detail.as_str()),
            (OpStatus::Failed, "manifest unknown")
        );
    }

    #[test]
    fn a_superseded_ack_leaves_the_outcome_to_the_state_report() {
        let mut f = fleet_with_device();
        let (_, a) = f.req(Op::Deploy, "web", "a", 2).expect("deploy");
        let superseded = Ack {
            command_id: a.id.clone(),
            at_ms: 0,
            phase: AckPhase::Superseded,
            detail: String::new(),
            progress: None,
        };
        f.on_device_message(&id("pi"), DeviceMessage::Ack(superseded), 3);
        assert_eq!(f.operation(&a.id).expect("a").status, OpStatus::InProgress);
        // Generation 2 (a later change to another app) applied; web runs.
        let (rec, _) = f.create_app(spec("db"), "t", 3).expect("create");
        f.put_app(rec);
        f.req(Op::Deploy, "db", "b", 4).expect("deploy db");
        let running = AppStatus {
            name: name("web"),
            phase: AppPhase::Running,
            error: None,
            attempts: 0,
            next_retry_at_ms: None,
            containers: vec![],
            release: 0,
        };
        f.on_device_message(&id("pi"), report(2, vec![running]), 5);
        assert_eq!(
            f.operation(&a.id).expect("a").status,
            OpStatus::Succeeded,
            "its effect holds"
        );
    }

    #[test]
    fn a_state_report_settles_operations_without_acks() {
        let mut f = fleet_with_device();
        let (_, a) = f.req(Op::Deploy, "web", "a", 2).expect("deploy");
        let (_, b) = f.req(Op::Stop, "web", "b", 3).expect("stop");
        let running = AppStatus {
            name: name("web"),
            phase: AppPhase::Stopped,
            error: None,
            attempts: 0,
            next_retry_at_ms: None,
            containers: vec![],
            release: 0,
        };
        let fx = f.on_device_message(&id("pi"), report(1, vec![running.clone()]), 4);
        assert_eq!(f.operation(&a.id).expect("a").status, OpStatus::Succeeded);
        assert_eq!(f.operation(&b.id).expect("b").status, OpStatus::Pending);
        assert!(fx.republish, "device is behind generation 2");
        let failed = AppStatus {
            phase: AppPhase::Failed,
            error: Some("boom".into()),
            ..running
        };
        f.on_device_message(&id("pi"), report(2, vec![failed]), 5);
        let b = f.operation(&b.id).expect("b");
        assert_eq!((b.status, b.detail.as_str()), (OpStatus::Failed, "boom"));
    }

    #[test]
    fn an_operation_overtaken_before_the_device_saw_it_is_superseded() {
        let mut f = fleet_with_device();
        let (_, a) = f.req(Op::Deploy, "web", "a", 2).expect("deploy");
        let (_, b) = f.req(Op::Stop, "web", "b", 3).expect("stop");
        // The device was offline for both and applied generation 2 directly.
        let stopped = AppStatus {
            name: name("web"),
            phase: AppPhase::Stopped,
            error: None,
            attempts: 0,
            next_retry_at_ms: None,
            containers: vec![],
            release: 0,
        };
        f.on_device_message(&id("pi"), report(2, vec![stopped]), 4);
        assert_eq!(f.operation(&a.id).expect("a").status, OpStatus::Superseded);
        assert_eq!(f.operation(&b.id).expect("b").status, OpStatus::Succeeded);
    }

    #[test]
    fn a_heartbeat_ahead_of_the_last_state_report_asks_for_a_resync() {
        let mut f = fleet_with_device();
        let (_, a) = f.req(Op::Deploy, "web", "a", 2).expect("deploy");
        assert!(
            !f.on_device_message(&id("pi"), hb(0), 3).resync,
            "nothing applied, nothing lost"
        );
        // The state report for generation 1 was dropped; the heartbeat says 1.
        let fx = f.on_device_message(&id("pi"), hb(1), 4);
        assert!(fx.resync);
        assert_eq!(
            f.operation(&a.id).expect("a").status,
            OpStatus::Pending,
            "not settled from a heartbeat alone"
        );
        let running = AppStatus {
            name: name("web"),
            phase: AppPhase::Running,
            error: None,
            attempts: 0,
            next_retry_at_ms: None,
            containers: vec![],
            release: 0,
        };
        f.on_device_message(&id("pi"), report(1, vec![running]), 5);
        assert_eq!(f.operation(&a.id).expect("a").status, OpStatus::Succeeded);
        assert!(!f.on_device_message(&id("pi"), hb(1), 6).resync);
    }

    #[test]
    fn messages_from_unknown_devices_before_hello_are_dropped() {
        let mut f = Fleet::default();
        let fx = f.on_device_message(&id("x"), report(1, vec![]), 1);
        assert!(fx.writes.is_empty());
        assert!(f.device_view(&id("x")).is_none());
    }

    #[test]
    fn a_log_batch_goes_out_as_a_change() {
        let mut f = fleet_with_device();
        let batch = LogBatch {
            app: name("web"),
            container: name("main"),
            lines: vec![drover_shared::payload::LogLine {
                at_ms: 1,
                stream: drover_shared::payload::LogStream::Stdout,
                line: "hello".into(),
            }],
            dropped: 0,
        };
        let fx = f.on_device_message(&id("pi"), DeviceMessage::Logs(batch.clone()), 2);
        assert!(fx.writes.is_empty(), "{:?}", fx.writes);
        assert!(
            matches!(&fx.changes[..], [Change::Logs { device, batch: b }] if device == &id("pi") && **b == batch),
            "{:?}",
            fx.changes
        );
        assert!(f.has_device(&id("pi")));
        assert!(!f.has_device(&id("nobody")));
        // Nothing from a device that never said hello.
        let fx = f.on_device_message(&id("nobody"), DeviceMessage::Logs(batch), 3);
        assert!(fx.changes.is_empty());
    }

    #[test]
    fn gauges_count_devices_apps_and_per_device_resources() {
        let mut f = fleet_with_device();
        let (rec, _) = f.create_app(spec("db"), "t", 1).expect("create");
        f.put_app(rec);
        f.req(Op::Deploy, "web", "a", 2).expect("deploy");
        let running = AppStatus {
            name: name("web"),
            phase: AppPhase::Running,
            error: None,
            attempts: 0,
            next_retry_at_ms: None,
            containers: vec![],
            release: 0,
        };
        f.on_device_message(&id("pi"), report(1, vec![running]), 3);
        f.on_device_message(&id("off"), DeviceMessage::Hello(Hello::default()), 1);
        f.expire(10_000_000, 1_000);
        f.on_device_message(&id("pi"), hb(1), 10_000_001);
        let host = HostMetrics {
            cpu_percent: 12.5,
            memory_total_bytes: 4096,
            ..Default::default()
        };
        let t = Telemetry {
            at_ms: 10_000_001,
            host: host.clone(),
            containers: vec![],
        };
        f.on_device_message(&id("pi"), DeviceMessage::Telemetry(t), 10_000_001);

        let g = f.gauges(true);
        assert_eq!((g.online, g.offline), (1, 1));
        assert_eq!(
            g.apps["web"],
            AppGauge {
                desired: 1,
                running: 1
            }
        );
        // Defined and deployed nowhere: there, at 0.
        assert_eq!(g.apps["db"], AppGauge::default());
        assert_eq!(
            g.devices,
            vec![
                DeviceGauge {
                    id: "off".into(),
                    online: false,
                    host: None
                },
                DeviceGauge {
                    id: "pi".into(),
                    online: true,
                    host: Some(host)
                },
            ]
        );
        assert!(f.gauges(false).devices.is_empty());
    }

    #[test]
    fn an_app_in_use_cannot_be_deleted() {
        let mut f = fleet_with_device();
        f.req(Op::Deploy, "web", "a", 2).expect("deploy");
        assert!(matches!(
            f.delete_app(&name("web")),
            Err(FleetError::AppInUse { .. })
        ));
        f.req(Op::Remove, "web", "b", 3).expect("remove");
        assert!(f.delete_app(&name("web")).is_ok());
        assert!(
            f.app(&name("web")).is_some(),
            "checking a deletion does not delete"
        );
    }

    /// "Online" needs a live message: a single heartbeat long ago, or a
    /// retained heartbeat handed over after the Last Will, does not keep a
    /// device online.
    #[test]
    fn online_expires_and_retained_messages_are_no_proof_of_life() {
        let mut f = Fleet::default();
        let pi = id("pi");
        f.on_device_message(&pi, DeviceMessage::Hello(Hello::default()), 1_000);
        assert_eq!(f.device_counts(), (1, 1));
        // Its heartbeats say every 5 s: three missed and it is offline.
        f.on_device_message(&pi, hb(0), 2_000);
        assert!(f.expire(16_000, 60_000).changes.is_empty());
        let fx = f.expire(17_001, 60_000);
        assert!(
            matches!(&fx.changes[..], [Change::Device { online: false, .. }]),
            "{:?}",
            fx.changes
        );
        assert_eq!(fx.writes.len(), 1, "the offline state is stored");
        assert_eq!(f.device_counts(), (1, 0));
        // A retained heartbeat and a retained "online" after that change
        // nothing; the retained Last Will does.
        let fx = f.on_retained_message(&pi, hb(0), 18_000);
        assert!(fx.changes.is_empty());
        f.on_retained_message(
            &pi,
            DeviceMessage::Status(Status {
                online: true,
                at_ms: 1,
            }),
            18_000,
        );
        assert_eq!(f.device_counts(), (1, 0));
        // A live one brings it back.
        f.on_device_message(&pi, hb(0), 19_000);
        assert_eq!(f.device_counts(), (1, 1));
        f.on_retained_message(
            &pi,
            DeviceMessage::Status(Status {
                online: false,
                at_ms: 0,
            }),
            19_500,
        );
        assert_eq!(f.device_counts(), (1, 0));
        // Without an announced interval, the default applies.
        let old = id("old");
        f.on_device_message(&old, DeviceMessage::Hello(Hello::default()), 20_000);
        assert!(f
            .expire(79_000, 60_000)
            .changes
            .iter()
            .all(|c| !matches!(c, Change::Device { device, .. } if device == &old)));
        assert_eq!(f.expire(80_001, 60_000).changes.len(), 1);
    }

    fn lbl(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// Device-set labels come from hello, operator-set from the API; the
    /// operator wins on a key both set; both are kept apart in the view.
    #[test]
    fn labels_merge_and_select() {
        let mut f = Fleet::default();
        let hello = Hello {
            labels: lbl(&[("env", "dev"), ("arch", "arm64")]),
            ..Hello::default()
        };
        f.on_device_message(&id("a"), DeviceMessage::Hello(hello), 1);
        f.on_device_message(&id("b"), DeviceMessage::Hello(Hello::default()), 1);
        let sel = Selector::parse("env=prod").expect("sel");
        assert!(f.matching(&sel).is_empty());
        let (rec, writes) = f
            .set_labels(&id("a"), &lbl(&[("env", "prod")]), &[], false)
            .expect("labels");
        assert!(matches!(&writes[..], [Write::Device(r)] if r.labels == rec.labels));
        f.put_device_labels(&id("a"), rec.labels);
        assert_eq!(f.matching(&sel), vec![id("a")]);
        let v = f.device_view(&id("a")).expect("view");
        assert_eq!(v.labels, lbl(&[("arch", "arm64"), ("env", "prod")]));
        assert_eq!(v.device_labels, lbl(&[("arch", "arm64"), ("env", "dev")]));
        assert_eq!(v.operator_labels, lbl(&[("env", "prod")]));
        // A new hello changes the device's own labels, never the operator's.
        let hello = Hello {
            labels: lbl(&[("env", "test")]),
            ..Hello::default()
        };
        f.on_device_message(&id("a"), DeviceMessage::Hello(hello), 2);
        assert_eq!(f.matching(&sel), vec![id("a")]);
        // Removing the operator's key lets the device's own show again.
        let (rec, _) = f
            .set_labels(&id("a"), &BTreeMap::new(), &["env".into()], false)
            .expect("remove");
        f.put_device_labels(&id("a"), rec.labels);
        assert_eq!(f.labels_of(&id("a")).expect("a"), lbl(&[("env", "test")]));
        // Replacing sets exactly the given operator labels.
        let (rec, _) = f
            .set_labels(&id("b"), &lbl(&[("x", "1")]), &[], true)
            .expect("replace");
        assert_eq!(rec.labels, lbl(&[("x", "1")]));
        assert!(matches!(
            f.set_labels(&id("zz"), &BTreeMap::new(), &[], false),
            Err(FleetError::UnknownDevice(_))
        ));
    }

    /// Every change of a spec makes the next release; the same spec again
    /// makes none; deploys carry the latest; history is bounded but keeps
    /// what devices run.
    #[test]
    fn releases_are_numbered_kept_and_deployed() {
        let mut f = fleet_with_device();
        let web = name("web");
        assert_eq!(f.app(&web).expect("app").latest_release(), 1);
        let mut changed = spec("web");
        changed.containers[0].image = "busybox:2".parse().expect("image");
        let (rec, writes) = f.update_app(changed.clone(), "alice", 5).expect("update");
        assert_eq!(rec.latest_release(), 2);
        assert_eq!(rec.release(2).expect("2").author, "alice");
        assert_eq!(rec.release(1).expect("1").spec, spec("web"));
        assert_eq!(writes.len(), 1);
        f.put_app(rec);
        let (same, writes) = f.update_app(changed, "bob", 6).expect("same");
        assert_eq!(
            same.latest_release(),
            2,
            "an identical spec makes no release"
        );
        assert!(writes.is_empty());
        f.req(Op::Deploy, "web", "op1", 7).expect("deploy");
        assert_eq!(f.desired(&id("pi")).expect("d").apps[0].release, 2);
        // Many more: the oldest go, release 2 (deployed) stays.
        for i in 3..=(RELEASES_KEPT as u64 + 10) {
            let mut s = spec("web");
            s.containers[0].image = format!("busybox:{i}").parse().expect("image");
            let (rec, _) = f.update_app(s, "alice", i).expect("update");
            f.put_app(rec);
        }
        let rec = f.app(&web).expect("app");
        assert_eq!(rec.releases.len(), RELEASES_KEPT);
        assert!(rec.release(2).is_some(), "in use, kept");
        assert!(rec.release(1).is_none());
        assert_eq!(rec.latest_release(), RELEASES_KEPT as u64 + 10);
        // A record from before releases gets its spec as release 1.
        let old = AppRecord {
            spec: spec("x"),
            created_at_ms: 1,
            updated_at_ms: 2,
            releases: Vec::new(),
            assignment: None,
        };
        assert_eq!(old.with_first_release().latest_release(), 1);
    }

    fn apply(f: &mut Fleet, updates: Vec<DeviceUpdate>) -> usize {
        let n = updates.len();
        f.apply_updates(&updates);
        n
    }

    fn relabel(f: &mut Fleet, dev: &str, pairs: &[(&str, &str)]) -> Option<DeviceUpdate> {
        let (rec, _) = f
            .set_labels(&id(dev), &lbl(pairs), &[], true)
            .expect("labels");
        f.put_device_labels(&id(dev), rec.labels);
        f.reconcile_device(&id(dev))
    }

    /// An assignment places the app on matching devices, follows them as
    /// they enroll and are relabelled, and leaves overrides alone.
    #[test]
    fn assignment_follows_labels_and_respects_overrides() {
        let mut f = fleet_with_device(); // "pi", app "web" release 1
        let web = name("web");
        for d in ["a", "b"] {
            f.on_device_message(&id(d), DeviceMessage::Hello(Hello::default()), 1);
        }
        relabel(&mut f, "a", &[("env", "prod")]);
        let rec = f
            .assign(
                &web,
                "env=prod".into(),
                0,
                RunState::Running,
                "ops",
                Vec::new(),
                2,
            )
            .expect("assign");
        assert_eq!(rec.assignment.as_ref().expect("a").release, 1);
        f.put_app(rec);
        let updates = f.reconcile_app(&web);
        assert_eq!(apply(&mut f, updates), 1);
        let a = f.desired(&id("a")).expect("a");
        assert_eq!(a.apps[0].release, 1);
        assert_eq!(a.apps[0].run, RunState::Running);
        assert_eq!(a.generation, 1);
        assert!(f.desired(&id("b")).is_none());
        // Level-triggered: nothing more to do.
        assert!(f.reconcile_app(&web).is_empty());
        // A device enrolling with a matching label of its own gets it.
        let hello = Hello {
            labels: lbl(&[("env", "prod")]),
            ..Hello::default()
        };
        f.on_device_message(&id("c"), DeviceMessage::Hello(hello), 3);
        let u = f.reconcile_device(&id("c")).expect("c gets it");
        assert_eq!(u.desired.apps[0].spec.name, web);
        f.apply_updates(&[u]);
        // Relabelled in, it gets it; relabelled out, it loses it.
        let u = relabel(&mut f, "b", &[("env", "prod")]).expect("in");
        f.apply_updates(&[u]);
        assert!(f.desired(&id("b")).expect("b").app(&web).is_some());
        let u = relabel(&mut f, "b", &[("env", "dev")]).expect("out");
        f.apply_updates(&[u]);
        assert!(f.desired(&id("b")).expect("b").app(&web).is_none());
        assert_eq!(f.desired(&id("b")).expect("b").generation, 2);
        // A per-device removal overrides the assignment on that device.
        f.req(Op::Remove, "web", "rm-a", 4)
            .expect_err("web is not on pi");
        let (d, p, o, _) = f
            .request(&id("a"), Op::Remove, &web, "rm-a".into(), 4)
            .expect("remove");
        f.commit_request(d, p, o);
        assert!(f.placement(&id("a")).expect("p").overrides.contains(&web));
        assert!(
            f.reconcile_device(&id("a")).is_none(),
            "override left alone"
        );
        assert!(f.reconcile_app(&web).iter().all(|u| u.device != id("a")));
        // Cleared, the assignment applies again.
        let p = f.clear_override(&id("a"), &web).expect("clear");
        f.put_placement(&id("a"), p);
        let u = f.reconcile_device(&id("a")).expect("back");
        assert_eq!(u.desired.apps.len(), 1);
        f.apply_updates(&[u]);
        // A new release set on the assignment moves every device at once.
        let mut s2 = spec("web");
        s2.containers[0].image = "busybox:2".into();
        let (rec, _) = f.update_app(s2, "ops", 5).expect("update");
        f.put_app(rec);
        assert!(f.reconcile_app(&web).is_empty(), "pinned at release 1");
        let rec = f
            .assign(
                &web,
                "env=prod".into(),
                2,
                RunState::Running,
                "ops",
                Vec::new(),
                6,
            )
            .expect("assign 2");
        f.put_app(rec);
        let updates = f.reconcile_app(&web);
        assert_eq!(updates.len(), 2, "a and c");
        assert!(updates.iter().all(|u| u.desired.apps[0].release == 2));
        f.apply_updates(&updates);
        // set_device_release moves one device, as a rollout will.
        let u = f
            .set_device_release(&id("a"), &web, 1, RunState::Running)
            .expect("ok")
            .expect("changes");
        assert_eq!(u.desired.apps[0].release, 1);
        assert!(matches!(
            f.set_device_release(&id("a"), &web, 9, RunState::Running),
            Err(FleetError::UnknownRelease { .. })
        ));
        // Deleting the assignment takes the app from where it put it.
        let mut rec = f.app(&web).expect("web");
        rec.assignment = None;
        f.put_app(rec);
        let updates = f.reconcile_app(&web);
        assert_eq!(updates.len(), 2);
        assert!(updates.iter().all(|u| u.desired.app(&web).is_none()));
        // A release that does not exist is refused.
        assert!(matches!(
            f.assign(
                &web,
                String::new(),
                7,
                RunState::Running,
                "ops",
                Vec::new(),
                7
            ),
            Err(FleetError::UnknownRelease { release: 7, .. })
        ));
    }

    #[test]
    fn restart_marks_a_running_app_with_its_generation() {
        let mut f = fleet_with_device();
        put(
            &mut f,
            serde_json::json!({"name": "svc", "containers": [{"name": "main", "image": "busybox:1"}]}),
        );
        assert!(matches!(
            f.req(Op::Restart, "svc", "0", 1),
            Err(FleetError::NotDeployed { .. })
        ));
        let (deployed, _) = f.req(Op::Deploy, "svc", "1", 2).expect("deploy");
        assert_eq!(deployed.apps[0].restarted_at, 0);
        let (d, op) = f.req(Op::Restart, "svc", "2", 3).expect("restart");
        assert_eq!(op.op, Op::Restart);
        assert_eq!(op.generation, d.generation);
        assert_eq!(d.generation, deployed.generation + 1);
        assert_eq!(d.apps[0].restarted_at, d.generation);
        assert_eq!(
            (&d.apps[0].spec, d.apps[0].run, d.apps[0].started_at),
            (
                &deployed.apps[0].spec,
                deployed.apps[0].run,
                deployed.apps[0].started_at
            ),
            "a restart changes nothing else"
        );
        let mark = d.apps[0].restarted_at;
        let (d, _) = f.req(Op::Restart, "svc", "3", 4).expect("again");
        assert!(d.apps[0].restarted_at > mark, "each restart is a new mark");
        let mark = d.apps[0].restarted_at;
        let (d, _) = f.req(Op::Deploy, "svc", "4", 5).expect("redeploy");
        assert_eq!(
            d.apps[0].restarted_at, mark,
            "a redeploy does not replay it"
        );
        for (op, word) in [(Op::Stop, "stopped"), (Op::Pause, "paused")] {
            f.req(op, "svc", "5", 6).expect("stop or pause");
            let e = f.req(Op::Restart, "svc", "6", 7).expect_err("not running");
            assert!(matches!(e, FleetError::NotRunning { .. }), "{e}");
            assert!(
                e.to_string()
                    .contains(&format!("svc is {word} on device pi")),
                "{e}"
            );
            f.req(Op::Start, "svc", "7", 8).expect("start");
        }
        f.req(Op::Remove, "svc", "8", 9).expect("remove");
        let (d, _) = f.req(Op::Deploy, "svc", "9", 10).expect("deploy again");
        assert_eq!(d.apps[0].restarted_at, 0, "a new deploy starts unmarked");
    }

    /// A release move (assignment, rollout) carries the restart mark over:
    /// not lost, and not newer, so not carried out again.
    #[test]
    fn release_moves_keep_the_restart_mark() {
        let mut f = fleet_with_device();
        let web = name("web");
        f.on_device_message(&id("a"), DeviceMessage::Hello(Hello::default()), 1);
        relabel(&mut f, "a", &[("env", "prod")]);
        let rec = f
            .assign(
                &web,
                "env=prod".into(),
                0,
                RunState::Running,
                "ops",
                Vec::new(),
                2,
            )
            .expect("assign");
        f.put_app(rec);
        let updates = f.reconcile_app(&web);
        assert_eq!(apply(&mut f, updates), 1);
        let (d, p, o, _) = f
            .request(&id("a"), Op::Restart, &web, "r".into(), 3)
            .expect("restart");
        let mark = d.apps[0].restarted_at;
        assert_eq!(mark, d.generation);
        f.commit_request(d, p, o);
        let mut s2 = spec("web");
        s2.containers[0].image = "busybox:2".into();
        let (rec, _) = f.update_app(s2, "ops", 4).expect("update");
        f.put_app(rec);
        let rec = f
            .assign(
                &web,
                "env=prod".into(),
                2,
                RunState::Running,
                "ops",
                Vec::new(),
                5,
            )
            .expect("assign 2");
        f.put_app(rec);
        let updates = f.reconcile_app(&web);
        assert_eq!(updates.len(), 1);
        assert_eq!(updates[0].desired.apps[0].release, 2);
        assert_eq!(updates[0].desired.apps[0].restarted_at, mark, "assignment");
        f.apply_updates(&updates);
        let u = f
            .set_device_release(&id("a"), &web, 1, RunState::Running)
            .expect("ok")
            .expect("changes");
        assert_eq!(u.desired.apps[0].release, 1);
        assert_eq!(u.desired.apps[0].restarted_at, mark, "rollout move");
    }

    /// 10,000 matching devices: one plan, one write per device, all from
    /// one call (the engine queues them as one store transaction).
    #[test]
    fn assigning_to_ten_thousand_devices_is_one_step() {
        let mut f = fleet_with_device();
        for i in 0..10_000 {
            let hello = Hello {
                labels: lbl(&[("fleet", "big")]),
                ..Hello::default()
            };
            f.on_device_message(&id(&format!("d{i}")), DeviceMessage::Hello(hello), 1);
        }
        let rec = f
            .assign(
                &name("web"),
                "fleet=big".into(),
                0,
                RunState::Running,
                "ops",
                Vec::new(),
                2,
            )
            .expect("assign");
        f.put_app(rec);
        let t = std::time::Instant::now();
        let updates = f.reconcile_app(&name("web"));
        let (writes, _) = f.apply_updates(&updates);
        assert_eq!(writes.len(), 10_000);
        assert!(
            t.elapsed() < std::time::Duration::from_secs(5),
            "{:?}",
            t.elapsed()
        );
    }

    #[test]
    fn a_device_page_filters_on_records_and_counts_every_match() {
        let mut f = Fleet::default();
        for i in 0..30 {
            let hello = Hello {
                hostname: format!("Host-{i:02}"),
                labels: [(
                    "env".to_string(),
                    if i % 3 == 0 { "prod" } else { "dev" }.to_string(),
                )]
                .into(),
                ..Hello::default()
            };
            f.on_device_message(
                &id(&format!("dev-{i:02}")),
                DeviceMessage::Hello(hello),
                1_000,
            );
        }
        // Ten of them stop talking: offline.
        for i in 0..10 {
            f.on_device_message(
                &id(&format!("dev-{i:02}")),
                DeviceMessage::Status(Status {
                    online: false,
                    at_ms: 1,
                }),
                2_000,
            );
        }
        let ids = |p: &DevicePage| -> Vec<String> {
            p.devices.iter().map(|d| d.id.to_string()).collect()
        };

        let all = f.device_page(&DeviceQuery::default());
        assert_eq!((all.total, all.devices.len()), (30, 30));

        // Pages in id order; the total is every match, not the page.
        let page = f.device_page(&DeviceQuery {
            offset: 10,
            limit: Some(5),
            ..Default::default()
        });
        assert_eq!(page.total, 30);
        assert_eq!(
            ids(&page),
            ["dev-10", "dev-11", "dev-12", "dev-13", "dev-14"]
        );
        let past = f.device_page(&DeviceQuery {
            offset: 40,
            limit: Some(5),
            ..Default::default()
        });
        assert_eq!((past.total, past.devices.len()), (30, 0));

        let offline = f.device_page(&DeviceQuery {
            online: Some(false),
            limit: Some(3),
            ..Default::default()
        });
        assert_eq!(offline.total, 10);
        assert_eq!(ids(&offline), ["dev-00", "dev-01", "dev-02"]);
        assert!(offline.devices.iter().all(|d| !d.online));
        let online = f.device_page(&DeviceQuery {
            online: Some(true),
            ..Default::default()
        });
        assert_eq!(online.total, 20);
        assert!(online.devices.iter().all(|d| d.online));

        // Text: the id or the hostname, ignoring case.
        let text = |t: &str| {
            f.device_page(&DeviceQuery {
                text: Some(t.into()),
                ..Default::default()
            })
        };
        assert_eq!(
            ids(&text("DEV-2")),
            (20..30).map(|i| format!("dev-{i}")).collect::<Vec<_>>()
        );
        assert_eq!(ids(&text("host-07")), ["dev-07"]);
        assert_eq!(text("nothing").total, 0);

        // Every filter must hold: prod (multiples of 3) and online (10 and up):
        // 12, 15, 18, 21, 24, 27.
        let both = f.device_page(&DeviceQuery {
            selector: Some(Selector::parse("env=prod").expect("selector")),
            online: Some(true),
            limit: Some(2),
            ..Default::default()
        });
        assert_eq!(both.total, 6);
        assert_eq!(ids(&both), ["dev-12", "dev-15"]);
    }
}
