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
use crate::core::fleet::Hold;
use crate::core::records::{AssignmentRecord, RolloutRecord};
use crate::core::rollout::{DeviceProgress, Effect, Phase, Rollout, RolloutSpec};
use crate::core::selector::Selector;
use crate::store::Write;

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
    /// Progress not yet stored.
    dirty: BTreeSet<String>,
    /// Progress not yet announced.
    unannounced: BTreeSet<String>,
    last_flush: Option<Instant>,
}

impl Rollouts {
    pub fn running(&self, app: &Name) -> Option<&str> {
        self.active.get(app).map(String::as_str)
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
                .map(|(d, b, p)| crate::core::rollout::device_view(d, b, p))
                .collect(),
        )
    }
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
            if !rec.rollout.phase().is_final() {
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
        let ids: Vec<String> = self.rollouts.active.values().cloned().collect();
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
        reply: oneshot::Sender<Result<Done, EngineError>>,
    ) {
        match self.plan_rollout(req, author) {
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
    ) -> Result<(String, Driven), EngineError> {
        let now = super::now_ms();
        let invalid = |field: &str, message: String| EngineError::RolloutInvalid {
            field: field.into(),
            message,
        };
        let mut app_rec = self
            .fleet
            .app(&req.app)
            .ok_or_else(|| crate::core::fleet::FleetError::UnknownApp(req.app.clone()))?;
        let release = if req.release == 0 {
            app_rec.latest_release()
        } else {
            req.release
        };
        if app_rec.release(release).is_none() {
            return Err(crate::core::fleet::FleetError::UnknownRelease {
                app: req.app.clone(),
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
        let targets = self.fleet.rollout_targets(&req.app, &selector);
        if targets.is_empty() {
            return Err(EngineError::RolloutConflict {
                field: "selector".into(),
                message: format!(
                    "selector {:?} matches no device that the assignment of app {} may manage",
                    selector.to_string(),
                    req.app
                ),
            });
        }
        let to_secs = |s: u64, field: &str| {
            s.checked_mul(1000)
                .ok_or_else(|| invalid(field, format!("{s} seconds is too long")))
        };
        let spec = RolloutSpec {
            app: req.app.clone(),
            selector: selector.to_string(),
            to_release: release,
            batches: req.batches.clone(),
            max_unavailable: req.max_unavailable,
            success_threshold_percent: req.success_threshold_percent,
            on_failure: req.on_failure.into(),
            device_timeout_ms: to_secs(req.device_timeout_secs, "device_timeout_secs")?,
            min_ready_ms: to_secs(req.min_ready_secs, "min_ready_secs")?,
            approval: req.approval,
            author: author.clone(),
        };
        let id = uuid::Uuid::new_v4().to_string();
        let (rollout, fx) = Rollout::new(id.clone(), spec, targets, now).map_err(|e| match e {
            crate::core::rollout::RolloutError::Field { field, message } => {
                invalid(&field, format!("{field}: {message}"))
            }
            other => invalid("rollout", other.to_string()),
        })?;
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
        if let Some(old_id) = self.rollouts.active.remove(&req.app) {
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
        });
        self.fleet.put_app(app_rec.clone());
        driven.writes.push(Write::App(app_rec));
        let hold = self.hold_for(&rollout);
        self.fleet.hold(&req.app, hold);
        info!(rollout = %id, app = %req.app, release, devices = rollout.devices().count(), batches = rollout.batches().len(), "rollout created");
        self.rollouts.records.insert(
            id.clone(),
            RolloutRecord {
                rollout,
                previous_assignment: previous,
                run,
            },
        );
        self.rollouts.active.insert(req.app.clone(), id.clone());
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
                        Err(e) => {
                            warn!(rollout = %id, device = %device, error = %e, "rollout cannot set the device; skipped");
                            self.fleet.release_held_device(&app, &device);
                            queue.extend(rec.rollout.device_gone(&device, now));
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
        if self.rollouts.active.is_empty() {
            return;
        }
        let now = super::now_ms();
        let ids: Vec<String> = self.rollouts.active.values().cloned().collect();
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
            let Some(obs) = self.fleet.rollout_observation(device, &app) else {
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
        if self.rollouts.active.is_empty() {
            return;
        }
        let now = super::now_ms();
        let labels = self.fleet.labels_of(device);
        let ids: Vec<String> = self.rollouts.active.values().cloned().collect();
        for id in ids {
            let Some(rec) = self.rollouts.records.get_mut(&id) else {
                continue;
            };
            let app = rec.rollout.spec().app.clone();
            match rec.rollout.device(device) {
                None | Some(DeviceProgress::Skipped) => continue,
                Some(_) => {}
            }
            let still = gone_from != Some(&app)
                && match (&labels, Selector::parse(&rec.rollout.spec().selector)) {
                    (Some(l), Ok(sel)) => sel.matches(l),
                    _ => false,
                };
            if still {
                continue;
            }
            info!(rollout = %id, device = %device, "device left the rollout");
            self.fleet.release_held_device(&app, device);
            let fx = rec.rollout.device_gone(device, now);
            let driven = self.drive(&id, fx, now);
            self.commit_driven(&id, driven, None, None).await;
        }
    }

    /// Deadlines, coalesced announcements and the periodic store of
    /// progress. Called every [`TICK`].
    pub(super) async fn rollouts_tick(&mut self) {
        let now = super::now_ms();
        let ids: Vec<String> = self.rollouts.active.values().cloned().collect();
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
        for id in std::mem::take(&mut self.rollouts.unannounced) {
            if let Some(view) = self.rollouts.get(&id) {
                self.emit(Change::Rollout {
                    rollout: Box::new(view),
                });
            }
        }
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
