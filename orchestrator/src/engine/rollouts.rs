//! Rollouts in the engine: the pure machine (`core::rollout`) fed by state
//! reports and a timer, its effects carried out through the fleet, its
//! progress stored and announced.
//!
//! - **The assignment is the rollout's target.** Creating a rollout sets
//!   the app's assignment to the rollout's selector and release at once,
//!   and *holds* the devices involved (`Fleet::hold`): the assignment's
//!   level-triggered reconciliation leaves a held device to the rollout,
//!   which moves it batch by batch. A device that enrolls or is relabelled
//!   into the selector meanwhile is not held and gets the new release at
//!   once, as from any assignment; one relabelled out of it is skipped by
//!   the rollout and loses the app.
//! - **How it ends.** Succeeded or failed (under `continue`): the hold
//!   goes and the assignment stays. Rolled back: the previous assignment
//!   comes back (none: the devices keep their app as before, placed by
//!   hand). Aborted: the previous assignment comes back and the devices
//!   the rollout moved keep what they run, as overrides of it (cleared
//!   with `DELETE /api/v1/devices/{id}/apps/{app}/override`). Superseded:
//!   the newer rollout of the app takes the hold, and inherits the
//!   previous assignment to put back.
//! - **Writes.** A rollout is stored whole (JSON), in the same transaction
//!   as the desired states its batch starts, rollbacks or end change; a
//!   device's progress from a state report only marks it dirty, and dirty
//!   rollouts are stored at most once per [`FLUSH_EVERY`] — never a write
//!   per device per report. After a crash the lost progress is found
//!   again: devices in flight are set again (idempotent) and observed
//!   from the fleet's last report.
//! - **Announcements.** `Change::Rollout` at once for a new phase, an
//!   operator action or a new batch; device progress coalesced to one per
//!   rollout per tick.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

use drover_shared::model::RunState;
use drover_shared::{DeviceId, Name};
use tokio::sync::oneshot;
use tracing::{info, warn};

use super::{Done, Engine, EngineError, Then};
use crate::contract::{self, Change, RolloutAction};
use crate::core::fleet::{FleetError, Hold};
use crate::core::records::{AgentReleaseRecord, AssignmentRecord, ImagePlatforms, RolloutRecord};
use crate::core::rollout::{DeviceProgress, Effect, Phase, Rollout, RolloutSpec};
use crate::core::selector::Selector;
use crate::store::Write;
use drover_shared::update::AgentTarget;

/// How often a rollout's progress is stored, at most.
pub const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// How often deadlines are checked and progress announced.
pub const TICK: Duration = Duration::from_millis(250);
/// Finished rollouts kept (the oldest go first); running ones always are.
pub const FINISHED_KEPT: usize = 100;

/// The engine's rollouts: every stored one, the running one per app.
#[derive(Default)]
pub struct Rollouts {
    records: BTreeMap<String, RolloutRecord>,
    /// App → its running rollout.
    active: HashMap<Name, String>,
    /// The running agent rollout (at most one: a newer one supersedes it).
    agent_active: Option<String>,
    /// Progress not yet stored.
    dirty: BTreeSet<String>,
    /// Progress not yet announced.
    unannounced: BTreeSet<String>,
    last_flush: Option<Instant>,
    /// Rollout records handed to the store so far (for tests and metrics).
    stored: u64,
}

impl Rollouts {
    pub fn running(&self, app: &Name) -> Option<&str> {
        self.active.get(app).map(String::as_str)
    }

    /// Every running rollout, apps' and the agent's.
    fn running_ids(&self) -> Vec<String> {
        self.active
            .values()
            .chain(self.agent_active.iter())
            .cloned()
            .collect()
    }

    /// The running agent rollout, if it hands out `digest`.
    pub fn agent_rollouts_using(&self, digest: &str) -> Vec<String> {
        self.agent_active
            .iter()
            .filter(|id| {
                self.records.get(*id).is_some_and(|r| {
                    r.agent_binaries
                        .values()
                        .flat_map(|m| m.values())
                        .any(|t| t.digest == digest)
                })
            })
            .cloned()
            .collect()
    }

    pub fn get(&self, id: &str) -> Option<contract::Rollout> {
        self.records.get(id).map(|r| (&r.rollout).into())
    }

    /// Newest first; only `app`'s when given.
    pub fn list(&self, app: Option<&Name>) -> Vec<contract::Rollout> {
        let mut out: Vec<contract::Rollout> = self
            .records
            .values()
            .filter(|r| app.is_none_or(|a| &r.rollout.spec().app == a))
            .map(|r| (&r.rollout).into())
            .collect();
        out.sort_by(|a, b| {
            b.created_at_ms
                .cmp(&a.created_at_ms)
                .then_with(|| b.id.cmp(&a.id))
        });
        out
    }

    /// One rollout's devices, in id order, optionally only those in
    /// `state` or `batch`; `None` when there is no such rollout.
    pub fn devices(
        &self,
        id: &str,
        state: Option<contract::RolloutDeviceState>,
        batch: Option<usize>,
        offset: usize,
        limit: usize,
    ) -> Option<Vec<contract::RolloutDevice>> {
        let r = self.records.get(id)?;
        Some(
            r.rollout
                .devices()
                .filter(|(_, b, p)| {
                    batch.is_none_or(|want| *b == want)
                        && state.is_none_or(|s| contract::RolloutDeviceState::from(*p) == s)
                })
                .skip(offset)
                .take(limit)
                .map(|(d, b, p)| r.rollout.device_view(d, b, p))
                .collect(),
        )
    }
}

/// The key an agent rollout has where an app rollout has its app.
fn agent_key() -> Name {
    Name::new("agent").unwrap_or_else(|_| unreachable!("a valid name"))
}

/// The machine for a request, with a new id: its spec from the request's
/// strategy and what the engine resolved (key, selector, target release).
#[allow(clippy::too_many_arguments)] // the resolved parts of one request
fn new_rollout(
    req: &contract::CreateRollout,
    app: Name,
    selector: String,
    to_release: u64,
    author: String,
    agent_version: Option<String>,
    targets: BTreeMap<DeviceId, u64>,
    now: u64,
) -> Result<(String, Rollout, Vec<Effect>), EngineError> {
    let invalid = |field: &str, message: String| EngineError::RolloutInvalid {
        field: field.into(),
        message,
    };
    let to_ms = |s: u64, field: &str| {
        s.checked_mul(1000)
            .ok_or_else(|| invalid(field, format!("{s} seconds is too long")))
    };
    let spec = RolloutSpec {
        app,
        selector,
        to_release,
        batches: req.batches.clone(),
        max_unavailable: req.max_unavailable,
        success_threshold_percent: req.success_threshold_percent,
        on_failure: req.on_failure.into(),
        device_timeout_ms: to_ms(req.device_timeout_secs, "device_timeout_secs")?,
        min_ready_ms: to_ms(req.min_ready_secs, "min_ready_secs")?,
        approval: req.approval,
        author,
        agent_version,
    };
    let id = uuid::Uuid::new_v4().to_string();
    let (rollout, fx) = Rollout::new(id.clone(), spec, targets, now).map_err(|e| match e {
        crate::core::rollout::RolloutError::Field { field, message } => {
            invalid(&field, format!("{field}: {message}"))
        }
        other => invalid("rollout", other.to_string()),
    })?;
    Ok((id, rollout, fx))
}

/// What carrying out a rollout's effects produced.
#[derive(Default)]
struct Driven {
    writes: Vec<Write>,
    /// Devices whose desired state changed: published once durable.
    devices: Vec<DeviceId>,
    /// Stored in this change (a batch moved, or it ended).
    store: bool,
}

impl Engine {
    /// After a load: the fleet holds the running rollouts' devices again,
    /// and what was in flight when the orchestrator stopped is set again
    /// (idempotent) and observed from the last reports.
    pub(super) fn restore_rollouts(&mut self, records: Vec<RolloutRecord>) {
        self.rollouts = Rollouts::default();
        for rec in records {
            let id = rec.rollout.id().to_string();
            if !rec.rollout.phase().is_final() && rec.rollout.spec().agent_version.is_some() {
                self.rollouts.agent_active = Some(id.clone());
            } else if !rec.rollout.phase().is_final() {
                let app = rec.rollout.spec().app.clone();
                self.fleet.hold(&app, self.hold_for(&rec.rollout));
                self.rollouts.active.insert(app, id.clone());
            }
            self.rollouts.records.insert(id, rec);
        }
    }

    /// Re-sends what the running rollouts had in flight. Called once the
    /// engine runs (after a start or a reload).
    pub(super) async fn resume_rollouts(&mut self) {
        let now = super::now_ms();
        let ids = self.rollouts.running_ids();
        for id in ids {
            let Some(rec) = self.rollouts.records.get(&id) else {
                continue;
            };
            let fx = rec.rollout.resume_effects(now);
            info!(rollout = %id, in_flight = fx.len(), "rollout resumed");
            let driven = self.drive(&id, fx, now);
            self.commit_driven(&id, driven, None, None).await;
        }
    }

    fn hold_for(&self, r: &Rollout) -> Hold {
        let app = &r.spec().app;
        let mut devices: std::collections::HashSet<DeviceId> =
            r.devices().map(|(d, _, _)| d.clone()).collect();
        devices.extend(self.fleet.assigned_devices(app));
        let mut releases: BTreeSet<u64> = r
            .devices()
            .filter_map(|(d, _, _)| r.from_release_of(d))
            .filter(|r| *r > 0)
            .collect();
        releases.insert(r.spec().to_release);
        Hold { devices, releases }
    }

    pub(super) async fn create_rollout(
        &mut self,
        req: contract::CreateRollout,
        author: String,
        platforms: Vec<ImagePlatforms>,
        agent_binaries: Vec<AgentReleaseRecord>,
        reply: oneshot::Sender<Result<Done, EngineError>>,
    ) {
        let planned = match req.agent_version.clone() {
            Some(version) => self.plan_agent_rollout(req, version, agent_binaries, author),
            None => self.plan_rollout(req, author, platforms),
        };
        match planned {
            Ok((id, driven)) => {
                let view = self.rollouts.get(&id).map(Box::new);
                self.commit_driven(&id, driven, Some(reply), view.map(Done::Rollout))
                    .await;
            }
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
    }

    fn plan_rollout(
        &mut self,
        req: contract::CreateRollout,
        author: String,
        platforms: Vec<ImagePlatforms>,
    ) -> Result<(String, Driven), EngineError> {
        let now = super::now_ms();
        let invalid = |field: &str, message: String| EngineError::RolloutInvalid {
            field: field.into(),
            message,
        };
        let app = req
            .app
            .clone()
            .ok_or_else(|| invalid("app", "a rollout needs `app` or `agent_version`".into()))?;
        let mut app_rec = self
            .fleet
            .app(&app)
            .ok_or_else(|| crate::core::fleet::FleetError::UnknownApp(app.clone()))?;
        let release = if req.release == 0 {
            app_rec.latest_release()
        } else {
            req.release
        };
        if app_rec.release(release).is_none() {
            return Err(crate::core::fleet::FleetError::UnknownRelease {
                app: app.clone(),
                release,
                latest: app_rec.latest_release(),
            }
            .into());
        }
        // Empty: the assignment's selector when the app has one, else every device.
        let raw = match (&req.selector, &app_rec.assignment) {
            (s, Some(a)) if s.trim().is_empty() => a.selector.clone(),
            (s, _) => s.clone(),
        };
        let selector = Selector::parse(&raw)
            .map_err(|e| invalid("selector", format!("selector {raw:?} is not valid: {e}")))?;
        let targets = self.fleet.rollout_targets(&app, &selector);
        if targets.is_empty() {
            return Err(EngineError::RolloutConflict {
                field: "selector".into(),
                message: format!(
                    "selector {:?} matches no device that the assignment of app {} may manage",
                    selector.to_string(),
                    app
                ),
            });
        }
        let (id, rollout, fx) = new_rollout(
            &req,
            app.clone(),
            selector.to_string(),
            release,
            author.clone(),
            None,
            targets,
            now,
        )?;
        let mut driven = Driven {
            store: true,
            ..Default::default()
        };
        // A newer rollout of the app supersedes the running one, and puts
        // back what that one would have on a rollback.
        let mut previous = app_rec.assignment.clone();
        let mut run = app_rec
            .assignment
            .as_ref()
            .map_or(RunState::Running, |a| a.run);
        if let Some(old_id) = self.rollouts.active.remove(&app) {
            if let Some(old) = self.rollouts.records.get_mut(&old_id) {
                old.rollout.supersede(&id, now);
                previous = old.previous_assignment.clone();
                run = old.run;
                driven.writes.push(Write::Rollout(Box::new(old.clone())));
                self.rollouts.unannounced.insert(old_id.clone());
                info!(rollout = %old_id, by = %id, "rollout superseded");
            }
        }
        app_rec.assignment = Some(AssignmentRecord {
            selector: selector.to_string(),
            release,
            run,
            updated_at_ms: now,
            author,
            platforms,
        });
        self.fleet.put_app(app_rec.clone());
        driven.writes.push(Write::App(app_rec));
        let hold = self.hold_for(&rollout);
        self.fleet.hold(&app, hold);
        info!(rollout = %id, app = %app, release, devices = rollout.devices().count(), batches = rollout.batches().len(), "rollout created");
        self.rollouts.records.insert(
            id.clone(),
            RolloutRecord {
                rollout,
                previous_assignment: previous,
                run,
                agent_binaries: BTreeMap::new(),
            },
        );
        self.rollouts.active.insert(app.clone(), id.clone());
        let more = self.drive(&id, fx, now);
        driven.writes.extend(more.writes);
        driven.devices.extend(more.devices);
        Ok((id, driven))
    }

    /// An agent rollout: the devices the selector matches move to the
    /// version's binary for their architecture, batch by batch. Refused
    /// (naming them) when a device cannot replace its binary or the
    /// version has no binary for its architecture.
    fn plan_agent_rollout(
        &mut self,
        req: contract::CreateRollout,
        version: String,
        all: Vec<AgentReleaseRecord>,
        author: String,
    ) -> Result<(String, Driven), EngineError> {
        let now = super::now_ms();
        let invalid = |field: &str, message: String| EngineError::RolloutInvalid {
            field: field.into(),
            message,
        };
        let conflict = |field: &str, message: String| EngineError::RolloutConflict {
            field: field.into(),
            message,
        };
        let Some(to_release) = all.iter().find(|r| r.version == version).map(|r| r.release) else {
            return Err(invalid(
                "agent_version",
                format!("no agent release has version {version:?}; upload one first"),
            ));
        };
        let mut binaries: BTreeMap<u64, BTreeMap<String, AgentTarget>> = BTreeMap::new();
        for r in &all {
            binaries.entry(r.release).or_default().insert(
                r.arch.clone(),
                AgentTarget {
                    version: r.version.clone(),
                    digest: r.digest.clone(),
                    size: r.size,
                },
            );
        }
        let selector = Selector::parse(&req.selector).map_err(|e| {
            invalid(
                "selector",
                format!("selector {:?} is not valid: {e}", req.selector),
            )
        })?;
        let facts = self.fleet.agent_facts(&selector);
        if facts.is_empty() {
            return Err(conflict(
                "selector",
                format!("selector {:?} matches no device", selector.to_string()),
            ));
        }
        let fixed: Vec<String> = facts
            .iter()
            .filter(|(_, _, self_update, _)| !self_update)
            .map(|(d, _, _, _)| d.to_string())
            .collect();
        if !fixed.is_empty() {
            return Err(conflict(
                "selector",
                format!(
                    "these devices cannot replace their agent binary (an agent inside `drover serve`, or one older than self-update): {}",
                    fixed.join(", ")
                ),
            ));
        }
        let target = &binaries[&to_release];
        let no_binary: Vec<String> = facts
            .iter()
            .filter(|(_, arch, _, _)| !target.contains_key(arch))
            .map(|(d, arch, _, _)| format!("{d} ({arch})"))
            .collect();
        if !no_binary.is_empty() {
            return Err(conflict(
                "agent_version",
                format!(
                    "agent version {version} has binaries for {}, not for these devices: {}",
                    target.keys().cloned().collect::<Vec<_>>().join(", "),
                    no_binary.join(", ")
                ),
            ));
        }
        let targets: BTreeMap<DeviceId, u64> = facts
            .iter()
            .map(|(d, _, _, digest)| {
                let from = binaries
                    .iter()
                    .find(|(_, m)| m.values().any(|t| Some(&t.digest) == digest.as_ref()))
                    .map_or(0, |(r, _)| *r);
                (d.clone(), from)
            })
            .collect();
        // Only what this rollout can hand out: the target and what its
        // devices ran before.
        let keep: BTreeSet<u64> = targets.values().copied().chain([to_release]).collect();
        binaries.retain(|r, _| keep.contains(r));
        let (id, rollout, fx) = new_rollout(
            &req,
            agent_key(),
            selector.to_string(),
            to_release,
            author,
            Some(version.clone()),
            targets,
            now,
        )?;
        let mut driven = Driven {
            store: true,
            ..Default::default()
        };
        if let Some(old_id) = self.rollouts.agent_active.take() {
            if let Some(old) = self.rollouts.records.get_mut(&old_id) {
                old.rollout.supersede(&id, now);
                driven.writes.push(Write::Rollout(Box::new(old.clone())));
                self.rollouts.unannounced.insert(old_id.clone());
                info!(rollout = %old_id, by = %id, "agent rollout superseded");
            }
        }
        info!(rollout = %id, %version, release = to_release, devices = rollout.devices().count(), "agent rollout created");
        self.rollouts.records.insert(
            id.clone(),
            RolloutRecord {
                rollout,
                previous_assignment: None,
                run: RunState::Running,
                agent_binaries: binaries,
            },
        );
        self.rollouts.agent_active = Some(id.clone());
        let more = self.drive(&id, fx, now);
        driven.writes.extend(more.writes);
        driven.devices.extend(more.devices);
        Ok((id, driven))
    }

    /// Carries out effects of rollout `id` on the fleet (in memory; the
    /// writes returned make it durable). A device already where it should
    /// be is observed at once from its last report, which may start more.
    fn drive(&mut self, id: &str, fx: Vec<Effect>, now: u64) -> Driven {
        let mut out = Driven::default();
        let mut queue: VecDeque<Effect> = fx.into();
        let mut finished = None;
        while let Some(effect) = queue.pop_front() {
            let Some(rec) = self.rollouts.records.get_mut(id) else {
                return out;
            };
            let app = rec.rollout.spec().app.clone();
            match effect {
                Effect::Changed => {
                    self.rollouts.dirty.insert(id.to_string());
                    self.rollouts.unannounced.insert(id.to_string());
                }
                Effect::Finished(phase) => finished = Some(phase),
                Effect::SetRelease { device, release }
                    if rec.rollout.spec().agent_version.is_some() =>
                {
                    out.store = true;
                    let arch = self
                        .fleet
                        .agent_facts_of(&device)
                        .map(|(arch, _, _)| arch)
                        .unwrap_or_default();
                    let target = match release {
                        0 => None,
                        r => rec
                            .agent_binaries
                            .get(&r)
                            .and_then(|m| m.get(&arch))
                            .cloned(),
                    };
                    if release != 0 && target.is_none() {
                        let reason = format!("no binary of agent release {release} for {arch:?}");
                        queue.extend(rec.rollout.device_failed(&device, reason, now));
                        continue;
                    }
                    match self.fleet.set_device_agent(&device, target) {
                        Ok(Some(update)) => {
                            let (w, _) = self.fleet.apply_updates(std::slice::from_ref(&update));
                            out.writes.extend(w);
                            out.devices.push(device);
                        }
                        Ok(None) => {
                            if let Some(obs) = self.fleet.agent_observation(
                                &device,
                                &rec.agent_binaries,
                                rec.rollout.spec().to_release,
                            ) {
                                queue.extend(rec.rollout.observe(&device, obs, now));
                            }
                        }
                        Err(e) => {
                            warn!(rollout = %id, device = %device, error = %e, "agent rollout device is gone; skipped");
                            queue.extend(rec.rollout.device_gone(&device, now));
                        }
                    }
                }
                Effect::SetRelease { device, release } => {
                    out.store = true;
                    match self
                        .fleet
                        .set_device_release(&device, &app, release, rec.run)
                    {
                        Ok(Some(update)) => {
                            let (w, _) = self.fleet.apply_updates(std::slice::from_ref(&update));
                            out.writes.extend(w);
                            out.devices.push(device);
                        }
                        Ok(None) => {
                            if let Some(obs) = self.fleet.rollout_observation(&device, &app) {
                                queue.extend(rec.rollout.observe(&device, obs, now));
                            }
                        }
                        Err(e @ FleetError::UnknownDevice(_)) => {
                            warn!(rollout = %id, device = %device, error = %e, "rollout device is gone; skipped");
                            self.fleet.release_held_device(&app, &device);
                            queue.extend(rec.rollout.device_gone(&device, now));
                        }
                        Err(e) => {
                            warn!(rollout = %id, device = %device, error = %e, "rollout cannot set the device; failed");
                            queue.extend(rec.rollout.device_failed(&device, e.to_string(), now));
                        }
                    }
                }
            }
        }
        if let Some(phase) = finished {
            out.store = true;
            self.finish_rollout(id, phase, &mut out);
        }
        out
    }

    /// A rollout reached `phase` (final): the hold goes, and the
    /// assignment is what the phase says (see the module's doc).
    fn finish_rollout(&mut self, id: &str, phase: Phase, out: &mut Driven) {
        let Some(rec) = self.rollouts.records.get(id) else {
            return;
        };
        let app = rec.rollout.spec().app.clone();
        if rec.rollout.spec().agent_version.is_some() {
            // No assignment or hold: each device keeps the binary it was
            // last told, the rollback having set back the ones it moved.
            if self.rollouts.agent_active.as_deref() == Some(id) {
                self.rollouts.agent_active = None;
            }
            info!(rollout = %id, phase = ?phase, reason = rec.rollout.reason().unwrap_or(""), "agent rollout finished");
            return;
        }
        if self.rollouts.active.get(&app).map(String::as_str) == Some(id) {
            self.rollouts.active.remove(&app);
        }
        info!(rollout = %id, app = %app, phase = ?phase, reason = rec.rollout.reason().unwrap_or(""), "rollout finished");
        if phase == Phase::Superseded {
            return;
        }
        self.fleet.release_hold(&app);
        let devices: Vec<DeviceId> = rec.rollout.devices().map(|(d, _, _)| d.clone()).collect();
        let touched: Vec<DeviceId> = rec
            .rollout
            .touched()
            .filter(|(_, p)| !matches!(p, DeviceProgress::Skipped | DeviceProgress::RolledBack))
            .map(|(d, _)| d.clone())
            .collect();
        let previous = rec.previous_assignment.clone();
        if matches!(phase, Phase::RolledBack | Phase::Aborted) {
            if let Some(mut app_rec) = self.fleet.app(&app) {
                app_rec.assignment = previous.clone();
                self.fleet.put_app(app_rec.clone());
                out.writes.push(Write::App(app_rec));
            }
            if phase == Phase::Aborted {
                out.writes.extend(self.fleet.unassign(&app, &touched, true));
            } else if previous.is_none() {
                out.writes
                    .extend(self.fleet.unassign(&app, &devices, false));
            }
        }
        let updates = self.fleet.reconcile_app(&app);
        let (w, _) = self.fleet.apply_updates(&updates);
        out.writes.extend(w);
        out.devices.extend(updates.into_iter().map(|u| u.device));
        // Bounded history: the oldest finished rollouts go.
        let mut finished: Vec<(u64, String)> = self
            .rollouts
            .records
            .iter()
            .filter(|(_, r)| r.rollout.phase().is_final())
            .map(|(k, r)| (r.rollout.created_at_ms(), k.clone()))
            .collect();
        if finished.len() > FINISHED_KEPT {
            finished.sort();
            for (_, k) in finished.iter().take(finished.len() - FINISHED_KEPT) {
                if k != id {
                    self.rollouts.records.remove(k);
                    self.rollouts.dirty.remove(k);
                    out.writes.push(Write::DeleteRollout(k.clone()));
                }
            }
        }
    }

    /// Queues what driving produced: the rollout (when asked to store it)
    /// with the desired states in one transaction, published and announced
    /// once durable, and `reply` answered then.
    async fn commit_driven(
        &mut self,
        id: &str,
        mut driven: Driven,
        reply: Option<oneshot::Sender<Result<Done, EngineError>>>,
        done: Option<Done>,
    ) {
        if driven.store {
            if let Some(rec) = self.rollouts.records.get(id) {
                driven.writes.push(Write::Rollout(Box::new(rec.clone())));
                self.rollouts.dirty.remove(id);
                self.rollouts.stored += 1;
            }
        }
        if driven.writes.is_empty() && reply.is_none() {
            return;
        }
        let announce = if driven.store {
            self.rollouts.unannounced.remove(id);
            vec![id.to_string()]
        } else {
            Vec::new()
        };
        self.queue(
            driven.writes,
            Then::Reconciled {
                reply,
                done,
                devices: driven.devices,
                rollouts: announce,
            },
        )
        .await;
    }

    pub(super) async fn rollout_action(
        &mut self,
        id: String,
        action: RolloutAction,
        reply: oneshot::Sender<Result<Done, EngineError>>,
    ) {
        let now = super::now_ms();
        let Some(rec) = self.rollouts.records.get_mut(&id) else {
            let _ = reply.send(Err(EngineError::UnknownRollout(id)));
            return;
        };
        let r = &mut rec.rollout;
        let result = match action {
            RolloutAction::Pause => r.pause(now),
            RolloutAction::Resume => r.resume(now),
            RolloutAction::Approve => r.approve(now),
            RolloutAction::Abort => r.abort(now),
            RolloutAction::Rollback => r.rollback(now),
        };
        match result {
            Ok(fx) => {
                info!(rollout = %id, action = action.as_str(), "rollout action");
                let mut driven = self.drive(&id, fx, now);
                driven.store = true;
                let view = self.rollouts.get(&id).map(Box::new);
                self.commit_driven(&id, driven, Some(reply), view.map(Done::Rollout))
                    .await;
            }
            Err(e) => {
                let _ = reply.send(Err(EngineError::RolloutConflict {
                    field: "action".into(),
                    message: e.to_string(),
                }));
            }
        }
    }

    /// A device reported its state: each running rollout it is in flight
    /// in looks at it. O(running rollouts) per report.
    pub(super) async fn rollouts_observe(&mut self, device: &DeviceId) {
        if self.rollouts.active.is_empty() && self.rollouts.agent_active.is_none() {
            return;
        }
        let now = super::now_ms();
        let ids = self.rollouts.running_ids();
        for id in ids {
            let Some(rec) = self.rollouts.records.get_mut(&id) else {
                continue;
            };
            let in_flight = matches!(
                rec.rollout.device(device),
                Some(
                    DeviceProgress::Updating { .. }
                        | DeviceProgress::Ready { .. }
                        | DeviceProgress::RollingBack { .. }
                )
            );
            if !in_flight {
                continue;
            }
            let app = rec.rollout.spec().app.clone();
            let obs = if rec.rollout.spec().agent_version.is_some() {
                self.fleet.agent_observation(
                    device,
                    &rec.agent_binaries,
                    rec.rollout.spec().to_release,
                )
            } else {
                self.fleet.rollout_observation(device, &app)
            };
            let Some(obs) = obs else {
                continue;
            };
            let fx = rec.rollout.observe(device, obs, now);
            if fx.is_empty() {
                continue;
            }
            let driven = self.drive(&id, fx, now);
            self.commit_driven(&id, driven, None, None).await;
        }
    }

    /// A device's labels changed (or it was taken over by hand, `gone`):
    /// a running rollout whose selector it no longer matches lets it go,
    /// before the assignment reconciles it.
    pub(super) async fn rollouts_relabelled(
        &mut self,
        device: &DeviceId,
        gone_from: Option<&Name>,
    ) {
        if self.rollouts.active.is_empty() && self.rollouts.agent_active.is_none() {
            return;
        }
        let now = super::now_ms();
        let labels = self.fleet.labels_of(device);
        let ids = self.rollouts.running_ids();
        for id in ids {
            let Some(rec) = self.rollouts.records.get_mut(&id) else {
                continue;
            };
            let app = rec.rollout.spec().app.clone();
            match rec.rollout.device(device) {
                None | Some(DeviceProgress::Skipped) => continue,
                Some(_) => {}
            }
            let agent = rec.rollout.spec().agent_version.is_some();
            let still = (agent || gone_from != Some(&app))
                && match (&labels, Selector::parse(&rec.rollout.spec().selector)) {
                    (Some(l), Ok(sel)) => sel.matches(l),
                    _ => false,
                };
            if still {
                continue;
            }
            info!(rollout = %id, device = %device, "device left the rollout");
            if !agent {
                self.fleet.release_held_device(&app, device);
            }
            let fx = rec.rollout.device_gone(device, now);
            let driven = self.drive(&id, fx, now);
            self.commit_driven(&id, driven, None, None).await;
        }
    }

    /// Deadlines, coalesced announcements and the periodic store of
    /// progress. Called every [`TICK`].
    pub(super) async fn rollouts_tick(&mut self) {
        let now = super::now_ms();
        let ids = self.rollouts.running_ids();
        for id in ids {
            let Some(rec) = self.rollouts.records.get_mut(&id) else {
                continue;
            };
            if rec.rollout.next_deadline().is_none_or(|t| t > now) {
                continue;
            }
            let fx = rec.rollout.tick(now);
            let driven = self.drive(&id, fx, now);
            self.commit_driven(&id, driven, None, None).await;
        }
        let unannounced: Vec<String> = std::mem::take(&mut self.rollouts.unannounced)
            .into_iter()
            .collect();
        self.announce_rollouts(&unannounced);
        let due = self
            .rollouts
            .last_flush
            .is_none_or(|t| t.elapsed() >= FLUSH_EVERY);
        if due && !self.rollouts.dirty.is_empty() {
            let writes: Vec<Write> = std::mem::take(&mut self.rollouts.dirty)
                .into_iter()
                .filter_map(|id| self.rollouts.records.get(&id))
                .map(|r| Write::Rollout(Box::new(r.clone())))
                .collect();
            self.rollouts.last_flush = Some(Instant::now());
            self.rollouts.stored += writes.len() as u64;
            self.record(writes).await;
        }
    }

    /// Announces rollouts (after their writes are durable).
    pub(super) fn announce_rollouts(&mut self, ids: &[String]) {
        for id in ids {
            if let Some(view) = self.rollouts.get(id) {
                self.emit(Change::Rollout {
                    rollout: Box::new(view),
                });
            }
        }
    }
}

/// The engine's part of rollouts, on a real redb file with devices
/// simulated by link events (no MQTT, no Docker: the agents' side is
/// covered by tests/tests/rollouts.rs).
#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use drover_shared::model::{AppPhase, AppSpec, AppStatus, ContainerStatus, ObservedState};
    use drover_shared::payload::{Hello, StateReport, Status};

    use super::super::tests::{engine, Fixture};
    use super::super::{Done, FleetChange};
    use super::*;
    use crate::contract::{CreateRollout, RolloutPhase};
    use crate::core::fleet::DeviceMessage;
    use crate::link::Event;

    fn id(s: &str) -> DeviceId {
        DeviceId::new(s).expect("id")
    }

    fn web() -> Name {
        Name::new("web").expect("name")
    }

    async fn send(f: &Fixture, device: &str, msg: DeviceMessage) {
        f.link
            .send(Event::Device {
                id: id(device),
                msg: Box::new(msg),
                retained: false,
            })
            .await
            .expect("send");
    }

    /// A device comes online with labels of its own.
    async fn device(f: &Fixture, name: &str, group: &str) {
        send(
            f,
            name,
            DeviceMessage::Status(Status {
                online: true,
                at_ms: 1,
            }),
        )
        .await;
        let hello = Hello {
            cpus: 4,
            labels: BTreeMap::from([("g".to_string(), group.to_string())]),
            ..Default::default()
        };
        send(f, name, DeviceMessage::Hello(hello)).await;
    }

    /// The device reports what its desired state asks, running (or with
    /// `release` 0, without the app).
    async fn report(f: &Fixture, name: &str, release: u64) {
        let d = f
            .engine
            .device(id(name))
            .await
            .expect("engine")
            .expect("device");
        let generation = d.desired.as_ref().map_or(0, |d| d.generation);
        let apps = if release == 0 {
            Vec::new()
        } else {
            vec![AppStatus {
                name: web(),
                phase: AppPhase::Running,
                error: None,
                attempts: 0,
                next_retry_at_ms: None,
                containers: vec![ContainerStatus {
                    name: Name::new("main").expect("name"),
                    image: "img".into(),
                    container_id: None,
                    state: "running".into(),
                    exit_code: None,
                    error: None,
                    health: None,
                    restarts: 0,
                }],
                release,
            }]
        };
        let observed = ObservedState {
            applied_generation: generation,
            desired_generation: generation,
            apps,
            ..Default::default()
        };
        send(
            f,
            name,
            DeviceMessage::State(StateReport { at_ms: 1, observed }),
        )
        .await;
    }

    async fn desired_release(f: &Fixture, name: &str) -> u64 {
        let d = f
            .engine
            .device(id(name))
            .await
            .expect("engine")
            .expect("device");
        d.desired
            .and_then(|d| d.app(&web()).map(|a| a.release))
            .unwrap_or(0)
    }

    async fn app(f: &Fixture, env: &str) {
        let spec: AppSpec = serde_json::from_value(serde_json::json!({
            "name": "web",
            "containers": [{"name": "main", "image": "127.0.0.1:5000/busybox:1", "env": {"R": env}}]
        }))
        .expect("spec");
        let change = if env == "1" {
            FleetChange::CreateApp(spec, "t".into())
        } else {
            FleetChange::UpdateApp(spec, "t".into())
        };
        f.engine.change(change).await.expect("app");
    }

    async fn create(f: &Fixture, req: serde_json::Value) -> contract::Rollout {
        let request: CreateRollout = serde_json::from_value(req).expect("request");
        match f
            .engine
            .change(FleetChange::CreateRollout {
                request,
                author: "t".into(),
                platforms: Vec::new(),
                agent_binaries: Vec::new(),
            })
            .await
            .expect("created")
        {
            Done::Rollout(r) => *r,
            other => panic!("{other:?}"),
        }
    }

    async fn wait(
        f: &Fixture,
        rid: &str,
        what: &str,
        ok: impl Fn(&contract::Rollout) -> bool,
    ) -> contract::Rollout {
        for _ in 0..200 {
            let r = f
                .engine
                .rollout(rid.into())
                .await
                .expect("engine")
                .expect("rollout");
            if ok(&r) {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("rollout never got to {what}");
    }

    #[tokio::test]
    async fn batches_follow_reports_and_a_device_relabelled_out_is_skipped_and_loses_the_app() {
        let f = engine();
        for d in ["d1", "d2", "d3"] {
            device(&f, d, "a").await;
        }
        device(&f, "x", "b").await;
        app(&f, "1").await;
        let r = create(
            &f,
            serde_json::json!({"app": "web", "selector": "g=a", "batches": [1]}),
        )
        .await;
        assert_eq!(r.counts.total, 3);
        assert_eq!((r.batches[0].updating, r.batches[1].pending), (1, 2));
        // Only the canary has been told.
        assert_eq!(desired_release(&f, "d1").await, 1);
        assert_eq!(desired_release(&f, "d2").await, 0);
        assert_eq!(desired_release(&f, "x").await, 0);
        // A report of something else does not count.
        report(&f, "d1", 0).await;
        let r = f
            .engine
            .rollout(r.id.clone())
            .await
            .expect("engine")
            .expect("rollout");
        assert_eq!(r.current_batch, 0);
        report(&f, "d1", 1).await;
        let r = wait(&f, &r.id, "batch 2", |r| r.current_batch == 1).await;
        assert_eq!(r.batches[0].updated, 1);
        assert_eq!(desired_release(&f, "d2").await, 1);
        assert_eq!(desired_release(&f, "d3").await, 1);
        // d3 leaves the selector (the operator's label wins over its own):
        // skipped, and the app goes.
        f.engine
            .change(FleetChange::SetLabels {
                device: id("d3"),
                set: BTreeMap::from([("g".to_string(), "b".to_string())]),
                remove: Vec::new(),
                replace: false,
            })
            .await
            .expect("relabel");
        assert_eq!(desired_release(&f, "d3").await, 0);
        report(&f, "d2", 1).await;
        let r = wait(&f, &r.id, "succeeded", |r| {
            r.phase == RolloutPhase::Succeeded
        })
        .await;
        assert_eq!((r.counts.updated, r.counts.skipped), (2, 1));
        assert_eq!(r.percent, 100);
        // The assignment is the rollout's target, and now governs: d3
        // relabelled back in gets the app at once.
        let a = f.engine.app(web()).await.expect("engine").expect("app");
        let a = a.assignment.expect("assignment");
        assert_eq!((a.selector.as_str(), a.release), ("g=a", 1));
        f.engine
            .change(FleetChange::SetLabels {
                device: id("d3"),
                set: BTreeMap::new(),
                remove: vec!["g".into()],
                replace: false,
            })
            .await
            .expect("relabel");
        assert_eq!(desired_release(&f, "d3").await, 1);
    }

    #[tokio::test]
    async fn abort_leaves_moved_devices_as_overrides_and_puts_the_assignment_back() {
        let f = engine();
        for d in ["d1", "d2", "d3"] {
            device(&f, d, "a").await;
        }
        app(&f, "1").await;
        let r = create(&f, serde_json::json!({"app": "web", "selector": "g=a"})).await;
        for d in ["d1", "d2", "d3"] {
            report(&f, d, 1).await;
        }
        wait(&f, &r.id, "succeeded", |r| {
            r.phase == RolloutPhase::Succeeded
        })
        .await;
        app(&f, "2").await;
        let r = create(&f, serde_json::json!({"app": "web", "batches": [1]})).await;
        assert_eq!((r.from_release, r.to_release), (1, 2));
        // A second rollout of the app supersedes the first running one.
        app(&f, "3").await;
        let newer = create(
            &f,
            serde_json::json!({"app": "web", "batches": [1], "release": 2}),
        )
        .await;
        let old = f
            .engine
            .rollout(r.id.clone())
            .await
            .expect("engine")
            .expect("rollout");
        assert_eq!(old.phase, RolloutPhase::Superseded);
        assert!(old.reason.as_deref().unwrap_or("").contains(&newer.id));
        assert_eq!(desired_release(&f, "d1").await, 2);
        // Abort: d1 keeps release 2 as an override; the assignment is
        // release 1 again and the others stay on it.
        let done = f
            .engine
            .change(FleetChange::RolloutAction {
                id: newer.id.clone(),
                action: RolloutAction::Abort,
            })
            .await
            .expect("abort");
        let Done::Rollout(v) = done else {
            panic!("{done:?}")
        };
        assert_eq!(v.phase, RolloutPhase::Aborted);
        let a = f.engine.app(web()).await.expect("engine").expect("app");
        assert_eq!(a.assignment.expect("assignment").release, 1);
        assert_eq!(desired_release(&f, "d1").await, 2);
        assert_eq!(desired_release(&f, "d2").await, 1);
        let view = f
            .engine
            .read(|fl, _| fl.assignment_view(&web()))
            .await
            .expect("engine")
            .expect("view");
        assert_eq!(view.overridden, vec![id("d1")]);
        // Finished: another action is a conflict, naming the phase.
        let err = f
            .engine
            .change(FleetChange::RolloutAction {
                id: newer.id.clone(),
                action: RolloutAction::Resume,
            })
            .await
            .expect_err("finished");
        assert!(err.to_string().contains("Aborted"), "{err}");
    }

    #[tokio::test]
    async fn progress_from_reports_is_stored_in_batches_not_per_report() {
        let f = engine();
        device(&f, "d1", "a").await;
        device(&f, "d2", "a").await;
        app(&f, "1").await;
        // A long minimum ready time: reports move devices to Ready only.
        let r = create(
            &f,
            serde_json::json!({"app": "web", "min_ready_secs": 3600}),
        )
        .await;
        let stored = |f: &Fixture| {
            f.store
                .rollouts()
                .expect("rollouts")
                .into_iter()
                .find(|x| x.rollout.id() == r.id)
                .map(|x| {
                    crate::core::rollout::device_view(
                        &id("d1"),
                        0,
                        x.rollout.device(&id("d1")).expect("d1"),
                    )
                    .state
                })
        };
        // Stored with the batch start, in the same transaction.
        assert_eq!(stored(&f), Some(contract::RolloutDeviceState::Updating));
        report(&f, "d1", 1).await;
        wait(&f, &r.id, "d1 ready", |r| r.batches[0].updating == 2).await;
        let mem = f
            .engine
            .rollout_devices(
                r.id.clone(),
                Some(contract::RolloutDeviceState::Ready),
                None,
                0,
                10,
            )
            .await
            .expect("engine")
            .expect("rollout");
        assert_eq!(mem.len(), 1);
        // Flapping between ready and not: every report changes the
        // device's progress, and the rollout is stored at most once per
        // flush period for all of them.
        let before = f.engine.read_rollouts(|r| r.stored).await.expect("engine");
        let start = Instant::now();
        for i in 0..200 {
            report(&f, "d1", if i % 2 == 0 { 0 } else { 1 }).await;
        }
        wait(&f, &r.id, "d1 ready again", |r| r.updated_at_ms > 0).await;
        let _ = f.engine.devices().await.expect("engine");
        tokio::time::sleep(FLUSH_EVERY + TICK * 2).await;
        let stores = f.engine.read_rollouts(|r| r.stored).await.expect("engine") - before;
        let periods = start.elapsed().as_millis() / FLUSH_EVERY.as_millis() + 2;
        assert!(stores >= 1, "the progress was never stored");
        assert!(
            u128::from(stores) <= periods,
            "{stores} stores for 200 reports in {:?}",
            start.elapsed()
        );
        // And what is stored is the latest progress.
        assert_eq!(stored(&f), Some(contract::RolloutDeviceState::Ready));
    }

    #[tokio::test]
    async fn a_device_whose_port_is_taken_fails_at_once_saying_why() {
        let f = engine();
        device(&f, "d1", "a").await;
        device(&f, "d2", "a").await;
        let with_port = |name: &str| -> AppSpec {
            serde_json::from_value(serde_json::json!({
                "name": name,
                "containers": [{"name": "main", "image": "127.0.0.1:5000/busybox:1",
                                "ports": [{"host": 8080, "container": 80}]}]
            }))
            .expect("spec")
        };
        for n in ["web", "other"] {
            f.engine
                .change(FleetChange::CreateApp(with_port(n), "t".into()))
                .await
                .expect("app");
        }
        f.engine
            .change(FleetChange::Apply {
                device: id("d1"),
                app: Name::new("other").expect("name"),
                op: drover_shared::payload::Op::Deploy,
            })
            .await
            .expect("deploy");
        let r = create(
            &f,
            serde_json::json!({"app": "web", "selector": "g=a", "on_failure": "continue"}),
        )
        .await;
        let failed = f
            .engine
            .rollout_devices(
                r.id.clone(),
                Some(contract::RolloutDeviceState::Failed),
                None,
                0,
                10,
            )
            .await
            .expect("engine")
            .expect("rollout");
        assert_eq!(failed.len(), 1, "{failed:?}");
        assert_eq!(failed[0].device, id("d1"));
        let reason = failed[0].reason.clone().unwrap_or_default();
        assert!(reason.contains("host port 8080"), "{reason}");
        assert_eq!(desired_release(&f, "d2").await, 1);
        report(&f, "d2", 1).await;
        let r = wait(&f, &r.id, "finished", |r| r.phase == RolloutPhase::Failed).await;
        assert_eq!((r.counts.updated, r.counts.failed), (1, 1));
    }
}
